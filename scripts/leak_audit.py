#!/usr/bin/env python
"""Is a toy world leak-free, and what does SDG decontamination keep of its prompt pools?

    python scripts/leak_audit.py --world runs/world-s0 [--config configs/align/toy.yaml] [--json out.json]

Builds the world of the align config's `world.spec` into --world if it is not there (an existing
world, e.g. one written by an older nemojax, is audited as it is), then prints one JSON object:

  audit           the leak audit (nemojax.align.leaks) of every training file of the world (corpus,
                  seed conversations, prompt pools, reward records) against its evaluation tasks:
                  hits per file and check, and how many distinct evaluation tasks leak
  decontamination per prompt pool and family, what the SDG dedup stage of configs/align/toy_sdg.yaml
                  keeps (exact duplicates and contamination dropped, by reason), and what the
                  former rule (any shared 13-gram, or a short evaluation text found whole, then the
                  same exact dedup) kept
  injected        every evaluation prompt put into a pool as it is, upper-cased with its punctuation
                  changed, and (lists) with its numbers reversed: how many the decontamination drops
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemojax.align.config import load_align_config  # noqa: E402
from nemojax.align.leaks import LeakIndex, audit_files, eval_items_from_files  # noqa: E402
from nemojax.sdg.dedup import Decontaminator, counts_by_group, dedup_verdicts, ngrams, normalise  # noqa: E402

TRAINING = ("pretrain/corpus.jsonl", "seed/sft.jsonl", "seed/code_sft.jsonl", "reward/train.jsonl")


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


class FormerRule:
    """The decontamination this project had before: any shared n-gram with an evaluation text, or
    an evaluation text shorter than n words found whole (normalised), drops a prompt."""

    def __init__(self, evals: list[str], n: int = 13) -> None:
        self.n, self.grams, self.short = n, set(), []
        for e in evals:
            w = self._words(e)
            if len(w) >= n:
                self.grams |= ngrams(w, n)
            elif w:
                self.short.append(" " + " ".join(w) + " ")

    @staticmethod
    def _words(text: str) -> list[str]:
        return normalise(text).split()  # lowercased, every punctuation mark (and + - =) a space

    def contaminated(self, text: str) -> str | None:
        w = self._words(text)
        padded = " " + " ".join(w) + " "
        hit = (len(w) >= self.n and not self.grams.isdisjoint(ngrams(w, self.n))) or any(s in padded for s in self.short)
        return "contaminated" if hit else None


def decontaminator(evals: list[str], pool: list[str], spec: dict) -> Decontaminator:
    return Decontaminator(evals, n=spec.get("ngram", 13), template_fraction=spec.get("template_fraction", 0.01),
                          overlap=spec.get("overlap", 0.8), span=spec.get("span", 8)).fit_templates(pool)


def twin(prompt: str) -> str | None:
    """A lists prompt with its numbers in reverse order (None when that changes nothing)."""
    head, sep, tail = prompt.rpartition("of " if "number of" in prompt else ": ")
    end = tail[-1] if tail and tail[-1] in ".?" else ""
    nums = tail.rstrip(".?").split(", ")
    if not sep or len(set(nums)) < 2 or not all(x.isdigit() for x in nums):
        return None
    return head + sep + ", ".join(reversed(nums)) + end


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", required=True, help="the world directory (built here from --config if missing)")
    p.add_argument("--config", default="configs/align/toy.yaml", help="align config whose world.spec to build")
    p.add_argument("--sdg", default="configs/align/toy_sdg.yaml", help="SDG pipeline whose `prompts` dedup stage to apply")
    p.add_argument("--json", default="", help="also write the report here")
    args = p.parse_args(argv)
    world = Path(args.world)
    if not (world / "manifest.json").is_file():
        from nemojax.align.toy_world import ToyWorldSpec, build_toy_world

        spec = load_align_config(args.config).world.spec
        build_toy_world(world, ToyWorldSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}))
    import yaml

    dd = yaml.safe_load(Path(args.sdg).read_text())["stages"]["prompts"]
    evals = _rows(world / "eval/tasks.jsonl")
    eval_prompts = [e["prompt"] for e in evals]
    pools = sorted((world / "prompts").glob("pool_*.jsonl"))
    audit = audit_files(LeakIndex(eval_items_from_files([world / "eval/tasks.jsonl"])),
                        [world / f for f in TRAINING] + pools)
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    report = {"command": "python scripts/leak_audit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "commit": head + ("+dirty" if dirty else ""), "world": str(world), "manifest_spec": json.loads((world / "manifest.json").read_text())["spec"],
              "eval_tasks": len(evals), "eval_distinct_prompts": len(set(eval_prompts)),
              "audit": {k: v for k, v in audit.items() if k != "examples"} | {"examples": audit["examples"][:5]},
              "decontamination": {}}
    for pool_path in pools:
        pool = _rows(pool_path)
        texts, fams = [r["prompt"] for r in pool], [r["family"] for r in pool]
        verdicts = dedup_verdicts(texts, decontaminate=decontaminator(eval_prompts, texts, dd), exact=dd.get("exact", True),
                                  near=dd.get("near", True))
        former = dedup_verdicts(texts, decontaminate=FormerRule(eval_prompts), exact=dd.get("exact", True),
                                near=dd.get("near", True))
        by = counts_by_group(fams, verdicts)
        for fam, entry in counts_by_group(fams, former).items():
            by[fam]["former_rule"] = {"kept": entry["kept"], "dropped": entry["dropped"]}
        report["decontamination"][pool_path.name] = by
    pool = [r["prompt"] for r in _rows(pools[0])] if pools else []
    injected = {"as_is": eval_prompts, "upper_case_punctuation": [e.upper().replace(".", " !").replace("?", " ?!")
                                                                  for e in eval_prompts],
                "reordered_lists": [t for t in map(twin, eval_prompts) if t]}
    report["injected"] = {}
    for kind, texts in injected.items():
        d = decontaminator(eval_prompts, pool + texts, dd)
        verdicts = dedup_verdicts(pool + texts, decontaminate=d, exact=False, near=False)[len(pool):]
        report["injected"][kind] = {"injected": len(texts), "dropped": sum(v is not None for v in verdicts),
                                    "by_reason": dict(collections.Counter(v for v in verdicts if v))}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
