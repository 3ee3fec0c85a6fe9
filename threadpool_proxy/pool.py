"""The backend idle pool: parked, authenticated server connections by identity.

Herding server connections between "in use" and "parked" happens here, and so
does the ``pool_size`` accounting that keeps PostgreSQL from ever seeing more
than ``pool_size`` connections of one (node, user, database) key.

Design notes
------------
* One lock guards everything.  Waiters of a key queue first come, first
  served (``_HandOff``), each on a gate of its own: a connection released while
  somebody waits is handed to the longest waiter directly, never parked for
  whoever comes next, and its gate opens after the pool lock is let go, so the
  woken thread does not start by waiting for that lock (a Condition's notify
  under the lock would make it do just that, on every hand-off).
* No socket I/O happens while the lock is held: connections to close or to
  probe are taken out of the structure under the lock and handled after it.
* Parked connections are reused LIFO (the most recently parked is the warmest);
  the reaper closes from the other end, where the oldest sit.
* A connection is anything with ``close()`` whose ``raw_socket`` attribute (or
  itself) is a socket, plain or TLS: the liveness probe peeks at the raw bytes
  of its descriptor (``tls.raw_peek``: an SSLSocket's own recv refuses
  ``MSG_PEEK``), so under TLS any record at all, or bytes already decrypted,
  mean the idle connection spoke and is not clean.

Accounting per key, under the lock:

* ``_open``: authenticated connections, in use or parked: at most ``pool_size``.
* ``_pending``: pass-through logins dialed but not yet accepted by the server
  (no AuthenticationOk yet): at most ``max_pending_logins``, a separate
  allowance, so a login that has proved nothing never takes a slot, never
  evicts a parked connection and never makes an authenticated client wait.
  Once PostgreSQL accepts it, ``promote`` moves it into a slot (closing a
  parked connection of the key, or waiting, when the key is full).  So
  PostgreSQL sees at most ``pool_size + max_pending_logins`` connections of a key.

Waiting clients (``acquire`` with a ``Waiter``) are woken at least every
``WAIT_SLICE`` seconds to check that their client is still connected, can be
canceled (a CancelRequest), and are never handed a connection once their client
left.  After a failed dial of a server (down, restarting), new dials of that
server are paced: one attempt per ``server_login_retry``, one at a time.
"""

from __future__ import annotations

import collections
import logging
import select
import threading
import time
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from . import tls
from .errors import ClientGone, NodeDown, PoolClosed, PoolTimeout, QueryCanceled

__all__ = ["ALL_SERVERS", "BackendIdlePool", "Limits", "key_matches", "PoolClosed", "PoolTimeout", "Waiter", "pool_key", "probe_alive"]

log = logging.getLogger(__name__)

#: Longest a waiting client sleeps before checking that it is still connected.
WAIT_SLICE = 1.0
#: A client that waited at least this long is asked whether it is still there
#: before it is handed a connection (a peek, one syscall).  One that waited less
#: is not: PostgreSQL too runs a query whose client left just after sending it,
#: and under contention nearly every transaction waits a little.
CLIENT_CHECK_AFTER = 0.01

#: How often a client that waits because of max_db_connections or max_user_connections looks again
#: (a connection of another pool of its database or user may have closed or become parked meanwhile).
CAP_SLICE = 0.05

#: A dial of a down server not reported back within this long no longer blocks others.
PROBE_STALE = 120.0


def pool_key(node: str, user: str, database: str) -> str:
    """``node\\0user\\0database``: NUL cannot occur in any component, so keys never collide."""
    for part in (node, user, database):
        if "\0" in part:
            raise ValueError("pool key components cannot contain NUL")
    return f"{node}\0{user}\0{database}"


def probe_alive(conn: Any) -> bool:
    """True if an idle server connection still looks usable.

    An idle PostgreSQL connection has nothing to say: a pending byte means the
    server closed it (EOF) or sent something unsolicited (for example the FATAL
    ErrorResponse of ``pg_terminate_backend``), and either way it is unusable.
    """
    sock = getattr(conn, "raw_socket", conn)
    try:
        if tls.is_tls(sock) and sock.pending():
            return False      # decrypted and unread: it spoke
        if not sock.gettimeout():
            # Blocking or non-blocking socket: one non-blocking peek says it all
            # (of the raw bytes: under TLS any record at all means it spoke).
            tls.raw_peek(sock)
            return False
        # poll() first: on a socket with a timeout (settimeout(t), t > 0) Python's
        # recv() waits up to t for readability before trying MSG_DONTWAIT, so a
        # healthy idle connection would stall the caller and then read as dead.
        fd = sock.fileno()
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLPRI)
        if not poller.poll(0):
            return True       # nothing pending, no hang-up, no error
        tls.raw_peek(sock)
    except BlockingIOError:
        return True
    except (OSError, ValueError):
        return False
    return False  # b"" is EOF; any byte is unsolicited


class Waiter:
    """One client's handle while it waits in ``acquire``: cancelable, and asked whether its client is there.

    ``alive()`` (no I/O beyond a non-blocking peek) says whether the client is
    still connected; ``waiting`` and ``canceled`` are guarded by the pool's lock.
    """

    __slots__ = ("alive", "key", "waiting", "canceled", "slice_ended", "gate", "handed", "takes_connection",
                 "on_wait")

    def __init__(self, alive: Optional[Callable[[], bool]] = None, takes_connection: bool = True) -> None:
        self.alive = alive
        self.key: Optional[str] = None      # what it waits for
        self.waiting = False
        self.canceled = False
        self.slice_ended = False      # its last wait ended by time, not by a wake-up
        self.gate: Any = None         # the lock it sleeps on while queued (_HandOff)
        self.handed: Any = None       # a connection handed to it while it slept
        self.takes_connection = takes_connection   # False: it waits for a free slot (promote)
        self.on_wait: Optional[Callable[[], None]] = None   # called (under the pool's lock) when a wait begins


class Limits:
    """The limits beyond ``pool_size`` that one client's checkouts obey (None when all are off).

    ``db_cap``: server connections of the key's database, all users and
    nodes (max_db_connections); ``user_cap``: of the key's user, all
    databases (max_user_connections); ``reserve_size`` more connections of
    the key for a caller that has waited ``reserve_timeout`` seconds
    (reserve_pool_size, reserve_pool_timeout).  0: off.
    """

    __slots__ = ("db_cap", "user_cap", "reserve_size", "reserve_timeout")

    def __init__(self, db_cap: int = 0, user_cap: int = 0, reserve_size: int = 0,
                 reserve_timeout: float = 5.0) -> None:
        self.db_cap = db_cap
        self.user_cap = user_cap
        self.reserve_size = reserve_size
        self.reserve_timeout = reserve_timeout

    @classmethod
    def of(cls, config, db) -> "Optional[Limits]":
        """The limits of entry ``db`` under ``config``, or None when none is set (the checkout costs nothing more)."""
        if not (db.max_db_connections or config.max_user_connections or db.reserve_pool_size):
            return None
        return cls(db.max_db_connections, config.max_user_connections, db.reserve_pool_size,
                   config.reserve_pool_timeout)


class _HandOff:
    """The waiters of one key, first come first served; guarded by the pool lock.

    ``wait`` queues a waiter and sleeps on its own gate (the pool lock let go
    meanwhile); ``hand`` gives a released connection to the longest waiter
    that takes one and returns it, for the caller to ``open`` once it has let
    go of the pool lock; ``wake_all`` opens every gate with nothing handed (a
    slot was freed, a server came back, RESUME, a cancel, shutdown: each
    waiter looks again).
    """

    __slots__ = ("lock", "queue")

    def __init__(self, lock: Any) -> None:
        self.lock = lock
        self.queue: Deque[Waiter] = collections.deque()

    def wait(self, waiter: Waiter, timeout: float) -> bool:
        """Sleep up to ``timeout`` (pool lock held on entry and on return); True if woken."""
        gate = waiter.gate = threading.Lock()
        gate.acquire()
        self.queue.append(waiter)
        self.lock.release()
        woken = False
        try:
            woken = gate.acquire(True, timeout) if timeout > 0 else False
        finally:
            self.lock.acquire()
            if not woken:
                try:
                    self.queue.remove(waiter)
                except ValueError:
                    woken = True     # opened (or handed a connection) just as the time ran out
        return woken

    def hand(self, conn: Any) -> Optional[Waiter]:
        """Give ``conn`` to the longest waiter that takes one (None: nobody); waiters met on
        the way that only want a slot are woken to look again."""
        queue = self.queue
        while queue:
            waiter = queue.popleft()
            if waiter.takes_connection:
                # No longer waiting: a CancelRequest from now on is for the server connection.
                waiter.handed, waiter.waiting = conn, False
                return waiter
            waiter.gate.release()
        return None

    def wake_all(self) -> None:
        queue = self.queue
        while queue:
            queue.popleft().gate.release()


_NO_HANDOFF = _HandOff(None)


class _NodeDown:
    """A server whose last dial (or health check) failed: no new dial before ``retry_at``, one at a time.

    ``checked``: a health check marked it down, so parked connections of it are
    closed (and those given back are not parked again) until it is up again.
    """

    __slots__ = ("retry_at", "probing_since", "error", "checked", "since")

    def __init__(self, retry_at: float) -> None:
        self.retry_at = retry_at
        self.probing_since: Optional[float] = None
        self.error: Any = None          # what the last dial said
        self.checked = False
        self.since = time.time()


def _close(conn: Any, key: str, reason: str) -> None:
    """Close a server connection the pool let go of, saying why in the log (and to its observer)."""
    log.info("closing server connection %r of %s: %s", conn, _show(key), reason)
    note_closing = getattr(conn, "note_closing", None)      # a ServerConnection's (events.py)
    if note_closing is not None:
        note_closing(reason)
    try:
        conn.close()
    except OSError:
        pass


class BackendIdlePool:
    """Parked server connections in a dict of deques keyed by ``pool_key``.

    Caller API: ``checkout``, ``checkin``, ``reap_idle`` (the idle structure);
    ``acquire``, ``release_slot``, ``discard`` (the ``pool_size`` accounting,
    which blocks callers when a key is full); ``cancel_wait`` (end a waiter's
    wait); ``dial_failed``/``dial_succeeded``/``dial_abandoned`` (pacing dials of
    a down server); ``acquire_pending``, ``promote``, ``give_back_pending`` (the
    allowance of pass-through logins not yet authenticated);
    ``linger``/``unlinger`` (clients keeping an idle connection while nobody
    waits); ``learn_defaults``/``defaults`` (the server's default settings per
    key, learned from fresh logins); ``close`` at shutdown; ``stats`` and
    ``snapshot`` for observation.
    """

    def __init__(self, max_idle_per_key: int, max_total_idle: int) -> None:
        self.max_idle_per_key = max_idle_per_key
        self.max_total_idle = max_total_idle
        self._lock = threading.Lock()
        self._idle: Dict[str, Deque[Tuple[Any, float]]] = {}
        self._total_idle = 0
        self._open: Dict[str, int] = collections.Counter()
        # Open connections per ("d", database) and ("u", user) of client keys, for
        # max_db_connections and max_user_connections; changed only when one opens or closes.
        self._open_groups: Dict[Tuple[str, str], int] = collections.Counter()
        self._key_groups: Dict[str, tuple] = {}
        self._pending: Dict[str, int] = collections.Counter()
        self._handoffs: Dict[str, _HandOff] = {}
        self._pending_conds: Dict[str, threading.Condition] = {}
        self._down: Dict[str, _NodeDown] = {}
        self._lingering: Dict[str, Dict[Any, None]] = {}
        self._defaults: Dict[str, Dict[str, str]] = {}
        self._closed = False
        self._held: set = set()           # PAUSE: targets ((node, database) or ALL_SERVERS) whose checkouts wait
        self._close_before: Dict[Any, float] = {}   # RECONNECT: target -> close connections created until then
        self._draining = False            # graceful shutdown: nobody keeps an idle connection
        # server_lifetime: connections created at or before this (time.time()) are closed once
        # released; kept by expire() (the janitor), inf for a lifetime of 0 (use once).  Only those
        # of ``renewable`` keys: ones the proxy can log in to again by itself (proxy-terminated
        # auth); a pass-through client whose last connection closed would have to reconnect.
        self._born_before = 0.0
        self.renewable: set = set()
        self.stats = collections.Counter(
            reuses=0, parked=0, handed_on=0, over_capacity=0, stale_evicted=0, reaped=0, reconnected=0,
            reset_failed=0, evicted_for_login=0, waits=0, wait_timeouts=0,
            pending_timeouts=0, waits_canceled=0, waiters_gone=0, dials_failed=0, evicted_for_limit=0,
            reserve_used=0, lifetime_closed=0)

    # -- the idle structure -------------------------------------------------

    def checkout(self, key: str, prefer: Optional[Callable[[Any], bool]] = None) -> Any:
        """Return a live parked connection of ``key``, or None.

        With ``prefer``, the newest parked connection for which it is true is
        taken first (used to find one whose session parameters already match).
        Dead connections met on the way are closed and counted.
        """
        while True:
            with self._lock:
                conn = self._pop_locked(key, prefer)
            if conn is None:
                return None
            conn = self._vet(key, conn)
            if conn is not None:
                return conn

    def _vet(self, key: str, conn: Any) -> Any:
        """``conn`` if its reset went well and it is alive; else closed (slot freed), and None."""
        if getattr(conn, "reset_pending", False):
            verdict = conn.finish_reset_verdict()
            if verdict == "clean":
                # The reset's answer was read just now, and nothing after it (a
                # FATAL, end of file) came with it: that read was the probe.
                with self._lock:
                    self.stats["reuses"] += 1
                return conn
            if verdict != "ok":
                _close(conn, key, "its reset query failed" if verdict == "failed"
                       else "it closed or spoke while parked")
                with self._lock:
                    self.stats["reset_failed" if verdict == "failed" else "stale_evicted"] += 1
                    self._forget_locked(key)
                return None
        if probe_alive(conn):
            with self._lock:
                self.stats["reuses"] += 1
            return conn
        _close(conn, key, "it closed while parked (liveness probe)")
        with self._lock:
            self.stats["stale_evicted"] += 1
            self._forget_locked(key)
        return None

    def checkout_any(self, keys, prefer: Optional[Callable[[Any], bool]] = None) -> Tuple[Optional[str], Any]:
        """(key, connection): a live parked connection of the first of ``keys`` that has one, else (None, None).

        Never waits and never dials (several nodes: reuse before dialing
        anywhere); keys paused by PAUSE are skipped.
        """
        idle = self._idle
        for key in keys:
            if not idle.get(key) or (self._held and self._held_key(key)):
                continue
            conn = self.checkout(key, prefer)
            if conn is not None:
                return key, conn
        return None, None

    def checkin(self, key: str, conn: Any, reset_ok: bool = True) -> bool:
        """Park ``conn`` (reset by the caller) or close it; True if parked.

        A connection may arrive with its reset query sent but not yet answered
        (``reset_pending``, see ServerConnection.start_reset): ``checkout``
        reads and checks that answer before handing it out, in place of the
        probe, and closes it if the reset failed.

        ``reset_ok`` is the caller's verdict on the reset query (answered with
        ReadyForQuery 'I' and no error).  A connection that failed its reset,
        or that would exceed ``max_idle_per_key`` or ``max_total_idle``, is
        closed, and its pool_size slot is freed.
        """
        taker = None
        with self._lock:
            reason = self._refusal_locked(key, conn, reset_ok)
            if reason is None:
                handoff = self._handoffs.get(key)
                if handoff is not None and handoff.queue and not (self._held and self._held_key(key)):
                    taker = handoff.hand(conn)
                if taker is not None:
                    self.stats["handed_on"] += 1
                else:
                    self._idle.setdefault(key, collections.deque()).append((conn, time.monotonic()))
                    self._total_idle += 1
                    self.stats["parked"] += 1
            else:
                self._forget_locked(key)
        if reason is not None:
            _close(conn, key, reason)
            return False
        if taker is not None:
            taker.gate.release()          # after the pool lock: the taker goes straight on
        return True

    def _refusal_locked(self, key: str, conn: Any, reset_ok: bool) -> Optional[str]:
        """Why a released ``conn`` cannot be parked or handed on (counted), or None."""
        if self._born_before and conn.created <= self._born_before and key in self.renewable:
            self.stats["lifetime_closed"] += 1
            return "server_lifetime: it is older than that"
        if self._close_before and self._stale_locked(key, conn):
            if self._draining:
                return "the proxy is shutting down"
            self.stats["reconnected"] += 1
            return "RECONNECT, KILL or RELOAD asked for it to be closed once released"
        if self._down and self._closing_node_locked(key):
            return "its server is marked down"
        if not reset_ok:
            self.stats["reset_failed"] += 1
            return "its reset query could not be sent"
        if self._closed:
            return "the proxy is shutting down"
        if (len(self._idle.get(key, ())) >= self.max_idle_per_key or self._total_idle >= self.max_total_idle) \
                and not self._handoffs.get(key, _NO_HANDOFF).queue:
            self.stats["over_capacity"] += 1
            return "max_idle_per_key or max_total_idle reached"
        return None

    def reap_idle(self, max_age: float, keep: Optional[Dict[str, int]] = None) -> int:
        """Close parked connections idle for longer than ``max_age`` seconds.

        ``keep``: key -> connections it keeps open anyway (min_pool_size).
        """
        cutoff = time.monotonic() - max_age
        victims = []
        with self._lock:
            for key, dq in self._idle.items():
                floor = keep.get(key, 0) if keep else 0
                while dq and dq[0][1] <= cutoff and (not floor or self._open[key] > floor):
                    victims.append((dq.popleft()[0], key))
                    self._total_idle -= 1
                    self.stats["reaped"] += 1
                    self._forget_locked(key)
        for conn, key in victims:
            _close(conn, key, f"parked for longer than server_idle_timeout ({max_age:g} s)")
        return len(victims)

    # -- pool_size accounting -----------------------------------------------

    def acquire(self, key: str, limit: int, timeout: float,
                prefer: Optional[Callable[[Any], bool]] = None, dial: bool = True,
                waiter: Optional[Waiter] = None, paced: bool = False, failover: bool = False,
                limits: Optional[Limits] = None) -> Any:
        """Get a parked connection of ``key`` or the right to dial a new one.

        Returns a connection, or None meaning "a slot is yours, dial" (the
        caller must later ``discard`` the connection or ``release_slot`` if the
        dial fails).  Waits while ``limit`` connections of the key are open and
        none is parked; raises PoolTimeout after ``timeout`` seconds.

        With ``dial=False`` (the proxy cannot log in by itself) it only waits
        for a parked connection, and returns None at once, taking no slot, when
        the key has no connection open at all.

        With a ``waiter``: ``cancel_wait(waiter)`` ends the wait with
        QueryCanceled, and a caller that waited is handed nothing once its
        client has gone (ClientGone; the connection or slot stays in the pool).
        With ``paced`` the caller reports its dial back (``dial_failed``,
        ``dial_succeeded`` or ``dial_abandoned``), and while the server is
        down dials wait for ``retry_at``, one at a time.

        ``limits`` (Limits) are looked at only when a new connection would be
        dialed: beyond ``pool_size`` a caller that has waited
        ``reserve_timeout`` may take one of ``reserve_size`` more; a new
        connection that would exceed its database's or user's cap closes the
        oldest parked connection of another pool of that database or user, or
        waits (asking clients keeping idle ones of it to give them back).
        """
        deadline = None
        victims: list = []
        if waiter is None:
            waiter = Waiter()
        # Whether the waiting client is still there is asked (a non-blocking peek,
        # one syscall) when it is about to be handed something after waiting
        # CLIENT_CHECK_AFTER or more, and after a wait that ended by its time
        # slice; not after every wake-up.
        check_client = waiter.alive is not None
        try:
            while True:
                if self._held and self._held_key(key):
                    deadline = self._wait_while_held(key, deadline, timeout, waiter)
                    if check_client:
                        self._check_client(waiter)
                    continue
                conn = self.checkout(key, prefer)
                if conn is not None:
                    return self._hand_to_client(key, conn, waiter, check_client and self._waited_long(deadline, timeout))
                with self._lock:
                    # Decide here: a parked connection appeared, a slot is free, or wait.
                    if self._closed:
                        raise PoolClosed()
                    self._check_canceled_locked(waiter)
                    if self._idle.get(key):
                        continue
                    wake_at = slice_end = None
                    if not dial:
                        if self._open[key] == 0:
                            return None
                    elif self._open[key] < limit or (
                            limits is not None and self._reserve_locked(key, limit, limits, deadline, timeout)):
                        if limits is not None and not self._room_locked(key, limits, victims):
                            wake_at = time.monotonic() + CAP_SLICE
                        else:
                            wake_at = self._dial_pause_locked(key) if paced else None
                            if wake_at is not None and failover:
                                raise NodeDown()
                        if wake_at is None:
                            if check_client and self._waited_long(deadline, timeout) and not waiter.alive():
                                self.stats["waiters_gone"] += 1
                                raise ClientGone()
                            self._opened_locked(key)
                            return None
                    elif limits is not None and limits.reserve_size:
                        # Wake when the reserve becomes this caller's (it has waited reserve_timeout).
                        slice_end = (time.monotonic() if deadline is None else deadline - timeout) \
                            + limits.reserve_timeout
                    deadline = self._wait_locked(key, deadline, timeout, waiter, wake_at, slice_end)
                    conn, waiter.handed = waiter.handed, None
                if conn is not None:
                    # Released by its last holder straight to us: in use all along, never parked.
                    conn = self._vet(key, conn)
                    if conn is not None:
                        return self._hand_to_client(key, conn, waiter,
                                                    check_client and self._waited_long(deadline, timeout))
                elif waiter.slice_ended and check_client:
                    self._check_client(waiter)
        finally:
            if waiter.waiting:
                with self._lock:
                    waiter.waiting = False
                    waiter.canceled = False
            for conn, other in victims:
                _close(conn, other, "evicted: max_db_connections or max_user_connections reached, "
                                    "and another pool needs a connection")

    @staticmethod
    def _waited_long(deadline: Optional[float], timeout: float) -> bool:
        """Whether a caller that first waited ``deadline - timeout`` has waited CLIENT_CHECK_AFTER."""
        return deadline is not None and time.monotonic() - (deadline - timeout) >= CLIENT_CHECK_AFTER

    def _hand_to_client(self, key: str, conn: Any, waiter: Waiter, check_client: bool) -> Any:
        """``conn`` for a client that waited, if it is still there; else back to the pool."""
        if check_client and not waiter.alive():
            self.checkin(key, conn)          # untouched: parked (or handed) again for the next one
            self._count("waiters_gone")
            raise ClientGone()
        return conn

    def _check_client(self, waiter: Waiter) -> None:
        if not waiter.alive():
            self._count("waiters_gone")
            raise ClientGone()

    def cancel_wait(self, waiter: Waiter) -> bool:
        """End ``waiter``'s wait in ``acquire`` with QueryCanceled; False if it is not waiting."""
        with self._lock:
            if not waiter.waiting:
                return False
            waiter.canceled = True
            self._handoff_locked(waiter.key).wake_all()
            return True

    def _check_canceled_locked(self, waiter: Optional[Waiter]) -> None:
        if waiter is not None and waiter.canceled:
            waiter.canceled = waiter.waiting = False
            self.stats["waits_canceled"] += 1
            raise QueryCanceled()

    # -- pacing the dials of a server that is down -------------------------------

    def _dial_pause_locked(self, key: str) -> Optional[float]:
        """None if the caller may dial ``key``'s server now, else when to look again."""
        down = self._down.get(_node_of(key))
        if down is None:
            return None
        now = time.monotonic()
        if now < down.retry_at:
            return down.retry_at
        if down.probing_since is not None and now - down.probing_since < PROBE_STALE:
            return now + WAIT_SLICE        # another client's dial is under way: its outcome wakes us
        down.probing_since = now           # this caller's dial tells whether the server is back
        return None

    def dial_failed(self, key: str, retry_after: float, error: Any = None, elsewhere: bool = False) -> None:
        """A dial of ``key``'s server failed because the server is down (``error``): pause its dials.

        ``elsewhere``: the client has other nodes to go to (the log says so).
        """
        with self._lock:
            self.stats["dials_failed"] += 1
            node = _node_of(key)
            down = self._down.get(node)
            if down is None:
                if elsewhere:
                    log.warning("node %s is down: a connection to it failed (%s); clients go to the other "
                                "nodes", node, error)
                else:
                    log.warning("server %s is not accepting connections; clients wait for it "
                                "(a new attempt every %g s)", node, retry_after)
                down = self._down[node] = _NodeDown(0.0)
            down.retry_at = time.monotonic() + retry_after
            down.probing_since = None
            down.error = error
            down.checked = down.checked or elsewhere
            self._notify_node_locked(node)
        if elsewhere:
            self.close_parked_of_node(node)

    def dial_succeeded(self, key: str) -> None:
        """A dial of ``key``'s server worked: it is up, every waiter may dial again."""
        if not self._down:
            return
        with self._lock:
            node = _node_of(key)
            if self._down.pop(node, None) is not None:
                log.warning("server %s accepts connections again (node %s is up)", node, node)
                self._notify_node_locked(node)

    def mark_down(self, node: str, retry_after: float, error: Any = None) -> bool:
        """A health check found ``node`` down: no new connections go there, its parked ones are closed.

        Clients keeping an idle connection of it give it back (it is closed,
        not parked).  Returns True if it was up before.
        """
        with self._lock:
            down = self._down.get(node)
            was_up = down is None
            if was_up:
                down = self._down[node] = _NodeDown(0.0)
            down.retry_at = time.monotonic() + retry_after
            down.error = error
            down.checked = True
            for key, held in self._lingering.items():
                if held and _node_of(key) == node:
                    for holder in list(held):
                        del held[holder]
                        holder.wake()
            self._notify_node_locked(node)
        self.close_parked_of_node(node)
        return was_up

    def mark_up(self, node: str) -> bool:
        """A health check reached ``node``: it takes clients again.  True if it was down before."""
        with self._lock:
            if self._down.pop(node, None) is None:
                return False
            self._notify_node_locked(node)
            return True

    def is_down(self, node: str) -> bool:
        """Whether ``node`` is marked down (a failed dial or health check); no lock: a hint for routing."""
        return node in self._down

    def down_nodes(self) -> dict:
        """node -> (wall-clock time marked down, the error) of every node marked down."""
        with self._lock:
            return {node: (d.since, d.error) for node, d in self._down.items()}

    def close_parked_of_node(self, node: str) -> int:
        """Close every parked connection of ``node`` (it went down)."""
        victims = []
        with self._lock:
            for key, dq in self._idle.items():
                if dq and _node_of(key) == node:
                    while dq:
                        victims.append((dq.pop()[0], key))
                        self._total_idle -= 1
                        self._forget_locked(key)
        for conn, key in victims:
            _close(conn, key, "its server is marked down")
        return len(victims)

    def _closing_node_locked(self, key: str) -> bool:
        down = self._down.get(_node_of(key))
        return down is not None and down.checked

    def server_down(self, key: str) -> Any:
        """The error of the last failed dial of ``key``'s server if it is down now, else None."""
        with self._lock:
            down = self._down.get(_node_of(key))
            return None if down is None else down.error

    def dial_abandoned(self, key: str) -> None:
        """A paced dial ended for another reason (the client left, a password was refused)."""
        if not self._down:
            return
        with self._lock:
            down = self._down.get(_node_of(key))
            if down is not None and down.probing_since is not None:
                down.probing_since = None
                self._notify_node_locked(_node_of(key))

    def _notify_node_locked(self, node: str) -> None:
        prefix = node + "\0"
        for key, handoff in self._handoffs.items():
            if key.startswith(prefix):
                handoff.wake_all()

    # -- pass-through logins not yet authenticated ------------------------------

    def acquire_pending(self, key: str, allowance: int, timeout: float) -> None:
        """Let a pass-through login of ``key`` dial: one of its ``allowance`` places.

        Takes no ``pool_size`` slot and evicts nothing.  Waits (first come,
        first served) while ``allowance`` logins of the key are pending; raises
        PoolTimeout after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                if self._closed or self._draining:
                    raise PoolClosed()
                if self._held and self._held_key(key):       # PAUSE: the login waits for RESUME
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.stats["pending_timeouts"] += 1
                        raise PoolTimeout()
                    self._cond_locked(key, self._pending_conds).wait(min(remaining, WAIT_SLICE))
                    continue
                if self._pending[key] < allowance:
                    self._pending[key] += 1
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.stats["pending_timeouts"] += 1
                    raise PoolTimeout()
                self._cond_locked(key, self._pending_conds).wait(remaining)

    def promote(self, key: str, limit: int, timeout: float, limits: Optional[Limits] = None) -> None:
        """The server accepted a pending login of ``key``: move it into a ``pool_size`` slot.

        When the key is full but one of its connections is parked, that one is
        closed and its slot taken over; otherwise waits like ``acquire``
        (PoolTimeout after ``timeout``: the login is still pending then).
        """
        deadline = None
        while True:
            victim = None
            victims: list = []
            with self._lock:
                if self._closed or self._draining:
                    raise PoolClosed()
                if limits is not None and not self._room_locked(key, limits, victims):
                    deadline = self._wait_locked(key, deadline, timeout, None, time.monotonic() + CAP_SLICE)
                    continue
                if self._open[key] < limit:
                    self._opened_locked(key)
                else:
                    dq = self._idle.get(key)
                    if not dq:
                        deadline = self._wait_locked(key, deadline, timeout)
                        continue
                    victim = dq.popleft()[0]          # the oldest parked one; its slot is ours
                    self._total_idle -= 1
                    self.stats["evicted_for_login"] += 1
                self._pending_done_locked(key)
            if victim is not None:
                _close(victim, key, "its slot is taken by a new pass-through login")
            for conn, other in victims:
                _close(conn, other, "evicted: max_db_connections or max_user_connections reached, "
                                    "and another pool needs a connection")
            return

    def give_back_pending(self, key: str, conn: Any, reason: str) -> None:
        """A pending login failed (or was never dialed): close ``conn`` if any, free its place."""
        if conn is not None:
            _close(conn, key, reason)
        with self._lock:
            self._pending_done_locked(key)

    def _pending_done_locked(self, key: str) -> None:
        if self._pending[key] > 0:
            self._pending[key] -= 1
        cond = self._pending_conds.get(key)
        if cond is not None:
            cond.notify()

    # -- lingering: connections kept by their last client until someone needs them

    def linger(self, key: str, holder: Any, conn: Any = None) -> bool:
        """Let ``holder`` keep its idle server connection (``conn``) instead of releasing it.

        Refused (False) when a thread is already waiting for this key, while
        the key is paused, when the connection is to be closed once released
        (RECONNECT), or while the proxy drains for shutdown.  A lingering
        holder must give its connection back (reset, ``checkin``) when its
        ``wake()`` is called: a waiter calls it instead of waiting blindly.
        """
        if self._handoffs.get(key, _NO_HANDOFF).queue:
            return False        # somebody waits (read without the lock: refusing is always safe)
        with self._lock:
            if self._handoffs.get(key, _NO_HANDOFF).queue or self._closed or self._draining or (self._held and self._held_key(key)):
                return False
            if conn is not None and ((self._born_before and conn.created <= self._born_before
                                      and key in self.renewable)
                                     or (self._close_before and self._stale_locked(key, conn))):
                return False
            self._lingering.setdefault(key, {})[holder] = None
            return True

    def unlinger(self, key: str, holder: Any) -> bool:
        """``holder`` uses its connection again (or is leaving): no longer claimable.

        Returns False if a waiter had already claimed it (and called ``wake()``).
        """
        with self._lock:
            held = self._lingering.get(key)
            if held is not None and holder in held:
                del held[holder]
                return True
            return False

    def _wait_locked(self, key: str, deadline: Optional[float], timeout: float,
                     waiter: Optional[Waiter] = None, wake_at: Optional[float] = None,
                     slice_end: Optional[float] = None) -> float:
        """Wait for a release of ``key``, first asking one lingering holder to let go.

        ``deadline`` is None on a caller's first wait (it is computed once, here,
        and returned); raises PoolTimeout once it has passed.  With ``wake_at``
        (the server is down: the next dial may happen then) nobody is asked to
        let go, and the wait ends by then.  A ``waiter`` wakes at least every
        WAIT_SLICE seconds, so its caller can see that its client left.
        """
        now = time.monotonic()
        if deadline is None:
            deadline = now + timeout
            self.stats["waits"] += 1
            if waiter is not None and waiter.on_wait is not None:
                waiter.on_wait()          # (events.EventHub.emit: a queue put, no I/O)
        remaining = deadline - now
        if remaining <= 0:
            self.stats["wait_timeouts"] += 1
            raise PoolTimeout()
        if wake_at is not None:
            remaining = min(remaining, max(0.0, wake_at - now))
        else:
            held = self._lingering.get(key)
            if held:
                holder = next(iter(held))
                del held[holder]
                holder.wake()          # a non-blocking eventfd write
        if slice_end is not None:
            remaining = min(remaining, max(0.0, slice_end - now))
        if waiter is None:
            waiter = Waiter(takes_connection=False)
        elif waiter.alive is not None:
            remaining = min(remaining, WAIT_SLICE)
        waiter.key, waiter.waiting = key, True
        waiter.slice_ended = not self._handoff_locked(key).wait(waiter, remaining)
        return deadline

    def expire(self, lifetime: float) -> int:
        """server_lifetime (the janitor, each round): connections older than ``lifetime`` seconds
        are closed: parked ones now, lingering ones are asked back (and closed at checkin), the
        others when released.  0: every connection serves once.  Returns how many closed now."""
        cutoff = float("inf") if lifetime == 0 else time.time() - lifetime
        victims = []
        with self._lock:
            self._born_before = cutoff
            for key, dq in self._idle.items():
                if dq and key in self.renewable and any(conn.created <= cutoff for conn, _ in dq):
                    keep = collections.deque()
                    for conn, since in dq:
                        if conn.created <= cutoff:
                            victims.append((conn, key))
                            self._total_idle -= 1
                            self.stats["lifetime_closed"] += 1
                            self._forget_locked(key)
                        else:
                            keep.append((conn, since))
                    self._idle[key] = keep
            for key, held in self._lingering.items():
                if key not in self.renewable:
                    continue
                for holder in [h for h in held if getattr(getattr(h, "backend", None), "created", cutoff + 1) <= cutoff]:
                    del held[holder]
                    holder.wake()
        for conn, key in victims:
            _close(conn, key, f"server_lifetime: open for longer than {lifetime:g} s")
        return len(victims)

    def take_slot(self, key: str, upto: int, limits: Optional[Limits] = None) -> bool:
        """min_pool_size: take a slot of ``key`` for a new connection if fewer than ``upto`` are open
        or logging in, within the caps of ``limits`` (no eviction, no wait); False otherwise."""
        with self._lock:
            if self._closed or self._draining or self._open[key] + self._pending[key] >= upto:
                return False
            if self._held and self._held_key(key):
                return False
            if limits is not None:
                for group, cap in zip(self._groups_locked(key), (limits.db_cap, limits.user_cap)):
                    if cap and self._open_groups[group] >= cap:
                        return False
            if self._down and _node_of(key) in self._down:
                return False
            self._opened_locked(key)
            return True

    def release_slot(self, key: str) -> None:
        """Give back a slot whose connection was never made or is already closed."""
        with self._lock:
            self._forget_locked(key)

    def discard(self, key: str, conn: Any, reason: str = "its state is unknown") -> None:
        """Close an in-use connection instead of parking it, freeing its slot."""
        _close(conn, key, reason)
        self.release_slot(key)

    def give_back(self, key: str, conn: Any, reason: str) -> None:
        """A connection attempt failed: close ``conn`` if it got that far, and free the slot."""
        if conn is None:
            self.release_slot(key)
        else:
            self.discard(key, conn, reason)

    # -- the server's defaults per key -------------------------------------------

    def learn_defaults(self, key: str, params: Dict[str, str]) -> None:
        """Remember settings a fresh login of ``key`` reported that its client did not ask for."""
        with self._lock:
            self._defaults.setdefault(key, {}).update(params)

    def defaults(self, key: str) -> Dict[str, str]:
        """What the server's settings of ``key`` are when nobody changed them (a copy)."""
        with self._lock:
            return dict(self._defaults.get(key, ()))

    def open_count(self, key: str) -> int:
        """Authenticated connections of ``key`` (in use or parked): at most its pool_size."""
        with self._lock:
            return self._open[key]

    def pending_count(self, key: str) -> int:
        """Pass-through logins of ``key`` dialed and not yet accepted by the server."""
        with self._lock:
            return self._pending[key]

    def idle_count(self, key: Optional[str] = None) -> int:
        with self._lock:
            if key is None:
                return self._total_idle
            return len(self._idle.get(key, ()))

    # -- PAUSE, RECONNECT, draining (the admin console, shutdown) ------------------
    #
    # A target is (node, server-side database) or ALL_SERVERS; it matches the
    # pool keys of clients (node, user, database), never the proxy's own keys
    # (auth_query, console logins), which have a fourth part.

    def hold(self, target) -> None:
        """PAUSE: checkouts and pass-through logins of ``target`` wait (``query_wait_timeout``) until ``unhold``.

        Clients keeping an idle connection of it are asked to give it back.
        """
        with self._lock:
            self._held.add(target)
            self._wake_lingering_locked(target)

    def unhold(self, target=None) -> None:
        """RESUME ``target`` (None: everything held)."""
        with self._lock:
            if target is None:
                self._held.clear()
            else:
                self._held.discard(target)
            if self._draining:
                self._held.add(ALL_SERVERS)       # a shutdown's hold outlives any RESUME
            for handoff in self._handoffs.values():
                handoff.wake_all()
            for cond in self._pending_conds.values():
                cond.notify_all()

    def held(self) -> set:
        with self._lock:
            return set(self._held)

    def in_use(self, target) -> int:
        """Connections of ``target`` given out to clients (not parked); PAUSE waits for 0."""
        with self._lock:
            return sum(n - len(self._idle.get(k, ())) for k, n in self._open.items() if key_matches(k, target))

    def close_released(self, target, before: float) -> int:
        """RECONNECT: close connections of ``target`` created at or before ``before`` (time.time()).

        Parked ones now; the others when their client releases them (they are
        never kept idle by a client, nor parked, again).  Returns how many were
        closed now.
        """
        with self._lock:
            self._close_before[target] = max(before, self._close_before.get(target, 0.0))
            self._wake_lingering_locked(target)
        return self.close_parked(target, before)

    def close_parked(self, target, before: float | None = None,
                     reason: str = "closed by the admin console (RECONNECT or KILL)") -> int:
        """Close the parked connections of ``target`` (those created at or before ``before``, if given)."""
        victims = []
        with self._lock:
            for key, dq in self._idle.items():
                if not key_matches(key, target):
                    continue
                keep = collections.deque()
                for conn, since in dq:
                    if before is None or getattr(conn, "created", 0.0) <= before:
                        victims.append((conn, key))
                        self._total_idle -= 1
                        self._forget_locked(key)
                    else:
                        keep.append((conn, since))
                self._idle[key] = keep
        for conn, key in victims:
            _close(conn, key, reason)
        return len(victims)

    def close_needed(self, key: str, conn: Any) -> bool:
        """True if ``conn`` will be closed when released (SHOW SERVERS' close_needed)."""
        with self._lock:
            return bool(self._close_before) and self._stale_locked(key, conn)

    def drain(self) -> int:
        """Graceful shutdown: no transaction starts any more; connections close as they are released.

        Parked connections are closed now (how many is returned); clients
        keeping idle ones are woken to give them back; a connection released
        later is closed, never parked, kept or handed on; waiting checkouts
        and pending pass-through logins end with PoolClosed, and so do new
        ones.  Costs the hot path nothing: it rides on the PAUSE hold
        (``_held``) and the RECONNECT cutoff (``_close_before``) that
        checkouts and releases already look at.
        """
        with self._lock:
            self._draining = True
            self._held.add(ALL_SERVERS)
            self._close_before[ALL_SERVERS] = float("inf")
            self._wake_lingering_locked(ALL_SERVERS)
            for handoff in self._handoffs.values():
                handoff.wake_all()
            for cond in self._pending_conds.values():
                cond.notify_all()
        return self.close_parked(ALL_SERVERS, reason="the proxy is shutting down")

    @property
    def draining(self) -> bool:
        return self._draining

    def _wait_while_held(self, key: str, deadline, timeout: float, waiter) -> float:
        with self._lock:
            if self._closed or self._draining:
                raise PoolClosed()
            self._check_canceled_locked(waiter)
            if self._held_key(key):
                deadline = self._wait_locked(key, deadline, timeout, waiter, time.monotonic() + WAIT_SLICE)
        return deadline

    def _held_key(self, key: str) -> bool:
        held = self._held
        return bool(held) and any(key_matches(key, target) for target in tuple(held))

    def _stale_locked(self, key: str, conn: Any) -> bool:
        created = getattr(conn, "created", None)
        if created is None:
            return False
        return any(created <= before for target, before in self._close_before.items() if key_matches(key, target))

    def _wake_lingering_locked(self, target) -> None:
        for key, held in self._lingering.items():
            if held and key_matches(key, target):
                for holder in list(held):
                    del held[holder]
                    holder.wake()

    def parked(self) -> list:
        """(key, connection, monotonic time parked) of every parked connection, for SHOW SERVERS."""
        with self._lock:
            return [(key, conn, since) for key, dq in self._idle.items() for conn, since in dq]

    def snapshot(self) -> dict:
        """Counters and per-key sizes, for logs, tests and an admin console."""
        with self._lock:
            return {
                "stats": dict(self.stats),
                "idle": {k: len(v) for k, v in self._idle.items() if v},
                "open": {k: v for k, v in self._open.items() if v},
                "pending": {k: v for k, v in self._pending.items() if v},
                "servers_down": sorted(self._down),
                "total_idle": self._total_idle,
            }

    def close(self) -> None:
        """Close every parked connection and wake every waiter (shutdown)."""
        with self._lock:
            self._closed = True
            victims = [(c, key) for key, dq in self._idle.items() for c, _ in dq]
            for key, dq in self._idle.items():
                for _ in dq:
                    self._forget_locked(key)
                dq.clear()
            self._total_idle = 0
            for handoff in self._handoffs.values():
                handoff.wake_all()
            for cond in self._pending_conds.values():
                cond.notify_all()
            holders = [h for held in self._lingering.values() for h in held]
            self._lingering.clear()
            for holder in holders:
                holder.wake()
        for conn, key in victims:
            _close(conn, key, "the proxy is shutting down")

    # -- helpers (lock held) ------------------------------------------------

    def _pop_locked(self, key: str, prefer) -> Any:
        dq = self._idle.get(key)
        if not dq:
            return None
        if prefer is not None and len(dq) > 1:
            for i in range(len(dq) - 1, -1, -1):
                if prefer(dq[i][0]):
                    conn = dq[i][0]
                    del dq[i]
                    self._total_idle -= 1
                    return conn
        conn = dq.pop()[0]
        self._total_idle -= 1
        return conn

    def _forget_locked(self, key: str) -> None:
        """One connection of ``key`` is gone: free its slot and wake its waiters.

        All of them: a free slot is of use only to a waiter that may dial (a
        pass-through login); a woken query waiter would go back to sleep with it.
        """
        if self._open[key] > 0:
            self._open[key] -= 1
            for group in self._groups_locked(key):
                self._open_groups[group] -= 1
        handoff = self._handoffs.get(key)
        if handoff is not None:
            handoff.wake_all()

    def _opened_locked(self, key: str) -> None:
        """A slot of ``key`` is taken (a connection is being opened): count it, for its groups too."""
        self._open[key] += 1
        for group in self._groups_locked(key):
            self._open_groups[group] += 1

    def _groups_locked(self, key: str) -> tuple:
        """(("d", database), ("u", user)) of a client key; () for the proxy's own keys."""
        groups = self._key_groups.get(key)
        if groups is None:
            parts = key.split("\0")
            groups = self._key_groups[key] = (("d", parts[2]), ("u", parts[1])) if len(parts) == 3 else ()
        return groups

    def _reserve_locked(self, key: str, limit: int, limits: Limits, deadline, timeout: float) -> bool:
        """Whether a caller that has waited may take one of ``reserve_size`` connections beyond ``limit``."""
        if not limits.reserve_size or deadline is None or self._open[key] >= limit + limits.reserve_size:
            return False
        waited = time.monotonic() - (deadline - timeout)
        if waited < limits.reserve_timeout:
            return False
        self.stats["reserve_used"] += 1
        log.warning("%s: a client waited %.1f s (reserve_pool_timeout %g s): taking a connection from "
                    "reserve_pool (%d of %d in use)", _show(key), waited, limits.reserve_timeout,
                    self._open[key] - limit + 1, limits.reserve_size)
        return True

    def _room_locked(self, key: str, limits: Limits, victims: list) -> bool:
        """Whether one more connection of ``key`` fits its database's and user's caps.

        Makes room by taking out the oldest parked connection of another pool
        of the same database or user (into ``victims``, closed by the caller
        after the lock), as PgBouncer evicts; failing that, asks one client
        keeping an idle connection of that group to give it back.
        """
        for group, cap in zip(self._groups_locked(key), (limits.db_cap, limits.user_cap)):
            while cap and self._open_groups[group] >= cap:
                victim = self._evict_locked(group)
                if victim is None:
                    self._wake_lingering_group_locked(group)
                    return False
                victims.append(victim)
        return True

    def _evict_locked(self, group) -> Optional[Tuple[Any, str]]:
        """Take out the oldest parked connection of ``group`` (its slot freed); (conn, key) or None."""
        oldest = None
        for other, dq in self._idle.items():
            if dq and group in self._groups_locked(other) and (oldest is None or dq[0][1] < oldest[1]):
                oldest = (other, dq[0][1])
        if oldest is None:
            return None
        other = oldest[0]
        conn = self._idle[other].popleft()[0]
        self._total_idle -= 1
        self.stats["evicted_for_limit"] += 1
        self._forget_locked(other)
        return conn, other

    def _wake_lingering_group_locked(self, group) -> None:
        for other, held in self._lingering.items():
            if held and group in self._groups_locked(other):
                holder = next(iter(held))
                del held[holder]
                holder.wake()
                return

    def _count(self, stat: str) -> None:
        with self._lock:
            self.stats[stat] += 1

    def _handoff_locked(self, key: str) -> _HandOff:
        handoff = self._handoffs.get(key)
        if handoff is None:
            handoff = self._handoffs[key] = _HandOff(self._lock)
        return handoff

    def _cond_locked(self, key: str, table: Dict[str, threading.Condition]) -> threading.Condition:
        cond = table.get(key)
        if cond is None:
            cond = table[key] = threading.Condition(self._lock)
        return cond


#: A PAUSE/RECONNECT target meaning every server and database.
ALL_SERVERS = ("*", "*")


def key_matches(key: str, target) -> bool:
    """Whether the client pool key ``key`` belongs to ``target`` ((node or nodes, database) or ALL_SERVERS)."""
    parts = key.split("\0")
    if len(parts) != 3:
        return False
    if target == ALL_SERVERS:
        return True
    nodes = target[0]
    return parts[2] == target[1] and (parts[0] in nodes if isinstance(nodes, tuple) else parts[0] == nodes)


def _node_of(key: str) -> str:
    return key.split("\0", 1)[0]


def _show(key: str) -> str:
    """A pool key for humans: node/user/database."""
    return key.replace("\0", "/")
