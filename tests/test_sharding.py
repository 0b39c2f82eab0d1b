"""Sharded training (run.parallel=fsdp): block discovery, and 2-process FSDP2 runs under torchrun (gloo on loopback)
against one process and against DDP."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from test_distributed import _config, _finish, _single, _torchrun, no_dropout_model_dir  # noqa: F401 (fixture)
from torch import nn

from lorakit.errors import LorakitError
from lorakit.sharding import block_classes
from lorakit.train.checkpoint import list_checkpoints

WEIGHTS = "adapter/adapter_model.safetensors"


@pytest.mark.parametrize(("build", "block"), [(tiny_bert, "BertLayer"), (tiny_llama, "LlamaDecoderLayer"),
                                              (tiny_gpt2, "GPT2Block")])
def test_block_class_is_the_class_of_the_repeated_layers(build, block):
    assert [c.__name__ for c in block_classes(build())] == [block]


def test_model_without_repeated_blocks_is_refused_by_class_name():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(LorakitError, match=r"Flat has no list of repeated blocks"):
        block_classes(Flat())


def _max_difference(a: Path, b: Path, weights: str = WEIGHTS) -> float:
    expected, actual = load_file(a / weights), load_file(b / weights)
    assert expected.keys() == actual.keys()
    return max(float((actual[k] - expected[k]).abs().max()) for k in expected)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, no_dropout_model_dir):  # noqa: F811 (the fixture imported above)
    """The same 5 steps as fsdp on 2 processes (with and without activation checkpointing), ddp on 2 processes
    (batch 4 each) and one process (batch 8)."""
    from conftest import NEGATIVE, POSITIVE

    tmp = tmp_path_factory.mktemp("fsdp-runs")
    rows = [(s, 1) for s in POSITIVE] * 4 + [(s, 0) for s in NEGATIVE] * 4
    data = (tmp / "train.tsv", tmp / "dev.tsv")
    data[0].write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    data[1].write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows[::4]))
    configs = {
        "fsdp": _config(tmp, "fsdp", no_dropout_model_dir, data, batch_size=4, steps=5, parallel="fsdp"),
        "fsdp_ac": _config(tmp, "fsdp_ac", no_dropout_model_dir, data, batch_size=4, steps=5, parallel="fsdp",
                           activation_checkpointing=True),
        "ddp": _config(tmp, "ddp", no_dropout_model_dir, data, batch_size=4, steps=5),
        "one": _config(tmp, "one", no_dropout_model_dir, data, batch_size=8, steps=5),
    }
    procs = [_torchrun(2, configs[k]) for k in ("fsdp", "fsdp_ac", "ddp")] + [_single(configs["one"])]
    for proc in procs:
        _finish(proc)
    return {k: tmp / k for k in configs} | {"model": no_dropout_model_dir}


@pytest.mark.distributed
def test_two_fsdp_processes_with_batch_b_match_one_process_with_batch_2b(runs):
    assert _max_difference(runs["one"], runs["fsdp"]) <= 1e-5


@pytest.mark.distributed
def test_fsdp_matches_ddp_on_the_same_processes(runs):
    assert _max_difference(runs["ddp"], runs["fsdp"]) <= 1e-5


@pytest.mark.distributed
def test_activation_checkpointing_under_fsdp_trains_the_same_adapter(runs):
    assert _max_difference(runs["fsdp"], runs["fsdp_ac"]) <= 1e-6


@pytest.mark.distributed
def test_fsdp_adapter_loads_in_peft_with_lorakits_outputs(runs):
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    from lorakit.inference import load_for_inference

    loaded = load_for_inference(str(runs["model"]), runs["fsdp"] / "adapter")
    base = BertForSequenceClassification.from_pretrained(runs["model"], num_labels=2)
    reference = peft.PeftModel.from_pretrained(base, runs["fsdp"] / "adapter").eval()
    batch = loaded.tokenizer(["a fine film", "a waste of time"], return_tensors="pt", padding=True)
    with torch.no_grad():
        ours, theirs = loaded.model(**batch).logits, reference(**batch).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_fsdp_run_killed_with_sigkill_resumes_exactly(tmp_path, no_dropout_model_dir, sentiment_tsv):  # noqa: F811
    import psutil

    steps = 14
    straight = _config(tmp_path, "straight", no_dropout_model_dir, sentiment_tsv, batch_size=2, steps=steps,
                       parallel="fsdp")
    killed = _config(tmp_path, "killed", no_dropout_model_dir, sentiment_tsv, batch_size=2, steps=400,
                     parallel="fsdp", save_every=1)
    reference = _torchrun(2, straight)
    proc = _torchrun(2, killed)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(tmp_path / "killed")) < 2:
        time.sleep(0.05)
    for rank in psutil.Process(proc.pid).children():
        os.kill(rank.pid, signal.SIGKILL)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    _finish(reference)
    done = [s for s, _ in list_checkpoints(tmp_path / "killed")]
    assert done and max(done) < steps, done
    # Constant learning rate: the killed run continued to `steps` computes what the straight run did.
    _finish(_torchrun(2, killed, "--resume", f"--optim.max_steps={steps}"))
    name = f"checkpoints/step-{steps:08d}/{WEIGHTS}"
    assert _max_difference(tmp_path / "straight", tmp_path / "killed", name) == 0.0


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_under_fsdp_keeps_float32_adapter_close_to_float32_run(tmp_path, no_dropout_model_dir,  # noqa: F811
                                                                    sentiment_tsv):
    configs = {p: _config(tmp_path, p, no_dropout_model_dir, sentiment_tsv, batch_size=4, steps=5, parallel="fsdp",
                          mixed_precision=p) for p in ("no", "bf16")}
    for proc in [_torchrun(2, c) for c in configs.values()]:
        _finish(proc)
    full, half = load_file(tmp_path / "no" / WEIGHTS), load_file(tmp_path / "bf16" / WEIGHTS)
    assert {t.dtype for t in half.values()} == {torch.float32}  # shards and optimizer stay in the model's dtype
    # bf16 forward and backward on a 32-wide model: ~5% apart; an adapter left untrained (B = 0) would be 100%.
    for key in full:
        error = float((half[key] - full[key]).norm() / full[key].norm().clamp_min(1e-12))
        assert error < 0.1, (key, error)
