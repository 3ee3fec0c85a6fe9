"""LISTEN in transaction and statement mode: one listening server connection per identity, fanned out.

A pooled client holds a server connection only while it is in a transaction,
but a listener must hear every notification, also between its transactions.
So, as PgDog does, the proxy answers a client's ``LISTEN channel`` itself and
keeps, per identity (node, user, database) with listening clients, one server
connection of its own (outside ``pool_size``, logged in by the proxy) that
LISTENs on the union of their channels.  Its thread (``IdentityListener``)
reads each NotificationResponse, names the sender as that sender's client was
told (the pid map the relay uses too) and hands a copy to the ``Inbox`` of every
client subscribed to the channel; the inbox's eventfd wakes that client's relay
thread, which sends it between two messages of its own stream: at once when the
client is idle, after its current response when it is busy.  ``UNLISTEN`` and
the client's leaving take its subscriptions away; a channel nobody wants any
more is UNLISTENed, an identity with no channel left closes its connection.

Exact sender pids: a sender's server connection may pass to another client
between the sender's commit and the moment the listener reads its
notification.  So a relay that ran NOTIFY or pg_notify hands its connection on
only after ``sync``: it notifies a channel of the proxy's own
(``SYNC_CHANNEL``) with a fresh token and waits until every listener of that
database has read it, hence everything the connection committed before.

If a listening connection fails, the clients subscribed through it are ended
with an error (they would otherwise miss notifications without knowing it).
"""

from __future__ import annotations

import collections
import itertools
import os
import secrets
import select
import socket
import threading

from . import protocol as pq
from . import tls
from .backend import ServerConnection, quote_literal
from .logs import get_logger

log = get_logger(__name__)

#: The channel the proxy's own sync notifications use (clients never see it).
SYNC_CHANNEL = "threadpool_proxy.sync"
#: How long a relay waits for the listeners to read its sync notification.
SYNC_TIMEOUT = 2.0
#: Notifications waiting for one client at most (bytes); beyond, the client is ended.
INBOX_LIMIT = 16 * 1024 * 1024

_NOTIFICATION = pq.NOTIFICATION_RESPONSE[0]
_READY = pq.READY_FOR_QUERY[0]
_ERROR = pq.ERROR_RESPONSE[0]


class ListenUnavailable(Exception):
    """The proxy could not listen for the client (the login or the LISTEN failed)."""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _eventfd() -> tuple[int, int]:
    if hasattr(os, "eventfd"):
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, fd
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


def _signal(fd: int) -> None:
    try:
        os.write(fd, b"\1\0\0\0\0\0\0\0")
    except OSError:
        pass


def _drain(fd: int) -> None:
    try:
        os.read(fd, 64)
    except OSError:
        pass


class Inbox:
    """One client's notifications, from the listener threads to its relay thread.

    ``fd`` becomes readable when something was put; the relay reads it with
    ``drain`` and takes the messages with ``take``.  ``lost`` says why the
    client can no longer be told everything (its listening connection failed,
    or it did not read its notifications), and ends the client.
    """

    def __init__(self) -> None:
        self.fd, self._wfd = _eventfd()
        self._lock = threading.Lock()
        self._messages: collections.deque = collections.deque()
        self._size = 0
        self.lost: str | None = None
        #: (listener, channel) of every subscription (the client's thread only)
        self.subscriptions: set = set()

    def put(self, message: bytes) -> None:
        with self._lock:
            if self.lost is not None:
                return
            self._messages.append(message)
            self._size += len(message)
            if self._size > INBOX_LIMIT:
                self._messages.clear()
                self.lost = (f"the client did not read its notifications: more than {INBOX_LIMIT >> 20} MiB "
                             f"waited for it")
        _signal(self._wfd)

    def lose(self, why: str) -> None:
        with self._lock:
            if self.lost is None:
                self.lost = why
        _signal(self._wfd)

    def drain(self) -> None:
        _drain(self.fd)

    @property
    def has_mail(self) -> bool:
        return bool(self._messages) or self.lost is not None

    def take(self) -> bytes:
        with self._lock:
            messages = b"".join(self._messages)
            self._messages.clear()
            self._size = 0
        return messages

    def close(self) -> None:
        for fd in {self.fd, self._wfd}:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fd = self._wfd = -1


class _Command:
    """A LISTEN or UNLISTEN for the listener thread to send; ``done`` once its ReadyForQuery came."""

    __slots__ = ("sql", "done", "error")

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.done = threading.Event()
        self.error: str | None = None


class IdentityListener:
    """One identity's listening server connection, its thread, and who listens to what.

    ``channels`` (channel -> inboxes) and ``ready`` (channel -> the command
    that made the server listen to it) are guarded by the hub's lock; the
    thread alone reads and writes the socket.
    """

    def __init__(self, hub: "NotifyHub", key: str, conn: ServerConnection, dbname: str) -> None:
        self.hub = hub
        self.key = key
        self.conn = conn
        self.node = conn.node
        self.dbname = dbname
        self.channels: dict[str, set] = {}
        self.ready: dict[str, _Command] = {}
        self.closing = False
        self._commands: collections.deque = collections.deque()
        self._sent: collections.deque = collections.deque()
        self._wake_r, self._wake_w = _eventfd()
        self._buf = bytearray()
        self.thread = threading.Thread(target=self._run, name=f"tpp-listen-{conn.pid}", daemon=True)

    def start(self) -> None:
        self.send(_Command(f"LISTEN {quote_ident(SYNC_CHANNEL)}"))
        self.thread.start()

    def send(self, command: _Command) -> _Command:
        self._commands.append(command)
        _signal(self._wake_w)
        return command

    def stop(self) -> None:
        self.closing = True
        _signal(self._wake_w)

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        conn = self.conn
        poller = select.poll()
        poller.register(conn.sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        why = "it closed"
        try:
            while not self.closing:
                for fd, _ in poller.poll():
                    if fd == self._wake_r:
                        _drain(self._wake_r)
                        self._send_commands()
                    elif not self._read():
                        return
        except (OSError, ValueError) as exc:
            why = f"it failed: {exc}"
        finally:
            self.hub._gone(self, None if self.closing else why)
            for command in list(self._sent) + list(self._commands):
                command.error = command.error or "the listening connection closed"
                command.done.set()
            try:
                conn.send(pq.TERMINATE_MESSAGE)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            conn.close("its last listening client left" if self.closing else f"listening connection: {why}")
            for fd in {self._wake_r, self._wake_w}:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _send_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            self._sent.append(command)
            self.conn.sock.sendall(pq.query(command.sql))

    def _read(self) -> bool:
        """Read what the server sent; False when it closed."""
        sock = self.conn.sock
        try:
            chunk = sock.recv(65536)
            while chunk and tls.is_tls(sock) and sock.pending():
                chunk += sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        if not chunk:
            return False
        buf = self._buf
        buf += chunk
        pos = 0
        while len(buf) - pos >= 5:
            length = pq.UINT32.unpack_from(buf, pos + 1)[0]
            end = pos + 1 + length
            if length < 4 or end > len(buf):
                if length < 4:
                    return False
                break
            self._message(buf[pos], bytes(buf[pos + 5:end]))
            pos = end
        del buf[:pos]
        return not self.closing

    def _message(self, t: int, body: bytes) -> None:
        if t == _NOTIFICATION:
            self._notification(body)
        elif t == _READY:
            if self._sent:
                command = self._sent.popleft()
                command.done.set()
        elif t == _ERROR:
            fields = pq.parse_error_fields(body)
            if pq.ends_connection(fields):
                raise OSError(fields.get("M", "server error"))
            if self._sent:
                self._sent[0].error = fields.get("M", "server error")

    def _notification(self, body: bytes) -> None:
        pid = pq.INT32.unpack_from(body, 0)[0]
        channel_end = body.index(b"\0", 4)
        channel = body[4:channel_end].decode("utf-8", "surrogateescape")
        if channel == SYNC_CHANNEL:
            payload_end = body.index(b"\0", channel_end + 1)
            self.hub._synced_listener(self, body[channel_end + 1:payload_end].decode("ascii", "replace"))
            return
        told = self.hub.told_pid(self.node, pid)
        message = pq.message(pq.NOTIFICATION_RESPONSE, pq.INT32.pack(told) + body[4:])
        with self.hub.lock:
            inboxes = list(self.channels.get(channel, ()))
        for inbox in inboxes:
            inbox.put(message)


class NotifyHub:
    """The proxy's listening connections, one per identity with listening clients.

    ``subscribe``/``unsubscribe``/``leave`` are called from clients' threads;
    ``dial(startup)`` (given to ``subscribe``) logs in a connection of the
    client's identity that holds no ``pool_size`` slot.  ``backends`` is the
    proxy's map (node, real pid) -> server connection, whose ``holder_pid``
    names a sender.
    """

    def __init__(self, backends, timeout: float) -> None:
        self.backends = backends
        self.timeout = timeout
        self.lock = threading.Lock()
        self._listeners: dict[str, IdentityListener] = {}
        self._dialing: dict[str, threading.Lock] = {}
        self._syncs: dict[str, list] = {}
        self._tokens = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        self.closed = False

    # -- clients ----------------------------------------------------------------------

    def subscribe(self, key: str, dbname: str, channel: str, inbox: Inbox, dial) -> None:
        """Make ``inbox`` receive ``channel``'s notifications; returns once the server listens.

        ListenUnavailable when the connection cannot be opened or the LISTEN fails.
        """
        for _ in range(3):
            listener = self._listener(key, dbname, dial)
            with self.lock:
                if self._listeners.get(key) is not listener:
                    continue                       # its last client left meanwhile: a new one
                listener.channels.setdefault(channel, set()).add(inbox)
                inbox.subscriptions.add((listener, channel))
                command = listener.ready.get(channel)
                if command is None or (command.done.is_set() and command.error):
                    command = listener.ready[channel] = listener.send(_Command(f"LISTEN {quote_ident(channel)}"))
            if not command.done.wait(self.timeout) or command.error:
                self.unsubscribe(inbox, channel)
                raise ListenUnavailable(command.error or "the listening connection did not answer in time")
            return
        raise ListenUnavailable("the listening connection kept closing")

    def unsubscribe(self, inbox: Inbox, channel: str | None) -> None:
        """UNLISTEN ``channel`` (None: every channel) for ``inbox``'s client."""
        for listener, ch in list(inbox.subscriptions):
            if channel is None or ch == channel:
                inbox.subscriptions.discard((listener, ch))
                self._drop(listener, ch, inbox)

    def leave(self, inbox: Inbox) -> None:
        """The client left: it listens to nothing any more."""
        self.unsubscribe(inbox, None)

    def _drop(self, listener: IdentityListener, channel: str, inbox: Inbox) -> None:
        with self.lock:
            subscribers = listener.channels.get(channel)
            if subscribers is None:
                return
            subscribers.discard(inbox)
            if subscribers:
                return
            del listener.channels[channel]
            listener.ready.pop(channel, None)
            if listener.channels:
                listener.send(_Command(f"UNLISTEN {quote_ident(channel)}"))
                return
            if self._listeners.get(listener.key) is listener:
                del self._listeners[listener.key]
        listener.stop()

    def _listener(self, key: str, dbname: str, dial) -> IdentityListener:
        with self.lock:
            if self.closed:
                raise ListenUnavailable("the proxy is shutting down")
            listener = self._listeners.get(key)
            if listener is not None and not listener.closing:
                return listener
            dialing = self._dialing.setdefault(key, threading.Lock())
        with dialing:                  # one login per identity at a time
            with self.lock:
                listener = self._listeners.get(key)
                if listener is not None and not listener.closing:
                    return listener
            try:
                conn = dial()
            except Exception as exc:  # noqa: BLE001 - the client falls back to pinning
                raise ListenUnavailable(str(exc)) from None
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            listener = IdentityListener(self, key, conn, dbname)
            with self.lock:
                if self.closed:
                    conn.close("the proxy is shutting down")
                    raise ListenUnavailable("the proxy is shutting down")
                self._listeners[key] = listener
            listener.start()
            log.info("listening connection %r opened for LISTEN of %s", conn, key.replace("\0", "/"))
            return listener

    def _gone(self, listener: IdentityListener, why: str | None) -> None:
        """A listener's thread ends: forget it; with ``why`` (it failed), end its clients."""
        with self.lock:
            if self._listeners.get(listener.key) is listener:
                del self._listeners[listener.key]
            inboxes = {inbox for subscribers in listener.channels.values() for inbox in subscribers}
            listener.channels.clear()
        if why is not None:
            log.warning("listening connection %r of %s: %s; its %d clients are disconnected", listener.conn,
                        listener.key.replace("\0", "/"), why, len(inboxes))
            for inbox in inboxes:
                inbox.lose(f"the server connection listening for this client's LISTEN closed ({why})")
        self._synced_listener(listener)

    # -- naming senders -------------------------------------------------------------

    def told_pid(self, node: str, pid: int) -> int:
        """The pid the client holding (or last holding) server connection ``pid`` was told, else ``pid``."""
        sender = self.backends.get((node, pid)) if self.backends is not None else None
        if sender is not None and sender.sock.fileno() >= 0 and sender.holder_pid:
            return sender.holder_pid
        return pid

    def listening_on(self, node: str, dbname: str) -> list:
        """The listeners of database ``dbname`` on ``node`` (a NOTIFY there reaches them all)."""
        with self.lock:
            return [listener for listener in self._listeners.values()
                    if listener.node == node and listener.dbname == dbname and not listener.closing]

    def sync(self, node: str, dbname: str, notify) -> None:
        """Wait until every listener of that database has read what a server connection committed so far.

        ``notify(sql)`` runs ``sql`` on that connection (the relay's); no-op when nobody listens there.
        """
        listeners = self.listening_on(node, dbname)
        if not listeners:
            return
        token = f"{self._prefix}:{next(self._tokens)}"
        done = threading.Event()
        with self.lock:
            self._syncs[token] = [done, set(listeners)]
        try:
            notify(f"SELECT pg_catalog.pg_notify({quote_literal(SYNC_CHANNEL)}, {quote_literal(token)})")
            if not done.wait(SYNC_TIMEOUT):
                log.info("listeners did not read a sync notification within %g s; a sender pid may name "
                         "the next client of its connection", SYNC_TIMEOUT)
        finally:
            with self.lock:
                self._syncs.pop(token, None)

    def _synced_listener(self, listener: IdentityListener, token: str | None = None) -> None:
        """``listener`` read sync ``token`` (None: it is gone, it waits for nothing)."""
        with self.lock:
            for key, (done, waiting) in list(self._syncs.items()):
                if token is None or key == token:
                    waiting.discard(listener)
                    if not waiting:
                        done.set()

    def close(self) -> None:
        """Shutdown: close every listening connection."""
        with self.lock:
            self.closed = True
            listeners = list(self._listeners.values())
            self._listeners.clear()
        for listener in listeners:
            listener.stop()
