"""The results file: one entry per run, `docs/results.json` for tools and `docs/results.md` for people."""

from __future__ import annotations

import fcntl
import json
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from lorakit.train.sections import TrainConfig

COLUMNS = ("task", "data", "model", "method", "metric", "value", "trainable_params", "trainable_pct",
           "train_seconds", "steps")


def record_result(entry: dict[str, Any], json_path: str | Path) -> None:
    """Append `entry` (task, model, method, metric, value, trainable_params, train_seconds, command, ...) to the
    JSON list at `json_path` and rewrite the Markdown table beside it (same name, `.md`). Runs recording into the
    same file at once (two sweeps) take turns: the read-append-write holds an exclusive lock on the directory."""
    json_path = Path(json_path)
    with _directory_lock(json_path.parent if str(json_path.parent) else Path(".")):
        _append(entry, json_path)


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive `flock` on `directory` (no lock file is left behind); blocks until the holder lets go."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _append(entry: dict[str, Any], json_path: Path) -> None:
    entries = read_results(json_path)
    if isinstance(entry.get("data"), str):  # a config's data path is resolved beside it (`recipes/../../shared/..`)
        entry = {**entry, "data": os.path.normpath(entry["data"])}
    entry = {**entry, "recorded": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    entries.append(entry)
    atomic_write_bytes(json_path, (json.dumps(entries, indent=2) + "\n").encode())
    atomic_write_bytes(json_path.with_suffix(".md"), render_markdown(entries).encode())


def results_task(config: TrainConfig) -> str:
    """The task a result is filed under: the run's `data.task`."""
    return config.data.task


def method_label(method: str, init: str, dora: bool, quantize: str | None = None,
                 quantize_init: str = "qlora") -> str:
    """The results table's name for a run's method: `lora`, `dora`, `lora-principal`, `dora-principal`, `full`...;
    on a quantized base `qlora` (NF4), `qlora-int8`, with `-qpissa` / `-loftq` / `-principal` for its init."""
    if method != "lora":
        return method
    if quantize is not None:
        name = "qlora" if quantize == "nf4" else f"qlora-{quantize}"
        if quantize_init != "qlora":
            return f"{name}-{quantize_init}"
        return f"{name}-principal" if init == "principal" else name
    name = "dora" if dora else "lora"
    return f"{name}-principal" if init == "principal" else name


def saved_method_label(saved: dict[str, Any]) -> str | None:
    """`method_label` of a run from its saved config (`config.json`'s sections), None when it names no method."""
    def section(key: str) -> dict[str, Any]:
        value = saved.get(key)
        return value if isinstance(value, dict) else {}

    run, lora, model = section("run"), section("lora"), section("model")
    method = run.get("method")
    if not isinstance(method, str):
        return None
    quantize = model.get("quantize")
    return method_label(method, str(lora.get("init", "standard")), lora.get("dora") is True,
                        quantize if isinstance(quantize, str) else None, str(model.get("quantize_init", "qlora")))


def evaluated_method(model_name: str, adapter: str | Path | None) -> str:
    """What an evaluation scores, for the results table: the training method recorded by the run that wrote the
    adapter or model (`method_label`'s names: read from the run's config.json next to
    it), else `adapter` for an adapter from elsewhere and `base` for a model that no run here wrote."""
    source = Path(adapter) if adapter is not None else Path(model_name)
    run_config = source.parent / "config.json"
    if source.is_dir() and run_config.is_file():
        try:
            saved = json.loads(run_config.read_text())
        except ValueError:
            saved = None
        label = saved_method_label(saved) if isinstance(saved, dict) else None
        if label is not None:
            return label
    return "adapter" if adapter is not None else "base"


def train_record(summary: dict[str, Any], data: str, command: str, note: str | None = None) -> dict[str, Any]:
    """The entry `lorakit train --record` appends: the run's summary (`TrainSummary.as_json()`), its data file,
    the trainable share and the command that produced it."""
    share = 100 * summary["trainable_params"] / max(summary["total_params"], 1)
    return {**summary, "data": data, "trainable_pct": share, "command": command, "note": note}


def check_results_file(json_path: str | Path) -> None:
    """Raise LorakitError unless `json_path` is a results file lorakit can append to (a JSON list), or absent
    with a `.json` name; called before a run so that a bad `--record` costs no training."""
    path = Path(json_path)
    if path.suffix != ".json":
        raise LorakitError(f"--record {json_path}: a results file is a .json file (the table goes beside it as "
                           ".md); e.g. --record docs/results.json")
    read_results(path)


def read_results(json_path: Path) -> list[dict[str, Any]]:
    """The entries of a results file ([] when absent); raises LorakitError when it is not lorakit's JSON list."""
    if not json_path.exists():
        return []
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LorakitError(f"{json_path} is not a readable results file ({e}); choose another --record path") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise LorakitError(f"{json_path} is not a lorakit results file (a JSON list of entries); choose another "
                           "--record path")
    return entries


def render_markdown(entries: list[dict[str, Any]]) -> str:
    """The Markdown page of a results file: per task a table, its rows numbered, and under it each row's command
    with the same number, then the notes (each distinct note once, with the numbers of its rows)."""
    lines = ["# Results", "",
             "Every row was printed by the command under it with the same number; `docs/results.json` holds the same "
             "entries.", ""]
    for task in dict.fromkeys(e["task"] for e in entries):
        lines += [f"## {task}", "", "| # | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        rows = [e for e in entries if e["task"] == task]
        for n, e in enumerate(rows, 1):
            lines.append(f"| {n} | " + " | ".join(_cell(e.get(c)) for c in COLUMNS) + " |")
        lines += ["", "Commands:", ""]
        lines += [f"{n}. {e.get('method')}: `{e.get('command', '')}` ({e.get('recorded', '')}; {e.get('machine', '')})"
                  for n, e in enumerate(rows, 1)]
        notes: dict[str, list[int]] = {}
        for n, e in enumerate(rows, 1):
            if e.get("note"):
                notes.setdefault(e["note"], []).append(n)
        lines += [""] + [f"Note ({_numbers(ns)}): {note}" for note, ns in notes.items()] + ([""] if notes else [])
    return "\n".join(lines) + "\n"


def _numbers(numbers: list[int]) -> str:
    """`5-11, 14` for [5, 6, ..., 11, 14]: the rows a note is about."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
