#!/usr/bin/env python
"""One accelerator check, one JSON: `python benchmarks/gpu_check.py [--tiny] [options]`.

Made to be run the first time a GPU is at hand (single H100: about 5 minutes, bounded by
--budget-s, default 450 s), and on the CPU with `--tiny` by the test suite so it is known to
work before then. Three parts, on the first device:

1. **Attention check.** Each candidate attention backend against `xla` on one packed bf16 batch
   (forward and gradients): the cuDNN packed path has never run on a GPU before this.
2. **Training MFU.** The config's (default: the 1B preset's) training step, built by the
   trainer's own `build_training`, on random tokens packed into documents of 256-2048 tokens
   (segment ids and position resets, as the data pipeline makes them). Every candidate backend
   is timed; the fastest is reported. A candidate that runs out of memory with the config's
   remat policy is retried once with `remat_policy=full`. MFU is printed with both counts of
   attention FLOPs: MaxText's (causal: half the score matrix) and Megatron's (the full
   seq x seq matrix, nemojax.model.flops). Peaks: nemojax.train.metrics.PEAK_FLOPS.
3. **Decode.** The engine's one-token decode step (nemojax.inference.forward.decode_one_token,
   the stacked weight layout) in a device loop, per batch size, against the bound set by
   HBM bandwidth: every weight (embedding rows aside) and the cache window's keys/values are
   read once per step, so tokens/s <= batch x bandwidth / bytes per step. Bandwidth from
   HBM_BYTES_PER_S by device kind, or --hbm-tbps.

--quantize selects the decode weights' format; only `none` (the compute dtype) exists yet. The
quantization work adds its modes to QUANT_MODES and their transform to `decode_weights`; the
byte count and the bound follow from the arrays it returns.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# HBM bandwidth per device (bytes/s), matched as a case-insensitive substring of device_kind,
# most specific first. Public spec sheets.
HBM_BYTES_PER_S: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 2.0e12),
    ("h100 nvl", 3.9e12),
    ("gh200", 4.0e12),
    ("h200", 4.8e12),
    ("h100", 3.35e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("b200", 8.0e12),
    ("a100-sxm4-80gb", 2.039e12),
    ("a100 80gb pcie", 1.935e12),
    ("a100", 1.555e12),  # 40 GB
    ("l4", 0.3e12),
    ("v6 lite", 1.64e12),
    ("v5 lite", 0.819e12),
    ("v5p", 2.765e12),
    ("tpu v5", 2.765e12),
    ("tpu v4", 1.2e12),
)
QUANT_MODES = ("none",)  # decode weight formats; see `decode_weights`
CANDIDATES = {"cuda": ("cudnn", "xla"), "tpu": ("splash", "xla"), "rocm": ("xla", "dot_product"),
              "cpu": ("xla", "dot_product")}
TINY_MODEL = ["model.vocab_size=256", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
              "model.num_kv_heads=2", "model.head_dim=16", "model.ffn_hidden_size=128", "model.max_seq_len=64"]


def hbm_bandwidth(kind: str, override_tbps: float) -> float | None:
    """Bytes/s of one device's HBM: the override, else the table, else None (unknown)."""
    if override_tbps > 0:
        return override_tbps * 1e12
    kind = kind.lower()
    return next((bw for key, bw in HBM_BYTES_PER_S if key in kind), None)


def decode_weights(weights: dict[str, Any], mode: str) -> dict[str, Any]:
    """The decode weights in format `mode` (the quantization hook: only "none" exists)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"--quantize {mode!r} is not available; modes: {QUANT_MODES}")
    return weights


def packed_rows(rng: Any, rows: int, seq: int, vocab: int, doc_range: tuple[int, int]) -> dict[str, Any]:
    """Random tokens in documents of random length (uniform in doc_range), packed end to end:
    segment ids 1, 2, ... per row, positions restarting at every document."""
    import numpy as np

    seg = np.zeros((rows, seq), np.int32)
    pos = np.zeros((rows, seq), np.int32)
    for r in range(rows):
        start, doc = 0, 1
        while start < seq:
            n = min(int(rng.integers(doc_range[0], doc_range[1] + 1)), seq - start)
            seg[r, start:start + n] = doc
            pos[r, start:start + n] = np.arange(n)
            start, doc = start + n, doc + 1
    toks = rng.integers(0, vocab, (rows, seq + 1), dtype=np.int32)
    return {"input_ids": toks[:, :-1], "targets": toks[:, 1:], "positions": pos, "segment_ids": seg,
            "loss_mask": np.ones((rows, seq), np.float32)}


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:500] if text else type(e).__name__


def _out_of_memory(e: BaseException) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "Out of memory" in s or "out of memory" in s


def attention_check(backends: list[str], cfg: Any, seq: int, seed: int) -> dict[str, Any]:
    """Max |difference| of each backend's output and input gradients to `xla` (float32 inputs
    rounded from bf16 so both see the same numbers) on one packed batch."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nemojax.model.attention import self_attention

    rng = np.random.default_rng(seed)
    b, h, kv, d = 2, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = [jnp.asarray(rng.normal(size=(b, seq, n, d)), jnp.bfloat16) for n in (h, kv, kv)]
    seg = jnp.asarray(packed_rows(rng, b, seq, 2, (max(seq // 8, 1), max(seq // 3, 1)))["segment_ids"])
    proj = jnp.asarray(rng.normal(size=(b, seq, h, d)), jnp.float32)

    def run(backend: str, dtype: Any) -> tuple[Any, Any]:
        def loss(q, k, v):
            out = self_attention(q, k, v, backend=backend, segment_ids=seg,
                                 max_segments=cfg.attention_max_segments)
            return jnp.sum(out.astype(jnp.float32) * proj), out

        args = [x.astype(dtype) for x in qkv]
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
        return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]

    ref_out, ref_grads = run("xla", jnp.float32)
    result: dict[str, Any] = {"shape": [b, seq, h, kv, d], "reference": "xla in float32"}
    for name in backends:
        dtype = jnp.bfloat16 if name == "cudnn" else jnp.float32
        try:
            out, grads = run(name, dtype)
        except Exception as e:  # noqa: BLE001 - a backend failing is a result to report
            result[name] = {"error": _error(e)}
            continue
        result[name] = {"dtype": jnp.dtype(dtype).name,
                        "max_abs_diff_output": float(np.max(np.abs(out - ref_out))),
                        "max_abs_diff_grads": float(max(np.max(np.abs(g - r)) for g, r in zip(grads, ref_grads)))}
    return result


def time_training(cfg: Any, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    """tokens/s and step time of the trainer's jitted step on one config (random packed rows)."""
    import jax
    import numpy as np

    from nemojax.parallel.mesh import make_mesh
    from nemojax.train.build import build_training
    from nemojax.train.rampup import BatchSchedule

    mesh = make_mesh(cfg.mesh, jax.devices()[:1])  # one device: the check is per chip
    training = build_training(cfg, mesh)
    sched, seq = BatchSchedule(cfg.data), cfg.data.seq_len
    accum, micro = sched.accum_steps(0), sched.micro_batch(0)
    rows = training.rows(accum, micro)
    rng = np.random.default_rng(seed)
    lo = max(2, min(256, seq // 4))
    batches = [training.global_batch(packed_rows(rng, len(rows), seq, cfg.model.vocab_size, (lo, max(lo, seq // 2))),
                                     accum, micro) for _ in range(2)]
    state = training.init_state(cfg.seed)
    t0 = time.perf_counter()
    for i in range(warmup):
        state, m = training.step(state, batches[i % 2])
    jax.block_until_ready(m["loss"])
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(steps):
        state, m = training.step(state, batches[i % 2])
    loss = float(m["loss"])
    elapsed = time.perf_counter() - t0
    del state, batches, m
    tokens = steps * sched.batch_size(0) * seq
    return {"tokens_per_sec": tokens / elapsed, "step_time_s": elapsed / steps, "warmup_s": round(warmup_s, 2),
            "loss": loss, "tokens_per_step": sched.batch_size(0) * seq}


def measure_decode(cfg: Any, batches: list[int], window: int, steps: int, quantize: str,
                   bandwidth: float | None, seed: int) -> dict[str, Any]:
    """Decode tokens/s per batch size, with the bytes each step reads and the bandwidth bound."""
    import jax
    import jax.numpy as jnp

    from nemojax.inference.forward import decode_one_token, engine_weights
    from nemojax.model.transformer import DTYPES, init_model

    cdt = DTYPES[cfg.compute_dtype]
    model = init_model(cfg, seed)
    weights = jax.tree.map(lambda a: a.astype(cdt), engine_weights(model, "stacked"))
    del model
    weights = decode_weights(weights, quantize)
    table = weights["embed"]
    weight_bytes = sum(int(a.nbytes) for a in jax.tree.leaves(weights)) - int(table.nbytes)
    kv_bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cdt).itemsize
    results = []
    for batch in batches:
        shape = (cfg.num_layers, batch, window, cfg.num_kv_heads, cfg.head_dim)

        def loop(weights, tokens, ck, cv):
            start = window - steps - 1  # every step reads the whole window; where it writes is immaterial

            def body(i, carry):
                tok, ck, cv = carry
                logits, ck, cv = decode_one_token(cfg, weights, tok, jnp.full((batch,), start + i), ck, cv)
                return jnp.argmax(logits, -1).astype(jnp.int32), ck, cv

            return jax.lax.fori_loop(0, steps, body, (tokens, ck, cv))

        run = jax.jit(loop, donate_argnums=(2, 3))
        tokens = jnp.zeros((batch,), jnp.int32)
        carry = run(weights, tokens, jnp.zeros(shape, cdt), jnp.zeros(shape, cdt))
        jax.block_until_ready(carry)  # compile + one pass
        t0 = time.perf_counter()
        carry = run(weights, carry[0], carry[1], carry[2])
        jax.block_until_ready(carry)
        elapsed = time.perf_counter() - t0
        del carry
        step_bytes = weight_bytes + batch * table.shape[1] * table.dtype.itemsize + batch * window * kv_bytes_per_token
        row: dict[str, Any] = {"batch": batch, "tokens_per_sec": batch * steps / elapsed,
                               "step_ms": 1e3 * elapsed / steps, "bytes_per_step": step_bytes}
        if bandwidth:
            bound = batch * bandwidth / step_bytes
            row.update(bound_tokens_per_sec=bound, fraction_of_bound=row["tokens_per_sec"] / bound)
        results.append(row)
    return {"quantize": quantize, "dtype": jnp.dtype(cdt).name, "window": window, "steps": steps,
            "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token, "results": results}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="nemotron4-1b", help="model config (default: the 1B preset)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--tiny", action="store_true", help="tiny model and shapes: a CPU smoke run of every part")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4, help="sequences per training step (one micro batch)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per backend")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation included)")
    p.add_argument("--backends", default="", help="comma-separated attention backends to try "
                   "(default by platform: cuda cudnn,xla; tpu splash,xla; cpu xla,dot_product)")
    p.add_argument("--decode-batches", default="1,8,32,64")
    p.add_argument("--decode-window", type=int, default=2048, help="cache rows each decode step attends over")
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--quantize", default="none", choices=QUANT_MODES, help="decode weight format")
    p.add_argument("--hbm-tbps", type=float, default=0.0, help="HBM bandwidth per device (TB/s) instead of the table")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="peak bf16 TFLOP/s per device instead of the table")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip parts that would start after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="", help="also write the JSON here")
    args = p.parse_intermixed_args(argv)
    for name in ("seq", "batch", "steps", "warmup", "decode_window", "decode_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.tiny:
        args.config = "tiny"
        args.overrides = TINY_MODEL + list(args.overrides)
        args.seq, args.batch, args.steps, args.warmup = min(args.seq, 64), min(args.batch, 2), 2, 1
        args.decode_batches, args.decode_window, args.decode_steps = "1,4", 64, 4
    try:
        decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    except ValueError:
        p.error(f"--decode-batches must be comma-separated integers, got {args.decode_batches!r}")
    if not decode_batches or min(decode_batches) < 1 or args.decode_steps >= args.decode_window:
        p.error("--decode-batches must be positive and --decode-steps below --decode-window")

    t_start = time.perf_counter()
    # JAX preallocates 75% of GPU memory by default; the no-remat 1B step wants more of the 80 GB.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    import nemojax  # noqa: F401 - first: on a host with libtpu but no TPU it keeps JAX off libtpu

    import jax

    from nemojax.commands.train import enable_compile_cache
    from nemojax.config import ConfigError, load_config
    from nemojax.model.attention import BACKENDS, compile_platform
    from nemojax.model.flops import flops_per_token
    from nemojax.train.metrics import peak_flops_per_device

    enable_compile_cache()
    base = [*args.overrides, f"data.seq_len={args.seq}", f"data.global_batch_size={args.batch}",
            f"data.micro_batch_size={args.batch}", "mesh.data=1", "eval_every=0", f"model.max_seq_len={max(args.seq, 64)}"]
    try:
        cfg = load_config(args.config, base)
    except ConfigError as e:
        p.error(str(e))
    cfg.data.rampup = []
    dev = jax.devices()[0]
    platform = compile_platform()
    backends = [b for b in args.backends.split(",") if b] or list(CANDIDATES.get(platform, ("xla",)))
    bad = [b for b in backends if b not in BACKENDS or b == "auto"]
    if bad:
        p.error(f"--backends: unknown {bad}; choose among {[b for b in BACKENDS if b != 'auto']}")
    peak = peak_flops_per_device(dev, args.peak_tflops)
    bandwidth = hbm_bandwidth(str(dev.device_kind), args.hbm_tbps)
    out: dict[str, Any] = {
        "device": {"platform": platform, "kind": str(dev.device_kind), "count_used": 1,
                   "peak_tflops": None if peak is None else peak / 1e12,
                   "hbm_tbps": None if bandwidth is None else bandwidth / 1e12},
        "jax": jax.__version__,
        "settings": {"config": args.config, "overrides": args.overrides, "seq_len": args.seq, "batch": args.batch,
                     "steps": args.steps, "warmup": args.warmup, "backends": backends,
                     "remat_policy": cfg.model.remat_policy, "compute_dtype": cfg.model.compute_dtype,
                     "param_dtype": cfg.model.param_dtype, "tiny": args.tiny},
        "skipped": [],
    }

    def over_budget(what: str) -> bool:
        if time.perf_counter() - t_start >= args.budget_s:
            out["skipped"].append(f"{what}: budget of {args.budget_s:.0f} s spent")
            return True
        return False

    # 1. attention backends against xla
    others = [b for b in backends if b != "xla"]
    if others and not over_budget("attention_check"):
        out["attention_check"] = attention_check(others, cfg.model, min(args.seq, 1024), args.seed)

    # 2. training MFU per backend; the fastest wins
    megatron = flops_per_token(cfg.model, args.seq)["train"]
    attention = megatron - flops_per_token(cfg.model, 0)["train"]
    counts = {"maxtext": megatron - attention / 2, "megatron": megatron}
    candidates: dict[str, Any] = {}
    for name in backends:
        if over_budget(f"training[{name}]"):
            continue
        remat = cfg.model.remat_policy
        for attempt in (remat, "full") if remat != "full" else (remat,):
            run_cfg = load_config(args.config, [*base, f"model.attention_backend={name}", f"model.remat_policy={attempt}"])
            run_cfg.data.rampup = []
            try:
                res = time_training(run_cfg, args.steps, args.warmup, args.seed)
            except Exception as e:  # noqa: BLE001 - out of memory or an unsupported backend is a result
                candidates[name] = {"remat_policy": attempt, "error": _error(e)}
                retry = _out_of_memory(e) and attempt != "full"
                res = None
            gc.collect()  # after the except block: the traceback no longer holds the failed run's arrays
            if res is None:
                if retry:
                    continue
                break
            for k, v in counts.items():
                tflops = res["tokens_per_sec"] * v / 1e12
                res[f"tflops_{k}"] = tflops
                res[f"mfu_{k}"] = None if peak is None else tflops * 1e12 / peak
            candidates[name] = {"remat_policy": attempt, **res}
            break
    timed = {k: v for k, v in candidates.items() if "tokens_per_sec" in v}
    best = max(timed, key=lambda k: timed[k]["tokens_per_sec"]) if timed else None
    out["training"] = {"flops_per_token": counts,
                       "flops_note": "maxtext: attention over half the seq x seq matrix (causal); megatron: all of it",
                       "candidates": candidates, "best_backend": best,
                       **({k: timed[best][k] for k in ("tokens_per_sec", "step_time_s", "mfu_maxtext", "mfu_megatron",
                                                       "tflops_maxtext", "tflops_megatron", "remat_policy")}
                          if best else {})}

    # 3. decode against the HBM bound
    if not over_budget("decode"):
        try:
            out["decode"] = measure_decode(cfg.model, decode_batches, args.decode_window, args.decode_steps,
                                           args.quantize, bandwidth, args.seed)
        except Exception as e:  # noqa: BLE001
            out["decode"] = {"error": _error(e)}
    out["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(out, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0 if best is not None and "results" in out.get("decode", {}) else 1


if __name__ == "__main__":
    sys.exit(main())
