"""The inner Hessian as a linear operator, and the mixed second derivative.

For an inner objective ``f(θ, φ)`` at a point ``(θ, φ)``:

* ``H = ∂²f/∂θ²`` (``p×p``, ``p`` = number of inner scalars) is never formed. The
  gradient ``θ ↦ ∇_θ f(θ, φ)`` is linearized once with ``torch.func.vjp``; every
  product ``H v`` is then one vector-Jacobian product through that saved graph
  (``H`` is symmetric, so ``vᵀH = (Hv)ᵀ``), and ``k`` products at once are one
  ``vmap`` over the same function, run in chunks of columns (see
  :func:`auto_chunk_size`). This is what keeps a CG iteration at about one
  inner gradient of cost instead of recomputing the gradient inside every product.
* ``∂²f/∂φ∂θ · x`` (shaped like ``φ``) is one more VJP, of ``φ ↦ ∇_θ f(θ, φ)``.

The IHVP methods in :mod:`hg_dist.ihvp` see only :class:`HessianOperator`, so the
distributed layer can hand them an operator whose products end in an allreduce.
Chunking happens inside one ``matmat`` call, so it never changes the number of
operator calls (communication rounds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from hg_dist._checks import check_int
from hg_dist.utils import Objective, Params, num_elements, params_to_vector, vector_to_params

CHUNK_BUDGET_BYTES = 16 * 2 ** 20
"""CPU: ``chunk × g`` stays within this (16 MiB), ``g`` = bytes allocated building the gradient.

``g`` (forward activations plus backward temporaries of ``∇_θ f``, counted once per
:func:`linearize`) is a proxy for what one product ``H v`` allocates: for the MLPs
below a product allocates about ``2 g``, so the budget keeps a chunk's product
intermediates near 32 MiB, the L3 cache of the machine measured.

Measured on a 2-core AMD EPYC (2 MiB L2 per core, 32 MiB L3), torch 2.13, float64,
one thread, ``k = 20`` columns (``benchmarks/problems.py`` problems, ``n`` training
samples): speed-up of the batched products over a Python loop of ``matvec``
(> 1: batching wins; steady state, same operator reused), and the chunk size this
budget picks (bold: the picked size's speed-up where measured; chunk 5 in row 4: 1.08):

=======================  ========  =====  =======  =======  ========  =========
problem                  ``g``     rule   chunk 2  chunk 4  chunk 10  unchunked
=======================  ========  =====  =======  =======  ========  =========
logreg p=201, n=400      0.04 MiB  20     0.75     1.43     2.80      **4.63**
MLP p=4810, n=256        1.0 MiB   10     1.04     1.34     **1.61**  1.60
MLP p=1210, n=1024       1.1 MiB   10     1.04     1.28     **1.47**  1.48
MLP p=4810, n=1024       3.2 MiB   5      1.00     1.07     1.08      1.01
MLP p=19210, n=256       3.7 MiB   4      0.98     **1.07** 1.09      1.03
MLP p=19210, n=1024      11.5 MiB  loop   0.97     0.99     0.94      0.40
MLP p=76810, n=1024      45 MiB    loop   0.93     0.68     0.47      0.48
=======================  ========  =====  =======  =======  ========  =========

(``vmap(chunk_size=1)`` was 0.65–0.9× a loop, hence the loop.) Batching amortises
per-op overhead and shared reads (data, weights) over the columns while a chunk's
intermediates stay near cache size; past ~100 MiB the batched elementwise backward
ops are memory-bound and the batch is up to 2.5× slower than a loop. Timing a fresh
operator (build + one ``matmat``, as a hypergradient does) moved the optimum down:
unchunked at ``g = 1.0 MiB`` fell from 1.49× (chunk 10) to 1.38×, and 24 MiB budgets
made ``g = 11.5 MiB`` pick chunk 2 (0.96×); 16 MiB is the largest budget with no
measured case below the loop beyond noise (±5%). It halves one case: logistic regression with
``n = 20000`` (``g = 1.4 MiB``: 2 × 10 columns, 1.5× a loop instead of 3.7×
unchunked), where batching wins by reading the data once instead of per column.
"""

ACCELERATOR_CHUNK_BUDGET_BYTES = 2 ** 30
"""Non-CPU devices: 1 GiB per chunk. Not tuned for speed (batching is what GPUs are
fast at); it only bounds the memory of the batched intermediates."""


class HessianOperator(NamedTuple):
    """A symmetric ``p×p`` matrix known only through its products.

    Attributes:
        matvec: ``v ↦ H v`` for ``v`` of shape ``(p,)``.
        matmat: ``V ↦ H V`` for ``V`` of shape ``(p, k)``; all ``k`` products in one
            call (one communication round when distributed).
        size: ``p``.
    """

    matvec: Callable[[Tensor], Tensor]
    matmat: Callable[[Tensor], Tensor]
    size: int


class _NewTensorBytes(TorchDispatchMode):
    """Sums the bytes of every tensor the ops run under it create (views excluded).

    Outputs that alias an input (``view``, ``t``, ``expand``, in-place ops; their
    schema return carries alias info) allocate nothing and are not counted.
    """

    _fresh_outputs: dict = {}  # op → which of its returns are new tensors (schema lookups are slow)

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        fresh = self._fresh_outputs.get(func)
        if fresh is None:
            fresh = self._fresh_outputs[func] = tuple(ret.alias_info is None for ret in func._schema.returns)
        for is_fresh, tensor in zip(fresh, out if isinstance(out, (tuple, list)) else (out,)):
            if is_fresh and isinstance(tensor, Tensor):
                self.bytes += tensor.numel() * tensor.element_size()
        return out


def auto_chunk_size(num_columns: int, column_bytes: int, budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Columns per ``vmap`` chunk: at most ``clamp(budget_bytes // column_bytes, 1, num_columns)``.

    ``column_bytes`` is the size of one column's intermediates (:func:`linearize`
    passes the bytes allocated building the gradient, a proxy: one product
    allocates 1–2.3× that). A batch of ``c`` columns allocates about ``c · column_bytes``;
    batching amortises per-op overhead and shared reads (data, weights) over the
    columns, but once a chunk's intermediates outgrow the cache (``budget_bytes``,
    see :data:`CHUNK_BUDGET_BYTES` for the measurements) the batched products are
    memory-bound and slower than one at a time. The columns are then split into
    equal chunks (20 columns with a cap of 19: two chunks of 10, not 19 + 1), the
    same number of batches with a smaller peak. ``1`` means a loop of ``matvec``
    (faster than ``vmap(chunk_size=1)``); ``num_columns`` means one unchunked ``vmap``.
    """
    if num_columns <= 1:
        return 1
    most = max(1, min(num_columns, budget_bytes // max(column_bytes, 1)))
    num_chunks = -(-num_columns // most)
    return -(-num_columns // num_chunks)  # equal chunks: same count, smaller peak


def _products(matvec: Callable[[Tensor], Tensor], vs: Tensor, chunk_size: int) -> Tensor:
    """``[matvec(vs[:, 0]), …]`` as a ``(p, k)`` tensor, ``chunk_size`` columns per batch."""
    if vs.shape[1] == 0:
        return vs.clone()
    if chunk_size == 1:
        return torch.stack([matvec(v) for v in vs.unbind(dim=1)], dim=1)
    chunk = None if chunk_size >= vs.shape[1] else chunk_size
    return vmap(matvec, in_dims=1, out_dims=1, chunk_size=chunk)(vs)


def linearize(inner_obj: Objective, in_params: Params, out_params: Params, *,
              chunk_size: int | None = None) -> HessianOperator:
    """Build ``H = ∂²f/∂θ²`` at ``(in_params, out_params)`` as an operator.

    Cost: one inner gradient to build, then one VJP per product.

    Args:
        chunk_size: columns per batched product in ``matmat``. ``None`` (default)
            picks it automatically: the gradient is built under a dispatch mode
            that counts the bytes ``g`` of every tensor it allocates (views
            excluded), and each ``matmat`` of ``k`` columns then uses
            :func:`auto_chunk_size` — at most ``clamp(budget // g, 1, k)``
            columns per chunk, evened out — with a budget of 16 MiB on CPU
            (:data:`CHUNK_BUDGET_BYTES`, where the measurements are) and 1 GiB
            elsewhere. Small problems thus batch all ``k`` columns at once (4.6×
            faster than a loop at ``p = 201``), large ones fall back to a loop
            (unchunked was 2.5× slower than a loop at ``p = 19210, n = 1024``).
            Counting costs Python dispatch per op of the build, once: ~0.15 ms
            at ``p = 201``, ~0.3 ms at ``p = 1210–4810``, negligible for large
            problems. An int fixes the chunk size (``1``: a loop of ``matvec``;
            ``≥ k``: one unchunked ``vmap``) and skips the counting. ``matvec`` is
            unaffected. Either way ``matmat`` is one call, so one communication
            round when distributed.

    Raises:
        TypeError: if ``chunk_size`` is neither ``None`` nor an int.
        ValueError: if ``chunk_size < 1``.
    """
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, minimum=1,
                               hint="use None to choose it automatically, 1 for a loop of products")
    in_params, out_params = tuple(in_params), tuple(out_params)
    counter = _NewTensorBytes() if chunk_size is None else contextlib.nullcontext()
    with counter:
        _, grad_vjp = vjp(lambda theta: grad(inner_obj)(theta, out_params), in_params)
    if chunk_size is None:
        on_cpu = not in_params or in_params[0].device.type == "cpu"
        budget = CHUNK_BUDGET_BYTES if on_cpu else ACCELERATOR_CHUNK_BUDGET_BYTES
        graph_bytes = counter.bytes

    def matvec(v: Tensor) -> Tensor:
        return params_to_vector(grad_vjp(vector_to_params(v, in_params))[0])

    def matmat(vs: Tensor) -> Tensor:
        chunk = chunk_size if chunk_size is not None else auto_chunk_size(vs.shape[1], graph_bytes, budget)
        return _products(matvec, vs, chunk)

    return HessianOperator(matvec=matvec, matmat=matmat, size=num_elements(in_params))


def shifted(op: HessianOperator, rho: float) -> HessianOperator:
    """``H + ρI`` as an operator (``op`` itself when ``ρ = 0``).

    The one place the damping shift is applied: CG, Neumann and the dense solve
    work on ``shifted(op, rho)``; Nyström uses ``ρ`` inside its Woodbury formula.
    """
    if rho == 0:
        return op
    return HessianOperator(matvec=lambda v: op.matvec(v) + rho * v,
                           matmat=lambda vs: op.matmat(vs) + rho * vs,
                           size=op.size)


def mixed_vjp(inner_obj: Objective, in_params: Params, out_params: Params, x: Tensor) -> Params:
    """``∂²f/∂φ∂θ · x``: the derivative w.r.t. ``φ`` of ``⟨∇_θ f(θ, φ), x⟩``.

    Args:
        x: shape ``(p,)``, a flat vector over the inner parameters.

    Returns:
        A tuple shaped like ``out_params``.
    """
    in_params, out_params = tuple(in_params), tuple(out_params)
    _, phi_vjp = vjp(lambda phi: grad(inner_obj)(in_params, phi), out_params)
    return tuple(phi_vjp(vector_to_params(x, in_params))[0])
