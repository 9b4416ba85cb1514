"""Per-device bytes of sharded arrays, computed from shapes and PartitionSpecs (no devices needed).

`nemojax info --mesh-devices N` (via nemojax.train.build.training_state_bytes) uses this over an
`AbstractMesh`, with the same specs a real run shards with, to tell what each device must hold
before any hardware exists.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import PartitionSpec

from nemojax.model.axes import shards_per_dim


def shard_bytes(shape: tuple[int, ...], dtype: Any, spec: PartitionSpec, sizes: Mapping[str, int]) -> int:
    """Bytes of the largest shard of an array of `shape` sharded by `spec`."""
    cuts = shards_per_dim(spec, len(shape), sizes)
    return math.prod(-(-d // c) for d, c in zip(shape, cuts)) * np.dtype(dtype).itemsize


def tree_shard_bytes(arrays: Any, specs: Any, sizes: Mapping[str, int]) -> int:
    """Sum of `shard_bytes` over a tree of arrays / ShapeDtypeStructs and a matching tree of specs."""
    leaves = jax.tree.leaves(arrays)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    if len(leaves) != len(spec_leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(spec_leaves)} PartitionSpecs")
    return sum(shard_bytes(tuple(a.shape), a.dtype, s, sizes) for a, s in zip(leaves, spec_leaves))


__all__ = ["shard_bytes", "tree_shard_bytes"]
