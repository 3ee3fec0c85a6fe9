"""Configuration loading: defaults, validation messages, YAML files."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from threadpool_proxy import config as cfg
from threadpool_proxy.config import Config, ConfigError

DB = {"appdb": {"host": "127.0.0.1", "port": 5432}}


def load(**raw):
    raw.setdefault("databases", DB)
    return cfg.load(raw)


# The defaults docs/configuration.md's table documents, written out here: a default changed
# in the code fails this test until the manual says the same.
DOCUMENTED_DEFAULTS = {
    "listen_host": "127.0.0.1", "listen_port": 6432,
    "pool_mode": "session", "pool_size": 20, "min_pool_size": 0, "reserve_pool_size": 0,
    "reserve_pool_timeout": 5, "max_db_connections": 0, "max_user_connections": 0,
    "max_client_conn": 1000, "max_idle_per_key": 20, "max_total_idle": 200,
    "server_lifetime": 3600, "query_timeout": 0, "server_idle_timeout": 600, "query_wait_timeout": 120,
    "client_idle_timeout": 0, "idle_transaction_timeout": 0, "client_stall_timeout": 30,
    "server_connect_timeout": 15, "client_login_timeout": 60, "server_login_retry": 1,
    "shutdown_timeout": 30, "max_pending_logins": 3, "pending_login_timeout": 10,
    "reset_query": "DISCARD ALL", "max_prepared_statements": 200,
    "auth_type": "passthrough", "auth_file": None, "auth_user": None, "auth_password": None,
    "auth_query": "SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename=$1",
    "auth_query_cache_seconds": 30, "auth_query_cache_size": 1000, "auth_dbname": None,
    "max_pending_logins_total": 50, "admin_auth_type": None,
    "log_level": "info", "admin_users": (), "stats_users": (), "stats_period": 60, "metrics_listen": None,
    "client_tls_sslmode": "disable", "client_tls_cert_file": None, "client_tls_key_file": None,
    "client_tls_ca_file": None, "server_tls_sslmode": "disable", "server_tls_ca_file": None,
    "server_tls_cert_file": None, "server_tls_key_file": None,
    "load_balance": "round-robin", "target_session_attrs": "any",
    "health_check_period": 5, "health_check_timeout": 3, "health_check_failures": 2,
    "health_check_user": None, "workers": 1,
}


def test_defaults():
    c = load(databases={**DB, "*": {"host": "127.0.0.2"}})
    assert isinstance(c, Config)
    assert {key: getattr(c, key) for key in DOCUMENTED_DEFAULTS} == DOCUMENTED_DEFAULTS
    assert cfg.console_auth_entry(c) is c.databases["*"]       # admin_auth_database: the "*" entry
    db = c.databases["appdb"]
    assert (db.host, db.port, db.dbname) == ("127.0.0.1", 5432, None)
    assert db.pool_mode == "session" and db.pool_size == 20 and db.auth_type == "passthrough"
    assert db.server_dbname("appdb") == "appdb"
    assert db.node == "127.0.0.1:5432"


def test_database_port_defaults_to_5432_and_dbname_override():
    c = load(databases={"alias": {"host": "db.local", "dbname": "real"}})
    db = c.databases["alias"]
    assert db.port == 5432
    assert db.server_dbname("alias") == "real"


def test_listen_and_timeouts_become_floats():
    c = load(listen={"host": "0.0.0.0", "port": 0}, query_wait_timeout=5, server_idle_timeout=1.5)
    assert (c.listen_host, c.listen_port) == ("0.0.0.0", 0)
    assert c.query_wait_timeout == 5.0 and isinstance(c.query_wait_timeout, float)
    assert c.server_idle_timeout == 1.5


def test_login_and_retry_limits_defaults_and_validation():
    c = load()
    assert (c.max_pending_logins, c.pending_login_timeout, c.server_login_retry) == (3, 10.0, 1.0)
    c = load(max_pending_logins=1, pending_login_timeout=2, server_login_retry=0.5)
    assert (c.max_pending_logins, c.pending_login_timeout, c.server_login_retry) == (1, 2.0, 0.5)
    assert isinstance(c.pending_login_timeout, float) and isinstance(c.server_login_retry, float)
    for key, bad in (("max_pending_logins", 0), ("max_pending_logins", 1.5), ("pending_login_timeout", 0),
                     ("server_login_retry", -1), ("server_login_retry", "soon")):
        with pytest.raises(ConfigError, match=f"^{key}: expected "):
            load(**{key: bad})


def test_config_instance_passes_through():
    c = load()
    assert cfg.load(c) is c


def test_lookup_database_falls_back_to_star():
    c = load(databases={"appdb": {"host": "a"}, "*": {"host": "b", "port": 6000}})
    assert c.lookup_database("appdb").host == "a"
    assert c.lookup_database("anything").host == "b"
    assert c.lookup_database("anything").port == 6000
    assert load().lookup_database("nope") is None


@pytest.mark.parametrize("raw, key", [
    ({"pool_sise": 5}, "pool_sise"),
    ({"listen": {"hots": "x"}}, "listen.hots"),
    ({"databases": {"appdb": {"host": "h", "prot": 1}}}, "databases.appdb.prot"),
])
def test_unknown_key_is_named(raw, key):
    with pytest.raises(ConfigError) as excinfo:
        load(**raw)
    assert str(excinfo.value).startswith(f"{key}: unknown key")


@pytest.mark.parametrize("raw, key", [
    ({"pool_size": "5"}, "pool_size"),
    ({"pool_size": 0}, "pool_size"),
    ({"pool_size": True}, "pool_size"),
    ({"max_idle_per_key": -1}, "max_idle_per_key"),
    ({"query_wait_timeout": "soon"}, "query_wait_timeout"),
    ({"query_wait_timeout": 0}, "query_wait_timeout"),
    ({"shutdown_timeout": -1}, "shutdown_timeout"),
    ({"shutdown_timeout": "30s"}, "shutdown_timeout"),
    ({"min_pool_size": -1}, "min_pool_size"),
    ({"server_lifetime": -5}, "server_lifetime"),
    ({"query_timeout": "1m"}, "query_timeout"),
    ({"reserve_pool_size": 1.5}, "reserve_pool_size"),
    ({"reserve_pool_timeout": 0}, "reserve_pool_timeout"),
    ({"max_db_connections": -2}, "max_db_connections"),
    ({"max_user_connections": "many"}, "max_user_connections"),
    ({"databases": {"appdb": {"host": "h", "max_db_connections": -1}}}, "databases.appdb.max_db_connections"),
    ({"databases": {"appdb": {"host": "h", "min_pool_size": "3"}}}, "databases.appdb.min_pool_size"),
    ({"reset_query": None}, "reset_query"),
    ({"listen": {"port": 70000}}, "listen.port"),
    ({"listen": {"port": "6432"}}, "listen.port"),
    ({"databases": {"appdb": {"host": "h", "port": "5432"}}}, "databases.appdb.port"),
    ({"databases": {"appdb": {"host": "h", "port": 0}}}, "databases.appdb.port"),
    ({"databases": {"appdb": {"host": ""}}}, "databases.appdb.host"),
    ({"log_level": "loud"}, "log_level"),
])
def test_wrong_type_or_range(raw, key):
    with pytest.raises(ConfigError) as excinfo:
        load(**raw)
    assert str(excinfo.value).startswith(f"{key}: ")


def test_bad_pool_mode():
    with pytest.raises(ConfigError) as excinfo:
        load(pool_mode="connection")
    msg = str(excinfo.value)
    assert msg.startswith("pool_mode: ")
    assert "session" in msg and "transaction" in msg and "statement" in msg
    with pytest.raises(ConfigError, match=r"^databases\.appdb\.pool_mode: "):
        load(databases={"appdb": {"host": "h", "pool_mode": "bogus"}})


@pytest.mark.parametrize("databases", [None, {}])
def test_missing_databases(databases):
    raw = {"pool_size": 3}
    if databases is not None:
        raw["databases"] = databases
    with pytest.raises(ConfigError, match=r"^databases: "):
        cfg.load(raw)


def test_databases_must_be_mapping_and_entries_need_host():
    with pytest.raises(ConfigError, match=r"^databases: expected a mapping"):
        cfg.load({"databases": ["appdb"]})
    with pytest.raises(ConfigError, match=r"^databases\.appdb\.host: required"):
        cfg.load({"databases": {"appdb": {"port": 5432}}})
    with pytest.raises(ConfigError, match=r"^databases\.appdb\.host: required"):
        cfg.load({"databases": {"appdb": None}})


def test_per_database_overrides():
    c = load(pool_mode="transaction", pool_size=7, databases={
        "appdb": {"host": "h"},
        "sessiondb": {"host": "h", "pool_mode": "session", "pool_size": 2},
        "stmtdb": {"host": "h", "pool_mode": "statement"},
    })
    assert c.pool_mode == "transaction"
    assert c.databases["appdb"].pool_mode == "transaction"
    assert c.databases["appdb"].pool_size == 7
    assert c.databases["sessiondb"].pool_mode == "session"
    assert c.databases["sessiondb"].pool_size == 2
    assert c.databases["stmtdb"].pool_mode == "statement"
    assert c.databases["stmtdb"].pool_size == 7


def test_auth_requirements():
    with pytest.raises(ConfigError, match=r"^auth_file: required"):
        load(auth_type="scram-sha-256")
    with pytest.raises(ConfigError, match=r"^auth_user: required"):
        load(auth_type="auth_query")
    with pytest.raises(ConfigError, match=r"^auth_type: "):
        load(auth_type="kerberos")
    c = load(auth_type="md5", auth_file="/etc/users.txt")
    assert c.auth_file == "/etc/users.txt"


def test_yaml_file(tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "listen:\n"
        "  host: 127.0.0.1\n"
        "  port: 7432\n"
        "pool_mode: transaction\n"
        "pool_size: 4\n"
        "auth_type: scram-sha-256\n"
        "auth_file: users.txt\n"
        "databases:\n"
        "  appdb: {host: 127.0.0.1, port: 5433, pool_mode: session}\n"
        "  '*': {host: 127.0.0.1}\n",
        encoding="utf-8")
    c = cfg.load(str(path))
    assert c.listen_port == 7432
    assert c.pool_mode == "transaction" and c.pool_size == 4
    assert c.databases["appdb"].port == 5433
    assert c.databases["appdb"].pool_mode == "session"
    assert c.databases["*"].pool_mode == "transaction"
    # a relative auth_file is taken relative to the YAML file
    assert c.auth_file == str(tmp_path / "users.txt")
    assert cfg.load(path) == c            # os.PathLike works too


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("pool_size: 5\ndatabases: {appdb: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError) as excinfo:
        cfg.load(str(path))
    msg = str(excinfo.value)
    assert msg.startswith(str(path))
    assert "not valid YAML" in msg


def test_yaml_not_a_mapping_and_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a mapping"):
        cfg.load(str(path))
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^databases: "):
        cfg.load(str(empty))
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.load(str(tmp_path / "missing.yaml"))


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "proxy.yaml"
    path.write_text("databases: {appdb: {host: h}}\npool_sizee: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^pool_sizee: unknown key"):
        cfg.load(str(path))


def test_config_file_with_auth_password_must_not_be_readable_by_others(tmp_path):
    conf = tmp_path / "proxy.yaml"
    conf.write_text(yaml.safe_dump({"auth_type": "auth_query", "auth_user": "pgbouncer",
                                    "auth_password": "secret", "databases": {"*": {"host": "127.0.0.1"}}}))
    for mode in (0o644, 0o640, 0o604):
        os.chmod(conf, mode)
        with pytest.raises(ConfigError, match=f"^{re.escape(str(conf))}: holds auth_password but mode {mode:04o} "
                                              f"allows access by group or others; "
                                              f"run 'chmod 600 {re.escape(str(conf))}'$"):
            cfg.load(str(conf))
    os.chmod(conf, 0o600)
    assert cfg.load(str(conf)).auth_password == "secret"
    plain = tmp_path / "plain.yaml"                     # no secret in it: any mode will do
    plain.write_text(yaml.safe_dump({"databases": {"*": {"host": "127.0.0.1"}}}))
    os.chmod(plain, 0o644)
    cfg.load(str(plain))


def test_admin_console_settings():
    config = load(admin_users="alice, bob", stats_users=["carol"], stats_period=5, admin_auth_database="appdb")
    assert config.admin_users == ("alice", "bob") and config.stats_users == ("carol",)
    assert config.stats_period == 5.0 and isinstance(config.stats_period, float)
    assert load().admin_users == () and load().stats_period == 60.0


@pytest.mark.parametrize("raw, message", [
    ({"admin_users": [1]}, "admin_users: expected a list of user names"),
    ({"stats_users": "a,,b"}, "stats_users: expected a list of user names"),
    ({"admin_auth_database": "nope"}, "admin_auth_database: no entry 'nope' in databases"),
    ({"stats_period": 0}, "stats_period: expected a number of seconds > 0"),
])
def test_admin_console_settings_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        load(**raw)


def test_console_names_are_reserved_and_passthrough_console_needs_an_entry():
    with pytest.raises(ConfigError, match=r"databases\.pgbouncer: the name is reserved for the admin console"):
        cfg.from_dict({"databases": {"pgbouncer": {"host": "h"}}})
    with pytest.raises(ConfigError, match="admin_auth_database: the admin console needs a database entry"):
        cfg.from_dict({"databases": {"app": {"host": "h"}}, "admin_users": ["a"]})
    assert cfg.from_dict({"databases": {"app": {"host": "h"}}, "admin_users": ["a"],
                          "admin_auth_database": "app"}).admin_auth_database == "app"


def test_metrics_listen():
    assert load().metrics_listen is None
    assert load(metrics_listen="0.0.0.0:9127").metrics_listen == "0.0.0.0:9127"
    for bad in ("9127", ":9127", "host:port", 9127):
        with pytest.raises(ConfigError, match="metrics_listen: expected host:port"):
            load(metrics_listen=bad)


def test_workers_setting():
    assert load().workers == 1
    assert load(workers=4).workers == 4
    for bad in (0, -1, "2", cfg.MAX_WORKERS + 1, True):
        with pytest.raises(ConfigError, match=r"^workers: expected an integer from 1 to"):
            load(workers=bad)


@pytest.mark.parametrize("total,count,parts", [
    (20, 2, [10, 10]), (5, 2, [3, 2]), (4, 3, [2, 1, 1]), (7, 4, [2, 2, 2, 1]), (1, 2, [1, 1]), (0, 3, [0, 0, 0]),
    (9, 1, [9]),
])
def test_worker_share_adds_up_to_the_total_and_never_rounds_up(total, count, parts):
    assert [cfg.worker_share(total, i, count) for i in range(count)] == parts
    if total >= count:
        assert sum(parts) == total


def test_for_worker_divides_the_limits_and_every_pool_size():
    c = load(workers=2, pool_size=5, max_client_conn=1001, max_pending_logins=3, max_idle_per_key=0,
             max_total_idle=200, databases={"a": {"host": "h"}, "b": {"host": "h", "pool_size": 8}})
    w0, w1 = cfg.for_worker(c, 0, 2), cfg.for_worker(c, 1, 2)
    assert (w0.pool_size, w1.pool_size) == (3, 2)
    assert (w0.databases["a"].pool_size, w1.databases["a"].pool_size) == (3, 2)
    assert (w0.databases["b"].pool_size, w1.databases["b"].pool_size) == (4, 4)
    assert (w0.max_client_conn, w1.max_client_conn) == (501, 500)
    assert (w0.max_pending_logins, w1.max_pending_logins) == (2, 1)
    assert (w0.max_idle_per_key, w0.max_total_idle) == (0, 100)
    assert (w0.workers, w0.reset_query, w0.databases["b"].host) == (2, c.reset_query, "h")
    assert cfg.for_worker(c, 0, 1) is c


def test_split_warnings_name_limits_smaller_than_the_worker_count():
    c = load(workers=4, pool_size=2, max_pending_logins=3, databases={"a": {"host": "h"}, "b": {"host": "h",
                                                                                              "pool_size": 8}})
    warnings = cfg.split_warnings(c)
    assert any(w.startswith("databases.a.pool_size 2 is less than workers 4") for w in warnings)
    assert any(w.startswith("max_pending_logins 3 is less than workers 4") for w in warnings)
    assert not any("databases.b" in w for w in warnings)
    assert cfg.split_warnings(load(pool_size=1)) == []
