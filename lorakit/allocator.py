"""Which memory allocator serves the process, and starting a command again under jemalloc.

PyTorch's CPU tensors come from the C library's `malloc`. With glibc's, a training step's transient activations,
freed between the tensors that stay alive (the block inputs kept by activation checkpointing, the gradients),
leave free holes that later steps do not fill again in place: the heap grows by several MB per layer on the first
step, and every later step touches pages all over that free space. The process keeps 2-3 x the memory its live
tensors need, and the step is slower for the page faults (docs/quantization.md measures both). jemalloc reuses
freed memory by size class and does not fragment this way; PyTorch's own CPU performance guide recommends it.

An allocator can only be chosen when a process starts (`LD_PRELOAD`), so a command that asks for jemalloc is
started again, in the same process id, under it:

    relaunch_under_jemalloc([sys.executable, "-m", "lorakit", *argv])   # returns only if jemalloc already serves

The library is looked up in `LORAKIT_JEMALLOC` (a path), then where the dynamic linker finds `libjemalloc`
(Debian and Ubuntu: `apt-get install libjemalloc2`), then in the Python prefix's and the usual library folders.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from pathlib import Path

from lorakit.errors import LorakitError

log = logging.getLogger(__name__)

ALLOCATORS = ("system", "jemalloc")
PATH_VARIABLE = "LORAKIT_JEMALLOC"  # an explicit path to libjemalloc.so
_RELAUNCHED = "LORAKIT_RELAUNCHED_UNDER"  # set in the started-again process, so it never loops
_FOLDERS = ("lib", "/usr/local/lib", "/usr/local/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64", "/usr/lib")


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p), ("dli_sname", ctypes.c_char_p),
                ("dli_saddr", ctypes.c_void_p)]


def active_allocator() -> str:
    """`jemalloc` when jemalloc serves this process's malloc, `glibc` for the GNU C library's, else `unknown`:
    read from the shared object that the process's `malloc` symbol resolves to."""
    process = ctypes.CDLL(None)
    dladdr = getattr(process, "dladdr", None)
    if dladdr is None:  # no dladdr to ask: jemalloc's control interface is exported by jemalloc alone
        return "jemalloc" if hasattr(process, "mallctl") else "unknown"
    info = _DlInfo()
    if not dladdr(ctypes.cast(process.malloc, ctypes.c_void_p), ctypes.byref(info)) or not info.dli_fname:
        return "unknown"
    owner = Path(info.dli_fname.decode(errors="replace")).name
    if "jemalloc" in owner:
        return "jemalloc"
    return "glibc" if owner.startswith("libc.so") else "unknown"


def find_jemalloc() -> str | None:
    """The jemalloc shared library to preload (a path, or a name the dynamic linker resolves), or None.
    Raises `LorakitError` when `LORAKIT_JEMALLOC` names a file that does not exist."""
    explicit = os.environ.get(PATH_VARIABLE)
    if explicit:
        if not Path(explicit).is_file():
            raise LorakitError(f"{PATH_VARIABLE}={explicit} is not a file: point it at libjemalloc.so.2, or unset it")
        return explicit
    name = ctypes.util.find_library("jemalloc")
    if name is not None:
        return name
    for folder in _FOLDERS:
        base = Path(sys.prefix) / folder if not folder.startswith("/") else Path(folder)
        found = sorted(base.glob("libjemalloc.so*"))
        if found:
            return str(found[0])
    return None


def relaunch_under_jemalloc(command: list[str]) -> None:
    """Replace this process by `command` (argv, program first) with jemalloc preloaded; return at once when
    jemalloc already serves the process. Raises `LorakitError` when no jemalloc library is found, or when the
    process was already started again for it and jemalloc still does not serve it (the library did not load)."""
    if active_allocator() == "jemalloc":
        return None
    if os.environ.get(_RELAUNCHED) == "jemalloc":
        raise LorakitError(f"jemalloc was preloaded ({os.environ.get('LD_PRELOAD', '')}) but does not serve the "
                           f"process: set {PATH_VARIABLE} to a working libjemalloc.so.2, or use the system allocator")
    library = find_jemalloc()
    if library is None:
        raise LorakitError(f"jemalloc was asked for but not found: install it (Debian/Ubuntu: apt-get install "
                           f"libjemalloc2) or set {PATH_VARIABLE} to libjemalloc.so.2; or use the system allocator")
    env = dict(os.environ)  # the processes it starts inherit the preload, as they would from the shell
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    env[_RELAUNCHED] = "jemalloc"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def use_allocator(name: str, command: list[str] | None) -> None:
    """Make `name` (see ALLOCATORS) serve this process: nothing for `system`; for `jemalloc`, start `command`
    again under it unless it already serves. `command` None means the process was not started by this command
    line (the CLI called as a function), which cannot be started again: a `LorakitError` then."""
    if name not in ALLOCATORS:
        raise LorakitError(f"unknown allocator {name!r}: choose one of {', '.join(ALLOCATORS)}")
    if name == "system":
        return
    if active_allocator() == "jemalloc":
        log.info("memory allocator: jemalloc")
        return
    if command is None:
        raise LorakitError("jemalloc must serve the process from its start: run the lorakit command itself, or "
                           "preload it (LD_PRELOAD=libjemalloc.so.2), or use the system allocator")
    relaunch_under_jemalloc(command)
