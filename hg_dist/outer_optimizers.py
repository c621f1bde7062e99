"""The outer optimizers an experiment can name: one registry entry each.

A spec such as ``{"name": "adam", "lr": 0.05}`` becomes a ``torch.optim``
optimizer over the outer parameters with :func:`make_outer_optimizer`; its settings
are declared once here and drive the command-line flags (``--outer-lr`` ...) and
the Tune search spaces, as for the IHVP methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from hg_dist.registry import Registry, Setting

__all__ = ["OUTER_OPTIMIZERS", "OuterOptimizer", "make_outer_optimizer"]


@dataclass(frozen=True)
class OuterOptimizer:
    """An outer optimizer as the registry knows it: ``build(params, **arguments)`` and its settings."""

    name: str
    build: Callable[..., torch.optim.Optimizer]
    settings: tuple[Setting, ...]
    summary: str = ""


LR = Setting("lr", float, 0.1, "outer learning rate", minimum=0.0, flag="outer-lr")


def _sgd(params: Iterable[torch.Tensor], lr: float, momentum: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def _adam(params: Iterable[torch.Tensor], lr: float, beta1: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(beta1, 0.999))


OUTER_OPTIMIZERS: Registry[OuterOptimizer] = Registry("outer optimizer")
OUTER_OPTIMIZERS.register(OuterOptimizer(
    name="sgd", build=_sgd, summary="torch.optim.SGD",
    settings=(LR, Setting("momentum", float, 0.9, "SGD momentum", minimum=0.0, maximum=1.0,
                          exclusive_maximum=True, flag="outer-momentum"))))
OUTER_OPTIMIZERS.register(OuterOptimizer(
    name="adam", build=_adam, summary="torch.optim.Adam (β₂ = 0.999)",
    settings=(LR, Setting("beta1", float, 0.9, "Adam β₁", minimum=0.0, maximum=1.0, exclusive_maximum=True,
                          flag="outer-beta1"))))


def make_outer_optimizer(spec: Mapping[str, Any], params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names (e.g. ``{"name": "sgd", "lr": 0.1, "momentum": 0.9}``) over ``params``.

    Raises:
        ValueError / TypeError: unknown optimizer or an invalid setting, naming it.
    """
    spec = OUTER_OPTIMIZERS.normalize(spec)
    return OUTER_OPTIMIZERS[spec["name"]].build(params, **OUTER_OPTIMIZERS.arguments(spec))
