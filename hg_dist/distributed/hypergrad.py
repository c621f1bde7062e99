"""Distributed hypergradients and inner steps: the core's functions with an allreduce.

Data-parallel bilevel optimization keeps the parameters ``θ`` (inner) and ``φ``
(outer) identical on ``W`` replicas; replica ``r`` holds a shard of the data and
evaluates ``f_r, g_r``, and the full objectives are the means
``f = (1/W) Σ_r f_r``, ``g = (1/W) Σ_r g_r`` (exactly so for equally sized shards).
Every quantity the hypergradient needs is linear in ``f`` or ``g``::

    ∇_θ f = mean_r ∇_θ f_r                         (inner step: one round)
    ∂g/∂θ = mean_r ∂g_r/∂θ,   H V = mean_r H_r V     (one round per operator call)
    dg/dφ = mean_r (∂g_r/∂φ − ∂²f_r/∂φ∂θ · x)       (one round; x is the same everywhere)

so the core's :func:`~hg_dist.hypergradient.implicit_hypergradient` runs unchanged
given ``reduce=`` an allreduce-mean. Distributed Nyström calls the operator once
with all ``k`` columns (a ``p×k`` block, one round) and solves the ``k×k`` Woodbury
system locally on every rank (identical inputs give identical solutions), hence
3 rounds per hypergradient for every ``k``; CG and Neumann cost ``iterations + 2``.

Randomised methods (``Method.randomized``: Nyström, Nyström-PCG) must draw the
same columns on every rank: they need a generator in the same state everywhere. A
generator already bound (``make_approx(spec, seed=...)`` with the run's seed, the
same on every rank) is kept; when none is, :func:`distributed_approx` binds
``torch.Generator().manual_seed(seed)``. The solver's ``state_dict()`` saves it,
so a resumed run draws the same columns as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from hg_dist.collective import reduced_approx
from hg_dist.distributed.counting import CountingAllreduce
from hg_dist.hypergradient import Hypergradient


def distributed_approx(approx: Callable[..., Hypergradient], reduce: CountingAllreduce, *,
                       seed: int) -> Callable[..., Hypergradient]:
    """``approx_ihvp`` with ``reduce=`` bound (and a generator seeded with ``seed`` for randomised methods
    that have none); :func:`hg_dist.collective.reduced_approx` with a fixed seed, for code that calls
    the hypergradient functions directly rather than through a solver built with ``collective=``.

    Args:
        approx: an :class:`~hg_dist.approx_hypergrad.Approximator` (from ``make_approx``),
            or the seed's ``functools.partial`` of a function of :mod:`hg_dist.approx_hypergrad`
            (e.g. ``partial(nystrom, rank=5, rho=0.1)``).
        reduce: the allreduce-mean applied to ``∂g/∂θ``, every Hessian product and the
            hypergradient.
        seed: seeds the generator bound when a randomised method has none; must be
            the same on every rank.
    """
    return reduced_approx(approx, reduce, seed=lambda: int(seed))


class AllreduceGrads:
    """An inner optimizer ``(params, grads, state) -> (params, state)`` whose grads are averaged first.

    ``grads ↦ mean_r grads_r`` (all leaves flattened into one vector: one round per
    step), then the wrapped optimizer's update, identical on every rank, so the
    replicas never drift apart.
    """

    def __init__(self, optimizer: Callable[..., Any], reduce: CountingAllreduce) -> None:
        self.optimizer = optimizer
        self.reduce = reduce
        self.__wrapped__ = optimizer  # checkpoints record the wrapped optimizer's kind (hg_dist.checkpoint)

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor], state: Any, *args: Any,
                 **kwargs: Any) -> Any:
        return self.optimizer(params, self.reduce.params(grads), state, *args, **kwargs)
