"""Multi-host training as a user runs it: `nemojax train` in 2 processes x 4 CPU devices, joined with
jax.distributed on localhost, against the same command in 1 process x 8 devices.

For every layout -- tensor 8 (a data shard's replicas span both hosts: both load every row),
pipeline 2 x tensor 4 (each host holds one stage: both load every row), data 2 x tensor 4 and
fsdp 8 (each host loads its half) -- the logged losses equal the single-process run within 1e-5:
the batch each process assembles from its own rows is the single-process global batch.

Preemption: both processes SIGKILL themselves right after the step-2 checkpoint
(tests/kill_after_save.py); rerunning the same command resumes on both hosts and the later
losses equal the uninterrupted 2-process run bit for bit. Restarting with a different number of
processes (1 x 8 devices) resumes the same state and data position.

The default suite runs tensor 8 (+ kill / resume); the other layouts and the process-count
change are `slow`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from multiproc import checkpoint_steps, launch_train, logged_losses

STEPS = 4
TOL = 1e-5
BASE = [
    "configs/tiny.yaml", f"steps={STEPS}", "log_every=1", "eval_every=0", "checkpoint_every=2", "keep_checkpoints=3",
    "model.hidden_size=64", "model.num_layers=2", "model.num_heads=8", "model.num_kv_heads=4", "model.head_dim=8",
    "model.ffn_hidden_size=128", "model.max_seq_len=32", "data.seq_len=32", "data.global_batch_size=8",
    "optimizer.warmup_steps=0", "optimizer.learning_rate=3e-3", "optimizer.schedule=constant",
]
# Rows of each micro batch of 8 that processes 0 and 1 load: replicas of a data shard (tensor or
# pipeline across the hosts) load the same rows; data / fsdp across the hosts split them.
EXPECTED_ROWS = {"tensor8": ["0:8", "0:8"], "pipeline2_tensor4": ["0:8", "0:8"],
                 "data2_tensor4": ["0:4", "4:8"], "fsdp8": ["0:4", "4:8"]}
LAYOUTS = {
    "tensor8": ["mesh.data=1", "mesh.tensor=8", "sharding.rules.kv_heads=null"],
    "pipeline2_tensor4": ["mesh.data=1", "mesh.pipeline=2", "mesh.tensor=4", "pipeline.microbatches=2"],
    "data2_tensor4": ["mesh.data=2", "mesh.tensor=4"],
    "fsdp8": ["mesh.data=1", "mesh.fsdp=8"],
}


def _train(run_dir: Path, layout: str, processes: int, kill_after: int = 0, *extra: str):
    done = launch_train([*BASE, *LAYOUTS[layout], f"run_dir={run_dir}", *extra], processes=processes,
                        devices_per_process=8 // processes, kill_after=kill_after)
    if not kill_after:
        assert done.returncodes == [0] * processes, done.explain()
    return done


def _close(got: dict[int, float], want: dict[int, float], steps: range, what: str) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= TOL, f"{what}: step {s}: {got[s]} vs {want[s]}"


def _check_layout(tmp_path: Path, layout: str) -> dict[int, float]:
    single = _train(tmp_path / "single", layout, 1)
    multi = _train(tmp_path / "multi", layout, 2)
    ref, got = logged_losses(tmp_path / "single"), logged_losses(tmp_path / "multi")
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1], ref  # it trains
    _close(got, ref, range(1, STEPS + 1), f"{layout}: 2 processes vs 1")
    loads = [line for e in multi.stderr for line in e.splitlines() if "loads rows" in line]
    assert [ln.split("loads rows ")[1].split()[0] for ln in loads] == EXPECTED_ROWS[layout], loads
    assert "loads rows" not in single.stderr[0]
    return got


def _kill_and_resume(tmp_path: Path, layout: str, uninterrupted: dict[int, float]) -> Path:
    rd = tmp_path / "killed"
    killed = _train(rd, layout, 2, kill_after=2)
    assert all(rc != 0 for rc in killed.returncodes), killed.explain()
    assert -9 in killed.returncodes, killed.explain()  # SIGKILL, no cleanup
    assert checkpoint_steps(rd) == [2] and sorted(logged_losses(rd)) == [1, 2]
    resumed = _train(rd, layout, 2)
    assert "resumed from" in resumed.stdout[0] and "(step 2," in resumed.stdout[0], resumed.explain()
    got = logged_losses(rd)
    for s in range(3, STEPS + 1):  # bit for bit: the same floats as the uninterrupted run
        assert got[s] == uninterrupted[s], (s, got[s], uninterrupted[s])
    return rd


def test_tensor8_across_two_processes_and_resume_after_sigkill(tmp_path) -> None:
    multi = _check_layout(tmp_path, "tensor8")
    _kill_and_resume(tmp_path, "tensor8", multi)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pipeline2_tensor4", "data2_tensor4", "fsdp8"])
def test_layout_across_two_processes_matches_one(tmp_path, layout: str) -> None:
    multi = _check_layout(tmp_path, layout)
    if layout != "data2_tensor4":
        return
    # Hosts load different rows here: resume must restore both.
    rd = _kill_and_resume(tmp_path, layout, multi)
    # Damage a file only process 1 reads (its ZeRO-1 share of the step-4 optimizer state): process
    # 0 reads step 4 fine, process 1 does not; both must take the same decision (set it aside,
    # fall back to step 2) instead of one resuming while the other falls back.
    files = [p for p in (rd / "checkpoints" / "4" / "opt_state").rglob("ocdbt.process_1/d/*") if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    with victim.open("r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    again = _train(rd, layout, 2)
    assert "resumed from" in again.stdout[0] and "(step 2," in again.stdout[0], again.explain()
    assert [p.name.split("-")[0] for p in (rd / "checkpoints_corrupt").iterdir()] == ["4"]
    got = logged_losses(rd)
    for s in range(3, STEPS + 1):
        assert got[s] == multi[s], (s, got[s], multi[s])


@pytest.mark.slow
def test_restart_with_another_process_count_resumes(tmp_path) -> None:
    """Killed as 2 processes x 4 devices, resumed as 1 process x 8: the data position is global and
    the state reshards on restore, so steps 3-4 are the uninterrupted run's (within 1e-5: the
    collectives differ)."""
    multi = _train(tmp_path / "multi", "data2_tensor4", 2)
    rd = tmp_path / "killed"
    _train(rd, "data2_tensor4", 2, kill_after=2)
    assert checkpoint_steps(rd) == [2]
    resumed = _train(rd, "data2_tensor4", 1)
    assert "resumed from" in resumed.stdout[0] and "(step 2," in resumed.stdout[0], resumed.explain()
    _close(logged_losses(rd), logged_losses(tmp_path / "multi"), range(3, STEPS + 1), "resumed with 1 process")
    assert multi  # (the uninterrupted run above)
