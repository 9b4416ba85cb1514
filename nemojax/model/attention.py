"""Causal GQA attention with packed-sequence masking and selectable backends.

Two entry points:
* `self_attention`: queries and keys are the same tokens 0..seq-1 (training, scoring, a
  prompt's forward). A token sees earlier-or-equal tokens of its own segment (packed
  documents; padding is a segment too). Backends (`model.attention_backend`):
  - `xla`: einsum scores + fp32 softmax, the reference. Materialises [batch, heads, seq, seq].
  - `splash`: JAX's Pallas splash kernel with segment ids (TPU; interpret mode elsewhere,
    for tests only). Never materialises the scores.
  - `cudnn`: cuDNN flash attention; packed rows as cuDNN's ragged sequences
    (`cudnn_attention.py`). NVIDIA GPUs, bfloat16/float16.
  - `dot_product`: `jax.nn.dot_product_attention` with JAX's default implementation (XLA)
    and a dense mask: the older generic path, kept for comparison.
  - `auto` (default): `splash` on TPU, `cudnn` on CUDA GPUs with 16-bit compute, else `xla`.
* `cached_attention`: queries at arbitrary cache slots over a KV cache (the model's cached
  decode). Always the `xla` formula: a few queries against a cache are bound by reading the
  cache, which this does once; flash kernels for training shapes do not apply.

The platform `auto` resolves for is the one the step is compiled for: the devices of the mesh
under `use_rules` (so `nemojax compile --topology v5p-...` on a CPU host resolves to splash),
else JAX's default backend.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from nemojax.model.axes import active_rules

NEG_INF = -1e30
BACKENDS = ("auto", "xla", "splash", "cudnn", "dot_product")


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


def compile_platform() -> str:
    """'tpu', 'cuda', 'rocm' or 'cpu': the platform of the mesh being traced for, else the default."""
    active = active_rules()
    device: Any = None
    if active is not None and isinstance(active[0], Mesh):
        device = active[0].devices.flat[0]
    if device is None:
        device = jax.devices()[0]
    if device.platform == "gpu":
        version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
        return "rocm" if "rocm" in version else "cuda"
    return device.platform


def resolve_backend(name: str, *, platform: str, dtype: Any) -> str:
    """The backend `name` runs as on `platform` for attention inputs of `dtype` (`auto` resolved)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; choose one of {BACKENDS}")
    if name != "auto":
        return name
    if platform == "tpu":
        return "splash"
    if platform == "cuda" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla"


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str,
                   segment_ids: jax.Array | None, max_segments: int = 64) -> jax.Array:
    """Causal self-attention over tokens 0..seq-1. q [b, t, h, d]; k, v [b, t, kv, d] -> [b, t, h, d].

    segment_ids [b, t] (None = one document per row): tokens attend within their segment.
    max_segments: the cuDNN path's cap on segment runs per row (see cudnn_attention.py).
    """
    platform = compile_platform()
    name = resolve_backend(backend, platform=platform, dtype=q.dtype)
    if name == "splash":
        from nemojax.model.splash_attention import splash_attention

        return splash_attention(q, k, v, segment_ids, interpret=platform != "tpu")
    if name == "cudnn":
        from nemojax.model.cudnn_attention import cudnn_attention

        return cudnn_attention(q, k, v, segment_ids, max_segments=max_segments)
    b, t = q.shape[:2]
    index = jnp.broadcast_to(jnp.arange(t), (b, t))
    if name == "dot_product":
        if segment_ids is None:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return jax.nn.dot_product_attention(q, k, v, mask=attention_mask(index, index, segment_ids, segment_ids))
    return xla_attention(q, k, v, attention_mask(index, index, segment_ids, segment_ids))


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_index: jax.Array) -> jax.Array:
    """Queries at cache slots `q_index` [b, t] over a whole cache k, v [b, rows, kv, d]: each
    sees the rows at or before its own slot."""
    b, rows = k.shape[:2]
    k_index = jnp.broadcast_to(jnp.arange(rows), (b, rows))
    return xla_attention(q, k, v, attention_mask(q_index, k_index, None, None))
