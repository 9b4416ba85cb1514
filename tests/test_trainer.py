"""The trainer in-process on a synthetic, learnable stream: outputs, learning, ramp-up compiles,
gradient accumulation, continued pretraining (init_from), non-finite stop, metric helpers.

A synthetic stream (next token = previous + 1 mod vocab) keeps these tests independent of the
corpus and fast; the real corpus is exercised by tests/test_resume.py and the tiny run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemojax.config import config_from_dict, load_config
from nemojax.model import init_model
from nemojax.train.checkpointing import Checkpointer
from nemojax.train.loop import EXIT_NONFINITE, Trainer
from nemojax.train.metrics import MetricsWriter, ThroughputMeter, peak_flops_per_device
from nemojax.train.optim import make_optimizer
from nemojax.train.step import create_train_state, make_train_step
from reference_run import numpy_equal
from xla_flags import xla_flags

VOCAB, SEQ = 64, 16


class SyntheticStream:
    """make_batch_iterator stand-in: global row r is (r*7 + i) mod VOCAB, i = 0..seq; state = rows emitted."""

    calls: list[tuple[str, int]] = []

    def __init__(self, data_cfg: Any, *, split: str, batch_size: int, seq_len: int, seed: int,
                 rows: Any = None):
        self.split, self.batch, self.seq = split, batch_size, seq_len
        self.want = np.arange(batch_size) if rows is None else np.asarray(rows)
        self.rows = 0 if split == "train" else 10_000
        SyntheticStream.calls.append((split, batch_size))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        r = (self.rows + self.want)[:, None]
        toks = ((r * 7 + np.arange(self.seq + 1)[None]) % VOCAB).astype(np.int32)
        self.rows += self.batch
        n = len(self.want)
        pos = np.broadcast_to(np.arange(self.seq, dtype=np.int32), (n, self.seq))
        return {"input_ids": toks[:, :-1], "targets": toks[:, 1:], "positions": pos.copy(),
                "segment_ids": np.ones((n, self.seq), np.int32),
                "loss_mask": np.ones((n, self.seq), np.float32)}

    def get_state(self) -> dict:
        return {"rows": self.rows}

    def set_state(self, state: dict) -> None:
        self.rows = int(state["rows"])


def tiny_cfg(run_dir: Path, **over: Any):
    tree = {
        "model": {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                  "head_dim": 16, "ffn_hidden_size": 64, "max_seq_len": SEQ, "init_std": 0.02},
        "optimizer": {"learning_rate": 1e-2, "min_learning_rate": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        "data": {"seq_len": SEQ, "global_batch_size": 4, "micro_batch_size": 2},
        "run_dir": str(run_dir), "steps": 30, "log_every": 5, "eval_every": 10, "eval_batches": 2,
        "checkpoint_every": 10, "keep_checkpoints": 3, "peak_tflops": 1.0,
    }
    for k, v in over.items():
        node = tree
        *head, last = k.split(".")
        for h in head:
            node = node.setdefault(h, {})
        node[last] = v
    return config_from_dict(tree)


def run_trainer(cfg, lines: list[str] | None = None):
    t = Trainer(cfg, batch_factory=SyntheticStream, devices=jax.devices()[:1],
                log=(lines.append if lines is not None else None))
    return t, t.run()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "a"
    lines: list[str] = []
    trainer, result = run_trainer(tiny_cfg(run_dir), lines)
    return SimpleNamespace(run_dir=run_dir, trainer=trainer, result=result, lines=lines)


def test_training_learns_and_writes_run_dir(trained):
    rd, res = trained.run_dir, trained.result
    assert res.exit_code == 0 and res.reason == "completed" and res.step == 30
    recs = read_metrics(rd)
    assert [r["step"] for r in recs] == [5, 10, 15, 20, 25, 30]
    for key in ("loss", "grad_norm", "learning_rate", "tokens_per_sec", "tflops_per_device", "mfu", "tokens"):
        assert key in recs[-1], key
    assert recs[-1]["tokens"] == 30 * 4 * SEQ
    # peak_tflops=1 -> mfu is TFLOP/s per device / 1
    assert recs[-1]["mfu"] == pytest.approx(recs[-1]["tflops_per_device"], rel=1e-6)
    # the synthetic rule (next = prev + 1) is learnable: loss far below uniform log(64) = 4.16
    losses = [r["loss"] for r in recs]
    assert losses[0] > 3.0 and losses[-1] < 0.5 * losses[0], losses
    assert all(a > b for a, b in zip(losses, losses[1:])), losses
    assert [r["step"] for r in recs if "val_loss" in r] == [10, 20, 30]
    assert recs[-1]["val_loss"] < 0.5 * losses[0]
    # console: one progress line per log step with loss, lr, tokens/s and MFU
    prog = [ln for ln in trained.lines if ln.startswith("step ")]
    assert len(prog) == 6 and all("loss" in ln and "lr" in ln and "MFU" in ln for ln in prog)
    assert "tok/s" in prog[-1]
    # resolved config copy loads back to the same config
    assert load_config(rd / "config.yaml") == trained.trainer.cfg
    assert list((rd / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(int(p.name) for p in (rd / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20, 30]
    assert (rd / "checkpoints" / "30" / "params").is_dir()


def test_checkpoint_params_load_as_model(trained):
    """<run_dir>/checkpoints/<step>/params is the weights: nemojax.checkpoint reads the run dir."""
    from flax import nnx

    from nemojax.checkpoint import load_model

    model = load_model(trained.run_dir)
    ck = Checkpointer(trained.run_dir)
    state, meta = ck.restore_latest(trained.trainer._abstract_state())
    ck.close()
    assert meta["step"] == 30 and meta["data_state"] == {"rows": 30 * 4}
    assert numpy_equal(nnx.state(model, nnx.Param).to_pure_dict(), state.params.to_pure_dict())


def test_rampup_compiles_once_per_stage_and_continues_stream(tmp_path):
    SyntheticStream.calls.clear()
    # 3 steps of batch 2 (until 6 rows * SEQ tokens), then batch 4 = 2 accumulated micro-batches
    cfg = tiny_cfg(tmp_path / "r", steps=7, log_every=1, eval_every=0, checkpoint_every=0,
                   **{"data.rampup": [{"batch_size": 2, "until_tokens": 6 * SEQ}]})
    trainer, res = run_trainer(cfg)
    assert res.exit_code == 0
    assert [r["batch_size"] for r in read_metrics(tmp_path / "r")] == [2, 2, 2, 4, 4, 4, 4]
    assert trainer.train_step._cache_size() == 2  # one executable per stage, not per step
    assert [c for c in SyntheticStream.calls if c[0] == "train"] == [("train", 2), ("train", 4)]
    ck = Checkpointer(tmp_path / "r")
    _, meta = ck.restore_latest(trainer._abstract_state())
    ck.close()
    assert meta["data_state"] == {"rows": 3 * 2 + 4 * 4} and meta["tokens"] == (3 * 2 + 4 * 4) * SEQ


def test_gradient_accumulation_matches_one_big_batch():
    cfg = tiny_cfg(Path("/unused"))
    tx = make_optimizer(cfg.optimizer, 10)
    graphdef, state = create_train_state(init_model(cfg.model, 0), tx)
    step = jax.jit(make_train_step(graphdef, tx))
    b = next(SyntheticStream(None, split="train", batch_size=4, seq_len=SEQ, seed=0))
    b["loss_mask"][0, :5] = 0.0  # uneven token counts per micro-batch: normalise by the step total
    one = {k: jnp.asarray(v)[None] for k, v in b.items()}
    two = {k: jnp.asarray(v).reshape(2, 2, SEQ) for k, v in b.items()}
    s1, m1 = step(state, one)
    s2, m2 = step(state, two)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert float(m1["loss_denominator"]) == float(m2["loss_denominator"]) == 4 * SEQ - 5
    for a, c in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-6)


def test_init_from_takes_weights_only(trained, tmp_path):
    """Continued pretraining: weights of the source run, step 0, fresh Adam moments, own schedule."""
    cfg = tiny_cfg(tmp_path / "cpt", steps=4, log_every=1, eval_every=0, checkpoint_every=0,
                   init_from=str(trained.run_dir),
                   **{"optimizer.learning_rate": 5e-3, "optimizer.warmup_steps": 0,
                      "optimizer.schedule": "constant"})
    trainer = Trainer(cfg, batch_factory=SyntheticStream, devices=jax.devices()[:1])
    ck = Checkpointer(cfg.run_dir)
    state, meta = trainer._initial_state(ck)
    ck.close()
    assert meta is None and int(state.step) == 0
    src = Checkpointer(trained.run_dir)
    src_state, _ = src.restore_latest(trained.trainer._abstract_state())
    src.close()
    assert numpy_equal(state.params, src_state.params)
    adam = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert adam and all(not np.any(np.asarray(x)) for x in adam)  # mu, nu all zero
    assert all(int(x) == 0 for x in jax.tree.leaves(state.opt_state) if x.ndim == 0)  # counts
    res = trainer.run()
    recs = read_metrics(tmp_path / "cpt")
    assert res.exit_code == 0 and [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(r["learning_rate"] == pytest.approx(5e-3) for r in recs)
    # it starts where the source ended, not from scratch (~4.16)
    assert recs[0]["loss"] < 1.5


def test_init_from_missing_path_is_a_clear_error(tmp_path):
    from nemojax.train.checkpointing import CheckpointError

    cfg = tiny_cfg(tmp_path / "x", init_from=str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="init_from"):
        run_trainer(cfg)


def test_resume_with_a_different_model_is_refused_not_treated_as_corrupt(trained, tmp_path):
    from nemojax.train.checkpointing import IncompatibleCheckpoint

    rd = tmp_path / "other"
    shutil.copytree(trained.run_dir, rd)
    cfg = tiny_cfg(rd, **{"model.ffn_hidden_size": 128})
    with pytest.raises(IncompatibleCheckpoint, match="config changed"):
        run_trainer(cfg)
    assert sorted(int(p.name) for p in (rd / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20, 30]
    assert not (rd / "checkpoints_corrupt").exists()
    assert load_config(rd / "config.yaml") == trained.trainer.cfg  # the run's own config is kept


def test_nonfinite_loss_stops_without_saving(trained, tmp_path):
    """Resume the good run with an absurd learning rate: step 31 blows the weights up, step 32's
    loss is non-finite; the run stops (exit 3) before the step-32 save, leaving 10/20/30 intact."""
    rd = tmp_path / "nan"
    shutil.copytree(trained.run_dir, rd)
    before = {p: p.stat().st_mtime_ns for p in (rd / "checkpoints").rglob("*") if p.is_file()}
    cfg = tiny_cfg(rd, steps=40, log_every=10, checkpoint_every=2,
                   **{"optimizer.learning_rate": 1e30, "optimizer.min_learning_rate": 1e29})
    _, res = run_trainer(cfg)
    assert res.exit_code == EXIT_NONFINITE and res.reason == "nonfinite" and res.step == 32
    steps = sorted(int(p.name) for p in (rd / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [10, 20, 30]
    after = {p: p.stat().st_mtime_ns for p in (rd / "checkpoints").rglob("*") if p.is_file()}
    assert after == before


def test_peak_flops_lookup():
    def dev(kind: str, platform: str = "gpu"):
        return SimpleNamespace(device_kind=kind, platform=platform)

    assert peak_flops_per_device(dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops_per_device(dev("TPU v5p", "tpu")) == 459e12
    assert peak_flops_per_device(dev("TPU v5 lite", "tpu")) == 197e12
    assert peak_flops_per_device(dev("TPU v4", "tpu")) == 275e12
    assert peak_flops_per_device(dev("cpu", "cpu")) is None
    assert peak_flops_per_device(dev("cpu", "cpu"), override_tflops=2.0) == 2e12
    assert peak_flops_per_device(dev("Mystery accelerator")) is None


def test_throughput_meter_math():
    cfg = tiny_cfg(Path("/unused")).model
    from nemojax.model.flops import flops_per_token

    fpt = flops_per_token(cfg, SEQ)["train"]
    m = ThroughputMeter(cfg, SEQ, num_devices=4, peak_flops=2e12)(tokens=1000, seconds=2.0)
    assert m["tokens_per_sec"] == 500
    assert m["tflops_per_device"] == pytest.approx(500 * fpt / 4 / 1e12)
    assert m["mfu"] == pytest.approx(500 * fpt / 4 / 2e12)
    assert ThroughputMeter(cfg, SEQ, num_devices=1, peak_flops=None)(10, 1.0)["mfu"] is None


def test_metrics_writer_drops_steps_past_the_resume_point(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in range(1, 6):
        w.write(s, {"loss": float(s)})
    w.close()
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 6, "lo')  # a line cut by a hard kill
    w = MetricsWriter(tmp_path, resume_step=3, tensorboard=False)
    w.write(4, {"loss": float("nan")})
    w.close()
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["loss"] == "nan"


def test_plot_metrics_script_writes_png(trained, tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "curve.png"
    proc = subprocess.run([sys.executable, str(repo / "scripts/plot_metrics.py"), str(trained.run_dir),
                           "-o", str(out), "--hline", "unigram=4.16"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


@pytest.mark.heavy
def test_throughput_benchmark_prints_json(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("NEMOJAX_TEST_CACHE", str(repo / ".jax_cache")))
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks/train_throughput.py"), "configs/tiny.yaml", "--warmup", "1",
         "--steps", "2", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.head_dim=16",
         "model.ffn_hidden_size=128", "data.seq_len=64", "data.global_batch_size=4", "peak_tflops=1"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["tokens_per_sec"] > 0 and out["step_time_s"] > 0 and out["loss_finite"]
    assert out["mfu"] == pytest.approx(out["tflops_per_device"] / 1.0, rel=0.01)
    assert out["config"]["global_batch_size"] == 4 and out["config"]["seq_len"] == 64
    assert out["device"]["platform"] == "cpu" and out["device"]["count"] == 1


def test_new_stage_from_init_from_continues_its_data_stream(tmp_path):
    """Continued pretraining (configs/continued_pretraining.yaml) starts its data stream where the
    run named by init_from stopped, not at the beginning: no replay of stage 1's first documents.
    Only the wiring is tested here (no step runs); the stream logic is in test_data_pipeline."""
    from nemojax.config import save_config
    from nemojax.data.pretrain import make_batch_iterator
    from nemojax.train.step import TrainState

    stage1 = load_config("tiny", [f"run_dir={tmp_path / 's1'}", "data.seq_len=16", "data.global_batch_size=4"])
    it = make_batch_iterator(stage1.data, batch_size=4, seq_len=16, seed=stage1.data_seed)
    for _ in range(3):
        next(it)
    saved = it.get_state()
    (tmp_path / "s1").mkdir()
    save_config(stage1, tmp_path / "s1" / "config.yaml")
    ck = Checkpointer(tmp_path / "s1", use_async=False)
    ck.save(TrainState(jnp.asarray(3, jnp.int32), {"w": jnp.zeros(2)}, {}), {"data_state": saved})
    ck.close()
    lines: list[str] = []
    stage2 = load_config("continued_pretraining", [f"run_dir={tmp_path / 's2'}", f"init_from={tmp_path / 's1'}",
                                                   "data.seq_len=16", "data.global_batch_size=4"])
    trainer = Trainer(stage2, devices=jax.devices()[:1], log=lines.append)
    it2 = trainer._train_iterator(0, None)
    assert [(c.doc, c.offset) for c in it2.cursors] == [(s["doc"], s["offset"]) for s in saved["sources"]]
    assert sum("continues where the previous run stopped" in ln for ln in lines) == 2, lines
    # ... and with reshuffle and the same seed, the stage refuses to replay
    from nemojax.config import ConfigError

    same_seed = load_config("continued_pretraining", [f"run_dir={tmp_path / 's3'}", f"init_from={tmp_path / 's1'}",
                                                      "data.seq_len=16", "data.global_batch_size=4",
                                                      "data.stage_start=reshuffle"])
    with pytest.raises(ConfigError, match="replaying"):
        Trainer(same_seed, devices=jax.devices()[:1])._train_iterator(0, None)
