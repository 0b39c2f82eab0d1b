"""Rank pruning against the dense SVD of ΔW (Eckart-Young), PEFT loading the pruned files, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES, assert_close, relative_error, tiny_bert, tiny_llama
from torch import nn

from lorakit import LoraConfig, inject, load_adapter, save_adapter
from lorakit.cli import main
from lorakit.compress import prune_adapter
from lorakit.io import PRINCIPAL_NAME, TASK_NAME, WEIGHTS_NAME, read_adapter
from lorakit.peft_format import config_from_peft, from_peft_key

FP32 = "fp32 reordered"  # fp32 factors against a float64 formula, through QR and SVD


def _adapter(path: Path, model: nn.Module | None = None, steep: str = "", **config) -> Path:
    """A rank-4 adapter on tiny_llama (or `model`) with A and B drawn at random, so each ΔW has full rank 4; the
    columns of B in modules named `*steep*` are scaled by 1, 0.1, 0.01, 0.001, so their spectrum falls fast."""
    model = model if model is not None else tiny_llama()
    inject(model, LoraConfig(**{"rank": 4, "alpha": 8, "targets": ["llama"], "seed": 0, **config}))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            if steep and steep in name and "lora_B" in name:
                p.mul_(torch.logspace(0, -3, p.shape[1]))
    save_adapter(model, path, base_model="tiny-llama")
    return path


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    """Each linear module's ΔW = s·B A in float64, dense, with s as the saved config gives it."""
    raw, tensors, _ = read_adapter(path)
    config = config_from_peft(raw)
    found = {from_peft_key(k): t for k, t in tensors.items()}
    return {k.removesuffix(".lora_A.weight"): config.scaling_for(k.removesuffix(".lora_A.weight"))
            * found[k.replace("lora_A", "lora_B")].double() @ t.double()
            for k, t in found.items() if k.endswith(".lora_A.weight")}


def _truncated(delta: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_pruning_to_full_rank_reproduces_every_delta_w(tmp_path):
    source = _adapter(tmp_path / "a")
    prune_adapter(source, tmp_path / "p", rank=4)
    before, after = _deltas(source), _deltas(tmp_path / "p")
    assert before.keys() == after.keys()
    for name in before:
        assert_close(after[name], before[name], FP32)


def test_pruning_to_rank_k_gives_the_best_rank_k_approximation_of_the_dense_delta_w(tmp_path):
    source = _adapter(tmp_path / "a")
    report = prune_adapter(source, tmp_path / "p", rank=2)
    before, after = _deltas(source), _deltas(tmp_path / "p")
    by_name = {m.name: m for m in report.modules}
    for name, delta in before.items():
        assert relative_error(after[name], _truncated(delta, 2)) < TOLERANCES[FP32][0]
        s = torch.linalg.svdvals(delta)
        assert by_name[name].discarded == pytest.approx(float((s[2:] ** 2).sum() / (s ** 2).sum()), rel=1e-9)
        assert by_name[name].rank_after == 2
    tensors = read_adapter(tmp_path / "p")[1]
    assert all(t.shape[0] == 2 for k, t in tensors.items() if "lora_A" in k)


def test_energy_mode_keeps_the_fewest_directions_that_reach_the_share(tmp_path):
    source = _adapter(tmp_path / "a", steep="q_proj")
    report = prune_adapter(source, tmp_path / "p", energy=0.8)
    before = _deltas(source)
    for m in report.modules:
        shares = (torch.linalg.svdvals(before[m.name]) ** 2).cumsum(0)
        shares = shares / shares[-1]
        assert m.rank_after == int((shares < 0.8).sum()) + 1
        assert shares[m.rank_after - 1] >= 0.8 and (m.rank_after == 1 or shares[m.rank_after - 2] < 0.8)
    assert len({m.rank_after for m in report.modules}) > 1  # the share picks different ranks per module


@pytest.mark.parametrize("rslora", [False, True])
def test_pruned_adapter_with_mixed_ranks_loads_in_peft_with_lorakit_outputs(tmp_path, token_ids, rslora):
    peft = pytest.importorskip("peft")
    source = _adapter(tmp_path / "a", rslora=rslora, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3.0})
    prune_adapter(source, tmp_path / "p", rank=3)
    raw = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert raw["r"] == 3 and set(raw["rank_pattern"].values()) == {2} and set(raw["alpha_pattern"].values()) == {3.0}
    ours = tiny_llama()
    load_adapter(ours, tmp_path / "p")
    reference = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "p")
    assert relative_error(_logits(ours, token_ids), _logits(reference, token_ids)) < TOLERANCES[torch.float32][0]
    full = tiny_llama()
    load_adapter(full, source)
    assert relative_error(_logits(ours, token_ids), _logits(full, token_ids)) > TOLERANCES["adapter changes output"][0]


def _principal_updates(path: Path) -> dict[str, torch.Tensor]:
    """s·(B A - B₀A₀) per module of a principal adapter, dense, float64."""
    from safetensors.torch import load_file

    init = load_file(path / PRINCIPAL_NAME)
    raw, tensors, _ = read_adapter(path)
    config = config_from_peft(raw)
    return {name: delta - config.scaling_for(name) * init[f"{name}.B"].double() @ init[f"{name}.A"].double()
            for name, delta in _deltas(path).items()}


def test_principal_convert_prunes_the_update_on_the_original_base(tmp_path):
    source = _adapter(tmp_path / "a", init="principal")
    prune_adapter(source, tmp_path / "p", rank=3, principal="convert")
    after = _deltas(tmp_path / "p")
    for name, update in _principal_updates(source).items():
        assert relative_error(after[name], _truncated(update, 3)) < TOLERANCES[FP32][0]
    assert not (tmp_path / "p" / PRINCIPAL_NAME).exists()
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["init_lora_weights"] is True


def test_principal_converted_at_full_rank_on_the_original_base_gives_the_trained_outputs(tmp_path, token_ids):
    source = _adapter(tmp_path / "a", init="principal")
    prune_adapter(source, tmp_path / "p", rank=8, principal="convert")
    trained, converted = tiny_llama(), tiny_llama()
    load_adapter(trained, source)
    load_adapter(converted, tmp_path / "p")
    assert relative_error(_logits(converted, token_ids), _logits(trained, token_ids)) < TOLERANCES[FP32][0]


def test_pruned_adapter_keeps_the_head_the_task_file_and_the_base_fingerprint(tmp_path):
    source = _adapter(tmp_path / "a", model=tiny_bert(), targets=["query", "value"], modules_to_save=["classifier"])
    (source / TASK_NAME).write_text('{"task": "classification", "labels": ["a", "b", "c"]}\n')
    report = prune_adapter(source, tmp_path / "p", rank=1)
    _, before, meta_before = read_adapter(source)
    _, after, meta_after = read_adapter(tmp_path / "p")
    heads = [k for k in before if "classifier" in k]
    assert heads and all(torch.equal(before[k], after[k]) for k in heads)
    assert (tmp_path / "p" / TASK_NAME).read_bytes() == (source / TASK_NAME).read_bytes()
    assert meta_after["lorakit_fingerprint"] == meta_before["lorakit_fingerprint"]
    assert report.bytes_after < report.bytes_before == (source / WEIGHTS_NAME).stat().st_size
    assert report.bytes_after == (tmp_path / "p" / WEIGHTS_NAME).stat().st_size
    assert report.parameters_before - report.parameters_after == sum(
        3 * (t.shape[0] if "lora_B" in k else t.shape[1]) for k, t in before.items() if "lora_" in k)


def test_cli_prune_prints_one_json_report_and_writes_the_adapter(tmp_path, capsys):
    source = _adapter(tmp_path / "a")
    assert main(["prune", str(source), "--energy", "0.9", "--out", str(tmp_path / "p"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes_after"] < report["bytes_before"] and 0 < report["discarded"] < 0.1
    ranks = {m["name"]: m["rank_after"] for m in report["modules"]}
    saved = {from_peft_key(k).removesuffix(".lora_A.weight"): t.shape[0]
             for k, t in read_adapter(tmp_path / "p")[1].items() if "lora_A" in k}
    assert ranks == saved


def test_cli_prune_table_names_each_module_kind_and_the_totals(tmp_path, capsys):
    source = _adapter(tmp_path / "a")
    assert main(["prune", str(source), "--rank", "1", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "self_attn.q_proj  4 -> 1" in out and "mlp.down_proj" in out and "bytes" in out


def test_force_replaces_an_earlier_pruned_adapter(tmp_path):
    source = _adapter(tmp_path / "a")
    prune_adapter(source, tmp_path / "p", rank=1)
    prune_adapter(source, tmp_path / "p", rank=2, force=True)
    assert all(t.shape[0] == 2 for k, t in read_adapter(tmp_path / "p")[1].items() if "lora_A" in k)
