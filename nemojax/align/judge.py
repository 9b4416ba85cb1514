"""The paper's judge in the loop: a reward model trained each iteration picks the SDG data
(config `judge.kind: reward_model`), and the oracle verifier only measures how well it picked.

Nemotron-4 filtered its synthetic data with Nemotron-4-340B-Reward, a regression reward model
trained from the base model on HelpSteer2's human-scored responses. Here, per iteration:

1. `train_judge`: the judge stage (e.g. configs/align/toy_reward.yaml on the world's
   reward/train.jsonl, HelpSteer2-style scored responses standing in for human annotation) trains
   a reward model from the iteration's base (or its generator); its pairwise accuracy on the
   held-out preference pairs (reward/preference_val.jsonl, the evaluation tasks) is recorded.
2. The SDG pipeline `judge.sdg_config` scores every sampled response with it: a `reward_filter`
   keeps responses at or above its threshold (one per prompt) as SFT data, and `preference`
   with `judge: reward` pairs the best and worst scored responses. No verifier runs.
3. `judge_audit`: every response the judge saw is rescored with it and checked by the oracle
   (the strict verifier the verifier pipeline filters with, and final-answer matching); the
   audit reports the keep decisions' precision, recall and accuracy, the ranking's AUC, and the
   correctness of the SFT answers and preference pairs the iteration then trains on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from nemojax.align.config import IterationConfig
    from nemojax.align.loop import AlignLoop


def train_judge(loop: "AlignLoop", k: int, it: "IterationConfig", gen: dict[str, Any],
                bases: dict[str, dict[str, Any]], fill: dict[str, Any]) -> dict[str, Any]:
    """Iteration k's reward model (trained unless finished with the same fingerprint), with its
    held-out pairwise accuracy under "judge_eval"."""
    cfg = loop.cfg
    j = cfg.judge
    if j.init == "base":
        init, arch = loop.base_checkpoint(it.base, bases), loop.architecture(it.base)
    else:
        init, arch = gen, loop.generator_architecture(k)
    st = cfg.stages[j.stage]
    step_dir = Path(fill["iter_dir"]) / "reward_model"
    rec = loop._train_step(f"iteration {k} reward model", step_dir, st.config, [*arch, *st.overrides], init,
                           evaluate=False, **fill)
    if loop._dry or "judge_eval" in rec:
        return rec
    pairs = loop.world / "reward" / "preference_val.jsonl"
    if pairs.is_file():
        rec["judge_eval"] = pairwise_accuracy(Path(rec["checkpoint"]), loop.tokenizer, pairs)
        loop.log(f"[align] iteration {k} reward model: held-out pairwise accuracy "
                 f"{rec['judge_eval']['accuracy']:.3f} ({rec['judge_eval']['n']} pairs)")
        from nemojax.align.loop import _write_json

        _write_json(step_dir / "step.json", rec)
    return rec


def _scorer(checkpoint: Path, tokenizer: str) -> Any:
    from nemojax.inference.reward import RewardScorer

    return RewardScorer.from_checkpoint(checkpoint, tokenizer=tokenizer or None, batch_size=32, max_len=256)


def pairwise_accuracy(checkpoint: Path, tokenizer: str, pairs_file: Path) -> dict[str, Any]:
    """Share of preference pairs whose chosen response the reward model scores above the rejected."""
    pairs = [json.loads(x) for x in pairs_file.read_text().splitlines() if x.strip()]
    scorer = _scorer(checkpoint, tokenizer)
    conv = lambda p, r: [{"role": "user", "content": p}, {"role": "assistant", "content": r}]  # noqa: E731
    chosen = scorer.score([conv(p["prompt"], p["chosen"]) for p in pairs])
    rejected = scorer.score([conv(p["prompt"], p["rejected"]) for p in pairs])
    right = [c["reward"] > r["reward"] for c, r in zip(chosen, rejected)]
    return {"accuracy": sum(right) / len(right) if right else 0.0, "n": len(right), "file": str(pairs_file)}


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half): the
    Mann-Whitney statistic. None without both classes."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def judge_audit(sdg_dir: Path, checkpoint: Path, tokenizer: str, pipeline: Any) -> dict[str, Any]:
    """How well the reward model picked iteration data (module docstring, 3). `pipeline`: the SDG
    run's resolved PipelineConfig (its reward_filter stage's threshold and input are read)."""
    from nemojax.align.tasks import Task, verify_record, verify_record_strict

    filters = [(name, st) for name, st in pipeline.stages.items() if getattr(st, "kind", "") == "reward_filter"]
    if not filters:
        raise ValueError("judge audit: the judge's SDG pipeline has no reward_filter stage")
    _, filt = filters[0]
    source = sdg_dir / f"{filt.input or 'responses'}.jsonl"
    items = [json.loads(x) for x in source.read_text().splitlines() if x.strip()]
    rows: list[dict[str, Any]] = []
    convs = []
    for item in items:
        responses = [r for r in item.get("responses", []) if r.get("messages")]
        texts = [r["messages"][-1]["content"] for r in responses]
        strict = verify_record_strict(item, texts) if texts else []
        final = verify_record(item, texts) if texts else []
        for r, text, s, f in zip(responses, texts, strict, final):
            rows.append({"prompt": item["prompt"], "family": item.get("family", "?"), "text": text, "strict": s,
                         "final": f})
            convs.append(r["messages"])
    rewards = [x["reward"] for x in _scorer(checkpoint, tokenizer).score(convs)] if convs else []
    kept = [r >= filt.threshold for r in rewards]
    strict = [r["strict"] for r in rows]
    n_kept, n_right = sum(kept), sum(strict)
    tp = sum(k and s for k, s in zip(kept, strict))
    families: dict[str, dict[str, Any]] = {}
    for fam in sorted({r["family"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["family"] == fam]
        fk = [i for i in idx if kept[i]]
        families[fam] = {"responses": len(idx), "correct": sum(strict[i] for i in idx), "kept": len(fk),
                         "precision": _ratio(sum(strict[i] for i in fk), len(fk)),
                         "auc": auc([rewards[i] for i in idx], [strict[i] for i in idx])}
    # what the iteration then trains on: the synthetic SFT answers and the pairs
    tasks = {it["prompt"]: Task.from_json(it) for it in items}
    sft = [r for r in _jsonl(sdg_dir / "sft.jsonl") if r.get("merged_from") != "seeds"]  # the synthetic answers
    sft_ok = [verify_record_strict(tasks[r["messages"][0]["content"]].to_json(), [r["messages"][-1]["content"]])[0]
              for r in sft if r["messages"][0]["content"] in tasks]
    pairs = [p for p in _jsonl(sdg_dir / "preference.jsonl") if p.get("prompt") in tasks]
    pair_ok = [(verify_record_strict(tasks[p["prompt"]].to_json(), [p["chosen"], p["rejected"]])) for p in pairs]
    oracle_prompts = len({r["prompt"] for r in rows if r["strict"]})
    summary = {"threshold": filt.threshold, "responses": len(rows), "correct": n_right, "kept": n_kept,
               "precision": _ratio(tp, n_kept), "recall": _ratio(tp, n_right),
               "accuracy": _ratio(sum(k == s for k, s in zip(kept, strict)), len(rows)),
               "auc": auc(rewards, strict),
               "sft_answers": len(sft_ok), "sft_answers_correct": _ratio(sum(sft_ok), len(sft_ok)),
               "pairs": len(pair_ok), "pairs_right_order": _ratio(sum(c and not r for c, r in pair_ok), len(pair_ok)),
               "pairs_chosen_correct": _ratio(sum(c for c, _ in pair_ok), len(pair_ok)),
               "oracle_would_keep_prompts": oracle_prompts}
    return {"summary": summary, "by_family": families,
            "final_answer_precision": _ratio(sum(k and r["final"] for k, r in zip(kept, rows)), n_kept)}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
