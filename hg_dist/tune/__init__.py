"""Ray Tune searches whose trials are whole bilevel solves.

* :mod:`hg_dist.tune.space` — nested search spaces (the approximator is a choice,
  each choice carries its own settings; likewise the outer optimizer) and their
  flattening into an :class:`~hg_dist.experiment.ExperimentConfig`.
* :mod:`hg_dist.tune.trainable` — the trainable: one solve per trial, a report to
  Tune after every outer step (so ASHA can stop bad trials early), multi-worker
  trials as Ray Train runs.
* :mod:`hg_dist.tune.search` — :func:`run_search`: the search, the results table
  (printed, and written as Parquet) and the best config (JSON).
* :mod:`hg_dist.tune.results` — the table, and :func:`rerun_best` (also
  ``python -m hg_dist.tune.rerun <search dir>/best_config.json``).

Example::

    from ray import tune
    from hg_dist.tune import run_search
    from examples.data_hypercleaning import build_solver

    space = {
        "approximator": tune.choice([
            {"name": "nystrom", "rank": tune.choice([5, 10]), "rho": tune.loguniform(1e-2, 1.0)},
            {"name": "cg", "num_iters": tune.choice([5, 10])},
        ]),
        "outer_optimizer": {"name": "adam", "lr": tune.loguniform(1e-3, 1e-1)},
        "workers": tune.grid_search([1, 2]),
    }
    result = run_search(build_solver, space, num_samples=3, metric="val_acc", mode="max")
"""

from hg_dist.tune.results import format_table, load_best, rerun_best
from hg_dist.tune.search import SearchResult, run_search
from hg_dist.tune.space import check_space, search_columns, to_experiment_config, trial_settings
from hg_dist.tune.trainable import SolveReporter, TrialDivergedError, make_trainable, trial_resources

__all__ = ["SearchResult", "SolveReporter",
           "TrialDivergedError", "check_space", "format_table", "load_best", "make_trainable", "rerun_best",
           "run_search", "search_columns", "to_experiment_config", "trial_resources", "trial_settings"]
