"""lorakit.vision.efficientnet: EfficientNet-Lite0 from its wheels, converted once to safetensors and checked on a
known image; the new head, the BatchNorm policy under train(), and load_model's dispatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.errors import LorakitError
from lorakit.vision import efficientnet
from lorakit.vision.efficientnet import CHECK_CLASS, check_model, converted_dir, load_efficientnet


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted once per module from the wheel, so the tests see this code's conversion."""
    root = tmp_path_factory.mktemp("lorakit-cache")
    converted_dir(root)
    return root


def test_conversion_writes_safetensors_and_the_passed_check(cache_root):
    directory = cache_root / efficientnet.NAME
    check = json.loads((directory / efficientnet.CHECK_FILE).read_text())
    assert check["class"] == CHECK_CLASS == 652 and check["probability"] > 0.4
    state = load_file(str(directory / efficientnet.WEIGHTS_FILE))
    assert state["classifier.weight"].shape == (1000, 1280)
    assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == 4_652_008


def test_pretrained_model_calls_grace_hopper_a_military_uniform(cache_root):
    model, processor = load_efficientnet(cache_dir=cache_root)
    assert check_model(model)[0] == CHECK_CLASS
    assert processor.size["height"] == 224 and processor.image_mean == pytest.approx([127 / 255] * 3)


def test_new_head_replaces_the_classifier_and_keeps_the_backbone(cache_root):
    pretrained, _ = load_efficientnet(cache_dir=cache_root)
    model, _ = load_efficientnet(head="image-classification", num_labels=10, cache_dir=cache_root)
    assert model.classifier.out_features == 10 and model.config.num_labels == 10
    assert torch.equal(model.backbone._conv_stem.weight, pretrained.backbone._conv_stem.weight)
    logits = model(pixel_values=torch.zeros(2, 3, 64, 64)).logits
    assert logits.shape == (2, 10)


def test_frozen_batchnorm_stays_in_eval_mode_under_train(cache_root):
    model, _ = load_efficientnet(cache_dir=cache_root)
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.weight.requires_grad_(True)
    model.train()
    assert model.classifier.training and not model.backbone._bn0.training
    before = model.backbone._bn0.running_mean.clone()
    model(pixel_values=torch.randn(2, 3, 64, 64))
    assert torch.equal(model.backbone._bn0.running_mean, before)


def test_trainable_batchnorm_trains(cache_root):
    model, _ = load_efficientnet(cache_dir=cache_root)
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
