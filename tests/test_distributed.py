"""hg_dist.distributed: data-parallel inner steps and hypergradients, sharding, Ray Train runs.

Most equivalence tests run W replicas as threads of this process (ThreadGroup), which
exercises exactly the reductions a Ray Train worker makes, for a fraction of the cost.
One TorchTrainer run (2 workers, an injected failure and a restart) covers the real
Ray path; it is compared with the single-process run on the union of the shards.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import struct
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, grad_and_value
from torch.utils.data import TensorDataset

from hg_dist import approx_hypergrad, make_approx
from hg_dist.callbacks import Callback
from hg_dist.collective import SingleProcess, use
from hg_dist.distributed import (CountingAllreduce, Every, FitOptions, ShardedLoader, check_scaling,
                                 distributed_approx, fit, full_batch, read_checkpoint,
                                 read_parquet_shard, run_experiment, run_threads, shard_indices)
from hg_dist.distributed.checkpointing import checkpoint_run_id, fingerprint
from hg_dist.distributed.hypergrad import AllreduceGrads
from hg_dist.distributed.train_loop import Reporter
from hg_dist.loaders import InfiniteLoader
from hg_dist.experiment import ExperimentConfig
from hg_dist.outer_optimizers import make_outer_optimizer
from hg_dist.optimizers import diff_sgd
from hg_dist.solver import BaseImplicitSolver

N, D = 64, 8            # examples per split, features (p = D + 1 inner parameters)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------
# A small problem: logistic regression with one learned weight decay per feature
# ---------------------------------------------------------------------------------------

def make_data(seed: int = 0, n: int = N, d: int = D) -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    splits = []
    for _ in range(2):
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = ((x @ w + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)) > 0).double()
        splits.append(TensorDataset(x, y))
    return splits[0], splits[1]


class WeightDecay(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.log_decay = nn.Parameter(torch.full((d,), -2.0, dtype=torch.float64))


class LogRegSolver(BaseImplicitSolver):
    """The seed's example solver: inner = logistic regression, outer = per-feature weight decay.

    Its own ``inner_update``/``outer_update`` (as seed code writes them): the inner step averages its
    gradients and loss over the replicas with ``self.mean_gradients``; the hypergradient comes from
    ``self.approx_ihvp``, which a solver built on several replicas averages; the loop averages the
    returned outer loss.
    """

    def inner_forward(self, in_params, out_params, x, y):
        loss = F.binary_cross_entropy_with_logits(self.inner_func(in_params, x).squeeze(-1), y)
        return loss + (in_params[0].squeeze(0) ** 2 * out_params[0].exp()).sum() / 2

    def outer_forward(self, in_params, out_params, x, y):
        return F.binary_cross_entropy_with_logits(self.inner_func(in_params, x).squeeze(-1), y)

    def inner_update(self):
        x, y = next(self.inner_loader)
        grads, loss = grad_and_value(self.inner_forward)(self.inner_params, self.outer_params(), x, y)
        grads, loss = self.mean_gradients(grads, loss)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)
        return loss

    def outer_update(self):
        in_x, in_y = next(self.inner_loader)
        out_x, out_y = next(self.outer_loader)
        hypergrad = self.approx_ihvp(lambda i, o: self.inner_forward(i, o, in_x, in_y),
                                     lambda i, o: self.outer_forward(i, o, out_x, out_y),
                                     self.inner_params, self.outer_params())
        self.outer_grad = hypergrad
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)
        return self.outer_forward(self.inner_params, self.outer_params(), out_x, out_y)


class LoopAveragedLoss(LogRegSolver):
    """Overrides that average only what they must: the gradients (``mean_gradients`` without the loss) and,
    through ``self.approx_ihvp``, the hypergradient. The loop averages every metric they return (the loss,
    a batch statistic, a validation accuracy) in one round per update."""

    def inner_update(self):
        x, y = next(self.inner_loader)
        grads, loss = grad_and_value(self.inner_forward)(self.inner_params, self.outer_params(), x, y)
        grads, _ = self.mean_gradients(grads)
        self.inner_params, self.inner_optim_state = self.inner_optimizer(self.inner_params, grads,
                                                                         self.inner_optim_state)
        return {"inner_loss": loss, "positive_fraction": y.mean()}

    def outer_update(self):
        loss = super().outer_update()
        out_x, out_y = next(self.outer_loader)
        logits = self.inner_func(self.inner_params, out_x).squeeze(-1)
        return {"outer_loss": loss, "val_acc": ((logits > 0).double() == out_y).double().mean()}


def build_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> LogRegSolver:
    """Module-level, as examples define it: this rank's shard of the data, per-worker batch = B / W."""
    return build(LogRegSolver, config, rank, world_size)


def build(solver_class: type, config: ExperimentConfig, rank: int = 0, world_size: int = 1,
          **kwargs) -> LogRegSolver:
    train, val = make_data(config.extra.get("data_seed", 0), n=config.extra.get("n", N))
    batch = config.extra.get("batch_size", 16)
    inner = nn.Linear(D, 1).double()
    nn.init.zeros_(inner.weight)
    nn.init.zeros_(inner.bias)
    outer = WeightDecay(D)
    return solver_class(inner, outer,
                        ShardedLoader(train, batch, rank=rank, world_size=world_size, seed=config.seed),
                        full_batch(val, rank, world_size),
                        make_approx(config.approximator, seed=config.seed), config.num_iters, config.unroll_steps,
                        functools.partial(diff_sgd, lr=config.extra.get("lr", 0.5), momentum=0.9, weight_decay=0),
                        make_outer_optimizer(config.outer_optimizer, outer.parameters()),
                        log_freq=4, progress=False, **kwargs)


def config_for(tmp_path: Path, **overrides) -> ExperimentConfig:
    settings = dict(approximator={"name": "nystrom", "rank": 4, "rho": 0.1}, num_iters=16, unroll_steps=2,
                    outer_optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.9}, output=str(tmp_path / "out"),
                    extra={"batch_size": 16})
    settings.update(overrides)
    return ExperimentConfig(**settings)


def run_in_threads(config: ExperimentConfig, world_size: int) -> list[LogRegSolver]:
    """The distributed run with W threads instead of Ray workers (one uninterrupted run)."""
    def one_rank(collective):
        with use(collective):
            solver = build_solver(config, rank=collective.rank, world_size=world_size)
        solver.run()
        return solver
    return run_threads(world_size, one_rank)


# ---------------------------------------------------------------------------------------
# Inner steps and hypergradients: W = 2 equals W = 1 on the union of the shards
# ---------------------------------------------------------------------------------------

METHODS = {"nystrom": dict(rank=5, rho=0.1), "cg": dict(num_iters=8), "neumann": dict(num_iters=8, lr=0.5),
           "nystrom_pcg": dict(rank=4, num_iters=4)}


def _objectives(x, y, xv, yv):
    def inner(theta, phi):
        return F.binary_cross_entropy_with_logits(x @ theta[0], y) + (theta[0] ** 2 * phi[0].exp()).sum() / 2

    def outer(theta, phi):
        return F.binary_cross_entropy_with_logits(xv @ theta[0], yv)
    return inner, outer


def _shard_run(collective, method: str, steps: int = 5, global_batch: int = 16):
    """k inner steps with allreduced gradients, then one hypergradient, on this rank's shard."""
    rank, world = collective.rank, collective.world_size
    train, val = make_data()
    inner_reduce, hyper_reduce = CountingAllreduce(collective), CountingAllreduce(collective)
    loader = ShardedLoader(train, global_batch, rank=rank, world_size=world, seed=3)
    optimizer = AllreduceGrads(functools.partial(diff_sgd, lr=0.5, momentum=0.9, weight_decay=0), inner_reduce)
    theta, state, phi = (torch.zeros(D),), None, (torch.full((D,), -2.0),)
    for _ in range(steps):
        x, y = next(loader)
        theta, state = optimizer(theta, grad(_objectives(x, y, x, y)[0])(theta, phi), state)
    (x, y), (xv, yv) = next(full_batch(train, rank, world)), next(full_batch(val, rank, world))
    approx = distributed_approx(make_approx({"name": method, **METHODS[method]}, seed=11), hyper_reduce, seed=0)
    hypergrad = approx(*_objectives(x, y, xv, yv), theta, phi)
    return theta[0], hypergrad[0], hyper_reduce.total, inner_reduce.total


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_shards_equal_union(method):
    (theta1, hg1, comm1, _), = run_threads(1, lambda c: _shard_run(c, method))
    (theta_a, hg_a, comm, inner_comm), (theta_b, hg_b, _, _) = run_threads(2, lambda c: _shard_run(c, method))
    assert rel_err(theta_a, theta1) <= 1e-6 and rel_err(hg_a, hg1) <= 1e-6
    assert torch.equal(theta_a, theta_b) and torch.equal(hg_a, hg_b)       # replicas identical
    assert comm1.rounds == 0                                              # W = 1: nothing sent
    assert inner_comm.rounds == 5                                         # one round per inner step
    iterations = METHODS[method].get("num_iters", 0)
    calls = {"nystrom": 1, "cg": iterations, "neumann": iterations, "nystrom_pcg": 1 + iterations}[method]
    assert comm.rounds == calls + 2


def test_nystrom_rounds_do_not_grow_with_rank():
    train, val = make_data(n=N, d=60)
    stats = {}
    for rank in (5, 50):
        def shard(collective, rank=rank):
            x, y = next(full_batch(train, collective.rank, 2))
            xv, yv = next(full_batch(val, collective.rank, 2))
            reduce = CountingAllreduce(collective)
            approx = distributed_approx(functools.partial(approx_hypergrad.nystrom, rank=rank, rho=0.1), reduce,
                                        seed=0)
            approx(*_objectives(x, y, xv, yv), (torch.zeros(60),), (torch.zeros(60),))
            return reduce.total
        stats[rank] = run_threads(2, shard)[0]
    assert stats[5].rounds == stats[50].rounds == 3
    p, itemsize = 60, 8
    assert stats[50].bytes == (p + p * 50 + p) * itemsize            # v, the p×k block, the hypergradient


def test_solver_two_workers_equal_one(tmp_path):
    """A whole solve (inner steps, outer steps, Nyström with the config's seed): W = 2 threads vs W = 1."""
    config = config_for(tmp_path)
    single = build_solver(config)
    single.run()
    replicas = run_in_threads(config, 2)
    for a, b in zip(replicas[0].outer_params(), single.outer_params()):
        assert rel_err(a, b) <= 1e-6
    assert all(torch.equal(a, b) for a, b in zip(replicas[0].inner_params, replicas[1].inner_params))
    assert replicas[0].recorder.latest()["comm_rounds"] == 3


TIMES = ("step_time", "outer_step_time")


def recorded(solver) -> dict[str, list[float]]:
    """Every recorded metric but the timings and the communication counts (which one process has not)."""
    return {name: values for name, values in solver.recorder.archive.items()
            if name not in TIMES and not name.startswith("comm_")}


@pytest.mark.parametrize("solver_class", [LogRegSolver, LoopAveragedLoss])
@pytest.mark.parametrize("method", ["nystrom", "cg"])
def test_overriding_solver_two_workers_equal_one(tmp_path, solver_class, method):
    """A solver with its own inner_update and outer_update, built with collective= a 2-thread group: its
    parameters and every recorded metric (inner_loss, batch statistics, accuracies) equal one process's."""
    config = config_for(tmp_path, approximator={"name": method, **METHODS[method]})
    single = build(solver_class, config)
    single.run()
    assert single.collective.world_size == 1 and single.reductions.inner.total.rounds == 0

    def one_rank(collective):
        solver = build(solver_class, config, collective.rank, 2, collective=collective)
        solver.run()
        return solver
    first, second = run_threads(2, one_rank)
    for a, b in zip(first.outer_params() + first.inner_params, single.outer_params() + single.inner_params):
        assert rel_err(a, b) <= 1e-9
    expected = recorded(single)
    assert set(recorded(first)) == set(expected) and "inner_loss" in expected
    for name, values in expected.items():
        assert recorded(first)[name] == pytest.approx(values, rel=1e-9, abs=1e-12), name
    assert recorded(first) == recorded(second)                            # replicas agree bit for bit
    assert all(torch.equal(a, b) for a, b in zip(first.inner_params, second.inner_params))
    # One round per inner step when the loss rides with the gradients, two when the loop averages it.
    rounds_per_step = 1 if solver_class is LogRegSolver else 2
    assert first.reductions.inner.total.rounds == config.num_iters      # gradients (and loss): one round
    assert first.reductions.metrics_reduce.total.rounds == (
        (rounds_per_step - 1) * config.num_iters + first.outer_step)      # + the metrics of each update


def test_solver_refuses_what_is_not_a_collective(tmp_path):
    config = config_for(tmp_path)
    with pytest.raises(TypeError, match="collective must have rank, world_size, allreduce_sum"):
        build(LogRegSolver, config, collective="gloo")

    class NoGradientMean:                     # the three members but not the Collective subclass
        rank, world_size = 0, 1

        def allreduce_sum(self, tensor):
            return tensor
    with pytest.raises(TypeError, match="subclass hg_dist.collective.Collective"):
        build(LogRegSolver, config, collective=NoGradientMean())
    assert build(LogRegSolver, config, collective=SingleProcess()).collective.world_size == 1


def test_worker_loop_refuses_a_solver_built_for_another_group(tmp_path):
    from hg_dist.distributed.train_loop import check_solver

    with pytest.raises(TypeError, match="world_size=1, but the run has 2 workers"):
        check_solver(build_solver(config_for(tmp_path)), 2)


# ---------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------

def test_sharded_loader_batches_union_to_single_process_batches():
    train, _ = make_data(n=24)
    single = ShardedLoader(train, 6, seed=5)
    shards = [ShardedLoader(train, 6, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(9):                                     # crosses epoch boundaries (4 batches/epoch)
        x1, _ = next(single)
        xs = [next(s)[0] for s in shards]
        assert sorted(map(tuple, torch.cat(xs).tolist())) == sorted(map(tuple, x1.tolist()))
    resumed = ShardedLoader(train, 6, rank=1, world_size=2, seed=5)
    resumed.load_state_dict(shards[1].state_dict())
    assert torch.equal(next(resumed)[0], next(shards[1])[0])


def test_shard_indices_equal_and_disjoint():
    shards = [shard_indices(11, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert len(set(torch.cat(shards).tolist())) == 9


def test_parquet_shards(tmp_path):
    paths = []
    for f in range(2):
        table = pa.table({"a": [float(10 * f + i) for i in range(6)], "b": [float(i) for i in range(6)],
                          "y": list(range(6))})
        pq.write_table(table, tmp_path / f"part{f}.parquet", row_group_size=3)
        paths.append(tmp_path / f"part{f}.parquet")
    shards = [read_parquet_shard(paths, [["a", "b"], "y"], rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [6, 6]
    features = torch.cat([s.tensors[0] for s in shards])
    assert features.shape == (12, 2) and features.dtype == torch.float64
    assert sorted(features[:, 0].tolist()) == sorted([float(10 * f + i) for f in range(2) for i in range(6)])
    assert shards[0].tensors[1].dtype == torch.int64
    with pytest.raises(ValueError, match="workers=13 is more than the 12 Parquet rows"):
        read_parquet_shard(paths, ["a"], rank=0, world_size=13)


# ---------------------------------------------------------------------------------------
# Bad settings: clear errors before any worker starts
# ---------------------------------------------------------------------------------------

def test_bad_worker_counts():
    with pytest.raises(ValueError, match="workers must be >= 1.*--workers 1"):
        check_scaling(0, False)
    with pytest.raises(ValueError, match="workers"):
        ExperimentConfig(workers=0)
    with pytest.raises(TypeError, match="use_gpu must be a bool"):
        check_scaling(2, "yes")
    assert check_scaling(2, True) == 2      # GPUs are the cluster's business (tests/test_reliability_cluster.py)
    with pytest.raises(ValueError, match=r"workers=80 is more than the 64 examples.*--workers 64 or fewer"):
        ShardedLoader(make_data()[0], 1, rank=0, world_size=80)


def test_run_experiment_rejects_bad_settings_before_starting_workers(tmp_path, ray_session):
    too_many = config_for(tmp_path, workers=80, extra={"batch_size": 80})  # 80 > the 64 examples
    with pytest.raises(ValueError, match="workers=80 is more than the 64 examples"):
        run_experiment(build_solver, too_many)
    # The session's local Ray instance (4 CPUs, no GPU, no autoscaler) can never hold 2 GPU workers.
    with pytest.raises(ValueError, match=r"workers=2 × \{CPU 1, GPU 1\} asks for CPU 2, GPU 2, but this Ray "
                                         r"cluster has CPU 4, GPU 0 in all \(1 node\) and cannot grow.*drop --use-gpu"):
        run_experiment(build_solver, config_for(tmp_path, workers=2, use_gpu=True))
    assert not (tmp_path / "out").exists()                               # nothing written, no Train run started


# ---------------------------------------------------------------------------------------
# Reports and checkpoints: rare, decided on rank 0, agreed by all ranks
# ---------------------------------------------------------------------------------------

def test_every_parses_steps_and_durations():
    assert Every.parse("10") == Every(steps=10) and Every.parse(7) == Every(steps=7)
    assert Every.parse("30s") == Every(seconds=30.0) and Every.parse("2.5m") == Every(seconds=150.0)
    assert Every.parse("1h") == Every(seconds=3600.0) and str(Every(seconds=60)) == "60s"
    for bad, match in (("0", "int >= 1"), ("1.5", "int >= 1"), ("soon", "e.g. 30s"), ("-3s", "e.g. 30s")):
        with pytest.raises(ValueError, match=match):
            Every.parse(bad, "report_every")
    options = FitOptions(report_every="45s", checkpoint_every=4)
    assert options.report_every == Every(seconds=45.0) and options.checkpoint_every == Every(steps=4)
    with pytest.raises(TypeError, match="checkpoint_every must be"):
        FitOptions(checkpoint_every=2.5)
    with pytest.raises(TypeError, match="precheck must be a bool"):
        FitOptions(precheck="no")


class RecordingReporter(Reporter):
    """The worker's reporter with ``ray.train.report`` replaced by a list of (outer step, checkpoint?)."""

    def report(self, solver, *, checkpoint, metrics=None):
        self.made.append((solver.outer_step, checkpoint, dict(self.metrics(solver))))
        if checkpoint:
            self.checkpoints.done()
        self.reports.done()


def test_ranks_agree_on_rank_zeros_time_based_decisions(tmp_path):
    """Each rank has its own (here: wildly different) clock; all report exactly when rank 0's clock says so,
    and the recorded metrics are the means over the ranks."""
    config = config_for(tmp_path, num_iters=30, unroll_steps=2)            # 14 outer steps
    ticks = {0: 0.4, 1: 100.0}                                            # seconds per clock reading
    options = FitOptions(report_every="1s", checkpoint_every=5)

    def one_rank(collective):
        with use(collective):
            solver = build_solver(config, rank=collective.rank, world_size=2)
        readings = iter(range(10 ** 6))
        reporter = RecordingReporter(collective.rank, options,
                                     clock=lambda: ticks[collective.rank] * next(readings))
        reporter.made = []
        solver.callbacks = (*solver.callbacks, reporter)
        solver.run()
        return solver, reporter.made
    (solver0, made0), (solver1, made1) = run_threads(2, one_rank)
    assert [m[:2] for m in made0] == [m[:2] for m in made1]               # same reports, same checkpoints
    steps = [(step, ckpt) for step, ckpt, _ in made0]
    assert (5, True) in steps and (10, True) in steps                     # checkpoints at fixed step numbers
    assert 3 <= len(steps) < 14                                           # rank 1 alone would report every step
    assert made0[-1][2]["outer_loss"] == made1[-1][2]["outer_loss"]        # metrics are the ranks' mean ...
    single = build_solver(config)
    single.run()
    assert solver0.recorder.latest()["outer_loss"] == pytest.approx(single.recorder.latest()["outer_loss"],
                                                                     rel=1e-10)   # ... = one process's


def test_each_rank_resumes_with_its_own_loader_and_rng_state(tmp_path):
    """Ranks whose loaders and global RNG differ (a per-rank shuffled DataLoader): the merged checkpoint
    gives each rank its own positions and random state, and rank 0's parameters."""
    from ray.train import Checkpoint

    from hg_dist.distributed.checkpointing import checkpoint_of

    config = config_for(tmp_path)
    merged = tmp_path / "merged"
    merged.mkdir()
    solvers, expected = [], []
    for rank in range(2):
        solver = build_solver(config, rank=rank, world_size=2)
        solver.inner_loader = InfiniteLoader(torch.utils.data.DataLoader(
            make_data()[0], batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(100 + rank)))
        torch.manual_seed(7 + rank)
        for _ in range(3 + rank):                                         # different positions
            next(solver.inner_loader)
        with checkpoint_of(solver, rank=rank, run_id="abc") as ckpt:     # what Train merges into one folder
            for path in Path(ckpt.path).iterdir():
                shutil.copy(path, merged / path.name)
        solvers.append(solver)
        expected.append([next(solver.inner_loader)[0] for _ in range(2)] + [torch.rand(3)])   # what follows
    checkpoint = Checkpoint.from_directory(str(merged))
    assert checkpoint_run_id(checkpoint) == "abc"
    assert not torch.equal(expected[0][0], expected[1][0])
    for rank in range(2):
        fresh = build_solver(config, rank=rank, world_size=2)
        fresh.inner_loader = InfiniteLoader(torch.utils.data.DataLoader(
            make_data()[0], batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(999)))
        fresh.load_state_dict(read_checkpoint(checkpoint, rank=rank))
        got = [next(fresh.inner_loader)[0] for _ in range(2)] + [torch.rand(3)]
        assert all(torch.equal(a, b) for a, b in zip(got, expected[rank])), rank
        assert torch.equal(fresh.inner_params[0], solvers[0].inner_params[0])


def test_run_fingerprint_ignores_only_the_output_folder(tmp_path):
    config = config_for(tmp_path)
    same = dataclasses.replace(config, output=str(tmp_path / "elsewhere"))
    assert fingerprint(build_solver, config) == fingerprint(build_solver, same)
    assert fingerprint(build_solver, config) != fingerprint(build_solver, dataclasses.replace(config, seed=1))
    assert fingerprint(build_solver, config) != fingerprint(run_in_threads, config)


def _raise_after_sigint(self):
    """What a Ctrl-C during TorchTrainer.fit looks like to its caller: Ray's own SIGINT handler aborts the
    run, and fit ends in whatever the abort raised (here SystemExit: 1)."""
    def ray_handler(signum, frame):
        raise SystemExit(1)
    signal.signal(signal.SIGINT, ray_handler)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)                                                         # interrupted before this ends


def _raise(error):
    def fit(self):
        raise error
    return fit


@pytest.mark.parametrize("trainer_fit, status, error", [
    (_raise(RuntimeError("worker group lost")), "failed", "RuntimeError: worker group lost"),
    (_raise(KeyboardInterrupt()), "interrupted", "KeyboardInterrupt: "),
    (_raise_after_sigint, "interrupted", "KeyboardInterrupt: ")])
def test_a_run_that_does_not_complete_says_so_in_result_json(tmp_path, monkeypatch, trainer_fit, status, error):
    """The driver writes status, error, and the metrics of the checkpoint a rerun resumes from (the one Ray
    Train registered, if this run wrote it). Ctrl-C is "interrupted" whatever Ray's abort raised."""
    from ray.train import Checkpoint
    from ray.train.torch import TorchTrainer

    from hg_dist.distributed import runner
    from hg_dist.distributed.checkpointing import checkpoint_of

    config = config_for(tmp_path, workers=2)
    solver = build_solver(config)
    solver.num_iters = 9
    solver.run()
    for name, run_id in (("ours", fingerprint(build_solver, config)), ("theirs", "another run")):
        with checkpoint_of(solver, rank=0, run_id=run_id) as ckpt:
            shutil.copytree(ckpt.path, tmp_path / name)
    registered = {}
    monkeypatch.setattr(runner, "registered_checkpoint",
                        lambda run_config: Checkpoint.from_directory(str(tmp_path / registered["name"])))
    monkeypatch.setattr(runner, "prepare_workers", lambda *args, **kwargs: None)
    monkeypatch.setattr(runner, "check_loadable_on_workers", lambda build_solver: None)   # no Ray in this test
    monkeypatch.setattr(runner, "default_max_failures", lambda cluster: 0)
    monkeypatch.setattr(TorchTrainer, "fit", trainer_fit)
    previous = signal.getsignal(signal.SIGINT)
    for registered["name"], steps in (("ours", 9), ("theirs", None)):
        with pytest.raises(RuntimeError if status == "failed" else KeyboardInterrupt):
            fit(build_solver, config, options=FitOptions(precheck=False))
        assert signal.getsignal(signal.SIGINT) is previous                # Ctrl-C works as before afterwards
        written = json.loads((Path(config.output) / "result.json").read_text())
        assert written["status"] == status and written["error"] == error
        assert written["global_step"] == steps
        if steps is None:                                                 # another run's checkpoint: not ours
            assert written["last_checkpoint"] is None and written["metrics"] == {}
        else:
            assert written["last_checkpoint"] == str(tmp_path / "ours") and written["outer_steps"] == 4
            assert written["metrics"]["outer_loss"] > 0 and written["metrics"]["inner_step"] == 9


def test_checkpoint_folders_of_dead_processes_are_removed(tmp_path):
    """A worker killed inside ``checkpoint_of`` leaves its temporary folder; the next checkpoint (or the driver
    after the run) removes it, and leaves those of live processes alone."""
    import subprocess

    from hg_dist.distributed.checkpointing import TEMP_PREFIX, remove_orphaned_folders

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    orphan = tmp_path / f"{TEMP_PREFIX}{int(dead.stdout)}-abc"
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{TEMP_PREFIX}notapid"
    for folder in (orphan, live, other):
        folder.mkdir()
        (folder / "solver.pt").write_bytes(b"x")
    assert remove_orphaned_folders(tmp_path) == [orphan]
    assert not orphan.exists() and live.exists() and other.exists()


def test_resumed_local_run_rewrites_history_and_purges_tensorboard(tmp_path):
    """The same mechanism in one process: a run crashes after logging past its last checkpoint; the
    resumed run's Parquet history and (as TensorBoard reads it) its event files have each step once."""
    config = config_for(tmp_path)
    saved = {}

    class SaveThenCrash(Callback):
        def on_step_end(self, solver):
            if solver.global_step == 7:
                saved["state"] = solver.state_dict()
            if solver.global_step == 10:
                raise RuntimeError("crash")

    first = build_solver(config)
    first.log_dir, first.callbacks = str(tmp_path / "log"), (SaveThenCrash(),)
    with pytest.raises(RuntimeError, match="crash"):
        first.run()
    assert pq.read_table(tmp_path / "log" / "history.parquet").to_pydict()["step"] == [4, 8]
    resumed = build_solver(config)
    resumed.log_dir = str(tmp_path / "log")
    time.sleep(1.1)                                                       # event files are named by the second
    resumed.load_state_dict(saved["state"])
    resumed.run()
    assert pq.read_table(tmp_path / "log" / "history.parquet").to_pydict()["step"] == [4, 8, 12, 16]
    files = read_tensorboard(tmp_path / "log" / "tb")
    assert len(files) == 2 and 8 in {event.step for event in files[0] if event.summary.value}
    assert [step for step, _ in visible_scalars(files)["inner_loss"]] == [4, 8, 12, 16]


# ---------------------------------------------------------------------------------------
# The real Ray Train path: 2 workers, a worker process is killed mid-run, restart from the checkpoint
# ---------------------------------------------------------------------------------------

def read_tensorboard(folder: Path) -> list[list]:
    """Every event file of ``folder`` (oldest first) as a list of events (``tensorboardX`` protos)."""
    from tensorboardX.proto import event_pb2

    files = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, events, at = path.read_bytes(), [], 0
        while at + 12 <= len(data):                 # TFRecord: length, crc, payload, crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12:at + 12 + length])
            events.append(event)
            at += 12 + length + 4
        files.append(events)
    return files


def visible_scalars(files: list[list]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: a ``SessionLog.START`` at step ``s`` hides earlier events at steps ``>= s``."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in files:
        for event in events:
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                scalars = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in scalars.items()}
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


class FailOnce(Callback):
    """Test hook: make ``rank`` fail once, after outer step ``outer_step``.

    ``mode="raise"`` raises an exception; ``mode="kill"`` kills the worker process itself
    (``SIGKILL``: no exception, no clean-up, as when a machine is lost). ``marker`` is a
    file every worker sees, written (with the process id) just before the failure, so
    the restarted worker group does not fail again.
    """

    def __init__(self, rank: int, outer_step: int, marker: str, mode: str = "raise") -> None:
        self.rank, self.outer_step, self.marker, self.mode = rank, outer_step, Path(marker), mode

    def on_outer_step(self, solver, metrics):
        if solver.collective.rank != self.rank or solver.outer_step != self.outer_step or self.marker.exists():
            return
        self.marker.write_text(str(os.getpid()))
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure on rank {self.rank} after outer step {self.outer_step}")


def build_failing_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> LogRegSolver:
    """build_solver with a :class:`FailOnce` (``config.extra["fail_once"]``)."""
    return build(LogRegSolver, config, rank, world_size, callbacks=(FailOnce(**config.extra["fail_once"]),))


def build_logged_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> LogRegSolver:
    """build_solver that appends a line to ``config.extra["builds"]`` each time a worker builds it."""
    with open(config.extra["builds"], "a") as log:
        log.write(f"{rank}\n")
    return build_solver(config, rank, world_size)


@pytest.mark.ray
def test_killed_worker_restarts_from_checkpoint_and_ends_as_uninterrupted(tmp_path, ray_session):
    """kill -9 of a Ray Train worker process (rank 1, after outer step 5 of 7); checkpoints every 3 outer
    steps, so the group restarts from outer step 3 (step 7) and redoes steps 8-11. The end equals an
    uninterrupted run to 1e-10; the Parquet history has each step once; TensorBoard hides the events
    the first attempt logged after the checkpoint."""
    import ray.cloudpickle
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])     # workers cannot import tests/

    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from hg_dist.distributed.runner import latest_checkpoint
    from hg_dist.distributed.train_loop import Job

    marker = tmp_path / "killed-once"
    config = config_for(tmp_path, workers=2, extra={"batch_size": 16, "fail_once": dict(
        rank=1, outer_step=5, marker=str(marker), mode="kill")})
    # A checkpoint counts once the Train controller has taken its report (it polls every 2 s); the report
    # at outer step 4 waits for that, so the checkpoint of step 3 is in place when rank 1 dies at step 5.
    run_config = RunConfig(name="killed", storage_path=str(tmp_path / "ray"),
                           failure_config=FailureConfig(max_failures=1))
    result = fit(build_failing_solver, config, options=FitOptions(report_every=2, checkpoint_every=3),
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}), run_config=run_config)

    assert result.error is None and marker.exists()
    killed = int(marker.read_text())
    with pytest.raises(ProcessLookupError):                              # a real process death
        os.kill(killed, 0)
    final = read_checkpoint(result.checkpoint)
    assert final["counters"]["outer_step"] == 7
    uninterrupted = run_in_threads(config, 2)[0]
    assert rel_err(final["outer"]["log_decay"], uninterrupted.outer_params()[0]) <= 1e-10
    for a, b in zip(final["inner_params"], uninterrupted.inner_params):
        assert rel_err(a, b) <= 1e-10

    out = Path(config.output)
    written = json.loads((out / "result.json").read_text())
    assert written["status"] == "completed" and written["restored"] is True
    assert written["restored_from_step"] == 7 and written["metrics"]["comm_rounds"] == 3
    history = pq.read_table(out / "history.parquet").to_pydict()
    assert history["step"] == [4, 8, 12, 16]                             # each logged step once, in order
    expected = {row["step"]: row for row in uninterrupted.recorder.history}
    assert history["outer_loss"][1:] == pytest.approx([expected[s]["outer_loss"] for s in (8, 12, 16)], rel=1e-10)

    files = read_tensorboard(out / "tb")
    assert len(files) == 2                                               # one event file per attempt
    first_steps = {event.step for event in files[0] if event.summary.value}
    assert 8 in first_steps                                              # logged after the checkpoint, then lost
    scalars = visible_scalars(files)
    assert [step for step, _ in scalars["outer_loss"]] == [4, 8, 12, 16]
    assert [value for _, value in scalars["outer_loss"]] == pytest.approx(history["outer_loss"], rel=1e-6)
    assert result.metrics["comm_rounds"] == 3 and result.metrics["outer_step"] == 7
    # What result.json would name after an interruption is the checkpoint Ray resumes from: the final one.
    assert latest_checkpoint(Job(build_failing_solver, config), run_config) == result.checkpoint.path


@pytest.mark.ray
def test_a_diverging_run_ends_at_once_without_restarts(tmp_path, ray_session):
    """The inner loss goes to inf (a huge inner step) on 2 workers allowed 2 restarts: the workers agree,
    end the run at once (each built its solver once: no restart), result.json says why, fit raises.
    Meanwhile every socket of this process tree (the session's Ray, the Train workers) listens on
    127.0.0.1 only, torch's rendezvous store on rank 0 included (hg_dist.distributed.process_group)."""
    import ray.cloudpickle
    from loopback import ListeningSockets
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from hg_dist.distributed import RunFailedError
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    builds = tmp_path / "builds"
    config = config_for(tmp_path, workers=2, extra={"batch_size": 16, "lr": 1e100, "builds": str(builds)})
    with ListeningSockets(os.getpid(), interval=0.1) as sockets, \
            pytest.raises(RunFailedError, match=r"NonFiniteLossError: .*not retried"):
        fit(build_logged_solver, config, options=FitOptions(precheck=False),
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="diverges", storage_path=str(tmp_path / "ray"),
                                 failure_config=FailureConfig(max_failures=2)))
    sockets.assert_loopback_only("fit on the session's Ray")
    assert sockets.train_worker_sockets(), "the Train workers' sockets (torch's store) were not seen"
    assert sorted(builds.read_text().split()) == ["0", "1"]               # one attempt, no restart
    written = json.loads((Path(config.output) / "result.json").read_text())
    assert written["status"] == "failed" and written["retried"] is False and written["workers"] == 2
    assert written["error"].startswith("NonFiniteLossError: ") and "inner" in written["error"]
    assert 0 < written["global_step"] < config.num_iters
