"""Reliability matrix, cluster cases: every one ends in a clear error (or a prompt stop), and writes nothing.

Each case asserts the exception type or exit status, that the message names the cause
(and the fix), that nothing was written, and — where it matters — how long it took.
Most run ``examples/logistic_regression.py`` as a user would, against a fixed head of
this module (docs/clusters.md's ``ray start --head ... --num-cpus=2``, on free ports,
see tests/ray_heads.py). Cases on an autoscaling cluster (demand beyond what its
autoscaler can add) are in tests/test_fake_cluster.py, which owns that head.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("yaml")

from ray_heads import FIXED_HEAD, REPO, doc_block, free_ports, ray_cli, start_head, stop_head  # noqa: E402

import psutil  # noqa: E402 - Ray's vendored copy, on sys.path once ray is imported

EXAMPLE = "examples/logistic_regression.py"


@pytest.fixture(scope="module")
def fixed():
    """A fixed 2-CPU head (no autoscaler), started with docs/clusters.md's command (auth off: the
    state API is read from this process)."""
    head = start_head(doc_block(FIXED_HEAD), token=False)
    try:
        yield head
    finally:
        stop_head(head)


def run_example(env: dict[str, str], *args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.time()
    proc = subprocess.run([sys.executable, EXAMPLE, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.time() - started


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's error: the last line of stderr, with no traceback before it."""
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("logistic_regression.py: error: "), proc.stderr[-4000:]
    return line


def ctrl_c_within_10_s(driver: subprocess.Popen, log) -> None:
    """Ctrl-C in the driver's terminal (SIGINT to its process group); fail unless it ends within 10 s."""
    interrupted = time.time()
    os.killpg(driver.pid, signal.SIGINT)
    try:
        driver.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        pytest.fail("still running 10 s after Ctrl-C:\n" + log.read_text()[-4000:])
    print(f"stopped {time.time() - interrupted:.1f} s after Ctrl-C")


# ---------------------------------------------------------------------------------------
# A fixed cluster that can never hold the demand: an error at once
# ---------------------------------------------------------------------------------------

def test_gpu_workers_on_a_fixed_cluster_without_gpus(fixed, tmp_path):
    out = tmp_path / "gpu"
    proc, elapsed = run_example({**fixed.env, "RAY_ADDRESS": fixed.gcs}, "--workers", "2", "--use-gpu",
                                "--output", str(out))
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "workers=2 × {CPU 1, GPU 1} asks for CPU 2, GPU 2" in line     # asked for
    assert "has CPU 2, GPU 0 in all (1 node) and cannot grow" in line    # has, and why it will not change
    assert "Fix: drop --use-gpu" in line                                  # the fix
    assert not out.exists()
    assert elapsed < 60, f"{elapsed:.0f} s"


def test_too_many_workers_for_the_local_instance_is_a_value_error(tmp_path, ray_session):
    """In-process, on the test session's local Ray instance (4 CPUs, started by this process)."""
    sys.path.insert(0, str(REPO))
    from examples.logistic_regression import DEFAULTS, build_solver
    from hg_dist.distributed import run_experiment
    from hg_dist.distributed.resources import InsufficientResourcesError

    config = DEFAULTS.__class__(**{**DEFAULTS.to_dict(), "workers": 5, "output": str(tmp_path / "out")})
    started = time.time()
    with pytest.raises(InsufficientResourcesError) as caught:
        run_experiment(build_solver, config)
    assert isinstance(caught.value, ValueError)
    assert caught.value.asked == {"CPU": 5.0} and caught.value.has["CPU"] == 4.0
    message = str(caught.value)
    assert "workers=5 × {CPU 1} asks for CPU 5, but this Ray cluster has CPU 4 in all" in message
    assert "a local Ray instance that this process started: no autoscaler" in message
    assert "use --workers 4 or fewer" in message
    assert not (tmp_path / "out").exists()
    assert time.time() - started < 10


# ---------------------------------------------------------------------------------------
# Addresses: unreachable, or not an address
# ---------------------------------------------------------------------------------------

def test_unreachable_address_names_it_within_30_s(fixed, tmp_path):
    port = free_ports(1)[0]   # nothing listens there
    out = tmp_path / "unreachable"
    proc, elapsed = run_example({**fixed.env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, "--workers", "2",
                                "--output", str(out), timeout=120)
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert f"no Ray cluster answers at 127.0.0.1:{port} (RAY_ADDRESS='127.0.0.1:{port}')" in line
    assert "unset RAY_ADDRESS" in line
    assert elapsed < 30, f"{elapsed:.0f} s"
    assert not out.exists()


def test_malformed_address_is_named(fixed, tmp_path):
    out = tmp_path / "malformed"
    proc, _ = run_example({**fixed.env, "RAY_ADDRESS": "head-node"}, "--workers", "2", "--output", str(out))
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "RAY_ADDRESS='head-node' is not a Ray address; use host:port of the head" in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# --resource-timeout: bad values, and the timeout itself
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan", "inf", "5x"])
def test_bad_resource_timeout_is_a_usage_error(value, tmp_path, capsys):
    """Checked by the parser, before anything starts: exit 2, one line naming the flag."""
    sys.path.insert(0, str(REPO))
    from examples import logistic_regression

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as caught:
        logistic_regression.main(["--workers", "2", "--resource-timeout", value, "--output", str(out)])
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: argument --resource-timeout: --resource-timeout must be" in error
    assert "seconds" in error and (repr(value) in error or "got 0.0" in error)
    assert not out.exists()


def test_fit_options_reject_bad_values():
    from hg_dist.distributed import FitOptions

    with pytest.raises(ValueError, match=r"resource_timeout_s must be a finite number of seconds > 0.*got 0"):
        FitOptions(resource_timeout_s=0)
    with pytest.raises(TypeError, match="resource_timeout_s must be a number of seconds, got str"):
        FitOptions(resource_timeout_s="20m")
    assert FitOptions().resource_timeout_s == 1200.0


@pytest.fixture
def busy(fixed):
    """The fixed head's 2 CPUs held by a sleeping job, so that a run has to wait."""
    job = f"hg-dist-busy-{int(time.time() * 1000)}"

    def ray_job(command: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(ray_cli() + ["job", command, "--address", fixed.url, *args], cwd=REPO, env=fixed.env,
                              capture_output=True, text=True, timeout=120)

    submitted = ray_job("submit", "--no-wait", "--submission-id", job, "--entrypoint-num-cpus", "2", "--",
                        "sleep", "600")
    assert submitted.returncode == 0, submitted.stderr
    deadline = time.time() + 120
    while "RUNNING" not in ray_job("status", job).stdout + ray_job("status", job).stderr and time.time() < deadline:
        time.sleep(1)
    try:
        yield fixed
    finally:
        ray_job("stop", job)


def _placement_groups_left(head) -> list:
    from ray.util.state import list_placement_groups

    return [pg for pg in list_placement_groups(address=head.url, raise_on_missing_output=False)
            if pg.state != "REMOVED"]


def test_resource_timeout_ends_the_wait_with_an_error(busy, tmp_path):
    out = tmp_path / "timeout"
    proc, elapsed = run_example({**busy.env, "RAY_ADDRESS": busy.gcs}, "--workers", "2", "--resource-timeout", "4s",
                                "--output", str(out))
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "waited 4 s (the resource timeout) for workers=2 × {CPU 1} (CPU 2)" in line
    assert "the Ray cluster has CPU 2 in all (1 node), CPU 0 of it free" in line
    assert "--resource-timeout" in line and "ray status" in line
    assert "hg_dist: waiting for workers=2 × {CPU 1} (CPU 2); the cluster has CPU 2 (CPU 0 free)" in proc.stderr
    assert 4 <= elapsed < 60
    assert not out.exists() and not _placement_groups_left(busy)


def test_ctrl_c_while_waiting_ends_within_10_s(busy, tmp_path):
    out = tmp_path / "interrupted"
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:
        driver = subprocess.Popen([sys.executable, EXAMPLE, "--workers", "2", "--output", str(out)], cwd=REPO,
                                  env={**busy.env, "RAY_ADDRESS": busy.gcs}, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.time() + 120
        while "hg_dist: waiting for" not in log.read_text() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert "hg_dist: waiting for" in log.read_text(), log.read_text()[-4000:]
        children = psutil.Process(driver.pid).children(recursive=True)
        ctrl_c_within_10_s(driver, log)
    assert driver.returncode == 130 and "interrupted (Ctrl-C)" in log.read_text(), log.read_text()[-3000:]
    time.sleep(1)
    assert not [child for child in children if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    assert not out.exists()
    deadline = time.time() + 20   # the GCS removes a dead driver's placement groups
    while _placement_groups_left(busy) and time.time() < deadline:
        time.sleep(1)
    assert not _placement_groups_left(busy)


def test_ctrl_c_while_training_ends_within_10_s(fixed, tmp_path):
    """Ctrl-C in the middle of a 2-worker run: the driver ends within 10 s and its Ray Train
    workers and controller are gone from the cluster."""
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:
        driver = subprocess.Popen([sys.executable, EXAMPLE, "--workers", "2", "--num-iters", "100000",
                                   "--output", str(tmp_path / "long")], cwd=REPO,
                                  env={**fixed.env, "RAY_ADDRESS": fixed.gcs}, stdout=sink, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.time() + 180
        started = "Started training worker group"
        while started not in log.read_text() and driver.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert started in log.read_text(), log.read_text()[-4000:]
        time.sleep(3)                                                      # into the solve
        ctrl_c_within_10_s(driver, log)
    deadline = time.time() + 10
    while time.time() < deadline and _train_processes(fixed):
        time.sleep(0.5)
    assert not _train_processes(fixed), "Ray Train processes left on the cluster after Ctrl-C"


def _train_processes(head) -> list[str]:
    names = []
    for proc in head.processes():
        try:
            name = proc.name()
            if proc.status() != psutil.STATUS_ZOMBIE and ("RayTrainWorker" in name or "TrainController" in name):
                names.append(name)
        except psutil.NoSuchProcess:
            pass
    return names
