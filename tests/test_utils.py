"""Tuple-of-tensor helpers, hvp and make_functional."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian

from hg_dist.utils import foreach, hvp, make_functional, params_to_vector, vector_to_params


def test_vector_round_trip_with_scalar_and_batched_leaves():
    params = (torch.randn(2, 3), torch.randn(()), torch.randn(4))
    vec = params_to_vector(params)
    assert vec.shape == (11,)
    for a, b in zip(vector_to_params(vec, params), params):
        assert torch.equal(a, b)
    batched = torch.randn(11, 5)
    leaves = vector_to_params(batched, params)
    assert [tuple(t.shape) for t in leaves] == [(2, 3, 5), (5,), (4, 5)]
    assert torch.equal(leaves[2][:, 1], batched[7:, 1])
    with pytest.raises(ValueError, match="params_to_vector"):
        vector_to_params(torch.randn(10), params)


def test_foreach_and_structure_errors():
    a, b = (torch.ones(2), torch.ones(3)), (torch.ones(2), 2 * torch.ones(3))
    out = foreach(a, b, torch.add, alpha=0.5)
    assert torch.equal(out[1], 2 * torch.ones(3))
    with pytest.raises(ValueError, match="p1 has 2 tensors but p2 has 1"):
        foreach(a, b[:1], torch.add)
    with pytest.raises(ValueError, match="shape"):
        foreach(a, (torch.ones(2), torch.ones(4)), torch.add)


@pytest.mark.parametrize("rev_only", [False, True])
def test_hvp_matches_dense_hessian(rev_only):
    x = torch.randn(5)
    w = torch.randn(5)

    def f(params):
        return (torch.tanh(params[0] * w) ** 2).sum() + params[0].prod()

    tangent = (torch.randn(5),)
    expected = hessian(lambda t: f((t,)))(x) @ tangent[0]
    assert torch.allclose(hvp(f, (x,), tangent, rev_only=rev_only)[0], expected, atol=1e-12)


def test_make_functional_matches_module_and_accepts_other_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().eval()
    func, params = make_functional(model)
    x = torch.randn(7, 3)
    assert torch.allclose(func(params, x), model(x))
    doubled = tuple(2 * p for p in params)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    assert torch.allclose(func(doubled, x), model(x))
    _, detached = make_functional(model, disable_autograd_tracking=True)
    assert not any(p.requires_grad for p in detached)
    with pytest.raises(ValueError, match="expected 6 parameter tensors"):
        func(params[:2], x)
    with pytest.raises(TypeError, match="nn.Module"):
        make_functional(lambda x: x)
