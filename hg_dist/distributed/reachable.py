"""Can Ray's worker processes load ``build_solver``? Asked once, before any run starts.

A function reaches Ray's workers pickled: by value when it lives in ``__main__`` (or
in a module registered with ``ray.cloudpickle.register_pickle_by_value``), otherwise
by reference, as ``module.qualname``, which each worker imports. A module that only
the driver can import (a script's folder on the driver's ``sys.path``, a package not
installed where the workers run) then kills the Train controller or the Tune trial
with ``ActorDiedError: unexpected internal error``, which names nothing. Unpickling
the very bytes the workers would get, in one small Ray task, asks the same question
and gets an answer that names the module.
"""

from __future__ import annotations

from typing import Any

from hg_dist.experiment import ConfigError

__all__ = ["WorkerImportError", "check_loadable_on_workers"]


class WorkerImportError(ConfigError):
    """Ray's worker processes cannot load ``build_solver`` (a usage error: nothing was started)."""


def _load(blob: bytes) -> str | None:
    """On a worker: ``None`` if ``blob`` unpickles, else the error as ``"Type: message"``."""
    import ray.cloudpickle

    try:
        ray.cloudpickle.loads(blob)
    except Exception as error:  # noqa: BLE001 - any failure here is what the workers would meet
        return f"{type(error).__name__}: {error}"
    return None


def check_loadable_on_workers(build_solver: Any, timeout_s: float = 120.0) -> None:
    """Raise :class:`WorkerImportError` if a Ray worker process cannot unpickle ``build_solver``.

    Needs a connected Ray (``ray.init``); the probe is a task asking for no CPU, so it
    runs on a busy cluster too.
    """
    import ray
    import ray.cloudpickle

    blob = ray.cloudpickle.dumps(build_solver)
    error = ray.get(ray.remote(num_cpus=0, max_retries=0)(_load).remote(blob), timeout=timeout_s)
    if error is None:
        return
    module = getattr(build_solver, "__module__", "?")
    name = f"{module}.{getattr(build_solver, '__qualname__', type(build_solver).__name__)}"
    raise WorkerImportError(
        f"build_solver {name} cannot be loaded on the Ray workers ({error}): they import its module {module!r} "
        f"by name, and it is not on their path; run from the folder that holds it, install it where the workers "
        f"run, ship it with ray.init(runtime_env={{'py_modules': [...]}}) or {{'working_dir': ...}}, or call "
        f"ray.cloudpickle.register_pickle_by_value({module}) before starting")
