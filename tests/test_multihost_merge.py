"""Where issue 24 (several proxies) meets the listeners and the bounded metrics server of main:

* ``/ready`` and ``/live`` are answered by the bounded metrics server: GET or
  HEAD only, other methods 405, the cap applies to them too (a probe beyond it
  gets 503 at once);
* with ``workers`` the supervisor makes the listening sockets: one per worker
  for each TCP address, and the unix socket once, served by worker 0 and kept
  through a rolling restart (SIGUSR2); the supervisor removes its file at exit.
"""

from __future__ import annotations

import os
import signal
import socket

import psycopg

from helpers import wait_until
from proxyproc import ProxyProcess
from threadpool_proxy.pgcluster import free_port

#: The documented default of metrics_max_connections (docs/security-wire.md).
DEFAULT_MAX_CONNECTIONS = 4


def _request(port: int, raw: bytes) -> bytes:
    """Everything the endpoint sends for ``raw`` until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk


def test_ready_and_live_obey_the_metrics_servers_methods_and_cap(pg, proxy_factory):
    proxy = proxy_factory(metrics_listen="127.0.0.1:0", metrics_timeout=10)
    port = proxy.metrics.port
    ready = _request(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ready.startswith(b"HTTP/1.1 200 OK\r\n") and ready.endswith(b"\r\n\r\nready\n"), ready
    assert b"Cache-Control: no-store\r\n" in ready
    live = _request(port, b"GET /live?x=1 HTTP/1.1\r\n\r\n")
    assert live.startswith(b"HTTP/1.1 200 OK\r\n"), live
    head = _request(port, b"HEAD /ready HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n"), head
    assert _request(port, b"POST /ready HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert _request(port, b"GET /readyz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    # every place held by a silent client: a probe gets 503 at once, without a thread
    slow = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(DEFAULT_MAX_CONNECTIONS)]
    try:
        assert wait_until(lambda: proxy.metrics.http.active == DEFAULT_MAX_CONNECTIONS)
        beyond = _request(port, b"GET /ready HTTP/1.1\r\n\r\n")
        assert beyond.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), beyond
        assert b"too many metrics connections" in beyond
    finally:
        for sock in slow:
            sock.close()
    assert wait_until(lambda: proxy.metrics.http.active == 0, timeout=20)
    assert _request(port, b"GET /ready HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")


def _unix_pid(pg, directory: str, port: int) -> int:
    """The pid the proxy gave a client on its unix socket (the BackendKeyData's: worker-specific)."""
    with psycopg.connect(pg.dsn(host=directory, port=port, connect_timeout=10), autocommit=True) as conn:
        assert conn.execute("SELECT 7").fetchone() == (7,)
        return conn.info.backend_pid


def test_workers_share_the_supervisors_unix_socket_through_a_rolling_restart(pg, tmp_path):
    directory = tmp_path / "sock"
    directory.mkdir()
    port = free_port()
    path = directory / f".s.PGSQL.{port}"
    proxy = ProxyProcess(pg, tmp_path, listen={"host": "127.0.0.1", "port": port,
                                               "unix_socket_dir": str(directory)},
                         workers=2, worker_retire_timeout=1, shutdown_timeout=5)
    try:
        assert path.exists()
        assert _unix_pid(pg, str(directory), port) > 0
        with psycopg.connect(pg.dsn(host="127.0.0.1", port=port, connect_timeout=10), autocommit=True) as conn:
            assert conn.execute("SELECT 8").fetchone() == (8,)
        inode = os.stat(path).st_ino
        proxy.signal(signal.SIGUSR2)
        assert wait_until(lambda: "rolling restart done: 2 of 2 workers replaced" in proxy.log(), timeout=60), \
            proxy.log()
        # the same socket file, served by worker 0's successor
        assert os.stat(path).st_ino == inode
        assert _unix_pid(pg, str(directory), port) > 0
    finally:
        assert proxy.stop() == 0, proxy.log()
    assert not path.exists()
