"""The function every Ray Train worker runs: build, distribute, resume, solve, report.

Per worker (rank ``r`` of ``W``)::

    solver = build_solver(config, rank=r, world_size=W)      # its data shard
    distribute_solver(solver, TorchDistributed(), seed)      # allreduce grads and HVPs
    load the latest checkpoint, if any                       # ray.train.get_checkpoint()
    solver.run()                                             # callback after every outer step:
        ray.train.report(metrics, checkpoint=...)            #   all ranks report, rank 0 checkpoints
    rank 0 writes output/history.parquet, output/tb (its log_dir) and output/result.json

All ranks call ``ray.train.report`` the same number of times (once per outer step,
plus a final one after ``run()``); only rank 0 attaches a checkpoint, every
``checkpoint_every`` outer steps and at the end. A restarted worker group resumes
from the latest checkpoint (``ray.train.get_checkpoint()``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hg_dist.distributed.checkpointing import checkpoint_of, read_checkpoint
from hg_dist.distributed.collectives import TorchDistributed
from hg_dist.distributed.hooks import DistributedHooks, distribute_solver
from hg_dist.distributed.settings import TrainSettings
from hg_dist.checkpoint import seed_everything
from hg_dist.experiment import write_result


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, shipped in ``train_loop_config={"job": job}``."""

    build_solver: Callable[..., Any]
    config: Any
    settings: TrainSettings


class InjectedFailure(RuntimeError):
    """Raised by the ``TrainSettings.fail_at`` test hook."""


class Reporter:
    """The solver callback that reports every outer step to Ray Train."""

    def __init__(self, rank: int, hooks: DistributedHooks, settings: TrainSettings) -> None:
        self.rank = rank
        self.hooks = hooks
        self.settings = settings
        self.last_metrics: dict[str, float] = {}

    def __call__(self, solver: Any, metrics: dict[str, float]) -> None:
        step = solver.outer_step
        self._maybe_fail(step)
        self.last_metrics = {**metrics, **self.hooks.metrics(), "outer_step": float(step)}
        self.report(solver, checkpoint=step % self.settings.checkpoint_every == 0)

    def finish(self, solver: Any) -> None:
        """The final report: metrics after ``run()`` (with ``evaluate()``), and a checkpoint.

        Always made (on every rank), so ``result.metrics`` holds the final metrics.
        """
        self.last_metrics = {**self.last_metrics, "outer_step": float(solver.outer_step)}
        self.report(solver, checkpoint=True)

    def report(self, solver: Any, *, checkpoint: bool) -> None:
        import ray.train

        if checkpoint and self.rank == 0:
            with checkpoint_of(solver) as ckpt:
                ray.train.report(self.last_metrics, checkpoint=ckpt)
        else:
            ray.train.report(self.last_metrics)

    def _maybe_fail(self, step: int) -> None:
        fail = self.settings.fail_at
        if fail is None or fail.rank != self.rank or fail.outer_step != step:
            return
        marker = Path(fail.marker)
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise InjectedFailure(f"injected failure on rank {self.rank} after outer step {step} (test hook)")


def train_loop(loop_config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``; ``loop_config = {"job": Job}``."""
    import ray.train
    import ray.train.torch

    job: Job = loop_config["job"]
    config = job.config
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    tic = time.perf_counter()
    seed_everything(config.seed)                                 # as run_local: same models on every rank
    solver = job.build_solver(config, rank=rank, world_size=world_size)
    solver.log_dir = str(config.output) if rank == 0 else None   # rank 0 alone writes tb/ and history
    solver.progress = False
    hooks = distribute_solver(solver, TorchDistributed(), seed=config.seed)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        solver.load_state_dict(read_checkpoint(checkpoint, map_location=ray.train.torch.get_device()))
    reporter = Reporter(rank, hooks, job.settings)
    solver.callbacks = (*solver.callbacks, reporter)
    final = solver.run()
    reporter.last_metrics = {**reporter.last_metrics, **final}
    reporter.finish(solver)
    if rank == 0:
        write_result(config.output, final, config, wall_time_s=time.perf_counter() - tic,
                     workers=world_size, global_step=solver.global_step, outer_steps=solver.outer_step,
                     restored=checkpoint is not None, comm=hooks.metrics())
