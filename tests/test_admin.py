"""The admin console (database ``threadpool_proxy``, alias ``pgbouncer``) through psql and psycopg.

The base configuration (conftest.ProxyFactory) has a ``*`` entry and
pass-through auth, so console logins are checked by PostgreSQL itself
(database ``postgres``); ``app`` is an admin user, ``other`` a stats user.
"""

from __future__ import annotations

import functools
import threading
import time

import psycopg
import pytest

import helpers
from helpers import psql, raw_login, wait_until
from threadpool_proxy import stats as stats_mod

connect = functools.partial(helpers.connect, prepare_threshold=None)

CONSOLE = {"admin_users": ["app"], "stats_users": ["other"]}


@pytest.fixture
def proxy(proxy_factory):
    return proxy_factory(**CONSOLE)


def console(pg, proxy, user="app", dbname="threadpool_proxy", autocommit=True):
    return connect(pg, proxy, user=user, dbname=dbname, autocommit=autocommit)


def show(pg, proxy, what, user="app"):
    """SHOW what, as a list of dicts (column -> value), through psycopg."""
    with console(pg, proxy, user=user) as conn:
        cur = conn.execute(f"SHOW {what}")
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def psql_console(proxy, sql, user="app", dbname="pgbouncer"):
    return psql(proxy, sql=sql, user=user, dbname=dbname)


# -- who may log in ---------------------------------------------------------------

def test_admin_and_stats_users_log_in_with_both_names(pg, proxy):
    for dbname in ("threadpool_proxy", "pgbouncer"):
        for user in ("app", "other"):
            r = psql_console(proxy, "SHOW VERSION", user=user, dbname=dbname)
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip().startswith("threadpool_proxy ")


def test_other_users_are_refused(pg, proxy):
    result = raw_login(proxy.host, proxy.port, "md5user", "threadpool_proxy", password="md5-secret")
    assert not result.ok
    assert result.sqlstate == "28000"
    assert "may not use the admin console" in result.error["M"]


def test_wrong_password_is_refused_by_postgresql(pg, proxy):
    result = raw_login(proxy.host, proxy.port, "app", "threadpool_proxy", password="wrong")
    assert result.sqlstate == "28P01"
    # and the console's pass-through check left no server connection behind
    assert wait_until(lambda: not pg.backend_pids(user="app", dbname="postgres"))


def test_console_with_an_auth_file(pg, proxy_factory, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, **CONSOLE)
    assert psql_console(proxy, "SHOW VERSION").returncode == 0
    bad = raw_login(proxy.host, proxy.port, "app", "pgbouncer", password="wrong")
    assert bad.sqlstate == "28P01"


def test_no_console_without_admin_users(pg, proxy_factory):
    proxy = proxy_factory()
    result = raw_login(proxy.host, proxy.port, "app", "pgbouncer", password="app-secret")
    assert result.sqlstate == "28000"


# -- SHOW ----------------------------------------------------------------------------

def test_show_pools_counts_clients_and_servers(pg, proxy):
    busy = connect(pg, proxy)
    idle = connect(pg, proxy)
    busy.execute("BEGIN")
    busy.execute("SELECT 1")
    try:
        pools = {(p["database"], p["user"]): p for p in show(pg, proxy, "POOLS")}
        pool = pools[("appdb", "app")]
        assert pool["cl_active"] == 2 and pool["cl_waiting"] == 0
        assert pool["sv_active"] == 1                      # the one in a transaction
        assert pool["sv_active"] + pool["sv_idle"] == 2    # the other client keeps its idle one
        assert pool["pool_mode"] == "transaction"
        assert pool["maxwait"] == 0
    finally:
        busy.close()
        idle.close()


def test_show_pools_through_psql_prints_a_table(pg, proxy):
    with connect(pg, proxy):
        r = psql(proxy, "-P", "pager=off", sql="SHOW POOLS", user="app", dbname="pgbouncer")
    assert r.returncode == 0, r.stderr
    assert "appdb|app|1|0|" in r.stdout


def test_show_pools_shows_waiting_clients_and_maxwait(pg, proxy_factory):
    proxy = proxy_factory(pool_size=1, **CONSOLE)
    first = connect(pg, proxy)
    holder = connect(pg, proxy)      # its login took the only slot, closing first's idle connection
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    done = threading.Event()

    def wait_for_the_connection():
        first.execute("SELECT 1")
        done.set()

    t = threading.Thread(target=wait_for_the_connection, daemon=True)
    t.start()
    try:
        def pool():
            return {(p["database"], p["user"]): p for p in show(pg, proxy, "POOLS")}[("appdb", "app")]
        assert wait_until(lambda: pool()["cl_waiting"] == 1, timeout=10), "no waiting client seen"
        states = sorted(c["state"] for c in show(pg, proxy, "CLIENTS") if c["database"] == "appdb")
        assert states == ["active", "waiting"]
        assert wait_until(lambda: pool()["maxwait"] >= 1, timeout=5)
        assert pool()["cl_active"] == 1 and pool()["sv_active"] == 1
    finally:
        holder.execute("COMMIT")
        assert done.wait(10)
        t.join(5)
        holder.close()
        first.close()


def test_show_stats_totals(pg, proxy):
    with connect(pg, proxy) as conn:
        for _ in range(5):
            conn.execute("SELECT 1")
        with conn.transaction():
            conn.execute("SELECT 1")
            time.sleep(0.2)                          # in the transaction, but no query running
            conn.execute("SELECT 2")
    stats = {s["database"]: s for s in show(pg, proxy, "STATS")}["appdb"]
    assert stats["total_xact_count"] == 6            # 5 autocommit statements and one block
    assert stats["total_query_count"] == 9           # BEGIN, 2 statements, COMMIT
    assert stats["total_received"] > 0 and stats["total_sent"] > stats["total_received"]
    assert stats["total_query_time"] > 0
    # microseconds; a transaction's time holds its queries' and the pause between them
    assert stats["total_xact_time"] - stats["total_query_time"] >= 200_000, stats
    assert stats["total_client_login_count"] == 1
    # No stats_period (60 s) has ended yet: every average is still 0.
    averages = {k: v for k, v in stats.items() if k.startswith("avg_")}
    assert {"avg_xact_count", "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time",
            "avg_wait_time"} <= set(averages) and set(averages.values()) == {0}, averages
    totals = show(pg, proxy, "STATS_TOTALS")
    assert "avg_xact_count" not in totals[0] and totals[0]["total_xact_count"] == 6
    assert "total_xact_count" not in show(pg, proxy, "STATS_AVERAGES")[0]


def test_stats_averages_cover_stats_period(pg, proxy_factory):
    """avg_*: the last stats_period's transactions, queries and bytes per second, and the time per
    transaction; back to 0 once a period passes without traffic."""
    proxy = proxy_factory(stats_period=0.5, **CONSOLE)

    def appdb():
        return [s for s in show(pg, proxy, "STATS_AVERAGES") if s["database"] == "appdb"]

    busy = []
    with connect(pg, proxy) as conn:
        for _ in range(6):
            conn.execute("SELECT pg_sleep(0.1)")            # 6 transactions of 0.1 s or more
            busy += [s for s in appdb() if s["avg_xact_time"] > 0]
        busy += wait_until(lambda: [s for s in appdb() if s["avg_xact_time"] > 0], timeout=10) or []
    assert busy, "averages never computed"
    for row in busy:
        assert row["avg_xact_time"] >= 100_000, row        # µs per transaction of that period
        assert row["avg_query_time"] > 0 and row["avg_recv"] > 0 and row["avg_sent"] > 0, row
        assert row["avg_xact_count"] <= 6 / 0.5, row        # per second: at most all 6 in one period
    assert wait_until(lambda: [s for s in appdb() if s["avg_xact_count"] == s["avg_xact_time"] == 0
                               and s["avg_query_count"] == s["avg_recv"] == s["avg_sent"] == 0], timeout=10)


def test_stats_averages_are_the_change_over_the_period():
    """The arithmetic of the avg_* figures, with the clock given: per second over the period,
    times per transaction, query and server assignment, in microseconds."""
    registry = stats_mod.StatsRegistry(period=10)
    client = stats_mod.ClientStats("appdb", "app")
    start = time.monotonic() + 10
    assert registry.tick([client], now=start)                # the first period: nothing happened
    values = dict(xact_count=20, query_count=50, server_assignment_count=4, received=1000, sent=5000,
                  xact_time=2.0, query_time=1.0, wait_time=0.2, client_login_count=3)
    for name, value in values.items():
        setattr(client, name, value)
    assert not registry.tick([client], now=start + 5)       # half a period: not yet
    assert registry.tick([client], now=start + 10)
    assert registry.averages("appdb") == {
        "xact_count": 2, "query_count": 5, "server_assignment_count": 0, "recv": 100, "sent": 500,
        "xact_time": 100_000, "query_time": 20_000, "wait_time": 50_000, "client_login_count": 0}
    assert registry.tick([client], now=start + 20)          # nothing more happened: back to 0
    assert set(registry.averages("appdb").values()) == {0}


def test_show_clients_and_servers(pg, proxy):
    with connect(pg, proxy, application_name="reporting") as conn:
        conn.execute("BEGIN")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        clients = [c for c in show(pg, proxy, "CLIENTS") if c["database"] == "appdb"]
        servers = [s for s in show(pg, proxy, "SERVERS") if s["database"] == "appdb"]
        conn.execute("COMMIT")
    assert len(clients) == 1 and len(servers) == 1
    client, server = clients[0], servers[0]
    assert client["type"] == "C" and client["user"] == "app" and client["state"] == "active"
    assert client["addr"] == "127.0.0.1" and client["application_name"] == "reporting"
    assert client["connect_time"].endswith("UTC")
    assert server["type"] == "S" and server["state"] == "active" and server["remote_pid"] == pid
    assert server["port"] == pg.port and server["link"] == client["ptr"] and client["link"] == server["ptr"]


def test_show_servers_lists_parked_connections(pg, proxy):
    a, b = connect(pg, proxy), connect(pg, proxy)
    a.close()          # its connection is reset and parked
    b.close()
    assert wait_until(lambda: proxy.pool.idle_count() == 2), proxy.pool.snapshot()
    servers = [s for s in show(pg, proxy, "SERVERS") if s["database"] == "appdb"]
    assert [s["state"] for s in servers] == ["idle", "idle"]
    assert all(s["link"] is None for s in servers)


def test_show_databases_config_lists_version_state(pg, proxy):
    databases = {d["name"]: d for d in show(pg, proxy, "DATABASES")}
    assert databases["appdb"]["host"] == pg.host and databases["appdb"]["port"] == pg.port
    assert databases["appdb"]["pool_size"] == 5 and databases["appdb"]["paused"] == 0
    assert databases["threadpool_proxy"]["port"] == proxy.port
    config = {c["key"]: c for c in show(pg, proxy, "CONFIG")}
    assert config["pool_size"]["value"] == "5" and config["pool_size"]["default"] == "20"
    assert config["admin_users"]["value"] == "app"
    lists = {r["list"]: r["items"] for r in show(pg, proxy, "LISTS")}
    assert lists["databases"] == 3 and lists["used_clients"] >= 1
    assert show(pg, proxy, "VERSION")[0]["version"].startswith("threadpool_proxy ")
    state = {r["key"]: r["value"] for r in show(pg, proxy, "STATE")}
    assert state["paused"] == "no"


def test_show_config_hides_auth_password(pg, proxy_factory, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, auth_password="s3cret",
                          auth_user="postgres", **CONSOLE)
    config = {c["key"]: c["value"] for c in show(pg, proxy, "CONFIG")}
    assert config["auth_password"] == "********"


def test_show_help_is_a_notice(pg, proxy):
    r = psql_console(proxy, "SHOW HELP")
    assert r.returncode == 0
    assert "Console usage" in r.stderr and "SHOW HELP|POOLS" in r.stderr


# -- errors ----------------------------------------------------------------------------

def test_unknown_commands_and_items(pg, proxy):
    with console(pg, proxy) as conn:
        with pytest.raises(psycopg.errors.SyntaxError, match="unknown admin console command"):
            conn.execute("SELECT 1")
        with pytest.raises(psycopg.errors.SyntaxError, match="unknown SHOW item"):
            conn.execute("SHOW NOTHING")
        assert conn.execute("SHOW VERSION").fetchone()      # still usable


def test_stats_users_may_not_run_commands(pg, proxy):
    r = psql_console(proxy, "RELOAD", user="other")
    assert r.returncode != 0
    assert "permission denied: RELOAD needs an admin user" in r.stderr
    with console(pg, proxy, user="other") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("PAUSE")
        assert conn.execute("SHOW POOLS").description is not None


def test_extended_protocol_gets_a_clear_error(pg, proxy):
    with console(pg, proxy) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="only the simple query protocol"):
            conn.execute("SHOW POOLS WHERE %s", ["x"])
        assert conn.execute("SHOW VERSION").fetchone()


def test_psycopg_transactions_are_accepted(pg, proxy):
    with console(pg, proxy, autocommit=False) as conn:       # psycopg sends BEGIN first
        assert conn.execute("SHOW VERSION").fetchone()[0].startswith("threadpool_proxy")
        conn.commit()
        assert conn.execute("SHOW LISTS").fetchall()
        conn.rollback()


def test_several_commands_in_one_query(pg, proxy):
    r = psql_console(proxy, "SHOW VERSION; SHOW STATE")
    assert r.returncode == 0, r.stderr
    assert "threadpool_proxy" in r.stdout and "active|yes" in r.stdout


# -- PAUSE, RESUME, RECONNECT, KILL, RELOAD, SHUTDOWN ---------------------------------------

def run_in_thread(fn, *args):
    """Start ``fn(*args)`` in a thread; returns (thread, outcome dict with "result" or "error", done Event)."""
    outcome, done = {}, threading.Event()

    def target():
        try:
            outcome["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = exc
        done.set()

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, outcome, done


def command(pg, proxy, sql, user="app"):
    with console(pg, proxy, user=user) as conn:
        return conn.execute(sql).statusmessage


def test_pause_waits_for_running_transactions_and_holds_new_ones(pg, proxy):
    running = connect(pg, proxy)
    other = connect(pg, proxy, user="other", dbname="otherdb")
    waiting = connect(pg, proxy)
    running.execute("BEGIN")
    running.execute("SELECT 1")
    _, paused, pause_done = run_in_thread(command, pg, proxy, "PAUSE appdb")
    assert wait_until(lambda: show(pg, proxy, "DATABASES")[0]["paused"] == 1, timeout=10)
    assert not pause_done.wait(0.5), "PAUSE returned while a transaction was running"
    _, held, held_done = run_in_thread(lambda: waiting.execute("SELECT 2").fetchone())
    assert other.execute("SELECT 3").fetchone() == (3,)       # other databases are not paused
    running.execute("COMMIT")                                  # the running transaction finishes normally
    assert pause_done.wait(10) and paused["result"] == "PAUSE"
    assert not held_done.wait(0.5), "a new transaction ran during PAUSE"
    state = {r["key"]: r["value"] for r in show(pg, proxy, "STATE")}
    assert state["paused"] == "appdb"
    assert command(pg, proxy, "RESUME appdb") == "RESUME"
    assert held_done.wait(10) and held["result"] == (2,)
    for conn in (running, other, waiting):
        conn.close()


def test_pause_everything_and_resume_errors(pg, proxy):
    assert command(pg, proxy, "PAUSE") == "PAUSE"
    assert {r["key"]: r["value"] for r in show(pg, proxy, "STATE")}["active"] == "no"
    with console(pg, proxy) as conn:
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="RESUME without a database"):
            conn.execute("RESUME appdb")
        assert conn.execute("RESUME").statusmessage == "RESUME"
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="nothing is paused"):
            conn.execute("RESUME")
        with pytest.raises(psycopg.errors.InvalidCatalogName):
            conn.execute("PAUSE nosuchdb")
        with pytest.raises(psycopg.errors.SyntaxError, match="usage: KILL db"):
            conn.execute("KILL")
    with connect(pg, proxy) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_reconnect_closes_server_connections_once_released(pg, proxy_factory, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, **CONSOLE)
    with connect(pg, proxy) as idle, connect(pg, proxy) as busy:
        idle_pid = idle.execute("SELECT pg_backend_pid()").fetchone()[0]
        busy.execute("BEGIN")
        busy_pid = busy.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert command(pg, proxy, "RECONNECT appdb") == "RECONNECT"
        servers = {s["remote_pid"]: s for s in show(pg, proxy, "SERVERS")}
        assert servers[busy_pid]["close_needed"] == 1 and idle_pid not in servers
        assert busy.execute("SELECT pg_backend_pid()").fetchone()[0] == busy_pid   # the transaction goes on
        busy.execute("COMMIT")
        assert wait_until(lambda: busy_pid not in pg.backend_pids(user="app"))
        assert idle.execute("SELECT pg_backend_pid()").fetchone()[0] not in (idle_pid, busy_pid)
    assert proxy.pool.snapshot()["stats"]["reconnected"] == 2      # the kept idle one and the busy one


def test_kill_disconnects_clients_and_holds_the_database_until_resume(pg, proxy):
    victim = connect(pg, proxy)
    bystander = connect(pg, proxy, user="other", dbname="otherdb")
    victim.execute("SELECT 1")
    assert command(pg, proxy, "KILL appdb") == "KILL"
    with pytest.raises(psycopg.OperationalError, match="KILL on the admin console"):
        victim.execute("SELECT 1")
    assert bystander.execute("SELECT 1").fetchone() == (1,)
    assert wait_until(lambda: not pg.backend_pids(user="app", dbname="appdb"))
    _, new, new_done = run_in_thread(lambda: connect(pg, proxy).execute("SELECT 4").fetchone())
    assert not new_done.wait(1.0), "a new client of a killed database got in before RESUME"
    assert command(pg, proxy, "RESUME appdb") == "RESUME"
    assert new_done.wait(10) and new.get("result") == (4,), new
    bystander.close()


def test_shutdown_stops_the_proxy(pg, proxy):
    client = connect(pg, proxy)
    with console(pg, proxy) as conn:
        assert conn.execute("SHUTDOWN").statusmessage == "SHUTDOWN"
    assert wait_until(lambda: proxy.stopping and not proxy.server.session_count())
    with pytest.raises(psycopg.OperationalError, match="shutting down"):
        client.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError, match="Connection refused"):    # no longer listening
        connect(pg, proxy, connect_timeout=2)


def write_config(path, pg, **settings):
    target = {"host": pg.host, "port": pg.port}
    raw = {"listen": {"host": "127.0.0.1", "port": 0}, "pool_mode": "transaction", "pool_size": 5,
           "databases": {"appdb": dict(target), "*": dict(target)}, **CONSOLE}
    raw.update(settings)
    path.write_text(__import__("yaml").safe_dump(raw))
    return str(path)


def test_reload_rereads_the_file_and_keeps_the_old_config_on_error(pg, proxy_factory, tmp_path):
    import threadpool_proxy
    path = tmp_path / "proxy.yaml"
    proxy = threadpool_proxy.start(write_config(path, pg, pool_size=5))
    proxy_factory.started.append(proxy)
    with connect(pg, proxy) as client:
        write_config(path, pg, pool_size=7, query_wait_timeout=33)
        assert command(pg, proxy, "RELOAD") == "RELOAD"
        config = {c["key"]: c for c in show(pg, proxy, "CONFIG")}
        assert config["pool_size"]["value"] == "7" and config["query_wait_timeout"]["value"] == "33"
        assert config["pool_size"]["changeable"] == "yes" and config["listen.port"]["changeable"] == "no"
        assert {d["name"]: d for d in show(pg, proxy, "DATABASES")}["appdb"]["pool_size"] == 7
        assert [s.checkout.db.pool_size for s in proxy.server.sessions() if s.checkout] == [7]
        path.write_text("pool_size: [not, a, number]\n")
        with console(pg, proxy) as conn:
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="RELOAD failed: .*pool_size"):
                conn.execute("RELOAD")
        assert {c["key"]: c["value"] for c in show(pg, proxy, "CONFIG")}["pool_size"] == "7"
        assert client.execute("SELECT 1").fetchone() == (1,)


def test_reload_changes_pool_size_under_load_without_errors(pg, proxy_factory, tmp_path):
    import threadpool_proxy
    path = tmp_path / "proxy.yaml"
    proxy = threadpool_proxy.start(write_config(path, pg, pool_size=4, auth_type="passthrough"))
    proxy_factory.started.append(proxy)
    clients = [connect(pg, proxy) for _ in range(20)]
    stop, errors, counts = threading.Event(), [], [0] * 20

    def work(i):
        try:
            while not stop.is_set():
                with clients[i].transaction():
                    clients[i].execute("SELECT pg_sleep(0.002)")
                counts[i] += 1
        except Exception as exc:  # noqa: BLE001 - every error fails the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(20)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: all(counts), timeout=30)
        for size in (8, 2, 6):
            write_config(path, pg, pool_size=size, auth_type="passthrough")
            assert command(pg, proxy, "RELOAD") == "RELOAD"
            before = sum(counts)
            assert wait_until(lambda: sum(counts) > before + 40, timeout=30)
            assert len(pg.backend_pids(user="app", dbname="appdb")) <= max(size, 4) + 3
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:3]
    assert proxy.config.pool_size == 6
    for conn in clients:
        conn.close()


# -- the Prometheus endpoint -------------------------------------------------------------------

def scrape(proxy) -> dict:
    """{(metric sample name, frozenset of labels): value} from the proxy's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_endpoint_shows_the_consoles_counters(pg, proxy_factory):
    proxy = proxy_factory(metrics_listen="127.0.0.1:0", **CONSOLE)
    with connect(pg, proxy) as conn, connect(pg, proxy) as busy:
        for _ in range(4):
            conn.execute("SELECT 1")
        busy.execute("BEGIN")
        busy.execute("SELECT 1")
        metrics = scrape(proxy)
        stats = {s["database"]: s for s in show(pg, proxy, "STATS")}["appdb"]
        busy.execute("COMMIT")
    appdb, pool = frozenset({("database", "appdb")}), frozenset({("database", "appdb"), ("user", "app")})
    assert metrics[("threadpool_proxy_stats_queries_pooled_total", appdb)] == stats["total_query_count"]
    assert metrics[("threadpool_proxy_stats_received_bytes_total", appdb)] == stats["total_received"]
    assert metrics[("threadpool_proxy_stats_client_logins_total", appdb)] == 2
    assert metrics[("threadpool_proxy_pools_client_active_connections", pool)] == 2
    assert metrics[("threadpool_proxy_pools_server_active_connections", pool)] == 1
    assert ("threadpool_proxy_server_connection_events_total", frozenset({("event", "reuses")})) in metrics
    assert metrics[("threadpool_proxy_server_connections", frozenset())] == 2


def test_metrics_are_off_by_default(pg, proxy):
    assert proxy.metrics is None


# -- SET, DISABLE, ENABLE ----------------------------------------------------------------

def config_values(pg, proxy):
    return {c["key"]: c["value"] for c in show(pg, proxy, "CONFIG")}


def test_set_changes_a_setting_until_the_next_reload(pg, proxy_factory, tmp_path):
    import threadpool_proxy
    path = tmp_path / "proxy.yaml"
    proxy = threadpool_proxy.start(write_config(path, pg, pool_size=5))
    proxy_factory.started.append(proxy)
    with connect(pg, proxy) as client:
        with console(pg, proxy) as conn:
            assert conn.execute("SET pool_size = 7").statusmessage == "SET"
            assert conn.execute("SET query_wait_timeout TO 33").statusmessage == "SET"
            assert conn.execute("SET reset_query = 'DISCARD ALL; SELECT 1'").statusmessage == "SET"
            assert conn.execute("set client_idle_timeout = '0.5'").statusmessage == "SET"
        values = config_values(pg, proxy)
        assert values["pool_size"] == "7" and values["query_wait_timeout"] == "33"
        assert values["reset_query"] == "DISCARD ALL; SELECT 1"
        # Entries without their own pool_size take it; logged-in clients at their next transaction.
        assert {d["name"]: d for d in show(pg, proxy, "DATABASES")}["appdb"]["pool_size"] == 7
        assert [s.checkout.db.pool_size for s in proxy.server.sessions() if s.checkout] == [7]
        # client_idle_timeout applies to new clients: this one idles past it and is ended.
        with connect(pg, proxy) as idle:
            idle.execute("SELECT 1")
            time.sleep(1.5)
            with pytest.raises(psycopg.OperationalError, match="idle-session timeout"):
                idle.execute("SELECT 1")
        with console(pg, proxy) as conn:
            assert conn.execute("RELOAD").statusmessage == "RELOAD"      # the file wins again
        assert config_values(pg, proxy)["pool_size"] == "5"
        assert client.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("sql, error, message", [
    ("SET pool_size = 0", psycopg.errors.InvalidParameterValue, "pool_size: expected a positive integer"),
    ("SET pool_size = lots", psycopg.errors.InvalidParameterValue, "pool_size: expected a positive integer"),
    ("SET pool_mode = 'sometimes'", psycopg.errors.InvalidParameterValue, "pool_mode: expected one of"),
    ("SET no_such_thing = 1", psycopg.errors.InvalidParameterValue, "no_such_thing: unknown key"),
    ("SET listen_port = 7000", psycopg.errors.InvalidParameterValue, "listen_port: changes only with a restart"),
    ("SET pool_size", psycopg.errors.SyntaxError, "usage: SET key = value"),
])
def test_set_refuses_bad_input_and_changes_nothing(pg, proxy, sql, error, message):
    with console(pg, proxy) as conn:
        with pytest.raises(error, match=message):
            conn.execute(sql)
    assert config_values(pg, proxy)["pool_size"] == "5"


def test_set_is_for_admin_users_only(pg, proxy):
    with console(pg, proxy, user="other") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET pool_size = 9")


def test_disable_refuses_new_clients_of_the_database_until_enable(pg, proxy):
    staying = connect(pg, proxy)
    with console(pg, proxy) as conn:
        assert conn.execute("DISABLE appdb").statusmessage == "DISABLE"
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="is not disabled"):
            conn.execute("ENABLE otherdb")
    result = raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret")
    assert result.sqlstate == "55000", result.error
    assert 'database "appdb" is not currently accepting connections' in result.error["M"]
    assert "ENABLE appdb" in result.error.get("H", "")
    assert staying.execute("SELECT 1").fetchone() == (1,)                 # clients already in stay
    with connect(pg, proxy, dbname="otherdb") as other_db:                 # other databases are not touched
        assert other_db.execute("SELECT 1").fetchone() == (1,)
    assert {d["name"]: d for d in show(pg, proxy, "DATABASES")}["appdb"]["disabled"] == 1
    with console(pg, proxy) as conn:
        assert conn.execute("ENABLE appdb").statusmessage == "ENABLE"
    with connect(pg, proxy) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)
    staying.close()
