#!/usr/bin/env python
"""Every post-training stage on a CPU, measured: `python benchmarks/post_training_cpu.py [--out DIR]`.

The Nemotron-4 recipe on the tiny model and the toy world (nemojax.align.toy_world: task families
with exact verifiers, so every label is known by construction):

    base (--base, default runs/tiny: the quick start's pretraining run; trained here if missing)
      -> code SFT              configs/sft_code.yaml     world/seed/code_sft.jsonl
      -> general SFT           configs/sft_general.yaml  world/seed/sft.jsonl minus code, 2% code replay
      -> reward model          configs/reward.yaml       from general SFT; a right and a wrong response
                                                         for each of 1500 prompts; held out: world/reward/val.jsonl
      -> DPO                   configs/dpo.yaml          pairs on prompt pool 1 (chosen = reference answer)
      -> RPO x 3 rounds        configs/rpo.yaml          pairs on prompt pool 2, one third per round,
                                                         rewards scored by the reward model above

Every file a stage trains on is audited against the held-out tasks first (nemojax.align.leaks;
`leak_audit` in results.json, 0 hits or nothing trains). Each stage is the user's command (`python train.py configs/<stage>.yaml key=value ...`, a
subprocess, timed wall-clock including compilation); a rerun skips finished stages and resumes
an interrupted one. Then every language-model checkpoint (base, code SFT, general SFT, DPO, each
RPO round) is evaluated on the same held-out data with the same code
(nemojax.train.stages.evaluate_checkpoint with an SFT-kind config):

  * held-out assistant-token loss on the world's evaluation conversations (never trained on);
  * preference accuracy = fraction of held-out pairs (evaluation tasks; chosen = the correct
    answer, rejected = a wrong one) with log p(chosen) > log p(rejected), response log-probs
    summed over tokens (reference-free, so every model is on the same scale).

The reward model's numbers are its final validation metrics: Pearson r per attribute and of the
weighted reward (Nemotron-4-340B-Reward's weights) on held-out scored responses, and pairwise
accuracy on the held-out pairs. Prints one JSON object and writes it to <out>/results.json;
scripts/plot_alignment.py draws the figure of docs/ALIGNMENT.md from it.
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
sys.path.insert(0, str(REPO))

def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_data(out: Path, seed: int) -> dict[str, str]:
    """The toy world plus the DPO / RPO pair files; returns the paths the stages read. Every
    training record is checked against the held-out tasks (nemojax.align.leaks), and
    `leak_audit` below audits the files again."""
    from nemojax.align.leaks import EvalItem, LeakIndex
    from nemojax.align.tasks import Task, make_task
    from nemojax.align.toy_world import ToyWorldSpec, build_toy_world, preference_record, reward_record

    w = out / "world"
    spec = ToyWorldSpec(seed=seed, pretrain_documents=100, seed_conversations=2000, prompts_per_pool=1000, pools=2,
                        reward_records=3000)
    build_toy_world(w, spec)
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines() if x.strip()]  # noqa: E731
    index = LeakIndex([EvalItem(t["prompt"], t["answer"]) for t in read(w / "eval/tasks.jsonl")])
    clean = lambda r: not index.check_record(r)  # noqa: E731  (a wrong answer may be another task's answer)
    code = read(w / "seed/code_sft.jsonl")
    general = [r for r in read(w / "seed/sft.jsonl") if r not in code]
    rng = random.Random(seed)
    pool1 = [r for r in (preference_record(Task.from_json(t), rng) for t in read(w / "prompts/pool_1.jsonl")) if clean(r)]
    pool2 = [r for r in (preference_record(Task.from_json(t), rng) for t in read(w / "prompts/pool_2.jsonl")) if clean(r)]
    # Reward training records as HelpSteer2 has them, several responses per prompt: here one right
    # and one wrong response for each of 1500 training prompts (never a held-out task in any form).
    # The held-out records are the world's own reward/val.jsonl (one response per held-out task).
    reward_rows, fams = [], list(spec.families)
    while len(reward_rows) < 3000:
        task = make_task(fams[len(reward_rows) // 2 % len(fams)], rng, rng.choice(spec.train_levels))
        pair = [reward_record(task, rng, correct=True), reward_record(task, rng, correct=False)]
        if not index.task_leaks(task.prompt, task.answer) and all(map(clean, pair)):
            reward_rows += pair
    rng.shuffle(reward_rows)
    d = out / "data"
    third = len(pool2) // 3
    return {
        "eval_tasks": str(w / "eval/tasks.jsonl"),
        "corpus": str(w / "pretrain/corpus.jsonl"),
        "code_sft": str(w / "seed/code_sft.jsonl"),
        "general_sft": str(_jsonl(d / "general_sft.jsonl", general)),
        "sft_val": str(w / "eval/sft.jsonl"),
        "reward_train": str(_jsonl(d / "reward_train.jsonl", reward_rows)),
        "reward_val": str(w / "reward/val.jsonl"),
        "pref_val": str(w / "reward/preference_val.jsonl"),
        "dpo_train": str(_jsonl(d / "dpo_pairs.jsonl", pool1)),
        **{f"rpo_round_{r + 1}": str(_jsonl(d / f"rpo_pairs_{r + 1}.jsonl", pool2[r * third:(r + 1) * third]))
           for r in range(3)},
    }


TRAINING_FILES = ("code_sft", "general_sft", "reward_train", "dpo_train", "rpo_round_1", "rpo_round_2", "rpo_round_3")


def leak_audit(data: dict[str, str]) -> dict:
    """Every file a stage trains on against the held-out tasks (the base's corpus is runs/tiny's,
    not the world's)."""
    from nemojax.align.leaks import LeakIndex, audit_files, eval_items_from_files

    index = LeakIndex(eval_items_from_files([data["eval_tasks"]]))
    report = audit_files(index, [data[k] for k in TRAINING_FILES])
    return {k: v for k, v in report.items() if k != "examples"} | {"examples": report["examples"][:3]}


def stage_overrides(name: str, data: dict[str, str], runs: dict[str, Path], base: str) -> list[str]:
    """The command-line overrides that point a shipped stage config at the toy world."""
    val_pairs = f"stage.preference_validation={data['pref_val']}"
    return {
        "reward": [f"init_from={runs['sft_general']}", f"stage.train={data['reward_train']}", f"stage.validation={data['reward_val']}",
                   val_pairs],
        "sft_code": [f"init_from={base}", f"stage.train={data['code_sft']}", f"stage.validation={data['sft_val']}"],
        "sft_general": [f"init_from={runs['sft_code']}", f"stage.train={data['general_sft']}",
                        f"stage.replay={data['code_sft']}", f"stage.validation={data['sft_val']}", val_pairs],
        "dpo": [f"init_from={runs['sft_general']}", f"stage.train={data['dpo_train']}",
                f"stage.validation={data['pref_val']}"],
        "rpo": [f"init_from={runs['dpo']}", f"stage.validation={data['pref_val']}",
                "stage.round_train=[" + ",".join(data[f"rpo_round_{r}"] for r in (1, 2, 3)) + "]",
                f"stage.reward_model={runs['reward']}"],
    }[name]


def finished(run_dir: Path) -> bool:
    rounds = sorted(run_dir.glob("round_*"))
    if rounds:
        return all((r / "COMPLETED").is_file() for r in rounds) and len(rounds) == 3
    return (run_dir / "DONE.json").is_file()


def run_stage(name: str, run_dir: Path, overrides: list[str], extra: list[str], log: Path) -> float:
    """`python train.py configs/<name>.yaml ...` as a subprocess; returns its wall-clock seconds."""
    cmd = [sys.executable, str(REPO / "train.py"), f"configs/{name}.yaml", f"run_dir={run_dir}", *overrides, *extra]
    print(f"[post_training] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log.open("a") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"stage {name} failed (exit {proc.returncode}); see {log}")
    if name != "rpo":
        (run_dir / "DONE.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def last_metrics(run_dir: Path) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/post_training", help="where the world, runs and results go")
    p.add_argument("--base", default="runs/tiny", help="the base checkpoint (trained with configs/tiny.yaml if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="an extra override for one stage, e.g. reward:stage.epochs=4 (repeatable)")
    args = p.parse_args(argv)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    extra: dict[str, list[str]] = {}
    for item in args.set:
        stage, _, kv = item.partition(":")
        extra.setdefault(stage, []).append(kv)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    timings = results.setdefault("seconds", {})

    t0 = time.perf_counter()
    data = build_data(out, args.seed)
    timings["toy_world"] = timings.get("toy_world", round(time.perf_counter() - t0, 1))
    results["leak_audit"] = leak_audit(data)
    if results["leak_audit"]["hits"]:
        results_path.write_text(json.dumps(results, indent=1))
        raise SystemExit(f"leak audit: held-out tasks in training files: {results['leak_audit']['examples']}")
    base = Path(args.base).absolute()
    if not (base / "checkpoints").is_dir() and not (base / "params").is_dir():
        timings["base"] = round(run_stage("tiny", base, [], extra.get("base", []), out / "base.log"), 1)
    runs = {name: out / name for name in ("sft_code", "sft_general", "reward", "dpo", "rpo")}
    for name, rd in runs.items():
        if finished(rd):
            continue
        timings[name] = round(run_stage(name, rd, stage_overrides(name, data, runs, str(base)), extra.get(name, []),
                                        out / f"{name}.log"), 1)
        results_path.write_text(json.dumps(results, indent=1))

    from nemojax.config import load_config
    from nemojax.train.stages import evaluate_checkpoint

    eval_cfg = load_config("configs/sft_general.yaml", [f"stage.validation={data['sft_val']}",
                                                        f"stage.preference_validation={data['pref_val']}",
                                                        "stage.train=" + data["general_sft"], "stage.replay=",
                                                        f"run_dir={out / 'eval'}", "eval_batches=1000"])
    checkpoints = {"base": base, "sft_code": runs["sft_code"], "sft_general": runs["sft_general"], "dpo": runs["dpo"],
                   **{f"rpo_round_{r}": runs["rpo"] / f"round_{r}" for r in (1, 2, 3)}}
    evals = results.setdefault("held_out", {})
    for name, ckpt in checkpoints.items():
        if name not in evals:
            t1 = time.perf_counter()
            m = evaluate_checkpoint(eval_cfg, str(ckpt))
            evals[name] = {"assistant_token_loss": m["val_loss"], "preference_accuracy": m["val_pref_accuracy"],
                           "eval_seconds": round(time.perf_counter() - t1, 1)}
            results_path.write_text(json.dumps(results, indent=1))
    rm = last_metrics(runs["reward"])
    results["reward_model"] = {k[4:]: v for k, v in rm.items() if k.startswith("val_")}
    results["stage_final_metrics"] = {name: {k: v for k, v in last_metrics(rd).items()
                                             if k in ("step", "loss", "val_loss", "val_accuracy", "val_margin",
                                                      "val_pref_accuracy", "accuracy", "margin")}
                                      for name, rd in runs.items() if name != "rpo"}
    results["stage_final_metrics"].update({f"rpo_round_{r}": last_metrics(runs["rpo"] / f"round_{r}") for r in (1, 2, 3)})
    pearson = results["reward_model"].get("pearson/reward", float("nan"))
    h = evals
    results["checks"] = {
        "reward_pearson_aggregate_above_0.8": bool(pearson > 0.8),
        "sft_lowers_held_out_assistant_loss": h["sft_general"]["assistant_token_loss"] < h["base"]["assistant_token_loss"],
        "dpo_raises_preference_accuracy_above_sft": h["dpo"]["preference_accuracy"] > h["sft_general"]["preference_accuracy"],
        "rpo_raises_preference_accuracy_above_sft": h["rpo_round_3"]["preference_accuracy"]
        > h["sft_general"]["preference_accuracy"],
    }
    results["paths"] = {"out": str(out), "base": str(base), **{k: str(v) for k, v in runs.items()}}
    results["command"] = " ".join(["python", "benchmarks/post_training_cpu.py", *(argv if argv is not None else sys.argv[1:])])
    results["seed"] = args.seed
    results["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip()
    results_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
