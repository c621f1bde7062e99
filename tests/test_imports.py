"""Every ``hg_dist`` module imports on its own, as the first ``hg_dist`` module of a process.

A module that only imports after some other ``hg_dist`` module has been loaded (an
import cycle, a missing import hidden by a package ``__init__``) fails here. Starting
one interpreter per module costs an import of torch (and Ray) each, seconds apiece on
a loaded machine, so one interpreter imports the third-party libraries once and
forks a child per module: each child starts with no ``hg_dist`` module loaded and
imports exactly one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hg_dist"

THIRD_PARTY = ("torch", "numpy", "ray", "ray.train", "ray.train.torch", "ray.tune")
"""Imported once by the parent interpreter before forking (not what is under test)."""

PARALLEL = 4
"""Children importing at once (each mostly waits on the file system)."""


def module_names() -> list[str]:
    """Every module of the package, from the files (nothing is imported to list them)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


CHILD = r"""
import importlib, json, os, sys, traceback
for name in {third_party!r}:
    importlib.import_module(name)
assert not any(m == "hg_dist" or m.startswith("hg_dist.") for m in sys.modules)
pending, running, results = list({modules!r}), {{}}, {{}}


def start(name):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            message = ""
        except BaseException:
            message = traceback.format_exc() or "failed"
        os.write(write, message.encode()[:60000])  # fits the pipe: the parent reads after the child exits
        os._exit(0)
    os.close(write)
    running[pid] = (name, read)


while pending or running:
    while pending and len(running) < {parallel}:
        start(pending.pop(0))
    pid, status = os.wait()
    name, read = running.pop(pid)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    message = b"".join(chunks).decode()
    results[name] = message if status == 0 else message + f"child exited with status {{status}}"
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def import_results() -> dict[str, str]:
    """Module name → ``""`` if it imported alone, else the traceback."""
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    code = CHILD.format(third_party=THIRD_PARTY, modules=module_names(), parallel=PARALLEL)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_module_list_covers_the_package():
    names = module_names()
    assert {"hg_dist", "hg_dist.solver", "hg_dist.unrolled", "hg_dist.ihvp.nystrom",
            "hg_dist.distributed", "hg_dist.tune.trainable"} <= set(names)
    assert len(names) == len(set(names)) >= 50


@pytest.mark.parametrize("name", module_names())
def test_module_imports_alone(import_results, name):
    assert import_results[name] == "", f"importing {name} first failed:\n{import_results[name]}"


def test_unrolled_solver_is_one_class_under_both_import_paths():
    """The seed's path ``hg_dist.solver.BaseUnrolledSolver`` (also in ``from hg_dist.solver import *``) is the
    class of ``hg_dist.unrolled``; that the latter imports first, alone, is checked above."""
    import hg_dist.solver as solver
    import hg_dist.unrolled as unrolled

    assert solver.BaseUnrolledSolver is unrolled.BaseUnrolledSolver
    assert issubclass(unrolled.BaseUnrolledSolver, solver.BaseSolver)
    star: dict = {}
    exec("from hg_dist.solver import *", star)
    assert star["BaseUnrolledSolver"] is unrolled.BaseUnrolledSolver
    with pytest.raises(AttributeError, match="no attribute"):
        solver.NoSuchSolver  # noqa: B018
