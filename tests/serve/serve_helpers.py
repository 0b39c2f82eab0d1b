"""A tiny LLaMA with a BPE tokenizer and chat template on disk, adapters on it, and a server on loopback for the
serving tests."""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("gguf_models", REPO_ROOT / "tests" / "gguf" / "gguf_models.py")
assert _spec is not None and _spec.loader is not None
gguf_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gguf_models)
tiny_llama_dir = gguf_models.tiny_llama_dir
lora_adapter = gguf_models.lora_adapter


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Serve `app` on a free loopback port in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def make_world(root: Path) -> dict[str, Path]:
    """A base, two adapters of different ranks served at start, one more under an adapter directory for runtime
    loading, and an adapter of another base."""
    base = tiny_llama_dir(root / "base")
    other = tiny_llama_dir(root / "other-base", seed=5)
    adapter_dir = root / "adapters"
    adapter_dir.mkdir()
    return {"base": base, "a1": lora_adapter(root / "a1", base, seed=1),
            "a2": lora_adapter(root / "a2", base, seed=2, rank=8, alpha=4),
            "adapter_dir": adapter_dir, "a3": lora_adapter(adapter_dir / "a3", base, seed=3, rank=2),
            "foreign": lora_adapter(adapter_dir / "foreign", other, seed=4)}


def offline(base: Path, adapter: Path | None, prompts: list[str], max_tokens: int, *, chat: bool) -> list[str]:
    """Greedy outputs of `lorakit.generation.generate` (what `lorakit generate` prints) for the same prompts."""
    from lorakit.generation import SamplingConfig, generate
    from lorakit.inference import load_for_inference

    loaded = load_for_inference(str(base), adapter)
    return generate(loaded.model, loaded.tokenizer, prompts, SamplingConfig(max_new_tokens=max_tokens), chat=chat)
