"""`nemojax compile CONFIG --topology NAME [key=value ...]`: AOT-compile the train step, print JSON.

Compiles the train step that `nemojax train` runs (the same `nemojax.train.build.build_training`
call: forward, backward, fp32 gradient accumulation, clipping, optimizer update) for the target
TPU topology (from this host, via libtpu's compile-only devices) and prints the per-device
memory analysis, whether it fits the chip's HBM, the pipeline bubble and the compile time.
The step is lowered for the config's largest batch (the final ramp-up stage), with its
gradient-accumulation slices. See `nemojax.parallel.aot` for the
accepted topology names.

Examples:
  nemojax compile nemotron4-15b --topology v5p-32 mesh.tensor=4 mesh.data=-1 data.seq_len=4096 \
      data.global_batch_size=16
  nemojax compile nemotron4-340b --topology v5p-1024 mesh.tensor=8 mesh.pipeline=8 \
      pipeline.virtual_stages=12 pipeline.microbatches=8 mesh.data=-1 ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any


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
                   help="shortcut for pipeline.microbatches=N (pipeline microbatches per step)")
    p.add_argument("--virtual-stages", type=int, default=0, help="shortcut for pipeline.virtual_stages=N")
    p.add_argument("--output", default="", help="also write the JSON to this file")
    g = p.add_argument_group("serving (nemojax.inference.aot_decode)")
    g.add_argument("--decode", default="", metavar="BATCHxCONTEXT",
                   help="compile the sampling engine's decode program (BATCH slots over CONTEXT cache rows, "
                        "tensor parallel) instead of the train step, e.g. 32x4096")
    g.add_argument("--quantize", choices=["fp8", "int8"], default=None,
                   help="with --decode: fp8 / int8 block weights (bf16 elsewhere; default: model.param_dtype)")
    g.add_argument("--tensor", type=int, default=0, help="with --decode: devices to shard over (default: all)")


def compile_training(cfg: Any, topology: str, num_slices: int = 1) -> dict[str, Any]:
    """Everything `nemojax compile` prints: target, mesh, schedule, memory, fit, times."""
    import jax

    from nemojax.model.attention import resolve_backend
    from nemojax.parallel.aot import compile_report, state_bytes, topology_devices
    from nemojax.parallel.mesh import make_mesh, mesh_shape
    from nemojax.parallel.pipeline_table import schedule_summary
    from nemojax.train.build import build_training
    from nemojax.train.rampup import BatchSchedule
    from nemojax.train.tasks import stage_task

    devices, target = topology_devices(topology, num_slices)
    t0 = time.perf_counter()
    mesh = make_mesh(cfg.mesh, devices)
    training = build_training(cfg, mesh, task=stage_task(cfg))  # the stage's step (stage.kind), default pretraining
    sched = BatchSchedule(cfg.data)
    accum, micro = max(sched.distinct_shapes(), key=lambda s: s[0] * s[1])
    t1 = time.perf_counter()
    lowered = training.lower(accum, micro)
    t2 = time.perf_counter()
    out: dict[str, Any] = {"target": target, "mesh": mesh_shape(mesh)}
    if training.schedule is not None:
        s = training.schedule
        out["pipeline"] = schedule_summary(s.P, s.V, s.M, accum, cfg.model.num_layers)
    out["state_bytes_per_device"] = state_bytes(training.abstract_sharded_state())
    out["stage"] = cfg.stage.kind
    out["attention_backend"] = resolve_backend(cfg.model.attention_backend, platform=devices[0].platform,
                                               dtype=cfg.model.compute_dtype)  # what `auto` became
    out.update({"remat_policy": cfg.model.remat_policy, "compute_dtype": cfg.model.compute_dtype,
                "param_dtype": cfg.model.param_dtype, "fp32_master_weights": cfg.model.param_dtype != "float32",
                "zero1": cfg.sharding.zero1, "zero2": cfg.sharding.zero2, "seq_len": cfg.data.seq_len,
                "global_batch_size": cfg.data.global_batch_size, "micro_batch_size": micro,
                "accumulation_steps": accum})
    report = compile_report(lowered, target.get("hbm_gib"), mesh)
    out.update(report)
    out["seconds"] = {"setup": round(t1 - t0, 2), "lower": round(t2 - t1, 2),
                      "compile": report.get("compile_s", report.get("compile_until_oom_s"))}
    out["jax_version"] = jax.__version__
    return out


def run(args: argparse.Namespace) -> int:
    from nemojax.config import load_config

    overrides = list(args.overrides) + list(getattr(args, "trailing_overrides", []))
    if args.microbatches:
        overrides.append(f"pipeline.microbatches={args.microbatches}")
    if args.virtual_stages:
        overrides.append(f"pipeline.virtual_stages={args.virtual_stages}")
    if (args.quantize or args.tensor) and not args.decode:
        from nemojax.config import ConfigError

        raise ConfigError("--quantize and --tensor apply to the decode program: add --decode BATCHxCONTEXT")
    cfg = load_config(args.config, overrides)
    print(f"nemojax compile: {args.config} for {args.topology} ...", file=sys.stderr, flush=True)
    if args.decode:
        from nemojax.inference.aot_decode import compile_decode, parse_decode_shape

        batch, context = parse_decode_shape(args.decode)
        result = {"config": str(args.config), "overrides": overrides,
                  **compile_decode(cfg, args.topology, batch=batch, context=context, tensor=args.tensor or None,
                                   quantize=args.quantize, num_slices=args.num_slices)}
    else:
        from nemojax.parallel.serving_memory import weights_by_mode

        result = {"config": str(args.config), "overrides": overrides,
                  **compile_training(cfg, args.topology, args.num_slices)}
        result["weights_by_quantization"] = weights_by_mode(cfg, math.prod(result["mesh"].values()))
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 1 if result.get("fits") is False else 0  # scripts can gate on "does it fit"
