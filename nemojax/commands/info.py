"""`nemojax info CONFIG [key=value ...]`: parameter counts and FLOPs per token, as JSON.

With `--mesh-devices N` it adds the per-device bytes of params, gradients, optimizer state
and fp32 master copy for the config's mesh over N devices, computed abstractly (no devices).
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

        out["memory"] = training_state_bytes(cfg, devices)
    print(json.dumps(out, indent=2))
    return 0
