"""This rank's share of a set of Parquet files, read with pyarrow.

The unit of sharding is the *row*. The ``N`` rows of all files, in file order, are
cut into ``W`` contiguous ranges of ``n = ⌊N/W⌋`` rows; rank ``r`` takes rows
``[r·n, (r + 1)·n)`` and reads only the row groups that overlap them (row counts
come from the files' metadata, so no data is read to plan). Files and row groups
of any sizes are used whole: a 1000-row and a 10-row file over two workers give
505 rows to each.

Why equal shards: a data-parallel step averages the ranks' mean gradients, which
is the gradient of the union batch only when every rank's batch has the same
size (see :mod:`hg_dist.data`). Shards of equal size make equal local batches
possible, so the ``N mod W < W`` rows that do not divide evenly (the last ones)
are left out, with a warning naming them. Unlike
:class:`~hg_dist.data.ShardedLoader`, a rank's examples depend on the number of workers.
"""

from __future__ import annotations

import warnings
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


def plan_rows(row_counts: Sequence[Sequence[int]], rank: int, world_size: int) -> list[tuple[int, int, int, int]]:
    """Rank ``rank``'s pieces of its ``⌊N/W⌋`` rows, given the row counts of every file's row groups.

    Args:
        row_counts: ``row_counts[f][g]``, the rows of row group ``g`` of file ``f``.

    Returns:
        ``(file, row group, first row in the group, rows)`` for every row group that
        overlaps the rank's range, in order.

    Raises:
        ValueError: fewer rows ``N`` than workers.
    """
    total = sum(sum(groups) for groups in row_counts)
    check_shardable(total, world_size, what="Parquet rows")
    per_rank = total // world_size
    start, stop = rank * per_rank, (rank + 1) * per_rank
    pieces, offset = [], 0
    for f, groups in enumerate(row_counts):
        for g, count in enumerate(groups):
            lo, hi = max(start, offset), min(stop, offset + count)
            if lo < hi:
                pieces.append((f, g, lo - offset, hi - lo))
            offset += count
    return pieces


def _to_tensor(array: pa.ChunkedArray | pa.Array, float_dtype: torch.dtype) -> torch.Tensor:
    if pa.types.is_list(array.type) or pa.types.is_fixed_size_list(array.type) \
            or pa.types.is_large_list(array.type):
        values = np.stack([np.asarray(row) for row in array.to_pylist()])
    else:
        values = array.to_numpy()
    tensor = torch.from_numpy(np.require(values, requirements=["C", "W"]))  # a read-only Arrow view is copied
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
        ``TensorDataset`` of ``n = ⌊N/W⌋`` examples (``N``: the rows of all files), one
        tensor per entry of ``columns``: rows ``[rank·n, (rank + 1)·n)`` in file order.

    Raises:
        ValueError: ``paths`` is empty, or there are fewer rows than workers.

    Warns:
        RuntimeWarning: ``N`` is not a multiple of ``W``, naming the ``N mod W`` rows left out.
    """
    check_rank(rank, world_size)
    if not paths:
        raise ValueError("paths is empty; pass at least one Parquet file")
    float_dtype = float_dtype or torch.get_default_dtype()
    files = [pq.ParquetFile(path) for path in paths]
    row_counts = [[file.metadata.row_group(g).num_rows for g in range(file.num_row_groups)] for file in files]
    pieces = plan_rows(row_counts, rank, world_size)
    total = sum(map(sum, row_counts))
    if total % world_size:
        warnings.warn(f"read_parquet_shard: the {total} rows of {len(paths)} Parquet file(s) do not split equally "
                      f"over workers={world_size}; the last {total % world_size} row(s) are left out so that every "
                      f"worker has {total // world_size} (equal shards keep the data-parallel mean exact); write "
                      f"a multiple of {world_size} rows, or use a worker count that divides {total}",
                      RuntimeWarning, stacklevel=2)
    names = sorted({name for column in columns for name in ([column] if isinstance(column, str) else column)})
    table = pa.concat_tables([files[f].read_row_group(g, columns=names).slice(first, rows)
                              for f, g, first, rows in pieces])
    tensors = []
    for column in columns:
        if isinstance(column, str):
            tensors.append(_to_tensor(table.column(column), float_dtype))
        else:
            tensors.append(torch.stack([_to_tensor(table.column(name), float_dtype) for name in column], dim=1))
    return TensorDataset(*tensors)
