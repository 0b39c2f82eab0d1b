"""Data-parallel training under torchrun: 2 processes, gloo on loopback, a tiny local model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_close, write_config
from safetensors.torch import load_file

from lorakit.train.checkpoint import list_checkpoints

pytestmark = pytest.mark.distributed
WEIGHTS = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def no_dropout_model_dir(tmp_path_factory, minilm_tokenizer):
    """A tiny BERT without dropout, so 1-process and 2-process runs differ only in how batches are split."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert-nodrop")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(path)
    minilm_tokenizer.save_pretrained(path)
    return path


def _torchrun(nproc: int, config: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "lorakit", "train", str(config), "--quiet", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _single(config: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorakit", "train", str(config), "--quiet", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out


def _config(tmp_path: Path, name: str, model_dir: Path, data: tuple[Path, Path], batch_size: int, steps: int,
            **run: object) -> Path:
    return write_config(tmp_path / f"{name}.yaml", model_dir, *data, tmp_path / name,
                        optim={"batch_size": batch_size, "max_steps": steps, "schedule": "constant",
                               "warmup_steps": 0},
                        lora={"dropout": 0.0}, run={"group_by_length": False, **run})


def _assert_same_adapter(a: Path, b: Path, weights: str = WEIGHTS, exact: bool = False) -> None:
    expected, actual = load_file(a / weights), load_file(b / weights)
    assert expected.keys() == actual.keys()
    for key in expected:
        if exact:
            assert torch.equal(actual[key], expected[key]), key
        else:
            assert_close(actual[key], expected[key], "fp32 reordered")  # the batch reduced in another order


def test_two_processes_with_batch_b_match_one_process_with_batch_2b(tmp_path, no_dropout_model_dir,
                                                                    sentiment_tsv):
    two = _config(tmp_path, "two", no_dropout_model_dir, sentiment_tsv, batch_size=4, steps=5)
    one = _config(tmp_path, "one", no_dropout_model_dir, sentiment_tsv, batch_size=8, steps=5)
    procs = [_torchrun(2, two), _single(one)]
    for proc in procs:
        _finish(proc)
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")
    assert (tmp_path / "two" / "metrics.jsonl").read_text().count('"step": 1,') == 1  # rank 0 logs alone


def test_distributed_run_resumes_from_its_checkpoint(tmp_path, no_dropout_model_dir, sentiment_tsv):
    straight = _config(tmp_path, "straight", no_dropout_model_dir, sentiment_tsv, batch_size=4, steps=4)
    first = _config(tmp_path, "resumed", no_dropout_model_dir, sentiment_tsv, batch_size=4, steps=2)
    _finish(_torchrun(2, straight))
    _finish(_torchrun(2, first))
    assert [s for s, _ in list_checkpoints(tmp_path / "resumed")] == [2]
    # Constant learning rate: a 2-step run continued to step 4 is the same computation as 4 steps straight.
    _finish(_torchrun(2, first, "--resume", "--optim.max_steps=4"))
    # Compare step 4 itself: the published adapter is the best evaluated one, which may be step 2's.
    # Same processes, same reduction order: a resumed run is bit-exact, not merely close.
    _assert_same_adapter(tmp_path / "straight", tmp_path / "resumed",
                         "checkpoints/step-00000004/adapter/adapter_model.safetensors", exact=True)


def test_killing_one_rank_ends_the_job_with_a_clear_error(tmp_path, no_dropout_model_dir, sentiment_tsv):
    import psutil

    config = _config(tmp_path, "killed", no_dropout_model_dir, sentiment_tsv, batch_size=2, steps=400,
                     save_every=1)
    proc = _torchrun(2, config)
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(tmp_path / "killed"):
        time.sleep(0.1)
    assert list_checkpoints(tmp_path / "killed"), "the run never wrote a checkpoint"
    ranks = psutil.Process(proc.pid).children()
    assert len(ranks) == 2
    os.kill(ranks[1].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "SIGKILL" in err or "Signal 9" in err or "exitcode: -9" in err, err[-2000:]
    assert list_checkpoints(tmp_path / "killed")  # the last good checkpoint survives
