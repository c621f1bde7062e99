"""The value every IHVP method returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class IHVPStats:
    """What one IHVP solve cost and how well it did.

    Attributes:
        method: the method's name, e.g. ``"cg"``.
        num_hvps: Hessian-vector products computed (a batch of ``k`` counts ``k``).
        num_operator_calls: calls into the Hessian operator; each is one
            communication round when the operator is distributed.
        iterations: iterations run (``0`` for direct methods).
        residual_norm: ``‖(H + ρI) x − v‖`` where the method knows it without
            extra products, else ``None``.
    """

    method: str
    num_hvps: int
    num_operator_calls: int
    iterations: int = 0
    residual_norm: float | None = None


class IHVPResult(NamedTuple):
    """``solution``: ``x ≈ (H + ρI)⁻¹ v``, shape ``(p,)``; ``stats``: its :class:`IHVPStats`."""

    solution: Tensor
    stats: IHVPStats
