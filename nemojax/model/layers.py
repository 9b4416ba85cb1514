"""Pure building blocks of a Nemotron-4 block: LayerNorm1P, partial NeoX RoPE, squared-ReLU MLP.

They are plain functions of arrays so that the same code serves the scanned training
forward, the pipeline stages and the KV-cached decode step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nemojax.model import quant


def layernorm1p(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm whose stored gamma is zero-centred: y = norm(x) * (1 + scale) + bias.

    Statistics are taken in float32 whatever the activation dtype, then cast back.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    y = y * (1.0 + scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rope_tables(positions: jax.Array, rotary_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of shape [..., rotary_dim] for integer positions (NeoX layout: halves repeated)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_partial_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the first `rotary_dim` dims of each head ("rotate half"); pass the rest through.

    x: [batch, seq, heads, head_dim]; cos/sin: [batch, seq, rotary_dim].
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x32 = x_rot.astype(jnp.float32)
    half = rot // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)


def squared_relu_mlp(x: jax.Array, up: Any, down: Any) -> jax.Array:
    """down(relu(up(x))^2): Nemotron's gateless MLP, no biases (weights plain or `quant.QArray`)."""
    h = quant.einsum("bsd,df->bsf", x, up)
    h = jnp.square(jax.nn.relu(h))
    return quant.einsum("bsf,fd->bsd", h, down)
