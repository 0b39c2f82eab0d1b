"""Reading an adapter's updates as factors: the product is the ΔW the model applies (plain, rsLoRA, per-module
ranks, principal), modules that are not linear are skipped with a reason, and pairs of adapters are checked."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, LorakitError, delta_weight, inject, save_adapter
from lorakit.analysis.factors import check_comparable, module_kind_and_layer, read_factors
from lorakit.layers import lora_modules


def _trained(model, seed: int = 5, **config):
    inject(model, LoraConfig(**{"rank": 4, **config}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _expected_updates(model) -> dict[str, torch.Tensor]:
    """ΔW of every adapted module in the (out, in) layout, from lorakit's single source of truth for ΔW."""
    return {name: module.matrix_to_weight(delta_weight(module)).double() for name, module in lora_modules(model)}


@pytest.mark.parametrize("config", [{}, {"rslora": True, "alpha": 6}, {"rank_pattern": {"v_proj": 2}}],
                         ids=["plain", "rslora", "rank_pattern"])
def test_factors_multiply_to_the_update_the_model_applies(tmp_path, config):
    model = _trained(tiny_llama(), targets=["llama"], **config)
    save_adapter(model, tmp_path / "a")
    factors = read_factors(tmp_path / "a")
    expected = _expected_updates(model)
    assert set(factors.modules) == set(expected)
    for name, module in factors.modules.items():
        left, right = module.update()
        assert_close(left @ right, expected[name], "fp32 vs float64 formula")


def test_gpt2_conv1d_factors_are_in_the_linear_layout(tmp_path):
    model = _trained(tiny_gpt2(), targets=["c_attn", "c_fc"])
    save_adapter(model, tmp_path / "a")
    factors = read_factors(tmp_path / "a")
    for name, module in lora_modules(model):
        assert factors.modules[name].shape == (module.out_features, module.in_features)  # type: ignore[attr-defined]
        left, right = factors.modules[name].update()
        assert_close(left @ right, _expected_updates(model)[name], "fp32 vs float64 formula")


def test_a_principal_adapter_is_measured_from_the_original_weight(tmp_path):
    original = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    model = _trained(tiny_llama(), targets=["q_proj", "down_proj"], init="principal")
    save_adapter(model, tmp_path / "a")
    factors = read_factors(tmp_path / "a")
    assert not factors.principal_missing
    for name, module in lora_modules(model):
        merged = module.weight_matrix().double() + delta_weight(module).double()  # residual + s·B A
        left, right = factors.modules[name].update()
        assert left.shape[1] == 2 * module.rank  # [B, -B₀]·[A; A₀]
        assert_close(left @ right, merged - original[f"{name}.weight"].double(), "fp32 reordered")


def test_embeddings_are_skipped_with_a_reason(tmp_path):
    save_adapter(_trained(tiny_llama(), targets=["q_proj", "embed_tokens"]), tmp_path / "a")
    factors = read_factors(tmp_path / "a")
    assert set(factors.skipped) == {"model.embed_tokens"}
    assert "embedding" in factors.skipped["model.embed_tokens"]
    assert all(n.endswith("q_proj") for n in factors.modules)


def test_module_kind_is_the_path_after_the_layer_index():
    assert module_kind_and_layer("model.layers.12.self_attn.q_proj") == ("self_attn.q_proj", 12)
    assert module_kind_and_layer("transformer.h.3.mlp.c_proj") == ("mlp.c_proj", 3)
    assert module_kind_and_layer("transformer.h.3.attn.c_proj") == ("attn.c_proj", 3)
    assert module_kind_and_layer("lm_head") == ("lm_head", None)


def test_two_adapters_of_one_base_are_compared_on_the_modules_both_adapt(tmp_path):
    save_adapter(_trained(tiny_llama(), targets=["q_proj", "v_proj"]), tmp_path / "a", base_model="tiny")
    save_adapter(_trained(tiny_llama(), targets=["v_proj", "o_proj"], rank=2), tmp_path / "b", base_model="tiny")
    common = check_comparable(read_factors(tmp_path / "a"), read_factors(tmp_path / "b"))
    assert common == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_factors_of_different_ranks_are_an_inconsistent_adapter(tmp_path):
    from safetensors.torch import load_file, save_file

    from lorakit.io import WEIGHTS_NAME

    save_adapter(_trained(tiny_llama(), targets=["q_proj"]), tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = tensors[key][:, :3].contiguous()
    save_file(tensors, tmp_path / "a" / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(LorakitError, match="factors of different ranks"):
        read_factors(tmp_path / "a")
