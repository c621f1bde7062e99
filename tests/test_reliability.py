"""The reliability matrix (issue 16): every bad input or fault ends in a clear error, nothing half-written.

Each case asserts the exception type (exit status 2 for a command-line usage error,
1 for a failed run), that the message names the cause (a specific regex), and that
nothing was changed or written: inputs and parameters untouched, solver state
unchanged, no files in the output folder (or, for a run that fails after it
started, ``result.json`` saying so). Linear-algebra routines are watched: a case
passes only if no ``torch.linalg`` routine saw a NaN/inf first.

Categories: IHVP methods and hypergradients (``API_CASES``), solvers, one-process
runs (``run_local``), the examples' command lines (``CLI_USAGE_CASES``,
``CLI_RUN_CASES``) and checkpoints (``CHECKPOINT_CASES``). No Ray.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from hg_dist import (IHVPDivergenceError, NonFiniteHypergradientError, approx_hypergrad, checkpoint, ihvp,
                     implicit_hypergradient, make_approx)
from hg_dist.data import ShardedLoader, full_batch
from hg_dist.experiment import ConfigError, ExperimentConfig, run_local
from hg_dist.hessian import HessianOperator
from hg_dist.optimizers import diff_sgd
from hg_dist.solver import BaseImplicitSolver, NonFiniteLossError
from hg_dist.ihvp import SettingAdvice

ROOT = Path(__file__).resolve().parents[1]
P = 12
NAN = float("nan")


# ---- watching linear algebra ------------------------------------------------------------------

WATCHED_LINALG = ("solve", "solve_ex", "pinv", "eigh", "eigvalsh", "svd", "matrix_norm", "qr", "cholesky", "lstsq")


@pytest.fixture
def linalg_sees_only_finite(monkeypatch):
    """Every watched ``torch.linalg`` routine fails the test if handed a NaN/inf tensor."""
    for name in WATCHED_LINALG:
        real = getattr(torch.linalg, name)

        def watched(*args, _real=real, _name=name, **kwargs):
            for arg in args:
                if isinstance(arg, torch.Tensor) and not bool(arg.isfinite().all()):
                    raise AssertionError(f"torch.linalg.{_name} saw a non-finite input")
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, watched)


# ---- problems -----------------------------------------------------------------------------------

def operator(matrix):
    return HessianOperator(matvec=lambda v: matrix @ v, matmat=lambda v: matrix @ v, size=matrix.shape[0])


class Problem:
    """Matrices with known spectra and a quadratic bilevel problem whose inner Hessian is one of them.

    ``f(θ, φ) = ½ θᵀHθ − φᵀθ``, ``g(θ, φ) = ½ ‖θ − t‖² + ½ ‖φ‖²`` (so ``∂²f/∂φ∂θ = −I``).
    """

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(P, P, generator=gen))
        self.spd = q @ torch.diag(torch.linspace(1.0, 10.0, P)) @ q.T          # λ_max = 10
        self.indefinite = q @ torch.diag(torch.linspace(-1.0, 10.0, P)) @ q.T  # λ_min = −1
        self.nan = self.spd.clone()
        self.nan[0, 1] = self.nan[1, 0] = NAN
        self.v = torch.randn(P, generator=gen)
        self.v_inf = self.v.clone()
        self.v_inf[3] = math.inf
        self.target = torch.randn(P, generator=gen)
        self.theta = (torch.randn(P, generator=gen),)
        self.phi = (torch.randn(P, generator=gen),)

    def inner(self, hessian):
        return lambda t, p: 0.5 * t[0] @ hessian @ t[0] - p[0] @ t[0]

    def outer(self, t, p):
        return 0.5 * ((t[0] - self.target) ** 2).sum() + 0.5 * (p[0] ** 2).sum()

    def tensors(self):
        return [self.spd, self.indefinite, self.v, self.v_inf, self.target, *self.theta, *self.phi]


def nan_theta_outer(problem):
    return lambda t, p: problem.outer(t, p) * torch.tensor(NAN)


def nan_phi_outer(problem):
    return lambda t, p: problem.outer(t, p) + NAN * p[0].sum()


def nan_hessian_inner(problem):
    """Finite value and ∂f/∂θ at θ = θ₀, NaN second derivatives: ``|θ − θ₀|³`` written as ``((θ − θ₀)²)^1.5``,
    whose autograd Hessian there is ``∞ · 0``."""
    def inner(t, p):
        return problem.inner(problem.spd)(t, p) + (((t[0] - problem.theta[0]) ** 2) ** 1.5).sum()
    return inner


def must_not_solve(op, v):
    raise AssertionError("the IHVP solve was called with a non-finite right-hand side")


SPECS = {
    "nystrom": {"name": "nystrom", "rank": P, "rho": 0.1},
    "cg": {"name": "cg", "num_iters": P},
    "neumann": {"name": "neumann", "num_iters": 10, "lr": 0.05},
    "nystrom_pcg": {"name": "nystrom_pcg", "rank": 4, "num_iters": P},
    "exact": {"name": "exact"},
}
METHOD_CALLS = {
    "nystrom": lambda op, v: ihvp.nystrom(op, v, rank=P, rho=0.1),
    "cg": lambda op, v: ihvp.cg(op, v, num_iters=P),
    "neumann": lambda op, v: ihvp.neumann(op, v, num_iters=10, alpha=0.05),
    "nystrom_pcg": lambda op, v: ihvp.nystrom_pcg(op, v, rank=4, num_iters=P),
    "exact": lambda op, v: ihvp.exact(op, v),
}
NAN_OPERATOR_TERM = {"nystrom": r"the Hessian columns C = H\[:, K\] \(nystrom\)",
                     "cg": r"the Hessian-vector products \(cg\)",
                     "neumann": r"the Hessian-vector products \(neumann\)",
                     "nystrom_pcg": r"the Hessian sketch Y = HΩ \(nystrom_pcg\)",
                     "exact": r"the dense Hessian \(exact\)"}


def _api_cases():
    cases = {
        # the divergences
        "neumann lr=100 at λ_max=10, hypergradient": (
            lambda pb: approx_hypergrad.neumann(pb.inner(pb.spd), pb.outer, pb.theta, pb.phi, num_iters=10, lr=100.0),
            IHVPDivergenceError, r"diverged.*lr < 2/λ_max ≈ 0\.2, e\.g\. lr=0\.1"),
        "neumann lr=100 at λ_max=10, operator": (
            lambda pb: ihvp.neumann(operator(pb.spd), pb.v, num_iters=10, alpha=100.0),
            IHVPDivergenceError, r"λ_max\(A\) ≈ 10 .*lr < 2/λ_max ≈ 0\.2, e\.g\."),
        "neumann lr=0.22 just above 2/λ_max": (
            lambda pb: ihvp.neumann(operator(pb.spd), pb.v, num_iters=40, alpha=0.22),
            IHVPDivergenceError, r"grew .*× over 40 products.*lr < 2/λ_max ≈ 0\.2"),
        "neumann on an indefinite Hessian": (
            lambda pb: ihvp.neumann(operator(pb.indefinite), pb.v, num_iters=80, alpha=0.05),
            IHVPDivergenceError, r"not positive definite.*no lr makes the series converge; raise rho above"),
        "cg on an indefinite Hessian": (
            lambda pb: ihvp.cg(operator(pb.indefinite), pb.v, num_iters=P),
            IHVPDivergenceError, r"cg diverged.*non-positive curvature.*raise rho above"),
        "nystrom_pcg on an indefinite Hessian": (
            lambda pb: ihvp.nystrom_pcg(operator(pb.indefinite), pb.v, rank=4, num_iters=P),
            IHVPDivergenceError, r"nystrom_pcg diverged.*non-positive curvature.*raise rho"),
        "cg on an indefinite Hessian, hypergradient": (
            lambda pb: make_approx(SPECS["cg"])(pb.inner(pb.indefinite), pb.outer, pb.theta, pb.phi),
            IHVPDivergenceError, r"cg diverged.*raise rho above"),
        # non-finite inputs, before any solve
        "NaN ∂g/∂θ never reaches the solve": (
            lambda pb: implicit_hypergradient(pb.inner(pb.spd), nan_theta_outer(pb), pb.theta, pb.phi, must_not_solve),
            NonFiniteHypergradientError, r"the outer gradient w\.r\.t\. the inner params \(v = ∂g/∂θ\)"),
        "NaN ∂g/∂φ never reaches the solve": (
            lambda pb: implicit_hypergradient(pb.inner(pb.spd), nan_phi_outer(pb), pb.theta, pb.phi, must_not_solve),
            NonFiniteHypergradientError, r"the outer gradient w\.r\.t\. the outer params \(∂g/∂φ\)"),
        "on_divergence neither raise nor warn": (
            lambda pb: ihvp.neumann(operator(pb.spd), pb.v, num_iters=3, alpha=0.1, on_divergence="ignore"),
            ValueError, r"on_divergence must be one of \('raise', 'warn'\)"),
        "estimate_lambda_max with 0 steps": (
            lambda pb: ihvp.estimate_lambda_max(operator(pb.spd), pb.v, iters=0),
            ValueError, r"iters must be >= 1, got 0"),
        "estimate_lambda_max of a NaN operator": (
            lambda pb: ihvp.estimate_lambda_max(operator(pb.nan), pb.v),
            NonFiniteHypergradientError, r"Hessian-vector products of the Lanczos eigenvalue estimate"),
        # dtypes and devices
        "integer parameters": (
            lambda pb: approx_hypergrad.exact(pb.inner(pb.spd), pb.outer, (torch.ones(P, dtype=torch.int64),), pb.phi),
            TypeError, r"in_params\[0\] has dtype torch\.int64; parameters must be one of"),
        "complex parameters": (
            lambda pb: approx_hypergrad.exact(pb.inner(pb.spd), pb.outer, pb.theta, (pb.phi[0].to(torch.complex128),)),
            TypeError, r"out_params\[0\] has dtype torch\.complex128"),
        "float8 parameters": (
            lambda pb: approx_hypergrad.exact(pb.inner(pb.spd), pb.outer, (pb.theta[0].to(torch.float8_e5m2),), pb.phi),
            TypeError, r"in_params\[0\] has dtype torch\.float8_e5m2"),
        "meta parameters": (
            lambda pb: approx_hypergrad.exact(pb.inner(pb.spd), pb.outer, (torch.empty(P, device="meta"),), pb.phi),
            TypeError, r"in_params\[0\] is on the meta device.*materialize"),
        "mixed dtypes": (
            lambda pb: approx_hypergrad.exact(pb.inner(pb.spd), pb.outer, pb.theta, (pb.phi[0].float(),)),
            TypeError, r"out_params\[0\] is torch\.float32 on cpu but in_params\[0\] is torch\.float64"),
    }
    for name, call in METHOD_CALLS.items():
        cases[f"{name}: NaN Hessian operator"] = (
            lambda pb, call=call: call(operator(pb.nan), pb.v), NonFiniteHypergradientError, NAN_OPERATOR_TERM[name])
        cases[f"{name}: inf right-hand side"] = (
            lambda pb, call=call: call(operator(pb.spd), pb.v_inf), NonFiniteHypergradientError,
            rf"the right-hand side v \({name}\); the outer loss")
        cases[f"{name}: NaN ∂g/∂θ, hypergradient"] = (
            lambda pb, name=name: make_approx(SPECS[name], seed=0)(pb.inner(pb.spd), nan_theta_outer(pb), pb.theta,
                                                                   pb.phi),
            NonFiniteHypergradientError, r"the outer gradient w\.r\.t\. the inner params \(v = ∂g/∂θ\).*\(before the IHVP solve\)")
        cases[f"{name}: NaN second derivatives of f, hypergradient"] = (
            lambda pb, name=name: make_approx(SPECS[name], seed=0)(nan_hessian_inner(pb), pb.outer, pb.theta, pb.phi),
            NonFiniteHypergradientError, NAN_OPERATOR_TERM[name])
    return cases


API_CASES = _api_cases()


@pytest.mark.parametrize("name", list(API_CASES))
def test_api(name, linalg_sees_only_finite):
    call, error, pattern = API_CASES[name]
    problem = Problem()
    before = [t.clone() for t in problem.tensors()]
    with pytest.raises(error, match=pattern):
        call(problem)
    for was, now in zip(before, problem.tensors()):
        assert torch.equal(was, now), "an input was changed"


def test_the_nan_hessian_problem_has_finite_first_derivatives():
    """The NaN-Hessian cases above fail on the second derivatives, not earlier."""
    problem = Problem()
    inner = nan_hessian_inner(problem)
    grads, value = torch.func.grad_and_value(inner)(problem.theta, problem.phi)
    assert math.isfinite(float(value)) and bool(grads[0].isfinite().all())


# ---- solvers ------------------------------------------------------------------------------------

D = 5


class Decay(nn.Module):
    def __init__(self, dim=D):
        super().__init__()
        self.log_decay = nn.Parameter(torch.zeros(1, dim))


class Ridge(BaseImplicitSolver):
    """Ridge regression with per-feature decays exp(φ): a convex inner problem."""

    def inner_forward(self, theta, phi, x, y):
        return F.mse_loss(self.inner_func(theta, x), y) / 2 + (phi[0].exp() * theta[0] ** 2).sum() / 2

    def outer_forward(self, theta, phi, x, y):
        return F.mse_loss(self.inner_func(theta, x), y) / 2


def make_solver(*, approx=None, batch_size=20, outer_lr=0.1, inner_lr=0.1, num_iters=30, unroll_steps=10, **kwargs):
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(100, D, generator=gen), torch.randn(D, 1, generator=gen)
    y = x @ w + 0.1 * torch.randn(100, 1, generator=gen)
    inner = nn.Linear(D, 1, bias=False)
    nn.init.zeros_(inner.weight)
    outer = Decay(D)
    return Ridge(inner, outer, ShardedLoader(TensorDataset(x[:60], y[:60]), batch_size, seed=0),
                 full_batch(TensorDataset(x[60:], y[60:])),
                 approx or make_approx({"name": "nystrom", "rank": 3, "rho": 0.1}, seed=0),
                 num_iters=num_iters, unroll_steps=unroll_steps,
                 inner_optimizer=functools.partial(diff_sgd, lr=inner_lr, momentum=0, weight_decay=0),
                 outer_optimizer=torch.optim.SGD(outer.parameters(), lr=outer_lr), **kwargs)


def snapshot(solver):
    """Everything a failed step or load could change, copied."""
    return {"inner": [t.clone() for t in solver.inner_params],
            "outer": {k: v.clone() for k, v in solver.outer.state_dict().items()},
            "outer_optimizer": copy.deepcopy(solver.outer_optimizer.state_dict()),
            "counters": (solver.global_step, solver.inner_step, solver.outer_step, solver.skipped_outer_steps),
            "loaders": (solver.inner_loader.state_dict(), solver.outer_loader.state_dict()),
            "history": copy.deepcopy(solver.recorder.history),
            "generators": [g.get_state().clone() for g in solver.generators()]}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_solver_with_a_diverging_neumann_stops_before_the_outer_step():
    solver = make_solver(approx=make_approx({"name": "neumann", "num_iters": 10, "lr": 100.0}))
    outer_before = solver.outer.log_decay.detach().clone()
    with pytest.raises(IHVPDivergenceError, match=r"lr < 2/λ_max ≈ .*, e\.g\. lr="):
        solver.run()
    assert torch.equal(solver.outer.log_decay, outer_before) and solver.outer_step == 0
    assert solver.outer.log_decay.grad is None


def test_solver_whose_outer_step_blows_up_the_inner_loss_names_the_outer_rate():
    solver = make_solver(outer_lr=1e7)
    with pytest.raises(NonFiniteLossError,
                       match=r"step 11 .*directly follows the outer step at step 10.*outer optimizer's lr") as info:
        solver.run()
    assert info.value.advice == (SettingAdvice("outer_optimizer", "lr"),)
    assert solver.outer_step == 1 and solver.inner_step == 11
    assert all(bool(t.isfinite().all()) for t in solver.inner_params)  # rolled back to before the bad step


def test_solver_whose_inner_steps_diverge_names_the_inner_rate():
    solver = make_solver(inner_lr=1e10, unroll_steps=29)
    with pytest.raises(NonFiniteLossError, match=r"no outer step has been taken yet, so lower the inner "
                                                 r"optimizer's lr") as info:
        solver.run()
    assert info.value.setting == "lr" and info.value.advice[0].scope == "inner_optimizer"
    assert solver.outer_step == 0 and all(bool(t.isfinite().all()) for t in solver.inner_params)


def test_skip_outer_drops_diverged_steps_and_goes_on():
    solver = make_solver(approx=make_approx({"name": "neumann", "num_iters": 10, "lr": 100.0}),
                         nan_policy="skip_outer")
    outer_before = solver.outer.log_decay.detach().clone()
    with pytest.warns(RuntimeWarning, match="skipped the outer step at step .*diverged") as caught:
        solver.run()
    assert [re.match(r"skipped the outer step at step (\d+) ", str(w.message)).group(1) for w in caught] == ["10", "20"]
    assert solver.skipped_outer_steps == 2 and solver.outer_step == 0 and solver.global_step == 30
    assert torch.equal(solver.outer.log_decay, outer_before)


# ---- sharding: no example is dropped because of the worker count ---------------------------------------

def dataset(n):
    return TensorDataset(torch.arange(n))


SHARDING_CASES = {
    "global batch not a multiple of the workers": (lambda: ShardedLoader(dataset(101), 51, world_size=2),
                                                   r"batch_size=51 is not a multiple of workers=2"),
    "full batch not a multiple of the workers": (lambda: full_batch(dataset(201), 0, 2),
                                                 r"full batch of 201 examples cannot be split equally over workers=2"),
    "more workers than examples": (lambda: ShardedLoader(dataset(1), 1, world_size=2),
                                   r"workers=2 is more than the 1 examples"),
    "no examples": (lambda: full_batch(dataset(0)), r"there are no examples to load"),
}


@pytest.mark.parametrize("name", list(SHARDING_CASES))
def test_sharding_refuses_unequal_shares(name):
    make, pattern = SHARDING_CASES[name]
    with pytest.raises(ValueError, match=pattern):
        make()


def test_two_workers_see_exactly_one_process_batches():
    """Batch j of the two ranks together is batch j of one process, full batches included: nothing left out."""
    one = ShardedLoader(dataset(101), 50, seed=3)
    ranks = [ShardedLoader(dataset(101), 50, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(5):
        together = torch.cat([next(loader)[0] for loader in ranks])
        assert torch.equal(together, next(one)[0])
    halves = [next(full_batch(dataset(200), r, 2))[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), torch.arange(200))


# ---- one-process runs (run_local) -----------------------------------------------------------------

def load_example(name):
    spec = importlib.util.spec_from_file_location(f"reliability_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def examples():
    pytest.importorskip("sklearn")
    return {name: load_example(name) for name in ("logistic_regression", "data_hypercleaning", "dataset_distillation")}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder holding one file, ``afile``; cases write (or must not write) under it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    return tmp_path


def listing(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


LOCAL_CONFIG_CASES = {
    "output is an existing file": ({"output": "afile"}, r"--output 'afile' is an existing file; it must be a folder"),
    "output under a file": ({"output": "afile/run"}, r"'afile/run' cannot be created: 'afile' is a file"),
    "output in an unwritable place": ({"output": "/proc/hg_dist_run"}, r"'/proc/hg_dist_run' cannot be written"),
    "build fails on a bad extra setting": ({"extra": {"n_train": 0}},
                                           r"cannot be built from this config: n_train \(--n-train\) must be >= 1"),
    "rank above the inner parameters": ({"approximator": {"name": "nystrom", "rank": 31, "rho": 0.1}},
                                        r"--rank: rank must be <= 30, got 31 \(nystrom\)"),
}


@pytest.mark.parametrize("name", list(LOCAL_CONFIG_CASES))
def test_run_local_refuses_before_writing(name, examples, workdir):
    fields, pattern = LOCAL_CONFIG_CASES[name]
    config = ExperimentConfig(**{"num_iters": 20, "unroll_steps": 10, "output": "out", **fields})
    before = listing(workdir)
    with pytest.raises(ConfigError, match=pattern):
        run_local(examples["logistic_regression"].build_solver, config)
    assert listing(workdir) == before


def _result(folder):
    return json.loads((folder / "result.json").read_text())


def test_run_local_marks_a_failed_run(examples, workdir):
    config = ExperimentConfig(approximator={"name": "neumann", "lr": 100.0}, num_iters=30, unroll_steps=10,
                              output="out")
    with pytest.raises(IHVPDivergenceError, match=r"e\.g\. lr="):
        run_local(examples["logistic_regression"].build_solver, config)
    result = _result(workdir / "out")
    assert result["status"] == "failed" and result["error"].startswith("IHVPDivergenceError: the Neumann series")
    assert result["outer_steps"] == 0 and result["global_step"] == 10


def test_run_local_marks_an_interrupted_run(examples, workdir):
    def build_interrupted(config, rank=0, world_size=1):
        solver = examples["logistic_regression"].build_solver(config, rank, world_size)

        def interrupt(solver, metrics):
            raise KeyboardInterrupt

        solver.callbacks = (interrupt,)
        return solver

    with pytest.raises(KeyboardInterrupt):
        run_local(build_interrupted, ExperimentConfig(num_iters=30, unroll_steps=10, output="out"))
    result = _result(workdir / "out")
    assert result["status"] == "interrupted" and result["error"] == "KeyboardInterrupt"
    assert result["outer_steps"] == 1


def test_run_local_marks_a_completed_run(examples, workdir):
    metrics = run_local(examples["logistic_regression"].build_solver,
                        ExperimentConfig(num_iters=20, unroll_steps=10, output="out"))
    result = _result(workdir / "out")
    assert result["status"] == "completed" and result["error"] is None and result["metrics"] == metrics


# ---- the examples' command lines --------------------------------------------------------------------

CLI_USAGE_CASES = [
    # (example, flags, what the one error line must say)
    ("logistic_regression", ["--n-train", "0"], r"n_train \(--n-train\) must be >= 1, got 0"),
    ("logistic_regression", ["--n-train", "-3"], r"n_train \(--n-train\) must be >= 1, got -3"),
    ("logistic_regression", ["--n-train", "ten"], r"argument --n-train: invalid int value: 'ten'"),
    ("logistic_regression", ["--batch-size", "0"], r"batch_size \(--batch-size\) must be >= 1, got 0"),
    ("logistic_regression", ["--batch-size", "500"], r"batch_size must be in \[1, 100\], got 500"),
    ("logistic_regression", ["--batch-size", "51", "--workers", "2"],
     r"batch_size=51 is not a multiple of workers=2.*--batch-size 50 or 52"),
    ("logistic_regression", ["--n-train", "1", "--workers", "2"], r"workers=2 is more than the 1 examples"),
    ("logistic_regression", ["--dim", "0"], r"dim \(--dim\) must be >= 1, got 0"),
    ("logistic_regression", ["--informative", "50"], r"informative \(--informative\) must be <= dim \(--dim 30\)"),
    ("logistic_regression", ["--inner-lr", "0"], r"inner_lr \(--inner-lr\) must be > 0, got 0\.0"),
    ("logistic_regression", ["--inner-lr", "nan"], r"inner_lr \(--inner-lr\) must be > 0, got nan"),
    ("logistic_regression", ["--output", "afile"], r"--output 'afile' is an existing file"),
    ("logistic_regression", ["--output", "afile/run"], r"'afile' is a file, not a folder"),
    ("logistic_regression", ["--output", "/proc/hg_dist_run"], r"'/proc/hg_dist_run' cannot be written"),
    ("logistic_regression", ["--rank", "31"], r"--rank: rank must be <= 30, got 31"),
    ("logistic_regression", ["--rank", "0"], r"approximator: rank must be >= 1, got 0"),
    ("logistic_regression", ["--rho", "0"], r"approximator: rho must be > 0, got 0\.0 \(nystrom\)"),
    ("logistic_regression", ["--approx", "lissa"], r"argument --approx: invalid choice: 'lissa'"),
    ("logistic_regression", ["--ihvp-lr", "0.1"], r"--ihvp-lr: not a setting of the IHVP method 'nystrom'"),
    ("logistic_regression", ["--approx", "neumann", "--ihvp-lr", "-1"], r"lr must be > 0, got -1\.0 \(neumann\)"),
    ("logistic_regression", ["--num-iters", "0"], r"num_iters must be >= 1, got 0"),
    ("logistic_regression", ["--unroll-steps", "50"], r"unroll_steps must be in \[1, 20\], got 50"),
    ("logistic_regression", ["--workers", "0"], r"workers must be >= 1, got 0"),
    ("logistic_regression", ["--seed", "-1"], r"seed must be in \[0, 4294967295\], got -1"),
    ("logistic_regression", ["--seed", str(2**64 + 1)], r"seed must be in \[0, 4294967295\], got 18446744073709551617; "
                                                         r"it seeds torch, Python and NumPy, whose seeds are 32-bit"),
    ("logistic_regression", ["--seed", str(2**32)], r"seed must be in \[0, 4294967295\], got 4294967296"),
    ("logistic_regression", ["--outer-lr", "-0.1"], r"outer_optimizer: lr must be >= 0, got -0\.1 \(adam\)"),
    ("data_hypercleaning", ["--noise", "1.5"], r"noise \(--noise\) must be >= 0 and <= 1, got 1\.5"),
    ("data_hypercleaning", ["--n-val", "0"], r"n_val \(--n-val\) must be >= 1, got 0"),
    ("data_hypercleaning", ["--n-train", "1700"], r"--n-train \+ --n-val\) must be < 1797"),
    ("data_hypercleaning", ["--n-train", "199", "--workers", "2"],
     r"default batch is all n_train=199 .*not a multiple of --workers 2; use --n-train 198"),
    ("data_hypercleaning", ["--n-val", "301", "--workers", "2"],
     r"full batch of 301 examples cannot be split equally over workers=2"),
    ("data_hypercleaning", ["--batch-size", "0"], r"batch_size \(--batch-size\) must be >= 1, got 0"),
    ("data_hypercleaning", ["--batch-size", "2000"], r"batch_size must be in \[1, 200\], got 2000"),
    ("dataset_distillation", ["--images-per-class", "0"], r"images_per_class \(--images-per-class\) must be >= 1"),
    ("dataset_distillation", ["--images-per-class", "60"], r"must be >= 1 and <= 50, got 60"),
    ("dataset_distillation", ["--eval-steps", "-1"], r"eval_steps \(--eval-steps\) must be >= 0, got -1"),
    ("dataset_distillation", ["--batch-size", "5000"], r"batch_size must be in \[1, 1200\], got 5000"),
]
FAST = {"logistic_regression": ["--num-iters", "20", "--unroll-steps", "10"],
        "data_hypercleaning": ["--num-iters", "20", "--unroll-steps", "10", "--n-train", "200"],
        "dataset_distillation": ["--num-iters", "20", "--unroll-steps", "10", "--eval-steps", "5"]}


@pytest.fixture
def no_ray(monkeypatch):
    """A case that reached Ray would be a check that came too late."""
    import hg_dist.distributed.runner

    def refuse(*args, **kwargs):
        raise AssertionError("a usage error reached the distributed runner")

    monkeypatch.setattr(hg_dist.distributed.runner, "fit", refuse)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if ": error: " in line]


@pytest.mark.parametrize("example, flags, pattern", CLI_USAGE_CASES,
                         ids=[f"{e}:{' '.join(f)}" for e, f, _ in CLI_USAGE_CASES])
def test_cli_usage_error(example, flags, pattern, examples, workdir, no_ray, capsys):
    before = listing(workdir)
    with pytest.raises(SystemExit) as exit_info:
        examples[example].main([*FAST[example], "--output", "out", *flags])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and re.search(pattern, lines[0]), captured.err
    assert captured.out == ""
    assert listing(workdir) == before


CLI_RUN_CASES = [
    ("logistic_regression", ["--approx", "neumann", "--ihvp-lr", "100"], "IHVPDivergenceError",
     r"IHVPDivergenceError: the Neumann series diverged.*lr < 2/λ_max ≈ [\d.]+, e\.g\. lr=([\d.]+) "
     r"\(flags: --ihvp-lr \1\)$"),
    ("logistic_regression", ["--outer-lr", "1000"], "NonFiniteLossError",
     r"NonFiniteLossError: inner_update at step 11 .*lower the outer optimizer's lr \(flags: --outer-lr\)$"),
    ("dataset_distillation", ["--approx", "cg", "--ihvp-iters", "3"], "IHVPDivergenceError",
     r"cg diverged: .*non-positive curvature.*raise rho above .*\(e\.g\. rho=([\d.e+-]+)\).*\(flags: --rho \1\)$"),
]


@pytest.mark.parametrize("example, flags, error, pattern", CLI_RUN_CASES,
                         ids=[f"{e}:{' '.join(f)}" for e, f, _, _ in CLI_RUN_CASES])
def test_cli_failed_run_is_one_line_and_marked(example, flags, error, pattern, examples, workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        examples[example].main([*FAST[example], "--output", "out", *flags])
    assert exit_info.value.code == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and re.search(pattern, lines[0]), lines
    result = _result(workdir / "out")
    assert result["status"] == "failed" and result["error"].startswith(error)


def test_cli_divergence_in_a_real_process():
    """The issue's command: ``--approx neumann --ihvp-lr 100`` exited 0 after training on ~1e22 hypergradients."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"hg_dist_reliability_{os.getpid()}"
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / "logistic_regression.py"), "--approx", "neumann",
                               "--ihvp-lr", "100", "--num-iters", "20", "--output", str(out)],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 1 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert re.search(r"^logistic_regression\.py: error: IHVPDivergenceError: .*\(flags: --ihvp-lr [\d.]+\)$",
                         proc.stderr.strip())
        assert _result(out)["status"] == "failed"
    finally:
        import shutil
        shutil.rmtree(out, ignore_errors=True)


# ---- checkpoints ------------------------------------------------------------------------------------

def _trained(**kwargs):
    solver = make_solver(**kwargs)
    solver.run()
    return solver.state_dict()


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


class Unsafe:
    """Not a tensor or a plain value: ``weights_only=True`` refuses to unpickle it."""


def _truncated(path):
    checkpoint.save(make_solver(), path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _state_with(**changes):
    state = _trained(num_iters=20)
    for key, value in changes.items():
        state[key] = value
    state["checksum"] = checkpoint.payload_checksum(state)  # as a run that saved such a state would have
    return state


CHECKPOINT_CASES = {
    # file-level: checkpoint.load(solver, path) names the file
    "truncated file": (lambda d: _truncated(d / "ckpt.pt"), ValueError,
                       r"cannot read the checkpoint '.*ckpt\.pt': it is corrupt, truncated"),
    "empty file": (lambda d: _write(d / "ckpt.pt", b""), ValueError, r"cannot read the checkpoint '.*ckpt\.pt'"),
    "random bytes": (lambda d: _write(d / "ckpt.pt", bytes(range(256)) * 8), ValueError,
                     r"cannot read the checkpoint '.*ckpt\.pt'"),
    "missing file": (lambda d: d / "missing.pt", FileNotFoundError, r"no checkpoint at '.*missing\.pt'"),
    "a folder": (lambda d: d, ValueError, r"cannot read the checkpoint '.*': it is a folder"),
    "an object weights_only refuses": (lambda d: _write(d / "ckpt.pt", {"format": 2, "x": Unsafe()}), ValueError,
                                       r"cannot read the checkpoint '.*ckpt\.pt'.*(Weights only|weights_only)"),
    "a tensor, not a state": (lambda d: _write(d / "ckpt.pt", torch.zeros(3)), ValueError,
                              r"ckpt\.pt: state is not a solver state_dict of format 2 \(found 'Tensor'\)"),
    # state-level: what does not fit this solver (the file loads, the state does not apply)
    "another approximator": (lambda d: _write(d / "ckpt.pt", _trained(num_iters=20, approx=make_approx(
        {"name": "cg", "num_iters": 3}))), ValueError, r"ckpt\.pt: .*0 IHVP generator\(s\) but this solver has 1"),
    "another batch size": (lambda d: _write(d / "ckpt.pt", _trained(num_iters=17, batch_size=6)), ValueError,
                           r"ckpt\.pt: the saved loader position is batch 8 of an epoch, but this loader has 3"),
    "another outer shape": (lambda d: _write(d / "ckpt.pt", _state_with(outer={"log_decay": torch.zeros(1, D + 1)})),
                            ValueError, r"ckpt\.pt: the saved outer module has .*\(1, 6\).*build the outer module"),
    "another inner model": (lambda d: _write(d / "ckpt.pt", _state_with(inner_params=(torch.zeros(1, D - 1),))),
                            ValueError, r"ckpt\.pt: the saved inner parameters have shapes \[\(1, 4\)\]"),
    "another format": (lambda d: _write(d / "ckpt.pt", _state_with(format=1)), ValueError,
                       r"not a solver state_dict of format 2 \(found 1\)"),
    "malformed counters": (lambda d: _write(d / "ckpt.pt", _state_with(counters={"global_step": -1})), ValueError,
                           r"the saved counters .* are malformed"),
}


@pytest.mark.parametrize("name", list(CHECKPOINT_CASES))
def test_checkpoint_load(name, tmp_path):
    make_file, error, pattern = CHECKPOINT_CASES[name]
    path = make_file(tmp_path)
    solver = make_solver(num_iters=30)
    solver.num_iters = 10
    solver.run()
    solver.num_iters = 30
    before, rng = snapshot(solver), torch.get_rng_state()
    with pytest.raises(error, match=pattern):
        checkpoint.load(solver, path)
    assert same(snapshot(solver), before) and torch.equal(torch.get_rng_state(), rng)
    solver.run()  # and it runs on from where it was
    assert solver.global_step == 30


def test_checkpoint_save_to_a_folder_writes_nothing(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(IsADirectoryError, match=r"it is a folder; pass a file path"):
        checkpoint.save(make_solver(), tmp_path / "ckpt")
    assert listing(tmp_path) == {"ckpt": None}


def test_checkpoint_save_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = checkpoint.save(make_solver(), tmp_path / "ckpt.pt")
    saved = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=r"no space left on device while writing '.*ckpt\.pt'"):
        checkpoint.save(make_solver(), path)
    assert listing(tmp_path) == {"ckpt.pt": saved}  # the old checkpoint intact, no temporary file


def test_readme_checkpoint_flow_with_torch_defaults(tmp_path):
    """``torch.save(solver.state_dict(), path)`` then ``solver.load_state_dict(torch.load(path))``
    (``weights_only=True``, torch's default) resumes exactly."""
    straight = make_solver(num_iters=30)
    straight.run()
    first = make_solver(num_iters=30)
    first.num_iters = 15
    first.run()
    torch.save(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = make_solver(num_iters=30)
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    resumed.run()
    assert torch.equal(resumed.inner_params[0], straight.inner_params[0])
    assert torch.equal(resumed.outer.log_decay, straight.outer.log_decay)
