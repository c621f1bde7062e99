"""Sum-allreduce over a group of data-parallel replicas, behind one small interface.

A :class:`Collective` knows its ``rank`` and ``world_size`` and sums a tensor over
the group: after ``allreduce_sum(t)`` on every rank, each rank holds
``Σ_r t_r`` (same shape and dtype as ``t``, identical bits on all ranks). Three
implementations:

* :class:`TorchDistributed` — ``torch.distributed`` (gloo on CPU, NCCL on GPU);
  what Ray Train's ``TorchTrainer`` initialises on every worker.
* :class:`ThreadGroup` — ``W`` threads of one process exchanging through shared
  memory; simulates a group without processes, for tests and notebooks.
* :class:`~hg_dist.collective.SingleProcess` — ``W = 1``, the identity (the protocol
  :class:`~hg_dist.collective.Collective` and this default live in the core).

Counting and averaging live one level up, in :mod:`hg_dist.distributed.counting`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from hg_dist.collective import AllreduceGradientMean, Collective, GradientMean, SingleProcess
from hg_dist.distributed.buckets import DEFAULT_BUCKET_BYTES, TorchGradientMean

__all__ = ["Collective", "SingleProcess", "ThreadGroup", "TorchDistributed", "run_threads"]

T = TypeVar("T")


class TorchDistributed(Collective):
    """``torch.distributed``'s default process group (must already be initialised).

    A tensor that requires grad (an unrolled inner step) goes through the
    autograd-aware ``torch.distributed.nn.functional.all_reduce``, whose backward is
    again a sum-allreduce; otherwise a detached copy is reduced in place.

    Its :meth:`gradient_mean` is a :class:`~hg_dist.distributed.buckets.TorchGradientMean`:
    gradients reduced in buckets of about ``bucket_bytes`` launched from backward
    hooks, and finished gradients in one copy-free flat allreduce.
    """

    def __init__(self, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}; e.g. 25 * 2**20")
        self.bucket_bytes = bucket_bytes
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            raise RuntimeError("torch.distributed is not initialised; inside a Ray Train worker it is "
                               "set up by TorchTrainer, elsewhere call torch.distributed.init_process_group "
                               "first (or use SingleProcess for one process)")

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size()

    def allreduce_sum(self, tensor: Tensor) -> Tensor:
        if tensor.requires_grad:
            from torch.distributed.nn.functional import all_reduce
            return all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        out = tensor.detach().clone()
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    def gradient_mean(self, params: Sequence[torch.Tensor]) -> GradientMean:
        """Bucketed means for parameters of one dtype and device; the default flat mean otherwise."""
        params = tuple(params)
        uniform = all(p.dtype == params[0].dtype and p.device == params[0].device for p in params)
        if not params or not uniform:
            return AllreduceGradientMean(self)
        return TorchGradientMean(fallback=AllreduceGradientMean(self), bucket_bytes=self.bucket_bytes)


class ThreadGroup:
    """``world_size`` threads of one process acting as a data-parallel group.

    Each thread gets a member with :meth:`member`; a reduction waits at a barrier
    until every member has contributed, then every member sums the contributions in
    rank order (so all ranks get bit-identical results, as with a real allreduce).
    Use :func:`run_threads` to run one function per rank.
    """

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._slots: list[Tensor | None] = [None] * world_size
        self._barrier = threading.Barrier(world_size)

    def member(self, rank: int) -> "_ThreadMember":
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size - 1}], got {rank}")
        return _ThreadMember(self, rank)

    def abort(self) -> None:
        """Break the barrier so that no member waits forever after another failed."""
        self._barrier.abort()

    def _allreduce_sum(self, rank: int, tensor: Tensor) -> Tensor:
        self._slots[rank] = tensor.detach().clone()
        self._barrier.wait()                      # every contribution is in
        total = functools.reduce(torch.add, self._slots)
        self._barrier.wait()                      # everyone has read before slots are reused
        return total


class _ThreadMember(Collective):
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self._group = group
        self.rank = rank
        self.world_size = group.world_size

    def allreduce_sum(self, tensor: Tensor) -> Tensor:
        return self._group._allreduce_sum(self.rank, tensor)


def run_threads(world_size: int, fn: Callable[[Collective], T]) -> list[T]:
    """Run ``fn(collective)`` for every rank of a :class:`ThreadGroup`; results in rank order.

    An exception on any rank aborts the group and is re-raised here.
    """
    group = ThreadGroup(world_size)
    results: list = [None] * world_size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(group.member(rank))
        except threading.BrokenBarrierError:
            pass                                   # another rank failed first
        except BaseException as error:             # noqa: BLE001 - re-raised below
            errors.append(error)
            group.abort()

    threads = [threading.Thread(target=target, args=(r,), name=f"hg_dist-rank{r}") for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
