"""Tables and plots of one or several `nemojax align` runs (e.g. the same config over 3 seeds).

    python scripts/align_report.py runs/align-toy                      # one run
    python scripts/align_report.py runs/align-toy-s0 runs/align-toy-s1 runs/align-toy-s2 \
        --plot docs/align_toy.png --json docs/align_toy.json

Prints, as JSON: per model (generator, base, every stage of every iteration) the headline score
of each run with mean and sample standard deviation, per-family accuracy means, and the weak-to-strong
comparison (generator vs student) per iteration with how many runs the student won. With
--plot, one bar group per model (mean over runs, each run's score as a dot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemojax.align.report import stage_rows, weak_to_strong  # noqa: E402


def _stats(values: list[float]) -> dict[str, float]:
    """Mean, the sample standard deviation (n - 1; None for a single run) and the range."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values)}


def aggregate(run_dirs: list[Path]) -> dict:
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    per_model: dict[tuple, dict] = {}
    for s in summaries:
        for row in stage_rows(s):
            key = (row["iteration"], row["model"])
            entry = per_model.setdefault(key, {"scores": [], "families": {}})
            entry["scores"].append(row["score"])
            for k, v in row.items():
                if k.startswith("acc/"):
                    entry["families"].setdefault(k[4:], []).append(v)
    models = [{"iteration": it, "model": m, "scores": e["scores"], **_stats(e["scores"]),
               "families": {f: statistics.fmean(v) for f, v in e["families"].items()}}
              for (it, m), e in per_model.items()]
    w2s: dict[int, dict] = {}
    for s in summaries:
        for w in weak_to_strong(s):
            d = w2s.setdefault(w["iteration"], {"generator": [], "student": [], "gain": []})
            for k in ("generator", "student", "gain"):
                d[k].append(w[k])
    comparisons = [{"iteration": k, "generator": _stats(v["generator"]), "student": _stats(v["student"]),
                    "gain": _stats(v["gain"]), "student_wins": sum(g > 0 for g in v["gain"]), "runs": len(v["gain"])}
                   for k, v in sorted(w2s.items())]
    return {"runs": [str(d) for d in run_dirs], "models": models, "weak_to_strong": comparisons,
            "seconds": [s.get("seconds") for s in summaries]}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    labels = [f"{m['iteration']}: {m['model']}" for m in models]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(models)), 4.2))
    xs = range(len(models))
    colors = [f"C{m['iteration'] % 10}" for m in models]
    ax.bar(xs, [m["mean"] for m in models], yerr=[m["std"] or 0.0 for m in models], color=colors, alpha=0.7, capsize=3)
    for x, m in zip(xs, models):
        ax.scatter([x] * len(m["scores"]), m["scores"], color="black", s=10, zorder=3)
    ax.set_xticks(list(xs), labels, rotation=55, ha="right", fontsize=8)
    ax.set_ylabel("held-out task accuracy")
    ax.set_title(f"weak-to-strong alignment in the toy world ({len(report['runs'])} run(s); 0 = first generator)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="align run directories (each with summary.json)")
    p.add_argument("--plot", default="", help="write a bar chart here (PNG)")
    p.add_argument("--json", default="", help="also write the report here")
    args = p.parse_args(argv)
    dirs = [Path(r) for r in args.runs]
    missing = [str(d) for d in dirs if not (d / "summary.json").is_file()]
    if missing:
        print(f"align_report: no summary.json in {', '.join(missing)} (has the run finished an iteration?)",
              file=sys.stderr)
        return 2
    report = aggregate(dirs)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
