"""QLoRA adapters between lorakit and PEFT: PEFT + bitsandbytes on the same quantized base, both directions."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_llama

from lorakit import LoraConfig, inject, load_adapter, quant, save_adapter
from lorakit.layers import lora_modules

peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _nf4_base():
    """tiny_llama with its block linears in NF4, flagged as transformers flags a 4-bit load (PEFT dispatches its
    bitsandbytes LoRA layer on that flag)."""
    model = tiny_llama()
    quant.quantize_model(model, "nf4")
    model.is_loaded_in_4bit = True
    return model


def _randomize(params, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_peft_qlora_adapter_loads_here_with_the_same_outputs(tmp_path, token_ids):
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    peft_model = peft.get_peft_model(_nf4_base(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    assert isinstance(peft_model.base_model.model.model.layers[0].self_attn.q_proj, PeftLinear4bit)
    _randomize([p for n, p in peft_model.named_parameters() if "lora_" in n], seed=1)
    expected = peft_model(token_ids).logits
    peft_model.save_pretrained(tmp_path / "peft")
    ours = _nf4_base()
    load_adapter(ours, tmp_path / "peft")
    assert all(m.quantized for _, m in lora_modules(ours))
    assert_close(ours(token_ids).logits, expected, "fp32 reordered")


def test_lorakit_qlora_adapter_loads_in_peft_with_the_same_outputs(tmp_path, token_ids):
    ours = _nf4_base()
    inject(ours, LoraConfig(rank=4, alpha=8, targets=TARGETS))
    _randomize([p for _, m in lora_modules(ours) for p in m.lora_parameters()], seed=2)
    expected = ours(token_ids).logits
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_nf4_base(), tmp_path / "ours")
    assert_close(theirs(token_ids).logits, expected, "fp32 reordered")
