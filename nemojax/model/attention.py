"""Causal GQA attention with packed-sequence masking and selectable backends.

Masking is expressed with two ideas only: a token may attend to a key whose index is not
after its own (causality, with `q_index` the query's absolute slot so the same rule serves
the KV cache), and only to keys of the same segment (packed documents, padding).
Backends: `xla` (einsum + fp32 softmax, the reference) and `dot_product` / `cudnn`
(`jax.nn.dot_product_attention`, which dispatches to cuDNN flash attention on GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30


def attention_mask(q_index: jax.Array, k_index: jax.Array,
                   q_segment: jax.Array | None, k_segment: jax.Array | None) -> jax.Array:
    """Boolean [batch, 1, q, k]: causal by index, and same segment when segments are given."""
    mask = k_index[:, None, :] <= q_index[:, :, None]
    if q_segment is not None:
        mask = mask & (q_segment[:, :, None] == k_segment[:, None, :])
    return mask[:, None, :, :]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q: [b, t, h, d]; k, v: [b, s, kv, d]; mask [b, 1, t, s] -> [b, t, h, d]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    scores = jnp.where(mask[:, :, None, :, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                    implementation: str | None) -> jax.Array:
    """jax.nn.dot_product_attention; mask None means plain causal (the cuDNN fast path)."""
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str, q_index: jax.Array,
           k_index: jax.Array, q_segment: jax.Array | None, k_segment: jax.Array | None,
           plain_causal: bool) -> jax.Array:
    """Dispatch to a backend. `plain_causal` says no segments and q/k share one index range."""
    if backend == "xla":
        return xla_attention(q, k, v, attention_mask(q_index, k_index, q_segment, k_segment))
    implementation = "cudnn" if backend == "cudnn" else None
    mask = None if plain_causal else attention_mask(q_index, k_index, q_segment, k_segment)
    return fused_attention(q, k, v, mask, implementation)
