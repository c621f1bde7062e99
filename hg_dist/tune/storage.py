"""Where a search keeps its files: a local folder, or any URI pyarrow opens (``s3://``, ``gs://``, ``file://`` ...).

The search folder is Tune's experiment folder (``RunConfig(storage_path=parent, name=folder)``),
so Ray's tools read it as they read any Tune experiment::

    ExperimentAnalysis("/abs/runs/search")          # an absolute path, or a URI
    Tuner.restore("/abs/runs/search", trainable)

Layout under the search folder::

    search.json         what was searched (metric, mode, searcher, samples, build_solver, the
                        command's settings): marks the folder as holding a search, read by --resume
    results.parquet     one row per trial (hg_dist.tune.results)
    results.txt         the same table as printed
    best_config.json    the best trial's config and build_solver as "module:function"
    search.png          best metric against solving time and HVPs per method; each trial's curve
    experiment_state-*.json, tuner.pkl, ...   Ray Tune's experiment state (Tuner.restore reads it)
    <trial>/            Tune's trial folder: its results, checkpoints (checkpoint_*)
    trials/<trial>/     each trial's history.parquet, tb/ and result.json   (local output)
    <trial>/run/        the same files, synced by Tune                      (URI output)

A plain path is used in place: every trial writes its files straight into
``trials/<trial>`` (so they are on disk at every outer step, whatever ends the
trial). A URI becomes Tune's storage; the trials then write into their
Tune working directories, which Tune uploads (``SyncConfig(sync_artifacts=True)``)
with every trial checkpoint and at the end, and the search's own files are
uploaded through the URI's pyarrow filesystem. Rank 0 of a multi-worker trial writes
its files on its own node: they reach the URI when that is the trial's node (Ray
places the Train controller there; the workers may go elsewhere on a multi-node
cluster, where such trials need a shared folder as the storage). Their Train
checkpoints go to ``<folder>/train/<trial>`` on the URI itself.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs

from hg_dist import atomic

__all__ = ["MARKER_FILE", "SearchStorage"]

MARKER_FILE = "search.json"
TRIALS_DIR = "trials"


@dataclass(frozen=True)
class SearchStorage:
    """A search's output location.

    Attributes:
        uri: what Tune gets as ``storage_path``: an absolute local path, or the URI as given.
        filesystem: the pyarrow filesystem of ``uri``.
        root: the search folder inside ``filesystem``.
        local: ``True`` for a plain local path (trials write their files in place).
    """

    uri: str
    filesystem: pyarrow.fs.FileSystem
    root: str
    local: bool

    @classmethod
    def parse(cls, output: str | os.PathLike) -> "SearchStorage":
        """A storage for ``output`` (a path or a URI).

        Raises:
            ValueError: a URI pyarrow cannot open (naming the scheme), or a local path
                that exists and is not a folder.
        """
        text = os.fspath(output)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"output must be a folder or a URI, got {output!r}")
        if "://" in text:
            uri = text.rstrip("/")
            if "/" not in uri.split("://", 1)[1].strip("/"):
                raise ValueError(f"output {text!r}: name a folder inside the bucket (e.g. {uri}/search); the search "
                                 f"folder is Tune's experiment folder, which needs a parent")
            try:
                filesystem, root = pyarrow.fs.FileSystem.from_uri(text)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as error:
                scheme = text.split("://", 1)[0]
                raise ValueError(f"output {text!r}: pyarrow cannot open {scheme}:// URIs here ({error}); use a "
                                 f"local folder or a URI such as s3://bucket/path, gs://bucket/path or "
                                 f"file:///abs/path") from None
            return cls(uri=uri, filesystem=filesystem, root=root.rstrip("/") or "/", local=False)
        path = Path(text).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"output {str(path)!r} is a file; pass a folder for the search")
        return cls(uri=str(path), filesystem=pyarrow.fs.LocalFileSystem(), root=str(path), local=True)

    # ---- paths -----------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        """A path inside the search folder, on :attr:`filesystem`."""
        return posixpath.join(self.root, *parts) if not self.local else str(Path(self.root, *parts))

    def show(self, *parts: str) -> str:
        """A path inside the search folder as the user would type it (a URI stays a URI)."""
        return "/".join([self.uri, *parts]) if not self.local else str(Path(self.root, *parts))

    @property
    def tune_path(self) -> str:
        """Tune's experiment folder (the search folder itself), as a path or URI Tune accepts."""
        return self.show()

    @property
    def tune_parent(self) -> str:
        """``RunConfig.storage_path`` of the search: the folder (or URI) that holds the search folder."""
        return str(Path(self.root).parent) if self.local else self.uri.rsplit("/", 1)[0]

    @property
    def tune_name(self) -> str:
        """``RunConfig.name`` of the search: the search folder's name."""
        return Path(self.root).name if self.local else self.uri.rsplit("/", 1)[1]

    @property
    def trials_dir(self) -> Path | None:
        """Where trials write their files in place (local output only)."""
        return Path(self.root, TRIALS_DIR) if self.local else None

    # ---- files -----------------------------------------------------------------------------

    def exists(self, *parts: str) -> bool:
        info = self.filesystem.get_file_info(self.path(*parts))
        return info.type != pyarrow.fs.FileType.NotFound

    def is_empty(self) -> bool:
        """Whether the folder is missing or holds nothing."""
        if not self.exists():
            return True
        selector = pyarrow.fs.FileSelector(self.path(), recursive=False, allow_not_found=True)
        return not self.filesystem.get_file_info(selector)

    def read_text(self, *parts: str) -> str:
        with self.filesystem.open_input_stream(self.path(*parts)) as stream:
            return stream.read().decode("utf-8")

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write ``data`` to a file of the search folder; a local file is replaced atomically."""
        target = self.path(*parts)
        if self.local:
            atomic.write_bytes(target, data)
        else:  # an object store replaces an object in one put
            self.filesystem.create_dir(posixpath.dirname(target), recursive=True)
            with self.filesystem.open_output_stream(target) as stream:
                stream.write(data)
        return self.show(*parts)

    def write_text(self, text: str, *parts: str) -> str:
        return self.write_bytes(text.encode("utf-8"), *parts)

    def read_json(self, *parts: str) -> dict[str, Any]:
        return json.loads(self.read_text(*parts))

    def write_json(self, record: Any, *parts: str) -> str:
        return self.write_text(json.dumps(record, indent=2, default=str) + "\n", *parts)

    def holds_search(self) -> bool:
        """Whether a search was started here (its marker or Tune's experiment state is present)."""
        return self.exists(MARKER_FILE) or self.can_restore()

    def can_restore(self) -> bool:
        """Whether Tune saved an experiment state here that ``Tuner.restore`` can continue."""
        from ray import tune

        return tune.Tuner.can_restore(self.path(), storage_filesystem=self.filesystem)
