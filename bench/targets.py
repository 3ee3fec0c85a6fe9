"""Benchmark targets: PostgreSQL directly, PgBouncer (plain, and with server_reset_query_always),
threadpool_proxy from this repo, and (optionally) threadpool_proxy from another source tree."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import yaml

from .cluster import BENCH_DB, BENCH_ROLE, PgCluster
from .util import (BenchError, chown_to, free_port, log, make_preexec, proc_cpu_seconds, proc_status,
                   stop_process, tail, tree_cpu_seconds, tree_status, wait_port)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# canonical (report) order; proxy-base exists only with --proxy-base-src
TARGET_NAMES = ("direct", "pgbouncer", "pgbouncer-reset", "proxy-base", "proxy", "pypool", "pyrelay")
PGBOUNCER_TARGETS = ("pgbouncer", "pgbouncer-reset")
PROXY_TARGETS = ("proxy-base", "proxy")
#: Measuring sticks, not products: the thinnest thread-per-client pooling relay and plain relay
#: (shared/calibration/, outside this repo; --calibration-dir), simple protocol only.
CALIBRATION_TARGETS = ("pypool", "pyrelay")
CALIBRATION_SCENARIOS = ("select-c10", "select-c50")
DEFAULT_CALIBRATION_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "calibration")
#: proxy-w2, proxy-w4, ...: threadpool_proxy from this tree with `workers: N`, listed after proxy.
WORKERS_TARGET = re.compile(r"^proxy-w([1-9][0-9]?)$")


def is_target_name(name: str) -> bool:
    return name in TARGET_NAMES or WORKERS_TARGET.match(name) is not None


def target_order(names) -> list[str]:
    """Canonical (report) order: TARGET_NAMES, then proxy-wN by N."""
    workers = sorted((n for n in names if WORKERS_TARGET.match(n)), key=lambda n: int(n[7:]))
    return [t for t in TARGET_NAMES if t in names] + workers


class Target:
    name = "?"
    is_pooler = True

    def __init__(self):
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.logfile: str | None = None
        self.failed: str | None = None     # why this target cannot be used any more
        self.unix_dir: str | None = None   # the directory of its unix socket (.s.PGSQL.<port>), if it has one

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


class CalibrationTarget(Target):
    """``pypool.py PORT DSN POOL`` or ``pyrelay.py PORT PG_PORT`` from --calibration-dir:
    the floor the design's shape allows in pure Python, measured in the same run."""

    def __init__(self, cluster: PgCluster, name: str, directory: str, pool_size: int,
                 cpus: set[int] | None = None):
        super().__init__()
        self.cluster, self.name, self.pool_size, self.cpus = cluster, name, pool_size, cpus
        self.script = os.path.join(directory, f"{name}.py")

    def start(self) -> None:
        if not os.path.isfile(self.script):
            raise BenchError(f"{self.script} not found (--calibration-dir)")
        self.port = free_port()
        if self.name == "pypool":
            dsn = (f"host=127.0.0.1 port={self.cluster.port} user={BENCH_ROLE} dbname={BENCH_DB} "
                   f"password={self.cluster.password} sslmode=disable")
            argv = [sys.executable, self.script, str(self.port), dsn, str(self.pool_size)]
        else:
            argv = [sys.executable, self.script, str(self.port), str(self.cluster.port)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=make_preexec(None, self.cpus))
        wait_port(self.port, 30, self.proc, self.name)

    def version(self) -> str:
        return f"{self.script} (calibration)"


class DirectTarget(Target):
    name = "direct"
    is_pooler = False

    def __init__(self, cluster: PgCluster):
        super().__init__()
        self.cluster = cluster

    def start(self) -> None:
        self.port = self.cluster.port
        self.unix_dir = self.cluster.sockdir


def make_tls_files(workdir: str, os_user: str | None) -> tuple[str, str]:
    """A throwaway CA's certificate for 127.0.0.1 and its key, readable by the poolers: (cert, key)."""
    try:
        import trustme
    except ImportError:
        raise BenchError("TLS scenarios need trustme (pip install trustme, or the test extras)") from None
    d = os.path.join(workdir, "tls")
    os.makedirs(d, exist_ok=True)
    chown_to(d, os_user)
    leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert, key = os.path.join(d, "server.crt"), os.path.join(d, "server.key")
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    for p in (cert, key):
        os.chmod(p, 0o600)
        chown_to(p, os_user)
    return cert, key


class PgBouncerTarget(Target):
    """PgBouncer in transaction mode.  reset_always (target `pgbouncer-reset`) adds
    server_reset_query_always = 1 with server_reset_query DISCARD ALL (its default),
    so every server connection is reset when a client releases it, as the proxy
    resets one before it passes to another client; plain `pgbouncer` runs no reset
    in transaction mode."""

    def __init__(self, cluster: PgCluster, exe: str, workdir: str, os_user: str | None,
                 pool_size: int, max_client_conn: int, extra: list[tuple[str, str]],
                 name: str = "pgbouncer", reset_always: bool = False, tls: tuple[str, str] | None = None,
                 cpus: set[int] | None = None):
        super().__init__()
        self.cpus = cpus
        self.tls = tls
        self.name, self.reset_always = name, reset_always
        self.cluster, self.exe, self.os_user = cluster, exe, os_user
        self.dir = os.path.join(workdir, name)
        self.pool_size, self.max_client_conn, self.extra = pool_size, max_client_conn, extra
        self.logfile = os.path.join(self.dir, "pgbouncer.log")
        self.ini = os.path.join(self.dir, "pgbouncer.ini")
        self.settings: dict[str, str] = {}

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
            "unix_socket_dir": self.dir,          # the unix-socket scenarios
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
            "server_reset_query": "DISCARD ALL",
            "server_reset_query_always": "0",
        }
        if self.tls:              # clients that ask get TLS (the TLS scenarios)
            settings.update(client_tls_sslmode="allow", client_tls_cert_file=self.tls[0],
                            client_tls_key_file=self.tls[1])
        for key, value in self.extra:
            settings[key] = value
        if self.reset_always:                 # what makes this target what it is: not overridable
            settings["server_reset_query_always"] = "1"
            if not settings.get("server_reset_query"):
                settings["server_reset_query"] = "DISCARD ALL"
        self.settings = settings
        self.unix_dir = settings["unix_socket_dir"] or None
        with open(self.ini, "w") as f:
            f.write("[databases]\n")
            f.write(f"{BENCH_DB} = host=127.0.0.1 port={self.cluster.port} dbname={BENCH_DB}\n\n")
            f.write("[pgbouncer]\n")
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")
        for p in (userlist, self.ini):
            chown_to(p, self.os_user)
        log(f"starting {self.name} on 127.0.0.1:{self.port}"
            f" (server_reset_query_always={settings['server_reset_query_always']})")
        out = open(os.path.join(self.dir, "stdout.log"), "wb")
        self.proc = subprocess.Popen([self.exe, self.ini], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=self.dir, start_new_session=True,
                                     preexec_fn=make_preexec(self.os_user, self.cpus))
        out.close()
        try:
            wait_port(self.port, 20, self.proc, self.name)
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


def proxy_runnable(src: str = REPO_ROOT) -> tuple[bool, str]:
    """Whether `python -m threadpool_proxy --help` works from source tree src (and
    really imports the package from there), and why not."""
    env = dict(os.environ, PYTHONPATH=_pythonpath(src))
    try:
        r = subprocess.run([sys.executable, "-m", "threadpool_proxy", "--help"], capture_output=True,
                           text=True, cwd=src, env=env, timeout=30, stdin=subprocess.DEVNULL)
        if r.returncode == 0:
            # PYTHONPATH must win over an installed (e.g. editable) copy of the package
            w = subprocess.run([sys.executable, "-c", "import threadpool_proxy; print(threadpool_proxy.__file__)"],
                               capture_output=True, text=True, cwd=src, env=env, timeout=30,
                               stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, "`python -m threadpool_proxy --help` did not finish within 30 s"
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        return False, (f"`python -m threadpool_proxy --help` failed (status {r.returncode}) in {src}: "
                       f"{lines[-1] if lines else 'no output'}")
    where = w.stdout.strip()
    want = os.path.join(os.path.realpath(src), "threadpool_proxy") + os.sep
    if not where or not os.path.realpath(where).startswith(want):
        return False, f"with PYTHONPATH={src} threadpool_proxy is imported from {where or '?'}, not {want}"
    return True, ""


def _pythonpath(src: str = REPO_ROOT) -> str:
    old = os.environ.get("PYTHONPATH")
    return src + (os.pathsep + old if old else "")


def _set_dotted(cfg: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def source_version(src: str) -> str:
    """`<short rev>[ + uncommitted changes]` of the git checkout at src, or a note."""
    try:
        r = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if r.returncode != 0:
            return "not a git checkout"
        rev = r.stdout.strip() or "no commit"
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "threadpool_proxy"],
                               capture_output=True, text=True).stdout.strip()
        return f"{rev}{' + uncommitted changes' if dirty else ''}"
    except OSError:
        return "?"


class ProxyTarget(Target):
    """`python -m threadpool_proxy -c proxy.yaml` with src (default: this repo) first on
    PYTHONPATH and as the working directory.  Target `proxy-base` is the same with
    another source tree (--proxy-base-src) and the identical config."""

    def __init__(self, cluster: PgCluster, workdir: str, auth: str, pool_size: int,
                 max_client_conn: int, extra: list[tuple[str, object]],
                 name: str = "proxy", src: str = REPO_ROOT, tls: tuple[str, str] | None = None,
                 workers: int = 1, cpus: set[int] | None = None):
        super().__init__()
        self.workers, self.cpus = workers, cpus
        self.tls = tls
        self.name, self.src = name, src
        self.cluster = cluster
        self.dir = os.path.join(workdir, name)
        self.auth, self.pool_size, self.max_client_conn, self.extra = auth, pool_size, max_client_conn, extra
        self.logfile = os.path.join(self.dir, "proxy.log")
        self.config_path = os.path.join(self.dir, "proxy.yaml")
        self.config: dict = {}

    def start(self) -> None:
        ok, why = proxy_runnable(self.src)
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
        if os.path.exists(os.path.join(self.src, "threadpool_proxy", "listeners.py")):
            cfg["listen"]["unix_socket_dir"] = self.dir     # (a source tree older than unix sockets has none)
        if self.workers > 1:
            cfg["workers"] = self.workers
        if self.auth == "scram-sha-256":
            auth_file = os.path.join(self.dir, "users.yaml")
            fd = os.open(auth_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                yaml.safe_dump({"users": {BENCH_ROLE: {"scram": self.cluster.verifier}}}, f)
            cfg["auth_type"] = "scram-sha-256"
            cfg["auth_file"] = auth_file
        if self.tls:              # clients that ask get TLS (the TLS scenarios)
            cfg.update(client_tls_sslmode="allow", client_tls_cert_file=self.tls[0],
                       client_tls_key_file=self.tls[1])
        for key, value in self.extra:
            _set_dotted(cfg, key, value)
        self.config = cfg
        self.unix_dir = cfg["listen"].get("unix_socket_dir")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
        log(f"starting {self.name} (threadpool_proxy from {self.src}) on 127.0.0.1:{self.port} "
            f"(auth {cfg['auth_type']})")
        out = open(self.logfile, "wb")
        env = dict(os.environ, PYTHONPATH=_pythonpath(self.src))
        # cwd = src too: `python -m` puts the working directory first on sys.path
        self.proc = subprocess.Popen([sys.executable, "-m", "threadpool_proxy", "-c", self.config_path],
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.src, env=env, start_new_session=True,
                                     preexec_fn=make_preexec(None, self.cpus))
        out.close()
        try:
            wait_port(self.port, 30, self.proc, self.name)
        except BenchError as exc:
            raise BenchError(f"{exc}; log tail ({self.logfile}):\n{tail(self.logfile)}")

    def cpu_seconds(self) -> float | None:
        """With workers: the supervisor and every worker (restarted ones included, once reaped)."""
        if self.workers <= 1:
            return super().cpu_seconds()
        if not self.proc or self.proc.poll() is not None:
            return None
        try:
            return tree_cpu_seconds(self.proc.pid)
        except (OSError, ValueError, IndexError):
            return None

    def status(self) -> dict:
        if self.workers <= 1:
            return super().status()
        if not self.proc or self.proc.poll() is not None:
            return {}
        try:
            return tree_status(self.proc.pid)
        except OSError:
            return {}

    def version(self) -> str:
        v = f"threadpool_proxy @ {source_version(self.src)}"
        return v if self.src == REPO_ROOT else f"{v} ({self.src})"
