"""Regenerate configs/data/: the example records the post-training stage configs train on.

    python scripts/make_stage_examples.py [--out configs/data] [--seed 0]

The records come from the toy world (nemojax.align.toy_world, task families with exact
verifiers), so every label is known by construction: SFT conversations are reference answers,
reward labels are HelpSteer2-style attributes computed from the response (correctness by the
verifier; training prompts get a right and a wrong response each, as HelpSteer2 gives a prompt
several), preference pairs are (reference answer, a wrong answer) with rewards 4 / 0.
Held-out files (`*_val.jsonl`, `sft_val.jsonl`) use the world's evaluation tasks, which no
training file contains in any form: the world's own files are drawn clean (nemojax.align.toy_world),
the reward and preference records made here are drawn again while they leak (nemojax.align.leaks:
the held-out prompt, a reordered twin, the same task in other words), and the written files are
audited (`leak_audit` in the printed counts; a hit stops the script). Deterministic: the same seed
writes the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemojax.align.leaks import LeakIndex, audit_files, eval_items_from_files  # noqa: E402
from nemojax.align.tasks import Task, make_task  # noqa: E402
from nemojax.align.toy_world import ToyWorldSpec, build_toy_world, preference_record, reward_record  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SPEC = ToyWorldSpec(pretrain_documents=10, seed_conversations=1000, eval_per_family=25, prompts_per_pool=400,
                    pools=1, reward_records=1000)
COUNTS = {"sft_general": 400, "reward_train": 600}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> int:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def make(out: Path, seed: int = 0) -> dict[str, int]:
    spec = ToyWorldSpec(**{**SPEC.__dict__, "seed": seed})
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        build_toy_world(w, spec)
        general = [r for r in _read(w / "seed/sft.jsonl") if r not in _read(w / "seed/code_sft.jsonl")]
        pool = [Task.from_json(t) for t in _read(w / "prompts/pool_1.jsonl")]
        rng = random.Random(seed)
        index = LeakIndex(eval_items_from_files([w / "eval/tasks.jsonl"]))
        rewards: list[dict] = []
        while len(rewards) < COUNTS["reward_train"]:
            task = make_task(spec.families[len(rewards) // 2 % len(spec.families)], rng, rng.choice(spec.train_levels))
            pair = [reward_record(task, rng, correct=True), reward_record(task, rng, correct=False)]
            if not index.task_leaks(task.prompt, task.answer) and not any(index.check_record(r) for r in pair):
                rewards += pair  # a wrong answer may be another task's right one: records are checked as written
        rng.shuffle(rewards)
        preferences = []
        for t in pool:
            rec = preference_record(t, rng)
            while index.check_record(rec):
                rec = preference_record(t, rng)
            preferences.append(rec)
        counts = {
            "sft_code.jsonl": _write(out / "sft_code.jsonl", _read(w / "seed/code_sft.jsonl")),
            "sft_general.jsonl": _write(out / "sft_general.jsonl", general[:COUNTS["sft_general"]]),
            "sft_val.jsonl": _write(out / "sft_val.jsonl", _read(w / "eval/sft.jsonl")),
            "reward_train.jsonl": _write(out / "reward_train.jsonl", rewards),
            "reward_val.jsonl": _write(out / "reward_val.jsonl", _read(w / "reward/val.jsonl")),
            "preference_train.jsonl": _write(out / "preference_train.jsonl", preferences),
            "preference_val.jsonl": _write(out / "preference_val.jsonl", _read(w / "reward/preference_val.jsonl")),
        }
    audit = audit_files(LeakIndex(eval_items_from_files([out / "sft_val.jsonl", out / "preference_val.jsonl"])),
                        [out / f"{n}.jsonl" for n in ("sft_code", "sft_general", "reward_train", "preference_train")])
    if audit["hits"]:
        raise SystemExit(f"leak audit of {out}: {audit['hits']} hits, e.g. {audit['examples'][:3]}")
    return {**counts, "leak_audit_hits": audit["hits"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "configs" / "data"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(json.dumps(make(Path(args.out), args.seed)))


if __name__ == "__main__":
    main()
