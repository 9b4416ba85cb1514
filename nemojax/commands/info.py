"""`nemojax info CONFIG [key=value ...]`: parameter counts and FLOPs per token, as JSON.

With `--mesh-devices N` it adds the per-device bytes of params, gradients, optimizer state
and fp32 master copy for the config's mesh over N devices, computed abstractly (no devices), and
the per-device weight bytes in bf16 / fp8 / int8 (`weights_by_quantization`). With `--serve N`
it adds the sampling engine's footprint sharded N ways (tensor parallel): weights per
quantization plus the KV cache of --serve-batch slots x --serve-context tokens, against --hbm-gb.
When the mesh has pipeline stages it prints the training schedule and its bubble fraction.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from nemojax.config import load_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config or preset name (e.g. nemotron4-340b)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--seq-len", type=int, default=0,
                   help="sequence length for attention FLOPs (default: model.max_seq_len)")
    # nargs="+" so overrides may also follow the flag: `info CFG --mesh-devices 64 mesh.tensor=8`.
    p.add_argument("--mesh-devices", "--devices", dest="mesh_devices", nargs="+", default=None,
                   metavar="N [key=value ...]",
                   help="also report per-device training-state bytes for the config's mesh "
                        "(mesh.* overrides) over N devices; no devices needed")
    p.add_argument("--serve", type=int, default=0, metavar="N",
                   help="also report the engine's per-device serving footprint, tensor parallel over N devices, "
                        "for bf16, fp8 and int8 weights")
    p.add_argument("--serve-batch", type=int, default=32, help="slots (sequences decoded together) for --serve")
    p.add_argument("--serve-context", type=int, default=4096, help="tokens per slot (prompt + output) for --serve")
    p.add_argument("--hbm-gb", type=float, default=80.0, help="device memory in GB (1e9 bytes) --serve checks against")


def pipeline_summary(cfg: Any, devices: int) -> dict[str, Any] | None:
    """The training step's pipeline schedule and bubble for the config's largest batch (the final
    ramp-up stage), when the mesh (resolved over `devices`, else as written) has pipeline stages."""
    from nemojax.parallel.mesh import axis_sizes
    from nemojax.parallel.rules import resolve_rules
    from nemojax.parallel.pipeline import validate_pipeline
    from nemojax.parallel.pipeline_table import schedule_summary
    from nemojax.train.rampup import BatchSchedule

    sizes = axis_sizes(cfg.mesh, devices) if devices else None
    P = sizes["pipeline"] if sizes else cfg.mesh.pipeline
    if P <= 1:
        return None
    accum, micro = max(BatchSchedule(cfg.data).distinct_shapes(), key=lambda s: s[0] * s[1])
    V, M = cfg.pipeline.virtual_stages, cfg.pipeline.microbatches
    # the devices the batch is split over (known once the mesh is resolved)
    split = math.prod(sizes[a] for a in resolve_rules(cfg.sharding)["batch"]) if sizes else 1
    validate_pipeline(cfg.model.num_layers, P, V, M, micro, split)
    return schedule_summary(P, V, M, accum, cfg.model.num_layers)


def run(args: argparse.Namespace) -> int:
    from nemojax.model.flops import info

    from nemojax.config import ConfigError

    devices, overrides = 0, list(args.overrides)
    if args.mesh_devices:
        try:
            devices = int(args.mesh_devices[0])
        except ValueError:
            raise ConfigError(f"--mesh-devices needs a device count first, got {args.mesh_devices[0]!r}") from None
        if devices < 1:
            raise ConfigError(f"--mesh-devices must be >= 1, got {devices}")
        overrides += args.mesh_devices[1:]
    cfg = load_config(args.config, overrides)
    out = info(cfg.model, args.seq_len or cfg.model.max_seq_len)
    pipeline = pipeline_summary(cfg, devices)
    if pipeline is not None:
        out["pipeline"] = pipeline
    if devices:
        from nemojax.train.build import training_state_bytes
        from nemojax.train.tasks import stage_task

        out["memory"] = training_state_bytes(cfg, devices, stage_task(cfg))  # LoRA stages: adapters train
        from nemojax.parallel.serving_memory import weights_by_mode

        out["weights_by_quantization"] = weights_by_mode(cfg, devices)
    if args.serve:
        from nemojax.parallel.serving_memory import tensor_parallel_footprint

        if min(args.serve, args.serve_batch, args.serve_context) < 1:
            raise ConfigError("--serve, --serve-batch and --serve-context must be >= 1")
        out["serving"] = tensor_parallel_footprint(cfg, args.serve, batch=args.serve_batch,
                                                   context=args.serve_context, hbm_gb=args.hbm_gb)
    print(json.dumps(out, indent=2))
    return 0
