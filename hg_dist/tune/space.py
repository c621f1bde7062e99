"""Nested search spaces over approximators and outer optimizers, and their flattening.

Users write one nested dict. The approximator is a choice over dicts, and each
dict carries only its own settings, named as in :mod:`hg_dist.approx_hypergrad`;
the outer optimizer is a choice over dicts in the same way::

    from ray import tune
    space = {
        "approximator": tune.choice([
            {"name": "nystrom", "rank": tune.choice([5, 10, 20]), "rho": tune.loguniform(1e-2, 1.0)},
            {"name": "cg", "num_iters": tune.choice([5, 10]), "lr": 1.0},
            {"name": "neumann", "num_iters": 10, "lr": tune.loguniform(1e-3, 1e-1)},
            {"name": "nystrom_pcg", "rank": 5, "num_iters": tune.choice([3, 5])},
        ]),
        "outer_optimizer": tune.choice([
            {"name": "sgd", "lr": tune.loguniform(1e-2, 1.0), "momentum": tune.uniform(0.0, 0.9)},
            {"name": "adam", "lr": tune.loguniform(1e-3, 1e-1), "beta1": 0.9},
        ]),
        "workers": tune.grid_search([1, 2]),     # any other ExperimentConfig field
        "num_iters": 300,
        "extra": {"corruption": 0.5},            # example-specific settings
    }

Design choice: we use Ray Tune's own nesting (``tune.choice`` / ``tune.grid_search``
over dicts whose values are themselves domains). Tune's default
``BasicVariantGenerator`` samples the choice first and then the domains inside the
chosen dict, so a Nyström trial never samples (or carries) CG settings, grid
search, ``num_samples`` and seeding work unchanged, and no custom sampler needs to
be kept in step with Tune. The price: searchers that need a flat space (Optuna,
HyperOpt, ...) cannot take these spaces as they are; use the default searcher.

:func:`check_space` validates a space before any trial starts (an unknown
approximator or a setting that belongs to another one fails at once, naming the
key and the allowed ones); :func:`to_experiment_config` flattens one sampled config
into an :class:`~hg_dist.experiment.ExperimentConfig`; :func:`trial_settings` gives
the settings a trial actually uses, for the results table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ray.tune.search.sample import Categorical, Domain

from hg_dist.approx_hypergrad import APPROXIMATORS
from hg_dist.experiment import ExperimentConfig

__all__ = ["APPROXIMATOR_SETTINGS", "OUTER_OPTIMIZER_SETTINGS", "SEARCH_COLUMNS", "check_space",
           "to_experiment_config", "trial_settings"]

APPROXIMATOR_SETTINGS: dict[str, dict[str, str]] = {
    "nystrom": {"rank": "rank", "rho": "rho"},
    "cg": {"num_iters": "ihvp_iters", "lr": "ihvp_lr"},
    "neumann": {"num_iters": "ihvp_iters", "lr": "ihvp_lr"},
    "nystrom_pcg": {"rank": "rank", "num_iters": "ihvp_iters"},
    "exact": {},
}
"""For each approximator, its settings in a search space → the ExperimentConfig field each sets.

The setting names are those of the :mod:`hg_dist.approx_hypergrad` functions."""

OUTER_OPTIMIZER_SETTINGS: dict[str, dict[str, str]] = {
    "sgd": {"lr": "outer_lr", "momentum": "outer_momentum"},
    "adam": {"lr": "outer_lr", "beta1": "outer_momentum"},
}
"""For each outer optimizer, its settings in a search space → the ExperimentConfig field each sets.

Adam's ``beta1`` is stored in ``outer_momentum`` (``make_outer_optimizer`` uses it as β₁)."""

_NESTED_FIELDS = {"approx", "rank", "rho", "ihvp_iters", "ihvp_lr", "outer_optimizer", "outer_lr",
                  "outer_momentum"}
_SET_BY_SEARCH = {"output"}

SEARCH_COLUMNS: tuple[str, ...] = ("approx", "rank", "rho", "ihvp_iters", "ihvp_lr", "outer_optimizer",
                                   "outer_lr", "outer_momentum", "workers")
"""The settings columns of the results table, in order (``None`` where a trial does not use one)."""

assert set(APPROXIMATOR_SETTINGS) == set(APPROXIMATORS), "keep APPROXIMATOR_SETTINGS in step with APPROXIMATORS"


def _config_fields() -> set[str]:
    return {field.name for field in dataclasses.fields(ExperimentConfig)}


def _candidates(value: Any) -> list[Any] | None:
    """The dicts a nested entry can take: one dict, a ``tune.choice`` or a ``tune.grid_search``.

    Returns ``None`` for a domain we cannot enumerate (e.g. ``tune.sample_from``); such
    entries are checked when each trial flattens its config.
    """
    if isinstance(value, Categorical):
        return list(value.categories)
    if isinstance(value, Mapping) and set(value) == {"grid_search"}:
        return list(value["grid_search"])
    if isinstance(value, Domain):
        return None
    return [value]


def _check_entry(key: str, entry: Any, table: dict[str, dict[str, str]]) -> None:
    """Check one candidate of the ``approximator`` / ``outer_optimizer`` entry."""
    if not isinstance(entry, Mapping):
        raise TypeError(f"space[{key!r}] must be a dict like {{'name': ..., <settings>}} or a tune.choice / "
                        f"tune.grid_search over such dicts, got {type(entry).__name__} ({entry!r})")
    name = entry.get("name")
    if isinstance(name, Domain) or (isinstance(name, Mapping) and "grid_search" in name):
        raise ValueError(f"space[{key!r}]['name'] must be a fixed string; make the choice over whole dicts "
                         f"instead, e.g. tune.choice([{{'name': 'cg', ...}}, {{'name': 'nystrom', ...}}]), so "
                         f"each choice carries its own settings")
    if name not in table:
        raise ValueError(f"space[{key!r}] has name={name!r}; use one of {sorted(table)}")
    unknown = set(entry) - {"name"} - set(table[name])
    if unknown:
        raise ValueError(f"space[{key!r}] with name={name!r} has settings {sorted(unknown)} that it does not "
                         f"take; its settings are {sorted(table[name])}")


def check_space(space: Mapping[str, Any]) -> None:
    """Raise if ``space`` is not a valid nested search space (see the module docs).

    Checks: ``approximator`` and ``outer_optimizer`` are present and every dict they
    can take names a known method and only its own settings; every other top-level
    key is an :class:`ExperimentConfig` field other than those set through the nested
    dicts and ``output`` (the search sets each trial's output directory).

    Raises:
        ValueError / TypeError: naming the offending key and what to write instead.
    """
    if not isinstance(space, Mapping):
        raise TypeError(f"space must be a dict, got {type(space).__name__}")
    for key, table in (("approximator", APPROXIMATOR_SETTINGS), ("outer_optimizer", OUTER_OPTIMIZER_SETTINGS)):
        if key not in space:
            raise ValueError(f"space needs an {key!r} entry, e.g. "
                             + ("tune.choice([{'name': 'nystrom', 'rank': 10, 'rho': 0.1}, "
                                "{'name': 'cg', 'num_iters': 10, 'lr': 1.0}])" if key == "approximator" else
                                "{'name': 'adam', 'lr': 0.01}"))
        for entry in _candidates(space[key]) or ():
            _check_entry(key, entry, table)
    fields = _config_fields()
    for key in space:
        if key in ("approximator", "outer_optimizer"):
            continue
        if key in _NESTED_FIELDS:
            where = "approximator" if key in ("approx", "rank", "rho", "ihvp_iters", "ihvp_lr") else "outer_optimizer"
            raise ValueError(f"space[{key!r}] is set through space[{where!r}]; move it into the {where} dict(s) "
                             f"(see hg_dist.tune.space for the setting names)")
        if key in _SET_BY_SEARCH:
            raise ValueError("space['output'] is set by the search (one directory per trial); "
                             "pass output= to run_search instead")
        if key not in fields:
            raise ValueError(f"space has key {key!r}, which is not an ExperimentConfig field; "
                             f"use one of {sorted(fields - _NESTED_FIELDS - _SET_BY_SEARCH)} or put "
                             f"example-specific settings under 'extra'")


def to_experiment_config(sampled: Mapping[str, Any], base: ExperimentConfig | None = None,
                         **overrides: Any) -> ExperimentConfig:
    """Flatten one sampled nested config into an :class:`ExperimentConfig`.

    Fields not in ``sampled`` keep their values from ``base`` (default
    ``ExperimentConfig()``); ``overrides`` (e.g. ``output=...``) are applied last.
    ``extra`` is merged: ``{**base.extra, **sampled['extra']}``.

    Raises:
        ValueError / TypeError: if ``sampled`` is not a valid sample of a nested space.
    """
    check_space(sampled)
    for key in ("approximator", "outer_optimizer"):
        if isinstance(sampled[key], Domain) or (isinstance(sampled[key], Mapping) and "grid_search" in sampled[key]):
            raise ValueError(f"sampled[{key!r}] is still a search domain; pass a config sampled by Tune "
                             f"(the dict a trainable receives), not the search space")
    base = ExperimentConfig() if base is None else base
    fields: dict[str, Any] = {}
    approx = dict(sampled["approximator"])
    fields["approx"] = approx.pop("name")
    for setting, value in approx.items():
        fields[APPROXIMATOR_SETTINGS[fields["approx"]][setting]] = value
    outer = dict(sampled["outer_optimizer"])
    fields["outer_optimizer"] = outer.pop("name")
    for setting, value in outer.items():
        fields[OUTER_OPTIMIZER_SETTINGS[fields["outer_optimizer"]][setting]] = value
    for key, value in sampled.items():
        if key in ("approximator", "outer_optimizer"):
            continue
        if key == "extra":
            if not isinstance(value, Mapping):
                raise TypeError(f"sampled['extra'] must be a dict, got {type(value).__name__}")
            value = {**base.extra, **value}
        fields[key] = value
    fields.update(overrides)
    return dataclasses.replace(base, **fields)


def trial_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The :data:`SEARCH_COLUMNS` of ``config``, with ``None`` for settings its methods do not use.

    A Nyström trial's row thus has ``ihvp_iters = ihvp_lr = None``, a CG trial's
    ``rank = rho = None``. (Adam's ``outer_momentum`` is its β₁, so it is kept.)
    """
    used = set(APPROXIMATOR_SETTINGS[config.approx].values()) | {"approx", "outer_optimizer", "outer_lr",
                                                                  "outer_momentum", "workers"}
    values = dataclasses.asdict(config)
    row = {}
    for column in SEARCH_COLUMNS:
        value = values[column] if column in used else None
        if isinstance(value, float) and math.isnan(value):
            value = None
        row[column] = value
    return row
