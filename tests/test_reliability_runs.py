"""The reliability matrix of runs (issue 23): nothing lost, nothing overwritten, every ending recorded.

* one status type and one atomic writer: a full disk (``ENOSPC`` injected into the
  writer) leaves every file as it was, no temporary file, and an error naming the file;
* one-process runs checkpoint and the same command resumes (in process, and after
  ``kill -9`` of a real process), their history kept and appended to;
* an output folder belongs to one run: another run's folder and a folder in use are
  refused before anything is written;
* ``SIGTERM`` is recorded in ``result.json``;
* unclear cases end clear: ``--use-gpu`` without CUDA, ``--output=~/…``, a full disk,
  BatchNorm in the inner model.

Each case asserts the exception or exit status, the message's key words, and what is
(not) left on disk. No Ray.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from hg_dist import atomic, checkpoint, make_approx
from hg_dist.atomic import NoSpaceError
from hg_dist.callbacks import Callback, Checkpointer
from hg_dist.data import ShardedLoader, full_batch
from hg_dist.distributed.settings import Every
from hg_dist.experiment import ConfigError, ExperimentConfig, read_result, run_local
from hg_dist.optimizers import diff_sgd
from hg_dist.recording import write_parquet
from hg_dist.run_folder import claim
from hg_dist.solver import BaseImplicitSolver
from hg_dist.status import RunStatus

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "logistic_regression.py"


def listing(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def temporary_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*.tmp")]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("reliability_runs_logreg", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---- one status type --------------------------------------------------------------------------------

def test_status_is_written_as_its_plain_value():
    assert json.loads(json.dumps({"status": RunStatus.TERMINATED})) == {"status": "terminated"}
    assert pa.array([RunStatus.FAILED, RunStatus.COMPLETED], pa.string()).to_pylist() == ["failed", "completed"]
    assert RunStatus("interrupted") is RunStatus.INTERRUPTED and RunStatus.INTERRUPTED == "interrupted"
    assert [s for s in RunStatus if s.resumable] == [RunStatus.INTERRUPTED, RunStatus.TERMINATED]


# ---- one atomic writer: a full disk ------------------------------------------------------------------

@pytest.fixture
def disk_full(monkeypatch):
    """Every ``fsync`` fails with ``ENOSPC``, as on a full disk (the data written so far is in the file)."""
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)


def _small_solver():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=gen), torch.randn(40, 1, generator=gen)
    inner, outer = nn.Linear(3, 1), nn.Linear(1, 1)
    return Quadratic(inner, outer, ShardedLoader(TensorDataset(x, y), 10, seed=0), full_batch(TensorDataset(x, y)),
                     make_approx({"name": "cg", "num_iters": 3}), num_iters=4, unroll_steps=2,
                     inner_optimizer=functools.partial(diff_sgd, lr=0.1, momentum=0, weight_decay=0),
                     outer_optimizer=torch.optim.SGD(outer.parameters(), lr=0.1))


class Quadratic(BaseImplicitSolver):
    def inner_forward(self, theta, phi, x, y):
        return F.mse_loss(self.inner_func(theta, x), y) + phi[0].sum() ** 2 * sum((t ** 2).sum() for t in theta)

    def outer_forward(self, theta, phi, x, y):
        return F.mse_loss(self.inner_func(theta, x), y)


WRITERS = {
    "result.json": lambda path: atomic.write_json(path, {"status": RunStatus.COMPLETED}),
    "history.parquet": lambda path: write_parquet(path, [{"step": 1, "loss": 0.5}]),
    "checkpoint.pt": lambda path: checkpoint.save(_small_solver(), path),
    "results.parquet": lambda path: __import__("hg_dist.tune.results", fromlist=["write_table"]).write_table(
        pa.table({"trial": ["t0"], "status": [RunStatus.STOPPED]}), path),
    "search.json": lambda path: __import__("hg_dist.tune.storage", fromlist=["SearchStorage"]).SearchStorage.parse(
        path.parent).write_json({"metric": "m"}, path.name),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_full_disk_leaves_the_old_file_and_no_partial_one(name, tmp_path, monkeypatch):
    path = tmp_path / name
    WRITERS[name](path)
    before = listing(tmp_path)
    assert before[name]
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(NoSpaceError, match=rf"no space left on device while writing '.*{re.escape(name)}'.*free space"):
        WRITERS[name](path)
    assert listing(tmp_path) == before


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path):
    atomic.write_text(tmp_path / "f.txt", "old")

    def interrupted(file):
        file.write(b"half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomic(tmp_path / "f.txt", interrupted)
    assert listing(tmp_path) == {"f.txt": b"old"}


def test_a_new_file_is_whole_and_fsynced_before_it_takes_its_name(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    atomic.write_bytes(tmp_path / "sub" / "a.bin", b"x" * 100_000)
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"x" * 100_000
    assert re.search(r"/sub/\.a\.bin\.\d+\.[0-9a-f]+\.tmp$", synced[0])     # the data, under its temporary name
    assert synced[1] == str(tmp_path / "sub")                              # then the folder holding the rename


# ---- one-process runs: checkpoints and resume ---------------------------------------------------------

def _config(**fields):
    return ExperimentConfig(**{"num_iters": 80, "unroll_steps": 10, "output": "out", "outer_optimizer": "sgd",
                               **fields})


def _history(folder):
    return pq.read_table(folder / "history.parquet").to_pylist()


class Tick(Callback):
    """A clock that advances one second at the end of every inner step."""

    def __init__(self):
        self.now = 0.0

    def on_step_end(self, solver):
        self.now += 1.0


@pytest.mark.parametrize("every, num_iters, expected", [
    (Every(steps=2), 13, [(5, 2), (9, 4), (13, 6)]),     # after outer steps 2, 4, 6 (inner steps 4, 8, 12)
    (Every(steps=2), 12, [(5, 2), (9, 4), (12, 5)]),     # ... and at the end, when that is not a saving step
    (Every(seconds=3.0), 9, [(5, 2), (9, 4)]),           # outer steps at t=2,4,6,8: the first ≥ 3 s after the last
])
def test_checkpointer_follows_the_distributed_schedule(every, num_iters, expected, monkeypatch):
    saved = []
    monkeypatch.setattr(checkpoint, "save", lambda solver, path: saved.append((solver.global_step, solver.outer_step)))
    solver = _small_solver()
    tick = Tick()
    solver.num_iters, solver.unroll_steps = num_iters, 2
    solver.callbacks = (tick, Checkpointer("unused", every, clock=lambda: tick.now))
    solver.run()
    assert saved == expected


def test_an_interrupted_run_resumes_exactly_with_its_history_kept(example, workdir, monkeypatch):
    straight = run_local(example.build_solver, _config(output="straight"), checkpoint_every=Every(steps=2))
    reference = _history(workdir / "straight")

    real = example.LogisticRegressionSolver.outer_update
    calls = []

    def interrupt_at_outer_step_5(self):
        calls.append(self.outer_step)
        if self.outer_step == 5:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(example.LogisticRegressionSolver, "outer_update", interrupt_at_outer_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_local(example.build_solver, _config(), checkpoint_every=Every(steps=2))
    result = read_result("out")
    assert result["status"] == "interrupted" and result["error"] == "KeyboardInterrupt"
    assert torch.load(workdir / "out" / "checkpoint.pt")["counters"]["global_step"] == 41   # after outer step 4
    monkeypatch.setattr(example.LogisticRegressionSolver, "outer_update", real)

    resumed = run_local(example.build_solver, _config(), checkpoint_every=Every(steps=2))
    assert untimed(resumed) == untimed(straight)                    # the same numbers as a run never stopped
    assert [untimed(row) for row in _history(workdir / "out")] == [untimed(row) for row in reference]
    result = read_result("out")
    assert result["status"] == "completed" and result["resumed_from_step"] == 41

    again = run_local(example.build_solver, _config(), checkpoint_every=Every(steps=2))
    assert again == resumed and read_result("out")["resumed_from_step"] == 80   # a completed run: nothing to do


def untimed(row):
    """``row`` without its timings (``step_time``, ``outer_step_time``), which differ from run to run."""
    return {k: v for k, v in row.items() if not k.endswith("_time")}


def test_a_damaged_checkpoint_is_named_and_left_alone(example, workdir):
    run_local(example.build_solver, _config(num_iters=20), checkpoint_every=Every(steps=1))
    (workdir / "out" / "checkpoint.pt").write_bytes(b"\x00" * 100)
    before = listing(workdir)
    with pytest.raises(ConfigError, match=r"cannot resume from 'out/checkpoint\.pt': cannot read the checkpoint .*"
                                          r"corrupt, truncated.*delete that file to start the run over"):
        run_local(example.build_solver, _config(num_iters=20), checkpoint_every=Every(steps=1))
    assert listing(workdir) == before


def test_without_checkpoints_a_run_starts_over(example, workdir):
    run_local(example.build_solver, _config())
    assert not (workdir / "out" / "checkpoint.pt").exists()
    run_local(example.build_solver, _config())
    assert read_result("out")["resumed_from_step"] is None


# ---- one run per output folder -----------------------------------------------------------------------

def test_a_folder_holding_another_run_is_refused_before_anything_is_written(example, workdir):
    run_local(example.build_solver, _config(num_iters=20))
    before = listing(workdir)
    with pytest.raises(ConfigError, match=r"output folder 'out' \(--output\) holds another run \(config\.seed: 0 "
                                          r"there, 1 here\); .*choose another --output, or delete 'out' to start over"):
        run_local(example.build_solver, _config(num_iters=20, seed=1), checkpoint_every=Every(steps=1))
    with pytest.raises(ConfigError, match=r"holds another run \(build_solver: .*reliability_runs_logreg\.build_solver' "
                                          r"there, .*_other_build' here"):
        def _other_build(config, rank=0, world_size=1):
            return example.build_solver(config, rank, world_size)
        run_local(_other_build, _config(num_iters=20))
    assert listing(workdir) == before


def test_a_folder_written_before_fingerprints_is_judged_by_its_result_json(example, workdir):
    run_local(example.build_solver, _config(num_iters=20))
    (workdir / "out" / "run.json").unlink()
    with pytest.raises(ConfigError, match=r"holds another run \(config\.num_iters: 20 there, 30 here\)"):
        run_local(example.build_solver, _config(num_iters=30))
    run_local(example.build_solver, _config(num_iters=20))               # the same settings: claimed again
    assert json.loads((workdir / "out" / "run.json").read_text())["config"]["num_iters"] == 20


def test_a_folder_in_use_is_refused_and_free_again_afterwards(example, workdir):
    config = _config(num_iters=20)
    with claim("out", example.build_solver, config):                      # another process's lock (own fd)
        before = listing(workdir)
        with pytest.raises(ConfigError, match=rf"output folder 'out' \(--output\) is in use by a run going on now "
                                              rf"\(process {os.getpid()} on .*\); wait for it to end"):
            run_local(example.build_solver, config)
        assert listing(workdir) == before
    run_local(example.build_solver, config)
    assert read_result("out")["status"] == "completed"


def test_a_refused_claim_leaves_no_folder(example, workdir, disk_full):
    with pytest.raises(NoSpaceError, match=r"while writing 'out/run\.json'"):
        run_local(example.build_solver, _config())
    assert listing(workdir) == {}


# ---- real processes: kill -9, SIGTERM, a second run at once --------------------------------------------

def _start(output: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(EXAMPLE), "--output", str(output), "--outer-optimizer", "sgd",
                             "--checkpoint-every", "2", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _wait_for(predicate, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_kill_9_then_the_same_command_resumes_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    flags = ("--num-iters", "600")
    first = _start(out, *flags)
    _wait_for(lambda: (out / "checkpoint.pt").exists(), first)             # written whole, under its name, at once
    first.kill()                                                            # SIGKILL: no clean-up at all
    first.wait()
    saved = torch.load(out / "checkpoint.pt")
    step = saved["counters"]["global_step"]
    kept = saved["recorder"]["history"]
    assert 21 <= step < 600

    again = _start(out, *flags)                                             # the same command: not blocked, resumes
    _, stderr = again.communicate(timeout=300)
    assert again.returncode == 0, stderr
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["resumed_from_step"] == step and result["global_step"] == 600
    history = _history(out)
    steps = [row["step"] for row in history]
    assert steps == list(range(20, 601, 20))                                # appended: no gap, no repeat
    assert [row["step"] for row in kept] == [s for s in steps if s <= step]
    assert all(row["inner_loss"] == h["inner_loss"] for row, h in zip(kept, history))   # the rows before, unchanged
    assert temporary_files(out) == []


def test_sigterm_is_recorded_and_a_second_run_at_once_is_refused(tmp_path):
    out = tmp_path / "run"
    first = _start(out, "--num-iters", "100000")
    _wait_for(lambda: (out / "run.json").exists(), first)                  # it holds the folder now
    second = _start(out, "--num-iters", "100000")
    assert second.wait(timeout=120) == 2
    assert re.search(rf"error: output folder '{re.escape(str(out))}' \(--output\) is in use by a run going on now "
                     rf"\(process {first.pid} on .*\); wait for it to end, or choose another --output",
                     second.stderr.read())
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 143 and "ended by SIGTERM; result.json records it; the same command resumes" in stderr
    assert "Traceback" not in stderr
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "terminated" and result["error"] == "Terminated: ended by SIGTERM"
    assert 0 < result["global_step"] < 100000 and result["metrics"]["inner_loss"] > 0
    assert (out / "history.parquet").exists()                               # closed on the way out
    assert temporary_files(out) == []


# ---- unclear cases that must end clear -------------------------------------------------------------------

def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_use_gpu_without_cuda_in_one_process_is_a_usage_error(example, workdir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--num-iters", "20", "--output", "out", "--use-gpu"])
    assert exit_info.value.code == 2
    assert re.search(r"use_gpu=True \(--use-gpu\) but torch sees no CUDA device in this process; drop --use-gpu",
                     error_line(capsys.readouterr().err))
    assert listing(workdir) == {}


def test_output_with_a_tilde_is_the_home_folder(example, workdir, monkeypatch):
    monkeypatch.setenv("HOME", str(workdir / "home"))
    (workdir / "home").mkdir()
    assert ExperimentConfig(output="~/runs/a").output == str(workdir / "home" / "runs" / "a")
    example.main(["--num-iters", "20", "--output=~/runs/a"])
    assert (workdir / "home" / "runs" / "a" / "result.json").is_file()
    assert not (workdir / "~").exists()


def test_a_disk_that_fills_during_the_run_ends_in_one_line(example, workdir, monkeypatch, capsys):
    real = os.fsync

    def full_for_histories(fd):
        if "history.parquet" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", full_for_histories)
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--num-iters", "20", "--output", "out"])
    assert exit_info.value.code == 1
    assert re.search(r"error: NoSpaceError: no space left on device while writing 'out/history\.parquet'; the previous "
                     r"file \(if any\) is unchanged", error_line(capsys.readouterr().err))
    result = read_result("out")
    assert result["status"] == "failed" and "no space left" in result["error"]
    assert temporary_files(workdir) == [] and not (workdir / "out" / "history.parquet").exists()


def test_a_full_disk_at_the_start_leaves_nothing(example, workdir, disk_full, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--num-iters", "20", "--output", "out"])
    assert exit_info.value.code == 1
    assert "no space left on device while writing 'out/run.json'" in error_line(capsys.readouterr().err)
    assert listing(workdir) == {}


def _norm_solver(norm: nn.Module):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=gen), torch.randn(32, 1, generator=gen)
    inner, outer = nn.Sequential(nn.Linear(3, 4), norm, nn.Linear(4, 1)), nn.Linear(1, 1)
    return Quadratic(inner, outer, ShardedLoader(TensorDataset(x, y), 8, seed=0), full_batch(TensorDataset(x, y)),
                     make_approx({"name": "nystrom", "rank": 3, "rho": 1.0}), num_iters=6, unroll_steps=2,
                     inner_optimizer=functools.partial(diff_sgd, lr=0.1, momentum=0, weight_decay=0),
                     outer_optimizer=torch.optim.SGD(outer.parameters(), lr=0.1))


def test_batchnorm_with_running_statistics_is_refused_when_the_solver_is_built():
    with pytest.raises(ValueError, match=r"inner\.1 is a BatchNorm1d in training mode that updates its running "
                                         r"statistics in place.*nn\.GroupNorm.*track_running_stats=False.*"
                                         r"inner\.1\.eval\(\)"):
        _norm_solver(nn.BatchNorm1d(4))
    # each way out the message names does run
    for norm in (nn.GroupNorm(2, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.BatchNorm1d(4).eval()):
        solver = _norm_solver(norm)
        solver.run()
        assert solver.outer_step == 2 and all(torch.isfinite(p).all() for p in solver.outer.parameters())
