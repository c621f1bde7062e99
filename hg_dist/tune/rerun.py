"""Re-run the best trial of a search: ``python -m hg_dist.tune.rerun runs/search/best_config.json``.

The search recorded ``build_solver`` as ``module:function`` relative to the project
(e.g. ``examples.data_hypercleaning:build_solver``), so this works from a checkout of
the project on any machine (run it from the checkout's root, or keep the config file
inside the checkout). Options: ``--build-solver module:function`` (or
``path/to/file.py:function``) to use another one, ``--output DIR`` (default:
``best_rerun`` beside the JSON file), ``--num-iters N`` to run longer than the
search did, ``--workers N``. Prints the final metrics.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from hg_dist import ray_env
from hg_dist.tune.results import prepare_rerun


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point; returns the final metrics."""
    parser = argparse.ArgumentParser(prog="python -m hg_dist.tune.rerun", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="best_config.json written by a search (or the search directory, or a URI)")
    parser.add_argument("--build-solver", default=None, metavar="MODULE:FUNCTION",
                        help="build_solver to use instead of the recorded one (module:function or file.py:function)")
    parser.add_argument("--output", default=None, help="output directory of the re-run")
    parser.add_argument("--num-iters", type=int, default=None, help="override num_iters")
    parser.add_argument("--workers", type=int, default=None, help="override workers")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's internal warnings")
    args = parser.parse_args(argv)
    ray_env.prepare(verbose=args.verbose)  # before a run imports Ray (with `-m`, hg_dist.tune did it already)
    overrides = {key: value for key, value in (("num_iters", args.num_iters), ("workers", args.workers))
                 if value is not None}
    try:
        build_solver, config = prepare_rerun(args.path, build_solver=args.build_solver, output=args.output,
                                             **overrides)
    except (FileNotFoundError, ImportError, TypeError, ValueError) as error:
        parser.error(str(error))
    from hg_dist.distributed import run_experiment

    metrics = run_experiment(build_solver, config)
    print(json.dumps(metrics, indent=2, default=str))
    return metrics


if __name__ == "__main__":
    main()
