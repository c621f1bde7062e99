"""A solver's state as a Ray Train checkpoint, and back.

A checkpoint is a folder with one file, ``solver.pt``: ``torch.save`` of
``solver.state_dict()``, which already holds everything a resumed run needs (loader
positions included; see :mod:`hg_dist.checkpoint`) as plain data, so it loads with
``weights_only=True``.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from hg_dist.checkpoint import read
from hg_dist.solver import BaseSolver

STATE_FILE = "solver.pt"


@contextmanager
def checkpoint_of(solver: BaseSolver) -> Iterator["ray.train.Checkpoint"]:  # noqa: F821
    """A temporary ``ray.train.Checkpoint`` of ``solver``; report it inside the ``with`` block."""
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="hg_dist-ckpt-") as folder:
        torch.save(solver.state_dict(), Path(folder) / STATE_FILE)
        yield Checkpoint.from_directory(folder)


def read_checkpoint(checkpoint: "ray.train.Checkpoint",  # noqa: F821
                    map_location: str | torch.device | None = "cpu") -> dict[str, Any]:
    """The solver state saved by :func:`checkpoint_of` (load it with ``solver.load_state_dict``).

    Args:
        map_location: device for the tensors (a worker passes its own device).
    """
    with checkpoint.as_directory() as folder:
        return read(Path(folder) / STATE_FILE, map_location=map_location)
