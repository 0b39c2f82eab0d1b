"""The rank-pattern file: what `lorakit allocate` writes, and training reading it as `lora.rank_pattern: PATH`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import write_config
from safetensors.torch import load_file

from lorakit.allocation.allocate import Allocation
from lorakit.allocation.pattern_file import module_kind, rank_pattern_text, summary_rows, write_rank_pattern
from lorakit.cli import main
from lorakit.outputs import OutputExistsError
from lorakit.train.config import load_train_config

LAYER = "bert.encoder.layer"
QUERY0, VALUE0, QUERY1, VALUE1 = (f"{LAYER}.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value"))


def _allocation(ranks: dict[str, int]) -> Allocation:
    return Allocation(ranks, dict.fromkeys(ranks, 64), budget=64 * 4 * len(ranks), probe="activations",
                      probe_batches=8, probe_seconds=0.5, like_rank=4)


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
