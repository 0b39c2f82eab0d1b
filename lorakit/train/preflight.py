"""Checks made before training starts that need more than the config: the file system (`check_output_dir`) and
the model's own config (`check_max_length`). Each raises LorakitError naming the key, the value and the fix, so a
bad run.out_dir or data.max_length is found before the model loads or the data is encoded, not after training.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.train.readers import existing_file
from lorakit.vision.mnist import is_dataset_name


def check_output_dir(path: str | Path) -> None:
    """Raise LorakitError unless `path` (run.out_dir) is a directory this process can read and write, or can be
    created as one: a file in the way, a read-only parent or an unreadable directory is found before the model
    loads, not after training. Creates nothing (a probe file is written and removed)."""
    try:
        _check_output_dir(Path(path).expanduser(), path)
    except OSError as e:  # e.g. a parent that may not be listed
        raise LorakitError(f"run.out_dir {path} cannot be checked ({e.strerror or e}); choose a directory you can "
                           f"write to with --run.out_dir=DIR") from None


def _check_output_dir(out: Path, path: str | Path) -> None:
    if out.exists() and not out.is_dir():
        raise LorakitError(f"run.out_dir {path} is a file, not a directory; choose another run.out_dir or move "
                           f"the file")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the nearest existing ancestor, where the directories would be created
    if not parent.is_dir():
        raise LorakitError(f"run.out_dir {path} cannot be created: {parent} is a file, not a directory; choose "
                           f"another run.out_dir or move the file")
    try:
        if parent == out:
            os.listdir(out)  # --resume reads the checkpoints
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".lorakit-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LorakitError(f"run.out_dir {path} is not writable ({parent}: {e.strerror or e}); choose a "
                           f"directory you can write to with --run.out_dir=DIR") from None


# Learned position tables that start after the padding index (RoBERTa-likes): usable positions are fewer.
_POSITION_OFFSETS = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2}


def check_max_length(max_length: int, model_config: Any, model_name: str = "the model") -> None:
    """Raise LorakitError when data.max_length exceeds the positions of the model (its config's
    `max_position_embeddings`, fewer by the padding offset of RoBERTa-likes); silent for configs without one."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(positions, int) or isinstance(positions, bool):
        return
    limit = positions - _POSITION_OFFSETS.get(getattr(model_config, "model_type", ""), 0)
    if max_length > limit:
        raise LorakitError(f"data.max_length={max_length} is more than the {limit} positions of {model_name} "
                           f"(max_position_embeddings); set --data.max_length={limit} or less")




def check_data_files(data: Any) -> None:
    """Raise LorakitError when `data.train` or `data.eval` (a DataSection) names a file that does not exist, before
    any model loads; hub datasets (`hf:`) are left to the reader, parallel text `PREFIX.{SRC,TGT}` checks both files."""
    for path in (data.train, data.eval):
        if not path or str(path).startswith("hf:") or is_dataset_name(str(path)):
            continue
        head, brace, rest = str(path).rpartition("{")
        parallel = data.task == "translation" or data.format == "parallel"
        files = [head + code.strip() for code in rest.removesuffix("}").split(",")] if parallel and brace else [path]
        for file in files:
            if not Path(file).expanduser().exists():
                existing_file(file)  # raises its "not found" error, with where relative paths start


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LorakitError("run.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)
