"""Paired statistics for comparing two models on the same evaluation tasks, within one run and over
runs (seeds that vary the world, the bases and the align seed).

Per run, each model has a 0/1 result per task; a comparison is their per-task difference:

* `paired_bootstrap`: a percentile confidence interval of the accuracy difference, resampling tasks
  (the same tasks for both models: the pairing removes the variance both share);
* `mcnemar`: the exact McNemar test on the discordant tasks (b: only A right, c: only B right), a
  two-sided binomial test of b against b + c at 1/2;
* over runs: the mean difference with its sample standard deviation (n - 1), a t interval over the
  per-run differences (df n - 1: the runs are the unit a claim about the method generalises over),
  and a two-stage bootstrap that resamples runs and then tasks within each drawn run (both sources of
  variance). `compare` calls a difference established only when both intervals exclude 0.
* a report makes many comparisons at once: `holm` adjusts their over-runs p values (one-sample t
  test of the per-run differences) for that multiplicity, so a reader can see which established
  differences survive it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

LEVEL = 0.95


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 4000, seed: int = 0,
                     level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of mean(a) - mean(b), resampling task indices (pairs kept together)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size == 0:
        raise ValueError("paired_bootstrap: no tasks")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float]:
    """Exact two-sided McNemar test: b_only = tasks only A gets right, c_only = only B."""
    b_only = sum(1 for x, y in zip(a, b) if x and not y)
    c_only = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = b_only + c_only, min(b_only, c_only)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"a_only": b_only, "b_only": c_only, "p": p}


def t_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Student-t interval of the mean of per-run differences; None for fewer than two runs."""
    from scipy.stats import t

    x = np.asarray(diffs, np.float64)
    if x.size < 2:
        return None
    half = t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def t_test_p(diffs: Sequence[float]) -> float | None:
    """Two-sided p of the one-sample t test that the per-run differences have mean 0; None for
    fewer than two runs or runs that all differ by the same amount (the test is undefined)."""
    from scipy.stats import t

    x = np.asarray(diffs, np.float64)
    if x.size < 2:
        return None
    sd = x.std(ddof=1)
    if sd <= 1e-12 * max(1.0, abs(float(x.mean()))):  # equal up to rounding (k/240 - j/240 is not exact)
        return None
    stat = x.mean() / (sd / math.sqrt(x.size))
    return float(2 * t.sf(abs(stat), x.size - 1))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p values (controls the family-wise error rate):
    the i-th smallest p is multiplied by (m - i), made monotone, capped at 1. An undefined p (None:
    runs that all differ by the same amount) still counts in the family, as 1, and stays None;
    leaving it out would shrink the family and flatter the others."""
    m = len(pvalues)
    filled = [1.0 if p is None else p for p in pvalues]
    order = sorted(range(m), key=lambda i: filled[i])
    adjusted: list[float | None] = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * filled[i]))
        adjusted[i] = None if pvalues[i] is None else running
    return adjusted


def adjust_family(family: Sequence[dict]) -> None:
    """Sets `holm_p` on each comparison of a family (dicts as `compare` returns them, those holding
    an over-runs test `t_p`), the family being what a reader scans for one that is established."""
    tested = [c for c in family if "t_p" in c]
    for c, p in zip(tested, holm([c["t_p"] for c in tested])):
        c["holm_p"] = p


def two_stage_bootstrap(runs: Sequence[tuple[Sequence[float], Sequence[float]]], *, n_boot: int = 4000,
                        seed: int = 0, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the mean over runs of mean(a) - mean(b): each replicate draws runs
    with replacement and, for each drawn run, its tasks with replacement."""
    diffs = [np.asarray(a, np.float64) - np.asarray(b, np.float64) for a, b in runs]
    if not diffs or any(d.size == 0 for d in diffs):
        raise ValueError("two_stage_bootstrap: every run needs tasks")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(diffs), (n_boot, len(diffs)))
    totals = np.zeros(n_boot)
    for r, d in enumerate(diffs):  # every (replicate, slot) that drew run r resamples its tasks afresh
        slots = np.argwhere(picks == r)
        if len(slots):
            means = d[rng.integers(0, d.size, (len(slots), d.size))].mean(axis=1)
            np.add.at(totals, slots[:, 0], means)
    lo, hi = np.quantile(totals / len(diffs), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def compare(runs: Sequence[tuple[Sequence[bool], Sequence[bool]]], *, seed: int = 0) -> dict:
    """Everything a reader needs about A - B over runs (each run: A's and B's per-task results on
    the same tasks, in the same order)."""
    per_run = []
    for i, (a, b) in enumerate(runs):
        a_f, b_f = np.asarray(a, np.float64), np.asarray(b, np.float64)
        lo, hi = paired_bootstrap(a_f, b_f, seed=seed + i)
        per_run.append({"a": float(a_f.mean()), "b": float(b_f.mean()), "diff": float(a_f.mean() - b_f.mean()),
                        "ci": [lo, hi], "n": int(a_f.size), **mcnemar(a, b)})
    diffs = [r["diff"] for r in per_run]
    out: dict = {"runs": per_run, "n_runs": len(per_run), "mean_diff": float(np.mean(diffs)),
                 "sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None,
                 "positive_runs": sum(d > 0 for d in diffs), "negative_runs": sum(d < 0 for d in diffs)}
    if len(per_run) > 1:
        out["t_ci"] = list(t_interval(diffs))
        out["t_p"] = t_test_p(diffs)
        out["bootstrap_ci"] = list(two_stage_bootstrap(runs, seed=seed))
        intervals = [out["t_ci"], out["bootstrap_ci"]]
    else:
        intervals = [per_run[0]["ci"]]
    out["established"] = verdict(intervals)
    return out


def verdict(intervals: Sequence[Sequence[float]]) -> str:
    """`positive` / `negative` when every interval lies on that side of 0, else `not established`."""
    if intervals and all(lo > 0 for lo, _ in intervals):
        return "positive"
    if intervals and all(hi < 0 for _, hi in intervals):
        return "negative"
    return "not established"
