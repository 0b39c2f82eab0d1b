"""The Whisper transcription task on a tiny random Whisper: prompt and labels, greedy decoding, WER, manifests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_whisper import tiny_whisper, whisper_tokenizer, write_manifest, write_tone

from lorakit import LoraConfig, inject
from lorakit.errors import LorakitError
from lorakit.lm_loss import IGNORE
from lorakit.train.data import read_records
from lorakit.train.tasks import make_task, task_from_state
from lorakit.train.tasks.transcription import Transcription, greedy_decode, word_error_rates


@pytest.fixture(scope="module")
def task() -> Transcription:
    return Transcription(whisper_tokenizer(), max_length=16)


@pytest.fixture
def records(tmp_path: Path) -> list[dict]:
    (tmp_path / "clips").mkdir()
    rows = [{"audio": "clips/a.wav", "text": "Turn on the light."}, {"audio": "clips/b.wav", "text": "Call mum."}]
    write_tone(tmp_path / "clips" / "a.wav", rate=22050)
    write_tone(tmp_path / "clips" / "b.wav", rate=16000, seconds=0.3)
    return rows


def _checked(task: Transcription, records: list[dict], tmp_path: Path) -> list[dict]:
    task.check_records(records, str(write_manifest(tmp_path, records)))
    return records


def test_ids_are_whisper_s_prompt_then_the_spaced_transcript_then_end_of_text(task: Transcription,
                                                                              records: list[dict],
                                                                              tmp_path: Path) -> None:
    ids = task.encode(_checked(task, records, tmp_path))[0]["ids"]
    tokenizer = task.tokenizer
    assert ids[:2] == tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.decode(ids[2:-1]) == " Turn on the light."


def test_labels_are_the_decoder_inputs_shifted_with_the_prompt_masked(task: Transcription, records: list[dict],
                                                                      tmp_path: Path) -> None:
    features = task.encode(_checked(task, records, tmp_path))
    batch = task.collate(features)
    ids = features[0]["ids"]
    assert batch["input_features"].shape == (2, 80, 3000)
    assert batch["decoder_input_ids"][0, :len(ids) - 1].tolist() == ids[:-1]
    labels = batch["labels"][0].tolist()
    assert labels[0] == IGNORE and labels[1:len(ids) - 1] == ids[2:]
    assert labels[len(ids) - 1:] == [IGNORE] * (len(labels) - len(ids) + 1)  # padding


def test_relative_audio_paths_are_taken_from_the_manifest_s_directory(task: Transcription, records: list[dict],
                                                                      tmp_path: Path) -> None:
    checked = _checked(task, records, tmp_path)
    assert checked[0]["audio"] == str(tmp_path / "clips" / "a.wav")


def test_a_row_naming_a_missing_file_is_refused_naming_the_manifest_and_row(task: Transcription,
                                                                            records: list[dict],
                                                                            tmp_path: Path) -> None:
    records[1]["audio"] = "clips/gone.wav"
    with pytest.raises(LorakitError, match=r"train.jsonl row 2: audio file .*gone.wav does not exist"):
        _checked(task, records, tmp_path)


def test_a_row_without_a_transcript_is_refused(task: Transcription, records: list[dict], tmp_path: Path) -> None:
    records[0]["text"] = " "
    with pytest.raises(LorakitError, match="row 1 has an empty or non-text"):
        _checked(task, records, tmp_path)


def test_greedy_decoding_with_the_cache_equals_decoding_without_it(task: Transcription) -> None:
    model = tiny_whisper(seed=1)
    torch.manual_seed(0)
    with torch.no_grad():
        encoded = model.get_encoder()(torch.randn(2, 80, 3000)).last_hidden_state
        cached = greedy_decode(model, encoded, task.prefix, task.eot, 10)
        tokens = torch.tensor([task.prefix] * 2)
        for _ in range(10 - len(task.prefix)):  # every step over the whole sequence, no cache
            logits = model(encoder_outputs=(encoded,), decoder_input_ids=tokens).logits[:, -1, :task.eot + 1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    expected = [[t for t in row[len(task.prefix):]] for row in tokens.tolist()]
    for row, want in zip(cached, expected, strict=True):
        cut = want.index(task.eot) if task.eot in want else len(want)
        assert row == want[:cut]


def test_word_error_rate_counts_substitutions_over_reference_words() -> None:
    scores = word_error_rates(["turn off the light", "call mum"], ["turn on the light", "call mum"])
    assert scores["wer"] == pytest.approx(1 / 6) and scores["exact"] == 0.5


def test_the_normaliser_makes_number_words_and_digits_the_same(task: Transcription) -> None:
    assert task.normalizer("Set a timer for twenty five minutes.") == task.normalizer("set a timer for 25 minutes")


def test_evaluate_reports_wer_cer_exact_and_loss(task: Transcription, records: list[dict], tmp_path: Path) -> None:
    scores = task.evaluate(tiny_whisper(), task.encode(_checked(task, records, tmp_path)), batch_size=2)
    assert set(scores) == {"wer", "cer", "exact", "loss"}
    assert scores["wer"] >= 0.5 and scores["loss"] > 0  # a random model does not transcribe


def test_lora_steps_on_the_decoder_lower_the_loss(task: Transcription, records: list[dict], tmp_path: Path) -> None:
    model = tiny_whisper()
    inject(model, LoraConfig(rank=4, alpha=8, targets=["model.decoder.*_proj", "model.decoder.*fc1"]))
    batch = task.collate(task.encode(_checked(task, records, tmp_path))[:1])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    first = task.loss(model, batch).item()
    for _ in range(6):
        optimizer.zero_grad()
        task.loss(model, batch).backward()
        optimizer.step()
    assert task.loss(model, batch).item() < 0.9 * first


def test_the_task_is_registered_and_its_state_rebuilds_it(task: Transcription) -> None:
    built = make_task("transcription", task.tokenizer, max_length=32)
    rebuilt = task_from_state(task.tokenizer, built.state())
    assert isinstance(rebuilt, Transcription) and rebuilt.max_length == 32


def test_encode_resamples_other_rates_and_says_so(task: Transcription, records: list[dict], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="lorakit.train.tasks.transcription"):
        features = task.encode(_checked(task, records, tmp_path))
    assert len(features[0]["audio"]) == 8000  # 0.5 s at 22,050 Hz, now at 16 kHz
    assert "resampled 1 of 2 clips to 16000 Hz (from 1 at 22050 Hz)" in caplog.text


def test_train_then_eval_a_whisper_directory_from_a_config(records: list[dict], tmp_path: Path) -> None:
    """The trainer's path end to end on a tiny Whisper saved to disk: train records WER, and `lorakit eval` scores
    the base (zero-shot: Whisper's own head) and the adapter on the same clips."""
    from lorakit.train.config import build_train_config
    from lorakit.train.evaluate import evaluate_from_config
    from lorakit.train.run import train_from_config

    model_dir = tmp_path / "whisper"
    tiny_whisper().save_pretrained(model_dir)
    whisper_tokenizer().save_pretrained(model_dir)
    manifest = write_manifest(tmp_path, records)
    config = build_train_config({
        "model": {"name": str(model_dir)},
        "data": {"task": "transcription", "train": str(manifest), "eval": str(manifest), "max_length": 8,
                 "eval_limit": 1},
        "lora": {"rank": 2, "alpha": 4, "targets": ["model.decoder.*_proj"]},
        "optim": {"batch_size": 2, "max_steps": 1}, "run": {"out_dir": str(tmp_path / "run")}})
    summary = train_from_config(config)
    assert summary.metric == "wer" and summary.value is not None and summary.task == "transcription"
    base = evaluate_from_config(config)
    adapted = evaluate_from_config(config, adapter=summary.adapter_dir)
    assert base.method == "base" and adapted.method == "lora" and base.metric == "wer"
    assert adapted.metrics["wer"] == pytest.approx(summary.value)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_greedy_decoding_matches_transformers_generate_on_the_real_whisper(tmp_path: Path) -> None:
    """The task's own decoding against transformers' `generate` (greedy, tiny.en's generation config) on held-out
    clips of the data set: the same transcripts."""
    from lorakit.models import load_model
    from lorakit.speech.clips import generate_speech_commands

    manifests = generate_speech_commands(tmp_path / "ds", train=1, eval=4, seed=0)
    model, processor = load_model("whisper-tiny")
    task = Transcription(processor, max_length=48)
    records = read_records(manifests["eval"])
    task.check_records(records, str(manifests["eval"]))
    audios = [f["audio"] for f in task.encode(records)]
    features = processor.feature_extractor(audios, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        expected = processor.batch_decode(model.generate(features, max_new_tokens=46, num_beams=1, do_sample=False),
                                          skip_special_tokens=True)
    assert task.transcribe(model, audios) == [text.strip() for text in expected]


def test_greedy_decoding_never_emits_a_suppressed_token(task: Transcription) -> None:
    model = tiny_whisper(seed=2)
    torch.manual_seed(1)
    with torch.no_grad():
        encoded = model.get_encoder()(torch.randn(2, 80, 3000)).last_hidden_state
        free = greedy_decode(model, encoded, task.prefix, task.eot, 12)
        chosen = sorted({t for row in free for t in row})
        first = sorted({row[0] for row in free if row})
        held = greedy_decode(model, encoded, task.prefix, task.eot, 12, suppress=chosen[1:], begin_suppress=first)
    assert chosen and not {t for row in held for t in row} & set(chosen[1:])
    assert all(row[0] not in first for row in held if row)
