"""What the page shows of the runs under the runs directory: each run's config.json, metrics.jsonl, the CLI's
summary line and error from a launch record, and the sweep tables and analysis figures found there."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from lorakit.train.metrics_log import METRICS_FILE
from lorakit.train.results import saved_method_label
from lorakit.ui.launcher import RECORDS, Launcher, read_launch, record_dir
from lorakit.ui.security import UiSettings

FIGURES = (".png", ".svg")
MAX_POINTS = 2000  # per curve sent to the page
_TQDM_TOTAL = re.compile(rb"train:.*?\|\s*(\d+)/(\d+)")


def run_names(settings: UiSettings) -> list[str]:
    """Runs: directories of the runs directory with a run's files, and runs the page launched."""
    root = settings.runs_dir
    names: set[str] = set()
    if root.is_dir():
        names |= {p.name for p in root.iterdir() if p.is_dir() and p.name != RECORDS
                  and ((p / METRICS_FILE).exists() or (p / "config.json").exists())}
        records = root / RECORDS
        if records.is_dir():
            names |= {p.name for p in records.iterdir() if (p / "launch.json").exists()}
    return sorted(names)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file; a line being written (incomplete) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def summary_line(settings: UiSettings, name: str) -> dict[str, Any] | None:
    """The JSON summary `lorakit train` printed last, for a run the page launched."""
    try:
        lines = (record_dir(settings, name) / "stdout.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "metric" in value:
                return value
    return None


def error_line(settings: UiSettings, name: str) -> str | None:
    """The CLI's one-line error (`error: ...`), else the last line of a traceback."""
    try:
        text = (record_dir(settings, name) / "stderr.log").read_text(errors="replace")
    except OSError:
        return None
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1]
    return lines[-1] if lines and "Traceback" in text else None


def status(settings: UiSettings, launcher: Launcher, name: str, info: dict[str, Any] | None) -> str:
    """running, finished, failed, stopped or (a run the page did not start and without an adapter) unknown."""
    out = settings.runs_dir / name
    if info is None:
        return "finished" if (out / "adapter").is_dir() or (out / "model").is_dir() else "unknown"
    if launcher.is_running(name, info):
        return "running"
    record = record_dir(settings, name)
    if (record / "stopped").exists():
        return "stopped"
    try:
        code = int((record / "returncode").read_text())
    except (OSError, ValueError):
        code = None
    if code == 0 or (code is None and summary_line(settings, name) is not None):
        return "finished"
    return "failed"


def run_row(settings: UiSettings, launcher: Launcher, name: str) -> dict[str, Any]:
    """One row of the comparison table."""
    out = settings.runs_dir / name
    info = read_launch(settings, name)
    config = _json(out / "config.json") or {}
    summary = summary_line(settings, name) if info is not None else None
    rows = read_metrics(out / METRICS_FILE)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    section = _sections(config)
    metric, value = _metric(summary, evals, section("data").get("task") or (info or {}).get("task"))
    share = None
    if summary and summary.get("total_params"):
        share = summary["trainable_params"] / summary["total_params"]
    return {
        "name": name, "status": status(settings, launcher, name, info),
        "task": section("data").get("task") or (info or {}).get("task"),
        "model": section("model").get("name") or (info or {}).get("model"),
        "method": saved_method_label(config) or (info or {}).get("method"),
        "rank": section("lora").get("rank") or (info or {}).get("rank"),
        "trainable_share": share, "metric": metric, "value": value,
        "seconds": summary.get("train_seconds") if summary else (train[-1].get("elapsed_s") if train else None),
        "step": train[-1].get("step") if train else 0, "loss": train[-1].get("loss") if train else None,
        "started": (info or {}).get("started"),
    }


def run_detail(settings: UiSettings, launcher: Launcher, name: str) -> dict[str, Any]:
    """Everything the watch view draws: the row, the curves, tokens/s, time left, the error and figures."""
    out = settings.runs_dir / name
    row = run_row(settings, launcher, name)
    rows = read_metrics(out / METRICS_FILE)
    train = [r for r in rows if "loss" in r]
    evals = [{k: v for k, v in r.items() if k == "step" or k.startswith("eval_")} for r in rows
             if any(k.startswith("eval_") for k in r)]
    info = read_launch(settings, name) or {}
    total = info.get("max_steps") or _tqdm_total(settings, name)
    left = None
    if row["status"] == "running" and train and total and train[-1].get("elapsed_s"):
        step, elapsed = train[-1]["step"], train[-1]["elapsed_s"]
        left = max(0.0, elapsed / max(step, 1) * (total - step))
    figures = sorted(settings.shown(p) for p in out.rglob("*") if p.suffix in FIGURES) if out.is_dir() else []
    return row | {
        "train": [{k: r.get(k) for k in ("step", "loss", "lr", "tokens_per_s", "elapsed_s")} for r in thin(train)],
        "evals": evals, "total_steps": total, "seconds_left": left,
        "tokens_per_s": train[-1].get("tokens_per_s") if train else None,
        "error": error_line(settings, name) if row["status"] == "failed" else None,
        "command": info.get("command"), "resume": info.get("resume"), "out_dir": settings.shown(out),
        "figures": figures, "since_start": time.time() - info["started"] if info.get("started") else None,
    }


def thin(rows: list[dict[str, Any]], most: int = MAX_POINTS) -> list[dict[str, Any]]:
    """At most about `most` rows, evenly spaced, always with the last (a curve the page can draw every second)."""
    if len(rows) <= most:
        return rows
    every = -(-len(rows) // most)
    return rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])


def sweeps(settings: UiSettings) -> list[dict[str, Any]]:
    """`lorakit sweep` results (sweep.md, pareto.png) and `lorakit analyze` reports (report.md, figures) found
    anywhere under the runs directory."""
    found: list[dict[str, Any]] = []
    if not settings.runs_dir.is_dir():
        return found
    for marker, kind in (("sweep.md", "sweep"), ("report.md", "analysis")):
        for md in sorted(settings.runs_dir.rglob(marker)):
            if RECORDS in md.parts:
                continue
            figures = sorted(settings.shown(p) for p in md.parent.glob("*") if p.suffix in FIGURES)
            found.append({"kind": kind, "dir": settings.shown(md.parent), "text": md.read_text(errors="replace"),
                          "figures": figures})
    return found


def _sections(config: dict[str, Any]) -> Any:
    def section(name: str) -> dict[str, Any]:
        value = config.get(name)
        return value if isinstance(value, dict) else {}

    return section


def _metric(summary: dict[str, Any] | None, evals: list[dict[str, Any]],
            task: str | None) -> tuple[str | None, float | None]:
    """The run's own metric: the summary's, else its task's primary metric at the last evaluation that has it
    (what `lorakit train` reports)."""
    if summary and summary.get("metric"):
        return summary["metric"], summary.get("value")
    from lorakit.train.tasks import TASKS

    metric = TASKS[task].metric if task in TASKS else None
    if metric is None or not evals:
        return metric, None
    scored = [e for e in evals if f"eval_{metric}" in e]
    return metric, scored[-1][f"eval_{metric}"] if scored else None


def _tqdm_total(settings: UiSettings, name: str) -> int | None:
    path = record_dir(settings, name) / "stderr.log"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read()
    except OSError:
        return None
    matches = _TQDM_TOTAL.findall(tail)
    return int(matches[-1][1]) if matches else None


def _json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
