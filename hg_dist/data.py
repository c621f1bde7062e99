"""Data for bilevel runs: one global order of batches, each rank taking its slice.

:class:`ShardedLoader` is how every example (and any user) feeds a solver, with one
process or ``W`` data-parallel workers alike. In epoch ``e`` the ``n`` examples are
put in one permutation (seeded by ``seed`` and ``e``, the same on every rank) and cut
into ``⌊n / B⌋`` global batches of ``B`` examples (``B`` = ``batch_size``, the
*global* batch; the last ``n mod B`` examples of each epoch's permutation are left
for that epoch, a different few each epoch when shuffling). Rank ``r`` of ``W``
takes positions ``[r·B/W, (r+1)·B/W)`` of each global batch. So:

* batch ``j`` of the ``W`` ranks together is batch ``j`` of one process with the same
  seed and ``B``: results do not depend on the number of workers;
* every rank holds ``B/W`` examples per batch, which keeps ``mean_r (rank mean) =
  global mean`` exact (hence ``B`` must be a multiple of ``W``);
* the position is ``(epoch, batch)``, identical on all ranks and saved in the
  solver's checkpoint (:meth:`ShardedLoader.state_dict`).

Random augmentation stays worker-independent when it is derived from the example and
the epoch: ``transform(batch, indices, epoch)`` receives the global indices of the
rank's examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

from hg_dist._checks import check_int

__all__ = ["ShardedLoader", "check_rank", "check_shardable", "check_workers", "full_batch", "shard_dataset",
           "shard_indices"]


def check_workers(workers: object) -> int:
    """Return ``workers`` if it is an int ``>= 1``, else raise naming the fix."""
    return check_int("workers", workers, minimum=1,
                     hint="use --workers 1 for a single process or --workers N for N data-parallel replicas")


def check_rank(rank: int, world_size: int) -> None:
    """Raise ``ValueError`` unless ``0 <= rank < world_size``."""
    check_workers(world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size - 1}] for world_size={world_size}, got {rank!r}")


def check_shardable(num_items: int, world_size: int, *, what: str = "examples") -> None:
    """Raise ``ValueError`` unless ``num_items`` can give each of ``world_size`` ranks at least one.

    Args:
        num_items: examples (or files, row groups) available.
        world_size: number of workers ``W``.
        what: what the items are, for the message.
    """
    check_workers(world_size)
    if num_items < 1:
        raise ValueError(f"there are no {what} to load; provide at least one")
    if num_items < world_size:
        raise ValueError(f"workers={world_size} is more than the {num_items} {what} to shard, so some "
                         f"workers would get no data; use --workers {num_items} or fewer, or "
                         f"provide more {what}")


def shard_indices(num_items: int, rank: int, world_size: int) -> Tensor:
    """Indices ``rank, rank + W, …`` of ``range(num_items)``, ``⌊num_items / W⌋`` of them (a fixed split)."""
    check_rank(rank, world_size)
    check_shardable(num_items, world_size)
    per_rank = num_items // world_size
    return torch.arange(rank, per_rank * world_size, world_size)


def shard_dataset(dataset: Dataset, rank: int, world_size: int) -> Subset:
    """This rank's equal-sized, strided shard of a map-style ``dataset`` (no shuffling)."""
    return Subset(dataset, shard_indices(len(dataset), rank, world_size).tolist())


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + epoch) % (2 ** 63)


class ShardedLoader(Iterator[Any]):
    """An endless iterator of this rank's slices of the global batches (see the module docstring).

    Args:
        dataset: a map-style dataset (``len`` and ``__getitem__``), the *whole* data.
            A ``TensorDataset`` is indexed once per batch; a dataset with
            ``__getitems__`` gets the list of indices; any other is read one example
            at a time and collated.
        batch_size: the global batch ``B`` (all ranks together), a multiple of
            ``world_size`` and at most ``len(dataset)``.
        rank: this worker (``0 <= rank < world_size``).
        world_size: the number of workers ``W``.
        shuffle: a new permutation every epoch; ``False`` keeps the dataset's order
            (with ``batch_size = len(dataset)``: the same full batch every time).
        seed: seeds the permutations (the same on every rank).
        collate_fn: turns a list of examples into a batch (``default_collate``).
        transform: ``transform(batch, indices, epoch) -> batch``, applied to this
            rank's batch; ``indices`` are the examples' global indices (derive any
            randomness from them and ``epoch`` to stay worker-independent).

    Raises:
        ValueError: naming the fix, for an empty dataset, more workers than examples,
            a batch size out of range or not a multiple of ``world_size``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, seed: int = 0,
                 collate_fn: Callable[[list[Any]], Any] = default_collate,
                 transform: Callable[[Any, Tensor, int], Any] | None = None) -> None:
        check_rank(rank, world_size)
        size = len(dataset)
        check_shardable(size, world_size)
        batch_size = check_int("batch_size", batch_size, minimum=world_size, maximum=size,
                               hint=f"it is the global batch over all workers: between workers={world_size} "
                                    f"and the {size} examples")
        if batch_size % world_size:
            fit = batch_size - batch_size % world_size
            raise ValueError(f"batch_size={batch_size} is not a multiple of workers={world_size}, so the workers "
                             f"would hold unequal shares and their mean would differ from one process's; use "
                             f"--batch-size {fit} or {fit + world_size} (or a worker count that divides it)")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, int(seed)
        self.collate_fn = collate_fn
        self.transform = transform
        self.batches_per_epoch = size // batch_size
        self.epoch = 0
        self.batch = 0
        self._order: Tensor | None = None

    @property
    def local_batch_size(self) -> int:
        """Examples per batch on this rank, ``B / W``."""
        return self.batch_size // self.world_size

    def __iter__(self) -> "ShardedLoader":
        return self

    def _fetch(self, indices: Tensor) -> Any:
        if isinstance(self.dataset, TensorDataset):
            return tuple(t[indices] for t in self.dataset.tensors)
        items = indices.tolist()
        getitems = getattr(self.dataset, "__getitems__", None)
        examples = getitems(items) if callable(getitems) else [self.dataset[i] for i in items]
        return self.collate_fn(examples)

    def __next__(self) -> Any:
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        if self._order is None:
            size = len(self.dataset)
            self._order = (torch.randperm(size, generator=torch.Generator().manual_seed(
                _epoch_seed(self.seed, self.epoch))) if self.shuffle else torch.arange(size))
        start = self.batch * self.batch_size + self.rank * self.local_batch_size
        indices = self._order[start:start + self.local_batch_size]
        self.batch += 1
        batch = self._fetch(indices)
        return self.transform(batch, indices, self.epoch) if self.transform is not None else batch

    def state_dict(self) -> dict[str, int]:
        """The position ``{"epoch", "batch"}`` (the same on every rank)."""
        return {"epoch": self.epoch, "batch": self.batch}

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` unless ``state`` is a position this loader can take."""
        if not isinstance(state, Mapping) or not all(isinstance(state.get(k), int) and state[k] >= 0
                                                     for k in ("epoch", "batch")):
            raise ValueError(f"the saved loader position {state!r} is malformed; expected ints epoch, batch >= 0")
        if state["batch"] > self.batches_per_epoch:
            raise ValueError(f"the saved loader position is batch {state['batch']} of an epoch, but this loader has "
                             f"{self.batches_per_epoch} batches per epoch; use the same data and --batch-size as "
                             f"the saved run")

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.check_state(state)
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None


def full_batch(dataset: Dataset, rank: int = 0, world_size: int = 1,
               collate_fn: Callable[[list[Any]], Any] = default_collate) -> ShardedLoader:
    """This rank's share of the whole ``dataset`` as one batch, every time (``len(dataset)`` a multiple of ``W``).

    Raises:
        ValueError: ``len(dataset)`` is not a multiple of ``world_size`` (naming both; no example is dropped).
    """
    size = len(dataset)
    check_rank(rank, world_size)
    check_shardable(size, world_size)
    if size % world_size:
        fit = size - size % world_size
        raise ValueError(f"the full batch of {size} examples cannot be split equally over workers={world_size} "
                         f"(unequal shares would make the workers' mean differ from one process's, and dropping "
                         f"the {size % world_size} left over would lose data); use {fit} examples, or a worker "
                         f"count that divides {size}")
    return ShardedLoader(dataset, len(dataset), rank=rank, world_size=world_size, shuffle=False,
                         collate_fn=collate_fn)
