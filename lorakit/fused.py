"""The LoRA linear layer as one autograd node, with a hand-written backward.

Through autograd, `base(x) + scaling * B(A(x))` is five nodes whose backward materialises an (N, out) scaled
gradient for the low-rank branch and adds the branch's (N, in) input gradient to the base's in a separate pass.
Here the forward is two matmuls into one output buffer and the backward four small matmuls plus the base's input
gradient, accumulated in place:

    forward    h = x Aᵀ                      (N, r)       saved: x, h
               y = x Wᵀ + b;  y += s · h Bᵀ  (N, out)
    backward   g_h = s · g B                 (N, r)
               dB  = s · gᵀ h                (out, r)
               dA  = g_hᵀ x                  (r, in)
               dx  = g W;  dx += g_h A       (N, in)

W and b get gradients only when they require them (full fine-tuning through an adapted model). Used for
`nn.Linear` bases whose factors share the base's dtype, without dropout (a dropout mask would be a second saved
(N, in) tensor; that case keeps the autograd path), outside autocast (which picks each op's dtype itself).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lorakit import gemm


def forward_products(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(x as (N, in), h = x Aᵀ (N, r), the output (N, out))."""
    flat = x.reshape(-1, x.shape[-1])  # (N, in)
    h = gemm.linear(flat, a)  # (N, r)
    out = gemm.linear(flat, weight, bias)  # (N, out)
    out.addmm_(h, b.T, alpha=scaling)
    return flat, h, out


def backward_products(g: Tensor, flat: Tensor, h: Tensor, weight: Tensor, a: Tensor, b: Tensor, scaling: float,
                      input_shape: torch.Size, need_x: bool, need_w: bool, need_a: bool, need_b: bool
                      ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dx, dW, dA, dB) of `forward_products`' output for its gradient g (N, out); None where not needed."""
    g_h = gemm.matmul(g, b).mul_(scaling) if (need_x or need_a) else None  # (N, r)
    grad_b = (g.T @ h).mul_(scaling) if need_b else None  # (out, r)
    grad_a = gemm.matmul(g_h.T, flat) if need_a and g_h is not None else None  # (r, in)
    grad_x = None
    if need_x and g_h is not None:
        grad_x = gemm.matmul(g, weight).addmm_(g_h, a).view(input_shape)  # (..., in)
    grad_w = g.T @ flat if need_w else None
    return grad_x, grad_w, grad_a, grad_b


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                scaling: float) -> Tensor:
        flat, h, out = forward_products(x, weight, bias, a, b, scaling)
        ctx.save_for_backward(flat, h, weight, a, b)
        ctx.scaling = scaling  # type: ignore[attr-defined]
        ctx.input_shape = x.shape  # type: ignore[attr-defined]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        flat, h, weight, a, b = ctx.saved_tensors
        scaling: float = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x, grad_w, grad_a, grad_b = backward_products(g, flat, h, weight, a, b, scaling, ctx.input_shape,
                                                           need_x, need_w, need_a, need_b)
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """`x Wᵀ + b + scaling · (x Aᵀ) Bᵀ` for x (..., in), W (out, in), b (out,) or None, A (r, in), B (out, r),
    all of one dtype; returns (..., out). Equal to the autograd composition to rounding, with fewer temporaries
    and fewer passes over (N, out) and (N, in) tensors in backward."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or a.requires_grad or b.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        out: Tensor = _LoraLinear.apply(x, weight, bias, a, b, scaling)
        return out
    # Inference: the same arithmetic without an autograd node (a decoding step is dominated by per-call costs).
    return forward_products(x, weight, bias, a, b, scaling)[2].view(*x.shape[:-1], weight.shape[0])
