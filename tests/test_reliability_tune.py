"""Reliability matrix, searches: every bad input ends in a clear error before anything is written.

Each case asserts the exception type (or exit code), that the message names the cause,
and that the folder it was pointed at is exactly as before (nothing created, nothing
changed). The command-line cases call ``examples/search.py``'s ``main`` in this process
(they all stop before Ray starts); the unreachable cluster runs it as a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from ray import tune  # noqa: E402

from hg_dist.tune import SearchExistsError, SearchOptions, run_search  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEARCH_PY = ROOT / "examples" / "search.py"

SPACE = {"approximator": {"name": "cg", "num_iters": 3}, "outer_optimizer": {"name": "adam", "lr": 0.01},
         "num_iters": 20, "unroll_steps": 5}


def _main_job():
    spec = importlib.util.spec_from_file_location("search_main_job", SEARCH_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


def _build(config, rank=0, world_size=1):  # never called: every case fails before a trial starts
    raise AssertionError("a trial started")


@pytest.fixture
def fake_search(tmp_path):
    """A folder holding a search (its marker), as a search started with the default flags leaves it."""
    folder = tmp_path / "old"
    folder.mkdir()
    settings = {"num_samples": 3, "workers": [1, 2], "num_iters": 400, "unroll_steps": 10, "n_train": 1000,
                "search": "random", "cpus_per_worker": 0.5, "use_gpu": False, "max_failures": 0,
                "checkpoint_every": 5, "seed": 0}
    (folder / "search.json").write_text(json.dumps({"format": 1, "metric": "val_acc", "mode": "max",
                                                    "search": "random", "num_samples": 3, "settings": settings}))
    (folder / "results.txt").write_text("the old table\n")
    return folder


CLI_CASES = [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--search", "bogus"], "invalid choice: 'bogus'"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--max-failures", "-1"], "--max-failures must be >= 0"),
    (["--cpus-per-worker", "0"], "--cpus-per-worker must be > 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1"),
    (["--num-iters", "0"], "num_iters must be >= 1"),
    (["--num-iters", "20", "--unroll-steps", "50"], "unroll_steps must be in [1, 20], got 50"),
    (["--output", "foo://bucket/search"], "cannot open foo:// URIs"),
]


@pytest.mark.parametrize("argv, message", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_search_cli_refuses_bad_flags_before_writing(argv, message, tmp_path, capsys):
    main = _main_job().main
    output = tmp_path / "search"
    before = _snapshot(tmp_path)
    full = argv if "--output" in argv else [*argv, "--output", str(output)]
    with pytest.raises(SystemExit) as exit_info:
        main(full)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert _snapshot(tmp_path) == before and not output.exists()


def test_search_cli_refuses_an_output_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        _main_job().main(["--output", str(target)])
    assert exit_info.value.code == 2 and "is a file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_search_cli_refuses_a_folder_holding_a_search_without_resume(fake_search, capsys):
    before = _snapshot(fake_search)
    with pytest.raises(SystemExit) as exit_info:
        _main_job().main(["--output", str(fake_search)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "already holds a search" in err
    assert "--resume" in err and "--output" in err                 # both ways on are named
    assert _snapshot(fake_search) == before


def test_search_cli_resume_needs_a_search(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        _main_job().main(["--output", str(empty), "--resume"])
    assert exit_info.value.code == 2 and "no search to resume" in capsys.readouterr().err
    assert list(empty.iterdir()) == []


def test_search_cli_resume_refuses_different_settings(fake_search, capsys):
    before = _snapshot(fake_search)
    with pytest.raises(SystemExit) as exit_info:
        _main_job().main(["--output", str(fake_search), "--resume", "--num-iters", "50"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--num-iters 50 differs" in err and "--num-iters 400" in err
    assert _snapshot(fake_search) == before


def test_run_search_refuses_a_choice_value_out_of_range(tmp_path):
    space = {**SPACE, "approximator": {"name": "nystrom", "rank": 3, "rho": tune.choice([0.0, 0.1])}}
    with pytest.raises(ValueError, match=r"rho must be > 0, got 0.0 \(nystrom\)"):
        run_search(_build, space, run_config=_at(tmp_path / "s"))
    assert list(tmp_path.iterdir()) == []


def test_run_search_refuses_what_optuna_cannot_sample(tmp_path):
    space = {**SPACE, "extra": tune.sample_from(lambda spec: {"noise": 0.1})}
    with pytest.raises(ValueError, match=r"space\['extra'\] is a tune.sample_from"):
        run_search(_build, space, run_config=_at(tmp_path / "s"), options=SearchOptions(search="optuna"))
    assert list(tmp_path.iterdir()) == []


def _at(folder: Path) -> tune.RunConfig:
    return tune.RunConfig(storage_path=str(folder.parent), name=folder.name)


@pytest.mark.parametrize("make, error, message", [
    (lambda: {"tune_config": tune.TuneConfig(mode="maximize")}, ValueError, "mode must be 'max' or 'min'"),
    (lambda: {"options": SearchOptions(search="grid")}, ValueError, "search must be one of"),
    (lambda: {"run_config": tune.RunConfig(failure_config=tune.FailureConfig(max_failures=-2))}, ValueError,
     "max_failures must be an int >= 0"),
    (lambda: {"options": SearchOptions(checkpoint_every=0)}, ValueError, "checkpoint_every must be an int >= 1"),
    (lambda: {"options": SearchOptions(cpus_per_worker=0)}, ValueError, "cpus_per_worker must be a number > 0"),
    (lambda: {"tune_config": tune.TuneConfig(num_samples=0)}, ValueError, "num_samples must be an int >= 1"),
    (lambda: {"run_config": tune.RunConfig(storage_path="foo://bucket", name="x")}, ValueError,
     "cannot open foo:// URIs"),
    (lambda: {"run_config": tune.RunConfig(name="a/b")}, ValueError, "run_config.name must be one folder name"),
    (lambda: {"tune_config": tune.TuneConfig(trial_name_creator=str)}, ValueError, "hg_dist names each trial"),
    (lambda: {"run_config": {"name": "x"}}, TypeError, "run_config must be a ray.tune"),
])
def test_run_search_refuses_bad_arguments(make, error, message, tmp_path):
    with pytest.raises(error, match=message):
        run_search(_build, SPACE, **{"run_config": _at(tmp_path / "s"), **make()})
    assert list(tmp_path.iterdir()) == []


def test_run_search_takes_at_most_ten_parameters_and_no_tune_setting_of_its_own():
    """Tune's settings come in Tune's objects: none of Tune's names is a parameter of run_search."""
    import inspect

    parameters = inspect.signature(run_search).parameters
    assert len(parameters) <= 10, list(parameters)
    tune_names = {"scheduler", "max_concurrent_trials", "metric", "mode", "max_failures", "verbose", "num_samples",
                  "search_alg", "storage_path", "name"}
    assert not tune_names & set(parameters)
    assert parameters["tune_config"].annotation in (tune.TuneConfig, "tune.TuneConfig | None")
    assert parameters["run_config"].annotation in (tune.RunConfig, "tune.RunConfig | None")


def test_run_search_refuses_to_mix_two_searches(fake_search):
    before = _snapshot(fake_search)
    with pytest.raises(SearchExistsError, match=r"continue it with --resume.*another folder with --output"):
        run_search(_build, SPACE, run_config=_at(fake_search))
    with pytest.raises(SearchExistsError, match="started with metric='val_acc', not 'outer_loss'"):
        run_search(_build, SPACE, run_config=_at(fake_search), resume=True)
    assert _snapshot(fake_search) == before


@pytest.mark.parametrize("content", ["{\"metric\": \"val_acc\", ", "[1, 2]", ""])
def test_search_cli_resume_of_a_damaged_search_json_is_named(fake_search, content, capsys):
    (fake_search / "search.json").write_text(content)
    before = _snapshot(fake_search)
    with pytest.raises(SystemExit) as exit_info:
        _main_job().main(["--output", str(fake_search), "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"cannot resume the search in {fake_search}: its search.json is damaged" in err
    assert "start a new search in another folder with --output, or delete" in err
    assert _snapshot(fake_search) == before


def test_rerun_names_a_missing_config_and_a_missing_build_solver(tmp_path, capsys):
    from hg_dist.tune.rerun import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nowhere.json")])
    assert exit_info.value.code == 2 and "no best config at" in capsys.readouterr().err
    best = tmp_path / "best_config.json"
    best.write_text(json.dumps({"metric": "x", "mode": "max", "value": 1.0, "trial": "t",
                                "build_solver": "gone_module:build_solver", "config": {}}))
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(best)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "gone_module" in err and "--build-solver" in err
    assert _snapshot(tmp_path) == before


@pytest.mark.ray
def test_unreachable_ray_address_fails_fast_naming_it(tmp_path):
    """RAY_ADDRESS=127.0.0.1:1 (nothing listens): an error naming the address within 30 s, exit 1,
    no GCS retry loop, nothing written."""
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}
    tic = time.monotonic()
    run = subprocess.run([sys.executable, str(SEARCH_PY), "--output", str(tmp_path / "s")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - tic
    assert run.returncode == 1, run.stderr[-2000:]
    # The message is distributed.resources.connect's, shared with training runs (test_reliability_cluster).
    assert "no Ray cluster answers at 127.0.0.1:1 (RAY_ADDRESS='127.0.0.1:1')" in run.stderr
    assert elapsed < 30 and "gcs" not in run.stderr.lower()
    assert list(tmp_path.iterdir()) == []
