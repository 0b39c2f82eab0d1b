"""Bad input to `lorakit sweep`: exit code 2 and one error line naming the flag (or point) and the fix, found
before the first point trains: nothing is trained and nothing is written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import expect_cli_error, write_config

from lorakit.outputs import claim_output_dir
from lorakit.sweep import run as sweep_run

Setup = Callable[[Path], None]  # prepares tmp_path before the command runs


def _nothing(tmp: Path) -> None:
    pass


def _foreign_out(tmp: Path) -> None:
    (tmp / "sweep").mkdir()
    (tmp / "sweep" / "notes.txt").write_text("mine\n")


def _other_sweep_out(tmp: Path) -> None:
    """An earlier sweep of another grid in the output directory."""
    from lorakit.sweep.plan import plan_sweep
    from lorakit.sweep.report import write_outputs

    plan = plan_sweep(tmp / "c.yaml", ["--lora.rank=1,2"], out_dir=tmp / "sweep")
    claim_output_dir(plan.out_dir, kind=sweep_run.SWEEP_KIND)
    write_outputs(plan, {})


CASES = [
    pytest.param(["--lora.rank=4,0,8"], _nothing, r"point lora\.rank=0: lora\.rank must be a positive int, got 0",
                 id="bad-value-in-list"),
    pytest.param(["--lora.rank=0,-1"], _nothing, r"\(1\) point lora\.rank=0: .* \(2\) point lora\.rank=-1: ",
                 id="every-bad-value-named"),
    pytest.param(["--lora.rank="], _nothing, r"--lora\.rank=: the list of values is empty", id="empty-list"),
    pytest.param(["--lora.rank=4,,8"], _nothing, r"value 2 of the list is empty", id="empty-value"),
    pytest.param(["--lora.rnak=4,8"], _nothing, r"unknown key lora\.rnak \(did you mean 'rank'\?\)",
                 id="unknown-key"),
    pytest.param(["--lora.rank=4"], _nothing, r"nothing to sweep: no key lists several values", id="no-list"),
    pytest.param(["--lora.rank=[4,8]"], _nothing, r"takes one value per point, not a list.*--lora\.rank=4,8",
                 id="bracketed-list-of-a-one-value-key"),
    pytest.param(["--lora.targets=query,value"], _nothing, r"ambiguous: lora\.targets takes a list",
                 id="ambiguous-list-key"),
    pytest.param(["--lora.rank=4,4"], _nothing, r"'4' is listed twice", id="repeated-value"),
    pytest.param(["--lora.rank=4,8", "--lora.rank=16"], _nothing, r"lora\.rank is given twice", id="key-twice"),
    pytest.param(["--run.out_dir=a,b"], _nothing, r"run\.out_dir is set by the sweep", id="swept-out-dir"),
    pytest.param(["--lora.alpha=[1,2"], _nothing, r"unclosed bracket", id="unbalanced-bracket"),
    pytest.param(["--lora.rank=4,8", "--optim.lr=-1"], _nothing, r"optim\.lr must be > 0, got -1",
                 id="bad-fixed-flag"),
    pytest.param(["--lora.rank=4,8", "--record", "results.txt"], _nothing, r"a results file is a \.json file",
                 id="record-not-json"),
    pytest.param(["--lora.rank=4,8"], _foreign_out, r"sweep already holds files lorakit did not write",
                 id="out-holds-other-files"),
    pytest.param(["--lora.rank=4,8"], _other_sweep_out, r"holds another sweep \(grid lora\.rank=1,2\); pass --force",
                 id="out-holds-another-sweep"),
]


@pytest.mark.parametrize("argv, setup, matches", CASES)
def test_bad_sweep(argv: list[str], setup: Setup, matches: str, tmp_path: Path, sentiment_tsv: tuple[Path, Path],
                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[str] = []
    monkeypatch.setattr(sweep_run, "train_from_config", lambda config, **_: trained.append(config.run.out_dir))
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "c.yaml", "minilm", *sentiment_tsv, tmp_path / "run")
    setup(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    expect_cli_error(["sweep", config, *argv, "--out", tmp_path / "sweep"], capsys, matches=matches,
                     watch=[tmp_path])
    assert trained == []
    assert sorted(tmp_path.rglob("*")) == before  # nothing new: no sweep, run or results file


def test_a_missing_config_file_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_cli_error(["sweep", tmp_path / "nowhere.yaml", "--lora.rank=4,8"], capsys,
                     matches=r"config file '.*nowhere\.yaml' does not exist", watch=[tmp_path])
    assert list(tmp_path.iterdir()) == []
