"""Injection: what becomes trainable, what changes after a step, and that errors change nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, LorakitError, adapter_parameters, inject
from lorakit.errors import ConfigError
from lorakit.layers import LoraEmbedding, LoraLinear, lora_modules


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_report_counts_modules_and_trainable_share():
    model = tiny_llama()
    report = inject(model, LoraConfig(rank=4, targets=["q_proj", "v_proj"]))
    assert len(report.adapted) == 4
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 KV heads of 8); A (r, in) + B (out, r) per module.
    expected = 2 * (4 * 32 + 32 * 4) + 2 * (4 * 32 + 16 * 4)
    assert report.trainable_params == expected
    assert report.trainable_fraction == pytest.approx(expected / sum(p.numel() for p in model.parameters()))
    assert "adapted 4 modules" in str(report)


def test_only_adapter_parameters_require_grad():
    model = tiny_llama()
    inject(model, LoraConfig(rank=4, targets=["llama"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))
    assert all("lora_" in n for n in trainable)


def test_after_an_optimizer_step_only_adapter_and_saved_modules_changed(token_ids):
    model = tiny_bert()
    inject(model, LoraConfig(rank=4, targets=["bert"], modules_to_save=["classifier"]))
    before = _snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # two steps: B moves on the first, A on the second (B starts at zero)
        loss = model(input_ids=token_ids, labels=torch.tensor([0, 2])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    allowed = set(adapter_parameters(model))
    assert changed and changed <= allowed
    assert {"classifier.weight", "classifier.bias"} <= changed
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)


def test_bias_modes_choose_biases_structurally():
    model = tiny_bert()
    inject(model, LoraConfig(rank=2, targets=["query"], bias="lora_only"))
    biases = {n for n in adapter_parameters(model) if n.endswith("bias")}
    assert biases == {"bert.encoder.layer.0.attention.self.query.bias",
                      "bert.encoder.layer.1.attention.self.query.bias"}
    model = tiny_bert()
    inject(model, LoraConfig(rank=2, targets=["query"], bias="all"))
    biases = {n for n in adapter_parameters(model) if n.endswith("bias")}
    assert biases == {n for n, _ in model.named_parameters() if n.endswith(".bias")}


def test_rank_and_alpha_overrides_by_pattern():
    model = tiny_llama()
    inject(model, LoraConfig(rank=4, alpha=8, targets=["llama"], rank_pattern={"*.mlp.*": 2},
                             alpha_pattern={"o_proj": 1.0}))
    modules = dict(lora_modules(model))
    assert modules["model.layers.0.mlp.up_proj"].rank == 2
    assert modules["model.layers.0.self_attn.q_proj"].rank == 4
    assert modules["model.layers.1.self_attn.o_proj"].scaling == pytest.approx(1.0 / 4)


def test_rslora_scaling_is_alpha_over_sqrt_rank():
    model = tiny_llama()
    inject(model, LoraConfig(rank=16, alpha=8, targets=["q_proj"], rslora=True))
    assert all(m.scaling == pytest.approx(2.0) for _, m in lora_modules(model))


def test_gpt2_conv1d_and_embedding_targets_get_the_right_module_kinds():
    model = tiny_gpt2()
    inject(model, LoraConfig(rank=2, targets=["c_attn", "wpe"]))
    kinds = {type(m) for _, m in lora_modules(model)}
    assert kinds == {LoraLinear, LoraEmbedding}
    assert all(m.fan_in_fan_out for _, m in lora_modules(model) if isinstance(m, LoraLinear))


@pytest.mark.parametrize("init", ["standard", "gaussian", "principal"])
def test_initial_adapter_leaves_output_unchanged(init, token_ids):
    model = tiny_llama()
    with torch.no_grad():
        before = model(token_ids).logits
    inject(model, LoraConfig(rank=4, targets=["llama"], init=init))
    with torch.no_grad():
        after = model(token_ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_rank_larger_than_the_matrix_is_refused_and_model_untouched():
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=r"rank 40 for 'model.layers.0.self_attn.q_proj' exceeds min"):
        inject(model, LoraConfig(rank=40, targets=["q_proj"]))
    assert not lora_modules(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_target_leaves_model_untouched():
    model = tiny_llama()
    with pytest.raises(ConfigError, match="q_prj"):
        inject(model, LoraConfig(targets=["q_proj", "q_prj"]))
    assert not lora_modules(model) and not hasattr(model, "lorakit_state")


def test_injecting_twice_is_refused():
    model = tiny_llama()
    inject(model, LoraConfig(rank=2, targets=["q_proj"]))
    with pytest.raises(LorakitError, match="already has lorakit adapters"):
        inject(model, LoraConfig(rank=2, targets=["v_proj"]))


def test_seeded_injection_is_reproducible():
    first, second = tiny_llama(), tiny_llama()
    inject(first, LoraConfig(rank=4, seed=7))
    inject(second, LoraConfig(rank=4, seed=7))
    for (_, a), (_, b) in zip(lora_modules(first), lora_modules(second), strict=True):
        assert torch.equal(a.factors()[0], b.factors()[0])
