"""Turning clients away as PostgreSQL does: the SSLRequest answered, the startup packet read, then the FATAL.

libpq (sslmode=prefer, its default) opens with an SSLRequest.  An
ErrorResponse in place of its answer reaches the user as "server sent an error
response during SSL exchange", never as the reason.  PostgreSQL answers the
SSLRequest ('N', or TLS), reads the startup packet, and only then says "sorry,
too many clients already".  The ``Refuser`` does the same for every connection
the proxy will not serve (max_client_conn reached, shutting down, out of file
descriptors).

All refusals under way share one thread and one poll set: a refusal costs a
socket and a few hundred bytes, never a thread.  Each is bounded in time
(``REFUSAL_TIMEOUT`` for the whole exchange; ``HURRIED_FIRST_PACKET`` for the
first packet of a client refused for want of descriptors, which holds the
proxy's one spare descriptor meanwhile) and in bytes (the largest startup
packet).  A client silent until then, or sending anything else, gets the
reason all the same, then the close.  Beyond ``capacity`` refusals under way,
the reason is sent at once (``refuse_now``).
"""

from __future__ import annotations

import collections
import os
import select
import socket
import ssl
import threading
import time
from typing import Callable, Optional

from . import protocol as pq
from . import tls
from .logs import get_logger

log = get_logger(__name__)

#: Seconds a refused client gets for its whole exchange (SSLRequest, TLS, startup packet), so it can read why.
REFUSAL_TIMEOUT = 2.0

#: Seconds a client refused for want of file descriptors gets to send its first packet (libpq sends it
#: as soon as it is connected: it is there, or nearly), and then for the rest of its exchange: it holds
#: the spare descriptor, and the clients queued behind it wait for that.
HURRIED_FIRST_PACKET = 0.05
HURRIED_TIMEOUT = 0.5

#: Bytes read from a refused client, at most: a startup packet (PostgreSQL's limit) and the SSLRequest before it.
MAX_REFUSAL_BYTES = pq.MAX_STARTUP_PACKET_LENGTH + 16

_IN = select.POLLIN
_OUT = select.POLLOUT
_TLS_WANTS = {ssl.SSLWantReadError: _IN, ssl.SSLWantWriteError: _OUT}


def refuse_now(sock: socket.socket, error: bytes) -> None:
    """Answer a connection with ``error`` at once, never blocking (nothing read first but what is there)."""
    try:
        sock.setblocking(False)
        try:
            sock.recv(65536)              # what it sent already: closing with unread data would reset
        except OSError:
            pass
        sock.send(error)
    except OSError:
        pass


def startup_packet(buf: bytearray) -> Optional[tuple]:
    """(code, body after the code) of the whole startup-phase packet at the front of ``buf``, taken
    out of it; None while it is incomplete.  ValueError for a length no packet has."""
    if len(buf) < 8:
        return None
    length = pq.INT32.unpack_from(buf, 0)[0]
    if length < 8 or length > pq.MAX_STARTUP_PACKET_LENGTH:
        raise ValueError(length)
    if len(buf) < length:
        return None
    code = pq.INT32.unpack_from(buf, 4)[0]
    body = bytes(buf[8:length])
    del buf[:length]
    return code, body


class _Refusal:
    """One connection being turned away: its socket (plain, then maybe TLS), what it sent, what is owed."""

    __slots__ = ("sock", "fd", "error", "deadline", "hurried", "buf", "out", "closing", "client_tls",
                 "handshaking", "encrypted", "negotiated", "spoke", "done", "on_close")

    def __init__(self, sock: socket.socket, error: bytes, deadline: float, hurried: bool, client_tls,
                 on_close: Optional[Callable[[], None]]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.error = error
        self.deadline = deadline
        self.hurried = hurried
        self.buf = bytearray()
        self.out = b""                # owed to the client, not sent yet
        self.closing = False          # close once ``out`` is sent
        self.client_tls = client_tls  # a ClientTLS: an SSLRequest is answered 'S', else 'N'
        self.handshaking = 0          # poll events the TLS handshake waits for (0: none under way)
        self.encrypted = False
        self.negotiated = False       # an SSLRequest or GSSENCRequest was answered (once only, as in PostgreSQL)
        self.spoke = False            # it sent something
        self.done = False             # closed
        self.on_close = on_close


class Refuser:
    """Turns connections away in one thread of its own, started by a refusal and gone when none is left.

    ``refuse(sock, error, ...)`` takes a socket (the caller lets go of it) and
    answers it as PostgreSQL would; False when ``capacity`` refusals are under
    way (the caller answers it at once).  ``on_cancel(pid, secret)`` gets a
    CancelRequest that came on a refused connection (PostgreSQL serves those
    however full it is); it must not block.  ``stop()`` closes what is left.
    """

    def __init__(self, capacity: int, on_cancel: Callable[[int, bytes], None]) -> None:
        self.capacity = capacity
        self.on_cancel = on_cancel
        self._lock = threading.Lock()
        self._incoming: collections.deque = collections.deque()
        self._count = 0                   # refusals taken and not yet closed
        self._thread: Optional[threading.Thread] = None
        self._stopped = False
        # How refuse() wakes the thread: made now, while descriptors are there to make it.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = select.poll()
        self._poller.register(self._wake_r, _IN)
        self._live: dict = {}            # fd -> _Refusal (the thread's own)

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def refuse(self, sock: socket.socket, error: bytes, client_tls=None, hurried: bool = False,
               on_close: Optional[Callable[[], None]] = None) -> bool:
        """Turn ``sock`` away with ``error`` (an ErrorResponse) after its startup packet; False if full."""
        with self._lock:
            if self._stopped or self._count >= self.capacity:
                return False
            self._count += 1
            now = time.monotonic()
            self._incoming.append(_Refusal(sock, error, now + (HURRIED_FIRST_PACKET if hurried else REFUSAL_TIMEOUT),
                                           hurried, client_tls, on_close))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="threadpool_proxy-refuser", daemon=True)
                self._thread.start()
        self._wake()
        return True

    def stop(self) -> None:
        """Close every connection still being refused, and the thread's descriptors."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            thread = self._thread
        self._wake()
        if thread is not None:
            thread.join(5)
        if thread is None or not thread.is_alive():
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass                          # the pipe is full: the thread is awake already

    # -- the thread ----------------------------------------------------------------

    def _run(self) -> None:
        """Until nothing is left to refuse (the next refusal starts another thread), or ``stop()``."""
        poller, live = self._poller, self._live
        try:
            while True:
                timeout = None
                if live:
                    timeout = max(0, int((min(r.deadline for r in live.values()) - time.monotonic()) * 1000) + 1)
                else:
                    with self._lock:
                        if not self._incoming and not self._stopped:
                            self._thread = None       # idle: no thread kept for refusals that may never come
                            return
                for fd, events in poller.poll(timeout):
                    if fd == self._wake_r:
                        self._take_incoming()
                        continue
                    r = live.get(fd)
                    if r is None:
                        continue
                    try:
                        self._step(r, events)
                    except (OSError, ValueError):
                        self._close(r)
                if self._stopped:
                    break
                now = time.monotonic()
                for r in [r for r in live.values() if r.deadline <= now]:
                    self._time_up(r)
        except BaseException:
            log.exception("the refuser failed; closing the connections it was refusing")
            raise
        finally:
            if self._thread is threading.current_thread():      # stopped, or failed: nobody takes over
                with self._lock:
                    self._stopped = True
                self._take_incoming()
                for r in list(live.values()):
                    self._close(r)

    def _take_incoming(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except OSError:
            pass
        while True:
            with self._lock:
                if not self._incoming:
                    return
                r = self._incoming.popleft()
            try:
                r.sock.setblocking(False)
            except OSError:
                self._close(r)
                continue
            self._live[r.fd] = r
            self._poller.register(r.fd, _IN)
            try:
                self._step(r, _IN)        # its first packet is often there already
            except (OSError, ValueError):
                self._close(r)

    def _step(self, r: _Refusal, events: int) -> None:
        """What ``r`` can do now: flush what is owed, go on with a handshake, read and answer."""
        if r.out:
            self._flush(r)
            return
        if r.handshaking:
            self._handshake(r)
            return
        if events & (select.POLLHUP | select.POLLERR) and not events & _IN:
            self._close(r)
            return
        self._read(r)

    def _read(self, r: _Refusal) -> None:
        while True:
            try:
                data = r.sock.recv(MAX_REFUSAL_BYTES - len(r.buf) + 1)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            if not data:
                self._close(r)            # gone: nobody to tell
                return
            if not r.spoke:
                r.spoke = True
                if r.hurried:
                    r.deadline = time.monotonic() + HURRIED_TIMEOUT
            r.buf += data
            if len(r.buf) > MAX_REFUSAL_BYTES:
                self._answer(r)
                return
            if not r.negotiated and r.client_tls is not None and r.buf[0] == tls.TLS_HANDSHAKE_BYTE:
                r.negotiated = True
                self._start_tls(r)        # PostgreSQL 17's direct TLS: no SSLRequest
                return
            try:
                packet = startup_packet(r.buf)
            except ValueError:
                self._answer(r)
                return
            if packet is None:
                continue
            code, body = packet
            if code in (pq.SSL_REQUEST_CODE, pq.GSSENC_REQUEST_CODE) and not r.negotiated and not r.buf:
                r.negotiated = True
                if code == pq.SSL_REQUEST_CODE and r.client_tls is not None:
                    r.sock.send(b"S")     # one byte into an empty send buffer
                    self._start_tls(r)
                    return
                self._send(r, b"N")       # no encryption: its startup packet comes next
                if r.out:
                    return
                continue
            if code == pq.CANCEL_REQUEST_CODE and len(body) == 8:
                self._close(r)
                try:
                    self.on_cancel(pq.INT32.unpack_from(body, 0)[0], body[4:8])
                except Exception:          # noqa: BLE001 - a cancel that fails never stops the refuser
                    log.exception("forwarding a cancel request that came while refusing clients")
                return
            self._answer(r)               # a startup packet, or anything else: the reason
            return

    def _start_tls(self, r: _Refusal) -> None:
        sock = r.client_tls.context.wrap_socket(r.sock, server_side=True, do_handshake_on_connect=False)
        r.sock, r.encrypted = sock, True
        self._handshake(r)

    def _handshake(self, r: _Refusal) -> None:
        try:
            r.sock.do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError) as exc:
            wants = _TLS_WANTS[type(exc)]
            if wants != r.handshaking:
                self._poller.modify(r.fd, wants)
            r.handshaking = wants
            return
        except (OSError, ValueError):
            self._close(r)                # a failed handshake cannot be answered
            return
        if r.handshaking != _IN:
            self._poller.modify(r.fd, _IN)
        r.handshaking = 0
        r.buf.clear()
        self._read(r)                     # the startup packet may have come with the handshake's end

    def _answer(self, r: _Refusal) -> None:
        """Tell the client why, then close."""
        r.closing = True
        self._send(r, r.error)

    def _send(self, r: _Refusal, data: bytes) -> None:
        r.out = data
        self._flush(r)

    def _flush(self, r: _Refusal) -> None:
        try:
            while r.out:
                n = r.sock.send(r.out)
                r.out = r.out[n:]
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            self._poller.modify(r.fd, _OUT)
            return
        if r.closing:
            self._close(r)
        else:
            self._poller.modify(r.fd, _IN)

    def _time_up(self, r: _Refusal) -> None:
        """Its time is up: silent, or stuck half-way: the reason if it can be sent now, then the close."""
        if r.handshaking:
            self._close(r)
            return
        r.closing = True
        if not r.out:
            r.out = r.error
        try:
            r.sock.send(r.out)
        except OSError:
            pass
        self._close(r)

    def _close(self, r: _Refusal) -> None:
        if r.done:
            return
        r.done = True
        if self._live.pop(r.fd, None) is not None:
            self._poller.unregister(r.fd)
        try:
            r.sock.recv(65536)            # what it sent last: closing with unread data would reset
        except (OSError, ValueError):
            pass
        try:
            r.sock.close()
        except OSError:
            pass
        with self._lock:
            self._count -= 1
        if r.on_close is not None:
            r.on_close()
