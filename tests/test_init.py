"""Initialisation functions against exact references."""

from __future__ import annotations

import math

import pytest
import torch

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
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound


def test_standard_init_for_embeddings_swaps_which_factor_is_zero():
    a, b = lora_init.standard(4, 50, 16, zero_b=False)
    assert torch.count_nonzero(a) == 0 and torch.count_nonzero(b) > 0


def test_gaussian_init_std_is_one_over_rank():
    a, b = lora_init.gaussian(16, 4000, 8, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(b) == 0
    assert a.std().item() == pytest.approx(1 / 16, rel=0.02)


@pytest.mark.parametrize("scaling", [0.5, 2.0])
def test_principal_init_reconstructs_weight_exactly(scaling):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    a, b, residual = lora_init.principal(w, 6, scaling)
    torch.testing.assert_close(residual + scaling * (b @ a), w, rtol=1e-5, atol=1e-5)


def test_principal_init_is_the_best_rank_r_approximation_from_float64_svd():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    best = (u[:, :6] * s[:6]) @ vh[:6]
    a, b, residual = lora_init.principal(w, 6, 2.0)
    torch.testing.assert_close((2.0 * b @ a).double(), best, rtol=1e-4, atol=1e-5)
    assert residual.norm().item() == pytest.approx(s[6:].norm().item(), rel=1e-5)


def test_principal_init_runs_in_fp32_for_bf16_weights():
    w = torch.randn(16, 16).to(torch.bfloat16)
    a, b, residual = lora_init.principal(w, 4, 1.0)
    assert a.dtype == b.dtype == residual.dtype == torch.float32


def test_randomized_svd_residual_is_within_two_percent_of_exact():
    w = _low_rank_plus_noise(300, 200, 40)
    _, _, exact = lora_init.principal(w, 16, 1.0)
    _, _, fast = lora_init.principal(w, 16, 1.0, svd_iters=2, generator=torch.Generator().manual_seed(0))
    assert fast.norm() <= exact.norm() * 1.02


def test_randomized_svd_recovers_singular_values_of_a_low_rank_matrix():
    w = _low_rank_plus_noise(120, 90, 10, noise=1e-4)
    _, s_exact, _ = torch.linalg.svd(w)
    _, s_fast, _ = lora_init.randomized_svd(w, 10, iters=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s_fast, s_exact[:10], rtol=1e-3, atol=1e-4)
