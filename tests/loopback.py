"""Loopback for the tests: a free port on 127.0.0.1, a gloo process group there, and which addresses our
commands' Ray listens on (a watcher for the tests that already start it).

Every command-line entry point starts a local Ray in one of two ways, after
``hg_dist.ray_env.prepare()`` (tests/test_first_hour.py checks, without Ray, that each sets
the variables before Ray is imported):

* examples/search.py: ``hg_dist.tune.launch.start_ray``; watched while tests/test_tune.py's
  main-job test runs the command itself;
* the examples' ``--workers N``, ``python -m hg_dist.tune.rerun`` and ``fit``:
  ``hg_dist.distributed.resources.connect()`` without an address, which is the bare
  ``ray.init()`` that examples/train_loop.py's ``TorchTrainer`` makes; watched in
  tests/test_clusters.py's recipe, whose first step starts it in a process of its own.

A run's Ray Train workers (Ray's servers, gloo's pairs, torch's rendezvous store on rank 0,
which :mod:`hg_dist.distributed.process_group` binds to the node's address) are watched in
tests/test_distributed.py's 2-worker ``fit``.

:class:`ListeningSockets` samples the process tree's listening TCP sockets (psutil reads
them; no traffic is sent) and :meth:`ListeningSockets.assert_loopback_only` checks that each
is on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RAY_VARIABLES = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED", "RAY_DEDUP_LOGS_SKIP_REGEX",
                 "RAY_COLOR_PREFIX", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world_size: int, port: int) -> Iterator[None]:
    """In a spawned test process: torch.distributed's default group (gloo, rendezvous on 127.0.0.1:``port``,
    one torch thread), destroyed on the way out."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the variables our entry points set for Ray (conftest sets one), so that a
    command shows what it does by itself; the repository on ``PYTHONPATH``; plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in RAY_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _is_loopback(ip: str) -> bool:
    return ip.removeprefix("::ffff:") in ("127.0.0.1", "::1") or ip.startswith("127.")


class ListeningSockets:
    """Samples the listening TCP sockets of ``pid`` and its descendants every ``interval`` s in a thread.

    ``seen`` holds ``(address, port, pid)``; ``names[pid]`` every name the process had (Ray renames a
    worker after the task it runs). Use as a context manager around the wait for the process.
    """

    def __init__(self, pid: int, interval: float = 0.3):
        self.pid, self.interval = pid, interval
        self.seen: set[tuple[str, int, int]] = set()
        self.names: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "ListeningSockets":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                self.names.setdefault(proc.pid, set()).add(proc.name())
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        self.seen.add((conn.laddr.ip, conn.laddr.port, proc.pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass

    def train_worker_sockets(self) -> set[tuple[str, int, int]]:
        """The listening sockets of Ray Train workers (torch's rendezvous store is on rank 0's)."""
        train_workers = {pid for pid, seen_as in self.names.items() if any("RayTrainWorker" in n for n in seen_as)}
        return {s for s in self.seen if s[2] in train_workers}

    def assert_loopback_only(self, what: str) -> None:
        """Ray's own servers were seen, and every socket listens on loopback."""
        shown = [(ip, port, sorted(self.names.get(pid, ()))) for ip, port, pid in sorted(self.seen)]
        everyone = set().union(*(self.names.get(pid, set()) for _, _, pid in self.seen))
        assert {"gcs_server", "raylet"} <= everyone, f"{what}: Ray's sockets were not seen: {shown}"
        outside = [(ip, port, sorted(self.names[pid])) for ip, port, pid in sorted(self.seen) if not _is_loopback(ip)]
        assert not outside, f"{what}: listening beyond loopback: {outside}"
