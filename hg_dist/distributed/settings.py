"""hg_dist's own settings of a Ray Train run (:class:`FitOptions`) and the checks made before any worker
starts; everything else is Ray's ``ScalingConfig`` and ``RunConfig``."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from hg_dist.callbacks import Callback, HistoryWriter
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


REPORT_EVERY = Every(seconds=60.0)
"""Default of :attr:`FitOptions.report_every`: one ``ray.train.report`` (≈2 s with 2 CPU
workers) a minute keeps reporting under 4% of a run."""

CHECKPOINT_EVERY = Every(seconds=300.0)
"""Default of :attr:`FitOptions.checkpoint_every`: a checkpoint every 5 minutes (at most
5 minutes of work lost to a failure, about 1% of the run spent saving)."""


@dataclass(frozen=True)
class FitOptions:
    """What :func:`hg_dist.distributed.fit` needs besides Ray's own ``ScalingConfig`` and ``RunConfig``.

    Ray Train has no word for these: how often the workers talk to it, in outer steps
    or seconds, and how long to wait for the cluster to hold the workers.

    Rank 0 records every outer step locally (history, TensorBoard) whatever these
    say; ``report_every`` and ``checkpoint_every`` only bound how often the workers
    stop together to talk to Ray Train (each ``ray.train.report`` synchronises all
    workers with the Train controller, which polls every few seconds). Both are decided on rank 0 and
    agreed by all ranks after the outer step, so all ranks always report together.
    The end of a run is always reported, with a checkpoint.

    Attributes:
        report_every: metrics go to Ray Train (and through it to Tune) at most this
            often (:class:`Every`, or ``int`` outer steps, or a string such as ``"30s"``).
        checkpoint_every: a checkpoint (with a report) at most this often.
        resource_timeout_s: how long to wait for the workers' resources (an autoscaler
            adding nodes, other jobs finishing) before giving up with
            ``ResourceTimeoutError``; with the default ``RunConfig`` it also bounds Ray
            Train's retries of a worker group that cannot start after a lost node.
        precheck: build rank 0's solver once on the driver (CPU) before starting
            workers, so data/shard errors surface as a plain ``ValueError``.
        history: ``history(output) -> Callback``: what writes rank 0's history and
            TensorBoard files into ``config.output`` (a :class:`~hg_dist.callbacks.HistoryWriter`
            or subclass; the other ranks write none). Picklable: it travels to the workers.
    """

    report_every: Every | int | str = REPORT_EVERY
    checkpoint_every: Every | int | str = CHECKPOINT_EVERY
    resource_timeout_s: float = DEFAULT_RESOURCE_TIMEOUT_S
    precheck: bool = True
    history: Callable[[str | os.PathLike], Callback] = HistoryWriter

    def __post_init__(self) -> None:
        for name in ("report_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, (Every, int, str)) or isinstance(value, bool):
                raise TypeError(f"{name} must be an hg_dist.distributed.Every, an int (outer steps) or a string "
                                f"such as '30s', got {type(value).__name__}")
            object.__setattr__(self, name, Every.parse(value, name))
        object.__setattr__(self, "resource_timeout_s", check_timeout(self.resource_timeout_s, "resource_timeout_s"))
        if not isinstance(self.precheck, bool):
            raise TypeError(f"precheck must be a bool, got {type(self.precheck).__name__}")
        if not callable(self.history):
            raise TypeError(f"history must be callable as history(output) -> Callback, e.g. "
                            f"hg_dist.callbacks.HistoryWriter; got {type(self.history).__name__}")


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
