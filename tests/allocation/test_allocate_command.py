"""`allocate_from_config` and `lorakit allocate` end to end on a tiny BERT classifier."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import assert_close, write_config

from lorakit import gemm
from lorakit.allocation.allocate import allocate_from_config, probe_batch_list
from lorakit.allocation.budget import uniform_budget
from lorakit.allocation.probes import activation_spectra
from lorakit.cli import main
from lorakit.train.config import load_train_config
from lorakit.train.run import prepare

LAYERS = range(2)
TARGETS = [f"bert.encoder.layer.{i}.{m}" for i in LAYERS
           for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                     "intermediate.dense", "output.dense")]


@pytest.fixture
def config_path(tmp_path, tiny_classifier_dir, sentiment_tsv):
    return write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                        lora={"targets": ["bert"]}, optim={"batch_size": 4})


@pytest.mark.parametrize("probe", ["activations", "gradients"])
def test_allocation_covers_every_target_within_the_uniform_budget(config_path, probe):
    allocation = allocate_from_config(load_train_config(config_path), like_rank=3, probe=probe, probe_batches=3)
    assert list(allocation.ranks) == TARGETS
    assert allocation.costs[TARGETS[0]] == 32 + 32 and allocation.costs[TARGETS[4]] == 32 + 64
    assert allocation.budget == uniform_budget(allocation.costs, 3)
    assert allocation.used <= allocation.budget
    assert all(1 <= r <= 32 for r in allocation.ranks.values())
    assert allocation.probe_batches == 3
    assert allocation.ranks != dict.fromkeys(TARGETS, 3)  # the probe moved rank between modules


def test_the_probe_reads_the_first_training_batches_of_the_base_model(config_path):
    config = load_train_config(config_path)
    allocation = allocate_from_config(config, budget=10_000, probe="activations", probe_batches=2)
    prepared = prepare(config)  # the training run's model: same seed, same head, adapter injected (B = 0)
    batches = probe_batch_list(prepared.task, prepared.train, config, 2, torch.device("cpu"))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4]
    spectra = activation_spectra(prepared.model, prepared.task.loss, batches, TARGETS)
    for name in TARGETS:
        assert_close(allocation.spectra[name], spectra[name], "fp32 reordered")


def test_allocate_command_writes_a_pattern_that_training_reads_with_the_uniform_scaling_kept(config_path,
                                                                                               tmp_path, capsys):
    out = tmp_path / "alloc" / "rank_pattern.yaml"
    assert main(["allocate", str(config_path), "--like-rank", "2", "--probe-batches", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "bert.encoder.layer.*.attention.self.query" in printed and "uniform-equivalent rank" in printed
    entries = yaml.safe_load(out.read_text())
    assert list(entries) == TARGETS
    assert f"# command: lorakit allocate {config_path} --like-rank 2 --probe gradients --probe-batches 2 " \
           f"--scaling keep --out {out}" in out.read_text()
    lora = load_train_config(config_path, [f"--lora.rank_pattern={out}"]).lora  # rank 4, alpha 8: scaling 2
    assert lora.rank_pattern == {name: entry["rank"] for name, entry in entries.items()}
    assert lora.alpha_pattern == {name: 2.0 * entry["rank"] for name, entry in entries.items()}
    assert len(set(lora.rank_pattern.values())) > 1
    assert [lora.scaling_for(name) for name in TARGETS] == [2.0] * len(TARGETS)


def test_allocate_command_with_per_rank_scaling_writes_plain_ranks_under_the_shared_alpha(config_path, tmp_path):
    out = tmp_path / "p.yaml"
    assert main(["allocate", str(config_path), "--like-rank", "2", "--probe-batches", "2", "--scaling", "per-rank",
                 "--out", str(out)]) == 0
    ranks = yaml.safe_load(out.read_text())
    assert list(ranks) == TARGETS and all(type(r) is int for r in ranks.values())
    assert all(line.startswith("#") or ": {" not in line for line in out.read_text().splitlines())
    lora = load_train_config(config_path, [f"--lora.rank_pattern={out}"]).lora
    assert lora.rank_pattern == ranks and lora.alpha_pattern == {}
    assert [lora.scaling_for(name) for name in TARGETS] == [8 / ranks[name] for name in TARGETS]


def test_allocate_takes_config_overrides_and_replaces_its_file_with_force(config_path, tmp_path):
    out = tmp_path / "p.yaml"
    argv = ["allocate", str(config_path), "--lora.targets=[query]", "--budget", "400", "--probe-batches", "1",
            "--max-rank", "5", "--out", str(out), "--scaling", "per-rank"]
    assert main(argv) == 0
    first = yaml.safe_load(out.read_text())
    assert list(first) == [f"bert.encoder.layer.{i}.attention.self.query" for i in LAYERS]
    assert sum(r * 64 for r in first.values()) <= 400
    assert main(argv) == 2  # the file exists
    assert main([*argv[:4], "2000", *argv[5:], "--force"]) == 0
    assert yaml.safe_load(out.read_text()) == dict.fromkeys(first, 5)  # 2,000 buys more than --max-rank allows


@pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN")
def test_the_probe_runs_on_run_cpu_matmul(tmp_path, tiny_classifier_dir, sentiment_tsv, monkeypatch):
    import lorakit.allocation.allocate as allocate_module

    seen = []

    def recording(model, loss, batches, names):
        seen.append(gemm.active_cpu_matmul())
        return activation_spectra(model, loss, batches, names)

    monkeypatch.setitem(allocate_module._PROBE_FUNCTIONS, "activations", recording)
    path = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                        lora={"targets": ["bert"]}, optim={"batch_size": 4}, run={"cpu_matmul": "blas"})
    allocate_from_config(load_train_config(path), like_rank=3, probe="activations", probe_batches=1)
    assert seen == ["blas"] and gemm.active_cpu_matmul() == "onednn"
