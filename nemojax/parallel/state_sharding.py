"""PartitionSpecs for a model's parameters and for an optimizer state that shadows them (ZeRO-1).

Parameters are sharded by their logical axes (`nnx.Param(..., logical_axes=...)`) under the
rules. An optimizer-state leaf (Adam's mu / nu, the fp32 master copy) is matched to the
parameter whose path is a suffix of its own and whose shape equals its own, and sharded like it,
plus `data` on its largest divisible dim when ZeRO-1 is on; anything else (step counts) is
replicated. Works for any nnx model whose every Param carries `logical_axes` metadata, and for
an optimizer state over any subset of the parameters (trainable-only states, e.g. LoRA).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from nemojax.config import ConfigError
from nemojax.model.axes import logical_to_spec, mesh_shape
from nemojax.parallel.rules import Rules, add_axis_to_largest_dim, path_str


def _key(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(path_str((k,)) for k in path if path_str((k,)))


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def model_logical_axes(model: nnx.Module) -> Any:
    """A params-shaped tree of logical-axis tuples; ConfigError naming any Param without them."""
    def axes(path, v):
        meta = v.get_metadata() if hasattr(v, "get_metadata") else {}
        if "logical_axes" not in meta:
            raise ConfigError(f"parameter {path_str(path)} of {type(model).__name__} has no logical_axes "
                              f"metadata; create it as nnx.Param(value, logical_axes=(...)) so it can be sharded")
        return tuple(meta["logical_axes"])
    return jax.tree_util.tree_map_with_path(axes, nnx.state(model, nnx.Param),
                                            is_leaf=lambda v: isinstance(v, nnx.Variable))


def param_specs(axes_tree: Any, rules: Rules, mesh: Mesh | AbstractMesh) -> dict[tuple[str, ...], PartitionSpec]:
    """{param path: PartitionSpec} from a tree of logical-axis tuples."""
    flat = jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=_is_axes)[0]
    return {_key(p): logical_to_spec(a, rules, mesh) for p, a in flat}


def tree_param_specs(params: Any, specs_by_path: Mapping[tuple[str, ...], PartitionSpec]) -> Any:
    """The specs as a tree shaped like `params` (an nnx.State or any pytree with param paths)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: specs_by_path[_key(p)], params)


def optimizer_state_specs(opt_state: Any, params: Any, specs_by_path: Mapping[tuple[str, ...], PartitionSpec],
                          mesh: Mesh | AbstractMesh, zero1: bool) -> Any:
    """PartitionSpecs for every leaf of an (abstract) optimizer state; see the module docstring."""
    sizes = mesh_shape(mesh)
    shapes = {_key(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

    def leaf_spec(path, leaf):
        key = _key(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for i in range(len(key)):
            if key[i:] in specs_by_path and shapes.get(key[i:]) == shape:
                spec = specs_by_path[key[i:]]
                return add_axis_to_largest_dim(spec, shape, sizes, "data") if zero1 else spec
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(leaf_spec, opt_state)


def gradient_specs(params: Any, param_specs_tree: Any, mesh: Mesh | AbstractMesh, zero2: bool) -> Any:
    """PartitionSpecs of the reduced fp32 gradient: with ZeRO-2 the optimizer state's ZeRO-1 shard
    of each parameter (so the update needs no resharding), else the parameter's own spec."""
    if not zero2:
        return param_specs_tree
    sizes = mesh_shape(mesh)
    return jax.tree.map(lambda p, s: add_axis_to_largest_dim(s, tuple(p.shape), sizes, "data"),
                        params, param_specs_tree)
