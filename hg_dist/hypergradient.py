"""Implicit hypergradients from any IHVP method.

Inner problem ``θ*(φ) = argmin_θ f(θ, φ)``, outer loss ``g(θ, φ)``. At ``θ ≈ θ*``::

    dg/dφ = ∂g/∂φ − (∂²f/∂φ∂θ) · x,     x ≈ H⁻¹ ∂g/∂θ,   H = ∂²f/∂θ²

:func:`implicit_hypergradient` computes ``∂g/∂θ`` and ``∂g/∂φ`` (one outer
gradient), linearizes ``∇_θ f`` once, hands the Hessian operator to an IHVP method
and finishes with one VJP for the mixed term through the same saved graph
(:attr:`~hg_dist.hessian.HessianOperator.mixed`). Cost: one outer gradient, one
inner gradient, the products the method needs, one VJP.

Data-parallel use: pass ``reduce`` (e.g. an allreduce-mean). It is applied to
``∂g/∂θ``, to every Hessian product and to the final hypergradient, which is all a
data-parallel solve needs when ``f`` and ``g`` are means over equally sized shards;
a method that makes ``m`` operator calls then costs ``m + 2`` rounds.

Checks. ``∂g/∂θ`` and ``∂g/∂φ`` are checked for NaN/inf (after ``reduce``, so every
worker decides alike) *before* the solve, the IHVP methods check the Hessian
products before their linear algebra, and the solution, the mixed term and the
result are checked at the end: each a :class:`NonFiniteHypergradientError` naming
the term (two host syncs per hypergradient besides the method's own).

Dtypes. float32 and float64 parameters are solved in their own dtype. float16 and
bfloat16 parameters keep the objectives (and so every gradient and Hessian
product) in their dtype, but the IHVP method works on float32 vectors (its dot
products, accumulations and ``k×k`` solves, which torch does not offer in half
precision), and the result is cast back to the parameters' dtype.

Autograd. The hypergradient is a value, not a function of the inputs' graphs: the
parameters are detached on entry, so the result never requires grad and is the
same whether ``in_params``/``out_params`` require grad, are leaves or not (e.g. an
``nn.Module``'s own parameters), or share one tensor between two entries. To
differentiate *through* the inner steps, use
:class:`~hg_dist.unrolled.BaseUnrolledSolver`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad

from hg_dist._checks import HALF_DTYPES, SUPPORTED_DTYPES, check_params  # noqa: F401  (re-exported)
from hg_dist.hessian import HessianOperator, in_dtype, linearize, mixed_vjp
from hg_dist.ihvp import IHVPResult, IHVPStats
from hg_dist.ihvp._errors import RHO, RHS_HINT, NonFiniteHypergradientError, check_finite, ihvp_advice
from hg_dist.utils import Objective, Params, params_to_vector, vector_to_params

__all__ = ["Hypergradient", "IHVPSolve", "NonFiniteHypergradientError", "Reduce", "check_params",
           "implicit_hypergradient"]

IHVPSolve = Callable[[HessianOperator, Tensor], IHVPResult]
"""An IHVP method with its settings bound: ``(op, v) -> IHVPResult``."""

Reduce = Callable[[Tensor], Tensor]
"""A reduction over data shards, e.g. an allreduce-mean; identity in one process."""




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


def _reduced(op: HessianOperator, reduce: Reduce) -> HessianOperator:
    return HessianOperator(matvec=lambda v: reduce(op.matvec(v)),
                           matmat=lambda v: reduce(op.matmat(v)),
                           size=op.size, rows=None if op.rows is None else (lambda k: reduce(op.rows(k))))


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
        A :class:`Hypergradient` shaped like ``out_params``, with the solve's stats; its
        tensors never require grad (see "Autograd" in the module docstring).

    Raises:
        NonFiniteHypergradientError: naming the term that went NaN/inf (``v`` and ``∂g/∂φ``
            are checked before the solve).
        IHVPDivergenceError: from ``solve`` (CG or Neumann diverged), naming the setting.
        TypeError: parameters of an unsupported dtype (float64, float32, float16 and
            bfloat16 work), on the meta device, or mixing dtypes/devices.
    """
    in_params, out_params = check_params(in_params, out_params)
    in_params, out_params = tuple(t.detach() for t in in_params), tuple(t.detach() for t in out_params)
    inner_obj = _scalar_objective(inner_obj, "inner_obj")
    outer_obj = _scalar_objective(outer_obj, "outer_obj")
    dtype = in_params[0].dtype
    work = torch.float32 if dtype in HALF_DTYPES else dtype

    grad_theta, grad_phi = grad(outer_obj, argnums=(0, 1))(in_params, out_params)
    v = params_to_vector(grad_theta).to(work)
    grad_phi = params_to_vector(grad_phi).to(work)
    op = base = linearize(inner_obj, in_params, out_params)
    if work != dtype:
        op = in_dtype(op, dtype, work)
    if reduce is not None:
        v = reduce(v)
        op = _reduced(op, reduce)
    check_finite({"the outer gradient w.r.t. the inner params (v = ∂g/∂θ)": v,
                  "the outer gradient w.r.t. the outer params (∂g/∂φ)": grad_phi},
                 "before the IHVP solve", RHS_HINT)
    mixed_of = base.mixed if base.mixed is not None else (lambda x: mixed_vjp(inner_obj, in_params, out_params, x))
    x, stats = solve(op, v)
    del op, base  # without a mixed term of its own, free the operator's graph before mixed_vjp builds one
    mixed = params_to_vector(mixed_of(x.to(dtype))).to(work)
    del mixed_of
    hypergrad = grad_phi - mixed
    if reduce is not None:
        hypergrad = reduce(hypergrad)
    solution = f"the IHVP solution x ({stats.method})"
    check_finite({solution: x, "the mixed term ∂²f/∂φ∂θ·x": mixed, "the hypergradient": hypergrad},
                 "after the IHVP solve",
                 {solution: "the IHVP diverged: lower the Neumann step lr or raise rho",
                  "the mixed term ∂²f/∂φ∂θ·x": "the inner loss's mixed derivative ∂²f/∂φ∂θ is NaN/inf at "
                                               "the current parameters, or x overflowed; raise rho",
                  "the hypergradient": "it overflowed; raise rho"},
                 {solution: (RHO, ihvp_advice("lr")), "the mixed term ∂²f/∂φ∂θ·x": (RHO,),
                  "the hypergradient": (RHO,)})
    return Hypergradient(vector_to_params(hypergrad.to(out_params[0].dtype), out_params), stats)
