"""Persistent, endless, resumable loaders: what ``next(solver.inner_loader)`` walks.

:class:`InfiniteLoader` wraps what the user passes (a ``DataLoader``, a list of
batches, a resumable loader such as :class:`hg_dist.data.ShardedLoader`, or a
one-shot iterator) and continues it epoch after epoch. Its position is part of a
solver's checkpoint, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from hg_dist.utils import map_tensors

__all__ = ["InfiniteLoader", "move_to"]


def move_to(batch: Any, device: torch.device | None) -> Any:
    """``batch`` (tensors in tuples, NamedTuples, lists, dicts) with every tensor moved to ``device``."""
    if device is None:
        return batch
    return map_tensors(lambda t: t.to(device, non_blocking=True), batch)


def _shuffle_generators(source: Iterable) -> list[torch.Generator]:
    """The ``torch.Generator`` objects ``source`` shuffles with.

    For a ``DataLoader``: its ``generator``, its sampler's and its batch sampler's
    sampler's (``sampler=BatchSampler(RandomSampler(ds, generator=g), ...)``).
    Any other iterable may expose its generator as a ``generator`` attribute.
    """
    candidates = [getattr(source, "generator", None)]
    if isinstance(source, torch.utils.data.DataLoader):
        for sampler in (source.sampler, source.batch_sampler):
            candidates += [getattr(sampler, "generator", None),
                           getattr(getattr(sampler, "sampler", None), "generator", None)]
    found: list[torch.Generator] = []
    for gen in candidates:
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def _is_resumable(source: object) -> bool:
    return callable(getattr(source, "state_dict", None)) and callable(getattr(source, "load_state_dict", None))


class InfiniteLoader(Iterator):
    """Walks through ``source`` batch after batch, forever, one epoch after another.

    Three kinds of source:

    * **resumable** — it has ``state_dict()`` / ``load_state_dict()`` (e.g.
      :class:`hg_dist.data.ShardedLoader`): its own state is the checkpoint, and
      an endless one is simply called with ``next``;
    * **re-iterable** — a ``DataLoader`` or a list: at the end of an epoch a new
      pass starts (a shuffling ``DataLoader`` draws a new permutation). The
      position (epoch, batch) and the random state at the start of the epoch are
      kept, so :meth:`load_state_dict` replays the epoch's shuffle and skips the
      batches already drawn (this costs up to one epoch of loading, and is exact
      when the shuffle is the loader's only randomness);
    * **one-shot** — a generator: used as is, and cannot be repositioned.

    Args:
        source: see above.
        name: used in error messages (``"inner_loader"``).
        device: batches (tensors, tuples, lists, dicts of tensors) are moved there.
    """

    def __init__(self, source: Iterable, name: str = "loader", device: torch.device | None = None) -> None:
        if isinstance(source, InfiniteLoader):
            source = source.source
        if not isinstance(source, Iterable):
            raise TypeError(f"{name} must be an iterable of batches (e.g. a torch DataLoader), "
                            f"got {type(source).__name__}")
        self.source = source
        self.name = name
        self.device = device
        self.resumable = _is_resumable(source)
        self.one_shot = isinstance(source, Iterator) and not self.resumable
        self.epoch = 0
        self.position = 0
        self._iterator: Iterator | None = source if isinstance(source, Iterator) else None
        self._epoch_rng: dict | None = None

    def _start_epoch(self) -> None:
        self._epoch_rng = {"torch": torch.get_rng_state(),
                           "generators": [g.get_state() for g in _shuffle_generators(self.source)]}
        self._iterator = iter(self.source)
        self.epoch += 1
        self.position = 0

    def __next__(self) -> Any:
        if self._iterator is None:
            self._start_epoch()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if isinstance(self.source, Iterator):
                raise ValueError(f"{self.name} is exhausted; pass a re-iterable (a DataLoader or a "
                                 f"list of batches) so that it can start a new epoch") from None
            empty_epoch = self.position == 0
            self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                raise ValueError(f"{self.name} yields no batches; check the dataset size and "
                                 f"drop_last") from None
            if empty_epoch and self.epoch > 1:
                raise ValueError(f"{self.name} yielded an empty epoch")
        self.position += 1
        return move_to(batch, self.device)

    def state_dict(self) -> dict | None:
        """The position (plain values and tensors); ``None`` for a one-shot iterator."""
        if self.one_shot:
            return None
        if self.resumable:
            return {"source": self.source.state_dict(), "epoch": self.epoch, "position": self.position}
        return {"epoch": self.epoch, "position": self.position, "epoch_rng": copy.deepcopy(self._epoch_rng)}

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` could not restore ``state`` (nothing changes)."""
        if state is None or self.one_shot:
            return
        if not isinstance(state, Mapping):
            raise ValueError(f"the saved state of {self.name} is malformed; pass what solver.state_dict() returned")
        if self.resumable != ("source" in state):
            raise ValueError(f"{self.name} is {'a resumable loader' if self.resumable else 'a re-iterable'} but the "
                             f"saved state is from {'a re-iterable' if self.resumable else 'a resumable loader'}; "
                             f"build the loaders as in the saved run")
        if self.resumable:
            check = getattr(self.source, "check_state", None)
            if callable(check):
                check(state["source"])
            return
        position = state.get("position")
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"the saved position of {self.name} is {position!r}; expected an int >= 0")
        if state.get("epoch", 0) == 0:
            return
        saved = (state.get("epoch_rng") or {}).get("generators", [])
        generators = _shuffle_generators(self.source)
        if len(generators) != len(saved):
            raise ValueError(f"{self.name} shuffles with {len(generators)} generator(s) but the saved "
                             f"state has {len(saved)}; build the loader as in the saved run")
        if hasattr(self.source, "__len__") and position > len(self.source):
            raise ValueError(f"{self.name} has only {len(self.source)} batches per epoch but the saved "
                             f"position is {position}; use the same data and batch size as the saved run")

    def load_state_dict(self, state: Mapping | None) -> None:
        """Reposition at ``state``'s batch. Changes the global torch RNG: restore it afterwards.

        Raises:
            ValueError: ``state`` does not fit this loader (see :meth:`check_state`).
        """
        if self.one_shot:
            warnings.warn(f"{self.name} is a one-shot iterator and cannot be repositioned; it continues from "
                          f"where it is (pass a DataLoader or an hg_dist.data.ShardedLoader to resume exactly)",
                          stacklevel=3)
            return
        if state is None:
            return
        self.check_state(state)
        if self.resumable:
            self.source.load_state_dict(state["source"])
            self.epoch, self.position = state["epoch"], state["position"]
            return
        if state["epoch"] == 0:
            self._iterator, self.epoch, self.position, self._epoch_rng = None, 0, 0, None
            return
        epoch_rng = state["epoch_rng"]
        torch.set_rng_state(epoch_rng["torch"])
        for gen, gen_state in zip(_shuffle_generators(self.source), epoch_rng["generators"]):
            gen.set_state(gen_state)
        self._start_epoch()
        for skipped in range(state["position"]):
            try:
                next(self._iterator)
            except StopIteration:
                raise ValueError(f"{self.name} has only {skipped} batches per epoch but the saved "
                                 f"position is {state['position']}; use the same data as the saved "
                                 f"run") from None
        self.epoch, self.position = state["epoch"], state["position"]
