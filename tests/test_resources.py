"""hg_dist.distributed.resources without a cluster: fitting workers on nodes, the decisions, the status line.

The cluster-facing paths (autoscaling or fixed read from a real head, the wait, the
errors end to end) run in tests/test_reliability_cluster.py and tests/test_fake_cluster.py.
"""

from __future__ import annotations

import io
import math
import socket
import time

import pytest

from hg_dist.distributed.resources import (CLUSTER_MAX_FAILURES, Cluster, InsufficientResourcesError, _reachable,
                                           _StatusLine, check_demand, check_timeout, default_max_failures,
                                           parse_duration, startup_retries, workers_that_fit)

CPU1 = {"CPU": 1.0}
GPU1 = {"CPU": 1.0, "GPU": 1.0}


def fixed(*nodes: dict[str, float]) -> Cluster:
    return Cluster(nodes=tuple(nodes), autoscaling=False, how="a test cluster without an autoscaler")


@pytest.mark.parametrize("nodes, bundle, fits", [
    ([{"CPU": 2}], CPU1, 2),
    ([{"CPU": 2}, {"CPU": 3}], CPU1, 5),
    ([{"CPU": 3}], {"CPU": 2}, 1),                        # a bundle is not split across nodes...
    ([{"CPU": 1}, {"CPU": 1}], {"CPU": 2}, 0),            # ...even when the total would hold it
    ([{"CPU": 8, "GPU": 1}, {"CPU": 8}], GPU1, 1),        # GPUs bound it
    ([{"CPU": 0.5}, {"CPU": 0.5}], {"CPU": 0.5}, 2),
    ([{}], CPU1, 0),                                      # a head that offers nothing
])
def test_workers_that_fit_counts_whole_bundles_per_node(nodes, bundle, fits):
    assert workers_that_fit(nodes, bundle) == fits


def test_fixed_cluster_too_small_names_asked_has_and_fix():
    cluster = fixed({"CPU": 2})
    check_demand(2, CPU1, cluster)                        # fits: no error
    with pytest.raises(InsufficientResourcesError) as caught:
        check_demand(3, CPU1, cluster)
    error = caught.value
    assert isinstance(error, ValueError) and error.asked == {"CPU": 3.0} and error.has == {"CPU": 2.0}
    assert str(error) == ("workers=3 × {CPU 1} asks for CPU 3, but this Ray cluster has CPU 2 in all (1 node) and "
                          "cannot grow (a test cluster without an autoscaler): at most 2 such workers fit. Fix: use "
                          "--workers 2 or fewer, or run on a larger cluster (docs/clusters.md)")
    with pytest.raises(InsufficientResourcesError, match=r"has CPU 2, GPU 0 in all .* at most 0 such workers fit\. "
                                                         r"Fix: drop --use-gpu to train on CPUs"):
        check_demand(1, GPU1, cluster)


def test_autoscaling_cluster_is_bounded_only_by_a_stated_maximum():
    unknown = Cluster(nodes=({},), autoscaling=None, how="the autoscaler decides", autoscaler="v2")
    check_demand(100, GPU1, unknown)                      # decided by the autoscaler, while waiting
    bounded = Cluster(nodes=({},), autoscaling=True, how="the cluster config", max_resources={"CPU": 8, "GPU": 4})
    check_demand(4, GPU1, bounded)
    with pytest.raises(InsufficientResourcesError, match=r"asks for CPU 5, GPU 5, but this autoscaling Ray cluster "
                                                         r"can grow to at most CPU 8, GPU 4"):
        check_demand(5, GPU1, bounded)


def test_default_max_failures_depends_on_the_cluster():
    assert default_max_failures(fixed({"CPU": 2})) == 0                   # one fixed machine
    assert default_max_failures(fixed({"CPU": 2}, {"CPU": 2})) == CLUSTER_MAX_FAILURES == 3
    assert default_max_failures(Cluster(nodes=({},), autoscaling=None, how="")) == 3
    assert default_max_failures(Cluster(nodes=({},), autoscaling=True, how="")) == 3


@pytest.mark.parametrize("text, seconds", [("1200", 1200.0), ("90s", 90.0), ("20m", 1200.0), ("20min", 1200.0),
                                           ("1.5h", 5400.0), (" 2m ", 120.0), (30, 30.0), (0.5, 0.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["0", "0s", "-5", "soon", "nan", "inf", "5x", "", "1e3"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="resource timeout"):
        parse_duration(text)


def test_check_timeout_and_startup_retries():
    with pytest.raises(TypeError, match="number of seconds"):
        check_timeout("20m")
    with pytest.raises(ValueError, match="> 0"):
        check_timeout(math.inf)
    # Ray Train retries a worker group that cannot start every 60 s: as many as fit in the timeout.
    assert startup_retries(1200) == 20 and startup_retries(61) == 2 and startup_retries(5) == 1


def test_status_line_refreshes_in_place_on_a_terminal_and_prints_changes_otherwise():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    line = _StatusLine(terminal)
    line.show("waiting for CPU 2; has CPU 0", "[1 s]")
    line.show("waiting for CPU 2; has CPU 1", "[2 s]")
    line.end("ready after 2 s")
    assert terminal.getvalue() == ("\r\x1b[Kwaiting for CPU 2; has CPU 0 [1 s]\r\x1b[Kwaiting for CPU 2; has CPU 1 [2 s]"
                                   "\r\x1b[Kready after 2 s\n")
    log = io.StringIO()
    line = _StatusLine(log)
    line.show("waiting; has CPU 0", "[1 s]")
    line.show("waiting; has CPU 0", "[2 s]")             # unchanged: not repeated (until 30 s pass)
    line.show("waiting; has CPU 1", "[3 s]")
    assert log.getvalue() == "waiting; has CPU 0 [1 s]\nwaiting; has CPU 1 [3 s]\n"


def test_a_refusing_address_is_given_up_in_seconds():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                         # bound, not listening: connections are refused
        started = time.monotonic()
        reason = _reachable("127.0.0.1", port, timeout_s=10)
        elapsed = time.monotonic() - started
    assert reason is not None and "refused" in reason.lower() and elapsed < 5
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert _reachable("127.0.0.1", server.getsockname()[1], timeout_s=10) is None


def test_fit_passes_the_cluster_defaults_to_ray_train(monkeypatch, tmp_path):
    """fit(): the restarts default from the cluster (3 on a cluster; a given ray.train.RunConfig is kept as
    it is), and the resource timeout bounds Ray Train's retries of a worker group that cannot start."""
    pytest.importorskip("ray")
    import ray.train.torch

    from ray.train import FailureConfig, RunConfig

    from hg_dist.distributed import FitOptions, runner
    from hg_dist.experiment import ExperimentConfig

    seen = {}

    class Trainer:
        def __init__(self, *args, run_config, **kwargs):
            seen["failure_config"] = run_config.failure_config

        def fit(self):
            return "result"

    clusters = {"one": fixed({"CPU": 2}), "many": fixed({"CPU": 2}, {"CPU": 2})}
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    monkeypatch.setattr(runner, "validate", lambda build_solver, config, options: config.workers)
    monkeypatch.setattr(runner, "check_loadable_on_workers", lambda build_solver: None)   # no Ray in this test
    for name, cluster in clusters.items():
        monkeypatch.setattr(runner, "prepare_workers", lambda workers, bundle, timeout_s, cluster=cluster: cluster)
        config = ExperimentConfig(workers=2, output=str(tmp_path / name))
        assert runner.fit(lambda *a, **k: None, config, options=FitOptions(resource_timeout_s=300)) == "result"
        assert seen["failure_config"].max_failures == {"one": 0, "many": 3}[name]
        assert seen["failure_config"].controller_failure_limit == 5          # 300 s / Train's 60 s start timeout
        given = RunConfig(name="mine", storage_path=str(tmp_path / "ray"), failure_config=FailureConfig(max_failures=1))
        assert runner.fit(lambda *a, **k: None, config, run_config=given) == "result"
        assert seen["failure_config"] == given.failure_config


def test_a_v1_autoscaler_that_has_not_named_node_types_is_no_verdict(monkeypatch):
    """A head that has just started: the v1 autoscaler's first reports map no node types. The verdict
    waits (up to ``status_wait_s``) for a report that names them, and without one it stays open
    (``None``) rather than "can grow", so the wait re-reads it (the fixed head of
    test_reliability_cluster once waited 5 min for GPUs it could never get)."""
    import ray

    from hg_dist.distributed import resources

    reports = iter([{}, {}, {"autoscaler_report": {"node_type_mapping": {"ab12": "node_ab12"}}}])
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}])
    monkeypatch.setattr(resources.ray_internals, "started_local_head", lambda: False)
    monkeypatch.setattr(resources.ray_internals, "cluster_config_bounds", lambda: None)
    monkeypatch.setattr(resources, "_autoscaler_version", lambda: "v1")
    monkeypatch.setattr(resources.ray_internals, "v1_autoscaler_status", lambda: next(reports))
    monkeypatch.setattr(resources.time, "sleep", lambda seconds: None)
    cluster = resources.inspect_cluster(status_wait_s=10)
    assert cluster.autoscaling is False and "no node types to add" in cluster.how
    monkeypatch.setattr(resources.ray_internals, "v1_autoscaler_status", lambda: {})
    undecided = resources.inspect_cluster(status_wait_s=0)
    assert undecided.autoscaling is None and "not reported node types yet" in undecided.how
    check_demand(2, GPU1, undecided)          # no verdict, no error: the wait decides


def test_the_wait_stops_at_once_when_a_later_verdict_says_fixed_and_too_small(ray_session, monkeypatch):
    """wait_for_resources re-reads the cluster while it waits; once that says "fixed" and the demand
    cannot fit, it raises the fixed-cluster error instead of waiting for the timeout."""
    from hg_dist.distributed import resources

    later = Cluster(nodes=({"CPU": 4.0},), autoscaling=False, how="its autoscaler has no node types to add")
    monkeypatch.setattr(resources, "inspect_cluster", lambda status_wait_s=10.0: later)
    undecided = Cluster(nodes=({"CPU": 4.0},), autoscaling=None, how="not reported yet", autoscaler="v1")
    started = time.monotonic()
    with pytest.raises(InsufficientResourcesError, match=r"Fix: drop --use-gpu"):
        resources.wait_for_resources(2, GPU1, timeout_s=120, cluster=undecided, stream=io.StringIO())
    assert time.monotonic() - started < 30
