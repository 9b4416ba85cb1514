"""The engine's cached forward: C new tokens per row against a per-slot KV cache.

One function serves both of the engine's device programs:
- a *prefill chunk*: B rows of C prompt tokens, each row bound to a slot; the chunk's keys and
  values are written into that slot's cache rows and each token attends to the slot's rows up
  to its own position (earlier chunks, a copied prefix, the chunk itself);
- a *decode step*: every slot feeds one token (C = 1, rows = slots).

`NemotronLM.decode` is the general cached forward (the cache rides through the layer scan).
Here instead the cache is the caller's buffer (a loop carry or a donated argument) and the new
rows are scattered into it in place; a single query attends with a fused multiply-and-reduce
straight from the [slots, window, kv_heads, head_dim] layout (no transpose).

Two weight layouts (`engine_weights`):
- "stacked": the model's own stacked weights, layers walked with a `fori_loop`. No extra
  memory; the right choice on GPU/TPU where slicing a layer out of the stack is cheap.
- "split": per-layer weights, pre-transposed once to [out, in] with the contraction dim minor,
  layers unrolled. On CPU, XLA otherwise re-slices and re-transposes every weight on every step
  (a full copy of the model per token); this costs one extra copy of the weights.

Weights are a plain dict of arrays (no flax module), so the programs built on this are pure
functions that compile once per shape and can be serialized (programs.py). It reuses the
model's building blocks (layernorm1p, partial RoPE); tests/test_engine.py checks both layouts'
logits against the model's full forward.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from nemojax.config import ModelConfig
from nemojax.model import quant
from nemojax.model.layers import apply_partial_rope, layernorm1p, rope_tables
from nemojax.model.transformer import DTYPES, NemotronLM

NEG_INF = -1e30
LAYOUTS = ("stacked", "split")

# einsum specs of the projections on flattened tokens [n, d]; "split" weights are [out..., in]
# so the contracted dim is the minor one.
_SPECS = {
    "stacked": {"qkv": "nd,dhk->nhk", "o": "nhk,hkd->nd", "up": "nd,df->nf", "down": "nf,fd->nd"},
    "split": {"qkv": "nd,hkd->nhk", "o": "nhk,dhk->nd", "up": "nd,fd->nf", "down": "nf,df->nd"},
}
_SPLIT_PERM = {"q": (1, 2, 0), "k": (1, 2, 0), "v": (1, 2, 0), "o": (2, 0, 1), "up": (1, 0), "down": (1, 0)}
# A quantized projection's scale has the weight's rank (nemojax.model.quant): same permutation.
_SPLIT_PERM.update({quant.scale_name(t): perm for t, perm in list(_SPLIT_PERM.items())})
_BASE_BLOCK = ("attn_norm_scale", "attn_norm_bias", "q", "k", "v", "o", "mlp_norm_scale",
               "mlp_norm_bias", "up", "down")


def model_arrays(model: NemotronLM) -> dict[str, Any]:
    """The model's weights as a plain dict: {"embed", "blocks": {name: [layers, ...]},
    "final_norm_scale", "final_norm_bias", "lm_head"}; a quantized model's blocks also hold each
    projection's scale (`{name}_qscale`, model.quant)."""
    if getattr(model.blocks, "lora_enabled", False):
        raise ValueError("the engine serves plain models; merge LoRA adapters first "
                         "(nemojax.load / checkpoint.load_model return merged weights)")
    names = (*_BASE_BLOCK, *getattr(model.blocks, "quant_names", ()))
    return {"embed": model.embed[...], "blocks": {name: getattr(model.blocks, name)[...] for name in names},
            "final_norm_scale": model.final_norm_scale[...], "final_norm_bias": model.final_norm_bias[...],
            "lm_head": model.lm_head[...]}


def layout_weights(cfg: ModelConfig, arrays: dict[str, Any], layout: str, fuse_qkv: bool = False) -> dict[str, Any]:
    """The weights the engine's programs read, from `model_arrays`, as a plain dict.

    "stacked": {"stacked": {name: [layers, ...]}, "embed", "final_norm_*", "lm_head" [D, V]}.
    "split": {"layers": [per-layer dict, [out, in] layout], "embed", "final_norm_*",
    "lm_head" [V, D]}. fuse_qkv (split only): q, k, v concatenated along heads into one
    [H + 2 KV, head_dim, D] matrix (one matmul instead of three; only when heads are not
    sharded, since the concatenation would not split evenly over a tensor-parallel axis).
    Run it under `jax.jit` for sharded models: sharded inputs give sharded outputs.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if any(v.dtype == quant.VALUE_DTYPES["nf4"] for v in arrays["blocks"].values()):
        raise ValueError("the engine serves int8 and fp8 weights, not nf4 (a QLoRA training format); load the "
                         "checkpoint with its adapters merged, optionally quantized to int8 or fp8")
    stacked = arrays["blocks"]
    head = {k: arrays[k] for k in ("embed", "final_norm_scale", "final_norm_bias")}
    if layout == "stacked":
        return {"stacked": dict(stacked), **head, "lm_head": arrays["lm_head"]}
    layers = []
    for i in range(cfg.num_layers):
        layer = {k: (jnp.transpose(v[i], _SPLIT_PERM[k]) if k in _SPLIT_PERM else v[i])
                 for k, v in stacked.items()}
        if fuse_qkv:
            layer["qkv"] = jnp.concatenate([layer.pop("q"), layer.pop("k"), layer.pop("v")], axis=0)
            if quant.scale_name("q") in layer:
                layer[quant.scale_name("qkv")] = jnp.concatenate(
                    [layer.pop(quant.scale_name(t)) for t in ("q", "k", "v")], axis=0)
        layers.append(layer)
    return {"layers": layers, **head, "lm_head": arrays["lm_head"].T}


def engine_weights(model: NemotronLM, layout: str, fuse_qkv: bool = False) -> dict[str, Any]:
    """`layout_weights` of a model."""
    return layout_weights(model.cfg, model_arrays(model), layout, fuse_qkv)


def split_weights(model: NemotronLM, fuse_qkv: bool = False) -> dict[str, Any]:
    """The "split" layout of `engine_weights`."""
    return engine_weights(model, "split", fuse_qkv)


def weights_layout(weights: dict[str, Any]) -> str:
    return "split" if "layers" in weights else "stacked"


def _attend(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array, cdt: Any) -> jax.Array:
    """q [B, C, KV, G, hd] over keys/values [B, W, KV, hd]; visible [B, C, W] -> [B, C, KV, G, hd]."""
    hd = q.shape[-1]
    if q.shape[1] == 1:  # one query per row: multiply-and-reduce, no transpose of the cache
        qg = q[:, 0].astype(jnp.float32)  # [B, KV, G, hd]
        scores = jnp.sum(qg[:, None] * keys[:, :, :, None, :].astype(jnp.float32), axis=-1) * hd ** -0.5
        scores = jnp.where(visible[:, 0, :, None, None], scores, NEG_INF)  # [B, W, KV, G]
        probs = jax.nn.softmax(scores, axis=1).astype(cdt)
        return jnp.sum(probs[..., None] * values[:, :, :, None, :], axis=1)[:, None]
    scores = jnp.einsum("bckgh,bwkh->bckgw", q.astype(jnp.float32), keys.astype(jnp.float32)) * hd ** -0.5
    scores = jnp.where(visible[:, :, None, None, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(cdt)
    return jnp.einsum("bckgw,bwkh->bckgh", probs, values)


def _layer(cfg: ModelConfig, spec: dict[str, str], raw: dict[str, jax.Array], i: Any, x: jax.Array,
           ck: jax.Array, cv: jax.Array, *, cos: jax.Array, sin: jax.Array, slots: jax.Array | None,
           write_pos: jax.Array, visible: jax.Array, window: int,
           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    cdt = DTYPES[cfg.compute_dtype]
    B, C, D = x.shape
    KV, hd = cfg.num_kv_heads, cfg.head_dim
    H = cfg.num_heads
    w = quant.compute_weights(raw, cdt)  # quantized projections stay QArrays (model.quant)
    h = layernorm1p(x, raw["attn_norm_scale"], raw["attn_norm_bias"], cfg.norm_eps).reshape(B * C, D)
    if "qkv" in w:  # fused (split layout, unsharded heads)
        qkv = quant.einsum(spec["qkv"], h, w["qkv"])
        q, k, v = qkv[:, :H], qkv[:, H:H + KV], qkv[:, H + KV:]
    else:
        q = quant.einsum(spec["qkv"], h, w["q"])
        k = quant.einsum(spec["qkv"], h, w["k"])
        v = quant.einsum(spec["qkv"], h, w["v"])
    q = apply_partial_rope(q.reshape(B, C, H, hd), cos, sin)
    k = apply_partial_rope(k.reshape(B, C, KV, hd), cos, sin)
    v = v.reshape(B, C, KV, hd)
    rows = (jnp.arange(B) if slots is None else slots)[:, None]
    ck = ck.at[i, rows, write_pos].set(k.astype(ck.dtype), mode="drop")
    cv = cv.at[i, rows, write_pos].set(v.astype(cv.dtype), mode="drop")
    if slots is None:  # rows are the slots: read the (already windowed) cache as is
        keys, values = ck[i], cv[i]
    else:
        keys, values = ck[i][slots, :window], cv[i][slots, :window]
    attn = _attend(q.reshape(B, C, KV, H // KV, hd), keys.astype(cdt), values.astype(cdt), visible, cdt)
    x = x + quant.einsum(spec["o"], attn.reshape(B * C, H, hd), w["o"]).reshape(B, C, D)
    h = layernorm1p(x, raw["mlp_norm_scale"], raw["mlp_norm_bias"], cfg.norm_eps).reshape(B * C, D)
    up = jnp.square(jax.nn.relu(quant.einsum(spec["up"], h, w["up"])))
    return x + quant.einsum(spec["down"], up, w["down"]).reshape(B, C, D), ck, cv


def cached_forward(cfg: ModelConfig, weights: dict[str, Any], tokens: jax.Array, positions: jax.Array,
                   ck: jax.Array, cv: jax.Array, *, slots: jax.Array | None = None,
                   write_pos: jax.Array | None = None, window: int | None = None,
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Feed `tokens` [B, C] at `positions` [B, C]; returns (final-normed hidden [B, C, D], ck, cv).

    ck, cv: [layers, slots, rows, kv_heads, head_dim]. Each token's key/value is written at
    cache row `write_pos` (default: its position; rows >= the cache length are dropped, which
    is how callers skip padding) of slot `slots[b]` (default: row b is slot b), and the token
    attends to that slot's rows [0, position] within the first `window` rows (default: all).
    """
    cdt = DTYPES[cfg.compute_dtype]
    window = window or ck.shape[2]
    write_pos = positions if write_pos is None else write_pos
    cos, sin = rope_tables(positions, cfg.rotary_dim, cfg.rope_base)
    visible = jnp.arange(window)[None, None, :] <= positions[:, :, None]  # [B, C, W]
    kw = dict(cos=cos, sin=sin, slots=slots, write_pos=write_pos, visible=visible, window=window)
    layout = weights_layout(weights)
    x = jnp.take(weights["embed"], tokens, axis=0).astype(cdt)
    if layout == "stacked":
        stacked = weights["stacked"]

        def body(i: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, ...]:
            raw = {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in stacked.items()}
            return _layer(cfg, _SPECS["stacked"], raw, i, *carry, **kw)

        x, ck, cv = jax.lax.fori_loop(0, cfg.num_layers, body, (x, ck, cv))
    else:
        for i, raw in enumerate(weights["layers"]):
            x, ck, cv = _layer(cfg, _SPECS["split"], raw, i, x, ck, cv, **kw)
    x = layernorm1p(x, weights["final_norm_scale"], weights["final_norm_bias"], cfg.norm_eps)
    return x, ck, cv


def lm_logits(weights: dict[str, Any], h: jax.Array) -> jax.Array:
    """fp32 logits [..., V] from final hidden states [..., D]."""
    head = weights["lm_head"].astype(h.dtype)
    spec = "...d,vd->...v" if weights_layout(weights) == "split" else "...d,dv->...v"
    return jnp.einsum(spec, h, head, preferred_element_type=jnp.float32)


def decode_one_token(cfg: ModelConfig, weights: dict[str, Any], tokens: jax.Array, positions: jax.Array,
                     ck: jax.Array, cv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per slot: `tokens` [S] at `positions` [S] -> (fp32 logits [S, V], ck, cv).

    ck, cv: [layers, S, window, kv_heads, head_dim]; row `positions[s]` of slot s is written
    (dropped when >= window) and slot s attends to its rows <= positions[s].
    """
    h, ck, cv = cached_forward(cfg, weights, tokens[:, None], positions[:, None], ck, cv)
    return lm_logits(weights, h[:, 0]), ck, cv
