"""How ΔW relates to W (Hu et al. 2021, §7.3, Table 7).

Project W onto the r-dimensional subspaces of ΔW: ‖UᵀWV‖_F with U (m, r), V (n, r) the top-r left and right
singular vectors of ΔW. Beside it the same norm for the top-r singular vectors of W itself (then UᵀWV =
diag(σ₁..σᵣ(W)), so the norm is √Σ_{i<=r} σᵢ(W)²) and for random directions. The amplification factor
‖ΔW‖_F / ‖UᵀWV‖_F says how much ΔW magnifies the directions it adds: the paper finds ~21 at r = 4 on GPT-3's
W_q, i.e. ΔW amplifies directions that W already has but does not emphasise.

Random baseline: for independent uniformly random U (m, r) and V (n, r), E[UUᵀ] = (r/m)·I and E[VVᵀ] = (r/n)·I,
so E‖UᵀWV‖_F² = tr(E[UUᵀ] W E[VVᵀ] Wᵀ) = r²‖W‖_F² / (m n); the root mean square r‖W‖_F / √(m n) is reported, a
fixed number rather than one draw.

W's top-r singular values come from a randomized SVD (`lorakit.init.randomized_svd`); an exact SVD of every W would
cost minutes on SmolLM2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.init import randomized_svd
from lorakit.lowrank import FactorSVD

# Pretrained W has a flat spectrum, which a randomized SVD resolves slowly: on SmolLM2's projections (q, k, up,
# down of layers 0, 15, 29; r = 16) √Σσᵢ² came out at most 2.9% low with 4 iterations, 1.4% with 6, 0.7% with 8.
SVD_ITERS = 8
SVD_OVERSAMPLE = 16  # extra sketch columns beyond r


@dataclass
class Amplification:
    """§7.3's numbers for one module, at r = the number of ΔW's singular directions used."""

    rank: int
    delta_norm: float  # ‖ΔW‖_F
    weight_norm: float  # ‖W‖_F
    delta_directions: float  # ‖UᵀWV‖_F, U and V of ΔW
    weight_directions: float  # ‖UᵀWV‖_F, U and V of W: √Σ_{i<=r} σᵢ(W)²
    random_directions: float  # root mean square of ‖UᵀWV‖_F over random U and V: r‖W‖_F / √(m n)
    factor: float | None  # ‖ΔW‖_F / ‖UᵀWV‖_F with ΔW's U and V; None when ΔW = 0 (U, V arbitrary) or UᵀWV = 0


def top_singular_values(weights: Tensor, k: int, *, seed: int = 0) -> Tensor:
    """The top-k singular values of each matrix in `weights` (..., m, n), by a randomized SVD with `SVD_ITERS`
    power iterations on k + `SVD_OVERSAMPLE` random directions; (..., k), in the weights' dtype."""
    generator = torch.Generator().manual_seed(seed)
    _, s, _ = randomized_svd(weights, k, iters=SVD_ITERS, oversample=SVD_OVERSAMPLE, generator=generator)
    return s


def amplification(weight: Tensor, svd: FactorSVD, weight_top: Tensor) -> Amplification:
    """§7.3 for one module: `weight` W (m, n) in the ΔW = B A layout, `svd` the SVD of ΔW, `weight_top` W's top
    singular values (at least as many as ΔW's directions)."""
    m, n = weight.shape
    r = int(svd.s.numel())
    if svd.u.shape[0] != m or svd.v.shape[0] != n:
        raise ValueError(f"ΔW is {svd.u.shape[0]} x {svd.v.shape[0]} but W is {m} x {n}")
    projected = svd.u.T @ (weight @ svd.v.to(weight.dtype)).double()  # (r, r)
    delta_directions = float(projected.norm())
    delta_norm = float(svd.s.norm())
    weight_norm = float(weight.double().norm())
    return Amplification(
        rank=r, delta_norm=delta_norm, weight_norm=weight_norm, delta_directions=delta_directions,
        weight_directions=float(weight_top[:r].double().norm()),
        random_directions=r * weight_norm / math.sqrt(m * n),
        factor=delta_norm / delta_directions if delta_norm > 0 and delta_directions > 0 else None,
    )


def amplifications(pairs: dict[str, tuple[Tensor, FactorSVD]]) -> dict[str, Amplification]:
    """`amplification` of every module in `pairs` (name -> (W, SVD of ΔW)). One randomized SVD per module: batching
    the modules of one shape was slower on SmolLM2, stacking their weights cost more than it saved."""
    return {name: amplification(weight, svd, top_singular_values(weight, int(svd.s.numel())))
            for name, (weight, svd) in pairs.items()}
