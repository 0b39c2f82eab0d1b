"""`lorakit allocate`: from a training config and a budget to per-module ranks, before any training.

Build the model and data exactly as `lorakit train` would (`lorakit.train.run.prepare`, without the adapter),
resolve the config's targets, run one probe on the first batches training would see, and allocate the budget
with `lorakit.allocation.budget.allocate_ranks`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lorakit import gemm
from lorakit.allocation.budget import allocate_ranks, minimum_budget, uniform_budget
from lorakit.allocation.probes import PROBES, activation_spectra, gradient_spectra
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError, did_you_mean
from lorakit.inject import fan_in_out, plan
from lorakit.task import Batch, Features, Task
from lorakit.train.data import batch_indices
from lorakit.train.preflight import resolve_device
from lorakit.train.run import prepare
from lorakit.train.sections import TrainConfig

log = logging.getLogger(__name__)

# How the rank-pattern file sets each module's scaling: `keep` gives each module the alpha that keeps the scaling of
# the config's uniform lora.rank (PEFT EVA's adjust_scaling_factors=True, its default); `per-rank` leaves lora.alpha
# shared, so the scaling becomes alpha / r_m (alpha / sqrt(r_m) with rsLoRA).
SCALING_RULES = ("keep", "per-rank")


def kept_alphas(ranks: Mapping[str, int], *, rank: int, alpha: float, rslora: bool = False) -> dict[str, float]:
    """Each module's alpha such that its scaling equals that of rank `rank` at `alpha`.

    LoRA (Hu et al. 2021, §4.1) scales by alpha / r: alpha_m / r_m = alpha / rank gives alpha_m = alpha · r_m / rank
    (PEFT's EVA, `adjust_scaling_factors`). rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r):
    alpha_m / sqrt(r_m) = alpha / sqrt(rank) gives alpha_m = alpha · sqrt(r_m / rank).
    """
    if rslora:
        return {name: alpha * math.sqrt(r / rank) for name, r in ranks.items()}
    return {name: alpha * r / rank for name, r in ranks.items()}


@dataclass
class Allocation:
    """Ranks chosen for a budget, what they were chosen from, and how the file sets each module's scaling
    (`scaling`, one of SCALING_RULES, relative to the config's `lora_rank`, `lora_alpha` and `rslora`)."""

    ranks: dict[str, int]  # full module name -> rank, in the model's order
    costs: dict[str, int]  # full module name -> adapter parameters per rank (fan_in + fan_out)
    budget: int
    probe: str
    probe_batches: int  # batches the probe ran on
    probe_seconds: float
    like_rank: int | None = None  # the uniform rank the budget was given as, if it was
    spectra: dict[str, Tensor] = field(default_factory=dict, repr=False)
    scaling: str = "per-rank"
    lora_rank: int | None = None  # the config's lora.rank, lora.alpha and lora.rslora (needed by `keep`)
    lora_alpha: float | None = None
    rslora: bool = False

    def __post_init__(self) -> None:
        check_scaling(self.scaling)
        if self.scaling == "keep" and (self.lora_rank is None or self.lora_alpha is None):
            raise LorakitError("scaling 'keep' needs the config's lora_rank and lora_alpha to keep the scaling of")

    @property
    def alphas(self) -> dict[str, float]:
        """Module name -> alpha under `keep` (see `kept_alphas`); empty under `per-rank` (lora.alpha for all)."""
        if self.scaling != "keep":
            return {}
        return kept_alphas(self.ranks, rank=self.lora_rank, alpha=self.lora_alpha,  # type: ignore[arg-type]
                           rslora=self.rslora)

    @property
    def used(self) -> int:
        """Adapter parameters the ranks take (LoRA factors only): at most `budget`."""
        return sum(rank * self.costs[name] for name, rank in self.ranks.items())

    @property
    def uniform_equivalent(self) -> float:
        """The uniform rank with the same parameter count as `used`."""
        return self.used / sum(self.costs.values())


def check_budget_args(budget: int | None, like_rank: int | None) -> None:
    """Exactly one of a budget in adapter parameters and a uniform rank to match, each a positive int; raises
    LorakitError otherwise (before any model loads)."""
    if (budget is None) == (like_rank is None):
        raise LorakitError("give exactly one of a budget in adapter parameters or a uniform rank to match "
                           f"(got budget={budget}, like_rank={like_rank})")
    for what, value in (("the budget", budget), ("the uniform rank to match", like_rank)):
        if value is not None and (type(value) is not int or value < 1):
            raise LorakitError(f"{what} must be a positive int, got {value!r}")


def check_scaling(scaling: str) -> None:
    """`scaling` is one of SCALING_RULES; raises LorakitError naming them otherwise."""
    if scaling not in SCALING_RULES:
        raise LorakitError(f"scaling must be one of {', '.join(SCALING_RULES)}, got {scaling!r}"
                           f"{did_you_mean(str(scaling), SCALING_RULES)}")


def budget_for(costs: dict[str, int], *, budget: int | None, like_rank: int | None) -> int:
    """The budget in adapter parameters: `budget`, or that of uniform rank `like_rank` on the modules of `costs`."""
    check_budget_args(budget, like_rank)
    return uniform_budget(costs, like_rank) if like_rank is not None else int(budget)  # type: ignore[arg-type]


def allocate_from_config(config: TrainConfig, *, budget: int | None = None, like_rank: int | None = None,
                         probe: str = "gradients", probe_batches: int = 8, min_rank: int = 1,
                         max_rank: int | None = None, scaling: str = "keep") -> Allocation:
    """Per-module ranks for the modules `config.lora` targets, under `budget` adapter parameters (or the count of
    uniform rank `like_rank`), from `probe` ("gradients" or "activations") on the first `probe_batches` training
    batches of `config.optim.batch_size` (the batches training starts with, by `config.run.seed`).

    scaling: `keep` (each module's alpha keeps the scaling of config.lora.rank at config.lora.alpha; see
    `kept_alphas`) or `per-rank` (lora.alpha shared, scaling alpha / r_m); what `write_rank_pattern` writes.
    Raises LorakitError for a bad probe name, count or scaling rule, both or neither of budget and like_rank, or a
    budget below rank `min_rank` on every target (naming the smallest budget), the last before any probe runs.
    """
    check_scaling(scaling)
    if probe not in PROBES:
        raise LorakitError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}{did_you_mean(probe, PROBES)}")
    if type(probe_batches) is not int or probe_batches < 1:
        raise LorakitError(f"the number of probe batches must be a positive int, got {probe_batches!r}")
    check_budget_args(budget, like_rank)
    prepared = prepare(without_adapter(config))
    model, task = prepared.model, prepared.task
    names = target_names(model, config.lora, task)
    modules = dict(model.named_modules())
    costs = {name: sum(fan_in_out(modules[name])) for name in names}
    total = budget_for(costs, budget=budget, like_rank=like_rank)
    need = minimum_budget(costs, min_rank)
    if total < need:  # the same check allocate_ranks makes, before the probe's minutes rather than after
        raise LorakitError(f"a budget of {total:,} adapter parameters is below rank {min_rank} on every module: "
                           f"the {len(names)} modules that lora.targets selects need at least {need:,}; raise the "
                           f"budget to {need:,} or more")
    device = resolve_device(config.run.device)
    model.to(device)
    batches = probe_batch_list(task, prepared.train, config, probe_batches, device)
    started = time.perf_counter()
    with gemm.cpu_matmul(config.run.cpu_matmul):
        spectra = _PROBE_FUNCTIONS[probe](model, task.loss, batches, names)
    seconds = time.perf_counter() - started
    log.info("%s probe on %d batches: %.1f s", probe, len(batches), seconds)
    ranks = allocate_ranks(spectra, costs, total, min_rank=min_rank, max_rank=max_rank)
    return Allocation(ranks, costs, total, probe, len(batches), seconds, like_rank, spectra, scaling=scaling,
                      lora_rank=config.lora.rank, lora_alpha=config.lora.alpha, rslora=config.lora.rslora)


_PROBE_FUNCTIONS: dict[str, Callable[..., dict[str, Tensor]]] = {
    "activations": activation_spectra, "gradients": gradient_spectra}


def without_adapter(config: TrainConfig) -> TrainConfig:
    """The config with nothing injected (the probe reads the base model and the new head as training starts)."""
    run = dataclasses.replace(config.run, method="full", activation_checkpointing=False)
    return dataclasses.replace(config, run=run)


def target_names(model: nn.Module, lora: LoraConfig, task: Task) -> list[str]:
    """The modules `inject` would adapt (the task's new head is saved in full, never adapted)."""
    heads = [h for h in task.head_modules(model) if h not in lora.modules_to_save]
    if heads:
        lora = LoraConfig.from_dict({**lora.to_dict(), "modules_to_save": lora.modules_to_save + heads})
    return plan(model, lora).adapted


def probe_batch_list(task: Task, features: list[Features], config: TrainConfig, count: int,
                     device: torch.device) -> list[Batch]:
    """The first `count` batches of training's first epoch (same seed, batch size and length grouping), collated
    and on `device`; fewer when the training set is smaller."""
    lengths = [task.length(f) for f in features]
    order = batch_indices(lengths, config.optim.batch_size, seed=config.run.seed, epoch=0,
                          group_by_length=config.run.group_by_length)
    if not order:
        raise LorakitError("the training set is empty: the probe needs at least one batch")
    if len(order) < count:
        log.warning("the training set holds %d batches, fewer than the %d asked for the probe", len(order), count)
    return [{k: v.to(device) for k, v in task.collate([features[i] for i in indices]).items()}
            for indices in order[:count]]
