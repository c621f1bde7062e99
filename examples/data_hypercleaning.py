"""Data hypercleaning: learn one weight per training example to undo label noise.

Digits (scikit-learn's bundled 8×8 images, 10 classes); a fraction ``--noise`` of
the training labels is replaced by a different random class. A linear softmax
classifier ``θ`` is trained on the weighted noisy set; the outer parameters are
one logit ``φ_i`` per training example, weight ``σ(φ_i)``, chosen so that the
trained classifier does well on a small clean validation set::

    f(θ, φ) = (1/n) Σ_i σ(φ_i) CE(θ; x_i, ỹ_i) + (λ/2)‖θ‖²      (noisy training set)
    g(θ, φ) = mean_j CE(θ; x_j, y_j)                               (clean validation set)

Plain training (all weights equal, same steps) is the baseline; both accuracies
go to result.json. Noisy examples end up with small weights.

    python examples/data_hypercleaning.py --approx nystrom --rank 10 --output runs/hypercleaning
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from hg_dist import cli, make_approx
from hg_dist.data import ShardedLoader, full_batch
from hg_dist.experiment import LOG_FREQ, ExperimentConfig, add_example_args, check_example_settings, select_device
from hg_dist.optimizers import diff_sgd
from hg_dist.outer_optimizers import make_outer_optimizer
from hg_dist.registry import Setting
from hg_dist.solver import BaseImplicitSolver
from hg_dist.utils import Params

DEFAULTS = ExperimentConfig(approximator={"name": "nystrom", "rank": 10, "rho": 0.1},
                            outer_optimizer={"name": "adam", "lr": 0.1}, num_iters=400, unroll_steps=10,
                            output="runs/data_hypercleaning")


DIGITS = 1797
"""Examples in scikit-learn's digits set (train + validation + test come out of it)."""

SETTINGS = (
    Setting("noise", float, 0.4, "fraction of corrupted training labels", minimum=0.0, maximum=1.0),
    Setting("n_train", int, 1000, "training examples", minimum=1),
    Setting("n_val", int, 300, "clean validation examples", minimum=1),
    Setting("inner_lr", float, 0.3, "inner SGD step (momentum 0.9)", minimum=0.0, exclusive_minimum=True),
    Setting("batch_size", int, None, "global inner batch (all workers together); default: all training examples",
            minimum=1),
    LOG_FREQ,
)
"""The example's own flags (``--noise``, ``--n-train``, ``--n-val``, ``--inner-lr``, ``--batch-size``,
``--log-freq``)."""


def check_config(config: ExperimentConfig) -> dict:
    """``config.extra`` completed and checked, flags against each other and ``--workers`` included.

    Raises:
        ValueError / TypeError: naming the flag and the fix (the command line reports it as a usage error).
    """
    extra = check_example_settings(config, SETTINGS, "data_hypercleaning")
    n_train, n_val, workers = extra["n_train"], extra["n_val"], config.workers
    if n_train + n_val >= DIGITS:
        raise ValueError(f"n_train + n_val (--n-train + --n-val) must be < {DIGITS} (the digits set, which also "
                         f"holds the test examples), got {n_train} + {n_val}")
    if extra["batch_size"] is None:
        if n_train % workers:
            raise ValueError(f"the default batch is all n_train={n_train} training examples (--n-train), which is "
                             f"not a multiple of --workers {workers}; use --n-train {n_train - n_train % workers} "
                             f"or pass --batch-size")
        extra["batch_size"] = n_train
    ShardedLoader(range(n_train), extra["batch_size"], world_size=workers)  # checks only
    full_batch(range(n_val), 0, workers)
    return extra


class ExampleWeights(nn.Module):
    """``φ``: one logit per training example; the example's weight is ``σ(φ_i)``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n))


def load_noisy_digits(n_train: int, n_val: int, noise: float, seed: int) -> dict[str, Tensor]:
    """Standardized digits split into train (labels corrupted with rate ``noise``), val and test.

    Returns tensors ``x_*`` of shape ``(n, 64)``, labels ``y_*`` of shape ``(n,)``,
    the clean training labels ``y_train_clean`` and the mask ``corrupted``.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.get_default_dtype())
    y = torch.as_tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order], y[order]
    if n_train + n_val >= len(y):
        raise ValueError(f"n_train + n_val must be < {len(y)} (the digits set), got {n_train + n_val}")
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    corrupted = torch.rand(n_train, generator=gen) < noise
    shift = torch.randint(1, 10, (n_train,), generator=gen)
    y_noisy = torch.where(corrupted, (y[:n_train] + shift) % 10, y[:n_train])
    return {"x_train": x[:n_train], "y_train": y_noisy, "y_train_clean": y[:n_train], "corrupted": corrupted,
            "x_val": x[n_train:n_train + n_val], "y_val": y[n_train:n_train + n_val],
            "x_test": x[n_train + n_val:], "y_test": y[n_train + n_val:]}


def accuracy(logits: Tensor, target: Tensor) -> Tensor:
    return (logits.argmax(-1) == target).to(logits.dtype).mean()


class HypercleaningSolver(BaseImplicitSolver):
    """Weighted training loss inside, clean validation loss outside."""

    l2: float = 1e-3

    def inner_forward(self, in_params: Params, out_params: Params, input: Tensor, target: Tensor,
                      index: Tensor) -> Tensor:
        losses = F.cross_entropy(self.inner_func(in_params, input), target, reduction="none")
        weights = torch.sigmoid(out_params[0][index])
        return (weights * losses).mean() + self.l2 / 2 * sum(p.pow(2).sum() for p in in_params)

    def outer_forward(self, in_params: Params, out_params: Params, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.inner_func(in_params, input), target)

    def outer_metrics(self, input: Tensor, target: Tensor) -> dict[str, Tensor]:
        logits = self.inner_func(self.inner_params, input)
        return {"outer_loss": F.cross_entropy(logits, target), "val_acc": accuracy(logits, target)}

    def evaluate(self) -> dict[str, float]:
        """Accuracies of the cleaned model and of plain training (same steps, equal weights)."""
        data, device = self.data, self.inner_params[0].device
        plain = train_plain(self.inner_func, self.initial_params, data["x_train"].to(device),
                            data["y_train"].to(device), self.num_iters, self.inner_optimizer, self.l2)
        metrics = {}
        with torch.no_grad():
            for split in ("val", "test"):
                x, y = data[f"x_{split}"].to(device), data[f"y_{split}"].to(device)
                metrics[f"{split}_acc"] = accuracy(self.inner_func(self.inner_params, x), y).item()
                metrics[f"baseline_{split}_acc"] = accuracy(self.inner_func(plain, x), y).item()
            weights = torch.sigmoid(self.outer.logits).cpu()
            corrupted = data["corrupted"]
            metrics["weight_clean_mean"] = weights[~corrupted].mean().item()
            metrics["weight_corrupted_mean"] = weights[corrupted].mean().item()
        return metrics


def train_plain(func, params: Params, x: Tensor, y: Tensor, steps: int, optimizer, l2: float) -> Params:
    """The baseline: full-batch training on the noisy labels, every example weighted equally."""
    def loss(p: Params) -> Tensor:
        return F.cross_entropy(func(p, x), y) + l2 / 2 * sum(t.pow(2).sum() for t in p)

    grad_fn = torch.func.grad(loss)
    state = None
    for _ in range(steps):
        params, state = optimizer(params, grad_fn(params), state)
    return params


def build_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> HypercleaningSolver:
    """The solver for ``config``; rank ``rank`` of ``world_size`` takes its slice of every global batch."""
    extra = check_config(config)
    n_train = extra["n_train"]
    data = load_noisy_digits(n_train, extra["n_val"], extra["noise"], config.seed)
    train = TensorDataset(data["x_train"], data["y_train"], torch.arange(n_train))
    inner_loader = ShardedLoader(train, extra["batch_size"], rank=rank, world_size=world_size, seed=config.seed)
    outer_loader = full_batch(TensorDataset(data["x_val"], data["y_val"]), rank, world_size)
    inner = nn.Linear(64, 10)
    outer = ExampleWeights(n_train)
    solver = HypercleaningSolver(
        inner, outer, inner_loader, outer_loader, make_approx(config.approximator, seed=config.seed),
        num_iters=config.num_iters, unroll_steps=config.unroll_steps,
        inner_optimizer=functools.partial(diff_sgd, lr=extra["inner_lr"], momentum=0.9, weight_decay=0),
        outer_optimizer=make_outer_optimizer(config.outer_optimizer, outer.parameters()),
        log_freq=extra["log_freq"], device=select_device(config, rank))
    solver.data = data
    solver.initial_params = tuple(p.detach().clone() for p in solver.inner_params)
    return solver


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_example_args(parser, SETTINGS, check_config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    return cli.main(build_solver, __doc__, DEFAULTS, add_arguments, argv)


if __name__ == "__main__":
    main()
