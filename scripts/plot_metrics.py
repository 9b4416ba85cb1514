#!/usr/bin/env python
"""Plot loss curves: `python scripts/plot_metrics.py RUN_DIR_OR_METRICS_JSONL [...] [-o out.png]`.

Draws training loss and validation loss against step (and consumed tokens on a second axis
when logged), with optional horizontal reference lines such as the corpus' unigram entropy,
so a reader sees at a glance whether the model learned more than token frequencies.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """Records of metrics.jsonl (a run dir or the file itself); lines cut by a kill are skipped."""
    f = path / "metrics.jsonl" if path.is_dir() else path
    if not f.exists():
        raise SystemExit(f"plot_metrics: {f} not found; pass a run dir or its metrics.jsonl")
    recs = []
    for line in f.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return recs


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot(runs: list[tuple[str, list[dict]]], out: Path, *, title: str = "",
         hlines: list[tuple[str, float]] = ()) -> None:
    """One PNG: train (line) and validation (dots) loss per run, plus reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = ["tab:blue", "tab:orange", "tab:purple", "tab:brown"]
    plotted = False
    for i, (name, recs) in enumerate(runs):
        c = colors[i % len(colors)]
        prefix = f"{name}: " if len(runs) > 1 else ""
        train = [(r["step"], r["loss"]) for r in recs if _finite(r.get("loss"))]
        val = [(r["step"], r["val_loss"]) for r in recs if _finite(r.get("val_loss"))]
        if train:
            ax.plot(*zip(*train), label=f"{prefix}train loss", color=c, lw=1.2, alpha=0.55 if val else 1.0)
        if val:
            ax.plot(*zip(*val), "o-", label=f"{prefix}validation loss", color=c, lw=1.8, ms=4)
        plotted = plotted or bool(train or val)
    if not plotted:
        raise SystemExit("plot_metrics: no finite loss values to plot")
    for i, (label, y) in enumerate(hlines):
        ax.axhline(y, ls="--", lw=1.0, color=["tab:gray", "tab:green", "tab:red"][i % 3], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    recs = runs[0][1]
    tok = [(r["step"], r["tokens"]) for r in recs if _finite(r.get("tokens"))]
    if len(tok) >= 2 and tok[-1][0] > 0:
        per_step = tok[-1][1] / tok[-1][0]
        sec = ax.secondary_xaxis("top", functions=(lambda s: s * per_step / 1e3, lambda t: t * 1e3 / per_step))
        sec.set_xlabel("tokens (thousands" + (", first run" if len(runs) > 1 else "") + ")")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", type=Path, nargs="+",
                   help="run dir(s) or metrics.jsonl file(s); several runs share the axes")
    p.add_argument("--label", action="append", default=[], help="name per run (default: its directory name)")
    p.add_argument("-o", "--out", type=Path, default=None, help="PNG path (default: <run_dir>/loss_curve.png)")
    p.add_argument("--title", default="")
    p.add_argument("--hline", action="append", default=[], metavar="LABEL=VALUE",
                   help="reference line, e.g. 'unigram entropy=6.41' (repeatable)")
    args = p.parse_args(argv)
    hlines = []
    for h in args.hline:
        label, _, val = h.rpartition("=")
        try:
            hlines.append((f"{label or 'reference'} = {float(val):g}", float(val)))
        except ValueError:
            p.error(f"--hline {h!r} must look like LABEL=NUMBER")
    first = args.metrics[0]
    out = args.out or ((first if first.is_dir() else first.parent) / "loss_curve.png")
    names = args.label + [(m if m.is_dir() else m.parent).name for m in args.metrics[len(args.label):]]
    plot([(n, read_metrics(m)) for n, m in zip(names, args.metrics)], out, title=args.title, hlines=hlines)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
