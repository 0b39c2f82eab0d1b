"""LoRA on a factorised model (`compress` with `run.method: lora`): U and V stay frozen while the adapter and the head
train; the run publishes the factorised model and an adapter bound to it; targets both sections match are refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_close, expect_cli_error, write_config
from safetensors.torch import load_file

from lorakit.compress import LowRankLinear
from lorakit.errors import LorakitError
from lorakit.inference import load_for_inference, recorded_base
from lorakit.io import FACTORIZATION_KEY, read_adapter
from lorakit.layers import LoraLinear
from lorakit.train.config import load_train_config
from lorakit.train.evaluate import evaluate_from_config
from lorakit.train.loop import fit
from lorakit.train.run import _publish, prepare, train_from_config
from lorakit.train.sections import TrainConfig

FFN = ["--compress.targets=[intermediate.dense, output.dense]"]


def _config(tmp_path, model_dir, sentiment_tsv, *flags: str, run: str = "run", **lora) -> TrainConfig:
    path = write_config(tmp_path / "c.yaml", model_dir, *sentiment_tsv, tmp_path / run, lora=lora)
    return load_train_config(path, ["--run.method=lora", "--compress.ratio=0.5", *flags])


def _logits(model: torch.nn.Module, prepared) -> torch.Tensor:
    batch = {k: v for k, v in prepared.task.collate(prepared.eval).items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_lora_on_factorised_model_trains_the_adapter_and_head_and_leaves_u_and_v_bit_identical(
        tmp_path, tiny_classifier_dir, sentiment_tsv):
    prepared = prepare(_config(tmp_path, tiny_classifier_dir, sentiment_tsv, *FFN))
    modules = dict(prepared.model.named_modules())
    assert any(isinstance(m, LowRankLinear) for m in modules.values())
    assert all(isinstance(modules[n], LoraLinear) for n in prepared.report.adapted)
    assert {n.rpartition(".")[2] for n in prepared.report.adapted} == {"query", "value"}
    trainable = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or n.startswith("classifier.") for n in trainable)
    before = {n: p.detach().clone() for n, p in prepared.model.named_parameters()}
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, *FFN)
    fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
    after = dict(prepared.model.named_parameters())
    factors = [n for n in before if ".down." in n or ".up." in n]
    assert factors and all(torch.equal(before[n], after[n]) for n in factors)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)
    assert any(not torch.equal(before[n], after[n]) for n in before if ".lora_B." in n)


def test_run_publishes_the_factorised_model_without_lora_and_an_adapter_recording_it(
        tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, *FFN)
    summary = train_from_config(config)
    run = tmp_path / "run"
    assert Path(summary.adapter_dir) == run / "adapter"
    assert (run / "model" / "factorization.json").is_file() and (run / "model" / "task.json").is_file()
    keys = [k for f in (run / "model").glob("*.safetensors") for k in load_file(str(f))]
    assert any(k.endswith(".down.weight") for k in keys)
    assert not [k for k in keys if "lora_" in k]
    assert recorded_base(run / "adapter") == str((run / "model").resolve())
    raw_config, _, metadata = read_adapter(run / "adapter")
    assert raw_config["base_model_name_or_path"] == str((run / "model").resolve())
    assert metadata[FACTORIZATION_KEY]


def test_published_adapter_loads_on_its_factorised_base_with_the_trained_logits(
        tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, *FFN)
    prepared = prepare(config)
    result = fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
    published = _publish(prepared, result, tmp_path / "run")
    loaded = load_for_inference(adapter=published)
    assert loaded.base == str((tmp_path / "run" / "model").resolve())
    ranks = {n: m.rank for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == {n: m.rank for n, m in prepared.model.named_modules() if isinstance(m, LowRankLinear)}
    assert torch.equal(_logits(loaded.model, prepared), _logits(prepared.model, prepared))
    # The model publishing swapped the LoRA modules out of is whole again.
    assert all(isinstance(dict(prepared.model.named_modules())[n], LoraLinear) for n in prepared.report.adapted)


def test_eval_of_the_published_adapter_reproduces_the_run_metric_on_the_factorised_base(
        tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, *FFN, "--run.eval_every=3")
    summary = train_from_config(config)
    # config.model.name is the dense model the run factorised; eval scores the adapter on the factorised one.
    evaluation = evaluate_from_config(config, adapter=summary.adapter_dir)
    assert summary.value is not None
    assert evaluation.metrics[evaluation.metric] == pytest.approx(summary.value, abs=1e-6)


def test_published_adapter_is_refused_on_the_dense_base(tmp_path, tiny_classifier_dir, sentiment_tsv):
    summary = train_from_config(_config(tmp_path, tiny_classifier_dir, sentiment_tsv, *FFN))
    with pytest.raises(LorakitError, match=r"was trained on a factorised base \(layout [0-9a-f]+\) and this model "
                                           r"is a dense model; load it on its own base \(.*run/model\)"):
        load_for_inference(str(tiny_classifier_dir), adapter=summary.adapter_dir)


def test_published_adapter_finds_the_model_beside_it_after_the_run_dir_moves(
        tmp_path, tiny_classifier_dir, sentiment_tsv):
    summary = train_from_config(_config(tmp_path, tiny_classifier_dir, sentiment_tsv, *FFN))
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "run"), moved)
    assert not Path(summary.adapter_dir).exists()
    loaded = load_for_inference(adapter=moved / "adapter")
    assert loaded.base == str(moved.resolve() / "model")
    assert any(isinstance(m, LowRankLinear) for m in loaded.model.modules())


def test_principal_lora_on_factorised_model_publishes_w_and_reloads_the_trained_logits(
        tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, *FFN, init="principal")
    prepared = prepare(config)
    dense = prepare(load_train_config(write_config(tmp_path / "d.yaml", tiny_classifier_dir, *sentiment_tsv,
                                                   tmp_path / "d", run={"method": "full"}), []))
    result = fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
    published = _publish(prepared, result, tmp_path / "run")
    saved = {k: v for f in (tmp_path / "run" / "model").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    query = next(k for k in saved if k.endswith("attention.self.query.weight"))
    residual = dict(prepared.model.named_parameters())[query]
    assert_close(saved[query], dense.model.state_dict()[query], torch.float32)  # W (to roundoff) ...
    assert not torch.allclose(saved[query], residual, atol=1e-3)  # ... not the residual W - s·B₀A₀ trained on
    loaded = load_for_inference(adapter=published)
    assert_close(_logits(loaded.model, prepared), _logits(prepared.model, prepared), torch.float32)


def test_default_targets_overlap_is_refused_before_factorising(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, targets=["all-linear"])
    with pytest.raises(LorakitError, match=r"lora\.targets and compress\.targets both match "
                                           r"bert\.encoder\.layer\.0\.attention\.self\.query, .*, and \d+ more; .*"
                                           r"choose disjoint targets, e\.g\. compress\.targets=\[intermediate\.dense, "
                                           r"output\.dense\] with lora\.targets=\[query, value\]"):
        prepare(config)


def test_lora_target_inside_a_factorised_layer_is_refused(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, *FFN, targets=["down"])
    with pytest.raises(LorakitError, match=r"target 'down' matches only factors of factorised layers "
                                           r"\(bert\.encoder\.layer\.0\.attention\.output\.dense\.down, .*\), "
                                           r"which lorakit neither adapts nor factorises again"):
        prepare(config)


def test_cli_refuses_overlapping_default_targets_with_exit_2_and_writes_nothing(
        tmp_path, tiny_classifier_dir, sentiment_tsv, capsys):
    path = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                        lora={"targets": ["all-linear"]})
    expect_cli_error(["train", str(path), "--run.method=lora", "--compress.ratio=0.5", "--quiet"], capsys,
                     matches=r"lora\.targets and compress\.targets both match .*choose disjoint targets",
                     watch=[tmp_path])
    assert not (tmp_path / "run").exists()
