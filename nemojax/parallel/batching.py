"""Feeding a sharded batch from several processes: which rows each process loads, and assembly.

A training batch field is an array `[accum, micro_batch, ...]` whose micro-batch dim is split
over the mesh axes the `batch` rule names (data, fsdp) and replicated over the others (tensor,
pipeline). So the rows a process must supply are exactly those its own devices hold: the union
of its addressable shards' row ranges, read off the batch sharding. Consequences, for any layout:

* processes holding replicas of the same data shard (tensor or pipeline parallelism across
  hosts) load the same rows;
* a data shard is read only by the processes that hold it -- with the mesh's process-major
  device order (`nemojax.parallel.mesh`), by as few hosts as the layout allows;
* nothing assumes the processes' shares are disjoint, contiguous or of equal size.

`global_rows(...)` lists those rows as indices into the step's flat global batch
(row `a * micro + m` is micro-batch row `m` of accumulation slice `a`), which is what a data
pipeline that can produce any given rows of the global stream (nemojax.data.pretrain) needs.
`assemble(...)` builds the global jax.Arrays from this process' rows
(`jax.make_array_from_callback`: each local device gets its slice, nothing else moves).
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding


def micro_rows(sharding: NamedSharding, micro_batch: int) -> np.ndarray:
    """Sorted micro-batch row indices (dim 1 of `[accum, micro_batch, ...]`) this process holds."""
    idx = sharding.addressable_devices_indices_map((1, micro_batch))
    rows: set[int] = set()
    for index in idx.values():
        sl = index[1] if len(index) > 1 else slice(None)
        rows.update(range(*sl.indices(micro_batch)))
    return np.asarray(sorted(rows), np.int64)


def global_rows(sharding: NamedSharding, accum: int, micro_batch: int) -> np.ndarray:
    """This process' rows as indices into the flat global batch of `accum * micro_batch` rows."""
    m = micro_rows(sharding, micro_batch)
    return (np.arange(accum)[:, None] * micro_batch + m[None, :]).reshape(-1)


def shard_readers(sharding: NamedSharding, micro_batch: int) -> dict[tuple[int, int], set[int]]:
    """{(row start, row stop) of each distinct data shard: the process indices that hold it}."""
    out: dict[tuple[int, int], set[int]] = {}
    for dev, index in sharding.devices_indices_map((1, micro_batch)).items():
        sl = index[1] if len(index) > 1 else slice(None)
        start, stop, _ = sl.indices(micro_batch)
        out.setdefault((start, stop), set()).add(dev.process_index)
    return out


def assemble(sharding: NamedSharding, local: Mapping[str, np.ndarray], accum: int,
             micro_batch: int) -> dict[str, jax.Array]:
    """Global `[accum, micro_batch, ...]` arrays from this process' rows.

    `local[k]` holds this process' rows in `global_rows` order, flat: `[accum * len(micro_rows),
    ...]`. Every process calls this with its own rows, for the same fields in the same order.
    """
    rows = micro_rows(sharding, micro_batch)
    where = {int(r): i for i, r in enumerate(rows)}
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        if v.shape[0] != accum * len(rows):
            raise ValueError(f"batch field {k!r}: {v.shape[0]} rows given, this process supplies "
                             f"{accum} x {len(rows)} rows of each global batch")
        v = v.reshape(accum, len(rows), *v.shape[1:])

        def piece(index: tuple, v: np.ndarray = v) -> np.ndarray:
            index = tuple(index) + (slice(None),) * (v.ndim - len(index))
            pos = [where[r] for r in range(*index[1].indices(micro_batch))]
            return v[index[0]][:, pos][(slice(None), slice(None), *index[2:])]

        out[k] = jax.make_array_from_callback((accum, micro_batch, *v.shape[2:]), sharding, piece)
    return out


__all__ = ["assemble", "global_rows", "micro_rows", "shard_readers"]
