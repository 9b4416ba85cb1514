#!/usr/bin/env python
"""Training throughput of a config: `python benchmarks/train_throughput.py CONFIG [key=value ...]`.

Builds exactly the trainer's jitted, sharded, state-donating step (nemojax.train.loop.Trainer),
feeds it random-token batches of the config's final global batch size (throughput does not
depend on the token values, and this keeps data loading out of the measurement), runs
--warmup steps (compilation included), then times --steps steps and prints one JSON object:
tokens/s, step time, TFLOP/s per device and MFU (analytic FLOPs, nemojax.model.flops), the
config summary and the device.
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

    import jax
    import jax.numpy as jnp
    import numpy as np

    from nemojax.commands.train import enable_compile_cache
    from nemojax.config import load_config
    from nemojax.train.loop import Trainer

    enable_compile_cache()

    cfg = load_config(args.config, args.overrides)
    cfg.data.rampup = []  # measure the final (largest) batch size
    trainer = Trainer(cfg, batch_factory=lambda *a, **k: iter(()), log=lambda s: None)
    sched, seq = trainer.schedule, cfg.data.seq_len
    batch_size, accum = sched.batch_size(0), sched.accum_steps(0)
    rng = np.random.default_rng(0)
    local = batch_size // jax.process_count()

    def host_batch() -> dict[str, np.ndarray]:
        toks = rng.integers(0, cfg.model.vocab_size, (local, seq + 1), dtype=np.int32)
        return {"input_ids": toks[:, :-1], "targets": toks[:, 1:],
                "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (local, seq)).copy(),
                "segment_ids": np.ones((local, seq), np.int32), "loss_mask": np.ones((local, seq), np.float32)}

    batches = [trainer._device_batch(host_batch(), accum) for _ in range(2)]
    t0 = time.perf_counter()
    state = trainer.st.init_state(cfg.seed)
    first_bad = jax.device_put(jnp.asarray(-1, jnp.int32), trainer._replicated)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.warmup):
        state, m, first_bad = trainer.train_step(state, batches[i % 2], first_bad)
    jax.block_until_ready(m["loss"])
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m, first_bad = trainer.train_step(state, batches[i % 2], first_bad)
    jax.block_until_ready(m["loss"])
    elapsed = time.perf_counter() - t0

    tokens = args.steps * batch_size * seq
    perf = trainer.meter(tokens, elapsed)
    dev = trainer.mesh.devices.flat[0]
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.st.abstract_state.params))
    out = {
        "tokens_per_sec": round(perf["tokens_per_sec"], 1),
        "step_time_s": round(elapsed / args.steps, 4),
        "tflops_per_device": round(perf["tflops_per_device"], 4),
        "mfu": None if perf["mfu"] is None else round(perf["mfu"], 4),
        "peak_tflops_per_device": None if trainer.meter.peak_flops is None else trainer.meter.peak_flops / 1e12,
        "train_flops_per_token": trainer.meter.flops_per_token,
        "warmup_s": round(warmup_s, 2), "init_s": round(init_s, 2),
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "loss_finite": bool(int(jax.device_get(first_bad)) < 0),
        "config": {
            "path": args.config, "overrides": args.overrides, "parameters": n_params,
            "hidden_size": cfg.model.hidden_size, "num_layers": cfg.model.num_layers,
            "vocab_size": cfg.model.vocab_size, "seq_len": seq, "global_batch_size": batch_size,
            "micro_batch_size": sched.micro_batch(0), "accum_steps": accum,
            "param_dtype": cfg.model.param_dtype, "compute_dtype": cfg.model.compute_dtype,
            "remat_policy": cfg.model.remat_policy, "attention_backend": cfg.model.attention_backend,
            "mesh": {k: v for k, v in dict(zip(trainer.mesh.axis_names, trainer.mesh.devices.shape)).items()},
        },
        "device": {"platform": dev.platform, "kind": dev.device_kind, "count": int(trainer.mesh.devices.size),
                   "processes": jax.process_count()},
        "jax": jax.__version__,
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
