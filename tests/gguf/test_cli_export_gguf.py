"""`lorakit export --format gguf` end to end on a tiny LLaMA with an adapter."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from gguf_models import lora_adapter, tiny_llama_dir

from lorakit.cli import main
from lorakit.cli_tools import GGUF_TYPES
from lorakit.gguf import TYPES


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, Path]:
    base = tiny_llama_dir(tmp_path / "base")
    return base, lora_adapter(tmp_path / "adapter", base)


def test_cli_export_writes_a_merged_q8_0_model_and_says_where(tiny, tmp_path, capsys) -> None:
    _, adapter = tiny
    out = tmp_path / "m.gguf"
    assert main(["export", "--format", "gguf", "--adapter", str(adapter), "--out", str(out), "--type", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert f"written to {out}" in printed and "16 Q8_0, 5 F32" in printed and f"llama-cli -m {out}" in printed
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["general.name"].contents() == "base + adapter"


def test_cli_export_adapter_only_writes_a_lora_file_and_json(tiny, tmp_path, capsys) -> None:
    _, adapter = tiny
    out = tmp_path / "a.gguf"
    argv = ["export", "--format", "gguf", "--adapter", str(adapter), "--lora", "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == 14 and report["alpha"] == 8.0 and report["bytes"] == out.stat().st_size
    assert gguf.GGUFReader(out).fields["general.type"].contents() == "adapter"
    assert main([*argv, "--force"]) == 0


def test_the_cli_types_are_the_librarys() -> None:
    assert GGUF_TYPES == tuple(TYPES)
