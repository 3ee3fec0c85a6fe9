"""No client chooses whom the proxy logs in as (issue 18, items 1, 5, 6 and 10).

Against a cluster set up as a pooler's server often is: its pg_hba.conf trusts
``postgres`` from loopback (the proxy's address) and asks everyone else for
scram-sha-256.  Role ``alice`` owns database ``app``; database ``payroll``
exists but the proxy does not serve it.

* item 1: ``options`` naming a startup key (user, database, replication,
  options), in any spelling, is refused with PostgreSQL's own error before any
  server connection is dialed, in every auth type and pool mode; whatever
  options a client sends, the session it gets is the authenticated user's, in
  the database of its entry (a hypothesis property).
* item 5: objects a tenant plants in its database's search_path never run
  during the reset.
* item 6: the admin console does not inherit trust; trust entries have pools
  of their own and never log in with what another client proved.
* item 10: a client's string in a log line is escaped; lines before login are
  rate-limited.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import socket
import struct
import subprocess

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import PgCluster, ProxyFactory
from helpers import (PASSWORDS, _message, parse_error_fields, psql_path, raw_login, read_message, startup_packet,
                     wait_until, write_auth_file)
from threadpool_proxy import config as cfg
from threadpool_proxy.logs import printable

ALICE_PASSWORD = "alice-secret"

AUTH_TYPES = ("scram-sha-256", "passthrough", "md5", "trust")
POOL_MODES = ("session", "transaction", "statement")


class PoolerServerCluster(PgCluster):
    """The ``pg`` cluster's roles, plus alice, app and payroll; trusts postgres from loopback."""

    HBA = (
        "local   all  all                      trust",
        "host    all  postgres     127.0.0.1/32  trust",
        "host    all  md5user      127.0.0.1/32  md5",
        "host    all  all          127.0.0.1/32  scram-sha-256",
        "host    replication  all  127.0.0.1/32  scram-sha-256",
    )

    def _setup_roles(self) -> None:
        super()._setup_roles()
        self.passwords["alice"] = ALICE_PASSWORD
        self.sql("SET password_encryption = 'scram-sha-256'",
                 f"CREATE ROLE alice LOGIN PASSWORD '{ALICE_PASSWORD}'",
                 "CREATE DATABASE app OWNER alice",
                 "CREATE DATABASE payroll")

    def tcp_logins_received(self) -> int:
        """Connections PostgreSQL received over TCP so far (log_connections: one line each)."""
        with open(self.logfile, encoding="utf-8", errors="replace") as f:
            return sum("connection received: host=127.0.0.1" in line for line in f)


@pytest.fixture(scope="module")
def spg():
    cluster = PoolerServerCluster()
    atexit.register(cluster.stop)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def verifiers(spg):
    with spg.superuser_conn() as conn:
        return dict(conn.execute("SELECT rolname, rolpassword FROM pg_authid "
                                 "WHERE rolname IN ('alice', 'postgres')").fetchall())


@pytest.fixture(scope="module")
def proxies(spg, verifiers, tmp_path_factory):
    """``proxies(auth_type, pool_mode, **more)``: a proxy serving only ``app`` (module-scoped, made once each)."""
    factory = ProxyFactory(spg)
    made = {}
    files = tmp_path_factory.mktemp("auth")
    scram_file = write_auth_file(files / "scram.yaml", {"alice": {"scram": verifiers["alice"]},
                                                         "postgres": {"scram": verifiers["postgres"]}})
    plain_file = write_auth_file(files / "plain.yaml", {"alice": {"password": ALICE_PASSWORD}})

    def make(auth_type: str, pool_mode: str, **more):
        key = (auth_type, pool_mode, tuple(sorted(more.items())))
        if key not in made:
            # (trust: the proxy logs in with the auth file's password; the server asks alice for one)
            extra = {"scram-sha-256": {"auth_file": scram_file}, "md5": {"auth_file": plain_file},
                     "trust": {"auth_file": plain_file}}.get(auth_type, {})
            made[key] = factory(auth_type=auth_type, pool_mode=pool_mode, pool_size=3,
                                databases={"app": {"host": spg.host, "port": spg.port}}, **extra, **more)
        return made[key]

    try:
        yield make
    finally:
        factory.stop_all()


def identity(proxy, options: str, **params):
    """(current_user, session_user, current_database()) of alice's session through ``proxy`` with ``options``.

    psycopg.OperationalError when the login is refused.
    """
    with psycopg.connect(host=proxy.host, port=proxy.port, user="alice", password=ALICE_PASSWORD, dbname="app",
                         options=options, connect_timeout=10, autocommit=True, **params) as conn:
        return conn.execute("SELECT current_user, session_user, pg_catalog.current_database()").fetchone()


# -- item 1: the identity is the proxy's -------------------------------------------------

def _unrecognized(name):
    return ("42704", f'unrecognized configuration parameter "{name}"')


#: options -> what PostgreSQL 15 itself answers them with (checked against the server below).
IDENTITY_OPTIONS = {
    "-c user=postgres": _unrecognized("user"),
    "--user=postgres": _unrecognized("user"),
    "-cuser=postgres": _unrecognized("user"),
    "-c USER=postgres": _unrecognized("USER"),
    "-c User=postgres": _unrecognized("User"),
    "-c database=payroll": _unrecognized("database"),
    "--database=payroll": _unrecognized("database"),
    "-c DATABASE=payroll": _unrecognized("DATABASE"),
    "-c replication=true": _unrecognized("replication"),
    "--replication=database": _unrecognized("replication"),
    "-c options=-c\\ user=postgres": _unrecognized("options"),
    "-c user=post\\ gres": _unrecognized("user"),
    "-c\\ user=postgres": _unrecognized(" user"),
    "-c application_name=x -c user=postgres": _unrecognized("user"),
    "-c user=postgres -c database=payroll": _unrecognized("user"),
    "-c search_path=public --user=postgres": _unrecognized("user"),
}

#: options the proxy refuses although PostgreSQL would not, or not in these words.
def _protocol_option(name):
    return ("0A000", f'threadpool_proxy does not pass on parameter "{name}": names beginning with "_pq_." '
                     f'are protocol extensions, not settings')


PROXY_ONLY_OPTIONS = {
    "-c _pq_.user=postgres": _protocol_option("_pq_.user"),
    "-c _PQ_.x=1": _protocol_option("_PQ_.x"),
    "-c session_authorization=postgres": ("42501", 'permission denied to set parameter "session_authorization"'),
    "--session-authorization=postgres": ("42501", 'permission denied to set parameter "session_authorization"'),
}


def test_postgresql_itself_refuses_identity_keys_in_options(spg):
    """The reference: what PostgreSQL 15 says when a client sends these options to it directly.

    It never reads them as startup keys (the hole was the proxy's translation
    of options into StartupMessage names).
    """
    for options, (sqlstate, message) in IDENTITY_OPTIONS.items():
        result = raw_login(spg.host, spg.port, "alice", "app", ALICE_PASSWORD, options={"options": options})
        assert (result.sqlstate, result.error["M"]) == (sqlstate, message), options


@pytest.mark.parametrize("pool_mode", POOL_MODES)
@pytest.mark.parametrize("auth_type", AUTH_TYPES)
def test_identity_keys_in_options_are_refused_before_any_server_connection(spg, proxies, auth_type, pool_mode):
    proxy = proxies(auth_type, pool_mode)
    logins, pool = proxy.server.logins, proxy.server.pool
    dialed_before = spg.tcp_logins_received()
    proxy_logins_before = logins.server_logins + logins.server_login_failures
    open_before = pool.snapshot()["open"]
    for options, expected in {**IDENTITY_OPTIONS, **PROXY_ONLY_OPTIONS}.items():
        result = raw_login(proxy.host, proxy.port, "alice", "app", ALICE_PASSWORD, options={"options": options})
        assert not result.ok, options
        assert result.auth_requests == [], options           # refused before any password exchange
        assert (result.sqlstate, result.error["M"]) == expected, options
        assert result.error["S"] == "FATAL"
    assert spg.tcp_logins_received() == dialed_before
    assert logins.server_logins + logins.server_login_failures == proxy_logins_before
    assert pool.snapshot()["open"] == open_before and not pool.snapshot()["pending"]
    # and the proxy still serves alice as alice
    assert identity(proxy, "-c application_name=after") == ("alice", "alice", "app")


@pytest.mark.parametrize("name", ["USER", "Database", "REPLICATION", "Options"])
def test_startup_keys_spelled_otherwise_are_refused_as_postgresql_refuses_them(spg, proxies, name):
    """A parameter spelled like a startup key in another case is a setting to PostgreSQL (startup keys
    are compared case-sensitively, settings are not): it refuses it, and so does the proxy, before dialing."""
    proxy = proxies("scram-sha-256", "transaction")
    direct = raw_login(spg.host, spg.port, "alice", "app", ALICE_PASSWORD, options={name: "postgres"})
    through = raw_login(proxy.host, proxy.port, "alice", "app", ALICE_PASSWORD, options={name: "postgres"})
    assert (direct.sqlstate, direct.error["M"]) == _unrecognized(name)
    assert (through.sqlstate, through.error["M"]) == _unrecognized(name)
    assert through.auth_requests == []


def test_identity_settings_as_startup_parameters(spg, proxies):
    proxy = proxies("scram-sha-256", "transaction")
    for name, value, sqlstate in (("session_authorization", "postgres", "42501"), ("is_superuser", "on", "55P02")):
        direct = raw_login(spg.host, spg.port, "alice", "app", ALICE_PASSWORD, options={name: value})
        through = raw_login(proxy.host, proxy.port, "alice", "app", ALICE_PASSWORD, options={name: value})
        assert (direct.sqlstate, through.sqlstate, through.auth_requests) == (sqlstate, sqlstate, []), name
    # _pq_.* spelled exactly so is a protocol option: ignored by both (NegotiateProtocolVersion names it);
    # in another case PostgreSQL would take it as a setting, which the proxy does not pass on
    assert raw_login(proxy.host, proxy.port, "alice", "app", ALICE_PASSWORD, options={"_pq_.x": "1"}).ok
    through = raw_login(proxy.host, proxy.port, "alice", "app", ALICE_PASSWORD, options={"_PQ_.x": "1"})
    assert (through.sqlstate, through.auth_requests) == ("0A000", [])


def test_replication_client_options_are_checked_like_everyones(spg, proxies):
    """A replication connection's options used to go to the server verbatim: now read and checked first."""
    proxy = proxies("scram-sha-256", "session")
    result = raw_login(proxy.host, proxy.port, "alice", "app", ALICE_PASSWORD,
                       options={"replication": "database", "options": "-c user=postgres"})
    assert (result.sqlstate, result.error["M"]) == _unrecognized("user")
    assert result.auth_requests == []


def test_replication_client_options_still_set_its_session(spg, proxies):
    """Its settings reach the WAL sender as every client's do (parameters of the StartupMessage)."""
    proxy = proxies("passthrough", "session")
    answers = []
    for target in (spg, proxy):
        conninfo = (f"host={target.host} port={target.port} user=repl dbname=app replication=database "
                    f"options='-c work_mem=1234kB --lock-timeout=9s'")
        result = subprocess.run([psql_path(spg.bindir), "-X", "-w", "-At", "-d", conninfo,
                                 "-c", "SHOW work_mem", "-c", "SHOW lock_timeout"],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PGPASSWORD": PASSWORDS["repl"], "PGCONNECT_TIMEOUT": "10"})
        answers.append((result.returncode, result.stdout.split(), result.stderr))
    assert answers[0] == (0, ["1234kB", "9s"], "")
    assert answers[1] == answers[0]


@pytest.mark.parametrize("options, sqlstate, message", [
    ("-c user", "42601", "-c user requires a value"),
    ("--user", "42601", "--user requires a value"),
    ("postgres", "42601", "invalid command-line argument for server process: postgres"),
    ("-- user=postgres", "42601", "invalid command-line argument for server process: user=postgres"),
    ("-c", "42601", "invalid command-line argument for server process: -c"),
])
def test_malformed_options_get_postgresqls_errors(spg, proxies, options, sqlstate, message):
    proxy = proxies("passthrough", "transaction")
    direct = raw_login(spg.host, spg.port, "alice", "app", ALICE_PASSWORD, options={"options": options})
    through = raw_login(proxy.host, proxy.port, "alice", "app", ALICE_PASSWORD, options={"options": options})
    assert (direct.sqlstate, direct.error["M"]) == (sqlstate, message)
    assert (through.sqlstate, through.error["M"]) == (sqlstate, message)


@pytest.mark.parametrize("pool_mode", POOL_MODES)
def test_ordinary_options_set_the_session_as_postgresql_sets_it(spg, proxies, pool_mode):
    proxy = proxies("scram-sha-256", pool_mode)
    options = "-c search_path=public --statement-timeout=12s -capplication_name=x\\ y\\\\z"
    sql = "SELECT current_setting('search_path'), current_setting('statement_timeout'), " \
          "current_setting('application_name'), current_user, session_user"
    answers = []
    for target in (spg, proxy):
        with psycopg.connect(host=target.host, port=target.port, user="alice", password=ALICE_PASSWORD,
                             dbname="app", options=options, autocommit=True) as conn:
            answers.append(conn.execute(sql).fetchone())
    assert answers[0] == ("public", "12s", "x y\\z", "alice", "alice")
    assert answers[1] == answers[0]


# The property: any options a client sends, it is refused or gets exactly its own session.

_SETTING_NAMES = st.sampled_from(["application_name", "application-name", "x.y", "my.Setting", "search_path",
                                   "role", "TimeZone", "work_mem"])
_IDENTITY_NAMES = st.sampled_from(["user", "USER", "User", "database", "DataBase", "replication", "options",
                                   "_pq_.x", "session_authorization", "session-authorization", "is_superuser"])
_NAMES = st.one_of(_SETTING_NAMES, _SETTING_NAMES, _IDENTITY_NAMES)      # (settings twice as often)
_VALUES = st.one_of(st.sampled_from(["postgres", "payroll", "alice", "app", "true", "database", "on", "1",
                                     "-c user=postgres", "public", "UTC"]),
                    st.text(alphabet="az =\\-_'\"\t.,", max_size=10))
_FORMS = st.sampled_from(["-c {}={}", "-c{}={}", "--{}={}"])


def _escape(value: str) -> str:
    return "".join("\\" + ch if ch.isspace() or ch == "\\" else ch for ch in value)


@st.composite
def option_strings(draw) -> str:
    pieces = []
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        value = draw(_VALUES)
        pieces.append(draw(_FORMS).format(draw(_NAMES), _escape(value) if draw(st.booleans()) else value))
    return " ".join(pieces)


@pytest.mark.parametrize("auth_type, pool_mode", [("scram-sha-256", "transaction"), ("passthrough", "session")])
def test_any_options_give_the_authenticated_identity_or_a_refusal(spg, proxies, auth_type, pool_mode):
    proxy = proxies(auth_type, pool_mode)
    outcomes = {"refused": 0, "served": 0}

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(options=option_strings())
    @example(options="-c application_name=served -c search_path=public")
    @example(options="-c search_path=public --user=postgres")
    def check(options):
        try:
            got = identity(proxy, options)
        except psycopg.OperationalError:
            outcomes["refused"] += 1
            return
        outcomes["served"] += 1
        assert got == ("alice", "alice", "app"), options

    check()
    assert outcomes["refused"] and outcomes["served"]      # both sides of the property were exercised


# -- item 5: the reset runs only pg_catalog's objects -----------------------------------------

PLANTED = (
    "CREATE SEQUENCE public.planted_calls",
    "CREATE FUNCTION public.format(text, text) RETURNS text LANGUAGE sql AS "
    "$$ SELECT pg_catalog.format($1, $2) FROM pg_catalog.nextval('public.planted_calls') $$",
    "CREATE FUNCTION public.pg_advisory_unlock_all() RETURNS void LANGUAGE plpgsql AS "
    "$$ BEGIN PERFORM pg_catalog.nextval('public.planted_calls'); END $$",
    "CREATE VIEW public.pg_prepared_statements AS SELECT 'planted'::pg_catalog.text AS name, true AS from_sql "
    "FROM pg_catalog.nextval('public.planted_calls')",
    "CREATE DOMAIN public.text AS pg_catalog.text CHECK (pg_catalog.nextval('public.planted_calls') > 0)",
    "ALTER DATABASE app SET search_path = public, pg_catalog",
)


def test_objects_planted_on_the_search_path_do_not_run_during_the_reset(spg, proxies):
    """The tenant (alice owns app) plants format(text, text), pg_advisory_unlock_all(), a
    pg_prepared_statements view and a text domain, and puts public before pg_catalog."""
    with psycopg.connect(spg.dsn(user="alice", dbname="app")) as owner:
        for sql in PLANTED:
            owner.execute(sql)
        owner.commit()
    try:
        proxy = proxies("scram-sha-256", "transaction", server_idle_timeout=599)    # (a proxy of its own)
        with psycopg.connect(host=proxy.host, port=proxy.port, user="alice", password=ALICE_PASSWORD,
                             dbname="app", autocommit=True) as client:
            pid = client.execute("SELECT pg_catalog.pg_backend_pid()", prepare=True).fetchone()[0]
            client.execute("PREPARE mine AS SELECT 2")
        # closing released the server connection: the proxy sent its reset (the one that keeps the
        # proxy's protocol-level statements and deallocates SQL-level ones); wait until it ran
        with spg.superuser_conn("app") as su:
            def reset_done():
                row = su.execute("SELECT state, query FROM pg_catalog.pg_stat_activity WHERE pid = %s",
                                 (pid,)).fetchone()
                return row is not None and row[0] == "idle" and row[1].startswith("CLOSE ALL;")
            assert wait_until(reset_done)
            assert su.execute("SELECT is_called FROM public.planted_calls").fetchone() == (False,)
        # the reset did its work: the next client gets that connection without the SQL-level statement
        with psycopg.connect(host=proxy.host, port=proxy.port, user="alice", password=ALICE_PASSWORD,
                             dbname="app", autocommit=True) as client:
            assert client.execute("SELECT pg_catalog.pg_backend_pid()").fetchone() == (pid,)
            rows = client.execute("SELECT name FROM pg_catalog.pg_prepared_statements WHERE from_sql").fetchall()
            assert rows == []
    finally:
        spg.sql("ALTER DATABASE app RESET search_path",
                "DROP DOMAIN public.text", "DROP VIEW public.pg_prepared_statements",
                "DROP FUNCTION public.format(pg_catalog.text, pg_catalog.text)",
                "DROP FUNCTION public.pg_advisory_unlock_all()", "DROP SEQUENCE public.planted_calls",
                dbname="app")


# -- item 6: trust and the console; trust pools apart -----------------------------------------

def _first_answer(proxy, user: str, dbname: str):
    """The proxy's first answer to a startup packet: ("R", auth code) or ("E", error fields)."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": user, "database": dbname}))
        kind, body = read_message(sock)
        sock.sendall(_message(b"X", b""))
    if kind == "R":
        return kind, struct.unpack("!I", body[:4])[0]
    return kind, parse_error_fields(body)


@pytest.mark.parametrize("with_fallback_entry", [False, True], ids=["no-star-entry", "star-entry"])
def test_console_does_not_inherit_trust(spg, verifiers, tmp_path, caplog, with_fallback_entry):
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    target = {"host": spg.host, "port": spg.port}
    databases = {"app": dict(target), **({"*": dict(target)} if with_fallback_entry else {})}
    auth_file = write_auth_file(tmp_path / "users.yaml", {"postgres": {"scram": verifiers["postgres"]}})
    factory = ProxyFactory(spg)
    try:
        proxy = factory(auth_type="trust", admin_users=["postgres"], auth_file=auth_file, databases=databases)
        assert _first_answer(proxy, "postgres", "app") == ("R", 0)          # the database entries: trust
        assert _first_answer(proxy, "postgres", "pgbouncer") == ("R", 10)   # the console: SASL, a password
        assert raw_login(proxy.host, proxy.port, "postgres", "pgbouncer", password="wrong").sqlstate == "28P01"
        assert raw_login(proxy.host, proxy.port, "postgres", "pgbouncer", password=PASSWORDS["postgres"]).ok
    finally:
        factory.stop_all()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("admin console:")]
    assert lines == ["admin console: admins log in with scram-sha-256 against the auth file (auth_type trust "
                     "does not apply to the console; admin_auth_type: trust would allow it)"]


def test_console_without_a_password_source_admits_nobody(spg, caplog):
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    factory = ProxyFactory(spg)
    try:
        proxy = factory(auth_type="trust", admin_users=["postgres"],
                        databases={"app": {"host": spg.host, "port": spg.port}})
        assert _first_answer(proxy, "postgres", "pgbouncer") == ("R", 10)
        assert raw_login(proxy.host, proxy.port, "postgres", "pgbouncer", password="guess").sqlstate == "28P01"
    finally:
        factory.stop_all()
    warnings = [r for r in caplog.records if r.getMessage().startswith("admin console:")]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "there is no auth_file: nobody can log in" in warnings[0].getMessage()


def test_console_trusts_only_when_told_to(spg, caplog):
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    factory = ProxyFactory(spg)
    try:
        proxy = factory(auth_type="trust", admin_users=["postgres"], admin_auth_type="trust",
                        databases={"app": {"host": spg.host, "port": spg.port}})
        assert _first_answer(proxy, "postgres", "pgbouncer") == ("R", 0)
    finally:
        factory.stop_all()
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("admin console:")]
    assert warnings == ["admin console: admin_auth_type trust: admins from loopback addresses log in "
                        "without a password"]


def test_admin_auth_type_is_validated():
    base = {"databases": {"app": {"host": "h"}}, "admin_users": ["a"]}
    with pytest.raises(cfg.ConfigError, match=r"^admin_auth_type: expected one of passthrough, "):
        cfg.from_dict({**base, "admin_auth_type": "kerberos"})
    with pytest.raises(cfg.ConfigError, match=r"^auth_file: required when admin_auth_type is md5$"):
        cfg.from_dict({**base, "auth_type": "trust", "admin_auth_type": "md5"})
    with pytest.raises(cfg.ConfigError, match=r"^admin_auth_type: the admin console needs a database entry"):
        cfg.from_dict({**base, "auth_type": "trust", "admin_auth_type": "passthrough"})
    assert cfg.console_auth_type(cfg.from_dict({**base, "auth_type": "trust"})) == "scram-sha-256"
    assert cfg.console_auth_type(cfg.from_dict({**base, "auth_type": "md5", "auth_file": "f"})) == "md5"
    assert cfg.console_auth_type(cfg.from_dict({**base, "auth_type": "trust", "admin_auth_type": "trust"})) == "trust"


@pytest.fixture
def two_entries(spg, verifiers, tmp_path):
    """``two_entries(alice_secret)``: ``app`` checks passwords (scram-sha-256 against an auth file
    holding ``alice_secret`` for alice); ``app_trusted`` is the same database with auth_type trust."""
    target = {"host": spg.host, "port": spg.port}
    factory = ProxyFactory(spg)

    def make(alice_secret: dict):
        auth_file = write_auth_file(tmp_path / "users.yaml", {"alice": alice_secret})
        return factory(pool_mode="transaction", auth_file=auth_file, auth_type="scram-sha-256",
                       databases={"app": dict(target),
                                  "app_trusted": {**target, "dbname": "app", "auth_type": "trust"}})
    try:
        yield make
    finally:
        factory.stop_all()


def test_a_trust_entry_never_uses_what_a_password_client_proved(spg, verifiers, two_entries):
    """alice proved her password to the proxy (SCRAM: the proxy keeps her ClientKey and a parked
    connection); a local client claiming to be alice through the trust entry gets neither: the
    server wants alice's password, which the proxy does not hold."""
    proxy = two_entries({"scram": verifiers["alice"]})
    with psycopg.connect(host=proxy.host, port=proxy.port, user="alice", password=ALICE_PASSWORD, dbname="app",
                         autocommit=True) as conn:
        pid = conn.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()[0]
    assert wait_until(lambda: sum(proxy.server.pool.snapshot()["idle"].values()) == 1)
    result = raw_login(proxy.host, proxy.port, "alice", "app_trusted")
    assert result.auth_requests == [0]                   # the proxy trusted the client...
    assert result.sqlstate == "28000"                    # ...but could not log in to the server for it
    assert "could not log in to the server for user \"alice\"" in result.error["M"]
    assert sum(proxy.server.pool.snapshot()["idle"].values()) == 1      # the parked one, untouched
    with psycopg.connect(host=proxy.host, port=proxy.port, user="alice", password=ALICE_PASSWORD, dbname="app",
                         autocommit=True) as conn:
        assert conn.execute("SELECT pg_catalog.pg_backend_pid()").fetchone() == (pid,)


def test_trust_and_password_entries_have_pools_of_their_own(spg, two_entries):
    """The auth file holds alice's password, so both entries can log in as her: still never one
    connection for both (the trust entry's is a pool of its own)."""
    proxy = two_entries({"password": ALICE_PASSWORD})
    with psycopg.connect(host=proxy.host, port=proxy.port, user="alice", password=ALICE_PASSWORD,
                         dbname="app", autocommit=True) as conn:
        checked = conn.execute("SELECT pg_catalog.pg_backend_pid()").fetchone()[0]
    assert wait_until(lambda: sum(proxy.server.pool.snapshot()["idle"].values()) == 1)
    with psycopg.connect(host=proxy.host, port=proxy.port, user="alice", dbname="app_trusted",
                         autocommit=True) as conn:
        trusted = conn.execute("SELECT current_user, pg_catalog.pg_backend_pid()").fetchone()
    assert trusted[0] == "alice" and trusted[1] != checked
    assert wait_until(lambda: sum(proxy.server.pool.snapshot()["idle"].values()) == 2)
    with psycopg.connect(host=proxy.host, port=proxy.port, user="alice", password=ALICE_PASSWORD,
                         dbname="app", autocommit=True) as conn:
        assert conn.execute("SELECT pg_catalog.pg_backend_pid()").fetchone() == (checked,)


# -- item 10: log lines ------------------------------------------------------------------------

def test_printable_escapes_what_could_break_a_line():
    assert printable("alice") == "alice"
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("back\\slash") == "back\\\\slash"
    assert printable("\x1b[2J\x00\x7f\x85") == "\\x1b[2J\\x00\\x7f\\x85"
    assert printable("line\u2028sep\u202eltr") == "line\\u2028sep\\u202eltr"
    assert printable("élan ü 名前") == "élan ü 名前"


def test_log_arguments_are_escaped_whatever_the_format(caplog):
    from threadpool_proxy.logs import get_logger
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    log = get_logger("threadpool_proxy.test_security_identity")
    log.info("user %s from %s:%d took %.1f s", "a\nb", "h\x1bost", 5432, 1.25)
    log.info("user %r", "a\nb\u2028")
    log.info(ValueError("bad\nthing"))
    assert [r.getMessage() for r in caplog.records] == [
        "user a\\nb from h\\x1bost:5432 took 1.2 s",
        "user 'a\\nb\\u2028'",
        "bad\\nthing",
    ]


def test_a_newline_in_a_user_name_stays_in_one_escaped_log_line(spg, proxies, caplog):
    caplog.set_level(logging.DEBUG, logger="threadpool_proxy")
    proxy = proxies("md5", "transaction", client_login_timeout=31)    # (its own rate limiter)
    forged = "mallory\n2031-01-01 00:00:00,000 INFO threadpool_proxy.session: admin logged in"
    result = raw_login(proxy.host, proxy.port, forged, "app", password="guess")
    assert result.sqlstate == "28P01"
    records = [r for r in caplog.records if r.name.startswith("threadpool_proxy")]
    assert wait_until(lambda: any("mallory" in r.getMessage() for r in records))
    mentions = [r.getMessage() for r in records if "mallory" in r.getMessage()]
    assert all("\n" not in m for m in mentions)
    assert any("mallory\\n2031-01-01 00:00:00,000 INFO" in m for m in mentions), mentions


def test_log_lines_of_failed_logins_are_rate_limited(spg, proxies, caplog):
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    proxy = proxies("scram-sha-256", "session", client_login_timeout=30)
    proxy.server.logins.failure_delay = 0          # (the fixed delay only slows the test down)
    junk = proxy.server.junk_log
    before = junk.total["failed password checks"]
    for i in range(20):
        assert raw_login(proxy.host, proxy.port, f"nobody{i}", "app", password="guess").sqlstate == "28P01"
    assert junk.total["failed password checks"] == before + 20
    checks = [r for r in caplog.records if "password authentication failed: " in r.getMessage()]
    refusals = [r for r in caplog.records if "password authentication failed for user" in r.getMessage()]
    # the first of each kind, and one more if the 10 s interval ended meanwhile
    assert 1 <= len(checks) <= 2 and 1 <= len(refusals) <= 2, [r.getMessage() for r in checks + refusals]
    assert [r for r in caplog.records if re.search(r"nobody\d+", r.getMessage())]
