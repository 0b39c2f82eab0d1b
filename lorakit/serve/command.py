"""The `lorakit serve` command's settings and its checks before any model loads: the adapters and the adapter
directory exist, the API key file holds a key, the address is free, and a non-loopback address has a key."""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.inference import DEFAULT_MODEL, recorded_base
from lorakit.serve.adapters import check_adapter_name
from lorakit.serve.limits import ServeSettings, read_api_key_file


def serve_settings(model: str | None, adapters: dict[str, Path], *, adapter_dir: str | None = None,
                   host: str = "127.0.0.1", port: int = 8000, api_key_file: str | None = None,
                   max_batch_size: int = 32, max_loaded_adapters: int = 16) -> ServeSettings:
    """Settings from the command's flags; raises LorakitError naming the flag for a missing file or directory."""
    for name, path in adapters.items():
        check_adapter_name(name)
        if not path.is_dir():
            raise LorakitError(f"--adapter {name}={path}: no such adapter directory")
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise LorakitError(f"--adapter-dir {adapter_dir} does not exist; create it or name the directory that "
                           "holds your adapters")
    key = read_api_key_file(api_key_file) if api_key_file is not None else None
    if model is None:
        model = next((b for b in (recorded_base(p) for p in adapters.values()) if b), DEFAULT_MODEL)
    return ServeSettings(model=model, adapters=adapters, adapter_dir=Path(adapter_dir) if adapter_dir else None,
                         host=host, port=port, api_key=key, max_batch_size=max_batch_size,
                         max_loaded_adapters=max_loaded_adapters)


def check_serve_args(settings: ServeSettings) -> None:
    """Refuse a non-loopback address without an API key, and an address already in use."""
    if not _loopback(settings.host) and settings.api_key is None:
        raise LorakitError(f"--host {settings.host} lets other machines use this server; give --api-key-file FILE "
                           "too, or keep the default --host 127.0.0.1")
    if not 0 < settings.port < 65536:
        raise LorakitError(f"--port must be in 1..65535, got {settings.port}")
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((settings.host, settings.port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise LorakitError(f"port {settings.port} on {settings.host} is in use; stop the other server or "
                                   "pick another with --port") from None
            raise LorakitError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}") from None


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
