"""DDL does not break shared prepared statements (issue 20 item 4).

In transaction mode the proxy prepares each statement text once per server
connection and shares it between clients (prepared.py).  After DDL changes
the result type of a prepared query, PostgreSQL answers every execution of a
statement prepared before it with ``0A000 cached plan must not change result
type``, until the statement is prepared again.  Drivers recover by preparing
again (psycopg under a new name, asyncpg under a new name and retrying at
once); directly, each client gets the error once.  Before this work
(d407d70) the proxy answered that new Parse from its cache, as the server
connection "had" the statement, and the client got the error forever.

Here: more clients than ``pool_size`` (both server connections hold the
stale statement), DDL from outside, and each client must get the error at
most once, and then the new result type, on whichever server connection.
"""

from __future__ import annotations

import asyncio
import threading

import psycopg
import pytest

from helpers import connect

CLIENTS = 6
POOL_SIZE = 2
#: What changes the result type of ``SELECT * FROM <table> WHERE a = $1``, and the row it then gives.
DDL = {
    "add a column": ("ALTER TABLE {t} ADD COLUMN c int DEFAULT 7", (1, 10, 7)),
    "change a column's type": ("ALTER TABLE {t} ALTER COLUMN b TYPE text", (1, "10")),
    "replace the table": ("DROP TABLE {t}; CREATE TABLE {t} (a int, b int, d text DEFAULT 'x'); "
                          "INSERT INTO {t} VALUES (1, 10); GRANT ALL ON {t} TO PUBLIC", (1, 10, "x")),
}
CACHED_PLAN_ERROR = "cached plan must not change result type"


def make_table(pg, name: str) -> None:
    with pg.superuser_conn("appdb") as su:
        su.execute(f"DROP TABLE IF EXISTS {name}")
        su.execute(f"CREATE TABLE {name} (a int, b int)")
        su.execute(f"INSERT INTO {name} VALUES (1, 10)")
        su.execute(f"GRANT ALL ON {name} TO PUBLIC")


def run_ddl(pg, sql: str) -> None:
    with pg.superuser_conn("appdb") as su:
        su.execute(sql)


@pytest.mark.parametrize("change", list(DDL))
def test_psycopg_clients_get_the_cached_plan_error_once_then_the_new_result(pg, proxy_factory, change):
    """psycopg's own recovery: the error ends the transaction, the application rolls back, psycopg
    deallocates its statements (DEALLOCATE ALL after ROLLBACK) and prepares the query again.

    The deallocation cleans the one server connection it runs on; the other keeps the stale plan,
    and a client that prepares the query there next (after the DDL: directly it would get no error)
    must get the new plan, not the stale one from the proxy's cache.
    """
    table = "ddl_psycopg_" + str(list(DDL).index(change))
    make_table(pg, table)
    query = f"SELECT *, pg_backend_pid() FROM {table} WHERE a = %s"     # (the pid: which server connection)
    expected = DDL[change][1]
    proxy = proxy_factory(pool_size=POOL_SIZE, auth_type="trust")
    conns = [connect(pg, proxy, user="trustuser", autocommit=False, prepare_threshold=0)
             for _ in range(CLIENTS + 2)]
    old, holder, late = conns[:CLIENTS], conns[CLIENTS], conns[CLIENTS + 1]
    errors = {i: [] for i in range(CLIENTS)}
    rows = {i: [] for i in range(CLIENTS)}
    barrier = threading.Barrier(CLIENTS)
    pids = set()

    def execute(conn):
        *row, pid = conn.execute(query, (1,)).fetchone()
        pids.add(pid)
        return tuple(row)

    def client(i: int, rounds: int) -> None:
        conn = old[i]
        barrier.wait()
        for _ in range(rounds):
            try:
                rows[i].append(execute(conn))
                conn.commit()
            except psycopg.Error as exc:
                errors[i].append((exc.sqlstate, str(exc)))
                conn.rollback()

    def all_clients(rounds: int) -> None:
        threads = [threading.Thread(target=client, args=(i, rounds)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)

    try:
        all_clients(20)          # every client prepares it; both server connections get it
        assert errors == {i: [] for i in range(CLIENTS)}
        assert all(r == [(1, 10)] * 20 for r in rows.values()), rows
        assert len(pids) == POOL_SIZE          # the statement is on both server connections
        run_ddl(pg, DDL[change][0].format(t=table))

        holder.execute("SELECT 1")                 # holds server connection P in a transaction
        with pytest.raises(psycopg.Error) as first:
            execute(old[0])                        # on Q, prepared before the DDL: the error, as directly
        old[0].rollback()                          # ... and psycopg's DEALLOCATE ALL, on Q
        assert (first.value.sqlstate, str(first.value)) == ("0A000", CACHED_PLAN_ERROR)
        assert execute(old[0]) == expected         # prepared again: the new plan; Q stays held
        holder.commit()                            # P (with the stale plan) is free again
        assert execute(late) == expected           # prepared after the DDL, on P: as directly, no error
        late.commit()
        old[0].commit()

        rows = {i: [] for i in range(CLIENTS)}
        pids.clear()
        all_clients(30)
    finally:
        for conn in conns:
            conn.close()
    told = sum(len(e) for e in errors.values())
    print(f"\n{change}: {CLIENTS} psycopg clients on pool_size {POOL_SIZE}: {told + 1} "
          f"'{CACHED_PLAN_ERROR}' errors in all, then {sum(len(r) for r in rows.values())} rows of the new shape")
    assert errors[0] == []
    for i in range(1, CLIENTS):
        assert len(errors[i]) <= 1, errors[i]                       # at most once, as directly
        assert all(e == ("0A000", CACHED_PLAN_ERROR) for e in errors[i]), errors[i]
    for i in range(CLIENTS):
        assert rows[i] == [expected] * (30 - len(errors[i])), rows[i]
    assert len(pids) == POOL_SIZE


def asyncpg_connect(pg, proxy):
    import asyncpg
    return asyncpg.connect(host=proxy.host, port=proxy.port, user="trustuser", database="appdb",
                           password=pg.passwords["trustuser"], ssl=False)


@pytest.mark.parametrize("change", list(DDL))
def test_asyncpg_recovers_by_itself_after_ddl(pg, proxy_factory, change):
    """asyncpg re-prepares and retries once outside a transaction: the application sees no error.
    Inside a transaction it raises the error (as directly) and the next transaction works."""
    asyncpg = pytest.importorskip("asyncpg")
    table = "ddl_asyncpg_" + str(list(DDL).index(change))
    make_table(pg, table)
    query = f"SELECT * FROM {table} WHERE a = $1"
    proxy = proxy_factory(pool_size=POOL_SIZE, auth_type="trust")
    expected = DDL[change][1]

    async def scenario():
        conns = [await asyncpg_connect(pg, proxy) for _ in range(CLIENTS)]
        try:
            async def rounds(conn, n):
                return [tuple(await conn.fetchrow(query, 1)) for _ in range(n)]

            before = await asyncio.gather(*(rounds(c, 20) for c in conns))
            assert before == [[(1, 10)] * 20] * CLIENTS
            await asyncio.get_running_loop().run_in_executor(None, run_ddl, pg, DDL[change][0].format(t=table))
            after = await asyncio.gather(*(rounds(c, 20) for c in conns[:CLIENTS // 2]))
            assert after == [[expected] * 20] * (CLIENTS // 2)     # no error reached the application
            in_transaction = []
            for conn in conns[CLIENTS // 2:]:
                try:
                    async with conn.transaction():
                        in_transaction.append(tuple(await conn.fetchrow(query, 1)))
                except asyncpg.exceptions.InvalidCachedStatementError as exc:
                    in_transaction.append(exc.sqlstate)
                async with conn.transaction():
                    in_transaction.append(tuple(await conn.fetchrow(query, 1)))
            return in_transaction
        finally:
            for conn in conns:
                await conn.close()

    in_transaction = asyncio.run(scenario())
    print(f"\n{change}: asyncpg in a transaction after the DDL: {in_transaction}")
    assert len(in_transaction) == 2 * (CLIENTS - CLIENTS // 2)
    for first, second in zip(in_transaction[::2], in_transaction[1::2]):
        assert first in ("0A000", expected)     # the error once (as directly), unless another client's recovery
        assert second == expected               # already re-prepared the statement where this one ran


def test_after_the_error_each_server_connection_plans_the_statement_again_and_old_names_keep_failing():
    """The rule on crafted streams (prepared.py, no server): two server connections hold the old plan;
    client A's Bind gets the error on one; A's new Parse (its driver's recovery) closes and prepares it
    again on the other too, instead of being answered from the cache; client B's name from before the
    change gets the error it would get directly, also where the proxy now holds only the new plan."""
    from threadpool_proxy import prepared as pp
    from test_prepared_unit import BIND_OK, CLOSE_OK, IDLE, PARSE_OK, SYNC, Client, bind, close, complete
    from test_prepared_unit import error, execute, parse, server_name
    from helpers import parse_error_fields

    q = "SELECT * FROM ddl_unit WHERE a = $1"
    name = server_name(q)
    s1, s2 = pp.ServerStatements(10), pp.ServerStatements(10)
    a, b = Client(), Client()
    for client, server in ((a, s1), (b, s2)):
        client.send(parse("s", q) + SYNC, server)
        client.reply(PARSE_OK + IDLE)
        client.take()
    # DDL.  A's Bind on s1: the server's own error.
    assert a.send(bind("s") + execute() + SYNC, s1) == bind(name) + execute() + SYNC
    server_error = error("0A000", CACHED_PLAN_ERROR)
    a.reply(server_error + IDLE)
    assert a.take() == server_error + IDLE
    # A prepares it again under a new name, and runs it on s2: planned again there, not taken from the cache.
    sent = a.send(parse("s_new", q) + bind("s_new") + execute() + SYNC, s2)
    assert sent == close(b"S", name) + parse(name, q) + bind(name) + execute() + SYNC
    a.reply(CLOSE_OK + PARSE_OK + BIND_OK + complete("SELECT 1") + IDLE)
    assert a.take() == PARSE_OK + BIND_OK + complete("SELECT 1") + IDLE
    # ... and on s1, where the server still has the old plan.
    assert a.send(bind("s_new") + execute() + SYNC, s1) == (close(b"S", name) + parse(name, q) + bind(name)
                                                            + execute() + SYNC)
    a.reply(CLOSE_OK + PARSE_OK + BIND_OK + complete("SELECT 1") + IDLE)
    assert a.take() == BIND_OK + complete("SELECT 1") + IDLE
    # B's "s" (old result type) on s2, which now holds only the new plan: PostgreSQL's error, as directly.
    assert b.send(bind("s") + execute() + SYNC, s2) == pp._REFUSAL_PARSE + execute() + SYNC
    b.reply(error("42703") + IDLE)
    got = b.take()
    assert got[:1] == b"E" and got.endswith(IDLE)
    fields = parse_error_fields(got[5:-len(IDLE)])
    assert (fields["S"], fields["C"], fields["M"], fields["R"]) == ("ERROR", "0A000", CACHED_PLAN_ERROR,
                                                                    "RevalidateCachedQuery")
    # A new Parse by B of the same text gets the new plan from the cache: no round trip.
    assert b.send(parse("s2", q) + SYNC, s2) == SYNC
    b.reply(IDLE)
    assert b.take() == PARSE_OK + IDLE
