"""Injecting LoRA modules into a model: choose targets, build modules, swap them in, freeze the rest.

`inject` validates everything and computes every initialisation before it changes the model, so an error leaves
the model exactly as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from lorakit import dora, quant
from lorakit import init as lora_init
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.layers import LORA_MODULE_TYPES, LoraConv, LoraEmbedding, LoraLinear, LoraModule, grouped_rank_problem
from lorakit.targets import LINEAR_TYPES, Selection, select_modules

log = logging.getLogger(__name__)

DORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *LINEAR_TYPES)  # the layer kinds DoRA adapts


@dataclass
class AdapterState:
    """What `inject` did, kept on the model (`model.lorakit_state`) for saving, merging and reporting."""

    config: LoraConfig
    adapted: list[str]  # the names of the modules carrying LoRA factors
    modules_to_save: list[str]
    principal_init: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)


@dataclass
class InjectionReport:
    """Modules adapted and the trainable share of the model."""

    adapted: list[str]
    modules_to_save: list[str]
    trainable_params: int
    total_params: int
    base_bytes: int = 0  # the base's weights as stored (a quantized base: codes and constants)
    dense_base_bytes: int = 0  # the same weights stored dense (fp32 where quantized)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self) -> str:
        saved = f" + {len(self.modules_to_save)} saved in full" if self.modules_to_save else ""
        stored = (f"; base weights {self.base_bytes / 2**20:.1f} MiB stored quantized, "
                  f"{self.dense_base_bytes / 2**20:.1f} MiB dense") if self.base_bytes != self.dense_base_bytes else ""
        return (f"adapted {len(self.adapted)} modules{saved}; trainable {self.trainable_params:,} of "
                f"{self.total_params:,} parameters ({100 * self.trainable_fraction:.3f}%){stored}")


def adapter_state(model: nn.Module) -> AdapterState:
    """The model's `AdapterState`; raises when the model has no adapters."""
    state = getattr(model, "lorakit_state", None)
    if not isinstance(state, AdapterState):
        raise LorakitError("model has no lorakit adapters; call lorakit.inject(model, config) or load_adapter first")
    return state


def plan(model: nn.Module, config: LoraConfig) -> Selection:
    """Resolve and check the targets of `config` on `model` without changing anything."""
    return _plan(model, config)[0]


def _plan(model: nn.Module, config: LoraConfig) -> tuple[Selection, dict[str, nn.Module]]:
    """`plan`, and the model's modules by name (one walk of the model, shared with `inject`)."""
    modules = dict(model.named_modules())
    if isinstance(getattr(model, "lorakit_state", None), AdapterState) or any(
            isinstance(m, LORA_MODULE_TYPES) for m in modules.values()):
        raise LorakitError("model already has lorakit adapters; load a fresh base model to inject again")
    selection = select_modules(model, config.targets, config.exclude, config.modules_to_save, modules=modules)
    problems = []
    for name in selection.adapted:
        rank = config.rank_for(name)
        fan_in, fan_out = fan_in_out(modules[name])
        if _groups(modules[name]) > 1:
            problems += _grouped_conv_problems(name, modules[name], rank, config)
        elif rank > min(fan_in, fan_out):
            problems.append(f"rank {rank} for {name!r} exceeds min(fan_in, fan_out) = min({fan_in}, {fan_out}); "
                            f"use rank <= {min(fan_in, fan_out)} (rank_pattern can lower it for this module)")
        if config.init == "principal" and isinstance(modules[name], nn.Embedding):
            problems.append(f"init 'principal' is for weight matrices of linear and conv layers; {name!r} is an "
                            "Embedding (exclude it or use init 'standard')")
        if config.dora and quant.is_quantized(getattr(modules[name], "weight", None)):
            kind = quant.kind_of(modules[name].weight)
            problems.append(f"dora over a quantized base is not supported yet; {name!r} is {kind} (set dora false "
                            "or load the base without quantize)")
        if config.dora and not isinstance(modules[name], DORA_TYPES):
            problems.append(f"dora applies to linear and convolution layers; {name!r} is an "
                            f"{type(modules[name]).__name__} (exclude it from the targets or set dora false)")
    if problems:
        raise ConfigError(problems)
    return selection, modules


def _groups(module: nn.Module) -> int:
    return module.groups if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else 1


def _grouped_conv_problems(name: str, module: nn.Module, rank: int, config: LoraConfig) -> list[str]:
    """A grouped convolution takes rank / groups per group (`LoraConv`): rank a multiple of groups, at most the
    group's own fan-in and fan-out per group, and one standard init (a principal init would need an SVD per group)."""
    conv = cast(nn.Conv2d, module)
    groups, kernel = conv.groups, tuple(conv.weight.shape[2:])
    if rank % groups:
        return [grouped_rank_problem(repr(name), rank, groups, conv.in_channels, kernel)]
    problems = []
    fan_in, fan_out = int(conv.weight[0].numel()), conv.out_channels // groups
    if rank // groups > min(fan_in, fan_out):
        problems.append(f"rank {rank} for {name!r} gives each of its {groups} groups rank {rank // groups}, more than "
                        f"min(fan_in, fan_out) = min({fan_in}, {fan_out}) of a group; use rank <= "
                        f"{groups * min(fan_in, fan_out)}")
    if config.init == "principal":
        problems.append(f"init 'principal' takes one SVD of the whole weight; {name!r} is a grouped convolution "
                        f"(groups={groups}), whose update is one block per group: exclude it or use init 'standard'")
    return problems


def fan_in_out(module: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) of an adaptable module, in the ΔW = B @ A layout."""
    w: Tensor = module.weight  # type: ignore[assignment]
    if quant.is_quantized(w):
        fan_out, fan_in = quant.shape(w)
        return fan_in, fan_out
    if isinstance(module, nn.Linear):
        return w.shape[1], w.shape[0]
    if isinstance(module, nn.Embedding):
        return w.shape[0], w.shape[1]
    if isinstance(module, LINEAR_TYPES):  # Conv1D: weight (in, out)
        return w.shape[0], w.shape[1]
    return int(w[0].numel()), w.shape[0]  # convolutions: (out, in, *kernel)


@dataclass
class BuiltAdapter:
    """The LoRA modules `config` asks for, built around `model`'s layers but not yet swapped in: the model is
    unchanged. Their parameters are the one description of what an adapter of this config holds."""

    config: LoraConfig
    selection: Selection
    modules: dict[str, nn.Module]  # the model's modules by name, as they are now
    lora: dict[str, LoraModule]  # the new modules by the name of the layer they will replace

    def parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter the adapter will own once injected, keyed as in `adapter_parameters`."""
        overlay = {**self.modules, **{name: cast(nn.Module, m) for name, m in self.lora.items()}}
        return _owned_parameters(overlay, self.config.bias, self.selection.modules_to_save)


def build_adapter(model: nn.Module, config: LoraConfig) -> BuiltAdapter:
    """Resolve and check `config` on `model` and build its LoRA modules (factors zero), changing nothing."""
    selection, modules = _plan(model, config)
    lora = {name: cast(LoraModule, build_module(modules[name], config, name)) for name in selection.adapted}
    return BuiltAdapter(config, selection, modules, lora)


def inject(model: nn.Module, config: LoraConfig, *, initialize: bool = True,
           built: BuiltAdapter | None = None) -> InjectionReport:
    """Adapt the modules `config` selects, freeze every other parameter, and return a report.

    With `initialize=False` the factors are left at zero and the base weights untouched: the state in which an
    adapter file is loaded. `built`: the result of `build_adapter(model, config)` when the caller already has it.
    Raises `LorakitError`/`ConfigError` before any change when the config does not fit.
    """
    built = built if built is not None else build_adapter(model, config)
    selection, modules = built.selection, built.modules
    generator = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    if initialize:  # every SVD of a principal init runs here, before the model changes
        factors = {name: initial_factors(module, config, generator) for name, module in built.lora.items()}
    # Nothing above touched the model; from here on nothing can fail on user input.
    state = AdapterState(config, selection.adapted, selection.modules_to_save)
    principal = config.init == "principal"
    for name, module in built.lora.items():
        if name in factors:
            a, b = factors[name]
            apply_factors(module, a, b, principal=principal)
            if principal:
                state.principal_init[name] = (a, b)
            if config.dora:  # m = ‖W + s·B A‖: the adapted weight starts equal to the base (the original W)
                with torch.no_grad():
                    getattr(module, dora.MAGNITUDE).copy_(dora.initial_magnitude(module))
        _replace(modules, name, cast(nn.Module, module))
    model.lorakit_state = state  # type: ignore[assignment]
    trainable, params = adapter_parameters(model), list(model.parameters())
    _freeze_all_but(params, trainable)
    report = _report(model, state, trainable, params)
    log.info("%s", report)
    return report


def build_module(base: nn.Module, config: LoraConfig, name: str) -> nn.Module:
    """A LoRA module around `base`, factors zero (call `apply_factors` to initialise)."""
    rank, alpha, scaling = config.rank_for(name), config.alpha_for(name), config.scaling_for(name)
    if isinstance(base, nn.Embedding):
        return LoraEmbedding(base, rank, alpha, scaling)
    if isinstance(base, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoraConv(base, rank, alpha, scaling, config.dropout, dora=config.dora)
    return LoraLinear(base, rank, alpha, scaling, config.dropout, fan_in_fan_out=not isinstance(base, nn.Linear),
                      dora=config.dora)


def initial_factors(module: LoraModule, config: LoraConfig, generator: torch.Generator | None
                    ) -> tuple[Tensor, Tensor]:
    """(A, B) in fp32 for `module` by `config.init`. For `principal` the base weight must then become the residual
    W - scaling · B A (`apply_factors(..., principal=True)`).

    One matrix at a time: stacking same-shape matrices into batched SVDs measured no faster on CPU (SmolLM2, 210
    matrices: 0.592 s one by one, 0.593 s in batches of <= 4 MiB, 0.591 s of <= 8 MiB); the products with W are
    nearly all the time and cost the same either way.
    """
    a0, b0 = module.factors()
    rank, fan_in, fan_out = a0.shape[0], a0.shape[1], b0.shape[0]
    if config.init == "principal":
        return lora_init.principal_factors(module.weight_matrix(), rank, module.scaling, svd_iters=config.svd_iters,
                                           generator=generator)
    if isinstance(module, LoraEmbedding):
        return lora_init.standard(rank, fan_in, fan_out, zero_b=False, generator=generator)
    if config.init == "gaussian":
        return lora_init.gaussian(rank, fan_in, fan_out, generator=generator)
    return lora_init.standard(rank, fan_in, fan_out, generator=generator)


def apply_factors(module: LoraModule, a: Tensor, b: Tensor, *, principal: bool = False) -> None:
    """Write A, B into `module`; for a principal init also turn its base weight W into W - scaling · B A."""
    module.set_factors(a, b)
    if principal:
        subtract_principal(module, a, b)


def subtract_principal(module: LoraModule, a: Tensor, b: Tensor) -> None:
    """W <- W - scaling · B A, the residual base of a principal init. In place for an fp32 weight whose matrix is
    a view of it (no copy of W: one pass over memory instead of three, and no second copy of every adapted weight
    held at once); else computed in fp32 and rounded once to the weight's dtype. `inject` and loading an adapter
    both call this, so a reloaded residual is bit for bit the injected one."""
    with torch.no_grad():
        matrix = module.weight_matrix()  # (fan_out, fan_in)
        a, b = a.to(matrix.device), b.to(matrix.device)
        kind = quant.kind_of(module.weight)
        if kind is not None:  # the residual of the dequantized weight, stored quantized again
            module.weight = quant.quantize_weight(lora_init.residual(matrix, a, b, module.scaling), kind)
        elif matrix.dtype == torch.float32 and matrix.data_ptr() == module.weight.data_ptr():
            matrix.addmm_(b, a, alpha=-module.scaling)
        else:
            module.weight.copy_(module.matrix_to_weight(lora_init.residual(matrix, a, b, module.scaling)))


def mark_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze by ownership: LoRA factors, modules to save, and biases per `bias`."""
    _freeze_all_but(list(model.parameters()), adapter_parameters(model))


def _freeze_all_but(params: list[nn.Parameter], trainable: dict[str, nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter the adapter owns (trained and saved), keyed by its name in `model.state_dict()`."""
    state = adapter_state(model)
    return _owned_parameters(dict(model.named_modules()), state.config.bias, state.modules_to_save)


def _owned_parameters(modules: dict[str, nn.Module], bias: str, modules_to_save: list[str]
                      ) -> dict[str, nn.Parameter]:
    """The adapter's parameters among `modules` (name -> module): LoRA factors found by module type, biases by
    `bias`, and the modules saved in full."""
    out: dict[str, nn.Parameter] = {}
    for name, module in modules.items():
        if not isinstance(module, LORA_MODULE_TYPES):
            continue
        owned = {id(p) for p in module.lora_parameters()}
        for pname, p in module.named_parameters():
            if id(p) in owned:
                out[f"{name}.{pname}"] = p
        own_bias = module._parameters.get("bias") if bias == "lora_only" else None
        if own_bias is not None:
            out[f"{name}.bias"] = own_bias
    if bias == "all":
        for name, module in modules.items():
            own_bias = module._parameters.get("bias")
            if own_bias is not None:
                out[f"{name}.bias" if name else "bias"] = own_bias
    for saved in modules_to_save:
        for pname, p in modules[saved].named_parameters():
            out[f"{saved}.{pname}"] = p
    return out


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What a training step updates: the adapter's parameters when the model has adapters, else every parameter
    that requires grad (full fine-tuning, or a head trained alone)."""
    if isinstance(getattr(model, "lorakit_state", None), AdapterState):
        return adapter_parameters(model)
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def injection_report(model: nn.Module) -> InjectionReport:
    state = adapter_state(model)
    return _report(model, state, adapter_parameters(model), list(model.parameters()))


def _report(model: nn.Module, state: AdapterState, trainable: dict[str, nn.Parameter], params: list[nn.Parameter]
            ) -> InjectionReport:
    adapter = {id(p) for p in trainable.values()}
    base = [p for p in params if id(p) not in adapter]
    stored = sum(quant.stored_bytes(p) for p in base)
    dense = sum(quant.numel(p) * 4 if quant.is_quantized(p) else p.numel() * p.element_size() for p in base)
    return InjectionReport(list(state.adapted), list(state.modules_to_save),
                           sum(p.numel() for p in trainable.values()), sum(quant.numel(p) for p in params),
                           stored, dense)


def _replace(modules: dict[str, nn.Module], name: str, module: nn.Module) -> None:
    """Put `module` in place of `name`; `modules` is the model's `named_modules()` by name, the model under ''."""
    parent_name, _, child = name.rpartition(".")
    setattr(modules[parent_name], child, module)
