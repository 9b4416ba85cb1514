"""Per-device bytes of the training state for a mesh, computed without any devices.

The numbers come from the same code that shards a real run: the abstract TrainState
(`jax.eval_shape` of the init), the PartitionSpecs from `sharded_train.state_specs` over an
`AbstractMesh`, and per-leaf shard shapes (ceil(dim / shards)). So `nemojax info 340b
--mesh-devices 6144 mesh.tensor=8 ...` tells what each device must hold before any hardware
exists. Activations are not included: they depend on the batch, remat policy and schedule
(use AOT compilation for the full picture).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from nemojax.config import Config
from nemojax.model.transformer import NemotronLM, abstract_model
from nemojax.parallel.mesh import make_abstract_mesh, mesh_shape
from nemojax.parallel.rules import check_divisible, resolve_rules, shards_per_dim
from nemojax.parallel.sharded_train import (param_specs, state_specs, with_fp32_master)
from nemojax.train.optim import make_optimizer
from nemojax.train.step import create_train_state
from nemojax.model.transformer import logical_axes

GIB = 1024 ** 3


def shard_bytes(shape: tuple[int, ...], dtype: Any, spec: PartitionSpec, sizes: dict[str, int]) -> int:
    """Bytes of the largest shard of an array of `shape` sharded by `spec`."""
    cuts = shards_per_dim(spec, len(shape), sizes)
    return math.prod(-(-d // c) for d, c in zip(shape, cuts)) * np.dtype(dtype).itemsize


def _is_master(path: tuple[Any, ...]) -> bool:
    return any(getattr(k, "name", None) == "master" for k in path)


def training_state_bytes(cfg: Config, num_devices: int) -> dict[str, Any]:
    """Per-device bytes of params, fp32 gradient accumulator, optimizer state and master copy.

    Raises ConfigError when the mesh does not fit `num_devices` or a model dim does not divide.
    """
    mesh = make_abstract_mesh(cfg.mesh, num_devices)
    sizes = mesh_shape(mesh)
    rules = resolve_rules(cfg.mesh)
    model = abstract_model(cfg.model)
    check_divisible(nnx.state(model, nnx.Param), logical_axes(model), rules, mesh, cfg.model)
    tx = make_optimizer(cfg.optimizer, max(cfg.steps, 1))
    if cfg.model.param_dtype != "float32":
        tx = with_fp32_master(tx)

    def init():
        return create_train_state(NemotronLM(cfg.model, rngs=nnx.Rngs(params=0)), tx)[1]

    abstract = jax.eval_shape(init)
    specs = state_specs(abstract, param_specs(model, rules, mesh), mesh, cfg.mesh.zero1)
    out = {"params": 0, "gradients": 0, "optimizer_state": 0, "master_weights": 0}
    for leaf, spec in zip(jax.tree.leaves(abstract.params), jax.tree.leaves(
            specs.params, is_leaf=lambda x: isinstance(x, PartitionSpec))):
        out["params"] += shard_bytes(leaf.shape, leaf.dtype, spec, sizes)
        out["gradients"] += shard_bytes(leaf.shape, np.float32, spec, sizes)  # fp32 accumulator
    opt_leaves = jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0]
    opt_specs = jax.tree.leaves(specs.opt_state, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for (path, leaf), spec in zip(opt_leaves, opt_specs):
        key = "master_weights" if _is_master(path) else "optimizer_state"
        out[key] += shard_bytes(tuple(leaf.shape), leaf.dtype, spec, sizes)
    out["total"] = sum(out.values())
    return {
        "mesh": sizes,
        "zero1": cfg.mesh.zero1,
        "per_device_bytes": out,
        "per_device_gib": {k: round(v / GIB, 3) for k, v in out.items()},
        "note": "training state only; activations depend on batch, remat and schedule",
    }
