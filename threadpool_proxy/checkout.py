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

from . import prepared
from . import protocol as pq
from .backend import ServerConnection
from .config import DEFAULT_RESET_QUERY, Config, DatabaseConfig
from .errors import (ClientFatal, ClientGone, NodeDown, PoolTimeout, QueryCanceled, ServerError, ServerGone,
                     ServerUnavailable)
from .nodes import Router, query_session_attrs, session_fits
from .pool import BackendIdlePool, Limits, Waiter, pool_key
from .startup import may_carry
from .stats import ClientStats
from .logs import get_logger

log = get_logger(__name__)

#: What PostgreSQL answers a query canceled by a CancelRequest (the client is between transactions).
CANCELED_ANSWER = (pq.error_response(pq.SQLSTATE_QUERY_CANCELED, "canceling statement due to user request",
                                     pq.ERROR)
                   + pq.ready_for_query(pq.IDLE))


class ClientSettings:
    """The session settings a client wants: lower-case GUC name -> value, and its spelling.

    ``startup`` holds what its startup packet asked for (what server logins
    for it carry); ``values`` what its session has now: those, and what it
    changed since (a reported parameter the server announced, a setting read
    back after its SET: sessionstate.py), which checkout SETs on each server
    connection it gets.
    """

    __slots__ = ("values", "names", "startup")

    def __init__(self) -> None:
        self.values: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.startup: dict[str, str] = {}

    def set(self, name: str, value: str) -> None:
        """A setting of the startup packet."""
        lower = name.lower()
        self.values[lower] = value
        self.startup[lower] = value
        self.names[lower] = name

    def follow(self, name: str, value: str) -> None:
        """A setting the client changed follows it to its next server connection (PgBouncer's rule
        for reported ones; every one the client SETs in transaction and statement mode).

        Not an identity (``session_authorization``, ``is_superuser``): those
        stay with the server connection they were set on.
        """
        if not may_carry(name):
            return
        lower = name.lower()
        self.values[lower] = value
        self.names.setdefault(lower, name)

    def forget(self, name: str) -> None:
        """The server no longer has setting ``name`` (a placeholder gone): nothing to carry over."""
        lower = name.lower()
        self.values.pop(lower, None)
        self.startup.pop(lower, None)

    @property
    def changed(self) -> bool:
        """Whether the session's settings differ from the startup packet's (a new login needs SETs)."""
        return self.values != self.startup

    def startup_params(self, user: str, dbname: str) -> dict:
        """The server's StartupMessage parameters for a new connection of this client.

        ``user`` and ``dbname`` are the proxy's (the authenticated user, the
        entry's database) and nothing of the client's can stand in for them:
        a setting named like a startup key never gets here (startup.py refuses
        it at login), and is left out should one ever do.  Only the startup
        packet's settings: what the client changed since is SET after the
        login, so the connection's login settings (what a reset returns it
        to) are ones other clients of the same startup settings can use.
        """
        params = {self.names[lower]: value for lower, value in self.startup.items() if may_carry(lower)}
        params["user"] = user
        params["database"] = dbname
        return params


class ServerCheckout:
    """Server connections for one client's transactions: ``obtain``, ``park``, ``discard``.

    ``dial(startup_params, node, key)`` opens a new logged-in connection to
    ``node`` (a NodeConfig; None: the entry's only server) when the pool allows
    one (proxy-terminated auth); with None (pass-through) only the client's
    own login could open one, so only parked connections are taken.

    An entry with several nodes (``db.multi``, a ``router``) chooses a node at
    each checkout: a parked connection of any node that is up first, else a
    new one where ``load_balance`` says; ``key`` is then the key of the
    connection handed out last (the one the client holds).  A single-server
    entry has one fixed key and costs nothing more.
    ``client_alive()`` says whether the client is still connected (a waiting
    client that left is handed nothing); ``cancel_wait()`` (a CancelRequest)
    ends a wait in ``obtain``.  ``stats`` (the client's counters) gets each
    wait for a server connection and its outcome.  ``backends``, when given,
    is the proxy's map (node, real pid) -> server connection (weak values),
    where every connection opened for a client is entered (NOTIFY senders).
    """

    def __init__(self, pool: BackendIdlePool, config: Config, db: DatabaseConfig, key: str, user: str,
                 dbname: str, settings: ClientSettings,
                 dial: Callable[[dict], ServerConnection] | None,
                 client_alive: Callable[[], bool] | None = None, stats: ClientStats | None = None,
                 backends=None, router: Router | None = None) -> None:
        self.pool = pool
        self.config = config
        self.key = key
        self.user = user
        self.dbname = dbname          # the server-side database name
        self.settings = settings
        self.dial = dial
        self.waiter = Waiter(client_alive)
        self.stats = stats if stats is not None else ClientStats()
        self.cancelable = False          # obtain() is waiting for a request that a cancel may drop
        self.backends = backends
        self.router = router
        self.node_keys: dict[str, str] = {}
        self.routed = False
        # How the client logged in, not what a RELOAD makes of its entry later: keys of trust pools.
        self.trust = db.auth_type == "trust"
        self.route(db)

    def route(self, db: DatabaseConfig) -> None:
        """Take entry ``db`` (at start and on RELOAD): several nodes are routed, one is not."""
        self.db = db
        self.limits = Limits.of(self.config, db)     # None unless a cap or reserve applies
        self.routed = self.router is not None and db.multi
        self.node_keys = {n.name: pool_key(n.name, self.user, self.dbname, self.trust) for n in db.nodes}

    def key_of(self, conn: ServerConnection) -> str:
        """The pool key of one of this client's connections (its node's)."""
        return self.node_keys.get(conn.node, self.key) if self.routed else self.key

    def startup_params(self) -> dict:
        return self.settings.startup_params(self.user, self.dbname)

    def adopt(self, conn: ServerConnection) -> None:
        """Record what a fresh login of this client's settings looks like.

        The connection remembers the settings it logged in with (what a reset
        returns it to); the client's values take the server's spelling; every
        other reported value is the server's default for the key.
        """
        if self.backends is not None:
            self.backends[(conn.node, conn.pid)] = conn
        startup, values = self.settings.startup, self.settings.values
        if self.routed:
            self.key = self.key_of(conn)
        conn.login_params = dict(startup)
        conn.unreported = {k: v for k, v in startup.items() if k not in conn.params}
        defaults = {}
        for name, value in conn.params.items():
            if name in startup:
                if values.get(name) == startup[name]:
                    values[name] = value          # (unless the session changed it since)
                startup[name] = value
            else:
                defaults[name] = value
        self.pool.learn_defaults(self.key, defaults)

    def obtain(self, cancelable: bool = False) -> ServerConnection:
        """A server connection of this client's identity with its settings, dialing if allowed.

        Waits up to ``query_wait_timeout`` for a free one, also while the
        server is down (dials paced by ``server_login_retry``).  With
        ``cancelable`` (the request waiting for it can be answered and dropped
        whole) a CancelRequest ends the wait with QueryCanceled, whose ``raw``
        is the answer to send.  ClientGone if the client left while waiting.
        """
        self.stats.waiting()
        conn = None
        try:
            conn = self._obtain_routed(cancelable) if self.routed else self._obtain(cancelable)
            return conn
        finally:
            self.stats.assigned(conn is not None)

    def _obtain(self, cancelable: bool) -> ServerConnection:
        pool, db, config = self.pool, self.db, self.config
        settings = self.settings.values
        deadline = time.monotonic() + config.query_wait_timeout
        unfit = 0                      # parked connections closed for carrying settings we cannot undo
        self.cancelable = cancelable
        try:
            while True:
                remaining = deadline - time.monotonic()
                try:
                    conn = pool.acquire(self.key, db.pool_size, max(remaining, 0.0),
                                        prefer=lambda c: c.login_params == settings, dial=self.dial is not None,
                                        waiter=self.waiter, paced=True, limits=self.limits)
                except PoolTimeout:
                    raise self._wait_timed_out(pool.server_down(self.key)) from None
                except QueryCanceled:
                    raise QueryCanceled(CANCELED_ANSWER) from None
                if conn is None:
                    if self.dial is None:
                        self._no_connection_left()
                    try:
                        conn = self.dial(self.startup_params(), None, self.key)
                    except ServerUnavailable as exc:
                        pool.dial_failed(self.key, config.server_login_retry, exc)
                        log.info("user %s: %s; waiting for the server", self.user, exc)
                        continue
                    except BaseException:
                        pool.dial_abandoned(self.key)
                        raise
                    pool.dial_succeeded(self.key)
                    self.adopt(conn)
                    if not self.settings.changed or self._give_settings(self.key, conn):
                        return conn
                elif self._give_settings(self.key, conn):
                    return conn
                unfit += 1
                if unfit > db.pool_size + 2:
                    raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE, "no compatible server connection "
                                      "could be found for this client's settings")
        finally:
            self.cancelable = False

    def _obtain_routed(self, cancelable: bool) -> ServerConnection:
        """``_obtain`` for an entry with several nodes: reuse on any up node, else dial the chosen one.

        A node that refuses a dial is marked down at once (``dial_failed``) and
        the next node is tried; one that goes down while the client waits for
        it (NodeDown) is left for another.  When every node is down the client
        waits for the first (dials paced by ``server_login_retry``) within
        ``query_wait_timeout``, as with a single server, and the health checks
        or a dial that works bring them back.
        """
        pool, db, config, router = self.pool, self.db, self.config, self.router
        settings = self.settings.values
        deadline = time.monotonic() + config.query_wait_timeout
        unfit = 0
        prefer = lambda c: c.login_params == settings      # noqa: E731
        self.cancelable = cancelable
        try:
            while True:
                keys = self.node_keys
                key, conn = pool.checkout_any([keys[n.name] for n in router.reuse_order(db)], prefer)
                if conn is None:
                    conn, key = self._new_on_a_node(deadline, prefer)
                    if conn is None:
                        continue
                if key is None:               # freshly dialed and checked: the client's startup settings
                    self.key = self.key_of(conn)
                    if not self.settings.changed or self._give_settings(self.key, conn):
                        return conn
                else:
                    self.key = key
                    if self._give_settings(key, conn):
                        return conn
                unfit += 1
                if unfit > db.pool_size * len(db.nodes) + 2:
                    raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE, "no compatible server connection "
                                      "could be found for this client's settings")
        finally:
            self.cancelable = False

    def _new_on_a_node(self, deadline: float, prefer) -> tuple:
        """No parked connection anywhere: wait for or dial one on the chosen node.

        Returns (connection, its key) for a parked one the wait brought,
        (connection, None) for a new one (dialed, fitting the target, adopted),
        or (None, None) to look again.
        """
        pool, db, config, router = self.pool, self.db, self.config, self.router
        keys = self.node_keys
        remaining = deadline - time.monotonic()
        if self.dial is None:
            # Pass-through: only connections the client's identity still has somewhere can serve it.
            node = next((n for n in router.candidates(db) if pool.open_count(keys[n.name])), None)
        else:
            node = router.for_dial(db, lambda n: pool.open_count(keys[n.name]))
        failover = node is not None
        if node is None and self.dial is not None:
            node = router.fallback(db)
            if node is None:
                # Every node is known not to fit (e.g. read-write while all are read-only):
                # wait for a health check to see one change (a promotion), within the deadline.
                if remaining <= 0:
                    raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE,
                                      f"query_wait_timeout: no server of database \"{self.dbname}\" fits "
                                      f"target_session_attrs {db.target_session_attrs} ({router.misfits(db)})")
                alive = self.waiter.alive
                if alive is not None and not alive():
                    raise ClientGone()
                time.sleep(min(1.0, remaining))
                return None, None
        if node is None:
            self._no_connection_left()
        key = keys[node.name]
        try:
            conn = pool.acquire(key, db.pool_size, max(remaining, 0.0), prefer=prefer,
                                dial=self.dial is not None, waiter=self.waiter, paced=True, failover=failover,
                                limits=self.limits)
        except NodeDown:
            return None, None
        except PoolTimeout:
            raise self._wait_timed_out(pool.server_down(key)) from None
        except QueryCanceled:
            raise QueryCanceled(CANCELED_ANSWER) from None
        if conn is not None:
            return conn, key
        if self.dial is None:
            return None, None                  # its last connection there closed meanwhile: look again
        try:
            conn = self.dial(self.startup_params(), node, key)
        except ServerUnavailable as exc:
            pool.dial_failed(key, config.server_login_retry, exc, elsewhere=True)
            log.info("user %s: %s; trying another node", self.user, exc)
            return None, None
        except BaseException:
            pool.dial_abandoned(key)
            raise
        pool.dial_succeeded(key)
        try:
            fit = self._fits_target(conn)
        except (ServerGone, ServerError) as exc:
            pool.discard(key, conn, f"asking whether it is in recovery failed: {exc}")
            return None, None
        if not fit:
            pool.discard(key, conn, f"it does not fit target_session_attrs {db.target_session_attrs}")
            return None, None
        self.adopt(conn)
        return conn, None

    def _fits_target(self, conn: ServerConnection) -> bool:
        """Learn what the new connection's server is; whether its session fits ``target_session_attrs``."""
        target = self.db.target_session_attrs
        attrs = self.router.learn_from_login(conn, self.settings.startup)
        if attrs is None and target not in ("any", "prefer-standby"):
            attrs = query_session_attrs(conn, self.config.server_connect_timeout)   # before PostgreSQL 14
            if "default_transaction_read_only" not in self.settings.startup:
                self.router.learn(conn.node, *attrs, how="asked at login")
        return attrs is None or session_fits(target, *attrs)

    def check_login_target(self, conn: ServerConnection) -> None:
        """A pass-through login landed on a node that does not fit ``target_session_attrs``: end the client.

        The proxy cannot log in elsewhere without the client; the node's state
        is learned now, so the client's next login goes to a fitting node.
        """
        try:
            fit = self._fits_target(conn)
        except (ServerGone, ServerError) as exc:
            self.discard(conn, f"asking whether it is in recovery failed: {exc}")
            raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE, f"threadpool_proxy: server {conn.node} failed: {exc}")
        if not fit:
            self.discard(conn, f"it does not fit target_session_attrs {self.db.target_session_attrs}")
            raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE,
                              f"server {conn.node} is {self.router.state(conn.node).kind}, not what "
                              f"target_session_attrs {self.db.target_session_attrs} asks for",
                              hint="Connect again: the proxy now knows, and sends the next login to another node.")

    def _no_connection_left(self):
        raise ClientFatal(
            pq.SQLSTATE_CONNECTION_FAILURE,
            "no server connection is left for this login (the server closed them, "
            "e.g. it restarted); with auth_type passthrough the proxy cannot log in "
            "without the client: reconnect",
            detail="With auth_type passthrough only a client's own login opens server "
                   "connections (the proxy never learns the password), and all of this "
                   "user's have closed.",
            hint="Reconnect to go on. With auth_type scram-sha-256 (auth_file) or auth_query "
                 "the proxy logs in again by itself and clients wait for the server.")

    def _give_settings(self, key: str, conn: ServerConnection) -> bool:
        """SET what makes ``conn`` this client's session; False (``conn`` closed) if it cannot be.

        A connection carrying a setting that cannot be put back, or that failed
        while being set, is closed; a setting the server refuses ends the client
        with the server's words (the connection is parked: it is unchanged).
        """
        needed = self._needed_settings(conn)
        if needed is None:
            self.pool.discard(key, conn, "it carries a setting that cannot be put back for this client")
            return False
        try:
            conn.apply_settings(needed, self.config.server_connect_timeout)
        except ServerGone as exc:
            self.pool.discard(key, conn, f"applying the client's settings failed: {exc}")
            return False
        except ServerError as exc:
            self.park(conn)
            raise ClientFatal(exc.fields.get("C", pq.SQLSTATE_CONNECTION_FAILURE), str(exc),
                              raw=pq.error_response_from_fields(exc.fields, pq.FATAL)) from None
        return True

    def _wait_timed_out(self, server_down: ServerUnavailable | None) -> ClientFatal:
        """The client's FATAL after query_wait_timeout: the server is down, or every connection was busy."""
        config, db = self.config, self.db
        if server_down is not None:
            return ClientFatal(server_down.sqlstate,
                               f"query_wait_timeout: the server did not accept connections for "
                               f"{config.query_wait_timeout:g} s: {server_down}")
        return ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                           f"query_wait_timeout: no server connection for user \"{self.user}\" "
                           f"database \"{self.dbname}\" became free within "
                           f"{config.query_wait_timeout:g} s (pool_size {db.pool_size})")

    def cancel_wait(self) -> bool:
        """A CancelRequest: end a cancelable wait in ``obtain`` (False if there is none)."""
        return self.cancelable and self.pool.cancel_wait(self.waiter)

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
        """Send the reset query and park ``conn``; the next checkout checks the answer.

        Closed instead where no future client could take it (session mode with
        pass-through auth).

        Where the proxy keeps prepared statements and the reset query is the
        default ``DISCARD ALL``, the reset is ``prepared.RESET_QUERY``: all of
        DISCARD ALL but the deallocation of the proxy's own statements (a
        connection holding none gets the cheaper DISCARD ALL).  Any other reset
        may have dropped them, so the connection forgets them.
        """
        if self.dial is None and self.db.pool_mode == "session":
            # Pass-through auth in session mode: every client logs in on a server
            # connection of its own and never takes a parked one, so parking
            # would only hold a slot and keep the database busy (DROP DATABASE).
            self.discard(conn, "no client can take it (session mode with auth_type passthrough)")
            return
        reset_query = self.config.reset_query
        if conn.statements:
            if self.db.max_prepared_statements and reset_query == DEFAULT_RESET_QUERY:
                reset_query = prepared.RESET_QUERY
            else:
                conn.statements.clear()
        ok = conn.start_reset(reset_query, self.config.server_connect_timeout)
        self.pool.checkin(self.node_keys.get(conn.node, self.key) if self.routed else self.key, conn, reset_ok=ok)

    def discard(self, conn: ServerConnection, reason: str) -> None:
        """Close ``conn`` (its state is unknown or it is broken) and free its slot."""
        self.pool.discard(self.key_of(conn), conn, reason)

