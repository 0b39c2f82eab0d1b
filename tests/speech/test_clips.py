"""The espeak-ng spoken-command data set: a plan fixed by its seed, held-out voices unseen in training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lorakit.errors import LorakitError
from lorakit.outputs import OutputExistsError
from lorakit.speech.audio import read_wav
from lorakit.speech.clips import (
    EVAL_ACCENTS,
    EVAL_VARIANTS,
    TRAIN_ACCENTS,
    TRAIN_VARIANTS,
    add_noise,
    generate_speech_commands,
    number_words,
    plan_clips,
)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def test_the_plan_is_a_function_of_the_seed() -> None:
    assert plan_clips("train", 50, seed=3) == plan_clips("train", 50, seed=3)
    assert plan_clips("train", 50, seed=3) != plan_clips("train", 50, seed=4)


def test_one_split_s_plan_does_not_depend_on_the_other_s_count() -> None:
    assert plan_clips("eval", 10, seed=0) == plan_clips("eval", 20, seed=0)[:10]


def test_held_out_voices_share_neither_accent_nor_variant_with_training() -> None:
    assert not set(TRAIN_ACCENTS) & set(EVAL_ACCENTS) and not set(TRAIN_VARIANTS) & set(EVAL_VARIANTS)
    train = {c.voice for c in plan_clips("train", 300)}
    held_out = {c.voice for c in plan_clips("eval", 100)}
    train_parts = {part for voice in train for part in voice.split("+")}
    assert all(part not in train_parts for voice in held_out for part in voice.split("+"))


def test_speeds_and_pitches_vary_within_their_ranges() -> None:
    clips = plan_clips("train", 200)
    speeds, pitches = {c.speed for c in clips}, {c.pitch for c in clips}
    assert len(speeds) > 50 and min(speeds) >= 140 and max(speeds) <= 260
    assert len(pitches) > 30 and min(pitches) >= 15 and max(pitches) <= 85


def test_texts_are_sentences_with_numbers_in_words() -> None:
    texts = [c.text for c in plan_clips("train", 200)]
    assert all(t[0].isupper() and t[-1] in ".?" for t in texts)
    assert not any(ch.isdigit() for t in texts for ch in t)
    assert len(set(texts)) > 100


@pytest.mark.parametrize(("n", "words"), [(0, "zero"), (13, "thirteen"), (20, "twenty"), (47, "forty seven")])
def test_number_words(n: int, words: str) -> None:
    assert number_words(n) == words


@pytest.mark.parametrize(("split", "count", "match"), [("dev", 1, "unknown split"), ("train", 0, "positive int")])
def test_bad_plan_arguments_are_refused(split: str, count: int, match: str) -> None:
    with pytest.raises(LorakitError, match=match):
        plan_clips(split, count)


def test_add_noise_reaches_the_asked_signal_to_noise_ratio() -> None:
    speech = (0.5 * np.sin(np.arange(160_000) / 5.0)).astype(np.float32)
    noisy = add_noise(speech, 10.0, np.random.default_rng(0))
    snr = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean((noisy - speech).astype(np.float64) ** 2))
    assert abs(snr - 10.0) < 0.1


@needs_espeak
def test_generate_writes_each_planned_clip_and_its_manifest(tmp_path: Path) -> None:
    manifests = generate_speech_commands(tmp_path / "ds", train=3, eval=2, seed=1)
    rows = [json.loads(line) for line in manifests["eval"].read_text().splitlines()]
    planned = plan_clips("eval", 2, seed=1)
    assert [r["text"] for r in rows] == [c.text for c in planned]
    assert [r["voice"] for r in rows] == [c.voice for c in planned]
    audio, rate = read_wav(tmp_path / "ds" / rows[0]["audio"])
    assert rate == 16000 and 0.3 < len(audio) / rate < 10 and np.abs(audio).max() > 0.05


@needs_espeak
def test_the_same_seed_gives_the_same_audio_bytes(tmp_path: Path) -> None:
    generate_speech_commands(tmp_path / "a", train=2, eval=1, seed=5, noise_snr_db=20.0)
    generate_speech_commands(tmp_path / "b", train=2, eval=1, seed=5, noise_snr_db=20.0)
    for name in ("train-00000.wav", "train-00001.wav", "eval-00000.wav"):
        assert (tmp_path / "a" / "clips" / name).read_bytes() == (tmp_path / "b" / "clips" / name).read_bytes()


@needs_espeak
def test_a_directory_it_did_not_create_is_refused_untouched(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match="files lorakit did not write"):
        generate_speech_commands(tmp_path, train=1, eval=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


@needs_espeak
def test_its_own_data_set_is_replaced_only_with_force(tmp_path: Path) -> None:
    generate_speech_commands(tmp_path / "ds", train=2, eval=1)
    with pytest.raises(OutputExistsError, match="--force"):
        generate_speech_commands(tmp_path / "ds", train=1, eval=1)
    generate_speech_commands(tmp_path / "ds", train=1, eval=1, force=True)
    assert sorted(p.name for p in (tmp_path / "ds" / "clips").iterdir()) == ["eval-00000.wav", "train-00000.wav"]


@needs_espeak
def test_the_speech_data_command_writes_the_set_and_prints_the_manifests(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    assert main(["speech-data", "--out", str(tmp_path / "ds"), "--train", "2", "--eval", "1", "--seed", "7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"train": str(tmp_path / "ds" / "train.jsonl"), "eval": str(tmp_path / "ds" / "eval.jsonl")}
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["seed"] == 7
