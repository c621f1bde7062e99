"""Experiment plumbing shared by the examples: config, command-line flags, one-process runs.

No Ray here: :func:`run_local` runs a solver in this process; the distributed layer
(``hg_dist.distributed.run_experiment``) runs the same ``build_solver`` on Ray
workers and writes the same outputs.

Outputs of a run in ``config.output``::

    history.parquet   one row per logged step (see hg_dist.logging)
    result.json       {"metrics": final metrics, "config": settings, "wall_time_s": ...}
    tb/               TensorBoard event files
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from hg_dist import approx_hypergrad
from hg_dist._checks import check_float, check_int

__all__ = ["ExperimentConfig", "SolverBuilder", "add_common_args", "config_from_args", "make_approx",
           "make_outer_optimizer", "run_local", "seed_everything", "select_device", "write_result"]

RESULT_FILE = "result.json"

OUTER_OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass
class ExperimentConfig:
    """Settings of one bilevel run (the examples' common flags).

    Attributes:
        approx: IHVP method, a key of ``hg_dist.approx_hypergrad.APPROXIMATORS``.
        rank: Nyström rank ``k`` (``nystrom``, ``nystrom_pcg``).
        rho: Nyström shift ``ρ`` in ``(C W⁺ Cᵀ + ρI)⁻¹`` (``nystrom`` only; > 0).
        ihvp_iters: iterations of ``cg``, ``neumann`` and ``nystrom_pcg``.
        ihvp_lr: Neumann step ``α`` (also passed to CG, which ignores it).
        num_iters: inner steps in all.
        unroll_steps: inner steps between outer steps.
        outer_lr, outer_optimizer, outer_momentum: the outer optimizer
            (``"sgd"`` with momentum, or ``"adam"`` with ``β₁ = outer_momentum``).
        seed: seeds torch, Python and NumPy, and the IHVP column sampler.
        output: output folder.
        workers: data-parallel workers (``> 1`` runs on Ray).
        use_gpu: run on CUDA (one GPU a worker).
        extra: example-specific settings (flags beyond the common ones).
    """

    approx: str = "nystrom"
    rank: int = 5
    rho: float = 0.1
    ihvp_iters: int = 10
    ihvp_lr: float = 0.1
    num_iters: int = 200
    unroll_steps: int = 10
    outer_lr: float = 0.1
    outer_optimizer: str = "sgd"
    outer_momentum: float = 0.9
    seed: int = 0
    output: str = "output"
    workers: int = 1
    use_gpu: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.approx not in approx_hypergrad.APPROXIMATORS:
            raise ValueError(f"approx must be one of {sorted(approx_hypergrad.APPROXIMATORS)}, got {self.approx!r}")
        if self.outer_optimizer not in OUTER_OPTIMIZERS:
            raise ValueError(f"outer_optimizer must be one of {OUTER_OPTIMIZERS}, got {self.outer_optimizer!r}")
        check_int("rank", self.rank, minimum=1)
        check_float("rho", self.rho, nonnegative=True)
        if self.approx == "nystrom" and self.rho <= 0:
            raise ValueError(f"rho must be > 0 for approx='nystrom' (it divides by rho), got {self.rho}; "
                             f"use e.g. --rho 0.1")
        check_int("ihvp_iters", self.ihvp_iters, minimum=1)
        check_float("ihvp_lr", self.ihvp_lr, positive=True)
        check_int("num_iters", self.num_iters, minimum=1)
        check_int("unroll_steps", self.unroll_steps, minimum=1, maximum=self.num_iters,
                  hint="choose it between 1 and num_iters")
        check_float("outer_lr", self.outer_lr, nonnegative=True)
        check_float("outer_momentum", self.outer_momentum, nonnegative=True)
        if self.outer_momentum >= 1:
            raise ValueError(f"outer_momentum must be < 1, got {self.outer_momentum}")
        check_int("seed", self.seed, minimum=0)
        check_int("workers", self.workers, minimum=1)
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly dict of the settings."""
        return dataclasses.asdict(self)


class SolverBuilder(Protocol):
    """``build_solver(config, rank=0, world_size=1) -> solver``: a module-level function of an example."""

    def __call__(self, config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> Any: ...


_COMMON = {field.name for field in dataclasses.fields(ExperimentConfig)} - {"extra"}


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the common flags (``--approx``, ``--rank``, ... ``--use-gpu``); examples may ``set_defaults``."""
    d = ExperimentConfig()
    add = parser.add_argument
    add("--approx", choices=sorted(approx_hypergrad.APPROXIMATORS), default=d.approx, help="IHVP method")
    add("--rank", type=int, default=d.rank, help="Nyström rank (nystrom, nystrom_pcg)")
    add("--rho", type=float, default=d.rho, help="Nyström shift rho > 0 (nystrom)")
    add("--ihvp-iters", type=int, default=d.ihvp_iters, help="iterations of cg / neumann / nystrom_pcg")
    add("--ihvp-lr", type=float, default=d.ihvp_lr, help="Neumann step size")
    add("--num-iters", type=int, default=d.num_iters, help="inner steps in all")
    add("--unroll-steps", type=int, default=d.unroll_steps, help="inner steps between outer steps")
    add("--outer-lr", type=float, default=d.outer_lr, help="outer learning rate")
    add("--outer-optimizer", choices=OUTER_OPTIMIZERS, default=d.outer_optimizer, help="outer optimizer")
    add("--outer-momentum", type=float, default=d.outer_momentum, help="SGD momentum / Adam beta1")
    add("--seed", type=int, default=d.seed, help="random seed")
    add("--output", default=d.output, help="output folder (history.parquet, result.json, tb/)")
    add("--workers", type=int, default=d.workers, help="data-parallel workers; > 1 runs on Ray")
    add("--use-gpu", action="store_true", help="run on CUDA")
    return parser


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Build the config from parsed flags; flags that are not common go to ``config.extra``."""
    values = vars(args)
    common = {name: values[name] for name in _COMMON if name in values}
    extra = {name: value for name, value in values.items() if name not in _COMMON}
    return ExperimentConfig(**common, extra=extra)


def parse_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> ExperimentConfig:
    """Parse ``argv`` into a config; an invalid setting ends in ``parser.error`` (usage + message, exit 2)."""
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except (TypeError, ValueError) as err:
        parser.error(str(err))


def make_approx(config: ExperimentConfig) -> Callable[..., Any]:
    """The chosen ``approx_hypergrad`` function with its settings bound (a ``functools.partial``).

    Nyström methods get a CPU ``torch.Generator`` seeded with ``config.seed``, so
    every worker samples the same columns (solvers checkpoint its state).
    """
    name = config.approx
    if name == "nystrom":
        return functools.partial(approx_hypergrad.nystrom, rank=config.rank, rho=config.rho,
                                 generator=torch.Generator().manual_seed(config.seed))
    if name == "nystrom_pcg":
        return functools.partial(approx_hypergrad.nystrom_pcg, rank=config.rank, num_iters=config.ihvp_iters,
                                 generator=torch.Generator().manual_seed(config.seed))
    if name == "cg":
        return functools.partial(approx_hypergrad.conjugate_gradient, num_iters=config.ihvp_iters,
                                 lr=config.ihvp_lr)
    if name == "neumann":
        return functools.partial(approx_hypergrad.neumann, num_iters=config.ihvp_iters, lr=config.ihvp_lr)
    return functools.partial(approx_hypergrad.exact)


def make_outer_optimizer(config: ExperimentConfig, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """``SGD(lr=outer_lr, momentum=outer_momentum)`` or ``Adam(lr=outer_lr, betas=(outer_momentum, 0.999))``."""
    if config.outer_optimizer == "adam":
        return torch.optim.Adam(params, lr=config.outer_lr, betas=(config.outer_momentum, 0.999))
    return torch.optim.SGD(params, lr=config.outer_lr, momentum=config.outer_momentum)


def select_device(config: ExperimentConfig, rank: int = 0) -> torch.device:
    """``cuda:<rank % n>`` when ``use_gpu`` (raises if CUDA is missing), else CPU."""
    if not config.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu=True but CUDA is not available; drop --use-gpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


def seed_everything(seed: int) -> None:
    """Seed torch, Python's ``random`` and NumPy."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def write_result(output: str | os.PathLike, metrics: Mapping[str, float], config: ExperimentConfig,
                 **info: Any) -> Path:
    """Write ``output/result.json``: ``{"metrics", "config", **info}``; return its path."""
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
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    solver = build_solver(config, rank=0, world_size=1)
    solver.log_dir = str(output)
    tic = time.perf_counter()
    metrics = solver.run()
    wall = time.perf_counter() - tic
    write_result(output, metrics, config, wall_time_s=wall, workers=1,
                 global_step=solver.global_step, outer_steps=solver.outer_step)
    return metrics
