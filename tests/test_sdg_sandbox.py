"""The sandbox for generated code (nemojax/sdg/sandbox.py) against the attacks of issue 18, each
observed from outside the sandbox: host processes left behind (a marker in their command line),
files the test owns, a listener the test opens, a process the test owns, the runner's peak RSS.

The strong path (namespaces + cgroups, what CI runs as root) is tested here; the unprivileged
user-namespace path a laptop gets is tested by running the runner as `nobody`. A test skips only
when its mechanism is genuinely absent, and says which.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from nemojax.sdg import sandbox
from nemojax.sdg.sandbox import (RunResult, SandboxLimits, SandboxUnavailable, _TreeLimits, run_python,
                                  top_level_asserts)

SANDBOX_PY = Path(sandbox.__file__)
HOSTNAME = socket.gethostname()


@pytest.fixture(autouse=True)
def _host_keeps_its_name():
    """Put the host's name back after any test whose run renamed it (a sandbox without its UTS
    namespace does), so one broken run cannot fail every later test: under mutation testing that
    turned 104 surviving mutants into false kills."""
    yield
    if socket.gethostname() != HOSTNAME:
        socket.sethostname(HOSTNAME)


def namespaces_available() -> bool:
    """Independently of the sandbox: can util-linux `unshare` make PID, network and mount
    namespaces here (with a user namespace when not root)?"""
    if sys.platform != "linux" or not shutil.which("unshare"):
        return False
    user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    return subprocess.run(["unshare", *user, "--pid", "--net", "--mount", "--fork", "true"],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module", autouse=True)
def isolation() -> str:
    try:
        return asyncio.run(sandbox.ensure_sandbox())
    except SandboxUnavailable as e:
        if namespaces_available():
            raise  # the mechanism is here: the sandbox is broken, not absent
        pytest.skip(f"no namespaces here: {e}")


def run(code: str, **limits) -> tuple[RunResult, float]:
    start = time.monotonic()
    result = asyncio.run(run_python(textwrap.dedent(code), SandboxLimits(**limits)))
    return result, time.monotonic() - start


def host_processes(mark: str) -> list[int]:
    """Host pids whose command line contains `mark` (the sandbox's processes are visible here)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if mark.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def cgroup_v1_writable() -> bool:
    """Independently of the sandbox's discovery (CI's machine): root, with the cgroup v1 memory
    and pids hierarchies mounted read-write."""
    found = set()
    for m in Path("/proc/self/mounts").read_text().splitlines():
        fstype, opts = m.split()[2], m.split()[3].split(",")
        if fstype == "cgroup" and "rw" in opts:
            found |= {"memory", "pids"} & set(opts)
    return os.geteuid() == 0 and found == {"memory", "pids"}


def detached_sleeper(mark: str) -> str:
    """Code that leaves a grandchild in a new session (setsid), holding stdout/stderr open,
    sleeping under a command line carrying `mark`."""
    return textwrap.dedent(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{mark}"])
            os._exit(0)
        os.wait()
    """)


# --- a test counts only when its asserts ran ------------------------------------------------------

@pytest.mark.parametrize("code,reason", [
    ("assert sum([1, 2]) == 3", "ok"),
    ('def f(x):\n    return x\nif __name__ == "__main__":\n    assert f(2) == 2', "ok"),
    ("assert 1 == 2", "failed"),
    ("import sys\nsys.exit(0)\nassert 1 == 2", "exited_early"),
    ("import os\nos._exit(0)\nassert 1 == 2", "exited_early"),
    ("raise SystemExit\nassert 1 == 2", "exited_early"),
    ("def test():\n    assert 1 == 2", "no_asserts"),  # never called: nothing tested
    ("print('ok')", "no_asserts"),
    # the assert statement raises the real AssertionError whatever builtins say
    ("import builtins\nbuiltins.AssertionError = KeyError\nassert 1 == 2", "failed"),
    # forging the completion marker without the nonce
    ("import os\nos.write(4, b'0' * 32 + b'\\n')\nos._exit(0)\nassert 1 == 2", "exited_early"),
    ("import os\ntry:\n    os.write(4, os.read(3, 64))\nexcept OSError:\n    pass\nos._exit(0)\nassert 1 == 2",
     "exited_early"),  # fd 3 (the nonce) is closed before the solution starts
])
def test_a_test_passes_only_when_its_asserts_ran(code, reason):
    """Mutants: `fitness: tests` passing code that calls sys.exit(0) / os._exit(0) before its
    asserts (exit status 0 taken as success); code without top-level asserts passing vacuously."""
    result, _ = run(code)
    assert (result.reason, result.passed) == (reason, reason == "ok"), result.output


def test_top_level_asserts_counts_only_asserts_that_must_run():
    assert top_level_asserts("assert 1\nassert 2") == 2
    assert top_level_asserts("if __name__ == '__main__':\n    assert 1") == 1
    assert top_level_asserts("if x:\n    assert 1\nfor i in []:\n    assert 1\ndef f():\n    assert 1") == 0
    assert top_level_asserts("def (") is None


NONCE_HUNT = r"""
import gc, os, re, sys
HEX = re.compile(rb"^[0-9a-f]{32}$")
found, refused, seen = [], [], set()
def look(obj, depth):
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, (bytes, str)):
        data = obj if isinstance(obj, bytes) else obj.encode("utf-8", "replace")
        if HEX.match(data.strip()):
            found.append(data.strip())
        return
    children = []
    if isinstance(obj, dict):
        children = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    for name in ("__dict__", "args", "keywords", "func", "f_locals", "f_globals", "f_back", "__closure__",
                 "cell_contents", "__self__", "__wrapped__"):
        try:
            children.append(getattr(obj, name))
        except Exception:
            pass
    try:
        children.append(obj.__reduce_ex__(4))
    except Exception:
        pass
    for child in children:
        look(child, depth + 1)
look(sys._getframe(), 0)
look(sys.modules, 0)
try:
    raise ValueError
except ValueError as e:
    look(e.__traceback__.tb_frame, 0)
for attempt in (lambda: gc.get_objects(), lambda: gc.get_referrers(sys.modules),
                lambda: sys._current_frames(), lambda: sys.settrace(lambda *a: None),
                lambda: __import__("ctypes").string_at(id(sys), 8),
                lambda: open("/proc/self/mem", "rb")):
    try:
        look(attempt(), 0)
    except Exception as e:
        refused.append(type(e).__name__)
print("found", len(found), "refused", refused, flush=True)
for candidate in found:
    os.write(4, candidate + b"\n")
os._exit(0)
assert False
"""


def test_the_completion_nonce_is_out_of_the_programs_reach():
    """Mutant: the wrapper keeps the nonce anywhere the solution can reach (a global, a frame
    local, an object attribute), or the audit hook misses gc / ctypes / other threads' frames:
    the hunt below finds it and forges the marker."""
    result, _ = run(NONCE_HUNT, timeout_s=20.0)
    assert result.reason == "exited_early", result.output
    assert "found 0 " in result.output, result.output
    assert result.output.count("RuntimeError") == 5 and "FileNotFoundError" in result.output, result.output


# --- the whole tree dies at the timeout, and does not hold the runner -----------------------------

def test_setsid_grandchild_is_killed_at_the_timeout_and_cannot_hold_the_output_open():
    """Attack (issue 18): a grandchild that calls setsid outlived the timeout (a process group is
    not a tree) and, holding stderr open, made run_python(timeout_s=1) return after 20 s.
    Mutant: killing the launcher's process group instead of the PID namespace's init."""
    mark = "nemojax-sandbox-test-" + secrets.token_hex(6)
    result, seconds = run(detached_sleeper(mark) + "import time\ntime.sleep(60)\nassert True\n", timeout_s=1.0)
    assert result.reason == "timeout" and seconds < 3.0, (result, seconds)
    assert host_processes(mark) == []


def test_background_processes_die_with_the_program():
    """A program that exits at once leaves no daemon behind (its namespace dies with it)."""
    mark = "nemojax-sandbox-test-" + secrets.token_hex(6)
    result, seconds = run(detached_sleeper(mark) + "assert True\n", timeout_s=10.0)
    assert result.reason == "ok" and seconds < 3.0, (result, seconds)
    assert host_processes(mark) == []


def test_cancelling_a_run_takes_its_tree_down():
    mark = "nemojax-sandbox-test-" + secrets.token_hex(6)

    async def cancelled() -> None:
        task = asyncio.ensure_future(run_python(detached_sleeper(mark) + "import time\n"
                                                "time.sleep(60)\nassert True\n", SandboxLimits(timeout_s=30)))
        await asyncio.sleep(1.0)
        assert host_processes(mark)  # it runs
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    deadline = time.monotonic() + 3
    while host_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host_processes(mark) == []


# --- output, processes, memory, files ------------------------------------------------------------

FLOOD = """
import sys
block = b"x" * (1 << 20)
for _ in range(400):
    sys.stderr.buffer.write(block)
sys.stderr.flush()
assert True
"""

RSS_PROBE = r"""
import asyncio, json, sys
from nemojax.sdg.sandbox import SandboxLimits, run_python
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
asyncio.run(run_python("assert True"))
before = hwm()
r = asyncio.run(run_python(sys.stdin.read(), SandboxLimits(timeout_s=60, max_output_kb=int(sys.argv[1]))))
print(json.dumps({"before": before, "after": hwm(), "reason": r.reason, "bytes": r.output_bytes,
                  "kept": len(r.output)}))
"""


def test_output_flood_is_read_incrementally_and_capped():
    """Attack (issue 18): 400 MB on stderr grew the runner to 824 MB (communicate() buffers it
    all). Mutant: buffering the output, or no cap. The runner's peak RSS, measured in its own
    process, stays flat while it reads all 400 MB; with the default cap the tree is killed."""
    probe = subprocess.run([sys.executable, "-c", RSS_PROBE, str(600 << 10)], input=FLOOD, capture_output=True,
                           text=True, timeout=120, env=os.environ)
    m = json.loads(probe.stdout.strip().splitlines()[-1])
    assert m["reason"] == "ok" and m["bytes"] == 400 << 20 and m["kept"] <= 4096, m
    assert m["after"] - m["before"] < 32 << 20, m  # flat: the flood is 400 MB
    result, seconds = run(FLOOD)
    assert result.reason == "output_limit" and len(result.output) <= 4096 and seconds < 5, (result.reason, seconds)


def test_process_count_is_limited():
    """Attack (issue 18): 60 forks succeeded. Mutant: no pids cgroup / RLIMIT_NPROC."""
    result, _ = run("""
        import os, time
        n = 0
        for _ in range(60):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            n += 1
        print("forks", n)
        assert True
    """, max_processes=8)
    assert result.reason == "ok", result.output
    assert int(result.output.split()[-1]) <= 7, result.output  # 8 processes including the program


def test_fork_bomb_is_contained():
    result, seconds = run("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        assert True
    """, timeout_s=1.0, max_processes=8)
    assert result.reason == "timeout" and seconds < 4, (result, seconds)


def test_memory_limit_covers_the_whole_tree():
    """Attack (issue 18): three children held 400 MB each, as the limit was per process
    (RLIMIT_AS). Mutant: no memory cgroup, or its limit not applied to the launcher's tree."""
    if cgroup_v1_writable():
        assert sandbox._cgroup_parents(), "cgroup v1 memory+pids are writable here, yet the sandbox found none"
    elif not sandbox._cgroup_parents():
        pytest.skip("no writable memory+pids cgroup (v1, or v2 delegated): the memory limit is per process")
    result, _ = run("""
        import os, time
        kids = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                block = b"x" * (400 << 20)  # touched, not just reserved
                time.sleep(30)
                os._exit(0)
            kids.append(pid)
        time.sleep(3)
        assert True
    """, timeout_s=10.0, memory_mb=512)
    assert result.reason == "memory", (result.reason, result.output)


def test_tree_limits_are_cgroup_limits_seen_from_the_host():
    """The limits docs/SDG.md promises, read from the host while the program runs: the run's
    cgroup holds the launcher, init and the program with pids.max and the memory limit set, and
    is gone afterwards. Mutants: a limit not written; the cgroup left behind."""
    if not cgroup_v1_writable():
        pytest.skip("checks the cgroup v1 files CI's machine has")
    parents = dict(sandbox._cgroup_parents())

    async def observe() -> tuple[dict, RunResult]:
        task = asyncio.ensure_future(run_python("import time\ntime.sleep(1.5)\nassert True",
                                                SandboxLimits(memory_mb=300, max_processes=5)))
        seen: dict = {}
        for _ in range(100):
            await asyncio.sleep(0.05)
            mine = [d for d in parents["v1-pids"].glob(f"nemojax-sandbox-{os.getpid()}-*")]
            if mine and len((mine[0] / "cgroup.procs").read_text().split()) >= 3:
                mem = parents["v1-memory"] / mine[0].name
                seen = {"dirs": [mine[0], mem], "pids.max": (mine[0] / "pids.max").read_text().strip(),
                        "memory": int((mem / "memory.limit_in_bytes").read_text()),
                        "procs": len((mem / "cgroup.procs").read_text().split())}
                break
        return seen, await task

    seen, result = asyncio.run(observe())
    assert result.reason == "ok" and seen, (result, seen)
    assert (seen["pids.max"], seen["memory"], seen["procs"]) == ("7", 300 << 20, 3), seen
    assert not any(d.exists() for d in seen["dirs"])


def test_one_process_over_the_limit_fails_as_memory():
    result, _ = run("block = b'x' * (1 << 30)\nassert True", memory_mb=256)
    assert result.reason == "memory", result.output


def test_writes_stay_inside_its_own_directory(tmp_path):
    """Attack (issue 18): files outside the temp dir were written. Mutant: no mount namespace /
    read-only root; no file-size or disk cap."""
    outside = tmp_path / "outside.txt"
    result, _ = run(f"""
        import json, os
        outcome = {{}}
        for path in ({str(outside)!r}, "/tmp/x", "/usr/x", "/etc/x", "/x", "/root/x", "/dev/shm/x"):
            try:
                with open(path, "w") as f:
                    f.write("escaped")
                outcome[path] = "written"
            except OSError as e:
                outcome[path] = type(e).__name__
        with open("inside.txt", "w") as f:
            f.write("fine")
        try:
            with open("big", "wb") as f:
                f.write(b"x" * (2 << 20))
            outcome["file_size"] = "written"
        except OSError as e:
            outcome["file_size"] = type(e).__name__ + str(e.errno)
        os.remove("big")
        try:
            for i in range(8):
                with open(f"part{{i}}", "wb") as f:
                    f.write(b"x" * (1 << 20))
            outcome["disk"] = "written"
        except OSError as e:
            outcome["disk"] = str(e.errno)
        import sys
        for path in ("/", "/usr", "/dev", sys.prefix, sys.base_prefix, "/sandbox"):
            outcome["ro " + path] = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
        print(json.dumps(outcome))
        assert open("inside.txt").read() == "fine"
    """, file_size_mb=1, disk_mb=4)
    assert result.reason == "ok", result.output
    outcome = json.loads(result.output.strip().splitlines()[-1])
    assert not outside.exists()
    assert "written" not in outcome.values(), outcome
    read_only = {k[3:]: v for k, v in outcome.items() if k.startswith("ro ")}
    assert read_only.pop("/sandbox") is False and all(read_only.values()), read_only
    assert outcome["file_size"].endswith("27") and outcome["disk"] == "28", outcome  # EFBIG, ENOSPC


def test_the_program_runs_with_its_rlimits_on_nosuid_nodev_mounts():
    """The program's own limits, read from inside: no core dumps, 64 open files, the file-size cap;
    its root and /sandbox mounted nosuid and nodev (a set-uid binary or a device node written to
    /sandbox gives nothing); the four devices there. Mutants (sandbox_child.py, cosmic-ray):
    RLIMIT_CORE -1 (unlimited), /sandbox's tmpfs flags `MS_NOSUID & MS_NODEV` (0), no device bound;
    (sandbox.py, mutmut) the CPU limit's `+ 1` changed, the memory or disk size shifted by 21.
    The CPU limit is the wall timeout + 1 s, so a busy loop dies by SIGXCPU at the latest then."""
    result, _ = run("""
        import json, os, resource
        out = {name: resource.getrlimit(getattr(resource, "RLIMIT_" + name.upper()))
               for name in ("core", "nofile", "fsize")}
        for path in ("/", "/sandbox"):
            flags = os.statvfs(path).f_flag
            out[path] = [bool(flags & os.ST_NOSUID), bool(flags & os.ST_NODEV)]
        out["cpu"] = resource.getrlimit(resource.RLIMIT_CPU)
        out["as"] = resource.getrlimit(resource.RLIMIT_AS)
        st = os.statvfs("/sandbox")
        out["disk"] = st.f_blocks * st.f_frsize
        with open("/dev/null", "w") as null:
            null.write("x")
        out["devices"] = [len(open("/dev/" + name, "rb").read(4)) for name in ("zero", "urandom", "random")]
        print(json.dumps(out))
        assert True
    """, file_size_mb=2, timeout_s=5.0, memory_mb=300, disk_mb=6)
    assert result.reason == "ok", result.output
    assert json.loads(result.output.strip().splitlines()[-1]) == {"cpu": [6, 6], "as": [300 << 20, 300 << 20],
                                                                   "disk": 6 << 20, 
        "core": [0, 0], "nofile": [64, 64], "fsize": [2 << 20, 2 << 20], "/": [True, True], "/sandbox": [True, True],
        "devices": [4, 4, 4]}


def test_a_program_that_leaves_its_process_group_is_still_waited_for():
    """The program may call setsid (a new session and process group): init must still reap it by
    pid and report. Mutant (cosmic-ray): `waitpid(-0, ...)`, i.e. waiting for the caller's process
    group only (the program would be lost and the run fail as a sandbox error)."""
    result, _ = run("""
        import os
        os.setsid()
        assert os.getpgrp() == os.getpid()
    """, timeout_s=10.0)
    assert result.reason == "ok", result


def test_mount_points_under_a_directory_with_escaped_names(tmp_path):
    """The launcher remounts read-only every mount under the new root, read from mountinfo, whose
    names escape spaces as octal (`\\040`). Mutants (cosmic-ray): the escape decoded from the wrong
    group or base, `point == under` compared otherwise (a sibling like /newer, or /, counted)."""
    from nemojax.sdg import sandbox_child

    info = tmp_path / "mountinfo"
    info.write_text("".join(f"{i} 1 0:{i} / {point} rw - tmpfs tmpfs rw\n" for i, point in enumerate((
        "/", "/new", "/new/usr", "/new/my\\040dir", "/newer", "/ne", "/old/new", "/new/a\\011b"))))
    assert sandbox_child._mount_points(str(info), "/new") == ["/new", "/new/usr", "/new/my dir", "/new/a\tb"]


def test_bind_paths_are_distinct_and_not_nested():
    """Each directory of the Python installation is bound once, and not again under a directory
    already bound (the venv's interpreter under its base prefix). Mutant (cosmic-ray): the
    dedup's `or` as `and` (sys.prefix == sys.exec_prefix bound twice)."""
    from nemojax.sdg import sandbox_child

    paths = sandbox_child._bind_paths(sys.executable)
    assert len(set(paths)) == len(paths), paths
    assert not [(p, q) for p in paths for q in paths if p != q and p.startswith(q.rstrip("/") + "/")], paths
    assert os.path.realpath(sys.base_prefix) in paths or any(
        os.path.realpath(sys.base_prefix).startswith(q + "/") for q in paths)


def test_an_orphan_exiting_first_does_not_end_the_run():
    """init reaps orphans of the program (here a grandchild whose parent exited) but reports the
    program's own exit: status 3, a failure, not the orphan's 0. Mutant (cosmic-ray): `pid >=
    child` (the first orphan to exit taken for the program)."""
    result, _ = run("""
        import os, sys, time
        if os.fork() == 0:
            if os.fork() == 0:
                time.sleep(0.2)
                os._exit(0)
            os._exit(0)
        os.wait()
        time.sleep(1.0)
        sys.exit(3)
        assert True
    """, timeout_s=10.0)
    assert (result.reason, result.returncode) == ("failed", 3), result


def test_the_program_runs_under_a_uid_of_its_own():
    """As root, each run's program gets a random uid and gid in [2**30, 2**30 + 2**24): no
    real user's, never root's. Mutants: the uid range's arithmetic, the gid left at the runner's."""
    if os.geteuid() != 0:
        pytest.skip("the per-run uid is the root path's")
    result, _ = run("""
        import os
        print(os.getuid(), os.getgid(), os.getgroups())
        assert True
    """)
    uid, gid, groups = result.output.split(maxsplit=2)
    assert 1 << 30 <= int(uid) < (1 << 30) + (1 << 24) and gid == uid and groups.strip() == "[]", result


def test_what_the_runner_reports_about_the_program():
    """The result says how the program ended: killed by a signal (negative returncode, "killed"),
    its output decoded with invalid UTF-8 replaced, its wall time. Mutants: the signal's sign or
    key, `decode` without "replace" (or a misspelt handler), `seconds` dropped or `now + start`."""
    start = time.monotonic()
    result = asyncio.run(run_python("import os, sys\nsys.stdout.buffer.write(b'ok\\xff\\n')\nsys.stdout.flush()\n"
                                    "os.kill(os.getpid(), 9)\nassert True"))
    wall = time.monotonic() - start
    assert (result.reason, result.returncode, result.passed) == ("killed", -9, False), result
    assert result.output == "ok\ufffd\n" and 0 < result.seconds <= wall, result


def test_the_output_cap_is_exact():
    """max_output_kb * 1024 bytes are allowed, one more byte is over. Mutants: `>=`, `* 1025`,
    the over-limit result passed."""
    ok = asyncio.run(run_python("import sys\nsys.stdout.write('x' * 1024)\nassert True", SandboxLimits(max_output_kb=1)))
    over = asyncio.run(run_python("import sys\nsys.stdout.write('x' * 1025)\nsys.stdout.flush()\n"
                                  "import time\ntime.sleep(5)\nassert True", SandboxLimits(max_output_kb=1)))
    assert (ok.reason, ok.output_bytes) == ("ok", 1024), ok
    assert (over.reason, over.passed) == ("output_limit", False), over


def test_a_forged_completion_marker_is_not_completion():
    """The program can write to the completion pipe (fd 4) but does not know the nonce: bytes that
    sort after it are not the marker. Mutant (cosmic-ray): the marker compared with `>=`."""
    result, _ = run("""
        import os
        os.write(4, b"\\xff" * 40 + b"\\n")
        os._exit(0)
        assert True
    """)
    assert result.reason == "exited_early", result


def test_the_hosts_hostname_is_untouched():
    """The program's hostname is "sandbox", set in a UTS namespace of its own: the host keeps its
    name. Mutant (cosmic-ray): `CLONE_NEWIPC & CLONE_NEWUTS` (no UTS namespace: sethostname
    renamed the host; this happened to the machine that ran the mutation test)."""
    before = socket.gethostname()
    result, _ = run("""
        import socket
        print(socket.gethostname())
        assert True
    """)
    after = socket.gethostname()
    assert result.reason == "ok" and result.output.split() == ["sandbox"], result
    assert after == before == HOSTNAME, f"the run renamed the host from {before!r} to {after!r}"


def test_launcher_syscall_errors_carry_their_errno():
    """A failing mount / unshare / pivot_root raises OSError with the C library's errno, never
    passes silently. Mutants (cosmic-ray): libc loaded without `use_errno` (errno 0), `rc > 0` for
    `rc != 0` (libc reports failure as -1: every failure ignored)."""
    from nemojax.sdg import sandbox_child

    rc = sandbox_child._libc.umount2(b"/nonexistent-nemojax-mount-point", 0)
    assert rc == -1
    with pytest.raises(OSError, match="umount probe: ") as e:
        sandbox_child._check(rc, "umount probe")
    assert e.value.errno in (2, 1, 22), e.value  # ENOENT (or EPERM / EINVAL): a real errno, not 0
    sandbox_child._check(0, "fine")


def test_a_background_process_holding_the_marker_pipe_does_not_break_the_report():
    """A program that exits early while a child it forked still holds the completion pipe open:
    the launcher's non-blocking read finds the pipe empty but open (BlockingIOError) and reports
    an early exit, not an error. Mutant (cosmic-ray): that exception not caught."""
    result, seconds = run("""
        import os, time
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        os._exit(0)
        assert True
    """, timeout_s=10.0)
    assert result.reason == "exited_early" and seconds < 5.0, (result, seconds)


def test_no_network_not_even_to_the_hosts_localhost():
    """Attack (issue 18): a TCP connection to a localhost listener went through. Mutant: no
    network namespace."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        result, _ = run(f"""
            import socket
            errors = []
            for target in (("127.0.0.1", {port}), ("::1", {port}), ("8.8.8.8", 53)):
                try:
                    socket.create_connection(target, timeout=1).close()
                    errors.append("connected")
                except OSError as e:
                    errors.append(type(e).__name__)
            try:
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", {port}))
                errors.append("sent")
            except OSError as e:
                errors.append(type(e).__name__)
            print(errors)
            assert "connected" not in errors and "sent" not in errors
        """)
        assert result.reason == "ok", result.output
        with pytest.raises(socket.timeout):
            listener.accept()


def test_proc_host_processes_and_the_parent_are_out_of_reach():
    """Attacks: reading/writing through /proc, signalling the runner or any host process, killing
    the parent, using privileges (setuid, chroot, mknod, sethostname). Mutants: /proc mounted, no
    PID namespace, the program left as root (caps) instead of a uid of its own."""
    victim = subprocess.Popen(["sleep", "30"])
    try:
        result, _ = run(f"""
            import os, signal
            outcome = []
            for path, mode in (("/proc/self/mem", "rb"), ("/proc/1/environ", "rb"),
                               ("/proc/sys/kernel/hostname", "w"), ("/sys/kernel/uevent_helper", "w")):
                try:
                    open(path, mode).close()
                    outcome.append("opened " + path)
                except OSError as e:
                    outcome.append(type(e).__name__)
            for attempt in (lambda: os.setuid(0), lambda: os.chroot("/sandbox"), lambda: os.setgroups([]),
                            lambda: os.mknod("dev", 0o600 | 0o020000, os.makedev(1, 3)),
                            lambda: __import__("socket").sethostname("x")):
                try:
                    attempt()
                    outcome.append("opened privilege")
                except OSError as e:
                    outcome.append(type(e).__name__)
            for pid in ({victim.pid}, {os.getpid()}, os.getppid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                    outcome.append("signalled " + str(pid))
                except OSError as e:
                    outcome.append(type(e).__name__)
            try:
                os.kill(-1, signal.SIGKILL)  # everything it may signal (not itself): nothing
                outcome.append("signalled all")
            except OSError as e:
                outcome.append(type(e).__name__)
            print(outcome)
            assert True
        """)
        assert victim.poll() is None  # the test's own process survived
        assert "opened" not in result.output, result.output
        for pid in (victim.pid, os.getpid()):  # invisible from its PID namespace
            assert f"signalled {pid}" not in result.output, result.output
        assert result.reason == "ok" and "signalled all" not in result.output, result.output
    finally:
        victim.kill()
        victim.wait()


# --- the unprivileged path (a laptop) ---------------------------------------------------------------

UNPRIVILEGED = r"""
import asyncio, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("nemojax_sandbox", sys.argv[1])
sb = importlib.util.module_from_spec(spec)
sys.modules["nemojax_sandbox"] = sb
spec.loader.exec_module(sb)
out = {"isolation": asyncio.run(sb.ensure_sandbox())}
for name, code, timeout in json.loads(sys.stdin.read()):
    r = asyncio.run(sb.run_python(code, sb.SandboxLimits(timeout_s=timeout, max_processes=8)))
    out[name] = [r.reason, r.output[-300:]]
print(json.dumps(out))
"""


def test_unprivileged_user_namespace_path(tmp_path):
    """Without root (a laptop): the same isolation from an unprivileged user namespace, the
    process count from RLIMIT_NPROC counted per user namespace (Linux >= 5.14). Skipped only when
    util-linux's `unshare` cannot make those namespaces as `nobody` either. Mutant
    (sandbox_child.py, cosmic-ray): CLONE_NEWUSER's value changed (the sandbox says it cannot
    isolate, which the test used to take for a host without user namespaces)."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if os.geteuid() != 0 or not shutil.which("setpriv") or not python:
        pytest.skip("needs root to become `nobody`, setpriv and a system python3")
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
                            f"open({str(SANDBOX_PY)!r}).close()"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("this checkout is not readable by an unprivileged user")
    if "from mutmut." in SANDBOX_PY.read_text():
        # scripts/mutation.py's trampolined copy needs mutmut, which the system python lacks; its
        # confirmation run checks every surviving mutant here against the plain source
        pytest.skip("sandbox.py is mutmut's instrumented copy, which a system python3 cannot load")
    mark = "nemojax-sandbox-test-" + secrets.token_hex(6)
    jobs = [("ok", "assert 1 + 1 == 2", 5.0),
            ("exit", "import sys\nsys.exit(0)\nassert False", 5.0),
            ("setsid", detached_sleeper(mark) + "import time\ntime.sleep(60)\nassert True", 1.0),
            ("forks", "import os, time\nn = 0\nfor _ in range(60):\n    try:\n        pid = os.fork()\n"
                      "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n"
                      "        os._exit(0)\n    n += 1\nprint(n)\nassert n < 8", 5.0),
            ("write", f"open({str(tmp_path / 'x')!r}, 'w')\nassert True", 5.0),
            ("net", "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\nassert True", 5.0),
            ("parent", "import os, time\nos.kill(os.getppid(), 9)\ntime.sleep(0.2)\nassert True", 5.0)]
    start = time.monotonic()
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c",
                           UNPRIVILEGED, str(SANDBOX_PY)], input=json.dumps(jobs), capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    if "cannot isolate" in proc.stderr:
        # decided independently of the sandbox (a mutant that breaks its unshare must fail here)
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "unshare", "--user",
                                "--map-root-user", "--pid", "--net", "--mount", "--fork", "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"unprivileged user namespaces are disabled here: {proc.stderr.strip()[-300:]}")
    out = json.loads(proc.stdout)
    assert "user namespace" in out["isolation"], out
    assert {k: v[0] for k, v in out.items() if k != "isolation"} == {
        "ok": "ok", "exit": "exited_early", "setsid": "timeout", "forks": "ok", "write": "failed", "net": "failed",
        "parent": "ok"}, out  # init ignores the kill, survives and reports
    assert "Network is unreachable" in out["net"][1] and not (tmp_path / "x").exists()
    assert host_processes(mark) == [] and time.monotonic() - start < 30


# --- refusing to run unconfined ---------------------------------------------------------------------

FAILING_LAUNCHER = """
import json, os, sys
cfg = json.loads(sys.stdin.read())
os.write(cfg["status_fd"], json.dumps({"error": "OSError: unshare: Operation not permitted"}).encode())
"""


def test_refuses_when_it_cannot_isolate(monkeypatch, tmp_path):
    """No namespaces -> SandboxUnavailable naming how to enable them and the explicit opt-out;
    never a silent unconfined run, never a failed test recorded for the candidate."""
    fake = tmp_path / "launcher.py"
    fake.write_text(FAILING_LAUNCHER)
    monkeypatch.setattr(sandbox, "_CHILD", str(fake))
    monkeypatch.setattr(sandbox, "_checked", {})
    with pytest.raises(SandboxUnavailable, match="unshare: Operation not permitted.*user namespaces.*"
                                                 "unsafe-process-group"):
        asyncio.run(run_python("assert True"))
    monkeypatch.setattr(sandbox.sys, "platform", "darwin")
    with pytest.raises(SandboxUnavailable, match="need Linux"):
        asyncio.run(sandbox.ensure_sandbox())


GARBAGE_LAUNCHER = """
import json, os, sys
cfg = json.loads(sys.stdin.read())
os.write(cfg["status_fd"], b"not json " * 40)
"""
SILENT_LAUNCHER = """
import sys
sys.stdin.read()
"""


@pytest.mark.parametrize("launcher,message", [
    (GARBAGE_LAUNCHER, "sandbox failed: unreadable launcher report " + repr((b"not json " * 40)[:200])),
    (SILENT_LAUNCHER, "sandbox failed: no report from the launcher (launcher exit 0"),
])
def test_a_launcher_that_reports_garbage_or_nothing_is_a_sandbox_error(monkeypatch, tmp_path, launcher, message):
    """The runner never takes an unreadable or missing launcher report for a result: SandboxError
    with the first 200 bytes of what it got, or saying there was no report. Mutants: the error
    key renamed, the excerpt 201 bytes, an empty report parsed as JSON."""
    fake = tmp_path / "launcher.py"
    fake.write_text(launcher)
    monkeypatch.setattr(sandbox, "_CHILD", str(fake))
    monkeypatch.setattr(sandbox, "_checked", {"auto": "checked"})
    with pytest.raises(sandbox.SandboxError) as e:
        asyncio.run(run_python("assert True"))
    assert str(e.value).startswith(message), str(e.value)


def test_a_launcher_failure_is_reported_with_its_cause(monkeypatch, tmp_path):
    """The launcher joins the run's cgroups first; when that fails (here the procs file it is
    given is a directory) the runner raises SandboxError naming the launcher's exception, not
    "no report".
    Mutant (sandbox_child.py, cosmic-ray): main's `except BaseException` narrowed (the launcher
    dies with a traceback and reports nothing)."""
    if not sandbox._cgroup_parents():
        pytest.skip("no writable cgroup: the launcher has no cgroup to join")
    create = _TreeLimits.create.__func__

    def unjoinable(cls, limits):
        tree = create(cls, limits)  # the real cgroups, removed by finish() as usual
        tree.procs = [str(tmp_path)]
        return tree

    monkeypatch.setattr(_TreeLimits, "create", classmethod(unjoinable))
    with pytest.raises(sandbox.SandboxError, match="sandbox failed: IsADirectoryError"):
        asyncio.run(run_python("assert True"))


HUNG_LAUNCHER = """
import sys, time
sys.stdin.read()
time.sleep(60)
"""
NOISY_PROBE_LAUNCHER = """
import json, os, sys
cfg = json.loads(sys.stdin.read())
sys.stdout.write("x" * 600 + "END")
sys.stdout.flush()
os.write(cfg["status_fd"], json.dumps({"exit": 1, "completed": False}).encode())
"""


def test_a_hung_launcher_is_killed_at_the_backstop(monkeypatch, tmp_path):
    """A launcher that never exits (its own timer broken) is killed by the runner at the timeout
    plus a grace period, and the run counts as a timeout. Mutants: no backstop timeout
    (`timeout=None`), the backstop flag not set, the kill not sent (scripts/mutation.py sandbox)."""
    fake = tmp_path / "launcher.py"
    fake.write_text(HUNG_LAUNCHER)
    monkeypatch.setattr(sandbox, "_CHILD", str(fake))
    monkeypatch.setattr(sandbox, "_checked", {"auto": "checked"})
    start = time.monotonic()
    result = asyncio.run(run_python("assert True", SandboxLimits(timeout_s=0.5)))
    assert (result.reason, result.passed) == ("timeout", False) and time.monotonic() - start < 0.5 + sandbox._GRACE_S + 5


def test_a_probe_that_fails_names_its_output(monkeypatch, tmp_path):
    """ensure_sandbox refuses when the trivial program fails, quoting the last 500 characters of
    its output. Mutants: the excerpt `[+500:]` / `[-501:]`."""
    fake = tmp_path / "launcher.py"
    fake.write_text(NOISY_PROBE_LAUNCHER)
    monkeypatch.setattr(sandbox, "_CHILD", str(fake))
    monkeypatch.setattr(sandbox, "_checked", {})
    with pytest.raises(SandboxUnavailable) as e:
        asyncio.run(sandbox.ensure_sandbox())
    assert "a trivial program gave failed: " + "x" * 497 + "END" in str(e.value)
    assert "x" * 498 + "END" not in str(e.value)


def test_a_launcher_that_cannot_start_is_a_sandbox_error(monkeypatch):
    """Mutants: the error's message dropped, `proc = ""` (the cleanup then fails on it), closing
    the status pipe with `os.close(None)`."""
    async def cannot_start(*args, **kwargs):
        raise OSError(8, "Exec format error")

    monkeypatch.setattr(sandbox.asyncio, "create_subprocess_exec", cannot_start)
    monkeypatch.setattr(sandbox, "_checked", {"auto": "checked"})
    with pytest.raises(sandbox.SandboxError, match=r"cannot start the sandbox launcher: \[Errno 8\] Exec format"):
        asyncio.run(run_python("assert True"))


def test_an_unknown_isolation_is_refused_by_name():
    """Mutant: the ValueError without its message."""
    with pytest.raises(ValueError, match="isolation='bogus': choose one of auto, "):
        asyncio.run(run_python("assert True", isolation="bogus"))


def test_runs_share_the_cpus_concurrently():
    """As many programs run at once as there are CPUs (the SDG stage runs candidates concurrently):
    two two-second programs take about two seconds together, not four. Mutant: one slot
    (`os.cpu_count() and 1`)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: runs are serial by design")

    async def both() -> list[RunResult]:
        return await asyncio.gather(*(run_python("import time\ntime.sleep(2.0)\nassert True") for _ in range(2)))

    start = time.monotonic()
    results = asyncio.run(both())
    assert [r.reason for r in results] == ["ok", "ok"] and time.monotonic() - start < 3.6, results


def test_unsafe_process_group_is_an_explicit_warned_opt_out():
    with pytest.warns(UserWarning, match="without isolation"):
        asyncio.run(sandbox.ensure_sandbox("unsafe-process-group"))
    ok = asyncio.run(run_python("assert 2 * 2 == 4", isolation="unsafe-process-group"))
    early = asyncio.run(run_python("import sys\nsys.exit(0)\nassert False", isolation="unsafe-process-group"))
    loop = asyncio.run(run_python("while True:\n    pass\nassert True", SandboxLimits(timeout_s=1.0),
                                  isolation="unsafe-process-group"))
    assert (ok.reason, early.reason, loop.reason) == ("ok", "exited_early", "timeout")


def test_unsafe_process_group_runs_on_the_host_and_cleans_up():
    """The opt-out really is the host (its hostname, a temporary directory of the host), and the
    launcher still kills the program's process group and removes its directory. Mutants
    (sandbox_child.py, cosmic-ray): the mode compared with `>=` (the opt-out would unshare
    namespaces), `not not namespaces` (no kill of the group, the directory left behind), the
    `sys.platform == "linux"` guard of PR_SET_NO_NEW_PRIVS inverted or changed (read from
    /proc/self/status, which only the opt-out can see)."""
    mark = "nemojax-sandbox-test-" + secrets.token_hex(6)
    with warnings.catch_warnings():  # the opt-out's warning is test_unsafe_process_group_is_an_explicit_...'s
        warnings.simplefilter("ignore", UserWarning)
        result = asyncio.run(run_python(textwrap.dedent(f"""
            import os, socket, sys
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{mark}"])
            nnp = [line.split()[1] for line in open("/proc/self/status") if line.startswith("NoNewPrivs:")]
            print(os.getcwd(), socket.gethostname(), *nnp)
            assert True
        """), isolation="unsafe-process-group"))
    assert result.reason == "ok", result.output
    cwd, hostname, no_new_privs = result.output.strip().splitlines()[-1].split()
    assert hostname == socket.gethostname() and cwd != "/sandbox"
    assert no_new_privs == "1"  # set-uid binaries give nothing, even without namespaces
    assert not Path(cwd).exists(), cwd
    deadline = time.monotonic() + 5
    while host_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host_processes(mark) == []
