"""Experiment plumbing shared by the examples: the config, its command-line flags, one-process runs.

No Ray here: :func:`run_local` runs a solver in this process; the distributed layer
(``hg_dist.distributed.run_experiment``) runs the same ``build_solver`` on Ray
workers and writes the same outputs.

The approximator and the outer optimizer are each one value, checked against
their registries (:data:`hg_dist.ihvp.METHODS`, :data:`hg_dist.outer_optimizers.OUTER_OPTIMIZERS`)::

    ExperimentConfig(approximator={"name": "nystrom", "rank": 10, "rho": 0.1},
                     outer_optimizer={"name": "adam", "lr": 0.05})

and the command-line flags are generated from the same declarations
(``--approx nystrom --rank 10 --rho 0.1``, ``--outer-optimizer adam --outer-lr 0.05``).

Outputs of a run in ``config.output``::

    history.parquet   one row per logged step (see hg_dist.recording)
    result.json       {"metrics": final metrics, "config": settings, "wall_time_s": ...}
    tb/               TensorBoard event files
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from hg_dist._checks import check_int
from hg_dist.checkpoint import seed_everything
from hg_dist.ihvp import METHODS
from hg_dist.outer_optimizers import OUTER_OPTIMIZERS
from hg_dist.registry import Registry

__all__ = ["ExperimentConfig", "SolverBuilder", "add_common_args", "config_from_args", "parse_config",
           "run_local", "select_device", "write_result"]

RESULT_FILE = "result.json"


def _spec(value: Any, registry: Registry, field: str) -> dict[str, Any]:
    """A spec from a dict (or a bare name), normalized; errors name the config field."""
    if isinstance(value, str):
        value = {"name": value}
    try:
        return registry.normalize(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{field}: {error}") from None


@dataclasses.dataclass
class ExperimentConfig:
    """Settings of one bilevel run (the examples' common flags).

    Attributes:
        approximator: the IHVP method and its settings, e.g. ``{"name": "cg",
            "num_iters": 10}`` (or just the name); normalized on creation, so it
            always holds every setting of its method.
        outer_optimizer: e.g. ``{"name": "sgd", "lr": 0.1, "momentum": 0.9}``.
        num_iters: inner steps in all.
        unroll_steps: inner steps between outer steps.
        seed: seeds torch, Python and NumPy, and the IHVP column sampler.
        output: output folder.
        workers: data-parallel workers (``> 1`` runs on Ray).
        use_gpu: run on CUDA (one GPU a worker).
        extra: example-specific settings (flags beyond the common ones).
    """

    approximator: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "nystrom", "rank": 5,
                                                                               "rho": 0.1})
    outer_optimizer: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "sgd", "lr": 0.1,
                                                                                  "momentum": 0.9})
    num_iters: int = 200
    unroll_steps: int = 10
    seed: int = 0
    output: str = "output"
    workers: int = 1
    use_gpu: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.approximator = _spec(self.approximator, METHODS, "approximator")
        self.outer_optimizer = _spec(self.outer_optimizer, OUTER_OPTIMIZERS, "outer_optimizer")
        check_int("num_iters", self.num_iters, minimum=1)
        check_int("unroll_steps", self.unroll_steps, minimum=1, maximum=self.num_iters,
                  hint="choose it between 1 and num_iters")
        check_int("seed", self.seed, minimum=0)
        check_int("workers", self.workers, minimum=1,
                  hint="use --workers 1 for a single process or --workers N for N data-parallel replicas")
        if not isinstance(self.use_gpu, bool):
            raise TypeError(f"use_gpu must be a bool, got {type(self.use_gpu).__name__}")
        if not isinstance(self.output, (str, os.PathLike)) or not str(self.output):
            raise ValueError(f"output must be a non-empty path, got {self.output!r}")
        self.output = str(self.output)
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly dict of the settings (``ExperimentConfig(**d)`` rebuilds it)."""
        return dataclasses.asdict(self)


class SolverBuilder(Protocol):
    """``build_solver(config, rank=0, world_size=1) -> solver``: a module-level function of an example."""

    def __call__(self, config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> Any: ...


# ---- command-line flags, generated from the registries ------------------------------------

_SPECS = (("approximator", "--approx", METHODS), ("outer_optimizer", "--outer-optimizer", OUTER_OPTIMIZERS))
_DEFAULTS_KEY = "hg_dist_defaults"


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_common_args(parser: argparse.ArgumentParser,
                    defaults: ExperimentConfig | Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """Add the common flags to ``parser``; ``defaults`` (a config or its fields) are the example's own.

    Besides ``--approx NAME`` and ``--outer-optimizer NAME``, every setting declared by
    an IHVP method or an outer optimizer gets its flag (``--rank``, ``--rho``,
    ``--ihvp-iters``, ``--outer-lr`` ...). A setting flag left out takes the chosen
    method's value from ``defaults`` (when it names the same method) or the method's
    declared default; one the chosen method does not take is a usage error.

    Raises:
        ValueError: a registered setting's flag collides with another flag.
    """
    if not isinstance(defaults, ExperimentConfig):
        defaults = ExperimentConfig(**dict(defaults or {}))
    add = parser.add_argument
    add("--approx", choices=METHODS.names(), default=argparse.SUPPRESS,
        help=f"IHVP method (default: {defaults.approximator['name']})")
    add("--outer-optimizer", choices=OUTER_OPTIMIZERS.names(), default=argparse.SUPPRESS,
        help=f"outer optimizer (default: {defaults.outer_optimizer['name']})")
    for field, _, registry in _SPECS:
        group = parser.add_argument_group(f"{registry.kind} settings (each applies to the methods that take it)")
        for setting in registry.settings().values():
            owners = [entry.name for entry in registry if any(s.name == setting.name for s in entry.settings)]
            try:
                group.add_argument(setting.cli_flag, dest=_dest(setting.cli_flag), type=setting.kind,
                                   default=argparse.SUPPRESS, help=f"{setting.help} ({', '.join(owners)})")
            except argparse.ArgumentError as error:
                raise ValueError(f"{registry.kind} setting {setting.name!r} of {owners} has the flag "
                                 f"{setting.cli_flag}, which another flag already uses; declare "
                                 f"Setting(..., flag='...') with a free name") from error
    add("--num-iters", type=int, default=defaults.num_iters, help="inner steps in all")
    add("--unroll-steps", type=int, default=defaults.unroll_steps, help="inner steps between outer steps")
    add("--seed", type=int, default=defaults.seed, help="random seed")
    add("--output", default=defaults.output, help="output folder (history.parquet, result.json, tb/)")
    add("--workers", type=int, default=defaults.workers, help="data-parallel workers; > 1 runs on Ray")
    add("--use-gpu", action="store_true", default=defaults.use_gpu, help="run on CUDA")
    parser.set_defaults(**{_DEFAULTS_KEY: defaults})
    return parser


def _spec_from_flags(values: dict[str, Any], name_flag: str, registry: Registry,
                     default: Mapping[str, Any]) -> dict[str, Any]:
    """The spec the flags choose, consuming the flags of ``registry`` from ``values``."""
    name = values.pop(_dest(name_flag), default["name"])
    given = {setting.name: values.pop(_dest(setting.cli_flag)) for setting in registry.settings().values()
             if _dest(setting.cli_flag) in values}
    entry = registry[name]
    taken = {s.name for s in entry.settings}
    wrong = [registry.settings()[s].cli_flag for s in given if s not in taken]
    if wrong:
        valid = ", ".join(s.cli_flag for s in entry.settings) or "none"
        raise ValueError(f"{', '.join(wrong)}: not a setting of the {registry.kind} {name!r} (chosen with "
                         f"{name_flag}); its settings are {valid}")
    base = dict(default) if name == default["name"] else {"name": name}
    return {**base, **given}


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Build the config from parsed flags; flags that are not common go to ``config.extra``."""
    values = dict(vars(args))
    defaults = values.pop(_DEFAULTS_KEY, None) or ExperimentConfig()
    specs = {field: _spec_from_flags(values, flag, registry, getattr(defaults, field))
             for field, flag, registry in _SPECS}
    common = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"extra", *specs}
    fields = {name: values.pop(name) for name in common if name in values}
    return ExperimentConfig(**specs, **fields, extra={**defaults.extra, **values})


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> ExperimentConfig:
    """Parse ``argv`` into a config; an invalid setting ends in ``parser.error`` (usage + message, exit 2)."""
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except (TypeError, ValueError) as err:
        parser.error(str(err))


# ---- running --------------------------------------------------------------------------------

def select_device(config: ExperimentConfig, rank: int = 0) -> "torch.device":  # noqa: F821
    """``cuda:<rank % n>`` when ``use_gpu`` (raises if CUDA is missing), else CPU."""
    import torch

    if not config.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but CUDA is not available; drop --use-gpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


def write_result(output: str | os.PathLike, metrics: Mapping[str, float], config: ExperimentConfig,
                 **info: Any) -> Path:
    """Write ``output/result.json``: ``{"metrics", "config", **info}`` atomically; return its path."""
    path = Path(output) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"metrics": dict(metrics), "config": config.to_dict(), **info}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    return path


def run_local(build_solver: SolverBuilder, config: ExperimentConfig) -> dict[str, float]:
    """Build the solver (rank 0 of 1), run it here, write the outputs; return the final metrics.

    Writes ``config.output``/``history.parquet``, ``result.json`` and ``tb/``.
    """
    seed_everything(config.seed)
    solver = build_solver(config, rank=0, world_size=1)
    solver.log_dir = str(config.output)
    tic = time.perf_counter()
    metrics = solver.run()
    wall = time.perf_counter() - tic
    write_result(config.output, metrics, config, wall_time_s=wall, workers=1,
                 global_step=solver.global_step, outer_steps=solver.outer_step)
    return metrics
