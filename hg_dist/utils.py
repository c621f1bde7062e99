"""Tuple-of-tensor helpers shared by every layer.

Parameters travel as ``Params``: a tuple of tensors, the form ``torch.func``
transforms take and return. The linear algebra of the IHVP methods works on one
flat vector of length ``p = sum(t.numel() for t in params)``; ``params_to_vector``
and ``vector_to_params`` convert between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

Params: TypeAlias = tuple[Tensor, ...]
"""Parameters of a functional model: a tuple of tensors."""

Objective: TypeAlias = Callable[[Params, Params], Tensor]
"""A scalar loss of ``(inner_params, outer_params)``."""


def foreach(p1: Sequence[Tensor],
            p2: Sequence[Tensor],
            op: Callable[[Tensor, Tensor], Tensor],
            alpha: float | Tensor = 1
            ) -> Params:
    """Apply ``op(a, alpha * b)`` leaf by leaf: ``(op(p1[0], alpha*p2[0]), ...)``.

    Raises:
        ValueError: if ``p1`` and ``p2`` differ in length or in a leaf's shape.
    """
    check_same_structure(p1, p2, "p1", "p2")
    return tuple(op(a, alpha * b) for a, b in zip(p1, p2))


def check_same_structure(p1: Sequence[Tensor], p2: Sequence[Tensor], name1: str, name2: str) -> None:
    """Raise ``ValueError`` unless ``p1`` and ``p2`` have the same number of leaves and shapes."""
    if len(p1) != len(p2):
        raise ValueError(f"{name1} has {len(p1)} tensors but {name2} has {len(p2)}; "
                         f"pass tuples with one tensor per parameter, in the same order")
    for i, (a, b) in enumerate(zip(p1, p2)):
        if a.shape != b.shape:
            raise ValueError(f"{name1}[{i}] has shape {tuple(a.shape)} but {name2}[{i}] has shape "
                             f"{tuple(b.shape)}; the two must describe the same parameters")


def num_elements(params: Sequence[Tensor]) -> int:
    """Total number of scalars ``p`` in ``params``."""
    return sum(t.numel() for t in params)


def params_to_vector(params: Sequence[Tensor]) -> Tensor:
    """Concatenate the flattened leaves of ``params`` into one vector of shape ``(p,)``."""
    return torch.cat([t.reshape(-1) for t in params])


def vector_to_params(vec: Tensor, like: Sequence[Tensor]) -> Params:
    """Split ``vec`` of shape ``(p,)`` (or ``(p, *batch)``) into tensors shaped like ``like``.

    Trailing batch dimensions are kept: a ``(p, k)`` matrix becomes leaves of shape
    ``(*leaf.shape, k)``.
    """
    expected = num_elements(like)
    if vec.shape[0] != expected:
        raise ValueError(f"vec has {vec.shape[0]} entries along dim 0 but the parameters "
                         f"hold {expected}; pass a vector made by params_to_vector")
    batch = vec.shape[1:]
    out, start = [], 0
    for t in like:
        n = t.numel()
        out.append(vec[start:start + n].reshape(tuple(t.shape) + tuple(batch)))
        start += n
    return tuple(out)


vector_to_tree = vector_to_params  # the seed library's name


def grad_and_value(f: Callable[..., Tensor], params: Params, *args: Any) -> tuple[Params, Tensor]:
    """``(∇_θ f(θ, *args), f(θ, *args))`` by plain reverse mode on detached leaves.

    Unlike ``torch.func.grad_and_value`` no double-backward-ready graph is kept and
    fused backward kernels (e.g. GroupNorm's) are used, so one step costs what
    ``loss.backward()`` costs. The gradient is not differentiable: unrolled solvers,
    which need the graph through the step, differentiate their own way. Parameters
    ``f`` does not use get zero gradients. The returned loss is detached.
    """
    with torch.enable_grad():
        leaves = tuple(p.detach().requires_grad_() for p in params)
        loss = f(leaves, *args)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return grads, loss.detach()


def hvp(f: Callable[[Params], Tensor],
        primal: Params,
        tangent: Params,
        *,
        rev_only: bool = False
        ) -> Params:
    """One Hessian-vector product ``∇²f(primal) · tangent``.

    Forward-over-reverse (``jvp`` of ``grad``) by default; reverse-over-reverse
    (``vjp`` of ``grad``) with ``rev_only=True``, for operations without
    forward-mode support. For many products at one point, build the operator once
    with :func:`hg_dist.hessian.linearize` instead: it reuses the gradient graph.
    """
    primal, tangent = tuple(primal), tuple(tangent)
    check_same_structure(primal, tangent, "primal", "tangent")
    if rev_only:
        _, vjp_fn = vjp(grad(f), primal)
        return tuple(vjp_fn(tangent)[0])
    return tuple(jvp(grad(f), (primal,), (tangent,))[1])


_RUNNING_STATS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
                  nn.InstanceNorm2d, nn.InstanceNorm3d)


def check_no_running_stats(module: nn.Module, name: str = "inner") -> None:
    """Raise ``ValueError`` if ``module`` holds a normalization layer that updates running statistics.

    A BatchNorm (or InstanceNorm with ``track_running_stats=True``) in training mode
    writes its running mean and variance in place during every forward pass;
    ``torch.func`` transforms (the inner gradients, Hessian-vector products and
    mixed products of implicit differentiation) cannot mutate a tensor they
    captured, and fail with an internal error about it. The message names the
    layer and the three ways out.
    """
    for path, layer in module.named_modules():
        if isinstance(layer, _RUNNING_STATS) and layer.training and layer.track_running_stats:
            where = f"{name}.{path}" if path else name
            kind = type(layer).__name__
            raise ValueError(
                f"{where} is a {kind} in training mode that updates its running statistics in place, which "
                f"torch.func (inner gradients and Hessian-vector products) cannot do; use nn.GroupNorm(num_groups, "
                f"channels) instead (as hg_dist.vision.models does), or {kind}(..., track_running_stats=False) "
                f"(batch statistics only), or put the layer in eval mode ({where}.eval()) to use fixed statistics")


def make_functional(module: nn.Module,
                    disable_autograd_tracking: bool = False
                    ) -> tuple[Callable[..., Tensor], Params]:
    """Split ``module`` into a pure function and its parameters.

    Returns ``(func, params)`` with ``func(params, *inputs) == module(*inputs)`` when
    ``params`` are the module's own; any other tuple of the same shapes may be passed.
    Buffers (e.g. batch-norm statistics) are taken from the module. Built on
    ``torch.func.functional_call``; a drop-in for ``functorch.make_functional``.

    Args:
        module: the model. It is used by reference, not copied.
        disable_autograd_tracking: return detached parameters (no ``requires_grad``).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    names = tuple(name for name, _ in module.named_parameters())
    params = tuple(p.detach() if disable_autograd_tracking else p for _, p in module.named_parameters())

    def func(params: Sequence[Tensor], *inputs, **kwargs) -> Tensor:
        if len(params) != len(names):
            raise ValueError(f"expected {len(names)} parameter tensors for "
                             f"{type(module).__name__}, got {len(params)}")
        return functional_call(module, dict(zip(names, params)), inputs, kwargs)

    return func, params


def map_tensors(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """Apply ``fn`` to every tensor in nested tuples / NamedTuples / lists / dicts."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(map_tensors(fn, t) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tensors(fn, t) for t in tree)
    if isinstance(tree, Mapping):
        return {k: map_tensors(fn, v) for k, v in tree.items()}
    return tree


def detached(tree: Any) -> Any:
    """``tree`` with every tensor detached (no copy)."""
    return map_tensors(Tensor.detach, tree)
