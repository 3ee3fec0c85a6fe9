"""The client's socket during startup and login, before the relay takes over, and its close.

Login code (the session's startup packet, SCRAM with the client, relaying a
pass-through exchange) talks to the client only through a ClientChannel: whole
messages in, framed bytes out, and one deadline, ``client_login_timeout``, for
the whole login, so a client that stalls anywhere in it is let go in time.

Every client connection ends in ``close_client``: an orderly end of stream
after the last word, never a reset.
"""

from __future__ import annotations

import select
import socket
import time

from . import protocol as pq
from .errors import ClientFatal, ClientGone


#: Longest a closing client's thread waits for the client to close its end (after
#: the proxy's end of stream), reading and dropping what it still sends.
CLOSE_LINGER = 1.0
#: Most bytes read and dropped while closing a client: a client that keeps
#: sending is cut off (reset) after this many, or after CLOSE_LINGER.
CLOSE_DRAIN_LIMIT = 64 * 1024 * 1024

_raw_recv_into = socket.socket.recv_into     # the descriptor's bytes, also under TLS: they are dropped
_raw_shutdown = socket.socket.shutdown       # (an SSLSocket's own shutdown() would unwrap it)


def close_client(sock: socket.socket, linger: float = CLOSE_LINGER) -> None:
    """Close a client's socket with an orderly end of stream (FIN), never a reset (RST).

    A socket closed while bytes the client sent wait unread in it makes the
    kernel answer with RST instead of FIN, and the client then reports
    "connection reset" (and may not read the FATAL sent just before) instead
    of the server's words and "server closed the connection".  PostgreSQL
    drivers keep sending after a FATAL they have not read yet (the next
    request of a pipeline, a Terminate).  So: end our stream first
    (shutdown(SHUT_WR): the client reads all we sent, then end of file), then
    read and drop whatever the client still sends until it closes its end,
    for at most ``linger`` seconds and CLOSE_DRAIN_LIMIT bytes (0: only what
    has arrived already), then close.  A client that closes at once, as
    drivers do after a Terminate or at end of file, costs one shutdown and one read.
    """
    try:
        fd = sock.fileno()
        if fd >= 0:
            try:
                _raw_shutdown(sock, socket.SHUT_WR)
            except OSError:
                pass
            sock.setblocking(False)      # (with a timeout set, every recv would poll() first)
            _drain(sock, fd, linger)
    finally:
        try:
            sock.close()
        except OSError:
            pass


def _drain(sock: socket.socket, fd: int, linger: float) -> None:
    """Read and drop the client's bytes until its end of file, ``linger`` seconds or CLOSE_DRAIN_LIMIT."""
    buf = bytearray(65536)
    poller = None
    deadline = time.monotonic() + linger
    dropped = 0
    while dropped < CLOSE_DRAIN_LIMIT:
        try:
            n = _raw_recv_into(sock, buf)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
            if not poller.poll(left * 1000):
                return
            continue
        except OSError:
            return                       # reset by the client, or shut down: nothing more to read
        if not n:
            return                       # the client closed its end: close cleanly
        dropped += n


class ClientChannel:
    """Blocking reads with a deadline and sends on a client socket; bytes read ahead are kept."""

    __slots__ = ("sock", "deadline", "deadline_name", "_buf", "end_point_hash")

    def __init__(self, sock: socket.socket, login_timeout: float) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + login_timeout
        self.deadline_name = "client_login_timeout"
        self._buf = bytearray()
        self.end_point_hash = None     # under TLS: what SCRAM-SHA-256-PLUS binds to (our certificate's hash)

    def shorten(self, deadline: float, name: str) -> None:
        """A stricter deadline for what is left of the login, named by the setting behind it."""
        if deadline < self.deadline:
            self.deadline, self.deadline_name = deadline, name

    @property
    def has_buffered(self) -> bool:
        """Bytes arrived beyond what was read (e.g. sent right after an SSLRequest)."""
        return bool(self._buf)

    def remaining(self) -> float:
        """Seconds left of the login deadline (at least a little, to read an answer already sent)."""
        return max(0.05, self.deadline - time.monotonic())

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            raise ClientGone() from None

    def send_quietly(self, data: bytes) -> None:
        """A last word before closing: never blocks long, never raises."""
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except OSError:
            pass

    def _recv(self, size: int, flags: int = 0) -> bytes:
        """One recv within the login deadline; ClientGone at end of file."""
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                                  f"{self.deadline_name}: the client did not complete its login in time")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(size, flags)
            except socket.timeout:
                continue
            except OSError:
                raise ClientGone() from None
            if not chunk:
                raise ClientGone()
            return chunk

    def read_exact(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            buf += self._recv(65536)
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def peek_first_byte(self) -> int:
        """The first byte the client sends, left unread (a direct TLS ClientHello starts with 0x16)."""
        return self._recv(1, socket.MSG_PEEK)[0]

    def start_tls(self, client_tls) -> None:
        """The TLS handshake as server (the client asked for it, or opened with a ClientHello).

        From here on ``sock`` is the ssl.SSLSocket (even when the handshake
        fails: the plain socket object gave it its descriptor).  Raises
        ssl.SSLError or OSError: a failed handshake cannot be answered.
        """
        self.sock.settimeout(self.remaining())
        self.sock = client_tls.context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.end_point_hash = client_tls.end_point_hash
        self.sock.do_handshake()

    def read_message(self, max_length: int) -> tuple[bytes, bytes]:
        """One whole message: (type byte, body); a length beyond ``max_length`` is a FATAL."""
        head = self.read_exact(5)
        length = pq.UINT32.unpack_from(head, 1)[0]
        if length < 4 or length - 4 > max_length:
            raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                              f"invalid message length {length} for message type {head[:1]!r}")
        return head[:1], self.read_exact(length - 4)

    def read_password_message(self, what: str) -> bytes:
        """The body of the client's answer to an Authentication request (PasswordMessage/SASL)."""
        t, body = self.read_message(pq.MAX_AUTH_MESSAGE)
        if t == pq.TERMINATE:
            raise ClientGone()
        if t != pq.PASSWORD_MESSAGE:
            raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,     # PostgreSQL's words
                              f"expected {what} response, got message type {t[0]}")
        return body

    def ready_for_relay(self) -> bytes:
        """Login is over: back to blocking mode for the relay.

        Returns what the client sent beyond its login (read ahead with the
        startup packet, e.g. a Terminate or a first Query in the same packet):
        the relay must handle those bytes as the messages they are.
        """
        self.sock.settimeout(None)
        ahead = bytes(self._buf)
        self._buf.clear()
        return ahead
