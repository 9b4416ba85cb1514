"""Paired statistics of align comparisons (nemojax.align.stats) against independent computations
(scipy's binomial test, the t formula with a tabulated quantile, a normal approximation, a loop
implementation of the two-stage bootstrap), and the report's per-task pairing of runs
(nemojax.align.report, scripts/align_report.py) on hand-made runs."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest, ttest_1samp

from nemojax.align.stats import compare, holm, mcnemar, paired_bootstrap, t_interval, t_test_p, two_stage_bootstrap


def test_mcnemar_is_the_exact_binomial_test_on_discordant_tasks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.random(60) < 0.4, rng.random(60) < 0.3
        out = mcnemar(list(a), list(b))
        only_a, only_b = int(np.sum(a & ~b)), int(np.sum(b & ~a))
        assert (out["a_only"], out["b_only"]) == (only_a, only_b)
        want = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        assert out["p"] == pytest.approx(want, rel=1e-9)


def test_t_interval_by_the_formula():
    d = [0.10, 0.20, 0.30, 0.00, 0.10]
    mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t_{0.975, 4} from a table
    assert t_interval(d) == pytest.approx((mean - half, mean + half))
    assert t_interval([0.1]) is None


def test_t_test_p_is_scipys_one_sample_test():
    """Kills: a one-sided p, the population sd, df n instead of n - 1."""
    for d in ([0.10, 0.20, 0.30, 0.00, 0.10], [-0.02, 0.05, 0.01], [0.054, 0.05, 0.117, 0.083, 0.058]):
        assert t_test_p(d) == pytest.approx(ttest_1samp(d, 0.0).pvalue, rel=1e-9)
    assert t_test_p([0.1]) is None and t_test_p([0.05, 0.05]) is None
    # one more task right on every seed, computed as a difference of means: equal up to rounding,
    # so no test (not p ~ 1e-57 from an sd of 1e-17)
    same = [float(np.mean(np.arange(240) < k + 1) - np.mean(np.arange(240) < k)) for k in (17, 40, 101, 3, 230)]
    assert len(set(same)) > 1 and t_test_p(same) is None


def test_holm_by_hand():
    """Holm over p = (0.01, 0.04, 0.03, 0.005): sorted 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 =
    0.06, 0.04 x1 = 0.04 -> monotone 0.06; returned in the input order. Kills: Bonferroni (x m for
    all), no monotone step, no cap at 1."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
    # an undefined test counts in the family (as 1, ranked last) and stays undefined: 0.01 x3 and 0.04 x2,
    # not x2 and x1 as in a family that dropped it
    assert holm([0.01, None, 0.04]) == [pytest.approx(0.03), None, pytest.approx(0.08)]


def test_paired_bootstrap_matches_the_normal_approximation_for_many_tasks():
    rng = np.random.default_rng(1)
    a, b = rng.random(3000) < 0.45, rng.random(3000) < 0.40
    d = a.astype(float) - b
    lo, hi = paired_bootstrap(a, b, n_boot=4000)
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert lo == pytest.approx(d.mean() - 1.96 * se, abs=0.004) and hi == pytest.approx(d.mean() + 1.96 * se, abs=0.004)


def test_two_stage_bootstrap_matches_a_loop_and_widens_with_run_variance():
    rng = np.random.default_rng(2)
    runs = [(rng.random(200) < p, rng.random(200) < 0.3) for p in (0.30, 0.45, 0.35, 0.55, 0.40)]
    lo, hi = two_stage_bootstrap(runs, n_boot=4000, seed=3)
    ref_rng, means = np.random.default_rng(99), []
    for _ in range(4000):  # the definition, one replicate at a time
        picked = ref_rng.integers(0, len(runs), len(runs))
        means.append(np.mean([np.mean((runs[r][0].astype(float) - runs[r][1])[ref_rng.integers(0, 200, 200)])
                              for r in picked]))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(means, [0.025, 0.975])), abs=0.012)
    # the same tasks in every run give a narrower interval than runs that differ
    same = [runs[0]] * 5
    s_lo, s_hi = two_stage_bootstrap(same, n_boot=4000, seed=3)
    assert s_hi - s_lo < hi - lo


def test_compare_states_a_difference_only_when_both_intervals_agree():
    rng = np.random.default_rng(4)
    up = [(rng.random(240) < 0.5, rng.random(240) < 0.2) for _ in range(5)]
    out = compare(up)
    assert out["established"] == "positive" and out["positive_runs"] == 5 and out["sd"] is not None
    down = [(b, a) for a, b in up]
    assert compare(down)["established"] == "negative"
    mixed = [(rng.random(240) < 0.3, rng.random(240) < 0.3) for _ in range(5)]
    assert compare(mixed)["established"] == "not established"
    one = compare(up[:1])
    assert one["sd"] is None and "t_ci" not in one and one["established"] == "positive"


# ------------------------------------------------------------------------------------------ the report


def _world(run: Path, tasks: list[dict]) -> None:
    (run / "world/eval").mkdir(parents=True)
    (run / "world/eval/tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))


def _model(run: Path, name: str, tasks: list[dict], responses: list[str], correct: list[bool]) -> dict:
    d = run / name
    d.mkdir(parents=True)
    (d / "eval_rows.jsonl").write_text("".join(json.dumps({"suite": "tasks", "family": t["family"], "level": 1,
                                                          "prompt": t["prompt"], "response": r, "correct": c}) + "\n"
                                               for t, r, c in zip(tasks, responses, correct)))
    return {"step": f"iteration 1 {name.split('/')[-1]}", "checkpoint": str(d),
            "eval": {"score": sum(correct) / len(correct), "suites": {}}}


def test_report_pairs_tasks_within_a_world_and_a_judge_run_with_its_world(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from align_report import format_report, report

    fmt = {"family": "format", "level": 1, "prompt": 'Repeat the word "cat". Wrap your entire response with double '
           "quotation marks.", "answer": '"cat"',
           "check": {"kind": "text", "value": "cat", "instruction_id": "startend:quotation", "instruction_kwargs": {}}}
    lists = [{"family": "lists", "level": 1, "prompt": f"What is the largest number of {i}, 9?", "answer": "9",
              "check": {"kind": "number", "value": 9}} for i in range(3)]
    tasks = [fmt, *lists]
    runs = []
    for seed, (gen_ok, student_ok) in enumerate([([0, 0, 0, 0], [1, 1, 1, 0]), ([0, 1, 0, 0], [1, 1, 1, 1])]):
        run = tmp_path / f"s{seed}"
        _world(run, [dict(t, prompt=t["prompt"] + " " * seed) for t in tasks])  # another world per seed
        ts = [dict(t, prompt=t["prompt"] + " " * seed) for t in tasks]
        gen = _model(run, "generator/seed_sft", ts, ["cat", "9", "9", "9"], [bool(x) for x in gen_ok])
        sft = _model(run, "iter_1/general_sft", ts, ['"cat"', "9", "9", "9"], [bool(x) for x in student_ok])
        base = _model(run, "bases/strong", ts, ["", "", "", ""], [False] * 4)
        (run / "summary.json").write_text(json.dumps({"iterations": [
            {"iteration": 1, "generator": gen, "base": {"name": "strong", **base}, "stages": [sft]}]}))
        runs.append(run)
    judge = tmp_path / "j0"
    _world(judge, tasks)
    jt = _model(judge, "iter_1/general_sft", tasks, ['"cat"', "1", "1", "9"], [True, False, False, True])
    jg = _model(judge, "generator/seed_sft", tasks, ["cat", "9", "9", "9"], [False] * 4)
    js = _model(judge, "controls/seed_only/iter_1/seed_sft", tasks, ['"cat"', "9", "1", "1"], [True, True, False, False])
    (judge / "summary.json").write_text(json.dumps({"iterations": [
        {"iteration": 1, "generator": jg, "base": {"name": "strong"}, "stages": [jt], "sdg": {},
         "controls": {"seed_only": {"stages": [dict(js, step="control seed_only 1 seed_sft")]}}}]}))
    rep = report(runs, [judge])
    by = {c["label"]: c for c in rep["comparisons"]}
    w2s = by["student - generator"]["metrics"]
    assert [r["diff"] for r in w2s["score"]["runs"]] == [0.75, 0.75]  # 3 of 4 more right in both runs
    assert w2s["score"]["sd"] == 0.0 and w2s["score"]["mean_diff"] == 0.75
    # IFEval prompt-level strict from the responses: '"cat"' follows the quotation instruction, 'cat' does not
    assert [r["diff"] for r in w2s["ifeval"]["runs"]] == [1.0, 1.0]
    assert [r["diff"] for r in w2s["family/lists"]["runs"]] == [pytest.approx(2 / 3), pytest.approx(2 / 3)]
    # the judge run pairs with s0 (the same evaluation tasks), not s1
    jv = by["judge: student - verifier student"]["metrics"]["score"]
    assert jv["n_runs"] == 1 and jv["runs"][0]["diff"] == pytest.approx(2 / 4 - 3 / 4)
    # the judge run's own seed-only control: its student (tasks 0 and 3 right) against it (0 and 1)
    jc = by["judge: general SFT - seed-only SFT"]["metrics"]["score"]
    assert jc["n_runs"] == 1 and jc["runs"][0]["a_only"] == 1 and jc["runs"][0]["b_only"] == 1
    assert by["judge: general SFT - seed-only SFT"]["b"] == "judge/it1/seed_only/seed_sft"
    text = format_report(rep)
    assert "student - generator" in text and "judge: student - generator" in text


def test_preference_report_pools_settings_over_seeds_against_each_seeds_student(tmp_path):
    """scripts/preference_report.py: each seed's setting is paired with that seed's own general-SFT
    student on that seed's tasks; the held-out preference accuracy difference is per seed."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from preference_report import load_run, pooled, table

    tasks = [{"family": "lists", "level": 1, "prompt": f"What is the largest number of {i}, 9?", "answer": "9",
              "check": {"kind": "number", "value": 9}} for i in range(4)]
    outs = []
    for seed, (sft_ok, dpo_ok, accs) in enumerate([([1, 0, 0, 0], [1, 1, 0, 0], (0.5, 0.6)),
                                                    ([0, 0, 1, 1], [1, 0, 1, 1], (0.7, 0.65))]):
        run, out = tmp_path / f"stats-s{seed}", tmp_path / f"pref-s{seed}"
        ts = [dict(t, prompt=t["prompt"] + " " * seed) for t in tasks]  # another world per seed
        _world(run, ts)
        student = _model(run, "iter_1/general_sft", ts, ["9"] * 4, [bool(x) for x in sft_ok])
        _model(out, "dpo", ts, ["9"] * 4, [bool(x) for x in dpo_ok])
        (out / "results.json").write_text(json.dumps({
            "run": str(run), "iteration": 1, "student": student["checkpoint"],
            "general_sft": {"held_out_preference_accuracy": accs[0]},
            "settings": {"dpo": {"pairs": "off", "held_out_preference_accuracy": accs[1]}}}))
        outs.append(out)
    rep = pooled([load_run(o) for o in outs])
    dpo = rep["settings"]["dpo"]
    assert [r["diff"] for r in dpo["score"]["runs"]] == [0.25, 0.25]
    assert dpo["score"]["mean_diff"] == 0.25 and dpo["score"]["sd"] == 0.0
    acc = dpo["preference_accuracy_diff"]
    assert acc["per_run"] == [pytest.approx(0.1), pytest.approx(-0.05)]
    from scipy import stats  # the t interval of the two seeds' differences, from the formula
    half = stats.t.ppf(0.975, 1) * stats.tstd([0.1, -0.05]) / 2 ** 0.5
    assert acc["t_ci"] == [pytest.approx(0.025 - half), pytest.approx(0.025 + half)]
    assert acc["established"] == "not established"
    assert "| dpo | off | +0.250" in table(rep)


FORMAT_TASK = {"family": "format", "level": 1, "prompt": 'Repeat the word "cat". Wrap your entire response with double '
               "quotation marks.", "answer": '"cat"',
               "check": {"kind": "text", "value": "cat", "instruction_id": "startend:quotation", "instruction_kwargs": {}}}


def _preference_run(tmp_path: Path, seed: int, tasks: list[dict], settings: dict[str, tuple[list[int], float]],
                    student_acc: float | None = 0.5) -> Path:
    """One seed of scripts/preference_report.py's input: a world, a student that gets every task wrong
    and, per setting, which tasks it gets right (a format task right = its instruction followed)."""
    run, out = tmp_path / f"stats-s{seed}", tmp_path / f"pref-s{seed}"
    ts = [dict(t, prompt=t["prompt"] + " " * seed) for t in tasks]  # another world per seed

    def responses(ok: list[int]) -> list[str]:
        return [('"cat"' if k else "cat") if t["family"] == "format" else "9" for t, k in zip(ts, ok)]

    _world(run, ts)
    student = _model(run, "iter_1/general_sft", ts, responses([0] * len(ts)), [False] * len(ts))
    for name, (ok, _) in settings.items():
        _model(out, name, ts, responses(ok), [bool(x) for x in ok])
    res = {"run": str(run), "iteration": 1, "student": student["checkpoint"], "command": f"preference_cpu.py {seed}",
           "settings": {n: {"pairs": "off", "held_out_preference_accuracy": acc} for n, (_, acc) in settings.items()}}
    if student_acc is not None:
        res["general_sft"] = {"held_out_preference_accuracy": student_acc}
    (out / "results.json").write_text(json.dumps(res))
    return out


def _holm_by_hand(p: dict[str, float]) -> dict[str, float]:
    """Holm for two p values, from the rule: the smaller times 2, the larger at least that."""
    lo, hi = sorted(p, key=p.get)
    return {lo: min(1.0, 2 * p[lo]), hi: max(min(1.0, 2 * p[lo]), p[hi])}


def test_preference_report_holm_adjusts_across_settings_and_refuses_an_unfinished_run(tmp_path):
    """A reader scans seven settings for one that works: each metric's over-seeds p (score, IFEval,
    preference accuracy) is adjusted across the settings, checked against scipy's t test and Holm's
    rule by hand; a run cut before it scored its student is named, not a KeyError."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from preference_report import load_run, pooled, table
    from scipy import stats

    lists = [{"family": "lists", "level": 1, "prompt": f"What is the largest number of {i}, 9?", "answer": "9",
              "check": {"kind": "number", "value": 9}} for i in range(8)]
    fmt = [dict(FORMAT_TASK, prompt=FORMAT_TASK["prompt"] + "!" * i) for i in range(4)]
    # per seed: lists tasks newly right, format tasks newly followed, held-out preference accuracy
    gains = {"dpo": ([2, 3, 2], [1, 2, 1], [0.55, 0.52, 0.6]), "rpo": ([1, 0, 2], [0, 1, 1], [0.5, 0.45, 0.5])}
    outs = [_preference_run(tmp_path, seed, lists + fmt, {
        n: ([1] * g[seed] + [0] * (8 - g[seed]) + [1] * f[seed] + [0] * (4 - f[seed]), acc[seed])
        for n, (g, f, acc) in gains.items()}) for seed in range(3)]
    rep = pooled([load_run(o) for o in outs])
    expected = {
        "score": {n: stats.ttest_1samp([(a + b) / 12 for a, b in zip(g, f)], 0).pvalue for n, (g, f, _) in gains.items()},
        "ifeval": {n: stats.ttest_1samp([b / 4 for b in f], 0).pvalue for n, (_, f, _) in gains.items()},
        "preference_accuracy_diff": {n: stats.ttest_1samp([a - 0.5 for a in acc], 0).pvalue
                                     for n, (_, _, acc) in gains.items()}}
    for metric, raw in expected.items():
        adjusted = _holm_by_hand(raw)
        for name in gains:
            got = rep["settings"][name][metric]
            assert got["t_p"] == pytest.approx(raw[name], rel=1e-9), (metric, name)
            assert got["holm_p"] == pytest.approx(adjusted[name], rel=1e-9), (metric, name)
    assert f"Holm {rep['settings']['dpo']['score']['holm_p']:.2g}" in table(rep)

    cut = _preference_run(tmp_path / "cut", 0, lists, {"dpo": ([1] * 8, 0.6)}, student_acc=None)
    with pytest.raises(SystemExit, match="not a finished preference_cpu.py run"):
        load_run(cut)


def test_preference_report_names_a_broken_run_instead_of_a_traceback(tmp_path):
    """Every way a run directory can be unreadable ends in a message naming it, not a traceback."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from preference_report import load_run

    tasks = [{"family": "lists", "level": 1, "prompt": "What is the largest number of 1, 9?", "answer": "9",
              "check": {"kind": "number", "value": 9}}]
    good = _preference_run(tmp_path, 0, tasks, {"dpo": ([1], 0.6)})
    results = json.loads((good / "results.json").read_text())
    cases = {"no results.json": None, "not JSON": "{", "a list": "[]",
             "general_sft null": json.dumps(dict(results, general_sft=None)),
             "a setting without its accuracy": json.dumps(dict(results, settings={"dpo": {"pairs": "off"}})),
             "no run": json.dumps({k: v for k, v in results.items() if k != "run"})}
    for i, (case, text) in enumerate(cases.items()):
        d = tmp_path / f"broken{i}"
        d.mkdir()
        if text is not None:
            (d / "results.json").write_text(text)
        with pytest.raises(SystemExit, match=re.escape(str(d))):
            load_run(d)
    (good / "dpo" / "eval_rows.jsonl").unlink()
    with pytest.raises(SystemExit, match="cannot read the evaluations"):
        load_run(good)
