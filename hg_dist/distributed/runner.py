"""Entry points: :func:`fit` (a Ray Train run) and :func:`run_experiment` (what examples call).

``run_experiment(build_solver, config)`` runs ``hg_dist.experiment.run_local``
when ``config.workers == 1`` and otherwise a ``TorchTrainer`` with
``config.workers`` workers (see :mod:`hg_dist.distributed.train_loop`); both write
``output/history.parquet``, ``output/result.json`` and ``output/tb``. Everything
that can be checked on the driver is checked before any worker starts (worker
count, picklability, and — with ``TrainSettings.precheck`` — the data shards,
by building rank 0's solver once on the driver); then the cluster is reached and
asked for the workers' resources (:func:`hg_dist.distributed.resources.prepare_workers`:
an immediate error if it can never hold them, else a wait while an autoscaler adds
nodes, up to ``TrainSettings.resource_timeout_s``). Nothing is written before that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hg_dist.checkpoint import read
from hg_dist.distributed.checkpointing import RUN_FILE, STATE_FILE
from hg_dist.distributed.reachable import check_loadable_on_workers
from hg_dist.distributed.resources import connect, default_max_failures, prepare_workers, startup_retries
from hg_dist.distributed.settings import TrainSettings, check_scaling
from hg_dist.distributed.train_loop import Job, train_loop
from hg_dist.status import ENDED_FROM_OUTSIDE, RunStatus


def _precheck(build_solver: Callable[..., Any], config: Any, workers: int) -> None:
    """Build rank 0's solver on the driver, on CPU and writing nothing, to surface data errors."""
    probe = dataclasses.replace(config, use_gpu=False) if dataclasses.is_dataclass(config) else config
    with tempfile.TemporaryDirectory(prefix="hg_dist-precheck-") as scratch:
        if dataclasses.is_dataclass(probe) and hasattr(probe, "output"):
            probe = dataclasses.replace(probe, output=scratch)
        build_solver(probe, rank=0, world_size=workers)


def validate(build_solver: Callable[..., Any], config: Any, settings: TrainSettings) -> int:
    """All driver-side checks of :func:`fit`; returns the number of workers.

    Raises:
        ValueError: ``workers < 1``, or (precheck) more workers than data
            shards/examples, each naming the fix.
        TypeError: ``build_solver`` not callable or not picklable.
    """
    if not callable(build_solver):
        raise TypeError(f"build_solver must be a function (config, rank, world_size) -> solver, "
                        f"got {type(build_solver).__name__}")
    import ray.cloudpickle

    try:
        ray.cloudpickle.dumps(Job(build_solver, config, settings))
    except Exception as error:  # noqa: BLE001 - any pickling failure means the same fix
        raise TypeError(f"build_solver and config must be picklable to reach the workers ({error}); define "
                        f"build_solver at module level in an importable module") from error
    workers = check_scaling(config.workers, config.use_gpu)
    if settings.precheck:
        _precheck(build_solver, config, workers)
    return workers


def fit(build_solver: Callable[..., Any], config: Any, settings: TrainSettings | None = None):
    """Run ``build_solver``'s solver on ``config.workers`` Ray Train workers; return the ``ray.train.Result``.

    Args:
        build_solver: ``(config, rank=, world_size=) -> BaseImplicitSolver`` on that
            rank's data shard; module-level, so workers can import it.
        config: an ``ExperimentConfig`` (``workers``, ``use_gpu``, ``seed``, ``output`` ...).
        settings: reporting, checkpoints, restarts, storage, resources (:class:`TrainSettings`).

    Returns:
        ``ray.train.Result``: ``.metrics`` the final metrics, ``.checkpoint`` the final
        solver state (read it with :func:`hg_dist.distributed.read_checkpoint`).

    Raises:
        hg_dist.distributed.resources.InsufficientResourcesError: (a ``ValueError``) the
            cluster can never hold the workers.
        hg_dist.distributed.resources.ResourceTimeoutError: they did not all come within
            ``settings.resource_timeout_s``.
        hg_dist.distributed.resources.ClusterUnreachableError: nothing answers at ``RAY_ADDRESS``.
        hg_dist.distributed.reachable.WorkerImportError: (a ``ValueError``) the workers cannot
            import ``build_solver``'s module.
        ray.train.TrainingFailedError: the run failed (after ``max_failures`` restarts);
            ``output/result.json`` then says ``"status": "failed"`` with the error, and
            holds the metrics of the latest checkpoint. On Ctrl-C it says
            ``"interrupted"``.
    """
    settings = settings or TrainSettings()
    workers = validate(build_solver, config, settings)
    cluster = prepare_workers(workers, settings.worker_resources(config.use_gpu),
                              timeout_s=settings.resource_timeout_s)
    check_loadable_on_workers(build_solver)
    max_failures = settings.max_failures if settings.max_failures is not None else default_max_failures(cluster)
    os.makedirs(config.output, exist_ok=True)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    job = Job(build_solver, config, settings)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=config.use_gpu,
                                     resources_per_worker=settings.worker_resources(config.use_gpu)),
        run_config=RunConfig(name=settings.name, storage_path=settings.storage(config.output),
                             failure_config=FailureConfig(
                                 max_failures=max_failures,
                                 controller_failure_limit=startup_retries(settings.resource_timeout_s)),
                             checkpoint_config=CheckpointConfig(num_to_keep=settings.num_to_keep),
                             callbacks=list(settings.callbacks)),
    )
    # Ray Train replaces the SIGINT handler for the run (Ctrl-C aborts it) and never
    # puts the previous one back: do so, so that Ctrl-C works again afterwards.
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    tic = time.perf_counter()
    try:
        return trainer.fit()
    except BaseException as error:
        status = RunStatus.INTERRUPTED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED
        write_ending(job, workers, status, error, wall_time_s=time.perf_counter() - tic)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def latest_checkpoint(job: Job) -> Path | None:
    """The newest checkpoint folder of ``job``'s run in local storage (``None``: none, or remote storage)."""
    root = Path(job.settings.storage(job.config.output)) / job.settings.name
    if "://" in str(job.settings.storage_path or "") or not root.is_dir():
        return None
    run_id = job.run_id
    found = None
    for folder in sorted(root.glob("checkpoint_*")):          # names are timestamps: sorted = oldest first
        try:
            if (folder / STATE_FILE).is_file() and json.loads((folder / RUN_FILE).read_text()).get("run_id") == run_id:
                found = folder
        except (OSError, ValueError):
            continue
    return found


def write_ending(job: Job, workers: int, status: RunStatus, error: BaseException | None, **info: Any) -> None:
    """Write ``output/result.json`` for a run that did not complete: ``status``, ``error`` and the
    metrics of its latest checkpoint (``{}`` if it has none). A status in
    :data:`ENDED_FROM_OUTSIDE` already there is kept (the error goes in as ``error_while_stopped``)."""
    from hg_dist.experiment import read_result, update_result, write_result

    message = None if error is None else f"{type(error).__name__}: {error}"
    if read_result(job.config.output).get("status") in ENDED_FROM_OUTSIDE:
        update_result(job.config.output, error_while_stopped=message)
        return
    metrics, counters, folder = {}, {}, latest_checkpoint(job)
    if folder is not None:
        try:
            state = read(folder / STATE_FILE)
            metrics = {name: values[-1] for name, values in state["recorder"]["archive"].items() if values}
            counters = dict(state["counters"])
        except (OSError, ValueError, KeyError):
            pass
    write_result(job.config.output, metrics, job.config, status=status, error=message, workers=workers,
                 global_step=counters.get("global_step"), outer_steps=counters.get("outer_step"),
                 last_checkpoint=None if folder is None else str(folder), **info)


def run_experiment(build_solver: Callable[..., Any], config: Any,
                   settings: TrainSettings | None = None) -> dict[str, float]:
    """``run_local`` for ``config.workers == 1``, else :func:`fit`; returns the final metrics.

    Both write ``output/history.parquet``, ``output/result.json`` and TensorBoard logs
    under ``output/tb`` (in the distributed case rank 0 writes them), checkpoint every
    ``settings.checkpoint_every`` and resume from their latest checkpoint when run
    again. Both claim the output folder first (:func:`hg_dist.run_folder.claim`): one
    holding another run, or in use by a process now, is refused (``ConfigError``).
    The other ``settings`` apply to the distributed case only.
    """
    from hg_dist.data import check_workers
    from hg_dist.experiment import Terminated, claim_output, run_local, update_result

    settings = settings or TrainSettings()
    if check_workers(config.workers) == 1:
        return run_local(build_solver, config, checkpoint_every=settings.checkpoint_every)

    def terminated(signum: int) -> None:
        error = Terminated(signum)
        update_result(config.output, status=RunStatus.TERMINATED, error=f"{type(error).__name__}: {error}")

    fired: list[int] = []
    with claim_output(config.output, build_solver, config):
        connect()  # ray.init installs its own SIGTERM handler (sys.exit): connect first, then put ours over it
        try:
            with _sigterm_as_ctrl_c(lambda signum: (fired.append(signum), terminated(signum))):
                return dict(fit(build_solver, config, settings).metrics)
        except BaseException as error:
            if not fired:
                raise
            terminated(fired[0])  # fit recorded the Ctrl-C it was given, with its latest checkpoint: say why
            raise Terminated(fired[0]) from error


@contextlib.contextmanager
def _sigterm_as_ctrl_c(on_signal: Callable[[int], None]) -> Iterator[None]:
    """While the block runs, ``SIGTERM`` calls ``on_signal(signum)`` (record the ending first: ``SIGKILL``
    often follows within seconds), then stops the run as Ctrl-C does, through Ray Train's own ``SIGINT``
    handling (an exception raised inside a Ray call from a signal handler would not unwind cleanly).
    A second ``SIGTERM`` is ignored; outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not fired:
            fired.append(signum)
            on_signal(signum)
            signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
