"""Dense exact solve of ``(H + ρI) x = v``: the reference for small problems.

Forms the ``p×p`` Hessian with ``p`` products in batched blocks, so it costs
``O(p²)`` memory and ``O(p³)`` time; use it for tests and problems with at most a
few thousand inner parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hg_dist.hessian import HessianOperator, shifted
from hg_dist.ihvp._errors import PRODUCTS_HINT, RHS_HINT, check_finite
from hg_dist.ihvp._method import DAMPING, Method, checks_rhs
from hg_dist.ihvp._result import IHVPResult, IHVPStats


BLOCK = 64
"""Columns of the identity per operator call when forming the dense Hessian."""


def dense_hessian(op: HessianOperator, like: Tensor, block: int = BLOCK) -> Tensor:
    """The ``p×p`` matrix of ``op`` (dtype and device of ``like``), ``block`` columns per call.

    Blocks bound the memory of the batched products' intermediates (all ``p`` at once
    took 2.5 GiB at ``p = 4810`` in ``benchmarks/scaling.py``, and was slower).
    """
    identity = torch.eye(op.size, dtype=like.dtype, device=like.device)
    hessian = torch.cat([op.matmat(identity[:, start:start + block])
                         for start in range(0, op.size, block)], dim=1)
    return (hessian + hessian.T) / 2


@checks_rhs
def exact(op: HessianOperator, v: Tensor, *, rho: float = 0.0) -> IHVPResult:
    """Solve ``(H + ρI) x = v`` exactly through the dense Hessian.

    Raises:
        ValueError: if ``H + ρI`` is singular; add ``rho > 0``.
        NonFiniteHypergradientError: ``v`` or the Hessian has NaN/inf entries
            (checked before the solve sees them).
    """
    matrix = dense_hessian(shifted(op, DAMPING.check(rho, "exact")), v)
    check_finite({"the right-hand side v": v, "the dense Hessian": matrix}, "exact",
                 {"the right-hand side v": RHS_HINT, "the dense Hessian": PRODUCTS_HINT})
    x, info = torch.linalg.solve_ex(matrix, v)
    if int(info) != 0:
        raise ValueError("the inner Hessian (+ rho·I) is singular; pass rho > 0 to damp it")
    stats = IHVPStats(method="exact", num_hvps=op.size, num_operator_calls=-(-op.size // BLOCK),
                      residual_norm=float(torch.linalg.vector_norm(matrix @ x - v).detach()))
    return IHVPResult(x, stats)


METHOD = Method(name="exact", function=exact, settings=(DAMPING,),
                summary="dense solve of (H + ρI) x = v (small problems and tests)")
