"""The reliability matrix of runs, the cases that need Ray (issue 23): each ends clear, naming the cause.

* a ``build_solver`` whose module Ray's workers cannot import is refused before any
  run starts, naming the module (it was ``ActorDiedError: unexpected internal
  error``, exit status 0);
* a search whose folder is deleted while it runs fails, saying so (it ended with
  exit status 0 and a folder recreated with a fraction of the search);
* resuming a search whose saved Tune state is damaged is refused, naming the folder.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
import ray.cloudpickle  # noqa: E402
from ray import tune  # noqa: E402
from ray.tune.schedulers import FIFOScheduler  # noqa: E402

from hg_dist.distributed import run_experiment  # noqa: E402
from hg_dist.distributed.reachable import WorkerImportError, check_loadable_on_workers  # noqa: E402
from hg_dist.experiment import ConfigError, ExperimentConfig, run_local  # noqa: E402
from hg_dist.tune import SearchExistsError, SearchFolderLostError, SearchOptions, run_search  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # trials load this module's functions by value

pytestmark = pytest.mark.ray

SPACE = {"approximator": {"name": "nystrom", "rank": 2, "rho": 0.1}, "outer_optimizer": {"name": "adam", "lr": 0.01},
         "num_iters": 20, "unroll_steps": 10}


def test_a_build_solver_module_the_workers_cannot_import_is_named(ray_session, tmp_path, monkeypatch):
    (tmp_path / "driver_only_module.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from examples.logistic_regression import build_solver as _build

        def build_solver(config, rank=0, world_size=1):
            return _build(config, rank, world_size)
        """))
    monkeypatch.syspath_prepend(str(tmp_path))               # on the driver's path only
    import driver_only_module

    check_loadable_on_workers(run_local)                     # a module the workers import: no complaint
    with pytest.raises(WorkerImportError, match=r"build_solver driver_only_module\.build_solver cannot be loaded on "
                                                r"the Ray workers \(ModuleNotFoundError: No module named "
                                                r"'driver_only_module'\).*register_pickle_by_value"):
        check_loadable_on_workers(driver_only_module.build_solver)
    config = ExperimentConfig(num_iters=20, unroll_steps=10, workers=2, output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"cannot be loaded on the Ray workers.*'driver_only_module'"):
        run_experiment(driver_only_module.build_solver, config)
    assert not (tmp_path / "out").exists()                   # refused before anything was written


def _at(folder: Path) -> "tune.RunConfig":
    """The search folder ``folder`` as Tune's ``RunConfig`` (``storage_path/name``)."""
    return tune.RunConfig(storage_path=str(folder.parent), name=folder.name)


def build_deleting_its_search(config, rank=0, world_size=1):
    """A trial that deletes the whole search folder (``<search>/trials/<trial>``), as a user's ``rm -r`` would."""
    sys.path.insert(0, str(ROOT))
    from examples.logistic_regression import build_solver

    shutil.rmtree(Path(config.output).parents[1], ignore_errors=True)
    return build_solver(config, rank, world_size)


def test_a_search_whose_folder_is_deleted_mid_run_fails_clearly(ray_session, tmp_path):
    output = tmp_path / "search"
    with pytest.raises(SearchFolderLostError, match=rf"the search folder {output} was deleted or moved while the "
                                                    rf"search ran \(search\.json is gone\).*start the search again"):
        run_search(build_deleting_its_search, SPACE, tune_config=tune.TuneConfig(scheduler=FIFOScheduler()),
                   run_config=_at(output),
                   options=SearchOptions(cpus_per_worker=0.5, progress=False, print_table=False, plot=False))
    assert not (output / "results.parquet").exists() and not (output / "best_config.json").exists()


def test_resume_of_a_search_whose_tune_state_is_damaged_is_named(ray_session, tmp_path):
    output = tmp_path / "search"
    output.mkdir(parents=True)          # the search folder is Tune's experiment folder
    (output / "search.json").write_text(json.dumps({"metric": "outer_loss", "mode": "min", "search": "random",
                                                    "num_samples": 1}))
    (output / "tuner.pkl").write_bytes(b"not a pickle")
    (output / "experiment_state-2026-01-01_00-00-00.json").write_text("{truncated")
    before = sorted(p.name for p in output.rglob("*"))
    with pytest.raises(SearchExistsError, match=rf"cannot resume the search in {output}: Tune cannot read its saved "
                                                rf"state in {output} .*it is damaged: start the search again"):
        run_search(build_deleting_its_search, SPACE, run_config=_at(output), resume=True,
                   options=SearchOptions(progress=False, print_table=False, plot=False))
    assert sorted(p.name for p in output.rglob("*")) == before
