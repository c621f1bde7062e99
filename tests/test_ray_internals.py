"""Ray's internals, fenced off: hg_dist uses them only in ``hg_dist.distributed.ray_internals``.

* Everywhere else hg_dist imports only Ray's documented public modules and touches no
  ``ray._...`` attribute (checked on the source, by AST).
* Each internal use is probed here: when a Ray release changes one, its test fails with
  a message naming the use and the function that wraps it. CI runs this file once more
  against the newest Ray release (reporting, not gating).

All but the last test run without a Ray instance.
"""

from __future__ import annotations

import ast
import inspect
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402

from hg_dist.distributed import ray_internals  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[1] / "hg_dist"
FENCED = PACKAGE / "distributed" / "ray_internals.py"

PUBLIC_MODULES = {
    "ray", "ray.train", "ray.train.torch", "ray.tune", "ray.util", "ray.util.state", "ray.job_submission",
    "ray.util.placement_group",         # ray.util.placement_group / remove_placement_group (Ray Core API reference)
    "ray.tune.schedulers",              # ASHAScheduler, FIFOScheduler, TrialScheduler (Tune API reference)
    "ray.tune.search",                  # Searcher and the searcher integrations (Tune API reference)
    "ray.tune.search.optuna",           # OptunaSearch (Tune API reference: "tune.search.optuna.OptunaSearch")
    "ray.tune.search.basic_variant",    # BasicVariantGenerator (Tune API reference)
    "ray.tune.search.sample",           # Domain, Categorical, Float, Integer, Function: what tune.choice & co return
    "ray.tune.experiment",              # Trial, the argument of every ray.tune.Callback hook
    "ray.tune.integration.ray_train",   # TuneReportCallback (Ray's guide to Tune with Train v2)
    "ray.cloudpickle",                  # register_pickle_by_value (Ray's serialization guide)
}
"""Ray modules hg_dist may import outside the fenced module: the documented public API."""


def _failed(use: str, error: BaseException | str) -> str:
    return (f"Ray internal changed: {use} ({ray.__version__}): {error}. Update it in "
            f"hg_dist/distributed/ray_internals.py and its docstring table.")


def _modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path != FENCED)


def _ray_imports(tree: ast.AST) -> tuple[list[tuple[int, str]], set[str]]:
    """(line, imported Ray module) of every import, and the local names bound to Ray modules or objects."""
    found, names = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "ray" or alias.name.startswith("ray."):
                    found.append((node.lineno, alias.name))
                    names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and (node.module == "ray"
                                                                      or node.module.startswith("ray.")):
            for alias in node.names:
                found.append((node.lineno, f"{node.module}.{alias.name}" if alias.name.startswith("_")
                              else node.module))
                names.add(alias.asname or alias.name)
    return found, names


def _private_attributes(tree: ast.AST, roots: set[str]) -> list[tuple[int, str]]:
    """(line, dotted name) of every attribute chain on a Ray name with a component starting with ``_``."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        parts, base = [node.attr], node.value
        while isinstance(base, ast.Attribute):
            parts.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in roots:
            dotted = ".".join([base.id, *reversed(parts)])
            if any(part.startswith("_") and not part.startswith("__") for part in parts):
                found.append((node.lineno, dotted))
    return found


def test_outside_the_fenced_module_hg_dist_uses_only_rays_public_modules():
    offences = []
    for path in _modules():
        tree = ast.parse(path.read_text(), filename=str(path))
        imports, roots = _ray_imports(tree)
        where = path.relative_to(PACKAGE.parent)
        offences += [f"{where}:{line}: imports {module}" for line, module in imports
                     if module not in PUBLIC_MODULES]
        offences += [f"{where}:{line}: uses {name}" for line, name in _private_attributes(tree, roots | {"ray"})]
    assert not offences, ("Ray internals outside hg_dist/distributed/ray_internals.py (move them there, with a "
                          "row in its table and a test here):\n" + "\n".join(offences))


def test_the_ast_check_finds_what_it_must():
    """The checker itself: each kind of internal use is caught, public uses are not."""
    source = """
import ray._private.worker
from ray.train._internal.session import get_session
from ray.experimental.internal_kv import _internal_kv_get
from ray import tune
import ray.train
node = ray._private.worker._global_node
tune.Tuner._local_tuner
ray.train.report
"""
    tree = ast.parse(source)
    imports, roots = _ray_imports(tree)
    assert [module for _, module in imports if module not in PUBLIC_MODULES] == [
        "ray._private.worker", "ray.train._internal.session", "ray.experimental.internal_kv._internal_kv_get"]
    assert {name for _, name in _private_attributes(tree, roots | {"ray"})} >= {
        "ray._private.worker._global_node", "tune.Tuner._local_tuner"}
    assert "ray.train.report" not in {name for _, name in _private_attributes(tree, roots | {"ray"})}


def test_every_function_of_the_fenced_module_is_in_its_table():
    table = ray_internals.__doc__
    for name in ray_internals.__all__:
        if inspect.isfunction(getattr(ray_internals, name)) and not name.endswith("_of"):
            assert f"\n{name} " in table, f"{name} has no row in the table of hg_dist.distributed.ray_internals"


# ---- one probe per use, without a Ray instance ---------------------------------------------------

def test_bootstrap_address_canonicalize_bootstrap_address():
    use = "ray._private.services.canonicalize_bootstrap_address (bootstrap_address)"
    try:
        assert ray_internals.bootstrap_address("127.0.0.1:6379") == "127.0.0.1:6379"
        with pytest.raises(ValueError):
            ray_internals.bootstrap_address("not an address")
    except (ImportError, AttributeError, TypeError, AssertionError) as error:
        pytest.fail(_failed(use, error))


def test_started_local_head_global_node():
    use = "ray._private.worker._global_node and Node.head (started_local_head)"
    try:
        import ray._private.node
        import ray._private.worker

        assert hasattr(ray._private.worker, "_global_node"), "no _global_node"
        assert "head" in inspect.signature(ray._private.node.Node.__init__).parameters, "Node(head=...)"
        if not ray.is_initialized():
            assert ray_internals.started_local_head() is False
    except (ImportError, AttributeError, AssertionError) as error:
        pytest.fail(_failed(use, error))


def test_gcs_client_of_the_global_worker():
    use = "ray._private.worker.global_worker.gcs_client (gcs_client)"
    try:
        import ray._private.worker

        import ray._private.node

        assert hasattr(ray._private.worker, "global_worker"), "no global_worker"
        assert "worker.gcs_client = " in inspect.getsource(ray._private.worker.connect), \
            "connect() no longer sets global_worker.gcs_client"
        assert callable(ray._private.node.Node.get_gcs_client), "Node.get_gcs_client"
    except (ImportError, AttributeError, AssertionError, OSError, TypeError) as error:
        pytest.fail(_failed(use, error))


def test_cluster_config_bounds_reads_the_gcs_cluster_config():
    use = "ray._private.state.state.get_cluster_config / get_max_resources_from_cluster_config (cluster_config_bounds)"
    try:
        from ray._private.state import state
        from ray.core.generated.autoscaler_pb2 import ClusterConfig

        assert callable(state.get_cluster_config) and callable(state.get_max_resources_from_cluster_config)
        config = ClusterConfig()
        group = config.node_group_configs.add()
        group.resources["CPU"] = 2
        group.min_count, group.max_count = 0, 3
        assert ray_internals.config_bounds_of(config, {"CPU": 6}) == (True, {"CPU": 6.0})
        group.min_count = 3
        assert ray_internals.config_bounds_of(config, {"CPU": 6}) == (False, {"CPU": 6.0})
        assert ray_internals.config_bounds_of(ClusterConfig(), None) is None
    except (ImportError, AttributeError, AssertionError, ValueError) as error:
        pytest.fail(_failed(use, error))


def test_autoscaler_v2_enabled_is_autoscaler_v2():
    use = "ray.autoscaler.v2.utils.is_autoscaler_v2 (autoscaler_v2_enabled)"
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        assert {"fetch_from_server", "gcs_client"} <= set(inspect.signature(is_autoscaler_v2).parameters)
    except (ImportError, AssertionError) as error:
        pytest.fail(_failed(use, error))


def test_v2_demand_reads_get_cluster_status_reply():
    use = "GcsClient.get_cluster_status and autoscaler_pb2.GetClusterStatusReply (v2_demand)"
    try:
        from ray._raylet import InnerGcsClient
        from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

        assert callable(InnerGcsClient.get_cluster_status), "the GCS client's get_cluster_status"
        reply = GetClusterStatusReply()
        state = reply.autoscaling_state
        state.infeasible_gang_resource_requests.add().details = "abcd:PACK|..."
        state.pending_instance_requests.add().count = 2
        failed = state.failed_instance_requests.add()
        failed.ray_node_type_name, failed.reason = "gpu_worker", "quota"
        demand = ray_internals.v2_demand_of(reply.SerializeToString())
        assert demand == ray_internals.V2Demand(infeasible=("abcd:PACK|...",), launching=2,
                                                last_failure=("gpu_worker", "quota"))
    except (ImportError, AttributeError, AssertionError, ValueError) as error:
        pytest.fail(_failed(use, error))


def test_v1_autoscaler_status_internal_kv():
    use = "ray.experimental.internal_kv._internal_kv_get of ray_constants.DEBUG_AUTOSCALING_STATUS " \
          "(v1_autoscaler_status)"
    try:
        import ray._private.ray_constants as ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        assert ray_constants.DEBUG_AUTOSCALING_STATUS == "__autoscaling_status"
        assert "key" in inspect.signature(_internal_kv_get).parameters
    except (ImportError, AttributeError, AssertionError) as error:
        pytest.fail(_failed(use, error))


def test_replace_restored_callback_run_config_of_a_tuner():
    use = "tune.Tuner._local_tuner._run_config (replace_restored_callback)"
    from ray import tune

    class Old(tune.Callback):
        pass

    class Kept(tune.Callback):
        pass

    kept, new = Kept(), Old()
    try:
        tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(callbacks=[Old(), kept]))
        assert ray_internals.replace_restored_callback(tuner, Old, new), "no run config found"
        assert tuner._local_tuner._run_config.callbacks == [new, kept]
    except (AttributeError, AssertionError, TypeError) as error:
        pytest.fail(_failed(use, error))


def test_torch_backend_class_and_set_rank_env_vars():
    use = "ray.train.torch.config._TorchBackend and _set_torch_distributed_env_vars (torch_backend_class, " \
          "set_rank_env_vars)"
    try:
        from ray.train.backend import Backend
        from ray.train.torch.config import _set_torch_distributed_env_vars

        backend = ray_internals.torch_backend_class()
        assert issubclass(backend, Backend), "not a ray.train.backend.Backend"
        for hook in ("on_start", "on_shutdown", "on_training_start"):
            assert list(inspect.signature(getattr(backend, hook)).parameters) == [
                "self", "worker_group", "backend_config"], hook
        assert not inspect.signature(_set_torch_distributed_env_vars).parameters
        from hg_dist.distributed.process_group import NodeBoundTorchConfig
        assert NodeBoundTorchConfig().backend_cls.__mro__[1] is backend
    except (ImportError, AttributeError, AssertionError) as error:
        pytest.fail(_failed(use, error))


# ---- the same uses against a running Ray ---------------------------------------------------------

@pytest.mark.ray
def test_the_fenced_uses_answer_on_a_running_ray(ray_session):
    """On the session's local Ray (started by this process, no autoscaler): every wrapped call answers."""
    checks = {
        "started_local_head": lambda: ray_internals.started_local_head() is True,
        "gcs_client": lambda: ray_internals.gcs_client() is not None,
        "cluster_config_bounds": lambda: ray_internals.cluster_config_bounds() is None,
        "autoscaler_v2_enabled": lambda: isinstance(ray_internals.autoscaler_v2_enabled(), bool),
        "v1_autoscaler_status": lambda: ray_internals.v1_autoscaler_status() is None
        or isinstance(ray_internals.v1_autoscaler_status(), dict),
        "v2_demand": lambda: isinstance(ray_internals.v2_demand(timeout_s=10).launching, int),
    }
    for name, check in checks.items():
        try:
            assert check(), "unexpected answer"
        except Exception as error:  # noqa: BLE001 - any failure is reported with the use's name
            pytest.fail(_failed(f"hg_dist.distributed.ray_internals.{name}", f"{type(error).__name__}: {error}"))
