"""Bad input to `lorakit analyze`: exit code 2 and one error line naming the problem and the fix, found before
the base model loads: no model is loaded, nothing is written and every file that was there is unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import expect_cli_error, tiny_bert, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, inject, save_adapter
from lorakit.analysis import base as analysis_base
from lorakit.analysis.report import write_report
from lorakit.io import PRINCIPAL_NAME

Setup = Callable[[Path], None]  # prepares tmp_path before the command runs
BASE = "tiny-base"


def _adapter(path: Path, *, base: str = BASE, model: torch.nn.Module | None = None, **config) -> None:
    model = model if model is not None else tiny_llama()
    inject(model, LoraConfig(**{"rank": 2, "targets": ["q_proj", "v_proj"], **config}))
    save_adapter(model, path, base_model=base)


def _nothing(tmp: Path) -> None:
    pass


def _file(tmp: Path) -> None:
    (tmp / "file.txt").write_text("not an adapter\n")


def _empty_dir(tmp: Path) -> None:
    (tmp / "empty").mkdir()


def _embedding_only(tmp: Path) -> None:
    _adapter(tmp / "emb", targets=["embed_tokens"])


def _other_base(tmp: Path) -> None:
    _adapter(tmp / "b", base="another-base")


def _no_module_in_common(tmp: Path) -> None:
    _adapter(tmp / "b", targets=["o_proj"])


def _same_name_other_shapes(tmp: Path) -> None:
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    _adapter(tmp / "b", model=wider)


def _no_recorded_base(tmp: Path) -> None:
    model = tiny_llama()
    model.config._name_or_path = ""
    _adapter(tmp / "nobase", base="", model=model)


def _principal_without_init(tmp: Path) -> None:
    _adapter(tmp / "pissa", init="principal")
    (tmp / "pissa" / PRINCIPAL_NAME).unlink()


def _foreign_out(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine\n")


def _earlier_analysis(tmp: Path) -> None:
    from lorakit.analysis import analyze_adapter

    write_report(analyze_adapter(tmp / "a", base=False), tmp / "out")


def _texts(tmp: Path) -> None:
    (tmp / "t.txt").write_text("w5 w6\n", encoding="utf-8")


def _lm_and_texts(tmp: Path) -> None:
    _adapter(tmp / "lm", targets=["o_proj", "down_proj"])
    _texts(tmp)


def _blank_texts(tmp: Path) -> None:
    _adapter(tmp / "lm", targets=["o_proj", "down_proj"])
    (tmp / "t.txt").write_text("\n  \n\n", encoding="utf-8")


def _latin1_texts(tmp: Path) -> None:
    _adapter(tmp / "lm", targets=["o_proj", "down_proj"])
    (tmp / "t.txt").write_bytes("w5\nein Café\n".encode("latin-1"))


def _classifier_and_texts(tmp: Path) -> None:
    _adapter(tmp / "bert", model=tiny_bert(), targets=["query", "value"])
    _texts(tmp)


CASES = [
    pytest.param(["file.txt"], _file, r"'.*file\.txt' is a file, not an adapter directory", id="a-file"),
    pytest.param(["empty"], _empty_dir, r"empty/adapter_config\.json is missing; an adapter directory holds",
                 id="a-directory-that-is-not-an-adapter"),
    pytest.param(["missing"], _nothing, r"adapter directory '.*missing' does not exist", id="missing"),
    pytest.param(["emb"], _embedding_only, r"holds only .*embed_tokens \(not linear\); nothing to analyse",
                 id="no-linear-module"),
    pytest.param(["a", "--against", "b"], _other_base,
                 r"trained on 'tiny-base' and .* on 'another-base'; subspaces of different base models",
                 id="against-another-base"),
    pytest.param(["a", "--against", "b"], _no_module_in_common, r"adapt no linear module in common",
                 id="against-no-module-in-common"),
    pytest.param(["a", "--against", "b"], _same_name_other_shapes,
                 r"module 'model\.layers\.0\.self_attn\.q_proj' is \(32, 32\) in .* but \(48, 48\) .*different base",
                 id="against-same-name-other-shapes"),
    pytest.param(["a", "--against", "file.txt"], _file, r"is a file, not an adapter directory", id="against-a-file"),
    pytest.param(["nobase"], _no_recorded_base, r"records no base model; pass --model .* or --no-base",
                 id="no-recorded-base"),
    pytest.param(["pissa", "--no-base"], _principal_without_init,
                 r"no principal_init\.safetensors; .*needs the base's W .*drop --no-base",
                 id="principal-without-init-and-no-base"),
    pytest.param(["a", "--out", "a/analysis"], _nothing, r"overlaps the input", id="out-inside-the-adapter"),
    pytest.param(["a", "--out", "out"], _foreign_out, r"out already holds files lorakit did not write",
                 id="out-holds-other-files"),
    pytest.param(["a", "--out", "out"], _earlier_analysis, r"earlier lorakit analysis; pass --force",
                 id="out-holds-an-earlier-analysis"),
    pytest.param([], _nothing, r"the following arguments are required: adapter", id="no-adapter-argument"),
    pytest.param(["lm", "--texts", "none.txt"], _lm_and_texts, r"texts file '.*none\.txt' does not exist",
                 id="texts-file-missing"),
    pytest.param(["lm", "--texts", "lm"], _lm_and_texts, r"texts file '.*lm' is a directory",
                 id="texts-file-a-directory"),
    pytest.param(["lm", "--texts", "t.txt"], _blank_texts, r"t\.txt' holds no text \(only blank lines\)",
                 id="texts-file-blank"),
    pytest.param(["lm", "--texts", "t.txt"], _latin1_texts, r"t\.txt' is not UTF-8 \(byte 0xe9 on line 2\)",
                 id="texts-file-not-utf8"),
    pytest.param(["lm", "--texts", "t.txt", "--no-base"], _lm_and_texts,
                 r"texts run through the base model with the adapter applied: drop --no-base", id="texts-no-base"),
    pytest.param(["bert", "--texts", "t.txt"], _classifier_and_texts,
                 r"trained with a sequence-classification head; texts orient the token projection of a causal LM",
                 id="texts-for-a-classifier"),
    pytest.param(["a", "--texts", "t.txt"], _texts,
                 r"adapts no module that writes into the residual stream \(o_proj, down_proj, c_proj, \.\.\.\)",
                 id="texts-without-residual-writers"),
]


@pytest.mark.parametrize("argv, setup, matches", CASES)
def test_bad_analyze(argv: list[str], setup: Setup, matches: str, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    monkeypatch.setattr(analysis_base, "load_model", lambda name, **_: loaded.append(name))
    monkeypatch.chdir(tmp_path)
    _adapter(tmp_path / "a")
    setup(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    expect_cli_error(["analyze", *argv], capsys, matches=matches, watch=[tmp_path])
    assert loaded == []
    assert sorted(tmp_path.rglob("*")) == before  # nothing new: no output directory, no report
