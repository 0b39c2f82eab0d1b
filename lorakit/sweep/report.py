"""What a sweep writes: each finished point's result beside its run (`sweep-point.json`), and the sweep's table for
tools (`sweep.json`), for people (`sweep.md`) and its Pareto plot (`pareto.png`), all rewritten after each point.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_bytes
from lorakit.sweep.pareto import PlotPoint, pareto_front, plot_pareto
from lorakit.sweep.plan import SweepPlan, SweepPoint, comparable_config, fingerprint

log = logging.getLogger(__name__)
POINT_FILE = "sweep-point.json"
TABLE_JSON, TABLE_MD, PLOT = "sweep.json", "sweep.md", "pareto.png"
# The two costs a point's metric is weighed against, as (sweep.json field, the table's word).
COSTS = (("trainable_params", "params"), ("train_seconds", "time"))


def write_point_result(point: SweepPoint, summary: dict[str, Any], resumed: bool) -> None:
    """Mark `point` finished: its summary (`TrainSummary.as_json()`) and command, written atomically in its run
    directory; a point with this file is not trained again."""
    entry = {"point": point.name, "config": config_fingerprint(point), "command": point.command, "resumed": resumed,
             "summary": summary}
    atomic_write_bytes(point.run_dir / POINT_FILE, (json.dumps(_finite(entry), indent=2) + "\n").encode(),
                       what="sweep point result")


def read_point_result(point: SweepPoint) -> dict[str, Any] | None:
    """The result `write_point_result` left for `point`, or None when the point has not finished (or finished
    with another config: it is trained again). Raises LorakitError for a file that is not such a result (nothing
    is retrained over it)."""
    path = point.run_dir / POINT_FILE
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
        ok = entry["point"] == point.name and isinstance(entry["summary"], dict)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise LorakitError(f"{path} is not the result of sweep point {point.name}; delete it to train the point "
                           "again")
    if entry.get("config") != config_fingerprint(point):
        log.warning("%s was written for another config of point %s; the point is trained again", path, point.name)
        return None
    return entry  # type: ignore[no-any-return]


def config_fingerprint(point: SweepPoint) -> str:
    """A hash of the point's whole config: a result or checkpoint counts only for the config that wrote it."""
    return fingerprint(comparable_config(point.config.to_dict()))


def point_rows(plan: SweepPlan, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per point (finished or pending), with the frontiers each finished point is on."""
    rows = [_row(point, results.get(point.name)) for point in plan.points]
    for field, _ in COSTS:
        done = [r for r in rows if r["status"] == "done"]
        front = pareto_front([(r[field], r["value"]) for r in done], greater_is_better=plan.greater_is_better)
        for i in front:
            done[i]["frontier"].append(field)
    return rows


def _row(point: SweepPoint, result: dict[str, Any] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"point": point.name, "settings": point.settings, "status": "pending",
                           "command": point.command, "overrides": point.overrides, "run_dir": str(point.run_dir)}
    if result is None:
        return row
    s = result["summary"]
    return {**row, "status": "done", "metric": s["metric"], "value": s["value"],
            "trainable_params": s["trainable_params"], "total_params": s["total_params"],
            "trainable_pct": 100 * s["trainable_params"] / max(s["total_params"], 1),
            "train_seconds": s["train_seconds"], "steps": s["steps"], "adapter_dir": s["adapter_dir"],
            "resumed": result.get("resumed", False), "warnings": s.get("warnings", []), "frontier": []}


def write_outputs(plan: SweepPlan, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite sweep.json, sweep.md and pareto.png in `plan.out_dir` from the finished points; returns the rows."""
    rows = point_rows(plan, results)
    plot = plot_pareto([PlotPoint(_label(r), r["trainable_params"], r["train_seconds"], r["value"])
                        for r in rows if r["status"] == "done"], plan.out_dir / PLOT, metric=plan.metric,
                       greater_is_better=plan.greater_is_better, title=f"{plan.config_path}: {_grid(plan)}")
    table = {"sweep": plan.identity(), "metric": plan.metric, "greater_is_better": plan.greater_is_better,
             "out_dir": str(plan.out_dir), "plot": str(plot) if plot else None,
             "frontier": {field: [r["point"] for r in _front(rows, field)] for field, _ in COSTS}, "points": rows}
    atomic_write_bytes(plan.out_dir / TABLE_JSON, (json.dumps(_finite(table), indent=2) + "\n").encode(),
                       what="sweep table")
    atomic_write_bytes(plan.out_dir / TABLE_MD, render_markdown(plan, rows, plot is not None).encode(),
                       what="sweep table")
    return rows


def render_markdown(plan: SweepPlan, rows: list[dict[str, Any]], with_plot: bool = False) -> str:
    """The sweep's table: one row per point, the frontiers it is on, then each point's command."""
    better = "higher" if plan.greater_is_better else "lower"
    done = sum(r["status"] == "done" for r in rows)
    lines = [f"# Sweep of {_grid(plan)}", "",
             f"Over `{plan.config_path}`{' with ' + ' '.join(f'`{f}`' for f in plan.fixed) if plan.fixed else ''}; "
             f"{done} of {len(rows)} points finished. {plan.metric}: {better} is better. The frontier column names "
             "the Pareto frontiers the point is on (no other point has a better metric for fewer trainable "
             "parameters, or for less training time).", "", *table_lines(plan.metric, rows)]
    if any(r.get("resumed") for r in rows):
        lines += ["", "(resumed): the point was interrupted and continued from its checkpoint; its train seconds "
                      "count the continued part only."]
    warnings = [f"- {r['point']}: {w}" for r in rows for w in r.get("warnings", [])]
    if warnings:
        lines += ["", "Warnings:", "", *warnings]
    if with_plot:
        lines += ["", f"![{plan.metric} against trainable parameters and train seconds]({PLOT})"]
    lines += ["", "Commands (each point alone):", ""] + [f"- {r['point']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def table_lines(metric: str, rows: list[dict[str, Any]]) -> list[str]:
    """The markdown table of the points: metric, trainable parameters and share, seconds, steps, frontiers."""
    columns = ["point", metric, "trainable params", "trainable %", "train seconds", "steps", "frontier"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if r["status"] != "done":
            lines.append(f"| {r['point']} | pending |" + " |" * (len(columns) - 2))
            continue
        seconds = f"{r['train_seconds']:.1f}" + (" (resumed)" if r["resumed"] else "")
        fronts = ", ".join(word for field, word in COSTS if field in r["frontier"])
        lines.append(f"| {r['point']} | {_number(r['value'])} | {r['trainable_params']:,} | "
                     f"{r['trainable_pct']:.3f} | {seconds} | {r['steps']} | {fronts} |")
    return lines


def _front(rows: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    on = [r for r in rows if field in r.get("frontier", [])]
    return sorted(on, key=lambda r: r[field])


def _grid(plan: SweepPlan) -> str:
    return ", ".join(f"{a.key} in {{{', '.join(a.values)}}}" for a in plan.axes)


def _label(row: dict[str, Any]) -> str:
    """The plot's label for a point: its values alone (`4`), or key=value pairs when several keys are swept."""
    settings = row["settings"]
    if len(settings) == 1:
        return str(next(iter(settings.values())))
    return " ".join(f"{k.rpartition('.')[2]}={v}" for k, v in settings.items())


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _finite(value: Any) -> Any:
    """`value` for strict JSON: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
