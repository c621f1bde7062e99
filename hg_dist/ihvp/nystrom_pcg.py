"""CG preconditioned by a randomized Nyström approximation (Nyström-PCG).

Frangella, Tropp & Udell (2023), "Randomized Nyström preconditioning". A
rank-``k`` approximation ``Ĥ = U Λ̂ Uᵀ`` of the Hessian is built from one batched
call ``Y = H Ω`` with a Gaussian test matrix ``Ω`` (``p×k``, orthonormalised)::

    Y_ν = Y + νΩ                  (tiny shift ν for stability)
    Ωᵀ Y_ν = Q D Qᵀ               (k×k eigendecomposition; keep D > 0)
    F = Y_ν Q D^{-1/2},  F = U Σ Vᵀ (thin SVD),  Λ̂ = max(Σ² − ν, 0)

and the preconditioner for ``A = H + ρI`` is applied as::

    M⁻¹ r = (λ̂_k + ρ) U (Λ̂ + ρI)⁻¹ Uᵀ r + (r − U Uᵀ r)

which maps the top-``k`` eigendirections to roughly the ``k``-th eigenvalue, so CG
then converges at the rate of the remaining spectrum. Total cost: ``k`` products
in one call, plus one product per CG iteration.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hg_dist.hessian import HessianOperator
from hg_dist.ihvp._errors import PRODUCTS_HINT, check_finite, check_on_divergence
from hg_dist.ihvp._method import DAMPING, ITERATIONS, Method, checks_rhs
from hg_dist.ihvp._result import IHVPResult, IHVPStats
from hg_dist.ihvp.cg import cg
from hg_dist.ihvp.nystrom import RANK, check_rank, float64_blocks, gram_cholesky


class NystromFactor(NamedTuple):
    """``Ĥ = U diag(eigenvalues) Uᵀ`` with ``U`` of shape ``(p, r)``, ``r <= k``."""

    basis: Tensor
    eigenvalues: Tensor


def randomized_nystrom(op: HessianOperator, rank: int, like: Tensor,
                       generator: torch.Generator | None = None) -> NystromFactor:
    """Rank-``rank`` randomized Nyström factor of ``H`` from one ``matmat`` call.

    Every factorisation is of a ``k×k`` matrix: ``Ω`` is orthonormalised through the
    Cholesky factor of ``ΩᵀΩ`` (a Gaussian ``Ω``'s columns are well conditioned; a
    Householder QR is the fallback when they are not, e.g. ``k`` close to ``p``), ``‖Y‖₂``
    is read off ``YᵀY``, and the thin SVD of ``F`` comes from the eigendecomposition of
    ``FᵀF`` accumulated in float64 (``U = F V Σ⁻¹``; directions with ``σ² ≤ 1e-12·σ²_max``,
    below float64's resolution of that Gram matrix, are dropped: their ``Λ̂`` is 0 anyway).
    The ``p``-long work is ``k``-column matrix products, not LAPACK on a ``p×k`` matrix.

    Raises:
        NonFiniteHypergradientError: the sketch ``Y = HΩ`` has NaN/inf entries
            (checked before any factorisation sees it).
    """
    omega = torch.randn(op.size, rank, generator=generator, dtype=like.dtype).to(like.device)
    omega = _orthonormal_columns(omega)
    y = op.matmat(omega)                                               # (p, k)
    check_finite({"the Hessian sketch Y = HΩ": y}, "nystrom_pcg", PRODUCTS_HINT)
    norm_y = torch.linalg.eigvalsh(_gram64(y))[-1].clamp_min(0).sqrt()   # ‖Y‖₂
    shift = torch.finfo(like.dtype).eps * max(op.size, 1) ** 0.5 * norm_y.to(like.dtype)
    y_shifted = y + shift * omega
    core = omega.T @ y_shifted
    d, q = torch.linalg.eigh((core + core.T) / 2)
    keep = d > d.max().clamp_min(0) * 1e-12 + torch.finfo(like.dtype).tiny
    factor = y_shifted @ (q[:, keep] / d[keep].sqrt())                 # F (p, r)
    sigma2, v = torch.linalg.eigh(_gram64(factor))                     # FᵀF = V Σ² Vᵀ, ascending
    sigma2, v = sigma2.flip(0), v.flip(1)
    kept = sigma2 > sigma2[:1].clamp_min(0) * 1e-12 + torch.finfo(torch.float64).tiny   # none when H = 0
    sigma2, v = sigma2[kept], v[:, kept]
    basis = factor @ (v / sigma2.sqrt()).to(factor.dtype)              # U = F V Σ⁻¹ (p, r)
    return NystromFactor(basis, (sigma2.to(like.dtype) - shift).clamp_min(0))


GAUSSIAN_CONDITION_LIMIT = 1e2
"""Largest condition number of a Gaussian ``Ω`` orthonormalised through ``ΩᵀΩ`` (its columns'
orthogonality is then within ``ε·1e4``); a worse one (``k`` close to ``p``) takes a Householder QR."""


def _gram64(a: Tensor) -> Tensor:
    """``AᵀA`` in float64 for a ``(p, k)`` ``A``, accumulated over blocks of rows (no float64 copy of ``A``)."""
    gram = torch.zeros(a.shape[1], a.shape[1], dtype=torch.float64, device=a.device)
    for _, block in float64_blocks(a.T):
        gram.addmm_(block, block.T)
    return gram


def _orthonormal_columns(omega: Tensor) -> Tensor:
    """An orthonormal basis of ``Ω``'s columns: ``Ω R⁻¹`` with ``RᵀR = ΩᵀΩ`` (Cholesky, float64), or a
    Householder QR when ``Ω`` is too ill-conditioned for that (:data:`GAUSSIAN_CONDITION_LIMIT`)."""
    r, _ = gram_cholesky(_gram64(omega), GAUSSIAN_CONDITION_LIMIT)
    if r is None:
        return torch.linalg.qr(omega)[0]
    return torch.linalg.solve_triangular(r.to(omega.dtype), omega, upper=True, left=False)


def nystrom_preconditioner(factor: NystromFactor, rho: float):
    """``r ↦ M⁻¹ r`` for ``A = H + ρI`` (see the module docstring)."""
    u, lam = factor
    if lam.numel() == 0:                              # Ĥ = 0 (e.g. H = 0): nothing to precondition
        return lambda r: r
    # Λ̂ + ρ is floored so that a rank-deficient Ĥ with ρ = 0 stays invertible.
    floor = lam.max() * 1e-10 + torch.finfo(lam.dtype).tiny
    denominators = (lam + rho).clamp_min(floor)
    scale = denominators[-1] / denominators - 1       # (k,): M⁻¹r = r + U diag(scale) Uᵀr

    def apply(r: Tensor) -> Tensor:
        return torch.addmv(r, u, (u.T @ r).mul_(scale))   # one fused r + U(·), no p-sized temporaries

    return apply


@checks_rhs
def nystrom_pcg(op: HessianOperator,
                v: Tensor,
                rank: int,
                num_iters: int,
                *,
                rho: float = 0.0,
                rtol: float | None = None,
                generator: torch.Generator | None = None,
                on_divergence: str = "raise",
                ) -> IHVPResult:
    """Solve ``(H + ρI) x = v`` by CG with a rank-``rank`` Nyström preconditioner.

    Args:
        op: the Hessian ``H`` as an operator.
        v: right-hand side, shape ``(p,)``.
        rank: ``k``, the sketch size, ``1 <= k <= p``.
        num_iters: CG iteration budget, ``>= 1``.
        rho: damping ``ρ >= 0``.
        rtol: optional early stop, as in :func:`hg_dist.ihvp.cg`.
        generator: CPU generator for the Gaussian sketch (same seed on all workers).
        on_divergence: as in :func:`hg_dist.ihvp.cg` (``"raise"`` or ``"warn"``).

    Raises:
        IHVPDivergenceError: ``H + ρI`` is not positive definite along a CG direction.
        NonFiniteHypergradientError: ``v``, the sketch or the Hessian products are NaN/inf.
    """
    rank = check_rank(rank, op.size, "nystrom_pcg")
    rho = DAMPING.check(rho, "nystrom_pcg")
    check_on_divergence(on_divergence)
    factor = randomized_nystrom(op, rank, v, generator)
    result = cg(op, v, num_iters, rho=rho, rtol=rtol,
                preconditioner=nystrom_preconditioner(factor, rho), method="nystrom_pcg", on_divergence=on_divergence)
    s = result.stats
    stats = IHVPStats(method="nystrom_pcg", num_hvps=s.num_hvps + rank,
                      num_operator_calls=s.num_operator_calls + 1,
                      iterations=s.iterations, residual_norm=s.residual_norm)
    return IHVPResult(result.solution, stats)


METHOD = Method(name="nystrom_pcg", function=nystrom_pcg, randomized=True, settings=(RANK, ITERATIONS, DAMPING),
                summary="CG preconditioned by a rank-k randomized Nyström approximation")
