"""Every IHVP method against a dense exact solve on a registry of SPD problems."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from hg_dist import ihvp
from hg_dist.hessian import HessianOperator, linearize

P = 40


def spd(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator))
    return q @ torch.diag(eigenvalues) @ q.T


def operator(matrix: torch.Tensor) -> HessianOperator:
    return HessianOperator(matvec=lambda v: matrix @ v, matmat=lambda v: matrix @ v, size=matrix.shape[0])


# name -> eigenvalues. Linearly spread spectra keep CG's finite termination in float64
# even at condition number 1e6; geometric spectra (below) lose it.
REGISTRY = {
    "well_conditioned": lambda: torch.linspace(1.0, 10.0, P),
    "ill_conditioned_1e4": lambda: torch.linspace(1e-4, 1.0, P),
    "ill_conditioned_1e6": lambda: torch.linspace(1e-6, 1.0, P),
}
GEOMETRIC = {
    "geometric_1e2": lambda: torch.logspace(0, -2, P),
    "geometric_1e3": lambda: torch.logspace(0, -3, P),
}


def rel_err(x: torch.Tensor, reference: torch.Tensor) -> float:
    return float((x - reference).norm() / reference.norm())


@pytest.fixture(params=list(REGISTRY))
def problem(request):
    matrix = spd(REGISTRY[request.param]())
    v = torch.randn(P, generator=torch.Generator().manual_seed(1))
    return matrix, v


def test_cg_reaches_exact_solution_within_p_iterations(problem):
    matrix, v = problem
    result = ihvp.cg(operator(matrix), v, num_iters=P)
    assert rel_err(result.solution, torch.linalg.solve(matrix, v)) <= 1e-8
    assert result.stats.num_hvps == P and result.stats.num_operator_calls == P
    assert result.stats.residual_norm <= 1e-8 * float(v.norm()) * 1e3


def test_cg_error_decreases_with_iterations_on_ill_conditioned():
    matrix = spd(REGISTRY["ill_conditioned_1e4"]())
    v = torch.randn(P)
    exact = torch.linalg.solve(matrix, v)
    errors = [rel_err(ihvp.cg(operator(matrix), v, num_iters=k).solution, exact) for k in (5, 15, 30)]
    assert errors[0] > errors[1] > errors[2]


def test_cg_with_damping_solves_shifted_system(problem):
    matrix, v = problem
    x = ihvp.cg(operator(matrix), v, num_iters=P, rho=0.5).solution
    assert rel_err(x, torch.linalg.solve(matrix + 0.5 * torch.eye(P), v)) <= 1e-8


def test_cg_does_not_turn_converged_solution_into_nan():
    matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
    v = torch.tensor([1.0, 1.0, 1.0])
    x = ihvp.cg(operator(matrix), v, num_iters=50).solution  # converges after 3
    assert torch.allclose(x, torch.tensor([1.0, 0.5, 1 / 3]), rtol=1e-12)


def test_cg_rtol_stops_early():
    matrix = spd(REGISTRY["well_conditioned"]())
    v = torch.randn(P)
    result = ihvp.cg(operator(matrix), v, num_iters=P, rtol=1e-6)
    assert result.stats.iterations < P
    assert result.stats.residual_norm <= 1e-6 * float(v.norm())
    assert float((matrix @ result.solution - v).norm()) <= 1e-5 * float(v.norm())


def test_seed_recurrence_drifts_but_ours_does_not():
    """The seed built the new direction from the old residual; that stalls."""
    matrix = spd(REGISTRY["ill_conditioned_1e4"]())
    v = torch.randn(P)
    exact = torch.linalg.solve(matrix, v)

    x, r, p = torch.zeros(P), v.clone(), v.clone()
    for _ in range(P):
        ap = matrix @ p
        alpha = (r @ r) / (p @ ap)
        x_new, r_new = x + alpha * p, r - alpha * ap
        beta = (r_new @ r_new) / (r @ r)
        p = r + beta * p  # the seed's bug: old residual
        x, r = x_new, r_new
    assert rel_err(x, exact) > 1e-3
    assert rel_err(ihvp.cg(operator(matrix), v, num_iters=P).solution, exact) <= 1e-8


@pytest.mark.parametrize("rho", [1e-3, 0.1, 2.0])
def test_nystrom_full_rank_equals_shifted_inverse(problem, rho):
    matrix, v = problem
    x = ihvp.nystrom(operator(matrix), v, rank=P, rho=rho).solution
    assert rel_err(x, torch.linalg.solve(matrix + rho * torch.eye(P), v)) <= 1e-9


def test_nystrom_low_rank_matches_dense_formula():
    matrix = spd(torch.linspace(0.1, 5.0, P))
    v = torch.randn(P)
    rank, rho = 7, 0.3
    result = ihvp.nystrom(operator(matrix), v, rank=rank, rho=rho, generator=torch.Generator().manual_seed(3))
    columns = torch.randperm(P, generator=torch.Generator().manual_seed(3))[:rank]
    c = matrix[:, columns]
    approx = c @ torch.linalg.pinv(matrix[columns][:, columns]) @ c.T
    expected = torch.linalg.solve(approx + rho * torch.eye(P), v)
    assert rel_err(result.solution, expected) <= 1e-9
    assert result.stats.num_hvps == rank and result.stats.num_operator_calls == 1


@pytest.mark.parametrize("rank_of_h, gram_path", [(None, True), (4, False)])
def test_woodbury_gram_path_and_its_householder_fallback_match_the_dense_formula(monkeypatch, rank_of_h, gram_path):
    """A well-conditioned ``C`` is solved through ``CᵀC`` in blocks of columns (7 here, so several blocks
    and a ragged last one); a rank-deficient ``C`` (rank(H) = 4 < k) goes to the Householder QR. Both
    give the dense ``(C W⁺ Cᵀ + ρI)⁻¹ v`` in float64."""
    nystrom_module = importlib.import_module("hg_dist.ihvp.nystrom")
    monkeypatch.setattr(nystrom_module, "_BLOCK_COLUMNS", 7)
    calls = []
    householder = nystrom_module._woodbury_householder
    monkeypatch.setattr(nystrom_module, "_woodbury_householder", lambda *a: calls.append(1) or householder(*a))
    generator = torch.Generator().manual_seed(11)
    if rank_of_h is None:
        matrix = spd(torch.linspace(0.1, 5.0, P))
    else:
        factor = torch.randn(P, rank_of_h, generator=generator, dtype=torch.float64)
        matrix = factor @ factor.T
    v = torch.randn(P, generator=generator, dtype=torch.float64)
    columns = torch.randperm(P, generator=generator)[:9]
    rows = matrix[columns].contiguous()
    c = rows.T
    expected = torch.linalg.solve(c @ torch.linalg.pinv(c[columns]) @ c.T + 0.05 * torch.eye(P, dtype=torch.float64), v)
    x = nystrom_module.woodbury_solve(rows, columns, v, 0.05)
    assert rel_err(x, expected) <= 1e-9
    assert bool(calls) is not gram_path


def test_woodbury_on_ill_conditioned_float64_columns_keeps_the_qr_accuracy():
    """float64 columns with cond(C) ≈ 2e4 (nearly dependent columns): the Gram path's ε·cond(C)² costs
    4.5e-10 here against the QR's 7e-13, so the solve must take the QR and match the dense formula to 1e-11."""
    nystrom_module = importlib.import_module("hg_dist.ihvp.nystrom")
    generator = torch.Generator().manual_seed(0)
    p, k = 600, 20
    basis, _ = torch.linalg.qr(torch.randn(p, k, generator=generator, dtype=torch.float64))
    factor = basis * torch.logspace(0, -3, k, dtype=torch.float64) * 30
    matrix = factor @ factor.T + 1e-2 * torch.eye(p, dtype=torch.float64)
    columns = torch.randperm(p, generator=generator)[:k]
    rows = matrix[columns].contiguous()
    c = rows.T
    singular = torch.linalg.svdvals(c)
    assert 1e4 < float(singular[0] / singular[-1]) < 1e5
    v = torch.randn(p, generator=generator, dtype=torch.float64)
    expected = torch.linalg.solve(c @ torch.linalg.pinv(c[columns]) @ c.T + 0.01 * torch.eye(p, dtype=torch.float64), v)
    assert rel_err(nystrom_module.woodbury_solve(rows, columns, v, 0.01), expected) <= 1e-11


def test_nystrom_exact_for_low_rank_hessian():
    """If rank(H) = k and the k sampled columns span it, Nyström is exact."""
    generator = torch.Generator().manual_seed(5)
    factor = torch.randn(P, 4, generator=generator)
    matrix = factor @ factor.T
    v = torch.randn(P)
    x = ihvp.nystrom(operator(matrix), v, rank=10, rho=0.2).solution
    assert rel_err(x, torch.linalg.solve(matrix + 0.2 * torch.eye(P), v)) <= 1e-8


def test_neumann_converges_below_two_over_lambda_max(problem):
    matrix, v = problem
    lam_max = float(torch.linalg.eigvalsh(matrix).max())
    shifted = matrix + torch.eye(P)  # keeps the test's iteration count small on ill-conditioned rows
    exact = torch.linalg.solve(shifted, v)
    alpha = 1.0 / (lam_max + 1)
    x = ihvp.neumann(operator(matrix), v, num_iters=400, alpha=alpha, rho=1.0).solution
    assert rel_err(x, exact) <= 1e-8


def test_neumann_diverges_above_two_over_lambda_max():
    matrix = spd(REGISTRY["well_conditioned"]())
    v = torch.randn(P)
    exact = torch.linalg.solve(matrix, v)
    alpha = 2.2 / 10.0
    with pytest.warns(ihvp.IHVPDivergenceWarning, match="lr < 2/λ_max"):  # the sums themselves, not the error
        errors = [rel_err(ihvp.neumann(operator(matrix), v, num_iters=n, alpha=alpha, on_divergence="warn").solution,
                          exact) for n in (10, 40)]
    assert errors[1] > 10 * errors[0] and errors[1] > 1.0


def test_neumann_partial_sum_matches_series():
    matrix = spd(REGISTRY["well_conditioned"]())
    v = torch.randn(P)
    alpha, n = 0.05, 6
    term, total = v, v.clone()
    for _ in range(n):
        term = term - alpha * matrix @ term
        total = total + term
    x = ihvp.neumann(operator(matrix), v, num_iters=n, alpha=alpha).solution
    assert torch.allclose(x, alpha * total, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", list(REGISTRY) + list(GEOMETRIC))
def test_nystrom_pcg_converges(name):
    eigenvalues = {**REGISTRY, **GEOMETRIC}[name]()
    matrix = spd(eigenvalues)
    v = torch.randn(P)
    result = ihvp.nystrom_pcg(operator(matrix), v, rank=20, num_iters=P, generator=torch.Generator().manual_seed(0))
    assert rel_err(result.solution, torch.linalg.solve(matrix, v)) <= 1e-8
    assert result.stats.num_hvps == 20 + result.stats.iterations
    assert result.stats.num_operator_calls == 1 + result.stats.iterations


def test_nystrom_pcg_needs_fewer_products_than_cg_on_geometric_spectrum():
    matrix = spd(GEOMETRIC["geometric_1e3"]())
    v = torch.randn(P)
    exact = torch.linalg.solve(matrix, v)
    op = operator(matrix)

    def products_to_reach(tolerance, solve):
        for budget in range(1, 4 * P):
            result = solve(budget)
            if rel_err(result.solution, exact) <= tolerance:
                return result.stats.num_hvps
        return math.inf

    cg_products = products_to_reach(1e-8, lambda n: ihvp.cg(op, v, num_iters=n))
    pcg_products = products_to_reach(1e-8, lambda n: ihvp.nystrom_pcg(
        op, v, rank=10, num_iters=n, generator=torch.Generator().manual_seed(0)))
    # Plain CG in float64 needs more than p products here (loss of orthogonality).
    assert cg_products > P
    assert pcg_products < cg_products


def test_nystrom_pcg_with_damping():
    matrix = spd(GEOMETRIC["geometric_1e2"]())
    v = torch.randn(P)
    x = ihvp.nystrom_pcg(operator(matrix), v, rank=10, num_iters=P, rho=0.01).solution
    assert rel_err(x, torch.linalg.solve(matrix + 0.01 * torch.eye(P), v)) <= 1e-8


def test_randomized_nystrom_exact_on_low_rank_matrix():
    generator = torch.Generator().manual_seed(2)
    factor = torch.randn(P, 5, generator=generator)
    matrix = factor @ factor.T
    basis, eigenvalues = ihvp.randomized_nystrom(operator(matrix), 8, torch.zeros(P), generator)
    assert torch.allclose(basis @ torch.diag(eigenvalues) @ basis.T, matrix, atol=1e-8)


@pytest.mark.parametrize("nearly_dependent, through_qr", [(False, False), (True, True)])
def test_sketch_columns_are_orthonormal_through_the_gram_matrix_or_a_qr(monkeypatch, nearly_dependent, through_qr):
    """A Gaussian Ω (4000×8) is orthonormalised through the Cholesky factor of ΩᵀΩ; one with two nearly
    equal columns (condition number ~1e6) through a Householder QR. Either way QᵀQ = I and QQᵀΩ = Ω."""
    nystrom_pcg_module = importlib.import_module("hg_dist.ihvp.nystrom_pcg")
    qr_calls = []
    householder = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda a: qr_calls.append(1) or householder(a))
    generator = torch.Generator().manual_seed(7)
    omega = torch.randn(4000, 8, generator=generator, dtype=torch.float64)
    if nearly_dependent:
        omega[:, 1] = omega[:, 0] + 1e-6 * torch.randn(4000, generator=generator, dtype=torch.float64)
    q = nystrom_pcg_module._orthonormal_columns(omega)
    assert bool(qr_calls) is through_qr
    assert torch.allclose(q.T @ q, torch.eye(8, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(q @ (q.T @ omega), omega, atol=1e-9)


@pytest.mark.parametrize("solve", [lambda op, v: ihvp.nystrom(op, v, rank=5, rho=0.5),
                                   lambda op, v: ihvp.nystrom_pcg(op, v, rank=5, num_iters=3, rho=0.5),
                                   lambda op, v: ihvp.cg(op, v, num_iters=3, rho=0.5)],
                         ids=["nystrom", "nystrom_pcg", "cg"])
def test_a_zero_hessian_gives_v_over_rho(solve):
    """H = 0 (no curvature at this point): (H + ρI)⁻¹ v = v / ρ, with nothing for Nyström to factor."""
    v = torch.randn(P)
    assert rel_err(solve(operator(torch.zeros(P, P)), v).solution, v / 0.5) <= 1e-12


def test_exact_matches_dense_solve(problem):
    matrix, v = problem
    result = ihvp.exact(operator(matrix), v, rho=0.1)
    assert rel_err(result.solution, torch.linalg.solve(matrix + 0.1 * torch.eye(P), v)) <= 1e-10
    assert result.stats.num_hvps == P


def test_exact_singular_hessian_asks_for_rho():
    matrix = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="rho"):
        ihvp.exact(operator(matrix), torch.ones(3))


def test_methods_on_linearized_ridge_hessian():
    """The same registry check, with the operator built by ``linearize``."""
    x_data = torch.randn(30, 6)
    weights = torch.rand(6) + 0.1

    def inner(theta, phi):
        return ((x_data @ theta[0]) ** 2).mean() / 2 + (phi[0] * theta[0] ** 2).sum() / 2

    op = linearize(inner, (torch.randn(6),), (weights,))
    hessian = x_data.T @ x_data / 30 + torch.diag(weights)
    v = torch.randn(6)
    exact = torch.linalg.solve(hessian, v)
    assert torch.allclose(ihvp.dense_hessian(op, v), hessian, atol=1e-12)
    assert rel_err(ihvp.cg(op, v, num_iters=6).solution, exact) <= 1e-8
    assert rel_err(ihvp.nystrom(op, v, rank=6, rho=1e-9).solution, exact) <= 1e-6


@pytest.mark.parametrize("call, match", [
    (lambda op, v: ihvp.nystrom(op, v, rank=0, rho=0.1), "rank"),
    (lambda op, v: ihvp.nystrom(op, v, rank=P + 1, rho=0.1), "rank"),
    (lambda op, v: ihvp.nystrom(op, v, rank=5, rho=0.0), "rho"),
    (lambda op, v: ihvp.nystrom(op, v, rank=5, rho=-1.0), "rho"),
    (lambda op, v: ihvp.cg(op, v, num_iters=0), "num_iters"),
    (lambda op, v: ihvp.cg(op, v, num_iters=3, rho=-0.1), "rho"),
    (lambda op, v: ihvp.neumann(op, v, num_iters=0, alpha=0.1), "num_iters"),
    (lambda op, v: ihvp.neumann(op, v, num_iters=3, alpha=0.0), "alpha"),
    (lambda op, v: ihvp.neumann(op, v, num_iters=3, alpha=math.nan), "alpha"),
    (lambda op, v: ihvp.nystrom_pcg(op, v, rank=P + 1, num_iters=3), "rank"),
])
def test_bad_settings_raise_value_error_naming_argument(call, match):
    matrix = spd(REGISTRY["well_conditioned"]())
    with pytest.raises(ValueError, match=match):
        call(operator(matrix), torch.randn(P))


def test_non_integer_rank_is_type_error():
    matrix = spd(REGISTRY["well_conditioned"]())
    with pytest.raises(TypeError, match="rank"):
        ihvp.nystrom(operator(matrix), torch.randn(P), rank=2.5, rho=0.1)


# ---- divergence detection and eigenvalue estimates -------------------------------------------

@pytest.mark.parametrize("eigenvalues", [torch.linspace(1.0, 10.0, P), torch.logspace(-3, 1, P),
                                         torch.linspace(-2.0, 5.0, P)], ids=["linear", "geometric", "indefinite"])
def test_estimate_spectrum_matches_eigvalsh(eigenvalues):
    matrix = spd(eigenvalues.double())
    exact = torch.linalg.eigvalsh(matrix)
    estimate = ihvp.estimate_spectrum(operator(matrix), torch.zeros(P), iters=20)
    scale = float(exact.abs().max())
    assert abs(estimate.lambda_max - float(exact[-1])) <= 1e-3 * scale
    assert abs(estimate.lambda_min - float(exact[0])) <= 2e-2 * scale
    assert float(exact[0]) - 1e-9 <= estimate.lambda_min and estimate.lambda_max <= float(exact[-1]) + 1e-9
    assert ihvp.estimate_lambda_max(operator(matrix), torch.zeros(P)) == estimate.lambda_max
    # with p steps Lanczos recovers the extremes to rounding (exact termination)
    full = ihvp.estimate_spectrum(operator(matrix), torch.zeros(P), iters=P)
    assert abs(full.lambda_max - float(exact[-1])) <= 1e-8 * scale


def test_estimate_spectrum_stops_at_an_invariant_subspace():
    few = ihvp.estimate_spectrum(operator(torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0]))), torch.zeros(4), iters=4)
    assert math.isclose(few.lambda_max, 3.0) and math.isclose(few.lambda_min, 1.0)  # 4 steps, 2 eigenvalues
    zero = ihvp.estimate_spectrum(operator(torch.zeros(4, 4)), torch.zeros(4), iters=4)
    assert zero == (0.0, 0.0, 1)  # β = 0 after one step: no spurious Ritz values from the steps after it


def test_estimate_spectrum_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    ihvp.estimate_spectrum(operator(spd(torch.linspace(1.0, 2.0, P))), torch.zeros(P))
    assert torch.equal(torch.get_rng_state(), state)


def test_neumann_above_two_over_lambda_max_raises_with_an_estimate():
    matrix = spd(torch.linspace(1.0, 10.0, P))
    with pytest.raises(ihvp.IHVPDivergenceError, match=r"lr < 2/λ_max ≈ 0\.2, e\.g\. lr=0\.1") as info:
        ihvp.neumann(operator(matrix), torch.randn(P), num_iters=10, alpha=100.0)
    assert info.value.lambda_max == pytest.approx(10.0, rel=1e-3)
    assert info.value.advice == (ihvp.SettingAdvice("ihvp", "lr", pytest.approx(0.1, rel=1e-3)),)
    assert (info.value.setting, info.value.suggestion) == ("lr", pytest.approx(1 / info.value.lambda_max))
    # the suggestion works: below 2/λ_max the same solve converges
    ihvp.neumann(operator(matrix), torch.randn(P), num_iters=200, alpha=info.value.suggestion)


def test_neumann_warn_returns_the_plain_sum():
    matrix = spd(torch.linspace(1.0, 10.0, P))
    v = torch.randn(P)
    with pytest.warns(ihvp.IHVPDivergenceWarning, match="diverged"):
        x = ihvp.neumann(operator(matrix), v, num_iters=6, alpha=0.3, on_divergence="warn").solution
    term, total = v, v.clone()
    for _ in range(6):
        term = term - 0.3 * matrix @ term
        total = total + term
    assert torch.allclose(x, 0.3 * total, rtol=1e-12)


def test_neumann_just_below_the_bound_does_not_raise():
    """Eigenvalues of I − αA in (−1, 1): the terms never grow, however many."""
    matrix = spd(torch.linspace(1.0, 10.0, P))
    ihvp.neumann(operator(matrix), torch.randn(P), num_iters=500, alpha=1.99 / 10.0)


@pytest.mark.parametrize("method", ["cg", "nystrom_pcg"])
def test_cg_on_an_indefinite_operator_raises_naming_rho(method):
    matrix = spd(torch.linspace(-1.0, 10.0, P))
    solve = {"cg": lambda op, v, **kw: ihvp.cg(op, v, num_iters=P, **kw),
             "nystrom_pcg": lambda op, v, **kw: ihvp.nystrom_pcg(op, v, rank=5, num_iters=P, **kw)}[method]
    with pytest.raises(ihvp.IHVPDivergenceError, match=r"non-positive curvature.*raise rho above") as info:
        solve(operator(matrix), torch.randn(P))
    assert info.value.lambda_min < 0
    assert info.value.setting == "rho" and info.value.advice[0].scope == "ihvp"
    assert info.value.suggestion > -info.value.lambda_min    # past the margin: H + ρI positive definite
    # damped past −λ_min it is positive definite again, and solves exactly
    v = torch.randn(P)
    x = solve(operator(matrix), v, rho=1.5).solution
    assert rel_err(x, torch.linalg.solve(matrix + 1.5 * torch.eye(P), v)) <= 1e-8
    with pytest.warns(ihvp.IHVPDivergenceWarning):
        solve(operator(matrix), v, on_divergence="warn")


def _count_host_syncs(monkeypatch):
    """Counts reads of tensor values into Python (tolist, item, bool, float, int)."""
    calls = []
    for name in ("tolist", "item", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_divergence_checks_sync_once_per_solve_not_per_iteration(method, monkeypatch):
    matrix = spd(torch.linspace(1.0, 10.0, P))
    v = torch.randn(P)
    op = operator(matrix)
    calls = _count_host_syncs(monkeypatch)
    if method == "cg":
        ihvp.cg(op, v, num_iters=30)
    else:
        ihvp.neumann(op, v, num_iters=30, alpha=0.1)
    monkeypatch.undo()
    assert len(calls) == 1, calls


@pytest.mark.parametrize("call", [
    lambda op, v: ihvp.cg(op, v, num_iters=3, on_divergence="ignore"),
    lambda op, v: ihvp.neumann(op, v, num_iters=3, alpha=0.1, on_divergence=None),
    lambda op, v: ihvp.estimate_spectrum(op, v, iters=0),
])
def test_bad_divergence_options_are_value_errors(call):
    with pytest.raises(ValueError, match="on_divergence must be one of|iters must be"):
        call(operator(spd(torch.linspace(1.0, 2.0, P))), torch.randn(P))


def test_divergence_error_survives_pickling():
    import pickle

    error = ihvp.IHVPDivergenceError("diverged", method="neumann", lambda_min=1.0, lambda_max=10.0)
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == "diverged" and (again.method, again.lambda_min, again.lambda_max) == ("neumann", 1.0, 10.0)
    assert isinstance(again, ArithmeticError)


def test_check_finite_tells_nan_and_inf_from_an_overflowing_sum():
    """The fast test (a finite sum) falls back to ``isfinite`` only when the sum is not finite."""
    from hg_dist.ihvp._errors import NonFiniteHypergradientError, check_finite

    huge = torch.full((4,), 3e38, dtype=torch.float32)               # finite entries, sum overflows
    check_finite({"huge": huge, "empty": torch.empty(0)}, "test", "hint")
    for bad in (float("nan"), float("inf"), -float("inf")):
        block = torch.randn(3, 5)
        block[1, 2] = bad
        with pytest.raises(NonFiniteHypergradientError, match=r"in the block \(test\); fix it"):
            check_finite({"huge": huge, "the block": block}, "test", "fix it")
