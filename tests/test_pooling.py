"""Pooling behaviour on the wire: pool_size bounds, eviction, reset, reaping,
parameter isolation, failures on either side, waits, limits and leaks.

Everything runs through a real proxy in front of the ``pg`` cluster with
pass-through authentication (the proxy's default), mostly in transaction mode.

Notes on pass-through auth that shape these tests:

* every client *login* dials a new server connection (PostgreSQL checks the
  password), and that login counts against ``pool_size``: it waits for a free
  slot or closes a parked connection of the key and takes its slot;
* in transaction mode a client cannot get a brand-new server connection
  without logging in again, so "the next client gets the same backend" needs
  the *other* client to have logged in first.

psycopg's automatic server-side prepared statements do not survive a
transaction-mode pool (like with PgBouncer), so every connection here uses
``prepare_threshold=None``.
"""

from __future__ import annotations

import functools
import os
import socket
import struct
import threading
import time

import psycopg
import pytest

import helpers
from helpers import _message, psql, raw_login, read_message, startup_packet, wait_until
from threadpool_proxy.pool import pool_key


# -- helpers ------------------------------------------------------------------

# A psycopg connection to ``appdb`` as ``app`` through ``proxy``, never preparing statements.
connect = functools.partial(helpers.connect, prepare_threshold=None)


def app_key(pg, user="app", dbname="appdb", trust=False):
    return pool_key(f"{pg.host}:{pg.port}", user, dbname, trust)


def pid_of(conn) -> int:
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def vanish(conn) -> None:
    """Make a psycopg client disappear abruptly: shut its socket down under libpq."""
    s = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        s.shutdown(socket.SHUT_RDWR)
    finally:
        s.close()


def wait_no_app_backends(pg, timeout=15, user="app"):
    """Let backends of earlier tests (``user``@appdb) finish exiting: PostgreSQL ends one a moment
    after the proxy closed its connection, and a count taken meanwhile would include it."""
    assert wait_until(lambda: not pg.backend_pids(user=user, dbname="appdb"), timeout=timeout), \
        f"{user}@appdb backends still around: {pg.backend_pids(user=user, dbname='appdb')}"


def server_setting(pg, name):
    """The server's default value of a setting (as a fresh direct session sees it)."""
    with psycopg.connect(pg.dsn()) as conn:
        return conn.execute(f"SHOW {name}").fetchone()[0]


def make_table(pg, name, rows=1):
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, n int NOT NULL DEFAULT 0)")
        conn.execute(f"INSERT INTO {name} (id) SELECT generate_series(1, {rows})")


def lasting_max(samples, window: float = 0.25) -> int:
    """The largest count that held for ``window`` seconds among [(time.monotonic(), count)].

    PostgreSQL lists a backend until it has exited, a moment after the proxy closed
    its connection (an evicted parked one), and on a loaded machine that moment may
    be long; a connection the proxy really kept (or leaked) is listed for longer.
    """
    best = 0
    for i, (start, _) in enumerate(samples):
        span = [n for t, n in samples[i:] if t - start <= window]
        if samples[-1][0] - start >= window:
            best = max(best, min(span))
    return best


def start_login(host, port, user="app", dbname="appdb") -> socket.socket:
    """Open a raw connection and send a StartupMessage; the caller reads the answer."""
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(startup_packet({"user": user, "database": dbname}))
    return s


# -- 1. pool_size bounds the backends under 50 concurrent clients --------------

CLIENTS = 50
TRANSACTIONS = 20


def test_fifty_clients_never_exceed_pool_size_backends(pg, proxy_factory):
    make_table(pg, "pool_counter")
    wait_no_app_backends(pg)
    proxy = proxy_factory(pool_size=5, max_pending_logins=3, query_wait_timeout=90)
    key = app_key(pg)

    stop = threading.Event()
    samples = {"pg": [], "proxy": []}
    phase = {"work": False}
    work_samples = []

    def sampler():
        while not stop.is_set():
            n = len(pg.backend_pids(user="app", dbname="appdb"))
            samples["pg"].append((time.monotonic(), n))
            samples["proxy"].append(proxy.pool.open_count(key))
            if phase["work"]:
                work_samples.append(n)
            time.sleep(0.02)

    barrier = threading.Barrier(CLIENTS + 1)
    lock = threading.Lock()
    committed = [0]
    selects = [0]
    errors = []
    work_pids = set()
    login_times = []

    def client(i):
        try:
            t0 = time.monotonic()
            conn = connect(pg, proxy, connect_timeout=120)
            with lock:
                login_times.append(time.monotonic() - t0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(("login", i, repr(exc)))
            barrier.abort()
            return
        try:
            barrier.wait(timeout=180)
            barrier.wait(timeout=30)          # the main thread switches the phase between the two
            mine = 0
            for t in range(TRANSACTIONS):
                with conn.transaction():
                    conn.execute("UPDATE pool_counter SET n = n + 1 WHERE id = 1")
                    pid = pid_of(conn)
                mine += 1
                with lock:
                    work_pids.add(pid)
                if t % 4 == i % 4:            # some autocommit selects in between
                    assert conn.execute("SELECT n >= %s FROM pool_counter WHERE id = 1",
                                        (mine,)).fetchone() == (True,)
                    with lock:
                        selects[0] += 1
            with lock:
                committed[0] += mine
        except BaseException as exc:  # noqa: BLE001
            errors.append(("work", i, repr(exc)))
            barrier.abort()
        finally:
            conn.close()

    samp = threading.Thread(target=sampler, daemon=True)
    samp.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
    started = time.monotonic()
    logged_in = work_started = None
    for t in threads:
        t.start()
    try:
        barrier.wait(timeout=180)             # every client is logged in at the same time
        logged_in = time.monotonic() - started
        assert proxy.server.session_count() == CLIENTS
        # Backends of connections the logins closed (evicted parked ones) may still be
        # exiting: PostgreSQL lists them until they notice.  The work phase starts after.
        assert wait_until(lambda: len(pg.backend_pids(user="app", dbname="appdb")) <= proxy.pool.open_count(key),
                          timeout=30), (pg.backend_pids(user="app", dbname="appdb"), proxy.pool.open_count(key))
        phase["work"] = True
        work_started = time.monotonic()
        barrier.wait(timeout=30)
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join(240)
    work_time = time.monotonic() - work_started if work_started else None
    stop.set()
    samp.join(10)

    assert not errors, errors[:5]
    assert logged_in is not None and work_time is not None
    assert not any(t.is_alive() for t in threads)
    with psycopg.connect(pg.dsn()) as conn:
        counter = conn.execute("SELECT n FROM pool_counter WHERE id = 1").fetchone()[0]
    report = (f"{CLIENTS} clients x {TRANSACTIONS} transactions = {committed[0]} committed, "
              f"{selects[0]} autocommit selects; logins took {logged_in:.2f}s "
              f"(slowest {max(login_times):.2f}s), work {work_time:.2f}s; "
              f"max backends seen by pg_stat_activity {max(n for _, n in samples['pg'])} "
              f"({lasting_max(samples['pg'])} for 0.25 s) "
              f"(work phase {max(work_samples, default=0)}), by the proxy {max(samples['proxy'])}, "
              f"{len(samples['pg'])} samples; distinct backends in the work phase {len(work_pids)}; "
              f"pool stats {proxy.pool.snapshot()['stats']}")
    print("\n" + report)
    assert committed[0] == CLIENTS * TRANSACTIONS
    assert counter == committed[0], report
    # Logins not yet authenticated have an allowance of their own (max_pending_logins),
    # so PostgreSQL sees at most pool_size + 3; authenticated ones never exceed pool_size.
    assert lasting_max(samples["pg"]) <= 5 + 3, report
    assert max(work_samples) <= 5, report
    assert max(samples["proxy"]) <= 5, report
    assert 1 <= len(work_pids) <= 5, report
    assert len(samples["pg"]) > 20, report


def test_login_churn_while_others_work_stays_within_pool_size(pg, proxy_factory):
    """Logins (each dials a backend, taking a parked or kept one's slot) mixed with running transactions."""
    make_table(pg, "pool_churn")
    wait_no_app_backends(pg)
    proxy = proxy_factory(pool_size=5, max_pending_logins=3, query_wait_timeout=90)
    key = app_key(pg)
    stop = threading.Event()
    seen = {"pg": 0, "proxy": 0, "samples": 0}
    pg_samples = []

    def sampler():
        # PostgreSQL's count holds backends still exiting (see lasting_max); the proxy's is exact.
        while not stop.is_set():
            pg_samples.append((time.monotonic(), len(pg.backend_pids(user="app", dbname="appdb"))))
            seen["proxy"] = max(seen["proxy"], proxy.pool.open_count(key))
            seen["samples"] += 1
            time.sleep(0.02)

    errors, committed, lock = [], [0], threading.Lock()

    def client(i):
        try:
            for cycle in range(3):
                with connect(pg, proxy, connect_timeout=120) as conn:
                    for _ in range(5):
                        with conn.transaction():
                            conn.execute("UPDATE pool_churn SET n = n + 1 WHERE id = 1")
                        with lock:
                            committed[0] += 1
                time.sleep(0.01 * (i % 5))
        except BaseException as exc:  # noqa: BLE001
            errors.append((i, repr(exc)))

    samp = threading.Thread(target=sampler, daemon=True)
    samp.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    took = time.monotonic() - t0
    stop.set()
    samp.join(10)
    seen["pg"] = lasting_max(pg_samples)
    assert not errors, errors[:5]
    with psycopg.connect(pg.dsn()) as conn:
        counter = conn.execute("SELECT n FROM pool_churn WHERE id = 1").fetchone()[0]
    print(f"\nlogin churn: 30 clients x 3 logins x 5 transactions = {committed[0]} in {took:.2f}s; "
          f"max backends {seen['pg']} (proxy {seen['proxy']}) over {seen['samples']} samples; "
          f"stats {proxy.pool.snapshot()['stats']}")
    assert committed[0] == counter == 450
    assert seen["pg"] <= 5 + 3 and seen["proxy"] <= 5, seen      # pool_size + max_pending_logins
    assert wait_until(lambda: proxy.server.session_count() == 0)


# -- 2. parked connections that die are evicted at checkout --------------------

def trust_connect(pg, proxy):
    """A client that the proxy itself authenticates (auth_type trust), so the
    proxy may log in to the server for it and clients share parked connections."""
    return connect(pg, proxy, user="trustuser")


def test_parked_connection_killed_while_idle_is_evicted(pg, proxy_factory):
    proxy = proxy_factory(pool_size=5, auth_type="trust")
    key = app_key(pg, user="trustuser", trust=True)   # (trust pools are apart)
    first, second = trust_connect(pg, proxy), trust_connect(pg, proxy)
    older, newest = pid_of(first), pid_of(second)      # each keeps its own while idle
    assert older != newest
    first.close()                                       # reset and parked, in this order:
    assert wait_until(lambda: proxy.pool.idle_count(key) == 1)
    second.close()                                      # the newest is on top (LIFO)
    assert wait_until(lambda: proxy.pool.idle_count(key) == 2)
    with pg.superuser_conn() as su:
        assert su.execute("SELECT pg_terminate_backend(%s)", (newest,)).fetchone() == (True,)
    assert wait_until(lambda: newest not in pg.backend_pids(user="trustuser"))
    before = proxy.pool.stats["stale_evicted"]
    with trust_connect(pg, proxy) as third:             # checkout meets the dead one first
        assert pid_of(third) == older
        assert third.execute("SELECT 40 + 2").fetchone() == (42,)
    assert proxy.pool.stats["stale_evicted"] == before + 1, proxy.pool.snapshot()
    assert proxy.pool.open_count(key) == 1


def test_kept_connection_killed_between_transactions_is_replaced_quietly(pg, proxy_factory):
    """A client keeps its idle backend between transactions when nobody waits;
    if that backend dies meanwhile, the client's next transaction gets another one."""
    wait_no_app_backends(pg)
    proxy = proxy_factory(pool_size=5)
    key = app_key(pg)
    a = connect(pg, proxy)
    b = connect(pg, proxy)
    try:
        first = pid_of(a)               # A now keeps this backend while idle
        other = (pg.backend_pids(user="app", dbname="appdb") - {first}).pop()
        with pg.superuser_conn() as su:
            su.execute("SELECT pg_terminate_backend(%s)", (first,))
        assert wait_until(lambda: first not in pg.backend_pids(user="app", dbname="appdb"))
        assert wait_until(lambda: proxy.pool.open_count(key) == 1)
        assert pid_of(a) == other       # no error for A
        assert b.execute("SELECT 'b'").fetchone() == ("b",)
        assert a.execute("SELECT 'a'").fetchone() == ("a",)
    finally:
        a.close()
        b.close()


def test_parked_connections_all_dead_are_all_evicted(pg, proxy_factory):
    """Every parked connection of the key died while idle: checkout evicts them all and dials."""
    wait_no_app_backends(pg, user="trustuser")     # (the count of those terminated below is exact)
    proxy = proxy_factory(pool_size=5, auth_type="trust")
    key = app_key(pg, user="trustuser", trust=True)   # (trust pools are apart)
    conns = [trust_connect(pg, proxy) for _ in range(3)]
    pids = {pid_of(c) for c in conns}
    for c in conns:
        c.close()
    assert wait_until(lambda: proxy.pool.idle_count(key) == 3)
    assert pg.terminate_backends(user="trustuser") == 3
    assert wait_until(lambda: not pg.backend_pids(user="trustuser"))
    before = proxy.pool.stats["stale_evicted"]
    with trust_connect(pg, proxy) as c:
        assert pid_of(c) not in pids
    assert proxy.pool.stats["stale_evicted"] == before + 3
    assert proxy.pool.open_count(key) == 1


def test_passthrough_client_whose_connections_all_died_gets_a_clear_error(pg, proxy_factory):
    """With pass-through auth only logins open server connections: when all of a
    key's connections died, an idle client is told to reconnect, at once."""
    wait_no_app_backends(pg)
    proxy = proxy_factory(pool_size=5)
    a, b = connect(pg, proxy), connect(pg, proxy)
    try:
        assert pg.terminate_backends(user="app", dbname="appdb") == 2
        assert wait_until(lambda: proxy.pool.open_count(app_key(pg)) == 0)
        for conn in (a, b):
            t0 = time.monotonic()
            with pytest.raises(psycopg.OperationalError, match="no server connection is left for this login") as info:
                conn.execute("SELECT 1")
            # it says why (pass-through: the proxy cannot log in without the client) and what to do
            assert "cannot log in without the client: reconnect" in str(info.value)
            assert "auth_type scram-sha-256" in str(info.value)
            assert time.monotonic() - t0 < 60         # at once, not after query_wait_timeout (120 s)
        with connect(pg, proxy) as c:                   # a new login works
            assert c.execute("SELECT 7").fetchone() == (7,)
    finally:
        a.close()
        b.close()


def test_passthrough_login_after_parked_death(pg, proxy_factory):
    """A pass-through login that closes a dead parked connection for its slot still works.

    (Transaction mode: in session mode pass-through parks nothing, no client could take it.)
    """
    proxy = proxy_factory(pool_mode="transaction", pool_size=1)
    with connect(pg, proxy) as a:
        pid = pid_of(a)
    assert wait_until(lambda: proxy.pool.idle_count(app_key(pg)) == 1)
    pg.terminate_backends(user="app", dbname="appdb")
    assert wait_until(lambda: pid not in pg.backend_pids(user="app", dbname="appdb"))
    with connect(pg, proxy) as b:
        assert b.execute("SELECT 3").fetchone() == (3,)
        assert pid_of(b) != pid


# -- 3. the reset: a client's session state never reaches the next client ------

def test_transaction_mode_state_does_not_leak_to_next_client(pg, proxy_factory):
    default_work_mem = server_setting(pg, "work_mem")
    assert default_work_mem != "7MB"
    # pin_on empty: nothing keeps A on its connection (see test_pinning.py for that)
    proxy = proxy_factory(pool_size=1, pin_on=[])
    b = connect(pg, proxy)          # B logs in first so that A's login is the surviving backend
    a = connect(pg, proxy)
    try:
        with a.transaction():
            a.execute("CREATE TEMP TABLE tpp_tmp (x int)")
            a.execute("INSERT INTO tpp_tmp VALUES (1)")
            a.execute("SET work_mem = '7MB'")
            a.execute("SET application_name = 'client-a'")
            a.execute("SELECT pg_advisory_lock(4242)")
            a.execute("PREPARE tpp_p AS SELECT 42")
            pid_a = pid_of(a)
            # all of it really exists inside A's transaction
            assert a.execute("SELECT count(*) FROM tpp_tmp").fetchone() == (1,)
            assert a.execute("SHOW work_mem").fetchone() == ("7MB",)
            assert a.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = 'tpp_p'").fetchone() == (1,)
            assert a.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                             "AND pid = pg_backend_pid()").fetchone() == (1,)

        # B gets the very same backend (claimed from A, which keeps it while
        # nobody waits), and none of A's state
        assert pid_of(b) == pid_a
        # seen from outside too, the backend holds no advisory lock any more
        with pg.superuser_conn() as su:
            assert su.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
                              (pid_a,)).fetchone() == (0,)
            assert su.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)
            su.execute("SELECT pg_advisory_unlock(4242)")
        with b.transaction():
            assert pid_of(b) == pid_a
            assert b.execute("SELECT to_regclass('pg_temp.tpp_tmp')").fetchone() == (None,)
            assert b.execute("SELECT count(*) FROM pg_class WHERE relname = 'tpp_tmp'").fetchone() == (0,)
            assert b.execute("SHOW work_mem").fetchone() == (default_work_mem,)
            assert b.execute("SHOW application_name").fetchone() == ("",)
            assert b.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
            assert b.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'").fetchone() == (0,)
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            b.execute("EXECUTE tpp_p")
        with pytest.raises(psycopg.errors.UndefinedTable):
            b.execute("SELECT * FROM tpp_tmp")

        # A's next transaction: the same backend, clean of A's other state; the
        # settings A changed follow it (set again: test_session_state.py)
        with a.transaction():
            assert pid_of(a) == pid_a
            assert a.execute("SHOW application_name").fetchone() == ("client-a",)
            assert a.execute("SHOW work_mem").fetchone() == ("7MB",)
            assert a.execute("SELECT to_regclass('pg_temp.tpp_tmp')").fetchone() == (None,)
        assert b.execute("SHOW application_name").fetchone() == ("",)
    finally:
        a.close()
        b.close()


def test_session_mode_state_is_reset_when_client_leaves(pg, proxy_factory, auth_file):
    # proxy-terminated auth: with pass-through, session mode parks nothing (no client could take it)
    proxy = proxy_factory(pool_mode="session", pool_size=1, auth_type="scram-sha-256", auth_file=auth_file)
    with connect(pg, proxy) as a:
        a.execute("CREATE TEMP TABLE tpp_tmp_s (x int)")
        a.execute("SET work_mem = '7MB'")
        a.execute("SET application_name = 'client-a'")
        a.execute("SELECT pg_advisory_lock(4343)")
        a.execute("PREPARE tpp_ps AS SELECT 1")
        pid_a = pid_of(a)
    # parked, and clean as seen from outside
    assert wait_until(lambda: proxy.pool.idle_count(app_key(pg)) == 1)
    with pg.superuser_conn() as su:
        row = su.execute("SELECT application_name, state, query FROM pg_stat_activity WHERE pid = %s",
                         (pid_a,)).fetchone()
        assert row == ("", "idle", "DISCARD ALL"), row
        assert su.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
                          (pid_a,)).fetchone() == (0,)
        assert su.execute("SELECT count(*) FROM pg_class WHERE relname = 'tpp_tmp_s'").fetchone() == (0,)
    with connect(pg, proxy) as b:
        assert b.execute("SELECT count(*) FROM pg_prepared_statements").fetchone() == (0,)
        assert b.execute("SHOW application_name").fetchone() == ("",)
        assert b.execute("SELECT to_regclass('pg_temp.tpp_tmp_s')").fetchone() == (None,)


# -- 4. the idle reaper --------------------------------------------------------

def test_idle_reaper_closes_parked_backends(pg, proxy_factory):
    wait_no_app_backends(pg)
    proxy = proxy_factory(server_idle_timeout=0.5, pool_size=5)
    key = app_key(pg)
    stay = connect(pg, proxy)                   # logged in, never ran anything: its login backend is parked
    t0 = time.monotonic()                       # the last two are parked after this
    for _ in range(2):                          # these leave: their backends are reset and parked
        with connect(pg, proxy) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    try:
        # (Not counted while parked: with a 0.5 s timeout a slow machine may see them reaped first.)
        assert wait_until(lambda: not pg.backend_pids(user="app", dbname="appdb"), timeout=30), \
            pg.backend_pids(user="app", dbname="appdb")
        took = time.monotonic() - t0
        print(f"\nreaper: 3 parked backends gone {took:.2f}s after parking (server_idle_timeout 0.5)")
        assert took >= 0.5                      # not before they were idle that long
        assert proxy.pool.stats["parked"] >= 3 and proxy.pool.stats["reaped"] >= 3, proxy.pool.stats
        assert proxy.pool.idle_count() == 0
        assert proxy.pool.open_count(key) == 0
        # pass-through auth: a still-connected client has no backend left and is told so
        with pytest.raises(psycopg.OperationalError, match="reconnect"):
            stay.execute("SELECT 1")
        # a new login works
        with connect(pg, proxy) as c:
            assert c.execute("SELECT 2").fetchone() == (2,)
    finally:
        stay.close()


# -- 5. parameter isolation on a shared backend --------------------------------

def test_startup_parameters_follow_each_client_on_a_shared_backend(pg, proxy_factory):
    default_tz = server_setting(pg, "TimeZone")
    default_ds = server_setting(pg, "DateStyle")
    assert default_tz != "Asia/Tokyo" and default_ds == "ISO, MDY"
    proxy = proxy_factory(pool_size=1)
    a = connect(pg, proxy, options="-c TimeZone=Asia/Tokyo -c DateStyle=SQL,DMY",
                application_name="A", client_encoding="LATIN1")
    b = connect(pg, proxy)          # B's login is the one backend left
    try:
        assert a.info.encoding == "iso8859-1" and b.info.encoding == "utf-8"
        pid = pid_of(b)
        for round_ in range(4):
            for who, conn in (("A", a), ("B", b)):
                with conn.transaction():
                    assert pid_of(conn) == pid
                    row = conn.execute(
                        "SELECT current_setting('TimeZone'), current_setting('application_name'),"
                        " current_setting('DateStyle'), current_setting('client_encoding'),"
                        " '2024-03-04'::date::text, chr(233), length(%s)", ("é",)).fetchone()
                if who == "A":
                    assert row == ("Asia/Tokyo", "A", "SQL, DMY", "LATIN1", "04/03/2024", "é", 1), row
                else:
                    assert row == (default_tz, "", default_ds, "UTF8", "2024-03-04", "é", 1), row
            # autocommit statements too (released after each one)
            assert a.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
            assert b.execute("SHOW TimeZone").fetchone() == (default_tz,)
            assert a.execute("SELECT chr(233) || 'x'").fetchone() == ("éx",)
            assert b.execute("SELECT chr(233) || 'x'").fetchone() == ("éx",)
    finally:
        a.close()
        b.close()


def test_set_of_a_reported_parameter_follows_the_client(pg, proxy_factory):
    default_tz = server_setting(pg, "TimeZone")
    assert default_tz != "America/Lima"
    proxy = proxy_factory(pool_size=1)
    a = connect(pg, proxy)
    b = connect(pg, proxy)
    try:
        a.execute("SET TimeZone = 'America/Lima'")
        assert a.info.parameter_status("TimeZone") == "America/Lima"
        for _ in range(3):
            assert b.execute("SHOW TimeZone").fetchone() == (default_tz,)
            with a.transaction():
                assert a.execute("SHOW TimeZone").fetchone() == ("America/Lima",)
            assert b.execute("SHOW TimeZone").fetchone() == (default_tz,)
        # RESET goes back to the default for A as well
        a.execute("RESET TimeZone")
        assert a.execute("SHOW TimeZone").fetchone() == (default_tz,)
        # a SET rolled back is not kept
        with pytest.raises(psycopg.errors.DivisionByZero):
            with a.transaction():
                a.execute("SET TimeZone = 'Asia/Kolkata'")
                a.execute("SELECT 1/0")
        assert a.execute("SHOW TimeZone").fetchone() == (default_tz,)
        assert b.execute("SHOW TimeZone").fetchone() == (default_tz,)
    finally:
        a.close()
        b.close()


# -- 6. a backend that dies mid-transaction ------------------------------------

def test_backend_killed_mid_transaction_ends_only_that_client(pg, proxy_factory):
    make_table(pg, "pool_victim", rows=2)
    proxy = proxy_factory(pool_size=5)
    a = connect(pg, proxy, autocommit=False)
    b = connect(pg, proxy, autocommit=False)
    try:
        a.execute("UPDATE pool_victim SET n = n + 1 WHERE id = 1")
        pid_a = pid_of(a)
        b.execute("UPDATE pool_victim SET n = n + 1 WHERE id = 2")
        pid_b = pid_of(b)
        assert pid_a != pid_b
        open_before = proxy.pool.open_count(app_key(pg))
        with pg.superuser_conn() as su:
            su.execute("SELECT pg_terminate_backend(%s)", (pid_a,))
        assert wait_until(lambda: pid_a not in pg.backend_pids(user="app", dbname="appdb"))
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            a.execute("SELECT 1")
        assert time.monotonic() - t0 < 60             # told, not left waiting
        assert a.closed
        assert wait_until(lambda: proxy.pool.open_count(app_key(pg)) == open_before - 1)
        # B is in the middle of its own transaction and never noticed
        assert pid_of(b) == pid_b
        b.execute("UPDATE pool_victim SET n = n + 1 WHERE id = 2")
        b.commit()
        assert b.execute("SELECT n FROM pool_victim ORDER BY id").fetchall() == [(0,), (2,)]
        b.commit()
        assert wait_until(lambda: proxy.server.session_count() == 1)
    finally:
        a.close()
        b.close()


# -- 7. a client that vanishes mid-transaction ---------------------------------

def test_client_vanishing_mid_transaction_closes_its_backend(pg, proxy_factory):
    make_table(pg, "pool_lockrow")
    proxy = proxy_factory(pool_size=5)
    b = connect(pg, proxy)
    a = connect(pg, proxy, autocommit=False)
    try:
        assert a.execute("SELECT id FROM pool_lockrow WHERE id = 1 FOR UPDATE").fetchone() == (1,)
        pid_a = pid_of(a)
        with pytest.raises(psycopg.errors.LockNotAvailable):      # the lock really is held
            with b.transaction():
                b.execute("SELECT id FROM pool_lockrow WHERE id = 1 FOR UPDATE NOWAIT")
        assert proxy.pool.open_count(app_key(pg)) == 2
        time.sleep(0.2)            # B's relay has settled after its ROLLBACK (it keeps its backend)
        parked_before = proxy.pool.stats["parked"]
        sessions_before = proxy.server.session_count()

        vanish(a)
        t0 = time.monotonic()
        assert wait_until(lambda: pid_a not in pg.backend_pids(user="app", dbname="appdb"), timeout=5), \
            "the vanished client's backend is still connected"
        gone_after = time.monotonic() - t0
        assert proxy.pool.stats["parked"] == parked_before, "the backend of a vanished client was parked"
        assert wait_until(lambda: proxy.server.session_count() == sessions_before - 1)

        t0 = time.monotonic()
        with b.transaction():
            b.execute("SET LOCAL lock_timeout = '5s'")
            assert b.execute("SELECT id FROM pool_lockrow WHERE id = 1 FOR UPDATE").fetchone() == (1,)
            assert pid_of(b) != pid_a
        print(f"\nvanished client's backend gone after {gone_after:.3f}s; "
              f"row lock taken by another client {time.monotonic() - t0:.3f}s later")
    finally:
        a.close()
        b.close()


def test_client_vanishing_mid_extended_batch_closes_its_backend(pg, proxy_factory):
    """Parse/Bind sent without Sync (the server holds state for it): never parked."""
    proxy = proxy_factory(pool_size=5)
    b = connect(pg, proxy)
    s = start_login(proxy.host, proxy.port, user="trustuser", dbname="appdb")
    try:
        while True:
            kind, _ = read_message(s)
            if kind == "Z":
                break
            assert kind != "E"
        s.sendall(_message(b"Q", b"SELECT pg_backend_pid()\0"))
        pid = None
        while True:
            kind, body = read_message(s)
            if kind == "D":
                pid = int(body[6:].decode())
            if kind == "Z":
                break
        assert proxy.pool.open_count(app_key(pg, "trustuser")) == 1
        time.sleep(0.2)
        parked_before = proxy.pool.stats["parked"]
        # an unsynced extended batch takes the backend and leaves it mid-batch
        s.sendall(_message(b"P", b"\0SELECT 1\0\0\0") + _message(b"B", b"\0\0\0\0\0\0\0\0")
                  + _message(b"E", b"\0\0\0\0\0") + _message(b"H", b""))
        kind, _ = read_message(s)
        assert kind == "1"                         # ParseComplete: the server holds the batch
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()                                  # RST
        assert wait_until(lambda: pid not in pg.backend_pids(user="trustuser"), timeout=5)
        # (the proxy frees the slot just after the close PostgreSQL may already have acted on)
        assert wait_until(lambda: proxy.pool.open_count(app_key(pg, "trustuser")) == 0, timeout=5), \
            proxy.pool.open_count(app_key(pg, "trustuser"))
        assert proxy.pool.stats["parked"] == parked_before
        assert b.execute("SELECT 1").fetchone() == (1,)
    finally:
        s.close()
        b.close()


# -- 8. query_wait_timeout -------------------------------------------------------

def test_query_wait_timeout(pg, proxy_factory):
    proxy = proxy_factory(pool_size=1, query_wait_timeout=1)
    first = connect(pg, proxy, autocommit=False)
    second = connect(pg, proxy)
    try:
        first.execute("SELECT 1")                 # holds the only backend in a transaction
        t0 = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
            second.execute("SELECT 2")
        waited = time.monotonic() - t0
        assert 0.9 <= waited < 20, waited
        assert second.closed
        # a login meanwhile also waits for a slot and times out with 53300
        t0 = time.monotonic()
        res = raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret")
        login_waited = time.monotonic() - t0
        assert res.sqlstate == "53300" and "query_wait_timeout" in res.error["M"], res
        assert 0.9 <= login_waited < 20
        print(f"\nquery_wait_timeout 1s: query gave up after {waited:.2f}s, login after {login_waited:.2f}s")
        first.commit()
        with connect(pg, proxy) as third:
            assert third.execute("SELECT 3").fetchone() == (3,)
        assert first.execute("SELECT 4").fetchone() == (4,)
        first.commit()
        assert proxy.pool.stats["wait_timeouts"] == 2
    finally:
        first.close()
        second.close()


def test_slot_freed_by_a_dead_connection_reaches_a_waiting_login(pg, proxy_factory):
    """A slot freed while both a query and a login wait must not be lost on the query waiter.

    With pass-through auth only a login can use a free slot (a logged-in client
    cannot dial); waking just one waiter, and that one a query waiter that goes
    back to sleep, leaves the login waiting until query_wait_timeout.
    """
    proxy = proxy_factory(pool_size=2, query_wait_timeout=60)
    key = app_key(pg)
    a = connect(pg, proxy, autocommit=False)
    d = connect(pg, proxy, autocommit=False)
    b = connect(pg, proxy)
    threads = []
    try:
        a.execute("SELECT 1")           # A and D hold both backends in open transactions
        d.execute("SELECT 1")
        assert proxy.pool.open_count(key) == 2 and proxy.pool.idle_count(key) == 0
        outcome = {}
        waits = proxy.pool.stats["waits"]

        def query_b():
            try:
                outcome["b"] = b.execute("SELECT 'b'").fetchone()
            except psycopg.Error as exc:
                outcome["b"] = exc

        def login_c():
            t0 = time.monotonic()
            outcome["c"] = raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret")
            outcome["c_time"] = time.monotonic() - t0

        threads.append(threading.Thread(target=query_b, daemon=True))
        threads[-1].start()
        assert wait_until(lambda: proxy.pool.stats["waits"] == waits + 1)     # B waits first
        threads.append(threading.Thread(target=login_c, daemon=True))
        threads[-1].start()
        assert wait_until(lambda: proxy.pool.stats["waits"] == waits + 2)     # then C
        vanish(a)                       # A's backend is closed (mid-transaction): one slot frees
        threads[1].join(30)
        assert "c" in outcome                     # (had it been left waiting: query_wait_timeout, 60 s)
        assert outcome["c"].ok, (outcome["c"].error, outcome["c_time"])
        d.commit()                      # B gets D's backend
        threads[0].join(10)
        assert outcome["b"] == ("b",)
    finally:
        for t in threads:
            t.join(10)
        for c in (a, b, d):
            c.close()


# -- 9. pipelines are never cut ------------------------------------------------

@pytest.mark.parametrize("autocommit", [True, False])
def test_interleaved_pipelines_on_one_backend(pg, proxy_factory, autocommit):
    proxy = proxy_factory(pool_size=1, query_wait_timeout=60)
    conns = [connect(pg, proxy, autocommit=autocommit) for _ in range(2)]
    errors = []
    rounds = 10
    start = threading.Barrier(2)

    def worker(cid, conn):
        try:
            start.wait(10)
            for r in range(rounds):
                with conn.pipeline():
                    curs = [conn.execute("SELECT %s::text, %s::int, %s::int * 3, repeat('x', %s)",
                                         (f"c{cid}", r, i, i * 37 % 2000)) for i in range(100)]
                    if not autocommit:
                        conn.commit()
                got = [c.fetchone() for c in curs]
                want = [(f"c{cid}", r, i * 3, "x" * (i * 37 % 2000)) for i in range(100)]
                assert got == want, f"client {cid} round {r}: wrong results"
        except BaseException as exc:  # noqa: BLE001
            errors.append((cid, repr(exc)))

    threads = [threading.Thread(target=worker, args=(i, c), daemon=True) for i, c in enumerate(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not errors, errors
        assert not any(t.is_alive() for t in threads)
        # both really shared one backend
        pids = []
        for c in conns:
            pids.append(pid_of(c))
            if not autocommit:
                c.commit()
        assert pids[0] == pids[1]
    finally:
        for c in conns:
            c.close()


def test_pipeline_with_an_error_in_the_middle(pg, proxy_factory):
    proxy = proxy_factory(pool_size=1, query_wait_timeout=10)
    a = connect(pg, proxy)
    b = connect(pg, proxy)
    try:
        for _ in range(3):
            with pytest.raises(psycopg.errors.DivisionByZero):
                with a.pipeline():
                    for i in range(50):
                        a.execute("SELECT %s::int / %s::int", (i, 0 if i == 25 else 1))
            assert b.execute("SELECT 'b'").fetchone() == ("b",)
            assert a.execute("SELECT 'a'").fetchone() == ("a",)
    finally:
        a.close()
        b.close()


# -- 10. max_client_conn -------------------------------------------------------

def test_max_client_conn(pg, proxy_factory):
    proxy = proxy_factory(max_client_conn=3)
    conns = [connect(pg, proxy) for _ in range(3)]
    try:
        res = raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret")
        assert res.sqlstate == "53300", res
        assert "max_client_conn" in res.error["M"]
        with pytest.raises(psycopg.OperationalError, match="max_client_conn"):
            connect(pg, proxy, sslmode="disable")
        for c in conns:
            assert c.execute("SELECT 1").fetchone() == (1,)
        conns.pop().close()
        assert wait_until(lambda: proxy.server.session_count() == 2)
        assert raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret").ok
    finally:
        for c in conns:
            c.close()


def test_max_client_conn_error_reaches_a_client_that_asks_for_ssl_first(pg, proxy_factory):
    """libpq's default sslmode=prefer sends SSLRequest first: the refusal must still be readable.

    PostgreSQL itself answers the SSLRequest and sends "too many clients" after
    the StartupMessage; an ErrorResponse in place of the SSL answer reaches
    libpq only as "server sent an error response during SSL exchange".
    """
    proxy = proxy_factory(max_client_conn=1)
    with connect(pg, proxy):
        res = psql(proxy, sql="SELECT 1", env={"PGSSLMODE": "prefer"})
        assert res.returncode != 0
        assert "max_client_conn" in res.stderr, res.stderr


def test_max_client_conn_holds_under_a_burst(pg, proxy_factory):
    """Simultaneous connects must not slip past the limit."""
    proxy = proxy_factory(max_client_conn=3, pool_size=20)
    socks = []
    try:
        for _ in range(12):
            socks.append(start_login(proxy.host, proxy.port))
        kinds = []
        for s in socks:
            kind, body = read_message(s)
            kinds.append(kind if kind != "E" else
                         "E53300" if b"C53300\0" in body else "E" + repr(body))
        admitted = kinds.count("R")
        assert admitted + kinds.count("E53300") == len(socks), kinds
        assert admitted == 3, f"{admitted} of {len(socks)} simultaneous clients admitted with max_client_conn 3"
    finally:
        for s in socks:
            s.close()


# -- 11. no thread, socket or fd leak ------------------------------------------

def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_thread_or_fd_leak(pg, proxy_factory):
    pg.backend_pids()                      # the fixture's monitor connection, opened before the baseline
    threads0, fds0 = threading.active_count(), _fd_count()
    proxy = proxy_factory(pool_size=5, query_wait_timeout=30)
    threads1, fds1 = threading.active_count(), _fd_count()
    key = app_key(pg)
    errors = []

    def normal(i):
        with connect(pg, proxy, connect_timeout=60) as c:
            assert c.execute("SELECT %s::int", (i,)).fetchone() == (i,)

    def abrupt_in_transaction(i):
        c = connect(pg, proxy, autocommit=False, connect_timeout=60)
        try:
            c.execute("SELECT %s::int", (i,))
            vanish(c)
        finally:
            c.close()

    def abrupt_idle(i):
        c = connect(pg, proxy, connect_timeout=60)
        try:
            c.execute("SELECT 1")
            vanish(c)
        finally:
            c.close()

    def half_login(i):
        s = start_login(proxy.host, proxy.port)
        try:
            read_message(s)                 # the server's SASL request, then gone
        finally:
            s.close()

    def connect_only(i):
        socket.create_connection((proxy.host, proxy.port), timeout=10).close()

    kinds = [normal, abrupt_in_transaction, abrupt_idle, half_login, connect_only] * 6

    def run(fn, i):
        try:
            fn(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append((fn.__name__, i, repr(exc)))

    for start in range(0, len(kinds), 10):
        batch = [threading.Thread(target=run, args=(fn, start + j), daemon=True)
                 for j, fn in enumerate(kinds[start:start + 10])]
        for t in batch:
            t.start()
        for t in batch:
            t.join(120)
    assert not errors, errors
    assert wait_until(lambda: proxy.server.session_count() == 0, timeout=10), proxy.server.session_count()
    assert wait_until(lambda: threading.active_count() <= threads1, timeout=10), \
        [t.name for t in threading.enumerate()]
    parked = proxy.pool.open_count(key)
    assert parked <= 5
    assert wait_until(lambda: _fd_count() <= fds1 + parked, timeout=10), (fds1, parked, _fd_count())
    assert proxy.pool.idle_count(key) == parked       # everything open is parked, nothing in limbo
    print(f"\nleak check: threads {threads0} -> {threads1} (proxy up) -> {threading.active_count()}; "
          f"fds {fds0} -> {fds1} -> {_fd_count()} with {parked} parked; stats {proxy.pool.snapshot()['stats']}")
    proxy.stop()
    assert wait_until(lambda: threading.active_count() <= threads0, timeout=10)
    assert wait_until(lambda: _fd_count() <= fds0, timeout=10), (fds0, _fd_count())


def test_connection_whose_reset_fails_is_closed_not_handed_on(pg, proxy_factory):
    """The reset is sent on release and its answer checked on checkout: a failed
    reset closes the connection there, and the client gets a fresh one."""
    proxy = proxy_factory(pool_size=1, auth_type="trust", reset_query="SELECT 1/0")
    first = psycopg.connect(pg.dsn(user="trustuser", host=proxy.host, port=proxy.port),
                            autocommit=True, prepare_threshold=None)
    first_pid = first.execute("SELECT pg_backend_pid()").fetchone()[0]
    first.close()                      # release: reset sent, connection parked unverified
    assert wait_until(lambda: proxy.pool.idle_count() == 1)
    with psycopg.connect(pg.dsn(user="trustuser", host=proxy.host, port=proxy.port),
                         autocommit=True, prepare_threshold=None) as second:
        second_pid = second.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert second_pid != first_pid
    assert proxy.pool.stats["reset_failed"] >= 1
    assert first_pid not in pg.backend_pids()


def test_lone_flush_between_transactions_does_not_pin_the_connection(pg, proxy_factory):
    """A client that sends a Flush (no answer comes) while idle between transactions
    must still let a waiting client have the connection (psycopg ends pipelines with
    Sync then Flush, sometimes in separate packets)."""
    proxy = proxy_factory(pool_size=1, auth_type="trust", query_wait_timeout=60)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as raw:
        raw.sendall(startup_packet({"user": "trustuser", "database": "appdb"}))
        while read_message(raw)[0] != "Z":
            pass
        raw.sendall(_message(b"Q", b"SELECT 1\0"))
        while read_message(raw)[0] != "Z":
            pass
        raw.sendall(_message(b"H", b""))          # Flush: the server sends nothing back
        time.sleep(0.2)
        t0 = time.monotonic()
        with trust_connect(pg, proxy) as other:
            assert other.execute("SELECT 2").fetchone() == (2,)
        assert time.monotonic() - t0 < 30             # handed the connection, not query_wait_timeout
        raw.sendall(_message(b"Q", b"SELECT 3\0"))   # and the first client still works
        kinds = []
        while not kinds or kinds[-1] != "Z":
            kinds.append(read_message(raw)[0])
        assert "D" in kinds and "E" not in kinds
