"""Nyström (column-sampling) approximation of ``(H + ρI)⁻¹ v``.

Sample ``k`` coordinates ``K``; ``C = H[:, K]`` (``p×k``, the ``k`` products
``H e_i`` computed in *one* operator call) and ``W = H[K, K] = C[K]`` (``k×k``) give
the low-rank approximation ``H ≈ C W⁺ Cᵀ``. By the Woodbury identity::

    (C W⁺ Cᵀ + ρI)⁻¹ v = (v − C (ρW + CᵀC)⁻¹ Cᵀ v) / ρ

so only a ``k×k`` system is solved. With ``k = p`` (all coordinates) this is
exactly ``(H + ρI)⁻¹ v``. Cost: ``k`` products in one operator call, ``O(pk²)``
flops, ``O(pk)`` memory. The single call is what makes the distributed variant
need a number of communication rounds independent of ``k``.

``C`` is held as its transpose, the rows ``R = Cᵀ = H[K, :]`` (``(k, p)``, contiguous,
``pk·4`` bytes in float32), which the operator computes by index
(:func:`~hg_dist.hessian.hessian_rows`) without a ``p×k`` block of unit vectors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hg_dist.hessian import HessianOperator, hessian_rows
from hg_dist.ihvp._errors import PRODUCTS_HINT, RHS_HINT, check_finite
from hg_dist.ihvp._method import Method, checks_rhs
from hg_dist.ihvp._result import IHVPResult, IHVPStats
from hg_dist.registry import Setting

RANK = Setting("rank", int, 5, "sampled Hessian columns k (one batched call of k products)", minimum=1)
"""The rank ``k`` of the Nyström methods (``nystrom``, ``nystrom_pcg``); at most ``p``, checked per call."""

SHIFT = Setting("rho", float, 0.1, "shift ρ in (C W⁺ Cᵀ + ρI)⁻¹", minimum=0.0, exclusive_minimum=True,
                hint="Nyström divides by rho; use e.g. rho=0.1")


def check_rank(rank: object, size: int, method: str) -> int:
    """``rank`` as an int in ``[1, size]``, else a ``ValueError``/``TypeError`` naming the fix."""
    rank = RANK.check(rank, method)
    if rank > size:
        raise ValueError(f"rank must be <= {size}, got {rank} ({method}); the inner problem has {size} "
                         f"parameters, so the rank cannot exceed that")
    return rank


def sample_columns(size: int, rank: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``rank`` distinct coordinates out of ``size``, drawn uniformly (CPU RNG)."""
    return torch.randperm(size, generator=generator)[:rank].to(device)


@checks_rhs
def nystrom(op: HessianOperator,
            v: Tensor,
            rank: int,
            rho: float,
            *,
            generator: torch.Generator | None = None,
            ) -> IHVPResult:
    """Approximate ``(H + ρI)⁻¹ v`` with a rank-``rank`` Nyström approximation of ``H``.

    Args:
        op: the Hessian ``H`` (``p×p``) as an operator.
        v: right-hand side, shape ``(p,)``.
        rank: ``k``, the number of sampled columns, ``1 <= k <= p``.
        rho: shift ``ρ > 0``; also regularises a nearly singular ``W``.
        generator: CPU random generator for the column sample; give every worker
            of a distributed run the same seed so they pick the same columns.

    Raises:
        NonFiniteHypergradientError: ``v`` or the column block ``C`` has NaN/inf
            entries (checked, in one host sync, before the ``k×k`` solve sees them).
    """
    rank = check_rank(rank, op.size, "nystrom")
    rho = SHIFT.check(rho, "nystrom")
    columns = sample_columns(op.size, rank, generator, v.device)
    r = hessian_rows(op, columns, v)                      # (k, p): R = H[K, :] = Cᵀ
    check_finite({"the right-hand side v": v, "the Hessian columns C = H[:, K]": r}, "nystrom",
                 {"the right-hand side v": RHS_HINT, "the Hessian columns C = H[:, K]": PRODUCTS_HINT})
    w = r[:, columns]                                     # (k, k): W = H[K, K]
    w = (w + w.T) / 2
    core = rho * w + r @ r.T                              # (k, k): ρW + CᵀC
    rhs = r @ v                                           # (k,): Cᵀv
    y, info = torch.linalg.solve_ex(core, rhs)
    if int(info) != 0:
        y = torch.linalg.pinv(core, hermitian=True) @ rhs
    x = (v - y @ r) / rho                                 # (v − C y) / ρ
    stats = IHVPStats(method="nystrom", num_hvps=rank, num_operator_calls=1)
    return IHVPResult(x, stats)


METHOD = Method(name="nystrom", function=nystrom, randomized=True, settings=(RANK, SHIFT),
                summary="k sampled Hessian columns + Woodbury, (C W⁺ Cᵀ + ρI)⁻¹ v")
