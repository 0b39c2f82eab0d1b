"""Sweeps: train the product of several values of config keys, then weigh each point's metric against its cost.

    plan = plan_sweep("recipes/sst2-minilm.yaml", ["--lora.rank=1,2,4,8"])   # every point built and checked
    result = run_sweep(plan, echo=print)     # resumable; writes sweep.json, sweep.md and pareto.png

`lorakit sweep CONFIG --lora.rank=1,2,4,8` is the same from the command line (docs/sweep.md).
"""

from lorakit.sweep.grid import Axis, GridPoint, expand, parse_grid
from lorakit.sweep.pareto import pareto_front, plot_pareto
from lorakit.sweep.plan import SweepPlan, SweepPoint, plan_sweep
from lorakit.sweep.run import SweepPointError, SweepResult, run_sweep

__all__ = ["Axis", "GridPoint", "SweepPlan", "SweepPoint", "SweepPointError", "SweepResult", "expand",
           "pareto_front", "parse_grid", "plan_sweep", "plot_pareto", "run_sweep"]
