"""Shared fixtures. One local Ray session serves every Ray test (ray.init costs ~10 s)."""

from __future__ import annotations

import os

import pytest
from loopback import free_port

# Ray binds to 127.0.0.1 only (no traffic leaves loopback). Ray reads this when it is imported, so it is
# set here, before any test module imports ray.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

# On a pytest-xdist worker, one thread per worker: two workers with torch's default thread count each would
# oversubscribe the cores (processes the tests start inherit OMP_NUM_THREADS).
# (torch is imported here and in the fixtures, not at the top: pytest-xdist's controller process loads this file
# too, and runs no test.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


# Test tiers. ``python -m pytest -q -m "not ray and not cluster"`` is the quick loop; the full command runs all.
# A test that takes one of these fixtures starts Ray (``ray``) or a ``ray start`` cluster of its own (``cluster``)
# and is marked so here; tests that start Ray some other way (a subprocess) carry the marker themselves.
RAY_FIXTURES = frozenset({"ray_session"})
CLUSTER_FIXTURES = frozenset({"fixed", "busy", "sim", "fixed_head"})


# The suite runs on two pytest-xdist workers (``-n 2 --dist loadgroup`` in pyproject.toml's addopts). The Ray
# and cluster tests are one group that one worker runs in order, first (they share that worker's Ray session,
# and two Ray instances competing for 2 cores would slow both); the other tests fill both workers, those that
# share a module-scoped fixture kept together so that the fixture is built once.
RAY_GROUP = "ray"


def _starts_ray(item) -> bool:
    return item.get_closest_marker("ray") is not None or item.get_closest_marker("cluster") is not None


def _uses_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values())


def pytest_itemcollected(item):
    """Markers and groups as each test is collected (pytest-xdist reads the groups in its own
    ``pytest_collection_modifyitems``, which may run before ours)."""
    names = set(getattr(item, "fixturenames", ()))
    if names & CLUSTER_FIXTURES:
        item.add_marker(pytest.mark.cluster)
    elif names & RAY_FIXTURES:
        item.add_marker(pytest.mark.ray)
    if _starts_ray(item):
        item.add_marker(pytest.mark.xdist_group(RAY_GROUP))
    elif _uses_module_fixture(item):
        item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not _starts_ray(item))     # stable: the Ray group first, each part in file order


def pytest_collection_finish(session):
    """On a pytest-xdist worker with ``--dist loadgroup``: every Ray test carries the group in its node id (the
    scheduler reads nothing else), or the run stops here instead of starting Ray tests on both workers."""
    if getattr(session.config.option, "loadgroup", False):
        lost = [item.nodeid for item in session.items if _starts_ray(item) and not item.nodeid.endswith("@" + RAY_GROUP)]
        if lost:
            raise pytest.UsageError(f"pytest-xdist did not group {len(lost)} Ray tests (e.g. {lost[0]}); pytest "
                                    f"9.2 breaks its grouping (install the test extra: pytest<9.2), or run with -n 0")


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Tests compare numbers against ground truth in float64."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A local Ray instance for the whole test session (4 logical CPUs on 2 cores).

    ``address="local"`` forces a fresh instance even if a ``ray start`` cluster is
    running on this machine (the cluster tests start one of their own).
    """
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Without a dashboard of its own, Ray's state API (which Ray Train's placement-group cleaner polls to see
    # whether the controller lives) asks 127.0.0.1:8265, where another Ray instance on this machine may
    # answer "no such actor" and get the run's workers removed. A port nobody listens on makes it fail cleanly.
    ray.init(address="local", num_cpus=4, include_dashboard=False, dashboard_port=free_port(), log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()
