"""LoRA: low-rank adapters on the decoder's projections (model.lora in the config).

A targeted weight W ([in dims..., out dims...], one per layer) is used as

    W + (alpha / rank) * A @ B      A: [in dims..., rank] ~ normal(init_std),  B: [rank, out dims...] = 0

so a fresh adapter leaves the model unchanged. Targets are the attention projections q, k, v,
o and the MLP's up, down. The adapters are stacked along the same leading `layers` axis as
the weights and live next to them in `Blocks` (`blocks.q_lora_a`, `blocks.q_lora_b`, ...), so
every path that hands a layer's slice of `Blocks.arrays()` to `transformer.block` (the scan,
the pipeline) applies them: `block` merges its own layer's adapters first (`merge_adapters`),
which keeps the extra memory to one layer's weights at a time.

Adapters are `LoraParam`s, a subclass of `nnx.Param` with logical axes (the rank axis is
`lora_rank`, replicated; the other axes shard like the weight's), so

* `nnx.state(model, nnx.Param)` still holds every parameter (checkpoints, sharding rules);
* `trainable_filter(cfg)` (= `LoraParam` when LoRA is on) selects only the adapters: the
  train step differentiates and keeps optimizer state for those alone;
* `adapters_disabled(model)` / `set_adapters_enabled` give the base model (the preference
  stages' reference), and `merge_lora(model)` folds the adapters into the weights, giving a
  plain `NemotronLM` (what `nemojax.load` returns by default and `convert to-hf` writes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nemojax.config import LORA_TARGETS, LoraConfig, ModelConfig, QuantConfig
from nemojax.model import quant

RANK_AXIS = "lora_rank"
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
_ADAPTER_STREAM = 0x10A  # fold-in constant of the adapters' init key


class LoraParam(nnx.Param):
    """A low-rank adapter weight (trainable when LoRA is on; base weights stay frozen)."""


def _weight_layout(cfg: ModelConfig, target: str) -> tuple[tuple[int, ...], tuple[str, ...], int]:
    """(per-layer weight shape, its logical axes without `layers`, number of input dims)."""
    D, H, KV, hd, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_hidden_size
    return {
        "q": ((D, H, hd), ("embed", "heads", "head_dim"), 1),
        "k": ((D, KV, hd), ("embed", "kv_heads", "head_dim"), 1),
        "v": ((D, KV, hd), ("embed", "kv_heads", "head_dim"), 1),
        "o": ((H, hd, D), ("heads", "head_dim", "embed"), 2),
        "up": ((D, F), ("embed", "mlp"), 1),
        "down": ((F, D), ("mlp", "embed"), 1),
    }[target]


def adapter_params(cfg: ModelConfig, rngs: nnx.Rngs, dtype: Any) -> dict[str, LoraParam]:
    """The stacked adapters `{target}_lora_a` / `{target}_lora_b` for `cfg.lora` (empty if rank 0)."""
    lc = cfg.lora
    out: dict[str, LoraParam] = {}
    if not lc.rank:
        return out
    L, r = cfg.num_layers, lc.rank
    # A key of their own (folded from the stream's seed, without drawing from it), so adding
    # adapters leaves the base weights' initialisation exactly as without them.
    key = jax.random.fold_in(rngs.params.key[...], _ADAPTER_STREAM)
    for t in lc.targets:
        shape, axes, n_in = _weight_layout(cfg, t)
        a_shape = (L, *shape[:n_in], r)
        a = lc.init_std * jax.random.normal(jax.random.fold_in(key, LORA_TARGETS.index(t)), a_shape, jnp.float32)
        a = a.astype(dtype)
        out[t + SUFFIX_A] = LoraParam(a, logical_axes=("layers", *axes[:n_in], RANK_AXIS))
        out[t + SUFFIX_B] = LoraParam(jnp.zeros((L, r, *shape[n_in:]), dtype),
                                      logical_axes=("layers", RANK_AXIS, *axes[n_in:]))
    return out


def lora_delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """scale * A @ B in fp32, contracting the rank axis: [in..., r] x [r, out...] -> [in..., out...]."""
    return scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def merge_adapters(cfg: ModelConfig, p: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """One layer's params with its adapters folded in (a no-op without adapter entries).

    Called by `transformer.block` on its own layer's slice; merged weights are fp32 (block casts
    them to the compute dtype), so a bf16 weight does not swallow a small update.
    """
    if not any(k.endswith(SUFFIX_A) for k in p):
        return p
    out = {k: v for k, v in p.items() if not (k.endswith(SUFFIX_A) or k.endswith(SUFFIX_B))}
    for k, a in p.items():
        if k.endswith(SUFFIX_A):
            t = k[:-len(SUFFIX_A)]
            out[t] = _base_fp32(out, t) + lora_delta(a, p[t + SUFFIX_B], cfg.lora.scale)
    return out


def _base_fp32(p: dict[str, jax.Array], target: str) -> jax.Array:
    """A layer's base weight in fp32; a quantized base (QLoRA) is dequantized and its scale dropped
    from `p` (the merged weight is a plain array)."""
    scale = p.pop(quant.scale_name(target), None)
    if scale is None:
        return p[target].astype(jnp.float32)
    return quant.dequantize(quant.QArray(p[target], scale))


def trainable_filter(cfg: ModelConfig) -> Any:
    """The nnx filter of the parameters a post-training stage trains: adapters with LoRA, else all."""
    return LoraParam if cfg.lora.rank else nnx.Param


def has_adapters(model: nnx.Module) -> bool:
    return bool(nnx.state(model, LoraParam))


def set_adapters_enabled(model: nnx.Module, enabled: bool) -> None:
    """Turn the adapters on or off (off = the base model). A static setting: a new graphdef."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(blocks, "lora_enabled"):
        raise ValueError("the model has no LoRA adapters (model.lora.rank is 0)")
    blocks.lora_enabled = bool(enabled)


@contextlib.contextmanager
def adapters_disabled(model: nnx.Module) -> Iterator[nnx.Module]:
    """`with adapters_disabled(model): ...` runs the base model (e.g. for reference log-probs)."""
    before = model.blocks.lora_enabled
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        set_adapters_enabled(model, before)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A model of the same class without adapters whose weights are W + (alpha/rank) A @ B.

    The result's config has `lora.rank = 0`; a model without adapters is returned unchanged.
    Weights keep their dtype (the merge is computed in fp32 and cast once). A quantized base
    (QLoRA, model.quant) gives a plain model: every projection dequantized to `param_dtype`
    (quantize it again to serve it quantized).
    """
    cfg: ModelConfig = model.cfg
    if not cfg.lora.rank:
        return model
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    blocks = params["blocks"]
    if cfg.quant.enabled:
        from nemojax.model.transformer import DTYPES

        blocks = quant.dequantize_blocks(blocks, DTYPES[cfg.param_dtype])
        cfg = dataclasses.replace(cfg, quant=QuantConfig())
    merged_blocks = {k: v for k, v in blocks.items() if not (k.endswith(SUFFIX_A) or k.endswith(SUFFIX_B))}
    if model.blocks.lora_enabled:
        for t in cfg.lora.targets:
            w = blocks[t]
            delta = jax.vmap(lambda a, b: lora_delta(a, b, cfg.lora.scale))(blocks[t + SUFFIX_A],
                                                                              blocks[t + SUFFIX_B])
            merged_blocks[t] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    base_cfg = without_lora(cfg)
    abstract = nnx.eval_shape(lambda: type(model)(base_cfg, rngs=nnx.Rngs(params=0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, {**params, "blocks": merged_blocks})
    return nnx.merge(graphdef, state)


def without_lora(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with adapters off (rank 0): the base model's config."""
    return dataclasses.replace(cfg, lora=LoraConfig(rank=0, alpha=cfg.lora.alpha, targets=list(cfg.lora.targets),
                                                    init_std=cfg.lora.init_std))


def parameter_counts(model_or_state: Any) -> dict[str, int]:
    """{"total": every parameter, "adapters": LoRA adapters only, "base": the rest}."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    total = adapters = 0
    for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        n = math.prod(v.get_value().shape)
        total += n
        if isinstance(v, LoraParam):
            adapters += n
    return {"total": total, "adapters": adapters, "base": total - adapters}
