"""Image models and data for the vision examples and benchmarks (32×32 inputs, CIFAR-10 format).

* :mod:`hg_dist.vision.models` — ResNet-18 adapted to 32×32 inputs, and a small CNN.
"""

from hg_dist.vision.models import resnet18, small_cnn

__all__ = ["resnet18", "small_cnn"]
