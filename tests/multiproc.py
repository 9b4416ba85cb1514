"""Launching `nemojax train` the way a user does on a cluster, for tests: N processes on localhost,
each with its own fake CPU devices, joined through jax.distributed (NEMOJAX_* variables) on a
free port. Every wait is bounded; on any failure or timeout all children are killed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Finished:
    returncodes: list[int]
    stdout: list[str]
    stderr: list[str]

    def explain(self) -> str:
        return "\n".join(f"--- process {i} (rc={rc})\nSTDOUT\n{o[-2500:]}\nSTDERR\n{e[-4000:]}"
                         for i, (rc, o, e) in enumerate(zip(self.returncodes, self.stdout, self.stderr)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(Path(os.environ.get("NEMOJAX_TEST_CACHE", REPO / ".jax_cache"))),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.update(extra)
    return env


def launch_train(args: list[str], *, processes: int, devices_per_process: int, timeout: float = 900,
                 kill_after: int = 0) -> Finished:
    """Run `nemojax train ARGS` as `processes` processes; returns their exit codes and output.

    kill_after: every process SIGKILLs itself right after the checkpoint of that step is on
    disk (tests/kill_after_save.py), i.e. the whole job is preempted without cleanup.
    """
    entry = [str(REPO / "tests" / "kill_after_save.py"), str(kill_after)] if kill_after \
        else ["-m", "nemojax.cli", "train"]
    port = free_port()
    procs: list[subprocess.Popen] = []
    outs: list[tuple[str, str]] = []
    try:
        for pid in range(processes):
            extra = {} if processes == 1 else {
                "NEMOJAX_COORDINATOR": f"127.0.0.1:{port}", "NEMOJAX_NUM_PROCESSES": str(processes),
                "NEMOJAX_PROCESS_ID": str(pid)}
            procs.append(subprocess.Popen([sys.executable, *entry, *args], cwd=REPO,
                                          env=_env(devices_per_process, extra), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + timeout
        for i, p in enumerate(procs):
            try:
                outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                rest = [q.communicate(timeout=30) for q in procs[i:]]
                outs.extend(rest)
                raise AssertionError(f"nemojax train did not finish within {timeout}s:\n" + Finished(
                    [q.returncode for q in procs], [o for o, _ in outs], [e for _, e in outs]).explain()) from None
            if p.returncode != 0 and kill_after == 0:  # one process failed: do not wait for the others
                for q in procs[i + 1:]:
                    q.kill()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return Finished([p.returncode for p in procs], [o for o, _ in outs], [e for _, e in outs])


def logged_losses(run_dir: Path) -> dict[int, float]:
    """{step: loss} from the run's metrics.jsonl (written by process 0)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs}


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
