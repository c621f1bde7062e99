"""A small ridge-regression bilevel problem shared by the tests that need a real solver but not a real model.

Inner: ``½ mean (Xθ − y)² + ½ Σ exp(φ) θ²``; outer: ``½ mean (X'θ − y')²``, float64, four features,
32 training and 32 validation rows drawn from ``config.seed``.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from hg_dist import make_approx
from hg_dist.experiment import ExperimentConfig
from hg_dist.optimizers import diff_sgd
from hg_dist.solver import BaseImplicitSolver


class Ridge(BaseImplicitSolver):
    """Ridge regression with a learned log-decay per feature."""

    def inner_forward(self, in_params, out_params, x, y):
        (w,), (log_decay,) = in_params, out_params
        return (x @ w.reshape(-1) - y).pow(2).mean() / 2 + (log_decay.exp() * w.reshape(-1).pow(2)).sum() / 2

    def outer_forward(self, in_params, out_params, x, y):
        (w,) = in_params
        return (x @ w.reshape(-1) - y).pow(2).mean() / 2


class Decay(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), -2.0, dtype=torch.float64))


def build_ridge(config: ExperimentConfig, solver_class: type[Ridge] = Ridge, **options) -> Ridge:
    """A ``solver_class`` for ``config`` (its approximator, ``num_iters``, ``unroll_steps``, ``seed``);
    ``options`` go to the solver (e.g. ``log_freq``, ``progress``)."""
    gen = torch.Generator().manual_seed(config.seed)
    dim, n = 4, 32
    x = torch.randn(2 * n, dim, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(dim, generator=gen, dtype=torch.float64)
    inner = nn.Linear(dim, 1, bias=False).double()
    outer = Decay(dim)
    return solver_class(inner, outer, [(x[:n], y[:n])], [(x[n:], y[n:])], make_approx(config.approximator, seed=0),
                        num_iters=config.num_iters, unroll_steps=config.unroll_steps,
                        inner_optimizer=functools.partial(diff_sgd, lr=0.3, momentum=0.0, weight_decay=0.0),
                        outer_optimizer=torch.optim.SGD(outer.parameters(), lr=0.05), **options)
