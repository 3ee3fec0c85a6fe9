"""Session-state tracking (issue 20 items 1-3) together with main's features it met in the merge.

- The event hooks hear pinning: a ``pin`` event (kind, statement, the server
  connection kept) once per pinning, and ``statement_refused`` with the
  SQLSTATE for a statement refused because it would pin (statement mode,
  max_pinned_clients); ``Proxy.stats()`` shows the pin as SHOW CLIENTS does.
- Cancels of pinned clients: 2,000 raw CancelRequests race pinned clients'
  statements and the DISCARD TEMP that unpins them, on a small pool shared
  with other clients: no other client's statement is ever canceled (main's
  cancel-in-flight marking holds for a connection a pinned client lets go),
  and the proxy's own query at the release point (which asks the server
  whether the state is gone) is never stopped by the client's cancel.
- [users] pool_mode overrides decide whether a user's clients are tracked.
"""

from __future__ import annotations

import collections
import logging
import random
import socket
import threading
import time

import psycopg
import pytest

import threadpool_proxy
from threadpool_proxy import events as ev

from helpers import cancel_packet, connect, login_with_key, parse_error_fields, query, read_until_ready, trust_session

LISTEN = {"host": "127.0.0.1", "port": 0}


@pytest.fixture
def started():
    proxies = []

    def make(config, **kw):
        proxy = threadpool_proxy.start(config, **kw)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


class Recorder:
    def __init__(self):
        self.events = []
        self.lock = threading.Lock()

    def __call__(self, event):
        with self.lock:
            self.events.append(event)

    def of(self, kind):
        with self.lock:
            return [e for e in self.events if e.kind == kind]


def trust_config(pg, **overrides):
    config = {"listen": LISTEN, "auth_type": "trust", "pool_mode": "transaction", "pool_size": 2,
              "databases": {"appdb": {"host": pg.host, "port": pg.port}}}
    config.update(overrides)
    return config


def trust_conn(proxy):
    return psycopg.connect(host=proxy.address.host, port=proxy.address.port, user="trustuser", dbname="appdb",
                           autocommit=True, connect_timeout=10)


def test_a_pin_is_told_to_the_hooks_once_with_its_statement_and_server(pg, started):
    rec = Recorder()
    proxy = started(trust_config(pg, server_linger=False), on_event=rec)
    with trust_conn(proxy) as conn:
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]     # the connection it is pinned to
        conn.execute("SELECT pg_advisory_lock(42)")                      # a second kind: no second pin event
        assert [c.pinned for c in proxy.stats().clients] == ["temp_table,advisory_lock"]
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert proxy.events.flush(10)
        pins = rec.of(ev.PIN)
        assert len(pins) == 1, pins
        assert pins[0].detail == "temp_table: CREATE TEMPORARY TABLE (CREATE TEMP TABLE scratch (x int))"
        assert pins[0].server_pid == pid and pins[0].database == "appdb" and pins[0].user == "trustuser"
        assert pins[0].client_id == rec.of(ev.CLIENT_LOGIN)[0].client_id
        conn.execute("DISCARD ALL")                                      # both undone: unpinned
        assert [c.pinned for c in proxy.stats().clients] == [""]
        conn.execute("CREATE TEMP TABLE again (x int)")                  # pinned anew: told again
        assert proxy.events.flush(10)
        assert [e.detail for e in rec.of(ev.PIN)][1:] == [
            "temp_table: CREATE TEMPORARY TABLE (CREATE TEMP TABLE again (x int))"]


def test_statements_refused_because_they_would_pin_are_told_with_their_sqlstate(pg, started):
    rec = Recorder()
    statement = started(trust_config(pg, pool_mode="statement"), on_event=rec)
    with trust_conn(statement) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="not supported in statement pooling mode"):
            conn.execute("CREATE TEMP TABLE scratch (x int)")
        assert conn.execute("SELECT 1").fetchone() == (1,)                # the client carries on
    assert statement.events.flush(10)
    assert [(e.sqlstate, e.detail) for e in rec.of(ev.STATEMENT_REFUSED)] == [
        ("0A000", "CREATE TEMPORARY TABLE is not supported in statement pooling mode")]
    assert rec.of(ev.PIN) == []

    rec2 = Recorder()
    limited = started(trust_config(pg, max_pinned_clients=0), on_event=rec2)
    with trust_conn(limited) as conn:
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded, match="max_pinned_clients"):
            conn.execute("SELECT pg_advisory_lock(7)")
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND pid = pg_backend_pid()").fetchone() == (0,)     # it did not run
    assert limited.events.flush(10)
    assert [(e.sqlstate, e.detail) for e in rec2.of(ev.STATEMENT_REFUSED)] == [
        ("53400", "no more pinned clients allowed (max_pinned_clients)")]


def sqlstates(messages) -> list:
    return [parse_error_fields(body)["C"] for kind, body in messages if kind == "E"]


def raw_session(proxy):
    """(socket, pid, key) of a raw trust client, from its BackendKeyData."""
    return login_with_key(proxy.host, proxy.port)


CANCELS = 2000
CANCELERS = 2
VICTIMS = 4


def test_cancels_racing_pinned_clients_never_hit_another_client_nor_the_proxys_own_query(pg, proxy_factory,
                                                                                           caplog):
    caplog.set_level(logging.INFO, logger="threadpool_proxy.relay")
    proxy = proxy_factory(pool_size=3, max_pinned_clients=CANCELERS, auth_type="trust", query_wait_timeout=60)
    stop = threading.Event()
    lock = threading.Lock()
    counts = collections.Counter()
    problems = []

    def victim():
        try:
            sock = trust_session(proxy)
            with sock:
                while not stop.is_set():
                    query(sock, "SELECT pg_sleep(0.001)")
                    states = sqlstates(read_until_ready(sock))
                    with lock:
                        counts["victim transactions"] += 1
                        counts["foreign cancels"] += states.count("57014")
                        problems.extend(s for s in states if s != "57014")
        except Exception as exc:      # noqa: BLE001 - asserted below
            problems.append(repr(exc))

    def canceler(n: int, seed: int):
        """Pinned by a temporary table, then a statement of 0-2 ms and the DISCARD TEMP that unpins it,
        with a cancel for itself racing them: it may land during the statement, during the proxy's
        question whether the table is gone, or after the connection was let go."""
        rand = random.Random(seed)
        try:
            sock, pid, key = raw_session(proxy)
            packet = cancel_packet(pid, key)
            with sock:
                for _ in range(n):
                    query(sock, "CREATE TEMP TABLE IF NOT EXISTS mine (x int)")
                    states = sqlstates(read_until_ready(sock))
                    query(sock, f"SELECT pg_sleep({rand.uniform(0, 0.002):.6f}); DISCARD TEMP")
                    with socket.create_connection((proxy.host, proxy.port), timeout=30) as c:
                        c.sendall(packet)
                        assert c.recv(1) == b""
                    states += sqlstates(read_until_ready(sock))
                    with lock:
                        counts["cancels sent"] += 1
                        counts["own statements canceled"] += states.count("57014")
                        problems.extend(s for s in states if s != "57014")
                query(sock, "DISCARD TEMP")
                assert sqlstates(read_until_ready(sock)) == []
        except Exception as exc:      # noqa: BLE001 - asserted below
            problems.append(repr(exc))

    victims = [threading.Thread(target=victim, daemon=True) for _ in range(VICTIMS)]
    cancelers = [threading.Thread(target=canceler, args=(CANCELS // CANCELERS, i), daemon=True)
                 for i in range(CANCELERS)]
    t0 = time.monotonic()
    for t in victims + cancelers:
        t.start()
    for t in cancelers:
        t.join(240)
    stop.set()
    for t in victims:
        t.join(30)
    print(f"\n{counts['cancels sent']} cancels in {time.monotonic() - t0:.1f} s racing pinned clients, against "
          f"{counts['victim transactions']} transactions of {VICTIMS} other clients (pool_size 3): "
          f"{counts['foreign cancels']} foreign cancels, {counts['own statements canceled']} own statements "
          f"canceled; {proxy.pool.stats['handed_on']} hand-offs")
    assert not any(t.is_alive() for t in victims + cancelers)
    assert problems == []
    assert counts["cancels sent"] == CANCELS
    assert counts["victim transactions"] > 500
    assert counts["foreign cancels"] == 0
    assert counts["own statements canceled"] > 20          # the cancels do reach PostgreSQL
    assert proxy.pool.stats["reset_failed"] == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "threadpool_proxy.relay"]
    assert not [m for m in messages if "asking the server about its session state failed" in m], messages[:5]
    pins = sum("is pinned to its server connection (temp_table)" in m for m in messages)
    unpins = sum("is no longer pinned (temp_table undone)" in m for m in messages)
    # Each round starts pinned anew unless the round before was canceled before its DISCARD TEMP ran
    # (then the table and the pin stay): at least one pin per round that was not canceled.
    assert pins == unpins and pins >= CANCELS - counts["own statements canceled"], (pins, unpins, counts)


def test_a_users_pool_mode_override_decides_whether_its_clients_are_pinned(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="transaction", pool_size=4, admin_users=["postgres"],
                          users={"app": {"pool_mode": "session"}})
    with connect(pg, proxy, user="app") as session_client, connect(pg, proxy, user="trustuser") as pooled:
        for conn in (session_client, pooled):
            conn.execute("CREATE TEMP TABLE scratch (x int)")
            assert conn.execute("SELECT count(*) FROM scratch").fetchone() == (0,)
        pinned = {c["user"]: c["pinned"] for c in clients(pg, proxy)}
    assert pinned == {"app": "", "trustuser": "temp_table"}    # session mode: kept, nothing to pin


def clients(pg, proxy) -> list:
    with connect(pg, proxy, user="postgres", dbname="threadpool_proxy") as console:
        cur = console.execute("SHOW CLIENTS")
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]
