"""Shared bilevel test problems and measurement helpers for the benchmarks.

Problems (all float64, synthetic data, deterministic from a seed):

* :func:`logreg` — logistic regression on ``d`` features; the outer parameters
  are one log weight decay per feature. Convex inner problem, Hessian SPD.
* :func:`mlp` — a one-hidden-layer tanh MLP (``d_in → width → classes``); the outer
  parameters are a log weight decay per input feature (on the first layer's
  columns) plus one per remaining tensor. ``ill_conditioned=True`` scales the
  input features over 3 orders of magnitude and uses a tiny weight decay, so the
  inner Hessian's condition number is huge (badly conditioned variant).

Every inner problem is solved (L-BFGS, full batch) before it is returned, so the
inner parameters sit near ``θ*(φ)`` where the implicit-function theorem applies and
the Hessian is (numerically) positive definite.

Hessian-operator variants (:data:`OPERATORS`, swapped in with
:func:`patched_linearize`): the core's, a loop of ``matvec``, seed-style products
that recompute the gradient, and the core with a fixed ``vmap`` chunk size of 4.

:func:`resnet` is ResNet-18 on synthetic CIFAR-shaped images (float32, p ≈ 11M), for cost only.

Helpers: :func:`time_call` (median wall time), :func:`environment` (machine and
versions recorded in every result file), :func:`accuracy` (cosine and relative
error against a reference hypergradient).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

import hg_dist.hypergradient as hypergradient_module
from hg_dist.hessian import HessianOperator, linearize
from hg_dist.utils import Objective, Params, hvp, num_elements, params_to_vector, vector_to_params

DTYPE = torch.float64
CHUNK_SIZE = 4


@dataclass
class Problem:
    """A bilevel problem at a point ``(θ ≈ θ*(φ), φ)``.

    Attributes:
        name: short identifier used in result tables.
        description: one line for the reports.
        inner_obj: ``f(θ, φ)``.
        outer_obj: ``g(θ, φ)``.
        in_params: ``θ``, solved to near optimality.
        out_params: ``φ``.
        rho: the damping used for Nyström (which needs ``ρ > 0``).
        info: extra facts (sizes, inner solve residual).
    """

    name: str
    description: str
    inner_obj: Objective
    outer_obj: Objective
    in_params: Params
    out_params: Params
    rho: float
    info: dict = field(default_factory=dict)

    @property
    def num_inner(self) -> int:
        """``p``, the number of inner scalars."""
        return num_elements(self.in_params)

    @property
    def num_outer(self) -> int:
        """The number of outer scalars."""
        return num_elements(self.out_params)

    def inner_grad(self) -> Params:
        """One inner gradient ``∇_θ f(θ, φ)``: the unit every cost is measured in."""
        return torch.func.grad(self.inner_obj)(self.in_params, self.out_params)


def solve_inner(inner_obj: Objective, in_params: Params, out_params: Params,
                max_iter: int = 500) -> tuple[Params, float]:
    """Minimise ``f(·, φ)`` with full-batch L-BFGS; return ``(θ, ‖∇_θ f‖)``."""
    theta = [t.detach().clone().requires_grad_(True) for t in in_params]
    phi = tuple(t.detach() for t in out_params)
    optimizer = torch.optim.LBFGS(theta, lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-20, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = inner_obj(tuple(theta), phi)
        loss.backward()
        return loss

    optimizer.step(closure)
    theta = tuple(t.detach() for t in theta)
    grad_norm = float(params_to_vector(torch.func.grad(inner_obj)(theta, phi)).norm())
    return theta, grad_norm


def _split(x: Tensor, y: Tensor, n_train: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def logreg(d: int = 200, n_train: int = 400, n_val: int = 400, weight_decay: float | None = None,
           ill_conditioned: bool = False, seed: int = 0, max_iter: int | None = None) -> Problem:
    """Logistic regression with per-feature weight decay ``exp(φ_i)`` as the outer parameters.

    ``f(θ, φ) = mean softplus(−y xᵀw − b) + ½ Σ_i exp(φ_i) w_i²``,
    ``g(θ, φ) =`` the same logistic loss on validation data, unregularised.
    Well conditioned: standard normal features, decay ``1e-2``. Badly conditioned:
    feature ``i`` scaled by ``10^(1 − 3i/(d−1))`` (10 down to 0.01) and decay
    ``1e-4``: a Hessian spectrum spread over decades (convex, so still SPD); the
    inner solve then gets 2000 L-BFGS iterations instead of 500.
    """
    if max_iter is None:
        max_iter = 2000 if ill_conditioned else 500
    if weight_decay is None:
        weight_decay = 1e-4 if ill_conditioned else 1e-2
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_val, d, generator=gen, dtype=DTYPE)
    w_true = torch.randn(d, generator=gen, dtype=DTYPE) * (torch.rand(d, generator=gen, dtype=DTYPE) < 0.2)
    logits = x @ w_true / d ** 0.25
    y = torch.where(torch.rand(n_train + n_val, generator=gen, dtype=DTYPE) < torch.sigmoid(logits), 1.0, -1.0)
    if ill_conditioned:
        x = x * torch.logspace(1, -2, d, dtype=DTYPE)
    x_tr, y_tr, x_val, y_val = _split(x, y.to(DTYPE), n_train)

    def inner(theta: Params, phi: Params) -> Tensor:
        w, b = theta
        return F.softplus(-y_tr * (x_tr @ w + b)).mean() + 0.5 * (phi[0].exp() * w * w).sum()

    def outer(theta: Params, phi: Params) -> Tensor:
        w, b = theta
        return F.softplus(-y_val * (x_val @ w + b)).mean()

    theta0 = (torch.zeros(d, dtype=DTYPE), torch.zeros((), dtype=DTYPE))
    phi = (torch.full((d,), float(torch.tensor(weight_decay).log()), dtype=DTYPE),)
    theta, residual = solve_inner(inner, theta0, phi, max_iter=max_iter)
    kind = "badly conditioned" if ill_conditioned else "well conditioned"
    return Problem(name=f"logreg{'_illcond' if ill_conditioned else ''}_d{d}",
                   description=f"logistic regression, d={d}, n={n_train}, {kind}, "
                   f"per-feature weight decay (init {weight_decay:g})",
                   inner_obj=inner, outer_obj=outer, in_params=theta, out_params=phi, rho=weight_decay,
                   info={"inner_grad_norm": residual, "n_train": n_train})


def mlp(width: int = 64, d_in: int = 64, classes: int = 10, n_train: int = 256, n_val: int = 256,
        ill_conditioned: bool = False, seed: int = 0, max_iter: int | None = None,
        dtype: str = "float64") -> Problem:
    """Tanh MLP ``d_in → width → classes`` with learned per-tensor/per-feature weight decay.

    ``p = width·(d_in + 1) + classes·(width + 1)`` inner scalars (``width=64``: 4810).
    Outer: ``φ = (φ_in ∈ R^{d_in}, φ_rest ∈ R³)``; first-layer column ``j`` is decayed
    by ``exp(φ_in[j])``, ``b1, W2, b2`` by ``exp(φ_rest)``.
    Well conditioned: unit-scale inputs, decay ``1e-3``. Badly conditioned: input
    feature ``j`` scaled by ``10^(1 − 3j/(d_in−1))`` (from 10 down to 0.01) and decay
    ``1e-4``, which leaves the Hessian positive definite but with a condition number
    in the thousands (the inner solve then runs up to 1000 L-BFGS iterations
    instead of 300, to get close enough to the minimum for that). ``dtype``: ``"float64"``
    (default) or ``"float32"`` (the data, the parameters and so every product).
    """
    if max_iter is None:
        max_iter = 1000 if ill_conditioned else 300
    float_type = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_val
    centers = torch.randn(classes, d_in, generator=gen, dtype=float_type)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + 1.5 * torch.randn(n, d_in, generator=gen, dtype=float_type)
    weight_decay = 1e-3
    if ill_conditioned:
        x = x * torch.logspace(0.5, -1, d_in, dtype=float_type)
        weight_decay = 3e-4
    x_tr, y_tr, x_val, y_val = _split(x, y, n_train)

    def forward(theta: Params, inputs: Tensor) -> Tensor:
        w1, b1, w2, b2 = theta
        return torch.tanh(inputs @ w1.T + b1) @ w2.T + b2

    def inner(theta: Params, phi: Params) -> Tensor:
        w1, b1, w2, b2 = theta
        decay_in, decay_rest = phi[0].exp(), phi[1].exp()
        penalty = ((decay_in * w1 * w1).sum() + decay_rest[0] * (b1 * b1).sum()
                   + decay_rest[1] * (w2 * w2).sum() + decay_rest[2] * (b2 * b2).sum())
        return F.cross_entropy(forward(theta, x_tr), y_tr) + 0.5 * penalty

    def outer(theta: Params, phi: Params) -> Tensor:
        return F.cross_entropy(forward(theta, x_val), y_val)

    theta0 = (torch.randn(width, d_in, generator=gen, dtype=float_type) / d_in ** 0.5,
              torch.zeros(width, dtype=float_type),
              torch.randn(classes, width, generator=gen, dtype=float_type) / width ** 0.5,
              torch.zeros(classes, dtype=float_type))
    log_decay = float(torch.tensor(weight_decay).log())
    phi = (torch.full((d_in,), log_decay, dtype=float_type), torch.full((3,), log_decay, dtype=float_type))
    theta, residual = solve_inner(inner, theta0, phi, max_iter=max_iter)
    kind = "badly conditioned" if ill_conditioned else "well conditioned"
    p = num_elements(theta)
    return Problem(name=f"mlp{'_illcond' if ill_conditioned else ''}_p{p}",
                   description=f"tanh MLP {d_in}-{width}-{classes}, p={p}, n={n_train}, {kind} "
                   f"(weight decay {weight_decay:g}, {dtype})",
                   inner_obj=inner, outer_obj=outer, in_params=theta, out_params=phi,
                   rho=1e-3 if ill_conditioned else 1e-2,
                   info={"inner_grad_norm": residual, "n_train": n_train})


def resnet(n_train: int = 8, n_val: int = 8, width: int = 64, seed: int = 0, rho: float = 1000.0) -> Problem:
    """ResNet-18 (:func:`hg_dist.vision.resnet18`, GroupNorm, ``p = 11,173,962`` at width 64), float32.

    Synthetic CIFAR-shaped data (``(n, 3, 32, 32)`` standard normal images, random
    labels out of 10). ``f(θ, φ) =`` cross-entropy ``+ ½ Σ_t exp(φ_t) ‖θ_t‖²`` with one
    log weight decay per parameter tensor (``φ_t = log 1e-4``), ``g`` the cross-entropy
    on validation images. ``θ`` is the initialisation, not a minimiser: this problem is
    for cost, not accuracy (an inner solve at 11M parameters would dominate the
    benchmark and not change the cost of a Hessian product). At this point the inner
    Hessian is indefinite (30 Lanczos steps, ``n = 16``: ``λ ∈ [−222, 773]``), so the
    shift ``ρ = rho = 1000`` is what makes ``H + ρI`` positive definite and CG defined;
    the cost of either method does not depend on ``ρ``.
    """
    from hg_dist.vision import resnet18

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = resnet18(width=width)
    names = [name for name, _ in model.named_parameters()]
    theta = tuple(t.detach() for _, t in model.named_parameters())
    images = torch.randn(n_train + n_val, 3, 32, 32, generator=gen)
    labels = torch.randint(0, 10, (n_train + n_val,), generator=gen)
    x_tr, y_tr, x_val, y_val = _split(images, labels, n_train)

    def forward(params: Params, inputs: Tensor) -> Tensor:
        return torch.func.functional_call(model, dict(zip(names, params)), (inputs,))

    def inner(params: Params, phi: Params) -> Tensor:
        decay = phi[0].exp()
        penalty = sum(decay[i] * (t * t).sum() for i, t in enumerate(params))
        return F.cross_entropy(forward(params, x_tr), y_tr) + 0.5 * penalty

    def outer(params: Params, phi: Params) -> Tensor:
        return F.cross_entropy(forward(params, x_val), y_val)

    phi = (torch.full((len(theta),), float(torch.tensor(1e-4).log())),)
    p = num_elements(theta)
    return Problem(name=f"resnet18_p{p}", description=f"ResNet-18 (GroupNorm, width {width}), p={p}, n={n_train} "
                   f"synthetic 32×32 images, float32, at initialisation (rho={rho:g})",
                   inner_obj=inner, outer_obj=outer, in_params=theta, out_params=phi, rho=rho,
                   info={"n_train": n_train})


def on_device(problem: Problem, device: torch.device, dtype: torch.dtype | None = None) -> Problem:
    """``problem`` with its parameters, and the data and modules its objectives close over, on ``device``.

    The benchmark problems build their data on the CPU (seeded CPU generators) and close over it;
    this moves every tensor or module found in the objectives' closures (recursively through
    nested functions), in place. With ``dtype``, floating-point tensors, modules and parameters
    are cast to it as well (the same point and data in another precision).
    """
    seen: set[int] = set()

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

    def move(fn) -> None:
        if id(fn) in seen or not callable(fn) or getattr(fn, "__closure__", None) is None:
            return
        seen.add(id(fn))
        for cell in fn.__closure__:
            value = cell.cell_contents
            if isinstance(value, torch.Tensor):
                cell.cell_contents = cast(value)
            elif isinstance(value, torch.nn.Module):
                value.to(device, dtype) if dtype is not None else value.to(device)
            elif callable(value):
                move(value)

    move(problem.inner_obj)
    move(problem.outer_obj)
    problem.in_params = tuple(cast(t) for t in problem.in_params)
    problem.out_params = tuple(cast(t) for t in problem.out_params)
    return problem


# ---------------------------------------------------------------------------
# Hessian-operator variants (baselines and a fixed chunk size; the core is untouched)
# ---------------------------------------------------------------------------

def looped_operator(inner_obj, in_params, out_params) -> HessianOperator:
    """The core's linearization, but ``matmat`` is a Python loop of single ``matvec``."""
    op = linearize(inner_obj, in_params, out_params)

    def matmat(vs: torch.Tensor) -> torch.Tensor:
        return torch.stack([op.matvec(vs[:, i]) for i in range(vs.shape[1])], dim=1)

    return HessianOperator(matvec=op.matvec, matmat=matmat, size=op.size)


def seed_operator(inner_obj, in_params, out_params, *, rev_only: bool = False) -> HessianOperator:
    """Seed-style operator: every product recomputes the inner gradient (``utils.hvp``)."""
    in_params, out_params = tuple(in_params), tuple(out_params)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        tangent = vector_to_params(v, in_params)
        return params_to_vector(hvp(lambda theta: inner_obj(theta, out_params), in_params, tangent,
                                    rev_only=rev_only))

    def matmat(vs: torch.Tensor) -> torch.Tensor:
        return torch.stack([matvec(vs[:, i]) for i in range(vs.shape[1])], dim=1)

    return HessianOperator(matvec=matvec, matmat=matmat, size=num_elements(in_params))


def chunked_operator(inner_obj, in_params, out_params, chunk_size: int = CHUNK_SIZE) -> HessianOperator:
    """The core's linearization with a fixed ``chunk_size``, for comparison with the measured one.

    The core measures the chunk size itself (``linearize(..., chunk_size=None)``, see
    :mod:`hg_dist.calibration`); this fixed-size variant stays as the comparison point.
    """
    return linearize(inner_obj, in_params, out_params, chunk_size=chunk_size)


OPERATORS: dict[str, Callable[..., HessianOperator]] = {
    "core": linearize,
    "chunked": chunked_operator,
    "looped": looped_operator,
    "seed_fwd_rev": seed_operator,
    "seed_rev_rev": lambda f, a, b: seed_operator(f, a, b, rev_only=True),
}
"""Operator factories: the core's, and the baselines it is compared against."""


@contextlib.contextmanager
def patched_linearize(name: str) -> Iterator[None]:
    """Make ``implicit_hypergradient`` build its Hessian operator with ``OPERATORS[name]``."""
    original = hypergradient_module.linearize
    hypergradient_module.linearize = OPERATORS[name]
    try:
        yield
    finally:
        hypergradient_module.linearize = original


# ---------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------

def time_call(fn: Callable[[], object], *, repeats: int = 7, min_seconds: float = 0.0,
              warmup: int = 2) -> float:
    """Fastest wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    The minimum, not the median: on a shared machine other processes only ever add
    time (and oversubscribed OpenMP matrix products can be slowed by 100×), so the
    fastest run is the least disturbed estimate of the cost (``timeit``'s advice).
    Keeps repeating (beyond ``repeats``, up to 1000 runs) until ``min_seconds`` of
    samples are collected, which steadies very fast calls.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    while len(samples) < repeats or sum(samples) < min_seconds:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        if len(samples) >= 1000:
            break
    return min(samples)


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op threads (the benchmarks default to 1, see :func:`environment`)."""
    torch.set_num_threads(threads)


def environment() -> dict:
    """Machine and versions, recorded in every result file.

    The benchmarks run torch with one intra-op thread by default (``--threads``):
    on a small shared machine, OpenMP matrix products with more threads than free
    cores stall unpredictably, which made two-thread ratios irreproducible.
    """
    return {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "argv": sys.argv,
            "load_average_1min": os.getloadavg()[0],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_report(report: dict, out: os.PathLike, name: str, markdown: Callable[[dict], str],
                 start: float) -> dict:
    """Finish a benchmark's ``report``: wall time and closing load average, then
    ``out/<name>.json`` and ``out/<name>.md``, and a PASS/FAIL line per target."""
    from pathlib import Path

    out = Path(out)
    report["wall_seconds"] = time.perf_counter() - start
    report["environment"]["load_average_1min_end"] = os.getloadavg()[0]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{name}.md").write_text(markdown(report))
    for t in report.get("targets", []):
        print(f"{'PASS' if t['passed'] else 'FAIL'}  {t['target']}  [{t['problem']}]  {t['value']}")
    return report


def accuracy(estimate: Params, reference: Params) -> dict:
    """``cosine`` similarity and ``rel_error = ‖est − ref‖ / ‖ref‖`` of two hypergradients."""
    est, ref = params_to_vector(estimate), params_to_vector(reference)
    cosine = torch.nn.functional.cosine_similarity(est, ref, dim=0)
    return {"cosine": float(cosine), "rel_error": float((est - ref).norm() / ref.norm())}


def quick_problems() -> list[Problem]:
    """Tiny versions of the problems, for ``--quick`` smoke runs."""
    return [logreg(d=20, n_train=100, n_val=100), mlp(width=8, d_in=8, n_train=64, n_val=64, max_iter=300)]


def spectrum(problem: Problem, power_iters: int = 50, dense: bool | None = None) -> dict:
    """Extreme eigenvalues of the inner Hessian (``H`` at ``θ``, no damping).

    Dense ``eigvalsh`` (gives ``lambda_min`` and the condition number) when ``dense``
    or, by default, when ``p <= 5000``; else ``power_iters`` power iterations for
    ``lambda_max`` only.
    """
    from hg_dist.hessian import linearize
    from hg_dist.ihvp import dense_hessian

    op = linearize(problem.inner_obj, problem.in_params, problem.out_params)
    like = problem.in_params[0]
    if dense or (dense is None and problem.num_inner <= 5000):
        eigenvalues = torch.linalg.eigvalsh(dense_hessian(op, like))
        lam_min, lam_max = float(eigenvalues[0]), float(eigenvalues[-1])
        return {"lambda_min": lam_min, "lambda_max": lam_max,
                "condition_number": lam_max / lam_min if lam_min > 0 else float("inf")}
    x = torch.randn(problem.num_inner, dtype=like.dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(power_iters):
        x = op.matvec(x / x.norm())
    return {"lambda_min": None, "lambda_max": float(x.norm()), "condition_number": None}
