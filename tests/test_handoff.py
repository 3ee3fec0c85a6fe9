"""Hand-offs without convoys (issue 22 item 1).

A connection released while clients wait is parked and the longest waiter
called; a client that is running meanwhile may take it first (it barges), and
the called waiter keeps its place at the head of the queue.  A waiter that has
waited HANDOFF_AFTER already is handed the connection directly.  Clients that
keep their connection between transactions (lingering) take no pool lock per
transaction, and a waiter's claim made while one is in a transaction is
answered at that transaction's end.

The pool tests control the interpreter's thread switching (a long switch
interval) so that "a running client arrives before the called waiter wakes"
happens every time, not by luck.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
import time

import pytest

from threadpool_proxy import pool as pool_mod
from threadpool_proxy.errors import PoolTimeout
from threadpool_proxy.pool import BackendIdlePool, Waiter, pool_key

import helpers
from helpers import wait_until

K = pool_key("127.0.0.1:5432", "app", "appdb")


@pytest.fixture
def conn():
    """A connection the pool can probe: one end of a socketpair (idle: nothing to read)."""
    a, b = socket.socketpair()
    yield a
    a.close()
    b.close()


def run_thread(fn):
    outcome = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, outcome


@contextlib.contextmanager
def no_thread_switch():
    """The running thread keeps the interpreter until it blocks: a woken thread waits for it."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(30.0)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def test_a_running_client_takes_a_released_connection_before_the_called_waiter(conn, monkeypatch):
    monkeypatch.setattr(pool_mod, "HANDOFF_AFTER", 60.0)      # every waiter is within the bound
    p = BackendIdlePool(5, 10)
    assert p.acquire(K, limit=1, timeout=1) is None           # the only slot: in use
    first_t, first = run_thread(lambda: p.acquire(K, 1, 30, waiter=Waiter()))
    assert wait_until(lambda: p.stats["waits"] == 1)
    with no_thread_switch():
        p.checkin(K, conn)                                     # parks it and calls the waiter ...
        barger = p.acquire(K, 1, 1)                            # ... a running client takes it first
    assert barger is conn
    assert p.stats["parked"] == 1 and p.stats["handed_on"] == 0
    # The called waiter found nothing and waits again, first in the queue.
    assert wait_until(lambda: p.stats["barged"] == 1), p.stats
    assert first_t.is_alive() and not first
    second_t, second = run_thread(lambda: p.acquire(K, 1, 30, waiter=Waiter()))
    assert wait_until(lambda: p.stats["waits"] == 2)        # (a wait is counted once, however often it sleeps)
    time.sleep(0.05)
    p.checkin(K, conn)
    first_t.join(5)
    assert first.get("result") is conn                         # its place was kept: before the second
    assert second_t.is_alive() and not second
    p.checkin(K, conn)
    second_t.join(5)
    assert second.get("result") is conn


def test_a_waiter_past_the_bound_is_handed_the_connection_directly(conn, monkeypatch):
    monkeypatch.setattr(pool_mod, "HANDOFF_AFTER", 0.05)
    p = BackendIdlePool(5, 10)
    assert p.acquire(K, limit=1, timeout=1) is None
    first_t, first = run_thread(lambda: p.acquire(K, 1, 30, waiter=Waiter()))
    assert wait_until(lambda: p.stats["waits"] == 1)
    time.sleep(0.1)                                            # it has waited past the bound
    with no_thread_switch():
        p.checkin(K, conn)
        with pytest.raises(PoolTimeout):
            p.acquire(K, 1, 0.01)                              # nothing parked to barge in on
    first_t.join(5)
    assert first.get("result") is conn
    assert p.stats["handed_on"] == 1 and p.stats["parked"] == 0


def test_a_called_waiter_counts_as_waiting_for_clients_that_would_keep_their_connection(conn, monkeypatch):
    """Between its call and its wake-up, a releasing client does not keep its connection idle."""
    monkeypatch.setattr(pool_mod, "HANDOFF_AFTER", 60.0)
    p = BackendIdlePool(5, 10)
    assert p.acquire(K, limit=2, timeout=1) is None
    assert p.acquire(K, limit=2, timeout=1) is None
    first_t, first = run_thread(lambda: p.acquire(K, 2, 30, waiter=Waiter()))
    assert wait_until(lambda: p.stats["waits"] == 1)
    holder = type("Holder", (), {"wake": lambda self: None, "lingering": True})()
    with no_thread_switch():
        p.checkin(K, conn)                                     # the waiter is called, not yet awake
        assert not p.linger(K, holder)
    first_t.join(5)
    assert first.get("result") is conn
    assert p.linger(K, holder)                                 # nobody waits now


# -- through the relay, on the real server -------------------------------------------

def test_a_claim_during_a_kept_connections_transaction_is_answered_at_its_end(pg, proxy_factory):
    """pool_size 1: A keeps its connection between transactions; B waits while A is in one; A's COMMIT
    hands it to B, and A, between transactions, takes it back after B."""
    proxy = proxy_factory(pool_size=1, query_wait_timeout=30)
    a = helpers.connect(pg, proxy)
    b = helpers.connect(pg, proxy)
    try:
        for _ in range(3):
            assert a.execute("SELECT 1").fetchone() == (1,)    # kept: entered once, no release
        a.execute("BEGIN")
        a.execute("SELECT 2")
        t, outcome = run_thread(lambda: b.execute("SELECT 'b'").fetchone())
        assert wait_until(lambda: proxy.server.pool.stats["waits"] >= 1)
        time.sleep(0.2)
        assert t.is_alive() and not outcome                    # not before A's transaction ends
        a.execute("COMMIT")
        t.join(10)
        assert outcome.get("result") == ("b",)
        assert a.execute("SELECT 3").fetchone() == (3,)
        assert b.execute("SELECT 4").fetchone() == (4,)
    finally:
        a.close()
        b.close()


def test_kept_connections_under_load_serve_every_client_in_turn(pg, proxy_factory):
    """8 clients on 2 connections, each running many transactions: all progress, none waits long."""
    proxy = proxy_factory(pool_size=2, query_wait_timeout=30)
    clients = [helpers.connect(pg, proxy) for _ in range(8)]
    counts, errors, stop = [0] * 8, [], threading.Event()

    def work(i):
        try:
            while not stop.is_set():
                with clients[i].transaction():
                    clients[i].execute("SELECT 1")
                counts[i] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: min(counts) >= 20, timeout=30), counts
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for c in clients:
            c.close()
    assert not errors, errors[:3]
    assert len(pg.backend_pids(user="app", dbname="appdb")) <= 2
