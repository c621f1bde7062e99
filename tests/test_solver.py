"""Solver: seed compatibility, the loop, loaders, checkpoints, NaN guard, logging, experiment config."""

from __future__ import annotations

import argparse
import copy
import functools
import io
import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import SGD
from torch.utils.data import DataLoader, TensorDataset

import hg_dist
from hg_dist import approx_hypergrad, experiment, make_approx
from hg_dist.callbacks import ProgressBar
from hg_dist.ihvp import METHODS
from hg_dist.outer_optimizers import make_outer_optimizer
from hg_dist.recording import Recorder
from hg_dist.optimizers import diff_adam, diff_sgd
from hg_dist.solver import (BaseImplicitSolver, BaseUnrolledSolver, InfiniteLoader, NonFiniteLossError)

# ---- the seed docs page's Solver class, verbatim except `hypergrad` -> `hg_dist` -------------

from functorch import grad_and_value, make_functional  # noqa: E402
from hg_dist.approx_hypergrad import nystrom  # noqa: E402,F401
from hg_dist.solver import BaseImplicitSolver  # noqa: E402,F811
from hg_dist.utils import Params  # noqa: E402


class Solver(BaseImplicitSolver):
    def inner_forward(self,
                      in_params: Params,
                      out_params: Params,
                      input: Tensor,
                      target: Tensor
                      ) -> Tensor:
        # forward computation of the inner problem
        output = self.inner_func(in_params, input)
        loss = F.binary_cross_entropy_with_logits(output, target)
        weight_decay = sum([(_in.pow(2) * _out).sum()
                            for _in, _out in zip(in_params, out_params)])
        return loss + weight_decay / 2  # (1)

    def inner_update(self) -> None:
        # update rule of the inner problem
        input, target = next(self.inner_loader)  # (2)
        grads, loss = grad_and_value(self.inner_forward)(self.inner_params,
                                                         tuple(self.outer.parameters()),
                                                         input,
                                                         target)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params,
                                                                         grads,
                                                                         self.inner_optim_state)

    def outer_forward(self,
                      in_params: Params,
                      out_params: Params,
                      input: Tensor,
                      target: Tensor
                      ) -> Tensor:
        # forward computation of the outer problem
        output = self.inner_func(in_params, input)  # (3)
        return F.binary_cross_entropy_with_logits(output, target)

    def outer_update(self) -> None:
        # update rule of the outer problem
        in_input, in_target = next(self.inner_loader)
        out_input, out_target = next(self.outer_loader)
        _, out_params = make_functional(self.outer, disable_autograd_tracking=True)
        # compute implicit gradients
        implicit_grads = self.approx_ihvp(lambda i, o: self.inner_forward(i, o, in_input, in_target),
                                          lambda i, o: self.outer_forward(i, o, out_input, out_target),
                                          self.inner_params, out_params)
        self.outer_grad = implicit_grads  # (4)
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)


# ---- fixtures -----------------------------------------------------------------------------

DIM = 30


def logistic_data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(360, DIM, generator=gen)
    w = torch.zeros(DIM)
    w[:5] = 3.0
    y = (torch.rand(360, generator=gen) < torch.sigmoid(x @ w)).double().unsqueeze(1)
    return (x[:60], y[:60]), (x[60:], y[60:])


def make_seed_solver(num_iters=60, unroll_steps=10, outer_lr=0.01, inner_optimizer=None, approx=None,
                     solver_cls=Solver, outer_patience_iters=0, **kwargs):
    """The seed docs' setup on synthetic data: shuffled mini-batches (global RNG), SGD with momentum."""
    (xt, yt), (xv, yv) = logistic_data()
    inner_loader = DataLoader(TensorDataset(xt, yt), batch_size=20, shuffle=True)
    outer_loader = DataLoader(TensorDataset(xv, yv), batch_size=100, shuffle=True)
    inner = nn.Linear(DIM, 1, bias=False)
    nn.init.zeros_(inner.weight)
    outer = copy.deepcopy(inner)
    nn.init.ones_(outer.weight)
    inner_optimizer = inner_optimizer or functools.partial(diff_sgd, momentum=0, weight_decay=0, lr=0.1)
    outer_optimizer = SGD(outer.parameters(), weight_decay=0, momentum=0.9, lr=outer_lr)
    approx_ihvp = approx or functools.partial(nystrom, rank=5, rho=0.1)
    solver = solver_cls(inner, outer, inner_loader, outer_loader, approx_ihvp,
                        inner_optimizer=inner_optimizer, outer_optimizer=outer_optimizer,
                        num_iters=num_iters, unroll_steps=unroll_steps,
                        outer_patience_iters=outer_patience_iters, **kwargs)
    solver.val = (xv, yv)
    return solver


def val_loss(solver) -> float:
    xv, yv = solver.val
    with torch.no_grad():
        return F.binary_cross_entropy_with_logits(solver.inner_func(solver.inner_params, xv), yv).item()


# ---- seed compatibility and the loop -----------------------------------------------------

def test_seed_solver_runs_and_implicit_hypergradient_lowers_validation_loss():
    untuned = make_seed_solver(num_iters=300, outer_lr=0.0)
    untuned.run()
    tuned = make_seed_solver(num_iters=300, outer_lr=0.01)
    tuned.run()
    assert tuned.outer_step == untuned.outer_step == 29
    assert not torch.equal(tuned.outer.weight, torch.ones_like(tuned.outer.weight))
    assert val_loss(tuned) < val_loss(untuned) - 0.02
    # sync_inner: the inner module holds the final functional parameters
    assert torch.equal(tuned.inner.weight, tuned.inner_params[0])


def test_run_calls_outer_update_on_the_seed_schedule():
    calls = []

    class Counting(Solver):
        def inner_update(self):
            calls.append(("inner", self.global_step))
            super().inner_update()

        def outer_update(self):
            calls.append(("outer", self.global_step))
            super().outer_update()

        def post_outer_update(self):
            calls.append(("post", self.global_step))

    solver = make_seed_solver(num_iters=25, unroll_steps=4, solver_cls=Counting)
    solver.outer_patience_iters = 10
    solver.run()
    outer_at = [step for kind, step in calls if kind == "outer"]
    assert outer_at == [i for i in range(25) if i > 0 and i >= 10 and i % 4 == 0] == [12, 16, 20, 24]
    assert [step for kind, step in calls if kind == "post"] == outer_at
    assert sum(kind == "inner" for kind, _ in calls) == 25
    assert (solver.global_step, solver.inner_step, solver.outer_step) == (25, 25, 4)


def test_run_twice_continues_from_the_step_counter():
    solver = make_seed_solver(num_iters=20)
    solver.run()
    before = solver.inner_params
    solver.run()  # already at num_iters: nothing to do
    assert solver.inner_params is before and solver.global_step == 20


# ---- constructor checks ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"num_iters": 0}, ValueError, "num_iters must be >= 1"),
    ({"num_iters": -5}, ValueError, "num_iters"),
    ({"num_iters": 2.5}, TypeError, "num_iters must be an int"),
    ({"unroll_steps": 0}, ValueError, "unroll_steps must be in"),
    ({"num_iters": 10, "unroll_steps": 11}, ValueError, "unroll_steps .*between 1 and num_iters"),
    ({"outer_patience_iters": -1}, ValueError, "outer_patience_iters must be >= 0"),
    ({"log_freq": 0}, ValueError, "log_freq"),
    ({"nan_policy": "ignore"}, ValueError, "nan_policy must be one of"),
    ({"callbacks": [1]}, TypeError, r"callbacks\[0\]"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_seed_solver(**kwargs)


def test_models_without_parameters_are_rejected():
    inner = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="outer has no parameters.*nn.Parameter"):
        Solver(inner, nn.ReLU(), [0], [0], functools.partial(nystrom, rank=1, rho=0.1), 10, 2,
               functools.partial(diff_sgd, lr=0.1, momentum=0, weight_decay=0), SGD(inner.parameters(), lr=1))
    outer = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="inner has no parameters"):
        Solver(nn.Identity(), outer, [0], [0], functools.partial(nystrom, rank=1, rho=0.1), 10, 2,
               functools.partial(diff_sgd, lr=0.1, momentum=0, weight_decay=0), SGD(outer.parameters(), lr=1))
    with pytest.raises(TypeError, match="inner must be a torch.nn.Module"):
        Solver(lambda x: x, outer, [0], [0], functools.partial(nystrom, rank=1, rho=0.1), 10, 2,
               functools.partial(diff_sgd, lr=0.1, momentum=0, weight_decay=0), SGD(outer.parameters(), lr=1))


def test_outer_optimizer_must_be_an_optimizer_over_outer():
    inner, outer, other = nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(3, 1)
    sgd = functools.partial(diff_sgd, lr=0.1, momentum=0, weight_decay=0)
    approx = functools.partial(nystrom, rank=1, rho=0.1)
    with pytest.raises(TypeError, match="outer_optimizer must be a torch.optim.Optimizer"):
        Solver(inner, outer, [0], [0], approx, 10, 2, sgd, lambda: None)
    with pytest.raises(ValueError, match="not parameters of outer"):
        Solver(inner, outer, [0], [0], approx, 10, 2, sgd, SGD(other.parameters(), lr=1))
    with pytest.raises(TypeError, match="approx_ihvp must be callable"):
        Solver(inner, outer, [0], [0], None, 10, 2, sgd, SGD(outer.parameters(), lr=1))


def test_outer_grad_setter_checks_shapes_and_finiteness():
    solver = make_seed_solver()
    with pytest.raises(ValueError, match="outer_grad got 2 tensors but outer has 1"):
        solver.outer_grad = (torch.zeros(1, DIM), torch.zeros(1))
    with pytest.raises(ValueError, match=r"outer_grad\[0\] must be a tensor of shape \(1, 30\)"):
        solver.outer_grad = (torch.zeros(DIM),)
    bad = torch.zeros(1, DIM)
    bad[0, 3] = math.nan
    with pytest.raises(hg_dist.NonFiniteHypergradientError, match="not changed"):
        solver.outer_grad = (bad,)
    assert solver.outer.weight.grad is None
    solver.outer_grad = (torch.full((1, DIM), 2.0),)
    assert torch.equal(solver.outer.weight.grad, torch.full((1, DIM), 2.0))
    assert solver.recorder.latest()["hypergrad_norm"] == pytest.approx(2.0 * math.sqrt(DIM))


# ---- loaders -----------------------------------------------------------------------------

def test_loader_walks_through_the_data_and_reshuffles_each_epoch():
    loader = InfiniteLoader(DataLoader(TensorDataset(torch.arange(12)), batch_size=4, shuffle=True))
    epochs = [torch.cat([next(loader)[0] for _ in range(3)]) for _ in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(12))  # every example once per epoch
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert (loader.epoch, loader.position) == (3, 3)


def test_solver_loaders_are_persistent_iterators():
    solver = make_seed_solver()
    first, second = next(solver.inner_loader), next(solver.inner_loader)
    assert not torch.equal(first[0], second[0])  # continues, does not restart each call
    assert solver.inner_loader is solver.inner_loader and solver.inner_loader.position == 2


def test_loader_errors_are_clear():
    with pytest.raises(ValueError, match="yields no batches"):
        next(InfiniteLoader([], "inner_loader"))
    one_shot = InfiniteLoader(iter([1, 2]), "outer_loader")
    assert [next(one_shot), next(one_shot)] == [1, 2]
    with pytest.raises(ValueError, match="outer_loader is exhausted; pass a re-iterable"):
        next(one_shot)
    with pytest.raises(TypeError, match="inner_loader must be an iterable"):
        InfiniteLoader(3, "inner_loader")


@pytest.mark.parametrize("with_generator", [False, True])
def test_loader_state_restores_the_position_and_order(with_generator):
    def make():
        gen = torch.Generator().manual_seed(5) if with_generator else None
        return DataLoader(TensorDataset(torch.arange(10)), batch_size=3, shuffle=True, generator=gen)

    loader = InfiniteLoader(make())
    for _ in range(5):  # into the second epoch (4 batches an epoch)
        next(loader)
    state, rng = loader.state_dict(), torch.get_rng_state()
    expected = [next(loader)[0] for _ in range(9)]
    fresh = InfiniteLoader(make())
    fresh.load_state_dict(state)
    torch.set_rng_state(rng)
    got = [next(fresh)[0] for _ in range(9)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


# ---- checkpoint / resume -----------------------------------------------------------------

@pytest.mark.parametrize("inner_opt", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("approx", ["nystrom_global_rng", "nystrom_generator"])
def test_resume_continues_exactly_like_the_uninterrupted_run(inner_opt, approx):
    def build():
        opt = (functools.partial(diff_sgd, momentum=0.9, weight_decay=0, lr=0.05) if inner_opt == "sgd_momentum"
               else functools.partial(diff_adam, lr=0.01))
        gen = torch.Generator().manual_seed(3) if approx == "nystrom_generator" else None
        return make_seed_solver(num_iters=70, unroll_steps=7, outer_lr=0.01, inner_optimizer=opt,
                                approx=functools.partial(nystrom, rank=5, rho=0.1, generator=gen))

    torch.manual_seed(1)
    straight = build()
    straight.run()

    torch.manual_seed(1)
    first = build()
    first.num_iters = 38  # stop mid-window and mid-epoch (3 batches an epoch)
    first.run()
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    torch.manual_seed(123)  # the resumed process starts from another random state
    resumed = build()
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.global_step == 38
    resumed.run()

    assert resumed.inner_params[0].dtype == torch.float64
    assert torch.equal(straight.inner_params[0], resumed.inner_params[0])
    assert torch.equal(straight.outer.weight, resumed.outer.weight)
    assert (straight.outer_step, straight.inner_step) == (resumed.outer_step, resumed.inner_step)
    # the history carries over (plus the row the interrupted run logged when it stopped)
    assert [r["step"] for r in resumed.recorder.history] == [38] + [r["step"] for r in straight.recorder.history]


def test_load_state_dict_rejects_other_states():
    solver = make_seed_solver()
    with pytest.raises(ValueError, match="not a solver state_dict"):
        solver.load_state_dict({"inner_params": ()})
    state = solver.state_dict()
    state["inner_params"] = (torch.zeros(1, 3),)
    with pytest.raises(ValueError, match="same inner model"):
        solver.load_state_dict(state)


def _snapshot(solver):
    """Everything a load could change, copied (parameters, optimizer state, counters, loaders, RNG)."""
    return {"inner": [t.clone() for t in solver.inner_params],
            "outer": {k: v.clone() for k, v in solver.outer.state_dict().items()},
            "outer_optimizer": copy.deepcopy(solver.outer_optimizer.state_dict()),
            "counters": (solver.global_step, solver.inner_step, solver.outer_step),
            "loaders": (solver.inner_loader.state_dict(), solver.outer_loader.state_dict()),
            "history": copy.deepcopy(solver.recorder.history),
            "generators": [g.get_state().clone() for g in solver.generators()],
            "rng": torch.get_rng_state().clone()}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _other_states():
    """Checkpoints that do not fit the solver of make_seed_solver(), each with what its error names."""
    def saved(**kwargs):
        other = make_seed_solver(num_iters=40, **kwargs)
        other.run()
        return other.state_dict()

    wider_outer = saved()
    wider_outer["outer"] = {"weight": torch.ones(1, DIM + 1)}
    bigger_batches = saved()
    bigger_batches["loaders"]["inner"]["position"] = 7        # 3 batches per epoch here
    generator = saved(approx=make_approx({"name": "nystrom", "rank": 5, "rho": 0.1}, seed=1))
    bad_optimizer = saved()
    bad_optimizer["outer_optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3)
    bad_rng = saved()
    bad_rng["rng"]["torch"] = torch.zeros(3, dtype=torch.uint8)
    return [(wider_outer, "outer module"), (bigger_batches, "batches per epoch"),
            (generator, "IHVP generator"), (bad_optimizer, "outer optimizer's 'momentum_buffer'"),
            (bad_rng, "random state"), ({**saved(), "format": 1}, "format 2")]


def test_failed_load_leaves_the_solver_exactly_as_it_was():
    solver = make_seed_solver(num_iters=30)
    solver.run()
    states = _other_states()
    before = _snapshot(solver)
    for state, named in states:
        with pytest.raises(ValueError, match=named):
            solver.load_state_dict(state)
        assert _same(_snapshot(solver), before), named
    solver.num_iters = 50                                       # and it still runs on from where it was
    solver.run()
    assert solver.global_step == 50


def test_a_load_that_fails_while_applying_is_rolled_back(monkeypatch):
    solver = make_seed_solver(num_iters=30)
    solver.run()
    state = make_seed_solver(num_iters=20)
    state.run()
    state = state.state_dict()
    before = _snapshot(solver)
    real, calls = solver.recorder.load_state_dict, []

    def fails_once(saved):          # applying fails half-way; the rollback's own call goes through
        calls.append(saved)
        if len(calls) == 1:
            raise OSError("disk")
        real(saved)

    monkeypatch.setattr(solver.recorder, "load_state_dict", fails_once)
    with pytest.raises(ValueError, match="could not be applied.*left as it was"):
        solver.load_state_dict(state)
    monkeypatch.undo()
    assert _same(_snapshot(solver), before)


def test_checkpoint_loads_with_weights_only(tmp_path):
    from hg_dist import checkpoint

    def build():
        return make_seed_solver(num_iters=40, inner_optimizer=functools.partial(diff_adam, lr=0.01),
                                approx=make_approx({"name": "nystrom", "rank": 5, "rho": 0.1}, seed=2))

    torch.manual_seed(4)
    straight = build()
    straight.run()
    torch.manual_seed(4)
    first = build()
    first.num_iters = 23
    first.run()
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt")                   # torch's default: weights_only=True
    resumed = build()
    resumed.load_state_dict(state)
    resumed.run()
    assert torch.equal(resumed.inner_params[0], straight.inner_params[0])
    assert torch.equal(resumed.outer.weight, straight.outer.weight)
    # the file helpers: atomic save, and errors that name a damaged file
    path = checkpoint.save(first, tmp_path / "solver.pt")
    again = build()
    checkpoint.load(again, path)
    assert again.global_step == 23
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read the checkpoint .*solver.pt.*corrupt, truncated"):
        checkpoint.load(build(), path)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoint.load(build(), tmp_path / "missing.pt")


def test_recorder_archive_and_flush_behave_as_in_the_seed():
    recorder = Recorder()
    for value in (1.0, torch.tensor(2.0), 3):
        recorder.add("loss", value)
    recorder.add("acc", 0.5)
    assert recorder.archive == {"loss": [1.0, 2.0, 3.0], "acc": [0.5]}
    assert recorder.flush() == {"loss": 2.0, "acc": 0.5}       # means since the last flush
    recorder.add("loss", 10.0)
    recorder.add("loss", 20.0)
    assert recorder.flush() == {"loss": 15.0}                  # acc had nothing new
    assert recorder.flush() == {}
    assert recorder.archive["loss"] == [1.0, 2.0, 3.0, 10.0, 20.0]


def test_seed_code_reads_the_recorder_archive():
    solver = make_seed_solver(num_iters=40, solver_cls=LossReturning)
    solver.run()
    archive = solver.recorder.archive
    assert len(archive["inner_loss"]) == 40 and len(archive["hypergrad_norm"]) == 3
    assert archive["hypergrad_norm"][-1] == solver.recorder.latest()["hypergrad_norm"]
    means = solver.recorder.flush()
    assert means["inner_loss"] == pytest.approx(sum(archive["inner_loss"]) / 40)


# ---- NaN / inf guard ---------------------------------------------------------------------

class NaNOuter(Solver):
    """The seed solver with a NaN outer loss: every hypergradient is NaN."""

    def outer_forward(self, in_params, out_params, input, target):
        return super().outer_forward(in_params, out_params, input, target) * math.nan


def test_nonfinite_hypergradient_raises_and_leaves_outer_params_untouched():
    solver = make_seed_solver(num_iters=30, solver_cls=NaNOuter)
    with pytest.raises(hg_dist.NonFiniteHypergradientError, match="non-finite"):
        solver.run()
    assert solver.global_step == 10 and solver.outer_step == 0
    assert torch.equal(solver.outer.weight, torch.ones(1, DIM))
    assert all(t.isfinite().all() for t in solver.inner_params)


def test_nan_policy_skip_outer_skips_and_continues():
    solver = make_seed_solver(num_iters=30, solver_cls=NaNOuter, nan_policy="skip_outer")
    with pytest.warns(RuntimeWarning, match=r"skipped the outer step at step \d+") as record:
        solver.run()
    skipped = [str(w.message)[:34] for w in record if issubclass(w.category, RuntimeWarning)]
    assert skipped == ["skipped the outer step at step 10 ", "skipped the outer step at step 20 "]
    assert solver.global_step == 30 and solver.outer_step == 0 and solver.skipped_outer_steps == 2
    assert torch.equal(solver.outer.weight, torch.ones(1, DIM)) and solver.outer.weight.grad is None
    assert solver.recorder.latest()["skipped_outer_steps"] == 2


class LossReturning(Solver):
    def inner_update(self):
        input, target = next(self.inner_loader)
        grads, loss = torch.func.grad_and_value(self.inner_forward)(self.inner_params, self.outer_params(),
                                                                    input, target)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)
        return loss


@pytest.mark.parametrize("nan_policy", ["raise", "skip_outer"])
def test_nonfinite_inner_loss_raises_and_rolls_back(nan_policy):
    solver = make_seed_solver(num_iters=30, solver_cls=LossReturning, nan_policy=nan_policy)
    (xt, yt), _ = logistic_data()
    bad = xt[:20].clone()
    bad[0, 0] = math.inf
    batches = [(xt[:20], yt[:20])] * 4 + [(bad, yt[:20])]
    solver.inner_loader = InfiniteLoader(batches, "inner_loader")
    with pytest.raises(NonFiniteLossError, match="inner_update at step 4 returned non-finite inner_loss"):
        solver.run()
    assert solver.inner_step == 4
    assert all(t.isfinite().all() for t in solver.inner_params)
    assert solver.recorder.latest()["inner_loss"] == pytest.approx(val_loss_on(solver, xt[:20], yt[:20]), rel=0.5)


def val_loss_on(solver, x, y):
    with torch.no_grad():
        return F.binary_cross_entropy_with_logits(solver.inner_func(solver.inner_params, x), y).item()


# ---- unrolled solver ---------------------------------------------------------------------

A = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]], dtype=torch.float64)
TARGET = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)


def quad_inner(theta: Tensor, phi: Tensor) -> Tensor:
    """f(θ, φ) = ½ θᵀAθ − φᵀθ, minimised at θ* = A⁻¹φ."""
    return 0.5 * theta @ A @ theta - phi @ theta


def quad_outer(theta: Tensor) -> Tensor:
    return 0.5 * (theta - TARGET).pow(2).sum()


class Phi(nn.Module):
    def __init__(self):
        super().__init__()
        self.phi = nn.Parameter(torch.tensor([0.3, 0.2, -0.1]))


class QuadUnrolled(BaseUnrolledSolver):
    def inner_update(self):
        next(self.inner_loader)
        phi = tuple(self.outer.parameters())
        grads = torch.func.grad(lambda p: quad_inner(p[0], phi[0]))(self.inner_params)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)

    def outer_update(self):
        loss = quad_outer(self.inner_params[0])
        self.outer_grad = self.unrolled_hypergradient(loss)
        self.grads.append(self.outer.phi.grad.clone())
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)
        return loss


class QuadImplicit(BaseImplicitSolver):
    def inner_update(self):
        next(self.inner_loader)
        grads = torch.func.grad(lambda p: quad_inner(p[0], self.outer_params()[0]))(self.inner_params)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)

    def outer_update(self):
        self.grads.append(self.approx_ihvp(lambda i, o: quad_inner(i[0], o[0]), lambda i, o: quad_outer(i[0]),
                                           self.inner_params, self.outer_params())[0])
        self.outer_grad = (self.grads[-1],)
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)


def quad_solver(cls, num_iters, unroll_steps, lr=0.1, patience=0, *extra):
    inner = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        inner.weight.zero_()
    inner.weight = nn.Parameter(torch.zeros(3))
    outer = Phi()
    solver = cls(inner, outer, [0], [0], *extra, num_iters=num_iters, unroll_steps=unroll_steps,
                 inner_optimizer=functools.partial(diff_sgd, lr=lr, momentum=0, weight_decay=0),
                 outer_optimizer=SGD(outer.parameters(), lr=0.0), outer_patience_iters=patience)
    solver.grads = []
    return solver


def reference_unroll(phi: Tensor, theta0: Tensor, steps: int, lr: float = 0.1) -> Tensor:
    theta = theta0
    for _ in range(steps):
        theta = theta - lr * (A @ theta - phi)
    return quad_outer(theta)


@pytest.mark.parametrize("patience", [0, 13])
def test_unrolled_solver_backpropagates_through_the_last_unroll_steps(patience):
    solver = quad_solver(QuadUnrolled, num_iters=25, unroll_steps=5, patience=patience)
    solver.run()
    # outer steps at i = 5, 10, ... (or 15, 20 with patience 13); each sees exactly 5 inner steps
    expected_steps = [i for i in range(25) if i > 0 and i >= patience and i % 5 == 0]
    assert len(solver.grads) == len(expected_steps)
    # the window of the outer step at i = first is inner steps first-4 .. first (5 steps)
    first = expected_steps[0]
    phi = solver.outer.phi.detach()
    theta = torch.zeros(3)
    for _ in range(first + 1 - 5):
        theta = theta - 0.1 * (A @ theta - phi)
    expected = torch.func.grad(reference_unroll)(phi, theta, 5)
    assert torch.allclose(solver.grads[0], expected, atol=1e-12)
    theta = theta0 = torch.zeros(3)
    for _ in range(first + 1 - 6):
        theta = theta - 0.1 * (A @ theta - phi)
    assert not torch.allclose(solver.grads[0], torch.func.grad(reference_unroll)(phi, theta, 6), atol=1e-3)
    del theta0


def test_long_unroll_agrees_with_the_implicit_hypergradient():
    unrolled = quad_solver(QuadUnrolled, num_iters=401, unroll_steps=400, lr=0.3)
    implicit = quad_solver(QuadImplicit, 401, 400, 0.3, 0, functools.partial(approx_hypergrad.exact))
    with pytest.warns(UserWarning, match="no outer step"):
        quad_solver(QuadUnrolled, num_iters=400, unroll_steps=400)
    unrolled.run()
    implicit.run()
    exact = torch.linalg.solve(A, torch.linalg.solve(A, unrolled.outer.phi.detach()) - TARGET)
    assert torch.allclose(implicit.grads[0], exact, atol=1e-10)
    assert torch.allclose(unrolled.grads[0], exact, atol=1e-8)


# ---- logging, callbacks, progress --------------------------------------------------------

def test_log_dir_gets_tensorboard_and_parquet_history_and_callbacks_see_metrics(tmp_path):
    import pyarrow.parquet as pq

    seen = []
    solver = make_seed_solver(num_iters=30, log_freq=10, log_dir=tmp_path, callbacks=[lambda s, m: seen.append(m)])
    metrics = solver.run()
    rows = pq.read_table(tmp_path / "history.parquet").to_pylist()
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[0]["hypergrad_norm"] is None and rows[1]["hypergrad_norm"] > 0  # first outer step at i=10
    assert {"ihvp_num_hvps", "step_time", "outer_step"} <= set(rows[-1])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(seen) == 2 and seen[-1]["outer_step"] == 2 and seen[-1]["ihvp_num_hvps"] == 5
    assert metrics["hypergrad_norm"] == rows[-1]["hypergrad_norm"]


def test_progress_bar_is_off_without_a_terminal_and_draws_when_asked():
    quiet = io.StringIO()
    solver = make_seed_solver(num_iters=20, solver_cls=LossReturning, callbacks=[ProgressBar(file=quiet)])
    solver.progress = False
    solver.run()
    assert quiet.getvalue() == ""
    loud = io.StringIO()
    solver = make_seed_solver(num_iters=20, solver_cls=LossReturning)
    solver.progress = False
    solver.callbacks = (ProgressBar(enabled=True, file=loud, min_interval=0.0),)
    solver.run()
    assert "20/20" in loud.getvalue() and "inner_loss=" in loud.getvalue()


def test_recorder_rejects_non_scalars():
    recorder = Recorder()
    recorder.add("x", torch.ones(3))
    with pytest.raises(ValueError, match="'x' must be a scalar"):
        recorder.latest()


# ---- experiment config ----------------------------------------------------------------

def test_config_from_args_puts_example_flags_in_extra():
    parser = experiment.add_common_args(argparse.ArgumentParser())
    parser.add_argument("--noise", type=float, default=0.4)
    config = experiment.config_from_args(parser.parse_args(["--approx", "cg", "--ihvp-iters", "7", "--noise",
                                                            "0.3", "--workers", "2"]))
    assert (config.approximator["name"], config.approximator["num_iters"], config.workers, config.extra) == \
        ("cg", 7, 2, {"noise": 0.3})


def test_parse_config_reports_bad_settings_as_usage_errors(capsys):
    parser = experiment.add_common_args(argparse.ArgumentParser(prog="example"))
    with pytest.raises(SystemExit) as exit_info:
        experiment.parse_config(parser, ["--rank", "0"])
    assert exit_info.value.code == 2
    assert "example: error: approximator: rank must be >= 1, got 0" in capsys.readouterr().err
    assert experiment.parse_config(parser, ["--rank", "3"]).approximator["rank"] == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"approximator": {"name": "lissa"}}, "approximator: unknown IHVP method 'lissa'; use one of"),
    ({"approximator": {"name": "nystrom", "rho": 0.0}}, "rho must be > 0, got 0.0 \\(nystrom\\)"),
    ({"num_iters": 10, "unroll_steps": 20}, "unroll_steps"),
    ({"workers": 0}, "workers"),
    ({"outer_optimizer": {"name": "rmsprop"}}, "unknown outer optimizer 'rmsprop'; use one of"),
])
def test_experiment_config_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        experiment.ExperimentConfig(**kwargs)


@pytest.mark.parametrize("name", METHODS.names())
def test_make_approx_binds_the_chosen_method(name):
    taken = {s.name for s in METHODS[name].settings}
    settings = {"rank": 3, "rho": 1e-9, "num_iters": 60, "lr": 0.3}
    approx = make_approx({"name": name, **{k: v for k, v in settings.items() if k in taken}}, seed=0)
    assert approx.method is METHODS[name] and approx.spec["name"] == name
    theta, phi = (torch.tensor([0.1, 0.2, 0.3]),), (torch.tensor([0.3, 0.2, -0.1]),)
    grads = approx(lambda i, o: quad_inner(i[0], o[0]), lambda i, o: quad_outer(i[0]), theta, phi)
    exact = torch.linalg.solve(A, theta[0] - TARGET)
    tol = 1e-4 if name == "neumann" else 1e-6  # Neumann converges linearly; the others are exact here
    assert torch.allclose(grads[0], exact, atol=tol)


def test_make_outer_optimizer():
    params = [nn.Parameter(torch.zeros(2))]
    sgd = make_outer_optimizer({"name": "sgd", "lr": 0.3, "momentum": 0.5}, params)
    adam = make_outer_optimizer({"name": "adam", "beta1": 0.8}, params)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.5 and sgd.defaults["lr"] == 0.3
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.8, 0.999)
