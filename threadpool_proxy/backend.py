"""Server connections: dialing, the login loop, reading whole messages off
the hot path (login, reset, parameter changes), and the reset before parking.

The relay reads and writes a ServerConnection's socket directly; everything
here is for the moments when the proxy itself talks to the server.  Those
exchanges always end at ReadyForQuery, so no bytes are ever left buffered
here when the relay takes over.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import re
import select
import socket
import time

from . import events as events_mod
from . import protocol as pq
from . import tls
from .errors import ClientFatal, ProtocolError, ServerError, ServerGone
from .logs import get_logger

log = get_logger(__name__)

#: The longest message read whole off the hot path (login, reset, SET, auth_query,
#: health checks), whose answers are all short: a server declaring more is not
#: believed, and never gets a buffer that size.
MAX_OFF_PATH_MESSAGE = 1 << 20

#: Numbers for server connections (SHOW SERVERS' id).
_SERIALS = itertools.count(1)

_GUC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


def valid_guc_name(name: str) -> bool:
    return bool(_GUC_NAME.match(name))


def quote_literal(value: str) -> str:
    """An SQL string literal that means ``value`` whatever standard_conforming_strings says."""
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def set_statements(settings: dict) -> str:
    """One SELECT of ``set_config(name, value, false)`` for each of {name: value}, as literals.

    set_config, not ``SET name TO 'value'``: SET quotes a string value of a list
    setting as one identifier (``SET search_path TO 'a, b'`` is the schema
    named "a, b"), where set_config takes the value as written, as a startup
    packet's value is taken.
    """
    return "SELECT " + ", ".join(f"pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"
                                 for name, value in settings.items())


#: Reset queries whose whole answer is one CommandComplete: the bytes a healthy
#: idle server sends back (ReadyForQuery 'I' included), so that checking it is a comparison.
_RESET_TAGS = {"DISCARD ALL": "DISCARD ALL", "RESET ALL": "RESET", "DEALLOCATE ALL": "DEALLOCATE ALL"}


@functools.lru_cache(maxsize=8)
def _reset_messages(reset_query: str) -> tuple[bytes, bytes]:
    """The reset's Query message, and its whole answer from a healthy idle server where known (else b"")."""
    tag = _RESET_TAGS.get(reset_query.strip().rstrip(";").strip().upper())
    answer = pq.command_complete(tag) + pq.ready_for_query(pq.IDLE) if tag else b""
    return pq.query(reset_query), answer


def is_unix_host(host: str) -> bool:
    """A host that is a directory (libpq's rule: it starts with /): the server's unix socket is in it."""
    return host.startswith("/")


def connect_socket(host: str, port: int, timeout: float) -> socket.socket:
    """A connected socket to a server: TCP, or ``<host>/.s.PGSQL.<port>`` when ``host`` is a directory."""
    if not is_unix_host(host):
        return socket.create_connection((host, port), timeout=timeout)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.path.join(host, f".s.PGSQL.{port}"))
    except BaseException:
        sock.close()
        raise
    return sock


def out_of_descriptors(exc: OSError) -> ClientFatal:
    """The client's error when the proxy has no file descriptor left for it (EMFILE/ENFILE)."""
    log.warning("out of file descriptors (%s): raise the open files limit or lower max_client_conn",
                exc.strerror or exc)
    return ClientFatal(pq.SQLSTATE_INSUFFICIENT_RESOURCES,
                       "threadpool_proxy is out of file descriptors; try again later",
                       hint="The proxy's open files limit (ulimit -n) is too low for its clients.")


class ServerConnection:
    """One authenticated (or authenticating) connection to a PostgreSQL server.

    ``params`` are the server's reported parameters as they stand now (lower-case
    names), ``param_names`` their spelling as PostgreSQL reports them,
    ``login_params`` the settings sent in this connection's StartupMessage (they
    are what a reset returns to), ``unreported`` settings in force that the server
    does not report (from the login or set by the proxy since the last reset).
    """

    __slots__ = ("sock", "raw_socket", "tls", "node", "host", "port", "pid", "secret",
                 "params", "param_names", "login_params", "unreported",
                 "_buf", "_poller", "reset_pending", "reset_timeout", "reset_answer", "statements", "created",
                 "serial", "holder_pid", "ended_by", "cancels", "after_cancel", "_observer", "__weakref__")

    def __init__(self, sock: socket.socket, host: str, port: int) -> None:
        self.sock = sock
        # What the idle probe peeks at: the socket itself, also under TLS (tls.raw_peek
        # reads its descriptor's raw bytes; any byte at all means "not clean").
        self.raw_socket = sock
        self.tls = tls.is_tls(sock)   # an ssl.SSLSocket: mind pending() after each read
        self.host = host
        self.port = port
        self.node = f"{host}:{port}"
        self.pid = 0
        self.secret = b""
        self.params: dict[str, str] = {}
        self.param_names: dict[str, str] = {}
        self.login_params: dict[str, str] = {}
        self.unreported: dict[str, str] = {}
        self._buf = bytearray()
        self._poller = None
        self.reset_pending = False    # a reset query was sent and its answer not read yet
        self.reset_timeout = 15.0
        self.reset_answer = b""       # what a healthy server answers the pending reset, where known
        self.statements = None        # prepared.ServerStatements: the proxy's named statements held here
        self.created = time.time()    # for SHOW SERVERS, server_lifetime
        self.ended_by = None          # (setting, seconds) when the proxy cut it short (query_timeout)
        self.serial = next(_SERIALS)
        self.holder_pid = 0           # the pid told to the client that holds it, or held it last
        # CancelRequests for it on their way to the server, and what its client's release
        # does once the last one is done (Relay.detach, Relay.cancel_done): under the relay's backend_lock.
        self.cancels = 0
        self.after_cancel = None
        self._observer = None         # (events.EventHub, database, user) told when it closes (observe)

    @classmethod
    def dial(cls, host: str, port: int, timeout: float, server_tls=None, keepalive=None) -> "ServerConnection":
        """Connect (and, with ``server_tls``, send SSLRequest and wrap the socket in TLS).

        A ``host`` that is a directory is the server's unix socket there (no
        TLS, as libpq).  ``keepalive``: a Config whose tcp_keepalive settings a
        TCP connection takes (listeners.set_keepalive); None: SO_KEEPALIVE on.
        """
        unix = is_unix_host(host)
        try:
            sock = connect_socket(host, port, timeout)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise out_of_descriptors(exc) from None
            raise ServerGone(f"cannot connect to server {host}:{port}: {exc.strerror or exc}") from None
        if unix:
            sock.settimeout(None)
            return cls(sock, host, port)
        if server_tls is not None:
            try:
                sock = server_tls.negotiate(sock, host, port)
            except BaseException:
                sock.close()
                raise
        # Blocking mode from here on: with a timeout set, every recv/send in
        # the relay would cost an extra poll() inside the socket module.
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive is None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        else:
            from .listeners import set_keepalive
            set_keepalive(sock, keepalive)
        return cls(sock, host, port)

    def close(self, reason: str | None = None) -> None:
        """Close the socket; ``reason`` (when given) is logged, so every closed connection says why."""
        if reason:
            log.info("closing server connection %r: %s", self, reason)
        self.note_closing(reason)
        try:
            self.sock.close()
        except OSError:
            pass

    def observe(self, hub, database: str, user: str) -> None:
        """Tell ``hub`` (an events.EventHub) when this connection is closed (once)."""
        self._observer = (hub, database, user)

    def note_closing(self, reason: str | None) -> None:
        """This connection is being closed for ``reason``: an event for the hub that observes it, once.

        The pool calls this before ``close()`` (it logs the reason itself).
        """
        observer, self._observer = self._observer, None
        if observer is not None and observer[0].active:
            observer[0].emit(events_mod.SERVER_CLOSE, database=observer[1], user=observer[2], server_id=self.serial,
                             server_pid=self.pid, detail=reason or "")

    def __repr__(self) -> str:
        return f"<ServerConnection {self.node} pid={self.pid}>"

    # -- whole-message I/O, off the hot path -----------------------------------

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise ServerGone(f"server connection failed: {exc}") from None

    def read_message(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        """One whole message: (type byte, body).

        The socket stays in blocking mode (the relay wants it so); waiting for
        more bytes goes through poll() with the timeout, which costs no
        fcntl() calls the way settimeout() would on every message.
        """
        buf = self._buf
        while True:
            if len(buf) >= 5:
                length = pq.UINT32.unpack_from(buf, 1)[0]
                if length < 4:
                    raise ServerGone("server sent an invalid message length")
                if length - 4 > MAX_OFF_PATH_MESSAGE:
                    raise ServerGone(f"server sent a message of type {bytes(buf[:1])!r} of {length - 4} bytes, "
                                     f"more than the {MAX_OFF_PATH_MESSAGE} the proxy reads here")
                if len(buf) > length:
                    t = bytes(buf[0:1])
                    body = bytes(buf[5:length + 1])
                    del buf[:length + 1]
                    return t, body
            size = 262144 if len(buf) > 8192 else 16384
            try:
                chunk = None
                if timeout is not None and self.tls:
                    chunk = self._recv_tls(size, timeout)
                elif timeout is not None:
                    # Usually the answer is already here: one non-blocking recv,
                    # and poll() only when it is not.
                    try:
                        chunk = self.sock.recv(size, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        if self._poller is None:
                            self._poller = select.poll()
                            self._poller.register(self.sock.fileno(), select.POLLIN)
                        if not self._poller.poll(timeout * 1000):
                            raise ServerGone("server did not answer in time") from None
                if chunk is None:
                    chunk = self.sock.recv(size)
            except OSError as exc:
                raise ServerGone(f"server connection failed: {exc}") from None
            if not chunk:
                raise ServerGone("server closed the connection")
            buf += chunk

    def _recv_tls(self, size: int, timeout: float) -> bytes:
        """One read of a TLS connection within ``timeout``; no flags on an SSLSocket, so a timeout
        for this read only (a record that is not application data must not block us for ever)."""
        sock = self.sock
        if sock.pending():
            return sock.recv(size)
        sock.settimeout(timeout)
        try:
            return sock.recv(size)
        except socket.timeout:
            raise ServerGone("server did not answer in time") from None
        finally:
            sock.settimeout(None)

    # -- login -------------------------------------------------------------------

    def complete_login(self, startup: bytes, answer_auth, deadline: float, on_notice=None,
                       ready_timeout: float | None = None) -> None:
        """Send the StartupMessage and log in up to ReadyForQuery.

        The one login loop, for both ways of logging in: ``answer_auth(code,
        body)`` gets each Authentication request (``body`` after the 'R'
        header) and returns the framed answer to send, or None; in pass-through
        it relays the request to the client and returns the client's answer, in
        the proxy's own login it answers from the stored secret.  It may raise
        to stop the login.  NoticeResponses go to ``on_notice(framed)`` if given.
        BackendKeyData goes to ``pid``/``secret``, ParameterStatus to ``params``.
        ``deadline`` bounds the whole login, or, with ``ready_timeout``, only
        the part up to AuthenticationOk: the rest then gets ``ready_timeout``
        seconds from there (``answer_auth`` may wait before accepting it).
        Raises ServerError (the server refused), ServerGone (closed, timed out,
        or spoke nonsense).
        """
        def remaining() -> float:
            return max(0.05, deadline - time.monotonic())

        def on_message(t, body):
            if t == pq.BACKEND_KEY_DATA:
                self.pid, self.secret = pq.parse_backend_key_data(body)
            elif t == pq.NOTICE_RESPONSE and on_notice is not None:
                on_notice(pq.message(t, body))

        self.send(startup)
        try:
            while True:
                t, body = self.read_message(remaining())
                if t == pq.AUTHENTICATION:
                    code = pq.parse_auth_code(body)
                    reply = answer_auth(code, body)
                    if reply is not None:
                        self.send(reply)
                    if code == pq.AUTH_OK:
                        if ready_timeout is not None:
                            deadline = time.monotonic() + ready_timeout
                        break
                elif t == pq.ERROR_RESPONSE:
                    raise ServerError(pq.parse_error_fields(body), pq.message(t, body))
                elif t == pq.NOTICE_RESPONSE:
                    on_message(t, body)
                elif t != pq.NEGOTIATE_PROTOCOL_VERSION:
                    raise ServerGone(f"unexpected message {t!r} from the server during authentication")
            self.read_until_ready(remaining(), on_message=on_message)
        except ProtocolError as exc:
            raise ServerGone(f"server sent an invalid message: {exc}") from None

    def note_parameter(self, name: str, value: str) -> None:
        lower = name.lower()
        self.params[lower] = value
        self.param_names[lower] = name

    def read_until_ready(self, timeout: float | None = None, on_message=None) -> bytes:
        """Read messages up to ReadyForQuery; return its status byte.

        ParameterStatus updates ``params``; an ErrorResponse is remembered and
        raised as ServerError after ReadyForQuery (the connection stays usable);
        other messages go to ``on_message(type, body)`` if given.
        """
        error = None
        while True:
            t, body = self.read_message(timeout)
            if t == pq.READY_FOR_QUERY:
                if error is not None:
                    raise error
                return body[:1]
            if t == pq.PARAMETER_STATUS:
                self.note_parameter(*pq.parse_parameter_status(body))
            elif t == pq.ERROR_RESPONSE:
                error = ServerError(pq.parse_error_fields(body), pq.message(t, body))
                if pq.ends_connection(error.fields):
                    raise error       # the server closes the connection after these
            elif on_message is not None:
                on_message(t, body)

    def run_simple(self, sql: str, timeout: float | None = None) -> bytes:
        """Send one simple Query and wait for its ReadyForQuery status."""
        self.send(pq.query(sql))
        return self.read_until_ready(timeout)

    # -- session state ---------------------------------------------------------

    def apply_settings(self, settings: dict, timeout: float | None) -> None:
        """SET each {lower name: value} in one round trip; raises ServerError."""
        if not settings:
            return
        status = self.run_simple(set_statements(settings), timeout)
        for name, value in settings.items():
            if name not in self.params:
                self.unreported[name] = value
        if status != pq.IDLE:
            raise ServerGone("server left idle state after SET")

    def start_reset(self, reset_query: str, timeout: float) -> bool:
        """Send the reset query without waiting for its answer (False if the send failed).

        The releasing client goes on at once; whoever takes the connection next
        reads the answer with ``finish_reset_verdict`` before using it, so the round
        trip costs no thread a blocking wait of its own.
        """
        self.reset_timeout = timeout
        if not reset_query:
            self.reset_pending = False
            return True
        message, self.reset_answer = _reset_messages(reset_query)
        try:
            self.send(message)
        except ServerGone:
            return False
        self.reset_pending = True
        return True

    def finish_reset_verdict(self) -> str:
        """"clean" (the expected answer and nothing after it: the whole socket was
        read, so no liveness probe is needed); "ok" (answered well; what may
        follow in the socket is unread); "failed" (the reset query erred or left a transaction open); or
        "dead" (the server closed, or spoke after answering: e.g. the FATAL of
        pg_terminate_backend on a parked connection)."""
        if not self.reset_pending:
            return "ok"
        self.reset_pending = False
        expected = self.reset_answer
        if expected and not self._buf and not self.tls:
            # Usually the whole answer is here, and only it: one non-blocking
            # read and a comparison, no parsing.  Anything else is read the long way.
            try:
                chunk = self.sock.recv(16384, socket.MSG_DONTWAIT)
            except BlockingIOError:
                chunk = None                      # not here yet: wait for it below
            except OSError as exc:
                log.info("server connection lost while parked (%r): %s", self, exc)
                return "dead"
            if chunk == expected:
                self.unreported = {k: v for k, v in self.login_params.items() if k not in self.params}
                return "clean"
            if chunk is not None:
                if not chunk:
                    log.info("server connection lost while parked (%r): it closed", self)
                    return "dead"
                self._buf += chunk
        try:
            status = self.read_until_ready(self.reset_timeout)
        except ServerError as exc:
            if pq.ends_connection(exc.fields):
                return "dead"
            log.warning("reset query failed on %r, closing it: %s", self, exc)
            return "failed"
        except ServerGone as exc:
            log.info("server connection lost while parked (%r): %s", self, exc)
            return "dead"
        if self._buf:
            return "dead"
        if status != pq.IDLE:
            return "failed"
        self.unreported = {k: v for k, v in self.login_params.items() if k not in self.params}
        return "ok"
