"""Getting one client a server connection of its own identity, and giving it back.

In transaction and statement mode a client takes a server connection at the
start of each transaction.  The connection must look like the client's own
session: the settings it asked for at startup (and those it changed since
that the server reports, as in PgBouncer) are SET on a connection that lacks
them, and a connection carrying a setting that cannot be put back is closed,
never handed on.  Giving a connection back sends the reset query and parks it
(the next checkout reads the reset's answer), or closes it when its state is
unknown.
"""

from __future__ import annotations

import time
from typing import Callable

from . import protocol as pq
from .backend import ServerConnection
from .config import Config, DatabaseConfig
from .errors import ClientFatal, PoolTimeout, ServerError, ServerGone
from .pool import BackendIdlePool


class ClientSettings:
    """The session settings a client wants: lower-case GUC name -> value, and its spelling."""

    __slots__ = ("values", "names")

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.names: dict[str, str] = {}

    def set(self, name: str, value: str) -> None:
        lower = name.lower()
        self.values[lower] = value
        self.names[lower] = name

    def follow(self, name: str, value: str) -> None:
        """A reported setting the client changed follows it to its next server connection (PgBouncer's rule)."""
        lower = name.lower()
        self.values[lower] = value
        self.names.setdefault(lower, name)

    def startup_params(self, user: str, dbname: str) -> dict:
        """The server's StartupMessage parameters for a new connection of this client."""
        params = {"user": user, "database": dbname}
        for lower, value in self.values.items():
            params[self.names[lower]] = value
        return params


class ServerCheckout:
    """Server connections for one client's transactions: ``obtain``, ``park``, ``discard``.

    ``dial(startup_params)`` opens a new logged-in connection when the pool
    allows one (proxy-terminated auth); with None (pass-through) only the
    client's own login could open one, so only parked connections are taken.
    """

    def __init__(self, pool: BackendIdlePool, config: Config, db: DatabaseConfig, key: str, user: str,
                 dbname: str, settings: ClientSettings,
                 dial: Callable[[dict], ServerConnection] | None) -> None:
        self.pool = pool
        self.config = config
        self.db = db
        self.key = key
        self.user = user
        self.dbname = dbname          # the server-side database name
        self.settings = settings
        self.dial = dial

    def startup_params(self) -> dict:
        return self.settings.startup_params(self.user, self.dbname)

    def adopt(self, conn: ServerConnection) -> None:
        """Record what a fresh login of this client's settings looks like.

        The connection remembers the settings it logged in with (what a reset
        returns it to); the client's values take the server's spelling; every
        other reported value is the server's default for the key.
        """
        settings = self.settings.values
        conn.login_params = dict(settings)
        conn.unreported = {k: v for k, v in settings.items() if k not in conn.params}
        defaults = {}
        for name, value in conn.params.items():
            if name in settings:
                settings[name] = value
            else:
                defaults[name] = value
        self.pool.learn_defaults(self.key, defaults)

    def obtain(self) -> ServerConnection:
        """A server connection of this client's identity with its settings, dialing if allowed."""
        pool, db, config = self.pool, self.db, self.config
        settings = self.settings.values
        deadline = time.monotonic() + config.query_wait_timeout
        for _ in range(db.pool_size + 3):
            remaining = deadline - time.monotonic()
            try:
                conn = pool.acquire(self.key, db.pool_size, max(remaining, 0.0),
                                    prefer=lambda c: c.login_params == settings, dial=self.dial is not None)
            except PoolTimeout:
                raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                                  f"query_wait_timeout: no server connection for user \"{self.user}\" "
                                  f"database \"{self.dbname}\" became free within "
                                  f"{config.query_wait_timeout:g} s (pool_size {db.pool_size})") from None
            if conn is None:
                if self.dial is None:
                    raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE,
                                      "no server connection is left for this login; reconnect",
                                      detail="With auth_type passthrough only a client's own login opens "
                                             "server connections, and all of this user's have closed.")
                conn = self.dial(self.startup_params())
                self.adopt(conn)
                return conn
            needed = self._needed_settings(conn)
            if needed is None:
                pool.discard(self.key, conn, "it carries a setting that cannot be put back for this client")
                continue
            try:
                conn.apply_settings(needed, config.server_connect_timeout)
            except ServerGone as exc:
                pool.discard(self.key, conn, f"applying the client's settings failed: {exc}")
                continue
            except ServerError as exc:
                self.park(conn)
                # The server refused a setting the client asked for: end the client with those words.
                raise ClientFatal(exc.fields.get("C", pq.SQLSTATE_CONNECTION_FAILURE), str(exc),
                                  raw=pq.error_response_from_fields(exc.fields, pq.FATAL)) from None
            return conn
        raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE,
                          "no compatible server connection could be found for this client's settings")

    def _needed_settings(self, conn: ServerConnection) -> dict | None:
        """SETs that make ``conn`` look like this client's session, or None if it cannot."""
        wanted = {}
        params, unreported, settings = conn.params, conn.unreported, self.settings.values
        for name, value in settings.items():
            current = params.get(name) if name in params else unreported.get(name)
            if current != value:
                wanted[name] = value
        stray = conn.login_params.keys() - settings.keys()
        stray |= unreported.keys() - settings.keys()
        if stray:
            defaults = self.pool.defaults(self.key)
            for name in stray:
                if name not in params or name not in defaults:
                    return None        # a setting we cannot put back to the server default
                if params[name] != defaults[name]:
                    wanted[name] = defaults[name]
        return wanted

    def park(self, conn: ServerConnection) -> None:
        """Send the reset query and park ``conn``; the next checkout checks the answer."""
        ok = conn.start_reset(self.config.reset_query, self.config.server_connect_timeout)
        self.pool.checkin(self.key, conn, reset_ok=ok)

    def discard(self, conn: ServerConnection, reason: str) -> None:
        """Close ``conn`` (its state is unknown or it is broken) and free its slot."""
        self.pool.discard(self.key, conn, reason)
