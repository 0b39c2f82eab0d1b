"""The one inference loader: the adapter's recorded base, its task's head and label names, checked first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit import LoraConfig, inject, save_adapter
from lorakit.errors import LorakitError
from lorakit.inference import load_for_inference, recorded_base
from lorakit.io import TASK_NAME


@pytest.fixture
def classifier_adapter(tmp_path: Path, tiny_classifier_dir: Path) -> Path:
    """An adapter with a trained-looking head, saved on the tiny BERT directory, with its task beside it."""
    from lorakit.models import load_model

    model, _ = load_model(str(tiny_classifier_dir), head="sequence-classification", num_labels=2)
    inject(model, LoraConfig(rank=2, alpha=4, targets=["query"], modules_to_save=["classifier"], seed=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "classifier" in name:
                p.add_(0.1)
    path = save_adapter(model, tmp_path / "adapter")
    (path / TASK_NAME).write_text(json.dumps({"task": "classification", "labels": ["negative", "positive"]}))
    return path


def test_the_base_defaults_to_the_one_the_adapter_records(classifier_adapter: Path, tiny_classifier_dir: Path
                                                          ) -> None:
    assert recorded_base(classifier_adapter) == str(tiny_classifier_dir)
    loaded = load_for_inference(adapter=classifier_adapter)
    assert loaded.base == str(tiny_classifier_dir)
    assert type(loaded.model).__name__ == "BertForSequenceClassification" and not loaded.model.training


def test_label_names_come_from_the_task(classifier_adapter: Path) -> None:
    loaded = load_for_inference(adapter=classifier_adapter)
    assert loaded.model.config.id2label == {0: "negative", 1: "positive"}
    assert loaded.task_state == {"task": "classification", "labels": ["negative", "positive"]}


def test_the_loaded_head_carries_the_adapters_weights(classifier_adapter: Path) -> None:
    loaded = load_for_inference(adapter=classifier_adapter)
    from safetensors.torch import load_file

    saved = load_file(classifier_adapter / "adapter_model.safetensors")
    key = next(k for k in saved if k.endswith("classifier.weight"))
    assert torch.equal(loaded.model.classifier.weight, saved[key])


def test_a_bad_task_json_is_found_before_the_model_loads(classifier_adapter: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (classifier_adapter / TASK_NAME).write_text("{")

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("lorakit.inference.load_model", no_load)
    with pytest.raises(LorakitError, match=r"task\.json is not valid JSON"):
        load_for_inference(adapter=classifier_adapter)


def test_a_base_alone_loads_with_its_own_head(tiny_classifier_dir: Path) -> None:
    loaded = load_for_inference(str(tiny_classifier_dir))
    assert type(loaded.model).__name__ == "BertModel" and loaded.task_state is None and loaded.adapter is None


def test_an_adapter_on_another_base_is_refused_naming_both(classifier_adapter: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from lorakit.io import load_adapter

    wider = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=2))
    with pytest.raises(LorakitError, match=r"was trained on '.*tiny-bert.*', this model is 'BertForSequence"):
        load_adapter(wider, classifier_adapter)
