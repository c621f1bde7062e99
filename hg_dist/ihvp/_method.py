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

from hg_dist.registry import Setting

__all__ = ["DAMPING", "ITERATIONS", "Method"]

DAMPING = Setting("rho", float, 0.0, "damping ρ added to the Hessian's diagonal: solve (H + ρI) x = v",
                  minimum=0.0)
"""``rho >= 0`` of the methods that solve ``(H + ρI) x = v`` (Nyström declares its own, ``> 0``)."""

ITERATIONS = Setting("num_iters", int, 10, "iterations, one Hessian-vector product each", minimum=1,
                     flag="ihvp-iters")
"""The iteration budget of the iterative methods (``--ihvp-iters``)."""


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
