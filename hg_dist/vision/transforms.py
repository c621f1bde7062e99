"""Batch transforms for ``uint8`` images: CIFAR augmentation that does not depend on the workers, and normalization.

Augmentation is the standard CIFAR recipe: pad each image with 4 black pixels on
every side, crop 32×32 at an offset ``(dy, dx) ∈ {0, …, 8}²``, and mirror it
left–right with probability ½. The offset and the flip of example ``i`` in epoch
``e`` are not drawn from a generator whose state depends on what was drawn before;
they are read off a hash of ``(seed, e, i)``::

    h = mix(mix(mix(seed) ^ e) ^ i)          (mix: a 32-bit integer hash, "lowbias32")
    dy = h mod 9,  dx = ⌊h / 9⌋ mod 9,  flip = ⌊h / 81⌋ mod 2

So the same example in the same epoch gets the same crop whichever worker loads it,
in whatever batch, after however many restarts: with :class:`hg_dist.data.ShardedLoader`
(which hands the transform the examples' global indices) ``W`` workers see exactly the
images one process sees, and a resumed run sees those of the uninterrupted one.

:class:`ImageTransform` is the ``transform(batch, indices, epoch)`` hook of
``ShardedLoader``: ``(uint8 images, labels)`` in, ``(normalized floats, labels)`` out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ImageTransform", "augmentation_draws", "channel_stats", "crop_flip", "normalization_constants",
           "normalize"]

_MASK32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """``x · c mod 2³²`` for ``0 ≤ x < 2³²`` (ints or int64 tensors) without overflowing 64 bits."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _MASK32


def _mix32(x):
    """A bijective 32-bit integer hash (Wellons' lowbias32), on ints or int64 tensors in ``[0, 2³²)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def augmentation_draws(indices: Tensor, epoch: int, seed: int, padding: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """The crop offsets and flips of examples ``indices`` in ``epoch``: a pure function of ``(seed, epoch, index)``.

    Returns:
        ``(dy, dx, flip)``, each of shape ``(n,)``: offsets in ``[0, 2·padding]`` (int64)
        and flips (bool).
    """
    key = _mix32(_mix32(_mix32(seed & _MASK32) ^ ((seed >> 32) & _MASK32)) ^ (epoch & _MASK32))
    h = _mix32((indices.to(torch.int64) & _MASK32) ^ key)
    choices = 2 * padding + 1
    return h % choices, (h // choices) % choices, ((h // choices ** 2) % 2).bool()


def crop_flip(images: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int = 4) -> Tensor:
    """Pad ``images (n, C, H, W)`` with ``padding`` zeros, crop ``H×W`` at ``(dy, dx)``, mirror where ``flip``."""
    n, channels, height, width = images.shape
    padded_width = width + 2 * padding
    padded = images.new_zeros(n, channels, height + 2 * padding, padded_width)
    padded[:, :, padding:padding + height, padding:padding + width] = images
    device = images.device
    rows = dy.to(device)[:, None] + torch.arange(height, device=device)
    cols = dx.to(device)[:, None] + torch.arange(width, device=device)
    cols = torch.where(flip.to(device)[:, None], cols.flip(1), cols)  # a mirrored crop reads its columns backwards
    flat = (rows[:, :, None] * padded_width + cols[:, None, :]).reshape(n, 1, height * width)
    return padded.flatten(2).gather(2, flat.expand(n, channels, height * width)).view(n, channels, height, width)


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``uint8`` images ``(n, C, H, W)``, on the ``[0, 1]`` scale.

    Computed from each channel's histogram (exact counts), so every worker gets the same numbers.
    """
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).to(torch.float64)
        p = counts / counts.sum()
        m = float((p * values).sum())
        var = float((p * (values - m).square()).sum())
        mean.append(m)
        std.append(var ** 0.5 if var > 0 else 1.0)
    return tuple(mean), tuple(std)


def normalization_constants(mean: Sequence[float], std: Sequence[float], dtype: torch.dtype,
                            device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` of shape ``(C, 1, 1)`` with ``(x / 255 − mean) / std = x · scale + shift``.

    ``scale = 1 / (255 · std)`` and ``shift = −mean / std``, computed in float64 and rounded once to ``dtype``.
    """
    std64 = torch.tensor(std, dtype=torch.float64)
    mean64 = torch.tensor(mean, dtype=torch.float64)
    shape = (-1, 1, 1)
    return ((1 / (255 * std64)).to(dtype=dtype, device=device).reshape(shape),
            (-mean64 / std64).to(dtype=dtype, device=device).reshape(shape))


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype | None = None) -> Tensor:
    """``(images / 255 − mean) / std`` per channel, as ``dtype`` (default: torch's default dtype).

    Computed as ``images · scale + shift`` (:func:`normalization_constants`) in place on the converted
    copy: two passes over the batch instead of three out-of-place ones. Multiply and add are separate
    kernels (no fused multiply-add), so every element is rounded the same way in any batch.
    """
    dtype = dtype or torch.get_default_dtype()
    scale, shift = normalization_constants(mean, std, dtype, images.device)
    return images.to(dtype).mul_(scale).add_(shift)


class ImageTransform:
    """``transform(batch, indices, epoch)`` for :class:`~hg_dist.data.ShardedLoader` over ``(uint8 images, labels)``.

    Args:
        mean, std: per-channel statistics on the ``[0, 1]`` scale (:func:`channel_stats`).
        augment: random crop and flip (training data); ``False`` only normalizes.
        seed: seeds the augmentation (see the module docstring).
        padding: the crop's padding.
        dtype: of the returned images (default: torch's default dtype when called).
        device: where to transform (and return) the batch; moving the ``uint8`` images to
            a GPU first copies a quarter of the bytes of float32 images.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, augment: bool, seed: int = 0,
                 padding: int = 4, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment, self.seed, self.padding, self.dtype = augment, int(seed), int(padding), dtype
        self.device = None if device is None else torch.device(device)
        self._constants: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def __call__(self, batch: Sequence[Tensor], indices: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        images, labels = batch
        if self.device is not None:
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        if self.augment:
            images = crop_flip(images, *augmentation_draws(indices, epoch, self.seed, self.padding), self.padding)
        dtype = self.dtype or torch.get_default_dtype()
        key = (dtype, images.device)
        if key not in self._constants:
            self._constants[key] = normalization_constants(self.mean, self.std, dtype, images.device)
        scale, shift = self._constants[key]
        return images.to(dtype).mul_(scale).add_(shift), labels
