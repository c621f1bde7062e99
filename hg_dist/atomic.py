"""The one way hg_dist replaces a file: readers see the old file or the whole new one, never a part.

Every file a run or a search writes (``result.json``, ``history.parquet``, checkpoints,
results tables, a search's JSON files) goes through :func:`write_atomic`::

    write(temporary file in the same folder)  →  flush + fsync  →  os.replace(temporary, path)

The temporary file lives next to ``path`` (``os.replace`` is atomic only within one
file system) under a name no other process uses (``.<name>.<pid>.<random>.tmp``).
Whatever stops the write — a full disk, an error in ``write``, Ctrl-C — the
temporary file is removed and an existing file at ``path`` is left as it was. A
full disk raises :class:`NoSpaceError`, whose message names the file.

A file that two processes update (a Tune trial and its search both write the trial's
``result.json``) is changed with :func:`merge_json`: read, change and replace under an
exclusive lock, so that neither process writes over what the other wrote in between.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["NoSpaceError", "write_atomic", "write_bytes", "write_json", "write_text"]


class NoSpaceError(OSError):
    """The disk (or quota) filled up while writing ``filename``; nothing partial was left there."""

    def __str__(self) -> str:
        return self.strerror


def _is_no_space(error: BaseException) -> bool:
    # pyarrow rethrows a Python file's OSError as its own error type with the text kept.
    return getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Replace ``path`` by what ``write(file)`` writes to a binary file object; return ``path``.

    Parent folders are created. The new content is on disk (``fsync``) before it
    takes the name ``path``.

    Raises:
        NoSpaceError: the disk is full, naming ``path``; no temporary file is left and
            ``path`` is unchanged.
        Exception: whatever ``write`` or the file system raised, with the same clean-up.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, Exception) and _is_no_space(error):
            raise NoSpaceError(errno.ENOSPC, f"no space left on device while writing {str(path)!r}; the "
                                             f"previous file (if any) is unchanged and nothing partial was left; "
                                             f"free space there or write to another folder", str(path)) from error
        raise
    _sync_folder(path.parent)
    return path


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every file system lets a folder be fsync'ed)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace ``path`` by ``data`` atomically (see :func:`write_atomic`)."""
    return write_atomic(path, lambda file: file.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, record: Any) -> Path:
    """Replace ``path`` by ``record`` as indented JSON atomically (values JSON cannot hold become ``str``)."""
    return write_text(path, json.dumps(record, indent=2, default=str) + "\n")


def merge_json(path: str | os.PathLike, merge: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
    """Read, change and replace the JSON object at ``path`` as one step among processes.

    ``merge(current)`` gets the object now in the file (``{}`` when it is missing or
    unreadable) and returns the object to write, or ``None`` to leave the file as it is.
    Every caller holds an exclusive ``flock`` on ``.<name>.lock`` beside ``path`` from
    the read to the replace (``path`` itself cannot carry the lock: each write replaces
    it by another file). Returns what ``path`` holds afterwards.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # released when the file is closed, or the process dies
        try:
            current = json.loads(path.read_text())
        except (OSError, ValueError):
            current = {}
        if not isinstance(current, dict):
            current = {}
        merged = merge(dict(current))
        if merged is None:
            return current
        write_json(path, merged)
        return merged
