"""Checkpoints: adapter, optimizer, scheduler, data position and RNG states, each written atomically.

Layout of a run directory:
    checkpoints/step-00000100/adapter/       the adapter files (PEFT layout)
    checkpoints/step-00000100/trainer.pt     optimizer, scheduler, position, RNG states, metric history
A checkpoint directory appears whole or not at all, so the newest one is always complete and resumable.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_dir
from lorakit.inject import AdapterState, trainable_parameters
from lorakit.io import load_adapter_weights, save_adapter

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer.pt"
ADAPTER_DIR = "adapter"
TRAINABLE_FILE = "trainable.safetensors"  # runs without adapters (full fine-tuning, head only)
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, trainer_state: dict[str, Any]) -> Path:
    """Write checkpoint `step` (adapter + `trainer_state`) atomically and return its directory."""
    path = Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"

    def fill(tmp: Path) -> None:
        save_weights(model, tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)

    atomic_write_dir(path, fill)
    return path


def save_weights(model: nn.Module, directory: Path) -> None:
    """The trained weights: the adapter (PEFT layout) or, without adapters, every trainable tensor."""
    if isinstance(getattr(model, "lorakit_state", None), AdapterState):
        save_adapter(model, directory / ADAPTER_DIR)
        return
    tensors = {k: p.detach().cpu().contiguous() for k, p in trainable_parameters(model).items()}
    save_file(tensors, directory / TRAINABLE_FILE)


def load_weights(model: nn.Module, directory: Path) -> None:
    """The inverse of `save_weights`, strict about keys and shapes."""
    if isinstance(getattr(model, "lorakit_state", None), AdapterState):
        load_adapter_weights(model, directory / ADAPTER_DIR)
        return
    tensors = load_file(directory / TRAINABLE_FILE)
    params = trainable_parameters(model)
    if tensors.keys() != params.keys():
        raise LorakitError(f"{directory / TRAINABLE_FILE} holds other parameters than this run trains")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, path), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    # The file holds optimizer tensors, RNG states and plain Python values written by lorakit itself.
    return torch.load(Path(path) / TRAINER_STATE, weights_only=False)


def prune_checkpoints(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Delete all but the newest `keep_last` checkpoints and the best one."""
    found = list_checkpoints(run_dir)
    keep = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    if best_step is not None:
        keep.add(best_step)
    for step, path in found:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)
