"""A 2-worker run of examples/logistic_regression.py in float64, for tests/test_fake_cluster.py.

Submitted as a Ray job (``python tests/fake_cluster_job.py OUTPUT``) to the simulated
cluster; the test kills a worker node while it runs. The run uses the cluster's
default fault tolerance (no ``RunConfig`` given) and saves the
final solver state, so that the test can compare it with an uninterrupted run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `examples` as a package, also on the workers (the job's working_dir)

from examples import logistic_regression  # noqa: E402
from hg_dist.distributed import FitOptions, fit, read_checkpoint  # noqa: E402
from hg_dist.experiment import ExperimentConfig  # noqa: E402

SETTINGS = dict(approximator={"name": "nystrom", "rank": 5, "rho": 0.1}, outer_optimizer={"name": "adam", "lr": 0.05},
                num_iters=80, unroll_steps=10, seed=0, workers=2, extra={"log_freq": 10})
CHECKPOINT_EVERY = 2
FINAL_STATE = "final_state.pt"


def build_solver(config: ExperimentConfig, rank: int = 0, world_size: int = 1):
    """The example's solver, in float64 (data, parameters and solves)."""
    torch.set_default_dtype(torch.float64)
    solver = logistic_regression.build_solver(config, rank=rank, world_size=world_size)
    solver.progress = False
    return solver


def config(output: str) -> ExperimentConfig:
    return ExperimentConfig(**SETTINGS, output=output)


def main(output: str) -> None:
    result = fit(build_solver, config(output), options=FitOptions(checkpoint_every=CHECKPOINT_EVERY,
                                                                  resource_timeout_s=300))
    state = read_checkpoint(result.checkpoint)
    torch.save({"outer": state["outer"], "counters": state["counters"]}, Path(output) / FINAL_STATE)


if __name__ == "__main__":
    main(sys.argv[1])
