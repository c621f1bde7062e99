"""Image classifiers for 32×32 inputs: a ResNet-18 and a small CNN.

:func:`resnet18` is the residual network of He et al. (2016) in its usual CIFAR form
(the layout and parameter names of ``torchvision.models.resnet18``, with a 3×3
stride-1 first convolution and no max-pooling, so 32×32 inputs keep enough
resolution): 11,173,962 parameters for 10 classes.

Normalization is GroupNorm by default, not BatchNorm, for two reasons that matter
to hypergradients: the inner objective must be a pure function of the parameters
(BatchNorm's running statistics are buffers updated in place, which
``torch.func`` transforms reject), and a data-parallel run must compute the same
function as one process (BatchNorm's batch statistics depend on how the batch is
split over workers; GroupNorm normalizes each example on its own). ``norm="batch"``
gives BatchNorm that always uses the statistics of the batch at hand
(``track_running_stats=False``): pure, but worker-dependent.

(torchvision itself is optional: its PyPI wheels pair with torch's CUDA builds, and
the model is small enough to define here.)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["resnet18", "small_cnn"]


def _norm(kind: str) -> Callable[[int], nn.Module]:
    if kind == "group":
        return lambda channels: nn.GroupNorm(min(32, channels // 2), channels)
    if kind == "batch":
        return lambda channels: nn.BatchNorm2d(channels, track_running_stats=False)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (a 1×1 projection when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int, norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = norm(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), norm(outputs))

    def forward(self, x: Tensor) -> Tensor:
        out = nn.functional.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return nn.functional.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet with :class:`BasicBlock` stages ``blocks`` and widths ``width · (1, 2, 4, 8)``."""

    def __init__(self, blocks: tuple[int, ...], num_classes: int, width: int, norm: str) -> None:
        super().__init__()
        make_norm = _norm(norm)
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(width)
        stages, inputs = [], width
        for index, count in enumerate(blocks):
            outputs = width * 2 ** index
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(*(BasicBlock(inputs if b == 0 else outputs, outputs, stride if b == 0 else 1,
                                                     make_norm) for b in range(count))))
            inputs = outputs
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(inputs, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet18(num_classes: int = 10, *, width: int = 64, norm: str = "group") -> ResNet:
    """ResNet-18 for 32×32 inputs ``(n, 3, 32, 32)`` → logits ``(n, num_classes)``.

    Args:
        width: channels of the first stage (64 is the standard network; smaller
            widths give the same architecture at a fraction of the cost, for tests).
        norm: ``"group"`` (default, worker-independent) or ``"batch"`` (see the module docs).
    """
    return ResNet((2, 2, 2, 2), num_classes, width, norm)


def small_cnn(num_classes: int = 10, *, width: int = 32) -> nn.Sequential:
    """Conv(3→w) → ReLU → AvgPool(2) → Conv(w→2w) → ReLU → AvgPool(2) → Linear, for ``(n, 3, 32, 32)``."""
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(2 * width * 8 * 8, num_classes))
