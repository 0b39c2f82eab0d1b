"""Bad input to `lorakit ui`: exit code 2 and one error line naming the problem and the fix, before anything
listens."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import expect_cli_error


def _empty_token(tmp: Path) -> None:
    (tmp / "token").write_text("\n")


def _nothing(tmp: Path) -> None:
    pass


CASES = [
    pytest.param(["--host", "0.0.0.0"], _nothing, r"--host 0\.0\.0\.0 lets other machines.*--token-file",
                 id="open-host-without-token"),
    pytest.param(["--token-file", "token"], _empty_token, r"--token-file token is empty", id="empty-token-file"),
    pytest.param(["--token-file", "missing"], _nothing, r"cannot read --token-file missing", id="missing-token-file"),
]


@pytest.mark.parametrize(("argv", "setup", "matches"), CASES)
def test_bad_ui_arguments_are_refused_with_one_line(argv, setup, matches, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    setup(tmp_path)
    expect_cli_error(["ui", *argv], capsys, matches=matches, watch=[tmp_path])
