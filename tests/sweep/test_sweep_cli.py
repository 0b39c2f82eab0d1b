"""`lorakit sweep` end to end on a tiny model: two points trained, the table printed, and each point's recorded
command reproducing that point alone."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from conftest import write_config
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.io import WEIGHTS_NAME
from lorakit.sweep.report import POINT_FILE


def test_sweep_trains_each_point_prints_the_table_and_records_each_command(
        tmp_path: Path, tiny_classifier_dir: Path, sentiment_tsv: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml", tiny_classifier_dir, *sentiment_tsv, tmp_path / "run",
                          optim={"max_steps": 2})
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--lora.rank=1,4", "--optim.lr=5e-3", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert [line[:20] for line in captured.err.splitlines() if line.startswith("[")] == [
        "[1/2] lora.rank=1: l", "[2/2] lora.rank=4: l"]
    assert "| lora.rank=1 |" in captured.out and "| lora.rank=4 |" in captured.out
    assert f"2 trained, 0 finished earlier; sweep.json, sweep.md and pareto.png in {out}" in captured.out
    table = json.loads((out / "sweep.json").read_text())
    low, high = table["points"]
    assert low["status"] == high["status"] == "done"
    assert low["trainable_params"] < high["trainable_params"]
    assert (out / "pareto.png").is_file()

    # The point's command, run alone (over the point's directory), trains the same adapter.
    point = json.loads((out / "lora.rank=4" / POINT_FILE).read_text())
    assert point["command"] == high["command"]
    swept = load_file(out / "lora.rank=4" / "adapter" / WEIGHTS_NAME)
    words = shlex.split(point["command"])
    assert words[0] == "lorakit" and "--optim.lr=5e-3" in words
    assert main([*words[1:], "--force", "--quiet"]) == 0
    alone = load_file(out / "lora.rank=4" / "adapter" / WEIGHTS_NAME)
    assert swept.keys() == alone.keys() and all(swept[k].equal(alone[k]) for k in swept)

    capsys.readouterr()
    assert main(["sweep", str(config), "--lora.rank=1,4", "--optim.lr=5e-3", "--out", str(out), "--quiet"]) == 0
    assert "0 trained, 2 finished earlier" in capsys.readouterr().out
