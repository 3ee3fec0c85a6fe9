"""Fixtures: a real, throw-away PostgreSQL cluster and proxies in front of it.

``pg`` (session): a cluster initdb'ed into a temporary directory, listening on
127.0.0.1 on a free port, with scram-sha-256 for TCP logins and these roles:

    postgres   superuser, password PASSWORDS["postgres"]
    app        LOGIN, 'app-secret', owns database appdb
    other      LOGIN, 'other-secret', owns database otherdb
    md5user    LOGIN, 'md5-secret' stored as md5, hba method md5
    trustuser  LOGIN, hba method trust
    repl       LOGIN REPLICATION, 'repl-secret' (pg_hba: replication connections, scram-sha-256)

with ``wal_level = logical`` (WAL senders and replication slots at their defaults,
10 each), so that physical and logical replication clients can run through a proxy.

``proxy_factory`` (function): ``proxy_factory(**overrides)`` starts a proxy in
front of ``pg`` and stops it (and every other one it started) at teardown.

The cluster is a ``threadpool_proxy.pgcluster.PgCluster`` (the same launcher as
``--demo`` and the benchmark): as the ``postgres`` OS user when run as root,
removed at the end.  Set PG_BINDIR to choose the PostgreSQL binaries.
"""

from __future__ import annotations

import atexit
import copy
import os
import re
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import PASSWORDS, write_auth_file  # noqa: E402
from threadpool_proxy import pgcluster  # noqa: E402


def _conninfo_quote(value) -> str:
    value = str(value)
    if value and re.fullmatch(r"[A-Za-z0-9_.:/@+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conninfo(**params) -> str:
    """A libpq conninfo string from keyword parameters (None values left out)."""
    return " ".join(f"{k}={_conninfo_quote(v)}" for k, v in params.items() if v is not None)


# -- the cluster --------------------------------------------------------------

class PgCluster(pgcluster.PgCluster):
    """A temporary PostgreSQL cluster; see the module docstring for its roles."""

    HBA = (
        "local   all  all                    trust",
        "host    all  md5user    127.0.0.1/32  md5",
        "host    all  trustuser  127.0.0.1/32  trust",
        "host    all  all        127.0.0.1/32  scram-sha-256",
        "host    all  all        ::1/128       scram-sha-256",
        "host    replication  all  127.0.0.1/32  scram-sha-256",
        "local   replication  all                trust",     # pg_basebackup of a standby (PgStandby)
    )
    SETTINGS = {
        "max_connections": 200,
        "log_connections": "on",
        "log_disconnections": "on",
        "log_line_prefix": "%m [%p] %u@%d ",
        "wal_level": "logical",
        "max_wal_senders": 10,
        "max_replication_slots": 10,
    }

    def __init__(self) -> None:
        super().__init__(hba=self.HBA, settings=self.SETTINGS, prefix="tpp-pg-")
        self.passwords = dict(PASSWORDS)
        self._lock = threading.Lock()
        self._monitor = None
        self._conns = []

    # ---- life cycle ----

    def start(self) -> "PgCluster":
        try:
            super().start()
        except pgcluster.PgClusterError as exc:
            raise RuntimeError(f"{exc}\n{exc.output}") from None
        self._setup_roles()
        return self

    def _setup_roles(self) -> None:
        pw = self.passwords
        self.sql("SET password_encryption = 'scram-sha-256'",
                 f"ALTER ROLE postgres PASSWORD {_lit(pw['postgres'])}",
                 f"CREATE ROLE app LOGIN PASSWORD {_lit(pw['app'])}",
                 f"CREATE ROLE other LOGIN PASSWORD {_lit(pw['other'])}",
                 f"CREATE ROLE trustuser LOGIN PASSWORD {_lit(pw['trustuser'])}",
                 f"CREATE ROLE repl LOGIN REPLICATION PASSWORD {_lit(pw['repl'])}",
                 "SET password_encryption = 'md5'",
                 f"CREATE ROLE md5user LOGIN PASSWORD {_lit(pw['md5user'])}",
                 "RESET password_encryption",
                 "CREATE DATABASE appdb OWNER app",
                 "CREATE DATABASE otherdb OWNER other")

    def stop(self) -> None:
        """Stop the server (immediate mode) and remove the directory; safe to call twice."""
        with self._lock:
            for conn in [self._monitor] + self._conns:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
            self._monitor = None
            self._conns = []
        super().stop(mode="immediate")

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

    def restart(self, mode: str = "fast", while_down=None) -> float:
        """Restart the server (``pg_ctl stop -m mode``, then start it again on the same port).

        ``while_down()``, if given, runs while the server is stopped.  Every
        backend is terminated; open psycopg connections to the server (the
        monitor, superuser_conn()) are dead afterwards.  Returns how long the
        server was down (seconds).
        """
        import time
        pg_ctl = self.bin("pg_ctl")
        t0 = time.monotonic()
        self.run([pg_ctl, "-D", self.datadir, "-m", mode, "-w", "-t", "60", "stop"], what="pg_ctl stop")
        try:
            if while_down is not None:
                while_down()
        finally:
            self.run([pg_ctl, "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60", "start"],
                     what="pg_ctl start", start_new_session=True)
            self.postmaster_pid = self._pid_from_file()
        return time.monotonic() - t0


def _lit(value: str) -> str:
    """An SQL string literal (for utility statements that take no parameters)."""
    return "'" + value.replace("'", "''") + "'"


def _running_cluster(*setup_sql):
    """A started PgCluster (``setup_sql`` run on it first) for a fixture to yield; stopped after,
    and at exit should the test run be cut short."""
    try:
        cluster = PgCluster()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    atexit.register(cluster.stop)
    try:
        cluster.start()
        if setup_sql:
            cluster.sql(*setup_sql)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg():
    """The session's PostgreSQL cluster (a PgCluster)."""
    yield from _running_cluster()


class PgStandby(PgCluster):
    """A hot standby of ``primary``: pg_basebackup over its unix socket, then streaming replication.

    The same roles, passwords and databases as the primary (it is a copy);
    pg_is_in_recovery() is true and it reports in_hot_standby = on, until
    ``promote()``.
    """

    def __init__(self, primary: PgCluster) -> None:
        super().__init__()
        self.primary = primary

    def start(self) -> "PgStandby":
        import os as _os
        try:
            if _os.geteuid() == 0:
                self.run_as = pgcluster.ensure_os_user()
            self._make_dir()
            p = self.primary
            self.run([self.bin("pg_basebackup"), "-h", p.sockdir, "-p", p.port, "-U", "postgres",
                      "-D", self.datadir, "-X", "stream", "--no-sync", "-c", "fast"], what="pg_basebackup")
            with open(_os.path.join(self.datadir, "standby.signal"), "w"):
                pass
            self._give_to_run_as(_os.path.join(self.datadir, "standby.signal"))
            self.settings = {**self.settings,
                             "primary_conninfo": f"host={p.sockdir} port={p.port} user=postgres"}
            self._start_server(None)
        except pgcluster.PgClusterError as exc:
            self.stop()
            raise RuntimeError(f"{exc}\n{exc.output}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def promote(self) -> None:
        self.run([self.bin("pg_ctl"), "-D", self.datadir, "-w", "-t", "60", "promote"], what="pg_ctl promote")


@pytest.fixture(scope="module")
def pg_ro():
    """A second, independent cluster with the same roles and passwords as ``pg``, read-only by default.

    ``default_transaction_read_only = on`` (set after the roles are made), so
    libpq's target_session_attrs sees it as read-only, as a replica would be:
    the tests of several nodes route between ``pg`` and this one.  Per module:
    it stops when the module using it is done.
    """
    yield from _running_cluster("ALTER SYSTEM SET default_transaction_read_only = on", "SELECT pg_reload_conf()")


@pytest.fixture
def standby_factory(pg):
    """``standby_factory()`` -> a new hot standby of ``pg`` (PgStandby), stopped and removed at teardown."""
    made = []

    def make() -> PgStandby:
        standby = PgStandby(pg)
        atexit.register(standby.stop)
        made.append(standby)
        return standby.start()

    try:
        yield make
    finally:
        for standby in made:
            standby.stop()


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


# -- auth files for proxy-terminated authentication ------------------------------

@pytest.fixture(scope="session")
def rolpasswords(pg):
    """rolpassword of every role, as pg_authid stores it."""
    with pg.superuser_conn() as conn:
        rows = conn.execute("SELECT rolname, rolpassword FROM pg_authid WHERE rolpassword IS NOT NULL").fetchall()
    return dict(rows)


@pytest.fixture
def auth_file(tmp_path, rolpasswords):
    """An auth file with the server's verifiers of app and other, and md5user's md5 hash."""
    return write_auth_file(tmp_path / "users.yaml", {
        "app": {"scram": rolpasswords["app"]},
        "other": {"scram": rolpasswords["other"]},
        "md5user": {"md5": rolpasswords["md5user"]},
    })


@pytest.fixture
def proxy_factory(pg):
    factory = ProxyFactory(pg)
    try:
        yield factory
    finally:
        factory.stop_all()
