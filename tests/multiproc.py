"""Launching `nemojax train` the way a user does on a cluster, for tests: N processes on localhost,
each with its own fake CPU devices, joined through jax.distributed (NEMOJAX_* variables) on a
free port. Every wait is bounded; when one process fails or time runs out, all are killed.

Every process runs tests/train_sequence.py, which calls `nemojax train` (nemojax.cli.main) for one
or several argument lists in turn: several trainings then pay for starting Python, JAX and the
distributed runtime once, and every process reads the compilation cache
(tests/shared_cpu_cache.py). Output goes to files, not pipes, so a test may wait for a step and
signal the job while it runs without a full pipe stalling a process.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from xla_flags import xla_flags

REPO = Path(__file__).resolve().parent.parent
RUN_END = "=== train_sequence: run {} exited {}"  # tests/train_sequence.py prints it after each run
RUN_END_RE = r"=== train_sequence: run \d+ exited -?\d+\n"


@dataclass
class Finished:
    returncodes: list[int]
    stdout: list[str]
    stderr: list[str]
    seconds: float = 0.0  # from launch (or from the first signal sent, for a signalled job) to the last exit
    ended: float = 0.0  # time.monotonic() when the last process exited

    def explain(self) -> str:
        return "\n".join(f"--- process {i} (rc={rc})\nSTDOUT\n{o[-2500:]}\nSTDERR\n{e[-4000:]}"
                         for i, (rc, o, e) in enumerate(zip(self.returncodes, self.stdout, self.stderr)))

    def run_output(self, run: int, process: int = 0) -> tuple[str, str]:
        """(stdout, stderr) of process `process` for the `run`-th training of a train_sequence job."""
        parts = [re.split(RUN_END_RE, text) for text in (self.stdout[process], self.stderr[process])]
        assert all(len(p) > run + 1 for p in parts), f"run {run} did not finish:\n{self.explain()}"
        return parts[0][run], parts[1][run]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, extra: dict[str, str]) -> dict[str, str]:
    # Every program goes to the compilation cache, even the ~100 small ones orbax compiles for its
    # first save (0.1-0.2 s each: together more than the run itself), so only the first run compiles.
    env = dict(os.environ)
    env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(Path(os.environ.get("NEMOJAX_TEST_CACHE", REPO / ".jax_cache"))),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


class Job:
    """`nemojax train RUN` for each RUN in turn, in `processes` processes joined as one jax.distributed
    job; with kill_after, every process SIGKILLs itself once the checkpoint of that step is on disk."""

    def __init__(self, runs: list[list[str]], *, processes: int, devices_per_process: int, kill_after: int = 0):
        entry = [str(REPO / "tests" / "train_sequence.py"), *(["--kill-after", str(kill_after)] if kill_after else []),
                 json.dumps(runs)]
        port = free_port()
        self._files = []
        self.procs: list[subprocess.Popen] = []
        self.started = time.monotonic()
        self.signalled: float | None = None
        try:
            for pid in range(processes):
                extra = {} if processes == 1 else {
                    "NEMOJAX_COORDINATOR": f"127.0.0.1:{port}", "NEMOJAX_NUM_PROCESSES": str(processes),
                    "NEMOJAX_PROCESS_ID": str(pid)}
                # append mode: reading while the child writes never moves where it writes
                out, err = tempfile.TemporaryFile("a+"), tempfile.TemporaryFile("a+")
                self._files.append((out, err))
                self.procs.append(subprocess.Popen([sys.executable, *entry], cwd=REPO, stdout=out, stderr=err,
                                                   env=_env(devices_per_process, extra), text=True))
        except BaseException:
            self.kill()
            raise

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def send(self, signum: int, processes: list[int]) -> None:
        if self.signalled is None:
            self.signalled = time.monotonic()
        for i in processes:
            self.procs[i].send_signal(signum)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)

    def output(self) -> Finished:
        texts = []
        for out, err in self._files:
            out.seek(0)
            err.seek(0)
            texts.append((out.read(), err.read()))
        return Finished([p.returncode for p in self.procs], [o for o, _ in texts], [e for _, e in texts])

    def wait(self, timeout: float, *, stop_on_failure: bool = True) -> Finished:
        """Until every process exited (or, with stop_on_failure, one exited non-zero: the rest
        would wait in a collective for it); kills all and fails the test past `timeout`."""
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                if stop_on_failure and any(p.returncode not in (None, 0) for p in self.procs):
                    break
                if time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"nemojax train did not finish within {timeout}s:\n"
                                         + self.output().explain())
                time.sleep(0.05)
            end = time.monotonic()
        finally:
            self.kill()
        done = self.output()
        done.seconds = end - (self.signalled if self.signalled is not None else self.started)
        done.ended = end
        return done


def launch_train(args: list[str], *, processes: int, devices_per_process: int, timeout: float = 900,
                 kill_after: int = 0) -> Finished:
    """Run `nemojax train ARGS` as `processes` processes; returns their exit codes and output.

    kill_after: every process SIGKILLs itself right after the checkpoint of that step is on
    disk (tests/kill_after_save.py), i.e. the whole job is preempted without cleanup.
    """
    job = Job([args], processes=processes, devices_per_process=devices_per_process, kill_after=kill_after)
    return job.wait(timeout, stop_on_failure=not kill_after)


def train_sequence(runs: list[list[str]], *, processes: int, devices_per_process: int,
                   timeout: float = 900) -> Finished:
    """`nemojax train RUN` for each RUN in turn, in the same `processes` processes."""
    return Job(runs, processes=processes, devices_per_process=devices_per_process).wait(timeout)


def wait_until(job: Job, ready: Callable[[], bool], what: str, timeout: float = 600) -> None:
    """Until `ready()`; fails (and kills the job) if the job ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if not job.running():
            job.kill()
            raise AssertionError(f"the job ended before {what}:\n" + job.output().explain())
        time.sleep(0.05)
    job.kill()
    raise AssertionError(f"no {what} within {timeout}s:\n" + job.output().explain())


def logged_losses(run_dir: Path, missing_ok: bool = False) -> dict[int, float]:
    """{step: loss} from the run's metrics.jsonl (written by process 0)."""
    path = run_dir / "metrics.jsonl"
    if missing_ok and not path.exists():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return {r["step"]: r["loss"] for r in recs}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())

