"""Per-device bytes of serving a model: its weights in each storage format and the engine's KV cache.

Computed from the abstract model of the config (the same parameters, logical axes and `sharding:`
rules a real run shards with) over an abstract mesh, so it needs no devices: `nemojax info
--serve N` prints it for the 340B preset on 8 GPUs before any exist.

Weights per mode: `bf16` / `fp32` stores every parameter in that dtype; `fp8` / `int8` stores the
block projections as one byte per element plus fp32 scales (nemojax.model.quant; one scale per
output channel unless a block size is given) and keeps embeddings, LM head and norms in bf16, as
the engine holds them after `--quantize`. The KV cache is the engine's: keys and values of every
layer for `batch` slots x `context` rows in the compute dtype, sharded over the mesh axes of
`kv_heads` (nemojax.inference.engine), plus its prefix-cache pool (default 2 x context tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
from jax.sharding import AbstractMesh

from nemojax.config import LoraConfig, ModelConfig, QuantConfig
from nemojax.model.axes import logical_to_spec, mesh_shape
from nemojax.parallel.memory import shard_bytes
from nemojax.parallel.rules import check_divisible
from nemojax.parallel.state_sharding import model_logical_axes

# mode -> (param_dtype, quant mode)
WEIGHT_MODES: dict[str, tuple[str, str]] = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"),
                                            "fp8": ("bfloat16", "fp8"), "int8": ("bfloat16", "int8")}


def serving_config(cfg: ModelConfig, mode: str, block_size: int = 0) -> ModelConfig:
    """`cfg` as the engine holds it in `mode` (no adapters: they are merged before serving)."""
    dtype, quant = WEIGHT_MODES[mode]
    return dataclasses.replace(cfg, param_dtype=dtype, compute_dtype=dtype, lora=LoraConfig(),
                               quant=QuantConfig(mode=quant, block_size=block_size if quant != "none" else 0))


def _group(keys: tuple[str, ...]) -> str:
    from nemojax.model.quant import SCALE_SUFFIX

    if keys[0] == "blocks":
        return "scales" if keys[-1].endswith(SCALE_SUFFIX) else "blocks"
    return {"embed": "embed", "lm_head": "lm_head"}.get(keys[0], "other")


def weight_bytes(cfg: ModelConfig, mode: str, mesh: AbstractMesh, rules: Mapping[str, Any],
                 block_size: int = 0) -> dict[str, int]:
    """Bytes of the largest shard per device of each weight group: blocks (projections and norms),
    scales, embed, lm_head, other (final norm, reward head), total."""
    from flax import nnx

    from nemojax.model.reward import make_abstract_model

    scfg = serving_config(cfg, mode, block_size)
    model = make_abstract_model(scfg)
    check_divisible(nnx.state(model, nnx.Param), model_logical_axes(model), rules, mesh, scfg)
    sizes = mesh_shape(mesh)
    state = nnx.state(model, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
    out = {"blocks": 0, "scales": 0, "embed": 0, "lm_head": 0, "other": 0}
    for path, var in flat:
        keys = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
        value = var.get_value()
        spec = logical_to_spec(var.get_metadata()["logical_axes"], rules, mesh)
        out[_group(keys)] += shard_bytes(tuple(value.shape), value.dtype, spec, sizes)
    out["total"] = sum(out.values())
    return out


def kv_cache_bytes(cfg: ModelConfig, batch: int, context: int, mesh: AbstractMesh, rules: Mapping[str, Any],
                   dtype: str = "bfloat16") -> int:
    """Per-device bytes of the engine's keys + values for `batch` slots of `context` rows."""
    import jax.numpy as jnp

    spec = logical_to_spec((None, None, None, "kv_heads", None), rules, mesh)
    shape = (cfg.num_layers, batch, context, cfg.num_kv_heads, cfg.head_dim)
    return 2 * shard_bytes(shape, jnp.dtype(dtype), spec, mesh_shape(mesh))


def serving_footprint(cfg: ModelConfig, mesh: AbstractMesh, rules: Mapping[str, Any], *, batch: int, context: int,
                      modes: tuple[str, ...] = ("bf16", "fp8", "int8"), block_size: int = 0,
                      prefix_pool_tokens: int | None = None, hbm_gb: float | None = None) -> dict[str, Any]:
    """{mode: per-device weights, KV cache, prefix pool, total (bytes and GB), fits} for a batch of
    `batch` slots of `context` tokens; hbm_gb: the device memory the total is checked against."""
    pool = 2 * context if prefix_pool_tokens is None else prefix_pool_tokens
    out: dict[str, Any] = {"mesh": mesh_shape(mesh), "batch": batch, "context": context,
                           "prefix_pool_tokens": pool, "hbm_gb": hbm_gb, "modes": {}}
    for mode in modes:
        w = weight_bytes(cfg, mode, mesh, rules, block_size)
        kv_dtype = WEIGHT_MODES[mode][0]
        kv = kv_cache_bytes(cfg, batch, context, mesh, rules, kv_dtype)
        pool_bytes = kv_cache_bytes(cfg, 1, pool, mesh, rules, kv_dtype)
        total = w["total"] + kv + pool_bytes
        row = {"weights": w, "kv_cache": kv, "prefix_pool": pool_bytes, "total": total,
               "gb": {"weights": round(w["total"] / 1e9, 2), "kv_cache": round(kv / 1e9, 2),
                      "prefix_pool": round(pool_bytes / 1e9, 2), "total": round(total / 1e9, 2)}}
        if hbm_gb:
            row["fits"] = total <= hbm_gb * 1e9
            per_token = kv_cache_bytes(cfg, 1, 1, mesh, rules, kv_dtype)
            row["kv_tokens_that_fit"] = max(0, int((hbm_gb * 1e9 - w["total"] - pool_bytes) // per_token))
        out["modes"][mode] = row
    return out


def weights_by_mode(cfg: Any, devices: int, modes: tuple[str, ...] = ("bf16", "fp8", "int8")) -> dict[str, Any]:
    """Per-device weight bytes of the run config `cfg` (its mesh and sharding rules over `devices`
    devices) for each storage mode: what `nemojax info --mesh-devices N` adds."""
    from nemojax.parallel.mesh import make_abstract_mesh
    from nemojax.parallel.rules import resolve_rules

    mesh = make_abstract_mesh(cfg.mesh, devices)
    rules = resolve_rules(cfg.sharding)
    out = {}
    for mode in modes:
        w = weight_bytes(cfg.model, mode, mesh, rules, cfg.model.quant.block_size)
        out[mode] = {"bytes": w["total"], "gib": round(w["total"] / 2**30, 3)}
    return {"mesh": mesh_shape(mesh), "per_device": out}


def tensor_parallel_footprint(cfg: Any, tensor: int, *, batch: int, context: int, hbm_gb: float | None,
                              modes: tuple[str, ...] = ("bf16", "fp8", "int8")) -> dict[str, Any]:
    """`serving_footprint` for the engine sharded `tensor` ways (mesh.tensor = N, nothing else):
    what `nemojax info --serve N` prints."""
    from nemojax.config import MeshConfig
    from nemojax.parallel.mesh import make_abstract_mesh
    from nemojax.parallel.rules import resolve_rules

    mesh = make_abstract_mesh(MeshConfig(data=1, fsdp=1, pipeline=1, tensor=tensor), tensor)
    return serving_footprint(cfg.model, mesh, resolve_rules(cfg.sharding), batch=batch, context=context,
                             modes=modes, block_size=cfg.model.quant.block_size, hbm_gb=hbm_gb)
