"""Entry points: :func:`fit` (a Ray Train run) and :func:`run_experiment` (what examples call).

``run_experiment(build_solver, config)`` runs ``hg_dist.experiment.run_local``
when ``config.workers == 1`` and otherwise a ``TorchTrainer`` with
``config.workers`` workers (see :mod:`hg_dist.distributed.train_loop`); both write
``output/history.parquet``, ``output/result.json`` and ``output/tb``. Everything
that can be checked on the driver is checked before any worker starts (worker
count, picklability, and — with ``FitOptions.precheck`` — the data shards,
by building rank 0's solver once on the driver); then the cluster is reached and
asked for the workers' resources (:func:`hg_dist.distributed.resources.prepare_workers`:
an immediate error if it can never hold them, else a wait while an autoscaler adds
nodes, up to ``FitOptions.resource_timeout_s``). Nothing is written before that.

Ray's own objects configure the run: ``ray.train.ScalingConfig`` (workers, GPUs,
resources) and ``ray.train.RunConfig`` (where outputs go, restarts, checkpoints
kept, callbacks) — the Train classes, not ``ray.tune.RunConfig``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hg_dist.checkpoint import read
from hg_dist.distributed.checkpointing import STATE_FILE, checkpoint_run_id, remove_orphaned_folders
from hg_dist.distributed.reachable import check_loadable_on_workers
from hg_dist.distributed.resources import connect, default_max_failures, prepare_workers, startup_retries
from hg_dist.distributed.settings import FitOptions, check_scaling
from hg_dist.distributed.train_loop import Job, RunFailedError, train_loop
from hg_dist.status import ENDED_FROM_OUTSIDE, RunStatus

if TYPE_CHECKING:
    import ray.train

RUN_NAME = "hg_dist"
"""The run's folder under ``storage_path`` when no ``RunConfig`` is given."""

NUM_TO_KEEP = 2
"""Checkpoints kept when no ``RunConfig`` is given (``CheckpointConfig(num_to_keep=2)``)."""


def _precheck(build_solver: Callable[..., Any], config: Any, workers: int) -> None:
    """Build rank 0's solver on the driver, on CPU and writing nothing, to surface data errors."""
    probe = dataclasses.replace(config, use_gpu=False) if dataclasses.is_dataclass(config) else config
    with tempfile.TemporaryDirectory(prefix="hg_dist-precheck-") as scratch:
        if dataclasses.is_dataclass(probe) and hasattr(probe, "output"):
            probe = dataclasses.replace(probe, output=scratch)
        build_solver(probe, rank=0, world_size=workers)


def validate(build_solver: Callable[..., Any], config: Any, options: FitOptions) -> int:
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
        ray.cloudpickle.dumps(Job(build_solver, config, options))
    except Exception as error:  # noqa: BLE001 - any pickling failure means the same fix
        raise TypeError(f"build_solver and config must be picklable to reach the workers ({error}); define "
                        f"build_solver at module level in an importable module") from error
    workers = check_scaling(config.workers, config.use_gpu)
    if options.precheck:
        _precheck(build_solver, config, workers)
    return workers


def scaling_config_for(config: Any,
                       scaling_config: "ray.train.ScalingConfig | None" = None) -> "ray.train.ScalingConfig":
    """``scaling_config`` checked against ``config`` (or made from it), with ``resources_per_worker`` set.

    Default: ``ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
    resources_per_worker={"CPU": 1} (+ {"GPU": 1} with use_gpu))``.

    Raises:
        TypeError: not a ``ray.train.ScalingConfig``.
        ValueError: its ``num_workers``/``use_gpu`` differ from ``config.workers``/``config.use_gpu``
            (the solver's shards are cut for ``config.workers``).
    """
    from ray.train import ScalingConfig

    workers = check_scaling(config.workers, config.use_gpu)
    default = {"CPU": 1, "GPU": 1} if config.use_gpu else {"CPU": 1}
    if scaling_config is None:
        return ScalingConfig(num_workers=workers, use_gpu=config.use_gpu, resources_per_worker=default)
    if not isinstance(scaling_config, ScalingConfig):
        raise TypeError(f"scaling_config must be a ray.train.ScalingConfig, got {type(scaling_config).__name__}")
    if scaling_config.num_workers != workers or bool(scaling_config.use_gpu) != config.use_gpu:
        raise ValueError(f"scaling_config has num_workers={scaling_config.num_workers}, "
                         f"use_gpu={scaling_config.use_gpu} but config has workers={workers}, "
                         f"use_gpu={config.use_gpu}; set both the same (the data shards follow config.workers)")
    if scaling_config.resources_per_worker is None:
        return dataclasses.replace(scaling_config, resources_per_worker=default)
    return scaling_config


def run_config_for(config: Any, run_config: "ray.train.RunConfig | None", *, max_failures: int,
                   resource_timeout_s: float) -> "ray.train.RunConfig":
    """``run_config`` with a local ``storage_path`` made absolute, or hg_dist's default ``RunConfig``:

    ``RunConfig(name="hg_dist", storage_path=<config.output>/ray,
    failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=<from
    resource_timeout_s>), checkpoint_config=CheckpointConfig(num_to_keep=2))``.

    Raises:
        TypeError: not a ``ray.train.RunConfig`` (``ray.tune.RunConfig`` is another class).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    if run_config is None:
        return RunConfig(name=RUN_NAME, storage_path=str((Path(config.output) / "ray").resolve()),
                         failure_config=FailureConfig(max_failures=max_failures,
                                                      controller_failure_limit=startup_retries(resource_timeout_s)),
                         checkpoint_config=CheckpointConfig(num_to_keep=NUM_TO_KEEP))
    if not isinstance(run_config, RunConfig):
        raise TypeError(f"run_config must be a ray.train.RunConfig (ray.tune.RunConfig is another class), "
                        f"got {type(run_config).__module__}.{type(run_config).__name__}")
    if run_config.storage_filesystem is None and "://" not in run_config.storage_path:
        return dataclasses.replace(run_config, storage_path=str(Path(run_config.storage_path).expanduser().resolve()))
    return run_config


def run_folder(run_config: "ray.train.RunConfig") -> str:
    """Where Ray Train keeps the run's checkpoints: ``<storage_path>/<name>``."""
    return f"{run_config.storage_path.rstrip('/')}/{run_config.name}"


def fit(build_solver: Callable[..., Any], config: Any, *,
        scaling_config: "ray.train.ScalingConfig | None" = None,
        run_config: "ray.train.RunConfig | None" = None,
        options: FitOptions | None = None) -> "ray.train.Result":
    """Run ``build_solver``'s solver on ``config.workers`` Ray Train workers; return the ``ray.train.Result``.

    Each worker builds its solver inside ``hg_dist.collective.use(<the worker group>)``
    (so the solver averages gradients, hypergradients and metrics over the workers),
    resumes from ``ray.train.get_checkpoint()`` when it is this run's, runs, and
    reports (:mod:`hg_dist.distributed.train_loop`).

    Args:
        build_solver: ``(config, rank=, world_size=) -> BaseImplicitSolver`` on that
            rank's data shard; module-level, so workers can import it.
        config: an ``ExperimentConfig`` (``workers``, ``use_gpu``, ``seed``, ``output`` ...).
        scaling_config: a ``ray.train.ScalingConfig``; ``num_workers``/``use_gpu`` must equal
            ``config.workers``/``config.use_gpu``. Default: those, ``resources_per_worker={"CPU": 1}``
            (plus ``{"GPU": 1}`` with ``use_gpu``).
        run_config: a ``ray.train.RunConfig`` (not ``ray.tune.RunConfig``): ``name`` and
            ``storage_path`` (the run's checkpoints go to ``<storage_path>/<name>``; a rerun with the
            same two resumes), ``failure_config=ray.train.FailureConfig(max_failures=...)`` (worker-group
            restarts, each from the latest checkpoint), ``checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=...)``, ``callbacks``. Ray's defaults apply to what it leaves out (e.g. storage in
            ``~/ray_results``, a timestamped name, no restarts). Default (``None``): ``name="hg_dist"``,
            ``storage_path=<config.output>/ray``, ``num_to_keep=2``, ``max_failures`` 3 on a cluster
            (more than one node, or an autoscaler) and 0 on one fixed node.
        options: hg_dist's own settings: report/checkpoint intervals, the resource wait
            (:class:`~hg_dist.distributed.settings.FitOptions`).

    Outputs: ``config.output`` gets ``history.parquet``, ``tb/`` (rank 0) and ``result.json``;
    the checkpoints live in ``<storage_path>/<name>``.

    Returns:
        ``ray.train.Result``: ``.metrics`` the final metrics, ``.checkpoint`` the final
        solver state (read it with :func:`hg_dist.distributed.read_checkpoint`).

    Raises:
        TypeError / ValueError: bad arguments, before anything starts.
        hg_dist.distributed.resources.InsufficientResourcesError: (a ``ValueError``) the
            cluster can never hold the workers.
        hg_dist.distributed.resources.ResourceTimeoutError: they did not all come within
            ``options.resource_timeout_s``.
        hg_dist.distributed.resources.ClusterUnreachableError: nothing answers at ``RAY_ADDRESS``.
        RunFailedError: the workers met an error no restart cures (divergence, NaN/inf, bad
            settings) and ended the run at once; ``result.json`` says ``"status": "failed"``,
            the error and ``"retried": false``.
        hg_dist.distributed.reachable.WorkerImportError: (a ``ValueError``) the workers cannot
            import ``build_solver``'s module.
        ray.train.TrainingFailedError: the run failed (after ``max_failures`` restarts);
            ``output/result.json`` then says ``"status": "failed"`` with the error, and
            holds the metrics of the latest checkpoint.
        KeyboardInterrupt: Ctrl-C; ``result.json`` says ``"interrupted"`` and names the
            checkpoint a rerun resumes from.
    """
    options = FitOptions() if options is None else options
    if not isinstance(options, FitOptions):
        raise TypeError(f"options must be an hg_dist.distributed.FitOptions, got {type(options).__name__}")
    workers = validate(build_solver, config, options)
    scaling = scaling_config_for(config, scaling_config)
    if run_config is not None:
        run_config = run_config_for(config, run_config, max_failures=0, resource_timeout_s=options.resource_timeout_s)
    cluster = prepare_workers(workers, scaling.resources_per_worker, timeout_s=options.resource_timeout_s)
    check_loadable_on_workers(build_solver)
    if run_config is None:
        run_config = run_config_for(config, None, max_failures=default_max_failures(cluster),
                                    resource_timeout_s=options.resource_timeout_s)
    os.makedirs(config.output, exist_ok=True)
    from ray.train.torch import TorchTrainer

    from hg_dist.distributed.process_group import NodeBoundTorchConfig

    job = Job(build_solver, config, options)
    trainer = TorchTrainer(train_loop, train_loop_config={"job": job}, scaling_config=scaling,
                           run_config=run_config, torch_config=NodeBoundTorchConfig())
    # Ray Train replaces the SIGINT handler for the run (Ctrl-C aborts it) and never
    # puts the previous one back: do so, so that Ctrl-C works again afterwards.
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    tic = time.perf_counter()
    try:
        with sigint_watch() as interrupted:
            try:
                result = trainer.fit()
            except BaseException as error:
                # Ray's handler turns Ctrl-C into an aborted run that ends in whatever the abort raises
                # (SystemExit, an actor error): the signal itself says what happened.
                if interrupted() or isinstance(error, KeyboardInterrupt):
                    write_ending(job, run_config, workers, RunStatus.INTERRUPTED, KeyboardInterrupt(),
                                 wall_time_s=time.perf_counter() - tic)
                    raise KeyboardInterrupt from error
                write_ending(job, run_config, workers, RunStatus.FAILED, error, wall_time_s=time.perf_counter() - tic)
                raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        remove_orphaned_folders()
    ending = read_result_of(job)
    if ending.get("status") == "failed":
        raise RunFailedError(ending.get("error") or "unknown error")
    return result


@contextlib.contextmanager
def sigint_watch() -> Iterator[Callable[[], bool]]:
    """``interrupted()``: whether SIGINT arrived inside the block, whoever handled it.

    Python's C-level signal handler writes the number of every signal it catches to
    the wake-up file descriptor (:func:`signal.set_wakeup_fd`), whichever Python
    handler runs afterwards; Ray Train installs its own SIGINT handler during
    ``fit``, so this is how the caller learns that Ctrl-C ended the run. Only the
    main thread can watch (elsewhere ``interrupted()`` is always ``False``).
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    seen: list[bool] = []

    def interrupted() -> bool:
        try:
            while data := reader.recv(4096):
                seen.extend(byte == signal.SIGINT for byte in data)
        except BlockingIOError:
            pass
        return any(seen)

    old = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    try:
        yield interrupted
    finally:
        signal.set_wakeup_fd(old)
        reader.close()
        writer.close()


def read_result_of(job: Job) -> dict[str, Any]:
    """``result.json`` if this ``fit`` call's workers wrote it (``{}`` otherwise)."""
    from hg_dist.experiment import read_result

    written = read_result(job.config.output)
    return written if written.get("attempt") == job.attempt else {}


def registered_checkpoint(run_config: "ray.train.RunConfig") -> "ray.train.Checkpoint | None":
    """The checkpoint Ray Train resumes the run in ``<storage_path>/<name>`` from: the latest one its
    controller registered (``ray.train.Result.from_path``); ``None`` before any.

    A checkpoint folder whose report the controller never took (Ctrl-C during a report)
    is in storage too, but Ray does not resume from it, so folders are not scanned.
    """
    from ray.train import Result

    try:
        return Result.from_path(run_folder(run_config), storage_filesystem=run_config.storage_filesystem).checkpoint
    except (RuntimeError, OSError, ValueError):
        return None


def latest_checkpoint(job: Job, run_config: "ray.train.RunConfig") -> str | None:
    """The path of the checkpoint a rerun of ``job`` resumes from (:func:`registered_checkpoint`), if this
    run wrote it (its ``run.json`` holds ``job.run_id``); ``None`` otherwise."""
    checkpoint = registered_checkpoint(run_config)
    if checkpoint is None:
        return None
    try:
        return checkpoint.path if checkpoint_run_id(checkpoint) == job.run_id else None
    except (OSError, ValueError):
        return None


def write_ending(job: Job, run_config: "ray.train.RunConfig", workers: int, status: RunStatus,
                 error: BaseException | None, **info: Any) -> None:
    """Write ``output/result.json`` for a run that did not complete: ``status``, ``error`` and the
    metrics of the checkpoint a rerun resumes from (``{}`` if there is none). A status in
    :data:`ENDED_FROM_OUTSIDE` already there is kept (the error goes in as ``error_while_stopped``)."""
    from hg_dist.experiment import read_result, update_result, write_result

    message = None if error is None else f"{type(error).__name__}: {error}"
    if read_result(job.config.output).get("status") in ENDED_FROM_OUTSIDE:
        update_result(job.config.output, error_while_stopped=message)
        return
    metrics, counters, path = {}, {}, latest_checkpoint(job, run_config)
    if path is not None:
        from ray.train import Checkpoint

        try:
            with Checkpoint(path, filesystem=run_config.storage_filesystem).as_directory() as folder:
                state = read(Path(folder) / STATE_FILE)
            metrics = {name: values[-1] for name, values in state["recorder"]["archive"].items() if values}
            counters = dict(state["counters"])
        except (OSError, ValueError, KeyError):
            pass
    write_result(job.config.output, metrics, job.config, status=status, error=message, workers=workers,
                 global_step=counters.get("global_step"), outer_steps=counters.get("outer_step"),
                 last_checkpoint=path, **info)


def run_experiment(build_solver: Callable[..., Any], config: Any, *,
                   scaling_config: "ray.train.ScalingConfig | None" = None,
                   run_config: "ray.train.RunConfig | None" = None,
                   options: FitOptions | None = None) -> dict[str, float]:
    """``run_local`` for ``config.workers == 1``, else :func:`fit`; returns the final metrics.

    Both write ``output/history.parquet``, ``output/result.json`` and TensorBoard logs
    under ``output/tb`` (in the distributed case rank 0 writes them), checkpoint every
    ``options.checkpoint_every`` and resume from their latest checkpoint when run
    again. Both claim the output folder first (:func:`hg_dist.run_folder.claim`): one
    holding another run, or in use by a process now, is refused (``ConfigError``).
    ``scaling_config`` and ``run_config`` apply to the distributed case only (see :func:`fit`).
    """
    from hg_dist.data import check_workers
    from hg_dist.experiment import Terminated, claim_output, run_local, update_result

    options = FitOptions() if options is None else options
    if check_workers(config.workers) == 1:
        return run_local(build_solver, config, checkpoint_every=options.checkpoint_every)

    def terminated(signum: int) -> None:
        error = Terminated(signum)
        update_result(config.output, status=RunStatus.TERMINATED, error=f"{type(error).__name__}: {error}")

    fired: list[int] = []
    with claim_output(config.output, build_solver, config):
        connect()  # ray.init installs its own SIGTERM handler (sys.exit): connect first, then put ours over it
        try:
            with _sigterm_as_ctrl_c(lambda signum: (fired.append(signum), terminated(signum))):
                return dict(fit(build_solver, config, scaling_config=scaling_config, run_config=run_config,
                                 options=options).metrics)
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
