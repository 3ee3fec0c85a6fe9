"""Limits beyond pool_size: max_db_connections, max_user_connections, reserve_pool_size with
reserve_pool_timeout, min_pool_size; through psycopg against the real PostgreSQL fixture.

Proxy-terminated auth (the auth file of the server's own verifiers), so the proxy
can open server connections for any logged-in client.
"""

from __future__ import annotations

import functools
import threading
import time

import psycopg
import pytest

import helpers
from helpers import wait_until

connect = functools.partial(helpers.connect, prepare_threshold=None)


@pytest.fixture
def start(proxy_factory, auth_file):
    def start(**settings):
        return proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, **settings)
    return start


def in_background(fn):
    """Run ``fn`` in a thread; the returned dict gets "result" or "error", and "took" (seconds)."""
    out = {}

    def run():
        t0 = time.monotonic()
        try:
            out["result"] = fn()
        except Exception as exc:                    # noqa: BLE001 - reported to the test
            out["error"] = exc
        out["took"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    out["thread"] = t
    return out


def busy(pg, proxy, n, **kw):
    """``n`` clients each inside a transaction that holds a server connection."""
    conns = []
    for _ in range(n):
        conn = connect(pg, proxy, **kw)
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        conns.append(conn)
    return conns


def server_count(pg, **kw) -> int:
    return len(pg.backend_pids(**kw))


def query_after_login(pg, proxy, **kw):
    with connect(pg, proxy, **kw) as conn:
        return conn.execute("SELECT current_user, current_database()").fetchone()


# -- max_db_connections ---------------------------------------------------------------

def test_max_db_connections_makes_other_users_wait_then_takes_over_an_idle_connection(pg, start):
    proxy = start(max_db_connections=2, pool_size=5)
    assert wait_until(lambda: server_count(pg, dbname="appdb") == 0)
    holders = busy(pg, proxy, 2)                              # app: 2 server connections to appdb
    other = in_background(lambda: query_after_login(pg, proxy, user="other"))
    time.sleep(1.0)
    assert "result" not in other and "error" not in other, other       # waiting: appdb is full
    assert server_count(pg, dbname="appdb") == 2
    holders[0].execute("COMMIT")         # its connection is idle (kept by its client): taken over for "other"
    other["thread"].join(20)
    assert other.get("result") == ("other", "appdb"), other
    assert server_count(pg, dbname="appdb") <= 2
    assert proxy.pool.snapshot()["stats"]["evicted_for_limit"] >= 1
    holders[1].execute("COMMIT")
    # The database's limit does not hold back another database.
    assert query_after_login(pg, proxy, user="other", dbname="otherdb") == ("other", "otherdb")
    for conn in holders:
        conn.close()


def test_max_db_connections_wait_ends_with_query_wait_timeout(pg, start):
    proxy = start(max_db_connections=1, query_wait_timeout=1.5)
    holders = busy(pg, proxy, 1)
    with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
        query_after_login(pg, proxy, user="other")
    assert server_count(pg, dbname="appdb") == 1
    holders[0].close()


def test_max_db_connections_per_database_entry(pg, start):
    target = {"host": pg.host, "port": pg.port}
    proxy = start(databases={"appdb": dict(target, max_db_connections=1), "*": dict(target)},
                  query_wait_timeout=1.5)
    holders = busy(pg, proxy, 1)
    with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
        query_after_login(pg, proxy)
    assert query_after_login(pg, proxy, dbname="otherdb") == ("app", "otherdb")     # "*": no limit
    holders[0].close()


# -- max_user_connections ---------------------------------------------------------------

def test_max_user_connections_across_databases(pg, start):
    proxy = start(max_user_connections=2, pool_size=5)
    holders = busy(pg, proxy, 2)                              # app@appdb: 2
    waiting = in_background(lambda: query_after_login(pg, proxy, dbname="otherdb"))
    time.sleep(1.0)
    assert "result" not in waiting and "error" not in waiting, waiting
    assert server_count(pg, user="app") == 2
    assert query_after_login(pg, proxy, user="other") == ("other", "appdb")       # another user is not held
    holders[1].execute("COMMIT")
    waiting["thread"].join(20)
    assert waiting.get("result") == ("app", "otherdb"), waiting
    assert server_count(pg, user="app") <= 2
    for conn in holders:
        conn.close()


# -- reserve_pool_size ------------------------------------------------------------------------

def test_reserve_pool_serves_a_client_that_waited_reserve_pool_timeout(pg, start):
    proxy = start(pool_size=1, reserve_pool_size=1, reserve_pool_timeout=0.5, query_wait_timeout=3)
    holders = busy(pg, proxy, 1)
    second = in_background(lambda: query_after_login(pg, proxy))
    second["thread"].join(20)
    assert second.get("result") == ("app", "appdb"), second
    assert second["took"] >= 0.45, second                      # it waited reserve_pool_timeout first
    assert proxy.pool.snapshot()["stats"]["reserve_used"] == 1
    assert server_count(pg, user="app", dbname="appdb") == 2  # pool_size + 1, while the first still holds its own
    # The reserve is used up: a third waits past reserve_pool_timeout, until query_wait_timeout.
    holders += busy(pg, proxy, 1)
    third = in_background(lambda: query_after_login(pg, proxy, connect_timeout=60))
    third["thread"].join(60)
    assert isinstance(third.get("error"), psycopg.OperationalError), third
    assert "query_wait_timeout" in str(third["error"]) and third["took"] >= 2.9, third
    assert proxy.pool.snapshot()["stats"]["reserve_used"] == 1
    assert server_count(pg, user="app", dbname="appdb") == 2
    for conn in holders:
        conn.close()


def test_without_a_reserve_the_client_waits(pg, start):
    proxy = start(pool_size=1, query_wait_timeout=1.5)
    holders = busy(pg, proxy, 1)
    with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
        query_after_login(pg, proxy)
    assert proxy.pool.snapshot()["stats"]["reserve_used"] == 0
    holders[0].close()


# -- min_pool_size ------------------------------------------------------------------------------

def test_min_pool_size_keeps_a_used_pool_warm(pg, start):
    proxy = start(min_pool_size=3, pool_size=5, server_idle_timeout=1, admin_users=["app"])
    assert wait_until(lambda: server_count(pg, user="app", dbname="appdb") == 0)
    time.sleep(1.0)
    assert server_count(pg, user="app", dbname="appdb") == 0          # never used: nothing opened
    assert query_after_login(pg, proxy) == ("app", "appdb")
    assert wait_until(lambda: server_count(pg, user="app", dbname="appdb") == 3, timeout=15)
    time.sleep(2.5)                                        # well past server_idle_timeout: still kept
    assert server_count(pg, user="app", dbname="appdb") == 3
    assert {d["name"]: d for d in show_databases(pg, proxy)}["appdb"]["min_pool_size"] == 3
    # A warm connection serves the next client with no new server login.
    before = pg.backend_pids(user="app", dbname="appdb")
    assert query_after_login(pg, proxy) == ("app", "appdb")
    assert pg.backend_pids(user="app", dbname="appdb") == before


def test_min_pool_size_does_nothing_with_passthrough(pg, proxy_factory):
    proxy = proxy_factory(min_pool_size=3, server_idle_timeout=1)
    assert wait_until(lambda: server_count(pg, user="app", dbname="appdb") == 0)
    with connect(pg, proxy) as conn:
        conn.execute("SELECT 1")
    time.sleep(2.0)
    assert server_count(pg, user="app", dbname="appdb") <= 1


def show_databases(pg, proxy):
    with connect(pg, proxy, dbname="pgbouncer") as conn:
        cur = conn.execute("SHOW DATABASES")
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def test_set_max_db_connections_applies_to_logged_in_clients(pg, start):
    proxy = start(admin_users=["app"], query_wait_timeout=1.5)
    waiting = connect(pg, proxy, user="other")           # logged in before the limit exists
    waiting.execute("SELECT 1")
    with connect(pg, proxy, dbname="pgbouncer") as console:
        console.execute("SET max_db_connections = 1")
    assert proxy.pool.snapshot()["stats"]["evicted_for_limit"] == 0
    holders = busy(pg, proxy, 1)
    # other's idle connection is taken over for app; now other needs one back and app holds the only one.
    assert proxy.pool.snapshot()["stats"]["evicted_for_limit"] == 1
    with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
        waiting.execute("SELECT 2")
    assert server_count(pg, dbname="appdb") == 1
    holders[0].close()
    waiting.close()
