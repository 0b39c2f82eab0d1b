"""The adapters a server may use: their names, where they are read from, the base check, and an LRU cap on those
held in memory.

Adapters given at start (`--adapter NAME=DIR`) and those loaded at runtime (`/v1/load_lora_adapter`, only from under
`--adapter-dir`) are registered by name. At most `max_loaded` have their factors in memory; loading one more evicts
the least recently used adapter that no running or waiting request uses (it leaves the registry too, as in vLLM:
load it again to use it). An adapter directory is read as safetensors only (`lorakit.io.read_adapter` never opens
a pickle), and an adapter recorded for another base is refused.
"""

from __future__ import annotations

import collections
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from torch import nn

from lorakit.bank import Factors, adapter_factors
from lorakit.config import LoraConfig
from lorakit.errors import LorakitError
from lorakit.inference import recorded_base
from lorakit.inject import inject
from lorakit.serve.engine import AdapterSet

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_adapter_name(name: object) -> str:
    """`name` when it is one plain name (letters, digits, '.', '_', '-'; no '/', no '..'); raises LorakitError."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or ".." in name:
        raise LorakitError(f"adapter name {name!r} must be letters, digits, '.', '_' and '-', starting with a letter "
                           "or digit, at most 64 characters (no '/' and no '..')")
    return name


def adapter_under(root: Path, relative: str) -> Path:
    """The directory `relative` names under `root`, links resolved; raises LorakitError for an absolute path, '..',
    or a path (or link) that leads out of `root`."""
    if not isinstance(relative, str) or not relative or Path(relative).is_absolute() or relative.startswith("~"):
        raise LorakitError(f"adapter path {relative!r} must be relative to the adapter directory")
    if ".." in Path(relative).parts or "\\" in relative or "\x00" in relative:
        raise LorakitError(f"adapter path {relative!r} must not contain '..'")
    base = Path(os.path.realpath(root))
    path = Path(os.path.realpath(base / relative))
    if base not in path.parents:
        raise LorakitError(f"adapter path {relative!r} leads out of the adapter directory (through a link)")
    if not path.is_dir():
        raise LorakitError(f"no adapter directory {relative!r} under the adapter directory")
    return path


def base_names(model_name: str, model: nn.Module) -> set[str]:
    """The names the server's base goes by: as given, its directory, the path its config records."""
    names = {model_name}
    recorded = getattr(getattr(model, "config", None), "_name_or_path", None)
    for name in (model_name, recorded):
        if name:
            names.add(str(name))
            if Path(name).expanduser().exists():
                names.add(os.path.realpath(Path(name).expanduser()))
    return names


def check_base(adapter_dir: Path, names: set[str]) -> None:
    """Refuse an adapter recorded for a base other than the server's (`base_names`)."""
    recorded = recorded_base(adapter_dir)
    if recorded is None:
        return
    normal = os.path.realpath(Path(recorded).expanduser()) if Path(recorded).expanduser().exists() else recorded
    if recorded not in names and normal not in names:
        shown = sorted(names, key=len)[0]
        raise LorakitError(f"adapter {str(adapter_dir)!r} was trained on {recorded!r}, not on this server's base "
                           f"{shown!r}; serve it with --model {recorded}")


def prepare_model(model: nn.Module) -> None:
    """Give every linear layer of the base a (zero) LoRA module, so that any adapter of this base fits the bank;
    the model's own factors play no part in per-row decoding."""
    inject(model, LoraConfig(rank=1, alpha=1, targets=["all-linear"]), initialize=False)


class AdapterRegistry:
    """Adapters by name with their factors in memory, at most `max_loaded` (LRU); `in_use` names the adapters
    that must stay. Changes bump `adapters.version`, which makes the engine rebuild its bank."""

    def __init__(self, base: set[str], adapter_root: Path | None, max_loaded: int,
                 in_use: Callable[[], set[str]] = set):
        self.base, self.adapter_root, self.max_loaded = base, adapter_root, max_loaded
        self.in_use = in_use
        self.adapters = AdapterSet()
        self.dirs: collections.OrderedDict[str, Path] = collections.OrderedDict()
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        return list(self.dirs)

    def touch(self, name: str) -> bool:
        """Mark `name` as just used; False when it is not loaded."""
        with self.lock:
            if name not in self.dirs:
                return False
            self.dirs.move_to_end(name)
            return True

    def add(self, name: str, path: Path) -> None:
        """Read, check and register the adapter at `path` (raises LorakitError naming the problem)."""
        check_adapter_name(name)
        check_base(path, self.base)
        factors: Factors = adapter_factors(path, name)
        with self.lock:
            if name in self.dirs:
                raise LorakitError(f"adapter {name!r} is already loaded; unload it first to replace it")
            busy = self.in_use()
            while len(self.dirs) >= self.max_loaded:
                victim = next((n for n in self.dirs if n not in busy), None)
                if victim is None:
                    raise LorakitError(f"all {self.max_loaded} adapters held in memory are in use; retry later")
                self._remove(victim)
            self.dirs[name] = path
            factors_by_name = dict(self.adapters.factors)
            factors_by_name[name] = factors
            self.adapters.factors = factors_by_name
            self.adapters.version += 1

    def load_runtime(self, name: str, relative: str) -> Path:
        """Load an adapter from under the adapter directory (`/v1/load_lora_adapter`)."""
        check_adapter_name(name)
        if self.adapter_root is None:
            raise LorakitError("this server loads no adapters at runtime; start it with --adapter-dir DIR")
        path = adapter_under(self.adapter_root, relative)
        self.add(name, path)
        return path

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.dirs:
                raise LorakitError(f"no adapter {name!r} is loaded")
            self._remove(name)

    def _remove(self, name: str) -> None:
        del self.dirs[name]
        self.adapters.factors = {k: v for k, v in self.adapters.factors.items() if k != name}
        self.adapters.version += 1
