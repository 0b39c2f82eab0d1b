"""Adapter files: bit-exact round trips, strict loading, and damage that is named, not loaded."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close, tiny_bert, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, LorakitError, inject, inspect_adapter, load_adapter, save_adapter
from lorakit.errors import ConfigError
from lorakit.io import CONFIG_NAME, PRINCIPAL_NAME, WEIGHTS_NAME
from lorakit.layers import lora_modules


def _trained(model, **config):
    inject(model, LoraConfig(rank=4, **config))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def test_save_then_load_is_bit_exact(tmp_path, token_ids):
    model = _trained(tiny_bert(), targets=["bert"], modules_to_save=["classifier"], bias="lora_only")
    save_adapter(model, tmp_path / "a")
    fresh = tiny_bert()
    report = load_adapter(fresh, tmp_path / "a")
    assert report.adapted == model.lorakit_state.adapted
    saved = {k: v for k, v in model.state_dict().items()}
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, saved[key]), key
    with torch.no_grad():
        assert torch.equal(fresh(token_ids).logits, model(token_ids).logits)


def test_loaded_adapter_is_trainable_again(tmp_path):
    model = _trained(tiny_llama(), targets=["q_proj"])
    save_adapter(model, tmp_path / "a")
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


def test_principal_adapter_loads_onto_the_original_base(tmp_path, token_ids):
    model = _trained(tiny_llama(), targets=["llama"], init="principal")
    save_adapter(model, tmp_path / "a")
    assert (tmp_path / "a" / PRINCIPAL_NAME).is_file()
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert_close(fresh(token_ids).logits, model(token_ids).logits, "exact")


def test_principal_adapter_without_init_file_rebuilds_residual_by_svd(tmp_path, token_ids):
    model = _trained(tiny_llama(), targets=["q_proj", "v_proj"], init="principal")
    save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / PRINCIPAL_NAME).unlink()
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert_close(fresh(token_ids).logits, model(token_ids).logits, torch.float32)


def test_principal_converted_to_plain_lora_applies_to_unmodified_base(tmp_path, token_ids):
    model = _trained(tiny_llama(), targets=["llama"], init="principal", alpha=8)
    save_adapter(model, tmp_path / "plain", convert_principal=True)
    config = json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path / "plain")
    with torch.no_grad():
        assert_close(fresh(token_ids).logits, model(token_ids).logits, torch.float32)


def test_adapter_for_another_base_names_each_mismatched_key(tmp_path):
    save_adapter(_trained(tiny_llama(), targets=["q_proj"]), tmp_path / "a")
    bigger = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(LorakitError) as err:
        load_adapter(bigger, tmp_path / "a")
    message = str(err.value)
    assert "shape mismatch for 'model.layers.0.self_attn.q_proj.lora_A.weight'" in message
    assert "model.layers.1.self_attn.q_proj.lora_B.weight" in message
    assert not lora_modules(bigger)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    from safetensors.torch import load_file, save_file

    save_adapter(_trained(tiny_llama(), targets=["q_proj"]), tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = tensors.pop(key)
    save_file(tensors, weights)
    with pytest.raises(LorakitError) as err:
        load_adapter(tiny_llama(), tmp_path / "a")
    assert "missing key 'model.layers.0.self_attn.q_proj.lora_A.weight'" in str(err.value)
    assert "unexpected key 'model.layers.0.self_attn.k_proj.lora_A.weight'" in str(err.value)


def test_truncated_safetensors_file_is_named(tmp_path):
    save_adapter(_trained(tiny_llama(), targets=["q_proj"]), tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(LorakitError, match="truncated or corrupted"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_corrupted_tensor_bytes_fail_the_checksum(tmp_path):
    save_adapter(_trained(tiny_llama(), targets=["q_proj"]), tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0xFF
    weights.write_bytes(bytes(data))
    fresh = tiny_llama()
    with pytest.raises(LorakitError, match="checksum mismatch"):
        load_adapter(fresh, tmp_path / "a")
    assert not lora_modules(fresh)


def test_config_with_unknown_keys_is_refused(tmp_path):
    save_adapter(_trained(tiny_llama(), targets=["q_proj"]), tmp_path / "a")
    path = tmp_path / "a" / CONFIG_NAME
    config = json.loads(path.read_text())
    config["lora_alpah"] = 3
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unknown key 'lora_alpah' .*did you mean 'lora_alpha'"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_unsupported_peft_feature_is_refused(tmp_path):
    save_adapter(_trained(tiny_llama(), targets=["q_proj"]), tmp_path / "a")
    path = tmp_path / "a" / CONFIG_NAME
    config = json.loads(path.read_text())
    config["lora_bias"] = True
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="lora_bias=True is a PEFT feature lorakit does not support"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_base_fingerprint_mismatch_is_an_error_unless_overridden(tmp_path):
    from safetensors.torch import load_file, save_file

    save_adapter(_trained(tiny_llama(), targets=["q_proj"]), tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS_NAME
    save_file(load_file(weights), weights, metadata={"format": "pt", "lorakit_fingerprint": "0" * 16,
                                                     "lorakit_base_model": "other-model"})
    with pytest.raises(LorakitError, match="was trained on 'other-model', this model is 'LlamaForCausalLM'"):
        load_adapter(tiny_llama(), tmp_path / "a")
    load_adapter(tiny_llama(), tmp_path / "a", allow_base_mismatch=True)


def test_missing_directory_and_files_are_named(tmp_path):
    with pytest.raises(LorakitError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match="adapter_config.json is missing"):
        load_adapter(tiny_llama(), tmp_path / "empty")


def test_saving_over_an_existing_adapter_replaces_it_whole(tmp_path):
    save_adapter(_trained(tiny_llama(), targets=["q_proj"], init="principal"), tmp_path / "a")
    save_adapter(_trained(tiny_llama(), targets=["v_proj"]), tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["target_modules"][0].endswith("v_proj")


def test_inspect_reports_base_targets_ranks_and_size(tmp_path):
    save_adapter(_trained(tiny_llama(), targets=["llama"], rank_pattern={"q_proj": 2}), tmp_path / "a",
                 base_model="tiny-llama")
    info = inspect_adapter(tmp_path / "a")
    assert info["base_model"] == "tiny-llama" and info["targets"] == 14 and info["rank"] == 4
    assert info["ranks"] == [2, 4]  # read from the factors: q_proj's are rank 2
    assert info["rank_overrides"] == 2 and info["bytes"] > info["parameters"] * 4
