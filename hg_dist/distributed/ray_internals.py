"""Every use hg_dist makes of Ray's internals, in one place.

Everywhere else hg_dist imports only Ray's documented public modules (checked by
``tests/test_ray_internals.py``, which also probes each use below, so that a Ray
release that changes one fails a test naming it). Each function here wraps one use;
its callers see plain Python values.

=========================  ===============================================  ==============================================  ======
function                   Ray internal it uses                             why there is no public API for it               tested
=========================  ===============================================  ==============================================  ======
bootstrap_address          ``ray._private.services``                        ``ray.init`` resolves ``None``/``"auto"`` but   2.60
                           ``.canonicalize_bootstrap_address``              connects at once: a dead address cannot be
                                                                            checked first
started_local_head         ``ray._private.worker._global_node.head``        nothing public says "this process started       2.60
                                                                            the Ray it is connected to"
gcs_client                 ``ray._private.worker.global_worker``            the two autoscaler v2 calls below need the      2.60
                           ``.gcs_client``                                  connected driver's GCS client
cluster_config_bounds      ``ray._private.state.state``                     the cluster config that managed autoscalers     2.60
                           ``.get_cluster_config`` and                      (KubeRay) publish is read only by Ray Train's
                           ``.get_max_resources_from_cluster_config``       internals
autoscaler_v2_enabled      ``ray.autoscaler.v2.utils.is_autoscaler_v2``     the autoscaler v2 SDK is not marked public      2.60
v2_demand                  ``GcsClient.get_cluster_status`` and             ``ray.autoscaler.v2.sdk.get_cluster_status``    2.60
                           ``ray.core.generated.autoscaler_pb2``            leaves out infeasible requests, the one thing
                           ``.GetClusterStatusReply``                       needed here
v1_autoscaler_status       ``ray.experimental.internal_kv``                 what ``ray status`` prints for autoscaler v1    2.60
                           ``._internal_kv_get`` of                         has no API (``ray.autoscaler.sdk`` only
                           ``ray._private.ray_constants``                   requests resources)
                           ``.DEBUG_AUTOSCALING_STATUS``
replace_restored_callback  ``Tuner._local_tuner._run_config``               ``Tuner.restore`` takes no ``run_config``; the  2.60
                                                                            restored callbacks are unpickled copies that
                                                                            print nowhere
torch_backend_class        ``ray.train.torch.config._TorchBackend``         a ``TorchConfig`` that sets the process group   2.60
                                                                            up differently subclasses the backend Ray
                                                                            Train's torch support runs on the workers
set_rank_env_vars          ``ray.train.torch.config``                       the variables torchrun sets (``RANK``,          2.60
                           ``._set_torch_distributed_env_vars``             ``LOCAL_RANK``, ...) are set by this function
                                                                            only
=========================  ===============================================  ==============================================  ======

"tested": the first Ray release on which hg_dist's tests checked the use (the range they
pass on is pinned in ``pyproject.toml``). CI runs ``tests/test_ray_internals.py`` once
more against the newest Ray release, reporting without gating.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["V2Demand", "autoscaler_v2_enabled", "bootstrap_address", "cluster_config_bounds", "gcs_client",
           "replace_restored_callback", "set_rank_env_vars", "started_local_head", "torch_backend_class",
           "v1_autoscaler_status", "v2_demand", "v2_demand_of"]


def bootstrap_address(address: str | None) -> str | None:
    """The GCS address ``ray.init(address)`` would connect to (``None``: start a new local instance).

    Raises:
        ValueError: a malformed address (Ray's "Invalid address format").
        ConnectionError: ``"auto"`` and no cluster to find.
    """
    from ray._private.services import canonicalize_bootstrap_address

    return canonicalize_bootstrap_address(address)


def started_local_head() -> bool:
    """Whether this process started the Ray instance it is connected to (``ray.init()`` with no address)."""
    import ray._private.worker

    node = getattr(ray._private.worker, "_global_node", None)
    return bool(node is not None and node.head)


def gcs_client() -> Any:
    """The connected driver's GCS client (``ray._raylet.GcsClient``)."""
    import ray._private.worker

    return ray._private.worker.global_worker.gcs_client


def config_bounds_of(config: Any, max_resources: dict[str, float] | None) -> tuple[bool, dict[str, float]] | None:
    """(can grow, max resources) of a GCS cluster config (``autoscaler_pb2.ClusterConfig``), or ``None``
    when it has no node groups. A group grows when ``max_count`` is -1 (no limit) or above ``min_count``."""
    if not config or not config.node_group_configs:
        return None
    grows = any(group.max_count == -1 or group.max_count > group.min_count
                for group in config.node_group_configs if group.resources and group.max_count != 0)
    bounds = max_resources or {}
    return grows, {key: float(value) for key, value in bounds.items() if value < sys.maxsize}


def cluster_config_bounds() -> tuple[bool, dict[str, float]] | None:
    """(can grow, max resources) from the cluster config in the GCS, or ``None`` if the cluster publishes none."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS without the key: no config
        return None
    if not config or not config.node_group_configs:
        return None
    return config_bounds_of(config, state.get_max_resources_from_cluster_config())


def autoscaler_v2_enabled() -> bool:
    """Whether the cluster runs Ray's autoscaler v2 (asks the GCS; raises when it cannot answer)."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    return bool(is_autoscaler_v2(fetch_from_server=True, gcs_client=gcs_client()))


@dataclass(frozen=True)
class V2Demand:
    """What autoscaler v2 reports about pending demands.

    Attributes:
        infeasible: the ``details`` of each gang request no scale-up can place (a
            placement group's starts with its hex id).
        launching: nodes being launched (requested and pending).
        last_failure: ``(node type, reason)`` of the latest failed launch, if any.
    """

    infeasible: tuple[str, ...]
    launching: int
    last_failure: tuple[str, str] | None


def v2_demand_of(reply: bytes) -> V2Demand:
    """:class:`V2Demand` of a serialized ``autoscaler_pb2.GetClusterStatusReply``."""
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    message = GetClusterStatusReply()
    message.ParseFromString(reply)
    state = message.autoscaling_state
    failed = state.failed_instance_requests
    return V2Demand(
        infeasible=tuple(request.details for request in state.infeasible_gang_resource_requests),
        launching=sum(request.count for request in state.pending_instance_requests) + len(state.pending_instances),
        last_failure=(failed[-1].ray_node_type_name, failed[-1].reason) if failed else None)


def v2_demand(timeout_s: float = 5.0) -> V2Demand:
    """:class:`V2Demand` now, from the GCS."""
    return v2_demand_of(gcs_client().get_cluster_status(timeout_s=timeout_s))


def v1_autoscaler_status() -> dict[str, Any] | None:
    """Autoscaler v1's latest status in the GCS (what ``ray status`` prints), or ``None``."""
    import ray._private.ray_constants as ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
        return json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 - unreadable status: as good as none
        return None


def replace_restored_callback(tuner: Any, kind: type, callback: Any) -> bool:
    """Put ``callback`` in place of the callbacks of type ``kind`` in a restored ``tune.Tuner``'s run
    config (appended if there is none); returns whether the run config was found."""
    run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
    if run_config is None:
        return False
    callbacks = [callback if isinstance(cb, kind) else cb for cb in (run_config.callbacks or [])]
    if callback not in callbacks:
        callbacks.append(callback)
    run_config.callbacks = callbacks
    return True


def torch_backend_class() -> type:
    """Ray Train's torch backend (``on_start`` sets the process group up, ``on_shutdown`` destroys it)."""
    from ray.train.torch.config import _TorchBackend

    return _TorchBackend


def set_rank_env_vars() -> None:
    """On a Ray Train worker: ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``NODE_RANK`` (as
    torchrun sets them), from the worker's train context."""
    from ray.train.torch.config import _set_torch_distributed_env_vars

    _set_torch_distributed_env_vars()
