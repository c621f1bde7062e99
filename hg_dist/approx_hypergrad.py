"""Approximate implicit hypergradients: the seed library's functions, and :func:`make_approx`.

Every function takes ``(inner_obj, outer_obj, in_params, out_params, <settings>)``
and returns the hypergradient w.r.t. ``out_params`` as a tuple shaped like them
(a :class:`~hg_dist.hypergradient.Hypergradient`, which also carries ``.stats``)::

    dg/dφ = ∂g/∂φ − (∂²f/∂φ∂θ) · x,    x ≈ H⁻¹ ∂g/∂θ

They differ only in how ``x`` is computed (see :mod:`hg_dist.ihvp`). Two ways to
pick one:

* the seed's functions, e.g. ``functools.partial(nystrom, rank=5, rho=0.1)``;
* one value for any registered method, ``make_approx({"name": "nystrom", "rank": 5,
  "rho": 0.1}, seed=0)``, which checks the settings against the method's
  declaration (:data:`hg_dist.ihvp.METHODS`) once and returns an
  :class:`Approximator`, usable wherever the seed's partial is.

The keyword-only ``reduce`` lets the distributed layer turn every sum over data into
an allreduce.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hg_dist.hypergradient import Hypergradient, Reduce, implicit_hypergradient
from hg_dist.ihvp import METHODS, Method
from hg_dist.utils import Objective

__all__ = ["Approximator", "conjugate_gradient", "exact", "make_approx", "neumann", "nystrom", "nystrom_pcg"]


class Approximator:
    """A registered IHVP method with its settings bound: ``approx(inner_obj, outer_obj, θ, φ)``.

    Build it with :func:`make_approx`. Callable like the seed's
    ``functools.partial(nystrom, rank=5, rho=0.1)``, so it is what a solver's
    ``approx_ihvp`` takes.

    Attributes:
        spec: the normalized spec, ``{"name": ..., **every setting}`` (plain values).
        method: the registry entry.
        generator: the CPU generator a randomized method samples with (``None``:
            torch's global generator, or not randomized). Solvers checkpoint its state.
        reduce: the allreduce applied to every data reduction (``None`` in one process).
    """

    def __init__(self, spec: Mapping[str, Any], *, generator: torch.Generator | None = None,
                 reduce: Reduce | None = None) -> None:
        self.spec = METHODS.normalize(spec)
        self.method: Method = METHODS[self.spec["name"]]
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator if self.method.randomized else None
        self.reduce = reduce
        self._solve = self.method.bind(self.spec, self.generator)

    def with_reduce(self, reduce: Reduce | None) -> "Approximator":
        """The same approximator (sharing its generator) with ``reduce`` applied."""
        return Approximator(self.spec, generator=self.generator, reduce=reduce)

    def __call__(self, inner_obj: Objective, outer_obj: Objective, in_params: Sequence[Tensor],
                 out_params: Sequence[Tensor], *, reduce: Reduce | None = None) -> Hypergradient:
        return implicit_hypergradient(inner_obj, outer_obj, in_params, out_params, self._solve,
                                      reduce=reduce if reduce is not None else self.reduce)

    def __repr__(self) -> str:
        return f"Approximator({self.spec!r})"


def make_approx(spec: Mapping[str, Any], *, seed: int | None = None,
                generator: torch.Generator | None = None) -> Approximator:
    """An :class:`Approximator` for ``spec``, e.g. ``{"name": "nystrom", "rank": 10, "rho": 0.1}``.

    Settings left out take the method's declared defaults.

    Args:
        seed: seeds a new CPU generator for a randomized method (Nyström samples
            its columns with it); give every worker of a distributed run the same.
        generator: use this generator instead (not with ``seed``).

    Raises:
        ValueError: unknown method, a setting the method does not take, or a value
            out of range; the message names the method, the setting and the valid ones.
        TypeError: a value of the wrong type.
    """
    if seed is not None and generator is not None:
        raise ValueError("pass seed= or generator=, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return Approximator(spec, generator=generator)


def _hypergradient(spec: dict[str, Any], inner_obj: Objective, outer_obj: Objective, in_params: Sequence[Tensor],
                   out_params: Sequence[Tensor], generator: torch.Generator | None,
                   reduce: Reduce | None) -> Hypergradient:
    return Approximator(spec, generator=generator)(inner_obj, outer_obj, in_params, out_params, reduce=reduce)


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
    return _hypergradient({"name": "cg", "num_iters": num_iters, "lr": lr, "rho": rho},
                          inner_obj, outer_obj, in_params, out_params, None, reduce)


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
    return _hypergradient({"name": "neumann", "num_iters": num_iters, "lr": lr, "rho": rho},
                          inner_obj, outer_obj, in_params, out_params, None, reduce)


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
    return _hypergradient({"name": "nystrom", "rank": rank, "rho": rho},
                          inner_obj, outer_obj, in_params, out_params, generator, reduce)


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
    return _hypergradient({"name": "nystrom_pcg", "rank": rank, "num_iters": num_iters, "rho": rho},
                          inner_obj, outer_obj, in_params, out_params, generator, reduce)


def exact(inner_obj: Objective,
          outer_obj: Objective,
          in_params: Sequence[Tensor],
          out_params: Sequence[Tensor],
          rho: float = 0.0,
          *,
          reduce: Reduce | None = None,
          ) -> Hypergradient:
    """Hypergradient with ``x = (H + ρI)⁻¹ v`` from the dense Hessian (small problems only)."""
    return _hypergradient({"name": "exact", "rho": rho}, inner_obj, outer_obj, in_params, out_params, None, reduce)
