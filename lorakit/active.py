"""Several adapters active at once on one model, each at its own scale, changeable between forwards.

    bank = AdapterBank.from_adapters(model, {"sst2": "runs/sst2/adapter", "mrpc": "runs/mrpc/adapter"})
    with active_adapters(model, bank, {"sst2": 1.0, "mrpc": 0.5}) as active:
        logits = model(input_ids=ids).logits        # every row: base(x) + Σᵢ scaleᵢ · ΔWᵢ x
        active.set_scale("mrpc", -0.3)               # takes effect on the next forward
        active.scales                                # {"sst2": 1.0, "mrpc": -0.3}

PEFT's multiple active adapters with `LoraLayer.set_scale(adapter, scale)`, built on `AdapterBank`. At block entry
each LoRA module's active slots are flattened once into one wide adapter of rank S·r (S adapters, r the module's
largest rank in the bank):

    A: (S·r, in)        Bᵀ · scaling: (S·r, out)

and every forward computes

    h = x Aᵀ                      (N, S·r)
    h *= scale of each row's adapter (one (S,) tensor per device, shared by all modules, written by set_scale)
    y = base(x) + h Bᵀ            (N, out), one addmm in place on base(x)

so a forward costs two products of rank S·r per module, and changing a scale writes S numbers: no factor is
copied or re-stacked. Unlike `lorakit.arithmetic.combine` nothing is re-factored or written; the price is that
the forward carries the sum of the ranks instead of a combined adapter's rank.

Adapters of the bank that the block does not name play no part; neither does the model's own adapter (put it in the
bank to include it). Like `per_row_adapters`, this is for inference: no dropout, no gradient reaches an adapter.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.bank import AdapterBank, linear_lora_modules
from lorakit.errors import ConfigError, LorakitError, MergeStateError, did_you_mean
from lorakit.layers import LoraLinear


def _scale_problem(name: str, scale: object) -> str | None:
    """Why `scale` cannot be adapter `name`'s scale, or None when it can."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(float(scale)):
        return f"the scale of adapter {name!r} must be a finite number, got {scale!r}"
    return None


class ActiveAdapters:
    """The handle of an `active_adapters` block: the active adapters' names and scales, and `set_scale`.

    names: the active adapters in the order the block named them.
    """

    def __init__(self, bank: AdapterBank, names: tuple[str, ...], scales: dict[str, float],
                 tensors: dict[torch.device, Tensor]):
        self.names = names
        self._bank = bank
        self._scales = scales
        self._tensors = tensors  # device -> (S,) fp32, read by every module's forward on that device
        self._open = True

    @property
    def scales(self) -> dict[str, float]:
        """A copy of the current scales, adapter name -> scale, in the block's order."""
        return dict(self._scales)

    def set_scale(self, name: str, scale: float) -> None:
        """Make `scale` adapter `name`'s scale from the next forward on (0 silences it, negative subtracts it).

        Writes one number per device; the factors are not touched. Raises `LorakitError` for a name the block did
        not make active, a scale that is not a finite number, or a block that has ended.
        """
        if not self._open:
            raise LorakitError("this active_adapters block has ended; set_scale works only inside it")
        if not isinstance(name, str) or name not in self._scales:
            if isinstance(name, str) and name in self._bank.names:
                raise LorakitError(f"adapter {name!r} is in the bank but not active in this block; name it when "
                                   f"entering: active_adapters(model, bank, {{..., {name!r}: 0.0}})")
            raise LorakitError(f"no active adapter {name!r}{did_you_mean(str(name), self.names)}; "
                               f"this block has {', '.join(map(repr, self.names))}")
        problem = _scale_problem(name, scale)
        if problem is not None:
            raise LorakitError(problem)
        value = float(scale)
        self._scales[name] = value
        i = self.names.index(name)
        with torch.no_grad():
            for tensor in self._tensors.values():
                tensor[i] = value

    def __repr__(self) -> str:
        inside = ", ".join(f"{n}={s:g}" for n, s in self._scales.items())
        return f"ActiveAdapters({inside})"


class _ActiveForward:
    """One module's part of an `active_adapters` block (see the module docstring).

    a, bt: the active slots flattened, (S·r, in) and (S·r, out); scale: the block's (S,) scales on this device.
    """

    __slots__ = ("a", "bt", "scale", "slots", "rank")

    def __init__(self, a: Tensor, bt: Tensor, scale: Tensor):
        self.a, self.bt, self.scale = a, bt, scale
        self.slots = scale.shape[0]
        self.rank = a.shape[0] // self.slots

    def __call__(self, module: LoraLinear, x: Tensor) -> Tensor:
        if module.merged:
            raise MergeStateError("adapters are merged into the base weights; unmerge before active_adapters")
        out = module.base_forward(x)
        if module.strength == 0.0:
            return out
        a, bt = self.a, self.bt
        h = F.linear(x.reshape(-1, x.shape[-1]).to(a.dtype), a)  # (N, S·r)
        h.view(-1, self.slots, self.rank).mul_(self.scale[:, None])  # each adapter's r columns times its scale
        if out.dtype != bt.dtype:  # a low-precision base under fp32 factors
            return out + (torch.mm(h, bt) * module.strength).view(out.shape).to(out.dtype)
        # In place: base_forward's output is ours, and its backward does not need it.
        out.view(-1, out.shape[-1]).addmm_(h, bt, alpha=module.strength)  # (N, out)
        return out


@contextmanager
def active_adapters(model: nn.Module, bank: AdapterBank, scales: Mapping[str, float]) -> Iterator[ActiveAdapters]:
    """Inside the block every row of every batch runs through base + Σᵢ scales[i] · ΔWᵢ of `bank`'s adapters.

    scales: adapter name -> scale (a finite number; 1 is the adapter as trained, 0 silences it, negative subtracts
        it). Adapters of the bank not named here are inactive for the whole block; the model's own adapter too.
    Yields an `ActiveAdapters` handle whose `set_scale(name, scale)` changes a scale for the next forward.
    Each module's `strength` (`set_strength`) multiplies the whole sum, as it does the module's own adapter.

    Raises `LorakitError` (every problem with `scales` at once) for an unknown adapter name, a scale that is not a
    finite number, no adapter at all, a bank that does not fit the model, a model in training mode or a block
    (this one or `per_row_adapters`) already active; `MergeStateError` while the adapters are merged.
    """
    modules = linear_lora_modules(model)
    if any(m.merged for m in modules.values()):
        raise MergeStateError("adapters are merged into the base weights; unmerge before active_adapters")
    if model.training:
        raise LorakitError("active_adapters is for inference (the bank holds copies of the factors and applies no "
                           "dropout); call model.eval() first")
    names = _checked_names(bank, scales)
    _check_fit(bank, modules)
    if any(m._per_row is not None for m in modules.values()):
        raise LorakitError("adapters are already active on this model (an active_adapters or per_row_adapters "
                           "block); blocks cannot nest")
    slots = [bank.slot(name) for name in names]
    _refuse_dora(bank, names, slots)
    values = [float(scales[name]) for name in names]
    consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
    tensors: dict[torch.device, Tensor] = {}
    indices: dict[torch.device, Tensor] = {}
    forwards: dict[str, _ActiveForward] = {}
    for module_name, (a_stack, bt_stack) in bank.stacks.items():
        device = a_stack.device
        scale = tensors.setdefault(device, torch.tensor(values, dtype=torch.float32, device=device))
        if consecutive:  # a view: the slots are already side by side in the bank
            a, bt = a_stack.narrow(0, slots[0], len(slots)), bt_stack.narrow(0, slots[0], len(slots))
        else:
            index = indices.setdefault(device, torch.tensor(slots, device=device))
            a, bt = a_stack.index_select(0, index), bt_stack.index_select(0, index)  # (S, r, in), (S, r, out)
        forwards[module_name] = _ActiveForward(a.reshape(-1, a.shape[-1]), bt.reshape(-1, bt.shape[-1]), scale)
    handle = ActiveAdapters(bank, names, dict(zip(names, values, strict=True)), tensors)
    for module_name, module in modules.items():
        # A module no adapter of the bank adapts runs the base layer alone, as under per_row_adapters.
        module._per_row = forwards.get(module_name, _base_only)
    try:
        yield handle
    finally:
        handle._open = False
        for module in modules.values():
            del module._per_row  # back to the class default, None


def _base_only(module: LoraLinear, x: Tensor) -> Tensor:
    if module.merged:
        raise MergeStateError("adapters are merged into the base weights; unmerge before active_adapters")
    return module.base_forward(x)


def _checked_names(bank: AdapterBank, scales: Mapping[str, float]) -> tuple[str, ...]:
    if not isinstance(scales, Mapping):
        raise LorakitError(f"scales must be a mapping adapter name -> scale, e.g. {{{bank.names[0]!r}: 1.0}}, "
                           f"got {type(scales).__name__}")
    if not scales:
        raise LorakitError("active_adapters needs at least one adapter with its scale, got none "
                           "(for the base model alone use lorakit.adapters_disabled(model))")
    problems = []
    for name, scale in scales.items():
        if not isinstance(name, str) or name not in bank.names:
            problems.append(f"no adapter {name!r} in the bank{did_you_mean(str(name), bank.names)}; "
                            f"it holds {', '.join(map(repr, bank.names))}")
            continue
        problem = _scale_problem(name, scale)
        if problem is not None:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    return tuple(scales)


def _refuse_dora(bank: AdapterBank, names: tuple[str, ...], slots: list[int]) -> None:
    """DoRA rescales each output feature of W + s·B A as a whole, so its update does not add to others'."""
    row_scales = bank.row_scales  # m / ‖W + s·B A‖ per slot, DoRA modules only
    dora = {name for scales in row_scales.values() for name, slot in zip(names, slots, strict=True)
            if not bool((scales[slot] == 1).all())}
    if dora:
        raise LorakitError(f"adapter(s) {', '.join(map(repr, sorted(dora)))} are DoRA adapters, whose magnitude "
                           "rescales the whole weight and does not add up with other adapters; serve them with "
                           "per_row_adapters or load_adapter, or leave them out of active_adapters")


def _check_fit(bank: AdapterBank, modules: dict[str, LoraLinear]) -> None:
    """Refuse a bank built for another model: a module this model lacks, or other shapes or device."""
    problems = []
    for name, (a, bt) in bank.stacks.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"the bank has {name!r} but the model has no LoRA module there")
        elif (a.shape[2], bt.shape[2], a.device) != (module.in_features, module.out_features, module.weight.device):
            problems.append(f"{name!r}: the bank holds factors for in={a.shape[2]}, out={bt.shape[2]} on {a.device}; "
                            f"the model's module has in={module.in_features}, out={module.out_features} on "
                            f"{module.weight.device}")
    if problems:
        raise LorakitError("this bank does not fit the model: " + "; ".join(problems))
