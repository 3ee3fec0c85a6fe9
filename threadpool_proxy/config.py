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

from .errors import ConfigError
from .protocol import CONSOLE_DATABASES
from . import dsn as dsn_mod

POOL_MODES = ("session", "transaction", "statement")
#: password: the client sends its password in clear text (PgBouncer's "plain"); hba: the method
#: comes from auth_hba_file's first matching line (hba.py); cert: a verified TLS client certificate.
AUTH_TYPES = ("passthrough", "scram-sha-256", "md5", "trust", "auth_query", "password", "hba", "cert")
DEFAULT_RESET_QUERY = "DISCARD ALL"
#: Schema-qualified, so that no search_path (a tenant's ALTER DATABASE ... SET) can put another
#: pg_shadow in front of pg_catalog's; the auth_user's session pins search_path too (login.py).
DEFAULT_AUTH_QUERY = "SELECT usename, passwd FROM pg_catalog.pg_shadow WHERE usename=$1"
#: The database auth_query runs in for a "*" entry without dbname or auth_dbname: never the
#: name a client asked for, which a tenant may own (the admin console's choice too).
DEFAULT_AUTH_DBNAME = "postgres"
#: Settings whose values carry secrets: never echoed in an error message.
SECRET_KEYS = ("auth_password",)
#: Most worker processes (``workers``); the worker's index is encoded in cancel key secrets.
MAX_WORKERS = 64
#: The largest ``peer_id``: cancel key secrets keep 8 bits for it (cancelkeys.py).
PEER_ID_MAX = 255
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: The TLS settings that name files (relative paths in a YAML file are relative to it).
TLS_FILES = ("client_tls_key_file", "client_tls_cert_file", "client_tls_ca_file",
             "server_tls_key_file", "server_tls_cert_file", "server_tls_ca_file")
#: How a database entry with several nodes spreads new server connections.
LOAD_BALANCE = ("round-robin", "least-connections", "random", "disable")
#: libpq's target_session_attrs values: which servers a database entry may use.
TARGET_SESSION_ATTRS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")
NODE_ROLES = ("primary", "replica")
#: The methods ``server_require_auth`` names, as libpq's ``require_auth`` (the ones the proxy can do).
SERVER_AUTH_METHODS = ("password", "md5", "scram-sha-256", "none")
#: ``server_tls_ca_file: system``: the system's trusted roots (libpq's ``sslrootcert=system``).
SYSTEM_CA = "system"
#: The least ``max_tracked_message_size``: a long server error is judged by its first
#: 1024 bytes (protocol.ERROR_HEAD_SIZE), which must fit.
MIN_TRACKED_MESSAGE_SIZE = 4096
#: The kinds of session state that pin a client to its server connection in transaction
#: and statement mode (``pin_on``; sessionstate.py): temporary tables, session advisory
#: locks, cursors WITH HOLD, SET ROLE / SET SESSION AUTHORIZATION, SQL PREPARE, LOAD, and
#: a LISTEN the proxy cannot take over.
PIN_KINDS = ("temp_table", "advisory_lock", "cursor_with_hold", "role", "prepare", "load", "listen")

#: Settings only a restart changes: RELOAD keeps their old values (and says so).
RESTART_ONLY = ("listen_host", "listen_port", "unix_socket_dir", "unix_socket_mode", "unix_socket_group",
                "metrics_listen", "workers", "logfile", "pidfile", "peer_id")



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


@dataclasses.dataclass(frozen=True, repr=False)
class PeerConfig:
    """One entry of ``peers``: another proxy of the group, where its clients' cancel requests are sent."""

    host: str
    port: int = 6432

    def __repr__(self) -> str:          # SHOW CONFIG shows peers as {2: 10.0.0.2:6432, ...}
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
    #: A forced server login (PgBouncer's ``user=``/``password=``): every client of the entry is served by
    #: server connections of this user (one pool), whoever logged in to the proxy; None: the client's own.
    user: str | None = None
    password: str | None = None   # the forced user's password (default: its auth_file secret)
    auth_user: str | None = None  # overrides the top-level auth_user for this entry (auth_query)
    auth_query: str | None = None
    auth_dbname: str | None = None  # where auth_query runs for this entry; None: see auth_database()
    connect_query: str | None = None  # run once on each new server connection; errors are logged only
    #: Startup parameters for new server connections (client_encoding, datestyle, timezone...); the
    #: client's own values win.  A tuple of (name, value) pairs so the entry stays hashable.
    settings: tuple = ()
    max_db_client_connections: int = 0   # clients of this entry at once; 0: no limit
    max_user_connections: int = 0        # from ``users``: this user's server connections; 0: top level's
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

    def server_user(self, client_user: str) -> str:
        """The user server connections log in as: the forced ``user``, else the client's."""
        return self.user or client_user

    @property
    def node(self) -> str:
        """The first node (the only one of a single-server entry), as used in pool keys."""
        return f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class UserConfig:
    """One entry of ``users`` (PgBouncer's [users]): settings of one client user, over its database entry's."""

    name: str
    pool_mode: str | None = None
    pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_user_connections: int = 0          # 0: the top-level max_user_connections
    max_user_client_connections: int = 0   # 0: the top-level max_user_client_connections


@dataclasses.dataclass(frozen=True)
class Config:
    listen_host: str = "127.0.0.1"          # one address, a comma-separated list, "*" (all), "" (no TCP)
    listen_port: int = 6432
    unix_socket_dir: str | None = None      # listen on <dir>/.s.PGSQL.<port> too; None: no unix socket
    unix_socket_mode: int = 0o777
    unix_socket_group: str | None = None
    pool_mode: str = "session"
    pool_size: int = 20
    min_pool_size: int = 0                  # 0: off
    reserve_pool_size: int = 0              # 0: off
    reserve_pool_timeout: float = 5.0
    max_db_connections: int = 0             # 0: no limit
    max_user_connections: int = 0           # 0: no limit
    max_client_conn: int = 1000
    max_db_client_connections: int = 0      # clients of one database entry; 0: no limit
    max_user_client_connections: int = 0    # clients of one user; 0: no limit
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
    server_linger: bool = True              # False: every transaction end releases the server connection
    reset_query: str = DEFAULT_RESET_QUERY
    max_prepared_statements: int = 200
    #: the longest message the proxy holds in memory to look into (protocol.MAX_HELD_MESSAGE)
    max_tracked_message_size: int = 1 << 20
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
    auth_hba_file: str | None = None     # auth_type hba: pg_hba.conf lines choosing each client's method
    auth_ident_file: str | None = None   # map= of peer and cert lines: pg_ident.conf lines
    tcp_keepalive: bool = True           # SO_KEEPALIVE on client and server TCP connections
    tcp_keepidle: int = 0                # seconds idle before the first probe; 0: the OS default
    tcp_keepintvl: int = 0               # seconds between probes; 0: the OS default
    tcp_keepcnt: int = 0                 # probes lost before the connection is dropped; 0: the OS default
    log_level: str = "info"
    logfile: str | None = None           # command line: log to this file too (reopened after logrotate)
    pidfile: str | None = None           # command line: write the process id here, removed at exit
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
    #: which authentication the proxy accepts from servers it logs in to (libpq's require_auth);
    #: None: by the secret it holds (see docs/security-wire.md)
    server_require_auth: str | None = None
    server_scram_max_iterations: int = 100_000   # most PBKDF2 rounds a server may ask of the proxy
    metrics_timeout: float = 5.0         # a metrics request must arrive and its answer go out within this
    metrics_max_connections: int = 4     # metrics connections served at once; more get 503
    workers: int = 1                     # processes serving the port (SO_REUSEPORT); command line only
    worker_retire_timeout: float = 10.0  # rolling restart (SIGUSR2): a replaced worker's clients may stay this long
    peer_id: int = 0                     # this proxy's id in a group of proxies (cancel keys name it); 0: none
    peers: Mapping[int, PeerConfig] = dataclasses.field(default_factory=dict)   # peer id -> its listen address
    peer_cancel_timeout: float = 5.0     # forwarding a cancel request to a peer: connect, send, its close
    shutdown_unready_delay: float = 0.0  # SIGTERM: /ready fails this long before the listening socket closes
    load_balance: str = "round-robin"
    target_session_attrs: str = "any"
    health_check_period: float = 5.0
    health_check_timeout: float = 3.0
    health_check_failures: int = 2
    health_check_user: str | None = None     # default: auth_user
    databases: Mapping[str, DatabaseConfig] = dataclasses.field(default_factory=dict)
    users: Mapping[str, UserConfig] = dataclasses.field(default_factory=dict)

    def lookup_database(self, requested: str, user: str | None = None) -> DatabaseConfig | None:
        """The entry for a client's database name, falling back to ``*``.

        With ``user``, that user's ``users`` settings (pool_mode, pool_size,
        reserve_pool_size, max_user_connections) replace the entry's.
        """
        entry = self.databases.get(requested)
        if entry is None:
            entry = self.databases.get("*")
        if entry is None or user is None:
            return entry
        override = self.users.get(user)
        if override is None:
            return entry
        changes = {key: getattr(override, key) for key in ("pool_mode", "pool_size", "reserve_pool_size")
                   if getattr(override, key) is not None}
        if override.max_user_connections:
            changes["max_user_connections"] = override.max_user_connections
        return dataclasses.replace(entry, **changes) if changes else entry

    def user_client_limit(self, user: str) -> int:
        """How many clients ``user`` may have at once (``users`` over the top level); 0: no limit."""
        override = self.users.get(user)
        return (override.max_user_client_connections if override is not None else 0) or \
            self.max_user_client_connections


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


def _listen_hosts(v):
    """One address or name, a comma-separated list of them, "*", or "" (no TCP)."""
    if not isinstance(v, str):
        return False
    return not v.strip() or all(part.strip() for part in v.split(","))


def _octal_mode(v):
    if isinstance(v, str):
        try:
            v = int(v, 8)
        except ValueError:
            return False
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0o777


def _settings_map(v):
    return isinstance(v, Mapping) and all(isinstance(k, str) and k and isinstance(x, str) for k, x in v.items())


def _host_port(v):
    if not isinstance(v, str):
        return False
    host, sep, port = v.rpartition(":")
    return bool(sep and host and port.isdigit() and int(port) <= 65535)


def parse_require_auth(value: str) -> tuple[bool, frozenset]:
    """``server_require_auth`` as libpq reads ``require_auth``: (negated, methods).

    A comma-separated list of SERVER_AUTH_METHODS, each or none of them
    prefixed with ``!`` (then: every method but those).  ValueError says what is wrong.
    """
    words = [w.strip() for w in value.split(",")]
    if not all(words):
        raise ValueError("an empty method in the list")
    negated = {w.startswith("!") for w in words}
    if len(negated) > 1:
        raise ValueError("negative and positive methods cannot be mixed")
    methods = [w.lstrip("!") for w in words]
    for method in methods:
        if method not in SERVER_AUTH_METHODS:
            raise ValueError(f"unknown method {method!r} (the proxy can do {', '.join(SERVER_AUTH_METHODS)})")
    if len(set(methods)) != len(methods):
        raise ValueError("a method is named twice")
    return negated.pop(), frozenset(methods)


def _require_auth(v) -> bool:
    if isinstance(v, (list, tuple)) and v and all(isinstance(w, str) for w in v):
        v = ",".join(v)
    if not isinstance(v, str):
        return False
    try:
        parse_require_auth(v)
    except ValueError:
        return False
    return True


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
    "max_db_client_connections": (_non_negative_int, "an integer >= 0 (0: no limit)"),
    "max_user_client_connections": (_non_negative_int, "an integer >= 0 (0: no limit)"),
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
    "server_linger": (lambda v: isinstance(v, bool), "true or false"),
    "reset_query": (_str, "a string (empty for no reset)"),
    "max_prepared_statements": (_non_negative_int, "an integer >= 0 (0: no tracking)"),
    "max_tracked_message_size": (lambda v: _positive_int(v) and v >= MIN_TRACKED_MESSAGE_SIZE,
                                 f"a number of bytes >= {MIN_TRACKED_MESSAGE_SIZE}"),
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
    "auth_hba_file": (_nonempty_str, "a file path"),
    "auth_ident_file": (_nonempty_str, "a file path"),
    "tcp_keepalive": (lambda v: isinstance(v, bool), "true or false"),
    "tcp_keepidle": (_non_negative_int, "a number of seconds >= 0 (0: the OS default)"),
    "tcp_keepintvl": (_non_negative_int, "a number of seconds >= 0 (0: the OS default)"),
    "tcp_keepcnt": (_non_negative_int, "an integer >= 0 (0: the OS default)"),
    "logfile": (_nonempty_str, "a file path"),
    "pidfile": (_nonempty_str, "a file path"),
    "log_level": (_choice(("debug", "info", "warning", "error")), "one of debug, info, warning, error"),
    "admin_users": (_user_list, "a list of user names (or one comma-separated string)"),
    "stats_users": (_user_list, "a list of user names (or one comma-separated string)"),
    "admin_auth_database": (_nonempty_str, "the name of an entry of databases"),
    "admin_auth_type": (_choice(AUTH_TYPES), "one of " + ", ".join(AUTH_TYPES)),
    "stats_period": _SECONDS,
    "metrics_listen": (_host_port, "host:port (port 0 picks a free one)"),
    "client_tls_sslmode": (_choice(SSLMODES), "one of " + ", ".join(SSLMODES)),
    "server_tls_sslmode": (_choice(SSLMODES), "one of " + ", ".join(SSLMODES)),
    "server_require_auth": (_require_auth, "a comma-separated list of " + ", ".join(SERVER_AUTH_METHODS)
                            + ", each or none prefixed with ! (as libpq's require_auth)"),
    "server_scram_max_iterations": _COUNT,
    "metrics_timeout": _SECONDS,
    "metrics_max_connections": _COUNT,
    **{key: (_nonempty_str, "a file path") for key in TLS_FILES},
    "workers": (lambda v: _positive_int(v) and v <= MAX_WORKERS, f"an integer from 1 to {MAX_WORKERS}"),
    "worker_retire_timeout": _SECONDS_OR_OFF,
    "peer_id": (lambda v: _non_negative_int(v) and v <= PEER_ID_MAX,
                f"an integer from 1 to {PEER_ID_MAX} (0: no peering)"),
    "peer_cancel_timeout": _SECONDS,
    "shutdown_unready_delay": (_SECONDS_OR_OFF[0], "a number of seconds >= 0 (0: the listener closes at once)"),
    "load_balance": (_choice(LOAD_BALANCE), "one of " + ", ".join(LOAD_BALANCE)),
    "target_session_attrs": (_choice(TARGET_SESSION_ATTRS), "one of " + ", ".join(TARGET_SESSION_ATTRS)),
    "health_check_period": _SECONDS,
    "health_check_timeout": _SECONDS,
    "health_check_failures": _COUNT,
    "health_check_user": (_nonempty_str, "a user name"),
}


_LISTEN = {
    "host": (_listen_hosts, "an address, a comma-separated list of them, * (every address) or \"\" (no TCP)"),
    "port": (_port, "an integer from 0 to 65535"),
    "unix_socket_dir": (_nonempty_str, "a directory"),
    "unix_socket_mode": (_octal_mode, "a file mode such as 0777 (octal)"),
    "unix_socket_group": (_nonempty_str, "a group name"),
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
    "user": (_nonempty_str, "a user name"),
    "password": (_str, "a string"),
    "auth_user": (_nonempty_str, "a user name"),
    "auth_query": (_nonempty_str, "an SQL query with one parameter, $1"),
    "auth_dbname": _TOP_LEVEL["auth_dbname"],
    "connect_query": (_nonempty_str, "an SQL query"),
    "settings": (_settings_map, "a mapping of parameter names to string values"),
    "max_db_client_connections": _TOP_LEVEL["max_db_client_connections"],
    "dsn": (_str, "a PostgreSQL connection URI or key=value string"),
    "max_pinned_clients": _TOP_LEVEL["max_pinned_clients"],
}

_USER = {
    "pool_mode": _TOP_LEVEL["pool_mode"],
    "pool_size": _TOP_LEVEL["pool_size"],
    "reserve_pool_size": _TOP_LEVEL["reserve_pool_size"],
    "max_user_connections": _TOP_LEVEL["max_user_connections"],
    "max_user_client_connections": _TOP_LEVEL["max_user_client_connections"],
}

_PEER = {
    "host": (_nonempty_str, "a host name or address"),
    "port": (lambda v: _port(v) and v > 0, "an integer from 1 to 65535"),
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


def _peers(raw, peer_id: int) -> dict:
    """``peers``: peer id -> {host, port} (or "host:port"); this proxy's own id may be listed too."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"peers: expected a mapping of peer ids to addresses, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        number = int(key) if isinstance(key, str) and key.isdigit() else key
        if not _positive_int(number) or number > PEER_ID_MAX:
            raise ConfigError(f"peers: {key!r} is not a peer id (an integer from 1 to {PEER_ID_MAX})")
        where = f"peers.{number}"
        if number in out:
            raise ConfigError(f"{where}: listed twice")
        if isinstance(value, str):
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ConfigError(f"{where}: expected host:port or a mapping with host and port, got {value!r}")
            out[number] = PeerConfig(host.strip("[]"), int(port))
            continue
        fields = _check_section(value, _PEER, where)
        if "host" not in fields:
            raise ConfigError(f"{where}.host: required")
        out[number] = PeerConfig(fields["host"], fields.get("port", 6432))
    if out and not peer_id:
        raise ConfigError(f"peer_id: required with peers (this proxy's own id, 1 to {PEER_ID_MAX}): "
                          f"its cancel keys must say which proxy gave them out")
    return out


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


def _users(raw) -> dict:
    """The ``users`` section: user name -> UserConfig."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"users: expected a mapping of user names to settings, got {type(raw).__name__}")
    out = {}
    for name, fields in raw.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"users: user names must be non-empty strings, got {name!r}")
        fields = _check_section(fields or {}, _USER, f"users.{name}")
        out[name] = UserConfig(name, **fields)
    return out


#: Connection string keywords a database entry takes (host, port, dbname and these),
#: and where each goes: an entry setting of the same meaning.
DSN_ENTRY_KEYWORDS = {"target_session_attrs": "target_session_attrs", "load_balance_hosts": "load_balance"}

#: Keywords accepted and not used: the client's side of a connection (its own name,
#: timeouts, encoding), or credentials, which clients give themselves when they log in.
DSN_IGNORED_KEYWORDS = frozenset(("user", "password", "passfile", "application_name", "fallback_application_name",
                                  "connect_timeout", "client_encoding", "keepalives", "keepalives_idle",
                                  "keepalives_interval", "keepalives_count", "tcp_user_timeout", "gssencmode"))

#: Keywords that have a proxy setting of their own: the message names it.
DSN_ELSEWHERE = {"sslcert": "server_tls_cert_file", "sslkey": "server_tls_key_file",
                 "sslrootcert": "server_tls_ca_file", "options": "the clients' own startup parameters",
                 "service": "host, port and dbname written out"}


def _from_dsn(fields: dict, where: str, top: Config) -> dict:
    """An entry's ``dsn`` (a URI or key=value string) -> its host/port (or nodes) and dbname.

    The string is the application's own, so it may carry a user and password:
    they are accepted and not used (clients log in as themselves) and never
    appear in a message.  What the entry cannot honour is an error naming the
    keyword: a unix-socket host, an sslmode stronger than ``server_tls_sslmode``,
    channel_binding=require, a keyword with a proxy setting of its own.
    """
    where = f"{where}.dsn"
    clash = [k for k in ("host", "port", "nodes", "dbname") if k in fields]
    if clash:
        raise ConfigError(f"{where}: give either dsn or {', '.join(clash)}, not both")
    try:
        info = dsn_mod.parse(fields.pop("dsn"))
        addresses = info.addresses
    except dsn_mod.DsnError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    for keyword, value in info.params.items():
        if keyword in ("host", "hostaddr", "port", "dbname") or keyword in DSN_ENTRY_KEYWORDS:
            continue
        if keyword in DSN_IGNORED_KEYWORDS:
            continue
        if keyword == "sslmode":
            if value not in SSLMODES:
                raise ConfigError(f"{where}: sslmode: expected one of {', '.join(SSLMODES)}, got {value!r}")
            if SSLMODES.index(value) > SSLMODES.index(top.server_tls_sslmode) and value not in ("allow", "prefer"):
                raise ConfigError(f"{where}: sslmode={value} is stronger than server_tls_sslmode "
                                  f"({top.server_tls_sslmode}), which the proxy's connections to servers use: "
                                  f"set server_tls_sslmode: {value}")
            continue
        if keyword == "channel_binding":
            if value == "require":
                raise ConfigError(f"{where}: channel_binding=require: the proxy's own logins to servers do not "
                                  f"use channel binding")
            continue
        if keyword in DSN_ELSEWHERE:
            raise ConfigError(f"{where}: {keyword} is not taken in a database entry: use {DSN_ELSEWHERE[keyword]}")
        raise ConfigError(f"{where}: {keyword}: not a connection string parameter a database entry takes "
                          f"(it takes host, hostaddr, port, dbname, {', '.join(DSN_ENTRY_KEYWORDS)}, sslmode; "
                          f"user and password are accepted and not used)")
    if not addresses:
        raise ConfigError(f"{where}: no host: name the server (host=... or postgresql://host/...)")
    for host, _port in addresses:
        if host.startswith("/") or host.startswith("@"):
            raise ConfigError(f"{where}: host {host} is a unix-socket directory; the proxy reaches servers "
                              f"over TCP: give a host name or address")
        if not host:
            raise ConfigError(f"{where}: an empty host name in the host list")
    out = dict(fields)
    if len(addresses) == 1:
        out["host"], out["port"] = addresses[0]
    else:
        out["nodes"] = [{"host": host, "port": port} for host, port in addresses]
    if info.get("dbname"):
        out["dbname"] = info.get("dbname")
    for keyword, key in DSN_ENTRY_KEYWORDS.items():
        value = info.get(keyword)
        if value is None:
            continue
        if key == "load_balance":
            value = {"random": "random", "disable": "disable"}.get(value, value)
            if value not in ("random", "disable"):
                raise ConfigError(f"{where}: load_balance_hosts: expected disable or random, got {value!r}")
        if key in out:
            raise ConfigError(f"{where}: {keyword} in the connection string and {key} in the entry: give one")
        out[key] = value
    return _check_section(out, _DATABASE, where.rsplit(".", 1)[0])


def from_dict(raw: Mapping[str, Any] | None) -> Config:
    """Validate a plain mapping (as parsed from YAML) and build a Config."""
    raw = dict(raw or {})
    listen = raw.pop("listen", {}) or {}
    databases = raw.pop("databases", None)
    users = raw.pop("users", None) or {}
    peers = raw.pop("peers", None)
    top = _check_section(raw, _TOP_LEVEL, "")
    listen = _check_section(listen, _LISTEN, "listen")
    if databases is None or databases == {}:
        raise ConfigError("databases: at least one database entry (or '*') is required")
    if not isinstance(databases, Mapping):
        raise ConfigError(f"databases: expected a mapping, got {type(databases).__name__}")

    kwargs: dict[str, Any] = {}
    for key, value in top.items():
        if key.endswith(("_timeout", "_seconds", "_retry", "_period", "_lifetime", "_delay")):
            value = float(value)
        elif key in ("admin_users", "stats_users"):
            value = _as_user_tuple(value)
        elif key == "server_require_auth" and not isinstance(value, str):
            value = ",".join(value)
        elif key == "pin_on":
            value = _as_kinds(value)
        kwargs[key] = value
    if "host" in listen:
        kwargs["listen_host"] = listen["host"]
    if "port" in listen:
        kwargs["listen_port"] = listen["port"]
    for key in ("unix_socket_dir", "unix_socket_group"):
        if key in listen:
            kwargs[key] = listen[key]
    if "unix_socket_mode" in listen:
        mode = listen["unix_socket_mode"]
        kwargs["unix_socket_mode"] = int(mode, 8) if isinstance(mode, str) else mode
    if not kwargs.get("listen_host", "127.0.0.1").strip() and not kwargs.get("unix_socket_dir"):
        raise ConfigError('listen.host: "" (no TCP) needs listen.unix_socket_dir: the proxy would listen nowhere')
    kwargs["users"] = _users(users)
    kwargs["peers"] = _peers(peers, kwargs.get("peer_id", 0))
    defaults = Config(**kwargs)

    entries = {}
    for name, entry in databases.items():
        where = f"databases.{name}"
        if not isinstance(name, str) or not name:
            raise ConfigError(f"databases: entry names must be non-empty strings, got {name!r}")
        if name in CONSOLE_DATABASES:
            raise ConfigError(f"{where}: the name is reserved for the admin console")
        if isinstance(entry, str):
            entry = {"dsn": entry}
        fields = _check_section(entry or {}, _DATABASE, where)
        if "dsn" in fields:
            fields = _from_dsn(fields, where, defaults)
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
            user=fields.get("user"),
            password=fields.get("password"),
            auth_user=fields.get("auth_user"),
            auth_query=fields.get("auth_query"),
            auth_dbname=fields.get("auth_dbname"),
            connect_query=fields.get("connect_query"),
            settings=tuple((k, v) for k, v in (fields.get("settings") or {}).items()),
            max_db_client_connections=fields.get("max_db_client_connections", defaults.max_db_client_connections),
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
    fixed = ("listen", "listen_host", "listen_port", "unix_socket_dir", "unix_socket_mode", "unix_socket_group",
             "databases", "users", "peers")
    if key in fixed or key not in _TOP_LEVEL:
        raise ConfigError(f"{key}: unknown key" if key not in _TOP_LEVEL and key not in fixed
                          else f"{key}: cannot be changed while running")
    check, expected = _TOP_LEVEL[key]
    current = getattr(config, key)
    value: Any = text
    if isinstance(current, bool):
        value = {"1": True, "on": True, "true": True, "yes": True,
                 "0": False, "off": False, "false": False, "no": False}.get(text.strip().lower(), text)
    elif isinstance(current, int):
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
    if key.endswith(("_timeout", "_seconds", "_retry", "_period", "_lifetime", "_delay")) and value is not None:
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
    users = {name: dataclasses.replace(u, pool_size=None if u.pool_size is None
                                       else worker_share(u.pool_size, index, count),
                                       max_user_connections=worker_share(u.max_user_connections, index, count))
             for name, u in config.users.items()}
    return dataclasses.replace(config, databases=entries, users=users, **limits)


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
    if types & {"scram-sha-256", "md5", "password"} and not config.auth_file and "auth_query" not in types:
        raise ConfigError("auth_file: required when auth_type is scram-sha-256, md5 or password")
    if "auth_query" in types and not config.auth_user and not all(
            d.auth_user for d in config.databases.values() if d.auth_type == "auth_query"):
        raise ConfigError("auth_user: required when auth_type is auth_query")
    if "hba" in types and not config.auth_hba_file:
        raise ConfigError("auth_hba_file: required when auth_type is hba")
    if "cert" in types and config.client_tls_sslmode not in ("verify-ca", "verify-full"):
        raise ConfigError("client_tls_sslmode: auth_type cert needs verify-ca or verify-full "
                          "(client certificates must be checked)")
    for name, db in config.databases.items():
        if db.user and db.auth_type == "passthrough":
            raise ConfigError(f"databases.{name}.user: a forced user needs the proxy to check clients itself "
                              f"(auth_type scram-sha-256, md5, password, hba, cert, trust or auth_query), "
                              f"not passthrough")


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
        if side == "server" and mode in ("verify-ca", "verify-full") and not ca:
            # libpq: "root certificate file ... does not exist"; no silent fall-back to every public CA
            raise ConfigError(f"server_tls_ca_file: required when server_tls_sslmode is {mode}: the CA "
                              f"certificates servers' certificates must be signed by (or '{SYSTEM_CA}', "
                              f"the system's trusted roots, with verify-full only)")
        if side == "server" and ca == SYSTEM_CA and mode != "verify-full":
            # libpq: sslrootcert=system requires verify-full; anyone can get a publicly
            # signed certificate for a host name they control
            raise ConfigError(f"server_tls_ca_file: '{SYSTEM_CA}' (the system's trusted roots) needs "
                              f"server_tls_sslmode verify-full, not {mode}: any publicly signed certificate "
                              f"would pass verify-ca")
        if bool(key) != bool(cert):
            missing = "key" if cert else "cert"
            raise ConfigError(f"{side}_tls_{missing}_file: required with {side}_tls_"
                              f"{'cert' if cert else 'key'}_file")


def check_tls_files(config: Config) -> None:
    """Every TLS file named is a readable file; ConfigError naming the key and the path."""
    for key in TLS_FILES:
        path = getattr(config, key)
        if path is None or (key == "server_tls_ca_file" and path == SYSTEM_CA):
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


#: Settings naming files or directories: relative paths in a configuration file are relative to it.
PATH_SETTINGS = ("auth_file", "auth_hba_file", "auth_ident_file", "unix_socket_dir", "logfile", "pidfile",
                 *TLS_FILES)


def load(source: str | os.PathLike | Mapping[str, Any] | Config, notes: list | None = None) -> Config:
    """Build a Config from a Config, a mapping, or the path of a YAML file or a PgBouncer ini file.

    A ``.ini`` file, or one whose content looks like PgBouncer's ini format
    (pgbouncer_ini.py), is translated into the native mapping first; what it
    sets that the proxy does not implement is appended to ``notes`` (one
    line, for the caller to log).  Relative file paths (auth_file,
    auth_hba_file, TLS files, unix_socket_dir) are taken relative to the
    file.  A file holding a password (``auth_password``, a database entry's
    ``password``) must not be readable by group or others (like the auth file).
    """
    if isinstance(source, Config):
        return source
    if isinstance(source, Mapping):
        return from_dict(source)
    path = os.fspath(source)
    from . import pgbouncer_ini
    try:
        with open(path, encoding="utf-8") as f:
            # The mode of the file we read (not of a path that may change meanwhile).
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    if pgbouncer_ini.is_ini(path, text):
        translation = pgbouncer_ini.translate(path, text)
        raw, modes = translation.native, translation.modes
        try:
            config = from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if notes is not None:
            notes.extend(translation.notes)
    else:
        raw, modes = _parse_yaml(path, text), {path: mode}
        config = from_dict(raw)
    held = "auth_password" if config.auth_password is not None else next(
        (f"databases.{n}.password" for n, d in config.databases.items() if d.password is not None), None)
    for name, file_mode in modes.items():
        if held and file_mode & 0o077:
            raise ConfigError(f"{name}: holds {held} but mode {file_mode:04o} allows access by group or others; "
                              f"run 'chmod 600 {name}'")
    here = os.path.dirname(os.path.abspath(path))
    relative = {key: os.path.join(here, getattr(config, key)) for key in PATH_SETTINGS
                if getattr(config, key) and not os.path.isabs(getattr(config, key))
                and not (key == "server_tls_ca_file" and getattr(config, key) == SYSTEM_CA)}
    return dataclasses.replace(config, **relative) if relative else config


def _parse_yaml(path: str, text: str):
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return raw


#: What --print-config shows in place of a secret.
MASK = "********"

#: Config fields that live under ``listen:`` in a file.
_LISTEN_FIELDS = {"listen_host": "host", "listen_port": "port", "unix_socket_dir": "unix_socket_dir",
                  "unix_socket_mode": "unix_socket_mode", "unix_socket_group": "unix_socket_group"}


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    return value


def as_native(config: Config, mask: bool = True) -> dict:
    """The native (YAML) mapping of ``config``, every setting at its effective value (``--print-config``).

    ``from_dict`` of the result (unmasked) builds an equal Config.  With
    ``mask``, ``auth_password`` and the entries' ``password`` read MASK.
    """
    listen = {}
    for field, key in _LISTEN_FIELDS.items():
        value = getattr(config, field)
        if value is not None:
            listen[key] = f"{value:04o}" if field == "unix_socket_mode" else value
    out: dict = {"listen": listen}
    for field in dataclasses.fields(Config):
        name = field.name
        if name in _LISTEN_FIELDS or name in ("databases", "users"):
            continue
        value = getattr(config, name)
        if value is None:
            continue
        if name == "auth_password" and mask:
            value = MASK
        out[name] = _plain(value)
    databases = {}
    for name, db in config.databases.items():
        entry: dict = {}
        if len(db.nodes) == 1 and db.nodes[0].role is None and db.nodes[0].weight == 1:
            entry["host"], entry["port"] = db.nodes[0].host, db.nodes[0].port
        else:
            entry["nodes"] = [{"host": n.host, "port": n.port, **({"role": n.role} if n.role else {}),
                               "weight": n.weight} for n in db.nodes]
        for key in ("dbname", "pool_mode", "pool_size", "auth_type", "max_prepared_statements", "load_balance",
                    "target_session_attrs", "role", "min_pool_size", "reserve_pool_size", "max_db_connections",
                    "user", "password", "auth_user", "auth_query", "auth_dbname", "connect_query",
                    "max_db_client_connections"):
            value = getattr(db, key)
            if value is not None:
                entry[key] = MASK if key == "password" and mask else value
        if db.settings:
            entry["settings"] = dict(db.settings)
        databases[name] = entry
    out["databases"] = databases
    if config.users:
        out["users"] = {name: {key: getattr(u, key) for key in _USER if getattr(u, key) not in (None, 0)}
                        for name, u in config.users.items()}
    return out


def dump(config: Config, mask: bool = True) -> str:
    """``as_native`` as YAML text, keys in the order of conf/proxy.yaml's sections."""
    return yaml.safe_dump(as_native(config, mask), sort_keys=False, default_flow_style=False)
