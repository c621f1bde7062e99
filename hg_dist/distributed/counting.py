"""An allreduce-mean that counts its communication rounds and bytes.

For replicas ``r = 1..W`` holding ``t_r``, :class:`CountingAllreduce` returns
``(1/W) Σ_r t_r`` on every rank. One call is one *round*; its *bytes* are the
payload one rank contributes, ``t.numel() · t.element_size()`` (what a ring
allreduce moves per rank is about twice that; we report the payload, which is what
the algorithm controls). It is the ``reduce=`` the core's hypergradient functions
take: a method making ``m`` Hessian-operator calls costs ``m + 2`` rounds
(``∂g/∂θ``, the ``m`` products, the final hypergradient), so distributed Nyström
costs 3 rounds and ``(2p + p·k) · itemsize + |φ| · itemsize`` bytes whatever its
rank ``k``.

With ``W = 1`` (a :class:`~hg_dist.distributed.collectives.SingleProcess`)
nothing is sent and nothing is counted: the reduction is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from hg_dist.distributed.collectives import Collective
from hg_dist.utils import Params, params_to_vector, vector_to_params


@dataclass(frozen=True)
class CommStats:
    """Communication of a span of work: ``rounds`` allreduce calls moving ``bytes`` per rank."""

    rounds: int = 0
    bytes: int = 0

    def __sub__(self, other: "CommStats") -> "CommStats":
        return CommStats(self.rounds - other.rounds, self.bytes - other.bytes)

    def __add__(self, other: "CommStats") -> "CommStats":
        return CommStats(self.rounds + other.rounds, self.bytes + other.bytes)


class CountingAllreduce:
    """``t ↦ mean_r t_r`` over ``collective``, counting rounds and bytes.

    Call it on a tensor (any shape); read :attr:`total` for everything so far, or
    bracket a span with :meth:`snapshot` and subtract.
    """

    def __init__(self, collective: Collective) -> None:
        self.collective = collective
        self._rounds = 0
        self._bytes = 0

    @property
    def world_size(self) -> int:
        return self.collective.world_size

    @property
    def total(self) -> CommStats:
        return CommStats(self._rounds, self._bytes)

    def snapshot(self) -> CommStats:
        """The running totals now; ``after - before`` gives a span's cost."""
        return self.total

    def __call__(self, tensor: Tensor) -> Tensor:
        world_size = self.collective.world_size
        if world_size == 1:
            return tensor
        return self.sum(tensor) / world_size

    def sum(self, tensor: Tensor) -> Tensor:
        """``Σ_r t_r`` over the group (one counted round; the identity for ``W = 1``)."""
        if self.collective.world_size == 1:
            return tensor
        self._rounds += 1
        self._bytes += tensor.numel() * tensor.element_size()
        return self.collective.allreduce_sum(tensor)

    def params(self, params: Sequence[Tensor]) -> Params:
        """Mean of a tuple of tensors, flattened into one vector: a single round."""
        params = tuple(params)
        return vector_to_params(self(params_to_vector(params)), params)
