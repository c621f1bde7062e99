"""A run's output folder belongs to one run: its fingerprint, and a lock held while it runs.

A run claims its folder (:func:`claim`) before it writes anything there:

* **one run per folder**: ``run.json`` records the :func:`fingerprint` of the run
  that owns the folder (``build_solver``'s name and every setting but the folder
  itself). A run with another fingerprint is refused, so that it never overwrites
  (or resumes from) another run's history, checkpoint and ``result.json``. The
  same run claims it again: that is how the same command resumes.
* **one process at a time**: the folder itself is locked with ``fcntl.flock`` for as
  long as the run goes. The kernel releases the lock when the process ends in any
  way (``kill -9`` included), so there is no lock file to go stale and a resume is
  never blocked by a run that no longer exists. (``flock`` is advisory and local to
  one machine, or to file systems that forward it, such as recent NFS.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hg_dist.atomic import write_json

__all__ = ["OutputClaimError", "OutputInUseError", "OutputOwnedError", "RUN_FILE", "claim", "fingerprint",
           "run_identity"]

RUN_FILE = "run.json"
"""The owner of an output folder: ``{"fingerprint", "build_solver", "config", "pid", "host"}``."""

RESULT_FILE = "result.json"


class OutputClaimError(ValueError):
    """The output folder cannot be used by this run; nothing was written there."""


class OutputInUseError(OutputClaimError):
    """Another process is running in the output folder now."""


class OutputOwnedError(OutputClaimError):
    """The output folder holds a run with other settings."""


def run_identity(build_solver: Any, config: Any) -> dict[str, Any]:
    """What makes two runs the same run: ``build_solver``'s ``module.qualname`` and ``config``
    (a dataclass as a dict, without ``output``; anything else as its ``repr``)."""
    settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
    if isinstance(settings, dict):
        settings.pop("output", None)
    name = f"{getattr(build_solver, '__module__', '')}.{getattr(build_solver, '__qualname__', '')}"
    return {"build_solver": name, "config": settings}


def fingerprint(build_solver: Any, config: Any) -> str:
    """A short hash (16 hex digits) of :func:`run_identity`."""
    identity = run_identity(build_solver, config)
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _differences(ours: Mapping[str, Any], theirs: Mapping[str, Any], most: int = 4) -> str:
    """``"config.seed: 0 there, 1 here; ..."`` for the settings that differ (JSON-normalized)."""
    ours, theirs = _flat(json.loads(json.dumps(ours, default=str))), _flat(json.loads(json.dumps(theirs, default=str)))
    keys = [k for k in dict.fromkeys([*theirs, *ours]) if k != "config.output" and ours.get(k) != theirs.get(k)]
    shown = [f"{k}: {theirs.get(k, '(unset)')!r} there, {ours.get(k, '(unset)')!r} here" for k in keys[:most]]
    more = f"; and {len(keys) - most} more" if len(keys) > most else ""
    return "; ".join(shown) + more if shown else "another build_solver or format"


def _owner_of(folder: Path, identity: Mapping[str, Any], run_id: str) -> str | None:
    """How the folder's recorded run differs from this one, or ``None`` if it is this run (or none)."""
    recorded = _read(folder / RUN_FILE)
    if recorded:
        if recorded.get("fingerprint") == run_id:
            return None
        return _differences(identity, {"build_solver": recorded.get("build_solver"),
                                       "config": recorded.get("config")})
    # A folder written before run.json existed: its result.json holds the config it ran with.
    config = _read(folder / RESULT_FILE).get("config")
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k != "output"}
        if isinstance(identity.get("config"), dict) and json.loads(json.dumps(config, default=str)) != \
                json.loads(json.dumps(identity["config"], default=str)):
            return _differences(identity, {"build_solver": identity.get("build_solver"), "config": config})
    return None


@contextlib.contextmanager
def claim(folder: str | os.PathLike, build_solver: Any, config: Any) -> Iterator[Path]:
    """Hold ``folder`` for the run of ``build_solver`` with ``config`` while the block runs.

    Creates the folder, takes its lock, checks that it holds no other run and
    records this one in ``run.json``. The lock is released when the block ends (or
    the process does, however it ends).

    Raises:
        OutputInUseError: another process holds the folder (a run going on now).
        OutputOwnedError: the folder holds a run with other settings (naming them).
        hg_dist.atomic.NoSpaceError: ``run.json`` cannot be written (full disk).
        In all three cases nothing is left behind: a folder this call created is removed,
        as it is when the block raises before anything but ``run.json`` was written there.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            _take(fd, folder)
            identity = run_identity(build_solver, config)
            run_id = fingerprint(build_solver, config)
            differs = _owner_of(folder, identity, run_id)
            if differs is not None:
                raise OutputOwnedError(
                    f"output folder {str(folder)!r} (--output) holds another run ({differs}); rerun with that run's "
                    f"settings to resume it, choose another --output, or delete {str(folder)!r} to start over there")
            write_json(folder / RUN_FILE, {"fingerprint": run_id, **identity, "pid": os.getpid(),
                                           "host": socket.gethostname()})
        except BaseException:
            if created:
                _remove_unused(folder)
            raise
        try:
            yield folder
        except BaseException:
            if created:  # say a check made before the run started (the run itself wrote nothing yet)
                _remove_unused(folder)
            raise
    finally:
        os.close(fd)  # releases the lock


def _take(fd: int, folder: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _read(folder / RUN_FILE)
        who = f"process {owner.get('pid')} on {owner.get('host')}" if owner.get("pid") else "another process"
        raise OutputInUseError(f"output folder {str(folder)!r} (--output) is in use by a run going on now ({who}); "
                               f"wait for it to end, or choose another --output") from None


def _remove_unused(folder: Path) -> None:
    """Remove ``folder`` if it holds nothing but ``run.json``."""
    if {p.name for p in folder.iterdir()} <= {RUN_FILE}:
        (folder / RUN_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()
