"""φ of Hu et al. 2021 §7.2 against its definition computed entry by entry, on subspaces with known overlap, and
the random-subspace expectation against an exact average."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import approx, assert_close

from lorakit.analysis.subspace import phi_grid, random_phi, right_singular_vectors


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def _phi(u1: torch.Tensor, u2: torch.Tensor, i: int, j: int) -> float:
    """The paper's Eq. 4 written out: ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j)."""
    return float(torch.linalg.matrix_norm(u1[:, :i].T @ u2[:, :j]) ** 2) / min(i, j)


def test_phi_grid_matches_the_definition_at_every_entry():
    u1, u2 = _orthonormal(20, 5, 0), _orthonormal(20, 7, 1)
    grid = phi_grid(u1, u2)
    assert grid.shape == (5, 7)
    for i, j in itertools.product(range(1, 6), range(1, 8)):
        assert float(grid[i - 1, j - 1]) == approx(_phi(u1, u2, i, j), "float64 reordered")


def test_phi_of_coordinate_subspaces_counts_the_shared_directions():
    e = torch.eye(10, dtype=torch.float64)
    u1 = e[:, [0, 1, 2, 3]]
    u2 = e[:, [0, 4, 1, 5]]  # shares e0 (its 1st direction) and e1 (its 3rd) with u1
    grid = phi_grid(u1, u2)
    assert float(grid[0, 0]) == 1.0  # both top directions are e0
    assert float(grid[1, 1]) == 0.5  # {e0, e1} against {e0, e4}: one of two
    assert float(grid[1, 2]) == 1.0  # {e0, e1} lies inside {e0, e4, e1}
    assert float(grid[3, 3]) == 0.5  # two of four shared
    assert float(grid[3, 0]) == 1.0  # e0 lies inside u1's top 4


def test_phi_is_one_for_nested_subspaces_and_zero_for_orthogonal_ones():
    basis = _orthonormal(16, 8, 2)
    nested = phi_grid(basis[:, :3], basis[:, :6])
    assert_close(nested, torch.ones(3, 6, dtype=torch.float64), "float64 reordered")
    apart = phi_grid(basis[:, :3], basis[:, 3:8])
    assert_close(apart, torch.zeros(3, 5, dtype=torch.float64), "float64 reordered")


def test_random_phi_is_the_exact_mean_over_all_coordinate_subspaces():
    # The expectation only uses E[U2 U2ᵀ] = (j/d)·I, which holds exactly for a uniformly random set of j of the d
    # coordinate axes: averaging over every such set gives the expected value with no sampling error.
    d, r1, r2 = 6, 3, 4
    u1 = _orthonormal(d, r1, 3)
    eye = torch.eye(d, dtype=torch.float64)
    expected = random_phi(d, r1, r2)
    for i, j in itertools.product(range(1, r1 + 1), range(1, r2 + 1)):
        subsets = list(itertools.combinations(range(d), j))
        mean = sum(_phi(u1, eye[:, list(s)], i, j) for s in subsets) / len(subsets)
        assert float(expected[i - 1, j - 1]) == approx(mean, "float64 reordered")
        assert float(expected[i - 1, j - 1]) == approx(max(i, j) / d)


def test_right_singular_vectors_come_in_the_order_of_the_singular_values():
    v = _orthonormal(12, 3, 4)
    a = torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)) @ v.T  # (3, 12), σ out of order
    vectors = right_singular_vectors(a)
    assert vectors.shape == (12, 3)
    for k, column in enumerate([1, 2, 0]):
        assert abs(float(vectors[:, k] @ v[:, column])) == approx(1.0, "float64 reordered")


def test_phi_grid_refuses_bases_of_different_spaces():
    with pytest.raises(ValueError, match="same space"):
        phi_grid(torch.eye(5)[:, :2], torch.eye(6)[:, :2])
