"""Training on a model that was factorised beforehand (`lorakit factorize`, then `model.name` = that directory):
a bare factorised encoder takes a new head, `run.method=factors` trains its factors and publishes a factorised
model, and LoRA adapts the layers left dense."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_config

from lorakit.compress import LowRankLinear, factorize_model
from lorakit.errors import ConfigError
from lorakit.factorized import FACTORIZATION_NAME
from lorakit.inference import load_for_inference
from lorakit.train.config import load_train_config
from lorakit.train.run import prepare, train_from_config


@pytest.fixture(scope="module")
def factorised_dir(tmp_path_factory, tiny_classifier_dir):
    out = tmp_path_factory.mktemp("factorised") / "f"
    factorize_model(str(tiny_classifier_dir), out, targets=["intermediate.dense", "output.dense"], ratio=0.5)
    return out


def _config(tmp_path, model_dir, sentiment_tsv, method, *overrides):
    path = write_config(tmp_path / "c.yaml", model_dir, *sentiment_tsv, tmp_path / "run", run={"method": method})
    return load_train_config(path, list(overrides))


def test_a_bare_factorised_encoder_loads_under_a_new_classification_head(tmp_path, factorised_dir, sentiment_tsv):
    prepared = prepare(_config(tmp_path, factorised_dir, sentiment_tsv, "factors"))
    layers = {n: m.rank for n, m in prepared.model.named_modules() if isinstance(m, LowRankLinear)}
    saved = json.loads((factorised_dir / FACTORIZATION_NAME).read_text())["modules"]
    assert layers == {f"bert.{n}": layer["rank"] for n, layer in saved.items()}  # names gain the base prefix
    trainable = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("classifier.") or ".down." in n or ".up." in n for n in trainable)


def test_factors_run_on_a_factorised_directory_publishes_a_factorised_model(tmp_path, factorised_dir, sentiment_tsv):
    config = _config(tmp_path, factorised_dir, sentiment_tsv, "factors")
    summary = train_from_config(config)
    published = tmp_path / "run" / "model"
    assert (published / FACTORIZATION_NAME).is_file()
    loaded = load_for_inference(str(published))
    assert sum(isinstance(m, LowRankLinear) for m in loaded.model.modules()) == len(
        json.loads((factorised_dir / FACTORIZATION_NAME).read_text())["modules"])
    from lorakit.train.evaluate import evaluate_from_config

    (tmp_path / "e").mkdir()
    config2 = _config(tmp_path / "e", published, sentiment_tsv, "full")
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [e for e in evals if "eval_loss" in e][-1]
    metrics = evaluate_from_config(config2).metrics
    assert metrics["accuracy"] == pytest.approx(summary.value, abs=1e-6)
    assert metrics["loss"] == pytest.approx(last["eval_loss"], abs=1e-5)  # the trained factors, not the initial ones


def test_lora_on_a_factorised_directory_adapts_the_dense_layers_and_reloads(tmp_path, factorised_dir, sentiment_tsv):
    config = _config(tmp_path, factorised_dir, sentiment_tsv, "lora")  # lora.targets: query, value (left dense)
    prepared = prepare(config)
    batch = {k: v for k, v in prepared.task.collate(prepared.eval).items() if k != "labels"}
    train_from_config(config)
    loaded = load_for_inference(adapter=tmp_path / "run" / "adapter")
    assert any(isinstance(m, LowRankLinear) for m in loaded.model.modules())
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**batch).logits).all()


def test_all_linear_lora_on_a_fully_factorised_model_is_refused(tmp_path, sentiment_tsv, tiny_classifier_dir):
    out = tmp_path / "all"
    factorize_model(str(tiny_classifier_dir), out, ratio=0.5)
    with pytest.raises(ConfigError, match=r"leave no module to adapt"):
        prepare(_config(tmp_path, out, sentiment_tsv, "lora", "--lora.targets=[all-linear]"))
