"""DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024): the adapted weight is

    W' = m ⊙ (W + s·B A) / ‖W + s·B A‖

with the norm taken over each output feature's row of the (out, in) matrix (the paper's column norm of its (in, out)
layout), and the magnitude vector m (one entry per output feature, PEFT's `lora_magnitude_vector`) trained beside A
and B. As in the paper (§4.3) and PEFT, the norm is a constant for the gradient: it follows ΔW in the forward but
no gradient flows through it.

The norm is never formed from the dense sum W + s·B A. Per row i,

    ‖W_i + s·B_i A‖² = ‖W_i‖² + 2s·⟨(W Aᵀ)_i, B_i⟩ + s²·B_i (A Aᵀ) B_iᵀ

costs one (out, in) x (in, r) product and no (out, in) temporary, where PEFT builds B A from an identity matrix and
adds it to W at every step. The forward is the LoRA layer's (`lorakit.fused.lora_linear`) followed by one
per-feature rescale, `y = (m / ‖W + s·B A‖) ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b`.

Dropout (`LoraConfig.dropout`) applies to the low-rank branch's input only, as for LoRA. PEFT also feeds the
dropped input to the magnitude-rescaled base term; the two agree whenever dropout is off (evaluation, or dropout 0).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.errors import LorakitError
from lorakit.fused import lora_linear

MAGNITUDE = "lora_magnitude_vector"  # the parameter's name in modules, state dicts and PEFT's files


def is_dora(module: Any) -> bool:
    return getattr(module, MAGNITUDE, None) is not None


def row_norms(weight_matrix: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """‖W + scaling·B A‖ of each row of the (out, in) matrix, in fp32 and without a gradient, from W (out, in),
    A (rank, in) and B (out, rank), without forming their dense sum (see the module docstring)."""
    with torch.no_grad():
        squared = torch.linalg.vector_norm(weight_matrix, dim=1, dtype=torch.float32).square()  # ‖W_i‖²
        a32, b32 = a.float(), b.float()
        wa = (weight_matrix @ a.to(weight_matrix.dtype).T).float()  # (out, r)
        squared += (wa * b32).sum(1).mul_(2 * scaling)
        squared += ((b32 @ (a32 @ a32.T)) * b32).sum(1).mul_(scaling * scaling)
        return squared.clamp_min_(0).sqrt_()


def magnitude_shape(weight_dims: int, out_features: int) -> tuple[int, ...]:
    """PEFT's shape of m: (out,) for a linear layer's 2-D weight, (1, out, 1, ...) for a convolution's
    (out, in, *kernel)."""
    if weight_dims <= 2:
        return (out_features,)
    return (1, out_features) + (1,) * (weight_dims - 2)


def module_row_norms(module: Any, scaling: float | None = None) -> Tensor:
    """`row_norms` of a LoRA module's W + s·B A, (out,) in fp32; `scaling` defaults to the module's own times its
    strength."""
    a, b = module.factors()
    s = module.scaling * module.strength if scaling is None else scaling
    return row_norms(module.weight_matrix(), a, b, s)


def initial_magnitude(module: Any) -> Tensor:
    """m = ‖W + s·B A‖ for the module's current factors and base weight, so that W' = W + s·B A at the start (W
    itself when B is zero, and the original W of a principal init, whose base is the residual)."""
    norms = module_row_norms(module, module.scaling)
    magnitude: Tensor = getattr(module, MAGNITUDE)
    return norms.to(magnitude.dtype).view(magnitude.shape)


def row_scale(module: Any, scaling: float) -> Tensor:
    """m / ‖W + s·B A‖ as an (out,) vector in m's dtype, with a gradient to m only.

    Outside training (eval mode, or no gradient) the norms are kept on the module for as long as W, A, B (their
    storage and in-place version counters) and the scaling stay the same: a decoding step would otherwise pay the
    (out, in) x (in, r) product of every adapted layer for each token."""
    magnitude: Tensor = getattr(module, MAGNITUDE)
    if module.training and torch.is_grad_enabled():
        norms = module_row_norms(module, scaling)
    else:
        a, b = module.factors()
        key = (scaling, *((t.data_ptr(), t._version) for t in (module.weight, a, b)))
        cached = module.__dict__.get("_dora_norms")
        if cached is None or cached[0] != key:
            cached = (key, module_row_norms(module, scaling))
            module.__dict__["_dora_norms"] = cached
        norms = cached[1]
    return magnitude.view(-1) / norms.to(magnitude.dtype)


def linear_forward(module: Any, x: Tensor, scaling: float) -> Tensor:
    """A `LoraLinear` carrying m: (m / ‖W + s·B A‖) ⊙ (x Wᵀ + s·B A dropout(x)) + b."""
    weight, a, b = module.weight_matrix(), module.lora_A.weight, module.lora_B.weight
    scale = row_scale(module, scaling)
    if ((module._no_dropout or not module.training) and x.dtype == weight.dtype == a.dtype == b.dtype
            and not torch.is_autocast_enabled(x.device.type)):
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
