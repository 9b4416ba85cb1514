"""The engine's one-token-per-slot decode step, specialised for generation.

`NemotronLM.decode` is the general cached forward (any number of new tokens, layers scanned
with the cache as scan input/output). For generation, where each slot adds exactly one token
per step, that path copies the whole cache through the layer scan on every step and runs
attention as a batched matmul that needs the cache transposed. This step instead:

- keeps the cache as a `fori_loop` carry and writes the new key/value rows in place
  (a scatter on a donated buffer, no per-step cache copy);
- computes single-query attention as a fused multiply-and-reduce straight from the
  [slots, window, kv_heads, head_dim] layout (no transpose, the cache is read once).

It reuses the model's building blocks (layernorm1p, partial RoPE, squared-ReLU MLP, LM head),
and tests/test_engine.py checks its logits against the model's full forward within 1e-4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemojax.model.layers import apply_partial_rope, layernorm1p, rope_tables, squared_relu_mlp
from nemojax.model.transformer import DTYPES, NemotronLM

NEG_INF = -1e30


def decode_one_token(model: NemotronLM, tokens: jax.Array, positions: jax.Array, ck: jax.Array,
                     cv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Feed `tokens` [S] at `positions` [S]; returns (fp32 logits [S, V], cache k, cache v).

    ck, cv: [layers, S, window, kv_heads, head_dim]. Row `positions[s]` of slot s is
    overwritten (dropped when >= window) and slot s attends to rows <= positions[s].
    """
    cfg = model.cfg
    cdt = DTYPES[cfg.compute_dtype]
    S, W = tokens.shape[0], ck.shape[2]
    KV, hd = cfg.num_kv_heads, cfg.head_dim
    G = cfg.num_heads // KV
    stacked = model.blocks.arrays()
    x = jnp.take(model.embed[...], tokens, axis=0).astype(cdt)
    cos, sin = rope_tables(positions[:, None], cfg.rotary_dim, cfg.rope_base)
    rows = jnp.arange(S)
    visible = jnp.arange(W)[None, :] <= positions[:, None]  # [S, W]

    def layer(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
        x, ck, cv = carry
        raw = {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in stacked.items()}
        w = {k: v.astype(cdt) for k, v in raw.items()}
        h = layernorm1p(x, raw["attn_norm_scale"], raw["attn_norm_bias"], cfg.norm_eps)
        q = jnp.einsum("sd,dhk->shk", h, w["q"])
        k = jnp.einsum("sd,dhk->shk", h, w["k"])
        v = jnp.einsum("sd,dhk->shk", h, w["v"])
        q = apply_partial_rope(q[:, None], cos, sin)[:, 0]
        k = apply_partial_rope(k[:, None], cos, sin)[:, 0]
        ck = ck.at[i, rows, positions].set(k.astype(ck.dtype), mode="drop")
        cv = cv.at[i, rows, positions].set(v.astype(cv.dtype), mode="drop")
        keys, values = ck[i].astype(cdt), cv[i].astype(cdt)  # [S, W, KV, hd]
        qg = q.reshape(S, 1, KV, G, hd).astype(jnp.float32)
        scores = jnp.sum(qg * keys[:, :, :, None, :].astype(jnp.float32), axis=-1) * hd ** -0.5
        scores = jnp.where(visible[:, :, None, None], scores, NEG_INF)  # [S, W, KV, G]
        probs = jax.nn.softmax(scores, axis=1).astype(cdt)
        attn = jnp.sum(probs[..., None] * values[:, :, :, None, :], axis=1)  # [S, KV, G, hd]
        x = x + jnp.einsum("shk,hkd->sd", attn.reshape(S, KV * G, hd), w["o"])
        h = layernorm1p(x, raw["mlp_norm_scale"], raw["mlp_norm_bias"], cfg.norm_eps)
        x = x + squared_relu_mlp(h[:, None], w["up"], w["down"])[:, 0]
        return x, ck, cv

    x, ck, cv = jax.lax.fori_loop(0, cfg.num_layers, layer, (x, ck, cv))
    x = layernorm1p(x, model.final_norm_scale[...], model.final_norm_bias[...], cfg.norm_eps)
    return model.logits(x[:, None])[:, 0], ck, cv
