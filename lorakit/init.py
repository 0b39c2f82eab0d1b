"""Initialisation of the low-rank factors, as pure functions on matrices.

Every function returns A: (rank, fan_in) and B: (fan_out, rank); `principal` also returns the residual weight
that replaces W. All arithmetic runs in fp32 whatever the base dtype; callers cast the results.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def standard(rank: int, fan_in: int, fan_out: int, *, zero_b: bool = True,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """A Kaiming-uniform (a = sqrt(5), the `nn.Linear` default), B zero, so ΔW = 0 at step 0 (Hu et al. 2021, §4.1).

    With `zero_b=False` the roles swap (A zero, B ~ N(0, 1)): the choice for embeddings, whose A acts as a lookup
    table and whose B would otherwise receive no gradient signal through a zero A.
    """
    if not zero_b:
        b = torch.randn(fan_out, rank, generator=generator)
        return torch.zeros(rank, fan_in), b
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_ with a=sqrt(5): gain*sqrt(3/fan_in) = 1/sqrt(fan_in)
    a = torch.empty(rank, fan_in).uniform_(-bound, bound, generator=generator)
    return a, torch.zeros(fan_out, rank)


def gaussian(rank: int, fan_in: int, fan_out: int, *, generator: torch.Generator | None = None
             ) -> tuple[Tensor, Tensor]:
    """A ~ N(0, (1/rank)^2), B zero."""
    a = torch.randn(rank, fan_in, generator=generator) / rank
    return a, torch.zeros(fan_out, rank)


def principal(weight: Tensor, rank: int, scaling: float, *, svd_iters: int | None = None, oversample: int = 8,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA (Meng et al. 2024, §3): W = U S Vᵀ; A = sqrt(S_r / scaling) V_rᵀ, B = U_r sqrt(S_r / scaling).

    Then scaling · B A is the best rank-r approximation of W and the residual W - scaling · B A is frozen, so the
    model's output is unchanged at step 0 while the adapter starts on W's principal directions.

    weight: (fan_out, fan_in). svd_iters: None for the exact SVD, else power iterations of a randomized SVD.
    Returns A (rank, fan_in), B (fan_out, rank), residual (fan_out, fan_in), all fp32.
    """
    w = weight.detach().to(torch.float32)
    if svd_iters is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    else:
        u, s, vh = randomized_svd(w, rank, iters=svd_iters, oversample=oversample, generator=generator)
    root = torch.sqrt(s / scaling)  # (rank,)
    a = root[:, None] * vh  # (rank, fan_in)
    b = u * root[None, :]  # (fan_out, rank)
    return a, b, w - scaling * (b @ a)


def randomized_svd(matrix: Tensor, rank: int, *, iters: int = 4, oversample: int = 8,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` singular triplets by a randomized range finder with subspace iteration (Halko et al. 2011,
    Alg. 4.4). Returns U (m, rank), S (rank,), Vh (rank, n)."""
    m, n = matrix.shape
    width = min(rank + oversample, m, n)
    sketch = torch.randn(n, width, generator=generator, dtype=matrix.dtype)  # (n, k)
    q = torch.linalg.qr(matrix @ sketch).Q  # (m, k): orthonormal basis of the sampled range
    for _ in range(iters):
        # Re-orthonormalising after each product keeps the small singular directions from being lost to roundoff.
        p = torch.linalg.qr(matrix.T @ q).Q  # (n, k)
        q = torch.linalg.qr(matrix @ p).Q  # (m, k)
    small = q.T @ matrix  # (k, n)
    u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank], vh[:rank]
