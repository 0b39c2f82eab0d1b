"""The results file: one entry per run, `docs/results.json` for tools and `docs/results.md` for people."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lorakit.fileio import atomic_write_bytes

COLUMNS = ("task", "data", "model", "method", "metric", "value", "trainable_params", "trainable_pct",
           "train_seconds", "steps")


def record_result(entry: dict[str, Any], json_path: str | Path) -> None:
    """Append `entry` (task, model, method, metric, value, trainable_params, train_seconds, command, ...) to the
    JSON list at `json_path` and rewrite the Markdown table beside it (same name, `.md`)."""
    json_path = Path(json_path)
    entries = json.loads(json_path.read_text()) if json_path.is_file() else []
    entry = {**entry, "recorded": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    entries.append(entry)
    atomic_write_bytes(json_path, (json.dumps(entries, indent=2) + "\n").encode())
    atomic_write_bytes(json_path.with_suffix(".md"), render_markdown(entries).encode())


def render_markdown(entries: list[dict[str, Any]]) -> str:
    lines = ["# Results", "",
             "Every row was printed by the command under it; `docs/results.json` holds the same entries.", ""]
    for task in dict.fromkeys(e["task"] for e in entries):
        lines += [f"## {task}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        rows = [e for e in entries if e["task"] == task]
        for e in rows:
            lines.append("| " + " | ".join(_cell(e.get(c)) for c in COLUMNS) + " |")
        lines += ["", "Commands:", ""]
        lines += [f"- {e.get('method')}: `{e.get('command', '')}` ({e.get('recorded', '')}; {e.get('machine', '')})"
                  for e in rows]
        notes = [e["note"] for e in rows if e.get("note")]
        lines += [""] + [f"Note: {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
