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
  auth_query     PostgreSQL itself, asked as ``auth_user`` with ``auth_query``
                 in one fixed database (``config.auth_database``), its
                 search_path pinned; SCRAM or md5 by what is stored; results
                 cached per (server, that database, user), bounded (authcache.py)
  trust          nothing is checked (loopback clients only)

How the proxy logs in to the server for a client: with the plain password if
the auth file has one, else with the md5 hash, else with the ClientKey the
client proved during SCRAM (SCRAM pass-through, as PgBouncer does; it works
when the server's verifier has the same salt and iterations as the proxy's).
Those credentials are kept in memory per user, never logged.  What the server
may ask for them is ``server_auth_rule``'s (``server_require_auth``, libpq's
``require_auth``): by default a SCRAM verifier logs in only by SCRAM, so a
server that asks for a cleartext or md5 password, or says AuthenticationOk at
once, gets nothing (see docs/security-wire.md).

An unknown user goes through the same exchange as a known one and fails at the
same step; every password failure is answered after the same fixed delay with
PostgreSQL's own 28P01 message, so neither the wording nor the timing tells
whether the user exists.  Which exchange that is does not depend on it either:
an unknown user gets what most known users get (``_typical``: the method, and
the SCRAM iteration count; the fake salt is an HMAC of the name).  Whatever
makes a login fail before the client is in (a wrong password, an unknown
user, an auth_query that failed, a server that cannot be reached), the client
learns no address, database or role the proxy uses: the reason goes to the
proxy's log, rate-limited.
"""

from __future__ import annotations

import collections
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
    ServerAuthRule,
    ServerCredentials,
    ServerLogin,
    credentials_from_secret,
    md5_server_check,
    parse_sasl_initial_response,
    sasl_mechanisms_payload,
)
from .authcache import MISS, VerifierCache
from .authfile import DEFAULT_ITERATIONS, AuthFile, AuthFileError, Secret, check_password, secret_from_rolpassword
from .backend import ServerConnection
from .channel import ClientChannel
from .config import (SERVER_AUTH_METHODS, Config, ConfigError, DatabaseConfig, NodeConfig, auth_database,
                     parse_require_auth)
from .errors import (ClientFatal, ErrorAlreadySent, PoolTimeout, ServerError, ServerGone, ServerUnavailable,
                     TooManyPending)
from . import hba as hba_mod
from .hba_login import check_cert, hba_method
from .listeners import UNIX_HOST
from .events import EventHub
from .nodes import Router
from .pool import BackendIdlePool, Limits, pool_key
from . import tls
from .tls import ServerTLS
from .logs import JunkLog, get_logger

log = get_logger(__name__)

#: Seconds from the client's last authentication message to the 28P01 answer,
#: whatever the reason (unknown user, wrong password, user without password).
FAILURE_DELAY = 0.3

#: Server connections auth_query may hold open per (node, database).
AUTH_QUERY_POOL_SIZE = 2

#: The auth_user's session resolves names in pg_catalog (then its own pg_temp) only.  Sent in
#: its StartupMessage: PostgreSQL applies startup options with a priority above ALTER DATABASE
#: and ALTER ROLE ... SET, so nothing a database's owner sets can move it.
AUTH_QUERY_OPTIONS = "-c search_path=pg_catalog,pg_temp"

#: Distinct (method, iteration count) pairs of fetched verifiers tallied for ``_typical``.
_TALLY_LIMIT = 32

#: What a pass-through client is told when the server cannot be reached (the address only in the log).
_SERVER_UNREACHABLE = "threadpool_proxy: could not connect to the server; try again later"


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

    @property
    def server_user(self) -> str:
        """The user server connections log in as: the entry's forced ``user``, else the client's."""
        return self.db.server_user(self.user)


def is_loopback(address) -> bool:
    """Whether a client is on this machine: a loopback address, or the unix socket."""
    if address and address[0] == UNIX_HOST:
        return True
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
                 router: Router | None = None, junk_log=None) -> None:
        self.config = config
        self.pool = pool
        self.router = router
        self.server_tls = server_tls       # replaced on RELOAD
        self._lock = threading.Lock()
        self._credentials: dict[str, ServerCredentials] = {}   # user -> how to log in for them
        self._query_cache = VerifierCache(config.auth_query_cache_seconds, config.auth_query_cache_size)
        # (method, iterations) of the verifiers auth_query fetched: what its unknown users look like.
        self._fetched: collections.Counter = collections.Counter()
        self.server_logins = 0
        self.server_login_failures = 0
        self.events: EventHub | None = None    # the server's: told of each server connection opened and closed
        self.auth_queries = 0
        # Lines about logins that failed, rate-limited: the server's JunkLog, or one of our own.
        self.junk_log = junk_log if junk_log is not None else JunkLog(log)
        self.auth_file: AuthFile | None = None
        if config.auth_file:
            try:
                self.auth_file = AuthFile(config.auth_file)
            except AuthFileError as exc:
                raise ConfigError(f"auth_file: {exc}") from None
            log.info("auth file %s: %d users", config.auth_file, len(self.auth_file))
        self.salt_key = _salt_key(config, self.auth_file)
        self.hba = hba_mod.load(config.auth_hba_file, config.auth_ident_file) if config.auth_hba_file else None
        types = {config.auth_type} | {d.auth_type for d in config.databases.values()}
        if "trust" in types:
            log.warning("auth_type trust: clients from loopback addresses log in without a password")

    def reload(self) -> int:
        """Re-read the auth file (SIGHUP) and forget cached auth_query results.

        On error the old contents stay and AuthFileError is raised.  Users no
        longer in the file lose their stored server credentials.
        """
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
        hba = hba_mod.load(config.auth_hba_file, config.auth_ident_file) if config.auth_hba_file else None
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
            self.hba = hba
            self._query_cache = VerifierCache(config.auth_query_cache_seconds, config.auth_query_cache_size)
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
                self._log_refusal("pass-through logins with no server", logging.WARNING,
                                  "client %s: no server accepts connections (%s; refused now: %s)",
                                  request.who, router.misfits(db), ", ".join(sorted(tried)) or "none")
                raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT,
                                  f"threadpool_proxy: no server of database \"{request.database}\" accepts "
                                  f"connections now; try again later")
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
        self._take_pending(request, key, channel)
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
            self._log_refusal("pass-through logins that lost the server", logging.WARNING,
                              "client %s: pass-through login failed: %s", request.who, exc)
            raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT, _SERVER_UNREACHABLE) from None

    def _take_pending(self, request: LoginRequest, key: str, channel: ClientChannel) -> None:
        """One of the places of logins still authenticating with the server (per key, and in all)."""
        config = self.config
        try:
            self.pool.acquire_pending(key, config.max_pending_logins, channel.remaining(),
                                      config.max_pending_logins_total)
        except PoolTimeout:
            raise ClientFatal(pq.SQLSTATE_TOO_MANY_CONNECTIONS,
                              f"too many logins of user \"{request.user}\" are in progress "
                              f"(max_pending_logins {config.max_pending_logins}); try again",
                              hint="Logins that have not finished authenticating are limited per user "
                                   "and database.") from None
        except TooManyPending:
            self._log_refusal("logins refused by max_pending_logins_total", logging.WARNING,
                              "client %s: refused: %d logins are already authenticating "
                              "(max_pending_logins_total)", request.who, config.max_pending_logins_total)
            raise ClientFatal(pq.SQLSTATE_TOO_MANY_CONNECTIONS,
                              f"too many logins are in progress (max_pending_logins_total "
                              f"{config.max_pending_logins_total}); try again",
                              hint="Logins that have not finished authenticating with the server are "
                                   "limited in all.") from None

    def _log_refusal(self, kind: str, level: int, msg: str, *args) -> None:
        """Log why a login failed, at most one line per ``kind`` and interval (the junk log)."""
        self.junk_log.log(kind, msg, *args, level=level)

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
        if auth_type in ("hba", "cert"):    # [dropin] the method of auth_hba_file's line (hba_login.py)
            auth_type = (hba_method(self.hba, channel.sock, request) if auth_type == "hba"
                         else check_cert(channel.sock, request, None, None))
            if auth_type is None:           # trust, peer or cert let the client in
                self._accept_without_password(channel, user)
                return
        if auth_type == "trust":
            if not is_loopback(request.address):
                raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION,
                                  f'auth_type trust refuses user "{user}" from {request.address[0]}: '
                                  f"only loopback clients may log in without a password")
            self._accept_without_password(channel, user)
            return
        if auth_type == "password":         # [dropin] PgBouncer's plain: the password in clear text
            self._password(channel, request, self._file_secret(user))
            return
        # Which exchange: what the stored secret allows; where it allows both
        # (a plain password) or there is none (an unknown user), what most
        # users get, so that the challenge does not tell whether a user exists.
        typical_method, iterations = self._typical(auth_type)
        if auth_type == "auth_query":
            secret = self._query_secret(request)
            use_scram = typical_method == "scram" if secret is None else secret.kind == "scram"
        else:
            secret = self._file_secret(user)
            if auth_type == "md5":
                kind = secret.kind if secret is not None else None
                use_scram = kind == "scram" or (kind != "md5" and typical_method == "scram")
            else:
                use_scram = True
                if secret is not None and secret.kind == "md5":
                    secret = None    # no SCRAM from an md5 hash: fails like PostgreSQL's mock exchange
        if use_scram:
            self._scram(channel, request, secret, iterations)
        else:
            self._md5(channel, request, secret)

    def _typical(self, auth_type: str) -> tuple[str, int]:
        """("scram" or "md5", SCRAM iteration count) most known users get: how an unknown user looks.

        The auth file's (authfile.typical_secret); for auth_query, the
        verifiers it has fetched so far (SCRAM and 4096 before any).
        """
        if auth_type != "auth_query" and self.auth_file is not None:
            return self.auth_file.typical_method, self.auth_file.typical_iterations
        with self._lock:
            fetched = list(self._fetched.items())
        scram = collections.Counter()
        md5 = 0
        for (method, iterations), n in fetched:
            if method == "scram":
                scram[iterations] += n
            else:
                md5 += n
        iterations = max(scram, key=lambda i: (scram[i], i)) if scram else DEFAULT_ITERATIONS
        return ("md5" if md5 > sum(scram.values()) else "scram"), iterations

    def _accept_without_password(self, channel: ClientChannel, user: str) -> None:
        """AuthenticationOk with no password asked; the server login uses the auth file's secret, if any."""
        channel.send(pq.AUTHENTICATION_OK)
        creds = credentials_from_secret(self._file_secret(user))
        if creds is not NO_CREDENTIALS:
            self._remember(user, creds)

    def _file_secret(self, user: str) -> Secret | None:
        return self.auth_file.lookup(user) if self.auth_file is not None else None

    def _scram(self, channel: ClientChannel, request: LoginRequest, secret: Secret | None,
              iterations: int = DEFAULT_ITERATIONS) -> None:
        user = request.user
        verifier = None
        if secret is not None:
            verifier = secret if secret.kind == "scram" else (
                self.auth_file.scram_secret(user) if secret.kind == "password" and self.auth_file else None)
        # SCRAM-SHA-256-PLUS over TLS: bound to the proxy's own certificate.
        binding = channel.end_point_hash
        exchange = (ScramServerExchange(verifier, user, channel_binding=binding) if verifier is not None
                    else ScramServerExchange.for_unknown_user(user, iterations, key=self.salt_key,
                                                              channel_binding=binding))
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
            self.junk_log.log("SCRAM protocol violations", "client %s: SCRAM protocol violation: %s",
                              request.who, exc)
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

    def _password(self, channel: ClientChannel, request: LoginRequest, secret: Secret | None) -> None:
        """Clear-text password: checked against any kind of stored secret; then the proxy logs in with it."""
        channel.send(pq.authentication(pq.AUTH_CLEARTEXT_PASSWORD))
        body = bytes(channel.read_password_message("password"))
        answered = time.monotonic()
        password = body[:-1] if body.endswith(b"\0") else body
        try:
            text = password.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if secret is None or text is None or not check_password(secret, request.user, text):
            self._reject(request, "user is unknown or the password is wrong", answered)
        self._remember(request.user, ServerCredentials(password=text))
        channel.send(pq.AUTHENTICATION_OK)

    def _reject(self, request: LoginRequest, reason: str, since: float):
        """Answer a failed password check, always the same way and after the same delay."""
        self._log_refusal("failed password checks", logging.INFO,
                          "client %s: password authentication failed: %s", request.who, reason)
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

    def forced_credentials(self, db: DatabaseConfig) -> ServerCredentials:
        """How to log in as an entry's forced user: its ``password``, else the auth file's plain or md5 secret."""
        if db.password is not None:
            return ServerCredentials(password=db.password)
        return credentials_from_secret(self._file_secret(db.user))

    def replication_login(self, channel: ClientChannel, request: LoginRequest, startup: dict) -> ServerConnection:
        """A replication connection for a client the proxy authenticated: no ``pool_size`` slot.

        While it logs in it holds one of the key's ``max_pending_logins`` places,
        as a pass-through login does (so PAUSE holds it too, and a burst of them
        is bounded); the server's refusal reaches the client in its own words.
        """
        self._take_pending(request, request.key, channel)
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
        db = request.db
        user = request.server_user
        node = node or db.nodes[0]
        # [dropin] A forced user (PgBouncer's user=) logs in with the entry's password or its auth file secret.
        if db.user:
            creds = self.forced_credentials(db)
        elif db.auth_type == "trust":
            # Nobody checked this client: only the proxy's own secret for the user (the
            # auth file's) may log it in, never what another client proved elsewhere.
            creds = credentials_from_secret(self._file_secret(user))
        else:
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
            conn = self._open(db, startup, self._answer_for(creds, user, db.auth_type),
                              time.monotonic() + timeout, release, node=node)
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
            conn = ServerConnection.dial(node.host, node.port, self.config.server_connect_timeout, self.server_tls,
                                         keepalive=self.config)
            if on_dial is not None:
                on_dial(conn)
            conn.complete_login(pq.startup_message(startup), answer_auth, deadline, on_notice, ready_timeout)
            if db.connect_query:
                _connect_query(conn, db, self.config.server_connect_timeout)
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
        """The user's secret as PostgreSQL stores it, from the cache or auth_query; None: no such
        user, no password, or the lookup failed (all fail alike; the log says which)."""
        db, user = request.db, request.user
        dbname = auth_database(self.config, db)
        # An entry's own auth_user and auth_query ([dropin]) may read other verifiers: part of the key.
        cache_key = (db.node, dbname, user, db.auth_user, db.auth_query)
        cached = self._query_cache.get(cache_key)
        if cached is not MISS:
            return cached
        try:
            secret, found = self._run_auth_query(db, dbname, user)
        except _LookupFailed as exc:
            self._log_refusal("failed auth_query lookups", logging.ERROR, "client %s: %s", request.who, exc)
            return None
        self._query_cache.put(cache_key, secret, found)
        return secret

    def _run_auth_query(self, db: DatabaseConfig, dbname: str, user: str) -> tuple[Secret | None, bool]:
        """Run auth_query for ``user`` in database ``dbname`` on a dedicated server connection of auth_user.

        Returns (secret or None, whether the server has the user).  Those
        connections pin their search_path (AUTH_QUERY_OPTIONS) and are parked
        in the proxy's pool under their own key (never a client's), so the
        janitor and shutdown close them like any other.  Raises _LookupFailed
        saying why for the log (never for the client: it names servers and roles).
        """
        config, pool = self.config, self.pool
        auth_user = db.auth_user or config.auth_user       # [dropin] an entry's own auth_user and auth_query
        auth_query = db.auth_query or config.auth_query
        node = db.nodes[0]
        if self.router is not None and db.multi:
            up = self.router.candidates(db)          # several servers: one that is up (any holds pg_shadow)
            node = up[0] if up else node
        key = pool_key(node.name, auth_user, dbname) + "\0auth_query"
        timeout = config.server_connect_timeout
        try:
            conn = pool.acquire(key, AUTH_QUERY_POOL_SIZE, timeout)
        except PoolTimeout:
            raise _LookupFailed(f"no auth_query connection to {node.name}/{dbname} became free "
                                f"within {timeout:g} s") from None
        rows: list[list[bytes | None]] = []

        def on_message(t, body):
            if t == pq.DATA_ROW:
                rows.append(pq.parse_data_row(body))

        try:
            if conn is None:
                params = {"user": auth_user, "database": dbname, "options": AUTH_QUERY_OPTIONS,
                          "application_name": "threadpool_proxy auth_query"}
                conn = self._open(db, params, self._answer_for(self._auth_user_credentials(auth_user), auth_user),
                                  time.monotonic() + timeout,
                                  lambda conn, reason: pool.give_back(key, conn, reason), node=node,
                                  for_client=False)
            conn.send(pq.extended_query(auth_query, [user]))
            status = conn.read_until_ready(timeout, on_message=on_message)
        except BaseException as exc:
            if conn is not None:          # (a failed login gave its slot back already)
                pool.discard(key, conn, f"auth_query failed: {exc}")
            if not isinstance(exc, (ServerError, AuthFailed, ServerGone, pq.ProtocolError, struct.error)):
                raise
            raise _LookupFailed(f"auth_query as {auth_user} on {node.name}/{dbname} failed: {exc}") from None
        pool.checkin(key, conn, reset_ok=status == pq.IDLE)
        with self._lock:
            self.auth_queries += 1
        if not rows or not rows[0] or rows[0][0] is None:
            return None, False     # no such user: fails like a wrong password
        if len(rows[0]) < 2 or rows[0][1] is None:
            return None, True      # a user without a password: the same
        try:
            secret = secret_from_rolpassword(rows[0][1].decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("auth_query: the stored password of user %r is unusable: %s", user, exc)
            return None, True
        self._tally(secret)
        return secret, True

    def _tally(self, secret: Secret) -> None:
        """Count a fetched verifier's method and iteration count (see ``_typical``)."""
        pair = ("scram", secret.iterations) if secret.kind == "scram" else ("md5", 0)
        with self._lock:
            if pair in self._fetched or len(self._fetched) < _TALLY_LIMIT:
                self._fetched[pair] += 1

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
            conn.complete_login(pq.startup_message(params), self._answer_for(creds, user),
                                time.monotonic() + timeout, None, timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def _answer_for(self, creds: ServerCredentials, user: str, auth_type: str | None = None):
        """``answer_auth`` for a server login as ``user`` with ``creds``, within the server auth rule."""
        config = self.config
        rule = server_auth_rule(config, creds, auth_type, tls_verified=self._server_tls_verified())
        return _answer_from(creds.login(user, rule, config.server_scram_max_iterations), user, rule)

    def _server_tls_verified(self) -> bool:
        """Every server connection is TLS with a checked certificate chain."""
        server_tls = self.server_tls
        return server_tls is not None and server_tls.required and server_tls.verifies

    def _auth_user_credentials(self, auth_user: str | None = None) -> ServerCredentials:
        config = self.config
        auth_user = auth_user or config.auth_user
        if config.auth_password is not None and auth_user == config.auth_user:
            return ServerCredentials(password=config.auth_password)
        return credentials_from_secret(self._file_secret(auth_user))


class _LookupFailed(Exception):
    """auth_query could not be run; str() says why, for the proxy's log only."""


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


def _connect_query(conn: ServerConnection, db: DatabaseConfig, timeout: float) -> None:
    """An entry's ``connect_query`` on a new server connection: its errors are logged, as PgBouncer does;
    a query that leaves the connection outside idle state (a BEGIN) or ends it fails the login."""
    try:
        status = conn.run_simple(db.connect_query, timeout)
    except ServerError as exc:
        if pq.ends_connection(exc.fields):
            raise
        log.warning("database %s: connect_query failed on server connection %d: %s", db.name, conn.pid,
                    exc.fields.get("M", exc))
        return
    if status != pq.IDLE:
        raise ServerGone(f"connect_query of database {db.name} left the server connection in a transaction")


_ALL_METHODS = frozenset(SERVER_AUTH_METHODS)


def server_auth_rule(config: Config, creds: ServerCredentials, auth_type: str | None,
                     tls_verified: bool) -> ServerAuthRule | None:
    """What a server may ask of the proxy logging in with ``creds`` (None: anything).

    ``server_require_auth`` when set, as libpq's require_auth; else by the secret held:

      SCRAM verifier (a ClientKey)     scram-sha-256 only: the server proves it knows the verifier
      password, entry scram-sha-256    scram-sha-256 only, as the entry says
      password, otherwise              scram-sha-256, md5, none; a cleartext password only when every
                                       server connection is TLS with a verified certificate
      md5 hash                         md5, none (scram-sha-256 cannot work with it)
      nothing                          anything (the server must trust the proxy)

    ``auth_type`` is the database entry's (None for auth_query's and health checks' own logins).
    """
    if config.server_require_auth is not None:
        negated, methods = parse_require_auth(config.server_require_auth)
        return ServerAuthRule(_ALL_METHODS - methods if negated else methods,
                              f'server_require_auth "{config.server_require_auth}"')
    kind = creds.kind
    if kind == "scram-client-key":
        return ServerAuthRule(frozenset({"scram-sha-256"}), "the rule for a SCRAM verifier "
                                                            "(server_require_auth is not set)")
    if kind == "password" and auth_type == "scram-sha-256":
        return ServerAuthRule(frozenset({"scram-sha-256"}), "the rule for the password of a scram-sha-256 "
                                                            "entry (server_require_auth is not set)")
    if kind == "password":
        allowed = {"scram-sha-256", "md5", "none"} | ({"password"} if tls_verified else set())
        return ServerAuthRule(frozenset(allowed), "the rule for a stored password (server_require_auth is "
                                                  "not set; a cleartext password goes only over verified TLS)")
    if kind == "md5-hash":
        return ServerAuthRule(frozenset({"md5", "scram-sha-256", "none"}),
                              "the rule for an md5 hash (server_require_auth is not set)")
    return None


def _answer_from(login: ServerLogin | None, user: str, rule: ServerAuthRule | None = None):
    """``answer_auth`` for ServerConnection.complete_login, answering from stored credentials."""
    def answer(code: int, body: bytes) -> bytes | None:
        if login is not None:
            return login.answer(code, body[4:])
        if code == pq.AUTH_OK:
            if rule is not None:
                rule.check(code)
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
