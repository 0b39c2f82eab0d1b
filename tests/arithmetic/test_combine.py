"""combine against float64 references: cat and full-rank linear reproduce Σ wᵢΔWᵢ, linear at rank k is the dense
SVD's best rank-k approximation, TIES and DARE match the papers' steps written out here, and the saved adapters load."""

from __future__ import annotations

import json

import pytest
import torch
from arithmetic_helpers import deltas, make_adapter, truncated
from conftest import TOLERANCES, relative_error, tiny_bert, tiny_llama
from torch import nn

from lorakit import load_adapter
from lorakit.arithmetic import combine
from lorakit.io import TASK_NAME, read_adapter

FP32 = "fp32 reordered"  # fp32 factors against a float64 formula, through QR and SVD


@pytest.fixture
def two(tmp_path):
    return make_adapter(tmp_path / "a", seed=1), make_adapter(tmp_path / "b", seed=2)


def _weighted_sum(parts: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    names = sorted(set().union(*(d.keys() for d, _ in parts)))
    return {n: sum(w * d[n] for d, w in parts if n in d) for n in names}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ties_reference(updates: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023, Algorithm 1) written out: keep each task vector's top round(density·n)
    magnitudes (threshold from a descending sort), γ = sign(Σ trimmed), mean over the tasks whose trimmed entry is
    nonzero and of sign γ."""
    trimmed = []
    for u in updates:
        keep = max(1, round(density * u.numel()))
        threshold = u.abs().flatten().sort(descending=True).values[keep - 1]
        trimmed.append(torch.where(u.abs() >= threshold, u, torch.zeros_like(u)))
    gamma = torch.sign(sum(trimmed))
    total, count = torch.zeros_like(updates[0]), torch.zeros_like(updates[0])
    for t in trimmed:
        agrees = (torch.sign(t) == gamma) & (t != 0)
        total += torch.where(agrees, t, 0.0)
        count += agrees.double()
    return torch.where(count > 0, total / count.clamp_min(1), 0.0)


def test_cat_reproduces_the_weighted_sum_of_delta_w_with_the_ranks_added(two, tmp_path):
    a, b = two
    report = combine({"a": (a, 0.7), "b": (b, -1.3)}, tmp_path / "c", method="cat")
    expected, got = _weighted_sum([(deltas(a), 0.7), (deltas(b), -1.3)]), deltas(tmp_path / "c")
    assert got.keys() == expected.keys()
    for name in expected:
        assert relative_error(got[name], expected[name]) < TOLERANCES[FP32][0]
    assert {m.rank for m in report.modules} == {8}
    assert all(t.shape[0] == 8 for k, t in read_adapter(tmp_path / "c")[1].items() if "lora_A" in k)


def test_linear_at_the_default_rank_reproduces_the_weighted_sum(two, tmp_path):
    a, b = two
    combine({"a": (a, 0.5), "b": (b, 2.0)}, tmp_path / "c", method="linear")
    expected, got = _weighted_sum([(deltas(a), 0.5), (deltas(b), 2.0)]), deltas(tmp_path / "c")
    for name in expected:
        assert relative_error(got[name], expected[name]) < TOLERANCES[FP32][0]


def test_linear_at_rank_k_is_the_best_rank_k_approximation_of_the_dense_sum(two, tmp_path):
    a, b = two
    report = combine({"a": (a, 1.0), "b": (b, -0.5)}, tmp_path / "c", method="linear", rank=3)
    expected, got = _weighted_sum([(deltas(a), 1.0), (deltas(b), -0.5)]), deltas(tmp_path / "c")
    by_name = {m.name: m for m in report.modules}
    for name, delta in expected.items():
        assert relative_error(got[name], truncated(delta, 3)) < TOLERANCES[FP32][0]
        s = torch.linalg.svdvals(delta)
        assert by_name[name].discarded == pytest.approx(float((s[3:] ** 2).sum() / (s ** 2).sum()), rel=1e-9)
    assert relative_error(got[name], expected[name]) > TOLERANCES["adapter changes output"][0]  # rank 3 < 8 cuts


@pytest.mark.parametrize("rslora", [False, True])
def test_mixed_ranks_alphas_and_rslora_keep_each_module_s_scaling(tmp_path, rslora):
    a = make_adapter(tmp_path / "a", seed=1, rslora=rslora, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.0})
    b = make_adapter(tmp_path / "b", seed=2, rslora=rslora, alpha=5)
    combine({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", method="cat")
    expected, got = _weighted_sum([(deltas(a), 1.0), (deltas(b), 1.0)]), deltas(tmp_path / "c")
    for name in expected:
        assert relative_error(got[name], expected[name]) < TOLERANCES[FP32][0]
    raw = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert raw["r"] == 8 and set(raw["rank_pattern"].values()) == {6} and raw["use_rslora"] is rslora


def test_cat_adapter_loads_and_gives_the_outputs_of_the_base_with_the_summed_delta_w_added(two, tmp_path, token_ids):
    a, b = two
    combine({"a": (a, 1.0), "b": (b, 0.5)}, tmp_path / "c", method="cat")
    adapted = tiny_llama()
    load_adapter(adapted, tmp_path / "c")
    reference = tiny_llama()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, delta in _weighted_sum([(deltas(a), 1.0), (deltas(b), 0.5)]).items():
            modules[name].weight += delta.float()
    assert relative_error(_logits(adapted, token_ids), _logits(reference, token_ids)) < TOLERANCES[FP32][0]
    assert relative_error(_logits(adapted, token_ids), _logits(tiny_llama(), token_ids)) > TOLERANCES[
        "adapter changes output"][0]


def test_negative_weight_subtracts_an_adapter_from_a_sum(two, tmp_path, token_ids):
    a, b = two
    combine({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "ab", method="cat")
    combine({"ab": (tmp_path / "ab", 1.0), "b": (b, -1.0)}, tmp_path / "back", method="linear", rank=4)
    alone, back = tiny_llama(), tiny_llama()
    load_adapter(alone, a)
    load_adapter(back, tmp_path / "back")
    assert relative_error(_logits(back, token_ids), _logits(alone, token_ids)) < TOLERANCES[FP32][0]


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_matches_the_paper_s_steps_at_full_rank(tmp_path, density):
    paths = [make_adapter(tmp_path / str(i), seed=i) for i in range(3)]
    weights = [1.0, 0.6, -0.8]
    adapters = {str(i): (p, w) for i, (p, w) in enumerate(zip(paths, weights, strict=True))}
    combine(adapters, tmp_path / "t", method="ties", density=density, rank=32)
    inputs = [deltas(p) for p in paths]
    got = deltas(tmp_path / "t")
    for name in got:
        expected = _ties_reference([w * d[name] for d, w in zip(inputs, weights, strict=True)], density)
        assert relative_error(got[name], expected) < TOLERANCES[FP32][0]


def test_ties_at_the_default_rank_saves_the_best_approximation_of_its_merge(two, tmp_path):
    a, b = two
    report = combine({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "t", method="ties", density=0.3)
    da, db = deltas(a), deltas(b)
    got = deltas(tmp_path / "t")
    for m in report.modules:
        assert m.rank == 8
        assert relative_error(got[m.name], truncated(_ties_reference([da[m.name], db[m.name]], 0.3), 8)) < TOLERANCES[
            FP32][0]


def test_dare_matches_drop_and_rescale_with_the_documented_draws(two, tmp_path):
    a, b = two
    combine({"a": (a, 1.0), "b": (b, -0.5)}, tmp_path / "d", method="dare", rate=0.4, rank=32, seed=5)
    da, db = deltas(a), deltas(b)
    got = deltas(tmp_path / "d")
    g = torch.Generator().manual_seed(5)
    for name in sorted(got):
        expected = torch.zeros_like(da[name])
        for update in (1.0 * da[name], -0.5 * db[name]):
            kept = torch.rand(update.shape, generator=g, dtype=torch.float64) >= 0.4
            expected += torch.where(kept, update / (1 - 0.4), 0.0)
        assert relative_error(got[name], expected) < TOLERANCES[FP32][0]


def test_dare_of_one_adapter_keeps_each_entry_rescaled_or_drops_it_at_the_rate(tmp_path):
    a = make_adapter(tmp_path / "a", seed=1)
    combine({"a": (a, 1.0)}, tmp_path / "d", method="dare", rate=0.25, rank=32)
    before, after = deltas(a), deltas(tmp_path / "d")
    dropped = kept = 0
    for name, delta in before.items():
        out = after[name]
        zero = out.abs() < 1e-6 * delta.abs().max()
        assert relative_error(out[~zero], delta[~zero] / 0.75) < TOLERANCES[FP32][0]
        dropped, kept = dropped + int(zero.sum()), kept + int((~zero).sum())
    share = dropped / (dropped + kept)  # ~57,000 entries: the standard error of the share is 0.002
    assert abs(share - 0.25) < 0.01


def test_dare_at_rate_zero_is_the_linear_sum(two, tmp_path):
    a, b = two
    combine({"a": (a, 1.0), "b": (b, 0.3)}, tmp_path / "d", method="dare", rate=0.0)
    expected, got = _weighted_sum([(deltas(a), 1.0), (deltas(b), 0.3)]), deltas(tmp_path / "d")
    for name in expected:
        assert relative_error(got[name], expected[name]) < TOLERANCES[FP32][0]


def test_union_adds_zero_where_an_adapter_lacks_a_module_and_intersection_keeps_the_shared(tmp_path, token_ids):
    a = make_adapter(tmp_path / "a", seed=1, targets=["q_proj", "v_proj"])
    b = make_adapter(tmp_path / "b", seed=2, targets=["v_proj", "o_proj"])
    combine({"a": (a, 1.0), "b": (b, 2.0)}, tmp_path / "u", method="cat", targets="union")
    combine({"a": (a, 1.0), "b": (b, 2.0)}, tmp_path / "i", method="cat", targets="intersection")
    expected = _weighted_sum([(deltas(a), 1.0), (deltas(b), 2.0)])
    union, common = deltas(tmp_path / "u"), deltas(tmp_path / "i")
    assert union.keys() == expected.keys() and {n.rsplit(".", 1)[-1] for n in common} == {"v_proj"}
    for name, got in (union | common).items():
        assert relative_error(got, expected[name]) < TOLERANCES[FP32][0]
    model = tiny_llama()
    load_adapter(model, tmp_path / "u")  # the recomputed fingerprint and target list fit the base
    reference = tiny_llama()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, delta in expected.items():
            modules[name].weight += delta.float()
    assert relative_error(_logits(model, token_ids), _logits(reference, token_ids)) < TOLERANCES[FP32][0]


def test_combined_classifier_keeps_the_shared_head_and_task_file(tmp_path):
    kw = {"targets": ["query", "value"], "modules_to_save": ["classifier"]}
    a = make_adapter(tmp_path / "a", seed=1, model=tiny_bert(), base="tiny-bert", **kw)
    b = make_adapter(tmp_path / "b", seed=2, model=tiny_bert(), base="tiny-bert", **kw)
    for p in (a, b):
        (p / TASK_NAME).write_text('{"task": "classification", "labels": ["x", "y", "z"]}\n')
    combine({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", method="linear", rank=2)
    _, before, meta_before = read_adapter(a)
    _, after, meta_after = read_adapter(tmp_path / "c")
    heads = [k for k in before if "classifier" in k]
    assert heads and all(torch.equal(before[k], after[k]) for k in heads)
    assert (tmp_path / "c" / TASK_NAME).read_bytes() == (a / TASK_NAME).read_bytes()
    assert meta_after["lorakit_fingerprint"] == meta_before["lorakit_fingerprint"]
    assert json.loads(meta_after["lorakit_combination"]) == {"method": "linear", "weights": {"a": 1.0, "b": 1.0}}
    load_adapter(tiny_bert(), tmp_path / "c")


def test_force_replaces_an_earlier_combined_adapter(two, tmp_path):
    a, b = two
    combine({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", method="cat")
    combine({"a": (a, 1.0), "b": (b, 1.0)}, tmp_path / "c", method="linear", rank=2, force=True)
    assert all(t.shape[0] == 2 for k, t in read_adapter(tmp_path / "c")[1].items() if "lora_A" in k)


def test_linear_adapter_with_mixed_ranks_loads_in_peft_with_lorakit_outputs(tmp_path, token_ids):
    peft = pytest.importorskip("peft")
    a = make_adapter(tmp_path / "a", seed=1, rslora=True, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.0})
    b = make_adapter(tmp_path / "b", seed=2, targets=["q_proj", "o_proj"])
    combine({"a": (a, 1.0), "b": (b, -0.7)}, tmp_path / "c", method="linear", rank=5, targets="union")
    ours = tiny_llama()
    load_adapter(ours, tmp_path / "c")
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "c")
    assert relative_error(_logits(ours, token_ids), _logits(reference, token_ids)) < TOLERANCES[torch.float32][0]
    assert relative_error(_logits(ours, token_ids), _logits(tiny_llama(), token_ids)) > TOLERANCES[
        "adapter changes output"][0]
