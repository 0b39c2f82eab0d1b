"""Bad input to `lorakit export --format gguf`: exit code 2 and one error line naming the problem and the fix;
nothing is written and every file that was there is unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import expect_cli_error, tiny_llama

from lorakit import LoraConfig, inject, save_adapter

Setup = Callable[[Path], None]  # prepares tmp_path (which holds base/ and adapter/) before the command runs


def _adapter(path: Path, **config: object) -> None:
    """A LoRA adapter on conftest's tiny_llama recording `base` as its base (no command here loads the base)."""
    model = tiny_llama()
    inject(model, LoraConfig(**{"rank": 2, "targets": ["q_proj", "v_proj"], "seed": 0, **config}))  # type: ignore[arg-type]
    save_adapter(model, path, base_model="base")


def _nothing(tmp: Path) -> None:
    pass


def _existing_gguf(tmp: Path) -> None:
    (tmp / "out.gguf").write_bytes(b"GGUF earlier export")


def _existing_other(tmp: Path) -> None:
    (tmp / "out.gguf").write_text("my notes\n")


def _principal(tmp: Path) -> None:
    _adapter(tmp / "pissa", init="principal")


CASES = [
    pytest.param(["--model", "{bert}"], _nothing, r"GGUF export does not support BertModel; supported: "
                 r"LlamaForCausalLM", id="unknown-architecture"),
    pytest.param(["--model", "base"], _existing_gguf, r"out.gguf exists; pass force=True \(--force\) to replace it",
                 id="existing-file-without-force"),
    pytest.param(["--model", "base", "--force"], _existing_other, r"out.gguf exists and is not a GGUF file; --force "
                 r"replaces only an earlier GGUF export", id="force-on-a-file-that-is-not-gguf"),
    pytest.param(["--model", "base", "--out", "base"], _nothing, r"--out base is a directory; give the GGUF file",
                 id="out-is-a-directory"),
    pytest.param(["--model", "base", "--out", "model.bin"], _nothing, r"--out model.bin should end in .gguf",
                 id="out-without-gguf-suffix"),
    pytest.param(["--model", "base", "--type", "q4_0"], _nothing,
                 r"argument --type: invalid choice: 'q4_0' \(choose from .*f16.*q8_0", id="unknown-type"),
    pytest.param(["--format", "onnx", "--model", "base"], _nothing,
                 r"argument --format: invalid choice: 'onnx' \(choose from .*gguf", id="unknown-format"),
    pytest.param(["--model", "base", "--adapter-only"], _nothing, r"--adapter-only needs --adapter DIR",
                 id="adapter-only-without-adapter"),
    pytest.param(["--adapter", "adapter", "--adapter-only", "--type", "q8_0"], _nothing,
                 r"--type applies to the merged model; --adapter-only writes the LoRA factors in f32",
                 id="adapter-only-with-type"),
    pytest.param(["--adapter", "pissa", "--adapter-only"], _principal, r"pissa is a principal \(PiSSA\) adapter.*"
                 r"lorakit prune --principal convert", id="adapter-only-principal"),
    pytest.param(["--adapter", "missing"], _nothing, r"adapter directory 'missing' does not exist",
                 id="missing-adapter"),
]


@pytest.mark.parametrize("argv, setup, matches", CASES)
def test_bad_export_gguf(argv: list[str], setup: Setup, matches: str, tmp_path: Path, tiny_classifier_dir: Path,
                         capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()  # refused before any model loads
    _adapter(tmp_path / "adapter")
    setup(tmp_path)
    argv = [a.replace("{bert}", str(tiny_classifier_dir)) for a in argv]
    if "--format" not in argv:
        argv = ["--format", "gguf", *argv]
    if "--out" not in argv:
        argv = [*argv, "--out", "out.gguf"]
    before = sorted(tmp_path.rglob("*"))
    expect_cli_error(["export", *argv], capsys, matches=matches, watch=[tmp_path])
    assert sorted(tmp_path.rglob("*")) == before  # nothing new: no output file, no temporary file
