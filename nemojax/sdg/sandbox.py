"""Run untrusted generated Python in a separate, resource-limited process.

Never in the calling process: the code runs as `python -I` (isolated: no user site, no
PYTHON* environment) in a fresh temporary directory, with an empty environment, in its own
process group, under rlimits on address space (memory), CPU seconds, file size and open files,
and a wall-clock timeout after which the whole group is killed. It is a guard against runaway
or careless code (infinite loops, memory bombs, stray files), not a security boundary against
hostile code; run pipelines that execute model code on a machine you can afford to lose, or in
a container.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class RunResult:
    passed: bool
    reason: str  # ok | failed | timeout | memory | no_code
    returncode: int | None
    stderr: str


# The child sets its own limits before running the code (no preexec_fn: forking a multithreaded
# process such as a JAX one and running Python in the child can deadlock).
_LAUNCHER = """
import resource, runpy, sys
mem, cpu, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for limit, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, 10 * 1024 * 1024), (resource.RLIMIT_NOFILE, 64),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
sys.argv = [path]
runpy.run_path(path, run_name="__main__")
"""


async def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> RunResult:
    """Run `code`; passed when it exits 0 within the limits (its asserts are its tests)."""
    if not code.strip():
        return RunResult(False, "no_code", None, "")
    with tempfile.TemporaryDirectory(prefix="nemojax-sandbox-") as tmp:
        path = os.path.join(tmp, "solution.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(code)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", _LAUNCHER, str(memory_mb * 1024 * 1024), str(max(1, int(timeout_s) + 1)),
            path, cwd=tmp, env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
        except asyncio.TimeoutError:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
            return RunResult(False, "timeout", None, "")
        text = err.decode("utf-8", "replace")[-2000:]
        if proc.returncode == 0:
            return RunResult(True, "ok", 0, text)
        if "MemoryError" in text or proc.returncode == -signal.SIGKILL:
            return RunResult(False, "memory", proc.returncode, text)
        if proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
            return RunResult(False, "timeout", proc.returncode, text)
        return RunResult(False, "failed", proc.returncode, text)
