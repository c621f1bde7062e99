"""How an IHVP method is declared: its function, its settings, whether it samples.

Every method module ends with one ``METHOD = Method(...)``; the registry
(:mod:`hg_dist.ihvp.registry`) lists them. Settings shared by several methods
(the damping ``rho``, the iteration budget) are declared here once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torch import Tensor

from hg_dist._checks import HALF_DTYPES, SUPPORTED_DTYPES
from hg_dist.hessian import HessianOperator, in_dtype
from hg_dist.ihvp._result import IHVPResult
from hg_dist.registry import Setting

__all__ = ["DAMPING", "ITERATIONS", "Method", "checks_rhs"]

DAMPING = Setting("rho", float, 0.0, "damping ρ added to the Hessian's diagonal: solve (H + ρI) x = v",
                  minimum=0.0)
"""``rho >= 0`` of the methods that solve ``(H + ρI) x = v`` (Nyström declares its own, ``> 0``)."""

ITERATIONS = Setting("num_iters", int, 10, "iterations, one Hessian-vector product each", minimum=1,
                     flag="ihvp-iters")
"""The iteration budget of the iterative methods (``--ihvp-iters``)."""


def checks_rhs(method: Callable[..., IHVPResult]) -> Callable[..., IHVPResult]:
    """Decorate ``method(op, v, ...)``: check ``v``, and solve a half-precision ``v`` in float32.

    ``v`` must be a float tensor of shape ``(op.size,)`` (``TypeError``/``ValueError``
    naming ``v`` otherwise). A float16/bfloat16 ``v`` (with an operator whose products
    are in that dtype, e.g. :func:`~hg_dist.hessian.linearize` of half-precision
    parameters) is solved in float32 — torch has no half-precision ``k×k`` solves, and
    the dot products and sums need the range — and the solution is cast back to
    ``v``'s dtype, as :func:`~hg_dist.hypergradient.implicit_hypergradient` does.
    """
    @functools.wraps(method)
    def checked(op: HessianOperator, v: Tensor, *args: Any, **kwargs: Any) -> IHVPResult:
        if not isinstance(v, Tensor):
            raise TypeError(f"v must be a torch.Tensor of shape ({op.size},), got {type(v).__name__}")
        if v.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"v has dtype {v.dtype}; it must be one of {', '.join(map(str, SUPPORTED_DTYPES))}")
        if tuple(v.shape) != (op.size,):
            raise ValueError(f"v has shape {tuple(v.shape)} but the operator is {op.size}×{op.size}; pass a flat "
                             f"vector of shape ({op.size},), e.g. hg_dist.utils.params_to_vector(grads)")
        if v.dtype not in HALF_DTYPES:
            return method(op, v, *args, **kwargs)
        solution, stats = method(in_dtype(op, v.dtype, torch.float32), v.float(), *args, **kwargs)
        return IHVPResult(solution.to(v.dtype), stats)

    return checked


@dataclass(frozen=True)
class Method:
    """An IHVP method as the registry knows it.

    Attributes:
        name: its key, e.g. ``"nystrom"``.
        function: ``function(op, v, **arguments) -> IHVPResult``.
        settings: what a spec may set, with types, defaults and ranges.
        randomized: takes ``generator=`` (a CPU ``torch.Generator``); every worker of a
            distributed run must give it the same seed.
        summary: one line for tables and ``--help``.
    """

    name: str
    function: Callable[..., Any]
    settings: tuple[Setting, ...]
    randomized: bool = False
    summary: str = ""

    def bind(self, spec: Mapping[str, Any], generator: torch.Generator | None = None) -> Callable[..., Any]:
        """``(op, v) -> IHVPResult`` with a *normalized* spec's settings bound."""
        arguments = {s.keyword: spec[s.name] for s in self.settings if s.keyword is not None}
        if self.randomized:
            arguments["generator"] = generator
        return functools.partial(self.function, **arguments)
