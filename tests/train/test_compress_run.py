"""Training a factorised model (the `compress` section): recovery fine-tuning of the factors (`run.method: factors`),
the truncated model under a head-only probe, and the published model loading back factorised."""

from __future__ import annotations

import torch
from conftest import write_config

from lorakit.compress import LowRankLinear
from lorakit.inference import load_for_inference
from lorakit.train.config import load_train_config
from lorakit.train.loop import fit
from lorakit.train.run import _publish, prepare, train_from_config
from lorakit.train.sections import TrainConfig


def _config(tmp_path, model_dir, sentiment_tsv, run_method: str, **compress) -> TrainConfig:
    path = write_config(tmp_path / "c.yaml", model_dir, *sentiment_tsv, tmp_path / "run", run={"method": run_method})
    return load_train_config(path, [f"--compress.{k}={v}" for k, v in compress.items()])


def _is_factor_or_head(name: str) -> bool:
    return name.startswith("classifier.") or ".down." in name or ".up." in name


def test_factors_run_trains_only_the_factors_and_the_head(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, "factors", ratio=0.5)
    before = {n: p.detach().clone() for n, p in prepare(config).model.named_parameters()}
    prepared = prepare(config)
    assert any(isinstance(m, LowRankLinear) for m in prepared.model.modules())
    assert not isinstance(prepared.model.classifier, LowRankLinear)  # the task head is never factorised
    trainable = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert trainable and all(_is_factor_or_head(n) for n in trainable)
    fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
    after = dict(prepared.model.named_parameters())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before if not _is_factor_or_head(n))
    assert any(not torch.equal(before[n], after[n]) for n in before if ".down." in n or ".up." in n)


def test_factors_run_publishes_a_model_that_loads_back_factorised_with_the_same_logits(
        tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, "factors", ratio=0.5)
    prepared = prepare(config)
    result = fit(prepared.model, prepared.task, prepared.train, prepared.eval, config.optim, config.run)
    published = _publish(prepared, result, tmp_path / "run")
    assert published == tmp_path / "run" / "model"
    loaded = load_for_inference(str(published))
    ranks = {n: m.rank for n, m in loaded.model.named_modules() if isinstance(m, LowRankLinear)}
    assert ranks == {n: m.rank for n, m in prepared.model.named_modules() if isinstance(m, LowRankLinear)}
    batch = {k: v for k, v in prepared.task.collate(prepared.eval).items() if k != "labels"}
    prepared.model.eval()
    loaded.model.eval()
    with torch.no_grad():
        assert torch.equal(prepared.model(**batch).logits, loaded.model(**batch).logits)


def test_head_only_on_a_compressed_model_scores_the_truncated_encoder(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, "head-only", ratio=0.5)
    truncated = prepare(config).model
    summary = train_from_config(config)
    loaded = load_for_inference(summary.adapter_dir)
    for name, module in truncated.named_modules():
        if isinstance(module, LowRankLinear):
            saved = dict(loaded.model.named_modules())[name]
            assert isinstance(saved, LowRankLinear)
            assert torch.equal(saved.dense_weight(), module.dense_weight())  # the encoder is the truncation itself
    prepared = prepare(config)
    score = prepared.task.evaluate(loaded.model, prepared.eval, 32)[prepared.task.metric]
    assert summary.value is not None and abs(score - summary.value) < 1e-6


def test_activation_method_calibrates_on_training_examples(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, "full", energy=0.9, method="activation",
                     calibration_examples=4)
    prepared = prepare(config)
    assert prepared.factorization is not None and prepared.factorization.method == "activation"
    assert prepared.factorization.factorized
    assert all(p.requires_grad for p in prepared.model.parameters())  # full: every parameter, U and V included


def test_no_compress_section_leaves_the_model_dense(tmp_path, tiny_classifier_dir, sentiment_tsv):
    config = _config(tmp_path, tiny_classifier_dir, sentiment_tsv, "full")
    prepared = prepare(config)
    assert prepared.factorization is None
    assert not any(isinstance(m, LowRankLinear) for m in prepared.model.modules())
