"""The Nemotron-4 decoder in Flax NNX, with layer parameters stacked for `lax.scan`.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per dim);
`nemojax.parallel` maps those names to mesh axes, so the model never names a mesh axis.
The per-layer computation is a pure function (`block`) of one layer's parameter slice,
which is what the scan, the pipeline stages and the KV-cached decode all reuse.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from nemojax.config import ModelConfig
from nemojax.model.attention import cached_attention, self_attention
from nemojax.model import quant
from nemojax.model.layers import apply_partial_rope, layernorm1p, rope_tables, squared_relu_mlp
from nemojax.model.lora import adapter_params, merge_adapters
from nemojax.model.axes import constrain

REMAT_POLICIES: dict[str, Any] = {
    "none": None,  # keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block in backward
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
    "save_attn_mlp_out": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
    "save_qkv_attn_out": jax.checkpoint_policies.save_only_these_names("qkv_proj", "attn_out"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Logical axes of the residual stream between blocks (sharding hook; a no-op without rules).
ACT_AXES: tuple[str, ...] = ("batch", "length", "activation_embed")

# Logical axis names of the stacked block parameters (leading "layers" axis).
BLOCK_AXES: dict[str, tuple[str, ...]] = {
    "attn_norm_scale": ("layers", "norm"),
    "attn_norm_bias": ("layers", "norm"),
    "q": ("layers", "embed", "heads", "head_dim"),
    "k": ("layers", "embed", "kv_heads", "head_dim"),
    "v": ("layers", "embed", "kv_heads", "head_dim"),
    "o": ("layers", "heads", "head_dim", "embed"),
    "mlp_norm_scale": ("layers", "norm"),
    "mlp_norm_bias": ("layers", "norm"),
    "up": ("layers", "embed", "mlp"),
    "down": ("layers", "mlp", "embed"),
}


class KVCache(NamedTuple):
    """Preallocated keys/values for all layers: [layers, batch, max_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @staticmethod
    def zeros(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> "KVCache":
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        dt = dtype or DTYPES[cfg.compute_dtype]
        return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt))


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple[str, ...],
           dtype: Any) -> nnx.Param:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def _const(shape: tuple[int, ...], axes: tuple[str, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class Blocks(nnx.Module):
    """All decoder blocks' weights, stacked along a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, D, H, KV, hd, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
                              cfg.head_dim, cfg.ffn_hidden_size)
        dt = DTYPES[cfg.param_dtype]
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * L)
        self.attn_norm_scale = _const((L, D), BLOCK_AXES["attn_norm_scale"], dt)
        self.attn_norm_bias = _const((L, D), BLOCK_AXES["attn_norm_bias"], dt)
        self.q = _param(rngs, (L, D, H, hd), std, BLOCK_AXES["q"], dt)
        self.k = _param(rngs, (L, D, KV, hd), std, BLOCK_AXES["k"], dt)
        self.v = _param(rngs, (L, D, KV, hd), std, BLOCK_AXES["v"], dt)
        self.o = _param(rngs, (L, H, hd, D), out_std, BLOCK_AXES["o"], dt)
        self.mlp_norm_scale = _const((L, D), BLOCK_AXES["mlp_norm_scale"], dt)
        self.mlp_norm_bias = _const((L, D), BLOCK_AXES["mlp_norm_bias"], dt)
        self.up = _param(rngs, (L, D, F), std, BLOCK_AXES["up"], dt)
        self.down = _param(rngs, (L, F, D), out_std, BLOCK_AXES["down"], dt)
        self.quant_names = _quantize_projections(self, cfg) if cfg.quant.enabled else ()
        adapters = adapter_params(cfg, rngs, dt)  # LoRA (model.lora): {target}_lora_a/_b, or none
        for name, param in adapters.items():
            setattr(self, name, param)
        self.adapter_names = tuple(adapters)
        self.lora_enabled = bool(adapters)  # static; False runs the base model

    def arrays(self) -> dict[str, jax.Array]:
        """The stacked weights, plus the LoRA adapters (merged per layer by `block`) when enabled."""
        names = (*BLOCK_AXES, *self.quant_names, *(self.adapter_names if self.lora_enabled else ()))
        return {name: getattr(self, name)[...] for name in names}


def _quantize_projections(blocks: Blocks, cfg: ModelConfig) -> tuple[str, ...]:
    """Replace the projections of `blocks` by their quantized values (model.quant) and add one
    scale param per projection (`{target}_qscale`, see nemojax.model.quant); returns the scale names."""
    names = []
    for t in quant.QUANT_TARGETS:
        axes = BLOCK_AXES[t]
        n_in = quant.N_IN[t]
        qa = quant.quantize(getattr(blocks, t)[...], cfg.quant.mode, n_in, cfg.quant.block_size, layered=True)
        setattr(blocks, t, nnx.Param(qa.values, logical_axes=axes))
        scale_axes = (axes[0], *(quant.SCALE_IN_AXIS,) * n_in, *axes[1 + n_in:])
        setattr(blocks, quant.scale_name(t), nnx.Param(qa.scale, logical_axes=scale_axes))
        names.append(quant.scale_name(t))
    return tuple(names)


def block(cfg: ModelConfig, p: dict[str, jax.Array], x: jax.Array, *, cos: jax.Array,
          sin: jax.Array, q_index: jax.Array, segment_ids: jax.Array | None,
          cache: tuple[jax.Array, jax.Array] | None = None,
          ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-LN decoder block on one layer's weights `p` (no leading layers axis).

    Without a cache the tokens attend causally among themselves (slots 0..seq-1, within their
    segment) with `cfg.attention_backend`. With `cache` (k, v of [batch, max_len, kv_heads,
    head_dim]) the new keys/values are written at slots `q_index` and the queries attend over
    the whole cache (`cached_attention`, whatever the backend).
    """
    cdt = DTYPES[cfg.compute_dtype]
    p = merge_adapters(cfg, p)  # LoRA: W + (alpha/rank) A @ B for this layer only
    w = quant.compute_weights(p, cdt)  # quantized projections stay QArrays (model.quant)
    h = layernorm1p(x, p["attn_norm_scale"], p["attn_norm_bias"], cfg.norm_eps)
    q = quant.einsum("bsd,dhk->bshk", h, w["q"])
    k = quant.einsum("bsd,dhk->bshk", h, w["k"])
    v = quant.einsum("bsd,dhk->bshk", h, w["v"])
    q, k, v = (checkpoint_name(t, "qkv_proj") for t in (q, k, v))
    q = apply_partial_rope(q, cos, sin)
    k = apply_partial_rope(k, cos, sin)
    new_cache = None
    if cache is None:
        attn = self_attention(q, k, v, backend=cfg.attention_backend, segment_ids=segment_ids,
                              max_segments=cfg.attention_max_segments)
    else:
        ck, cv = cache
        rows = jnp.arange(x.shape[0])[:, None]
        ck = ck.at[rows, q_index].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[rows, q_index].set(v.astype(cv.dtype), mode="drop")
        new_cache = (ck, cv)
        attn = cached_attention(q, ck.astype(cdt), cv.astype(cdt), q_index=q_index)
    attn_out = quant.einsum("bshk,hkd->bsd", attn, w["o"])
    attn_out = checkpoint_name(attn_out, "attn_out")
    x = x + attn_out
    h = layernorm1p(x, p["mlp_norm_scale"], p["mlp_norm_bias"], cfg.norm_eps)
    mlp_out = checkpoint_name(squared_relu_mlp(h, w["up"], w["down"]), "mlp_out")
    return x + mlp_out, new_cache


def embed_tokens(cfg: ModelConfig, table: jax.Array, input_ids: jax.Array) -> jax.Array:
    """Embedding lookup in the compute dtype. The table is first gathered over the mesh axes of its
    `embed` dim (FSDP gathers a weight before use), so the lookup is a vocab-parallel gather whose
    rows follow the batch: a table still split over the batch's own axes makes the partitioner
    replicate it (and, inside a partially manual region, fail)."""
    table = constrain(table, ("vocab", None))
    return constrain(jnp.take(table, input_ids, axis=0).astype(DTYPES[cfg.compute_dtype]), ACT_AXES)


def run_blocks(cfg: ModelConfig, stacked: dict[str, jax.Array], x: jax.Array, *,
               positions: jax.Array, q_index: jax.Array, segment_ids: jax.Array | None,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Apply every layer of `stacked` (leading layers axis) in order: scanned or unrolled."""
    cos, sin = rope_tables(positions, cfg.rotary_dim, cfg.rope_base)

    def body(carry, xs):
        layer_params, layer_cache = xs
        y, new_cache = block(cfg, layer_params, carry, cos=cos, sin=sin, q_index=q_index,
                             segment_ids=segment_ids, cache=layer_cache)
        return constrain(y, ACT_AXES), new_cache

    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=not cfg.scan_layers)
    layer_caches = None if cache is None else (cache.k, cache.v)
    if cfg.scan_layers:
        x, new = jax.lax.scan(body, x, (stacked, layer_caches))
    else:
        outs = []
        num = next(iter(stacked.values())).shape[0]
        for i in range(num):
            xs = jax.tree.map(lambda a: a[i], (stacked, layer_caches))
            x, c = body(x, xs)
            outs.append(c)
        new = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
    return x, (None if cache is None else KVCache(*new))


class NemotronLM(nnx.Module):
    """Decoder-only Nemotron-4 language model: embeddings, blocks, final LayerNorm1P, LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = DTYPES[cfg.param_dtype]
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.init_std, ("vocab", "embed"), dt)
        self.blocks = Blocks(cfg, rngs)
        self.final_norm_scale = _const((cfg.hidden_size,), ("norm",), dt)
        self.final_norm_bias = _const((cfg.hidden_size,), ("norm",), dt)
        self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), cfg.init_std, ("embed", "vocab"), dt)

    def hidden(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: KVCache | None = None,
               ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [batch, seq, hidden] (the reward head reads these).

        positions: RoPE positions (default 0..seq-1). segment_ids: packed-document ids; tokens
        attend only within their segment (0 may mark padding). With a cache, `positions` are
        also the cache slots written and attention covers the whole cache.
        """
        b, s = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        q_index = positions if cache is not None else jnp.broadcast_to(jnp.arange(s), (b, s))
        x = embed_tokens(self.cfg, self.embed[...], input_ids)
        x, cache = run_blocks(self.cfg, self.blocks.arrays(), x, positions=positions, q_index=q_index,
                              segment_ids=segment_ids, cache=cache)
        x = layernorm1p(x, self.final_norm_scale[...], self.final_norm_bias[...], self.cfg.norm_eps)
        return x, cache

    def logits(self, h: jax.Array) -> jax.Array:
        """fp32 logits from final hidden states."""
        w = self.lm_head[...].astype(h.dtype)
        return jnp.einsum("bsd,dv->bsv", h, w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, attention_mask: jax.Array | None = None,
                 ) -> jax.Array:
        """Logits [batch, seq, vocab] in fp32.

        attention_mask (1 = real token, 0 = padding) is a convenience for padded batches: it
        becomes segment ids, so real tokens never attend to padding.
        """
        if attention_mask is not None and segment_ids is None:
            segment_ids = attention_mask.astype(jnp.int32)
        h, _ = self.hidden(input_ids, positions=positions, segment_ids=segment_ids)
        return self.logits(h)

    def decode(self, input_ids: jax.Array, positions: jax.Array, cache: KVCache,
               ) -> tuple[jax.Array, KVCache]:
        """Cached forward: write these tokens' keys/values at `positions`, return logits and cache."""
        h, cache = self.hidden(input_ids, positions=positions, cache=cache)
        return self.logits(h), cache


def logical_axes(model: nnx.Module) -> Any:
    """A state-shaped tree of logical axis tuples, one per parameter."""
    state = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda v: v.get_metadata()["logical_axes"], state,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))


def init_model(cfg: ModelConfig, seed: int = 0) -> NemotronLM:
    return NemotronLM(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> NemotronLM:
    """The model with ShapeDtypeStruct leaves: shapes and metadata without allocating weights."""
    return nnx.eval_shape(lambda: NemotronLM(cfg, rngs=nnx.Rngs(params=0)))
