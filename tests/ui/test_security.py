"""lorakit.ui.security: run names, paths confined to the page's directories (links resolved first), the Host
check against DNS rebinding and the token comparison."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lorakit.ui.security import UiSettings, check_path, check_run_name, host_ok, token_ok


@pytest.mark.parametrize("name", ["run-1", "sst2_r8.lr3e-4", "A"])
def test_a_plain_directory_name_is_a_run_name(name):
    assert check_run_name(name) is None


@pytest.mark.parametrize("name", ["../x", "x/..", "a/b", "..", ".hidden", "-x", "x" * 65, "", None, "a\\b"])
def test_a_name_that_is_not_one_plain_directory_is_refused(name):
    assert check_run_name(name) is not None


def test_paths_inside_the_working_or_runs_directory_pass_and_others_are_refused(tmp_path):
    settings = UiSettings(root=tmp_path / "work", runs_dir=tmp_path / "runs")
    assert check_path(settings, "data.train", "data/train.tsv") is None
    assert check_path(settings, "data.train", str(tmp_path / "runs" / "x.tsv")) is None
    problem = check_path(settings, "data.train", "../elsewhere.tsv")
    assert problem is not None and "data.train '../elsewhere.tsv' lies outside" in problem


def test_a_link_inside_the_working_directory_that_points_outside_is_refused(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "secret.tsv").write_text("x\n")
    os.symlink(tmp_path / "secret.tsv", tmp_path / "work" / "link.tsv")
    settings = UiSettings(root=tmp_path / "work")
    assert check_path(settings, "data.train", "link.tsv") is not None


def test_an_allowed_directory_may_be_read(tmp_path):
    settings = UiSettings(root=tmp_path / "work", allow=[Path(tmp_path / "shared")])
    assert check_path(settings, "data.eval", str(tmp_path / "shared" / "dev.tsv")) is None


@pytest.mark.parametrize(("header", "ok"), [("127.0.0.1:7860", True), ("localhost:7860", True), ("[::1]:7860", True),
                                            ("localhost", True), ("evil.example:7860", False),
                                            ("127.0.0.1.evil.example", False)])
def test_a_loopback_page_without_token_answers_only_loopback_host_names(tmp_path, header, ok):
    assert host_ok(UiSettings(root=tmp_path), header) is ok


def test_with_a_token_the_host_name_is_not_checked(tmp_path):
    assert host_ok(UiSettings(root=tmp_path, token="t"), "my-box.lan:7860")


def test_the_token_must_match_exactly():
    assert token_ok(None, None) and token_ok("abc", "abc")
    assert not token_ok("abc", None) and not token_ok("abc", "abcd") and not token_ok("abc", "")
