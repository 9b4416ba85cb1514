"""`nemojax compile CONFIG --topology NAME [key=value ...]`: AOT-compile the train step, print JSON.

Compiles forward, backward and the optimizer update exactly as `nemojax train` would run them
on the target TPU topology (from this host, via libtpu's compile-only devices) and prints the
per-device memory analysis, whether it fits the chip's HBM, the pipeline bubble and the
compile time. See `nemojax.parallel.aot` for the accepted topology names.

Examples:
  nemojax compile nemotron4-15b --topology v5p-32 mesh.tensor=4 mesh.data=-1 data.seq_len=4096 \
      data.global_batch_size=16
  nemojax compile nemotron4-340b --topology v5p-1024 mesh.tensor=8 mesh.pipeline=8 \
      mesh.virtual_stages=12 mesh.microbatches=8 mesh.data=-1 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class _TopologyThenOverrides(argparse.Action):
    """`--topology NAME key=value ...`: argparse (3.11) cannot put positionals after an option,
    so the overrides that follow the topology name are collected here."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        name, *rest = values
        bad = [v for v in rest if "=" not in v]
        if bad:
            parser.error(f"after --topology {name}: expected key=value overrides, got {bad}")
        setattr(namespace, "topology", name)
        setattr(namespace, "trailing_overrides", list(rest))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config or preset name (e.g. nemotron4-340b)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides (mesh.*, data.*, model.*)")
    p.add_argument("--topology", required=True, nargs="+", action=_TopologyThenOverrides,
                   metavar="NAME [key=value ...]",
                   help="target: v5p:4x4x4 | v5p-128 (TensorCores) | v5e-16 (chips) | cpu; "
                        "overrides may follow it")
    p.add_argument("--num-slices", type=int, default=1, help="multislice: number of slices (DCN)")
    p.add_argument("--microbatches", type=int, default=0,
                   help="shortcut for mesh.microbatches=N (pipeline microbatches per step)")
    p.add_argument("--virtual-stages", type=int, default=0, help="shortcut for mesh.virtual_stages=N")
    p.add_argument("--output", default="", help="also write the JSON to this file")


def run(args: argparse.Namespace) -> int:
    from nemojax.config import load_config
    from nemojax.parallel.aot import aot_compile

    overrides = list(args.overrides) + list(getattr(args, "trailing_overrides", []))
    if args.microbatches:
        overrides.append(f"mesh.microbatches={args.microbatches}")
    if args.virtual_stages:
        overrides.append(f"mesh.virtual_stages={args.virtual_stages}")
    cfg = load_config(args.config, overrides)
    print(f"nemojax compile: {args.config} for {args.topology} ...", file=sys.stderr, flush=True)
    result = {"config": str(args.config), "overrides": overrides, **aot_compile(cfg, args.topology,
                                                                                args.num_slices)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 1 if result.get("fits") is False else 0  # scripts can gate on "does it fit"
