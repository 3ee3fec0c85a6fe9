"""/ready and /live on the metrics listener: what a load balancer and an orchestrator are told,
and the order of a graceful shutdown: /ready fails first, the listener closes
shutdown_unready_delay later, running transactions finish, idle clients get 57P01.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import psycopg
import pytest

from helpers import wait_until
from proxyproc import ProxyProcess, http_get, port_open
from threadpool_proxy.pgcluster import free_port


def _closed_port() -> int:
    """A loopback port nobody listens on (connections are refused)."""
    return free_port()


def test_live_and_ready_beside_the_metrics(pg, proxy_factory):
    proxy = proxy_factory(metrics_listen="127.0.0.1:0")
    port = proxy.metrics.port
    assert http_get(port, "/live") == (200, "live\n")
    assert http_get(port, "/ready") == (200, "ready\n")
    status, body = http_get(port, "/metrics")
    assert status == 200 and "threadpool_proxy_clients" in body


def test_not_ready_when_a_database_has_no_reachable_server(pg, proxy_factory):
    dead = _closed_port()
    proxy = proxy_factory(metrics_listen="127.0.0.1:0", databases={
        "appdb": {"host": pg.host, "port": pg.port},
        "gone": {"host": "127.0.0.1", "port": dead}})
    status, body = http_get(proxy.metrics.port, "/ready")
    assert status == 503
    assert body.startswith(f"database gone: no server reachable (127.0.0.1:{dead}: ")
    assert http_get(proxy.metrics.port, "/live") == (200, "live\n")


def test_ready_when_one_node_of_each_database_answers(pg, proxy_factory):
    dead = _closed_port()
    proxy = proxy_factory(metrics_listen="127.0.0.1:0", health_check_period=60, databases={
        "appdb": {"nodes": [f"127.0.0.1:{dead}", f"{pg.host}:{pg.port}"]}})
    assert http_get(proxy.metrics.port, "/ready") == (200, "ready\n")
    # once the health checks mark the live node down, no node of appdb is left
    proxy.pool.mark_down(f"{pg.host}:{pg.port}", 1.0, "test")
    status, body = wait_until(lambda: (r := http_get(proxy.metrics.port, "/ready"))[0] == 503 and r, timeout=5) \
        or http_get(proxy.metrics.port, "/ready")
    assert status == 503
    assert f"{pg.host}:{pg.port}: marked down by the health checks" in body


def test_the_answer_is_reused_for_a_second(pg, proxy_factory):
    """30 /ready requests in well under a second cost one or two probes of the server."""
    accepted = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        server.settimeout(0.2)
        stop = threading.Event()

        def accept():
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except OSError:
                    continue
                accepted.append(time.monotonic())
                conn.close()

        acceptor = threading.Thread(target=accept, daemon=True)
        acceptor.start()
        try:
            proxy = proxy_factory(metrics_listen="127.0.0.1:0",
                                  databases={"fake": {"host": "127.0.0.1", "port": server.getsockname()[1]}})
            started = time.monotonic()
            answers = [http_get(proxy.metrics.port, "/ready")[0] for _ in range(30)]
            took = time.monotonic() - started
        finally:
            stop.set()
            acceptor.join(5)
    assert answers == [200] * 30
    assert len(accepted) <= 1 + int(took) + 1, (len(accepted), took)


def test_embedded_shutdown_fails_ready_first_and_accepts_until_the_delay_ends(pg, proxy_factory):
    proxy = proxy_factory(metrics_listen="127.0.0.1:0", shutdown_unready_delay=3)
    port, metrics = proxy.port, proxy.metrics.port
    stopper = threading.Thread(target=proxy.shutdown, daemon=True)
    began = time.monotonic()
    stopper.start()
    assert wait_until(lambda: http_get(metrics, "/ready")[0] == 503, timeout=2.0)
    assert http_get(metrics, "/ready") == (503, "shutting down\n")
    # still accepting (and serving) during the delay
    with psycopg.connect(pg.dsn(host="127.0.0.1", port=port, connect_timeout=10), autocommit=True) as conn:
        assert conn.execute("SELECT 7").fetchone() == (7,)
    assert time.monotonic() - began < 3
    assert wait_until(lambda: not port_open(port), timeout=10)
    assert time.monotonic() - began >= 2.9
    stopper.join(30)
    assert not stopper.is_alive()


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in started:
        proc.stop()


def test_sigterm_order_ready_fails_then_the_listener_closes_then_transactions_finish(pg, tmp_path, procs):
    metrics = free_port()
    proxy = ProxyProcess(pg, tmp_path, listen={"host": "127.0.0.1", "port": free_port()},
                         metrics_listen=f"127.0.0.1:{metrics}", shutdown_unready_delay=2, shutdown_timeout=20)
    procs.append(proxy)
    dsn = pg.dsn(host="127.0.0.1", port=proxy.port, connect_timeout=10)
    busy = psycopg.connect(dsn)
    idle = psycopg.connect(dsn, autocommit=True)
    assert idle.execute("SELECT 1").fetchone() == (1,)
    busy.execute("SELECT 1")                        # a transaction is open (autocommit off)
    assert proxy.http("/ready") == (200, "ready\n")

    proxy.signal(signal.SIGTERM)
    sent = time.monotonic()
    times = {}

    def watch():
        while "closed" not in times and time.monotonic() - sent < 30:
            now = time.monotonic()
            if "unready" not in times and proxy.http("/ready", timeout=2)[0] == 503:
                times["unready"] = now
            if not port_open(proxy.port):
                times["closed"] = now
            time.sleep(0.02)

    watch()
    assert "unready" in times and "closed" in times, (times, proxy.log())
    assert times["unready"] - sent < 1.5
    assert times["closed"] - sent >= 1.9              # shutdown_unready_delay: 2
    assert proxy.http("/live") == (200, "live\n")     # still serving the open transaction
    # the open transaction finishes, then that client is disconnected (57P01) before its next one
    assert busy.execute("SELECT 2").fetchone() == (2,)
    busy.commit()
    with pytest.raises(psycopg.OperationalError):
        busy.execute("SELECT 3")
    busy.close()
    with pytest.raises(psycopg.OperationalError):     # 57P01 came when the drain began
        idle.execute("SELECT 4")
    idle.close()
    assert proxy.wait(30) == 0, proxy.log()
    assert http_get(metrics, "/live")[0] == 0         # nothing answers once the process is gone
    log = proxy.log()
    assert log.index("clients are still accepted for 2 s (shutdown_unready_delay)") < log.index(
        "shutting down: no new clients")


def test_workers_the_supervisor_answers_for_all(pg, tmp_path, procs):
    metrics = free_port()
    proxy = ProxyProcess(pg, tmp_path, listen={"host": "127.0.0.1", "port": free_port()}, workers=2,
                         metrics_listen=f"127.0.0.1:{metrics}", shutdown_unready_delay=3)
    procs.append(proxy)
    assert proxy.http("/live") == (200, "2 of 2 workers running\n")
    assert proxy.http("/ready") == (200, "ready (2 of 2 workers)\n")
    proxy.signal(signal.SIGTERM)
    sent = time.monotonic()
    assert wait_until(lambda: proxy.http("/ready", timeout=2)[0] == 503, timeout=2.0)
    assert proxy.http("/ready") == (503, "shutting down\n")
    assert port_open(proxy.port)                      # the workers accept during the delay
    assert time.monotonic() - sent < 3
    assert wait_until(lambda: not port_open(proxy.port), timeout=20)
    assert time.monotonic() - sent >= 2.9
    assert proxy.wait(60) == 0, proxy.log()
