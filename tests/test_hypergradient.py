"""Hypergradients against closed forms and finite differences (float64).

``METHODS[name](d)`` makes a fresh approximator (with a freshly seeded generator for
the randomized ones, so repeated calls sample the same columns)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import grad, hessian, jacrev

from hg_dist import NonFiniteHypergradientError, approx_hypergrad, implicit_hypergradient, ihvp
from hg_dist.hessian import linearize, mixed_vjp
from hg_dist.utils import params_to_vector


def ridge_data(n, d, seed):
    """Training and validation data (x, y, x_val, y_val) and a decay λ > 0 of a ridge problem, in the default dtype."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    y = x @ torch.randn(d, generator=generator) + 0.1 * torch.randn(n, generator=generator)
    x_val = torch.randn(n, d, generator=generator)
    y_val = x_val @ torch.randn(d, generator=generator)
    return x, y, x_val, y_val, torch.rand(d, generator=generator) + 0.05


def ridge_problem(n=60, d=8, seed=0):
    """Ridge regression with per-feature weight decay λ; outer = validation MSE + 0.01‖λ‖².

    Returns ``(inner, outer, θ*, (λ,), closed_form, A)`` where ``closed_form(ρ)`` is
    the hypergradient with ``(A + ρI)⁻¹`` in place of ``A⁻¹`` (what a ρ-shifted IHVP
    targets; ``ρ = 0`` is the true hypergradient).
    """
    x, y, x_val, y_val, lam = ridge_data(n, d, seed)

    def inner(theta, phi):
        return ((x @ theta[0] - y) ** 2).mean() / 2 + (phi[0] * theta[0] ** 2).sum() / 2

    def outer(theta, phi):
        return ((x_val @ theta[0] - y_val) ** 2).mean() / 2 + 0.01 * (phi[0] ** 2).sum()

    a = x.T @ x / n + torch.diag(lam)
    theta_star = torch.linalg.solve(a, x.T @ y / n)
    grad_val = x_val.T @ (x_val @ theta_star - y_val) / n

    def closed_form(rho=0.0):
        # dθ*/dλ_i = −A⁻¹ e_i θ*_i  ⇒  dG/dλ = −(A⁻¹ ∇_θ g) ⊙ θ* + ∂g/∂λ
        return -torch.linalg.solve(a + rho * torch.eye(d), grad_val) * theta_star + 0.02 * lam

    return inner, outer, (theta_star,), (lam,), closed_form, a


NYSTROM_RHO = 0.05
SHIFT = {"nystrom": NYSTROM_RHO}  # the shift each method's target includes
METHODS = {
    "exact": lambda d: approx_hypergrad.exact,
    "cg": lambda d: functools.partial(approx_hypergrad.conjugate_gradient, num_iters=d, lr=1.0),
    "nystrom": lambda d: functools.partial(approx_hypergrad.nystrom, rank=d, rho=NYSTROM_RHO,
                                           generator=torch.Generator().manual_seed(0)),
    "neumann": lambda d: functools.partial(approx_hypergrad.neumann, num_iters=3000, lr=0.5),
    "nystrom_pcg": lambda d: functools.partial(approx_hypergrad.nystrom_pcg, rank=4, num_iters=d,
                                               generator=torch.Generator().manual_seed(0)),
}


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method", list(METHODS))
def test_ridge_closed_form(method):
    inner, outer, theta, phi, closed_form, a = ridge_problem()
    assert float(torch.linalg.eigvalsh(a).max()) < 2 / 0.5  # Neumann's step is valid
    result = METHODS[method](8)(inner, outer, theta, phi)
    assert isinstance(result, tuple) and len(result) == 1
    assert result[0].shape == phi[0].shape
    assert rel_err(result[0], closed_form(SHIFT.get(method, 0.0))) <= 1e-8
    assert result.stats.method == method


def test_low_budget_is_approximate_but_close():
    inner, outer, theta, phi, closed_form, _ = ridge_problem()
    result = approx_hypergrad.nystrom(inner, outer, theta, phi, rank=4, rho=0.1)
    cosine = torch.nn.functional.cosine_similarity(result[0], closed_form(), dim=0)
    assert 0.5 < float(cosine) < 1 - 1e-6  # an approximation, visibly not exact


def logistic_problem(n=80, d=5, seed=1):
    """Logistic regression (weight + bias) with per-feature weight decay exp(φ)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    labels = (x @ torch.randn(d, generator=generator) + 0.5 * torch.randn(n, generator=generator) > 0).double()
    x_val = torch.randn(n, d, generator=generator)
    labels_val = (x_val @ torch.randn(d, generator=generator) > 0).double()

    def inner(theta, phi):
        logits = x @ theta[0] + theta[1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return loss + (phi[0].exp() * theta[0] ** 2).sum() / 2

    def outer(theta, phi):
        logits = x_val @ theta[0] + theta[1]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels_val)

    return inner, outer, d


def solve_inner(inner, phi, d):
    """Newton's method to machine precision."""
    theta = torch.zeros(d + 1)

    def flat(t):
        return inner((t[:d], t[d]), phi)

    for _ in range(12):
        step = torch.linalg.solve(hessian(flat)(theta), grad(flat)(theta))
        theta = theta - step
    assert float(grad(flat)(theta).norm()) < 1e-12
    return (theta[:d], theta[d])


@pytest.fixture(scope="module")
def logistic_finite_differences():
    """Central differences of G(φ) = g(θ*(φ), φ), θ* solved by Newton; computed once."""
    torch.set_default_dtype(torch.float64)
    inner, outer, d = logistic_problem()
    phi = (torch.linspace(-2.0, 0.0, d),)
    h = 1e-5
    fd = torch.zeros(d)
    for i in range(d):
        shift = torch.zeros(d)
        shift[i] = h
        plus = outer(solve_inner(inner, (phi[0] + shift,), d), None)
        minus = outer(solve_inner(inner, (phi[0] - shift,), d), None)
        fd[i] = (plus - minus) / (2 * h)
    return inner, outer, d, phi, solve_inner(inner, phi, d), fd


FD_METHODS = {
    "exact": approx_hypergrad.exact,
    "cg": functools.partial(approx_hypergrad.conjugate_gradient, num_iters=6),
    # the shift ρ biases Nyström's target; 1e-8 keeps both bias and cancellation ~1e-8
    "nystrom": functools.partial(approx_hypergrad.nystrom, rank=6, rho=1e-8),
    "nystrom_pcg": functools.partial(approx_hypergrad.nystrom_pcg, rank=3, num_iters=6),
    "neumann": functools.partial(approx_hypergrad.neumann, num_iters=2000, lr=1.0),
}


@pytest.mark.parametrize("method", list(FD_METHODS))
def test_logistic_regression_matches_central_finite_differences(method, logistic_finite_differences):
    inner, outer, d, phi, theta, fd = logistic_finite_differences
    hypergrad = FD_METHODS[method](inner, outer, theta, phi)[0]
    assert rel_err(hypergrad, fd) <= 1e-6


def test_linearize_and_mixed_vjp_match_dense_derivatives():
    inner, _, d = logistic_problem()
    theta = (torch.randn(d), torch.randn(()))
    phi = (torch.randn(d),)

    def flat(t, p):
        return inner((t[:d], t[d]), (p,))

    t_flat = params_to_vector(theta)
    dense_h = hessian(flat)(t_flat, phi[0])
    mixed = jacrev(grad(flat, argnums=0), argnums=1)(t_flat, phi[0])  # (p_θ, p_φ)
    op = linearize(inner, theta, phi)
    v = torch.randn(d + 1)
    vs = torch.randn(d + 1, 3)
    assert torch.allclose(op.matvec(v), dense_h @ v, atol=1e-12)
    assert torch.allclose(op.matmat(vs), dense_h @ vs, atol=1e-12)
    assert torch.allclose(mixed_vjp(inner, theta, phi, v)[0], mixed.T @ v, atol=1e-12)


def test_reduce_is_applied_once_per_round():
    inner, outer, theta, phi, closed_form, _ = ridge_problem()
    calls = []

    def counting_identity(t):
        calls.append(t.shape)
        return t

    for method, operator_calls in [("nystrom", 1), ("cg", 8)]:
        calls.clear()
        result = METHODS[method](8)(inner, outer, theta, phi, reduce=counting_identity)
        assert len(calls) == operator_calls + 2
        assert rel_err(result[0], closed_form(SHIFT.get(method, 0.0))) <= 1e-8


class ThreadAllreduceMean:
    """An allreduce-mean between threads: each caller gets the mean of all callers' tensors."""

    def __init__(self, world_size):
        import threading

        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots = [None] * world_size

    def for_rank(self, rank):
        def reduce(t):
            self.slots[rank] = t
            self.barrier.wait()
            mean = sum(self.slots) / self.world_size
            self.barrier.wait()
            return mean

        return reduce


@pytest.mark.parametrize("method", ["nystrom", "cg", "neumann", "nystrom_pcg"])
def test_reduce_over_two_shards_equals_full_data(method):
    """Each shard's objectives are means over its half of the data; averaging every
    reduction (as an allreduce would) must reproduce the full-data hypergradient."""
    from concurrent.futures import ThreadPoolExecutor

    n, d = 60, 8
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=generator), torch.randn(n, generator=generator)
    x_val, y_val = torch.randn(n, d, generator=generator), torch.randn(n, generator=generator)
    lam = torch.rand(d, generator=generator) + 0.05

    def objectives(rows):
        def inner(theta, phi):
            return ((x[rows] @ theta[0] - y[rows]) ** 2).mean() / 2 + (phi[0] * theta[0] ** 2).sum() / 2

        def outer(theta, phi):
            return ((x_val[rows] @ theta[0] - y_val[rows]) ** 2).mean() / 2 + 0.01 * (phi[0] ** 2).sum()

        return inner, outer

    theta = (torch.randn(d, generator=generator),)  # any point: the identity is algebraic
    def run(rows, reduce=None):
        return METHODS[method](d)(*objectives(rows), theta, (lam,), reduce=reduce)

    full = run(slice(0, n))
    allreduce = ThreadAllreduceMean(2)
    with ThreadPoolExecutor(2) as pool:
        shards = list(pool.map(lambda r: run(slice(r * n // 2, (r + 1) * n // 2), allreduce.for_rank(r)),
                               range(2)))
    for shard in shards:
        assert rel_err(shard[0], full[0]) <= 1e-10


def test_hypergradient_is_picklable_tuple():
    import pickle

    inner, outer, theta, phi, _, _ = ridge_problem()
    result = approx_hypergrad.exact(inner, outer, theta, phi)
    restored = pickle.loads(pickle.dumps(result))
    assert torch.equal(restored[0], result[0]) and restored.stats == result.stats


def test_generic_solve_entry_point():
    inner, outer, theta, phi, closed_form, _ = ridge_problem()
    result = implicit_hypergradient(inner, outer, theta, phi, functools.partial(ihvp.cg, num_iters=8))
    assert rel_err(result[0], closed_form()) <= 1e-8


def test_non_scalar_objective_is_value_error():
    inner, outer, theta, phi, _, _ = ridge_problem()
    with pytest.raises(ValueError, match="inner_obj must return a scalar"):
        approx_hypergrad.exact(lambda t, p: t[0] * p[0], outer, theta, phi)
    with pytest.raises(ValueError, match="outer_obj must return a scalar"):
        approx_hypergrad.exact(inner, lambda t, p: t[0] ** 2, theta, phi)


def test_mixed_dtypes_are_type_error():
    inner, outer, theta, phi, _, _ = ridge_problem()
    with pytest.raises(TypeError, match="float32.*float64|dtype"):
        approx_hypergrad.exact(inner, outer, theta, (phi[0].float(),))


def test_params_must_be_tuples_of_tensors():
    inner, outer, theta, phi, _, _ = ridge_problem()
    with pytest.raises(TypeError, match="in_params must be a tuple"):
        approx_hypergrad.exact(inner, outer, theta[0], phi)
    with pytest.raises(ValueError, match="out_params is empty"):
        approx_hypergrad.exact(inner, outer, theta, ())


@pytest.mark.parametrize("call, match", [
    (lambda *a: approx_hypergrad.nystrom(*a, rank=0, rho=0.1), "rank"),
    (lambda *a: approx_hypergrad.nystrom(*a, rank=100, rho=0.1), "rank"),
    (lambda *a: approx_hypergrad.nystrom(*a, rank=2, rho=0.0), "rho"),
    (lambda *a: approx_hypergrad.conjugate_gradient(*a, num_iters=0, lr=1.0), "num_iters"),
    (lambda *a: approx_hypergrad.conjugate_gradient(*a, num_iters=3, lr=0.0), "lr"),
    (lambda *a: approx_hypergrad.neumann(*a, num_iters=3, lr=-1.0), "lr"),
    (lambda *a: approx_hypergrad.nystrom_pcg(*a, rank=2, num_iters=0), "num_iters"),
])
def test_bad_settings(call, match):
    inner, outer, theta, phi, _, _ = ridge_problem()
    with pytest.raises(ValueError, match=match):
        call(inner, outer, theta, phi)


def test_nan_loss_is_reported_with_the_bad_term():
    inner, outer, theta, phi, _, _ = ridge_problem()
    with pytest.raises(NonFiniteHypergradientError, match="outer gradient"):
        approx_hypergrad.exact(inner, lambda t, p: outer(t, p) * torch.tensor(float("nan")), theta, phi)


def test_diverging_neumann_is_reported_as_ihvp_failure():
    inner, outer, theta, phi, _, a = ridge_problem()
    step = 50.0 / float(torch.linalg.eigvalsh(a).max())
    solve = functools.partial(ihvp.neumann, num_iters=2000, alpha=step, on_divergence="warn")  # reach the x check
    with pytest.raises(NonFiniteHypergradientError, match="IHVP solution x \\(neumann\\)"), \
            pytest.warns(ihvp.IHVPDivergenceWarning):
        implicit_hypergradient(inner, outer, theta, phi, solve)


# ---- dtypes and devices ------------------------------------------------------------------------

def ridge_in(dtype, n=60, d=8, seed=0):
    """``ridge_problem``'s data, objectives and θ* with the data and parameters in ``dtype``."""
    x, y, x_val, y_val, lam = ridge_data(n, d, seed)
    theta = torch.linalg.solve(x.T @ x / n + torch.diag(lam), x.T @ y / n)
    x, y, x_val, y_val = (t.to(dtype) for t in (x, y, x_val, y_val))

    def inner(t, p):
        return ((x @ t[0] - y) ** 2).mean() / 2 + (p[0] * t[0] ** 2).sum() / 2

    def outer(t, p):
        return ((x_val @ t[0] - y_val) ** 2).mean() / 2 + 0.01 * (p[0] ** 2).sum()

    return inner, outer, (theta.to(dtype),), (lam.to(dtype),)


HALF_SOLVES = {
    "exact": ihvp.exact,
    "cg": functools.partial(ihvp.cg, num_iters=8),
    "nystrom": functools.partial(ihvp.nystrom, rank=8, rho=1e-3, generator=torch.Generator().manual_seed(0)),
    "neumann": functools.partial(ihvp.neumann, num_iters=100, alpha=0.5),
    "nystrom_pcg": functools.partial(ihvp.nystrom_pcg, rank=4, num_iters=8, generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", list(HALF_SOLVES))
def test_half_precision_params_work_and_match_float64(method, dtype):
    """Objectives run in half precision, the IHVP in float32; the result comes back in the params' dtype."""
    reference = implicit_hypergradient(*ridge_in(torch.float64), HALF_SOLVES[method])[0]
    result = implicit_hypergradient(*ridge_in(dtype), HALF_SOLVES[method])
    assert result[0].dtype == dtype
    # a few units of the dtype's rounding: the data, the products and the result are rounded to it
    assert rel_err(result[0].double(), reference) <= 8 * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.float8_e4m3fn])
def test_unsupported_dtypes_are_type_errors_naming_the_dtype(dtype):
    inner, outer, theta, phi, _, _ = ridge_problem()
    with pytest.raises(TypeError, match=f"in_params\\[0\\] has dtype {dtype}; parameters must be one of"):
        approx_hypergrad.exact(inner, outer, (theta[0].to(dtype),), (phi[0].to(dtype),))


def test_meta_tensors_are_type_errors():
    inner, outer, theta, phi, _, _ = ridge_problem()
    with pytest.raises(TypeError, match="out_params\\[0\\] is on the meta device.*to_empty"):
        approx_hypergrad.exact(inner, outer, theta, (phi[0].to("meta"),))
