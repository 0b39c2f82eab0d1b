"""Rank allocation under a parameter budget, before training (`lorakit allocate`): probe the base model on a few
batches, give each target module the ranks whose directions add the most energy per parameter, and write a
`rank_pattern` file that a training config reads (docs/allocation.md).

    budget.py        the allocation rule: allocate_ranks (pure: spectra and costs -> ranks)
    probes.py        activation_spectra and gradient_spectra over a model and a few batches
    allocate.py      allocate_from_config: from a training config to an Allocation; kept_alphas
    pattern_file.py  the rank-pattern YAML file and the summary by module kind
"""

from lorakit.allocation.allocate import SCALING_RULES, Allocation, allocate_from_config, kept_alphas
from lorakit.allocation.budget import allocate_ranks, minimum_budget, uniform_budget
from lorakit.allocation.pattern_file import summary_rows, write_rank_pattern
from lorakit.allocation.probes import PROBES, activation_spectra, gradient_spectra

__all__ = ["PROBES", "SCALING_RULES", "Allocation", "activation_spectra", "allocate_from_config", "allocate_ranks",
           "gradient_spectra", "kept_alphas", "minimum_budget", "summary_rows", "uniform_budget",
           "write_rank_pattern"]
