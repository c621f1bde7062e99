"""``run_search``: a Ray Tune search whose trials are whole bilevel solves, resumable, with live progress.

Tune's settings come in as Tune's own objects (``ray.tune.TuneConfig``, ``ray.tune.RunConfig``);
what hg_dist adds is :class:`SearchOptions`. The search folder is ``RunConfig``'s
``storage_path/name`` and is Tune's experiment folder: ``ray.tune.ExperimentAnalysis(folder)``
and ``ray.tune.Tuner.restore(folder, trainable)`` read it (give an absolute path or a URI).
Its layout: see :mod:`hg_dist.tune.storage`.

* **Searchers**: ``SearchOptions(search="random")`` (Tune's random/grid generator) or ``"optuna"``
  (Ray's ``OptunaSearch``, define-by-run over the same nested space, see
  :mod:`hg_dist.tune.searchers`), or a Tune searcher of your own in ``TuneConfig.search_alg``;
  ASHA (:func:`default_scheduler`) stops bad trials early with any of them.
* **Concurrency by resources**: no limit is derived from the cluster: trials start as
  Tune's resource queue admits them (a one-worker trial asks for
  ``cpus_per_worker``, a multi-worker one for :data:`~hg_dist.tune.trainable.TRIAL_CPU`
  while its Train workers ask Ray for theirs), so on an autoscaling cluster the
  pending demand is what adds nodes.
* **Resume**: every trial reports a checkpoint every ``checkpoint_every`` outer steps.
  Ctrl-C stops the search (Tune saves its state) and :func:`run_search` raises
  :class:`SearchInterrupted` after writing the table of what exists; ``resume=True``
  continues it with ``Tuner.restore``: finished trials are kept, never rerun,
  unfinished ones continue from their last checkpoint, unstarted ones start, and the
  table, ``best_config.json`` and the plot are rebuilt from all trials. A folder that
  holds a search is never reused without ``resume=True``.
* **Progress**: one line per ended trial and a status line every ``progress_interval``
  seconds (:class:`~hg_dist.tune.progress.SearchProgress`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray import tune
from ray.tune.experiment import Trial
from ray.tune import ResultGrid
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.sample import Categorical

from hg_dist.distributed.ray_internals import replace_restored_callback
from hg_dist.distributed.reachable import check_loadable_on_workers
from hg_dist.distributed.resources import connect, inspect_cluster
from hg_dist.experiment import RESULT_FILE, ExperimentConfig, merge_result
from hg_dist.tune.plots import plot_search
from hg_dist.status import RunStatus
from hg_dist.tune.progress import FINAL, SearchProgress, trial_status
from hg_dist.tune.results import best_record, best_row, format_table, make_table, solver_reference, table_rows
from hg_dist.tune.searchers import SEARCHERS, check_searchable, grid_points, make_searcher
from hg_dist.tune.space import check_space
from hg_dist.tune.space_record import describe_space, space_changes
from hg_dist.tune.storage import MARKER_FILE, SearchStorage
from hg_dist.tune.trainable import (RUN_DIR, TRIAL_CPU, end_history_at, make_trainable, release_workers,
                                    trial_demand)

__all__ = ["SearchExistsError", "SearchFolderLostError", "SearchInterrupted", "SearchOptions", "SearchResult",
           "default_scheduler", "run_search"]


class SearchExistsError(ValueError):
    """``output`` already holds a search and ``resume`` was not asked for (or the other way round)."""


@dataclass
class SearchResult:
    """What :func:`run_search` returns (and :class:`SearchInterrupted` carries).

    Attributes:
        table: the results table (one row per trial).
        best: the best trial's row (``None`` if no trial reported without failing).
        best_config: its :class:`ExperimentConfig` (``None`` likewise).
        output: the search folder (a local path, or the URI given).
        result_grid: Tune's own results, for anything the table leaves out.
        interrupted: the search was stopped before every trial ended.
        plot: the PNG written (``None`` without matplotlib or results).
    """

    table: pa.Table
    best: dict[str, Any] | None
    best_config: ExperimentConfig | None
    output: Path | str
    result_grid: ResultGrid
    interrupted: bool = False
    plot: str | None = None

    def __str__(self) -> str:
        return format_table(self.table)


class SearchInterrupted(KeyboardInterrupt):
    """The search was stopped (Ctrl-C) before all its trials ended.

    Its table (``result``) and files are written; ``run_search(..., resume=True)``
    (``search.py ... --resume``) continues it.
    """

    def __init__(self, message: str, result: SearchResult) -> None:
        super().__init__(message)
        self.result = result


class SearchFolderLostError(RuntimeError):
    """The search's folder was deleted or moved while the search ran: its results are gone."""


def _check_folder_kept(storage: SearchStorage) -> None:
    """Raise :class:`SearchFolderLostError` if the marker written when the search started is gone
    (writing the results now would recreate a folder holding a fraction of the search)."""
    if not storage.exists(MARKER_FILE):
        raise SearchFolderLostError(
            f"the search folder {storage.show()} was deleted or moved while the search ran ({MARKER_FILE} is gone): "
            f"its trials' files and Tune's state are lost, so no results were written; start the search again, "
            f"into a folder that nothing else removes")


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


def _check_capacity(workers: list[int] | None, cpus_per_worker: float, use_gpu: bool) -> None:
    """On a fixed cluster, a trial that can never fit fails now, naming what it needs and what there is."""
    resources = ray.cluster_resources()
    total_cpus = resources.get("CPU", 0.0)
    largest = max(trial_demand(w, cpus_per_worker) for w in (workers or [1]))
    if largest > total_cpus:
        raise ValueError(f"a trial of the space needs {largest:g} CPUs (workers × cpus_per_worker plus "
                         f"{TRIAL_CPU} for the trial) but the Ray cluster has {total_cpus:g}; lower "
                         f"cpus_per_worker (e.g. cpus_per_worker={total_cpus / (largest / cpus_per_worker):.2g}) "
                         f"or the workers in the space")
    gpus = max(workers or [1])
    if use_gpu and resources.get("GPU", 0.0) < gpus:
        raise ValueError(f"use_gpu=True: a trial needs {gpus} GPU(s) but the Ray cluster has "
                         f"{resources.get('GPU', 0.0):g}; drop --use-gpu or start Ray where there are GPUs")


def _marker(storage: SearchStorage, *, metric: str, mode: str, search: str, num_samples: int, total: int,
            build_solver: Callable[..., Any], settings: Mapping[str, Any] | None,
            space: Mapping[str, Any]) -> dict[str, Any]:
    try:
        reference = solver_reference(build_solver)
    except ValueError:
        reference = {"build_solver": None}
    return {"format": 1, "metric": metric, "mode": mode, "search": search, "num_samples": num_samples,
            "trials": total, **reference, "settings": dict(settings or {}), "space": describe_space(space),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def read_marker(storage: SearchStorage) -> dict[str, Any]:
    """The search's ``search.json`` (``{}`` when there is none).

    Raises:
        SearchExistsError: it cannot be read or is not a JSON object (naming the folder and the way on).
    """
    try:
        record = storage.read_json(MARKER_FILE) if storage.exists(MARKER_FILE) else {}
        if not isinstance(record, dict):
            raise ValueError(f"it holds a {type(record).__name__}, not a JSON object")
    except (OSError, ValueError) as error:
        raise SearchExistsError(f"cannot resume the search in {storage.show()}: its {MARKER_FILE} is damaged "
                                f"({type(error).__name__}: {error}); start a new search in another folder with "
                                f"--output, or delete {storage.show()}") from None
    return record


def _check_resumable(storage: SearchStorage, resume: bool, *, space: Mapping[str, Any] | None = None,
                     **expected: Any) -> dict[str, Any] | None:
    """The recorded marker when resuming; raise :class:`SearchExistsError` for a folder used the wrong way.

    When resuming, the recorded ``expected`` settings and the search ``space`` (see
    :mod:`hg_dist.tune.space_record`) must be the ones given now: ``Tuner.restore``
    would run the recorded space, whatever the code now says.
    """
    holds = storage.holds_search()
    where = storage.show()
    if not resume:
        if holds:
            raise SearchExistsError(f"{where} already holds a search; continue it with --resume (resume=True), or "
                                    f"start a new one in another folder with --output (output=)")
        return None
    if not holds:
        raise SearchExistsError(f"there is no search to resume in {where}; start one there without --resume")
    record = read_marker(storage)
    for key, value in expected.items():
        if key in record and record[key] != value:
            raise SearchExistsError(f"the search in {where} was started with {key}={record[key]!r}, not {value!r}; "
                                    f"resume it with the same settings, or start a new search with another "
                                    f"--output")
    changes = space_changes(record["space"], describe_space(space)) if space is not None and "space" in record \
        else []
    if changes:
        raise SearchExistsError(f"the search space was changed since the search in {where} was started: "
                                f"{'; '.join(changes)}. A resumed search runs the space it was started with, so "
                                f"the change would be ignored: restore the space to resume, or start a new search "
                                f"with the changed space in another folder (--output)")
    return record


@dataclass(frozen=True)
class SearchOptions:
    """What hg_dist adds to a Tune search (Tune's own settings go in ``TuneConfig``/``RunConfig``).

    Attributes:
        search: the searcher hg_dist builds over the nested space when
            ``TuneConfig.search_alg`` is ``None``: ``"random"`` (Tune's random/grid
            generator) or ``"optuna"`` (see :mod:`hg_dist.tune.searchers`).
        seed: seeds the sampling of the space (``None``: unseeded).
        cpus_per_worker: CPUs per solving process (a one-worker trial, or each Train worker).
        checkpoint_every: outer steps between trial checkpoints.
        fixed_cluster: the cluster cannot grow (no autoscaler): a trial that can never
            fit fails at once; ``None``: decided from the cluster
            (:func:`hg_dist.distributed.resources.inspect_cluster`; a Ray this call starts is fixed).
        progress: print a line per ended trial and a status line every ``progress_interval`` seconds.
        progress_interval: seconds between status lines.
        print_table: print the results table at the end.
        plot: write ``search.png`` (needs matplotlib).
    """

    search: str = "random"
    seed: int | None = 0
    cpus_per_worker: float = 1.0
    checkpoint_every: int = 5
    fixed_cluster: bool | None = None
    progress: bool = True
    progress_interval: float = 30.0
    print_table: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        if self.search not in SEARCHERS:
            raise ValueError(f"search must be one of {', '.join(map(repr, SEARCHERS))}, got {self.search!r}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be an int >= 1 (outer steps), got {self.checkpoint_every!r}")
        if isinstance(self.cpus_per_worker, bool) or not isinstance(self.cpus_per_worker, (int, float)) \
                or not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be a number > 0, got {self.cpus_per_worker!r}")
        if not (isinstance(self.progress_interval, (int, float)) and self.progress_interval >= 0):
            raise ValueError(f"progress_interval must be a number of seconds >= 0, got {self.progress_interval!r}")


DEFAULT_STORAGE_PATH = "runs"
DEFAULT_NAME = "search"
"""``RunConfig(storage_path=..., name=...)`` when left out: the search folder is ``runs/search``."""


def default_scheduler(grace_period: int = 2, reduction_factor: int = 2) -> TrialScheduler:
    """The scheduler when ``TuneConfig.scheduler`` is ``None``: ASHA over outer steps. ``max_t=10**6``:
    it stops trials early, never at a step limit."""
    return ASHAScheduler(time_attr="outer_step", grace_period=grace_period, reduction_factor=reduction_factor,
                         max_t=10**6)


def _output_of(run_config: tune.RunConfig) -> str:
    """The search folder: ``storage_path/name`` of the run config (defaults ``runs`` and ``search``)."""
    if run_config.storage_filesystem is not None:
        raise ValueError("run_config.storage_filesystem is not supported by run_search; give the storage as a "
                         "URI in run_config.storage_path (s3://bucket/path, gs://..., file:///abs/path)")
    storage_path = os.fspath(run_config.storage_path or DEFAULT_STORAGE_PATH)
    name = run_config.name or DEFAULT_NAME
    if "/" in name or name in (".", ".."):
        raise ValueError(f"run_config.name must be one folder name (the search folder inside storage_path), "
                         f"got {name!r}")
    return f"{storage_path.rstrip('/')}/{name}" if "://" in storage_path else str(Path(storage_path) / name)


def _check_tune_config(config: tune.TuneConfig, options: SearchOptions) -> tuple[str, str]:
    """``(metric, mode)`` of ``config`` (defaults ``outer_loss``, ``min``); a ``ValueError`` for what
    hg_dist cannot honour."""
    metric = config.metric or "outer_loss"
    mode = config.mode or "min"
    if mode not in ("max", "min"):
        raise ValueError(f"tune_config.mode must be 'max' or 'min', got {mode!r}")
    if isinstance(config.num_samples, bool) or not isinstance(config.num_samples, int) or config.num_samples < 1:
        raise ValueError(f"tune_config.num_samples must be an int >= 1, got {config.num_samples!r}")
    if config.trial_name_creator is not None or config.trial_dirname_creator is not None:
        raise ValueError("tune_config.trial_name_creator / trial_dirname_creator: hg_dist names each trial "
                         "<method>_<trial id> (its folder in trials/ and in Tune's experiment); leave them None")
    if config.search_alg is not None and options.search != "random":
        raise ValueError(f"tune_config.search_alg is set and options.search={options.search!r}: give one "
                         f"searcher (options.search builds hg_dist's over the nested space)")
    return metric, mode


def _max_failures(run_config: tune.RunConfig) -> int:
    failures = run_config.failure_config.max_failures if run_config.failure_config is not None else 0
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < -1:
        raise ValueError(f"max_failures must be an int >= 0 (or -1 for unlimited retries), got {failures!r}")
    return failures


def run_search(build_solver: Callable[[ExperimentConfig, int, int], Any],
               space: Mapping[str, Any],
               *,
               tune_config: tune.TuneConfig | None = None,
               run_config: tune.RunConfig | None = None,
               base: ExperimentConfig | None = None,
               options: SearchOptions | None = None,
               resume: bool = False,
               settings: Mapping[str, Any] | None = None,
               ) -> SearchResult:
    """Search ``space`` with Ray Tune, one whole bilevel solve per trial; write and print the results.

    Tune's settings are Tune's objects; hg_dist adds :class:`SearchOptions`.

    Args:
        build_solver: ``build_solver(config, rank, world_size) -> solver`` (module-level,
            e.g. ``examples.data_hypercleaning.build_solver``).
        space: a nested search space (see :mod:`hg_dist.tune.space`); ``workers`` in it
            (or in ``base``) makes trials ``W``-worker Ray Train runs.
        tune_config: ``ray.tune.TuneConfig``. Used: ``metric`` (default ``"outer_loss"``,
            which every solver records, or one its ``outer_update`` returns, e.g.
            ``"val_acc"``), ``mode`` (default ``"min"``), ``num_samples`` (samples of the
            space, times the points of its grid), ``scheduler`` (default
            :func:`default_scheduler`: ASHA over outer steps; ``FIFOScheduler()`` runs every
            trial to the end), ``search_alg`` (default: ``options.search``; a searcher of
            your own is used over ``space`` as given), ``max_concurrent_trials`` (default
            none: Tune's resource queue decides), ``time_budget_s``. hg_dist names the
            trials and decides ``reuse_actors`` (never with multi-worker trials).
        run_config: ``ray.tune.RunConfig`` (not ``ray.train.RunConfig``). The search
            folder is ``storage_path/name`` (default ``runs/search``; ``storage_path`` may
            be a URI pyarrow opens, ``s3://``, ``gs://``, ``file://``, see
            :mod:`hg_dist.tune.storage`); it is Tune's experiment folder, so
            ``ExperimentAnalysis(folder)`` and ``Tuner.restore(folder, ...)`` read it.
            ``failure_config.max_failures`` (default 0): Tune retries of a failed trial
            (from its last checkpoint), and the worker-group restarts of a multi-worker
            trial's Train run. ``checkpoint_config`` (default ``num_to_keep=4``),
            ``verbose`` (default 0: Tune prints nothing; hg_dist prints its progress),
            ``stop`` and ``callbacks`` (run beside hg_dist's) are passed on.
        base: values of the :class:`ExperimentConfig` fields the space leaves out
            (``use_gpu=True`` there gives every solving process a GPU).
        options: hg_dist's own settings (:class:`SearchOptions`).
        resume: continue the search in the folder (see the module docs).
        settings: the caller's settings (e.g. command-line flags), recorded in
            ``search.json`` for ``--resume``.

    Raises:
        ValueError / TypeError: a bad argument or space, before Ray starts anything.
        SearchExistsError: the folder holds a search and ``resume`` is false, or
            ``resume`` is true and it holds none.
        SearchInterrupted: Ctrl-C stopped the search (its partial results are written
            and attached).
        SearchFolderLostError: ``output`` was deleted or moved while the search ran.

    Failing trials (an exception, or a NaN / infinite outer metric) are recorded as
    ``failed`` with their error; the search goes on.
    """
    options = SearchOptions() if options is None else options
    tune_config = tune.TuneConfig() if tune_config is None else tune_config
    run_config = tune.RunConfig() if run_config is None else run_config
    for name, value, kind in (("tune_config", tune_config, tune.TuneConfig), ("run_config", run_config, tune.RunConfig),
                              ("options", options, SearchOptions)):
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__module__}.{kind.__qualname__}, got {type(value).__name__}"
                            + ("; ray.train.RunConfig is Ray Train's, pass ray.tune.RunConfig"
                               if name == "run_config" else ""))
    metric, mode = _check_tune_config(tune_config, options)
    max_failures = _max_failures(run_config)
    num_samples, search, checkpoint_every = tune_config.num_samples, options.search, options.checkpoint_every
    cpus_per_worker = options.cpus_per_worker
    check_space(space)
    if tune_config.search_alg is None:
        check_searchable(space, search)
    else:
        search = type(tune_config.search_alg).__name__
    base = ExperimentConfig() if base is None else base
    storage = SearchStorage.parse(_output_of(run_config))
    total = num_samples * len(grid_points(space))
    marker = _check_resumable(storage, resume, space=space, metric=metric, mode=mode, search=search,
                              num_samples=num_samples)

    started_here = not ray.is_initialized()
    connect()  # a local Ray when none runs, else RAY_ADDRESS; an unreachable address fails fast, named
    workers = _workers_candidates(space, base)
    fixed_cluster = options.fixed_cluster
    if fixed_cluster is None:  # decided from the cluster itself (hg_dist.distributed.resources)
        fixed_cluster = started_here or inspect_cluster().autoscaling is False
    if fixed_cluster:
        _check_capacity(workers, cpus_per_worker, base.use_gpu)
    check_loadable_on_workers(build_solver)
    if not marker:  # a new search (or one whose marker was lost): say what is searched here
        storage.write_json(_marker(storage, metric=metric, mode=mode, search=search, num_samples=num_samples,
                                   total=total, build_solver=build_solver, settings=settings, space=space),
                           MARKER_FILE)

    trials_dir = storage.trials_dir
    trainable = make_trainable(build_solver, trials_dir=trials_dir, metric=metric, mode=mode, base=base,
                               cpus_per_worker=cpus_per_worker, checkpoint_every=checkpoint_every,
                               max_failures=max_failures,
                               train_storage=None if storage.local else storage.show("train"),
                               upload_to=None if storage.local else storage.tune_path)

    def output_of(name: str) -> str:
        return str(trials_dir / name) if trials_dir is not None else storage.show(name, RUN_DIR)

    def record_end(trial: Trial, status: str, error: str | None) -> None:
        _record_status(storage, trial, output_of(str(trial)), status, error)  # first: the trial sees it
        if trials_dir is not None and status != RunStatus.COMPLETED:
            release_workers(output_of(str(trial)))
        if trials_dir is not None and status == "stopped":
            _end_history_at_stop(trial, output_of(str(trial)))

    reporter = SearchProgress(metric, mode, total, interval=options.progress_interval, on_end=record_end,
                              quiet=not options.progress)

    # Tune saves its experiment state whenever a trial has checkpointed num_to_keep times since the last
    # save (a small local write) and warns when that happens within 5 s: with trials checkpointing every
    # few outer steps it does, and the warning says nothing actionable here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if tune_config.search_alg is None:
        search_alg, param_space, samples = make_searcher(search, space, metric="best_metric", mode=mode,
                                                         seed=options.seed, num_samples=num_samples)
    else:
        search_alg, param_space, samples = tune_config.search_alg, dict(space), num_samples
    if storage.can_restore() and resume:
        try:
            tuner = tune.Tuner.restore(storage.tune_path, trainable, resume_unfinished=True, resume_errored=False,
                                       param_space=param_space or None)
        except Exception as error:  # noqa: BLE001 - Tune raises many kinds for a damaged state
            raise SearchExistsError(f"cannot resume the search in {storage.show()}: Tune cannot read its saved state "
                                    f"in {storage.tune_path} ({type(error).__name__}: {str(error)[:300]}); it is "
                                    f"damaged: start the search again in another folder with --output, or delete "
                                    f"{storage.show()}") from None
        replace_restored_callback(tuner, SearchProgress, reporter)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=dataclasses.replace(
                tune_config, metric=metric, mode=mode, num_samples=samples, search_alg=search_alg,
                scheduler=tune_config.scheduler or default_scheduler(),
                # A reused trial actor is not killed when ASHA stops its trial, and neither is the Train run
                # it started: reuse actors only when no trial starts one.
                reuse_actors=workers is not None and max(workers) == 1,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=dataclasses.replace(
                run_config, name=storage.tune_name, storage_path=storage.tune_parent,
                verbose=0 if run_config.verbose is None else run_config.verbose,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=run_config.checkpoint_config or tune.CheckpointConfig(num_to_keep=4),
                sync_config=dataclasses.replace(run_config.sync_config or tune.SyncConfig(),
                                                sync_artifacts=not storage.local),
                callbacks=[*(run_config.callbacks or []), reporter]),
        )
    if options.progress:
        reporter.print(f"{'resuming' if resume else 'starting'} a {search} search of {total} trials in "
                       f"{storage.show()}")
    if trials_dir is not None:
        trials_dir.mkdir(parents=True, exist_ok=True)
    result_grid = tuner.fit()
    _check_folder_kept(storage)
    # Tune's last saved state tells how each trial stood when the search ended: after Ctrl-C, Tune
    # saves it and only then stops the running trials (which the returned grid then calls finished).
    trials = _saved_trials(storage) or reporter.trials
    statuses: dict[str, str] = {}
    for trial in trials:
        status = trial_status(trial)
        if trial.status not in FINAL:
            status = RunStatus.INTERRUPTED if trial.has_reported_at_least_once or trial.status != Trial.PENDING \
                else RunStatus.PENDING
            _record_status(storage, trial, output_of(str(trial)), RunStatus.INTERRUPTED, None)
            if trials_dir is not None:
                release_workers(output_of(str(trial)))
        elif status == "stopped" and trials_dir is not None:  # its workers are gone by now
            _end_history_at_stop(trial, output_of(str(trial)))
        statuses[str(trial)] = status
    interrupted = len(trials) < total or any(t.status not in FINAL for t in trials)

    rows = table_rows(result_grid, metric=metric, base=base, statuses=statuses, output_of=output_of)
    table = make_table(rows, metric, mode)
    result = _write_outputs(storage, table, result_grid, build_solver=build_solver, metric=metric, mode=mode,
                            plot=options.plot and not interrupted, interrupted=interrupted)  # Ctrl-C: no time to draw
    text = format_table(table)
    if options.print_table:
        print(text)
        if result.best is not None:
            print(f"best: {result.best['trial']} {metric}={result.best['best_metric']:.4g}; re-run with "
                  f"python -m hg_dist.tune.rerun {storage.show('best_config.json')}")
    if interrupted:
        ended = sum(1 for t in trials if t.status in FINAL)
        raise SearchInterrupted(f"search interrupted: {ended} of {total} trials ended; its state is saved in "
                                f"{storage.show()}; continue it with --resume (resume=True)", result)
    return result


def _saved_trials(storage: SearchStorage) -> list[Trial]:
    """The trials as Tune last saved them (``[]`` if that state cannot be read)."""
    from ray.tune import ExperimentAnalysis

    try:
        return list(ExperimentAnalysis(storage.path(), storage_filesystem=storage.filesystem).trials)
    except Exception:  # noqa: BLE001 - fall back to the trials the progress callback saw
        return []


def _end_history_at_stop(trial: Trial, output: str) -> None:
    """Cut a stopped trial's history at the outer step Tune last received from it (see
    :func:`~hg_dist.tune.trainable.end_history_at`); never fails the search."""
    last = (trial.last_result or {}).get("outer_step")
    if last is None:
        return
    try:
        end_history_at(output, int(last))
    except (OSError, ValueError):
        pass


def _record_status(storage: SearchStorage, trial: Trial, output: str, status: str, error: str | None) -> None:
    """Write ``status`` (and the last reported metrics) into the trial's ``result.json``.

    A trial writes ``completed`` (and ``failed``, with its own error) itself; those
    are kept, except that ``stopped`` (Tune ended the trial without an error: its
    scheduler stopped it) replaces a ``failed`` that the trial wrote while its Train
    run was being torn down by that stop; its error is kept as ``error_while_stopped``.
    Recording never fails the search: it is retried at the end.
    """
    fields: dict[str, Any] = {"status": RunStatus(status)}
    if error:
        fields["error"] = error
    kept = (RunStatus.COMPLETED,) if status == RunStatus.STOPPED else (RunStatus.COMPLETED, RunStatus.FAILED)

    def merge(current: dict[str, Any]) -> dict[str, Any] | None:
        """``current`` with the fields written in, or ``None`` to keep it as it is."""
        if current.get("status") in kept:
            return None
        if current.get("status") == RunStatus.FAILED:
            current["error_while_stopped"], current["error"] = current.get("error"), None
        current.update(fields)
        current.setdefault("metrics", last)
        current.update({key: last[key] for key in ("wall_time_s", "startup_s") if key in last})  # as in the table
        return current

    last = {k: v for k, v in (trial.last_result or {}).items() if isinstance(v, (int, float, str, bool))}
    try:
        if storage.local:
            if not Path(output).exists():
                return  # never started: nothing to mark
            merge_result(output, merge)   # as one step: the trial may be writing its ending now
        else:
            fs, name = storage.filesystem, f"{trial.path}/{RUN_DIR}/{RESULT_FILE}"
            info = fs.get_file_info(name)
            current = {}
            if info.type != pa.fs.FileType.NotFound:
                with fs.open_input_stream(name) as stream:
                    current = json.loads(stream.read().decode())
            merged = merge(current)
            if merged is None:
                return
            fs.create_dir(f"{trial.path}/{RUN_DIR}", recursive=True)
            with fs.open_output_stream(name) as stream:
                stream.write(json.dumps(merged, indent=2, default=str).encode())
    except (OSError, ValueError):  # a trial's bookkeeping must never cost the search
        pass


def _write_outputs(storage: SearchStorage, table: pa.Table, result_grid: ResultGrid, *,
                   build_solver: Callable[..., Any], metric: str, mode: str, plot: bool,
                   interrupted: bool) -> SearchResult:
    """Write the table (Parquet and text), ``best_config.json`` and the plot; return the result."""
    import pyarrow.parquet as pq

    best = best_row(table)
    best_config = None
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(sink.getvalue().to_pybytes(), "results.parquet")
    storage.write_text(format_table(table) + "\n", "results.txt")
    if best is not None:
        best_config = ExperimentConfig(**json.loads(best["config"]))
        try:
            record = best_record(best_config, build_solver=build_solver, metric=metric, mode=mode,
                                 value=best["best_metric"], trial=best["trial"])
        except ValueError as error:  # a build_solver that cannot be imported: say so in the file
            record = {"metric": metric, "mode": mode, "value": best["best_metric"], "trial": best["trial"],
                      "build_solver": None, "note": str(error), "config": dataclasses.asdict(best_config)}
        storage.write_json(record, "best_config.json")
    picture = _plot(storage, table, result_grid, metric=metric, mode=mode) if plot else None
    return SearchResult(table=table, best=best, best_config=best_config,
                        output=Path(storage.root) if storage.local else storage.uri, result_grid=result_grid,
                        interrupted=interrupted, plot=picture)


def _plot(storage: SearchStorage, table: pa.Table, result_grid: ResultGrid, *, metric: str, mode: str) -> str | None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:  # the plot is optional (the examples extra has it)
        return None
    methods = {row["trial"]: row["approx"] or "?" for row in table.to_pylist()}
    trials = []
    for result in result_grid:
        name = Path(str(result.path)).name
        try:
            frame = result.metrics_dataframe
        except Exception:  # noqa: BLE001 - a trial without readable results is left out of the picture
            frame = None
        trials.append({"name": name, "method": methods.get(name, "?"), "frame": frame})
    with tempfile.TemporaryDirectory(prefix="hg_dist-plot-") as folder:
        path = plot_search(trials, Path(folder) / "search.png", metric=metric, mode=mode)
        if path is None:
            return None
        return storage.write_bytes(path.read_bytes(), "search.png")
