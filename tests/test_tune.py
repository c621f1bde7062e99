"""hg_dist.tune: nested spaces, searchers, the trainable, durable histories, results, resume, ASHA.

The searches use a tiny ridge-regression problem defined here (milliseconds per
solve), so the Ray part of this file is mostly Ray's own start-up: three in-process
searches on the shared session and one interrupted-then-resumed run of the main job
(examples/search.py) as a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
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
from hg_dist.tune import (SearchExistsError, SolveReporter, TrialDivergedError, check_space,  # noqa: E402
                          load_best, rerun_best, run_search, to_experiment_config, trial_settings)
from hg_dist.tune.search import SearchOptions, default_scheduler  # noqa: E402
from hg_dist.tune.trainable import trial_resources  # noqa: E402


def at(folder: Path) -> tune.RunConfig:
    """The run config of a search in ``folder``."""
    return tune.RunConfig(storage_path=str(folder.parent), name=folder.name)

# Ray workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

# ---------------------------------------------------------------------------------------
# A tiny bilevel problem: ridge regression with one learned decay per feature.
# ---------------------------------------------------------------------------------------


class RidgeSolver(BaseImplicitSolver):
    """Inner: least squares + Σ exp(φ_j) θ_j² / 2; outer: validation MSE.

    ``extra["diverge_at"] = k`` makes the outer loss NaN from outer step ``k`` on (a
    deliberately failing trial); ``extra["quality"] = q`` adds a reported ``score``
    ``= q · outer_step`` (a constructed metric for the ASHA test); ``extra["fail_once_at"]
    = k`` with ``extra["marker"] = path`` raises once, at outer step ``k``, in the first
    solve to get there (it creates the marker file).
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
        if extra.get("fail_once_at") == step and not Path(extra["marker"]).exists():
            Path(extra["marker"]).touch()
            raise RuntimeError(f"injected failure at outer step {step}")
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
# Without Ray: the space, its checks and flattening; searchers; histories; results.
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

ROOT = Path(__file__).resolve().parent.parent
SEARCH_PY = ROOT / "examples" / "search.py"


def _check_nested(sampled: dict) -> str:
    """Assert that a sampled config holds only its methods' settings, in SPACE's ranges; return the method."""
    config = to_experiment_config(sampled)
    row = trial_settings(config)
    name = config.approximator["name"]
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
        if name == "neumann":
            assert approx["num_iters"] == 4 and 0.05 <= approx["lr"] <= 0.2
        else:
            assert approx["num_iters"] in (3, 5) and approx["lr"] == 1.0
    else:
        assert set(approx) == {"name", "rank", "num_iters"}
        assert row["ihvp_lr"] is None and row["rho"] == 0.0 and approx["num_iters"] in (2, 3)
    if config.outer_optimizer["name"] == "adam":
        assert set(sampled["outer_optimizer"]) == {"name", "lr"}
    else:
        assert set(sampled["outer_optimizer"]) == {"name", "lr", "momentum"}
        assert 0.0 <= sampled["outer_optimizer"]["momentum"] <= 0.9
    assert 0.01 <= config.outer_optimizer["lr"] <= 0.1
    assert config.num_iters == 30 and config.unroll_steps == 5
    return name


def test_sampling_respects_nesting():
    seen = set()
    for _ in range(60):
        for _, sampled in generate_variants(SPACE):
            seen.add(_check_nested(sampled))
    assert seen == {"nystrom", "cg", "neumann", "nystrom_pcg"}


def test_optuna_define_by_run_yields_only_valid_nested_configs():
    """Optuna (TPE, through Ray's OptunaSearch) on the function generated from SPACE: the method first,
    then only its settings; the top-level grid is dealt round-robin, as random search expands it."""
    pytest.importorskip("optuna")
    import optuna

    from hg_dist.tune.searchers import make_searcher

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {**SPACE, "workers": tune.grid_search([1, 2])}
    searcher, param_space, samples = make_searcher("optuna", space, metric="best_metric", mode="min", seed=0,
                                                   num_samples=20)
    assert param_space == {} and samples == 40
    seen, workers = set(), []
    for i in range(samples):
        sampled = searcher.suggest(f"t{i}")
        assert set(sampled) == set(space)                          # no Optuna parameter names leak in
        workers.append(sampled.pop("workers"))
        seen.add(_check_nested(sampled))
        searcher.on_trial_complete(f"t{i}", {"best_metric": (i * 7919 % 13) / 13.0, "training_iteration": 1})
    assert seen == {"nystrom", "cg", "neumann", "nystrom_pcg"}
    assert workers.count(1) == workers.count(2) == 20
    # the sampler saw one parameter per method's setting, only in trials of that method
    study = searcher._ot_study
    for trial in study.trials:
        method = trial.params["approximator"]
        assert all(name in ("approximator", "outer_optimizer") or name.split("/")[1] in (method, trial.params[
            "outer_optimizer"]) for name in trial.params)


def test_optuna_refuses_what_it_cannot_suggest():
    from hg_dist.tune.searchers import check_searchable

    with pytest.raises(ValueError, match=r"space\['extra'\] is a tune.sample_from"):
        check_searchable({**SPACE, "extra": tune.sample_from(lambda spec: {})}, "optuna")
    with pytest.raises(ValueError, match="search must be one of"):
        check_searchable(SPACE, "grid")
    check_searchable({**SPACE, "extra": tune.sample_from(lambda spec: {})}, "random")


def test_main_job_space_is_valid_and_builds_solvers():
    """The README's main job (examples/search.py): its space passes the checks and
    every sampled trial becomes a config the hyper-cleaning example can build."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_search", SEARCH_PY)
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


def test_bad_grid_value_is_refused_before_ray_starts(tmp_path):
    """rank: tune.grid_search([-1, 5]) fails in run_search before Ray is touched and before any file."""
    space = {**SPACE, "approximator": {"name": "nystrom", "rank": tune.grid_search([-1, 5]), "rho": 0.1}}
    with pytest.raises(ValueError, match=r"rank must be >= 1, got -1 \(nystrom\)"):
        run_search(build_tiny, space, run_config=at(tmp_path / "search"))
    assert not (tmp_path / "search").exists()


def test_flatten_merges_base_and_extra():
    base = ExperimentConfig(num_iters=99, extra={"a": 1, "b": 2})
    sampled = {"approximator": {"name": "cg", "num_iters": 7, "lr": 0.5},
               "outer_optimizer": {"name": "adam", "lr": 0.02}, "extra": {"b": 3}, "workers": 2}
    config = to_experiment_config(sampled, base, output="/tmp/x")
    assert config.approximator == {"name": "cg", "num_iters": 7, "lr": 0.5, "rho": 0.0}
    assert config.outer_optimizer == {"name": "adam", "lr": 0.02, "beta1": 0.9}
    assert config.extra == {"a": 1, "b": 3} and config.num_iters == 99 and config.workers == 2
    assert config.output == "/tmp/x"


def test_reporter_counts_hvps_checkpoints_and_flags_divergence():
    results = []
    reporter = SolveReporter("outer_loss", "min", lambda result, **kw: results.append((result, kw)),
                             checkpoint_every=2)
    solver = build_tiny(ExperimentConfig(approximator={"name": "cg", "num_iters": 3}, num_iters=20,
                                         unroll_steps=5, output="unused"))
    solver.log_dir = None
    solver.outer_step = 1
    reporter(solver, {"outer_loss": 2.0, "ihvp_num_hvps": 3.0})
    solver.outer_step = 2
    reporter(solver, {"outer_loss": 1.0, "ihvp_num_hvps": 3.0})
    (first, kw1), (second, kw2) = results
    assert second["hvps_total"] == 6 and second["best_metric"] == 1.0 and second["outer_step"] == 2
    assert kw1 == {} and set(kw2) == {"checkpoint"}                # a trial checkpoint every 2 outer steps
    assert reporter.tracker.final({"outer_loss": 1.5, "test_acc": 0.5}, 2)["solve_completed"] == 1.0
    with pytest.raises(TrialDivergedError, match="diverged"):
        reporter(solver, {"outer_loss": math.nan})
    with pytest.raises(KeyError, match="val_acc"):
        SolveReporter("val_acc", "max", results.append)(solver, {"outer_loss": 1.0})


def test_trial_checkpoint_restores_solver_and_counters(tmp_path):
    """The one-worker trial checkpoint: solver state (transactional load) and the reporter's counters."""
    from hg_dist.tune.trainable import ResultTracker, restore_trial, trial_checkpoint

    config = ExperimentConfig(approximator={"name": "cg", "num_iters": 3}, num_iters=20, unroll_steps=5,
                              output=str(tmp_path / "a"))
    solver = build_tiny(config)
    solver.log_dir = None
    solver.num_iters = 11
    solver.run()
    tracker = ResultTracker("outer_loss", "min")
    tracker.update({"outer_loss": 0.5, "ihvp_num_hvps": 3}, 1)
    with trial_checkpoint(solver, tracker) as checkpoint:
        other = build_tiny(config)
        other.log_dir = None
        fresh = ResultTracker("outer_loss", "min")
        restore_trial(checkpoint, other, fresh)
    assert other.global_step == 11 and other.outer_step == solver.outer_step == 2
    assert fresh.hvps_total == 3 and fresh.best == 0.5
    for a, b in zip(other.inner_params, solver.inner_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_takes_the_newest_trial_checkpoint_even_one_tune_never_recorded(tmp_path, monkeypatch):
    """Ctrl-C can fall between a trial writing ``checkpoint_NNNNNN`` and Tune's driver recording it: the
    resumed trial restores the newest folder by outer step (not by name), past Tune's own, skipping a folder
    cut off while written (no tracker file) and one that fails to load; Tune's own is the last resort."""
    import shutil
    from types import SimpleNamespace

    import pyarrow.fs

    from hg_dist.tune import trainable
    from hg_dist.tune.trainable import ResultTracker, checkpoints_newest_first, restore_newest, trial_checkpoint

    config = ExperimentConfig(approximator={"name": "cg", "num_iters": 3}, num_iters=20, unroll_steps=5,
                              output=str(tmp_path / "a"))
    solver = build_tiny(config)
    solver.log_dir = None
    trial = tmp_path / "trial"
    tracker = ResultTracker("outer_loss", "min")
    # Folder names as Tune numbers them after a resume that restarted its count: name order is not step order.
    for name, iters in [("checkpoint_000002", 5), ("checkpoint_000001", 10), ("checkpoint_000000", 15)]:
        solver.num_iters = iters
        solver.run()
        tracker.update({"outer_loss": 1.0 / iters, "ihvp_num_hvps": 3}, solver.outer_step)
        with trial_checkpoint(solver, tracker) as checkpoint:
            shutil.copytree(checkpoint.path, trial / name)
        if name == "checkpoint_000000":
            steps_at_15 = solver.outer_step
    (trial / "checkpoint_000003").mkdir()            # cut off before its tracker file
    fs = pyarrow.fs.LocalFileSystem()
    known = tune.Checkpoint(str(trial / "checkpoint_000001"), filesystem=fs)

    def names(checkpoints):
        return [Path(c.path).name for c in checkpoints]

    assert names(checkpoints_newest_first(fs, str(trial), None)) == ["checkpoint_000000", "checkpoint_000001",
                                                                      "checkpoint_000002"]
    assert names(checkpoints_newest_first(fs, str(trial), known)) == ["checkpoint_000000", "checkpoint_000001"]
    assert checkpoints_newest_first(fs, str(tmp_path / "none"), None) == []

    storage = SimpleNamespace(storage_filesystem=fs, trial_fs_path=str(trial))
    monkeypatch.setattr(trainable.tune, "get_context", lambda: SimpleNamespace(get_storage=lambda: storage))

    def restored(known_checkpoint):
        monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: known_checkpoint)
        other = build_tiny(config)
        other.log_dir = None
        return other, restore_newest(other, ResultTracker("outer_loss", "min"))

    other, found = restored(known)
    assert found and other.outer_step == steps_at_15 and other.global_step == 15
    (trial / "checkpoint_000000" / trainable.SOLVER_FILE).write_bytes(b"cut off")   # fails to load: the next
    other, found = restored(known)
    assert found and other.global_step == 10
    (trial / "checkpoint_000001" / trainable.SOLVER_FILE).write_bytes(b"cut off")   # Tune's own fails: raised
    with pytest.raises(ValueError):
        restored(known)
    assert restored(None)[0].global_step == 5                                       # no Tune checkpoint
    shutil.rmtree(trial)
    assert restored(None)[1] is False


def test_trial_resources_follow_workers():
    assert trial_resources({"workers": 1}, 1.0).required_resources == {"CPU": 1.0}
    assert trial_resources({"workers": 2}, 0.5).required_resources["CPU"] < 0.1
    assert trial_resources({}, 0.5, use_gpu=True).required_resources == {"CPU": 0.5, "GPU": 1.0}
    assert trial_resources({}, 0.5, workers=2).required_resources["CPU"] < 0.1


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_trial_history_has_every_outer_step_when_the_process_is_killed(tmp_path):
    """TrialHistory writes a row at every outer step before anything reports it: SIGKILL after the
    fourth outer step leaves a readable history.parquet and TensorBoard events with outer steps 1..4."""
    import signal
    import subprocess
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import test_tune
        from hg_dist.experiment import ExperimentConfig
        from hg_dist.tune import TrialHistory
        config = ExperimentConfig(approximator={{"name": "cg", "num_iters": 3}}, num_iters=400, unroll_steps=5,
                                  output={str(tmp_path / 'run')!r})
        solver = test_tune.build_tiny(config)
        solver.log_dir = config.output
        def announce(solver, metrics):
            print("outer", solver.outer_step, flush=True)
            if solver.outer_step >= 4:
                time.sleep(60)
        solver.callbacks = (TrialHistory(config.output), announce)
        solver.run()
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.strip() == "outer 4":
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)
    rows = _rows(tmp_path / "run" / "history.parquet")
    outer = [row["outer_step"] for row in rows]
    assert outer == [1, 2, 3, 4] and [row["step"] for row in rows] == [6, 11, 16, 21]
    assert all(math.isfinite(row["outer_loss"]) for row in rows)
    events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def _scalars(folder: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in the TensorBoard event files of ``folder``."""
    import struct

    from tensorboardX.proto import event_pb2

    points = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at + 12 <= len(data):                 # TFRecord: length, crc, payload, crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12:at + 12 + length])
            points += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
            at += 12 + length + 4
    return points


def test_trial_history_gives_tensorboard_one_point_per_metric_per_outer_step(tmp_path):
    """Every history row repeats the latest value of every metric (the solver's own rows every log_freq = 5
    steps, the trial's row at each outer step): TensorBoard still gets outer_loss once per outer step
    (at that step, with the history's value) and no tag twice at one step. The history carries the solve's
    clock, wall_time_s, increasing."""
    from hg_dist.tune import TrialHistory

    config = ExperimentConfig(approximator={"name": "cg", "num_iters": 3}, num_iters=20, unroll_steps=5,
                              output=str(tmp_path / "run"))
    solver = build_tiny(config)
    solver.log_dir, solver.log_freq = config.output, 5
    solver.callbacks = (TrialHistory(config.output),)
    solver.run()
    rows = _rows(tmp_path / "run" / "history.parquet")
    outer_rows: dict[int, dict] = {}
    for row in rows:                                 # the row of each outer step: the first that counts it
        if row["outer_step"]:
            outer_rows.setdefault(int(row["outer_step"]), row)
    points = _scalars(tmp_path / "run" / "tb")
    pairs = [(tag, step) for tag, step, _ in points]
    assert len(pairs) == len(set(pairs)), sorted(pairs)
    loss = [(step, value) for tag, step, value in points if tag == "outer_loss"]
    assert len(rows) > len(outer_rows) == 3          # rows at steps 5, 10, 15 repeat the latest outer_loss
    assert [step for step, _ in loss] == [outer_rows[k]["step"] for k in sorted(outer_rows)] == [6, 11, 16]
    for (_, value), k in zip(loss, sorted(outer_rows)):
        assert value == pytest.approx(outer_rows[k]["outer_loss"], rel=1e-6)
    clock = [outer_rows[k]["wall_time_s"] for k in sorted(outer_rows)]
    assert all(0 < a < b for a, b in zip(clock, clock[1:]))


def test_result_tracker_separates_startup_from_solving():
    """wall_time_s is the solver's clock (the metric the trial's history records); startup_s the rest
    of the trial's time, both carried through the tracker's state."""
    import time

    from hg_dist.tune.trainable import ResultTracker

    tracker = ResultTracker("outer_loss", "min")
    tracker.start = time.time() - 10.0               # the trial started 10 s ago
    result = tracker.update({"outer_loss": 1.0, "wall_time_s": 2.5}, 1)
    assert result["wall_time_s"] == 2.5 and result["startup_s"] == pytest.approx(7.5, abs=0.5)
    resumed = ResultTracker("outer_loss", "min")
    resumed.load_state_dict(tracker.state_dict())
    resumed.start = time.time() - 4.0                 # a resumed trial: 4 s more, 1 s of it solving
    result = resumed.update({"outer_loss": 0.5, "wall_time_s": 3.5}, 2)
    assert result["wall_time_s"] == 3.5 and result["startup_s"] == pytest.approx(10.5, abs=0.5)
    assert ResultTracker("outer_loss", "min").update({"outer_loss": 1.0}, 1)["startup_s"] == pytest.approx(0.0, abs=0.1)


def test_end_history_at_cuts_after_the_stopped_outer_step(tmp_path):
    from hg_dist.recording import write_parquet
    from hg_dist.tune.trainable import end_history_at

    rows = [{"step": 3, "inner_loss": 1.0}, {"step": 5, "outer_step": 1, "outer_loss": 2.0},
            {"step": 8, "outer_step": 1, "inner_loss": 0.5}, {"step": 10, "outer_step": 2, "outer_loss": 1.5},
            {"step": 15, "outer_step": 3, "outer_loss": 1.2}]
    write_parquet(tmp_path / "history.parquet", rows)
    assert end_history_at(tmp_path, 2)
    assert [row["step"] for row in _rows(tmp_path / "history.parquet")] == [3, 5, 8, 10]
    assert not end_history_at(tmp_path, 2)           # nothing more to cut: the file is left alone
    assert not end_history_at(tmp_path / "missing", 1)


def test_the_search_folder_is_tunes_experiment_folder(tmp_path):
    from hg_dist.tune.storage import SearchStorage

    local = SearchStorage.parse(tmp_path / "runs" / "search")
    assert (local.tune_parent, local.tune_name) == (str(tmp_path / "runs"), "search")
    assert local.tune_path == str(tmp_path / "runs" / "search")
    remote = SearchStorage.parse(f"file://{tmp_path}/runs/search/")
    assert (remote.tune_parent, remote.tune_name, remote.tune_path) == (f"file://{tmp_path}/runs", "search",
                                                                        f"file://{tmp_path}/runs/search")
    with pytest.raises(ValueError, match="name a folder inside the bucket"):
        SearchStorage.parse("s3://bucket")


def test_progress_lines_and_status():
    """One line per ended trial (with why it ended), a status line with counts and the best so far."""
    import io

    from ray.tune.experiment import Trial

    from hg_dist.tune.progress import SearchProgress

    trials = [Trial("hg_dist_trial", config={}, trial_id=name, stub=True) for name in ("a1", "b2", "c3")]
    for trial, name in zip(trials, ("cg_a1", "nystrom_b2", "cg_c3")):
        trial.custom_trial_name = name
    stream, ended = io.StringIO(), []
    progress = SearchProgress("val_acc", "max", 4, interval=0.0, stream=stream,
                              on_end=lambda trial, status, error: ended.append((str(trial), status, error)))
    a, b, c = trials
    a.update_last_result({"best_metric": 0.8, "outer_step": 4})
    progress.on_trial_result(0, trials, a, {"best_metric": 0.8})
    b.update_last_result({"best_metric": 0.9, "outer_step": 39, "solve_completed": 1.0})
    progress.on_trial_result(0, trials, b, {"best_metric": 0.9})
    c.set_status(Trial.RUNNING)
    progress.on_trial_complete(0, trials, a)
    a.set_status(Trial.TERMINATED)
    progress.on_trial_complete(0, trials, b)
    b.set_status(Trial.TERMINATED)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("cg_a1 stopped by the scheduler after 4 outer steps: best val_acc 0.8 (1/4 done)")
    assert lines[1].endswith("nystrom_b2 completed after 39 outer steps: best val_acc 0.9 (2/4 done)")
    assert progress.status_line() == ("1 running, 2 done (1 completed, 1 stopped), 0 failed, 1 pending; "
                                      "best val_acc 0.9 (nystrom_b2)")
    assert ended == [("cg_a1", "stopped", None), ("nystrom_b2", "completed", None)]


def test_best_skips_a_trial_that_failed_after_a_good_start():
    """Why best_row stays ours (see its docstring): Tune's ranking would pick the failed trial."""
    from hg_dist.tune.results import best_row, make_table

    rows = [{"trial": "a", "status": "failed", "best_metric": 9.0, "error": "TrialDivergedError: ..."},
            {"trial": "b", "status": "stopped", "best_metric": 2.0},
            {"trial": "c", "status": "completed", "best_metric": 3.0},
            {"trial": "d", "status": "interrupted", "best_metric": None}]
    table = make_table(rows, "score", "max")
    assert best_row(table)["trial"] == "c"
    assert best_row(make_table(rows, "score", "min"))["trial"] == "b"


def test_plot_envelope_and_png(tmp_path):
    import pandas as pd

    from hg_dist.tune.plots import best_envelope, plot_search

    assert best_envelope([[(1, 0.5), (3, 0.7)], [(2, 0.6), (4, 0.65)]], "max") == [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert best_envelope([[(1, 0.5), (3, 0.7)]], "min") == [(1, 0.5)]
    frame = pd.DataFrame({"outer_step": [1, 2], "wall_time_s": [0.1, 0.2], "hvps_total": [3, 6],
                          "val_acc": [0.8, 0.9]})
    path = plot_search([{"name": "t", "method": "cg", "frame": frame}], tmp_path / "s.png", metric="val_acc",
                       mode="max")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_search([{"name": "t", "method": "cg", "frame": None}], tmp_path / "n.png", metric="val_acc",
                       mode="max") is None


@pytest.mark.ray
def test_solver_reference_is_relative_to_the_project_and_reruns_elsewhere(tmp_path):
    """best_config.json names build_solver as module:function under the project (the main job imports
    data_hypercleaning from examples/ on its path); `python -m hg_dist.tune.rerun` finds it from a checkout,
    and --build-solver overrides it."""
    import importlib
    import subprocess

    from hg_dist.tune import resolve_solver, solver_reference

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        hypercleaning = importlib.import_module("data_hypercleaning")
    finally:
        sys.path.remove(str(ROOT / "examples"))
    record = solver_reference(hypercleaning.build_solver)
    assert record == {"build_solver": "examples.data_hypercleaning:build_solver",
                      "imported_as": "data_hypercleaning:build_solver"}
    assert solver_reference(build_tiny)["build_solver"] == "tests.test_tune:build_tiny"
    with pytest.raises(ValueError, match="inside a function"):
        solver_reference(lambda config: None)
    assert resolve_solver("examples/data_hypercleaning.py:build_solver").__name__ == "build_solver"
    with pytest.raises(ImportError, match="--build-solver"):
        resolve_solver("nowhere.at_all:build_solver")

    # a best_config.json as a search on a cluster writes it (output paths of that machine), outside the checkout
    config = ExperimentConfig(approximator={"name": "cg", "num_iters": 3}, num_iters=20, unroll_steps=10,
                              output="/cluster/unpacked/runs/search/trials/x",
                              extra={"n_train": 60, "n_val": 30, "log_freq": 10})
    best = tmp_path / "elsewhere" / "best_config.json"
    best.parent.mkdir()
    best.write_text(json.dumps({"metric": "val_acc", "mode": "max", "value": 0.9, "trial": "x", **record,
                                "config": config.to_dict()}))
    assert str(ROOT) not in best.read_text()
    run = subprocess.run([sys.executable, "-m", "hg_dist.tune.rerun", str(best), "--output", str(tmp_path / "r")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "test_acc" in json.loads(run.stdout)
    assert (tmp_path / "r" / "result.json").exists()


# ---------------------------------------------------------------------------------------
# With Ray (shared local session): searches.
# ---------------------------------------------------------------------------------------


def _result_json(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


@pytest.mark.ray
def test_search_table_parquet_failures_and_rerun(ray_session, tmp_path):
    """5 trials, one per grid point (CG on 2 workers). The Neumann one diverges on purpose; the last one
    gets a bad value (workers=0) through tune.sample_from, which no check before Ray can see. Both fail
    alone, with their errors, and every other trial's results are kept. Neither is retried, although
    max_failures=1 lets Tune retry a trial: a retry would fail the same way."""
    space = {
        "approximator": tune.grid_search([
            {"name": "nystrom", "rank": tune.choice([2, 3]), "rho": tune.loguniform(0.05, 0.5)},
            {"name": "cg", "num_iters": tune.choice([3, 5]), "lr": 1.0},
            {"name": "nystrom_pcg", "rank": 2, "num_iters": 2},
            {"name": "neumann", "num_iters": 3, "lr": 0.1},
            {"name": "nystrom_pcg", "rank": 3, "num_iters": 2},
        ]),
        "outer_optimizer": tune.choice([{"name": "sgd", "lr": 0.05, "momentum": 0.5},
                                        {"name": "adam", "lr": 0.05}]),
        "extra": tune.sample_from(lambda spec: {"diverge_at": 2} if spec.config.approximator["name"] == "neumann"
                                  else {}),
        # the CG trial is a 2-worker Ray Train run; the rank-3 Nyström-PCG one gets workers=0
        "workers": tune.sample_from(lambda spec: {"cg": 2}.get(spec.config.approximator["name"],
                                                              0 if spec.config.approximator == {
                                                                  "name": "nystrom_pcg", "rank": 3,
                                                                  "num_iters": 2} else 1)),
        "num_iters": 30,
        "unroll_steps": 5,
    }
    run_config = dataclasses.replace(at(tmp_path / "search"), failure_config=tune.FailureConfig(max_failures=1))
    result = run_search(build_tiny, space, run_config=run_config,
                        tune_config=tune.TuneConfig(metric="outer_loss", mode="min", scheduler=FIFOScheduler()),
                        options=SearchOptions(cpus_per_worker=0.5, checkpoint_every=2))
    rows = result.table.to_pylist()
    assert len(rows) == 5 and not result.interrupted
    bad = next(row for row in rows if row["workers"] == 0)
    rows = {row["approx"]: row for row in rows if row is not bad}
    assert set(rows) == {"nystrom", "cg", "nystrom_pcg", "neumann"}
    # nesting: no trial carries another method's settings
    assert rows["nystrom"]["ihvp_iters"] is None and rows["nystrom"]["ihvp_lr"] is None
    assert rows["cg"]["rank"] is None and rows["cg"]["rho"] == 0.0
    assert rows["cg"]["workers"] == 2 and rows["nystrom"]["workers"] == 1
    # the failing trials are recorded with their errors; the others ran to the end
    assert rows["neumann"]["status"] == "failed" and "outer_loss" in rows["neumann"]["error"]
    assert bad["status"] == "failed" and "workers must be" in bad["error"] and bad["best_metric"] is None
    assert json.loads(bad["config"])["workers"] == 0
    trials = result.output / "trials"
    assert _result_json(trials / bad["trial"])["status"] == "failed"
    failures = {str(trial): trial.num_failures for trial in tune.ExperimentAnalysis(str(result.output)).trials}
    for row in (bad, rows["neumann"]):
        assert failures[row["trial"]] == 0 and _result_json(trials / row["trial"])["retried"] is False
    for name in ("nystrom", "cg", "nystrom_pcg"):
        row = rows[name]
        assert row["status"] == "completed" and row["error"] is None, row
        assert row["outer_steps"] == 5 and row["hvps"] > 0 and math.isfinite(row["best_metric"])
        folder = trials / row["trial"]
        assert _result_json(folder)["status"] == "completed"
        assert (folder / "tb").is_dir()
        # a history row at every outer step (rank 0 writes it inside the Train run for CG)
        outer = [r["outer_step"] for r in _rows(folder / "history.parquet") if r["outer_step"] is not None]
        assert sorted(set(outer)) == [1, 2, 3, 4, 5]
        assert json.loads(row["config"])["output"] == str(folder)
    assert rows["cg"]["hvps"] == 5 * json.loads(rows["cg"]["config"])["approximator"]["num_iters"]
    # one meaning per timing field: the table, the trial's result.json and its history agree on wall_time_s
    # (solving); startup_s (the 2-worker trial's Train workers starting, among others) is apart
    for name in ("nystrom", "cg", "nystrom_pcg"):
        row, folder = rows[name], trials / rows[name]["trial"]
        record = _result_json(folder)
        assert record["wall_time_s"] == pytest.approx(row["wall_time_s"]), name
        assert record["startup_s"] == pytest.approx(row["startup_s"]) and row["startup_s"] >= 0, name
        clock = [r["wall_time_s"] for r in _rows(folder / "history.parquet") if r.get("wall_time_s") is not None]
        assert max(clock) == pytest.approx(row["wall_time_s"]), name
    assert rows["cg"]["startup_s"] > 1.0
    # Ray's own tools read the search folder: it is Tune's experiment folder; the completed trials'
    # checkpoints (the best one's included) are Tune's
    analysis = tune.ExperimentAnalysis(str(result.output))
    assert {Path(trial.path).name for trial in analysis.trials} == {row["trial"] for row in result.table.to_pylist()}
    assert tune.Tuner.can_restore(str(result.output))
    for trial in analysis.trials:
        if Path(trial.path).name in {rows[name]["trial"] for name in ("nystrom", "cg", "nystrom_pcg")}:
            checkpoint = analysis.get_best_checkpoint(trial, metric="outer_loss", mode="min")
            assert checkpoint is not None and os.listdir(checkpoint.path), trial
    best = next(r for r in result.result_grid if Path(r.path).name == result.best["trial"])
    assert best.checkpoint is not None
    if result.best["workers"] == 1:
        assert (Path(best.checkpoint.path) / "solver.pt").exists()
    on_disk = pq.read_table(result.output / "results.parquet")
    assert on_disk.num_rows == 5 and on_disk.column_names == result.table.column_names
    assert "best_outer_loss" in str(result) and (result.output / "results.txt").exists()
    assert (result.output / "search.png").read_bytes()[:4] == b"\x89PNG"
    # the best config re-runs as saved
    config, record = load_best(result.output / "best_config.json")
    assert record["trial"] == result.best["trial"] and config.approximator["name"] == result.best["approx"]
    assert record["build_solver"] == "tests.test_tune:build_tiny"
    assert json.loads(result.best["config"])["approximator"] == config.approximator
    # build_solver (build_tiny) is found from the saved record; one worker keeps it quick
    metrics = rerun_best(result.output / "best_config.json", workers=1)
    assert math.isfinite(metrics["outer_loss"])
    assert (result.output / "best_rerun" / "result.json").exists()
    # the folder now holds a search: a new one there is refused, naming both ways on
    with pytest.raises(SearchExistsError, match=r"--resume.*--output"):
        run_search(build_tiny, space, run_config=at(tmp_path / "search"))


@pytest.mark.ray
def test_asha_stops_a_multi_worker_trial_which_keeps_its_history(ray_session, tmp_path):
    """A constructed case: score = quality · outer_step, trials one at a time, best first. ASHA stops the
    2-worker trial at its first rung (outer step 3); its history (written by rank 0 inside the Train run)
    and TensorBoard events hold every outer step it made, its result.json says `stopped`, and its workers'
    placement group is released (the next search still gets every CPU)."""
    space = {
        "approximator": {"name": "cg", "num_iters": 2, "lr": 1.0},
        "outer_optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.0},
        "extra": {"quality": tune.grid_search([1.0, 0.5, 0.1])},
        "workers": tune.sample_from(lambda spec: 2 if spec.config.extra["quality"] == 0.1 else 1),
        "num_iters": 46,
        "unroll_steps": 5,
    }
    result = run_search(build_tiny, space, run_config=at(tmp_path / "asha"),
                        tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=1,
                                                    scheduler=default_scheduler(grace_period=3, reduction_factor=2)),
                        options=SearchOptions(cpus_per_worker=0.5, print_table=False))
    rows = {json.loads(row["config"])["extra"]["quality"]: row for row in result.table.to_pylist()}
    assert rows[1.0]["status"] == "completed" and rows[1.0]["outer_steps"] == 9
    stopped = rows[0.1]
    assert stopped["status"] == "stopped" and stopped["workers"] == 2 and 3 <= stopped["outer_steps"] < 9
    folder = result.output / "trials" / stopped["trial"]
    assert _result_json(folder)["status"] == "stopped"
    outer = sorted({r["outer_step"] for r in _rows(folder / "history.parquet") if r["outer_step"] is not None})
    assert outer == list(range(1, stopped["outer_steps"] + 1))   # it ends where Tune stopped the trial
    pairs = [(tag, step) for tag, step, _ in _scalars(folder / "tb")]
    assert pairs and len(pairs) == len(set(pairs))                  # one TensorBoard point per metric and step
    assert sum(f.stat().st_size for f in (folder / "tb").glob("events.out.tfevents.*")) > 100
    assert not (folder / ".train_placement_group").exists()
    import ray.util

    held = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    assert held == [], held


@pytest.mark.ray
def test_optuna_search_to_a_file_uri(ray_session, tmp_path):
    """--search optuna with --output file://...: Tune's storage is the URI; the tables, best config, plot
    and each trial's files (synced by Tune) are there. One trial fails once at outer step 3 and, with
    max_failures=1, Tune retries it from its trial checkpoint (outer step 2), not from the start."""
    pytest.importorskip("optuna")
    space = {**SPACE, "approximator": tune.choice([
        {"name": "nystrom", "rank": tune.choice([2, 3]), "rho": tune.loguniform(0.05, 0.5)},
        {"name": "cg", "num_iters": tune.choice([3, 5]), "lr": 1.0}]),
        "extra": {"fail_once_at": 3, "marker": str(tmp_path / "failed_once")}}
    uri = f"file://{tmp_path / 'uri'}"
    result = run_search(build_tiny, space,
                        tune_config=tune.TuneConfig(metric="outer_loss", mode="min", num_samples=3,
                                                    scheduler=FIFOScheduler()),
                        run_config=tune.RunConfig(storage_path=f"file://{tmp_path}", name="uri",
                                                  failure_config=tune.FailureConfig(max_failures=1)),
                        options=SearchOptions(search="optuna", cpus_per_worker=0.5, checkpoint_every=2,
                                              print_table=False))
    assert result.output == uri
    root = tmp_path / "uri"
    table = pq.read_table(root / "results.parquet").to_pylist()
    assert len(table) == 3 and {row["status"] for row in table} == {"completed"}
    for sampled in (trial.config for trial in result.result_grid):
        _check_nested(sampled)
    resumed = []
    for row in table:
        files = root / row["trial"] / "run"
        record = _result_json(files)
        assert record["status"] == "completed"
        resumed.append(record.get("resumed_from_outer_step"))
        outer = sorted({r["outer_step"] for r in _rows(files / "history.parquet") if r["outer_step"] is not None})
        assert outer == [1, 2, 3, 4, 5]
    assert (tmp_path / "failed_once").exists() and sorted(resumed, key=str) == [2, None, None]
    assert json.loads((root / "search.json").read_text())["search"] == "optuna"
    assert load_best(f"{uri}/best_config.json")[1]["trial"] == result.best["trial"]
    assert (root / "search.png").exists()


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _left_behind(pids: set[int], wait: float) -> list[str]:
    """The command lines of ``pids`` still alive after up to ``wait`` seconds."""
    import time

    deadline = time.monotonic() + max(wait, 0.0)
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for pid in pids:
        if _alive(pid):
            try:
                left.append(f"{pid}: {Path(f'/proc/{pid}/cmdline').read_bytes()[:100]!r}")
            except OSError:
                pass
    return left


def _run_main_job(args: list[str], *, interrupt_after: str | None, timeout: float = 400) -> tuple[int, str, float,
                                                                                                     set[int]]:
    """Run examples/search.py as a user would (no RAY_* variables set); with ``interrupt_after``, send SIGINT
    once a line contains it. While it runs, its Ray must listen on 127.0.0.1 only (tests/loopback.py).

    Returns ``(exit code, output, seconds from SIGINT to exit, every process it started)``.
    """
    import signal
    import subprocess
    import time

    from loopback import ListeningSockets, clean_env

    process = subprocess.Popen([sys.executable, str(SEARCH_PY), *args], cwd=ROOT, env=clean_env(PYTHONUNBUFFERED="1"),
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: set[int] = set()
    lines: list[str] = []
    stopped_at = None
    deadline = time.monotonic() + timeout
    try:
        with ListeningSockets(process.pid) as sockets:
            for line in process.stdout:
                lines.append(line)
                seen |= _descendants(process.pid)
                if interrupt_after is not None and stopped_at is None and interrupt_after in line:
                    seen |= _descendants(process.pid)
                    stopped_at = time.monotonic()
                    process.send_signal(signal.SIGINT)
                if time.monotonic() > deadline:
                    break
            code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    sockets.assert_loopback_only("examples/search.py")
    text = "".join(lines)
    assert "\x1b[" not in text, "colour codes in the main job's output (not a terminal)"
    assert "Token authentication is enabled" not in text and "startup concurrency" not in text
    elapsed = time.monotonic() - stopped_at if stopped_at is not None else 0.0
    return code, text, elapsed, seen


def _fingerprint(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.ray
def test_main_job_interrupt_then_resume(tmp_path):
    """Ctrl-C on examples/search.py (Optuna searcher; its Ray on 127.0.0.1 only, no colour codes, no Ray noise):
    exit 130 within 10 s with the command that continues, no process left; `--resume` then keeps every
    finished trial as it was (never rerun), continues the others from their trial checkpoints (the
    searcher's state restored), and rebuilds a complete table."""
    output = tmp_path / "search"
    args = ["--search", "optuna", "--workers", "1", "--num-samples", "3", "--num-iters", "120", "--unroll-steps",
            "5", "--n-train", "150", "--num-cpus", "1", "--checkpoint-every", "2", "--progress-interval", "5",
            "--output", str(output)]
    code, text, elapsed, processes = _run_main_job(args, interrupt_after="done)")
    assert code == 130, text[-3000:]
    assert elapsed < 10, f"took {elapsed:.1f} s to stop"
    assert "continue it with" in text and "--resume" in text
    assert processes and not _left_behind(processes, 10 - elapsed)
    table = pq.read_table(output / "results.parquet").to_pylist()
    finished = {row["trial"] for row in table if row["status"] in ("completed", "stopped", "failed")}
    unfinished = {row["trial"] for row in table} - finished
    assert finished and {row["status"] for row in table if row["trial"] in unfinished} <= {"interrupted",
                                                                                             "pending"}
    kept = {name: _fingerprint(output / "trials" / name) for name in finished}
    # (a trial may have ended its solve just before Tune, stopping, could note it: it says so itself)
    checkpointed = {name for name in unfinished if list((output / name).glob("checkpoint_*"))
                    and (output / "trials" / name / "result.json").exists()
                    and _result_json(output / "trials" / name)["status"] == "interrupted"}

    code, text, _, processes = _run_main_job([*args, "--resume"], interrupt_after=None)
    assert code == 0, text[-3000:]
    assert not _left_behind(processes, 10)
    table = pq.read_table(output / "results.parquet").to_pylist()
    assert len(table) == 3 and {row["status"] for row in table} <= {"completed", "stopped"}
    for name, files in kept.items():                 # finished trials: not one byte rewritten
        assert _fingerprint(output / "trials" / name) == files
    for name in unfinished:
        record = _result_json(output / "trials" / name)
        assert record["status"] in ("completed", "stopped")
        outer = sorted({r["outer_step"] for r in _rows(output / "trials" / name / "history.parquet")
                        if r["outer_step"] is not None})
        assert outer == list(range(1, len(outer) + 1))     # continued without a gap
        if name in checkpointed:                           # from its last trial checkpoint, not from zero
            assert record["resumed_from_outer_step"] >= 2
    best = json.loads((output / "best_config.json").read_text())
    assert best["trial"] in {row["trial"] for row in table}
    assert best["build_solver"] == "examples.data_hypercleaning:build_solver"


@pytest.mark.parametrize("uri", [False, True])
def test_a_scheduler_stop_outranks_the_failure_its_teardown_caused(tmp_path, uri):
    """ASHA stops a 2-worker trial; removing its workers can make the trial's Train run raise, and
    the trial may write ``failed`` before the search records ``stopped``. ``stopped`` (Tune ended
    the trial without an error) wins over such a ``failed``, keeping its text aside; a trial's own
    ``completed`` and, for other endings, its ``failed`` are kept."""
    from types import SimpleNamespace

    from hg_dist.tune.search import _record_status
    from hg_dist.tune.storage import SearchStorage

    storage = SearchStorage.parse(f"file://{tmp_path}" if uri else tmp_path)
    trial = SimpleNamespace(last_result={"score": 1.5, "outer_step": 3}, path=str(tmp_path / "trial"))
    output = tmp_path / "trial" / "run"
    output.mkdir(parents=True)
    result = output / "result.json"

    def record(before: dict, status: str) -> dict:
        result.write_text(json.dumps(before))
        _record_status(storage, trial, str(output), status, None)
        return json.loads(result.read_text())

    torn_down = {"status": "failed", "error": "RayActorError: the worker died", "metrics": {"score": 1.5}}
    after = record(torn_down, "stopped")
    assert after["status"] == "stopped" and after["error"] is None
    assert after["error_while_stopped"] == "RayActorError: the worker died"
    assert record({"status": "completed"}, "stopped") == {"status": "completed"}
    assert record(torn_down, "interrupted") == torn_down
    assert record({}, "stopped") == {"status": "stopped", "metrics": {"score": 1.5, "outer_step": 3}}


def test_a_train_run_torn_down_by_a_stop_keeps_the_stopped_status(tmp_path):
    """The other order: the search writes ``stopped`` first, then the trial's Train run raises as its
    workers go; the distributed runner's ending keeps ``stopped`` and files the error aside."""
    from types import SimpleNamespace

    from hg_dist.distributed.runner import write_ending

    (tmp_path / "result.json").write_text(json.dumps({"status": "stopped", "metrics": {"score": 1.5}}))
    job = SimpleNamespace(config=SimpleNamespace(output=str(tmp_path)))
    write_ending(job, None, 2, "failed", RuntimeError("the worker group was removed"))
    record = json.loads((tmp_path / "result.json").read_text())
    assert record == {"status": "stopped", "metrics": {"score": 1.5},
                      "error_while_stopped": "RuntimeError: the worker group was removed"}


def test_a_failure_the_stop_caused_after_the_search_wrote_stopped_keeps_it(tmp_path):
    """The order seen in a resumed search: Tune stops a one-worker trial and the search writes ``stopped``; the
    trial's thread, still running, then fails as Tune tears its session down. Neither the run's own ending
    (run_local) nor the trial's failure record replaces ``stopped``: the error is filed aside."""
    from types import SimpleNamespace

    from hg_dist.callbacks import Callback
    from hg_dist.experiment import run_local
    from hg_dist.tune.search import _record_status
    from hg_dist.tune.storage import SearchStorage

    output = tmp_path / "trial"
    config = ExperimentConfig(approximator={"name": "cg", "num_iters": 2}, num_iters=20, unroll_steps=5,
                              output=str(output))
    trial = SimpleNamespace(last_result={"outer_loss": 1.5, "outer_step": 2}, path=str(tmp_path))

    class StoppedThenTornDown(Callback):
        def on_outer_step(self, solver, metrics):
            if solver.outer_step == 2:
                _record_status(SearchStorage.parse(tmp_path), trial, str(output), "stopped", None)
                raise AttributeError("'NoneType' object has no attribute 'close'")

    with pytest.raises(AttributeError):
        run_local(build_tiny, config, callbacks=(StoppedThenTornDown(),), progress=False)
    record = _result_json(output)
    assert record["status"] == "stopped" and record.get("error") is None
    assert record["error_while_stopped"] == "AttributeError: 'NoneType' object has no attribute 'close'"

    # A run that fails on its own (no stop written) still says failed.
    config = dataclasses.replace(config, output=str(tmp_path / "own"))

    class Fails(Callback):
        def on_outer_step(self, solver, metrics):
            raise AttributeError("its own error")

    with pytest.raises(AttributeError):
        run_local(build_tiny, config, callbacks=(Fails(),), progress=False)
    assert _result_json(tmp_path / "own")["status"] == "failed"


def test_result_json_updates_from_two_processes_are_never_lost(tmp_path):
    """merge_json is one step among processes: two processes adding 1 to a counter 150 times each end at 300
    (a read-then-replace without the lock loses updates here)."""
    import multiprocessing

    from hg_dist.atomic import merge_json

    path = tmp_path / "result.json"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_one_times, args=(path, 150)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert json.loads(path.read_text())["count"] == 300
    assert merge_json(path, lambda current: None) == {"count": 300}    # None: left as it is


def _add_one_times(path: Path, times: int) -> None:
    from hg_dist.atomic import merge_json

    for _ in range(times):
        merge_json(path, lambda current: {"count": current.get("count", 0) + 1})
