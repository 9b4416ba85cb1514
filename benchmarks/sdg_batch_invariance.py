"""Why an SDG run resumed after a kill wrote other tokens than an uninterrupted run, and what the
fix (a batch-invariant engine) costs. Prints one JSON object.

1. matmul: on XLA:CPU the result of row r of `x @ W` depends on how many rows the call has (the
   GEMM switches kernels / blocking with M), so a token's keys, values and logits depend on what
   else is in the same prefill call. Reported: differing elements of the first 16 rows at each M,
   against M = 16.
2. engine_resume: twelve seeded requests (prompt lengths 10-130 tokens, n = 4 or 1, temperature
   0.8, top_p 0.95, 8-48 tokens) on the model of tests/test_sdg_determinism.py (2 layers, hidden
   256, 4 heads of 64; 4 slots, max_len 256), run all together and then only the second half
   (what a resumed stage submits), on fresh engines, for each engine setting: how many samples of
   the second half differ in their chosen tokens and in their log-prob bits. `batched` is the
   engine's own default (8 prompts per prefill call, prefix cache of 2 x max_len, decode windows
   from 128 rows up); `invariant` is what SDG engine clients now use (`batch_invariant: true`: one
   prompt per prefill call, no prefix cache, every decode call over max_len rows); the other rows
   undo one of the three at a time.
3. throughput: an SDG pipeline through the runner on a random model of the tiny preset's shape
   (configs/models/tiny.yaml; it never emits eos, so every sample runs to max_tokens; 8 slots,
   max_len 512): seed prompts -> instruction prompts -> respond (n = 4, T = 0.8) -> LLM judge
   (asked twice per pair) -> 3-turn dialogues. Per setting, one cold run (compiling its engine
   programs into an empty program cache) and --repeats warm runs (loading them), interleaved;
   reported: wall seconds and tokens (prompt + completion, as the stage summaries count them) per
   second of each run, medians, and whether the two settings wrote the same files.

    python benchmarks/sdg_batch_invariance.py               # ~15 min on 2 busy cores
    python benchmarks/sdg_batch_invariance.py --quick
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAX_LEN = 512  # throughput pipeline
ENGINE_SETTINGS = {  # Engine keyword arguments ("min_window": True = the engine's max_len)
    "batched": {"max_prefill_batch": 8},  # the engine's defaults: prefix cache 2 x max_len, windows from 128
    "invariant": {"max_prefill_batch": 1, "prefix_cache_tokens": 0, "min_window": True},
    "invariant_but_batched_prefill": {"max_prefill_batch": 8, "prefix_cache_tokens": 0, "min_window": True},
    "invariant_but_prefix_cache": {"max_prefill_batch": 1, "min_window": True},
    "invariant_but_window_buckets": {"max_prefill_batch": 1, "prefix_cache_tokens": 0},
}
CLIENT_SETTINGS = {"batched": {"batch_invariant": False, "max_prefill_batch": 8},  # pipeline client keys
                   "invariant": {"batch_invariant": True}}


def tiny_cfg(init_std: float) -> object:
    """The tiny preset's shape (configs/models/tiny.yaml)."""
    from nemojax.config import ModelConfig

    return ModelConfig(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32,
                       ffn_hidden_size=1024, init_std=init_std, max_seq_len=1024)


def resume_cfg() -> object:
    """tests/test_sdg_determinism.py's model: 2 layers, 4 heads of 64 (a workload where each of
    the three dependences shows)."""
    from nemojax.config import ModelConfig

    return ModelConfig(vocab_size=4096, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                       ffn_hidden_size=1024, init_std=0.2, max_seq_len=256)


def matmul() -> dict:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    out = {}
    for D, F in [(256, 1024), (1024, 256), (256, 4096)]:
        W = jnp.asarray(rng.standard_normal((D, F), np.float32) * 0.05)
        x = rng.standard_normal((2048, D), np.float32)
        f = jax.jit(lambda a, w: a @ w)
        ref = np.asarray(f(jnp.asarray(x[:16]), W))
        row = {}
        for M in [1, 16, 32, 64, 256, 2048]:
            got = np.asarray(f(jnp.asarray(x[:M]), W))[:min(M, 16)]
            row[str(M)] = int(np.sum(got.view(np.uint32) != ref[:min(M, 16)].view(np.uint32)))
        out[f"{D}x{F}"] = row
    return out


def engine_resume(requests: int) -> dict:
    from nemojax.data.chat import prompt_ids
    from nemojax.data.tokenizer import load_tokenizer
    from nemojax.inference import Engine, Request, SamplingParams
    from nemojax.model.transformer import init_model

    tok = load_tokenizer("builtin")
    cfg = resume_cfg()
    model = init_model(cfg, seed=0)
    rnd = random.Random(0)
    words = "river mountain cook star sky blue green answer question write short long poem essay".split()
    prompts = [f"Question {i}: " + " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 60)))
               for i in range(requests)]
    max_tokens = [rnd.randint(8, 48) for _ in range(requests)]
    max_len = 256

    def reqs(idx: range) -> list:
        return [Request(i, prompt_ids(tok, [{"role": "user", "content": prompts[i]}]),
                        SamplingParams(temperature=0.8, top_p=0.95, max_tokens=max_tokens[i], n=4 if i % 3 == 0 else 1,
                                       seed=100 + i, logprobs=True))
                for i in idx]

    def run(idx: range, knobs: dict) -> dict:
        knobs = {k: (max_len if k == "min_window" else v) for k, v in knobs.items()}
        e = Engine(model, max_slots=4, max_len=max_len, decode_steps=8, tokenizer=tok,
                   stop_token_ids=[cfg.eos_id], program_dir=False, **knobs)
        return {(c.request_id, c.sample_index): (c.output_ids, np.asarray(c.logprobs, np.float32))
                for c in e.generate_all(reqs(idx))}

    out = {}
    for name, knobs in ENGINE_SETTINGS.items():
        full, part = run(range(requests), knobs), run(range(requests // 2, requests), knobs)
        keys = sorted(part)
        bits = 0
        for k in keys:
            a, b = full[k][1], part[k][1]
            m = min(len(a), len(b))
            bits += bool(len(a) != len(b) or np.any(a[:m].view(np.uint32) != b[:m].view(np.uint32)))
        out[name] = {"samples_compared": len(keys),
                     "samples_with_other_tokens": sum(full[k][0] != part[k][0] for k in keys),
                     "samples_with_other_logprob_bits": bits}
    return out


def pipeline_tree(ckpt: Path, run_dir: Path, knobs: dict, args: argparse.Namespace) -> dict:
    return {
        "run_dir": str(run_dir), "seed": 0, "max_in_flight": 16, "progress": False,
        "clients": {"gen": {"type": "engine", "checkpoint": str(ckpt), "max_slots": 8, "max_len": MAX_LEN,
                            "decode_steps": 16, **knobs}},
        "stages": {
            "seed_prompts": {"kind": "read", "path": "configs/sdg/seed_prompts.jsonl", "limit": args.prompts},
            "if_prompts": {"kind": "instruction_prompts", "variants": ["single_turn", "multi_turn"],
                           "max_instructions": 1},
            "answers": {"kind": "respond", "n": 4, "temperature": 0.8, "top_p": 0.95, "max_tokens": args.tokens},
            "pairs": {"kind": "preference", "judge": "llm", "max_tokens": 4, "max_pairs": 1},
            "dialogues": {"kind": "dialogue", "input": "seed_prompts", "turns": 3, "max_tokens": args.tokens // 2},
        },
    }


def throughput(args: argparse.Namespace, work: Path) -> dict:
    """Cold: the first run of each setting, compiling its programs. Warm: later runs loading the
    programs from the on-disk program cache (what a rerun or a second pipeline sees)."""
    import jax

    from nemojax.checkpoint import save_model
    from nemojax.model.transformer import init_model
    from nemojax.sdg.config import build_pipeline
    from nemojax.sdg.runner import Runner

    ckpt = work / "tiny-random"
    save_model(init_model(tiny_cfg(0.02), seed=0), tiny_cfg(0.02), ckpt)
    runs: dict[str, dict[str, list[dict]]] = {name: {"cold": [], "warm": []} for name in CLIENT_SETTINGS}
    outputs: dict[str, bytes] = {}
    for rep in range(args.repeats + 1):
        for name, knobs in CLIENT_SETTINGS.items():
            jax.config.update("jax_compilation_cache_dir", str(work / f"cache-{name}"))  # per setting
            run_dir = work / f"{name}-{rep}"
            cfg = build_pipeline(pipeline_tree(ckpt, run_dir, knobs, args))
            t = time.perf_counter()
            summaries = Runner(cfg, log=io.StringIO()).run()
            wall = time.perf_counter() - t
            tokens = sum(s["tokens"] for s in summaries.values())
            runs[name]["cold" if rep == 0 else "warm"].append({
                "seconds": round(wall, 1), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                "load_1m": round(os.getloadavg()[0], 2),
                "stage_seconds": {k: s["seconds"] for k, s in summaries.items()}})
            outputs[name] = b"".join(p.read_bytes() for p in sorted(run_dir.glob("*.jsonl")))
    med = {f"{name}_{kind}": statistics.median(r["tokens_per_s"] for r in rs[kind])
           for name, rs in runs.items() for kind in ("cold", "warm")}
    return {"runs": runs, "median_tokens_per_s": med,
            "invariant_over_batched_cold": round(med["invariant_cold"] / med["batched_cold"], 3),
            "invariant_over_batched_warm": round(med["invariant_warm"] / med["batched_warm"], 3),
            "same_outputs_both_settings": outputs["batched"] == outputs["invariant"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["matmul", "engine_resume", "throughput"], action="append")
    ap.add_argument("--requests", type=int, default=12, help="engine_resume: requests (the second half is resumed)")
    ap.add_argument("--prompts", type=int, default=12, help="throughput: seed prompts read (at most 12)")
    ap.add_argument("--tokens", type=int, default=64, help="throughput: max_tokens of the answers")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.prompts, args.tokens, args.repeats = 8, 4, 24, 1
    parts = args.only or ["matmul", "engine_resume", "throughput"]
    os.chdir(ROOT)
    import jax

    out: dict = {"host": {"cpu_count": os.cpu_count(), "loadavg_1m_start": round(os.getloadavg()[0], 2)},
                 "jax": jax.__version__, "backend": jax.default_backend(), "args": vars(args)}
    if "matmul" in parts:
        out["matmul_rows_differing_vs_M16"] = matmul()
    if "engine_resume" in parts:
        out["engine_resume"] = engine_resume(args.requests)
    if "throughput" in parts:
        out["throughput"] = throughput(args, Path(tempfile.mkdtemp(prefix="nj-sdg-bench-")))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
