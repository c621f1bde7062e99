"""The Tune trainable: one trial = one whole bilevel solve, reported after every outer step.

A trial flattens its sampled config (:func:`~hg_dist.tune.space.to_experiment_config`),
builds the solver with the example's ``build_solver(config, rank, world_size)`` and
runs it. Every result carries ``outer_step``, so schedulers such as ASHA compare
trials outer step by outer step (``time_attr="outer_step"``) and stop bad ones early.

* ``config.workers == 1``: the solve runs in the trial's own process, as
  :func:`hg_dist.experiment.run_local` would (same seeding and outputs), with a
  :class:`SolveReporter` reporting every outer step to Tune and, every
  ``checkpoint_every`` outer steps, a trial checkpoint (``solver.state_dict()`` and
  the reporter's counters). A resumed or retried trial continues from its newest one,
  also one written just before Ctrl-C that Tune had not yet recorded (:func:`restore_newest`).
* ``config.workers == W > 1``: the trial starts a ``W``-worker Ray Train run with the
  distributed layer's worker loop, run with ``report_every=1`` (one report per outer
  step; plain distributed runs report far less often, see
  :class:`~hg_dist.distributed.FitOptions`), and forwards rank 0's reports to Tune
  (:class:`TrainToTune`). Checkpoints are Train's (rank 0's solver state, every
  ``checkpoint_every`` outer steps, in the trial's Train storage); a resumed trial
  starts the same Train run again, which continues from its latest checkpoint. The
  trial itself holds :data:`TRIAL_CPU` and each worker ``cpus_per_worker``.

**Histories survive whatever ends a trial.** The solve (rank 0 of a Train run)
runs with a :class:`TrialHistory`: a history row after every outer step, and every row
written at once (the Parquet file rewritten atomically, TensorBoard flushed) before
the step is reported. An ASHA stop, an error, Ctrl-C or a killed process thus leaves
``history.parquet`` and ``tb/`` holding every outer step up to the last one.
``result.json`` records how the trial ended (``status``): the trial writes
``completed`` or ``failed`` itself; the search writes ``stopped`` (by the
scheduler), ``failed`` (a process that died) or ``interrupted`` for the others.

Every result carries, besides the solver's metrics, ``outer_step``, ``hvps_total``
(Hessian-vector products so far), ``best_metric`` and two timings, all carried over a
resume, with one meaning wherever they appear (Tune's results, the results table, the
trial's ``result.json``, its history):

* ``wall_time_s``: seconds the solver spent solving (inside ``solver.run()``, clocked
  by :class:`TrialHistory` at every outer step), summed over resumes;
* ``startup_s``: the rest of the trial's time: Ray Train's worker group starting,
  the solver being built and restored, and work a failure threw away.

The trial's last result carries a checkpoint that Tune keeps
(``ResultGrid.get_best_result().checkpoint``, ``ExperimentAnalysis.get_best_checkpoint``):
a one-worker trial's solver state (:func:`trial_checkpoint`), or a multi-worker trial's
final Ray Train checkpoint.

**A trial that fails deterministically is not retried.** Tune retries a trial that
raised (``FailureConfig(max_failures)``) from its checkpoint, where divergence
(a non-finite outer metric: :class:`TrialDivergedError`, a non-finite loss, a
diverging IHVP), bad settings (``ValueError``/``TypeError``) or a multi-worker run
that ended on such an error (:class:`~hg_dist.distributed.RunFailedError`) would
only fail again (:data:`NOT_RETRIED`). The trial catches them, writes ``failed``
with the error and ``"retried": false`` to its ``result.json``, and ends normally
with a last result that says so (:func:`failure_result`: ``hg_dist_error``,
``solve_failed = 1``, the metric NaN), so Tune does not retry it and the search
still lists it as ``failed`` with its error (:func:`hg_dist.tune.progress.trial_status`).
Other errors (a lost process, a broken connection) propagate, and Tune retries them.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.integration.ray_train import TuneReportCallback

from hg_dist import checkpoint as solver_checkpoint
from hg_dist.callbacks import HistoryWriter
from hg_dist.distributed.train_loop import NOT_RETRIED as RUN_NOT_RETRIED
from hg_dist.distributed.train_loop import RunFailedError
from hg_dist.experiment import ExperimentConfig, merge_result, read_result, run_local, update_result, write_json
from hg_dist.recording import write_parquet
from hg_dist.solver import BaseSolver
from hg_dist.status import RunStatus
from hg_dist.tune.progress import ERROR_KEY, FAILED_KEY
from hg_dist.tune.space import to_experiment_config

__all__ = ["ERROR_KEY", "FAILED_KEY", "NOT_RETRIED", "ResultTracker", "SolveReporter", "TRIAL_CPU", "TrainToTune",
           "TrialDivergedError", "TrialHistory", "TrialSolver", "check_trial_solver", "end_history_at",
           "failure_result", "make_trainable", "release_workers", "trial_demand", "trial_resources", "update_result",
           "upload_run_files"]

BuildSolver = Callable[..., Any]

TRIAL_CPU = 0.01
"""CPU a multi-worker trial holds itself (its Train workers hold the rest)."""

TRAIN_POLL_INTERVAL_S = 0.2
"""Poll interval of a multi-worker trial's Train controller (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``).

A Train worker's ``ray.train.report`` puts its result in a queue of size one that the
controller empties when it polls (every 2 s by default), so each report (one per
outer step) waited up to 2 s: a 20-outer-step 2-worker trial took 87 s with the
default and 33 s with 0.1 s, on 2 loaded cores. An environment variable the trial
sets for its own Train run only (Ray propagates it to the controller); one already
set wins."""

RUN_DIR = "run"
"""Sub-folder of a trial's Tune working directory that holds its files when the search's output is a
URI (Tune keeps its own ``result.json`` in the trial directory)."""

SOLVER_FILE = "solver.pt"
TRACKER_FILE = "trial_state.json"


class TrialDivergedError(RuntimeError):
    """The outer metric became NaN or infinite: the trial diverged."""


NOT_RETRIED = (*RUN_NOT_RETRIED, RunFailedError, TrialDivergedError, KeyError)
"""Errors that end a trial without a Tune retry (a retry would meet them again): divergence and
NaN/inf, bad settings (``ValueError``, ``TypeError``; ``KeyError``: a metric the solver does not
record), and a multi-worker run that ended on one of those (:class:`~hg_dist.distributed.RunFailedError`)."""


SOLVE_TIME = "wall_time_s"
"""The solver's clock: seconds inside ``solver.run()`` so far, over resumes (see the module docs)."""


class ResultTracker:
    """Turns the solver's metrics after each outer step into a Tune result.

    Adds ``outer_step``, ``hvps_total`` (sum of the per-step ``ihvp_num_hvps``),
    ``best_metric`` (best ``metric`` so far), ``wall_time_s`` (solving time: the
    solver's own ``wall_time_s`` metric, see :class:`TrialHistory`) and ``startup_s``
    (the trial's time since it started, over resumes, less the solving time), and
    keeps only numbers. :meth:`state_dict` / :meth:`load_state_dict` carry the
    counters through a trial checkpoint.

    Args:
        metric: the key of the outer metric in the solver's metrics, e.g. ``"outer_loss"``.
        mode: ``"max"`` or ``"min"``.
    """

    def __init__(self, metric: str, mode: str) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.metric = metric
        self.mode = mode
        self.start = time.time()   # wall clock: the tracker may be pickled to another process (TrainToTune)
        self.trial_time_before = 0.0
        self.solve_time: float | None = None
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
                           f"pass tune_config=TuneConfig(metric=...) one of them to run_search")
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            raise TrialDivergedError(f"{self.metric} = {value} at outer step {outer_step}: the solve diverged; "
                                     f"lower the outer or IHVP step size, or raise rho")
        self.hvps_total += int(metrics.get("ihvp_num_hvps", 0))
        if math.isnan(self.best) or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
        return self._result(metrics, outer_step)

    def final(self, metrics: Mapping[str, Any], outer_step: int) -> dict[str, float]:
        """The result after the solve ran to its end: its final metrics (``evaluate()``'s included),
        the counters as they are, and ``solve_completed = 1`` (what tells a completed trial from one
        the scheduler stopped: Tune marks both ``done``)."""
        return {**self._result(metrics, outer_step), "solve_completed": 1.0}

    def _result(self, metrics: Mapping[str, Any], outer_step: int) -> dict[str, float]:
        result = {key: float(val) for key, val in metrics.items()
                  if isinstance(val, (int, float)) and not isinstance(val, bool)}
        if SOLVE_TIME in result and math.isfinite(result[SOLVE_TIME]):
            self.solve_time = result[SOLVE_TIME]
        result.update(outer_step=int(outer_step), hvps_total=self.hvps_total, best_metric=self.best,
                      **self.timings())
        return result

    def trial_time(self) -> float:
        """Seconds since the trial started, over resumes."""
        return self.trial_time_before + time.time() - self.start

    def timings(self) -> dict[str, float]:
        """``wall_time_s`` and ``startup_s`` now (a solver that reports no clock: all is solving time)."""
        total = self.trial_time()
        solve = total if self.solve_time is None else self.solve_time
        return {"wall_time_s": solve, "startup_s": max(0.0, total - solve)}

    def state_dict(self) -> dict[str, float]:
        return {"hvps_total": self.hvps_total, "best": self.best, "trial_time_s": self.trial_time(),
                "wall_time_s": self.solve_time}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.hvps_total = int(state["hvps_total"])
        self.best = float(state["best"])
        self.trial_time_before = float(state["trial_time_s"])
        self.solve_time = None if state.get("wall_time_s") is None else float(state["wall_time_s"])
        self.start = time.time()


class TrialHistory(HistoryWriter):
    """A trial's history: a row after every outer step, each row written at once.

    A :class:`~hg_dist.callbacks.HistoryWriter` with ``flush_interval=0`` (Parquet
    rewritten atomically, TensorBoard flushed, after every row) that also logs a
    row at every outer step (the solver's own rows come every ``log_freq`` inner
    steps). Among a run's callbacks it replaces the standard writer. Pass it
    before the reporter, so a reported step is on disk first.

    * It clocks the solve: at every outer step it records the solver metric
      ``wall_time_s`` (seconds inside ``solver.run()``, carried over a resume by the
      solver's own recorder state), which the reports carry to Tune.
    * TensorBoard gets one point per value a metric was given: an outer metric once
      per outer step, however many rows repeat it (every row holds the latest value
      of every metric).
    * Once the search has recorded the trial as ``stopped`` (its ``result.json``), it
      writes nothing more: a multi-worker trial's workers can run a step or two past
      the step at which Tune stopped the trial.
    """

    def __init__(self, log_dir: str | os.PathLike) -> None:
        super().__init__(log_dir, flush_interval=0.0)
        self._clock_start = time.perf_counter()
        self._solved_before = 0.0
        self._values_written: dict[str, int] = {}
        self._last_tb_step: dict[str, int] = {}

    def on_run_start(self, solver: BaseSolver) -> None:
        super().on_run_start(solver)
        archive = solver.recorder.archive
        self._solved_before = archive[SOLVE_TIME][-1] if archive.get(SOLVE_TIME) else 0.0
        self._clock_start = time.perf_counter()
        self._values_written = {name: len(values) for name, values in archive.items()}
        self._last_tb_step = {}

    def on_outer_step(self, solver: BaseSolver, metrics: dict[str, float]) -> None:
        solver.recorder.add(SOLVE_TIME, self._solved_before + time.perf_counter() - self._clock_start)
        history = solver.recorder.history
        if history and history[-1]["step"] == solver.global_step:
            return
        solver.recorder.add_many({"inner_step": solver.inner_step, "outer_step": solver.outer_step})
        self.on_row(solver, solver.global_step, solver.recorder.log_row(solver.global_step))

    def on_row(self, solver: BaseSolver, step: int, row: Mapping[str, float]) -> None:
        if self._parquet is None or read_result(self.log_dir).get("status") == "stopped":
            return
        rows = self._parquet.rows
        if rows and rows[-1]["step"] == step:  # the run's final row repeats its last outer step: keep the later
            rows.pop()
        self._parquet.write(step, row)
        counts = {name: len(values) for name, values in solver.recorder.archive.items()}
        fresh = {name: value for name, value in row.items()
                 if counts.get(name, 0) > self._values_written.get(name, 0) and self._last_tb_step.get(name) != step}
        self._tensorboard.write(step, fresh)
        self._values_written.update((name, counts.get(name, 0)) for name in row)
        self._last_tb_step.update((name, step) for name in fresh)
        self.flush()

    def on_run_end(self, solver: BaseSolver, error: BaseException | None) -> None:
        if self._parquet is not None and read_result(self.log_dir).get("status") == "stopped":
            self._parquet = None   # the search may have cut the file at the stop: leave it as it is
            self._tensorboard.close()
            self._tensorboard = None
            return
        super().on_run_end(solver, error)


def end_history_at(output: str | os.PathLike, outer_step: int) -> bool:
    """Cut ``output/history.parquet`` after the row of outer step ``outer_step`` (the step Tune last
    received from a trial it stopped); returns whether rows were dropped.

    Rows are kept up to the first one whose ``outer_step`` is ``outer_step``; without
    such a row, those whose ``outer_step`` is at most ``outer_step``.
    """
    import pyarrow.parquet as pq

    from hg_dist.callbacks import HISTORY_FILE

    path = Path(output) / HISTORY_FILE
    if not path.exists():
        return False
    rows = pq.read_table(path).to_pylist()
    end = next((k + 1 for k, row in enumerate(rows) if row.get("outer_step") == outer_step), None)
    kept = rows[:end] if end is not None else [
        row for row in rows if row.get("outer_step") is None or row["outer_step"] <= outer_step]
    if len(kept) == len(rows):
        return False
    write_parquet(path, [{key: value for key, value in row.items() if value is not None} for row in kept])
    return True


def check_trial_solver(solver: Any) -> Any:
    """``solver`` itself if it is a :class:`~hg_dist.solver.BaseSolver` (a trial runs it with its own
    callbacks: ``solver.run(callbacks, ...)``); else ``TypeError``."""
    if not isinstance(solver, BaseSolver):
        raise TypeError(f"build_solver must return an hg_dist.solver.BaseSolver (its callbacks report each outer "
                        f"step to Tune), got {type(solver).__name__}")
    return solver


@contextmanager
def trial_checkpoint(solver: BaseSolver, tracker: ResultTracker) -> Iterator[tune.Checkpoint]:
    """A temporary Tune checkpoint of a one-worker trial: ``solver.pt`` and the tracker's counters
    with the solver's ``outer_step`` (which :func:`checkpoints_newest_first` orders by)."""
    with tempfile.TemporaryDirectory(prefix="hg_dist-trial-") as folder:
        solver_checkpoint.save(solver, Path(folder) / SOLVER_FILE)
        state = {**tracker.state_dict(), "outer_step": solver.outer_step}
        (Path(folder) / TRACKER_FILE).write_text(json.dumps(state))
        yield tune.Checkpoint.from_directory(folder)


def restore_trial(checkpoint: tune.Checkpoint, solver: BaseSolver, tracker: ResultTracker) -> None:
    """Load a :func:`trial_checkpoint` into ``solver`` (all or nothing) and ``tracker``."""
    with checkpoint.as_directory() as folder:
        state = json.loads((Path(folder) / TRACKER_FILE).read_text())
        solver_checkpoint.load(solver, Path(folder) / SOLVER_FILE)
        tracker.load_state_dict(state)


def checkpoints_newest_first(filesystem: pyarrow.fs.FileSystem, trial_path: str,
                             known: tune.Checkpoint | None) -> list[tune.Checkpoint]:
    """The :func:`trial_checkpoint` folders in a trial's storage folder, newest first, ending with ``known``.

    A trial writes each checkpoint to its storage folder (``checkpoint_NNNNNN``) before Tune's
    driver records it; Ctrl-C between the two leaves checkpoints there that the experiment
    state, and so ``tune.get_checkpoint()`` after a resume, does not know. The folders whose
    outer step (read from their tracker file) is past ``known``'s come first, the latest first,
    then ``known`` (Tune's, when it has one). Folders without a readable tracker file (cut off
    while being written) are left out; a later load failure is the caller's to fall back from.
    """
    def outer_step(fs: pyarrow.fs.FileSystem, path: str) -> int | None:
        try:
            with fs.open_input_stream(f"{path}/{TRACKER_FILE}") as stream:
                return int(json.loads(stream.read())["outer_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    floor = -1 if known is None else (outer_step(known.filesystem, known.path) or 0)
    found = []
    for info in filesystem.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True)):
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            step = outer_step(filesystem, info.path)
            if step is not None and step > floor:
                found.append((step, info.path))
    newer = [tune.Checkpoint(path, filesystem=filesystem) for _, path in sorted(found, reverse=True)]
    return newer + ([known] if known is not None else [])


def restore_newest(solver: BaseSolver, tracker: ResultTracker) -> bool:
    """Restore this trial's newest checkpoint (:func:`checkpoints_newest_first` of its storage folder)
    into ``solver`` and ``tracker``; ``False`` when it has none.

    A folder Tune never recorded that fails to load (a copy cut off by a killed process) is
    skipped with a message; Tune's own checkpoint failing to load raises.
    """
    known = tune.get_checkpoint()
    storage = tune.get_context().get_storage()   # DeveloperAPI of the public context: where Tune writes them
    if storage is None:                          # called outside a Tune session: Tune's checkpoint only
        candidates = [] if known is None else [known]
    else:
        candidates = checkpoints_newest_first(storage.storage_filesystem, storage.trial_fs_path, known)
    for checkpoint in candidates:
        try:
            restore_trial(checkpoint, solver, tracker)
            return True
        except Exception as error:  # noqa: BLE001 - any damage to a copy Tune never recorded: try an older one
            if checkpoint is known:
                raise
            print(f"hg_dist: skipped the trial checkpoint {checkpoint.path} ({type(error).__name__}: {error})")
    return False


class SolveReporter:
    """Solver callback ``(solver, metrics)``: ``report(tracker.update(metrics, solver.outer_step))``.

    Args:
        metric: see :class:`ResultTracker`.
        mode: see :class:`ResultTracker`.
        report: where results go, e.g. ``ray.tune.report``; called as
            ``report(result)`` or, every ``checkpoint_every`` outer steps,
            ``report(result, checkpoint=<trial checkpoint>)``.
        checkpoint_every: outer steps between trial checkpoints (``None``: none).
    """

    def __init__(self, metric: str, mode: str, report: Callable[..., None], checkpoint_every: int | None = None) -> None:
        self.tracker = ResultTracker(metric, mode)
        self.report = report
        self.checkpoint_every = checkpoint_every

    def __call__(self, solver: Any, metrics: dict[str, float]) -> None:
        clock = solver.recorder.archive.get(SOLVE_TIME)  # added by TrialHistory after ``metrics`` was taken
        result = self.tracker.update({**metrics, SOLVE_TIME: clock[-1]} if clock else metrics, solver.outer_step)
        if self.checkpoint_every and solver.outer_step % self.checkpoint_every == 0:
            with trial_checkpoint(solver, self.tracker) as checkpoint:
                self.report(result, checkpoint=checkpoint)
        else:
            self.report(result)


PLACEMENT_GROUP_FILE = ".train_placement_group"
"""Where rank 0 of a multi-worker trial records its worker group's placement group (pickled
``ray.util.placement_group.PlacementGroup``)."""


@dataclass(frozen=True)
class TrialSolver:
    """``build_solver`` for a trial's Train workers (whose rank 0 writes a :class:`TrialHistory`:
    ``FitOptions(history=TrialHistory)``).

    Rank 0 also records the worker group's placement group in the trial's folder
    (:data:`PLACEMENT_GROUP_FILE`), so that the search can free it when the trial is
    stopped (:func:`release_workers`).
    """

    build_solver: BuildSolver

    def __call__(self, config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> Any:
        solver = check_trial_solver(self.build_solver(config, rank=rank, world_size=world_size))
        if rank == 0:
            import ray.util

            group = ray.util.get_current_placement_group()
            if group is not None:
                Path(config.output).mkdir(parents=True, exist_ok=True)
                (Path(config.output) / PLACEMENT_GROUP_FILE).write_bytes(pickle.dumps(group))
        return solver


def release_workers(output: str | os.PathLike) -> bool:
    """Remove the placement group a multi-worker trial's Train workers held (recorded by :class:`TrialSolver`).

    When Tune stops a multi-worker trial (ASHA, Ctrl-C) it kills the trial's process,
    and with it the Train controller, which then cannot remove its workers' placement
    group. Ray Train's ``PlacementGroupCleaner`` removes it only once the state API
    says the controller is dead, and was seen (2 cores, loaded) to keep the CPUs
    reserved for good, so that the next multi-worker trial waited forever for its
    workers. Removing an already removed group does nothing. Returns whether a
    group was recorded.
    """
    path = Path(output) / PLACEMENT_GROUP_FILE
    if not path.exists():
        return False
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pickle.loads(path.read_bytes()))
    except Exception:  # noqa: BLE001 - already removed, or Ray is shutting down: nothing held any more
        pass
    path.unlink(missing_ok=True)
    return True


class TrainToTune(TuneReportCallback):
    """Forwards a Train run's reports (rank 0's metrics) to the enclosing Tune trial.

    It runs in the Train controller's process (on the trial's node), not the trial's:
    what the trial needs from it goes through ``state_file``, a JSON file rewritten
    at every report with the tracker's counters (``latest``), the counters as of the
    latest Train checkpoint (``checkpointed``: a resumed Train run continues from that
    checkpoint, and a new ``TrainToTune`` from these counters) and the first error.

    Repeated reports of one outer step (the worker loop's final report) are dropped.
    A missing or non-finite metric is reported as ``{metric: nan, "hg_dist_error":
    message}`` (raising here would stop the Train controller rather than fail the
    trial); the trial raises it once the run returns (:meth:`read_state`). Must be
    created inside a Tune trial.
    """

    def __init__(self, metric: str, mode: str, state_file: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.tracker = ResultTracker(metric, mode)
        self.last_step = -1
        self.error: str | None = None
        self.state_file = None if state_file is None else Path(state_file)
        self.checkpointed: dict[str, Any] | None = None
        if self.state_file is not None and self.state_file.exists():
            self.checkpointed = json.loads(self.state_file.read_text()).get("checkpointed")
            if self.checkpointed is not None:
                self.tracker.load_state_dict(self.checkpointed)
                self.last_step = int(self.checkpointed["outer_step"])

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        step = int(metrics[0].get("outer_step", self.last_step + 1))
        if step == self.last_step:
            return
        self.last_step = step
        try:
            result = self.tracker.update(metrics[0], step)
        except (KeyError, TrialDivergedError) as error:
            self.error = self.error or f"{type(error).__name__}: {error}"
            result = {self.tracker.metric: math.nan, ERROR_KEY: self.error, "outer_step": step}
        if self.state_file is not None:
            latest = {**self.tracker.state_dict(), "outer_step": step}
            if checkpoint is not None:
                self.checkpointed = latest
            write_json(Path(self.state_file), {"latest": latest, "checkpointed": self.checkpointed, "error": self.error})
        super().after_report(run_context, [result], None)

    @staticmethod
    def read_state(state_file: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
        """``(latest counters, error)`` written by the callback (``(None, None)`` before any report)."""
        path = Path(state_file)
        if not path.exists():
            return None, None
        state = json.loads(path.read_text())
        return state.get("latest"), state.get("error")


def trial_resources(config: Mapping[str, Any], cpus_per_worker: float = 1.0, *, use_gpu: bool = False,
                    workers: int = 1) -> PlacementGroupFactory:
    """Resources a trial's own process requests, from its sampled config's ``workers`` (default ``workers``).

    ``cpus_per_worker`` (and a GPU with ``use_gpu``) for a one-worker trial (it
    solves in its own process), :data:`TRIAL_CPU` for a multi-worker one (its Train
    workers request their own).
    """
    count = config.get("workers", workers)
    if count != 1:
        return PlacementGroupFactory([{"CPU": TRIAL_CPU}])
    return PlacementGroupFactory([{"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}])


def trial_demand(workers: int, cpus_per_worker: float = 1.0) -> float:
    """CPUs a trial occupies in all: its own process and its Train workers."""
    return cpus_per_worker if workers == 1 else TRIAL_CPU + workers * cpus_per_worker


# ---- result.json: how a trial ended ------------------------------------------------------------

# ---- the trial -----------------------------------------------------------------------------------

def _solve_here(build_solver: BuildSolver, config: ExperimentConfig, metric: str, mode: str,
                checkpoint_every: int) -> tuple[ResultTracker, dict[str, Any], dict[str, Any], Callable[[], Any]]:
    """One-worker trial: :func:`~hg_dist.experiment.run_local` with a history, a reporter and checkpoints.

    Returns the tracker, the final metrics, what ``result.json`` gets, and a context manager
    giving the final trial checkpoint."""
    reporter = SolveReporter(metric, mode, tune.report, checkpoint_every)
    resumed: dict[str, Any] = {}
    built: list[BaseSolver] = []

    def build_trial_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> BaseSolver:
        solver = check_trial_solver(build_solver(config, rank=rank, world_size=world_size))
        built.append(solver)
        if restore_newest(solver, reporter.tracker):
            resumed["resumed_from_outer_step"] = solver.outer_step
            update_result(config.output, resumed_from_outer_step=solver.outer_step)
        return solver

    # The history before the reporter: a reported step is on disk first.
    final = run_local(build_trial_solver, config, callbacks=(TrialHistory(config.output), reporter), progress=False)
    return (reporter.tracker, final, {"resumed_from_outer_step": resumed.get("resumed_from_outer_step")},
            lambda: trial_checkpoint(built[-1], reporter.tracker))


def _solve_on_workers(build_solver: BuildSolver, config: ExperimentConfig, metric: str, mode: str, *,
                      cpus_per_worker: float, checkpoint_every: int, max_failures: int,
                      train_storage: str | None) -> tuple[ResultTracker, dict[str, Any], dict[str, Any], Callable[[], Any]]:
    """Multi-worker trial: the distributed layer's Train run, its reports forwarded to Tune.

    Returns as :func:`_solve_here`; the final checkpoint is the Train run's."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from hg_dist.distributed import FitOptions
    from hg_dist.distributed.resources import DEFAULT_RESOURCE_TIMEOUT_S, startup_retries
    from hg_dist.distributed.runner import RUN_NAME, fit

    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    state_file = output / TRACKER_FILE
    forward = TrainToTune(metric, mode, state_file=state_file)
    resumed = forward.last_step if forward.last_step >= 0 else None
    if resumed is not None:
        update_result(output, resumed_from_outer_step=resumed)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(TRAIN_POLL_INTERVAL_S))
    storage = train_storage if train_storage is not None else str((output / "ray").resolve())
    result = fit(TrialSolver(build_solver), config,
                 scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                              resources_per_worker=resources),
                 run_config=RunConfig(name=RUN_NAME, storage_path=storage, callbacks=[forward],
                                      failure_config=FailureConfig(
                                          max_failures=max_failures,
                                          controller_failure_limit=startup_retries(DEFAULT_RESOURCE_TIMEOUT_S)),
                                      checkpoint_config=CheckpointConfig(num_to_keep=1)),
                 # report_every=1: hvps_total is summed over the forwarded reports, and each costs
                 # little with the controller polled every TRAIN_POLL_INTERVAL_S.
                 options=FitOptions(precheck=False, report_every=1, checkpoint_every=checkpoint_every,
                                    history=TrialHistory))
    (output / PLACEMENT_GROUP_FILE).unlink(missing_ok=True)  # the run ended: Train removed its group
    latest, error = TrainToTune.read_state(state_file)
    if error is not None:
        raise TrialDivergedError(error)
    tracker = ResultTracker(metric, mode)
    if latest is not None:
        tracker.load_state_dict(latest)
    return (tracker, dict(result.metrics or {}), {"resumed_from_outer_step": resumed},
            lambda: nullcontext(result.checkpoint))


def failure_result(metric: str, error: str, outer_step: int) -> dict[str, Any]:
    """The last result of a trial that ended on an error it is not retried for (:data:`NOT_RETRIED`).

    ``metric`` and ``best_metric`` are NaN (a searcher learns nothing good from the trial,
    and a scheduler has the keys it reads), ``hg_dist_error`` holds ``"Type: message"``
    and ``solve_failed = 1`` tells the search the trial failed although Tune saw it end.
    """
    return {metric: math.nan, "best_metric": math.nan, "outer_step": int(outer_step), ERROR_KEY: error,
            FAILED_KEY: 1.0}


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()


def upload_run_files(output: str | os.PathLike, destination: str) -> None:
    """Copy a trial's files (``output``, a local folder) to ``destination`` (a URI) now.

    Tune uploads a trial's working directory with each trial checkpoint and once more
    when it stops the trial's actor, but it gives the actors of a finished experiment
    5 s to stop before it kills them, so that last upload (the one holding the final
    ``result.json``) can be lost on a busy machine. The trial uploads its own ending.
    """
    import pyarrow.fs

    pyarrow.fs.copy_files(os.fspath(output), destination, source_filesystem=pyarrow.fs.LocalFileSystem())


def run_trial(config: dict[str, Any], *, build_solver: BuildSolver, base: ExperimentConfig | None,
              trials_dir: str | None, metric: str, mode: str, cpus_per_worker: float,
              checkpoint_every: int = 5, max_failures: int = 0, train_storage: str | None = None,
              upload_to: str | None = None) -> None:
    """The function trainable's body: flatten ``config``, run one solve, report every outer step.

    The trial's outputs go to ``trials_dir/<trial name>`` (``None``: ``run/`` in the trial's Tune working
    directory, which Tune syncs to a URI storage). Its ``result.json`` gets
    ``status`` ``completed`` or, with the error, ``failed``. An error in :data:`NOT_RETRIED`
    ends the trial normally with a :func:`failure_result` (no Tune retry); others are raised.
    With ``upload_to`` (the URI of Tune's experiment folder) the trial copies its files to
    ``<upload_to>/<trial dir>/run`` once it has ended (:func:`upload_run_files`).
    """
    context = tune.get_context()
    trial_name = context.get_trial_name()
    if trials_dir is not None:
        output, destination = str(Path(trials_dir) / trial_name), None
    else:
        working_dir = _working_dir()
        output = str(working_dir / RUN_DIR)
        destination = upload_to and f"{upload_to.rstrip('/')}/{working_dir.name}/{RUN_DIR}"
    try:
        experiment = to_experiment_config(config, base, output=output)
    except (TypeError, ValueError) as error:
        update_result(output, status=RunStatus.FAILED, error=_error_text(error), retried=False, config=config)
        _upload_ending(output, destination)
        tune.report(failure_result(metric, _error_text(error), 0))
        return
    try:
        if experiment.workers == 1:
            tracker, final, info, final_checkpoint = _solve_here(build_solver, experiment, metric, mode,
                                                                 checkpoint_every)
        else:
            storage = None if train_storage is None else f"{train_storage.rstrip('/')}/{trial_name}"
            tracker, final, info, final_checkpoint = _solve_on_workers(
                build_solver, experiment, metric, mode, cpus_per_worker=cpus_per_worker,
                checkpoint_every=checkpoint_every, max_failures=max_failures, train_storage=storage)
    except Exception as error:
        text = error.error if isinstance(error, RunFailedError) else _error_text(error)
        not_retried, ended_by_search = isinstance(error, NOT_RETRIED), False

        def record_failure(current: dict[str, Any]) -> dict[str, Any] | None:
            # A status the search wrote (stopped, interrupted) says it ended the trial, and an error raised while
            # Tune tears the trial down is not the trial's: the status stands. Checked and written as one step,
            # as the search may be writing its status at this moment.
            nonlocal ended_by_search
            ended_by_search = current.get("status") in (RunStatus.STOPPED, RunStatus.INTERRUPTED)
            if ended_by_search:
                return {**current, "error_while_stopped": text}
            return {**current, "status": RunStatus.FAILED, "error": text, "config": experiment.to_dict(),
                    **({"retried": False} if not_retried else {})}

        merge_result(output, record_failure)
        final_error = not_retried and not ended_by_search
        _upload_ending(output, destination)
        if not final_error:
            raise
        # Ends normally: Tune retries a trial that raised, and this one would fail the same way again.
        tune.report(failure_result(metric, text, read_result(output).get("outer_steps") or 0))
        return
    last = tracker.final(final, int(final.get("outer_step", 0)))
    update_result(output, status=RunStatus.COMPLETED, error=None, wall_time_s=last["wall_time_s"],
                  startup_s=last["startup_s"], **info)
    _upload_ending(output, destination)   # before the last report: Tune may stop the trial on it
    with final_checkpoint() as checkpoint:   # Tune keeps it: the best trial's checkpoint is reachable there
        tune.report(last, checkpoint=checkpoint)


def _working_dir() -> Path:
    """This trial's Tune working directory: what Tune uploads to the storage with each trial checkpoint.

    Tune makes it the trial's current directory (unless ``RAY_CHDIR_TO_TRIAL_DIR=0``), and
    the trial reads it from there. Not ``tune.get_context().get_trial_dir()``: on the
    driver's node that is the driver's staging copy of the trial folder, which the driver
    uploads with its experiment state, last, over what the trial uploaded (a retried
    trial's ``result.json`` then kept the failed attempt's status).

    Raises:
        ValueError: ``RAY_CHDIR_TO_TRIAL_DIR=0`` (a URI output then has no folder to upload).
    """
    if os.environ.get("RAY_CHDIR_TO_TRIAL_DIR", "1") == "0":
        raise ValueError("a search whose output is a URI needs Tune to run each trial in its working directory; "
                         "unset RAY_CHDIR_TO_TRIAL_DIR=0")
    return Path.cwd()


def _upload_ending(output: str, destination: str | None) -> None:
    """:func:`upload_run_files` when there is a ``destination``; a failed upload is printed, not raised
    (it must not turn a completed trial into a failed one, and Tune's own sync may still carry the files)."""
    if destination and Path(output).exists():
        try:
            upload_run_files(output, destination)
        except OSError as error:
            print(f"hg_dist: could not upload {output} to {destination}: {error}")


def make_trainable(build_solver: BuildSolver, *, trials_dir: str | Path | None, metric: str, mode: str = "min",
                   base: ExperimentConfig | None = None, cpus_per_worker: float = 1.0, checkpoint_every: int = 5,
                   max_failures: int = 0, train_storage: str | None = None, upload_to: str | None = None) -> Any:
    """A Tune trainable (with per-trial resources) that runs one bilevel solve per trial.

    Args:
        build_solver: ``build_solver(config, rank, world_size) -> solver``, a
            module-level function (Train workers import it).
        trials_dir: each trial writes its outputs (TensorBoard logs included) to
            ``trials_dir/<trial name>``, so ``tensorboard --logdir trials_dir``
            shows all trials side by side. Must be absolute (Tune runs trials in
            their own working directories). ``None``: each trial's Tune directory
            (for a URI storage, which Tune syncs).
        metric: the outer metric the solver records.
        mode: its direction (``"max"`` or ``"min"``).
        base: values of the :class:`ExperimentConfig` fields the space leaves out.
        cpus_per_worker: CPUs per solving process (a one-worker trial, or each Train worker).
        checkpoint_every: outer steps between trial checkpoints.
        max_failures: worker-group restarts of a multi-worker trial's Train run.
        train_storage: a URI under which multi-worker trials keep their Train
            checkpoints (``<train_storage>/<trial>``); default: in the trial's folder.
        upload_to: the URI of Tune's experiment folder when the search's output is a URI:
            each trial uploads its files there once it has ended (:func:`upload_run_files`).

    Returns:
        ``tune.with_resources(...)`` of the function trainable, for ``tune.Tuner``.
    """
    if trials_dir is not None:
        trials_dir = Path(trials_dir)
        if not trials_dir.is_absolute():
            raise ValueError(f"trials_dir must be an absolute path, got {str(trials_dir)!r}; "
                             f"pass Path(trials_dir).resolve()")
    if not callable(build_solver):
        raise TypeError(f"build_solver must be callable as build_solver(config, rank, world_size), "
                        f"got {type(build_solver).__name__}")
    if not cpus_per_worker > 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker}")
    base = ExperimentConfig() if base is None else base
    folder = None if trials_dir is None else str(trials_dir)

    def hg_dist_trial(config: dict[str, Any]) -> None:
        run_trial(config, build_solver=build_solver, base=base, trials_dir=folder, metric=metric, mode=mode,
                  cpus_per_worker=cpus_per_worker, checkpoint_every=checkpoint_every, max_failures=max_failures,
                  train_storage=train_storage, upload_to=upload_to)

    return tune.with_resources(hg_dist_trial, lambda config: trial_resources(
        config, cpus_per_worker, use_gpu=base.use_gpu, workers=base.workers))
