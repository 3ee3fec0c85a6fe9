"""Proxy-terminated authentication: checking clients, and logging in to servers for them.

The sans-I/O steps live in auth.py (SCRAM and md5, both directions) and
authfile.py (the user list); this module does their socket I/O.  For callers
(ProxyServer): ``authenticate(session)`` runs the exchange with a client and
ends with AuthenticationOk or a FATAL; ``dial_for(session)`` opens a logged-in
server connection for an authenticated client; ``reload()`` re-reads the auth
file (SIGHUP).

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
import ipaddress
import logging
import re
import secrets
import struct
import threading
import time

from . import protocol as pq
from .auth import (
    AuthFailed,
    ScramServerExchange,
    ServerLogin,
    md5_server_check,
    parse_sasl_initial_response,
    sasl_mechanisms_payload,
)
from .authfile import AuthFile, AuthFileError, Secret, parse_scram_verifier
from .backend import ServerConnection, ServerError, ServerGone
from .config import ConfigError
from .pool import PoolTimeout, pool_key
from .session import ClientFatal, ClientGone

log = logging.getLogger(__name__)

#: Seconds from the client's last authentication message to the 28P01 answer,
#: whatever the reason (unknown user, wrong password, user without password).
FAILURE_DELAY = 0.3

#: Longest SASL or password message accepted from a client (PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH).
MAX_AUTH_MESSAGE = 65535

#: Server connections auth_query may hold open per (node, database).
AUTH_QUERY_POOL_SIZE = 2

_MD5_HASH = re.compile(r"md5[0-9a-fA-F]{32}")
_int16 = struct.Struct("!h")
_int32 = struct.Struct("!i")

# Extended-protocol messages used by auth_query (frontend):
#   Parse:   String statement name, String query, Int16 n types, Int32 type oid * n
#   Bind:    String portal, String statement, Int16 n formats, Int16 format * n,
#            Int16 n params, (Int32 length, Byte[length] value) * n, Int16 n result formats
#   Execute: String portal, Int32 max rows (0: all)
#   Sync
# Backend answers: ParseComplete '1', BindComplete '2', DataRow 'D'
#   (Int16 n columns, (Int32 length or -1 for NULL, Byte[length]) * n),
#   CommandComplete 'C', ReadyForQuery 'Z'.
DATA_ROW = b"D"


@dataclasses.dataclass(frozen=True, eq=False)
class ServerCredentials:
    """How the proxy logs in to PostgreSQL as one user (any one field set, or none for trust)."""

    password: str | None = None
    md5_hash: str | None = None
    client_key: bytes | None = None
    scram_secret: Secret | None = None

    def login(self, user: str) -> ServerLogin | None:
        """A ServerLogin for these credentials; None when there are none (trusting server)."""
        if self.password is not None:
            return ServerLogin(user, password=self.password)
        if self.client_key is not None:
            return ServerLogin(user, client_key=self.client_key, scram_secret=self.scram_secret)
        if self.md5_hash is not None:
            return ServerLogin(user, md5_hash=self.md5_hash)
        return None

    @property
    def kind(self) -> str:
        if self.password is not None:
            return "password"
        if self.client_key is not None:
            return "scram-client-key"
        if self.md5_hash is not None:
            return "md5-hash"
        return "none"

    def __repr__(self) -> str:        # never show the secret parts
        return f"ServerCredentials({self.kind})"

    __str__ = __repr__


NO_CREDENTIALS = ServerCredentials()


def credentials_from_secret(secret: Secret) -> ServerCredentials:
    """Server credentials a stored secret gives by itself (a SCRAM verifier gives none)."""
    if secret.kind == "password":
        return ServerCredentials(password=secret.password)
    if secret.kind == "md5":
        return ServerCredentials(md5_hash=secret.md5)
    return NO_CREDENTIALS


def secret_from_rolpassword(text: str) -> Secret:
    """A Secret from what pg_shadow.passwd / pg_authid.rolpassword holds; ValueError if unusable."""
    if text.startswith("SCRAM-SHA-256$"):
        return parse_scram_verifier(text)
    if _MD5_HASH.fullmatch(text):
        return Secret("md5", md5=text.lower())
    if not text:
        raise ValueError("empty password")
    return Secret("password", password=text)


def is_loopback(address) -> bool:
    try:
        ip = ipaddress.ip_address(address[0])
    except (ValueError, TypeError, IndexError):
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _data_row(body: bytes) -> list[bytes | None]:
    (n,) = _int16.unpack_from(body, 0)
    pos, values = 2, []
    for _ in range(n):
        (length,) = _int32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[pos:pos + length])
            pos += length
    return values


def extended_query(sql: str, params: list[str]) -> bytes:
    """Parse/Bind/Execute/Sync of the unnamed statement with text parameters."""
    parse = pq.message(pq.PARSE, b"\0" + sql.encode("utf-8") + b"\0" + _int16.pack(0))
    values = b"".join(_int32.pack(len(v)) + v for v in (p.encode("utf-8") for p in params))
    bind = pq.message(pq.BIND, b"\0\0" + _int16.pack(0) + _int16.pack(len(params)) + values + _int16.pack(0))
    execute = pq.message(pq.EXECUTE, b"\0" + _int32.pack(0))
    return parse + bind + execute + pq.message(pq.SYNC)


class Authenticator:
    """Authenticates clients for the proxy and logs in to servers for them.

    For callers: authenticate(), dial_for(), reload().  Counters for tests and
    logs: ``server_logins`` (server connections opened for clients),
    ``server_login_failures``, ``auth_queries`` (auth_query round trips).
    """

    failure_delay = FAILURE_DELAY

    def __init__(self, server) -> None:
        self.server = server
        self.config = server.config
        self._lock = threading.Lock()
        self._credentials: dict[str, ServerCredentials] = {}   # user -> how to log in for them
        self._query_cache: dict[tuple[str, str], tuple[Secret | None, float]] = {}
        self.server_logins = 0
        self.server_login_failures = 0
        self.auth_queries = 0
        self.auth_file: AuthFile | None = None
        if self.config.auth_file:
            try:
                self.auth_file = AuthFile(self.config.auth_file)
            except AuthFileError as exc:
                raise ConfigError(f"auth_file: {exc}") from None
            log.info("auth file %s: %d users", self.config.auth_file, len(self.auth_file))
        types = {self.config.auth_type} | {d.auth_type for d in self.config.databases.values()}
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

    # -- client side -------------------------------------------------------------

    def authenticate(self, session) -> None:
        """Check the client's password; return after AuthenticationOk, else raise ClientFatal."""
        auth_type = session.db.auth_type
        user = session.user
        if auth_type == "trust":
            if not is_loopback(session.address):
                raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION,
                                  f'auth_type trust refuses user "{user}" from {session.address[0]}: '
                                  f"only loopback clients may log in without a password")
            self._send(session, pq.AUTHENTICATION_OK)
            secret = self.auth_file.lookup(user) if self.auth_file is not None else None
            creds = credentials_from_secret(secret) if secret is not None else NO_CREDENTIALS
            if creds is not NO_CREDENTIALS:
                self._remember(user, creds)
            return
        if auth_type == "auth_query":
            secret = self._query_secret(session)
            use_scram = secret is None or secret.kind == "scram"
        else:
            secret = self.auth_file.lookup(user) if self.auth_file is not None else None
            if auth_type == "md5":
                use_scram = secret is not None and secret.kind == "scram"
            else:
                use_scram = True
                if secret is not None and secret.kind == "md5":
                    secret = None    # no SCRAM from an md5 hash: fails like PostgreSQL's mock exchange
        if use_scram:
            self._scram(session, secret)
        else:
            self._md5(session, secret)

    def _scram(self, session, secret: Secret | None) -> None:
        user = session.user
        verifier = None
        if secret is not None:
            verifier = secret if secret.kind == "scram" else (
                self.auth_file.scram_secret(user) if secret.kind == "password" and self.auth_file else None)
        exchange = (ScramServerExchange(verifier, user) if verifier is not None
                    else ScramServerExchange.for_unknown_user(user))
        mechanisms = exchange.mechanisms()
        self._send(session, pq.authentication(pq.AUTH_SASL, sasl_mechanisms_payload(mechanisms)))
        answered = time.monotonic()
        try:
            body = self._read_answer(session, "SASL")
            mechanism, client_first = parse_sasl_initial_response(body)
            if mechanism not in mechanisms:
                raise AuthFailed(f"client selected an invalid SASL authentication mechanism "
                                 f"({mechanism[:64]!r})", pq.SQLSTATE_PROTOCOL_VIOLATION)
            server_first = exchange.handle_client_first(client_first)
            self._send(session, pq.authentication(pq.AUTH_SASL_CONTINUE, server_first))
            body = self._read_answer(session, "SASL")
            answered = time.monotonic()
            server_final = exchange.handle_client_final(body)
        except AuthFailed as exc:
            if exc.sqlstate == pq.SQLSTATE_INVALID_PASSWORD:
                self._reject(session, str(exc), answered)
            log.info("client %s: SCRAM protocol violation: %s", _who(session), exc)
            raise ClientFatal(exc.sqlstate, str(exc)) from None
        if secret.kind == "scram":
            creds = ServerCredentials(client_key=exchange.client_key, scram_secret=verifier)
        else:
            creds = credentials_from_secret(secret)
        self._remember(user, creds)
        self._send(session, pq.authentication(pq.AUTH_SASL_FINAL, server_final) + pq.AUTHENTICATION_OK)

    def _md5(self, session, secret: Secret | None) -> None:
        salt = secrets.token_bytes(4)
        self._send(session, pq.authentication(pq.AUTH_MD5_PASSWORD, salt))
        body = self._read_answer(session, "password")
        answered = time.monotonic()
        if secret is None:
            self._reject(session, "user is unknown or has no password", answered)
        if not md5_server_check(secret, session.user, salt, body):
            self._reject(session, "md5 answer is wrong (wrong password)", answered)
        self._remember(session.user, credentials_from_secret(secret))
        self._send(session, pq.AUTHENTICATION_OK)

    def _reject(self, session, reason: str, since: float):
        """Answer a failed password check, always the same way and after the same delay."""
        log.info("client %s: password authentication failed: %s", _who(session), reason)
        wait = self.failure_delay - (time.monotonic() - since)
        if wait > 0:
            time.sleep(wait)
        raise ClientFatal(pq.SQLSTATE_INVALID_PASSWORD,
                          f'password authentication failed for user "{session.user}"')

    def _read_answer(self, session, what: str) -> bytes:
        t, body = session.read_client_message(MAX_AUTH_MESSAGE)
        if t == pq.TERMINATE:
            raise ClientGone()
        if t != pq.PASSWORD_MESSAGE:
            raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                              f"expected {what} response, got message type {t!r}")
        return body

    @staticmethod
    def _send(session, data: bytes) -> None:
        try:
            session.client.sendall(data)
        except OSError:
            raise ClientGone() from None

    def _remember(self, user: str, creds: ServerCredentials) -> None:
        with self._lock:
            self._credentials[user] = creds

    def credentials_for(self, user: str) -> ServerCredentials:
        with self._lock:
            return self._credentials.get(user, NO_CREDENTIALS)

    # -- server side -------------------------------------------------------------

    def dial_for(self, session) -> ServerConnection:
        """A new server connection for an authenticated client, logged in as its user.

        Called with a pool_size slot of the session's key already taken; on
        failure the slot is given back and ClientFatal raised.
        """
        db, pool, key, user = session.db, self.server.pool, session.key, session.user
        timeout = self.config.server_connect_timeout
        creds = self.credentials_for(user)
        conn = None
        try:
            conn = ServerConnection.dial(db.host, db.port, key, timeout)
            log_in(conn, session.server_startup_params(), user, creds, timeout)
        except BaseException as exc:
            if conn is None:
                pool.release_slot(key)
            else:
                pool.discard(key, conn)
            with self._lock:
                self.server_login_failures += 1
            if isinstance(exc, (ServerError, AuthFailed, ServerGone)):
                raise _login_failed(user, db.node, exc) from None
            raise
        with self._lock:
            self.server_logins += 1
        session.adopt_login(conn)
        log.debug("logged in to %s as %s (pid %d, %s)", db.node, user, conn.pid, creds.kind)
        return conn

    # -- auth_query --------------------------------------------------------------

    def _query_secret(self, session) -> Secret | None:
        """The user's secret as PostgreSQL stores it, from the cache or auth_query."""
        db, user = session.db, session.user
        cache_key = (db.node, user)
        ttl = self.config.auth_query_cache_seconds
        now = time.monotonic()
        with self._lock:
            hit = self._query_cache.get(cache_key)
        if hit is not None and hit[1] > now:
            return hit[0]
        secret = self._run_auth_query(db, db.server_dbname(session.database), user)
        if ttl > 0:
            with self._lock:
                self._query_cache[cache_key] = (secret, now + ttl)
        return secret

    def _run_auth_query(self, db, dbname: str, user: str) -> Secret | None:
        """Run auth_query for ``user`` on a dedicated server connection of auth_user.

        Those connections are parked in the proxy's pool under their own key
        (never a client's), so the janitor and shutdown close them like any other.
        """
        config, pool = self.config, self.server.pool
        auth_user = config.auth_user
        key = pool_key(db.node, auth_user, dbname) + "\0auth_query"
        timeout = config.server_connect_timeout
        try:
            conn = pool.acquire(key, AUTH_QUERY_POOL_SIZE, timeout)
        except PoolTimeout:
            raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT,
                              "threadpool_proxy: no auth_query connection became free in time") from None
        try:
            if conn is None:
                conn = ServerConnection.dial(db.host, db.port, key, timeout)
                params = {"user": auth_user, "database": dbname, "application_name": "threadpool_proxy auth_query"}
                log_in(conn, params, auth_user, self._auth_user_credentials(), timeout)
            rows: list[list[bytes | None]] = []

            def on_message(t, body):
                if t == DATA_ROW:
                    rows.append(_data_row(body))

            conn.send(extended_query(config.auth_query, [user]))
            status = conn.read_until_ready(timeout, on_message=on_message)
        except BaseException as exc:
            if conn is None:
                pool.release_slot(key)
            else:
                pool.discard(key, conn)
            if isinstance(exc, (ServerError, AuthFailed, ServerGone, pq.ProtocolError, struct.error)):
                log.error("auth_query as %s on %s/%s failed: %s", auth_user, db.node, dbname, exc)
                raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT,
                                  f"threadpool_proxy could not look up the user with auth_query: {exc}") from None
            raise
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

    def _auth_user_credentials(self) -> ServerCredentials:
        config = self.config
        if config.auth_password is not None:
            return ServerCredentials(password=config.auth_password)
        secret = self.auth_file.lookup(config.auth_user) if self.auth_file is not None else None
        if secret is not None:
            return credentials_from_secret(secret)
        return NO_CREDENTIALS


def log_in(conn: ServerConnection, params: dict, user: str, creds: ServerCredentials, timeout: float) -> None:
    """Send the StartupMessage and log in up to ReadyForQuery; raise ServerError/AuthFailed/ServerGone.

    BackendKeyData goes to conn.pid/conn.secret, ParameterStatus to conn.params.
    """
    deadline = time.monotonic() + timeout
    conn.send(pq.startup_message(params))
    login = creds.login(user)
    try:
        while True:
            t, body = conn.read_message(max(0.05, deadline - time.monotonic()))
            if t == pq.AUTHENTICATION:
                code = pq.parse_auth_code(body)
                if login is None:
                    if code == pq.AUTH_OK:
                        break
                    raise AuthFailed(f"the server asks for a password (authentication request {code}), "
                                     f"but the proxy holds none for user {user!r}")
                reply = login.step(code, body[4:])
                if reply is not None:
                    conn.send(pq.message(reply[0].encode("ascii"), reply[1]))
                if login.done:
                    break
            elif t == pq.ERROR_RESPONSE:
                raise ServerError(pq.parse_error_fields(body), pq.message(t, body))
            elif t not in (pq.NOTICE_RESPONSE, pq.NEGOTIATE_PROTOCOL_VERSION):
                raise ServerGone(f"unexpected message {t!r} from the server during authentication")

        def on_message(t, b):
            if t == pq.BACKEND_KEY_DATA:
                conn.pid, conn.secret = pq.parse_backend_key_data(b)

        conn.read_until_ready(max(0.05, deadline - time.monotonic()), on_message=on_message)
    except pq.ProtocolError as exc:
        raise ServerGone(f"server sent an invalid message: {exc}") from None


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
        # Anything else (no such database, too many connections...) as PostgreSQL said it.
        return ClientFatal(code, f.get("M", "server error"), f.get("D"), f.get("H"))
    if isinstance(exc, AuthFailed):
        log.warning("cannot log in to %s as %s: %s", node, user, exc)
        return ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION,
                           f'threadpool_proxy could not log in to the server for user "{user}": {exc}')
    return ClientFatal(pq.SQLSTATE_CANNOT_CONNECT, f"threadpool_proxy: {exc}")


def _who(session) -> str:
    address = session.address
    return f"{session.user}@{session.database} from {address[0]}:{address[1]}"
