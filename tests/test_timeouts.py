"""server_lifetime and query_timeout, through psycopg against the real PostgreSQL fixture."""

from __future__ import annotations

import functools
import time

import psycopg
import pytest

import helpers
from helpers import wait_until

connect = functools.partial(helpers.connect, prepare_threshold=None)


def app_pids(pg) -> set:
    return pg.backend_pids(user="app", dbname="appdb")


# -- server_lifetime -------------------------------------------------------------------------

def test_server_lifetime_closes_a_connection_at_release_once_it_is_older(pg, proxy_factory, auth_file):
    assert wait_until(lambda: not app_pids(pg))
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, server_lifetime=1.5)
    with connect(pg, proxy) as conn:
        conn.execute("BEGIN")
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        time.sleep(2.0)                     # older than server_lifetime, but in use: not touched
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
        conn.execute("COMMIT")              # released: too old to keep
        second = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert second != first
        assert wait_until(lambda: first not in app_pids(pg))
    assert proxy.pool.snapshot()["stats"]["lifetime_closed"] >= 1


def test_server_lifetime_closes_parked_and_idle_kept_connections(pg, proxy_factory, auth_file):
    assert wait_until(lambda: not app_pids(pg))
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, server_lifetime=1)
    idle = connect(pg, proxy)               # keeps its idle connection (transaction mode, nobody waits)
    kept = idle.execute("SELECT pg_backend_pid()").fetchone()[0]
    with connect(pg, proxy) as other:       # leaves: its connection is parked
        parked = other.execute("SELECT pg_backend_pid()").fetchone()[0]
    # (Not counted while open: with a 1 s lifetime a slow machine may see one closed already.)
    assert kept != parked
    assert wait_until(lambda: not app_pids(pg), timeout=30), app_pids(pg)
    assert proxy.pool.snapshot()["stats"]["lifetime_closed"] >= 2
    assert idle.execute("SELECT 2").fetchone() == (2,)        # the client is not bothered: a new connection
    idle.close()


def test_server_lifetime_zero_uses_each_connection_once(pg, proxy_factory, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, server_lifetime=0)
    with connect(pg, proxy) as conn:
        pids = {conn.execute("SELECT pg_backend_pid()").fetchone()[0] for _ in range(3)}
    assert len(pids) == 3


# -- query_timeout ----------------------------------------------------------------------------

def test_query_timeout_cancels_the_query_and_ends_the_client(pg, proxy_factory):
    proxy = proxy_factory(query_timeout=1)
    conn = connect(pg, proxy)
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("SELECT pg_sleep(30)")
    took = time.monotonic() - t0
    assert 0.9 < took < 10, took
    assert info.value.sqlstate == "57014", info.value
    assert "query_timeout" in str(info.value)
    # The query was canceled on the server, and its backend is gone.
    assert wait_until(lambda: pid not in app_pids(pg), timeout=10)
    conn.close()
    # A query within the limit runs; so does a long transaction of short queries.
    with connect(pg, proxy) as ok:
        ok.execute("BEGIN")
        for _ in range(3):
            ok.execute("SELECT pg_sleep(0.5)")
        ok.execute("COMMIT")


def test_query_timeout_is_off_by_default(pg, proxy_factory):
    proxy = proxy_factory()
    assert proxy.config.query_timeout == 0
    with connect(pg, proxy) as conn:
        conn.execute("SELECT pg_sleep(1.5)")


def test_server_lifetime_leaves_passthrough_connections_alone(pg, proxy_factory):
    proxy = proxy_factory(server_lifetime=0.5)
    with connect(pg, proxy) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        time.sleep(1.5)
        # The proxy could not log in again for this client: the connection stays, the client goes on.
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
    assert proxy.pool.snapshot()["stats"]["lifetime_closed"] == 0


def test_set_query_timeout_applies_to_logged_in_clients(pg, proxy_factory):
    proxy = proxy_factory(admin_users=["app"])
    conn = connect(pg, proxy)
    conn.execute("SELECT pg_sleep(1.2)")                  # off: runs
    with connect(pg, proxy, dbname="pgbouncer") as console:
        console.execute("SET query_timeout = 0.5")
    with pytest.raises(psycopg.OperationalError, match="query_timeout"):
        conn.execute("SELECT pg_sleep(5)")
    conn.close()
