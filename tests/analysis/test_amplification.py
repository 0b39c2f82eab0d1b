"""§7.3's numbers on a W with a known spectrum and a ΔW built to amplify chosen directions of it, the random
baseline against an exact average, and W's top singular values against the exact SVD."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import approx, assert_close

from lorakit.analysis.amplification import amplification, amplifications, top_singular_values
from lorakit.analysis.spectrum import factor_svd


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def _weight(m: int = 30, n: int = 20):
    """W = U diag(σ) Vᵀ with σ = 10, 9.5, ..., 0.5 (distinct): (W, U, σ, V)."""
    u, v = _orthonormal(m, n, 0), _orthonormal(n, n, 1)
    sigma = torch.linspace(10.0, 0.5, n, dtype=torch.float64)
    return u @ torch.diag(sigma) @ v.T, u, sigma, v


def _update_along(u: torch.Tensor, v: torch.Tensor, strengths: list[float]):
    """Factors of ΔW = u diag(strengths) vᵀ, mixed by an invertible matrix so the factors are not orthogonal."""
    r = len(strengths)
    g = torch.eye(r, dtype=torch.float64) + 0.3 * torch.ones(r, r, dtype=torch.float64)
    return u @ torch.diag(torch.tensor(strengths, dtype=torch.float64)) @ g, torch.linalg.solve(g, v.T)


def test_an_update_along_weak_directions_of_w_has_the_amplification_it_was_built_with():
    w, u, sigma, v = _weight()
    chosen = [14, 17]  # directions W holds weakly (σ = 3.0 and 1.5)
    strengths = [5.0, 3.0]
    svd = factor_svd(*_update_along(u[:, chosen], v[:, chosen], strengths))
    result = amplification(w, svd, torch.linalg.svdvals(w))
    weak = math.sqrt(sum(float(sigma[i]) ** 2 for i in chosen))  # UᵀWV = diag(σ_14, σ_17) up to signs
    assert result.rank == 2
    assert result.delta_norm == approx(math.hypot(*strengths), "float64 reordered")
    assert result.delta_directions == approx(weak, "float64 reordered")
    assert result.factor == approx(math.hypot(*strengths) / weak, "float64 reordered")
    assert result.weight_directions == approx(math.hypot(float(sigma[0]), float(sigma[1])), "float64 reordered")
    assert result.weight_norm == approx(float(sigma.norm()), "float64 reordered")


def test_an_update_along_the_top_directions_of_w_amplifies_less_than_one_along_weak_ones():
    w, u, _, v = _weight()
    top = amplification(w, factor_svd(*_update_along(u[:, :2], v[:, :2], [1.0, 1.0])), torch.linalg.svdvals(w))
    weak = amplification(w, factor_svd(*_update_along(u[:, -2:], v[:, -2:], [1.0, 1.0])), torch.linalg.svdvals(w))
    assert weak.factor is not None and top.factor is not None
    assert weak.factor > 10 * top.factor


def test_random_directions_is_the_root_mean_square_over_all_coordinate_subspaces():
    # E[UUᵀ] = (r/m)·I holds exactly for a uniformly random set of r coordinate axes, so averaging over all such
    # pairs of sets gives E‖UᵀWV‖_F² with no sampling error.
    m, n, r = 5, 4, 2
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    left, right = _update_along(_orthonormal(m, r, 3), _orthonormal(n, r, 4), [2.0, 1.0])
    result = amplification(w, factor_svd(left, right), torch.linalg.svdvals(w))
    pairs = list(itertools.product(itertools.combinations(range(m), r), itertools.combinations(range(n), r)))
    mean_square = sum(float(w[list(rows)][:, list(cols)].pow(2).sum()) for rows, cols in pairs) / len(pairs)
    assert result.random_directions == approx(math.sqrt(mean_square), "float64 reordered")


def test_a_zero_update_has_no_amplification_factor():
    w, _, _, _ = _weight()
    svd = factor_svd(torch.zeros(30, 2, dtype=torch.float64), torch.ones(2, 20, dtype=torch.float64))
    assert amplification(w, svd, torch.linalg.svdvals(w)).factor is None


def test_top_singular_values_match_the_exact_svd_of_a_low_rank_plus_noise_matrix():
    g = torch.Generator().manual_seed(5)
    low = torch.randn(3, 60, 6, generator=g) @ torch.randn(3, 6, 40, generator=g)  # a batch of rank-6 matrices
    matrices = low + 1e-4 * torch.randn(3, 60, 40, generator=g)
    assert_close(top_singular_values(matrices, 6), torch.linalg.svdvals(matrices)[:, :6], "randomized SVD vs exact")


def test_top_singular_values_never_exceed_the_exact_ones():
    # The sketch's values are those of W restricted to a subspace, so each is at most the exact one (interlacing),
    # even on a flat spectrum where they fall short.
    w = torch.randn(120, 90, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    approx_top, exact = top_singular_values(w, 8), torch.linalg.svdvals(w)[:8]
    assert bool((approx_top <= exact * (1 + 1e-12)).all())


def test_amplifications_of_several_modules_agree_with_one_at_a_time():
    w, u, _, v = _weight()
    svd = factor_svd(*_update_along(u[:, [3, 9]], v[:, [3, 9]], [2.0, 1.0]))
    both = amplifications({"a": (w, svd), "b": (w.T.contiguous(), factor_svd(svd.v * svd.s, svd.u.T))})
    alone = amplification(w, svd, top_singular_values(w, 2))
    assert both["a"] == alone
    assert both["b"].delta_directions == approx(alone.delta_directions, "float64 reordered")


def test_weight_of_another_shape_is_refused():
    w, u, _, v = _weight()
    svd = factor_svd(*_update_along(u[:, :2], v[:, :2], [1.0, 1.0]))
    with pytest.raises(ValueError, match="ΔW is 30 x 20 but W is 20 x 30"):
        amplification(w.T, svd, torch.ones(2))
