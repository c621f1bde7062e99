"""Approximate implicit hypergradients, with the seed library's signatures.

Every function takes ``(inner_obj, outer_obj, in_params, out_params, <settings>)``
and returns the hypergradient w.r.t. ``out_params`` as a tuple shaped like them
(a :class:`~hg_dist.hypergradient.Hypergradient`, which also carries ``.stats``)::

    dg/dφ = ∂g/∂φ − (∂²f/∂φ∂θ) · x,    x ≈ H⁻¹ ∂g/∂θ

They differ only in how ``x`` is computed (see :mod:`hg_dist.ihvp`). Use them in a
solver as ``functools.partial(nystrom, rank=5, rho=0.1)``. The keyword-only
``reduce`` lets the distributed layer turn every sum over data into an allreduce.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from hg_dist import ihvp
from hg_dist._checks import check_float, check_int
from hg_dist.hypergradient import Hypergradient, Reduce, implicit_hypergradient
from hg_dist.utils import Objective

__all__ = ["APPROXIMATORS", "conjugate_gradient", "exact", "neumann", "nystrom", "nystrom_pcg"]


def conjugate_gradient(inner_obj: Objective,
                       outer_obj: Objective,
                       in_params: Sequence[Tensor],
                       out_params: Sequence[Tensor],
                       num_iters: int,
                       lr: float = 1.0,
                       *,
                       rho: float = 0.0,
                       reduce: Reduce | None = None,
                       ) -> Hypergradient:
    """Hypergradient with ``x`` from ``num_iters`` conjugate-gradient iterations on ``(H + ρI) x = v``.

    ``lr`` (``> 0``) is kept for the seed's signature: CG's iterates do not depend
    on a step size (the seed's recurrence used it inconsistently), so any value
    gives the same ``x``. Cost: ``num_iters`` Hessian products.
    """
    check_float("lr", lr, positive=True)
    num_iters = check_int("num_iters", num_iters, minimum=1)
    return implicit_hypergradient(inner_obj, outer_obj, in_params, out_params,
                                  functools.partial(ihvp.cg, num_iters=num_iters, rho=rho), reduce=reduce)


def neumann(inner_obj: Objective,
            outer_obj: Objective,
            in_params: Sequence[Tensor],
            out_params: Sequence[Tensor],
            num_iters: int,
            lr: float,
            *,
            rho: float = 0.0,
            reduce: Reduce | None = None,
            ) -> Hypergradient:
    """Hypergradient with ``x = lr · Σ_{j=0}^{num_iters} (I − lr·(H + ρI))^j v``.

    Converges as ``num_iters`` grows when ``0 < lr < 2/λ_max(H + ρI)``.
    Cost: ``num_iters`` Hessian products.
    """
    check_float("lr", lr, positive=True, hint="use a step below 2/λ_max of the inner Hessian")
    num_iters = check_int("num_iters", num_iters, minimum=1)
    return implicit_hypergradient(inner_obj, outer_obj, in_params, out_params,
                                  functools.partial(ihvp.neumann, num_iters=num_iters, alpha=lr, rho=rho),
                                  reduce=reduce)


def nystrom(inner_obj: Objective,
            outer_obj: Objective,
            in_params: Sequence[Tensor],
            out_params: Sequence[Tensor],
            rank: int,
            rho: float,
            *,
            generator: torch.Generator | None = None,
            reduce: Reduce | None = None,
            ) -> Hypergradient:
    """Hypergradient with ``x = (C W⁺ Cᵀ + ρI)⁻¹ v`` from ``rank`` sampled Hessian columns.

    Cost: ``rank`` Hessian products in one batched call and a ``rank×rank`` solve.
    """
    check_float("rho", rho, positive=True, hint="Nyström divides by rho; use e.g. rho=0.1")
    check_int("rank", rank, minimum=1)
    return implicit_hypergradient(inner_obj, outer_obj, in_params, out_params,
                                  functools.partial(ihvp.nystrom, rank=rank, rho=rho, generator=generator),
                                  reduce=reduce)


def nystrom_pcg(inner_obj: Objective,
                outer_obj: Objective,
                in_params: Sequence[Tensor],
                out_params: Sequence[Tensor],
                rank: int,
                num_iters: int,
                rho: float = 0.0,
                *,
                generator: torch.Generator | None = None,
                reduce: Reduce | None = None,
                ) -> Hypergradient:
    """Hypergradient with ``x`` from CG on ``(H + ρI) x = v``, preconditioned by rank-``rank`` Nyström.

    Cost: ``rank`` products in one batched call, then ``num_iters`` products.
    """
    check_int("rank", rank, minimum=1)
    num_iters = check_int("num_iters", num_iters, minimum=1)
    return implicit_hypergradient(inner_obj, outer_obj, in_params, out_params,
                                  functools.partial(ihvp.nystrom_pcg, rank=rank, num_iters=num_iters,
                                                    rho=rho, generator=generator),
                                  reduce=reduce)


def exact(inner_obj: Objective,
          outer_obj: Objective,
          in_params: Sequence[Tensor],
          out_params: Sequence[Tensor],
          rho: float = 0.0,
          *,
          reduce: Reduce | None = None,
          ) -> Hypergradient:
    """Hypergradient with ``x = (H + ρI)⁻¹ v`` from the dense Hessian (small problems only)."""
    return implicit_hypergradient(inner_obj, outer_obj, in_params, out_params,
                                  functools.partial(ihvp.exact, rho=rho), reduce=reduce)


APPROXIMATORS: dict[str, Callable[..., Hypergradient]] = {
    "nystrom": nystrom,
    "cg": conjugate_gradient,
    "neumann": neumann,
    "nystrom_pcg": nystrom_pcg,
    "exact": exact,
}
"""Approximators by name, for command lines and search spaces."""
