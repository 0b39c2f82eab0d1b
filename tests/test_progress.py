"""Progress bars: drawn on stderr for a terminal (or LORAKIT_PROGRESS=1), never into pipes, logs or tests."""

from __future__ import annotations

import pytest

from lorakit.progress import progress, stage


def test_no_bar_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAKIT_PROGRESS", raising=False)
    assert list(progress(range(3), desc="evaluate")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_lorakit_progress_1_draws_the_bar_with_its_name(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_PROGRESS", "1")
    assert list(progress(range(3), desc="evaluate")) == [0, 1, 2]
    with stage("converting", 2) as bar:
        bar.update(2)
    err = capsys.readouterr().err
    assert "evaluate:" in err and "/3 [" in err and "converting:" in err


def test_lorakit_progress_0_silences_even_a_terminal(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_PROGRESS", "0")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert list(progress(range(2), desc="generate")) == [0, 1]
    assert capsys.readouterr().err == ""
