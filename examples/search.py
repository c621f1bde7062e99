"""A hyperparameter search over hypergradient approximators for data hyper-cleaning on digits.

Each Ray Tune trial runs one whole bilevel solve of ``examples/data_hypercleaning.py``
(reporting the clean-validation accuracy after every outer step, so ASHA stops bad
trials early); half of the trials are 2-worker Ray Train runs. Runs on a local
embedded Ray instance (no cluster, no downloads: digits ship with scikit-learn)::

    python examples/search.py                        # 6 trials, a few minutes on 2 cores
    python examples/search.py --num-samples 4 --num-iters 200 --output runs/search

Outputs in ``--output`` (default ``runs/search``): ``results.parquet`` and
``results.txt`` (one row per trial), ``best_config.json``, and each trial's logs
under ``trials/`` (``tensorboard --logdir runs/search/trials``). Re-run the best
settings with ``python -m hg_dist.tune.rerun runs/search/best_config.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ray
from ray import tune

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data_hypercleaning, also when imported

import data_hypercleaning  # noqa: E402

from hg_dist.experiment import ExperimentConfig  # noqa: E402
from hg_dist.tune import run_search  # noqa: E402


def search_space(workers: list[int]) -> dict:
    """The nested space: each approximator with its own settings, and the outer optimizer's."""
    return {
        "approximator": tune.choice([
            {"name": "nystrom", "rank": tune.choice([5, 10, 20]), "rho": tune.loguniform(0.01, 1.0)},
            {"name": "cg", "num_iters": tune.choice([5, 10]), "lr": 1.0},
            {"name": "neumann", "num_iters": tune.choice([5, 10]), "lr": tune.loguniform(0.01, 0.3)},
            {"name": "nystrom_pcg", "rank": tune.choice([5, 10]), "num_iters": tune.choice([3, 5])},
        ]),
        "outer_optimizer": tune.choice([
            {"name": "adam", "lr": tune.loguniform(0.03, 0.3)},
            {"name": "sgd", "lr": tune.loguniform(1.0, 100.0), "momentum": tune.uniform(0.0, 0.9)},
        ]),
        "workers": tune.grid_search(workers),
    }


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=3, help="samples per worker count (grid over --workers)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to try")
    parser.add_argument("--num-iters", type=int, default=400, help="inner steps of each solve")
    parser.add_argument("--unroll-steps", type=int, default=10, help="inner steps between outer steps")
    parser.add_argument("--n-train", type=int, default=1000, help="noisy training examples")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray instance")
    parser.add_argument("--cpus-per-worker", type=float, default=0.5,
                        help="CPUs per solving process (0.5 lets a 2-worker trial fit on 2 cores)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and the sampling of the space")
    parser.add_argument("--output", default="runs/search", help="search directory")
    args = parser.parse_args(argv)

    # Ship the example's code to the workers by value: they need not find it on their path.
    ray.cloudpickle.register_pickle_by_value(data_hypercleaning)
    if not ray.is_initialized():
        # The dashboard serves the state API that Ray Train uses to release the resources of
        # multi-worker trials stopped early by ASHA; without it, later trials wait forever.
        ray.init(num_cpus=args.num_cpus, log_to_driver=False, configure_logging=False)
    base = ExperimentConfig(num_iters=args.num_iters, unroll_steps=args.unroll_steps, seed=args.seed,
                            extra={"n_train": args.n_train, "n_val": 200, "noise": 0.4, "log_freq": 10})
    tic = time.perf_counter()
    result = run_search(data_hypercleaning.build_solver, search_space(args.workers), base=base,
                        num_samples=args.num_samples, metric="val_acc", mode="max", output=args.output,
                        grace_period=2, reduction_factor=2, cpus_per_worker=args.cpus_per_worker, seed=args.seed)
    print(f"{len(result.table)} trials in {time.perf_counter() - tic:.0f} s; results in {result.output}")
    return result


if __name__ == "__main__":
    main()
