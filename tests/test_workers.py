"""``workers: 2``: the command line as a real subprocess with two worker processes on one port.

Which worker the kernel gives a connection (SO_REUSEPORT) cannot be chosen,
so the tests look at what the admin console's SHOW WORKERS reports per
worker, and repeat a step until the case they need happened (each attempt
has an even chance), rather than hoping for it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest
import yaml

from helpers import cancel_packet, login_with_key, parse_error_fields, query, read_until_ready, wait_until
from threadpool_proxy.pgcluster import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class WorkersProxy:
    """``python -m threadpool_proxy -c proxy.yaml`` with workers: 2; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, pg, tmp_path, **settings) -> None:
        self.pg = pg
        self.host, self.port = "127.0.0.1", free_port()
        raw = {"listen": {"host": self.host, "port": self.port}, "workers": 2, "pool_mode": "transaction",
               "pool_size": 4, "admin_users": ["app"], "query_wait_timeout": 30,
               "databases": {"*": {"host": pg.host, "port": pg.port}}}
        raw.update(settings)
        self.conf = tmp_path / "proxy.yaml"
        self.conf.write_text(yaml.safe_dump(raw))
        self.log_path = tmp_path / "proxy.log"
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "threadpool_proxy", "-c", str(self.conf)],
                                         cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        assert wait_until(lambda: "worker processes" in self.log() or self.proc.poll() is not None, timeout=60), \
            self.log()
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(self, user="app", dbname="appdb", **kw):
        return psycopg.connect(self.pg.dsn(user=user, dbname=dbname, host=self.host, port=self.port,
                                           connect_timeout=30), autocommit=True, prepare_threshold=None, **kw)

    def show(self, what: str) -> list[dict]:
        with self.connect(dbname="pgbouncer") as conn:
            cur = conn.execute(f"SHOW {what}")
            names = [d.name for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def workers(self) -> list[dict]:
        return self.show("WORKERS")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        return self.proc.returncode

    def kill_all(self, worker_pids=()) -> None:
        """Cleanup on failure: the supervisor and any worker still there."""
        for pid in [self.proc.pid, *worker_pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


@pytest.fixture
def workers_proxy(pg, tmp_path):
    started = []

    def make(**settings):
        proxy = WorkersProxy(pg, tmp_path, **settings)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        pids = []
        if proxy.proc.poll() is None:
            try:
                pids = [w["pid"] for w in proxy.workers()]
            except psycopg.Error:
                pass
        if proxy.stop() is None:
            proxy.kill_all(pids)
        survivors = [pid for pid in pids if not wait_until(lambda: not _alive(pid), timeout=20)]
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not survivors, f"workers {survivors} outlived their supervisor's stop: {proxy.log()}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def test_both_workers_accept_clients_and_the_console_shows_them_all(pg, workers_proxy):
    proxy = workers_proxy()
    conns = [proxy.connect() for _ in range(16)]
    try:
        for i, conn in enumerate(conns):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        # (a console connection of an earlier SHOW may take a moment to leave)
        workers = wait_until(lambda: (ws := proxy.workers()) and sum(w["console_clients"] for w in ws) == 1 and ws,
                             timeout=20) or proxy.workers()
        assert [w["worker"] for w in workers] == [0, 1]
        assert len({w["pid"] for w in workers}) == 2
        assert all(_ppid(w["pid"]) == proxy.proc.pid for w in workers)
        # 16 connections spread by the kernel: both workers took some (all on one: p = 2^-15)
        assert all(w["clients"] >= 1 for w in workers), workers
        assert sum(w["clients"] for w in workers) == 16
        assert sum(w["console_clients"] for w in workers) == 1
        # the console of whichever worker shows every client of both
        clients = [c for c in proxy.show("CLIENTS") if c["database"] == "appdb"]
        assert len(clients) == 16
        assert len({c["id"] for c in clients}) == 16 and len({c["ptr"] for c in clients}) == 16
        lists = wait_until(lambda: (ls := {r["list"]: r["items"] for r in proxy.show("LISTS")})
                           and ls["used_clients"] == 17 and ls, timeout=20)
        assert lists and lists["pools"] == 1 and lists["users"] == 1, proxy.show("LISTS")
        pools = proxy.show("POOLS")
        assert [(p["database"], p["user"], p["cl_active"]) for p in pools] == [("appdb", "app", 16)]
        stats = {r["database"]: r for r in proxy.show("STATS_TOTALS")}
        assert stats["appdb"]["total_xact_count"] >= 16
        databases = {d["name"]: d for d in proxy.show("DATABASES")}
        assert databases["*"]["pool_size"] == 4               # as configured, not one worker's share
        assert databases["*"]["current_client_connections"] == 16
        config = {r["key"]: r["value"] for r in proxy.show("CONFIG")}
        assert config["pool_size"] == "4" and config["workers"] == "2"
    finally:
        for conn in conns:
            conn.close()
    assert proxy.stop() == 0


def _trust_login(proxy) -> tuple[socket.socket, int, int]:
    """A raw client logged in as trustuser: (socket, pid, secret) of its BackendKeyData."""
    return login_with_key(proxy.host, proxy.port)


def _cancel(proxy, pid: int, secret: int) -> None:
    with socket.create_connection((proxy.host, proxy.port), timeout=30) as s:
        s.sendall(cancel_packet(pid, secret))
        s.settimeout(30)
        assert s.recv(1) == b""          # the proxy closes it once the cancel went on


@pytest.mark.parametrize("pool_mode", ["transaction", "session"])
def test_a_cancel_that_reaches_the_other_worker_is_forwarded_to_the_owner(pg, workers_proxy, pool_mode):
    """The CancelRequest's connection lands on either worker; repeat until one landed on the
    other (SHOW WORKERS counts the forwarded ones), and check every attempt canceled the query."""
    proxy = workers_proxy(pool_mode=pool_mode)
    forwarded = 0
    for attempt in range(40):
        sock, pid, secret = _trust_login(proxy)
        try:
            if pool_mode == "session":           # the real backend pid, with the proxy's secret
                query(sock, "SELECT pg_backend_pid()")
                rows = [b for k, b in read_until_ready(sock) if k == "D"]
                assert int(rows[0][6:]) == pid
            query(sock, "SELECT pg_sleep(60)")
            assert wait_until(lambda: _sleeping_any(pg, "SELECT pg_sleep(60)"), timeout=20)
            before = sum(w["cancels_forwarded"] for w in proxy.workers())
            _cancel(proxy, pid, secret)
            messages = read_until_ready(sock)
            errors = [parse_error_fields(b) for k, b in messages if k == "E"]
            assert [e["C"] for e in errors] == ["57014"], messages
            after = sum(w["cancels_forwarded"] for w in proxy.workers())
            forwarded += after - before
        finally:
            sock.close()
        if forwarded:
            break
    assert forwarded, "40 cancel requests all reached the worker that owned their key (p = 2^-40)"
    assert proxy.stop() == 0


def test_a_forged_cancel_key_cancels_nothing_in_any_worker(pg, workers_proxy):
    proxy = workers_proxy()
    sock, pid, secret = _trust_login(proxy)
    try:
        query(sock, "SELECT pg_sleep(1.5)")
        assert wait_until(lambda: _sleeping_any(pg, "SELECT pg_sleep(1.5)"), timeout=20)
        for forged in (secret ^ 2, secret ^ 1, secret ^ 0x100):     # same owner; the other owner; same owner
            _cancel(proxy, pid, forged)
        messages = read_until_ready(sock)
        assert [k for k, _ in messages if k == "E"] == []
    finally:
        sock.close()


def _sleeping_any(pg, sql) -> bool:
    with pg.superuser_conn() as conn:
        return bool(conn.execute("SELECT 1 FROM pg_stat_activity WHERE query = %s AND state = 'active'",
                                 (sql,)).fetchall())


def test_pool_size_is_divided_between_workers(pg, workers_proxy, auth_file):
    """pool_size 4, 2 workers, 10 clients each holding a transaction: PostgreSQL never sees more than 4."""
    proxy = workers_proxy(auth_type="scram-sha-256", auth_file=auth_file)
    stop, peak, samples = threading.Event(), [0], [0]

    def monitor():
        with pg.superuser_conn() as conn:
            while not stop.is_set():
                n = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                                 "AND datname = 'appdb'").fetchone()[0]
                peak[0], samples[0] = max(peak[0], n), samples[0] + 1
                time.sleep(0.02)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    errors = []

    def client(i):
        try:
            with proxy.connect() as conn:
                with conn.transaction():
                    conn.execute("SELECT pg_sleep(0.3)")
                    assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        except Exception as exc:            # reported below, with the others
            errors.append(repr(exc))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        stop.set()
        watcher.join(10)
    assert errors == []
    assert samples[0] > 10
    assert 2 <= peak[0] <= 4, peak[0]
    workers = proxy.workers()
    assert all(w["servers"] <= 2 for w in workers), workers        # each worker's share: 4 // 2
    assert proxy.stop() == 0


def test_a_killed_worker_is_restarted_and_clients_connect_again(pg, workers_proxy):
    proxy = workers_proxy()
    before = proxy.workers()
    victim = before[1]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: f"pid {victim}) died (killed by SIGKILL)" in proxy.log(), timeout=30), proxy.log()

    def replaced():
        try:
            pids = [w["pid"] for w in proxy.workers()]
        except psycopg.Error:
            return False
        return len(pids) == 2 and victim not in pids and pids

    pids = wait_until(replaced, timeout=60)
    assert pids, proxy.log()
    assert before[0]["pid"] in pids
    assert "worker 1 restarted" in proxy.log()
    assert all(_ppid(pid) == proxy.proc.pid for pid in pids)
    conns = [proxy.connect() for _ in range(12)]
    try:
        for conn in conns:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        workers = proxy.workers()
        assert all(w["clients"] >= 1 for w in workers), workers     # the new worker takes clients too
    finally:
        for conn in conns:
            conn.close()
    assert proxy.stop() == 0


def test_sigterm_to_the_supervisor_stops_every_worker_and_exits_zero(pg, workers_proxy):
    proxy = workers_proxy()
    pids = [w["pid"] for w in proxy.workers()]
    conn = proxy.connect()
    assert conn.execute("SELECT 1").fetchone() == (1,)
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(60) == 0, proxy.log()
    assert wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with pytest.raises(OSError):
        socket.create_connection((proxy.host, proxy.port), timeout=5).close()
    assert "threadpool_proxy stopped (2 workers)" in proxy.log()


def test_shutdown_on_the_console_stops_every_worker(pg, workers_proxy):
    proxy = workers_proxy()
    pids = [w["pid"] for w in proxy.workers()]
    with proxy.connect(dbname="pgbouncer") as conn:
        conn.execute("SHUTDOWN")
    assert proxy.proc.wait(60) == 0, proxy.log()
    assert wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=10)


def test_sighup_reloads_every_worker_with_its_share(pg, workers_proxy):
    proxy = workers_proxy()
    raw = yaml.safe_load(proxy.conf.read_text())
    raw["pool_size"] = 6
    proxy.conf.write_text(yaml.safe_dump(raw))
    proxy.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: proxy.log().count("configuration reloaded") >= 2, timeout=30), proxy.log()
    assert "[worker 0]" in proxy.log() and "[worker 1]" in proxy.log()
    databases = {d["name"]: d for d in proxy.show("DATABASES")}
    assert databases["*"]["pool_size"] == 6
    assert proxy.stop() == 0


def test_a_port_in_use_fails_start_up_before_any_worker(pg, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        conf = tmp_path / "proxy.yaml"
        conf.write_text(yaml.safe_dump({"listen": {"host": "127.0.0.1", "port": port}, "workers": 2,
                                        "databases": {"*": {"host": pg.host, "port": pg.port}}}))
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        r = subprocess.run([sys.executable, "-m", "threadpool_proxy", "-c", str(conf)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "worker" not in r.stderr.lower()


def test_metrics_add_up_every_worker(pg, workers_proxy):
    import urllib.request
    port = free_port()
    proxy = workers_proxy(metrics_listen=f"127.0.0.1:{port}")
    conns = [proxy.connect() for _ in range(10)]
    try:
        for conn in conns:
            conn.execute("SELECT 1")
        assert all(w["clients"] >= 1 for w in proxy.workers())

        def scrape() -> dict:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
            return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines() if line and not line.startswith("#")}

        m = wait_until(lambda: (m := scrape())["threadpool_proxy_clients"] == 10 and m, timeout=30)
        assert m, scrape()
        assert m["threadpool_proxy_workers"] == 2
        assert m['threadpool_proxy_pools_client_active_connections{database="appdb",user="app"}'] == 10
        assert m['threadpool_proxy_stats_sql_transactions_pooled_total{database="appdb"}'] >= 10
    finally:
        for conn in conns:
            conn.close()
    assert proxy.stop() == 0


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(pg, workers_proxy):
    proxy = workers_proxy()
    pids = [w["pid"] for w in proxy.workers()]
    proxy.proc.kill()
    proxy.proc.wait(10)
    assert wait_until(lambda: not any(_alive(pid) for pid in pids), timeout=30), proxy.log()
    assert proxy.log().count("the supervisor (pid") == 2
    rundirs = set(re.findall(r"peer channel in (\S+)", proxy.log()))
    assert len(rundirs) == 1 and not os.path.exists(rundirs.pop())      # the last worker out removed it


def test_set_and_disable_on_the_console_reach_every_worker(pg, workers_proxy):
    proxy = workers_proxy()
    with proxy.connect(dbname="pgbouncer") as console:
        assert console.execute("SET pool_size = 6").statusmessage == "SET"
        assert console.execute("DISABLE appdb").statusmessage == "DISABLE"
    assert wait_until(lambda: proxy.log().count("SET pool_size = 6") >= 2, timeout=30), proxy.log()
    assert "[worker 0]" in proxy.log() and "[worker 1]" in proxy.log()
    # Whichever worker the kernel picks, appdb is refused: ten logins make both likely to be asked.
    for _ in range(10):
        with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
            proxy.connect()
    assert proxy.log().count("DISABLE appdb: new clients of it are refused") == 2, proxy.log()
    with proxy.connect(dbname="pgbouncer") as console:
        assert console.execute("ENABLE appdb").statusmessage == "ENABLE"
    for _ in range(4):
        with proxy.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.stop() == 0
