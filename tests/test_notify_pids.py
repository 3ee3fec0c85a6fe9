"""The pid in a NotificationResponse names the sender as its client was told (issue 11, item 1).

PostgreSQL puts the sending backend's pid in a NotificationResponse.  In
transaction mode a client is told a proxy-made pid (its backend changes), so
the proxy rewrites the pid of a notification sent from one of its own server
connections to the pid the client holding that connection was told: a driver
that ignores its own notifications, or a listener comparing the pid with what
a sender reported, sees the same number.  A sender the proxy does not know (a
direct connection) keeps its real pid.
"""

from __future__ import annotations

import pytest

from helpers import connect
from threadpool_proxy import relay as relay_mod


def _one_notification(conn):
    got = list(conn.notifies(timeout=10, stop_after=1))
    assert len(got) == 1, got
    return got[0]


@pytest.mark.parametrize("pool_mode", ["transaction", "statement"])
def test_a_listener_sees_the_sender_pid_its_client_was_told(pg, proxy_factory, pool_mode):
    proxy = proxy_factory(pool_mode=pool_mode)
    with connect(pg, proxy) as listener, connect(pg, proxy) as sender:
        listener.execute("LISTEN tpp_chan")
        sender.execute("NOTIFY tpp_chan, 'from sender'")
        got = _one_notification(listener)
        sender_real = sender.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert (got.channel, got.payload) == ("tpp_chan", "from sender")
        assert got.pid == sender.info.backend_pid
        assert got.pid != sender_real                    # proxy-made, not the backend's


def test_a_client_recognises_its_own_notification(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="transaction")
    with connect(pg, proxy) as conn:
        conn.execute("LISTEN tpp_self")
        conn.execute("NOTIFY tpp_self, 'me'")
        got = _one_notification(conn)
        assert got.pid == conn.info.backend_pid


def test_a_sender_outside_the_proxy_keeps_its_real_pid(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="transaction")
    with connect(pg, proxy) as listener, pg.superuser_conn("appdb") as direct:
        listener.execute("LISTEN tpp_direct")
        direct.execute("NOTIFY tpp_direct, 'direct'")
        got = _one_notification(listener)
        assert got.pid == direct.info.backend_pid


@pytest.mark.parametrize("chunk", [1, 3, 6, 9, 11, 40])
def test_a_notification_cut_by_a_small_read_is_named_whole(pg, proxy_factory, monkeypatch, chunk):
    """Server reads of ``chunk`` bytes cut the NotificationResponse (its header, its
    pid) at every place: the proxy completes it before anything of its pid goes out."""
    monkeypatch.setattr(relay_mod, "SERVER_BUFFER_SIZE", chunk)
    monkeypatch.setattr(relay_mod, "SERVER_BUFFER_MAX", chunk)
    proxy = proxy_factory(pool_mode="transaction")
    with connect(pg, proxy) as listener, connect(pg, proxy) as sender:
        listener.execute("LISTEN tpp_cut")
        for i in range(3):       # shift the message against the read size a few times
            sender.execute("SELECT pg_notify(%s, %s)", ("tpp_cut", "x" * (i * 5 + 1)))
            got = _one_notification(listener)
            assert (got.channel, got.payload, got.pid) == ("tpp_cut", "x" * (i * 5 + 1),
                                                           sender.info.backend_pid)
            assert listener.execute("SELECT 41 + %s", (i,)).fetchone() == (41 + i,)


def test_notifications_inside_a_result_are_named_too(pg, proxy_factory, monkeypatch):
    """A notification that arrives with a transaction's answer (same chunk) is rewritten in place."""
    monkeypatch.setattr(relay_mod, "SERVER_BUFFER_SIZE", 5)
    monkeypatch.setattr(relay_mod, "SERVER_BUFFER_MAX", 5)
    proxy = proxy_factory(pool_mode="transaction")
    with connect(pg, proxy) as conn, connect(pg, proxy) as other:
        conn.execute("LISTEN tpp_in")
        with conn.transaction():
            conn.execute("NOTIFY tpp_in, 'mine'")
        other.execute("NOTIFY tpp_in, 'theirs'")
        got = list(conn.notifies(timeout=10, stop_after=2))
        assert sorted((n.payload, n.pid) for n in got) == sorted(
            [("mine", conn.info.backend_pid), ("theirs", other.info.backend_pid)])
