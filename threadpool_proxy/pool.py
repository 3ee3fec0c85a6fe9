"""The backend idle pool: parked, authenticated server connections by identity.

Herding server connections between "in use" and "parked" happens here, and so
does the ``pool_size`` accounting that keeps PostgreSQL from ever seeing more
than ``pool_size`` connections of one (node, user, database) key.

Design notes
------------
* What belongs to one identity lives in one ``IdentityPool`` (as PgBouncer
  keeps one PgPool per database and user): its parked connections, its
  counts, its waiters, the clients keeping an idle connection of it, its
  server's defaults.  ``BackendIdlePool`` is the registry above them and
  holds only what spans identities; an identity leaves the registry, in one
  ``del``, as soon as it holds nothing.
* One lock guards everything.  Waiters of a key queue first come, first
  served (``IdentityPool.wait``), each on a gate of its own, opened after the
  pool lock is let go, so the woken thread does not start by waiting for that
  lock (a Condition's notify under the lock would make it do just that, on
  every hand-off).  A connection released while somebody waits is parked and
  the longest waiter called; a client that is running meanwhile may take it
  first (it barges), and the called waiter, should it find nothing, waits
  again at the head of the queue.  One waiter is called at a time: more
  releases meanwhile only park, and whoever takes a parked connection calls
  the next waiter if more are parked (every call that finds nothing is two
  context switches wasted: calling one per release lost a quarter of them).  A strict hand-off to a sleeping thread
  makes every release wait until that one thread is scheduled: on a busy
  machine a lock convoy.  A waiter that has waited ``HANDOFF_AFTER`` already
  is handed the connection directly, which bounds the unfairness.
* No socket I/O happens while the lock is held: connections to close or to
  probe are taken out of the structure under the lock and handled after it.
* Parked connections are reused LIFO (the most recently parked is the warmest);
  the reaper closes from the other end, where the oldest sit.
* A connection is anything with ``close()`` whose ``raw_socket`` attribute (or
  itself) is a socket, plain or TLS: the liveness probe peeks at the raw bytes
  of its descriptor (``tls.raw_peek``: an SSLSocket's own recv refuses
  ``MSG_PEEK``), so under TLS any record at all, or bytes already decrypted,
  mean the idle connection spoke and is not clean.

Accounting per identity (``IdentityPool``, one per key), under the lock:

* ``open``: authenticated connections, in use or parked: at most ``pool_size``.
* ``pending``: pass-through logins dialed but not yet accepted by the server
  (no AuthenticationOk yet): at most ``max_pending_logins``, a separate
  allowance, so a login that has proved nothing never takes a slot, never
  evicts a parked connection and never makes an authenticated client wait.
  Once PostgreSQL accepts it, ``promote`` moves it into a slot (closing a
  parked connection of the key, or waiting, when the key is full).  So
  PostgreSQL sees at most ``pool_size + max_pending_logins`` connections of a key.
  All keys together hold at most ``max_pending_logins_total`` places (a client
  picks its key: invented user names must not multiply the allowance), and a
  key whose count is back to 0, with nobody waiting, is forgotten: what a login
  that never authenticated leaves behind is nothing.

Waiting clients (``acquire`` with a ``Waiter``) are woken at least every
``WAIT_SLICE`` seconds to check that their client is still connected, can be
canceled (a CancelRequest), and are never handed a connection once their client
left.  After a failed dial of a server (down, restarting), new dials of that
server are paced: one attempt per ``server_login_retry``, one at a time.
"""

from __future__ import annotations

import collections
import select
import threading
import time
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from . import tls
from .errors import ClientGone, NodeDown, PoolClosed, PoolTimeout, QueryCanceled, TooManyPending
from .logs import get_logger

__all__ = ["ALL_SERVERS", "BackendIdlePool", "Limits", "key_matches", "PoolClosed", "PoolTimeout", "Waiter", "pool_key", "probe_alive"]

log = get_logger(__name__)

#: Longest a waiting client sleeps before checking that it is still connected.
WAIT_SLICE = 1.0
#: A client that waited at least this long is asked whether it is still there
#: before it is handed a connection (a peek, one syscall).  One that waited less
#: is not: PostgreSQL too runs a query whose client left just after sending it,
#: and under contention nearly every transaction waits a little.
CLIENT_CHECK_AFTER = 0.01

#: A connection released while clients wait is parked and the longest waiter called to come and take
#: it, and a client that is running meanwhile may take it first (it barges: the called one may still be
#: waiting for a CPU, and a lock convoy behind every sleeping waiter is what a busy machine makes of a
#: strict hand-off).  A waiter that has waited this long already is handed the connection directly, so
#: no client waits much more than first come, first served would make it wait.
HANDOFF_AFTER = 0.01

#: How often a client that waits because of max_db_connections or max_user_connections looks again
#: (a connection of another pool of its database or user may have closed or become parked meanwhile).
CAP_SLICE = 0.05

#: A dial of a down server not reported back within this long no longer blocks others.
PROBE_STALE = 120.0


#: The fourth part of the pool keys of database entries with ``auth_type: trust``.
TRUST_KEY = "trust"


def pool_key(node: str, user: str, database: str, trust: bool = False) -> str:
    """``node\\0user\\0database``: NUL cannot occur in any component, so keys never collide.

    ``trust``: for an entry with ``auth_type: trust`` (``\\0trust`` appended).
    Its clients proved nothing, so its connections are a pool of their own: a
    connection another entry's client logged in with a password (or with what
    that client proved) is never handed to a client nobody checked.
    """
    for part in (node, user, database):
        if "\0" in part:
            raise ValueError("pool key components cannot contain NUL")
    return f"{node}\0{user}\0{database}\0{TRUST_KEY}" if trust else f"{node}\0{user}\0{database}"


def _client_key_parts(key: str) -> list | None:
    """[node, user, database] of a client pool key (trust or not); None for the proxy's own keys."""
    parts = key.split("\0")
    if len(parts) == 4 and parts[3] == TRUST_KEY:
        return parts[:3]
    return parts if len(parts) == 3 else None


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
                 "on_wait", "since", "called", "front", "capped")

    def __init__(self, alive: Optional[Callable[[], bool]] = None, takes_connection: bool = True) -> None:
        self.alive = alive
        self.key: Optional[str] = None      # what it waits for
        self.waiting = False
        self.canceled = False
        self.slice_ended = False      # its last wait ended by time, not by a wake-up
        self.gate: Any = None         # the lock it sleeps on while queued (IdentityPool.wait)
        self.handed: Any = None       # a connection handed to it while it slept
        self.takes_connection = takes_connection   # False: it waits for a free slot (promote)
        self.on_wait: Optional[Callable[[], None]] = None   # called (under the pool's lock) when a wait begins
        self.since = 0.0              # monotonic time its current checkout began to wait
        self.called = False           # woken to take a parked connection (IdentityPool.called counts it)
        self.front = False            # called, and somebody else took it: it queues first again
        self.capped = False           # it waits for room under max_db/max_user_connections, and may dial then


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
        user_cap = getattr(db, "max_user_connections", 0) or config.max_user_connections   # a ``users`` override
        if not (db.max_db_connections or user_cap or db.reserve_pool_size):
            return None
        return cls(db.max_db_connections, user_cap, db.reserve_pool_size, config.reserve_pool_timeout)


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


class IdentityPool:
    """What the pool holds for one identity, ``node\\0user\\0database`` (PgBouncer's PgPool).

    Guarded by the pool's one lock; ``BackendIdlePool`` keeps one per key in
    its registry and only what spans identities beside it.  An identity is in
    the registry only while it holds something (``is_empty``): the pool drops
    it wherever one of its counts falls or a wait on it ends, so a key that
    only ever saw failed logins leaves nothing behind.  Nobody keeps a
    reference to one across a release of the pool lock except a thread asleep
    on it (counted in ``sleepers``, so it is not dropped under that thread).

    Its waiters queue first come, first served: ``wait`` queues one and
    sleeps on its own gate (the pool lock let go meanwhile); ``hand`` gives a
    released connection to the longest waiter that takes one and returns it,
    for the caller to open its gate once it has let go of the pool lock;
    ``wake_all`` opens every gate with nothing handed (a slot was freed, a
    server came back, RESUME, a cancel, shutdown: each waiter looks again).
    """

    __slots__ = ("key", "lock", "idle", "open", "pending", "waiters", "called", "sleepers", "login_cond",
                 "lingering", "defaults", "groups", "ceiling", "limits", "pinned")

    def __init__(self, key: str, lock: Any) -> None:
        self.key = key
        self.lock = lock
        #: Parked connections, (connection, monotonic time parked), oldest first:
        #: reused from the right (LIFO), reaped from the left.
        self.idle: Deque[Tuple[Any, float]] = collections.deque()
        #: Authenticated connections, in use or parked: at most pool_size.
        self.open = 0
        #: Pass-through logins dialed and not yet accepted by the server: at most max_pending_logins.
        self.pending = 0
        #: Checkouts waiting for a connection or a slot, longest first.
        self.waiters: Deque[Waiter] = collections.deque()
        #: Waiters called to take a parked connection that have not woken yet (they count as waiting).
        self.called = 0
        #: Threads asleep on this identity (its waiters, and logins waiting for a pending place),
        #: woken or not: each is still to take the pool lock back and look again.
        self.sleepers = 0
        #: Where logins wait for a pending place (or for RESUME); made on the first wait.
        self.login_cond: Optional[threading.Condition] = None
        #: Clients keeping their idle connection until someone needs it (``linger``), oldest first.
        self.lingering: Dict[Any, None] = {}
        #: The server's settings of this identity when nobody changed them, learned from fresh logins.
        self.defaults: Dict[str, str] = {}
        #: Its groups, whose open connections max_db_connections and max_user_connections count.
        self.groups = _groups_of(key)
        #: The most connections it may keep open: pool_size (plus reserve_pool_size) as its checkouts
        #: last said or RELOAD set (``resize``); 0 until known.  A connection released while more are
        #: open is closed, not parked or handed on, so a lowered pool_size takes effect.
        self.ceiling = 0
        #: The caps of its database and user (Limits) as its checkouts last said, or None.
        self.limits: Optional[Limits] = None
        #: Clients pinned to their server connection (or about to be), at most max_pinned_clients.
        self.pinned = 0

    def is_empty(self) -> bool:
        """Nothing parked, open, pending, waiting, lingering or pinned: the registry may forget it."""
        return not (self.open or self.pending or self.idle or self.sleepers or self.waiters or self.lingering
                    or self.pinned)

    # -- parked connections --------------------------------------------------------

    def pop(self, prefer: Optional[Callable[[Any], bool]] = None) -> Any:
        """Take out the newest parked connection, or the newest for which ``prefer`` is true (one is parked)."""
        idle = self.idle
        if prefer is not None and len(idle) > 1:
            for i in range(len(idle) - 1, -1, -1):
                if prefer(idle[i][0]):
                    conn = idle[i][0]
                    del idle[i]
                    return conn
        return idle.pop()[0]

    def take_parked(self, which: Optional[Callable[[Any], bool]] = None) -> list:
        """Take out every parked connection (for which ``which`` is true) and return them."""
        if which is None:
            taken = [conn for conn, _ in self.idle]
            self.idle.clear()
            return taken
        keep: Deque[Tuple[Any, float]] = collections.deque()
        taken = []
        for parked in self.idle:
            if which(parked[0]):
                taken.append(parked[0])
            else:
                keep.append(parked)
        if taken:
            self.idle = keep
        return taken

    # -- waiters: hand-offs ------------------------------------------------------

    def wait(self, waiter: Waiter, timeout: float) -> bool:
        """Sleep up to ``timeout`` (pool lock held on entry and on return); True if woken.

        A waiter that was called and lost the connection to a barging client
        queues first again: it keeps its place.
        """
        gate = waiter.gate = threading.Lock()
        gate.acquire()
        if waiter.front:
            waiter.front = False
            self.waiters.appendleft(waiter)
        else:
            self.waiters.append(waiter)
        self.sleepers += 1
        self.lock.release()
        woken = False
        try:
            woken = gate.acquire(True, timeout) if timeout > 0 else False
        finally:
            self.lock.acquire()
            self.sleepers -= 1
            if not woken:
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    woken = True     # opened (or handed a connection) just as the time ran out
            if waiter.called:
                waiter.called = False
                waiter.front = True       # until it takes a connection: should it wait again, it is next
                self.called -= 1
        return woken

    def hand(self, conn: Any, barge_before: float, call: bool = True) -> Tuple[Optional[Waiter], bool]:
        """The longest waiter that takes a connection, and whether ``conn`` is handed to it.

        Handed directly when it began to wait at or before ``barge_before``;
        otherwise it is only called (``conn`` is to be parked, where a running
        client may take it first).  (None, False): nobody takes one.  Waiters
        met on the way that only want a slot are woken to look again.  The
        caller opens the returned waiter's gate once it has let go of the lock.
        """
        waiters = self.waiters
        while waiters:
            waiter = waiters[0]
            if waiter.takes_connection and waiter.since > barge_before and not call:
                return None, False            # one called already: it is on its way (it calls the next)
            waiters.popleft()
            if waiter.takes_connection:
                if waiter.since > barge_before:
                    waiter.called = True
                    self.called += 1
                    return waiter, False
                # No longer waiting: a CancelRequest from now on is for the server connection.
                waiter.handed, waiter.waiting = conn, False
                return waiter, True
            waiter.gate.release()
        return None, False

    def call_next(self) -> Optional[Waiter]:
        """Call the longest waiter that takes a connection to come for a parked one (its gate is for
        the caller to open after the lock); None if nobody waits for one."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.takes_connection:
                waiter.called = True
                self.called += 1
                return waiter
            waiter.gate.release()
        return None

    def grant_slot(self) -> Optional[Waiter]:
        """Give a slot (taken by the caller) to the longest waiter held back by a cap, to dial in;
        returned for the caller to open its gate once it has let go of the pool lock (None: nobody)."""
        for waiter in self.waiters:
            if waiter.capped:
                self.waiters.remove(waiter)
                waiter.handed, waiter.waiting = _NO_CONNECTION, False
                return waiter
        return None

    def wake_all(self) -> None:
        waiters = self.waiters
        while waiters:
            waiters.popleft().gate.release()

    def wake_everyone(self) -> None:
        """RESUME, shutdown: every waiting checkout and login of this identity looks again."""
        self.wake_all()
        if self.login_cond is not None:
            self.login_cond.notify_all()

    # -- lingering holders -------------------------------------------------------

    def ask_back_one(self) -> bool:
        """Ask a lingering holder to give its connection back: the longest idle one, else the longest
        entered (it is in a transaction: it lets go at its end); False if there is none."""
        held = self.lingering
        if not held:
            return False
        holder = next((h for h in held if getattr(h, "lingering", True)), None) or next(iter(held))
        del held[holder]
        holder.wake()          # a non-blocking eventfd write
        return True

    def ask_back_all(self, which: Optional[Callable[[Any], bool]] = None) -> None:
        """Ask every lingering holder (for which ``which`` is true) to give its connection back."""
        held = self.lingering
        for holder in [h for h in held if which is None or which(h)]:
            del held[holder]
            holder.wake()

    # -- pending pass-through logins ---------------------------------------------

    def wait_for_login_place(self, timeout: float) -> None:
        """Sleep up to ``timeout`` until a pending login of this identity ends (pool lock held)."""
        cond = self.login_cond
        if cond is None:
            cond = self.login_cond = threading.Condition(self.lock)
        self.sleepers += 1
        try:
            cond.wait(timeout)
        finally:
            self.sleepers -= 1

    def login_place_freed(self) -> None:
        """One pending login ended: the longest waiting login may take its place."""
        if self.pending > 0:
            self.pending -= 1
        if self.login_cond is not None:
            self.login_cond.notify()


def _groups_of(key: str) -> tuple:
    """(("d", database), ("u", user)) of a client key (trust ones too); () for the proxy's own keys."""
    parts = _client_key_parts(key)
    return (("d", parts[2]), ("u", parts[1])) if parts else ()


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


def _close_evicted(victims: list) -> None:
    """Close (connection, key) pairs taken out to make room under max_db/max_user_connections."""
    for conn, key in victims:
        _close(conn, key, "evicted: max_db_connections or max_user_connections reached, "
                          "and another pool needs a connection")


#: ``acquire`` returns None: a slot was taken for the caller to dial in, or (dial=False) nothing is open.
_NO_CONNECTION = object()


class _Checkout:
    """One ``acquire`` that found nothing parked at once: what it asks for, and since when it waits."""

    __slots__ = ("key", "limit", "timeout", "prefer", "dial", "waiter", "paced", "failover", "limits",
                 "check_client", "deadline", "victims")

    def __init__(self, key: str, limit: int, timeout: float, prefer: Optional[Callable[[Any], bool]],
                 dial: bool, waiter: Waiter, paced: bool, failover: bool, limits: Optional[Limits]) -> None:
        self.key, self.limit, self.timeout, self.prefer, self.dial = key, limit, timeout, prefer, dial
        self.waiter, self.paced, self.failover, self.limits = waiter, paced, failover, limits
        # Whether the waiting client is still there is asked (a non-blocking peek,
        # one syscall) when it is about to be handed something after waiting
        # CLIENT_CHECK_AFTER or more, and after a wait that ended by its time
        # slice; not after every wake-up.
        self.check_client = waiter.alive is not None
        self.deadline: Optional[float] = None     # set at its first wait: monotonic() + timeout
        self.victims: list = []                   # (conn, key) evicted for the caps, closed at the end

    def client_left(self) -> bool:
        """Whether its client, once it has waited CLIENT_CHECK_AFTER or more, is gone (a peek)."""
        return self.check_client and self.deadline is not None \
            and time.monotonic() - (self.deadline - self.timeout) >= CLIENT_CHECK_AFTER and not self.waiter.alive()

    def reserve_time(self) -> Optional[float]:
        """When the reserve becomes its own (it will have waited reserve_timeout), if there is one."""
        limits = self.limits
        if limits is None or not limits.reserve_size:
            return None
        return (time.monotonic() if self.deadline is None else self.deadline - self.timeout) + limits.reserve_timeout


class BackendIdlePool:
    """The registry of ``IdentityPool``s by ``pool_key``, and what spans identities.

    That is: the one lock, the idle totals and caps, open connections per
    database and user (max_db_connections, max_user_connections), servers
    marked down and the pacing of their dials, PAUSE and RECONNECT targets,
    draining and server_lifetime.

    Caller API: ``checkout``, ``checkin``, ``reap_idle`` (the idle structure);
    ``acquire``, ``release_slot``, ``discard`` (the ``pool_size`` accounting,
    which blocks callers when a key is full); ``cancel_wait`` (end a waiter's
    wait); ``dial_failed``/``dial_succeeded``/``dial_abandoned`` (pacing dials of
    a down server); ``acquire_pending``, ``promote``, ``give_back_pending`` (the
    allowance of pass-through logins not yet authenticated);
    ``linger``/``unlinger`` (clients keeping an idle connection while nobody
    waits); ``learn_defaults``/``defaults`` (the server's default settings per
    key, learned from fresh logins); ``close`` at shutdown; ``stats``,
    ``snapshot`` and ``identities`` for observation.
    """

    def __init__(self, max_idle_per_key: int, max_total_idle: int) -> None:
        self.max_idle_per_key = max_idle_per_key
        self.max_total_idle = max_total_idle
        self._lock = threading.Lock()
        self._pools: Dict[str, IdentityPool] = {}     # the registry: key -> its identity's pool
        self._total_idle = 0
        # Open connections per ("d", database) and ("u", user) of client keys, for
        # max_db_connections and max_user_connections; changed only when one opens or closes, and
        # a group whose count falls to 0 goes.
        self._open_groups: Dict[Tuple[str, str], int] = collections.Counter()
        self._pending_total = 0                 # pending logins of every identity (max_pending_logins_total)
        self._down: Dict[str, _NodeDown] = {}
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
            reserve_used=0, lifetime_closed=0, pending_refused=0, shrunk=0, barged=0)

    # -- the idle structure -------------------------------------------------

    def checkout(self, key: str, prefer: Optional[Callable[[Any], bool]] = None, limit: int = 0,
                 limits: Optional[Limits] = None) -> Any:
        """Return a live parked connection of ``key``, or None.

        With ``prefer``, the newest parked connection for which it is true is
        taken first (used to find one whose session parameters already match).
        Dead connections met on the way are closed and counted.  ``limit`` and
        ``limits`` (when given): the key's pool_size and caps as the caller
        knows them, noted for its releases.
        """
        while True:
            with self._lock:
                ident = self._pools.get(key)
                if ident is None or not ident.idle:
                    return None
                if limit:
                    self._note_limits_locked(ident, limit, limits)
                conn = ident.pop(prefer)
                self._total_idle -= 1
                caller = ident.call_next() if ident.idle and ident.waiters and not ident.called else None
            if caller is not None:
                caller.gate.release()         # more are parked: the next waiter comes for one
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
        pools = self._pools
        for key in keys:
            ident = pools.get(key)
            if ident is None or not ident.idle or (self._held and self._held_key(key)):
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
            ident = self._pools.get(key) or self._identity_locked(key)
            reason = self._refusal_locked(ident, conn, reset_ok)
            if reason is None and ident.limits is not None:
                taker = self._grant_to_starving_locked(ident)
                if taker is not None:
                    reason = (f"max_db_connections or max_user_connections reached: its slot goes to a waiting "
                              f"client of {_show(taker.key)}, which had no connection")
            if reason is None:
                now = time.monotonic()
                handed = False
                if ident.waiters and not (self._held and self._held_key(key)):
                    taker, handed = ident.hand(conn, now - HANDOFF_AFTER, ident.called == 0)
                if handed:
                    self.stats["handed_on"] += 1
                else:
                    ident.idle.append((conn, now))
                    self._total_idle += 1
                    self.stats["parked"] += 1
            else:
                self._forget_locked(key)
        if reason is not None:
            try:
                _close(conn, key, reason)
            finally:
                if taker is not None:     # granted its slot: it dials once this one is closed
                    taker.gate.release()
            return False
        if taker is not None:
            taker.gate.release()          # after the pool lock: the taker goes straight on
        return True

    def _grant_to_starving_locked(self, ident: IdentityPool) -> Optional[Waiter]:
        """A connection of ``ident`` is released while its database or user is at its cap: if another
        pool of that group has no connection open and a client waiting for room under the cap, that
        client gets the released connection's slot (the connection is closed, and it dials).

        Without this a busy pool hands each released connection straight to its own next client,
        never parks one for the other pool to evict, and keeps the other pool's clients waiting
        until query_wait_timeout.  Returns the waiter granted a slot (its gate to be opened after
        the lock), or None: the connection is parked or handed on as usual.
        """
        limits, counts = ident.limits, self._open_groups
        full = [group for group, cap in zip(ident.groups, (limits.db_cap, limits.user_cap))
                if cap and counts[group] >= cap]
        if not full:
            return None
        for other in self._pools.values():
            if other is ident or other.open or other.limits is None or not other.waiters \
                    or not any(group in other.groups for group in full) \
                    or (self._held and self._held_key(other.key)) \
                    or (self._down and _node_of(other.key) in self._down):    # (its dials are paced)
                continue
            # Room for it once this connection is gone (the group it does not share may be full too).
            if any(cap and counts[group] - (group in ident.groups) >= cap
                   for group, cap in zip(other.groups, (other.limits.db_cap, other.limits.user_cap))):
                continue
            if not any(waiter.capped for waiter in other.waiters):
                continue
            self._opened_locked(other)         # (the caller frees the released connection's slot)
            self.stats["evicted_for_limit"] += 1      # (closed to make room, as a parked one would be)
            return other.grant_slot()
        return None

    def _refusal_locked(self, ident: IdentityPool, conn: Any, reset_ok: bool) -> Optional[str]:
        """Why a released ``conn`` cannot be parked or handed on (counted), or None."""
        key = ident.key
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
        if ident.open > ident.ceiling > 0 or (ident.limits is not None and self._over_caps_locked(ident)):
            self.stats["shrunk"] += 1
            return "pool_size, max_db_connections or max_user_connections is lower than the connections open"
        if (len(ident.idle) >= self.max_idle_per_key or self._total_idle >= self.max_total_idle) \
                and not ident.waiters and not ident.called:
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
            for ident in list(self._pools.values()):
                key, dq = ident.key, ident.idle
                floor = keep.get(key, 0) if keep else 0
                while dq and dq[0][1] <= cutoff and (not floor or ident.open > floor):
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
        paused = self._held and self._held_key(key)
        if not paused:
            conn = self.checkout(key, prefer, limit, limits)
            if conn is not None:
                return conn              # at hand: nobody waited, so nobody to ask whether still there
        return self._acquire_waiting(_Checkout(key, limit, timeout, prefer, dial,
                                               Waiter() if waiter is None else waiter, paced, failover, limits),
                                     paused)

    def _acquire_waiting(self, want: _Checkout, paused: bool) -> Any:
        """``acquire`` once nothing was parked (or PAUSE holds the key): take a slot or wait, look again."""
        try:
            conn = self._look_again(want) if paused else None
            while conn is None:
                conn = self._take_slot_or_wait(want)
                if conn is _NO_CONNECTION:
                    return None
                if conn is not None:
                    # Released by its last holder straight to us: in use all along, never parked.
                    conn = self._vet(want.key, conn)
                if conn is None:
                    conn = self._look_again(want)
            return self._hand_to_client(want, conn)
        except BaseException:
            if want.waiter.front:
                self._pass_call(want.key)
            raise
        finally:
            self._end_checkout(want)

    def _pass_call(self, key: str) -> None:
        """A called waiter gives up (canceled, its client left, ...): the next one is called if a
        connection is parked, so that it does not sit there until the next release."""
        with self._lock:
            ident = self._pools.get(key)
            caller = ident.call_next() if ident is not None and ident.idle and ident.waiters \
                and not ident.called else None
        if caller is not None:
            caller.gate.release()

    def _look_again(self, want: _Checkout) -> Any:
        """A parked connection of the key, or None; first waiting out a PAUSE of it."""
        while self._held and self._held_key(want.key):
            self._wait_for_resume(want)
        return self.checkout(want.key, want.prefer)

    def _wait_for_resume(self, want: _Checkout) -> None:
        """PAUSE holds the key: wait (a slice at a time) for RESUME."""
        with self._lock:
            if self._closed or self._draining:
                raise PoolClosed()
            self._check_canceled_locked(want.waiter)
            if self._held_key(want.key):
                try:
                    want.deadline = self._wait_locked(want.key, want.deadline, want.timeout, want.waiter,
                                                      time.monotonic() + WAIT_SLICE)
                finally:
                    self._drop_if_empty_locked(self._pools.get(want.key))
        if want.check_client:
            self._check_client(want.waiter)

    def _take_slot_or_wait(self, want: _Checkout) -> Any:
        """Nothing parked: take a slot to dial in, or wait for a release.

        Returns _NO_CONNECTION (``acquire`` returns None: a slot was taken, or
        with ``dial=False`` nothing is open to wait for), a connection handed
        on during the wait, or None: look again.
        """
        waiter = want.waiter
        with self._lock:
            # Decide here: a parked connection appeared, a slot is free, or wait.
            if self._closed:
                raise PoolClosed()
            self._check_canceled_locked(waiter)
            ident = self._identity_locked(want.key)
            try:
                self._note_limits_locked(ident, want.limit, want.limits)
                if ident.idle:
                    return None
                wake_at = slice_end = None
                if not want.dial:
                    if ident.open == 0:
                        return _NO_CONNECTION
                elif ident.open < want.limit or self._reserve_is_due_locked(ident, want):
                    wake_at = self._dial_blocked_until_locked(ident, want)
                    if wake_at is None:
                        self._open_for_locked(ident, want)
                        return _NO_CONNECTION
                else:
                    slice_end = want.reserve_time()
                want.deadline = self._wait_locked(want.key, want.deadline, want.timeout, waiter, wake_at, slice_end)
                conn, waiter.handed = waiter.handed, None
                if conn is _NO_CONNECTION and want.client_left():
                    self.stats["waiters_gone"] += 1      # a slot granted by a release in its group (checkin)
                    self._forget_locked(want.key)
                    raise ClientGone()
            finally:
                waiter.capped = False
                if not ident.open:                     # (a slot taken, or one open: not empty)
                    self._drop_if_empty_locked(ident)  # nothing taken, nothing handed: forget it
        if conn is None and waiter.slice_ended and want.check_client:
            self._check_client(waiter)
        return conn

    def _reserve_is_due_locked(self, ident: IdentityPool, want: _Checkout) -> bool:
        """Whether the caller, having waited ``reserve_timeout``, may open one of ``reserve_size``
        connections beyond its ``limit``."""
        limits, deadline = want.limits, want.deadline
        if limits is None or not limits.reserve_size or deadline is None \
                or ident.open >= want.limit + limits.reserve_size:
            return False
        waited = time.monotonic() - (deadline - want.timeout)
        if waited < limits.reserve_timeout:
            return False
        self.stats["reserve_used"] += 1
        log.warning("%s: a client waited %.1f s (reserve_pool_timeout %g s): taking a connection from "
                    "reserve_pool (%d of %d in use)", _show(ident.key), waited, limits.reserve_timeout,
                    ident.open - want.limit + 1, limits.reserve_size)
        return True

    def _dial_blocked_until_locked(self, ident: IdentityPool, want: _Checkout) -> Optional[float]:
        """None if a connection of ``ident`` may be dialed now, else when to look again.

        Blocked by its database's or user's cap (when nothing could be evicted)
        or by the pacing of a server that is down; NodeDown instead of the
        latter when the caller has other nodes to go to.
        """
        if want.limits is not None and not self._room_locked(ident, want.limits, want.victims):
            want.waiter.capped = True      # a release elsewhere in its group may grant it a slot (checkin)
            return time.monotonic() + CAP_SLICE
        if not want.paced:
            return None
        wake_at = self._dial_pause_locked(want.key)
        if wake_at is not None and want.failover:
            raise NodeDown()
        return wake_at

    def _open_for_locked(self, ident: IdentityPool, want: _Checkout) -> None:
        """Take a slot of ``ident`` for the caller to dial in, unless its client left while it waited."""
        if want.client_left():
            self.stats["waiters_gone"] += 1
            raise ClientGone()
        self._opened_locked(ident)

    def _hand_to_client(self, want: _Checkout, conn: Any) -> Any:
        """``conn`` for a client that waited, if it is still there; else back to the pool."""
        if want.client_left():
            self.checkin(want.key, conn)          # untouched: parked (or handed) again for the next one
            self._count("waiters_gone")
            raise ClientGone()
        return conn

    def _end_checkout(self, want: _Checkout) -> None:
        """However ``acquire`` ended: the waiter no longer waits; what was evicted for it is closed."""
        waiter = want.waiter
        if waiter.waiting:
            with self._lock:
                waiter.waiting = False
                waiter.canceled = False
        if want.victims:
            _close_evicted(want.victims)

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
            ident = self._pools.get(waiter.key)
            if ident is not None:
                ident.wake_all()
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
            for key, ident in self._pools.items():
                if ident.lingering and _node_of(key) == node:
                    ident.ask_back_all()
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
            for ident in list(self._pools.values()):
                if ident.idle and _node_of(ident.key) == node:
                    victims += self._take_parked_locked(ident)
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
        for key, ident in self._pools.items():
            if key.startswith(prefix):
                ident.wake_all()

    # -- pass-through logins not yet authenticated ------------------------------

    def acquire_pending(self, key: str, allowance: int, timeout: float, total_allowance: int = 0) -> None:
        """Let a pass-through login of ``key`` dial: one of its ``allowance`` places.

        Takes no ``pool_size`` slot and evicts nothing.  Waits (first come,
        first served) while ``allowance`` logins of the key are pending; raises
        PoolTimeout after ``timeout`` seconds.  Raises TooManyPending at once
        when ``total_allowance`` (0: no limit) logins of all keys are pending.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed or self._draining:
                raise PoolClosed()
            ident = self._identity_locked(key)
            try:
                while True:
                    held = self._held and self._held_key(key)     # PAUSE: the login waits for RESUME
                    if not held and ident.pending < allowance:
                        if total_allowance and self._pending_total >= total_allowance:
                            self.stats["pending_refused"] += 1
                            raise TooManyPending()
                        ident.pending += 1
                        self._pending_total += 1
                        return
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.stats["pending_timeouts"] += 1
                        raise PoolTimeout()
                    ident.wait_for_login_place(min(remaining, WAIT_SLICE) if held else remaining)
                    if self._closed or self._draining:
                        raise PoolClosed()
            finally:
                self._drop_if_empty_locked(ident)       # it gave up: nothing left of it

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
                ident = self._identity_locked(key)      # never empty here: this login is pending
                self._note_limits_locked(ident, limit, limits)
                if limits is not None and not self._room_locked(ident, limits, victims):
                    deadline = self._wait_locked(key, deadline, timeout, None, time.monotonic() + CAP_SLICE)
                    continue
                if ident.open < limit:
                    self._opened_locked(ident)
                else:
                    dq = ident.idle
                    if not dq:
                        deadline = self._wait_locked(key, deadline, timeout)
                        continue
                    victim = dq.popleft()[0]          # the oldest parked one; its slot is ours
                    self._total_idle -= 1
                    self.stats["evicted_for_login"] += 1
                self._pending_done_locked(key)
            if victim is not None:
                _close(victim, key, "its slot is taken by a new pass-through login")
            _close_evicted(victims)
            return

    def give_back_pending(self, key: str, conn: Any, reason: str) -> None:
        """A pending login failed (or was never dialed): close ``conn`` if any, free its place."""
        if conn is not None:
            _close(conn, key, reason)
        with self._lock:
            self._pending_done_locked(key)

    def _pending_done_locked(self, key: str) -> None:
        ident = self._pools.get(key)
        if ident is not None:
            if ident.pending > 0:
                self._pending_total -= 1
            ident.login_place_freed()
            self._drop_if_empty_locked(ident)

    # -- lingering: connections kept by their last client until someone needs them

    def linger(self, key: str, holder: Any, conn: Any = None) -> bool:
        """Let ``holder`` keep its idle server connection (``conn``) instead of releasing it.

        Refused (False) when a thread is already waiting for this key, while
        the key is paused, when the connection is to be closed once released
        (RECONNECT), or while the proxy drains for shutdown.  A lingering
        holder must give its connection back (reset, ``checkin``) when its
        ``wake()`` is called: a waiter calls it instead of waiting blindly.
        """
        ident = self._pools.get(key)
        if ident is not None and (ident.waiters or ident.called):
            return False        # somebody waits (read without the lock: refusing is always safe)
        with self._lock:
            ident = self._pools.get(key)
            if ident is None or ident.waiters or ident.called or self._closed or self._draining \
                    or (self._held and self._held_key(key)):
                return False        # (None: nothing of the key is open, so nothing to keep)
            if ident.open > ident.ceiling > 0 or (ident.limits is not None and self._over_caps_locked(ident)):
                return False        # one too many since RELOAD lowered a limit: it goes back (and closes)
            if conn is not None and ((self._born_before and conn.created <= self._born_before
                                      and key in self.renewable)
                                     or (self._close_before and self._stale_locked(key, conn))):
                return False
            ident.lingering[holder] = None
            return True

    def keeps(self, key: str, holder: Any) -> bool:
        """Whether ``holder``, entered by ``linger`` and asked for nothing since, may keep its connection
        through another release point: nobody waits for the key.  Takes no lock (a claim that
        comes just after is honoured as any claim: by ``holder.wake()``)."""
        ident = self._pools.get(key)
        return ident is not None and holder in ident.lingering and not ident.waiters and not ident.called

    def unlinger(self, key: str, holder: Any) -> bool:
        """``holder`` uses its connection again (or is leaving): no longer claimable.

        Returns False if a waiter had already claimed it (and called ``wake()``).
        """
        with self._lock:
            ident = self._pools.get(key)
            if ident is not None and holder in ident.lingering:
                del ident.lingering[holder]
                return True
            return False

    # -- pinned clients: state that keeps a client on its server connection -------

    def reserve_pin(self, key: str, limit: int) -> bool:
        """A client of ``key`` is about to be pinned: take one of the ``limit`` places (False: none free)."""
        with self._lock:
            ident = self._identity_locked(key)
            if ident.pinned >= limit:
                self._drop_if_empty_locked(ident)
                return False
            ident.pinned += 1
            return True

    def release_pin(self, key: str) -> None:
        """A pinned client of ``key`` is no longer pinned (or left)."""
        with self._lock:
            ident = self._pools.get(key)
            if ident is not None and ident.pinned > 0:
                ident.pinned -= 1
                self._drop_if_empty_locked(ident)

    def pinned_count(self, key: str) -> int:
        with self._lock:
            ident = self._pools.get(key)
            return 0 if ident is None else ident.pinned

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
        if waiter is None:
            waiter = Waiter(takes_connection=False)
        if deadline is None:
            deadline = now + timeout
            self.stats["waits"] += 1
            waiter.since, waiter.front = now, False
            if waiter.on_wait is not None:
                waiter.on_wait()          # (events.EventHub.emit: a queue put, no I/O)
        elif waiter.front:
            self.stats["barged"] += 1         # called, and a running client took the connection first
        remaining = deadline - now
        if remaining <= 0:
            self.stats["wait_timeouts"] += 1
            raise PoolTimeout()
        ident = self._identity_locked(key)
        if wake_at is not None:
            remaining = min(remaining, max(0.0, wake_at - now))
        else:
            ident.ask_back_one()
        if slice_end is not None:
            remaining = min(remaining, max(0.0, slice_end - now))
        if waiter.alive is not None:
            remaining = min(remaining, WAIT_SLICE)
        waiter.key, waiter.waiting = key, True
        waiter.slice_ended = not ident.wait(waiter, remaining)
        return deadline

    def expire(self, lifetime: float) -> int:
        """server_lifetime (the janitor, each round): connections older than ``lifetime`` seconds
        are closed: parked ones now, lingering ones are asked back (and closed at checkin), the
        others when released.  0: every connection serves once.  Returns how many closed now."""
        cutoff = float("inf") if lifetime == 0 else time.time() - lifetime
        victims = []
        with self._lock:
            self._born_before = cutoff
            for ident in list(self._pools.values()):
                if ident.idle and ident.key in self.renewable:
                    victims += self._take_parked_locked(ident, lambda conn: conn.created <= cutoff)
            self.stats["lifetime_closed"] += len(victims)
            for key, ident in self._pools.items():
                if ident.lingering and key in self.renewable:
                    ident.ask_back_all(
                        lambda h: getattr(getattr(h, "backend", None), "created", cutoff + 1) <= cutoff)
        for conn, key in victims:
            _close(conn, key, f"server_lifetime: open for longer than {lifetime:g} s")
        return len(victims)

    def resize(self, key: str, limit: int, limits: Optional[Limits] = None) -> int:
        """RELOAD: ``key``'s pool_size is now ``limit`` and its caps ``limits``; what is beyond them goes.

        Parked connections beyond the new size (or beyond its database's or
        user's cap) are closed now, oldest first; clients keeping idle ones
        are asked to give them back; those in use are closed when released
        (``checkin``), never parked or handed on, until the key is within its
        limits, as PgBouncer closes a pool's surplus.  Returns how many were
        closed now.
        """
        victims: list = []
        with self._lock:
            ident = self._pools.get(key)
            if ident is None:
                return 0
            self._note_limits_locked(ident, limit, limits)
            over = ident.open - ident.ceiling
            while over > 0 and ident.idle:
                victims.append((ident.idle.popleft()[0], key))
                self._total_idle -= 1
                self.stats["shrunk"] += 1
                self._forget_locked(key)
                over -= 1
            while over > 0 and ident.ask_back_one():
                over -= 1
            if limits is not None:
                for group, cap in zip(ident.groups, (limits.db_cap, limits.user_cap)):
                    over = self._open_groups[group] - cap if cap else 0
                    while over > 0:
                        victim = self._evict_locked(group)
                        if victim is None:
                            break
                        victims.append(victim)
                        over -= 1
                    while over > 0 and self._wake_lingering_group_locked(group):
                        over -= 1
        for conn, victim_key in victims:
            _close(conn, victim_key, "RELOAD lowered pool_size, max_db_connections or max_user_connections")
        return len(victims)

    def _note_limits_locked(self, ident: IdentityPool, limit: int, limits: Optional[Limits]) -> None:
        """The caller's pool_size and caps of ``ident`` are the ones in force (RELOAD may change them)."""
        ident.ceiling = limit + limits.reserve_size if limits is not None else limit
        ident.limits = limits if limits is not None and (limits.db_cap or limits.user_cap) else None

    def _over_caps_locked(self, ident: IdentityPool) -> bool:
        """Whether ``ident``'s database or user has more connections open than its cap (RELOAD lowered it)."""
        limits, groups = ident.limits, self._open_groups
        for group, cap in zip(ident.groups, (limits.db_cap, limits.user_cap)):
            if cap and groups[group] > cap:
                return True
        return False

    def take_slot(self, key: str, upto: int, limits: Optional[Limits] = None) -> bool:
        """min_pool_size: take a slot of ``key`` for a new connection if fewer than ``upto`` are open
        or logging in, within the caps of ``limits`` (no eviction, no wait); False otherwise."""
        with self._lock:
            ident = self._pools.get(key)
            if self._closed or self._draining or (ident is not None and ident.open + ident.pending >= upto):
                return False
            if self._held and self._held_key(key):
                return False
            if limits is not None:
                for group, cap in zip(_groups_of(key), (limits.db_cap, limits.user_cap)):
                    if cap and self._open_groups[group] >= cap:
                        return False
            if self._down and _node_of(key) in self._down:
                return False
            self._opened_locked(self._identity_locked(key))
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
            ident = self._pools.get(key)
            if ident is not None:       # always: the caller holds that fresh login's slot
                ident.defaults.update(params)

    def defaults(self, key: str) -> Dict[str, str]:
        """What the server's settings of ``key`` are when nobody changed them (a copy)."""
        with self._lock:
            ident = self._pools.get(key)
            return {} if ident is None else dict(ident.defaults)

    def open_count(self, key: str) -> int:
        """Authenticated connections of ``key`` (in use or parked): at most its pool_size."""
        with self._lock:
            ident = self._pools.get(key)
            return 0 if ident is None else ident.open

    def pending_count(self, key: str) -> int:
        """Pass-through logins of ``key`` dialed and not yet accepted by the server."""
        with self._lock:
            ident = self._pools.get(key)
            return 0 if ident is None else ident.pending

    def idle_count(self, key: Optional[str] = None) -> int:
        with self._lock:
            if key is None:
                return self._total_idle
            ident = self._pools.get(key)
            return 0 if ident is None else len(ident.idle)

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
            for ident in self._pools.values():
                ident.wake_everyone()

    def held(self) -> set:
        with self._lock:
            return set(self._held)

    def in_use(self, target) -> int:
        """Connections of ``target`` given out to clients (not parked); PAUSE waits for 0."""
        with self._lock:
            return sum(ident.open - len(ident.idle) for k, ident in self._pools.items() if key_matches(k, target))

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
            which = None if before is None else lambda conn: getattr(conn, "created", 0.0) <= before
            for ident in list(self._pools.values()):
                if ident.idle and key_matches(ident.key, target):
                    victims += self._take_parked_locked(ident, which)
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
            for ident in self._pools.values():
                ident.wake_everyone()
        return self.close_parked(ALL_SERVERS, reason="the proxy is shutting down")

    @property
    def draining(self) -> bool:
        return self._draining

    def _held_key(self, key: str) -> bool:
        held = self._held
        return bool(held) and any(key_matches(key, target) for target in tuple(held))

    def _stale_locked(self, key: str, conn: Any) -> bool:
        created = getattr(conn, "created", None)
        if created is None:
            return False
        return any(created <= before for target, before in self._close_before.items() if key_matches(key, target))

    def _wake_lingering_locked(self, target) -> None:
        for key, ident in self._pools.items():
            if ident.lingering and key_matches(key, target):
                ident.ask_back_all()

    def identities(self) -> list:
        """Keys of every identity the pool holds something for (parked, open, pending, waiting or lingering)."""
        with self._lock:
            return list(self._pools)

    def parked(self) -> list:
        """(key, connection, monotonic time parked) of every parked connection, for SHOW SERVERS."""
        with self._lock:
            return [(key, conn, since) for key, ident in self._pools.items() for conn, since in ident.idle]

    def snapshot(self) -> dict:
        """Counters and per-key sizes, for logs, tests and an admin console."""
        with self._lock:
            return {
                "stats": dict(self.stats),
                "idle": {k: len(ident.idle) for k, ident in self._pools.items() if ident.idle},
                "open": {k: ident.open for k, ident in self._pools.items() if ident.open},
                "pending": {k: ident.pending for k, ident in self._pools.items() if ident.pending},
                "servers_down": sorted(self._down),
                "total_idle": self._total_idle,
            }

    def close(self) -> None:
        """Close every parked connection and wake every waiter (shutdown)."""
        with self._lock:
            self._closed = True
            victims = []
            for ident in list(self._pools.values()):
                victims += self._take_parked_locked(ident)
            self._total_idle = 0
            for ident in self._pools.values():
                ident.wake_everyone()
                ident.ask_back_all()
        for conn, key in victims:
            _close(conn, key, "the proxy is shutting down")

    # -- helpers (lock held) ------------------------------------------------

    def _take_parked_locked(self, ident: IdentityPool, which: Optional[Callable[[Any], bool]] = None) -> list:
        """Take out the parked connections of ``ident`` (those for which ``which`` is true), their slots freed.

        Returns (connection, key) pairs for the caller to close after the lock.
        """
        key = ident.key
        taken = ident.take_parked(which)          # first: a slot freed below may leave the identity empty
        self._total_idle -= len(taken)
        for _ in taken:
            self._forget_locked(key)
        return [(conn, key) for conn in taken]

    def _forget_locked(self, key: str) -> None:
        """One connection of ``key`` is gone: free its slot and wake its waiters.

        All of them: a free slot is of use only to a waiter that may dial (a
        pass-through login); a woken query waiter would go back to sleep with it.
        """
        ident = self._pools.get(key)
        if ident is None:
            return
        if ident.open > 0:
            ident.open -= 1
            groups = self._open_groups
            for group in ident.groups:
                left = groups[group] - 1
                if left > 0:
                    groups[group] = left
                else:
                    groups.pop(group, None)         # a group with nothing open is not kept
        ident.wake_all()
        if not ident.open:
            self._drop_if_empty_locked(ident)

    def _opened_locked(self, ident: IdentityPool) -> None:
        """A slot of ``ident`` is taken (a connection is being opened): count it, for its groups too."""
        ident.open += 1
        for group in ident.groups:
            self._open_groups[group] += 1

    def _room_locked(self, ident: IdentityPool, limits: Limits, victims: list) -> bool:
        """Whether one more connection of ``ident`` fits its database's and user's caps.

        Makes room by taking out the oldest parked connection of another pool
        of the same database or user (into ``victims``, closed by the caller
        after the lock), as PgBouncer evicts; failing that, asks one client
        keeping an idle connection of that group to give it back.
        """
        for group, cap in zip(ident.groups, (limits.db_cap, limits.user_cap)):
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
        for ident in self._pools.values():
            dq = ident.idle
            if dq and group in ident.groups and (oldest is None or dq[0][1] < oldest.idle[0][1]):
                oldest = ident
        if oldest is None:
            return None
        other = oldest.key
        conn = oldest.idle.popleft()[0]
        self._total_idle -= 1
        self.stats["evicted_for_limit"] += 1
        self._forget_locked(other)
        return conn, other

    def _wake_lingering_group_locked(self, group) -> bool:
        """Ask one client keeping an idle connection of ``group`` to give it back; False if none does."""
        for ident in self._pools.values():
            if ident.lingering and group in ident.groups:
                return ident.ask_back_one()
        return False

    def _identity_locked(self, key: str) -> IdentityPool:
        """The pool of ``key``'s identity, registered now if it has none."""
        ident = self._pools.get(key)
        if ident is None:
            ident = self._pools[key] = IdentityPool(key, self._lock)
        return ident

    def _drop_if_empty_locked(self, ident: Optional[IdentityPool]) -> None:
        """Forget ``ident`` if it holds nothing any more (and is still the one registered for its key)."""
        if ident is not None and ident.is_empty() and self._pools.get(ident.key) is ident:
            del self._pools[ident.key]

    def _count(self, stat: str) -> None:
        with self._lock:
            self.stats[stat] += 1


#: A PAUSE/RECONNECT target meaning every server and database.
ALL_SERVERS = ("*", "*")


def key_matches(key: str, target) -> bool:
    """Whether the client pool key ``key`` belongs to ``target`` ((node or nodes, database) or ALL_SERVERS)."""
    parts = _client_key_parts(key)
    if parts is None:
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
