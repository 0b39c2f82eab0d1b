"""Each LoRA layer against a float64 formula, forward and gradients: y = base(x) + s · B(A(x))."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TOLERANCES, assert_close, relative_error
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear

SCALING = 0.75


def _randomize(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _cases():
    torch.manual_seed(0)
    linear = nn.Linear(6, 5)
    conv1d_gpt2 = Conv1D(5, 6)  # (nf=out, nx=in): weight (6, 5)
    nn.init.normal_(conv1d_gpt2.bias)
    embedding = nn.Embedding(11, 4, padding_idx=0)
    conv1d = nn.Conv1d(3, 4, kernel_size=3, padding=1)
    conv2d = nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1)
    return {
        "linear": (LoraLinear(linear, 2, 1.5, SCALING), torch.randn(3, 4, 6)),
        "gpt2_conv1d": (LoraLinear(conv1d_gpt2, 2, 1.5, SCALING, fan_in_fan_out=True), torch.randn(3, 4, 6)),
        # Ids other than padding_idx 0: at a padding position B still receives gradient through A's row (as in
        # PEFT), which the formula's single table with a frozen padding row does not model.
        "embedding": (LoraEmbedding(embedding, 2, 1.5, SCALING), torch.randint(1, 11, (3, 4))),
        "conv1d": (LoraConv(conv1d, 2, 1.5, SCALING), torch.randn(2, 3, 8)),
        "conv2d": (LoraConv(conv2d, 2, 1.5, SCALING), torch.randn(2, 3, 7, 7)),
    }


def _reference(kind: str, module: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The float64 formula: the base op applied with W + s·ΔW, ΔW = B @ A in the weight's layout."""
    w = module.weight.detach().double()
    bias = None if getattr(module, "bias", None) is None else module.bias.detach().double()
    delta = SCALING * (b @ a)  # (fan_out, fan_in)
    if kind == "linear":
        return F.linear(x.double(), w + delta, bias)
    if kind == "gpt2_conv1d":
        return x.double() @ (w + delta.T) + bias
    if kind == "embedding":
        return F.embedding(x, w + delta.T, padding_idx=0)
    conv = F.conv1d if kind == "conv1d" else F.conv2d
    return conv(x.double(), w + delta.view(w.shape), bias, module.stride, module.padding)


@pytest.mark.parametrize("kind", ["linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d"])
def test_forward_and_gradients_match_float64_formula(kind):
    module, x = _cases()[kind]
    _randomize(module)
    a_param, b_param = module.lora_parameters()
    out = module(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * upstream).sum().backward()

    a_ref = module.factors()[0].detach().double().requires_grad_(True)
    b_ref = module.factors()[1].detach().double().requires_grad_(True)
    ref = _reference(kind, module, x, a_ref, b_ref)
    (ref * upstream.double()).sum().backward()

    assert_close(out.double(), ref.detach(), "fp32 vs float64 formula")
    assert_close(a_param.grad.reshape(a_ref.shape).double(), a_ref.grad, "fp32 vs float64 formula")
    assert_close(b_param.grad.reshape(b_ref.shape).double(), b_ref.grad, "fp32 vs float64 formula")


@pytest.mark.parametrize("kind", ["linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d"])
def test_module_adopts_base_parameters_without_copies(kind):
    module, _ = _cases()[kind]
    base_weight = module.weight
    assert isinstance(base_weight, nn.Parameter)
    assert set(module.state_dict()) >= {"weight"}
    assert not any(k.startswith("base_layer") for k in module.state_dict())


def test_linear_adopts_the_very_same_parameter_objects():
    base = nn.Linear(4, 3)
    module = LoraLinear(base, 2, 2.0, 1.0)
    assert module.weight is base.weight and module.bias is base.bias


@pytest.mark.parametrize("kind", ["linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d"])
def test_zero_factors_and_zero_strength_give_exactly_the_base_output(kind):
    module, x = _cases()[kind]
    with torch.no_grad():
        fresh = module(x)  # factors start at zero
        _randomize(module)
        adapted = module(x)
        module.strength = 0.0
        disabled = module(x)
    base = _reference(kind, module, x, *_zero_factors(module))
    assert_close(fresh.double(), base, torch.float32)
    assert torch.equal(fresh, disabled)
    assert relative_error(adapted, disabled) > TOLERANCES["adapter changes output"][0]


def _zero_factors(module):
    a, b = module.factors()
    return torch.zeros_like(a, dtype=torch.float64), torch.zeros_like(b, dtype=torch.float64)


def test_gpt2_conv1d_base_path_is_bit_identical_to_transformers():
    torch.manual_seed(0)
    base = Conv1D(5, 6)
    x = torch.randn(3, 4, 6)
    expected = base(x)
    module = LoraLinear(base, 2, 1.0, 1.0, fan_in_fan_out=True)
    assert torch.equal(module(x), expected)


def test_dropout_applies_to_the_adapter_path_only():
    torch.manual_seed(0)
    module = LoraLinear(nn.Linear(8, 8), 4, 4.0, 1.0, dropout=0.5)
    _randomize(module)
    x = torch.randn(16, 8)
    module.train()
    with torch.no_grad():
        first, second = module(x), module(x)
        module.eval()
        third, fourth = module(x), module(x)
    assert not torch.equal(first, second)
    assert torch.equal(third, fourth)


def test_linear_factors_are_bias_free_linears_that_start_at_zero():
    module = LoraLinear(nn.Linear(6, 5).to(torch.float64), 2, 1.5, SCALING)
    for layer, (fan_in, fan_out) in ((module.lora_A, (6, 2)), (module.lora_B, (2, 5))):
        assert type(layer) is nn.Linear and layer.bias is None
        assert (layer.in_features, layer.out_features) == (fan_in, fan_out)
        assert layer.weight.shape == (fan_out, fan_in) and layer.weight.dtype == torch.float64
        assert layer.weight.requires_grad and torch.count_nonzero(layer.weight) == 0
        assert layer(torch.ones(3, fan_in, dtype=torch.float64)).shape == (3, fan_out)
    assert set(module.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
