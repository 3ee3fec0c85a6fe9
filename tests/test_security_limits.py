"""Nothing grows per login attempt that never authenticated (issue 18, item 4), on a real PostgreSQL.

A client picks the user name it logs in with, and with a "*" entry the
database too: every table the proxy keys by them must forget a login that
never authenticated (the pending pass-through logins, their conditions), or
be bounded (the auth_query cache, whose unknown users also expire).  And
pending pass-through logins, each a PostgreSQL backend, are bounded in all,
not only per key: an attacker picks the keys.
"""

from __future__ import annotations

import collections
import gc
import os
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import PASSWORDS, raw_login, read_message, startup_packet, wait_until

#: Junk user names: distinct, 4 KB each, recognisable in the proxy's tables.
JUNK_PREFIX = "junk-"
NAME_BYTES = 4096
#: Documented bounds (docs/security-auth.md): unknown users the auth_query cache keeps, and for how long.
NEGATIVE_CACHE_SIZE = 256
NEGATIVE_CACHE_SECONDS = 5.0


def junk_name(i: int) -> str:
    head = f"{JUNK_PREFIX}{i:08d}-"
    return head + "x" * (NAME_BYTES - len(head))


def abandoned_login(port: int, user: str, dbname: str) -> str:
    """Send a StartupMessage, read the first answer (an Authentication request), hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(startup_packet({"user": user, "database": dbname}))
        kind, body = read_message(sock)
        return kind + (str(int.from_bytes(body[:4], "big")) if kind == "R" else "")


def rss_bytes() -> int:
    """Resident set size of this process (the proxy runs in it)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_in_threads(work, count: int, threads: int = 8) -> collections.Counter:
    """``work(i)`` for i in range(count) over ``threads`` threads; a Counter of what it returned."""
    results = collections.Counter()
    lock = threading.Lock()
    errors = []

    def loop(k):
        try:
            for i in range(k, count, threads):
                outcome = work(i)
                with lock:
                    results[outcome] += 1
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors[:3]
    return results


def tables_of(proxy) -> dict:
    """Every dict, set, list and deque the proxy's long-lived objects hold: {(object, attribute): value}."""
    server = proxy.server
    logins = server.logins
    owners = {"server": server, "pool": server.pool, "logins": logins, "stats": server.stats,
              "router": server.router, "cancel_keys": server.cancel_keys, "junk_log": server.junk_log}
    cache = getattr(logins, "_query_cache", None)
    if hasattr(cache, "_found"):         # (a plain dict is a table of ``logins`` itself)
        owners.update(cache_found=cache._found, cache_unknown=cache._unknown)
    out = {}
    for name, obj in owners.items():
        for attr, value in vars(obj).items():
            if isinstance(value, (dict, set, list, collections.deque)):
                out[(name, attr)] = value
    return out


def naming_junk(value) -> int:
    """How many keys (or items) of a table name a junk user."""
    items = value.keys() if isinstance(value, dict) else value
    return sum(1 for item in list(items) if JUNK_PREFIX in repr(item))


@pytest.fixture
def junk_proxy(pg, proxy_factory):
    target = {"host": pg.host, "port": pg.port}
    return proxy_factory(pool_mode="session", auth_user="postgres", auth_password=PASSWORDS["postgres"],
                         databases={"appdb": dict(target),                                   # passthrough
                                    "otherdb": dict(target, auth_type="auth_query")})


def test_twenty_thousand_junk_logins_leave_nothing_behind(pg, junk_proxy):
    proxy = junk_proxy
    # 8,000 pass-through logins (each one a PostgreSQL backend that is told the name, then
    # dropped) and 12,000 auth_query logins (each one a lookup), all with distinct 4 KB names,
    # abandoned after the first authentication request; a few also answer with a wrong password.
    def attempt(i):
        if i % 5 < 2:
            return abandoned_login(proxy.port, junk_name(i), "appdb")
        return abandoned_login(proxy.port, junk_name(i), "otherdb")

    warm = run_in_threads(attempt, 1000)                 # threads, stacks and the cache's 256 places
    assert warm == {"R10": 1000}, warm
    gc.collect()
    before_rss = rss_bytes()
    before = {k: len(v) for k, v in tables_of(proxy).items()}

    t0 = time.monotonic()
    seen = run_in_threads(lambda i: attempt(1000 + i), 20000)
    wrong = run_in_threads(lambda i: raw_login(proxy.host, proxy.port, junk_name(30000 + i),
                                               ("appdb", "otherdb")[i % 2], password="nope").sqlstate, 40)
    elapsed = time.monotonic() - t0
    assert seen == {"R10": 20000}, seen                  # each got as far as the SCRAM request
    assert wrong == {"28P01": 40}, wrong

    pool = proxy.pool
    assert wait_until(lambda: not pool.snapshot()["pending"] and len(proxy.server.sessions()) == 0, 30)
    gc.collect()
    grown_rss = rss_bytes() - before_rss
    tables = tables_of(proxy)
    grown = {k: len(v) - before[k] for k, v in tables.items() if len(v) - before.get(k, 0) > 4}
    junk = {k: naming_junk(v) for k, v in tables.items() if naming_junk(v)}
    print(f"20,040 junk logins in {elapsed:.1f} s; RSS {before_rss / 1e6:.1f} MB -> "
          f"{(before_rss + grown_rss) / 1e6:.1f} MB; tables naming junk users: {junk}")
    assert not grown, grown
    # only the auth_query cache's table of unknown users names them, and at most its 256
    assert set(junk) <= {("cache_unknown", "entries")}, junk
    assert junk.get(("cache_unknown", "entries"), 0) <= NEGATIVE_CACHE_SIZE
    assert pool._pending_total == 0 and not [k for k in pool.identities() if JUNK_PREFIX in k]
    assert grown_rss < 4 * 2**20, f"RSS grew by {grown_rss / 2**20:.1f} MiB"


def test_pending_logins_are_bounded_in_total(pg, proxy_factory):
    proxy = proxy_factory(max_pending_logins_total=2, max_pending_logins=3)
    held = []
    try:
        for user in ("junk-a", "junk-b"):            # two keys, each within its own allowance
            sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
            held.append(sock)
            sock.sendall(startup_packet({"user": user, "database": "appdb"}))
            assert read_message(sock)[0] == "R"      # pending: PostgreSQL asked for a password
        third = raw_login(proxy.host, proxy.port, "junk-c", "appdb", password="nope")
        assert (third.sqlstate, third.error["M"]) == (
            "53300", "too many logins are in progress (max_pending_logins_total 2); try again")
        assert third.auth_requests == []             # refused before any server connection was dialed
        assert proxy.pool.stats["pending_refused"] == 1
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: not proxy.pool.snapshot()["pending"], 10)
    assert raw_login(proxy.host, proxy.port, "app", "appdb", password=PASSWORDS["app"]).ok


def test_pending_logins_default_to_fifty_in_all():
    from threadpool_proxy.config import from_dict, for_worker
    config = from_dict({"databases": {"a": {"host": "h"}}})
    assert config.max_pending_logins_total == 50
    assert [for_worker(config, i, 3).max_pending_logins_total for i in range(3)] == [17, 17, 16]


# -- the pool forgets a key once its pending logins are gone -------------------------------

def test_a_key_whose_pending_logins_ended_is_forgotten_even_after_waiting():
    from threadpool_proxy.errors import PoolTimeout
    from threadpool_proxy.pool import BackendIdlePool, pool_key
    pool = BackendIdlePool(5, 10)
    keys = [pool_key("h:5432", f"user{i}", "db") for i in range(100)]
    for key in keys:
        pool.acquire_pending(key, 1, 1)
        pool.give_back_pending(key, None, "")
    # a waiter that timed out, and one that was handed the place
    pool.acquire_pending(keys[0], 1, 1)
    with pytest.raises(PoolTimeout):
        pool.acquire_pending(keys[0], 1, 0.05)
    got = threading.Event()
    t = threading.Thread(target=lambda: (pool.acquire_pending(keys[0], 1, 10), got.set()))
    t.start()
    # it waits on the identity's login condition
    assert wait_until(lambda: getattr(pool._pools.get(keys[0]), "login_cond", None) is not None, 5)
    pool.give_back_pending(keys[0], None, "")
    assert got.wait(10)
    t.join(10)
    pool.give_back_pending(keys[0], None, "")
    assert (pool.identities(), pool._pending_total) == ([], 0)
    assert pool.snapshot()["pending"] == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=40))
def test_pending_counts_never_outlive_their_logins(steps):
    # Any interleaving of logins taking and giving back places (within the allowance) ends
    # with every count at 0 and nothing remembered, and the total never above its limit.
    from threadpool_proxy.errors import TooManyPending
    from threadpool_proxy.pool import BackendIdlePool
    pool = BackendIdlePool(5, 10)
    held = collections.Counter()
    for user, take in steps:
        key = f"h:1\0u{user}\0db"
        if take and held[key] < 2:
            try:
                pool.acquire_pending(key, 2, 0, total_allowance=3)
                held[key] += 1
            except TooManyPending:
                assert sum(held.values()) == 3
        elif held[key]:
            pool.give_back_pending(key, None, "")
            held[key] -= 1
        assert sum(held.values()) <= 3
        assert pool.snapshot()["pending"] == {k: v for k, v in held.items() if v}
    for key, n in held.items():
        for _ in range(n):
            pool.give_back_pending(key, None, "")
    assert (pool.identities(), pool._pending_total) == ([], 0)


# -- the auth_query cache -----------------------------------------------------------------

def test_the_cache_forgets_unknown_users_after_five_seconds_and_keeps_256_at_most():
    from threadpool_proxy.authcache import MISS, VerifierCache
    cache = VerifierCache(ttl=30, size=1000)
    for i in range(1000):
        cache.put(("n", "db", f"ghost{i}"), None, found=False, now=100.0)
    assert len(cache) == NEGATIVE_CACHE_SIZE
    assert cache.get(("n", "db", "ghost999"), now=100.0 + NEGATIVE_CACHE_SECONDS - 0.1) is None
    assert cache.get(("n", "db", "ghost999"), now=100.0 + NEGATIVE_CACHE_SECONDS) is MISS
    assert cache.get(("n", "db", "ghost0"), now=100.0) is MISS               # the oldest went first
    # found users live the configured ttl, and a flood of unknown ones never pushes them out
    cache.put(("n", "db", "alice"), "verifier", found=True, now=200.0)
    for i in range(1000):
        cache.put(("n", "db", f"ghost{i}"), None, found=False, now=200.0)
    assert cache.get(("n", "db", "alice"), now=229.9) == "verifier"
    assert cache.get(("n", "db", "alice"), now=230.0) is MISS


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.booleans(), st.floats(0, 100)), max_size=200),
       st.integers(1, 10))
def test_the_cache_is_bounded_and_lru(ops, size):
    from threadpool_proxy.authcache import MISS, VerifierCache
    cache = VerifierCache(ttl=1e9, size=size, negative_size=3)
    model = collections.OrderedDict()          # found users, least recently used first
    now = 0.0
    for user, found, dt in ops:
        now += dt
        key = ("n", "db", f"u{user}")
        if found:
            cache.put(key, user, found=True, now=now)
            model[key] = user
            model.move_to_end(key)
            while len(model) > size:
                model.popitem(last=False)
        else:
            assert cache.get(key, now=now) == model.get(key, MISS)     # (MISS equals only itself)
            if key in model:
                model.move_to_end(key)
        assert len(cache) <= size + 3
