"""The command line every example shares: common flags, the run, the printed metrics.

An example is a ``build_solver(config, rank, world_size)`` plus its own flags; its
``main`` is one call::

    def main(argv=None):
        return cli.main(build_solver, __doc__, DEFAULTS, add_arguments, argv)

Besides the common flags of :func:`hg_dist.experiment.add_common_args`, every
example takes the Ray Train flags of :func:`add_train_args`, which apply when
``--workers > 1``: ``--workers``/``--use-gpu`` make the ``ray.train.ScalingConfig``,
``--max-failures`` the ``ray.train.FailureConfig`` of the ``ray.train.RunConfig``
(storage in ``<output>/ray``), and ``--report-every``, ``--checkpoint-every``,
``--resource-timeout`` the :class:`~hg_dist.distributed.FitOptions`.

This module sits with the entry points (it starts Ray runs through
:func:`hg_dist.distributed.run_experiment`), above the core and the distributed layer.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hg_dist import ray_env
from hg_dist.distributed import RunFailedError, run_experiment
from hg_dist.distributed.resources import DEFAULT_RESOURCE_TIMEOUT_S, ClusterError, parse_duration
from hg_dist.distributed.runner import run_config_for
from hg_dist.distributed.settings import CHECKPOINT_EVERY, REPORT_EVERY, Every, FitOptions
from hg_dist.experiment import ExperimentConfig, SolverBuilder, add_common_args, exit_on_error, parse_config

__all__ = ["TrainArgs", "add_train_args", "main", "make_parser", "parse", "train_args_from_args"]

OPTION_FLAGS = {"report_every": "report_every", "checkpoint_every": "checkpoint_every",
                "resource_timeout": "resource_timeout_s"}
"""Train flag (its ``argparse`` dest) → the :class:`~hg_dist.distributed.FitOptions` field it sets."""


def _every(name: str) -> Callable[[str], Every]:
    def parse(text: str) -> Every:
        try:
            return Every.parse(text, name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    parse.__name__ = name      # argparse names the type in its error message
    return parse


def _max_failures(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be an int >= 0 (or -1 for unlimited restarts), got {text!r}")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "--resource-timeout")
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The Ray Train flags (used with ``--workers > 1``): restarts, reporting, checkpoints, waiting."""
    group = parser.add_argument_group("Ray Train (with --workers > 1)")
    group.add_argument("--max-failures", type=_max_failures, default=None,
                       help="worker-group restarts allowed; each resumes from the latest checkpoint "
                            "(-1: unlimited; default: 3 on a cluster, 0 on one machine)")
    group.add_argument("--report-every", type=_every("--report-every"), default=REPORT_EVERY,
                       help=f"send metrics to Ray Train at most every N outer steps, or every DURATION "
                            f"(e.g. 30s, 5m); rank 0 logs every step to history/TensorBoard regardless "
                            f"(default {REPORT_EVERY})")
    group.add_argument("--checkpoint-every", type=_every("--checkpoint-every"), default=CHECKPOINT_EVERY,
                       help=f"checkpoint at most every N outer steps, or every DURATION (default "
                            f"{CHECKPOINT_EVERY}); the end of the run is always checkpointed")
    group.add_argument("--resource-timeout", type=_duration, default=DEFAULT_RESOURCE_TIMEOUT_S,
                       metavar="SECONDS|DURATION",
                       help="how long to wait for the workers' resources (an autoscaler adding nodes) before "
                            "giving up, e.g. 600, 90s, 20m (default 20m)")
    return parser


def make_parser(description: str | None, defaults: ExperimentConfig,
                add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """The parser of an example: the common flags (with the example's defaults), the Train flags, then its own."""
    first_line = (description or "").strip().splitlines()[0] if description else None
    parser = argparse.ArgumentParser(description=first_line)
    add_common_args(parser, defaults)
    add_train_args(parser)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's internal warnings (hidden by default; see hg_dist.ray_env)")
    if add_arguments is not None:
        add_arguments(parser)
    return parser


@dataclass(frozen=True)
class TrainArgs:
    """What the Train flags chose: ``--max-failures`` (``None``: the cluster's default) and the
    :class:`~hg_dist.distributed.FitOptions`."""

    max_failures: int | None
    options: FitOptions

    def run_config(self, config: ExperimentConfig) -> Any:
        """The ``ray.train.RunConfig`` for ``--max-failures`` (``None`` when it is not given: ``fit`` then
        picks the cluster's default); outputs in ``<output>/ray/hg_dist``."""
        if self.max_failures is None:
            return None
        return run_config_for(config, None, max_failures=self.max_failures,
                              resource_timeout_s=self.options.resource_timeout_s)


def train_args_from_args(args: argparse.Namespace) -> TrainArgs:
    """The :class:`TrainArgs` the Train flags choose; removes them from ``args``."""
    values = {field: vars(args).pop(flag) for flag, field in OPTION_FLAGS.items() if flag in vars(args)}
    return TrainArgs(vars(args).pop("max_failures", None), FitOptions(**values))


def parse(parser: argparse.ArgumentParser,
          argv: Sequence[str] | None = None) -> tuple[ExperimentConfig, TrainArgs]:
    """``argv`` → the config and the Train flags' choices; a bad value is a usage error (exit 2)."""
    args = parser.parse_args(argv)
    # Ray's environment (loopback, no usage stats, quiet), before a run imports Ray.
    ray_env.prepare(verbose=vars(args).pop("verbose", False))
    try:
        train = train_args_from_args(args)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    return parse_config(parser, args=args), train


def main(build_solver: SolverBuilder, description: str | None, defaults: ExperimentConfig,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
         argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run ``build_solver``'s solve (here, or on Ray Train for ``--workers N > 1``), print
    and return the final metrics. A bad flag value is a usage error (exit 2); a run that diverges or goes
    NaN/inf (:func:`hg_dist.experiment.exit_on_error`), or a cluster that cannot run it, ends with one
    line on stderr and exit status 1."""
    parser = make_parser(description, defaults, add_arguments)
    config, train = parse(parser, argv)
    with exit_on_error(parser):
        try:
            run_config = train.run_config(config) if config.workers > 1 else None
            metrics = run_experiment(build_solver, config, run_config=run_config, options=train.options)
        except (ClusterError, RunFailedError) as error:  # the cluster cannot run it, or the workers ended the
            parser.exit(1, f"{parser.prog}: error: {error}\n")   # run on an error: the message says it all
    print(json.dumps(metrics, indent=2))
    return metrics
