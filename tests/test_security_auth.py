"""auth_query cannot be steered by a tenant (issue 18, item 2), on a real PostgreSQL.

The cluster here is set up as many poolers are deployed: its pg_hba.conf
trusts ``postgres`` from the proxy's address (the pooler holds the passwords,
the server trusts the pooler) and asks everyone else for scram-sha-256.  Role
``alice`` owns database ``t`` (a tenant); ``payroll`` is somebody else's.

The attack: alice makes ``t`` resolve ``pg_shadow`` to a view of her own
(``ALTER DATABASE t SET search_path = evil, pg_catalog``), then logs in to
the proxy as ``postgres`` to ``t`` with a password of her choosing.  If
auth_query runs in ``t`` under that search_path, the proxy believes her
verifier, and the server (trusting the proxy) hands her a superuser session;
a cache keyed by user alone then lets the same password into every other
database.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import hmac
import os

import psycopg
import pytest

from conftest import PgCluster, ProxyFactory
from helpers import raw_login

ATTACKER_PASSWORD = "chosen-by-alice"
ALICE_PASSWORD = "alice-secret"
FAILED = 'password authentication failed for user "{}"'


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """A SCRAM-SHA-256 verifier in pg_authid's format, computed here (RFC 5802), not by the proxy."""
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda b: base64.b64encode(b).decode()      # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


class TrustingCluster(PgCluster):
    """The conftest cluster, but ``postgres`` is trusted from loopback (a pooler's server)."""

    HBA = (
        "local   all  all                     trust",
        "host    all  postgres   127.0.0.1/32  trust",
        "host    all  all        127.0.0.1/32  scram-sha-256",
    )


@pytest.fixture(scope="module")
def tenant_pg():
    """A cluster whose tenant alice owns database t and has poisoned its search_path."""
    cluster = TrustingCluster()
    atexit.register(cluster.stop)
    try:
        cluster.start()
        cluster.passwords["alice"] = ALICE_PASSWORD
        cluster.sql(f"CREATE ROLE alice LOGIN PASSWORD '{ALICE_PASSWORD}'",
                    "CREATE DATABASE t OWNER alice",
                    "CREATE DATABASE payroll")
        # What alice does, as herself: nothing here needs a superuser.
        fake = scram_verifier(ATTACKER_PASSWORD)
        with psycopg.connect(cluster.dsn(user="alice", dbname="t"), autocommit=True) as conn:
            conn.execute("CREATE SCHEMA evil")
            conn.execute("CREATE VIEW evil.pg_shadow AS SELECT 'postgres'::name AS usename, "
                         f"'{fake}'::text AS passwd")
            conn.execute("ALTER DATABASE t SET search_path = evil, pg_catalog")
            # A table an operator might read with a custom auth_query, which alice controls in t.
            conn.execute("CREATE SCHEMA proxy_auth")
            conn.execute("CREATE TABLE proxy_auth.users (usename name, passwd text)")
            conn.execute("INSERT INTO proxy_auth.users VALUES ('postgres', %s)", (fake,))
        with psycopg.connect(cluster.dsn(user="alice", dbname="t"), autocommit=True) as conn:
            # the poison works for any session that does not pin its search_path
            assert conn.execute("SELECT count(*) FROM pg_shadow").fetchone() == (1,)
        # The strongest per-database setting PostgreSQL has (a role's in one database), standing in
        # for whatever a tenant could set: the auth_user's startup options must beat it too.
        cluster.sql("ALTER ROLE postgres IN DATABASE t SET search_path = evil, pg_catalog")
        with psycopg.connect(cluster._socket_conninfo("payroll"), autocommit=True) as conn:
            conn.execute("CREATE SCHEMA proxy_auth")
            conn.execute("CREATE TABLE proxy_auth.users AS SELECT usename, passwd FROM pg_catalog.pg_shadow")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def tenant_proxies(tenant_pg):
    factory = ProxyFactory(tenant_pg)
    try:
        yield factory
    finally:
        factory.stop_all()


def session_as(proxy, user: str, dbname: str, password: str):
    """(current_user, session_user, current_database()) of a session through the proxy, or the
    SQLSTATE and message it was refused with."""
    try:
        with psycopg.connect(host=proxy.host, port=proxy.port, user=user, dbname=dbname, password=password,
                             connect_timeout=10, autocommit=True) as conn:
            return conn.execute("SELECT current_user, session_user, current_database()").fetchone()
    except psycopg.OperationalError:
        res = raw_login(proxy.host, proxy.port, user, dbname, password=password)
        return (res.sqlstate, res.error["M"]) if res.error else ("ok?", res.auth_requests)


def auth_query_config(tenant_pg, **overrides) -> dict:
    target = {"host": tenant_pg.host, "port": tenant_pg.port}
    # This server trusts postgres from loopback (no exchange): with a SCRAM verifier the proxy
    # accepts that only when told so (server_require_auth; docs/security-wire.md).
    config = dict(auth_type="auth_query", auth_user="postgres", auth_query_cache_seconds=30,
                  pool_mode="session", databases={"*": dict(target)},
                  server_require_auth="scram-sha-256,none")
    config.update(overrides)
    return config


# -- the attack ------------------------------------------------------------------------

def test_a_tenant_cannot_log_in_as_postgres_by_poisoning_its_databases_search_path(tenant_pg, tenant_proxies):
    proxy = tenant_proxies(**auth_query_config(tenant_pg))
    refused = ("28P01", FAILED.format("postgres"))
    assert session_as(proxy, "postgres", "t", ATTACKER_PASSWORD) == refused
    # ... nor, within the cache's 30 s, in any other database
    assert session_as(proxy, "postgres", "payroll", ATTACKER_PASSWORD) == refused
    # the real password and a tenant's own login still work
    assert session_as(proxy, "postgres", "payroll", tenant_pg.passwords["postgres"]) == (
        "postgres", "postgres", "payroll")
    assert session_as(proxy, "alice", "t", ALICE_PASSWORD) == ("alice", "alice", "t")


@pytest.mark.parametrize("auth_query", [None, "SELECT usename, passwd FROM pg_shadow WHERE usename=$1"],
                         ids=["default-query", "unqualified-query"])
def test_auth_query_pins_search_path_even_in_a_tenants_database(tenant_pg, tenant_proxies, auth_query):
    # An operator who points auth_dbname at the tenant's own database (or keeps PgBouncer's
    # unqualified query): the auth_user's session still resolves pg_shadow in pg_catalog,
    # because its search_path comes with the StartupMessage and beats ALTER DATABASE ... SET.
    extra = {"auth_query": auth_query} if auth_query else {}
    proxy = tenant_proxies(**auth_query_config(tenant_pg, auth_dbname="t", **extra))
    assert session_as(proxy, "postgres", "t", ATTACKER_PASSWORD) == ("28P01", FAILED.format("postgres"))
    assert session_as(proxy, "postgres", "t", tenant_pg.passwords["postgres"]) == ("postgres", "postgres", "t")


def test_a_verifier_fetched_in_one_database_never_serves_another(tenant_pg, tenant_proxies):
    # A custom auth_query reading a table that lives in each database: entry "tenant" is
    # authenticated by what t holds (alice's), entry "payroll" by what payroll holds.  What the
    # tenant's database says about postgres must not open payroll, even from the cache.
    target = {"host": tenant_pg.host, "port": tenant_pg.port}
    proxy = tenant_proxies(**auth_query_config(
        tenant_pg, auth_query="SELECT usename, passwd FROM proxy_auth.users WHERE usename=$1",
        databases={"tenant": {**target, "dbname": "t"}, "payroll": {**target, "dbname": "payroll"}}))
    assert session_as(proxy, "postgres", "tenant", ATTACKER_PASSWORD) == ("postgres", "postgres", "t")
    assert session_as(proxy, "postgres", "payroll", ATTACKER_PASSWORD) == ("28P01", FAILED.format("postgres"))
    assert session_as(proxy, "postgres", "payroll", tenant_pg.passwords["postgres"]) == (
        "postgres", "postgres", "payroll")


def test_which_database_auth_query_runs_in():
    from threadpool_proxy.config import ConfigError, auth_database, from_dict, with_setting
    entries = {"app": {"host": "h"}, "renamed": {"host": "h", "dbname": "real"}, "*": {"host": "h"},
               "own": {"host": "h", "auth_dbname": "authdb"}}
    config = from_dict({"databases": entries})
    assert {name: auth_database(config, db) for name, db in config.databases.items()} == {
        "app": "app", "renamed": "real", "*": "postgres", "own": "authdb"}
    config = from_dict({"auth_dbname": "central", "databases": entries})
    assert {name: auth_database(config, db) for name, db in config.databases.items()} == {
        "app": "central", "renamed": "central", "*": "central", "own": "authdb"}
    assert auth_database(with_setting(config, "auth_dbname", "other"), config.databases["*"]) == "other"
    for bad, where in (({"auth_dbname": ""}, "auth_dbname"), ({"auth_dbname": 5}, "auth_dbname"),
                       ({"databases": {"a": {"host": "h", "auth_dbname": ["x"]}}}, "databases.a.auth_dbname")):
        with pytest.raises(ConfigError, match=f"^{where}: expected a database name"):
            from_dict({"databases": {"a": {"host": "h"}}, **bad})
