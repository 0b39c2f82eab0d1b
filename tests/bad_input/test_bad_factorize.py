"""Bad input to `lorakit factorize`: exit code 2 and one error line naming the problem and the fix; nothing is
written and every file that was there is unchanged."""

from __future__ import annotations

import pytest
from conftest import expect_cli_error

CASES = [
    pytest.param(["--ratio", "0"], r"ratio must be in \(0, 1\], got 0\.0", id="ratio-0"),
    pytest.param(["--ratio", "1.5"], r"ratio must be in \(0, 1\], got 1\.5", id="ratio-1.5"),
    pytest.param(["--energy", "0"], r"energy must be in \(0, 1\], got 0\.0", id="energy-0"),
    pytest.param(["--energy", "1.5"], r"energy must be in \(0, 1\], got 1\.5", id="energy-1.5"),
    pytest.param(["--rank", "33"], r"rank 33 is larger than min\(fan_in, fan_out\) of .*use rank <= 32",
                 id="rank-above-min-dims"),
    pytest.param(["--rank", "0"], r"rank must be an int >= 1, got 0", id="rank-0"),
    pytest.param(["--rank", "2", "--method", "activation"], r"--method activation needs --calibration-texts",
                 id="activation-without-calibration"),
    pytest.param(["--rank", "2", "--method", "activation", "--calibration-texts", "{tmp}/empty.txt"],
                 r"empty\.txt.* holds no text", id="empty-calibration-file"),
    pytest.param(["--rank", "2", "--method", "activation", "--calibration-texts", "{tmp}/missing.txt"],
                 r"missing\.txt.* does not exist", id="missing-calibration-file"),
    pytest.param(["--rank", "2", "--targets", "q_prj"], r"q_prj", id="targets-match-nothing"),
    pytest.param(["--rank", "2", "--ratio", "0.5"], r"not allowed with argument", id="two-sizes"),
    pytest.param(["--ratio", "0.5", "--rank-multiple", "0"], r"rank_multiple must be an int >= 1, got 0",
                 id="rank-multiple-0"),
]


@pytest.mark.parametrize(("extra", "matches"), CASES)
def test_bad_factorize_input_exits_2_and_writes_nothing(extra, matches, tmp_path, tiny_classifier_dir, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n")
    argv = ["factorize", "--model", tiny_classifier_dir, *[a.format(tmp=tmp_path) for a in extra],
            "--out", tmp_path / "out"]
    expect_cli_error(argv, capsys, matches=matches, watch=[tmp_path, tiny_classifier_dir])
    assert not (tmp_path / "out").exists()


def test_factorize_refuses_a_foreign_out_directory_and_leaves_it_unchanged(tmp_path, tiny_classifier_dir, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    expect_cli_error(["factorize", "--model", tiny_classifier_dir, "--rank", "2", "--out", tmp_path / "out"], capsys,
                     matches=r"already holds files lorakit did not write", watch=[tmp_path])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]
