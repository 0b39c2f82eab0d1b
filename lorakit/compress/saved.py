"""Factorised models on disk: a transformers directory whose state dict holds each factorised layer's pair
(`...q_proj.down.weight`, `...q_proj.up.weight`) plus `factorization.json`, the rank of every factorised module.

    save_factorized(model, tokenizer, "out/f", report)     # after factorize(...)
    model, tokenizer = load_model("out/f")                  # the factorised model again (LowRankLinear layers)
    export_dense("out/f", "out/dense")                      # U·Vᵀ multiplied out: a plain transformers checkpoint

`load_model` calls `lorakit.factorized.load_factorized` when the directory holds `factorization.json`: the model is
built from its config, the recorded modules are replaced by empty `LowRankLinear`s of the recorded ranks, and the
weights load strictly (a missing or unexpected key is an error, tied weights excepted).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.compress.factorize import FactorizeReport, ModuleFactor
from lorakit.errors import LorakitError
from lorakit.factorized import FACTORIZATION_NAME, LowRankLinear
from lorakit.fileio import atomic_write_bytes
from lorakit.outputs import claim_output_dir

KIND = "factorized model"
DENSE_KIND = "dense model"
FORMAT = 1


def save_factorized(model: nn.Module, tokenizer: Any, out_dir: str | Path, report: FactorizeReport, *,
                    force: bool = False, command: str | None = None, inputs: Sequence[str | Path] = ()) -> Path:
    """Write the factorised `model` (safetensors), its `tokenizer` (None: none) and `factorization.json` (per
    factorised module its rank and shape; the method, the parameter counts and `command`) to `out_dir`, claimed
    as a lorakit "factorized model" output. Returns the directory.

    Raises LorakitError (nothing written) when `out_dir` may not be written (see `claim_output_dir`) or when a
    module of the report is not a `LowRankLinear` in `model`.
    """
    modules = dict(model.named_modules())
    missing = [n for n in report.factorized if not isinstance(modules.get(n), LowRankLinear)]
    if missing:
        raise LorakitError(f"{', '.join(missing)} are not factorised layers of this model; pass the report "
                           "factorize returned for it")
    claim_output_dir(out_dir, kind=KIND, force=force, inputs=inputs)
    out = Path(out_dir).expanduser()
    model.save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    layers = {m.name: {"rank": m.rank, "out_features": m.shape[0], "in_features": m.shape[1],
                       "bias": modules[m.name].up.bias is not None}  # type: ignore[union-attr]
              for m in report.modules if m.rank is not None}
    record = {"format": FORMAT, "method": report.method, "parameters_before": report.parameters_before,
              "parameters_after": report.parameters_after, "command": command, "modules": layers}
    atomic_write_bytes(out / FACTORIZATION_NAME, (json.dumps(record, indent=1) + "\n").encode())
    return out


def factorization_of(model: nn.Module, method: str = "loaded") -> FactorizeReport:
    """A report of the `LowRankLinear` layers `model` holds (a model loaded factorised, then trained), for
    `save_factorized`; the discarded shares are unknown here (nan)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    return FactorizeReport(method, [
        ModuleFactor(n, (m.out_features, m.in_features), m.rank,
                     m.out_features * m.in_features + (m.out_features if m.up.bias is not None else 0),
                     sum(p.numel() for p in m.parameters()), float("nan")) for n, m in layers])


def export_dense(model: nn.Module | str | Path, out_dir: str | Path, *, tokenizer: Any = None,
                 force: bool = False) -> Path:
    """Write a plain transformers checkpoint of a factorised model (a directory `load_model` reads, or the model
    itself) with every `LowRankLinear` multiplied out, W = U·Vᵀ (out, in), into the layer type the architecture
    has there (`nn.Linear`, or GPT-2's `Conv1D` holding Wᵀ). The model passed is left unchanged. Returns the
    directory; raises LorakitError when `out_dir` may not be written or the model has no factorised layer."""
    inputs: list[str | Path] = []
    if isinstance(model, (str, Path)):
        from lorakit.models import load_model

        inputs.append(model)
        model, loaded_tokenizer = load_model(str(model))
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    if not names:
        raise LorakitError("the model has no factorised (LowRankLinear) layers; nothing to export")
    claim_output_dir(out_dir, kind=DENSE_KIND, force=force, inputs=inputs)
    dense = copy.deepcopy(model)
    with torch.device("meta"):
        reference = dict(type(model)(model.config).named_modules())  # the architecture's own layer types
    modules = dict(dense.named_modules())
    for name in names:
        low: LowRankLinear = modules[name]  # type: ignore[assignment]
        parent, _, child = name.rpartition(".")
        setattr(modules[parent] if parent else dense, child, _dense_layer(low, reference.get(name)))
    out = Path(out_dir).expanduser()
    dense.save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _dense_layer(low: LowRankLinear, original: nn.Module | None) -> nn.Module:
    ref = low.up.weight
    with torch.no_grad():
        w = low.dense_weight()  # (out, in)
        bias = low.up.bias
        if original is not None and type(original).__name__ == "Conv1D":
            layer: nn.Module = type(original)(low.out_features, low.in_features)
            layer.to(device=ref.device, dtype=ref.dtype)
            layer.weight.copy_(w.T)  # type: ignore[operator]
            if bias is not None:
                layer.bias.copy_(bias)  # type: ignore[operator]
            else:
                layer.bias.zero_()  # type: ignore[operator]
            return layer
        linear = nn.Linear(low.in_features, low.out_features, bias=bias is not None, device=ref.device,
                           dtype=ref.dtype)
        linear.weight.copy_(w)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear
