"""Run logging for the solvers: a :class:`Recorder`, its writers and a progress bar.

The module is ``hg_dist.logging`` (the name ``docs/architecture.md`` gives it).
Every import in the package is absolute, so it never shadows the standard
library's :mod:`logging`; this module itself imports the standard one as
``import logging as _stdlib_logging``.

Data flow, one solver step at a time::

    solver ──add(name, value)──▶ Recorder.latest ──log_row(step)──▶ history (list of rows)
                                                                 ├─▶ TensorBoardWriter  (log_dir/tb)
                                                                 ├─▶ ParquetHistory     (log_dir/history.parquet)
                                                                 └─▶ stdlib logger.info (optional)

Values are stored as given (a 0-d tensor stays a tensor, so recording costs no
host–device sync); they become Python floats only when a row or the metrics
are read, with one sync for all of them.
"""

from __future__ import annotations

import logging as _stdlib_logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, TextIO

import torch
from torch import Tensor

__all__ = ["HISTORY_FILE", "TENSORBOARD_DIR", "ParquetHistory", "ProgressBar", "Recorder", "RowWriter",
           "TensorBoardWriter", "format_progress", "to_floats"]

HISTORY_FILE = "history.parquet"
"""File name of the run history inside a solver's ``log_dir``."""

TENSORBOARD_DIR = "tb"
"""Folder of the TensorBoard event files inside a solver's ``log_dir``."""


def to_floats(values: Mapping[str, float | int | Tensor]) -> dict[str, float]:
    """Convert a mapping of scalars (Python numbers or 1-element tensors) to floats, with one sync.

    Raises:
        ValueError: naming the entry that is not a scalar.
    """
    out: dict[str, float] = {}
    tensors: dict[str, Tensor] = {}
    for name, value in values.items():
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"recorded value {name!r} must be a scalar, got shape "
                                 f"{tuple(value.shape)}; record value.mean() or value.norm()")
            tensors[name] = value.detach().reshape(()).to("cpu", torch.float64, non_blocking=True)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
        else:
            raise ValueError(f"recorded value {name!r} must be a number or a scalar tensor, "
                             f"got {type(value).__name__}")
    if tensors:
        out.update(zip(tensors, torch.stack(list(tensors.values())).tolist()))
    return out


class RowWriter(Protocol):
    """Receives each logged row; ``close`` is called once at the end of a run."""

    def write(self, step: int, row: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardWriter:
    """Scalars to TensorBoard event files (tensorboardX), one tag per metric name."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        from tensorboardX import SummaryWriter  # deferred: only runs that log need it

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(logdir=str(self.log_dir))

    def write(self, step: int, row: Mapping[str, float]) -> None:
        for name, value in row.items():
            if name != "step":
                self._writer.add_scalar(name, value, global_step=step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class ParquetHistory:
    """The run history as one Parquet table, one row per logged step.

    Columns are the union of the metric names seen so far (a metric that first
    appears later, such as ``outer_loss``, is null in earlier rows). The file is
    rewritten atomically on :meth:`flush` and :meth:`close`, so a reader never
    sees a half-written table; histories have ``num_iters / log_freq`` rows, so
    rewriting costs little.
    """

    def __init__(self, path: str | os.PathLike, rows: Iterable[Mapping[str, float]] = ()) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, float]] = [dict(r) for r in rows]

    def write(self, step: int, row: Mapping[str, float]) -> None:
        self.rows.append({"step": step, **row})

    def flush(self) -> None:
        write_parquet(self.path, self.rows)

    def close(self) -> None:
        self.flush()


def write_parquet(path: str | os.PathLike, rows: list[Mapping[str, float]]) -> None:
    """Write ``rows`` (dicts of numbers) to ``path`` as a Parquet table; columns = union of keys."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, None] = {"step": None}
    for row in rows:
        columns.update(dict.fromkeys(row))
    table = pa.table({name: pa.array([row.get(name) for row in rows],
                                     type=pa.int64() if name == "step" else pa.float64())
                      for name in columns})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


class Recorder:
    """Latest value of every metric, plus the history of logged rows.

    ``add`` overwrites a metric's latest value; ``log_row`` snapshots all latest
    values as one row, appends it to ``history`` and hands it to every writer.

    Args:
        writers: :class:`RowWriter` objects (TensorBoard, Parquet, ...).
        logger: a standard-library logger (the seed solver's ``logger``); each row
            is also sent to ``logger.info``. ``None`` for none.
    """

    def __init__(self, writers: Iterable[RowWriter] = (),
                 logger: _stdlib_logging.Logger | None = None) -> None:
        self.writers = list(writers)
        self.logger = logger
        self.history: list[dict[str, float]] = []
        self._latest: dict[str, float | Tensor] = {}

    def add(self, name: str, value: float | int | Tensor) -> None:
        """Record ``value`` (a number or a 1-element tensor) as the latest ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric name must be a non-empty str, got {name!r}")
        if isinstance(value, Tensor):
            value = value.detach()
        self._latest[name] = value

    def add_many(self, values: Mapping[str, float | int | Tensor], prefix: str = "") -> None:
        """``add`` each entry of ``values`` under ``prefix + name``."""
        for name, value in values.items():
            self.add(prefix + name, value)

    def latest(self) -> dict[str, float]:
        """The latest value of every metric, as floats (one host sync)."""
        floats = to_floats(self._latest)
        self._latest.update(floats)
        return floats

    def log_row(self, step: int) -> dict[str, float]:
        """Append the latest values as the row of ``step`` and send it to the writers."""
        row = self.latest()
        self.history.append({"step": step, **row})
        for writer in self.writers:
            writer.write(step, row)
        if self.logger is not None:
            self.logger.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))
        return row

    def close(self) -> None:
        """Close every writer (flushes TensorBoard and writes the Parquet file)."""
        for writer in self.writers:
            writer.close()
        self.writers = []

    def state_dict(self) -> dict:
        return {"history": [dict(r) for r in self.history], "latest": self.latest()}

    def load_state_dict(self, state: Mapping) -> None:
        self.history = [dict(r) for r in state["history"]]
        self._latest = dict(state["latest"])


def format_progress(step: int, total: int, elapsed: float, metrics: Mapping[str, float], width: int = 24) -> str:
    """One line of the progress bar, e.g. ``[#####-----]  50/100  12.3 it/s  inner_loss=0.25``.

    ``step`` iterations of ``total`` done after ``elapsed`` seconds.
    """
    total = max(total, 1)
    filled = min(width, int(width * step / total))
    rate = step / elapsed if elapsed > 0 else 0.0
    shown = "  ".join(f"{name}={value:.4g}" for name, value in metrics.items())
    return f"[{'#' * filled}{'-' * (width - filled)}] {step:>{len(str(total))}}/{total}  {rate:.1f} it/s  {shown}"


class ProgressBar:
    """A one-line progress bar with live metrics, redrawn in place with ``\\r``.

    Drawn at most every ``min_interval`` seconds. ``enabled=None`` turns it on only
    when ``stream`` is a terminal (so logs and CI output stay clean).
    """

    SHOWN = ("inner_loss", "outer_loss", "val_acc")

    def __init__(self, total: int, *, enabled: bool | None = None, stream: TextIO | None = None,
                 min_interval: float = 0.1) -> None:
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty()) if callable(isatty) else False
        self.enabled = enabled
        self.total = total
        self.min_interval = min_interval
        self._start = time.perf_counter()
        self._last_draw = -math.inf
        self._drawn = False

    def update(self, step: int, recorder: Recorder, *, force: bool = False) -> None:
        """Redraw with ``step`` done and the recorder's latest shown metrics."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        latest = recorder.latest()
        shown = {name: latest[name] for name in self.SHOWN if name in latest}
        self.stream.write("\r" + format_progress(step, self.total, now - self._start, shown) + "\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def open_writers(log_dir: str | os.PathLike | None, history: Iterable[Mapping[str, float]] = ()) -> list[RowWriter]:
    """The standard writers for ``log_dir``: TensorBoard in ``log_dir/tb``, Parquet in ``log_dir/history.parquet``.

    ``history`` (earlier rows, e.g. from a resumed run) is carried into the Parquet
    file. ``None`` gives no writers.
    """
    if log_dir is None:
        return []
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    return [TensorBoardWriter(log_dir / TENSORBOARD_DIR), ParquetHistory(log_dir / HISTORY_FILE, history)]
