"""The merge rules of `combine`, as pure functions on one module's updates (float64 tensors).

Each input is one adapter's weighted update τᵢ = wᵢ·ΔWᵢ of the same module, ΔWᵢ = sᵢ·Bᵢ Aᵢ.

linear   Σ τᵢ = L R with L = [w₁s₁B₁, w₂s₂B₂, ...] (out, Σr) and R = [A₁; A₂; ...] (Σr, in): its thin SVD comes
         from the factors (`lowrank.factor_svd`), and its best rank-k approximation is U_k S_k V_kᵀ (Eckart & Young
         1936). No dense (out, in) matrix is formed.
cat      the same L and R kept as they are: exact, rank Σr.
ties     TIES-Merging (Yadav et al. 2023, §3): trim each τᵢ to its `density` share of largest magnitudes, elect the
         sign of each entry as the sign of Σ trimmed τᵢ, and average the trimmed entries that agree with it.
dare     DARE (Yu et al. 2024, §3): drop each entry of each τᵢ with probability p, scale the rest by 1/(1-p), and
         add the results (task arithmetic on the sparsified updates).
TIES and DARE act entry by entry, so they form the dense (out, in) update of each module.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def stacked_factors(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(L, R) with L @ R = Σ leftᵢ @ rightᵢ: the lefts side by side (out, Σr), the rights stacked (Σr, in)."""
    return torch.cat([left for left, _ in parts], dim=1), torch.cat([right for _, right in parts], dim=0)


def trim(update: Tensor, density: float) -> Tensor:
    """`update` with all but its round(density · numel) (at least 1) largest-magnitude entries set to zero."""
    keep = max(1, round(density * update.numel()))
    flat = update.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(keep).indices] = True
    return (flat * mask).reshape(update.shape)


def ties_merge(updates: list[Tensor], density: float) -> Tensor:
    """TIES-Merging of the weighted updates τᵢ (each (out, in)): trim, elect sign, disjoint mean. An entry whose
    elected sign is 0 (the trimmed entries cancel or are all zero) is 0."""
    trimmed = torch.stack([trim(u, density) for u in updates])  # (n, out, in)
    sign = trimmed.sum(dim=0).sign()  # (out, in)
    agree = (trimmed.sign() == sign) & (trimmed != 0)  # (n, out, in)
    total = (trimmed * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp_min(1)


def dare_merge(updates: list[Tensor], rate: float, generator: torch.Generator) -> Tensor:
    """DARE then a sum: each entry of each τᵢ is kept where a uniform draw in [0, 1) is >= `rate` (one draw per
    entry, `torch.rand(shape, generator=generator, dtype=float64)`, for the updates in order) and scaled by
    1/(1 - rate); the sparsified updates are added."""
    total = torch.zeros_like(updates[0])
    for update in updates:
        keep = torch.rand(update.shape, generator=generator, dtype=torch.float64) >= rate
        total += update * keep / (1.0 - rate)
    return total


def dense_svd(update: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(U (out, p), S (p,), V (in, p)) of a dense update, p = min(out, in), float64."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    return u, s, vh.T


def discarded_share(s: Tensor, k: int) -> float:
    """Σ_{i>k} σᵢ² / Σσᵢ²: the share of ‖ΔW‖_F² a rank-k truncation drops (0 for a zero update)."""
    squares = s.double() ** 2
    total = float(squares.sum())
    return float(squares[k:].sum()) / total if total > 0 and math.isfinite(total) else 0.0
