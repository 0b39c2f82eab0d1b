"""Stable rank, effective rank and energy of constructed spectra against the formulas written out."""

from __future__ import annotations

import math

import torch
from conftest import approx

from lorakit.analysis.spectrum import effective_rank, energy, factor_svd, stable_rank


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def _factors_with_spectrum(sigma: list[float], m: int = 40, n: int = 30, seed: int = 0):
    """left (m, r), right (r, n) with left @ right = U diag(sigma) Vᵀ, mixed by a random invertible r x r G so
    that neither factor is itself orthogonal."""
    r = len(sigma)
    u, v = _orthonormal(m, r, seed), _orthonormal(n, r, seed + 1)
    g = torch.randn(r, r, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) + 3 * torch.eye(r)
    left = u @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ g
    right = torch.linalg.solve(g, v.T)
    return left, right


def test_rank_numbers_of_a_known_spectrum_follow_their_formulas():
    sigma = [3.0, 2.0, 1.0, 0.5]
    s = factor_svd(*_factors_with_spectrum(sigma)).s
    squares = [x * x for x in sigma]
    assert stable_rank(s) == approx(sum(squares) / squares[0], "float64 reordered")
    p = [x / sum(sigma) for x in sigma]
    assert effective_rank(s) == approx(math.exp(-sum(q * math.log(q) for q in p)), "float64 reordered")
    expected_energy = [sum(squares[:k]) / sum(squares) for k in range(1, 5)]
    assert energy(s) == [approx(e, "float64 reordered") for e in expected_energy]


def test_a_flat_spectrum_has_full_stable_and_effective_rank():
    s = torch.ones(5, dtype=torch.float64) * 0.7
    assert stable_rank(s) == approx(5.0)
    assert effective_rank(s) == approx(5.0)
    assert energy(s) == [approx(k / 5) for k in range(1, 6)]


def test_a_rank_one_update_has_rank_one_and_all_its_energy_at_one():
    s = torch.tensor([2.5, 0.0, 0.0], dtype=torch.float64)
    assert stable_rank(s) == 1.0 and effective_rank(s) == 1.0
    assert energy(s) == [1.0, 1.0, 1.0]


def test_a_zero_update_has_zero_ranks_and_zero_energy():
    s = torch.zeros(4, dtype=torch.float64)
    assert stable_rank(s) == 0.0 and effective_rank(s) == 0.0
    assert energy(s) == [0.0] * 4
