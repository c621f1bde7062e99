"""Conjugate gradient (optionally preconditioned) for ``(H + ρI) x = v``.

The textbook recurrence, with ``A = H + ρI`` and preconditioner ``M⁻¹``
(identity when none is given)::

    x₀ = 0,  r₀ = v,  z₀ = M⁻¹r₀,  p₀ = z₀
    αⱼ = rⱼᵀzⱼ / pⱼᵀA pⱼ
    xⱼ₊₁ = xⱼ + αⱼ pⱼ,    rⱼ₊₁ = rⱼ − αⱼ A pⱼ,    zⱼ₊₁ = M⁻¹ rⱼ₊₁
    βⱼ = rⱼ₊₁ᵀzⱼ₊₁ / rⱼᵀzⱼ,   pⱼ₊₁ = zⱼ₊₁ + βⱼ pⱼ

The new direction is built from the *new* residual. On an SPD ``A`` this reaches
the exact solution in at most ``p`` iterations (in exact arithmetic). Once the
residual is exactly zero, the step sizes are set to zero instead of ``0/0``, so a
fixed iteration budget never turns a converged solve into NaN, and no
host-device synchronisation happens inside the loop unless ``rtol`` asks for it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hg_dist._checks import check_float
from hg_dist.hessian import HessianOperator, shifted
from hg_dist.ihvp._method import DAMPING, ITERATIONS, Method
from hg_dist.ihvp._result import IHVPResult, IHVPStats
from hg_dist.registry import Setting


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, or 0 where ``den == 0`` (a converged recurrence)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


def cg(op: HessianOperator,
       v: Tensor,
       num_iters: int,
       *,
       rho: float = 0.0,
       rtol: float | None = None,
       preconditioner: Callable[[Tensor], Tensor] | None = None,
       method: str = "cg",
       ) -> IHVPResult:
    """Approximate ``(H + ρI)⁻¹ v`` with ``num_iters`` CG iterations.

    Args:
        op: the Hessian ``H`` (``p×p``) as an operator.
        v: right-hand side, shape ``(p,)``.
        num_iters: iteration budget, ``>= 1``; each costs one Hessian product.
        rho: damping ``ρ >= 0`` added to the diagonal.
        rtol: stop once ``‖r‖ <= rtol·‖v‖``; checking costs one host sync per
            iteration, so the default ``None`` runs the whole budget.
        preconditioner: ``r ↦ M⁻¹ r`` for an SPD ``M ≈ H + ρI``.
        method: the name recorded in the stats.

    Returns:
        :class:`IHVPResult`; ``stats.residual_norm`` is the recurrence's ``‖r‖``.
    """
    num_iters = ITERATIONS.check(num_iters, method)
    a = shifted(op, DAMPING.check(rho, method))
    if rtol is not None:
        rtol = check_float("rtol", rtol, positive=True)
    precondition = preconditioner if preconditioner is not None else (lambda r: r)

    x = torch.zeros_like(v)
    r = v.clone()
    z = precondition(r)
    p = z.clone()
    rz = torch.dot(r, z)
    threshold = rtol * torch.linalg.vector_norm(v) if rtol is not None else None
    iterations = 0
    for _ in range(num_iters):
        ap = a.matvec(p)
        alpha = _safe_div(rz, torch.dot(p, ap))
        x = x + alpha * p
        r = r - alpha * ap
        iterations += 1
        if threshold is not None and bool(torch.linalg.vector_norm(r) <= threshold):
            break
        z = precondition(r)
        rz_new = torch.dot(r, z)
        beta = _safe_div(rz_new, rz)
        p = z + beta * p
        rz = rz_new

    stats = IHVPStats(method=method, num_hvps=iterations, num_operator_calls=iterations,
                      iterations=iterations, residual_norm=float(torch.linalg.vector_norm(r)))
    return IHVPResult(x, stats)


METHOD = Method(
    name="cg", function=cg, summary="conjugate gradient on (H + ρI) x = v",
    settings=(ITERATIONS,
              Setting("lr", float, 1.0, "kept for the seed's signature; CG's iterates do not depend on it",
                      minimum=0.0, exclusive_minimum=True, flag="ihvp-lr", argument=None),
              DAMPING))
