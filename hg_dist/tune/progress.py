"""Live progress of a search: one line per finished trial, a status line every ``interval`` seconds.

::

    [  41s] cg_00002 stopped by the scheduler after 4 outer steps: best val_acc 0.91 (3/6 done)
    [  60s] 2 running, 3 done (1 completed, 2 stopped), 0 failed, 1 pending; best val_acc 0.965 (nystrom_00001)

Tune's own reporters print a wide table per trial and result; this one prints what
a long search needs (counts, the best so far, each end with its reason), and it
hands each trial's end to ``on_end`` so the search can record it in the trial's
``result.json`` as soon as Tune knows it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ray.tune import Callback
from ray.tune.experiment import Trial

from hg_dist.status import RunStatus

__all__ = ["SearchProgress", "trial_error", "trial_status"]

ERROR_KEY = "hg_dist_error"
"""Result key of an error a trial ended on without raising: a Train run's reports with a missing or
non-finite metric, or an error it is not retried for (see :mod:`hg_dist.tune.trainable`)."""

FAILED_KEY = "solve_failed"
"""Result key (``1.0``) of a trial's last result when it ended on an error it is not retried for."""

FINAL = (Trial.TERMINATED, Trial.ERROR)


def trial_status(trial: Trial) -> str:
    """``completed`` (its solve ran to the end: its last result has ``solve_completed``; Tune marks a
    trial the scheduler stopped ``done`` too), ``stopped`` (by the scheduler), ``failed`` (Tune's error,
    or a trial that ended normally on an error it is not retried for: its last result has
    ``solve_failed``, see :mod:`hg_dist.tune.trainable`), or Tune's own status in lower case
    (``pending``, ``running``, ``paused``) for a trial that has not ended."""
    if trial.status == Trial.ERROR:
        return RunStatus.FAILED
    if trial.status == Trial.TERMINATED:
        last = trial.last_result or {}
        if last.get(FAILED_KEY):
            return RunStatus.FAILED
        return RunStatus.COMPLETED if last.get("solve_completed") else RunStatus.STOPPED
    return trial.status.lower()


def trial_error(trial: Trial) -> str | None:
    """The error a trial ended on: Tune's (the trial raised), or the one its last result carries."""
    if trial.status == Trial.ERROR:
        return short_error(trial.get_error())
    error = (trial.last_result or {}).get(ERROR_KEY)
    return error if isinstance(error, str) else None


class SearchProgress(Callback):
    """A Tune callback printing the search's progress (see the module docs).

    Args:
        metric, mode: the searched metric (results carry its running best as ``best_metric``).
        total: trials the search will run in all (for "3/6 done").
        interval: seconds between status lines (``0``: none).
        on_end: ``on_end(trial, status, error)`` once per ended trial.
        stream: where lines go (default ``sys.stdout``).
        quiet: print nothing (``on_end`` is still called).
    """

    def __init__(self, metric: str, mode: str, total: int, *, interval: float = 30.0,
                 on_end: Callable[[Trial, str, str | None], None] | None = None, stream: TextIO | None = None,
                 quiet: bool = False) -> None:
        self.metric = metric
        self.mode = mode
        self.total = total
        self.interval = interval
        self.on_end = on_end
        self.stream = stream
        self.quiet = quiet
        self.start = time.monotonic()
        self.last_status = self.start
        self.best: tuple[float, str] | None = None
        self.trials: list[Trial] = []
        self.ended: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its run config; the stream and hook stay here
        return {**self.__dict__, "stream": None, "on_end": None}

    def print(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.start:5.0f}s] {text}", file=self.stream or sys.stdout, flush=True)

    def _better(self, value: float) -> bool:
        return self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        value = result.get("best_metric")
        if isinstance(value, (int, float)) and math.isfinite(value) and self._better(value):
            self.best = (float(value), str(trial))

    def _ended(self, trial: Trial, status: str, error: str | None) -> None:
        if trial.trial_id in self.ended:
            return
        self.ended[trial.trial_id] = status
        result = trial.last_result or {}
        steps = result.get("outer_step")
        value = result.get("best_metric")
        done = len({t.trial_id for t in self.trials if t.status in FINAL} | {trial.trial_id})
        what = {"completed": "completed", "stopped": "stopped by the scheduler"}.get(status, status)
        line = f"{trial} {what}"
        if steps is not None:
            line += f" after {int(steps)} outer steps"
        if isinstance(value, (int, float)) and math.isfinite(value):
            line += f": best {self.metric} {value:.4g}"
        if error:
            line += f": {error}"
        self.print(f"{line} ({done}/{self.total} done)")
        if self.on_end is not None:
            self.on_end(trial, status, error)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.trials = list(trials)
        last = trial.last_result or {}
        if last.get(FAILED_KEY):  # ended normally on an error it is not retried for
            self._ended(trial, RunStatus.FAILED, trial_error(trial))
            return
        self._ended(trial, RunStatus.COMPLETED if last.get("solve_completed") else RunStatus.STOPPED, None)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.trials = list(trials)
        self._ended(trial, RunStatus.FAILED, short_error(trial.get_error()))

    def on_step_end(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        self.trials = list(trials)
        now = time.monotonic()
        if self.interval and now - self.last_status >= self.interval:
            self.last_status = now
            self.print(self.status_line())

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        self.trials = list(trials)

    def status_line(self) -> str:
        """``2 running, 3 done (1 completed, 2 stopped), 0 failed, 1 pending; best val_acc 0.965 (trial)``."""
        statuses = [trial_status(t) for t in self.trials]
        done = [s for s in statuses if s in ("completed", "stopped")]
        pending = statuses.count("pending") + max(0, self.total - len(self.trials))
        line = (f"{statuses.count('running')} running, {len(done)} done ({done.count('completed')} completed, "
                f"{done.count('stopped')} stopped), {statuses.count('failed')} failed, {pending} pending")
        if self.best is not None:
            line += f"; best {self.metric} {self.best[0]:.4g} ({self.best[1]})"
        if pending and not done and not statuses.count("failed") and not any("outer_step" in (t.last_result or {}) for t in self.trials):
            line = "starting: Ray is starting the first trials' processes (and a multi-worker trial's Train " \
                   "workers); " + line
        return line


def short_error(error: BaseException | None) -> str | None:
    """The root cause's type and message, without Ray's wrapping tracebacks."""
    if error is None:
        return None
    cause = error
    while True:
        inner = getattr(cause, "cause", None) or cause.__cause__
        if inner is None or inner is cause:
            break
        cause = inner
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    # Ray's RayTaskError text is a traceback whose last line is "Type: message".
    message = lines[-1] if lines else ""
    name = type(cause).__name__
    return message if message.startswith(name) or ": " in message[:60] else f"{name}: {message}"
