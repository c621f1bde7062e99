"""The function every Ray Train worker runs: build, distribute, resume, solve, report.

Per worker (rank ``r`` of ``W``)::

    solver = build_solver(config, rank=r, world_size=W)      # its slice of every global batch
    distribute_solver(solver, TorchDistributed(), seed)      # allreduce grads, HVPs, metrics
    resume from ray.train.get_checkpoint(), if it is this run's
    solver.run()                                             # rank 0 records every outer step
                                                             # (output/history.parquet, output/tb)
        every outer step: rank 0 decides "report now?", "checkpoint now?" (TrainSettings.report_every,
        .checkpoint_every); the decision rides on the outer step's metrics allreduce, so all ranks agree
        after the step: all call ray.train.report (every rank adds its part of the checkpoint)
    final report with a checkpoint; rank 0 writes output/result.json (status "completed")

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
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hg_dist.callbacks import Callback
from hg_dist.checkpoint import seed_everything
from hg_dist.distributed.checkpointing import checkpoint_of, checkpoint_run_id, fingerprint, read_checkpoint
from hg_dist.distributed.collectives import TorchDistributed
from hg_dist.distributed.hooks import DistributedHooks, distribute_solver
from hg_dist.distributed.settings import Every, TrainSettings
from hg_dist.experiment import write_result
from hg_dist.status import RunStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, shipped in ``train_loop_config={"job": job}``."""

    build_solver: Callable[..., Any]
    config: Any
    settings: TrainSettings

    @property
    def run_id(self) -> str:
        """The run's :func:`~hg_dist.distributed.checkpointing.fingerprint` (build_solver and config)."""
        return fingerprint(self.build_solver, self.config)


class InjectedFailure(RuntimeError):
    """Raised by the ``TrainSettings.fail_at`` test hook."""


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
    """Reports to Ray Train (all ranks together) at most as often as the settings allow.

    During each outer step's metrics round (:class:`~hg_dist.distributed.hooks.OuterStepSync`)
    rank 0 answers "report now?" and "checkpoint now?"; every rank receives rank 0's
    answers, and after that inner step all ranks report (with a checkpoint, to which
    each rank adds its own file) or none does.
    """

    def __init__(self, rank: int, hooks: DistributedHooks, settings: TrainSettings, run_id: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rank = rank
        self.hooks = hooks
        self.settings = settings
        self.run_id = run_id
        self.reports = Schedule(settings.report_every, clock)
        self.checkpoints = Schedule(settings.checkpoint_every, clock)
        self.pending: tuple[float, ...] | None = None
        self.num_reports = 0
        self.seconds = 0.0               # spent in ray.train.report (and writing checkpoints)
        self._solver: Any = None

    def on_run_start(self, solver: Any) -> None:
        self._solver = solver
        self.hooks.sync.control = self.decide

    def decide(self) -> tuple[float, float]:
        """Rank 0's answers for the outer step now ending: (report?, checkpoint?) as 0/1."""
        step = self._solver.outer_step + 1
        checkpoint = self.checkpoints.due(step)
        return float(checkpoint or self.reports.due(step)), float(checkpoint)

    def on_outer_step(self, solver: Any, metrics: dict[str, float]) -> None:
        self._maybe_fail(solver.outer_step)
        self.pending = self.hooks.sync.take()

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
        return {**solver.recorder.latest(), **self.hooks.metrics(), "outer_step": float(solver.outer_step),
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

    def _maybe_fail(self, step: int) -> None:
        fail = self.settings.fail_at
        if fail is None or fail.rank != self.rank or fail.outer_step != step:
            return
        marker = Path(fail.marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(os.getpid()))
        if fail.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFailure(f"injected failure on rank {self.rank} after outer step {step} (test hook)")


def train_loop(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``; ``loop_config = {"job": Job}``."""
    import ray.train

    job: Job = loop_config["job"]
    config = job.config
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    started_at, tic = time.time(), time.perf_counter()
    seed_everything(config.seed)                                 # as run_local: same models on every rank
    solver = job.build_solver(config, rank=rank, world_size=world_size)
    solver.log_dir = str(config.output) if rank == 0 else None   # rank 0 alone writes tb/ and history
    solver.progress = False
    hooks = distribute_solver(solver, TorchDistributed(), seed=config.seed)
    run_id = job.run_id
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and checkpoint_run_id(checkpoint) != run_id:
        if rank == 0:
            logger.warning("hg_dist: not resuming from %s: it was written by a run with other settings "
                           "(a fresh run starts; use another output folder to keep both)", checkpoint.path)
        checkpoint = None
    restored_step = None
    if checkpoint is not None:
        # Loaded on the CPU: RNG states must stay there; the solver moves tensors to its device.
        solver.load_state_dict(read_checkpoint(checkpoint, map_location="cpu", rank=rank))
        restored_step = solver.global_step
    reporter = Reporter(rank, hooks, job.settings, run_id)
    solver.callbacks = (*solver.callbacks, reporter)
    run_tic = time.perf_counter()
    final = solver.run()
    reporter.finish(solver, final)
    run_s = time.perf_counter() - run_tic
    if rank == 0:
        write_result(config.output, final, config, status=RunStatus.COMPLETED, error=None,
                     wall_time_s=time.perf_counter() - tic, run_s=run_s, started_at=started_at, workers=world_size,
                     global_step=solver.global_step, outer_steps=solver.outer_step, restored=checkpoint is not None,
                     restored_from_step=restored_step, reports=reporter.num_reports, report_s=reporter.seconds,
                     report_every=str(job.settings.report_every),
                     checkpoint_every=str(job.settings.checkpoint_every), comm=hooks.metrics())

