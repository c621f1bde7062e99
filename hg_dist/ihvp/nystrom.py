"""Nyström (column-sampling) approximation of ``(H + ρI)⁻¹ v``.

Sample ``k`` coordinates ``K``; ``C = H[:, K]`` (``p×k``, the ``k`` products
``H e_i`` computed in *one* batched call) and ``W = H[K, K] = C[K]`` (``k×k``) give the
low-rank approximation ``H ≈ C W⁺ Cᵀ``. By the Woodbury identity::

    (C W⁺ Cᵀ + ρI)⁻¹ v = (v − C (ρW + CᵀC)⁻¹ Cᵀ v) / ρ

so only a ``k×k`` system is solved. With ``k = p`` (all coordinates) this is
exactly ``(H + ρI)⁻¹ v``. Cost: ``k`` products in one operator call, ``O(pk²)``
flops, ``O(pk)`` memory. The single call is what makes the distributed variant
need a number of communication rounds independent of ``k``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hg_dist._checks import check_float, check_int
from hg_dist.hessian import HessianOperator
from hg_dist.ihvp._result import IHVPResult, IHVPStats


def sample_columns(size: int, rank: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``rank`` distinct coordinates out of ``size``, drawn uniformly (CPU RNG)."""
    return torch.randperm(size, generator=generator)[:rank].to(device)


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
    """
    rank = check_int("rank", rank, minimum=1, maximum=op.size,
                     hint=f"the inner problem has {op.size} parameters, so the rank cannot exceed that")
    rho = check_float("rho", rho, positive=True, hint="Nyström divides by rho; use e.g. rho=0.1")
    columns = sample_columns(op.size, rank, generator, v.device)
    unit = torch.zeros(op.size, rank, dtype=v.dtype, device=v.device)
    unit[columns, torch.arange(rank, device=v.device)] = 1
    c = op.matmat(unit)                                   # (p, k)
    w = c[columns]                                        # (k, k)
    w = (w + w.T) / 2
    core = rho * w + c.T @ c                              # (k, k)
    rhs = c.T @ v                                         # (k,)
    y, info = torch.linalg.solve_ex(core, rhs)
    if int(info) != 0:
        y = torch.linalg.pinv(core, hermitian=True) @ rhs
    x = (v - c @ y) / rho
    stats = IHVPStats(method="nystrom", num_hvps=rank, num_operator_calls=1)
    return IHVPResult(x, stats)
