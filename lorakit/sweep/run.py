"""Running a planned sweep: claim its directory, train each point that has not finished, keep the tables current.

A rerun of the same sweep (same config, grid and flags) into the same directory continues it: finished points are
skipped, a point interrupted mid-training continues from its newest checkpoint, the rest train. Another sweep is
refused there unless `force`, which replaces the earlier sweep's points and tables.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.outputs import MARK_NAME, OutputExistsError, claim_output_dir, output_kind
from lorakit.sweep.plan import SweepPlan, SweepPoint, comparable_config
from lorakit.sweep.report import PLOT, TABLE_JSON, TABLE_MD, read_point_result, write_outputs, write_point_result
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.results import check_results_file, record_result, train_record
from lorakit.train.run import RUN_KIND, train_from_config

log = logging.getLogger(__name__)
SWEEP_KIND = "sweep"
Echo = Callable[[str], None]


class SweepPointError(LorakitError):
    """A point's training failed; the points finished before it are kept and a rerun continues from it."""


@dataclass
class SweepResult:
    """The sweep's directory, one row per point (as in sweep.json), and which points this call trained."""

    out_dir: Path
    rows: list[dict[str, Any]]
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def run_sweep(plan: SweepPlan, *, force: bool = False, record: str | Path | None = None, note: str | None = None,
              progress: bool = False, echo: Echo = lambda _: None) -> SweepResult:
    """Train every point of `plan` that has not finished, in order, and write sweep.json, sweep.md and pareto.png
    in `plan.out_dir` (rewritten after each point). `echo` receives one line before each point
    (`[3/7] lora.rank=4: lorakit train ...`); `record` names a results file each finished point is appended to
    (as `lorakit train --record` does), checked before anything trains.

    Raises OutputExistsError when `plan.out_dir` holds anything but this sweep (another sweep: unless `force`),
    and SweepPointError naming the point whose training failed.
    """
    if record is not None:
        check_results_file(record)
    _claim(plan, force)
    results = {p.name: r for p in plan.points if (r := read_point_result(p)) is not None}
    rows = write_outputs(plan, results)  # the plan on disk before the first training: a rerun is compared to it
    outcome = SweepResult(plan.out_dir, rows)
    total = len(plan.points)
    for i, point in enumerate(plan.points, 1):
        if point.name in results:
            echo(f"[{i}/{total}] {point.name}: finished earlier, skipped ({point.run_dir})")
            outcome.skipped.append(point.name)
            continue
        resume = _interrupted(point)
        line = f"[{i}/{total}] {point.name}{' (continuing from its checkpoint)' if resume else ''}: {point.command}"
        log.info("%s", line)
        echo(line)
        try:
            summary = train_from_config(point.config, resume=resume, force=not resume, progress=progress).as_json()
        except LorakitError as e:
            raise SweepPointError(f"point {point.name}: {e} (the {len(results)} finished points are kept; the same "
                                  "command continues the sweep from this point)") from e
        write_point_result(point, summary, resumed=resume)
        results[point.name] = {"summary": summary, "resumed": resume}
        if record is not None:
            record_result(train_record(summary, point.config.data.train, point.command, note), record)
        outcome.rows = write_outputs(plan, results)
        outcome.trained.append(point.name)
    return outcome


def _interrupted(point: SweepPoint) -> bool:
    """True when the point's run directory holds a checkpoint of this very config (a training that was cut
    short); a run of another config there is started over instead."""
    if not list_checkpoints(point.run_dir):
        return False
    try:
        saved = json.loads((point.run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and comparable_config(saved) == comparable_config(point.config.to_dict())


def _claim(plan: SweepPlan, force: bool) -> None:
    """Claim `plan.out_dir` for this sweep: continue the same sweep, refuse another (unless `force`: its points
    and tables are deleted) and anything that is not a sweep."""
    out = plan.out_dir
    earlier = _earlier_sweep(out)
    same = earlier is not None and earlier.get("sweep") == plan.identity()
    held = out.is_dir() and any(p.name != MARK_NAME for p in out.iterdir())
    if output_kind(out) == SWEEP_KIND and held and not same and not force:
        raise OutputExistsError(f"{out} holds another sweep ({_difference(earlier, plan)}); pass --force to replace "
                                "it, or choose another --out")
    claim_output_dir(out, kind=SWEEP_KIND, force=force or same, replace_hint="pass --force to replace it")
    if same or earlier is None:
        return
    for row in earlier.get("points", []):
        run_dir = out / Path(str(row.get("run_dir", ""))).name  # a point's run lies directly in the sweep's
        if row.get("run_dir") and output_kind(run_dir) == RUN_KIND:
            shutil.rmtree(run_dir)
    for name in (TABLE_JSON, TABLE_MD, PLOT):
        (out / name).unlink(missing_ok=True)


def _earlier_sweep(out: Path) -> dict[str, Any] | None:
    """The sweep.json of an earlier sweep in `out`, or None."""
    if output_kind(out) != SWEEP_KIND:
        return None
    try:
        table = json.loads((out / TABLE_JSON).read_text())
    except (OSError, ValueError):
        return None
    return table if isinstance(table, dict) else None


def _difference(earlier: dict[str, Any] | None, plan: SweepPlan) -> str:
    """What differs between the earlier sweep and this one, in words."""
    before = (earlier or {}).get("sweep")
    if not isinstance(before, dict):
        return "its sweep.json is missing or unreadable"
    now = plan.identity()
    parts = []
    if before.get("config") != now["config"]:
        parts.append(f"config {before.get('config')} instead of {now['config']}")
    if before.get("grid") != now["grid"]:
        grid = "; ".join(f"{k}={','.join(v)}" for k, v in (before.get("grid") or {}).items())
        parts.append(f"grid {grid}")
    if before.get("fixed") != now["fixed"]:
        parts.append(f"flags {' '.join(before.get('fixed') or []) or '(none)'}")
    return ", ".join(parts) or "the same flags over a config whose contents have changed since"
