"""Settings of a Ray Train run and the checks made before any worker starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hg_dist.data import check_workers
from hg_dist.distributed.resources import DEFAULT_RESOURCE_TIMEOUT_S, check_timeout


@dataclass(frozen=True)
class FailAt:
    """Test hook: make ``rank`` raise once, after outer step ``outer_step``.

    ``marker`` is a file path on storage every worker sees; it is created just before
    the raise, so the restarted worker group does not fail again.
    """

    rank: int
    outer_step: int
    marker: str


@dataclass(frozen=True)
class TrainSettings:
    """How :func:`hg_dist.distributed.fit` runs the workers (the solver settings live in the config).

    Attributes:
        checkpoint_every: save a checkpoint every this many outer steps (and after the last).
        max_failures: worker-group restarts allowed (``FailureConfig(max_failures=...)``);
            each restart resumes from the latest checkpoint. ``None`` (default): 3 on a
            cluster (more than one node, or an autoscaler), 0 on one fixed node
            (:func:`hg_dist.distributed.resources.default_max_failures`).
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

    checkpoint_every: int = 10
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
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be an int >= 1 (outer steps between checkpoints), "
                             f"got {self.checkpoint_every!r}")
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
