"""The SVD of a low-rank product from its factors against the dense SVD of the product."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from lowrank_factors import factors_with_spectrum

from lorakit.lowrank import factor_svd


def test_factor_svd_matches_the_svd_of_the_dense_product():
    g = torch.Generator().manual_seed(3)
    left, right = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randn(6, 40, generator=g,
                                                                                      dtype=torch.float64)
    dense = left @ right
    svd = factor_svd(left, right)
    assert_close(svd.s, torch.linalg.svdvals(dense)[:6], "float64 reordered")
    assert_close(svd.u @ torch.diag(svd.s) @ svd.v.T, dense, "float64 reordered")
    assert_close(svd.u.T @ svd.u, torch.eye(6, dtype=torch.float64), "float64 reordered")
    assert_close(svd.v.T @ svd.v, torch.eye(6, dtype=torch.float64), "float64 reordered")


def test_factor_svd_singular_vectors_span_the_dense_ones():
    left, right = factors_with_spectrum([5.0, 3.0, 2.0, 1.0])
    u, _, vh = torch.linalg.svd(left @ right, full_matrices=False)
    svd = factor_svd(left, right)
    for k in range(1, 5):  # distinct singular values: each top-k subspace is unique, compare projectors
        assert_close(svd.u[:, :k] @ svd.u[:, :k].T, u[:, :k] @ u[:, :k].T, "float64 reordered")
        assert_close(svd.v[:, :k] @ svd.v[:, :k].T, vh[:k].T @ vh[:k], "float64 reordered")


def test_factor_svd_of_fp32_factors_is_computed_in_float64():
    left, right = factors_with_spectrum([2.0, 1.0])
    svd = factor_svd(left.float(), right.float())
    assert svd.s.dtype == svd.u.dtype == svd.v.dtype == torch.float64
    assert_close(svd.s, torch.tensor([2.0, 1.0], dtype=torch.float64), "fp32 vs float64 formula")


def test_factor_svd_of_a_rank_deficient_product_has_zero_trailing_values():
    left, right = factors_with_spectrum([4.0, 1.0])
    wide_left = torch.cat([left, left[:, :1]], dim=1)  # (m, 3): ΔW = left @ right + left[:, 0] ⊗ 0
    wide_right = torch.cat([right, torch.zeros(1, right.shape[1], dtype=torch.float64)], dim=0)
    s = factor_svd(wide_left, wide_right).s
    assert_close(s[:2], torch.tensor([4.0, 1.0], dtype=torch.float64), "float64 reordered")
    assert_close(s[2:], torch.zeros(1, dtype=torch.float64), "float64 reordered")


def test_factor_svd_refuses_factors_that_do_not_multiply():
    with pytest.raises(ValueError, match=r"left \(m, k\) and right \(k, n\)"):
        factor_svd(torch.ones(5, 3), torch.ones(2, 4))

