"""Named prepared statements through transaction and statement pooling, with real drivers.

psycopg prepares a query server-side after 5 executions (its default) and
names it ``_pg3_0``, ``_pg3_1``... in every connection; pgbench -M prepared
names its statements ``P_0``...  Under contention (more clients than
pool_size) every transaction may run on another server connection, so each
test here has more clients than server connections, or moves its client to a
fresh server connection on purpose (pg_terminate_backend of the idle one it
keeps: the proxy logs in again for it, since these proxies check passwords
themselves).
"""

from __future__ import annotations

import os
import select
import subprocess
import threading

import psycopg
import pytest
from psycopg import pq

from helpers import PASSWORDS, connect, wait_until

CLIENTS = 30
POOL_SIZE = 3


@pytest.fixture
def prepared_proxy(proxy_factory, auth_file):
    def start(**overrides):
        settings = dict(auth_type="scram-sha-256", auth_file=auth_file, pool_mode="transaction",
                        pool_size=POOL_SIZE)
        settings.update(overrides)
        return proxy_factory(**settings)
    return start


def run_clients(n, work):
    """Run ``work(i)`` in n threads; re-raise the first failure."""
    errors = []

    def body(i):
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "clients still running"
    if errors:
        raise errors[0]


def move_to_a_new_backend(pg, conn) -> int:
    """Terminate the server connection ``conn`` keeps while idle; its next query gets another."""
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    with pg.superuser_conn() as su:
        su.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert wait_until(lambda: pid not in pg.backend_pids())
    return pid


@pytest.mark.parametrize("threshold", [5, 0], ids=["psycopg-default", "prepare-always"])
def test_same_names_for_different_texts_under_contention(pg, prepared_proxy, threshold):
    """30 clients on 3 server connections; each client's _pg3_0 is a different query."""
    proxy = prepared_proxy()
    rounds = 60

    def work(i):
        with connect(pg, proxy, prepare_threshold=threshold) as conn:
            # Client i prepares its own texts first, so _pg3_0 means another query in each client.
            own = f"SELECT %s::int * {i + 1}, 'client {i}'"
            shared = "SELECT %s::int + 1000"
            for r in range(rounds):
                assert conn.execute(own, (r,)).fetchone() == (r * (i + 1), f"client {i}")
                assert conn.execute(shared, (r,)).fetchone() == (r + 1000,)

    run_clients(CLIENTS, work)
    stats = proxy.pool.snapshot()["stats"]
    assert stats["waits"] > 0, stats      # there was contention: clients did change connections
    assert len(pg.backend_pids(user="app", dbname="appdb")) <= POOL_SIZE


def _pgbench(*args, env, timeout=300):
    return subprocess.run(["pgbench", *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_pgbench_prepared_has_no_failed_client(pg, prepared_proxy, mode):
    env = dict(os.environ, PGPASSWORD=PASSWORDS["app"])
    init = _pgbench("-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port), "-U", "app", "appdb", env=env)
    assert init.returncode == 0, init.stderr
    proxy = prepared_proxy(pool_mode=mode, pool_size=5)
    script = [] if mode == "transaction" else ["-S"]       # TPC-B uses a transaction block
    # -j 20: pgbench prepares with a blocking PQprepare, so a thread driving several
    # clients would stall them all behind one that waits for a server connection.
    run = _pgbench("-n", "-M", "prepared", *script, "-c", "20", "-j", "20", "-t", "100",
                   "-h", proxy.host, "-p", str(proxy.port), "-U", "app", "appdb", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "number of transactions actually processed: 2000/2000" in run.stdout, run.stdout
    assert "aborted" not in run.stderr, run.stderr


# -- the protocol through libpq, statement by statement --------------------------

def next_result(pgconn, timeout=30):
    """PQgetResult without blocking inside libpq: a blocking PQgetResult holds the GIL,
    which this in-process proxy needs to answer."""
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN)
    while pgconn.is_busy():
        assert poller.poll(timeout * 1000), "no answer from the proxy"
        pgconn.consume_input()
    return pgconn.get_result()


def results(pgconn, syncs):
    """Collect pipeline results up to ``syncs`` PIPELINE_SYNC: [(status, rows or error sqlstate)]."""
    out = []
    while syncs:
        res = next_result(pgconn)
        if res is None:
            continue
        if res.status == pq.ExecStatus.PIPELINE_SYNC:
            syncs -= 1
            continue
        if res.status == pq.ExecStatus.FATAL_ERROR:
            out.append(("error", res.error_field(pq.DiagnosticField.SQLSTATE).decode(),
                        res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY).decode()))
        elif res.status == pq.ExecStatus.TUPLES_OK:
            out.append(("rows", [res.get_value(r, 0).decode() for r in range(res.ntuples)]))
        else:
            out.append((pq.ExecStatus(res.status).name,))
    return out


def test_statement_follows_its_client_to_a_fresh_server_connection(pg, prepared_proxy):
    proxy = prepared_proxy()
    with connect(pg, proxy) as conn:
        pgc = conn.pgconn
        assert pgc.prepare(b"q", b"SELECT $1::int * 2").status == pq.ExecStatus.COMMAND_OK
        assert pgc.exec_prepared(b"q", [b"21"]).get_value(0, 0) == b"42"
        move_to_a_new_backend(pg, conn)
        # Describe first (the Parse is injected before it), then Bind/Execute, then
        # Close and the same name for another text.  (Pipeline calls: libpq's blocking
        # describe/close hold the GIL, which this in-process proxy needs.)
        pgc.enter_pipeline_mode()
        pgc.send_describe_prepared(b"q")
        pgc.send_query_prepared(b"q", [b"5"])
        pgc.send_close_prepared(b"q")
        pgc.send_prepare(b"q", b"SELECT 'second ' || $1::text")
        pgc.pipeline_sync()
        got = results(pgc, 1)
        pgc.exit_pipeline_mode()
        assert got == [("COMMAND_OK",), ("rows", ["10"]), ("COMMAND_OK",), ("COMMAND_OK",)], got
        move_to_a_new_backend(pg, conn)
        assert pgc.exec_prepared(b"q", [b"text"]).get_value(0, 0) == b"second text"
        # The server never saw the client's own name.
        names = [r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements").fetchall()]
        assert "q" not in names and names and all(n.startswith("tpp_") for n in names), names


def test_failing_parse_in_a_pipeline_skips_to_sync_and_names_the_statement(pg, prepared_proxy):
    proxy = prepared_proxy()
    with connect(pg, proxy) as conn:
        pgc = conn.pgconn
        pgc.enter_pipeline_mode()
        pgc.send_prepare(b"bad", b"SELECT no_such_column")
        pgc.send_query_prepared(b"bad", [])
        pgc.pipeline_sync()
        pgc.send_prepare(b"good", b"SELECT 42")
        pgc.send_query_prepared(b"good", [])
        pgc.pipeline_sync()
        pgc.send_query_prepared(b"bad", [])
        pgc.pipeline_sync()
        got = results(pgc, 3)
        pgc.exit_pipeline_mode()
    assert got[0][:2] == ("error", "42703"), got            # the Parse's own error, once
    assert got[1] == ("PIPELINE_ABORTED",), got              # its Bind/Execute skipped to Sync
    assert got[2] == ("COMMAND_OK",) and got[3] == ("rows", ["42"]), got
    assert got[4] == ("error", "26000", 'prepared statement "bad" does not exist'), got


def test_a_client_never_reaches_another_clients_statement_or_sql_prepare(pg, prepared_proxy):
    """pool_size 1: B gets the very server connection A used, after the reset (pin_on empty:
    A's SQL-level PREPARE does not keep A on it, test_pinning.py)."""
    proxy = prepared_proxy(pool_size=1, pin_on=[])
    a = connect(pg, proxy)
    b = connect(pg, proxy)        # logs in while A keeps the connection, so it waits its turn
    try:
        assert a.pgconn.prepare(b"mine", b"SELECT 'secret of a'").status == pq.ExecStatus.COMMAND_OK
        a.execute("PREPARE sqlside AS SELECT 'sql-level of a'")
        a_pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == a_pid    # the same server connection
        res = b.pgconn.exec_prepared(b"mine", [])
        assert res.status == pq.ExecStatus.FATAL_ERROR
        assert res.error_field(pq.DiagnosticField.SQLSTATE) == b"26000"
        assert res.error_message.decode().strip().endswith('prepared statement "mine" does not exist')
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            b.execute("EXECUTE sqlside")
        # A's own statement still works for A (prepared again wherever A lands).
        assert a.pgconn.exec_prepared(b"mine", []).get_value(0, 0) == b"secret of a"
    finally:
        a.close()
        b.close()


def test_statements_are_evicted_beyond_max_prepared_statements(pg, prepared_proxy):
    proxy = prepared_proxy(pool_size=1, max_prepared_statements=2)
    with connect(pg, proxy, prepare_threshold=0) as conn:
        for r in range(3):
            for i in range(5):
                assert conn.execute(f"SELECT %s::int + {i}", (r,)).fetchone() == (r + i,)
        held = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
    assert held <= 2


def test_pipelines_and_executemany_under_contention(pg, prepared_proxy):
    with pg.superuser_conn(dbname="appdb") as su:
        su.execute("DROP TABLE IF EXISTS prep_items")
        su.execute("CREATE TABLE prep_items (client int, n int)")
        su.execute("GRANT ALL ON prep_items TO app")
    proxy = prepared_proxy()

    def work(i):
        with connect(pg, proxy, autocommit=False) as conn:
            for batch in range(4):
                with conn.cursor() as cur:
                    cur.executemany("INSERT INTO prep_items VALUES (%s, %s)",
                                    [(i, batch * 10 + k) for k in range(10)])
                conn.commit()
                # A pipeline where each transaction ends mid-pipeline.
                with conn.pipeline():
                    for k in range(6):
                        conn.execute("SELECT %s::int", (k,))
                        if k % 2:
                            conn.commit()
                    cur = conn.execute("SELECT count(*) FROM prep_items WHERE client = %s", (i,))
                assert cur.fetchone() == ((batch + 1) * 10,)
                conn.commit()

    run_clients(12, work)
    with pg.superuser_conn(dbname="appdb") as su:
        assert su.execute("SELECT count(*), count(DISTINCT (client, n)) FROM prep_items").fetchone() == (480, 480)
        su.execute("DROP TABLE prep_items")


def test_zero_max_prepared_statements_passes_names_through(pg, prepared_proxy):
    proxy = prepared_proxy(max_prepared_statements=0)
    with connect(pg, proxy) as conn:
        assert conn.pgconn.prepare(b"plain", b"SELECT 7").status == pq.ExecStatus.COMMAND_OK
        names = [r[0] for r in conn.execute("SELECT name FROM pg_prepared_statements").fetchall()]
    assert names == ["plain"]


def test_extended_messages_pipelined_after_an_unanswered_simple_query(pg, proxy_factory):
    """Simple Query traffic passes untracked; the tracker takes over mid-answer correctly."""
    import socket
    import time

    from helpers import _message, read_message, startup_packet

    proxy = proxy_factory(auth_type="trust", pool_mode="transaction")

    def until_ready(sock):
        kinds = []
        while True:
            kind, body = read_message(sock)
            kinds.append(kind if kind != "D" else body[-2:])
            if kind == "Z":
                return kinds

    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": "trustuser", "database": "appdb"}))
        until_ready(sock)
        # The server says something (a notice) and goes on working: the extended messages
        # arrive while the Query is unanswered and the server's stream is between messages.
        sock.sendall(_message(b"Q", b"DO $$BEGIN RAISE NOTICE 'working'; PERFORM pg_sleep(0.5); END$$; "
                                    b"SELECT repeat('x', 1000) || 'ok' FROM generate_series(1, 2000)\0"))
        time.sleep(0.2)
        parse = _message(b"P", b"s1\0SELECT 42\0\0\0")
        bind = _message(b"B", b"\0s1\0\0\0\0\0\0\0")
        execute = _message(b"E", b"\0\0\0\0\0")
        sock.sendall(parse + bind + execute + _message(b"S", b""))
        first = until_ready(sock)
        second = until_ready(sock)
        sock.sendall(_message(b"Q", b"SELECT name FROM pg_prepared_statements\0"))
        _, body = read_message(sock)          # RowDescription
        _, row = read_message(sock)
    assert first[:4] == ["N", "C", "T", b"ok"] and first[4:-2] == [b"ok"] * 1999, first[:5]
    assert first[-2:] == ["C", "Z"], first[-3:]
    assert second == ["1", "2", b"42", "C", "Z"], second
    assert row[6:].startswith(b"tpp_"), row
