"""DPO and RPO settings over seeds: pools `benchmarks/preference_cpu.py` runs of the same iteration.

    python scripts/preference_report.py runs/pref-s0-it1 runs/pref-s1-it1 runs/pref-s2-it1 \
        --json docs/results/preference_it1_report.json

Each run directory holds one seed's settings, each trained from that seed's general-SFT student and
evaluated per task (`eval_rows.jsonl`). For every setting that all the runs hold, and for each
metric (all tasks, IFEval prompt-level strict), the setting minus its general-SFT student: per seed
the difference with its paired bootstrap interval, over seeds the mean, the sample sd, a t interval
and a two-stage bootstrap interval (nemojax.align.stats.compare; `established` only when both
exclude 0). The held-out preference accuracy (log p(right) > log p(wrong) on the world's held-out
pairs) is pooled the same way from each run's totals (t interval over seeds). Each metric's
over-seeds p is Holm-adjusted across the settings (the family a reader scans for the one that
works). Prints a markdown table and, with --json, writes everything; settings missing from some
runs are named, not pooled.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nemojax.align.report import eval_tasks, metric_vectors, task_results  # noqa: E402
from nemojax.align.stats import adjust_family, compare, t_interval, t_test_p, verdict  # noqa: E402

METRICS = ("score", "ifeval")


def load_run(out: Path) -> dict:
    """One preference_cpu.py run: its results and, per setting, the per-task vectors against its student."""
    path = out / "results.json"
    try:
        res = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{out} has no results.json: give a `benchmarks/preference_cpu.py --out` directory "
                         "(a run cut before its first setting has none yet: rerun its command)") from None
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path} is not readable JSON ({e})") from None
    if not isinstance(res, dict) or not isinstance(res.get("general_sft"), dict) \
            or "held_out_preference_accuracy" not in res["general_sft"]:
        command = res.get("command", "benchmarks/preference_cpu.py") if isinstance(res, dict) else "it"
        raise SystemExit(f"{out} is not a finished preference_cpu.py run (results.json has no general_sft "
                         f"score): rerun its command, {command}, to finish it")
    settings = res.get("settings", {})
    needed = {"pairs", "held_out_preference_accuracy"}
    bad = [n for n, v in settings.items() if not isinstance(v, dict) or not needed <= set(v)] \
        if isinstance(settings, dict) else ["settings"]
    if bad or not {"run", "student", "iteration"} <= set(res):
        raise SystemExit(f"{path} lacks what a finished run records (run, student, iteration; each setting's pairs "
                         f"and held-out preference accuracy): {bad or 'run / student / iteration'}")
    try:
        tasks = eval_tasks(Path(res["run"]) / "world")
        base = task_results(Path(res["student"]) / "eval_rows.jsonl", tasks)
        vectors = {name: metric_vectors(task_results(out / name / "eval_rows.jsonl", tasks), base) for name in settings}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{out}: cannot read the evaluations it names ({e}); its paths are relative to where it "
                         "ran, so run this report from there") from None
    return {"dir": str(out), "results": res, "vectors": vectors}


def pooled(runs: list[dict]) -> dict:
    settings = [s for s in runs[0]["vectors"] if all(s in r["vectors"] for r in runs)]
    out: dict = {"runs": [r["dir"] for r in runs], "iterations": sorted({r["results"]["iteration"] for r in runs}),
                 "settings": {}, "left_out": sorted({s for r in runs for s in r["vectors"]} - set(settings))}
    for name in settings:
        entry: dict = {m: compare([r["vectors"][name][m] for r in runs]) for m in METRICS
                       if all(m in r["vectors"][name] for r in runs)}  # IFEval needs format tasks
        acc = [r["results"]["settings"][name]["held_out_preference_accuracy"]
               - r["results"]["general_sft"]["held_out_preference_accuracy"] for r in runs]
        ci = list(t_interval(acc)) if len(acc) > 1 else None
        entry["preference_accuracy_diff"] = {"per_run": acc, "mean": sum(acc) / len(acc), "t_ci": ci,
                                             "t_p": t_test_p(acc), "established": verdict([ci] if ci else [])}
        entry["pairs"] = runs[0]["results"]["settings"][name]["pairs"]
        out["settings"][name] = entry
    for metric in (*METRICS, "preference_accuracy_diff"):
        adjust_family([e[metric] for e in out["settings"].values() if metric in e])
    return out


def _ci(c: dict) -> str:
    """Mean difference and its 95% interval: t over seeds, or one seed's paired bootstrap."""
    lo, hi = c["t_ci"] if c["n_runs"] > 1 else c["runs"][0]["ci"]
    return f"{c['mean_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _p(c: dict) -> str:
    """The over-seeds p and its Holm adjustment, when the test is defined."""
    return f" p {c['t_p']:.2g} / Holm {c['holm_p']:.2g}" if c.get("holm_p") is not None else ""


def table(rep: dict) -> str:
    lines = ["| setting | pairs | score minus general SFT, mean [95%] (per seed) p / Holm | verdict "
             "| IFEval minus general SFT | pref. acc. minus general SFT, mean [95%] (per seed) |", "|---|---|---|---|---|---|"]
    for name, e in rep["settings"].items():
        per = "; ".join(f"{r['diff']:+.3f}" for r in e["score"]["runs"])
        acc = e["preference_accuracy_diff"]
        acc_ci = f" [{acc['t_ci'][0]:+.3f}, {acc['t_ci'][1]:+.3f}]" if acc["t_ci"] else ""
        lines.append(f"| {name} | {e['pairs']} | {_ci(e['score'])} ({per}){_p(e['score'])} | "
                     f"{e['score']['established']} | "
                     f"{_ci(e['ifeval']) + _p(e['ifeval']) + ' ' + e['ifeval']['established'] if 'ifeval' in e else 'n/a'} | "
                     f"{acc['mean']:+.3f}{acc_ci} ({'; '.join(f'{d:+.3f}' for d in acc['per_run'])}){_p(acc)} "
                     f"{acc['established']} |")
    if rep["left_out"]:
        lines.append(f"\nLeft out (not in every run): {', '.join(rep['left_out'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="preference_cpu.py output directories, one per seed")
    p.add_argument("--json", type=Path, help="write the pooled report here")
    args = p.parse_args(argv)
    if len({d.resolve() for d in args.runs}) != len(args.runs):
        raise SystemExit("a run directory is given twice: each seed counts once")
    runs = [load_run(d) for d in args.runs]
    worlds = [r["results"]["run"] for r in runs]
    if len(set(worlds)) != len(worlds):
        raise SystemExit(f"two directories measure the same align run ({worlds}): each seed counts once")
    rep = pooled(runs)
    if len(rep["iterations"]) != 1:
        raise SystemExit(f"the runs mix iterations {rep['iterations']}: pool one iteration at a time")
    print(table(rep))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
