"""The Ray Train workers' torch.distributed process group, its rendezvous store on the node's address only.

Ray Train's own ``TorchConfig`` lets ``init_process_group`` start torch's rendezvous store
(a ``TCPStore`` on the rank-0 worker), which torch binds on every interface (``::``) with no
setting to bind it elsewhere: a local 2-worker run on a laptop opens a port to its network.
:class:`NodeBoundTorchConfig` sets the group up the same way (gloo on CPU workers, NCCL on
GPU workers, the same ``RANK``/``LOCAL_RANK``/... variables, the same shutdown) with one
difference: rank 0 binds the store's socket itself, on the address Ray uses for its node
(127.0.0.1 for a local Ray started by hg_dist, the node's IP on a cluster, which the other
nodes reach), and hands torch the listening socket (``TCPStore(master_listen_fd=...)``).

:func:`hg_dist.distributed.fit` uses it; with your own ``TorchTrainer``, pass
``torch_config=NodeBoundTorchConfig()`` (examples/train_loop.py does).

Ray is imported with this module: import it where a run starts.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig

from hg_dist.distributed import ray_internals

__all__ = ["NodeBoundTorchConfig"]

# Rank 0's listening socket; torch's store serves on it, so it stays open for the worker's life.
_LISTENING: socket.socket | None = None


def _bind_store_socket() -> tuple[str, int]:
    """On rank 0: a listening socket on this node's Ray address and a free port; returns ``(address, port)``."""
    global _LISTENING
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.bind((address, 0))
    listening.listen(128)
    _LISTENING = listening
    return address, listening.getsockname()[1]


def _join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                        timeout_s: float) -> None:
    """On every worker: the store (rank 0 serves it on the socket bound above) and ``init_process_group``."""
    timeout = timedelta(seconds=timeout_s)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    if backend == "nccl":
        # what Ray Train sets: fail (not hang) when a collective times out, unless the user chose otherwise
        if "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    if world_rank == 0:
        store = dist.TCPStore(address, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=_LISTENING.fileno())
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class NodeBoundStoreBackend(ray_internals.torch_backend_class()):
    """Ray Train's torch backend with :func:`_join_process_group` in place of its ``init_process_group``."""

    def on_start(self, worker_group, backend_config: "NodeBoundTorchConfig") -> None:
        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        address, port = worker_group.execute_single(0, _bind_store_socket)
        worker_group.execute(ray_internals.set_rank_env_vars)
        world_size = len(worker_group)
        ray.get([worker_group.execute_single_async(rank, _join_process_group, backend=backend, world_rank=rank,
                                                   world_size=world_size, address=address, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(world_size)])


@dataclass
class NodeBoundTorchConfig(TorchConfig):
    """``ray.train.torch.TorchConfig`` (``backend``, ``timeout_s``) whose rendezvous store listens on the
    node's Ray address only (see the module docs). ``init_method`` is not used."""

    @property
    def backend_cls(self):
        return NodeBoundStoreBackend
