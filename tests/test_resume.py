"""Preemption and recovery of the real trainer (`python train.py ...` in subprocesses, builtin corpus).

- exact resume: a run SIGKILLed right after its step-6 checkpoint and restarted logs the same
  losses, bit for bit, for steps 7..12 as an uninterrupted run -- across a batch ramp-up stage
  boundary (batch 2 -> 4 at step 9, with gradient accumulation) and a data-iterator restore;
- corrupt checkpoints: a truncated file (read error) and a flipped bit (checksum mismatch) in
  the newest checkpoints are detected, reported, set aside, and the previous one is used;
- SIGTERM saves a checkpoint and exits 0; a non-finite loss exits 3 without touching the
  checkpoints.

Subprocesses see one CPU device and share the test compilation cache, so only the first run
compiles.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from xla_flags import xla_flags

REPO = Path(__file__).resolve().parent.parent
SEQ = 64
TINY = [
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.head_dim=16", "model.ffn_hidden_size=128",
    f"data.seq_len={SEQ}", "data.global_batch_size=4", "data.micro_batch_size=2",
    # 8 steps of batch 2 (1024 tokens), then batch 4 as 2 accumulated micro-batches
    "data.rampup=[{batch_size: 2, until_tokens: 1024}]",
    "optimizer.warmup_steps=2", "optimizer.learning_rate=3e-3", "optimizer.decay_steps=10",
    "log_every=1", "eval_every=0", "checkpoint_every=2", "keep_checkpoints=3",
]


def _env(**extra: str) -> dict[str, str]:
    # Every program goes to the compilation cache, even the ~100 small ones orbax compiles for its
    # first save (0.1-0.2 s each: together more than the run itself), so only the first run compiles.
    env = dict(os.environ)
    env.update(XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(Path(os.environ.get("NEMOJAX_TEST_CACHE", REPO / ".jax_cache"))),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _cmd(run_dir: Path, *over: str, kill_after: int = 0) -> list[str]:
    launcher = [str(REPO / "tests" / "kill_after_save.py"), str(kill_after)] if kill_after \
        else [str(REPO / "train.py")]
    return [sys.executable, *launcher, "configs/tiny.yaml", f"run_dir={run_dir}", "steps=12", *TINY, *over]


def train(run_dir: Path, *over: str, timeout: float = 240, kill_after: int = 0,
          **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(run_dir, *over, kill_after=kill_after), cwd=REPO, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in recs}


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def _ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The reference: 12 uninterrupted steps."""
    rd = tmp_path_factory.mktemp("resume") / "straight"
    proc = train(rd)
    _ok(proc)
    assert sorted(losses(rd)) == list(range(1, 13))
    assert ckpt_steps(rd) == [8, 10, 12]
    return rd


@pytest.mark.heavy
def test_exact_resume_after_sigkill(straight, tmp_path):
    rd = tmp_path / "killed"
    proc = train(rd, kill_after=6)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert ckpt_steps(rd) == [2, 4, 6] and sorted(losses(rd)) == list(range(1, 7))
    proc = train(rd)
    _ok(proc)
    assert "resumed from" in proc.stdout and "step 6" in proc.stdout
    assert "batch ramp-up: global batch 4 from step 9" in proc.stdout
    got, want = losses(rd), losses(straight)
    assert sorted(got) == list(range(1, 13))
    for step in range(7, 13):
        assert got[step] == want[step], (step, got[step], want[step])  # bitwise: floats from JSON


def test_corrupt_checkpoints_fall_back_to_previous(straight, tmp_path):
    rd = tmp_path / "corrupt"
    shutil.copytree(straight, rd)
    # step 12: flip one bit of a weight file -- orbax reads it back silently; the checksum catches it
    data12 = max((rd / "checkpoints/12/params").rglob("d/*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data12.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data12.write_bytes(bytes(raw))
    # step 10: a half-written weight file
    data10 = max((rd / "checkpoints/10/params").rglob("d/*"), key=lambda p: p.stat().st_size)
    with data10.open("r+b") as fh:
        fh.truncate(data10.stat().st_size // 2)
    proc = train(rd)
    _ok(proc)
    assert proc.stderr.count("WARNING: checkpoint") == 2, proc.stderr[-3000:]
    assert "checksums" in proc.stderr
    assert "resumed from" in proc.stdout and "(step 8," in proc.stdout
    assert len(list((rd / "checkpoints_corrupt").iterdir())) == 2
    assert ckpt_steps(rd) == [8, 10, 12]
    got, want = losses(rd), losses(straight)
    for step in range(9, 13):
        assert got[step] == want[step], step


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    rd = tmp_path / "term"
    proc = subprocess.Popen(_cmd(rd, "steps=100000", "checkpoint_every=100000"), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if (rd / "metrics.jsonl").exists() and len((rd / "metrics.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "received SIGTERM: saved checkpoint of step" in out
    last = max(losses(rd))
    assert last >= 3 and ckpt_steps(rd) == [last]
    assert (rd / "checkpoints" / str(last) / "params").is_dir()


def test_nonfinite_exits_3_and_keeps_checkpoints(straight, tmp_path):
    rd = tmp_path / "nan"
    shutil.copytree(straight, rd)
    before = {p: p.stat().st_mtime_ns for p in (rd / "checkpoints").rglob("*") if p.is_file()}
    proc = train(rd, "steps=20", "optimizer.learning_rate=1e30", "optimizer.min_learning_rate=1e29")
    _ok(proc, 3)
    assert "non-finite" in proc.stderr and "Last good checkpoint: step 12" in proc.stderr
    assert ckpt_steps(rd) == [8, 10, 12]
    assert {p: p.stat().st_mtime_ns for p in (rd / "checkpoints").rglob("*") if p.is_file()} == before
