"""Learned weight decay for a ResNet-18 on CIFAR-10-format images, tuned by implicit differentiation.

Inner problem (θ: the network's parameter tensors θ_1 … θ_m; φ: log weight decays)::

    f(θ, φ) = mean_i CE(net(θ; aug(x_i)), y_i) + ½ Σ_k Σ exp(φ_k) ⊙ θ_k²     (training images, augmented)
    g(θ, φ) = mean_j CE(net(θ; x_j), y_j)                                  (held-out validation images)

φ_k is one number per parameter tensor (``--granularity tensor``, the default: 62
decays for ResNet-18) or one per element (``--granularity element``: as many as θ,
11.2M). Decays live in log space, so no outer step can make one negative; all start
at ``--init-decay``. The inner optimizer is SGD with momentum; every
``--unroll-steps`` steps the hypergradient dg/dφ (by the IHVP method ``--approx``)
takes one outer step. ``--outer-lr 0`` keeps the decays fixed: the reference run.

Data (``--data``):

* ``cifar`` (default): ``--data-dir DIR`` holds the CIFAR-10 python version
  (``DIR/cifar-10-batches-py/`` with ``data_batch_1`` … ``data_batch_5`` and
  ``test_batch``; https://www.cs.toronto.edu/~kriz/cifar.html) or an ImageFolder tree
  (``DIR/train/<class>/*.png``, ``DIR/test/<class>/*.png``) of 32×32 images. Nothing
  is downloaded.
* ``synthetic``: a generated, learnable stand-in (one noisy colour pattern per class,
  ``hg_dist.vision.synthetic_images``) for demos and tests.

``--val-fraction`` of the training images (a seeded choice) is the validation set.
Training batches get the standard augmentation (4-pixel padded random crop,
horizontal flip), derived from (seed, epoch, image) so that ``--workers N`` and
resumed runs see exactly the images of one uninterrupted process; all images are
normalized per channel with the training set's statistics. ``--batch-size`` is the
global batch (all workers together) for both the training and the validation
batches. ``--amp`` runs the inner steps under bf16 autocast on CUDA (the
hypergradients stay in float32); it needs ``--use-gpu``.

    python examples/cifar_weight_decay.py --data-dir ~/data --use-gpu --output runs/cifar
    python examples/cifar_weight_decay.py --data-dir ~/data --workers 2 --use-gpu --amp --output runs/cifar2
    python examples/cifar_weight_decay.py --data synthetic --model cnn --num-iters 400 --output runs/cifar-demo
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from pathlib import Path
from typing import NamedTuple

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
from hg_dist.utils import Params
from hg_dist.vision import (ImageData, ImageTransform, LabeledImages, channel_stats, load_image_data, normalize,
                            resnet18, small_cnn, split_validation, synthetic_images)
from hg_dist.vision.datasets import describe_expected

DEFAULTS = ExperimentConfig(approximator={"name": "nystrom", "rank": 10, "rho": 0.1},
                            outer_optimizer={"name": "adam", "lr": 0.05}, num_iters=8000, unroll_steps=50,
                            output="runs/cifar_weight_decay")

EVAL_CHUNK = 500  # images per forward pass in evaluate()


SETTINGS = (
    Setting("data", str, "cifar", "cifar: read --data-dir; synthetic: generated stand-in images",
            choices=("cifar", "synthetic")),
    Setting("data_dir", Path, None, f"with --data cifar: {describe_expected()}"),
    Setting("model", str, "resnet18", "the network", choices=("resnet18", "cnn")),
    Setting("width", int, None, "channels of the first layer (default: 64 for resnet18, 32 for cnn); smaller is "
            "cheaper", minimum=2),
    Setting("granularity", str, "tensor", "one learned decay per parameter tensor, or per element",
            choices=("tensor", "element")),
    Setting("init_decay", float, 5e-4, "initial weight decay (stored as its logarithm)", minimum=0.0,
            exclusive_minimum=True),
    Setting("batch_size", int, 128, "global batch of training and of validation images, all workers together",
            minimum=1),
    Setting("val_fraction", float, 0.1, "share of the training images held out for the outer loss", minimum=0.0,
            maximum=1.0, exclusive_minimum=True, exclusive_maximum=True),
    Setting("inner_lr", float, 0.05, "inner SGD step", minimum=0.0, exclusive_minimum=True),
    Setting("momentum", float, 0.9, "inner SGD momentum", minimum=0.0, maximum=1.0, exclusive_maximum=True),
    Setting("amp", bool, False, "bf16 autocast for the inner steps on CUDA (needs --use-gpu)"),
    Setting("synthetic_size", int, 5000, "with --data synthetic: training images (the test set has a fifth as "
            "many)", minimum=2),
    dataclasses.replace(LOG_FREQ, default=50),
)
"""The example's own flags, declared once: ``--help``, the checks and ``config.extra`` come from here."""


class Settings(NamedTuple):
    """The example's own settings (:data:`SETTINGS`, ``config.extra`` in a config); :meth:`of` checks them."""

    data: str
    data_dir: str | None
    model: str
    width: int | None
    granularity: str
    init_decay: float
    batch_size: int
    val_fraction: float
    inner_lr: float
    momentum: float
    amp: bool
    synthetic_size: int
    log_freq: int

    @classmethod
    def of(cls, config: ExperimentConfig) -> "Settings":
        """The settings in ``config.extra`` (defaults for those left out), each checked against its
        declaration, then the flags that must go together.

        Raises:
            ValueError / TypeError: naming the flag and the fix.
        """
        extra = check_example_settings(config, SETTINGS, "cifar_weight_decay")
        settings = cls(**{name: extra[name] for name in cls._fields})
        if settings.data == "cifar" and settings.data_dir is None:
            raise ValueError(f"--data-dir is required with --data cifar; expected {describe_expected()}; or use "
                             f"--data synthetic")
        if settings.data == "synthetic" and settings.data_dir is not None:
            raise ValueError("--data-dir is not read with --data synthetic; drop one of them")
        return settings


class LogDecay(nn.Module):
    """``φ``: log weight decays, one per inner parameter tensor (shape ``()``) or per element (its shape)."""

    def __init__(self, shapes: list[torch.Size], per_element: bool, init: float) -> None:
        super().__init__()
        self.log_decay = nn.ParameterList(nn.Parameter(torch.full(shape if per_element else (), math.log(init)))
                                          for shape in shapes)


def decay_penalty(in_params: Params, out_params: Params) -> Tensor:
    """``½ Σ_k Σ exp(φ_k) ⊙ θ_k²`` (a scalar φ_k broadcasts over its tensor)."""
    return sum((d.exp() * p.square()).sum() for p, d in zip(in_params, out_params)) / 2


class Splits(NamedTuple):
    """Training, validation and test images (``uint8``) with the training set's channel statistics."""

    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_splits(settings: Settings, seed: int) -> Splits:
    """Read (or generate) the data, hold out the validation images, measure the channel statistics."""
    if settings.data == "synthetic":
        data: ImageData = synthetic_images(settings.synthetic_size, max(settings.synthetic_size // 5, 1), seed=seed)
    else:
        try:
            data = load_image_data(settings.data_dir)
        except ValueError as error:
            raise ValueError(f"--data-dir: {error}") from None
    try:
        train, val = split_validation(data.train, settings.val_fraction, seed)
    except ValueError as error:
        raise ValueError(f"--val-fraction: {error}") from None
    mean, std = channel_stats(train.images)
    return Splits(train, val, data.test, data.num_classes, mean, std)


def make_loaders(splits: Splits, settings: Settings, seed: int, rank: int, world_size: int,
                 device: torch.device | None = None) -> tuple[ShardedLoader, ShardedLoader]:
    """Augmented training batches and plain validation batches, both of the global ``--batch-size``
    (the validation batch is capped at the validation set, rounded down to a multiple of the workers).
    Batches are transformed on ``device`` (a GPU receives ``uint8`` images)."""
    dtype = torch.get_default_dtype()
    train = ShardedLoader(TensorDataset(*splits.train), settings.batch_size, rank=rank, world_size=world_size,
                          seed=seed, transform=ImageTransform(splits.mean, splits.std, augment=True, seed=seed,
                                                              dtype=dtype, device=device))
    n_val = len(splits.val)
    val_batch = min(settings.batch_size, max(n_val - n_val % world_size, world_size))
    val = ShardedLoader(TensorDataset(*splits.val), val_batch, rank=rank, world_size=world_size, seed=seed + 1,
                        transform=ImageTransform(splits.mean, splits.std, augment=False, dtype=dtype, device=device))
    return train, val


def make_model(settings: Settings, num_classes: int, seed: int) -> nn.Module:
    """The network, initialized from ``seed`` alone (every worker builds the same one)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if settings.model == "resnet18":
            return resnet18(num_classes, width=settings.width or 64)
        return small_cnn(num_classes, width=settings.width or 32)


class WeightDecaySolver(BaseImplicitSolver):
    """Cross-entropy plus learned decays inside; validation cross-entropy outside."""

    def __init__(self, *args, splits: Splits, amp: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.splits, self.amp = splits, amp

    def inner_forward(self, in_params: Params, out_params: Params, images: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.inner_func(in_params, images), labels) + decay_penalty(in_params, out_params)

    def outer_forward(self, in_params: Params, out_params: Params, images: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(self.inner_func(in_params, images), labels)

    def outer_metrics(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.inner_func(self.inner_params, images)
        return {"outer_loss": F.cross_entropy(logits, labels),
                "val_acc": (logits.argmax(dim=1) == labels).to(logits.dtype).mean()}

    def inner_update(self) -> Tensor:
        """One SGD step; under bf16 autocast with ``amp`` (parameters, gradients and updates stay float32)."""
        device_type = self.inner_params[0].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.amp):
            return super().inner_update()

    def _loss_and_accuracy(self, split: LabeledImages) -> tuple[float, float]:
        device, dtype = self.inner_params[0].device, self.inner_params[0].dtype
        loss = correct = 0.0
        for start in range(0, len(split), EVAL_CHUNK):
            images = split.images[start:start + EVAL_CHUNK].to(device)
            labels = split.labels[start:start + EVAL_CHUNK].to(device)
            logits = self.inner_func(self.inner_params, normalize(images, self.splits.mean, self.splits.std, dtype))
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=1) == labels).sum().item()
        return loss / len(split), correct / len(split)

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on the whole validation and test sets; the learned decays' geometric means."""
        metrics = {}
        with torch.no_grad():
            for name, split in (("val", self.splits.val), ("test", self.splits.test)):
                metrics[f"{name}_loss"], metrics[f"{name}_acc"] = self._loss_and_accuracy(split)
            logs = list(self.outer_params())
            for group, keep in (("weights", lambda p: p.dim() >= 2), ("others", lambda p: p.dim() < 2)):
                chosen = [d.expand_as(p).flatten() for p, d in zip(self.inner_params, logs) if keep(p)]
                if chosen:
                    metrics[f"decay_{group}"] = torch.cat(chosen).mean().exp().item()
        metrics.update(n_train=float(len(self.splits.train)), n_val=float(len(self.splits.val)),
                       n_test=float(len(self.splits.test)))
        return metrics


def build_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> WeightDecaySolver:
    """The solver for ``config``; rank ``rank`` of ``world_size`` takes its slice of every global batch."""
    settings = Settings.of(config)
    splits = load_splits(settings, config.seed)
    device = select_device(config, rank)
    inner_loader, outer_loader = make_loaders(splits, settings, config.seed, rank, world_size, device)
    inner = make_model(settings, splits.num_classes, config.seed)
    outer = LogDecay([p.shape for p in inner.parameters()], settings.granularity == "element", settings.init_decay)
    return WeightDecaySolver(
        inner, outer, inner_loader, outer_loader, make_approx(config.approximator, seed=config.seed),
        num_iters=config.num_iters, unroll_steps=config.unroll_steps,
        inner_optimizer=functools.partial(diff_sgd, lr=settings.inner_lr, momentum=settings.momentum,
                                          weight_decay=0),
        outer_optimizer=make_outer_optimizer(config.outer_optimizer, outer.parameters()),
        log_freq=settings.log_freq, device=device,
        splits=splits, amp=settings.amp)


def check(config: ExperimentConfig) -> None:
    """What the command line refuses before anything runs: flags that do not go together, and data that
    cannot be read or batched (so the folder is read here, on the submitting machine, before the solvers
    read it again)."""
    settings = Settings.of(config)
    if settings.amp and not config.use_gpu:
        raise ValueError("--amp (bf16 autocast for the inner steps) is for CUDA: add --use-gpu, or drop --amp on CPU")
    make_loaders(load_splits(settings, config.seed), settings, config.seed, rank=0, world_size=config.workers)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_example_args(parser, SETTINGS, check)


def main(argv: list[str] | None = None) -> dict[str, float]:
    return cli.main(build_solver, __doc__, DEFAULTS, add_arguments, argv)


if __name__ == "__main__":
    main()
