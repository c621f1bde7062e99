"""The Tune trainable: one trial = one whole bilevel solve, reported after every outer step.

A trial flattens its sampled config (:func:`~hg_dist.tune.space.to_experiment_config`),
builds the solver with the example's ``build_solver(config, rank, world_size)`` and
runs it. Tune gets one result per outer step, so one Tune *iteration*
(``training_iteration``) is one outer step and schedulers such as ASHA compare
trials step by step and stop bad ones early.

* ``config.workers == 1``: the solve runs in the trial's own process, as
  :func:`hg_dist.experiment.run_local` would (same seeding and outputs:
  ``history.parquet``, ``result.json``, ``tb/``), with a :class:`SolveReporter`
  solver callback reporting to Tune. The trial holds ``cpus_per_worker`` CPUs.
* ``config.workers == W > 1``: the trial starts a ``W``-worker Ray Train run with
  the distributed layer's worker loop (:func:`hg_dist.distributed.train_loop.train_loop`,
  run with ``report_every=1``, so it reports every outer step to Train) and forwards rank 0's reports to Tune
  (:class:`TrainToTune`, a ``TuneReportCallback``). The trial itself holds only
  :data:`TRIAL_CPU` (Tune rejects 0) and each worker ``cpus_per_worker``;
  :func:`trial_demand` is what such a trial occupies in all, which the search uses
  to decide how many trials run at once.

Every result carries, besides the solver's metrics, ``outer_step``, ``hvps_total``
(Hessian-vector products so far), ``best_metric`` and ``wall_time_s``. A
non-finite outer metric raises :class:`TrialDivergedError`; Tune records the trial
as failed, with that error, and the search goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.integration.ray_train import TuneReportCallback

from hg_dist.experiment import ExperimentConfig, run_local
from hg_dist.solver import BaseSolver
from hg_dist.tune.space import to_experiment_config

__all__ = ["ResultTracker", "SolveReporter", "TRIAL_CPU", "TrainToTune", "TrialDivergedError",
           "attach_callback", "make_trainable", "trial_demand", "trial_resources"]

BuildSolver = Callable[..., Any]

TRIAL_CPU = 0.01
"""CPU a multi-worker trial holds itself (its Train workers hold the rest)."""


ERROR_KEY = "hg_dist_error"
"""Result key of an error found while forwarding a Train run's reports (the trial is then failed)."""


class TrialDivergedError(RuntimeError):
    """The outer metric became NaN or infinite: the trial diverged."""


class ResultTracker:
    """Turns the solver's metrics after each outer step into a Tune result.

    Adds ``outer_step``, ``hvps_total`` (sum of the per-step ``ihvp_num_hvps``),
    ``best_metric`` (best ``metric`` so far) and ``wall_time_s`` (since the tracker
    was made), and keeps only numbers.

    Args:
        metric: the key of the outer metric in the solver's metrics, e.g. ``"outer_loss"``.
        mode: ``"max"`` or ``"min"``.
    """

    def __init__(self, metric: str, mode: str) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.metric = metric
        self.mode = mode
        self.start = time.perf_counter()
        self.hvps_total = 0
        self.best = math.nan

    def update(self, metrics: Mapping[str, Any], outer_step: int) -> dict[str, float]:
        """The result for the outer step ``outer_step`` whose metrics are ``metrics``.

        Raises:
            KeyError: ``metric`` is not among ``metrics``.
            TrialDivergedError: ``metrics[metric]`` is NaN or infinite.
        """
        if self.metric not in metrics:
            raise KeyError(f"metric={self.metric!r} is not among the solver's metrics {sorted(metrics)}; "
                           f"pass metric= one of them to run_search")
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            raise TrialDivergedError(f"{self.metric} = {value} at outer step {outer_step}: the solve diverged; "
                                     f"lower the outer or IHVP step size, or raise rho")
        self.hvps_total += int(metrics.get("ihvp_num_hvps", 0))
        if math.isnan(self.best) or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
        result = {key: float(val) for key, val in metrics.items()
                  if isinstance(val, (int, float)) and not isinstance(val, bool)}
        result.update(outer_step=int(outer_step), hvps_total=self.hvps_total, best_metric=self.best,
                      wall_time_s=time.perf_counter() - self.start)
        return result


class SolveReporter:
    """Solver callback ``(solver, metrics)``: ``report(tracker.update(metrics, solver.outer_step))``.

    Args:
        metric, mode: see :class:`ResultTracker`.
        report: where results go, e.g. ``ray.tune.report``.
    """

    def __init__(self, metric: str, mode: str, report: Callable[[dict[str, Any]], None]) -> None:
        self.tracker = ResultTracker(metric, mode)
        self.report = report

    def __call__(self, solver: Any, metrics: dict[str, float]) -> None:
        self.report(self.tracker.update(metrics, solver.outer_step))


class TrainToTune(TuneReportCallback):
    """Forwards a Train run's reports (rank 0's metrics) to the enclosing Tune trial.

    The trial runs its workers with ``report_every=1`` (one report per outer step;
    the distributed layer's default reports far less often, see
    :class:`~hg_dist.distributed.TrainSettings`), plus a final report at the end
    with the same ``outer_step``; that last one is dropped, so a Tune iteration
    stays one outer step for one-worker and multi-worker trials alike. A missing or
    non-finite metric is reported as ``{metric: nan, "hg_dist_error": message}``
    (raising here would stop the Train controller rather than fail the trial).
    Must be created inside a Tune trial.
    """

    def __init__(self, metric: str, mode: str) -> None:
        super().__init__()
        self.tracker = ResultTracker(metric, mode)
        self.last_step = -1

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        step = int(metrics[0].get("outer_step", self.last_step + 1))
        if step == self.last_step:
            return
        self.last_step = step
        try:
            result = self.tracker.update(metrics[0], step)
        except (KeyError, TrialDivergedError) as error:
            # An exception here would stop the Train controller, not fail the trial: report the
            # error instead (the results table marks the trial failed) with the metric as NaN.
            result = {self.tracker.metric: math.nan, ERROR_KEY: f"{type(error).__name__}: {error}",
                      "outer_step": step}
        super().after_report(run_context, [result], None)


def attach_callback(solver: Any, callback: Callable[[Any, dict[str, float]], None]) -> Any:
    """Append ``callback`` to ``solver.callbacks`` (the solver calls each after every outer step)."""
    if not isinstance(solver, BaseSolver):
        raise TypeError(f"build_solver must return an hg_dist.solver.BaseSolver (its callbacks report each outer "
                        f"step to Tune), got {type(solver).__name__}")
    solver.callbacks = (*solver.callbacks, callback)
    return solver


def trial_resources(config: Mapping[str, Any], cpus_per_worker: float = 1.0) -> PlacementGroupFactory:
    """Resources a trial's own process requests, from its sampled config's ``workers``.

    ``cpus_per_worker`` for a one-worker trial (it solves in its own process),
    :data:`TRIAL_CPU` for a multi-worker one (its Train workers request their own).
    """
    workers = config.get("workers", 1)
    return PlacementGroupFactory([{"CPU": cpus_per_worker if workers == 1 else TRIAL_CPU}])


def trial_demand(workers: int, cpus_per_worker: float = 1.0) -> float:
    """CPUs a trial occupies in all: its own process and its Train workers."""
    return cpus_per_worker if workers == 1 else TRIAL_CPU + workers * cpus_per_worker


def _solve_here(build_solver: BuildSolver, config: ExperimentConfig, metric: str, mode: str) -> None:
    """One-worker trial: :func:`~hg_dist.experiment.run_local` with a reporter attached."""

    def build_reporting_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> BaseSolver:
        solver = attach_callback(build_solver(config, rank=rank, world_size=world_size),
                                 SolveReporter(metric, mode, tune.report))
        solver.progress = False
        return solver

    run_local(build_reporting_solver, config)


def _solve_on_workers(build_solver: BuildSolver, config: ExperimentConfig, metric: str, mode: str,
                      cpus_per_worker: float) -> None:
    """Multi-worker trial: the distributed layer's Train run, its reports forwarded to Tune."""
    from hg_dist.distributed.runner import fit
    from hg_dist.distributed.settings import TrainSettings

    Path(config.output).mkdir(parents=True, exist_ok=True)
    # report_every=1: Tune (ASHA) counts one iteration per outer step, so the workers report every outer
    # step (≈2 s each with 2 CPU workers). A coarser report_every would make a Tune iteration several outer
    # steps and hvps_total count only the reported ones.
    fit(build_solver, config, TrainSettings(resources_per_worker={"CPU": cpus_per_worker}, precheck=False,
                                            num_to_keep=1, report_every=1, callbacks=(TrainToTune(metric, mode),)))


def run_trial(config: dict[str, Any], *, build_solver: BuildSolver, base: ExperimentConfig | None,
              trials_dir: str, metric: str, mode: str, cpus_per_worker: float) -> None:
    """The function trainable's body: flatten ``config``, run one solve, report every outer step.

    The trial's outputs go to ``trials_dir/<trial name>``.
    """
    trial_name = tune.get_context().get_trial_name()
    experiment = to_experiment_config(config, base, output=str(Path(trials_dir) / trial_name))
    if experiment.workers == 1:
        _solve_here(build_solver, experiment, metric, mode)
    else:
        _solve_on_workers(build_solver, experiment, metric, mode, cpus_per_worker)


def make_trainable(build_solver: BuildSolver, *, trials_dir: str | Path, metric: str, mode: str = "min",
                   base: ExperimentConfig | None = None, cpus_per_worker: float = 1.0) -> Any:
    """A Tune trainable (with per-trial resources) that runs one bilevel solve per trial.

    Args:
        build_solver: ``build_solver(config, rank, world_size) -> solver``, a
            module-level function (Train workers import it).
        trials_dir: each trial writes its outputs (TensorBoard logs included) to
            ``trials_dir/<trial name>``, so ``tensorboard --logdir trials_dir``
            shows all trials side by side. Must be absolute (Tune runs trials in
            their own working directories).
        metric, mode: the outer metric the solver records and its direction.
        base: values of the :class:`ExperimentConfig` fields the space leaves out.
        cpus_per_worker: CPUs per solving process (a one-worker trial, or each Train worker).

    Returns:
        ``tune.with_resources(...)`` of the function trainable, for ``tune.Tuner``.
    """
    trials_dir = Path(trials_dir)
    if not trials_dir.is_absolute():
        raise ValueError(f"trials_dir must be an absolute path, got {str(trials_dir)!r}; "
                         f"pass Path(trials_dir).resolve()")
    if not callable(build_solver):
        raise TypeError(f"build_solver must be callable as build_solver(config, rank, world_size), "
                        f"got {type(build_solver).__name__}")
    if not cpus_per_worker > 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")

    def hg_dist_trial(config: dict[str, Any]) -> None:
        run_trial(config, build_solver=build_solver, base=base, trials_dir=str(trials_dir), metric=metric,
                  mode=mode, cpus_per_worker=cpus_per_worker)

    return tune.with_resources(hg_dist_trial, lambda config: trial_resources(config, cpus_per_worker))
