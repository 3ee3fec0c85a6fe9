"""Faults seen by a client as PostgreSQL would show them (issue 9 items 5-6, issue 11 items 2, 4-6).

- When the server ends a connection with a FATAL, the client gets exactly
  that ErrorResponse and then the close (the proxy's own 08006 only when the
  server said nothing); in session mode it learns at once, even while idle.
- A message type PostgreSQL does not take gets its FATAL 08P01, from the proxy
  before anything is relayed, or from the server, passed through.
- Bytes sent in the same packet as the StartupMessage are the messages they
  are: a Terminate ends the login quietly, a Query runs after it.
"""

from __future__ import annotations

import socket
import time

import psycopg
import pytest

from threadpool_proxy import protocol

from helpers import (_message, connect, nothing_to_read, parse_error_fields, query, read_to_end, read_until_ready, startup_packet, trust_session,
                     wait_until)


def backend_pid(sock) -> int:
    query(sock, "SELECT pg_backend_pid()")
    return int([body for kind, body in read_until_ready(sock) if kind == "D"][0][6:])


def terminate(pg, pid: int) -> None:
    with pg.superuser_conn() as su:
        assert su.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def errors_of(messages) -> list:
    return [parse_error_fields(body) for kind, body in messages if kind == "E"]


# -- the server's own words, then the close --------------------------------------------

def test_idle_session_client_gets_the_servers_fatal_at_once_and_nothing_after(pg, proxy_factory):
    """Issue 11 items 2 and 6: pg_terminate_backend of an idle session-mode client's backend."""
    proxy = proxy_factory(pool_mode="session")
    sock = trust_session(proxy)
    try:
        terminate(pg, backend_pid(sock))
        messages = read_to_end(sock)          # the client sends nothing: it learns at once
    finally:
        sock.close()
    assert [kind for kind, _ in messages] == ["E"], messages
    error = errors_of(messages)[0]
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "57P01",
                                                    "terminating connection due to administrator command")


def test_psycopg_sees_the_servers_sqlstate_and_message_after_pg_terminate_backend(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="session")
    with connect(pg, proxy) as conn:
        terminate(pg, conn.execute("SELECT pg_backend_pid()").fetchone()[0])
        time.sleep(0.2)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("SELECT 1")
    assert info.value.sqlstate == "57P01"
    assert str(info.value).startswith("terminating connection due to administrator command")


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_idle_in_transaction_timeout_reaches_the_client_as_25P03(pg, proxy_factory, mode):
    proxy = proxy_factory(pool_mode=mode)
    timeout = {"options": "-c idle_in_transaction_session_timeout=300"}
    sock = trust_session(proxy, options=timeout)
    try:
        query(sock, "BEGIN")
        assert read_until_ready(sock)[-1] == ("Z", b"T")
        messages = read_to_end(sock)
    finally:
        sock.close()
    assert [kind for kind, _ in messages] == ["E"], messages
    error = errors_of(messages)[0]
    assert (error["S"], error["C"]) == ("FATAL", "25P03"), error
    assert error["M"] == "terminating connection due to idle-in-transaction timeout"
    with connect(pg, proxy, options=timeout["options"]) as conn:
        conn.execute("BEGIN")
        time.sleep(0.6)
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT 1")
    assert info.value.sqlstate == "25P03"


def test_transaction_mode_idle_client_is_still_told_nothing_when_its_kept_connection_dies(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="transaction", auth_type="trust")
    sock = trust_session(proxy)
    try:
        pid = backend_pid(sock)
        terminate(pg, pid)
        assert wait_until(lambda: pid not in pg.backend_pids(user="trustuser"))
        time.sleep(0.3)
        assert backend_pid(sock) != pid
    finally:
        sock.close()


# -- message types no server takes ---------------------------------------------------

MODES = ["session", "transaction", "statement"]


@pytest.mark.parametrize("mode", MODES)
def test_unknown_message_type_gets_08P01_and_the_close(pg, proxy_factory, mode):
    """Issue 9 item 5: a lone 'y' message; the proxy answers as PostgreSQL would, sending nothing on."""
    proxy = proxy_factory(pool_mode=mode, pool_size=1)
    sock = trust_session(proxy)
    try:
        pid = backend_pid(sock)
        sock.sendall(_message(b"y", b"") + _message(b"Q", b"SELECT 1\0"))
        messages = read_to_end(sock)
    finally:
        sock.close()
    assert [kind for kind, _ in messages] == ["E"], messages
    error = errors_of(messages)[0]
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "08P01", "invalid frontend message type 121")
    assert "R" not in error            # the proxy's answer: nothing reached the server
    assert wait_until(lambda: pid not in pg.backend_pids(user="trustuser"))    # closed, not parked


@pytest.mark.parametrize("mode", MODES)
def test_the_servers_fatal_for_a_type_only_it_rejects_is_passed_through(pg, proxy_factory, mode, monkeypatch):
    """A type the proxy lets through (here: 'y', by pretending it is valid): PostgreSQL's own FATAL, then the close."""
    monkeypatch.setattr(protocol, "_OTHER_FRONTEND_TYPES", protocol._OTHER_FRONTEND_TYPES | {ord("y")})
    proxy = proxy_factory(pool_mode=mode)
    sock = trust_session(proxy)
    try:
        backend_pid(sock)
        sock.sendall(_message(b"y", b""))
        messages = read_to_end(sock)
    finally:
        sock.close()
    assert [kind for kind, _ in messages] == ["E"], messages
    error = errors_of(messages)[0]
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "08P01", "invalid frontend message type 121")
    assert error["R"] == "SocketBackend"          # PostgreSQL's own ErrorResponse


# -- bytes right after the StartupMessage ------------------------------------------------

def _startup(user: str, *after: bytes) -> bytes:
    return startup_packet({"user": user, "database": "appdb"}) + b"".join(after)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("user", ["trustuser", "app"])
def test_terminate_in_the_startup_packet_ends_the_login_quietly(pg, proxy_factory, mode, user):
    """Issue 11 item 5: no error, just the close (trustuser: after the login the server granted at once)."""
    proxy = proxy_factory(pool_mode=mode)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(_startup(user, _message(b"X", b"")))
        messages = read_to_end(sock)
    assert not errors_of(messages), messages
    assert messages[0][0] == "R"


@pytest.mark.parametrize("mode", MODES)
def test_messages_after_the_startup_packet_are_handled_as_what_they_are(pg, proxy_factory, mode):
    proxy = proxy_factory(pool_mode=mode)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        # a Query pipelined behind the startup packet is run once the login is done
        sock.sendall(_startup("trustuser", _message(b"Q", b"SELECT 41 + 1\0")))
        messages = read_until_ready(sock) + read_until_ready(sock)
    assert not errors_of(messages), messages
    kinds = [kind for kind, _ in messages]
    assert kinds[-5:] == ["Z", "T", "D", "C", "Z"], kinds
    assert messages[-3][1].endswith(b"42")
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(_startup("trustuser", _message(b"y", b"")))
        messages = read_to_end(sock)
    assert [kind for kind, _ in messages][-2:] == ["Z", "E"]
    assert errors_of(messages)[0]["M"] == "invalid frontend message type 121"
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        # a password is asked for: anything but its answer gets PostgreSQL's 08P01
        sock.sendall(_startup("app", _message(b"Q", b"SELECT 1\0")))
        messages = read_to_end(sock)
    assert [kind for kind, _ in messages] == ["R", "E"], messages
    error = errors_of(messages)[0]
    assert (error["C"], error["M"]) == ("08P01", "expected SASL response, got message type 81")


# -- parked connections nobody can take --------------------------------------------------

def test_session_mode_passthrough_parks_nothing_so_drop_database_succeeds(pg, proxy_factory):
    """Issue 11 item 4: every pass-through client logs in on its own connection: parking one helps nobody."""
    with pg.superuser_conn() as su:
        su.execute("DROP DATABASE IF EXISTS dropme")
        su.execute("CREATE DATABASE dropme OWNER app")
    proxy = proxy_factory(pool_mode="session")
    conns = [connect(pg, proxy, dbname="dropme") for _ in range(3)]
    for conn in conns:
        assert conn.execute("SELECT current_database()").fetchone() == ("dropme",)
    for conn in conns:
        conn.close()
    assert wait_until(lambda: not pg.backend_pids(dbname="dropme"), timeout=5)
    assert proxy.pool.snapshot()["total_idle"] == 0
    with pg.superuser_conn() as su:
        su.execute("DROP DATABASE dropme")


# -- client timers -------------------------------------------------------------------------

def _ends_with(sock, sqlstate: str, since: float, after: float) -> dict:
    """The client is closed with exactly one FATAL of ``sqlstate``, not before ``after`` s from
    ``since`` (a time.monotonic() taken before the client's last step): its fields.  No upper
    bound but the read's 30 s: a slow machine is no failure."""
    messages = read_to_end(sock, timeout=30)
    assert time.monotonic() - since >= after, messages
    assert [kind for kind, _ in messages] == ["E"], messages
    error = errors_of(messages)[0]
    assert (error["S"], error["C"]) == ("FATAL", sqlstate), error
    return error


def _closed_not_parked(pg, proxy, pid: int) -> None:
    assert wait_until(lambda: pid not in pg.backend_pids(user="trustuser"), timeout=15)
    assert proxy.pool.snapshot()["total_idle"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_client_idle_timeout_closes_an_idle_client_and_its_server_connection(pg, proxy_factory, mode):
    proxy = proxy_factory(pool_mode=mode, auth_type="trust", client_idle_timeout=1.5)
    sock = trust_session(proxy)
    try:
        for _ in range(4):                  # busy clients are not idle: 4 x 0.5 s > 1.5 s
            time.sleep(0.5)                 # (a stall of the machine up to 1 s is no idle time)
            pid = backend_pid(sock)
        t0 = time.monotonic()
        query(sock, "SELECT pg_sleep(1.6)")    # nor is one whose query runs
        assert read_until_ready(sock)[-1] == ("Z", b"I")
        error = _ends_with(sock, "57P05", since=t0, after=1.6 + 1.5)
    finally:
        sock.close()
    assert error["M"] == "terminating connection due to idle-session timeout"
    assert "client_idle_timeout is 1.5 s" in error["D"]
    _closed_not_parked(pg, proxy, pid)


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_idle_transaction_timeout_closes_a_client_idle_inside_a_transaction(pg, proxy_factory, mode):
    proxy = proxy_factory(pool_mode=mode, auth_type="trust", idle_transaction_timeout=0.5)
    idle = trust_session(proxy)
    sock = trust_session(proxy)
    try:
        pid = backend_pid(sock)
        t0 = time.monotonic()
        query(sock, "BEGIN")
        assert read_until_ready(sock)[-1] == ("Z", b"T")
        error = _ends_with(sock, "25P03", since=t0, after=0.5)
        assert nothing_to_read(idle, 0.3)        # a client between transactions is left alone
        assert backend_pid(idle)
    finally:
        sock.close()
        idle.close()
    assert error["M"] == "terminating connection due to idle-in-transaction timeout"
    assert wait_until(lambda: pid not in pg.backend_pids(user="trustuser"), timeout=5)


@pytest.mark.parametrize("mode", MODES)
def test_a_client_stalled_mid_message_loses_its_server_connection(pg, proxy_factory, mode):
    """Issue 9 item 6: a header claiming 100 MB and a few bytes of body must not pin the connection."""
    proxy = proxy_factory(pool_mode=mode, auth_type="trust", pool_size=1, query_wait_timeout=10,
                          client_stall_timeout=0.5)
    sock = trust_session(proxy)
    try:
        pid = backend_pid(sock)
        t0 = time.monotonic()
        sock.sendall(b"Q" + (100 * 1024 * 1024).to_bytes(4, "big") + b"SELECT ")
        error = _ends_with(sock, "08P01", since=t0, after=0.5)
    finally:
        sock.close()
    assert "client_stall_timeout is 0.5 s" in error["D"]
    _closed_not_parked(pg, proxy, pid)
    other = trust_session(proxy)                # the user's one slot is free again
    try:
        assert backend_pid(other) != pid
    finally:
        other.close()


def test_client_timers_are_validated_and_off_or_default():
    from threadpool_proxy import config as cfg
    base = {"databases": {"*": {"host": "127.0.0.1"}}}
    defaults = cfg.from_dict(base)
    assert (defaults.client_idle_timeout, defaults.idle_transaction_timeout, defaults.client_stall_timeout) \
        == (0, 0, 30)
    for key in ("client_idle_timeout", "idle_transaction_timeout", "client_stall_timeout"):
        assert getattr(cfg.from_dict({**base, key: 0}), key) == 0
        with pytest.raises(cfg.ConfigError, match=f"^{key}: expected a number of seconds >= 0"):
            cfg.from_dict({**base, key: -1})
