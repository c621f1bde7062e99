"""Ray Tune searches whose trials are whole bilevel solves.

* :mod:`hg_dist.tune.space` — nested search spaces (the approximator is a choice,
  each choice carries its own settings; likewise the outer optimizer), checked against
  the registries before Ray starts, and their flattening into an
  :class:`~hg_dist.experiment.ExperimentConfig`.
* :mod:`hg_dist.tune.searchers` — ``random`` (Tune's generator) or ``optuna``
  (define-by-run, generated from the same nested space).
* :mod:`hg_dist.tune.trainable` — the trainable: one solve per trial, a report to
  Tune after every outer step (ASHA stops bad trials early), a history row written at
  every outer step, trial checkpoints; multi-worker trials as Ray Train runs.
* :mod:`hg_dist.tune.search` — :func:`run_search`: the search (resumable), its
  progress, the results table (printed, and written as Parquet), the best config
  (JSON) and a plot.
* :mod:`hg_dist.tune.results` — the table (from Tune's ``ResultGrid.get_dataframe()``),
  and :func:`rerun_best` (also ``python -m hg_dist.tune.rerun <search dir>/best_config.json``).
* :mod:`hg_dist.tune.storage`, :mod:`~hg_dist.tune.progress`, :mod:`~hg_dist.tune.plots` —
  the output folder or URI, the live status, the PNG.

Example::

    from ray import tune
    from hg_dist.tune import SearchOptions, run_search
    from examples.data_hypercleaning import build_solver

    space = {
        "approximator": tune.choice([
            {"name": "nystrom", "rank": tune.choice([5, 10]), "rho": tune.loguniform(1e-2, 1.0)},
            {"name": "cg", "num_iters": tune.choice([5, 10])},
        ]),
        "outer_optimizer": {"name": "adam", "lr": tune.loguniform(1e-3, 1e-1)},
        "workers": tune.grid_search([1, 2]),
    }
    result = run_search(build_solver, space,
                        tune_config=tune.TuneConfig(metric="val_acc", mode="max", num_samples=3),
                        run_config=tune.RunConfig(storage_path="runs", name="search"),
                        options=SearchOptions(cpus_per_worker=0.5))
    # runs/search is Tune's experiment folder too:
    # tune.ExperimentAnalysis(os.path.abspath("runs/search")).get_best_checkpoint(...)
"""

from hg_dist import ray_env as _ray_env

if _ray_env.launched_as("hg_dist.tune.rerun"):
    # `python -m hg_dist.tune.rerun` imports this package (and Ray) before the module runs: Ray's environment first.
    _ray_env.prepare(verbose=_ray_env.verbose_flag())

from hg_dist.tune.results import format_table, load_best, rerun_best, resolve_solver, solver_reference
from hg_dist.tune.search import (SearchExistsError, SearchFolderLostError, SearchInterrupted, SearchOptions,
                                 SearchResult, default_scheduler,
                                 run_search)
from hg_dist.tune.searchers import SEARCHERS, define_by_run
from hg_dist.tune.space import check_space, search_columns, to_experiment_config, trial_settings
from hg_dist.tune.trainable import (SolveReporter, TrialDivergedError, TrialHistory, make_trainable,
                                    trial_resources)

__all__ = ["SEARCHERS", "SearchExistsError", "SearchFolderLostError", "SearchInterrupted", "SearchOptions",
           "SearchResult", "SolveReporter", "TrialDivergedError", "TrialHistory", "check_space", "default_scheduler",
           "define_by_run", "format_table", "load_best",
           "make_trainable", "rerun_best", "resolve_solver", "run_search", "search_columns", "solver_reference",
           "to_experiment_config", "trial_resources", "trial_settings"]
