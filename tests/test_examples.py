"""The examples: main() with tiny settings writes the outputs; hypercleaning beats plain training;
two Ray Train workers reproduce one process (every example, in float64)."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from hg_dist.callbacks import Callback
from hg_dist.distributed import Every

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytest.importorskip("sklearn")


def load_example(name: str):
    """Import ``examples/<name>.py`` as the module ``example_<name>`` (registered in ``sys.modules``,
    so that Ray can ship it to workers by value)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TINY = {
    "logistic_regression": ["--num-iters", "40", "--unroll-steps", "10"],
    "data_hypercleaning": ["--num-iters", "40", "--unroll-steps", "10", "--n-train", "200"],
    "dataset_distillation": ["--num-iters", "30", "--unroll-steps", "10", "--eval-steps", "20"],
}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("approx", ["nystrom", "cg"])
def test_example_main_writes_history_result_and_tensorboard(name, approx, tmp_path, capsys):
    import pyarrow.parquet as pq

    module = load_example(name)
    assert callable(module.build_solver) and callable(module.main)
    settings = ["--ihvp-iters", "3"] if approx == "cg" else ["--rank", "3"]
    if approx == "cg" and name == "dataset_distillation":
        settings += ["--rho", "1"]  # the convnet's Hessian is indefinite: undamped CG raises IHVPDivergenceError
    metrics = module.main(TINY[name] + ["--approx", approx, *settings, "--output", str(tmp_path)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["metrics"] == metrics
    assert result["config"]["approximator"]["name"] == approx and result["config"]["num_iters"] == int(TINY[name][1])
    rows = pq.read_table(tmp_path / "history.parquet").to_pylist()
    assert rows[-1]["step"] == int(TINY[name][1]) and rows[-1]["outer_step"] >= 2
    assert rows[-1]["outer_loss"] is not None and rows[-1]["inner_loss"] is not None
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "test_acc" in metrics and 0 <= metrics["test_acc"] <= 1
    assert json.loads(capsys.readouterr().out) == metrics


def test_hypercleaning_beats_plain_training(tmp_path):
    module = load_example("data_hypercleaning")
    metrics = module.main(["--num-iters", "250", "--output", str(tmp_path)])
    assert metrics["val_acc"] > metrics["baseline_val_acc"] + 0.05
    assert metrics["test_acc"] > metrics["baseline_test_acc"] + 0.05
    assert metrics["weight_corrupted_mean"] < metrics["weight_clean_mean"] - 0.2
    result = json.loads((tmp_path / "result.json").read_text())["metrics"]
    assert result["baseline_test_acc"] == metrics["baseline_test_acc"]


def test_main_hands_the_config_to_run_experiment(tmp_path, monkeypatch):
    """``--workers N`` reaches ``hg_dist.distributed.run_experiment`` (which runs in
    this process for N = 1 and on Ray Train otherwise; tested in test_distributed)."""
    import hg_dist.cli

    calls = []
    module = load_example("logistic_regression")
    monkeypatch.setattr(hg_dist.cli, "run_experiment",
                        lambda build_solver, config, **kwargs: calls.append((build_solver, config, kwargs))
                        or {"done": 1.0})
    assert module.main(["--workers", "2", "--output", str(tmp_path)]) == {"done": 1.0}
    assert module.main(["--workers", "2", "--output", str(tmp_path), "--max-failures", "3", "--report-every", "5",
                        "--checkpoint-every", "2m", "--batch-size", "20"]) == {"done": 1.0}
    (build_solver, config, default), (_, custom, train) = calls
    assert build_solver is module.build_solver and config.workers == 2
    assert default["run_config"] is None                        # fit picks the cluster's restarts
    assert (default["options"].report_every, default["options"].checkpoint_every) == (Every(seconds=60),
                                                                                       Every(seconds=300))
    run_config = train["run_config"]                            # --max-failures: a ray.train.RunConfig
    assert type(run_config).__module__.startswith("ray.train") and run_config.failure_config.max_failures == 3
    assert run_config.storage_path == str((tmp_path / "ray").resolve()) and run_config.name == "hg_dist"
    assert (train["options"].report_every, train["options"].checkpoint_every) == (Every(steps=5), Every(seconds=120))
    assert custom.extra["batch_size"] == 20                     # the example's own flags reach extra ...
    assert not {"max_failures", "report_every", "checkpoint_every"} & set(custom.extra)   # ... the Train flags do not


def test_a_run_the_workers_ended_on_an_error_exits_1_with_one_line(tmp_path, monkeypatch, capsys):
    import hg_dist.cli
    from hg_dist.distributed import RunFailedError

    def fail(build_solver, config, **kwargs):
        raise RunFailedError("NonFiniteLossError: inner_update at step 2 returned non-finite inner_loss")
    monkeypatch.setattr(hg_dist.cli, "run_experiment", fail)
    with pytest.raises(SystemExit) as exit_info:
        load_example("logistic_regression").main(["--workers", "2", "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "error: NonFiniteLossError: inner_update at step 2" in err
    assert "not retried" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--report-every", "0"], "--report-every"),
    (["--checkpoint-every", "1.5"], "outer steps must be an int"),
    (["--checkpoint-every", "soon"], "e.g. 30s"),
    (["--max-failures", "-2"], "--max-failures"),
])
def test_bad_train_flags_are_usage_errors(flags, message, capsys):
    module = load_example("logistic_regression")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--workers", "2", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_build_solver_shards_the_data_by_rank():
    from hg_dist.experiment import ExperimentConfig

    module = load_example("data_hypercleaning")
    config = ExperimentConfig(num_iters=20, unroll_steps=10, extra={"n_train": 200})
    shards = [module.build_solver(config, rank=r, world_size=2) for r in range(2)]
    index = [set(next(s.inner_loader)[2].tolist()) for s in shards]
    assert index[0].isdisjoint(index[1]) and index[0] | index[1] == set(range(200))


# ---------------------------------------------------------------------------------------
# W = 2 Ray Train workers reproduce W = 1, for every example (float64, real Train run)
# ---------------------------------------------------------------------------------------

class SaveFinal(Callback):
    """Writes ``final_rank<r>.pt`` (inner parameters, outer state) to the run's output at its end."""

    def __init__(self, folder: str, rank: int) -> None:
        self.path = Path(folder) / f"final_rank{rank}.pt"

    def on_run_end(self, solver, error) -> None:
        if error is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"inner": [p.detach().cpu() for p in solver.inner_params],
                        "outer": {k: v.detach().cpu() for k, v in solver.outer.state_dict().items()}}, self.path)


def build_float64(build_solver, config, rank: int = 0, world_size: int = 1):
    """The example's solver in float64 (Train workers default to float32), saving its final state."""
    torch.set_default_dtype(torch.float64)
    solver = build_solver(config, rank=rank, world_size=world_size)
    solver.callbacks = (*solver.callbacks, SaveFinal(config.output, rank))
    return solver


def run_jobs(loop_config: dict) -> None:
    """One Train worker group runs several jobs, one after the other (the start-up is paid once)."""
    from hg_dist.distributed.train_loop import train_loop

    for job in loop_config["jobs"]:
        train_loop({"job": job})


W_INVARIANCE = {   # example: (approximator, settings of its own); a few outer steps on little data
    "logistic_regression": ({"name": "nystrom", "rank": 3, "rho": 0.1}, {"n_train": 100, "batch_size": 50}),
    "data_hypercleaning": ({"name": "cg", "num_iters": 3}, {"n_train": 200, "batch_size": 100, "n_val": 100}),
    "dataset_distillation": ({"name": "nystrom", "rank": 3, "rho": 0.1}, {"n_train": 400, "batch_size": 128,
                                                                          "eval_steps": 20}),
}
TIMINGS = ("step_time", "outer_step_time")


def _close(a: float, b: float, tol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def test_two_train_workers_reproduce_one_process_for_every_example(tmp_path, ray_session):
    """All three examples on 2 Ray Train workers (one worker group) vs one process, float64:
    final inner and outer parameters to 1e-6, replicas identical, the recorded history and final
    metrics (losses, accuracies) equal too, and each rank's loader/RNG state in every checkpoint."""
    import pyarrow.parquet as pq
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from hg_dist.distributed import FitOptions
    from hg_dist.distributed.train_loop import Job
    from hg_dist.experiment import ExperimentConfig, run_local

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    builds, jobs, singles = {}, [], {}
    options = FitOptions(checkpoint_every=2)                                          # reports: 2 + final
    for name, (approx, extra) in W_INVARIANCE.items():
        module = load_example(name)
        ray.cloudpickle.register_pickle_by_value(module)
        builds[name] = functools.partial(build_float64, module.build_solver)
        config = ExperimentConfig(approximator=approx, outer_optimizer=module.DEFAULTS.outer_optimizer,
                                  num_iters=30, unroll_steps=5, seed=3, output=str(tmp_path / name / "w2"),
                                  workers=2, extra={**extra, "log_freq": 10})
        jobs.append(Job(builds[name], config, options))
        single = ExperimentConfig(**{**config.to_dict(), "workers": 1, "output": str(tmp_path / name / "w1")})
        singles[name] = (run_local(builds[name], single), single)

    trainer = TorchTrainer(run_jobs, train_loop_config={"jobs": jobs},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=RunConfig(name="examples", storage_path=str(tmp_path / "ray")))
    result = trainer.fit()
    assert result.error is None
    with result.checkpoint.as_directory() as folder:   # every rank added its own part to the checkpoint
        assert {"solver.pt", "rank0.pt", "rank1.pt", "run.json"} <= {p.name for p in Path(folder).iterdir()}

    for name, job in zip(W_INVARIANCE, jobs):
        w1_metrics, single = singles[name]
        out2, out1 = Path(job.config.output), Path(single.output)
        rank0, rank1 = (torch.load(out2 / f"final_rank{r}.pt") for r in range(2))
        one = torch.load(out1 / "final_rank0.pt")
        for a, b in zip(rank0["inner"], rank1["inner"]):
            assert torch.equal(a, b), name                                # replicas identical
        for a, b in zip(rank0["inner"], one["inner"]):
            assert a.dtype == torch.float64 and float((a - b).norm() / b.norm()) <= 1e-6, name
        for key, value in one["outer"].items():
            assert float((rank0["outer"][key] - value).norm() / value.norm()) <= 1e-6, (name, key)

        written = json.loads((out2 / "result.json").read_text())
        assert written["status"] == "completed" and written["error"] is None and written["workers"] == 2
        assert written["reports"] == 3                                   # outer steps 2 and 4 of 5, and the end
        w2_metrics = written["metrics"]
        compared = [k for k in w1_metrics if k not in TIMINGS]
        assert {"inner_loss", "outer_loss", "test_acc"} <= set(compared)
        for key in compared:
            assert _close(w2_metrics[key], w1_metrics[key]), (name, key, w2_metrics[key], w1_metrics[key])
        rows1 = pq.read_table(out1 / "history.parquet").to_pylist()
        rows2 = pq.read_table(out2 / "history.parquet").to_pylist()
        assert [r["step"] for r in rows2] == [r["step"] for r in rows1] == [10, 20, 30]
        for r1, r2 in zip(rows1, rows2):
            for key in ("inner_loss", "outer_loss"):
                if r1[key] is not None:
                    assert _close(r2[key], r1[key]), (name, r1["step"], key)


@pytest.mark.ray
def test_train_loop_example_on_two_ray_train_workers_equals_one_process(tmp_path, ray_session, monkeypatch):
    """examples/train_loop.py, the Ray Train loop written out: 2 workers (TorchTrainer, ScalingConfig,
    RunConfig) end with the parameters and the outer loss of the same solve in one process, and its
    checkpoints (every outer step and at the end, 2 kept) are in <output>/<name>."""
    import ray.cloudpickle

    from hg_dist.distributed import read_checkpoint

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")     # reports are collected sooner
    module = load_example("train_loop")
    ray.cloudpickle.register_pickle_by_value(module)
    settings = {**module.SETTINGS, "num_iters": 21, "unroll_steps": 10, "checkpoint_every": 1}
    argv = ["--workers", "2", "--cpus-per-worker", "0.5", "--output", str(tmp_path), "--num-iters", "21",
            "--unroll-steps", "10", "--checkpoint-every", "1"]
    result = module.main(argv)
    assert result.error is None
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)                                 # as on the workers
    try:
        single = module.solve_here(settings)
    finally:
        torch.set_default_dtype(default_dtype)
    state = read_checkpoint(result.checkpoint)
    assert state["counters"]["outer_step"] == single.outer_step == 2
    assert torch.allclose(state["outer"]["log_decay"], single.outer.log_decay.detach(), rtol=1e-4, atol=1e-6)
    assert torch.allclose(state["inner_params"][0], single.inner_params[0], rtol=1e-4, atol=1e-6)
    assert result.metrics["outer_loss"] == pytest.approx(single.recorder.latest()["outer_loss"], rel=1e-4)
    kept = sorted(path.name for path in (tmp_path / "train_loop").glob("checkpoint_*") if path.is_dir())
    assert len(kept) == 2, kept                                           # 3 reported (steps 1, 2, end), 2 kept
