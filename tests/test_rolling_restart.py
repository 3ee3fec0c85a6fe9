"""Rolling restart of the workers (SIGUSR2 to the supervisor): each worker in turn is replaced
by a new process on the same listening socket, under a load of clients that connect, run a
query and leave, over and over: not one connection refused, not one query failed; and the
clients the old process keeps can still be canceled.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time

import psycopg

from helpers import (cancel_packet, parse_error_fields, query, read_message, read_until_ready, startup_packet,
                     wait_until)
from proxyproc import ProxyProcess
from threadpool_proxy.pgcluster import free_port


def _workers(proxy) -> list[tuple[int, int]]:
    with psycopg.connect(proxy.pg.dsn(host="127.0.0.1", port=proxy.port, dbname="pgbouncer", connect_timeout=10),
                         autocommit=True) as console:
        return [(row[0], row[1]) for row in console.execute("SHOW WORKERS").fetchall()]


def test_a_rolling_restart_under_load_refuses_no_connection_and_fails_no_query(pg, tmp_path):
    proxy = ProxyProcess(pg, tmp_path, listen={"host": "127.0.0.1", "port": free_port()}, workers=2,
                         pool_size=20, worker_retire_timeout=3, shutdown_timeout=20)
    try:
        before = _workers(proxy)
        assert [w for w, _ in before] == [0, 1]
        dsn = pg.dsn(host="127.0.0.1", port=proxy.port, connect_timeout=20)
        stop = threading.Event()
        counts = {"connections": 0, "queries": 0}
        failures: list[str] = []
        lock = threading.Lock()

        def client(n: int) -> None:
            while not stop.is_set():
                try:
                    conn = psycopg.connect(dsn, autocommit=True)
                except psycopg.Error as exc:
                    with lock:
                        failures.append(f"connect: {exc}")
                    continue
                try:
                    with lock:
                        counts["connections"] += 1
                    for i in range(3):
                        assert conn.execute("SELECT %s::int", (n * 10 + i,)).fetchone() == (n * 10 + i,)
                        with lock:
                            counts["queries"] += 1
                except psycopg.Error as exc:
                    with lock:
                        failures.append(f"query: {exc}")
                finally:
                    conn.close()

        # One client in a transaction across its worker's replacement: served to its end.
        held = psycopg.connect(dsn)
        held.execute("SELECT 1")
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(6)]
        for t in threads:
            t.start()
        assert wait_until(lambda: counts["queries"] > 50, timeout=30), counts
        proxy.signal(signal.SIGUSR2)
        began = time.monotonic()
        # past the first old worker's worker_retire_timeout (3 s): the open transaction still runs
        # (it may be that worker's: it is let finish) and commits
        assert wait_until(lambda: "takes no new client" in proxy.log(), timeout=30), proxy.log()
        time.sleep(3.5)
        assert held.execute("SELECT 2").fetchone() == (2,)
        held.commit()
        held.close()
        assert wait_until(lambda: "rolling restart done: 2 of 2 workers replaced" in proxy.log(), timeout=50), \
            proxy.log()
        took = time.monotonic() - began
        at_end = dict(counts)
        time.sleep(1.0)                          # and the new workers serve the load too
        stop.set()
        for t in threads:
            t.join(30)
        assert failures == []
        assert counts["queries"] > at_end["queries"] > 50

        after = _workers(proxy)
        assert [w for w, _ in after] == [0, 1]
        assert not {pid for _, pid in before} & {pid for _, pid in after}
        log = proxy.log()
        assert log.count("takes no new client and leaves once its clients do") == 2
        assert "rolling restart: every client left" in log or "still connected: ending each" in log
        print(f"\nrolling restart of 2 workers: {took:.1f} s; {counts['connections']} connections, "
              f"{counts['queries']} queries, 0 refused, 0 failed")
        assert proxy.stop() == 0, proxy.log()
    finally:
        proxy.stop()


def _show(proxy, what: str) -> list[dict]:
    with psycopg.connect(proxy.pg.dsn(host="127.0.0.1", port=proxy.port, dbname="pgbouncer", connect_timeout=10),
                         autocommit=True) as console:
        cur = console.execute(f"SHOW {what}")
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def test_cancels_reach_a_retiring_workers_clients(pg, tmp_path):
    """A client stays on its worker's old process while a successor has its place: a cancel that
    reaches the successor (same index) or the other worker still cancels the client's query."""
    proxy = ProxyProcess(pg, tmp_path, listen={"host": "127.0.0.1", "port": free_port()}, workers=2,
                         worker_retire_timeout=60, shutdown_timeout=20)
    try:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
        sock.sendall(startup_packet({"user": "trustuser", "database": "appdb"}))
        while True:
            kind, body = read_message(sock)
            assert kind != "E", parse_error_fields(body)
            if kind == "K":
                pid, secret = struct.unpack("!II", body)
            if kind == "Z":
                break
        [mine] = [w for w in _show(proxy, "WORKERS") if w["clients"] == 1]
        proxy.signal(signal.SIGUSR2)
        assert wait_until(lambda: f"the old pid {mine['pid']} takes no new client" in proxy.log(), timeout=50), \
            proxy.log()
        for round_ in range(6):                  # the kernel picks the worker of each cancel connection
            sql = f"SELECT pg_sleep(60) -- round {round_}"
            query(sock, sql)
            with pg.superuser_conn() as watch:
                assert wait_until(lambda: watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = %s AND state = 'active'",
                    (sql,)).fetchone()[0] == 1, timeout=20)
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as c:
                c.sendall(cancel_packet(pid, secret))
                c.settimeout(30)
                assert c.recv(1) == b""
            sock.settimeout(30)
            errors = [parse_error_fields(b)["C"] for k, b in read_until_ready(sock) if k == "E"]
            assert errors == ["57014"], (round_, errors)
        sock.close()
        assert wait_until(lambda: "rolling restart done: 2 of 2 workers replaced" in proxy.log(), timeout=50), \
            proxy.log()
    finally:
        proxy.stop()
