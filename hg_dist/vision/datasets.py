"""32×32 colour image data sets: CIFAR-10's python batches, ImageFolder trees, a synthetic stand-in.

Every reader returns an :class:`ImageData`: the training and the test split as
``uint8`` images ``(n, 3, 32, 32)`` (channels first, RGB) with ``int64`` labels
``(n,)``, and the class names. Conversion to floats, normalization and augmentation
happen per batch (:mod:`hg_dist.vision.transforms`), so a data set costs one byte per
pixel in memory (CIFAR-10: 180 MB).

Formats (:func:`load_image_data` tells them apart):

* **CIFAR-10, python version** (https://www.cs.toronto.edu/~kriz/cifar.html):
  a folder ``cifar-10-batches-py/`` with ``data_batch_1`` … ``data_batch_5`` and
  ``test_batch`` (and ``batches.meta``). Each batch is a pickled dict with ``data``,
  a ``uint8`` array of rows of 3072 values (1024 red, 1024 green, 1024 blue, each
  32×32 row-major), and ``labels``, a list of class indices. The files were written
  by Python 2, so they are read with ``encoding="bytes"`` and keys may be ``bytes``
  or ``str``. The unpickler admits only what such a file holds (numpy arrays and
  dtypes), so a doctored file cannot run code.
* **ImageFolder** (torchvision's layout): ``train/<class>/*.png`` and
  ``test/<class>/*.png`` (any format Pillow reads). Classes are the sorted folder
  names of ``train/``, label ``i`` for the ``i``-th; ``test/`` may hold a subset;
  at least two classes (with one, every label is right and accuracy means nothing).
  Images must be 32×32; they are converted to 8-bit RGB. 16-bit images (grayscale
  PNG or TIFF, Pillow's modes ``I;16*``) are scaled to 8 bits, ``round(v·255/65535)``,
  not clipped at 255; 32-bit integer or float images other than a PNG's have no
  fixed range and are refused (a 16-bit RGB PNG Pillow already reduces to 8 bits).

Every problem with a folder raises ``ValueError`` naming the file or folder and what
was expected, in one line.
"""

from __future__ import annotations

import importlib
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["CIFAR10_CLASSES", "CIFAR_FOLDER", "IMAGE_SIZE", "ImageData", "LabeledImages", "describe_expected",
           "load_cifar10", "load_image_data", "load_image_folder", "split_validation", "synthetic_images"]

IMAGE_SIZE = 32
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
_ROW = 3 * IMAGE_SIZE * IMAGE_SIZE


@dataclass(frozen=True)
class LabeledImages:
    """``images``: ``uint8 (n, 3, 32, 32)``; ``labels``: ``int64 (n,)``. ``len`` is ``n``; it unpacks as
    ``images, labels`` (e.g. ``TensorDataset(*split)``)."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.images, self.labels))

    def subset(self, indices: Tensor) -> "LabeledImages":
        return LabeledImages(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class ImageData:
    """A training and a test split, and the class names (label ``i`` is ``classes[i]``)."""

    train: LabeledImages
    test: LabeledImages
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def describe_expected() -> str:
    """The accepted layouts, in words (for error messages and help texts)."""
    return (f"the CIFAR-10 python version (a folder {CIFAR_FOLDER}/ holding data_batch_1 ... data_batch_5 and "
            f"test_batch, from https://www.cs.toronto.edu/~kriz/cifar.html), the folder that contains it, or an "
            f"ImageFolder tree (train/<class>/*.png and test/<class>/*.png)")


def load_image_data(root: str | Path) -> ImageData:
    """Read ``root``: a CIFAR-10 python folder, the folder containing one, or an ImageFolder tree.

    Raises:
        ValueError: ``root`` is missing, is none of these layouts, or holds a malformed file
            (the message names it and what was expected).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"{root} is {'not a folder' if root.exists() else 'missing'}; expected {describe_expected()}")
    if (root / CIFAR_FOLDER).is_dir():
        return load_cifar10(root / CIFAR_FOLDER)
    if (root / "test_batch").exists() or (root / "data_batch_1").exists():
        return load_cifar10(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return load_image_folder(root)
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:8]
    raise ValueError(f"{root} holds none of the known layouts (found: {', '.join(found) or 'nothing'}); "
                     f"expected {describe_expected()}")


# ---- CIFAR-10, python version ------------------------------------------------------------

# The globals a pickled CIFAR batch refers to: numpy's array reconstruction (numpy >= 2
# calls the module numpy._core, older versions numpy.core) and, in files written by
# Python 3 with protocol 2, _codecs.encode for bytes.
_ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays and plain containers (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR-10 batch does not hold")
        if module.startswith("numpy.core."):
            try:
                importlib.import_module("numpy._core")
                module = "numpy._core." + module.removeprefix("numpy.core.")
            except ImportError:  # numpy < 2
                pass
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as file:
            return _BatchUnpickler(file, encoding="bytes").load()
    except ModuleNotFoundError as error:
        raise ValueError(f"reading {path} needs numpy ({error}); pip install numpy") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"{path} is not a readable CIFAR-10 batch ({type(error).__name__}: {error}); expected a "
                         f"pickled dict with 'data' and 'labels' (re-extract cifar-10-python.tar.gz)") from None


def _field(batch: Any, key: str, path: Path) -> Any:
    if isinstance(batch, dict):
        for candidate in (key, key.encode()):
            if candidate in batch:
                return batch[candidate]
    keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch) if isinstance(batch, dict) else None
    raise ValueError(f"{path} has no {key!r} entry (it holds {keys if keys is not None else type(batch).__name__}); "
                     f"expected a pickled dict with 'data' (uint8 rows of {_ROW}) and 'labels'")


def _read_batch(path: Path, num_classes: int) -> LabeledImages:
    import numpy as np

    batch = _unpickle(path)
    data, labels = _field(batch, "data", path), _field(batch, "labels", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW:
        what = (f"an array of {data.dtype} with shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise ValueError(f"{path}: 'data' is {what}; expected uint8 rows of {_ROW} values (3×32×32)")
    try:
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError):
        raise ValueError(f"{path}: 'labels' is not a list of class indices") from None
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {tuple(labels.shape)} labels for {data.shape[0]} images; expected one label an "
                         f"image")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{path}: labels range over [{int(labels.min())}, {int(labels.max())}]; expected class "
                         f"indices in [0, {num_classes - 1}]")
    images = torch.from_numpy(np.ascontiguousarray(data)).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE)
    return LabeledImages(images, labels)


def _class_names(folder: Path) -> tuple[str, ...]:
    meta_path = folder / "batches.meta"
    if not meta_path.exists():
        return CIFAR10_CLASSES
    names = _field(_unpickle(meta_path), "label_names", meta_path)
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"{meta_path}: 'label_names' is not a list of class names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _concat(parts: list[LabeledImages]) -> LabeledImages:
    return LabeledImages(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def load_cifar10(folder: str | Path) -> ImageData:
    """Read the CIFAR-10 python version from ``folder`` (``cifar-10-batches-py/``).

    Training batches are ``data_batch_1``, ``data_batch_2``, … (consecutive from 1; the
    distributed data set has five of 10,000 images), the test split ``test_batch``;
    class names come from ``batches.meta`` when present.

    Raises:
        ValueError: a file is missing or malformed (named in the message).
    """
    folder = Path(folder).expanduser()
    numbers = sorted(int(m.group(1)) for p in folder.glob("data_batch_*")
                     if (m := re.fullmatch(r"data_batch_(\d+)", p.name)))
    expected = f"data_batch_1 ... data_batch_5 and test_batch of the CIFAR-10 python version in {folder}"
    if not numbers:
        raise ValueError(f"{folder} has no data_batch_1; expected {expected}")
    if numbers != list(range(1, len(numbers) + 1)):
        gap = next(i for i in range(1, numbers[-1] + 1) if i not in numbers)
        raise ValueError(f"{folder / f'data_batch_{gap}'} is missing (found batches {numbers}); expected {expected}")
    if not (folder / "test_batch").is_file():
        raise ValueError(f"{folder / 'test_batch'} is missing; expected {expected}")
    classes = _class_names(folder)
    train = _concat([_read_batch(folder / f"data_batch_{i}", len(classes)) for i in numbers])
    return ImageData(train=train, test=_read_batch(folder / "test_batch", len(classes)), classes=classes)


# ---- ImageFolder -------------------------------------------------------------------------

def _read_image(path: Path) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            size = image.size
            if size != (IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError(f"{path} is {size[0]}×{size[1]} pixels; expected {IMAGE_SIZE}×{IMAGE_SIZE} images "
                                 f"(resize the data set first)")
            if image.mode.startswith("I;16") or image.mode == "I" and image.format == "PNG":
                return _sixteen_bit(image)
            if image.mode in ("I", "F"):
                raise ValueError(f"{path} has 32-bit {'integer' if image.mode == 'I' else 'float'} pixels, whose "
                                 f"range is not known; expected 8- or 16-bit images (convert the data set first)")
            pixels = image.convert("RGB").tobytes()
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise ValueError(f"{path} is not a readable image ({error})") from None
    return torch.frombuffer(bytearray(pixels), dtype=torch.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE, 3).permute(2, 0, 1)


def _sixteen_bit(image: Any) -> Tensor:
    """A 16-bit grayscale image as ``uint8 (3, 32, 32)``: ``round(v · 255 / 65535)`` in every channel."""
    import numpy as np

    values = torch.from_numpy(np.asarray(image).astype(np.int64))
    gray = torch.div(values.clamp(0, 65535) * 255 + 32767, 65535, rounding_mode="floor").to(torch.uint8)
    return gray.expand(3, IMAGE_SIZE, IMAGE_SIZE).contiguous()


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_split(split: Path, classes: tuple[str, ...], *, every_class: bool) -> LabeledImages:
    folders = sorted(p.name for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [name for name in folders if name not in classes]
    if unknown:
        raise ValueError(f"{split} has class folders {unknown} that train/ does not have; expected the classes "
                         f"{list(classes)}")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(split / name) if (split / name).is_dir() else []
        if every_class and not files:
            raise ValueError(f"{split / name} holds no images; expected image files ({', '.join(IMAGE_SUFFIXES)}) "
                             f"in every class folder")
        images += [_read_image(path) for path in files]
        labels += [label] * len(files)
    if not images:
        raise ValueError(f"{split} holds no images; expected {split}/<class>/*.png")
    return LabeledImages(torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.int64))


def load_image_folder(root: str | Path) -> ImageData:
    """Read an ImageFolder tree ``root/train/<class>/*`` and ``root/test/<class>/*`` of 32×32 images.

    Raises:
        ValueError: a split or class folder is missing or empty, ``train/`` has fewer than two
            classes, an image is unreadable, not 32×32 or of 32-bit pixels, or ``test/`` has a
            class ``train/`` lacks.
    """
    try:
        importlib.import_module("PIL.Image")
    except ImportError:
        raise ValueError("reading an ImageFolder tree needs Pillow: pip install pillow (or the project's "
                         "[examples] extra)") from None
    root = Path(root).expanduser()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ValueError(f"{root / split} is missing; expected an ImageFolder tree {root}/train/<class>/*.png "
                             f"and {root}/test/<class>/*.png")
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not classes:
        raise ValueError(f"{root / 'train'} has no class folders; expected {root}/train/<class>/*.png")
    data = ImageData(train=_read_split(root / "train", classes, every_class=True),
                     test=_read_split(root / "test", classes, every_class=False), classes=classes)
    if len(classes) < 2:
        raise ValueError(f"{root / 'train'} has one class folder ({classes[0]}/); a classifier needs at least two "
                         f"classes (with one, every prediction is right and the accuracy means nothing): add a "
                         f"folder per class, {root}/train/<class>/*.png")
    return data


# ---- splits and synthetic data -----------------------------------------------------------

def split_validation(train: LabeledImages, fraction: float, seed: int) -> tuple[LabeledImages, LabeledImages]:
    """Hold out ``round(fraction · n)`` training examples (a seeded random choice) as validation data.

    Returns ``(train, validation)``; the same ``seed`` gives the same split everywhere.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1)`` or leaving either part empty.
    """
    n = len(train)
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    n_val = round(fraction * n)
    if not 0 < n_val < n:
        raise ValueError(f"a validation fraction of {fraction} of {n} training images leaves "
                         f"{n_val} for validation and {n - n_val} for training; choose a fraction that keeps "
                         f"both non-empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(order[n_val:].sort().values), train.subset(order[:n_val].sort().values)


def synthetic_images(n_train: int, n_test: int, *, num_classes: int = 10, signal: float = 0.15,
                     noise: float = 1.0, seed: int = 0) -> ImageData:
    """A learnable stand-in for CIFAR-10: a weak class pattern on a shared one, shifted, scaled, plus noise.

    Image ``i`` of class ``c``: ``128 + 40·(a_i · roll(S + signal·D_c, s_i) + noise · ε_i)``,
    clipped to ``[0, 255]``, where ``S`` (shared by all classes) and ``D_c`` are fixed random
    8×8×3 patterns upsampled to 32×32 (unit variance), ``a_i ~ U(0.5, 1.5)`` a contrast,
    ``s_i`` a shift of up to ±4 pixels each way and ``ε_i`` white noise. The class signal
    is weak against the noise, so a small training set is easy to overfit, which is where
    weight decay matters. Labels are balanced (``i mod num_classes``, shuffled).
    """
    gen = torch.Generator().manual_seed(seed)

    def smooth(n: int) -> Tensor:
        pattern = torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float32)
        pattern = torch.nn.functional.interpolate(pattern, size=IMAGE_SIZE, mode="bicubic", align_corners=False)
        return (pattern - pattern.mean(dim=(1, 2, 3), keepdim=True)) / pattern.std(dim=(1, 2, 3), keepdim=True)

    patterns = smooth(1) + signal * smooth(num_classes)

    def split(n: int) -> LabeledImages:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
        contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=gen)
        shifts = torch.randint(-4, 5, (n, 2, 1), generator=gen)
        noise_draws = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
        images = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
        grid = torch.arange(IMAGE_SIZE)
        for start in range(0, n, 4096):  # bounded memory: float copies of 4096 images at a time
            part = slice(start, start + 4096)
            rows = (grid - shifts[part, 0]) % IMAGE_SIZE                      # (m, 32): a roll by the shift
            cols = (grid - shifts[part, 1]) % IMAGE_SIZE
            flat = (rows[:, :, None] * IMAGE_SIZE + cols[:, None, :]).reshape(-1, 1, IMAGE_SIZE ** 2)
            clean = patterns[labels[part]].flatten(2).gather(2, flat.expand(-1, 3, -1)).view(-1, 3, IMAGE_SIZE,
                                                                                              IMAGE_SIZE)
            pixels = 128 + 40 * (contrast[part] * clean + noise * noise_draws[part])
            images[part] = pixels.round().clamp(0, 255).to(torch.uint8)
        return LabeledImages(images, labels.to(torch.int64))

    return ImageData(train=split(n_train), test=split(n_test),
                     classes=tuple(f"class_{c}" for c in range(num_classes)))

