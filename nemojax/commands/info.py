"""`nemojax info CONFIG [key=value ...]`: parameter counts and FLOPs per token, as JSON."""

from __future__ import annotations

import argparse
import json

from nemojax.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config or preset name (e.g. nemotron4-340b)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--seq-len", type=int, default=0,
                   help="sequence length for attention FLOPs (default: model.max_seq_len)")


def run(args: argparse.Namespace) -> int:
    from nemojax.model.flops import info

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(info(cfg.model, args.seq_len or cfg.model.max_seq_len), indent=2))
    return 0
