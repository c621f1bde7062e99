"""Dataset distillation: learn a few synthetic 8×8 digit images per class.

The inner problem trains a small convnet ``θ`` on the synthetic images only; the
outer parameters are the synthetic images ``φ`` themselves (labels fixed), chosen
so that the trained convnet does well on real training images::

    f(θ, φ) = mean_s CE(net_θ(φ_s), c_s) + (λ/2)‖θ‖²        (synthetic images, fixed labels c_s)
    g(θ, φ) = mean_j CE(net_θ(x_j), y_j)                     (real images)

Images start as real training images of their class. At the end, a fresh convnet
is trained only on the distilled images and its test accuracy is reported
(``test_acc``), next to the same training on the starting images
(``baseline_test_acc``).

    python examples/dataset_distillation.py --approx nystrom --rank 10 --output runs/distillation
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from hg_dist import cli, make_approx
from hg_dist.data import ShardedLoader
from hg_dist.experiment import LOG_FREQ, ExperimentConfig, add_example_args, check_example_settings, select_device
from hg_dist.optimizers import diff_sgd
from hg_dist.outer_optimizers import make_outer_optimizer
from hg_dist.registry import Setting
from hg_dist.solver import BaseImplicitSolver
from hg_dist.utils import Params, make_functional

DEFAULTS = ExperimentConfig(approximator={"name": "nystrom", "rank": 10, "rho": 0.1},
                            outer_optimizer={"name": "adam", "lr": 0.01}, num_iters=300, unroll_steps=10,
                            output="runs/dataset_distillation")


SETTINGS = (
    Setting("images_per_class", int, 2, "synthetic images per class", minimum=1, maximum=50),
    Setting("batch_size", int, 256, "global batch of real images (all workers)", minimum=1),
    Setting("inner_lr", float, 0.1, "inner SGD step (momentum 0.9)", minimum=0.0, exclusive_minimum=True),
    Setting("eval_steps", int, 300, "training steps of the final evaluation", minimum=0),
    Setting("n_train", int, 1200, "real training images (the outer loss); the rest of the 1797 digits are the "
            "test set", minimum=10, maximum=1796),
    LOG_FREQ,
)
"""The example's own flags (``--images-per-class``, ``--batch-size``, ``--inner-lr``, ``--eval-steps``,
``--n-train``, ``--log-freq``)."""


def check_config(config: ExperimentConfig) -> dict:
    """``config.extra`` completed and checked, the batch against the data and ``--workers`` included.

    Raises:
        ValueError / TypeError: naming the flag and the fix (the command line reports it as a usage error).
    """
    extra = check_example_settings(config, SETTINGS, "dataset_distillation")
    ShardedLoader(range(extra["n_train"]), extra["batch_size"], world_size=config.workers)  # checks only
    return extra


def convnet() -> nn.Module:
    """Conv(1→8, 3×3) → ReLU → AvgPool(2) → Linear(128→10); input ``(n, 1, 8, 8)``, 1.4k parameters."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10))


class SyntheticImages(nn.Module):
    """``φ``: ``images_per_class × 10`` images of shape ``(1, 8, 8)``, ordered class by class."""

    def __init__(self, images: Tensor) -> None:
        super().__init__()
        self.images = nn.Parameter(images.clone())


def load_digits_images(n_train: int, seed: int) -> dict[str, Tensor]:
    """Digits as ``(n, 1, 8, 8)`` images in ``[0, 1]``, shuffled, split into train and test."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.as_tensor(x, dtype=torch.get_default_dtype()).reshape(-1, 1, 8, 8) / 16
    y = torch.as_tensor(y, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    return {"x_train": x[:n_train], "y_train": y[:n_train], "x_test": x[n_train:], "y_test": y[n_train:]}


def first_images_per_class(x: Tensor, y: Tensor, per_class: int) -> tuple[Tensor, Tensor]:
    """The first ``per_class`` images of each class, and their labels ``(0,…,0,1,…)``."""
    images = torch.cat([x[y == c][:per_class] for c in range(10)])
    return images, torch.arange(10).repeat_interleave(per_class)


def train_on(images: Tensor, labels: Tensor, steps: int, optimizer, l2: float, seed: int) -> tuple:
    """Train a fresh convnet (seeded init) on ``images`` only; return ``(func, params)``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = convnet().to(images.device, images.dtype)
    func, params = make_functional(model, disable_autograd_tracking=True)

    def loss(p: Params) -> Tensor:
        return F.cross_entropy(func(p, images), labels) + l2 / 2 * sum(t.pow(2).sum() for t in p)

    grad_fn, state = torch.func.grad(loss), None
    for _ in range(steps):
        params, state = optimizer(params, grad_fn(params), state)
    return func, params


class DistillationSolver(BaseImplicitSolver):
    """Inner: fit the synthetic images. Outer: move the images to lower the loss on real data."""

    l2: float = 1e-3

    def inner_forward(self, in_params: Params, out_params: Params, labels: Tensor) -> Tensor:
        loss = F.cross_entropy(self.inner_func(in_params, out_params[0]), labels)
        return loss + self.l2 / 2 * sum(p.pow(2).sum() for p in in_params)

    def outer_forward(self, in_params: Params, out_params: Params, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(self.inner_func(in_params, input), target)

    def outer_metrics(self, input: Tensor, target: Tensor) -> dict[str, Tensor]:
        logits = self.inner_func(self.inner_params, input)
        return {"outer_loss": F.cross_entropy(logits, target),
                "train_acc": (logits.argmax(-1) == target).to(logits.dtype).mean()}

    def evaluate(self) -> dict[str, float]:
        """Test accuracy of fresh convnets trained only on the distilled vs the starting images."""
        device = self.inner_params[0].device
        x_test, y_test = self.data["x_test"].to(device), self.data["y_test"].to(device)
        labels = self.labels.to(device)
        metrics = {}
        for name, images in (("test_acc", self.outer.images.detach()), ("baseline_test_acc", self.initial_images)):
            func, params = train_on(images.to(device), labels, self.eval_steps, self.inner_optimizer, self.l2,
                                    seed=self.eval_seed)
            with torch.no_grad():
                metrics[name] = (func(params, x_test).argmax(-1) == y_test).double().mean().item()
        return metrics


def build_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> DistillationSolver:
    """The solver for ``config``; rank ``rank`` of ``world_size`` takes its slice of every batch of real images."""
    extra = check_config(config)
    data = load_digits_images(extra["n_train"], config.seed)
    per_class = extra["images_per_class"]
    fewest = int(torch.bincount(data["y_train"], minlength=10).min())
    if per_class > fewest:
        raise ValueError(f"images_per_class (--images-per-class) must be <= {fewest}, the fewest training images "
                         f"of a class, got {per_class}")
    images, labels = first_images_per_class(data["x_train"], data["y_train"], per_class)
    outer_loader = ShardedLoader(TensorDataset(data["x_train"], data["y_train"]), extra["batch_size"],
                                 rank=rank, world_size=world_size, seed=config.seed)
    inner = convnet()
    outer = SyntheticImages(images)
    inner_optimizer = functools.partial(diff_sgd, lr=extra["inner_lr"], momentum=0.9, weight_decay=0)
    solver = DistillationSolver(
        inner, outer, [labels], outer_loader, make_approx(config.approximator, seed=config.seed),
        num_iters=config.num_iters, unroll_steps=config.unroll_steps, inner_optimizer=inner_optimizer,
        outer_optimizer=make_outer_optimizer(config.outer_optimizer, outer.parameters()),
        log_freq=extra["log_freq"], device=select_device(config, rank))
    solver.data, solver.labels = data, labels
    solver.initial_images = images.clone().to(solver.outer.images.device)
    solver.eval_steps, solver.eval_seed = extra["eval_steps"], config.seed + 1
    return solver


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_example_args(parser, SETTINGS, check_config)


def main(argv: list[str] | None = None) -> dict[str, float]:
    return cli.main(build_solver, __doc__, DEFAULTS, add_arguments, argv)


if __name__ == "__main__":
    main()
