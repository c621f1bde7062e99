"""Solver callbacks: what happens around the bilevel loop without being the loop.

A callback overrides any of the hooks of :class:`Callback`; the solver calls them
in order. A plain function ``fn(solver, metrics)`` is also a callback: it is called
after every outer step (:func:`as_callback`). The solver builds the standard ones
from its constructor arguments:

* ``log_dir``  → :class:`HistoryWriter` (TensorBoard + Parquet history, flushed
  while the run goes, closed whatever ends it); a ``HistoryWriter`` among the
  user's callbacks (say one flushing every row) takes its place;
* ``progress`` → :class:`ProgressBar` (tqdm, with the live losses);
* ``logger``   → :class:`LogRows` (each history row to a standard-library logger).

A runner adds what one run needs through ``solver.run(callbacks, log_dir=...,
progress=...)`` (:func:`run_callbacks`), never by changing the built solver: e.g.
:class:`Checkpointer` (the solver's whole state to a file on a schedule), added by
:func:`hg_dist.experiment.run_local`, which resumes from that file.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from hg_dist import checkpoint
from hg_dist.recording import HISTORY_FILE, TENSORBOARD_DIR, ParquetHistory, TensorBoardWriter

if TYPE_CHECKING:  # pragma: no cover
    from hg_dist.solver import BaseSolver

__all__ = ["AS_BUILT", "Callback", "Checkpointer", "HistoryWriter", "Interval", "LogRows", "ProgressBar",
           "as_callback", "run_callbacks"]


class _AsBuilt(enum.Enum):
    AS_BUILT = "as built"

    def __repr__(self) -> str:
        return "AS_BUILT"


AS_BUILT = _AsBuilt.AS_BUILT
"""Default of ``log_dir``/``progress`` in ``solver.run(...)``: the value the solver was built with
(``None`` is a value there: no files, or a bar only on a terminal)."""


class Callback:
    """Base class of solver callbacks; every hook does nothing by default."""

    def on_run_start(self, solver: "BaseSolver") -> None:
        """``run()`` is starting at ``solver.global_step``."""

    def on_outer_step(self, solver: "BaseSolver", metrics: dict[str, float]) -> None:
        """An outer step has ended (``metrics``: the latest recorded values, plus the counters)."""

    def on_row(self, solver: "BaseSolver", step: int, row: Mapping[str, float]) -> None:
        """A history row was logged for ``step``."""

    def on_step_end(self, solver: "BaseSolver") -> None:
        """Inner step ``solver.global_step - 1`` (and its outer step, if any) has ended."""

    def on_run_end(self, solver: "BaseSolver", error: BaseException | None) -> None:
        """``run()`` is ending, normally (``error is None``) or with ``error``; always called."""


class _OuterStepFunction(Callback):
    def __init__(self, fn: Callable[["BaseSolver", dict[str, float]], None]) -> None:
        self.fn = fn

    def on_outer_step(self, solver: "BaseSolver", metrics: dict[str, float]) -> None:
        self.fn(solver, metrics)


def as_callback(obj: Any) -> Callback:
    """``obj`` itself if it is a :class:`Callback`, else the callable wrapped as an outer-step callback."""
    if isinstance(obj, Callback):
        return obj
    if not callable(obj):
        raise TypeError(f"a callback must be an hg_dist.callbacks.Callback or callable as callback(solver, "
                        f"metrics), got {type(obj).__name__}")
    return _OuterStepFunction(obj)


class HistoryWriter(Callback):
    """Writes every history row to ``log_dir/tb`` (TensorBoard) and ``log_dir/history.parquet``.

    Rows already in the recorder when the run starts (a resumed run) are carried
    into the Parquet file, which is rewritten from them (so rows a crashed run logged
    after its checkpoint disappear), and TensorBoard is told to hide the events of
    earlier files from the first step the resumed run logs (``purge_step``). Both
    files are flushed at most every ``flush_interval`` seconds while the run goes
    (``0``: after every row), and at the end of the run whatever ended it
    (completion, an error, Ctrl-C), so a history is never more than
    ``flush_interval`` behind the run and never half-written.
    """

    def __init__(self, log_dir: str | os.PathLike, flush_interval: float = 5.0) -> None:
        self.log_dir = Path(log_dir)
        self.flush_interval = float(flush_interval)
        self._tensorboard: TensorBoardWriter | None = None
        self._parquet: ParquetHistory | None = None
        self._last_flush = 0.0

    def on_run_start(self, solver: "BaseSolver") -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        resumed = solver.global_step > 0
        self._tensorboard = TensorBoardWriter(self.log_dir / TENSORBOARD_DIR, flush_secs=self.flush_interval or 1,
                                              purge_step=solver.global_step + 1 if resumed else None)
        self._parquet = ParquetHistory(self.log_dir / HISTORY_FILE, solver.recorder.history)
        self._last_flush = time.monotonic()

    def on_row(self, solver: "BaseSolver", step: int, row: Mapping[str, float]) -> None:
        self._tensorboard.write(step, row)
        self._parquet.write(step, row)
        if time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered now (atomic Parquet rewrite, TensorBoard flush)."""
        if self._parquet is not None:
            self._parquet.flush()
            self._tensorboard.flush()
            self._last_flush = time.monotonic()

    def on_run_end(self, solver: "BaseSolver", error: BaseException | None) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._tensorboard.close()
            self._parquet = self._tensorboard = None


class Interval(Protocol):
    """How often: every ``steps`` outer steps, or every ``seconds`` (exactly one is set), such as
    :class:`hg_dist.distributed.Every`."""

    steps: int | None
    seconds: float | None


class Checkpointer(Callback):
    """Saves the solver's whole state (:func:`hg_dist.checkpoint.save`) to ``path`` as often as ``every`` says.

    The schedule is that of distributed runs: ``every.steps = n`` saves after outer
    steps ``n, 2n, …`` (the same step numbers after a resume); ``every.seconds = t``
    after the first outer step at least ``t`` seconds after the previous save (or
    the start). A save happens once the inner step holding that outer step has
    ended and its history row (if any) was logged, so the saved history ends where
    a resumed run starts logging again. A run that completes is saved at its end.
    Each save replaces the file atomically: a run killed while saving keeps the
    previous checkpoint.
    """

    def __init__(self, path: str | os.PathLike, every: Interval, clock: Callable[[], float] = time.monotonic) -> None:
        if (every.steps is None) == (every.seconds is None):
            raise ValueError(f"every needs exactly one of steps or seconds, got steps={every.steps!r}, "
                             f"seconds={every.seconds!r}")
        self.path = Path(path)
        self.every = every
        self.clock = clock
        self.last = clock()
        self.due = False
        self.saved_step: int | None = None   # global step of the latest save

    def on_run_start(self, solver: "BaseSolver") -> None:
        self.last = self.clock()
        self.due = False

    def on_outer_step(self, solver: "BaseSolver", metrics: dict[str, float]) -> None:
        if self.every.steps is not None:
            self.due = solver.outer_step > 0 and solver.outer_step % self.every.steps == 0
        else:
            self.due = self.clock() - self.last >= self.every.seconds

    def on_step_end(self, solver: "BaseSolver") -> None:
        if self.due:
            self.save(solver)

    def on_run_end(self, solver: "BaseSolver", error: BaseException | None) -> None:
        if error is None and self.saved_step != solver.global_step:
            self.save(solver)

    def save(self, solver: "BaseSolver") -> None:
        checkpoint.save(solver, self.path)
        self.due, self.last, self.saved_step = False, self.clock(), solver.global_step


class ProgressBar(Callback):
    """A tqdm bar over the inner steps, showing ``inner_loss``, ``outer_loss`` and ``val_acc``.

    ``enabled=None`` shows it only when stderr is a terminal (logs and CI stay clean).
    The metrics are refreshed at most every ``min_interval`` seconds (reading them
    costs a host sync).
    """

    SHOWN = ("inner_loss", "outer_loss", "val_acc")

    def __init__(self, *, enabled: bool | None = None, min_interval: float = 0.5, file: Any = None) -> None:
        self.enabled = enabled
        self.min_interval = min_interval
        self.file = file
        self._bar = None
        self._last = 0.0

    def on_run_start(self, solver: "BaseSolver") -> None:
        self._bar = None
        if self.enabled is False:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            if self.enabled:
                raise ImportError("progress=True needs tqdm (pip install tqdm); pass progress=False") from None
            return                                     # progress=None: no bar where tqdm is not installed
        disable = None if self.enabled is None else not self.enabled  # tqdm: None = only on a terminal
        self._bar = tqdm(total=solver.num_iters, initial=solver.global_step, disable=disable, file=self.file,
                         unit="step", dynamic_ncols=True, leave=True)
        self._last = 0.0

    def on_step_end(self, solver: "BaseSolver") -> None:
        if self._bar is None or self._bar.disable:
            return
        self._bar.update(solver.global_step - self._bar.n)
        now = time.monotonic()
        if now - self._last >= self.min_interval:
            self._last = now
            latest = solver.recorder.latest()
            self._bar.set_postfix({name: f"{latest[name]:.4g}" for name in self.SHOWN if name in latest},
                                  refresh=False)

    def on_run_end(self, solver: "BaseSolver", error: BaseException | None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class LogRows(Callback):
    """Sends each history row to a standard-library logger (the seed solver's ``logger``)."""

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.logger = logger

    def on_row(self, solver: "BaseSolver", step: int, row: Mapping[str, float]) -> None:
        self.logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))


def run_callbacks(solver: "BaseSolver", callbacks: Iterable[Any] = (), *,
                  log_dir: str | os.PathLike | None | _AsBuilt = AS_BUILT,
                  progress: bool | None | _AsBuilt = AS_BUILT) -> list[Callback]:
    """The callbacks of one ``run()``: the standard ones, then the solver's own, then ``callbacks``.

    The standard ones come from ``progress``/``log_dir`` (:data:`AS_BUILT`: the solver's
    constructor arguments) and the solver's ``logger``. A :class:`HistoryWriter` among
    the solver's callbacks or ``callbacks`` replaces the standard one.

    Raises:
        TypeError: an entry of ``callbacks`` is neither a :class:`Callback` nor callable;
            ``progress`` is not a bool or ``None``.
    """
    extra = [as_callback(cb) for cb in callbacks]
    log_dir = solver.log_dir if log_dir is AS_BUILT else log_dir
    progress = solver.progress if progress is AS_BUILT else progress
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None (a bar only on a terminal), "
                        f"got {type(progress).__name__}")
    own = [as_callback(cb) for cb in solver.callbacks] + extra
    standard: list[Callback] = [ProgressBar(enabled=progress)]
    if log_dir is not None and not any(isinstance(cb, HistoryWriter) for cb in own):
        standard.append(HistoryWriter(log_dir))
    if solver.logger is not None:
        standard.append(LogRows(solver.logger))
    return standard + own
