"""Merging ΔW into the base weights and back, and run-time scaling of the adapters.

`delta_weight` is the single source of truth for ΔW; merge, unmerge, `merged_state_dict` and the PiSSA
conversion all use it. Merging is explicit (never a side effect of `train()`/`eval()`), computed in fp32, checked
for NaN/inf before anything is written, and all-or-nothing across the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lorakit import dora, quant
from lorakit.errors import LorakitError, MergeStateError
from lorakit.inject import adapter_state
from lorakit.layers import LoraModule, lora_modules


def delta_weight(module: LoraModule) -> Tensor:
    """scaling · strength · B @ A in fp32, in the layout of `module.weight`; for a DoRA module W' − W (see
    `lorakit.dora.delta_weight`)."""
    if dora.is_dora(module):
        return dora.delta_weight(module)
    a, b = module.factors()
    return module.matrix_to_weight((b.float() @ a.float()) * (module.scaling * module.strength))


def _deltas(model: nn.Module) -> list[tuple[str, LoraModule, Tensor]]:
    adapter_state(model)
    out = []
    for name, module in lora_modules(model):
        delta = delta_weight(module)
        if not torch.isfinite(delta).all():
            raise LorakitError(f"ΔW of {name!r} has NaN or inf values; nothing was merged "
                               "(check the adapter's training)")
        out.append((name, module, delta))
    return out


def is_merged(model: nn.Module) -> bool:
    return any(m.merged for _, m in lora_modules(model))


def merge(model: nn.Module) -> None:
    """W ← W + ΔW for every adapted module. Raises `MergeStateError` if already merged (W is never given ΔW
    twice) and `LorakitError` if any ΔW is not finite; in both cases no weight changes."""
    if is_merged(model):
        raise MergeStateError("adapters are already merged; merging twice would add ΔW twice (unmerge first)")
    _refuse_quantized(model)
    deltas = _deltas(model)
    for _, module, _ in deltas:  # DoRA's norms of the unmerged weights, which unmerge needs to recover W
        if dora.is_dora(module):
            module.merged_norms = dora.module_row_norms(module)  # type: ignore[attr-defined]
    for _, module, delta in deltas:
        _add_(module.weight, delta)
        module.merged = True


def unmerge(model: nn.Module) -> None:
    """W ← W - ΔW, the inverse of `merge` (to fp32 roundoff). Raises `MergeStateError` if not merged."""
    if not is_merged(model):
        raise MergeStateError("adapters are not merged; nothing to unmerge")
    for _, module, delta in _deltas(model):
        _add_(module.weight, -delta)
        module.merged = False
        if dora.is_dora(module):
            module.merged_norms = None  # type: ignore[attr-defined]


def _refuse_quantized(model: nn.Module) -> None:
    quantized = [name for name, m in lora_modules(model) if quant.is_quantized(m.weight)]
    if quantized:
        raise LorakitError(f"the base of {quantized[0]!r} is quantized, so ΔW cannot be added to it in place; "
                           "choose a merge path with lorakit.merge_quantized(model, path=...) (dequantized, "
                           "requantized or original)")


def _add_(weight: nn.Parameter, delta: Tensor) -> None:
    with torch.no_grad():
        weight.copy_((weight.float() + delta).to(weight.dtype))


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A plain state dict of the model with every ΔW folded in and no lorakit keys: the keys and shapes of the
    original base model, loadable by plain `transformers`. The model itself is left unchanged."""
    _refuse_quantized(model)
    deltas = {} if is_merged(model) else {name: delta for name, _, delta in _deltas(model)}
    lora_names = {name for name, _ in lora_modules(model)}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in lora_names:
            if leaf == "weight" and owner in deltas:
                value = (value.float() + deltas[owner]).to(value.dtype)
            elif leaf != "bias" and leaf != "weight":
                continue
        elif any(owner.startswith(n + ".") for n in lora_names):
            continue  # lora_A / lora_B submodules
        out[key] = value.detach().clone()
    return out


def set_strength(model: nn.Module, strength: float) -> None:
    """Multiply every adapter's contribution by `strength` at inference (0 disables, 1 restores) without merging.
    The adapter's own `scaling` (alpha / rank) is unchanged; the two multiply."""
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not math.isfinite(strength):
        raise LorakitError(f"strength must be a finite number, got {strength!r}")
    if is_merged(model):
        raise MergeStateError("adapters are merged, so their strength is baked into W; unmerge before set_strength")
    adapter_state(model)
    for _, module in lora_modules(model):
        module.strength = float(strength)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block; each adapter's previous strength is restored after."""
    if is_merged(model):
        raise MergeStateError("adapters are merged; unmerge before disabling them")
    previous = [(m, m.strength) for _, m in lora_modules(model)]
    for m, _ in previous:
        m.strength = 0.0
    try:
        yield
    finally:
        for m, s in previous:
            m.strength = s
