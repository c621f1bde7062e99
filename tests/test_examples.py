"""The examples: main() with tiny settings writes the outputs; hypercleaning beats plain training."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytest.importorskip("sklearn")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
                        lambda build_solver, config, settings=None: calls.append((build_solver, config))
                        or {"done": 1.0})
    assert module.main(["--workers", "2", "--output", str(tmp_path)]) == {"done": 1.0}
    (build_solver, config), = calls
    assert build_solver is module.build_solver and config.workers == 2


def test_build_solver_shards_the_data_by_rank():
    from hg_dist.experiment import ExperimentConfig

    module = load_example("data_hypercleaning")
    config = ExperimentConfig(num_iters=20, unroll_steps=10, extra={"n_train": 200})
    shards = [module.build_solver(config, rank=r, world_size=2) for r in range(2)]
    index = [set(next(s.inner_loader)[2].tolist()) for s in shards]
    assert index[0].isdisjoint(index[1]) and index[0] | index[1] == set(range(200))
