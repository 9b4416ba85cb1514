#!/usr/bin/env python
"""Training throughput of a config: `python benchmarks/train_throughput.py CONFIG [key=value ...]`.

Builds the train step with `nemojax.train.build.build_training` -- the function the trainer and
`nemojax compile` use -- on the config's mesh, feeds it random-token batches of the config's
final global batch size (throughput does not depend on the token values, and this keeps data
loading out of the measurement), runs --warmup steps (compilation included), then times --steps
steps and prints one JSON object: tokens/s, step time, TFLOP/s per device and MFU (analytic
FLOPs, nemojax.model.flops), the time to first step, the config summary and the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (includes compilation)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    args = p.parse_intermixed_args(argv)  # options may come before or after the overrides
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")

    t_start = time.perf_counter()
    import jax
    import numpy as np

    from nemojax.commands.train import enable_compile_cache
    from nemojax.config import load_config
    from nemojax.parallel.mesh import make_mesh
    from nemojax.train.build import build_training
    from nemojax.train.metrics import ThroughputMeter, peak_flops_per_device
    from nemojax.train.rampup import BatchSchedule

    enable_compile_cache()

    cfg = load_config(args.config, args.overrides)
    cfg.data.rampup = []  # measure the final (largest) batch size
    mesh = make_mesh(cfg.mesh)
    training = build_training(cfg, mesh)
    sched, seq = BatchSchedule(cfg.data), cfg.data.seq_len
    batch_size, accum, micro = sched.batch_size(0), sched.accum_steps(0), sched.micro_batch(0)
    rows = training.rows(accum, micro)
    rng = np.random.default_rng(0)
    meter = ThroughputMeter(cfg.model, seq, num_devices=mesh.devices.size,
                            peak_flops=peak_flops_per_device(mesh.devices.flat[0], cfg.peak_tflops))

    def host_batch() -> dict[str, np.ndarray]:
        n = len(rows)
        toks = rng.integers(0, cfg.model.vocab_size, (n, seq + 1), dtype=np.int32)
        return {"input_ids": toks[:, :-1], "targets": toks[:, 1:],
                "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (n, seq)).copy(),
                "segment_ids": np.ones((n, seq), np.int32), "loss_mask": np.ones((n, seq), np.float32)}

    batches = [training.global_batch(host_batch(), accum, micro) for _ in range(2)]
    t0 = time.perf_counter()
    state = training.init_state(cfg.seed)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    finite = True
    for i in range(args.warmup):
        state, m = training.step(state, batches[i % 2])
        if i == 0:
            jax.block_until_ready(m["loss"])
            first_step_s = time.perf_counter() - t_start
    jax.block_until_ready(m["loss"])
    finite &= bool(m["finite"])
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m = training.step(state, batches[i % 2])
    jax.block_until_ready(m["loss"])
    elapsed = time.perf_counter() - t0
    finite &= bool(m["finite"])

    tokens = args.steps * batch_size * seq
    perf = meter(tokens, elapsed)
    dev = mesh.devices.flat[0]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(training.abstract_state.params))
    out = {
        "tokens_per_sec": round(perf["tokens_per_sec"], 1),
        "step_time_s": round(elapsed / args.steps, 4),
        "tflops_per_device": round(perf["tflops_per_device"], 4),
        "mfu": None if perf["mfu"] is None else round(perf["mfu"], 4),
        "peak_tflops_per_device": None if meter.peak_flops is None else meter.peak_flops / 1e12,
        "train_flops_per_token": meter.flops_per_token,
        "time_to_first_step_s": round(first_step_s, 2),
        "warmup_s": round(warmup_s, 2), "init_s": round(init_s, 2),
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "loss_finite": finite,
        "config": {
            "path": args.config, "overrides": args.overrides, "parameters": n_params,
            "hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
            "vocab_size": cfg.model.vocab_size, "seq_len": seq, "global_batch_size": batch_size,
            "micro_batch_size": sched.micro_batch(0), "accum_steps": accum,
            "param_dtype": cfg.model.param_dtype, "compute_dtype": cfg.model.compute_dtype,
            "remat_policy": cfg.model.remat_policy, "attention_backend": cfg.model.attention_backend,
            "mesh": dict(zip(mesh.axis_names, mesh.devices.shape)),
            "pipeline": None if training.schedule is None else
            {"stages": training.schedule.P, "virtual_stages": training.schedule.V,
             "microbatches": training.schedule.M},
        },
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": int(mesh.devices.size),
                   "processes": jax.process_count()},
        "jax": jax.__version__,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
