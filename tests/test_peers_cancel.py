"""Cancel requests between proxies of a group (peer_id, peers): two or three proxies in this
process, each in front of the same PostgreSQL, each knowing the others' listen addresses.

The client logs in to one proxy and its CancelRequest is sent to another, as a load balancer
may do; the proxy that receives it forwards it over TCP to the one that gave out the key.
"""

from __future__ import annotations

import logging
import socket
import time

import pytest

import threadpool_proxy
from helpers import cancel_packet, login_with_key, parse_error_fields, query, read_until_ready, wait_until
from threadpool_proxy.cancelkeys import KeyLayout, forwarded
from threadpool_proxy.pgcluster import free_port


@pytest.fixture
def group(proxy_factory):
    """make(n, **settings) -> n started proxies with peer_id 1..n, each listing all of them."""

    def make(n=2, peers=None, **settings):
        ports = [free_port() for _ in range(n)]
        listed = peers if peers is not None else {i + 1: {"host": "127.0.0.1", "port": p}
                                                  for i, p in enumerate(ports)}
        return [proxy_factory(listen={"port": port}, peer_id=i + 1, peers=listed, **settings)
                for i, port in enumerate(ports)]

    return make


def _login(proxy, user="trustuser") -> tuple[socket.socket, int, int]:
    return login_with_key("127.0.0.1", proxy.port, user)


def _cancel(port: int, pid: int, secret: int) -> float:
    """Send a CancelRequest; seconds until the proxy closed the connection (it has sent it on)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(cancel_packet(pid, secret))
        assert s.recv(1) == b""
    return time.monotonic() - started


def _running(pg, sql: str) -> bool:
    with pg.superuser_conn() as conn:
        return bool(conn.execute("SELECT 1 FROM pg_stat_activity WHERE query = %s AND state = 'active'",
                                 (sql,)).fetchall())


def _errors(sock) -> list[str]:
    return [parse_error_fields(b)["C"] for k, b in read_until_ready(sock) if k == "E"]


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_a_cancel_sent_to_another_proxy_cancels_the_query(pg, group, pool_mode):
    a, b = group(2, pool_mode=pool_mode)
    sock, pid, secret = _login(a)
    try:
        assert KeyLayout(2).owner(secret.to_bytes(4, "big")).peer_id == 1     # any proxy reads the issuer
        sql = f"SELECT pg_sleep(60) -- {pool_mode}"
        query(sock, sql)
        assert wait_until(lambda: _running(pg, sql), timeout=20)
        _cancel(b.port, pid, secret)
        assert _errors(sock) == ["57014"]
        assert b.server.cancel_counts["to_peers"] == 1
        assert a.server.cancel_counts["from_peers"] == 1
        # the client goes on, and a cancel sent to its own proxy works as before
        query(sock, "SELECT pg_sleep(60)")
        assert wait_until(lambda: _running(pg, "SELECT pg_sleep(60)"), timeout=20)
        _cancel(a.port, pid, secret)
        assert _errors(sock) == ["57014"]
        assert a.server.cancel_counts["to_peers"] == 0
    finally:
        sock.close()


def test_the_owner_is_found_among_three_whichever_receives_it(pg, group):
    proxies = group(3)
    for owner in proxies:
        for receiver in proxies:
            sock, pid, secret = _login(owner)
            try:
                sql = f"SELECT pg_sleep(60) -- {owner.port} via {receiver.port}"
                query(sock, sql)
                assert wait_until(lambda: _running(pg, sql), timeout=20)
                _cancel(receiver.port, pid, secret)
                assert _errors(sock) == ["57014"]
            finally:
                sock.close()
    assert sum(p.server.cancel_counts["to_peers"] for p in proxies) == 6
    assert sum(p.server.cancel_counts["from_peers"] for p in proxies) == 6


def test_forged_and_unknown_keys_cancel_nothing(pg, group, caplog):
    a, b = group(2)
    sock, pid, secret = _login(a)
    try:
        sql = "SELECT pg_sleep(2)"
        query(sock, sql)
        assert wait_until(lambda: _running(pg, sql), timeout=20)
        value = secret
        stranger = int.from_bytes(KeyLayout(9).new_secret(), "big")
        with caplog.at_level(logging.INFO, logger="threadpool_proxy"):
            _cancel(b.port, pid, value ^ 1 << 20)      # names peer 1, wrong secret: forwarded, ignored there
            _cancel(b.port, pid, stranger)             # names peer 9, not in peers: dropped at b
            _cancel(a.port, pid, stranger)
            # the real secret, already marked forwarded, sent to b: b must not send it back to a
            _cancel(b.port, pid, int.from_bytes(forwarded(secret.to_bytes(4, "big")), "big"))
        assert _errors(sock) == []                     # pg_sleep(2) ran to its end
        assert b.server.cancel_counts["to_peers"] == 1
        assert b.server.cancel_counts["dropped"] == 2
        assert a.server.cancel_counts["dropped"] == 1
        text = caplog.text
        assert "its key names peer 9, which is not in peers" in text
        assert "a peer forwarded it here (peer 2) but its key names peer 1" in text
        assert f"{secret}" not in text and f"{value ^ 1 << 20}" not in text      # keys are not logged
    finally:
        sock.close()


def test_peers_that_disagree_never_bounce_a_cancel_back_and_forth(pg, proxy_factory, caplog):
    """Proxy 1 lists peer 2 at its own address: a key of peer 2 comes back to it once, marked
    forwarded, and is dropped there; the cancel connection closes at once."""
    port = free_port()
    a = proxy_factory(listen={"port": port}, peer_id=1, peers={2: {"host": "127.0.0.1", "port": port}})
    key = int.from_bytes(KeyLayout(2).new_secret(), "big")
    with caplog.at_level(logging.INFO, logger="threadpool_proxy"):
        took = _cancel(a.port, 4242, key)
    assert took < 5
    assert a.server.cancel_counts["to_peers"] == 1
    assert a.server.cancel_counts["from_peers"] == 1
    assert a.server.cancel_counts["dropped"] == 1
    assert "a peer forwarded it here (peer 1) but its key names peer 2" in caplog.text


def test_a_peer_that_does_not_answer_costs_at_most_peer_cancel_timeout(pg, proxy_factory, caplog):
    with socket.socket() as silent:                # accepts (the kernel does) and never reads or closes
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        a = proxy_factory(peer_id=1, peer_cancel_timeout=1.5,
                          peers={3: {"host": "127.0.0.1", "port": silent.getsockname()[1]}})
        key = int.from_bytes(KeyLayout(3).new_secret(), "big")
        with caplog.at_level(logging.INFO, logger="threadpool_proxy"):
            took = _cancel(a.port, 4242, key)
        assert 1.4 < took < 5
        assert "could not forward a cancel request to peer 3 (127.0.0.1:" in caplog.text
        assert "within 1.5 s (peer_cancel_timeout)" in caplog.text
        # a second failure within 10 s is counted, not logged again
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="threadpool_proxy"):
            _cancel(a.port, 4242, key)
        assert "could not forward" not in caplog.text


def test_peers_are_reloaded(pg, proxy_factory, tmp_path):
    import yaml
    a_port, b_port = free_port(), free_port()
    b = proxy_factory(listen={"port": b_port}, peer_id=2, peers={1: f"127.0.0.1:{a_port}"})
    conf = tmp_path / "a.yaml"
    raw = proxy_factory.config(listen={"port": a_port}, peer_id=1)
    conf.write_text(yaml.safe_dump(raw))
    a = threadpool_proxy.start(str(conf))
    proxy_factory.started.append(a)
    sock, pid, secret = _login(b)
    try:
        query(sock, "SELECT pg_sleep(60)")
        assert wait_until(lambda: _running(pg, "SELECT pg_sleep(60)"), timeout=20)
        _cancel(a.port, pid, secret)                    # a does not know peer 2 yet: dropped
        assert a.server.cancel_counts["dropped"] == 1
        raw["peers"] = {2: {"host": "127.0.0.1", "port": b_port}}
        conf.write_text(yaml.safe_dump(raw))
        a.reload()
        _cancel(a.port, pid, secret)
        assert _errors(sock) == ["57014"]
    finally:
        sock.close()
