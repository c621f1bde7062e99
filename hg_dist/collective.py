"""How a solver talks to its replicas: the :class:`Collective` protocol and the counted means.

Data-parallel bilevel optimization keeps the parameters ``θ`` (inner) and ``φ``
(outer) identical on ``W`` replicas; replica ``r`` holds a shard of the data, and
the full objectives are the means ``f = (1/W) Σ_r f_r``, ``g = (1/W) Σ_r g_r``
(exactly so for equal shards). Every quantity a solver needs is linear in ``f`` or
``g``, so one primitive suffices, a sum over the group::

    ∇_θ f = mean_r ∇_θ f_r                       (an inner step: one round)
    ∂g/∂θ = mean_r ∂g_r/∂θ,  H V = mean_r H_r V   (one round per Hessian-operator call)
    dg/dφ = mean_r (∂g_r/∂φ − ∂²f_r/∂φ∂θ · x)     (one round; x is the same everywhere)

A solver receives its group as ``collective=`` (keyword-only, see
:class:`~hg_dist.solver.BaseSolver`); :class:`SingleProcess` (``W = 1``) is the
default and sends nothing. The implementations over ``torch.distributed`` and over
threads live in :mod:`hg_dist.distributed.collectives`; this module is the core's
side and imports no distributed runtime.

:class:`CountingAllreduce` is the mean ``t ↦ (1/W) Σ_r t_r`` that counts its rounds
(one call = one round) and bytes (``t.numel() · t.element_size()``, the payload one
rank contributes). :class:`Reductions` holds the three a solver keeps apart (inner
steps, hypergradients, metrics) so that each is reported on its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from hg_dist.approx_hypergrad import Approximator
from hg_dist.utils import Params, grad_and_value, params_to_vector, vector_to_params

__all__ = ["AllreduceGradientMean", "Collective", "CommStats", "CountingAllreduce", "GradientMean", "Reductions",
           "SingleProcess", "current", "reduced_approx", "use"]


@runtime_checkable
class Collective(Protocol):
    """A group of ``world_size`` replicas; this one is ``rank`` (``0 <= rank < world_size``).

    ``allreduce_sum(t)``, called by every rank with a tensor of the same shape and
    dtype, returns ``Σ_r t_r`` on every rank (a new tensor with identical bits
    everywhere; the input is untouched). Every rank must make the same calls in the
    same order.

    ``gradient_mean(params)`` gives the :class:`GradientMean` a solver averages its
    inner gradients with (built once per solver, for parameters shaped like
    ``params``). Subclass ``Collective`` to inherit the default,
    :class:`AllreduceGradientMean` (one ``allreduce_sum`` of the flattened gradients
    and the loss); a runtime with a faster scheme (buckets overlapped with backward
    over ``torch.distributed``) returns its own.
    """

    rank: int
    world_size: int

    def allreduce_sum(self, tensor: Tensor) -> Tensor: ...

    def gradient_mean(self, params: Sequence[Tensor]) -> GradientMean:
        return AllreduceGradientMean(self)


class SingleProcess(Collective):
    """The trivial group: ``rank = 0``, ``world_size = 1``, ``allreduce_sum`` = identity."""

    rank = 0
    world_size = 1

    def allreduce_sum(self, tensor: Tensor) -> Tensor:
        return tensor


class GradientMean(Protocol):
    """``(mean_r ∇_θ f_r, mean_r f_r)`` over a collective's ``W`` replicas, for parameters of fixed shapes.

    * ``grad_and_value(f, params, *args)``: the gradient of ``f_r = f(params, *args)``
      (a scalar; ``args`` are this rank's data) by plain reverse mode, averaged with
      the loss over the replicas. Parameters ``f`` does not use get zero gradients;
      nothing is differentiable.
    * ``averager(grads, loss)``: the mean of finished gradients (e.g. from
      ``torch.func``; kept differentiable when they require grad) and of ``loss``
      (``None``: ``(mean grads, None)``).

    ``last`` is the communication of the latest call. When ``reuses_buffers`` is true
    the results are views of buffers the next call overwrites: consume them (an
    in-place optimizer step) or copy them before the next call.
    """

    last: CommStats
    reuses_buffers: bool

    def grad_and_value(self, f: Callable[..., Tensor], params: Sequence[Tensor],
                       *args: Any) -> tuple[Params, Tensor]: ...

    def __call__(self, grads: Sequence[Tensor], loss: Tensor | None = None) -> tuple[Params, Tensor | None]: ...


class AllreduceGradientMean:
    """The default :class:`GradientMean`: one ``allreduce_sum`` of ``[vec(grads), loss]``, divided by ``W``.

    ``W = 1`` sends nothing and returns its inputs. The results are fresh tensors
    (``reuses_buffers = False``); ``last`` counts one round of ``(n + 1)`` elements
    (``n`` without a loss) per call on ``W > 1``.
    """

    reuses_buffers = False

    def __init__(self, collective: Collective) -> None:
        self.collective = collective
        self.last = CommStats()

    def grad_and_value(self, f: Callable[..., Tensor], params: Sequence[Tensor],
                       *args: Any) -> tuple[Params, Tensor]:
        grads, loss = grad_and_value(f, tuple(params), *args)
        mean, mean_loss = self(grads, loss)
        return mean, mean_loss

    def __call__(self, grads: Sequence[Tensor], loss: Tensor | None = None) -> tuple[Params, Tensor | None]:
        grads = tuple(grads)
        world_size = self.collective.world_size
        if world_size == 1:
            self.last = CommStats()
            return grads, loss
        flat = params_to_vector(grads)
        if loss is not None:
            flat = torch.cat([flat, loss.detach().reshape(1).to(flat)])
        self.last = CommStats(1, flat.numel() * flat.element_size())
        mean = self.collective.allreduce_sum(flat) / world_size
        if loss is None:
            return vector_to_params(mean, grads), None
        return vector_to_params(mean[:-1], grads), mean[-1].to(loss.dtype)


_CURRENT: contextvars.ContextVar[Collective | None] = contextvars.ContextVar("hg_dist_collective", default=None)


def current() -> Collective:
    """The collective a solver built now gets when it is given none: the one :func:`use` set, else
    :class:`SingleProcess`."""
    collective = _CURRENT.get()
    return SingleProcess() if collective is None else collective


@contextlib.contextmanager
def use(collective: Collective) -> Iterator[Collective]:
    """Solvers built inside the block without ``collective=`` get ``collective``.

    The distributed worker loop builds a user's ``build_solver(config, rank, world_size)``
    inside ``use(TorchDistributed())``, so a build function need not pass the group
    through; passing ``collective=`` explicitly always wins. The setting is
    per thread (a ``contextvars`` variable).
    """
    check_collective(collective)
    token = _CURRENT.set(collective)
    try:
        yield collective
    finally:
        _CURRENT.reset(token)


def check_collective(collective: object) -> Collective:
    """``collective`` if it follows the protocol, else ``TypeError`` naming what it lacks."""
    if not isinstance(collective, Collective):
        raise TypeError(f"collective must have rank, world_size, allreduce_sum(tensor) and gradient_mean(params) "
                        f"(subclass hg_dist.collective.Collective, which supplies gradient_mean; e.g. "
                        f"hg_dist.collective.SingleProcess()), got {type(collective).__name__}")
    if not 0 <= collective.rank < collective.world_size:
        raise ValueError(f"collective.rank must be in [0, world_size={collective.world_size}), "
                         f"got {collective.rank}")
    return collective


@dataclass(frozen=True)
class CommStats:
    """Communication of a span of work: ``rounds`` allreduce calls moving ``bytes`` per rank."""

    rounds: int = 0
    bytes: int = 0

    def __sub__(self, other: "CommStats") -> "CommStats":
        return CommStats(self.rounds - other.rounds, self.bytes - other.bytes)

    def __add__(self, other: "CommStats") -> "CommStats":
        return CommStats(self.rounds + other.rounds, self.bytes + other.bytes)


class CountingAllreduce:
    """``t ↦ (1/W) Σ_r t_r`` over ``collective``, counting rounds and bytes.

    Call it on a tensor (any shape); read :attr:`total` for everything so far, or
    bracket a span with :meth:`snapshot` and subtract. With ``W = 1`` nothing is sent
    and nothing is counted: the reduction is the identity.
    """

    def __init__(self, collective: Collective) -> None:
        self.collective = collective
        self._rounds = 0
        self._bytes = 0

    @property
    def world_size(self) -> int:
        return self.collective.world_size

    @property
    def total(self) -> CommStats:
        return CommStats(self._rounds, self._bytes)

    def snapshot(self) -> CommStats:
        """The running totals now; ``after - before`` gives a span's cost."""
        return self.total

    def count(self, stats: CommStats) -> None:
        """Add communication done outside :meth:`sum` (a :class:`GradientMean`'s ``last``) to the totals."""
        self._rounds += stats.rounds
        self._bytes += stats.bytes

    def __call__(self, tensor: Tensor) -> Tensor:
        world_size = self.collective.world_size
        if world_size == 1:
            return tensor
        return self.sum(tensor) / world_size

    def sum(self, tensor: Tensor) -> Tensor:
        """``Σ_r t_r`` over the group (one counted round; the identity for ``W = 1``)."""
        if self.collective.world_size == 1:
            return tensor
        self._rounds += 1
        self._bytes += tensor.numel() * tensor.element_size()
        return self.collective.allreduce_sum(tensor)

    def params(self, params: Sequence[Tensor]) -> Params:
        """Mean of a tuple of tensors, flattened into one vector: a single round."""
        params = tuple(params)
        return vector_to_params(self(params_to_vector(params)), params)


class Reductions:
    """A solver's three counted means over one collective: inner steps, hypergradients, metrics.

    After each outer step the solver records ``comm_rounds`` and ``comm_bytes`` of
    that step's hypergradient (:meth:`hypergradient_step`); :meth:`metrics` adds the
    run's totals.
    """

    def __init__(self, collective: Collective) -> None:
        self.inner = CountingAllreduce(collective)
        self.hypergrad = CountingAllreduce(collective)
        self.metrics_reduce = CountingAllreduce(collective)
        self.last = CommStats()
        self._seen = self.hypergrad.snapshot()

    def hypergradient_step(self) -> dict[str, float]:
        """``comm_rounds``/``comm_bytes`` of the hypergradient since the previous call."""
        now = self.hypergrad.snapshot()
        self.last, self._seen = now - self._seen, now
        return {"comm_rounds": float(self.last.rounds), "comm_bytes": float(self.last.bytes)}

    def metrics(self) -> dict[str, float]:
        """The latest hypergradient's ``comm_rounds``/``comm_bytes`` and the run's totals so far."""
        total = self.inner.total + self.hypergrad.total + self.metrics_reduce.total
        return {"comm_rounds": float(self.last.rounds), "comm_bytes": float(self.last.bytes),
                "inner_comm_rounds_total": float(self.inner.total.rounds), "comm_bytes_total": float(total.bytes)}

    def mean_metrics(self, metrics: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
        """``{name: mean_r value_r}`` in one round (the identity for ``W = 1``)."""
        if self.metrics_reduce.world_size == 1 or not metrics:
            return dict(metrics)
        names = list(metrics)
        values = torch.stack([torch.as_tensor(metrics[n], dtype=torch.float64).detach().to(device).reshape(())
                              for n in names])
        mean = self.metrics_reduce(values)
        return {name: mean[k] for k, name in enumerate(names)}


def agreed_seed(collective: Collective) -> int:
    """Rank 0's ``torch.initial_seed()`` on every rank (one round; no round for ``W = 1``)."""
    seed = torch.initial_seed() & (2 ** 62 - 1)
    if collective.world_size == 1:
        return seed
    mine = torch.tensor([seed if collective.rank == 0 else 0], dtype=torch.int64)
    return int(collective.allreduce_sum(mine).item())


def reduced_approx(approx: Callable[..., Any], reduce: CountingAllreduce, *,
                   seed: Callable[[], int]) -> Callable[..., Any]:
    """``approx_ihvp`` with ``reduce=`` bound, so every data reduction of the hypergradient is a mean.

    Randomised methods must draw the same columns on every rank: a generator already
    bound (``make_approx(spec, seed=...)``, or ``generator=`` in a partial) is kept;
    when none is, one seeded with ``seed()`` (the same on every rank) is bound.

    Args:
        approx: an :class:`~hg_dist.approx_hypergrad.Approximator`, or a
            ``functools.partial`` of a function of :mod:`hg_dist.approx_hypergrad`.
        reduce: the mean applied to ``∂g/∂θ``, every Hessian product and the hypergradient.
        seed: called only when a generator must be bound.

    Raises:
        TypeError: ``approx`` takes no ``reduce=`` (naming what to use instead).
    """
    if isinstance(approx, Approximator):
        generator = approx.generator
        if approx.method.randomized and generator is None:
            generator = torch.Generator().manual_seed(seed())
        return Approximator(approx.spec, generator=generator, reduce=reduce)
    try:
        accepted = frozenset(inspect.signature(approx).parameters)
    except (TypeError, ValueError) as error:
        raise TypeError(f"approx_ihvp must be a Python function or functools.partial whose signature can be "
                        f"read, got {approx!r}") from error
    if "reduce" not in accepted:
        raise TypeError("approx_ihvp must accept reduce= to run on several replicas; use hg_dist.make_approx(spec) "
                        "or a functools.partial of a function from hg_dist.approx_hypergrad (e.g. partial(nystrom, "
                        "rank=5, rho=0.1))")
    bound = approx.keywords if isinstance(approx, functools.partial) else {}
    if "generator" in accepted and bound.get("generator") is None:
        return functools.partial(approx, reduce=reduce, generator=torch.Generator().manual_seed(seed()))
    return functools.partial(approx, reduce=reduce)
