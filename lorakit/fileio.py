"""Atomic writes: a file or a directory is either the old version or the new one, never half of each.

Temporary files and directories are created beside the target with the permissions any tool gives a new file
(0666 and 0777 less the process umask), so what lands in place is readable by whoever the umask allows. An
`OSError` while writing (a full disk, a quota, a lost permission) becomes one `AtomicWriteError` that names the
target and says that nothing at it changed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from lorakit.errors import LorakitError

log = logging.getLogger(__name__)

# What an interrupted write leaves beside its target: `.name.new-XXXX/` (half built), `.name.old-XXXX/previous`
# (the previous version, moved aside for the swap) and `.name.XXXX.tmp` (a file being written). XXXX is
# `_new_name`'s 8 hex digits, so a user's file never matches.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:(?P<kind>new|old)-[0-9a-f]{8}|[0-9a-f]{8}\.tmp)$")

# Libraries written in Rust (safetensors, tokenizers) report I/O failures as their own exception types whose
# message ends with the OS error, e.g. "I/O error: No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class AtomicWriteError(LorakitError):
    """Writing `target` failed with `cause`; `target` is as it was before (the previous version or absent)."""

    def __init__(self, message: str, *, target: Path, cause: OSError):
        self.target, self.cause = target, cause
        super().__init__(message)


def describe(cause: OSError) -> str:
    """`no space left on device`, `permission denied: 'x'`: the OS error in words, lower case, one line."""
    text = (cause.strerror or str(cause) or type(cause).__name__).strip()
    text = text[:1].lower() + text[1:]
    if cause.filename is not None and cause.errno not in (errno.ENOSPC, errno.EDQUOT):
        text += f": {str(cause.filename)!r}"
    return text


def os_error_of(exc: BaseException) -> OSError | None:
    """The OS error behind `exc`: itself, the cause of an `AtomicWriteError`, or one named in a Rust library's
    message; None for any other exception."""
    if isinstance(exc, AtomicWriteError):
        return exc.cause
    if isinstance(exc, OSError):
        return exc
    match = _RUST_OS_ERROR.search(str(exc))
    if match:
        code = int(match.group(1))
        return OSError(code, os.strerror(code))
    return None


def _write_error(target: Path, cause: OSError, existed: bool, what: str) -> AtomicWriteError:
    kept = "it was not written and what was there before is unchanged" if existed else \
        "it was not written and nothing else changed"
    return AtomicWriteError(f"{describe(cause)} while writing {what} {target}; {kept}", target=target, cause=cause)


def _new_name(parent: Path, prefix: str, suffix: str, create: Callable[[Path], None]) -> Path:
    """Create a fresh, unused path `parent/prefix<random>suffix` with `create` (which fails if it exists)."""
    for _ in range(100):
        candidate = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no unused temporary name", str(parent / prefix))


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()


def _create_dir(path: Path) -> None:
    os.mkdir(path, 0o777)  # the umask applies, as for mkdir(1)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and directory under `root` on disk, so a crash after the rename cannot leave empty files; and
    each with the umask's permissions, whatever wrote it (safetensors' writer creates its files 0600)."""
    umask = _umask()
    for directory, _, files in os.walk(root):
        for name in files:
            file = os.path.join(directory, name)
            os.chmod(file, 0o666 & ~umask)
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(directory, 0o777 & ~umask)
        _fsync_dir(Path(directory))


def _umask() -> int:
    """The process umask: from /proc where Linux shows it, else by setting it and putting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, *, what: str = "file") -> None:
    """Write `data` to a temp file beside `path`, fsync it, and rename it over `path`.

    Raises AtomicWriteError (naming `what` and `path`) on an OSError; `path` is then unchanged.
    """
    path = Path(path)
    existed = path.exists()
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_name(path.parent, f".{path.name}.", ".tmp", _create_file)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        cause = os_error_of(e)
        if cause is None or not isinstance(e, Exception):
            raise
        raise _write_error(path, cause, existed, what) from e
    _fsync_dir_after_swap(path.parent)


def atomic_write_dir(path: str | Path, fill: Callable[[Path], None], *, what: str = "directory") -> None:
    """Build a directory with `fill(tmp_dir)` beside `path`, then swap it into place.

    The previous version is renamed aside and deleted only after the new one is in place, so a kill at any point
    leaves at least one complete version (the old one as `path` or `.path.old-*/previous`, the new one as `path`
    or `.path.new-*`); an exception at any point (an error in `fill`, Ctrl-C) leaves `path` as it was and no
    temporary directory behind. An OSError, from `fill` or from the swap, is raised as AtomicWriteError naming
    `what` and `path`; other exceptions pass through unchanged.
    """
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_name(path.parent, f".{path.name}.new-", "", _create_dir)
    except OSError as e:
        raise _write_error(path, e, existed, what) from e
    try:
        fill(tmp)
        _fsync_tree(tmp)
        _swap(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = os_error_of(e)
        if cause is None or not isinstance(e, Exception):
            raise
        raise _write_error(path, cause, existed, what) from e


def _swap(new: Path, path: Path) -> None:
    """Rename `new` to `path`, moving a previous `path` aside first and back again if the rename fails."""
    old = None
    if path.exists():
        old = _new_name(path.parent, f".{path.name}.old-", "", _create_dir)
        try:
            os.replace(path, old / "previous")
        except BaseException:
            shutil.rmtree(old, ignore_errors=True)
            raise
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old / "previous", path)
            shutil.rmtree(old, ignore_errors=True)
        raise
    _fsync_dir_after_swap(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir_after_swap(directory: Path) -> None:
    # The new version is in place whatever happens here; an error would wrongly say that nothing changed.
    try:
        _fsync_dir(directory)
    except OSError as e:
        log.warning("could not flush directory %s to disk (%s); its new entry may not survive a power loss",
                    directory, describe(e))


def recover_interrupted_writes(directory: str | Path) -> list[Path]:
    """Tidy what writes killed mid-way left in `directory`: a previous version moved aside goes back in place when
    its target is missing (a kill between the two renames of a swap), and every other leftover is deleted.
    Returns the targets put back. Call it only when no write into `directory` is under way."""
    directory = Path(directory)
    restored = []
    leftovers = sorted(directory.iterdir()) if directory.is_dir() else []
    for leftover in leftovers:
        match = _LEFTOVER.match(leftover.name)
        if not match:
            continue
        target = directory / match.group("name")
        if match.group("kind") == "old" and (leftover / "previous").exists() and not target.exists():
            os.replace(leftover / "previous", target)
            restored.append(target)
            log.warning("put back %s, moved aside by a write that was interrupted", target)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return restored
