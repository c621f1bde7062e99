"""diff_sgd / diff_adam against torch.optim trajectories, and gradients through them."""

from __future__ import annotations

import functools

import pytest
import torch

from hg_dist.optimizers import diff_adam, diff_sgd


def quadratic_grads(params, matrix):
    """Gradients of Σ_i ½ θ_iᵀ M θ_i + sin(θ_i).sum() for each leaf (non-linear on purpose)."""
    return tuple(matrix[: p.numel(), : p.numel()] @ p.reshape(-1) + torch.cos(p.reshape(-1)) for p in params)


def reference_trajectory(optimizer_cls, settings, init, steps, matrix):
    leaves = [torch.nn.Parameter(t.clone()) for t in init]
    optimizer = optimizer_cls(leaves, **settings)
    for _ in range(steps):
        optimizer.zero_grad()
        for leaf, g in zip(leaves, quadratic_grads(tuple(l.detach() for l in leaves), matrix)):
            leaf.grad = g.reshape(leaf.shape)
        optimizer.step()
    return [l.detach() for l in leaves]


def functional_trajectory(step_fn, init, steps, matrix):
    params, state = tuple(t.clone() for t in init), None
    for _ in range(steps):
        grads = tuple(g.reshape(p.shape) for p, g in zip(params, quadratic_grads(params, matrix)))
        params, state = step_fn(params, grads, state)
    return params


@pytest.fixture
def setup():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=generator)
    init = (torch.randn(2, 3, generator=generator), torch.randn(4, generator=generator))
    return init, a @ a.T / 6


@pytest.mark.parametrize("settings", [
    dict(lr=0.1, momentum=0.0, weight_decay=0.0),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, weight_decay=0.0, dampening=0.3),
    dict(lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True),
])
def test_diff_sgd_matches_torch_sgd(setup, settings):
    init, matrix = setup
    expected = reference_trajectory(torch.optim.SGD, settings, init, 15, matrix)
    got = functional_trajectory(functools.partial(diff_sgd, **settings), init, 15, matrix)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("settings", [
    dict(lr=0.01),
    dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
])
def test_diff_adam_matches_torch_adam(setup, settings):
    init, matrix = setup
    expected = reference_trajectory(torch.optim.Adam, settings, init, 15, matrix)
    got = functional_trajectory(functools.partial(diff_adam, **settings), init, 15, matrix)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, rtol=1e-10, atol=1e-12)


def unrolled_loss(step_fn, matrix, init, hyper):
    """A loss after 5 steps whose gradient w.r.t. ``hyper`` flows through every step."""
    params, state = init, None
    for _ in range(5):
        grads = tuple(g.reshape(p.shape) + hyper * p for p, g in zip(params, quadratic_grads(params, matrix)))
        params, state = step_fn(params, grads, state)
    return sum((p ** 2).sum() for p in params)


def test_gradcheck_through_diff_sgd(setup):
    init, matrix = setup
    step = functools.partial(diff_sgd, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    hyper = torch.tensor(0.3, requires_grad=True)
    leaf = init[0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, x: unrolled_loss(step, matrix, (x, init[1]), h), (hyper, leaf))


def test_gradcheck_through_diff_adam(setup):
    init, matrix = setup
    step = functools.partial(diff_adam, lr=0.05, weight_decay=1e-2)
    hyper = torch.tensor(0.3, requires_grad=True)
    leaf = init[0].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda h, x: unrolled_loss(step, matrix, (x, init[1]), h), (hyper, leaf))


def test_inputs_are_not_modified(setup):
    init, matrix = setup
    before = [t.clone() for t in init]
    diff_sgd(list(init), list(init), None, weight_decay=0.1, momentum=0.9, lr=0.1)
    for b, t in zip(before, init):
        assert torch.equal(b, t)


@pytest.mark.parametrize("call, error, match", [
    (lambda p: diff_sgd(p, p, None, weight_decay=0, momentum=0, lr=-1), ValueError, "lr"),
    (lambda p: diff_sgd(p, p[:1], None, weight_decay=0, momentum=0, lr=0.1), ValueError, "grads"),
    (lambda p: diff_sgd(p, p, None, weight_decay=0, momentum=0, lr=0.1, nesterov=True), ValueError, "nesterov"),
    (lambda p: diff_adam(p, p, None, betas=(1.0, 0.9)), ValueError, "betas"),
    (lambda p: diff_adam(p, p, None, lr="fast"), TypeError, "lr"),
])
def test_bad_arguments(setup, call, error, match):
    init, _ = setup
    with pytest.raises(error, match=match):
        call(init)


# ---- in-place twins ------------------------------------------------------------------------

from hg_dist.optimizers import SGD, Adam, AdamState, diff_adam_, diff_sgd_, in_place  # noqa: E402


def inplace_trajectory(step_fn, init, steps, matrix):
    """Like functional_trajectory, but the step writes into the same tensors (checked)."""
    params, state = tuple(t.clone() for t in init), None
    ids = [id(p) for p in params]
    for _ in range(steps):
        grads = tuple(g.reshape(p.shape).clone() for p, g in zip(params, quadratic_grads(params, matrix)))
        params, state = step_fn(params, grads, state)
        assert [id(p) for p in params] == ids
    return params, state


SGD_SETTINGS = [
    dict(lr=0.1, momentum=0.0, weight_decay=0.0),
    dict(lr=0.05, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.05, momentum=0.9, weight_decay=0.0, dampening=0.3),
    dict(lr=0.05, momentum=0.8, weight_decay=1e-3, nesterov=True),
]
ADAM_SETTINGS = [dict(lr=0.01), dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=1e-2)]


@pytest.mark.parametrize("settings", SGD_SETTINGS)
def test_inplace_sgd_matches_pure_trajectory(setup, settings):
    init, matrix = setup
    init = tuple(t.double() for t in init)
    matrix = matrix.double()
    expected = functional_trajectory(functools.partial(diff_sgd, **settings), init, 15, matrix)
    got, state = inplace_trajectory(functools.partial(diff_sgd_, **settings), init, 15, matrix)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, rtol=1e-13, atol=1e-13)
    assert (state is None) == (settings["momentum"] == 0)


@pytest.mark.parametrize("settings", ADAM_SETTINGS)
def test_inplace_adam_matches_pure_trajectory(setup, settings):
    init, matrix = setup
    init = tuple(t.double() for t in init)
    matrix = matrix.double()
    expected = reference_trajectory(torch.optim.Adam, settings, init, 15, matrix)
    got, state = inplace_trajectory(functools.partial(diff_adam_, **settings), init, 15, matrix)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, rtol=1e-12, atol=1e-12)
    assert isinstance(state, AdamState) and state.step == 15


def test_inplace_state_resumes_pure_state(setup):
    """A state produced by the pure step continues under the in-place one (checkpoints interoperate)."""
    init, matrix = setup
    init, matrix = tuple(t.double() for t in init), matrix.double()
    settings = dict(lr=0.02, weight_decay=1e-3)
    expected = functional_trajectory(functools.partial(diff_adam, **settings), init, 6, matrix)
    params, state = tuple(t.clone() for t in init), None
    for k in range(6):
        grads = tuple(g.reshape(p.shape) for p, g in zip(params, quadratic_grads(params, matrix)))
        step = diff_adam if k < 3 else diff_adam_
        params, state = step(params, grads, state, **settings)
    for e, g in zip(expected, params):
        assert torch.allclose(e, g, rtol=1e-13, atol=1e-13)


def test_in_place_finds_twins_only_for_known_optimizers():
    sgd = SGD(lr=0.1, momentum=0.9)
    assert in_place(sgd) == sgd.step_
    adam = Adam(lr=0.1)
    assert in_place(adam) == adam.step_
    twin = in_place(functools.partial(diff_sgd, lr=0.1, momentum=0.0, weight_decay=0.0))
    assert twin.func is diff_sgd_ and twin.keywords == dict(lr=0.1, momentum=0.0, weight_decay=0.0)
    assert in_place(functools.partial(diff_adam, lr=0.1)).func is diff_adam_
    assert in_place(lambda p, g, s: (p, s)) is None
    assert in_place(functools.partial(diff_sgd, (), (), None)) is None   # positional binding: not the seed's form
