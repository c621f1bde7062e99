"""The Hessian operator: row-block products (matmat, rows) and the measured chunk size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

import hg_dist.hessian as hessian_module
from hg_dist.calibration import (CALIBRATIONS, Calibration, calibration_for, calibration_key, clear_calibrations,
                                 pick_chunk_size)
from hg_dist.hessian import HessianOperator, hessian_rows, linearize, shifted
from hg_dist.utils import params_to_vector


def small_mlp(n: int = 12, d: int = 3, width: int = 4):
    """A tanh MLP with two parameter tensors (``p = width·d + width``) and its flat-θ Hessian."""
    x, y = torch.randn(n, d), torch.randn(n)

    def inner(theta, phi):
        w1, w2 = theta
        out = torch.tanh(x @ w1.T) @ w2
        return F.mse_loss(out, y) + 0.5 * phi[0].exp() * (params_to_vector(theta) ** 2).sum()

    theta = (torch.randn(width, d), torch.randn(width))
    phi = (torch.tensor(-2.0),)

    def flat(t):
        return inner((t[:width * d].reshape(width, d), t[width * d:]), phi)

    return inner, theta, phi, hessian(flat)(params_to_vector(theta))


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 4, 7, 16, 100])
def test_matmat_equals_dense_hessian_for_any_chunk_size(chunk_size):
    inner, theta, phi, dense = small_mlp()
    op = linearize(inner, theta, phi, chunk_size=chunk_size)
    assert op.size == dense.shape[0] == 16
    for k in (1, 7, 16):  # 7 is not divisible by 2, 3, 4
        vs = torch.randn(op.size, k)
        torch.testing.assert_close(op.matmat(vs), dense @ vs, rtol=1e-10, atol=1e-12)
    v = torch.randn(op.size)
    torch.testing.assert_close(op.matvec(v), dense @ v, rtol=1e-10, atol=1e-12)


def test_automatic_matmat_is_exact_on_repeated_calls_and_empty_input():
    """Repeated calls with different k (calibrating along the way) stay exact; k = 0 is allowed."""
    inner, theta, phi, dense = small_mlp()
    op = linearize(inner, theta, phi)
    for k in (5, 5, 3):
        vs = torch.randn(op.size, k)
        torch.testing.assert_close(op.matmat(vs), dense @ vs, rtol=1e-10, atol=1e-12)
    assert op.matmat(torch.randn(op.size, 0)).shape == (op.size, 0)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
def test_rows_equal_dense_hessian_rows(chunk_size):
    """``rows(K) = H[K, :]`` in float64, for any chunk size, with the shift, and through the fallback."""
    inner, theta, phi, dense = small_mlp()
    op = linearize(inner, theta, phi, chunk_size=chunk_size)
    for k in (1, 5, 16):
        indices = torch.randperm(op.size)[:k]
        rows = op.rows(indices)
        assert rows.shape == (k, op.size) and rows.is_contiguous()
        torch.testing.assert_close(rows, dense[indices], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(shifted(op, 0.5).rows(indices), (dense + 0.5 * torch.eye(op.size))[indices],
                                   rtol=1e-10, atol=1e-12)
        without_rows = HessianOperator(matvec=op.matvec, matmat=op.matmat, size=op.size)
        torch.testing.assert_close(hessian_rows(without_rows, indices, theta[0]), dense[indices],
                                   rtol=1e-10, atol=1e-12)


def test_matmat_returns_contiguous_columns_for_strided_input():
    inner, theta, phi, dense = small_mlp()
    op = linearize(inner, theta, phi, chunk_size=3)
    vs = torch.randn(7, op.size).T                     # (p, k) with strides (1, p)
    out = op.matmat(vs)
    assert out.is_contiguous()
    torch.testing.assert_close(out, dense @ vs, rtol=1e-10, atol=1e-12)


def measure(calibration: Calibration, size: int, seconds: float) -> None:
    """Two timed chunks of ``size``, as a calibration takes them: a first one with one-time costs, then ``seconds``."""
    assert calibration.next_size(64) == (size, True)
    calibration.record(size, 3 * seconds)
    assert calibration.next_size(64) == (size, True) and size not in calibration.seconds   # not decided on one
    calibration.record(size, seconds)
    assert calibration.seconds[size] == seconds                                           # the faster counts


def test_calibration_picks_sequential_when_batching_is_slower():
    calibration = Calibration()
    assert calibration.next_size(20) == (1, True)
    measure(calibration, 1, 1.0)
    assert calibration.next_size(19) == (2, True)
    measure(calibration, 2, 1.6)                        # batching lost clearly (≥ 1.5×): stop exploring
    assert calibration.done and calibration.best == 1
    assert calibration.next_size(17) == (1, False)


def test_calibration_stops_after_two_sizes_without_a_gain():
    calibration = Calibration()
    for size, seconds in ((1, 1.0), (2, 1.1)):          # c = 2 a little slower: keep looking
        measure(calibration, size, seconds)
    assert not calibration.done and calibration.next_size(20) == (4, True)
    measure(calibration, 4, 1.2)                        # second size in a row without a gain
    assert calibration.done and calibration.best == 1
    recovered = Calibration({1: 1.0, 2: 1.1})
    measure(recovered, 4, 0.6)                          # c = 4 wins after c = 2 lost
    assert not recovered.done and recovered.best == 4


def test_calibration_doubles_while_faster_and_evens_out_chunks():
    calibration = Calibration()
    for size, seconds in ((1, 1.0), (2, 0.8), (4, 0.6), (8, 0.5)):
        measure(calibration, size, seconds)
    assert not calibration.done and calibration.next_size(40) == (16, True)
    measure(calibration, 16, 0.55)                      # slower than 8: one more try
    assert not calibration.done and calibration.next_size(40) == (32, True)
    measure(calibration, 32, 0.6)                       # two without a gain: 8 wins
    assert calibration.done and calibration.best == 8
    assert calibration.next_size(20) == (7, False)      # 3 chunks: 7 + 7 + 6, not 8 + 8 + 4
    assert calibration.next_size(6) == (6, False)
    assert pick_chunk_size({1: 2.0, 4: 1.0, 2: 1.0}) == 2   # ties: the smaller
    assert pick_chunk_size({}) == 1
    assert Calibration.fixed(5).next_size(12) == (4, False)  # a fixed size, evened out


def test_calibration_explores_across_calls_when_blocks_are_small():
    calibration = Calibration({1: 1.0, 2: 0.9})
    assert calibration.next_size(3) == (2, False)       # 4 does not fit: best so far
    assert calibration.next_size(4) == (4, True)


def test_calibration_cache_key():
    clear_calibrations()
    a = (torch.zeros(3, 2, dtype=torch.float32), torch.zeros(3, dtype=torch.float32))
    assert calibration_for(a) is calibration_for((torch.ones(3, 2, dtype=torch.float32), torch.ones(3)))  # values: no
    assert calibration_for(a) is not calibration_for((torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3)))
    assert calibration_for(a) is not calibration_for((torch.zeros(2, 3, dtype=torch.float32), torch.zeros(3)))
    assert calibration_key(a) == (((3, 2), (3,)), torch.float32, "cpu", torch.get_num_threads())
    assert len(CALIBRATIONS) == 3
    clear_calibrations()
    assert not CALIBRATIONS


@pytest.mark.parametrize("cost, expected", [(lambda c: 1.0 if c == 1 else 2.0, 1),
                                            (lambda c: 1.0 / c if c <= 4 else 1.0, 4)])
def test_linearize_uses_the_measured_chunk_size(monkeypatch, cost, expected):
    """A fake clock: a chunk of ``c`` rows takes ``c · cost(c)`` seconds.

    Batching slower → every later block is a loop of single products; faster up to 4
    (8 stops paying) → chunks of 4. The products are exact either way.
    """
    clear_calibrations()
    inner, theta, phi, dense = small_mlp()
    now = [0.0]
    sizes = []
    original_chunk = hessian_module._BlockProducts._chunk

    def chunk(self, tangents, out):
        c = tangents.shape[0]
        sizes.append(c)
        now[0] += c * cost(c)
        return original_chunk(self, tangents, out)

    monkeypatch.setattr(hessian_module._BlockProducts, "_chunk", chunk)
    monkeypatch.setattr(hessian_module.time, "perf_counter", lambda: now[0])
    op = linearize(inner, theta, phi)
    vs = torch.randn(op.size, 40)     # room to time each size twice: 1 (warm-up) + 2·(1 + 2 + 4 + 8) rows
    torch.testing.assert_close(op.matmat(vs), dense @ vs, rtol=1e-10, atol=1e-12)
    assert calibration_for(theta).done and calibration_for(theta).best == expected
    sizes.clear()
    torch.testing.assert_close(op.rows(torch.arange(8)), dense[:8], rtol=1e-10, atol=1e-12)
    assert sizes == [expected] * (8 // expected)
    clear_calibrations()


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), ("4", TypeError),
                                        (True, TypeError)])
def test_bad_chunk_size_is_rejected(bad, error):
    inner, theta, phi, _ = small_mlp()
    with pytest.raises(error, match="chunk_size"):
        linearize(inner, theta, phi, chunk_size=bad)


def test_mixed_term_through_the_saved_graph_matches_dense_mixed_derivative():
    """``linearize(...).mixed(x)`` = ``∂²f/∂φ∂θ · x`` from the dense mixed Jacobian (and = ``mixed_vjp``)."""
    from hg_dist.hessian import mixed_vjp

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    theta = (torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64))
    phi = (torch.randn(4, generator=gen, dtype=torch.float64), torch.randn(1, generator=gen, dtype=torch.float64))

    def f(th, ph):
        return (torch.tanh(a @ th[0]).sum() + 0.5 * (ph[0].exp() * th[0] ** 2).sum()
                + ph[1].sin().sum() * (th[1] ** 3).sum())

    x = torch.randn(6, generator=gen, dtype=torch.float64)
    op = linearize(f, theta, phi)
    got = params_to_vector(op.mixed(x))

    def flat_grad_theta(phi_flat):
        ph = (phi_flat[:4], phi_flat[4:])
        return params_to_vector(torch.func.grad(f)(theta, ph))

    jacobian = torch.func.jacrev(flat_grad_theta)(params_to_vector(phi))      # (p, q) = ∂(∇_θ f)/∂φ
    assert torch.allclose(got, jacobian.T @ x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(got, params_to_vector(mixed_vjp(f, theta, phi, x)), rtol=1e-12, atol=1e-12)
    assert shifted(op, 0.5).mixed is None            # a wrapper does not carry it


def test_products_carry_a_graph_only_when_an_input_requires_grad():
    """Detached parameters and tangent: products and the mixed term are plain tensors (computed without
    grad mode, no differentiable backward); a parameter or a tangent that requires grad gets a graph back
    to it, whose derivative is the third-derivative term (checked against the dense Hessian's dependence on
    θ by autograd through ``torch.func.hessian``). Values are the same either way."""
    inner, theta, phi, dense = small_mlp()
    theta = tuple(t.double() for t in theta)
    phi = tuple(t.double() for t in phi)
    v = torch.randn(16, dtype=torch.float64)
    plain = linearize(inner, theta, phi)
    assert not plain.matvec(v).requires_grad and not plain.rows(torch.tensor([0, 5])).requires_grad
    assert not any(t.requires_grad for t in plain.mixed(v))
    tangent = v.clone().requires_grad_()
    assert plain.matvec(tangent).requires_grad                     # a tangent that requires grad: H v has H as dv

    leaves = tuple(t.clone().requires_grad_() for t in theta)
    tracked = linearize(inner, leaves, phi)
    hv = tracked.matvec(v)
    assert hv.requires_grad
    torch.testing.assert_close(hv.detach(), plain.matvec(v), rtol=1e-12, atol=1e-12)
    u = torch.randn(16, dtype=torch.float64)
    got = params_to_vector(torch.autograd.grad(hv @ u, leaves))    # d/dθ ⟨u, H(θ) v⟩

    width, d = theta[0].shape

    def flat_hessian_form(flat):
        def f(t):
            return inner((t[:width * d].reshape(width, d), t[width * d:]), phi)
        return u @ hessian(f)(flat) @ v

    expected = torch.func.grad(flat_hessian_form)(params_to_vector(theta))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_blocks_that_do_not_reach_the_gradient_give_zero_rows_and_mixed_terms(chunk_size):
    """Detached parameters (one autograd graph of ∇_θ f, passes that ask for θ only or φ only): a θ block
    that ``f`` ignores, one it is linear in, a φ entry it ignores, and ``f`` constant in θ, all against the
    dense Hessian and the dense mixed Jacobian; a tangent that requires grad gets ``H`` as its derivative."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    theta = tuple(torch.randn(n, generator=gen, dtype=torch.float64) for n in (3, 2, 2))
    phi = tuple(torch.randn(n, generator=gen, dtype=torch.float64) for n in (3, 1))

    def f(th, ph):   # th[1] unused, th[2] linear, ph[1] unused
        return torch.tanh(a @ th[0]).pow(2).sum() + (ph[0].exp() * th[0] ** 2).sum() + 3.0 * th[2].sum()

    def split(flat):
        return flat[:3], flat[3:5], flat[5:]

    flat_theta = params_to_vector(theta)
    dense = hessian(lambda t: f(split(t), phi))(flat_theta)
    op = linearize(f, theta, phi, chunk_size=chunk_size)
    eye = torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(eye), dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.rows(torch.tensor([6, 0, 3, 1, 4])), dense[[6, 0, 3, 1, 4]], rtol=1e-12, atol=1e-12)
    x = torch.randn(7, generator=gen, dtype=torch.float64)
    mixed = torch.func.jacrev(lambda q: torch.func.grad(lambda t: f(split(t), (q[:3], q[3:])))(flat_theta))(
        params_to_vector(phi))
    torch.testing.assert_close(params_to_vector(op.mixed(x)), mixed.T @ x, rtol=1e-12, atol=1e-12)
    tangent = x.clone().requires_grad_()
    hx = op.matvec(tangent)
    torch.testing.assert_close(torch.autograd.grad(hx.sum(), tangent)[0], dense.sum(0), rtol=1e-12, atol=1e-12)

    constant = linearize(lambda th, ph: ph[0].sum() * 2.0, theta, phi, chunk_size=chunk_size)
    assert torch.equal(constant.matmat(eye), torch.zeros(7, 7, dtype=torch.float64))
    assert torch.equal(params_to_vector(constant.mixed(x)), torch.zeros(4, dtype=torch.float64))


def test_batched_rows_of_a_model_whose_double_backward_cannot_batch():
    """GroupNorm's double backward has no batching rule for ``is_grads_batched``: chunks of rows fall back
    to a ``vmap`` of a ``torch.func`` VJP and equal the loop of single products."""
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Tanh(),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 1)).double()
    names = [name for name, _ in model.named_parameters()]
    theta = tuple(t.detach() for t in model.parameters())
    x, y = torch.randn(3, 2, 6, 6), torch.randn(3, 1)

    def inner(th, ph):
        out = torch.func.functional_call(model, dict(zip(names, th)), (x,))
        return F.mse_loss(out, y) + ph[0].exp() * (params_to_vector(th) ** 2).sum()

    phi = (torch.tensor(-3.0),)
    indices = torch.tensor([0, 7, 40, 100, 148])
    looped = linearize(inner, theta, phi, chunk_size=1).rows(indices)
    batched = linearize(inner, theta, phi, chunk_size=5).rows(indices)
    torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)
    assert hessian_module.calibration_key(theta) in hessian_module.CANNOT_BATCH   # later operators skip the try
    again = linearize(inner, theta, phi, chunk_size=5).rows(indices)
    torch.testing.assert_close(again, looped, rtol=1e-10, atol=1e-12)
