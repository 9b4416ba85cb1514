"""Logical axis names -> mesh axes: the rules table, built from the `sharding:` config.

The model names every parameter dimension logically ("embed", "heads", ...; see
`nemojax.model.transformer.BLOCK_AXES`) and a rules table maps each logical name to zero, one
or several mesh axes. Changing the parallelism is therefore a config change
(`sharding.rules.<logical>=<mesh axis>`), never a model change. With the default table:

* tensor parallelism is Megatron's: q/k/v column-parallel over heads, the attention output
  projection row-parallel over heads, MLP up column- and down row-parallel over `mlp`, and
  the vocabulary (embedding rows, LM head columns, logits) split over `tensor`;
* FSDP shards every weight's `embed` dim over `fsdp` (all-gathered per layer in forward and
  backward, gradients reduce-scattered back);
* the batch is split over `data` and `fsdp`; layers over `pipeline` (each stage holds its own);
* `length` is replicated unless `sharding.sequence_parallel` maps it to `tensor` for
  activations between blocks.

The mechanics shared with the model (a spec from logical names, the `use_rules` / `constrain`
activation hook) live in the leaf module `nemojax.model.axes` and are re-exported here.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from nemojax.config import ConfigError, ModelConfig, ShardingConfig
from nemojax.model.axes import (active_rules, constrain, logical_to_spec, mesh_shape, shards_per_dim,
                                spec_axes, use_rules)
from nemojax.parallel.mesh import MESH_AXES

Rules = dict[str, tuple[str, ...]]

# logical axis -> mesh axes (empty tuple = replicated). Parameter axes first, then activations.
DEFAULT_RULES: Rules = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": ("pipeline",),
    "norm": (),
    # activations / data
    "batch": ("data", "fsdp"),
    "length": (),  # ("tensor",) with sharding.sequence_parallel
    "activation_embed": (),
}

# Which ModelConfig field sizes each logical axis: error messages name what the user can change.
LOGICAL_DIM_FIELDS: dict[str, str] = {
    "vocab": "vocab_size", "embed": "hidden_size", "norm": "hidden_size", "heads": "num_heads",
    "kv_heads": "num_kv_heads", "head_dim": "head_dim", "mlp": "ffn_hidden_size",
    "layers": "num_layers",
}


def _as_axes(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a mesh axis name, a list of them, or null; got {value!r}")
    for v in value:
        if v not in MESH_AXES:
            raise ConfigError(f"{key}={value!r} names no mesh axis {v!r}; mesh axes are {list(MESH_AXES)}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}={value!r} repeats a mesh axis")
    return tuple(value)


def resolve_rules(sharding: ShardingConfig) -> Rules:
    """The defaults, adjusted for sequence parallelism, overridden by `sharding.rules`.

    Unknown logical names are allowed (a future layer may introduce one) but their values
    are validated like any other.
    """
    rules = dict(DEFAULT_RULES)
    if sharding.sequence_parallel:
        rules["length"] = ("tensor",)
    for k, v in (sharding.rules or {}).items():
        rules[str(k)] = _as_axes(v, f"sharding.rules.{k}")
    return rules


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def tree_specs(axes_tree: Any, rules: Mapping[str, Sequence[str]],
               mesh: Mesh | AbstractMesh | None = None) -> Any:
    """Map a tree of logical-axis tuples (e.g. `transformer.logical_axes(model)`) to specs."""
    return jax.tree.map(lambda a: logical_to_spec(a, rules, mesh), axes_tree, is_leaf=_is_axes)


def tree_shardings(axes_tree: Any, rules: Mapping[str, Sequence[str]], mesh: Mesh) -> Any:
    """NamedShardings for a tree of logical-axis tuples, e.g. the params of
    `transformer.logical_axes(model)`: what a checkpoint loader or inference engine passes to
    `jax.device_put` / `out_shardings` to place weights as training does."""
    return jax.tree.map(lambda a: NamedSharding(mesh, logical_to_spec(a, rules, mesh)), axes_tree,
                        is_leaf=_is_axes)


def check_divisible(shapes: Any, axes_tree: Any, rules: Mapping[str, Sequence[str]],
                    mesh: Mesh | AbstractMesh, model_cfg: ModelConfig | None = None) -> None:
    """Raise ConfigError for the first parameter dim its mapped mesh axes do not divide.

    `shapes` is a tree of arrays/ShapeDtypeStructs matching `axes_tree`. The message names the
    config field behind the dim when there is one, e.g. "model.num_kv_heads=2 is not divisible
    by mesh.tensor=4 (logical axis kv_heads -> tensor, parameter blocks.k)".
    """
    sizes = mesh_shape(mesh)
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    flat_axes = jax.tree.leaves(axes_tree, is_leaf=_is_axes)
    if len(flat_shapes) != len(flat_axes):
        raise ValueError(f"{len(flat_shapes)} arrays but {len(flat_axes)} logical-axis tuples")
    for (path, leaf), axes in zip(flat_shapes, flat_axes):
        shape = tuple(leaf.shape)
        if len(axes) != len(shape):
            raise ValueError(f"parameter {path_str(path)} has shape {shape} but logical axes {axes}")
        spec = logical_to_spec(axes, rules, mesh)
        for dim, (size, name, n) in enumerate(zip(shape, axes, shards_per_dim(spec, len(shape), sizes))):
            if size % n == 0:
                continue
            mesh_axes = spec_axes(spec[dim])
            mesh_desc = "mesh." + "*".join(mesh_axes) + "=" + str(n) if len(mesh_axes) > 1 \
                else f"mesh.{mesh_axes[0]}={n}"
            field = LOGICAL_DIM_FIELDS.get(name or "")
            what = f"model.{field}={size}" if model_cfg is not None and field \
                and getattr(model_cfg, field, None) == size else f"dim {dim} (size {size})"
            raise ConfigError(
                f"{what} is not divisible by {mesh_desc} (logical axis {name} -> "
                f"{'+'.join(mesh_axes)}, parameter {path_str(path)} of shape {shape}); change the "
                f"model size, the mesh, or the rule with sharding.rules.{name}=null")


def path_str(path: Sequence[Any]) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        if key == "value":
            continue
        parts.append(str(key))
    return ".".join(parts)


def add_axis_to_largest_dim(spec: PartitionSpec, shape: Sequence[int], sizes: Mapping[str, int],
                            axis: str = "data") -> PartitionSpec:
    """ZeRO-1: additionally shard over `axis` the dim with the largest per-device extent that
    stays divisible. Unchanged when the axis has size 1, is already used, or nothing divides."""
    n = sizes.get(axis, 1)
    used = {a for e in spec for a in spec_axes(e)}
    if n == 1 or axis in used or not shape:
        return spec
    cuts = shards_per_dim(spec, len(shape), sizes)
    order = sorted(range(len(shape)), key=lambda i: (-(shape[i] // cuts[i]), i))
    for i in order:
        if shape[i] % (cuts[i] * n) == 0:
            entries = [spec[j] if j < len(spec) else None for j in range(len(shape))]
            entries[i] = spec_axes(entries[i]) + (axis,)
            if len(entries[i]) == 1:
                entries[i] = entries[i][0]
            while entries and entries[-1] is None:
                entries.pop()
            return PartitionSpec(*entries)
    return spec


__all__ = ["DEFAULT_RULES", "LOGICAL_DIM_FIELDS", "Rules", "active_rules", "add_axis_to_largest_dim",
           "check_divisible", "constrain", "logical_to_spec", "mesh_shape", "path_str", "resolve_rules",
           "shards_per_dim", "spec_axes", "tree_shardings", "tree_specs", "use_rules"]
