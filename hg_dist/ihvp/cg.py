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

Divergence. CG needs ``A`` positive definite: every direction has curvature
``pⱼᵀA pⱼ > 0``. On an indefinite (or numerically singular) ``A`` some direction
has ``pⱼᵀA pⱼ / pⱼᵀpⱼ ≤ ε · max_{i≤j} pᵢᵀA pᵢ / pᵢᵀpᵢ`` (``ε`` the dtype's epsilon),
the step ``αⱼ`` has the wrong sign or is huge, and the iterates are garbage.
The Rayleigh quotient of each direction is kept on the device (two dot
products per iteration) and read, with the residual norm, in the one host sync
at the end; a non-positive one raises :class:`~hg_dist.ihvp.IHVPDivergenceError`
naming ``rho`` with a Lanczos estimate of ``λ_min`` (or warns, with
``on_divergence="warn"``). A NaN/inf solution with finite ``v`` means NaN/inf
Hessian products: :class:`~hg_dist.ihvp.NonFiniteHypergradientError`. An SPD
``A`` never trips the check (its Rayleigh quotients lie in ``[λ_min, λ_max]``,
so only ``κ(A) > 1/ε`` could, where CG gives no accuracy anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hg_dist._checks import check_float
from hg_dist.hessian import HessianOperator, shifted
from hg_dist.ihvp._errors import (INNER_LR, PRODUCTS_HINT, RHO, RHS_HINT, IHVPDivergenceError,
                                  NonFiniteHypergradientError, ihvp_advice, suggest_rho,
                                  check_on_divergence, report_divergence)
from hg_dist.ihvp._method import DAMPING, ITERATIONS, Method, checks_rhs
from hg_dist.ihvp._result import IHVPResult, IHVPStats
from hg_dist.ihvp.spectrum import estimate_spectrum
from hg_dist.registry import Setting


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, or 0 where ``den == 0`` (a converged recurrence)."""
    nonzero = den != 0
    return torch.where(nonzero, num / torch.where(nonzero, den, torch.ones_like(den)), torch.zeros_like(num))


@checks_rhs
def cg(op: HessianOperator,
       v: Tensor,
       num_iters: int,
       *,
       rho: float = 0.0,
       rtol: float | None = None,
       preconditioner: Callable[[Tensor], Tensor] | None = None,
       method: str = "cg",
       on_divergence: str = "raise",
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
        on_divergence: ``"raise"`` (default) or ``"warn"`` (an
            :class:`~hg_dist.ihvp.IHVPDivergenceWarning`, and the iterate is returned).

    Returns:
        :class:`IHVPResult`; ``stats.residual_norm`` is the recurrence's ``‖r‖``.

    Raises:
        IHVPDivergenceError: a direction of non-positive curvature (``H + ρI`` not
            positive definite); the message names ``rho`` and estimates ``λ_min``.
        NonFiniteHypergradientError: ``v`` or the Hessian products are NaN/inf.
    """
    num_iters = ITERATIONS.check(num_iters, method)
    rho = DAMPING.check(rho, method)
    check_on_divergence(on_divergence)
    a = shifted(op, rho)
    if rtol is not None:
        rtol = check_float("rtol", rtol, positive=True)
    precondition = preconditioner if preconditioner is not None else (lambda r: r)

    # In-place arithmetic: x, r, p are preallocated; each update is one fused kernel with a 0-d
    # (on-device) step size, so no p-sized temporaries and no host sync per iteration.
    x = torch.zeros_like(v)
    r = v.clone()
    z = precondition(r)              # aliases r without a preconditioner
    p = z.clone()
    rz = torch.dot(r, z)
    threshold = rtol * torch.linalg.vector_norm(v) if rtol is not None else None
    iterations = 0
    curvatures = []  # Rayleigh quotients pᵀAp / pᵀp of the directions (NaN for a zero direction)
    for _ in range(num_iters):
        ap = a.matvec(p)
        pap = torch.dot(p, ap)
        pp = torch.dot(p, p)
        curvatures.append(torch.where(pp > 0, pap / torch.where(pp > 0, pp, 1), torch.nan))
        alpha = _safe_div(rz, pap)
        x.addcmul_(p, alpha)                       # x ← x + α p
        r.addcmul_(ap, alpha, value=-1)            # r ← r − α A p
        iterations += 1
        if threshold is not None and bool(torch.linalg.vector_norm(r) <= threshold):
            break
        z = precondition(r)
        rz_new = torch.dot(r, z)
        beta = _safe_div(rz_new, rz)
        p.mul_(beta).add_(z)                       # p ← z + β p (in place; autograd allows it, unlike out=)
        rz = rz_new

    residual_norm = _check_solve(a, v, x, r, torch.stack(curvatures), rho, method, on_divergence)
    stats = IHVPStats(method=method, num_hvps=iterations, num_operator_calls=iterations,
                      iterations=iterations, residual_norm=residual_norm)
    return IHVPResult(x, stats)


def _check_solve(a: HessianOperator, v: Tensor, x: Tensor, r: Tensor, curvatures: Tensor, rho: float, method: str,
                 on_divergence: str) -> float:
    """``‖r‖`` after checking ``v``, ``x`` and the directions' ``curvatures``; one host sync when all is well."""
    seen = torch.where(curvatures.isfinite(), curvatures, -torch.inf)
    largest = torch.cummax(seen, dim=0).values
    bad = curvatures.isfinite() & (curvatures <= torch.finfo(curvatures.dtype).eps * largest)
    first = torch.argmax(bad.to(torch.uint8))  # 0 when none is bad
    residual, v_finite, x_finite, any_bad, first_bad, curvature = torch.stack([
        torch.linalg.vector_norm(r), v.isfinite().all().to(r.dtype), x.isfinite().all().to(r.dtype),
        bad.any().to(r.dtype), first.to(r.dtype), curvatures[first]]).tolist()
    if not v_finite:
        raise NonFiniteHypergradientError(f"non-finite values in the right-hand side v ({method}); {RHS_HINT}")
    if any_bad:
        report_divergence(_indefinite_error(a, v, int(first_bad), curvature, rho, method), on_divergence)
    elif not x_finite:
        raise NonFiniteHypergradientError(f"non-finite values in the Hessian-vector products ({method}); "
                                          f"{PRODUCTS_HINT}", advice=(INNER_LR,))
    return residual


def _indefinite_error(a: HessianOperator, v: Tensor, iteration: int, curvature: float, rho: float,
                      method: str) -> IHVPDivergenceError:
    head = (f"{method} diverged: the search direction of iteration {iteration + 1} has non-positive curvature "
            f"pᵀ(H + ρI)p / pᵀp = {curvature:.3g} (rho={rho:g}), so H + ρI is not positive definite (the inner "
            f"problem is not convex here, or H is singular) and CG's iterates are meaningless")
    try:
        lam_min, lam_max, steps = estimate_spectrum(a, v)
    except (ArithmeticError, RuntimeError):
        return IHVPDivergenceError(f"{head}; raise rho or use nystrom", method=method, advice=(RHO,))
    bound = min(lam_min, curvature)  # both bound λ_min(H + ρI) from above
    suggestion = suggest_rho(rho, bound, lam_max)
    return IHVPDivergenceError(
        f"{head}; λ_min(H + ρI) ≈ {bound:.3g} (Lanczos, {steps} products), so raise rho above "
        f"{rho - bound:.3g} (e.g. rho={suggestion:.2g}), or use nystrom", method=method, lambda_min=bound,
        lambda_max=lam_max, advice=(ihvp_advice("rho", suggestion),))


METHOD = Method(
    name="cg", function=cg, summary="conjugate gradient on (H + ρI) x = v",
    settings=(ITERATIONS,
              Setting("lr", float, 1.0, "kept for the seed's signature; CG's iterates do not depend on it",
                      minimum=0.0, exclusive_minimum=True, flag="ihvp-lr", argument=None),
              DAMPING))
