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

In-place twins. When no graph has to run through the inner steps (implicit
hypergradients), ``SGD.step_`` / ``Adam.step_`` (and ``diff_sgd_`` / ``diff_adam_``
with the seed's signature) apply the same update rule with fused
``torch._foreach_*`` kernels, writing into the parameter and state tensors (and
using the gradients as scratch). They return ``(params, state)`` like the pure
versions, with the same state structure, so a checkpoint of one resumes with the
other. :func:`in_place` maps a pure optimizer of this module (an ``SGD`` / ``Adam``
or a ``functools.partial`` of ``diff_sgd`` / ``diff_adam``) to its twin.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from hg_dist._checks import check_float
from hg_dist.utils import Params, check_same_structure

__all__ = ["Adam", "AdamState", "SGD", "diff_adam", "diff_adam_", "diff_sgd", "diff_sgd_", "in_place"]


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

    def step_(self, params: Sequence[Tensor], grads: Sequence[Tensor],
              state: Params | None) -> tuple[Params, Params | None]:
        """The same step in place: ``params`` and the momentum buffers are updated, ``grads`` are overwritten.

        Returns ``(params, state)`` (the same tensors). No autograd graph is recorded.
        """
        check_same_structure(params, grads, "params", "grads")
        params, grads = list(params), list(grads)
        with torch.no_grad():
            if self.weight_decay != 0:
                torch._foreach_add_(grads, params, alpha=self.weight_decay)
            if self.momentum == 0:
                torch._foreach_add_(params, grads, alpha=-self.lr)
                return tuple(params), None
            if state is None:
                bufs = [g.clone() for g in grads]
            else:
                bufs = list(state)
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, grads, alpha=1 - self.dampening)
            if self.nesterov:
                torch._foreach_add_(grads, bufs, alpha=self.momentum)
                torch._foreach_add_(params, grads, alpha=-self.lr)
            else:
                torch._foreach_add_(params, bufs, alpha=-self.lr)
        return tuple(params), tuple(bufs)


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

    def step_(self, params: Sequence[Tensor], grads: Sequence[Tensor],
              state: AdamState | None) -> tuple[Params, AdamState]:
        """The same step in place: ``params`` and the moments are updated, ``grads`` are overwritten.

        Returns ``(params, state)`` (the same parameter and moment tensors). No autograd graph is recorded.
        """
        check_same_structure(params, grads, "params", "grads")
        beta1, beta2 = self.betas
        step = 1 if state is None else state.step + 1
        bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
        params, grads = list(params), list(grads)
        with torch.no_grad():
            if self.weight_decay != 0:
                torch._foreach_add_(grads, params, alpha=self.weight_decay)
            if state is None:
                m = torch._foreach_mul(grads, 1 - beta1)
                v = torch._foreach_mul(grads, grads)
                torch._foreach_mul_(v, 1 - beta2)
            else:
                m, v = list(state.exp_avg), list(state.exp_avg_sq)
                torch._foreach_lerp_(m, grads, 1 - beta1)
                torch._foreach_mul_(v, beta2)
                torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bias2 ** 0.5)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(params, m, denom, value=-self.lr / bias1)
        return tuple(params), AdamState(step, tuple(m), tuple(v))


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


def diff_sgd_(params: Sequence[Tensor],
              grads: Sequence[Tensor],
              state: Params | None,
              weight_decay: float,
              momentum: float,
              lr: float,
              dampening: float = 0,
              nesterov: bool = False,
              ) -> tuple[Params, Params | None]:
    """:func:`diff_sgd` in place (:meth:`SGD.step_`): ``params`` and the state are updated, ``grads`` overwritten."""
    return _sgd(lr, momentum, weight_decay, dampening, nesterov).step_(params, grads, state)


def diff_adam_(params: Sequence[Tensor],
               grads: Sequence[Tensor],
               state: AdamState | None,
               lr: float = 1e-3,
               betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8,
               weight_decay: float = 0,
               ) -> tuple[Params, AdamState]:
    """:func:`diff_adam` in place (:meth:`Adam.step_`): ``params`` and the state are updated, ``grads`` overwritten."""
    return _adam(lr, tuple(betas), eps, weight_decay).step_(params, grads, state)


_TWINS: dict[Callable, Callable] = {diff_sgd: diff_sgd_, diff_adam: diff_adam_}


def in_place(optimizer: Any) -> Callable | None:
    """The in-place twin of a pure optimizer of this module, or ``None`` for any other callable.

    ``SGD(...)`` / ``Adam(...)`` give their ``step_``; ``functools.partial(diff_sgd, **settings)`` /
    ``functools.partial(diff_adam, **settings)`` (settings bound by keyword, as the seed does) give
    the same partial of ``diff_sgd_`` / ``diff_adam_``. Anything else (a user's optimizer, a wrapper)
    has no known twin: callers keep the pure call.
    """
    if isinstance(optimizer, (SGD, Adam)):
        return optimizer.step_
    if isinstance(optimizer, functools.partial) and not optimizer.args:
        twin = _TWINS.get(optimizer.func)
        if twin is not None:
            return functools.partial(twin, **optimizer.keywords)
    return None
