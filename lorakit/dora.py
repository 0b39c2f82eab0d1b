"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024): the adapted weight is

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖

with the norm taken over each output feature's row of the (out, in) matrix (the paper's column norm of its (in, out)
layout), and the magnitude vector m (one entry per output feature, PEFT's `lora_magnitude_vector`) trained beside A
and B. As in the paper (§4.3) and PEFT, the norm is a constant for the gradient: it follows ΔW in the forward but
no gradient flows through it.

The norm is never formed from the dense sum W + s·B A. Per row i,

    ‖W_i + s·B_i A‖² = ‖W_i‖² + 2s·⟨(W Aᵀ)_i, B_i⟩ + s²·B_i (A Aᵀ) B_iᵀ

costs one (out, in) x (in, r) product and no (out, in) temporary, where PEFT builds B A from an identity matrix and
adds it to W at every step; ‖W_i‖² itself is kept while W is unchanged (W is frozen in training).

The linear layer is one autograd node (`_DoraLinear`), the LoRA layer's two products (`lorakit.fused`) followed by
a per-feature rescale in place:

    forward    z = x Wᵀ + s·(x Aᵀ) Bᵀ;  y = z ⊙ c + b,  c = m / ‖W + s·B A‖     saved: x, x Aᵀ, y
    backward   dm = Σ_n g ⊙ (y − b) / m                 (= Σ_n g ⊙ z / ‖·‖)
               g' = g ⊙ c,  then the LoRA backward with g'

so it allocates one (N, out) buffer more than a LoRA layer (in the backward, shared by the product for dm and by
g'); through autograd the rescale alone would allocate three and save z beside y. Fresh (N, out) buffers cost
more than the arithmetic on a CPU (each one's pages are faulted in anew). Recovering z from y needs m ≠ 0; a
magnitude with a zero entry takes the autograd composition instead.

Dropout (`LoraConfig.dropout`) applies to the low-rank branch's input only, as for LoRA. PEFT also feeds the
dropped input to the magnitude-rescaled base term; the two agree whenever dropout is off (evaluation, or dropout 0).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lorakit import gemm
from lorakit.errors import LorakitError
from lorakit.fused import backward_products, forward_products, lora_linear

MAGNITUDE = "lora_magnitude_vector"  # the parameter's name in modules, state dicts and PEFT's files


def is_dora(module: Any) -> bool:
    return getattr(module, MAGNITUDE, None) is not None


def row_norms(weight_matrix: Tensor, a: Tensor, b: Tensor, scaling: float, *,
              weight_squared: Tensor | None = None) -> Tensor:
    """‖W + scaling·B A‖ of each row of the (out, in) matrix, in fp32 and without a gradient, from W (out, in),
    A (rank, in) and B (out, rank), without forming their dense sum (see the module docstring). `weight_squared`:
    ‖W_i‖² (out,) in fp32 when the caller has it."""
    with torch.no_grad():
        if weight_squared is None:
            weight_squared = torch.linalg.vector_norm(weight_matrix, dim=1, dtype=torch.float32).square()
        a32, b32 = a.float(), b.float()
        wa = gemm.linear(weight_matrix, a.to(weight_matrix.dtype)).float()  # (out, r)
        # (2s·W Aᵀ + s²·B (A Aᵀ)) ⊙ B summed per row: both cross terms in one product and one reduction
        cross = torch.addmm(wa, b32, a32 @ a32.T, beta=2 * scaling, alpha=scaling * scaling)
        squared = torch.linalg.vecdot(cross, b32).add_(weight_squared)
        return squared.clamp_min_(0).sqrt_()


def magnitude_shape(weight_dims: int, out_features: int) -> tuple[int, ...]:
    """PEFT's shape of m: (out,) for a linear layer's 2-D weight, (1, out, 1, ...) for a convolution's
    (out, in, *kernel)."""
    if weight_dims <= 2:
        return (out_features,)
    return (1, out_features) + (1,) * (weight_dims - 2)


def module_row_norms(module: Any, scaling: float | None = None) -> Tensor:
    """`row_norms` of a LoRA module's W + s·B A, (out,) in fp32; `scaling` defaults to the module's own times its
    strength. ‖W_i‖² is kept on the module for as long as W's storage and version counter stay the same."""
    a, b = module.factors()
    s = module.scaling * module.strength if scaling is None else scaling
    weight = module.weight_matrix()
    key = (module.weight.data_ptr(), module.weight._version)
    cached = module.__dict__.get("_dora_weight_squared")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square())
        module.__dict__["_dora_weight_squared"] = cached
    return row_norms(weight, a, b, s, weight_squared=cached[1])


def initial_magnitude(module: Any) -> Tensor:
    """m = ‖W + s·B A‖ for the module's current factors and base weight, so that W' = W + s·B A at the start (W
    itself when B is zero, and the original W of a principal init, whose base is the residual)."""
    norms = module_row_norms(module, module.scaling)
    magnitude: Tensor = getattr(module, MAGNITUDE)
    return norms.to(magnitude.dtype).view(magnitude.shape)


def cached_row_norms(module: Any, scaling: float) -> Tensor:
    """`module_row_norms`, kept on the module outside training (see `row_scale`)."""
    if module.training and torch.is_grad_enabled():
        return module_row_norms(module, scaling)
    a, b = module.factors()
    key = (scaling, *((t.data_ptr(), t._version) for t in (module.weight, a, b)))
    cached = module.__dict__.get("_dora_norms")
    if cached is None or cached[0] != key:
        cached = (key, module_row_norms(module, scaling))
        module.__dict__["_dora_norms"] = cached
    norms: Tensor = cached[1]
    return norms


def row_scale(module: Any, scaling: float) -> Tensor:
    """m / ‖W + s·B A‖ as an (out,) vector in m's dtype, with a gradient to m only.

    Outside training (eval mode, or no gradient) the norms are kept on the module for as long as W, A, B (their
    storage and in-place version counters) and the scaling stay the same: a decoding step would otherwise pay the
    (out, in) x (in, r) product of every adapted layer for each token."""
    magnitude: Tensor = getattr(module, MAGNITUDE)
    return magnitude.view(-1) / cached_row_norms(module, scaling).to(magnitude.dtype)


class _DoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, weight: Tensor, bias: Tensor | None, a: Tensor, b: Tensor,
                magnitude: Tensor, norms: Tensor, scaling: float) -> Tensor:
        flat, h, out = forward_products(x, weight, None, a, b, scaling)  # out = z (N, out)
        scale = magnitude / norms
        out.mul_(scale)
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(flat, h, weight, a, b, magnitude, scale, bias, out)  # type: ignore[arg-type]
        ctx.scaling = scaling  # type: ignore[attr-defined]
        ctx.input_shape = x.shape  # type: ignore[attr-defined]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        flat, h, weight, a, b, magnitude, scale, bias, y = ctx.saved_tensors
        scaling: float = ctx.scaling
        need_x, need_w, need_bias, need_a, need_b, need_m, _, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        buffer = torch.mul(g, y)  # the one new (N, out) buffer: g ⊙ y, then g' = g ⊙ c
        grad_bias = g.sum(0) if (need_bias or (need_m and bias is not None)) else None
        grad_m = None
        if need_m:
            grad_m = buffer.sum(0)
            if bias is not None and grad_bias is not None:
                grad_m.sub_(grad_bias * bias)
            grad_m.div_(magnitude)
        g2 = torch.mul(g, scale, out=buffer)
        grad_x, grad_w, grad_a, grad_b = backward_products(g2, flat, h, weight, a, b, scaling, ctx.input_shape,
                                                           need_x, need_w, need_a, need_b)
        return grad_x, grad_w, grad_bias if need_bias else None, grad_a, grad_b, grad_m, None, None


def linear_forward(module: Any, x: Tensor, scaling: float) -> Tensor:
    """A `LoraLinear` carrying m: (m / ‖W + s·B A‖) ⊙ (x Wᵀ + s·B A dropout(x)) + b."""
    weight, a, b = module.weight_matrix(), module.lora_A.weight, module.lora_B.weight
    magnitude: Tensor = getattr(module, MAGNITUDE)
    fast = ((module._no_dropout or not module.training) and x.dtype == weight.dtype == a.dtype == b.dtype
            == magnitude.dtype and not torch.is_autocast_enabled(x.device.type))
    bias = module.bias
    if fast and (bias is None or bias.dtype == x.dtype):
        norms = cached_row_norms(module, scaling).to(magnitude.dtype)
        magnitude_vector = magnitude.view(-1)
        if torch.is_grad_enabled() and (x.requires_grad or magnitude.requires_grad or a.requires_grad
                                        or b.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            if bool((magnitude_vector != 0).all()):
                out: Tensor = _DoraLinear.apply(x, weight, bias, a, b, magnitude_vector, norms, scaling)
                return out
        else:  # inference: the same arithmetic without an autograd node
            _, _, out = forward_products(x, weight, None, a, b, scaling)
            out.mul_(magnitude_vector / norms)
            if bias is not None:
                out.add_(bias)
            return out.view(*x.shape[:-1], out.shape[-1])
    scale = row_scale(module, scaling)
    if fast:
        z = lora_linear(x, weight, None, a, b, scaling)
    else:
        z = F.linear(x, weight)
        z = z + (F.linear(F.linear(module.dropout(x).to(a.dtype), a), b) * scaling).to(z.dtype)
    scale = scale.to(z.dtype)
    bias = module.bias
    return torch.addcmul(bias.to(z.dtype), z, scale) if bias is not None else z * scale


def conv_forward(module: Any, x: Tensor, scaling: float) -> Tensor:
    """A `LoraConv` carrying m: the same rescale per output channel."""
    z = module.conv(x, module.weight, None, module.stride, module.padding, module.dilation, module.groups)
    h = module.lora_A(module.dropout(x).to(module.lora_A.weight.dtype))
    z = z + (module.lora_B(h) * scaling).to(z.dtype)
    shape = (1, -1) + (1,) * (z.dim() - 2)
    out = z * row_scale(module, scaling).to(z.dtype).view(shape)
    if module.bias is not None:
        out = out + module.bias.view(shape)
    return out


def adapted_matrix(module: Any, norms: Tensor | None = None) -> Tensor:
    """W' = (m / ‖W + s·B A‖) ⊙ (W + s·B A) as an fp32 (out, in) matrix, from the unmerged W; `norms` replaces the
    computed norms (the ones recorded at merge time)."""
    a, b = module.factors()
    s = module.scaling * module.strength
    base = module.weight_matrix().float()
    norms = module_row_norms(module) if norms is None else norms
    scale = getattr(module, MAGNITUDE).detach().float().view(-1) / norms
    return (base + (b.float() @ a.float()) * s) * scale[:, None]


def delta_weight(module: Any) -> Tensor:
    """W' − W in fp32, in the layout of `module.weight`. For a merged module W is recovered from the merged weight
    and the norms recorded when it was merged (`merged_norms`): W = W' · ‖·‖ / m − s·B A."""
    merged_norms: Tensor | None = getattr(module, "merged_norms", None)
    if module.merged and merged_norms is not None:
        a, b = module.factors()
        merged = module.weight_matrix().float()
        scale = getattr(module, MAGNITUDE).detach().float().view(-1) / merged_norms
        original = merged / scale[:, None] - (b.float() @ a.float()) * (module.scaling * module.strength)
        return module.matrix_to_weight(merged - original)
    return module.matrix_to_weight(adapted_matrix(module) - module.weight_matrix().float())


def refuse_dora_adapter(dora: bool, name: str, action: str) -> None:
    """Raise for a DoRA adapter where `action` needs the update to be the low-rank s·B A alone."""
    if dora:
        raise LorakitError(
            f"{name} is a DoRA adapter: its update m ⊙ (W + s·B A) / ‖W + s·B A‖ − W is not the low-rank s·B A, so "
            f"{action} does not apply to it; merge it into its base instead (lorakit merge --adapter DIR --out DIR)")
