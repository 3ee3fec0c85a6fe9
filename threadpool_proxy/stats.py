"""Statistics: per-client counters on the hot path, totals and averages on read.

Each client session owns a ``ClientStats``; only its own thread writes it
(the relay adds bytes and requests per chunk, the checkout its wait per
server assignment), so counting takes no lock at all.  Readers (the admin
console, the metrics endpoint) add up the live sessions' counters and the
totals of the clients that already left, which ``StatsRegistry.retire`` keeps
per pool, once per client, under its lock.  A reader may see a counter a few
chunks old; it never sees a total go down.

Pools are named as PgBouncer names them: (database, user), the database being
the name the client asked for.  Times are kept in seconds (floats) and shown
in microseconds, as PgBouncer shows them.  The ``avg_*`` figures of SHOW STATS
are the change over the last ``stats_period`` (``StatsRegistry.tick``, called
by the janitor) divided by its length, or per transaction/query/assignment.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time

#: The counters a ClientStats adds up, in SHOW STATS order (PgBouncer's names after "total_").
COUNTERS = ("xact_count", "query_count", "server_assignment_count", "received", "sent",
            "xact_time", "query_time", "wait_time", "client_login_count")

#: Counters that are durations (seconds here, microseconds when shown).
TIMES = frozenset(("xact_time", "query_time", "wait_time"))


_CLIENT_IDS = itertools.count(1)


class ClientStats:
    """One client's counters and what it is doing now; written by its own thread only.

    ``query_start``, ``xact_start`` and ``wait_since`` are ``time.monotonic()``
    values, 0 when no query runs, no transaction is open, nothing is awaited.
    """

    __slots__ = ("id", "database", "user", "key", "connect_time", "request_time", *COUNTERS,
                 "query_start", "xact_start", "wait_since")

    def __init__(self, database: str = "", user: str = "", key: str = "") -> None:
        self.id = next(_CLIENT_IDS)
        self.database = database
        self.user = user
        self.key = key
        self.connect_time = time.time()
        self.request_time = 0.0            # wall clock of the latest request (0: none yet)
        for name in COUNTERS:
            setattr(self, name, 0)
        self.query_start = 0.0
        self.xact_start = 0.0
        self.wait_since = 0.0

    @property
    def pool(self) -> tuple[str, str]:
        return (self.database, self.user)

    def values(self) -> dict:
        return {name: getattr(self, name) for name in COUNTERS}

    # -- the relay's hooks (one client thread) ----------------------------------

    def requests_sent(self, n: int, was_idle: bool) -> None:
        """``n`` requests (Query, Sync, FunctionCall) went to the server; ``was_idle``: none was pending."""
        self.query_count += n
        if was_idle:
            now = time.monotonic()
            self.query_start = now
            self.request_time = time.time()
            if not self.xact_start:
                self.xact_start = now

    def answered(self, xacts: int, in_transaction: bool) -> None:
        """Every pending request was answered; ``xacts`` transactions ended since the last call."""
        now = time.monotonic()
        if self.query_start:
            self.query_time += now - self.query_start
            self.query_start = 0.0
        self.xact_count += xacts
        if not in_transaction and self.xact_start:
            self.xact_time += now - self.xact_start
            self.xact_start = 0.0

    # -- the checkout's hooks ----------------------------------------------------

    def waiting(self) -> None:
        self.wait_since = time.monotonic()

    def assigned(self, ok: bool) -> None:
        """The wait for a server connection ended: with one (``ok``), or with an error."""
        if self.wait_since:
            if ok:
                self.wait_time += time.monotonic() - self.wait_since
                self.server_assignment_count += 1
            self.wait_since = 0.0


def _zero() -> dict:
    return dict.fromkeys(COUNTERS, 0)


def add_into(total: dict, values: dict) -> dict:
    for name in COUNTERS:
        total[name] += values[name]
    return total


class StatsRegistry:
    """Totals per pool (database, user): those of clients that left, plus the live ones on read."""

    def __init__(self, period: float = 60.0) -> None:
        self.period = period
        self._lock = threading.Lock()
        self._retired: dict[tuple[str, str], dict] = {}
        self._last: tuple[float, dict] = (time.monotonic(), {})   # (when, totals per database) at the last tick
        self._averages: dict[str, dict] = {}              # database -> avg_* values
        self._pool_of_key: dict[str, tuple[str, str]] = {}  # pool key -> the (database, user) that used it last

    def note_key(self, key: str, pool: tuple[str, str]) -> None:
        """A client of ``pool`` logged in with server connections of ``key`` (SHOW SERVERS names them so)."""
        self._pool_of_key[key] = pool

    def pool_of_key(self, key: str) -> tuple[str, str]:
        pool = self._pool_of_key.get(key)
        if pool is None:
            parts = key.split("\0")           # node, user, database[, what it is for]
            pool = (parts[2] if len(parts) > 2 else key, parts[1] if len(parts) > 1 else "")
        return pool

    def retire(self, stats: ClientStats) -> None:
        """A client left: keep its counters in its pool's total."""
        with self._lock:
            total = self._retired.get(stats.pool)
            if total is None:
                total = self._retired[stats.pool] = _zero()
            add_into(total, stats.values())

    def pool_totals(self, live) -> dict[tuple[str, str], dict]:
        """(database, user) -> counters, adding the live clients' ``ClientStats`` to the retired totals."""
        with self._lock:
            totals = {pool: dict(values) for pool, values in self._retired.items()}
        for stats in live:
            total = totals.get(stats.pool)
            if total is None:
                total = totals[stats.pool] = _zero()
            add_into(total, stats.values())
        return totals

    def database_totals(self, live) -> dict[str, dict]:
        totals: dict[str, dict] = {}
        for (database, _user), values in self.pool_totals(live).items():
            add_into(totals.setdefault(database, _zero()), values)
        return totals

    def tick(self, live, now: float | None = None) -> bool:
        """Recompute the averages when ``period`` has passed since the last time (the janitor calls this)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            last = self._last
            if now - last[0] < self.period:
                return False
        totals = self.database_totals(live)
        elapsed = max(now - last[0], 1e-6)
        averages = {}
        for database, values in totals.items():
            before = last[1].get(database) or _zero()
            averages[database] = averages_of({k: values[k] - before[k] for k in COUNTERS}, elapsed)
        with self._lock:
            self._last = (now, totals)
            self._averages = averages
        return True

    def averages(self, database: str) -> dict:
        with self._lock:
            return dict(self._averages.get(database) or averages_of(_zero(), 1.0))


def averages_of(delta: dict, elapsed: float) -> dict:
    """PgBouncer's avg_* columns from the change of the totals over ``elapsed`` seconds."""
    def per(name: str, count: int) -> int:
        return int(delta[name] * 1e6 / count) if count else 0

    return {
        "xact_count": int(delta["xact_count"] / elapsed),
        "query_count": int(delta["query_count"] / elapsed),
        "server_assignment_count": int(delta["server_assignment_count"] / elapsed),
        "recv": int(delta["received"] / elapsed),
        "sent": int(delta["sent"] / elapsed),
        "xact_time": per("xact_time", delta["xact_count"]),
        "query_time": per("query_time", delta["query_count"]),
        "wait_time": per("wait_time", delta["server_assignment_count"]),
        "client_login_count": int(delta["client_login_count"] / elapsed),
    }


# -- what the console and the metrics see: one consistent-enough look at everything ---

@dataclasses.dataclass
class ServerView:
    id: int
    ptr: str
    key: str
    user: str
    database: str
    state: str                  # active (linked to a client in a transaction), idle (parked or kept by a client)
    addr: str
    port: int
    local_addr: str | None
    local_port: int | None
    connect_time: float
    idle_since: float           # wall clock; 0 when in use
    remote_pid: int
    close_needed: bool
    prepared: int
    client: "ClientView | None" = None
    replication: str = "none"   # physical, logical: a replication client's own connection (no pool slot)
    tls: str = ""               # "TLSv1.3/TLS_AES_256_GCM_SHA384" (tls_info), "" in plain text


@dataclasses.dataclass
class ClientView:
    stats: ClientStats
    ptr: str
    addr: str
    port: int | None
    local_addr: str | None
    local_port: int | None
    state: str                  # active, idle, waiting
    application_name: str
    prepared: int
    server: ServerView | None = None
    replication: str = "none"   # none, physical, logical
    tls: str = ""               # as ServerView.tls
    pinned: str = ""            # what keeps it on its server connection (temp_table,advisory_lock...), "" for nothing

    @property
    def id(self) -> int:
        return self.stats.id

    @property
    def waiting(self) -> bool:
        return self.state == "waiting"


def _local(sock) -> tuple:
    """The local end of a socket: (address, port); ("unix", port) on a unix socket, as PgBouncer shows it."""
    try:
        name = sock.getsockname()
        if isinstance(name, (str, bytes)):
            text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
            suffix = text.rpartition(".s.PGSQL.")[2]
            return "unix", int(suffix) if suffix.isdigit() else None
        return name[0], name[1]
    except (OSError, IndexError, TypeError):
        return None, None


def tls_info(sock) -> str:
    """PgBouncer's ``tls`` column: protocol/cipher ("TLSv1.3/TLS_AES_256_GCM_SHA384"); "" in plain text.

    PgBouncer adds the key exchange ("/ECDH=X25519"); Python's ssl module does
    not tell it, so it is left out.
    """
    version = getattr(sock, "version", None)
    if version is None:
        return ""
    try:
        cipher = sock.cipher()
        return f"{version() or '-'}/{cipher[0] if cipher else '-'}"
    except (OSError, ValueError, AttributeError):
        return ""


def _server_view(conn, key: str, pool: tuple[str, str], state: str, idle_since: float,
                 close_needed: bool) -> ServerView:
    local_addr, local_port = _local(conn.sock)
    statements = getattr(conn, "statements", None)
    return ServerView(id=conn.serial, ptr=f"{id(conn):x}", key=key, user=pool[1], database=pool[0],
                      state=state, addr=conn.host, port=conn.port, local_addr=local_addr, local_port=local_port,
                      connect_time=conn.created, idle_since=idle_since, remote_pid=conn.pid,
                      close_needed=close_needed, prepared=len(statements) if statements else 0,
                      tls=tls_info(conn.sock) if getattr(conn, "tls", False) else "")


@dataclasses.dataclass
class PoolView:
    """One pool's gauges, as SHOW POOLS and the metrics show them."""

    database: str
    user: str
    cl_active: int        # logged-in clients not waiting for a server connection
    cl_waiting: int
    sv_active: int        # server connections in use by a client
    sv_idle: int          # parked, or kept idle by their last client
    sv_login: int         # pass-through logins still authenticating
    maxwait: float        # seconds the oldest waiting client has waited
    pool_mode: str


class Observation:
    """Clients, server connections and totals at one moment, for SHOW commands and metrics.

    Built by ``observe``; read-only.  Pools are (database, user).
    """

    def __init__(self, config, registry: StatsRegistry, pool_snapshot: dict) -> None:
        self.config = config
        self.registry = registry
        self.clients: list[ClientView] = []
        self.servers: list[ServerView] = []
        self.console_clients = 0
        self.login_clients = 0
        self.pool_stats = pool_snapshot["stats"]
        self._open = pool_snapshot["open"]
        self._pending = pool_snapshot["pending"]
        self.open_servers = sum(self._open.values())
        self.database_totals: dict[str, dict] = {}
        self.pool_totals: dict[tuple[str, str], dict] = {}

    def averages(self, database: str) -> dict:
        return self.registry.averages(database)

    def pool_names(self) -> list[tuple[str, str]]:
        names = {c.stats.pool for c in self.clients} | {s.user and (s.database, s.user) for s in self.servers}
        names |= set(self.pool_totals)
        names |= {self.registry.pool_of_key(k) for k in self._pending}
        return sorted(n for n in names if n)

    def pools(self) -> list[PoolView]:
        now = time.monotonic()
        views = []
        for pool in self.pool_names():
            clients = self.clients_of(pool)
            waiting = [c.stats.wait_since for c in clients if c.waiting]
            servers = self.servers_of(pool)
            active = sum(1 for s in servers if s.state == "active")
            views.append(PoolView(pool[0], pool[1], len(clients) - len(waiting), len(waiting), active,
                                  len(servers) - active, self.logging_in(pool),
                                  now - min(waiting) if waiting else 0.0, self.pool_mode(pool)))
        return views

    def clients_of(self, pool) -> list[ClientView]:
        return [c for c in self.clients if c.stats.pool == pool]

    def servers_of(self, pool) -> list[ServerView]:
        return [s for s in self.servers if (s.database, s.user) == pool]

    def logging_in(self, pool) -> int:
        return sum(n for k, n in self._pending.items() if self.registry.pool_of_key(k) == pool)

    def entry_name(self, database: str) -> str | None:
        entry = self.config.lookup_database(database)
        return entry.name if entry is not None else None

    def pool_mode(self, pool) -> str:
        entry = self.config.lookup_database(pool[0])
        return entry.pool_mode if entry is not None else self.config.pool_mode

    def server_count(self, entry: str) -> int:
        return sum(n for k, n in self._open.items()
                   if self.entry_name(self.registry.pool_of_key(k)[0]) == entry)

    def client_count(self, entry: str) -> int:
        return sum(1 for c in self.clients if self.entry_name(c.stats.database) == entry)


def observe(sessions, pool, registry: StatsRegistry, config, closing=None) -> Observation:
    """Look at every session and parked connection; ``closing(key, conn)`` says whether one will be closed."""
    obs = Observation(config, registry, pool.snapshot())
    closing = closing or (lambda key, conn: False)
    live = []
    # The sessions are looked at one by one while connections move between them: a server
    # connection handed from one client to another (or parked) meanwhile would be seen twice.
    # It is one connection: shown once, with the holder seen last.
    seen: dict = {}
    for session in sessions:
        if getattr(session, "console", None) is not None:
            obs.console_clients += 1
            continue
        relay = session.relay
        stats = session.stats
        if relay is None:
            obs.login_clients += 1
            continue
        live.append(stats)
        backend = relay.backend
        lingering = relay.lingering
        if stats.wait_since:
            state = "waiting"
        elif backend is not None and not lingering:
            state = "active"
        else:
            state = "idle"
        address = session.address
        local_addr, local_port = _local(session.client)
        prepared = relay.prepared
        client = ClientView(stats=stats, ptr=f"{id(session):x}", addr=address[0],
                            port=address[1] if len(address) > 1 else None,
                            local_addr=local_addr, local_port=local_port, state=state,
                            application_name=session.settings.values.get("application_name", ""),
                            prepared=len(prepared.statements) if prepared is not None else 0,
                            replication=getattr(session, "replication", "") or "none",
                            tls=tls_info(session.client) if session.tls else "",
                            pinned=relay.state.shown if relay.state is not None else "")
        if backend is not None:
            _, earlier = seen.get(id(backend), (None, None))
            if earlier is not None:
                obs.servers.remove(earlier)
                earlier.client.server = None
            server = _server_view(backend, stats.key, stats.pool, "idle" if lingering else "active", 0.0,
                                  closing(stats.key, backend))
            server.replication = client.replication
            server.client, client.server = client, server
            obs.servers.append(server)
            seen[id(backend)] = (backend, server)      # (the object kept: its id stays its own)
        obs.clients.append(client)
    now_wall, now = time.time(), time.monotonic()
    for key, conn, since in pool.parked():
        if id(conn) in seen:
            continue                    # parked after its client was looked at: shown once, as that client's
        obs.servers.append(_server_view(conn, key, registry.pool_of_key(key), "idle", now_wall - (now - since),
                                        closing(key, conn)))
    obs.pool_totals = registry.pool_totals(live)
    obs.database_totals = {}
    for (database, _user), values in obs.pool_totals.items():
        add_into(obs.database_totals.setdefault(database, _zero()), values)
    return obs
