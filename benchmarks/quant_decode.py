#!/usr/bin/env python
"""Decode tokens/s of the sampling engine per weight format, all in one process:
`python benchmarks/quant_decode.py [--preset tiny] [--batches 1,8,32] [--modes fp32,bf16,fp8,int8]`.

Every mode serves the same random weights of the preset's shape (random tokens decode at the same
speed as real ones): fp32 and bf16 (weights and compute in that dtype), fp8 and int8 (the block
projections quantized with one scale per output channel, everything else bf16, compute bf16;
`_b32` modes: a scale per 32 input elements; `_fp32` modes: everything else and compute fp32, what
`--dtype float32 --quantize MODE` serves). For each batch size B the engine has B slots and
decodes B requests of --new-tokens tokens after an 8-token prompt, greedy, eos ignored; the
programs are compiled first (not timed). Modes are interleaved and repeated (--repeats): a shared
host's load swings, so best and median are reported.

Each row also gives the bytes one decode step reads (the weights the engine holds, minus the
embedding table, of which it reads B rows, plus the KV cache of the attention window) and, with
--hbm-gbps (e.g. 3350 for an H100 SXM), the bandwidth bound B / (bytes / bandwidth): what the
GPU check compares FP8 decode against. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODES = {"fp32": ("float32", None, 0), "bf16": ("bfloat16", None, 0), "fp8": ("bfloat16", "fp8", 0),
         "int8": ("bfloat16", "int8", 0), "fp8_b32": ("bfloat16", "fp8", 32), "int8_b32": ("bfloat16", "int8", 32),
         "fp8_fp32": ("float32", "fp8", 0), "int8_fp32": ("float32", "int8", 0)}


def build(preset: str, mode: str, seed: int):
    import dataclasses

    from nemojax.config import load_config
    from nemojax.convert.quantize import quantize_model
    from nemojax.model.transformer import init_model

    dtype, q, block = MODES[mode]
    cfg = dataclasses.replace(load_config(preset).model, param_dtype=dtype, compute_dtype=dtype)
    model = init_model(cfg, seed)
    return quantize_model(model, q, block) if q else model


def step_bytes(engine, batch: int, window: int) -> int:
    """Bytes a decode step reads: the held weights (B embedding rows, not the table) + the KV window."""
    import jax

    w = dict(engine.weights)
    embed = w.pop("embed")
    weights = sum(x.nbytes for x in jax.tree.leaves(w)) + batch * embed.shape[1] * embed.dtype.itemsize
    k = engine.cache["k"]
    kv = 2 * k.shape[0] * batch * window * k.shape[3] * k.shape[4] * k.dtype.itemsize
    return int(weights + kv)


def time_decode(engine, batch: int, new_tokens: int, vocab: int) -> float:
    from nemojax.inference import Request
    from nemojax.inference.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    reqs = [Request(i, [2 + (7 * i + j) % (vocab - 2) for j in range(8)], params) for i in range(batch)]
    t = time.perf_counter()
    done = engine.generate_all(reqs)
    dt = time.perf_counter() - t
    assert sum(c.completion_tokens for c in done) == batch * new_tokens
    return dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="configs/models/tiny.yaml")
    p.add_argument("--modes", default="fp32,bf16,fp8,int8")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hbm-gbps", type=float, default=0.0, help="memory bandwidth for the bound (0 = none)")
    p.add_argument("--layout", default=None, help="engine weight layout (default: split on CPU, stacked elsewhere)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if "JAX_PLATFORMS" not in os.environ and args.hbm_gbps == 0:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from nemojax.inference import Engine

    modes = args.modes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    out = {"preset": args.preset, "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
           "jax": jax.__version__, "new_tokens": args.new_tokens, "repeats": args.repeats, "results": {}}
    max_len = 8 + args.new_tokens + 1
    engines = {}
    for mode in modes:
        model = build(args.preset, mode, args.seed)
        for b in batches:
            e = Engine(model, max_slots=b, max_len=max_len, decode_steps=args.decode_steps, stop_token_ids=[],
                       decode_layout=args.layout, program_dir=False, min_window=16)
            time_decode(e, b, args.new_tokens, model.cfg.vocab_size)  # compile and warm up
            engines[(mode, b)] = e
        out.setdefault("vocab", model.cfg.vocab_size)
        del model
    times: dict[tuple[str, int], list[float]] = {k: [] for k in engines}
    for _ in range(args.repeats):  # interleaved: every mode sees the same load
        for key, e in engines.items():
            times[key].append(time_decode(e, key[1], args.new_tokens, out["vocab"]))
    for b in batches:
        rows = {}
        for mode in modes:
            e, ts = engines[(mode, b)], times[(mode, b)]
            tokens = b * args.new_tokens
            window = e.rows
            row = {"tokens_per_s_best": round(tokens / min(ts), 1),
                   "tokens_per_s_median": round(tokens / statistics.median(ts), 1),
                   "bytes_per_step": step_bytes(e, b, window), "layout": e.decode_layout}
            if args.hbm_gbps:
                bound_s = row["bytes_per_step"] / (args.hbm_gbps * 1e9)
                row["bound_tokens_per_s"] = round(b / bound_s, 1)
                row["fraction_of_bound"] = round(row["tokens_per_s_best"] / row["bound_tokens_per_s"], 3)
            rows[mode] = row
        if "bf16" in rows:
            for mode, row in rows.items():
                row["speed_vs_bf16"] = round(row["tokens_per_s_best"] / rows["bf16"]["tokens_per_s_best"], 3)
        out["results"][f"batch_{b}"] = rows
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
