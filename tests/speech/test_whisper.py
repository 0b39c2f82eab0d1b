from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TOLERANCES, assert_close
from ct2_models import ct2_bytes, tiny_whisper, whisper_variables, write_whisper_ct2
from reference_whisper import REFERENCE, reference_tone
from transformers import WhisperForConditionalGeneration

from lorakit.errors import LorakitError
from lorakit.models import load_model
from lorakit.speech import whisper as speech_whisper
from lorakit.speech.ctranslate2_file import read_ct2_file
from lorakit.speech.whisper import (
    CHECK_SENTENCE,
    WHISPER_CACHE_NAME,
    check_transcript,
    convert_whisper,
    espeak_clip,
    whisper_config,
    whisper_state_dict,
)


def _convert(path: Path) -> WhisperForConditionalGeneration:
    ct2 = read_ct2_file(path)
    config = whisper_config(ct2)
    model = WhisperForConditionalGeneration(config).eval()
    model.load_state_dict(whisper_state_dict(ct2, config), strict=True)
    model.tie_weights()
    return model


def _inputs(model: WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    frames = 2 * model.config.max_source_positions  # conv2 halves the frames
    return {"input_features": torch.randn(2, model.config.num_mel_bins, frames),
            "decoder_input_ids": torch.randint(0, model.config.vocab_size, (2, 5))}


def test_converted_tiny_whisper_gives_the_original_logits_bit_for_bit(tmp_path: Path) -> None:
    original = tiny_whisper()
    converted = _convert(write_whisper_ct2(original, tmp_path / "model.bin"))
    with torch.no_grad():
        assert_close(converted(**_inputs(original)).logits, original(**_inputs(original)).logits, "exact")


def test_config_read_from_the_file_has_the_model_dimensions(tmp_path: Path) -> None:
    original = tiny_whisper()
    config = whisper_config(read_ct2_file(write_whisper_ct2(original, tmp_path / "model.bin")))
    for key in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers",
                "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                "max_source_positions", "max_target_positions"):
        assert getattr(config, key) == getattr(original.config, key), key


def test_output_projection_is_tied_to_the_embeddings(tmp_path: Path) -> None:
    converted = _convert(write_whisper_ct2(tiny_whisper(), tmp_path / "model.bin"))
    assert converted.proj_out.weight.data_ptr() == converted.model.decoder.embed_tokens.weight.data_ptr()


def test_float16_file_converts_to_the_rounded_weights(tmp_path: Path) -> None:
    original = tiny_whisper()
    converted = _convert(write_whisper_ct2(original, tmp_path / "model.bin", np.dtype("float16")))
    for name, param in original.state_dict().items():
        assert torch.equal(converted.state_dict()[name], param.half().float()), name


def test_nonzero_k_bias_is_refused(tmp_path: Path) -> None:
    original = tiny_whisper()
    bias = whisper_variables(original, np.dtype("float32"))["encoder/layer_1/self_attention/linear_0/bias"].copy()
    bias[16] = 0.5  # the first k entry (q occupies 0..15)
    path = write_whisper_ct2(original, tmp_path / "model.bin", **{"encoder/layer_1/self_attention/linear_0/bias": bias})
    with pytest.raises(LorakitError, match="linear_0/bias has a nonzero k part"):
        _convert(path)


def test_another_spec_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(ct2_bytes(whisper_variables(tiny_whisper(), np.dtype("float32")), spec="TransformerSpec"))
    with pytest.raises(LorakitError, match="holds a TransformerSpec, not a WhisperSpec"):
        whisper_config(read_ct2_file(path))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"head": "sequence-classification"}, "whisper-tiny has one head"),
    ({"head": "sequence-classification", "num_labels": 3}, "whisper-tiny has one head"),
    ({"quantize": "nf4"}, "loads dense only"),
])
def test_load_model_refuses_options_whisper_does_not_have(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(LorakitError, match=match):
        load_model("whisper-tiny", **kwargs)


def test_incomplete_cache_is_reported_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / WHISPER_CACHE_NAME).mkdir()
    (tmp_path / WHISPER_CACHE_NAME / "config.json").write_text("{}")
    with pytest.raises(LorakitError, match=r"lacks generation_config.json, model.safetensors.*delete it to rebuild"):
        load_model("whisper-tiny", cache_dir=tmp_path)


def test_conversion_names_a_missing_wheel_file_and_the_reinstall(tmp_path: Path) -> None:
    write_whisper_ct2(tiny_whisper(), tmp_path / "model.bin")
    with pytest.raises(LorakitError, match=r"config.json is missing; reinstall with: pip install"):
        convert_whisper(tmp_path, tmp_path / "out")


# The real model against CTranslate2's numbers (recorded by reference_whisper.py beside this file).

REF = json.loads(REFERENCE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def whisper() -> tuple[Any, Any]:
    return load_model("whisper-tiny")


def _audio(name: str) -> np.ndarray:
    if name == "tone":
        return reference_tone()
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed; the speech reference needs it (apt-get install espeak-ng)")
    return espeak_clip(CHECK_SENTENCE)


def _features(processor: Any, name: str) -> torch.Tensor:
    audio = _audio(name)
    mel = processor.feature_extractor(audio, sampling_rate=16_000, return_tensors="pt").input_features
    recorded = REF["inputs"][name]["mel_norm"]
    if name == "speech" and abs(mel.double().norm().item() - recorded) > 1e-6 * recorded:
        pytest.skip(f"this espeak-ng speaks the check sentence differently from the recorded one "
                    f"({REF['espeak_ng']}); rerun reference_whisper.py to record its numbers")
    assert mel.double().norm().item() == pytest.approx(recorded, rel=1e-6)
    return mel  # (1, 80, 3000)


_RUNS: dict[str, dict[str, torch.Tensor]] = {}


def _run(whisper: tuple[Any, Any], name: str) -> dict[str, torch.Tensor]:
    """The converted model on one reference input, once per session: the encoder output, and the decoder's logits
    teacher-forced on the prompt and CTranslate2's greedy tokens. (transformers' `generate` is left out: its
    token suppression alone takes seconds here; the slow test below runs it.)"""
    if name not in _RUNS:
        model, processor = whisper
        ids = torch.tensor([REF["prompt"] + REF["inputs"][name]["ids"]])
        with torch.no_grad():
            encoded = model.model.encoder(_features(processor, name))
            logits = model(encoder_outputs=encoded, decoder_input_ids=ids).logits[0]  # (steps, vocab)
        _RUNS[name] = {"encoded": encoded.last_hidden_state, "logits": logits}
    return _RUNS[name]


@pytest.mark.integration
def test_loaded_whisper_is_tiny_en(whisper: tuple[Any, Any]) -> None:
    model, processor = whisper
    config = model.config
    assert (config.d_model, config.encoder_layers, config.decoder_layers, config.encoder_attention_heads,
            config.num_mel_bins, config.vocab_size) == (384, 4, 4, 6, 80, 51864)
    # The file's 37,764,864 floats less the 12 zero k biases (384 each) that transformers' Whisper does not have.
    assert sum(p.numel() for p in model.parameters()) == 37_764_864 - 12 * 384
    assert len(processor.tokenizer) == 51864
    assert processor.tokenizer.convert_ids_to_tokens([50257, 50362, 51863]) == [
        "<|startoftranscript|>", "<|notimestamps|>", "<|30.00|>"]


@pytest.mark.integration
def test_later_loads_read_the_cache_without_converting(whisper: tuple[Any, Any],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(speech_whisper, "convert_whisper", refuse)
    model, _ = load_model("whisper-tiny")  # the module fixture built the default cache
    assert model.config._name_or_path == "whisper-tiny"


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tone", "speech"])
def test_encoder_matches_ctranslate2(whisper: tuple[Any, Any], name: str) -> None:
    expected = REF["inputs"][name]["encoder"]
    encoded = _run(whisper, name)["encoded"]  # (1, 1500, 384)
    assert list(encoded.shape) == expected["shape"]
    assert_close(encoded[0, :4, :8], torch.tensor(expected["slice"]), "fp32 vs CTranslate2")
    assert_close(encoded[0, ::REF["row_step"]].double().norm(dim=-1), torch.tensor(expected["row_norms"]).double(),
                 "fp32 vs CTranslate2")
    assert encoded.double().norm().item() == pytest.approx(expected["norm"], rel=TOLERANCES["fp32 vs CTranslate2"][0])


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tone", "speech"])
def test_decoder_logits_match_ctranslate2(whisper: tuple[Any, Any], name: str) -> None:
    logits = _run(whisper, name)["logits"]
    for step, expected in enumerate(REF["inputs"][name]["steps"]):
        row = logits[len(REF["prompt"]) - 1 + step]  # (vocab,) the logits that choose generated token `step`
        fixed = [(i, v) for i, v in zip(REF["fixed_ids"], expected["fixed_logits"], strict=True) if v is not None]
        assert_close(row[[i for i, _ in fixed]], torch.tensor([v for _, v in fixed]), "fp32 vs CTranslate2")
        assert_close(row[expected["top_ids"]], torch.tensor(expected["top_logits"]), "fp32 vs CTranslate2")


@pytest.mark.integration
@pytest.mark.parametrize("name", ["tone", "speech"])
def test_greedy_transcript_equals_ctranslate2s(whisper: tuple[Any, Any], name: str) -> None:
    model, processor = whisper
    recorded = REF["inputs"][name]
    steps = _run(whisper, name)["logits"][len(REF["prompt"]) - 1:]  # (len(ids) + 1, vocab): each next token
    suppressed = torch.zeros(steps.shape[-1], dtype=torch.bool)
    suppressed[model.generation_config.suppress_tokens] = True
    begin = suppressed.clone()
    begin[model.generation_config.begin_suppress_tokens] = True
    greedy = [int(row.masked_fill(begin if i == 0 else suppressed, -torch.inf).argmax()) for i, row in enumerate(steps)]
    assert greedy == recorded["ids"] + [model.generation_config.eos_token_id]  # CTranslate2's ids omit the end
    assert processor.decode(recorded["ids"], skip_special_tokens=True).strip() == recorded["text"]


@pytest.mark.integration
@pytest.mark.slow  # two greedy transcriptions of the check clip, one by a broken copy of the model: ~10 s
def test_conversion_check_fails_on_swapped_projections(whisper: tuple[Any, Any]) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed; the conversion check needs it (apt-get install espeak-ng)")
    model, processor = whisper
    broken = copy.deepcopy(model)
    for layer in broken.model.encoder.layers:  # a plausible mapping bug: q and k exchanged
        attention = layer.self_attn
        attention.q_proj.weight.data, attention.k_proj.weight.data = (attention.k_proj.weight.data,
                                                                      attention.q_proj.weight.data)
    check_transcript(model, processor)  # transformers' generate on the real model gives the sentence
    with pytest.raises(RuntimeError, match="the conversion is wrong"):
        check_transcript(broken, processor)
