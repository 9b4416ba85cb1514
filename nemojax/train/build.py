"""The one place a training step is built: config + mesh + task -> sharded init and jitted step.

`nemojax train` (the Trainer), `nemojax compile` (AOT for a TPU topology) and
benchmarks/train_throughput.py all call `build_training`, so what compile measures and what the
benchmark times is exactly what training runs.

    mesh = make_mesh(cfg.mesh)                     # after distributed.initialize() on multi-host
    tr = build_training(cfg, mesh)                 # pretraining by default
    state = tr.init_state(cfg.seed)                # created sharded: no host holds the model
    rows = tr.rows(accum, micro)                   # the global-batch rows this process supplies
    batch = tr.global_batch(local_rows, accum, micro)
    state, metrics = tr.step(state, batch)         # jitted once per batch shape, state donated

Extension point: a training stage (reward model, SFT, DPO / IPO / RPO, LoRA) passes a `TrainTask`
and gets the same sharding, pipelining, precision, accumulation, checkpointing and Trainer:

* `make_model(cfg, rngs)`: its nnx Module (NemotronLM, or e.g. an LM plus a reward head). Every
  `nnx.Param` must carry `logical_axes` metadata, which the `sharding:` rules map onto the mesh.
* `loss_sums(graphdef, params, microbatch) -> (numerator_sum, denominator, extra_metric_sums)`:
  its per-microbatch objective as sums (see nemojax.train.step). To be pipelined when the mesh
  has `pipeline > 1`, compute the LM's hidden states with
  `nemojax.parallel.pipeline.hidden_states(lm, ...)` rather than `lm.hidden(...)`.
* `batch_fields(cfg) -> {name: BatchField(dtype, trailing_shape)}`: the fields of one batch row
  (e.g. chosen / rejected ids for preference pairs); every field is `[accum, micro, *trailing]`
  with the micro-batch dim split over the data axes.
* `trainable`: an nnx filter (e.g. `nnx.PathContains("lora")`, or a Param subclass); only those
  parameters get gradients and optimizer state, the others are carried frozen. None = all.
* `load_weights(path, cfg, shardings) -> pure params dict`: what `init_from=` loads (default:
  an LM checkpoint or Hugging Face directory, nemojax.train.checkpointing.load_init_weights).

The Trainer (nemojax.train.loop) also takes a `batch_factory` for the stage's data.

Mixed precision follows the weights: if any parameter is stored below fp32 the optimizer is
wrapped in `with_fp32_master` (Megatron's bf16 + fp32 master); the step accumulates gradients in
fp32 either way. Pipelining follows the RESOLVED mesh: `hidden_states` runs the interleaved
schedule whenever `mesh.shape["pipeline"] > 1`, whatever `mesh.pipeline` said (-1 included).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from nemojax.config import Config, ConfigError
from nemojax.model.axes import logical_to_spec, mesh_shape, shards_per_dim, use_rules
from nemojax.model.transformer import NemotronLM
from nemojax.parallel import batching
from nemojax.parallel.memory import tree_shard_bytes
from nemojax.parallel.mesh import make_abstract_mesh
from nemojax.parallel.pipeline import Schedule, pipeline_schedule, use_pipeline
from nemojax.parallel.rules import Rules, check_divisible, resolve_rules
from nemojax.parallel.data_parallel import GradientLayout, gradient_layout
from nemojax.parallel.state_sharding import (gradient_specs, model_logical_axes, optimizer_state_specs, param_specs,
                                             tree_param_specs)
from nemojax.train.optim import learning_rate_schedule, make_optimizer, needs_fp32_master, with_fp32_master
from nemojax.train.rampup import BatchSchedule
from nemojax.train.step import (LossSums, TrainState, accumulate_gradients, create_train_state, lm_loss_sums,
                                make_eval_sums, make_train_step, split_trainable)


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One field of a batch row: its dtype and the dims after `[accum, micro]`."""

    dtype: Any
    trailing: tuple[int, ...]


def lm_batch_fields(cfg: Config) -> dict[str, BatchField]:
    """Packed pretraining rows (nemojax.data.pretrain)."""
    s = (cfg.data.seq_len,)
    return {"input_ids": BatchField(jnp.int32, s), "targets": BatchField(jnp.int32, s),
            "positions": BatchField(jnp.int32, s), "segment_ids": BatchField(jnp.int32, s),
            "loss_mask": BatchField(jnp.float32, s)}


def lm_model(cfg: Config, rngs: nnx.Rngs) -> nnx.Module:
    return NemotronLM(cfg.model, rngs=rngs)


def _load_lm_weights(path: str, cfg: Config, shardings: Any) -> dict:
    from nemojax.train.checkpointing import load_init_weights

    return load_init_weights(path, cfg.model, sharding=shardings)


@dataclasses.dataclass(frozen=True)
class TrainTask:
    """What a training stage plugs into `build_training` (see the module docstring)."""

    make_model: Callable[[Config, nnx.Rngs], nnx.Module] = lm_model
    loss_sums: LossSums = lm_loss_sums
    batch_fields: Callable[[Config], dict[str, BatchField]] = lm_batch_fields
    trainable: Any = None
    load_weights: Callable[[str, Config, Any], dict] = _load_lm_weights


PRETRAIN = TrainTask()


@dataclasses.dataclass
class StatePlan:
    """A training state's structure and layout, known without devices or compilation."""

    rules: Rules
    graphdef: Any
    tx: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs
    state_specs: TrainState  # PartitionSpecs
    batch_spec: PartitionSpec  # of every batch field: micro-batch dim over the `batch` rule
    init: Callable[[Any], TrainState]  # seed -> TrainState (unsharded; jit it with out_shardings)


def plan_state(cfg: Config, mesh: Mesh | AbstractMesh, task: TrainTask = PRETRAIN,
               tx: optax.GradientTransformation | None = None, total_steps: int | None = None) -> StatePlan:
    """Shapes, dtypes and PartitionSpecs of the TrainState for `cfg` on `mesh` (concrete or abstract).

    Raises ConfigError when a parameter dim does not divide its mesh axes.
    """
    rules = resolve_rules(cfg.sharding)
    model = nnx.eval_shape(lambda: task.make_model(cfg, nnx.Rngs(params=0)))
    graphdef, abstract_params = nnx.split(model, nnx.Param)
    axes = model_logical_axes(model)
    check_divisible(abstract_params, axes, rules, mesh, cfg.model)
    if tx is None:
        tx = make_optimizer(cfg.optimizer, total_steps if total_steps is not None else cfg.steps)
    if needs_fp32_master(split_trainable(abstract_params, task.trainable)[0]):  # frozen (e.g. quantized) params need none
        tx = with_fp32_master(tx)

    def init(seed: Any) -> TrainState:
        m = task.make_model(cfg, nnx.Rngs(params=jax.random.key(seed)))
        return create_train_state(m, tx, task.trainable)[1]

    abstract_state = jax.eval_shape(init, jnp.zeros((), jnp.uint32))
    by_path = param_specs(axes, rules, mesh)
    specs = TrainState(
        step=PartitionSpec(),
        params=tree_param_specs(abstract_state.params, by_path),
        opt_state=optimizer_state_specs(abstract_state.opt_state, abstract_state.params, by_path, mesh,
                                        cfg.sharding.zero1))
    return StatePlan(rules=rules, graphdef=graphdef, tx=tx, abstract_state=abstract_state, state_specs=specs,
                     batch_spec=logical_to_spec((None, "batch"), rules, mesh), init=init)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


@dataclasses.dataclass
class Training:
    """Everything that runs one training layout; built by `build_training`."""

    cfg: Config
    task: TrainTask
    mesh: Mesh
    rules: Rules
    schedule: Schedule | None  # the pipeline schedule, None without pipeline stages
    graphdef: Any
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    abstract_state: TrainState  # ShapeDtypeStructs
    state_specs: TrainState  # PartitionSpecs
    state_shardings: TrainState  # NamedShardings
    batch_sharding: NamedSharding  # of every batch field
    gradient_layout: GradientLayout | None  # where gradients are reduced by hand (None: one device / pure FSDP)
    init_jit: Any  # jitted: uint32 seed -> sharded TrainState (for .lower() / AOT)
    step: Callable[[TrainState, dict], tuple[TrainState, dict]]  # jitted, donates the state
    gradients: Callable[[Any, dict], tuple[Any, dict]]  # jitted: params, batch -> (fp32 grads, sums)
    eval_sums: Callable[[Any, dict], tuple[jax.Array, jax.Array]]  # jitted: params, batch -> sums

    def init_state(self, seed: int) -> TrainState:
        return self.init_jit(jnp.asarray(seed, jnp.uint32))

    @property
    def batch_divisor(self) -> int:
        """Micro-batch sizes must be multiples of this (the devices the batch is split over)."""
        return shards_per_dim(self.batch_sharding.spec, 2, mesh_shape(self.mesh))[1]

    def rows(self, accum: int, micro: int) -> np.ndarray:
        """Indices into the flat global batch (`accum * micro` rows) of the rows this process
        supplies, in the order `global_batch` expects them (nemojax.parallel.batching)."""
        return batching.global_rows(self.batch_sharding, accum, micro)

    def global_batch(self, local: Mapping[str, np.ndarray], accum: int, micro: int) -> dict[str, jax.Array]:
        """Global `[accum, micro, ...]` arrays from this process' rows (flat, in `rows` order)."""
        fields = self.task.batch_fields(self.cfg)
        if set(local) != set(fields):
            raise ValueError(f"batch fields {sorted(local)} do not match the task's {sorted(fields)}")
        return batching.assemble(self.batch_sharding, {k: local[k] for k in fields}, accum, micro)

    def abstract_batch(self, accum: int, micro: int) -> dict[str, jax.ShapeDtypeStruct]:
        return {k: jax.ShapeDtypeStruct((accum, micro, *f.trailing), f.dtype, sharding=self.batch_sharding)
                for k, f in self.task.batch_fields(self.cfg).items()}

    def abstract_sharded_state(self) -> TrainState:
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def lower(self, accum: int, micro: int) -> Any:
        """The step lowered for abstract arguments: what `nemojax compile` compiles."""
        return self.step.lower(self.abstract_sharded_state(), self.abstract_batch(accum, micro))

    def fresh_opt_state(self, params: Any) -> Any:
        """A new optimizer state for `params` (init_from: weights only), sharded like training's."""
        train_p = split_trainable(params, self.task.trainable)[0]
        return jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(train_p)


def build_training(cfg: Config, mesh: Mesh, *, task: TrainTask = PRETRAIN,
                   tx: optax.GradientTransformation | None = None, total_steps: int | None = None) -> Training:
    """Shardings, sharded init and the jitted step, gradient and eval functions for `cfg` on `mesh`.

    tx: the optimizer (default `make_optimizer(cfg.optimizer, total_steps or cfg.steps)`; wrapped
    in `with_fp32_master` when parameters are stored below fp32). Raises ConfigError when a model
    dim, a batch size or the pipeline schedule does not fit the mesh.
    """
    total = total_steps if total_steps is not None else cfg.steps
    plan = plan_state(cfg, mesh, task, tx, total)
    sched = BatchSchedule(cfg.data)
    shapes = sched.distinct_shapes()
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), plan.state_specs, is_leaf=_is_spec)
    bsharding = NamedSharding(mesh, plan.batch_spec)
    divisor = shards_per_dim(plan.batch_spec, 2, mesh_shape(mesh))[1]
    for _, micro in sorted(shapes):
        if micro % divisor:
            key = "data.micro_batch_size" if cfg.data.micro_batch_size else \
                "data.global_batch_size (or a data.rampup batch_size)"
            raise ConfigError(f"{key}: micro batch {micro} is not divisible by {divisor}, the number of "
                              f"devices the batch is split over (mesh axes {plan.batch_spec[1]})")
    schedule = pipeline_schedule(cfg, mesh, [m for _, m in shapes], divisor)
    rules, graphdef = plan.rules, plan.graphdef
    train_abstract = split_trainable(plan.abstract_state.params, task.trainable)[0]
    grad_specs = gradient_specs(train_abstract, split_trainable(plan.state_specs.params, task.trainable)[0], mesh,
                                cfg.sharding.zero2)
    layout = gradient_layout(mesh, rules, plan.state_specs.params, grad_specs, plan.batch_spec,
                             pipelined=schedule is not None)
    lr_schedule = learning_rate_schedule(cfg.optimizer, total)
    replicated = NamedSharding(mesh, PartitionSpec())

    def traced(fn: Callable) -> Callable:
        def wrapped(*args):
            with use_rules(mesh, rules), use_pipeline(schedule):  # active while jit traces
                return fn(*args)
        return wrapped

    init_jit = jax.jit(plan.init, out_shardings=shardings)
    step = jax.jit(traced(make_train_step(graphdef, plan.tx, task.loss_sums, trainable=task.trainable,
                                          lr_schedule=lr_schedule, layout=layout)),
                   in_shardings=(shardings, bsharding), out_shardings=(shardings, replicated), donate_argnums=0)
    grad_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), grad_specs, is_leaf=_is_spec)

    def gradients(params: Any, batch: dict) -> tuple[Any, dict]:
        g, num, den, extras = accumulate_gradients(graphdef, task.loss_sums, params, batch, task.trainable, layout)
        return g, {"numerator": num, "denominator": den, **extras}

    grads_jit = jax.jit(traced(gradients), in_shardings=(shardings.params, bsharding),
                        out_shardings=(grad_shardings, replicated))
    eval_jit = jax.jit(traced(make_eval_sums(graphdef, task.loss_sums)),
                       in_shardings=(shardings.params, bsharding), out_shardings=replicated)
    return Training(cfg=cfg, task=task, mesh=mesh, rules=rules, schedule=schedule, graphdef=graphdef, tx=plan.tx,
                    lr_schedule=lr_schedule, abstract_state=plan.abstract_state, state_specs=plan.state_specs,
                    state_shardings=shardings, batch_sharding=bsharding, gradient_layout=layout,
                    init_jit=init_jit, step=step,
                    gradients=grads_jit, eval_sums=eval_jit)


def _is_master(path: tuple[Any, ...]) -> bool:
    return any(getattr(k, "name", None) == "master" for k in path)


def training_state_bytes(cfg: Config, num_devices: int, task: TrainTask = PRETRAIN) -> dict[str, Any]:
    """Per-device bytes of params, the fp32 gradient accumulator, optimizer state and fp32 master
    copy (and the reduced gradient) for `cfg`'s mesh over `num_devices` devices, computed
    abstractly (no devices needed).

    The numbers come from the same plan the trainer shards with. Activations are not included:
    they depend on the batch, remat policy and schedule (use `nemojax compile` for those).
    """
    mesh = make_abstract_mesh(cfg.mesh, num_devices)
    sizes = mesh_shape(mesh)
    plan = plan_state(cfg, mesh, task, total_steps=max(cfg.steps, 1))
    params = tree_shard_bytes(plan.abstract_state.params, plan.state_specs.params, sizes)
    train_p = split_trainable(plan.abstract_state.params, task.trainable)[0]
    train_specs = split_trainable(plan.state_specs.params, task.trainable)[0]
    grads32 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), train_p)
    grads = tree_shard_bytes(grads32, train_specs, sizes)
    reduced = tree_shard_bytes(grads32, gradient_specs(train_p, train_specs, mesh, cfg.sharding.zero2), sizes)
    opt_leaves = jax.tree_util.tree_flatten_with_path(plan.abstract_state.opt_state)[0]
    opt_specs = jax.tree.leaves(plan.state_specs.opt_state, is_leaf=_is_spec)
    out = {"params": params, "gradients": grads, "optimizer_state": 0, "master_weights": 0}
    for (path, leaf), spec in zip(opt_leaves, opt_specs):
        key = "master_weights" if _is_master(path) else "optimizer_state"
        out[key] += tree_shard_bytes(leaf, spec, sizes)
    out["total"] = sum(out.values())
    out["reduced_gradients"] = reduced
    return {
        "mesh": sizes,
        "zero1": cfg.sharding.zero1,
        "zero2": cfg.sharding.zero2,
        "per_device_bytes": out,
        "per_device_gib": {k: round(v / 2**30, 3) for k, v in out.items()},
        "note": "training state only; activations depend on batch, remat and schedule. gradients: each "
                "device's fp32 accumulator over the step's micro-batches; reduced_gradients: what the "
                "once-per-step reduction leaves (the ZeRO-2 shard with sharding.zero2), not in total",
    }


__all__ = ["BatchField", "PRETRAIN", "StatePlan", "TrainTask", "Training", "build_training", "lm_batch_fields",
           "lm_model", "plan_state", "training_state_bytes"]
