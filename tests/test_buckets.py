"""Bucketed and flat gradient means over two gloo processes on loopback: equal to one process on the union batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from loopback import free_port, gloo_group

from hg_dist.distributed.buckets import BucketedGradMean, FlatGradMean
from hg_dist.utils import make_functional


def model_and_data():
    torch.manual_seed(0)
    d = torch.float64
    model = nn.Sequential(nn.Linear(6, 16, dtype=d), nn.Tanh(), nn.Linear(16, 16, dtype=d), nn.Tanh(),
                          nn.Linear(16, 3, dtype=d))
    unused = nn.Linear(2, 2, dtype=d)               # a parameter the loss does not use
    model.add_module("unused", unused)
    x = torch.randn(24, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    return model, x, y


def loss_fn(func):
    def f(params, x, y):
        h = x
        for k in (0, 2, 4):                               # the Sequential's linear layers, skipping "unused"
            h = F.linear(h, params[k], params[k + 1])
            if k < 4:
                h = torch.tanh(h)
        return F.cross_entropy(h, y)
    return f


def _worker(rank, world_size, port, out_dir):
    with gloo_group(rank, world_size, port):
        model, x, y = model_and_data()
        func, params = make_functional(model)
        f = loss_fn(func)
        shard = slice(rank * 12, (rank + 1) * 12)
        bucketed = BucketedGradMean(params, bucket_bytes=16 * 17 * 8)    # several buckets
        results = {"buckets": len(bucketed.buckets)}
        for step in range(2):                                             # the buffer is reused
            grads, loss = bucketed.grad_and_value(f, params, x[shard], y[shard])
            results[f"bucketed{step}"] = ([g.clone() for g in grads], loss.clone())
        g_func, l_func = torch.func.grad_and_value(f)(params, x[shard], y[shard])
        grads, loss = FlatGradMean(params)(g_func, l_func)
        results["flat"] = ([g.clone() for g in grads], loss.clone())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_bucketed_and_flat_means_equal_one_process(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    model, x, y = model_and_data()
    func, params = make_functional(model)
    expected_grads, expected_loss = torch.func.grad_and_value(loss_fn(func))(params, x, y)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["buckets"] >= 3
    for key in ("bucketed0", "bucketed1", "flat"):
        for rank in ranks:
            grads, loss = rank[key]
            assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-14)
            for g, e in zip(grads, expected_grads):
                assert g.shape == e.shape and torch.allclose(g, e, rtol=1e-12, atol=1e-15)
        assert all(torch.equal(a, b) for a, b in zip(ranks[0][key][0], ranks[1][key][0]))


def test_layout_and_errors():
    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        params = [torch.zeros(s, dtype=torch.float32) for s in ((3, 4), (4,), (5, 4), (5,))]
        mean = BucketedGradMean(params, bucket_bytes=20 * 4)
        # reverse order: 5 | 5×4 | 4 + 3×4 (each bucket at most 20 elements), the loss after the first
        assert mean.sizes == [1, 1, 2] and mean.buckets[0] == (0, 6) and mean.loss_index == 5
        assert mean.buffer.numel() == sum(p.numel() for p in params) + 1
        grads, loss = mean.grad_and_value(lambda p, x: (p[0].sum() * x + p[2].square().sum()), params,
                                          torch.tensor(2.0, dtype=torch.float32))
        assert torch.equal(grads[0], torch.full((3, 4), 2.0)) and torch.equal(grads[1], torch.zeros(4).float())
        assert loss.item() == 0.0
        with pytest.raises(ValueError, match="share one dtype"):
            BucketedGradMean([torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float64)])
        with pytest.raises(ValueError, match="bucket_bytes"):
            BucketedGradMean(params, bucket_bytes=0)
    finally:
        dist.destroy_process_group()
