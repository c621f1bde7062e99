"""Truncated Neumann series for ``(H + ρI)⁻¹ v``.

With ``A = H + ρI`` and step ``α``::

    x = α Σ_{j=0}^{n} (I − αA)^j v

which converges to ``A⁻¹ v`` as ``n → ∞`` iff the spectral radius of ``I − αA`` is
below one; for SPD ``A`` that is ``0 < α < 2/λ_max(A)``. Costs ``n`` products.
"""

from __future__ import annotations

from torch import Tensor

from hg_dist.hessian import HessianOperator, shifted
from hg_dist.ihvp._method import DAMPING, ITERATIONS, Method
from hg_dist.ihvp._result import IHVPResult, IHVPStats
from hg_dist.registry import Setting

STEP = Setting("lr", float, 0.1, "Neumann step α; the series converges for α < 2/λ_max(H + ρI)",
               minimum=0.0, exclusive_minimum=True, flag="ihvp-lr", argument="alpha",
               hint="use a step below 2/λ_max of the inner Hessian")


def neumann(op: HessianOperator, v: Tensor, num_iters: int, alpha: float, *, rho: float = 0.0) -> IHVPResult:
    """Approximate ``(H + ρI)⁻¹ v`` by ``num_iters`` Neumann terms with step ``alpha``.

    Args:
        op: the Hessian ``H`` as an operator.
        v: right-hand side, shape ``(p,)``.
        num_iters: ``n >= 1``, the number of products.
        alpha: step ``α > 0``; must be below ``2/λ_max(H + ρI)`` to converge.
        rho: damping ``ρ >= 0``.
    """
    num_iters = ITERATIONS.check(num_iters, "neumann")
    alpha = STEP.check(alpha, "neumann", name="alpha")
    a = shifted(op, DAMPING.check(rho, "neumann"))
    term = v
    total = v
    for _ in range(num_iters):
        term = term - alpha * a.matvec(term)
        total = total + term
    stats = IHVPStats(method="neumann", num_hvps=num_iters, num_operator_calls=num_iters,
                      iterations=num_iters)
    return IHVPResult(alpha * total, stats)


METHOD = Method(name="neumann", function=neumann, summary="truncated Neumann series α Σ (I − αA)^j v",
                settings=(ITERATIONS, STEP, DAMPING))
