"""A linear layer stored as a low-rank pair: W ≈ U·Vᵀ with U (out, k) and V (in, k).

y = x·V·Uᵀ + b costs k·(in + out) multiply-adds per token and k·(in + out) weights (plus the bias), against in·out
for the dense layer, so it saves both when k < in·out / (in + out).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LowRankLinear(nn.Module):
    """Two thin linears in sequence: `down` (in -> k, no bias, weight Vᵀ (k, in)) and `up` (k -> out, the original
    bias, weight U (out, k)). Input (..., in), output (..., out); both factors are ordinary trainable parameters."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_factors(cls, u: Tensor, v: Tensor, bias: Tensor | None = None) -> LowRankLinear:
        """The layer computing x·V·Uᵀ + bias, for U (out, k) and V (in, k); its dtype and device are U's."""
        if u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[1]:
            raise ValueError(f"factors must be U (out, k) and V (in, k), got {tuple(u.shape)} and {tuple(v.shape)}")
        layer = cls(v.shape[0], u.shape[0], u.shape[1], bias=bias is not None, device=u.device, dtype=u.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(u)
            layer.down.weight.copy_(v.T)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def dense_weight(self) -> Tensor:
        """U·Vᵀ, the (out, in) weight the pair stands for."""
        return self.up.weight @ self.down.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # (..., in) -> (..., k) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
