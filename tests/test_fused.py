import pytest
import torch
from conftest import assert_close

from lorakit.fused import lora_linear


def _composition(x, weight, bias, a, b, scaling):
    return torch.nn.functional.linear(x, weight, bias) + scaling * (x @ a.T) @ b.T


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("base_trains", [True, False])
def test_lora_linear_matches_autograd_composition_forward_and_gradients(with_bias, base_trains):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(6, 7, dtype=torch.float64, generator=gen, requires_grad=base_trains)
    bias = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=base_trains) if with_bias else None
    a = torch.randn(3, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    upstream = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen)
    inputs = [t for t in (x, weight, bias, a, b) if t is not None and t.requires_grad]

    ours = lora_linear(x, weight, bias, a, b, 0.5)
    expected = _composition(x, weight, bias, a, b, 0.5)
    assert_close(ours, expected, "float64 reordered")
    got = torch.autograd.grad(ours, inputs, upstream)
    want = torch.autograd.grad(expected, inputs, upstream)
    assert len(got) == len(inputs)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, "float64 reordered")


def test_lora_linear_computes_no_gradient_for_frozen_base():
    x = torch.randn(4, 7, requires_grad=True)
    weight, a = torch.randn(6, 7), torch.randn(3, 7, requires_grad=True)
    b = torch.zeros(6, 3, requires_grad=True)
    lora_linear(x, weight, None, a, b, 2.0).sum().backward()
    assert weight.grad is None
    assert a.grad is not None and torch.count_nonzero(a.grad) == 0  # B = 0: no signal reaches A yet
    assert b.grad is not None and torch.count_nonzero(b.grad) > 0


def test_lora_linear_without_grad_equals_autograd_path():
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(3, 4, 7, generator=gen), torch.randn(6, 7, generator=gen)
    bias = torch.randn(6, generator=gen)
    a = torch.randn(2, 7, generator=gen, requires_grad=True)
    b = torch.randn(6, 2, generator=gen, requires_grad=True)
    with torch.no_grad():
        plain = lora_linear(x, weight, bias, a, b, 1.5)
    tracked = lora_linear(x, weight, bias, a, b, 1.5)
    assert plain.grad_fn is None and tracked.grad_fn is not None
    assert torch.equal(plain, tracked.detach())
