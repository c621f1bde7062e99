"""Truncated backpropagation: the unrolled baseline next to the implicit solver.

``BaseUnrolledSolver`` keeps the inner updates since the last outer step in the
autograd graph (the differentiable optimizers in :mod:`hg_dist.optimizers` keep
it) and differentiates the outer loss through them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hg_dist.frozen import select
from hg_dist.solver import BaseSolver
from hg_dist.utils import Params, detached

__all__ = ["BaseUnrolledSolver"]


class BaseUnrolledSolver(BaseSolver):
    """Bilevel solver with truncated-backpropagation hypergradients, for comparison.

    The inner updates since the last outer step stay in the autograd graph (pass
    ``tuple(self.outer.parameters())`` — not detached — to the inner forward, and use
    a differentiable optimizer from :mod:`hg_dist.optimizers`). ``outer_update``
    computes the outer loss at ``self.inner_params`` and assigns
    ``self.outer_grad = self.unrolled_hypergradient(loss)``: the gradient of
    ``g(θ_T(φ), φ)`` through the last ``T = unroll_steps`` inner steps. The graph
    is cut after every outer step and whenever it would exceed ``unroll_steps``
    steps (the first window too, whatever ``outer_patience_iters``), so memory grows
    with ``unroll_steps``, not ``num_iters``. Resume from a checkpoint taken right
    after an outer step to continue exactly (the graph is not saved).
    """

    differentiable_inner_steps = True

    def truncate(self) -> None:
        """Cut the autograd graph: the next unroll starts from the current inner state."""
        self.inner_params = tuple(p.detach().requires_grad_(self.functorch_requires_grad)
                                  for p in self.inner_params)
        self.inner_optim_state = detached(self.inner_optim_state)

    def unrolled_hypergradient(self, outer_loss: Tensor) -> Params:
        """``d outer_loss / dφ`` through the unrolled inner steps (zeros for unused and frozen parameters)."""
        params = tuple(self.outer.parameters())
        grads = iter(torch.autograd.grad(outer_loss, select(params, self.frozen_outer), allow_unused=True))
        return tuple(torch.zeros_like(p) if frozen else _or_zeros(next(grads), p)
                     for p, frozen in zip(params, self.frozen_outer))

    def next_outer_step(self, i: int) -> int | None:
        """The first step ``j >= i`` that ends with an outer update, or ``None``."""
        start = max(i, 1, self.outer_patience_iters)
        j = -(-start // self.unroll_steps) * self.unroll_steps
        return j if j < self.num_iters else None

    def _before_inner_update(self) -> None:
        # The graph holds steps o-T+1 .. o before the outer step o: cut it before step i <= o-T+1.
        i = self.global_step
        upcoming = self.next_outer_step(i)
        if upcoming is None or upcoming - i >= self.unroll_steps - 1:
            self.truncate()

    def _after_outer_update(self) -> None:
        self.truncate()


def _or_zeros(grad: Tensor | None, param: Tensor) -> Tensor:
    return torch.zeros_like(param) if grad is None else grad
