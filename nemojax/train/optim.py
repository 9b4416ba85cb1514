"""AdamW with decay masks, clipping and learning-rate schedules, built from OptimizerConfig, and
the fp32 master copy that makes low-precision weights train like Megatron's mixed precision.

Mixed precision (Megatron / NeMo): with `model.param_dtype: bfloat16` the weights are stored
and used in bf16, the train step accumulates the gradients in fp32 (nemojax.train.step), and
`with_fp32_master` keeps an fp32 master copy of the weights in the optimizer state: clipping,
Adam's moments and the update all work in fp32 on the master copy, and the stored bf16 weights
are the master rounded once per step (rounding never accumulates). Living in the optimizer
state, the master copy is sharded with it (ZeRO-1 shards it over `data`, like Megatron's
distributed optimizer).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nemojax.config import ConfigError, OptimizerConfig


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """warmup then cosine | constant | wsd (warmup-stable-decay with a linear final decay)."""
    warmup = max(cfg.warmup_steps, 0)
    peak, floor = cfg.learning_rate, cfg.min_learning_rate
    if cfg.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif cfg.schedule == "cosine":
        decay = cfg.decay_steps or max(total_steps - warmup, 1)
        main = optax.cosine_decay_schedule(peak, decay, alpha=floor / peak if peak else 0.0)
    elif cfg.schedule == "wsd":
        decay = cfg.decay_steps or max((total_steps - warmup) // 5, 1)
        stable = max(total_steps - warmup - decay, 0)
        main = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable])
    else:
        raise ConfigError(f"optimizer.schedule={cfg.schedule!r} is unknown; choose cosine, constant or wsd")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_mask(params) -> object:
    """Weight decay on weight matrices only; LayerNorm1P scales and biases (any path naming a
    norm, stacked per layer or not) are exempt, as in Megatron."""
    def keep(path, _):
        return not any("norm" in str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


class MasterState(NamedTuple):
    master: Any  # fp32 copy of the (trainable) params
    inner: Any  # the wrapped optimizer's state


def with_fp32_master(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `inner` (clipping, AdamW, ...) in fp32 on an fp32 master copy of low-precision params.

    `update(grads, state, params)` takes fp32 gradients (lower precision is upcast), updates the
    master copy with `inner`, and returns the update that moves the stored params to the new
    master rounded to their dtype.
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


def needs_fp32_master(params: Any) -> bool:
    """True when any parameter is stored below fp32 (then the optimizer keeps an fp32 master)."""
    return any(jnp.dtype(getattr(p, "dtype", jnp.float32)) != jnp.float32 for p in jax.tree.leaves(params))
