"""Low-rank factors with a chosen spectrum, for the tests of the factor-space SVD and of the numbers built on it."""

from __future__ import annotations

import torch


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A (rows, cols) float64 matrix with orthonormal columns, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def factors_with_spectrum(sigma: list[float], m: int = 40, n: int = 30, seed: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """left (m, r), right (r, n) with left @ right = U diag(sigma) Vᵀ, mixed by a random invertible r x r G so
    that neither factor is itself orthogonal."""
    r = len(sigma)
    u, v = orthonormal(m, r, seed), orthonormal(n, r, seed + 1)
    g = torch.randn(r, r, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) + 3 * torch.eye(r)
    left = u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ g
    right = torch.linalg.solve(g, v.T)
    return left, right
