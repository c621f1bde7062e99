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
from hg_dist.ihvp.nystrom import RANK, check_rank


class NystromFactor(NamedTuple):
    """``Ĥ = U diag(eigenvalues) Uᵀ`` with ``U`` of shape ``(p, r)``, ``r <= k``."""

    basis: Tensor
    eigenvalues: Tensor


def randomized_nystrom(op: HessianOperator, rank: int, like: Tensor,
                       generator: torch.Generator | None = None) -> NystromFactor:
    """Rank-``rank`` randomized Nyström factor of ``H`` from one ``matmat`` call.

    Raises:
        NonFiniteHypergradientError: the sketch ``Y = HΩ`` has NaN/inf entries
            (checked before any factorisation sees it).
    """
    omega = torch.randn(op.size, rank, generator=generator, dtype=like.dtype).to(like.device)
    omega, _ = torch.linalg.qr(omega)
    y = op.matmat(omega)                                               # (p, k)
    check_finite({"the Hessian sketch Y = HΩ": y}, "nystrom_pcg", PRODUCTS_HINT)
    shift = torch.finfo(like.dtype).eps * max(op.size, 1) ** 0.5 * torch.linalg.matrix_norm(y, ord=2)
    y_shifted = y + shift * omega
    core = omega.T @ y_shifted
    d, q = torch.linalg.eigh((core + core.T) / 2)
    keep = d > d.max().clamp_min(0) * 1e-12 + torch.finfo(like.dtype).tiny
    factor = y_shifted @ (q[:, keep] / d[keep].sqrt())
    basis, sigma, _ = torch.linalg.svd(factor, full_matrices=False)
    return NystromFactor(basis, (sigma ** 2 - shift).clamp_min(0))


def nystrom_preconditioner(factor: NystromFactor, rho: float):
    """``r ↦ M⁻¹ r`` for ``A = H + ρI`` (see the module docstring)."""
    u, lam = factor
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
