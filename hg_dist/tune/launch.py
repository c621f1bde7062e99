"""Starting Ray for a search: a local instance bound to loopback, or a cluster that answers quickly.

A cluster address (``RAY_ADDRESS`` or ``address=``) goes through
:func:`hg_dist.distributed.resources.connect`, which reaches it over TCP first and
otherwise raises :class:`~hg_dist.distributed.resources.ClusterUnreachableError`
naming it (``ray.init`` alone retries for minutes, printing raw GCS warnings).
Without an address a local instance starts; it binds to 127.0.0.1 (no port on the
machine's network address) when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` was set
before ``ray`` was first imported, as ``examples/search.py`` does (Ray reads it at
import).
"""

from __future__ import annotations

import os

from hg_dist.distributed.resources import ClusterUnreachableError, connect, warn_unless_loopback

__all__ = ["ClusterUnreachableError", "start_ray"]

LOCAL_ADDRESSES = ("", "local")


def start_ray(address: str | None = None, *, num_cpus: int | None = None, timeout: float = 10.0) -> bool:
    """Connect to ``address`` (default ``RAY_ADDRESS``) or start a local instance (see the module docs).

    Returns:
        ``True`` if a local instance was started (a fixed cluster: no autoscaler).

    Raises:
        ClusterUnreachableError: nothing answers at the address within ``timeout`` seconds.
        ValueError: ``num_cpus`` is given with an address.
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "") if address is None else address
    if address.strip() not in LOCAL_ADDRESSES:
        if num_cpus is not None:
            raise ValueError(f"--num-cpus sizes a local Ray instance; it cannot be used with the cluster at "
                             f"{address}")
        connect(address, connect_timeout_s=timeout, log_to_driver=False, configure_logging=False)
        return False
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=False, configure_logging=False)
    warn_unless_loopback()
    return True
