"""Data-parallel bilevel optimization on Ray Train.

``W`` workers hold identical inner/outer parameters and a shard of the data each;
inner gradients and every term of the hypergradient are allreduced (mean), so the
core's IHVP methods run unchanged (``reduce=``) and all replicas stay identical.

Modules, one job each:

* :mod:`~hg_dist.distributed.collectives` — sum-allreduce over torch.distributed or threads
  (the protocol, :class:`~hg_dist.collective.Collective`, is the core's: a solver takes one as
  ``collective=`` and averages its gradients, hypergradients and metrics over it).
* :mod:`~hg_dist.distributed.counting` — allreduce-mean counting rounds and bytes.
* :mod:`~hg_dist.distributed.hypergrad` — ``reduce=`` for approx_hypergrad, allreduced inner grads.
* :mod:`~hg_dist.distributed.parquet` — equal shards of Parquet files (data for everything else:
  :mod:`hg_dist.data`, re-exported here).
* :mod:`~hg_dist.distributed.checkpointing` — solver state ⇄ ``ray.train.Checkpoint``.
* :mod:`~hg_dist.distributed.settings` — :class:`FitOptions` (what Ray's ``ScalingConfig``/``RunConfig``
  have no word for) and driver-side checks.
* :mod:`~hg_dist.distributed.resources` — before a run: reach the cluster, decide whether it
  can ever hold the workers (autoscaling or fixed, read from the cluster), wait for them.
* :mod:`~hg_dist.distributed.train_loop` — what each Ray Train worker runs.
* :mod:`~hg_dist.distributed.process_group` — the workers' process group, torch's rendezvous store
  on the node's address only (imports Ray).
* :mod:`~hg_dist.distributed.runner` — :func:`fit` and :func:`run_experiment`.

Ray is imported only when a run starts, so the non-Ray parts work without it.
"""

from hg_dist.distributed.checkpointing import checkpoint_of, read_checkpoint
from hg_dist.distributed.collectives import (Collective, SingleProcess, ThreadGroup, TorchDistributed,
                                             run_threads)
from hg_dist.distributed.counting import CommStats, CountingAllreduce
from hg_dist.distributed.hypergrad import AllreduceGrads, distributed_approx
from hg_dist.distributed.parquet import read_parquet_shard
from hg_dist.distributed.runner import fit, run_experiment, validate
from hg_dist.distributed.train_loop import RunFailedError
from hg_dist.distributed.resources import (ClusterError, ClusterUnreachableError, InsufficientResourcesError,
                                           ResourceTimeoutError, connect, inspect_cluster)
from hg_dist.distributed.settings import Every, FitOptions, check_scaling
from hg_dist.data import (ShardedLoader, check_shardable, check_workers, full_batch, shard_dataset,
                          shard_indices)

__all__ = ["AllreduceGrads", "ClusterError", "ClusterUnreachableError", "Collective", "CommStats",
           "CountingAllreduce", "Every", "FitOptions", "InsufficientResourcesError", "ResourceTimeoutError",
           "RunFailedError", "ShardedLoader", "SingleProcess", "ThreadGroup", "TorchDistributed",
           "check_scaling", "check_shardable", "check_workers", "distributed_approx",
           "checkpoint_of", "connect", "fit", "full_batch", "inspect_cluster", "read_checkpoint", "read_parquet_shard",
           "run_experiment", "run_threads", "shard_dataset", "shard_indices", "validate"]
