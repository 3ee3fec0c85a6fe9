"""BackendIdlePool on real sockets (socket.socketpair): parking, probing, caps, pool_size waits."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from threadpool_proxy import pool as pool_mod
from threadpool_proxy.errors import ClientGone, QueryCanceled
from threadpool_proxy.pool import BackendIdlePool, PoolClosed, PoolTimeout, Waiter, pool_key, probe_alive

from helpers import wait_until

# README, Faults and limits: a waiter's client is asked whether it left "once it has waited
# 10 ms or more; waiters also look every second".
CLIENT_CHECK_AFTER, WAITERS_LOOK_EVERY = 0.010, 1.0

K = pool_key("127.0.0.1:5432", "app", "appdb")
K2 = pool_key("127.0.0.1:5432", "other", "otherdb")


@pytest.fixture
def pairs():
    """``pairs()`` -> (ours, peer): ``ours`` plays the server connection the pool parks."""
    made = []

    def make():
        ours, peer = socket.socketpair()
        made.append((ours, peer))
        return ours, peer

    yield make
    for ours, peer in made:
        ours.close()
        peer.close()


def closed(sock) -> bool:
    return sock.fileno() == -1


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def run_thread(fn, *args):
    """Start ``fn(*args)`` in a daemon thread; returns (thread, outcome dict)."""
    outcome = {}

    def target():
        try:
            outcome["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, outcome


# -- pool_key / probe_alive ---------------------------------------------------

def test_pool_key_joins_with_nul_and_rejects_nul():
    assert pool_key("h:1", "u", "d") == "h:1\0u\0d"
    for parts in (("h\0:1", "u", "d"), ("h:1", "u\0", "d"), ("h:1", "u", "\0d")):
        with pytest.raises(ValueError):
            pool_key(*parts)
    # distinct components never collide, whatever characters they contain
    assert pool_key("n", "a/b", "c") != pool_key("n", "a", "b/c")


def test_probe_alive(pairs):
    ours, peer = pairs()
    assert probe_alive(ours)
    peer.sendall(b"E")
    assert not probe_alive(ours)
    assert not probe_alive(ours)           # MSG_PEEK: the byte is still there
    assert ours.recv(1) == b"E"
    assert probe_alive(ours)
    peer.close()
    assert not probe_alive(ours)
    ours.close()
    assert not probe_alive(ours)


def test_probe_alive_uses_raw_socket_attribute(pairs):
    ours, peer = pairs()

    class Wrapped:
        raw_socket = ours

        def close(self):
            ours.close()

    assert probe_alive(Wrapped())
    peer.close()
    assert not probe_alive(Wrapped())


def test_probe_alive_does_not_block_on_socket_with_timeout(pairs):
    """Regression: recv() on a socket with settimeout(t) waited t seconds, then read as dead."""
    ours, peer = pairs()
    ours.settimeout(60)
    start = time.monotonic()
    assert probe_alive(ours)
    assert time.monotonic() - start < 30                # not the socket's 60 s
    peer.sendall(b"x")
    assert not probe_alive(ours)


# -- checkout / checkin -------------------------------------------------------

def test_checkout_of_empty_key_is_none():
    p = BackendIdlePool(max_idle_per_key=5, max_total_idle=10)
    assert p.checkout(K) is None
    assert p.idle_count() == 0 and p.idle_count(K) == 0


def test_checkin_then_checkout_returns_same_socket(pairs):
    p = BackendIdlePool(5, 10)
    ours, _peer = pairs()
    assert p.checkin(K, ours) is True
    assert p.idle_count(K) == 1 and p.idle_count() == 1
    assert p.checkout(K2) is None           # other keys do not see it
    assert p.checkout(K) is ours
    assert not closed(ours)
    assert p.checkout(K) is None
    assert p.stats["parked"] == 1 and p.stats["reuses"] == 1
    assert p.idle_count() == 0


def test_lifo_order(pairs):
    p = BackendIdlePool(5, 10)
    socks = [pairs()[0] for _ in range(3)]
    for s in socks:
        assert p.checkin(K, s)
    assert [p.checkout(K) for _ in range(3)] == list(reversed(socks))
    assert p.stats["reuses"] == 3


def test_prefer_takes_newest_match(pairs):
    p = BackendIdlePool(5, 10)
    a, b, c = (pairs()[0] for _ in range(3))
    for s in (a, b, c):
        p.checkin(K, s)
    assert p.checkout(K, prefer=lambda s: s in (a, b)) is b
    assert p.checkout(K, prefer=lambda s: False) is c   # no match: plain LIFO
    assert p.checkout(K) is a


def test_peer_closed_parked_socket_is_dropped(pairs):
    p = BackendIdlePool(5, 10)
    ours, peer = pairs()
    p.acquire(K, limit=5, timeout=1)        # take a slot, as the proxy does before dialing
    p.checkin(K, ours)
    peer.close()
    assert p.checkout(K) is None
    assert closed(ours)
    assert p.stats["stale_evicted"] == 1 and p.stats["reuses"] == 0
    assert p.open_count(K) == 0             # the dead one's slot was freed
    assert p.idle_count() == 0


def test_dead_newest_is_skipped_for_older_live_one(pairs):
    p = BackendIdlePool(5, 10)
    live, _ = pairs()
    dead, dead_peer = pairs()
    p.checkin(K, live)
    p.checkin(K, dead)
    dead_peer.close()
    assert p.checkout(K) is live
    assert closed(dead) and not closed(live)
    assert p.stats["stale_evicted"] == 1 and p.stats["reuses"] == 1


def test_unsolicited_bytes_drop_the_connection(pairs):
    p = BackendIdlePool(5, 10)
    ours, peer = pairs()
    p.checkin(K, ours)
    peer.sendall(b"E\x00\x00\x00\x04")      # e.g. the FATAL of pg_terminate_backend
    assert p.checkout(K) is None
    assert closed(ours)
    assert p.stats["stale_evicted"] == 1


def test_checkin_reset_failed_closes_and_frees_slot(pairs):
    p = BackendIdlePool(5, 10)
    ours, _ = pairs()
    assert p.acquire(K, limit=1, timeout=1) is None
    assert p.open_count(K) == 1
    assert p.checkin(K, ours, reset_ok=False) is False
    assert closed(ours)
    assert p.stats["reset_failed"] == 1 and p.stats["parked"] == 0
    assert p.open_count(K) == 0
    assert p.idle_count() == 0


# -- caps ---------------------------------------------------------------------

def test_max_idle_per_key(pairs):
    p = BackendIdlePool(max_idle_per_key=2, max_total_idle=10)
    a, b, c = (pairs()[0] for _ in range(3))
    for _ in range(3):
        p.acquire(K, limit=10, timeout=1)
    assert p.checkin(K, a) and p.checkin(K, b)
    assert p.checkin(K, c) is False
    assert closed(c) and not closed(a) and not closed(b)
    assert p.stats["over_capacity"] == 1
    assert p.idle_count(K) == 2
    assert p.open_count(K) == 2             # c's slot was given back
    d, _ = pairs()
    assert p.checkin(K2, d)                 # the cap is per key


def test_max_total_idle(pairs):
    p = BackendIdlePool(max_idle_per_key=5, max_total_idle=3)
    keys = [pool_key("n", f"u{i}", "d") for i in range(4)]
    socks = [pairs()[0] for _ in range(4)]
    assert [p.checkin(k, s) for k, s in zip(keys, socks)] == [True, True, True, False]
    assert closed(socks[3])
    assert p.idle_count() == 3
    assert p.stats["over_capacity"] == 1
    # a checkout makes room again
    assert p.checkout(keys[0]) is socks[0]
    e, _ = pairs()
    assert p.checkin(keys[3], e)


def test_zero_caps_park_nothing(pairs):
    p = BackendIdlePool(max_idle_per_key=0, max_total_idle=10)
    s, _ = pairs()
    assert p.checkin(K, s) is False and closed(s)


def test_concurrent_checkins_never_exceed_caps(pairs):
    per_key, total = 3, 7
    p = BackendIdlePool(max_idle_per_key=per_key, max_total_idle=total)
    keys = [pool_key("n", f"u{i}", "d") for i in range(4)]
    n_threads, per_thread = 16, 6
    work = [[(keys[(t + i) % len(keys)], pairs()[0]) for i in range(per_thread)]
            for t in range(n_threads)]
    barrier = threading.Barrier(n_threads + 1)
    violations = []
    results = []
    stop = threading.Event()

    def watcher():
        while not stop.is_set():
            snap = p.snapshot()
            if snap["total_idle"] > total or any(v > per_key for v in snap["idle"].values()):
                violations.append(snap)

    def worker(items):
        barrier.wait()
        for key, sock in items:
            results.append((sock, p.checkin(key, sock)))

    w = threading.Thread(target=watcher, daemon=True)
    w.start()
    threads = [threading.Thread(target=worker, args=(items,)) for items in work]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join(30)
    stop.set()
    w.join(5)
    assert not violations
    assert len(results) == n_threads * per_thread
    parked = [s for s, ok in results if ok]
    refused = [s for s, ok in results if not ok]
    assert len(parked) == total == p.idle_count()
    assert all(p.idle_count(k) <= per_key for k in keys)
    assert all(not closed(s) for s in parked)
    assert all(closed(s) for s in refused)
    assert p.stats["parked"] == total
    assert p.stats["over_capacity"] == len(refused)


# -- reaping ------------------------------------------------------------------

def test_reap_idle_closes_only_old_ones(pairs, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(pool_mod, "time", clock)
    p = BackendIdlePool(5, 10)
    old1, old2, young = (pairs()[0] for _ in range(3))
    other_old = pairs()[0]
    for _ in range(3):
        p.acquire(K, limit=5, timeout=1)
    p.checkin(K, old1)
    p.checkin(K, old2)
    p.checkin(K2, other_old)
    clock.now += 50
    p.checkin(K, young)
    clock.now += 20                          # old ones idle 70s, young 20s
    assert p.reap_idle(60) == 3
    assert closed(old1) and closed(old2) and closed(other_old)
    assert not closed(young)
    assert p.stats["reaped"] == 3
    assert p.idle_count(K) == 1 and p.idle_count() == 1
    assert p.open_count(K) == 1              # the young one still holds its slot
    assert p.checkout(K) is young
    assert p.reap_idle(60) == 0


def test_reap_idle_real_time(pairs):
    p = BackendIdlePool(5, 10)
    old, _ = pairs()
    p.checkin(K, old)
    time.sleep(0.6)
    young, _ = pairs()
    p.checkin(K, young)
    assert p.reap_idle(0.3) == 1
    assert closed(old) and not closed(young)


# -- pool_size accounting -----------------------------------------------------

def test_acquire_under_limit_permits_dial():
    p = BackendIdlePool(5, 10)
    assert p.acquire(K, limit=2, timeout=1) is None
    assert p.acquire(K, limit=2, timeout=1) is None
    assert p.open_count(K) == 2
    assert p.acquire(K2, limit=2, timeout=1) is None     # per key
    p.release_slot(K)
    assert p.open_count(K) == 1


def test_acquire_prefers_parked_connection(pairs):
    p = BackendIdlePool(5, 10)
    s, _ = pairs()
    assert p.acquire(K, limit=1, timeout=1) is None
    p.checkin(K, s)
    assert p.acquire(K, limit=1, timeout=1) is s         # at the limit, but one is parked
    assert p.open_count(K) == 1


def test_acquire_at_limit_times_out():
    p = BackendIdlePool(5, 10)
    assert p.acquire(K, limit=1, timeout=1) is None
    start = time.monotonic()
    with pytest.raises(PoolTimeout):
        p.acquire(K, limit=1, timeout=0.3)
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 20
    assert p.stats["waits"] == 1 and p.stats["wait_timeouts"] == 1
    assert p.open_count(K) == 1


def test_acquire_wakes_on_checkin(pairs):
    p = BackendIdlePool(5, 10)
    s, _ = pairs()
    assert p.acquire(K, limit=1, timeout=1) is None
    t, out = run_thread(p.acquire, K, 1, 60)
    assert wait_until(lambda: p.stats["waits"] == 1)
    time.sleep(0.1)
    assert t.is_alive()
    p.checkin(K, s)
    t.join(30)
    assert not t.is_alive()
    assert out == {"result": s}                         # woken with it, not timed out
    assert p.open_count(K) == 1


def test_acquire_wakes_on_release_slot_and_discard(pairs):
    p = BackendIdlePool(5, 10)
    assert p.acquire(K, limit=1, timeout=1) is None
    t, out = run_thread(p.acquire, K, 1, 10)
    assert wait_until(lambda: p.stats["waits"] == 1)
    p.release_slot(K)                       # e.g. the dial failed
    t.join(5)
    assert out == {"result": None}          # the waiter may dial now
    assert p.open_count(K) == 1

    s, _ = pairs()
    t, out = run_thread(p.acquire, K, 1, 10)
    assert wait_until(lambda: p.stats["waits"] == 2)
    p.discard(K, s)
    assert closed(s)
    t.join(5)
    assert out == {"result": None}
    assert p.open_count(K) == 1


def test_acquire_wakes_when_stale_connection_evicted(pairs):
    """A parked connection found dead frees its slot for a waiter."""
    p = BackendIdlePool(5, 10)
    s, peer = pairs()
    assert p.acquire(K, limit=1, timeout=1) is None
    p.checkin(K, s)
    peer.close()
    # the only slot is held by a dead parked connection: acquire finds it dead and dials
    assert p.acquire(K, limit=1, timeout=2) is None
    assert closed(s)
    assert p.open_count(K) == 1


def test_many_waiters_all_served(pairs):
    """10 threads share 2 slots, each parking its connection back: nobody is lost."""
    p = BackendIdlePool(5, 10)
    limit = 2
    errors = []
    served = []

    def client(i):
        try:
            conn = p.acquire(K, limit, 10)
            if conn is None:
                conn, _ = pairs()
            time.sleep(0.02)
            served.append(i)
            p.checkin(K, conn)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert sorted(served) == list(range(10))
    assert p.open_count(K) <= limit
    assert p.idle_count(K) <= limit


def test_pending_logins_have_their_own_allowance_and_never_evict(pairs):
    """Pass-through logins not yet authenticated take no pool_size slot and close no parked connection."""
    p = BackendIdlePool(5, 10)
    parked, _ = pairs()
    assert p.acquire(K, limit=2, timeout=1) is None
    assert p.acquire(K, limit=2, timeout=1) is None
    p.checkin(K, parked)                               # key full: one in use, one parked
    p.acquire_pending(K, allowance=2, timeout=1)
    p.acquire_pending(K, allowance=2, timeout=1)
    assert p.pending_count(K) == 2 and p.open_count(K) == 2
    assert not closed(parked) and p.idle_count(K) == 1
    with pytest.raises(PoolTimeout):                   # the allowance is full: a third waits, then gives up
        p.acquire_pending(K, allowance=2, timeout=0.2)
    assert p.stats["pending_timeouts"] == 1
    assert p.acquire(K, limit=2, timeout=1) is parked  # authenticated clients are not affected
    p.checkin(K, parked)
    p.give_back_pending(K, None, "the client stalled")
    assert p.pending_count(K) == 1
    p.acquire_pending(K, allowance=2, timeout=0.2)     # its place is free again
    assert p.snapshot()["pending"] == {K: 2}


def test_pending_login_waits_for_a_free_place_first_come_first_served():
    p = BackendIdlePool(5, 10)
    p.acquire_pending(K, allowance=1, timeout=1)
    t, out = run_thread(p.acquire_pending, K, 1, 10)
    time.sleep(0.1)
    assert t.is_alive()
    p.give_back_pending(K, None, "failed")
    t.join(5)
    assert out == {"result": None}
    assert p.pending_count(K) == 1
    p.acquire_pending(K2, allowance=1, timeout=0.1)    # per key


def test_promote_moves_a_login_into_a_slot_evicting_a_parked_one_when_full(pairs):
    p = BackendIdlePool(5, 10)
    p.acquire_pending(K, allowance=3, timeout=1)
    p.promote(K, limit=2, timeout=1)                   # a free slot: taken
    assert (p.pending_count(K), p.open_count(K)) == (0, 1)
    assert p.acquire(K, limit=2, timeout=1) is None
    oldest, newest = pairs()[0], pairs()[0]
    p.checkin(K, oldest)
    p.checkin(K, newest)
    p.acquire_pending(K, allowance=3, timeout=1)
    p.promote(K, limit=2, timeout=1)                   # full: the oldest parked one makes room
    assert closed(oldest) and not closed(newest)
    assert p.stats["evicted_for_login"] == 1
    assert (p.pending_count(K), p.open_count(K), p.idle_count(K)) == (0, 2, 1)
    assert p.checkout(K) is newest
    p.acquire_pending(K, allowance=3, timeout=1)
    with pytest.raises(PoolTimeout):                   # full, nothing parked: waits, then times out
        p.promote(K, limit=2, timeout=0.2)
    assert p.pending_count(K) == 1                     # still pending: the caller gives it back
    p.give_back_pending(K, None, "timed out")
    assert (p.pending_count(K), p.open_count(K)) == (0, 2)


def test_promote_does_not_evict_other_keys_and_wakes_on_release(pairs):
    p = BackendIdlePool(5, 10)
    s, _ = pairs()
    p.acquire(K2, limit=1, timeout=1)
    p.checkin(K2, s)
    p.acquire(K, limit=1, timeout=1)
    p.acquire_pending(K, allowance=1, timeout=1)
    t, out = run_thread(p.promote, K, 1, 10)
    assert wait_until(lambda: p.stats["waits"] == 1)
    p.release_slot(K)
    t.join(5)
    assert out == {"result": None}
    assert not closed(s)
    assert (p.pending_count(K), p.open_count(K)) == (0, 1)


def test_cancel_wait_ends_a_waiting_acquire_and_only_while_it_waits(pairs):
    p = BackendIdlePool(5, 10)
    waiter = Waiter()
    assert p.cancel_wait(waiter) is False              # not waiting: nothing to cancel, nothing remembered
    assert p.acquire(K, limit=1, timeout=1, waiter=waiter) is None
    t, out = run_thread(lambda: p.acquire(K, 1, 60, waiter=waiter))
    assert wait_until(lambda: waiter.waiting)
    assert p.cancel_wait(waiter) is True
    t.join(30)
    assert isinstance(out.get("error"), QueryCanceled)   # canceled, not timed out
    assert not waiter.waiting and not waiter.canceled
    assert p.stats["waits_canceled"] == 1
    s, _ = pairs()
    p.checkin(K, s)
    assert p.acquire(K, limit=1, timeout=1, waiter=waiter) is s     # the next acquire is not canceled


def test_a_waiter_whose_client_left_is_handed_nothing(pairs):
    p = BackendIdlePool(5, 10)
    there = {"alive": True}
    waiter = Waiter(alive=lambda: there["alive"])
    assert p.acquire(K, limit=1, timeout=1) is None
    t, out = run_thread(lambda: p.acquire(K, 1, 30, waiter=waiter))
    assert wait_until(lambda: p.stats["waits"] == 1)
    there["alive"] = False
    time.sleep(CLIENT_CHECK_AFTER * 2)                 # a client that waited this long is asked
    s, _ = pairs()
    p.checkin(K, s)                                    # wakes the waiter: its client is gone
    t.join(5)
    assert isinstance(out.get("error"), ClientGone)
    assert p.idle_count(K) == 1 and not closed(s)      # the connection stays parked, unused
    assert p.stats["waiters_gone"] == 1
    # a waiter notices its client leaving by itself (every second) even with nothing released
    there["alive"] = True
    p.checkout(K)
    t, out = run_thread(lambda: p.acquire(K, 1, 30, waiter=waiter))
    assert wait_until(lambda: p.stats["waits"] == 2)
    there["alive"] = False
    t.join(WAITERS_LOOK_EVERY + 5)
    assert isinstance(out.get("error"), ClientGone)


def test_dials_of_a_down_server_are_paced_one_at_a_time(monkeypatch):
    p = BackendIdlePool(5, 10)
    assert p.acquire(K, limit=5, timeout=1, paced=True) is None    # dial...
    p.release_slot(K)
    p.dial_failed(K, retry_after=0.5)                                # ...the server is down
    assert p.snapshot()["servers_down"] == ["127.0.0.1:5432"]
    start = time.monotonic()
    assert p.acquire(K2, limit=5, timeout=60, paced=True) is None    # same server, other key: waits
    assert 0.4 <= time.monotonic() - start < 30                      # the retry time, not its timeout
    # one probe under way: others wait for its outcome, not for the retry time
    t, out = run_thread(lambda: p.acquire(K, 5, 10, paced=True))
    assert wait_until(lambda: p.stats["waits"] == 2)
    time.sleep(0.2)
    assert t.is_alive()
    p.dial_succeeded(K2)                                             # the server is back: everyone may dial
    t.join(5)
    assert out == {"result": None}
    assert p.snapshot()["servers_down"] == []
    assert p.acquire(K, limit=5, timeout=1, paced=True) is None      # no pause any more
    assert p.acquire(K, limit=5, timeout=1) is None                  # unpaced callers never wait for it


# -- close --------------------------------------------------------------------

def test_close_wakes_waiters_and_closes_parked(pairs):
    p = BackendIdlePool(5, 10)
    parked, _ = pairs()
    p.acquire(K2, limit=1, timeout=1)
    p.checkin(K2, parked)
    assert p.acquire(K, limit=1, timeout=1) is None
    t1, out1 = run_thread(p.acquire, K, 1, 60)
    p.acquire_pending(K, allowance=1, timeout=1)
    t2, out2 = run_thread(p.acquire_pending, K, 1, 60)
    assert wait_until(lambda: p.stats["waits"] == 1)
    p.close()
    t1.join(30)
    t2.join(30)
    assert isinstance(out1.get("error"), PoolClosed)
    assert isinstance(out2.get("error"), PoolClosed)
    assert closed(parked)
    assert p.idle_count() == 0
    with pytest.raises(PoolClosed):
        p.acquire(K2, limit=5, timeout=1)
    with pytest.raises(PoolClosed):
        p.acquire_pending(K2, allowance=5, timeout=1)
    late, _ = pairs()
    assert p.checkin(K, late) is False      # nothing parks after close
    assert closed(late)


def test_snapshot(pairs):
    p = BackendIdlePool(5, 10)
    s, _ = pairs()
    p.acquire(K, limit=3, timeout=1)
    p.acquire(K, limit=3, timeout=1)
    p.checkin(K, s)
    snap = p.snapshot()
    assert snap["idle"] == {K: 1}
    assert snap["open"] == {K: 2}
    assert snap["total_idle"] == 1
    assert snap["stats"]["parked"] == 1


# -- hand-off: a released connection goes to the longest waiter ------------------

def test_released_connections_go_to_waiters_in_arrival_order(pairs, monkeypatch):
    """Waiters past HANDOFF_AFTER (0 here: all) are handed a released connection directly, first come
    first served (those within it may lose it to a running client: tests/test_handoff.py)."""
    monkeypatch.setattr(pool_mod, "HANDOFF_AFTER", 0.0)
    p = BackendIdlePool(5, 10)
    assert p.acquire(K, limit=1, timeout=1) is None          # the only slot: in use
    first_t, first = run_thread(lambda: p.acquire(K, 1, 30, waiter=Waiter()))
    assert wait_until(lambda: p.stats["waits"] == 1)
    second_t, second = run_thread(lambda: p.acquire(K, 1, 30, waiter=Waiter()))
    assert wait_until(lambda: p.stats["waits"] == 2)
    s, _ = pairs()
    p.checkin(K, s)
    first_t.join(5)
    assert first.get("result") is s                          # the longest waiter, not a newcomer
    assert p.stats["handed_on"] == 1 and p.idle_count(K) == 0   # handed over, never parked
    assert second_t.is_alive() and not second
    p.checkin(K, s)
    second_t.join(5)
    assert second.get("result") is s and p.stats["handed_on"] == 2


class _ResetFails:
    """A released server connection whose reset query's answer says it failed."""

    def __init__(self, sock):
        self.raw_socket = sock
        self.reset_pending = True

    def finish_reset_verdict(self):
        self.reset_pending = False
        return "failed"

    def close(self):
        self.raw_socket.close()


def test_a_handed_connection_whose_reset_failed_is_closed_and_its_slot_dialed(pairs):
    p = BackendIdlePool(5, 10)
    assert p.acquire(K, limit=1, timeout=1) is None
    t, out = run_thread(lambda: p.acquire(K, 1, 30, waiter=Waiter()))
    assert wait_until(lambda: p.stats["waits"] == 1)
    s, _ = pairs()
    p.checkin(K, _ResetFails(s))
    t.join(5)
    assert "error" not in out and out.get("result") is None   # nothing usable: the freed slot, to dial
    assert closed(s) and p.stats["reset_failed"] == 1
    assert p.open_count(K) == 1                                # the waiter's dial holds the one slot
