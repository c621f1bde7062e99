"""The function every Ray Train worker runs: build, resume, solve, report.

Per worker (rank ``r`` of ``W``)::

    with hg_dist.collective.use(TorchDistributed()):            # the solver's collective=
        solver = build_solver(config, rank=r, world_size=W)      # its slice of every global batch
    resume from ray.train.get_checkpoint(), if it is this run's
    solver.run((history, reporter), log_dir=None, progress=False)  # rank 0 records every outer step
                                                                 # (output/history.parquet, output/tb)
        after every outer step: rank 0 decides "report now?", "checkpoint now?" (FitOptions.report_every,
        .checkpoint_every) and one small round tells every rank; after that inner step all ranks call
        ray.train.report (every rank adds its part of the checkpoint) or none does
    final report with a checkpoint; rank 0 writes output/result.json (status "completed")

Errors a restart cannot cure (:data:`NOT_RETRIED`: divergence, NaN/inf, bad settings)
end the run at once: Ray Train restarts a worker group after any error, so the
worker catches them, the ranks agree on it (an allreduce of a flag: the solver
checks averaged losses and hypergradients, so all ranks raise at the same step),
rank 0 writes ``result.json`` (``"status": "failed"``, ``"retried": false``) and
every worker returns normally; :func:`hg_dist.distributed.fit` then raises
:class:`RunFailedError`. Anything else (a lost worker, a collective that broke)
propagates, and Ray Train restarts the group from the latest checkpoint.

Why reports are rare: ``ray.train.report`` synchronises all workers with the Train
controller. Each worker's report waits in a queue of one, which the controller
empties when it polls the workers (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` = 2 s),
so back-to-back reports cost ≈2 s each (py-spy: about 90% of a worker's time when
reporting every outer step), while a report made after the previous one was
collected returns in ≈0.05 s. Every rank still calls ``report`` the same number
of times, as Train requires.

A checkpoint counts once the controller has collected its report (within one
poll); a worker lost in that window resumes from the checkpoint before.

Reports and checkpoints happen after the whole inner step that holds the outer
step (:meth:`Reporter.on_step_end`), when its history row (if any) is logged, so
a checkpoint's history ends exactly where the resumed run starts logging again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import torch

from hg_dist.callbacks import Callback
from hg_dist.checkpoint import seed_everything
from hg_dist.collective import Collective, use
from hg_dist.distributed.checkpointing import (checkpoint_of, checkpoint_run_id, fingerprint, read_checkpoint,
                                               remove_orphaned_folders)
from hg_dist.distributed.collectives import TorchDistributed
from hg_dist.distributed.settings import Every, FitOptions
from hg_dist.experiment import RUN_ERRORS, write_result
from hg_dist.solver import BaseImplicitSolver
from hg_dist.status import RunStatus

logger = logging.getLogger(__name__)

NOT_RETRIED = (*RUN_ERRORS, ValueError, TypeError, NotImplementedError)
"""Errors that end a distributed run at once (a restart from the checkpoint would meet them again):
divergence and NaN/inf (:data:`hg_dist.experiment.RUN_ERRORS`) and bad settings."""


class RunFailedError(RuntimeError):
    """The workers ended the run on an error a restart cannot cure (:data:`NOT_RETRIED`).

    Attributes:
        error: ``"Type: message"`` of the workers' error (also in ``result.json``).
    """

    def __init__(self, error: str) -> None:
        super().__init__(f"{error} (not retried: a restart from the checkpoint would fail the same way)")
        self.error = error


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, shipped in ``train_loop_config={"job": job}``.

    ``attempt`` tells this call of ``fit`` from earlier ones in ``result.json``.
    """

    build_solver: Callable[..., Any]
    config: Any
    options: FitOptions = field(default_factory=FitOptions)
    attempt: str = field(default_factory=lambda: uuid4().hex)

    @property
    def run_id(self) -> str:
        """The run's :func:`~hg_dist.distributed.checkpointing.fingerprint` (build_solver and config)."""
        return fingerprint(self.build_solver, self.config)


class Schedule:
    """When an :class:`Every` is due, judged on one rank (rank 0) at the end of an outer step."""

    def __init__(self, every: Every, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self.clock = clock
        self.last = clock()

    def due(self, outer_step: int) -> bool:
        if self.every.steps is not None:
            return outer_step % self.every.steps == 0
        return self.clock() - self.last >= self.every.seconds

    def done(self) -> None:
        """It happened now (restarts the clock)."""
        self.last = self.clock()


class Reporter(Callback):
    """Reports to Ray Train (all ranks together) at most as often as the options allow.

    After each outer step rank 0 answers "report now?" and "checkpoint now?" and
    one small allreduce (rank 0's answers, zeros from the others) gives every rank
    the same answers; after that inner step all ranks report (with a checkpoint, to
    which each rank adds its own file) or none does.
    """

    def __init__(self, rank: int, options: FitOptions, run_id: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rank = rank
        self.options = options
        self.run_id = run_id
        self.reports = Schedule(options.report_every, clock)
        self.checkpoints = Schedule(options.checkpoint_every, clock)
        self.pending: tuple[float, ...] | None = None
        self.num_reports = 0
        self.seconds = 0.0               # spent in ray.train.report (and writing checkpoints)

    def on_outer_step(self, solver: Any, metrics: dict[str, float]) -> None:
        step = solver.outer_step
        checkpoint = self.checkpoints.due(step)
        answers = (float(checkpoint or self.reports.due(step)), float(checkpoint)) if self.rank == 0 else (0.0, 0.0)
        agreed = solver.reductions.metrics_reduce.sum(
            torch.tensor(answers, dtype=torch.float64, device=solver.inner_params[0].device))
        self.pending = tuple(agreed.tolist())

    def on_step_end(self, solver: Any) -> None:
        if self.pending is None:
            return
        (report, checkpoint), self.pending = self.pending, None
        if report:
            self.report(solver, checkpoint=bool(checkpoint))

    def finish(self, solver: Any, final: dict[str, float]) -> None:
        """The final report, with a checkpoint, on every rank (``result.metrics`` = the final metrics)."""
        self.report(solver, checkpoint=True, metrics=final)

    def metrics(self, solver: Any) -> dict[str, float]:
        return {**solver.recorder.latest(), **solver.reductions.metrics(), "outer_step": float(solver.outer_step),
                "global_step": float(solver.global_step)}

    def report(self, solver: Any, *, checkpoint: bool, metrics: dict[str, float] | None = None) -> None:
        import ray.train

        tic = time.perf_counter()
        metrics = {**self.metrics(solver), **(metrics or {})}
        if checkpoint:
            with checkpoint_of(solver, self.rank, self.run_id) as ckpt:
                ray.train.report(metrics, checkpoint=ckpt)
            self.checkpoints.done()
        else:
            ray.train.report(metrics)
        self.reports.done()
        self.num_reports += 1
        self.seconds += time.perf_counter() - tic


def check_solver(solver: Any, world_size: int) -> None:
    """A distributed run needs a ``BaseImplicitSolver`` built with the worker group as its collective."""
    if not isinstance(solver, BaseImplicitSolver):
        raise TypeError(f"distributed runs need a BaseImplicitSolver (implicit hypergradients), got "
                        f"{type(solver).__name__}; run unrolled solvers with --workers 1")
    if solver.collective.world_size != world_size:
        raise TypeError(f"build_solver returned a solver whose collective has world_size="
                        f"{solver.collective.world_size}, but the run has {world_size} workers; build it without "
                        f"collective= (the worker loop sets hg_dist.collective.use) or pass the worker group's")


def resume(solver: BaseImplicitSolver, rank: int, run_id: str) -> int | None:
    """Load ``ray.train.get_checkpoint()`` into ``solver`` if it is this run's; the step it resumes at."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and checkpoint_run_id(checkpoint) != run_id:
        if rank == 0:
            logger.warning("hg_dist: not resuming from %s: it was written by a run with other settings "
                           "(a fresh run starts; use another output folder to keep both)", checkpoint.path)
        return None
    if checkpoint is None:
        return None
    # Loaded on the CPU: RNG states must stay there; the solver moves tensors to its device.
    solver.load_state_dict(read_checkpoint(checkpoint, map_location="cpu", rank=rank))
    return solver.global_step


def all_ranks_failed(collective: Collective, device: torch.device) -> bool:
    """Whether every rank reached this call (each contributes 1): one round."""
    flags = collective.allreduce_sum(torch.ones((), dtype=torch.float64, device=device))
    return int(flags.item()) == collective.world_size


def train_loop(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``; ``loop_config = {"job": Job}``."""
    import ray.train

    job: Job = loop_config["job"]
    config = job.config
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    started_at, tic = time.time(), time.perf_counter()
    remove_orphaned_folders()                                    # left by workers killed while reporting
    collective = TorchDistributed()
    solver: BaseImplicitSolver | None = None
    try:
        seed_everything(config.seed)                             # as run_local: same models on every rank
        with use(collective):
            solver = job.build_solver(config, rank=rank, world_size=world_size)
        check_solver(solver, world_size)
        restored_step = resume(solver, rank, job.run_id)
        reporter = Reporter(rank, job.options, job.run_id)
        history = (job.options.history(config.output),) if rank == 0 else ()  # rank 0 alone writes files
        run_tic = time.perf_counter()
        final = solver.run((*history, reporter), log_dir=None, progress=False)
    except NOT_RETRIED as error:
        device = solver.inner_params[0].device if solver is not None else torch.device("cpu")
        if not all_ranks_failed(collective, device):
            raise
        if rank == 0:
            write_result(config.output, solver.recorder.latest() if solver is not None else {}, config,
                         status="failed", error=f"{type(error).__name__}: {error}", retried=False,
                         attempt=job.attempt, workers=world_size, wall_time_s=time.perf_counter() - tic,
                         global_step=None if solver is None else solver.global_step,
                         outer_steps=None if solver is None else solver.outer_step)
        logger.error("hg_dist: rank %d ends the run without a restart: %s: %s", rank, type(error).__name__, error)
        return
    reporter.finish(solver, final)
    run_s = time.perf_counter() - run_tic
    if rank == 0:
        write_result(config.output, final, config, status=RunStatus.COMPLETED, error=None,
                     wall_time_s=time.perf_counter() - tic, run_s=run_s, started_at=started_at, workers=world_size,
                     global_step=solver.global_step, outer_steps=solver.outer_step, restored=restored_step is not None,
                     restored_from_step=restored_step, reports=reporter.num_reports, report_s=reporter.seconds,
                     report_every=str(job.options.report_every), attempt=job.attempt,
                     checkpoint_every=str(job.options.checkpoint_every), comm=solver.reductions.metrics())
