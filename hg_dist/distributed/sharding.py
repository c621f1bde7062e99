"""Equal-sized data shards and infinite per-rank loaders.

Why *equal* shards: the distributed layer averages per-rank means, and
``mean_r (mean over shard r) = mean over the union`` only when every shard has the
same size. So every helper here drops the remainder (at most ``W − 1`` examples
per epoch) instead of padding with duplicates.

:class:`ShardedLoader` follows ``torch.utils.data.DistributedSampler``
(``drop_last=True``): in epoch ``e`` the examples are permuted with seed
``seed + e`` and rank ``r`` takes positions ``r, r + W, r + 2W, …``. Its batch ``j``
of size ``B`` on ranks ``0..W−1`` is therefore *exactly* batch ``j`` of size ``W·B``
of a one-process loader with the same seed: data-parallel training with ``W``
workers and per-worker batch ``B`` reproduces single-process training with batch
``W·B``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Subset, default_collate

from hg_dist._checks import check_int


def check_workers(workers: object) -> int:
    """Return ``workers`` if it is an int ``>= 1``, else raise naming the fix."""
    return check_int("workers", workers, minimum=1,
                     hint="use --workers 1 for a single process or --workers N for N data-parallel replicas")


def check_shardable(num_items: int, world_size: int, *, what: str = "examples") -> None:
    """Raise ``ValueError`` unless ``num_items`` can give each of ``world_size`` ranks at least one.

    Args:
        num_items: examples (or files, row groups) available.
        world_size: number of workers ``W``.
        what: what the items are, for the message.
    """
    check_workers(world_size)
    if num_items < world_size:
        raise ValueError(f"workers={world_size} is more than the {num_items} {what} to shard, so some "
                         f"workers would get no data; use --workers {max(num_items, 1)} or fewer, or "
                         f"provide more {what}")


def _check_rank(rank: int, world_size: int) -> None:
    check_workers(world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size - 1}] for world_size={world_size}, got {rank}")


def shard_indices(num_items: int, rank: int, world_size: int) -> Tensor:
    """Indices ``rank, rank + W, …`` of ``range(num_items)``, ``⌊num_items / W⌋`` of them."""
    _check_rank(rank, world_size)
    check_shardable(num_items, world_size)
    per_rank = num_items // world_size
    return torch.arange(rank, per_rank * world_size, world_size)


def shard_dataset(dataset: Dataset, rank: int, world_size: int) -> Subset:
    """This rank's equal-sized, strided shard of a map-style ``dataset`` (no shuffling)."""
    return Subset(dataset, shard_indices(len(dataset), rank, world_size).tolist())


class ShardedLoader(Iterator[Any]):
    """An endless iterator of batches from this rank's shard (``next(loader)``).

    Args:
        dataset: a map-style dataset (``len`` and ``__getitem__``), the *whole* data;
            the shard is chosen by ``rank``/``world_size``.
        batch_size: examples per batch *per rank*, ``B``.
        rank, world_size: this worker and the number of workers ``W``.
        shuffle: permute every epoch (seed ``seed + epoch``, same on all ranks).
        seed: base seed of the permutation.
        collate_fn: turns a list of examples into a batch (``default_collate``).

    Its position (``epoch``, ``batch``) is saved by :meth:`state_dict`, so a resumed
    run continues with the batch an uninterrupted run would have seen.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0,
                 collate_fn: Callable[[list[Any]], Any] = default_collate) -> None:
        _check_rank(rank, world_size)
        check_shardable(len(dataset), world_size)
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=True)
        per_rank = len(self.sampler)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= per_rank:
            raise ValueError(f"batch_size must be an int in [1, {per_rank}] (the examples per worker with "
                             f"{len(dataset)} examples over {world_size} workers), got {batch_size!r}; "
                             f"lower the per-worker batch size or use fewer workers")
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.batches_per_epoch = per_rank // batch_size
        self.epoch = 0
        self.batch = 0
        self._order: list[int] | None = None

    def __iter__(self) -> "ShardedLoader":
        return self

    def __next__(self) -> Any:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = list(self.sampler)
        start = self.batch * self.batch_size
        self.batch += 1
        return self.collate_fn([self.dataset[i] for i in self._order[start:start + self.batch_size]])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None


def full_batch(dataset: Dataset, rank: int, world_size: int,
               collate_fn: Callable[[list[Any]], Any] = default_collate) -> Iterator[Any]:
    """An endless iterator yielding this rank's whole shard as one batch every time."""
    shard = shard_dataset(dataset, rank, world_size)
    batch = collate_fn([shard[i] for i in range(len(shard))])
    while True:
        yield batch

