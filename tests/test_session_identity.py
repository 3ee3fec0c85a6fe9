"""What a session-mode client is told about its backend is the truth (issue 11, item 1).

A session-mode client holds one server connection for life, so its BackendKeyData
carries the real backend pid: drivers compare it with pg_backend_pid() and with the
pid in NotificationResponse, and admin tools pass it to pg_terminate_backend.  The
secret stays the proxy's own, so a cancel still goes through the proxy, to the
backend the client holds, and a guessed key cancels nothing.  In transaction mode
the backend changes, so the pid stays proxy-made (above any real pid).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from helpers import connect


@pytest.fixture(params=["passthrough", "scram-sha-256"])
def session_proxy(request, proxy_factory, auth_file):
    extra = {} if request.param == "passthrough" else {"auth_file": auth_file}
    return proxy_factory(pool_mode="session", auth_type=request.param, **extra)


def test_backend_pid_is_the_real_one_in_session_mode(pg, session_proxy):
    with connect(pg, session_proxy) as a, connect(pg, session_proxy) as b:
        for conn in (a, b):
            assert conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert a.info.backend_pid != b.info.backend_pid


def test_notification_names_the_sender_as_the_sender_knows_itself(pg, session_proxy):
    with connect(pg, session_proxy) as listener, connect(pg, session_proxy) as sender:
        listener.execute("LISTEN tpp_channel")
        sender.execute("NOTIFY tpp_channel, 'hello'")
        got = list(listener.notifies(timeout=10, stop_after=1))
        sender_pid = sender.info.backend_pid
    assert [(n.channel, n.payload, n.pid) for n in got] == [("tpp_channel", "hello", sender_pid)]


def test_terminating_the_told_pid_ends_that_client_with_postgresqls_words(pg, session_proxy):
    with connect(pg, session_proxy) as victim, pg.superuser_conn() as su:
        assert su.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,)).fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError) as caught:
            victim.execute("SELECT 1")
    assert caught.value.sqlstate == "57P01", caught.value
    assert "terminating connection due to administrator command" in str(caught.value)


def test_cancel_with_the_real_pid_still_works(pg, session_proxy):
    with connect(pg, session_proxy) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)  # cancel() holds the GIL in libpq: deadlock in-process
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):     # (else it ran its 20 s and ended well)
            conn.execute("SELECT pg_sleep(20)")
        timer.join()
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_cancel_with_the_real_pid_but_not_the_proxys_secret_cancels_nothing(pg, session_proxy):
    import socket
    import struct

    with connect(pg, session_proxy) as conn:
        pid = conn.info.backend_pid
        done = []
        runner = threading.Thread(target=lambda: done.append(conn.execute("SELECT pg_sleep(1), 7").fetchone()))
        runner.start()
        time.sleep(0.3)
        for key in (0, 1, 12345, 2**31 - 1):
            with socket.create_connection((session_proxy.host, session_proxy.port), timeout=5) as s:
                s.sendall(struct.pack("!iiii", 16, 80877102, pid, key))
        runner.join(10)
    assert done == [("", 7)]


def test_transaction_mode_pids_are_proxy_made(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="transaction")
    with connect(pg, proxy) as conn:
        assert conn.info.backend_pid > 2**22
        assert conn.info.backend_pid != conn.execute("SELECT pg_backend_pid()").fetchone()[0]
