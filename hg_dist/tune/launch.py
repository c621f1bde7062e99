"""Starting Ray for a search: a local instance bound to loopback, or a cluster that answers quickly.

``ray.init()`` with an address it cannot reach retries for minutes, printing raw GCS
warnings. :func:`start_ray` first opens a TCP connection to the address (a few
seconds at most) and otherwise raises :class:`RayUnreachableError` naming it.
Without an address it starts a local instance; it binds to 127.0.0.1 (no port on
the machine's network address) when ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` was set
before ``ray`` was first imported, as ``examples/search.py`` does (Ray reads it at
import).
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

__all__ = ["RayUnreachableError", "parse_address", "probe", "start_ray"]

LOCAL_ADDRESSES = ("", "local")


class RayUnreachableError(ConnectionError):
    """The Ray address given (``RAY_ADDRESS`` or ``address=``) does not answer."""


def parse_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a Ray address (``host:port``, ``ray://host:port``, ``http://host:port``);
    ``None`` for ``auto`` / ``local`` / empty, which need no probe."""
    address = address.strip()
    if address in LOCAL_ADDRESSES or address == "auto":
        return None
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"Ray address {address!r} has an invalid port; use host:port, e.g. 127.0.0.1:6379") from None
    if not parts.hostname or port is None:
        raise ValueError(f"Ray address {address!r} is not host:port (e.g. 127.0.0.1:6379 or ray://host:10001)")
    return parts.hostname, port


def probe(address: str, timeout: float = 5.0) -> None:
    """Raise :class:`RayUnreachableError` unless a TCP connection to ``address`` opens within ``timeout``."""
    target = parse_address(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise RayUnreachableError(
            f"cannot reach the Ray cluster at {address} ({reason}); start it (ray start --head "
            f"--node-ip-address=...), fix RAY_ADDRESS / --address, or unset it to run on a local Ray "
            f"instance") from None


def start_ray(address: str | None = None, *, num_cpus: int | None = None, timeout: float = 5.0) -> bool:
    """Connect to ``address`` (default ``RAY_ADDRESS``) or start a local instance (see the module docs).

    Returns:
        ``True`` if a local instance was started (a fixed cluster: no autoscaler).

    Raises:
        RayUnreachableError: the address does not answer within ``timeout`` seconds.
        ValueError: the address is malformed, or ``num_cpus`` is given with an address.
    """
    import ray

    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "") if address is None else address
    if address.strip() not in LOCAL_ADDRESSES:
        if num_cpus is not None:
            raise ValueError(f"--num-cpus sizes a local Ray instance; it cannot be used with the cluster at "
                             f"{address}")
        probe(address, timeout)
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return False
    # The dashboard serves the state API that Ray Train uses to release the resources of
    # multi-worker trials stopped early by ASHA; without it, later trials can wait forever.
    ray.init(address="local", num_cpus=num_cpus, log_to_driver=False, configure_logging=False)
    return True
