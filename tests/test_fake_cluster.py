"""The cluster flow on a simulated autoscaling cluster: clusters/local-sim.yaml on Ray's fake multi-node provider.

One head for the module (``ray start --head --num-cpus=0 --autoscaling-config=...``
on 127.0.0.1, ports and temp dir of its own, see tests/ray_heads.py); its worker
"nodes" are extra raylets that Ray's autoscaler (v2) starts on this machine when a
job asks for resources, and stops after a minute idle. Every job goes through
``ray job submit`` from the repository root, as docs/clusters.md says. In order:

(a) a 2-worker run starts from 0 worker nodes: it waits (and says so) while the
    autoscaler adds two, and succeeds;
(c) a worker node is killed (``kill -9`` of its raylet and everything under it) in
    the middle of a 2-worker run: the run restarts from its last checkpoint with a
    new node, on the cluster's default ``max_failures``, and ends with the same
    parameters as an uninterrupted run (float64, 1e-10);
(b) a search whose trial needs more than the nodes present makes the cluster grow
    (examples/search.py run against the cluster's address).

Measured here: head ~10 s, (a) ~60 s, (c) ~90 s, (b) ~70 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("yaml")

from ray_heads import (REPO, SIM_HEAD, SIM_JOB, SIM_SEARCH, Head, doc_block, doc_output_after,  # noqa: E402
                       kill_tree, ray_cli, run_block, start_head, stop_head)

import psutil  # noqa: E402 - Ray's vendored copy, on sys.path once ray is imported


# Faster than Ray's defaults, for the tests only: the autoscaler looks every second, and a
# node that stops answering is declared dead after 5 s.
FAST = {"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_health_check_period_ms": "1000",
        "RAY_health_check_failure_threshold": "5"}


@pytest.fixture(scope="module")
def sim():
    """The head of docs/clusters.md's autoscaling cluster (its own block), on free ports."""
    head = start_head(doc_block(SIM_HEAD), token=False, extra_env=FAST)
    try:
        yield head
    finally:
        stop_head(head)


def worker_nodes(head: Head) -> dict[str, str]:
    """``{node id: "ALIVE" | "DEAD"}`` of every worker node that ever joined (the head excluded)."""
    from ray.util.state import list_nodes

    return {node.node_id: node.state for node in list_nodes(address=head.url, limit=1000, raise_on_missing_output=False)
            if not node.is_head_node}


def alive(nodes: dict[str, str]) -> set[str]:
    return {node for node, state in nodes.items() if state == "ALIVE"}


def submit(head: Head, *entrypoint: str, wait: bool = True,
           timeout: float = 600) -> tuple[str, subprocess.CompletedProcess]:
    """``ray job submit --runtime-env clusters/runtime_env.yaml --working-dir . -- ENTRYPOINT``; returns its id."""
    submission_id = f"hg-dist-sim-{int(time.time() * 1000)}"
    cmd = ray_cli() + ["job", "submit", "--address", head.url, "--submission-id", submission_id,
                       "--runtime-env", "clusters/runtime_env.yaml", "--working-dir", ".",
                       *([] if wait else ["--no-wait"]), "--", *entrypoint]
    proc = subprocess.run(cmd, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout)
    return submission_id, proc


def job_client(head: Head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.url, headers=head.headers)


def assert_succeeded(head: Head, submission_id: str, proc: subprocess.CompletedProcess | None = None) -> str:
    from ray.job_submission import JobStatus

    client = job_client(head)
    status, logs = client.get_job_status(submission_id), client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED and (proc is None or proc.returncode == 0), (
        f"status={status}\n--- submit ---\n{'' if proc is None else proc.stdout[-3000:] + proc.stderr[-3000:]}"
        f"\n--- job logs ---\n{logs[-6000:]}\n--- head ---\n{head.log()}")
    return logs


def wait_for_job(head: Head, submission_id: str, timeout: float) -> None:
    from ray.job_submission import JobStatus

    client = job_client(head)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if client.get_job_status(submission_id) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return
        time.sleep(2)
    client.stop_job(submission_id)
    logs = client.get_job_logs(submission_id)[-4000:]
    pytest.fail(f"job {submission_id} still running after {timeout:.0f} s:\n{logs}")


# ---------------------------------------------------------------------------------------
# (a) demand from 0 worker nodes: the autoscaler adds them, the job succeeds
# ---------------------------------------------------------------------------------------

def test_two_worker_job_starts_from_zero_worker_nodes(sim, tmp_path):
    """docs/clusters.md's job on the autoscaling cluster, its commands as written there."""
    import re

    assert not alive(worker_nodes(sim)), "the simulated cluster should start with no worker node"
    started = time.time()
    proc = run_block(sim, doc_block(SIM_JOB), tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}\n--- head ---\n{sim.log()}"
    print(f"(a) SUCCEEDED in {time.time() - started:.0f} s")

    assert len(worker_nodes(sim)) >= 2                                   # the autoscaler added two nodes
    # It said what it waited for and what was there, then started; as the doc shows it.
    shown = doc_output_after(SIM_JOB).splitlines()
    assert shown[0].split(" (CPU 0 free)")[0] + " (CPU 0 free)" in proc.stdout
    ready = re.escape(shown[-1]).replace("11", r"\d+")
    assert re.search(ready, proc.stdout), shown[-1]
    assert "cpu_worker" in proc.stdout                                   # `ray status`: the new nodes' type
    out = tmp_path / "sim-lr2"
    result = json.loads((out / "result.json").read_text())
    assert result["workers"] == 2 and result["global_step"] == 40 and result["metrics"]
    assert (out / "history.parquet").is_file()


# ---------------------------------------------------------------------------------------
# (c) a worker node dies mid-run: restart from the last checkpoint on a new node
# ---------------------------------------------------------------------------------------

def _train_worker_raylets(head: Head) -> dict[int, int]:
    """``{raylet pid: Train worker pid}`` for the Ray Train workers running now."""
    raylets = {}
    for proc in head.processes():
        try:
            if proc.name().startswith("ray::RayTrainWorker") or "RayTrainWorker" in " ".join(proc.cmdline()[:1]):
                raylets[int(proc.environ()["RAY_RAYLET_PID"])] = proc.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
            pass
    return raylets


def test_node_killed_mid_run_restarts_on_a_new_node_with_the_same_result(sim, tmp_path):
    import torch

    import fake_cluster_job as job
    from hg_dist.collective import use
    from hg_dist.distributed import run_threads

    out = tmp_path / "killed"
    submission_id, proc = submit(sim, "python", "tests/fake_cluster_job.py", str(out), wait=False)
    assert proc.returncode == 0, proc.stderr

    # Wait until Ray Train has registered a checkpoint (its controller's snapshot lists one): the run
    # is under way and has something to resume from. A checkpoint folder alone is not enough: a
    # kill before the report reaches the controller rightly restarts from scratch.
    snapshot = out / "ray" / "hg_dist" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (snapshot.is_file() and "checkpoint_" in snapshot.read_text()):
        time.sleep(0.5)
    raylets = _train_worker_raylets(sim)
    assert raylets, "found no Ray Train worker process\n" + job_client(sim).get_job_logs(submission_id)[-4000:]
    before = alive(worker_nodes(sim))
    raylet = next(iter(raylets))
    killed = kill_tree(psutil.Process(raylet))                           # kill -9: raylet, workers, agents
    killed_at = time.time()
    print(f"(c) killed node with raylet {raylet} ({len(killed)} processes)")

    wait_for_job(sim, submission_id, timeout=400)
    assert_succeeded(sim, submission_id)
    print(f"(c) resumed and SUCCEEDED {time.time() - killed_at:.0f} s after the kill")
    nodes = worker_nodes(sim)
    assert "DEAD" in nodes.values()                                      # the cluster saw the node die
    assert set(nodes) - before, "no new node joined after the kill"      # the autoscaler replaced it
    result = json.loads((out / "result.json").read_text())
    assert result["restored"] is True and result["workers"] == 2         # resumed from a checkpoint
    final = torch.load(out / job.FINAL_STATE, weights_only=True)

    # The uninterrupted run: the same 2 ranks as threads of this process.
    config = job.config(str(tmp_path / "threads"))

    def one_rank(collective):
        with use(collective):
            solver = job.build_solver(config, rank=collective.rank, world_size=2)
        solver.run()
        return solver

    uninterrupted = run_threads(2, one_rank)[0]
    assert final["counters"]["outer_step"] == uninterrupted.outer_step == 7
    reference = uninterrupted.outer.log_decay.detach()
    resumed = final["outer"]["log_decay"]
    assert resumed.dtype == torch.float64
    assert float((resumed - reference).norm() / reference.norm()) <= 1e-10


# ---------------------------------------------------------------------------------------
# (b) a search whose trial needs more than the nodes present makes the cluster grow
# ---------------------------------------------------------------------------------------

def test_search_makes_the_cluster_grow(sim, tmp_path):
    """docs/clusters.md's search on the autoscaling cluster: examples/search.py as a driver here.

    Not through ``ray job submit --working-dir .``: on one machine the fake nodes share
    Ray's runtime_resources folder, and each node that joins unpacks the job's files
    again over the driver's current directory (Ray's agent unpacks with overwrite),
    which Tune's end-of-run path handling (``os.getcwd``) trips on. Real nodes have
    disks of their own; (a) and (c) show the job path.
    """
    import pyarrow.parquet as pq

    # One trial of 2 Train workers of 1 CPU each, plus the trial's own 0.01 CPU: three 1-CPU nodes.
    needed = 3
    at_start = alive(worker_nodes(sim))
    deadline = time.time() + 150   # nodes of earlier tests go after idle_timeout_minutes (1) of clusters/local-sim.yaml
    while len(at_start) >= needed and time.time() < deadline:
        time.sleep(5)
        at_start = alive(worker_nodes(sim))
    assert len(at_start) < needed, f"{len(at_start)} worker nodes still up: the search would not need more"
    started = time.time()
    proc = run_block(sim, doc_block(SIM_SEARCH), tmp_path)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    print(f"(b) search done in {time.time() - started:.0f} s")
    joined = set(worker_nodes(sim)) - at_start
    assert joined, "the cluster did not grow for the search"
    out = tmp_path / "sim-search"
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert [row["status"] for row in table] == ["completed"] and table[0]["workers"] == 2
    assert (out / "best_config.json").is_file()


# ---------------------------------------------------------------------------------------
# Reliability: demand that no scale-up can meet ends at once (autoscaler v2's verdict)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, asked", [
    (["--workers", "5"], "workers=5 × {CPU 1} asks for CPU 5"),                 # > max_workers (4) of 1 CPU
    (["--workers", "2", "--use-gpu"], "workers=2 × {CPU 1, GPU 1} asks for CPU 2, GPU 2"),  # no GPU node type
])
def test_demand_no_scale_up_can_meet_fails_fast(sim, tmp_path, args, asked):
    out = tmp_path / "never"
    started = time.time()
    proc = subprocess.run([sys.executable, "examples/logistic_regression.py", *args, "--output", str(out)], cwd=REPO,
                          env={**sim.env, "RAY_ADDRESS": sim.gcs}, capture_output=True, text=True, timeout=300)
    elapsed = time.time() - started
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert asked in line and "its autoscaler reports that no scale-up can place them" in line, line
    assert "Fix: ask for fewer workers (--workers)" in line and "max_workers" in line
    assert ("drop --use-gpu" in line) == ("--use-gpu" in args)
    assert not out.exists()
    assert elapsed < 60, f"{elapsed:.0f} s"
