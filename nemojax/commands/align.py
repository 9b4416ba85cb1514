"""`nemojax align CONFIG [key=value ...]`: the weak-to-strong alignment loop (nemojax.align.loop).

Rerun the same command after an interruption: finished steps are skipped and the interrupted
one resumes from its own checkpoints. `<run_dir>/summary.json` holds every evaluation and the
leak audit. A rerun whose configuration differs from a finished step's (another seed, stage
setting, world...) stops and names those steps; `--rerun-changed` trains them again.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("config", help="align YAML (e.g. configs/align/toy.yaml); keys in nemojax/align/config.py")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. run_dir=runs/align2 seed=1")
    p.add_argument("--rerun-changed", action="store_true",
                   help="train again the finished steps whose configuration changed (moved to run_dir/replaced/)")


def run(args: argparse.Namespace) -> int:
    from nemojax.align.config import load_align_config
    from nemojax.align.loop import AlignError, AlignLoop
    from nemojax.align.report import format_summary

    cfg = load_align_config(args.config, args.overrides)
    try:
        summary = AlignLoop(cfg, rerun_changed=args.rerun_changed).run()
    except AlignError as e:
        print(f"nemojax align: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0
