"""lorakit.gemm: fp32 CPU products through oneDNN, against float64 references and torch's own kernel."""

import pytest
import torch
import torch.nn.functional as F

from lorakit import gemm
from lorakit.errors import LorakitError
from lorakit.fused import lora_linear

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def restore_choice():
    previous = gemm.active_cpu_matmul()
    yield
    gemm.set_cpu_matmul(previous)


def assert_close_to_float64(result, reference, size):
    """Within fp32 rounding of a float64 product: the error of a sum of `size` products, relative to its scale."""
    assert result.dtype == torch.float32 and result.shape == reference.shape
    if reference.numel() == 0:
        return
    scale = reference.abs().max().item() + 1.0
    assert (result.double() - reference).abs().max().item() <= 4 * size * torch.finfo(torch.float32).eps * scale


@needs_onednn
@pytest.mark.parametrize("shape", [(37, 24), (3, 5, 24), (0, 24)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_runs_onednn_and_equals_a_float64_product(shape, with_bias):
    torch.manual_seed(0)
    x, w = torch.randn(*shape), torch.randn(40, 24)
    b = torch.randn(40) if with_bias else None
    gemm.set_cpu_matmul("onednn")
    out = gemm.linear(x, w, b)
    assert out.shape == (*shape[:-1], 40)
    reference = x.double() @ w.double().T + (b.double() if b is not None else 0)
    assert_close_to_float64(out, reference, 24)
    flat = x.reshape(-1, 24)
    onednn = torch.ops.mkldnn._linear_pointwise(flat, w, b, "none", [], "").view(out.shape)
    assert torch.equal(out, onednn)  # the product came from oneDNN, not from torch's own kernel


@needs_onednn
def test_matmul_takes_operands_in_any_strides():
    torch.manual_seed(1)
    a, b = torch.randn(24, 50).T, torch.randn(30, 24).T  # (50, 24) and (24, 30), both transposed views
    gemm.set_cpu_matmul("onednn")
    assert_close_to_float64(gemm.matmul(a, b), a.double() @ b.double(), 24)


def test_blas_is_torchs_own_kernel_bit_for_bit():
    torch.manual_seed(2)
    x, w, b = torch.randn(16, 24), torch.randn(40, 24), torch.randn(40)
    assert gemm.set_cpu_matmul("blas") == "blas"
    assert torch.equal(gemm.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(gemm.matmul(x, w.T), x @ w.T)


@needs_onednn
def test_what_onednn_does_not_serve_takes_torchs_kernel():
    torch.manual_seed(3)
    gemm.set_cpu_matmul("onednn")
    w = torch.randn(40, 24)
    x64 = torch.randn(8, 24, dtype=torch.float64)
    assert torch.equal(gemm.linear(x64, w.double()), F.linear(x64, w.double()))
    x = torch.randn(8, 24, requires_grad=True)  # needs a graph: no autograd formula in oneDNN's kernel
    out = gemm.linear(x, w)
    assert out.requires_grad and torch.equal(out, F.linear(x, w))
    with torch.no_grad():
        assert not gemm.linear(x, w).requires_grad
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bf16 product, as F.linear runs it
            assert gemm.linear(x, w).dtype == torch.bfloat16
            assert gemm.linear_function(x, w).dtype == torch.bfloat16


@needs_onednn
def test_linear_function_gradients_match_autograd():
    torch.manual_seed(4)
    gemm.set_cpu_matmul("onednn")
    x = torch.randn(2, 6, 24, dtype=torch.float64)
    w, b = torch.randn(40, 24, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    g = torch.randn(2, 6, 40, dtype=torch.float64)
    ours = [t.float().requires_grad_() for t in (x, w, b)]
    gemm.linear_function(*ours).backward(g.float())
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    F.linear(*theirs).backward(g)
    for mine, reference in zip(ours, theirs, strict=True):
        assert_close_to_float64(mine.grad, reference.grad, 12 * 40)


@needs_onednn
def test_fused_lora_layer_agrees_across_kernels():
    torch.manual_seed(5)
    x = torch.randn(3, 7, 24)
    w, a, b = torch.randn(40, 24), torch.randn(4, 24), torch.randn(40, 4)
    results = {}
    for choice in ("blas", "onednn"):
        gemm.set_cpu_matmul(choice)
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        out = lora_linear(leaves[0], w, None, leaves[1], leaves[2], 0.5)
        out.square().sum().backward()
        results[choice] = [out.detach(), *(t.grad for t in leaves)]
    for mine, reference in zip(results["onednn"], results["blas"], strict=True):
        assert torch.allclose(mine, reference, rtol=1e-5, atol=1e-4)


def test_a_choice_outside_the_list_is_refused():
    with pytest.raises(LorakitError, match="unknown CPU matmul 'mkl': use one of auto, onednn, blas"):
        gemm.set_cpu_matmul("mkl")


def test_onednn_without_onednn_is_refused_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    with pytest.raises(LorakitError, match="no oneDNN .* use cpu_matmul auto or blas"):
        gemm.set_cpu_matmul("onednn")
    assert gemm.set_cpu_matmul("auto") == "blas"


def test_the_context_restores_the_kernel_before_it():
    gemm.set_cpu_matmul("blas")
    with gemm.cpu_matmul("auto") as inside:
        assert gemm.active_cpu_matmul() == inside
    assert gemm.active_cpu_matmul() == "blas"
    with pytest.raises(RuntimeError), gemm.cpu_matmul("auto"):
        raise RuntimeError("inside")
    assert gemm.active_cpu_matmul() == "blas"
