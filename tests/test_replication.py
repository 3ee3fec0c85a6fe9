"""Replication connections through the proxy (issue 11, item 3; issue 20, item 5).

In every pool mode a ``replication=true`` (physical) or ``replication=database``
(logical) client gets a server connection of its own, relayed both ways (COPY
both mode included), never reset, parked or handed on, closed when the client
leaves, and holding no pool_size slot, as PgBouncer 1.23+ does.  Real clients:
pg_basebackup, pg_receivewal, pg_recvlogical, psql.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess

import psycopg
import pytest

from helpers import PASSWORDS, connect, parse_error_fields, psql, raw_login, read_message, startup_packet, wait_until
from threadpool_proxy import pgcluster
from threadpool_proxy.errors import ClientFatal
from threadpool_proxy.replication import replication_kind

TOOL_TIMEOUT = 240


def _tool(name: str) -> str:
    """A replication client of the PostgreSQL installation the suite needs anyway: a missing one
    fails the test (find_bindir's RuntimeError says what to install), it is never skipped."""
    return os.path.join(pgcluster.find_bindir(need=(name,)), name)


def _env(user: str = "repl") -> dict:
    env = dict(os.environ, PGPASSWORD=PASSWORDS[user], PGCONNECT_TIMEOUT="20")
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGSSLMODE"):
        env.pop(name, None)
    return env


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, env=_env(), **kwargs)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {proc.stderr}"
    return proc


def _walsenders(pg) -> int:
    with pg.superuser_conn() as su:
        return su.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'").fetchone()[0]


def _assert_walsenders(pg, count: int, why: str) -> None:
    """Within 30 s the server has ``count`` WAL senders (a stream's server connection lives and
    dies with its client)."""
    assert wait_until(lambda: _walsenders(pg) == count, timeout=30), (
        f"{why}: {_walsenders(pg)} WAL senders, expected {count}")


@pytest.fixture(params=["passthrough", "scram-sha-256"])
def session_proxy(request, proxy_factory, tmp_path, rolpasswords):
    """Session mode; pass-through auth, or the proxy checking passwords (then logging in with
    the client's SCRAM key: SCRAM pass-through)."""
    from helpers import write_auth_file
    extra = {}
    if request.param != "passthrough":
        extra["auth_file"] = write_auth_file(tmp_path / "users.yaml", {
            "repl": {"scram": rolpasswords["repl"]}, "app": {"scram": rolpasswords["app"]}})
    return proxy_factory(pool_mode="session", auth_type=request.param, **extra)


@pytest.fixture(params=[(mode, auth) for mode in ("session", "transaction", "statement")
                        for auth in ("passthrough", "scram-sha-256")], ids=lambda p: f"{p[0]}-{p[1]}")
def replication_proxy(request, proxy_factory, tmp_path, rolpasswords):
    """Any pool mode (the entry's mode is for its ordinary clients), either way of logging in."""
    from helpers import write_auth_file
    mode, auth = request.param
    extra = {}
    if auth != "passthrough":
        extra["auth_file"] = write_auth_file(tmp_path / "users.yaml", {
            "repl": {"scram": rolpasswords["repl"]}, "app": {"scram": rolpasswords["app"]}})
    return proxy_factory(pool_mode=mode, auth_type=auth, **extra)


def test_pg_basebackup_streams_a_whole_backup_through_the_proxy(pg, session_proxy, tmp_path):
    target = tmp_path / "backup"
    _run([_tool("pg_basebackup"), "-h", session_proxy.host, "-p", str(session_proxy.port), "-U", "repl",
          "-D", str(target), "-X", "stream", "-c", "fast", "--no-sync", "-w"])
    assert (target / "PG_VERSION").read_text().strip() == pg.sql("SHOW server_version_num").strip()[:2]
    assert (target / "backup_label").exists() and (target / "global" / "pg_control").exists()
    wal = [f for f in os.listdir(target / "pg_wal") if len(f) == 24]
    assert wal, "no WAL segment was streamed (-X stream runs a second replication connection)"
    _assert_walsenders(pg, 0, "pg_basebackup's server connections outlived it")
    assert session_proxy.pool.idle_count() == 0            # never parked


def test_pg_receivewal_streams_wal_up_to_an_end_position(pg, replication_proxy, tmp_path):
    session_proxy = replication_proxy
    lsn = pg.sql("SELECT pg_current_wal_insert_lsn()").strip()
    # WAL past the end position, flushed: the stream reaches it at once (else pg_receivewal
    # learns it only from a keepalive, up to wal_sender_timeout / 2 later).
    pg.sql("CREATE TABLE IF NOT EXISTS tpp_wal (x int)", "INSERT INTO tpp_wal VALUES (1)", "DROP TABLE tpp_wal")
    target = tmp_path / "wal"
    target.mkdir()
    _run([_tool("pg_receivewal"), "-h", session_proxy.host, "-p", str(session_proxy.port), "-U", "repl",
          "-D", str(target), "-E", lsn, "--no-loop", "--no-sync", "-w"])
    assert any(len(f.split(".")[0]) == 24 for f in os.listdir(target))


def test_pg_recvlogical_receives_the_rows_inserted(pg, replication_proxy):
    session_proxy = replication_proxy
    slot = f"tpp_slot_{session_proxy.port}"
    common = ["-h", session_proxy.host, "-p", str(session_proxy.port), "-U", "repl", "-d", "appdb", "-S", slot, "-w"]
    recvlogical = _tool("pg_recvlogical")
    try:
        _run([recvlogical, *common, "--create-slot", "-P", "test_decoding"])
        with connect(pg, session_proxy) as app:
            app.execute("CREATE TABLE IF NOT EXISTS tpp_decoded (id int, note text)")
            app.execute("INSERT INTO tpp_decoded VALUES (1, 'first'), (2, 'second through the proxy')")
            end = app.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
        out = _run([recvlogical, *common, "--start", "-E", str(end), "-f", "-", "--no-loop"]).stdout
        assert "table public.tpp_decoded: INSERT: id[integer]:1 note[text]:'first'" in out, out
        assert "id[integer]:2 note[text]:'second through the proxy'" in out, out
        _run([recvlogical, *common, "--drop-slot"])
        with pg.superuser_conn() as su:
            assert su.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                              (slot,)).fetchone() == (0,)
    finally:
        with pg.superuser_conn() as su:
            su.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                       "WHERE slot_name = %s AND NOT active", (slot,))
        with pg.superuser_conn("appdb") as su:
            su.execute("DROP TABLE IF EXISTS tpp_decoded")


@pytest.mark.parametrize("replication", ["database", "true"])
def test_psql_identify_system_answers_what_the_server_answers(pg, replication_proxy, replication):
    session_proxy = replication_proxy
    sql = "IDENTIFY_SYSTEM"
    dbname = f"dbname=appdb replication={replication}"
    through = psql(session_proxy, sql=sql, user="repl", dbname=dbname, check=True).stdout.strip()
    direct = psql(pg, sql=sql, user="repl", dbname=dbname, check=True).stdout.strip()
    system_id = through.split("|")[0]
    assert system_id == direct.split("|")[0] and system_id.isdigit()
    assert through.split("|")[3] == ("appdb" if replication == "database" else "")


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
@pytest.mark.parametrize("auth", ["passthrough", "scram-sha-256"])
def test_a_replication_connection_takes_no_pool_slot(pg, proxy_factory, tmp_path, rolpasswords, auth, pool_mode):
    """pool_size 1: a streaming pg_recvlogical of the same user and database leaves the one
    slot to an ordinary client, and gives back none when it stops (its server connection is
    closed, not parked, and the slot count stays the ordinary client's)."""
    from helpers import write_auth_file
    extra = {} if auth == "passthrough" else {
        "auth_file": write_auth_file(tmp_path / "users.yaml", {"repl": {"scram": rolpasswords["repl"]}})}
    proxy = proxy_factory(pool_mode=pool_mode, pool_size=1, query_wait_timeout=5, auth_type=auth, **extra)
    slot = f"tpp_slot_busy_{proxy.port}"
    recvlogical = _tool("pg_recvlogical")
    common = ["-h", proxy.host, "-p", str(proxy.port), "-U", "repl", "-d", "appdb", "-S", slot, "-w"]
    _run([recvlogical, *common, "--create-slot", "-P", "test_decoding"])
    stream = subprocess.Popen([recvlogical, *common, "--start", "-f", os.devnull], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _assert_walsenders(pg, 1, "the stream never started")
        with psycopg.connect(pg.dsn(user="repl", dbname="appdb", host=proxy.host, port=proxy.port),
                             autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("repl",)
            assert stream.poll() is None, stream.stderr.read() if stream.poll() is not None else ""
            assert sum(proxy.pool.snapshot()["open"].values()) == 1
            stream.send_signal(signal.SIGINT)
            stream.wait(30)
            _assert_walsenders(pg, 0, "the stream's server connection outlived its client")
            assert sum(proxy.pool.snapshot()["open"].values()) == 1     # still the ordinary client's
            assert conn.execute("SELECT 2").fetchone() == (2,)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait(10)
        _assert_walsenders(pg, 0, "the stream's server connection outlived its client")
        with pg.superuser_conn() as su:
            su.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    # only the ordinary one parks (not in session mode with passthrough, where nobody could take it)
    assert proxy.pool.idle_count() == (0 if (auth, pool_mode) == ("passthrough", "session") else 1)
    if (auth, pool_mode) == ("passthrough", "session"):   # closed with its client, not parked
        assert wait_until(lambda: not pg.backend_pids(user="repl"), timeout=20), pg.backend_pids(user="repl")


def _refusal(proxy, params: dict) -> dict:
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": "repl", "database": "appdb", **params}))
        kind, body = read_message(sock)
    assert kind == "E", (kind, body)
    return parse_error_fields(body)


@pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
@pytest.mark.parametrize("replication", ["database", "true", "on", "1", "yes"])
def test_replication_is_served_in_every_pool_mode_paired_with_its_own_connection(pg, proxy_factory, pool_mode,
                                                                                 replication):
    """As PgBouncer 1.23+: the entry's mode is for its ordinary clients; a WAL sender is paired
    with its own server connection (the backend pid it is told is the real one), never shared."""
    proxy = proxy_factory(pool_mode=pool_mode, pool_size=1)
    with psycopg.connect(pg.dsn(user="repl", dbname="appdb", host=proxy.host, port=proxy.port,
                                replication=replication), autocommit=True) as wal, \
            connect(pg, proxy) as ordinary:
        assert wal.pgconn.exec_(b"IDENTIFY_SYSTEM").status == psycopg.pq.ExecStatus.TUPLES_OK
        senders = wait_until(lambda: _walsender_pids(pg), timeout=20)
        assert wal.info.backend_pid in senders                       # told the real pid: its own
        for _ in range(3):
            assert ordinary.execute("SELECT pg_backend_pid()").fetchone()[0] not in senders
            assert wal.pgconn.exec_(b"IDENTIFY_SYSTEM").status == psycopg.pq.ExecStatus.TUPLES_OK
    wait_until(lambda: _walsenders(pg) == 0, timeout=20)


def _walsender_pids(pg) -> set:
    with pg.superuser_conn() as su:
        return {r[0] for r in su.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'walsender'")}


def test_replication_false_is_an_ordinary_connection(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="transaction")
    for value in ("false", "off", "0", "no"):
        result = raw_login(proxy.host, proxy.port, "app", "appdb", PASSWORDS["app"], options={"replication": value})
        assert result.ok, (value, result.error)


def test_a_bad_replication_value_gets_postgresqls_error(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="session")
    fields = _refusal(proxy, {"replication": "sometimes"})
    assert fields["C"] == "22023"
    assert fields["M"] == 'invalid value for parameter "replication": "sometimes"'


def test_postgresqls_refusal_of_a_replication_login_reaches_the_client(pg, session_proxy):
    """app has no REPLICATION attribute: PostgreSQL's own FATAL, whoever logs in to the server."""
    proc = psql(session_proxy, sql="IDENTIFY_SYSTEM", user="app", dbname="dbname=appdb replication=database")
    assert proc.returncode != 0
    assert "permission denied to start WAL sender" in proc.stderr or "must be superuser or replication role" in proc.stderr, proc.stderr


def test_show_names_the_replication_kind_and_kill_ends_the_stream(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="session", admin_users="postgres")
    slot = f"tpp_slot_show_{proxy.port}"
    recvlogical = _tool("pg_recvlogical")
    common = ["-h", proxy.host, "-p", str(proxy.port), "-U", "repl", "-d", "appdb", "-S", slot, "-w"]
    _run([recvlogical, *common, "--create-slot", "-P", "test_decoding"])
    stream = subprocess.Popen([recvlogical, *common, "--start", "--no-loop", "-f", os.devnull], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _assert_walsenders(pg, 1, "the stream never started")
        with psycopg.connect(pg.dsn(user="postgres", dbname="pgbouncer", host=proxy.host, port=proxy.port),
                             autocommit=True) as admin:
            admin.prepare_threshold = None
            clients = admin.execute("SHOW CLIENTS").fetchall()
            servers = admin.execute("SHOW SERVERS").fetchall()
            assert [(r[1], r[3]) for r in clients if r[1] == "repl"] == [("repl", "logical")]
            assert [(r[1], r[3]) for r in servers if r[1] == "repl"] == [("repl", "logical")]
            admin.execute("KILL appdb")
            assert stream.wait(30) != 0                   # the stream ended with its client
            assert "KILL on the admin console" in stream.stderr.read()
            _assert_walsenders(pg, 0, "KILL left the stream's server connection open")
            admin.execute("RESUME appdb")
    finally:
        stream.send_signal(signal.SIGINT)
        try:
            stream.wait(30)
        except subprocess.TimeoutExpired:
            stream.kill()
            stream.wait(10)
        _assert_walsenders(pg, 0, "the stream's server connection outlived its client")
        with pg.superuser_conn() as su:
            su.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


@pytest.mark.parametrize("value, kind", [
    ("database", "logical"), ("true", "physical"), ("t", "physical"), ("TRUE", "physical"), ("yes", "physical"),
    ("y", "physical"), ("on", "physical"), ("1", "physical"), ("false", ""), ("f", ""), ("no", ""), ("n", ""),
    ("off", ""), ("of", ""), ("0", ""), (None, "")])
def test_replication_values_read_as_postgresql_reads_them(value, kind):
    assert replication_kind(value) == kind


@pytest.mark.parametrize("value", ["", "o", "Database", "2", "truee", "physical"])
def test_replication_values_postgresql_refuses(value):
    with pytest.raises(ClientFatal) as caught:
        replication_kind(value)
    assert caught.value.sqlstate == "22023"


def test_an_entry_with_several_nodes_refuses_replication(pg, proxy_factory):
    """A WAL sender is not routed by role (yet): refused before anything else, naming the count."""
    nodes = [{"host": pg.host, "port": pg.port}, {"host": "127.0.0.2", "port": pg.port}]   # (never dialed)
    proxy = proxy_factory(pool_mode="session", databases={"appdb": {"nodes": nodes}})
    fields = _refusal(proxy, {"replication": "database"})
    assert (fields["C"], fields["M"]) == ("0A000", 'replication connections need a database entry with one '
                                                   'server, but database "appdb" has 2 nodes'), fields
