"""lorakit.swiglu: LLaMA-family gated MLPs fused into one autograd node that keeps less for backward."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, inject
from lorakit.swiglu import fuse_gated_mlps, is_gated_silu_mlp, silu_mul
from lorakit.train.run import enable_activation_checkpointing


def _adapted_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    model = tiny_llama(seed)
    inject(model, LoraConfig(rank=4, alpha=8, targets=["llama"], seed=seed, init="principal"))  # B != 0
    model.train()
    return model, copy.deepcopy(model)


def _step(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_fused_mlps_give_the_same_logits_and_gradients_bit_for_bit(token_ids):
    plain, fused = _adapted_pair()
    assert fuse_gated_mlps(fused) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    logits, grads = _step(plain, token_ids)
    fused_logits, fused_grads = _step(fused, token_ids)
    assert torch.equal(fused_logits, logits)
    assert grads.keys() == fused_grads.keys() and any("mlp" in n for n in grads)
    for name, grad in grads.items():
        assert torch.equal(fused_grads[name], grad), name


def test_silu_mul_keeps_only_its_two_inputs():
    gate, up = (torch.randn(4, 6, requires_grad=True) for _ in range(2))
    kept: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        silu_mul(gate * 1, up * 1)
    assert len(kept) == 2 and all(t.shape == (4, 6) for t in kept)


def _products_alive_after_forward(model: nn.Module, ids: torch.Tensor) -> list[bool]:
    """For each MLP: is the tensor its down projection received still alive once the forward has returned?"""
    refs: list[weakref.ref] = []
    handles = [layer.mlp.down_proj.register_forward_hook(lambda m, args, out: refs.append(weakref.ref(args[0])))
               for layer in model.model.layers]
    loss = model(input_ids=ids, labels=ids).loss
    gc.collect()
    alive = [r() is not None for r in refs]
    loss.backward()
    for h in handles:
        h.remove()
    return alive


def test_fused_mlps_keep_neither_the_silu_nor_the_product(token_ids):
    plain, fused = _adapted_pair()
    fuse_gated_mlps(fused)
    assert _products_alive_after_forward(plain, token_ids) == [True, True]  # kept by down_proj for backward
    assert _products_alive_after_forward(fused, token_ids) == [False, False]  # recomputed in backward instead
    _, grads = _step(plain, token_ids)
    _, fused_grads = _step(fused, token_ids)
    assert all(torch.equal(fused_grads[n], g) for n, g in grads.items())


def test_under_activation_checkpointing_the_checkpoint_decides_what_is_kept(token_ids):
    plain, fused = _adapted_pair()
    fuse_gated_mlps(fused)
    for model in (plain, fused):
        enable_activation_checkpointing(model)
    _, grads = _step(plain, token_ids)
    _, fused_grads = _step(fused, token_ids)
    assert all(torch.equal(fused_grads[n], g) for n, g in grads.items())
    assert _products_alive_after_forward(fused, token_ids) == [False, False]


def test_silu_mul_gradients_match_finite_differences():
    gate, up = (torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(silu_mul, (gate, up))
    assert torch.equal(silu_mul(gate, up), torch.nn.functional.silu(gate) * up)


def test_only_llama_style_silu_mlps_are_fused():
    assert fuse_gated_mlps(tiny_gpt2()) == []
    gelu = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, hidden_act="gelu"))
    assert fuse_gated_mlps(gelu) == []

    class OtherMlp(type(gelu.model.layers[0].mlp)):  # type: ignore[misc]
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    model = tiny_llama()
    model.model.layers[0].mlp.__class__ = OtherMlp
    assert not is_gated_silu_mlp(model.model.layers[0].mlp)
    assert fuse_gated_mlps(model) == ["model.layers.1.mlp"]
    assert fuse_gated_mlps(model) == []  # fused once only


@pytest.mark.parametrize("architecture", ["Qwen2", "Mistral"])
def test_copies_of_llamas_mlp_in_other_architectures_are_fused(architecture):
    transformers = pytest.importorskip("transformers")
    config = getattr(transformers, f"{architecture}Config")(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                             num_hidden_layers=1, num_attention_heads=2,
                                                             num_key_value_heads=1)
    model = getattr(transformers, f"{architecture}ForCausalLM")(config)
    assert fuse_gated_mlps(model) == ["model.layers.0.mlp"]


def test_a_fused_mlp_runs_without_grad_and_returns_to_its_own_forward(token_ids):
    model = tiny_llama()
    with torch.no_grad():
        expected = model(input_ids=token_ids).logits
        fuse_gated_mlps(model)
        assert torch.equal(model(input_ids=token_ids).logits, expected)
    mlp = model.model.layers[0].mlp
    del mlp.forward
    assert is_gated_silu_mlp(mlp) and fuse_gated_mlps(model) == ["model.layers.0.mlp"]
