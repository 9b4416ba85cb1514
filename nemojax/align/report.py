"""Tables of `nemojax align` runs: per-stage scores (the paper's Table 6 shape), the weak-to-strong
comparison, and paired comparisons over seeds with their intervals (nemojax.align.stats).

Every evaluated model of a run gets a name (`models`): `it1/generator` (the first generator),
`it<k>/base`, `it<k>/<stage>` and `it<k>/student` (the iteration's last stage), control arms as
`it<k>/<arm>/<stage>`, and a reward-model-judged run's models with a `judge/` prefix. Its per-task
results come from the `eval_rows.jsonl` the loop writes beside each evaluation; `COMPARISONS`
names what is compared with what, and `compare_runs` pools them over runs that share nothing but
the configuration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# (label, model A, model B, what A - B measures); {k} is the iteration
COMPARISONS: tuple[tuple[str, str, str, str], ...] = (
    ("student - generator", "it{k}/student", "it{k}/generator",
     "the weak-to-strong claim: the model aligned on the generator's data against the generator"),
    ("general SFT - seed-only SFT", "it{k}/general_sft", "it{k}/seed_only/seed_sft",
     "the synthetic data on the student's own base (control seed_only)"),
    ("seed-only SFT - generator", "it{k}/seed_only/seed_sft", "it{k}/generator",
     "the stronger base alone, the same seed-only recipe (control seed_only)"),
    ("general SFT - random gold", "it{k}/general_sft", "it{k}/random_gold/general_sft",
     "the generator's selection against as many gold answers to random prompts (control random_gold)"),
    ("generator's base on the SDG data - generator", "it{k}/generator_base/general_sft", "it{k}/generator",
     "the synthetic data on the generator's own base: beating the teacher without a stronger base"),
    ("general SFT - same base", "it{k}/general_sft", "it{k}/same_base/general_sft",
     "switching to the iteration's stronger base (control same_base)"),
    ("DPO - general SFT", "it{k}/dpo", "it{k}/general_sft", "the DPO stage"),
    ("RPO - DPO", "it{k}/rpo1", "it{k}/dpo", "the RPO round"),
    ("RPO - general SFT", "it{k}/rpo1", "it{k}/general_sft", "both preference stages"),
    ("judge: student - generator", "judge/it{k}/student", "judge/it{k}/generator",
     "weak-to-strong with the learned reward model picking the data"),
    ("judge: student - verifier student", "judge/it{k}/student", "it{k}/student",
     "the learned judge against the oracle verifier, the same iteration (same generator in iteration 1)"),
    ("judge: general SFT - seed-only SFT", "judge/it{k}/general_sft", "judge/it{k}/seed_only/seed_sft",
     "the judge-picked data on the student's own base (the judge run's control seed_only)"),
    ("judge: DPO - general SFT", "judge/it{k}/dpo", "judge/it{k}/general_sft", "DPO on the judge's pairs"),
    ("judge: RPO - general SFT", "judge/it{k}/rpo1", "judge/it{k}/general_sft", "DPO and RPO on the judge's pairs"),
)


def stage_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model, in the order the loop made them."""
    rows: list[dict[str, Any]] = []

    def add(iteration: Any, name: str, rec: dict[str, Any] | None) -> None:
        if not rec or "eval" not in rec or not rec["eval"]:
            return
        ev = rec["eval"]
        suites = ev.get("suites", {})
        row = {"iteration": iteration, "model": name, "score": ev["score"], "checkpoint": rec.get("checkpoint")}
        tasks = suites.get("tasks", {}).get("metrics", {})
        row.update({f"acc/{k}": v for k, v in tasks.get("by_family", {}).items()})
        if "ifeval" in tasks:
            row["ifeval/prompt_strict"] = tasks["ifeval"].get("prompt_level_strict")
        if "loss" in suites:
            row["loss"] = suites["loss"]["score"]
        rows.append(row)

    gen = summary.get("generator", {})
    for rec in gen.get("stages", []):
        add(0, f"generator: {rec['step'].split()[-1]}", rec)
    for it in summary.get("iterations", []):
        k = it["iteration"]
        add(k, "generator", {"eval": it["generator"].get("eval"), "checkpoint": it["generator"]["checkpoint"]})
        add(k, f"base ({it['base']['name']})", it["base"])
        for rec in it["stages"]:
            add(k, rec["step"].split()[-1], rec)
        for arm, entry in (it.get("controls") or {}).items():
            for rec in entry.get("stages", []):
                add(k, f"{arm}: {rec['step'].split()[-1]}", rec)
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    rows = stage_rows(summary)
    if not rows:
        return "(no evaluations yet)"
    cols = [c for c in rows[0] if c not in ("iteration", "model", "checkpoint")]
    for r in rows[1:]:
        cols += [c for c in r if c not in cols and c not in ("iteration", "model", "checkpoint")]
    head = f"{'it':>2}  {'model':<30}" + "".join(f" {c[-14:]:>14}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f" {r[c]:>14.3f}" if isinstance(r.get(c), (int, float)) else f" {'':>14}" for c in cols)
        lines.append(f"{r['iteration']:>2}  {r['model'][:30]:<30}" + cells)
    lines.append("")
    lines += weak_to_strong_lines(summary)
    return "\n".join(lines)


def weak_to_strong(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Per iteration: the generator's score and the final aligned model's score."""
    out = []
    for it in summary.get("iterations", []):
        final = next((r for r in reversed(it["stages"]) if "eval" in r), None)
        gen = it["generator"].get("eval")
        if final is None or gen is None:
            continue
        out.append({"iteration": it["iteration"], "generator": gen["score"], "student": final["eval"]["score"],
                    "gain": final["eval"]["score"] - gen["score"]})
    return out


def weak_to_strong_lines(summary: dict[str, Any]) -> list[str]:
    return [f"iteration {w['iteration']}: generator {w['generator']:.3f} -> student {w['student']:.3f} "
            f"({'+' if w['gain'] >= 0 else ''}{w['gain']:.3f})" for w in weak_to_strong(summary)]


# ---------------------------------------------------------------------------------------------- per task


def _rows_file(rec: dict[str, Any]) -> Path | None:
    if rec.get("eval_rows"):
        return Path(rec["eval_rows"])
    ckpt = rec.get("checkpoint")  # steps recorded before eval_rows was: the file sits in the step dir
    return Path(ckpt) / "eval_rows.jsonl" if ckpt else None


def models(summary: dict[str, Any], prefix: str = "") -> dict[str, Path]:
    """Model name -> its per-task results file (module docstring)."""
    out: dict[str, Path] = {}

    def add(name: str, rec: dict[str, Any] | None) -> None:
        f = _rows_file(rec or {})
        if rec and rec.get("eval") and f is not None:
            out[prefix + name] = f

    for it in summary.get("iterations", []):
        k = it["iteration"]
        add(f"it{k}/generator", it["generator"])
        add(f"it{k}/base", it["base"])
        for rec in it["stages"]:
            add(f"it{k}/{rec['step'].split()[-1]}", rec)
        if it["stages"]:
            add(f"it{k}/student", it["stages"][-1])
        for arm, entry in (it.get("controls") or {}).items():
            for rec in entry.get("stages", []):
                add(f"it{k}/{arm}/{rec['step'].split()[-1]}", rec)
    return out


def eval_tasks(world: Path) -> dict[str, Any]:
    """prompt -> Task of a toy world's evaluation set (`world/eval/tasks.jsonl`), what task_results reads."""
    from nemojax.align.tasks import Task

    rows = [json.loads(x) for x in (world / "eval/tasks.jsonl").read_text().splitlines() if x.strip()]
    return {r["prompt"]: Task.from_json(r) for r in rows}


def task_results(rows_file: Path, tasks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """prompt -> {"correct", "family", "ifeval"} of one evaluation (`tasks`: prompt -> Task of the
    world's evaluation set; ifeval: a format task's instruction followed, prompt-level strict, else None)."""
    from nemojax.sdg.instructions import check as instruction_check

    out = {}
    for line in rows_file.read_text().splitlines():
        r = json.loads(line)
        if r.get("suite", "tasks") != "tasks":
            continue
        task = tasks.get(r["prompt"])
        ifeval = None
        if task is not None and "instruction_id" in task.check:
            ifeval = bool(r["response"] is not None and instruction_check(
                task.check["instruction_id"], r["response"], **task.check.get("instruction_kwargs", {})))
        out[r["prompt"]] = {"correct": bool(r["correct"]), "family": r["family"], "ifeval": ifeval}
    return out


def metric_vectors(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> dict[str, tuple[list, list]]:
    """Paired per-task vectors of A and B for every metric: `score` (all tasks), `family/<f>`, `ifeval`."""
    prompts = sorted(set(a) & set(b))
    if len(prompts) != len(a) or len(prompts) != len(b):
        raise ValueError(f"the two evaluations cover different tasks ({len(a)} and {len(b)}, {len(prompts)} shared)")
    out: dict[str, tuple[list, list]] = {"score": ([a[p]["correct"] for p in prompts], [b[p]["correct"] for p in prompts])}
    for fam in sorted({a[p]["family"] for p in prompts}):
        sel = [p for p in prompts if a[p]["family"] == fam]
        out[f"family/{fam}"] = ([a[p]["correct"] for p in sel], [b[p]["correct"] for p in sel])
    sel = [p for p in prompts if a[p]["ifeval"] is not None]
    if sel:
        out["ifeval"] = ([a[p]["ifeval"] for p in sel], [b[p]["ifeval"] for p in sel])
    return out
