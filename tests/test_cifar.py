"""Image data (CIFAR-10 python batches, ImageFolder), worker-independent augmentation, and the
learned-weight-decay example (examples/cifar_weight_decay.py) at W=1 and on Ray Train at W=2.

Every data set here is written by the test itself (a few pickled batches of 20 images,
an ImageFolder of PNGs), so the arrays written are the ground truth.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import pickle
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from hg_dist import cli
from hg_dist.data import ShardedLoader
from hg_dist.experiment import ExperimentConfig, parse_config
from hg_dist.vision import (ImageTransform, augmentation_draws, channel_stats, crop_flip, load_cifar10,
                            load_image_data, load_image_folder, normalize, synthetic_images)

EXAMPLE_PATH = Path(__file__).resolve().parents[1] / "examples" / "cifar_weight_decay.py"


def load_example():
    spec = importlib.util.spec_from_file_location("example_cifar_weight_decay", EXAMPLE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = load_example()


def build_float64(config: ExperimentConfig, rank: int = 0, world_size: int = 1):
    """The example's solver in float64 (Ray Train workers start in float32)."""
    torch.set_default_dtype(torch.float64)
    return EXAMPLE.build_solver(config, rank, world_size)


# ---- data sets written by the tests ---------------------------------------------------------

def random_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


class Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the CIFAR batches: every str as a byte string
    (``SHORT_BINSTRING`` / ``BINSTRING``, read back as bytes with ``encoding="bytes"``) and numpy's
    globals under ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_byte_string(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        header = (pickle.SHORT_BINSTRING + bytes([len(data)]) if len(data) < 256
                  else pickle.BINSTRING + struct.pack("<i", len(data)))
        self.write(header + data)
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_byte_string

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def python2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_cifar(folder: Path, batches: int = 3, per_batch: int = 20) -> dict[str, np.ndarray]:
    """``folder/cifar-10-batches-py`` as the CIFAR authors ship it, with ``per_batch`` images a batch.

    The batches take turns: written as Python 2 did (byte-string keys and values, protocol 2),
    with str keys by Python 3 (protocol 4, labels an array), and with bytes keys by Python 3
    (protocol 2).
    """
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images, labels = [], []
    for b in range(batches + 1):
        x = random_images(per_batch, seed=10 + b)
        y = rng.integers(0, 10, size=per_batch)
        name = "test_batch" if b == batches else f"data_batch_{b + 1}"
        rows = x.reshape(per_batch, 3072)
        if b % 3 == 0:
            payload = python2_pickle({"batch_label": name, "labels": y.tolist(), "data": rows,
                                      "filenames": [f"{i}.png" for i in range(per_batch)]})
        elif b % 3 == 1:
            payload = pickle.dumps({"batch_label": name, "labels": y, "data": rows}, protocol=4)
        else:
            payload = pickle.dumps({b"batch_label": name.encode(), b"labels": y.tolist(), b"data": rows}, protocol=2)
        (root / name).write_bytes(payload)
        images.append(x)
        labels.append(y)
    meta = {"label_names": [f"c{k}" for k in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}
    (root / "batches.meta").write_bytes(python2_pickle(meta))
    return {"train_x": np.concatenate(images[:-1]), "train_y": np.concatenate(labels[:-1]),
            "test_x": images[-1], "test_y": labels[-1]}


FOLDER_COUNTS = {"train": {"cat": 9, "dog": 7, "frog": 8}, "test": {"cat": 2, "dog": 3}}   # test/ lacks frog


def write_image_folder(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``root/{train,test}/<class>/*.png``; returns the images and labels in the order a reader must give."""
    from PIL import Image

    truth = {}
    for split, counts in FOLDER_COUNTS.items():
        xs, ys = [], []
        for label, name in enumerate(sorted(FOLDER_COUNTS["train"])):
            if name not in counts:
                continue
            (root / split / name).mkdir(parents=True)
            x = random_images(counts[name], seed=hash((split, name)) % 1000)
            for i, image in enumerate(x):
                Image.fromarray(image.transpose(1, 2, 0)).save(root / split / name / f"{i:03d}.png")
            xs.append(x)
            ys += [label] * counts[name]
        truth[split] = (np.concatenate(xs), np.array(ys))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return truth


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    return folder, write_cifar(folder)


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory):
    pytest.importorskip("PIL")
    root = tmp_path_factory.mktemp("imagefolder")
    return root, write_image_folder(root)


# ---- loaders ----------------------------------------------------------------------------------

def test_cifar_batches_load_as_written(cifar_dir):
    folder, truth = cifar_dir
    for path in (folder, folder / "cifar-10-batches-py"):        # the parent or the batches folder itself
        data = load_image_data(path)
        assert data.train.images.shape == (60, 3, 32, 32) and data.train.images.dtype == torch.uint8
        assert data.train.labels.shape == (60,) and data.train.labels.dtype == torch.int64
        assert data.test.images.shape == (20, 3, 32, 32) and len(data.test) == 20
        assert np.array_equal(data.train.images.numpy(), truth["train_x"])
        assert np.array_equal(data.train.labels.numpy(), truth["train_y"])
        assert np.array_equal(data.test.images.numpy(), truth["test_x"])
        assert np.array_equal(data.test.labels.numpy(), truth["test_y"])
        assert data.classes == tuple(f"c{k}" for k in range(10))


def test_image_folder_loads_as_written(folder_dir):
    root, truth = folder_dir
    data = load_image_data(root)
    assert data.classes == ("cat", "dog", "frog")
    for split in ("train", "test"):
        x, y = truth[split]
        got = getattr(data, split)
        assert got.images.dtype == torch.uint8 and got.images.shape == (len(y), 3, 32, 32)
        assert got.labels.dtype == torch.int64
        assert np.array_equal(got.images.numpy(), x) and np.array_equal(got.labels.numpy(), y)
    assert len(data.train) == 24 and len(data.test) == 5                    # notes.txt is not an image
    assert data.test.labels.tolist().count(2) == 0                          # frog: in train only, label kept


def test_loaders_reject_malformed_folders(tmp_path, cifar_dir):
    source, _ = cifar_dir

    def cifar_copy(name: str) -> Path:
        target = tmp_path / name / "cifar-10-batches-py"
        target.mkdir(parents=True)
        for file in (source / "cifar-10-batches-py").iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        return target

    gap = cifar_copy("gap")
    (gap / "data_batch_2").unlink()
    with pytest.raises(ValueError, match=r"data_batch_2 is missing \(found batches \[1, 3\]\)"):
        load_cifar10(gap)
    rows = cifar_copy("rows")
    (rows / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, 2))
    with pytest.raises(ValueError, match=r"data_batch_1: 'data' is an array of uint8 with shape \(4, 100\); expected "
                                         r"uint8 rows of 3072"):
        load_cifar10(rows)
    labels = cifar_copy("labels")
    (labels / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}))
    with pytest.raises(ValueError, match=r"test_batch: labels range over \[0, 10\]; expected class indices in \[0, 9\]"):
        load_cifar10(labels)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds none of the known layouts.*cifar-10-batches-py"):
        load_image_data(tmp_path / "empty")


def test_a_doctored_pickle_cannot_run_code(tmp_path, cifar_dir):
    """The unpickler admits numpy arrays only: a pickle that would run a command is refused, unrun."""
    import os

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload(), b"labels": []}, protocol=2))
    (folder / "test_batch").write_bytes((cifar_dir[0] / "cifar-10-batches-py" / "test_batch").read_bytes())
    with pytest.raises(ValueError, match=r"data_batch_1 is not a readable CIFAR-10 batch.*refers to "
                                         r"(posix|os|nt)\.system"):
        load_image_data(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_image_folder_rejects_wrong_sizes_and_unknown_test_classes(tmp_path, folder_dir):
    from PIL import Image

    root = tmp_path / "sizes"
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(root / split / "a" / "0.png")
    Image.new("RGB", (31, 32)).save(root / "train" / "a" / "1.png")
    with pytest.raises(ValueError, match=r"1\.png is 31×32 pixels; expected 32×32"):
        load_image_folder(root)
    (root / "train" / "a" / "1.png").unlink()
    (root / "test" / "b").mkdir()
    with pytest.raises(ValueError, match=r"test has class folders \['b'\] that train/ does not have"):
        load_image_folder(root)


# ---- the example's command line: bad data folders and flags are usage errors -----------------

def usage_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        EXAMPLE.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    usage, message = err.strip().splitlines()[0], err.strip().splitlines()[-1]
    assert usage.startswith("usage: ") and ": error: " in message         # argparse's usage, then one line
    return message


def test_bad_data_dir_is_a_usage_error_naming_what_was_expected(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "half" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "half" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x02 truncated")
    (tmp_path / "tree" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "tree" / "test").mkdir()
    cases = {
        str(tmp_path / "missing"): r"--data-dir: .*missing is missing; expected the CIFAR-10 python version \(a "
                                   r"folder cifar-10-batches-py/ holding data_batch_1 \.\.\. data_batch_5 and "
                                   r"test_batch.*or an ImageFolder tree \(train/<class>/\*\.png",
        str(tmp_path / "empty"): r"empty holds none of the known layouts \(found: nothing\); expected the CIFAR-10",
        str(tmp_path / "half"): r"test_batch is missing; expected data_batch_1 \.\.\. data_batch_5 and test_batch",
        str(tmp_path / "tree"): r"train.cat holds no images; expected image files",
    }
    for folder, expected in cases.items():
        message = usage_error(["--data-dir", folder, "--output", str(tmp_path / "out")], capsys)
        assert re.search(expected, message), message
    assert "--data-dir is required with --data cifar" in usage_error([], capsys)
    assert "--data-dir is not read with --data synthetic" in usage_error(
        ["--data", "synthetic", "--data-dir", str(tmp_path)], capsys)
    assert "--amp (bf16 autocast for the inner steps) is for CUDA: add --use-gpu" in usage_error(
        ["--data", "synthetic", "--amp"], capsys)
    assert "val_fraction (--val-fraction) must be > 0 and < 1, got 1.5" in usage_error(
        ["--data", "synthetic", "--val-fraction", "1.5"], capsys)
    assert "batch_size=7 is not a multiple of workers=2" in usage_error(
        ["--data", "synthetic", "--synthetic-size", "40", "--workers", "2", "--batch-size", "7"], capsys)
    assert not (tmp_path / "out").exists()                                   # nothing written


# ---- augmentation and normalization -------------------------------------------------------------

def test_augmentation_draws_are_a_function_of_seed_epoch_and_index():
    index = torch.arange(5000)
    dy, dx, flip = augmentation_draws(index, epoch=3, seed=7)
    again = augmentation_draws(index.flip(0), epoch=3, seed=7)          # another order, another "worker"
    for a, b in zip((dy, dx, flip), again):
        assert torch.equal(a, b.flip(0))
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(9)) and 0.45 < flip.double().mean() < 0.55
    for other in (augmentation_draws(index, epoch=4, seed=7), augmentation_draws(index, epoch=3, seed=8)):
        assert (other[0] != dy).double().mean() > 0.8                    # a new epoch or seed: new crops
    # offsets are uncorrelated with each other and with the flip
    assert abs(torch.corrcoef(torch.stack([dy.double(), dx.double(), flip.double()]))[0, 1:]).max() < 0.05


def test_crop_flip_matches_pad_slice_and_mirror():
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    dy, dx, flip = augmentation_draws(torch.arange(40), epoch=0, seed=1)
    out = crop_flip(images, dy, dx, flip)
    for i in range(40):
        padded = F.pad(images[i], (4, 4, 4, 4))
        expected = padded[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], expected.flip(-1) if flip[i] else expected)


def test_channel_stats_and_normalize():
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = images.double() / 255
    assert torch.allclose(torch.tensor(mean), x.mean(dim=(0, 2, 3)), atol=1e-12)
    assert torch.allclose(torch.tensor(std), x.std(dim=(0, 2, 3), unbiased=False), atol=1e-12)
    z = normalize(images, mean, std, torch.float64)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-12)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-12)


def test_augmented_batches_do_not_depend_on_workers_or_restarts():
    data = synthetic_images(40, 0, seed=0).train
    dataset = TensorDataset(data.images, data.labels)
    transform = ImageTransform(*channel_stats(data.images), augment=True, seed=5)

    def loader(rank=0, world_size=1):
        return ShardedLoader(dataset, 8, rank=rank, world_size=world_size, seed=5, transform=transform)

    one, two = loader(), [loader(r, 2) for r in range(2)]
    batches = []
    for _ in range(12):                                              # 2.4 epochs: crops change with the epoch
        x, y = next(one)
        halves = [next(shard) for shard in two]
        assert torch.equal(x, torch.cat([h[0] for h in halves])) and torch.equal(y, torch.cat([h[1] for h in halves]))
        batches.append(x)
    resumed = loader()
    replay = loader()
    for _ in range(7):
        next(replay)
    resumed.load_state_dict(replay.state_dict())
    for k in range(7, 12):
        assert torch.equal(next(resumed)[0], batches[k])
    # the same image and epoch give the same crop in any batch; another epoch, another crop
    index = torch.arange(40)
    epoch0 = transform((data.images, data.labels), index, 0)[0]
    part = torch.tensor([31, 2, 17])
    assert torch.equal(transform((data.images[part], data.labels[part]), part, 0)[0], epoch0[part])
    epoch1 = transform((data.images, data.labels), index, 1)[0]
    assert (epoch0 != epoch1).flatten(1).any(dim=1).double().mean() > 0.8
    on_device = ImageTransform(transform.mean, transform.std, augment=True, seed=5, device="cpu")
    assert torch.equal(on_device((data.images, data.labels), index, 0)[0], epoch0)


# ---- the example: decay granularity, amp, resume, W=1 and W=2 ----------------------------------

TINY = ["--num-iters", "5", "--unroll-steps", "2", "--batch-size", "8", "--val-fraction", "0.25",
        "--approx", "nystrom", "--rank", "3", "--inner-lr", "0.05", "--init-decay", "0.01", "--seed", "3"]


def config_of(argv: list[str]) -> ExperimentConfig:
    return parse_config(cli.make_parser(EXAMPLE.__doc__, EXAMPLE.DEFAULTS, EXAMPLE.add_arguments), argv)


def synthetic_config(*extra: str, num_iters: int = 5) -> ExperimentConfig:
    argv = TINY + ["--data", "synthetic", "--synthetic-size", "48", "--model", "cnn", "--width", "2", *extra]
    return config_of(argv + ["--num-iters", str(num_iters)])


def test_per_tensor_hypergradient_is_the_sum_of_the_per_element_one():
    """With equal decays, φ_k (one per tensor) acts as every element's φ_k,e at once: its
    hypergradient is the sum of the per-element ones (same θ, same sampled Nyström columns)."""
    per_tensor, per_element = hypergradients("tensor"), hypergradients("element")
    assert len(per_tensor) == len(per_element) == 6                      # 2 convolutions, 1 linear: weight, bias
    for t, e in zip(per_tensor, per_element):
        assert t.shape == () and e.dim() >= 1
        assert torch.allclose(t, e.sum(), rtol=1e-9, atol=1e-14)
    assert any(abs(float(t)) > 1e-8 for t in per_tensor)


def hypergradients(granularity: str) -> list[torch.Tensor]:
    solver = EXAMPLE.build_solver(synthetic_config("--granularity", granularity))
    decays = list(solver.outer.parameters())
    assert [tuple(d.shape) for d in decays] == [() if granularity == "tensor" else tuple(p.shape)
                                                 for p in solver.inner_params]
    for _ in range(3):
        solver.inner_update()
        solver._after_inner_update()
    in_batch, out_batch = next(solver.inner_loader), next(solver.outer_loader)
    return list(solver.approx_ihvp(lambda i, o: solver.inner_forward(i, o, *in_batch),
                                   lambda i, o: solver.outer_forward(i, o, *out_batch),
                                   solver.inner_params, solver.outer_params()))


def test_amp_runs_inner_steps_in_bf16_and_the_hypergradient_in_float32():
    torch.set_default_dtype(torch.float32)                               # the fixture restores float64
    config = synthetic_config("--granularity", "tensor")
    config.extra["amp"] = True                                           # the CLI refuses it without a GPU
    solver = EXAMPLE.build_solver(config)
    seen = []
    solver.inner[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))   # the first conv
    solver.inner_update()
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    solver._after_inner_update()
    solver.outer_update()
    assert seen and set(seen) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in (*solver.inner_params, *solver.outer.parameters()))


def test_resume_reproduces_the_uninterrupted_run():
    config = synthetic_config(num_iters=9)
    full = EXAMPLE.build_solver(config)
    saved = {}
    full.callbacks = (*full.callbacks, lambda solver, metrics: saved.setdefault(solver.outer_step,
                                                                                 solver.state_dict()))
    full.run()
    assert full.inner_loader.source.epoch >= 2                          # the run crossed epochs
    resumed = EXAMPLE.build_solver(config)
    resumed.load_state_dict(saved[2])
    resumed.run()
    for a, b in zip((*full.inner_params, *full.outer_params()), (*resumed.inner_params, *resumed.outer_params())):
        assert torch.equal(a, b)


def test_example_main_writes_outputs_on_an_image_folder(folder_dir, tmp_path, capsys):
    root, _ = folder_dir
    metrics = EXAMPLE.main(TINY + ["--data-dir", str(root), "--model", "resnet18", "--width", "2",
                                   "--output", str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["metrics"] == metrics and result["config"]["extra"]["data_dir"] == str(root)
    assert metrics["outer_step"] == 2 and (metrics["n_train"], metrics["n_val"], metrics["n_test"]) == (18, 6, 5)
    assert 0 <= metrics["test_acc"] <= 1 and metrics["decay_weights"] > 0
    assert (tmp_path / "history.parquet").exists() and list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert json.loads(capsys.readouterr().out) == metrics


def test_two_ray_train_workers_equal_one_process_on_cifar_batches(cifar_dir, tmp_path, ray_session):
    import ray.cloudpickle

    from ray.train import ScalingConfig

    from hg_dist.distributed import fit, read_checkpoint

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])     # workers cannot import tests/
    folder, _ = cifar_dir
    argv = TINY + ["--data-dir", str(folder), "--model", "resnet18", "--width", "2", "--output", str(tmp_path / "w1")]
    single = EXAMPLE.build_solver(config_of(argv))
    single.run()
    assert single.outer_step == 2

    config = dataclasses.replace(config_of(argv + ["--workers", "2"]), output=str(tmp_path / "w2"))
    EXAMPLE.check(config)
    result = fit(build_float64, config, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}))
    assert result.error is None
    final = read_checkpoint(result.checkpoint)
    assert final["counters"]["outer_step"] == 2
    distributed = [*final["inner_params"], *final["outer"].values()]
    expected = [*single.inner_params, *single.outer_params()]
    assert len(distributed) == len(expected)
    for a, b in zip(distributed, expected):
        assert a.dtype == torch.float64 and torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    written = json.loads((tmp_path / "w2" / "result.json").read_text())
    assert written["workers"] == 2 and written["metrics"]["n_train"] == 45
