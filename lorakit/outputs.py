"""Output directories lorakit may write: a new or empty one, or its own earlier output when the user says so.

Every command that writes a directory (`train`'s run directory, `merge --out`, `demo --out`) claims it first:

    claim_output_dir("runs/x", kind="train run", force=False, inputs=[adapter_dir])

- a missing or empty directory is created and marked as lorakit's (`.lorakit-output.json`, naming the kind);
- a non-empty directory is refused, unless it carries lorakit's mark for the same kind and `force` is set (the
  caller then replaces only the files it writes itself);
- a directory that is, contains, or lies inside one of the command's inputs is refused: a command never writes
  into what it reads.
The checks run before any model loads, and refusing changes nothing on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.fileio import atomic_write_bytes

MARK_NAME = ".lorakit-output.json"


class OutputExistsError(LorakitError):
    """The output directory holds files this command may not replace."""


def output_kind(path: str | Path) -> str | None:
    """The kind of lorakit output `path` holds (`train run`, `merged model`, `demo`), or None if unmarked."""
    mark = Path(path) / MARK_NAME
    try:
        kind = json.loads(mark.read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def claim_output_dir(path: str | Path, *, kind: str, force: bool = False,
                     replace_hint: str = "pass --force to replace it", inputs: Sequence[str | Path] = ()) -> bool:
    """Check that this command may write directory `path`, then create and mark it.

    Returns True when `path` held an earlier output of the same kind that `force` allows replacing, False when it
    was new or empty. Raises LorakitError (nothing written) when `path` is one of `inputs`, contains one or lies
    inside one, is a file, or is a non-empty directory that is not lorakit's own `kind` output with `force` set.
    """
    out = Path(path).expanduser()
    _refuse_inputs(out, path, inputs)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{path} is a file, not a directory; choose another output directory")
    entries = sorted(p.name for p in out.iterdir() if p.name != MARK_NAME) if out.is_dir() else []
    if entries:
        own = output_kind(out)
        if own != kind:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            whose = f"an earlier lorakit {own}" if own else f"files lorakit did not write ({shown})"
            raise OutputExistsError(f"{path} already holds {whose}; choose an empty or new output directory")
        if not force:
            raise OutputExistsError(f"{path} already holds an earlier lorakit {kind}; {replace_hint}, or choose "
                                    "another output directory")
    out.mkdir(parents=True, exist_ok=True)
    if output_kind(out) != kind:
        atomic_write_bytes(out / MARK_NAME, (json.dumps({"kind": kind}) + "\n").encode())
    return bool(entries)


def _refuse_inputs(out: Path, path: str | Path, inputs: Sequence[str | Path]) -> None:
    resolved = Path(os.path.realpath(out))
    for item in inputs:
        if not Path(item).expanduser().exists():  # a model's short name or hub id, not a path
            continue
        source = Path(os.path.realpath(Path(item).expanduser()))
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise OutputExistsError(f"output {path} overlaps the input {item}; a command never writes into what "
                                    "it reads: choose another output directory")
