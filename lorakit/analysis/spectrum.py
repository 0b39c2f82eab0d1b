"""The spectrum of ΔW from its factors, and the numbers that summarise it.

`factor_svd` gives the exact thin SVD of ΔW = left · right (left (m, k), right (k, n), k small) without forming the
(m, n) product: left = Q_l R_l and rightᵀ = Q_r R_r (two thin QRs), so ΔW = Q_l (R_l R_rᵀ) Q_rᵀ and the SVD of the
k x k core R_l R_rᵀ = X S Yᵀ gives U = Q_l X, V = Q_r Y. Cost O((m + n) k²) against O(m n min(m, n)).

- stable rank: ‖ΔW‖_F² / ‖ΔW‖_2² = Σσᵢ² / σ₁² (Rudelson & Vershynin 2007), between 1 and the rank;
- effective rank: exp(H(p)), pᵢ = σᵢ / Σσⱼ, H the Shannon entropy (Roy & Vetterli 2007);
- energy at k: Σ_{i<=k} σᵢ² / Σσᵢ², the share of ‖ΔW‖_F² that the best rank-k approximation keeps
  (Eckart-Young).
A zero ΔW (an untrained adapter) has stable and effective rank 0 and energy 0 at every k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FactorSVD:
    """ΔW = U diag(S) Vᵀ: U (m, k) and V (n, k) with orthonormal columns, S (k,) descending, float64."""

    u: Tensor
    s: Tensor
    v: Tensor


def factor_svd(left: Tensor, right: Tensor) -> FactorSVD:
    """The thin SVD of left @ right (left (m, k), right (k, n)), exactly, through QRs of the factors and the SVD
    of a k x k core; computed in float64."""
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(f"factor_svd needs left (m, k) and right (k, n), got {tuple(left.shape)} and "
                         f"{tuple(right.shape)}")
    q_left, r_left = torch.linalg.qr(left.double())  # (m, p), (p, k)
    q_right, r_right = torch.linalg.qr(right.double().T)  # (n, q), (q, k)
    x, s, yh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)  # core (p, q)
    return FactorSVD(q_left @ x, s, q_right @ yh.T)


def stable_rank(s: Tensor) -> float:
    """Σσᵢ² / σ₁² of the singular values `s` (any order); 0 for a zero matrix."""
    top = float(s.abs().max()) if s.numel() else 0.0
    return float((s.double() ** 2).sum()) / top ** 2 if top > 0 else 0.0


def effective_rank(s: Tensor) -> float:
    """exp of the entropy of σᵢ / Σσⱼ (Roy & Vetterli 2007, Def. 1); 0 for a zero matrix."""
    s = s.double().abs()
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return math.exp(float(-(p * p.log()).sum()))


def energy(s: Tensor) -> list[float]:
    """[Σ_{i<=k} σᵢ² / Σσᵢ² for k = 1..len(s)] for `s` in descending order; all 0 for a zero matrix."""
    sq = s.double() ** 2
    total = float(sq.sum())
    if total <= 0:
        return [0.0] * s.numel()
    return (sq.cumsum(0) / total).tolist()
