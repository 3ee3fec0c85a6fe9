"""A real HAProxy (Debian's package) in front of three proxies on loopback ports, each with its
own peer_id, round-robin, checking each proxy's /ready (deploy/haproxy/haproxy.cfg's defaults,
frontend and backend sections, with loopback addresses):

* 1,000 cancels of long queries sent through the balancer: whichever proxy a cancel lands on,
  it cancels the right query (0 wrong, 0 lost);
* SIGTERM to one proxy while 30 clients run transactions through the balancer, reconnecting
  when their connection is ended between transactions: 0 failed transactions, and HAProxy
  marks that proxy down before it closes its listening socket.

Proxy 2 runs ``workers: 2``: a key names the proxy and its worker.
"""

from __future__ import annotations

import csv
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from helpers import cancel_packet, login_with_key, parse_error_fields, query, read_message, wait_until
from proxyproc import REPO, ProxyProcess, port_open
from threadpool_proxy.pgcluster import free_port

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed: apt-get install haproxy "
                                                        "(.ci/run installs it)")

#: Seconds a stopping proxy keeps accepting with /ready failing: above HAProxy's inter x fall
#: (500 ms x 2 in the sample), with room for a loaded machine.
UNREADY_DELAY = 3


class HAProxy:
    """haproxy -db -f <tmp>/haproxy.cfg: the sample's sections, loopback addresses, a stats socket."""

    def __init__(self, tmp_path, proxies: list) -> None:
        with open(os.path.join(REPO, "deploy", "haproxy", "haproxy.cfg"), encoding="utf-8") as f:
            sample = f.read()
        sections = sample[sample.index("\ndefaults"):]              # the sample's global section is replaced
        self.port = free_port()
        sections = re.sub(r"^(\s*)bind \S+$", rf"\1bind 127.0.0.1:{self.port}", sections, flags=re.M)
        servers = iter(proxies)

        def server(match):
            proxy = next(servers)
            return f"{match.group(1)}server {match.group(2)} 127.0.0.1:{proxy.port} check port {proxy.metrics_port}"

        sections, n = re.subn(r"^(\s*)server (\S+) \S+ check port \d+$", server, sections, flags=re.M)
        assert n == len(proxies) == 3
        self.stats_path = str(tmp_path / "haproxy.sock")
        self.config = tmp_path / "haproxy.cfg"
        self.config.write_text(f"global\n    maxconn 5000\n    stats socket {self.stats_path} mode 600 level admin\n"
                               + sections)
        self.log_path = tmp_path / "haproxy.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        try:
            assert wait_until(lambda: self.proc.poll() is not None or (
                os.path.exists(self.stats_path) and port_open(self.port)), timeout=30), self.log()
            assert self.proc.poll() is None, self.log()
            assert wait_until(lambda: set(self.status().values()) == {"UP"}, timeout=30), (self.status(), self.log())
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        """server name -> its status (UP, DOWN, "UP 1/2"...) from the stats socket's "show stat"."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.stats_path)
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = list(csv.DictReader(data.decode().lstrip("# ").splitlines()))
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "threadpool_proxies"
                and r["svname"] not in ("FRONTEND", "BACKEND")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def balanced(pg, tmp_path):
    """Three proxies (peer_id 1, 2, 3; proxy 2 with workers: 2) and HAProxy in front of them."""
    ports = [free_port() for _ in range(3)]
    peers = {i + 1: {"host": "127.0.0.1", "port": port} for i, port in enumerate(ports)}
    proxies = []
    haproxy = None
    try:
        for i, port in enumerate(ports):
            extra = {"workers": 2} if i == 1 else {}
            proxies.append(ProxyProcess(pg, tmp_path, name=f"proxy{i + 1}", listen={"host": "127.0.0.1", "port": port},
                                        metrics_listen=f"127.0.0.1:{free_port()}", peer_id=i + 1, peers=peers,
                                        pool_size=20, shutdown_unready_delay=UNREADY_DELAY, shutdown_timeout=20,
                                        **extra))
        haproxy = HAProxy(tmp_path, proxies)
        yield haproxy, proxies
    finally:
        if haproxy is not None:
            haproxy.stop()
        for proxy in proxies:                 # all at once, and at once (no shutdown_unready_delay)
            if proxy.proc.poll() is None:
                proxy.signal(signal.SIGINT)
        for proxy in proxies:
            proxy.stop()


def _show_workers(pg, proxy) -> list[dict]:
    dsn = pg.dsn(host="127.0.0.1", port=proxy.port, dbname="pgbouncer", connect_timeout=10)
    with psycopg.connect(dsn, autocommit=True) as console:
        cur = console.execute("SHOW WORKERS")
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


# -- 1,000 cancels ---------------------------------------------------------------------------

#: Threads sending cancels at once, and the queries each keeps running at a time: 4 x 10 backends.
CANCELERS, BATCH, CANCELS = 4, 10, 1000


def _login(port: int) -> tuple[socket.socket, int, int]:
    return login_with_key("127.0.0.1", port)


def _answer(sock) -> list[str]:
    """The SQLSTATEs of errors before the next ReadyForQuery."""
    codes = []
    while True:
        kind, body = read_message(sock)
        if kind == "E":
            codes.append(parse_error_fields(body)["C"])
        if kind == "Z":
            return codes


def _readable(socks) -> list:
    poller = select.poll()
    for s in socks:
        poller.register(s, select.POLLIN)
    ready = {fd for fd, _ in poller.poll(0)}
    return [s for s in socks if s.fileno() in ready]


def test_1000_cancels_through_the_balancer_each_cancel_the_right_query(pg, balanced):
    haproxy, proxies = balanced
    outcome = {"canceled": 0, "wrong": [], "lost": [], "errors": []}
    lock = threading.Lock()
    per_thread = CANCELS // CANCELERS

    def canceler(t: int) -> None:
        with pg.superuser_conn() as watch:
            done = 0
            while done < per_thread:
                tag = f"t{t}b{done}-{uuid.uuid4().hex[:8]}"
                clients = [_login(haproxy.port) for _ in range(min(BATCH, per_thread - done))]
                try:
                    for i, (sock, _, _) in enumerate(clients):
                        query(sock, f"SELECT pg_sleep(60) /* {tag}-{i} */")
                    running = lambda: watch.execute(  # noqa: E731
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                        (f"SELECT pg_sleep(60) /* {tag}-%",)).fetchone()[0]
                    assert wait_until(lambda: running() == len(clients), timeout=30), running()
                    waiting = [sock for sock, _, _ in clients]
                    for i, (sock, pid, secret) in enumerate(clients):
                        early = [s for s in _readable(waiting) if s is not sock]
                        if early:                      # answered before its own cancel was sent
                            with lock:
                                outcome["wrong"].append(f"{tag}: {len(early)} before cancel {i}")
                            waiting = [s for s in waiting if s not in early]
                        with socket.create_connection(("127.0.0.1", haproxy.port), timeout=30) as c:
                            c.sendall(cancel_packet(pid, secret))
                            c.settimeout(30)
                            c.recv(1)
                        if sock not in waiting:
                            continue
                        sock.settimeout(10)
                        try:
                            codes = _answer(sock)
                        except (OSError, ConnectionError) as exc:
                            codes = [f"no answer: {exc}"]
                        waiting.remove(sock)
                        with lock:
                            if codes == ["57014"]:
                                outcome["canceled"] += 1
                            else:
                                outcome["lost"].append(f"{tag}-{i}: {codes}")
                    done += len(clients)
                finally:
                    for sock, _, _ in clients:
                        sock.close()

    def run(t: int) -> None:
        try:
            canceler(t)
        except BaseException as exc:            # reported by the assertions below
            with lock:
                outcome["errors"].append(repr(exc))

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(CANCELERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    took = time.monotonic() - started
    assert outcome["errors"] == []
    assert outcome["wrong"] == [] and outcome["lost"] == []
    assert outcome["canceled"] == 1000
    rows = [row for proxy in proxies for row in _show_workers(pg, proxy)]
    to_peers = sum(r["cancels_to_peers"] for r in rows)
    from_peers = sum(r["cancels_from_peers"] for r in rows)
    received = sum(r["cancel_requests"] for r in rows)
    # round-robin sends a client's cancel to another proxy than its login most of the time
    assert to_peers == from_peers and to_peers >= 400, rows
    assert received == 1000 + from_peers, rows
    print(f"\n1000 cancels through HAProxy in {took:.1f} s: {to_peers} forwarded to another proxy, "
          f"{sum(r['cancels_forwarded'] for r in rows)} to another worker; 0 wrong, 0 lost")


# -- SIGTERM to one proxy under load ------------------------------------------------------

CLIENTS = 30


def test_sigterm_to_one_proxy_under_load_fails_no_transaction(pg, balanced):
    haproxy, proxies = balanced
    victim = proxies[1]                                   # the one with workers: its supervisor's /ready
    table = f"tx_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg.dsn(), autocommit=True) as owner:
        owner.execute(f"CREATE TABLE {table} (client int, seq int, PRIMARY KEY (client, seq))")
        owner.execute(f"GRANT SELECT, INSERT ON {table} TO trustuser")
    dsn = pg.dsn(user="trustuser", host="127.0.0.1", port=haproxy.port, connect_timeout=10)
    stop = threading.Event()
    lock = threading.Lock()
    committed: dict[int, int] = {}
    counts = {"reconnects": 0, "connect_retries": 0}
    failures: list[str] = []

    def connect():
        for attempt in range(20):
            try:
                return psycopg.connect(dsn, autocommit=True, prepare_threshold=None)
            except psycopg.OperationalError as exc:
                with lock:
                    counts["connect_retries"] += 1
                last = exc
                time.sleep(0.1)
        raise last

    def client(n: int) -> None:
        seq = 0
        conn = None
        try:
            while not stop.is_set():
                if conn is None:
                    conn = connect()
                stage = "BEGIN"
                try:
                    conn.execute("BEGIN")
                    stage = "INSERT"
                    conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (n, seq))
                    stage = "SELECT"
                    conn.execute("SELECT pg_sleep(0.005)")
                    stage = "COMMIT"
                    conn.execute("COMMIT")
                except psycopg.OperationalError as exc:
                    conn.close()
                    conn = None
                    if stage != "BEGIN":               # ended inside a transaction: a failed one
                        with lock:
                            failures.append(f"client {n} seq {seq} at {stage}: {exc}")
                        return
                    with lock:                         # ended between transactions (57P01): reconnect
                        counts["reconnects"] += 1
                    continue
                seq += 1
                with lock:
                    committed[n] = seq
        except Exception as exc:                      # reported by the assertions below
            with lock:
                failures.append(f"client {n} seq {seq}: {exc!r}")
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: sum(committed.values()) >= 300, timeout=60), committed
        marked_down = {}
        closed = {}

        def watch():
            while "at" not in closed and not stop.is_set():
                now = time.monotonic()
                if "at" not in marked_down and haproxy.status().get("proxy2", "").startswith("DOWN"):
                    marked_down["at"] = now
                if not port_open(victim.port):
                    closed["at"] = now
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        victim.signal(signal.SIGTERM)
        sent = time.monotonic()
        watcher.start()
        assert victim.wait(60) == 0, victim.log()
        watcher.join(10)
        before = sum(committed.values())
        assert wait_until(lambda: sum(committed.values()) >= before + 300, timeout=60)   # the others carry on
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert "at" in marked_down and "at" in closed, (marked_down, closed, haproxy.status())
    assert marked_down["at"] < closed["at"], (marked_down["at"] - sent, closed["at"] - sent)
    assert closed["at"] - sent >= UNREADY_DELAY - 0.5
    assert counts["reconnects"] > 0                       # some clients were on it, and moved
    with psycopg.connect(pg.dsn(), autocommit=True) as owner:
        rows = dict(owner.execute(f"SELECT client, count(*) FROM {table} GROUP BY client").fetchall())
        owner.execute(f"DROP TABLE {table}")
    assert rows == committed                               # every transaction committed once, none lost
    print(f"\nSIGTERM under load: {sum(committed.values())} transactions by {CLIENTS} clients, 0 failed; "
          f"{counts['reconnects']} reconnects after 57P01, {counts['connect_retries']} connect retries; "
          f"HAProxy marked it down {marked_down['at'] - sent:.2f} s after SIGTERM, its listener closed "
          f"{closed['at'] - sent:.2f} s after")
