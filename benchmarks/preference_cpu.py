#!/usr/bin/env python
"""DPO and RPO measured where they matter: held-out task accuracy, from an align run's student.

    python benchmarks/preference_cpu.py --run runs/align-stats-s0 --iteration 1 --out runs/pref-s0-it1
    python benchmarks/preference_cpu.py ... --settings dpo,dpo_on_policy      # a subset

Starts from iteration k's general-SFT model of a finished `nemojax align` run (configs/align/
stats.yaml) and trains each preference setting from it (`python train.py <config> key=value ...`,
a subprocess), then evaluates it like the loop does (`nemojax eval`'s tasks and loss suites, per
task) and compares it with the general-SFT model on the same held-out tasks: per metric (all
tasks, each family, IFEval prompt-level strict) the difference with its paired bootstrap interval
and McNemar's p (nemojax.align.stats). Each stage also reports its held-out preference accuracy on
the world's evaluation pairs (log p(right answer) > log p(wrong answer)).

Settings (SETTINGS): the loop's own DPO and RPO on the iteration's pairs (chosen = a verified
answer of the weaker generator, rejected = one of its wrong answers: off-policy for the student);
a stronger push (learning rate 1e-3, three epochs); DPO without the SFT term; and the same on
on-policy pairs, which the student itself samples (8 per prompt at temperature 0.8) on the
iteration's prompt pool, judged by the strict verifier (`nemojax sdg run configs/align/toy_sdg.yaml`
with the student as generator). Every training file is leak-audited first (0 hits or nothing
trains; generated pairs holding an evaluation task are dropped and counted). Prints one JSON object,
also written to <out>/results.json; a rerun skips what is finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# name -> (training config, overrides, pairs: "off" = the iteration's SDG pairs, "on" = the student's own)
SETTINGS: dict[str, tuple[str, list[str], str]] = {
    "dpo": ("configs/align/toy_dpo.yaml", [], "off"),
    "rpo": ("configs/align/toy_rpo.yaml", [], "off"),
    "dpo_lr1e-3_3ep": ("configs/align/toy_dpo.yaml", ["optimizer.learning_rate=1e-3", "stage.epochs=3"], "off"),
    "dpo_no_sft": ("configs/align/toy_dpo.yaml", ["stage.sft_weight=0.0"], "off"),
    "dpo_on_policy": ("configs/align/toy_dpo.yaml", [], "on"),
    "rpo_on_policy": ("configs/align/toy_rpo.yaml", [], "on"),
    "dpo_on_policy_lr1e-3_3ep": ("configs/align/toy_dpo.yaml", ["optimizer.learning_rate=1e-3", "stage.epochs=3"], "on"),
}


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"failed (exit {proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def on_policy_pairs(run: Path, k: int, student: Path, out: Path, seed: int) -> tuple[Path, dict]:
    """The student's own samples on iteration k's pool, judged by the strict verifier; pairs holding
    an evaluation task dropped. Returns the pairs file and counts."""
    from nemojax.align.leaks import LeakIndex, eval_items_from_files

    sdg = out / "on_policy_sdg"
    done = sdg / "pairs.jsonl"
    if not done.is_file():
        w = run / "world"
        _run([sys.executable, "-m", "nemojax.cli", "sdg", "run", "configs/align/toy_sdg.yaml",
              f"clients.gen.checkpoint={student}", f"clients.gen.tokenizer={w / 'tokenizer/tokenizer.model'}",
              f"stages.pool.path={w / f'prompts/pool_{k}.jsonl'}", f"stages.prompts.eval_file={w / 'eval/tasks.jsonl'}",
              f"stages.seeds.path={w / 'seed/sft.jsonl'}", f"stages.code_seeds.path={w / 'seed/code_sft.jsonl'}",
              "stages.responses.n=8", f"run_dir={sdg}", f"seed={seed}"], out / "on_policy_sdg.log")
        index = LeakIndex(eval_items_from_files([w / "eval/tasks.jsonl"]))
        rows = [json.loads(x) for x in (sdg / "preference.jsonl").read_text().splitlines() if x.strip()]
        kept = [r for r in rows if not index.check_record(r)]
        done.write_text("".join(json.dumps(r) + "\n" for r in kept))
        (sdg / "pairs_counts.json").write_text(json.dumps({"pairs": len(rows), "leaked_dropped": len(rows) - len(kept)}))
    return done, json.loads((sdg / "pairs_counts.json").read_text())


def evaluate(ckpt: Path, world: Path, out_dir: Path) -> dict:
    """The loop's evaluation (tasks + loss suites) with per-task rows in out_dir/eval_rows.jsonl."""
    from nemojax.evaluation.runner import EvalSpec, evaluate_model

    rep = evaluate_model(EvalSpec(suites={"tasks": str(world / "eval/tasks.jsonl"), "loss": str(world / "eval/sft.jsonl")},
                                  checkpoint=str(ckpt), tokenizer=str(world / "tokenizer/tokenizer.model"),
                                  max_tokens=96, batch_slots=32, max_len=256))
    if not rep["complete"]:
        raise SystemExit(f"evaluation of {ckpt} incomplete: {rep['failed_requests']} failed request(s)")
    rows = rep.pop("rows", {})
    with (out_dir / "eval_rows.jsonl").open("w") as f:
        for suite, items in rows.items():
            for r in items:
                f.write(json.dumps({"suite": suite, **r}) + "\n")
    return rep


def preference_accuracy(world: Path, checkpoint: Path, out_dir: Path) -> dict:
    """Held-out preference accuracy (log p(right) > log p(wrong)) of a checkpoint on every pair of
    the world's preference_val.jsonl: one evaluation for the general-SFT model and every setting
    (a stage's own validation during training sees only its first eval_batches x batch pairs)."""
    from nemojax.config import load_config
    from nemojax.train.stages import evaluate_checkpoint

    pairs = world / "reward/preference_val.jsonl"
    cfg = load_config("configs/align/toy_sft.yaml", [f"stage.train={world / 'seed/sft.jsonl'}",
                                                      f"stage.validation={world / 'eval/sft.jsonl'}",
                                                      f"stage.preference_validation={pairs}",
                                                      f"data.tokenizer={world / 'tokenizer/tokenizer.model'}",
                                                      f"run_dir={out_dir}", "eval_batches=100000"])
    m = evaluate_checkpoint(cfg, str(checkpoint))
    return {"held_out_preference_accuracy": m["val_pref_accuracy"],
            "held_out_preference_pairs": sum(1 for x in pairs.read_text().splitlines() if x.strip())}


def _implicit_pairs(setting: str, held_out: int) -> int:
    """How many held-out pairs a setting's own end-of-training validation scored."""
    from nemojax.config import load_config

    config, overrides, _ = SETTINGS[setting]
    cfg = load_config(config, [*overrides, "stage.train=unused.jsonl"])  # the sizes, not the data
    return min(cfg.eval_batches * (cfg.data.micro_batch_size or cfg.data.global_batch_size), held_out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished nemojax align run (configs/align/stats.yaml)")
    p.add_argument("--iteration", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    args = p.parse_args(argv)
    from nemojax.align.leaks import LeakIndex, audit_files, eval_items_from_files
    from nemojax.align.report import eval_tasks, metric_vectors, task_results
    from nemojax.align.stats import compare

    run, k, out = Path(args.run).absolute(), args.iteration, Path(args.out).absolute()
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    world, student = run / "world", run / f"iter_{k}" / "general_sft"
    if not (student / "step.json").is_file():
        raise SystemExit(f"{student} is not a finished general-SFT step of an align run")
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.update({"run": str(run), "iteration": k, "student": str(student), "command": " ".join(sys.argv)})
    seed = json.loads((run / "align_config.json").read_text())["seed"]
    pairs = {"off": run / f"iter_{k}" / "sdg" / "preference.jsonl"}
    if any(SETTINGS[s][2] == "on" for s in names):
        pairs["on"], results["on_policy_pairs"] = on_policy_pairs(run, k, student, out, seed * 1000 + 100 + k)
    results["held_out_pairs"] = sum(1 for x in (world / "reward/preference_val.jsonl").read_text().splitlines()
                                    if x.strip())
    results["pairs"] = {kind: sum(1 for x in path.read_text().splitlines() if x.strip()) for kind, path in pairs.items()}
    index = LeakIndex(eval_items_from_files([world / "eval/tasks.jsonl"]))
    audit = audit_files(index, list(pairs.values()))
    results["leak_audit"] = {"hits": audit["hits"], "files": {f: v["hits"] for f, v in audit["files"].items()}}
    if audit["hits"]:
        results_path.write_text(json.dumps(results, indent=1))
        raise SystemExit(f"leak audit: {audit['examples'][:3]}")
    tasks = eval_tasks(world)
    base_rows = task_results(student / "eval_rows.jsonl", tasks)
    settings = results.setdefault("settings", {})
    for name in names:
        if name in settings:
            if "held_out_preference_pairs" not in settings[name]:  # a run made before every pair was scored
                settings[name].update(preference_accuracy(world, out / name, out / name / "preference_eval"),
                                      implicit_reward_pairs=_implicit_pairs(name, results["held_out_pairs"]))
                results_path.write_text(json.dumps(results, indent=1))
            continue
        config, overrides, kind = SETTINGS[name]
        rd = out / name
        rd.mkdir(parents=True, exist_ok=True)
        seconds = _run([sys.executable, "-m", "nemojax.cli", "train", config, f"init_from={student}",
                        f"stage.train={pairs[kind]}", f"stage.validation={world / 'reward/preference_val.jsonl'}",
                        "eval_every=100000", f"data.tokenizer={world / 'tokenizer/tokenizer.model'}", f"seed={seed}",
                        f"run_dir={rd}", *overrides], out / f"{name}.log")
        final = json.loads((rd / "metrics.jsonl").read_text().splitlines()[-1])
        rep = evaluate(rd, world, rd)
        vec = metric_vectors(task_results(rd / "eval_rows.jsonl", tasks), base_rows)
        settings[name] = {"config": config, "overrides": overrides, "pairs": kind, "train_seconds": round(seconds, 1),
                          "score": rep["score"], "loss": rep["suites"]["loss"]["score"],
                          **preference_accuracy(world, rd, rd / "preference_eval"),
                          # the stage's own validation at the end of training: its first pairs only
                          "held_out_implicit_reward_accuracy": final.get("val_accuracy"),
                          "implicit_reward_pairs": _implicit_pairs(name, results["held_out_pairs"]),
                          "vs_general_sft": {m: compare([v]) for m, v in vec.items()}}
        print(f"[preference] {name}: score {rep['score']:.3f}, held-out preference accuracy "
              f"{settings[name]['held_out_preference_accuracy']}", file=sys.stderr, flush=True)
        results_path.write_text(json.dumps(results, indent=1))
    if "held_out_preference_pairs" not in results.get("general_sft", {}):
        results["general_sft"] = {"score": json.loads((student / "step.json").read_text())["eval"]["score"],
                                  **preference_accuracy(world, student, out / "general_sft_eval")}
    results_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
