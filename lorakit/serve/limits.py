"""What a request may ask of the server: the settings that bound it, the API key, the body size, and errors in
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`).

`Guard` wraps the whole ASGI app, so its checks run before FastAPI parses anything: without the key (when one is
set) every route but `/health` answers 401, and a body over `max_body_bytes` answers 413 whether or not it
declares its length.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

MAX_BODY_BYTES = 1 << 20  # a long chat is tens of kB; 1 MiB leaves room


@dataclass
class ServeSettings:
    """model: the base (a bundled name, directory or hub id); its name in `/v1/models` is this string.
    adapters: name -> directory, loaded at start. adapter_dir: the only place `/v1/load_lora_adapter` reads from
    (None: no runtime loading). api_key: when set, every route but /health needs `Authorization: Bearer KEY`."""

    model: str
    adapters: dict[str, Path] = field(default_factory=dict)
    adapter_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 32
    max_queue: int = 256
    max_loaded_adapters: int = 16
    max_body_bytes: int = MAX_BODY_BYTES
    max_prompt_tokens: int = 4096
    max_tokens_limit: int = 2048
    max_n: int = 8
    request_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}" for name in
                    ("max_batch_size", "max_queue", "max_loaded_adapters", "max_body_bytes", "max_prompt_tokens",
                     "max_tokens_limit", "max_n") if getattr(self, name) < 1]
        if len(self.adapters) > self.max_loaded_adapters:
            problems.append(f"{len(self.adapters)} adapters given but max_loaded_adapters is "
                            f"{self.max_loaded_adapters}")
        if problems:
            raise LorakitError("; ".join(problems))


def read_api_key_file(path: str | Path) -> str:
    """The key in `path` (surrounding whitespace dropped); raises LorakitError for a missing or empty file."""
    try:
        key = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise LorakitError(f"cannot read --api-key-file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not key:
        raise LorakitError(f"--api-key-file {path} is empty; write a secret into it (e.g. `openssl rand -hex 16`)")
    return key


def error_body(message: str, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Guard:
    """ASGI middleware: API key and body size, answered before the app sees the request."""

    def __init__(self, app: Any, settings: ServeSettings, on_response: Callable[[str, int], None] | None = None):
        self.app, self.settings, self.on_response = app, settings, on_response

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.on_response is not None:
            send = self._counting(scope["path"], send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.settings.api_key is not None and scope["path"] != "/health":
            given = headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     self.settings.api_key.encode()):
                await _answer(send, 401, error_body("missing or wrong API key: send the header "
                                                    "'Authorization: Bearer KEY'", 401, "invalid_api_key"))
                return
        limit = self.settings.max_body_bytes
        too_big = error_body(f"request body is over {limit:,} bytes", 413, "body_too_large")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, too_big)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _answer(send, 413, too_big)
                return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return dict(await receive())

        await self.app(scope, replay, send)


    def _counting(self, path: str, send: Any) -> Any:
        async def counted(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and self.on_response is not None:
                self.on_response(path, int(message["status"]))
            await send(message)
        return counted


async def _answer(send: Any, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
