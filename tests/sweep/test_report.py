"""The sweep's tables and each point's result file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_config

from lorakit.errors import LorakitError
from lorakit.sweep.plan import SweepPlan, plan_sweep
from lorakit.sweep.report import (
    POINT_FILE,
    point_rows,
    read_point_result,
    render_markdown,
    write_outputs,
    write_point_result,
)


def _summary(value: float | None, params: int, seconds: float, warnings: list[str] | None = None) -> dict:
    return {"metric": "accuracy", "value": value, "trainable_params": params, "total_params": 10_000,
            "train_seconds": seconds, "steps": 5, "adapter_dir": "x", "warnings": warnings or []}


@pytest.fixture
def plan(tmp_path: Path, sentiment_tsv: tuple[Path, Path]) -> SweepPlan:
    config = write_config(tmp_path / "c.yaml", "minilm", *sentiment_tsv, tmp_path / "run")
    return plan_sweep(config, ["--lora.rank=1,2,4"])


def test_frontiers_are_computed_over_the_finished_points_only(plan: SweepPlan) -> None:
    results = {"lora.rank=1": {"summary": _summary(0.8, 100, 9.0)},
               "lora.rank=4": {"summary": _summary(0.7, 400, 1.0)}}
    rows = point_rows(plan, results)
    assert [r["status"] for r in rows] == ["done", "pending", "done"]
    assert rows[0]["frontier"] == ["trainable_params", "train_seconds"]
    assert rows[2]["frontier"] == ["train_seconds"]  # more parameters for less accuracy, but the fastest
    text = render_markdown(plan, rows)
    assert "| lora.rank=2 | pending |" in text
    assert "| lora.rank=1 | 0.8000 | 100 | 1.000 | 9.0 | 5 | params, time |" in text
    assert "2 of 3 points finished" in text


def test_the_table_shows_each_warning_and_a_missing_metric_as_na(plan: SweepPlan) -> None:
    results = {"lora.rank=1": {"summary": _summary(None, 100, 1.0, ["predicted one class"])}}
    written = write_outputs(plan, results)
    text = (plan.out_dir / "sweep.md").read_text()
    assert "| lora.rank=1 | n/a |" in text and "- lora.rank=1: predicted one class" in text
    assert written[0]["frontier"] == [] and not (plan.out_dir / "pareto.png").exists()
    assert json.loads((plan.out_dir / "sweep.json").read_text())["plot"] is None


def test_a_point_result_reads_back_and_another_config_s_does_not_count(plan: SweepPlan) -> None:
    point = plan.points[0]
    assert read_point_result(point) is None
    write_point_result(point, _summary(0.5, 1, 1.0), resumed=False)
    assert read_point_result(point)["summary"]["value"] == 0.5  # type: ignore[index]
    other = plan.points[1]
    other.run_dir.mkdir(parents=True)
    (other.run_dir / POINT_FILE).write_text((point.run_dir / POINT_FILE).read_text().replace(
        '"lora.rank=1"', '"lora.rank=2"'))  # the right name, the config of another point
    assert read_point_result(other) is None


def test_a_damaged_point_result_is_an_error_naming_the_file(plan: SweepPlan) -> None:
    point = plan.points[0]
    point.run_dir.mkdir(parents=True)
    (point.run_dir / POINT_FILE).write_text("{not json")
    with pytest.raises(LorakitError, match=r"sweep-point\.json is not the result of sweep point lora\.rank=1; "
                                           r"delete it"):
        read_point_result(point)
