"""The Pareto frontier of a sweep (the points no other point beats on both cost and metric) and its plot."""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorakit.fileio import atomic_write_bytes

log = logging.getLogger(__name__)


def pareto_front(points: Sequence[tuple[float, float | None]], *, greater_is_better: bool = True) -> list[int]:
    """Indices of the (cost, value) points on the Pareto frontier, by cost ascending (ties: better value first).

    A point is on the frontier when no other point is at least as good in both, cost (lower is better) and value
    (higher is better, or lower with `greater_is_better=False`, e.g. a loss), and strictly better in one; equal
    points are all on it. A point without a finite value (no evaluation, a NaN) is never on it.
    """
    sign = 1.0 if greater_is_better else -1.0
    scored = [(i, float(c), sign * float(v)) for i, (c, v) in enumerate(points)
              if v is not None and math.isfinite(v) and math.isfinite(c)]
    front = [(i, c, v) for i, c, v in scored
             if not any(c2 <= c and v2 >= v and (c2 < c or v2 > v) for _, c2, v2 in scored)]
    return [i for i, _, _ in sorted(front, key=lambda p: (p[1], -p[2]))]


@dataclass
class PlotPoint:
    """One point of the plot: its label and its coordinates (value None: not evaluated, left out)."""

    label: str
    trainable_params: int
    train_seconds: float
    value: float | None


def plot_pareto(points: Sequence[PlotPoint], path: str | Path, *, metric: str, greater_is_better: bool = True,
                title: str = "") -> Path | None:
    """A PNG of two panels, the metric against trainable parameters (log axis) and against training seconds,
    each with its frontier marked and connected; None without matplotlib or without an evaluated point."""
    shown = [p for p in points if p.value is not None and math.isfinite(p.value)]
    if not shown:
        log.info("no point has a %s value; skipping the Pareto plot", metric)
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; skipping the Pareto plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("trainable parameters", [float(p.trainable_params) for p in shown], True),
              ("train seconds", [p.train_seconds for p in shown], False))
    for ax, (xlabel, xs, log_x) in zip(axes, panels, strict=True):
        ys = [p.value for p in shown]
        front = pareto_front(list(zip(xs, ys, strict=True)), greater_is_better=greater_is_better)
        ax.scatter(xs, ys, color="0.6", zorder=2, label="point")
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "o-", color="C3", zorder=3, label="Pareto frontier")
        for x, y, p in zip(xs, ys, shown, strict=True):
            ax.annotate(p.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if log_x and min(xs) > 0:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} ({'higher' if greater_is_better else 'lower'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue(), what="Pareto plot")
    return Path(path)
