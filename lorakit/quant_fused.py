"""The LoRA linear layer over a quantized base as one autograd node: `lorakit.fused`'s products with W
dequantized into a scratch buffer in forward and again in backward, so the step keeps no dense copy of W.

    forward    W = deq(Q)  (transient);  h = x Aᵀ;  y = x Wᵀ + b + s · h Bᵀ      saved: x, h (not W)
    backward   W = deq(Q)  (transient);  dx = g W + s · (g B) A;  dA, dB as in `lorakit.fused`

Against the autograd composition (`quant.linear` plus the low-rank branch) this saves the (N, out) temporaries of
the scaled branch and its separate add, and the backward's separate (N, in) accumulation: the fp32 fused path's
savings, on top of which the quantized base costs two dequantizations per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lorakit import quant
from lorakit.fused import backward_products, forward_products


class _QuantLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                scaling: float) -> Tensor:
        flat, h, out = forward_products(x, quant.dequantize_transient(weight, x.dtype), bias, a, b, scaling)
        ctx.save_for_backward(flat, h, a, b)
        ctx.weight, ctx.scaling, ctx.input_shape = weight, scaling, x.shape  # type: ignore[attr-defined]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        flat, h, a, b = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        weight = quant.dequantize_transient(ctx.weight, g.dtype) if need_x else ctx.weight
        grad_x, _, grad_a, grad_b = backward_products(g, flat, h, weight, a, b, ctx.scaling, ctx.input_shape,
                                                      need_x, False, need_a, need_b)
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


def quant_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor, scaling: float
                      ) -> Tensor:
    """`x deq(Q)ᵀ + b + scaling · (x Aᵀ) Bᵀ` for x (..., in), a frozen quantized weight Q standing for (out, in),
    A (r, in), B (out, r), x and the factors of one dtype; returns (..., out)."""
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        out: Tensor = _QuantLoraLinear.apply(x, weight, bias, a, b, scaling)
        return out
    dense = quant.dequantize_transient(weight, x.dtype)
    return forward_products(x, dense, bias, a, b, scaling)[2].view(*x.shape[:-1], dense.shape[0])
