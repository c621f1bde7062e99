"""The fused normalize (``x · scale + shift``) against the textbook ``(x / 255 − mean) / std``."""

from __future__ import annotations

import pytest
import torch

from hg_dist.vision import ImageTransform, channel_stats, normalize
from hg_dist.vision.transforms import normalization_constants


def old_formula(images, mean, std, dtype):
    mean_t = torch.tensor(mean, dtype=torch.float64).reshape(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).reshape(-1, 1, 1)
    return ((images.double() / 255 - mean_t) / std_t).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-13), (torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_fused_normalize_matches_formula(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (17, 3, 8, 8), dtype=torch.uint8, generator=gen)
    images[0] = 0
    images[1] = 255
    mean, std = channel_stats(images)
    expected = old_formula(images, mean, std, torch.float64)
    got = normalize(images, mean, std, dtype)
    assert got.dtype == dtype and got.shape == images.shape
    assert torch.allclose(got.double(), expected, rtol=tol, atol=tol * expected.abs().max())
    transform = ImageTransform(mean, std, augment=False, dtype=dtype)
    labels = torch.arange(17)
    out, out_labels = transform((images, labels), labels, 0)
    assert torch.equal(out, got) and torch.equal(out_labels, labels)


def test_constants_and_batch_independence():
    scale, shift = normalization_constants((0.5, 0.25), (0.2, 0.4), torch.float64)
    assert torch.allclose(scale.flatten(), torch.tensor([1 / 51, 1 / 102], dtype=torch.float64), rtol=1e-15)
    assert torch.allclose(shift.flatten(), torch.tensor([-2.5, -0.625], dtype=torch.float64), rtol=1e-15)
    images = torch.randint(0, 256, (33, 3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mean, std = channel_stats(images)
    whole = normalize(images, mean, std, torch.float32)
    for part in (slice(0, 1), slice(5, 6), slice(3, 30)):
        assert torch.equal(normalize(images[part], mean, std, torch.float32), whole[part])
