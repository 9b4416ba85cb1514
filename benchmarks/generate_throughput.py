"""nemojax generation vs Hugging Face `generate` on the same weights: whole process and steady state,
plus prefix sharing on an SDG-like workload. Prints one JSON object.

A random fp32 `transformers.NemotronForCausalLM` of the tiny preset's shape (configs/models/tiny.yaml:
4 layers, hidden 256, vocab 4096) is saved once; both sides read that directory. Greedy decoding.

1. whole_process: what a user waits for. The real `nemojax generate` CLI in a subprocess (start-up,
   imports, checkpoint load, compilation, generation, writing JSONL) against `benchmarks/hf_generate.py`
   in a subprocess (torch + transformers start-up, load, `generate`, writing JSONL), same prompts,
   both stopping at eos. The CLI runs once with an empty compile cache ("cold") and then with the
   cache that run filled ("warm"); warm CLI and HF runs are interleaved, best and median kept.
   Workloads: batch_B = B text prompts, --new-tokens each (B = 1, 8, 32); continuous = 48 prompts
   of mixed lengths with 16-256 new tokens each (HF: static batches of 8, each decoding to its
   longest request).
2. steady: output tokens/s with compilation and start-up excluded, both sides in this process,
   eos ignored so every request produces exactly its tokens (same workloads; the engine has B
   slots, 8 for continuous).
3. prefix_sharing: an SDG-like workload, one 512-token few-shot template + 64 distinct questions,
   n=4 samples each, 32 tokens per sample, sampled at temperature 0.8 with seeds; the engine
   with prefix sharing (forks + prefix cache) against the same engine with it switched off.
   Outputs must be identical; the speedup and the prompt tokens computed are reported.

Runs are interleaved and repeated (--repeats) because a shared host's load swings a lot (wall times
best and median; the CPU seconds of each process, user + system, are reported too: on a host
shared with other jobs they vary less than wall time); torch runs with 1 thread or all of them,
whichever a short probe finds faster.

    python benchmarks/generate_throughput.py            # ~15 min on 2 busy cores
    python benchmarks/generate_throughput.py --quick    # smaller, for a smoke test
    python benchmarks/generate_throughput.py --only whole_process
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32)
WORDS = ("the of and to in is was for on that with as by at from his her it an are were which this be "
         "model data time river music light city story water number people history system").split()


def hf_model(seed: int, shape: dict) -> object:
    import torch
    from transformers import NemotronConfig, NemotronForCausalLM

    torch.manual_seed(seed)
    cfg = NemotronConfig(**shape, max_position_embeddings=1024, partial_rotary_factor=0.5,
                         initializer_range=0.02, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                         tie_word_embeddings=False)
    return NemotronForCausalLM(cfg).to(torch.float32).eval()


def load() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- whole process


def text_prompts(rng: np.random.Generator, n: int, lo: int = 8, hi: int = 40) -> list[str]:
    return [" ".join(rng.choice(WORDS, int(rng.integers(lo, hi)))) for _ in range(n)]


CPU_SECONDS: list[float] = []  # CPU time (user + system) of each run_timed child, in order


def run_timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """(wall seconds, stderr) of a subprocess; its CPU seconds are appended to CPU_SECONDS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return dt, p.stderr


def whole_process(hf_dir: Path, work: Path, args: argparse.Namespace, hf_threads: int) -> dict:
    rng = np.random.default_rng(1)
    workloads = {f"batch_{b}": ([{"id": i, "prompt": p} for i, p in enumerate(text_prompts(rng, b))],
                                args.new_tokens, b) for b in args.batches}
    if args.cb_requests:
        prompts = text_prompts(rng, args.cb_requests, 4, 80)
        outs = rng.integers(16, 4 * args.new_tokens + 1, size=args.cb_requests)
        workloads["continuous"] = ([{"id": i, "prompt": p, "max_tokens": int(m)}
                                    for i, (p, m) in enumerate(zip(prompts, outs))], None, 8)
    tokenizer = ROOT / "nemojax" / "assets" / "tokenizer.model"
    results = {}
    for name, (lines, new_tokens, hf_batch) in workloads.items():
        inp = work / f"{name}.jsonl"
        inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
        max_tokens = new_tokens or max(line["max_tokens"] for line in lines)
        cache = Path(tempfile.mkdtemp(prefix="nj-cache-", dir=work))
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)}

        def engine_run() -> tuple[float, dict]:
            out = work / f"{name}.nj.jsonl"
            out.unlink(missing_ok=True)
            dt, err = run_timed([sys.executable, "-m", "nemojax.cli", "generate", "--checkpoint", str(hf_dir),
                                 "--input", str(inp), "--output", str(out), "--temperature", "0",
                                 "--max-tokens", str(max_tokens), "--no-progress"], env)
            return dt, json.loads(err.strip().splitlines()[-1])

        def hf_run() -> float:
            out = work / f"{name}.hf.jsonl"
            cmd = [sys.executable, str(ROOT / "benchmarks" / "hf_generate.py"), "--model", str(hf_dir),
                   "--tokenizer", str(tokenizer), "--input", str(inp), "--output", str(out),
                   "--max-tokens", str(max_tokens), "--batch-size", str(hf_batch), "--threads", str(hf_threads)]
            return run_timed(cmd, dict(os.environ))[0]

        cold, cold_summary = engine_run()
        warm, hf, summaries, warm_cpu, hf_cpu = [], [], [], [], []
        for _ in range(args.repeats):  # interleaved: both sides see the same host load
            dt, summary = engine_run()
            warm.append(dt)
            warm_cpu.append(CPU_SECONDS[-1])
            summaries.append(summary)
            hf.append(hf_run())
            hf_cpu.append(CPU_SECONDS[-1])
        nj = [json.loads(x) for x in (work / f"{name}.nj.jsonl").read_text().splitlines()]
        ref = {json.loads(x)["id"]: json.loads(x) for x in (work / f"{name}.hf.jsonl").read_text().splitlines()}
        per_line = {line["id"]: line.get("max_tokens", max_tokens) for line in lines}
        same = sum(r["output_ids"] == ref[r["id"]]["output_ids"][:per_line[r["id"]]] for r in nj)
        best = summaries[warm.index(min(warm))]
        results[name] = {
            "requests": len(lines), "tokens": sum(r["completion_tokens"] for r in nj),
            "engine_cold_s": round(cold, 2), "engine_warm_s": round(min(warm), 2),
            "engine_warm_median_s": round(statistics.median(warm), 2),
            "hf_s": round(min(hf), 2), "hf_median_s": round(statistics.median(hf), 2),
            "speedup_warm": round(min(hf) / min(warm), 2), "speedup_cold": round(min(hf) / cold, 2),
            "speedup_warm_median": round(statistics.median(hf) / statistics.median(warm), 2),
            "engine_warm_cpu_s": round(min(warm_cpu), 2), "hf_cpu_s": round(min(hf_cpu), 2),
            "cpu_ratio": round(min(hf_cpu) / min(warm_cpu), 2),
            "engine_warm_runs_s": [round(x, 2) for x in warm], "hf_runs_s": [round(x, 2) for x in hf],
            "cold_programs": cold_summary["programs"], "warm_programs": best["programs"],
            "warm_startup_s": best["startup_seconds"], "warm_generate_s": best["seconds"],
            "greedy_outputs_equal_hf": f"{same}/{len(nj)}", "loadavg_1m": load(),
        }
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    return results


# --------------------------------------------------------------------------- steady state


def time_hf(model, prompts: list[list[int]], new_tokens: list[int], batch: int, threads: int) -> float:
    """Seconds for HF generate over `prompts` in static batches (left padding), eos ignored."""
    import torch

    torch.set_num_threads(threads)
    total = 0.0
    for i in range(0, len(prompts), batch):
        chunk, want = prompts[i:i + batch], new_tokens[i:i + batch]
        width = max(map(len, chunk))
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        n = max(want)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0)
        total += time.perf_counter() - t
        assert out.shape[1] == width + n
    return total


def time_engine(engine, prompts: list[list[int]], new_tokens: list[int]) -> float:
    from nemojax.inference import Request, SamplingParams

    reqs = [Request(i, p, SamplingParams(temperature=0, max_tokens=m)) for i, (p, m) in enumerate(zip(prompts, new_tokens))]
    engine.prefix_cache.clear()  # every run computes its prompts (no reuse of the previous run's)
    t = time.perf_counter()
    outs = list(engine.generate(reqs))
    dt = time.perf_counter() - t
    assert sum(len(o.output_ids) for o in outs) == sum(new_tokens)
    return dt


def steady(hf, model, args: argparse.Namespace, hf_threads: int) -> dict:
    from nemojax.inference import Engine

    rng = np.random.default_rng(0)
    results = {}

    def measure(name: str, prompts: list[list[int]], new_tokens: list[int], slots: int) -> None:
        engine = Engine(model, max_slots=slots, max_len=max(map(len, prompts)) + max(new_tokens) + 16,
                        decode_steps=args.decode_steps, max_prefill_batch=min(slots, 8), stop_token_ids=[])
        time_engine(engine, prompts, new_tokens)  # compile + warm up every shape
        time_hf(hf, prompts[:slots], [8] * min(slots, len(prompts)), slots, hf_threads)  # warm up
        e_runs, h_runs = [], []
        for _ in range(args.repeats):
            e_runs.append(time_engine(engine, prompts, new_tokens))
            h_runs.append(time_hf(hf, prompts, new_tokens, slots, hf_threads))
        useful = sum(new_tokens)
        results[name] = {
            "requests": len(prompts), "slots_or_batch": slots, "output_tokens": useful,
            "engine_tok_s": round(useful / min(e_runs), 1), "hf_tok_s": round(useful / min(h_runs), 1),
            "speedup": round(min(h_runs) / min(e_runs), 2),
            "engine_tok_s_runs": [round(useful / t, 1) for t in e_runs],
            "hf_tok_s_runs": [round(useful / t, 1) for t in h_runs],
            "engine_programs": engine.compile_counts(), "loadavg_1m": load(),
        }
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)

    for b in args.batches:
        prompts = [rng.integers(4, TINY["vocab_size"], size=args.prompt_len).tolist() for _ in range(b)]
        measure(f"batch_{b}", prompts, [args.new_tokens] * b, b)
    if args.cb_requests:
        lens = rng.integers(8, 97, size=args.cb_requests)
        outs = rng.integers(16, 4 * args.new_tokens // 2 + 1, size=args.cb_requests)
        prompts = [rng.integers(4, TINY["vocab_size"], size=int(n)).tolist() for n in lens]
        measure("continuous", prompts, [int(o) for o in outs], 8)
    return results


# --------------------------------------------------------------------------- prefix sharing


def prefix_sharing(model, args: argparse.Namespace) -> dict:
    from nemojax.inference import Engine, Request, SamplingParams

    rng = np.random.default_rng(2)
    template = rng.integers(4, TINY["vocab_size"], size=args.template_len).tolist()
    reqs = [Request(i, [2] + template + rng.integers(4, TINY["vocab_size"], size=int(rng.integers(12, 28))).tolist(),
                    SamplingParams(temperature=0.8, seed=i, n=args.samples, max_tokens=args.sdg_tokens))
            for i in range(args.sdg_prompts)]
    engine = Engine(model, max_slots=32, max_len=1024, decode_steps=args.decode_steps, stop_token_ids=[],
                    prefix_cache_tokens=2048)

    def run(share: bool) -> tuple[float, list, dict]:
        engine.share_prefixes = share
        engine.prefix_cache.clear()
        before = dict(engine.stats)
        t = time.perf_counter()
        outs = engine.generate_all(reqs)
        dt = time.perf_counter() - t
        return dt, [o.output_ids for o in outs], {k: engine.stats[k] - before[k] for k in engine.stats}

    run(True), run(False)  # compile every shape both modes use
    on, off = [], []
    for _ in range(args.repeats):
        on.append(run(True))
        off.append(run(False))
    assert all(o[1] == off[0][1] for o in on + off), "prefix sharing changed the samples"
    tokens = args.sdg_prompts * args.samples * args.sdg_tokens
    t_on, t_off = min(o[0] for o in on), min(o[0] for o in off)
    return {
        "template_tokens": args.template_len, "prompts": args.sdg_prompts, "n": args.samples,
        "tokens_per_sample": args.sdg_tokens, "slots": 32,
        "shared_s": round(t_on, 2), "unshared_s": round(t_off, 2), "speedup": round(t_off / t_on, 2),
        "shared_tok_s": round(tokens / t_on, 1), "unshared_tok_s": round(tokens / t_off, 1),
        "shared_runs_s": [round(o[0], 2) for o in on], "unshared_runs_s": [round(o[0], 2) for o in off],
        "prompt_tokens_computed": {"shared": on[0][2]["prefill_tokens"], "unshared": off[0][2]["prefill_tokens"]},
        "prompt_tokens_reused": on[0][2]["cached_tokens"], "outputs_identical": True, "loadavg_1m": load(),
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["whole_process", "steady", "prefix_sharing"], action="append")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--cb-requests", type=int, default=48)
    ap.add_argument("--template-len", type=int, default=512)
    ap.add_argument("--sdg-prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--sdg-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best and median kept)")
    args = ap.parse_args()
    if args.quick:
        args.batches, args.cb_requests, args.repeats, args.sdg_prompts = [8, 32], 16, 1, 16
    parts = args.only or ["whole_process", "steady", "prefix_sharing"]

    import jax
    import torch

    from nemojax.checkpoint import load_model

    hf = hf_model(0, TINY)
    work = Path(tempfile.mkdtemp(prefix="nj-bench-"))
    hf_dir = work / "tiny-hf"
    hf.save_pretrained(hf_dir, safe_serialization=True)
    model = load_model(hf_dir, progress=False)
    threads = sorted({1, torch.get_num_threads()})
    rng = np.random.default_rng(0)
    probe = [rng.integers(4, TINY["vocab_size"], size=args.prompt_len).tolist() for _ in range(8)]
    probe_s = {t: time_hf(hf, probe, [16] * 8, 8, t) for t in threads}  # torch's threads can collapse under load
    hf_threads = min(probe_s, key=probe_s.get)

    out: dict = {
        "model": {"shape": TINY, "dtype": "float32", "params": sum(p.numel() for p in hf.parameters())},
        "decode": "greedy", "new_tokens": args.new_tokens,
        "hf": {"torch_threads": hf_threads, "probe_tok_s_by_threads": {str(t): round(128 / s, 1) for t, s in probe_s.items()}},
        "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "loadavg_1m_start": load()},
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }
    if "whole_process" in parts:
        out["whole_process"] = whole_process(hf_dir, work, args, hf_threads)
    if "steady" in parts:
        out["steady"] = steady(hf, model, args, hf_threads)
    if "prefix_sharing" in parts:
        out["prefix_sharing"] = prefix_sharing(model, args)
        print("prefix_sharing", json.dumps(out["prefix_sharing"]), file=sys.stderr, flush=True)
    out["host"]["loadavg_1m_end"] = load()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
