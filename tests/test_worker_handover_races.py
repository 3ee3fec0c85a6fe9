"""The moments of a rolling restart where two processes share one worker's place, made to happen
on purpose: the old and the new process accept on one listening socket, and the old one's peer
socket is renamed (``retired-…``) while a cancel for its client is on its way there.
"""

from __future__ import annotations

import os
import socket
import threading

import psycopg

from threadpool_proxy import protocol as pq
from threadpool_proxy.peers import Peers, PeerListener, WorkerSlot


def test_a_cancel_reaches_a_worker_whose_peer_socket_is_renamed_on_the_way(tmp_path):
    """Another worker listed the directory while the owner's socket was still ``peer-0-<pid>``; the
    owner retired (renamed it ``retired-0-<pid>``) before the connect: the cancel still arrives."""
    got: list = []

    class Owner:          # the retiring worker's ProxyServer, as its peer channel sees it
        def cancel_here(self, pid: int, secret: bytes) -> None:
            got.append((pid, secret))

    listener = PeerListener(WorkerSlot(0, 2, str(tmp_path)), Owner())
    # The owner is another process to the forwarder (which skips its own pid): give it another pid.
    live, retired = tmp_path / "peer-0-999999.sock", tmp_path / "retired-0-999999.sock"
    os.rename(listener.path, live)
    listener.path = str(live)
    serving = threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    serving.start()
    try:
        peers = Peers(WorkerSlot(1, 2, str(tmp_path)))
        connect = peers._connect

        def connect_just_after_the_owner_retired(path, timeout=5.0):
            if live.exists():
                os.rename(live, retired)         # what PeerListener.retire does, at the worst moment
                listener.path = str(retired)
            return connect(path, timeout)

        peers._connect = connect_just_after_the_owner_retired
        assert peers.forward_cancel(0, pq.cancel_request(4242, b"\x01\x02\x03\x04")) is True
        assert retired.exists() and not live.exists()
        assert got == [(4242, b"\x01\x02\x03\x04")]
    finally:
        listener.close()
        serving.join(5)


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
