"""What the sandbox reads from its host, on hand-made hosts: cgroup trees in the v1 and v2
layouts a host may have (this machine has one of them; test_sdg_sandbox.py runs the real one),
containers whose cgroup root is not the hierarchy's, the limits written into a new cgroup, the
kernel version, and how the isolation is described. The fake "kernel" below does what cgroupfs
does on mkdir / rmdir of a cgroup (control files appear and go) and on a kill (the process
leaves cgroup.procs).

Each test names, in its docstring, the mutants of nemojax/sdg/sandbox.py it kills
(scripts/mutation.py sandbox).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nemojax.sdg import sandbox
from nemojax.sdg.sandbox import SandboxError, SandboxLimits, _find_cgroup_parents, _kernel, _Plan, _TreeLimits

BUSY_ONCE: dict[str, int] = {}  # cgroup names whose first rmdir fails with EBUSY (a process not yet reaped)
CONTROL_FILES = {"v1-memory": {"memory.limit_in_bytes": "9223372036854771712", "memory.memsw.limit_in_bytes": "max",
                               "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
                               "cgroup.procs": ""},
                 "v1-pids": {"pids.max": "max", "cgroup.procs": ""},
                 "v2": {"memory.max": "max", "memory.swap.max": "max", "pids.max": "max", "cgroup.procs": "",
                        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"}}


def _mount(n: int, root: str, point: Path, fstype: str, opts: str) -> str:
    return f"{n} 20 0:{n} {root} {point} rw,nosuid,nodev,noexec,relatime - {fstype} {fstype} rw,{opts}"


def _proc(tmp_path: Path, cgroup: str, mounts: list[str]) -> tuple[Path, Path]:
    (tmp_path / "cgroup").write_text(cgroup)
    (tmp_path / "mountinfo").write_text("\n".join(["1 0 8:1 / / rw - ext4 /dev/sda1 rw", *mounts]) + "\n")
    return tmp_path / "cgroup", tmp_path / "mountinfo"


def _v1_tree(tmp_path: Path, mem_own: str = "/job/a", pids_own: str = "/b", root: str = "/") -> tuple[Path, Path]:
    mem, pids = tmp_path / "fs" / "memory", tmp_path / "fs" / "pids"
    (mem / mem_own.lstrip("/")).mkdir(parents=True)
    (mem / mem_own.lstrip("/") / "memory.limit_in_bytes").write_text("max")
    (pids / pids_own.lstrip("/")).mkdir(parents=True)
    return _proc(tmp_path, f"12:pids:{root.rstrip('/')}{pids_own}\n9:cpu,cpuacct:/\n"
                           f"4:memory:{root.rstrip('/')}{mem_own}\n1:name=systemd:/\n",
                 [_mount(30, root, mem, "cgroup", "memory"), _mount(31, root, pids, "cgroup", "pids"),
                  _mount(32, "/", tmp_path / "fs" / "cpu", "cgroup", "cpu,cpuacct")])


def _v2_tree(tmp_path: Path, enabled: str | None = "cpu memory pids", own: str = "/user.slice/me") -> Path:
    d = tmp_path / "fs" / "unified" / own.lstrip("/")
    d.mkdir(parents=True)
    if enabled is not None:
        (d / "cgroup.subtree_control").write_text(enabled + "\n")
    return d


def test_v1_memory_and_pids_hierarchies_are_found(tmp_path):
    """cgroup v1: the process's own memory and pids cgroups, each under its own mount. Kills: the
    path read from the wrong field of /proc/self/cgroup, controllers not split on ",", the mount
    root or point read from the wrong mountinfo field, the filesystem type or options misread, the
    memory check file misnamed, the kinds swapped or misspelt."""
    cg, mi = _v1_tree(tmp_path)
    assert _find_cgroup_parents(cg, mi) == [("v1-memory", tmp_path / "fs" / "memory" / "job" / "a"),
                                            ("v1-pids", tmp_path / "fs" / "pids" / "b")]


def test_v1_needs_both_controllers_and_the_memory_files(tmp_path):
    """Without a pids hierarchy, or with a memory directory that has no memory.limit_in_bytes,
    there is no v1 tree limit (and no v2 mount: none at all). Kills: `mem or pids`, the file check
    dropped or inverted."""
    cg, mi = _v1_tree(tmp_path)
    mi.write_text("\n".join(line for line in mi.read_text().splitlines() if "pids" not in line) + "\n")
    assert _find_cgroup_parents(cg, mi) == []
    cg, mi = _v1_tree(tmp_path / "2")
    (tmp_path / "2" / "fs" / "memory" / "job" / "a" / "memory.limit_in_bytes").unlink()
    assert _find_cgroup_parents(cg, mi) == []


def test_a_containers_cgroup_root_is_resolved_and_outside_it_refused(tmp_path):
    """In a container the mount's root is the container's cgroup (`/docker/c1`): the process's
    `/docker/c1/job/a` is `job/a` under the mount point. A cgroup outside the mount's root (`..`)
    is not reachable. Kills: relpath taken from the wrong base, the `..` check dropped or inverted."""
    cg, mi = _v1_tree(tmp_path, root="/docker/c1")
    assert _find_cgroup_parents(cg, mi) == [("v1-memory", tmp_path / "fs" / "memory" / "job" / "a"),
                                            ("v1-pids", tmp_path / "fs" / "pids" / "b")]
    cg.write_text(cg.read_text().replace("4:memory:/docker/c1/job/a", "4:memory:/elsewhere/job/a"))
    assert _find_cgroup_parents(cg, mi) == []


def test_v2_delegated_with_memory_and_pids(tmp_path):
    """cgroup v2 (the "0::" line, a cgroup2 mount): usable only when the process's own cgroup
    enables both memory and pids for its children. Kills: the v2 key misspelt, the cgroup2 type
    misread, `memory and pids` as `or`, the subtree_control file misnamed or its read dropped."""
    d = _v2_tree(tmp_path)
    cg, mi = _proc(tmp_path, "0::/user.slice/me\n", [_mount(40, "/", tmp_path / "fs" / "unified", "cgroup2",
                                                             "nsdelegate")])
    assert _find_cgroup_parents(cg, mi) == [("v2", d)]
    (d / "cgroup.subtree_control").write_text("cpu memory\n")
    assert _find_cgroup_parents(cg, mi) == []
    (d / "cgroup.subtree_control").write_text("pids io\n")
    assert _find_cgroup_parents(cg, mi) == []
    (d / "cgroup.subtree_control").unlink()
    assert _find_cgroup_parents(cg, mi) == []


def test_hybrid_host_prefers_v1_and_falls_back_to_v2(tmp_path):
    """A hybrid host has both: v1 memory+pids win; when v1's memory directory is not a cgroup
    (no limit file), the delegated v2 cgroup is used."""
    cg, mi = _v1_tree(tmp_path)
    d = _v2_tree(tmp_path)
    cg.write_text(cg.read_text() + "0::/user.slice/me\n")
    mi.write_text(mi.read_text() + _mount(40, "/", tmp_path / "fs" / "unified", "cgroup2", "nsdelegate") + "\n")
    assert [k for k, _ in _find_cgroup_parents(cg, mi)] == ["v1-memory", "v1-pids"]
    (tmp_path / "fs" / "memory" / "job" / "a" / "memory.limit_in_bytes").unlink()
    assert _find_cgroup_parents(cg, mi) == [("v2", d)]


def test_unreadable_or_malformed_proc_files_mean_no_cgroups(tmp_path):
    """A missing /proc file or a line without the expected fields: no tree limits, not a crash."""
    cg, mi = _v1_tree(tmp_path)
    assert _find_cgroup_parents(tmp_path / "missing", mi) == []
    cg.write_text("garbage\n")
    assert _find_cgroup_parents(cg, mi) == []


def test_a_cgroup_path_may_hold_colons(tmp_path):
    """/proc/self/cgroup is `id:controllers:path` and only the first two colons separate (a
    systemd unit's cgroup may be `/system.slice/run-u7:x.scope`). Kills: `split(":")` without
    the limit, `split(":", 3)`."""
    cg, mi = _v1_tree(tmp_path, mem_own="/run:1/a", pids_own="/run:1/b")
    assert _find_cgroup_parents(cg, mi) == [("v1-memory", tmp_path / "fs" / "memory" / "run:1" / "a"),
                                            ("v1-pids", tmp_path / "fs" / "pids" / "run:1" / "b")]


def test_own_cgroup_must_exist_inside_the_mount(tmp_path):
    """A cgroup outside the mount's root is refused even when a directory of that relative name
    happens to exist beside the mount, and a cgroup directory that does not exist is not used.
    Kills: the `..` check dropped or its string changed, the is-a-directory check dropped."""
    cg, mi = _v1_tree(tmp_path, root="/docker/c1")
    cg.write_text(cg.read_text().replace("4:memory:/docker/c1/job/a", "4:memory:/elsewhere/job/a"))
    (tmp_path / "elsewhere" / "job" / "a").mkdir(parents=True)  # point/../../elsewhere/job/a
    (tmp_path / "elsewhere" / "job" / "a" / "memory.limit_in_bytes").write_text("max")
    assert _find_cgroup_parents(cg, mi) == []
    cg, mi = _v1_tree(tmp_path / "2")
    (tmp_path / "2" / "fs" / "pids" / "b").rmdir()
    assert _find_cgroup_parents(cg, mi) == []


@pytest.fixture
def kernel(monkeypatch, tmp_path):
    """cgroupfs's mkdir (control files appear) and rmdir (they go) for cgroups under tmp_path."""
    kinds: dict[Path, str] = {}
    busy = BUSY_ONCE
    busy.clear()
    mkdir, rmdir, kill = Path.mkdir, Path.rmdir, os.kill

    def fake_mkdir(self, *a, **k):
        mkdir(self, *a, **k)
        if self.parent in kinds:
            for name, text in CONTROL_FILES[kinds[self.parent]].items():
                (self / name).write_text(text)

    def fake_kill(pid, sig):
        kill(pid, sig)
        for d in kinds:
            for procs in d.glob("*/cgroup.procs"):
                procs.write_text("".join(f"{p}\n" for p in procs.read_text().split() if int(p) != pid))

    def fake_rmdir(self):
        if self.parent in kinds and (self / "cgroup.procs").exists():
            if (self / "cgroup.procs").read_text().split() or busy.pop(self.name, 0):
                raise OSError(16, "Device or resource busy")
            for f in self.iterdir():
                f.unlink()
        rmdir(self)

    monkeypatch.setattr(Path, "mkdir", fake_mkdir)
    monkeypatch.setattr(Path, "rmdir", fake_rmdir)
    monkeypatch.setattr(sandbox.os, "kill", fake_kill)

    def parents(*pairs: tuple[str, str]) -> list[tuple[str, Path]]:
        out = []
        for kind, name in pairs:
            d = tmp_path / "cg" / name
            mkdir(d, parents=True)
            kinds[d] = kind
            out.append((kind, d))
        monkeypatch.setattr(sandbox, "_parents_cache", out)
        return out

    return parents


def _only_child(d: Path) -> Path:
    (child,) = d.iterdir()
    return child


def test_v1_cgroups_get_the_tree_limits(kernel):
    """A run's v1 cgroups: memory limit in bytes (swap included: memsw), pids = the program's
    processes + the launcher + the namespace's init, a name that says whose it is. Kills: MB not
    shifted by 20, `+ 2` changed, the memsw write dropped or its existence check inverted, the
    kind names compared wrongly, the values swapped."""
    (_, mem), (_, pids) = kernel(("v1-memory", "memory"), ("v1-pids", "pids"))
    tree = _TreeLimits.create(SandboxLimits(memory_mb=300, max_processes=5))
    m, p = _only_child(mem), _only_child(pids)
    assert m.name == p.name and m.name.startswith(f"nemojax-sandbox-{os.getpid()}-")
    assert (m / "memory.limit_in_bytes").read_text() == str(300 << 20)
    assert (m / "memory.memsw.limit_in_bytes").read_text() == str(300 << 20)
    assert (p / "pids.max").read_text() == "7"
    assert tree.procs == [str(m / "cgroup.procs"), str(p / "cgroup.procs")]
    assert tree.finish() is False
    assert list(mem.iterdir()) == [] and list(pids.iterdir()) == []


def test_v2_cgroup_gets_the_tree_limits_and_no_swap(kernel):
    """v2: memory.max, memory.swap.max 0 (no escape into swap), pids.max. Kills: the swap write
    dropped, "0" changed, the v2 branch's values swapped or misnamed."""
    ((_, parent),) = kernel(("v2", "unified"))
    tree = _TreeLimits.create(SandboxLimits(memory_mb=64, max_processes=16))
    d = _only_child(parent)
    assert (d / "memory.max").read_text() == str(64 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "18"
    assert tree.finish() is False and list(parent.iterdir()) == []


def test_each_run_gets_its_own_cgroup(kernel):
    """Two runs at once never share a cgroup (a shared one would sum their memory and kill both
    with either). Kills: the serial not advanced."""
    ((_, parent),) = kernel(("v2", "unified"))
    a, b = _TreeLimits.create(SandboxLimits()), _TreeLimits.create(SandboxLimits())
    assert len(list(parent.iterdir())) == 2 and a.procs != b.procs
    a.finish(), b.finish()


@pytest.mark.parametrize("kind,events,text", [
    ("v2", "memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n"),
    ("v1-memory", "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"),
])
def test_finish_reports_the_oom_killer(kernel, kind, events, text):
    """An OOM kill inside the cgroup is reported (the run's reason becomes "memory"), from v2's
    memory.events or v1's memory.oom_control; other counters (`oom`, `max`) are not kills. Kills:
    the event file names swapped, `== "oom_kill"` changed, `> 0` as `>= 0` or `> 1`, `|=` as `=`
    (v2's oom_group_kill line comes after oom_kill)."""
    ((_, parent),) = kernel((kind, "cg"))
    tree = _TreeLimits.create(SandboxLimits())
    d = _only_child(parent)
    (d / events).write_text(text)
    assert tree.finish() is True
    tree = _TreeLimits.create(SandboxLimits())
    d = _only_child(parent)
    (d / events).write_text(text.replace("oom_kill 1", "oom_kill 0").replace("oom_kill 2", "oom_kill 0")
                            + "zzz 0\n")
    assert tree.finish() is False


def test_a_cgroup_that_cannot_be_made_is_an_error_and_leaves_nothing(kernel, tmp_path):
    """When the second cgroup cannot be made (its parent vanished), the first is removed and the
    error names the cgroup. Kills: the cleanup dropped, the error swallowed."""
    (_, mem), (_, pids) = kernel(("v1-memory", "memory"), ("v1-pids", "pids"))
    pids.rmdir()
    with pytest.raises(SandboxError, match="cannot set up cgroup nemojax-sandbox-"):
        _TreeLimits.create(SandboxLimits())
    assert list(mem.iterdir()) == []


def test_no_cgroups_means_no_tree_limits(monkeypatch):
    """Where no writable cgroup exists the runner falls back to per-process limits: None."""
    monkeypatch.setattr(sandbox, "_parents_cache", [])
    assert _TreeLimits.create(SandboxLimits()) is None


def test_finish_kills_what_is_left_and_removes_every_cgroup(kernel, tmp_path):
    """A process still in the run's cgroup is killed (SIGKILL) before the cgroup is removed; a
    cgroup already gone does not stop the others from being removed. Kills: the cgroup.procs read
    dropped or misnamed, the kill dropped, `break` as `return` (the pids cgroup left behind), the
    kill and rmdir polls sleeping a second (`time.sleep(1.01)`) or not at all (`sleep(None)`);
    the memory cgroup is busy for one rmdir, as while the kernel reaps the killed process."""
    (_, mem), (_, pids) = kernel(("v1-memory", "memory"), ("v1-pids", "pids"))
    tree = _TreeLimits.create(SandboxLimits())
    left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (_only_child(pids) / "cgroup.procs").write_text(f"{left.pid}\n")
        BUSY_ONCE[_only_child(mem).name] = 1
        start = time.monotonic()
        assert tree.finish() is False
        assert time.monotonic() - start < 0.5  # polls every 10 ms, not every second
        assert left.wait(timeout=10) == -9
    finally:
        left.kill()
    assert list(mem.iterdir()) == [] and list(pids.iterdir()) == []
    tree = _TreeLimits.create(SandboxLimits())
    for f in _only_child(mem).iterdir():  # the memory cgroup vanished under us
        f.unlink()
    _only_child(mem).rmdir()
    tree.finish()
    assert list(pids.iterdir()) == []


@pytest.mark.parametrize("release,expected", [
    ("5.15.0-1057-aws", (5, 15)), ("6.8.0-45-generic", (6, 8)), ("4.19.112+", (4, 19)), ("5.4-rc7", (5, 4)),
    ("5.14", (5, 14)), ("6", (0, 0)), ("weird", (0, 0)), ("", (0, 0)),
])
def test_kernel_version_from_the_release_string(monkeypatch, release, expected):
    """RLIMIT_NPROC bounds a user namespace's processes only from Linux 5.14 (elsewhere it counts all
    the caller's processes), so the version must be read right: a release candidate "5.4-rc7" is
    5.4 (a digit filter made it 5.47), an unparsable one (0, 0). Kills: the split, its index and
    every constant of the version parse."""
    monkeypatch.setattr(sandbox.os, "uname", lambda: SimpleNamespace(release=release))
    assert _kernel() == expected


@pytest.mark.parametrize("plan,parents,text", [
    (_Plan(False, False), [], "unsafe-process-group (rlimits and a process group only)"),
    (_Plan(True, False), [("v2", Path("/x"))], "PID+mount+network namespaces (root, per-run uid), cgroup memory+pids"),
    (_Plan(True, True), [], "PID+mount+network namespaces (user namespace), no writable cgroup: per-process limits"),
])
def test_isolation_is_described_as_it_is(monkeypatch, plan, parents, text):
    """What `ensure_sandbox()` returns and SDG records as the isolation a run had: whether it had
    namespaces, as root or in a user namespace, and whether the tree limits are cgroups. Kills:
    every branch and string of `_Plan.describe`."""
    monkeypatch.setattr(sandbox, "_parents_cache", parents)
    assert plan.describe() == text
