"""Fixtures: a real, throw-away PostgreSQL cluster and proxies in front of it.

``pg`` (session): a cluster initdb'ed into a temporary directory, listening on
127.0.0.1 on a free port, with scram-sha-256 for TCP logins and these roles:

    postgres   superuser, password PASSWORDS["postgres"]
    app        LOGIN, 'app-secret', owns database appdb
    other      LOGIN, 'other-secret', owns database otherdb
    md5user    LOGIN, 'md5-secret' stored as md5, hba method md5
    trustuser  LOGIN, hba method trust

``proxy_factory`` (function): ``proxy_factory(**overrides)`` starts a proxy in
front of ``pg`` and stops it (and every other one it started) at teardown.

Set PG_BINDIR to choose the PostgreSQL binaries.
"""

from __future__ import annotations

import atexit
import copy
import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import PASSWORDS  # noqa: E402


# -- locating PostgreSQL ------------------------------------------------------

def _version_key(path: str):
    m = re.search(r"/postgresql/([0-9.]+)/bin$", path)
    return tuple(int(x) for x in m.group(1).split(".") if x) if m else ()


def find_bindir() -> str:
    """PG_BINDIR, else ``pg_config --bindir`` (if it holds initdb), else the newest /usr/lib/postgresql/*/bin."""
    env = os.environ.get("PG_BINDIR")
    if env:
        if not os.access(os.path.join(env, "initdb"), os.X_OK):
            raise RuntimeError(f"PG_BINDIR={env} has no initdb")
        return env
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and os.access(os.path.join(out, "initdb"), os.X_OK):
            return out
    candidates = [d for d in glob.glob("/usr/lib/postgresql/*/bin")
                  if os.access(os.path.join(d, "initdb"), os.X_OK)]
    if candidates:
        return max(candidates, key=_version_key)
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(found)
    raise RuntimeError("PostgreSQL server binaries not found: install postgresql or set PG_BINDIR")


def _find_tool(name: str):
    """An admin tool that may live in an sbin directory missing from PATH."""
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}", f"/usr/bin/{name}", f"/bin/{name}")
         if os.access(p, os.X_OK)), None)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _conninfo_quote(value) -> str:
    value = str(value)
    if value and re.fullmatch(r"[A-Za-z0-9_.:/@+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conninfo(**params) -> str:
    """A libpq conninfo string from keyword parameters (None values left out)."""
    return " ".join(f"{k}={_conninfo_quote(v)}" for k, v in params.items() if v is not None)


# -- the cluster --------------------------------------------------------------

class PgCluster:
    """A temporary PostgreSQL cluster; see the module docstring for its roles."""

    OS_USER = "postgres"

    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.bindir = find_bindir()
        self.passwords = dict(PASSWORDS)
        self.as_root = os.geteuid() == 0
        self.tmpdir = self._make_tmpdir()
        self.datadir = os.path.join(self.tmpdir, "data")
        self.sockdir = self.tmpdir
        self.logfile = os.path.join(self.tmpdir, "postgres.log")
        self._started = False
        self._stopped = False
        self._lock = threading.Lock()
        self._monitor = None
        self._conns = []

    # ---- life cycle ----

    def _make_tmpdir(self) -> str:
        d = tempfile.mkdtemp(prefix="tpp-pg-")
        if len(d) > 60:  # unix socket paths are limited to ~107 bytes
            os.rmdir(d)
            d = tempfile.mkdtemp(prefix="tpp-pg-", dir="/tmp")
        try:
            if self.as_root:
                self._ensure_os_user()
                pw = pwd.getpwnam(self.OS_USER)
                os.chown(d, pw.pw_uid, pw.pw_gid)
            os.chmod(d, 0o700)
        except BaseException:
            shutil.rmtree(d, ignore_errors=True)
            raise
        return d

    def _ensure_os_user(self) -> None:
        try:
            pwd.getpwnam(self.OS_USER)
        except KeyError:
            subprocess.run([_find_tool("useradd") or "useradd", "--system", "--user-group", "--no-create-home",
                            "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                            self.OS_USER], check=True, capture_output=True, timeout=60)

    def _run(self, args, timeout=120, check=True):
        cmd = [str(a) for a in args]
        if self.as_root:
            runuser = _find_tool("runuser")
            if runuser:
                cmd = [runuser, "-u", self.OS_USER, "--"] + cmd
            else:
                cmd = [_find_tool("su") or "su", "-s", "/bin/sh", self.OS_USER, "-c", shlex.join(cmd)]
        env = dict(os.environ, LC_ALL="C", LANG="C")
        for var in ("PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE"):
            env.pop(var, None)
        proc = subprocess.run(cmd, cwd=self.tmpdir, env=env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}\n{self._log_tail()}")
        return proc

    def _log_tail(self, n: int = 40) -> str:
        try:
            with open(self.logfile, encoding="utf-8", errors="replace") as f:
                return "--- postgres.log ---\n" + "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def start(self) -> "PgCluster":
        self._run([os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", "postgres",
                   "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                   "--no-locale", "--no-sync"])
        with open(os.path.join(self.datadir, "pg_hba.conf"), "w", encoding="utf-8") as f:
            f.write(
                "# written by tests/conftest.py\n"
                "local   all  all                    trust\n"
                "host    all  md5user    127.0.0.1/32  md5\n"
                "host    all  trustuser  127.0.0.1/32  trust\n"
                "host    all  all        127.0.0.1/32  scram-sha-256\n"
                "host    all  all        ::1/128       scram-sha-256\n")
        last_error = None
        for _attempt in range(5):
            self.port = free_port(self.host)
            self._write_settings()
            proc = self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir,
                              "-l", self.logfile, "-w", "-t", "60", "start"], check=False)
            if proc.returncode == 0:
                break
            last_error = f"{proc.stdout}\n{proc.stderr}\n{self._log_tail()}"
            if "in use" not in last_error and "could not bind" not in last_error:
                break
        else:
            proc = None
        if proc is None or proc.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{last_error}")
        self._started = True
        self._setup_roles()
        return self

    def _write_settings(self) -> None:
        path = os.path.join(self.datadir, "postgresql.auto.conf")
        with open(path, "w", encoding="utf-8") as f:
            f.write(
                "# written by tests/conftest.py\n"
                f"listen_addresses = '{self.host}'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.sockdir}'\n"
                "max_connections = 200\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
                "password_encryption = 'scram-sha-256'\n"
                "log_connections = on\n"
                "log_disconnections = on\n"
                "log_line_prefix = '%m [%p] %u@%d '\n")

    def _setup_roles(self) -> None:
        import psycopg
        pw = self.passwords
        with psycopg.connect(self._socket_conninfo(), autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"ALTER ROLE postgres PASSWORD {_lit(pw['postgres'])}")
            conn.execute(f"CREATE ROLE app LOGIN PASSWORD {_lit(pw['app'])}")
            conn.execute(f"CREATE ROLE other LOGIN PASSWORD {_lit(pw['other'])}")
            conn.execute(f"CREATE ROLE trustuser LOGIN PASSWORD {_lit(pw['trustuser'])}")
            conn.execute("SET password_encryption = 'md5'")
            conn.execute(f"CREATE ROLE md5user LOGIN PASSWORD {_lit(pw['md5user'])}")
            conn.execute("RESET password_encryption")
            conn.execute("CREATE DATABASE appdb OWNER app")
            conn.execute("CREATE DATABASE otherdb OWNER other")

    def stop(self) -> None:
        """Stop the server (immediate mode) and remove the directory; safe to call twice."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            for conn in [self._monitor] + self._conns:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
            self._monitor = None
            self._conns = []
        try:
            if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
                try:
                    self._run([os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir,
                               "-m", "immediate", "-w", "-t", "30", "stop"], timeout=60, check=False)
                except Exception:
                    pass
                self._kill_postmaster()
        finally:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """Backup for a failed ``pg_ctl stop``: SIGQUIT the postmaster named in postmaster.pid."""
        try:
            with open(os.path.join(self.datadir, "postmaster.pid"), encoding="ascii") as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGQUIT)
        except OSError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

    # ---- connecting ----

    def _socket_conninfo(self, dbname: str = "postgres") -> str:
        return conninfo(host=self.sockdir, port=self.port, user="postgres", dbname=dbname,
                        connect_timeout=10)

    def dsn(self, user: str = "app", password: str | None = None, dbname: str = "appdb",
            port: int | None = None, host: str | None = None, **params) -> str:
        """A libpq conninfo string for TCP (default: this cluster; give host/port for a proxy).

        ``password`` defaults to the role's password; extra keyword arguments
        become conninfo parameters (``sslmode='disable'``, ``application_name=...``).
        """
        if password is None:
            password = self.passwords.get(user)
        params.setdefault("connect_timeout", 10)
        return conninfo(host=host or self.host, port=port or self.port, dbname=dbname,
                        user=user, password=password, **params)

    def superuser_conn(self, dbname: str = "postgres"):
        """A new autocommit psycopg connection as ``postgres`` (over the unix socket).

        Close it when done; any left open are closed when the cluster stops.
        """
        import psycopg
        conn = psycopg.connect(self._socket_conninfo(dbname), autocommit=True)
        with self._lock:
            self._conns = [c for c in self._conns if not c.closed]
            self._conns.append(conn)
        return conn

    def backend_pids(self, user: str | None = None, dbname: str | None = None) -> set:
        """PIDs of client backends in pg_stat_activity, optionally of one user and/or database.

        The connection asking (a long-lived monitor connection) is never included.
        """
        import psycopg
        sql = ("SELECT pid FROM pg_stat_activity"
               " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
               " AND (%(user)s::text IS NULL OR usename = %(user)s::text)"
               " AND (%(db)s::text IS NULL OR datname = %(db)s::text)")
        with self._lock:
            for attempt in (1, 2):
                if self._monitor is None or self._monitor.closed:
                    self._monitor = psycopg.connect(self._socket_conninfo(), autocommit=True)
                try:
                    rows = self._monitor.execute(sql, {"user": user, "db": dbname}).fetchall()
                    return {r[0] for r in rows}
                except psycopg.OperationalError:
                    try:
                        self._monitor.close()
                    except Exception:
                        pass
                    self._monitor = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def terminate_backends(self, user: str | None = None, dbname: str | None = None) -> int:
        """pg_terminate_backend() every client backend matching; returns how many."""
        pids = self.backend_pids(user=user, dbname=dbname)
        if not pids:
            return 0
        with self.superuser_conn() as conn:
            for pid in pids:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return len(pids)


def _lit(value: str) -> str:
    """An SQL string literal (for utility statements that take no parameters)."""
    return "'" + value.replace("'", "''") + "'"


@pytest.fixture(scope="session")
def pg():
    """The session's PostgreSQL cluster (a PgCluster)."""
    try:
        cluster = PgCluster()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    atexit.register(cluster.stop)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# -- proxies ------------------------------------------------------------------

class ProxyFactory:
    """``proxy_factory(**overrides)`` -> a started proxy in front of ``pg``.

    The base configuration is::

        {"listen": {"host": "127.0.0.1", "port": 0},
         "databases": {"appdb": {host, port}, "otherdb": {host, port}, "*": {host, port}},
         "pool_mode": "transaction", "pool_size": 5}

    Overrides replace top-level keys (``databases`` is replaced whole); a
    ``listen`` override is merged into the default listen section.
    """

    def __init__(self, pg: PgCluster) -> None:
        self.pg = pg
        self.started = []

    def config(self, **overrides) -> dict:
        """The configuration dict ``__call__`` would start (nothing started)."""
        target = {"host": self.pg.host, "port": self.pg.port}
        config = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "databases": {"appdb": dict(target), "otherdb": dict(target), "*": dict(target)},
            "pool_mode": "transaction",
            "pool_size": 5,
        }
        for key, value in copy.deepcopy(overrides).items():
            if key == "listen" and isinstance(value, dict):
                config["listen"].update(value)
            else:
                config[key] = value
        return config

    def __call__(self, **overrides):
        import threadpool_proxy
        proxy = threadpool_proxy.start(self.config(**overrides))
        self.started.append(proxy)
        return proxy

    STOP_TIMEOUT = 60.0

    def stop_all(self) -> None:
        """Stop every proxy started (newest first); a ``stop()`` that hangs becomes an error."""
        errors = []
        while self.started:
            proxy = self.started.pop()
            outcome = {}

            def stop(proxy=proxy, outcome=outcome):
                try:
                    proxy.stop()
                except BaseException as exc:  # noqa: BLE001 - reported below
                    outcome["error"] = exc

            t = threading.Thread(target=stop, name="proxy_factory-stop", daemon=True)
            t.start()
            t.join(self.STOP_TIMEOUT)
            if t.is_alive():
                errors.append(RuntimeError(
                    f"proxy on port {getattr(proxy, 'port', '?')}: stop() did not return "
                    f"within {self.STOP_TIMEOUT:.0f}s"))
            elif "error" in outcome:
                errors.append(outcome["error"])
        if errors:
            raise errors[0]


@pytest.fixture
def proxy_factory(pg):
    factory = ProxyFactory(pg)
    try:
        yield factory
    finally:
        factory.stop_all()
