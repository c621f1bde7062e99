"""The results table of a search (one row per trial), its Parquet file, and re-running the best.

Columns of the table (:func:`table_schema`): ``trial``, ``status`` (``completed``,
``stopped`` — ended early by the scheduler —, or ``failed``), the settings the
trial used (:func:`~hg_dist.tune.space.search_columns`, from the method registries;
null where its methods do not take one), ``best_metric`` (best value of the searched metric over its outer
steps), ``last_metric``, ``outer_steps``, ``wall_time_s``, ``hvps`` (Hessian-vector
products used), ``error`` (for failed trials) and ``config`` (the trial's whole
:class:`~hg_dist.experiment.ExperimentConfig` as JSON, so any row can be re-run).

The best trial's config is saved as JSON next to the table; re-run it with
:func:`rerun_best` or ``python -m hg_dist.tune.rerun <search dir>/best_config.json``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hg_dist.experiment import ExperimentConfig
from hg_dist.tune.space import NESTED, search_columns, setting_column

__all__ = ["best_row", "format_table", "load_best", "rerun_best", "save_best",
           "write_table"]

def table_schema() -> pa.Schema:
    """Schema of the results table; its settings columns come from the registries (see ``search_columns``)."""
    kinds = {"approx": pa.string(), "outer_optimizer": pa.string(), "workers": pa.int64()}
    for _, registry in NESTED.values():
        kinds.update({setting_column(s): pa.int64() if s.kind is int else pa.float64() for s in registry.settings().values()})
    settings = [(column, kinds[column]) for column in search_columns()]
    return pa.schema([("trial", pa.string()), ("status", pa.string()), *settings,
                      ("best_metric", pa.float64()), ("last_metric", pa.float64()), ("outer_steps", pa.int64()),
                      ("wall_time_s", pa.float64()), ("hvps", pa.int64()), ("error", pa.string()),
                      ("config", pa.string())])


_HIDDEN = ("last_metric", "error", "config")


def make_table(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> pa.Table:
    """Build the results table from row dicts (keys: the :func:`table_schema` names)."""
    schema = table_schema()
    table = pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)
    return table.replace_schema_metadata({"metric": metric, "mode": mode})


def best_row(table: pa.Table) -> dict[str, Any] | None:
    """The row with the best ``best_metric`` among trials that did not fail (``None`` if none)."""
    mode = (table.schema.metadata or {}).get(b"mode", b"max").decode()
    rows = [row for row in table.to_pylist()
            if row["status"] != "failed" and row["best_metric"] is not None and math.isfinite(row["best_metric"])]
    if not rows:
        return None
    pick = max if mode == "max" else min
    return pick(rows, key=lambda row: row["best_metric"])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def format_table(table: pa.Table) -> str:
    """The table as fixed-width text, best trial first and failed trials (with their errors) last."""
    metadata = table.schema.metadata or {}
    metric = metadata.get(b"metric", b"metric").decode()
    mode = metadata.get(b"mode", b"max").decode()
    rows = table.to_pylist()

    def order(row: dict[str, Any]) -> tuple[int, float]:
        value = row["best_metric"]
        if row["status"] == "failed" or value is None or math.isnan(value):
            return (1, 0.0)
        return (0, -value if mode == "max" else value)

    rows.sort(key=order)
    shown = [name for name in table.column_names if name not in _HIDDEN
             and any(row[name] is not None for row in rows)]
    header = [name if name != "best_metric" else f"best_{metric}" for name in shown]
    cells = [[_cell(row[name]) for name in shown] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    for row in rows:
        if row["error"]:
            lines.append(f"{row['trial']} failed: {row['error']}")
    return "\n".join(lines)


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write the table as Parquet to ``path`` (parents created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _import_path(build_solver: Callable[..., Any]) -> dict[str, str | None]:
    """Where ``build_solver`` lives: its module, qualified name and source file."""
    try:
        source = inspect.getsourcefile(build_solver)
    except TypeError:
        source = None
    return {"module": build_solver.__module__, "qualname": build_solver.__qualname__,
            "file": str(Path(source).resolve()) if source else None}


def _resolve(location: dict[str, str | None]) -> Callable[..., Any]:
    """Import ``build_solver`` from the record written by :func:`_import_path`."""
    module_name, qualname, file = location["module"], location["qualname"], location["file"]
    if "<locals>" in (qualname or ""):
        raise ValueError(f"build_solver {qualname!r} was defined inside a function and cannot be imported; "
                         f"pass build_solver= to rerun_best")
    try:
        if module_name == "__main__":
            raise ImportError("__main__")
        module = importlib.import_module(module_name)
    except ImportError:
        if not file or not Path(file).exists():
            raise ImportError(f"cannot import build_solver from module {module_name!r} (file {file!r}); "
                              f"pass build_solver= to rerun_best") from None
        spec = importlib.util.spec_from_file_location(Path(file).stem, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules.setdefault(Path(file).stem, module)
        spec.loader.exec_module(module)
    obj: Any = module
    for part in qualname.split("."):
        obj = vars(obj)[part]
    return obj


def save_best(path: str | Path, config: ExperimentConfig, *, build_solver: Callable[..., Any], metric: str,
              mode: str, value: float, trial: str) -> Path:
    """Save the best trial's :class:`ExperimentConfig` (and where ``build_solver`` lives) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"metric": metric, "mode": mode, "value": value, "trial": trial,
              "build_solver": _import_path(build_solver), "config": dataclasses.asdict(config)}
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def load_best(path: str | Path) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Read a file written by :func:`save_best`: ``(config, record)``."""
    path = Path(path)
    if path.is_dir():
        path = path / "best_config.json"
    if not path.exists():
        raise FileNotFoundError(f"no best config at {str(path)!r}; pass the best_config.json a search wrote "
                                f"(or its directory)")
    record = json.loads(path.read_text())
    return ExperimentConfig(**record["config"]), record


def rerun_best(path: str | Path, *, build_solver: Callable[..., Any] | None = None,
               output: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Re-run the best trial of a search from its saved config; return the final metrics.

    Args:
        path: the search's ``best_config.json`` (or the search directory).
        build_solver: defaults to the one the search used, imported from where it lives.
        output: output directory of the re-run (default: ``best_rerun`` beside ``path``).
        overrides: :class:`ExperimentConfig` fields to change, e.g. ``num_iters=1000``.

    The run goes through :func:`hg_dist.distributed.run_experiment`: in this
    process for one worker, as a Ray Train run for several.
    """
    from hg_dist.distributed import run_experiment

    config, record = load_best(path)
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    build_solver = _resolve(record["build_solver"]) if build_solver is None else build_solver
    config = dataclasses.replace(config, output=str(output if output is not None else folder / "best_rerun"),
                                 **overrides)
    return run_experiment(build_solver, config)
