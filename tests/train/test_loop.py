"""The training loop end to end on a tiny local model: resume after SIGKILL, guards, reload of a classifier."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import approx, assert_close, write_config
from safetensors.torch import load_file

from lorakit import gemm
from lorakit.train.checkpoint import list_checkpoints, load_trainer_state
from lorakit.train.config import load_train_config
from lorakit.train.evaluate import evaluate_from_config
from lorakit.train.loop import TrainingError, fit
from lorakit.train.run import prepare, train_from_config

WEIGHTS = "adapter/adapter_model.safetensors"


def _run_cli(config: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorakit", "train", str(config), "--quiet", *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_after_checkpoint(out_dir: Path, config: Path, min_step: int, resume: bool) -> None:
    proc = _run_cli(config, *(["--resume"] if resume else []))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        steps = [s for s, _ in list_checkpoints(out_dir)]
        if steps and max(steps) >= min_step:
            time.sleep(random.Random(min_step).uniform(0.0, 0.3))  # land anywhere: mid-step or mid-write
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_run_killed_three_times_and_resumed_ends_with_the_same_adapter(tmp_path, tiny_classifier_dir,
                                                                      sentiment_tsv):
    train, dev = sentiment_tsv
    steps = {"max_steps": 12}
    run = {"save_every": 1, "keep_last": 2}
    straight = write_config(tmp_path / "a.yaml", tiny_classifier_dir, train, dev, tmp_path / "straight",
                            optim=steps, run=run)
    killed = write_config(tmp_path / "b.yaml", tiny_classifier_dir, train, dev, tmp_path / "killed",
                          optim=steps, run=run)
    assert _run_cli(straight).wait() == 0
    for i, min_step in enumerate((2, 5, 8)):
        _kill_after_checkpoint(tmp_path / "killed", killed, min_step, resume=i > 0)
        assert list_checkpoints(tmp_path / "killed"), "a kill must leave a complete checkpoint"
    proc = _run_cli(killed, "--resume")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    expected = load_file(tmp_path / "straight" / WEIGHTS)
    actual = load_file(tmp_path / "killed" / WEIGHTS)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key  # bit-exact: resume restores every state exactly
    history = [line for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(history) == 12  # one history: lines past a checkpoint were dropped on resume
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*"))  # writes cut by a kill were tidied on resume


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = load_train_config(write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "r"))
    with pytest.raises(Exception, match="nothing to resume"):
        train_from_config(config, resume=True)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = load_train_config(write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv,
                                            tmp_path / "r", run={"save_every": 1}))
    prepared = prepare(config)
    real_loss, calls = prepared.task.loss, []

    def poisoned(model, batch):
        calls.append(1)
        loss = real_loss(model, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    prepared.task.loss = poisoned  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match=r"loss is nan at step 3 .*; training stopped and the newest checkpoint, "
                                            r"step-00000002 in .*checkpoints, is kept"):
        fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
    checkpoints = list_checkpoints(tmp_path / "r")
    assert [s for s, _ in checkpoints] == [1, 2]
    assert load_trainer_state(checkpoints[-1][1])["step"] == 2


def test_nan_loss_before_any_checkpoint_says_none_was_written(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = load_train_config(write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "r"))
    config.optim.lr = float("nan")  # what `optim.lr: .nan` would give if it got past validation
    prepared = prepare(config)
    with pytest.raises(TrainingError, match=r"loss is nan at step 2 .*; training stopped and no checkpoint was "
                                            r"written yet, so there is none to resume from"):
        fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
    assert not list_checkpoints(tmp_path / "r")


def test_resume_past_a_truncated_newest_checkpoint_continues_from_the_previous_one(tmp_path, tiny_classifier_dir,
                                                                                  sentiment_tsv, caplog):
    def config(name: str, steps: int) -> object:
        return load_train_config(write_config(tmp_path / f"{name}.yaml", tiny_classifier_dir, *sentiment_tsv,
                                              tmp_path / name, run={"save_every": 2, "keep_last": 3},
                                              optim={"max_steps": steps, "schedule": "constant", "warmup_steps": 0}))

    train_from_config(config("straight", 6))
    train_from_config(config("resumed", 4))
    state_file = tmp_path / "resumed" / "checkpoints" / "step-00000004" / "trainer_state.safetensors"
    state_file.write_bytes(state_file.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        train_from_config(config("resumed", 6), resume=True)
    assert "skipped checkpoint step-00000004: " in caplog.text and "does not match" in caplog.text
    assert "resuming from the previous complete checkpoint step-00000002" in caplog.text
    # Steps 3 and 4 were trained again (at a constant learning rate, so 4 + 2 steps compute what 6 steps do): the
    # same adapter as a run never interrupted.
    for step in (4, 6):
        expected = load_file(tmp_path / "straight" / "checkpoints" / f"step-{step:08d}" / WEIGHTS)
        actual = load_file(tmp_path / "resumed" / "checkpoints" / f"step-{step:08d}" / WEIGHTS)
        assert all(torch.equal(actual[k], v) for k, v in expected.items()), step
    assert (tmp_path / "resumed" / "checkpoints" / "step-00000004.unusable").is_dir()


def test_adapters_without_gradient_are_an_error(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = load_train_config(write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "r"))
    prepared = prepare(config)
    # Cut the graph after every adapted `query` (as a detach in a custom block, or reentrant checkpointing over
    # inputs that do not require grad, would): its adapter then trains nothing. The guard must say so at step 1.
    for name, module in prepared.model.named_modules():
        if name.endswith("attention.self.query"):
            module.register_forward_hook(lambda _m, _i, out: out.detach())
    with pytest.raises(TrainingError, match=r"2 adapted modules received no gradient.*attention.self.query"):
        fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
    assert not list_checkpoints(tmp_path / "r")


def test_non_reentrant_activation_checkpointing_trains_the_adapters(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = load_train_config(write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "r",
                                            run={"activation_checkpointing": True}, optim={"max_steps": 2}))
    prepared = prepare(config)
    before = {k: v.clone() for k, v in prepared.model.state_dict().items() if "lora_B" in k}
    fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
    after = prepared.model.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in before.items())


def test_reloaded_classifier_scores_what_it_scored_before_saving(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = load_train_config(write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "r",
                                            optim={"max_steps": 10}, run={"eval_every": 5}))
    summary = train_from_config(config)
    assert summary.value is not None
    metrics = evaluate_from_config(config, adapter=summary.adapter_dir).metrics
    assert metrics["accuracy"] == approx(summary.value, "exact")
    assert (Path(summary.adapter_dir) / "task.json").is_file()


def test_early_stopping_ends_the_run_when_the_metric_stalls(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = load_train_config(write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "r",
                                            optim={"max_steps": 40, "lr": 1e-9}, run={"eval_every": 1,
                                                                                       "early_stopping": 2}))
    prepared = prepare(config)
    result = fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
    assert result.stopped_early and result.steps < 40


def test_bf16_mixed_precision_trains_on_cpu(tmp_path, tiny_classifier_dir, sentiment_tsv):
    first_loss = {}
    for precision in ("no", "bf16"):  # the same seed: the same initial adapter, first batch and dropout masks
        config = load_train_config(write_config(tmp_path / f"{precision}.yaml", tiny_classifier_dir, *sentiment_tsv,
                                                tmp_path / precision, run={"mixed_precision": precision},
                                                optim={"max_steps": 3}))
        prepared = prepare(config)
        before = {k: v.clone() for k, v in prepared.model.state_dict().items() if "lora_B" in k}
        result = fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
        first_loss[precision] = result.history[0]["loss"]
        after = prepared.model.state_dict()
        assert all(not torch.equal(after[k], v) for k, v in before.items())
        assert all(v.dtype == torch.float32 for v in after.values())  # autocast: weights stay fp32
    assert first_loss["bf16"] != first_loss["no"]  # the forward did run in bf16
    assert first_loss["bf16"] == approx(first_loss["no"], torch.bfloat16)


def test_gradient_accumulation_matches_one_large_batch(tmp_path, tiny_classifier_dir, sentiment_tsv):
    small = load_train_config(write_config(tmp_path / "a.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "a",
                                           optim={"max_steps": 2, "batch_size": 4, "grad_accum": 2},
                                           run={"group_by_length": False}, lora={"dropout": 0.0}))
    large = load_train_config(write_config(tmp_path / "b.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "b",
                                           optim={"max_steps": 2, "batch_size": 8, "grad_accum": 1},
                                           run={"group_by_length": False}, lora={"dropout": 0.0}))
    trained = []
    for config in (small, large):
        prepared = prepare(config)
        for module in prepared.model.modules():  # no dropout: the runs differ only in how the batch is split
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
        trained.append({k: v for k, v in prepared.model.state_dict().items() if "lora_" in k or "classifier" in k})
    assert trained[0].keys() == trained[1].keys()
    for key, value in trained[0].items():
        assert_close(value, trained[1][key], "fp32 summed in another order")


def test_evaluated_method_reads_the_run_that_wrote_the_adapter_or_model(tmp_path):
    import json

    from lorakit.train.results import evaluated_method

    def run_dir(name: str, method: str, init: str, dora: bool = False, **model: str) -> Path:
        out = tmp_path / name
        (out / "adapter").mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"run": {"method": method}, "lora": {"init": init, "dora": dora},
                                                     "model": model}))
        return out

    assert evaluated_method("smollm2", run_dir("a", "lora", "principal") / "adapter") == "lora-principal"
    assert evaluated_method("smollm2", run_dir("d", "lora", "standard", dora=True) / "adapter") == "dora"
    assert evaluated_method("smollm2", run_dir("e", "lora", "principal", dora=True) / "adapter") == "dora-principal"
    assert evaluated_method("smollm2", run_dir("b", "lora", "standard") / "adapter") == "lora"
    assert evaluated_method(str(run_dir("c", "full", "standard") / "adapter"), None) == "full"
    assert evaluated_method("minilm", run_dir("q", "lora", "standard", quantize="nf4") / "adapter") == "qlora"
    assert evaluated_method("minilm", run_dir("q8", "lora", "standard", quantize="int8") / "adapter") == "qlora-int8"
    loftq = run_dir("l", "lora", "standard", quantize="nf4", quantize_init="loftq")
    assert evaluated_method("minilm", loftq / "adapter") == "qlora-loftq"
    principal = run_dir("p", "lora", "principal", quantize="nf4", quantize_init="qlora")
    assert evaluated_method("minilm", principal / "adapter") == "qlora-principal"
    stray = tmp_path / "elsewhere" / "adapter"
    stray.mkdir(parents=True)
    assert evaluated_method("smollm2", stray) == "adapter"
    assert evaluated_method("smollm2", None) == "base"


@pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN")
def test_run_cpu_matmul_holds_for_the_run_and_no_longer(tmp_path, tiny_classifier_dir, sentiment_tsv, monkeypatch):
    import lorakit.train.evaluate as evaluate_module
    import lorakit.train.run as run_module

    seen = []
    monkeypatch.setattr(run_module, "_train", lambda *args, **kwargs: seen.append(gemm.active_cpu_matmul()))
    monkeypatch.setattr(evaluate_module, "_evaluate", lambda *args: seen.append(gemm.active_cpu_matmul()))
    assert gemm.active_cpu_matmul() == "onednn"  # the library's default where torch has oneDNN
    config = load_train_config(write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "r",
                                            run={"cpu_matmul": "blas"}))
    train_from_config(config)
    evaluate_from_config(config)
    assert seen == ["blas", "blas"] and gemm.active_cpu_matmul() == "onednn"
