"""Every loss nemojax trains with, as pure functions of logits / log-probs and masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position, [batch, seq], computed in fp32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - lse


def lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over positions where loss_mask is set; also returns the count."""
    mask = loss_mask.astype(jnp.float32)
    nll = -token_log_probs(logits, targets) * mask
    count = jnp.sum(mask)
    return jnp.sum(nll) / jnp.maximum(count, 1.0), count
