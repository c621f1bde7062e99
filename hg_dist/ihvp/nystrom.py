"""Nyström (column-sampling) approximation of ``(H + ρI)⁻¹ v``.

Sample ``k`` coordinates ``K``; ``C = H[:, K]`` (``p×k``, the ``k`` products
``H e_i`` computed in *one* operator call) and ``W = H[K, K] = C[K]`` (``k×k``) give
the low-rank approximation ``H ≈ C W⁺ Cᵀ``. By the Woodbury identity::

    (C W⁺ Cᵀ + ρI)⁻¹ v = (v − C (ρW + CᵀC)⁻¹ Cᵀ v) / ρ

so only a ``k×k`` system is solved. With ``k = p`` (all coordinates) this is
exactly ``(H + ρI)⁻¹ v``. Cost: ``k`` products in one operator call, ``O(pk²)``
flops, ``O(pk)`` memory. The single call is what makes the distributed variant
need a number of communication rounds independent of ``k``.

Precision. In the form above the difference ``v − C(…)`` cancels (exactly so at
``k = p``, where ``v`` lies in the range of ``C``) and its rounding noise, about
``ε‖v‖``, is divided by ρ: in float32 the error is ``ε₃₂‖H‖/ρ`` relative, 100% at
``ρ ≈ 1e-7‖H‖``. The solve therefore splits ``v`` along an orthonormal basis ``Q`` of
the range of ``C`` (``C = QT``, thin QR), where ``C W⁺ Cᵀ = Q (T W⁺ Tᵀ) Qᵀ``::

    (C W⁺ Cᵀ + ρI)⁻¹ v = Q (T W⁺ Tᵀ + ρI)⁻¹ Qᵀv + (v − Q Qᵀv) / ρ
    (T W⁺ Tᵀ + ρI)⁻¹ a = z,   where   [T  ρI] [u]   [a]
                                      [W −Tᵀ] [z] = [0]      (2k×2k)

The block system is Woodbury without its division: eliminating ``z = (a − Tu)/ρ``
gives ``(ρW + TᵀT) u = Tᵀa``, and ``Wu = Tᵀz`` gives ``z = T⁻ᵀ W u`` when ``T`` is
invertible. It needs neither ``W⁻¹`` nor a division by ρ (its Schur complement is
``(ρW + TᵀT)/ρ``, so it is singular exactly when Woodbury's core is). All of it is
computed in float64 (the rows of a float32 ``C`` are exact in float64): the
complement ``v − Q Qᵀv`` then carries ``ε₆₄‖v‖`` of noise, not ``ε₃₂‖v‖``. The price
is a float64 copy of ``C`` (``pk·8`` bytes) for the duration of the solve; the
result is returned in ``v``'s dtype. What float64 cannot fix is the rounding of the
products themselves, about ``ε‖C‖`` per entry of ``C``: a shift below that floor
regularises nothing but noise, and :class:`NystromPrecisionWarning` names ``rho``
and the floor.

``C`` is held as its transpose, the rows ``R = Cᵀ = H[K, :]`` (``(k, p)``, contiguous,
``pk·4`` bytes in float32), which the operator computes by index
(:func:`~hg_dist.hessian.hessian_rows`) without a ``p×k`` block of unit vectors.
"""

from __future__ import annotations

import warnings

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


class NystromPrecisionWarning(RuntimeWarning):
    """``rho`` is below the rounding noise ``ε‖C‖`` of the Hessian columns (see the module docstring)."""


def woodbury_solve(rows: Tensor, columns: Tensor, v: Tensor, rho: float) -> Tensor:
    """``(C W⁺ Cᵀ + ρI)⁻¹ v`` from ``rows = Cᵀ`` (``(k, p)``) and ``W = C[columns]``, in float64.

    See the module docstring for the split along ``Q`` and why it is computed in
    float64. Warns (:class:`NystromPrecisionWarning`) when ``rho < ε‖C‖₂`` in
    ``rows``' dtype. Returns a ``(p,)`` tensor in ``v``'s dtype.
    """
    r = rows.to(torch.float64)
    v64 = v.to(torch.float64)
    q, t = torch.linalg.qr(r.T)                           # C = Q T: Q (p, k), T (k, k)
    w = r[:, columns]                                     # (k, k): W = H[K, K]
    w = (w + w.T) / 2
    a = q.T @ v64                                         # (k,): Qᵀv
    k = a.numel()
    eye = torch.eye(k, dtype=torch.float64, device=v.device)
    block = torch.cat([torch.cat([t, rho * eye], dim=1), torch.cat([w, -t.T], dim=1)])  # (2k, 2k)
    rhs = torch.cat([a, torch.zeros_like(a)])
    solution, info = torch.linalg.solve_ex(block, rhs)
    norm_c = torch.linalg.matrix_norm(t, ord=2)           # ‖C‖₂ = ‖T‖₂
    info, norm_c = int(info), float(norm_c)               # one host sync
    if info != 0:
        solution = torch.linalg.pinv(block) @ rhs
    z = solution[k:]                                      # (T W⁺ Tᵀ + ρI)⁻¹ a
    floor = torch.finfo(rows.dtype).eps * norm_c
    if rho < floor:
        # One significant digit keeps the text the same from one call to the next, so Python shows it once.
        warnings.warn(f"nystrom: rho={rho:.3g} is below the rounding noise of the Hessian columns in "
                      f"{str(rows.dtype).removeprefix('torch.')}, eps·‖C‖ ≈ {floor:.0e}, so the solution is "
                      f"dominated by that noise; raise rho above {floor:.0e} (e.g. rho={_suggest(norm_c):.0e}, "
                      f"about 1e-3·‖H‖) or compute the Hessian products in float64",
                      NystromPrecisionWarning, stacklevel=3)
    x = q @ z + (v64 - q @ a) / rho                       # Q(TW⁺Tᵀ + ρI)⁻¹a + (I − QQᵀ)v/ρ
    return x.to(v.dtype)


def _suggest(norm_c: float) -> float:
    """A shift well above the noise floor: ``1e-3·‖C‖`` (``‖C‖ ≈ ‖H‖`` for a good sample), or 1e-3 if ``C = 0``."""
    return 1e-3 * norm_c if norm_c > 0 else 1e-3


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
    x = woodbury_solve(r, columns, v, rho)
    stats = IHVPStats(method="nystrom", num_hvps=rank, num_operator_calls=1)
    return IHVPResult(x, stats)


METHOD = Method(name="nystrom", function=nystrom, randomized=True, settings=(RANK, SHIFT),
                summary="k sampled Hessian columns + Woodbury, (C W⁺ Cᵀ + ρI)⁻¹ v")
