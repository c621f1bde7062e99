"""A Tune trial that fails deterministically ends normally (no Tune retry) and is still listed as failed.

Tune retries a trial that raised (``FailureConfig(max_failures)``); a diverged solve
or bad settings would fail again at the same step. ``run_trial`` (the trial's body)
is run here in this process with Tune's per-trial calls stubbed (no Ray started):
on such an error it writes ``failed`` and ``"retried": false`` to ``result.json``
and reports one last result saying so, instead of raising; a transient error still
raises. The search's view of it (:func:`~hg_dist.tune.progress.trial_status`, the
progress callback, the results table) is checked on real Tune ``Trial`` objects.
"""

from __future__ import annotations

import math
import types

import pytest

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402
from ray.tune.experiment import Trial  # noqa: E402

from hg_dist.experiment import ExperimentConfig, read_result  # noqa: E402
from hg_dist.tune import trainable  # noqa: E402
from hg_dist.tune.progress import SearchProgress, trial_status  # noqa: E402
from hg_dist.tune.results import table_rows  # noqa: E402

import ridge  # noqa: E402


class FailingRidge(ridge.Ridge):
    """``extra["nan_at"] = k``: the recorded outer loss is NaN from outer step ``k`` on;
    ``extra["crash_at"] = k``: a RuntimeError there."""

    def outer_metrics(self, *batch):
        step = self.outer_step + 1
        if self.extra.get("crash_at") == step:
            raise RuntimeError(f"connection lost at outer step {step}")
        loss = self.outer_forward(self.inner_params, self.outer_params(), *batch)
        return {"outer_loss": loss * math.nan if step >= self.extra.get("nan_at", math.inf) else loss}


BUILDS: list[int] = []


def build_ridge(config: ExperimentConfig, rank: int = 0, world_size: int = 1) -> FailingRidge:
    BUILDS.append(rank)
    solver = ridge.build_ridge(config, FailingRidge, progress=False)
    solver.extra = dict(config.extra)
    return solver


@pytest.fixture
def trial_env(monkeypatch):
    """Tune's per-trial calls stubbed; returns the list of reported results."""
    reports = []
    monkeypatch.setattr(tune, "get_context", lambda: types.SimpleNamespace(get_trial_name=lambda: "t_00000",
                                                                             get_storage=lambda: None))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(tune, "report", lambda result, checkpoint=None: reports.append(result))
    BUILDS.clear()
    return reports


def sampled(**extra) -> dict:
    return {"approximator": {"name": "cg", "num_iters": 3}, "outer_optimizer": {"name": "sgd", "lr": 0.05},
            "num_iters": 12, "unroll_steps": 2, "extra": extra}


def run(config: dict, trials_dir, metric: str = "outer_loss") -> None:
    trainable.run_trial(config, build_solver=build_ridge, base=ExperimentConfig(), trials_dir=str(trials_dir),
                        metric=metric, mode="min", cpus_per_worker=1.0, checkpoint_every=2)


def test_a_diverged_trial_ends_normally_as_failed_without_a_retry(tmp_path, trial_env):
    run(sampled(nan_at=3), tmp_path)          # returns: Tune sees the trial end and does not retry it
    *steps, last = trial_env
    assert [r["outer_step"] for r in steps] == [1, 2] and all(math.isfinite(r["outer_loss"]) for r in steps)
    assert last[trainable.FAILED_KEY] == 1.0 and math.isnan(last["outer_loss"]) and math.isnan(last["best_metric"])
    assert last["outer_step"] == 2 and "outer_loss" in last[trainable.ERROR_KEY]
    record = read_result(tmp_path / "t_00000")
    assert record["status"] == "failed" and record["retried"] is False
    assert record["error"] == last[trainable.ERROR_KEY] and "NonFinite" in record["error"]
    assert BUILDS == [0]


@pytest.mark.parametrize("config, metric, match, step", [
    (dict(sampled(), workers=0), "outer_loss", "workers", 0),      # bad settings: the config is refused
    (sampled(), "val_acc", "val_acc", 1),                          # a metric the solver does not record
])
def test_bad_settings_end_the_trial_as_failed_without_a_retry(tmp_path, trial_env, config, metric, match, step):
    run(config, tmp_path, metric)
    (last,) = trial_env
    assert last[trainable.FAILED_KEY] == 1.0 and match in last[trainable.ERROR_KEY] and last["outer_step"] == step
    record = read_result(tmp_path / "t_00000")
    assert record["status"] == "failed" and record["retried"] is False and match in record["error"]


def test_a_transient_error_is_raised_for_tune_to_retry(tmp_path, trial_env):
    with pytest.raises(RuntimeError, match="connection lost"):
        run(sampled(crash_at=2), tmp_path)
    assert not any(trainable.FAILED_KEY in r for r in trial_env)
    record = read_result(tmp_path / "t_00000")
    assert record["status"] == "failed" and "retried" not in record


def test_an_error_after_the_search_wrote_stopped_leaves_stopped(tmp_path, trial_env, monkeypatch):
    """Tune stopped the trial and the search wrote ``stopped`` while the trial was still running; the error
    its teardown then raises is filed aside (``error_while_stopped``) by the run's ending and by the trial,
    not written over the stop, and goes to Tune as raised (nothing to report: Tune already ended it)."""
    from hg_dist.experiment import update_result

    output = tmp_path / "t_00000"
    reported = trial_env

    def stopped_then_torn_down(result, checkpoint=None):
        reported.append(result)
        if result.get("outer_step") == 2:
            update_result(output, status="stopped")           # what the search writes when Tune stops it
            raise AttributeError("'NoneType' object has no attribute 'close'")

    monkeypatch.setattr(tune, "report", stopped_then_torn_down)
    with pytest.raises(AttributeError):
        run(sampled(), tmp_path)
    record = read_result(output)
    assert record["status"] == "stopped" and "retried" not in record
    assert record["error_while_stopped"] == "AttributeError: 'NoneType' object has no attribute 'close'"


def test_the_search_lists_a_trial_ended_by_its_error_as_failed(tmp_path, trial_env):
    """trial_status, the progress line and the results table call such a trial ``failed`` with its
    error (Tune calls it TERMINATED), and a completed trial still ``completed``."""
    run(sampled(nan_at=3), tmp_path)
    failed_result = trial_env[-1]
    failed, done = (Trial("hg_dist_trial", config=sampled(), trial_id=name, stub=True) for name in ("a", "b"))
    failed.custom_trial_name, done.custom_trial_name = "cg_a", "cg_b"
    failed.update_last_result(failed_result)
    done.update_last_result({"outer_loss": 0.5, "best_metric": 0.5, "outer_step": 5, "solve_completed": 1.0})
    ended = []
    progress = SearchProgress("outer_loss", "min", 2, interval=0.0, quiet=True,
                              on_end=lambda trial, status, error: ended.append((str(trial), status, error)))
    for trial in (failed, done):
        trial.set_status(Trial.TERMINATED)
        progress.on_trial_complete(0, [failed, done], trial)
    error = failed_result[trainable.ERROR_KEY]
    assert ended == [("cg_a", "failed", error), ("cg_b", "completed", None)]
    assert [trial_status(t) for t in (failed, done)] == ["failed", "completed"]
    assert progress.status_line().startswith("0 running, 1 done (1 completed, 0 stopped), 1 failed, 0 pending")

    class Grid(list):
        def get_dataframe(self):
            import pandas as pd
            return pd.DataFrame([{**r.metrics, "logdir": r.path} for r in self])

    grid = Grid(types.SimpleNamespace(path=f"/x/{t}", metrics=t.last_result, error=None, config=sampled())
                for t in (failed, done))
    rows = table_rows(grid, metric="outer_loss", base=ExperimentConfig(),
                      statuses={str(t): trial_status(t) for t in (failed, done)}, output_of=lambda n: str(tmp_path))
    assert [(r["trial"], r["status"], r["error"]) for r in rows] == [("cg_a", "failed", error),
                                                                      ("cg_b", "completed", None)]
    assert rows[0]["best_metric"] is None and rows[1]["best_metric"] == 0.5
