"""A solver's state as a Ray Train checkpoint, and back.

A checkpoint is a folder with one file, ``solver.pt``: ``torch.save`` of
``{"solver": solver.state_dict(), "loaders": {...}}``. The solver saves the
positions of re-iterable loaders (a ``DataLoader``) itself; a
:class:`~hg_dist.distributed.sharding.ShardedLoader` is an endless iterator the
solver cannot reposition, so its position is saved here, in ``loaders``. Either
way a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from hg_dist.distributed.sharding import ShardedLoader
from hg_dist.solver import BaseSolver, InfiniteLoader

STATE_FILE = "solver.pt"


def _loaders(solver: BaseSolver) -> dict[str, ShardedLoader]:
    """The solver's loaders that are ShardedLoaders (the solver wraps each in an InfiniteLoader)."""
    found = {}
    for name, loader in (("inner_loader", solver.inner_loader), ("outer_loader", solver.outer_loader)):
        source = loader.source if isinstance(loader, InfiniteLoader) else loader
        if isinstance(source, ShardedLoader):
            found[name] = source
    return found


def solver_state(solver: BaseSolver) -> dict[str, Any]:
    """Everything needed to resume: the solver's ``state_dict()`` and the loader positions."""
    state = solver.state_dict()
    return {"solver": state,
            "loaders": {name: loader.state_dict() for name, loader in _loaders(solver).items()}}


def load_solver_state(solver: BaseSolver, state: dict[str, Any]) -> None:
    """Inverse of :func:`solver_state`."""
    with warnings.catch_warnings():
        # the solver warns that it cannot reposition an endless iterator; we do it below
        warnings.filterwarnings("ignore", message=".*one-shot iterator.*")
        solver.load_state_dict(state["solver"])
    for name, loader in _loaders(solver).items():
        if name in state["loaders"]:
            loader.load_state_dict(state["loaders"][name])


@contextmanager
def checkpoint_of(solver: BaseSolver) -> Iterator["ray.train.Checkpoint"]:  # noqa: F821
    """A temporary ``ray.train.Checkpoint`` of ``solver``; report it inside the ``with`` block."""
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="hg_dist-ckpt-") as folder:
        torch.save(solver_state(solver), Path(folder) / STATE_FILE)
        yield Checkpoint.from_directory(folder)


def read_checkpoint(checkpoint: "ray.train.Checkpoint",  # noqa: F821
                    map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The state saved by :func:`checkpoint_of` (load it with :func:`load_solver_state`).

    Args:
        map_location: device for the tensors (a worker passes its own device).
    """
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location=map_location, weights_only=False)
