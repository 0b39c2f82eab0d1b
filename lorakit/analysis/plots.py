"""The analysis's figures as PNG bytes, aggregated by module kind and layer to keep their number small.

Drawn on matplotlib `Figure` objects with the Agg canvas directly: no pyplot, so no global backend is set and
nothing opens a window. Each function returns None when the analysis lacks its numbers (no base, no second
adapter).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lorakit.analysis.analyze import Analysis, ModuleAnalysis, ModuleSimilarity

_DPI = 90
# Fixed margins: a layout engine (constrained or tight) measured ~40% of the figures' time.
_HEATMAPS = {"left": 0.17, "right": 0.98, "top": 0.95, "bottom": 0.08, "hspace": 0.45}
_PANELS = {"left": 0.08, "right": 0.98, "top": 0.9, "bottom": 0.13, "wspace": 0.25}


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _grid(items: list[Any], value: Callable[[Any], float | None]) -> tuple[list[str], list[int], np.ndarray]:
    """(kinds, layers, array (kinds, layers) with NaN where a kind has no module in a layer) of `value(item)`."""
    kinds = sorted({i.kind for i in items if i.layer is not None})
    layers = sorted({i.layer for i in items if i.layer is not None})
    grid = np.full((len(kinds), len(layers)), np.nan)
    for item in items:
        v = value(item)
        if item.layer is not None and v is not None:
            grid[kinds.index(item.kind), layers.index(item.layer)] = v
    return kinds, layers, grid


def _heatmap(fig: Figure, position: int, total: int, items: list[Any], value: Callable[[Any], float | None],
             title: str, vmin: float | None = None, vmax: float | None = None) -> None:
    kinds, layers, grid = _grid(items, value)
    ax = fig.add_subplot(total, 1, position)
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", vmin=vmin, vmax=vmax, cmap="viridis")
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    step = max(1, math.ceil(len(layers) / 15))
    ax.set_xticks(range(0, len(layers), step), [str(x) for x in layers[::step]], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)


def ranks_png(analysis: Analysis) -> bytes | None:
    """Stable and effective rank of ΔW, module kind x layer."""
    if not any(m.layer is not None for m in analysis.modules):
        return None
    fig = Figure(figsize=(9, 6), dpi=_DPI)
    fig.subplots_adjust(**_HEATMAPS)
    _heatmap(fig, 1, 2, analysis.modules, lambda m: m.stable_rank, "stable rank ‖ΔW‖_F² / ‖ΔW‖_2²")
    _heatmap(fig, 2, 2, analysis.modules, lambda m: m.effective_rank, "effective rank (Roy & Vetterli 2007)")
    return _png(fig)


def _mean_curve(modules: list[ModuleAnalysis], values: Callable[[ModuleAnalysis], list[float]]) -> np.ndarray:
    width = max(len(values(m)) for m in modules)
    rows = np.full((len(modules), width), np.nan)
    for i, m in enumerate(modules):
        rows[i, :len(values(m))] = values(m)
    return np.nanmean(rows, axis=0)


def spectra_png(analysis: Analysis) -> bytes:
    """σᵢ / σ₁ and the energy at each rank, averaged over layers, one line per module kind."""
    fig = Figure(figsize=(10, 4), dpi=_DPI)
    fig.subplots_adjust(**_PANELS)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for kind in sorted({m.kind for m in analysis.modules}):
        group = [m for m in analysis.modules if m.kind == kind and m.singular_values and m.singular_values[0] > 0]
        if not group:
            continue
        sigma = _mean_curve(group, lambda m: [s / m.singular_values[0] for s in m.singular_values])
        left.plot(range(1, len(sigma) + 1), sigma, marker=".", label=kind)
        share = _mean_curve(group, lambda m: m.energy)
        right.plot(range(1, len(share) + 1), share, marker=".", label=kind)
    left.set(xlabel="i", ylabel="σᵢ / σ₁ (mean over layers)", title="singular values of ΔW")
    right.set(xlabel="k", ylabel="Σ_{i≤k} σᵢ² / Σ σᵢ²", title="energy captured at rank k", ylim=(0, 1.02))
    if right.lines:  # an all-zero update has no curve to label
        right.legend(fontsize=7)
    return _png(fig)


def amplification_png(analysis: Analysis) -> bytes | None:
    """The amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F per layer, one line per module kind (log scale)."""
    rows = [m for m in analysis.modules if m.layer is not None and m.amplification and m.amplification.factor]
    if not rows:
        return None
    fig = Figure(figsize=(9, 4), dpi=_DPI)
    fig.subplots_adjust(**(_PANELS | {"left": 0.12}))  # room for the log-scale tick labels and the y label
    ax = fig.add_subplot(1, 1, 1)
    for kind in sorted({m.kind for m in rows}):
        points = sorted((m.layer or 0, m.amplification.factor or 0.0) for m in rows  # type: ignore[union-attr]
                        if m.kind == kind)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=kind)
    ax.set(xlabel="layer", ylabel="‖ΔW‖_F / ‖UᵀWV‖_F", yscale="log",
           title="amplification factor (Hu et al. 2021, §7.3): U, V the top singular vectors of ΔW")
    ax.legend(fontsize=7)
    return _png(fig)


# §7.2's φ on the A factors (the paper's choice) and on ΔW's output directions U. With B starting at zero and A at
# random, a short run (or LoRA+, which trains B faster) leaves A close to its draw: then the learned subspace shows
# in U, not in A.
_PHI_FIELDS = {"phi_a": ("A", 0), "phi_output": ("ΔW's U", 1)}  # field -> (label, index of its space in dims)


def similarity_png(analysis: Analysis) -> bytes | None:
    """φ at (1, 1) and at the smaller rank, of the A factors and of ΔW's U, module kind x layer (§7.2)."""
    items = [s for s in analysis.similarity if s.layer is not None]
    if not items:
        return None
    k = min(min(len(s.phi_a), len(s.phi_a[0])) for s in items)
    fig = Figure(figsize=(9, 11), dpi=_DPI)
    fig.subplots_adjust(**_HEATMAPS)
    position = 0
    for field, (label, space) in _PHI_FIELDS.items():
        dims = "/".join(str(d) for d in sorted({s.dims[space] for s in items}))
        for i in (1, k):
            position += 1
            _heatmap(fig, position, 4, items, _diagonal(field, i),
                     f"φ({label}₁, {label}₂, {i}, {i}) (random: {i}/d, d = {dims})", 0, 1)
    return _png(fig)


def _diagonal(field: str, i: int) -> Callable[[ModuleSimilarity], float]:
    """φ(i, i) of a module's grid `field`."""
    return lambda s: float(getattr(s, field)[i - 1][i - 1])


def similarity_grid_png(analysis: Analysis) -> bytes | None:
    """φ(i, j) averaged over layers, one panel per module kind, for the A factors (top row of each pair) and for
    ΔW's U (the paper's Figure 3)."""
    if not analysis.similarity:
        return None
    kinds = sorted({s.kind for s in analysis.similarity})
    cols = len(kinds)
    fig = Figure(figsize=(2.4 * cols + 1.2, 5.4), dpi=_DPI)
    fig.subplots_adjust(left=0.06, right=0.9, top=0.84, bottom=0.1, wspace=0.35, hspace=0.6)
    axes, image = [], None
    for row, (field, (label, _)) in enumerate(_PHI_FIELDS.items()):
        for n, kind in enumerate(kinds, 1):
            group: list[ModuleSimilarity] = [s for s in analysis.similarity if s.kind == kind]
            grids = [np.asarray(getattr(s, field)) for s in group]
            rows_i, cols_j = min(g.shape[0] for g in grids), min(g.shape[1] for g in grids)
            mean = np.mean([g[:rows_i, :cols_j] for g in grids], axis=0)
            ax = fig.add_subplot(2, cols, row * cols + n)
            image = ax.imshow(mean, aspect="auto", interpolation="nearest", vmin=0, vmax=1, cmap="viridis",
                              extent=(0.5, cols_j + 0.5, rows_i + 0.5, 0.5))
            ax.set_title(f"{kind}\nφ on {label}", fontsize=7)
            ax.tick_params(labelsize=7)
            if n == 1:
                ax.set_ylabel("i (this adapter)", fontsize=8)
            ax.set_xlabel("j (other)", fontsize=8)
            axes.append(ax)
    if image is not None:
        fig.colorbar(image, ax=axes, label="φ(i, j), mean over layers")
    fig.suptitle("subspace similarity (Hu et al. 2021, §7.2); module kinds in the panel titles", fontsize=10)
    return _png(fig)


PLOTS: dict[str, Callable[[Analysis], bytes | None]] = {
    "ranks.png": ranks_png, "spectra.png": spectra_png, "amplification.png": amplification_png,
    "similarity.png": similarity_png, "similarity_grid.png": similarity_grid_png,
}
