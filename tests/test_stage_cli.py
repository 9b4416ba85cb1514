"""Post-training stages the way a user runs them: `python train.py configs/<stage>.yaml` subprocesses.

- exact resume: a DPO run SIGKILLed right after its step-4 checkpoint (tests/kill_after_save.py)
  and rerun logs the same losses, metrics and validation numbers, bit for bit, as an
  uninterrupted run, and reuses its cached reference log-probs instead of recomputing them;
- (slow) the five shipped stage configs run one after another out of the box, each starting
  from the previous stage's result, and each writes its stage's metrics.

A tiny model (hidden 64, 2 layers, the shipped 4096-piece tokenizer) is saved as the base; the
records are the shipped examples in configs/data/. One CPU device per subprocess, shared
compilation cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from xla_flags import xla_flags

REPO = Path(__file__).resolve().parent.parent
SMALL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.head_dim=16",
         "model.ffn_hidden_size=128", "model.max_seq_len=256"]
FAST = ["log_every=1", "eval_every=4", "eval_batches=2", "checkpoint_every=2", "keep_checkpoints=3",
        "optimizer.warmup_steps=1", "optimizer.learning_rate=1e-3", "data.global_batch_size=4"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(Path(os.environ.get("NEMOJAX_TEST_CACHE", REPO / ".jax_cache"))),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


def run(config: str, *over: str, kill_after: int = 0, timeout: float = 400) -> subprocess.CompletedProcess:
    launcher = [str(REPO / "tests" / "kill_after_save.py"), str(kill_after)] if kill_after else [str(REPO / "train.py")]
    return subprocess.run([sys.executable, *launcher, config, *SMALL, *FAST, *over], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"


def metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A freshly initialised tiny language model checkpoint (what runs/tiny is to the configs)."""
    import jax
    from flax import nnx

    from nemojax.checkpoint import save_model
    from nemojax.config import load_config
    from nemojax.model.transformer import NemotronLM

    cfg = load_config("configs/tiny.yaml", SMALL)
    out = tmp_path_factory.mktemp("stage_base") / "base"
    save_model(NemotronLM(cfg.model, rngs=nnx.Rngs(params=jax.random.key(0))), cfg.model, out)
    return out


def head(src: str, n: int, out: Path) -> Path:
    """The first n records of a shipped example file (keeps the reference pass short)."""
    out.write_text("".join((REPO / src).read_text().splitlines(keepends=True)[:n]))
    return out


@pytest.mark.heavy
def test_dpo_resumes_exactly_after_sigkill(base: Path, tmp_path: Path) -> None:
    train = head("configs/data/preference_train.jsonl", 40, tmp_path / "train.jsonl")
    val = head("configs/data/preference_val.jsonl", 8, tmp_path / "val.jsonl")
    common = [f"init_from={base}", "steps=8", "stage.epochs=0", "stage.sft_weight=0.1", f"stage.train={train}",
              f"stage.validation={val}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok(run("configs/dpo.yaml", f"run_dir={straight}", *common))
    proc = run("configs/dpo.yaml", f"run_dir={killed}", *common, kill_after=4)
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "SIGKILL after the checkpoint of step 4" in proc.stdout
    resumed = run("configs/dpo.yaml", f"run_dir={killed}", *common)
    ok(resumed)
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout
    assert "reference log-probs: train cached, validation cached" in resumed.stdout
    want, got = metrics(straight), metrics(killed)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        for k in ("loss", "grad_norm", "margin", "accuracy", "chosen_logps", "rejected_logps"):
            assert got[step][k] == want[step][k], f"step {step} {k}: {got[step][k]} != {want[step][k]}"
    for k in ("val_loss", "val_accuracy", "val_margin", "val_pref_accuracy"):
        assert got[8][k] == want[8][k] and k in got[4], k
    assert want[8]["loss"] != want[1]["loss"]


@pytest.mark.slow
def test_the_five_stage_configs_run_in_order(base: Path, tmp_path: Path) -> None:
    """reward, sft_code -> sft_general -> dpo -> rpo (3 rounds), each from the previous result."""
    runs = {name: tmp_path / name for name in ("reward", "sft_code", "sft_general", "dpo", "rpo")}
    start = {"reward": base, "sft_code": base, "sft_general": runs["sft_code"], "dpo": runs["sft_general"],
             "rpo": runs["dpo"]}
    for name, rd in runs.items():
        ok(run(f"configs/{name}.yaml", f"run_dir={rd}", f"init_from={start[name]}", "steps=4", "stage.epochs=0",
               timeout=900))
    reward = metrics(runs["reward"])[4]
    assert {"val_loss", "val_pearson/reward", "val_pearson/correctness", "val_mse/verbosity",
            "val_pairwise_accuracy"} <= set(reward)
    assert "val_loss" in metrics(runs["sft_code"])[4] and "val_pref_accuracy" in metrics(runs["sft_general"])[4]
    assert {"margin", "accuracy", "val_accuracy", "val_pref_accuracy"} <= set(metrics(runs["dpo"])[4])
    for r in (1, 2, 3):
        rd = runs["rpo"] / f"round_{r}"
        assert (rd / "COMPLETED").is_file() and (rd / "checkpoints" / "4").is_dir()
        ref = json.loads((rd / "reference" / "train.json").read_text())["reference"]
        assert ref.endswith(str((runs["dpo"] if r == 1 else runs["rpo"] / f"round_{r - 1}") / "checkpoints/4/params"))
