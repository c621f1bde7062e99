"""The public contract, tested over generated inputs: every entry point × every registered method.

Entry points: the seed functions of :mod:`hg_dist.approx_hypergrad`, ``make_approx(spec)``,
``implicit_hypergradient`` with a method of :mod:`hg_dist.ihvp`, the methods of
:mod:`hg_dist.ihvp` themselves on ``linearize``'s operator, and
``BaseImplicitSolver.run`` / ``state_dict``. Hypothesis draws how the user passes the
parameters (a :class:`Variant`); every variant listed in the contract is also an
explicit ``@example``. Exactly two outcomes are allowed:

* a float32/float64 input — requiring grad or not, a leaf or not, non-contiguous,
  0-d/1-d/4-d, in a tuple or a list, one tensor shared by two entries, ``out_params``
  with or without ``requires_grad`` — gives the same result (``torch.testing``'s
  default tolerance of the dtype) as the same values passed detached, contiguous,
  unshared, in a tuple; float16/bfloat16 are accepted and solved in float32. The
  result never requires grad (for the IHVP methods, its values are unchanged), and
  it matches the ground truth: the dense solve of ``(H + ρI) x = v`` in float64 on
  the same values, within :data:`TOLERANCE` of the dtype (relative to the largest
  entry). Every method's settings make it exact on these well-conditioned problems:
  Nyström at full rank, CG, Nyström-PCG and Neumann run to convergence.
* anything else (integer or complex dtypes, ``out_params`` in another dtype, a bare
  tensor or a generator instead of a tuple) raises ``TypeError``/``ValueError``
  naming the argument.

The Hessian's chunk size is fixed (:func:`hg_dist.calibration.fixed_chunk_size`) so no
case depends on timing; chunks of 3 rows make Nyström's row blocks run batched.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev

from hg_dist import approx_hypergrad, implicit_hypergradient, linearize, make_approx
from hg_dist.calibration import fixed_chunk_size
from hg_dist.ihvp import METHODS
from hg_dist.optimizers import diff_sgd
from hg_dist.solver import BaseImplicitSolver
from hg_dist.utils import params_to_vector, vector_to_params

RHO = 0.1
CHUNK = 3
CUDA = torch.cuda.is_available()
DEVICES = ("cpu", "cuda") if CUDA else ("cpu",)

FLOATS = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OTHER_DTYPES = {"int64": torch.int64, "complex128": torch.complex128}
DTYPES = {**FLOATS, **OTHER_DTYPES}

TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}
"""Largest error against the float64 dense solve, relative to the largest entry of the reference."""

LAYOUTS = {"matrix": ((3, 4), (3,)), "0d": ((), (5,)), "1d": ((6,), (4,)), "4d": ((1, 2, 2, 3), (2,))}
"""Inner parameter shapes (the outer parameters, per-scalar weight decays, mirror them); p <= 15."""

METHOD_NAMES = tuple(METHODS.names())
ENTRY_POINTS = ("approx_hypergrad", "make_approx", "implicit_hypergradient", "ihvp")


# ---- the problem: L2-regularised logistic regression, decay exp(φ) per scalar ------------------------------

def _flat(params) -> Tensor:
    return torch.cat([t.reshape(-1) for t in params])


def logistic(theta, x: Tensor, y: Tensor) -> Tensor:
    w = _flat(theta)
    return F.softplus(-y.to(w) * (x.to(w) @ w)).mean()


@dataclasses.dataclass
class Problem:
    """Data and float64 values for one layout; ``shared`` adds entry 0 a second time (p <= 30)."""

    layout: str
    shared: bool

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(sum(map(ord, self.layout)) + self.shared)
        shapes = LAYOUTS[self.layout]
        self.theta = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        self.phi = [0.1 * torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        if self.shared:
            self.theta.insert(1, self.theta[0])
            self.phi.insert(1, self.phi[0])
        self.size = sum(t.numel() for t in self.theta)
        self.x = 0.3 * torch.randn(16, self.size, generator=gen, dtype=torch.float64)
        self.y = torch.randn(16, generator=gen, dtype=torch.float64).sign()
        self.x_val = 0.3 * torch.randn(16, self.size, generator=gen, dtype=torch.float64)
        self.y_val = torch.randn(16, generator=gen, dtype=torch.float64).sign()

    def inner(self, theta, phi) -> Tensor:
        """``f = mean softplus(−y·Xθ) + ½ Σ (1 + e^φ) θ²``: Hessian eigenvalues in about [1.7, 2.5]."""
        w = _flat(theta)
        return logistic(theta, self.x, self.y) + 0.5 * ((1 + _flat(phi).exp()) * w * w).sum()

    def outer(self, theta, phi) -> Tensor:
        return logistic(theta, self.x_val, self.y_val) + 0.05 * (_flat(phi) ** 2).sum()

    def settings(self, method: str) -> dict:
        """Settings under which ``method`` solves ``(H + ρI) x = v`` to float64 accuracy here."""
        return {"cg": {"num_iters": 12, "lr": 1.0, "rho": RHO},
                "neumann": {"num_iters": 18, "lr": 0.45, "rho": RHO},
                "nystrom": {"rank": self.size, "rho": RHO},
                "nystrom_pcg": {"rank": min(4, self.size), "num_iters": 10, "rho": RHO},
                "exact": {"rho": RHO}}[method]

    @functools.cached_property
    def reference(self) -> tuple[Tensor, Tensor]:
        """``(x, dg/dφ)`` by a dense float64 solve on the flat vectors (independent of the library)."""
        shapes = [t.shape for t in self.theta]
        split = functools.partial(vector_to_params, like=self.theta)
        t, f = _flat(self.theta), _flat(self.phi)

        def inner(tv, fv):
            return self.inner(split(tv), split(fv))

        def outer(tv, fv):
            return self.outer(split(tv), split(fv))

        h = hessian(inner)(t, f)
        v, g_phi = grad(outer, argnums=(0, 1))(t, f)
        mixed = jacrev(grad(inner), argnums=1)(t, f)               # (p, p): ∂²f/∂θ∂φ
        x = torch.linalg.solve(h + RHO * torch.eye(self.size, dtype=torch.float64), v)
        assert [tuple(s) for s in shapes] == [tuple(t.shape) for t in self.theta]
        return x, g_phi - mixed.T @ x


PROBLEMS: dict[tuple[str, bool], Problem] = {}


def problem_for(layout: str, shared: bool) -> Problem:
    return PROBLEMS.setdefault((layout, shared), Problem(layout, shared))


# ---- how users pass parameters ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of passing the parameters. The defaults are the user's usual path: an ``nn.Module``'s
    own float64 parameters (leaves that require grad), contiguous, in a tuple."""

    dtype: str = "float64"
    grad: str = "leaf"          # in_params: "none" (detached) | "leaf" (requires grad) | "nonleaf" (a view of one)
    out_grad: bool = True       # out_params require grad
    contiguous: bool = True
    layout: str = "matrix"
    container: str = "tuple"    # "tuple" | "list" | "tensor" (a bare tensor) | "generator"
    shared: bool = False        # one tensor passed as two entries
    mixed: bool = False         # out_params in another float dtype than in_params
    device: str = "cpu"

    @property
    def valid(self) -> bool:
        return self.dtype in FLOATS and self.container in ("tuple", "list") and not self.mixed

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


VARIANTS = st.builds(
    Variant,
    dtype=st.sampled_from(["float64", "float32", "float16", "bfloat16", "float64", "float32", "int64", "complex128"]),
    grad=st.sampled_from(["none", "leaf", "nonleaf"]),
    out_grad=st.booleans(),
    contiguous=st.booleans(),
    layout=st.sampled_from(sorted(LAYOUTS)),
    container=st.sampled_from(["tuple", "list", "tuple", "list", "tensor", "generator"]),
    shared=st.booleans(),
    mixed=st.sampled_from([False, False, False, True]),
    device=st.sampled_from(DEVICES),
)

BASE = Variant()
EXAMPLES = [
    BASE,                                            # requires grad, leaves, float64, tuple
    Variant(grad="none", out_grad=False),            # detached
    Variant(grad="nonleaf"),                         # not leaves
    Variant(out_grad=False),                         # out_params without requires_grad
    Variant(dtype="float32"),
    Variant(dtype="float16"),
    Variant(dtype="bfloat16"),
    Variant(contiguous=False),
    Variant(layout="0d"),
    Variant(layout="1d"),
    Variant(layout="4d"),
    Variant(container="list"),
    Variant(shared=True),
    Variant(dtype="int64"),                          # rejected: TypeError naming in_params
    Variant(dtype="complex128"),
    Variant(mixed=True),                             # rejected: TypeError naming out_params
    Variant(container="tensor"),                     # rejected: TypeError naming in_params
    Variant(container="generator"),
] + ([Variant(device="cuda"), Variant(device="cuda", dtype="float32", grad="nonleaf")] if CUDA else [])


def with_examples(test):
    for variant in reversed(EXAMPLES):
        test = example(variant=variant)(test)
    return test


def realize(value: Tensor, dtype: torch.dtype, device: str, grad_kind: str, contiguous: bool) -> Tensor:
    """``value`` as the user would hold it (a leaf, a non-leaf view, detached; strided or not)."""
    if contiguous:
        t = value.to(device=device, dtype=dtype)
    else:  # a non-contiguous leaf: every stride doubled
        strides = [2 * s for s in value.contiguous().stride()]
        t = torch.empty_strided(value.shape, strides, dtype=dtype, device=device)
        t.copy_(value)
        assert value.dim() == 0 or value.numel() == 1 or not t.is_contiguous()
    if grad_kind == "none" or not (dtype.is_floating_point or dtype.is_complex):
        return t  # integer tensors cannot require grad
    t.requires_grad_()
    if grad_kind == "nonleaf":
        t = t[...]
        assert not t.is_leaf
    return t


def pass_as(tensors: list[Tensor], container: str):
    if container == "tuple":
        return tuple(tensors)
    if container == "list":
        return list(tensors)
    if container == "tensor":
        return tensors[0]
    return (t for t in tensors)


def user_params(problem: Problem, variant: Variant):
    """``(in_params, out_params)`` as the variant passes them; shared entries are one tensor object."""
    dtype = variant.torch_dtype
    out_dtype = (torch.float32 if dtype == torch.float64 else torch.float64) if variant.mixed else dtype
    cache: dict[int, Tensor] = {}

    def make(value, dt, grad_kind):
        if id(value) not in cache:
            cache[id(value)] = realize(value, dt, variant.device, grad_kind, variant.contiguous)
        return cache[id(value)]

    theta = [make(v, dtype, variant.grad) for v in problem.theta]
    phi = [make(v, out_dtype, "leaf" if variant.out_grad else "none") for v in problem.phi]
    return pass_as(theta, variant.container), pass_as(phi, variant.container)


def plain_params(problem: Problem, variant: Variant):
    """The same values detached, contiguous, unshared, in tuples: what a variant must agree with."""
    def make(values):
        return tuple(v.to(device=variant.device, dtype=variant.torch_dtype).clone() for v in values)

    return make(problem.theta), make(problem.phi)


# ---- the entry points -------------------------------------------------------------------------------------------

def call(entry: str, method: str, problem: Problem, in_params, out_params):
    """The entry point's result: the hypergradient (a tuple shaped like φ), or for ``ihvp`` the solution x."""
    spec = problem.settings(method)
    inner, outer = problem.inner, problem.outer
    if entry == "approx_hypergrad":
        seeded = {"generator": torch.Generator().manual_seed(0)}
        functions = {"cg": functools.partial(approx_hypergrad.conjugate_gradient, num_iters=spec.get("num_iters"),
                                             lr=spec.get("lr"), rho=RHO),
                     "neumann": functools.partial(approx_hypergrad.neumann, num_iters=spec.get("num_iters"),
                                                  lr=spec.get("lr"), rho=RHO),
                     "nystrom": functools.partial(approx_hypergrad.nystrom, rank=spec.get("rank"), rho=RHO, **seeded),
                     "nystrom_pcg": functools.partial(approx_hypergrad.nystrom_pcg, rank=spec.get("rank"),
                                                      num_iters=spec.get("num_iters"), rho=RHO, **seeded),
                     "exact": functools.partial(approx_hypergrad.exact, rho=RHO)}
        return functions[method](inner, outer, in_params, out_params)
    if entry == "make_approx":
        return make_approx({"name": method, **spec}, seed=0)(inner, outer, in_params, out_params)
    entry_method = METHODS[method]
    solve = entry_method.bind(METHODS.normalize({"name": method, **spec}), torch.Generator().manual_seed(0))
    if entry == "implicit_hypergradient":
        return implicit_hypergradient(inner, outer, in_params, out_params, solve)
    assert entry == "ihvp"
    op = linearize(inner, in_params, out_params)
    return solve(op, params_to_vector(grad(outer)(tuple(in_params), tuple(out_params)))).solution


PLAIN_RESULTS: dict[tuple, object] = {}
"""Results on plain inputs, by entry point, method, dtype, layout, sharing and device."""


def flat_result(entry: str, result) -> Tensor:
    return result if entry == "ihvp" else _flat(result)


@settings(deadline=None, derandomize=True, max_examples=2, database=None)
@given(variant=VARIANTS)
@with_examples
@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_contract(entry, method, variant):
    problem = problem_for(variant.layout, variant.shared)
    with fixed_chunk_size(CHUNK):
        in_params, out_params = user_params(problem, variant)
        if not variant.valid:
            in_params_bad = variant.dtype not in FLOATS or variant.container not in ("tuple", "list")
            argument = "in_params" if in_params_bad else "out_params"
            with pytest.raises((TypeError, ValueError), match=argument):
                call(entry, method, problem, in_params, out_params)
            return
        result = call(entry, method, problem, in_params, out_params)
        key = (entry, method, variant.dtype, variant.layout, variant.shared, variant.device)
        if key not in PLAIN_RESULTS:
            PLAIN_RESULTS[key] = call(entry, method, problem, *plain_params(problem, variant))
        plain = PLAIN_RESULTS[key]

    dtype = variant.torch_dtype
    if entry == "ihvp":
        assert result.shape == (problem.size,) and result.dtype == dtype
    else:
        assert isinstance(result, tuple) and len(result) == len(problem.phi)
        for g, phi in zip(result, problem.phi):
            assert g.shape == phi.shape and g.dtype == dtype and g.device.type == variant.device
            assert not g.requires_grad
    got = flat_result(entry, result).detach()
    torch.testing.assert_close(got, flat_result(entry, plain).detach())  # same as detached inputs

    x_ref, hyper_ref = problem.reference
    reference = x_ref if entry == "ihvp" else hyper_ref
    error = (got.double().cpu() - reference).abs().max() / reference.abs().max()
    assert error <= TOLERANCE[dtype], f"relative error {float(error):.2e} > {TOLERANCE[dtype]:g} ({dtype})"


# ---- the row-block products with an autograd graph -------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [1, 3])
def test_row_blocks_of_module_parameters_carry_their_graph(chunk_size):
    """``linearize`` of an ``nn.Module``'s own parameters: ``rows``/``matmat`` products require grad, equal
    the dense Hessian, and differentiate like it (``d/dθ Σ H[K, :]`` against the third derivative)."""
    problem = problem_for("matrix", False)
    model = nn.Module()
    model.w, model.b = (nn.Parameter(t.clone()) for t in problem.theta)
    theta = tuple(model.parameters())
    phi = tuple(t.clone() for t in problem.phi)
    op = linearize(problem.inner, theta, phi, chunk_size=chunk_size)
    indices = torch.tensor([4, 0, 11, 7, 2])
    rows = op.rows(indices)
    assert rows.requires_grad
    dense = hessian(lambda t: problem.inner(vector_to_params(t, theta), phi))(_flat(theta).detach())
    torch.testing.assert_close(rows.detach(), dense[indices], rtol=1e-10, atol=1e-12)
    block = torch.randn(op.size, 4)
    torch.testing.assert_close(op.matmat(block).detach(), dense @ block, rtol=1e-10, atol=1e-12)

    got = torch.autograd.grad(rows.sum(), theta)
    flat = _flat(theta).detach().requires_grad_()
    expected = torch.autograd.grad(
        hessian(lambda t: problem.inner(vector_to_params(t, theta), phi))(flat)[indices].sum(), flat)[0]
    torch.testing.assert_close(_flat(got), expected, rtol=1e-10, atol=1e-12)


def test_seed_nystrom_on_module_parameters():
    """The seed's call on ``tuple(model.parameters())`` (the reported crash) equals the detached one."""
    problem = problem_for("matrix", False)
    inner_model, outer_model = nn.Module(), nn.Module()
    inner_model.w, inner_model.b = (nn.Parameter(t.clone()) for t in problem.theta)
    outer_model.w, outer_model.b = (nn.Parameter(t.clone()) for t in problem.phi)
    for name in ("nystrom", "nystrom_pcg", "exact"):
        spec = {k: v for k, v in problem.settings(name).items() if k != "rho"}
        fn = {"nystrom": approx_hypergrad.nystrom, "nystrom_pcg": approx_hypergrad.nystrom_pcg,
              "exact": approx_hypergrad.exact}[name]
        got = fn(problem.inner, problem.outer, tuple(inner_model.parameters()), tuple(outer_model.parameters()),
                 rho=RHO, **spec, **({} if name == "exact" else {"generator": torch.Generator().manual_seed(0)}))
        torch.testing.assert_close(_flat(got), problem.reference[1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["cg", "nystrom_pcg"])
def test_half_precision_solve_runs_past_convergence(method, dtype):
    """Half-precision products of a converged solve's tiny residuals neither underflow to zero
    curvature (a false divergence error) nor spoil the result: 40 iterations at ``ρ = 0``."""
    problem = problem_for("matrix", False)
    spec = {"name": method, "num_iters": 40, "rho": 0.0, **({"rank": 4} if method == "nystrom_pcg" else {})}
    half = Variant(dtype="float16" if dtype == torch.float16 else "bfloat16")
    with fixed_chunk_size(CHUNK):
        got = make_approx(spec, seed=0)(problem.inner, problem.outer, *user_params(problem, half))
        expected = make_approx({"name": "exact", "rho": 0.0})(problem.inner, problem.outer,
                                                              *plain_params(problem, Variant()))
    error = (_flat(got).double() - _flat(expected)).abs().max() / _flat(expected).abs().max()
    assert error <= TOLERANCE[dtype]


# ---- the solver --------------------------------------------------------------------------------------------------

class Weights(nn.Module):
    def __init__(self, values, dtype) -> None:
        super().__init__()
        floating = dtype.is_floating_point or dtype.is_complex
        self.values = nn.ParameterList(nn.Parameter(v.to(dtype).clone(), requires_grad=floating) for v in values)


class ContractSolver(BaseImplicitSolver):
    def inner_forward(self, in_params, out_params, x, y):
        w = _flat(in_params)
        return logistic(in_params, x, y) + 0.5 * ((1 + _flat(out_params).exp()) * w * w).sum()

    def outer_forward(self, in_params, out_params, x, y):
        return logistic(in_params, x, y) + 0.05 * (_flat(out_params) ** 2).sum()


@dataclasses.dataclass(frozen=True)
class SolverVariant:
    """How a solver user builds the models: parameter dtype and shapes, ``functorch_requires_grad``, device."""

    dtype: str = "float64"
    requires_grad: bool = False
    layout: str = "matrix"
    device: str = "cpu"


SOLVER_VARIANTS = st.builds(SolverVariant, dtype=st.sampled_from(sorted(DTYPES)), requires_grad=st.booleans(),
                            layout=st.sampled_from(sorted(LAYOUTS)), device=st.sampled_from(DEVICES))
SOLVER_EXAMPLES = [SolverVariant(), SolverVariant(requires_grad=True), SolverVariant(dtype="float32"),
                   SolverVariant(dtype="float16"), SolverVariant(dtype="bfloat16"), SolverVariant(layout="0d"),
                   SolverVariant(layout="1d"), SolverVariant(layout="4d"), SolverVariant(dtype="int64"),
                   SolverVariant(dtype="complex128")] + ([SolverVariant(device="cuda")] if CUDA else [])

SOLVER_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2e-1}


def make_solver(problem: Problem, variant: SolverVariant, method: str, num_iters: int,
                approx_spec: dict | None = None) -> ContractSolver:
    dtype = DTYPES[variant.dtype]
    inner, outer = Weights(problem.theta, dtype), Weights(problem.phi, dtype)
    data = [(problem.x.to(dtype if dtype.is_floating_point else torch.float64), problem.y)]
    val = [(problem.x_val, problem.y_val)]
    spec = approx_spec or {"name": method, **problem.settings(method)}
    return ContractSolver(inner, outer, data, val, make_approx(spec, seed=0), num_iters=num_iters, unroll_steps=1,
                          inner_optimizer=functools.partial(diff_sgd, lr=0.3, momentum=0.0, weight_decay=0.0),
                          outer_optimizer=torch.optim.SGD(outer.parameters(), lr=0.5),
                          functorch_requires_grad=variant.requires_grad, device=variant.device, log_freq=1000,
                          progress=False)


def solver_state(solver: ContractSolver) -> Tensor:
    return torch.cat([_flat(solver.inner_params), _flat(solver.outer_params())]).detach()


SOLVER_REFERENCES: dict[str, Tensor] = {}
"""The float64 dense-solve run's final state, by layout."""


def solver_examples(test):
    for variant in reversed(SOLVER_EXAMPLES):
        test = example(variant=variant)(test)
    return test


@settings(deadline=None, derandomize=True, max_examples=1, database=None)
@given(variant=SOLVER_VARIANTS)
@solver_examples
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_solver_run_and_state_dict_contract(method, variant):
    """``run()`` (three inner and two outer steps) matches a float64 run with the dense solve; ``state_dict``
    taken after two steps and loaded into a fresh solver continues to the same state as one uninterrupted run."""
    problem = problem_for(variant.layout, False)
    dtype = DTYPES[variant.dtype]
    with fixed_chunk_size(CHUNK):
        if dtype not in FLOATS.values():
            with pytest.raises((TypeError, ValueError), match="inner"):
                make_solver(problem, variant, method, 3)
            return
        full = make_solver(problem, variant, method, 3)
        full.run()
        assert full.outer_step == 2
        head = make_solver(problem, variant, method, 2)
        head.run()
        resumed = make_solver(problem, variant, method, 3)
        resumed.load_state_dict(head.state_dict())
        resumed.run()
        if variant.layout not in SOLVER_REFERENCES:
            reference = make_solver(problem, SolverVariant(layout=variant.layout), method, 3,
                                    approx_spec={"name": "exact", "rho": RHO})
            reference.run()
            SOLVER_REFERENCES[variant.layout] = solver_state(reference)
    got = solver_state(full)
    assert got.dtype == dtype and got.device.type == variant.device
    torch.testing.assert_close(solver_state(resumed), got)
    expected = SOLVER_REFERENCES[variant.layout]
    error = (got.double().cpu() - expected).abs().max() / expected.abs().max()
    assert error <= SOLVER_TOLERANCE[dtype], f"relative error {float(error):.2e} ({dtype})"


@pytest.mark.skipif(not CUDA, reason="no CUDA device here; the CUDA variants run where one is present")
def test_cuda_variants_are_examples():
    assert any(v.device == "cuda" for v in EXAMPLES) and any(v.device == "cuda" for v in SOLVER_EXAMPLES)
