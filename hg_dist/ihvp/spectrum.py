"""Cheap estimates of the extreme eigenvalues of a Hessian operator (Lanczos).

Neumann's step must satisfy ``lr < 2/λ_max(H + ρI)``, and CG and Neumann need
``H + ρI`` positive definite (``ρ > −λ_min(H)``). Both bounds come from ``m``
Lanczos steps, ``m`` products in all — the cost of ``m`` power iterations, but
far more accurate: from a start vector ``q₁`` (``‖q₁‖ = 1``)::

    w = H q_j − β_{j−1} q_{j−1},   α_j = q_jᵀ w,   w ← w − α_j q_j,   β_j = ‖w‖,   q_{j+1} = w / β_j

and the eigenvalues of the ``m×m`` tridiagonal ``T = tridiag(β, α, β)`` (Ritz
values) approximate the extremes of ``H``'s spectrum from inside: after ``m``
steps the top Ritz value's error shrinks like a Chebyshev polynomial of degree
``m`` (the power method's like ``(λ₂/λ₁)^m``). Ritz values never leave
``[λ_min, λ_max]``, so ``λ_max`` is under-estimated, never over: a step
``lr = 1/λ̂_max`` stays below ``2/λ_max`` unless ``λ̂_max < λ_max/2``.

No reorthogonalisation: losing orthogonality makes copies of converged Ritz
values, which does not move the extremes, and keeps memory at three vectors.
The start vector comes from a fixed-seed CPU generator by default, so every worker
of a distributed run (whose operator allreduces) makes the same products, and the
global random state is untouched.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from hg_dist._checks import check_int
from hg_dist.hessian import HessianOperator
from hg_dist.ihvp._errors import PRODUCTS_HINT, NonFiniteHypergradientError

__all__ = ["SpectrumEstimate", "estimate_lambda_max", "estimate_spectrum"]

DEFAULT_STEPS = 20
"""Lanczos steps (products) of an estimate when not told otherwise."""


class SpectrumEstimate(NamedTuple):
    """Ritz estimates of ``λ_min`` and ``λ_max`` after ``steps`` Lanczos steps (products)."""

    lambda_min: float
    lambda_max: float
    steps: int


def _work_dtype(like: Tensor) -> torch.dtype:
    return like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32


def estimate_spectrum(op: HessianOperator, like: Tensor, iters: int = DEFAULT_STEPS, *,
                      generator: torch.Generator | None = None) -> SpectrumEstimate:
    """Estimate the smallest and largest eigenvalues of the symmetric ``op`` by ``iters`` Lanczos steps.

    Args:
        op: a symmetric ``p×p`` operator, e.g. :func:`hg_dist.hessian.linearize`'s.
        like: a tensor with the dtype and device of the vectors ``op`` takes.
        iters: Lanczos steps, ``>= 1`` (capped at ``p``); one product each.
        generator: CPU generator for the start vector (default: a fixed seed).

    Returns:
        :class:`SpectrumEstimate`; both values lie inside ``[λ_min, λ_max]``.

    Raises:
        NonFiniteHypergradientError: the operator's products are NaN/inf.
    """
    iters = check_int("iters", iters, minimum=1, hint="use e.g. 20 (one product each)")
    steps = min(iters, op.size)
    dtype = _work_dtype(like)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    q = torch.randn(op.size, generator=generator, dtype=dtype).to(like.device)
    q = q / torch.linalg.vector_norm(q)
    q_prev = torch.zeros_like(q)
    beta = torch.zeros((), dtype=dtype, device=like.device)
    alphas, betas = [], []
    for _ in range(steps):
        w = op.matvec(q) - beta * q_prev
        alpha = torch.dot(w, q)
        w = w - alpha * q
        beta = torch.linalg.vector_norm(w)
        alphas.append(alpha)
        betas.append(beta)
        # A zero β means an invariant subspace was found; the steps after it are cut below.
        q_prev, q = q, w / torch.where(beta > 0, beta, torch.ones_like(beta))
    coefficients = torch.stack(alphas + betas).double().cpu()  # the one host sync
    a, b = coefficients[:steps], coefficients[steps:]
    if not bool(coefficients.isfinite().all()):
        raise NonFiniteHypergradientError(f"non-finite values in the Hessian-vector products of the Lanczos "
                                          f"eigenvalue estimate; {PRODUCTS_HINT}")
    # A β that vanished (w = 0 exactly: an invariant subspace) zeroed the next q; cut T there. A merely
    # tiny β is harmless: the next q is a new direction, and T's eigenvalues stay inside the spectrum.
    zero = b[:-1] <= torch.finfo(dtype).tiny
    m = int(zero.nonzero()[0]) + 1 if bool(zero.any()) else steps
    tridiagonal = torch.diag(a[:m]) + torch.diag(b[:m - 1], 1) + torch.diag(b[:m - 1], -1)
    ritz = torch.linalg.eigvalsh(tridiagonal)
    return SpectrumEstimate(float(ritz[0]), float(ritz[-1]), m)


def estimate_lambda_max(op: HessianOperator, like: Tensor, iters: int = DEFAULT_STEPS, *,
                        generator: torch.Generator | None = None) -> float:
    """Estimate ``λ_max`` of the symmetric ``op`` from ``iters`` Lanczos steps (see :func:`estimate_spectrum`).

    A lower bound that is close after a few steps; ``2/λ_max`` bounds Neumann's step.
    """
    return estimate_spectrum(op, like, iters, generator=generator).lambda_max
