"""The pool per identity (issue 19): BackendIdlePool keeps an identity only while it holds something.

An identity (node, user, database) is in the pool's registry while it has a
connection parked or open, a pass-through login pending, a thread waiting or
a client keeping an idle connection; once it has none it is forgotten, so
keys that only ever saw failed or abandoned logins leave nothing behind
(security issue 18, item 4).  Unit tests on socket pairs, and one on the wire
against the real PostgreSQL.
"""

from __future__ import annotations

import random
import socket
import threading
import time

import pytest

from threadpool_proxy.errors import NodeDown, PoolClosed, PoolTimeout, QueryCanceled
from threadpool_proxy.pool import ALL_SERVERS, BackendIdlePool, Waiter, pool_key

from helpers import connect, raw_login, read_message, startup_packet, wait_until

NODE = "127.0.0.1:5432"


def key_of(user: str, database: str = "appdb") -> str:
    return pool_key(NODE, user, database)


K = key_of("app")


class Conn:
    """A server connection stand-in: one end of a socket pair, with the creation time the pool reads."""

    def __init__(self) -> None:
        self.raw_socket, self.peer = socket.socketpair()
        self.created = time.time()

    def close(self) -> None:
        self.raw_socket.close()
        self.peer.close()

    @property
    def closed(self) -> bool:
        return self.raw_socket.fileno() == -1


@pytest.fixture
def conns():
    """``conns()`` -> a new Conn; every one made is closed at the end."""
    made = []

    def make() -> Conn:
        made.append(Conn())
        return made[-1]

    yield make
    for conn in made:
        conn.close()


def run_thread(fn, *args, **kwargs):
    """Start ``fn`` in a daemon thread; returns (thread, outcome dict with "result" or "error")."""
    outcome = {}

    def target():
        try:
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, outcome


def open_one(p: BackendIdlePool, key: str, conns, limit: int = 5) -> Conn:
    """Take a slot of ``key`` and 'dial': an open connection, in use."""
    assert p.acquire(key, limit, 1) is None
    return conns()


# -- logins that never authenticate -------------------------------------------

def test_failed_pending_logins_leave_nothing_behind(conns):
    p = BackendIdlePool(5, 10)
    for i in range(2000):
        key = key_of(f"intruder{i}-" + "x" * 1000)
        p.acquire_pending(key, allowance=2, timeout=1)
        if i % 100 == 0:
            assert p.identities() == [key] and p.pending_count(key) == 1
            dialed = conns()
            p.give_back_pending(key, dialed, "password authentication failed")
            assert dialed.closed
        else:
            p.give_back_pending(key, None, "the client left")
    assert p.identities() == []
    assert p.snapshot()["pending"] == {}


def test_logins_that_gave_up_waiting_leave_nothing_behind():
    p = BackendIdlePool(5, 10)
    # Waiting for RESUME, until the login's time is up.
    p.hold(ALL_SERVERS)
    with pytest.raises(PoolTimeout):
        p.acquire_pending(key_of("paused"), allowance=2, timeout=0.2)
    assert p.identities() == []
    p.unhold()
    # Waiting for a place while the allowance is full, until the time is up.
    full = key_of("full")
    p.acquire_pending(full, allowance=1, timeout=1)
    with pytest.raises(PoolTimeout):
        p.acquire_pending(full, allowance=1, timeout=0.2)
    assert p.identities() == [full] and p.pending_count(full) == 1
    # Waiting for a place when the proxy starts shutting down.
    t, out = run_thread(p.acquire_pending, full, 1, 10)
    time.sleep(0.1)
    assert t.is_alive()                      # waiting for the place
    p.drain()
    t.join(5)
    assert not t.is_alive() and isinstance(out.get("error"), PoolClosed)
    assert p.identities() == [full]          # the first login is still pending
    p.give_back_pending(full, None, "refused")
    assert p.identities() == []


def test_a_login_waiting_for_resume_keeps_its_identity_while_its_last_connection_closes(conns):
    """The identity is not dropped under a thread asleep on it: once RESUMEd the login's
    place is counted where the next login and SHOW POOLS look (and it is woken at once)."""
    p = BackendIdlePool(5, 10)
    conn = open_one(p, K, conns)
    p.hold(ALL_SERVERS)
    t, out = run_thread(p.acquire_pending, K, 1, 10)
    time.sleep(0.1)
    assert t.is_alive()                      # waiting for RESUME
    p.discard(K, conn, "closed while the login waits")
    assert p.identities() == [K]
    p.unhold()
    t.join(0.5)                              # well within WAIT_SLICE: woken by RESUME
    assert not t.is_alive() and "error" not in out
    assert p.pending_count(K) == 1
    with pytest.raises(PoolTimeout):         # the allowance of 1 is taken
        p.acquire_pending(K, allowance=1, timeout=0.1)
    p.give_back_pending(K, None, "refused")
    assert p.identities() == []


# -- checkouts that end without a connection ------------------------------------

def test_checkouts_that_end_without_a_connection_leave_nothing_behind():
    p = BackendIdlePool(5, 10)
    # Pass-through (no dial) with nothing open: no slot is taken, nothing is kept.
    assert p.acquire(key_of("nothing"), 1, 1, dial=False) is None
    assert p.identities() == []
    # A wait for a full key that times out, then the slot given back.
    assert p.acquire(K, 1, 1) is None
    with pytest.raises(PoolTimeout):
        p.acquire(K, 1, 0.2)
    assert p.identities() == [K] and p.open_count(K) == 1
    # A wait canceled (a CancelRequest).
    waiter = Waiter()
    t, out = run_thread(p.acquire, K, 1, 10, waiter=waiter)
    assert wait_until(lambda: p.cancel_wait(waiter))
    t.join(5)
    assert isinstance(out.get("error"), QueryCanceled)
    p.release_slot(K)
    assert p.identities() == []
    # A checkout that waits for RESUME until its time is up.
    p.hold(ALL_SERVERS)
    with pytest.raises(PoolTimeout):
        p.acquire(key_of("paused"), 1, 0.2)
    assert p.take_slot(key_of("warm"), 2) is False        # min_pool_size takes nothing while paused
    assert p.identities() == []
    p.unhold()
    # A checkout on a node that is down, with other nodes to go to.
    down = key_of("elsewhere")
    p.dial_failed(down, retry_after=5)
    with pytest.raises(NodeDown):
        p.acquire(down, 1, 1, paced=True, failover=True)
    assert p.identities() == []


# -- an identity whose last connection closes ------------------------------------

def _discard(p, conn):
    p.discard(K, conn, "its state is unknown")


def _reap(p, conn):
    p.checkin(K, conn)
    assert p.reap_idle(0) == 1


def _reconnect(p, conn):
    p.checkin(K, conn)
    assert p.close_released(ALL_SERVERS, time.time()) == 1


def _lifetime(p, conn):
    p.renewable.add(K)
    p.checkin(K, conn)
    assert p.expire(0) == 1


def _node_down(p, conn):
    p.checkin(K, conn)
    assert p.mark_down(NODE, 5) is True


def _died_while_parked(p, conn):
    p.checkin(K, conn)
    conn.peer.close()
    assert p.acquire(K, 5, 1, dial=False) is None     # the probe finds it dead; nothing else open


def _shutdown(p, conn):
    p.checkin(K, conn)
    p.close()


@pytest.mark.parametrize("how", [_discard, _reap, _reconnect, _lifetime, _node_down, _died_while_parked,
                                 _shutdown])
def test_an_identity_goes_when_its_last_connection_closes(conns, how):
    p = BackendIdlePool(5, 10)
    first, second = open_one(p, K, conns), open_one(p, K, conns)
    p.learn_defaults(K, {"DateStyle": "ISO, MDY"})
    p.discard(K, first, "one of two closes")
    assert p.identities() == [K] and p.defaults(K) == {"DateStyle": "ISO, MDY"}
    how(p, second)
    assert second.closed
    assert p.identities() == []
    assert p.open_count(K) == 0 and p.idle_count() == 0
    # What the server's defaults were is learned again from the next fresh login.
    assert p.defaults(K) == {}


def test_a_client_keeping_its_idle_connection_keeps_the_identity(conns):
    p = BackendIdlePool(5, 10)
    conn = open_one(p, K, conns)

    class Holder:
        woken = 0

        def wake(self):
            self.woken += 1

    holder = Holder()
    assert p.linger(K, holder, conn)
    assert p.linger(key_of("nobody"), Holder()) is False     # nothing of it open: nothing to keep
    assert p.identities() == [K]
    assert p.unlinger(K, holder)
    p.checkin(K, conn)
    assert p.identities() == [K]                            # parked
    assert p.reap_idle(0) == 1
    assert p.identities() == []


# -- many threads, identities coming and going -----------------------------------

def test_identities_stay_consistent_while_they_come_and_go(conns):
    """Checkouts, releases, closes and failed logins on few keys from many threads:
    pool_size is never exceeded, no wait is lost, and nothing is left at the end."""
    p = BackendIdlePool(5, 10)
    keys = [key_of("a"), key_of("b")]
    limit = 2
    guard = threading.Lock()
    in_hand = {key: 0 for key in keys}
    most = {key: 0 for key in keys}
    made = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            key = rng.choice(keys)
            conn = p.acquire(key, limit, 20, waiter=Waiter())
            if conn is None:
                conn = Conn()             # dialed
                with guard:
                    made.append(conn)
            with guard:
                in_hand[key] += 1
                most[key] = max(most[key], in_hand[key])
            if rng.random() < 0.3:
                time.sleep(0.001)
            with guard:
                in_hand[key] -= 1
            if rng.random() < 0.5:
                p.discard(key, conn, "closed by the test")       # the identity may empty here
            else:
                p.checkin(key, conn)

    def intruder(seed: int) -> None:
        for i in range(300):
            key = key_of(f"intruder{seed}-{i % 3}")
            p.acquire_pending(key, 1, 20)
            p.give_back_pending(key, None, "refused")

    threads = [run_thread(client, n) for n in range(8)] + [run_thread(intruder, n) for n in range(2)]
    for t, out in threads:
        t.join(120)
        assert not t.is_alive()
        assert "error" not in out, out
    assert all(n <= limit for n in most.values()), most
    assert p.snapshot()["pending"] == {}
    assert sorted(p.identities()) == sorted(key for key in keys if p.idle_count(key))
    assert all(p.open_count(key) == p.idle_count(key) for key in keys)     # nothing in use
    p.close_parked(ALL_SERVERS)
    assert p.identities() == []
    assert p.in_use(ALL_SERVERS) == 0
    for conn in made:
        conn.close()


# -- on the wire: pass-through logins that never authenticate --------------------

def test_unauthenticated_passthrough_logins_leave_no_identity(pg, proxy_factory):
    """Logins refused by PostgreSQL, and clients that leave halfway through
    their authentication, each with its own user name: the pool forgets them all."""
    proxy = proxy_factory(pool_size=2)                   # auth_type passthrough
    names = [f"nobody{i}_" + "z" * 40 for i in range(24)]
    for name in names[:12]:
        result = raw_login(proxy.host, proxy.port, name, "appdb", password="not-the-password")
        assert not result.ok and result.sqlstate == "28P01", result
    for name in names[12:]:
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
            sock.sendall(startup_packet({"user": name, "database": "appdb"}))
            kind, _body = read_message(sock)
            assert kind == "R"                          # PostgreSQL's challenge, relayed; then we leave
    with connect(pg, proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert wait_until(lambda: not any(name in key for key in proxy.pool.identities() for name in names),
                          timeout=20), proxy.pool.identities()
        assert proxy.pool.identities() == [pool_key(f"{pg.host}:{pg.port}", "app", "appdb")]
        assert proxy.pool.snapshot()["pending"] == {}
