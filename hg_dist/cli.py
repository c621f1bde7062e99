"""The command line every example shares: common flags, the run, the printed metrics.

An example is a ``build_solver(config, rank, world_size)`` plus its own flags; its
``main`` is one call::

    def main(argv=None):
        return cli.main(build_solver, __doc__, DEFAULTS, add_arguments, argv)

This module sits with the entry points (it starts Ray runs through
:func:`hg_dist.distributed.run_experiment`), above the core and the distributed layer.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

from hg_dist.distributed import TrainSettings, run_experiment
from hg_dist.distributed.resources import DEFAULT_RESOURCE_TIMEOUT_S, ClusterError, parse_duration
from hg_dist.experiment import ExperimentConfig, SolverBuilder, add_common_args, exit_on_error, parse_config

__all__ = ["main", "make_parser"]


def make_parser(description: str | None, defaults: ExperimentConfig,
                add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    """The parser of an example: the common flags (with the example's defaults), then its own."""
    first_line = (description or "").strip().splitlines()[0] if description else None
    parser = argparse.ArgumentParser(description=first_line)
    add_common_args(parser, defaults)
    parser.add_argument("--resource-timeout", type=_duration, default=DEFAULT_RESOURCE_TIMEOUT_S,
                        metavar="SECONDS|DURATION",
                        help="with --workers > 1: how long to wait for the workers' resources (an autoscaler "
                             "adding nodes) before giving up, e.g. 600, 90s, 20m (default 20m)")
    if add_arguments is not None:
        add_arguments(parser)
    return parser


def _duration(text: str) -> float:
    try:
        return parse_duration(text, "--resource-timeout")
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(build_solver: SolverBuilder, description: str | None, defaults: ExperimentConfig,
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
         argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run ``build_solver``'s solve (here, or on Ray Train for ``--workers N > 1``), print
    and return the final metrics. A bad flag value is a usage error (exit 2); a run that diverges or goes
    NaN/inf (:func:`hg_dist.experiment.exit_on_error`), or a cluster that cannot run it, ends with one
    line on stderr and exit status 1."""
    parser = make_parser(description, defaults, add_arguments)
    config = parse_config(parser, argv)
    settings = TrainSettings(resource_timeout_s=config.extra.pop("resource_timeout"))
    with exit_on_error(parser):
        try:
            metrics = run_experiment(build_solver, config, settings)
        except ClusterError as error:  # the cluster cannot run it: the message is the whole story
            parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(json.dumps(metrics, indent=2))
    return metrics
