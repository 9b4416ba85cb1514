"""AdamW with decay masks, clipping and learning-rate schedules, built from OptimizerConfig."""

from __future__ import annotations

import jax
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
