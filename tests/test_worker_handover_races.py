"""The moments of a rolling restart where two processes share one worker's place, made to happen
on purpose: the old and the new process accept on one listening socket.
"""

from __future__ import annotations

import socket
import threading

import psycopg


def test_the_accept_loop_is_not_stuck_when_another_process_took_its_client(proxy_factory, pg):
    """Two processes accept on one socket during a rolling restart; poll wakes both for a client and
    one gets it.  The other's accept must not wait for the next client (the old worker would then
    never stop accepting, and never leave): with nothing queued it returns at once."""
    proxy = proxy_factory()
    server = proxy.server
    # The loop serves the socket (a client is answered), so its accept() is the one it uses.
    with psycopg.connect(pg.dsn(host="127.0.0.1", port=proxy.port, connect_timeout=10)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    listener = server.listeners.tcp[0]
    outcome: dict = {}

    def accept_with_nothing_queued() -> None:     # the other process took the client poll woke us for
        try:
            outcome["accepted"] = server.get_request(listener)
        except OSError as exc:
            outcome["error"] = exc

    t = threading.Thread(target=accept_with_nothing_queued, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():                              # stuck: a client frees it, so the test can end
        socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
        t.join(5)
    if "accepted" in outcome:
        outcome["accepted"][0].close()
    assert isinstance(outcome.get("error"), BlockingIOError), outcome
    # and the proxy still serves, and stops accepting when asked (as a retiring worker does)
    with psycopg.connect(pg.dsn(host="127.0.0.1", port=proxy.port, connect_timeout=10)) as conn:
        assert conn.execute("SELECT 2").fetchone() == (2,)
    stopped = threading.Thread(target=server.stop_accepting, daemon=True)
    stopped.start()
    stopped.join(5)
    assert not stopped.is_alive()
