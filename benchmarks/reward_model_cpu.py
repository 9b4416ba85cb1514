#!/usr/bin/env python
"""The reward model on a task family its base can solve, measured on a CPU:
`python benchmarks/reward_model_cpu.py [--out DIR] [--family lists]`.

A reward model judges correctness only as well as its trunk can solve the task (a 0.8M-parameter
model that cannot find a list's maximum cannot tell a right maximum from a wrong one), so this
measurement first makes a model that solves the judged family, then trains the reward head on it,
each step the user's command (`python train.py <config> key=value ...`, a subprocess, wall clock
including compilation; a rerun skips finished steps and resumes an interrupted one):

    toy world (nemojax.align.toy_world: --world-families, levels 1-2; labels known by construction)
      -> base      configs/align/toy_base.yaml    600 steps on the world's plain-text corpus
      -> solver    configs/align/toy_sft.yaml     16,000 reference conversations of every family, one epoch
      -> reward    configs/align/toy_reward.yaml  a right and a wrong response for each of
                                                  --prompts training prompts of --family (one epoch)

Held out: one response (right or wrong, equally likely) to each of the world's 300 evaluation
tasks of --family, whose prompts no training file asks (the pretraining corpus may state a fact
about the same numbers, as web text states facts; no question, conversation or reward record
holds the prompt), and the preference pairs over the same tasks. Prints one JSON object (also <out>/results.json): the
reward model's held-out Pearson r of the weighted reward (Nemotron-4-340B-Reward's weights) and
per attribute, pairwise accuracy, and the seconds each step took.
`python scripts/plot_alignment.py <out>` draws its held-out r against step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build_data(out: Path, family: str, prompts: int, seed: int,
               world_families: tuple[str, ...] = ("strings", "lists", "code", "format")) -> dict[str, str]:
    """The toy world plus the reward model's training and held-out records (of `family`)."""
    from nemojax.align.tasks import Task, make_task
    from nemojax.align.toy_world import ToyWorldSpec, build_toy_world, reward_record

    w = out / "world"
    spec = ToyWorldSpec(seed=seed, families=world_families, train_levels=(1, 2), eval_levels=(1, 2),
                        pretrain_documents=12000, seed_conversations=16000, eval_per_family=300,
                        prompts_per_pool=10, pools=1, reward_records=10)
    manifest = build_toy_world(w, spec)
    rng = random.Random(seed)
    evals = [Task.from_json(json.loads(x)) for x in (w / "eval/tasks.jsonl").read_text().splitlines()]
    banned = {t.prompt for t in evals}
    evals = [t for t in evals if t.family == family]
    held_out = {t.prompt for t in evals}
    train: list[dict] = []
    while len(train) < 2 * prompts:  # HelpSteer2 gives each prompt several rated responses
        task = make_task(family, rng, rng.choice(spec.train_levels))
        if task.prompt not in banned:
            train += [reward_record(task, rng, correct=True), reward_record(task, rng, correct=False)]
    return {"tokenizer": manifest["tokenizer"],
            "corpus": str(w / "pretrain/corpus.jsonl"),
            "solver_sft": str(w / "seed/sft.jsonl"),
            "reward_train": _jsonl(out / "data/reward_train.jsonl", train),
            "reward_val": _jsonl(out / "data/reward_val.jsonl", [reward_record(t, rng) for t in evals]),
            "pref_val": _jsonl(out / "data/preference_val.jsonl", [
                r for r in map(json.loads, (w / "reward/preference_val.jsonl").read_text().splitlines())
                if r["prompt"] in held_out])}


def run_step(name: str, config: str, run_dir: Path, overrides: list[str], log: Path) -> float:
    """`python train.py <config> ...` as a subprocess; returns its wall-clock seconds."""
    cmd = [sys.executable, str(REPO / "train.py"), config, f"run_dir={run_dir}", *overrides]
    print(f"[reward_model_cpu] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"step {name} failed (exit {proc.returncode}); see {log}")
    (run_dir / "DONE.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/reward_model_cpu", help="where the world, runs and results go")
    p.add_argument("--family", default="lists", help="the toy world's task family to judge")
    p.add_argument("--prompts", type=int, default=6000, help="training prompts (one right, one wrong response each)")
    p.add_argument("--world-families", default="strings,lists,code,format",
                   help="the families the base and the solver learn (the solver's reference conversations)")
    p.add_argument("--layers", type=int, default=4,
                   help="transformer layers of every step's model (checking an answer takes the layers that "
                        "compute it plus those that compare)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    seconds = results.setdefault("seconds", {})

    t0 = time.perf_counter()
    world_families = tuple(args.world_families.split(","))
    if args.family not in world_families:
        raise SystemExit(f"--family {args.family} must be one of --world-families {args.world_families}")
    data = build_data(out, args.family, args.prompts, args.seed, world_families)
    seconds.setdefault("data", round(time.perf_counter() - t0, 1))
    runs = {name: out / name for name in ("base", "solver", "reward")}
    common = [f"data.tokenizer={data['tokenizer']}", f"seed={args.seed}", f"model.num_layers={args.layers}"]
    steps = {
        "base": ("configs/align/toy_base.yaml", [f"data.sources=[{{path: '{data['corpus']}', weight: 1.0}}]", "steps=600"]),
        "solver": ("configs/align/toy_sft.yaml", [f"init_from={runs['base']}", f"stage.train={data['solver_sft']}",
                                                  "stage.epochs=1"]),
        "reward": ("configs/align/toy_reward.yaml", [f"init_from={runs['solver']}", f"stage.train={data['reward_train']}",
                                                     f"stage.validation={data['reward_val']}",
                                                     f"stage.preference_validation={data['pref_val']}"]),
    }
    for name, (config, overrides) in steps.items():
        if not (runs[name] / "DONE.json").is_file():
            seconds[name] = round(run_step(name, config, runs[name], [*overrides, *common], out / f"{name}.log"), 1)
            results_path.write_text(json.dumps(results, indent=1))

    lines = (runs["reward"] / "metrics.jsonl").read_text().splitlines()
    final = next(json.loads(x) for x in reversed(lines) if "val_pearson/reward" in x)
    results["family"] = args.family
    results["world_families"] = list(world_families)
    results["layers"] = args.layers
    results["reward_model"] = {"step": final["step"], **{k[4:]: v for k, v in final.items() if k.startswith("val_")}}
    results["held_out_records"] = sum(1 for _ in open(data["reward_val"]))
    results["training_records"] = 2 * args.prompts
    results["checks"] = {"reward_pearson_aggregate_above_0.8": bool(final["val_pearson/reward"] > 0.8)}
    results["paths"] = {"out": str(out), **{k: str(v) for k, v in runs.items()}}
    results_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
