"""Logging clients in, and getting logged-in server connections for them.

Two ways, side by side, by the database entry's ``auth_type``:

  passthrough    ``passthrough_login``: a new server connection is dialed and
                 the client's own exchange with PostgreSQL is relayed over it;
                 PostgreSQL checks the password.
  scram-sha-256, md5, auth_query, trust
                 ``authenticate`` checks the client in the proxy, then
                 ``proxy_login`` opens server connections as that user on the
                 client's behalf whenever the pool has none parked.

The sans-I/O steps live in auth.py (SCRAM and md5, both directions) and
authfile.py (the user list); both logins run through the one login loop,
``ServerConnection.complete_login``, which differs only in who answers the
server's Authentication requests: the client, or the stored secret.

Where a user's secret comes from, by ``auth_type``:

  scram-sha-256  the auth file; always SCRAM (an md5-only entry cannot do SCRAM,
                 so it fails like a wrong password, as in PostgreSQL)
  md5            the auth file; md5 challenge, or SCRAM if only a SCRAM
                 verifier is stored (what PostgreSQL's "md5" method does)
  auth_query     PostgreSQL itself, asked as ``auth_user`` with ``auth_query``;
                 SCRAM or md5 by what is stored; results cached per user
  trust          nothing is checked (loopback clients only)

How the proxy logs in to the server for a client: with the plain password if
the auth file has one, else with the md5 hash, else with the ClientKey the
client proved during SCRAM (SCRAM pass-through, as PgBouncer does; it works
when the server's verifier has the same salt and iterations as the proxy's).
Those credentials are kept in memory per user, never logged.

An unknown user goes through the same exchange as a known one and fails at the
same step; every password failure is answered after the same fixed delay with
PostgreSQL's own 28P01 message, so neither the wording nor the timing tells
whether the user exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import secrets
import struct
import threading
import time

from . import events as events_mod
from . import protocol as pq
from .auth import (
    NO_CREDENTIALS,
    AuthFailed,
    ScramServerExchange,
    ServerCredentials,
    ServerLogin,
    credentials_from_secret,
    md5_server_check,
    parse_sasl_initial_response,
    sasl_mechanisms_payload,
)
from .authfile import AuthFile, AuthFileError, Secret, secret_from_rolpassword
from .backend import ServerConnection
from .channel import ClientChannel
from .config import Config, ConfigError, DatabaseConfig, NodeConfig
from .errors import ClientFatal, ErrorAlreadySent, PoolTimeout, ServerError, ServerGone, ServerUnavailable
from .events import EventHub
from .nodes import Router
from .pool import BackendIdlePool, Limits, pool_key
from . import tls
from .tls import ServerTLS

log = logging.getLogger(__name__)

#: Seconds from the client's last authentication message to the 28P01 answer,
#: whatever the reason (unknown user, wrong password, user without password).
FAILURE_DELAY = 0.3

#: Server connections auth_query may hold open per (node, database).
AUTH_QUERY_POOL_SIZE = 2


@dataclasses.dataclass(frozen=True)
class LoginRequest:
    """Who is logging in, from where, to which database entry: everything a login needs."""

    user: str
    database: str             # the name the client asked for
    db: DatabaseConfig        # the entry that name resolved to
    key: str                  # the pool key: node, user, server-side database name
    address: tuple            # the client's (host, port)
    replication: str = ""     # "physical" or "logical": a replication connection (no pool slot)

    @property
    def who(self) -> str:
        return f"{self.user}@{self.database} from {self.address[0]}:{self.address[1]}"


def is_loopback(address) -> bool:
    try:
        ip = ipaddress.ip_address(address[0])
    except (ValueError, TypeError, IndexError):
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class Logins:
    """Authenticates clients and opens logged-in server connections for them.

    For callers: ``passthrough_login``; ``authenticate`` then ``proxy_login``;
    ``reload``.  Counters for tests and logs: ``server_logins`` (server
    connections the proxy opened for clients), ``server_login_failures``,
    ``auth_queries`` (auth_query round trips).
    """

    failure_delay = FAILURE_DELAY

    def __init__(self, config: Config, pool: BackendIdlePool, server_tls: ServerTLS | None = None,
                 router: Router | None = None) -> None:
        self.config = config
        self.pool = pool
        self.router = router
        self.server_tls = server_tls       # replaced on RELOAD
        self._lock = threading.Lock()
        self._credentials: dict[str, ServerCredentials] = {}   # user -> how to log in for them
        self._query_cache: dict[tuple[str, str], tuple[Secret | None, float]] = {}
        self.server_logins = 0
        self.server_login_failures = 0
        self.events: EventHub | None = None    # the server's: told of each server connection opened and closed
        self.auth_queries = 0
        self.auth_file: AuthFile | None = None
        if config.auth_file:
            try:
                self.auth_file = AuthFile(config.auth_file)
            except AuthFileError as exc:
                raise ConfigError(f"auth_file: {exc}") from None
            log.info("auth file %s: %d users", config.auth_file, len(self.auth_file))
        self.salt_key = _salt_key(config, self.auth_file)
        types = {config.auth_type} | {d.auth_type for d in config.databases.values()}
        if "trust" in types:
            log.warning("auth_type trust: clients from loopback addresses log in without a password")

    def reload(self) -> int:
        """Re-read the auth file (SIGHUP) and forget cached auth_query results.

        On error the old contents stay and AuthFileError is raised.  Users no
        longer in the file lose their stored server credentials.
        """
        with self._lock:
            self._query_cache.clear()
        if self.auth_file is None:
            return 0
        count = self.auth_file.reload()
        with self._lock:
            for user in [u for u in self._credentials if u not in self.auth_file]:
                del self._credentials[user]
        return count

    def reconfigure(self, config: Config) -> None:
        """RELOAD: take a new configuration, and re-read (or switch to) its auth file.

        Everything that can fail happens before anything changes: on
        ConfigError (a bad auth file) the old configuration and users stay.
        """
        auth_file = self.auth_file
        if config.auth_file != self.config.auth_file:
            try:
                auth_file = AuthFile(config.auth_file) if config.auth_file else None
            except AuthFileError as exc:
                raise ConfigError(f"auth_file: {exc}") from None
        elif auth_file is not None:
            try:
                auth_file.reload()
            except AuthFileError as exc:
                raise ConfigError(f"auth_file: {exc}") from None
        with self._lock:
            self.config = config
            self.auth_file = auth_file
            self._query_cache.clear()
            self._credentials = {u: c for u, c in self._credentials.items() if auth_file is None or u in auth_file}

    # -- pass-through: PostgreSQL checks the client --------------------------------

    def passthrough_login(self, channel: ClientChannel, request: LoginRequest, startup: dict) -> ServerConnection:
        """Dial a new server connection and relay the client's authentication over it (``_passthrough``).

        An entry with several nodes logs in on the node ``load_balance``
        chooses; a node that refuses the connection (or says it is starting
        up or shutting down) before anything reached the client is marked down
        at once and the next node is tried.
        """
        db = request.db
        if self.router is None or not db.multi:
            return self._passthrough(channel, request, startup, None, request.key)
        tried: set = set()
        dbname = db.server_dbname(request.database)
        router = self.router
        open_count = lambda n: self.pool.open_count(pool_key(n.name, request.user, dbname))   # noqa: E731
        while True:
            node = router.for_dial(db, open_count)
            if node is None or node.name in tried:
                # Every node is down: try the first once (it may be back), as a single server would be.
                node = None if tried else router.fallback(db)
            if node is None:
                raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT,
                                  f"threadpool_proxy: no server of database \"{request.database}\" accepts "
                                  f"connections ({router.misfits(db)}; refused now: "
                                  f"{', '.join(sorted(tried)) or 'none'})")
            key = pool_key(node.name, request.user, dbname)
            try:
                conn = self._passthrough(channel, request, startup, node, key)
                self.pool.dial_succeeded(key)
                return conn
            except _NodeRefused as exc:
                tried.add(node.name)
                self.pool.dial_failed(key, self.config.server_login_retry, exc.error, elsewhere=True)

    def _passthrough(self, channel: ClientChannel, request: LoginRequest, startup: dict,
                     node: NodeConfig | None, key: str) -> ServerConnection:
        """Dial ``node`` and relay the client's authentication over it.

        The proxy only carries the Authentication requests and the client's
        answers.  Until the server accepts the client (AuthenticationOk) the
        login is *pending*: it holds one of the key's ``max_pending_logins``
        places, not a pool_size slot, so it cannot take anything from
        authenticated clients, and it must get there within
        ``pending_login_timeout``.  Then it moves into a pool_size slot (closing
        a parked connection of the key, or waiting, when the key is full).
        ``startup`` is the server's StartupMessage parameters.  Returns after
        the server's ReadyForQuery.  With a ``node`` (several nodes), a refusal
        before anything reached the client raises _NodeRefused.

        A replication login (``request.replication``) takes no slot: once
        accepted it gives its pending place back and belongs to its client alone.
        """
        db, config, pool = request.db, self.config, self.pool
        try:
            pool.acquire_pending(key, config.max_pending_logins, channel.remaining())
        except PoolTimeout:
            raise ClientFatal(pq.SQLSTATE_TOO_MANY_CONNECTIONS,
                              f"too many logins of user \"{request.user}\" are in progress "
                              f"(max_pending_logins {config.max_pending_logins}); try again",
                              hint="Logins that have not finished authenticating are limited per user "
                                   "and database.") from None
        channel.shorten(time.monotonic() + config.pending_login_timeout, "pending_login_timeout")
        promoted = False
        unslotted = False              # an accepted replication login: outside the pool
        dialed = []
        relayed = []

        def release(conn: ServerConnection | None, reason: str) -> None:
            if promoted:
                pool.give_back(key, conn, reason)
            elif unslotted:
                if conn is not None:
                    conn.close(reason)
            else:
                pool.give_back_pending(key, conn, reason)

        def relay_request(code: int, body: bytes) -> bytes | None:
            nonlocal promoted, unslotted
            relayed.append(code)
            if code == pq.AUTH_OK and request.replication:
                pool.give_back_pending(key, None, "")     # accepted: its place is free, and no slot taken
                unslotted = True
            elif code == pq.AUTH_OK:
                # PostgreSQL accepted the client: from here on the login is an
                # authenticated connection like any other, in a pool_size slot.
                try:
                    pool.promote(key, db.pool_size, config.query_wait_timeout, Limits.of(config, db))
                except PoolTimeout:
                    raise ClientFatal(pq.SQLSTATE_TOO_MANY_CONNECTIONS,
                                      f"query_wait_timeout: no server connection slot for user "
                                      f"\"{request.user}\" became free within {config.query_wait_timeout:g} s "
                                      f"(pool_size {db.pool_size})") from None
                promoted = True
            elif code == pq.AUTH_SASL:
                body = self._sasl_offer_for(channel, dialed[0], body)
            channel.send(pq.message(pq.AUTHENTICATION, body))
            if code in pq.AUTH_NEEDS_ANSWER:
                return pq.password_message(channel.read_password_message(
                    "SASL" if code in (pq.AUTH_SASL, pq.AUTH_SASL_CONTINUE) else "password"))
            if code not in (pq.AUTH_OK, pq.AUTH_SASL_FINAL):
                raise ClientFatal(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                                  f"the server asked for authentication method {code}, "
                                  f"which threadpool_proxy cannot relay")
            return None

        try:
            return self._open(db, startup, relay_request, channel.deadline, release, on_notice=channel.send,
                              ready_timeout=config.server_connect_timeout, on_dial=dialed.append, node=node)
        except ServerError as exc:
            if node is not None and not relayed and exc.fields.get("C") in _SERVER_DOWN_STATES:
                raise _NodeRefused(_login_failed(request.user, node.name, exc)) from None
            channel.send_quietly(exc.raw)        # PostgreSQL's own words: wrong password, no such role...
            raise ErrorAlreadySent() from None
        except ServerGone as exc:
            if node is not None and not relayed:
                raise _NodeRefused(ServerUnavailable(pq.SQLSTATE_CANNOT_CONNECT, f"threadpool_proxy: {exc}")) from None
            raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT, f"threadpool_proxy: {exc}") from None

    def _sasl_offer_for(self, channel: ClientChannel, conn: ServerConnection, body: bytes) -> bytes:
        """The server's SASL mechanisms as a pass-through client may see them.

        SCRAM-SHA-256-PLUS binds to the certificate of the server end of the
        client's TLS connection, which is the proxy's: it is kept only when the
        client talks TLS and the proxy's certificate is the server's own (the
        same hash), else the client would fail PostgreSQL's binding check (or,
        over plain text, libpq refuses the offer outright).
        """
        mechanisms = [m for m in bytes(body[4:]).split(b"\0") if m]
        if not any(m.endswith(b"-PLUS") for m in mechanisms):
            return body
        ours = channel.end_point_hash
        if (ours is not None and conn.tls
                and tls.certificate_end_point_hash(conn.sock.getpeercert(binary_form=True)) == ours):
            return body
        kept = [m.decode("ascii", "replace") for m in mechanisms if not m.endswith(b"-PLUS")]
        return bytes(body[:4]) + sasl_mechanisms_payload(kept)

    # -- proxy-terminated: the proxy checks the client -----------------------------

    def authenticate(self, channel: ClientChannel, request: LoginRequest) -> None:
        """Check the client's password; return after AuthenticationOk, else raise ClientFatal."""
        auth_type, user = request.db.auth_type, request.user
        if auth_type == "trust":
            if not is_loopback(request.address):
                raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION,
                                  f'auth_type trust refuses user "{user}" from {request.address[0]}: '
                                  f"only loopback clients may log in without a password")
            channel.send(pq.AUTHENTICATION_OK)
            creds = credentials_from_secret(self._file_secret(user))
            if creds is not NO_CREDENTIALS:
                self._remember(user, creds)
            return
        if auth_type == "auth_query":
            secret = self._query_secret(request)
            use_scram = secret is None or secret.kind == "scram"
        else:
            secret = self._file_secret(user)
            if auth_type == "md5":
                use_scram = secret is not None and secret.kind == "scram"
            else:
                use_scram = True
                if secret is not None and secret.kind == "md5":
                    secret = None    # no SCRAM from an md5 hash: fails like PostgreSQL's mock exchange
        if use_scram:
            self._scram(channel, request, secret)
        else:
            self._md5(channel, request, secret)

    def _file_secret(self, user: str) -> Secret | None:
        return self.auth_file.lookup(user) if self.auth_file is not None else None

    def _scram(self, channel: ClientChannel, request: LoginRequest, secret: Secret | None) -> None:
        user = request.user
        verifier = None
        if secret is not None:
            verifier = secret if secret.kind == "scram" else (
                self.auth_file.scram_secret(user) if secret.kind == "password" and self.auth_file else None)
        # SCRAM-SHA-256-PLUS over TLS: bound to the proxy's own certificate.
        binding = channel.end_point_hash
        exchange = (ScramServerExchange(verifier, user, channel_binding=binding) if verifier is not None
                    else ScramServerExchange.for_unknown_user(user, key=self.salt_key, channel_binding=binding))
        channel.send(pq.authentication(pq.AUTH_SASL, sasl_mechanisms_payload(exchange.mechanisms())))
        answered = time.monotonic()
        try:
            body = channel.read_password_message("SASL")
            mechanism, client_first = parse_sasl_initial_response(body)
            server_first = exchange.handle_client_first(client_first, mechanism)
            channel.send(pq.authentication(pq.AUTH_SASL_CONTINUE, server_first))
            body = channel.read_password_message("SASL")
            answered = time.monotonic()
            server_final = exchange.handle_client_final(body)
        except AuthFailed as exc:
            if exc.sqlstate == pq.SQLSTATE_INVALID_PASSWORD:
                self._reject(request, str(exc), answered)
            log.info("client %s: SCRAM protocol violation: %s", request.who, exc)
            raise ClientFatal(exc.sqlstate, str(exc)) from None
        if secret.kind == "scram":
            creds = ServerCredentials(client_key=exchange.client_key, scram_secret=verifier)
        else:
            creds = credentials_from_secret(secret)
        self._remember(user, creds)
        channel.send(pq.authentication(pq.AUTH_SASL_FINAL, server_final) + pq.AUTHENTICATION_OK)

    def _md5(self, channel: ClientChannel, request: LoginRequest, secret: Secret | None) -> None:
        salt = secrets.token_bytes(4)
        channel.send(pq.authentication(pq.AUTH_MD5_PASSWORD, salt))
        body = channel.read_password_message("password")
        answered = time.monotonic()
        if secret is None:
            self._reject(request, "user is unknown or has no password", answered)
        if not md5_server_check(secret, request.user, salt, body):
            self._reject(request, "md5 answer is wrong (wrong password)", answered)
        self._remember(request.user, credentials_from_secret(secret))
        channel.send(pq.AUTHENTICATION_OK)

    def _reject(self, request: LoginRequest, reason: str, since: float):
        """Answer a failed password check, always the same way and after the same delay."""
        log.info("client %s: password authentication failed: %s", request.who, reason)
        wait = self.failure_delay - (time.monotonic() - since)
        if wait > 0:
            time.sleep(wait)
        raise ClientFatal(pq.SQLSTATE_INVALID_PASSWORD,
                          f'password authentication failed for user "{request.user}"')

    def _remember(self, user: str, creds: ServerCredentials) -> None:
        with self._lock:
            self._credentials[user] = creds

    def credentials_for(self, user: str) -> ServerCredentials:
        with self._lock:
            return self._credentials.get(user, NO_CREDENTIALS)

    def replication_login(self, channel: ClientChannel, request: LoginRequest, startup: dict) -> ServerConnection:
        """A replication connection for a client the proxy authenticated: no ``pool_size`` slot.

        While it logs in it holds one of the key's ``max_pending_logins`` places,
        as a pass-through login does (so PAUSE holds it too, and a burst of them
        is bounded); the server's refusal reaches the client in its own words.
        """
        config = self.config
        try:
            self.pool.acquire_pending(request.key, config.max_pending_logins, channel.remaining())
        except PoolTimeout:
            raise ClientFatal(pq.SQLSTATE_TOO_MANY_CONNECTIONS,
                              f"too many logins of user \"{request.user}\" are in progress "
                              f"(max_pending_logins {config.max_pending_logins}); try again") from None
        try:
            return self.proxy_login(request, startup, slot=False)
        finally:
            self.pool.give_back_pending(request.key, None, "")

    def proxy_login(self, request: LoginRequest, startup: dict, node: NodeConfig | None = None,
                    key: str | None = None, slot: bool = True) -> ServerConnection:
        """A new server connection for an authenticated client, logged in as its user.

        Called with a pool_size slot of ``key`` (default: the request's) already
        taken; on failure the slot is given back and ClientFatal raised.
        ``node`` is the server (default: the entry's first).  ``slot=False``: a
        connection that holds none (a replication connection); a failure only
        closes what was opened, and the server's refusal is passed on as it is.
        """
        user, db = request.user, request.db
        node = node or db.nodes[0]
        creds = self.credentials_for(user)
        timeout = self.config.server_connect_timeout
        key = key or request.key
        if slot:
            def release(conn, reason):
                self.pool.give_back(key, conn, reason)
        else:
            def release(conn, reason):
                if conn is not None:
                    conn.close(reason)
        try:
            conn = self._open(db, startup, _answer_from(creds.login(user), user), time.monotonic() + timeout,
                              release, node=node)
        except (ServerError, AuthFailed, ServerGone) as exc:
            with self._lock:
                self.server_login_failures += 1
            if not slot and isinstance(exc, ServerError):
                # A replication login fails for reasons of its own (no REPLICATION
                # role, no pg_hba.conf line for replication): PostgreSQL's words.
                f = exc.fields
                raise ClientFatal(f.get("C", pq.SQLSTATE_CONNECTION_FAILURE), f.get("M", "server error"),
                                  f.get("D"), f.get("H"), raw=pq.error_response_from_fields(f, pq.FATAL)) from None
            raise _login_failed(user, node.name, exc) from None
        with self._lock:
            self.server_logins += 1
        log.debug("logged in to %s as %s (pid %d, %s)", node.name, user, conn.pid, creds.kind)
        return conn

    def _open(self, db: DatabaseConfig, startup: dict, answer_auth, deadline: float, release,
              on_notice=None, ready_timeout: float | None = None, on_dial=None,
              node: NodeConfig | None = None, for_client: bool = True) -> ServerConnection:
        """Dial ``node`` (default: ``db``'s first server) and log in; on any failure
        ``release(conn or None, reason)`` closes what was opened and gives back the place
        the login held.  ``on_dial(conn)`` sees the connection before the login starts.
        A connection ``for_client`` (not auth_query's) is told to ``events``: opened now, closed later."""
        conn = None
        node = node or db.nodes[0]
        try:
            conn = ServerConnection.dial(node.host, node.port, self.config.server_connect_timeout, self.server_tls)
            if on_dial is not None:
                on_dial(conn)
            conn.complete_login(pq.startup_message(startup), answer_auth, deadline, on_notice, ready_timeout)
        except BaseException as exc:
            release(conn, f"the login failed: {exc}")
            raise
        events = self.events
        if for_client and events is not None:
            database, user = startup.get("database", ""), startup.get("user", "")
            conn.observe(events, database, user)
            if events.active:
                events.emit(events_mod.SERVER_OPEN, database=database, user=user, server_id=conn.serial,
                            server_pid=conn.pid, detail=node.name)
        return conn

    # -- auth_query --------------------------------------------------------------

    def _query_secret(self, request: LoginRequest) -> Secret | None:
        """The user's secret as PostgreSQL stores it, from the cache or auth_query."""
        db, user = request.db, request.user
        cache_key = (db.node, user)
        ttl = self.config.auth_query_cache_seconds
        now = time.monotonic()
        with self._lock:
            hit = self._query_cache.get(cache_key)
        if hit is not None and hit[1] > now:
            return hit[0]
        secret = self._run_auth_query(db, db.server_dbname(request.database), user)
        if ttl > 0:
            with self._lock:
                self._query_cache[cache_key] = (secret, now + ttl)
        return secret

    def _run_auth_query(self, db: DatabaseConfig, dbname: str, user: str) -> Secret | None:
        """Run auth_query for ``user`` on a dedicated server connection of auth_user.

        Those connections are parked in the proxy's pool under their own key
        (never a client's), so the janitor and shutdown close them like any other.
        """
        config, pool = self.config, self.pool
        auth_user = config.auth_user
        node = db.nodes[0]
        if self.router is not None and db.multi:
            up = self.router.candidates(db)          # several servers: one that is up (any holds pg_shadow)
            node = up[0] if up else node
        key = pool_key(node.name, auth_user, dbname) + "\0auth_query"
        timeout = config.server_connect_timeout
        try:
            conn = pool.acquire(key, AUTH_QUERY_POOL_SIZE, timeout)
        except PoolTimeout:
            raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT,
                              "threadpool_proxy: no auth_query connection became free in time") from None
        rows: list[list[bytes | None]] = []

        def on_message(t, body):
            if t == pq.DATA_ROW:
                rows.append(pq.parse_data_row(body))

        try:
            if conn is None:
                params = {"user": auth_user, "database": dbname, "application_name": "threadpool_proxy auth_query"}
                conn = self._open(db, params, _answer_from(self._auth_user_credentials().login(auth_user),
                                                           auth_user), time.monotonic() + timeout,
                                  lambda conn, reason: pool.give_back(key, conn, reason), node=node,
                                  for_client=False)
            conn.send(pq.extended_query(config.auth_query, [user]))
            status = conn.read_until_ready(timeout, on_message=on_message)
        except BaseException as exc:
            if conn is not None:          # (a failed login gave its slot back already)
                pool.discard(key, conn, f"auth_query failed: {exc}")
            if not isinstance(exc, (ServerError, AuthFailed, ServerGone, pq.ProtocolError, struct.error)):
                raise
            log.error("auth_query as %s on %s/%s failed: %s", auth_user, node.name, dbname, exc)
            raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT,
                              f"threadpool_proxy could not look up the user with auth_query: {exc}") from None
        pool.checkin(key, conn, reset_ok=status == pq.IDLE)
        with self._lock:
            self.auth_queries += 1
        if not rows or len(rows[0]) < 2 or rows[0][1] is None:
            return None            # unknown user or no password: fails like a wrong password
        try:
            return secret_from_rolpassword(rows[0][1].decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("auth_query: the stored password of user %r is unusable: %s", user, exc)
            return None

    # -- health checks -------------------------------------------------------------

    def health_check_user(self) -> str | None:
        """The user health checks log in as: ``health_check_user``, else ``auth_user``; None: TCP checks only."""
        return self.config.health_check_user or self.config.auth_user

    def health_check_login(self, node: NodeConfig, dbname: str, timeout: float) -> ServerConnection:
        """A dedicated server connection of the health-check user to ``node`` (raises on failure).

        Its secret: ``auth_password`` for ``auth_user``, else the auth file's
        plain password or md5 hash, else what the user's own last login to the
        proxy proved (SCRAM pass-through); with none, the server must trust it.
        """
        user = self.health_check_user()
        creds = NO_CREDENTIALS
        if user == self.config.auth_user and self.config.auth_password is not None:
            creds = ServerCredentials(password=self.config.auth_password)
        if creds is NO_CREDENTIALS:
            creds = credentials_from_secret(self._file_secret(user))
        if creds is NO_CREDENTIALS:
            creds = self.credentials_for(user)
        conn = ServerConnection.dial(node.host, node.port, timeout, self.server_tls)
        try:
            params = {"user": user, "database": dbname, "application_name": "threadpool_proxy health check"}
            conn.complete_login(pq.startup_message(params), _answer_from(creds.login(user), user),
                                time.monotonic() + timeout, None, timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def _auth_user_credentials(self) -> ServerCredentials:
        config = self.config
        if config.auth_password is not None:
            return ServerCredentials(password=config.auth_password)
        return credentials_from_secret(self._file_secret(config.auth_user))


class _NodeRefused(Exception):
    """A node refused a pass-through login before the client saw anything: try another node."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _salt_key(config: Config, auth_file: AuthFile | None) -> bytes | None:
    """The key of unknown users' fake SCRAM salts: a secret that outlives a restart.

    The auth file's (its contents at start-up), else one derived from
    ``auth_password`` (auth_query without an auth file); None (a per-process
    key) when the configuration holds no secret at all.
    """
    if auth_file is not None:
        return auth_file.salt_key
    if config.auth_password:
        return hmac.new(b"threadpool_proxy salt key", config.auth_password.encode("utf-8"),
                        hashlib.sha256).digest()
    return None


def _answer_from(login: ServerLogin | None, user: str):
    """``answer_auth`` for ServerConnection.complete_login, answering from stored credentials."""
    def answer(code: int, body: bytes) -> bytes | None:
        if login is not None:
            return login.answer(code, body[4:])
        if code == pq.AUTH_OK:
            return None
        raise AuthFailed(f"the server asks for a password (authentication request {code}), "
                         f"but the proxy holds none for user {user!r}", pq.SQLSTATE_INVALID_AUTHORIZATION)
    return answer


#: Errors of a server that is starting up, shutting down or restarting: a login may work later.
_SERVER_DOWN_STATES = (pq.SQLSTATE_ADMIN_SHUTDOWN, pq.SQLSTATE_CRASH_SHUTDOWN, pq.SQLSTATE_CANNOT_CONNECT_NOW)


def _login_failed(user: str, node: str, exc: Exception) -> ClientFatal:
    """The client's FATAL when the proxy could not log in to the server for it."""
    if isinstance(exc, ServerError):
        f = exc.fields
        code = f.get("C", pq.SQLSTATE_CONNECTION_FAILURE)
        if code.startswith("28"):
            log.warning("server %s refused the proxy's login as %s: %s", node, user, exc)
            return ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION,
                               f'threadpool_proxy could not log in to the server for user "{user}": '
                               f'{f.get("M", "authentication failed")}',
                               hint="The server's password for this user differs from the proxy's auth file.")
        if code in _SERVER_DOWN_STATES:
            return ServerUnavailable(code, f"server {node} is not accepting connections: {f.get('M', '')}")
        # Anything else (no such database, too many connections...) as PostgreSQL said it.
        return ClientFatal(code, f.get("M", "server error"), f.get("D"), f.get("H"))
    if isinstance(exc, AuthFailed):
        log.warning("cannot log in to %s as %s: %s", node, user, exc)
        return ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION,
                           f'threadpool_proxy could not log in to the server for user "{user}": {exc}')
    return ServerUnavailable(pq.SQLSTATE_CANNOT_CONNECT, f"threadpool_proxy: {exc}")
