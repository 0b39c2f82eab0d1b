"""Bad input to `lorakit combine`: exit code 2 and one error line naming the problem and the fix; nothing is written
and every file that was there is unchanged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from arithmetic.arithmetic_helpers import make_adapter
from conftest import expect_cli_error

Setup = Callable[[Path], None]  # prepares tmp_path (which holds adapters a and b) before the command runs


def _nothing(tmp: Path) -> None:
    pass


def _fewer_modules(tmp: Path) -> None:
    make_adapter(tmp / "v", seed=3, targets=["v_proj"])


def _foreign_out(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine\n")


CASES = [
    pytest.param(["a=a", "b=b:half"], _nothing,
                 r"adapter argument 'b=b:half': weight 'half' is not a number; expected NAME=ADAPTER_DIR\[:WEIGHT\]",
                 id="weight-not-a-number"),
    pytest.param(["a=a", "b"], _nothing, r"adapter argument 'b' needs a name and a directory; expected NAME=",
                 id="missing-equals"),
    pytest.param(["a=a", "=b"], _nothing, r"adapter argument '=b' needs a name", id="missing-name"),
    pytest.param(["a=a", "a=b"], _nothing, r"adapter name 'a' is given twice", id="duplicate-name"),
    pytest.param(["a=a", "b=b:nan"], _nothing, r"weight of adapter 'b' must be a finite number", id="weight-nan"),
    pytest.param(["a=a", "b=b", "--method", "ties", "--density", "0"], _nothing,
                 r"density must be a number in \(0, 1\], got 0\.0", id="ties-density-0"),
    pytest.param(["a=a", "b=b", "--method", "ties", "--density", "1.5"], _nothing,
                 r"density must be a number in \(0, 1\], got 1\.5", id="ties-density-1.5"),
    pytest.param(["a=a", "b=b", "--method", "ties"], _nothing, r"method 'ties' needs density",
                 id="ties-without-density"),
    pytest.param(["a=a", "b=b", "--method", "dare", "--rate", "1"], _nothing,
                 r"rate must be a number in \[0, 1\), got 1\.0", id="dare-rate-1"),
    pytest.param(["a=a", "b=b", "--method", "svd"], _nothing,
                 r"argument --method: invalid choice: 'svd' \(choose from .*linear.*cat.*ties.*dare",
                 id="unknown-method"),
    pytest.param(["a=a", "b=b", "--method", "cat", "--rank", "2"], _nothing, r"method 'cat' is exact.*drop rank",
                 id="rank-with-cat"),
    pytest.param(["a=a", "b=b", "--rank", "0"], _nothing, r"rank must be an int >= 1, got 0", id="rank-0"),
    pytest.param(["a=a", "v=v"], _fewer_modules,
                 r"adapter 'v' does not adapt 12 module\(s\) the others do.*targets='union'.*targets='intersection'",
                 id="different-modules-without-targets"),
    pytest.param(["a=a", "b=b"], _foreign_out,
                 r"out already holds files lorakit did not write \(notes.txt\); choose an empty or new output",
                 id="out-holds-other-files"),
    pytest.param(["a=a", "b=b", "--out", "a"], _nothing, r"output a overlaps the input", id="out-is-an-input"),
    pytest.param(["a=a", "b=missing"], _nothing, r"adapter directory 'missing' does not exist",
                 id="missing-adapter"),
]


@pytest.mark.parametrize("argv, setup, matches", CASES)
def test_bad_combine(argv: list[str], setup: Setup, matches: str, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_adapter(tmp_path / "a", seed=1)
    make_adapter(tmp_path / "b", seed=2)
    setup(tmp_path)
    if "--out" not in argv:
        argv = [*argv, "--out", "out"]
    before = sorted(tmp_path.rglob("*"))
    expect_cli_error(["combine", *argv], capsys, matches=matches, watch=[tmp_path])
    assert sorted(tmp_path.rglob("*")) == before  # nothing new: no output directory
