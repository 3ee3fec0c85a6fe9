"""The backend idle pool: parked, authenticated server connections by identity.

Herding server connections between "in use" and "parked" happens here, and so
does the ``pool_size`` accounting that keeps PostgreSQL from ever seeing more
than ``pool_size`` connections of one (node, user, database) key.

Design notes
------------
* One lock guards everything.  Waiters wait on a per-key ``threading.Condition``
  built on that same lock, so a release of key K wakes exactly one waiter of K
  instead of every waiter of every key (``notify_all`` on one condition would
  wake 50 threads to hand out one connection).
* No socket I/O happens while the lock is held: connections to close or to
  probe are taken out of the structure under the lock and handled after it.
* Parked connections are reused LIFO (the most recently parked is the warmest);
  the reaper closes from the other end, where the oldest sit.
* A connection is anything with ``close()`` whose ``raw_socket`` attribute (or
  itself) is a plain socket: the liveness probe uses ``MSG_PEEK`` which a TLS
  socket cannot do, so it always looks at the raw socket.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import threading
import time
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from .errors import PoolClosed, PoolTimeout

__all__ = ["BackendIdlePool", "PoolClosed", "PoolTimeout", "pool_key", "probe_alive"]

log = logging.getLogger(__name__)

_PROBE_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT


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
        if not sock.gettimeout():
            # Blocking or non-blocking socket: one non-blocking peek says it all.
            sock.recv(1, _PROBE_FLAGS)
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
        sock.recv(1, _PROBE_FLAGS)
    except BlockingIOError:
        return True
    except (OSError, ValueError):
        return False
    return False  # b"" is EOF; any byte is unsolicited


def _close(conn: Any, key: str, reason: str) -> None:
    """Close a server connection the pool let go of, saying why in the log."""
    log.info("closing server connection %r of %s: %s", conn, _show(key), reason)
    try:
        conn.close()
    except OSError:
        pass


class BackendIdlePool:
    """Parked server connections in a dict of deques keyed by ``pool_key``.

    Caller API: ``checkout``, ``checkin``, ``reap_idle`` (the idle structure);
    ``acquire``, ``acquire_login_slot``, ``release_slot``, ``discard`` (the
    ``pool_size`` accounting, which blocks callers when a key is full);
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
        self._key_conds: Dict[str, threading.Condition] = {}
        self._waiting: Dict[str, int] = {}
        self._lingering: Dict[str, Dict[Any, None]] = {}
        self._defaults: Dict[str, Dict[str, str]] = {}
        self._closed = False
        self.stats = collections.Counter(
            reuses=0, parked=0, over_capacity=0, stale_evicted=0, reaped=0,
            reset_failed=0, evicted_for_login=0, waits=0, wait_timeouts=0)

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
            if getattr(conn, "reset_pending", False):
                verdict = conn.finish_reset_verdict()
                if verdict != "ok":
                    _close(conn, key, "its reset query failed" if verdict == "failed"
                           else "it closed or spoke while parked")
                    with self._lock:
                        self.stats["reset_failed" if verdict == "failed" else "stale_evicted"] += 1
                        self._forget_locked(key)
                    continue
            if probe_alive(conn):
                with self._lock:
                    self.stats["reuses"] += 1
                return conn
            _close(conn, key, "it closed while parked (liveness probe)")
            with self._lock:
                self.stats["stale_evicted"] += 1
                self._forget_locked(key)

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
        with self._lock:
            reason = "the proxy is shutting down"
            if reset_ok and not self._closed:
                dq = self._idle.get(key)
                if dq is None:
                    dq = self._idle[key] = collections.deque()
                if len(dq) < self.max_idle_per_key and self._total_idle < self.max_total_idle:
                    dq.append((conn, time.monotonic()))
                    self._total_idle += 1
                    self.stats["parked"] += 1
                    cond = self._key_conds.get(key)
                    if cond is not None:
                        cond.notify()
                    return True
                self.stats["over_capacity"] += 1
                reason = "max_idle_per_key or max_total_idle reached"
            elif not reset_ok:
                self.stats["reset_failed"] += 1
                reason = "its reset query could not be sent"
            self._forget_locked(key)
        _close(conn, key, reason)
        return False

    def reap_idle(self, max_age: float) -> int:
        """Close parked connections idle for longer than ``max_age`` seconds."""
        cutoff = time.monotonic() - max_age
        victims = []
        with self._lock:
            for key, dq in self._idle.items():
                while dq and dq[0][1] <= cutoff:
                    victims.append((dq.popleft()[0], key))
                    self._total_idle -= 1
                    self.stats["reaped"] += 1
                    self._forget_locked(key)
        for conn, key in victims:
            _close(conn, key, f"parked for longer than server_idle_timeout ({max_age:g} s)")
        return len(victims)

    # -- pool_size accounting -----------------------------------------------

    def acquire(self, key: str, limit: int, timeout: float,
                prefer: Optional[Callable[[Any], bool]] = None, dial: bool = True) -> Any:
        """Get a parked connection of ``key`` or the right to dial a new one.

        Returns a connection, or None meaning "a slot is yours, dial" (the
        caller must later ``discard`` the connection or ``release_slot`` if the
        dial fails).  Waits while ``limit`` connections of the key are open and
        none is parked; raises PoolTimeout after ``timeout`` seconds.

        With ``dial=False`` (the proxy cannot log in by itself) it only waits
        for a parked connection, and returns None at once, taking no slot, when
        the key has no connection open at all.
        """
        deadline = None
        while True:
            conn = self.checkout(key, prefer)
            if conn is not None:
                return conn
            with self._lock:
                # Decide here: a parked connection appeared, a slot is free, or wait.
                if self._closed:
                    raise PoolClosed()
                if self._idle.get(key):
                    continue
                if not dial:
                    if self._open[key] == 0:
                        return None
                elif self._open[key] < limit:
                    self._open[key] += 1
                    return None
                deadline = self._wait_locked(key, deadline, timeout)

    def acquire_login_slot(self, key: str, limit: int, timeout: float) -> None:
        """Get the right to dial a *new* connection of ``key`` (a pass-through login).

        When the key is full but one of its connections is parked, that one is
        closed and its slot taken over; otherwise waits like ``acquire``.
        """
        deadline = None
        while True:
            victim = None
            with self._lock:
                if self._closed:
                    raise PoolClosed()
                if self._open[key] < limit:
                    self._open[key] += 1
                    return
                dq = self._idle.get(key)
                if dq:
                    victim = dq.popleft()[0]          # the oldest parked one
                    self._total_idle -= 1
                    self.stats["evicted_for_login"] += 1
                else:
                    deadline = self._wait_locked(key, deadline, timeout)
            if victim is not None:
                _close(victim, key, "its slot is taken by a new pass-through login")   # the slot is now ours
                return

    # -- lingering: connections kept by their last client until someone needs them

    def linger(self, key: str, holder: Any) -> bool:
        """Let ``holder`` keep its idle server connection instead of releasing it.

        Refused (False) when a thread is already waiting for this key.  A
        lingering holder must give its connection back (reset, ``checkin``) when
        its ``wake()`` is called: a waiter calls it instead of waiting blindly.
        """
        with self._lock:
            if self._waiting.get(key) or self._closed:
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

    def _wait_locked(self, key: str, deadline: Optional[float], timeout: float) -> float:
        """Wait for a release of ``key``, first asking one lingering holder to let go.

        ``deadline`` is None on a caller's first wait (it is computed once, here,
        and returned); raises PoolTimeout once it has passed.
        """
        if deadline is None:
            deadline = time.monotonic() + timeout
            self.stats["waits"] += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            self.stats["wait_timeouts"] += 1
            raise PoolTimeout()
        held = self._lingering.get(key)
        if held:
            holder = next(iter(held))
            del held[holder]
            holder.wake()          # a non-blocking eventfd write
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            self._cond_locked(key).wait(remaining)
        finally:
            self._waiting[key] -= 1
        return deadline

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
        with self._lock:
            return self._open[key]

    def idle_count(self, key: Optional[str] = None) -> int:
        with self._lock:
            if key is None:
                return self._total_idle
            return len(self._idle.get(key, ()))

    def snapshot(self) -> dict:
        """Counters and per-key sizes, for logs, tests and an admin console."""
        with self._lock:
            return {
                "stats": dict(self.stats),
                "idle": {k: len(v) for k, v in self._idle.items() if v},
                "open": {k: v for k, v in self._open.items() if v},
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
            for cond in self._key_conds.values():
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
        cond = self._key_conds.get(key)
        if cond is not None:
            cond.notify_all()

    def _cond_locked(self, key: str) -> threading.Condition:
        cond = self._key_conds.get(key)
        if cond is None:
            cond = self._key_conds[key] = threading.Condition(self._lock)
        return cond


def _show(key: str) -> str:
    """A pool key for humans: node/user/database."""
    return key.replace("\0", "/")
