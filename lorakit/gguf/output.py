"""The output file of an export: claimed before any model loads, written beside itself and renamed into place.

A GGUF file is written by `gguf.GGUFWriter`, tensor by tensor, so it goes to a temporary file in the same
directory (`.NAME.XXXXXXXX.tmp`, which `lorakit.fileio.recover_interrupted_writes` tidies) and is renamed over the
target only when complete: an error or Ctrl-C at any point leaves the target as it was.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.fileio import AtomicWriteError, describe, os_error_of

GGUF_MAGIC = b"GGUF"


def check_out_file(out: str | Path, *, force: bool) -> Path:
    """Refuse an `out` that is a directory, or an existing file without `force`; with `force`, replace only a GGUF
    file (so a mistyped path cannot destroy a checkpoint or a config)."""
    path = Path(out)
    if path.is_dir():
        raise LorakitError(f"--out {out} is a directory; give the GGUF file to write, e.g. {path / 'model.gguf'}")
    if path.exists():
        if not force:
            raise LorakitError(f"{out} exists; pass force=True (--force) to replace it, or choose another --out")
        if not _is_gguf(path):
            raise LorakitError(f"{out} exists and is not a GGUF file; --force replaces only an earlier GGUF export "
                               "(delete it yourself or choose another --out)")
    if path.suffix.lower() != ".gguf":
        raise LorakitError(f"--out {out} should end in .gguf (llama.cpp and Ollama look for it)")
    return path


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def write_atomically(out: Path, write: Callable[[Path], None], *, what: str) -> None:
    """Call `write(tmp)` on a new temporary path beside `out`, then rename it over `out`. On any exception the
    temporary file is removed and `out` is unchanged; an OSError becomes AtomicWriteError naming `what`."""
    existed = out.exists()
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = os_error_of(e)
        if cause is None or not isinstance(e, Exception):
            raise
        kept = "what was there before is unchanged" if existed else "nothing else changed"
        raise AtomicWriteError(f"{describe(cause)} while writing {what} {out}; it was not written and {kept}",
                               target=out, cause=cause) from e
