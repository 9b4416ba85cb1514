"""Compile the engine's decode program ahead of time for a device topology, without weights.

The program is exactly what `Engine` runs on an accelerator (`programs.decode` through the
engine's entry point, the "stacked" weight layout, the cache sharded over the mesh axes of
`kv_heads`), lowered for ShapeDtypeStructs carrying the shardings a tensor-parallel engine's
weights have (the `sharding:` rules over a mesh of `tensor` devices), so a 340B decode step with
FP8 weights compiles for an 8-chip TPU slice from a CPU host (libtpu's compile-only devices,
nemojax.parallel.aot) and reports the compiler's per-device memory: weights, KV cache and the
temporaries of one decode call. `nemojax compile CONFIG --topology T --decode BATCHxCONTEXT`.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from nemojax.config import Config, MeshConfig


def parse_decode_shape(text: str) -> tuple[int, int]:
    """'32x4096' -> (32, 4096); ConfigError naming the expected form otherwise."""
    from nemojax.config import ConfigError

    batch, sep, context = text.lower().partition("x")
    if not (sep and batch.isdigit() and context.isdigit() and int(batch) > 0 and int(context) > 1):
        raise ConfigError(f"--decode {text!r}: give BATCHxCONTEXT with positive integers, e.g. 32x4096")
    return int(batch), int(context)


def _abstract_weights(model_cfg: Any, mesh: Any, rules: Any) -> dict[str, Any]:
    """The engine's "stacked" weights of `model_cfg` as sharded ShapeDtypeStructs."""
    from nemojax.inference.forward import layout_weights
    from nemojax.model.axes import logical_to_spec
    from nemojax.model.transformer import abstract_model

    model = abstract_model(model_cfg)

    def sds(var: Any) -> jax.ShapeDtypeStruct:
        value = var.get_value()
        spec = logical_to_spec(var.get_metadata()["logical_axes"], rules, mesh)
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec))

    blocks = model.blocks
    names = ("attn_norm_scale", "attn_norm_bias", "q", "k", "v", "o", "mlp_norm_scale", "mlp_norm_bias", "up",
             "down", *getattr(blocks, "quant_names", ()))
    arrays = {"embed": sds(model.embed),
              "blocks": {n: sds(getattr(blocks, n)) for n in names},
              "final_norm_scale": sds(model.final_norm_scale), "final_norm_bias": sds(model.final_norm_bias),
              "lm_head": sds(model.lm_head)}
    return layout_weights(model_cfg, arrays, "stacked")


def compile_decode(cfg: Config, topology: str, *, batch: int, context: int, tensor: int | None = None,
                   quantize: str | None = None, block_size: int = 0, steps: int = 8, num_slices: int = 1,
                   ) -> dict[str, Any]:
    """Lower and compile one decode call (`steps` greedy tokens for `batch` slots over a window of
    `context` rows) of `cfg.model` for `topology`, tensor parallel over `tensor` devices (default:
    all of the topology's); quantize: "fp8" / "int8" weights (bf16 elsewhere) or None (param_dtype)."""
    from nemojax.inference.engine import _decode_entry, empty_slots
    from nemojax.model.axes import logical_to_spec
    from nemojax.parallel.aot import compile_report, topology_devices
    from nemojax.parallel.mesh import make_mesh, mesh_shape
    from nemojax.parallel.rules import resolve_rules
    from nemojax.parallel.serving_memory import serving_config

    devices, target = topology_devices(topology, num_slices)
    tensor = tensor or len(devices)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, pipeline=1, tensor=tensor), devices[:tensor])
    rules = resolve_rules(cfg.sharding)
    mode = quantize or ("bf16" if cfg.model.param_dtype == "bfloat16" else "fp32")
    mcfg = serving_config(cfg.model, mode, block_size)
    t0 = time.perf_counter()
    weights = _abstract_weights(mcfg, mesh, rules)
    kv_sharding = NamedSharding(mesh, logical_to_spec((None, None, None, "kv_heads", None), rules, mesh))
    cdt = jnp.bfloat16 if mcfg.compute_dtype == "bfloat16" else jnp.float32
    shape = (mcfg.num_layers, batch, context, mcfg.num_kv_heads, mcfg.head_dim)
    pool = (mcfg.num_layers, 1, 16, mcfg.num_kv_heads, mcfg.head_dim)
    cache = {"k": jax.ShapeDtypeStruct(shape, cdt, sharding=kv_sharding),
             "v": jax.ShapeDtypeStruct(shape, cdt, sharding=kv_sharding),
             "pool_k": jax.ShapeDtypeStruct(pool, cdt, sharding=kv_sharding),
             "pool_v": jax.ShapeDtypeStruct(pool, cdt, sharding=kv_sharding)}
    replicated = NamedSharding(mesh, PartitionSpec())
    slot = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in empty_slots(batch).items()}

    def constrain(x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, kv_sharding)

    fn = partial(_decode_entry, mcfg, constrain, steps, context, False, False)
    lowered = jax.jit(fn, donate_argnums=(1,)).lower(weights, cache, slot)
    t1 = time.perf_counter()
    report = compile_report(lowered, target.get("hbm_gib"))
    return {"target": target, "mesh": mesh_shape(mesh), "program": "decode", "weights": mode,
            "batch": batch, "context": context, "steps": steps, "lower_seconds": round(t1 - t0, 1), **report}
