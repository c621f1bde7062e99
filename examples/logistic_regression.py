"""Per-feature weight decay for logistic regression, tuned by implicit differentiation.

Inner problem (θ ∈ R^d, the classifier; φ ∈ R^d, log weight decays)::

    f(θ, φ) = mean_i BCE(x_iᵀθ, y_i) + ½ Σ_j exp(φ_j) θ_j²          (training data)
    g(θ, φ) = mean_i BCE(x_iᵀθ, y_i)                                  (validation data)

Synthetic data: only a few of the ``dim`` features carry signal and the training
set is small, so the best decays are small on the informative features and large
on the rest. The seed library's example uses the raw decay ``φ_j``; here it is
``exp(φ_j)`` so that no step can make the inner problem unbounded.

    python examples/logistic_regression.py --approx nystrom --rank 5 --output runs/logreg
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from torch import Tensor, nn
from torch.func import grad_and_value
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from hg_dist.distributed import run_experiment, shard_indices
from hg_dist.experiment import (ExperimentConfig, add_common_args, make_approx,
                                make_outer_optimizer, parse_config, select_device)
from hg_dist.optimizers import diff_sgd
from hg_dist.solver import BaseImplicitSolver
from hg_dist.utils import Params

DEFAULTS = {"num_iters": 300, "unroll_steps": 10, "outer_lr": 0.05, "outer_optimizer": "adam",
            "outer_momentum": 0.9, "output": "runs/logistic_regression"}


class LogDecay(nn.Module):
    """``φ``: one log weight decay per inner weight, shape ``(1, dim)`` like ``nn.Linear(dim, 1).weight``."""

    def __init__(self, dim: int, init: float = 0.0) -> None:
        super().__init__()
        self.log_decay = nn.Parameter(torch.full((1, dim), float(init)))


def make_data(dim: int, informative: int, n_train: int, n_val: int, n_test: int,
              seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """Gaussian features, labels ``~ Bernoulli(σ(xᵀw*))`` with ``w*`` nonzero on ``informative`` features."""
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.get_default_dtype()
    n = n_train + n_val + n_test
    x = torch.randn(n, dim, generator=gen, dtype=dtype)
    w = torch.zeros(dim, dtype=dtype)
    w[:informative] = 2.0 * torch.randn(informative, generator=gen, dtype=dtype).sign()
    y = (torch.rand(n, generator=gen, dtype=dtype) < torch.sigmoid(x @ w)).to(dtype).unsqueeze(1)
    cut = (0, n_train, n_train + n_val, n)
    return {name: (x[a:b], y[a:b]) for name, a, b in zip(("train", "val", "test"), cut, cut[1:])}


class LogisticRegressionSolver(BaseImplicitSolver):
    """The seed's Solver, returning its losses so they are logged."""

    def inner_forward(self, in_params: Params, out_params: Params, input: Tensor, target: Tensor) -> Tensor:
        loss = F.binary_cross_entropy_with_logits(self.inner_func(in_params, input), target)
        decay = sum((p.pow(2) * d.exp()).sum() for p, d in zip(in_params, out_params))
        return loss + decay / 2

    def outer_forward(self, in_params: Params, out_params: Params, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(self.inner_func(in_params, input), target)

    def inner_update(self) -> Tensor:
        input, target = next(self.inner_loader)
        grads, loss = grad_and_value(self.inner_forward)(self.inner_params, self.outer_params(), input, target)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)
        return loss

    def outer_update(self) -> dict[str, Tensor]:
        in_input, in_target = next(self.inner_loader)
        out_input, out_target = next(self.outer_loader)
        self.outer_grad = self.approx_ihvp(lambda i, o: self.inner_forward(i, o, in_input, in_target),
                                           lambda i, o: self.outer_forward(i, o, out_input, out_target),
                                           self.inner_params, self.outer_params())
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)
        with torch.no_grad():
            logits = self.inner_func(self.inner_params, out_input)
            return {"outer_loss": F.binary_cross_entropy_with_logits(logits, out_target),
                    "val_acc": ((logits > 0).to(out_target.dtype) == out_target).to(logits.dtype).mean()}

    def evaluate(self) -> dict[str, float]:
        metrics = {}
        with torch.no_grad():
            for name in ("val", "test"):
                x, y = (t.to(self.inner_params[0].device) for t in self.data[name])
                logits = self.inner_func(self.inner_params, x)
                metrics[f"{name}_loss"] = F.binary_cross_entropy_with_logits(logits, y).item()
                metrics[f"{name}_acc"] = ((logits > 0).to(y.dtype) == y).to(logits.dtype).mean().item()
            decay = self.outer.log_decay.exp().flatten()
            k = self.informative
            metrics["decay_informative"] = decay[:k].mean().item()
            metrics["decay_noise"] = decay[k:].mean().item()
        return metrics


def build_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> LogisticRegressionSolver:
    """The solver for ``config``, on data shard ``rank`` of ``world_size``."""
    extra = config.extra
    dim, informative = extra.get("dim", 30), extra.get("informative", 5)
    data = make_data(dim, informative, extra.get("n_train", 100), extra.get("n_val", 200),
                     extra.get("n_test", 1000), config.seed)
    batch = extra.get("batch_size", 50)
    shard = {}
    for name, (x, y) in data.items():
        index = shard_indices(len(y), rank, world_size)
        shard[name] = (x[index], y[index])
    gen = torch.Generator().manual_seed(config.seed + 1000 * rank)
    inner_loader = DataLoader(TensorDataset(*shard["train"]), batch_size=batch // world_size, shuffle=True,
                              generator=gen)
    outer_loader = DataLoader(TensorDataset(*shard["val"]), batch_size=len(shard["val"][0]), shuffle=True,
                              generator=gen)
    inner = nn.Linear(dim, 1, bias=False)
    nn.init.zeros_(inner.weight)
    outer = LogDecay(dim)
    solver = LogisticRegressionSolver(
        inner, outer, inner_loader, outer_loader, make_approx(config),
        num_iters=config.num_iters, unroll_steps=config.unroll_steps,
        inner_optimizer=functools.partial(diff_sgd, lr=extra.get("inner_lr", 0.2), momentum=0, weight_decay=0),
        outer_optimizer=make_outer_optimizer(config, outer.parameters()),
        log_freq=extra.get("log_freq", 20), device=select_device(config, rank),
        log_dir=config.output if rank == 0 else None)
    solver.data, solver.informative = data, informative
    return solver


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--dim", type=int, default=30, help="features")
    parser.add_argument("--informative", type=int, default=5, help="features with signal")
    parser.add_argument("--n-train", type=int, default=100, help="training examples")
    parser.add_argument("--inner-lr", type=float, default=0.2, help="inner SGD step")
    parser.set_defaults(**DEFAULTS)
    config = parse_config(parser, argv)
    metrics = run_experiment(build_solver, config)  # in this process when --workers 1
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
