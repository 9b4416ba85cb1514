#!/usr/bin/env python
"""What each shipped post-training stage config reaches from runs/tiny on the example records of
configs/data/ (the numbers each config states in its header):

    python benchmarks/stage_configs_cpu.py --json docs/results/stage_configs_from_tiny.json

Runs, from the repository root, the user's commands `python train.py configs/<stage>.yaml` for
sft_code, sft_general, reward, dpo and rpo (3 rounds), in that order (each config's init_from
chains them; runs/tiny is trained first with configs/tiny.yaml if it is missing), skipping a stage
whose run already finished. Then records each stage's final metrics and wall-clock seconds, the
held-out assistant-token loss and preference accuracy of every language-model checkpoint on the
same data (nemojax.train.stages.evaluate_checkpoint with configs/sft_general.yaml), and the leak
audit of the example records against their held-out files (nemojax.align.leaks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STAGES = ("sft_code", "sft_general", "reward", "dpo", "rpo")


def finished(stage: str) -> bool:
    run = REPO / "runs" / stage
    if stage == "rpo":
        return all((run / f"round_{r}" / "COMPLETED").is_file() for r in (1, 2, 3))
    return (run / "metrics.jsonl").is_file() and any((run / "checkpoints").glob("*")) and \
        (run / "DONE.json").is_file()


def last_metrics(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return next((r for r in reversed(rows) if any(k.startswith("val_") for k in r)), rows[-1] if rows else {})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="", help="write the results here")
    args = p.parse_args(argv)
    from nemojax.align.leaks import LeakIndex, audit_files, eval_items_from_files

    seconds = {}
    if not (REPO / "runs/tiny/checkpoints").is_dir():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "train.py", "configs/tiny.yaml"], cwd=REPO, check=True)
        seconds["tiny"] = round(time.perf_counter() - t0)
    for stage in STAGES:
        if finished(stage):
            continue
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "train.py", f"configs/{stage}.yaml"], cwd=REPO, check=True)
        seconds[stage] = round(time.perf_counter() - t0)
        if stage != "rpo":
            (REPO / "runs" / stage / "DONE.json").write_text(json.dumps({"seconds": seconds[stage]}))
    runs = {"tiny": "runs/tiny", **{s: f"runs/{s}" for s in STAGES if s != "rpo"},
            **{f"rpo/round_{r}": f"runs/rpo/round_{r}" for r in (1, 2, 3)}}
    final = {name: last_metrics(REPO / path) for name, path in runs.items()}

    from nemojax.config import load_config
    from nemojax.train.stages import evaluate_checkpoint

    cfg = load_config("configs/sft_general.yaml", ["run_dir=runs/eval_stage_configs", "eval_batches=1000"])
    held = {"assistant_token_loss": {}, "preference_accuracy": {}}
    for name in ("tiny", "sft_code", "sft_general", "dpo", "rpo/round_3"):
        m = evaluate_checkpoint(cfg, str(REPO / runs[name]))
        held["assistant_token_loss"][name] = round(m["val_loss"], 4)
        held["preference_accuracy"][name] = round(m["val_pref_accuracy"], 4)
    data = REPO / "configs/data"
    items = eval_items_from_files([data / "sft_val.jsonl", data / "preference_val.jsonl"])
    audit = audit_files(LeakIndex(items), [data / f"{n}.jsonl" for n in ("sft_code", "sft_general", "reward_train",
                                                                        "preference_train")])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    out = {"commands": ["python train.py configs/tiny.yaml", *(f"python train.py configs/{s}.yaml" for s in STAGES)],
           "seed": 0, "commit": commit, "seconds": seconds, "final_validation_metrics": final,
           "same_held_out_data": {"how": "nemojax.train.stages.evaluate_checkpoint with configs/sft_general.yaml "
                                         "(configs/data/sft_val.jsonl; preference_val.jsonl)", **held},
           "example_records_leak_audit": {"eval_items": len(items), "hits": audit["hits"],
                                          "files": {str(Path(k).relative_to(REPO)): v["hits"]
                                                    for k, v in audit["files"].items()}}}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
