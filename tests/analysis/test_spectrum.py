"""Stable rank, effective rank and energy of constructed spectra against the formulas written out."""

from __future__ import annotations

import math

import torch
from conftest import approx
from lowrank_factors import factors_with_spectrum

from lorakit.analysis.spectrum import effective_rank, energy, factor_svd, stable_rank


def test_rank_numbers_of_a_known_spectrum_follow_their_formulas():
    sigma = [3.0, 2.0, 1.0, 0.5]
    s = factor_svd(*factors_with_spectrum(sigma)).s
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
