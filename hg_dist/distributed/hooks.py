"""Make a built solver data-parallel without touching user code.

:func:`distribute_solver` rebinds two attributes of a
:class:`~hg_dist.solver.BaseImplicitSolver` (see ``docs/architecture.md``):

* ``solver.inner_optimizer`` → :class:`AllreduceGrads` (mean the inner gradients
  first: one round per inner step), and
* ``solver.approx_ihvp`` → ``functools.partial(approx_ihvp, reduce=<counting
  allreduce-mean>)`` (see :func:`distributed_approx`),

and adds a callback that records, after every outer step, ``comm_rounds`` and
``comm_bytes`` (per rank, for that step's hypergradient) in ``solver.recorder``.
The two counters are separate, so the hypergradient numbers are not mixed with the
inner steps' traffic.
"""

from __future__ import annotations


from hg_dist.distributed.collectives import Collective
from hg_dist.distributed.counting import CommStats, CountingAllreduce
from hg_dist.distributed.hypergrad import AllreduceGrads, distributed_approx
from hg_dist.solver import BaseImplicitSolver


class DistributedHooks:
    """What :func:`distribute_solver` installed; also the solver callback recording the counts.

    Attributes:
        inner_reduce: counter of the inner-gradient allreduces.
        hypergrad_reduce: counter of the hypergradient allreduces.
        last: :class:`CommStats` of the latest outer step's hypergradient.
    """

    def __init__(self, inner_reduce: CountingAllreduce, hypergrad_reduce: CountingAllreduce) -> None:
        self.inner_reduce = inner_reduce
        self.hypergrad_reduce = hypergrad_reduce
        self.last = CommStats()
        self._seen = hypergrad_reduce.snapshot()

    def metrics(self) -> dict[str, float]:
        """``comm_rounds``/``comm_bytes`` of the latest hypergradient, and totals of the run so far."""
        return {"comm_rounds": float(self.last.rounds),
                "comm_bytes": float(self.last.bytes),
                "inner_comm_rounds_total": float(self.inner_reduce.total.rounds),
                "comm_bytes_total": float(self.inner_reduce.total.bytes + self.hypergrad_reduce.total.bytes)}

    def __call__(self, solver: BaseImplicitSolver, metrics: dict[str, float]) -> None:
        now = self.hypergrad_reduce.snapshot()
        self.last, self._seen = now - self._seen, now
        solver.recorder.add("comm_rounds", self.last.rounds)
        solver.recorder.add("comm_bytes", self.last.bytes)


def distribute_solver(solver: BaseImplicitSolver, collective: Collective, *, seed: int) -> DistributedHooks:
    """Make ``solver`` average its inner gradients and hypergradient terms over ``collective``.

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
    solver.inner_optimizer = AllreduceGrads(solver.inner_optimizer, inner_reduce)
    solver.approx_ihvp = distributed_approx(solver.approx_ihvp, hypergrad_reduce, seed=seed)
    hooks = DistributedHooks(inner_reduce, hypergrad_reduce)
    solver.callbacks = (hooks, *solver.callbacks)
    return hooks
