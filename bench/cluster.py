"""A throwaway PostgreSQL cluster in a temp dir, plus package installation."""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import time

from .util import BenchError, children_of, chown_to, free_port, is_root, log, raise_nofile, reap, tail, tree_cpu_seconds, wait_port

PG_USER = "postgres"          # OS user PostgreSQL runs as when we are root
BENCH_ROLE = "bench"
BENCH_DB = "bench"

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
    """The newest /usr/lib/postgresql/N/bin that has initdb, pg_ctl, postgres and pgbench."""
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        if all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres", "pgbench")):
            try:
                found.append((int(d.split("/")[-2]), d))
            except ValueError:
                pass
    return max(found)[1] if found else None


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
            raise BenchError("postgresql installed but no /usr/lib/postgresql/*/bin with initdb/pgbench found")
    bouncer = pgbouncer_path()
    if need_pgbouncer and bouncer is None:
        _apt_install("pgbouncer")
        bouncer = pgbouncer_path()
        if bouncer is None:
            raise BenchError("pgbouncer installed but not found in PATH or /usr/sbin")
    return bindir, bouncer


def ensure_pg_user() -> str | None:
    """As root: the OS user to run servers as (created if missing). Else None (run as ourselves)."""
    if not is_root():
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        log(f"creating OS user {PG_USER}")
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", PG_USER], check=True)
    return PG_USER


class PgCluster:
    """initdb + pg_ctl start in <workdir>/pg; stop() is idempotent."""

    def __init__(self, workdir: str, bindir: str, os_user: str | None, scale: int):
        self.bindir = bindir
        self.os_user = os_user
        self.scale = scale
        self.base = os.path.join(workdir, "pg")
        self.datadir = os.path.join(self.base, "data")
        self.sockdir = os.path.join(self.base, "sock")
        self.logfile = os.path.join(self.base, "postgres.log")
        self.port = None
        self.password = secrets.token_hex(12)
        self.verifier = None          # SCRAM secret of the bench role, from pg_authid
        self.version = None
        self.postmaster_pid = None
        self._started = False

    # -- helpers
    def _as_pg(self, argv: list[str]) -> list[str]:
        if self.os_user:
            return ["runuser", "-u", self.os_user, "--"] + argv
        return argv

    def _run(self, argv, what, **kw):
        r = subprocess.run(argv, capture_output=True, text=True, cwd=self.base, **kw)
        if r.returncode != 0:
            raise BenchError(f"{what} failed (status {r.returncode}): "
                             f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ''}")
        return r

    def bin(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def admin_sql(self, sql: str) -> str:
        """Run SQL as the superuser over the unix socket (trust). Returns stdout (-At)."""
        r = self._run([self.bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                       "-h", self.sockdir, "-p", str(self.port), "-U", PG_USER, "-d", "postgres",
                       "-c", sql], f"psql {sql[:40]!r}")
        return r.stdout.strip()

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
        os.makedirs(self.sockdir)
        for d in (self.base, self.sockdir):
            chown_to(d, self.os_user)
        self.port = free_port()
        log(f"initdb in {self.datadir}")
        self._run(self._as_pg([self.bin("initdb"), "-D", self.datadir, "-U", PG_USER, "-E", "UTF8",
                               "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256",
                               "--no-sync"]), "initdb")
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n")
        with open(os.path.join(self.datadir, "postgresql.auto.conf"), "a") as f:
            f.write(f"""
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{self.sockdir}'
max_connections = 300
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 256MB
log_min_messages = warning
log_connections = off
log_disconnections = off
""")
        chown_to(os.path.join(self.datadir, "pg_hba.conf"), self.os_user)
        log(f"starting postgres on 127.0.0.1:{self.port}")
        self._started = True
        # new session: a Ctrl-C at the terminal must not reach the postmaster; we stop it ourselves
        r = subprocess.run(self._as_pg([self.bin("pg_ctl"), "-D", self.datadir, "-l", self.logfile,
                                        "-w", "-t", "60", "start"]),
                           capture_output=True, text=True, cwd=self.base, start_new_session=True,
                           preexec_fn=raise_nofile)
        if r.returncode != 0:
            raise BenchError(f"pg_ctl start failed: {r.stderr.strip() or r.stdout.strip()}\n{tail(self.logfile)}")
        with open(os.path.join(self.datadir, "postmaster.pid")) as f:
            self.postmaster_pid = int(f.readline())
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

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        r = subprocess.run(self._as_pg([self.bin("pg_ctl"), "-D", self.datadir, "-m", "fast",
                                        "-w", "-t", "30", "stop"]),
                           capture_output=True, text=True, cwd=self.base)
        if r.returncode == 0 or self.postmaster_pid is None:
            self._reap_postmaster()
            return
        # pg_ctl failed: fall back to the postmaster PID (SIGQUIT = immediate shutdown)
        pid = self.postmaster_pid
        for sig, wait in ((signal.SIGQUIT, 10), (signal.SIGKILL, 5)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                reap(pid)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)
        log(f"could not stop postgres (pid {pid})")

    def _reap_postmaster(self) -> None:
        """If we are its subreaper, collect the exited postmaster (no zombie left)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                got, _ = os.waitpid(self.postmaster_pid, os.WNOHANG)
            except ChildProcessError:
                return          # not our child (no subreaper): nothing to collect
            if got:
                return
            time.sleep(0.05)


def server_version_string(bindir: str) -> str:
    try:
        out = subprocess.run([os.path.join(bindir, "postgres"), "--version"],
                             capture_output=True, text=True).stdout.strip()
        return re.sub(r"^postgres\s+\(PostgreSQL\)\s+", "PostgreSQL ", out)
    except OSError:
        return "?"
