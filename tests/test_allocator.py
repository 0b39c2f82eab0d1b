"""lorakit.allocator: which malloc serves the process, and starting a command again under jemalloc."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorakit import allocator
from lorakit.cli import main
from lorakit.errors import LorakitError

JEMALLOC = allocator.find_jemalloc() if not os.environ.get(allocator.PATH_VARIABLE) else None
needs_jemalloc = pytest.mark.skipif(JEMALLOC is None, reason="no jemalloc library here (apt-get install libjemalloc2)")
REPORT = "from lorakit.allocator import active_allocator; print(active_allocator())"


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc is Linux's C library")
def test_the_test_process_runs_on_glibc():
    assert allocator.active_allocator() == "glibc"


@needs_jemalloc
def test_a_preloaded_jemalloc_is_recognised():
    out = _python(REPORT, LD_PRELOAD=JEMALLOC)
    assert out.stdout.split() == ["jemalloc"], out.stderr


@needs_jemalloc
def test_relaunch_runs_the_command_again_under_jemalloc_in_the_same_process():
    code = ("import os, sys; from lorakit import allocator; print(os.getpid(), allocator.active_allocator(), "
            "flush=True); allocator.relaunch_under_jemalloc([sys.executable, '-c', 'import os; from "
            "lorakit.allocator import active_allocator as a; print(os.getpid(), a())'])")
    out = _python(code)
    (pid, before), (pid_after, after) = (line.split() for line in out.stdout.splitlines())
    assert (before, after, pid_after) == ("glibc", "jemalloc", pid), out.stderr


def test_relaunch_without_a_library_names_the_package_and_the_variable(monkeypatch):
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    with pytest.raises(LorakitError, match=r"apt-get install libjemalloc2.*LORAKIT_JEMALLOC"):
        allocator.relaunch_under_jemalloc([sys.executable, "-c", "pass"])


def test_a_missing_library_path_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv(allocator.PATH_VARIABLE, str(tmp_path / "libjemalloc.so.2"))
    with pytest.raises(LorakitError, match="LORAKIT_JEMALLOC=.* is not a file"):
        allocator.find_jemalloc()


def test_a_relaunched_process_without_jemalloc_stops_instead_of_looping():
    code = "import sys; from lorakit import allocator; allocator.relaunch_under_jemalloc([sys.executable, '-V'])"
    out = _python(code, LORAKIT_RELAUNCHED_UNDER="jemalloc")
    assert out.returncode != 0 and "but does not serve the process" in out.stderr


def test_unknown_allocator_and_in_process_calls_are_refused():
    with pytest.raises(LorakitError, match="unknown allocator 'tcmalloc'"):
        allocator.use_allocator("tcmalloc", [sys.executable])
    allocator.use_allocator("system", None)  # nothing to do
    with pytest.raises(LorakitError, match="must serve the process from its start"):
        allocator.use_allocator("jemalloc", None)


def test_train_asking_for_jemalloc_inside_another_program_is_one_error_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: smollm2}}\ndata: {{train: {tmp_path / 'train.jsonl'}, task: instruction}}\n"
                      f"run: {{out_dir: {tmp_path / 'out'}, allocator: jemalloc}}\n")
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must serve the process from its start" in err[0]
    assert not (tmp_path / "out").exists()


def test_train_with_an_unloadable_jemalloc_path_fails_in_one_line_and_writes_nothing(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: smollm2}}\ndata: {{train: {tmp_path / 'train.jsonl'}, task: instruction}}\n"
                      f"run: {{out_dir: {tmp_path / 'out'}}}\n")
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    out = subprocess.run([sys.executable, "-m", "lorakit", "train", str(config), "--run.allocator=jemalloc"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, allocator.PATH_VARIABLE: str(tmp_path / "missing.so")})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"error: LORAKIT_JEMALLOC={tmp_path / 'missing.so'} is not a file: "
                                               "point it at libjemalloc.so.2, or unset it"]
    assert not (tmp_path / "out").exists()


@needs_jemalloc
def test_train_asking_for_jemalloc_starts_again_under_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {{name: smollm2}}\ndata: {{train: {tmp_path / 'train.jsonl'}, task: instruction}}\n"
                      f"run: {{out_dir: {tmp_path / 'taken'}, allocator: jemalloc}}\n")
    (tmp_path / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "taken").write_text("not a run directory")  # refused after the start again, before any model loads
    out = subprocess.run([sys.executable, "-m", "lorakit", "-v", "train", str(config)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "INFO memory allocator: jemalloc" in out.stderr
    assert (tmp_path / "taken").read_text() == "not a run directory"
