"""Gradient averaging over ``torch.distributed``, DDP-style: buckets launched from backward hooks.

Data-parallel inner steps need ``mean_r ∇_θ f_r`` (and, for the record, ``mean_r f_r``)
on every rank. Waiting for the whole backward and then reducing one flat vector leaves
the network idle during backward and the CPU idle during the reduction.
:class:`BucketedGradMean` does what ``DistributedDataParallel``'s reducer does:

* the parameters are split, in *reverse* order (the order backward produces their
  gradients), into buckets of about ``bucket_bytes``, each a slice of one flat
  buffer allocated once;
* every parameter gets a tensor hook for the step: when its gradient is ready the hook
  writes ``grad / W`` straight into its slot (one fused pass, the only copy) and hands
  autograd the slot instead, so the fresh gradient is freed at once;
* when all gradients of a bucket are in, the bucket's asynchronous ``all_reduce`` (sum)
  is launched while backward goes on with the earlier layers; buckets are launched in
  index order on every rank, so the collectives match across ranks;
* the loss rides in one extra slot of the first bucket (``f_r / W``, written before
  backward starts): the mean loss costs no extra round and no copy of the gradients.

After backward, :meth:`BucketedGradMean.grad_and_value` waits for the buckets and returns
views of the buffer: ``(mean_r ∇_θ f_r, mean_r f_r)``. ``W = 2`` with shards of equal
size therefore equals one process on the union batch up to summation order
(dividing by ``W = 2`` is exact).

Gradients computed with ``torch.func`` do not go through tensor hooks: a seed-style
``inner_update`` that calls ``torch.func.grad_and_value`` itself hands its finished
gradients to :class:`FlatGradMean`, one allreduce of one preallocated flat buffer (the
gradients and the loss scaled into it in one pass each, no cat, clone or divide copies).

Both return views of buffers that the next call overwrites: consume the gradients (an
optimizer step) before the next call, and do not keep them as state (the in-place
optimizers ``diff_sgd_`` / ``diff_adam_`` copy; the pure ``diff_sgd`` with momentum keeps
its first gradient as the momentum buffer, so pass it ``tuple(g.clone() for g in grads)``)::

    mean = BucketedGradMean(params)                      # once, from the inner parameters
    grads, loss = mean.grad_and_value(f, params, *args)  # each step: f(params, *args) -> scalar

    flat = FlatGradMean(params)                          # seed-style updates
    grads, loss = flat(grads, loss)

The solvers use them through :class:`TorchGradientMean`, the
:class:`~hg_dist.collective.GradientMean` that
:meth:`~hg_dist.distributed.collectives.TorchDistributed.gradient_mean` returns: the default
``inner_update`` of :class:`~hg_dist.solver.BaseImplicitSolver` takes the bucketed
``grad_and_value``, and :meth:`~hg_dist.solver.BaseSolver.mean_gradients` the flat mean
(copying what it returns, which the caller may keep).

``group=None`` is the default process group (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hg_dist.collective import AllreduceGradientMean, CommStats

__all__ = ["BucketedGradMean", "FlatGradMean", "TorchGradientMean", "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 25 * 2 ** 20
"""DDP's default bucket capacity (25 MiB)."""


def _world(group: Any) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised; call torch.distributed.init_process_group "
                           "first (Ray Train's TorchTrainer does it on every worker)")
    return dist.get_world_size(group)


def _check_params(params: Sequence[Tensor]) -> tuple[Tensor, ...]:
    params = tuple(params)
    if not params or not all(isinstance(p, Tensor) for p in params):
        raise TypeError("params must be a non-empty sequence of tensors (the inner parameters)")
    first = params[0]
    for i, p in enumerate(params):
        if p.dtype != first.dtype or p.device != first.device:
            raise ValueError(f"params[{i}] is {p.dtype} on {p.device} but params[0] is {first.dtype} on "
                             f"{first.device}; all inner parameters must share one dtype and device")
    return params


class BucketedGradMean:
    """Mean gradients and loss over the ranks, reduced in buckets overlapped with backward.

    Args:
        params: the parameters (or tensors shaped like them), to size the buffer.
        bucket_bytes: capacity of a bucket (a parameter larger than it gets a bucket of its own).
        group: the process group (``None``: the default one).

    Attributes:
        buckets: ``[(start, stop)]`` element ranges of the flat buffer, in launch order;
            bucket 0 holds the last parameters and, at its end, the loss slot.
    """

    def __init__(self, params: Sequence[Tensor], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 group: Any = None) -> None:
        params = _check_params(params)
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}; e.g. 25 * 2**20")
        self.group = group
        self.world_size = _world(group)
        self.shapes = [p.shape for p in params]
        element = params[0].element_size()
        members: list[list[int]] = [[]]                 # parameter indices of each bucket, in launch order
        size = 0
        for i in range(len(params) - 1, -1, -1):       # backward produces the last parameters first
            n = params[i].numel()
            if members[-1] and (size + n) * element > bucket_bytes:
                members.append([])
                size = 0
            members[-1].append(i)
            size += n
        offsets = [0] * len(params)
        self.bucket_of = [0] * len(params)
        self.buckets: list[tuple[int, int]] = []
        position = 0
        for k, bucket in enumerate(members):
            start = position
            for i in bucket:
                offsets[i], self.bucket_of[i] = position, k
                position += params[i].numel()
            if k == 0:
                self.loss_index = position             # bucket 0 ends with the loss slot
                position += 1
            self.buckets.append((start, position))
        self.sizes = [len(bucket) for bucket in members]
        self.buffer = torch.empty(position, dtype=params[0].dtype, device=params[0].device)
        self.views = tuple(self.buffer[o:o + p.numel()].view(p.shape) for o, p in zip(offsets, params))

    def grad_and_value(self, f: Callable[..., Tensor], params: Sequence[Tensor],
                       *args: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        """``(mean_r ∇_θ f_r, mean_r f_r)`` for ``f_r = f(params, *args)`` on this rank's ``args``.

        Reverse mode on detached leaves (no graph through the result); parameters ``f``
        does not use get zero gradients. Returns views of the buffer (valid until the next call).
        """
        params = tuple(params)
        if [p.shape for p in params] != self.shapes:
            raise ValueError("params must have the shapes this BucketedGradMean was built for")
        scale = 1.0 / self.world_size
        pending = list(self.sizes)
        filled = [False] * len(params)
        works: list[Any] = []

        def launch_ready() -> None:
            while len(works) < len(self.buckets) and pending[len(works)] == 0:
                start, stop = self.buckets[len(works)]
                works.append(dist.all_reduce(self.buffer[start:stop], group=self.group, async_op=True))

        def hook_for(i: int) -> Callable[[Tensor], Tensor]:
            view = self.views[i]

            def hook(grad: Tensor) -> Tensor:
                torch.mul(grad, scale, out=view)         # the one copy, scaled on the way
                filled[i] = True
                pending[self.bucket_of[i]] -= 1
                launch_ready()
                return view

            return hook

        with torch.enable_grad():
            leaves = tuple(p.detach().requires_grad_() for p in params)
            for i, leaf in enumerate(leaves):
                leaf.register_hook(hook_for(i))
            loss = f(leaves, *args)
            with torch.no_grad():
                self.buffer[self.loss_index] = loss.detach() * scale
            torch.autograd.grad(loss, leaves, allow_unused=True)
        for i, done in enumerate(filled):            # unused parameters: zero gradients, then launch the rest
            if not done:
                self.views[i].zero_()
                pending[self.bucket_of[i]] -= 1
        launch_ready()
        for work in works:
            work.wait()
        return self.views, self.buffer[self.loss_index]


class FlatGradMean:
    """Mean of finished gradients and a loss over the ranks: one allreduce of one preallocated buffer.

    For gradients that did not come through :class:`BucketedGradMean`'s hooks (e.g. from
    ``torch.func``). Each call writes ``grad / W`` and ``loss / W`` into the buffer (one pass),
    sums it over the ranks in place and returns views of it (valid until the next call).
    """

    def __init__(self, params: Sequence[Tensor], *, group: Any = None) -> None:
        params = _check_params(params)
        self.group = group
        self.world_size = _world(group)
        self.shapes = [p.shape for p in params]
        total = sum(p.numel() for p in params)
        self.buffer = torch.empty(total + 1, dtype=params[0].dtype, device=params[0].device)
        self.views = tuple(torch.split(self.buffer[:total], [p.numel() for p in params]))
        self.views = tuple(v.view(s) for v, s in zip(self.views, self.shapes))

    def __call__(self, grads: Sequence[Tensor], loss: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        grads = tuple(grads)
        if [g.shape for g in grads] != self.shapes:
            raise ValueError("grads must have the shapes this FlatGradMean was built for")
        scale = 1.0 / self.world_size
        with torch.no_grad():
            for view, grad in zip(self.views, grads):
                torch.mul(grad, scale, out=view)
            self.buffer[-1] = loss.detach() * scale
        dist.all_reduce(self.buffer, group=self.group)
        return self.views, self.buffer[-1]


class TorchGradientMean:
    """The :class:`~hg_dist.collective.GradientMean` of :class:`~hg_dist.distributed.collectives.TorchDistributed`.

    ``grad_and_value`` is :class:`BucketedGradMean`'s; ``averager(grads, loss)`` is
    :class:`FlatGradMean`'s, except for gradients it cannot take copy-free — ones
    that require grad (an unrolled step, whose graph must run through the
    reduction), of mixed dtypes or devices, or shaped unlike the first ones it took —
    which go to ``fallback``. Each buffer is allocated at its first use, for the
    shapes of that call. Results are views of the buffers (``reuses_buffers =
    True``). ``last`` counts one round per bucket (one for the flat mean) and the
    buffer's bytes.

    Args:
        fallback: the mean for what the flat buffer cannot take.
        bucket_bytes: capacity of a bucket.
        group: the process group (``None``: the default one).
    """

    reuses_buffers = True

    def __init__(self, *, fallback: AllreduceGradientMean, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 group: Any = None) -> None:
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}; e.g. 25 * 2**20")
        self.bucket_bytes = bucket_bytes
        self.group = group
        self.fallback = fallback
        self.bucketed: BucketedGradMean | None = None
        self.flat: FlatGradMean | None = None
        self.last = CommStats()

    def grad_and_value(self, f: Callable[..., Tensor], params: Sequence[Tensor],
                       *args: Any) -> tuple[tuple[Tensor, ...], Tensor]:
        if self.bucketed is None:
            self.bucketed = BucketedGradMean(params, bucket_bytes=self.bucket_bytes, group=self.group)
        grads, loss = self.bucketed.grad_and_value(f, params, *args)
        buffer = self.bucketed.buffer
        self.last = CommStats(len(self.bucketed.buckets), buffer.numel() * buffer.element_size())
        return grads, loss

    def __call__(self, grads: Sequence[Tensor],
                 loss: Tensor | None = None) -> tuple[tuple[Tensor, ...], Tensor | None]:
        grads = tuple(grads)
        if self.flat is None and _flat_ready(grads):
            self.flat = FlatGradMean(grads, group=self.group)
        flat = self.flat
        if flat is None or not _flat_ready(grads) or [g.shape for g in grads] != flat.shapes or (
                grads[0].dtype != flat.buffer.dtype or grads[0].device != flat.buffer.device):
            out = self.fallback(grads, loss)
            self.last = self.fallback.last
            return out
        value = torch.zeros((), dtype=flat.buffer.dtype, device=flat.buffer.device) if loss is None else loss
        mean, mean_loss = flat(grads, value)
        self.last = CommStats(1, flat.buffer.numel() * flat.buffer.element_size())
        return mean, (None if loss is None else mean_loss.to(loss.dtype))


def _flat_ready(grads: tuple[Tensor, ...]) -> bool:
    """Whether ``grads`` can go through a :class:`FlatGradMean`: one dtype and device, no graph to keep."""
    return bool(grads) and all(g.dtype == grads[0].dtype and g.device == grads[0].device and not g.requires_grad
                               for g in grads)
