"""The Ray Train loop, written out: per-feature weight decays tuned on W workers.

What a Ray Train user writes (compare Ray's ``torch_fashion_mnist_example.py``), with
hg_dist's pieces inside:

* ``train_func_per_worker(config)`` runs on every worker: ``ray.train.get_context()``
  gives the rank; the worker takes its shard of every global batch
  (:class:`hg_dist.data.ShardedLoader`); the solver is built with
  ``collective=TorchDistributed()`` (the process group Ray Train set up), so its
  inner gradients, hypergradients and metrics are means over the workers; it
  resumes from ``ray.train.get_checkpoint()``; a callback calls ``ray.train.report``
  with a checkpoint (:func:`hg_dist.distributed.checkpoint_of`) every few outer steps.
* ``main`` configures the run with Ray's own objects: ``ScalingConfig`` (workers,
  resources) and ``RunConfig`` (checkpoints and results in ``<output>/<name>``,
  restarts with ``FailureConfig``, ``CheckpointConfig``), then ``TorchTrainer.fit``
  with :class:`hg_dist.distributed.process_group.NodeBoundTorchConfig` (torch's
  rendezvous store on the node's address, not on every interface).

Inner problem (θ: a linear classifier on ``dim`` features, φ: one log decay per feature)::

    f(θ, φ) = mean_i BCE(x_iᵀθ, y_i) + ½ Σ_j exp(φ_j) θ_j²      (training shard)
    g(θ, φ) = mean_i BCE(x_iᵀθ, y_i)                              (validation shard)

    python examples/train_loop.py --workers 2 --output runs/train_loop

:func:`hg_dist.distributed.fit` does the same for any ``build_solver`` (with rare,
rank-0-decided reports, result files and a check of the cluster first); this file
shows the shape underneath.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from hg_dist import make_approx, ray_env
from hg_dist.callbacks import Callback
from hg_dist.collective import Collective, SingleProcess
from hg_dist.data import ShardedLoader, full_batch
from hg_dist.optimizers import diff_sgd
from hg_dist.solver import BaseImplicitSolver
from hg_dist.utils import Params

SETTINGS = {"dim": 20, "informative": 4, "n_train": 128, "n_val": 128, "batch_size": 32, "inner_lr": 0.2,
            "outer_lr": 0.05, "num_iters": 200, "unroll_steps": 10, "rank": 5, "rho": 0.1, "seed": 0,
            "checkpoint_every": 5}
"""The solve's settings (``train_loop_config`` of the trainer); flags of the same names override them."""


class WeightDecaySolver(BaseImplicitSolver):
    """Logistic regression with a learned decay per feature; the default updates do the rest."""

    def inner_forward(self, in_params: Params, out_params: Params, x: Tensor, y: Tensor) -> Tensor:
        loss = F.binary_cross_entropy_with_logits(self.inner_func(in_params, x), y)
        return loss + (in_params[0].pow(2) * out_params[0].exp()).sum() / 2

    def outer_forward(self, in_params: Params, out_params: Params, x: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(self.inner_func(in_params, x), y)


class LogDecay(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.log_decay = nn.Parameter(torch.zeros(1, dim))


def make_data(config: dict[str, Any]) -> tuple[TensorDataset, TensorDataset]:
    """The whole data set, the same on every worker: a few informative features, the rest noise."""
    gen = torch.Generator().manual_seed(config["seed"])
    n, dim = config["n_train"] + config["n_val"], config["dim"]
    x = torch.randn(n, dim, generator=gen)
    w = torch.zeros(dim, dtype=x.dtype)
    w[:config["informative"]] = 2.0
    y = (torch.rand(n, generator=gen) < torch.sigmoid(x @ w)).to(x.dtype).unsqueeze(1)
    cut = config["n_train"]
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def build_solver(config: dict[str, Any], rank: int, world_size: int, collective: Collective,
                 callbacks: tuple[Callback, ...] = ()) -> WeightDecaySolver:
    """This worker's solver: its shard of every global batch, the models seeded alike on every worker."""
    torch.manual_seed(config["seed"])
    train, val = make_data(config)
    inner, outer = nn.Linear(config["dim"], 1, bias=False), LogDecay(config["dim"])
    nn.init.zeros_(inner.weight)
    return WeightDecaySolver(
        inner, outer,
        ShardedLoader(train, config["batch_size"], rank=rank, world_size=world_size, seed=config["seed"]),
        full_batch(val, rank, world_size),
        make_approx({"name": "nystrom", "rank": config["rank"], "rho": config["rho"]}, seed=config["seed"]),
        config["num_iters"], config["unroll_steps"],
        functools.partial(diff_sgd, lr=config["inner_lr"], momentum=0, weight_decay=0),
        torch.optim.Adam(outer.parameters(), lr=config["outer_lr"]),
        progress=False, callbacks=callbacks, collective=collective)


class ReportToRay(Callback):
    """Every ``every`` outer steps: ``ray.train.report`` with a checkpoint, on every worker.

    The step numbers are the same on every worker, so all of them report together
    (Ray Train requires it); each adds its own part to the checkpoint (rank 0 the
    solver's state, every rank its loader position and random state).
    """

    def __init__(self, rank: int, every: int) -> None:
        self.rank, self.every = rank, every

    def on_outer_step(self, solver: BaseImplicitSolver, metrics: dict[str, float]) -> None:
        if solver.outer_step % self.every == 0:
            report(solver, self.rank, metrics)


def report(solver: BaseImplicitSolver, rank: int, metrics: dict[str, float]) -> None:
    import ray.train

    from hg_dist.distributed import checkpoint_of

    with checkpoint_of(solver, rank) as checkpoint:
        ray.train.report(metrics, checkpoint=checkpoint)


def train_func_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    import ray.train

    from hg_dist.distributed import TorchDistributed, read_checkpoint

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    solver = build_solver(config, rank, world_size, collective=TorchDistributed(),
                          callbacks=(ReportToRay(rank, config["checkpoint_every"]),))

    checkpoint = ray.train.get_checkpoint()            # set when Ray Train restarts the worker group
    if checkpoint is not None:
        solver.load_state_dict(read_checkpoint(checkpoint, rank=rank))

    final = solver.run()                               # the bilevel loop, reporting as it goes
    report(solver, rank, {**final, "outer_step": solver.outer_step})


def solve_here(config: dict[str, Any]) -> WeightDecaySolver:
    """The same solve in this process alone (``W = 1``): what the workers' result must equal."""
    solver = build_solver(config, 0, 1, collective=SingleProcess())
    solver.run()
    return solver


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker holds (default 1)")
    parser.add_argument("--max-failures", type=int, default=0, help="worker-group restarts allowed (default 0)")
    parser.add_argument("--output", default="runs/train_loop", help="storage_path of the run (default %(default)s)")
    parser.add_argument("--name", default="train_loop", help="the run's folder under --output (default %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's internal warnings too")
    for name, default in SETTINGS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default,
                            help=f"(default {default})")
    args = vars(parser.parse_args(argv))
    # Ray on loopback, without usage stats, quiet: set before Ray is imported (hg_dist.ray_env).
    ray_env.prepare(verbose=args["verbose"])
    for name in ("workers", "num_iters", "unroll_steps", "batch_size", "rank", "checkpoint_every", "dim",
                 "n_train", "n_val"):
        if args[name] < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {args[name]}")
    for name in ("cpus_per_worker", "inner_lr", "outer_lr", "rho"):
        if not args[name] > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {args[name]}")
    if args["max_failures"] < 0 or args["seed"] < 0:
        parser.error("--max-failures and --seed must be >= 0")

    import ray.cloudpickle
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hg_dist.distributed.process_group import NodeBoundTorchConfig

    if __name__ != "__main__":   # imported as a module the workers cannot import: ship its functions by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TorchTrainer(
        train_func_per_worker,
        torch_config=NodeBoundTorchConfig(),   # torch's rendezvous store on the node's address only
        train_loop_config={name: args[name] for name in SETTINGS},
        scaling_config=ScalingConfig(num_workers=args["workers"],
                                     resources_per_worker={"CPU": args["cpus_per_worker"]}),
        run_config=RunConfig(name=args["name"], storage_path=str(Path(args["output"]).resolve()),
                             failure_config=FailureConfig(max_failures=args["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    print(json.dumps(result.metrics, indent=2))
    return result


if __name__ == "__main__":
    main()
