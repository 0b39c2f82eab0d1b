"""Injection: what becomes trainable, what changes after a step, and that errors change nothing."""

from __future__ import annotations

import pytest
import torch
from conftest import approx, assert_close, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

from lorakit import LoraConfig, LorakitError, adapter_parameters, inject
from lorakit import init as lora_init
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
    assert report.trainable_fraction == approx(expected / sum(p.numel() for p in model.parameters()))
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
    assert modules["model.layers.1.self_attn.o_proj"].scaling == approx(1.0 / 4)


def test_rslora_scaling_is_alpha_over_sqrt_rank():
    model = tiny_llama()
    inject(model, LoraConfig(rank=16, alpha=8, targets=["q_proj"], rslora=True))
    assert all(m.scaling == approx(2.0) for _, m in lora_modules(model))


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
    assert len(lora_modules(model)) == 2 * 7  # adapters in place: an unchanged output is the init's doing
    with torch.no_grad():
        after = model(token_ids).logits
    assert_close(after, before, torch.float32)


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


def test_seeded_standard_init_draws_a_in_target_order_from_the_config_seed():
    model = tiny_llama()
    report = inject(model, LoraConfig(rank=4, targets=["llama"], seed=3))
    generator = torch.Generator().manual_seed(3)
    modules = dict(lora_modules(model))
    for name in report.adapted:
        a, b = modules[name].factors()
        a_ref, _ = lora_init.standard(4, a.shape[1], b.shape[0], generator=generator)
        assert torch.equal(a, a_ref), name
        assert torch.count_nonzero(b) == 0, name


@pytest.mark.parametrize("svd_iters", [None, 4], ids=["exact", "randomized"])
def test_principal_init_turns_the_base_weight_into_the_residual_in_place(svd_iters):
    model, original = tiny_llama(), dict(tiny_llama().named_modules())
    weights = {name: m.weight for name, m in model.named_modules() if name.endswith(("q_proj", "down_proj"))}
    inject(model, LoraConfig(rank=4, targets=["q_proj", "down_proj"], init="principal", svd_iters=svd_iters, seed=0))
    for name, module in lora_modules(model):
        assert module.weight is weights[name]  # the base's own Parameter, updated in place
        a, b = module.factors()
        w = original[name].weight.detach()
        assert_close(module.weight.detach(), w - module.scaling * (b @ a), torch.float32)
        if svd_iters is None:
            a_ref, b_ref, _ = lora_init.principal(w, 4, module.scaling)
            assert torch.equal(a, a_ref) and torch.equal(b, b_ref)


def test_randomized_principal_init_is_reproducible_from_its_seed():
    # Loading an adapter saved without its initial factors recomputes them; that needs the same draws.
    first, second = tiny_llama(), tiny_llama()
    for model in (first, second):
        inject(model, LoraConfig(rank=4, targets=["llama"], init="principal", svd_iters=2, seed=5))
    for (name, a), (_, b) in zip(lora_modules(first), lora_modules(second), strict=True):
        assert torch.equal(a.weight, b.weight), name
        assert all(torch.equal(x, y) for x, y in zip(a.factors(), b.factors(), strict=True)), name


def test_principal_init_of_a_bf16_model_rounds_the_fp32_residual_once():
    model, original = tiny_llama().to(torch.bfloat16), tiny_llama().to(torch.bfloat16)
    inject(model, LoraConfig(rank=4, targets=["v_proj"], init="principal"))
    reference = dict(original.named_modules())
    for name, module in lora_modules(model):
        a, b, residual = lora_init.principal(reference[name].weight, 4, module.scaling)
        assert module.weight.dtype == torch.bfloat16
        assert torch.equal(module.weight, residual.to(torch.bfloat16)), name


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_principal_init_of_a_conv_writes_the_residual_into_its_weight(memory_format):
    # A channels-last weight flattens to a copy, not a view: the residual must still reach the weight itself.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, kernel_size=3), nn.ReLU(), nn.Conv2d(8, 4, kernel_size=1))
    model = model.to(memory_format=memory_format)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        before = model(x)
    inject(model, LoraConfig(rank=2, targets=["0", "2"], init="principal"))
    for name, module in lora_modules(model):
        a, b, residual = lora_init.principal(original[f"{name}.weight"].flatten(1), 2, module.scaling)
        assert_close(module.weight.detach().flatten(1), residual, torch.float32)
    with torch.no_grad():
        assert_close(model(x), before, torch.float32)
