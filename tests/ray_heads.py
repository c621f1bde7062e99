"""Ray heads that a test owns, started and used with the commands of docs/clusters.md.

Used by tests/test_clusters.py, tests/test_fake_cluster.py and tests/test_reliability_cluster.py.

* :func:`doc_block` finds a command block of docs/clusters.md by a phrase in it;
  :data:`DOC_BLOCKS` names every block outside the sections marked "needs an AWS
  account" and which test runs it (tests/test_clusters.py checks that the list and the
  file agree).
* :func:`start_head` runs a doc block that starts a head (``export ...`` then
  ``ray start --head --block ...``) with the ports of the doc (6379, 8265) replaced by
  free ones and isolation flags appended: a short ``--temp-dir`` of its own (so a bare
  ``ray.init()`` elsewhere never finds it), every other port chosen free, and token
  auth with a token of its own (never ``~/.ray/auth_token``, which other local Ray
  instances use) or auth disabled.
* :func:`run_block` runs a doc block of client commands through bash, with the same
  replacements (and ``/tmp/hg_dist_runs`` replaced by a test folder).
* Every process a head starts inherits a marker variable (``HG_DIST_TEST_HEAD``), so
  that :func:`stop_head` finds them all — Ray renames its workers ``ray::...`` and
  some get re-parented — without ever running ``ray stop``, which would stop other
  people's Ray instances on this machine.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
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
DOC = REPO / "docs" / "clusters.md"
MARKER = "HG_DIST_TEST_HEAD"
CLOUD = "needs an AWS account"
DOC_GCS_PORT, DOC_DASHBOARD_PORT, DOC_RUNS = "6379", "8265", "/tmp/hg_dist_runs"

# Every command block of docs/clusters.md outside the AWS sections: a phrase that finds it,
# and the test that runs it.
FIXED_HEAD = "--port=6379 --dashboard-port=8265 --num-cpus=2"
FIXED_JOB = "--submission-id lr2"
FIXED_TOO_MANY = "--workers 5 --output /tmp/hg_dist_runs/too-many"
SIM_HEAD = "--autoscaling-config=clusters/local-sim.yaml"
SIM_JOB = "--output /tmp/hg_dist_runs/sim-lr2"
SIM_SEARCH = "--output /tmp/hg_dist_runs/sim-search"
DOC_BLOCKS = {
    FIXED_HEAD: "tests/test_clusters.py::test_local_recipe",
    FIXED_JOB: "tests/test_clusters.py::test_local_recipe",
    FIXED_TOO_MANY: "tests/test_clusters.py::test_local_recipe",
    SIM_HEAD: "tests/test_fake_cluster.py (the module's head)",
    SIM_JOB: "tests/test_fake_cluster.py::test_two_worker_job_starts_from_zero_worker_nodes",
    SIM_SEARCH: "tests/test_fake_cluster.py::test_search_makes_the_cluster_grow",
}


# ---- docs/clusters.md ------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """A fenced code block of the doc: its headings (outermost first), language and text."""

    headings: tuple[str, ...]
    language: str
    text: str

    @property
    def cloud(self) -> bool:
        return any(CLOUD in heading for heading in self.headings)


def doc_blocks(path: Path = DOC) -> list[Block]:
    blocks, headings, lines = [], {}, path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"(#+) (.*)", line)
        if heading:
            level = len(heading.group(1))
            headings = {k: v for k, v in headings.items() if k < level}
            headings[level] = heading.group(2)
        fence = re.match(r"```(\w*)\s*$", line)
        if fence:
            end = i + 1
            while not lines[end].startswith("```"):
                end += 1
            blocks.append(Block(tuple(headings[k] for k in sorted(headings)), fence.group(1),
                                "\n".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


def doc_block(phrase: str) -> str:
    """The one ``bash`` block of docs/clusters.md that contains ``phrase``."""
    found = [block.text for block in doc_blocks() if block.language == "bash" and phrase in block.text]
    assert len(found) == 1, f"{len(found)} bash blocks of {DOC.name} contain {phrase!r}"
    return found[0]


def doc_output_after(phrase: str) -> str:
    """The output block (a fence without a language) that follows the bash block containing ``phrase``."""
    blocks = doc_blocks()
    for block, after in zip(blocks, blocks[1:]):
        if block.language == "bash" and phrase in block.text and after.language == "":
            return after.text
    raise AssertionError(f"no output block after the block with {phrase!r}")


# ---- heads ---------------------------------------------------------------------------------

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
    """A running head: ``gcs`` (``127.0.0.1:PORT``: drivers, ``ray status``), ``url`` (the dashboard
    and job API), ``env`` (for clients: the CLI, drivers), ``headers`` (the auth token, if any)."""

    proc: subprocess.Popen
    temp_dir: str
    gcs: str
    url: str
    env: dict[str, str]
    marker: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def gcs_port(self) -> str:
        return self.gcs.rsplit(":", 1)[1]

    @property
    def dashboard_port(self) -> str:
        return self.url.rsplit(":", 1)[1]

    def log(self) -> str:
        path = Path(self.temp_dir) / "ray-start.log"
        return path.read_text()[-4000:] if path.exists() else ""

    def processes(self) -> list[psutil.Process]:
        """Every live process this head started: its descendants, and anything carrying its marker."""
        found = {}
        try:
            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
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

    def substitute(self, text: str, runs: Path | None = None) -> str:
        """A doc block for this head: its ports instead of the doc's, ``runs`` for /tmp/hg_dist_runs."""
        text = text.replace(DOC_GCS_PORT, self.gcs_port).replace(DOC_DASHBOARD_PORT, self.dashboard_port)
        return text.replace(DOC_RUNS, str(runs)) if runs is not None else text


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, cleaned for a Ray client or head on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS")}
    for key in ("NO_PROXY", "no_proxy"):  # the CLI talks HTTP to 127.0.0.1 directly
        env[key] = ",".join(filter(None, ["127.0.0.1,localhost", env.get(key)]))
    # `python` and `ray` are this interpreter's (as on a node of the cluster configs).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.update(extra or {})
    return env


def _parse_start(block: str) -> tuple[dict[str, str], list[list[str]], list[str]]:
    """(the ``export``ed variables, the other ``ray`` commands before it, the ``ray start`` argv) of a doc
    block that starts a head. A command's ``> /dev/null`` is dropped (its output goes to the test's log)."""
    env, before, argv = {}, [], None
    for command in block.replace("\\\n", " ").splitlines():
        words = shlex.split(command, comments=True)
        if words[-2:] == [">", "/dev/null"]:
            words = words[:-2]
        if not words:
            continue
        if words[0] == "export":
            env.update(word.split("=", 1) for word in words[1:])
        elif words[:2] == ["ray", "start"]:
            argv = ray_cli() + words[1:]
        elif words[:2] == ["ray", "get-auth-token"] and argv is None:
            before.append(ray_cli() + words[1:])
        else:
            raise AssertionError(f"unexpected command in a head block: {command!r}")
    assert argv is not None, f"no `ray start` in {block!r}"
    return env, before, argv


def start_head(block: str, *, token: bool = True, extra_env: dict[str, str] | None = None,
               timeout: float = 120, home: Path | None = None) -> Head:
    """Run a doc block that starts a head (``--block``), isolated as the module docs say; wait
    until its job API answers.

    ``home``: run the block as a user whose home folder that is (``HOME=home``, also in the
    clients' environment ``Head.env``), with the authentication the doc's own commands set up
    (its ``RAY_AUTH_MODE`` and ``ray get-auth-token``, the token file under ``home``) instead
    of ``token``; the clients' environment then carries no ``RAY_AUTH_*`` (the doc's client
    blocks must set what they need). Without ``home`` the block's ``ray get-auth-token`` is not
    run: ``token`` decides."""
    temp_dir = tempfile.mkdtemp(prefix="hgray-")  # short: Ray's unix sockets live under it (108 bytes)
    (gcs, dashboard, client, agent_listen, agent_grpc, runtime_env_agent, metrics, node_manager,
     object_manager, autoscaler_metrics, *worker_ports) = free_ports(10 + 24)
    text = block.replace(DOC_GCS_PORT, str(gcs)).replace(DOC_DASHBOARD_PORT, str(dashboard))
    if "clusters/local-sim.yaml" in text:
        text = text.replace("clusters/local-sim.yaml", str(sim_config(Path(temp_dir) / "local-sim.yaml", gcs)))
    doc_env, before, argv = _parse_start(text)
    assert "--block" in argv, "a head the test owns must run in the foreground (--block)"
    argv += [
        f"--temp-dir={temp_dir}", "--disable-usage-stats", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_listen}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
        f"--worker-port-list={','.join(map(str, worker_ports))}", "--object-store-memory=100000000",
    ]
    marker = secrets.token_hex(8)
    env = client_env({MARKER: marker, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                      "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics), **doc_env})
    headers = {}
    if home is not None:
        for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(key, None)
        env["HOME"] = str(home)
    elif token:
        secret = secrets.token_hex(32)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secret)
        headers = {"Authorization": f"Bearer {secret}"}
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    env.update(extra_env or {})
    log = open(Path(temp_dir) / "ray-start.log", "w")
    if home is not None:
        for command in before:
            subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log, check=True, timeout=60)
        token_file = home / ".ray" / "auth_token"
        if env.get("RAY_AUTH_MODE") == "token" and token_file.exists():
            headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    log.close()
    if home is not None:
        clients = {k: v for k, v in client_env({"HOME": str(home)}).items() if not k.startswith("RAY_AUTH")}
    else:
        clients = client_env({key: env[key] for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") if key in env})
    head = Head(proc=proc, temp_dir=temp_dir, gcs=f"127.0.0.1:{gcs}", url=f"http://127.0.0.1:{dashboard}",
                env=clients, marker=marker, headers=headers)
    try:
        _wait_for_dashboard(head, timeout)
    except BaseException:
        stop_head(head)
        raise
    return head


def run_block(head: Head, block: str, runs: Path, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a doc block of client commands with bash (``set -eo pipefail``), from the repository root."""
    script = "set -eo pipefail\n" + head.substitute(block, runs)
    return subprocess.run(["bash", "-c", script], cwd=REPO, env={**head.env, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


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
    _kill_all(procs)
    return procs


def _kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL every process of ``procs`` that is still there, and wait (10 s at most) for them."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def stop_head(head: Head) -> None:
    """Stop only this head: SIGTERM to its --block process (it shuts down what it started),
    then SIGKILL whatever of it is left (descendants, and processes carrying its marker)."""
    if head.proc.poll() is None:
        head.proc.send_signal(signal.SIGTERM)
        try:
            head.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            head.proc.kill()
            head.proc.wait(timeout=10)
    deadline = time.time() + 10
    while _running(head.processes()) and time.time() < deadline:
        time.sleep(0.5)
    _kill_all(_running(head.processes()))
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of ``procs`` that still run (zombies excluded)."""
    running = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
        except psutil.NoSuchProcess:
            pass
    return running


def sim_config(dest: Path, gcs_port: int) -> Path:
    """clusters/local-sim.yaml as it is, but for a GCS on ``127.0.0.1:gcs_port``; written to ``dest``."""
    import yaml

    config = yaml.safe_load((REPO / "clusters" / "local-sim.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs_port}"
    dest.write_text(yaml.safe_dump(config))
    return dest
