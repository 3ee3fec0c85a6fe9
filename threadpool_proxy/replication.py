"""Replication connections: a client's own server connection, relayed as it is.

A StartupMessage with ``replication=true`` (physical: pg_basebackup,
pg_receivewal, a standby) or ``replication=database`` (logical: pg_recvlogical,
subscriptions, drivers' replication APIs) asks PostgreSQL for a WAL sender.
As PgBouncer 1.23+ does, the proxy pairs such a client with a server
connection of its own, logged in as the authenticated user with the client's
settings (its parameters and its ``options``, read and checked as for every
client: startup.py) plus ``replication``, and relays both ways
untouched, COPY both mode included (the relay's scanners only follow message
headers; CopyBothResponse and CopyData are ordinary messages to them).  The
pair lives and dies together: the server connection is never reset, parked or
handed to anyone, and is closed when the client leaves.

In every pool mode, as PgBouncer 1.23+: whatever the entry's mode, the pair
is relayed as in session mode (a WAL sender's stream must never move), so one
database entry serves an application in transaction mode and its replication
clients alike (see docs/pool-modes.md, "Replication connections").

Replication connections hold no ``pool_size`` slot (a long-running stream
would otherwise starve the pool's ordinary clients; PostgreSQL limits them by
``max_wal_senders`` itself): a pass-through one holds one of the key's
``max_pending_logins`` places until PostgreSQL accepts it, like any login, and
none after.
"""

from __future__ import annotations

from . import protocol as pq
from .backend import ServerConnection
from .checkout import ServerCheckout
from .errors import ClientFatal

SQLSTATE_INVALID_PARAMETER_VALUE = "22023"

PHYSICAL = "physical"
LOGICAL = "logical"

#: The ``replication`` value the proxy sends the server for each kind.
STARTUP_VALUE = {PHYSICAL: "true", LOGICAL: "database"}


def parse_bool(value: str) -> bool | None:
    """PostgreSQL's parse_bool: true/false/yes/no by any prefix, on/off, 1/0; None if none of them."""
    v = value.lower()
    if not v:
        return None
    if "true".startswith(v) or "yes".startswith(v):
        return True
    if "false".startswith(v) or "no".startswith(v):
        return False
    if len(v) >= 2 and "on".startswith(v):
        return True
    if len(v) >= 2 and "off".startswith(v):
        return False
    if v == "1":
        return True
    if v == "0":
        return False
    return None


def replication_kind(value: str | None) -> str:
    """The kind of replication connection a ``replication`` startup value asks for ("" for none).

    Read as PostgreSQL reads it; a value it would refuse gets its FATAL 22023.
    """
    if value is None:
        return ""
    if value == "database":
        return LOGICAL
    flag = parse_bool(value)
    if flag is None:
        raise ClientFatal(SQLSTATE_INVALID_PARAMETER_VALUE,
                          f'invalid value for parameter "replication": "{value}"',
                          hint='Valid values are: "false", 0, "true", 1, "database".')
    return PHYSICAL if flag else ""


def check_entry(database: str, db) -> None:
    """Refuse a replication client whose database entry cannot serve it (ClientFatal 0A000).

    One server: with several nodes the proxy would have to route a WAL sender
    by role (a physical standby streams from the primary or a cascading
    standby), which it does not do yet.  Any pool mode.
    """
    if db.multi:
        raise ClientFatal(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                          f'replication connections need a database entry with one server, but database '
                          f'"{database}" has {len(db.nodes)} nodes',
                          hint="Give replication clients a database entry naming the one server "
                               "they should stream from, or connect them to PostgreSQL directly.")


class ReplicationCheckout(ServerCheckout):
    """The checkout of a replication client: its one server connection, outside the pool.

    ``startup_params`` add ``replication``; the connection takes no pool slot,
    so giving it back (``park`` or ``discard``) only closes it, and there is
    never a second one (``obtain``).
    """

    def __init__(self, *args, kind: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind

    def startup_params(self) -> dict:
        params = super().startup_params()
        params["replication"] = STARTUP_VALUE[self.kind]
        return params

    def adopt(self, conn: ServerConnection) -> None:
        # Only the NOTIFY map (replication=database runs SQL too): a WAL sender's
        # reported settings are not the key's defaults for ordinary connections.
        if self.backends is not None:
            self.backends[(conn.node, conn.pid)] = conn

    def obtain(self, cancelable: bool = False) -> ServerConnection:
        raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE,
                          "the replication connection's server connection is gone")

    def park(self, conn: ServerConnection) -> None:
        self.discard(conn, "its replication client left (replication connections are never reused)")

    def discard(self, conn: ServerConnection, reason: str) -> None:
        conn.close(reason)
