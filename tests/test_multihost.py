"""Multi-host training as a user runs it: `nemojax train` in 2 processes x 4 CPU devices, joined with
jax.distributed on localhost.

Layouts: tensor 8 (a data shard's replicas span both hosts: both load every row), pipeline 2 x
tensor 4 (each host holds one stage: both load every row), data 2 x tensor 4 and fsdp 8 (each
host loads its half) log the losses of one device within 1e-5 -- the batch each process
assembles from its own rows is the single-process global batch. The one-device reference is
trained once, in this process.

Preemption, one run (data 2 x tensor 4: the hosts read different rows) taken through what a
cluster does to it:
- SIGKILL to both processes right after the step-2 checkpoint (tests/kill_after_save.py);
- rerun, then SIGTERM to process 1 only while the job trains: the notice reaches process 0 too
  (JAX's preemption sync manager), both stop after the same step, write one checkpoint together
  and exit 0 within GRACE_S;
- rerun, then SIGTERM to both while they restore and compile: the same, after the first step;
- rerun to the end: the losses of the whole chain equal an uninterrupted run's, bit for bit;
- a copy whose newest checkpoint lost a file only process 1 reads: both hosts set it aside
  together and resume the previous one, again bit for bit.

Cost: the trainings that need no signal run one after the other in one pair of processes
(tests/train_sequence.py), so the default suite starts 2-process jobs four times in all.
Restarting with a different number of processes (1 x 8 devices) is `slow`.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import jax
import pytest

from multiproc import Job, checkpoint_steps, launch_train, logged_losses, train_sequence, wait_until

STEPS = 4
TOL = 1e-5
GRACE_S = 30  # SIGTERM -> every process exited: Kubernetes' default grace period, SLURM's KillWait
BIG = 100000  # steps / checkpoint interval of a run that only a signal ends
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
PREEMPTED = "data2_tensor4"


def _args(layout: str, run_dir: Path, *extra: str) -> list[str]:
    return [*BASE, *LAYOUTS[layout], f"run_dir={run_dir}", *extra]


def _job(layout: str, run_dir: Path, *extra: str, kill_after: int = 0) -> Job:
    return Job([_args(layout, run_dir, *extra)], processes=2, devices_per_process=4, kill_after=kill_after)


def _rows(stderr: list[str]) -> list[str]:
    """The rows each process reported loading, from its "loads rows" line."""
    lines = [line for e in stderr for line in e.splitlines() if "loads rows" in line]
    return [ln.split("loads rows ")[1].split()[0] for ln in lines]


def _written_by_both(step_dir: Path) -> None:
    """Both processes wrote their share of the step's checkpoint (the data-sharded ZeRO-1 optimizer
    state: each process holds, and writes, half of it)."""
    for pid in (0, 1):
        files = [p for p in (step_dir / "opt_state").glob(f"ocdbt.process_{pid}/d/*") if p.is_file()]
        assert files and all(p.stat().st_size for p in files), (pid, sorted((step_dir / "opt_state").rglob("*")))
    assert (step_dir / "train").is_dir() and (step_dir / "params").is_dir()


def _preempt(run_dir: Path, processes: list[int], after_step: int | None) -> dict:
    """Resume PREEMPTED with no end in sight and SIGTERM `processes` once `after_step` is logged or,
    with None, once both have joined the job (before their restore and first step). Returns what
    the job left behind and how long after the signal (or, for a signal during start-up, after
    the first step) the last process exited."""
    first = max(logged_losses(run_dir)) + 1
    job = _job(PREEMPTED, run_dir, f"steps={BIG}", f"checkpoint_every={BIG}")
    if after_step is None:
        wait_until(job, lambda: all("loads rows" in e for e in job.output().stderr), "distributed start")
    else:
        wait_until(job, lambda: after_step in logged_losses(run_dir, missing_ok=True), f"step {after_step}")
    job.send(signal.SIGTERM, processes)
    stepped = None
    if after_step is None:
        wait_until(job, lambda: first in logged_losses(run_dir), f"step {first}")
        stepped = time.monotonic()
    done = job.wait(timeout=GRACE_S + 60)
    return {"done": done, "stop": max(logged_losses(run_dir)), "checkpoints": checkpoint_steps(run_dir),
            "grace": done.seconds if stepped is None else done.ended - stepped}


def _stopped_cleanly(job: dict, run_dir: Path, what: str) -> None:
    """Every process exited 0 within the grace period, after saving one checkpoint, written by both,
    of the step where process 0 stopped logging."""
    done, step = job["done"], job["stop"]
    assert done.returncodes == [0, 0], done.explain()
    assert job["grace"] <= GRACE_S, f"{what} -> exit took {job['grace']:.1f}s\n{done.explain()}"
    assert "received a preemption notice" in done.stdout[0], done.explain()
    assert f"saved checkpoint of step {step} in" in done.stdout[0], done.explain()
    _written_by_both(run_dir / "checkpoints" / str(step))
    print(f"{what} -> every process exited: {job['grace']:.1f}s")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The losses of the same training on one device, in this process (no subprocess)."""
    from nemojax.config import load_config
    from nemojax.train.loop import Trainer

    run_dir = tmp_path_factory.mktemp("reference")
    cfg = load_config(BASE[0], [*BASE[1:], "mesh.data=1", f"run_dir={run_dir}"])
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # as the subprocesses (tests/multiproc.py)
    try:
        result = Trainer(cfg, devices=jax.devices()[:1], log=lambda _: None).run()
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)
    assert result.exit_code == 0 and result.step == STEPS
    losses = logged_losses(run_dir)
    assert losses[STEPS] < losses[1], losses  # it trains
    return losses


@pytest.fixture(scope="module")
def preempted(tmp_path_factory) -> dict:
    """SIGKILL after the step-2 checkpoint; rerun, SIGTERM to process 1 two steps after the resume;
    rerun, SIGTERM to both while they start."""
    run_dir = tmp_path_factory.mktemp("preempted") / "run"
    killed = _job(PREEMPTED, run_dir, f"steps={BIG}", kill_after=2).wait(timeout=600, stop_on_failure=False)
    # SIGKILL, no cleanup. A process still returning from the collective save when its peer's
    # SIGKILL lands is aborted by JAX's coordination service instead (SIGABRT, -6): dead just the same.
    assert -9 in killed.returncodes and set(killed.returncodes) <= {-9, -6}, killed.explain()
    assert checkpoint_steps(run_dir) == [2] and sorted(logged_losses(run_dir)) == [1, 2]
    to_one = _preempt(run_dir, [1], after_step=4)
    at_start = _preempt(run_dir, [0, 1], after_step=None)
    return {"run_dir": run_dir, "to_one": to_one, "at_start": at_start}


@pytest.fixture(scope="module")
def sequence(tmp_path_factory, preempted: dict) -> dict:
    """Every training that needs no signal, in one 2-process job: three layouts from scratch; the
    same run as the preempted one, uninterrupted; the preempted run continued to the end; a copy of
    it whose newest checkpoint lost a file only process 1 reads, continued."""
    root = tmp_path_factory.mktemp("sequence")
    end = preempted["at_start"]["stop"] + 2
    corrupt = root / "corrupt"
    shutil.copytree(preempted["run_dir"], corrupt)
    newest = corrupt / "checkpoints" / str(preempted["at_start"]["stop"])
    victim = max((p for p in (newest / "opt_state").rglob("ocdbt.process_1/d/*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
    with victim.open("r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    to_end = [f"steps={end}", f"checkpoint_every={BIG}"]
    runs = {
        "tensor8": _args("tensor8", root / "tensor8"),
        "pipeline2_tensor4": _args("pipeline2_tensor4", root / "pipeline2_tensor4"),
        "fsdp8": _args("fsdp8", root / "fsdp8"),
        "uninterrupted": _args(PREEMPTED, root / "uninterrupted", *to_end),
        "after_sigterm": _args(PREEMPTED, preempted["run_dir"], *to_end),
        "after_corruption": _args(PREEMPTED, corrupt, *to_end),
    }
    done = train_sequence(list(runs.values()), processes=2, devices_per_process=4)
    assert done.returncodes == [0, 0], done.explain()
    output = {name: [done.run_output(i, pid) for pid in (0, 1)] for i, name in enumerate(runs)}
    dirs = {"uninterrupted": root / "uninterrupted", "corrupt": corrupt, **{k: root / k for k in LAYOUTS}}
    return {"output": output, "dirs": dirs, "end": end}


def test_sigterm_to_one_process_stops_every_process(preempted) -> None:
    """SIGTERM to process 1 only, while the job trains: the notice reaches process 0 (JAX's preemption
    sync manager), both stop after the same step and write one checkpoint. Mutant: the notice kept
    on the host that got it (a Python SIGTERM handler over JAX's, or only the local flag asked) --
    process 0 trains on and the job does not end."""
    job = preempted["to_one"]
    assert "(step 2," in job["done"].stdout[0], job["done"].explain()  # resumed after the SIGKILL
    assert job["stop"] >= 4 and job["checkpoints"] == [2, job["stop"]], job
    _stopped_cleanly(job, preempted["run_dir"], "SIGTERM to process 1")


def test_sigterm_to_every_process_while_starting_stops_after_the_first_step(preempted) -> None:
    """SIGTERM to both while they restore and compile: they stop within the first steps of the
    resumed run (after the first if the notice is through before it; timed from that step).
    Mutant: global steps told to JAX's sync manager -- its stop point (step 1) is behind the
    resumed run, which then never stops."""
    first, job = preempted["to_one"]["stop"], preempted["at_start"]
    assert f"(step {first}," in job["done"].stdout[0], job["done"].explain()  # resumed
    assert first < job["stop"] <= first + 5 and job["checkpoints"] == [2, first, job["stop"]], job
    _stopped_cleanly(job, preempted["run_dir"], "SIGTERM to both while starting (from the first step)")


@pytest.mark.heavy
def test_layouts_across_two_processes_match_one_device(sequence, reference) -> None:
    for name, layout in [("tensor8", "tensor8"), ("pipeline2_tensor4", "pipeline2_tensor4"), ("fsdp8", "fsdp8"),
                         ("uninterrupted", PREEMPTED)]:
        got = logged_losses(sequence["dirs"][name])
        for s in range(1, STEPS + 1):
            assert abs(got[s] - reference[s]) <= TOL, f"{layout}: step {s}: {got[s]} vs one device {reference[s]}"
        assert _rows([err for _, err in sequence["output"][name]]) == EXPECTED_ROWS[layout], layout


def test_resume_after_sigkill_and_sigterms_is_bit_exact(sequence, preempted) -> None:
    stdout = sequence["output"]["after_sigterm"][0][0]
    assert f"(step {preempted['at_start']['stop']}," in stdout, stdout
    want, got = logged_losses(sequence["dirs"]["uninterrupted"]), logged_losses(preempted["run_dir"])
    assert sorted(got) == sorted(want) == list(range(1, sequence["end"] + 1))
    assert got == want  # the same floats: a SIGKILL, two SIGTERMs and three resumes changed nothing


def test_checkpoint_one_host_cannot_read_is_set_aside_by_both(sequence, preempted) -> None:
    """Process 0 reads the newest checkpoint fine, process 1 does not: both take the same decision
    (set it aside, resume the previous one) instead of one resuming while the other falls back."""
    stdout = sequence["output"]["after_corruption"][0][0]
    assert f"(step {preempted['to_one']['stop']}," in stdout, stdout
    corrupt = sequence["dirs"]["corrupt"]
    assert [p.name.split("-")[0] for p in (corrupt / "checkpoints_corrupt").iterdir()] == \
        [str(preempted["at_start"]["stop"])]
    assert logged_losses(corrupt) == logged_losses(sequence["dirs"]["uninterrupted"])


@pytest.mark.slow
def test_restart_with_another_process_count_resumes(tmp_path) -> None:
    """Killed as 2 processes x 4 devices, resumed as 1 process x 8: the data position is global and
    the state reshards on restore, so steps 3-4 are the uninterrupted run's (within 1e-5: the
    collectives differ)."""
    multi = launch_train(_args(PREEMPTED, tmp_path / "multi"), processes=2, devices_per_process=4)
    assert multi.returncodes == [0, 0], multi.explain()
    rd = tmp_path / "killed"
    launch_train(_args(PREEMPTED, rd), processes=2, devices_per_process=4, kill_after=2)
    assert checkpoint_steps(rd) == [2]
    resumed = launch_train(_args(PREEMPTED, rd), processes=1, devices_per_process=8)
    assert resumed.returncodes == [0], resumed.explain()
    assert "resumed from" in resumed.stdout[0] and "(step 2," in resumed.stdout[0], resumed.explain()
    got, want = logged_losses(rd), logged_losses(tmp_path / "multi")
    for s in range(3, STEPS + 1):
        assert abs(got[s] - want[s]) <= TOL, (s, got[s], want[s])
