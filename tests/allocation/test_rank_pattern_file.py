"""The rank-pattern file: what `lorakit allocate` writes, and training reading it as `lora.rank_pattern: PATH`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TOLERANCES, approx, relative_error, tiny_bert, write_config
from safetensors.torch import load_file

from lorakit import LoraConfig, adapter_parameters, inject, save_adapter
from lorakit.allocation.allocate import Allocation, kept_alphas
from lorakit.allocation.pattern_file import module_kind, rank_pattern_text, summary_rows, write_rank_pattern
from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.outputs import OutputExistsError
from lorakit.train.config import load_train_config

LAYER = "bert.encoder.layer"
QUERY0, VALUE0, QUERY1, VALUE1 = (f"{LAYER}.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value"))
MODULES = [QUERY0, VALUE0, QUERY1, VALUE1]


def _allocation(ranks: dict[str, int], scaling: str = "per-rank", rslora: bool = False) -> Allocation:
    """Ranks allocated for the test config (write_config: lora.rank 4, lora.alpha 8)."""
    return Allocation(ranks, dict.fromkeys(ranks, 64), budget=64 * 4 * len(ranks), probe="activations",
                      probe_batches=8, probe_seconds=0.5, like_rank=4, scaling=scaling, lora_rank=4, lora_alpha=8.0,
                      rslora=rslora)


def _exact(name: str) -> str:
    return name.replace(".", r"\.")


def test_module_kind_replaces_layer_indices_only():
    assert module_kind(f"{LAYER}.11.attention.self.query") == f"{LAYER}.*.attention.self.query"
    assert module_kind("model.layers.0.mlp.down_proj") == "model.layers.*.mlp.down_proj"
    assert module_kind("0.fc1") == "*.fc1"
    assert module_kind("h2o.dense") == "h2o.dense"


def test_summary_has_one_row_per_module_kind_with_the_mean_and_the_ranks_by_layer():
    rows = summary_rows({QUERY0: 2, VALUE0: 5, QUERY1: 4, VALUE1: 6, "bert.pooler.dense": 1})
    assert rows == [(f"{LAYER}.*.attention.self.query", "mean  3.00   by layer: 2 4"),
                    (f"{LAYER}.*.attention.self.value", "mean  5.50   by layer: 5 6"),
                    ("bert.pooler.dense", "rank 1")]


def test_file_holds_a_commented_header_and_the_ranks_in_order():
    ranks = {QUERY0: 2, VALUE0: 5, "0": 3}  # "0" would read back as an int if written unquoted
    text = rank_pattern_text(_allocation(ranks), command="lorakit allocate c.yaml --like-rank 4 --out p.yaml")
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header[-1] == "# command: lorakit allocate c.yaml --like-rank 4 --out p.yaml"
    assert any("budget: 768 adapter parameters (uniform rank 4 on these 3 modules); used: 640" in h for h in header)
    assert list(yaml.safe_load(text).items()) == list(ranks.items())


def test_write_refuses_an_existing_file_unless_forced(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("mine\n")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        write_rank_pattern(path, _allocation({QUERY0: 1}))
    assert path.read_text() == "mine\n"
    write_rank_pattern(path, _allocation({QUERY0: 1}), force=True)
    assert yaml.safe_load(path.read_text()) == {QUERY0: 1}


def test_a_pattern_path_in_a_config_is_read_from_beside_the_config(tmp_path, tiny_classifier_dir, sentiment_tsv,
                                                                    monkeypatch):
    ranks = {QUERY0: 2, VALUE1: 7}
    write_rank_pattern(tmp_path / "p.yaml", _allocation(ranks))
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          lora={"rank_pattern": "p.yaml"})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_train_config(config)
    assert loaded.lora.rank_pattern == ranks
    assert loaded.lora.rank_for(QUERY0) == 2 and loaded.lora.rank_for(QUERY1) == 4  # lora.rank for the rest


def test_a_pattern_path_given_as_a_flag_is_read_from_the_working_directory(tmp_path, tiny_classifier_dir,
                                                                           sentiment_tsv, monkeypatch):
    write_rank_pattern(tmp_path / "sub" / "p.yaml", _allocation({VALUE0: 3}))
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert load_train_config(config, ["--lora.rank_pattern=sub/p.yaml"]).lora.rank_pattern == {VALUE0: 3}


def test_training_with_a_pattern_file_gives_its_ranks_and_lora_rank_to_the_modules_it_omits(
        tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    pattern = {QUERY0: 1, VALUE0: 2, QUERY1: 7}  # VALUE1 unlisted: lora.rank (4)
    write_rank_pattern(tmp_path / "p.yaml", _allocation(pattern))
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          optim={"max_steps": 1})
    assert main(["train", str(config), f"--lora.rank_pattern={tmp_path / 'p.yaml'}", "--quiet"]) == 0
    adapter = tmp_path / "run" / "adapter"
    peft = json.loads((adapter / "adapter_config.json").read_text())
    assert peft["r"] == 4
    assert peft["rank_pattern"] == {name.replace(".", r"\."): rank for name, rank in pattern.items()}
    tensors = load_file(adapter / "adapter_model.safetensors")
    ranks = {name: tensors[f"base_model.model.{name}.lora_A.weight"].shape[0] for name in (*pattern, VALUE1)}
    assert ranks == {**pattern, VALUE1: 4}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lora"]["rank_pattern"] == pattern


def test_an_edited_pattern_file_is_what_training_reads(tmp_path: Path, tiny_classifier_dir, sentiment_tsv):
    path = tmp_path / "p.yaml"
    write_rank_pattern(path, _allocation({QUERY0: 2, VALUE0: 5}))
    path.write_text(path.read_text().replace(f"{VALUE0}: 5", f"{VALUE0}: 3") + "value: 6\n")
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          lora={"rank_pattern": str(path)})
    lora = load_train_config(config).lora
    assert [lora.rank_for(n) for n in (QUERY0, VALUE0, VALUE1, QUERY1)] == [2, 3, 6, 4]


# ------------------------------------------------------------------------ scaling: keep (alpha per module) or per-rank


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_kept_alphas_give_every_module_the_scaling_of_the_uniform_rank(rslora):
    ranks = {QUERY0: 1, VALUE0: 3, QUERY1: 8, VALUE1: 29}
    alphas = kept_alphas(ranks, rank=8, alpha=16.0, rslora=rslora)
    uniform = LoraConfig(rank=8, alpha=16.0, rslora=rslora)
    allocated = LoraConfig(rank=8, alpha=16.0, rslora=rslora, rank_pattern=ranks, alpha_pattern=alphas)
    assert [allocated.rank_for(m) for m in MODULES] == [1, 3, 8, 29]
    assert [allocated.scaling_for(m) for m in MODULES] == [approx(uniform.scaling_for(m)) for m in MODULES]
    assert alphas[QUERY1] == 16.0
    shared = LoraConfig(rank=8, alpha=16.0, rslora=rslora, rank_pattern=ranks)  # per-rank: the scaling moves
    assert shared.scaling_for(VALUE1) < uniform.scaling_for(VALUE1) < shared.scaling_for(QUERY0)


def test_keep_writes_one_rank_and_alpha_mapping_per_module_under_a_header_naming_the_rule():
    text = rank_pattern_text(_allocation({QUERY0: 2, VALUE0: 6}, scaling="keep"))
    body = [line for line in text.splitlines() if not line.startswith("#")]
    assert body == [f"{QUERY0}: {{rank: 2, alpha: 4.0}}", f"{VALUE0}: {{rank: 6, alpha: 12.0}}"]
    header = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "scaling: keep: each entry is {rank: r_m, alpha: alpha_m} with alpha_m = lora.alpha * r_m / lora.rank = " \
           "8 * r_m / 4, so every module keeps the scaling of uniform rank 4, 8 / 4 = 2" in header


def test_keep_with_rslora_writes_alphas_that_keep_alpha_over_sqrt_rank():
    text = rank_pattern_text(_allocation({QUERY0: 1, VALUE0: 16}, scaling="keep", rslora=True))
    assert yaml.safe_load(text) == {QUERY0: {"rank": 1, "alpha": approx(4.0)}, VALUE0: {"rank": 16, "alpha": 16.0}}
    assert "alpha_m = lora.alpha * sqrt(r_m / lora.rank) = 8 * sqrt(r_m / 4)" in text.replace("\n#  ", "")


def test_per_rank_writes_plain_ranks_one_per_line_under_a_header_naming_the_rule():
    text = rank_pattern_text(_allocation({QUERY0: 2, VALUE0: 6}))
    assert [line for line in text.splitlines() if not line.startswith("#")] == [f"{QUERY0}: 2", f"{VALUE0}: 6"]
    assert "# scaling: per-rank: lora.alpha (8) is shared, so a module of rank r_m is scaled by alpha / r_m" in text


def test_the_writer_scaling_argument_replaces_the_allocations_rule(tmp_path):
    allocation = _allocation({QUERY0: 2, VALUE0: 6})
    write_rank_pattern(tmp_path / "keep.yaml", allocation, scaling="keep")
    write_rank_pattern(tmp_path / "per-rank.yaml", allocation)
    assert yaml.safe_load((tmp_path / "keep.yaml").read_text())[VALUE0] == {"rank": 6, "alpha": 12.0}
    assert yaml.safe_load((tmp_path / "per-rank.yaml").read_text())[VALUE0] == 6
    with pytest.raises(LorakitError, match=r"scaling must be one of keep, per-rank, got 'kept' \(did you mean"):
        write_rank_pattern(tmp_path / "x.yaml", allocation, scaling="kept")
    assert not (tmp_path / "x.yaml").exists()


def test_a_kept_scaling_file_loads_as_ranks_and_alphas_that_keep_the_configs_scaling(tmp_path, tiny_classifier_dir,
                                                                                     sentiment_tsv):
    ranks = {QUERY0: 1, VALUE0: 2, QUERY1: 7}  # VALUE1 unlisted: lora.rank 4 and lora.alpha 8
    write_rank_pattern(tmp_path / "p.yaml", _allocation(ranks, scaling="keep"))
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          lora={"rank_pattern": "p.yaml"})
    lora = load_train_config(config).lora
    assert lora.rank_pattern == ranks
    assert lora.alpha_pattern == {QUERY0: 2.0, VALUE0: 4.0, QUERY1: 14.0}
    assert [lora.scaling_for(m) for m in MODULES] == [2.0] * 4


def test_the_configs_own_alpha_pattern_comes_before_the_files_alphas(tmp_path, tiny_classifier_dir, sentiment_tsv):
    write_rank_pattern(tmp_path / "p.yaml", _allocation({QUERY0: 1, VALUE0: 2, QUERY1: 7}, scaling="keep"))
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          lora={"rank_pattern": "p.yaml", "alpha_pattern": {"value": 3.0, QUERY1: 5.0}})
    lora = load_train_config(config).lora
    assert list(lora.alpha_pattern) == [QUERY1, "value", QUERY0, VALUE0]  # the config's (as written), then the file's
    assert [lora.alpha_for(m) for m in MODULES] == [2.0, 3.0, 5.0, 3.0]


def test_an_edited_file_may_mix_plain_ranks_and_rank_alpha_entries(tmp_path, tiny_classifier_dir, sentiment_tsv):
    path = tmp_path / "p.yaml"
    path.write_text(f"{QUERY0}: 3\n{VALUE0}: {{rank: 5}}\n{QUERY1}: {{alpha: 1, rank: 2}}\n")
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run")
    lora = load_train_config(config, [f"--lora.rank_pattern={path}"]).lora
    assert lora.rank_pattern == {QUERY0: 3, VALUE0: 5, QUERY1: 2} and lora.alpha_pattern == {QUERY1: 1.0}
    assert [lora.scaling_for(m) for m in MODULES] == [8 / 3, 8 / 5, 1 / 2, 8 / 4]


def _peft_scalings(peft_model: torch.nn.Module, names: list[str]) -> list[float]:
    return [peft_model.get_submodule(f"base_model.model.{name}").scaling["default"] for name in names]


def test_training_with_a_kept_scaling_file_saves_peft_alpha_pattern_that_peft_loads_with_the_same_scalings(
        tmp_path, tiny_classifier_dir, sentiment_tsv):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    ranks = {QUERY0: 1, VALUE0: 2, QUERY1: 7}  # VALUE1 unlisted: rank 4, alpha 8
    write_rank_pattern(tmp_path / "p.yaml", _allocation(ranks, scaling="keep"))
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          optim={"max_steps": 1})
    assert main(["train", str(config), f"--lora.rank_pattern={tmp_path / 'p.yaml'}", "--quiet"]) == 0
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"]) == (4, 8.0)
    assert saved["alpha_pattern"] == {_exact(QUERY0): 2.0, _exact(VALUE0): 4.0, _exact(QUERY1): 14.0}
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["lora"]
    assert recorded["alpha_pattern"] == {QUERY0: 2.0, VALUE0: 4.0, QUERY1: 14.0}
    base = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir, num_labels=2)
    loaded = peft.PeftModel.from_pretrained(base, adapter)
    assert _peft_scalings(loaded, MODULES) == [2.0] * 4


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_an_adapter_injected_from_a_kept_scaling_file_gives_peft_the_same_outputs(
        rslora, tmp_path, tiny_classifier_dir, sentiment_tsv, token_ids):
    peft = pytest.importorskip("peft")
    ranks = {QUERY0: 1, VALUE0: 2, QUERY1: 7}
    write_rank_pattern(tmp_path / "p.yaml", _allocation(ranks, scaling="keep", rslora=rslora))
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          lora={"rank_pattern": "p.yaml", "rslora": rslora, "dropout": 0.0})
    lora = load_train_config(config).lora
    uniform = LoraConfig(rank=4, alpha=8.0, rslora=rslora).scaling_for(QUERY0)
    model = tiny_bert()
    inject(model, LoraConfig.from_dict({**lora.to_dict(), "modules_to_save": ["classifier"]}))  # PEFT's SEQ_CLS head
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, param in sorted(adapter_parameters(model).items()):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    save_adapter(model, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    assert _peft_scalings(loaded, MODULES) == [approx(uniform)] * 4
    with torch.no_grad():
        ours, theirs, base = (m(input_ids=token_ids).logits for m in (model, loaded, tiny_bert()))
    assert relative_error(ours - base, base) >= TOLERANCES["adapter changes output"][0]
    assert relative_error(theirs, ours) <= TOLERANCES[torch.float32][0]
