"""Searchers over a nested space: Tune's random/grid generator, or Optuna, define-by-run.

``random`` is Tune's ``BasicVariantGenerator``: every ``tune.choice`` / range is
sampled, every ``tune.grid_search`` expanded, ``num_samples`` times.

``optuna`` is Ray's ``OptunaSearch`` (TPE) with a define-by-run function generated
from the same nested space (:func:`define_by_run`), so the method's choice comes
first and only the chosen method's settings are suggested::

    approximator = trial.suggest_categorical("approximator", ["nystrom", "cg"])
    rank = trial.suggest_categorical("approximator/nystrom/rank", [5, 10])     # only for nystrom
    rho = trial.suggest_float("approximator/nystrom/rho", 0.01, 1.0, log=True)

Each setting is an Optuna parameter of its own per method (``approximator/cg/num_iters``
and ``approximator/neumann/num_iters`` may have different ranges). The function
returns the whole nested config (constants included). Top-level
``tune.grid_search`` entries (say ``workers``) are not sampled: trial ``n`` takes
grid point ``n mod (number of grid points)``, so with ``num_samples`` samples per grid
point each point gets its share, as with ``random``. Ranges become Optuna
distributions through Ray's own conversion (``OptunaSearch.convert_search_space``).
``tune.sample_from`` (and ``tune.randn``) cannot be expressed this way: such a space is
refused before Ray starts, naming the key.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from ray.tune.search.sample import Categorical, Domain, Function

__all__ = ["DefineByRun", "SEARCHERS", "check_searchable", "define_by_run", "grid_points", "make_searcher"]

SEARCHERS = ("random", "optuna")
"""Names accepted by ``run_search(search=...)`` and ``search.py --search``."""


def _is_grid(value: Any) -> bool:
    return isinstance(value, Mapping) and set(value) == {"grid_search"}


def grid_points(space: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The points of the space's top-level grid (``[{}]`` without one), in Tune's order."""
    keys = [key for key, value in space.items() if _is_grid(value)]
    values = [list(space[key]["grid_search"]) for key in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _labels(categories: list[Any]) -> list[Any]:
    """What Optuna chooses among: the values themselves, or for dicts their ``name`` (an index when repeated)."""
    if all(value is None or isinstance(value, (bool, int, float, str)) for value in categories):
        return list(categories)
    names = [value.get("name") if isinstance(value, Mapping) else None for value in categories]
    if all(isinstance(name, str) for name in names) and len(set(names)) == len(names):
        return names
    return [f"{name or 'choice'}_{index}" for index, name in enumerate(names)]


def _distribution(path: str, domain: Domain) -> Any:
    from ray.tune.search.optuna import OptunaSearch

    try:
        return OptunaSearch.convert_search_space({"x": domain})["x"]
    except (ValueError, AttributeError, KeyError) as error:
        raise ValueError(f"space[{path!r}]: {type(domain).__name__} ({domain}) has no Optuna equivalent ({error}); "
                         f"use tune.choice, tune.uniform, tune.loguniform, tune.randint, or --search random") \
            from None


def _check(path: str, value: Any) -> None:
    """Raise if ``value`` (at ``path``) holds a domain Optuna cannot suggest."""
    if isinstance(value, Function):
        raise ValueError(f"space[{path!r}] is a tune.sample_from function, which Optuna cannot suggest "
                         f"define-by-run; write it as tune.choice / a range, or use search='random'")
    if isinstance(value, Categorical):
        for label, category in zip(_labels(list(value.categories)), value.categories):
            _check(f"{path}/{label}", category)
    elif _is_grid(value):
        for index, point in enumerate(value["grid_search"]):
            _check(f"{path}/{index}", point)
    elif isinstance(value, Domain):
        _distribution(path, value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check(f"{path}/{key}", item)


def check_searchable(space: Mapping[str, Any], search: str) -> None:
    """Raise ``ValueError`` if ``search`` is unknown or cannot search ``space`` (naming the key)."""
    if search not in SEARCHERS:
        raise ValueError(f"search must be one of {list(SEARCHERS)}, got {search!r}")
    if search == "optuna":
        for key, value in space.items():
            _check(key, value)


def _suggest(trial: Any, path: str, value: Any) -> Any:
    """``value`` resolved on the Optuna ``trial``: domains suggested, dicts recursed, constants kept."""
    if isinstance(value, Categorical) or _is_grid(value):
        categories = list(value.categories if isinstance(value, Categorical) else value["grid_search"])
        labels = _labels(categories)
        label = trial.suggest_categorical(path, labels)
        chosen = categories[labels.index(label)]
        return chosen if labels == categories else _suggest(trial, f"{path}/{label}", chosen)
    if isinstance(value, Domain):
        import optuna

        dist = _distribution(path, value)
        if isinstance(dist, optuna.distributions.FloatDistribution):
            return trial.suggest_float(path, dist.low, dist.high, step=dist.step, log=dist.log)
        if isinstance(dist, optuna.distributions.IntDistribution):
            return trial.suggest_int(path, dist.low, dist.high, step=dist.step, log=dist.log)
        return trial.suggest_categorical(path, list(dist.choices))
    if isinstance(value, Mapping):
        return {key: _suggest(trial, f"{path}/{key}", item) for key, item in value.items()}
    return value


class DefineByRun:
    """The Optuna define-by-run function of a nested space (see the module docs); build it with
    :func:`define_by_run`.

    A class, not a closure: ``OptunaSearch`` saves itself (and this) with plain ``pickle``
    for ``Tuner.restore``.
    """

    def __init__(self, space: Mapping[str, Any]) -> None:
        check_searchable(space, "optuna")
        self.space = dict(space)
        self.points = grid_points(space)

    def __call__(self, trial: Any) -> dict[str, Any]:
        real = getattr(trial, "ot_trial", trial)
        point = self.points[real.number % len(self.points)]
        return {key: _suggest(real, key, point[key] if key in point else value)
                for key, value in self.space.items()}


def define_by_run(space: Mapping[str, Any]) -> DefineByRun:
    """The Optuna define-by-run function of a nested space (see the module docs).

    Ray's wrapper around the Optuna trial copies every suggestion into the config
    under its parameter name; the function suggests on the Optuna trial itself
    (``trial.ot_trial``) and returns the nested config, so a config holds exactly the
    space's keys.

    Raises:
        ValueError: the space holds a domain Optuna cannot suggest (naming the key).
    """
    return DefineByRun(space)


def make_searcher(search: str, space: Mapping[str, Any], *, metric: str, mode: str, seed: int | None,
                  num_samples: int) -> tuple[Any, dict[str, Any], int]:
    """``(search_alg, param_space, num_samples)`` for ``tune.TuneConfig`` / ``tune.Tuner``.

    ``random``: ``BasicVariantGenerator`` over ``space`` (Tune expands the grid itself).
    ``optuna``: ``OptunaSearch`` over :func:`define_by_run` (it ranks trials by the
    ``metric`` they report, here their ``best_metric``), an empty ``param_space``, and
    ``num_samples`` times the number of grid points, the same trial count as ``random``.
    No ``max_concurrent``: trials start as Tune's resource queue allows.
    """
    check_searchable(space, search)
    if search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed), dict(space), num_samples
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(space=define_by_run(space), metric=metric, mode=mode, seed=seed)
    return searcher, {}, num_samples * len(grid_points(space))
