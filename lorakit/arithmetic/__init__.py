"""Adapter arithmetic: new adapters from weighted combinations of adapters of one base.

    from lorakit.arithmetic import combine
    combine({"a": ("runs/a/adapter", 1.0), "b": ("runs/b/adapter", -0.5)}, "out/ab", method="linear", rank=8)

    combine   linear (weighted sum, best rank-k), cat (exact, ranks add), ties, dare; saved as a PEFT adapter
    inputs    the checks on the adapters (same base, same modules, no PiSSA, equal saved modules)
    methods   the merge rules as functions on one module's updates
"""

from lorakit.arithmetic.combine import COMBINED_KIND, CombineReport, ModuleCombine, combine
from lorakit.arithmetic.inputs import METHODS, TARGET_CHOICES, check_combine_args

__all__ = ["COMBINED_KIND", "METHODS", "TARGET_CHOICES", "CombineReport", "ModuleCombine", "check_combine_args",
           "combine"]
