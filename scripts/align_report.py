"""Tables, paired comparisons and plots of `nemojax align` runs (e.g. configs/align/stats.yaml over
five seeds, and configs/align/judge.yaml beside them).

    python scripts/align_report.py runs/align-stats-s0                    # one run
    python scripts/align_report.py runs/align-stats-s{0,1,2,3,4} --judge runs/align-judge-s{0,1} \
        --json docs/results/align_stats.json --plot docs/align_stats.png

Prints (and with --json writes) per model its score, per-family accuracy, IFEval prompt-level strict
accuracy and held-out loss: each run's value, the mean and the sample standard deviation (n - 1).
Then every comparison of nemojax.align.report.COMPARISONS that the runs hold (control arms, DPO /
RPO, the reward-model judge), on every metric (all tasks, each family, IFEval): per run the
difference with its paired bootstrap interval over tasks and McNemar's exact p, and over runs the
mean difference, its sd, a t interval and a two-stage bootstrap interval (runs, then tasks), and the
t test's p with Holm's adjustment over all the report's comparisons of that metric. A difference
both intervals place on one side of 0 is `positive` / `negative`; any other is `not established`,
regressions included (the Holm p says which of them survive the number of comparisons made). A `--judge` run is paired with the run of the same world (the
same evaluation tasks).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemojax.align.report import COMPARISONS, eval_tasks, metric_vectors, models, stage_rows, task_results  # noqa: E402
from nemojax.align.stats import adjust_family, compare  # noqa: E402


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def _world_key(run: Path) -> str:
    return hashlib.sha256((run / "world/eval/tasks.jsonl").read_bytes()).hexdigest()


def per_model(summaries: list[dict], prefix: str = "") -> list[dict]:
    """Each model's metrics over runs, in the order of the first run that has it."""
    table: dict[tuple, dict[str, list[float]]] = {}
    for s in summaries:
        for row in stage_rows(s):
            entry = table.setdefault((row["iteration"], prefix + row["model"]), {})
            for k, v in row.items():
                if k not in ("iteration", "model", "checkpoint") and isinstance(v, (int, float)):
                    entry.setdefault(k, []).append(float(v))
    return [{"iteration": it, "model": m, **{k: _stats(v) for k, v in e.items()}} for (it, m), e in table.items()]


def comparisons(groups: list[dict]) -> list[dict]:
    """Every COMPARISONS entry (per iteration) that some group holds both models of, per metric."""
    iterations = max((g["iterations"] for g in groups), default=0)
    cache: dict[Path, dict] = {}

    def results(g: dict, name: str) -> dict:
        path = g["models"][name]
        if path not in cache:
            cache[path] = task_results(path, g["tasks"])
        return cache[path]

    out = []
    for k in range(1, iterations + 1):
        for label, a_t, b_t, meaning in COMPARISONS:
            a, b = a_t.format(k=k), b_t.format(k=k)
            paired = [(g["name"], metric_vectors(results(g, a), results(g, b))) for g in groups
                      if a in g["models"] and b in g["models"]]
            if not paired:
                continue
            metrics = {}
            for metric in paired[0][1]:
                runs = [v[metric] for _, v in paired if metric in v]
                if len(runs) == len(paired):
                    metrics[metric] = compare(runs)
            out.append({"iteration": k, "label": label, "a": a, "b": b, "meaning": meaning,
                        "runs": [n for n, _ in paired], "metrics": metrics})
    _adjust_for_multiplicity(out)
    return out


def _adjust_for_multiplicity(comps: list[dict]) -> None:
    """Holm-adjusted over-runs p of each metric, across every comparison of the report (the family
    a reader scans for an established difference)."""
    for metric in {m for c in comps for m in c["metrics"]}:
        adjust_family([c["metrics"][metric] for c in comps if metric in c["metrics"]])


def report(run_dirs: list[Path], judge_dirs: list[Path]) -> dict:
    groups: dict[str, dict] = {}
    summaries = []
    for d in run_dirs:
        s = json.loads((d / "summary.json").read_text())
        summaries.append(s)
        tasks = eval_tasks(d / "world")
        groups[_world_key(d)] = {"name": str(d), "models": models(s), "tasks": tasks,
                                 "iterations": len(s.get("iterations", []))}
    judge_summaries = []
    for d in judge_dirs:
        s = json.loads((d / "summary.json").read_text())
        judge_summaries.append(s)
        g = groups.get(_world_key(d))
        if g is None:
            raise SystemExit(f"align_report: judge run {d} has no run of the same world among {', '.join(map(str, run_dirs))}")
        g["models"].update(models(s, prefix="judge/"))
        g["iterations"] = max(g["iterations"], len(s.get("iterations", [])))
        g["name"] += f" + {d}"
    judge = [{"run": str(d), "iterations": [
        {"iteration": it["iteration"], "reward_model": (it.get("judge") or {}).get("judge_eval"),
         "audit": (it["sdg"].get("judge_audit") or {}).get("summary")} for it in s.get("iterations", [])]}
        for d, s in zip(judge_dirs, judge_summaries)]
    return {"runs": [str(d) for d in run_dirs], "judge_runs": [str(d) for d in judge_dirs],
            "models": per_model(summaries) + per_model(judge_summaries, "judge: "),
            "comparisons": comparisons(list(groups.values())), "judge": judge,
            "seconds": [s.get("seconds") for s in summaries + judge_summaries]}


def _ci(ci: list[float] | None) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "-"


def _p(p: float | None) -> str:
    return f"{p:.3g}" if p is not None else "-"


def format_report(rep: dict) -> str:
    lines = [f"runs: {', '.join(rep['runs'])}" + (f"; judge runs: {', '.join(rep['judge_runs'])}" if rep["judge_runs"] else ""),
             "", "per model: mean (sd) over runs"]
    cols = sorted({k for m in rep["models"] for k in m if k not in ("iteration", "model")},
                  key=lambda c: (c != "score", c))
    lines.append(f"{'it':>2}  {'model':<34}" + "".join(f" {c[-15:]:>15}" for c in cols))
    for m in rep["models"]:
        cells = "".join(f" {m[c]['mean']:>7.3f} ({m[c]['sd']:.3f})" if c in m and m[c]["sd"] is not None
                        else f" {m[c]['mean']:>15.3f}" if c in m else f" {'':>15}" for c in cols)
        lines.append(f"{m['iteration']:>2}  {m['model'][:34]:<34}" + cells)
    lines += ["", "comparisons: A - B; per run: diff [95% paired bootstrap] McNemar p; over runs: mean (sd), "
              "t and two-stage bootstrap 95% intervals, the t test's p and its Holm adjustment over every "
              "comparison of the report on the same metric"]
    for c in rep["comparisons"]:
        lines.append(f"\niteration {c['iteration']}: {c['label']}  ({c['a']} - {c['b']}: {c['meaning']})")
        for metric, s in c["metrics"].items():
            runs = "; ".join(f"{r['diff']:+.3f} {_ci(r['ci'])} p={r['p']:.3g}" for r in s["runs"])
            pooled = (f"mean {s['mean_diff']:+.3f} (sd {s['sd']:.3f}) t {_ci(s.get('t_ci'))} boot "
                      f"{_ci(s.get('bootstrap_ci'))} p {_p(s.get('t_p'))} Holm {_p(s.get('holm_p'))}"
                      if s["n_runs"] > 1 else "")
            lines.append(f"  {metric:<16} {s['established']:<16} {pooled}  runs: {runs}")
    for j in rep["judge"]:
        lines.append(f"\njudge run {j['run']}:")
        for it in j["iterations"]:
            lines.append(f"  iteration {it['iteration']}: reward model {json.dumps(it['reward_model'])}; "
                         f"filtering audit {json.dumps(it['audit'])}")
    return "\n".join(lines)


def plot(rep: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [m for m in rep["models"] if "score" in m]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(ms)), 4.5))
    xs = range(len(ms))
    ax.bar(xs, [m["score"]["mean"] for m in ms], yerr=[m["score"]["sd"] or 0.0 for m in ms],
           color=[f"C{m['iteration'] % 10}" for m in ms], alpha=0.7, capsize=3)
    for x, m in zip(xs, ms):
        ax.scatter([x] * len(m["score"]["values"]), m["score"]["values"], color="black", s=8, zorder=3)
    ax.set_xticks(list(xs), [f"{m['iteration']}: {m['model']}" for m in ms], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("held-out task accuracy")
    ax.set_title(f"{len(rep['runs'])} run(s): mean, sample sd, each run a dot (0 = first generator)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="align run directories (each with summary.json)")
    p.add_argument("--judge", nargs="*", default=[], help="reward-model-judged runs, each paired with the run of its world")
    p.add_argument("--plot", default="", help="write a bar chart of every model's score here (PNG)")
    p.add_argument("--json", default="", help="write the whole report here")
    args = p.parse_args(argv)
    dirs, judge = [Path(r) for r in args.runs], [Path(r) for r in args.judge]
    missing = [str(d) for d in dirs + judge if not (d / "summary.json").is_file()]
    if missing:
        print(f"align_report: no summary.json in {', '.join(missing)} (has the run finished an iteration?)",
              file=sys.stderr)
        return 2
    rep = report(dirs, judge)
    print(format_report(rep))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=1) + "\n")
    if args.plot:
        plot(rep, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
