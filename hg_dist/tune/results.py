"""The results table of a search (one row per trial), its Parquet file, and re-running the best.

The table is built from Tune's own ``ResultGrid.get_dataframe()`` (each trial's last
result, which carries its running ``best_metric``, ``outer_step``, ``hvps_total`` and
``wall_time_s``) and the grid's ``Result`` objects (config, error). Columns
(:func:`table_schema`): ``trial``, ``status`` (``completed``; ``stopped`` — ended
early by the scheduler —; ``failed``; ``interrupted`` — the search was stopped
first, ``--resume`` continues it —; ``pending``), the settings the trial used
(:func:`~hg_dist.tune.space.search_columns`, from the method registries; null where
its methods do not take one), ``best_metric``, ``last_metric``, ``outer_steps``,
``wall_time_s`` (seconds solving, over resumes), ``startup_s`` (the rest of the trial's
time: Ray Train's workers starting, the solver being built and restored; see
:mod:`hg_dist.tune.trainable`), ``hvps`` (Hessian-vector products),
``error`` and ``config`` (the trial's whole :class:`~hg_dist.experiment.ExperimentConfig`
as JSON, so any row can be re-run).

The best trial's config is saved as JSON next to the table, with ``build_solver``
recorded as ``module:function`` relative to the project (``examples.data_hypercleaning:
build_solver``), never as an absolute path, so ``python -m hg_dist.tune.rerun
best_config.json`` works from a checkout on another machine.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hg_dist.atomic import write_atomic, write_json
from hg_dist.experiment import ExperimentConfig
from hg_dist.status import RunStatus
from hg_dist.tune.space import NESTED, search_columns, setting_column, to_experiment_config, trial_settings

__all__ = ["best_record", "best_row", "format_table", "load_best", "make_table", "prepare_rerun", "rerun_best", "resolve_solver", "save_best",
           "solver_reference", "table_rows", "table_schema", "write_table"]


def table_schema() -> pa.Schema:
    """Schema of the results table; its settings columns come from the registries (see ``search_columns``)."""
    kinds = {"approx": pa.string(), "outer_optimizer": pa.string(), "workers": pa.int64()}
    for _, registry in NESTED.values():
        kinds.update({setting_column(s): pa.int64() if s.kind is int else pa.float64()
                      for s in registry.settings().values()})
    settings = [(column, kinds[column]) for column in search_columns()]
    return pa.schema([("trial", pa.string()), ("status", pa.string()), *settings,
                      ("best_metric", pa.float64()), ("last_metric", pa.float64()), ("outer_steps", pa.int64()),
                      ("wall_time_s", pa.float64()), ("startup_s", pa.float64()),
                      ("hvps", pa.int64()), ("error", pa.string()),
                      ("config", pa.string())])


_HIDDEN = ("last_metric", "error", "config")


def _number(value: Any, kind: type = float) -> Any:
    """A finite number from a dataframe cell (``None`` for NaN, missing or non-numbers)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return kind(number) if math.isfinite(number) else None


def _settings(raw: Mapping[str, Any], base: ExperimentConfig, output: str) -> tuple[dict[str, Any], str]:
    """``(settings columns, config JSON)`` of a trial's sampled config; never raises.

    A config that is not valid (the trial failed on it) keeps what can be read: the
    method names, and the raw config as JSON.
    """
    try:
        config = to_experiment_config(raw, base, output=output)
    except (TypeError, ValueError, KeyError):
        row: dict[str, Any] = dict.fromkeys(search_columns())
        for key, (column, _) in NESTED.items():
            value = raw.get(key) if isinstance(raw, Mapping) else None
            row[column] = value.get("name") if isinstance(value, Mapping) and isinstance(value.get("name"), str) \
                else None
        workers = raw.get("workers") if isinstance(raw, Mapping) else None
        row["workers"] = workers if isinstance(workers, int) and not isinstance(workers, bool) else None
        return row, json.dumps(dict(raw) if isinstance(raw, Mapping) else raw, default=str)
    return trial_settings(config), json.dumps(dataclasses.asdict(config), default=str)


def table_rows(result_grid: Any, *, metric: str, base: ExperimentConfig, statuses: Mapping[str, str],
               output_of: Callable[[str], str]) -> list[dict[str, Any]]:
    """One row per trial of a Tune ``ResultGrid``; never raises on a bad trial.

    Args:
        statuses: trial name → status (see the module docs); a trial not in it is
            ``failed`` with an error, else ``interrupted``.
        output_of: trial name → its output folder (recorded in its config).
    """
    from hg_dist.tune.progress import short_error
    from hg_dist.tune.trainable import ERROR_KEY

    try:
        frame = result_grid.get_dataframe()
        last = {Path(str(path)).name: row for path, row in zip(frame["logdir"], frame.to_dict("records"))} \
            if "logdir" in frame else {}
    except Exception:  # noqa: BLE001 - a trial whose files are unreadable must not cost the others' rows
        last = {}
    rows = []
    for result in result_grid:
        name = Path(str(result.path)).name
        values = last.get(name) or dict(result.metrics or {})
        error = short_error(result.error) if result.error is not None else values.get(ERROR_KEY)
        if isinstance(error, float):  # a NaN cell of the dataframe
            error = None
        status = statuses.get(name) or (RunStatus.FAILED if error else RunStatus.INTERRUPTED)
        settings, config = _settings(result.config or {}, base, output_of(name))
        rows.append({
            "trial": name, "status": status, **settings,
            "best_metric": _number(values.get("best_metric")), "last_metric": _number(values.get(metric)),
            "outer_steps": _number(values.get("outer_step"), int) or 0,
            "wall_time_s": _number(values.get("wall_time_s")),
            "startup_s": _number(values.get("startup_s")), "hvps": _number(values.get("hvps_total"), int),
            "error": error, "config": config,
        })
    return rows


def make_table(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> pa.Table:
    """Build the results table from row dicts (keys: the :func:`table_schema` names)."""
    schema = table_schema()
    table = pa.Table.from_pylist([{name: row.get(name) for name in schema.names} for row in rows], schema=schema)
    return table.replace_schema_metadata({"metric": metric, "mode": mode})


def best_row(table: pa.Table) -> dict[str, Any] | None:
    """The row with the best ``best_metric`` among trials that did not fail (``None`` if none).

    Kept in place of Tune's ``ResultGrid.get_best_result`` for correctness: Tune ranks
    failed trials too, so a trial that diverged after a good start (its last result
    holds a good ``best_metric``) would win, and re-running its config diverges again
    (``test_best_skips_a_trial_that_failed_after_a_good_start``).
    """
    mode = (table.schema.metadata or {}).get(b"mode", b"max").decode()
    rows = [row for row in table.to_pylist()
            if row["status"] != RunStatus.FAILED and row["best_metric"] is not None
            and math.isfinite(row["best_metric"])]
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
        if row["status"] == RunStatus.FAILED or value is None or math.isnan(value):
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
    """Write the table as Parquet to ``path`` (parents created, atomically); return the path."""
    return write_atomic(path, lambda file: pq.write_table(table, file))


# ---- build_solver as "module:function" ------------------------------------------------------------

_PROJECT_MARKERS = ("pyproject.toml", "setup.py", "setup.cfg", ".git")


def _project_root(file: Path) -> Path | None:
    for folder in file.parents:
        if any((folder / marker).exists() for marker in _PROJECT_MARKERS):
            return folder
    return None


def solver_reference(build_solver: Callable[..., Any]) -> dict[str, str]:
    """Where ``build_solver`` lives, as ``module:function`` strings (never an absolute path).

    Returns:
        ``{"build_solver": "examples.data_hypercleaning:build_solver", "imported_as":
        "data_hypercleaning:build_solver"}``: the module's path relative to the project
        root (the nearest folder above its file with a ``pyproject.toml``, ``setup.py``
        or ``.git``), and the name it was imported under (the fallback).

    Raises:
        ValueError: ``build_solver`` is defined inside a function (not importable).
    """
    qualname = getattr(build_solver, "__qualname__", type(build_solver).__qualname__)
    if "<locals>" in qualname:
        raise ValueError(f"build_solver {qualname!r} is defined inside a function and cannot be imported to re-run "
                         f"the best trial; define it at module level")
    imported = f"{build_solver.__module__}:{qualname}"
    try:
        file = Path(inspect.getsourcefile(build_solver) or "").resolve()
    except TypeError:
        file = None
    root = _project_root(file) if file else None
    if root is None or file.suffix != ".py":
        return {"build_solver": imported, "imported_as": imported}
    parts = file.relative_to(root).with_suffix("").parts
    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return {"build_solver": f"{module}:{qualname}", "imported_as": imported}


def _attribute(module: Any, qualname: str) -> Callable[..., Any]:
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _load_file(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def resolve_solver(reference: str, *, fallback: str | None = None,
                   search_from: Sequence[str | os.PathLike] = ()) -> Callable[..., Any]:
    """Import ``build_solver`` from ``"module:function"`` or ``"path/to/file.py:function"``.

    Tries, in order: importing ``module``; the file ``module`` names (``a.b`` →
    ``a/b.py``) under the working directory and each folder of ``search_from`` and
    its parents (a checkout's root); then ``fallback`` (the name it was imported under).

    Raises:
        ValueError: ``reference`` is not ``module:function``.
        ImportError: nothing found, naming what was tried and ``--build-solver``.
    """
    tried = []
    for candidate in [reference, fallback] if fallback and fallback != reference else [reference]:
        if not isinstance(candidate, str) or ":" not in candidate:
            raise ValueError(f"build_solver must be given as 'module:function' or 'file.py:function', "
                             f"got {candidate!r}")
        module_name, qualname = candidate.rsplit(":", 1)
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if path.is_file():
                return _attribute(_load_file(path.resolve(), path.stem), qualname)
            tried.append(str(path))
            continue
        try:
            return _attribute(importlib.import_module(module_name), qualname)
        except ImportError:
            tried.append(f"import {module_name}")
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no {qualname!r}; pass --build-solver "
                              f"module:function") from None
        relative = Path(*module_name.split(".")).with_suffix(".py")
        roots = [Path.cwd()]
        for start in search_from:
            roots += [Path(start).resolve(), *Path(start).resolve().parents]
        for root in dict.fromkeys(roots):
            if (root / relative).is_file():
                return _attribute(_load_file(root / relative, module_name), qualname)
        tried.append(f"{relative} under {Path.cwd()} and the folders above the config")
    raise ImportError(f"cannot find build_solver {reference!r} (tried: {'; '.join(tried)}); run from the project's "
                      f"checkout or pass --build-solver module:function (build_solver= in Python)")


def save_best(path: str | Path, config: ExperimentConfig, *, build_solver: Callable[..., Any], metric: str,
              mode: str, value: float, trial: str) -> Path:
    """Save the best trial's :class:`ExperimentConfig` and ``build_solver`` (``module:function``) as JSON."""
    record = {"metric": metric, "mode": mode, "value": value, "trial": trial, **solver_reference(build_solver),
              "config": dataclasses.asdict(config)}
    return write_json(path, record)


def best_record(config: ExperimentConfig, *, build_solver: Callable[..., Any], metric: str, mode: str,
                value: float, trial: str) -> dict[str, Any]:
    """What :func:`save_best` writes, as a dict."""
    return {"metric": metric, "mode": mode, "value": value, "trial": trial, **solver_reference(build_solver),
            "config": dataclasses.asdict(config)}


def load_best(path: str | Path) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Read a file written by :func:`save_best` (a path, its folder, or a URI): ``(config, record)``."""
    text = os.fspath(path)
    if "://" in text:
        from hg_dist.tune.storage import SearchStorage

        storage = SearchStorage.parse(text if text.endswith(".json") else text.rstrip("/") + "/best_config.json")
        folder, name = storage.root.rsplit("/", 1)
        storage = dataclasses.replace(storage, root=folder)
        if not storage.exists(name):
            raise FileNotFoundError(f"no best config at {text!r}; pass the best_config.json a search wrote")
        record = storage.read_json(name)
    else:
        path = Path(path)
        if path.is_dir():
            path = path / "best_config.json"
        if not path.exists():
            raise FileNotFoundError(f"no best config at {str(path)!r}; pass the best_config.json a search wrote "
                                    f"(or its directory)")
        record = json.loads(path.read_text())
    return ExperimentConfig(**record["config"]), record


def _recorded_solver(record: Mapping[str, Any]) -> tuple[str, str | None]:
    """``(reference, fallback)`` of a record; reads the older ``{"module", "qualname", "file"}`` form too."""
    value = record["build_solver"]
    if isinstance(value, Mapping):  # written before build_solver became "module:function"
        reference = f"{value['module']}:{value['qualname']}"
        return reference, (f"{value['file']}:{value['qualname']}" if value.get("file") else None)
    return value, record.get("imported_as")


def prepare_rerun(path: str | Path, *, build_solver: Callable[..., Any] | str | None = None,
                  output: str | Path | None = None, **overrides: Any) -> tuple[Callable[..., Any], ExperimentConfig]:
    """``(build_solver, config)`` of :func:`rerun_best`, loaded and checked without running anything."""
    config, record = load_best(path)
    text = os.fspath(path)
    folder = Path(text) if Path(text).is_dir() else Path(text).parent
    if build_solver is None or isinstance(build_solver, str):
        reference, fallback = _recorded_solver(record) if build_solver is None else (build_solver, None)
        build_solver = resolve_solver(reference, fallback=fallback,
                                      search_from=[folder] if "://" not in text else [])
    if output is None and "://" in text:
        raise ValueError("the best config is on remote storage; pass output= (--output) for the re-run's files")
    config = dataclasses.replace(config, output=str(output if output is not None else folder / "best_rerun"),
                                 **overrides)
    return build_solver, config


def rerun_best(path: str | Path, *, build_solver: Callable[..., Any] | str | None = None,
               output: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Re-run the best trial of a search from its saved config; return the final metrics.

    Args:
        path: the search's ``best_config.json`` (or the search directory, or a URI).
        build_solver: a function, or ``"module:function"`` / ``"file.py:function"``;
            default: the one recorded (see :func:`resolve_solver`).
        output: output directory of the re-run (default: ``best_rerun`` beside ``path``).
        overrides: :class:`ExperimentConfig` fields to change, e.g. ``num_iters=1000``.

    The run goes through :func:`hg_dist.distributed.run_experiment`: in this
    process for one worker, as a Ray Train run for several.
    """
    from hg_dist.distributed import run_experiment

    build_solver, config = prepare_rerun(path, build_solver=build_solver, output=output, **overrides)
    return run_experiment(build_solver, config)
