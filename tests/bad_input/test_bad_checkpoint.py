"""Bad checkpoints and full disks: `train --resume` over planted pickles, old, truncated, corrupted or missing
checkpoint files, and a disk that fills while a checkpoint or a merged model is written. Each gives exit 2, one
`error:` line that names the damage (or what was kept), no traceback, and every file that was there before
byte-identical after; no pickle is ever loaded."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import NEGATIVE, POSITIVE, expect_cli_error, write_config
from transformers import PreTrainedModel

from lorakit.cli import main
from lorakit.io import WEIGHTS_NAME
from lorakit.train import checkpoint
from lorakit.train.checkpoint import STATE_JSON, STATE_TENSORS

STEP = "step-00000002"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_classifier_dir: Path) -> dict[str, Path]:
    """One tiny classification run of 2 steps (one checkpoint, step-00000002), trained once for the module. Its
    run.out_dir is relative ("run"), so a copy resumed from another directory rewrites the same config.json."""
    root = tmp_path_factory.mktemp("checkpointed")
    rows = [(s, 1) for s in POSITIVE] * 2 + [(s, 0) for s in NEGATIVE] * 2
    train = root / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    config = write_config(root / "c.yaml", tiny_classifier_dir, train, train, "run", optim={"max_steps": 2})
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["train", str(config), "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    assert [p.name for p in (root / "run" / "checkpoints").iterdir()] == [STEP]
    return {"config": config, "run": root / "run", "model": tiny_classifier_dir}


def _copy_run(template: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A copy of the template run as `tmp_path/run`, with the working directory at `tmp_path`; and the config."""
    shutil.copytree(template["run"], tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "run", template["config"]


def _pickle_that_creates(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling this creates `marker`

    return pickle.dumps(Payload())


def _plant_pickle_as_trainer_pt(ckpt: Path, marker: Path) -> None:
    for name in (STATE_JSON, STATE_TENSORS):
        (ckpt / name).unlink()
    (ckpt / "trainer.pt").write_bytes(_pickle_that_creates(marker))


def _plant_pickle_as_state_files(ckpt: Path, marker: Path) -> None:
    for name in (STATE_JSON, STATE_TENSORS):
        (ckpt / name).write_bytes(_pickle_that_creates(marker))


def _old_format(ckpt: Path, marker: Path) -> None:
    for name in (STATE_JSON, STATE_TENSORS):
        (ckpt / name).unlink()
    (ckpt / "trainer.pt").write_bytes(pickle.dumps({"step": 2, "optimizer": {}}))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_state(ckpt: Path, change: Callable[[dict], None]) -> None:
    doc = json.loads((ckpt / STATE_JSON).read_text())
    change(doc)
    (ckpt / STATE_JSON).write_text(json.dumps(doc))


DAMAGE: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "a planted pickle as trainer.pt": (_plant_pickle_as_trainer_pt,
                                       r"step-00000002: .*trainer\.pt, the pickle format of older lorakit versions, "
                                       r"which is not loaded because unpickling a file can run any code"),
    "a planted pickle in place of the state files": (_plant_pickle_as_state_files,
                                                     r"trainer_state\.json is not valid JSON"),
    "an old checkpoint holding only trainer.pt": (_old_format, r"trainer\.pt, the pickle format .* start a new run"),
    "truncated trainer_state.safetensors": (lambda c, m: _truncate(c / STATE_TENSORS),
                                            r"trainer_state\.safetensors does not match trainer_state\.json"),
    "truncated trainer_state.json": (lambda c, m: _truncate(c / STATE_JSON), r"trainer_state\.json is not valid JSON"),
    "trainer_state.json of another format": (lambda c, m: (c / STATE_JSON).write_text('{"format": "other"}'),
                                             r"is not a lorakit trainer state of version 1"),
    "trainer_state.json without the data position": (lambda c, m: _edit_state(c, lambda d: d["state"].pop("epoch")),
                                                      r"trainer_state\.json lacks or mistypes epoch"),
    "trainer_state.json of another step": (lambda c, m: _edit_state(c, lambda d: d["state"].update(step=3)),
                                           r"is the state of step 3, not of step-00000002"),
    "missing trainer_state.safetensors": (lambda c, m: (c / STATE_TENSORS).unlink(),
                                          r"trainer_state\.safetensors is missing"),
    "missing adapter": (lambda c, m: shutil.rmtree(c / "adapter"), r"holds no weights"),
    "corrupted adapter weights": (lambda c, m: _flip_last_byte(c / "adapter" / WEIGHTS_NAME),
                                  r"adapter_model\.safetensors is corrupted \(checksum mismatch\)"),
    "no checkpoint left": (lambda c, m: shutil.rmtree(c), r"run has no checkpoint \(drop --resume to start anew\)"),
}


@pytest.mark.parametrize("damage, matches", DAMAGE.values(), ids=DAMAGE.keys())
def test_resume_from_a_bad_checkpoint(damage: Callable[[Path, Path], None], matches: str,
                                      template: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    run, config = _copy_run(template, tmp_path, monkeypatch)
    marker = tmp_path / "created-by-unpickling"
    damage(run / "checkpoints" / STEP, marker)
    expect_cli_error(["train", config, "--quiet", "--resume"], capsys, matches=rf"^error: nothing to resume.*{matches}",
                     watch=[run])
    assert not marker.exists(), "a pickle was loaded"


def test_the_planted_pickle_would_run_code_if_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "created-by-unpickling"
    pickle.loads(_pickle_that_creates(marker))  # the payload of the cases above works: the refusal is what stops it
    assert marker.exists()


def test_resume_with_nothing_to_resume(template: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    expect_cli_error(["train", template["config"], "--quiet", "--resume"], capsys,
                     matches=r"^error: nothing to resume: run has no checkpoint \(drop --resume to start anew\)$",
                     watch=[tmp_path])


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_a_checkpoint(template: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run, config = _copy_run(template, tmp_path, monkeypatch)

    def half_written(directory: Path, state: dict) -> None:
        (directory / STATE_TENSORS).write_bytes(b"\x00" * 64)
        _no_space()

    monkeypatch.setattr(checkpoint, "write_trainer_state", half_written)
    expect_cli_error(["train", config, "--quiet", "--resume", "--optim.max_steps=4"], capsys,
                     matches=r"^error: no space left on device while writing checkpoint step-00000004 in run/"
                             r"checkpoints; the last complete checkpoint step-00000002 is kept$",
                     watch=[run / "checkpoints", run / "adapter"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [STEP]  # no temporary directory left


def _fill_disk_while_saving(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers writes weights through safetensors, whose I/O errors are its own type naming the OS error."""
    def save_pretrained(self: PreTrainedModel, directory: str | Path, *args: object, **kwargs: object) -> None:
        (Path(directory) / "model.safetensors").write_bytes(b"\x00" * 64)
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)


@pytest.mark.parametrize("earlier", [False, True], ids=["a new output directory", "over an earlier merged model"])
def test_disk_full_while_writing_a_merged_model(earlier: bool, template: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    adapter, out = template["run"] / "adapter", tmp_path / "merged"
    if earlier:
        assert main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 0
    _fill_disk_while_saving(monkeypatch)
    expect_cli_error(["merge", "--adapter", adapter, "--out", out, *(["--force"] if earlier else [])], capsys,
                     matches=r"^error: no space left on device while writing merged model .*merged; it was not "
                             r"written and (nothing else changed|what was there before is unchanged)$",
                     watch=[tmp_path, template["run"]])
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary directory left
    assert not (out / "config.json").exists() or earlier
