#!/usr/bin/env python
"""Plot a run's loss curve: `python scripts/plot_metrics.py RUN_DIR_OR_METRICS_JSONL [-o out.png]`.

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


def plot(recs: list[dict], out: Path, *, title: str = "", hlines: list[tuple[str, float]] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in recs if _finite(r.get("loss"))]
    val = [(r["step"], r["val_loss"]) for r in recs if _finite(r.get("val_loss"))]
    if not train and not val:
        raise SystemExit("plot_metrics: no finite loss values to plot")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", lw=1.4)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:orange", lw=1.6, ms=4)
    for i, (label, y) in enumerate(hlines):
        ax.axhline(y, ls="--", lw=1.0, color=["tab:gray", "tab:green", "tab:red"][i % 3], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    tok = [(r["step"], r["tokens"]) for r in recs if _finite(r.get("tokens"))]
    if len(tok) >= 2 and tok[-1][0] > 0:
        per_step = tok[-1][1] / tok[-1][0]
        sec = ax.secondary_xaxis("top", functions=(lambda s: s * per_step / 1e3, lambda t: t * 1e3 / per_step))
        sec.set_xlabel("tokens (thousands, approx.)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics", type=Path, help="run dir or metrics.jsonl")
    p.add_argument("-o", "--out", type=Path, default=None, help="PNG path (default: <run_dir>/loss_curve.png)")
    p.add_argument("--title", default="")
    p.add_argument("--hline", action="append", default=[], metavar="LABEL=VALUE",
                   help="reference line, e.g. 'unigram entropy=6.41' (repeatable)")
    args = p.parse_args(argv)
    hlines = []
    for h in args.hline:
        label, _, val = h.rpartition("=")
        try:
            hlines.append((label or "reference", float(val)))
        except ValueError:
            p.error(f"--hline {h!r} must look like LABEL=NUMBER")
    out = args.out or ((args.metrics if args.metrics.is_dir() else args.metrics.parent) / "loss_curve.png")
    plot(read_metrics(args.metrics), out, title=args.title, hlines=hlines)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
