"""A solver over two gloo processes on loopback (``collective=TorchDistributed()``) equals one process.

The default ``inner_update`` averages with the bucketed mean (buckets launched from
backward hooks), a seed-style override that calls ``torch.func`` and
``self.mean_gradients`` with the copy-free flat mean; with a frozen parameter the
default update takes the pure (momentum-keeping) optimizer path, which must not keep
views of the reused buffers. Each run's parameters and recorded metrics equal those of
one process on the union of the shards.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from loopback import free_port, gloo_group

from hg_dist import make_approx
from hg_dist.collective import AllreduceGradientMean, SingleProcess
from hg_dist.distributed.collectives import TorchDistributed
from hg_dist.optimizers import diff_sgd
from hg_dist.solver import BaseImplicitSolver

NUM_ITERS, UNROLL = 6, 2
BUCKET_BYTES = 200                   # float64 [8, 1] + [1, 8] + [8] = 136 bytes | [8, 5] = 320 bytes: 2 buckets
VARIANTS = ("default", "frozen", "func")


class Decay(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_decay = nn.Parameter(torch.full((4,), -2.0, dtype=torch.float64))


class MLPSolver(BaseImplicitSolver):
    """Inner: a tanh MLP regression with weight decay ``exp(φ_k)`` per parameter tensor; outer: validation MSE."""

    def inner_forward(self, in_params, out_params, x, y):
        fit = F.mse_loss(self.inner_func(in_params, x).squeeze(-1), y)
        return fit + sum(p.square().sum() * d.exp() for p, d in zip(in_params, out_params[0])) / 2

    def outer_forward(self, in_params, out_params, x, y):
        return F.mse_loss(self.inner_func(in_params, x).squeeze(-1), y)


class FuncSolver(MLPSolver):
    """A seed-style override: gradients from ``torch.func``, averaged with ``self.mean_gradients``."""

    def inner_update(self):
        x, y = next(self.inner_loader)
        grads, loss = torch.func.grad_and_value(self.inner_forward)(self.inner_params, self.outer_params(), x, y)
        grads, loss = self.mean_gradients(grads, loss)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)
        return loss


def build(variant: str, rank: int, world_size: int, collective) -> MLPSolver:
    """This rank's shard (rows ``rank::world_size``) of fixed global batches of 16 rows."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(16, generator=g,
                                                                                   dtype=torch.float64))
               for _ in range(3)]
    shard = [(x[rank::world_size], y[rank::world_size]) for x, y in batches]
    torch.manual_seed(1)
    inner = nn.Sequential(nn.Linear(5, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 1, dtype=torch.float64))
    if variant == "frozen":
        inner[0].bias.requires_grad_(False)
    outer = Decay()
    solver_class = FuncSolver if variant == "func" else MLPSolver
    return solver_class(inner, outer, shard[:2], shard[2:], make_approx({"name": "cg", "num_iters": 5, "rho": 2.0}),
                        NUM_ITERS, UNROLL, functools.partial(diff_sgd, lr=0.2, momentum=0.9, weight_decay=0.0),
                        torch.optim.SGD(outer.parameters(), lr=0.5), progress=False, collective=collective)


def recorded(solver) -> dict[str, list[float]]:
    """Every recorded metric but timings and communication counts (which one process has not)."""
    return {name: [float(v) for v in values] for name, values in solver.recorder.archive.items()
            if "time" not in name and not name.startswith("comm_")}


def _worker(rank, world_size, port, out_dir):
    with gloo_group(rank, world_size, port):
        results = {}
        for variant in VARIANTS:
            solver = build(variant, rank, world_size, TorchDistributed(bucket_bytes=BUCKET_BYTES))
            solver.run()
            mean = solver.gradient_mean
            results[variant] = {
                "inner": [p.detach().clone() for p in solver.inner_params],
                "outer": [p.detach().clone() for p in solver.outer_params()],
                "recorded": recorded(solver), "outer_steps": solver.outer_step,
                "averager": type(mean).__name__,
                "buckets": None if mean.bucketed is None else len(mean.bucketed.buckets),
                "flat": mean.flat is not None, "inner_rounds": solver.reductions.inner.total.rounds}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("solver_buckets")
    mp.start_processes(_worker, args=(2, free_port(), str(out)), nprocs=2, start_method="spawn", join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_gloo_ranks_equal_one_process(two_ranks, variant):
    single = build(variant, 0, 1, SingleProcess())
    assert type(single.gradient_mean) is AllreduceGradientMean            # one process keeps today's path
    single.run()
    expected = recorded(single)
    assert "inner_loss" in expected and "outer_loss" in expected
    for rank in two_ranks:
        run = rank[variant]
        assert run["averager"] == "TorchGradientMean" and run["outer_steps"] == single.outer_step > 0
        for got, want in zip(run["inner"] + run["outer"], single.inner_params + single.outer_params()):
            assert torch.allclose(got, want.detach(), rtol=1e-10, atol=1e-13)
        assert set(run["recorded"]) == set(expected)
        for name, values in expected.items():
            assert run["recorded"][name] == pytest.approx(values, rel=1e-10, abs=1e-13), name
        if variant == "func":       # the override's torch.func gradients: the flat mean, one round a step
            assert run["flat"] and run["buckets"] is None and run["inner_rounds"] == NUM_ITERS
        else:                       # the default update: buckets from backward hooks, one round a bucket
            assert not run["flat"] and run["buckets"] == 2 and run["inner_rounds"] == 2 * NUM_ITERS
    first, second = two_ranks[0][variant], two_ranks[1][variant]
    assert all(torch.equal(a, b) for a, b in zip(first["inner"], second["inner"]))
    assert first["recorded"] == second["recorded"]                      # replicas agree bit for bit


def test_frozen_parameter_stays_put(two_ranks):
    torch.manual_seed(1)
    initial = nn.Sequential(nn.Linear(5, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 1, dtype=torch.float64))
    for rank in two_ranks:
        assert torch.equal(rank["frozen"]["inner"][1], initial[0].bias.detach())
        assert not torch.equal(rank["frozen"]["inner"][0], initial[0].weight.detach())
