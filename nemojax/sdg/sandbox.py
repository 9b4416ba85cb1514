"""Run untrusted generated Python (Genetic Instruct's `fitness: tests`) in a sandbox that holds.

Generated code is hostile until proven otherwise: it may loop, fork, flood its output, allocate
in many processes, detach with `setsid`, write outside its directory, open sockets or signal its
parent. On Linux each run gets PID, mount, network, IPC and UTS namespaces (the tree dies with
its init; a read-only root with a private tmpfs /sandbox; no network), a uid of its own (root)
or a user namespace (otherwise), a memory+pids cgroup when one is writable, rlimits, and output
read incrementally with a cap. docs/SDG.md ("The sandbox for generated code") says which
mechanism enforces which limit on which platform. Without namespaces the run is refused
(`SandboxUnavailable`, naming how to enable them); `isolation="unsafe-process-group"` is the
explicit, warned opt-out.

A test counts only when its asserts ran: the program must have a top-level `assert` and reach
the end of its module, proven by a nonce it never sees (sandbox_child._WRAPPER); `sys.exit(0)` /
`os._exit(0)` before the end are `exited_early`.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import secrets
import signal
import sys
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

ISOLATIONS = ("auto", "unsafe-process-group")
_CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_TAIL_BYTES = 4096  # output kept for the record (the traceback is at the end)
_GRACE_S = 5.0  # beyond the timeout: setup and teardown, after which the runner kills the launcher


class SandboxUnavailable(RuntimeError):
    """Generated code cannot be isolated here; never run it unconfined by accident."""


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): never recorded as a failed test."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock, from launch to the whole tree being gone
    memory_mb: int = 512  # whole tree (cgroup) and per process (RLIMIT_AS)
    max_processes: int = 16  # processes of the program's tree, itself included
    file_size_mb: int = 8  # largest file it may write
    disk_mb: int = 32  # all it may write (tmpfs /sandbox)
    max_files: int = 256  # files and directories it may create
    max_output_kb: int = 1024  # stdout + stderr; past it the tree is killed


@dataclass
class RunResult:
    passed: bool
    # ok | failed | timeout | memory | output_limit | exited_early | no_asserts | no_code | killed
    reason: str
    returncode: int | None  # the program's exit status (negative: killed by that signal)
    output: str  # the last few KB of stdout + stderr
    output_bytes: int = 0
    seconds: float = 0.0


def top_level_asserts(code: str) -> int | None:
    """Asserts that run whenever the module body runs to its end: statements of the module body
    and of a top-level `if __name__ == "__main__":` block. None if the code does not parse."""
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError):
        return None
    n = 0
    for node in body:
        if isinstance(node, ast.Assert):
            n += 1
        elif isinstance(node, ast.If) and ast.unparse(node.test).replace("'", '"') == '__name__ == "__main__"':
            n += sum(isinstance(s, ast.Assert) for s in node.body)
    return n


@dataclass(frozen=True)
class _Plan:
    namespaces: bool
    user_ns: bool

    def describe(self) -> str:
        if not self.namespaces:
            return "unsafe-process-group (rlimits and a process group only)"
        who = "user namespace" if self.user_ns else "root, per-run uid"
        tree = "cgroup memory+pids" if _cgroup_parents() else "no writable cgroup: per-process limits"
        return f"PID+mount+network namespaces ({who}), {tree}"


def _plan(isolation: str) -> _Plan:
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation={isolation!r}: choose one of {', '.join(ISOLATIONS)}")
    if isolation == "unsafe-process-group":
        return _Plan(False, False)
    if sys.platform != "linux":
        raise SandboxUnavailable(_HOW_TO_ENABLE.format(error=f"namespaces need Linux, this is {sys.platform}"))
    return _Plan(True, os.geteuid() != 0)


_HOW_TO_ENABLE = (
    "cannot isolate generated code: {error}. The sandbox needs Linux PID, mount and network "
    "namespaces: run as root (e.g. in a container), or enable unprivileged user namespaces "
    "(sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces>0; on Ubuntu 24.04+ "
    "also kernel.apparmor_restrict_unprivileged_userns=0). To run it with rlimits only, on a "
    "machine you can afford to lose, set the stage's `sandbox: unsafe-process-group`.")

_checked: dict[str, str] = {}


async def ensure_sandbox(isolation: str = "auto") -> str:
    """Refuse early (SandboxUnavailable) unless a trivial program runs isolated here; returns
    what enforces the limits. Cached per process."""
    if isolation in _checked:
        return _checked[isolation]
    plan = _plan(isolation)
    if not plan.namespaces:
        warnings.warn("sandbox: unsafe-process-group runs generated code without isolation (no PID, "
                      "mount or network namespace): use it only on a machine you can afford to lose",
                      stacklevel=2)
    try:
        probe = await _run("assert True\n", SandboxLimits(timeout_s=30.0), plan)
    except SandboxError as e:
        raise SandboxUnavailable(_HOW_TO_ENABLE.format(error=e)) from None
    if not probe.passed:
        raise SandboxUnavailable(_HOW_TO_ENABLE.format(error=f"a trivial program gave {probe.reason}: "
                                                           f"{probe.output.strip()[-500:]}"))
    _checked[isolation] = plan.describe()
    return _checked[isolation]


async def run_python(code: str, limits: SandboxLimits | None = None, *, isolation: str = "auto",
                     require_asserts: bool = True) -> RunResult:
    """Run `code` as a program in the sandbox; passed when it ran to the end of its module within
    the limits (and, with `require_asserts`, has top-level asserts, which therefore all held).
    Raises SandboxUnavailable / SandboxError for failures of the sandbox, never of the code."""
    if not code.strip():
        return RunResult(False, "no_code", None, "")
    if require_asserts and top_level_asserts(code) == 0:
        return RunResult(False, "no_asserts", None, "no top-level assert statement: nothing would be tested")
    limits = limits or SandboxLimits()
    await ensure_sandbox(isolation)
    async with _slot():
        return await _run(code, limits, _plan(isolation))


# At most one sandbox per CPU at a time per event loop, so that timeouts measure the program,
# not the queue for a core.
_slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _slot() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    if loop not in _slots:
        _slots[loop] = asyncio.Semaphore(max(1, os.cpu_count() or 1))
    return _slots[loop]


async def _run(code: str, limits: SandboxLimits, plan: _Plan) -> RunResult:
    start = time.monotonic()
    nonce = secrets.token_hex(16)
    tree = _TreeLimits.create(limits) if plan.namespaces else None
    root = os.geteuid() == 0 and plan.namespaces  # unsafe mode keeps the runner's identity
    uid = (1 << 30) + secrets.randbelow(1 << 24) if root else os.getuid()
    status_r, status_w = os.pipe()
    cfg = {"mode": "namespaces" if plan.namespaces else "unsafe", "user_ns": plan.user_ns,
           "code": code, "nonce": nonce, "python": sys.executable, "status_fd": status_w,
           "cgroups": tree.procs if tree else [], "drop_root": root, "uid": uid, "gid": uid if root else os.getgid(),
           "timeout_s": float(limits.timeout_s), "cpu_s": max(1, int(limits.timeout_s) + 1),
           "memory_bytes": limits.memory_mb << 20, "file_bytes": limits.file_size_mb << 20,
           "disk_bytes": limits.disk_mb << 20, "max_files": limits.max_files,
           "max_processes": limits.max_processes,
           # RLIMIT_NPROC counts per user: meaningful under a per-run uid (root) or, since Linux
           # 5.14, per user namespace; elsewhere it would count all the caller's processes.
           "nproc": plan.namespaces and (root or _kernel() >= (5, 14))}
    proc = None
    tail, total, over, backstop = bytearray(), 0, False, False
    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", _CHILD, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, pass_fds=(status_w,), start_new_session=True,
                env={"PATH": "/usr/bin:/bin"})
        except OSError as e:
            raise SandboxError(f"cannot start the sandbox launcher: {e}") from None
        os.close(status_w)
        status_w = -1
        proc.stdin.write(json.dumps(cfg).encode())
        await proc.stdin.drain()
        proc.stdin.close()

        async def pump() -> None:  # bounded memory whatever the program writes
            nonlocal total, over
            while chunk := await proc.stdout.read(65536):
                total += len(chunk)
                tail.extend(chunk)
                del tail[:-_TAIL_BYTES]
                if total > limits.max_output_kb * 1024 and not over:
                    over = True
                    _signal(proc, signal.SIGTERM)  # the launcher kills the tree

        reader = asyncio.ensure_future(pump())
        try:
            await asyncio.wait_for(proc.wait(), timeout=limits.timeout_s + _GRACE_S)
        except asyncio.TimeoutError:
            backstop = True
            _signal(proc, signal.SIGKILL)  # init dies with it (PDEATHSIG); the cgroup is emptied below
            await proc.wait()
        try:  # every writer is gone once the launcher has exited (namespaces mode)
            await asyncio.wait_for(reader, timeout=1.0)
        except asyncio.TimeoutError:
            reader.cancel()
        report = _read_status(status_r)
    finally:
        if status_w >= 0:
            os.close(status_w)
        os.close(status_r)
        if proc is not None and proc.returncode is None:  # cancelled: take the tree down
            _signal(proc, signal.SIGKILL)
        oom = tree.finish() if tree else False
    seconds = time.monotonic() - start
    out = tail.decode("utf-8", "replace")

    def result(passed: bool, reason: str, rc: int | None) -> RunResult:
        return RunResult(passed, reason, rc, out, total, seconds)

    rc = -report["signal"] if "signal" in report else report.get("exit")
    if over:
        return result(False, "output_limit", rc)
    if report.get("stopped") == "timeout" or backstop:
        return result(False, "timeout", rc)
    if oom:
        return result(False, "memory", rc)
    if "error" in report or rc is None:
        raise SandboxError(f"sandbox failed: {report.get('error', 'no report from the launcher')} "
                           f"(launcher exit {proc.returncode}; output: {out.strip()[-300:]!r})")
    if rc == 0:
        return result(report.get("completed") is True, "ok" if report.get("completed") else "exited_early", rc)
    if rc == -signal.SIGXCPU:
        return result(False, "timeout", rc)
    if "MemoryError" in out:
        return result(False, "memory", rc)
    if rc == -signal.SIGKILL:
        return result(False, "killed", rc)
    return result(False, "failed", rc)


def _signal(proc: asyncio.subprocess.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _read_status(fd: int) -> dict:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    try:
        return json.loads(data) if data else {}
    except json.JSONDecodeError:
        return {"error": f"unreadable launcher report {data[:200]!r}"}


def _kernel() -> tuple[int, int]:
    """(major, minor) of the running kernel, (0, 0) if its release string does not start so: the
    minor's leading digits only ("5.4-rc7" is 5.4, not 5.47)."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m[1]), int(m[2])) if m else (0, 0)


# --- cgroups: memory and process count for the whole tree -----------------------------------------

_parents_cache: list[tuple[str, Path]] | None = None


def _cgroup_parents() -> list[tuple[str, Path]]:
    """Writable cgroup directories under which this process may create children: [("v1-memory",
    dir), ("v1-pids", dir)] or [("v2", dir)] (a delegated v2 cgroup with memory and pids enabled
    for its children), else []."""
    global _parents_cache
    if _parents_cache is None:
        _parents_cache = _find_cgroup_parents()
    return _parents_cache


def _find_cgroup_parents(proc_cgroup: Path = Path("/proc/self/cgroup"),
                         mountinfo: Path = Path("/proc/self/mountinfo")) -> list[tuple[str, Path]]:
    """The writable parents (see `_cgroup_parents`) from this process's cgroup membership and the
    mount table (files of the same formats can be passed in to test the branches a host lacks)."""
    try:
        own: dict[str, str] = {}
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(",") if controllers else ["v2"]:
                own[c] = path
        mounts: dict[str, tuple[str, str]] = {}
        for line in mountinfo.read_text().splitlines():
            left, _, right = line.partition(" - ")
            fields, (fstype, _src, opts) = left.split(), right.split()[:3]
            for c in ("memory", "pids"):
                if fstype == "cgroup" and c in opts.split(","):
                    mounts[c] = (fields[3], fields[4])
            if fstype == "cgroup2":
                mounts["v2"] = (fields[3], fields[4])
    except (OSError, ValueError):
        return []

    def own_dir(c: str) -> Path | None:
        if c not in own or c not in mounts:
            return None
        root, point = mounts[c]
        rel = os.path.relpath(own[c], root)
        d = Path(point) / rel if not rel.startswith("..") else None
        return d if d is not None and d.is_dir() and os.access(d, os.W_OK) else None

    mem, pids = own_dir("memory"), own_dir("pids")
    if mem and pids and (mem / "memory.limit_in_bytes").exists():
        return [("v1-memory", mem), ("v1-pids", pids)]
    v2 = own_dir("v2")
    if v2 is not None:
        try:
            enabled = (v2 / "cgroup.subtree_control").read_text().split()
        except OSError:
            enabled = []
        if "memory" in enabled and "pids" in enabled:
            return [("v2", v2)]
    return []


class _TreeLimits:
    """One run's cgroup(s): created with the limits, joined by the launcher, emptied and removed."""

    _serial = 0

    def __init__(self, dirs: list[tuple[str, Path]]) -> None:
        self.dirs = dirs
        self.procs = [str(d / "cgroup.procs") for _, d in dirs]

    @classmethod
    def create(cls, limits: SandboxLimits) -> _TreeLimits | None:
        parents = _cgroup_parents()
        if not parents:
            return None
        cls._serial += 1
        name = f"nemojax-sandbox-{os.getpid()}-{cls._serial}-{secrets.token_hex(3)}"
        memory, pids = str(limits.memory_mb << 20), str(limits.max_processes + 2)  # + launcher, init
        made: list[tuple[str, Path]] = []
        try:
            for kind, parent in parents:
                d = parent / name
                d.mkdir()
                made.append((kind, d))
                if kind == "v1-memory":
                    (d / "memory.limit_in_bytes").write_text(memory)
                    if (d / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                        (d / "memory.memsw.limit_in_bytes").write_text(memory)
                elif kind == "v1-pids":
                    (d / "pids.max").write_text(pids)
                else:
                    (d / "memory.max").write_text(memory)
                    if (d / "memory.swap.max").exists():
                        (d / "memory.swap.max").write_text("0")
                    (d / "pids.max").write_text(pids)
        except OSError as e:
            cls(made).finish()
            raise SandboxError(f"cannot set up cgroup {name}: {e}") from None
        return cls(made)

    def finish(self) -> bool:
        """Kill whatever is left, remove the cgroups; True if the OOM killer acted inside."""
        oom = False
        for kind, d in self.dirs:
            events = {"v1-memory": "memory.oom_control", "v2": "memory.events"}.get(kind)
            if events:
                try:
                    for line in (d / events).read_text().splitlines():
                        key, _, value = line.partition(" ")
                        oom |= key == "oom_kill" and int(value) > 0
                except (OSError, ValueError):
                    pass
            for _ in range(200):
                try:
                    left = [int(p) for p in (d / "cgroup.procs").read_text().split()]
                except OSError:
                    break
                if not left:
                    break
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.01)
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
        return oom
