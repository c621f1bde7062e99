"""Silent wrong results (reliability matrix, second round): each case is a correct result or a clear refusal.

Numbers are checked against ground truth: dense float64 solves for Nyström,
parameter values before/after for frozen parameters, row counts for Parquet
shards, pixel values for 16-bit images. Warnings and errors are checked for the
setting they name and the fix they offer. No Ray.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hg_dist import ihvp
from hg_dist.hessian import HessianOperator
from hg_dist.ihvp.nystrom import NystromPrecisionWarning


# ---- Nyström in float32 with a small shift ----------------------------------------------------

def _least_squares_hessian(p: int = 30, n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A well-conditioned least-squares Hessian ``XᵀX/n`` (condition ≈ 4.5) and a right-hand side, float64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=generator, dtype=torch.float64)
    return x.T @ x / n, torch.randn(p, generator=generator, dtype=torch.float64)


def _float32_operator(hessian: torch.Tensor) -> HessianOperator:
    h32 = hessian.to(torch.float32)
    return HessianOperator(matvec=lambda u: h32 @ u, matmat=lambda u: h32 @ u, size=h32.shape[0])


@pytest.mark.parametrize("relative_rho", [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6])
def test_nystrom_float32_full_rank_matches_float64_solve(relative_rho):
    """At rank = p Nyström is (H + ρI)⁻¹ exactly: float32 products must give float32 accuracy, not ε/ρ."""
    hessian, v = _least_squares_hessian()
    rho = relative_rho * float(torch.linalg.matrix_norm(hessian, ord=2))
    reference = torch.linalg.solve(hessian + rho * torch.eye(30, dtype=torch.float64), v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NystromPrecisionWarning)
        x = ihvp.nystrom(_float32_operator(hessian), v.float(), rank=30, rho=rho).solution
    assert x.dtype == torch.float32
    assert float((x.double() - reference).norm() / reference.norm()) <= 1e-5


def test_nystrom_float32_low_rank_matches_dense_nystrom_formula():
    """At rank < p, against ``(C W⁺ Cᵀ + ρI)⁻¹ v`` built densely in float64 from the same columns."""
    hessian, v = _least_squares_hessian()
    rank, rho = 10, 1e-4
    columns = torch.randperm(30, generator=torch.Generator().manual_seed(3))[:rank]
    x = ihvp.nystrom(_float32_operator(hessian), v.float(), rank=rank, rho=rho,
                     generator=torch.Generator().manual_seed(3)).solution
    c = hessian.float().double()[:, columns]
    approx = c @ torch.linalg.pinv(c[columns]) @ c.T
    reference = torch.linalg.solve(approx + rho * torch.eye(30, dtype=torch.float64), v.float().double())
    assert float((x.double() - reference).norm() / reference.norm()) <= 1e-3


@pytest.mark.parametrize("rho", [1e-12, 1e-30])
def test_nystrom_shift_below_the_float32_noise_floor_warns(rho):
    hessian, v = _least_squares_hessian()
    floor = torch.finfo(torch.float32).eps * float(torch.linalg.matrix_norm(hessian.float().double(), ord=2))
    with pytest.warns(NystromPrecisionWarning, match=r"rho=.*below the rounding noise.*float32.*raise rho") as record:
        ihvp.nystrom(_float32_operator(hessian), v.float(), rank=30, rho=rho)
    message = str(record[0].message)
    assert f"{floor:.3g}" in message


def test_nystrom_float64_small_shift_is_accurate_and_quiet():
    hessian, v = _least_squares_hessian()
    op = HessianOperator(matvec=lambda u: hessian @ u, matmat=lambda u: hessian @ u, size=30)
    rho = 1e-8
    reference = torch.linalg.solve(hessian + rho * torch.eye(30, dtype=torch.float64), v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NystromPrecisionWarning)
        x = ihvp.nystrom(op, v, rank=30, rho=rho).solution
    assert float((x - reference).norm() / reference.norm()) <= 1e-6
