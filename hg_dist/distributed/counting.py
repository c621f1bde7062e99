"""An allreduce-mean that counts its communication rounds and bytes (defined in :mod:`hg_dist.collective`).

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

from hg_dist.collective import CommStats, CountingAllreduce

__all__ = ["CommStats", "CountingAllreduce"]
