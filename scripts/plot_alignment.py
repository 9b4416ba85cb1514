#!/usr/bin/env python
"""Plot the post-training measurement: `python scripts/plot_alignment.py RESULTS_DIR [-o out.png]`.

RESULTS_DIR is what benchmarks/post_training_cpu.py wrote (results.json + one run dir per stage),
or what benchmarks/reward_model_cpu.py wrote (then only the first panel is drawn: the validation
split's r by step, and the test split's r as a star once `--test` measured it).
Three panels: the reward model's held-out Pearson r per attribute and of the weighted reward
against step; held-out assistant-token loss and preference accuracy of every language-model
checkpoint (base -> code SFT -> general SFT -> DPO -> RPO rounds, evaluated on the same data);
and the preference stages' held-out preference accuracy against step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plot_metrics import read_metrics  # noqa: E402


def _series(recs: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def reward_panel(ax, run_dir: Path) -> None:
    """The reward model's held-out Pearson r (per attribute, weighted) and pairwise accuracy by step."""
    rm = read_metrics(run_dir)
    for a in ("helpfulness", "correctness", "coherence", "complexity", "verbosity"):
        pts = _series(rm, f"val_pearson/{a}")
        if pts:
            ax.plot(*zip(*pts), "-", lw=1.0, alpha=0.8, label=a)
    for key, label, style in (("val_pearson/reward", "weighted reward", "k-o"),
                              ("val_pairwise_accuracy", "pairwise accuracy (pairs)", "k--s")):
        pts = _series(rm, key)
        if pts:
            ax.plot(*zip(*pts), style, lw=2.0, ms=3, label=label)
    ax.axhline(0.8, color="gray", ls=":", lw=1)
    ax.set_title("reward model: held-out Pearson r")
    ax.set_xlabel("step")
    ax.set_ylim(-0.2, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def plot(results_dir: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads((results_dir / "results.json").read_text())
    paths = {k: Path(v) for k, v in res["paths"].items()}
    if "held_out" not in res:  # benchmarks/reward_model_cpu.py: the reward model alone
        fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
        reward_panel(ax, paths["reward"])
        split = "validation split" if "validation_curve" in res else "held-out"
        ax.set_title(f"reward model ({res.get('family', '')} family): {split} Pearson r", fontsize=9)
        if "test" in res:  # the test split, measured once with the recipe frozen
            step = res["validation"]["step"]
            ax.plot([step], [res["test"]["pearson/reward"]], "r*", ms=12,
                    label=f"test r {res['test']['pearson/reward']:.3f} (once)")
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        plt.close(fig)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), dpi=110)
    reward_panel(axes[0], paths["reward"])

    ax = axes[1]
    ev = res["held_out"]
    names = [n for n in ("base", "sft_code", "sft_general", "dpo", "rpo_round_1", "rpo_round_2", "rpo_round_3") if n in ev]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [ev[n]["assistant_token_loss"] for n in names], width=0.4, color="tab:blue",
           label="assistant-token loss (nats)")
    ax.set_ylabel("held-out assistant-token loss", color="tab:blue")
    ax2 = ax.twinx()
    ax2.bar([x + 0.2 for x in xs], [ev[n]["preference_accuracy"] for n in names], width=0.4, color="tab:orange",
            label="preference accuracy")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("held-out preference accuracy", color="tab:orange")
    for x, n in zip(xs, names):
        ax2.text(x + 0.2, ev[n]["preference_accuracy"] + 0.01, f"{ev[n]['preference_accuracy']:.2f}", ha="center",
                 fontsize=7)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([n.replace("rpo_round_", "rpo r") for n in names], rotation=30, fontsize=8)
    ax.set_title("every checkpoint on the same held-out data")

    ax = axes[2]
    offset = 0
    for name in ("dpo", "rpo/round_1", "rpo/round_2", "rpo/round_3"):
        rd = paths["rpo"].parent / name if name.startswith("rpo") else paths["dpo"]
        if not (rd / "metrics.jsonl").is_file():
            continue
        recs = read_metrics(rd)
        pts = _series(recs, "val_pref_accuracy")
        if pts:
            ax.plot([s + offset for s, _ in pts], [v for _, v in pts], "o-", ms=3, label=name)
        offset += max((r["step"] for r in recs), default=0)
    if "sft_general" in ev:
        ax.axhline(ev["sft_general"]["preference_accuracy"], color="gray", ls=":", label="general SFT")
    ax.set_title("preference stages: held-out preference accuracy")
    ax.set_xlabel("step (stages back to back)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="the directory benchmarks/post_training_cpu.py or reward_model_cpu.py wrote")
    p.add_argument("-o", "--out", type=Path, default=None, help="PNG (default: RESULTS/alignment.png)")
    args = p.parse_args(argv)
    out = args.out or args.results / "alignment.png"
    plot(args.results, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
