"""Benchmark targets: PostgreSQL directly, PgBouncer, threadpool_proxy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import yaml

from .cluster import BENCH_DB, BENCH_ROLE, PgCluster
from .util import (BenchError, chown_to, free_port, log, make_preexec, proc_cpu_seconds, proc_status,
                   stop_process, tail, wait_port)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_NAMES = ("direct", "pgbouncer", "proxy")


class Target:
    name = "?"
    is_pooler = True

    def __init__(self):
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.logfile: str | None = None
        self.failed: str | None = None     # why this target cannot be used any more

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def death_note(self) -> str:
        status = self.proc.returncode if self.proc else None
        return f"{self.name} exited (status {status}); log tail:\n{tail(self.logfile) if self.logfile else ''}"

    def cpu_seconds(self) -> float | None:
        if not self.proc or self.proc.poll() is not None:
            return None
        try:
            return proc_cpu_seconds(self.proc.pid)
        except (OSError, ValueError, IndexError):
            return None

    def status(self) -> dict:
        if not self.proc or self.proc.poll() is not None:
            return {}
        try:
            return proc_status(self.proc.pid)
        except OSError:
            return {}

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 10, self.name)

    def version(self) -> str:
        return ""


class DirectTarget(Target):
    name = "direct"
    is_pooler = False

    def __init__(self, cluster: PgCluster):
        super().__init__()
        self.cluster = cluster

    def start(self) -> None:
        self.port = self.cluster.port


class PgBouncerTarget(Target):
    name = "pgbouncer"

    def __init__(self, cluster: PgCluster, exe: str, workdir: str, os_user: str | None,
                 pool_size: int, max_client_conn: int, extra: list[tuple[str, str]]):
        super().__init__()
        self.cluster, self.exe, self.os_user = cluster, exe, os_user
        self.dir = os.path.join(workdir, "pgbouncer")
        self.pool_size, self.max_client_conn, self.extra = pool_size, max_client_conn, extra
        self.logfile = os.path.join(self.dir, "pgbouncer.log")
        self.ini = os.path.join(self.dir, "pgbouncer.ini")

    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        chown_to(self.dir, self.os_user)
        self.port = free_port()
        userlist = os.path.join(self.dir, "userlist.txt")
        with open(userlist, "w") as f:
            f.write(f'"{BENCH_ROLE}" "{self.cluster.verifier}"\n')
        os.chmod(userlist, 0o600)
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": userlist,
            "pool_mode": "transaction",
            "default_pool_size": str(self.pool_size),
            "max_client_conn": str(self.max_client_conn),
            "ignore_startup_parameters": "extra_float_digits,options",
            "logfile": self.logfile,
            "pidfile": os.path.join(self.dir, "pgbouncer.pid"),
            "log_connections": "0",
            "log_disconnections": "0",
            "log_pooler_errors": "1",
        }
        for key, value in self.extra:
            settings[key] = value
        with open(self.ini, "w") as f:
            f.write("[databases]\n")
            f.write(f"{BENCH_DB} = host=127.0.0.1 port={self.cluster.port} dbname={BENCH_DB}\n\n")
            f.write("[pgbouncer]\n")
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")
        for p in (userlist, self.ini):
            chown_to(p, self.os_user)
        log(f"starting pgbouncer on 127.0.0.1:{self.port}")
        out = open(os.path.join(self.dir, "stdout.log"), "wb")
        self.proc = subprocess.Popen([self.exe, self.ini], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.dir, start_new_session=True,
                                     preexec_fn=make_preexec(self.os_user))
        out.close()
        try:
            wait_port(self.port, 20, self.proc, "pgbouncer")
        except BenchError as exc:
            raise BenchError(f"{exc}\n{tail(self.logfile)}\n{tail(os.path.join(self.dir, 'stdout.log'))}")

    def stop(self) -> None:
        # SIGTERM = immediate shutdown for pgbouncer (SIGINT waits for clients)
        stop_process(self.proc, signal.SIGTERM, 10, self.name)

    def version(self) -> str:
        try:
            out = subprocess.run([self.exe, "--version"], capture_output=True, text=True).stdout
            return out.splitlines()[0].strip()
        except (OSError, IndexError):
            return "?"


def proxy_runnable() -> tuple[bool, str]:
    """Whether `python -m threadpool_proxy --help` works yet, and why not."""
    env = dict(os.environ, PYTHONPATH=_pythonpath())
    try:
        r = subprocess.run([sys.executable, "-m", "threadpool_proxy", "--help"], capture_output=True,
                           text=True, cwd=REPO_ROOT, env=env, timeout=30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, "`python -m threadpool_proxy --help` did not finish within 30 s"
    if r.returncode == 0:
        return True, ""
    lines = (r.stderr or r.stdout).strip().splitlines()
    return False, (f"`python -m threadpool_proxy --help` failed (status {r.returncode}): "
                   f"{lines[-1] if lines else 'no output'}")


def _pythonpath() -> str:
    old = os.environ.get("PYTHONPATH")
    return REPO_ROOT + (os.pathsep + old if old else "")


def _set_dotted(cfg: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


class ProxyTarget(Target):
    name = "proxy"

    def __init__(self, cluster: PgCluster, workdir: str, auth: str, pool_size: int,
                 max_client_conn: int, extra: list[tuple[str, object]]):
        super().__init__()
        self.cluster = cluster
        self.dir = os.path.join(workdir, "proxy")
        self.auth, self.pool_size, self.max_client_conn, self.extra = auth, pool_size, max_client_conn, extra
        self.logfile = os.path.join(self.dir, "proxy.log")
        self.config_path = os.path.join(self.dir, "proxy.yaml")
        self.config: dict = {}

    def start(self) -> None:
        ok, why = proxy_runnable()
        if not ok:
            raise BenchError(f"threadpool_proxy is not runnable yet: {why}")
        os.makedirs(self.dir, exist_ok=True)
        self.port = free_port()
        cfg = {
            "listen": {"host": "127.0.0.1", "port": self.port},
            "pool_mode": "transaction",
            "pool_size": self.pool_size,
            "max_client_conn": self.max_client_conn,
            "databases": {BENCH_DB: {"host": "127.0.0.1", "port": self.cluster.port}},
            "log_level": "warning",
            "auth_type": "passthrough",
        }
        if self.auth == "scram-sha-256":
            auth_file = os.path.join(self.dir, "users.yaml")
            fd = os.open(auth_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump({"users": {BENCH_ROLE: {"scram": self.cluster.verifier}}}, f)
            cfg["auth_type"] = "scram-sha-256"
            cfg["auth_file"] = auth_file
        for key, value in self.extra:
            _set_dotted(cfg, key, value)
        self.config = cfg
        with open(self.config_path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        log(f"starting threadpool_proxy on 127.0.0.1:{self.port} (auth {cfg['auth_type']})")
        out = open(self.logfile, "wb")
        env = dict(os.environ, PYTHONPATH=_pythonpath())
        self.proc = subprocess.Popen([sys.executable, "-m", "threadpool_proxy", "-c", self.config_path],
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=REPO_ROOT, env=env, start_new_session=True,
                                     preexec_fn=make_preexec(None))
        out.close()
        try:
            wait_port(self.port, 30, self.proc, "threadpool_proxy")
        except BenchError as exc:
            raise BenchError(f"{exc}; log tail ({self.logfile}):\n{tail(self.logfile)}")

    def version(self) -> str:
        try:
            r = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"],
                               capture_output=True, text=True)
            rev = r.stdout.strip() or "no commit"
            dirty = subprocess.run(["git", "-C", REPO_ROOT, "status", "--porcelain", "threadpool_proxy"],
                                   capture_output=True, text=True).stdout.strip()
            return f"threadpool_proxy @ {rev}{' + uncommitted changes' if dirty else ''}"
        except OSError:
            return "threadpool_proxy"
