"""The statistics an embedding program reads (``Proxy.stats()``): typed, frozen records.

The same facts SHOW POOLS, SHOW STATS, SHOW CLIENTS and SHOW SERVERS give on
the admin console, read from the same place, one ``stats.Observation`` of the
server (``ProxyServer.observe()``), so the console and this API never
disagree about a moment they both saw.  They differ only in spelling: times
here are seconds (floats) where the console shows microseconds, timestamps
are wall-clock seconds (``time.time()``) where it shows text, and a client's
server connection is named by its id (``server_id``) where the console shows
a pointer.

Pools are named as PgBouncer names them: (database, user), the database being
the name the client asked for.  Records are built once per ``stats()`` call;
nothing in them changes afterwards.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

from .stats import ClientView, Observation, ServerView


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """One pool (database, user) now: SHOW POOLS' row."""

    database: str
    user: str
    cl_active: int         #: logged-in clients not waiting for a server connection
    cl_waiting: int        #: clients waiting for a server connection
    sv_active: int         #: server connections in use by a client (in a transaction, or linked to one)
    sv_idle: int           #: server connections parked, or kept idle by their last client
    sv_login: int          #: pass-through logins still authenticating with PostgreSQL
    maxwait: float         #: seconds the oldest waiting client has waited (0.0: nobody waits)
    pool_mode: str         #: session, transaction or statement


@dataclasses.dataclass(frozen=True)
class DatabaseTotals:
    """One database's counters since the start (clients that left included): SHOW STATS' total_* columns.

    Times are seconds (SHOW STATS shows microseconds).  ``avg_*`` are the
    averages over the last complete ``stats_period`` (per second for counts
    and bytes; per transaction, query or assignment for times, in seconds).
    """

    database: str
    xact_count: int                  #: transactions ended (commits and rollbacks; statements in autocommit)
    query_count: int                 #: requests (Query, Sync, FunctionCall) sent to servers
    server_assignment_count: int     #: times a client was given a server connection
    received: int                    #: bytes received from clients
    sent: int                        #: bytes sent to clients
    xact_time: float                 #: seconds spent in transactions
    query_time: float                #: seconds spent in queries
    wait_time: float                 #: seconds clients waited for a server connection
    client_login_count: int          #: client logins
    avg_xact_count: int              #: transactions per second
    avg_query_count: int             #: queries per second
    avg_received: int                #: bytes per second from clients
    avg_sent: int                    #: bytes per second to clients
    avg_xact_time: float             #: seconds per transaction
    avg_query_time: float            #: seconds per query
    avg_wait_time: float             #: seconds of wait per server assignment


@dataclasses.dataclass(frozen=True)
class ClientInfo:
    """One logged-in client: SHOW CLIENTS' row."""

    id: int                          #: the console's id (also Event.client_id)
    database: str
    user: str
    state: str                       #: active, idle or waiting (for a server connection)
    addr: str                        #: the client's address
    port: int | None
    local_addr: str | None           #: the proxy's address it connected to
    local_port: int | None
    connect_time: float              #: wall clock of its login
    request_time: float              #: wall clock of its latest request (its login if none yet)
    wait: float                      #: seconds it has been waiting (0.0 unless waiting)
    application_name: str
    prepared_statements: int         #: named prepared statements it holds (transaction/statement mode)
    server_id: int | None            #: the server connection it holds now (ServerInfo.id), if any
    replication: str                 #: none, physical or logical
    tls: str                         #: "TLSv1.3/TLS_AES_256_GCM_SHA384", or "" in plain text
    pinned: str = ""                 #: what pins it to its server connection ("temp_table,advisory_lock"...), "" for nothing


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """One server connection: SHOW SERVERS' row."""

    id: int                          #: the console's id (also Event.server_id)
    database: str                    #: the pool it serves (as the clients named the database)
    user: str
    state: str                       #: active (in use by a client) or idle (parked, or kept by its last client)
    addr: str                        #: the server's address and port
    port: int
    local_addr: str | None
    local_port: int | None
    connect_time: float              #: wall clock of its login
    request_time: float              #: its client's latest request, else when it became idle, else connect_time
    remote_pid: int                  #: the PostgreSQL backend's process id
    close_needed: bool               #: it is closed when released (RECONNECT, server_lifetime, RELOAD)
    client_id: int | None            #: the client it serves now (ClientInfo.id), if any
    prepared_statements: int         #: the proxy's named statements prepared on it
    replication: str                 #: none, physical or logical
    tls: str
    node: str                        #: host:port of its server
    node_state: str                  #: "up primary", "down unknown"...: what the proxy knows of the node


@dataclasses.dataclass(frozen=True)
class Totals:
    """The whole proxy now (SHOW LISTS' counts)."""

    clients: int                     #: logged-in clients (console clients and logins in progress excluded)
    login_clients: int               #: clients still logging in
    console_clients: int             #: admin console clients
    servers: int                     #: server connections open (in use or parked; pass-through logins pending excluded)
    pools: int


@dataclasses.dataclass(frozen=True)
class ProxyStats:
    """What ``Proxy.stats()`` returns: every record of one moment (``time``, wall clock)."""

    time: float
    pools: tuple[PoolStats, ...]
    databases: tuple[DatabaseTotals, ...]
    clients: tuple[ClientInfo, ...]
    servers: tuple[ServerInfo, ...]
    totals: Totals

    def pool(self, database: str, user: str) -> PoolStats | None:
        """The record of pool (database, user), or None if the proxy has none."""
        return next((p for p in self.pools if (p.database, p.user) == (database, user)), None)

    def database(self, name: str) -> DatabaseTotals | None:
        """The counters of database ``name`` (as clients named it), or None."""
        return next((d for d in self.databases if d.database == name), None)


def _client(c: ClientView, now: float) -> ClientInfo:
    s = c.stats
    return ClientInfo(id=s.id, database=s.database, user=s.user, state=c.state, addr=c.addr, port=c.port,
                      local_addr=c.local_addr, local_port=c.local_port, connect_time=s.connect_time,
                      request_time=s.request_time or s.connect_time,
                      wait=now - s.wait_since if c.waiting else 0.0, application_name=c.application_name,
                      prepared_statements=c.prepared, server_id=c.server.id if c.server is not None else None,
                      replication=c.replication, tls=c.tls, pinned=c.pinned)


def _server(s: ServerView, node_state: Callable[[str], str]) -> ServerInfo:
    client = s.client
    node = f"{s.addr}:{s.port}"
    return ServerInfo(id=s.id, database=s.database, user=s.user, state=s.state, addr=s.addr, port=s.port,
                      local_addr=s.local_addr, local_port=s.local_port, connect_time=s.connect_time,
                      request_time=(client.stats.request_time if client is not None and client.stats.request_time
                                    else s.idle_since or s.connect_time),
                      remote_pid=s.remote_pid, close_needed=bool(s.close_needed),
                      client_id=client.id if client is not None else None, prepared_statements=s.prepared,
                      replication=s.replication, tls=s.tls, node=node, node_state=node_state(node))


def _database(database: str, values: dict, avg: dict) -> DatabaseTotals:
    return DatabaseTotals(
        database=database, xact_count=values["xact_count"], query_count=values["query_count"],
        server_assignment_count=values["server_assignment_count"], received=values["received"],
        sent=values["sent"], xact_time=values["xact_time"], query_time=values["query_time"],
        wait_time=values["wait_time"], client_login_count=values["client_login_count"],
        avg_xact_count=avg.get("xact_count", 0), avg_query_count=avg.get("query_count", 0),
        avg_received=avg.get("recv", 0), avg_sent=avg.get("sent", 0),
        avg_xact_time=avg.get("xact_time", 0) / 1e6, avg_query_time=avg.get("query_time", 0) / 1e6,
        avg_wait_time=avg.get("wait_time", 0) / 1e6)


def from_observation(obs: Observation, node_state: Callable[[str], str]) -> ProxyStats:
    """The records of one ``Observation``; ``node_state(host:port)`` as ConsoleControl.node_state."""
    now = time.monotonic()
    pools = tuple(PoolStats(p.database, p.user, p.cl_active, p.cl_waiting, p.sv_active, p.sv_idle, p.sv_login,
                            p.maxwait, p.pool_mode) for p in obs.pools())
    databases = tuple(_database(name, values, obs.averages(name))
                      for name, values in sorted(obs.database_totals.items()))
    return ProxyStats(
        time=time.time(), pools=pools, databases=databases,
        clients=tuple(_client(c, now) for c in obs.clients),
        servers=tuple(_server(s, node_state) for s in obs.servers),
        totals=Totals(clients=len(obs.clients), login_clients=obs.login_clients,
                      console_clients=obs.console_clients, servers=obs.open_servers, pools=len(pools)))
