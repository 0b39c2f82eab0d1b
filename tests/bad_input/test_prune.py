"""Bad input to `lorakit prune`: exit code 2 and one error line naming the problem and the fix; nothing is written
and every file that was there is unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import expect_cli_error, tiny_llama

from lorakit import LoraConfig, inject, save_adapter
from lorakit.io import PRINCIPAL_NAME

Setup = Callable[[Path], None]  # prepares tmp_path before the command runs


def _adapter(path: Path, **config) -> None:
    model = tiny_llama()
    inject(model, LoraConfig(**{"rank": 4, "targets": ["llama"], **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    save_adapter(model, path, base_model="tiny-llama")


def _nothing(tmp: Path) -> None:
    pass


def _principal(tmp: Path) -> None:
    _adapter(tmp / "pissa", init="principal")


def _principal_without_init(tmp: Path) -> None:
    _principal(tmp)
    (tmp / "pissa" / PRINCIPAL_NAME).unlink()


def _merged_model(tmp: Path) -> None:
    tiny_llama().save_pretrained(tmp / "merged")


def _foreign_out(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine\n")


def _earlier_prune(tmp: Path) -> None:
    from lorakit.compress import prune_adapter

    prune_adapter(tmp / "a", tmp / "out", rank=1)


CASES = [
    pytest.param(["a", "--energy", "0"], _nothing, r"energy must be in \(0, 1\].* got 0\.0", id="energy-0"),
    pytest.param(["a", "--energy", "1.5"], _nothing, r"energy must be in \(0, 1\].* got 1\.5", id="energy-1.5"),
    pytest.param(["a", "--energy", "nan"], _nothing, r"energy must be in \(0, 1\].* got nan", id="energy-nan"),
    pytest.param(["a", "--rank", "0"], _nothing, r"rank must be an int >= 1, got 0", id="rank-0"),
    pytest.param(["a", "--rank", "17"], _nothing,
                 r"rank 17 is above min\(fan_out, fan_in\) = 16 of '.*k_proj' \(16 x 32\).*pass --rank <= 16",
                 id="rank-above-min-fan"),
    pytest.param(["a", "--rank", "2", "--energy", "0.9"], _nothing, r"not allowed with argument",
                 id="rank-and-energy"),
    pytest.param(["a"], _nothing, r"one of the arguments --rank --energy is required", id="neither-rank-nor-energy"),
    pytest.param(["pissa", "--rank", "2"], _principal,
                 r"principal \(PiSSA\) adapter: its factors pair with the residual base .*--principal convert",
                 id="principal-without-flag"),
    pytest.param(["pissa", "--rank", "2", "--principal", "convert"], _principal_without_init,
                 r"principal_init\.safetensors is missing: converting a principal adapter needs its initial factors",
                 id="principal-convert-without-init"),
    pytest.param(["a", "--rank", "2", "--principal", "convert"], _nothing,
                 r"--principal convert applies to principal \(PiSSA\) adapters.*drop the flag",
                 id="principal-flag-on-a-standard-adapter"),
    pytest.param(["merged", "--rank", "2"], _merged_model,
                 r"'.*merged' is a merged model .*prune the adapter before merging", id="merged-model-dir"),
    pytest.param(["a", "--rank", "2", "--out", "a"], _nothing, r"output a overlaps the input a",
                 id="out-is-the-adapter"),
    pytest.param(["a", "--rank", "2", "--out", "a/pruned"], _nothing, r"overlaps the input", id="out-inside-adapter"),
    pytest.param(["a", "--rank", "2", "--out", "out"], _foreign_out, r"out already holds files lorakit did not write",
                 id="out-holds-other-files"),
    pytest.param(["a", "--rank", "2", "--out", "out"], _earlier_prune,
                 r"out already holds an earlier lorakit pruned adapter; pass --force", id="out-holds-earlier-prune"),
    pytest.param(["missing", "--rank", "2"], _nothing, r"adapter directory 'missing' does not exist",
                 id="missing-adapter"),
]


@pytest.mark.parametrize("argv, setup, matches", CASES)
def test_bad_prune(argv: list[str], setup: Setup, matches: str, tmp_path: Path,
                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _adapter(tmp_path / "a")
    setup(tmp_path)
    if "--out" not in argv:
        argv = [*argv, "--out", "out"]
    before = sorted(tmp_path.rglob("*"))
    expect_cli_error(["prune", *argv], capsys, matches=matches, watch=[tmp_path])
    assert sorted(tmp_path.rglob("*")) == before  # nothing new: no output directory
