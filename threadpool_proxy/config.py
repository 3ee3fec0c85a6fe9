"""Configuration loading: YAML (or a dict) -> frozen dataclasses.

Every problem is reported as one ConfigError whose message names the key
(``databases.app.port: ...``), so the command line can print it on one line
and exit with status 2.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any, Mapping

import yaml

POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = ("passthrough", "scram-sha-256", "md5", "trust", "auth_query")
DEFAULT_RESET_QUERY = "DISCARD ALL"
#: Schema-qualified, so that no search_path (a tenant's ALTER DATABASE ... SET) can put another
#: pg_shadow in front of pg_catalog's; the auth_user's session pins search_path too (login.py).
DEFAULT_AUTH_QUERY = "SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename=$1"
#: The database auth_query runs in for a "*" entry without dbname or auth_dbname: never the
#: name a client asked for, which a tenant may own (the admin console's choice too).
DEFAULT_AUTH_DBNAME = "postgres"
#: Settings whose values carry secrets: never echoed in an error message.
SECRET_KEYS = ("auth_password",)
#: The admin console's virtual database, and the name PgBouncer's tools ask for.
CONSOLE_DATABASES = ("threadpool_proxy", "pgbouncer")
#: Most worker processes (``workers``); the worker's index is encoded in cancel key secrets.
MAX_WORKERS = 64
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: The TLS settings that name files (relative paths in a YAML file are relative to it).
TLS_FILES = ("client_tls_key_file", "client_tls_cert_file", "client_tls_ca_file",
             "server_tls_key_file", "server_tls_cert_file", "server_tls_ca_file")
#: How a database entry with several nodes spreads new server connections.
LOAD_BALANCE = ("round-robin", "least-connections", "random", "disable")
#: libpq's target_session_attrs values: which servers a database entry may use.
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
NODE_ROLES = ("primary", "replica")
#: The kinds of session state that pin a client to its server connection in transaction
#: and statement mode (``pin_on``; sessionstate.py): temporary tables, session advisory
#: locks, cursors WITH HOLD, SET ROLE / SET SESSION AUTHORIZATION, SQL PREPARE, LOAD, and
#: a LISTEN the proxy cannot take over.
PIN_KINDS = ("temp_table", "advisory_lock", "cursor_with_hold", "role", "prepare", "load", "listen")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """One server of a database entry: where it is, what it is for, and its share of connections."""

    host: str
    port: int = 5432
    role: str | None = None   # "primary", "replica", or None (not said)
    weight: int = 1

    @property
    def name(self) -> str:
        """host:port, the ``node`` part of pool keys (and what the proxy's logs call the server)."""
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class DatabaseConfig:
    """One entry of ``databases``: where the name a client asks for really lives."""

    name: str                 # the name clients connect to ("*" for the fallback)
    host: str
    port: int
    dbname: str | None        # the server's database name; None means "the name asked for"
    pool_mode: str
    pool_size: int
    auth_type: str
    max_prepared_statements: int = 200   # per server connection and per client; 0: names pass through
    #: The servers behind the entry; () means the one server ``host``/``port`` (the single-server form).
    nodes: tuple = ()
    load_balance: str = "round-robin"
    target_session_attrs: str = "any"
    role: str | None = None    # only nodes of this role serve the entry (a replica alias)
    min_pool_size: int = 0     # server connections kept open per key once used (proxy-terminated auth)
    reserve_pool_size: int = 0  # extra connections per key for clients waiting reserve_pool_timeout
    max_db_connections: int = 0  # server connections of the entry's database, all users; 0: no limit
    auth_dbname: str | None = None   # where auth_query runs for this entry; None: see auth_database()
    max_pinned_clients: int | None = None   # clients pinned at once per pool; None: half of pool_size

    def __post_init__(self) -> None:
        if not self.nodes:
            object.__setattr__(self, "nodes", (NodeConfig(self.host, self.port),))

    @property
    def pinned_client_limit(self) -> int:
        """How many of a pool's clients may be pinned to their server connection at once."""
        return self.pool_size // 2 if self.max_pinned_clients is None else self.max_pinned_clients

    @property
    def multi(self) -> bool:
        """Whether the entry routes (several nodes, a role filter or a session attribute target)."""
        return len(self.nodes) > 1 or self.role is not None or self.target_session_attrs != "any"

    @property
    def usable_nodes(self) -> tuple:
        """The nodes that may serve this entry: all, or those of its ``role``."""
        if self.role is None:
            return self.nodes
        return tuple(n for n in self.nodes if n.role == self.role)

    def server_dbname(self, requested: str) -> str:
        return self.dbname or requested

    @property
    def node(self) -> str:
        """The first node (the only one of a single-server entry), as used in pool keys."""
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class Config:
    listen_host: str = "127.0.0.1"
    listen_port: int = 6432
    pool_mode: str = "session"
    pool_size: int = 20
    min_pool_size: int = 0                  # 0: off
    reserve_pool_size: int = 0              # 0: off
    reserve_pool_timeout: float = 5.0
    max_db_connections: int = 0             # 0: no limit
    max_user_connections: int = 0           # 0: no limit
    max_client_conn: int = 1000
    max_idle_per_key: int = 20
    max_total_idle: int = 200
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0         # 0: a server connection serves once
    query_timeout: float = 0.0              # 0: off
    query_wait_timeout: float = 120.0
    client_idle_timeout: float = 0.0        # 0: off
    idle_transaction_timeout: float = 0.0   # 0: off
    client_stall_timeout: float = 30.0      # 0: off
    server_connect_timeout: float = 15.0
    client_login_timeout: float = 60.0
    max_pending_logins: int = 3
    max_pending_logins_total: int = 50      # pass-through logins still authenticating, all keys together
    pending_login_timeout: float = 10.0
    server_login_retry: float = 1.0
    shutdown_timeout: float = 30.0          # SIGTERM: how long running transactions may take to finish
    reset_query: str = DEFAULT_RESET_QUERY
    max_prepared_statements: int = 200
    pin_on: tuple = PIN_KINDS               # session state that pins a pooled client (the others are lost)
    max_pinned_clients: int | None = None   # per pool; None: half of pool_size
    auth_type: str = "passthrough"
    auth_file: str | None = None
    auth_user: str | None = None
    auth_password: str | None = None
    auth_query: str = DEFAULT_AUTH_QUERY
    auth_query_cache_seconds: float = 30.0
    auth_query_cache_size: int = 1000       # most users whose verifiers the auth_query cache keeps
    auth_dbname: str | None = None          # where auth_query runs (per entry too); see auth_database()
    log_level: str = "info"
    admin_users: tuple = ()              # may use every admin console command
    stats_users: tuple = ()              # may use the console's SHOW commands only
    admin_auth_database: str | None = None   # the entry the console authenticates like (default "*")
    admin_auth_type: str | None = None   # how the console checks passwords; None: its entry's, never trust
    stats_period: float = 60.0           # the avg_* columns of SHOW STATS cover this many seconds
    metrics_listen: str | None = None    # "host:port" of the Prometheus endpoint; None: off
    client_tls_sslmode: str = "disable"
    client_tls_key_file: str | None = None
    client_tls_cert_file: str | None = None
    client_tls_ca_file: str | None = None
    server_tls_sslmode: str = "disable"
    server_tls_key_file: str | None = None
    server_tls_cert_file: str | None = None
    server_tls_ca_file: str | None = None
    workers: int = 1                     # processes serving the port (SO_REUSEPORT); command line only
    load_balance: str = "round-robin"
    target_session_attrs: str = "any"
    health_check_period: float = 5.0
    health_check_timeout: float = 3.0
    health_check_failures: int = 2
    health_check_user: str | None = None     # default: auth_user
    databases: Mapping[str, DatabaseConfig] = dataclasses.field(default_factory=dict)

    def lookup_database(self, requested: str) -> DatabaseConfig | None:
        """The entry for a client's database name, falling back to ``*``."""
        entry = self.databases.get(requested)
        if entry is None:
            entry = self.databases.get("*")
        return entry


# key -> (type or types, validator or None, description for errors)
def _positive_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _positive_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _port(v):
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535


def _nonempty_str(v):
    return isinstance(v, str) and v != ""


def _str(v):
    return isinstance(v, str)


def _choice(choices):
    def check(v):
        return v in choices
    return check


def _user_list(v):
    if isinstance(v, str):
        return all(u.strip() for u in v.split(",")) if v.strip() else True
    return isinstance(v, (list, tuple)) and all(isinstance(u, str) and u and "," not in u for u in v)


def _host_port(v):
    if not isinstance(v, str):
        return False
    host, sep, port = v.rpartition(":")
    return bool(sep and host and port.isdigit() and int(port) <= 65535)


def _pin_kinds(v):
    if isinstance(v, str):
        v = [k.strip() for k in v.split(",") if k.strip()]
    return isinstance(v, (list, tuple)) and all(isinstance(k, str) and k in PIN_KINDS for k in v)


def _as_kinds(v) -> tuple:
    if isinstance(v, str):
        v = [k.strip() for k in v.split(",") if k.strip()]
    return tuple(k for k in PIN_KINDS if k in v)


def _as_user_tuple(v) -> tuple:
    if isinstance(v, str):
        return tuple(u.strip() for u in v.split(",") if u.strip())
    return tuple(v)


_COUNT = (_positive_int, "a positive integer")
_COUNT_OR_ZERO = (_non_negative_int, "an integer >= 0")
_SECONDS = (_positive_number, "a number of seconds > 0")
_SECONDS_OR_OFF = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                   "a number of seconds >= 0 (0: off)")

_TOP_LEVEL = {
    "pool_mode": (_choice(POOL_MODES), "one of " + ", ".join(POOL_MODES)),
    "pool_size": _COUNT,
    "max_client_conn": _COUNT,
    "min_pool_size": (_non_negative_int, "an integer >= 0 (0: off)"),
    "reserve_pool_size": (_non_negative_int, "an integer >= 0 (0: off)"),
    "reserve_pool_timeout": _SECONDS,
    "max_db_connections": (_non_negative_int, "an integer >= 0 (0: no limit)"),
    "max_user_connections": (_non_negative_int, "an integer >= 0 (0: no limit)"),
    "max_idle_per_key": _COUNT_OR_ZERO,
    "max_total_idle": _COUNT_OR_ZERO,
    "server_idle_timeout": _SECONDS,
    "server_lifetime": (_SECONDS_OR_OFF[0], "a number of seconds >= 0 (0: each server connection serves once)"),
    "query_timeout": _SECONDS_OR_OFF,
    "query_wait_timeout": _SECONDS,
    "client_idle_timeout": _SECONDS_OR_OFF,
    "idle_transaction_timeout": _SECONDS_OR_OFF,
    "client_stall_timeout": _SECONDS_OR_OFF,
    "server_connect_timeout": _SECONDS,
    "client_login_timeout": _SECONDS,
    "max_pending_logins": _COUNT,
    "max_pending_logins_total": _COUNT,
    "pending_login_timeout": _SECONDS,
    "server_login_retry": _SECONDS,
    "shutdown_timeout": (_SECONDS_OR_OFF[0], "a number of seconds >= 0 (0: SIGTERM stops at once, as SIGINT)"),
    "reset_query": (_str, "a string (empty for no reset)"),
    "max_prepared_statements": (_non_negative_int, "an integer >= 0 (0: no tracking)"),
    "pin_on": (_pin_kinds, "a list of " + ", ".join(PIN_KINDS) + " (or one comma-separated string; "
                           "empty: nothing pins)"),
    "max_pinned_clients": (lambda v: v is None or _non_negative_int(v),
                           "an integer >= 0 (0: no client may be pinned; null: half of pool_size)"),
    "auth_type": (_choice(AUTH_TYPES), "one of " + ", ".join(AUTH_TYPES)),
    "auth_file": (_nonempty_str, "a file path"),
    "auth_user": (_nonempty_str, "a user name"),
    "auth_password": (_str, "a string"),
    "auth_query": (_nonempty_str, "an SQL query with one parameter, $1"),
    "auth_query_cache_seconds": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                                 "a number of seconds >= 0"),
    "auth_query_cache_size": _COUNT,
    "auth_dbname": (_nonempty_str, "a database name"),
    "log_level": (_choice(("debug", "info", "warning", "error")), "one of debug, info, warning, error"),
    "admin_users": (_user_list, "a list of user names (or one comma-separated string)"),
    "stats_users": (_user_list, "a list of user names (or one comma-separated string)"),
    "admin_auth_database": (_nonempty_str, "the name of an entry of databases"),
    "admin_auth_type": (_choice(AUTH_TYPES), "one of " + ", ".join(AUTH_TYPES)),
    "stats_period": _SECONDS,
    "metrics_listen": (_host_port, "host:port (port 0 picks a free one)"),
    "client_tls_sslmode": (_choice(SSLMODES), "one of " + ", ".join(SSLMODES)),
    "server_tls_sslmode": (_choice(SSLMODES), "one of " + ", ".join(SSLMODES)),
    **{key: (_nonempty_str, "a file path") for key in TLS_FILES},
    "workers": (lambda v: _positive_int(v) and v <= MAX_WORKERS, f"an integer from 1 to {MAX_WORKERS}"),
    "load_balance": (_choice(LOAD_BALANCE), "one of " + ", ".join(LOAD_BALANCE)),
    "target_session_attrs": (_choice(TARGET_SESSION_ATTRS), "one of " + ", ".join(TARGET_SESSION_ATTRS)),
    "health_check_period": _SECONDS,
    "health_check_timeout": _SECONDS,
    "health_check_failures": _COUNT,
    "health_check_user": (_nonempty_str, "a user name"),
}


_LISTEN = {
    "host": (_nonempty_str, "a host name or address"),
    "port": (_port, "an integer from 0 to 65535"),
}

_DATABASE = {
    "host": (_nonempty_str, "a host name or address"),
    "port": (_port, "an integer from 1 to 65535"),
    "dbname": (_nonempty_str, "a database name"),
    "pool_mode": _TOP_LEVEL["pool_mode"],
    "pool_size": _TOP_LEVEL["pool_size"],
    "auth_type": _TOP_LEVEL["auth_type"],
    "max_prepared_statements": _TOP_LEVEL["max_prepared_statements"],
    "min_pool_size": _TOP_LEVEL["min_pool_size"],
    "reserve_pool_size": _TOP_LEVEL["reserve_pool_size"],
    "max_db_connections": _TOP_LEVEL["max_db_connections"],
    "nodes": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0, "a non-empty list of nodes"),
    "load_balance": _TOP_LEVEL["load_balance"],
    "target_session_attrs": _TOP_LEVEL["target_session_attrs"],
    "role": (_choice(NODE_ROLES), "one of " + ", ".join(NODE_ROLES)),
    "auth_dbname": _TOP_LEVEL["auth_dbname"],
    "max_pinned_clients": _TOP_LEVEL["max_pinned_clients"],
}

_NODE = {
    "host": _DATABASE["host"],
    "port": _DATABASE["port"],
    "role": (_choice(NODE_ROLES), "one of " + ", ".join(NODE_ROLES)),
    "weight": _COUNT,
}


def _node(raw, where: str) -> NodeConfig:
    """One item of ``nodes``: a mapping (host, port, role, weight) or a "host:port" string."""
    if isinstance(raw, str):
        host, sep, port = raw.rpartition(":")
        if not sep:
            host, port = raw, "5432"
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigError(f"{where}: expected host:port or a mapping with host, port, role, weight, "
                              f"got {raw!r}")
        return NodeConfig(host, int(port))
    fields = _check_section(raw, _NODE, where)
    if "host" not in fields:
        raise ConfigError(f"{where}.host: required")
    if fields.get("port", 5432) == 0:
        raise ConfigError(f"{where}.port: expected an integer from 1 to 65535, got 0")
    return NodeConfig(fields["host"], fields.get("port", 5432), fields.get("role"), fields.get("weight", 1))


def _nodes(fields: dict, where: str) -> tuple:
    """An entry's nodes: its ``nodes`` list, or its ``host``/``port`` as the one node."""
    if "nodes" not in fields:
        if "host" not in fields:
            raise ConfigError(f"{where}.host: required (or nodes: a list of servers)")
        if fields.get("port", 5432) == 0:
            raise ConfigError(f"{where}.port: expected an integer from 1 to 65535, got 0")
        return (NodeConfig(fields["host"], fields.get("port", 5432)),)
    for key in ("host", "port"):
        if key in fields:
            raise ConfigError(f"{where}.{key}: give either host/port or nodes, not both")
    nodes = tuple(_node(raw, f"{where}.nodes[{i}]") for i, raw in enumerate(fields["nodes"]))
    seen = set()
    for i, node in enumerate(nodes):
        if node.name in seen:
            raise ConfigError(f"{where}.nodes[{i}]: {node.name} is listed twice")
        seen.add(node.name)
    role = fields.get("role")
    if role is not None and not any(n.role == role for n in nodes):
        raise ConfigError(f"{where}.role: no node has role {role}")
    return nodes


def _check_section(section: Mapping[str, Any], rules, where: str) -> dict:
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where or 'configuration'}: expected a mapping, got {type(section).__name__}")
    out = {}
    for key, value in section.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in rules:
            raise ConfigError(f"{path}: unknown key")
        check, expected = rules[key]
        if not check(value):
            raise ConfigError(f"{path}: expected {expected}, got {_shown(key, value)}")
        out[key] = value
    return out


def from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Validate a plain mapping (as parsed from YAML) and build a Config."""
    raw = dict(raw or {})
    listen = raw.pop("listen", {}) or {}
    databases = raw.pop("databases", None)
    top = _check_section(raw, _TOP_LEVEL, "")
    listen = _check_section(listen, _LISTEN, "listen")
    if databases is None or databases == {}:
        raise ConfigError("databases: at least one database entry (or '*') is required")
    if not isinstance(databases, Mapping):
        raise ConfigError(f"databases: expected a mapping, got {type(databases).__name__}")

    kwargs: dict[str, Any] = {}
    for key, value in top.items():
        if key.endswith(("_timeout", "_seconds", "_retry", "_period", "_lifetime")):
            value = float(value)
        elif key in ("admin_users", "stats_users"):
            value = _as_user_tuple(value)
        elif key == "pin_on":
            value = _as_kinds(value)
        kwargs[key] = value
    if "host" in listen:
        kwargs["listen_host"] = listen["host"]
    if "port" in listen:
        kwargs["listen_port"] = listen["port"]
    defaults = Config(**kwargs)

    entries = {}
    for name, entry in databases.items():
        where = f"databases.{name}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"databases: entry names must be non-empty strings, got {name!r}")
        if name in CONSOLE_DATABASES:
            raise ConfigError(f"{where}: the name is reserved for the admin console")
        fields = _check_section(entry or {}, _DATABASE, where)
        nodes = _nodes(fields, where)
        entries[name] = DatabaseConfig(
            name=name,
            host=nodes[0].host,
            port=nodes[0].port,
            dbname=fields.get("dbname"),
            pool_mode=fields.get("pool_mode", defaults.pool_mode),
            pool_size=fields.get("pool_size", defaults.pool_size),
            auth_type=fields.get("auth_type", defaults.auth_type),
            max_prepared_statements=fields.get("max_prepared_statements", defaults.max_prepared_statements),
            nodes=nodes,
            load_balance=fields.get("load_balance", defaults.load_balance),
            target_session_attrs=fields.get("target_session_attrs", defaults.target_session_attrs),
            role=fields.get("role"),
            min_pool_size=fields.get("min_pool_size", defaults.min_pool_size),
            reserve_pool_size=fields.get("reserve_pool_size", defaults.reserve_pool_size),
            max_db_connections=fields.get("max_db_connections", defaults.max_db_connections),
            auth_dbname=fields.get("auth_dbname"),
            max_pinned_clients=fields.get("max_pinned_clients", defaults.max_pinned_clients),
        )
    config = dataclasses.replace(defaults, databases=entries)
    _check_auth(config)
    _check_console(config)
    _check_tls(config)
    return config


#: Settings a database entry takes from the top level unless it sets its own.
ENTRY_DEFAULTS = ("pool_mode", "pool_size", "auth_type", "max_prepared_statements", "load_balance",
                  "target_session_attrs", "min_pool_size", "reserve_pool_size", "max_db_connections",
                  "max_pinned_clients")


def with_setting(config: Config, key: str, text: str) -> Config:
    """``config`` with top-level setting ``key`` set to ``text`` (the console's ``SET key = value``).

    ``text`` is read as the setting's type (a number, a string, a list of
    users); it must pass the same checks as in a file (ConfigError naming the
    key otherwise).  Database entries that had the old top-level value of a
    setting they can override take the new one.
    """
    if key in ("listen", "listen_host", "listen_port", "databases") or key not in _TOP_LEVEL:
        raise ConfigError(f"{key}: unknown key" if key not in _TOP_LEVEL and key not in ("listen", "databases")
                          else f"{key}: cannot be changed while running")
    check, expected = _TOP_LEVEL[key]
    current = getattr(config, key)
    value: Any = text
    if isinstance(current, int):
        try:
            value = int(text)
        except ValueError:
            pass
    elif isinstance(current, float):
        try:
            value = float(text)
        except ValueError:
            pass
    elif current is None and text == "":
        value = None
    elif key == "max_pinned_clients" and text.strip().isdigit():
        value = int(text)
    if value is not None and not check(value):
        raise ConfigError(f"{key}: expected {expected}, got {_shown(key, text)}")
    if key.endswith(("_timeout", "_seconds", "_retry", "_period", "_lifetime")) and value is not None:
        value = float(value)
    elif key in ("admin_users", "stats_users"):
        value = _as_user_tuple(value)
    elif key == "pin_on":
        value = _as_kinds(value)
    new = dataclasses.replace(config, **{key: value})
    if key in ENTRY_DEFAULTS:
        entries = {name: dataclasses.replace(db, **{key: value}) if getattr(db, key) == current else db
                   for name, db in config.databases.items()}
        new = dataclasses.replace(new, databases=entries)
    _check_auth(new)
    _check_console(new)
    _check_tls(new)
    return new


def worker_share(total: int, index: int, count: int, at_least: int = 1) -> int:
    """Worker ``index``'s part of a limit ``total`` split among ``count`` worker processes.

    ``total // count`` each, and one more for the first ``total % count``
    workers, so the parts add up to exactly ``total`` whenever ``total >=
    count`` (rounding up would let PostgreSQL see more than ``pool_size``
    connections of a key).  Never below ``at_least`` (1: a worker with no
    slot could serve nobody), which exceeds ``total`` only when ``total <
    count``; the command line warns about that at start-up (``split_warnings``).
    A ``total`` of 0 (off, or none) stays 0.
    """
    if total <= 0 or count <= 1:
        return total
    return max(at_least, total // count + (1 if index < total % count else 0))


#: The limits ``for_worker`` divides between worker processes: what PostgreSQL or the
#: machine sees in all must stay what the configuration says.
SPLIT_LIMITS = ("pool_size", "max_pending_logins", "max_pending_logins_total", "max_client_conn",
                "max_idle_per_key", "max_total_idle", "min_pool_size", "reserve_pool_size", "max_db_connections",
                "max_user_connections")

#: The limits of a database entry that ``for_worker`` divides too.
SPLIT_ENTRY_LIMITS = ("pool_size", "min_pool_size", "reserve_pool_size", "max_db_connections",
                      "max_pinned_clients")


def for_worker(config: Config, index: int, count: int) -> Config:
    """The configuration worker ``index`` of ``count`` runs with: every limit of SPLIT_LIMITS
    (per database entry too: ``pool_size``) divided by ``worker_share``."""
    if count <= 1:
        return config
    entries = {name: dataclasses.replace(db, **{key: worker_share(getattr(db, key), index, count, at_least=0)
                                                if key == "max_pinned_clients" else
                                                worker_share(getattr(db, key), index, count)
                                                for key in SPLIT_ENTRY_LIMITS if getattr(db, key) is not None})
               for name, db in config.databases.items()}
    limits = {key: worker_share(getattr(config, key), index, count) for key in SPLIT_LIMITS}
    return dataclasses.replace(config, databases=entries, **limits)


def split_warnings(config: Config) -> list[str]:
    """Limits too small to divide among ``config.workers`` without exceeding them (one line each)."""
    count = config.workers
    if count <= 1:
        return []
    out = []
    sizes = [(f"databases.{name}.pool_size", db.pool_size) for name, db in config.databases.items()]
    for key, total in sizes + [(key, getattr(config, key)) for key in ("max_pending_logins", "max_client_conn")]:
        if 0 < total < count:
            out.append(f"{key} {total} is less than workers {count}: each worker keeps 1, so up to {count} "
                       f"are used in all")
    return out


def console_auth_entry(config: Config) -> DatabaseConfig | None:
    """The database entry the admin console authenticates like: ``admin_auth_database``, else ``*``."""
    return config.databases.get(config.admin_auth_database or "*")


def auth_database(config: Config, db: DatabaseConfig) -> str:
    """The server-side database auth_query runs in for entry ``db``: one fixed name, never the client's.

    The entry's ``auth_dbname``, else the top-level ``auth_dbname``, else the
    entry's ``dbname``, else the entry's name (``DEFAULT_AUTH_DBNAME`` for
    ``*``, whose clients name any database, a tenant's own included).
    """
    return (db.auth_dbname or config.auth_dbname or db.dbname
            or (db.name if db.name != "*" else DEFAULT_AUTH_DBNAME))


def _shown(key, value) -> str:
    """A bad value as an error message may show it: a secret-bearing key's only by its type."""
    if key in SECRET_KEYS:
        return f"a value of type {type(value).__name__} (not shown: {key} is secret)"
    return repr(value)


def console_auth_type(config: Config) -> str:
    """How the admin console checks its users: ``admin_auth_type``, else its entry's ``auth_type``.

    Never ``trust`` unless ``admin_auth_type`` says so: an entry's (or the
    top-level) trust lets local clients in as any user to reach a database, but
    an admin may change ``reset_query`` and ``auth_query`` (SQL run as every
    pooled user), so the console asks for a password (scram-sha-256, against
    the auth file) in its place.
    """
    if config.admin_auth_type:
        return config.admin_auth_type
    entry = console_auth_entry(config)
    inherited = entry.auth_type if entry is not None else config.auth_type
    return "scram-sha-256" if inherited == "trust" else inherited


def console_auth_summary(config: Config) -> str:
    """One line for the log: how the admin console authenticates its users."""
    if not (config.admin_users or config.stats_users):
        return "admin console: off (no admin_users or stats_users)"
    how = console_auth_type(config)
    if how == "trust":
        return "admin console: admin_auth_type trust: admins from loopback addresses log in without a password"
    entry = console_auth_entry(config)
    inherited = entry.auth_type if entry is not None else config.auth_type
    line = f"admin console: admins log in with {how}"
    if how in ("scram-sha-256", "md5"):
        line += " against the auth file" if config.auth_file else ", but there is no auth_file: nobody can log in"
    elif how == "passthrough":
        line += f" (the server of database entry {entry.name!r} checks the password)"
    if inherited == "trust" and not config.admin_auth_type:
        line += " (auth_type trust does not apply to the console; admin_auth_type: trust would allow it)"
    return line


def _check_console(config: Config) -> None:
    if config.admin_auth_database and config.admin_auth_database not in config.databases:
        raise ConfigError(f"admin_auth_database: no entry {config.admin_auth_database!r} in databases")
    if not (config.admin_users or config.stats_users):
        return
    how = console_auth_type(config)
    if config.admin_auth_type in ("scram-sha-256", "md5") and not config.auth_file:
        raise ConfigError(f"auth_file: required when admin_auth_type is {config.admin_auth_type}")
    if how in ("passthrough", "auth_query") and console_auth_entry(config) is None:
        key = "admin_auth_type" if config.admin_auth_type else "admin_auth_database"
        raise ConfigError(f"{key}: the admin console needs a database entry to check passwords "
                          f"against with auth_type {how}: name one with admin_auth_database, or add a '*' entry")
    if how == "auth_query" and not config.auth_user:
        raise ConfigError("auth_user: required when admin_auth_type is auth_query")


def _check_auth(config: Config) -> None:
    types = {config.auth_type} | {d.auth_type for d in config.databases.values()}
    if types & {"scram-sha-256", "md5"} and not config.auth_file and "auth_query" not in types:
        raise ConfigError("auth_file: required when auth_type is scram-sha-256 or md5")
    if "auth_query" in types and not config.auth_user:
        raise ConfigError("auth_user: required when auth_type is auth_query")


def _check_tls(config: Config) -> None:
    """The files each sslmode needs are given; whether they can be used is checked at start-up (tls.py)."""
    for side in ("client", "server"):
        mode = getattr(config, f"{side}_tls_sslmode")
        key, cert, ca = (getattr(config, f"{side}_tls_{what}_file") for what in ("key", "cert", "ca"))
        if side == "client" and mode != "disable":
            for name, value in (("cert", cert), ("key", key)):
                if not value:
                    raise ConfigError(f"client_tls_{name}_file: required when client_tls_sslmode is {mode}")
        if side == "client" and mode in ("verify-ca", "verify-full") and not ca:
            raise ConfigError(f"client_tls_ca_file: required when client_tls_sslmode is {mode} "
                              f"(client certificates are checked against it)")
        if bool(key) != bool(cert):
            missing = "key" if cert else "cert"
            raise ConfigError(f"{side}_tls_{missing}_file: required with {side}_tls_"
                              f"{'cert' if cert else 'key'}_file")


def check_tls_files(config: Config) -> None:
    """Every TLS file named is a readable file; ConfigError naming the key and the path."""
    for key in TLS_FILES:
        path = getattr(config, key)
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


def load(source: str | os.PathLike | Mapping[str, Any] | Config) -> Config:
    """Build a Config from a Config, a mapping, or the path of a YAML file.

    Relative ``auth_file`` and TLS file paths in a YAML file are taken relative to that file.
    A file holding ``auth_password`` must not be readable by group or others
    (like the auth file).
    """
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        return from_dict(source)
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as f:
            # The mode of the file we read (not of a path that may change meanwhile).
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    config = from_dict(raw)
    if config.auth_password is not None and mode & 0o077:
        raise ConfigError(f"{path}: holds auth_password but mode {mode:04o} allows access by group or others; "
                          f"run 'chmod 600 {path}'")
    here = os.path.dirname(os.path.abspath(path))
    relative = {key: os.path.join(here, getattr(config, key)) for key in ("auth_file", *TLS_FILES)
                if getattr(config, key) and not os.path.isabs(getattr(config, key))}
    return dataclasses.replace(config, **relative) if relative else config
