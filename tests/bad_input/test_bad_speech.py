"""Bad speech input through the CLI (`lorakit train` with a transcription manifest, `lorakit speech-data`): each is
exit code 2 and one error line naming the file, the row and the fix, before any model trains; nothing the user
wrote changes. A clip at another sample rate (22,050 Hz, 44.1 kHz, 8 kHz) is resampled to 16 kHz, not refused
(tests/train/tasks/test_transcription.py); below 8 kHz it is refused."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import expect_cli_error
from tiny_whisper import tiny_whisper, whisper_tokenizer, write_manifest, write_tone


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-whisper")
    tiny_whisper().save_pretrained(path)
    whisper_tokenizer().save_pretrained(path)
    return path


def _config(tmp: Path, model: Path, manifest: Path) -> Path:
    config = {"model": {"name": str(model)},
              "data": {"task": "transcription", "train": str(manifest), "eval": str(manifest), "max_length": 16},
              "lora": {"rank": 2, "alpha": 4, "targets": ["model.decoder.*_proj"]},
              "optim": {"batch_size": 2, "max_steps": 1}, "run": {"out_dir": str(tmp / "run")}}
    path = tmp / "speech.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _clip(name: str, write: Callable[[Path], object]) -> Callable[[Path], Path]:
    """A manifest of a good clip and then `clips/NAME` written by `write` (nothing written: a missing file)."""
    def setup(tmp: Path) -> Path:
        (tmp / "clips").mkdir()
        write_tone(tmp / "clips" / "good.wav")
        write(tmp / "clips" / name)
        return write_manifest(tmp, [{"audio": "clips/good.wav", "text": "Call mum."},
                                    {"audio": f"clips/{name}", "text": "Open the blinds."}])
    return setup


CASES = [
    pytest.param(_clip("low.wav", lambda p: write_tone(p, rate=4000)),
                 r"train\.jsonl row 2: .*low\.wav is sampled at 4000 Hz, below the 8000 Hz speech needs .*refused "
                 r"rather than resampled", id="sample-rate-too-low"),
    pytest.param(_clip("song.wav", lambda p: p.write_bytes(b"ID3\x04\x00\x00 an mp3 file, not a wav")),
                 r"train\.jsonl row 2: .*song\.wav is not a PCM wav file .*sox", id="not-a-wav"),
    pytest.param(_clip("empty.wav", lambda p: p.write_bytes(b"")),
                 r"train\.jsonl row 2: .*empty\.wav is not a PCM wav file", id="empty-file"),
    pytest.param(_clip("gone.wav", lambda p: None),
                 r"train\.jsonl row 2: audio file .*gone\.wav does not exist; fix the path", id="missing-file"),
    pytest.param(lambda tmp: write_manifest(tmp, [{"audio": "a.wav"}]),
                 r"train\.jsonl row 1 has no transcript in field 'text'", id="row-without-text"),
]


@pytest.mark.parametrize("setup, message", CASES)
def test_bad_speech_data_is_one_error_line(setup: Callable[[Path], Path], message: str, tmp_path: Path,
                                           whisper_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = setup(tmp_path)
    config = _config(tmp_path, whisper_dir, manifest)
    expect_cli_error(["train", str(config), "--quiet"], capsys, matches=message, watch=[tmp_path])
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_speech_data_refuses_a_directory_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    expect_cli_error(["speech-data", "--out", str(tmp_path), "--train", "1", "--eval", "1"], capsys,
                     matches=r"already holds files lorakit did not write \(notes\.txt\)", watch=[tmp_path])


@pytest.mark.parametrize(("flags", "message"), [
    (["--train", "0"], r"train clip count must be a positive int, got 0"),
    (["--noise-snr-db", "500"], r"noise_snr_db must be a number of decibels in \[-20, 100\]"),
])
def test_speech_data_refuses_bad_arguments_before_writing(flags: list[str], message: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    expect_cli_error(["speech-data", "--out", str(tmp_path / "ds"), *flags], capsys, matches=message)
    assert not (tmp_path / "ds").exists()
