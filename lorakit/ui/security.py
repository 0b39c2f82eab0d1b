"""What the page lets a request touch: the address it listens on, the optional token, file paths confined to the
working directory and the runs directory, run names, YAML read with the safe loader and bodies capped in size."""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LorakitError

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_UPLOAD_BYTES = 1 << 20  # a training YAML is a few kB; 1 MiB leaves room for comments


@dataclass
class UiSettings:
    """root: the working directory (relative paths in configs are read from there; runs start there).
    runs_dir: where runs are written and listed. token: when set, every API call must carry it.
    allow: further directories that data and model paths may name (e.g. a shared read-only data folder).
    max_upload_bytes: the largest request body accepted (an uploaded YAML, a form)."""

    root: Path = field(default_factory=Path.cwd)
    runs_dir: Path = Path("runs")
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None
    allow: list[Path] = field(default_factory=list)
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    recipes_dir: Path = Path("recipes")

    def __post_init__(self) -> None:
        self.root = Path(os.path.realpath(self.root))
        self.runs_dir = self.resolve(self.runs_dir)
        self.recipes_dir = self.resolve(self.recipes_dir)
        self.allow = [self.resolve(p) for p in self.allow]

    def resolve(self, path: str | Path) -> Path:
        """`path` made absolute from the working directory, links resolved."""
        p = Path(path).expanduser()
        return Path(os.path.realpath(p if p.is_absolute() else self.root / p))

    @property
    def roots(self) -> list[Path]:
        return [self.root, self.runs_dir, *self.allow]

    def shown(self, path: Path) -> str:
        """`path` relative to the working directory where it lies inside it."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if not _loopback(host) and not token:
        raise LorakitError(f"--host {host} lets other machines start runs on this one; give --token-file FILE "
                           "(a file holding a secret) too, or keep the default --host 127.0.0.1")


def read_token_file(path: str | Path) -> str:
    """The token in `path` (surrounding whitespace dropped); raises LorakitError for a missing or empty file."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise LorakitError(f"cannot read --token-file {path}: {e.strerror or e}") from None
    if not token:
        raise LorakitError(f"--token-file {path} is empty; write a secret into it (e.g. `openssl rand -hex 16`)")
    return token


def token_ok(expected: str | None, given: str | None) -> bool:
    return expected is None or (given is not None and hmac.compare_digest(expected.encode(), given.encode()))


def host_ok(settings: UiSettings, header: str) -> bool:
    """Whether a request's Host header names this server. Bound to a loopback address without a token, the page
    answers only to loopback names: a web page elsewhere that rebinds its own name to 127.0.0.1 (DNS rebinding)
    is refused. With a token or another address, the token guards instead."""
    if settings.token is not None or not _loopback(settings.host):
        return True
    name = header.rsplit(":", 1)[0] if not header.endswith("]") else header
    return name.strip("[]") in {"127.0.0.1", "localhost", "::1", settings.host}


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_run_name(name: object) -> str | None:
    """A problem with a run name (it becomes a directory under the runs directory), or None."""
    if not isinstance(name, str) or not name:
        return "run name is empty; give the run a name (letters, digits, '.', '_' and '-')"
    if "/" in name or "\\" in name or ".." in name or not RUN_NAME.fullmatch(name):
        return (f"run name {name!r} must be one directory name: letters, digits, '.', '_' and '-', starting with a "
                "letter or digit, at most 64 characters (no '/' and no '..')")
    return None


def confined(settings: UiSettings, path: Path) -> bool:
    """Whether `path` (absolute, links resolved) lies inside the working directory, the runs directory or an
    allowed directory."""
    return any(path == root or root in path.parents for root in settings.roots)


def check_path(settings: UiSettings, key: str, value: str, *, beside: Path | None = None) -> str | None:
    """A problem with a file path `value` given for config key `key`, or None. A relative path is read from the
    working directory, or from `beside` (a recipe's directory) where only that exists, as `lorakit train` does."""
    p = Path(value).expanduser()
    path = settings.resolve(p)
    if beside is not None and not p.is_absolute() and not path.exists() and (beside / p).exists():
        path = Path(os.path.realpath(beside / p))
    if confined(settings, path):
        return None
    places = ", ".join(settings.shown(r) if r != settings.root else f"the working directory {r}"
                       for r in settings.roots)
    return (f"{key} {value!r} lies outside the directories this page may read ({places}); copy the file into the "
            "working directory or start `lorakit ui --allow DIR`")
