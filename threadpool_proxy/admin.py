"""The admin console: the virtual database ``threadpool_proxy`` (alias ``pgbouncer``).

Users in ``admin_users`` may run every command, users in ``stats_users`` the
SHOW commands only.  They log in like any client, checked as the database
entry ``admin_auth_database`` (default ``*``) would check them: pass-through
logs in to that entry's server as the user (the connection is closed as soon
as PostgreSQL accepted the password), proxy-terminated auth uses the auth
file or auth_query.  The console never forwards anything to a server: it
answers each simple Query itself with RowDescription, DataRow,
CommandComplete and ReadyForQuery, as PgBouncer's console does, with
PgBouncer's column names where the concept is the same.

Three parts:

``Console``
    sans-I/O: takes one client message (type, body), returns the bytes to
    answer; parses the commands and builds the result sets from what
    ``control`` reports.  ``control`` is the proxy's
    ``console_control.ConsoleControl``: ``config``, ``observe()`` (a stats.Observation),
    and the actions ``pause``, ``resume``, ``reload``, ``kill``,
    ``reconnect``, ``shutdown``.
``ConsoleClient``
    one console connection: who may log in, the login, the welcome, and the
    loop that reads messages and sends the answers.
the result-set builders
    ``result_set``, ``row_description``, ``data_row``, ``command_complete``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import secrets
import socket
import time

from . import protocol as pq
from .config import CONSOLE_DATABASES, Config, DatabaseConfig, console_auth_entry, console_auth_type
from .errors import ClientFatal, ClientGone
from .login import LoginRequest
from .pool import pool_key
from .logs import get_logger

log = get_logger(__name__)

SQLSTATE_SYNTAX_ERROR = "42601"
SQLSTATE_INSUFFICIENT_PRIVILEGE = "42501"
SQLSTATE_INVALID_PARAMETER = "22023"

ADMIN, STATS = "admin", "stats"

TEXT_OID, INT8_OID = 25, 20

#: Longest message the console accepts (a Query); more is a protocol violation.
MAX_MESSAGE = 1 << 20

HELP = """\
SHOW HELP|POOLS|STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS|CLIENTS|SERVERS|SOCKETS|ACTIVE_SOCKETS|DATABASES|USERS
     |CONFIG|LISTS|STATE|VERSION|WORKERS|PEERS|PEER_POOLS|MEM|FDS|DNS_HOSTS|DNS_ZONES
     (PgBouncer's columns; what the proxy has no figure for is empty or 0)
PAUSE [db]         wait for running transactions, then hold new ones and close server connections
RESUME [db]        end a PAUSE
RECONNECT [db]     close server connections as they are released; new ones are opened as needed
KILL db            disconnect the database's clients and close its server connections
RELOAD             re-read the configuration file and the auth file
SET key = value    change a setting now (as RELOAD would), until the next RELOAD
DISABLE db         refuse new clients of the database
ENABLE db          end a DISABLE
SHUTDOWN           stop the proxy now (as SIGINT)
SHUTDOWN WAIT_FOR_SERVERS  stop once running transactions end, within shutdown_timeout (as SIGTERM)"""


def version_string() -> str:
    from . import __version__
    return f"threadpool_proxy {__version__}"


# -- result sets ----------------------------------------------------------------

def row_description(columns) -> bytes:
    """RowDescription for ``columns``: (name, "s" for text or "i" for int8)."""
    fields = []
    for name, kind in columns:
        oid, size = (INT8_OID, 8) if kind == "i" else (TEXT_OID, -1)
        fields.append(name.encode("utf-8") + b"\0" + pq.INT32.pack(0) + pq.INT16.pack(0)
                      + pq.INT32.pack(oid) + pq.INT16.pack(size) + pq.INT32.pack(-1) + pq.INT16.pack(0))
    return pq.message(pq.ROW_DESCRIPTION, pq.INT16.pack(len(columns)) + b"".join(fields))


def data_row(values) -> bytes:
    parts = [pq.INT16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(pq.INT32.pack(-1))
        else:
            data = str(value).encode("utf-8")
            parts.append(pq.INT32.pack(len(data)) + data)
    return pq.message(pq.DATA_ROW, b"".join(parts))


def command_complete(tag: str) -> bytes:
    return pq.message(pq.COMMAND_COMPLETE, tag.encode("utf-8") + b"\0")


def result_set(columns, rows, tag: str = "SHOW") -> bytes:
    return row_description(columns) + b"".join(data_row(r) for r in rows) + command_complete(tag)


def notice(text: str, detail: str | None = None) -> bytes:
    fields = [b"SNOTICE\0", b"VNOTICE\0", b"C00000\0", b"M" + text.encode() + b"\0"]
    if detail:
        fields.append(b"D" + detail.encode() + b"\0")
    return pq.message(pq.NOTICE_RESPONSE, b"".join(fields) + b"\0")


class CommandError(Exception):
    """A console command failed: answered with an ErrorResponse (severity ERROR), the client stays."""

    def __init__(self, sqlstate: str, text: str, hint: str | None = None) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.hint = hint


def timestamp(wall: float) -> str | None:
    """Wall-clock seconds as PgBouncer shows them ('2024-05-01 10:00:00 UTC'); None for 0."""
    if not wall:
        return None
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))


def _us(seconds: float) -> int:
    return int(seconds * 1e6)


# -- the console, sans I/O ------------------------------------------------------

class Console:
    """One console connection's protocol state: messages in, answers out.

    ``handle(type, body)`` returns the bytes to send (possibly empty);
    ``closed`` is set by Terminate.  The extended query protocol is refused
    with one error per Sync, as PgBouncer's console refuses it.  BEGIN,
    COMMIT and ROLLBACK are accepted and do nothing (psycopg sends BEGIN
    before the first query of a non-autocommit connection).
    """

    def __init__(self, control, user: str, role: str, local: bool = False) -> None:
        self.control = control
        self.user = user
        self.role = role
        self.local = local             # this process's rows only (a peer worker asking for them)
        self.closed = False
        self.after: list = []          # callables to run once the answers so far are sent (SHUTDOWN)
        self.in_transaction = False
        self._extended_failed = False

    def status(self) -> bytes:
        return pq.IN_TRANSACTION if self.in_transaction else pq.IDLE

    def handle(self, t: bytes, body: bytes) -> bytes:
        if t == pq.QUERY:
            return self.query(body.rstrip(b"\0").decode("utf-8", "replace")) + pq.ready_for_query(self.status())
        if t == pq.TERMINATE:
            self.closed = True
            return b""
        if t == pq.SYNC:
            self._extended_failed = False
            return pq.ready_for_query(self.status())
        if t == pq.FLUSH:
            return b""
        if t in (pq.PARSE, pq.BIND, pq.DESCRIBE, pq.EXECUTE, pq.CLOSE, pq.FUNCTION_CALL):
            if self._extended_failed:
                return b""          # skipped until Sync, as after any error
            self._extended_failed = t != pq.FUNCTION_CALL
            answer = pq.error_response(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                                       "the admin console supports only the simple query protocol",
                                       pq.ERROR, hint="Send the command as a simple Query (psql does; with "
                                       "psycopg, execute it without parameters).")
            return answer + (pq.ready_for_query(self.status()) if t == pq.FUNCTION_CALL else b"")
        raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION, f"invalid message type {t!r} on the admin console")

    def query(self, sql: str) -> bytes:
        """The answer to one simple Query (without its ReadyForQuery); stops at the first error."""
        statements = [s.strip() for s in _split_statements(sql)]
        statements = [s for s in statements if s]
        if not statements:
            return pq.message(pq.EMPTY_QUERY_RESPONSE)
        out = []
        for statement in statements:
            try:
                out.append(self.run(statement))
            except CommandError as exc:
                out.append(pq.error_response(exc.sqlstate, str(exc), pq.ERROR, hint=exc.hint))
                break
        return b"".join(out)

    def run(self, statement: str) -> bytes:
        words = statement.split()
        verb = words[0].upper()
        args = words[1:]
        if verb in ("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT"):
            self.in_transaction = verb in ("BEGIN", "START")
            return command_complete("BEGIN" if self.in_transaction else
                                    "ROLLBACK" if verb in ("ROLLBACK", "ABORT") else "COMMIT")
        if verb == "SHOW":
            if len(args) != 1:
                raise CommandError(SQLSTATE_SYNTAX_ERROR, f"syntax error: SHOW takes one word: {statement!r}",
                                   hint="Try SHOW HELP.")
            what = args[0].upper()
            show = getattr(self, "show_" + what.lower(), None)
            if show is None or not what.replace("_", "").isalpha():
                raise CommandError(SQLSTATE_SYNTAX_ERROR, f"unknown SHOW item: {args[0]!r}", hint="Try SHOW HELP.")
            return show()
        if verb == "SET":
            return self._set(statement)
        action = _ACTIONS.get(verb)
        if action is None:
            raise CommandError(SQLSTATE_SYNTAX_ERROR, f"unknown admin console command: {statement!r}",
                               hint="Try SHOW HELP.")
        if self.role != ADMIN:
            raise CommandError(SQLSTATE_INSUFFICIENT_PRIVILEGE,
                               f'permission denied: {verb} needs an admin user; "{self.user}" is in stats_users',
                               hint="Add the user to admin_users.")
        takes, needs = action
        if verb == "SHUTDOWN" and args:
            if len(args) != 1 or args[0].upper() != "WAIT_FOR_SERVERS":
                raise CommandError(SQLSTATE_SYNTAX_ERROR, "syntax error: usage: SHUTDOWN [WAIT_FOR_SERVERS]",
                                   hint="WAIT_FOR_CLIENTS is not supported.")
            log.info("admin console: %s runs SHUTDOWN WAIT_FOR_SERVERS", self.user)
            self.after.append(self.control.shutdown("WAIT_FOR_SERVERS"))
            return command_complete("SHUTDOWN")
        if len(args) > (1 if takes else 0) or (needs and not args):
            usage = f"{verb} db" if needs else f"{verb} [db]" if takes else verb
            raise CommandError(SQLSTATE_SYNTAX_ERROR, f"syntax error: usage: {usage}")
        database = _identifier(args[0]) if args else None
        if verb in ("DISABLE", "ENABLE") and self.control.config.lookup_database(database) is not None:
            pass            # any name an entry serves ("*" too), used by a client yet or not
        elif database is not None and database not in self.control.database_names():
            raise CommandError(pq.SQLSTATE_INVALID_CATALOG_NAME, f'database "{database}" does not exist',
                               hint="Name an entry of databases, or a database some client is using.")
        log.info("admin console: %s runs %s", self.user, " ".join([verb] + args))
        try:
            after = getattr(self.control, verb.lower())(*([database] if takes else []))
        except CommandError:
            raise
        except Exception as exc:   # e.g. RELOAD of a bad file: the old configuration stays
            raise CommandError(pq.SQLSTATE_INTERNAL_ERROR if not isinstance(exc, ValueError)
                               else SQLSTATE_INVALID_PARAMETER, f"{verb} failed: {exc}") from None
        if callable(after):
            self.after.append(after)
        return command_complete(verb)

    def _set(self, statement: str) -> bytes:
        """SET key = value (or TO value): change a setting as RELOAD would, until the next RELOAD."""
        if self.role != ADMIN:
            raise CommandError(SQLSTATE_INSUFFICIENT_PRIVILEGE,
                               f'permission denied: SET needs an admin user; "{self.user}" is in stats_users',
                               hint="Add the user to admin_users.")
        match = _SET.fullmatch(statement)
        if match is None:
            raise CommandError(SQLSTATE_SYNTAX_ERROR, "syntax error: usage: SET key = value",
                               hint="Quote values with spaces: SET reset_query = 'DISCARD ALL'")
        key, text = match.group(1).lower(), match.group(2).strip()
        if len(text) >= 2 and text[0] == text[-1] == "'":
            text = text[1:-1].replace("''", "'")
        log.info("admin console: %s runs SET %s", self.user, key)
        try:
            self.control.set(key, text)
        except CommandError:
            raise
        except ValueError as exc:          # ConfigError: unknown key, restart only, bad value
            raise CommandError(SQLSTATE_INVALID_PARAMETER, f"SET failed: {exc}",
                               hint="SHOW CONFIG lists the settings and whether each is changeable.") from None
        return command_complete("SET")

    # -- SHOW --------------------------------------------------------------------

    def show_help(self) -> bytes:
        return notice("Console usage", HELP) + command_complete("SHOW")

    def show_version(self) -> bytes:
        return result_set([("version", "s")], [[version_string()]])

    def show_state(self) -> bytes:
        paused = self.control.paused_databases()
        return result_set([("key", "s"), ("value", "s")],
                          [["active", "no" if paused is ALL else "yes"],
                           ["paused", "yes" if paused is ALL else ",".join(sorted(paused)) or "no"],
                           ["suspended", "no"]])

    # Each SHOW of figures is built from ``rows_<what>()`` (this process's rows);
    # with worker processes the console's worker asks the others for theirs over
    # the peer channel and merges them (MERGES), so the console shows the whole proxy.

    def gathered(self, what: str) -> tuple[list, list]:
        """(columns, rows) of ``SHOW what`` for the whole proxy: every worker's rows, merged."""
        columns, rows = getattr(self, "rows_" + what)()
        peers = self.control.peer_rows(what) if not self.local else []
        if peers:
            rows = MERGES[what](columns, [rows] + peers)
        return columns, rows

    def _show(self, what: str) -> bytes:
        return result_set(*self.gathered(what))

    def rows_pools(self):
        config: Config = self.control.config
        rows = []
        for p in self.control.observe().pools():
            entry = config.lookup_database(p.database)
            balance = entry.load_balance if entry is not None and entry.multi else None
            rows.append([p.database, p.user, p.cl_active, p.cl_waiting, 0, 0, p.sv_active, 0, 0, p.sv_idle, 0, 0,
                         p.sv_login, int(p.maxwait), int((p.maxwait % 1) * 1e6), p.pool_mode, balance])
        return POOL_COLUMNS, rows

    def show_pools(self) -> bytes:
        return self._show("pools")

    def rows_stats(self):
        obs = self.control.observe()
        columns = ([("database", "s")] + [("total_" + name, "i") for name in STATS_TOTAL_NAMES]
                   + [("avg_" + name, "i") for name in STATS_AVERAGE_NAMES])
        rows = []
        for database, values in sorted(obs.database_totals.items()):
            avg = obs.averages(database)
            rows.append([database] + [_us(values[n]) if n.endswith("_time") else values.get(n, 0)
                                      for n in STATS_TOTAL_NAMES]
                        + [avg.get(n, 0) for n in STATS_AVERAGE_NAMES])
        return columns, rows

    def _stats_rows(self, totals: bool, averages: bool) -> bytes:
        columns, rows = self.gathered("stats")
        keep = [i for i, (name, _) in enumerate(columns)
                if i == 0 or (totals and name.startswith("total_")) or (averages and name.startswith("avg_"))]
        return result_set([columns[i] for i in keep], [[row[i] for i in keep] for row in rows])

    def show_stats(self) -> bytes:
        return self._stats_rows(True, True)

    def show_stats_totals(self) -> bytes:
        return self._stats_rows(True, False)

    def show_stats_averages(self) -> bytes:
        return self._stats_rows(False, True)

    def show_totals(self) -> bytes:
        """SHOW STATS summed over every database, one (name, value) row per figure, as PgBouncer."""
        columns, rows = self.gathered("stats")
        merged = _merge_stats(columns, [[["*"] + list(r[1:])] for r in rows]) if rows else []
        values = merged[0] if merged else [None] + [0] * (len(columns) - 1)
        return result_set([("name", "s"), ("value", "i")],
                          [[name, values[i]] for i, (name, _) in enumerate(columns) if i > 0])

    def _ptr(self, ptr):
        """Connection pointers and ids, told apart between worker processes: ``<worker>:<ptr>``."""
        worker = self.control.worker
        return ptr if ptr is None or worker is None else f"{worker.index}:{ptr}"

    def _id(self, ident: int) -> int:
        worker = self.control.worker
        return ident if worker is None else ident * worker.count + worker.index

    def rows_clients(self):
        obs = self.control.observe()
        now = time.monotonic()
        rows = []
        for c in obs.clients:
            wait = now - c.stats.wait_since if c.waiting else 0.0
            rows.append(["C", c.stats.user, c.stats.database, c.replication, c.state, c.addr, c.port,
                         c.local_addr, c.local_port, timestamp(c.stats.connect_time),
                         timestamp(c.stats.request_time or c.stats.connect_time),
                         int(wait), int((wait % 1) * 1e6), 0, self._ptr(c.ptr),
                         self._ptr(c.server.ptr if c.server else None),
                         None, c.tls, c.application_name, c.prepared, self._id(c.id), c.pinned])
        return CLIENT_COLUMNS, rows

    def show_clients(self) -> bytes:
        return self._show("clients")

    def rows_servers(self):
        obs = self.control.observe()
        rows = []
        for s in obs.servers:
            client = s.client
            rows.append(["S", s.user, s.database, s.replication, s.state, s.addr, s.port, s.local_addr, s.local_port,
                         timestamp(s.connect_time),
                         timestamp(client.stats.request_time if client else s.idle_since or s.connect_time),
                         0, 0, int(s.close_needed), self._ptr(s.ptr), self._ptr(client.ptr if client else None),
                         s.remote_pid, s.tls, client.application_name if client else "", s.prepared, self._id(s.id),
                         f"{s.addr}:{s.port}", self.control.node_state(f"{s.addr}:{s.port}")])
        return SERVER_COLUMNS, rows

    def show_servers(self) -> bytes:
        return self._show("servers")

    def _sockets(self, active_only: bool) -> bytes:
        width = len(CONNECTION_COLUMNS)
        rows = [list(r[:width]) + [0] * 7 for what in ("clients", "servers") for r in self.gathered(what)[1]
                if not active_only or r[4] == "active"]
        return result_set(SOCKET_COLUMNS, rows)

    def show_sockets(self) -> bytes:
        return self._sockets(False)

    def show_active_sockets(self) -> bytes:
        return self._sockets(True)

    def show_users(self) -> bytes:
        """One row per user with ``users`` settings or a connection: its limits, then what it uses now."""
        config: Config = self.control.config
        servers = collections.Counter(r[1] for r in self.gathered("servers")[1])
        clients = collections.Counter(r[1] for r in self.gathered("clients")[1])
        rows = []
        for name in sorted(set(config.users) | set(servers) | set(clients)):
            u = config.users.get(name)

            def text(value):
                return "" if value is None else str(value)
            rows.append([name, text(u and u.pool_size), text(u and u.reserve_pool_size), u and u.pool_mode,
                         (u and u.max_user_connections) or config.max_user_connections, servers[name],
                         config.user_client_limit(name), clients[name]])
        return result_set(USER_COLUMNS, rows)

    def show_peers(self) -> bytes:
        """PgBouncer's peering has no place here (workers: SHOW WORKERS): its columns, no rows."""
        return result_set([("peer_id", "i"), ("host", "s"), ("port", "i"), ("pool_size", "i")], [])

    def show_peer_pools(self) -> bytes:
        return result_set([("peer_id", "i"), ("cl_active_cancel_req", "i"), ("cl_waiting_cancel_req", "i"),
                           ("sv_active_cancel", "i"), ("sv_login", "i")], [])

    def show_mem(self) -> bytes:
        """PgBouncer's slab caches; Python keeps none the console could show: its columns, no rows."""
        return result_set([("name", "s"), ("size", "i"), ("used", "i"), ("free", "i"), ("memtotal", "i")], [])

    def show_fds(self) -> bytes:
        """For PgBouncer's online restart, which the proxy has not: its columns, no rows (admins only, as there)."""
        if self.role != ADMIN:
            raise CommandError(SQLSTATE_INSUFFICIENT_PRIVILEGE,
                               f'permission denied: SHOW FDS needs an admin user; "{self.user}" is in stats_users')
        return result_set([("fd", "i"), ("task", "s"), ("user", "s"), ("database", "s"), ("addr", "s"),
                           ("port", "i"), ("cancel", "i"), ("link", "i"), ("client_encoding", "s"),
                           ("std_strings", "s"), ("datestyle", "s"), ("timezone", "s"), ("password", "s"),
                           ("scram_client_key", "s"), ("scram_server_key", "s")], [])

    def show_dns_hosts(self) -> bytes:
        """Names are resolved at each connect by the system: no cache to show."""
        return result_set([("hostname", "s"), ("ttl", "i"), ("addrs", "s")], [])

    def show_dns_zones(self) -> bytes:
        return result_set([("zonename", "s"), ("serial", "i"), ("count", "i")], [])

    def rows_databases(self):
        obs = self.control.observe()
        config: Config = self.control.config
        paused = self.control.paused_databases()
        disabled = self.control.disabled_databases()
        rows = []
        for name, db in config.databases.items():
            nodes = ", ".join(f"{n.name} {self.control.node_state(n.name)}" + (f" role={n.role}" if n.role else "")
                              + (f" weight={n.weight}" if n.weight != 1 else "") for n in db.nodes)
            rows.append([name, db.host, db.port, db.dbname if db.dbname else (None if name == "*" else name),
                         db.user, db.pool_size, db.min_pool_size, db.reserve_pool_size, int(config.server_lifetime),
                         db.pool_mode,
                         db.load_balance if db.multi else None, db.max_db_connections,
                         obs.server_count(name), db.max_db_client_connections, obs.client_count(name), int(paused is ALL or name in paused),
                         int(name in disabled),
                         nodes, db.target_session_attrs, db.role])
        rows.append([CONSOLE_DATABASES[0], None, self.control.listen_port, CONSOLE_DATABASES[0], None, 0, 0, 0, 0,
                     "statement", None, 0, 0, 0, obs.console_clients, 0, 0, None, None, None])
        return DATABASE_COLUMNS, rows

    def show_databases(self) -> bytes:
        return self._show("databases")

    def show_config(self) -> bytes:
        config: Config = self.control.config
        defaults = Config()
        changeable = self.control.changeable_settings()
        rows = []
        for field in dataclasses.fields(Config):
            if field.name in ("databases", "users"):
                continue
            key = {"listen_host": "listen.host", "listen_port": "listen.port"}.get(field.name, field.name)
            value, default = getattr(config, field.name), getattr(defaults, field.name)
            if field.name == "auth_password" and value is not None:
                value = "********"
            rows.append([key, _setting_text(value), _setting_text(default),
                         "yes" if field.name in changeable else "no"])
        return result_set([("key", "s"), ("value", "s"), ("default", "s"), ("changeable", "s")], rows)

    def rows_lists(self):
        obs = self.control.observe()
        config: Config = self.control.config
        pools = obs.pool_names()
        rows = [["databases", len(config.databases)],
                ["users", len({user for _, user in pools})],
                ["peers", 0],
                ["pools", len(pools)],
                ["peer_pools", 0],
                ["free_clients", 0],
                ["used_clients", len(obs.clients) + obs.console_clients],
                ["login_clients", obs.login_clients],
                ["free_servers", 0],
                ["used_servers", obs.open_servers],
                ["dns_names", 0], ["dns_zones", 0], ["dns_queries", 0], ["dns_pending", 0]]
        return [("list", "s"), ("items", "i")], rows

    def show_lists(self) -> bytes:
        columns, rows = self.gathered("lists")
        if self.control.worker is not None and not self.local:     # pools and users of all workers, once each
            pools = {(r[0], r[1]) for r in self.gathered("pools")[1]}
            counts = {"users": len({user for _, user in pools}), "pools": len(pools)}
            rows = [[name, counts.get(name, n)] for name, n in rows]
        return result_set(columns, rows)

    def rows_workers(self):
        """One row per worker process (a threadpool_proxy command; one row without workers)."""
        obs = self.control.observe()
        worker = self.control.worker
        cancels = self.control.cancel_counts()
        return WORKER_COLUMNS, [[worker.index if worker else 0, os.getpid(),
                                 len(obs.clients) + obs.login_clients, obs.console_clients, obs.open_servers,
                                 sum(v["xact_count"] for v in obs.database_totals.values()),
                                 cancels.get("received", 0), cancels.get("forwarded", 0),
                                 cancels.get("to_peers", 0), cancels.get("from_peers", 0)]]

    def show_workers(self) -> bytes:
        return self._show("workers")


def _merge_keyed(columns, row_lists, key: int, combine) -> list:
    """Rows with the same first ``key`` values joined into one by ``combine(columns, rows)``, in first-seen order."""
    groups: dict = {}
    for rows in row_lists:
        for row in rows:
            groups.setdefault(tuple(row[:key]), []).append(row)
    return [combine(columns, rows) for rows in groups.values()]


def _sum_ints(columns, rows, skip=()) -> list:
    """The first row, with every integer column (not in ``skip``) replaced by the rows' sum."""
    out = list(rows[0])
    for i, (name, kind) in enumerate(columns):
        if kind == "i" and name not in skip:
            out[i] = sum(r[i] or 0 for r in rows)
    return out


def _merge_pools(columns, row_lists):
    def combine(columns, rows):
        out = _sum_ints(columns, rows, skip=("maxwait", "maxwait_us"))
        longest = max(rows, key=lambda r: (r[13], r[14]))          # the oldest waiter of any worker
        out[13], out[14] = longest[13], longest[14]
        return out
    return sorted(_merge_keyed(columns, row_lists, 2, combine))


#: avg_* columns that are times per something: averaged weighted by that something's rate.
_WEIGHTED = {"avg_xact_time": "avg_xact_count", "avg_query_time": "avg_query_count",
             "avg_wait_time": "avg_server_assignment_count"}


def _merge_stats(columns, row_lists):
    names = [name for name, _ in columns]

    def combine(columns, rows):
        out = _sum_ints(columns, rows, skip=tuple(_WEIGHTED))
        for name, weight in _WEIGHTED.items():
            i, w = names.index(name), names.index(weight)
            total = sum(r[w] for r in rows)
            out[i] = int(sum(r[i] * r[w] for r in rows) / total) if total else 0
        return out
    return sorted(_merge_keyed(columns, row_lists, 1, combine))


def _merge_databases(columns, row_lists):
    def combine(columns, rows):
        out = list(rows[0])
        for name in ("current_connections", "current_client_connections"):
            i = columns.index((name, "i"))
            out[i] = sum(r[i] for r in rows)
        i = columns.index(("paused", "i"))
        out[i] = max(r[i] for r in rows)
        return out
    return _merge_keyed(columns, row_lists, 1, combine)


def _merge_lists(columns, row_lists):
    return _merge_keyed(columns, row_lists, 1, lambda columns, rows: [rows[0][0]] + (
        [rows[0][1]] if rows[0][0] == "databases" else [sum(r[1] for r in rows)]))


#: How SHOW's rows of several workers become the whole proxy's (see Console.gathered).
MERGES = {
    "pools": _merge_pools,
    "stats": _merge_stats,
    "clients": lambda columns, row_lists: [row for rows in row_lists for row in rows],
    "servers": lambda columns, row_lists: [row for rows in row_lists for row in rows],
    "databases": _merge_databases,
    "lists": _merge_lists,
    "workers": lambda columns, row_lists: sorted(row for rows in row_lists for row in rows),
}


#: PAUSE, RESUME... -> (takes a database name, requires one)
_ACTIONS = {
    "PAUSE": (True, False),
    "RESUME": (True, False),
    "RECONNECT": (True, False),
    "KILL": (True, True),
    "RELOAD": (False, False),
    "SHUTDOWN": (False, False),
    "DISABLE": (True, True),
    "ENABLE": (True, True),
}

#: SET key = value, or SET key TO value.
_SET = re.compile(r"SET\s+([A-Za-z_][A-Za-z0-9_]*)\s*(?:=|\s[Tt][Oo]\s)\s*(.*)", re.S | re.I)


def _split_statements(sql: str) -> list:
    """``sql`` cut at the semicolons outside single quotes (a quoted SET value may hold one)."""
    out, start, quoted = [], 0, False
    for i, ch in enumerate(sql):
        if ch == "'":
            quoted = not quoted
        elif ch == ";" and not quoted:
            out.append(sql[start:i])
            start = i + 1
    out.append(sql[start:])
    return out

#: ``paused_databases()`` returns this when the whole proxy is paused.
ALL = frozenset(("*all*",))

POOL_COLUMNS = [("database", "s"), ("user", "s"), ("cl_active", "i"), ("cl_waiting", "i"),
                ("cl_active_cancel_req", "i"), ("cl_waiting_cancel_req", "i"), ("sv_active", "i"),
                ("sv_active_cancel", "i"), ("sv_being_canceled", "i"), ("sv_idle", "i"), ("sv_used", "i"),
                ("sv_tested", "i"), ("sv_login", "i"), ("maxwait", "i"), ("maxwait_us", "i"), ("pool_mode", "s"),
                ("load_balance_hosts", "s")]

USER_COLUMNS = [("name", "s"), ("pool_size", "s"), ("reserve_pool_size", "s"), ("pool_mode", "s"),
                ("max_user_connections", "i"), ("current_connections", "i"),
                ("max_user_client_connections", "i"), ("current_client_connections", "i")]

#: SHOW SOCKETS: the connection columns, then PgBouncer's buffer positions (0 here: the relay keeps none).


STATS_TOTAL_NAMES = ("xact_count", "query_count", "server_assignment_count", "received", "sent",
                     "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count",
                     "bind_count", "client_login_count")
STATS_AVERAGE_NAMES = ("xact_count", "query_count", "server_assignment_count", "recv", "sent",
                       "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count",
                       "bind_count", "client_login_count")

CONNECTION_COLUMNS = [("type", "s"), ("user", "s"), ("database", "s"), ("replication", "s"), ("state", "s"),
                      ("addr", "s"), ("port", "i"), ("local_addr", "s"), ("local_port", "i"),
                      ("connect_time", "s"), ("request_time", "s"), ("wait", "i"), ("wait_us", "i"),
                      ("close_needed", "i"), ("ptr", "s"), ("link", "s"), ("remote_pid", "i"), ("tls", "s"),
                      ("application_name", "s"), ("prepared_statements", "i"), ("id", "i")]

WORKER_COLUMNS = [("worker", "i"), ("pid", "i"), ("clients", "i"), ("console_clients", "i"),
                  ("servers", "i"), ("total_xact_count", "i"), ("cancel_requests", "i"),
                  ("cancels_forwarded", "i"), ("cancels_to_peers", "i"), ("cancels_from_peers", "i")]

DATABASE_COLUMNS = [("name", "s"), ("host", "s"), ("port", "i"), ("database", "s"), ("force_user", "s"),
                    ("pool_size", "i"), ("min_pool_size", "i"), ("reserve_pool_size", "i"),
                    ("server_lifetime", "i"), ("pool_mode", "s"), ("load_balance_hosts", "s"),
                    ("max_connections", "i"), ("current_connections", "i"), ("max_client_connections", "i"),
                    ("current_client_connections", "i"), ("paused", "i"), ("disabled", "i"),
                    ("nodes", "s"), ("target_session_attrs", "s"), ("role", "s")]

#: SHOW SOCKETS: the connection columns, then PgBouncer's buffer positions (0 here: the relay keeps none).
SOCKET_COLUMNS = CONNECTION_COLUMNS + [(name, "i") for name in ("recv_pos", "pkt_pos", "pkt_remain", "send_pos",
                                                                "send_remain", "pkt_avail", "send_avail")]

#: SHOW CLIENTS: PgBouncer's columns, then what pins the client to its server connection
#: (transaction and statement mode: "temp_table,advisory_lock"...; "" when nothing does).
CLIENT_COLUMNS = CONNECTION_COLUMNS + [("pinned", "s")]

#: SHOW SERVERS: PgBouncer's columns, then the server's node (host:port) and what the proxy
#: knows of it ("up primary", "down unknown"...: ConsoleControl.node_state).
SERVER_COLUMNS = CONNECTION_COLUMNS + [("node", "s"), ("node_state", "s")]


def _identifier(word: str) -> str:
    """A database name as typed: "Quoted" keeps its case, bare words too (names are case-sensitive here)."""
    if len(word) >= 2 and word[0] == word[-1] == '"':
        return word[1:-1].replace('""', '"')
    return word


def _setting_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# -- one console connection (I/O) ------------------------------------------------

def console_role(config: Config, user: str) -> str | None:
    if user in config.admin_users:
        return ADMIN
    if user in config.stats_users:
        return STATS
    return None


class ConsoleClient:
    """A client of the admin console: role check, login, welcome, and the command loop."""

    def __init__(self, server, user: str, database: str, address, settings: dict) -> None:
        config: Config = server.config
        # Asked only once the user is authenticated (``login``): before that, a user who may
        # not use the console goes through the same exchange as one who may, so the answer
        # does not tell who the admins are.
        self.role = console_role(config, user)
        if not (config.admin_users or config.stats_users):
            self._refuse(user)         # nobody may: that tells nothing about anybody
        self.server = server
        self.settings = settings
        entry = console_auth_entry(config)
        if entry is None:      # proxy-terminated auth with no entry to copy (checked by config.py)
            entry = DatabaseConfig(name="*", host="", port=0, dbname=None, pool_mode="statement",
                                   pool_size=1, auth_type=config.auth_type)
        # The console's own method: trust only when admin_auth_type says so.
        entry = dataclasses.replace(entry, auth_type=console_auth_type(config))
        dbname = entry.dbname or (entry.name if entry.name != "*" else "postgres")
        # auth_query runs there, pass-through logs in there: on one server (the first up, of several).
        router = getattr(server, "router", None)
        up = router.candidates(entry) if router is not None and entry.multi else ()
        node = up[0] if up else entry.nodes[0]
        entry = dataclasses.replace(entry, dbname=dbname, host=node.host, port=node.port, nodes=(node,),
                                    role=None, target_session_attrs="any")
        self.request = LoginRequest(user=user, database=database, db=entry,
                                    key=pool_key(entry.node, user, dbname) + "\0console", address=address)

    def login(self, channel) -> None:
        """Check the password as ``admin_auth_database`` would; AuthenticationOk has been sent after this."""
        request, logins = self.request, self.server.logins
        if request.db.auth_type == "passthrough":
            startup = {"user": request.user, "database": request.db.dbname,
                       "application_name": "threadpool_proxy admin console login"}
            conn = logins.passthrough_login(channel, request, startup)
            self.server.pool.discard(request.key, conn, "it only checked an admin console password")
        else:
            logins.authenticate(channel, request)
        if self.role is None:
            self.server.junk_log.log("refused console users", "client %s: user refused on the admin console",
                                     request.who)
            self._refuse(request.user)

    @staticmethod
    def _refuse(user: str):
        raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION, f'user "{user}" may not use the admin console',
                          hint="The admin console admits users listed in admin_users or stats_users.")

    def welcome(self) -> bytes:
        from . import __version__
        params = {"server_version": f"{__version__}/threadpool_proxy", "server_encoding": "UTF8",
                  "client_encoding": "UTF8", "DateStyle": "ISO", "IntervalStyle": "postgres",
                  "TimeZone": "UTC", "integer_datetimes": "on", "standard_conforming_strings": "on",
                  "is_superuser": "off", "application_name": self.settings.get("application_name", "")}
        out = [pq.parameter_status(k, v) for k, v in params.items()]
        out.append(pq.backend_key_data(secrets.randbelow(2**31 - 1) + 1, secrets.token_bytes(4)))
        out.append(pq.ready_for_query(pq.IDLE))
        return b"".join(out)

    def run(self, channel, sock: socket.socket) -> None:
        """Log in and answer commands until the client leaves (ClientGone) or the proxy stops."""
        self.login(channel)
        channel.ready_for_relay()
        console = Console(self.server.console_control, self.request.user, self.role)
        log.info("client %s logged in to the admin console (%s)", self.request.who, self.role)
        channel.send(self.welcome())
        buf = bytearray()
        while not console.closed:
            while True:
                if len(buf) >= 5:
                    length = pq.UINT32.unpack_from(buf, 1)[0]
                    if length < 4 or length > MAX_MESSAGE:
                        raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION, f"invalid message length {length}")
                    if len(buf) > length:
                        break
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    raise ClientGone()
                buf += chunk
            t, body = bytes(buf[:1]), bytes(buf[5:length + 1])
            del buf[:length + 1]
            answer = console.handle(t, body)
            if answer:
                channel.send(answer)
            while console.after:
                console.after.pop(0)()
        raise ClientGone()
