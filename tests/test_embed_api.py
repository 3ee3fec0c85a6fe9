"""The embedding API's contract (threadpool_proxy/embed.py, docs/embedding.md), against a real PostgreSQL.

Each entry point: start/serve with a dict (databases as connection URIs and
key=value strings), Proxy.address, wait_ready, stats() (under load, and equal to
SHOW POOLS at one frozen moment), reload(config), pause/resume, stop(timeout)
with a transaction in flight (it commits) and past its timeout (it does not),
the event hook (what it is told; a slow or raising hook slows or breaks nothing),
ConfigError without the password, and the logger names the manual documents.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time

import psycopg
import pytest

import threadpool_proxy
from threadpool_proxy import events as ev
from helpers import PASSWORDS, connect, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTEN = {"host": "127.0.0.1", "port": 0}


def uri(pg, user="app", dbname="appdb", password=None):
    return f"postgresql://{user}:{password or PASSWORDS[user]}@{pg.host}:{pg.port}/{dbname}"


@pytest.fixture
def started():
    """``started(config, **kw)`` -> a started Proxy, stopped at teardown."""
    proxies = []

    def make(config, **kw):
        proxy = threadpool_proxy.start(config, **kw)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


def trust_config(pg, **overrides):
    """Proxy-terminated trust auth for trustuser (the server trusts it too): logins need no slot."""
    config = {"listen": LISTEN, "auth_type": "trust", "pool_mode": "transaction", "pool_size": 2,
              "databases": {"appdb": {"host": pg.host, "port": pg.port}}}
    config.update(overrides)
    return config


def trust_conn(proxy, autocommit=True):
    return psycopg.connect(host=proxy.address.host, port=proxy.address.port, user="trustuser", dbname="appdb",
                           autocommit=autocommit, connect_timeout=10)


# -- start/serve with connection strings ------------------------------------------------

def test_databases_given_as_a_uri_and_a_key_value_string_are_served(pg, started):
    proxy = started({"listen": LISTEN, "databases": {
        "app_uri": uri(pg) + "?sslmode=prefer&application_name=ignored",
        "app_kv": f"host={pg.host} port={pg.port} dbname=appdb user=app password='{PASSWORDS['app']}'",
    }})
    for name in ("app_uri", "app_kv"):
        with psycopg.connect(pg.dsn(host=proxy.host, port=proxy.port, dbname=name), autocommit=True) as conn:
            assert conn.execute("SELECT current_database(), current_user").fetchone() == ("appdb", "app")


def test_serve_is_a_context_manager_and_address_has_no_unix_socket(pg):
    proxy = threadpool_proxy.serve({"listen": LISTEN, "databases": {"appdb": uri(pg)}})
    with pytest.raises(RuntimeError, match="not started"):
        proxy.address
    with proxy:
        address = proxy.address
        assert isinstance(address, threadpool_proxy.Address)
        assert address.host == "127.0.0.1" and address.port > 0 and address.unix_socket is None
        assert (proxy.host, proxy.port) == address[:2]
        with connect(pg, proxy) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert proxy.stopped
    with pytest.raises(OSError):
        socket.create_connection((address.host, address.port), timeout=2).close()


def test_a_bad_connection_string_is_a_config_error_that_never_shows_the_password(pg, caplog):
    secret = "hunter2-very-secret"
    bad = {
        f"postgresql://app:{secret}@/appdb": "no host",
        f"host=/tmp port=5432 password={secret}": "unix-socket directory",
        f"host=h password={secret} sslmode=verify-full": "server_tls_sslmode",
        f"host=h password='{secret}": "unterminated",
        f"postgresql://app:{secret}@h:99999/appdb": "port",
        f"host=h password={secret} sslcert=/x": "server_tls_cert_file",
    }
    caplog.set_level(logging.DEBUG, logger="threadpool_proxy")
    for text, expected in bad.items():
        with pytest.raises(threadpool_proxy.ConfigError) as info:
            threadpool_proxy.start({"listen": LISTEN, "databases": {"app": text}})
        message = str(info.value)
        assert message.startswith("databases.app.dsn: ") and expected in message, message
        assert secret not in message and secret not in repr(info.value)
    assert secret not in caplog.text


def test_wait_ready_for_a_proxy_serving_from_another_thread(pg):
    proxy = threadpool_proxy.Proxy({"listen": LISTEN, "databases": {"appdb": uri(pg)}})
    assert proxy.wait_ready(0.05) is False               # not started yet
    runner = threading.Thread(target=proxy.serve_forever, daemon=True)
    runner.start()
    try:
        assert proxy.wait_ready(10) is True
        with connect(pg, proxy) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
    finally:
        proxy.stop()
    runner.join(10)
    assert not runner.is_alive()
    assert proxy.wait_ready(0) is False                  # stopped


def test_wait_ready_raises_what_start_raised(pg):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        proxy = threadpool_proxy.Proxy({"listen": {"host": "127.0.0.1", "port": taken.getsockname()[1]},
                                        "databases": {"appdb": uri(pg)}})
        runner = threading.Thread(target=lambda: pytest.raises(OSError, proxy.serve_forever), daemon=True)
        runner.start()
        with pytest.raises(OSError):
            proxy.wait_ready(10)
        runner.join(10)
    finally:
        taken.close()


# -- stats() ----------------------------------------------------------------------------

def show_pools(pg, proxy):
    with psycopg.connect(pg.dsn(user="app", host=proxy.host, port=proxy.port, dbname="pgbouncer"),
                         autocommit=True) as conn:
        cur = conn.execute("SHOW POOLS")
        names = [d.name for d in cur.description]
        return {(r[0], r[1]): dict(zip(names, r)) for r in cur.fetchall()}


def test_stats_equal_show_pools_at_a_frozen_moment(pg, started):
    """2 clients in transactions hold both connections, 2 more wait: stats() says what SHOW POOLS says."""
    proxy = started(trust_config(pg, admin_users=["app"], databases={
        "appdb": {"host": pg.host, "port": pg.port},
        "*": {"host": pg.host, "port": pg.port, "auth_type": "passthrough"}}))
    conns = [trust_conn(proxy) for _ in range(4)]
    waiting = []
    try:
        for conn in conns[:2]:
            conn.execute("BEGIN")
            conn.execute("SELECT 1")
        for conn in conns[2:]:
            t = threading.Thread(target=conn.execute, args=("SELECT 1",), daemon=True)
            t.start()
            waiting.append(t)
        pool = wait_until(lambda: (p := proxy.stats().pool("appdb", "trustuser")) and p.cl_waiting == 2 and p)
        assert pool, proxy.stats()
        before = proxy.stats()
        row = show_pools(pg, proxy)[("appdb", "trustuser")]
        after = proxy.stats()
        for stats in (before, after):
            p = stats.pool("appdb", "trustuser")
            assert (p.cl_active, p.cl_waiting, p.sv_active, p.sv_idle, p.sv_login, p.pool_mode) == (
                row["cl_active"], row["cl_waiting"], row["sv_active"], row["sv_idle"], row["sv_login"],
                row["pool_mode"]) == (2, 2, 2, 0, 0, "transaction")
        shown_wait = row["maxwait"] + row["maxwait_us"] / 1e6
        assert before.pool("appdb", "trustuser").maxwait <= shown_wait + 1e-3
        assert shown_wait <= after.pool("appdb", "trustuser").maxwait + 1e-3
        # the clients and servers records: who holds what
        clients = [c for c in after.clients if c.database == "appdb"]
        assert sorted(c.state for c in clients) == ["active", "active", "waiting", "waiting"]
        servers = {s.id: s for s in after.servers if s.database == "appdb"}
        assert len(servers) == 2 and all(s.state == "active" for s in servers.values())
        holders = {c.server_id: c.id for c in clients if c.state == "active"}
        assert holders.keys() == servers.keys()
        assert all(servers[sid].client_id == cid for sid, cid in holders.items())
        with psycopg.connect(pg.dsn(user="postgres", dbname="appdb"), autocommit=True) as direct:
            pids = {r[0] for r in direct.execute(
                "SELECT pid FROM pg_stat_activity WHERE usename = 'trustuser'").fetchall()}
        assert {s.remote_pid for s in servers.values()} <= pids
        assert after.totals.clients == 4 and after.totals.servers >= 2
    finally:
        for conn in conns[:2]:
            conn.execute("COMMIT")
        for t in waiting:
            t.join(10)
        for conn in conns:
            conn.close()


def test_stats_under_load_stay_consistent_and_add_up(pg, started):
    proxy = started(trust_config(pg, admin_users=["app"], databases={
        "appdb": {"host": pg.host, "port": pg.port},
        "*": {"host": pg.host, "port": pg.port, "auth_type": "passthrough"}}))
    clients, per_client = 6, 40
    conns = [trust_conn(proxy) for _ in range(clients)]
    done = []
    stop = threading.Event()

    def work(conn):
        n = 0
        for _ in range(per_client):
            with conn.transaction():
                conn.execute("SELECT pg_sleep(0.001)")
            n += 1
        done.append(n)

    threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    samples, last_xacts = 0, 0
    try:
        while any(t.is_alive() for t in threads) and not stop.is_set():
            stats = proxy.stats()
            pool = stats.pool("appdb", "trustuser")
            assert pool.cl_active + pool.cl_waiting == clients
            assert pool.sv_active + pool.sv_idle <= 2                     # pool_size
            assert pool.sv_active == sum(1 for s in stats.servers if s.database == "appdb" and s.state == "active")
            server_ids = {s.id for s in stats.servers}
            assert all(c.server_id in server_ids for c in stats.clients if c.server_id is not None)
            xacts = stats.database("appdb").xact_count
            assert xacts >= last_xacts                                    # totals never go down
            last_xacts = xacts
            samples += 1
            time.sleep(0.01)
    finally:
        for t in threads:
            t.join(60)
    assert samples >= 5 and sum(done) == clients * per_client
    final = proxy.stats().database("appdb")
    assert final.xact_count == clients * per_client
    assert final.client_login_count == clients
    assert final.server_assignment_count >= clients
    with psycopg.connect(pg.dsn(user="app", host=proxy.host, port=proxy.port, dbname="pgbouncer"),
                         autocommit=True) as console:
        cur = console.execute("SHOW STATS")
        names = [d.name for d in cur.description]
        row = next(dict(zip(names, r)) for r in cur.fetchall() if r[0] == "appdb")
    assert row["total_xact_count"] == final.xact_count
    assert row["total_query_count"] == final.query_count
    assert abs(row["total_xact_time"] - final.xact_time * 1e6) <= 1
    for conn in conns:
        conn.close()


# -- reload(config), pause/resume ---------------------------------------------------------

def test_reload_with_a_new_config_and_a_bad_one_changes_nothing(pg, started):
    proxy = started({"listen": LISTEN, "pool_mode": "transaction", "databases": {"appdb": uri(pg)}})
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(pg.dsn(host=proxy.host, port=proxy.port, dbname="renamed"), connect_timeout=10)
    new = proxy.reload({"listen": LISTEN, "pool_mode": "transaction", "pool_size": 3,
                        "databases": {"appdb": uri(pg), "renamed": uri(pg)}})
    assert new.databases["renamed"].dbname == "appdb" and proxy.config.pool_size == 3
    with psycopg.connect(pg.dsn(host=proxy.host, port=proxy.port, dbname="renamed"), autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("appdb",)
    with pytest.raises(threadpool_proxy.ConfigError, match="pool_size"):
        proxy.reload({"listen": LISTEN, "pool_size": -1, "databases": {"appdb": uri(pg)}})
    assert proxy.config.pool_size == 3 and "renamed" in proxy.config.databases


def test_pause_waits_for_the_running_transaction_and_resume_lets_the_held_one_go(pg, started):
    proxy = started(trust_config(pg))
    a, b = trust_conn(proxy), trust_conn(proxy)
    results: list = []
    try:
        a.execute("BEGIN")
        a.execute("SELECT 1")
        assert proxy.pause("appdb", timeout=0.3) is False             # a's transaction still runs
        a.execute("COMMIT")                                           # (it holds its connection: not held)
        proxy.resume("appdb")
        a.execute("BEGIN")
        a.execute("SELECT 1")
        pausing = threading.Thread(target=lambda: results.append(proxy.pause("appdb", timeout=10)), daemon=True)
        pausing.start()
        time.sleep(0.3)
        assert results == []                                          # waiting for a's transaction
        a.execute("COMMIT")
        pausing.join(10)
        assert results == [True]
        held: list = []
        t = threading.Thread(target=lambda: held.append(b.execute("SELECT 42").fetchone()), daemon=True)
        t.start()
        t.join(0.5)
        assert held == [] and proxy.stats().pool("appdb", "trustuser").cl_waiting == 1
        proxy.resume()
        t.join(10)
        assert held == [(42,)]
        with pytest.raises(ValueError, match="nothing is paused"):
            proxy.resume()
        with pytest.raises(ValueError, match="nosuchdb"):
            proxy.pause("nosuchdb")
        assert proxy.pause(timeout=5) is True                         # everything
        with pytest.raises(ValueError, match="paused already"):
            proxy.pause()
        proxy.resume()
        assert a.execute("SELECT 3").fetchone() == (3,)
    finally:
        a.close()
        b.close()


# -- stop(timeout) --------------------------------------------------------------------------

def test_stop_with_a_timeout_lets_the_transaction_in_flight_commit(pg, started):
    proxy = started({"listen": LISTEN, "pool_mode": "transaction", "databases": {"appdb": uri(pg)}})
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        direct.execute("CREATE TABLE IF NOT EXISTS embed_stop (note text)")
        direct.execute("DELETE FROM embed_stop")
    conn = connect(pg, proxy, autocommit=False)
    conn.execute("INSERT INTO embed_stop VALUES ('in flight')")
    stopper = threading.Thread(target=proxy.stop, kwargs={"timeout": 20}, daemon=True)
    t0 = time.monotonic()
    stopper.start()
    assert wait_until(lambda: proxy.stopping, timeout=5)
    with pytest.raises(OSError):                                       # no new clients
        socket.create_connection((proxy.host, proxy.port), timeout=2).close()
    time.sleep(0.3)
    assert stopper.is_alive()                                          # it waits for the transaction
    conn.commit()                                                      # the commit goes through
    stopper.join(15)
    assert not stopper.is_alive() and time.monotonic() - t0 < 10
    assert proxy.stopped
    with pytest.raises(psycopg.OperationalError):                      # then it was disconnected
        conn.execute("SELECT 1")
    conn.close()
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        assert direct.execute("SELECT note FROM embed_stop").fetchall() == [("in flight",)]


def test_stop_past_its_timeout_disconnects_the_transaction_which_rolls_back(pg, started):
    proxy = started({"listen": LISTEN, "pool_mode": "transaction", "databases": {"appdb": uri(pg)}})
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        direct.execute("CREATE TABLE IF NOT EXISTS embed_stop2 (note text)")
        direct.execute("DELETE FROM embed_stop2")
    conn = connect(pg, proxy, autocommit=False)
    conn.execute("INSERT INTO embed_stop2 VALUES ('never committed')")
    t0 = time.monotonic()
    proxy.stop(timeout=0.5)
    assert 0.4 <= time.monotonic() - t0 < 8
    with pytest.raises(psycopg.OperationalError):
        conn.commit()
    conn.close()
    with psycopg.connect(pg.dsn(), autocommit=True) as direct:
        assert direct.execute("SELECT count(*) FROM embed_stop2").fetchone() == (0,)
    with pytest.raises(ValueError):
        proxy.stop(timeout=-1)


# -- the event hook ----------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def __call__(self, event):
        with self.lock:
            self.events.append(event)

    def kinds(self):
        with self.lock:
            return [e.kind for e in self.events]

    def of(self, kind):
        with self.lock:
            return [e for e in self.events if e.kind == kind]


def test_the_hook_hears_logins_servers_waits_releases_cancels_and_errors(pg, started):
    rec = Recorder()
    proxy = started(trust_config(pg, pool_size=1, server_linger=False), on_event=rec)
    a = trust_conn(proxy)
    a_pid = a.execute("SELECT pg_backend_pid()").fetchone()[0]
    b = trust_conn(proxy)
    a.execute("BEGIN")
    a.execute("SELECT 1")                        # a holds the only server connection
    outcome = []

    def b_waits():
        try:
            b.execute("SELECT 2")
        except psycopg.errors.QueryCanceled as exc:
            outcome.append(exc.sqlstate)

    waiting = threading.Thread(target=b_waits, daemon=True)
    waiting.start()
    assert wait_until(lambda: rec.of(ev.POOL_WAIT))
    # cancel_safe(), not cancel(): libpq's PQcancel holds the GIL while it waits, and this proxy is in-process
    b.cancel_safe(timeout=10)                    # b waits for a connection: its wait ends
    waiting.join(10)
    assert outcome == ["57014"]
    a.cancel_safe(timeout=10)                    # a holds one: forwarded to its backend (idle: nothing to stop)
    a.execute("COMMIT")
    assert b.execute("SELECT 3").fetchone() == (3,)
    a.close()
    b.close()
    # (a release and a logout are told by the client's thread after the client had its answer: wait for them)
    assert wait_until(lambda: len(rec.of(ev.CLIENT_LOGOUT)) == 2
                      and {e.client_id for e in rec.of(ev.SERVER_RELEASE)} == {e.client_id for e in rec.of(ev.CLIENT_LOGIN)})
    logins = rec.of(ev.CLIENT_LOGIN)
    assert [(e.database, e.user, e.detail) for e in logins] == [("appdb", "trustuser", "transaction")] * 2
    a_id, b_id = logins[0].client_id, logins[1].client_id
    opened = rec.of(ev.SERVER_OPEN)
    assert len(opened) == 1 and opened[0].server_pid == a_pid and opened[0].detail == f"{pg.host}:{pg.port}"
    assert b_id in [e.client_id for e in rec.of(ev.POOL_WAIT)]       # (a may have waited too, for b's release)
    assert [(e.client_id, e.detail, e.server_pid) for e in rec.of(ev.CANCEL)] == [
        (b_id, "ended a wait", 0), (a_id, "forwarded", a_pid)]
    releases = rec.of(ev.SERVER_RELEASE)
    assert {e.client_id for e in releases} == {a_id, b_id}
    assert all(e.server_pid == a_pid for e in releases)              # one connection, handed back and forth
    assert sorted(e.client_id for e in rec.of(ev.CLIENT_LOGOUT)) == [a_id, b_id]
    # A release is told after its transaction (once the client has its answer) but carries the
    # transaction's start: before the client's next event, and its logout.
    logout = {e.client_id: e.monotonic for e in rec.of(ev.CLIENT_LOGOUT)}
    login = {e.client_id: e.monotonic for e in logins}
    assert all(login[e.client_id] < e.monotonic < logout[e.client_id] for e in releases)
    kinds = rec.kinds()
    assert kinds.index(ev.CLIENT_LOGIN) < kinds.index(ev.POOL_WAIT) < kinds.index(ev.CANCEL)   # emission order
    proxy.stop()
    closed = rec.of(ev.SERVER_CLOSE)
    assert [e.server_pid for e in closed] == [a_pid] and "shutting down" in closed[0].detail


def test_the_hook_hears_a_refused_transaction_block_and_the_proxys_own_error(pg, started):
    rec = Recorder()
    proxy = started(trust_config(pg, pool_mode="statement"), on_event=rec)
    conn = trust_conn(proxy)
    with pytest.raises(psycopg.OperationalError, match="transaction blocks not allowed"):
        conn.execute("BEGIN")
    conn.close()
    assert proxy.events.flush(10)
    refused = rec.of(ev.STATEMENT_REFUSED)
    errors = rec.of(ev.PROXY_ERROR)
    assert [(e.sqlstate, e.detail) for e in refused] == [("08P01", "transaction blocks not allowed in statement "
                                                                   "pooling mode")]
    assert [e.sqlstate for e in errors] == ["08P01"] and errors[0].client_id == refused[0].client_id


def test_statements_prepared_again_on_another_server_connection_are_told(pg, started):
    rec = Recorder()
    proxy = started(trust_config(pg, pool_size=2, server_linger=False), on_event=rec)
    a, b = trust_conn(proxy), trust_conn(proxy)

    def all_parked():
        pool = proxy.stats().pool("appdb", "trustuser")
        return pool is not None and pool.sv_idle >= 1 and pool.sv_active == 0

    a.execute("SELECT %s::int", [1], prepare=True)         # prepared on the connection a took
    assert wait_until(all_parked)                          # a gave it back: it is the last one parked
    b.execute("BEGIN")                                     # b takes that one (LIFO) and keeps it
    b.execute("SELECT 1")
    assert a.execute("SELECT %s::int", [2], prepare=True).fetchone() == (2,)   # on the other one: prepared again
    b.execute("COMMIT")
    a.close()
    b.close()
    assert wait_until(lambda: len(rec.of(ev.CLIENT_LOGOUT)) == 2)     # (told after the clients' last answers)
    again = rec.of(ev.STATEMENT_REPREPARED)
    assert sum(e.number for e in again) == 1 and again[0].client_id == rec.of(ev.CLIENT_LOGIN)[0].client_id


def test_a_slow_hook_and_a_raising_hook_neither_slow_nor_break_the_proxy(pg, started, caplog):
    rec = Recorder()
    calls = []

    def slow(event):
        time.sleep(0.2)
        calls.append(event)

    def broken(event):
        raise RuntimeError("hook bug")

    caplog.set_level(logging.INFO, logger="threadpool_proxy.events")
    proxy = started(trust_config(pg, pool_size=1, server_linger=False), on_event=slow)
    proxy.add_event_hook(broken)
    proxy.add_event_hook(rec)
    t0 = time.monotonic()
    for _ in range(10):                                   # 10 logins, 30 transactions: ~70 events
        with trust_conn(proxy) as conn:
            for i in range(3):
                assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)
    elapsed = time.monotonic() - t0
    queued = len(calls)
    assert elapsed < 5, f"the proxy waited for its hooks: {elapsed:.1f} s"
    assert queued < 20              # the slow hook had seen only a few of the events when the clients were done
    proxy.remove_event_hook(slow)
    assert wait_until(lambda: rec.kinds().count(ev.CLIENT_LOGOUT) == 10, timeout=30)
    assert rec.kinds().count(ev.CLIENT_LOGIN) == 10
    assert proxy.events.failures >= 20
    tracebacks = [r for r in caplog.records if "hook bug" in (r.exc_text or "")]
    assert len(tracebacks) == 1                            # the first failure, with its traceback; then counts
    with trust_conn(proxy) as conn:
        assert conn.execute("SELECT 7").fetchone() == (7,)


def test_events_beyond_the_queue_limit_are_dropped_and_counted():
    hub = ev.EventHub(max_queued=5)
    gate = threading.Event()
    seen = []
    hub.add(lambda e: (gate.wait(10), seen.append(e)))
    for i in range(20):
        hub.emit(ev.CLIENT_LOGIN, client_id=i)
    assert 14 <= hub.dropped <= 15                          # (the dispatcher may hold one already)
    gate.set()
    assert hub.flush(10)
    assert [e.client_id for e in seen] == list(range(20 - hub.dropped))
    assert hub.close(10)


def test_server_linger_off_releases_at_every_transaction_end(pg, started):
    """What the pytest plugin runs with: state that does not follow the client or pin it (here a temporary
    table with pinning off) does not survive a transaction's end; with pinning on, the table pins the client."""
    proxy = started(trust_config(pg, server_linger=False, pin_on=[]))
    with trust_conn(proxy) as conn:
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM scratch")
    pinning = started(trust_config(pg, server_linger=False))
    with trust_conn(pinning) as conn:
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        assert conn.execute("SELECT count(*) FROM scratch").fetchone() == (0,)
        assert [c.pinned for c in pinning.stats().clients] == ["temp_table"]
        conn.execute("DISCARD TEMP")
        assert [c.pinned for c in pinning.stats().clients] == [""]
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM scratch")
    lingering = started(trust_config(pg))
    with trust_conn(lingering) as conn:                     # alone, it keeps its connection: it "works"
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        assert conn.execute("SELECT count(*) FROM scratch").fetchone() == (0,)


# -- documented logger names -------------------------------------------------------------------

def test_the_manual_lists_every_logger_the_package_uses():
    names = set()
    package = os.path.join(REPO, "threadpool_proxy")
    for module in os.listdir(package):
        if module.endswith(".py"):
            with open(os.path.join(package, module), encoding="utf-8") as f:
                text = f.read()
            for match in re.finditer(r"(?:getLogger|get_logger)\((__name__|\"[\w.]+\")\)", text):
                arg = match.group(1)
                names.add(f"threadpool_proxy.{module[:-3]}" if arg == "__name__" else arg.strip('"'))
    names.discard("threadpool_proxy.__main__")
    with open(os.path.join(REPO, "docs", "embedding.md"), encoding="utf-8") as f:
        documented = set(re.findall(r"^\| `(threadpool_proxy[\w.]*)` \|", f.read(), re.M))
    assert names <= documented, sorted(names - documented)
    assert documented <= names | {"threadpool_proxy"}, sorted(documented - names)
