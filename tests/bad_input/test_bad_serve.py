"""`lorakit serve` refuses bad input in one line with exit code 2, before it listens."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import pytest
from conftest import REPO_ROOT, expect_cli_error

_spec = importlib.util.spec_from_file_location("gguf_models", REPO_ROOT / "tests" / "gguf" / "gguf_models.py")
assert _spec is not None and _spec.loader is not None
gguf_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gguf_models)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-serve")
    base = gguf_models.tiny_llama_dir(root / "base")
    other = gguf_models.tiny_llama_dir(root / "other", seed=3)
    (root / "empty-key").write_text("  \n")
    return {"root": root, "base": base, "adapter": gguf_models.lora_adapter(root / "adapter", base),
            "foreign": gguf_models.lora_adapter(root / "foreign", other)}


CASES = [
    (["--adapter", "{adapter}"], r"needs a name and a directory: NAME=ADAPTER_DIR"),
    (["--adapter", "=x"], r"needs a name and a directory"),
    (["--adapter", "a={root}/missing"], r"no such adapter directory"),
    (["--adapter", "a={adapter}", "--adapter-dir", "{root}/nowhere"], r"--adapter-dir .* does not exist"),
    (["--adapter", "a={adapter}", "--api-key-file", "{root}/no-key"], r"cannot read --api-key-file"),
    (["--adapter", "a={adapter}", "--api-key-file", "{root}/empty-key"], r"--api-key-file .* is empty"),
    (["--adapter", "a={adapter}", "--host", "0.0.0.0"], r"--host 0.0.0.0 .* --api-key-file"),
    (["--adapter", "../a={adapter}"], r"adapter name '../a' must be"),
    (["--model", "{base}", "--adapter", "a={foreign}"], r"trained on .*other.*not on this server's base"),
]


IDS = ["adapter-without-name", "adapter-empty-name", "adapter-dir-missing", "runtime-adapter-dir-missing",
       "api-key-file-missing", "api-key-file-empty", "public-host-without-key", "adapter-name-traversal",
       "adapter-on-another-base"]


@pytest.mark.parametrize("argv, matches", CASES, ids=IDS)
def test_bad_serve_arguments_fail_in_one_line(argv: list[str], matches: str, models: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    filled = [a.format(**{k: str(v) for k, v in models.items()}) for a in argv]
    expect_cli_error(["serve", *filled, "--port", str(_free_port())], capsys, matches=matches,
                     watch=[models["adapter"]])


def test_port_in_use_fails_in_one_line(models: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        expect_cli_error(["serve", "--model", str(models["base"]), "--adapter", f"a={models['adapter']}",
                          "--port", str(port)], capsys, matches=rf"port {port} on 127.0.0.1 is in use")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
