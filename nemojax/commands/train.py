"""`nemojax train CONFIG [key=value ...]` (also `python train.py ...`): pretrain, continue pretraining,
or run a post-training stage (`stage.kind`: sft, reward, dpo, ipo, rpo_*; nemojax.train.stages).

Everything goes to `run_dir` (config.yaml, metrics.jsonl, tensorboard/, checkpoints/);
running the same command again resumes from the newest intact checkpoint.
Exit codes: 0 done (or stopped by SIGTERM/SIGINT after saving), 2 config/checkpoint error,
3 non-finite loss.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config or preset name (e.g. configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. steps=100 run_dir=runs/x")


def enable_compile_cache() -> None:
    """Persist compiled steps across runs (a resumed run then starts in seconds, not minutes of
    XLA compilation). JAX_COMPILATION_CACHE_DIR, when set, wins; NEMOJAX_CACHE_DIR moves the default."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    root = Path(os.environ.get("NEMOJAX_CACHE_DIR") or Path.home() / ".cache" / "nemojax")
    jax.config.update("jax_compilation_cache_dir", str(root / "jax_compile"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run(args: argparse.Namespace) -> int:
    from nemojax.config import load_config
    from nemojax.train.checkpointing import CheckpointError
    from nemojax.train.stages import run_stage  # pretraining or a post-training stage (cfg.stage.kind)

    cfg = load_config(args.config, args.overrides)
    from nemojax.parallel.distributed import initialize

    initialize(cfg.distributed.settings())  # before anything touches a device; no-op on one host
    enable_compile_cache()
    from nemojax.data.sources import DataError

    try:
        result = run_stage(cfg)
    except CheckpointError as e:
        print(f"nemojax train: checkpoint error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"nemojax train: data error: {e}", file=sys.stderr)
        return 2
    return result.exit_code
