"""LoRA on Whisper: which linears the presets adapt, and a PEFT round trip of a saved adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES, relative_error
from ct2_models import tiny_whisper
from torch import nn

from lorakit import LoraConfig, adapter_parameters, inject, save_adapter
from lorakit.errors import ConfigError
from lorakit.inject import plan
from lorakit.models import load_model

ENCODER_LINEARS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"}
DECODER_LINEARS = ENCODER_LINEARS | {"encoder_attn.q_proj", "encoder_attn.k_proj", "encoder_attn.v_proj",
                                     "encoder_attn.out_proj"}


def _expected(encoder_layers: int, decoder_layers: int) -> set[str]:
    return ({f"model.encoder.layers.{i}.{n}" for i in range(encoder_layers) for n in ENCODER_LINEARS}
            | {f"model.decoder.layers.{i}.{n}" for i in range(decoder_layers) for n in DECODER_LINEARS})


@pytest.mark.parametrize("targets", [["all-linear"], ["whisper"]])
def test_presets_adapt_attention_and_mlp_linears_of_both_stacks_but_not_the_tied_projection(
        targets: list[str]) -> None:
    model = tiny_whisper()
    adapted = plan(model, LoraConfig(rank=2, targets=targets)).adapted
    assert set(adapted) == _expected(2, 2)
    assert "proj_out" not in adapted


@pytest.mark.integration
@pytest.mark.parametrize("targets", [["all-linear"], ["whisper"]])
def test_presets_adapt_the_64_linears_of_whisper_tiny(targets: list[str]) -> None:
    model, _ = load_model("whisper-tiny")
    adapted = plan(model, LoraConfig(rank=8, targets=targets)).adapted
    assert set(adapted) == _expected(4, 4) and len(adapted) == 4 * 6 + 4 * 10


def _inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    frames = 2 * model.config.max_source_positions
    return {"input_features": torch.randn(2, model.config.num_mel_bins, frames, generator=generator),
            "decoder_input_ids": torch.randint(0, model.config.vocab_size, (2, 5), generator=generator)}


def test_lorakit_adapter_on_whisper_loads_in_peft_with_the_same_logits(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_whisper()
    inject(model, LoraConfig(rank=4, alpha=8, targets=["whisper"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in adapter_parameters(model).values():  # non-zero B: the adapter must change the output
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        ours = model(**_inputs(model)).logits
        base = tiny_whisper()(**_inputs(model)).logits
    save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_whisper(), tmp_path).eval()
    with torch.no_grad():
        theirs = loaded(**_inputs(model)).logits
    assert relative_error(ours, base) > TOLERANCES["adapter changes output"][0]
    assert relative_error(theirs, ours) <= TOLERANCES[torch.float32][0]
    assert sum(1 for n, _ in loaded.named_modules() if n.endswith("lora_A")) == len(_expected(2, 2))


def test_naming_the_tied_output_projection_is_refused() -> None:
    with pytest.raises(ConfigError, match="'proj_out' shares its weight with 'model.decoder.embed_tokens'"):
        plan(tiny_whisper(), LoraConfig(rank=2, targets=["proj_out"]))
