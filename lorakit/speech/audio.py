"""Audio in: wav files to the 16 kHz mono waveform Whisper was trained on, and on to its log-mel features.

    audio, rate = read_wav("clip.wav")              # float32 (samples,), 16,000 Hz: mixed down and resampled
    features = log_mel(extractor, [audio])          # (B, 80, 3000): 30 s windows, as Whisper's encoder expects

Other sample rates are **resampled**, not refused: espeak-ng writes 22,050 Hz and phones record 8 kHz or 44.1 kHz,
and a polyphase filter (`scipy.signal.resample_poly`, a Kaiser-windowed low-pass) converts them without audible
loss; each resampled file is logged. Rates below `MIN_RATE` (8 kHz) are refused: they cannot carry the speech band
Whisper listens to (up to 8 kHz), so upsampling would only hide that the recording lacks it. Several channels are
averaged to one. Reading uses the standard library's `wave` (PCM 8/16/24/32-bit); other encodings are refused
with the conversion to make.
"""

from __future__ import annotations

import logging
import wave
from collections.abc import Sequence
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import resample_poly

from lorakit.errors import LorakitError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Whisper's input rate
MIN_RATE = 8_000
MAX_RATE = 384_000
_CONVERT = "convert it to PCM wav, e.g. `sox IN -r 16000 -c 1 -b 16 OUT.wav` or `ffmpeg -i IN -ar 16000 OUT.wav`"


def check_wav(path: str | Path) -> int:
    """Check that `path` is a PCM wav file `read_wav` can read (its header only; the samples are not read) and
    return its sample rate. Raises LorakitError as `read_wav` does."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise LorakitError(f"audio file {path} does not exist" if not file.exists()
                           else f"audio file {path} is not a file")
    try:
        with wave.open(str(file), "rb") as w:
            width, rate, frames = w.getsampwidth(), w.getframerate(), w.getnframes()
    except (wave.Error, EOFError) as e:
        raise LorakitError(f"{path} is not a PCM wav file ({e}); {_CONVERT}") from None
    _check_format(path, width, rate)
    if frames == 0:
        raise LorakitError(f"{path} holds no samples; record or export it again")
    return rate


def read_wav(path: str | Path, target_rate: int | None = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """The samples of a PCM wav file as float32 in [-1, 1], channels averaged: ((samples,), rate).

    target_rate: resample to this rate (logged when it differs from the file's); None keeps the file's rate.
    Raises LorakitError for a missing file, a file that is not a PCM wav, no samples, or a rate below 8 kHz.
    """
    check_wav(path)
    with wave.open(str(Path(path).expanduser()), "rb") as w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    usable = len(raw) // (width * channels) * width * channels  # a truncated last frame is dropped
    audio = _pcm_to_float(raw[:usable], width).reshape(-1, channels).mean(axis=1)  # (samples,)
    if target_rate is not None and rate != target_rate:
        log.debug("resampling %s from %d Hz to %d Hz", path, rate, target_rate)
        audio, rate = resample(audio, rate, target_rate), target_rate
    return audio.astype(np.float32), rate


def resample(audio: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """`audio` (samples,) from `rate` to `target_rate` Hz by polyphase filtering (exact rational ratio)."""
    if rate == target_rate:
        return audio
    g = gcd(rate, target_rate)
    return resample_poly(audio, target_rate // g, rate // g).astype(np.float32)


def write_wav(path: str | Path, audio: np.ndarray, rate: int) -> None:
    """Write float samples in [-1, 1] (samples,) as a 16-bit mono PCM wav."""
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())


def log_mel(extractor: Any, audios: Sequence[np.ndarray]) -> np.ndarray:
    """Whisper's log-mel features of 16 kHz waveforms through a transformers `WhisperFeatureExtractor`:
    (B, n_mels, 3000), each clip padded with silence (or cut) to 30 s, the window Whisper's encoder always sees.
    Raises LorakitError for a clip longer than 30 s (Whisper would silently drop its end)."""
    limit = extractor.n_samples
    for i, audio in enumerate(audios):
        if len(audio) > limit:
            raise LorakitError(f"clip {i} lasts {len(audio) / SAMPLE_RATE:.1f} s; Whisper hears at most "
                               f"{limit / SAMPLE_RATE:.0f} s: cut it into shorter clips")
    out = extractor(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="np")
    return np.asarray(out["input_features"], dtype=np.float32)


def _check_format(path: str | Path, width: int, rate: int) -> None:
    if width not in (1, 2, 3, 4):
        raise LorakitError(f"{path} has {8 * width}-bit samples; {_CONVERT}")
    if rate < MIN_RATE or rate > MAX_RATE:
        raise LorakitError(f"{path} is sampled at {rate} Hz, below the {MIN_RATE} Hz speech needs (Whisper hears up "
                           f"to 8 kHz), so it is refused rather than resampled: record or export it at 16000 Hz"
                           if rate < MIN_RATE else
                           f"{path} is sampled at {rate} Hz, above the {MAX_RATE} Hz lorakit reads; export it at "
                           "16000 Hz")


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    """Interleaved little-endian PCM samples as float32 in [-1, 1]."""
    if width == 1:  # 8-bit wav is unsigned
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        value = np.where(value >= 1 << 23, value - (1 << 24), value)
        return value.astype(np.float32) / float(1 << 23)
    return (np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
