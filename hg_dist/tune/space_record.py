"""A search space as plain JSON, recorded with a search so that ``resume`` can tell whether it changed.

``Tuner.restore`` continues a search with the space it was started with, whatever
the code now says; a space edited between the start and ``--resume`` would be
ignored without a word. :func:`describe_space` turns a space (nested dicts and
lists, ``tune.choice`` / ``uniform`` / ``loguniform`` / ``randint`` / ``q*`` /
``randn`` domains, ``grid_search``, ``sample_from``) into JSON — each domain as its
kind, bounds or categories and sampler — and :func:`space_changes` lists where two
such records differ, as ``path: was …, now …``. A ``sample_from`` is recorded by
its function's qualified name only (its code is not compared).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ray.tune.search.sample import Categorical, Float, Function, Integer

__all__ = ["describe_space", "space_changes"]


def describe_space(space: Any) -> Any:
    """``space`` as JSON-compatible values (normalized through ``json``, as a record read back is)."""
    return json.loads(json.dumps(_describe(space)))


def _describe(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, Categorical):
        return {"tune.choice": _describe(value.categories), "sampler": _sampler(value.sampler)}
    if isinstance(value, (Float, Integer)):
        return {f"tune.{type(value).__name__.lower()}": [value.lower, value.upper], "sampler": _sampler(value.sampler)}
    if isinstance(value, Function):
        return {"tune.sample_from": f"{value.func.__module__}.{value.func.__qualname__}"}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _sampler(sampler: Any) -> Any:
    """A Tune sampler as its name and settings (``Quantized``: ``q`` and the inner sampler)."""
    if sampler is None:
        return None
    settings = {k: _sampler(v) if hasattr(v, "sample") else _describe(v)
                for k, v in sorted(getattr(sampler, "__dict__", {}).items())}
    return {type(sampler).__name__.lstrip("_"): settings} if settings else type(sampler).__name__.lstrip("_")


def space_changes(recorded: Any, now: Any, path: str = "space", limit: int = 5) -> list[str]:
    """Where ``recorded`` and ``now`` (two :func:`describe_space` records) differ, at most ``limit`` entries."""
    changes: list[str] = []
    _diff(recorded, now, path, changes, limit)
    return changes


def _diff(old: Any, new: Any, path: str, changes: list[str], limit: int) -> None:
    if len(changes) >= limit or old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict) and _domain_kind(old) == _domain_kind(new):
        for key in [*old, *(k for k in new if k not in old)]:
            where = f"{path}[{key!r}]"
            if key not in new:
                changes.append(f"{where} was {_show(old[key])}, now absent")
            elif key not in old:
                changes.append(f"{where} is new: {_show(new[key])}")
            else:
                _diff(old[key], new[key], where, changes, limit)
            if len(changes) >= limit:
                return
        return
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for k, (a, b) in enumerate(zip(old, new)):
            _diff(a, b, f"{path}[{k}]", changes, limit)
        return
    changes.append(f"{path} was {_show(old)}, now {_show(new)}")


def _domain_kind(record: Mapping[str, Any]) -> str | None:
    """``"tune.choice"`` etc. for a recorded domain, ``None`` for a plain mapping."""
    return next((key for key in record if key.startswith("tune.")), None)


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=False)
    return text if len(text) <= 120 else text[:117] + "..."
