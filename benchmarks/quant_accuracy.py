#!/usr/bin/env python
"""Accuracy of quantized weights against bf16, measured on trained models of this project:
`python benchmarks/quant_accuracy.py [--part tiny|toy|all] [--out runs/quant_accuracy]`.

Modes: bf16 (weights and compute bf16: the reference), fp8 and int8 (the block projections
quantized at load, one scale per output channel; embeddings, LM head, norms, activations and KV
cache bf16), and the same two with a scale per 32 input elements (`_b32`). Each mode is the
checkpoint loaded as `nemojax generate --dtype bfloat16 --quantize MODE` loads it.

tiny: the quick start's pretrained model (`runs/tiny`, trained with `python train.py configs/tiny.yaml`
  if missing). Held-out text: the first --batches validation batches of its own data pipeline
  (8 x 256 tokens each, documents the run never trained on). Next-token KL(bf16 || mode), top-1
  agreement and NLL per mode; greedy-output agreement over --prompts held-out document openings
  (24 tokens each, 32 new tokens, engine, greedy).
toy: the toy world's strongest student: the "solver" of benchmarks/reward_model_cpu.py (base 600
  steps on the world's corpus, then SFT on 16,000 reference conversations of strings, lists, code
  and format; built here if missing, each step the user's `python train.py` command). Its held-out
  evaluation tasks (300 per family) through `nemojax eval`'s tasks suite for every mode: task score
  with its standard error, per family, IFEval strict / loose on the format family, and greedy
  agreement of the responses with bf16's; KL / top-1 agreement over the assistant tokens of the
  world's held-out reference conversations.

Prints one JSON object (also <out>/results.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

MODES = {"bf16": None, "fp8": ("fp8", 0), "int8": ("int8", 0), "fp8_b32": ("fp8", 32), "int8_b32": ("int8", 32)}
MAIN_MODES = ("bf16", "fp8", "int8")


def load(ckpt: str | Path, mode: str):
    from nemojax.checkpoint import load_model

    q = MODES[mode]
    return load_model(ckpt, param_dtype="bfloat16", compute_dtype="bfloat16", progress=False,
                      quantize=q[0] if q else None, quant_block_size=q[1] if q else 0)


def greedy_outputs(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    from nemojax.inference import Engine, Request
    from nemojax.inference.sampling import SamplingParams

    engine = Engine(model, max_slots=min(32, len(prompts)), max_len=max(map(len, prompts)) + new_tokens + 1,
                    stop_token_ids=[], program_dir=False)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    done = engine.generate_all([Request(i, p, params) for i, p in enumerate(prompts)])
    return [c.output_ids for c in sorted(done, key=lambda c: c.request_id)]


def part_tiny(args: argparse.Namespace) -> dict:
    from nemojax.config import load_config
    from nemojax.data.pretrain import make_batch_iterator
    from nemojax.evaluation.agreement import greedy_agreement, next_token_agreement

    ckpt = Path(args.tiny)
    if not (ckpt / "checkpoints").is_dir():
        print(f"[quant_accuracy] training {ckpt}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(REPO / "train.py"), "configs/tiny.yaml", f"run_dir={ckpt}"],
                       cwd=REPO, check=True)
    cfg = load_config(ckpt / "config.yaml")
    it = make_batch_iterator(cfg.data, split="validation", batch_size=8, seq_len=cfg.data.seq_len, seed=0)
    batches = [next(it) for _ in range(args.batches)]
    # greedy prompts: the first 24 tokens of each held-out row that starts a document
    prompts = [list(map(int, b["input_ids"][r, :24])) for b in batches for r in range(b["input_ids"].shape[0])
               if b["positions"][r, 0] == 0][: args.prompts]
    ref = load(ckpt, "bf16")
    ref_greedy = greedy_outputs(ref, prompts, args.new_tokens)
    out = {"checkpoint": str(ckpt), "held_out_batches": args.batches, "prompts": len(prompts),
           "new_tokens": args.new_tokens, "modes": {}}
    fp32 = load_model_fp32(ckpt)
    out["fp32_vs_bf16"] = next_token_agreement(fp32, ref, batches)
    for mode in MODES:
        t0 = time.perf_counter()
        model = ref if mode == "bf16" else load(ckpt, mode)
        row = next_token_agreement(ref, model, batches)
        if mode != "bf16":
            row["greedy"] = greedy_agreement(ref_greedy, greedy_outputs(model, prompts, args.new_tokens))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out["modes"][mode] = row
        print(f"[quant_accuracy] tiny {mode}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return out


def load_model_fp32(ckpt: Path):
    from nemojax.checkpoint import load_model

    return load_model(ckpt, progress=False)


def train_solver(out: Path, seed: int) -> tuple[Path, dict]:
    from reward_model_cpu import build_data, run_step

    data = build_data(out, "lists", 10, seed)
    runs = {"base": out / "base", "solver": out / "solver"}
    common = [f"data.tokenizer={data['tokenizer']}", f"seed={seed}", "model.num_layers=4"]
    steps = {
        "base": ("configs/align/toy_base.yaml", [f"data.sources=[{{path: '{data['corpus']}', weight: 1.0}}]",
                                                 "steps=600"]),
        "solver": ("configs/align/toy_sft.yaml", [f"init_from={runs['base']}", f"stage.train={data['solver_sft']}",
                                                  "stage.epochs=1"]),
    }
    seconds = {}
    for name, (config, overrides) in steps.items():
        if not (runs[name] / "DONE.json").is_file():
            seconds[name] = round(run_step(name, config, runs[name], [*overrides, *common], out / f"{name}.log"), 1)
    return runs["solver"], {"world": str(out / "world"), "tokenizer": data["tokenizer"], "train_seconds": seconds}


def conversation_batches(path: Path, tokenizer, seq_len: int, batch: int = 16) -> list[dict]:
    """Held-out reference conversations as [batch, seq_len] rows; the mask covers assistant tokens."""
    import numpy as np

    from nemojax.data.chat import encode_chat

    rows = []
    for line in path.read_text().splitlines():
        enc = encode_chat(tokenizer, json.loads(line)["messages"])
        ids, mask = list(enc.ids)[: seq_len + 1], list(enc.loss_mask)[: seq_len + 1]
        rows.append((ids, mask))
    out = []
    for start in range(0, len(rows), batch):
        b = {k: np.zeros((batch, seq_len), np.int32) for k in ("input_ids", "targets", "segment_ids")}
        b["loss_mask"] = np.zeros((batch, seq_len), np.float32)
        for r, (ids, mask) in enumerate(rows[start:start + batch]):
            n = len(ids) - 1
            b["input_ids"][r, :n], b["targets"][r, :n] = ids[:-1], ids[1:]
            b["segment_ids"][r, :n] = 1
            b["loss_mask"][r, :n] = mask[1:]
        out.append(b)
    return out


def part_toy(args: argparse.Namespace) -> dict:
    from nemojax.data.tokenizer import load_tokenizer
    from nemojax.evaluation.agreement import greedy_agreement, next_token_agreement
    from nemojax.evaluation.runner import EvalSpec, evaluate_model

    out_dir = Path(args.out) / "toy"
    solver, info = train_solver(out_dir, args.seed)
    world = Path(info["world"])
    tok = load_tokenizer(info["tokenizer"])
    batches = conversation_batches(world / "eval/sft.jsonl", tok, seq_len=192)
    result = {"checkpoint": str(solver), **info, "modes": {}}
    ref = load(solver, "bf16")
    ref_rows = None
    for mode in MODES:
        t0 = time.perf_counter()
        model = ref if mode == "bf16" else load(solver, mode)
        row = next_token_agreement(ref, model, batches)
        if mode in MAIN_MODES:
            spec = EvalSpec(suites={"tasks": str(world / "eval/tasks.jsonl")}, checkpoint=str(solver),
                            max_tokens=96, batch_slots=32, max_len=256, limit=args.limit)
            report = evaluate_model(spec, model=model, tokenizer=tok)
            m = report["suites"]["tasks"]["metrics"]
            rows = report["rows"]["tasks"]
            p, n = m["accuracy"], m["n"]
            row.update(tasks=p, tasks_stderr=math.sqrt(p * (1 - p) / n), n=n, by_family=m["by_family"],
                       ifeval=m.get("ifeval", {}))
            if ref_rows is None:
                ref_rows = rows
            else:
                row["greedy_responses_identical"] = sum(a["response"] == b["response"] for a, b in zip(ref_rows, rows)) / n
                row["tasks_changed"] = sum(a["correct"] != b["correct"] for a, b in zip(ref_rows, rows))
                row["greedy"] = greedy_agreement([list(tok.encode(r["response"])) for r in ref_rows],
                                                 [list(tok.encode(r["response"])) for r in rows])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        result["modes"][mode] = row
        print(f"[quant_accuracy] toy {mode}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["tiny", "toy", "all"], default="all")
    p.add_argument("--out", default="runs/quant_accuracy")
    p.add_argument("--tiny", default="runs/tiny", help="the pretrained tiny run (trained here if missing)")
    p.add_argument("--batches", type=int, default=16, help="held-out batches of 8 x 256 tokens (tiny)")
    p.add_argument("--prompts", type=int, default=32, help="greedy prompts (tiny)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="evaluation tasks (toy; 0 = all 1200)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    import jax

    results["jax"] = jax.__version__
    results["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip()
    for part, fn in (("tiny", part_tiny), ("toy", part_toy)):
        if args.part in (part, "all"):
            results[part] = fn(args)
            path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
