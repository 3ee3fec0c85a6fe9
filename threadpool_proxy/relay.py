"""The relay: one client's bytes to its server connection and back, driven by poll().

Only message headers are looked at (protocol.ClientScanner/ServerScanner).  In
transaction and statement mode the client reaches a release point when every
request sent has been answered (one ReadyForQuery per Query, Sync and
FunctionCall), nothing extended is unsynced, both streams are between
messages, and the status is idle.  There the server connection is released
(reset, parked) if any client is waiting for one of its key; otherwise the
client keeps it "lingering", at no cost, until its next transaction or until a
waiter wakes it to let go (see BackendIdlePool.linger).  Either way no other
client can see this client's session state.

A pooled client's Query and Parse texts are also looked at, cheaply
(protocol.StatementScanner, sessionstate.py), for the session state they
create: settings are read back before the connection passes on (they follow
the client, checkout.py sets them again), state that cannot follow pins the
client to its connection, and a lone LISTEN is answered by the proxy, whose
listening connection (listen.py) fans notifications out to the client's inbox.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from . import protocol as pq
from . import sessionstate
from . import tls
from .backend import ServerConnection
from .prepared import ClientStatements, PreparedRelay, ServerStatements
from .checkout import ClientSettings, ServerCheckout
from .config import DEFAULT_RESET_QUERY
from .errors import (ClientFatal, ClientGone, ErrorAlreadySent, MessageTooLarge, PoolClosed, QueryCanceled,
                     ServerError, ServerGone)
from .events import PIN, SERVER_RELEASE, STATEMENT_REFUSED, STATEMENT_REPREPARED
from .listen import Inbox, ListenUnavailable
from .logs import get_logger
from .sessionstate import SessionState

# Buffers are per client thread, so they decide the memory of many idle clients:
# requests are small (16 KiB, COPY IN just takes more reads); the server buffer
# is allocated on the first answer, and grows once if a read fills it.
CLIENT_BUFFER_SIZE = 16 * 1024
SERVER_BUFFER_SIZE = 64 * 1024
SERVER_BUFFER_MAX = 256 * 1024

#: A client may hold this many times max_prepared_statements names (beyond, its
#: Parse gets 53400): the server-side limit evicts least recently used
#: statements, the client-side one only guards the proxy's memory against a
#: client that never closes what it prepares.
CLIENT_STATEMENTS_FACTOR = 10
#: The bytes of the Parse messages of a client's statements together: at most this many
#: times max_tracked_message_size (also against a client that never closes what it prepares).
CLIENT_STATEMENT_BYTES_FACTOR = 16

_POLLIN = select.POLLIN

log = get_logger(__name__)

#: The client timers (config key -> SQLSTATE and message).  The idle ones end
#: the client with what PostgreSQL says for its own idle_session_timeout and
#: idle_in_transaction_session_timeout, so drivers treat them alike.
CLIENT_IDLE = ("client_idle_timeout", pq.SQLSTATE_IDLE_SESSION_TIMEOUT,
               "terminating connection due to idle-session timeout")
IDLE_TRANSACTION = ("idle_transaction_timeout", pq.SQLSTATE_IDLE_IN_TRANSACTION_TIMEOUT,
                    "terminating connection due to idle-in-transaction timeout")
CLIENT_STALL = ("client_stall_timeout", pq.SQLSTATE_PROTOCOL_VIOLATION,
                "terminating connection: the client stopped in the middle of a message")
_IDLE = pq.IDLE[0]
_QUERY = pq.QUERY[0]
_BIND = pq.BIND[0]
_PARSE_TYPE = pq.PARSE[0]

#: Seconds the proxy's own query at a release point (settings read back, pins verified) waits for a
#: CancelRequest of the client still on its way to the server (Relay._ask_server).
CANCEL_LANDING_WAIT = 1.0

#: Named prepared statements of one client whose every execution is looked at (a NOTIFY,
#: a SET, a pinning statement prepared once and run many times); more are seen only at Parse.
MAX_WATCHED_STATEMENTS = 1000


class Relay:
    """Relays one logged-in client until either side leaves; ``run()`` raises when it ends.

    Owns the poller, the two scanners, the count of unanswered requests, the
    lingering state and the attached server connection (``backend``), which a
    concurrent CancelRequest reads (and marks) through ``cancel_target()``.
    """

    __slots__ = ("client", "cfd", "checkout", "pool", "key", "settings", "pooled", "statement_mode",
                 "linger_ms", "poller", "cbuf", "cview", "sbuf", "sview", "cscan", "sscan",
                 "backend", "ssock", "sfd", "backend_lock", "pending", "lingering", "registered", "check_release",
                 "due", "server_due", "crecv", "srecv", "wake_rfd", "wake_wfd", "prepared", "prepared_limit",
                 "tracking", "stats", "unanswered", "idle_timeout", "idle_transaction_timeout",
                 "stall_timeout", "idle_timers", "timer_at", "timer", "timer_mark", "client_pid",
                 "stop_requested", "events", "reported", "used_from", "attached_at", "state", "who", "pin_key",
                 "hub", "listen_dial", "inbox", "statement_effects")

    def __init__(self, client: socket.socket, checkout: ServerCheckout, settings: ClientSettings,
                 pool_mode: str, linger_timeout: float) -> None:
        self.client = client
        self.cfd = client.fileno()
        self.checkout = checkout
        self.stats = checkout.stats       # this client's counters (stats.py), written by this thread only
        self.pool = checkout.pool
        self.key = checkout.key
        self.settings = settings
        self.pooled = pool_mode != "session"
        self.statement_mode = pool_mode == "statement"
        self.linger_ms = int(linger_timeout * 1000)
        config = checkout.config
        self.idle_timeout = config.client_idle_timeout
        self.idle_transaction_timeout = config.idle_transaction_timeout
        self.stall_timeout = config.client_stall_timeout
        self.idle_timers = bool(self.idle_timeout or self.idle_transaction_timeout)
        # One client timer at a time (the client is idle, idle in a transaction, or
        # stopped mid-message): its deadline (0.0: none armed), which one, and
        # stats.received when it was armed (bytes since then disarm it).
        self.timer_at = 0.0
        self.timer = CLIENT_IDLE
        self.timer_mark = 0
        self.poller = select.poll()
        self.poller.register(self.cfd, _POLLIN)
        self.cbuf = bytearray(CLIENT_BUFFER_SIZE)
        self.cview = memoryview(self.cbuf)
        self.sbuf = None
        self.sview = None
        # A pooled client's Query and Parse texts are looked at (cheaply) for statements
        # that change session state: settings follow it, other state pins it (sessionstate.py).
        self.cscan = (pq.StatementScanner(sessionstate.looks_interesting, sessionstate.plain_match,
                                           config.max_tracked_message_size)
                      if self.pooled else pq.ClientScanner())
        self.state = SessionState(config.pin_on) if self.pooled else None
        self.who = ""                     # the client, for log lines (the session sets it)
        self.pin_key = None               # the pool key whose count of pinned clients holds this one
        self.statement_effects: dict = {}  # name -> Effects of the client's watched prepared statements
        # LISTEN taken over by the proxy (listen.py): the hub, how to log in its listening
        # connection (None: the proxy cannot log in by itself), this client's notifications.
        self.hub = None
        self.listen_dial = None
        self.inbox: Inbox | None = None
        self.sscan = pq.ServerScanner(config.max_tracked_message_size)
        self.backend: ServerConnection | None = None
        self.ssock = None
        self.sfd = -1
        self.backend_lock = threading.Lock()     # guards ``backend`` against a concurrent cancel
        self.pending = 0                  # requests sent that have not had their ReadyForQuery
        self.lingering = False            # keeping an idle backend that a waiter may claim
        # Entered in the pool's list of clients keeping a connection (BackendIdlePool.linger), as far
        # as this thread knows: it stays there from one transaction to the next, so a client that
        # nobody asks for its connection takes no pool lock per transaction; a waiter's claim removes it.
        self.registered = False
        self.check_release = False        # look for a release point at the top of the loop
        # Events to handle without a poll(): the server's answer after a whole
        # request went out; a TLS socket holding decrypted bytes (no poll() sees those).
        self.due = ()
        self.server_due = ()
        # recv_into of each side: the socket's own, or under TLS one that drains pending().
        self.crecv = self._client_tls_recv if tls.is_tls(client) else client.recv_into
        self.srecv = None
        self.unanswered = False           # bytes with no request in them went out since the last release
        self.wake_rfd = -1
        self.wake_wfd = -1
        # Named prepared statements follow a pooled client from one server
        # connection to the next (prepared.py); in session mode names are the client's own.
        self.prepared_limit = checkout.db.max_prepared_statements if self.pooled else 0
        held = config.max_tracked_message_size
        self.prepared = (PreparedRelay(ClientStatements(self.prepared_limit * CLIENT_STATEMENTS_FACTOR,
                                                        held * CLIENT_STATEMENT_BYTES_FACTOR), held)
                         if self.prepared_limit else None)
        # Simple Query traffic passes untracked, at the usual header-only cost,
        # until the client's first extended-protocol message (_start_tracking).
        self.tracking = False
        # The pid this client was told (BackendKeyData): each server connection it
        # takes remembers it, so a NOTIFY it sends can be shown to listeners as its own.
        self.client_pid = 0
        # A graceful shutdown asked this client to leave at its next release point (request_stop).
        self.stop_requested = False
        # The embedding program's hooks (events.EventHub, set by the session): told at release points
        # of statements re-prepared or refused (``reported``: the counts told so far) and of releases
        # of a connection the client used (``used_from``: its query count when it took the connection).
        self.events = None
        self.reported = (0, 0)
        self.used_from = 0
        self.attached_at = 0.0        # time.monotonic() of the attach, while hooks listen: the events' ``at``

    # -- the loop -------------------------------------------------------------------

    def run(self) -> None:
        """Copy bytes both ways until one side leaves: ClientGone, ClientFatal... end it."""
        poll = self.poller.poll
        cfd = self.cfd
        on_client_readable = self.on_client_readable
        on_server_readable = self.on_server_readable
        if tls.is_tls(self.client) and self.client.pending():
            self._due(((cfd, _POLLIN),))     # decrypted during login, unseen by poll()
        if self.wake_rfd < 0:
            self._make_wake_fd()             # how waiters, and a graceful shutdown, reach this thread
        if self.idle_timers:
            self._arm_idle_timer()
        try:
            while True:
                if self.check_release:
                    self.check_release = False
                    if self.backend is not None and self.at_release_point():
                        self._keep_or_hand_on()
                due = self.due
                if due:
                    # A whole request went out and nothing came back yet: the
                    # server owes an answer, so read it without a poll() first;
                    # or a TLS socket has bytes decrypted that poll() cannot see.
                    self.due = ()
                    events = due
                elif self.backend is None and not self.timer_at and self.inbox is None:
                    # Between transactions with no server connection (it went to
                    # a waiter): only the client can speak, so its socket is read
                    # straight away, without a poll() first.  A KILL or shutdown
                    # wakes this read as it would the poll (shutdown of the socket).
                    on_client_readable()
                    continue
                else:
                    if self.timer_at:        # only while a client timer is armed
                        events = poll(self._timer_poll_ms())
                    else:
                        events = poll(self.linger_ms if self.lingering else None)
                    if not events:
                        self._poll_timed_out()
                        continue
                    if self.lingering and len(events) > 1:
                        # What the idle server said comes first: a terminated or
                        # restarting server's FATAL detaches it before the
                        # client's next request could be sent into it.
                        events.sort(key=lambda event: event[0] != self.sfd)
                for fd, _ in events:
                    if fd == cfd:
                        on_client_readable()
                    elif fd == self.sfd:
                        on_server_readable()
                    elif fd == self.wake_rfd:
                        self.on_wake()
                    elif self.inbox is not None and fd == self.inbox.fd:
                        self.on_mail()
                    # else: an event of a server connection released earlier in this batch
        except BaseException as exc:
            self.leave(clean=isinstance(exc, ClientGone))
            raise

    def at_release_point(self) -> bool:
        """Every request answered, nothing extended unsynced, both streams between messages, idle."""
        cscan, sscan = self.cscan, self.sscan
        return (self.pending == 0 and sscan.status == _IDLE and not cscan.unsynced and cscan.at_boundary
                and sscan.at_boundary and not sscan.copy_in
                and (not self.tracking or self.prepared.idle()))

    def on_client_readable(self) -> None:
        cscan = self.cscan
        try:
            n = self.crecv(self.cbuf)
        except OSError:
            n = 0
        if not n:
            raise ClientGone()
        self.stats.received += n
        requests_before = cscan.requests
        extended_before = cscan.extended
        cscan.feed(self.cview, n)
        if cscan.terminated:
            if cscan.invalid >= 0:
                raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,       # PostgreSQL's words; nothing is sent
                                  f"invalid frontend message type {cscan.invalid}")
            n = self.cbuf.rfind(pq.TERMINATE_MESSAGE, 0, n)    # forward what came before it
            if n <= 0:
                raise ClientGone()
        if cscan.looked:
            n = self._look_at_statements(n)
            if n < 0:
                return                    # answered by the proxy: nothing goes to the server
        new_requests = cscan.requests - requests_before
        if self.lingering:
            # Still entered in the pool's list: a waiter that claims it from now on is
            # answered at this transaction's release point (the wake-up is drained then).
            self.lingering = False
            self.unanswered = False
        elif self.backend is None:
            try:
                self.attach(self.checkout.obtain(
                    cancelable=new_requests > 0 and cscan.at_boundary and not cscan.unsynced))
            except QueryCanceled as exc:
                # A CancelRequest ended the wait: the chunk is dropped whole, never sent, and
                # each request in it is answered as PostgreSQL answers a canceled one.
                try:
                    self.client.sendall(exc.raw * new_requests)
                except OSError:
                    raise ClientGone() from None
                if self.idle_timers:
                    self._arm_idle_timer()
                return
        if new_requests:
            self.stats.requests_sent(new_requests, self.pending == 0)
        self.pending += new_requests
        if not self.tracking and self.prepared is not None and (
                cscan.extended != extended_before or not cscan.at_boundary):
            self._start_tracking(new_requests)
        if self.tracking:
            try:
                to_server, to_client = self.prepared.from_client(self.cview[:n], self.backend.statements)
            except MessageTooLarge:
                self._message_refused()
                raise
        else:
            to_server, to_client = self.cview[:n], None
        try:
            self.ssock.sendall(to_server)
        except OSError:
            self._server_lost(unread=True)
        if to_client:
            # Replies the proxy made (ParseComplete of a statement this connection
            # already has, CloseComplete) with nothing before them on the wire.
            try:
                self.client.sendall(to_client)
            except OSError:
                raise ClientGone() from None
        if cscan.terminated:
            raise ClientGone()
        if new_requests > 0 and cscan.at_boundary and not cscan.unsynced and not self.sscan.copy_in:
            if self.due:
                self._due(self.server_due)
            else:
                self.due = self.server_due
        if self.stall_timeout and not cscan.at_boundary:
            self._arm_timer(CLIENT_STALL, self.stall_timeout)
        if new_requests == 0 and self.pending == 0:
            # A chunk with no request in it (a lone Flush) gets no answer: check the
            # release point now, not at a ReadyForQuery that never comes; but should
            # the server answer it after all (a FATAL), that answer is the client's.
            self.check_release = self.unanswered = self.pooled
            if self.idle_timers:
                self._arm_idle_timer()
        else:
            self.check_release = False

    def on_server_readable(self) -> None:
        if self.due:
            # Read now: no blocking read for an answer this read may be taking.
            self.due = tuple(e for e in self.due if e[0] != self.sfd)
        sbuf = self.sbuf
        if sbuf is None:
            sbuf = self.sbuf = bytearray(SERVER_BUFFER_SIZE)
            self.sview = memoryview(sbuf)
        try:
            n = self.srecv(sbuf)
        except OSError:
            n = 0
        if n == len(sbuf) and n < SERVER_BUFFER_MAX:
            # A big answer: carry on with the larger buffer (after this chunk).
            grown = bytearray(SERVER_BUFFER_MAX)
            grown[:n] = sbuf
            self.sbuf = grown
            self.sview = memoryview(grown)
        view = self.sview
        if self.lingering:
            self._lingering_backend_spoke(view, n)
            return
        if not n:
            self._server_lost()
        self._from_server(view, n)

    def _from_server(self, view, n: int) -> None:
        """Relay ``view[:n]``, the server's next bytes, to the client (and follow them)."""
        if self.tracking:
            view = self.prepared.from_server(view[:n])
            n = len(view)
        sscan = self.sscan
        sscan.feed(view, n)
        if sscan.notified:
            view, n = self._name_notifiers(view, n)
        ready = sscan.ready
        if ready and self.statement_mode and sscan.status != _IDLE:
            self._refuse_transaction_block(view, n)
        if ready and self.state is not None and self.state.suspects and ready >= self.pending:
            view, n = self._settle_before_ready(view, n)
        try:
            self.client.sendall(view[:n])
        except OSError:
            raise ClientGone() from None
        self.stats.sent += n
        if sscan.parameters:
            self._note_parameters()
        if ready:
            sscan.ready = 0
            pending = self.pending - ready
            self.pending = pending if pending > 0 else 0
            if not self.pending:
                self.stats.answered(sscan.xacts, sscan.status != _IDLE)
                sscan.xacts = 0
                if self.idle_timers:
                    self._arm_idle_timer()
        if self.inbox is not None and not self.pending and sscan.at_boundary and self.inbox.has_mail:
            self._deliver_notifications()        # they waited for this answer to end
        # (Session mode looks for a release point only while a graceful shutdown waits for it.)
        self.check_release = (self.pooled or self.stop_requested) and self.pending == 0

    def _start_tracking(self, new_requests: int) -> None:
        """The client's first extended-protocol chunk: from here on both streams go
        through the prepared-statement tracker.

        The tracker must start between messages on both streams.  The client's
        is (every untracked chunk ended at a boundary, or it is tracked); the
        server's may be in the middle of an answer to an earlier request, whose
        rest the server owes: it is read and passed on first.  The requests sent
        before this chunk and still unanswered are handed to the tracker.
        """
        while not self.sscan.at_boundary:
            self.on_server_readable()
        self.prepared.engage(max(0, self.pending - new_requests))
        self.tracking = True

    # -- client timers: client_idle_timeout, idle_transaction_timeout, client_stall_timeout --
    #
    # Armed only where they apply (every request answered; or the client's
    # stream ends mid-message), each at most once per transaction or chunk; the
    # loop computes a poll() timeout only while one is armed, and the client's
    # next bytes disarm it there, by the byte count, not by work per chunk.

    def _arm_timer(self, timer, seconds: float) -> None:
        self.timer, self.timer_at, self.timer_mark = timer, time.monotonic() + seconds, self.stats.received

    def _arm_idle_timer(self) -> None:
        """Every request is answered: the client is idle, in a transaction or not."""
        if not self.cscan.at_boundary:
            return                                  # mid-message: client_stall_timeout's case
        if self.sscan.status == _IDLE:
            if self.idle_timeout:
                self._arm_timer(CLIENT_IDLE, self.idle_timeout)
        elif self.idle_transaction_timeout:
            self._arm_timer(IDLE_TRANSACTION, self.idle_transaction_timeout)

    def _timer_poll_ms(self) -> int | None:
        """poll()'s timeout with a timer armed: what is left of it (or of lingering, if sooner)."""
        linger = self.linger_ms if self.lingering else None
        if self.stats.received != self.timer_mark:
            self.timer_at = 0.0                     # the client spoke since it was armed
            return linger
        left = self.timer_at - time.monotonic()
        if left <= 0:
            self._timer_expired()
        ms = int(left * 1000) + 1
        return ms if linger is None or ms < linger else linger

    def _poll_timed_out(self) -> None:
        if self.timer_at and time.monotonic() >= self.timer_at:
            self._timer_expired()
        if self.lingering:
            self._linger_expired()

    def _timer_expired(self):
        """End the client: its server connection is closed (its state is the client's), never parked."""
        name, sqlstate, text = self.timer
        seconds = {CLIENT_IDLE: self.idle_timeout, IDLE_TRANSACTION: self.idle_transaction_timeout,
                   CLIENT_STALL: self.stall_timeout}[self.timer]
        self._stop_lingering()
        self.detach(park=False, reason=f"{name} ({seconds:g} s) ended its client")
        if not self.sscan.at_boundary:
            raise ErrorAlreadySent()        # a server message is half relayed: nothing can follow it
        raise ClientFatal(sqlstate, text, detail=f"threadpool_proxy: {name} is {seconds:g} s.")

    def _due(self, events) -> None:
        """Handle ``events`` on the next turn without a poll() (once each)."""
        due = self.due
        self.due = events if not due else due + tuple(e for e in events if e not in due)

    def replay(self, data: bytes) -> None:
        """Relay ``data``, read from the client before the relay started, as if it came now.

        The client's recv is swapped for one that hands out ``data`` first
        (``cbuf`` at a time) and then puts the real one back: no cost after.
        """
        recv = self.crecv
        data = memoryview(data)

        def replayed(buf) -> int:
            nonlocal data
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            data = data[n:]
            if data:
                self._due(((self.cfd, _POLLIN),))
            else:
                self.crecv = recv
            return n

        self.crecv = replayed
        self._due(((self.cfd, _POLLIN),))

    # -- TLS: bytes decrypted but not read yet do not make the descriptor readable ---

    def _client_tls_recv(self, buf) -> int:
        return self._tls_recv(self.client, buf, ((self.cfd, _POLLIN),))

    def _server_tls_recv(self, buf) -> int:
        return self._tls_recv(self.ssock, buf, self.server_due)

    def _tls_recv(self, sock, buf, again) -> int:
        """recv_into, then what OpenSSL has decrypted already, while it fits; what does
        not fit is read on the next turn of the loop, without a poll() (``again``)."""
        n = sock.recv_into(buf)
        size = len(buf)
        while n and sock.pending():
            if n == size:
                self._due(again)
                break
            with memoryview(buf) as view:
                n += sock.recv_into(view[n:])
        return n

    def on_wake(self) -> None:
        """A waiter wants our lingering connection: reset and park it for them.

        Or a graceful shutdown asks this client to leave (``request_stop``):
        now if it is between transactions, else at its next release point.
        """
        self._drain_wake()
        if self.lingering:
            self._stop_lingering()
            self._release()
        if self.stop_requested and (self.backend is None or self.at_release_point()):
            self.detach(park=True)
            raise PoolClosed()

    def request_stop(self) -> bool:
        """From another thread (graceful shutdown): leave at the next release point.

        The client is told SHUTDOWN_NOTICE there (session.py), after its
        transaction's last answer.  False if the thread cannot be woken yet
        (its relay has not started): ask again later.
        """
        self.stop_requested = True
        if self.wake_wfd < 0:
            return False
        self.wake()
        return True

    # -- the attached server connection -------------------------------------------

    def attach(self, conn: ServerConnection) -> None:
        with self.backend_lock:
            self.backend = conn
        conn.holder_pid = self.client_pid
        self.key = self.checkout.key      # several nodes: the key of this connection's node
        self.ssock = conn.sock
        self.sfd = conn.sock.fileno()
        self.server_due = ((self.sfd, _POLLIN),)
        self.srecv = self._server_tls_recv if conn.tls else conn.sock.recv_into
        self.poller.register(self.sfd, _POLLIN)
        if self.prepared_limit and conn.statements is None:
            conn.statements = ServerStatements(self.prepared_limit)
        # The login connection of a pooled client: keep it while nobody waits.
        self.check_release = self.pooled
        self.used_from = self.stats.query_count
        events = self.events
        if events is not None and events.active:
            self.attached_at = time.monotonic()

    def detach(self, park: bool, reason: str = "its state is unknown", leaving: bool = False) -> None:
        """Let go of the server connection: reset and park it, or close it (``reason`` is logged).

        Before it goes to anyone else, the settings this client changed are read
        back from it (they follow the client); unless the client is ``leaving``.
        A pinned client's state goes with the connection (the reset undoes it;
        a reset_query other than DISCARD ALL may not, so such a connection is closed).

        While a CancelRequest for it is on its way to the server, the rest is left
        to ``cancel_done``: the connection goes to nobody before the cancel has
        reached PostgreSQL, so it can only hit this client's statement.
        """
        state = self.state
        if state is not None and self.backend is not None:
            if park and state.notified and self.hub is not None and not self._sync_notifications():
                park, reason = False, "it failed while the proxy synced its client's notifications"
            if park and not leaving and state.needs_readback and not self._read_back_settings():
                park, reason = False, "it failed while the proxy read its client's settings back"
            if self.pin_key is not None or state.pins:
                if park and state.pins and self.checkout.config.reset_query != DEFAULT_RESET_QUERY:
                    park, reason = False, "its client was pinned to it and reset_query may not undo that state"
                self._unpin()
        with self.backend_lock:
            conn, self.backend = self.backend, None
            deferred = conn is not None and conn.cancels > 0
            if deferred:
                conn.after_cancel = (park, reason)
        if conn is None:
            return
        if self.registered:
            self._stop_lingering()
        self.poller.unregister(self.sfd)
        if self.due:
            self.due = tuple(e for e in self.due if e[0] != self.sfd)
        self.sfd = -1
        self.ssock = None
        self.server_due = ()
        self.srecv = None
        self.unanswered = False
        if self.tracking and not self.prepared.idle():
            self.prepared.reset()        # what was in flight died with the connection
        if deferred:
            log.debug("server connection %r: released while a cancel request for it is in flight; "
                      "it waits for the cancel", conn)
        elif park:
            self.checkout.park(conn)
        else:
            self.checkout.discard(conn, reason)

    def end_query(self, started: float, name: str, seconds: float):
        """From another thread (the janitor, query_timeout): end the query that started at ``started``.

        The server connection is shut down, which wakes this client's thread
        (``_server_lost`` tells the client why and closes it), and its
        (host, port, pid, secret, tls) returned for a CancelRequest that stops the
        query on the server; None if that query is no longer running.
        """
        with self.backend_lock:
            conn = self.backend
            if conn is None or self.stats.query_start != started or conn.ended_by is not None:
                return None
            conn.ended_by = (name, seconds)
            try:
                tls.shutdown(conn.sock, socket.SHUT_RDWR)
            except OSError:
                pass
            return conn.host, conn.port, conn.pid, conn.secret, conn.tls

    def cancel_target(self) -> ServerConnection | None:
        """The server connection held now, for a CancelRequest (None: it holds none).

        Marked as being canceled (``cancels``) in the same step as it is read:
        from here until ``cancel_done`` it is not handed to another client.
        The caller must call ``cancel_done`` once the cancel connection has
        ended, whatever happened to it.
        """
        with self.backend_lock:
            conn = self.backend
            if conn is not None:
                conn.cancels += 1
            return conn

    def cancel_done(self, conn: ServerConnection, delivered: bool) -> None:
        """A cancel for ``conn`` (from ``cancel_target``) is over; ``delivered``: PostgreSQL closed the
        cancel connection, so its signal is delivered (after that PostgreSQL drops a cancel that finds
        the backend idle: the reset, or the next client's statement, cannot be hit).

        Called from the cancel's thread.  If this client let go of ``conn``
        meanwhile, the release it asked for happens now: the connection is
        reset and parked (or handed to a waiter), or closed; closed too when
        the cancel's fate is unknown (a late signal could hit the next client).
        """
        with self.backend_lock:
            conn.cancels -= 1
            if conn.cancels or conn.after_cancel is None:
                return
            park, reason = conn.after_cancel
            conn.after_cancel = None
        if park and delivered:
            self.checkout.park(conn)
        else:
            self.checkout.discard(conn, reason if not park else
                                  "a cancel request for it was not confirmed by the server")

    def leave(self, clean: bool) -> None:
        """The client is leaving: park the server connection only if it is idle and in sync."""
        self._stop_lingering()
        self.detach(park=clean and self.at_release_point(), reason="the client left mid-transaction"
                    if clean else "the client's connection ended abnormally", leaving=True)

    def _stop_lingering(self) -> bool:
        """No longer keep the idle connection for a waiter to claim; False if one had claimed it."""
        self.lingering = False
        if not self.registered:
            return True
        self.registered = False
        return self.pool.unlinger(self.key, self)

    def _keep_or_hand_on(self) -> None:
        """At a release point: keep the connection while nobody waits (and ``server_linger``), else hand it on.

        A pinned client keeps it in any case (it is not claimable), unless a
        graceful shutdown waits for it; whether it is still pinned is asked
        first when one of its statements may have created or undone such state.
        A client still entered from its last release point, that nobody claimed
        and nobody waits for, keeps it with no lock taken (``keeps``).
        """
        state = self.state
        if state is not None and (state.suspects or state.pins):
            if state.suspects:
                self._settle_pins()
            if state.pins and not self.stop_requested:
                if self.registered and not self._stop_lingering():
                    self._drain_wake()      # claimed during the transaction: the claimer looks elsewhere
                return
        events = self.events
        if events is not None and events.active and self.prepared is not None:
            self._report_statements(events)
        pool = self.pool
        linger = self.checkout.config.server_linger
        if self.registered:
            if linger and pool.keeps(self.key, self):
                self.lingering = True
                return
            if not self._stop_lingering():
                self._drain_wake()      # claimed during the transaction: this release answers it
        if self.wake_rfd < 0:
            self._make_wake_fd()
        if linger and pool.linger(self.key, self, self.backend):
            self.lingering = self.registered = True
        else:
            self._release()
            if self.stop_requested:         # a graceful shutdown waited for this release point
                raise PoolClosed()

    def _linger_expired(self) -> None:
        """Idle past server_idle_timeout: park it, so the janitor may close it (or a waiter take it)."""
        self._stop_lingering()
        self._release()

    def _release(self) -> None:
        """Between transactions: reset and park the connection (detach), and tell the hooks if the client used it."""
        conn = self.backend
        self.detach(park=True)
        events = self.events
        if events is not None and events.active and conn is not None and self.stats.query_count > self.used_from:
            events.emit_client(SERVER_RELEASE, self.stats, self.attached_at, server_id=conn.serial,
                               server_pid=conn.pid)

    def _report_statements(self, events) -> None:
        """Statements re-prepared on this connection, or refused, since the last report: events."""
        counts = self.prepared.stats
        injected, refused = self.reported
        if counts.injected != injected or counts.refused != refused:
            self.reported = (counts.injected, counts.refused)
            conn = self.backend
            server = dict(server_id=conn.serial, server_pid=conn.pid) if conn is not None else {}
            at = self.attached_at      # (in the transaction that ends here, whose answer the client has)
            if counts.injected > injected:
                events.emit_client(STATEMENT_REPREPARED, self.stats, at, number=counts.injected - injected, **server)
            if counts.refused > refused:
                events.emit_client(STATEMENT_REFUSED, self.stats, at, number=counts.refused - refused,
                                   detail="a Parse of a statement name the client holds already (42P05), "
                                          "or beyond its limit (53400)", **server)

    def _lingering_backend_spoke(self, view, n: int) -> None:
        """A lingering (idle) server connection sent something.

        NOTIFY, NOTICE and ParameterStatus belong to this client's session and
        are passed on; end of file or an ErrorResponse (pg_terminate_backend's
        FATAL) means it is gone, and the client, which is between transactions,
        is not bothered with it: its next transaction gets another connection.
        Unless the client's last bytes were left ``unanswered`` (no request
        among them) and this is the server's FATAL answer to them: then the
        client gets it, and the close.
        """
        sscan = self.sscan
        answer = False
        if n:
            errors = sscan.errors
            sscan.feed(view, n)
            if sscan.notified:
                view, n = self._name_notifiers(view, n)
            answer = self.unanswered and sscan.fatal
            if answer or (sscan.errors == errors and not sscan.ready and sscan.at_boundary):
                if sscan.parameters:
                    self._note_parameters()
                try:
                    self.client.sendall(view[:n])
                except OSError:
                    raise ClientGone() from None
                if not answer:
                    return
            else:
                sscan.reset()
        self._stop_lingering()
        if answer:
            # The server ended the connection in answer to what the client sent
            # last (e.g. a message type only the server knew to be invalid).
            self._server_lost()
        self.detach(park=False, reason="it closed or failed while idle; the client will get another")

    def _name_notifiers(self, view, n: int):
        """NotificationResponses in this chunk: name each sender as its client was told.

        The pid PostgreSQL puts in a NotificationResponse is the sending backend's.
        When that backend is a server connection of this proxy, the pid becomes the
        one its client holding it (or the last one that held it) was told in
        BackendKeyData: in session mode the same real pid, in transaction and
        statement mode the proxy-made one.  A sender the proxy does not know (a
        direct connection, a client of another proxy) keeps its real pid.  A
        notification cut by the end of the chunk is completed first (the server is
        in the middle of it), so no part of its pid has gone out before it is
        rewritten.  Returns the chunk to send and its length.
        """
        sscan = self.sscan
        offsets = list(sscan.notified)
        sscan.notified.clear()
        out = None
        if offsets[-1] < 0:                    # (only the last one can be cut)
            out = bytearray(view[:n])
            cut_at = n + offsets[-1]
            offsets[-1] = cut_at + 5           # its pid field, once it is whole
            need = sscan.carry_need()
            while need:
                more = self._recv_server_exactly(need)
                if more is None:
                    self._send_before_loss(out[:cut_at])
                    self._server_lost()
                if self.tracking:
                    more = self.prepared.from_server(more)
                out += more
                sscan.feed(more, len(more))
                need = sscan.carry_need()
            sscan.notified.clear()             # the completed one announced itself again
        backends = self.checkout.backends
        conn = self.backend
        if backends is not None and conn is not None:
            node = conn.node
            for offset in offsets:
                pid = pq.INT32.unpack_from(out if out is not None else view, offset)[0]
                sender = backends.get((node, pid))
                told = sender.holder_pid if sender is not None and sender.sock.fileno() >= 0 else 0
                if told and told != pid:
                    if out is None:
                        out = bytearray(view[:n])
                    pq.INT32.pack_into(out, offset, told)
        return (out, len(out)) if out is not None else (view, n)

    def _recv_server_exactly(self, size: int) -> bytes | None:
        """``size`` bytes of the server's stream, waiting for them (the rest of a
        message it is sending); None if it closed first."""
        ssock = self.ssock
        data = bytearray()
        while len(data) < size:
            try:
                chunk = ssock.recv(size - len(data))
            except OSError:
                chunk = b""
            if not chunk:
                return None
            data += chunk
        if self.backend.tls and ssock.pending():
            self._due(self.server_due)         # decrypted already: poll() would not see it
        return bytes(data)

    def _send_before_loss(self, data) -> None:
        try:
            self.client.sendall(data)
        except OSError:
            raise ClientGone() from None
        self.sscan.reset()                     # what went out ended at a boundary

    def _message_refused(self) -> None:
        """The client sent a message too long for the proxy to hold (MessageTooLarge,
        about to end it): nothing of the chunk went to the server, but what went
        before may have left it mid-pipeline, so its server connection is closed."""
        self._stop_lingering()
        self.detach(park=False, reason="its client sent a message longer than max_tracked_message_size")
        if not self.sscan.at_boundary:
            raise ErrorAlreadySent()    # a server message is half relayed: nothing can follow it

    def _refuse_transaction_block(self, view, n: int) -> None:
        """Statement mode: the server entered a transaction block; end the client like PgBouncer.

        The chunk's closing ReadyForQuery is replaced by the error, so the
        client sees the error as the result of the statement that opened it.
        """
        try:
            self.client.sendall(view[:pq.trailing_ready_for_query(view, n)])
        except OSError:
            raise ClientGone() from None
        if self.events is not None and self.events.active:
            self.events.emit_client(STATEMENT_REFUSED, self.stats, sqlstate=pq.SQLSTATE_PROTOCOL_VIOLATION,
                                    detail="transaction blocks not allowed in statement pooling mode")
        raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                          "transaction blocks not allowed in statement pooling mode",
                          hint="Use pool_mode transaction or session for this database, or autocommit.")

    def _note_parameters(self) -> None:
        parameters = self.sscan.parameters
        backend = self.backend
        for name, value in parameters:
            backend.note_parameter(name, value)
            if self.pooled:
                self.settings.follow(name, value)
        parameters.clear()

    def _server_lost(self, unread: bool = False):
        """The server connection closed or failed: the client's connection ends with it.

        When the server said why (its FATAL, e.g. pg_terminate_backend's 57P01,
        a shutdown's 57P01/57P02/57P03, idle_in_transaction_session_timeout's
        25P03, already forwarded), the client gets those words and then the
        close, as it would from PostgreSQL, and nothing of the proxy's own.
        ``unread``: a send failed, so what the server said before it closed
        may still wait in the socket; it is forwarded first.

        When the proxy itself cut the connection (``end_query``: query_timeout),
        the client is told that, as PgBouncer tells it.
        """
        backend = self.backend
        if backend is not None and backend.ended_by is not None:
            name, seconds = backend.ended_by
            self.detach(park=False, reason=f"{name} ({seconds:g} s): its query ran too long")
            if not self.sscan.at_boundary:
                raise ErrorAlreadySent()    # a server message is half relayed: nothing can follow it
            raise ClientFatal(pq.SQLSTATE_QUERY_CANCELED,
                              f"terminating connection due to {name}: the query ran longer than {seconds:g} s",
                              detail=f"threadpool_proxy: {name} is {seconds:g} s; the query was canceled and "
                                     f"its server connection closed.")
        if unread and self.sfd >= 0:
            poller = select.poll()
            poller.register(self.sfd, _POLLIN)
            if poller.poll(0):
                self.on_server_readable()    # forwards it (or, at end of file, comes back here)
        said_why = self.sscan.fatal and self.sscan.at_boundary
        self.detach(park=False, reason="the server ended it with a FATAL error" if said_why
                    else "the server closed the connection")
        if said_why:
            raise ErrorAlreadySent()
        raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE,
                          "server connection lost; the client's transaction, if any, was rolled back",
                          hint="The PostgreSQL server closed the connection or was restarted.")

    # -- session state: settings that follow the client, state that pins it -------------------

    def _look_at_statements(self, n: int) -> int:
        """The Query/Parse texts of this chunk that passed the scanner's cheap test.

        Each is classified (sessionstate.look) and noted.  A pinning statement
        that the client may not run here (statement mode, max_pinned_clients) is
        refused, when its Query is the whole chunk, sent while every earlier
        request is answered (the usual way: a driver sends one and waits):
        between transactions the proxy answers it (-1 is returned: nothing goes
        to the server); inside a transaction block the Query is replaced by one
        that fails with that error, so the server's transaction fails as it
        would have.  Returns how many bytes of the chunk (``cbuf``) to relay.
        Elsewhere the statement runs, and pins.
        """
        looked = self.cscan.looked
        state = self.state
        alone = (len(looked) == 1 and looked[0][0] == _QUERY and looked[0][2] == 0 and looked[0][3] == n
                 and self.pending == 0 and self.cscan.at_boundary)
        try:
            for kind, text, _, _, name in looked:
                if kind == _BIND:                     # a watched prepared statement runs again
                    effects = self.statement_effects.get(name)
                    if effects is not None:
                        if effects.listen and len(looked) == 1 and self._listen_extended(n, effects.listen, name):
                            return -1
                        if state.pinning_kinds(effects) and not state.pins:
                            self._reserve_pin()
                        state.note(effects)
                    continue
                effects = sessionstate.look(text.decode("utf-8", "surrogateescape"))
                if not effects:
                    continue
                if name and len(self.statement_effects) < MAX_WATCHED_STATEMENTS:
                    self.statement_effects[name] = effects
                    self.cscan.watch(name)
                if effects.listen and len(looked) == 1:
                    if alone and self._listen_here(*effects.listen, lambda tag: pq.command_complete(tag)):
                        return -1
                    if kind != _QUERY and not name and self._listen_extended(n, effects.listen, b""):
                        return -1
                if effects.unlisten and self.inbox is not None:
                    for channel in effects.unlisten:
                        self.hub.unsubscribe(self.inbox, channel)
                kinds = state.pinning_kinds(effects)
                if kinds and not state.pins:
                    refusal = self._pin_refusal(effects, kinds, alone)
                    if refusal is not None:
                        if self.events is not None and self.events.active:
                            self.events.emit_client(STATEMENT_REFUSED, self.stats, sqlstate=refusal[0],
                                                    detail=refusal[1])
                        if self.sscan.status == _IDLE:
                            self._answer_locally(pq.error_response(*refusal[:2], pq.ERROR, *refusal[2:]))
                            return -1
                        query = pq.query(sessionstate.raise_statement(*refusal))
                        self.cbuf[:len(query)] = query
                        return len(query)
                state.note(effects)
        finally:
            looked.clear()
        return n

    def _pin_refusal(self, effects, kinds: list, alone: bool) -> tuple | None:
        """(SQLSTATE, message, detail, hint) refusing a statement that would pin this (unpinned)
        client, or None to let it run.

        Statement mode refuses every kind but LISTEN (which the proxy takes over,
        or pins where it cannot); past max_pinned_clients every kind is refused.
        A statement that is not ``alone`` in its chunk cannot be refused: it runs,
        and pins; beyond max_pinned_clients the client is then ended (_settle_pins).
        """
        if not alone:
            self._reserve_pin()
            return None
        if self.statement_mode:
            refused = [k for k in kinds if k != sessionstate.LISTEN]
            if refused:
                what = effects.pins[refused[0]]
                return (pq.SQLSTATE_FEATURE_NOT_SUPPORTED, f"{what} is not supported in statement pooling mode",
                        f"It creates session state ({refused[0]}) that the next statement, on another server "
                        f"connection, would not see.",
                        "Use pool_mode transaction (the client is then pinned to its server connection) "
                        "or session for this database.")
        if not self._reserve_pin():
            return self._limit_error(effects.pins[kinds[0]])
        return None

    def _limit_error(self, what: str) -> tuple:
        """PgBouncer's way of saying a limit was reached, naming the setting: (SQLSTATE, message, detail, hint)."""
        limit = self.checkout.db.pinned_client_limit
        return (pq.SQLSTATE_CONFIGURATION_LIMIT_EXCEEDED, "no more pinned clients allowed (max_pinned_clients)",
                f"{what} pins a client to its server connection, and {limit} of this pool's clients are "
                f"pinned already (max_pinned_clients).",
                "Undo such state sooner (DISCARD ALL), raise max_pinned_clients, or use pool_mode session.")

    def _answer_locally(self, answer: bytes) -> None:
        """Answer the client's one request (the whole chunk) with ``answer`` and ReadyForQuery."""
        try:
            self.client.sendall(answer + pq.ready_for_query(pq.IDLE))
        except OSError:
            raise ClientGone() from None
        if self.idle_timers:
            self._arm_idle_timer()

    def _reserve_pin(self) -> bool:
        """Hold one of the pool's max_pinned_clients places (kept while pinned); False if none is free."""
        if self.pin_key is not None:
            return True
        if self.pool.reserve_pin(self.key, self.checkout.db.pinned_client_limit):
            self.pin_key = self.key
            return True
        return False

    def _unpin(self) -> None:
        """The client's pinning state is gone (with its server connection): give its place back."""
        self.state.unpin()
        if self.pin_key is not None:
            self.pool.release_pin(self.pin_key)
            self.pin_key = None

    def _settle_pins(self) -> None:
        """At a release point: ask the server which suspect state exists; pin or unpin accordingly."""
        state = self.state
        kinds = state.verified_kinds()
        found = {}
        if kinds:
            try:
                rows = self._ask_server(state.verify_sql(self.checkout.user))[0]
                found = {kind: value == b"t" for kind, value in zip(kinds, rows[0])}
            except ServerGone:
                self._server_lost()
            except ServerError as exc:
                log.warning("client %s: asking the server about its session state failed (%s); "
                            "it stays on its server connection", self.who, exc)
                found = {kind: True for kind in kinds}
        was_pinned = bool(state.pins)
        pinned, unpinned = state.settle(found)
        for kind in pinned:
            log.info("client %s is pinned to its server connection (%s) by %s", self.who, kind, state.pins[kind])
        if state.pins:
            if not self._reserve_pin():
                what = sessionstate.describe(next(iter(state.pins.values())))
                self.detach(park=False, reason=f"its client went past max_pinned_clients "
                                               f"({self.checkout.db.pinned_client_limit})")
                sqlstate, message, detail, hint = self._limit_error(what)
                raise ClientFatal(sqlstate, message, detail, hint)
            events = self.events
            if not was_pinned and events is not None and events.active:
                conn = self.backend
                server = dict(server_id=conn.serial, server_pid=conn.pid) if conn is not None else {}
                events.emit_client(PIN, self.stats, detail="; ".join(f"{kind}: {state.pins[kind]}"
                                                                     for kind in pinned), **server)
        elif self.pin_key is not None:
            self._unpin()
            if unpinned:
                log.info("client %s is no longer pinned (%s undone)", self.who, ", ".join(unpinned))

    def _settle_before_ready(self, view, n: int):
        """The last ReadyForQuery of a transaction whose statements may have created or undone
        pinning state: ask the server before the client sees it, so that once the client's
        statement is answered, its pin (SHOW CLIENTS, max_pinned_clients' count) is what it says.

        Everything before the ReadyForQuery is sent first; returns what is left to send.
        """
        cut = pq.trailing_ready_for_query(view, n)
        pending, self.pending = self.pending, 0
        try:
            if cut == n or not self.at_release_point():
                return view, n
        finally:
            self.pending = pending
        try:
            self.client.sendall(view[:cut])
        except OSError:
            raise ClientGone() from None
        self.stats.sent += cut
        rest = bytes(view[cut:n])
        self._settle_pins()
        return rest, len(rest)

    # -- LISTEN taken over by the proxy (listen.py) ------------------------------------------

    def _listen_here(self, verb: str, channel: str | None, replies) -> bool:
        """A lone LISTEN or UNLISTEN between transactions: answered by the proxy (``replies(tag)``, then
        ReadyForQuery), the listening done by the hub's connection of this identity.  False: it goes
        to the server (a LISTEN then pins)."""
        hub = self.hub
        if hub is None or self.sscan.status != _IDLE:
            return False
        server_listens = sessionstate.LISTEN in self.state.pins
        if verb == "unlisten":
            if self.inbox is not None:
                hub.unsubscribe(self.inbox, channel)
            if server_listens:
                return False
            self._answer_locally(replies("UNLISTEN"))
            return True
        if server_listens or not self._can_listen_here():
            return False
        if self.inbox is None:
            self.inbox = Inbox()
            self.poller.register(self.inbox.fd, _POLLIN)
        try:
            hub.subscribe(self.checkout.key, self.checkout.dbname, channel, self.inbox, self.listen_dial)
        except ListenUnavailable as exc:
            log.info("client %s: the proxy cannot LISTEN for it (%s); its server connection listens, "
                     "and it is pinned", self.who, exc)
            return False
        self._answer_locally(replies("LISTEN"))
        return True

    def _listen_extended(self, n: int, command: tuple, statement: bytes) -> bool:
        """A LISTEN/UNLISTEN in the extended protocol, taken over like a Query (``_listen_here``) when
        the chunk is one execution of it and nothing else: an unnamed Parse of it, or a Bind of
        ``statement`` (a named one prepared earlier, as asyncpg does: that Parse went to the
        server), then Describe, Execute, Sync; answered message by message as PostgreSQL would."""
        if self.pending != 0 or not self.cscan.at_boundary or self.cscan.unsynced:
            return False
        view = self.cview
        replies = []
        pos = executes = 0
        synced = False
        while pos < n:
            if n - pos < 5 or synced:
                return False
            t = view[pos]
            end = pos + 1 + pq.UINT32.unpack_from(view, pos + 1)[0]
            if end > n:
                return False
            body = bytes(view[pos + 5:end])
            if t == _PARSE_TYPE:
                if not body.startswith(b"\0") or statement:
                    return False                  # a named Parse goes to the server
                replies.append(pq.message(pq.PARSE_COMPLETE))
            elif t == _BIND:
                names = body.split(b"\0", 2)
                if len(names) < 3 or names[0] or names[1] != statement:
                    return False
                replies.append(pq.message(pq.BIND_COMPLETE))
            elif t == pq.DESCRIBE[0]:
                if body[:1] == pq.STATEMENT:
                    replies.append(pq.message(pq.PARAMETER_DESCRIPTION, pq.INT16.pack(0)))
                replies.append(pq.message(pq.NO_DATA))
            elif t == pq.EXECUTE[0]:
                executes += 1
                replies.append(None)              # CommandComplete, with the tag
            elif t == pq.SYNC[0]:
                synced = True
            elif t != pq.FLUSH[0]:
                return False
            pos = end
        if executes != 1 or not synced:
            return False
        return self._listen_here(*command, lambda tag: b"".join(pq.command_complete(tag) if r is None else r
                                                                  for r in replies))

    def _can_listen_here(self) -> bool:
        """Whether the hub may listen for this client: the proxy logs in by itself, one server, and
        the client reads UTF-8 (the listening connection's encoding)."""
        if self.listen_dial is None or self.checkout.routed:
            return False
        encoding = self.settings.values.get("client_encoding") or self.pool.defaults(self.key).get(
            "client_encoding", "UTF8")
        return encoding.upper().replace("-", "").replace("_", "") in ("UTF8", "UNICODE")

    def on_mail(self) -> None:
        """Notifications arrived for this client: sent now if it is between two answers, else
        after its current one (``_from_server``)."""
        self.inbox.drain()
        if self.pending == 0 and self.sscan.at_boundary:
            self._deliver_notifications()

    def _deliver_notifications(self) -> None:
        inbox = self.inbox
        if inbox.lost is not None:
            raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE, f"terminating connection: {inbox.lost}",
                              hint="Connect again and LISTEN again.")
        data = inbox.take()
        if data:
            try:
                self.client.sendall(data)
            except OSError:
                raise ClientGone() from None
            self.stats.sent += len(data)

    def _sync_notifications(self) -> bool:
        """Before this client's connection goes to another: let the listeners read what the client
        notified, so they name it as this client.  False when the connection failed."""
        self.state.notified = False
        try:
            self.hub.sync(self.backend.node, self.checkout.dbname, self._ask_server)
        except ServerError as exc:
            log.info("client %s: the sync notification failed: %s", self.who, exc)
        except ServerGone:
            return False
        return True

    def _read_back_settings(self) -> bool:
        """Read the settings this client changed from its server connection, for its next one.

        Returns False when the connection failed meanwhile (it is to be closed).
        """
        state = self.state
        settings = self.settings
        names = state.readback_names(settings.values)
        sql = state.readback_sql(names)
        state.read_back()
        if not sql:
            return True
        try:
            results = self._ask_server(sql)
        except ServerError as exc:
            log.warning("client %s: reading back its settings failed: %s", self.who, exc)
            return True
        except ServerGone as exc:
            log.warning("client %s: reading back its settings failed (%s); they are lost", self.who, exc)
            return False
        backend = self.backend
        for row in results[0] if results else ():
            if len(row) != 2 or row[0] is None:
                continue
            try:
                name = row[0].decode("utf-8").lower()
                value = None if row[1] is None else row[1].decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not sessionstate.follows(name):
                continue
            if value is None:
                settings.forget(name)
            else:
                settings.follow(name, value)
                if name not in backend.params:
                    backend.unreported[name] = value     # in force there (the reset undoes it)
        return True

    def _ask_server(self, sql: str) -> list:
        """Run ``sql`` (a simple Query) on the attached server connection at a release point.

        Returns the DataRows of each statement ([[row, ...], ...], a row a list
        of bytes or None).  What the server sends meanwhile that belongs to the
        client (a notification, a parameter change) is passed on after it.
        ServerError if the query failed (the connection is idle again),
        ServerGone if the connection failed.

        A CancelRequest of this client on its way to the server (``cancel_target``)
        is waited for first, up to CANCEL_LANDING_WAIT: it was meant for the
        client's statement, and would otherwise stop the proxy's query.  One that
        stops it all the same (sent meanwhile) costs a second try.
        """
        conn = self.backend
        timeout = self.checkout.config.server_connect_timeout
        if conn.cancels:
            deadline = time.monotonic() + CANCEL_LANDING_WAIT
            while conn.cancels and time.monotonic() < deadline:
                time.sleep(0.001)
        for attempt in (1, 2):
            results, error = self._run_on_server(conn, sql, timeout)
            if error is None:
                return results
            if attempt == 1 and error.fields.get("C") == pq.SQLSTATE_QUERY_CANCELED:
                continue
            raise error
        raise AssertionError("unreachable")

    def _run_on_server(self, conn: ServerConnection, sql: str, timeout: float):
        """One round of ``_ask_server``: (results, the ServerError or None)."""
        conn.send(pq.query(sql))
        results, rows, error, passed_on = [], [], None, []
        while True:
            t, body = conn.read_message(timeout)
            if t == pq.DATA_ROW:
                rows.append(pq.parse_data_row(body))
            elif t == pq.COMMAND_COMPLETE:
                results.append(rows)
                rows = []
            elif t == pq.READY_FOR_QUERY:
                break
            elif t == pq.ERROR_RESPONSE:
                fields = pq.parse_error_fields(body)
                if pq.ends_connection(fields):
                    raise ServerGone(fields.get("M", "server error"))
                error = ServerError(fields, pq.message(t, body))
            elif t in (pq.NOTIFICATION_RESPONSE, pq.PARAMETER_STATUS):
                passed_on.append(pq.message(t, body))
        leftover = bytes(conn._buf)
        conn._buf.clear()
        if passed_on or leftover:
            data = bytearray(b"".join(passed_on) + leftover)
            self._from_server(memoryview(data), len(data))
        if conn.tls and conn.sock.pending():
            self._due(self.server_due)
        return results, error

    # -- waking a lingering holder ---------------------------------------------------

    def _make_wake_fd(self) -> None:
        """An eventfd (a pipe where there is none) that waiters write to, to reclaim our connection."""
        if hasattr(os, "eventfd"):
            self.wake_rfd = self.wake_wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            self.wake_rfd, self.wake_wfd = os.pipe()
            os.set_blocking(self.wake_rfd, False)
            os.set_blocking(self.wake_wfd, False)
        self.poller.register(self.wake_rfd, _POLLIN)

    def wake(self) -> None:
        """Called by a waiting thread (holding the pool lock): let go of the lingering connection."""
        try:
            os.write(self.wake_wfd, b"\1\0\0\0\0\0\0\0")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            os.read(self.wake_rfd, 64)
        except OSError:
            pass

    def close(self) -> None:
        """Release the wake-up descriptors (the sockets belong to the session and the pool);
        the client's LISTENs end."""
        if self.inbox is not None:
            self.hub.leave(self.inbox)
            self.inbox.close()
            self.inbox = None
        if self.wake_rfd >= 0:
            for fd in {self.wake_rfd, self.wake_wfd}:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.wake_rfd = self.wake_wfd = -1
