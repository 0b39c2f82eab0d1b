"""Merge algebra: merge/unmerge inverses, merged == unmerged outputs, errors that change nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_bert, tiny_gpt2, tiny_llama
from transformers import LlamaForCausalLM

from lorakit import (
    LoraConfig,
    LorakitError,
    MergeStateError,
    adapters_disabled,
    inject,
    is_merged,
    merge,
    merged_state_dict,
    set_strength,
    unmerge,
)
from lorakit.layers import lora_modules


def _trained(model, **config):
    inject(model, LoraConfig(rank=4, **config))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, module in lora_modules(model):
            for p in module.lora_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _changed(model, before):
    """The state-dict keys whose values differ from `before`."""
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def _adapted_weights(model):
    return {f"{name}.weight" for name, _ in lora_modules(model)}


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert, tiny_gpt2])
def test_merged_and_unmerged_outputs_agree(make, token_ids):
    model = _trained(make(), targets=["all-linear"])
    with torch.no_grad():
        unmerged = _logits(model, token_ids)
        before = _weights(model)
        merge(model)
        merged = _logits(model, token_ids)
    assert _changed(model, before) == _adapted_weights(model)  # the deltas are in the weights now
    assert_close(merged, unmerged, "fp32 reordered")


def _logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("init", ["standard", "principal"])
def test_merge_then_unmerge_restores_weight(init):
    model = _trained(tiny_llama(), targets=["llama"], init=init)
    before = _weights(model)
    merge(model)
    assert is_merged(model)
    assert _changed(model, before) == _adapted_weights(model)
    unmerge(model)
    assert not is_merged(model)
    for key, value in model.state_dict().items():
        assert_close(value, before[key], torch.float32)


def test_merging_twice_is_refused_and_changes_nothing():
    model = _trained(tiny_llama(), targets=["q_proj"])
    merge(model)
    once = _weights(model)
    with pytest.raises(MergeStateError, match="already merged"):
        merge(model)
    assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())


def test_unmerge_without_merge_is_refused():
    model = _trained(tiny_llama(), targets=["q_proj"])
    with pytest.raises(MergeStateError, match="not merged"):
        unmerge(model)


def test_training_step_while_merged_is_refused(token_ids):
    model = _trained(tiny_llama(), targets=["q_proj"])
    merge(model)
    model.train()
    with pytest.raises(MergeStateError, match="unmerge"):
        model(token_ids)
    model.eval()
    with torch.no_grad():
        model(token_ids)  # inference on a merged model is the point of merging


def test_nan_delta_is_refused_before_any_weight_changes():
    model = _trained(tiny_llama(), targets=["q_proj", "v_proj"])
    last = lora_modules(model)[-1][1]
    with torch.no_grad():
        last.lora_B.weight[0, 0] = float("nan")
    before = _weights(model)
    with pytest.raises(LorakitError, match="NaN or inf"):
        merge(model)
    assert not is_merged(model)
    assert all(torch.equal(v, before[k]) or torch.isnan(v).any() for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if not torch.isnan(v).any())


def test_merged_state_dict_loads_into_plain_transformers_with_same_outputs(token_ids):
    model = _trained(tiny_llama(), targets=["llama"])
    with torch.no_grad():
        expected = model(token_ids).logits
    state = merged_state_dict(model)
    plain = LlamaForCausalLM(model.config).eval()
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert_close(plain(token_ids).logits, expected, "fp32 reordered")
    assert not is_merged(model)


def test_set_strength_zero_gives_base_output_and_one_restores(token_ids):
    base = tiny_llama()
    with torch.no_grad():
        base_out = base(token_ids).logits
    model = _trained(tiny_llama(), targets=["llama"])
    with torch.no_grad():
        adapted = model(token_ids).logits
        set_strength(model, 0.0)
        assert_close(model(token_ids).logits, base_out, torch.float32)
        set_strength(model, 1.0)
        assert_close(model(token_ids).logits, adapted, "exact")
        with adapters_disabled(model):
            assert_close(model(token_ids).logits, base_out, torch.float32)
        assert_close(model(token_ids).logits, adapted, "exact")


def test_half_strength_halves_the_delta():
    model = _trained(tiny_llama(), targets=["q_proj"])
    name, module = lora_modules(model)[0]
    from lorakit import delta_weight

    full = delta_weight(module)
    set_strength(model, 0.5)
    assert_close(delta_weight(module), full * 0.5, torch.float32)


def test_set_strength_while_merged_is_refused():
    model = _trained(tiny_llama(), targets=["q_proj"])
    merge(model)
    with pytest.raises(MergeStateError):
        set_strength(model, 0.5)
