"""The benchmark's PostgreSQL (a threadpool_proxy.pgcluster cluster in the work dir), plus package installation."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time

from threadpool_proxy import pgcluster

from .util import (BenchError, children_of, is_root, log, pin_preexec, raise_nofile, tail, tree_cpu_seconds,
                   wait_port)

PG_USER = pgcluster.OS_USER   # OS user PostgreSQL runs as when we are root
BENCH_ROLE = "bench"
BENCH_DB = "bench"
PG_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pgbench")

_apt_updated = False


def _apt_install(package: str) -> None:
    global _apt_updated
    if not is_root() or not shutil.which("apt-get"):
        raise BenchError(f"{package} is not installed and cannot be installed here "
                         f"(need root and apt-get): install it and retry")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    if not _apt_updated:
        log("apt-get update")
        subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
        _apt_updated = True
    log(f"apt-get install -y {package}")
    subprocess.run(["apt-get", "install", "-y", package], check=True, env=env, stdout=subprocess.DEVNULL)


def pg_bindir() -> str | None:
    """The PostgreSQL programs' directory, as pgcluster.find_bindir finds it (PG_BINDIR,
    pg_config, newest /usr/lib/postgresql/N/bin, PATH), but one with pgbench too; None if none."""
    try:
        return pgcluster.find_bindir(need=PG_PROGRAMS)
    except RuntimeError:
        return None


def pgbouncer_path() -> str | None:
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None)


def ensure_packages(need_pgbouncer: bool) -> tuple[str, str | None]:
    """Install postgresql / pgbouncer with apt-get if missing. Returns (bindir, pgbouncer)."""
    bindir = pg_bindir()
    if bindir is None:
        _apt_install("postgresql")
        bindir = pg_bindir()
        if bindir is None:
            raise BenchError(f"postgresql installed but no directory with {'/'.join(PG_PROGRAMS)} found")
    bouncer = pgbouncer_path()
    if need_pgbouncer and bouncer is None:
        _apt_install("pgbouncer")
        bouncer = pgbouncer_path()
        if bouncer is None:
            raise BenchError("pgbouncer installed but not found in PATH or /usr/sbin")
    return bindir, bouncer


def ensure_pg_user() -> str | None:
    """As root: the OS user to run servers as (created if missing). Else None (run as ourselves)."""
    return pgcluster.ensure_os_user(PG_USER) if is_root() else None


class PgCluster(pgcluster.PgCluster):
    """The cluster in <workdir>/pg-XXXX (left for the caller to remove with the work dir,
    or to keep with --keep).  stop() (pgcluster's) is idempotent: pg_ctl stop -m fast, or
    SIGQUIT/SIGKILL to the postmaster PID if that fails; as the postmaster's subreaper
    (bench/__main__ makes us one) we also collect it, so no zombie is left behind."""

    SETTINGS = {
        "max_connections": 300,
        "shared_buffers": "256MB",
        "log_min_messages": "warning",
        "log_connections": "off",
        "log_disconnections": "off",
    }

    def __init__(self, workdir: str, bindir: str, os_user: str | None, scale: int):
        super().__init__(bindir=bindir, settings=self.SETTINGS, prefix="pg-", parent=workdir, keep_dir=True)
        self.os_user = os_user        # pgcluster runs server commands as PG_USER when root, as ensure_pg_user says
        self.scale = scale
        self.password = secrets.token_hex(12)
        self.verifier = None          # SCRAM secret of the bench role, from pg_authid
        self.version = None
        self.cpus = None              # pin PostgreSQL to these CPUs (--pin-load)

    # -- helpers
    def _run(self, argv, what, **kw):
        r = subprocess.run(argv, capture_output=True, text=True, cwd=self.tmpdir, **kw)
        if r.returncode != 0:
            raise BenchError(f"{what} failed (status {r.returncode}): "
                             f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ''}")
        return r

    def admin_sql(self, sql: str) -> str:
        """Run SQL as the superuser over the unix socket (trust). Returns stdout (-At)."""
        try:
            return self.sql(sql)
        except pgcluster.PgClusterError as exc:
            raise BenchError(str(exc)) from None

    def client_env(self) -> dict:
        """Environment for libpq clients logging in as the bench role over TCP."""
        env = dict(os.environ)
        for k in list(env):
            if k.startswith("PG"):
                del env[k]
        env.update(PGPASSWORD=self.password, PGSSLMODE="disable", PGGSSENCMODE="disable",
                   PGUSER=BENCH_ROLE, PGDATABASE=BENCH_DB, PGCONNECT_TIMEOUT="30")
        return env

    # -- lifecycle
    def start(self) -> None:
        """initdb and start (with a raised RLIMIT_NOFILE for 300 connections); pg_ctl runs
        in a new session, so a Ctrl-C at the terminal does not reach the postmaster: we stop it."""
        log(f"initdb and start postgres in {self.parent}")
        try:
            super().start(preexec_fn=pin_preexec(self.cpus, raise_nofile))
        except pgcluster.PgClusterError as exc:
            raise BenchError(f"{exc}\n{tail(self.logfile)}") from None
        log(f"postgres in {self.datadir} on 127.0.0.1:{self.port}")
        wait_port(self.port, 30, what="postgres")
        self.version = self.admin_sql("SHOW server_version")

    def setup_bench_db(self) -> None:
        self.admin_sql(f"CREATE ROLE {BENCH_ROLE} LOGIN PASSWORD '{self.password}'")
        self.admin_sql(f"CREATE DATABASE {BENCH_DB} OWNER {BENCH_ROLE}")
        self.verifier = self.admin_sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{BENCH_ROLE}'")
        if not self.verifier.startswith("SCRAM-SHA-256$"):
            raise BenchError(f"expected a SCRAM verifier for role {BENCH_ROLE}, got {self.verifier[:20]!r}")
        log(f"pgbench -i -s {self.scale}")
        t0 = time.monotonic()
        self._run([self.bin("pgbench"), "-i", "-q", "-s", str(self.scale), "-h", "127.0.0.1",
                   "-p", str(self.port), BENCH_DB], "pgbench -i", env=self.client_env())
        self.admin_sql("CHECKPOINT")
        log(f"pgbench -i done in {time.monotonic() - t0:.1f} s")

    def cpu_seconds(self) -> float | None:
        """CPU of the whole server (postmaster + live and reaped backends)."""
        if not self.postmaster_pid:
            return None
        try:
            return tree_cpu_seconds(self.postmaster_pid)
        except (OSError, ValueError, IndexError):
            return None

    def settle(self, timeout: float = 3.0) -> None:
        """Wait until the set of server processes stops shrinking, so that backends of
        clients that just disconnected have exited and been reaped by the postmaster
        (their CPU then shows in its cutime/cstime instead of vanishing in between)."""
        if not self.postmaster_pid:
            return
        deadline = time.monotonic() + timeout
        last, stable = None, 0
        while time.monotonic() < deadline:
            n = len(children_of(self.postmaster_pid))
            stable = stable + 1 if n == last else 0
            if stable >= 3:
                return
            last = n
            time.sleep(0.05)


def server_version_string(bindir: str) -> str:
    try:
        out = subprocess.run([os.path.join(bindir, "postgres"), "--version"],
                             capture_output=True, text=True).stdout.strip()
        return re.sub(r"^postgres\s+\(PostgreSQL\)\s+", "PostgreSQL ", out)
    except OSError:
        return "?"
