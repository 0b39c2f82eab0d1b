"""Speech transcription with Whisper: learn to write what a clip says; metric: word error rate of greedy decoding.

    task = Transcription(processor)                  # a WhisperProcessor (or a Whisper tokenizer)
    task.check_records(records, "data/speech-commands/train.jsonl")   # audio paths resolved beside the manifest
    features = task.encode(records)                  # 16 kHz waveforms and decoder token ids
    task.evaluate(model, features, batch_size=16)    # {"wer", "cer", "exact", "loss"}

A record names a wav file (`audio`, relative to the manifest that lists it) and its transcript (`text`). The
encoder sees Whisper's log-mel features of the clip padded to 30 s (`lorakit.speech.audio`); the decoder is
teacher-forced on Whisper's own prompt, `<|startoftranscript|>` (language and task tokens for a multilingual
model) `<|notimestamps|>`, then the transcript with the leading space Whisper writes, then `<|endoftext|>`. The
loss covers the transcript and the end-of-text token, not the prompt.

Evaluation decodes greedily after the same prompt, choosing only text tokens or end-of-text (Whisper's decoding
suppresses the other special tokens too), and scores with `jiwer` after Whisper's English text normaliser (case,
punctuation, spelling and numbers: "twenty five" and "25" are the same words), as the Whisper paper reports WER
(Radford et al. 2022, section 4.1 and appendix C).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jiwer
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from lorakit.errors import LorakitError
from lorakit.lm_loss import IGNORE
from lorakit.progress import progress
from lorakit.speech.audio import SAMPLE_RATE, check_wav, log_mel, read_wav, resample
from lorakit.task import Batch, Features
from lorakit.train.data import chunks, move_batch, pad

log = logging.getLogger(__name__)


class Transcription:
    """Speech to text with a Whisper model (`WhisperForConditionalGeneration`); metric: word error rate.

    tokenizer: a `WhisperProcessor` (its tokenizer and feature extractor are used), or a Whisper tokenizer (then
        a default `WhisperFeatureExtractor`: 80 mel bins, 16 kHz, 30 s, as every Whisper but large-v3).
    audio, text: the record fields holding the wav path and the transcript.
    max_length: decoder tokens per example, prompt and end-of-text included; longer transcripts are cut, and
        decoding stops after this many tokens.
    """

    name = "transcription"
    metric = "wer"
    greater_is_better = False

    def __init__(self, tokenizer: Any, *, audio: str = "audio", text: str = "text", max_length: int = 64):
        if not isinstance(max_length, int) or max_length < 8:
            raise LorakitError(f"max_length must be an int >= 8, got {max_length!r}")
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        extractor = getattr(tokenizer, "feature_extractor", None)
        if extractor is None:
            from transformers import WhisperFeatureExtractor

            extractor = WhisperFeatureExtractor()
        self.extractor = extractor
        self.audio, self.text, self.max_length = audio, text, max_length
        self.prefix: list[int] = list(getattr(self.tokenizer, "prefix_tokens", []))
        self.eot = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        if not self.prefix or not isinstance(self.eot, int):
            raise LorakitError(f"{type(self.tokenizer).__name__} is not a Whisper tokenizer (no decoder prompt or "
                               "<|endoftext|>); use model.name whisper-tiny or a Whisper model directory")
        self.normalizer = EnglishTextNormalizer(getattr(self.tokenizer, "english_spelling_normalizer", None) or {})

    def state(self) -> dict[str, Any]:
        return {"task": self.name, "audio": self.audio, "text": self.text, "max_length": self.max_length}

    def head_modules(self, model: nn.Module) -> list[str]:
        return []  # the output projection is Whisper's own (tied to its embeddings)

    def check_records(self, records: list[dict[str, Any]], source: str) -> None:
        """Check every record of manifest `source` before any model loads: a transcript, and an audio path that
        names a readable PCM wav at a usable rate. Relative paths are taken from the manifest's directory and
        replaced in the records by the resolved path. Raises LorakitError naming the manifest and the row."""
        base = Path(source).expanduser().parent
        for i, record in enumerate(records):
            where = f"{source} row {i + 1}"
            self._transcript(record, where)
            value = record.get(self.audio)
            if not isinstance(value, str) or not value.strip():
                raise LorakitError(f"{where} has no audio path in field {self.audio!r} (it has: "
                                   f"{', '.join(map(str, record))}); map the column with data.columns.audio")
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise LorakitError(f"{where}: audio file {path} does not exist; fix the path (relative paths are "
                                   f"taken from the manifest's directory) or regenerate the data set")
            try:
                check_wav(path)
            except LorakitError as e:
                raise LorakitError(f"{where}: {e}") from None
            record[self.audio] = str(path)

    def encode(self, records: list[dict[str, Any]]) -> list[Features]:
        """-> {"audio": 16 kHz float32 waveform, "ids": prompt + transcript + end-of-text token ids}, cut to
        max_length. Raises LorakitError naming the record for a missing field or an unreadable clip."""
        features: list[Features] = []
        rates: dict[int, int] = {}
        for i, record in enumerate(records):
            text = self._transcript(record, f"record {i}")
            path = record.get(self.audio)
            if not isinstance(path, str):
                raise LorakitError(f"record {i} has no audio path in field {self.audio!r}")
            audio, rate = read_wav(path, target_rate=None)
            rates[rate] = rates.get(rate, 0) + 1
            audio = resample(audio, rate, SAMPLE_RATE)
            if len(audio) > self.extractor.n_samples:
                raise LorakitError(f"record {i}: {path} lasts {len(audio) / 16000:.1f} s; Whisper hears at most 30 s")
            ids = self.prefix + self.tokenizer.encode(" " + text, add_special_tokens=False) + [self.eot]
            features.append({"audio": audio, "ids": ids[:self.max_length], "text": text})
        other = {rate: n for rate, n in rates.items() if rate != SAMPLE_RATE}
        if other:
            log.info("resampled %d of %d clips to %d Hz (from %s)", sum(other.values()), len(records), SAMPLE_RATE,
                     ", ".join(f"{n} at {rate} Hz" for rate, n in sorted(other.items())))
        return features

    def collate(self, features: list[Features]) -> Batch:
        """-> input_features (B, n_mels, 3000); decoder_input_ids (B, T) = ids[:-1]; labels (B, T) = ids[1:],
        IGNORE over the prompt and the padding."""
        n = len(self.prefix)
        labels = [[IGNORE] * (n - 1) + f["ids"][n:] for f in features]
        return {"input_features": torch.from_numpy(log_mel(self.extractor, [f["audio"] for f in features])),
                "decoder_input_ids": pad([f["ids"][:-1] for f in features], self.eot),
                "labels": pad(labels, IGNORE)}

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """Cross-entropy averaged over the transcript and end-of-text tokens of the batch."""
        logits = model(input_features=batch["input_features"], decoder_input_ids=batch["decoder_input_ids"]).logits
        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def evaluate(self, model: nn.Module, features: list[Features], batch_size: int) -> dict[str, float]:
        """wer and cer (jiwer, after Whisper's English normaliser) of greedy transcripts, exact (the share of clips
        transcribed without error) and loss (teacher-forced, as in training)."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        hypotheses: list[str] = []
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                for part in progress(chunks(features, batch_size), desc="evaluate"):
                    batch = move_batch(self.collate(list(part)), device)
                    encoded = _encoder(model)(batch["input_features"]).last_hidden_state  # (B, 1500, d)
                    logits = model(encoder_outputs=(encoded,), decoder_input_ids=batch["decoder_input_ids"]).logits
                    supervised = batch["labels"] != IGNORE
                    total += F.cross_entropy(logits.float()[supervised], batch["labels"][supervised],
                                             reduction="sum").item()
                    count += int(supervised.sum())
                    hypotheses += self.decode(self.greedy(model, encoded))
        finally:
            model.train(was_training)
        references = [self.normalizer(f["text"]) for f in features]
        normalized = [self.normalizer(h) for h in hypotheses]
        if hypotheses:
            log.info("first of %d transcripts: %r (reference %r)", len(hypotheses), hypotheses[0], features[0]["text"])
        return {**word_error_rates(normalized, references), "loss": total / max(count, 1)}

    def transcribe(self, model: nn.Module, audios: list[np.ndarray]) -> list[str]:
        """Greedy transcripts of 16 kHz waveforms, as `evaluate` decodes them."""
        device = next(model.parameters()).device
        with torch.no_grad():
            features = torch.from_numpy(log_mel(self.extractor, audios)).to(device)
            encoded = _encoder(model)(features).last_hidden_state
            return self.decode(self.greedy(model, encoded))

    def greedy(self, model: nn.Module, encoded: Tensor) -> list[list[int]]:
        """`greedy_decode` from encoder states (B, frames, d) after this task's prompt, suppressing the tokens the
        model's generation config suppresses (tiny.en: 90 non-speech symbols such as "(" and "[", and at the first
        step a bare space and end-of-text), as Whisper's own decoding does."""
        generation: Any = getattr(model, "generation_config", None)
        return greedy_decode(model, encoded, self.prefix, self.eot, self.max_length,
                             suppress=list(getattr(generation, "suppress_tokens", None) or []),
                             begin_suppress=list(getattr(generation, "begin_suppress_tokens", None) or []))

    def decode(self, ids: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]

    def length(self, features: Features) -> int:
        return len(features["ids"])

    def _transcript(self, record: dict[str, Any], where: str) -> str:
        value = record.get(self.text)
        if not isinstance(value, str) or not value.strip():
            shown = "no" if value is None else f"an empty or non-text ({value!r})"
            raise LorakitError(f"{where} has {shown} transcript in field {self.text!r}; every clip needs its text "
                               f"(map the column with data.columns.text)")
        return value.strip()


def greedy_decode(model: nn.Module, encoded: Tensor, prefix: list[int], eot: int, max_length: int, *,
                  suppress: list[int] | None = None, begin_suppress: list[int] | None = None) -> list[list[int]]:
    """Greedy decoding of a Whisper model from encoder states (B, frames, d) after `prefix`, with the decoder's
    key/value cache; returns each row's new tokens without the end-of-text token. Only text tokens (ids below
    `eot`) or `eot` are chosen, never a token of `suppress`, nor one of `begin_suppress` at the first step. Stops
    when every row has ended or the sequence reaches `max_length` tokens."""
    decoder, head = _decoder(model), _output_projection(model)
    rows = encoded.shape[0]
    tokens = torch.tensor([prefix] * rows, dtype=torch.long, device=encoded.device)  # (B, P)
    done = torch.zeros(rows, dtype=torch.bool, device=encoded.device)
    out: list[list[int]] = [[] for _ in range(rows)]
    step_input, cache = tokens, None
    banned = [t for t in suppress or [] if 0 <= t <= eot]
    first_banned = banned + [t for t in begin_suppress or [] if 0 <= t <= eot]
    for step in range(max_length - len(prefix)):
        result = decoder(input_ids=step_input, encoder_hidden_states=encoded, cache=cache, use_cache=True)
        cache = result.cache
        logits = head(result.last_hidden_state[:, -1]).float()[:, :eot + 1]  # (B, eot + 1): text tokens and eot
        logits[:, first_banned if step == 0 else banned] = float("-inf")
        chosen = logits.argmax(-1)  # (B,)
        for row in range(rows):
            if not done[row] and int(chosen[row]) != eot:
                out[row].append(int(chosen[row]))
        done |= chosen == eot
        if bool(done.all()):
            break
        step_input = chosen[:, None]  # (B, 1)
    return out


def word_error_rates(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """wer and cer (corpus-level: errors over reference words or characters) and exact (share of hypotheses equal
    to their reference), on already normalised text. An empty hypothesis counts every reference word deleted."""
    if len(hypotheses) != len(references):
        raise LorakitError(f"{len(hypotheses)} transcripts for {len(references)} references; they must pair up")
    if not references:
        raise LorakitError("no references to score against")
    empty = [i for i, r in enumerate(references) if not r.strip()]
    if empty:
        raise LorakitError(f"reference {empty[0]} is empty after normalisation; every clip needs words to score")
    exact = sum(h == r for h, r in zip(hypotheses, references, strict=True)) / len(references)
    return {"wer": float(jiwer.wer(references, hypotheses)), "cer": float(jiwer.cer(references, hypotheses)),
            "exact": exact}


def _encoder(model: nn.Module) -> Any:
    return model.get_encoder()  # type: ignore[operator]


def _decoder(model: nn.Module) -> Any:
    return model.get_decoder()  # type: ignore[operator]


def _output_projection(model: nn.Module) -> Any:
    return model.get_output_embeddings()  # type: ignore[operator]
