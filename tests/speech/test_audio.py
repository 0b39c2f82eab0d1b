"""Reading wav files into Whisper's 16 kHz mono waveform and its log-mel features."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from tiny_whisper import tone, write_tone
from transformers import WhisperFeatureExtractor

from lorakit.errors import LorakitError
from lorakit.speech.audio import SAMPLE_RATE, check_wav, log_mel, read_wav, write_wav


def _write_pcm(path: Path, samples: np.ndarray, rate: int, channels: int, width: int) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return path


def _peak_hz(audio: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(len(audio), 1 / rate)[spectrum.argmax()])


def test_read_wav_resamples_22050_hz_to_16_khz_keeping_duration_and_pitch(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "a.wav", rate=22050, seconds=1.0)
    audio, rate = read_wav(path)
    assert rate == SAMPLE_RATE and len(audio) == SAMPLE_RATE
    assert abs(_peak_hz(audio, rate) - 440.0) <= 1.0


def test_read_wav_keeps_the_file_rate_when_target_rate_is_none(tmp_path: Path) -> None:
    audio, rate = read_wav(write_tone(tmp_path / "a.wav", rate=22050), target_rate=None)
    assert rate == 22050 and len(audio) == 11025


def test_read_wav_logs_that_it_resampled(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG", logger="lorakit.speech.audio"):
        read_wav(write_tone(tmp_path / "a.wav", rate=44100))
    assert "from 44100 Hz to 16000 Hz" in caplog.text


def test_read_wav_mixes_stereo_down_to_the_channel_mean(tmp_path: Path) -> None:
    left, right = np.full(100, 1000, dtype="<i2"), np.full(100, -3000, dtype="<i2")
    path = _write_pcm(tmp_path / "s.wav", np.stack([left, right], axis=1).reshape(-1), 16000, 2, 2)
    audio, _ = read_wav(path)
    np.testing.assert_array_equal(audio, np.full(100, -1000 / 32768, dtype=np.float32))


@pytest.mark.parametrize(("width", "raw", "expected"), [
    (1, np.array([0, 128, 255], dtype=np.uint8).tobytes(), [-1.0, 0.0, 127 / 128]),
    (3, bytes([0, 0, 0x80, 0, 0, 0, 0xFF, 0xFF, 0x7F]), [-1.0, 0.0, (2**23 - 1) / 2**23]),
    (4, np.array([-(2**31), 0, 2**30], dtype="<i4").tobytes(), [-1.0, 0.0, 0.5]),
])
def test_read_wav_scales_8_24_and_32_bit_pcm_to_unit_range(tmp_path: Path, width: int, raw: bytes,
                                                            expected: list[float]) -> None:
    path = tmp_path / "x.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(16000)
        w.writeframes(raw)
    np.testing.assert_allclose(read_wav(path)[0], expected, rtol=0, atol=1e-7)


def test_write_then_read_round_trips_to_16_bit_precision(tmp_path: Path) -> None:
    audio = tone(0.1)
    write_wav(tmp_path / "t.wav", audio, 16000)
    np.testing.assert_allclose(read_wav(tmp_path / "t.wav")[0], audio, rtol=0, atol=1 / 32768)


def test_a_rate_below_8_khz_is_refused_not_resampled(tmp_path: Path) -> None:
    path = write_tone(tmp_path / "low.wav", rate=4000)
    with pytest.raises(LorakitError, match="4000 Hz.*refused rather than resampled"):
        read_wav(path)


def test_a_file_that_is_not_a_wav_is_refused_naming_the_conversion(tmp_path: Path) -> None:
    path = tmp_path / "clip.wav"
    path.write_bytes(b"ID3\x03\x00 an mp3 header")
    with pytest.raises(LorakitError, match="not a PCM wav file.*sox"):
        check_wav(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="gone.wav does not exist"):
        read_wav(tmp_path / "gone.wav")


def test_check_wav_returns_the_rate_without_reading_samples(tmp_path: Path) -> None:
    assert check_wav(write_tone(tmp_path / "a.wav", rate=22050)) == 22050


def test_log_mel_gives_whisper_s_30_second_window_as_the_extractor_does() -> None:
    extractor = WhisperFeatureExtractor()
    audio = tone(0.7)
    features = log_mel(extractor, [audio, audio[:4000]])
    assert features.shape == (2, 80, 3000) and features.dtype == np.float32
    expected = extractor([audio], sampling_rate=16000, return_tensors="np")["input_features"][0]
    np.testing.assert_array_equal(features[0], expected)


def test_log_mel_refuses_a_clip_longer_than_30_seconds() -> None:
    with pytest.raises(LorakitError, match="31.0 s.*at most 30 s"):
        log_mel(WhisperFeatureExtractor(), [np.zeros(31 * 16000, dtype=np.float32)])
