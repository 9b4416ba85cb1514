#!/usr/bin/env python
"""QLoRA against bf16 LoRA on the toy world, measured on a CPU:
`python benchmarks/qlora_cpu.py [--base runs/quant_accuracy/toy/base] [--seeds 0,1]`.

The same LoRA stages (rank 8 on q, k, v, o, up, down; bf16 weights, adapters and compute) from the
same toy-world base (`benchmarks/quant_accuracy.py --part toy` trains it: 600 steps on the world's
corpus), with the base frozen as
  bf16  the base in bf16 (plain LoRA)
  int8  the base's projections int8, one scale per output channel (QLoRA with int8)
  nf4   the base's projections NF4, one absmax per 64 inputs (QLoRA's 4-bit NormalFloat)
each stage the user's `python train.py CONFIG ... model.quant.mode=...` as a subprocess:
  sft  configs/align/toy_sft.yaml on the world's reference conversations; held out: assistant-token
       loss on 300 of the world's evaluation conversations (val_loss at the last step)
  dpo  configs/align/toy_dpo.yaml on pairs (a right and a wrong answer) for training prompts;
       held out: preference accuracy (log p(chosen) > log p(rejected), response log-probs summed) on
       300 pairs for the world's evaluation tasks (val_pref_accuracy)
Reported per stage, variant and seed: the held-out metric, the median step time (steps 10..end),
the training process's peak resident memory, and the per-device bytes of the training state
(params, gradients, optimizer state, fp32 master: nemojax.train.build.training_state_bytes) and
of the compiled step (XLA's memory analysis: arguments + temporaries). Prints one JSON object
(also <out>/results.json); finished runs are skipped on a rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

VARIANTS = {"bf16": [], "int8": ["model.quant.mode=int8"], "nf4": ["model.quant.mode=nf4", "model.quant.block_size=64"]}
STAGES = {"sft": ("configs/align/toy_sft.yaml", "val_loss", "optimizer.learning_rate=2e-3"),
          "dpo": ("configs/align/toy_dpo.yaml", "val_pref_accuracy", "optimizer.learning_rate=5e-4")}


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build_data(world: Path, out: Path, pairs: int, held_out: int, seed: int) -> dict[str, str]:
    from nemojax.align.tasks import Task, make_task
    from nemojax.align.toy_world import preference_record

    evals = [Task.from_json(json.loads(x)) for x in (world / "eval/tasks.jsonl").read_text().splitlines()]
    banned = {t.prompt for t in evals}
    families = sorted({t.family for t in evals})
    rng = random.Random(seed)
    train = []
    while len(train) < pairs:
        task = make_task(rng.choice(families), rng, rng.choice((1, 2)))
        if task.prompt not in banned:
            train.append(preference_record(task, rng))
    take = lambda path: (world / path).read_text().splitlines()[:held_out]  # noqa: E731
    return {"pref_train": _jsonl(out / "data/pref_train.jsonl", train),
            "pref_val": _jsonl(out / "data/pref_val.jsonl", [json.loads(x) for x in take("reward/preference_val.jsonl")]),
            "sft_train": str(world / "seed/sft.jsonl"),
            "sft_val": _jsonl(out / "data/sft_val.jsonl", [json.loads(x) for x in take("eval/sft.jsonl")])}


def overrides(stage: str, variant: str, seed: int, args: argparse.Namespace, data: dict, run_dir: Path) -> list[str]:
    _, _, lr = STAGES[stage]
    train, val = (data["sft_train"], data["sft_val"]) if stage == "sft" else (data["pref_train"], data["pref_val"])
    return [f"run_dir={run_dir}", f"init_from={args.base}", f"stage.train={train}", f"stage.validation={val}",
            f"data.tokenizer={args.world}/tokenizer/tokenizer.model", f"seed={seed}", "model.num_layers=4",
            f"steps={args.sft_steps if stage == 'sft' else args.dpo_steps}", "stage.epochs=0",
            "model.lora.rank=8", "model.lora.alpha=16", "model.param_dtype=bfloat16", "model.compute_dtype=bfloat16",
            lr, "optimizer.warmup_steps=5", f"eval_every={args.sft_steps if stage == 'sft' else args.dpo_steps}",
            "eval_batches=100", "log_every=5", "checkpoint_every=1000", *VARIANTS[variant]]


def run_train(config: str, ovr: list[str], log: Path) -> dict:
    """`python train.py` as a child; its wall time and peak RSS (os.wait4's rusage of that child)."""
    cmd = [sys.executable, str(REPO / "train.py"), config, *ovr]
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def compiled_memory(config: str, ovr: list[str]) -> dict:
    """Per-device bytes of the training state and of the compiled step (arguments + temporaries)."""
    import jax

    from nemojax.config import load_config
    from nemojax.parallel.mesh import make_mesh
    from nemojax.train.build import build_training, training_state_bytes
    from nemojax.train.rampup import BatchSchedule
    from nemojax.train.tasks import stage_task

    cfg = load_config(config, ovr)
    task = stage_task(cfg)
    state = training_state_bytes(cfg, 1, task)["per_device_bytes"]
    training = build_training(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), task=task)
    accum, micro = max(BatchSchedule(cfg.data).distinct_shapes(), key=lambda s: s[0] * s[1])
    ma = training.lower(accum, micro).compile().memory_analysis()
    return {"state_bytes": state, "step_argument_bytes": int(ma.argument_size_in_bytes),
            "step_temp_bytes": int(ma.temp_size_in_bytes)}


def read_metrics(run_dir: Path, key: str) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(rows) if key in r)
    tokens_per_step = [r["tokens"] / r["step"] for r in rows if "tokens" in r and r["step"] > 0][-1]
    speeds = [r["tokens_per_sec"] for r in rows if r.get("step", 0) >= 10 and "tokens_per_sec" in r]
    return {key: final[key], "step": final["step"],
            "median_step_s": round(tokens_per_step / statistics.median(speeds), 3) if speeds else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="runs/quant_accuracy/toy/base", help="the toy world's pretrained base run")
    p.add_argument("--world", default="runs/quant_accuracy/toy/world", help="the toy world it was trained on")
    p.add_argument("--out", default="runs/qlora_cpu")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--variants", default="bf16,int8,nf4")
    p.add_argument("--stages", default="sft,dpo")
    p.add_argument("--sft-steps", type=int, default=100)
    p.add_argument("--dpo-steps", type=int, default=60)
    p.add_argument("--pairs", type=int, default=1600, help="DPO training pairs")
    p.add_argument("--held-out", type=int, default=300)
    args = p.parse_args(argv)
    args.base, args.world = str(Path(args.base).absolute()), str(Path(args.world).absolute())
    if not (Path(args.base) / "checkpoints").is_dir():
        raise SystemExit(f"no base run at {args.base}: train it with `python benchmarks/quant_accuracy.py --part toy`")
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    data = build_data(Path(args.world), out, args.pairs, args.held_out, seed=1234)
    for stage in args.stages.split(","):
        config, key, _ = STAGES[stage]
        for variant in args.variants.split(","):
            for seed in map(int, args.seeds.split(",")):
                name = f"{stage}/{variant}/seed{seed}"
                if name in results["runs"]:
                    continue
                run_dir = out / stage / variant / f"seed{seed}"
                ovr = overrides(stage, variant, seed, args, data, run_dir)
                row = run_train(config, ovr, out / f"{stage}_{variant}_seed{seed}.log")
                row.update(read_metrics(run_dir, key))
                if seed == int(args.seeds.split(",")[0]):
                    row.update(compiled_memory(config, ovr))
                results["runs"][name] = row
                path.write_text(json.dumps(results, indent=1))
                print(f"[qlora_cpu] {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    summary = {}
    for name, row in results["runs"].items():
        stage, variant, _ = name.split("/")
        key = STAGES[stage][1]
        s = summary.setdefault(stage, {}).setdefault(variant, {key: [], "median_step_s": [], "peak_rss_mib": []})
        for k in (key, "median_step_s", "peak_rss_mib"):
            s[k].append(row[k])
    for stage, by_variant in summary.items():
        for variant, s in by_variant.items():
            for k, vals in list(s.items()):
                s[k + "_mean"] = round(statistics.mean(vals), 4)
                if len(vals) > 1:
                    s[k + "_std"] = round(statistics.stdev(vals), 4)
    results["summary"] = summary
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
