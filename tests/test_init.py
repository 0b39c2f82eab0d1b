"""Initialisation functions against exact references."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOLERANCES, approx, assert_close

from lorakit import init as lora_init


def _low_rank_plus_noise(m: int, n: int, rank: int, seed: int = 0, noise: float = 0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(1, -1, rank)
    u = torch.linalg.qr(torch.randn(m, rank, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, rank, generator=g)).Q
    return (u * spectrum) @ v.T + noise * torch.randn(m, n, generator=g)


def test_standard_init_has_zero_b_and_kaiming_uniform_a():
    a, b = lora_init.standard(8, 100, 30, generator=torch.Generator().manual_seed(0))
    assert a.shape == (8, 100) and b.shape == (30, 8)
    assert torch.count_nonzero(b) == 0
    bound = 1 / math.sqrt(100)
    assert a.abs().max() <= bound and a.abs().max() > (1 - TOLERANCES["uniform max below bound"][0]) * bound


def test_standard_init_for_embeddings_swaps_which_factor_is_zero():
    a, b = lora_init.standard(4, 50, 16, zero_b=False)
    assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) > 0


def test_gaussian_init_std_is_one_over_rank():
    a, b = lora_init.gaussian(16, 4000, 8, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(b) == 0
    assert a.std().item() == approx(1 / 16, "sample std")


@pytest.mark.parametrize("scaling", [0.5, 2.0])
def test_principal_init_reconstructs_weight_exactly(scaling):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    a, b, residual = lora_init.principal(w, 6, scaling)
    assert_close(residual + scaling * (b @ a), w, torch.float32)


def test_principal_init_is_the_best_rank_r_approximation_from_float64_svd():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :6] * s[:6]) @ vh[:6]
    a, b, residual = lora_init.principal(w, 6, 2.0)
    assert_close((2.0 * b @ a).double(), best, "fp32 SVD vs float64 SVD")
    assert residual.norm().item() == approx(s[6:].norm().item(), torch.float32)


def test_principal_init_runs_in_fp32_for_bf16_weights():
    w = torch.randn(16, 16).to(torch.bfloat16)
    a, b, residual = lora_init.principal(w, 4, 1.0)
    assert a.dtype == b.dtype == residual.dtype == torch.float32


def test_oversampled_randomized_svd_residual_is_within_two_percent_of_exact():
    # A smooth spectrum with no gap at the rank, where a sketch of only `rank` columns (the default) converges
    # slowly; 8 extra columns make two iterations enough.
    w = _low_rank_plus_noise(300, 200, 40)
    _, _, exact = lora_init.principal(w, 16, 1.0)
    _, _, fast = lora_init.principal(w, 16, 1.0, svd_iters=2, oversample=8, generator=torch.Generator().manual_seed(0))
    assert fast.norm() <= exact.norm() * (1 + TOLERANCES["randomized SVD residual vs exact"][0])


def test_randomized_svd_recovers_singular_values_of_a_low_rank_matrix():
    w = _low_rank_plus_noise(120, 90, 10, noise=1e-4)
    _, s_exact, _ = torch.linalg.svd(w)
    _, s_fast, _ = lora_init.randomized_svd(w, 10, iters=3, generator=torch.Generator().manual_seed(0))
    assert_close(s_fast, s_exact[:10], "randomized SVD vs exact")


def _rank_r_approximation(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """U S Vh: the same whatever sign each singular pair (u_i, v_i) came out with."""
    return (u * s[..., None, :]) @ vh


@pytest.mark.parametrize("shape", [(120, 90), (90, 120)], ids=["tall", "wide"])
def test_randomized_svd_of_a_batch_equals_the_svd_of_each_matrix(shape):
    # Rank-8 signal under small noise: a clear gap after the 8th singular value, so different sketches agree.
    batch = torch.stack([_low_rank_plus_noise(*shape, 8, seed=seed, noise=1e-3) for seed in range(3)])
    u, s, vh = lora_init.randomized_svd(batch, 8, iters=3, generator=torch.Generator().manual_seed(0))
    assert u.shape == (3, shape[0], 8) and s.shape == (3, 8) and vh.shape == (3, 8, shape[1])
    for i in range(3):
        u_i, s_i, vh_i = lora_init.randomized_svd(batch[i], 8, iters=3, generator=torch.Generator().manual_seed(1))
        assert_close(s[i], s_i, "randomized SVD, other sketch")
        assert_close(_rank_r_approximation(u[i], s[i], vh[i]), _rank_r_approximation(u_i, s_i, vh_i),
                     "randomized SVD, other sketch")


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)], ids=["tall", "wide"])
def test_randomized_svd_returns_orthonormal_singular_vectors(shape):
    w = _low_rank_plus_noise(*shape, 40)
    u, _, vh = lora_init.randomized_svd(w, 16, iters=2, generator=torch.Generator().manual_seed(0))
    assert_close(u.T @ u, torch.eye(16), "fp32 orthonormal")
    assert_close(vh @ vh.T, torch.eye(16), "fp32 orthonormal")


@pytest.mark.parametrize("svd_iters", [None, 4], ids=["exact", "randomized"])
def test_principal_init_of_a_batch_matches_each_matrix(svd_iters):
    batch = torch.stack([_low_rank_plus_noise(60, 50, 6, seed=seed, noise=1e-3) for seed in range(3)])
    a, b, residual = lora_init.principal(batch, 6, 2.0, svd_iters=svd_iters,
                                         generator=torch.Generator().manual_seed(0))
    assert a.shape == (3, 6, 50) and b.shape == (3, 60, 6) and residual.shape == batch.shape
    for i in range(3):
        a_i, b_i, residual_i = lora_init.principal(batch[i], 6, 2.0, svd_iters=svd_iters,
                                                   generator=torch.Generator().manual_seed(1))
        assert_close(residual[i], residual_i, "randomized SVD, other sketch")
        assert_close(b[i] @ a[i], b_i @ a_i, "randomized SVD, other sketch")
    assert_close(residual + 2.0 * (b @ a), batch, torch.float32)


def _weight_like(m: int, n: int, seed: int, spikes: int = 8) -> torch.Tensor:
    """A few large singular values over a random bulk, the shape of a trained projection's spectrum."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, spikes, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, spikes, generator=g)).Q
    return (u * torch.linspace(8, 3, spikes)) @ v.T + torch.randn(m, n, generator=g) / math.sqrt(n)


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)], ids=["tall", "wide"])
def test_randomized_principal_residual_of_a_batch_is_within_two_percent_of_exact(shape):
    # The default sketch (`rank` columns, no oversampling) with the 4 iterations of the reference setting.
    batch = torch.stack([_weight_like(*shape, seed=seed) for seed in range(4)])
    exact = lora_init.principal(batch, 16, 1.0)[2].norm(dim=(-2, -1))  # (4,)
    fast = lora_init.principal(batch, 16, 1.0, svd_iters=4, generator=torch.Generator().manual_seed(0))[2]
    ratio = fast.norm(dim=(-2, -1)) / exact
    # The exact SVD leaves the smallest residual (Eckart-Young), up to the roundoff of two fp32 routes.
    assert (ratio >= 1 - TOLERANCES["fp32 reordered"][0]).all(), ratio
    assert (ratio <= 1 + TOLERANCES["randomized SVD residual vs exact"][0]).all(), ratio


def test_principal_factors_are_principal_without_the_residual():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    a, b, residual = lora_init.principal(w, 6, 2.0)
    a_only, b_only = lora_init.principal_factors(w, 6, 2.0)
    assert torch.equal(a, a_only) and torch.equal(b, b_only)
    assert_close(lora_init.residual(w, a, b, 2.0), w - 2.0 * (b @ a), torch.float32)
    assert torch.equal(lora_init.residual(w, a, b, 2.0), residual)
