"""``run_search``: a Ray Tune search whose trials are whole bilevel solves, resumable, with live progress.

Layout of ``output``: see :mod:`hg_dist.tune.storage`.

* **Searchers**: ``search="random"`` (Tune's random/grid generator) or ``"optuna"``
  (Ray's ``OptunaSearch``, define-by-run over the same nested space, see
  :mod:`hg_dist.tune.searchers`); ASHA stops bad trials early with either.
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
from ray.tune.result_grid import ResultGrid
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.sample import Categorical

from hg_dist.distributed.reachable import check_loadable_on_workers
from hg_dist.distributed.resources import connect, inspect_cluster
from hg_dist.experiment import RESULT_FILE, ExperimentConfig, read_result, update_result
from hg_dist.tune.plots import plot_search
from hg_dist.status import RunStatus
from hg_dist.tune.progress import FINAL, SearchProgress, trial_status
from hg_dist.tune.results import best_record, best_row, format_table, make_table, solver_reference, table_rows
from hg_dist.tune.searchers import check_searchable, grid_points, make_searcher
from hg_dist.tune.space import check_space
from hg_dist.tune.storage import MARKER_FILE, SearchStorage
from hg_dist.tune.trainable import RUN_DIR, TRIAL_CPU, make_trainable, release_workers, trial_demand

__all__ = ["SearchExistsError", "SearchFolderLostError", "SearchInterrupted", "SearchResult", "run_search"]


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
            build_solver: Callable[..., Any], settings: Mapping[str, Any] | None) -> dict[str, Any]:
    try:
        reference = solver_reference(build_solver)
    except ValueError:
        reference = {"build_solver": None}
    return {"format": 1, "metric": metric, "mode": mode, "search": search, "num_samples": num_samples,
            "trials": total, **reference, "settings": dict(settings or {}),
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


def _check_resumable(storage: SearchStorage, resume: bool, **expected: Any) -> dict[str, Any] | None:
    """The recorded marker when resuming; raise :class:`SearchExistsError` for a folder used the wrong way."""
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
    return record


def run_search(build_solver: Callable[[ExperimentConfig, int, int], Any],
               space: Mapping[str, Any],
               *,
               output: str | Path = "runs/search",
               num_samples: int = 1,
               metric: str = "outer_loss",
               mode: str = "min",
               base: ExperimentConfig | None = None,
               search: str = "random",
               scheduler: TrialScheduler | None = None,
               grace_period: int = 2,
               reduction_factor: int = 2,
               max_concurrent_trials: int | None = None,
               cpus_per_worker: float = 1.0,
               checkpoint_every: int = 5,
               max_failures: int = 0,
               resume: bool = False,
               fixed_cluster: bool | None = None,
               seed: int | None = 0,
               verbose: int = 0,
               progress: bool = True,
               progress_interval: float = 30.0,
               print_table: bool = True,
               plot: bool = True,
               settings: Mapping[str, Any] | None = None,
               ) -> SearchResult:
    """Search ``space`` with Ray Tune, one whole bilevel solve per trial; write and print the results.

    Args:
        build_solver: ``build_solver(config, rank, world_size) -> solver`` (module-level,
            e.g. ``examples.data_hypercleaning.build_solver``).
        space: a nested search space (see :mod:`hg_dist.tune.space`); ``workers`` in it
            (or in ``base``) makes trials ``W``-worker Ray Train runs.
        output: the search folder: a path, or a URI pyarrow opens (``s3://``, ``gs://``,
            ``file://``), which becomes Tune's storage (see :mod:`hg_dist.tune.storage`).
        num_samples: samples of the space (times the number of points of its grid).
        metric, mode: the outer metric the solver records (``"outer_loss"``, which every
            solver records, or one its ``outer_update`` returns, e.g. ``"val_acc"``) and
            whether higher (``"max"``) or lower (``"min"``) is better.
        base: values of the :class:`ExperimentConfig` fields the space leaves out
            (``use_gpu=True`` there gives every solving process a GPU).
        search: ``"random"`` or ``"optuna"`` (see :mod:`hg_dist.tune.searchers`).
        scheduler: a Tune scheduler; default ASHA over outer steps
            (``ASHAScheduler(time_attr="outer_step", grace_period, reduction_factor,
            max_t=10**6)``: it stops trials early, never at a step limit). Pass
            ``tune.schedulers.FIFOScheduler()`` to run every trial to the end.
        max_concurrent_trials: an explicit cap; default none (Tune's resource queue decides).
        cpus_per_worker: CPUs per solving process (a one-worker trial, or each Train worker).
        checkpoint_every: outer steps between trial checkpoints.
        max_failures: Tune retries of a failed trial (from its last checkpoint), and the
            worker-group restarts of a multi-worker trial's Train run.
        resume: continue the search in ``output`` (see the module docs).
        fixed_cluster: the cluster cannot grow (no autoscaler): a trial that can never
            fit fails at once; default: when this call starts Ray itself, or when the
            cluster says it has no autoscaler (:func:`hg_dist.distributed.resources.inspect_cluster`).
        seed: seeds the sampling of the space (``None``: unseeded).
        verbose: Tune's own console verbosity (0 silent … 2 every result).
        progress, progress_interval: print a line per ended trial and a status line
            every ``progress_interval`` seconds.
        print_table: print the results table at the end.
        plot: write ``search.png`` (needs matplotlib).
        settings: the caller's settings (e.g. command-line flags), recorded in
            ``search.json`` for ``--resume``.

    Raises:
        ValueError / TypeError: a bad argument or space, before Ray starts anything.
        SearchExistsError: ``output`` holds a search and ``resume`` is false, or
            ``resume`` is true and it holds none.
        SearchInterrupted: Ctrl-C stopped the search (its partial results are written
            and attached).
        SearchFolderLostError: ``output`` was deleted or moved while the search ran.

    Failing trials (an exception, or a NaN / infinite outer metric) are recorded as
    ``failed`` with their error; the search goes on.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < -1:
        raise ValueError(f"max_failures must be an int >= 0 (or -1 for unlimited retries), got {max_failures!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be an int >= 1 (outer steps), got {checkpoint_every!r}")
    if not cpus_per_worker > 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker!r}")
    check_space(space)
    check_searchable(space, search)
    base = ExperimentConfig() if base is None else base
    storage = SearchStorage.parse(output)
    total = num_samples * len(grid_points(space))
    marker = _check_resumable(storage, resume, metric=metric, mode=mode, search=search, num_samples=num_samples)

    started_here = not ray.is_initialized()
    connect()  # a local Ray when none runs, else RAY_ADDRESS; an unreachable address fails fast, named
    workers = _workers_candidates(space, base)
    if fixed_cluster is None:  # decided from the cluster itself (hg_dist.distributed.resources)
        fixed_cluster = started_here or inspect_cluster().autoscaling is False
    if fixed_cluster:
        _check_capacity(workers, cpus_per_worker, base.use_gpu)
    check_loadable_on_workers(build_solver)
    if not marker:  # a new search (or one whose marker was lost): say what is searched here
        storage.write_json(_marker(storage, metric=metric, mode=mode, search=search, num_samples=num_samples,
                                   total=total, build_solver=build_solver, settings=settings), MARKER_FILE)

    trials_dir = storage.trials_dir
    trainable = make_trainable(build_solver, trials_dir=trials_dir, metric=metric, mode=mode, base=base,
                               cpus_per_worker=cpus_per_worker, checkpoint_every=checkpoint_every,
                               max_failures=max_failures,
                               train_storage=None if storage.local else storage.show("train"),
                               upload_to=None if storage.local else storage.tune_path)

    def output_of(name: str) -> str:
        return str(trials_dir / name) if trials_dir is not None else storage.show("tune", name, RUN_DIR)

    def record_end(trial: Trial, status: str, error: str | None) -> None:
        _record_status(storage, trial, output_of(str(trial)), status, error)  # first: the trial sees it
        if trials_dir is not None and status != RunStatus.COMPLETED:
            release_workers(output_of(str(trial)))

    reporter = SearchProgress(metric, mode, total, interval=progress_interval, on_end=record_end, quiet=not progress)

    # Tune saves its experiment state whenever a trial has checkpointed num_to_keep times since the last
    # save (a small local write) and warns when that happens within 5 s: with trials checkpointing every
    # few outer steps it does, and the warning says nothing actionable here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    search_alg, param_space, samples = make_searcher(search, space, metric="best_metric", mode=mode, seed=seed,
                                                     num_samples=num_samples)
    if storage.can_restore() and resume:
        try:
            tuner = tune.Tuner.restore(storage.tune_path, trainable, resume_unfinished=True, resume_errored=False,
                                       param_space=param_space or None)
        except Exception as error:  # noqa: BLE001 - Tune raises many kinds for a damaged state
            raise SearchExistsError(f"cannot resume the search in {storage.show()}: Tune cannot read its saved state "
                                    f"in {storage.tune_path} ({type(error).__name__}: {str(error)[:300]}); it is "
                                    f"damaged: start the search again in another folder with --output, or delete "
                                    f"{storage.show()}") from None
        _install_callback(tuner, reporter)
    else:
        if scheduler is None:
            scheduler = ASHAScheduler(time_attr="outer_step", grace_period=grace_period,
                                      reduction_factor=reduction_factor, max_t=10**6)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=samples, scheduler=scheduler, search_alg=search_alg,
                max_concurrent_trials=max_concurrent_trials,
                # A reused trial actor is not killed when ASHA stops its trial, and neither is the Train run
                # it started: reuse actors only when no trial starts one.
                reuse_actors=workers is not None and max(workers) == 1,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(
                name="tune", storage_path=storage.uri, verbose=verbose,
                failure_config=tune.FailureConfig(max_failures=max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=4),
                sync_config=tune.SyncConfig(sync_artifacts=not storage.local),
                callbacks=[reporter]),
        )
    if progress:
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
        statuses[str(trial)] = status
    interrupted = len(trials) < total or any(t.status not in FINAL for t in trials)

    rows = table_rows(result_grid, metric=metric, base=base, statuses=statuses, output_of=output_of)
    table = make_table(rows, metric, mode)
    result = _write_outputs(storage, table, result_grid, build_solver=build_solver, metric=metric, mode=mode,
                            plot=plot and not interrupted, interrupted=interrupted)  # Ctrl-C: no time to draw
    text = format_table(table)
    if print_table:
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
        return list(ExperimentAnalysis(storage.path("tune"), storage_filesystem=storage.filesystem).trials)
    except Exception:  # noqa: BLE001 - fall back to the trials the progress callback saw
        return []


def _install_callback(tuner: tune.Tuner, reporter: SearchProgress) -> None:
    """Put ``reporter`` in place of the progress callback restored from the saved run config.

    ``Tuner.restore`` unpickles the run config it was started with; its callbacks are
    copies that print nowhere and record nothing here.
    """
    run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
    if run_config is None:  # pragma: no cover - a Ray that restores differently: progress is lost, not results
        return
    run_config.callbacks = [reporter if isinstance(cb, SearchProgress) else cb for cb in (run_config.callbacks or [])]
    if reporter not in run_config.callbacks:
        run_config.callbacks.append(reporter)


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
        return current

    last = {k: v for k, v in (trial.last_result or {}).items() if isinstance(v, (int, float, str, bool))}
    try:
        if storage.local:
            if not Path(output).exists():
                return  # never started: nothing to mark
            merged = merge(read_result(output))
            if merged is not None:
                update_result(output, **merged)
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
