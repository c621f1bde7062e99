"""The implicit solver's default inner step: plain reverse-mode gradients and in-place optimizers.

Ground truth: the seed-style step (``torch.func.grad_and_value`` and the pure optimizer), which
the default step must reproduce in float64; and the non-finite-loss rollback.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hg_dist import implicit_hypergradient
from hg_dist.ihvp import cg
from hg_dist.optimizers import diff_adam, diff_sgd
from hg_dist.solver import BaseImplicitSolver, InfiniteLoader, NonFiniteLossError, grad_and_value

DIM = 12


class Default(BaseImplicitSolver):
    """Only the forwards: the default inner and outer updates run."""

    def inner_forward(self, in_params, out_params, x, y, poison=None):
        loss = F.binary_cross_entropy_with_logits(self.inner_func(in_params, x), y)
        penalty = sum((p.pow(2) * o.exp()).sum() for p, o in zip(in_params, out_params)) / 2
        if poison is not None and bool(poison):   # finite loss, NaN gradient: d/dθ √(0·θ²) = 0/0
            penalty = penalty + poison * torch.sqrt(in_params[0].pow(2) * 0).sum()
        return loss + penalty

    def outer_forward(self, in_params, out_params, x, y):
        return F.binary_cross_entropy_with_logits(self.inner_func(in_params, x), y)


class SeedStep(Default):
    """The reference: the seed's inner step (torch.func.grad_and_value, pure optimizer)."""

    def inner_update(self):
        x, y = next(self.inner_loader)
        grads, loss = torch.func.grad_and_value(self.inner_forward)(self.inner_params, self.outer_params(), x, y)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)
        return loss


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(120, DIM, generator=gen, dtype=torch.float64)
    y = (torch.rand(120, generator=gen, dtype=torch.float64) < torch.sigmoid(x[:, :3].sum(1))).double()[:, None]
    return [(x[i:i + 20], y[i:i + 20]) for i in range(0, 80, 20)], [(x[80:], y[80:])]


def make(cls, optimizer, num_iters=12, inner_batches=None):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(DIM, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    outer = nn.Module()
    outer.log_decay = nn.ParameterList([nn.Parameter(torch.full(p.shape, -3.0, dtype=torch.float64))
                                        for p in inner.parameters()])
    train, val = data()
    return cls(inner, outer, inner_batches or train, val, functools.partial(_exact_ihvp), num_iters, 5, optimizer,
               torch.optim.SGD(outer.parameters(), lr=0.5), log_freq=1000)


def _exact_ihvp(inner_obj, outer_obj, in_params, out_params):
    return implicit_hypergradient(inner_obj, outer_obj, in_params, out_params, functools.partial(cg, num_iters=10, rho=1.0))


OPTIMIZERS = [
    functools.partial(diff_sgd, lr=0.3, momentum=0.9, weight_decay=1e-3),
    functools.partial(diff_sgd, lr=0.3, momentum=0.8, weight_decay=0.0, nesterov=True),
    functools.partial(diff_adam, lr=0.05, weight_decay=1e-3),
]


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["sgd", "nesterov", "adam"])
def test_default_step_matches_seed_step(optimizer):
    """Same trajectory (inner and outer parameters, losses) as grad_and_value + the pure optimizer."""
    reference, default = make(SeedStep, optimizer), make(Default, optimizer)
    ref_metrics, metrics = reference.run(), default.run()
    assert default.outer_step == reference.outer_step == 2
    for a, b in zip(reference.inner_params, default.inner_params):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-12)
    for a, b in zip(reference.outer.parameters(), default.outer.parameters()):
        assert torch.allclose(a, b, rtol=1e-11, atol=1e-12)
    assert metrics["inner_loss"] == pytest.approx(ref_metrics["inner_loss"], rel=1e-11)


def test_default_step_updates_in_place_and_records_no_graph():
    solver = make(Default, OPTIMIZERS[0])
    storage = [p.data_ptr() for p in solver.inner_params]
    loss = solver.inner_update()
    assert not loss.requires_grad and loss.grad_fn is None
    assert [p.data_ptr() for p in solver.inner_params] == storage
    assert all(p.grad_fn is None for p in solver.inner_params)


def test_grad_and_value_matches_torch_func_and_zero_for_unused():
    gen = torch.Generator().manual_seed(1)
    params = (torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64))

    def f(p, scale):
        return scale * (p[0].sin() * p[0]).sum()

    grads, value = grad_and_value(f, params, 2.0)
    expected = torch.func.grad(f)(params, 2.0)
    assert torch.allclose(grads[0], expected[0], rtol=1e-14) and torch.equal(grads[1], torch.zeros(2).double())
    assert value == pytest.approx(float(f(params, 2.0)), rel=1e-14)


def _snapshot_after(optimizer, steps):
    solver = make(Default, optimizer)
    for _ in range(steps):
        solver._inner_step()
        solver.global_step += 1
    return solver.inner_params


@pytest.mark.parametrize("optimizer", OPTIMIZERS[::2], ids=["sgd", "adam"])
def test_nonfinite_loss_leaves_state_of_previous_step(optimizer):
    train, _ = data()
    bad_x = train[0][0].clone()
    bad_x[0, 0] = float("nan")
    batches = train + [(bad_x, train[0][1])]
    solver = make(Default, optimizer, inner_batches=batches)
    with pytest.raises(NonFiniteLossError, match="inner_update at step 4 returned non-finite inner_loss"):
        solver.run()
    assert solver.inner_step == 4
    expected = _snapshot_after(optimizer, 4)
    for a, b in zip(expected, solver.inner_params):
        assert torch.equal(a, b)


def test_nonfinite_gradient_with_finite_loss_raises_before_stepping():
    train, _ = data()
    x, y = train[0]
    batches = [(x, y, torch.tensor(0.0, dtype=torch.float64))] * 3 + [(x, y, torch.tensor(1.0, dtype=torch.float64))]
    solver = make(Default, OPTIMIZERS[0], inner_batches=batches)
    solver.inner_loader = InfiniteLoader(batches, "inner_loader")
    for _ in range(3):
        solver.inner_update()
        solver.global_step += 1
    before = [p.clone() for p in solver.inner_params]
    with pytest.raises(NonFiniteLossError, match="inner gradients are NaN/inf"):
        solver.inner_update()
    for a, b in zip(before, solver.inner_params):
        assert torch.equal(a, b)
