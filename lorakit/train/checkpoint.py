"""Checkpoints: adapter, optimizer, scheduler, data position and RNG states, each written atomically.

Layout of a run directory:
    checkpoints/step-00000100/adapter/                    the adapter files (PEFT layout), or
    checkpoints/step-00000100/trainable.safetensors       every trainable tensor (runs without adapters)
    checkpoints/step-00000100/trainer_state.safetensors   every tensor of the trainer state (optimizer moments,
                                                          RNG states)
    checkpoints/step-00000100/trainer_state.json          the rest (step, data position, scheduler, metric
                                                          history, Python RNG state), tensors replaced by
                                                          {"__tensor__": name} and tuples by {"__tuple__": [...]}

Nothing is unpickled, so a run directory from someone else holds data, never code. A checkpoint directory appears
whole or not at all; on resume each one is validated in full (both state files parse and agree, the adapter's
checksum holds) and a damaged newest one gives way to the previous complete one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.fileio import AtomicWriteError, atomic_write_dir, describe
from lorakit.inject import AdapterState, trainable_parameters
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, load_adapter_weights, read_adapter, save_adapter

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer.pt"  # the pickle of lorakit's first checkpoints: recognised, never loaded
ADAPTER_DIR = "adapter"
TRAINABLE_FILE = "trainable.safetensors"  # runs without adapters (full fine-tuning, head only)
STATE_FORMAT = "lorakit-trainer-state"
STATE_VERSION = 1
SET_ASIDE_SUFFIX = ".unusable"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "optimizer": dict, "scheduler": dict, "step": int, "epoch": int, "batch": int, "rng": list, "world_size": int,
    "best": dict, "history": list}


class CheckpointError(LorakitError):
    """A checkpoint that cannot be trusted (missing, truncated, corrupted or in the old pickle format)."""


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


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


# ----------------------------------------------------------------------------------------------- saving


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, trainer_state: dict[str, Any]) -> Path:
    """Write checkpoint `step` (weights + `trainer_state`) atomically and return its directory.

    Raises AtomicWriteError on a full disk or another OSError, naming the checkpoint kept instead.
    """
    path = step_dir(run_dir, step)

    def fill(tmp: Path) -> None:
        save_weights(model, tmp)
        write_trainer_state(tmp, trainer_state)

    try:
        atomic_write_dir(path, fill, what="checkpoint")
    except AtomicWriteError as e:
        done = [p.name for _, p in list_checkpoints(run_dir)]
        kept = f"the last complete checkpoint {done[-1]} is kept" if done else "no earlier checkpoint exists"
        raise AtomicWriteError(f"{describe(e.cause)} while writing checkpoint {path.name} in {path.parent}; {kept}",
                               target=path, cause=e.cause) from e
    return path


def save_weights(model: nn.Module, directory: Path) -> None:
    """The trained weights: the adapter (PEFT layout) or, without adapters, every trainable tensor."""
    if isinstance(getattr(model, "lorakit_state", None), AdapterState):
        save_adapter(model, directory / ADAPTER_DIR)
        return
    tensors = {k: p.detach().cpu().contiguous() for k, p in trainable_parameters(model).items()}
    (directory / TRAINABLE_FILE).write_bytes(save_safetensors(tensors))


def write_trainer_state(directory: Path, state: dict[str, Any]) -> None:
    """`state` (nested dicts, lists, tuples, tensors and JSON scalars) as STATE_TENSORS + STATE_JSON."""
    tensors: dict[str, Tensor] = {}
    encoded = _encode(state, "", tensors)
    blob = save_safetensors(tensors, metadata={"format": "pt"})
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "tensors_sha256": hashlib.sha256(blob).hexdigest(),
           "state": encoded}
    (directory / STATE_TENSORS).write_bytes(blob)
    (directory / STATE_JSON).write_text(json.dumps(doc, indent=1) + "\n")


def _encode(value: Any, name: str, tensors: dict[str, Tensor]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        key = name.lstrip("/") or "tensor"
        while key in tensors:
            key += "'"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {_TENSOR, _TUPLE, _ITEMS} & value.keys():
            return {k: _encode(v, f"{name}/{k}", tensors) for k, v in value.items()}
        return {_ITEMS: [[_encode(k, f"{name}/key", tensors), _encode(v, f"{name}/{k}", tensors)]
                         for k, v in value.items()]}
    raise TypeError(f"trainer state {name or '/'} is a {type(value).__name__}, which a checkpoint cannot hold")


# ---------------------------------------------------------------------------------------------- loading


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of checkpoint directory `path`, checked: both files parse, they belong together (the
    JSON holds the SHA-256 of the tensor file) and every key the loop needs is there.

    Raises CheckpointError naming the file and the damage.
    """
    path = Path(path)
    json_path, tensors_path = path / STATE_JSON, path / STATE_TENSORS
    if not json_path.is_file() and (path / LEGACY_STATE).is_file():
        raise CheckpointError(f"{path} holds {LEGACY_STATE}, the pickle format of older lorakit versions, which is "
                              "not loaded because unpickling a file can run any code; start a new run")
    for file in (json_path, tensors_path):
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
    try:
        doc = json.loads(json_path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{json_path} is not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
        raise CheckpointError(f"{json_path} is not a lorakit trainer state of version {STATE_VERSION}")
    blob = tensors_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != doc.get("tensors_sha256"):
        raise CheckpointError(f"{tensors_path} does not match {STATE_JSON} (truncated, corrupted or mixed up)")
    try:
        tensors = load_safetensors(blob)
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise CheckpointError(f"{tensors_path} is not a safetensors file ({type(e).__name__}: {e})") from None
    used: set[str] = set()
    try:
        state = _decode(doc.get("state"), tensors, used)
    except RecursionError:
        raise CheckpointError(f"{json_path} is nested too deeply to be a trainer state") from None
    if used != tensors.keys():
        raise CheckpointError(f"{tensors_path} holds tensors {STATE_JSON} does not refer to")
    _check_trainer_state(state, json_path)
    return state


def _decode(value: Any, tensors: dict[str, Tensor], used: set[str]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((marker, inner),) = value.items()
        if marker == _TENSOR:
            if not isinstance(inner, str) or inner not in tensors:
                raise CheckpointError(f"the trainer state refers to tensor {inner!r}, which {STATE_TENSORS} lacks")
            used.add(inner)
            return tensors[inner]
        if marker == _TUPLE and isinstance(inner, list):
            return tuple(_decode(v, tensors, used) for v in inner)
        if marker == _ITEMS and isinstance(inner, list):
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in inner):
                raise CheckpointError(f"the trainer state has a malformed {_ITEMS} entry")
            try:
                return {_decode(k, tensors, used): _decode(v, tensors, used) for k, v in inner}
            except TypeError:  # a key that cannot be a dict key
                raise CheckpointError(f"the trainer state has a malformed {_ITEMS} key") from None
    return {k: _decode(v, tensors, used) for k, v in value.items()}


def _check_trainer_state(state: Any, source: Path) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{source} holds no trainer state object")
    wrong = [k for k, kind in _REQUIRED.items()
             if not isinstance(state.get(k), kind) or (kind is int and isinstance(state.get(k), bool))]
    if wrong:
        raise CheckpointError(f"{source} lacks or mistypes {', '.join(wrong)}")
    rng = state["rng"]
    if len(rng) != state["world_size"] or not all(
            isinstance(r, dict) and isinstance(r.get("torch"), Tensor) and r["torch"].dtype == torch.uint8
            and isinstance(r.get("python"), tuple) and len(r["python"]) == 3 for r in rng):
        raise CheckpointError(f"{source} holds no valid random number generator state for each of its "
                              f"{state['world_size']} processes")


def validate_checkpoint(path: str | Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path` after checking everything in it: the state files (see
    `load_trainer_state`), that the state's step is the directory's, and the weights (the adapter's checksum, or
    the trainable tensors parse). Raises LorakitError naming the damage."""
    path = Path(path)
    state = load_trainer_state(path)
    match = _STEP_DIR.match(path.name)
    if match and int(match.group(1)) != state["step"]:
        raise CheckpointError(f"{path / STATE_JSON} is the state of step {state['step']}, not of {path.name}")
    if (path / ADAPTER_DIR).is_dir():
        read_adapter(path / ADAPTER_DIR)
    elif (path / TRAINABLE_FILE).is_file():
        try:
            load_safetensors((path / TRAINABLE_FILE).read_bytes())
        except Exception as e:  # safetensors' own error type
            raise CheckpointError(f"{path / TRAINABLE_FILE} is truncated or corrupted ({e})") from None
    else:
        raise CheckpointError(f"{path} holds no weights ({ADAPTER_DIR}/ or {TRAINABLE_FILE})")
    return state


def load_weights(model: nn.Module, directory: Path) -> None:
    """The inverse of `save_weights`, strict about keys and shapes."""
    if isinstance(getattr(model, "lorakit_state", None), AdapterState):
        load_adapter_weights(model, directory / ADAPTER_DIR)
        return
    try:
        tensors = load_safetensors((directory / TRAINABLE_FILE).read_bytes())
    except Exception as e:  # a missing file, or safetensors' own error type
        raise CheckpointError(f"{directory / TRAINABLE_FILE} cannot be read ({e})") from None
    params = trainable_parameters(model)
    if tensors.keys() != params.keys():
        raise LorakitError(f"{directory / TRAINABLE_FILE} holds other parameters than this run trains")
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


# ------------------------------------------------------------------------------------- finding and pruning


def _step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in root.iterdir()
             if (m := _STEP_DIR.match(child.name)) and child.is_dir()]
    return sorted(found)


def _is_complete(path: Path) -> bool:
    weights = ((path / ADAPTER_DIR / WEIGHTS_NAME).is_file() and (path / ADAPTER_DIR / CONFIG_NAME).is_file()) \
        or (path / TRAINABLE_FILE).is_file()
    return weights and (path / STATE_JSON).is_file() and (path / STATE_TENSORS).is_file()


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints with all their files, as (step, path), oldest first (their contents are checked on resume)."""
    return [(step, path) for step, path in _step_dirs(run_dir) if _is_complete(path)]


def find_resumable(run_dir: Path) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]]:
    """The newest checkpoint that passes `validate_checkpoint`: (its path, its trainer state, the newer ones
    skipped with the reason). Raises LorakitError, one line with every checkpoint's fault, if none passes."""
    candidates = _step_dirs(run_dir)
    if not candidates:
        raise LorakitError(f"nothing to resume: {run_dir} has no checkpoint (drop --resume to start anew)")
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(candidates):
        try:
            return path, validate_checkpoint(path), skipped
        except LorakitError as e:
            skipped.append((path, " ".join(str(e).split())))
    faults = "; ".join(f"{path.name}: {why}" for path, why in skipped)
    raise LorakitError(f"nothing to resume: no checkpoint in {Path(run_dir) / CHECKPOINTS} is complete ({faults}); "
                       "drop --resume to start anew")


def set_aside(skipped: list[tuple[Path, str]], resumed: Path) -> None:
    """Rename checkpoints skipped on resume to `step-N.unusable` (so that pruning, publishing and a later resume
    no longer take them for the newest), with a warning naming each and why."""
    for path, why in skipped:
        target = path.with_name(path.name + SET_ASIDE_SUFFIX)
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}{SET_ASIDE_SUFFIX}-{n}")
        path.rename(target)
        log.warning("skipped checkpoint %s: %s; resuming from the previous complete checkpoint %s (the skipped one "
                    "is kept as %s)", path.name, why, resumed.name, target.name)


def prune_checkpoints(run_dir: Path, keep_last: int, best_step: int | None) -> None:
    """Delete all but the newest `keep_last` checkpoints and the best one."""
    found = list_checkpoints(run_dir)
    keep = {step for step, _ in found[-keep_last:]} if keep_last > 0 else set()
    if best_step is not None:
        keep.add(best_step)
    for step, path in found:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)
