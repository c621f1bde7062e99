"""Differentiable functional optimizers for the inner problem.

Each is a pure function ``(params, grads, state, **settings) -> (new_params,
new_state)`` with ``state=None`` on the first call. Nothing is updated in place
and nothing is detached, so an unrolled graph through many steps can be
differentiated (truncated backpropagation), and the trajectories match
``torch.optim.SGD`` / ``torch.optim.Adam`` step for step. Bind the settings with
``functools.partial(diff_sgd, lr=0.1, momentum=0.9, weight_decay=0)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from torch import Tensor

from hg_dist._checks import check_float
from hg_dist.utils import Params, check_same_structure


def diff_sgd(params: Sequence[Tensor],
             grads: Sequence[Tensor],
             state: Params | None,
             weight_decay: float,
             momentum: float,
             lr: float,
             dampening: float = 0,
             nesterov: bool = False,
             ) -> tuple[Params, Params | None]:
    """One SGD step, as ``torch.optim.SGD``::

        g ← g + λθ;   b ← g (first step) or μb + (1 − τ)g;
        d ← g + μb (Nesterov) or b;   θ ← θ − η d

    Returns ``(new_params, new_state)``; the state is the momentum buffers
    (``None`` when ``momentum == 0``).
    """
    check_float("lr", lr, nonnegative=True)
    check_float("momentum", momentum, nonnegative=True)
    check_float("weight_decay", weight_decay)
    check_float("dampening", dampening)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov=True needs momentum > 0 and dampening == 0, as in torch.optim.SGD")
    check_same_structure(params, grads, "params", "grads")
    new_params, new_state = [], []
    for i, (param, grad) in enumerate(zip(params, grads)):
        if weight_decay != 0:
            grad = grad + weight_decay * param
        if momentum != 0:
            buf = grad if state is None else momentum * state[i] + (1 - dampening) * grad
            new_state.append(buf)
            grad = grad + momentum * buf if nesterov else buf
        new_params.append(param - lr * grad)
    return tuple(new_params), (tuple(new_state) if momentum != 0 else None)


class AdamState(NamedTuple):
    """Adam's state: the step count and the first/second moment estimates."""

    step: int
    exp_avg: Params
    exp_avg_sq: Params


def diff_adam(params: Sequence[Tensor],
              grads: Sequence[Tensor],
              state: AdamState | None,
              lr: float = 1e-3,
              betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 1e-8,
              weight_decay: float = 0,
              ) -> tuple[Params, AdamState]:
    """One Adam step, as ``torch.optim.Adam`` (L2 weight decay, no AMSGrad)::

        g ← g + λθ;   m ← β₁m + (1 − β₁)g;   v ← β₂v + (1 − β₂)g²
        θ ← θ − η (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
    """
    check_float("lr", lr, nonnegative=True)
    check_float("eps", eps, positive=True)
    check_float("weight_decay", weight_decay)
    beta1, beta2 = betas
    for name, beta in (("betas[0]", beta1), ("betas[1]", beta2)):
        if not 0 <= check_float(name, beta) < 1:
            raise ValueError(f"{name} must be in [0, 1), got {beta}")
    check_same_structure(params, grads, "params", "grads")
    step = 1 if state is None else state.step + 1
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    new_params, new_m, new_v = [], [], []
    for i, (param, grad) in enumerate(zip(params, grads)):
        if weight_decay != 0:
            grad = grad + weight_decay * param
        m = (1 - beta1) * grad if state is None else beta1 * state.exp_avg[i] + (1 - beta1) * grad
        v = (1 - beta2) * grad * grad if state is None else beta2 * state.exp_avg_sq[i] + (1 - beta2) * grad * grad
        new_params.append(param - lr * (m / bias1) / ((v / bias2).sqrt() + eps))
        new_m.append(m)
        new_v.append(v)
    return tuple(new_params), AdamState(step, tuple(new_m), tuple(new_v))
