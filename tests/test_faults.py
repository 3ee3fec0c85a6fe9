"""Faults seen by a client as PostgreSQL would show them (issue 9 items 5-6, issue 11 items 2, 4-6).

- When the server ends a connection with a FATAL, the client gets exactly
  that ErrorResponse and then the close (the proxy's own 08006 only when the
  server said nothing); in session mode it learns at once, even while idle.
"""

from __future__ import annotations

import time

import psycopg
import pytest

from helpers import (connect, parse_error_fields, query, read_to_end, read_until_ready, trust_session,
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
