"""`analyze_adapter` end to end on a tiny causal LM: every module's spectrum against the dense SVD of its ΔW, the
§7.3 numbers, tokens from the last layers, φ of a pair, and the notes for what was skipped."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import approx, assert_close
from tiny_adapters import adapter, tiny_causal_lm_dir

from lorakit import LorakitError
from lorakit.analysis import analyze_adapter, read_factors


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_causal_lm_dir(tmp_path_factory.mktemp("tiny-lm"))


def test_every_module_has_the_spectrum_of_its_dense_update(tmp_path, base_dir):
    path = adapter(tmp_path / "a", str(base_dir))
    analysis = analyze_adapter(path)
    factors = read_factors(path)
    assert len(analysis.modules) == 14 and analysis.base == str(base_dir)
    for module in analysis.modules:
        left, right = factors.modules[module.name].update()
        dense = torch.linalg.svdvals(left @ right)[:4]
        assert_close(torch.tensor(module.singular_values, dtype=torch.float64), dense, "float64 reordered")
        assert module.rank == 4 and 1.0 <= module.stable_rank <= module.effective_rank <= 4.0


def test_the_base_gives_amplification_for_every_module_and_tokens_for_the_last_layer(tmp_path, base_dir):
    analysis = analyze_adapter(adapter(tmp_path / "a", str(base_dir)))
    from lorakit.models import load_model

    weights = dict(load_model(str(base_dir))[0].named_modules())
    for module in analysis.modules:
        amp = module.amplification
        assert amp is not None and amp.factor is not None
        assert amp.weight_norm == approx(float(weights[module.name].weight.detach().double().norm()))
        assert amp.delta_norm == approx(float(torch.tensor(module.singular_values, dtype=torch.float64).norm()))
    assert analysis.tokens is not None
    assert {(t.layer, t.module.rsplit(".", 1)[-1]) for t in analysis.tokens} == {
        (0, "o_proj"), (0, "down_proj"), (1, "o_proj"), (1, "down_proj")}  # the last two layers: both, here
    assert all(len(t.plus) == 8 and t.plus[0].startswith("w") for t in analysis.tokens)


def test_an_adapter_against_itself_has_phi_one_and_another_seed_less(tmp_path, base_dir):
    first = adapter(tmp_path / "a", str(base_dir), seed=0)
    other = adapter(tmp_path / "b", str(base_dir), seed=1, rank=2, targets=["q_proj", "v_proj"])
    same = analyze_adapter(first, against=first, base=False)
    assert len(same.similarity) == 14
    for s in same.similarity:
        for grid in (s.phi_a, s.phi_input, s.phi_output):
            diagonal = torch.tensor(grid, dtype=torch.float64).diagonal()
            assert_close(diagonal, torch.ones(4, dtype=torch.float64), "float64 reordered")
    pair = analyze_adapter(first, against=other, base=False)
    assert len(pair.similarity) == 4 and all(s.ranks == (4, 2) for s in pair.similarity)
    assert all(len(s.phi_a) == 4 and len(s.phi_a[0]) == 2 for s in pair.similarity)
    assert max(s.phi_a[0][0] for s in pair.similarity) < 0.9  # independent random A factors
    summary = pair.summary()
    assert summary["compared_modules"] == 4
    assert summary["random_phi_a_top1"] == approx(1 / 32) and summary["random_phi_a_full"] == approx(2 / 32)


def test_without_the_base_the_factors_alone_are_analysed_and_the_skip_is_noted(tmp_path):
    analysis = analyze_adapter(adapter(tmp_path / "a", "nowhere/not-a-model"), base=False)
    assert all(m.amplification is None for m in analysis.modules) and analysis.tokens is None
    assert any("no base model loaded" in n for n in analysis.notes)
    assert analysis.summary()["median_amplification"] is None


def test_a_principal_adapter_without_its_init_file_is_measured_from_recomputed_factors(tmp_path, base_dir):
    from lorakit.io import PRINCIPAL_NAME

    path = adapter(tmp_path / "a", str(base_dir), init="principal", targets=["q_proj"])
    with_file = analyze_adapter(path)
    (path / PRINCIPAL_NAME).unlink()
    with pytest.raises(LorakitError, match="needs the base's W"):
        analyze_adapter(path, base=False)
    recomputed = analyze_adapter(path)
    assert any("recomputed from W" in n for n in recomputed.notes)
    for a, b in zip(with_file.modules, recomputed.modules, strict=True):
        assert a.rank == b.rank == 8  # [B, -B₀]
        assert_close(torch.tensor(b.singular_values), torch.tensor(a.singular_values), "fp32 SVD vs float64 SVD")


def test_the_json_holds_every_module_and_is_strict(tmp_path, base_dir):
    analysis = analyze_adapter(adapter(tmp_path / "a", str(base_dir)))
    data = json.loads(json.dumps(analysis.as_json(), allow_nan=False))
    assert len(data["modules"]) == 14 and data["summary"]["modules"] == 14
    first = data["modules"][0]
    assert set(first) >= {"name", "kind", "layer", "singular_values", "stable_rank", "effective_rank", "energy",
                          "amplification"}
    assert first["energy"][-1] == approx(1.0)


def test_the_summary_phi_of_output_directions_equals_the_dense_svds_of_the_two_updates(tmp_path, base_dir):
    first = adapter(tmp_path / "a", str(base_dir), seed=0)
    other = adapter(tmp_path / "b", str(base_dir), seed=1, rank=2)
    summary = analyze_adapter(first, against=other, base=False).summary()
    one, two = read_factors(first), read_factors(other)
    top1, top2 = [], []
    for name in one.modules:
        u1 = torch.linalg.svd(torch.mm(*one.modules[name].update()))[0]
        u2 = torch.linalg.svd(torch.mm(*two.modules[name].update()))[0]
        top1.append(float(u1[:, 0] @ u2[:, 0]) ** 2)  # φ(1, 1) = cos² of the top output directions
        top2.append(float(torch.linalg.matrix_norm(u1[:, :2].T @ u2[:, :2])) ** 2 / 2)  # φ(2, 2), k = 2
    assert summary["mean_phi_u_top1"] == approx(sum(top1) / len(top1))
    assert summary["mean_phi_u_full"] == approx(sum(top2) / len(top2))


def test_texts_orient_the_directions_and_give_the_net_effect_of_the_adapted_models_mean_input(tmp_path, base_dir):
    from lorakit.io import load_adapter
    from lorakit.models import load_model

    path = adapter(tmp_path / "a", str(base_dir))
    texts = ["w5 w9 w12", "w7", "  ", "w3 w40 w41 w42"]
    analysis = analyze_adapter(path, texts=texts)
    assert analysis.probe is not None and (analysis.probe.texts, analysis.probe.tokens) == (3, 8)
    assert analysis.summary()["texts"] == 3 and analysis.summary()["text_tokens"] == 8
    model, tokenizer = load_model(str(base_dir), head="causal-lm")
    load_adapter(model, path)  # every module of both layers adapted: layer 1's inputs differ from the base's
    names = ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, args, out, n=n: seen[n].append(args[0][0]))
               for n in names]
    with torch.no_grad():
        for text in (t for t in texts if t.strip()):
            model(torch.tensor([tokenizer(text)["input_ids"]]))
    for handle in handles:
        handle.remove()
    unembed, scale = model.lm_head.weight.double(), model.model.norm.weight.double()
    for name in names:
        x = torch.cat(seen[name]).double()  # (8, in): every token's input to the module, one text at a time
        left, right = read_factors(path).modules[name].update()
        delta = left @ right @ x.mean(0)  # ΔW x̄, dense
        scores = unembed @ (scale * delta)  # E (γ ⊙ ΔW x̄)
        (effect,) = [e for e in analysis.probe.effects if e.module == name]
        assert effect.raised == [f"w{i}" for i in torch.topk(scores, 8).indices.tolist()]
        assert effect.lowered == [f"w{i}" for i in torch.topk(-scores, 8).indices.tolist()]
        assert effect.raised_scores == approx(torch.topk(scores, 8).values.tolist(), "fp32 reordered")
        assert effect.norm == approx(float(delta.norm()), "fp32 reordered")
        u, _, vh = torch.linalg.svd(left @ right, full_matrices=False)
        v = vh[:2].T  # (in, 2): the dense SVD's own signs
        directions = [t for t in analysis.tokens or [] if t.module == name]
        assert [t.oriented_by for t in directions] == ["texts", "texts"]
        assert [t.mean_projection for t in directions] == approx((v.T @ x.mean(0)).abs().tolist(), "fp32 reordered")
        assert [t.mean_abs_projection for t in directions] == approx((x @ v).abs().mean(0).tolist(),
                                                                     "fp32 reordered")
        for k, t in enumerate(directions):  # the + end: u_k read with the sign of the mean v_kᵀx
            promoted = torch.sign(v[:, k] @ x.mean(0)) * (unembed @ (scale * u[:, k]))
            assert (t.plus[0], t.minus[0]) == (f"w{int(promoted.argmax())}", f"w{int(promoted.argmin())}")


def test_texts_beyond_the_cap_are_not_used_and_the_note_says_so(tmp_path, base_dir, monkeypatch):
    from lorakit.analysis import analyze

    monkeypatch.setattr(analyze, "MAX_TEXTS", 2)
    analysis = analyze_adapter(adapter(tmp_path / "a", str(base_dir)), texts=["w5 w6", "w7", "w8 w9 w10"])
    assert analysis.probe is not None and (analysis.probe.texts, analysis.probe.tokens) == (2, 3)
    assert "the first 2 of 3 texts were used" in analysis.notes
