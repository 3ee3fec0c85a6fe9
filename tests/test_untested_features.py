"""Features no other test file covered, each by its effect (issue 25, item 6).

The embedding API's ``serve()`` and graceful ``shutdown()``; ``load_balance:
random``; the client certificate the proxy presents to servers
(``server_tls_cert_file``/``server_tls_key_file`` against a ``clientcert=verify-full``
pg_hba line); ``admin_auth_database``; ``server_connect_timeout`` and
``health_check_timeout`` against a peer that accepts and never answers;
``auth_query_cache_seconds``; ``log_level``.  (SIGQUIT is in test_shutdown.py,
beside SIGINT.)
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import socket
import threading
import time

import psycopg
import pytest
import trustme
import yaml

import test_tls
import threadpool_proxy
from helpers import PASSWORDS, connect, raw_login, wait_until, write_auth_file
from test_nodes import router_for
from test_resilience import connect_noting_fatals
from test_shutdown import CliProxy
from threadpool_proxy.pool import pool_key


def server_pids_gone(pg, user="app") -> bool:
    return not pg.backend_pids(user=user, dbname="appdb")


def told_shutting_down(conn, fatals, sql="SELECT 1") -> bool:
    """``sql`` fails, and the proxy's FATAL said it is shutting down (in the error, or in the
    notice libpq makes of a FATAL that arrives while it reads nothing else)."""
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute(sql)
    return "the proxy is shutting down" in str(info.value) or any(
        "the proxy is shutting down" in message for _, message in fatals)


def proxy_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("threadpool_proxy")]


# -- the embedding API ------------------------------------------------------------------------

@pytest.mark.parametrize("given", ["dict", "yaml path"])
def test_serve_runs_the_proxy_for_the_with_block_and_cleans_up_after(pg, proxy_factory, tmp_path, given):
    """README, Embedding: leaving the block closes the listening socket, disconnects clients,
    closes pooled server connections and ends the threads."""
    config = proxy_factory.config(pool_mode="transaction")
    if given == "yaml path":
        path = tmp_path / "proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        config = str(path)
    assert server_pids_gone(pg) or wait_until(lambda: server_pids_gone(pg), timeout=15)
    threads_before = set(proxy_threads())
    with threadpool_proxy.serve(config) as proxy:
        assert proxy.port != 0                              # port 0: a free one was picked
        client, fatals = connect_noting_fatals(pg, proxy)
        assert client.execute("SELECT current_user").fetchone() == ("app",)
        with connect(pg, proxy) as leaving:                 # its server connection is parked
            leaving.execute("SELECT 1")
        assert wait_until(lambda: proxy.pool.idle_count() >= 1)
        assert len(pg.backend_pids(user="app", dbname="appdb")) == 2
        host, port = proxy.host, proxy.port
    try:
        assert told_shutting_down(client, fatals)
    finally:
        client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=5).close()
    assert wait_until(lambda: server_pids_gone(pg)), pg.backend_pids(user="app", dbname="appdb")
    assert proxy.stopped and not set(proxy_threads()) - threads_before, proxy_threads()


def test_graceful_shutdown_lets_a_transaction_finish_and_disconnects_the_idle_at_once(pg, proxy_factory):
    """``proxy.shutdown()``, the embedded SIGTERM: not listening any more, the client between
    transactions told at once, the one in a transaction commits, then is told, and shutdown()
    returns once nobody is left."""
    proxy = proxy_factory(pool_mode="transaction")
    with pg.superuser_conn("appdb") as su:
        su.execute("DROP TABLE IF EXISTS tpp_graceful")
        su.execute("CREATE TABLE tpp_graceful (v int)")
        su.execute("GRANT ALL ON tpp_graceful TO app")
    (idle, idle_fatals), (busy, busy_fatals) = connect_noting_fatals(pg, proxy), connect_noting_fatals(pg, proxy)
    try:
        idle.execute("SELECT 1")
        busy.execute("BEGIN")
        busy.execute("INSERT INTO tpp_graceful VALUES (1)")
        stopper = threading.Thread(target=proxy.shutdown, kwargs={"timeout": 120}, daemon=True)
        stopper.start()
        assert wait_until(lambda: proxy.stopping)
        assert told_shutting_down(idle, idle_fatals)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((proxy.host, proxy.port), timeout=5).close()
        assert stopper.is_alive() and not proxy.stopped    # waiting for the transaction
        busy.execute("INSERT INTO tpp_graceful VALUES (2)")
        busy.execute("COMMIT")
        stopper.join(60)
        assert not stopper.is_alive() and proxy.stopped
        assert told_shutting_down(busy, busy_fatals)
    finally:
        idle.close()
        busy.close()
    with pg.superuser_conn("appdb") as su:
        assert su.execute("SELECT array_agg(v ORDER BY v) FROM tpp_graceful").fetchone() == ([1, 2],)
        su.execute("DROP TABLE tpp_graceful")


def test_graceful_shutdown_ends_a_transaction_that_outlasts_its_timeout(pg, proxy_factory):
    proxy = proxy_factory(pool_mode="transaction")
    stuck, fatals = connect_noting_fatals(pg, proxy)
    try:
        stuck.execute("BEGIN")
        stuck.execute("CREATE TEMP TABLE tpp_rolled_back (v int)")
        t0 = time.monotonic()
        proxy.shutdown(timeout=0.5)
        assert time.monotonic() - t0 >= 0.5 and proxy.stopped
        assert told_shutting_down(stuck, fatals, "COMMIT")
    finally:
        stuck.close()


# -- load_balance: random ---------------------------------------------------------------------

def _round_robin_like(picks: list, first: str, period: int) -> bool:
    """Every window of ``period`` picks (weights 1 : period - 1) holds ``first`` exactly once."""
    return all(picks[i:i + period].count(first) == 1 for i in range(0, len(picks) - period + 1, period))


def test_random_picks_nodes_by_weight_and_in_no_fixed_order():
    router, pool, db = router_for({"nodes": ["a:1", {"host": "b", "port": 2, "weight": 3}],
                                   "load_balance": "random"})
    picks = [router.for_dial(db, lambda n: 0).name for _ in range(4000)]
    counts = collections.Counter(picks)
    assert 840 <= counts["a:1"] <= 1160, counts            # 1000 expected, the bounds ~6 sd away
    assert not _round_robin_like(picks, "a:1", 4)
    pool.mark_down("b:2", 1.0)
    assert {router.for_dial(db, lambda n: 0).name for _ in range(20)} == {"a:1"}


def test_random_load_balance_dials_both_servers_of_an_entry(pg, proxy_factory, tmp_path):
    """Two names of the one cluster (127.0.0.1 and localhost) as nodes, weights 1 and 3;
    server_lifetime 0, so every transaction dials and the router chooses each time."""
    auth_file = write_auth_file(tmp_path / "users.yaml", {"app": {"password": PASSWORDS["app"]}})
    nodes = [{"host": "127.0.0.1", "port": pg.port}, {"host": "localhost", "port": pg.port, "weight": 3}]
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, server_lifetime=0,
                          health_check_period=3600, databases={"appdb": {"nodes": nodes, "load_balance": "random"}})
    keys = {pool_key(f"{n['host']}:{pg.port}", "app", "appdb"): n["host"] for n in nodes}
    picks = []
    with connect(pg, proxy) as conn:
        for _ in range(60):
            with conn.transaction():
                conn.execute("SELECT 1")
                open_now = {k: v for k, v in proxy.pool.snapshot()["open"].items() if k in keys and v}
                assert len(open_now) == 1, open_now           # the transaction's one connection
                picks.append(keys[next(iter(open_now))])
    counts = collections.Counter(picks)
    assert 4 <= counts["127.0.0.1"] <= 30, counts            # 15 expected: P(outside) ~ 6e-5
    assert not _round_robin_like(picks, "127.0.0.1", 4), picks


# -- the proxy's client certificate to servers ---------------------------------------------------

class ClientCertPgCluster(test_tls.TlsPgCluster):
    """TLS only, and a client certificate signed by ``root.crt`` naming the user (verify-full)."""

    HBA = (
        "local      all  all                  trust",
        "hostssl    all  all  127.0.0.1/32    scram-sha-256 clientcert=verify-full",
        "hostnossl  all  all  127.0.0.1/32    reject",
    )
    SETTINGS = {**test_tls.TlsPgCluster.SETTINGS, "ssl_ca_file": "root.crt"}

    def __init__(self, ca: trustme.CA) -> None:
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        super().__init__(b"".join(p.bytes() for p in leaf.cert_chain_pems), leaf.private_key_pem.bytes())
        self._tls_files["root.crt"] = ca.cert_pem.bytes()


@pytest.fixture(scope="module")
def client_cert_setup(tmp_path_factory):
    """(cluster, settings of a proxy presenting a certificate for "app", settings without one)."""
    ca = trustme.CA()
    directory = tmp_path_factory.mktemp("clientcert")
    app_cert = ca.issue_cert("app", common_name="app")
    files = {"ca.pem": ca.cert_pem.bytes(), "app.crt": b"".join(p.bytes() for p in app_cert.cert_chain_pems),
             "app.key": app_cert.private_key_pem.bytes()}
    for name, data in files.items():
        (directory / name).write_bytes(data)
        os.chmod(directory / name, 0o600)
    cluster = ClientCertPgCluster(ca)
    try:
        cluster.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    without = {"server_tls_sslmode": "verify-full", "server_tls_ca_file": str(directory / "ca.pem")}
    with_cert = dict(without, server_tls_cert_file=str(directory / "app.crt"),
                     server_tls_key_file=str(directory / "app.key"))
    try:
        yield cluster, with_cert, without
    finally:
        cluster.stop()


def test_the_proxy_presents_its_client_certificate_to_the_server(client_cert_setup):
    cluster, with_cert, without = client_cert_setup
    from conftest import ProxyFactory
    factory = ProxyFactory(cluster)
    try:
        proxy = factory(**with_cert)
        with connect(cluster, proxy, sslmode="disable") as conn:
            user, client_dn = conn.execute("SELECT current_user, client_dn FROM pg_stat_ssl "
                                           "WHERE pid = pg_backend_pid()").fetchone()
        assert user == "app" and client_dn.endswith("/CN=app"), client_dn    # the proxy's certificate
        proxy = factory(**without)
        with pytest.raises(psycopg.OperationalError, match="connection requires a valid client certificate"):
            connect(cluster, proxy, sslmode="disable")
    finally:
        factory.stop_all()


# -- admin_auth_database -----------------------------------------------------------------------

def test_admin_auth_database_checks_console_logins_as_that_entry(pg, proxy_factory, tmp_path):
    """The console logs in as the named entry checks its clients: its server database with
    passthrough, its auth file with scram-sha-256; the "*" entry when none is named."""
    target = {"host": pg.host, "port": pg.port}
    auth_file = write_auth_file(tmp_path / "users.yaml", {"app": {"password": "console-only"}})
    databases = {"*": dict(target), "appdb": dict(target),
                 "missing": dict(target, dbname="tpp_no_such_database"),
                 "checked": dict(target, auth_type="scram-sha-256")}

    def console_login(password, **settings):
        proxy = proxy_factory(admin_users=["app"], databases=databases, auth_file=auth_file, **settings)
        return raw_login(proxy.host, proxy.port, "app", "pgbouncer", password=password)

    assert console_login(PASSWORDS["app"]).ok                           # "*": PostgreSQL checks it
    refused = console_login(PASSWORDS["app"], admin_auth_database="missing")
    assert (refused.sqlstate, refused.error["M"]) == (
        "3D000", 'database "tpp_no_such_database" does not exist'), refused.error
    assert console_login("console-only", admin_auth_database="checked").ok
    wrong = console_login(PASSWORDS["app"], admin_auth_database="checked")
    assert wrong.sqlstate == "28P01", wrong.error


# -- a server that accepts and never answers ---------------------------------------------------

class SilentPeer:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.host, self.port = self.listener.getsockname()
        self.accepted = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="silent-peer", daemon=True)
        self._thread.start()

    @property
    def node(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(socket.timeout):
                self.accepted.append(self.listener.accept()[0])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in [self.listener, *self.accepted]:
            sock.close()


@pytest.fixture
def silent_peer():
    peer = SilentPeer()
    yield peer
    peer.close()


def _nodes_settings(pg, tmp_path, peer, **settings) -> dict:
    """Proxy-terminated auth, appdb on the silent peer first, then the real server."""
    auth_file = write_auth_file(tmp_path / "users.yaml", {"app": {"password": PASSWORDS["app"]},
                                                          "postgres": {"password": PASSWORDS["postgres"]}})
    nodes = [{"host": peer.host, "port": peer.port}, {"host": pg.host, "port": pg.port}]
    return dict(auth_type="scram-sha-256", auth_file=auth_file, query_wait_timeout=60,
                databases={"appdb": {"nodes": nodes, "load_balance": "disable"}}, **settings)


def test_server_connect_timeout_gives_up_on_a_silent_server_and_the_next_node_serves(
        pg, proxy_factory, tmp_path, silent_peer):
    """load_balance disable: the silent node is the one to dial, until its dial times out
    after server_connect_timeout; then it is down and the client is served by the next node."""
    proxy = proxy_factory(**_nodes_settings(pg, tmp_path, silent_peer, server_connect_timeout=1,
                                            health_check_period=3600))
    t0 = time.monotonic()
    with connect(pg, proxy, connect_timeout=90) as conn:
        assert conn.execute("SELECT inet_server_port()").fetchone() == (pg.port,)
    took = time.monotonic() - t0
    assert took >= 1.0, took                               # it waited for the silent node
    assert took < 45, took                                 # ... that long, not query_wait_timeout (60 s)
    assert silent_peer.accepted and proxy.pool.is_down(silent_peer.node)


def test_health_check_timeout_marks_a_silent_node_down(pg, proxy_factory, tmp_path, silent_peer, caplog):
    caplog.set_level("WARNING", logger="threadpool_proxy")
    t0 = time.monotonic()
    proxy = proxy_factory(**_nodes_settings(pg, tmp_path, silent_peer, health_check_user="postgres",
                                            health_check_period=0.3, health_check_timeout=1,
                                            health_check_failures=1, server_connect_timeout=60))
    assert wait_until(lambda: proxy.pool.is_down(silent_peer.node), timeout=40)
    assert time.monotonic() - t0 >= 1.0                    # not before the check's timeout
    assert not proxy.pool.is_down(f"{pg.host}:{pg.port}")
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"node {silent_peer.node} is down: 1 health checks failed in a row" in m for m in messages), messages
    with connect(pg, proxy) as conn:                       # clients go to the node that is up
        assert conn.execute("SELECT inet_server_port()").fetchone() == (pg.port,)


# -- auth_query_cache_seconds ------------------------------------------------------------------

def test_auth_query_results_are_kept_for_auth_query_cache_seconds(pg, proxy_factory):
    """A changed password: the old one still logs in while the verifier fetched with it is
    cached, the new one once it expired.  (A stall of the machine past the cache's life
    before the first check is retried with a new role, never taken for a failure.)"""
    ttl = 2.0
    proxy = proxy_factory(auth_type="auth_query", auth_user="postgres", auth_password=PASSWORDS["postgres"],
                          auth_query_cache_seconds=ttl)
    roles = []
    try:
        for attempt in range(3):
            role = f"tpp_cached_{attempt}"
            roles.append(role)
            pg.sql(f"DROP ROLE IF EXISTS {role}", f"CREATE ROLE {role} LOGIN PASSWORD 'old-secret'")
            t0 = time.monotonic()                          # the verifier is fetched after this
            assert raw_login(proxy.host, proxy.port, role, "appdb", password="old-secret").ok
            pg.sql(f"ALTER ROLE {role} PASSWORD 'new-secret'")
            old = raw_login(proxy.host, proxy.port, role, "appdb", password="old-secret")
            new = raw_login(proxy.host, proxy.port, role, "appdb", password="new-secret")
            if time.monotonic() - t0 < ttl:
                break
        else:
            pytest.fail(f"three attempts each took longer than auth_query_cache_seconds ({ttl} s)")
        assert old.ok, old.error                           # the cached verifier, and the parked connection
        assert new.sqlstate == "28P01", new.error
        assert wait_until(lambda: raw_login(proxy.host, proxy.port, role, "appdb", password="new-secret").ok,
                          timeout=30, interval=0.2)
        assert time.monotonic() - t0 >= ttl                # not before the cached one expired
        assert raw_login(proxy.host, proxy.port, role, "appdb", password="old-secret").sqlstate == "28P01"
    finally:
        proxy.stop()                                       # its parked connections, before DROP ROLE
        for role in roles:
            pg.sql(f"DROP ROLE IF EXISTS {role}")


# -- log_level ------------------------------------------------------------------------------------

@pytest.mark.parametrize("level, present, absent", [
    ("warning", [], [" INFO ", " DEBUG "]),
    ("info", [" INFO threadpool_proxy.server: threadpool_proxy listening on"], [" DEBUG "]),
    ("debug", [" INFO ", " DEBUG "], []),
])
def test_log_level_decides_what_the_command_line_logs(pg, tmp_path, level, present, absent):
    proxy = CliProxy(pg, tmp_path, log_level=level)
    try:
        with psycopg.connect(pg.dsn(host=proxy.host, port=proxy.port), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        proxy.signal(signal.SIGTERM)
        code, err = proxy.wait(timeout=60)
    finally:
        proxy.kill()
    assert code == 0, err
    for text in present:
        assert text in err, (text, err)
    for text in absent:
        assert text not in err, (text, err)
