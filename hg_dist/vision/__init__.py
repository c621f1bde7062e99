"""Image models and data for the vision examples and benchmarks (32×32 inputs, CIFAR-10 format).

* :mod:`hg_dist.vision.models` — ResNet-18 adapted to 32×32 inputs, and a small CNN.
* :mod:`hg_dist.vision.datasets` — CIFAR-10's python batches, ImageFolder trees and a
  synthetic stand-in, as ``uint8`` tensors; a seeded validation split.
* :mod:`hg_dist.vision.transforms` — normalization and CIFAR augmentation (crop, flip)
  derived from ``(seed, epoch, example)``, so that results do not depend on the workers.

No torchvision needed (its PyPI wheels pair with torch's CUDA builds).
"""

from hg_dist.vision.datasets import (ImageData, LabeledImages, load_cifar10, load_image_data, load_image_folder,
                                     split_validation, synthetic_images)
from hg_dist.vision.models import resnet18, small_cnn
from hg_dist.vision.transforms import ImageTransform, augmentation_draws, channel_stats, crop_flip, normalize

__all__ = ["ImageData", "ImageTransform", "LabeledImages", "augmentation_draws", "channel_stats", "crop_flip",
           "load_cifar10", "load_image_data", "load_image_folder", "normalize", "resnet18", "small_cnn",
           "split_validation", "synthetic_images"]
