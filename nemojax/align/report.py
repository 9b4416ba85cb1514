"""Tables of an align run's summary.json: per-stage scores (the paper's Table 6 shape) and
the weak-to-strong comparison (generator vs the student aligned on its data)."""

from __future__ import annotations

from typing import Any


def stage_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model, in the order the loop made them."""
    rows: list[dict[str, Any]] = []

    def add(iteration: Any, name: str, rec: dict[str, Any] | None) -> None:
        if not rec or "eval" not in rec:
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
    return rows


def format_summary(summary: dict[str, Any]) -> str:
    rows = stage_rows(summary)
    if not rows:
        return "(no evaluations yet)"
    cols = [c for c in rows[0] if c not in ("iteration", "model", "checkpoint")]
    for r in rows[1:]:
        cols += [c for c in r if c not in cols and c not in ("iteration", "model", "checkpoint")]
    head = f"{'it':>2}  {'model':<22}" + "".join(f" {c[-14:]:>14}" for c in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f" {r[c]:>14.3f}" if isinstance(r.get(c), (int, float)) else f" {'':>14}" for c in cols)
        lines.append(f"{r['iteration']:>2}  {r['model']:<22}" + cells)
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
