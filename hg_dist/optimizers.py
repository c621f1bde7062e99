"""Differentiable functional optimizers for the inner problem.

Each is a pure function ``(params, grads, state, **settings) -> (new_params,
new_state)`` with ``state=None`` on the first call. Nothing is updated in place
and nothing is detached, so an unrolled graph through many steps can be
differentiated (truncated backpropagation), and the trajectories match
``torch.optim.SGD`` / ``torch.optim.Adam`` step for step. Bind the settings with
``functools.partial(diff_sgd, lr=0.1, momentum=0.9, weight_decay=0)``.

The settings are checked once per distinct combination (:class:`SGD` /
:class:`Adam` hold checked settings; ``diff_sgd`` / ``diff_adam`` build one per
combination and cache it), not on every step.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from hg_dist._checks import check_float
from hg_dist.utils import Params, check_same_structure

__all__ = ["Adam", "AdamState", "SGD", "diff_adam", "diff_sgd"]


@dataclass(frozen=True)
class SGD:
    """One SGD step, as ``torch.optim.SGD``, with settings checked on construction::

        g ← g + λθ;   b ← g (first step) or μb + (1 − τ)g;
        d ← g + μb (Nesterov) or b;   θ ← θ − η d

    Calling it returns ``(new_params, new_state)``; the state is the momentum
    buffers (``None`` when ``momentum == 0``).
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        check_float("lr", self.lr, nonnegative=True)
        check_float("momentum", self.momentum, nonnegative=True)
        check_float("weight_decay", self.weight_decay)
        check_float("dampening", self.dampening)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening == 0, as in torch.optim.SGD")

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor],
                 state: Params | None) -> tuple[Params, Params | None]:
        check_same_structure(params, grads, "params", "grads")
        momentum, dampening = self.momentum, self.dampening
        new_params, new_state = [], []
        for i, (param, grad) in enumerate(zip(params, grads)):
            if self.weight_decay != 0:
                grad = grad + self.weight_decay * param
            if momentum != 0:
                buf = grad if state is None else momentum * state[i] + (1 - dampening) * grad
                new_state.append(buf)
                grad = grad + momentum * buf if self.nesterov else buf
            new_params.append(param - self.lr * grad)
        return tuple(new_params), (tuple(new_state) if momentum != 0 else None)


class AdamState(NamedTuple):
    """Adam's state: the step count and the first/second moment estimates."""

    step: int
    exp_avg: Params
    exp_avg_sq: Params


@dataclass(frozen=True)
class Adam:
    """One Adam step, as ``torch.optim.Adam`` (L2 weight decay, no AMSGrad), settings checked on construction::

        g ← g + λθ;   m ← β₁m + (1 − β₁)g;   v ← β₂v + (1 − β₂)g²
        θ ← θ − η (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        check_float("lr", self.lr, nonnegative=True)
        check_float("eps", self.eps, positive=True)
        check_float("weight_decay", self.weight_decay)
        for name, beta in zip(("betas[0]", "betas[1]"), self.betas):
            if not 0 <= check_float(name, beta) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")

    def __call__(self, params: Sequence[Tensor], grads: Sequence[Tensor],
                 state: AdamState | None) -> tuple[Params, AdamState]:
        check_same_structure(params, grads, "params", "grads")
        beta1, beta2 = self.betas
        step = 1 if state is None else state.step + 1
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        new_params, new_m, new_v = [], [], []
        for i, (param, grad) in enumerate(zip(params, grads)):
            if self.weight_decay != 0:
                grad = grad + self.weight_decay * param
            m = (1 - beta1) * grad if state is None else beta1 * state.exp_avg[i] + (1 - beta1) * grad
            v = (1 - beta2) * grad * grad if state is None else beta2 * state.exp_avg_sq[i] + (1 - beta2) * grad * grad
            new_params.append(param - self.lr * (m / bias1) / ((v / bias2).sqrt() + self.eps))
            new_m.append(m)
            new_v.append(v)
        return tuple(new_params), AdamState(step, tuple(new_m), tuple(new_v))


@functools.lru_cache(maxsize=128)
def _sgd(lr: float, momentum: float, weight_decay: float, dampening: float, nesterov: bool) -> SGD:
    return SGD(lr, momentum, weight_decay, dampening, nesterov)


@functools.lru_cache(maxsize=128)
def _adam(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> Adam:
    return Adam(lr, tuple(betas), eps, weight_decay)


def diff_sgd(params: Sequence[Tensor],
             grads: Sequence[Tensor],
             state: Params | None,
             weight_decay: float,
             momentum: float,
             lr: float,
             dampening: float = 0,
             nesterov: bool = False,
             ) -> tuple[Params, Params | None]:
    """One :class:`SGD` step with the seed library's signature (settings checked once per combination)."""
    return _sgd(lr, momentum, weight_decay, dampening, nesterov)(params, grads, state)


def diff_adam(params: Sequence[Tensor],
              grads: Sequence[Tensor],
              state: AdamState | None,
              lr: float = 1e-3,
              betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8,
              weight_decay: float = 0,
              ) -> tuple[Params, AdamState]:
    """One :class:`Adam` step (settings checked once per combination)."""
    return _adam(lr, tuple(betas), eps, weight_decay)(params, grads, state)
