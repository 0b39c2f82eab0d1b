"""Low-rank layers in a model: `LowRankLinear` (W ≈ U·Vᵀ as two thin linears) and loading a model saved with them.

A linear layer stored as a low-rank pair, U (out, k) and V (in, k): y = x·V·Uᵀ + b costs k·(in + out) multiply-adds
per token and k·(in + out) weights (plus the bias), against in·out for the dense layer, so it saves both when
k < in·out / (in + out). `lorakit.compress.factorize` builds them; a factorised model's directory holds
`factorization.json`, the rank of every factorised module, which `lorakit.models.load_model` reads through
`load_factorized` here (the layer and its loader live below the model loader, which every room uses).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from lorakit.errors import LorakitError

FACTORIZATION_NAME = "factorization.json"


class LowRankLinear(nn.Module):
    """Two thin linears in sequence: `down` (in -> k, no bias, weight Vᵀ (k, in)) and `up` (k -> out, the original
    bias, weight U (out, k)). Input (..., in), output (..., out); both factors are ordinary trainable parameters."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, u: Tensor, v: Tensor, bias: Tensor | None = None) -> LowRankLinear:
        """The layer computing x·V·Uᵀ + bias, for U (out, k) and V (in, k); its dtype and device are U's."""
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
            raise ValueError(f"factors must be U (out, k) and V (in, k), got {tuple(u.shape)} and {tuple(v.shape)}")
        layer = cls(v.shape[0], u.shape[0], u.shape[1], bias=bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(u)
            layer.down.weight.copy_(v.T)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def dense_weight(self) -> Tensor:
        """U·Vᵀ, the (out, in) weight the pair stands for."""
        return self.up.weight @ self.down.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # (..., in) -> (..., k) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factorized_layout(model: nn.Module) -> str:
    """A short hash of the names and ranks of `model`'s `LowRankLinear` layers, "" for a model without any: what an
    adapter trained on a factorised base records (`lorakit.io`), so that it never loads onto another base."""
    ranks = sorted((name, module.rank) for name, module in model.named_modules() if isinstance(module, LowRankLinear))
    if not ranks:
        return ""
    return hashlib.sha256("\n".join(f"{n}:{r}" for n, r in ranks).encode()).hexdigest()[:16]


def is_factorized_dir(path: str | Path) -> bool:
    return (Path(path).expanduser() / FACTORIZATION_NAME).is_file()


def read_factorization(path: str | Path) -> dict[str, dict[str, Any]]:
    """The recorded modules of a factorised directory: name -> {rank, in_features, out_features, bias}."""
    file = Path(path).expanduser() / FACTORIZATION_NAME
    try:
        record = json.loads(file.read_text())
        layers = record["modules"]
        for name, layer in layers.items():
            if not all(isinstance(layer.get(k), int) and layer[k] >= 1 for k in ("rank", "in_features",
                                                                                   "out_features")):
                raise ValueError(f"module {name} lacks a positive rank, in_features or out_features")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise LorakitError(f"{file} is not a valid factorization record ({e}); save the model again with "
                           "save_factorized") from None
    return dict(layers)


def load_factorized(path: str | Path, auto_class: Any, config: Any, dtype: torch.dtype) -> nn.Module:
    """The factorised model saved in `path`: `auto_class.from_config(config)` in `dtype`, its recorded modules
    replaced by empty `LowRankLinear`s, the safetensors weights loaded strictly.

    As transformers' `from_pretrained` does, a directory saved as a bare model (BertModel) loads under a head
    (BertForSequenceClassification: names gain the `base_model_prefix`; the new head keeps its fresh
    initialisation), and one saved with a head loads as the bare model (the head's weights are left out). Raises
    LorakitError naming the missing and unexpected keys otherwise."""
    source = Path(path).expanduser()
    layers = read_factorization(source)
    model: nn.Module = auto_class.from_config(config, dtype=dtype)
    modules = dict(model.named_modules())
    prefix, mode = _prefix_mode(model, list(layers), modules)
    rename = _renamer(prefix, mode)
    layers = {rename(n): layer for n, layer in layers.items()}
    unknown = [n for n in layers if n not in modules]
    if unknown:
        raise LorakitError(f"{source / FACTORIZATION_NAME} names modules the model lacks: {', '.join(unknown)}")
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else model, child, LowRankLinear(
            layer["in_features"], layer["out_features"], layer["rank"], bias=bool(layer.get("bias", True)),
            dtype=dtype))
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise LorakitError(f"{source} holds no *.safetensors weights; save the model again with save_factorized")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        for key, value in load_file(str(file)).items():
            if mode != "strip" or key.startswith(prefix + "."):  # stripping: the saved head is left out
                state[rename(key)] = value
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()  # type: ignore[operator]
    missing = _untied(model, result.missing_keys, set(state))
    if mode == "add":  # the head the bare checkpoint lacks keeps its initialisation
        missing = [k for k in missing if k.startswith(prefix + ".")]
    if missing or result.unexpected_keys:
        raise LorakitError(f"the weights in {source} do not fit its factorization record: missing "
                           f"{', '.join(missing) or 'none'}; unexpected {', '.join(result.unexpected_keys) or 'none'}")
    return model


def _prefix_mode(model: nn.Module, names: list[str], modules: dict[str, nn.Module]) -> tuple[str, str]:
    """(the model's base_model_prefix, how recorded names map to the model's): "same", "add" (saved bare, loaded
    with a head) or "strip" (saved with a head, loaded bare)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or all(n in modules for n in names):
        return prefix, "same"
    if all(f"{prefix}.{n}" in modules for n in names):
        return prefix, "add"
    if all(n.startswith(prefix + ".") and n[len(prefix) + 1:] in modules for n in names):
        return prefix, "strip"
    return prefix, "same"  # the unknown names are reported


def _renamer(prefix: str, mode: str) -> Callable[[str], str]:
    if mode == "add":
        return lambda name: f"{prefix}.{name}"
    if mode == "strip":
        return lambda name: name[len(prefix) + 1:]
    return lambda name: name


def _untied(model: nn.Module, missing: list[str], loaded: set[str]) -> list[str]:
    """The missing keys that are not tied to a loaded parameter (save_pretrained drops tied copies)."""
    by_tensor: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), set()).add(name)
    names = {n: by_tensor[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    return [k for k in missing if not (names.get(k, set()) & loaded)]
