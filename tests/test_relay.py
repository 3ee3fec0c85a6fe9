"""The relay through the proxy with real clients, in each pool mode, pass-through auth."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time

import psycopg
import pytest

from helpers import (cancel_packet, connect, gssenc_request, psql, raw_login, read_message, ssl_request,
                     startup_packet)

MODES = ["session", "transaction", "statement"]


@pytest.fixture(params=MODES)
def mode_proxy(request, proxy_factory):
    return proxy_factory(pool_mode=request.param)


def test_right_password_logs_in_and_wrong_is_refused_by_postgres(pg, mode_proxy):
    with connect(pg, mode_proxy) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("app", "appdb")
    bad = raw_login(mode_proxy.host, mode_proxy.port, "app", "appdb", password="wrong")
    assert not bad.ok
    assert bad.sqlstate == "28P01"
    assert 'password authentication failed for user "app"' in bad.error["M"]
    good = raw_login(mode_proxy.host, mode_proxy.port, "app", "appdb", password="app-secret")
    assert good.ok and good.auth_requests[0] == 10   # the server's own SASL request, relayed
    assert good.parameters["server_encoding"] == "UTF8"


def test_md5_and_trust_roles_pass_through(pg, proxy_factory):
    proxy = proxy_factory()
    assert raw_login(proxy.host, proxy.port, "md5user", "appdb", password="md5-secret").ok
    assert raw_login(proxy.host, proxy.port, "md5user", "appdb", password="nope").sqlstate == "28P01"
    assert raw_login(proxy.host, proxy.port, "trustuser", "appdb").ok


def test_unknown_database_gets_3D000(pg, proxy_factory):
    target = {"host": pg.host, "port": pg.port}
    proxy = proxy_factory(databases={"appdb": target})
    res = raw_login(proxy.host, proxy.port, "app", "nosuchdb", password="app-secret")
    assert res.sqlstate == "3D000"
    assert '"nosuchdb"' in res.error["M"]
    # and a database the server lacks (through the '*' entry) gets PostgreSQL's own 3D000
    proxy2 = proxy_factory()
    res = raw_login(proxy2.host, proxy2.port, "app", "missingdb", password="app-secret")
    assert res.sqlstate == "3D000"


def test_ssl_and_gssenc_requests_are_declined_then_startup_continues(pg, proxy_factory):
    proxy = proxy_factory()
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
        s.sendall(gssenc_request())
        assert s.recv(1) == b"N"
        s.sendall(ssl_request())
        assert s.recv(1) == b"N"
        s.sendall(startup_packet({"user": "app", "database": "appdb"}))
        kind, payload = read_message(s)
        assert kind == "R" and struct.unpack("!i", payload[:4])[0] == 10
    # libpq's default sslmode=prefer goes through the same path
    with connect(pg, proxy, sslmode="prefer") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_bad_protocol_version_and_garbage_get_what_postgresql_gives_them(pg, proxy_factory):
    proxy = proxy_factory()
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
        s.sendall(startup_packet({"user": "app"}, version=2 << 16))
        kind, payload = read_message(s)
        assert kind == "E" and b"C0A000\0" in payload and b"unsupported frontend protocol 2.0" in payload
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
        s.sendall(struct.pack("!i", 99999999) + b"xxxx")
        assert s.recv(1024) == b""       # as PostgreSQL: an invalid length is logged, not answered
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
        s.sendall(startup_packet({"database": "appdb"}))
        kind, payload = read_message(s)
        assert kind == "E" and b"C28000\0" in payload
    # the proxy still serves others
    with connect(pg, proxy) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_simple_extended_and_multi_statement(pg, mode_proxy):
    with connect(pg, mode_proxy) as conn:
        assert conn.execute("SELECT %s::int + %s::int", (40, 2)).fetchone() == (42,)   # extended
        cur = conn.cursor()
        cur.execute("SELECT 1; SELECT 2", prepare=False)    # one simple Query, two results
        assert cur.fetchone() == (1,)
        assert cur.nextset() and cur.fetchone() == (2,)
        cur.execute(b"SELECT 'x'::text AS a", prepare=False)
        assert cur.fetchone() == ("x",)


def test_pipeline_mode(pg, mode_proxy):
    with connect(pg, mode_proxy) as conn:
        with conn.pipeline():
            curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
        assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(50)]


def test_copy_in_and_out_of_megabytes(pg, mode_proxy):
    line = ("x" * 200 + "\n")
    with connect(pg, mode_proxy, autocommit=mode_proxy.config.pool_mode == "statement") as conn:
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS c (t text)") if mode_proxy.config.pool_mode == "session" else None
        table = "c" if mode_proxy.config.pool_mode == "session" else f"copy_{mode_proxy.config.pool_mode}"
        if table != "c":
            conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (t text)")
            conn.execute(f"TRUNCATE {table}")
        with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:
            for _ in range(20000):                       # ~4 MB
                copy.write(line)
        if not conn.autocommit:
            conn.commit()
        out = io.BytesIO()
        with conn.cursor().copy(f"COPY {table} TO STDOUT") as copy:
            for chunk in copy:
                out.write(chunk)
        if not conn.autocommit:
            conn.commit()
        assert out.getvalue() == line.encode() * 20000
        if table != "c":
            conn.execute(f"DROP TABLE {table}")
            if not conn.autocommit:
                conn.commit()


def test_large_rows_both_ways(pg, mode_proxy):
    big = "y" * (10 * 1024 * 1024)
    with connect(pg, mode_proxy) as conn:
        assert conn.execute("SELECT length(repeat('z', 10*1024*1024))").fetchone() == (10 * 1024 * 1024,)
        row = conn.execute("SELECT repeat('z', 10*1024*1024)").fetchone()[0]
        assert len(row) == 10 * 1024 * 1024 and set(row) == {"z"}
        assert conn.execute("SELECT md5(%s)", (big,)).fetchone()[0] == __import__("hashlib").md5(big.encode()).hexdigest()


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_error_inside_transaction_then_recovery(pg, proxy_factory, mode):
    proxy = proxy_factory(pool_mode=mode)
    with connect(pg, proxy, autocommit=False) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 2")
        conn.rollback()
        assert conn.execute("SELECT 3").fetchone() == (3,)
        conn.commit()


def test_statement_mode_refuses_transaction_blocks(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="statement")
    with connect(pg, proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="transaction blocks not allowed in statement pooling mode"):
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
    # others are unaffected
    with connect(pg, proxy) as conn:
        assert conn.execute("SELECT 4").fetchone() == (4,)


def test_notice_and_notify_in_session_mode(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="session")
    notices = []
    with connect(pg, proxy) as listener, connect(pg, proxy) as sender:
        listener.add_notice_handler(lambda d: notices.append(d.message_primary))
        listener.execute("DO $$BEGIN RAISE NOTICE 'hello %', 42; END$$")
        assert notices == ["hello 42"]
        listener.execute("LISTEN chan")
        sender.execute("NOTIFY chan, 'payload-1'")
        gen = listener.notifies(timeout=5, stop_after=1)
        got = [n.payload for n in gen]
        assert got == ["payload-1"]


def test_psql_and_pgbench_through_each_mode(pg, mode_proxy, tmp_path):
    res = psql(mode_proxy, sql="SELECT 'through ' || current_setting('application_name')")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "through psql"
    import os
    import subprocess
    env = dict(os.environ, PGPASSWORD="app-secret")
    mode = mode_proxy.config.pool_mode
    init = subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port),
                           "-U", "app", "appdb"], env=env, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    args = ["pgbench", "-n", "-c", "4", "-j", "2", "-t", "50", "-h", mode_proxy.host,
            "-p", str(mode_proxy.port), "-U", "app", "appdb"]
    if mode == "statement":
        args.insert(1, "-S")     # the TPC-B script uses a transaction block
    run = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "number of transactions actually processed: 200/200" in run.stdout


@pytest.mark.parametrize("mode", MODES)
def test_cancel_from_a_second_connection(pg, proxy_factory, mode):
    proxy = proxy_factory(pool_mode=mode)
    with connect(pg, proxy) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)  # cancel() holds the GIL in libpq: deadlock with an in-process proxy
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):     # (else it ran its 20 s and ended well)
            conn.execute("SELECT pg_sleep(20)")
        timer.join()
        assert conn.execute("SELECT 5").fetchone() == (5,)


def test_cancel_with_a_wrong_key_does_nothing(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="session")
    with connect(pg, proxy) as conn:
        pid = conn.info.backend_pid
        done = threading.Event()

        def bad_cancel():
            time.sleep(0.3)
            with socket.create_connection((proxy.host, proxy.port)) as s:
                s.sendall(cancel_packet(pid, 12345))
            done.set()

        t = threading.Thread(target=bad_cancel)
        t.start()
        assert conn.execute("SELECT pg_sleep(1), 7").fetchone()[1] == 7
        t.join()
        assert done.is_set()


def test_newer_minor_protocol_is_negotiated_down_to_3_0(pg, proxy_factory):
    """Like PostgreSQL: a 3.2 client with _pq_ options gets NegotiateProtocolVersion, then goes on in 3.0."""
    proxy = proxy_factory()
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
        s.sendall(startup_packet({"user": "app", "database": "appdb", "_pq_.fancy": "on"}, version=(3 << 16) | 2))
        kind, payload = read_message(s)
        assert kind == "v"
        newest_minor, count = struct.unpack("!ii", payload[:8])
        assert (newest_minor, count) == (0, 1) and payload[8:] == b"_pq_.fancy\0"
        kind, payload = read_message(s)
        assert kind == "R" and struct.unpack("!i", payload[:4])[0] == 10   # the server's SASL request
