"""Config + mesh -> a sharded initial TrainState and a jitted, sharded, state-donating step.

This is the one entry point the trainer loop needs for any data / FSDP / tensor / ZeRO-1
layout (the pipelined step lives in `nemojax.parallel.pipeline`):

    mesh = make_mesh(cfg.mesh)
    st = build_sharded_training(cfg, mesh)
    state = st.init_state(cfg.seed)                 # created sharded: no host holds the model
    batch = st.global_batch(host_local_numpy_batch)  # each host feeds only its rows
    state, metrics = st.step(state, batch)

Shardings come from the logical-axis rules (`rules.py`): parameters by their logical axes;
optimizer-state leaves like the parameter they shadow, plus `data` on their largest divisible
dim when `mesh.zero1` is on (ZeRO-1); scalars (step, Adam's count) replicated. With bf16
parameters an fp32 master copy lives in the optimizer state (`with_fp32_master`), sharded like
the rest of it, so ZeRO-1 also shards the master weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nemojax.config import Config, ConfigError
from nemojax.model.transformer import NemotronLM, abstract_model, logical_axes
from nemojax.parallel.mesh import mesh_shape
from nemojax.parallel.rules import (Rules, _path_str, add_axis_to_largest_dim, check_divisible,
                                    logical_to_spec, resolve_rules, shards_per_dim, use_rules)
from nemojax.train.optim import make_optimizer
from nemojax.train.step import TrainState, create_train_state, lm_loss_sums, make_train_step

# --------------------------------------------------------------------------- fp32 master copy


class MasterState(NamedTuple):
    master: Any  # fp32 copy of the params
    inner: Any  # the wrapped optimizer's state


def with_fp32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Keep an fp32 master copy of low-precision params inside the optimizer state.

    The inner optimizer updates the fp32 master; the returned fp32 update moves the stored
    (e.g. bf16) params to the rounded new master, so rounding never accumulates across steps.
    Living in the optimizer state means ZeRO-1 shards the master copy with mu and nu.
    """

    def init(params):
        master = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
        return MasterState(master, inner.init(master))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("with_fp32_master needs params in update()")
        g32 = jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grads)
        upd, inner_state = inner.update(g32, state.inner, state.master)
        master = optax.apply_updates(state.master, upd)
        # p (low precision) + (master - p) in fp32, cast back by apply_updates = round(master).
        delta = jax.tree.map(lambda m, p: m - jnp.asarray(p, jnp.float32), master, params)
        return delta, MasterState(master, inner_state)

    return optax.GradientTransformation(init, update)


# --------------------------------------------------------------------------- shardings


def _key(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(_path_str((k,)) for k in path if _path_str((k,)))


def param_specs(model: nnx.Module, rules: Mapping[str, Any], mesh: Mesh) -> dict[tuple[str, ...], PartitionSpec]:
    """{param path: PartitionSpec} from the model's logical axes."""
    axes = logical_axes(model)
    flat = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple)
                                                and all(isinstance(a, (str, type(None))) for a in x))[0]
    return {_key(p): logical_to_spec(a, rules, mesh) for p, a in flat}


def state_specs(abstract_state: TrainState, specs_by_path: Mapping[tuple[str, ...], PartitionSpec],
                mesh: Mesh, zero1: bool) -> TrainState:
    """PartitionSpecs for every leaf of a TrainState (same tree structure).

    Optimizer-state leaves are matched to the parameter whose path is a suffix of theirs and
    whose shape equals theirs (mu/nu/master copies); other leaves (counts) are replicated.
    """
    sizes = mesh_shape(mesh)
    shapes = {}
    for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]:
        shapes[_key(p)] = tuple(leaf.shape)

    def param_leaf(path, leaf):
        return specs_by_path[_key(path)]

    def opt_leaf(path, leaf):
        key = _key(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for i in range(len(key)):
            if key[i:] in specs_by_path and shapes[key[i:]] == shape:
                spec = specs_by_path[key[i:]]
                return add_axis_to_largest_dim(spec, shape, sizes, "data") if zero1 else spec
        return PartitionSpec()

    return TrainState(
        step=PartitionSpec(),
        params=jax.tree_util.tree_map_with_path(param_leaf, abstract_state.params),
        opt_state=jax.tree_util.tree_map_with_path(opt_leaf, abstract_state.opt_state),
    )


def batch_spec(rules: Mapping[str, Any], mesh: Mesh) -> PartitionSpec:
    """Batch arrays are [accum, micro_batch, seq]: micro_batch split by the `batch` rule."""
    return logical_to_spec((None, "batch", None), rules, mesh)


# --------------------------------------------------------------------------- the bundle


@dataclasses.dataclass
class ShardedTraining:
    """Everything a trainer needs to run one layout; see the module docstring for use."""

    mesh: Mesh
    rules: Rules
    graphdef: Any
    tx: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs
    state_specs: TrainState  # PartitionSpecs
    state_shardings: TrainState  # NamedShardings
    batch_sharding: NamedSharding  # for each [accum, micro, seq] batch array
    init_state: Callable[[int], TrainState]  # seed -> sharded TrainState
    init_jit: Any  # the jitted init (uint32 seed array -> TrainState), for .lower()/AOT
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # jitted, donates state

    @property
    def batch_divisor(self) -> int:
        """Micro-batch sizes must be multiples of this (devices the batch is split over)."""
        return shards_per_dim(self.batch_sharding.spec, 3, mesh_shape(self.mesh))[1]

    def process_rows(self, micro_batch: int) -> slice:
        """Rows of a global [accum, micro_batch, seq] batch this process must supply.

        A data loader on each host reads exactly these rows of every global batch and passes
        them to `global_batch`; on one host it is all rows.
        """
        idx = self.batch_sharding.addressable_devices_indices_map((1, micro_batch, 1))
        rows = sorted({(s[1].start or 0, micro_batch if s[1].stop is None else s[1].stop)
                       for s in idx.values()})
        start, stop = rows[0][0], rows[-1][1]
        covered = sum(b - a for a, b in rows)
        if covered != stop - start:
            raise ValueError(f"this process' batch rows {rows} are not contiguous; reorder the mesh")
        return slice(start, stop)

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble this host's rows into global arrays (one call per host, same order).

        `local[k]` is [accum, micro_batch / process_count, seq]: the hosts' shares stacked in
        process order form the global batch. On one host this is just a sharded device_put.
        """
        out = {}
        for k, v in local.items():
            v = np.asarray(v)
            gshape = (v.shape[0], v.shape[1] * jax.process_count(), *v.shape[2:])
            if gshape[1] % self.batch_divisor:
                raise ConfigError(
                    f"batch field {k!r}: micro batch {gshape[1]} is not divisible by the "
                    f"{self.batch_divisor} devices the batch is split over (mesh data x fsdp)")
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding, v, gshape)
        return out

    def metrics_to_host(self, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
        return {k: float(np.asarray(jax.device_get(v))) for k, v in metrics.items()}


def build_sharded_training(cfg: Config, mesh: Mesh, *, tx: optax.GradientTransformation | None = None,
                           loss_sums: Callable = lm_loss_sums,
                           total_steps: int | None = None) -> ShardedTraining:
    """Shardings, sharded init and the jitted step for `cfg` on `mesh`.

    tx: optimizer (default `make_optimizer(cfg.optimizer, total_steps or cfg.steps)`); wrapped in
    `with_fp32_master` when params are not fp32. loss_sums: per-microbatch (nll_sum, count)
    function of (graphdef, params, microbatch), for stages other than pretraining.
    Raises ConfigError when a model dim or the batch does not divide its mesh axes.
    """
    rules = resolve_rules(cfg.mesh)
    if tx is None:
        tx = make_optimizer(cfg.optimizer, total_steps if total_steps is not None else cfg.steps)
    if cfg.model.param_dtype != "float32":
        tx = with_fp32_master(tx)

    model = abstract_model(cfg.model)
    graphdef, _ = nnx.split(model, nnx.Param)
    check_divisible(nnx.state(model, nnx.Param), logical_axes(model), rules, mesh, cfg.model)

    def init(seed):
        m = NemotronLM(cfg.model, rngs=nnx.Rngs(params=jax.random.key(seed)))
        return create_train_state(m, tx)[1]

    abstract_state = jax.eval_shape(init, 0)
    specs = state_specs(abstract_state, param_specs(model, rules, mesh), mesh, cfg.mesh.zero1)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    bsharding = NamedSharding(mesh, batch_spec(rules, mesh))
    divisor = shards_per_dim(bsharding.spec, 3, mesh_shape(mesh))[1]
    micro = cfg.data.micro_batch_size or cfg.data.global_batch_size
    for key, n in (("data.global_batch_size", cfg.data.global_batch_size),
                   ("data.micro_batch_size", micro)):
        if n % divisor:
            raise ConfigError(f"{key}={n} is not divisible by {divisor}, the number of devices the "
                              f"batch is split over (mesh axes {bsharding.spec[1]})")

    jit_init = jax.jit(init, out_shardings=shardings)

    def init_state(seed: int) -> TrainState:
        return jit_init(jnp.asarray(seed, jnp.uint32))

    inner = make_train_step(graphdef, tx, loss_sums)

    def traced(state, batch):
        with use_rules(mesh, rules):  # active while jit traces: the model's constrain() calls
            return inner(state, batch)

    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(traced, in_shardings=(shardings, bsharding), out_shardings=(shardings, replicated),
                   donate_argnums=0)
    return ShardedTraining(mesh=mesh, rules=rules, graphdef=graphdef, tx=tx,
                           abstract_state=abstract_state, state_specs=specs, state_shardings=shardings,
                           batch_sharding=bsharding, init_state=init_state, init_jit=jit_init, step=step)
