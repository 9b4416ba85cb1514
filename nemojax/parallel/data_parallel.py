"""Data-parallel gradient reduction as Megatron does it: fp32, once per optimizer step.

Left to the SPMD partitioner, a step that accumulates gradients over micro-batches all-reduces
each micro-batch's weight gradients over the data-parallel axes inside the backward pass, in the
weights' dtype (bf16 for the large presets): the data-parallel traffic is paid once per
accumulation slice, at low precision. Here the per-device work runs inside a `shard_map` that is
*manual* over the data-parallel axes (and over `pipeline` when the step is pipelined), *auto*
over the others:

* inside, every device computes the gradient SUMS of its own rows only (unreduced) and adds them
  into an fp32 accumulator, for every micro-batch of the step; `fsdp` and `tensor` stay with the
  partitioner (tensor-parallel partial sums inside a layer, FSDP's per-layer weight all-gathers
  and gradient reduce-scatters, which is what sharding a parameter means);
* at the end, once, each gradient leaf is reduced in fp32 over the manual axes it is replicated
  over: reduce-scattered over `data` into the shard the optimizer state holds when the gradient
  is sharded (ZeRO-2, `sharding.zero2`), all-reduced otherwise; pipeline-replicated leaves
  (embedding, heads) are also summed over `pipeline`;
* the optimizer then updates its shard and the partitioner all-gathers the new weights over
  `data` once, in their storage dtype.

Which axes are manual: the mesh axes the batch is split over that shard no parameter (by
default `data`; `fsdp` shards parameters, so it stays with the partitioner). A layout whose
rules shard a parameter over `data` has no such axis and is left entirely to the partitioner.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemojax.model.axes import Rules, mesh_shape, spec_axes, use_rules
from nemojax.parallel.pipeline import PIPELINE_AXIS


class GradientLayout(NamedTuple):
    """Where a step's gradients live and over which axes they are reduced by hand."""

    mesh: Mesh
    rules: Rules  # the sharding rules outside the manual region
    manual: tuple[str, ...]  # axes the region is manual over (data-parallel axes, + pipeline)
    param_specs: Any  # PartitionSpec per parameter (all of them)
    grad_specs: Any  # PartitionSpec per trainable gradient: the ZeRO-2 shard, or the param spec
    batch_spec: PartitionSpec  # of every batch field


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _spec_mesh_axes(spec: PartitionSpec) -> set[str]:
    return {a for e in spec for a in spec_axes(e)}


def data_parallel_axes(batch_spec: PartitionSpec, param_specs: Any, mesh: Mesh) -> tuple[str, ...]:
    """Mesh axes (size > 1) that split the batch and shard no parameter: reduced by hand."""
    sizes = mesh_shape(mesh)
    used: set[str] = set()
    for s in jax.tree.leaves(param_specs, is_leaf=_is_spec):
        used |= _spec_mesh_axes(s)
    batch_axes = spec_axes(batch_spec[1]) if len(batch_spec) > 1 else ()
    return tuple(a for a in batch_axes if a not in used and sizes.get(a, 1) > 1)


def gradient_layout(mesh: Mesh, rules: Rules, param_specs: Any, grad_specs: Any, batch_spec: PartitionSpec,
                    pipelined: bool) -> GradientLayout | None:
    """The layout for a step, or None when nothing is reduced by hand (one device, pure FSDP)."""
    manual = data_parallel_axes(batch_spec, param_specs, mesh)
    if pipelined:
        manual = (*manual, PIPELINE_AXIS)
    if not manual:
        return None
    return GradientLayout(mesh, rules, manual, param_specs, grad_specs, batch_spec)


def inner_rules(rules: Rules, manual: tuple[str, ...]) -> Rules:
    """The rules inside the manual region: manual axes are local there, so no spec may name them."""
    return {k: tuple(a for a in v if a not in manual) for k, v in rules.items()}


def _entry(e: Any, axes: tuple[str, ...]) -> Any:
    kept = tuple(a for a in spec_axes(e) if a in axes)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def restrict(spec: PartitionSpec, axes: tuple[str, ...]) -> PartitionSpec:
    """`spec` naming only the mesh axes in `axes` (what a partially manual shard_map spec names)."""
    return PartitionSpec(*(_entry(e, axes) for e in spec))


def _stack_axes(param_spec: PartitionSpec, manual: tuple[str, ...]) -> tuple[str, ...]:
    """The manual axes a gradient leaf holds different partial sums over: those it is not split over."""
    owned = _spec_mesh_axes(param_spec)
    return tuple(a for a in manual if a not in owned)


def _entry_of(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def reduce_gradients_once(local_sums: Callable[[Any, dict], tuple[Any, dict]], params: Any,
                          batch: dict[str, jax.Array], layout: GradientLayout, trainable: Any,
                          train_param_specs: Any) -> tuple[Any, dict[str, jax.Array]]:
    """Run `local_sums(params, local_batch) -> (fp32 gradient sums, {name: scalar sum})` on every
    device's own rows inside the manual region, then reduce each gradient leaf once, in fp32
    (module docstring). Returns the gradients (a tree like `trainable`, the trainable params)
    sharded as `layout.grad_specs`, and the sums over all devices. train_param_specs: the
    parameter specs of the trainable params.

    Two regions: the first (manual over `layout.manual`) returns every device's partial sums
    stacked along a new leading dim over the axes they differ on (no data moves: that global
    array is just each device's own accumulator); the second (manual over every axis) reduces
    them. Reducing inside the first would leave the partitioner to place a reduce-scatter whose
    operand is also split over auto axes, which it does by all-gathering the operand first.
    """
    manual, mesh = layout.manual, layout.mesh
    param_in = jax.tree.map(lambda s: restrict(s, manual), layout.param_specs, is_leaf=_is_spec)
    batch_in = jax.tree.map(lambda _: restrict(layout.batch_spec, manual), batch)
    leaves, treedef = jax.tree.flatten(trainable)
    grad_specs = jax.tree.leaves(layout.grad_specs, is_leaf=_is_spec)
    param_specs = jax.tree.leaves(train_param_specs, is_leaf=_is_spec)
    if not len(leaves) == len(grad_specs) == len(param_specs):
        raise ValueError(f"{len(leaves)} gradient leaves, {len(grad_specs)} gradient specs, "
                         f"{len(param_specs)} parameter specs")
    stacks = [_stack_axes(ps, manual) for ps in param_specs]
    rules_inside = inner_rules(layout.rules, manual)

    def partial_sums(p: Any, b: dict) -> tuple[list[jax.Array], dict]:
        with use_rules(mesh, rules_inside):
            grads, sums = local_sums(p, b)
        flat = [g.astype(jnp.float32)[None] for g in jax.tree.leaves(grads)]
        return flat, {k: jax.lax.psum(jnp.asarray(v, jnp.float32), manual) for k, v in sums.items()}

    stacked_manual = [PartitionSpec(_entry_of(st), *restrict(ps, manual)) for st, ps in zip(stacks, param_specs)]
    flat, sums = jax.shard_map(partial_sums, mesh=mesh, in_specs=(param_in, batch_in),
                               out_specs=(stacked_manual, PartitionSpec()), axis_names=frozenset(manual),
                               check_vma=False)(params, batch)

    sizes = mesh_shape(mesh)
    every = tuple(a for a in mesh.axis_names)

    def reduce(g: jax.Array, stack: tuple[str, ...], grad_spec: PartitionSpec) -> jax.Array:
        g = g[0]
        scatter = [(i, a) for i, e in enumerate(grad_spec) for a in spec_axes(e) if a in stack]
        for i, a in scatter:  # ZeRO-2: this device keeps the (minor) sub-block its index names
            if sizes[a] > 1:
                g = jax.lax.psum_scatter(g, a, scatter_dimension=i, tiled=True)
        rest = tuple(a for a in stack if a not in {a for _, a in scatter} and sizes[a] > 1)
        return jax.lax.psum(g, rest) if rest else g

    def reduce_all(gs: list[jax.Array]) -> list[jax.Array]:
        return [reduce(g, st, gs_) for g, st, gs_ in zip(gs, stacks, grad_specs)]

    stacked_full = [PartitionSpec(_entry_of(st), *ps) for st, ps in zip(stacks, param_specs)]
    flat = jax.shard_map(reduce_all, mesh=mesh, in_specs=(stacked_full,), out_specs=grad_specs,
                         axis_names=frozenset(every), check_vma=False)(flat)
    return jax.tree.unflatten(treedef, flat), sums


def shard_like_gradients(tree: Any, layout: GradientLayout) -> Any:
    """Constrain a tree shaped like the gradients (e.g. the updated weights) to their shards, so the
    partitioner computes it on the shard and all-gathers the result once, in its own dtype."""
    specs = jax.tree.leaves(layout.grad_specs, is_leaf=_is_spec)
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, [jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, s))
                                        for x, s in zip(leaves, specs)])


__all__ = ["shard_like_gradients", "GradientLayout", "data_parallel_axes", "gradient_layout", "inner_rules", "reduce_gradients_once",
           "restrict"]
