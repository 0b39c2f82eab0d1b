"""Initialisation of the low-rank factors, as pure functions on matrices.

Every function returns A: (rank, fan_in) and B: (fan_out, rank); `principal` also returns the residual weight
that replaces W. All arithmetic runs in fp32 whatever the base dtype; callers cast the results.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Random directions a randomized SVD samples beyond the rank: none, as in PEFT's `pissa_niter_N` (torch.svd_lowrank
# with q = rank), so that an adapter file's `pissa_niter_N` means the same algorithm in both. The products with W are
# nearly all of the time, and wider sketches cost more than their share (at rank 16 on AVX-512, 17 to 24 columns
# take 25-50% longer than 16). What that gives up: on SmolLM2-135M with 4 iterations the residual is 0.2-0.5% above
# the exact SVD's at ranks 4-16 (1.6% on the worst matrix; 4 extra columns halve both), but on a spectrum with no gap
# at the rank (small random matrices, or the smooth spectra in tests/test_init.py) 4 iterations can leave 2-5%;
# more iterations or `oversample` close it.
OVERSAMPLE = 0


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


def principal(weight: Tensor, rank: int, scaling: float, *, svd_iters: int | None = None,
              oversample: int = OVERSAMPLE, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """PiSSA (Meng et al. 2024, §3): W = U S Vᵀ; A = sqrt(S_r / scaling) V_rᵀ, B = U_r sqrt(S_r / scaling).

    Then scaling · B A is the best rank-r approximation of W and the residual W - scaling · B A is frozen, so the
    model's output is unchanged at step 0 while the adapter starts on W's principal directions.

    weight: (fan_out, fan_in), or a batch (..., fan_out, fan_in) of same-shape matrices. svd_iters: None for the
    exact SVD, else power iterations of a randomized SVD (`randomized_svd`).
    Returns A (..., rank, fan_in), B (..., fan_out, rank), residual (..., fan_out, fan_in), all fp32.
    """
    a, b = principal_factors(weight, rank, scaling, svd_iters=svd_iters, oversample=oversample, generator=generator)
    return a, b, residual(weight, a, b, scaling)


def principal_factors(weight: Tensor, rank: int, scaling: float, *, svd_iters: int | None = None,
                      oversample: int = OVERSAMPLE, generator: torch.Generator | None = None
                      ) -> tuple[Tensor, Tensor]:
    """A and B of `principal` without the residual, for callers that subtract scaling · B A from W in place."""
    w = weight.detach().to(torch.float32)
    if svd_iters is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    else:
        u, s, vh = randomized_svd(w, rank, iters=svd_iters, oversample=oversample, generator=generator)
    root = torch.sqrt(s / scaling)  # (..., rank)
    a = root[..., :, None] * vh  # (..., rank, fan_in)
    b = u * root[..., None, :]  # (..., fan_out, rank)
    return a, b


def residual(weight: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """W - scaling · B A in fp32: the frozen base weight of a principal init. weight: (..., fan_out, fan_in)."""
    w = weight.detach().to(torch.float32)
    m, n = w.shape[-2:]
    rank = a.shape[-2]
    # One fused product-and-subtract: no (fan_out, fan_in) temporaries for B A and its scaled copy.
    out = torch.baddbmm(w.reshape(-1, m, n), b.reshape(-1, m, rank), a.reshape(-1, rank, n), alpha=-scaling)
    return out.view(w.shape)


def randomized_svd(matrix: Tensor, rank: int, *, iters: int = 4, oversample: int = OVERSAMPLE,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` singular triplets by a randomized range finder with subspace iteration (Halko et al. 2011,
    Alg. 4.4), on `rank + oversample` random directions, then the SVD of the small core of A ≈ q r pᵀ (with
    iterations) or of qᵀA (Alg. 5.1, without).

    matrix: (m, n), or a batch (..., m, n) of same-shape matrices, each with its own random sketch.
    Returns U (..., m, rank), S (..., rank), Vh (..., rank, n).
    """
    *batch, m, n = matrix.shape
    width = min(rank + oversample, m, n)
    # Drawn on the CPU so that a CPU generator (the seeded one `inject` passes) serves weights on any device.
    sketch = torch.randn(*batch, n, width, generator=generator, dtype=matrix.dtype).to(matrix.device)  # (..., n, k)
    q, r = torch.linalg.qr(matrix @ sketch)  # (..., m, k): orthonormal basis of the sampled range
    p: Tensor | None = None
    for _ in range(iters):
        # Re-orthonormalising after each product keeps the small singular directions from being lost to roundoff.
        # Aᵀq is computed as (qᵀA)ᵀ, the same numbers: MKL multiplies by A untransposed up to 1.4x faster (wide A).
        p = torch.linalg.qr((q.mT @ matrix).mT).Q  # (..., n, k)
        q, r = torch.linalg.qr(matrix @ p)  # (..., m, k), (..., k, k)
    if p is None:
        # No iteration: A ≈ q qᵀA (Alg. 5.1), qᵀA = Rᵀ Pᵀ through its QR, less than LAPACK's SVD of a wide matrix.
        p, r_t = torch.linalg.qr((q.mT @ matrix).mT)  # (..., n, k), (..., k, k)
        core = r_t.mT
    else:
        # A ≈ A p pᵀ = q r pᵀ, from the last product already made: one pass over A fewer than forming qᵀA (the
        # products with A are three quarters of the time), with p one half-iteration behind q.
        core = r
    u_small, s, zh = torch.linalg.svd(core)  # (..., k, k), (..., k), (..., k, k)
    u = q @ u_small[..., :rank]  # (..., m, rank)
    vh = zh[..., :rank, :] @ p.mT  # (..., rank, n)
    return u, s[..., :rank], vh
