"""State that cannot follow a pooled client pins it to its server connection (issue 20, item 3).

Temporary tables, session advisory locks, cursors WITH HOLD, SET ROLE / SET
SESSION AUTHORIZATION, SQL-level PREPARE and LOAD keep a transaction-mode client
on its server connection (not shared, not reset between its transactions) until
the state is undone or the client leaves; SHOW CLIENTS says why; a log line
names the statement.  max_pinned_clients bounds them per pool, pin_on chooses
the kinds, and statement mode refuses them.  The tests keep other clients busy
on the same pool, so that a client that was not pinned would lose its
connection between two of its transactions.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time

import psycopg
import pytest

from helpers import PASSWORDS, connect, read_to_end, trust_session, wait_until

CONSOLE = {"admin_users": ["postgres"]}


def pinned_column(pg, proxy) -> dict:
    """SHOW CLIENTS' last column, by the client's port: its value for each client."""
    with connect(pg, proxy, user="postgres", dbname="threadpool_proxy") as console:
        cur = console.execute("SHOW CLIENTS")
        names = [d.name for d in cur.description]
        assert names[-1] == "pinned" and names[:3] == ["type", "user", "database"], names
        return {row[names.index("port")]: row[-1] for row in cur.fetchall()}


def client_port(conn) -> int:
    return socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM).getsockname()[1]


class Busy:
    """Clients running short transactions on the pool meanwhile, noting the backends they get."""

    def __init__(self, pg, proxy, n: int = 3):
        self.conns = [connect(pg, proxy) for _ in range(n)]
        self.pids: list = []
        self.errors: list = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in self.conns]
        for t in self.threads:
            t.start()

    def _run(self, conn):
        try:
            while not self.stop.is_set():
                self.pids.append(conn.execute("SELECT pg_backend_pid(), pg_sleep(0.002)").fetchone()[0])
        except Exception as exc:  # noqa: BLE001 - reported by close()
            self.errors.append(exc)

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        for c in self.conns:
            c.close()
        assert not self.errors, self.errors


def pid(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_a_temp_table_pins_its_client_until_discard_temp(pg, proxy_factory):
    proxy = proxy_factory(pool_size=2, max_pinned_clients=1, **CONSOLE)
    with connect(pg, proxy) as a:
        busy = Busy(pg, proxy)
        try:
            a.execute("CREATE TEMP TABLE tpp_pinned (x int)")
            own = pid(a)
            mark = len(busy.pids)
            for i in range(20):
                with a.transaction():
                    a.execute("INSERT INTO tpp_pinned VALUES (%s)", (i,))
                    assert a.execute("SELECT count(*), pg_backend_pid() FROM tpp_pinned").fetchone() == (i + 1, own)
                time.sleep(0.01)                     # the busy clients would take it, were it free
            assert pinned_column(pg, proxy)[client_port(a)] == "temp_table"
            assert wait_until(lambda: len(busy.pids) > mark + 50, timeout=60)
            assert own not in busy.pids[mark:]       # nobody else had it since
            a.execute("DISCARD TEMP")
            assert pinned_column(pg, proxy)[client_port(a)] == ""
            mark = len(busy.pids)
            assert wait_until(lambda: own in busy.pids[mark:], timeout=60)     # shared again
            with pytest.raises(psycopg.errors.UndefinedTable):
                a.execute("SELECT * FROM tpp_pinned")
        finally:
            busy.close()


def test_a_temp_table_pins_a_psycopg2_client_too(pg, proxy_factory):
    psycopg2 = pytest.importorskip("psycopg2")
    proxy = proxy_factory(pool_size=2, max_pinned_clients=1)
    conn = psycopg2.connect(pg.dsn(host=proxy.host, port=proxy.port))
    conn.autocommit = False                      # psycopg2's default: every statement in a transaction
    busy = Busy(pg, proxy)
    try:
        cur = conn.cursor()
        cur.execute("CREATE TEMP TABLE tpp_pg2 (x int)")
        conn.commit()
        for i in range(10):
            cur.execute("INSERT INTO tpp_pg2 VALUES (%s)", (i,))
            conn.commit()
            time.sleep(0.01)
        cur.execute("SELECT count(*) FROM tpp_pg2")
        assert cur.fetchone() == (10,)
        conn.commit()
    finally:
        busy.close()
        conn.close()


# (kind, statements that create it, a query that sees it, statements that undo it)
KINDS = [
    ("temp_table", ["CREATE TEMP TABLE tpp_k (x int)"], "SELECT count(*) FROM tpp_k", ["DROP TABLE tpp_k"]),
    ("temp_table", ["SELECT 1 AS x INTO TEMP tpp_k2"], "SELECT count(*) FROM tpp_k2", ["DISCARD ALL"]),
    ("advisory_lock", ["SELECT pg_advisory_lock(20200)"],
     "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
     ["SELECT pg_advisory_unlock(20200)"]),
    ("cursor_with_hold", ["DECLARE tpp_c CURSOR WITH HOLD FOR SELECT generate_series(1, 5)"],
     "SELECT count(*) FROM pg_cursors WHERE name = 'tpp_c'", ["CLOSE tpp_c"]),
    ("role", ["SET ROLE tpp_role"], "SELECT current_user", ["RESET ROLE"]),
    ("prepare", ["PREPARE tpp_p AS SELECT 42"], "EXECUTE tpp_p", ["DEALLOCATE tpp_p"]),
    ("load", ["LOAD 'auto_explain'"], "SHOW auto_explain.log_min_duration", []),     # (as postgres)
    ("listen", ["LISTEN tpp_pin_chan"], "SELECT count(*) FROM pg_listening_channels()", ["UNLISTEN *"]),
]


@pytest.fixture(scope="module")
def tpp_role(pg):
    with pg.superuser_conn() as su:
        su.execute("DROP ROLE IF EXISTS tpp_role")
        su.execute("CREATE ROLE tpp_role")
        su.execute("GRANT tpp_role TO app")


@pytest.mark.parametrize("kind,create,see,undo", KINDS, ids=[f"{k[0]}-{i}" for i, k in enumerate(KINDS)])
def test_each_kind_pins_until_undone(pg, proxy_factory, tpp_role, kind, create, see, undo):
    proxy = proxy_factory(pool_size=2, max_pinned_clients=1, **CONSOLE)
    with connect(pg, proxy, user="postgres" if kind == "load" else "app") as a:
        busy = Busy(pg, proxy, n=2)
        try:
            for sql in create:
                a.execute(sql)
            own = pid(a)
            mark = len(busy.pids)
            seen = a.execute(see).fetchone()
            for _ in range(5):
                time.sleep(0.02)
                assert a.execute(see).fetchone() == seen
                assert pid(a) == own
            assert pinned_column(pg, proxy)[client_port(a)] == kind
            assert own not in busy.pids[mark:]
            if not undo:                        # LOAD cannot be undone: pinned until the client leaves
                return
            for sql in undo:
                a.execute(sql)
            assert pinned_column(pg, proxy)[client_port(a)] == ""
            mark = len(busy.pids)
            assert wait_until(lambda: own in busy.pids[mark:], timeout=60)
        finally:
            busy.close()
    assert wait_until(lambda: proxy.pool.pinned_count(next(iter(proxy.pool.identities()), "")) == 0)


def test_session_authorization_pins_a_superuser_until_reset(pg, proxy_factory):
    proxy = proxy_factory(pool_size=2, max_pinned_clients=1, **CONSOLE)
    with connect(pg, proxy, user="postgres") as a:
        a.execute("SET SESSION AUTHORIZATION app")
        assert a.execute("SELECT session_user").fetchone() == ("app",)
        assert pinned_column(pg, proxy)[client_port(a)] == "role"
        a.execute("RESET SESSION AUTHORIZATION")
        assert pinned_column(pg, proxy)[client_port(a)] == ""


def test_state_that_is_gone_by_the_end_of_the_transaction_does_not_pin(pg, proxy_factory):
    proxy = proxy_factory(pool_size=2, max_pinned_clients=1, **CONSOLE)
    with connect(pg, proxy) as a, pg.superuser_conn("appdb") as holder:
        holder.execute("SELECT pg_advisory_lock(20201)")
        with a.transaction():
            a.execute("CREATE TEMP TABLE tpp_gone (x int) ON COMMIT DROP")
        with a.transaction():
            a.execute("CREATE TEMP TABLE tpp_dropped (x int)")
            a.execute("DROP TABLE tpp_dropped")
        assert a.execute("SELECT pg_try_advisory_lock(20201)").fetchone() == (False,)   # held elsewhere
        with a.transaction():
            a.execute("DECLARE tpp_closed CURSOR WITH HOLD FOR SELECT 1")
            a.execute("CLOSE tpp_closed")
        assert pinned_column(pg, proxy)[client_port(a)] == ""
        assert proxy.pool.pinned_count(next(iter(proxy.pool.identities()))) == 0


def test_pin_on_leaves_other_kinds_unpinned(pg, proxy_factory):
    proxy = proxy_factory(pool_size=2, max_pinned_clients=1, pin_on=["advisory_lock"], **CONSOLE)
    with connect(pg, proxy) as a:
        a.execute("CREATE TEMP TABLE tpp_unpinned (x int)")
        assert pinned_column(pg, proxy)[client_port(a)] == ""
        a.execute("SELECT pg_advisory_lock(20202)")
        assert pinned_column(pg, proxy)[client_port(a)] == "advisory_lock"
        a.execute("SELECT pg_advisory_unlock_all()")
        assert pinned_column(pg, proxy)[client_port(a)] == ""


def test_max_pinned_clients_refuses_the_pinning_statement_with_pgbouncers_words(pg, proxy_factory):
    proxy = proxy_factory(pool_size=4, max_pinned_clients=1, **CONSOLE)
    with connect(pg, proxy) as a, connect(pg, proxy) as b:
        a.execute("CREATE TEMP TABLE tpp_first (x int)")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded) as caught:
            b.execute("SELECT pg_advisory_lock(20203)")
        assert caught.value.diag.message_primary == "no more pinned clients allowed (max_pinned_clients)"
        assert "pg_advisory_lock()" in caught.value.diag.message_detail
        assert "max_pinned_clients" in caught.value.diag.message_hint
        with pg.superuser_conn("appdb") as su:            # refused before it ran
            assert su.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                              "AND objid = 20203").fetchone() == (0,)
        assert b.execute("SELECT 1").fetchone() == (1,)     # b goes on
        # inside a transaction block the transaction fails, as it would have on the server
        b.execute("BEGIN")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            b.execute("CREATE TEMP TABLE tpp_second (x int)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            b.execute("SELECT 1")
        b.execute("ROLLBACK")
        assert pinned_column(pg, proxy)[client_port(b)] == ""
        a.execute("DISCARD TEMP")                           # a's place is free again
        b.execute("SELECT pg_advisory_lock(20203)")
        assert pinned_column(pg, proxy)[client_port(b)] == "advisory_lock"


def test_a_pipelined_pinning_statement_past_the_limit_ends_the_client(pg, proxy_factory):
    """Two Queries in one write: the second cannot be answered in the first's place, so it runs;
    past max_pinned_clients the client is then ended (and its connection, with the lock, closed)."""
    proxy = proxy_factory(pool_size=2, max_pinned_clients=0)
    sock = trust_session(proxy)
    try:
        sock.sendall(_query("SELECT 1") + _query("SELECT pg_advisory_lock(20204)"))
        got = read_to_end(sock)
        kinds = "".join(k for k, _ in got)
        # the first answered whole; the second's result, and instead of its ReadyForQuery the FATAL
        assert kinds == "TDCZTDCE", kinds
        assert b"53400" in got[-1][1] and b"max_pinned_clients" in got[-1][1] and b"FATAL" in got[-1][1]
    finally:
        sock.close()
    with pg.superuser_conn("appdb") as su:
        assert wait_until(lambda: su.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                             "AND objid = 20204").fetchone() == (0,))


def _query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def test_the_log_names_the_statement_that_pinned_escaped(pg, proxy_factory, caplog):
    proxy = proxy_factory(pool_size=2)
    caplog.set_level(logging.INFO, logger="threadpool_proxy.relay")
    with connect(pg, proxy) as a:
        a.execute("CREATE TEMP TABLE tpp_logged (x int) -- a comment\n/* \x1b[31m */")
        lines = [r.getMessage() for r in caplog.records if "is pinned" in r.getMessage()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "(temp_table) by CREATE TEMPORARY TABLE (CREATE TEMP TABLE tpp_logged (x int) -- a comment" in line
    assert "\n" not in line and "\x1b" not in line and "\\x1b" in line


def test_a_long_statement_is_shortened_in_the_log(pg, proxy_factory, caplog):
    proxy = proxy_factory(pool_size=2)
    caplog.set_level(logging.INFO, logger="threadpool_proxy.relay")
    with connect(pg, proxy) as a:
        a.execute("SELECT pg_advisory_lock(20205) " + "/* padding */ " * 100)
    line = next(r.getMessage() for r in caplog.records if "is pinned" in r.getMessage())
    assert len(line) < 400 and line.endswith("...)")


STATEMENT_MODE_REFUSED = [
    ("CREATE TEMP TABLE tpp_sm (x int)", "CREATE TEMPORARY TABLE"),
    ("CREATE TEMPORARY VIEW tpp_smv AS SELECT 1", "CREATE TEMPORARY VIEW"),
    ("SELECT 1 INTO TEMP tpp_sm2", "SELECT INTO TEMPORARY TABLE"),
    ("SELECT pg_advisory_lock(20206)", "pg_advisory_lock()"),
    ("SELECT pg_try_advisory_lock_shared(20206)", "pg_try_advisory_lock_shared()"),
    ("DECLARE tpp_smc CURSOR WITH HOLD FOR SELECT 1", "DECLARE CURSOR WITH HOLD"),
    ("SET ROLE tpp_role", "SET ROLE"),
    ("PREPARE tpp_smp AS SELECT 1", "PREPARE"),
    ("LOAD 'auto_explain'", "LOAD"),
]


@pytest.mark.parametrize("sql,what", STATEMENT_MODE_REFUSED)
def test_statement_mode_refuses_the_pinning_kinds(pg, proxy_factory, tpp_role, sql, what):
    proxy = proxy_factory(pool_mode="statement", pool_size=2)
    with connect(pg, proxy) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as caught:
            conn.execute(sql)
        assert caught.value.diag.message_primary == f"{what} is not supported in statement pooling mode"
        assert "pool_mode transaction" in caught.value.diag.message_hint
        assert conn.execute("SELECT current_user, pg_catalog.to_regclass('pg_temp.tpp_sm')").fetchone() == (
            "app", None)                              # it did not run, and the client goes on


def test_statement_mode_refuses_them_for_asyncpg_too(pg, proxy_factory):
    asyncpg = pytest.importorskip("asyncpg")
    import asyncio
    proxy = proxy_factory(pool_mode="statement", pool_size=2)

    async def main():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="app", password=PASSWORDS["app"],
                                     database="appdb")
        try:
            with pytest.raises(asyncpg.exceptions.FeatureNotSupportedError) as caught:
                await conn.execute("CREATE TEMP TABLE tpp_apg (x int)")
            assert "statement pooling mode" in str(caught.value)
            return await conn.fetchval("SELECT 7")
        finally:
            await conn.close()

    assert asyncio.run(main()) == 7
