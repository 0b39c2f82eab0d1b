"""The spectrum of ΔW from its factors, and the numbers that summarise it.

The singular values come from `lorakit.lowrank.factor_svd` (the exact thin SVD of ΔW = left · right from two QRs
and a k x k SVD, re-exported here); from them:

- stable rank: ‖ΔW‖_F² / ‖ΔW‖_2² = Σσᵢ² / σ₁² (Rudelson & Vershynin 2007), between 1 and the rank;
- effective rank: exp(H(p)), pᵢ = σᵢ / Σσⱼ, H the Shannon entropy (Roy & Vetterli 2007);
- energy at k: Σ_{i<=k} σᵢ² / Σσᵢ², the share of ‖ΔW‖_F² that the best rank-k approximation keeps
  (Eckart-Young).
A zero ΔW (an untrained adapter) has stable and effective rank 0 and energy 0 at every k.
"""

from __future__ import annotations

import math

from torch import Tensor

from lorakit.lowrank import FactorSVD, factor_svd

__all__ = ["FactorSVD", "effective_rank", "energy", "factor_svd", "stable_rank"]


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
