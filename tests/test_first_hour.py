"""A new user's first hour: Ray stays on loopback and quiet, and the cluster recipe works after the Quick start.

* :mod:`hg_dist.ray_env` without Ray: the environment our entry points give Ray, the
  noise filter (checked against Ray's own log deduplicator and the raylet's message),
  colour codes off a terminal, the loopback warning, and that every example and
  ``python -m hg_dist.tune.rerun`` set the variables before Ray is imported.

Where Ray listens when an entry point starts it is checked by the tests that run each one
(tests/loopback.py); the cluster recipe after the Quick start is tests/test_clusters.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hg_dist import ray_env
from loopback import clean_env

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.stem for p in (REPO / "examples").glob("*.py"))
RAYLET_WARNING = ("WARNING: 14 PYTHON worker processes have been started on node: 5e0a with address: 127.0.0.1, "
                  "which is 7x the maximum expected startup concurrency (2). This could be a result of using a "
                  "large number of actors, tasks blocked in ray.get() calls, or tasks with fractional CPU "
                  "requests (e.g., num_cpus=0.1) allowing high concurrency.")


# ---- hg_dist.ray_env, no Ray ------------------------------------------------------------------

@pytest.mark.parametrize("address, loopback", [("", True), ("local", True), ("auto", True),
                                               ("127.0.0.1:6379", True), ("localhost:6379", True),
                                               ("ray://127.0.0.1:10001", True), ("http://[::1]:8265", True),
                                               ("10.0.0.5:6379", False), ("ray://head.example.com:10001", False)])
def test_prepare_sets_what_the_user_did_not(address, loopback):
    environ = {"RAY_ADDRESS": address} if address else {}
    set_here = ray_env.prepare(environ=environ, terminal=False)
    assert environ["RAY_USAGE_STATS_ENABLED"] == "0" and environ["RAY_COLOR_PREFIX"] == "0"
    assert environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == ray_env.RAY_NOISE
    assert (environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0") is loopback
    assert set(set_here) == set(environ) - {"RAY_ADDRESS"}

    mine = {"RAY_USAGE_STATS_ENABLED": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_COLOR_PREFIX": "1"}
    environ = dict(mine)
    ray_env.prepare(environ=environ, terminal=False)
    assert {k: environ[k] for k in mine} == mine                    # the user's settings win


def test_verbose_keeps_rays_warnings_and_terminal_keeps_colours():
    environ = {}
    ray_env.prepare(environ=environ, terminal=False)
    assert "RAY_DEDUP_LOGS_SKIP_REGEX" in environ
    ray_env.prepare(environ=environ, verbose=True, terminal=True)
    assert "RAY_DEDUP_LOGS_SKIP_REGEX" not in environ               # the filter an earlier call set is gone
    environ = {"RAY_DEDUP_LOGS_SKIP_REGEX": "mine"}
    ray_env.prepare(environ=environ, verbose=True, terminal=True)
    assert environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == "mine" and "RAY_COLOR_PREFIX" not in environ
    logger = logging.getLogger(ray_env.QUIET_LOGGERS[0])
    assert logger.getEffectiveLevel() == logging.WARNING
    ray_env.quiet_ray_loggers(verbose=False)
    assert logger.getEffectiveLevel() == logging.ERROR
    assert not logger.isEnabledFor(logging.WARNING)


def test_noise_filter_drops_rays_internal_warnings_in_rays_own_deduplicator():
    """RAY_DEDUP_LOGS_SKIP_REGEX as Ray's log deduplicator applies it (built here, nothing started)."""
    from ray._private.ray_logging import LogDeduplicator

    run_lines = ["hg_dist: workers=2 × {CPU 1} (CPU 2) ready after 11 s", "step 20: val_acc 0.91",
                 "Traceback (most recent call last):", "ValueError: rank must be >= 1"]
    noise = [RAYLET_WARNING,
             "[2026-12-07 09:00:38,961 E 15075 15181] core_worker.cc:2465: Actor with class name: "
             "'PreemptionWatcher' and ID: '8cf2' has constructor arguments in the object store and max_restarts > 0.",
             "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."]
    for skip, kept in ((ray_env.RAY_NOISE, run_lines), (None, run_lines + noise)):
        dedup = LogDeduplicator(5, None, skip, _timesource=lambda: 0.0)
        out = dedup.deduplicate({"ip": "127.0.0.1", "pid": "raylet", "lines": noise + run_lines})
        assert sorted(line for batch in out for line in batch["lines"]) == sorted(kept)


def test_colour_codes_are_stripped_off_a_terminal(capsys):
    text = "Started a local Ray instance. View the dashboard at \x1b[1m\x1b[32mhttp://127.0.0.1:8265 \x1b[39m\x1b[22m"
    assert ray_env.strip_ansi(text) == "Started a local Ray instance. View the dashboard at http://127.0.0.1:8265 "
    logger = logging.getLogger("hg_dist.test.colour")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    logger.addFilter(ray_env.StripAnsi())
    try:
        logger.warning("%s at %s%s%s", "dashboard", "\x1b[32m", "http://127.0.0.1:8265", "\x1b[39m")
    finally:
        logger.removeHandler(handler)
    assert capsys.readouterr().err == "dashboard at http://127.0.0.1:8265\n"


def test_loopback_warning_names_the_fix():
    assert ray_env.loopback_warning("127.0.0.1") is None and ray_env.loopback_warning("::1") is None
    message = ray_env.loopback_warning("192.0.2.2")
    assert "192.0.2.2" in message and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in message
    assert "--node-ip-address=127.0.0.1" in message


@pytest.mark.parametrize("node_ip, warns", [("192.0.2.2", True), ("127.0.0.1", False)])
def test_fit_and_run_search_warn_when_the_ray_they_start_is_not_on_loopback(monkeypatch, node_ip, warns):
    """connect() (fit's and run_search's way to Ray) and start_ray (examples/search.py's) warn with the fix
    after starting a local Ray whose node address is not loopback (ray.init stubbed: nothing starts)."""
    import warnings

    import ray
    import ray._private.services as services

    from hg_dist.distributed import resources
    from hg_dist.tune import launch

    started = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda address=None, **kwargs: started.append(address))
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda address: None)  # no cluster here
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: node_ip)
    for start in (resources.connect, launch.start_ray):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start()
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert started.pop() in (None, "local")
        if warns:
            assert len(messages) == 1 and node_ip in messages[0] and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in messages[0]
        else:
            assert messages == []


def test_launched_as():
    assert ray_env.launched_as("hg_dist.tune.rerun", ["python", "-X", "dev", "-m", "hg_dist.tune.rerun", "x"])
    assert not ray_env.launched_as("hg_dist.tune.rerun", ["python", "-m", "hg_dist.tune.search"])
    assert not ray_env.launched_as("hg_dist.tune.rerun", ["python", "script.py", "-m"])
    assert ray_env.verbose_flag(["--workers", "2", "-v"]) and not ray_env.verbose_flag(["--workers", "2"])


EXAMPLES_PROBE = """
import os, sys
sys.path.insert(0, "examples")
names = {names!r}
keys = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_USAGE_STATS_ENABLED", "RAY_DEDUP_LOGS_SKIP_REGEX")
for name in names:
    for key in keys:
        os.environ.pop(key, None)
    module = __import__(name)
    try:
        module.main(["--num-iters", "-1"])   # a usage error after parsing: no run, no Ray
    except SystemExit:
        pass
    assert "ray" not in sys.modules, name
    print(name, *(os.environ.get(key) is not None for key in keys), os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"])
import ray._private.ray_constants as c
print("ENABLE_RAY_CLUSTER", c.ENABLE_RAY_CLUSTER)
"""


def test_examples_prepare_ray_before_importing_it():
    """Each example's ``main`` (hg_dist.cli) sets the variables before a run imports Ray (stopped here by a
    usage error after parsing, so no Ray starts); Ray imported afterwards reads ENABLE_RAY_CLUSTER = False."""
    names = [e for e in EXAMPLES if e != "search"]
    proc = subprocess.run([sys.executable, "-c", EXAMPLES_PROBE.format(names=names)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"{name} True True True 0" for name in names] + ["ENABLE_RAY_CLUSTER False"]


@pytest.mark.parametrize("module_args", [["examples/search.py", "--help"], ["-m", "hg_dist.tune.rerun", "--help"]])
def test_search_and_rerun_set_the_variables_before_ray_is_imported(module_args, tmp_path):
    """A ``sitecustomize`` on the path records, at the moment ``ray`` is first imported, what Ray will read."""
    (tmp_path / "sitecustomize.py").write_text(
        "import builtins, os\n"
        "_import = builtins.__import__\n"
        "def _record(name, *args, **kwargs):\n"
        "    if (name == 'ray' or name.startswith('ray.')) and 'HG_PROBE_SEEN' not in os.environ:\n"
        "        os.environ['HG_PROBE_SEEN'] = '1'\n"
        "        print('AT_RAY_IMPORT', os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'),\n"
        "              os.environ.get('RAY_USAGE_STATS_ENABLED'), flush=True)\n"
        "    return _import(name, *args, **kwargs)\n"
        "builtins.__import__ = _record\n")
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, *module_args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AT_RAY_IMPORT 0 0" in proc.stdout, proc.stdout[:2000]
    assert "-v, --verbose" in proc.stdout


# Every entry point's Ray listens on 127.0.0.1 only: checked while the tests that already run each command
# run it (tests/loopback.py names them). The cluster recipe after the Quick start, in a fresh HOME, is
# tests/test_clusters.py::test_local_recipe.
