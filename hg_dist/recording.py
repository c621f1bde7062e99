"""Metrics of a run: the :class:`Recorder`, and the files its rows go to.

Data flow, one solver step at a time::

    solver ──add(name, value)──▶ Recorder ──archive / flush()   (the seed's API: every value, means)
                                        └─log_row(step)──▶ history rows ──▶ HistoryWriter callback
                                                                           ├─ TensorBoard (log_dir/tb)
                                                                           └─ Parquet     (log_dir/history.parquet)

Values are stored as given (a 0-d tensor stays a tensor, so recording costs no
host–device sync); they become Python floats when they are read, all pending
values in one sync. (This module was ``hg_dist.logging``; renamed so that it never
shadows the standard library's :mod:`logging`.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hg_dist.atomic import write_atomic

__all__ = ["HISTORY_FILE", "TENSORBOARD_DIR", "ParquetHistory", "Recorder", "TensorBoardWriter", "to_floats",
           "write_parquet"]

HISTORY_FILE = "history.parquet"
"""File name of the run history inside a solver's ``log_dir``."""

TENSORBOARD_DIR = "tb"
"""Folder of the TensorBoard event files inside a solver's ``log_dir``."""


def _floats(values: Sequence[float | int | Tensor], names: Sequence[str]) -> list[float]:
    """``values`` as Python floats with one host sync for all tensors among them."""
    out: list[Any] = []
    tensors: list[Tensor] = []
    where: list[int] = []
    for name, value in zip(names, values):
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"recorded value {name!r} must be a scalar, got shape "
                                 f"{tuple(value.shape)}; record value.mean() or value.norm()")
            where.append(len(out))
            out.append(None)
            tensors.append(value.detach().reshape(()).to("cpu", torch.float64, non_blocking=True))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append(float(value))
        else:
            raise ValueError(f"recorded value {name!r} must be a number or a scalar tensor, "
                             f"got {type(value).__name__}")
    if tensors:
        for index, value in zip(where, torch.stack(tensors).tolist()):
            out[index] = value
    return out


def to_floats(values: Mapping[str, float | int | Tensor]) -> dict[str, float]:
    """A mapping of scalars (numbers or 1-element tensors) as floats, with one sync.

    Raises:
        ValueError: naming the entry that is not a scalar.
    """
    return dict(zip(values, _floats(list(values.values()), list(values))))


class Recorder:
    """Every recorded value per metric, the latest of each, and the history of logged rows.

    The seed library's surface: :meth:`add`, :meth:`flush` (the mean of each metric
    since the previous flush) and :attr:`archive` (every value added, per name).
    On top of it, :meth:`latest` and :meth:`log_row` (a snapshot of the latest
    values, appended to :attr:`history`; the solver hands each row to its callbacks).
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self._archive: dict[str, list[float]] = {}
        self._pending: list[tuple[str, float | int | Tensor]] = []
        self._flushed: dict[str, int] = {}

    def add(self, name: str, value: float | int | Tensor) -> None:
        """Record ``value`` (a number or a 1-element tensor) for ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric name must be a non-empty str, got {name!r}")
        self._pending.append((name, value.detach() if isinstance(value, Tensor) else value))

    def add_many(self, values: Mapping[str, float | int | Tensor], prefix: str = "") -> None:
        """``add`` each entry of ``values`` under ``prefix + name``."""
        for name, value in values.items():
            self.add(prefix + name, value)

    def _settle(self) -> None:
        """Move pending values into the archive as floats (one host sync)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        names = [name for name, _ in pending]
        try:
            floats = _floats([value for _, value in pending], names)
        except ValueError:
            self._pending = [(n, v) for n, v in pending if not (isinstance(v, Tensor) and v.numel() != 1)]
            raise
        for name, value in zip(names, floats):
            self._archive.setdefault(name, []).append(value)

    @property
    def archive(self) -> dict[str, list[float]]:
        """Every value added so far, per metric name (the seed's ``recorder.archive``)."""
        self._settle()
        return self._archive

    def flush(self) -> dict[str, float]:
        """The mean of each metric over the values added since the previous ``flush`` (seed API)."""
        self._settle()
        means = {}
        for name, values in self._archive.items():
            start = self._flushed.get(name, 0)
            if start < len(values):
                means[name] = math.fsum(values[start:]) / (len(values) - start)
                self._flushed[name] = len(values)
        return means

    def latest(self) -> dict[str, float]:
        """The latest value of every metric, as floats."""
        self._settle()
        return {name: values[-1] for name, values in self._archive.items()}

    def log_row(self, step: int) -> dict[str, float]:
        """Append the latest values as the history row of ``step``; return the row (without ``step``)."""
        row = self.latest()
        self.history.append({"step": step, **row})
        return row

    def state_dict(self) -> dict[str, Any]:
        self._settle()
        return {"history": [dict(r) for r in self.history],
                "archive": {name: list(values) for name, values in self._archive.items()},
                "flushed": dict(self._flushed)}

    @staticmethod
    def check_state(state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` is what :meth:`state_dict` returns."""
        if not isinstance(state, Mapping) or set(state) != {"history", "archive", "flushed"} \
                or not isinstance(state["archive"], Mapping) \
                or not all(isinstance(v, list) for v in state["archive"].values()):
            raise ValueError("the saved recorder state is malformed; pass what solver.state_dict() returned")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state)
        self.history = [dict(r) for r in state["history"]]
        self._archive = {name: list(values) for name, values in state["archive"].items()}
        self._flushed = dict(state["flushed"])
        self._pending = []


class TensorBoardWriter:
    """Scalars to TensorBoard event files (tensorboardX), one tag per metric name."""

    def __init__(self, log_dir: str | os.PathLike, flush_secs: float = 10.0, purge_step: int | None = None) -> None:
        """``purge_step``: TensorBoard hides the events of earlier files at steps ``>= purge_step``
        (what a resumed run logs again)."""
        from tensorboardX import SummaryWriter  # deferred: only runs that log need it

        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(logdir=str(self.log_dir), flush_secs=max(1, int(flush_secs)),
                                     purge_step=purge_step)

    def write(self, step: int, row: Mapping[str, float]) -> None:
        for name, value in row.items():
            if name != "step":
                self._writer.add_scalar(name, value, global_step=step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()


class ParquetHistory:
    """The run history as one Parquet table, one row per logged step.

    Columns are the union of the metric names seen so far (a metric that first
    appears later, such as ``outer_loss``, is null in earlier rows). :meth:`flush`
    rewrites the file atomically (a temporary file, then a rename), so a reader never
    sees a half-written table; histories have ``num_iters / log_freq`` rows, so a
    rewrite costs little.
    """

    def __init__(self, path: str | os.PathLike, rows: Iterable[Mapping[str, float]] = ()) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, float]] = [dict(r) for r in rows]
        self._written = -1

    def write(self, step: int, row: Mapping[str, float]) -> None:
        self.rows.append({"step": step, **row})

    def flush(self) -> None:
        if self._written != len(self.rows):
            write_parquet(self.path, self.rows)
            self._written = len(self.rows)

    def close(self) -> None:
        self.flush()


def write_parquet(path: str | os.PathLike, rows: list[Mapping[str, float]]) -> None:
    """Write ``rows`` (dicts of numbers) to ``path`` atomically as a Parquet table; columns = union of keys."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns: dict[str, None] = {"step": None}
    for row in rows:
        columns.update(dict.fromkeys(row))
    table = pa.table({name: pa.array([row.get(name) for row in rows],
                                     type=pa.int64() if name == "step" else pa.float64())
                      for name in columns})
    write_atomic(path, lambda file: pq.write_table(table, file))

