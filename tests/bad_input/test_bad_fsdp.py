"""Bad input for sharded training (run.parallel=fsdp): launched without torchrun, a model without repeated blocks,
a resume with another number of processes, offload on the CPU or without fsdp, a run other than plain LoRA. Each
gives exit 2 and one `error:` line. The torchrun cases run in this process as a torchrun world of one
(WORLD_SIZE=1, no process group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import expect_cli_error, write_config

from lorakit.cli import main
from lorakit.train.checkpoint import STATE_JSON


@pytest.fixture
def torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `torchrun --nproc-per-node 1` sets: a world of one."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")


@pytest.fixture(scope="module")
def blockless_dir(tmp_path_factory: pytest.TempPathFactory, minilm_tokenizer) -> Path:
    """A BERT with no layers: its encoder's block list is empty, so there is nothing to shard block by block."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("blockless-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=0,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path


def _fsdp_config(tmp_path: Path, model_dir: Path, data: tuple[Path, Path], **run: object) -> Path:
    return write_config(tmp_path / "c.yaml", model_dir, *data, tmp_path / "run", optim={"max_steps": 2},
                        run={"parallel": "fsdp", **run})


def test_fsdp_without_torchrun_is_refused(tmp_path, tiny_classifier_dir, sentiment_tsv, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = _fsdp_config(tmp_path, tiny_classifier_dir, sentiment_tsv)
    expect_cli_error(["train", config], capsys, matches=r"run\.parallel=fsdp .*torchrun --nproc-per-node N")
    assert not (tmp_path / "run").exists()


def test_fsdp_on_a_model_without_blocks_is_refused_by_class(tmp_path, blockless_dir, sentiment_tsv, torchrun_env,
                                                            capsys):
    config = write_config(tmp_path / "c.yaml", blockless_dir, *sentiment_tsv, tmp_path / "run",
                          optim={"max_steps": 2}, lora={"targets": ["pooler.dense"]}, run={"parallel": "fsdp"})
    expect_cli_error(["train", config], capsys, matches=r"BertForSequenceClassification has no list of repeated "
                                                        r"blocks.*run\.parallel=ddp")


def test_fsdp_resume_with_another_process_count_is_refused(tmp_path, tiny_classifier_dir, sentiment_tsv,
                                                           torchrun_env, capsys):
    config = _fsdp_config(tmp_path, tiny_classifier_dir, sentiment_tsv)
    assert main(["train", str(config), "--quiet"]) == 0
    state_file = next((tmp_path / "run" / "checkpoints").glob(f"step-*/{STATE_JSON}"))
    doc = json.loads(state_file.read_text())
    doc["state"]["world_size"] = 2  # as if written by torchrun --nproc-per-node 2 (one RNG state per process)
    doc["state"]["rng"] = doc["state"]["rng"] * 2
    state_file.write_text(json.dumps(doc))
    expect_cli_error(["train", config, "--resume", "--optim.max_steps=4"], capsys,
                     matches=r"written by 2 processes and this run has 1; resume with the same --nproc-per-node",
                     watch=[tmp_path / "run" / "checkpoints"])


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_fsdp_offload_without_fsdp_or_on_cpu_is_refused(parallel, tmp_path, tiny_classifier_dir, sentiment_tsv,
                                                        torchrun_env, capsys):
    config = _fsdp_config(tmp_path, tiny_classifier_dir, sentiment_tsv, parallel=parallel, fsdp_offload=True,
                          device="cpu")
    matches = r"run\.fsdp_offload .*run\.parallel=fsdp" if parallel == "ddp" else r"run\.fsdp_offload .* CPU"
    expect_cli_error(["train", config], capsys, matches=matches)


@pytest.mark.parametrize(("flags", "matches"), [
    (["--run.method=full"], r"run\.method='full'; set run\.parallel=ddp"),
    (["--compress.rank=4"], r"run\.method='lora' with compress; set run\.parallel=ddp"),
], ids=["full", "compress"])
def test_fsdp_with_a_run_that_is_not_plain_lora_is_refused(flags, matches, tmp_path, tiny_classifier_dir,
                                                           sentiment_tsv, torchrun_env, capsys):
    config = _fsdp_config(tmp_path, tiny_classifier_dir, sentiment_tsv)
    expect_cli_error(["train", config, *flags], capsys, matches=matches)
