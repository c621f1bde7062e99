"""Make a built solver data-parallel without touching user code.

:func:`distribute_solver` rebinds attributes of a
:class:`~hg_dist.solver.BaseImplicitSolver` (see ``docs/architecture.md``):

* ``solver.inner_optimizer`` → :class:`AllreduceGrads` (mean the inner gradients
  first: one round per inner step). A solver with the default ``inner_update``
  gets :func:`mean_loss_inner_update`, which averages its loss in that same round,
  so the recorded ``inner_loss`` is the loss of the whole global batch, as in one
  process (a solver overriding ``inner_update`` records its own shard's loss);
* ``solver.approx_ihvp`` → ``functools.partial(approx_ihvp, reduce=<counting
  allreduce-mean>)`` (see :func:`distributed_approx`);
* ``solver.outer_update`` → :class:`OuterStepSync`: the metrics it returns
  (``outer_loss``, accuracies …, means over equal shards) are averaged over the
  ranks, so what is recorded and reported equals a one-process run, and the same
  small round carries rank 0's decisions (report / checkpoint now?) to every rank;

and adds a callback that records, after every outer step, ``comm_rounds`` and
``comm_bytes`` (per rank, for that step's hypergradient) in ``solver.recorder``.
The counters are separate, so the hypergradient numbers are not mixed with the
inner steps' traffic or the metrics round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from hg_dist.distributed.collectives import Collective
from hg_dist.distributed.counting import CommStats, CountingAllreduce
from hg_dist.distributed.hypergrad import AllreduceGrads, distributed_approx
from hg_dist.guards import update_metrics
from hg_dist.solver import BaseImplicitSolver


class OuterStepSync:
    """``solver.outer_update`` followed by one small allreduce (a vector of a few floats).

    Returns ``{name: mean_r value_r}`` for every metric the wrapped update returned
    (as :func:`hg_dist.guards.update_metrics` reads it), and stores in :attr:`agreed`
    the values of :attr:`control` *on rank 0* (other ranks contribute zeros), so every
    rank reaches the same decision in the same outer step without another round.

    Attributes:
        control: ``() -> tuple[float, ...]`` evaluated on rank 0 during the round
            (set by the worker loop; ``None``: nothing to agree on).
        agreed: rank 0's ``control()`` values from the latest round, until :meth:`take`.
    """

    def __init__(self, outer_update: Callable[[], Any], reduce: CountingAllreduce,
                 device: torch.device) -> None:
        self.outer_update = outer_update
        self.reduce = reduce
        self.device = device
        self.control: Callable[[], tuple[float, ...]] | None = None
        self.agreed: tuple[float, ...] | None = None

    def __call__(self) -> dict[str, Tensor]:
        metrics = update_metrics(self.outer_update(), "outer_loss")
        names = list(metrics)
        control = tuple(self.control()) if self.control is not None else ()
        if self.reduce.collective.rank != 0:
            control = (0.0,) * len(control)
        values = [torch.as_tensor(metrics[n], dtype=torch.float64).detach().to(self.device).reshape(())
                  for n in names]
        values += [torch.tensor(float(c), dtype=torch.float64, device=self.device) for c in control]
        if not values:
            return {}
        total = self.reduce.sum(torch.stack(values))
        world_size = self.reduce.world_size
        if control:
            self.agreed = tuple(total[len(names):].tolist())
        return {name: total[k] / world_size for k, name in enumerate(names)}

    def take(self) -> tuple[float, ...] | None:
        """The agreed values of the latest round (``None`` if there was none since the last ``take``)."""
        agreed, self.agreed = self.agreed, None
        return agreed


def mean_loss_inner_update(solver: BaseImplicitSolver, optimizer: AllreduceGrads) -> Callable[[], Tensor]:
    """``BaseImplicitSolver.inner_update`` with the loss averaged in the gradients' round.

    Same step as the default update (one ``inner_forward`` gradient on the rank's
    batch, gradients averaged, one optimizer step); returns ``mean_r loss_r``.
    """
    def inner_update() -> Tensor:
        batch = next(solver.inner_loader)
        batch = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        grads, loss = torch.func.grad_and_value(solver.inner_forward)(solver.inner_params, solver.outer_params(),
                                                                      *batch)
        solver.inner_params, solver.inner_optim_state, loss = optimizer.step_with_loss(
            solver.inner_params, grads, loss, solver.inner_optim_state)
        return loss
    return inner_update


class DistributedHooks:
    """What :func:`distribute_solver` installed; also the solver callback recording the counts.

    Attributes:
        inner_reduce: counter of the inner-gradient allreduces.
        hypergrad_reduce: counter of the hypergradient allreduces.
        sync: the outer step's metrics round (:class:`OuterStepSync`).
        last: :class:`CommStats` of the latest outer step's hypergradient.
    """

    def __init__(self, inner_reduce: CountingAllreduce, hypergrad_reduce: CountingAllreduce,
                 sync: OuterStepSync) -> None:
        self.inner_reduce = inner_reduce
        self.hypergrad_reduce = hypergrad_reduce
        self.sync = sync
        self.last = CommStats()
        self._seen = hypergrad_reduce.snapshot()

    def metrics(self) -> dict[str, float]:
        """``comm_rounds``/``comm_bytes`` of the latest hypergradient, and totals of the run so far."""
        total = self.inner_reduce.total + self.hypergrad_reduce.total + self.sync.reduce.total
        return {"comm_rounds": float(self.last.rounds),
                "comm_bytes": float(self.last.bytes),
                "inner_comm_rounds_total": float(self.inner_reduce.total.rounds),
                "comm_bytes_total": float(total.bytes)}

    def __call__(self, solver: BaseImplicitSolver, metrics: dict[str, float]) -> None:
        now = self.hypergrad_reduce.snapshot()
        self.last, self._seen = now - self._seen, now
        solver.recorder.add("comm_rounds", self.last.rounds)
        solver.recorder.add("comm_bytes", self.last.bytes)


def distribute_solver(solver: BaseImplicitSolver, collective: Collective, *, seed: int) -> DistributedHooks:
    """Make ``solver`` average its inner gradients, hypergradient terms and metrics over ``collective``.

    Args:
        solver: built on this rank's data shard; same models and settings on every rank.
        collective: the group of replicas (e.g. :class:`TorchDistributed`).
        seed: seeds the Nyström generator when ``approx_ihvp`` has none bound.

    Raises:
        TypeError: for a solver that is not a ``BaseImplicitSolver`` (the unrolled
            solver's outer gradient comes from autograd and is not reduced here).
    """
    if not isinstance(solver, BaseImplicitSolver):
        raise TypeError(f"distributed runs need a BaseImplicitSolver (implicit hypergradients), got "
                        f"{type(solver).__name__}; run unrolled solvers with --workers 1")
    inner_reduce = CountingAllreduce(collective)
    hypergrad_reduce = CountingAllreduce(collective)
    optimizer = AllreduceGrads(solver.inner_optimizer, inner_reduce)
    solver.inner_optimizer = optimizer
    if type(solver).inner_update is BaseImplicitSolver.inner_update:
        solver.inner_update = mean_loss_inner_update(solver, optimizer)
    solver.approx_ihvp = distributed_approx(solver.approx_ihvp, hypergrad_reduce, seed=seed)
    sync = OuterStepSync(solver.outer_update, CountingAllreduce(collective), solver.inner_params[0].device)
    solver.outer_update = sync
    hooks = DistributedHooks(inner_reduce, hypergrad_reduce, sync)
    solver.callbacks = (hooks, *solver.callbacks)
    return hooks
