"""Ray heads that one test owns: on 127.0.0.1, with free ports and a temp dir of their own, stopped by PID.

Used by tests/test_clusters.py, tests/test_fake_cluster.py and tests/test_reliability_cluster.py.

* :func:`start_head` runs ``ray start --head --block`` in a subprocess, with every
  port chosen free here and its own short ``--temp-dir`` (so a bare ``ray.init()``
  elsewhere never finds it). Every process it starts inherits a marker variable
  (``HG_DIST_TEST_HEAD``), so that teardown finds them all — Ray renames its workers
  ``ray::...`` and re-parents some — without ever running ``ray stop`` (which would
  stop other people's Ray instances on this machine).
* ``simulated=True`` starts Ray's fake multi-node autoscaler on clusters/local-sim.yaml (the environment
  and flags of ../shared/fake-cluster.md): worker "nodes" are extra raylets that
  the autoscaler (v2) starts on this machine when a job asks for resources.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import ray  # noqa: F401 - puts Ray's vendored psutil on sys.path
import psutil  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
MARKER = "HG_DIST_TEST_HEAD"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (from the OS's ephemeral range)."""
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


def ray_cli() -> list[str]:
    """The ``ray`` command of this interpreter's Ray."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _die_with_parent() -> None:
    """preexec_fn: SIGTERM the head if pytest dies first (Linux), so that an interrupted
    run does not leave it behind; its SIGTERM handler cleans up."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class Head:
    """A running head: ``gcs`` (``127.0.0.1:PORT``, for drivers and ``ray status``), ``url`` (the
    dashboard / job API), ``env`` (for clients: CLI, jobs), ``headers`` (the auth token, if any)."""

    proc: subprocess.Popen
    temp_dir: str
    gcs: str
    url: str
    env: dict[str, str]
    marker: str
    headers: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        path = Path(self.temp_dir) / "ray-start.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def processes(self) -> list[psutil.Process]:
        """Every live process this head started: its descendants, and anything carrying its marker."""
        found = {}
        try:
            for proc in [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]:
                found[proc.pid] = proc
        except psutil.NoSuchProcess:
            pass
        for proc in psutil.process_iter(["pid"]):
            if proc.pid in found:
                continue
            try:
                if proc.environ().get(MARKER) == self.marker:
                    found[proc.pid] = proc
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                pass
        return list(found.values())


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, cleaned for a Ray client or head on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")}
    for key in ("NO_PROXY", "no_proxy"):  # the CLI talks HTTP to 127.0.0.1 directly
        env[key] = ",".join(filter(None, ["127.0.0.1,localhost", env.get(key)]))
    # The job's `python` and `ray` are this interpreter's (the cluster configs install one).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.update(extra or {})
    return env


def start_head(*, num_cpus: float, simulated: bool = False, token: bool = True,
               extra_env: dict[str, str] | None = None, timeout: float = 120) -> Head:
    """Start a head on 127.0.0.1 that only the caller uses; wait until its job API answers.

    ``token``: Ray's token authentication with a token of its own (never
    ``~/.ray/auth_token``, which other local Ray instances use); else auth disabled.
    ``simulated``: an autoscaling head for clusters/local-sim.yaml (Ray's fake
    multi-node provider), with the environment of ../shared/fake-cluster.md.
    """
    temp_dir = tempfile.mkdtemp(prefix="hgray-")  # short: Ray's unix sockets live under it (108 bytes)
    ports = free_ports(11 + 24)
    (gcs, dashboard, client, agent_listen, agent_grpc, runtime_env_agent, metrics, node_manager,
     object_manager, autoscaler_metrics, _spare, *worker_ports) = ports
    marker = secrets.token_hex(8)
    env = client_env({MARKER: marker, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    headers = {}
    if token:
        secret = secrets.token_hex(32)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secret)
        headers = {"Authorization": f"Bearer {secret}"}
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    cmd = ray_cli() + [
        "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--worker-port-list={','.join(map(str, worker_ports))}", f"--num-cpus={num_cpus:g}", "--num-gpus=0",
    ]
    if simulated:
        autoscaling_config = sim_config(Path(temp_dir) / "local-sim.yaml", gcs)
        env.update(RAY_FAKE_CLUSTER="1", RAY_enable_autoscaler_v2="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
                   RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID, RAY_NODE_TYPE_NAME="ray.head.default",
                   RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="5",
                   AUTOSCALER_METRIC_PORT=str(autoscaler_metrics))
        cmd += [f"--autoscaling-config={autoscaling_config}", "--object-store-memory=100000000"]
    env.update(extra_env or {})
    log = open(Path(temp_dir) / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    log.close()
    client_side = {k: v for k, v in env.items() if k != MARKER}
    head = Head(proc=proc, temp_dir=temp_dir, gcs=f"127.0.0.1:{gcs}", url=f"http://127.0.0.1:{dashboard}",
                env=client_side, marker=marker, headers=headers)
    try:
        _wait_for_dashboard(head, timeout)
    except BaseException:
        stop_head(head)
        raise
    return head


def _wait_for_dashboard(head: Head, timeout: float) -> None:
    request = urllib.request.Request(f"{head.url}/api/version", headers=head.headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxies
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head.proc.poll() is not None:
            raise RuntimeError("ray start exited early:\n" + head.log())
        try:
            with opener.open(request, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("the head's dashboard did not come up in time:\n" + head.log())


def kill_tree(root: psutil.Process) -> list[psutil.Process]:
    """SIGKILL ``root`` and its descendants (collected first); return them."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
    return procs


def stop_head(head: Head) -> None:
    """Stop only this head: SIGTERM to its --block process (it shuts down what it started),
    then SIGKILL whatever of it is left (descendants, and processes carrying its marker)."""
    procs = head.processes()
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.proc.kill()
            head.proc.wait(timeout=10)
    deadline = time.time() + 10
    left = procs
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = [p for p in head.processes() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for proc in head.processes():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(head.processes(), timeout=10)
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def sim_config(dest: Path, gcs_port: int) -> Path:
    """clusters/local-sim.yaml as it is, but for a GCS on ``127.0.0.1:gcs_port``; written to ``dest``."""
    import yaml

    config = yaml.safe_load((REPO / "clusters" / "local-sim.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    dest.write_text(yaml.safe_dump(config))
    return dest
