"""How many Hessian products to batch together, chosen by measuring.

A block of ``k`` products ``H v₁ … H v_k`` runs in chunks of ``c`` rows: ``c = 1`` is a
loop of single products, ``c ≥ 2`` one batched pass over ``c`` tangents. Which ``c`` is
fastest depends on the model, the batch, the dtype, the device and the thread
count (batching shares reads of the data and weights and amortises per-op overhead,
but ``c`` copies of every activation stop fitting in cache: see
``benchmarks/results/scaling.md``), so it is measured, not predicted.

:class:`Calibration` is the measurement. Exploration uses *useful* work: the first
block calls of a kind of product time chunk sizes ``1, 2, 4, 8, …`` in turn on the
rows they have to compute anyway (each size twice, the faster counting), and record
seconds per product for each. A size
1.5× slower than the best so far, or two sizes in a row without a gain, end the
exploration (:meth:`Calibration.record`); from then on every block uses the best one
(evened out over the rows, see :meth:`Calibration.next_size`). So no product is
computed twice, exploring costs at most four chunks at worse sizes, and a batched
block is never slower per product than the sequential loop it was measured against
(up to timing noise: each size is timed twice).

Calibrations are cached per process in :data:`CALIBRATIONS`, keyed by what the cost
depends on and is visible to the operator (:func:`calibration_key`): the parameter
shapes, dtype, device and torch's thread count. The data is not part of the key: a
process that changes the batch size of a model by orders of magnitude keeps the first
calibration unless it calls :func:`clear_calibrations`. Inside ``with
fixed_chunk_size(c):`` every operator built by ``linearize`` without its own
``chunk_size`` uses ``c`` instead of measuring: block products then run the same
chunks whatever the machine's timing, for tests and reproducible runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

from hg_dist._checks import check_int

CANDIDATE_SIZES = (1, 2, 4, 8, 16, 32, 64)
"""Chunk sizes explored, in order; the largest bounds a chunk's intermediates (64 tangents)."""

STOP_RATIO = 1.5
"""A chunk size this many times slower per product than the best so far ends exploring."""

SAMPLES_PER_SIZE = 2
"""Timed chunks per explored size; the fastest one is its figure. A size's first chunk
pays one-time costs, so a single timing can make a size look slower than a loop and end
exploring before the size that wins (``benchmarks/results/scaling.md``)."""

CALIBRATIONS: dict[tuple, "Calibration"] = {}
"""Process-wide cache: :func:`calibration_key` → :class:`Calibration`."""

_FIXED_SIZE: ContextVar[int | None] = ContextVar("hg_dist_fixed_chunk_size", default=None)


@dataclass
class Calibration:
    """Seconds per product measured for each chunk size tried, and whether exploring is over.

    Attributes:
        seconds: chunk size → seconds per product (wall time of the chunk / its size),
            the fastest of its :data:`SAMPLES_PER_SIZE` timed chunks.
        done: ``True`` once a size was no faster than the best before it, or all
            :data:`CANDIDATE_SIZES` were tried.
        pending: timings of the size being explored, until it has all its samples.
    """

    seconds: dict[int, float] = field(default_factory=dict)
    done: bool = False
    pending: dict[int, list[float]] = field(default_factory=dict)

    @classmethod
    def fixed(cls, size: int) -> "Calibration":
        """A finished calibration that always picks ``size`` (``linearize(chunk_size=size)``)."""
        return cls({size: 0.0}, done=True)

    @property
    def best(self) -> int:
        """The fastest size measured (ties: the smaller); ``1`` before any measurement."""
        return pick_chunk_size(self.seconds)

    def exploring_size(self) -> int | None:
        """The next candidate to time, or ``None`` when exploring is over."""
        if self.done:
            return None
        return next(size for size in CANDIDATE_SIZES if size not in self.seconds)

    def next_size(self, remaining: int) -> tuple[int, bool]:
        """``(chunk size, timed?)`` for the next chunk of a block with ``remaining`` rows left.

        While exploring and the next candidate fits, that candidate (timed). Otherwise
        the best size, evened out: ``⌈r / ⌈r / best⌉⌉`` for ``r`` remaining rows, the
        same number of chunks as ``best`` gives with a smaller largest one (20 rows at
        best 8: 7 + 7 + 6, not 8 + 8 + 4).
        """
        candidate = self.exploring_size()
        if candidate is not None and candidate <= remaining:
            return candidate, True
        best = max(1, self.best)
        chunks = -(-remaining // best)
        return -(-remaining // chunks), False

    def record(self, size: int, seconds_per_product: float) -> None:
        """Record a timed chunk; once ``size`` has :data:`SAMPLES_PER_SIZE` of them, take its
        fastest and stop exploring after a clear loss or two sizes without a gain.

        A size ``STOP_RATIO`` times slower than the best so far ends the exploration at
        once; one merely no faster does not (vmap's fixed costs can make ``c = 2`` lose
        to a loop while ``c = 4–16`` win: 0.62 / 0.60 / 0.37 / 0.39 / 0.33 gradients per
        product for ``c = 1, 2, 4, 8, 16`` at ``p = 4,810``), but two in a row do.
        """
        timings = self.pending.setdefault(size, [])
        timings.append(seconds_per_product)
        if len(timings) < SAMPLES_PER_SIZE:
            return
        seconds_per_product = min(self.pending.pop(size))
        previous_best = min(self.seconds.values(), default=float("inf"))
        no_gain_before = bool(self.seconds) and self.seconds[max(self.seconds)] > min(self.seconds.values())
        self.seconds[size] = seconds_per_product
        no_gain = seconds_per_product >= previous_best
        if (seconds_per_product >= STOP_RATIO * previous_best or (no_gain and no_gain_before)
                or size == CANDIDATE_SIZES[-1]):
            self.done = True


def pick_chunk_size(seconds: dict[int, float]) -> int:
    """The chunk size with the fewest seconds per product (ties: the smaller; ``{}`` → ``1``)."""
    return min(seconds, key=lambda size: (seconds[size], size), default=1)


def calibration_key(params: tuple[Tensor, ...]) -> tuple:
    """What a product's cost depends on that the operator sees: shapes, dtype, device, threads."""
    first = params[0] if params else torch.empty(0)
    return (tuple(tuple(t.shape) for t in params), first.dtype, str(first.device), torch.get_num_threads())


def calibration_for(params: tuple[Tensor, ...]) -> Calibration:
    """The cached :class:`Calibration` for ``params``' key, created (empty) on first use; inside
    :func:`fixed_chunk_size`, a fixed one instead (the cache is neither read nor written)."""
    size = _FIXED_SIZE.get()
    if size is not None:
        return Calibration.fixed(size)
    return CALIBRATIONS.setdefault(calibration_key(params), Calibration())


@contextlib.contextmanager
def fixed_chunk_size(size: int) -> Iterator[None]:
    """Within the block, operators that would measure their chunk size use ``size`` rows per chunk.

    Raises:
        TypeError / ValueError: ``size`` is not an int ``>= 1``.
    """
    size = check_int("size", size, minimum=1, hint="1 is a loop of single products")
    token = _FIXED_SIZE.set(size)
    try:
        yield
    finally:
        _FIXED_SIZE.reset(token)


def clear_calibrations() -> None:
    """Forget every cached calibration (the next block products measure again)."""
    CALIBRATIONS.clear()
