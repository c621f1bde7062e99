"""hg_dist.tune: nested spaces, the per-outer-step trainable, results table, failures, ASHA.

The searches use a tiny ridge-regression problem defined here (a few hundred
parameters-free milliseconds per solve) so the Ray part of this file stays well under
a minute and a half on two cores.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

pytest.importorskip("ray")

import ray.cloudpickle  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import FIFOScheduler  # noqa: E402
from ray.tune.search.variant_generator import generate_variants  # noqa: E402

from hg_dist import make_approx  # noqa: E402
from hg_dist.experiment import ExperimentConfig  # noqa: E402
from hg_dist.outer_optimizers import make_outer_optimizer  # noqa: E402
from hg_dist.solver import BaseImplicitSolver  # noqa: E402
from hg_dist.tune import (SolveReporter, TrialDivergedError, check_space, load_best, rerun_best,  # noqa: E402
                          run_search, to_experiment_config, trial_settings)
from hg_dist.tune.trainable import trial_resources  # noqa: E402

# Ray workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# ---------------------------------------------------------------------------------------
# A tiny bilevel problem: ridge regression with one learned decay per feature.
# ---------------------------------------------------------------------------------------


class RidgeSolver(BaseImplicitSolver):
    """Inner: least squares + Σ exp(φ_j) θ_j² / 2; outer: validation MSE.

    ``extra["diverge_at"] = k`` makes the outer loss NaN from outer step ``k`` on (a
    deliberately failing trial); ``extra["quality"] = q`` adds a reported ``score``
    ``= q · outer_step`` (a constructed metric for the ASHA test).
    """

    def setup(self, config: ExperimentConfig, data: tuple[torch.Tensor, ...]) -> None:
        self.config = config
        self.x_in, self.y_in, self.x_out, self.y_out = data

    def inner_forward(self, in_params, out_params):
        (w,) = in_params
        (log_decay,) = out_params
        residual = self.x_in @ w.reshape(-1) - self.y_in
        return residual.pow(2).mean() / 2 + (log_decay.exp() * w.reshape(-1).pow(2)).sum() / 2

    def outer_forward(self, in_params, out_params):
        (w,) = in_params
        return (self.x_out @ w.reshape(-1) - self.y_out).pow(2).mean() / 2

    def inner_update(self):
        loss, grads = None, None
        params = self.inner_params
        grads = torch.func.grad(self.inner_forward)(params, self.outer_params())
        loss = self.inner_forward(params, self.outer_params())
        self.inner_params, self.inner_optim_state = self.inner_optimizer(params, grads, self.inner_optim_state)
        return loss

    def outer_update(self):
        self.outer_grad = self.approx_ihvp(self.inner_forward, self.outer_forward, self.inner_params,
                                           self.outer_params())
        self.outer_optimizer.step()
        self.outer.zero_grad(set_to_none=True)
        loss = float(self.outer_forward(self.inner_params, self.outer_params()))
        step = self.outer_step + 1
        extra = self.config.extra
        if "diverge_at" in extra and step >= extra["diverge_at"]:
            loss = math.nan
        metrics = {"outer_loss": loss}
        if "quality" in extra:
            metrics["score"] = extra["quality"] * step
        return metrics


class Decay(nn.Module):
    """The outer parameters: one log weight decay per feature."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), -2.0))


def build_tiny(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> RidgeSolver:
    """``build_solver`` for the tests: 48 train / 48 validation points in 6 dimensions."""
    import functools

    from hg_dist.optimizers import diff_sgd

    gen = torch.Generator().manual_seed(config.seed)
    dim, n = 6, 48
    x = torch.randn(2 * n, dim, generator=gen)
    y = x @ torch.randn(dim, generator=gen) + 0.5 * torch.randn(2 * n, generator=gen)
    shard = slice(rank, n, world_size)
    inner = nn.Linear(dim, 1, bias=False)
    nn.init.zeros_(inner.weight)
    outer = Decay(dim)
    solver = RidgeSolver(inner, outer, [None], [None], make_approx(config.approximator, seed=config.seed),
                         num_iters=config.num_iters,
                         unroll_steps=config.unroll_steps,
                         inner_optimizer=functools.partial(diff_sgd, lr=0.3, momentum=0.0, weight_decay=0.0),
                         outer_optimizer=make_outer_optimizer(config.outer_optimizer, outer.parameters()),
                         progress=False, log_dir=config.output if rank == 0 else None)
    solver.setup(config, (x[:n][shard], y[:n][shard], x[n:][shard], y[n:][shard]))
    return solver


# ---------------------------------------------------------------------------------------
# Without Ray: the space, its checks and flattening.
# ---------------------------------------------------------------------------------------

SPACE = {
    "approximator": tune.choice([
        {"name": "nystrom", "rank": tune.choice([2, 3]), "rho": tune.loguniform(0.05, 0.5)},
        {"name": "cg", "num_iters": tune.choice([3, 5]), "lr": 1.0},
        {"name": "neumann", "num_iters": 4, "lr": tune.uniform(0.05, 0.2)},
        {"name": "nystrom_pcg", "rank": 2, "num_iters": tune.choice([2, 3])},
    ]),
    "outer_optimizer": tune.choice([
        {"name": "sgd", "lr": tune.loguniform(0.01, 0.1), "momentum": tune.uniform(0.0, 0.9)},
        {"name": "adam", "lr": tune.loguniform(0.01, 0.1)},
    ]),
    "num_iters": 30,
    "unroll_steps": 5,
}


def test_sampling_respects_nesting():
    seen = set()
    for _ in range(60):
        for _, sampled in generate_variants(SPACE):
            config = to_experiment_config(sampled)
            row = trial_settings(config)
            name = config.approximator["name"]
            seen.add(name)
            approx = sampled["approximator"]
            if name == "nystrom":
                assert set(approx) == {"name", "rank", "rho"}
                assert row["ihvp_iters"] is None and row["ihvp_lr"] is None
                assert config.approximator["rank"] in (2, 3) and 0.05 <= config.approximator["rho"] <= 0.5
            elif name in ("cg", "neumann"):
                assert set(approx) == {"name", "num_iters", "lr"}
                assert row["rank"] is None and row["rho"] == 0.0        # damping: declared default
                assert config.approximator["num_iters"] == approx["num_iters"]
                assert config.approximator["lr"] == approx["lr"]
            else:
                assert set(approx) == {"name", "rank", "num_iters"}
                assert row["ihvp_lr"] is None and row["rho"] == 0.0
            if config.outer_optimizer["name"] == "adam":
                assert "momentum" not in sampled["outer_optimizer"]
            assert config.num_iters == 30 and config.unroll_steps == 5
    assert seen == {"nystrom", "cg", "neumann", "nystrom_pcg"}


def test_main_job_space_is_valid_and_builds_solvers():
    """The README's main job (examples/search.py): its space passes the checks and
    every sampled trial becomes a config the hyper-cleaning example can build."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "search.py"
    spec = importlib.util.spec_from_file_location("example_search", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    space = module.search_space([1, 2])
    check_space(space)
    base = ExperimentConfig(num_iters=20, unroll_steps=10, extra={"n_train": 100, "n_val": 50})
    workers = set()
    for _, sampled in generate_variants(space):
        config = to_experiment_config(sampled, base)
        workers.add(config.workers)
        solver = module.data_hypercleaning.build_solver(config)
        assert solver.num_iters == 20
    assert workers == {1, 2}


@pytest.mark.parametrize("space, match", [
    ({**SPACE, "approximator": {"name": "nystrom", "rank": 2, "num_iters": 3}}, "does not take"),
    ({**SPACE, "approximator": tune.choice([{"name": "nystromm"}])}, "use one of"),
    ({**SPACE, "approximator": {"name": tune.choice(["cg", "nystrom"])}}, "fixed string"),
    ({**SPACE, "outer_optimizer": {"name": "adam", "momentum": 0.9}}, "does not take"),
    ({**SPACE, "rank": 3}, "move it into"),
    ({**SPACE, "output": "x"}, "set by the search"),
    ({**SPACE, "num_iter": 3}, "not an ExperimentConfig field"),
    ({k: v for k, v in SPACE.items() if k != "approximator"}, "needs an 'approximator'"),
])
def test_check_space_errors_name_the_fix(space, match):
    with pytest.raises(ValueError, match=match):
        check_space(space)


def test_flatten_merges_base_and_extra():
    base = ExperimentConfig(num_iters=99, extra={"a": 1, "b": 2})
    sampled = {"approximator": {"name": "cg", "num_iters": 7, "lr": 0.5},
               "outer_optimizer": {"name": "adam", "lr": 0.02}, "extra": {"b": 3}, "workers": 2}
    config = to_experiment_config(sampled, base, output="/tmp/x")
    assert config.approximator == {"name": "cg", "num_iters": 7, "lr": 0.5, "rho": 0.0}
    assert config.outer_optimizer == {"name": "adam", "lr": 0.02, "beta1": 0.9}
    assert config.extra == {"a": 1, "b": 3} and config.num_iters == 99 and config.workers == 2
    assert config.output == "/tmp/x"


def test_reporter_counts_hvps_and_flags_divergence():
    results = []
    reporter = SolveReporter("outer_loss", "min", results.append)

    class Stub:
        outer_step = 1

    reporter(Stub(), {"outer_loss": 2.0, "ihvp_num_hvps": 3.0})
    reporter(Stub(), {"outer_loss": 1.0, "ihvp_num_hvps": 3.0})
    assert results[-1]["hvps_total"] == 6 and results[-1]["best_metric"] == 1.0
    with pytest.raises(TrialDivergedError, match="diverged"):
        reporter(Stub(), {"outer_loss": math.nan})
    with pytest.raises(KeyError, match="val_acc"):
        SolveReporter("val_acc", "max", results.append)(Stub(), {"outer_loss": 1.0})


def test_trial_resources_follow_workers():
    assert trial_resources({"workers": 1}, 1.0).required_resources == {"CPU": 1.0}
    assert trial_resources({"workers": 2}, 0.5).required_resources["CPU"] < 0.1


# ---------------------------------------------------------------------------------------
# With Ray (shared local session): searches.
# ---------------------------------------------------------------------------------------


def test_search_table_parquet_failure_and_rerun(ray_session, tmp_path):
    """4 trials, one per approximator (CG on 2 workers); the Neumann one diverges on purpose, alone."""
    space = {
        "approximator": tune.grid_search([
            {"name": "nystrom", "rank": tune.choice([2, 3]), "rho": tune.loguniform(0.05, 0.5)},
            {"name": "cg", "num_iters": tune.choice([3, 5]), "lr": 1.0},
            {"name": "nystrom_pcg", "rank": 2, "num_iters": 2},
            {"name": "neumann", "num_iters": 3, "lr": 0.1},
        ]),
        "outer_optimizer": tune.choice([{"name": "sgd", "lr": 0.05, "momentum": 0.5},
                                        {"name": "adam", "lr": 0.05}]),
        "extra": tune.sample_from(lambda spec: {"diverge_at": 2} if spec.config.approximator["name"] == "neumann"
                                  else {}),
        # the CG trial is a 2-worker Ray Train run
        "workers": tune.sample_from(lambda spec: 2 if spec.config.approximator["name"] == "cg" else 1),
        "num_iters": 30,
        "unroll_steps": 5,
    }
    result = run_search(build_tiny, space, output=tmp_path / "search", metric="outer_loss", mode="min",
                        scheduler=FIFOScheduler(), cpus_per_worker=0.5)
    rows = {row["approx"]: row for row in result.table.to_pylist()}
    assert len(result.table) == 4 and set(rows) == {"nystrom", "cg", "nystrom_pcg", "neumann"}
    # nesting: no trial carries another method's settings
    assert rows["nystrom"]["ihvp_iters"] is None and rows["nystrom"]["ihvp_lr"] is None
    assert rows["cg"]["rank"] is None and rows["cg"]["rho"] == 0.0
    assert rows["cg"]["workers"] == 2 and rows["nystrom"]["workers"] == 1
    # the failing trial is recorded with its error; the others ran to the end
    assert rows["neumann"]["status"] == "failed" and "outer_loss" in rows["neumann"]["error"]
    for name in ("nystrom", "cg", "nystrom_pcg"):
        row = rows[name]
        assert row["status"] == "completed" and row["error"] is None, row
        assert row["outer_steps"] == 5 and row["hvps"] > 0 and math.isfinite(row["best_metric"])
        assert (result.output / "trials" / row["trial"] / "tb").is_dir()
    on_disk = pq.read_table(result.output / "results.parquet")
    assert on_disk.num_rows == 4 and on_disk.column_names == result.table.column_names
    assert "best_outer_loss" in str(result)
    # the best config re-runs as saved
    config, record = load_best(result.output / "best_config.json")
    assert record["trial"] == result.best["trial"] and config.approximator["name"] == result.best["approx"]
    assert json.loads(result.best["config"])["approximator"] == config.approximator
    # build_solver (build_tiny) is found from the saved record; one worker keeps it quick
    metrics = rerun_best(result.output / "best_config.json", workers=1)
    assert math.isfinite(metrics["outer_loss"])
    assert (result.output / "best_rerun" / "result.json").exists()


def test_asha_stops_bad_trials_early(ray_session, tmp_path):
    """A constructed case: ``score = quality · outer_step``; trials run one at a time, best first."""
    space = {
        "approximator": {"name": "cg", "num_iters": 2, "lr": 1.0},
        "outer_optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0},
        "extra": {"quality": tune.grid_search([1.0, 0.5, 0.2, 0.1])},
        "num_iters": 41,
        "unroll_steps": 5,
    }
    result = run_search(build_tiny, space, output=tmp_path / "asha", metric="score", mode="max",
                        grace_period=1, reduction_factor=2, max_concurrent_trials=1, print_table=False)
    rows = result.table.to_pylist()
    assert len(rows) == 4
    statuses = {json.loads(row["config"])["extra"]["quality"]: row["status"] for row in rows}
    assert statuses[1.0] == "completed"
    stopped = [row for row in rows if row["status"] == "stopped"]
    assert stopped and all(row["outer_steps"] < 8 for row in stopped)
