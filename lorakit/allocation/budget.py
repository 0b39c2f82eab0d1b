"""Per-module ranks under a parameter budget: the one allocation rule, a pure function of spectra and costs.

The rule is EVA's rank redistribution (Paischer et al. 2024, "Parameter Efficient Fine-tuning via Explained Variance
Adaptation", arXiv:2410.07170) with a price per rank:

- a module's spectrum is the energy of its directions, largest first: the eigenvalues of its input's second
  moment (the `activations` probe, EVA) or the squared singular values of the loss's gradient with respect to its
  weight summed over a few batches (the `gradients` probe, the matrix LoRA-GA, Wang et al. 2024, arXiv:2407.05000,
  initialises its factors from);
- the gain of component k of module m is the share of m's energy it holds, `e[m, k] / sum(e[m])` (EVA's explained
  variance ratio, which makes modules of different scales comparable);
- every module first gets `min_rank`; the rest of the budget goes to the components with the largest gain per
  parameter, `gain / cost[m]`, one at a time, where a rank of a module with an (out x in) weight costs
  in + out parameters (one row of A, one column of B). Ties go to the lower component index, then to the module
  listed first, so equal spectra and equal costs give every module the same rank;
- the walk stops at the first component that does not fit in what is left of the budget, so a larger budget never
  lowers any module's rank (what stays unspent is less than one rank of the dearest module); components that hold
  no energy are never bought, so an allocation can stay under its budget;
- a module's rank is at most the length of its spectrum (the probes give min(fan_in, fan_out) entries) and at
  most `max_rank`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lorakit.errors import LorakitError


def uniform_budget(costs: Mapping[str, int], rank: int) -> int:
    """The adapter parameters of rank `rank` on every module: rank x sum of the per-rank costs."""
    return rank * sum(costs.values())


def minimum_budget(costs: Mapping[str, int], min_rank: int = 1) -> int:
    """The smallest budget `allocate_ranks` accepts: `min_rank` on every module."""
    return uniform_budget(costs, min_rank)


def energy_shares(spectrum: Tensor) -> Tensor:
    """A spectrum (1-D, non-negative) sorted largest first and divided by its sum, in float64; all zeros when the
    spectrum holds no energy."""
    energy = torch.sort(spectrum.detach().double().flatten(), descending=True).values
    total = energy.sum()
    return energy / total if total > 0 else torch.zeros_like(energy)


def allocate_ranks(spectra: Mapping[str, Tensor], costs: Mapping[str, int], budget: int, *, min_rank: int = 1,
                   max_rank: int | None = None) -> dict[str, int]:
    """Ranks per module, `min_rank` each and the rest of `budget` by largest gain per parameter (see the module
    docstring for the exact rule).

    spectra: module name -> its energy spectrum (1-D, non-negative, any order; its length caps the rank).
    costs: module name -> adapter parameters per rank (fan_in + fan_out), the same names as `spectra`.
    budget: adapter parameters in all (LoRA factors only; heads and biases are not counted).
    Returns module name -> rank in the order of `spectra`; sum(rank x cost) <= budget.
    Raises LorakitError for a budget below `minimum_budget(costs, min_rank)` (the message names it), names that
    differ between spectra and costs, a spectrum shorter than `min_rank`, or bad numbers.
    """
    names = list(spectra)
    _check_inputs(spectra, costs, budget, min_rank, max_rank)
    need = minimum_budget({n: costs[n] for n in names}, min_rank)
    if budget < need:
        raise LorakitError(f"a budget of {budget:,} adapter parameters is below rank {min_rank} on every module: "
                           f"the {len(names)} target modules need at least {need:,}; raise the budget to {need:,} "
                           f"or more")
    candidates: list[tuple[float, int, int, str]] = []  # (-gain per parameter, component, module index, module)
    for index, name in enumerate(names):
        shares = energy_shares(spectra[name])
        cap = len(shares) if max_rank is None else min(len(shares), max_rank)
        candidates += [(-float(shares[k]) / costs[name], k, index, name) for k in range(min_rank, cap)
                       if shares[k] > 0]
    ranks = dict.fromkeys(names, min_rank)
    left = budget - need
    for _, _, _, name in sorted(candidates):
        if costs[name] > left:
            break
        ranks[name] += 1
        left -= costs[name]
    return ranks


def _check_inputs(spectra: Mapping[str, Tensor], costs: Mapping[str, int], budget: int, min_rank: int,
                  max_rank: int | None) -> None:
    problems: list[str] = []
    if not spectra:
        problems.append("no modules to allocate ranks to")
    if set(spectra) != set(costs):
        problems.append(f"spectra and costs name different modules (only in spectra: "
                        f"{sorted(set(spectra) - set(costs))}, only in costs: {sorted(set(costs) - set(spectra))})")
    if type(budget) is not int or budget < 0:
        problems.append(f"budget must be a non-negative int of adapter parameters, got {budget!r}")
    if type(min_rank) is not int or min_rank < 1:
        problems.append(f"min_rank must be a positive int, got {min_rank!r}")
    if max_rank is not None and (type(max_rank) is not int or max_rank < 1):
        problems.append(f"max_rank must be a positive int or None, got {max_rank!r}")
    elif max_rank is not None and type(min_rank) is int and max_rank < min_rank:
        problems.append(f"max_rank {max_rank} is below min_rank {min_rank}")
    for name, cost in costs.items():
        if type(cost) is not int or cost < 1:
            problems.append(f"cost of {name!r} must be a positive int (parameters per rank), got {cost!r}")
    for name, spectrum in spectra.items():
        if spectrum.dim() != 1 or not bool(torch.isfinite(spectrum).all()) or bool((spectrum < 0).any()):
            problems.append(f"spectrum of {name!r} must be a 1-D tensor of finite non-negative energies")
        elif type(min_rank) is int and len(spectrum) < min_rank:
            problems.append(f"{name!r} has {len(spectrum)} directions, fewer than min_rank {min_rank}")
    if problems:
        raise LorakitError("; ".join(problems))
