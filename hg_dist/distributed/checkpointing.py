"""A solver's state as a Ray Train checkpoint, and back.

A checkpoint is one folder that every rank contributes to (Ray Train merges the
files the ranks report into one directory in storage):

* ``solver.pt`` (rank 0): ``torch.save`` of ``solver.state_dict()`` — parameters,
  optimizers, counters, recorder, as plain data (it loads with ``weights_only=True``);
* ``rank<r>.pt`` (every rank ``r``): what may differ between ranks — the loader
  positions, the global RNG states and the IHVP generators (see :func:`rank_state`).
  With :class:`~hg_dist.data.ShardedLoader` and the library's seeding these are the
  same on every rank, but a user's loader (say a ``DataLoader`` over a per-rank
  shard) or a rank that draws random numbers of its own need not be;
* ``run.json`` (rank 0): the :func:`fingerprint` of the run that wrote it, so a
  worker never resumes from a checkpoint of a run with other settings (Ray Train
  restores the latest checkpoint of any earlier run with the same storage path and
  name).

:func:`read_checkpoint` gives a rank ``solver.pt`` with its own ``rank<r>.pt``
entries in place of rank 0's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from hg_dist.checkpoint import read, rng_state
from hg_dist.run_folder import fingerprint  # noqa: F401  (a run's identity, shared with one-process runs)
from hg_dist.solver import BaseSolver

STATE_FILE = "solver.pt"
RUN_FILE = "run.json"
RANK_KEYS = ("loaders", "rng", "generators")
"""Entries of a solver state that each rank saves for itself."""


def rank_file(rank: int) -> str:
    return f"rank{rank}.pt"


def rank_state(solver: BaseSolver) -> dict[str, Any]:
    """This rank's own part of the state: loader positions, global RNG states, IHVP generators."""
    return {"loaders": {"inner": solver.inner_loader.state_dict(), "outer": solver.outer_loader.state_dict()},
            "rng": rng_state(), "generators": [g.get_state() for g in solver.generators()]}


@contextmanager
def checkpoint_of(solver: BaseSolver, rank: int = 0,
                  run_id: str | None = None) -> Iterator["ray.train.Checkpoint"]:  # noqa: F821
    """This rank's part of a checkpoint of ``solver``; report it inside the ``with`` block.

    Args:
        rank: rank 0 writes the whole state (and ``run.json``), every rank its ``rank<r>.pt``.
        run_id: the run's :func:`fingerprint`, written to ``run.json``.
    """
    from ray.train import Checkpoint

    remove_orphaned_folders()
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as folder:
        if rank == 0:
            torch.save(solver.state_dict(), Path(folder) / STATE_FILE)
            (Path(folder) / RUN_FILE).write_text(json.dumps({"run_id": run_id}))
        torch.save(rank_state(solver), Path(folder) / rank_file(rank))
        yield Checkpoint.from_directory(folder)


TEMP_PREFIX = "hg_dist-ckpt-"
"""Temporary folders of :func:`checkpoint_of` are ``<tmp>/hg_dist-ckpt-<pid>-<random>``."""


def remove_orphaned_folders(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the checkpoint folders in ``root`` (default: the temporary folder) whose process is gone.

    A worker killed while it reports (Ctrl-C aborts the worker group, a lost node)
    never leaves its ``with checkpoint_of(...)`` block, so its folder stays behind;
    the next checkpoint on that machine, and the driver after a run, remove them.
    Folders of live processes are left alone. Returns the removed folders.
    """
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{TEMP_PREFIX}*-*"):
        pid = folder.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's process
        return True
    return True


def checkpoint_run_id(checkpoint: "ray.train.Checkpoint") -> str | None:  # noqa: F821
    """The fingerprint in the checkpoint's ``run.json`` (``None`` if it has none)."""
    with checkpoint.as_directory() as folder:
        path = Path(folder) / RUN_FILE
        return json.loads(path.read_text()).get("run_id") if path.is_file() else None


def read_checkpoint(checkpoint: "ray.train.Checkpoint",  # noqa: F821
                    map_location: str | torch.device | None = "cpu", rank: int = 0) -> dict[str, Any]:
    """The solver state saved by :func:`checkpoint_of`, as rank ``rank`` left it.

    Rank 0's ``solver.pt`` with the loader positions, RNG states and generators of
    ``rank<rank>.pt`` when the checkpoint has that file (load it with
    ``solver.load_state_dict``).

    Args:
        map_location: device for the tensors (a worker passes its own device).
        rank: whose loaders and RNG states to take.
    """
    with checkpoint.as_directory() as folder:
        state = read(Path(folder) / STATE_FILE, map_location=map_location)
        own = Path(folder) / rank_file(rank)
        if own.is_file():
            state.update({key: value for key, value in read(own, map_location=map_location).items()
                          if key in RANK_KEYS})
    return state
