"""Dense fp32 matrix products on the CPU through oneDNN, the library torch bundles for its CPU deep-learning kernels.

torch's `mm` and `F.linear` hand fp32 CPU products to its BLAS, Intel's oneMKL in the x86 wheels. On the AMD EPYC
(AVX-512) where lorakit's benchmarks run, a 512 x 576 by 576 x 1536 product runs at about 200 GFLOP/s on 2 threads
through torch's `mm` and 440-480 GFLOP/s through oneDNN (the same operands, fp32 arithmetic, errors against a
float64 product of the same order, oneDNN's up to twice oneMKL's; docs/benchmarks.md, section 12). The products
that dominate a LoRA training step, the frozen base's forward and input-gradient products and the language-model
head's, go through `linear` and `matmul` here.

    gemm.linear(x, w, b)      # x wᵀ + b,  x (N, in), w (out, in)
    gemm.matmul(a, b)         # a b,       a (N, k),  b (k, M)
    gemm.set_cpu_matmul("blas")          # or "onednn", "auto" (the default)
    with gemm.cpu_matmul("blas"): ...    # for a block

The choice is process-wide:

- `auto` (default): oneDNN where torch has it (`torch.backends.mkldnn.is_available()`), torch's own kernel
  otherwise;
- `onednn`: oneDNN, and an error where torch lacks it;
- `blas`: torch's own kernel (`mm`, `F.linear`) everywhere.

oneDNN serves float32 CPU tensors outside autograd (inside lorakit's fused autograd nodes, or under `no_grad`);
anything else (CUDA, other dtypes, a tensor that needs a graph, a product under autocast) takes torch's own kernel
whatever the choice.
`linear_function` is `linear` with its own backward, for bases outside the fused nodes. The results equal
torch's to fp32 rounding, not bit for bit: the two libraries add the products in different orders.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lorakit.errors import LorakitError

CHOICES = ("auto", "onednn", "blas")
_state = {"onednn": False}


def onednn_available() -> bool:
    """Does this torch build carry oneDNN's linear kernel for dense CPU tensors?"""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    return bool(mkldnn is not None and mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def set_cpu_matmul(choice: str) -> str:
    """Route fp32 CPU products through oneDNN (`onednn`), torch's own kernel (`blas`) or oneDNN where torch has it
    (`auto`); returns the kernel in use, `onednn` or `blas`."""
    if choice not in CHOICES:
        raise LorakitError(f"unknown CPU matmul {choice!r}: use one of {', '.join(CHOICES)}")
    available = onednn_available()
    if choice == "onednn" and not available:
        raise LorakitError("cpu_matmul onednn: this torch build has no oneDNN (torch.backends.mkldnn); "
                           "use cpu_matmul auto or blas")
    _state["onednn"] = choice != "blas" and available
    return active_cpu_matmul()


def active_cpu_matmul() -> str:
    """`onednn` or `blas`: the kernel fp32 CPU products take now."""
    return "onednn" if _state["onednn"] else "blas"


@contextmanager
def cpu_matmul(choice: str) -> Iterator[str]:
    """`set_cpu_matmul(choice)` for the block, the previous kernel after it."""
    previous = _state["onednn"]
    try:
        yield set_cpu_matmul(choice)
    finally:
        _state["onednn"] = previous


def _onednn_kind(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """fp32 CPU operands of a 2-D weight, oneDNN chosen, and no autocast (which picks each product's dtype itself)."""
    if not _state["onednn"] or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if weight.device.type != "cpu" or weight.dim() != 2 or (bias is not None and bias.dtype != torch.float32):
        return False
    return not torch.is_autocast_enabled("cpu")


def _needs_graph(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _onednn_serves(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    return _onednn_kind(x, weight, bias) and not _needs_graph(x, weight, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x (..., in), weight (out, in) in any strides, bias (out,) or None."""
    if not _onednn_serves(x, weight, bias):
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    out: Tensor = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b` for a (N, k) and b (k, M), either in any strides."""
    if not _onednn_serves(a, b, None) or a.dim() != 2:
        return a @ b
    return linear(a, b.T)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None  # type: ignore[attr-defined]
        return linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_bias = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = matmul(g, weight).view(x.shape) if need_x else None
        grad_w = g.T @ x.reshape(-1, x.shape[-1]) if need_w else None
        grad_bias = g.sum(0) if need_bias and ctx.has_bias else None
        return grad_x, grad_w, grad_bias


def linear_function(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`linear` that autograd can differentiate: oneDNN in forward and for the input gradient where it serves,
    torch's kernel for the weight's gradient (a reduction over the tokens)."""
    if not _onednn_kind(x, weight, bias):
        return F.linear(x, weight, bias)
    if _needs_graph(x, weight, bias):
        out: Tensor = _Linear.apply(x, weight, bias)
        return out
    return linear(x, weight, bias)


set_cpu_matmul("auto")
