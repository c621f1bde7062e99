"""Settings of a Ray Train run and the checks made before any worker starts."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from hg_dist.data import check_workers
from hg_dist.distributed.resources import DEFAULT_RESOURCE_TIMEOUT_S, check_timeout

_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Every:
    """How often something happens during a run: every ``steps`` outer steps, or every ``seconds``.

    Exactly one of the two is set. ``Every(steps=n)`` fires at outer steps ``n, 2n, …``
    (fixed step numbers, the same after a restart); ``Every(seconds=t)`` fires at the
    first outer step at least ``t`` seconds after the previous time it fired (or after
    the worker started). Written on the command line as ``10`` (outer steps) or
    ``30s`` / ``5m`` / ``1h`` (:meth:`parse`).
    """

    steps: int | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.seconds is None):
            raise ValueError(f"Every needs exactly one of steps= or seconds=, got steps={self.steps!r}, "
                             f"seconds={self.seconds!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"Every(steps=...) must be an int >= 1 (outer steps), got {self.steps!r}")
        if self.seconds is not None and (isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float))
                                         or not math.isfinite(self.seconds) or self.seconds < 0):
            raise ValueError(f"Every(seconds=...) must be a finite number >= 0, got {self.seconds!r}")

    @classmethod
    def parse(cls, text: str | int | "Every", name: str = "value") -> "Every":
        """``10`` → every 10 outer steps; ``30s``, ``2.5m``, ``1h`` → every so many seconds.

        Raises:
            ValueError: naming ``name`` and the accepted forms.
        """
        if isinstance(text, Every):
            return text
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(steps=text)
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|min|h)?\s*", str(text))
        if match is None:
            raise ValueError(f"{name} must be a number of outer steps (e.g. 10) or a duration (e.g. 30s, 5m, 1h), "
                             f"got {text!r}")
        number, unit = match.groups()
        if unit is None:
            if "." in number or int(number) < 1:
                raise ValueError(f"{name}={text!r}: a number of outer steps must be an int >= 1; add a unit "
                                 f"(s, m, h) for a duration")
            return cls(steps=int(number))
        return cls(seconds=float(number) * _UNITS[unit])

    def __str__(self) -> str:
        return str(self.steps) if self.steps is not None else f"{self.seconds:g}s"


@dataclass(frozen=True)
class FailAt:
    """Test hook: make ``rank`` fail once, after outer step ``outer_step``.

    ``mode="raise"`` raises an exception; ``mode="kill"`` kills the worker process
    itself (``SIGKILL``: no exception, no clean-up, as when a machine is lost).
    ``marker`` is a file path on storage every worker sees; it is written (with the
    process id) just before the failure, so the restarted worker group does not fail
    again.
    """

    rank: int
    outer_step: int
    marker: str
    mode: str = "raise"

    def __post_init__(self) -> None:
        if self.mode not in ("raise", "kill"):
            raise ValueError(f"FailAt.mode must be 'raise' or 'kill', got {self.mode!r}")


REPORT_EVERY = Every(seconds=60.0)
"""Default of :attr:`TrainSettings.report_every`: one ``ray.train.report`` (≈2 s with 2 CPU
workers) a minute keeps reporting under 4% of a run."""

CHECKPOINT_EVERY = Every(seconds=300.0)
"""Default of :attr:`TrainSettings.checkpoint_every`: a checkpoint every 5 minutes (at most
5 minutes of work lost to a failure, about 1% of the run spent saving)."""


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`hg_dist.distributed.fit` runs the workers (the solver settings live in the config).

    Rank 0 records every outer step locally (history, TensorBoard) whatever these
    say; ``report_every`` and ``checkpoint_every`` only bound how often the workers
    stop together to talk to Ray Train (each ``ray.train.report`` synchronises all
    workers with the Train controller, ≈2 s here). Both are decided on rank 0 and
    shared with the other ranks inside the outer step's own allreduce, so all ranks
    always report together. The end of a run is always reported, with a checkpoint.

    Attributes:
        report_every: metrics go to Ray Train (and through it to Tune) at most this
            often (:class:`Every`, or ``int`` outer steps, or a string such as ``"30s"``).
        checkpoint_every: a checkpoint (with a report) at most this often.
        max_failures: worker-group restarts allowed (``FailureConfig(max_failures=...)``);
            each restart resumes from the latest checkpoint; ``-1``: unlimited. ``None``
            (default): 3 on a cluster (more than one node, or an autoscaler), 0 on one fixed
            node (:func:`hg_dist.distributed.resources.default_max_failures`).
        resource_timeout_s: how long to wait for the workers' resources (an autoscaler
            adding nodes, other jobs finishing) before giving up with
            ``ResourceTimeoutError``; also bounds Ray Train's retries of a worker group
            that cannot start after a lost node.
        storage_path: where Ray Train keeps checkpoints and results; default
            ``<config.output>/ray`` (must be shared storage on a multi-node cluster).
        name: the run's folder under ``storage_path``.
        resources_per_worker: e.g. ``{"CPU": 1}``; default ``{"CPU": 1}``, plus
            ``{"GPU": 1}`` with ``use_gpu``.
        num_to_keep: checkpoints kept (older ones are deleted); ``None`` keeps all.
        precheck: build rank 0's solver once on the driver (CPU) before starting
            workers, so data/shard errors surface as a plain ``ValueError``.
        callbacks: Ray Train run callbacks, passed to ``RunConfig(callbacks=...)``
            (the Tune layer forwards reports to its trial with one).
        fail_at: test-only failure injection, see :class:`FailAt`.
    """

    report_every: Every | int | str = REPORT_EVERY
    checkpoint_every: Every | int | str = CHECKPOINT_EVERY
    max_failures: int | None = None
    resource_timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S
    storage_path: str | None = None
    name: str = "hg_dist"
    resources_per_worker: dict[str, float] | None = None
    num_to_keep: int | None = 2
    precheck: bool = True
    callbacks: tuple = ()
    fail_at: FailAt | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("report_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, (Every, int, str)) or isinstance(value, bool):
                raise TypeError(f"{name} must be an hg_dist.distributed.Every, an int (outer steps) or a string "
                                f"such as '30s', got {type(value).__name__}")
            object.__setattr__(self, name, Every.parse(value, name))
        if self.max_failures is not None and (isinstance(self.max_failures, bool)
                                              or not isinstance(self.max_failures, int) or self.max_failures < -1):
            raise ValueError(f"max_failures must be None (the cluster's default), an int >= 0 or -1 for "
                             f"unlimited restarts, got {self.max_failures!r}")
        object.__setattr__(self, "resource_timeout_s", check_timeout(self.resource_timeout_s, "resource_timeout_s"))
        if self.num_to_keep is not None and (not isinstance(self.num_to_keep, int) or self.num_to_keep < 1):
            raise ValueError(f"num_to_keep must be None or an int >= 1, got {self.num_to_keep!r}")

    def storage(self, output: str | Path) -> str:
        """Absolute storage path (Ray Train requires one); URIs such as ``s3://...`` pass unchanged."""
        if self.storage_path is not None and "://" in self.storage_path:
            return self.storage_path
        return str(Path(self.storage_path if self.storage_path is not None else Path(output) / "ray").resolve())

    def worker_resources(self, use_gpu: bool) -> dict[str, float]:
        if self.resources_per_worker is not None:
            return dict(self.resources_per_worker)
        return {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}


def check_scaling(workers: object, use_gpu: object) -> int:
    """Check the types and range of the scaling settings; return ``workers`` as an int.

    Whether the cluster can hold them is decided with the cluster itself, before
    the run starts (:mod:`hg_dist.distributed.resources`): an autoscaling cluster with
    no GPU node yet is not a reason to refuse ``use_gpu``.

    Raises:
        ValueError: ``workers < 1`` (naming the fix).
        TypeError: ``workers`` not an int, ``use_gpu`` not a bool.
    """
    workers = check_workers(workers)
    if not isinstance(use_gpu, bool):
        raise TypeError(f"use_gpu must be a bool, got {type(use_gpu).__name__}")
    return workers
