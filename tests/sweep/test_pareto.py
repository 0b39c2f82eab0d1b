"""The Pareto frontier on hand-made points, and the plot of it."""

from __future__ import annotations

import math
from pathlib import Path

from lorakit.sweep.pareto import PlotPoint, pareto_front, plot_pareto


def test_the_frontier_keeps_the_points_no_other_beats_on_both_cost_and_metric() -> None:
    #         0           1           2           3           4
    points = [(1, 0.70), (2, 0.80), (3, 0.75), (4, 0.85), (8, 0.85)]
    # 2 is beaten by 1 (cheaper and better); 4 by 3 (same metric, cheaper).
    assert pareto_front(points) == [0, 1, 3]


def test_for_a_loss_lower_values_are_better() -> None:
    points = [(1, 2.0), (2, 1.5), (3, 1.8), (4, 1.0)]
    assert pareto_front(points, greater_is_better=False) == [0, 1, 3]
    assert pareto_front(points, greater_is_better=True) == [0]


def test_the_frontier_is_ordered_by_cost_whatever_the_input_order() -> None:
    assert pareto_front([(4, 0.9), (1, 0.5), (2, 0.7)]) == [1, 2, 0]


def test_equal_points_are_both_on_the_frontier() -> None:
    assert pareto_front([(1, 0.5), (1, 0.5), (2, 0.4)]) == [0, 1]


def test_points_without_a_finite_metric_are_never_on_the_frontier() -> None:
    assert pareto_front([(1, None), (2, math.nan), (3, 0.1), (0.5, math.inf)]) == [2]
    assert pareto_front([]) == []


def test_the_plot_is_a_png_of_the_evaluated_points(tmp_path: Path) -> None:
    points = [PlotPoint("1", 100, 2.0, 0.7), PlotPoint("2", 200, 3.0, 0.8), PlotPoint("4", 400, 3.5, None)]
    path = plot_pareto(points, tmp_path / "pareto.png", metric="accuracy")
    assert path == tmp_path / "pareto.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_plot_without_an_evaluated_point(tmp_path: Path) -> None:
    assert plot_pareto([PlotPoint("1", 100, 2.0, None)], tmp_path / "p.png", metric="f1") is None
    assert not (tmp_path / "p.png").exists()
