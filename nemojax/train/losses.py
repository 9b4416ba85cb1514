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


def lm_nll_sums(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over masked-in positions, their count).

    Sums rather than a mean so that microbatches, pipeline stages and hosts can add them up and
    divide once: the update is then the same however the batch was split.
    """
    mask = loss_mask.astype(jnp.float32)
    return -jnp.sum(token_log_probs(logits, targets) * mask), jnp.sum(mask)
