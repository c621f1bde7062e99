"""This rank's share of a set of Parquet files, read with pyarrow.

The unit of sharding is the *row group* (a file holds one or more): the row groups
of all files, in file order, are dealt round-robin to the ``W`` ranks, so each
worker reads only its own row groups. Row-group sizes come from the files'
metadata (no data is read to plan), and every shard is cut to the smallest shard's
size so that all shards are equal (see :mod:`hg_dist.data`). Unlike
:class:`~hg_dist.data.ShardedLoader`, a rank's examples depend on the number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import TensorDataset

from hg_dist.data import check_rank, check_shardable

Column = str | Sequence[str]
"""A column name, or several scalar columns stacked into one ``(n, m)`` tensor."""


def plan_row_groups(paths: Sequence[str | PathLike], world_size: int) -> list[list[tuple[int, int]]]:
    """``(file index, row group)`` pairs for each rank, dealt round-robin.

    Returns:
        ``plan[r]``: rank ``r``'s row groups.

    Raises:
        ValueError: if there are fewer row groups than workers.
    """
    units = [(f, g) for f, path in enumerate(paths) for g in range(pq.ParquetFile(path).num_row_groups)]
    check_shardable(len(units), world_size, what="Parquet row groups (write smaller ones with "
                                               "pyarrow.parquet.write_table(..., row_group_size=...))")
    return [units[r::world_size] for r in range(world_size)]


def _to_tensor(array: pa.ChunkedArray | pa.Array, float_dtype: torch.dtype) -> torch.Tensor:
    if pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type) \
            or pa.types.is_large_list(array.type):
        values = np.stack([np.asarray(row) for row in array.to_pylist()])
    else:
        values = array.to_numpy()
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    return tensor.to(float_dtype) if tensor.is_floating_point() else tensor


def read_parquet_shard(paths: Sequence[str | PathLike], columns: Sequence[Column], *, rank: int,
                       world_size: int, float_dtype: torch.dtype | None = None) -> TensorDataset:
    """Read rank ``rank``'s equal-sized shard of ``paths`` as a ``TensorDataset``.

    Args:
        paths: Parquet files with the same schema.
        columns: one entry per tensor of the dataset: a column name (a scalar column
            gives shape ``(n,)``, a list column ``(n, m)``) or a list of scalar column
            names stacked into ``(n, m)``.
        rank: this worker (``0 <= rank < world_size``).
        world_size: the number of workers ``W``.
        float_dtype: dtype of floating columns (default: ``torch.get_default_dtype()``).

    Returns:
        ``TensorDataset`` of ``n = min_r (rows of rank r)`` examples, one tensor per
        entry of ``columns``.
    """
    check_rank(rank, world_size)
    if not paths:
        raise ValueError("paths is empty; pass at least one Parquet file")
    float_dtype = float_dtype or torch.get_default_dtype()
    files = [pq.ParquetFile(path) for path in paths]
    plan = plan_row_groups(paths, world_size)
    sizes = [sum(files[f].metadata.row_group(g).num_rows for f, g in units) for units in plan]
    rows = min(sizes)
    names = sorted({name for column in columns for name in ([column] if isinstance(column, str) else column)})
    table = pa.concat_tables([files[f].read_row_group(g, columns=names) for f, g in plan[rank]]).slice(0, rows)
    tensors = []
    for column in columns:
        if isinstance(column, str):
            tensors.append(_to_tensor(table.column(column), float_dtype))
        else:
            tensors.append(torch.stack([_to_tensor(table.column(name), float_dtype) for name in column], dim=1))
    return TensorDataset(*tensors)
