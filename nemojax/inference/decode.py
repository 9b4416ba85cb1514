"""The engine's one-token-per-slot decode step, specialised for generation.

`NemotronLM.decode` is the general cached forward (any number of new tokens, layers scanned
with the cache as scan input/output). For generation, where each slot adds exactly one token
per step, that path copies the whole cache through the layer scan on every step and runs
attention as a batched matmul that needs the cache transposed. This step instead:

- keeps the cache as a loop carry and writes the new key/value rows in place (a scatter on a
  donated buffer, no per-step cache copy);
- computes single-query attention as a fused multiply-and-reduce straight from the
  [slots, window, kv_heads, head_dim] layout (no transpose, the cache is read once).

Two weight layouts:
- "stacked": the model's own stacked weights, layers walked with a `fori_loop`. No extra
  memory; the right choice on GPU/TPU where slicing a layer out of the stack is cheap.
- "split": per-layer weights, pre-transposed once to [out, in] with the contraction dim
  minor, layers unrolled. On CPU, XLA otherwise re-slices and re-transposes every weight on
  every step (a full copy of the model per token); this costs one extra copy of the weights.

It reuses the model's building blocks (layernorm1p, partial RoPE) and tests/test_engine.py
checks both layouts' logits against the model's full forward within 1e-4.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.model.layers import apply_partial_rope, layernorm1p, rope_tables
from nemojax.model.transformer import DTYPES, NemotronLM

NEG_INF = -1e30
LAYOUTS = ("stacked", "split")

# einsum specs of the four projections per layout (s = slot, d = embed, h = heads, k = head_dim,
# f = mlp); "split" weights are [out..., in] so the contracted dim is the minor one.
_SPECS = {
    "stacked": {"qkv": "sd,dhk->shk", "o": "shk,hkd->sd", "up": "sd,df->sf", "down": "sf,fd->sd"},
    "split": {"qkv": "sd,hkd->shk", "o": "shk,dhk->sd", "up": "sd,fd->sf", "down": "sf,df->sd"},
}
_SPLIT_PERM = {"q": (1, 2, 0), "k": (1, 2, 0), "v": (1, 2, 0), "o": (2, 0, 1), "up": (1, 0), "down": (1, 0)}


def split_weights(model: NemotronLM, fuse_qkv: bool = False) -> dict[str, Any]:
    """The "split" layout: {"layers": [per-layer dict], "embed", "final_norm_*", "lm_head" [V, D]}.

    fuse_qkv: concatenate q, k, v along heads into one [H + 2 KV, head_dim, D] matrix (one
    matmul instead of three; only when heads are not sharded, since the concatenation would
    not split evenly over a tensor-parallel axis). Run it under `jax.jit`: sharded inputs give
    sharded outputs (GSPMD follows the transposes).
    """
    stacked = model.blocks.arrays()
    layers = []
    for i in range(model.cfg.num_layers):
        layer = {k: (jnp.transpose(v[i], _SPLIT_PERM[k]) if k in _SPLIT_PERM else v[i])
                 for k, v in stacked.items()}
        if fuse_qkv:
            layer["qkv"] = jnp.concatenate([layer.pop("q"), layer.pop("k"), layer.pop("v")], axis=0)
        layers.append(layer)
    return {"layers": layers, "embed": model.embed[...], "final_norm_scale": model.final_norm_scale[...],
            "final_norm_bias": model.final_norm_bias[...], "lm_head": model.lm_head[...].T}


def _layer(cfg: ModelConfig, spec: dict[str, str], raw: dict[str, jax.Array], i: Any, x: jax.Array,
           ck: jax.Array, cv: jax.Array, *, cos: jax.Array, sin: jax.Array, positions: jax.Array,
           visible: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    cdt = DTYPES[cfg.compute_dtype]
    S, KV, hd = x.shape[0], cfg.num_kv_heads, cfg.head_dim
    G = cfg.num_heads // KV
    w = {k: v.astype(cdt) for k, v in raw.items()}
    h = layernorm1p(x, raw["attn_norm_scale"], raw["attn_norm_bias"], cfg.norm_eps)
    if "qkv" in w:  # fused (split layout, unsharded heads)
        qkv = jnp.einsum(spec["qkv"], h, w["qkv"])
        H = cfg.num_heads
        q, k, v = qkv[:, :H], qkv[:, H:H + KV], qkv[:, H + KV:]
    else:
        q = jnp.einsum(spec["qkv"], h, w["q"])
        k = jnp.einsum(spec["qkv"], h, w["k"])
        v = jnp.einsum(spec["qkv"], h, w["v"])
    q = apply_partial_rope(q[:, None], cos, sin)[:, 0]
    k = apply_partial_rope(k[:, None], cos, sin)[:, 0]
    rows = jnp.arange(S)
    ck = ck.at[i, rows, positions].set(k.astype(ck.dtype), mode="drop")
    cv = cv.at[i, rows, positions].set(v.astype(cv.dtype), mode="drop")
    keys, values = ck[i].astype(cdt), cv[i].astype(cdt)  # [S, W, KV, hd]
    qg = q.reshape(S, 1, KV, G, hd).astype(jnp.float32)
    scores = jnp.sum(qg * keys[:, :, :, None, :].astype(jnp.float32), axis=-1) * hd ** -0.5
    scores = jnp.where(visible[:, :, None, None], scores, NEG_INF)  # [S, W, KV, G]
    probs = jax.nn.softmax(scores, axis=1).astype(cdt)
    attn = jnp.sum(probs[..., None] * values[:, :, :, None, :], axis=1)  # [S, KV, G, hd]
    x = x + jnp.einsum(spec["o"], attn.reshape(S, KV * G, hd), w["o"])
    h = layernorm1p(x, raw["mlp_norm_scale"], raw["mlp_norm_bias"], cfg.norm_eps)
    up = jnp.square(jax.nn.relu(jnp.einsum(spec["up"], h, w["up"])))
    return x + jnp.einsum(spec["down"], up, w["down"]), ck, cv


def decode_one_token(model: NemotronLM, tokens: jax.Array, positions: jax.Array, ck: jax.Array,
                     cv: jax.Array, weights: dict[str, Any] | None = None,
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Feed `tokens` [S] at `positions` [S]; returns (fp32 logits [S, V], cache k, cache v).

    ck, cv: [layers, S, window, kv_heads, head_dim]. Row `positions[s]` of slot s is
    overwritten (dropped when >= window) and slot s attends to rows <= positions[s].
    weights: `split_weights(model)` for the "split" layout; None uses the model's stacked ones.
    """
    cfg = model.cfg
    cdt = DTYPES[cfg.compute_dtype]
    W = ck.shape[2]
    cos, sin = rope_tables(positions[:, None], cfg.rotary_dim, cfg.rope_base)
    visible = jnp.arange(W)[None, :] <= positions[:, None]  # [S, W]
    kw = dict(cos=cos, sin=sin, positions=positions, visible=visible)
    if weights is None:
        stacked = model.blocks.arrays()
        x = jnp.take(model.embed[...], tokens, axis=0).astype(cdt)

        def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
            raw = {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in stacked.items()}
            return _layer(cfg, _SPECS["stacked"], raw, i, *carry, **kw)

        x, ck, cv = jax.lax.fori_loop(0, cfg.num_layers, body, (x, ck, cv))
        x = layernorm1p(x, model.final_norm_scale[...], model.final_norm_bias[...], cfg.norm_eps)
        return model.logits(x[:, None])[:, 0], ck, cv
    x = jnp.take(weights["embed"], tokens, axis=0).astype(cdt)
    for i, raw in enumerate(weights["layers"]):
        x, ck, cv = _layer(cfg, _SPECS["split"], raw, i, x, ck, cv, **kw)
    x = layernorm1p(x, weights["final_norm_scale"], weights["final_norm_bias"], cfg.norm_eps)
    return jnp.einsum("sd,vd->sv", x, weights["lm_head"].astype(x.dtype),
                      preferred_element_type=jnp.float32), ck, cv
