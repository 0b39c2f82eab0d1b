"""Many adapters in one batch: each row of a batch runs through its own LoRA adapter, in one forward.

    bank = AdapterBank.from_adapters(model, {"math": "adapters/math", "chat": "adapters/chat"})
    with per_row_adapters(model, bank, ["math", "chat", None]):  # one name per row; None: the base model alone
        logits = model(input_ids=ids).logits                       # ids: (3, T)

The bank stacks each adapted module's factors once, one slot per adapter, with the scaling folded into B:

    A: (slots, rank, in)        Bᵀ · scaling: (slots, rank, out)

(B is kept transposed so that the second product streams it row by row: at one token per row that product takes
half the time on a CPU core that it takes through a transposed view of B (slots, out, rank).)

Slot 0 is all zeros (the `None` rows). Adapters of lower rank are zero-padded to the module's largest rank, and an
adapter that does not adapt a module has zeros there; both are exact, since zero rows of A meet zero columns of B.
Inside `per_row_adapters` every `LoraLinear` computes, for the rows n of the batch and their slots s(n),

    h = bmm(x, A[s]ᵀ)                  (N, T, rank)
    y = baddbmm(base(x), h, Bᵀ[s])     (N, T, out), in place on base(x)

the batched gather-matmul of Punica and S-LoRA (Chen et al. 2023; Sheng et al. 2023): two batched products per
module whatever the mix of adapters, and no loop over adapters. Which slot each row uses is resolved once per block
for every module: when the rows name consecutive slots (each row its own adapter, in bank order) the stacks are
sliced, which copies nothing; otherwise each forward gathers its rows' factors (`index_select`). One module's
gathered copy is small enough to stay in cache for the product that reads it next, so a decode step costs 1-5% more
than with slices (benchmarks/bench_mixed_batch.py), and unlike gathering every module once per block this holds no
second copy of the bank and makes entering a block free. Either way a forward reads every row's factors once. At 32
rows of one token with rank 16 on SmolLM2-135M that is 625 MB, more than the base weights (540 MB); the base
products at 32 rows are compute-bound and the per-row ones memory-bound, so a mixed decode step costs about 1.2x
a shared adapter's on a CPU, where a prefill (64 tokens per row re-use each row's factors) costs about the same.

DoRA adapters (`lorakit.dora`) join a bank too, which PEFT refuses: each output feature of a DoRA row is rescaled by
m / ‖W + s·B A‖, a vector per slot computed once when the bank is built (the factors are frozen there), so

    y = (base(x) − b + h Bᵀ[s]) ⊙ scale[s] + b        (scale 1 for the base rows and for plain LoRA slots)

costs one more pass over the module's output in a batch that holds a DoRA adapter.

The bank is for inference: it holds copies of the factors (no gradient reaches an adapter) and applies no dropout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit import dora
from lorakit.errors import ConfigError, LorakitError, MergeStateError, did_you_mean
from lorakit.inject import AdapterState
from lorakit.io import read_adapter
from lorakit.layers import LoraLinear, lora_modules
from lorakit.peft_format import CONFIG_NAME, config_from_peft, from_peft_key

# module name -> (A (rank, in), B (out, rank), scaling), or with DoRA's magnitude m (out,) as a fourth element: one
# adapter's linear factors, as the bank takes them.
ModuleFactors = tuple[Tensor, Tensor, float] | tuple[Tensor, Tensor, float, Tensor]
Factors = Mapping[str, ModuleFactors]
# An adapter directory, a model carrying lorakit adapters (its factors are copied), or the factors themselves.
AdapterSource = str | os.PathLike | nn.Module | Factors


@dataclass(frozen=True)
class AdapterBank:
    """The factors of several adapters stacked per module, for `per_row_adapters`.

    names: the adapters, in slot order (slot i + 1 holds names[i]; slot 0 is zeros, "no adapter").
    stacks: module name -> (A (slots, rank, in), Bᵀ · scaling (slots, rank, out)), on the module's device and in
        its factors' dtype; `rank` is the largest rank any adapter has at that module.
    row_scales: module name -> DoRA's m / ‖W + s·B A‖ per slot (slots, out), ones for slots without DoRA; only
        for modules where some adapter of the bank is a DoRA adapter.
    """

    names: tuple[str, ...]
    stacks: dict[str, tuple[Tensor, Tensor]]
    row_scales: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_adapters(cls, model: nn.Module, adapters: Mapping[str, AdapterSource]) -> AdapterBank:
        """Stack `adapters` (name -> source, see `AdapterSource`) for the LoRA modules of `model`.

        `model` must carry lorakit LoRA modules (from `inject` or `load_adapter`) at every module an adapter
        adapts; its own adapter plays no part in the bank. Raises `LorakitError` naming the adapter and the module
        for anything that does not fit: a module the model has not adapted, a shape the module cannot take, an
        adapter that changes more than linear factors (embeddings, biases, saved modules, a principal residual).
        """
        modules = linear_lora_modules(model)
        if not adapters:
            raise LorakitError("AdapterBank.from_adapters needs at least one adapter, got none")
        loaded: dict[str, dict[str, ModuleFactors]] = {}
        problems: list[str] = []
        for name, source in adapters.items():
            if not isinstance(name, str) or not name:
                problems.append(f"adapter names must be non-empty strings, got {name!r}")
                continue
            loaded[name] = adapter_factors(source, name)
            problems += _fit_problems(name, loaded[name], modules)
        if problems:
            raise ConfigError(problems)
        stacks: dict[str, tuple[Tensor, Tensor]] = {}
        row_scales: dict[str, Tensor] = {}
        for module_name, module in modules.items():
            present = [(slot, f[module_name]) for slot, f in enumerate(loaded.values(), 1) if module_name in f]
            if present:
                stacks[module_name] = _stack(module, len(loaded) + 1, present)
                scales = _row_scales(module, len(loaded) + 1, present)
                if scales is not None:
                    row_scales[module_name] = scales
        return cls(tuple(loaded), stacks, row_scales)

    def slot(self, name: str | None) -> int:
        """The slot of adapter `name` (0 for None, the base model alone)."""
        if name is None:
            return 0
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise LorakitError(f"no adapter {name!r} in the bank{did_you_mean(str(name), self.names)}; "
                               f"it holds {', '.join(map(repr, self.names))}") from None


def _stack(module: LoraLinear, slots: int, present: list[tuple[int, ModuleFactors]]) -> tuple[Tensor, Tensor]:
    """(A (slots, rank, in), Bᵀ · scaling (slots, rank, out)) for one module, zeros where an adapter is absent."""
    rank = max(factors[0].shape[0] for _, factors in present)
    factor = module.lora_A.weight
    like: dict[str, Any] = {"device": factor.device, "dtype": factor.dtype}
    a_stack = torch.zeros(slots, rank, module.in_features, **like)
    bt_stack = torch.zeros(slots, rank, module.out_features, **like)
    for slot, (a, b, scaling, *_) in present:
        r = a.shape[0]
        a_stack[slot, :r] = a.detach()
        bt_stack[slot, :r] = b.detach().T.float() * scaling  # scaled in fp32, then stored in the factors' dtype
    return a_stack, bt_stack


def _row_scales(module: LoraLinear, slots: int, present: list[tuple[int, ModuleFactors]]) -> Tensor | None:
    """DoRA's m / ‖W + s·B A‖ per slot (slots, out) against the module's base weight, or None when no adapter
    here is a DoRA adapter."""
    if all(len(factors) == 3 for _, factors in present):
        return None
    scales = torch.ones(slots, module.out_features, device=module.weight.device, dtype=module.weight.dtype)
    weight = module.weight_matrix().detach()
    for slot, (a, b, scaling, *magnitude) in present:
        if magnitude:
            norms = dora.row_norms(weight, a.to(weight.device), b.to(weight.device), scaling)
            scales[slot] = (magnitude[0].detach().float().view(-1).to(weight.device) / norms).to(scales.dtype)
    return scales


def linear_lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoRA modules by name; raises unless there is at least one and all are `LoraLinear`."""
    found = lora_modules(model)
    if not found:
        raise LorakitError("model has no lorakit LoRA modules; load one of the adapters first "
                           "(lorakit.load_adapter(model, path)) or inject(model, config, initialize=False)")
    others = [f"{name!r} ({type(m).__name__})" for name, m in found if not isinstance(m, LoraLinear)]
    if others:
        raise LorakitError("per-row adapters support LoRA on linear layers only; this model also adapts "
                           + ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else ""))
    state = getattr(model, "lorakit_state", None)
    if isinstance(state, AdapterState) and state.config.init == "principal":
        raise LorakitError("this model's base weights are a principal (PiSSA) adapter's residual, not the base; "
                           "load a plain adapter (or inject with initialize=False) into a fresh base model")
    return {name: m for name, m in found if isinstance(m, LoraLinear)}


# ------------------------------------------------------------------------------------------- reading adapters


def adapter_factors(source: AdapterSource, name: str) -> dict[str, ModuleFactors]:
    """The linear factors of one adapter as module name -> (A (rank, in), B (out, rank), scaling), with DoRA's
    magnitude m (out,) as a fourth element for a DoRA adapter.

    Raises `LorakitError` naming `name` for an adapter that changes more than linear LoRA factors, and
    `TypeError` for a source of another kind.
    """
    if isinstance(source, (str, os.PathLike)):
        return _factors_from_dir(Path(source), name)
    if isinstance(source, nn.Module):
        return _factors_from_model(source, name)
    if isinstance(source, Mapping):
        out: dict[str, ModuleFactors] = {}
        for module_name, value in source.items():
            if (not isinstance(value, tuple) or len(value) not in (3, 4)
                    or not all(isinstance(t, Tensor) for t in value[:2] + value[3:])
                    or not isinstance(value[2], (int, float))):
                raise TypeError(f"adapter {name!r}: factors of {module_name!r} must be a tuple "
                                f"(A (rank, in), B (out, rank), scaling[, DoRA magnitude (out,)]), got "
                                f"{type(value).__name__}")
            out[module_name] = (value[0], value[1], float(value[2]), *value[3:])  # type: ignore[assignment]
        return out
    raise TypeError(f"adapter {name!r}: expected an adapter directory, a model with lorakit adapters or a mapping "
                    f"module -> (A, B, scaling), got {type(source).__name__}")


def _factors_from_dir(path: Path, name: str) -> dict[str, ModuleFactors]:
    raw_config, tensors, _ = read_adapter(path)
    config = config_from_peft(raw_config, str(path / CONFIG_NAME))
    problems = _unsupported(name, config.init, config.modules_to_save)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        module_name, _, leaf = from_peft_key(key).removesuffix(".weight").rpartition(".")
        if leaf == dora.MAGNITUDE and value.dim() == 1:
            pairs.setdefault(module_name, {})[leaf] = value
            continue
        if leaf not in ("lora_A", "lora_B") or value.dim() != 2:
            problems.append(f"adapter {name!r}: {key!r} is not a linear LoRA factor; a bank takes only those "
                            "(no embeddings, convolutions, biases or saved modules)")
            continue
        pairs.setdefault(module_name, {})[leaf] = value
    out: dict[str, ModuleFactors] = {}
    for module_name, pair in pairs.items():
        magnitude = pair.pop(dora.MAGNITUDE, None)
        if set(pair) != {"lora_A", "lora_B"}:
            problems.append(f"adapter {name!r}: {module_name!r} has {', '.join(pair)} but not both lora_A and lora_B")
            continue
        a, b = pair["lora_A"], pair["lora_B"]
        if a.shape[0] != config.rank_for(module_name):  # the scaling alpha / rank needs the file's rank
            problems.append(f"adapter {name!r}: {module_name!r} has rank {a.shape[0]} but its config says "
                            f"{config.rank_for(module_name)}")
        scaling = config.scaling_for(module_name)
        out[module_name] = (a, b, scaling) if magnitude is None else (a, b, scaling, magnitude)
    if problems:
        raise ConfigError(problems)
    return out


def _factors_from_model(model: nn.Module, name: str) -> dict[str, ModuleFactors]:
    state = getattr(model, "lorakit_state", None)
    if not isinstance(state, AdapterState):
        raise LorakitError(f"adapter {name!r}: the model given has no lorakit adapters")
    problems = _unsupported(name, state.config.init, state.modules_to_save)
    if state.config.bias != "none":
        problems.append(f"adapter {name!r} trains biases (bias={state.config.bias!r}); a bank holds only factors")
    out: dict[str, ModuleFactors] = {}
    for module_name, module in lora_modules(model):
        if not isinstance(module, LoraLinear):
            problems.append(f"adapter {name!r}: {module_name!r} is a {type(module).__name__}; a bank takes linear "
                            "layers only")
            continue
        a, b = module.factors()
        magnitude = module._parameters.get(dora.MAGNITUDE)
        out[module_name] = (a, b, module.scaling) if magnitude is None else (a, b, module.scaling, magnitude)
    if problems:
        raise ConfigError(problems)
    return out


def _unsupported(name: str, init: str, modules_to_save: list[str]) -> list[str]:
    problems = []
    if init == "principal":
        problems.append(f"adapter {name!r} is a principal (PiSSA) adapter, trained on a residual base; save it with "
                        "save_adapter(..., convert_principal=True) to use it with the plain base")
    if modules_to_save:
        problems.append(f"adapter {name!r} saves whole modules ({', '.join(modules_to_save)}), which cannot differ "
                        "per row")
    return problems


def _fit_problems(name: str, factors: Mapping[str, ModuleFactors],
                  modules: dict[str, LoraLinear]) -> list[str]:
    if not factors:
        return [f"adapter {name!r} has no LoRA factors"]
    missing = [m for m in factors if m not in modules]
    problems = []
    if missing:
        problems.append(f"adapter {name!r} adapts {len(missing)} module(s) that have no LoRA module in this model, "
                        f"e.g. {missing[0]!r}{did_you_mean(missing[0], modules)}; inject the model with targets "
                        "that cover every adapter's modules")
    for module_name, (a, b, _, *magnitude) in factors.items():
        module = modules.get(module_name)
        if module is None:
            continue
        if (a.dim() != 2 or b.dim() != 2 or a.shape[1] != module.in_features
                or b.shape[0] != module.out_features or a.shape[0] != b.shape[1]):
            problems.append(f"adapter {name!r}: {module_name!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; this "
                            f"model's module takes A (rank, {module.in_features}) and B ({module.out_features}, rank)")
        elif magnitude and magnitude[0].numel() != module.out_features:
            problems.append(f"adapter {name!r}: {module_name!r} has a DoRA magnitude of {magnitude[0].numel()} "
                            f"entries; this model's module has {module.out_features} output features")
    return problems


# ---------------------------------------------------------------------------------------------- the forward


class _RowForward:
    """One module's part of a `per_row_adapters` block: its factors for the block's rows (see the module docstring).

    a, bt: (slots, rank, in) and (slots, rank, out); None where no adapter of the bank adapts the module.
    scale: DoRA's row scales (slots, out), or None where no DoRA adapter of the bank adapts the module.
    index: the slot of each of the `rows` row names, or None when a and bt are already one slot per row (slices).
    """

    __slots__ = ("a", "bt", "scale", "index", "rows")

    def __init__(self, a: Tensor | None, bt: Tensor | None, index: Tensor | None, rows: int,
                 scale: Tensor | None = None):
        self.a, self.bt, self.scale, self.index, self.rows = a, bt, scale, index, rows

    def __call__(self, module: LoraLinear, x: Tensor) -> Tensor:
        if module.merged:
            raise MergeStateError("adapters are merged into the base weights; unmerge before per-row adapters")
        out = module.base_forward(x)
        a, bt = self.a, self.bt
        if a is None or bt is None or module.strength == 0.0:
            return out
        n = self.rows
        if x.dim() != 3 or x.shape[0] % n:
            raise LorakitError(
                f"per_row_adapters got {n} row names but {module.__class__.__name__} saw input {tuple(x.shape)}; "
                "give one name per batch row of a (batch, seq, features) input (a batch k times as long is read as "
                "each name repeated k times, as generate expands it for num_beams / num_return_sequences)")
        scale = self.scale
        if self.index is not None:
            a, bt = a.index_select(0, self.index), bt.index_select(0, self.index)  # (N, rank, in), (N, rank, out)
            scale = scale.index_select(0, self.index) if scale is not None else None
        if scale is not None:
            return _dora_rows(module, out, x, n, a, bt, scale)
        # A batch that generate expanded k-fold (repeat_interleave) keeps each name's rows together, so
        # (k·N, T, in) -> (N, k·T, in) lines the rows up with the N row names without repeating any factors.
        h = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(a.dtype), a.transpose(1, 2))  # (N, k·T, rank)
        if out.dtype != bt.dtype:  # a low-precision base under fp32 factors
            return out + (torch.bmm(h, bt) * module.strength).view(out.shape).to(out.dtype)
        # In place: base_forward's output is ours, and its backward does not need it.
        out.view(n, -1, out.shape[-1]).baddbmm_(h, bt, alpha=module.strength)  # (N, k·T, out)
        return out


def _dora_rows(module: LoraLinear, out: Tensor, x: Tensor, n: int, a: Tensor, bt: Tensor, scale: Tensor) -> Tensor:
    """(base(x) − b + h Bᵀ) ⊙ scale + b per row, for a bank with DoRA adapters (scale (N, out), ones for rows
    without DoRA)."""
    bias = module.bias
    rows = out.float().view(n, -1, out.shape[-1])  # (N, k·T, out), a copy unless out is fp32
    if bias is not None:
        rows = rows - bias.float()
    h = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(a.dtype), a.transpose(1, 2))  # (N, k·T, rank)
    rows = rows + torch.bmm(h, bt).float() * module.strength
    rows = rows * scale.float().unsqueeze(1)
    if bias is not None:
        rows = rows + bias.float()
    return rows.view(out.shape).to(out.dtype)


@contextmanager
def per_row_adapters(model: nn.Module, bank: AdapterBank, names: Sequence[str | None]) -> Iterator[None]:
    """Inside the block, row n of every batch `model` runs with adapter `names[n]` of `bank` (None: no adapter).

    One name per batch row; a batch k times as long (generate with `num_beams` / `num_return_sequences`, which
    repeats each row k times in place) gives each name to its k rows. The model's own adapter is not applied to
    any row in the block; LoRA modules that no adapter of the bank adapts run the base layer alone. Rows are
    resolved once here for every module: consecutive slots are slices of the bank; for any other mix each forward
    gathers its rows' factors.

    Raises `LorakitError` for an unknown name, names that are not a list, a bank that does not fit the model, a
    model in training mode or a block already active; `MergeStateError` while the adapters are merged.
    """
    modules = linear_lora_modules(model)
    if any(m.merged for m in modules.values()):
        raise MergeStateError("adapters are merged into the base weights; unmerge before per-row adapters")
    if model.training:
        raise LorakitError("per-row adapters are for inference (the bank holds copies of the factors and applies no "
                           "dropout); call model.eval() first")
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise LorakitError(f"names must be a non-empty list with one adapter name (or None) per batch row, "
                           f"got {names!r}")
    slots = [bank.slot(name) for name in names]
    problems = [f"the bank has {name!r} but the model has no LoRA module there" for name in bank.stacks
                if name not in modules]
    problems += [f"{name!r}: the bank holds factors for in={a.shape[2]}, out={bt.shape[2]} on {a.device}; the "
                 f"model's module has in={modules[name].in_features}, out={modules[name].out_features} on "
                 f"{modules[name].weight.device}" for name, (a, bt) in bank.stacks.items()
                 if name in modules and (a.shape[2], bt.shape[2], a.device) != (
                     modules[name].in_features, modules[name].out_features, modules[name].weight.device)]
    if problems:
        raise LorakitError("this bank does not fit the model: " + "; ".join(problems))
    if any(m._per_row is not None for m in modules.values()):
        raise LorakitError("per_row_adapters is already active on this model; blocks cannot nest")
    n, start = len(slots), slots[0]
    consecutive = slots == list(range(start, start + n))
    indices: dict[torch.device, Tensor] = {}  # one index tensor per device, shared by the modules there
    forwards = {}
    for name in modules:
        stack, scale = bank.stacks.get(name), bank.row_scales.get(name)
        if stack is None:
            forwards[name] = _RowForward(None, None, None, n)
        elif consecutive:
            forwards[name] = _RowForward(stack[0].narrow(0, start, n), stack[1].narrow(0, start, n), None, n,
                                         scale.narrow(0, start, n) if scale is not None else None)
        else:
            device = stack[0].device
            index = indices.setdefault(device, torch.tensor(slots, device=device))
            forwards[name] = _RowForward(stack[0], stack[1], index, n, scale)
    for name, module in modules.items():
        module._per_row = forwards[name]
    try:
        yield
    finally:
        for module in modules.values():
            del module._per_row  # back to the class default, None
