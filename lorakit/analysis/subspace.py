"""Subspace similarity between two adapters (Hu et al. 2021, §7.2, Eq. 4).

    φ(A₁, A₂, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖_F² / min(i, j)  in [0, 1]

with U₁, U₂ the right-singular vectors of the two A factors (each A (r, in): its right-singular vectors span the
input directions the adapter reads), ordered by singular value. 1 means the top-i directions of one lie inside
the top-j directions of the other (or the reverse); 0 means they are orthogonal. The same formula applies to any
two sets of orthonormal directions: the input (V) or output (U) singular vectors of ΔW itself.

Random baseline: for U₂ spanning a uniformly random j-dimensional subspace of R^d, the projector's mean is
E[U₂U₂ᵀ] = (j/d)·I, so E‖U₁ᵢᵀU₂ⱼ‖_F² = tr(U₁ᵢᵀ E[U₂U₂ᵀ] U₁ᵢ) = i·j/d and E φ(i, j) = i·j / (d·min(i, j))
= max(i, j) / d.
"""

from __future__ import annotations

import torch
from torch import Tensor


def right_singular_vectors(a: Tensor) -> Tensor:
    """The right-singular vectors of A (r, n) as columns (n, min(r, n)), by descending singular value, float64."""
    _, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return vh.T


def phi_grid(u1: Tensor, u2: Tensor) -> Tensor:
    """φ(i, j) for every i <= r1, j <= r2 of orthonormal columns u1 (d, r1) and u2 (d, r2): a (r1, r2) tensor,
    entry [i-1, j-1] = ‖u1[:, :i]ᵀ u2[:, :j]‖_F² / min(i, j). One r1 x r2 product and two cumulative sums."""
    if u1.dim() != 2 or u2.dim() != 2 or u1.shape[0] != u2.shape[0]:
        raise ValueError(f"phi_grid needs u1 (d, r1) and u2 (d, r2) in the same space, got {tuple(u1.shape)} and "
                         f"{tuple(u2.shape)}")
    overlap = (u1.double().T @ u2.double()) ** 2  # (r1, r2): squared cosines between single directions
    sums = overlap.cumsum(0).cumsum(1)  # [i-1, j-1]: sum over the top-i by top-j block
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.float64)[None, :]
    return sums / torch.minimum(i, j)


def random_phi(d: int, r1: int, r2: int) -> Tensor:
    """E φ(i, j) = max(i, j) / d for a uniformly random subspace in R^d (module docstring): a (r1, r2) tensor."""
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j) / d
