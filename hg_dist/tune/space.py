"""Nested search spaces over approximators and outer optimizers, checked against their registries.

Users write one nested dict. The approximator is a choice over dicts, and each dict
carries only its own method's settings, named as the method declares them
(:data:`hg_dist.ihvp.METHODS`); the outer optimizer likewise
(:data:`hg_dist.outer_optimizers.OUTER_OPTIMIZERS`)::

    from ray import tune
    space = {
        "approximator": tune.choice([
            {"name": "nystrom", "rank": tune.choice([5, 10, 20]), "rho": tune.loguniform(1e-2, 1.0)},
            {"name": "cg", "num_iters": tune.choice([5, 10])},
            {"name": "neumann", "num_iters": 10, "lr": tune.loguniform(1e-3, 1e-1)},
            {"name": "nystrom_pcg", "rank": 5, "num_iters": tune.choice([3, 5])},
        ]),
        "outer_optimizer": tune.choice([
            {"name": "sgd", "lr": tune.loguniform(1e-2, 1.0), "momentum": tune.uniform(0.0, 0.9)},
            {"name": "adam", "lr": tune.loguniform(1e-3, 1e-1), "beta1": 0.9},
        ]),
        "workers": tune.grid_search([1, 2]),     # any other ExperimentConfig field
        "num_iters": 300,
        "extra": {"noise": 0.5},                  # example-specific settings
    }

A sampled trial config maps one to one onto :class:`~hg_dist.experiment.ExperimentConfig`
(whose ``approximator`` and ``outer_optimizer`` are these dicts).

:func:`check_space` validates a space before any trial starts: an unknown method, a
setting of another method, or a *value* outside a setting's declared range —
constants, every ``tune.choice`` / ``tune.grid_search`` value, and the bounds of
``tune.uniform`` / ``loguniform`` / ``randint`` — fails at once, naming the key, the
setting and its valid range. Only ``tune.sample_from`` functions are left to the
trial itself (which then fails alone, recorded with its error).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ray.tune.search.sample import Categorical, Domain, Float, Integer

from hg_dist.experiment import ExperimentConfig
from hg_dist.ihvp import METHODS
from hg_dist.outer_optimizers import OUTER_OPTIMIZERS
from hg_dist.registry import Registry, Setting

__all__ = ["NESTED", "check_space", "search_columns", "setting_column", "to_experiment_config", "trial_settings"]

NESTED: dict[str, tuple[str, Registry]] = {"approximator": ("approx", METHODS),
                                           "outer_optimizer": ("outer_optimizer", OUTER_OPTIMIZERS)}
"""Nested entry → (results-table column of its name, its registry)."""

_SET_BY_SEARCH = {"output"}


def search_columns() -> list[str]:
    """The settings columns of a results table, from the registries (a setting's column is its flag's name).

    ``approx``, one column per IHVP setting (``rank``, ``rho``, ``ihvp_iters``, ``ihvp_lr`` ...),
    ``outer_optimizer``, one per outer-optimizer setting (``outer_lr`` ...), then ``workers``.
    """
    columns = []
    for name_column, registry in NESTED.values():
        columns.append(name_column)
        columns += [setting_column(s) for s in registry.settings().values()]
    return columns + ["workers"]


def setting_column(setting: Setting) -> str:
    """A setting's column in results tables: its command-line flag's name (``ihvp_iters``, ``outer_lr``)."""
    return setting.cli_flag.lstrip("-").replace("-", "_")


def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def _candidates(value: Any) -> list[Any] | None:
    """The values an entry can take: itself, a ``tune.choice``'s or a ``tune.grid_search``'s.

    ``None`` for a domain that cannot be enumerated (a range or ``tune.sample_from``).
    """
    if isinstance(value, Categorical):
        return list(value.categories)
    if _is_grid(value):
        return list(value["grid_search"])
    if isinstance(value, Domain):
        return None
    return [value]


def _check_value(where: str, setting: Setting, owner: str, value: Any) -> None:
    """Check one setting's value in a space: a constant, a choice/grid of values, or a numeric range."""
    values = _candidates(value)
    if values is not None:
        for candidate in values:
            if isinstance(candidate, Domain) or _is_grid(candidate):
                _check_value(where, setting, owner, candidate)
            else:
                try:
                    setting.check(candidate, owner)
                except (TypeError, ValueError) as error:
                    raise type(error)(f"{where}: {error}") from None
        return
    if isinstance(value, (Float, Integer)):
        if isinstance(value, Float) and setting.kind is int:
            raise TypeError(f"{where}: {setting.name} of {owner} is an int; use tune.randint / tune.choice, "
                            f"not a float range")
        low, high = value.lower, value.upper
        high_included = high if isinstance(value, Float) else high - 1  # randint's upper bound is exclusive
        for bound in (low, high_included):
            if not setting.admits(bound):
                raise ValueError(f"{where}: the range [{low}, {high}) of {setting.name} ({owner}) reaches {bound}, "
                                 f"outside its valid range {setting.bounds()}")


def _check_entry(key: str, entry: Any, registry: Registry) -> None:
    """Check one candidate dict of the ``approximator`` / ``outer_optimizer`` entry, values included."""
    if not isinstance(entry, Mapping):
        raise TypeError(f"space[{key!r}] must be a dict like {{'name': ..., <settings>}} or a tune.choice / "
                        f"tune.grid_search over such dicts, got {type(entry).__name__} ({entry!r})")
    name = entry.get("name")
    if isinstance(name, Domain) or _is_grid(name):
        raise ValueError(f"space[{key!r}]['name'] must be a fixed string; make the choice over whole dicts "
                         f"instead, e.g. tune.choice([{{'name': 'cg', ...}}, {{'name': 'nystrom', ...}}]), so "
                         f"each choice carries its own settings")
    try:
        method = registry.check_setting_names(name, entry)
    except ValueError as error:
        raise ValueError(f"space[{key!r}]: {error}") from None
    for setting in method.settings:
        if setting.name in entry:
            _check_value(f"space[{key!r}] ({name})", setting, name, entry[setting.name])


def check_space(space: Mapping[str, Any]) -> None:
    """Raise if ``space`` is not a valid nested search space (see the module docs).

    Raises:
        ValueError / TypeError: naming the offending key, setting or value, and what to write instead.
    """
    if not isinstance(space, Mapping):
        raise TypeError(f"space must be a dict, got {type(space).__name__}")
    for key, (_, registry) in NESTED.items():
        if key not in space:
            raise ValueError(f"space needs an {key!r} entry, e.g. "
                             + ("tune.choice([{'name': 'nystrom', 'rank': 10, 'rho': 0.1}, "
                                "{'name': 'cg', 'num_iters': 10}])" if key == "approximator" else
                                "{'name': 'adam', 'lr': 0.01}"))
        for entry in _candidates(space[key]) or ():
            _check_entry(key, entry, registry)
    fields = {field.name for field in dataclasses.fields(ExperimentConfig)}
    flat = {"approx": "approximator"}
    for key, (_, registry) in NESTED.items():
        flat.update({setting_column(s): key for s in registry.settings().values()})
        flat.update({s.name: key for s in registry.settings().values()})
    for key in space:
        if key in NESTED:
            continue
        if key in flat and key not in fields:
            raise ValueError(f"space[{key!r}] is set through space[{flat[key]!r}]; move it into the {flat[key]} "
                             f"dict(s), under the name its method declares")
        if key in _SET_BY_SEARCH:
            raise ValueError("space['output'] is set by the search (one directory per trial); "
                             "pass output= to run_search instead")
        if key not in fields:
            raise ValueError(f"space has key {key!r}, which is not an ExperimentConfig field; "
                             f"use one of {sorted(fields - set(NESTED) - _SET_BY_SEARCH)} or put "
                             f"example-specific settings under 'extra'")
    if "workers" in space:
        for workers in _candidates(space["workers"]) or ():
            if not isinstance(workers, Domain):
                ExperimentConfig(workers=workers)  # raises naming the fix


def to_experiment_config(sampled: Mapping[str, Any], base: ExperimentConfig | None = None,
                         **overrides: Any) -> ExperimentConfig:
    """One sampled trial config as an :class:`ExperimentConfig`.

    Fields not in ``sampled`` keep their values from ``base`` (default
    ``ExperimentConfig()``); ``overrides`` (e.g. ``output=...``) are applied last.
    ``extra`` is merged: ``{**base.extra, **sampled['extra']}``.

    Raises:
        ValueError / TypeError: if ``sampled`` is not a valid sample of a nested space.
    """
    check_space(sampled)
    for key in NESTED:
        if isinstance(sampled[key], Domain) or _is_grid(sampled[key]):
            raise ValueError(f"sampled[{key!r}] is still a search domain; pass a config sampled by Tune "
                             f"(the dict a trainable receives), not the search space")
    base = ExperimentConfig() if base is None else base
    fields = dict(sampled)
    if "extra" in fields:
        if not isinstance(fields["extra"], Mapping):
            raise TypeError(f"sampled['extra'] must be a dict, got {type(fields['extra']).__name__}")
        fields["extra"] = {**base.extra, **fields["extra"]}
    fields.update(overrides)
    return dataclasses.replace(base, **fields)


def trial_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The :func:`search_columns` of ``config``, with ``None`` for settings its methods do not take.

    A Nyström trial's row thus has ``ihvp_iters = ihvp_lr = None``, a CG trial's
    ``rank = None``.
    """
    row: dict[str, Any] = {}
    for key, (name_column, registry) in NESTED.items():
        spec = getattr(config, key)
        row[name_column] = spec["name"]
        taken = {s.name for s in registry[spec["name"]].settings}
        for setting in registry.settings().values():
            value = spec[setting.name] if setting.name in taken else None
            row[setting_column(setting)] = None if isinstance(value, float) and math.isnan(value) else value
    row["workers"] = config.workers
    return row
