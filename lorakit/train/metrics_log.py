"""Metrics as JSON lines (and TensorBoard when installed), written by the main process only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per line to `out_dir/metrics.jsonl`. On resume, lines past the checkpoint's step
    (written by the interrupted run after its last checkpoint) are dropped so the log tells one history."""

    def __init__(self, out_dir: Path, *, enabled: bool = True, truncate_after: int = 0):
        self.enabled, self.path, self.board = enabled, Path(out_dir) / METRICS_FILE, None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [line for line in _read_lines(self.path) if json.loads(line).get("step", 0) <= truncate_after]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.board = _tensorboard(Path(out_dir) / "tensorboard")

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.board is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, entry["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line for line in path.read_text().splitlines() if line.strip()]


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _read_lines(Path(out_dir) / METRICS_FILE)]


def plot_loss_curve(history: list[dict[str, Any]], path: str | Path) -> Path | None:
    """A PNG of training loss (and eval loss/metric when present) against step; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; skipping the loss curve")
        return None
    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    evals = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
