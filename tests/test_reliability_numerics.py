"""Silent wrong results (reliability matrix, second round): each case is a correct result or a clear refusal.

Numbers are checked against ground truth: dense float64 solves for Nyström,
parameter values before/after for frozen parameters, row counts for Parquet
shards, pixel values for 16-bit images. Warnings and errors are checked for the
setting they name and the fix they offer. No Ray.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from hg_dist import checkpoint, ihvp, make_approx
from hg_dist.data import ShardedLoader, full_batch
from hg_dist.optimizers import diff_adam, diff_sgd
from hg_dist.solver import BaseImplicitSolver, BaseUnrolledSolver
from hg_dist.hessian import HessianOperator
from hg_dist.ihvp.nystrom import NystromPrecisionWarning


# ---- Nyström in float32 with a small shift ----------------------------------------------------

def _least_squares_hessian(p: int = 30, n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A well-conditioned least-squares Hessian ``XᵀX/n`` (condition ≈ 4.5) and a right-hand side, float64."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=generator, dtype=torch.float64)
    return x.T @ x / n, torch.randn(p, generator=generator, dtype=torch.float64)


def _float32_operator(hessian: torch.Tensor) -> HessianOperator:
    h32 = hessian.to(torch.float32)
    return HessianOperator(matvec=lambda u: h32 @ u, matmat=lambda u: h32 @ u, size=h32.shape[0])


@pytest.mark.parametrize("relative_rho", [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6])
def test_nystrom_float32_full_rank_matches_float64_solve(relative_rho):
    """At rank = p Nyström is (H + ρI)⁻¹ exactly: float32 products must give float32 accuracy, not ε/ρ."""
    hessian, v = _least_squares_hessian()
    rho = relative_rho * float(torch.linalg.matrix_norm(hessian, ord=2))
    reference = torch.linalg.solve(hessian + rho * torch.eye(30, dtype=torch.float64), v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NystromPrecisionWarning)
        x = ihvp.nystrom(_float32_operator(hessian), v.float(), rank=30, rho=rho).solution
    assert x.dtype == torch.float32
    assert float((x.double() - reference).norm() / reference.norm()) <= 1e-5


def test_nystrom_float32_low_rank_matches_dense_nystrom_formula():
    """At rank < p, against ``(C W⁺ Cᵀ + ρI)⁻¹ v`` built densely in float64 from the same columns."""
    hessian, v = _least_squares_hessian()
    rank, rho = 10, 1e-4
    columns = torch.randperm(30, generator=torch.Generator().manual_seed(3))[:rank]
    x = ihvp.nystrom(_float32_operator(hessian), v.float(), rank=rank, rho=rho,
                     generator=torch.Generator().manual_seed(3)).solution
    c = hessian.float().double()[:, columns]
    approx = c @ torch.linalg.pinv(c[columns]) @ c.T
    reference = torch.linalg.solve(approx + rho * torch.eye(30, dtype=torch.float64), v.float().double())
    assert float((x.double() - reference).norm() / reference.norm()) <= 1e-3


@pytest.mark.parametrize("rho", [1e-12, 1e-30])
def test_nystrom_shift_below_the_float32_noise_floor_warns(rho):
    hessian, v = _least_squares_hessian()
    floor = torch.finfo(torch.float32).eps * float(torch.linalg.matrix_norm(hessian.float().double(), ord=2))
    with pytest.warns(NystromPrecisionWarning, match=r"rho=.*below the rounding noise.*float32.*raise rho") as record:
        ihvp.nystrom(_float32_operator(hessian), v.float(), rank=30, rho=rho)
    message = str(record[0].message)
    assert f"eps·‖C‖ ≈ {floor:.0e}" in message and f"raise rho above {floor:.0e}" in message


def test_nystrom_float64_small_shift_is_accurate_and_quiet():
    hessian, v = _least_squares_hessian()
    op = HessianOperator(matvec=lambda u: hessian @ u, matmat=lambda u: hessian @ u, size=30)
    rho = 1e-8
    reference = torch.linalg.solve(hessian + rho * torch.eye(30, dtype=torch.float64), v)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NystromPrecisionWarning)
        x = ihvp.nystrom(op, v, rank=30, rho=rho).solution
    assert float((x - reference).norm() / reference.norm()) <= 1e-6


# ---- frozen parameters (requires_grad=False) --------------------------------------------------

D = 4


class Decays(nn.Module):
    """Outer parameters: per-feature log-decays (trainable) and a decay scale (frozen by the tests)."""

    def __init__(self):
        super().__init__()
        self.log_decay = nn.Parameter(torch.full((D,), -1.0))
        self.log_scale = nn.Parameter(torch.zeros(1))


def _ridge_data():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, D, generator=gen), torch.randn(D, 1, generator=gen)
    y = x @ w + 0.5 + 0.1 * torch.randn(50, 1, generator=gen)
    return x[:30], y[:30], x[30:], y[30:]


def _ridge_inner(func, theta, phi, x, y):
    decay = (phi[0] + phi[1]).exp()
    return F.mse_loss(func(theta, x), y) / 2 + (decay * theta[0][0] ** 2).sum() / 2


def _ridge_outer(func, theta, x, y):
    return F.mse_loss(func(theta, x), y) / 2


class FrozenRidge(BaseImplicitSolver):
    def inner_forward(self, theta, phi, x, y):
        return _ridge_inner(self.inner_func, theta, phi, x, y)

    def outer_forward(self, theta, phi, x, y):
        return _ridge_outer(self.inner_func, theta, x, y)


class FrozenRidgeUnrolled(BaseUnrolledSolver):
    def inner_update(self):
        x, y = next(self.inner_loader)
        phi = tuple(self.outer.parameters())
        loss = _ridge_inner(self.inner_func, self.inner_params, phi, x, y)
        grads = torch.autograd.grad(loss, self.inner_params, create_graph=True)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)
        return loss

    def outer_update(self):
        x, y = next(self.outer_loader)
        loss = _ridge_outer(self.inner_func, self.inner_params, x, y)
        self.outer_grad = self.unrolled_hypergradient(loss)
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)
        return loss


def _frozen_ridge(solver_class=FrozenRidge, *, outer_optimizer=None, freeze_bias=True, freeze_scale=True,
                  approx=None, num_iters=20, **kwargs):
    x, y, xv, yv = _ridge_data()
    inner = nn.Linear(D, 1)
    with torch.no_grad():
        inner.weight.zero_()
        inner.bias.fill_(0.3)
    inner.bias.requires_grad_(not freeze_bias)
    outer = Decays()
    outer.log_scale.requires_grad_(not freeze_scale)
    optimizer = (outer_optimizer or (lambda params: torch.optim.SGD(params, lr=1.0)))(outer.parameters())
    extra = ({"functorch_requires_grad": True} if solver_class is FrozenRidgeUnrolled else
             {"approx_ihvp": approx or make_approx({"name": "exact"})})
    return solver_class(inner, outer, full_batch(TensorDataset(x, y)), full_batch(TensorDataset(xv, yv)),
                        num_iters=num_iters, unroll_steps=5, outer_optimizer=optimizer,
                        inner_optimizer=functools.partial(diff_sgd, lr=0.1, momentum=0.9, weight_decay=0.01),
                        **extra, **kwargs)


@pytest.mark.parametrize("solver_class", [FrozenRidge, FrozenRidgeUnrolled])
@pytest.mark.parametrize("outer_optimizer", [
    lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1),
    lambda params: torch.optim.Adam(params, lr=0.1, weight_decay=0.1)], ids=["sgd", "adam"])
def test_frozen_parameters_stay_frozen(solver_class, outer_optimizer):
    solver = _frozen_ridge(solver_class, outer_optimizer=outer_optimizer, num_iters=21)
    assert solver.frozen_inner == (False, True) and solver.frozen_outer == (False, True)
    decay_before = solver.outer.log_decay.detach().clone()
    solver.run()
    assert solver.inner_params[1].item() == 0.3 and solver.inner.bias.item() == 0.3   # frozen inner bias
    assert solver.outer.log_scale.item() == 0.0                                          # frozen outer scale
    assert float(solver.inner_params[0].detach().abs().max()) > 0.1                             # the rest trains
    assert float((solver.outer.log_decay.detach() - decay_before).abs().max()) > 1e-3
    assert solver.outer_step == 4


def test_frozen_parameters_stay_frozen_in_a_distributed_run():
    from hg_dist.distributed.collectives import run_threads

    def one_rank(collective):
        solver = _frozen_ridge(approx=make_approx({"name": "cg", "num_iters": D}), num_iters=11,
                               collective=collective)
        solver.run()
        return solver
    for solver in run_threads(2, one_rank):
        assert solver.inner_params[1].item() == 0.3 and solver.outer.log_scale.item() == 0.0
        assert solver.outer_step == 2 and float(solver.inner_params[0].abs().max()) > 0.1


def test_frozen_inner_parameters_are_constants_of_the_implicit_hypergradient():
    """θ*(φ) = argmin over the weights with the frozen bias fixed: compare with autograd through the dense solve."""
    x, y, xv, yv = _ridge_data()
    bias = 0.3
    log_decay = torch.full((D,), -1.0, requires_grad=True)

    def weights(phi):   # ∇_w f = Xᵀ(Xw + b − y)/n + e^φ w = 0
        return torch.linalg.solve(x.T @ x / 30 + torch.diag(phi.exp()), x.T @ (y - bias) / 30)

    w_star = weights(log_decay)
    truth, = torch.autograd.grad(F.mse_loss(xv @ w_star + bias, yv) / 2, log_decay)
    solver = _frozen_ridge(freeze_scale=False)
    solver.inner_params = (w_star.detach().T.clone(), torch.tensor([bias]))
    before = solver.outer.log_decay.detach().clone()
    solver.outer_update()                      # SGD, lr = 1: the step is minus the hypergradient
    assert torch.allclose(before - solver.outer.log_decay.detach(), truth, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("which", ["inner", "outer"])
def test_all_parameters_frozen_is_refused(which):
    x, y, xv, yv = _ridge_data()
    inner, outer = nn.Linear(D, 1), Decays()
    (inner if which == "inner" else outer).requires_grad_(False)
    with pytest.raises(ValueError, match=rf"every parameter of {which} has requires_grad=False.*requires_grad=True"):
        FrozenRidge(inner, outer, full_batch(TensorDataset(x, y)), full_batch(TensorDataset(xv, yv)),
                    make_approx({"name": "exact"}), num_iters=5, unroll_steps=2,
                    inner_optimizer=functools.partial(diff_sgd, lr=0.1, momentum=0, weight_decay=0),
                    outer_optimizer=torch.optim.SGD(outer.parameters(), lr=0.1))


# ---- checkpoints: integrity and structure -----------------------------------------------------

def _checkpoint_solver(*, inner_optimizer=None, outer_optimizer=None, batch_size=10, num_iters=12):
    x, y, xv, yv = _ridge_data()
    outer = Decays()
    return FrozenRidge(nn.Linear(D, 1), outer, ShardedLoader(TensorDataset(x, y), batch_size, seed=0),
                       full_batch(TensorDataset(xv, yv)), make_approx({"name": "exact"}), num_iters=num_iters,
                       unroll_steps=3,
                       inner_optimizer=inner_optimizer or functools.partial(diff_sgd, lr=0.1, momentum=0.9,
                                                                            weight_decay=0),
                       outer_optimizer=(outer_optimizer or functools.partial(torch.optim.SGD, lr=0.1,
                                                                             momentum=0.9))(outer.parameters()))


def _state_of(solver):
    return {"inner": [t.clone() for t in solver.inner_params],
            "outer": {k: v.clone() for k, v in solver.outer.state_dict().items()},
            "steps": (solver.global_step, solver.outer_step)}


def _unchanged(solver, before) -> bool:
    now = _state_of(solver)
    return (all(torch.equal(a, b) for a, b in zip(now["inner"], before["inner"]))
            and all(torch.equal(now["outer"][k], before["outer"][k]) for k in before["outer"])
            and now["steps"] == before["steps"])


def test_checkpoint_with_a_flipped_byte_in_a_tensor_record_is_refused(tmp_path):
    saved = _checkpoint_solver()
    saved.run()
    path = checkpoint.save(saved, tmp_path / "ckpt.pt")
    weights = saved.inner_params[0].detach().contiguous().numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(weights)
    assert at >= 0                                         # the tensor's bytes are stored as they are
    data[at + 3] ^= 0x01                                   # one bit of one weight
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["inner_params"][0].shape == (1, D)   # torch alone reads it
    solver = _checkpoint_solver()
    before = _state_of(solver)
    with pytest.raises(ValueError, match=r"ckpt\.pt.*do not match the checksum.*damaged.*earlier checkpoint"):
        checkpoint.load(solver, path)
    assert _unchanged(solver, before)
    checkpoint.save(saved, path)                           # the intact file loads
    checkpoint.load(solver, path)
    assert torch.equal(solver.inner_params[0], saved.inner_params[0]) and solver.global_step == 12


@pytest.mark.parametrize("saved_kwargs, pattern", [
    ({"outer_optimizer": functools.partial(torch.optim.Adam, lr=0.1)},
     r"outer_optimizer is 'torch\.optim\.adam\.Adam' in the saved run but 'torch\.optim\.sgd\.SGD' here"),
    ({"inner_optimizer": functools.partial(diff_adam, lr=0.1)},
     r"inner_optimizer is 'hg_dist\.optimizers\.diff_adam' in the saved run but 'hg_dist\.optimizers\.diff_sgd'"),
    ({"batch_size": 15},     # 2 batches an epoch instead of 3: the saved position fits, the batches do not
     r"batch_size is \{'inner': 15, 'outer': 20\} in the saved run but \{'inner': 10, 'outer': 20\} here "
     r"\(use the same batch_size \(--batch-size\)"),
], ids=["adam_into_sgd", "inner_adam_into_sgd", "another_batch_size"])
def test_checkpoint_of_a_differently_built_solver_is_refused(saved_kwargs, pattern, tmp_path):
    saved = _checkpoint_solver(num_iters=4, **saved_kwargs)
    saved.run()
    path = checkpoint.save(saved, tmp_path / "ckpt.pt")
    solver = _checkpoint_solver()
    solver.num_iters = 5
    solver.run()
    solver.num_iters = 12
    before = _state_of(solver)
    with pytest.raises(ValueError, match=r"ckpt\.pt: the state was written by a differently built solver: "
                                         + pattern):
        checkpoint.load(solver, path)
    assert _unchanged(solver, before)
    solver.run()                                          # and it runs on from where it was
    assert solver.global_step == 12


def test_checkpoint_checksum_covers_every_tensor_byte_and_value():
    solver = _checkpoint_solver()
    solver.run()
    state = solver.state_dict()
    assert state["checksum"] == checkpoint.payload_checksum(state)
    def next_float(s):      # the last bit of one weight
        w = s["inner_params"][0].view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(1.0))

    for edit in (next_float, lambda s: s["counters"].__setitem__("global_step", 11),
                 lambda s: s["recorder"].__setitem__("history", s["recorder"]["history"][:-1])):
        edited = solver.state_dict()
        assert checkpoint.payload_checksum(edited) == state["checksum"]
        edit(edited)
        assert checkpoint.payload_checksum(edited) != state["checksum"]


# ---- Parquet shards use every row ------------------------------------------------------------

def _parquet_files(tmp_path, sizes=(1000, 10), row_group_size=128):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    paths, start = [], 0
    for f, size in enumerate(sizes):
        ids = list(range(start, start + size))
        table = pa.table({"id": ids, "x": [float(i) / 7 for i in ids], "v": [[float(i), -float(i)] for i in ids]})
        pq.write_table(table, tmp_path / f"part{f}.parquet", row_group_size=row_group_size)
        paths.append(tmp_path / f"part{f}.parquet")
        start += size
    return paths


def test_parquet_shards_of_unequal_files_use_every_row(tmp_path):
    from hg_dist.distributed import read_parquet_shard
    paths = _parquet_files(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # 1010 rows split evenly: no warning
        shards = [read_parquet_shard(paths, ["id", "x", "v"], rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [505, 505]
    ids = torch.cat([s.tensors[0] for s in shards])
    assert ids.tolist() == list(range(1010))                # every row once, rank 0 first, in file order
    assert torch.equal(torch.cat([s.tensors[1] for s in shards]), ids.double() / 7)
    assert torch.equal(shards[1].tensors[2][-1], torch.tensor([1009.0, -1009.0]))


def test_parquet_rows_that_do_not_split_evenly_are_named(tmp_path):
    from hg_dist.distributed import read_parquet_shard
    paths = _parquet_files(tmp_path, sizes=(1000, 10), row_group_size=1000)
    with pytest.warns(RuntimeWarning, match=r"the 1010 rows of 2 Parquet file\(s\) do not split equally over "
                                            r"workers=3; the last 2 row\(s\) are left out.*every worker has 336"):
        shards = [read_parquet_shard(paths, ["id"], rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [336, 336, 336]
    assert torch.cat([s.tensors[0] for s in shards]).tolist() == list(range(1008))
    with pytest.raises(ValueError, match=r"workers=1011 is more than the 1010 Parquet rows"):
        read_parquet_shard(paths, ["id"], rank=0, world_size=1011)


# ---- ImageFolder: one class, 16-bit images ----------------------------------------------------

def _png_rgb16(path, pixels):
    """Write ``pixels`` (``uint16 (32, 32, 3)``) as a 16-bit-per-channel RGB PNG (Pillow cannot write these)."""
    import struct
    import zlib

    import numpy as np

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[r].astype(">u2").tobytes() for r in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    assert np.asarray(pixels).dtype == np.uint16


def _image_tree(root, classes=("cat", "dog"), write=None):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            (write or (lambda p: Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)))(
                root / split / name / "0.png")
    return root


def test_image_folder_with_one_class_is_refused(tmp_path):
    from hg_dist.vision.datasets import load_image_data
    root = _image_tree(tmp_path / "data", classes=("cat",))
    with pytest.raises(ValueError, match=r"train has one class folder \(cat/\); a classifier needs at least two "
                                         r"classes.*add a folder per class"):
        load_image_data(root)
    (root / "train" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"train/dog holds no images"):   # a second, empty class is no class
        load_image_data(root)


def test_image_folder_reads_16_bit_grayscale_scaled_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image

    from hg_dist.vision.datasets import load_image_data
    values = (np.arange(32 * 32, dtype=np.int64).reshape(32, 32) * 64).astype(np.uint16)   # 0 … 65472
    root = _image_tree(tmp_path / "data", write=lambda p: Image.fromarray(values).save(p))
    assert Image.open(root / "train" / "cat" / "0.png").mode == "I;16"
    data = load_image_data(root)
    expected = torch.from_numpy(np.floor((values.astype(np.int64) * 255 + 32767) / 65535).astype(np.uint8))
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape == (2, 3, 32, 32)
    assert torch.equal(data.train.images[0], expected.expand(3, 32, 32))
    assert int(data.train.images.max()) == 255 and float((data.train.images == 255).double().mean()) < 0.01
    assert int(data.train.images[0, 0, 16, 0]) == round(16 * 32 * 64 * 255 / 65535)   # mid-grey stays mid-grey


def test_image_folder_reads_16_bit_rgb_png(tmp_path):
    import numpy as np

    from hg_dist.vision.datasets import load_image_data
    rgb = np.random.default_rng(1).integers(0, 65536, (32, 32, 3)).astype(np.uint16)
    root = _image_tree(tmp_path / "data", write=lambda p: _png_rgb16(p, rgb))
    image = load_image_data(root).train.images[0].permute(1, 2, 0).to(torch.int64)
    assert (image - torch.from_numpy(rgb.astype(np.int64)) / 257).abs().max() <= 1    # the high byte, ±1


def test_image_folder_refuses_32_bit_pixels(tmp_path):
    import numpy as np
    from PIL import Image

    from hg_dist.vision.datasets import load_image_data
    root = _image_tree(tmp_path / "data")
    Image.fromarray(np.full((32, 32), 70000, dtype=np.int32)).save(root / "train" / "cat" / "1.tiff")
    with pytest.raises(ValueError, match=r"1\.tiff has 32-bit integer pixels.*expected 8- or 16-bit images"):
        load_image_data(root)


# ---- Neumann with a step far too small --------------------------------------------------------

@pytest.mark.parametrize("lr", [1e-300, 1e-9])
def test_neumann_step_far_too_small_is_refused_naming_lr_and_the_range(lr):
    hessian, v = _least_squares_hessian()
    lam_max = float(torch.linalg.eigvalsh(hessian)[-1])
    op = HessianOperator(matvec=lambda u: hessian @ u, matmat=lambda u: hessian @ u, size=30)
    with pytest.raises(ihvp.IHVPDivergenceError, match=rf"made no progress: with lr={lr:g} and 10 products.*"
                                                       r"converges for lr in \(0, 2/λ_max\(A\)\).*use lr in \(0, "
                                                       r"[0-9.]+\), e\.g\. lr=") as info:
        ihvp.neumann(op, v, num_iters=10, alpha=lr)
    assert "--" not in str(info.value)                                        # the setting, not a CLI flag
    assert info.value.lambda_max == pytest.approx(lam_max, rel=1e-6)          # Lanczos on 30 dims is exact
    suggested = float(str(info.value).rsplit("lr=", 1)[1])
    good = ihvp.neumann(op, v, num_iters=200, alpha=suggested).solution       # and the suggestion works
    assert float((good - torch.linalg.solve(hessian, v)).norm() / torch.linalg.solve(hessian, v).norm()) < 1e-6
    with pytest.warns(ihvp.IHVPDivergenceWarning, match="made no progress"):
        x = ihvp.neumann(op, v, num_iters=10, alpha=lr, on_divergence="warn").solution
    assert torch.allclose(x, lr * 11 * v, rtol=1e-6)                          # the plain sum, as the warning says


def test_neumann_small_but_useful_step_is_accepted():
    hessian, v = _least_squares_hessian()
    op = HessianOperator(matvec=lambda u: hessian @ u, matmat=lambda u: hessian @ u, size=30)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ihvp.neumann(op, v, num_iters=10, alpha=1e-4)       # covers 1e-3 of the way: a scaled identity, allowed


def test_solver_with_neumann_lr_1e_300_stops_before_the_outer_step():
    solver = _frozen_ridge(approx=make_approx({"name": "neumann", "num_iters": 10, "lr": 1e-300}),
                           freeze_bias=False, freeze_scale=False)
    before = solver.outer.log_decay.detach().clone()
    with pytest.raises(ihvp.IHVPDivergenceError, match=r"made no progress: with lr=1e-300.*use lr in \(0, "):
        solver.run()
    assert torch.equal(solver.outer.log_decay.detach(), before) and solver.outer_step == 0


# ---- resuming a search whose space was edited ------------------------------------------------

def _search_folder(tmp_path, space):
    import json

    from hg_dist.tune.space_record import describe_space
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "search.json").write_text(json.dumps({"format": 1, "metric": "outer_loss", "mode": "min",
                                                    "search": "random", "num_samples": 1,
                                                    "space": describe_space(space)}))
    return folder


def test_resume_after_the_space_was_edited_is_refused_naming_the_change(tmp_path):
    pytest.importorskip("ray")
    from ray import tune

    from hg_dist.tune import SearchExistsError, run_search
    from hg_dist.tune.search import _check_resumable
    from hg_dist.tune.storage import SearchStorage

    def space(rho_low=1e-2, ranks=(5, 10), iters=20):
        return {"approximator": tune.choice([{"name": "nystrom", "rank": tune.choice(list(ranks)),
                                               "rho": tune.loguniform(rho_low, 1.0)},
                                              {"name": "cg", "num_iters": 3}]),
                "outer_optimizer": {"name": "adam", "lr": tune.quniform(0.01, 0.1, 0.01)}, "num_iters": iters}

    folder = _search_folder(tmp_path, space())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    storage = SearchStorage.parse(folder)
    assert _check_resumable(storage, True, space=space(), metric="outer_loss")["num_samples"] == 1   # unchanged
    cases = [(space(rho_low=1e-3), r"space\['approximator'\]\['tune.choice'\]\[0\]\['rho'\]\['tune.float'\]\[0\] "
                                   r"was 0.01, now 0.001"),
             (space(ranks=(5, 20)), r"space\['approximator'\]\['tune.choice'\]\[0\]\['rank'\]\['tune.choice'\]\[1\] "
                                    r"was 10, now 20"),
             (space(iters=40), r"space\['num_iters'\] was 20, now 40"),
             ({**space(), "unroll_steps": 5}, r"space\['unroll_steps'\] is new: 5")]
    for edited, change in cases:
        with pytest.raises(SearchExistsError, match=r"the search space was changed since the search in .* was "
                                                    r"started: " + change + r".*runs the space it was started "
                                                    r"with.*another folder \(--output\)"):
            run_search(lambda config, rank=0, world_size=1: None, edited, resume=True,
                       run_config=tune.RunConfig(storage_path=str(folder.parent), name=folder.name))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_space_record_tells_every_domain_apart():
    pytest.importorskip("ray")
    from ray import tune

    from hg_dist.tune.space_record import describe_space, space_changes
    domains = [tune.uniform(0, 1), tune.loguniform(0.001, 1), tune.quniform(0, 1, 0.1), tune.quniform(0, 1, 0.2),
               tune.randint(0, 5), tune.choice([1, 2]), tune.grid_search([1, 2]), tune.randn(0, 1), 0.5, "a"]
    records = [describe_space({"x": d}) for d in domains]
    for i, a in enumerate(records):
        for j, b in enumerate(records):
            assert (space_changes(a, b) == []) == (i == j), (domains[i], domains[j])
