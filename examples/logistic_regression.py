"""Per-feature weight decay for logistic regression, tuned by implicit differentiation.

Inner problem (θ ∈ R^d, the classifier; φ ∈ R^d, log weight decays)::

    f(θ, φ) = mean_i BCE(x_iᵀθ, y_i) + ½ Σ_j exp(φ_j) θ_j²          (training data)
    g(θ, φ) = mean_i BCE(x_iᵀθ, y_i)                                  (validation data)

Synthetic data: only a few of the ``dim`` features carry signal and the training
set is small, so the best decays are small on the informative features and large
on the rest. The seed library's example uses the raw decay ``φ_j``; here it is
``exp(φ_j)`` so that no step can make the inner problem unbounded.

The decay is unbounded above (it grows on the noise features), so plain SGD at a
fixed step would diverge once ``lr·exp(φ_j) > 2``. The inner step is therefore
proximal in the decay (:func:`proximal_decay_sgd`)::

    θ ← (θ − lr ∇ℓ(θ)) / (1 + lr exp(φ))  =  θ − lr/(1 + lr exp(φ)) ⊙ ∇_θ f(θ, φ)

stable for every decay (the step along a coordinate shrinks as its curvature
grows), with the same fixed point ``∇_θ f = 0``, so the implicit hypergradient is
unchanged.

    python examples/logistic_regression.py --approx nystrom --rank 5 --output runs/logreg
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from hg_dist import cli, make_approx
from hg_dist.data import ShardedLoader, full_batch
from hg_dist.experiment import LOG_FREQ, ExperimentConfig, add_example_args, check_example_settings, select_device
from hg_dist.outer_optimizers import make_outer_optimizer
from hg_dist.registry import Setting
from hg_dist.solver import BaseImplicitSolver
from hg_dist.utils import Params

DEFAULTS = ExperimentConfig(approximator={"name": "nystrom", "rank": 5, "rho": 0.1},
                            outer_optimizer={"name": "adam", "lr": 0.05}, num_iters=300, unroll_steps=10,
                            output="runs/logistic_regression")


SETTINGS = (
    Setting("dim", int, 30, "features", minimum=1),
    Setting("informative", int, 5, "features with signal (at most --dim)", minimum=1),
    Setting("n_train", int, 100, "training examples", minimum=1),
    Setting("n_val", int, 200, "validation examples (the outer loss)", minimum=1),
    Setting("n_test", int, 1000, "test examples (final metrics only)", minimum=1),
    Setting("batch_size", int, 50, "global inner batch (all workers together)", minimum=1),
    Setting("inner_lr", float, 0.2, "inner step (proximal in the decay; stable for lr < 1/L of the data loss)",
            minimum=0.0, exclusive_minimum=True),
    LOG_FREQ,
)
"""The example's own flags (``--dim``, ``--informative``, ``--n-train``, ``--n-val``, ``--n-test``,
``--batch-size``, ``--inner-lr``, ``--log-freq``)."""


def check_config(config: ExperimentConfig) -> dict:
    """``config.extra`` completed and checked, flags against each other and ``--workers`` included.

    Raises:
        ValueError / TypeError: naming the flag and the fix (the command line reports it as a usage error).
    """
    extra = check_example_settings(config, SETTINGS, "logistic_regression")
    if extra["informative"] > extra["dim"]:
        raise ValueError(f"informative (--informative) must be <= dim (--dim {extra['dim']}), "
                         f"got {extra['informative']}")
    ShardedLoader(range(extra["n_train"]), extra["batch_size"], world_size=config.workers)  # checks only
    full_batch(range(extra["n_val"]), 0, config.workers)
    return extra


def proximal_decay_sgd(decay: Callable[[], Params], lr: float) -> Callable[[Params, Params, Any], tuple[Params, Any]]:
    """The inner step ``θ ← θ − lr/(1 + lr·d) ⊙ g`` with ``d = decay()`` (one tensor per parameter).

    For ``g = ∇ℓ(θ) + d ⊙ θ`` (the gradient of a loss plus ``½ Σ d ⊙ θ²``) this is the
    proximal step of the quadratic decay: ``θ ← (θ − lr ∇ℓ(θ)) / (1 + lr·d)``. The decay
    part contracts by ``1/(1 + lr·d) ∈ (0, 1]`` whatever ``d``, so the step is stable
    whenever ``lr`` is below ``1/L`` of the loss ``ℓ`` alone; a fixed point satisfies
    ``g = 0``, the stationarity the implicit hypergradient assumes. ``decay`` is
    called every step, so it follows the outer parameters as they change.

    Returns:
        ``step(params, grads, state) -> (params, state)``, the inner optimizer's signature
        (no state: ``state`` is passed through).
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be > 0, got {lr!r}")

    def step(params: Params, grads: Params, state: Any) -> tuple[Params, Any]:
        # differentiable, like diff_sgd: an unrolled solver backpropagates through it (and through decay())
        return tuple(p - lr / (1 + lr * d) * g for p, g, d in zip(params, grads, decay())), state

    return step


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


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    return ((logits > 0).to(target.dtype) == target).to(logits.dtype).mean()


class LogisticRegressionSolver(BaseImplicitSolver):
    """The seed's Solver; the default updates do the rest."""

    def inner_forward(self, in_params: Params, out_params: Params, input: Tensor, target: Tensor) -> Tensor:
        loss = F.binary_cross_entropy_with_logits(self.inner_func(in_params, input), target)
        decay = sum((p.pow(2) * d.exp()).sum() for p, d in zip(in_params, out_params))
        return loss + decay / 2

    def outer_forward(self, in_params: Params, out_params: Params, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(self.inner_func(in_params, input), target)

    def outer_metrics(self, input: Tensor, target: Tensor) -> dict[str, Tensor]:
        logits = self.inner_func(self.inner_params, input)
        return {"outer_loss": F.binary_cross_entropy_with_logits(logits, target), "val_acc": accuracy(logits, target)}

    def evaluate(self) -> dict[str, float]:
        metrics = {}
        with torch.no_grad():
            for name in ("val", "test"):
                x, y = (t.to(self.inner_params[0].device) for t in self.data[name])
                logits = self.inner_func(self.inner_params, x)
                metrics[f"{name}_loss"] = F.binary_cross_entropy_with_logits(logits, y).item()
                metrics[f"{name}_acc"] = accuracy(logits, y).item()
            decay = self.outer.log_decay.exp().flatten()
            k = self.informative
            metrics["decay_informative"] = decay[:k].mean().item()
            metrics["decay_noise"] = decay[k:].mean().item()
        return metrics


def build_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> LogisticRegressionSolver:
    """The solver for ``config``; rank ``rank`` of ``world_size`` takes its slice of every global batch."""
    extra = check_config(config)
    dim, informative = extra["dim"], extra["informative"]
    data = make_data(dim, informative, extra["n_train"], extra["n_val"], extra["n_test"], config.seed)
    inner_loader = ShardedLoader(TensorDataset(*data["train"]), extra["batch_size"], rank=rank,
                                 world_size=world_size, seed=config.seed)
    outer_loader = full_batch(TensorDataset(*data["val"]), rank, world_size)
    inner = nn.Linear(dim, 1, bias=False)
    nn.init.zeros_(inner.weight)
    outer = LogDecay(dim)
    solver = LogisticRegressionSolver(
        inner, outer, inner_loader, outer_loader, make_approx(config.approximator, seed=config.seed),
        num_iters=config.num_iters, unroll_steps=config.unroll_steps,
        inner_optimizer=proximal_decay_sgd(lambda: tuple(d.exp() for d in outer.parameters()),
                                           extra["inner_lr"]),
        outer_optimizer=make_outer_optimizer(config.outer_optimizer, outer.parameters()),
        log_freq=extra["log_freq"], device=select_device(config, rank))
    solver.data, solver.informative = data, informative
    return solver


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_example_args(parser, SETTINGS, check_config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    return cli.main(build_solver, __doc__, DEFAULTS, add_arguments, argv)


if __name__ == "__main__":
    main()
