"""lorakit.vision.efficientnet: EfficientNet-Lite0 from its wheels, converted once to safetensors and checked on a
known image; the new head, the BatchNorm policy under train(), and load_model's dispatch."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.errors import LorakitError
from lorakit.models import default_cache_root
from lorakit.vision import efficientnet
from lorakit.vision.efficientnet import (
    CHECK_CLASS,
    EfficientNetClassifier,
    check_model,
    converted_dir,
    load_efficientnet,
)


@pytest.fixture(scope="module")
def cache_root() -> Path:
    """The user's cache (converted here on first use, ~10 s); the conversion itself is tested afresh under -m slow."""
    root = default_cache_root()
    converted_dir(root)
    return root


@pytest.fixture(scope="module")
def pretrained(cache_root: Path) -> EfficientNetClassifier:
    return load_efficientnet(cache_dir=cache_root)[0]


@pytest.mark.slow
def test_conversion_writes_safetensors_and_the_passed_check(tmp_path):
    directory = converted_dir(tmp_path)
    assert directory == tmp_path / efficientnet.NAME
    check = json.loads((directory / efficientnet.CHECK_FILE).read_text())
    assert check["class"] == CHECK_CLASS == 652 and check["probability"] > 0.4
    state = load_file(str(directory / efficientnet.WEIGHTS_FILE))
    assert state["classifier.weight"].shape == (1000, 1280)
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 4_652_008


def test_pretrained_model_calls_grace_hopper_a_military_uniform(pretrained):
    assert check_model(pretrained)[0] == CHECK_CLASS


def test_new_head_replaces_the_classifier_and_keeps_the_backbone(cache_root, pretrained):
    model, processor = load_efficientnet(head="image-classification", num_labels=10, cache_dir=cache_root)
    assert model.classifier.out_features == 10 and model.config.num_labels == 10
    assert torch.equal(model.backbone._conv_stem.weight, pretrained.backbone._conv_stem.weight)
    logits = model(pixel_values=torch.zeros(2, 3, 32, 32)).logits
    assert logits.shape == (2, 10)
    assert processor.size["height"] == 224 and processor.image_mean == pytest.approx([127 / 255] * 3)


def test_frozen_batchnorm_stays_in_eval_mode_under_train(pretrained):
    model = copy.deepcopy(pretrained)
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    model.train()
    assert model.classifier.training and not model.backbone._bn0.training
    before = model.backbone._bn0.running_mean.clone()
    model(pixel_values=torch.randn(2, 3, 32, 32))
    assert torch.equal(model.backbone._bn0.running_mean, before)


def test_trainable_batchnorm_trains(pretrained):
    model = copy.deepcopy(pretrained)
    model.train()
    assert model.backbone._bn0.training


def test_save_pretrained_writes_a_state_dict_that_loads_back(cache_root, tmp_path):
    model, _ = load_efficientnet(head="image-classification", num_labels=3, cache_dir=cache_root)
    model.save_pretrained(tmp_path)
    again, _ = load_efficientnet(head="image-classification", num_labels=3, cache_dir=cache_root)
    again.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    assert torch.equal(again.classifier.weight, model.classifier.weight)
    assert json.loads((tmp_path / "config.json").read_text())["num_labels"] == 3


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"head": "causal-lm"}, "has no head 'causal-lm'"),
    ({"head": "base", "num_labels": 10}, "num_labels applies to head 'image-classification' only"),
    ({"head": "image-classification", "num_labels": 1}, "num_labels must be an int >= 2"),
], ids=["unknown-head", "labels-on-base", "one-label"])
def test_bad_arguments_are_refused(cache_root, kwargs, message):
    with pytest.raises(LorakitError, match=message):
        load_efficientnet(cache_dir=cache_root, **kwargs)


def test_load_model_dispatches_to_efficientnet(cache_root):
    from lorakit.models import load_model

    model, processor = load_model("efficientnet-lite0", head="image-classification", num_labels=4,
                                  cache_dir=cache_root)
    assert isinstance(model.classifier, nn.Linear) and model.classifier.out_features == 4
    assert model.name_or_path == "efficientnet-lite0" and processor.image_std == pytest.approx([128 / 255] * 3)


def test_inference_loads_an_image_adapter_with_its_new_head(cache_root, tmp_path):
    from lorakit import LoraConfig, inject, save_adapter
    from lorakit.inference import load_for_inference
    from lorakit.io import TASK_NAME

    model, _ = load_efficientnet(head="image-classification", num_labels=3, cache_dir=cache_root)
    inject(model, LoraConfig(rank=2, alpha=4, targets=["_conv_stem", "_project_conv"],
                             modules_to_save=["classifier"]))
    save_adapter(model, tmp_path / "adapter")
    (tmp_path / "adapter" / TASK_NAME).write_text(json.dumps(
        {"task": "image-classification", "labels": ["a", "b", "c"], "image": "image", "label": "label",
         "image_size": 32}))
    loaded = load_for_inference(adapter=tmp_path / "adapter")
    x = torch.randn(2, 3, 32, 32)
    assert loaded.model.classifier.out_features == 3 and loaded.model.config.id2label[2] == "c"
    assert torch.equal(loaded.model(pixel_values=x).logits, model.eval()(pixel_values=x).logits)
