"""Output tokens/s of the nemojax engine vs Hugging Face `generate`, same weights, same CPU.

A random fp32 `transformers.NemotronForCausalLM` of the tiny preset's shape
(configs/models/tiny.yaml, or --shape 1b-ish overrides) is saved and converted with
`nemojax.checkpoint.load_model`, so both sides run identical weights. Greedy decoding,
eos ignored on both sides, so every request produces exactly its requested tokens.

Workloads:
  batch_B:    B prompts of --prompt-len tokens, --new-tokens each (B = 1, 8, 32).
  continuous: --cb-requests prompts of mixed lengths and mixed output lengths. The engine runs
              them through --cb-slots slots with continuous batching; HF runs them in static
              batches of the same size (left-padded), each batch decoding until its longest
              request is done; both count only the requested tokens.
Compilation / warm-up runs are excluded. Engine and HF runs are interleaved and the best of
--repeats is kept (a shared host's load swings a lot). torch runs with 1 thread or all of them,
whichever a short probe finds faster. Prints one JSON object.

    python benchmarks/generate_throughput.py            # ~5 min on 2 cores
    python benchmarks/generate_throughput.py --quick    # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TINY = dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=32)


def hf_model(seed: int, shape: dict) -> object:
    import torch
    from transformers import NemotronConfig, NemotronForCausalLM

    torch.manual_seed(seed)
    cfg = NemotronConfig(**shape, max_position_embeddings=1024, partial_rotary_factor=0.5,
                         initializer_range=0.02, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                         tie_word_embeddings=False)
    return NemotronForCausalLM(cfg).to(torch.float32).eval()


def time_hf(model, prompts: list[list[int]], new_tokens: list[int], batch: int, threads: int) -> float:
    """Seconds for HF generate over `prompts` in static batches (left padding)."""
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


def time_engine(engine, prompts: list[list[int]], new_tokens: list[int]) -> tuple[float, int]:
    from nemojax.inference import Request, SamplingParams

    reqs = [Request(i, p, SamplingParams(temperature=0, max_tokens=m))
            for i, (p, m) in enumerate(zip(prompts, new_tokens))]
    t = time.perf_counter()
    outs = list(engine.generate(reqs))
    dt = time.perf_counter() - t
    got = sum(len(o.output_ids) for o in outs)
    assert got == sum(new_tokens), (got, sum(new_tokens))
    return dt, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--cb-requests", type=int, default=48)
    ap.add_argument("--cb-slots", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best kept)")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.cb_requests, args.repeats = 32, 16, 1

    import jax
    import torch

    from nemojax.checkpoint import load_model
    from nemojax.inference import Engine

    hf = hf_model(0, TINY)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        model = load_model(d, progress=False)
    rng = np.random.default_rng(0)
    threads = sorted({1, torch.get_num_threads()})
    results: dict[str, dict] = {}

    def pick_torch_threads() -> int:
        """torch's OpenMP threads can collapse on a shared, loaded host: keep the faster setting."""
        probe = [rng.integers(4, TINY["vocab_size"], size=args.prompt_len).tolist() for _ in range(8)]
        times = {t: time_hf(hf, probe, [16] * 8, 8, t) for t in threads}
        return min(times, key=times.get), {str(t): round(8 * 16 / v, 1) for t, v in times.items()}

    hf_threads, probe_tok_s = pick_torch_threads()

    def measure(name: str, prompts, new_tokens, slots: int, max_len: int) -> None:
        engine = Engine(model, max_slots=slots, max_len=max_len, decode_steps=args.decode_steps,
                        max_prefill_batch=min(slots, 32), stop_token_ids=[])
        time_engine(engine, prompts, new_tokens)  # compile + warm up every shape
        time_hf(hf, prompts[:slots], [8] * min(slots, len(prompts)), slots, hf_threads)  # warm up
        e_runs, h_runs = [], []
        for _ in range(args.repeats):  # interleaved, so both sides see the same host load
            e_runs.append(time_engine(engine, prompts, new_tokens)[0])
            h_runs.append(time_hf(hf, prompts, new_tokens, slots, hf_threads))
        useful = sum(new_tokens)
        e_dt, h_dt = min(e_runs), min(h_runs)
        results[name] = {
            "requests": len(prompts), "slots_or_batch": slots, "output_tokens": useful,
            "engine_tok_s": round(useful / e_dt, 1), "hf_tok_s": round(useful / h_dt, 1),
            "speedup": round(h_dt / e_dt, 2),
            "engine_tok_s_runs": [round(useful / t, 1) for t in e_runs],
            "hf_tok_s_runs": [round(useful / t, 1) for t in h_runs],
            "engine_compiles": engine.compile_counts(),
        }
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)

    for b in args.batches:
        prompts = [rng.integers(4, TINY["vocab_size"], size=args.prompt_len).tolist() for _ in range(b)]
        measure(f"batch_{b}", prompts, [args.new_tokens] * b, b, args.prompt_len + args.new_tokens + 16)
    lens = rng.integers(8, 97, size=args.cb_requests)
    outs = rng.integers(16, 4 * args.new_tokens // 2 + 1, size=args.cb_requests)
    prompts = [rng.integers(4, TINY["vocab_size"], size=int(n)).tolist() for n in lens]
    measure("continuous", prompts, [int(o) for o in outs], args.cb_slots, int(lens.max() + outs.max() + 16))

    print(json.dumps({
        "model": {"shape": TINY, "dtype": "float32", "params": sum(p.numel() for p in hf.parameters())},
        "decode": "greedy, eos ignored", "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "engine": {"decode_steps": args.decode_steps},
        "hf": {"torch_threads": hf_threads, "probe_tok_s_by_threads": probe_tok_s},
        "host": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                 "loadavg_1m": round(os.getloadavg()[0], 2)},
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
