"""Cluster configs (clusters/*.yaml) and job submission against a real local Ray head.

* Every cluster YAML validates against Ray's own cluster-config schema, both as written
  and after Ray fills in its provider defaults (what ``ray up`` does before it talks to
  the cloud). ``validate_config`` is private Ray API: these checks are written against
  Ray 2.60.
* One real ``ray job submit`` of ``examples/logistic_regression.py`` with
  ``clusters/runtime_env.yaml`` against a head started here on 127.0.0.1.

Isolation from other Ray users on the same machine (the session's own
``ray.init(address="local")`` and other people's test runs): the head runs as
``ray start --head --block`` in a subprocess this test owns (dashboard and job API
on 127.0.0.1, token auth with a token of its own), with its own short
``--temp-dir`` (so its ``ray_current_cluster`` file lands there, not in /tmp/ray,
and a bare ``ray.init()`` elsewhere never finds it), every port chosen free here, and
no RAY_ADDRESS in this process's environment. Teardown never runs ``ray stop``
(it stops every Ray instance on the machine): it sends SIGTERM to the ``--block``
process (which shuts down the processes it started), then kills whatever is left
whose command line names this head's temp dir.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("jsonschema")  # ray[default] brings it; validate_config needs it
ray = pytest.importorskip("ray")
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
CLUSTER_YAMLS = ["gpu.yaml", "cpu.yaml", "local.yaml"]
EXAMPLE = "examples/logistic_regression.py"


def _load(name: str) -> dict:
    with open(CLUSTERS / name) as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------
# Cluster configs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_validates(name):
    config = _load(name)
    validate_config(config)  # as written (every top-level field present)
    prepared = prepare_config(config)  # + provider defaults, as `ray up` does
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_schema_check_is_not_vacuous():
    config = _load("gpu.yaml")
    config["setup_comands"] = []  # a typo Ray must reject
    with pytest.raises(Exception, match="setup_comands"):
        validate_config(config)
    config = _load("gpu.yaml")
    del config["available_node_types"]["ray.worker.gpu"]["resources"]
    with pytest.raises(Exception, match="resources"):
        validate_config(config)


def test_gpu_yaml_shape():
    config = prepare_config(_load("gpu.yaml"))
    assert config["provider"]["type"] == "aws"
    node_types = config["available_node_types"]
    head = node_types.pop(config["head_node_type"])
    assert head["max_workers"] == 0
    assert node_types, "no worker node type"
    for worker in node_types.values():  # autoscaling GPU workers
        assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
        assert worker["node_config"]["InstanceType"].startswith(("g", "p"))
    assert "-gpu" in config["docker"]["image"] or "-cu" in config["docker"]["image"]


def test_cpu_yaml_shape():
    config = prepare_config(_load("cpu.yaml"))
    assert config["provider"]["type"] == "aws"
    assert "-cpu" in config["docker"]["image"]
    setup = " ".join(config["setup_commands"])
    assert "download.pytorch.org/whl/cpu" in setup  # the CPU wheel, not CUDA


def test_local_yaml_shape():
    raw = _load("local.yaml")
    assert raw["provider"]["type"] == "local"
    assert raw["provider"]["head_ip"] and raw["provider"]["worker_ips"]
    prepared = prepare_config(raw)
    (worker_type,) = prepared["available_node_types"]  # Ray's single on-prem type
    assert prepared["available_node_types"][worker_type]["max_workers"] == len(
        raw["provider"]["worker_ips"]
    )


def _pins(text: str) -> dict[str, str]:
    return dict(re.findall(r"\b(torch|ray(?:\[[a-z,]+\])?)==([0-9][0-9a-z.]*)", text))


def test_versions_pinned_consistently():
    """torch and Ray are pinned to the same versions in every config, and the
    Docker images carry that same Ray version."""
    ray_versions, torch_versions = set(), set()
    for name in CLUSTER_YAMLS:
        config = _load(name)
        setup = "\n".join(config.get("setup_commands", []))
        pins = _pins(setup)
        assert "torch" in pins, f"{name}: torch not pinned"
        ray_pins = [v for k, v in pins.items() if k.startswith("ray")]
        assert ray_pins, f"{name}: ray not pinned"
        torch_versions.add(pins["torch"])
        ray_versions.update(ray_pins)
        image = (config.get("docker") or {}).get("image")
        if image:
            ray_versions.add(image.split(":")[1].split("-")[0])
        # Ray itself is started by the cluster launcher with the pinned Ray.
        assert config["head_start_ray_commands"] and config["worker_start_ray_commands"]
    assert len(ray_versions) == 1, ray_versions
    assert len(torch_versions) == 1, torch_versions


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_token_auth_on_every_node(name):
    """The job API runs any code it is sent: every config turns on Ray's token auth
    on head and workers and ships the user's token to the nodes."""
    config = _load(name)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start), (name, key)
        assert not any("dashboard-host=0.0.0.0" in c for c in config[key])


def test_runtime_env_carries_the_project():
    from ray.runtime_env import RuntimeEnv

    with open(CLUSTERS / "runtime_env.yaml") as f:
        env = yaml.safe_load(f)
    RuntimeEnv(**env)  # Ray accepts every field
    assert env["working_dir"] == "."
    assert (REPO / env["working_dir"] / "hg_dist" / "__init__.py").exists()
    for pattern in (".venv", ".git"):
        assert pattern in env["excludes"]


# ---------------------------------------------------------------------------
# Real job submission against a local head
# ---------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the head if pytest dies first (Linux), so that an
    interrupted run does not leave it behind; its SIGTERM handler cleans up."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _ray_cli() -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _processes_under(marker: str) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop only this head: SIGTERM to its --block process (it shuts down what it
    started), then SIGKILL anything still naming our temp dir."""
    import psutil

    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
    deadline = time.time() + 10
    while (left := _processes_under(temp_dir)) and time.time() < deadline:
        time.sleep(0.5)
    for proc in left:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)


@pytest.fixture
def local_head():
    """A Ray head on 127.0.0.1 that only this test uses; yields the dashboard URL."""
    pytest.importorskip("psutil")
    # Short path: Ray's unix sockets live under it (108-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="hgray-")
    (gcs, dashboard, client, agent_listen, agent_grpc, runtime_env_agent, metrics,
     node_manager, object_manager, *worker_ports) = _free_ports(9 + 24)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")}
    # Token auth, as the cluster configs set it up, with a token of its own (never
    # ~/.ray/auth_token, which other local Ray instances use): the head, the CLI and
    # the job all get it from the environment.
    token = secrets.token_hex(32)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    for key in ("NO_PROXY", "no_proxy"):  # the CLI talks HTTP to 127.0.0.1 directly
        env[key] = ",".join(filter(None, ["127.0.0.1,localhost", env.get(key)]))
    # The job's `python` is this interpreter (the cluster configs install one).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # SIGTERM: stop at once, no 30 s drain
    cmd = _ray_cli() + [
        "start", "--head", "--block", "--disable-usage-stats",
        # Ray maps --node-ip-address=127.0.0.1 to the machine's address and GCS and
        # raylet listen on all interfaces whatever one passes; the token guards them.
        # The dashboard (job API) does stay on loopback.
        f"--temp-dir={temp_dir}",
        f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}",
        f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--worker-port-list={','.join(map(str, worker_ports))}",
        "--num-cpus=2", "--num-gpus=0",
    ]
    log = open(Path(temp_dir) / "ray-start.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        headers = {"Authorization": f"Bearer {token}"}
        _wait_for_dashboard(url, headers, head, temp_dir, timeout=120)
        yield {"url": url, "env": env, "headers": headers, "temp_dir": temp_dir}
    finally:
        _stop_head(head, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(url, headers, head, temp_dir, timeout):
    import urllib.request

    request = urllib.request.Request(f"{url}/api/version", headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxies

    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.poll() is not None:
            pytest.fail("ray start exited early:\n"
                        + (Path(temp_dir) / "ray-start.log").read_text()[-4000:])
        try:
            with opener.open(request, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail("the local head's dashboard did not come up in time:\n"
                + (Path(temp_dir) / "ray-start.log").read_text()[-4000:])


@pytest.mark.skipif(not (REPO / EXAMPLE).exists(), reason=f"{EXAMPLE} not written yet")
def test_job_submit_to_local_head(local_head, tmp_path):
    """The documented flow: `ray job submit --runtime-env clusters/runtime_env.yaml
    --working-dir . -- python examples/logistic_regression.py ...` from the repo root."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "run"
    submission_id = f"hg-dist-test-{os.getpid()}-{int(time.time())}"
    cmd = _ray_cli() + [
        "job", "submit", "--address", local_head["url"],
        "--submission-id", submission_id,
        "--runtime-env", "clusters/runtime_env.yaml", "--working-dir", ".",
        "--", "python", EXAMPLE, "--num-iters", "20", "--output", str(out),
    ]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=local_head["env"], capture_output=True,
                          text=True, timeout=600)
    elapsed = time.time() - started
    client = JobSubmissionClient(local_head["url"], headers=local_head["headers"])
    status = client.get_job_status(submission_id)
    logs = client.get_job_logs(submission_id)
    assert proc.returncode == 0 and status == JobStatus.SUCCEEDED, (
        f"status={status} rc={proc.returncode} after {elapsed:.0f}s\n"
        f"--- submit stdout ---\n{proc.stdout[-4000:]}\n"
        f"--- submit stderr ---\n{proc.stderr[-4000:]}\n--- job logs ---\n{logs[-4000:]}"
    )
    print(f"job {submission_id} SUCCEEDED in {elapsed:.1f}s")
    assert (out / "history.parquet").is_file()
    result = json.loads((out / "result.json").read_text())
    assert result["metrics"] and result["config"]["num_iters"] == 20
    import pyarrow.parquet as pq

    assert pq.read_table(out / "history.parquet").num_rows > 0
