"""Implicit hypergradients from any IHVP method.

Inner problem ``θ*(φ) = argmin_θ f(θ, φ)``, outer loss ``g(θ, φ)``. At ``θ ≈ θ*``::

    dg/dφ = ∂g/∂φ − (∂²f/∂φ∂θ) · x,     x ≈ H⁻¹ ∂g/∂θ,   H = ∂²f/∂θ²

:func:`implicit_hypergradient` computes ``∂g/∂θ`` and ``∂g/∂φ`` (one outer
gradient), linearizes ``∇_θ f`` once, hands the Hessian operator to an IHVP method
and finishes with one VJP for the mixed term. Cost floor: one outer gradient, one
inner gradient, the products the method needs, one VJP.

Data-parallel use: pass ``reduce`` (e.g. an allreduce-mean). It is applied to
``∂g/∂θ``, to every Hessian product and to the final hypergradient, which is all a
data-parallel solve needs when ``f`` and ``g`` are means over equally sized shards;
a method that makes ``m`` operator calls then costs ``m + 2`` rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad

from hg_dist.hessian import HessianOperator, linearize, mixed_vjp
from hg_dist.ihvp import IHVPResult, IHVPStats
from hg_dist.utils import Objective, Params, params_to_vector, vector_to_params

IHVPSolve = Callable[[HessianOperator, Tensor], IHVPResult]
"""An IHVP method with its settings bound: ``(op, v) -> IHVPResult``."""

Reduce = Callable[[Tensor], Tensor]
"""A reduction over data shards, e.g. an allreduce-mean; identity in one process."""


class NonFiniteHypergradientError(FloatingPointError):
    """A term of the hypergradient was NaN or infinite."""


class Hypergradient(tuple):
    """The hypergradient w.r.t. ``out_params``: a tuple shaped like them, plus ``.stats``.

    Being a plain tuple, it can be used wherever the seed library returned ``Params``.
    """

    stats: IHVPStats

    def __new__(cls, grads: Sequence[Tensor], stats: IHVPStats) -> "Hypergradient":
        self = super().__new__(cls, tuple(grads))
        self.stats = stats
        return self

    def __reduce__(self):
        return (Hypergradient, (tuple(self), self.stats))


def _scalar_objective(objective: Objective, name: str) -> Objective:
    def checked(in_params: Params, out_params: Params) -> Tensor:
        value = objective(in_params, out_params)
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must return a torch.Tensor loss, got {type(value).__name__}")
        if value.numel() != 1:
            raise ValueError(f"{name} must return a scalar loss, got shape {tuple(value.shape)}; "
                             f"reduce it with .mean() or .sum()")
        return value.reshape(())

    return checked


def check_params(in_params: Sequence[Tensor], out_params: Sequence[Tensor]) -> tuple[Params, Params]:
    """Return both as tuples; raise if they are empty, not tensors, or mix dtypes/devices."""
    checked = []
    for name, params in (("in_params", in_params), ("out_params", out_params)):
        if isinstance(params, Tensor) or not isinstance(params, Sequence):
            raise TypeError(f"{name} must be a tuple of tensors (e.g. from make_functional), "
                            f"got {type(params).__name__}")
        if len(params) == 0:
            raise ValueError(f"{name} is empty; the {'inner' if name == 'in_params' else 'outer'} "
                             f"model needs at least one parameter")
        for i, t in enumerate(params):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}] has dtype {t.dtype}; parameters must be floating point")
        checked.append(tuple(params))
    reference = checked[0][0]
    for name, params in zip(("in_params", "out_params"), checked):
        for i, t in enumerate(params):
            if t.dtype != reference.dtype or t.device != reference.device:
                raise TypeError(f"{name}[{i}] is {t.dtype} on {t.device} but in_params[0] is "
                                f"{reference.dtype} on {reference.device}; move both models to one "
                                f"dtype and device (e.g. .to(torch.float64))")
    return checked[0], checked[1]


def _check_finite(terms: dict[str, Tensor]) -> None:
    finite = torch.stack([t.isfinite().all() for t in terms.values()]).tolist()  # one host sync
    bad = [name for name, ok in zip(terms, finite) if not ok]
    if bad:
        raise NonFiniteHypergradientError(
            f"non-finite values in {', '.join(bad)}; the inner or outer loss is NaN/inf at the "
            f"current parameters or the IHVP diverged (lower the Neumann step, raise rho, or "
            f"lower the learning rates)")


def _reduced(op: HessianOperator, reduce: Reduce) -> HessianOperator:
    return HessianOperator(matvec=lambda v: reduce(op.matvec(v)),
                           matmat=lambda v: reduce(op.matmat(v)),
                           size=op.size)


def implicit_hypergradient(inner_obj: Objective,
                           outer_obj: Objective,
                           in_params: Sequence[Tensor],
                           out_params: Sequence[Tensor],
                           solve: IHVPSolve,
                           *,
                           reduce: Reduce | None = None,
                           ) -> Hypergradient:
    """``dg/dφ`` at ``(in_params, out_params)`` with the IHVP computed by ``solve``.

    Args:
        inner_obj: ``f(θ, φ)``, a scalar.
        outer_obj: ``g(θ, φ)``, a scalar.
        in_params: ``θ``, a tuple of tensors (``p`` scalars in all).
        out_params: ``φ``, a tuple of tensors.
        solve: ``(op, v) -> IHVPResult``, e.g. ``functools.partial(hg_dist.ihvp.cg, num_iters=20)``.
        reduce: reduction over data shards (see the module docstring), or ``None``.

    Returns:
        A :class:`Hypergradient` shaped like ``out_params``, with the solve's stats.

    Raises:
        NonFiniteHypergradientError: naming the term that went NaN/inf.
    """
    in_params, out_params = check_params(in_params, out_params)
    inner_obj = _scalar_objective(inner_obj, "inner_obj")
    outer_obj = _scalar_objective(outer_obj, "outer_obj")

    grad_theta, grad_phi = grad(outer_obj, argnums=(0, 1))(in_params, out_params)
    v = params_to_vector(grad_theta)
    op = linearize(inner_obj, in_params, out_params)
    if reduce is not None:
        v = reduce(v)
        op = _reduced(op, reduce)
    x, stats = solve(op, v)
    mixed = params_to_vector(mixed_vjp(inner_obj, in_params, out_params, x))
    hypergrad = params_to_vector(grad_phi) - mixed
    if reduce is not None:
        hypergrad = reduce(hypergrad)
    _check_finite({"outer gradient w.r.t. inner params (v)": v,
                   "outer gradient w.r.t. outer params": params_to_vector(grad_phi),
                   f"IHVP solution x ({stats.method})": x,
                   "mixed term ∂²f/∂φ∂θ·x": mixed,
                   "hypergradient": hypergrad})
    return Hypergradient(vector_to_params(hypergrad, out_params), stats)
