"""Helpers for the SDG tests: run a pipeline dict with given client objects, read a stage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemojax.sdg.config import build_pipeline
from nemojax.sdg.runner import Runner


def run_pipeline(tmp_path: Path, stages: dict[str, Any], clients: dict[str, Any], *, reward: Any = None,
                 **top: Any) -> tuple[Path, dict[str, Any]]:
    """Run `stages` with the given client objects (declared as scripted in the config)."""
    tree = {"run_dir": str(tmp_path / "run"), "seed": 0, "progress": False,
            "clients": {name: {"type": "scripted"} for name in clients}, "stages": stages, **top}
    cfg = build_pipeline(tree)
    import io

    summaries = Runner(cfg, clients=clients, reward=reward, log=io.StringIO()).run()
    return Path(cfg.run_dir), summaries


def read(run_dir: Path, stage: str) -> list[dict[str, Any]]:
    return [json.loads(l) for l in (run_dir / f"{stage}.jsonl").read_text().splitlines()]


def strip_ids(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "id"} for r in records]


def save_random_lm(path: Path, max_seq_len: int = 512) -> Path:
    """A random tiny language model checkpoint (builtin tokenizer's vocabulary)."""
    from nemojax.checkpoint import save_model
    from nemojax.config import ModelConfig
    from nemojax.model.transformer import init_model

    cfg = ModelConfig(vocab_size=4096, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      ffn_hidden_size=128, init_std=0.2, max_seq_len=max_seq_len)
    save_model(init_model(cfg, seed=0), cfg, path)
    return path


def verify_says_yes(item: dict[str, Any], texts: list[str]) -> list[bool]:
    """A verifier for `judge: verifier` tests (`tests.sdg_helpers:verify_says_yes`): an answer is
    right when it says yes, in any case."""
    return [t.strip().lower() == "yes" for t in texts]
