#!/usr/bin/env python
"""The reward model on a task family its base can solve, measured on a CPU:
`python benchmarks/reward_model_cpu.py [--out DIR] [--family lists]` (validation), then once, with
the recipe frozen, `python benchmarks/reward_model_cpu.py --out DIR --test` (the test split).

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

Held out: --validation + --test evaluation tasks of --family, all distinct (no two are the same
task with the items in another order), split into a validation half and a test half. No training
file holds any of them in any form: the world leaves them out of its corpus, conversations and
records (nemojax.align.leaks), the reward records are filtered the same way, and the leak audit
runs over every file a step trains on before it starts (counted in results.json; a hit stops the
benchmark). Each held-out task gets one response, right or wrong with equal chance, and a
preference pair.

Validation (what a recipe is chosen on): the reward run's held-out metrics every `eval_every`
steps, on the validation split. Test (what is reported): with `--test`, the final reward model on
the test split, computed once: results.json records it with the recipe (every argument and the
configs' contents, hashed) and the commit; a second `--test` on the same results refuses, and
a run whose recipe differs from the one recorded refuses to continue. Prints one JSON object
(also <out>/results.json). `python scripts/plot_alignment.py <out>` draws the validation r
against step (and the test r, once computed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CONFIGS = ("configs/align/toy_model.yaml", "configs/align/toy_base.yaml", "configs/align/toy_sft.yaml",
           "configs/align/toy_reward.yaml")


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def build_data(out: Path, family: str, prompts: int, seed: int, validation: int = 150, test: int = 150,
               world_families: tuple[str, ...] = ("strings", "lists", "code", "format"),
               solver_conversations: int = 16000, pretrain_documents: int = 12000,
               others_held_out: int = 60) -> dict[str, str]:
    """The toy world plus the reward model's training records and the held-out validation and
    test splits (of `family`); every other family keeps `others_held_out` evaluation tasks."""
    from nemojax.align.leaks import EvalItem, LeakIndex
    from nemojax.align.tasks import Task, make_task
    from nemojax.align.toy_world import ToyWorldSpec, build_toy_world, preference_record, reward_record

    w = out / "world"
    counts = {f: (validation + test if f == family else others_held_out) for f in world_families}
    spec = ToyWorldSpec(seed=seed, families=world_families, train_levels=(1, 2), eval_levels=(1, 2),
                        pretrain_documents=pretrain_documents, seed_conversations=solver_conversations,
                        eval_counts=counts, eval_share=0.5, prompts_per_pool=10, pools=1, reward_records=10)
    manifest = build_toy_world(w, spec)
    evals = [Task.from_json(json.loads(x)) for x in (w / "eval/tasks.jsonl").read_text().splitlines()]
    index = LeakIndex([EvalItem(t.prompt, t.answer, "eval") for t in evals])
    held = [t for t in evals if t.family == family]
    random.Random(seed).shuffle(held)
    splits = {"validation": held[:validation], "test": held[validation:validation + test]}
    rng = random.Random(seed)
    train: list[dict] = []
    while len(train) < 2 * prompts:  # HelpSteer2 gives each prompt several rated responses
        task = make_task(family, rng, rng.choice(spec.train_levels))
        pair = [reward_record(task, rng, correct=True), reward_record(task, rng, correct=False)]
        if not any(index.check_record(r) for r in pair):  # the task, or a wrong answer that is another task's
            train += pair
    data = {"tokenizer": manifest["tokenizer"], "corpus": str(w / "pretrain/corpus.jsonl"),
            "solver_sft": str(w / "seed/sft.jsonl"), "eval_tasks": str(w / "eval/tasks.jsonl"),
            "reward_train": _jsonl(out / "data/reward_train.jsonl", train)}
    for name, tasks in splits.items():
        data[f"reward_{name}"] = _jsonl(out / f"data/reward_{name}.jsonl", [reward_record(t, rng) for t in tasks])
        data[f"pref_{name}"] = _jsonl(out / f"data/preference_{name}.jsonl", [preference_record(t, rng) for t in tasks])
    return data


def leak_audit(data: dict[str, str]) -> dict:
    """Every training file against every evaluation task of the world (both splits included)."""
    from nemojax.align.leaks import LeakIndex, audit_files, eval_items_from_files

    index = LeakIndex(eval_items_from_files([data["eval_tasks"]]))
    return audit_files(index, [data["corpus"], data["solver_sft"], data["reward_train"]])


def recipe(args: argparse.Namespace) -> dict:
    """What decides the result: every argument but where it goes, and the configs' contents."""
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "test")}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for c in CONFIGS:
        h.update((REPO / c).read_bytes())
    return {"settings": settings, "configs": list(CONFIGS), "fingerprint": h.hexdigest()[:16]}


def commit() -> str:
    """The repository commit, `+dirty` when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


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


def validation_curve(run_dir: Path) -> list[dict]:
    """The reward run's held-out (validation split) metrics at every evaluation step."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [{"step": r["step"], **{k[4:]: v for k, v in r.items() if k.startswith("val_")}}
            for r in rows if "val_pearson/reward" in r]


def test_metrics(reward_run: Path, data: dict[str, str], common: list[str]) -> dict:
    """The final reward model's held-out metrics on the test split (same code as validation)."""
    from nemojax.config import load_config
    from nemojax.train.stages import evaluate_checkpoint

    cfg = load_config(str(REPO / "configs/align/toy_reward.yaml"),
                      [f"stage.train={data['reward_train']}", f"stage.validation={data['reward_test']}",
                       f"stage.preference_validation={data['pref_test']}", f"run_dir={reward_run.parent / 'test_eval'}",
                       "eval_batches=1000", *common])
    return {k[4:]: v for k, v in evaluate_checkpoint(cfg, str(reward_run)).items() if k.startswith("val_")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/reward_model_cpu", help="where the world, runs and results go")
    p.add_argument("--family", default="lists", help="the toy world's task family to judge")
    p.add_argument("--prompts", type=int, default=6000, help="training prompts (one right, one wrong response each)")
    p.add_argument("--validation", type=int, default=150, help="held-out tasks of the validation split")
    p.add_argument("--test-size", type=int, default=150, help="held-out tasks of the test split")
    p.add_argument("--world-families", default="strings,lists,code,format",
                   help="the families the base and the solver learn (the solver's reference conversations)")
    p.add_argument("--layers", type=int, default=4,
                   help="transformer layers of every step's model (checking an answer takes the layers that "
                        "compute it plus those that compare)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test", action="store_true",
                   help="compute the test split's metrics, once, for the finished run (the recipe is then frozen)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    rec = recipe(args)
    if results.get("recipe", rec)["fingerprint"] != rec["fingerprint"]:
        print(f"reward_model_cpu: {out} was run with another recipe ({results['recipe']['settings']}, configs "
              f"fingerprint {results['recipe']['fingerprint']}); use a new --out", file=sys.stderr)
        return 2
    if args.test and "test" in results:
        print(f"reward_model_cpu: the test split was already used for this run (commit {results['test']['commit']}): "
              f"{json.dumps(results['test'])}; a test split is measured once", file=sys.stderr)
        return 2
    results["recipe"] = rec
    results.setdefault("commit", commit())
    seconds = results.setdefault("seconds", {})

    world_families = tuple(args.world_families.split(","))
    if args.family not in world_families:
        raise SystemExit(f"--family {args.family} must be one of --world-families {args.world_families}")
    t0 = time.perf_counter()
    data = build_data(out, args.family, args.prompts, args.seed, args.validation, args.test_size, world_families)
    seconds.setdefault("data", round(time.perf_counter() - t0, 1))
    if "leak_audit" not in results:
        audit = leak_audit(data)
        results["leak_audit"] = {k: v for k, v in audit.items() if k != "examples"}
        if audit["hits"]:
            results_path.write_text(json.dumps(results, indent=1))
            raise SystemExit(f"leak audit: {audit['hits']} hits of held-out tasks in training files, e.g. "
                             f"{audit['examples'][:3]}; nothing trained")
    runs = {name: out / name for name in ("base", "solver", "reward")}
    common = [f"data.tokenizer={data['tokenizer']}", f"seed={args.seed}", f"model.num_layers={args.layers}"]
    steps = {
        "base": ("configs/align/toy_base.yaml", [f"data.sources=[{{path: '{data['corpus']}', weight: 1.0}}]", "steps=600"]),
        "solver": ("configs/align/toy_sft.yaml", [f"init_from={runs['base']}", f"stage.train={data['solver_sft']}",
                                                  "stage.epochs=1"]),
        "reward": ("configs/align/toy_reward.yaml", [f"init_from={runs['solver']}", f"stage.train={data['reward_train']}",
                                                     f"stage.validation={data['reward_validation']}",
                                                     f"stage.preference_validation={data['pref_validation']}"]),
    }
    for name, (config, overrides) in steps.items():
        if not (runs[name] / "DONE.json").is_file():
            results_path.write_text(json.dumps(results, indent=1))
            seconds[name] = round(run_step(name, config, runs[name], [*overrides, *common], out / f"{name}.log"), 1)
            results_path.write_text(json.dumps(results, indent=1))

    curve = validation_curve(runs["reward"])
    results.update({"family": args.family, "world_families": list(world_families), "layers": args.layers,
                    "validation_curve": curve, "validation": curve[-1] if curve else None,
                    "held_out_records": {"validation": args.validation, "test": args.test_size},
                    "training_records": 2 * args.prompts,
                    "paths": {"out": str(out), **{k: str(v) for k, v in runs.items()}}})
    if args.test:
        t1 = time.perf_counter()
        results["test"] = {**test_metrics(runs["reward"], data, common), "recipe_fingerprint": rec["fingerprint"],
                           "commit": commit(), "seconds": round(time.perf_counter() - t1, 1)}
    results_path.write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "validation_curve"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
