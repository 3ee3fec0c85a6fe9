"""Several servers per database: nodes, load balancing, health checks, failover, read/write routing.

Two real clusters: ``pg`` (read-write) and ``pg_ro`` (the same roles and
passwords, ``default_transaction_read_only = on``, which libpq's
target_session_attrs reads as read-only).  Where a node is stopped it is
``pg_ro``, started again before the test ends.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import psycopg
import pytest

from helpers import connect, wait_until, write_auth_file
from threadpool_proxy.config import ConfigError, from_dict
from threadpool_proxy.nodes import Router, fits, NodeState
from threadpool_proxy.pool import BackendIdlePool, pool_key


def node(cluster, **extra):
    return {"host": cluster.host, "port": cluster.port, **extra}


@pytest.fixture
def plain_auth_file(tmp_path):
    """Plain passwords: the proxy logs in to either cluster (their SCRAM salts differ)."""
    return write_auth_file(tmp_path / "users.yaml", {
        "app": {"password": "app-secret"},
        "postgres": {"password": "postgres-secret"},
    })


def nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, entry: dict, **overrides):
    """A proxy whose appdb has the two clusters as nodes (plus ``entry``), proxy-terminated auth."""
    databases = {"appdb": {"nodes": [node(pg), node(pg_ro)], **entry}}
    databases.update(overrides.pop("databases", {}))
    settings = dict(auth_type="scram-sha-256", auth_file=str(plain_auth_file), health_check_user="postgres",
                    health_check_period=0.3, health_check_timeout=2, health_check_failures=1,
                    server_login_retry=0.2, databases=databases)
    settings.update(overrides)
    return proxy_factory(**settings)


def server_port(conn) -> int:
    return conn.execute("SELECT inet_server_port()").fetchone()[0]


def hold_transactions(pg, proxy, n: int, dbname: str = "appdb", **params) -> tuple[list, list]:
    """``n`` clients, each inside a transaction (so each holds its own server connection); their ports."""
    conns, ports = [], []
    for _ in range(n):
        conn = connect(pg, proxy, dbname=dbname, autocommit=False, **params)
        conns.append(conn)
        ports.append(server_port(conn))
    return conns, ports


def close_all(conns) -> None:
    """End each client's transaction (its server connection is parked), then the client."""
    for conn in conns:
        try:
            conn.rollback()
            conn.close()
        except Exception:
            pass


# -- configuration ------------------------------------------------------------------

def test_single_server_entry_is_one_node_and_routes_nothing():
    config = from_dict({"databases": {"app": {"host": "127.0.0.1", "port": 5433}}})
    db = config.databases["app"]
    assert [n.name for n in db.nodes] == ["127.0.0.1:5433"]
    assert db.node == "127.0.0.1:5433" and not db.multi


def test_nodes_are_parsed_with_roles_weights_and_defaults():
    config = from_dict({"load_balance": "least-connections", "databases": {
        "app": {"nodes": [{"host": "10.0.0.1", "role": "primary"}, "10.0.0.2:5433",
                          {"host": "10.0.0.3", "port": 5434, "role": "replica", "weight": 3}]},
        "app_ro": {"dbname": "app", "nodes": ["10.0.0.1:5432", {"host": "10.0.0.3", "port": 5434, "role": "replica"}],
                   "role": "replica", "target_session_attrs": "read-only", "load_balance": "disable"}}})
    app, ro = config.databases["app"], config.databases["app_ro"]
    assert [(n.name, n.role, n.weight) for n in app.nodes] == [
        ("10.0.0.1:5432", "primary", 1), ("10.0.0.2:5433", None, 1), ("10.0.0.3:5434", "replica", 3)]
    assert app.multi and app.load_balance == "least-connections" and app.target_session_attrs == "any"
    assert (app.host, app.port) == ("10.0.0.1", 5432)
    assert [n.name for n in ro.usable_nodes] == ["10.0.0.3:5434"]
    assert ro.load_balance == "disable" and ro.target_session_attrs == "read-only"
    assert config.health_check_period == 5.0 and config.health_check_failures == 2


@pytest.mark.parametrize("entry, message", [
    ({"host": "a", "nodes": ["b:1"]}, "databases.app.host: give either host/port or nodes, not both"),
    ({"nodes": []}, "databases.app.nodes: expected a non-empty list of nodes"),
    ({"nodes": ["a:1", "a:1"]}, "databases.app.nodes[1]: a:1 is listed twice"),
    ({"nodes": ["a:x"]}, "databases.app.nodes[0]: expected host:port"),
    ({"nodes": [{"port": 1}]}, "databases.app.nodes[0].host: required"),
    ({"nodes": [{"host": "a", "role": "leader"}]}, "databases.app.nodes[0].role: expected one of primary, replica"),
    ({"nodes": [{"host": "a", "weight": 0}]}, "databases.app.nodes[0].weight: expected a positive integer"),
    ({"nodes": ["a:1"], "role": "replica"}, "databases.app.role: no node has role replica"),
    ({"nodes": ["a:1"], "load_balance": "fastest"}, "databases.app.load_balance: expected one of round-robin"),
    ({"nodes": ["a:1"], "target_session_attrs": "writable"}, "databases.app.target_session_attrs: expected one of"),
    ({}, "databases.app.host: required (or nodes: a list of servers)"),
])
def test_bad_nodes_are_named(entry, message):
    with pytest.raises(ConfigError) as info:
        from_dict({"databases": {"app": entry}})
    assert str(info.value).startswith(message)


# -- choosing a node, no server involved --------------------------------------------------

def router_for(entry: dict):
    pool = BackendIdlePool(10, 100)
    db = from_dict({"pool_size": 4, "databases": {"app": entry}}).databases["app"]
    return Router(pool), pool, db


def test_round_robin_follows_weights_and_skips_down_nodes():
    router, pool, db = router_for({"nodes": ["a:1", {"host": "b", "port": 2, "weight": 2}]})
    picks = collections.Counter(router.for_dial(db, lambda n: 0).name for _ in range(300))
    assert picks == {"a:1": 100, "b:2": 200}
    pool.mark_down("b:2", 1.0)
    assert {router.for_dial(db, lambda n: 0).name for _ in range(10)} == {"a:1"}
    pool.mark_down("a:1", 1.0)
    assert router.for_dial(db, lambda n: 0) is None
    assert router.fallback(db).name == "a:1"          # every node down: wait for the first
    pool.mark_up("b:2")
    assert router.for_dial(db, lambda n: 0).name == "b:2"


def test_least_connections_disable_and_full_nodes():
    router, pool, db = router_for({"nodes": ["a:1", "b:2", "c:3"], "load_balance": "least-connections"})
    counts = {"a:1": 3, "b:2": 1, "c:3": 2}
    assert router.for_dial(db, lambda n: counts[n.name]).name == "b:2"
    router, pool, db = router_for({"nodes": ["a:1", "b:2"], "load_balance": "disable"})
    assert {router.for_dial(db, lambda n: 0).name for _ in range(10)} == {"a:1"}
    assert [n.name for n in router.reuse_order(db)] == ["a:1"]      # pinned: not even idle ones elsewhere
    pool.mark_down("a:1", 1.0)
    assert router.for_dial(db, lambda n: 0).name == "b:2"
    # round-robin prefers a node with a free pool_size slot to one where the client would wait
    router, pool, db = router_for({"nodes": ["a:1", "b:2"]})
    full = {"a:1": 4, "b:2": 1}
    assert {router.for_dial(db, lambda n: full[n.name]).name for _ in range(10)} == {"b:2"}


def test_target_session_attrs_by_what_is_known_and_by_role():
    state = NodeState("x")
    assert fits("read-write", state) and fits("standby", state)          # not seen yet: tried
    assert not fits("read-write", state, "replica") and fits("read-only", state, "replica")
    assert not fits("standby", state, "primary")
    state.in_recovery, state.read_only = False, True                      # default_transaction_read_only
    assert not fits("read-write", state) and fits("read-only", state) and fits("primary", state)
    assert not fits("standby", state) and fits("prefer-standby", state)
    state.in_recovery, state.read_only = True, True                       # a hot standby
    assert fits("standby", state) and not fits("primary", state) and state.kind == "standby"


# -- real clusters ---------------------------------------------------------------------

def test_round_robin_spreads_connections_over_both_clusters(pg, pg_ro, proxy_factory, plain_auth_file):
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {})
    conns, ports = hold_transactions(pg, proxy, 6)
    try:
        assert collections.Counter(ports) == {pg.port: 3, pg_ro.port: 3}
        assert len(pg.backend_pids(user="app", dbname="appdb")) >= 3
        assert len(pg_ro.backend_pids(user="app", dbname="appdb")) >= 3
        keys = proxy.pool.snapshot()["open"]
        assert keys[pool_key(f"{pg.host}:{pg.port}", "app", "appdb")] == 3
        assert keys[pool_key(f"{pg_ro.host}:{pg_ro.port}", "app", "appdb")] == 3
    finally:
        close_all(conns)


def test_least_connections_and_disable_on_real_clusters(pg, pg_ro, proxy_factory, plain_auth_file):
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {"load_balance": "least-connections"})
    conns, ports = hold_transactions(pg, proxy, 4)
    close_all(conns)
    assert collections.Counter(ports) == {pg.port: 2, pg_ro.port: 2}
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {"load_balance": "disable"})
    conns, ports = hold_transactions(pg, proxy, 4)
    close_all(conns)
    assert set(ports) == {pg.port}


def test_idle_connections_are_reused_on_any_node_before_dialing(pg, pg_ro, proxy_factory, plain_auth_file):
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {})
    conns, _ = hold_transactions(pg, proxy, 4)
    close_all(conns)                  # four parked connections, two on each node
    assert wait_until(lambda: proxy.pool.idle_count() == 4), proxy.pool.snapshot()
    logins = proxy.server.logins.server_logins
    with connect(pg, proxy) as conn:
        ports = {server_port(conn) for _ in range(20)}
    assert proxy.server.logins.server_logins == logins      # no new server login
    assert ports <= {pg.port, pg_ro.port}


def test_target_session_attrs_read_write_picks_the_writable_cluster(pg, pg_ro, proxy_factory, plain_auth_file):
    # The read-only cluster first, so that a proxy that ignored the target would use it.
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {
        "nodes": [node(pg_ro), node(pg)], "target_session_attrs": "read-write"},
        health_check_period=60)     # only the first round, at start: the dials decide afterwards too
    conns, ports = hold_transactions(pg, proxy, 4)
    try:
        assert set(ports) == {pg.port}
        conns[0].execute("CREATE TEMP TABLE t (x int)")          # writable
    finally:
        close_all(conns)
    states = proxy.server.router
    assert wait_until(lambda: states.state(f"{pg_ro.host}:{pg_ro.port}").kind == "read-only")
    assert states.state(f"{pg.host}:{pg.port}").kind == "primary"


def test_read_only_target_and_replica_alias_use_only_the_read_only_cluster(pg, pg_ro, proxy_factory,
                                                                           plain_auth_file):
    nodes = [node(pg, role="primary"), node(pg_ro, role="replica")]
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {"nodes": nodes}, databases={
        "appdb_ro": {"dbname": "appdb", "nodes": nodes, "role": "replica"},
        "appdb_standby_ok": {"dbname": "appdb", "nodes": nodes, "target_session_attrs": "read-only"}})
    for dbname in ("appdb_ro", "appdb_standby_ok"):
        conns, ports = hold_transactions(pg, proxy, 4, dbname=dbname)
        try:
            assert set(ports) == {pg_ro.port}, dbname
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                conns[0].execute("CREATE TEMP TABLE t (x int)")
        finally:
            close_all(conns)
    # The plain entry uses both: first the four connections the aliases parked (the same
    # user, server database and node: the same pool key), then new ones on either node.
    conns, ports = hold_transactions(pg, proxy, 8)
    close_all(conns)
    assert set(ports) == {pg.port, pg_ro.port}


def test_passthrough_spreads_logins_and_read_write_is_checked_at_login(pg, pg_ro, proxy_factory):
    proxy = proxy_factory(databases={"appdb": {"nodes": [node(pg), node(pg_ro)]},
                                     "appdb_rw": {"dbname": "appdb", "nodes": [node(pg_ro), node(pg)],
                                                  "target_session_attrs": "read-write"}},
                          health_check_period=0.3)
    conns, ports = hold_transactions(pg, proxy, 4)
    close_all(conns)
    assert set(ports) == {pg.port, pg_ro.port}
    # Pass-through with no health-check user: TCP checks only, so the first login may land on the
    # read-only node, is refused and teaches the proxy; the next ones go to the writable node.
    refused = 0
    for _ in range(4):
        try:
            with connect(pg, proxy, dbname="appdb_rw") as conn:
                assert server_port(conn) == pg.port
        except psycopg.OperationalError as exc:
            assert "target_session_attrs read-write" in str(exc)
            refused += 1
    assert refused <= 1


def test_console_shows_nodes_and_their_state(pg, pg_ro, proxy_factory, plain_auth_file):
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {}, admin_users=["postgres"])
    ro, rw = f"{pg_ro.host}:{pg_ro.port}", f"{pg.host}:{pg.port}"
    assert wait_until(lambda: proxy.server.router.state(ro).kind == "read-only")
    conns, _ = hold_transactions(pg, proxy, 2)
    try:
        with connect(pg, proxy, user="postgres", dbname="pgbouncer") as console:
            cur = console.execute("SHOW DATABASES")
            names = [d.name for d in cur.description]
            rows = {r[0]: dict(zip(names, r)) for r in cur.fetchall()}
            assert rows["appdb"]["nodes"] == f"{rw} up primary, {ro} up read-only"
            assert rows["appdb"]["load_balance_hosts"] == "round-robin"
            cur = console.execute("SHOW SERVERS")
            names = [d.name for d in cur.description]
            servers = [dict(zip(names, r)) for r in cur.fetchall()]
            assert {(s["node"], s["node_state"]) for s in servers} == {(rw, "up primary"), (ro, "up read-only")}
    finally:
        close_all(conns)


# -- failover -----------------------------------------------------------------------------

class Load:
    """Clients in threads, each running short transactions in a loop and noting where each ran.

    A client whose transaction fails notes the error and connects again (a
    FATAL ends its connection to the proxy, as it would end one to PostgreSQL).
    """

    def __init__(self, pg, proxy, clients: int) -> None:
        self.pg, self.proxy = pg, proxy
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.done: list = []                       # (monotonic time, client, port)
        self.errors: dict = collections.defaultdict(list)
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def run(self, i: int) -> None:
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = connect(self.pg, self.proxy, autocommit=False, connect_timeout=60)
                port = server_port(conn)
                conn.execute("SELECT pg_sleep(0.01)")
                conn.commit()
                with self.lock:
                    self.done.append((time.monotonic(), i, port))
            except psycopg.Error as exc:
                with self.lock:
                    self.errors[i].append(f"{type(exc).__name__}: {exc}")
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
            time.sleep(0.005)
        if conn is not None:
            conn.close()

    def ports_since(self, since: float) -> collections.Counter:
        with self.lock:
            return collections.Counter(port for t, _, port in self.done if t >= since)

    def clients_since(self, since: float) -> set:
        with self.lock:
            return {i for t, i, _ in self.done if t >= since}

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(60)


def test_a_node_stopped_mid_load_loses_only_in_flight_transactions_and_comes_back(
        pg, pg_ro, proxy_factory, plain_auth_file, caplog):
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {}, pool_size=2)
    ro = f"{pg_ro.host}:{pg_ro.port}"
    clients = 6
    seen = {}
    with Load(pg, proxy, clients) as load:
        assert wait_until(lambda: len(load.ports_since(0)) == 2, timeout=30), "both nodes serve at first"

        def while_down():
            assert wait_until(lambda: proxy.pool.is_down(ro), timeout=30), "the stopped node is marked down"
            seen["down"] = time.monotonic()
            settle = seen["down"] + 0.5
            assert wait_until(lambda: load.clients_since(settle) == set(range(clients)), timeout=60), \
                "every client goes on with the other node"
            seen["while_down"] = load.ports_since(settle)

        pg_ro.restart(mode="fast", while_down=while_down)
        up = time.monotonic()
        assert wait_until(lambda: not proxy.pool.is_down(ro), timeout=30), "the health check finds it back"
        assert wait_until(lambda: load.ports_since(up)[pg_ro.port] > 0, timeout=30), "it is used again"
        errors_at_end = {i: list(e) for i, e in load.errors.items()}
    assert set(seen["while_down"]) == {pg.port}
    # At most one error per client: the transaction it had on the stopped node (if any).
    assert all(len(e) <= 1 for e in errors_at_end.values()), errors_at_end
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"node {ro} is down" in m for m in messages)
    assert any(f"node {ro} is up again" in m or f"server {ro} accepts connections again" in m for m in messages)


def test_passthrough_logins_go_to_the_other_node_while_one_is_down(pg, pg_ro, proxy_factory):
    proxy = proxy_factory(databases={"appdb": {"nodes": [node(pg_ro), node(pg)], "load_balance": "disable"}},
                          health_check_period=0.3, health_check_failures=1, server_login_retry=0.2)
    ro = f"{pg_ro.host}:{pg_ro.port}"
    with connect(pg, proxy) as conn:
        assert server_port(conn) == pg_ro.port             # pinned to the first node
    after = {}

    def while_down():
        # Whether or not a health check noticed yet, the login goes to the node that is up.
        with connect(pg, proxy) as conn:
            after["port"] = server_port(conn)
        after["down"] = proxy.pool.is_down(ro)

    pg_ro.restart(mode="fast", while_down=while_down)
    assert after == {"port": pg.port, "down": True}
    assert wait_until(lambda: not proxy.pool.is_down(ro), timeout=30)
    with connect(pg, proxy) as conn:
        assert server_port(conn) == pg_ro.port             # back on the first node once it is up


def test_health_check_marks_an_idle_node_down_closes_its_parked_connections_and_up_again(
        pg, pg_ro, proxy_factory, plain_auth_file, caplog):
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {}, health_check_failures=2)
    ro = f"{pg_ro.host}:{pg_ro.port}"
    ro_key = pool_key(ro, "app", "appdb")
    conns, _ = hold_transactions(pg, proxy, 4)
    close_all(conns)
    assert wait_until(lambda: proxy.pool.idle_count(ro_key) == 2), proxy.pool.snapshot()
    seen = {}

    def while_down():
        # No client does anything: only the health checks can notice.
        seen["down"] = wait_until(lambda: proxy.pool.is_down(ro), timeout=30)
        seen["idle"] = proxy.pool.idle_count(ro_key)
        seen["open"] = proxy.pool.open_count(ro_key)
        with connect(pg, proxy) as conn:                      # a new client goes to the node that is up
            seen["port"] = server_port(conn)

    pg_ro.restart(mode="fast", while_down=while_down)
    assert seen == {"down": True, "idle": 0, "open": 0, "port": pg.port}
    assert wait_until(lambda: not proxy.pool.is_down(ro), timeout=30)
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"node {ro} is down: 2 health checks failed in a row" in m for m in messages), messages
    assert any(f"health check of node {ro} failed (1 of 2" in m for m in messages)
    assert any(f"node {ro} is up again (health check answered)" in m for m in messages)
    conns, ports = hold_transactions(pg, proxy, 4)                # new connections go there again
    close_all(conns)
    assert pg_ro.port in ports


def test_when_no_node_fits_the_client_waits_then_is_told_why(pg, pg_ro, proxy_factory, plain_auth_file):
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {
        "nodes": [node(pg_ro)], "target_session_attrs": "read-write"}, query_wait_timeout=1.5)
    ro = f"{pg_ro.host}:{pg_ro.port}"
    assert wait_until(lambda: proxy.server.router.state(ro).kind == "read-only")
    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as info:
        connect(pg, proxy)
    waited = time.monotonic() - t0
    assert 1.0 <= waited < 30
    assert (f'no server of database "appdb" fits target_session_attrs read-write ({ro} is read-only)'
            in str(info.value))


def test_a_health_check_that_cannot_log_in_leaves_the_node_up(pg, pg_ro, proxy_factory, plain_auth_file, caplog):
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {}, health_check_user="nosuchuser")
    ro = f"{pg_ro.host}:{pg_ro.port}"
    assert wait_until(lambda: proxy.health.rounds >= 3, timeout=30)
    assert not proxy.pool.is_down(ro)
    assert any(f"health check of node {ro} cannot log in as nosuchuser" in r.getMessage() for r in caplog.records)
    conns, ports = hold_transactions(pg, proxy, 4)
    close_all(conns)
    assert set(ports) == {pg.port, pg_ro.port}


def test_reload_turns_a_single_server_entry_into_nodes(pg, pg_ro, proxy_factory, plain_auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=str(plain_auth_file),
                          databases={"appdb": node(pg)})
    before = connect(pg, proxy)
    assert server_port(before) == pg.port
    config = proxy_factory.config(auth_type="scram-sha-256", auth_file=str(plain_auth_file),
                                  databases={"appdb": {"nodes": [node(pg), node(pg_ro)]}})
    proxy.server.apply_config(from_dict(config))
    try:
        assert {server_port(before) for _ in range(5)} == {pg.port}     # keeps its server until it reconnects
        conns, ports = hold_transactions(pg, proxy, 4)
        close_all(conns)
        assert set(ports) == {pg.port, pg_ro.port}
    finally:
        before.close()


# -- a real hot standby (streaming replication from pg) ------------------------------------

def test_target_session_attrs_with_a_hot_standby(pg, standby_factory, proxy_factory, plain_auth_file, caplog):
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    standby = standby_factory()
    nodes = [node(standby), node(pg)]
    targets = ("primary", "standby", "prefer-standby", "read-write", "read-only", "any")
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=str(plain_auth_file), health_check_user="postgres",
                          health_check_period=0.3, databases={
                              f"appdb_{t}": {"dbname": "appdb", "nodes": nodes, "target_session_attrs": t}
                              for t in targets})
    sb = f"{standby.host}:{standby.port}"
    assert wait_until(lambda: proxy.server.router.state(sb).kind == "standby")
    expected = {"primary": {pg.port}, "standby": {standby.port}, "prefer-standby": {standby.port},
                "read-write": {pg.port}, "read-only": {standby.port}, "any": {pg.port, standby.port}}
    for target in targets:
        conns, ports = hold_transactions(pg, proxy, 4, dbname=f"appdb_{target}")
        close_all(conns)
        assert set(ports) == expected[target], target
    assert any(f"node {sb} is a standby" in r.getMessage() for r in caplog.records)


def test_failover_to_a_promoted_standby_under_load(pg, standby_factory, proxy_factory, plain_auth_file, caplog):
    """The primary stops; the standby is promoted; clients asking for a primary follow it."""
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    standby = standby_factory()
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=str(plain_auth_file), health_check_user="postgres",
                          health_check_period=0.3, health_check_failures=1, server_login_retry=0.2,
                          databases={"appdb": {"nodes": [node(pg, role="primary"), node(standby, role="replica")],
                                               "target_session_attrs": "primary"}})
    sb = f"{standby.host}:{standby.port}"
    assert wait_until(lambda: proxy.server.router.state(sb).kind == "standby")
    clients = 6
    seen = {}
    with Load(pg, proxy, clients) as load:
        assert wait_until(lambda: len(load.done) >= 20, timeout=30)
        assert set(load.ports_since(0)) == {pg.port}

        def while_down():
            standby.promote()
            promoted = time.monotonic()
            assert wait_until(lambda: load.clients_since(promoted + 0.5) == set(range(clients)), timeout=60), \
                "every client goes on with the promoted standby"
            seen["after"] = load.ports_since(promoted + 0.5)
            seen["kind"] = proxy.server.router.state(sb).kind

        pg.restart(mode="fast", while_down=while_down)
        errors = {i: list(e) for i, e in load.errors.items()}
    assert set(seen["after"]) == {standby.port} and seen["kind"] == "primary"
    assert all(len(e) <= 1 for e in errors.values()), errors
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"node {sb} changed from standby to primary (health check)" in m for m in messages), messages


# -- the rest of the proxy with several nodes ------------------------------------------------

@pytest.mark.parametrize("auth", ["scram-sha-256", "passthrough"])
def test_session_mode_spreads_clients_over_the_nodes(pg, pg_ro, proxy_factory, plain_auth_file, auth):
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {}, pool_mode="session", auth_type=auth)
    conns = [connect(pg, proxy) for _ in range(4)]
    try:
        ports = [server_port(c) for c in conns]
        assert collections.Counter(ports) == {pg.port: 2, pg_ro.port: 2}
        assert all({server_port(c) for _ in range(3)} == {p} for c, p in zip(conns, ports))   # for life
    finally:
        close_all(conns)


def test_pause_and_kill_cover_every_node_of_the_entry(pg, pg_ro, proxy_factory, plain_auth_file):
    proxy = nodes_proxy(proxy_factory, pg, pg_ro, plain_auth_file, {}, admin_users=["postgres"])
    conns, ports = hold_transactions(pg, proxy, 2)
    assert set(ports) == {pg.port, pg_ro.port}
    console = connect(pg, proxy, user="postgres", dbname="pgbouncer")
    try:
        done = threading.Event()
        threading.Thread(target=lambda: (console.execute("PAUSE appdb"), done.set()), daemon=True).start()
        assert not done.wait(0.5), "PAUSE returned while transactions ran on the nodes"
        conns[0].rollback()
        assert not done.wait(0.5), "PAUSE returned while a transaction ran on the other node"
        conns[1].rollback()
        assert done.wait(10)
        console.execute("RESUME appdb")
        console.execute("KILL appdb")
        for conn in conns:
            with pytest.raises(psycopg.OperationalError, match="KILL on the admin console"):
                conn.execute("SELECT 1")
        assert wait_until(lambda: not pg.backend_pids(user="app", dbname="appdb")
                          and not pg_ro.backend_pids(user="app", dbname="appdb"))
        console.execute("RESUME appdb")
    finally:
        console.close()
        close_all(conns)
