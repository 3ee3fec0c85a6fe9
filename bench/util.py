"""Small helpers: ports, /proc readings, child-process set-up, log tails."""

from __future__ import annotations

import os
import pwd
import resource
import socket
import subprocess
import sys
import time

from threadpool_proxy.pgcluster import free_port  # noqa: F401 - the one free_port, re-exported for bench

NOFILE_TARGET = 65536
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A failure worth one clear line to the user (no traceback)."""


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None,
              what: str = "server") -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")
        time.sleep(0.1)


def raise_nofile(target: int = NOFILE_TARGET) -> int:
    """Raise RLIMIT_NOFILE of the calling process as far as allowed; return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    if hard == resource.RLIM_INFINITY or hard >= target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    else:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER: orphaned descendants (the postmaster, once pg_ctl
    exits) are re-parented to us, so we can reap them instead of leaving zombies
    behind under an init that does not reap."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0      # 36 = PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def is_root() -> bool:
    return os.geteuid() == 0


def parse_cpus(text: str) -> set[int]:
    """A CPU list as taskset takes it: "1", "0,2", "0-3"."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        cpus.update(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    if not cpus:
        raise ValueError("no CPUs")
    return cpus


def pin_preexec(cpus: set[int] | None, inner=None):
    """preexec_fn: run ``inner``, then pin the child (and all it starts) to ``cpus`` (as taskset does)."""
    if not cpus and inner is None:
        return None

    def preexec():
        if inner is not None:
            inner()
        if cpus:
            os.sched_setaffinity(0, cpus)
    return preexec


def make_preexec(run_as: str | None = None, cpus: set[int] | None = None):
    """preexec_fn for servers: raise RLIMIT_NOFILE, then (as root) drop to `run_as`; pinned to `cpus` if given.

    The uid switch is done here rather than with runuser so that Popen.pid is
    the server's own PID (runuser forks and waits).
    """
    ids = None
    if run_as and is_root():
        pw = pwd.getpwnam(run_as)
        ids = (pw.pw_uid, pw.pw_gid)

    def preexec():
        raise_nofile()
        if cpus:
            os.sched_setaffinity(0, cpus)
        if ids is not None:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])
    return preexec


def chown_to(path: str, user: str | None) -> None:
    if user and is_root():
        pw = pwd.getpwnam(user)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 16384))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ---------------------------------------------------------------- /proc

def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode("ascii", "replace")
    # comm (field 2) may contain spaces and parentheses: split after the last ')'
    rest = data[data.rindex(")") + 2:].split()
    return ["pid", "comm"] + rest  # so that index i == field number i (1-based) - 1


def proc_cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime (fields 14, 15) of a process, all threads; plus cutime+cstime with children=True."""
    f = _stat_fields(pid)
    ticks = int(f[13]) + int(f[14])
    if children:
        ticks += int(f[15]) + int(f[16])
    return ticks / CLK_TCK


def proc_ppid(pid: int) -> int:
    return int(_stat_fields(pid)[3])


def proc_status(pid: int) -> dict:
    """VmRSS (kB), VmHWM (kB), Threads from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
            elif key == "Threads":
                out[key] = int(value)
    return out


def children_of(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if proc_ppid(int(name)) == pid:
                kids.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def tree_status(pid: int) -> dict:
    """proc_status of a process and its live children, added up (a supervisor and its workers)."""
    total = proc_status(pid)
    for kid in children_of(pid):
        try:
            for key, value in proc_status(kid).items():
                total[key] = total.get(key, 0) + value
        except OSError:
            pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process, its reaped children (cutime/cstime) and its live children.

    For the postmaster this is "all of PostgreSQL": backends that exited are
    in cutime once reaped, live ones are read one by one.  Deltas of this
    value over a run are right even when backends come and go.
    """
    total = proc_cpu_seconds(pid, children=True)
    for kid in children_of(pid):
        try:
            total += proc_cpu_seconds(kid)
        except (OSError, ValueError, IndexError):
            pass  # exited between listing and reading; it'll show up in cutime
    return total


def stop_process(proc: subprocess.Popen | None, sig_first: int, timeout: float, what: str) -> None:
    """Signal a child we started, wait, then SIGKILL. Idempotent."""
    import signal
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(sig_first)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"{what} (pid {proc.pid}) did not stop in {timeout:.0f} s; killing it")
        proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    except ProcessLookupError:
        pass
