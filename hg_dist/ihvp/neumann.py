"""Truncated Neumann series for ``(H + ρI)⁻¹ v``, with divergence detection.

With ``A = H + ρI`` and step ``α``::

    x = α Σ_{j=0}^{n} (I − αA)^j v

which converges to ``A⁻¹ v`` as ``n → ∞`` iff the spectral radius of ``I − αA`` is
below one; for SPD ``A`` that is ``0 < α < 2/λ_max(A)``. Costs ``n`` products.

Divergence. ``A`` is symmetric, so when ``0 < α ≤ 2/λ_max(A)`` and ``A ⪰ 0`` the
eigenvalues of ``I − αA`` lie in ``[−1, 1]`` and the terms' norms
``‖(I − αA)^j v‖`` never increase. Growth therefore proves ``α > 2/λ_max`` or an
indefinite ``A``: the method records every term's norm and, if some term grew
to more than :data:`GROWTH_LIMIT` times the smallest before it (floored at
``ε‖v‖``, where a converged series is rounding noise), or went NaN/inf after
finite growth, raises :class:`~hg_dist.ihvp.IHVPDivergenceError` naming
``lr < 2/λ_max`` with a Lanczos estimate of ``λ_max`` (or warns, with
``on_divergence="warn"``). The factor 2 leaves room for rounding (the products
may be half precision) while a genuinely diverging series, whose terms grow
geometrically, crosses it within a few terms; a series growing by less than 2×
over its whole budget has an error of the size of the truncation error anyway.

Stagnation. A step far below ``1/λ`` does not diverge but gets nowhere: after
``n`` products each eigen-component of the sum is ``α(n + 1)`` times ``v``'s instead
of ``1/λ`` times, so with ``lr=1e-300`` the result is zero in all but name. The
first product gives ``ρ_v = ‖Av‖/‖v‖``, a weighted mean of ``A``'s eigenvalues over
``v``; when ``α (n + 1) ρ_v <`` :data:`MIN_PROGRESS` the series has covered less than
that fraction of the way to ``A⁻¹v`` along ``v`` and the method raises the same
:class:`~hg_dist.ihvp.IHVPDivergenceError` (or warns), naming ``lr`` and the range
``(0, 2/λ_max)`` with an estimate of ``λ_max``.

Synchronisation: the norms stay on the device (one small reduction per term)
and are read once, at the end — one host–device sync per solve instead of one
per iteration (checking every ``k`` iterations would still cost ``n/k`` syncs
and stopping early saves nothing a correct setting needs). The price is that a
diverging series runs its whole budget before the error is raised. The extra
products of the estimate (and one product to tell overflow from a NaN
operator) are made only when the check fails.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hg_dist.hessian import HessianOperator, shifted
from hg_dist.ihvp._errors import (INNER_LR, PRODUCTS_HINT, RHS_HINT, IHVPDivergenceError,
                                  NonFiniteHypergradientError, ihvp_advice, suggest_rho,
                                  check_on_divergence, report_divergence)
from hg_dist.ihvp._method import DAMPING, ITERATIONS, Method, checks_rhs
from hg_dist.ihvp._result import IHVPResult, IHVPStats
from hg_dist.ihvp.spectrum import estimate_spectrum
from hg_dist.registry import Setting

STEP = Setting("lr", float, 0.1, "Neumann step α; the series converges for α < 2/λ_max(H + ρI)",
               minimum=0.0, exclusive_minimum=True, flag="ihvp-lr", argument="alpha",
               hint="use a step below 2/λ_max of the inner Hessian")

GROWTH_LIMIT = 2.0
"""A term more than this many times the smallest term before it means divergence."""

MIN_PROGRESS = 1e-6
"""``α (n + 1) ‖Av‖/‖v‖`` below this means the step is too small for the series to get anywhere.

Deliberately low: a short series with a small step is ``≈ α(n + 1) v``, a scaled-identity
approximation of ``A⁻¹`` that some use on purpose with a scale-invariant outer optimizer
(Adam); a millionth of the way is no approximation at all (and in float32 it underflows)."""


@checks_rhs
def neumann(op: HessianOperator, v: Tensor, num_iters: int, alpha: float, *, rho: float = 0.0,
            on_divergence: str = "raise") -> IHVPResult:
    """Approximate ``(H + ρI)⁻¹ v`` by ``num_iters`` Neumann terms with step ``alpha``.

    Args:
        op: the Hessian ``H`` as an operator.
        v: right-hand side, shape ``(p,)``.
        num_iters: ``n >= 1``, the number of products.
        alpha: step ``α > 0``; must be below ``2/λ_max(H + ρI)`` to converge.
        rho: damping ``ρ >= 0``.
        on_divergence: ``"raise"`` (default) or ``"warn"`` (an
            :class:`~hg_dist.ihvp.IHVPDivergenceWarning`, and the diverged sum is returned).

    Raises:
        IHVPDivergenceError: the terms grew (see the module docstring); the message
            names ``lr < 2/λ_max`` with an estimate of ``λ_max``, or ``rho`` when
            ``H + ρI`` is indefinite.
        NonFiniteHypergradientError: ``v`` or the Hessian products are NaN/inf.
    """
    num_iters = ITERATIONS.check(num_iters, "neumann")
    alpha = STEP.check(alpha, "neumann", name="alpha")
    rho = DAMPING.check(rho, "neumann")
    check_on_divergence(on_divergence)
    a = shifted(op, rho)
    term = v.clone()                 # updated in place: no p-sized temporaries besides the product
    total = v.clone()
    norms = [torch.linalg.vector_norm(v)]
    first_product = None
    for _ in range(num_iters):
        product = a.matvec(term)
        if first_product is None:
            first_product = torch.linalg.vector_norm(product)    # ‖Av‖, for the stagnation check
        term.add_(product, alpha=-alpha)   # term ← (I − αA) term
        total.add_(term)
        norms.append(torch.linalg.vector_norm(term))
    stats = IHVPStats(method="neumann", num_hvps=num_iters, num_operator_calls=num_iters, iterations=num_iters)
    _check_terms(a, v, torch.stack(norms), first_product, alpha, rho, on_divergence)
    return IHVPResult(total.mul_(alpha), stats)


def _check_terms(a: HessianOperator, v: Tensor, norms: Tensor, first_product: Tensor, alpha: float, rho: float,
                 on_divergence: str) -> None:
    """Raise (or warn) if ``v`` is not finite, the terms' ``norms`` grew or the series stagnated; one host sync."""
    finite = norms.isfinite()
    smallest = torch.cummin(torch.where(finite, norms, torch.full_like(norms, torch.inf)), dim=0).values
    # Below eps·‖v‖ a converged series is rounding noise (subnormals round coarsely): measure growth from there.
    smallest = torch.maximum(smallest, torch.finfo(norms.dtype).eps * norms[0])
    growth = torch.where(finite & (smallest > 0), norms / torch.where(smallest > 0, smallest, 1),
                         torch.ones_like(norms))
    v_finite, all_finite, max_growth, v_norm, product_norm = torch.stack(
        [v.isfinite().all().to(norms.dtype), finite.all().to(norms.dtype), growth.max(), norms[0],
         first_product.to(norms.dtype)]).tolist()
    if not v_finite:
        raise NonFiniteHypergradientError(f"non-finite values in the right-hand side v (neumann); {RHS_HINT}")
    if all_finite and max_growth <= GROWTH_LIMIT:
        n = len(norms) - 1
        if v_norm > 0 and math.isfinite(product_norm) and alpha * (n + 1) * product_norm < MIN_PROGRESS * v_norm:
            report_divergence(_stagnation_error(a, v, alpha, rho, n, product_norm / v_norm), on_divergence)
        return
    if not all_finite and max_growth <= GROWTH_LIMIT:
        # NaN/inf without visible growth first: a NaN operator, or a term that overflowed at once.
        unit = v / torch.linalg.vector_norm(v)
        if not bool(a.matvec(unit).isfinite().all()):
            raise NonFiniteHypergradientError(f"non-finite values in the Hessian-vector products (neumann); "
                                              f"{PRODUCTS_HINT}", advice=(INNER_LR,))
    report_divergence(_divergence_error(a, v, norms, alpha, rho, max_growth), on_divergence)


def _stagnation_error(a: HessianOperator, v: Tensor, alpha: float, rho: float, n: int,
                      rayleigh: float) -> IHVPDivergenceError:
    progress = alpha * (n + 1) * rayleigh
    head = (f"the Neumann series made no progress: with lr={alpha:g} and {n} products it covers "
            f"lr·(n+1)·‖Av‖/‖v‖ = {progress:.3g} of the way to A⁻¹v (A = H + ρI, rho={rho:g}), so the result is "
            f"about {progress:.3g} times the solution (near zero). lr is far too small for this Hessian; the series "
            f"converges for lr in (0, 2/λ_max(A))")
    try:
        lam_min, lam_max, steps = estimate_spectrum(a, v)
    except (ArithmeticError, RuntimeError):
        lam_min, lam_max, steps = None, rayleigh, 0
    if lam_max is None or not lam_max > 0:
        return IHVPDivergenceError(f"{head}; raise lr towards 1/λ_max(A)", method="neumann")
    where = f"λ_max(A) ≈ {lam_max:.3g} ({steps} Lanczos products)" if steps else f"‖Av‖/‖v‖ ≈ {lam_max:.3g}"
    return IHVPDivergenceError(f"{head}; {where}, so use lr in (0, {2 / lam_max:.3g}), e.g. lr={1 / lam_max:.2g}",
                               method="neumann", lambda_min=lam_min, lambda_max=lam_max)


def _divergence_error(a: HessianOperator, v: Tensor, norms: Tensor, alpha: float, rho: float,
                      max_growth: float) -> IHVPDivergenceError:
    n = len(norms) - 1
    grew = (f"grew {max_growth:.3g}× over {n} products" if max_growth > GROWTH_LIMIT and max_growth != float("inf")
            else f"grew to NaN/inf within {n} products")
    head = (f"the Neumann series diverged: its terms ‖(I − lr·A)^j v‖ (A = H + ρI, lr={alpha:g}, rho={rho:g}) "
            f"{grew}. It converges only for lr < 2/λ_max(A) with A positive definite")
    try:
        lam_min, lam_max, steps = estimate_spectrum(a, v)
    except (ArithmeticError, RuntimeError):
        return IHVPDivergenceError(f"{head}; lower lr or use cg or nystrom", method="neumann",
                                   advice=(ihvp_advice("lr"),))
    estimate = f"λ_min(A) ≈ {lam_min:.3g}, λ_max(A) ≈ {lam_max:.3g} ({steps} Lanczos products)"
    if lam_min <= 0:
        suggestion = suggest_rho(rho, lam_min, lam_max)
        advice = (f"{estimate}: A is not positive definite (the inner problem is not convex here), so no lr makes "
                  f"the series converge; raise rho above {rho - lam_min:.3g} (e.g. rho={suggestion:.2g}), or use "
                  f"nystrom")
        setting = ihvp_advice("rho", suggestion)
    else:
        suggestion = min(1 / lam_max, alpha / 2)  # the estimate is a lower bound of λ_max
        advice = f"{estimate}, so use lr < 2/λ_max ≈ {2 / lam_max:.3g}, e.g. lr={suggestion:.2g}"
        setting = ihvp_advice("lr", suggestion)
    return IHVPDivergenceError(f"{head}; {advice}", method="neumann", lambda_min=lam_min, lambda_max=lam_max,
                               advice=(setting,))


METHOD = Method(name="neumann", function=neumann, summary="truncated Neumann series α Σ (I − αA)^j v",
                settings=(ITERATIONS, STEP, DAMPING))
