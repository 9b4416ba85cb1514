"""The sandbox's launcher: the process `nemojax.sdg.sandbox` starts as `python -I sandbox_child.py`.

Never imported by the runner (it would fork a threaded process); standard library only. It reads
its orders as one JSON object on stdin, reports one JSON object on the status pipe, and leaves
stdout/stderr to the program (the runner reads them, capped). The process tree:

    runner ── launcher (this file: joins the cgroups, unshares PID/net/IPC/UTS [+user] namespaces,
              │         enforces the timeout, waits until every process of the sandbox is gone)
              └── init (PID 1 of the new PID namespace, in its own mount namespace: builds a
                   │     read-only root, then supervises; killed with the launcher: PDEATHSIG)
                   └── program (PID 2: `python -I -c _WRAPPER`, unprivileged, rlimited, cwd
                                /sandbox, the only writable place: a size-capped tmpfs)

When init exits, for any reason, the kernel kills every other process of its PID namespace
(including ones that called `setsid`) and the launcher's `waitpid` returns only after all are
gone. In `unsafe` mode (opt-in, no namespaces) init is a plain supervisor in its own process
group, killed with `killpg` (which a `setsid` escapes: hence unsafe).
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import re
import resource
import shutil
import signal
import sys
import tempfile

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 4096, 16384, 1 << 18, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
# statvfs f_flag bits that a remount inside a user namespace must keep (they are locked) and
# equal the mount(2) flag of the same meaning; ST_RELATIME (4096) maps to MS_RELATIME.
_KEPT_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC | 16 | 64 | 1024 | 2048
_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}

SANDBOX = "/sandbox"  # the program's directory inside the new root (its cwd, HOME and TMPDIR)
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                "/etc/ld.so.cache", "/etc/localtime")
DEVICES = ("null", "zero", "random", "urandom")

# Runs as the program. Its completion is proven by a nonce it never sees, written to fd 4 only
# after its module body returned normally: `sys.exit(0)`, `os._exit(0)`, a signal or an exception
# leave none. The nonce is read from fd 3 (then closed) into a `functools.partial` that exists
# only inside the final expression's C-level call chain (`list(map(...))`: exec the solution,
# flush, write the nonce, `_exit(0)`), so no Python frame, global or attribute reachable from the
# solution refers to it; the solution's frames lead back only to this module's globals, which
# hold no secret. An audit hook (irremovable) refuses what could still reach it: the garbage
# collector's object graph, other threads' frames, tracing/profiling hooks and ctypes' memory
# access (loading a library stays allowed: numpy imports ctypes). /proc is not mounted.
_WRAPPER = r"""
import builtins, functools, operator, os, sys, types
def guard(event, args):
    if event in ("sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects",
                 "gc.get_referrers", "gc.get_referents") or (
            event.startswith("ctypes.") and event != "ctypes.dlopen"):
        raise RuntimeError("sandbox: " + event + " is disabled in tested code")
def flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
with open("solution.py", encoding="utf-8") as source:
    solution = compile(source.read(), "solution.py", "exec", dont_inherit=True, optimize=0)
main = types.ModuleType("__main__")
main.__dict__.update(__file__="/sandbox/solution.py", __builtins__=builtins)
sys.modules["__main__"] = main
sys.argv = ["solution.py"]
sys.addaudithook(guard)
list(map(operator.methodcaller("__call__"), [
    functools.partial(exec, solution, main.__dict__),
    flush,
    functools.partial(os.write, 4, (os.read(3, 64), os.close(3))[0] + b"\n"),
    functools.partial(os._exit, 0)]))
"""

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src: str | None, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {dst}")


def _pivot_root(new: str, old: str) -> None:
    nr = _PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise OSError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    _check(_libc.syscall(ctypes.c_long(nr), new.encode(), old.encode()), "pivot_root")


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _bind_paths(python: str) -> list[str]:
    """System directories plus the Python installation (venv and base), minus nested ones."""
    paths = list(SYSTEM_PATHS)
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
              os.path.dirname(os.path.realpath(python))):
        p = os.path.realpath(p)
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in paths):
            paths.append(p)
    return paths


def _bind(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.islink(src):  # merged /usr: /bin -> usr/bin
        os.symlink(os.readlink(src), dst)
        return
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    elif os.path.exists(src):
        open(dst, "w").close()
    else:
        return
    _mount(src, dst, None, MS_BIND | MS_REC)


def _remount_read_only(path: str) -> None:
    f = os.statvfs(path).f_flag
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | (f & _KEPT_FLAGS) | (MS_RELATIME if f & 4096 else 0)
    _mount(None, path, None, flags)


def _mount_points(mountinfo: str, under: str) -> list[str]:
    out = []
    with open(mountinfo) as fh:
        for line in fh:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])  # \040
            if point == under or point.startswith(under + "/"):
                out.append(point)
    return out


def build_root(cfg: dict) -> None:
    """In init's own mount namespace: a tmpfs root holding read-only binds of the system and the
    Python installation, four devices, and a size-capped tmpfs /sandbox; the host root detached.
    No /proc, /sys, /tmp or /home: nothing else of the host is reachable."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing propagates back to the host
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.mkdir("/tmp/old")
    os.mkdir("/tmp/new")
    _pivot_root("/tmp", "/tmp/old")  # host root now at /old, so binds read it from there
    os.chdir("/")
    _mount("tmpfs", "/new", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in _bind_paths(cfg["python"]):
        _bind("/old" + path, "/new" + path)
    os.mkdir("/new/dev")
    for dev in DEVICES:
        _bind("/old/dev/" + dev, "/new/dev/" + dev)
    os.mkdir("/new" + SANDBOX)
    _mount("tmpfs", "/new" + SANDBOX, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['disk_bytes']},nr_inodes={cfg['max_files']},mode=0700,uid={cfg['uid']},gid={cfg['gid']}")
    for point in _mount_points("/old/proc/self/mountinfo", "/new"):
        if point != "/new" and not point.startswith(("/new/dev/", "/new" + SANDBOX)):
            _remount_read_only(point)
    os.chdir("/new")
    _pivot_root(".", ".")  # stack the old root on top of the new one, then detach it
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    _libc.sethostname(b"sandbox", 7)


def _exec_program(cfg: dict, workdir: str, nonce_r: int, marker_w: int) -> None:
    """In the program's process: fds 3/4, rlimits, an unprivileged identity, then exec."""
    try:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (nonce_r, marker_w)]
        os.dup2(high[0], 3)
        os.dup2(high[1], 4)
        limits = [(resource.RLIMIT_AS, cfg["memory_bytes"]), (resource.RLIMIT_CPU, cfg["cpu_s"]),
                  (resource.RLIMIT_FSIZE, cfg["file_bytes"]), (resource.RLIMIT_NOFILE, 64),
                  (resource.RLIMIT_CORE, 0)]
        if cfg["nproc"]:
            limits.append((resource.RLIMIT_NPROC, cfg["max_processes"]))
        for which, value in limits:
            resource.setrlimit(which, (value, value))
        if cfg["drop_root"]:  # root path: a uid of its own, no groups, no capabilities
            os.setgroups([])
            os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
        if sys.platform == "linux":
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.chdir(workdir)
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        os.execve(cfg["python"], [cfg["python"], "-I", "-c", _WRAPPER], env)
    except BaseException as e:  # noqa: BLE001 - reported on the program's stderr, then exit 126
        os.write(2, f"sandbox: cannot start the program: {type(e).__name__}: {e}\n".encode())
    os._exit(126)


def supervise(cfg: dict, namespaces: bool, workdir: str) -> dict:
    """Init: build the root (namespaces), start the program, reap until it exits, report."""
    if namespaces:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        build_root(cfg)
    else:
        os.setpgid(0, 0)
    path = os.path.join(workdir, "solution.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(cfg["code"])
    if cfg["drop_root"]:
        os.chown(path, cfg["uid"], cfg["gid"])
        os.chown(workdir, cfg["uid"], cfg["gid"])
    nonce = cfg["nonce"].encode()
    nonce_r, nonce_w = os.pipe()
    os.write(nonce_w, nonce)
    os.close(nonce_w)
    marker_r, marker_w = os.pipe()
    child = os.fork()
    if child == 0:
        _exec_program(cfg, workdir, nonce_r, marker_w)
    os.close(nonce_r)
    os.close(marker_w)
    if namespaces:
        _prctl(PR_SET_DUMPABLE, 0)
    # Backstop should the launcher die before its PDEATHSIG took effect: never outlive the run.
    signal.signal(signal.SIGALRM, lambda *_: os.kill(child, signal.SIGKILL))
    signal.alarm(int(cfg["timeout_s"]) + 3)
    while True:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            break
    os.set_blocking(marker_r, False)
    try:
        marker = os.read(marker_r, 4096)
    except BlockingIOError:
        marker = b""
    report = {"completed": marker == nonce + b"\n"}
    if os.WIFSIGNALED(status):
        report["signal"] = os.WTERMSIG(status)
    else:
        report["exit"] = os.WEXITSTATUS(status)
    return report


def launch(cfg: dict) -> dict:
    for procs in cfg["cgroups"]:  # before anything else: every descendant is then inside
        _write(procs, str(os.getpid()))
    namespaces = cfg["mode"] == "namespaces"
    if namespaces:
        uid, gid = os.getuid(), os.getgid()
        flags = CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
        _check(_libc.unshare(flags | (CLONE_NEWUSER if cfg["user_ns"] else 0)), "unshare")
        if cfg["user_ns"]:  # the caller's own uid/gid, mapped to themselves
            _write("/proc/self/setgroups", "deny")
            _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
            _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
        workdir = SANDBOX
    else:
        workdir = tempfile.mkdtemp(prefix="nemojax-sandbox-")
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        os.close(cfg["status_fd"])
        try:
            report = supervise(cfg, namespaces, workdir)
        except BaseException as e:  # noqa: BLE001 - a setup failure is reported, not raised
            report = {"error": f"{type(e).__name__}: {e}"[:2000]}
        os.write(report_w, json.dumps(report).encode())
        os._exit(0)
    os.close(report_w)
    if not namespaces:
        try:  # also done by the child: whichever runs first, the group exists before any kill
            os.setpgid(pid, pid)
        except OSError:
            pass
    why: list[str] = []

    def stop(reason: str):
        def handler(signum, frame):
            if not why:
                why.append(reason)
            _kill_tree(pid, namespaces)
        return handler

    signal.signal(signal.SIGALRM, stop("timeout"))
    signal.signal(signal.SIGTERM, stop("stopped"))
    signal.setitimer(signal.ITIMER_REAL, cfg["timeout_s"])
    os.waitpid(pid, 0)  # in a PID namespace: returns once every process in it is gone
    signal.setitimer(signal.ITIMER_REAL, 0)
    if not namespaces:
        _kill_tree(pid, namespaces)  # leftovers of the process group
        shutil.rmtree(workdir, ignore_errors=True)
    data = b""
    while chunk := os.read(report_r, 65536):
        data += chunk
    report = json.loads(data) if data else {}
    if why:
        report["stopped"] = why[0]
    return report


def _kill_tree(pid: int, namespaces: bool) -> None:
    try:
        if namespaces:
            os.kill(pid, signal.SIGKILL)  # init: the kernel kills the rest of the namespace
        else:
            os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    cfg = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        report = launch(cfg)
    except BaseException as e:  # noqa: BLE001
        report = {"error": f"{type(e).__name__}: {e}"[:2000]}
    with os.fdopen(cfg["status_fd"], "w") as status:
        status.write(json.dumps(report))


if __name__ == "__main__":
    main()
