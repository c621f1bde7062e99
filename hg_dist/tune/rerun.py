"""Re-run the best trial of a search: ``python -m hg_dist.tune.rerun runs/search/best_config.json``.

Options: ``--output DIR`` (default: ``best_rerun`` beside the JSON file),
``--num-iters N`` to run longer than the search did. Prints the final metrics.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from hg_dist.tune.results import rerun_best


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point; returns the final metrics."""
    parser = argparse.ArgumentParser(prog="python -m hg_dist.tune.rerun", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="best_config.json written by a search (or the search directory)")
    parser.add_argument("--output", default=None, help="output directory of the re-run")
    parser.add_argument("--num-iters", type=int, default=None, help="override num_iters")
    args = parser.parse_args(argv)
    overrides = {} if args.num_iters is None else {"num_iters": args.num_iters}
    metrics = rerun_best(args.path, output=args.output, **overrides)
    print(json.dumps(metrics, indent=2, default=str))
    return metrics


if __name__ == "__main__":
    main()
