"""The Hessian operator: chunked batched products and the automatic chunk size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian

import hg_dist.hessian as hessian_module
from hg_dist.hessian import CHUNK_BUDGET_BYTES, auto_chunk_size, linearize
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
    """Repeated calls with different k reuse the bytes counted at build time; k = 0 is allowed."""
    inner, theta, phi, dense = small_mlp()
    op = linearize(inner, theta, phi)
    for k in (5, 5, 3):
        vs = torch.randn(op.size, k)
        torch.testing.assert_close(op.matmat(vs), dense @ vs, rtol=1e-10, atol=1e-12)
    assert op.matmat(torch.randn(op.size, 0)).shape == (op.size, 0)


@pytest.mark.parametrize("budget, expected", [(CHUNK_BUDGET_BYTES, "unchunked"), (1, "loop"), ("3 columns", 3)])
def test_automatic_rule_is_applied_with_the_counted_bytes(monkeypatch, budget, expected):
    """Tiny problem → one unchunked vmap; a budget below one column → a loop; else budget // bytes."""
    inner, theta, phi, dense = small_mlp()
    seen = []
    original_products = hessian_module._products
    original_rule = hessian_module.auto_chunk_size

    def rule(num_columns, column_bytes, budget_bytes):
        seen.append(column_bytes)
        if budget == "3 columns":
            budget_bytes = 3 * column_bytes + column_bytes // 2
        elif budget == 1:
            budget_bytes = 1
        return original_rule(num_columns, column_bytes, budget_bytes)

    chunks = []
    monkeypatch.setattr(hessian_module, "auto_chunk_size", rule)
    monkeypatch.setattr(hessian_module, "_products",
                        lambda matvec, vs, chunk: chunks.append(chunk) or original_products(matvec, vs, chunk))
    op = linearize(inner, theta, phi)
    vs = torch.randn(op.size, 10)
    torch.testing.assert_close(op.matmat(vs), dense @ vs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matmat(vs), dense @ vs, rtol=1e-10, atol=1e-12)
    assert len(seen) == 2 and seen[0] == seen[1] > 0  # measured once, reused
    want = {"unchunked": 10, "loop": 1}.get(expected, expected)
    assert chunks == [want, want]


def test_byte_counter_counts_new_tensors_not_views():
    """A product over n samples allocates O(n) floats, and no bytes for views."""
    sizes = []
    for n in (100, 1000):
        x = torch.randn(n, 5)

        def inner(theta, phi):
            return F.softplus(x @ theta[0]).mean() + phi[0] * (theta[0] ** 2).sum()

        counter = hessian_module._NewTensorBytes()
        op = linearize(inner, (torch.randn(5),), (torch.tensor(0.1),))
        with counter:
            op.matvec(torch.randn(5))
        sizes.append(counter.bytes)
    # a handful of n-vectors of float64 per product; x (n×5) itself is only viewed (x.T)
    assert 8 * 1000 * 3 <= sizes[1] <= 8 * 1000 * 20
    assert 8 <= sizes[1] / sizes[0] <= 11


def test_auto_chunk_size_rule():
    mib = 2 ** 20
    assert CHUNK_BUDGET_BYTES == 16 * mib
    assert auto_chunk_size(20, 40 * 1024) == 20              # tiny intermediates: unchunked
    assert auto_chunk_size(20, 0) == 20                      # nothing allocated
    assert auto_chunk_size(20, int(1.1 * mib)) == 10         # cap 14 → 10 + 10, not 14 + 6
    assert auto_chunk_size(20, 3 * mib) == 5                 # cap 5 → 4 chunks of 5
    assert auto_chunk_size(20, int(11.5 * mib)) == 1         # big intermediates: a loop
    assert auto_chunk_size(20, 100 * mib) == 1               # huge intermediates: a loop
    assert auto_chunk_size(64, 1 * mib, budget_bytes=8 * mib) == 8
    assert auto_chunk_size(1, 1) == auto_chunk_size(0, 1) == 1


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), ("4", TypeError),
                                        (True, TypeError)])
def test_bad_chunk_size_is_rejected(bad, error):
    inner, theta, phi, _ = small_mlp()
    with pytest.raises(error, match="chunk_size"):
        linearize(inner, theta, phi, chunk_size=bad)
