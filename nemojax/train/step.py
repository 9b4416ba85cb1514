"""The train step as a pure function: (state, batch) -> (state, metrics), for any objective.

A batch is a dict of arrays `[accum, micro_batch, ...]`; the leading `accum` axis is scanned for
gradient accumulation. An objective is a per-microbatch *loss-sums* function

    loss_sums(graphdef, params, microbatch) -> (numerator_sum, denominator, extra_metric_sums)

returning sums, not means (e.g. the summed token NLL and the token count): microbatches,
pipeline stages and hosts add them up and the step divides once, so the update is the same
however the batch is split. `extra_metric_sums` (may be empty) are summed the same way and
reported divided by the step's denominator.

Precision and reduction (Megatron): each microbatch's gradient is added into an fp32
accumulator; in the sharded step (`layout`) every device accumulates its own rows' sums and they
are reduced across devices once per step, in fp32 (nemojax.parallel.data_parallel: a ZeRO-2
reduce-scatter into the optimizer state's shards, or an all-reduce); the pipelined step gets its
sums from the 1F1B schedule (nemojax.parallel.pipeline_grads). The fp32 average goes to the
optimizer as is (clipping and AdamW run in fp32; with bf16 weights on an fp32 master copy,
nemojax.train.optim.with_fp32_master). `grad_norm` is the norm before clipping.

Trainable subset (e.g. LoRA adapters): with a `trainable` nnx filter only those parameters get
gradients and optimizer state; the rest are carried in `state.params` unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nemojax.parallel.data_parallel import GradientLayout, reduce_gradients_once, shard_like_gradients
from nemojax.parallel.pipeline import active_schedule, hidden_states
from nemojax.parallel.pipeline_grads import pipeline_gradient_sums
from nemojax.train.losses import lm_nll_sums

LossSums = Callable[[Any, Any, dict], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


class TrainState(NamedTuple):
    step: jax.Array
    params: Any  # nnx.State of the model's Params (all of them, trainable or not)
    opt_state: Any  # the optimizer's state over the trainable params


def lm_loss_sums(graphdef: Any, params: Any, mb: dict[str, jax.Array]
                 ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Pretraining objective: (sum of next-token NLL, token count, {}) for one microbatch."""
    model = nnx.merge(graphdef, params)
    h = hidden_states(model, mb["input_ids"], positions=mb["positions"], segment_ids=mb["segment_ids"])
    nll, count = lm_nll_sums(model.logits(h), mb["targets"], mb["loss_mask"])
    return nll, count, {}


def split_trainable(params: Any, trainable: Any = None) -> tuple[Any, Any]:
    """(trainable params, frozen params); with `trainable=None` everything is trainable."""
    if trainable is None:
        return params, None
    return nnx.split_state(params, trainable, ...)


def join_trainable(trainable: Any, frozen: Any) -> Any:
    return trainable if frozen is None else nnx.merge_state(trainable, frozen)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                       trainable: Any = None) -> tuple[Any, TrainState]:
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, tx.init(split_trainable(params, trainable)[0]))


def local_gradient_sums(graphdef: Any, loss_sums: LossSums, params: Any, batch: dict[str, jax.Array],
                        trainable: Any = None) -> tuple[Any, dict[str, jax.Array]]:
    """(fp32 gradient SUMS of the trainable params, {"numerator", "denominator", extras}) over the
    `[accum, micro, ...]` batch, accumulated over the slices in fp32, nothing divided or reduced
    across devices (inside the data-parallel region these are one device's rows)."""
    train_p, frozen = split_trainable(params, trainable)

    def one(carry, mb):
        g_acc, sums = carry

        def objective(p):
            num, den, extras = loss_sums(graphdef, join_trainable(p, frozen), mb)
            return num, {"numerator": num, "denominator": den, **extras}

        g, got = jax.grad(objective, has_aux=True)(train_p)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, {k: sums[k] + jnp.asarray(v, jnp.float32) for k, v in got.items()}), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_p)
    first = jax.tree.map(lambda a: a[0], batch)
    extra_keys = jax.eval_shape(lambda p: loss_sums(graphdef, p, first)[2], params)
    init = {k: jnp.zeros((), jnp.float32) for k in ("numerator", "denominator", *extra_keys)}
    (g_sum, sums), _ = jax.lax.scan(one, (zeros, init), batch)
    return g_sum, sums


def accumulate_gradients(graphdef: Any, loss_sums: LossSums, params: Any, batch: dict[str, jax.Array],
                         trainable: Any = None, layout: GradientLayout | None = None,
                         ) -> tuple[Any, jax.Array, jax.Array, dict[str, jax.Array]]:
    """(fp32 mean gradient of the trainable params, numerator sum, denominator, extra sums).

    The gradient is d(sum of numerators)/d(params) / sum of denominators over all microbatches,
    i.e. the gradient of the step's mean loss, accumulated in fp32 before any division. With a
    `layout` (the sharded step) each device accumulates its own rows' sums and they are reduced
    across devices once, in fp32 (nemojax.parallel.data_parallel); the pipelined step computes
    those sums with the 1F1B schedule (nemojax.parallel.pipeline.pipeline_gradient_sums).
    """
    def local(p: Any, b: dict) -> tuple[Any, dict]:
        schedule = active_schedule()
        if schedule is not None:
            return pipeline_gradient_sums(graphdef, loss_sums, p, b, schedule, trainable)
        return local_gradient_sums(graphdef, loss_sums, p, b, trainable)

    if layout is None:
        g_sum, sums = local(params, batch)
    else:
        train_specs = split_trainable(layout.param_specs, trainable)[0]
        g_sum, sums = reduce_gradients_once(local, params, batch, layout, split_trainable(params, trainable)[0],
                                            train_specs)
    num, den = sums.pop("numerator"), sums.pop("denominator")
    denom = jnp.maximum(den, 1.0)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    return grads, num, den, sums


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, loss_sums: LossSums = lm_loss_sums, *,
                    trainable: Any = None, lr_schedule: optax.Schedule | None = None,
                    layout: GradientLayout | None = None,
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure step; the caller jits it (nemojax.train.build does, with shardings and donation).

    Metrics: loss (numerator / denominator), loss_denominator, grad_norm (before clipping),
    learning_rate (when `lr_schedule` is given), finite (loss and grad_norm are finite), and each
    extra metric divided by the denominator.
    """

    def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
        grads, num, den, extras = accumulate_gradients(graphdef, loss_sums, state.params, batch, trainable, layout)
        train_p, frozen = split_trainable(state.params, trainable)
        updates, opt_state = tx.update(grads, state.opt_state, train_p)
        new_p = optax.apply_updates(train_p, updates)
        if layout is not None:  # new weights computed on the gradient's shard, then all-gathered
            new_p = shard_like_gradients(new_p, layout)
        params = join_trainable(new_p, frozen)
        denom = jnp.maximum(den, 1.0)
        loss, gnorm = num / denom, optax.tree.norm(grads)
        metrics = {"loss": loss, "loss_denominator": den, "grad_norm": gnorm,
                   "finite": jnp.isfinite(loss) & jnp.isfinite(gnorm),
                   **{k: v / denom for k, v in extras.items()}}
        if lr_schedule is not None:
            metrics["learning_rate"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def make_eval_sums(graphdef: Any, loss_sums: LossSums) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """(numerator sum, denominator) of an `[accum, micro, ...]` batch without gradients."""

    def eval_sums(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        sums = jax.lax.map(lambda mb: loss_sums(graphdef, params, mb)[:2], batch)
        return jnp.sum(sums[0]), jnp.sum(sums[1])

    return eval_sums
