"""How a run ended: the one type of ``result.json``'s ``"status"`` (and of a search's results table).

Every writer of a status (one-process runs, Ray Train runs, Tune trials, the
search's table) uses :class:`RunStatus`; being a ``str`` enum, a member is written
to JSON and Parquet as its plain value (``"completed"``) and compares equal to it,
so files written before this type existed read the same.
"""

from __future__ import annotations

import enum

__all__ = ["ENDED_FROM_OUTSIDE", "RunStatus"]


class RunStatus(enum.StrEnum):
    """The ending of a run (or a search's trial), as recorded in ``result.json``.

    * ``COMPLETED``: the run reached ``num_iters``.
    * ``FAILED``: it raised (``"error"`` holds ``"Type: message"``), or its process died.
    * ``INTERRUPTED``: Ctrl-C (``SIGINT``), or a search stopped before the trial ended;
      the same command resumes it from its latest checkpoint.
    * ``TERMINATED``: ``SIGTERM`` (a scheduler, ``ray job stop``, ``kill``); resumable too.
    * ``STOPPED``: a search's scheduler ended the trial early (say ASHA); final.
    * ``PENDING``: a search's trial that never started.
    """

    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    TERMINATED = "terminated"
    STOPPED = "stopped"
    PENDING = "pending"

    @property
    def resumable(self) -> bool:
        """Whether the same command continues the run from its checkpoint (it was cut short from outside)."""
        return self in (RunStatus.INTERRUPTED, RunStatus.TERMINATED)


ENDED_FROM_OUTSIDE = (RunStatus.STOPPED,)
"""Statuses that the party which ended a run records (a search's scheduler stopping a trial
writes ``stopped``); the error the run raises afterwards is a consequence, not the cause."""
