"""A hyperparameter search over hypergradient approximators for data hyper-cleaning on digits.

Each Ray Tune trial runs one whole bilevel solve of ``examples/data_hypercleaning.py``
(reporting the clean-validation accuracy after every outer step, so ASHA stops bad
trials early); half of the trials are 2-worker Ray Train runs. Runs on a local Ray
instance bound to 127.0.0.1 (no cluster, no downloads: digits ship with
scikit-learn), or on the cluster ``RAY_ADDRESS`` names::

    python examples/search.py                        # 6 trials, 3 of them 2-worker; prints progress
    python examples/search.py --search optuna --num-samples 4 --output runs/optuna
    python examples/search.py --output runs/search --resume    # continue an interrupted search

Outputs in ``--output`` (default ``runs/search``; a URI such as ``s3://bucket/search``
works too): ``results.parquet`` and ``results.txt`` (one row per trial),
``best_config.json``, ``search.png``, each trial's logs under ``trials/``
(``tensorboard --logdir runs/search/trials``), and Ray Tune's experiment state and trial
checkpoints (the folder is Tune's experiment folder: ``ray.tune.ExperimentAnalysis`` and
``Tuner.restore`` read it, given its absolute path). Ctrl-C stops the search (exit 130) and
prints the command that continues it. Re-run the best settings with
``python -m hg_dist.tune.rerun runs/search/best_config.json``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from hg_dist import ray_env  # noqa: E402

# Ray reads its environment when it is first imported (the next line): a local instance on 127.0.0.1, no usage
# stats, Ray's internal warnings hidden unless -v (looked for here, since the flags are parsed after the import).
ray_env.prepare(verbose=ray_env.verbose_flag())

from ray import tune  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # data_hypercleaning, also when imported

import data_hypercleaning  # noqa: E402

from hg_dist.experiment import ExperimentConfig  # noqa: E402
from hg_dist.tune import (SearchExistsError, SearchFolderLostError, SearchInterrupted, SearchOptions,  # noqa: E402
                          check_space, default_scheduler, run_search)
from hg_dist.tune.launch import ClusterUnreachableError, start_ray  # noqa: E402
from hg_dist.tune.searchers import SEARCHERS, check_searchable  # noqa: E402
from hg_dist.tune.search import read_marker  # noqa: E402
from hg_dist.tune.storage import SearchStorage  # noqa: E402

RUNTIME_FLAGS = {"output", "resume", "num_cpus", "progress_interval", "verbose"}
"""Flags that may change when a search is resumed; the others define the search."""


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


def make_parser(explicit_only: bool = False) -> argparse.ArgumentParser:
    """The flags; ``explicit_only`` leaves out every default (to see which flags were typed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     argument_default=argparse.SUPPRESS if explicit_only else None)

    def add(*names: str, default=None, **kwargs) -> None:
        if not explicit_only and default is not None:
            kwargs["default"] = default
        parser.add_argument(*names, **kwargs)

    add("--num-samples", type=int, default=3, help="samples per worker count (grid over --workers)")
    add("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to try")
    add("--num-iters", type=int, default=400, help="inner steps of each solve")
    add("--unroll-steps", type=int, default=10, help="inner steps between outer steps")
    add("--n-train", type=int, default=1000, help="noisy training examples")
    add("--search", choices=SEARCHERS, default="random", help="searcher: random (and grid) or optuna (TPE)")
    add("--cpus-per-worker", type=float, default=0.45,
        help="CPUs per solving process (0.45: two 2-worker trials, 2 x 0.91 CPUs, run side by side on 2 cores)")
    add("--use-gpu", action="store_true", default=False, help="one GPU per solving process")
    add("--max-failures", type=int, default=0,
        help="retries of a failed trial from its last checkpoint (and worker-group restarts of a 2-worker trial)")
    add("--checkpoint-every", type=int, default=5, help="outer steps between trial checkpoints")
    add("--seed", type=int, default=0, help="seeds the data and the sampling of the space")
    add("--output", default="runs/search", help="search folder, or a URI (s3://, gs://, file://)")
    add("--resume", action="store_true", default=False,
        help="continue the search in --output (finished trials are kept, unfinished ones continue)")
    add("--num-cpus", type=int, help="logical CPUs of the local Ray instance (default: the machine's)")
    add("--progress-interval", type=float, default=20.0, help="seconds between status lines")
    add("-v", "--verbose", action="store_true", default=False, help="show Ray's internal warnings (hidden by default)")
    return parser


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2, before anything is written or started) for flag values out of range."""
    for flag, value, minimum in (("--num-samples", args.num_samples, 1), ("--max-failures", args.max_failures, 0),
                                 ("--checkpoint-every", args.checkpoint_every, 1), ("--n-train", args.n_train, 1)):
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}")
    if any(w < 1 for w in args.workers):
        parser.error(f"--workers must be >= 1 each, got {args.workers}; 1 is one process, N > 1 a Ray Train run")
    if not args.cpus_per_worker > 0:
        parser.error(f"--cpus-per-worker must be > 0, got {args.cpus_per_worker}")
    if args.num_cpus is not None and args.num_cpus < 1:
        parser.error(f"--num-cpus must be >= 1, got {args.num_cpus}")
    if not args.progress_interval >= 0:
        parser.error(f"--progress-interval must be >= 0, got {args.progress_interval}")


def resumed_args(parser: argparse.ArgumentParser, args: argparse.Namespace, explicit: dict,
                 storage: SearchStorage) -> argparse.Namespace:
    """The settings of the search being resumed: the recorded ones, checked against the flags typed now."""
    try:
        recorded = read_marker(storage).get("settings", {})
    except SearchExistsError as error:
        parser.error(str(error))
    for name, value in explicit.items():
        if name in RUNTIME_FLAGS or name not in recorded:
            continue
        if recorded[name] != value:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} {value} differs from the search in {storage.show()} (started with {flag} "
                         f"{recorded[name]}); resume with the same flags (or leave them out), or start a new "
                         f"search with another --output")
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in recorded.items() if k not in RUNTIME_FLAGS}})


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    explicit = vars(make_parser(explicit_only=True).parse_args(argv))
    check_flags(parser, args)
    try:
        storage = SearchStorage.parse(args.output)
        holds = storage.holds_search()
    except ValueError as error:
        parser.error(f"--output: {error}")
    if holds and not args.resume:
        parser.error(f"{storage.show()} already holds a search; continue it with --resume, or start a new one "
                     f"with another --output")
    if args.resume and not holds:
        parser.error(f"there is no search to resume in {storage.show()}; start one there without --resume")
    if args.resume:
        args = resumed_args(parser, args, explicit, storage)
    try:
        base = ExperimentConfig(num_iters=args.num_iters, unroll_steps=args.unroll_steps, seed=args.seed,
                                use_gpu=args.use_gpu,
                                extra={"n_train": args.n_train, "n_val": 200, "noise": 0.4, "log_freq": 10})
        space = search_space(args.workers)
        check_space(space)
        check_searchable(space, args.search)
    except (TypeError, ValueError) as error:
        parser.error(str(error))

    try:
        started_here = start_ray(num_cpus=args.num_cpus)
    except (ClusterUnreachableError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    import ray

    # Ship the example's code to the workers by value: they need not find it on their path.
    ray.cloudpickle.register_pickle_by_value(data_hypercleaning)
    settings = {k: v for k, v in vars(args).items() if k not in RUNTIME_FLAGS}
    tic = time.perf_counter()
    try:
        result = run_search(
            data_hypercleaning.build_solver, space, base=base,
            tune_config=tune.TuneConfig(metric="val_acc", mode="max", num_samples=args.num_samples,
                                        scheduler=default_scheduler(grace_period=2, reduction_factor=2)),
            run_config=tune.RunConfig(storage_path=storage.tune_parent, name=storage.tune_name,
                                      failure_config=tune.FailureConfig(max_failures=args.max_failures)),
            options=SearchOptions(search=args.search, seed=args.seed, cpus_per_worker=args.cpus_per_worker,
                                  checkpoint_every=args.checkpoint_every, fixed_cluster=started_here,
                                  progress_interval=args.progress_interval),
            resume=args.resume, settings=settings)
    except (SearchExistsError, TypeError, ValueError) as error:  # refused before any trial started
        ray.shutdown()
        parser.error(str(error))
    except SearchFolderLostError as error:
        ray.shutdown()
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    except KeyboardInterrupt as interrupt:  # SearchInterrupted, or a second Ctrl-C
        command = shlex.join(["python", "examples/search.py", *[a for a in argv if a != "--resume"], "--resume"])
        if "--output" not in argv and not any(a.startswith("--output=") for a in argv):
            command += f" --output {shlex.quote(args.output)}"
        message = str(interrupt) if isinstance(interrupt, SearchInterrupted) else "search interrupted"
        print(f"\n{message}\ncontinue it with:\n  {command}", file=sys.stderr, flush=True)
        finish(130)
    print(f"{len(result.table)} trials in {time.perf_counter() - tic:.0f} s; results in {result.output}")
    return result


def finish(code: int) -> None:
    """Shut Ray down and end the process now, with exit status ``code``.

    Everything is written by then. The interpreter's own shutdown is skipped: its final
    garbage collection of this process's heap (torch, Ray, pandas, matplotlib) took
    8-12 s on a loaded 2-core machine, and Ctrl-C should end a search within seconds.
    """
    import ray

    ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
    finish(0)
