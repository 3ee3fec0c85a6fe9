"""Events of a running proxy, for a hook of the program that embeds it, delivered off the hot path.

A client thread that sees something worth telling (a client logged in, a
server connection closed, a client had to wait for one...) calls
``EventHub.emit``; that costs one attribute test when no hook is registered,
and otherwise one ``Event`` built and put on a queue, never a call into the
hook.  One dispatcher thread per hub (``threadpool_proxy-events``) takes the
events off the queue, in order, and calls each hook with them.  So a hook may
be slow, block, or raise, and the proxy does not notice:

* a hook that raises is logged (``threadpool_proxy.events``: the first
  failure of each hook with its traceback, then a count at most every
  ``FAILURE_LOG_INTERVAL`` seconds) and called again with the next event;
* the dispatcher wakes once per batch (``BATCH_DELAY``), not per event, so
  it takes the GIL from the client threads rarely;
* while hooks fall behind, events wait in the queue; beyond ``max_queued``
  the newest are dropped and counted (``dropped``), and that is logged once
  per interval too.  A proxy never waits for its hooks.

``flush(timeout)`` waits until every event emitted before it was delivered
(the pytest plugin reads its summary after one); ``close(timeout)`` delivers
what is queued and ends the dispatcher (``Proxy.stop`` does, after the last
client left, so the logouts and closes of the stop are delivered too).

Nothing here imports another module of the package: the modules that emit
(session.py, relay.py, login.py, server.py) take the hub from the server.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

log = logging.getLogger(__name__)

# -- what an event can say (Event.kind) ---------------------------------------------

#: A client logged in (authenticated, welcomed).  detail: the pool mode.
CLIENT_LOGIN = "client_login"
#: A logged-in client left (or was disconnected).
CLIENT_LOGOUT = "client_logout"
#: A server connection was opened for clients (logged in).  server_id, server_pid set.
SERVER_OPEN = "server_open"
#: A server connection opened for clients was closed.  detail: why, where the proxy knows it.
SERVER_CLOSE = "server_close"
#: A client found no free server connection of its pool and waits for one.
POOL_WAIT = "pool_wait"
#: Transaction/statement mode: a client's server connection went back to the pool at the end of a
#: transaction, reset.  The settings the client SET follow it (read back first); a client with state that
#: cannot follow (``pin_on``) is pinned instead and not released; a kind left out of ``pin_on`` is gone for
#: that client.  Not sent when the client leaves.
SERVER_RELEASE = "server_release"
#: The proxy prepared one of a client's named statements again, on a server connection that lacked it
#: (transparent to the client; number: how many since the last such event of the client).
STATEMENT_REPREPARED = "statement_reprepared"
#: The proxy refused a client's statement: a transaction block in statement mode, a Parse of a name the
#: client holds already (42P05) or beyond its limit (53400), a statement that would pin the client in
#: statement mode (0A000) or past max_pinned_clients (53400).  sqlstate and detail say which.
STATEMENT_REFUSED = "statement_refused"
#: A CancelRequest for a client arrived.  detail: "forwarded" to its server connection, "ended a wait"
#: for one, or "nothing running".
CANCEL = "cancel"
#: The proxy itself sent a client an error (not PostgreSQL's): sqlstate and detail (its message).
PROXY_ERROR = "proxy_error"
#: Transaction/statement mode: a client became pinned to its server connection by session state that
#: cannot follow it (a temporary table, a session advisory lock...: ``pin_on``).  detail: each kind and
#: the statement that made it; server_id, server_pid: the connection it keeps until the state is undone.
PIN = "pin"

KINDS = (CLIENT_LOGIN, CLIENT_LOGOUT, SERVER_OPEN, SERVER_CLOSE, POOL_WAIT, SERVER_RELEASE,
         STATEMENT_REPREPARED, STATEMENT_REFUSED, CANCEL, PROXY_ERROR, PIN)

#: Events waiting for the dispatcher at most; beyond, new ones are dropped (and counted).
MAX_QUEUED = 10000

#: Seconds between two log lines about failing hooks or dropped events.
FAILURE_LOG_INTERVAL = 10.0

#: Seconds the dispatcher lets events gather once one woke it: one wake-up (and one GIL hand-over
#: from the client threads) per batch instead of per event; also how late a hook may hear of one.
BATCH_DELAY = 0.005


class Event(NamedTuple):
    """Something that happened in the proxy.  Fields that do not apply are 0 or "".

    ``time`` is the wall clock (``time.time()``) and ``monotonic`` the
    ``time.monotonic()`` value of the moment it happened, not of its delivery:
    compare ``monotonic`` with your own ``time.monotonic()`` readings to tell
    which of your operations it belongs to.  (A NamedTuple, not a dataclass:
    a client thread builds one per event, and a tuple is three times cheaper
    to build than a frozen dataclass.)
    """

    kind: str
    time: float
    monotonic: float
    database: str = ""        # as the client named it
    user: str = ""
    client_id: int = 0        # SHOW CLIENTS' id (Proxy.stats().clients[].id)
    server_id: int = 0        # SHOW SERVERS' id
    server_pid: int = 0       # the PostgreSQL backend's process id
    sqlstate: str = ""
    detail: str = ""
    number: int = 1           # how many (statements re-prepared or refused since the last such event)


Hook = Callable[[Event], object]

_STOP = object()


class EventHub:
    """The hooks of one proxy and the dispatcher thread that calls them; see the module docstring."""

    def __init__(self, max_queued: int = MAX_QUEUED) -> None:
        self.max_queued = max_queued
        self._hooks: tuple[Hook, ...] = ()        # replaced whole (copy on write): emit reads it without a lock
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self.dropped = 0
        self.failures = 0                         # hook calls that raised
        self._failed_hooks: set = set()           # ids of hooks whose first failure was logged with its traceback
        self._unlogged = 0                        # failures and drops not logged yet
        self._last_log = 0.0

    @property
    def active(self) -> bool:
        """Whether any hook is registered (emitters test this before building an event)."""
        return bool(self._hooks)

    def add(self, hook: Hook) -> None:
        """Call ``hook(event)`` for every event from now on (from the dispatcher thread)."""
        if not callable(hook):
            raise TypeError(f"an event hook must be callable, got {type(hook).__name__}")
        with self._lock:
            self._hooks = self._hooks + (hook,)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="threadpool_proxy-events", daemon=True)
                self._thread.start()

    def remove(self, hook: Hook) -> None:
        """Stop calling ``hook`` (events already queued are not delivered to it either)."""
        with self._lock:
            hooks = list(self._hooks)
            if hook in hooks:
                hooks.remove(hook)
            self._hooks = tuple(hooks)

    def emit(self, kind: str, at: float = 0.0, **fields: Any) -> None:
        """Queue an event (``fields`` are Event's); never blocks, never calls a hook.

        ``at``: when it happened (a ``time.monotonic()`` value), for an event
        told after the fact (a server connection released once its client had
        its answer: stamped with the transaction's start); default: now.
        """
        if not self._hooks:
            return
        if self._queue.qsize() >= self.max_queued:
            with self._lock:
                self.dropped += 1
                self._unlogged += 1
            return
        now, wall = time.monotonic(), time.time()
        if 0.0 < at < now:
            now, wall = at, wall - (now - at)
        self._queue.put(Event(kind, wall, now, **fields))

    def emit_client(self, kind: str, stats: Any, at: float = 0.0, **fields: Any) -> None:
        """``emit`` for a client, named by its ``stats.ClientStats`` (id, database, user)."""
        if self._hooks:
            self.emit(kind, at, database=stats.database, user=stats.user, client_id=stats.id, **fields)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event emitted before this call was delivered; False if ``timeout`` passed first."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is queued (up to ``timeout``), then end the dispatcher.  True if it ended."""
        thread = self._thread
        if thread is None:
            return True
        self._queue.put(_STOP)
        thread.join(timeout)
        return not thread.is_alive()

    # -- the dispatcher thread ------------------------------------------------------

    def _run(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        while True:
            batch = [get()]
            time.sleep(BATCH_DELAY)              # let the events of the next few ms join this wake-up
            while True:
                try:
                    batch.append(get_nowait())
                except queue.Empty:
                    break
            for item in batch:
                if item is _STOP:
                    with self._lock:
                        self._thread = None if self._thread is threading.current_thread() else self._thread
                    self._log_trouble(force=True)
                    return
                if isinstance(item, threading.Event):
                    item.set()               # a flush: everything before it was delivered
                    continue
                for hook in self._hooks:
                    try:
                        hook(item)
                    except Exception:
                        self._hook_failed(hook)
            if self._unlogged:
                self._log_trouble()

    def _hook_failed(self, hook: Hook) -> None:
        with self._lock:
            self.failures += 1
            first = id(hook) not in self._failed_hooks
            if first:
                self._failed_hooks.add(id(hook))
            else:
                self._unlogged += 1
        if first:
            log.exception("event hook %r failed (the proxy goes on; later failures are counted)", hook)

    def _log_trouble(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_log < FAILURE_LOG_INTERVAL:
            return
        with self._lock:
            unlogged, self._unlogged = self._unlogged, 0
            failures, dropped = self.failures, self.dropped
        self._last_log = now
        if unlogged:
            log.warning("event hooks: %d calls failed and %d events were dropped (hooks too slow) so far",
                        failures, dropped)
