"""The inner Hessian as a linear operator, and the mixed second derivative.

For an inner objective ``f(θ, φ)`` at a point ``(θ, φ)``:

* ``H = ∂²f/∂θ²`` (``p×p``, ``p`` = number of inner scalars) is never formed. The
  gradient ``g = ∇_θ f(θ, φ)`` is computed once with its graph kept; every product
  ``H v`` is then one reverse pass through that saved graph (reverse over reverse;
  ``H`` is symmetric, so ``vᵀH = (Hv)ᵀ``). This is what keeps a CG iteration at about
  one inner gradient of cost instead of recomputing the gradient inside every product.
  For detached parameters (what the hypergradient functions pass) the graph is plain
  autograd on detached leaves, and each pass asks for ``θ`` only (products) or ``φ``
  only (the mixed term); parameters that require grad are linearized with
  ``torch.func.vjp`` as they are, so that the products carry a graph back to them.
* A block of ``k`` products is computed as ``k`` *rows*: ``V H`` for ``V`` of shape
  ``(k, p)``, each row a contiguous tangent, in chunks of ``c`` rows (``c = 1``: a
  loop of single products; ``c ≥ 2``: one batched pass over ``c`` tangents). ``c`` is
  measured on first use and cached (:mod:`hg_dist.calibration`), so a block is never
  slower per product than the loop. Nyström's columns ``H[:, K]`` are asked for by
  index (:attr:`HessianOperator.rows`, ``H[K, :] = H[:, K]ᵀ``): the unit tangents
  are made one chunk at a time, so no ``p×k`` identity block is ever allocated.
* ``∂²f/∂φ∂θ · x`` (shaped like ``φ``) is one more reverse pass through the same graph.

Rows rather than columns, because a strided ``(p, k)`` block of tangents makes every
batched product slower; reverse over reverse rather than forward over reverse (``jvp``
of the gradient), because the latter recomputes the gradient per block. The numbers
behind both choices are in ``benchmarks/results/scaling.md``.

The IHVP methods in :mod:`hg_dist.ihvp` see only :class:`HessianOperator`, so the
distributed layer can hand them an operator whose products end in an allreduce.
Chunking happens inside one ``matmat`` / ``rows`` call, so it never changes the
number of operator calls (communication rounds).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from hg_dist._checks import check_int, check_params
from hg_dist.calibration import Calibration, calibration_for, calibration_key
from hg_dist.utils import Objective, Params, num_elements, params_to_vector, vector_to_params


class HessianOperator(NamedTuple):
    """A symmetric ``p×p`` matrix known only through its products.

    Attributes:
        matvec: ``v ↦ H v`` for ``v`` of shape ``(p,)``, returning a new tensor (the
            caller may modify it, e.g. :func:`shifted` adds ``ρv`` into it).
        matmat: ``V ↦ H V`` for ``V`` of shape ``(p, k)``, returning a new contiguous
            ``(p, k)``; all ``k`` products in one call (one communication round when
            distributed).
        size: ``p``.
        rows: ``K ↦ H[K, :]`` for ``k`` distinct int64 indices ``K`` (shape ``(k,)``),
            returning a new contiguous ``(k, p)`` tensor (``= H[:, K]ᵀ``); one call.
            ``None`` for an operator that has only ``matmat``: :func:`hessian_rows`
            then multiplies unit vectors.
        mixed: ``x ↦ ∂²f/∂φ∂θ · x`` (a tuple shaped like ``φ``) through the same saved
            graph as the products (see :func:`linearize`); ``None`` when the operator
            does not know ``f`` (then :func:`mixed_vjp` builds it). Not reduced or shifted:
            wrappers such as :func:`shifted` drop it.
    """

    matvec: Callable[[Tensor], Tensor]
    matmat: Callable[[Tensor], Tensor]
    size: int
    rows: Callable[[Tensor], Tensor] | None = None
    mixed: Callable[[Tensor], Params] | None = None


def hessian_rows(op: HessianOperator, indices: Tensor, like: Tensor) -> Tensor:
    """``H[K, :]``, shape ``(k, p)``: ``op.rows(K)``, or ``(H E_K)ᵀ`` through ``op.matmat``.

    The fallback builds the ``p×k`` unit block ``E_K`` in the dtype and on the device
    of ``like`` (one ``matmat`` call, so still one communication round).
    """
    if op.rows is not None:
        return op.rows(indices)
    unit = torch.zeros(op.size, indices.numel(), dtype=like.dtype, device=like.device)
    unit[indices, torch.arange(indices.numel(), device=like.device)] = 1
    return op.matmat(unit).T


def _synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall time measures them (no-op on CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _graph_only_if(needed: bool) -> torch.set_grad_enabled:
    """Grad mode for a pass through the saved graph: as the caller has it when an input requires grad,
    off otherwise (a ``torch.func`` VJP called with grad enabled builds its backward differentiably)."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and needed)


CANNOT_BATCH: set[tuple] = set()
"""Calibration keys (:func:`~hg_dist.calibration.calibration_key`) of models whose batched reverse
pass failed: their later operators go straight to the ``torch.func`` fallback instead of failing a
batched pass (after most of its work) once per operator."""


def _rows_to_params(rows: Tensor, like: Params) -> Params:
    """Split ``(c, p)`` rows into tensors of shape ``(c, *t.shape)`` for each ``t`` in ``like`` (views)."""
    out, start = [], 0
    for t in like:
        out.append(rows[:, start:start + t.numel()].reshape(rows.shape[0], *t.shape))
        start += t.numel()
    return tuple(out)


def _functional_graph(inner_obj: Objective, in_params: Params, out_params: Params) -> tuple[Callable, Callable, Callable]:
    """``(product, batched, mixed)`` through a ``torch.func`` VJP of ``(θ, φ) ↦ ∇_θ f``, taken at the
    parameters as they are: what carries a graph back to parameters that require grad."""
    _, joint_vjp = vjp(lambda theta, phi: grad(inner_obj)(theta, phi), in_params, out_params)

    def product(tangent: Params) -> Params:
        return tuple(joint_vjp(tangent)[0])

    def mixed(cotangent: Params) -> Params:
        return tuple(joint_vjp(cotangent)[1])

    return product, vmap(product), mixed


def _reverse_mode_graph(inner_obj: Objective, in_params: Params, out_params: Params) -> tuple[Callable, Callable,
                                                                                             Callable]:
    """``(product, batched, mixed)`` through one autograd graph of ``g = ∇_θ f`` on detached leaves.

    ``g`` is built once with ``create_graph``; ``H v = ∂⟨g, v⟩/∂θ`` and
    ``∂²f/∂φ∂θ · x = ∂⟨g, x⟩/∂φ`` are reverse passes through it that ask for ``θ`` only or
    ``φ`` only, so autograd walks only the part of the graph that leads there (a weight decay's
    ``φ`` reaches the gradient only through the penalty). A ``torch.func`` VJP of
    ``(θ, φ) ↦ g`` computes both parts every time: on the peers benchmark's MLP its products
    were 10% slower, and its mixed term cost a whole product. ``batched`` is the same pass
    over tangents with a leading dimension (``is_grads_batched``), or, for a model whose
    double backward cannot batch, a ``vmap`` of a :func:`_functional_graph` built once.
    A product is differentiable (``create_graph``) only when its tangent requires grad.
    """
    theta = tuple(t.detach().requires_grad_() for t in in_params)
    phi = tuple(t.detach().requires_grad_() for t in out_params)
    with torch.enable_grad():
        loss = inner_obj(theta, phi)
        grads = (torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True) if loss.requires_grad
                 else (None,) * len(theta))
    # Entries of g that do not depend on θ or φ (f linear or constant in a block) are left out.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    outputs = [grads[i] for i in live]

    def through(inputs: Params, cotangent: Params, batch: tuple[int, ...]) -> Params:
        result = (None,) * len(inputs)
        if outputs:
            # Grad mode is on here only when the cotangent requires grad (the callers' _graph_only_if).
            result = torch.autograd.grad(outputs, inputs, [cotangent[i] for i in live], retain_graph=True,
                                         create_graph=torch.is_grad_enabled(), allow_unused=True,
                                         is_grads_batched=bool(batch))
        return tuple(torch.zeros(*batch, *t.shape, dtype=t.dtype, device=t.device) if g is None else g
                     for g, t in zip(result, inputs))

    def product(tangent: Params) -> Params:
        return through(theta, tangent, ())

    fallback: Callable | None = None    # the torch.func batched product, built on first need
    key = calibration_key(in_params)

    def batched(tangents: Params) -> Params:
        nonlocal fallback
        if fallback is None and key not in CANNOT_BATCH:
            try:
                return through(theta, tangents, (tangents[0].shape[0],))
            except RuntimeError:
                # Some layers' double backward has no batching rule for is_grads_batched (BatchNorm,
                # GroupNorm: "The size of tensor a (8) must match the size of tensor b (2)"); a vmap of a
                # torch.func VJP handles them, at the cost of one more gradient graph, built once.
                CANNOT_BATCH.add(key)
        if fallback is None:
            fallback = _functional_graph(inner_obj, in_params, out_params)[1]
        return fallback(tangents)

    def mixed(cotangent: Params) -> Params:
        return through(phi, cotangent, ())

    return product, batched, mixed


class _BlockProducts:
    """``V H`` for row blocks ``V`` through one saved gradient graph, chunked by a :class:`Calibration`.

    ``product`` maps a tangent shaped like the parameters (``like``) to ``H v`` in that shape;
    ``batched`` maps tangents with a leading dimension ``c`` to their ``c`` products, with the
    same leading dimension. A chunk of ``c`` rows ``T`` (``(c, p)``, contiguous) becomes ``c``
    products, one ``batched`` call for ``c ≥ 2``, a ``product`` call for ``c = 1``; the
    per-parameter outputs are concatenated straight into the rows of the result.
    """

    def __init__(self, product: Callable[[Params], Params], batched: Callable[[Params], Params], like: Params,
                 calibration: Calibration, keeps_graph: bool) -> None:
        self._product = product
        self._batched = batched
        self.like = like
        self.keeps_graph = keeps_graph   # some parameter requires grad: products carry a graph back to it
        self.calibration = calibration
        self.warm = False  # the first product of an operator pays one-time costs: never timed
        self.size = num_elements(like)
        self.dtype = like[0].dtype
        self.device = like[0].device

    def product(self, v: Tensor) -> Params:
        """``H v`` for a flat ``v`` of shape ``(p,)``, as a tuple shaped like the parameters.

        Without grad mode when nothing asks for a graph (no parameter and not ``v`` requires
        grad): a ``torch.func`` VJP called with grad enabled builds its backward pass
        differentiably (``create_graph``), which measured 5–13% slower per product on the
        peers benchmark's ResNet-18 and MLP.
        """
        with _graph_only_if(self.keeps_graph or v.requires_grad):
            return self._product(vector_to_params(v, self.like))

    def _chunk(self, tangents: Tensor, out: Tensor) -> None:
        """``out = tangents H`` for ``(c, p)`` contiguous ``tangents`` into ``out`` (``(c, p)`` contiguous).

        Products that carry an autograd graph (parameters or tangents that require
        grad) are concatenated and then copied into ``out``, which records the copy
        in the graph: ``torch.cat(..., out=)`` is not differentiable.
        """
        c = tangents.shape[0]
        if c == 1:
            grads = [g.reshape(1, -1) for g in self.product(tangents[0])]
        else:
            with _graph_only_if(self.keeps_graph or tangents.requires_grad):
                grads = [g.reshape(c, -1) for g in self._batched(_rows_to_params(tangents, self.like))]
        if any(g.requires_grad for g in grads):
            out.copy_(torch.cat(grads, dim=1))
        else:
            torch.cat(grads, dim=1, out=out)

    def run(self, k: int, tangents: Callable[[int, int], Tensor], into: Callable[[int, int], Tensor],
            after: Callable[[int, int, Tensor], None] = lambda start, stop, rows: None) -> None:
        """Rows ``[0, k)`` of ``V H`` in chunks sized by the calibration.

        Chunk ``[a, b)`` reads its ``(b − a, p)`` tangents from ``tangents(a, b)``, writes
        the products into ``into(a, b)`` (a contiguous ``(b − a, p)`` tensor) and then
        calls ``after(a, b, that tensor)``. A timed chunk is timed through ``after``.
        """
        start = 0
        while start < k:
            if not self.warm and not self.calibration.done:
                size, timed = 1, False
            else:
                size, timed = self.calibration.next_size(k - start)
            self.warm = True
            stop = start + size
            began = time.perf_counter()
            out = into(start, stop)
            self._chunk(tangents(start, stop), out)
            after(start, stop, out)
            if timed:
                _synchronize(self.device)
                self.calibration.record(size, (time.perf_counter() - began) / size)
            start = stop

    def rows(self, indices: Tensor) -> Tensor:
        """``H[K, :]`` (``(k, p)``): unit tangents made one chunk at a time in a reused buffer,
        products written straight into the result's rows."""
        k = indices.numel()
        result = torch.empty(k, self.size, dtype=self.dtype, device=self.device)
        units = torch.zeros(0, self.size, dtype=self.dtype, device=self.device)

        def tangents(start: int, stop: int) -> Tensor:
            nonlocal units
            if units.shape[0] < stop - start:
                units = torch.zeros(stop - start, self.size, dtype=self.dtype, device=self.device)
            block = units[:stop - start]
            block.zero_()
            block[torch.arange(stop - start, device=self.device), indices[start:stop]] = 1
            return block

        self.run(k, tangents, lambda start, stop: result[start:stop])
        return result

    def matmat(self, vs: Tensor) -> Tensor:
        """``H V`` (``(p, k)``, contiguous) for ``V`` of shape ``(p, k)``: each chunk's columns are
        copied to contiguous rows, and its products copied back into columns."""
        result = torch.empty(vs.shape, dtype=vs.dtype, device=vs.device)

        def after(start: int, stop: int, rows: Tensor) -> None:
            result[:, start:stop] = rows.T

        self.run(vs.shape[1], lambda start, stop: vs[:, start:stop].T.contiguous(),
                 lambda start, stop: torch.empty(stop - start, self.size, dtype=self.dtype, device=self.device),
                 after)
        return result


def linearize(inner_obj: Objective, in_params: Params, out_params: Params, *,
              chunk_size: int | None = None) -> HessianOperator:
    """Build ``H = ∂²f/∂θ²`` at ``(in_params, out_params)`` as an operator.

    Cost: one inner gradient to build (the saved graph), then one reverse pass per product, and one
    for the mixed term (:attr:`HessianOperator.mixed`).

    Args:
        chunk_size: rows per batched product in ``matmat`` and ``rows``. ``None``
            (default) measures it: the chunk sizes ``1, 2, 4, …`` are timed on the
            first blocks of products computed for these parameter shapes, dtype,
            device and thread count, and the fastest is used from then on
            (:mod:`hg_dist.calibration`; one process-wide cache). An int fixes it
            (``1``: a loop of ``matvec``; ``≥ k``: one unchunked ``vmap``). ``matvec``
            is unaffected. Either way a block is one call, so one communication
            round when distributed.

    Parameters that require grad (an ``nn.Module``'s own) are taken as they are: the
    products then carry an autograd graph back to them, and their values are the
    same as for detached parameters.

    Raises:
        TypeError: if ``chunk_size`` is neither ``None`` nor an int; parameters that are
            not a tuple/list of float tensors on one dtype and device (see
            :func:`hg_dist._checks.check_params`).
        ValueError: if ``chunk_size < 1``; empty parameters.
    """
    if chunk_size is not None:
        chunk_size = check_int("chunk_size", chunk_size, minimum=1,
                               hint="use None to measure it, 1 for a loop of products")
    in_params, out_params = check_params(in_params, out_params)
    # One saved graph of ∇_θ f serves the products and the mixed term: the mixed term costs one
    # reverse pass, not another inner gradient.
    keeps_graph = any(t.requires_grad for t in (*in_params, *out_params))
    graph = _functional_graph if keeps_graph else _reverse_mode_graph
    product, batched, mixed_of = graph(inner_obj, in_params, out_params)
    calibration = calibration_for(in_params) if chunk_size is None else Calibration.fixed(chunk_size)
    blocks = _BlockProducts(product, batched, in_params, calibration, keeps_graph)

    def matvec(v: Tensor) -> Tensor:
        return params_to_vector(blocks.product(v))

    def matmat(vs: Tensor) -> Tensor:
        return blocks.matmat(vs)

    def mixed(x: Tensor) -> Params:
        with _graph_only_if(keeps_graph or x.requires_grad):
            return mixed_of(vector_to_params(x, in_params))

    return HessianOperator(matvec=matvec, matmat=matmat, size=num_elements(in_params), rows=blocks.rows,
                           mixed=mixed)


def in_dtype(op: HessianOperator, dtype: torch.dtype, work: torch.dtype) -> HessianOperator:
    """``op`` taking and returning ``work``-dtype vectors, its products computed in ``dtype``.

    How half-precision parameters are solved in float32: ``in_dtype(op, torch.float16, torch.float32)``.
    Each vector is scaled to a largest entry of 1 before it is cast, and its product scaled back
    (``H v = s · H (v / s)``, ``s = max |v|``): the small vectors of a converging solve (CG's
    residuals reach ``1e-8`` and below) would otherwise underflow to zero in float16, whose
    smallest normal number is ``6e-5``, and look like directions of zero curvature.
    """
    def scaled(product: Callable[[Tensor], Tensor], vs: Tensor, dim: int | None) -> Tensor:
        scale = vs.abs().amax() if dim is None else vs.abs().amax(dim=dim, keepdim=True)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return product((vs / scale).to(dtype)).to(work) * scale

    return HessianOperator(matvec=lambda v: scaled(op.matvec, v, None),
                           matmat=lambda vs: scaled(op.matmat, vs, 0),
                           size=op.size, rows=None if op.rows is None else (lambda k: op.rows(k).to(work)))


def shifted(op: HessianOperator, rho: float) -> HessianOperator:
    """``H + ρI`` as an operator (``op`` itself when ``ρ = 0``).

    The one place the damping shift is applied: CG, Neumann and the dense solve
    work on ``shifted(op, rho)``; Nyström uses ``ρ`` inside its Woodbury formula.
    """
    if rho == 0:
        return op

    def rows(indices: Tensor) -> Tensor:
        block = op.rows(indices)                                  # (k, p), ours to modify
        block[torch.arange(indices.numel(), device=block.device), indices] += rho
        return block

    # The products are new tensors (the operator contract): the shift is added into them in one fused kernel.
    return HessianOperator(matvec=lambda v: op.matvec(v).add_(v, alpha=rho),
                           matmat=lambda vs: op.matmat(vs).add_(vs, alpha=rho),
                           size=op.size, rows=None if op.rows is None else rows)


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
