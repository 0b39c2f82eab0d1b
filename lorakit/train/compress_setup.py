"""What a training run does with a `compress` section: factorise the loaded model, keep LoRA off the factorised
layers, and take the LoRA modules out again when the factorised base is published."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from lorakit import init as lora_init
from lorakit.compress import FactorizeReport, factorize
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, LorakitError
from lorakit.inject import adapter_state, plan
from lorakit.targets import select_modules
from lorakit.task import Features, Task
from lorakit.train.sections import TrainConfig


def compress_model(config: TrainConfig, model: nn.Module, task: Task, train: list[Features]) -> FactorizeReport:
    """Factorise `model`'s linear layers as the `compress` section says, the task's head modules excluded; the
    activation method calibrates on the first calibration_examples training features (without their labels)."""
    c = config.compress
    exclude = head_exclusions(model, task)
    calibration = None
    if c.method == "activation":
        batch = task.collate(train[:c.calibration_examples])
        calibration = {k: v for k, v in batch.items() if k != "labels"}
    try:
        return factorize(model, c.targets, exclude=exclude, rank=c.rank, energy=c.energy, ratio=c.ratio,
                         method=c.method, calibration=calibration, rank_multiple=c.rank_multiple)
    except LorakitError as e:
        raise LorakitError(f"compress: {e}") from None


def head_exclusions(model: nn.Module, task: Task) -> list[str]:
    """The task's head modules and everything inside them: never factorised."""
    heads = task.head_modules(model)
    names = [n for n, _ in model.named_modules() if n]
    return [n for n in names if any(n == h or n.startswith(h + ".") for h in heads)]


def check_disjoint(model: nn.Module, lora: LoraConfig, compress_targets: list[str], exclude: list[str]) -> None:
    """Refuse LoRA targets that compress would factorise, before any SVD runs: LoRA trains on top of the frozen
    factorised model, never on the factors themselves. Targets that do not resolve are left to factorize and
    inject, which report them on the model they act on."""
    modules = dict(model.named_modules())
    try:
        adapted = select_modules(model, lora.targets, lora.exclude, lora.modules_to_save, modules=modules).adapted
        factorised = set(select_modules(model, compress_targets, exclude, [], modules=modules).adapted)
    except ConfigError:
        return
    both = [n for n in adapted if n in factorised]
    if both:
        raise LorakitError(f"lora.targets and compress.targets both match {_some(both)}; LoRA trains "
                           "on top of the factorised model, not on its factors: choose disjoint targets, e.g. "
                           f"{_disjoint_example(modules)}")


def _some(names: list[str], n: int = 3) -> str:
    """The first `n` names and how many more: one readable line."""
    return ", ".join(names[:n]) + (f", and {len(names) - n} more" if len(names) > n else "")


def _disjoint_example(modules: dict[str, nn.Module]) -> str:
    """A pair of disjoint targets for the model's family: factorise the feed-forward layers, adapt attention."""
    leaves = {n.rpartition(".")[2] for n in modules}
    if "query" in leaves:
        return "compress.targets=[intermediate.dense, output.dense] with lora.targets=[query, value]"
    if "q_proj" in leaves:
        return "compress.targets=[gate_proj, up_proj, down_proj] with lora.targets=[q_proj, v_proj]"
    if "c_attn" in leaves:
        return "compress.targets=[c_fc, mlp.c_proj] with lora.targets=[c_attn]"
    return "compress.targets on the feed-forward layers with lora.targets on the attention projections"


def lora_base_layers(model: nn.Module, lora: LoraConfig) -> dict[str, nn.Module]:
    """The layers LoRA will replace on a factorised model, by name (the factors themselves are never LoRA targets:
    `lorakit.targets.select_modules` refuses them)."""
    modules = dict(model.named_modules())
    adapted = plan(model, lora).adapted
    return {n: modules[n] for n in adapted}


@contextmanager
def without_adapters(model: nn.Module, base_layers: dict[str, nn.Module]) -> Iterator[None]:
    """`model` with each LoRA module swapped back for the base layer it replaced, as loading the adapter expects
    the base: for a principal init W itself, not the residual W - s·B₀A₀ trained on. Undone on exit."""
    if not base_layers:
        yield
        return
    state = adapter_state(model)
    modules = dict(model.named_modules())
    adapted = {name: modules[name] for name in base_layers}
    residuals: dict[str, nn.Parameter] = {}
    for name, layer in base_layers.items():
        if name in state.principal_init:
            a0, b0 = state.principal_init[name]
            lora: Any = adapted[name]
            residuals[name] = layer.weight  # type: ignore[assignment]
            w = lora_init.residual(lora.weight_matrix(), a0.to(residuals[name].device), b0.to(residuals[name].device),
                                   -lora.scaling)  # W = residual + s·B₀A₀, in fp32
            layer.weight = nn.Parameter(lora.matrix_to_weight(w).to(residuals[name].dtype), requires_grad=False)
        _put(modules, name, layer)
    try:
        yield
    finally:
        for name, module in adapted.items():
            _put(modules, name, module)
            if name in residuals:
                base_layers[name].weight = residuals[name]


def _put(modules: dict[str, nn.Module], name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(modules[parent], child, module)
