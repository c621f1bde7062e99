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
complement ``v − Q Qᵀv`` then carries ``ε₆₄‖v‖`` of noise, not ``ε₃₂‖v‖``. ``Q`` is
not formed (``Q = C T⁻¹`` with ``T`` from the Cholesky factor of ``CᵀC``): the solve
makes three passes over ``C`` converted to float64 a block of columns at a time, so
it costs ``O(pk²)`` flops and ``O(p)`` float64 memory beyond ``C``; only a ``C`` too
ill-conditioned for its Gram matrix takes a Householder QR with a float64 copy of
``C`` (``pk·8`` bytes). The result is returned in ``v``'s dtype. What float64
cannot fix is the rounding of the products themselves, about ``ε‖C‖`` per entry of
``C``: a shift below that floor regularises nothing but noise, and
:class:`NystromPrecisionWarning` names ``rho`` and the floor.

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
    float64. ``Q`` is never formed: with the Gram matrix ``G = CᵀC = TᵀT`` (Cholesky),
    ``Q = C T⁻¹``, so ``QQᵀv = C a`` with ``a = G⁻¹Cᵀv``, ``Qᵀv = T a`` and ``Q z = C T⁻¹ z``;
    every ``p``-long step is a pass over the rows in float64 chunks. The projection is
    refined once (``a += G⁻¹Cᵀ(v − C a)``), which keeps the complement ``v − C a`` at
    float64 rounding; a ``C`` worse conditioned than :data:`MAX_GRAM_CONDITION` (or
    rank-deficient) takes a Householder QR of ``C`` instead.
    Warns (:class:`NystromPrecisionWarning`) when ``rho < ε‖C‖₂`` in ``rows``' dtype.
    Returns a ``(p,)`` tensor in ``v``'s dtype.
    """
    k = rows.shape[0]
    v64 = v.to(torch.float64)
    gram = torch.zeros(k, k, dtype=torch.float64, device=v.device)
    cv = torch.zeros(k, dtype=torch.float64, device=v.device)
    for start, block in float64_blocks(rows):            # G = CᵀC, Cᵀv
        gram.addmm_(block, block.T)
        cv.addmv_(block, v64[start:start + block.shape[1]])
    t, norm_c = gram_cholesky(gram, MAX_GRAM_CONDITION.get(rows.dtype, 1e4))   # G = TᵀT, T upper (k, k)
    if t is None:
        x, norm_c = _woodbury_householder(rows, columns, v, rho)
        _warn_below_noise_floor(rho, rows.dtype, norm_c)
        return x
    a = torch.cholesky_solve(cv[:, None], t, upper=True)[:, 0]     # C a = projection of v
    complement = v64.clone()
    c_complement = torch.zeros_like(cv)
    for start, block in float64_blocks(rows):            # v − C a, and Cᵀ of it for the refinement
        part = complement[start:start + block.shape[1]]
        part.addmv_(block.T, a, alpha=-1)
        c_complement.addmv_(block, part)
    correction = torch.cholesky_solve(c_complement[:, None], t, upper=True)[:, 0]
    a += correction                                      # the complement is now v − C a (refined)
    w = _symmetric(rows[:, columns].to(torch.float64))   # (k, k): W = H[K, K]
    z = _core_solve(t, w, t @ a, rho)                    # (T W⁺ Tᵀ + ρI)⁻¹ Qᵀv
    y = torch.linalg.solve_triangular(t, z[:, None], upper=True)[:, 0]   # Q z = C y
    coefficients = y - correction / rho                  # x = C y + (complement − C correction)/ρ
    x = torch.empty_like(v)
    for start, block in float64_blocks(rows):
        end = start + block.shape[1]
        x[start:end] = torch.addmv(complement[start:end], block.T, coefficients, alpha=rho).div_(rho)
    _warn_below_noise_floor(rho, rows.dtype, norm_c)
    return x


MAX_GRAM_CONDITION = {torch.float64: 1e3, torch.float32: 1e4}
"""Largest ``cond(C)`` solved through the Gram matrix ``G = CᵀC``, by the columns' dtype (1e4 for half
precision); beyond it :func:`woodbury_solve` takes a Householder QR of ``C``. The Gram path adds an error
of order ``ε₆₄·cond(C)²`` to what the QR gives: below float32's own rounding of the columns up to 1e4;
for float64 columns, measured 1.6e-12 against the QR's 6.7e-13 at ``cond(C) = 2e3`` but 4.5e-10 against
7e-13 at 2e4 (``tests/test_ihvp.py``).
Columns sampled from a large Hessian are nearly orthogonal (``cond(C)`` 2–3 on the benchmarks' MLP)."""

_BLOCK_COLUMNS = 16384
"""Columns of ``Cᵀ`` converted to float64 at a time on the CPU (``k·16384·8`` bytes, a cache-sized block)."""

_ACCELERATOR_BLOCK_COLUMNS = 1 << 20
"""The same on an accelerator, where a block costs a kernel launch per operation and no cache is to be kept."""


def float64_blocks(rows: Tensor):
    """``(start, rows[:, start:start + n] in float64)`` for consecutive column blocks of a ``(k, p)``
    ``rows``: passes over a ``k×p`` block in float64 without a float64 copy of all of it."""
    size = _BLOCK_COLUMNS if rows.device.type == "cpu" else _ACCELERATOR_BLOCK_COLUMNS
    for start in range(0, rows.shape[1], size):
        yield start, rows[:, start:start + size].to(torch.float64)


def gram_cholesky(gram: Tensor, max_condition: float) -> tuple[Tensor | None, float]:
    """``(T, ‖A‖₂)`` for a Gram matrix ``gram = AᵀA`` (``k×k``): ``T`` upper with ``TᵀT = gram`` (so
    ``T``'s singular values are ``A``'s), or ``None`` when ``gram`` is not numerically positive definite
    or ``cond(A) > max_condition``, where a Householder QR of ``A`` is the way. One host sync."""
    t, info = torch.linalg.cholesky_ex(gram, upper=True)
    factored = info == 0
    # A failed factor may hold anything: its singular values are read off the identity instead.
    checked = torch.where(factored, t.detach(), torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
    singular = torch.linalg.svdvals(checked)
    ok, largest, smallest = torch.stack([factored.to(singular.dtype), singular[0], singular[-1]]).tolist()
    if not ok or not smallest * max_condition > largest:
        return None, largest
    return t, largest


def _symmetric(w: Tensor) -> Tensor:
    return (w + w.T) / 2


def _core_solve(t: Tensor, w: Tensor, qtv: Tensor, rho: float) -> Tensor:
    """``z = (T W⁺ Tᵀ + ρI)⁻¹ Qᵀv`` from the ``2k×2k`` block system of the module docstring."""
    k = qtv.numel()
    eye = torch.eye(k, dtype=torch.float64, device=qtv.device)
    block = torch.cat([torch.cat([t, rho * eye], dim=1), torch.cat([w, -t.T], dim=1)])  # (2k, 2k)
    rhs = torch.cat([qtv, torch.zeros_like(qtv)])
    solution, info = torch.linalg.solve_ex(block, rhs)
    if int(info) != 0:
        solution = torch.linalg.pinv(block) @ rhs
    return solution[k:]


def _warn_below_noise_floor(rho: float, dtype: torch.dtype, norm_c: float) -> None:
    floor = torch.finfo(dtype).eps * norm_c
    if rho < floor:
        # One significant digit keeps the text the same from one call to the next, so Python shows it once.
        warnings.warn(f"nystrom: rho={rho:.3g} is below the rounding noise of the Hessian columns in "
                      f"{str(dtype).removeprefix('torch.')}, eps·‖C‖ ≈ {floor:.0e}, so the solution is "
                      f"dominated by that noise; raise rho above {floor:.0e} (e.g. rho={_suggest(norm_c):.0e}, "
                      f"about 1e-3·‖H‖) or compute the Hessian products in float64",
                      NystromPrecisionWarning, stacklevel=4)   # nystrom's caller


def _woodbury_householder(rows: Tensor, columns: Tensor, v: Tensor, rho: float) -> tuple[Tensor, float]:
    """:func:`woodbury_solve` through a Householder QR of ``C`` in float64 (any rank, ``pk·8`` bytes more),
    and ``‖C‖₂``."""
    r = rows.to(torch.float64)
    v64 = v.to(torch.float64)
    q, t = torch.linalg.qr(r.T)                           # C = Q T: Q (p, k), T (k, k)
    a = q.T @ v64                                         # (k,): Qᵀv
    z = _core_solve(t, _symmetric(r[:, columns]), a, rho)
    x = q @ z + (v64 - q @ a) / rho                       # Q(TW⁺Tᵀ + ρI)⁻¹a + (I − QQᵀ)v/ρ
    return x.to(v.dtype), float(torch.linalg.matrix_norm(t, ord=2))   # ‖C‖₂ = ‖T‖₂


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
