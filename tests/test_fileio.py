"""Atomic writes: the old version or the new one, never half of each; errors that name the target; the umask."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from lorakit import fileio
from lorakit.fileio import (
    AtomicWriteError,
    atomic_write_bytes,
    atomic_write_dir,
    os_error_of,
    recover_interrupted_writes,
)


def _fill_with(files: dict[str, bytes]):
    def fill(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
    return fill


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def old_version(tmp_path) -> Path:
    target = tmp_path / "out"
    atomic_write_dir(target, _fill_with({"a.bin": b"old a", "sub/b.bin": b"old b"}))
    return target


def test_atomic_write_dir_replaces_the_previous_version_and_leaves_nothing_else(tmp_path, old_version):
    atomic_write_dir(old_version, _fill_with({"c.bin": b"new c"}))
    assert _tree(old_version) == {"c.bin": b"new c"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_fill_that_raises_leaves_the_old_version_and_no_leftovers(tmp_path, old_version):
    def fill(tmp: Path) -> None:
        (tmp / "a.bin").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # not an OS error: passed through unchanged
        atomic_write_dir(old_version, fill)
    assert _tree(old_version) == {"a.bin": b"old a", "sub/b.bin": b"old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_full_disk_while_filling_is_one_error_that_names_the_target_and_keeps_the_old_version(tmp_path,
                                                                                                old_version):
    def fill(tmp: Path) -> None:
        (tmp / "a.bin").write_bytes(b"half")
        raise _enospc()

    with pytest.raises(AtomicWriteError) as caught:
        atomic_write_dir(old_version, fill, what="merged model")
    message = str(caught.value)
    assert message == (f"no space left on device while writing merged model {old_version}; it was not written and "
                       "what was there before is unchanged")
    assert caught.value.cause.errno == errno.ENOSPC and caught.value.target == old_version
    assert _tree(old_version) == {"a.bin": b"old a", "sub/b.bin": b"old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_full_disk_on_a_new_target_says_it_was_not_written(tmp_path):
    def fill(tmp: Path) -> None:
        raise _enospc()

    with pytest.raises(AtomicWriteError, match=r"while writing directory .*new; it was not written and nothing "
                                               r"else changed$"):
        atomic_write_dir(tmp_path / "new", fill)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_fsync_keeps_the_old_file_and_removes_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"old")

    def fsync(fd: int) -> None:
        raise _enospc()

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(AtomicWriteError, match=r"^no space left on device while writing file .*f\.json; it was "
                                               r"not written and what was there before is unchanged$"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_a_rust_librarys_io_error_is_recognised_as_the_os_error_it_names():
    found = os_error_of(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert found is not None and found.errno == errno.ENOSPC
    assert os_error_of(ValueError("shape mismatch")) is None


def test_an_inner_atomic_write_that_fails_is_reported_for_the_outer_target(tmp_path, old_version):
    def fill(tmp: Path) -> None:
        atomic_write_dir(tmp / "inner", lambda inner: (_ for _ in ()).throw(_enospc()))

    with pytest.raises(AtomicWriteError) as caught:
        atomic_write_dir(old_version, fill, what="checkpoint")
    assert caught.value.target == old_version
    assert f"checkpoint {old_version};" in str(caught.value)
    assert _tree(old_version) == {"a.bin": b"old a", "sub/b.bin": b"old b"}


def _fail_on_replace(monkeypatch, call: int, exc: BaseException) -> None:
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == call:
            raise exc
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)


@pytest.mark.parametrize("call", [1, 2], ids=["moving-the-old-version-aside", "moving-the-new-version-in"])
def test_an_interrupt_mid_swap_leaves_the_old_version_complete_and_no_leftovers(tmp_path, old_version, monkeypatch,
                                                                                call):
    _fail_on_replace(monkeypatch, call, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        atomic_write_dir(old_version, _fill_with({"c.bin": b"new c"}))
    monkeypatch.undo()
    assert _tree(old_version) == {"a.bin": b"old a", "sub/b.bin": b"old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _kill_between_the_two_renames(old_version: Path) -> None:
    # A real kill runs no cleanup: fork, and end the child with os._exit where the target is briefly absent.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        real = os.replace
        calls = []

        def replace(src, dst):
            calls.append(src)
            if len(calls) == 2:
                os._exit(9)
            real(src, dst)

        fileio.os.replace = replace  # type: ignore[assignment]
        try:
            atomic_write_dir(old_version, _fill_with({"c.bin": b"new c"}))
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9


def test_a_kill_between_the_two_renames_leaves_one_complete_version_on_disk(tmp_path, old_version):
    _kill_between_the_two_renames(old_version)
    assert not old_version.exists()
    (aside,) = tmp_path.glob(".out.old-*")
    (new,) = tmp_path.glob(".out.new-*")
    assert _tree(aside / "previous") == {"a.bin": b"old a", "sub/b.bin": b"old b"}
    assert _tree(new) == {"c.bin": b"new c"}


def test_recovery_puts_back_the_version_a_killed_swap_moved_aside(tmp_path, old_version):
    _kill_between_the_two_renames(old_version)
    assert recover_interrupted_writes(tmp_path) == [old_version]
    assert _tree(old_version) == {"a.bin": b"old a", "sub/b.bin": b"old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recovery_deletes_half_built_directories_and_temp_files_and_nothing_else(tmp_path, old_version):
    (tmp_path / ".out.new-1a2b3c4d").mkdir()
    (tmp_path / ".out.old-5e6f7a8b").mkdir()  # the previous version already deleted, `out` in place
    (tmp_path / ".f.json.0badf00d.tmp").write_bytes(b"half")
    (tmp_path / ".hidden").write_bytes(b"mine")
    (tmp_path / "notes.new-1").write_bytes(b"mine")
    (tmp_path / ".draft.new-notes").write_bytes(b"mine too")  # not a name lorakit makes
    assert recover_interrupted_writes(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".draft.new-notes", ".hidden", "notes.new-1", "out"]
    assert _tree(old_version) == {"a.bin": b"old a", "sub/b.bin": b"old b"}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_directories_honour_the_umask(tmp_path, umask_022):
    atomic_write_bytes(tmp_path / "f.json", b"{}")
    atomic_write_dir(tmp_path / "d", _fill_with({"w.bin": b"x", "sub/v.bin": b"y"}))
    atomic_write_dir(tmp_path / "d", _fill_with({"w.bin": b"z"}))  # a replacement too, not only a first write
    assert _mode(tmp_path / "f.json") == 0o644
    assert _mode(tmp_path / "d") == 0o755
    assert _mode(tmp_path / "d" / "w.bin") == 0o644


def test_a_stricter_umask_is_honoured_as_well(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write_bytes(tmp_path / "f.json", b"{}")
        atomic_write_dir(tmp_path / "d", _fill_with({"w.bin": b"x"}))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f.json") == 0o600
    assert _mode(tmp_path / "d") == 0o700


def test_files_a_library_writes_0600_inside_a_directory_follow_the_umask(tmp_path, umask_022):
    import torch
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors creates its files 0600
        (tmp / "sub").mkdir(mode=0o700)

    atomic_write_dir(tmp_path / "d", fill)
    assert _mode(tmp_path / "d" / "model.safetensors") == 0o644
    assert _mode(tmp_path / "d" / "sub") == 0o755
