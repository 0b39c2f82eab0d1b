"""The base's W per analysed module: in ΔW's (out, in) layout whatever the layer stores, and a base that lacks a
module or has it in another shape named in the error."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from tiny_adapters import word_tokenizer

from lorakit import LoraConfig, LorakitError, inject, save_adapter
from lorakit.analysis.base import Base, base_name, base_weights
from lorakit.analysis.factors import read_factors


def _saved(model, path, targets, base="tiny"):
    inject(model, LoraConfig(rank=2, targets=targets))
    save_adapter(model, path, base_model=base)
    return read_factors(path)


def test_gpt2_conv1d_weights_are_transposed_to_the_update_layout(tmp_path):
    factors = _saved(tiny_gpt2(), tmp_path / "a", ["c_attn", "c_proj"])
    plain = tiny_gpt2()
    weights = base_weights(Base("tiny", plain, word_tokenizer()), factors)
    modules = dict(plain.named_modules())
    for name, w in weights.items():
        assert tuple(w.shape) == factors.modules[name].shape
        assert torch.equal(w, modules[name].weight.T)  # Conv1D stores (in, out)


def test_llama_linear_weights_are_taken_as_they_are(tmp_path):
    factors = _saved(tiny_llama(), tmp_path / "a", ["q_proj", "down_proj"])
    plain = tiny_llama()
    modules = dict(plain.named_modules())
    for name, w in base_weights(Base("tiny", plain, word_tokenizer()), factors).items():
        assert torch.equal(w, modules[name].weight)


def test_a_base_without_the_adapted_module_is_named(tmp_path):
    factors = _saved(tiny_llama(), tmp_path / "a", ["q_proj"])
    with pytest.raises(LorakitError, match="has no linear module 'model.layers.0.self_attn.q_proj'"):
        base_weights(Base("gpt", tiny_gpt2(), word_tokenizer()), factors)


def test_the_base_is_the_given_model_else_the_recorded_one(tmp_path):
    factors = _saved(tiny_llama(), tmp_path / "a", ["q_proj"], base="recorded")
    assert base_name(factors) == "recorded" and base_name(factors, "other") == "other"
    factors.base = None
    with pytest.raises(LorakitError, match="records no base model; pass --model"):
        base_name(factors)
