"""``run_search``: a Ray Tune search whose trials are whole bilevel solves.

Layout of ``output`` after a search::

    output/
      results.parquet     one row per trial (hg_dist.tune.results.table_schema())
      results.txt         the same table as printed
      best_config.json    the best trial's ExperimentConfig (+ where build_solver lives)
      trials/<trial>/     each trial's own outputs, TensorBoard logs included:
                          ``tensorboard --logdir output/trials`` compares them
      tune/               Ray Tune's experiment state (resumable with tune.Tuner.restore)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.result_grid import ResultGrid
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.sample import Categorical

from hg_dist.distributed.resources import connect, inspect_cluster
from hg_dist.experiment import RESULT_FILE, ExperimentConfig
from hg_dist.tune.results import best_row, format_table, make_table, save_best, write_table
from hg_dist.tune.space import check_space, to_experiment_config, trial_settings
from hg_dist.tune.trainable import ERROR_KEY, TRIAL_CPU, make_trainable, trial_demand

__all__ = ["SearchResult", "run_search"]


@dataclass
class SearchResult:
    """What :func:`run_search` returns.

    Attributes:
        table: the results table (one row per trial).
        best: the best trial's row (``None`` if every trial failed).
        best_config: its :class:`ExperimentConfig` (``None`` likewise).
        output: the search directory; ``results.parquet`` and ``best_config.json`` are in it.
        result_grid: Tune's own results, for anything the table leaves out.
    """

    table: pa.Table
    best: dict[str, Any] | None
    best_config: ExperimentConfig | None
    output: Path
    result_grid: ResultGrid

    def __str__(self) -> str:
        return format_table(self.table)


def _short_error(error: BaseException) -> str:
    """The root cause's type and message, without Ray's wrapping tracebacks."""
    cause = error
    while True:
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None or inner is cause:
            break
        cause = inner
    text = str(cause).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    # Ray's RayTaskError text is a traceback whose last line is "Type: message".
    message = lines[-1].strip() if lines else ""
    name = type(cause).__name__
    return message if message.startswith(name) or ": " in message[:60] else f"{name}: {message}"


def _trial_name(trial: Trial) -> str:
    approx = trial.config.get("approximator", {})
    name = approx.get("name", "trial") if isinstance(approx, Mapping) else "trial"
    return f"{name}_{trial.trial_id}"


def _workers_candidates(space: Mapping[str, Any], base: ExperimentConfig) -> list[int] | None:
    """The worker counts trials of ``space`` can have; ``None`` when a domain hides them (``sample_from``)."""
    value = space.get("workers", base.workers)
    if isinstance(value, Categorical):
        return list(value.categories)
    if isinstance(value, Mapping) and "grid_search" in value:
        return list(value["grid_search"])
    return [value] if isinstance(value, int) else None


def _rows(result_grid: ResultGrid, *, base: ExperimentConfig, trials_dir: Path,
          metric: str, mode: str) -> list[dict[str, Any]]:
    rows = []
    for result in result_grid:
        trial = Path(result.path).name
        config = to_experiment_config(result.config, base, output=str(trials_dir / trial))
        history = result.metrics_dataframe
        metrics = result.metrics or {}
        values = []
        if history is not None and metric in history:
            values = [float(v) for v in history[metric] if v is not None and math.isfinite(float(v))]
        best = (max(values) if mode == "max" else min(values)) if values else None
        error = _short_error(result.error) if result.error is not None else metrics.get(ERROR_KEY)
        if error is not None:
            status = "failed"
        elif (Path(config.output) / RESULT_FILE).exists():  # written only when a solve runs to its end
            status = "completed"
        else:
            status = "stopped"
        rows.append({
            "trial": trial, "status": status, **trial_settings(config),
            "best_metric": best, "last_metric": values[-1] if values else None,
            "outer_steps": int(metrics.get("training_iteration", 0) or 0),
            "wall_time_s": metrics.get("time_total_s"),
            "hvps": int(metrics["hvps_total"]) if "hvps_total" in metrics else None,
            "error": error,
            "config": json.dumps(dataclasses.asdict(config), default=str),
        })
    return rows


def run_search(build_solver: Callable[[ExperimentConfig, int, int], Any],
               space: Mapping[str, Any],
               *,
               output: str | Path = "runs/search",
               num_samples: int = 1,
               metric: str = "outer_loss",
               mode: str = "min",
               base: ExperimentConfig | None = None,
               scheduler: TrialScheduler | None = None,
               grace_period: int = 2,
               reduction_factor: int = 2,
               max_concurrent_trials: int | None = None,
               cpus_per_worker: float = 1.0,
               seed: int | None = 0,
               verbose: int = 0,
               print_table: bool = True,
               ) -> SearchResult:
    """Search ``space`` with Ray Tune, one whole bilevel solve per trial; write and print the results.

    Args:
        build_solver: ``build_solver(config, rank, world_size) -> solver`` (module-level,
            e.g. ``examples.data_hypercleaning.build_solver``).
        space: a nested search space (see :mod:`hg_dist.tune.space`); ``workers`` in it
            (or in ``base``) makes trials ``W``-worker Ray Train runs.
        output: the search directory (see the module docs for its layout).
        num_samples: samples of the space (times the size of any grid in it).
        metric, mode: the outer metric the solver records (``"outer_loss"``, which every
            solver records, or one its ``outer_update`` returns, e.g. ``"val_acc"``) and
            whether higher (``"max"``) or lower (``"min"``) is better.
        base: values of the :class:`ExperimentConfig` fields the space leaves out.
        scheduler: a Tune scheduler; default ASHA over outer steps
            (``ASHAScheduler(grace_period, reduction_factor, max_t=10**6)``: it stops
            trials early, never at a step limit). Pass ``tune.schedulers.FIFOScheduler()``
            to run every trial to the end.
        max_concurrent_trials: default: as many as fit the cluster's CPUs when every
            trial is as large as the largest ``workers`` in the space (at least 1); on an
            autoscaling cluster, the CPUs it can grow to, or no limit when it does not say
            (:func:`hg_dist.distributed.resources.inspect_cluster`).
        cpus_per_worker: CPUs per solving process (a one-worker trial, or each Train worker).
        seed: seeds the sampling of the space (``None``: unseeded).
        verbose: Tune's console verbosity (0 silent … 2 every result).
        print_table: print the results table at the end.

    Starts a local Ray instance if none is running (or connects to ``RAY_ADDRESS``).
    Failing trials (an exception, or a NaN / infinite outer metric) are recorded as
    ``failed`` with their error; the search goes on.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    check_space(space)
    base = ExperimentConfig() if base is None else base
    output = Path(output).resolve()
    trials_dir = output / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    connect()
    # Size by what the cluster can hold: what it has when it is fixed, its stated maximum when it
    # autoscales (unknown: no limit; pending trials are the demand that makes it grow).
    cluster = inspect_cluster()
    fixed = cluster.autoscaling is False
    total_cpus = cluster.total.get("CPU", 0.0) if fixed else (cluster.max_resources or {}).get("CPU")
    workers = _workers_candidates(space, base)
    largest = max(trial_demand(w, cpus_per_worker) for w in (workers or [1]))
    if total_cpus is not None and largest > total_cpus:
        raise ValueError(f"a trial of the space needs {largest:g} CPUs (workers × cpus_per_worker plus "
                         f"{TRIAL_CPU} for the trial) but the Ray cluster has {total_cpus:g}"
                         f"{'' if fixed else ' at most'} ({cluster.how}); lower cpus_per_worker (e.g. "
                         f"cpus_per_worker={total_cpus / (largest / cpus_per_worker):.2g}) or the workers in the space")
    if max_concurrent_trials is None:
        max_concurrent_trials = max(1, int(total_cpus // largest)) if total_cpus is not None else 0
    if scheduler is None:
        scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=grace_period,
                                  reduction_factor=reduction_factor, max_t=10**6)
    trainable = make_trainable(build_solver, trials_dir=trials_dir, metric=metric, mode=mode, base=base,
                               cpus_per_worker=cpus_per_worker)
    tuner = tune.Tuner(
        trainable,
        param_space=dict(space),
        tune_config=tune.TuneConfig(
            metric=metric, mode=mode, num_samples=num_samples, scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent_trials),
            # A reused trial actor is not killed when ASHA stops its trial, and neither is the
            # Train run it started: reuse actors only when no trial starts one.
            reuse_actors=workers is not None and max(workers) == 1,
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name="tune", storage_path=str(output), verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    result_grid = tuner.fit()
    table = make_table(_rows(result_grid, base=base, trials_dir=trials_dir, metric=metric, mode=mode),
                       metric, mode)
    write_table(table, output / "results.parquet")
    text = format_table(table)
    (output / "results.txt").write_text(text + "\n")
    best = best_row(table)
    best_config = None
    if best is not None:
        best_config = ExperimentConfig(**json.loads(best["config"]))
        save_best(output / "best_config.json", best_config, build_solver=build_solver, metric=metric, mode=mode,
                  value=best["best_metric"], trial=best["trial"])
    if print_table:
        print(text)
        if best is not None:
            print(f"best: {best['trial']} {metric}={best['best_metric']:.4g}; re-run with "
                  f"python -m hg_dist.tune.rerun {output / 'best_config.json'}")
    return SearchResult(table=table, best=best, best_config=best_config, output=output, result_grid=result_grid)
