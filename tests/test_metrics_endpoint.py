"""Issue 18 item 8: the metrics endpoint cuts slow connections off and serves only a few at once.

A client that connects and sends nothing, or trickles its request, is closed
at ``metrics_timeout``; beyond ``metrics_max_connections`` connections are
answered 503 at once and closed, taking no thread; a real scrape succeeds
while fewer are held, and again once the slow ones are cut off.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers import wait_until
from threadpool_proxy.config import ConfigError, from_dict

#: The documented defaults (docs/security-wire.md).
DEFAULT_TIMEOUT = 5
DEFAULT_MAX_CONNECTIONS = 4


def _connect(proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.metrics.port), timeout=10)


def _until_closed(sock: socket.socket, limit: float = 15) -> tuple[bytes, float]:
    """Everything the endpoint sends until it closes the connection, and how long that took."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        raise AssertionError(f"still open after {limit} s") from None
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


def _scrape(proxy) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics.port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_a_silent_client_is_cut_off_at_the_timeout(pg, proxy_factory):
    """The default metrics_timeout: closed after it, with nothing said."""
    proxy = proxy_factory(metrics_listen="127.0.0.1:0")
    with _connect(proxy) as sock:
        data, took = _until_closed(sock)
    assert data == b""
    assert DEFAULT_TIMEOUT - 0.5 <= took <= DEFAULT_TIMEOUT + 3, took
    assert "threadpool_proxy_clients" in _scrape(proxy)


def test_a_trickling_client_is_cut_off_at_the_timeout(pg, proxy_factory):
    """One byte every 0.3 s never ends its request: the deadline is for the whole request, not per read."""
    proxy = proxy_factory(metrics_listen="127.0.0.1:0", metrics_timeout=2)     # (a setting, read live)
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: " + b"a" * 100
    sent = []
    with _connect(proxy) as sock:
        t0 = time.monotonic()

        def trickle():
            try:
                for byte in request:
                    sock.sendall(bytes([byte]))
                    sent.append(byte)
                    time.sleep(0.3)
            except OSError:
                pass

        writer = threading.Thread(target=trickle, daemon=True)
        writer.start()
        data, _ = _until_closed(sock)
        took = time.monotonic() - t0
    writer.join(30)
    assert data == b""
    assert 1.5 <= took <= 4, took
    assert len(sent) < len(request)


def test_connections_beyond_the_cap_get_503_at_once_and_no_thread(pg, proxy_factory):
    """metrics_max_connections slow clients hold every place: more get 503 at once and
    are closed (no thread each), and a scrape works again once the slow ones are cut off;
    with one place free a scrape works at once."""
    # (long enough that no slow one is cut off before the connections beyond the cap are made,
    # however loaded the machine)
    proxy = proxy_factory(metrics_listen="127.0.0.1:0", metrics_timeout=10)
    threads = threading.active_count()
    slow = [_connect(proxy) for _ in range(DEFAULT_MAX_CONNECTIONS - 1)]
    try:
        assert wait_until(lambda: proxy.metrics.http.active == DEFAULT_MAX_CONNECTIONS - 1)
        assert "threadpool_proxy_clients" in _scrape(proxy)          # a place is free
        # the scrape's thread gives its place back after the client has read the answer:
        # wait for that, or the next connection could be refused and the count be right by chance
        assert wait_until(lambda: proxy.metrics.http.active == DEFAULT_MAX_CONNECTIONS - 1)
        refused_before = proxy.metrics.http.refused
        slow.append(_connect(proxy))
        assert wait_until(lambda: proxy.metrics.http.active == DEFAULT_MAX_CONNECTIONS)
        assert proxy.metrics.http.refused == refused_before
        t0 = time.monotonic()
        beyond = [_connect(proxy) for _ in range(12)]
        for sock in beyond:
            data, _ = _until_closed(sock)
            assert data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), data
            assert b"Retry-After: 1\r\n" in data
            sock.close()
        assert time.monotonic() - t0 < 2
        assert proxy.metrics.http.refused == refused_before + len(beyond)
        assert threading.active_count() <= threads + DEFAULT_MAX_CONNECTIONS, threading.enumerate()
        with pytest.raises((urllib.error.HTTPError, urllib.error.URLError, ConnectionError)) as refused:
            _scrape(proxy)
        assert getattr(refused.value, "code", 503) == 503
        # the slow ones are cut off at metrics_timeout: scrapes work again
        assert wait_until(lambda: proxy.metrics.http.active == 0, timeout=20)
        assert "threadpool_proxy_clients" in _scrape(proxy)
    finally:
        for sock in slow:
            sock.close()


def test_only_get_of_metrics(pg, proxy_factory):
    proxy = proxy_factory(metrics_listen="127.0.0.1:0")
    for request, status in ((b"POST /metrics HTTP/1.1\r\n\r\n", b"405"), (b"GET /x HTTP/1.1\r\n\r\n", b"404"),
                            (b"nonsense\r\n\r\n", b"400"), (b"HEAD /metrics HTTP/1.0\r\n\r\n", b"200")):
        with _connect(proxy) as sock:
            sock.sendall(request)
            data, _ = _until_closed(sock)
        assert data.startswith(b"HTTP/1.1 " + status), (request, data)
    with _connect(proxy) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        data, _ = _until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and b"threadpool_proxy_workers 1.0" in data


def test_metrics_settings():
    def load(**settings):
        return from_dict({"databases": {"app": {"host": "127.0.0.1"}}, **settings})
    assert (load().metrics_timeout, load().metrics_max_connections) == (DEFAULT_TIMEOUT, DEFAULT_MAX_CONNECTIONS)
    with pytest.raises(ConfigError, match="^metrics_timeout: expected a number of seconds > 0"):
        load(metrics_timeout=0)
    with pytest.raises(ConfigError, match="^metrics_max_connections: expected a positive integer"):
        load(metrics_max_connections=0)
