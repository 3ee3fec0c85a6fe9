"""Settings follow a pooled client from one server connection to the next (issue 20, item 1).

In transaction and statement mode a client's next transaction may run on a
server connection another client used in between (and that the proxy reset).
What the client SET (search_path, statement_timeout, TIME ZONE, a custom
setting, set_config(..., false)) must still be in force there; what it SET in
a transaction that rolled back, SET LOCAL and set_config(..., true) must not.
Every test runs with more clients than pool_size, or alternates two clients on
pool_size 1, so that nothing lingers: the client really lands on a server
connection that was reset after another client used it.
"""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest

from helpers import PASSWORDS, connect

SCHEMAS = [f"tpp_s{i}" for i in range(6)]


@pytest.fixture(scope="module")
def schemas(pg):
    """Schemas tpp_s0..tpp_s5 in appdb, each with a table ``whoami`` holding its own name."""
    with pg.superuser_conn("appdb") as su:
        for name in SCHEMAS + ["tpp quote's"]:
            su.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            su.execute(f'CREATE SCHEMA "{name}" AUTHORIZATION app')
            su.execute(f'CREATE TABLE "{name}".whoami (name text)')
            su.execute(f'INSERT INTO "{name}".whoami VALUES (%s)', (name,))
            su.execute(f'GRANT ALL ON "{name}".whoami TO app')
    return SCHEMAS


def _whoami(conn) -> tuple:
    return conn.execute("SELECT name, pg_backend_pid() FROM whoami").fetchone()


def test_search_path_follows_each_of_six_clients_through_100_transactions_on_two_connections(
        pg, proxy_factory, schemas):
    proxy = proxy_factory(pool_size=2)
    results: dict = {}
    errors: list = []
    start = threading.Barrier(len(schemas))

    def client(schema: str) -> None:
        try:
            with connect(pg, proxy) as conn:
                conn.execute(f"SET search_path = {schema}, public")
                start.wait(timeout=60)
                seen = []
                for i in range(100):
                    if i % 2:
                        with conn.transaction():        # an explicit transaction block too
                            seen.append(_whoami(conn))
                    else:
                        seen.append(_whoami(conn))
                results[schema] = seen
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append((schema, exc))

    threads = [threading.Thread(target=client, args=(s,)) for s in schemas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    assert sorted(results) == sorted(schemas)
    for schema, seen in results.items():
        assert [name for name, _ in seen] == [schema] * 100, schema
    pids = {pid for seen in results.values() for _, pid in seen}
    assert len(pids) <= 2                                   # the pool's two connections, no more
    shared = {pid: {s for s, seen in results.items() if any(p == pid for _, p in seen)} for pid in pids}
    assert max(len(users) for users in shared.values()) >= 3   # each connection served several search_paths


def test_search_path_follows_asyncpg_clients_too(pg, proxy_factory, schemas):
    asyncpg = pytest.importorskip("asyncpg")
    proxy = proxy_factory(pool_size=2)

    async def client(conn, schema: str) -> list:
        await conn.execute(f"SET search_path = {schema}, public")
        seen = []
        for i in range(100):
            if i % 2:
                async with conn.transaction():
                    seen.append(tuple(await conn.fetchrow("SELECT name, pg_backend_pid() FROM whoami")))
            else:
                seen.append(tuple(await conn.fetchrow("SELECT name, pg_backend_pid() FROM whoami")))
        return seen

    async def main():
        conns = [await asyncpg.connect(host=proxy.host, port=proxy.port, user="app", password=PASSWORDS["app"],
                                       database="appdb") for _ in schemas[:4]]
        try:       # (all logged in first: a pass-through login may replace a parked connection)
            return await asyncio.gather(*(client(c, s) for c, s in zip(conns, schemas)))
        finally:
            for conn in conns:
                await conn.close()

    results = asyncio.run(asyncio.wait_for(main(), 240))
    for schema, seen in zip(schemas, results):
        assert [name for name, _ in seen] == [schema] * 100, schema
    assert len({pid for seen in results for _, pid in seen}) <= 2


class Alternating:
    """Two clients on pool_size 1 taking turns: each of A's transactions runs on the one server
    connection right after B used it (and the proxy reset it)."""

    def __init__(self, pg, proxy):
        self.a = connect(pg, proxy)
        self.b = connect(pg, proxy)

    def a_then_b(self, sql: str, params=None):
        """Run ``sql`` as A (returns its row), then a query as B on the same connection."""
        row = self.a.execute(sql, params).fetchone()
        b_row = self.b.execute("SELECT pg_backend_pid(), current_setting('search_path')").fetchone()
        return row, b_row

    def close(self):
        self.a.close()
        self.b.close()


@pytest.fixture
def alternating(pg, proxy_factory, schemas):
    clients = Alternating(pg, proxy_factory(pool_size=1))
    try:
        yield clients
    finally:
        clients.close()


def test_what_a_client_sets_is_set_again_after_another_client_used_the_connection(alternating):
    a, b = alternating.a, alternating.b
    default_path = b.execute("SHOW search_path").fetchone()[0]
    a.execute("SET search_path = tpp_s1, public")
    a.execute("SET statement_timeout = '4s'")
    a.execute("SET TIME ZONE 'Asia/Kolkata'")
    a.execute("SELECT set_config('tpp.tenant', 'acme', false)")
    for _ in range(3):
        (name, a_pid), (b_pid, b_path) = alternating.a_then_b("SELECT name, pg_backend_pid() FROM whoami")
        assert (name, a_pid) == ("tpp_s1", b_pid)                   # one connection, both clients
        assert b_path == default_path                             # none of it reached B
        assert a.execute("SELECT current_setting('statement_timeout'), current_setting('TimeZone'), "
                         "current_setting('tpp.tenant')").fetchone() == ("4s", "Asia/Kolkata", "acme")
    # (a custom setting's name stays known to a server process once used, as after DISCARD ALL
    # directly; its value does not)
    assert b.execute("SELECT current_setting('statement_timeout'), coalesce(current_setting('tpp.tenant', true), '')"
                     ).fetchone() == ("0", "")


def test_a_set_that_rolled_back_set_local_and_local_set_config_do_not_follow(alternating):
    a = alternating.a
    a.execute("SET search_path = tpp_s2, public")
    with pytest.raises(psycopg.errors.DivisionByZero):
        with a.transaction():
            a.execute("SET search_path = tpp_s3, public")
            a.execute("SELECT 1 / 0")
    a.execute("BEGIN")
    a.execute("SET search_path = tpp_s4")
    a.execute("ROLLBACK")
    with a.transaction():
        a.execute("SET LOCAL search_path = tpp_s5")
        a.execute("SELECT set_config('statement_timeout', '3s', true)")
        assert a.execute("SELECT name FROM whoami").fetchone() == ("tpp_s5",)
    with a.transaction():
        a.execute("SAVEPOINT sp")
        a.execute("SET search_path = tpp_s0")
        a.execute("ROLLBACK TO SAVEPOINT sp")
    for _ in range(2):
        (name, _), _ = alternating.a_then_b("SELECT name, pg_backend_pid() FROM whoami")
        assert name == "tpp_s2"
        assert a.execute("SHOW statement_timeout").fetchone() == ("0",)


def test_reset_and_reset_all_follow_too(alternating):
    a, b = alternating.a, alternating.b
    default_path = b.execute("SHOW search_path").fetchone()[0]
    a.execute("SET search_path = tpp_s1, public")
    a.execute("SET work_mem = '5MB'")
    alternating.a_then_b("SELECT 1")
    assert a.execute("SELECT current_setting('search_path'), current_setting('work_mem')").fetchone() == (
        "tpp_s1, public", "5MB")
    a.execute("RESET search_path")
    alternating.a_then_b("SELECT 1")
    assert a.execute("SELECT current_setting('search_path'), current_setting('work_mem')").fetchone() == (
        default_path, "5MB")
    a.execute("SET search_path = tpp_s1")
    a.execute("RESET ALL")
    alternating.a_then_b("SELECT 1")
    work_mem = b.execute("SHOW work_mem").fetchone()[0]
    assert a.execute("SELECT current_setting('search_path'), current_setting('work_mem')").fetchone() == (
        default_path, work_mem)


def test_set_config_with_bound_parameters_follows(alternating):
    """psycopg sends a query with parameters in the extended protocol: the value is not in the text."""
    a = alternating.a
    a.execute("SELECT set_config('search_path', %s, false)", ["tpp_s3, public"])
    a.execute("SELECT set_config('tpp.region', %s, false)", ["eu-west"])
    a.execute("SELECT set_config(%s, %s, false)", ["work_mem", "6MB"])       # even the name is a parameter
    (name, _), _ = alternating.a_then_b("SELECT name, pg_backend_pid() FROM whoami")
    assert name == "tpp_s3"
    assert a.execute("SELECT current_setting('tpp.region'), current_setting('work_mem')").fetchone() == (
        "eu-west", "6MB")


def test_values_are_replayed_as_literals_never_as_sql(alternating, pg):
    """A schema name with a quote, and a custom setting whose value looks like SQL: set again
    as values on the next connection, nothing of them run."""
    a = alternating.a
    a.execute('SET search_path = "tpp quote\'s", public')
    hostile = "x'); DROP TABLE tpp_s0.whoami; --"
    a.execute("SET tpp.note = '" + hostile.replace("'", "''") + "'")
    a.execute("SET application_name = 'it''s \\ mine'")
    (name, _), _ = alternating.a_then_b("SELECT name, pg_backend_pid() FROM whoami")
    assert name == "tpp quote's"
    assert a.execute("SELECT current_setting('tpp.note'), current_setting('application_name')").fetchone() == (
        hostile, "it's \\ mine")
    with pg.superuser_conn("appdb") as su:
        assert su.execute("SELECT count(*) FROM tpp_s0.whoami").fetchone() == (1,)


def test_several_statements_and_comments_in_one_query(alternating):
    a = alternating.a
    a.execute("SELECT 1; /* a comment; with a semicolon */ SET search_path = tpp_s4; -- trailing\n"
              "SELECT 'SET search_path = tpp_s5'")
    (name, _), _ = alternating.a_then_b("SELECT name, pg_backend_pid() FROM whoami")
    assert name == "tpp_s4"


def test_settings_follow_in_statement_mode(pg, proxy_factory, schemas):
    proxy = proxy_factory(pool_mode="statement", pool_size=1)
    with connect(pg, proxy) as a, connect(pg, proxy) as b:
        a.execute("SET search_path = tpp_s5, public")
        for _ in range(3):
            assert _whoami(a)[0] == "tpp_s5"
            assert b.execute("SHOW search_path").fetchone() != ("tpp_s5, public",)


# -- the statement reader, sans I/O -----------------------------------------------------------

from hypothesis import given, settings as hsettings, strategies as st  # noqa: E402

from threadpool_proxy import protocol as pq  # noqa: E402
from threadpool_proxy.sessionstate import look, looks_interesting, plain_match, tokens  # noqa: E402

FRAGMENTS = ["SELECT", "select", "Select", "INSERT INTO t VALUES", "UPDATE t SET a = 1", "BEGIN", "COMMIT", "WITH",
             "SET", "set", "SESSION", "LOCAL", "search_path", "=", "TO", "x", ";", "(", ")", ",", "1", "'a'",
             "pg_advisory_lock", "pg_try_advisory_lock", "set_config", "SET_CONFIG", "pg_notify", "NOTIFY",
             "INTO", "into", "iNtO", "TEMP", "temp", "TeMpOrArY", "TABLE", "CREATE", "DECLARE", "c", "CURSOR", "WITH",
             "HOLD", "FOR", "LISTEN", "UNLISTEN", "*", "RESET", "ALL", "DISCARD", "PREPARE", "LOAD", "ROLE",
             "--comment\n", "/* ; SET x = 1 */", "$$", "$q$ SET a = 1 $q$", "E'\\''", '"Quoted"', "pg_temp", ".",
             "\n", "\t"]


@hsettings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=12).map(" ".join))
def test_the_cheap_test_never_passes_over_a_statement_that_touches_session_state(text):
    data = text.encode()
    m = plain_match(data, 0, len(data))
    if m is not None and m.end() == len(data):
        assert not looks_interesting(data, 0, len(data))
    if not looks_interesting(data, 0, len(data)):
        effects = look(text)
        assert not effects, (text, effects.touched, effects.pins, effects.suspects, effects.notifies)


@hsettings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_the_lexer_takes_any_text(text):
    tokens(text)
    look(text)


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["SELECT 1", "SET search_path = a", "SELECT pg_advisory_lock(1)", "BEGIN",
                                 "LISTEN c"]), min_size=1, max_size=6),
       st.integers(min_value=1, max_value=40))
def test_the_scanner_sees_the_same_texts_whatever_the_reads(queries, size):
    stream = b"".join(pq.query(q) for q in queries)
    whole = pq.StatementScanner(looks_interesting, plain_match)
    whole.feed(memoryview(stream), len(stream))
    cut = pq.StatementScanner(looks_interesting, plain_match)
    for i in range(0, len(stream), size):
        chunk = memoryview(bytearray(stream[i:i + size]))
        cut.feed(chunk, len(chunk))
    assert [t for _, t, *_ in cut.looked] == [t for _, t, *_ in whole.looked]
    assert cut.requests == whole.requests == len(queries)
    assert [t.decode() for _, t, *_ in whole.looked] == [q for q in queries if q not in ("SELECT 1", "BEGIN")]
