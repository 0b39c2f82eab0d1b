"""The exact thin SVD of a low-rank product from its factors, without forming the product.

`factor_svd(left, right)` for ΔW = left · right (left (m, k), right (k, n), k small): left = Q_l R_l and
rightᵀ = Q_r R_r (two thin QRs), so ΔW = Q_l (R_l R_rᵀ) Q_rᵀ and the SVD of the k x k core R_l R_rᵀ = X S Yᵀ gives
U = Q_l X, V = Q_r Y. Cost O((m + n) k²) against O(m n min(m, n)) for the dense SVD. Used by the analysis
(spectra of ΔW) and by compression (pruning an adapter's rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FactorSVD:
    """ΔW = U diag(S) Vᵀ: U (m, k) and V (n, k) with orthonormal columns, S (k,) descending, float64."""

    u: Tensor
    s: Tensor
    v: Tensor


def factor_svd(left: Tensor, right: Tensor) -> FactorSVD:
    """The thin SVD of left @ right (left (m, k), right (k, n)), exactly, through QRs of the factors and the SVD
    of a k x k core; computed in float64. Raises ValueError when the factors do not multiply."""
    if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
        raise ValueError(f"factor_svd needs left (m, k) and right (k, n), got {tuple(left.shape)} and "
                         f"{tuple(right.shape)}")
    q_left, r_left = torch.linalg.qr(left.double())  # (m, p), (p, k)
    q_right, r_right = torch.linalg.qr(right.double().T)  # (n, q), (q, k)
    x, s, yh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)  # core (p, q)
    return FactorSVD(q_left @ x, s, q_right @ yh.T)
