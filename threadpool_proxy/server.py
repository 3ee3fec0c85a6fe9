"""The listening server: admission, cancel keys, the janitor's tasks, RELOAD, clean shutdown.

``ProxyServer`` accepts clients and runs each in a thread of its own.  What
runs beside it (the janitor thread, health checks, metrics, the peer listener)
and the embedding API are embed.py's ``Proxy``; the admin console's verbs are
console_control.py's ``ConsoleControl``, which the server builds.

Admission bounds threads and file descriptors from the moment of accept: at
most ``max_client_conn`` clients, each in a thread of its own, plus at most
``MAX_REFUSING`` connections being turned away as PostgreSQL turns them away
(refusal.py: the SSLRequest answered, the startup packet read, then the
reason), all in one thread; beyond those a connection is answered and closed
by the accepting thread itself.  Out of file descriptors at accept (EMFILE),
one spare descriptor is given up to accept and refuse the client with 53300
(after its SSLRequest too, in a hurry), and the condition is logged once,
never spun on.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import selectors
import socket
import socketserver
import threading
import time
import weakref
from typing import Any, Callable

from . import config as config_mod
from . import events as events_mod
from . import protocol as pq
from . import stats as stats_mod
from .backend import connect_socket
from .errors import ClientFatal
from . import listeners as listeners_mod
from .errors import ProxyError
from . import tls
from .cancelkeys import CancelKeys, KeyLayout, RouteKind, forwarded, route
from .console_control import ConsoleControl
from .listen import NotifyHub
from .login import Logins
from .peers import Peers, WorkerSlot
from .nodes import Router, node_names
from .pool import BackendIdlePool, Limits, pool_key
from .refusal import Refuser, refuse_now
from .session import ClientSession
from .logs import JunkLog, get_logger

log = get_logger(__name__)

#: Connections being refused (with a message after their startup packet) at once, at most: each costs
#: a descriptor and a few hundred bytes in the refuser's one thread.
MAX_REFUSING = 64

#: Cancel requests that came on refused connections being forwarded at once, at most (a thread each).
MAX_REFUSED_CANCELS = 8

#: File descriptors a client can need: its socket, its server connection, the relay's eventfd.
FDS_PER_CLIENT = 3

#: Descriptors kept for everything else: the listening socket, logs, cancel and auth_query connections.
FD_RESERVE = 32

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)


def raise_fd_limit(config: config_mod.Config) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn when max_client_conn does not fit.

    Returns the soft limit now in force (-1 where there are no rlimits).
    """
    try:
        import resource
    except ImportError:
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        for target in (hard, 1048576, 65536):
            if target != resource.RLIM_INFINITY and target <= soft:
                break
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
                break
            except (ValueError, OSError):
                continue
    need = FDS_PER_CLIENT * config.max_client_conn + config.max_total_idle + MAX_REFUSING + FD_RESERVE
    if soft != resource.RLIM_INFINITY and need > soft:
        log.warning("the open files limit (RLIMIT_NOFILE) is %d, but max_client_conn %d may need up to %d "
                    "file descriptors (%d per client, plus parked server connections): raise the limit "
                    "(ulimit -n, systemd LimitNOFILE=) or lower max_client_conn; clients beyond it are "
                    "refused with 53300", soft, config.max_client_conn, need, FDS_PER_CLIENT)
    return soft




class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        session = ClientSession(self.server, self.request, self.client_address)
        self.server.track(session, True)
        try:
            session.run()
        finally:
            self.server.track(session, False)

    def finish(self) -> None:
        pass


class ProxyServer(socketserver.ThreadingTCPServer):
    """One thread per client; the shared pool, logins and cancel keys.

    It accepts on every socket of ``listen`` (listeners.py: TCP addresses and
    the unix socket) in one accept loop (``serve_forever``, a poll over them
    all); ``socket`` is the first of them, ``server_address`` the first TCP
    address (or the unix socket's directory and the port).
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    block_on_close = False

    def __init__(self, config: config_mod.Config, worker: "WorkerSlot | None" = None,
                 events: events_mod.EventHub | None = None, listener: socket.socket | None = None) -> None:
        self.config = config
        self.whole_config = config              # workers mode: before for_worker divided its limits
        self.worker = worker                    # which worker process this is (None: the only process)
        self.peers = Peers(worker) if worker is not None else None
        # received (from clients and peers), forwarded (to another worker), to_peers, from_peers, dropped
        self.cancel_counts = collections.Counter()
        self._cancel_lock = threading.Lock()
        self.pool = BackendIdlePool(config.max_idle_per_key, config.max_total_idle)
        self.pool.expire(config.server_lifetime)    # then each janitor round, and at RELOAD
        self.cancel_keys = CancelKeys(KeyLayout(config.peer_id, worker.index if worker else 0,
                                                worker.count if worker else 1))
        # (node, real pid) -> server connection opened for a client, whose holder_pid is
        # the pid its client was told: names NOTIFY senders (Relay._name_notifiers).
        self.backends: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        # The listening connections of pooled clients' LISTENs (listen.py).
        self.notify_hub = NotifyHub(self.backends, config.server_connect_timeout)
        self._sessions: set[ClientSession] = set()
        self._sessions_lock = threading.Lock()
        self._sessions_empty = threading.Condition(self._sessions_lock)
        self._stopping = False
        self._accepting = True                  # until stop_accepting()
        self._serving = False                   # serve_forever() was entered
        self._force_stop = False                # a graceful shutdown ends now (force_stop)
        self.warm_pools: dict = {}              # pool key -> a LoginRequest that used it (min_pool_size)
        self._warming: threading.Thread | None = None
        self._admitted = 0                      # clients accepted and not yet closed
        self._refused: set = set()              # sockets handed to the refuser or refused at once, never counted
        self.refuser = Refuser(MAX_REFUSING, self._cancel_while_refusing)
        self._refused_cancels = threading.BoundedSemaphore(MAX_REFUSED_CANCELS)
        self._spare_lock = threading.Lock()     # the spare descriptor: the accept thread's and the refuser's
        self._spare_returned = threading.Condition(self._spare_lock)
        self.junk_log = JunkLog(log)
        self.stats = stats_mod.StatsRegistry(config.stats_period)
        self.events = events if events is not None else events_mod.EventHub()   # the embedding program's hooks
        self.console_control = ConsoleControl(self)
        self.reloader: Callable[[], object] | None = None       # Proxy.reload: RELOAD on the console
        self.setter: Callable[[str, str], object] | None = None  # Proxy.set_setting: SET on the console
        self.disabled: set = set()              # DISABLE on the console: database names refused
        self.stopper: Callable[[bool], object] | None = None     # stops the Proxy from another thread: SHUTDOWN
        self._spare_fd = -1                     # given up to accept (and refuse) a client when out of fds
        self._fd_refusals = 0                   # clients refused for want of a descriptor, since the last log
        # Before binding: a bad auth file or TLS file (ConfigError) must not leave a listening socket behind.
        self.client_tls, server_tls = tls.contexts(config)
        self.router = Router(self.pool)
        self.logins = Logins(config, self.pool, server_tls, self.router, junk_log=self.junk_log)
        self.logins.events = self.events
        self.readiness: Any = None              # readiness.Readiness: /ready, /live (the Proxy sets it)
        super().__init__(None, _Handler, bind_and_activate=False)
        self.socket.close()               # the listeners below replace the one socket TCPServer makes
        self._shutdown_request = False
        self._serve_done = threading.Event()
        self._serve_done.set()
        if listener is not None:
            # A worker serves the sockets its supervisor made (and keeps): worker 0 has the unix socket too.
            self.listeners = listeners_mod.adopt_listeners(listener, config.listen_port)
        else:
            # With worker processes the first one alone serves the unix socket (a path has one owner).
            self.listeners = listeners_mod.open_listeners(config, reuseport=worker is not None,
                                                          unix=worker is None or worker.index == 0)
        self.socket = self.listeners.all[0]
        if self.listeners.tcp:
            self.server_address = self.listeners.tcp[0].getsockname()[:2]
        else:
            self.server_address = (config.unix_socket_dir, self.listeners.port)
        if worker is None or worker.index == 0:
            _log_console_auth(config)
        self._take_spare_fd()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- hooks used by sessions ---------------------------------------------------

    def key_for(self, db, user: str, database: str) -> str:
        """The pool key of a client: the entry's first server, the server-side user (a forced one) and database."""
        return pool_key(db.node, db.server_user(user), db.server_dbname(database),
                        trust=db.auth_type == "trust")

    def forward_cancel(self, pid: int, secret: bytes) -> None:
        """A CancelRequest that arrived here: cancel here, or hand it to the worker or the peer
        (another proxy of ``peers``) that gave out the key (cancelkeys.route), or drop it."""
        layout = self.cancel_keys.layout
        way = route(layout, self.config.peers, secret)
        with self._cancel_lock:
            self.cancel_counts["received"] += 1
            if layout.peer_id and not layout.owner(secret).fresh:
                self.cancel_counts["from_peers"] += 1
            self.cancel_counts[{RouteKind.WORKER: "forwarded", RouteKind.PEER: "to_peers",
                                RouteKind.DROP: "dropped"}.get(way.kind, "here")] += 1
        if way.kind is RouteKind.WORKER:
            self.peers.forward_cancel(way.worker, pq.cancel_request(pid, secret))
        elif way.kind is RouteKind.PEER:
            self.send_to_peer(way.peer_id, pq.cancel_request(pid, forwarded(secret)))
        elif way.kind is RouteKind.DROP:
            self.junk_log.log(way.what, "dropping a cancel request: %s", way.why)
        else:
            self._cancel_of_this_index(pid, secret)

    def _cancel_of_this_index(self, pid: int, secret: bytes) -> None:
        """A key naming this worker's index: this process's, or, during a rolling restart, the other
        process's of the same index (the old one retiring, or its successor), which then gets it."""
        if (self.peers is not None and self.cancel_keys.lookup(pid, secret) is None
                and self.peers.forward_cancel(self.worker.index, pq.cancel_request(pid, secret), only_if_any=True)):
            return
        self.cancel_here(pid, secret)

    def send_to_peer(self, peer_id: int, packet: bytes) -> None:
        """A CancelRequest to the listening address of proxy ``peer_id``, within peer_cancel_timeout.

        Waits until the peer closes the connection (it has sent the cancel on),
        as a client waits for the proxy: the cancel is not overtaken by the
        client's next query.
        """
        peer = self.config.peers.get(peer_id)
        if peer is None:           # gone from peers since route() (RELOAD)
            return
        deadline = time.monotonic() + self.config.peer_cancel_timeout
        try:
            with socket.create_connection((peer.host, peer.port), timeout=self.config.peer_cancel_timeout) as s:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                s.sendall(packet)
                s.recv(1)
        except OSError as exc:
            self.junk_log.log("cancel requests not forwarded to a peer",
                              "could not forward a cancel request to peer %d (%s:%d) within %g s "
                              "(peer_cancel_timeout): %s", peer_id, peer.host, peer.port,
                              self.config.peer_cancel_timeout, exc, level=logging.WARNING)

    def cancel_here(self, pid: int, secret: bytes) -> None:
        """Send a CancelRequest for a client of this process on to the server connection it holds now.

        The target is read, and marked as being canceled, under the relay's
        lock, and the cancel sent after it, so a slow server never stalls that
        client's relay.  Until PostgreSQL has closed the cancel connection (its
        signal is then delivered) the marked connection goes to no other
        client, even if this one lets go of it meanwhile (Relay.cancel_done):
        a cancel only ever reaches the statement of the client that sent it.
        """
        session = self.cancel_keys.lookup(pid, secret)
        if session is None:
            self.junk_log.log("cancel requests with an unknown key", "ignoring a cancel request with an unknown key")
            return
        at = time.monotonic()        # (the event's time: before the client can see what the cancel did)
        target = session.cancel_target()
        if target is None:
            ended = session.cancel_wait()
            if ended:
                log.debug("client %s: cancel request ended its wait for a server connection", session.who)
            if self.events.active:
                self.events.emit_client(events_mod.CANCEL, session.stats, at,
                                        detail="ended a wait" if ended else "nothing running")
            return            # else nothing is running for that client
        relay, conn = target
        if self.events.active:
            self.events.emit_client(events_mod.CANCEL, session.stats, at, server_pid=conn.pid, detail="forwarded")
        delivered = False
        try:
            delivered = self.send_cancel((conn.host, conn.port, conn.pid, conn.secret, conn.tls))
        finally:
            relay.cancel_done(conn, delivered)

    def send_cancel(self, target) -> bool:
        """A CancelRequest to the server connection ``target`` = (host, port, pid, secret, tls).

        True once the server has closed the cancel connection (it has handled
        the request: the signal is sent), False if that is not known.  Over TLS
        (an SSLRequest first, the certificate checked as for a login) when that
        connection talks TLS, so the key is not sent in clear text where the
        session is encrypted: PostgreSQL takes a CancelRequest after an
        SSLRequest (15 does, checked; 17 documents it).  A server that has since
        stopped offering TLS ('N') gets it in plain text when server_tls_sslmode allows.
        """
        host, port, server_pid, server_secret, over_tls = target
        timeout = self.config.server_connect_timeout
        server_tls = self.logins.server_tls
        try:
            s = connect_socket(host, port, timeout)
        except OSError as exc:
            log.warning("could not forward a cancel request to %s:%d: %s", host, port, exc)
            return False
        try:
            if over_tls and server_tls is not None:
                s = server_tls.negotiate(s, host, port)
                s.settimeout(timeout)
            s.sendall(pq.cancel_request(server_pid, server_secret))
            return s.recv(1) == b""     # the server closes it when done
        except (OSError, ProxyError) as exc:
            log.warning("could not forward a cancel request to %s:%d: %s", host, port, exc)
            return False
        finally:
            s.close()

    def enforce_query_timeout(self) -> int:
        """query_timeout (the janitor, each round): end queries that run longer, as PgBouncer does.

        The client is told ``FATAL 57014 terminating connection due to
        query_timeout`` and disconnected, its server connection closed, and a
        CancelRequest stops the query on the server (which would otherwise run
        on until it next wrote to the closed connection).  Returns how many.
        """
        limit = self.config.query_timeout
        if not limit:
            return 0
        now = time.monotonic()
        targets = []
        for session in self.sessions():
            relay = session.relay
            started = session.stats.query_start
            if relay is None or not started or now - started <= limit:
                continue
            target = relay.end_query(started, "query_timeout", limit)
            if target is not None:
                log.info("client %s: query_timeout (%g s): canceling its query and closing its connection",
                         session.who, limit)
                targets.append(target)
        for target in targets:
            self.send_cancel(target)
        return len(targets)

    def peer_query(self, request: dict):
        """Another worker's question on the peer channel (peers.py): the console's, the metrics'."""
        return self.console_control.peer_query(request)

    # -- socketserver overrides ---------------------------------------------------

    def verify_request(self, request, client_address) -> bool:
        """Admit the connection, or have it refused; thread and descriptors are bounded from here.

        A refused connection goes to the refuser (refusal.py), which answers
        its SSLRequest and reads its startup packet before saying why, as
        PostgreSQL does: an ErrorResponse in place of the SSLRequest's answer
        reaches a libpq user (sslmode=prefer) only as "server sent an error
        response during SSL exchange".  Beyond MAX_REFUSING refusals under
        way, the reason is sent at once and the socket closed.
        """
        with self._sessions_lock:
            if self._stopping:
                reason = "the proxy is shutting down"
            elif self._admitted >= self.config.max_client_conn:
                reason = f"no more connections allowed (max_client_conn {self.config.max_client_conn})"
            else:
                self._admitted += 1
                return True
            self._refused.add(request)
        self._refuse(request, client_address, reason)
        return False          # socketserver lets go of it (shutdown_request); the refuser has it now

    def _refuse(self, request, client_address, reason: str, hurried: bool = False, on_close=None) -> None:
        """Hand ``request`` (its descriptor) to the refuser, or answer it at once when the refuser is full."""
        error = pq.error_response(pq.SQLSTATE_TOO_MANY_CONNECTIONS, reason)
        sock = socket.socket(request.family, request.type, request.proto, fileno=request.detach())
        if self.refuser.refuse(sock, error, self.client_tls, hurried=hurried, on_close=on_close):
            return
        self.junk_log.log("connections refused at once", "refusing %s:%s at once: %s",
                          *client_address[:2], reason)
        refuse_now(sock, error)
        sock.close()
        if on_close is not None:
            on_close()

    def _cancel_while_refusing(self, pid: int, secret: bytes) -> None:
        """A CancelRequest on a refused connection: forwarded all the same (PostgreSQL serves those
        however full it is), in a short thread of its own (at most MAX_REFUSED_CANCELS at once)."""
        if not self._refused_cancels.acquire(blocking=False):
            self.junk_log.log("cancel requests dropped while refusing", "dropping a cancel request: %d are "
                              "being forwarded already while clients are refused", MAX_REFUSED_CANCELS)
            return

        def forward() -> None:
            try:
                self.forward_cancel(pid, secret)
            finally:
                self._refused_cancels.release()
        threading.Thread(target=forward, name="threadpool_proxy-cancel", daemon=True).start()

    def shutdown_request(self, request) -> None:
        with self._sessions_lock:
            if request in self._refused:
                self._refused.discard(request)
            else:
                self._admitted -= 1
        super().shutdown_request(request)

    # -- out of file descriptors at accept ---------------------------------------

    def server_close(self) -> None:
        self.listeners.close()
        self.refuser.stop()
        with self._spare_lock:
            if self._spare_fd >= 0:
                os.close(self._spare_fd)
                self._spare_fd = -1

    def _take_spare_fd(self) -> None:
        with self._spare_lock:
            if self._spare_fd < 0:
                try:
                    self._spare_fd = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    self._spare_fd = -1

    def get_request(self, listener=None):
        """accept() on ``listener``; out of descriptors, give up the spare one to refuse the client, never spin.

        A unix socket client is named ("unix", port); a TCP one gets TCP_NODELAY and the keepalive settings.
        """
        listener = listener or self.socket
        try:
            request, address = listener.accept()
        except OSError as exc:
            if exc.errno not in _OUT_OF_FDS:
                raise
            self._out_of_fds(exc, listener)
            raise
        if listener.family == socket.AF_UNIX:
            address = (listeners_mod.UNIX_HOST, self.listeners.port)
        request = (request, address)
        if self._fd_refusals:
            log.warning("accepting clients again; %d were refused for want of file descriptors",
                        self._fd_refusals)
            self._fd_refusals = 0
        self._take_spare_fd()
        return request

    def _out_of_fds(self, exc: OSError, listener) -> None:
        if not self._fd_refusals:
            log.warning("out of file descriptors at accept (%s): clients are refused with 53300 until some "
                        "leave; raise the open files limit (ulimit -n) or lower max_client_conn",
                        exc.strerror)
        self._fd_refusals += 1
        sock = None
        with self._spare_lock:
            if self._spare_fd >= 0:
                os.close(self._spare_fd)
                self._spare_fd = -1
                try:
                    sock, address = listener.accept()
                except OSError:
                    sock = None
        if sock is not None:
            # The spare descriptor is its socket now: taken again once the refuser closes it (in a
            # hurry: a moment for the client's first packet), and the next client's turn comes then.
            self._refuse(sock, address, "the proxy is out of file descriptors; try again later", hurried=True,
                         on_close=self._spare_back)
            with self._spare_lock:
                self._spare_returned.wait_for(lambda: self._spare_fd >= 0, 0.1)
            return
        self._take_spare_fd()
        time.sleep(0.1)               # no way to make progress now: do not spin on the ready listening socket

    def _spare_back(self) -> None:
        """The refuser closed the socket that had the spare descriptor: take it again at once."""
        self._take_spare_fd()
        with self._spare_lock:
            self._spare_returned.notify_all()

    def handle_error(self, request, client_address) -> None:
        log.exception("unhandled error serving %s", client_address)

    def track(self, session: ClientSession, alive: bool) -> None:
        with self._sessions_lock:
            if alive:
                self._sessions.add(session)
            else:
                self._sessions.discard(session)
                if not self._sessions:
                    self._sessions_empty.notify_all()

    def admit_login(self, session: ClientSession, database: str, user: str, db) -> None:
        """max_db_client_connections and max_user_client_connections: one more client of ``database``
        (its entry ``db``) and ``user``, or ClientFatal 53300 naming the limit.

        Counted and marked under one lock, so two clients logging in at once
        cannot both take the last place; the mark (``session.admitted_as``) goes
        with the session when it leaves ``track``.
        """
        db_limit, user_limit = db.max_db_client_connections, self.config.user_client_limit(user)
        if not (db_limit or user_limit):
            return
        with self._sessions_lock:
            marks = [s.admitted_as for s in self._sessions if s is not session and s.admitted_as is not None]
            if db_limit and sum(1 for d, _ in marks if d == database) >= db_limit:
                limit = f"max_db_client_connections {db_limit} of database \"{database}\""
            elif user_limit and sum(1 for _, u in marks if u == user) >= user_limit:
                limit = f"max_user_client_connections {user_limit} of user \"{user}\""
            else:
                session.admitted_as = (database, user)
                return
        raise ClientFatal(pq.SQLSTATE_TOO_MANY_CONNECTIONS, f"no more connections allowed ({limit})")

    def session_count(self) -> int:
        with self._sessions_lock:
            return len(self._sessions)

    def sessions(self) -> list:
        with self._sessions_lock:
            return list(self._sessions)

    def observe(self) -> stats_mod.Observation:
        """Every client and server connection now, with the statistics (admin console, metrics)."""
        return stats_mod.observe(self.sessions(), self.pool, self.stats, self.config, self.pool.close_needed)

    def reload(self) -> None:
        if self.reloader is None:
            raise ValueError("this proxy has no reload hook")
        self.reloader()

    def request_stop(self, graceful: bool = False) -> None:
        """Stop the proxy from another thread (SHUTDOWN on the console): ``stopper(graceful)``."""
        if self.stopper is not None:
            self.stopper(graceful)

    def apply_config(self, new: config_mod.Config) -> config_mod.Config:
        """RELOAD: use ``new`` from now on; clients stay connected.

        Logged-in clients take the new pool size, timeouts and settings of
        their database entry at their next transaction; a client whose entry
        now points at another server (or was removed) keeps its old one until
        it reconnects; new clients get the new entries.  listen.* cannot
        change without a restart.  The TLS settings and files are read again
        (new logins use them; connections made keep theirs).  Raises
        ConfigError (a bad auth file or TLS file) with nothing changed.
        """
        old = self.config
        if any(getattr(new, name) != getattr(old, name) for name in config_mod.RESTART_ONLY):
            log.warning("RELOAD: listen.*, metrics_listen, workers, logfile, pidfile and peer_id take effect at the next "
                        "start; still listening on %s:%d", *self.server_address[:2])
            new = dataclasses.replace(new, **{name: getattr(old, name) for name in config_mod.RESTART_ONLY})
        client_tls, server_tls = tls.contexts(new)     # TLS files are read again: rotated certificates
        self.logins.reconfigure(new)
        self.client_tls, self.logins.server_tls = client_tls, server_tls
        self.pool.max_idle_per_key = new.max_idle_per_key
        self.pool.max_total_idle = new.max_total_idle
        self.pool.expire(new.server_lifetime)
        self.stats.period = new.stats_period
        self.config = new
        if config_mod.console_auth_summary(new) != config_mod.console_auth_summary(old):
            _log_console_auth(new)
        if new.log_level != old.log_level:
            logging.getLogger("threadpool_proxy").setLevel(new.log_level.upper())
        kept = collections.Counter()
        sizes: dict = {}                 # pool key -> (pool_size, Limits) under the new configuration
        for session in self.sessions():
            session.config = new
            checkout, request = session.checkout, session.request
            if checkout is None or request is None:
                continue
            entry = new.lookup_database(request.database, request.user)
            if (entry is None or node_names(entry) != node_names(checkout.db)
                    or entry.server_dbname(request.database) != checkout.dbname):
                kept[request.database] += 1
                continue
            checkout.config = new
            checkout.route(entry)
            for key in checkout.node_keys.values() if checkout.routed else (checkout.key,):
                sizes[key] = (entry.pool_size, checkout.limits)
        for database, n in kept.items():
            log.warning("RELOAD: %d clients of database %s keep their old server until they reconnect", n, database)
        self._resize_pools(new, sizes)
        return new

    def _resize_pools(self, new: config_mod.Config, sizes: dict) -> None:
        """RELOAD: every pool in use takes its new pool_size and caps now (the surplus closes).

        ``sizes`` covers the pools of connected clients; those kept warm by
        min_pool_size are looked up here.  A pool with neither holds only
        parked connections: its next checkout brings the new size, and
        server_idle_timeout closes them meanwhile.
        """
        for key, request in list(self.warm_pools.items()):
            entry = new.lookup_database(request.database)
            if key not in sizes and entry is not None and self.key_for(entry, request.user, request.database) == key:
                sizes[key] = (entry.pool_size, Limits.of(new, entry))
        closed = sum(self.pool.resize(key, size, limits) for key, (size, limits) in sizes.items())
        if closed:
            log.info("RELOAD: %d parked server connections beyond the new limits closed", closed)

    # -- min_pool_size ---------------------------------------------------------------

    def note_pool_use(self, request, keys=()) -> None:
        """A client logged in with proxy-terminated auth: its pool may be kept warm (min_pool_size) from now on.

        Only such pools: the proxy needs the user's password (or SCRAM keys)
        to open connections with no client waiting for them.
        """
        self.warm_pools[request.key] = request
        self.pool.renewable.add(request.key)        # server_lifetime applies to its connections
        self.pool.renewable.update(keys)            # (each node's, for an entry with several)

    def keep_warm(self) -> dict:
        """The janitor's turn for min_pool_size: open what is missing (in a thread of its own).

        Returns key -> how many connections to keep, for ``reap_idle``.
        """
        keep: dict = {}
        if self._stopping or not self.warm_pools:
            return keep
        config = self.config
        todo = []
        for key, request in list(self.warm_pools.items()):
            entry = config.lookup_database(request.database, request.user)
            if entry is None or entry.auth_type == "passthrough" or entry.multi or not entry.min_pool_size:
                continue
            if self.key_for(entry, request.user, request.database) != key:
                continue                    # the entry points elsewhere since RELOAD
            keep[key] = min(entry.min_pool_size, entry.pool_size)
            if self.pool.open_count(key) + self.pool.pending_count(key) < keep[key]:
                todo.append((key, dataclasses.replace(request, db=entry), keep[key]))
        warming = self._warming
        if todo and (warming is None or not warming.is_alive()):
            self._warming = threading.Thread(target=self._warm, args=(todo,), name="threadpool_proxy-warm",
                                             daemon=True)
            self._warming.start()
        return keep

    def _warm(self, todo) -> None:
        """Open server connections up to min_pool_size for each pool in ``todo`` and park them."""
        for key, request, want in todo:
            limits = Limits.of(self.config, request.db)
            opened = 0
            while not self._stopping and self.pool.take_slot(key, want, limits):
                dbname = request.db.server_dbname(request.database)
                try:
                    conn = self.logins.proxy_login(request, {"user": request.server_user, "database": dbname})
                except Exception as exc:             # the slot was given back; try again next round
                    log.info("min_pool_size: could not open a server connection for %s/%s: %s",
                             request.user, dbname, exc)
                    break
                conn.login_params, conn.unreported = {}, {}
                self.pool.learn_defaults(key, dict(conn.params))
                self.backends[(conn.node, conn.pid)] = conn
                self.pool.checkin(key, conn)
                opened += 1
            if opened:
                log.info("min_pool_size: opened %d server connections for %s/%s", opened, request.user,
                         request.db.server_dbname(request.database))

    # -- stopping -------------------------------------------------------------------

    def close_down(self, timeout: float = 0.0, wait: float = 5.0) -> None:
        """Stop serving; the one shutdown path (SIGTERM, SIGINT, SHUTDOWN on the console, ``Proxy.stop``).

        New connections are refused at once (the listening socket is
        closed).  With ``timeout`` > 0 (``shutdown_timeout``: SIGTERM,
        ``SHUTDOWN WAIT_FOR_SERVERS``) clients first get up to ``timeout``
        seconds to finish the transaction they are in: each is told
        ``SHUTDOWN_NOTICE`` and disconnected at its next release point (at
        once if it is between transactions, or waiting for a server
        connection), and server connections are closed as they are released.
        Then, or at once with ``timeout`` 0, the clients left are disconnected
        mid-transaction (``disconnect_all``) and the pool is closed.
        ``force_stop()`` from any thread (a second signal) ends the wait.
        The caller stops its accept thread's loop first or lets this do it:
        whoever runs ``serve_forever`` (a Proxy, a worker process) calls this.
        """
        self.stop_accepting()
        with self._sessions_lock:
            self._stopping = True
        if timeout > 0 and not self._force_stop:
            self._drain(timeout)
        self.disconnect_all(wait)
        self.pool.close()

    def wait_for_clients(self, timeout: float) -> bool:
        """Wait until every client has left by itself (a retiring worker), ``timeout`` at most; True if all did.

        Ends early when a stop begins or ``force_stop()`` is called.
        """
        deadline = time.monotonic() + timeout
        with self._sessions_lock:
            while self._sessions and not self._stopping and not self._force_stop:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._sessions_empty.wait(min(0.1, left))
            return not self._sessions

    def wait_unless_forced(self, seconds: float) -> None:
        """Sleep ``seconds`` (shutdown_unready_delay), or less if ``force_stop()`` is called meanwhile."""
        deadline = time.monotonic() + seconds
        while not self._force_stop and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def force_stop(self) -> None:
        """End a graceful ``close_down`` now (a second signal).  Sets a flag only: safe in a signal handler."""
        self._force_stop = True

    def stop_accepting(self) -> None:
        """Stop the accept loop and close the listening socket (once): new clients are refused by the OS."""
        with self._sessions_lock:
            if not self._accepting:
                return
            self._accepting = False
        if self._serving:
            self.shutdown()        # waits for serve_forever() to return: call it from another thread
        self.server_close()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept on every listener until ``shutdown()`` (socketserver's loop, over several sockets)."""
        with self._sessions_lock:
            if not self._accepting:
                return
            self._serving = True
            self._serve_done.clear()
        try:
            with selectors.PollSelector() as selector:
                for sock in self.listeners.all:
                    # Non-blocking: another process may take the client poll woke this one for (a
                    # rolling restart's old and new worker serve one socket), and a blocking accept()
                    # would then wait for the next client, deaf to shutdown() meanwhile.
                    sock.setblocking(False)
                    selector.register(sock, selectors.EVENT_READ)
                while not self._shutdown_request:
                    ready = selector.select(poll_interval)
                    if self._shutdown_request:
                        break
                    for key, _ in ready:
                        self._accept_from(key.fileobj)
                    self.service_actions()
        finally:
            self._shutdown_request = False
            self._serve_done.set()

    def shutdown(self) -> None:
        """Stop the accept loop and wait for it (call from another thread)."""
        self._shutdown_request = True
        self._serve_done.wait()

    def _accept_from(self, listener) -> None:
        """One client of ``listener``: socketserver's _handle_request_noblock for a given socket."""
        try:
            request, client_address = self.get_request(listener)
        except OSError:
            return
        if self.verify_request(request, client_address):
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)
            except BaseException:
                self.shutdown_request(request)
                raise
        else:
            self.shutdown_request(request)

    def _drain(self, timeout: float) -> None:
        """Let running transactions finish: every client leaves at its next release point."""
        parked = self.pool.drain()
        deadline = time.monotonic() + timeout
        sessions = self.sessions()
        log.info("shutting down: no new clients; waiting up to %g s (shutdown_timeout) for %d clients to "
                 "finish their transactions; %d parked server connections closed", timeout, len(sessions), parked)
        asked: set = set()
        while not self._force_stop:
            sessions = self.sessions()
            if not sessions or time.monotonic() >= deadline:
                break
            for session in sessions:
                if session in asked:
                    continue
                relay = session.relay
                if session.console is not None or relay is None:
                    session.interrupt()           # the console, or a login: nothing to finish
                    asked.add(session)
                elif relay.request_stop():
                    asked.add(session)
            with self._sessions_lock:
                if self._sessions:
                    self._sessions_empty.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        left = self.session_count()
        if self._force_stop and left:
            log.warning("shutting down: a second signal; disconnecting %d clients now", left)
        elif left:
            log.warning("shutting down: shutdown_timeout (%g s) passed; disconnecting %d clients "
                        "mid-transaction", timeout, left)
        else:
            log.info("shutting down: every client finished")

    def disconnect_all(self, wait: float) -> None:
        """Tell every client the proxy is stopping and wait for their threads.

        Waiters for a server connection and lingering holders are woken by
        closing the pool; the others by shutting their client socket down for
        reading (their thread still sends SHUTDOWN_NOTICE) and their server
        connection; a thread that has not finished after a second (stuck
        writing to a client that does not read) gets its socket shut down for
        writing too.
        """
        with self._sessions_lock:
            self._stopping = True
        self.pool.close()
        self.notify_hub.close()
        deadline = time.monotonic() + wait
        for hard in (False, True):
            with self._sessions_lock:
                sessions = list(self._sessions)
            for session in sessions:
                session.interrupt(hard=hard)
            until = min(deadline, time.monotonic() + 1.0) if not hard else deadline
            with self._sessions_lock:
                while self._sessions and time.monotonic() < until:
                    self._sessions_empty.wait(until - time.monotonic())


def _log_console_auth(config: config_mod.Config) -> None:
    """Say in one line how the admin console checks its users (at start-up, and when RELOAD changes it)."""
    if not (config.admin_users or config.stats_users):
        return
    how = config_mod.console_auth_type(config)
    alarming = how == "trust" or (how in ("scram-sha-256", "md5") and not config.auth_file)
    log.log(logging.WARNING if alarming else logging.INFO, "%s", config_mod.console_auth_summary(config))
