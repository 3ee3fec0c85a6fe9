"""The listening server: admission, cancel keys, the janitor's tasks, RELOAD, clean shutdown.

``ProxyServer`` accepts clients and runs each in a thread of its own.  What
runs beside it (the janitor thread, health checks, metrics, the peer listener)
and the embedding API are embed.py's ``Proxy``; the admin console's verbs are
console_control.py's ``ConsoleControl``, which the server builds.

Admission bounds threads and file descriptors from the moment of accept: at
most ``max_client_conn`` clients, plus at most ``MAX_REFUSING`` connections
being turned away (each gets ``REFUSAL_TIMEOUT`` seconds to send its startup
packet, so it can read why); beyond those a connection is answered and closed
by the accepting thread itself.  Out of file descriptors at accept (EMFILE),
one spare descriptor is given up to accept and refuse the client with 53300,
and the condition is logged once, never spun on.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import hmac
import logging
import os
import secrets
import socket
import socketserver
import threading
import time
import weakref

from . import config as config_mod
from . import protocol as pq
from . import stats as stats_mod
from . import tls
from .console_control import ConsoleControl
from .listen import NotifyHub
from .login import Logins
from .peers import Peers, WorkerSlot, owner_of
from .nodes import Router, node_names
from .pool import BackendIdlePool, pool_key
from .session import ClientSession
from .logs import JunkLog, get_logger

log = get_logger(__name__)

#: Connections being refused (with a message after their startup packet) at once, at most.
MAX_REFUSING = 16

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
    need = FDS_PER_CLIENT * config.max_client_conn + config.max_total_idle + FD_RESERVE
    if soft != resource.RLIM_INFINITY and need > soft:
        log.warning("the open files limit (RLIMIT_NOFILE) is %d, but max_client_conn %d may need up to %d "
                    "file descriptors (%d per client, plus parked server connections): raise the limit "
                    "(ulimit -n, systemd LimitNOFILE=) or lower max_client_conn; clients beyond it are "
                    "refused with 53300", soft, config.max_client_conn, need, FDS_PER_CLIENT)
    return soft


#: Process ids above this are never a server's (Linux's pid_max is at most 2^22),
#: so the proxy's own pids never collide with the real ones session-mode clients get.
_PROXY_PID_FLOOR = 2**22


class CancelKeys:
    """BackendKeyData values given to clients, and the client sessions they belong to.

    The secret is always the proxy's own: a client never learns a server's
    secret, and a CancelRequest goes on to whichever server connection the
    client holds when it arrives (in transaction mode that changes).  The pid
    is the real server process id where a client keeps one server connection
    for life (session mode: drivers compare it with pg_backend_pid() and
    NOTIFY senders), else a proxy-made one above any real pid.

    With ``workers`` processes the secret also says which one gave it out:
    secret modulo ``workers`` is the ``worker`` index (peers.owner_of), so a
    CancelRequest the kernel hands to another worker is forwarded to this one.
    That costs log2(workers) of the secret's 32 random bits (1 bit for 2
    workers); the real pid of session mode is the part a stranger can know.
    """

    def __init__(self, worker: int = 0, workers: int = 1) -> None:
        self._lock = threading.Lock()
        self._by_pid: dict[int, tuple[bytes, ClientSession]] = {}
        self.worker, self.workers = worker, workers

    def new_secret(self) -> bytes:
        """4 random bytes whose value modulo the worker count is this worker's index."""
        n = self.workers
        return (secrets.randbelow(2**32 // n) * n + self.worker).to_bytes(4, "big")

    def register(self, session: ClientSession, real_pid: int = 0) -> tuple[int, bytes]:
        """A (pid, secret) for ``session``: ``real_pid`` when given and free, else a proxy-made pid."""
        secret = self.new_secret()
        with self._lock:
            if 0 < real_pid and real_pid not in self._by_pid:
                self._by_pid[real_pid] = (secret, session)
                return real_pid, secret
            while True:
                pid = _PROXY_PID_FLOOR + 1 + secrets.randbelow(2**31 - 2 - _PROXY_PID_FLOOR)
                if pid not in self._by_pid:
                    self._by_pid[pid] = (secret, session)
                    return pid, secret

    def unregister(self, pid: int) -> None:
        with self._lock:
            self._by_pid.pop(pid, None)

    def lookup(self, pid: int, secret: bytes) -> ClientSession | None:
        with self._lock:
            entry = self._by_pid.get(pid)
        if entry is None or not hmac.compare_digest(entry[0], secret):
            return None
        return entry[1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_pid)


def _refuse_now(sock: socket.socket, reason: str, sqlstate: str = pq.SQLSTATE_TOO_MANY_CONNECTIONS) -> None:
    """Answer a connection we have no thread for: the error at once, never blocking."""
    try:
        sock.setblocking(False)
        try:
            sock.recv(65536)              # what it sent already: closing with unread data would reset
        except OSError:
            pass
        sock.send(pq.error_response(sqlstate, reason))
    except OSError:
        pass


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        session = ClientSession(self.server, self.request, self.client_address,
                                refusal=self.server.refusal_for(self.request))
        self.server.track(session, True)
        try:
            session.run()
        finally:
            self.server.track(session, False)

    def finish(self) -> None:
        pass


class ProxyServer(socketserver.ThreadingTCPServer):
    """One thread per client; the shared pool, logins and cancel keys."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    block_on_close = False

    def __init__(self, config: config_mod.Config, worker: "WorkerSlot | None" = None) -> None:
        self.config = config
        self.whole_config = config              # workers mode: before for_worker divided its limits
        self.worker = worker                    # which worker process this is (None: the only process)
        self.peers = Peers(worker) if worker is not None else None
        self.cancel_counts = collections.Counter()   # received (from clients), forwarded (to another worker)
        self._cancel_lock = threading.Lock()
        self.pool = BackendIdlePool(config.max_idle_per_key, config.max_total_idle)
        self.pool.expire(config.server_lifetime)    # then each janitor round, and at RELOAD
        self.cancel_keys = CancelKeys(worker.index, worker.count) if worker is not None else CancelKeys()
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
        self._refusing = 0                      # connections being refused in a thread of their own
        self._refusals: dict = {}               # socket -> why it is refused (until closed)
        self._refused_now: set = set()          # refused by the accepting thread, never counted
        self.junk_log = JunkLog(log)
        self.stats = stats_mod.StatsRegistry(config.stats_period)
        self.console_control = ConsoleControl(self)
        self.reloader = None                    # Proxy.reload: RELOAD on the console
        self.setter = None                      # Proxy.set_setting: SET on the console
        self.disabled: set = set()              # DISABLE on the console: database names refused
        self.stopper = None                     # stops the Proxy from another thread: SHUTDOWN
        self._spare_fd = -1                     # given up to accept (and refuse) a client when out of fds
        self._fd_refusals = 0                   # clients refused for want of a descriptor, since the last log
        # Before binding: a bad auth file or TLS file (ConfigError) must not leave a listening socket behind.
        self.client_tls, server_tls = tls.contexts(config)
        self.router = Router(self.pool)
        self.logins = Logins(config, self.pool, server_tls, self.router, junk_log=self.junk_log)
        super().__init__((config.listen_host, config.listen_port), _Handler)
        if worker is None or worker.index == 0:
            _log_console_auth(config)
        self._take_spare_fd()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- hooks used by sessions ---------------------------------------------------

    def key_for(self, db, user: str, database: str) -> str:
        return pool_key(db.node, user, db.server_dbname(database), trust=db.auth_type == "trust")

    def forward_cancel(self, pid: int, secret: bytes) -> None:
        """A client's CancelRequest: cancel here, or hand it to the worker that gave out the key."""
        worker = self.worker
        owner = owner_of(secret, worker.count) if worker is not None else 0
        with self._cancel_lock:
            self.cancel_counts["received"] += 1
            if worker is not None and owner != worker.index:
                self.cancel_counts["forwarded"] += 1
        if worker is not None and owner != worker.index:
            self.peers.forward_cancel(owner, pq.cancel_request(pid, secret))
            return
        self.cancel_here(pid, secret)

    def cancel_here(self, pid: int, secret: bytes) -> None:
        """Send a CancelRequest for a client of this process on to the server connection it holds now.

        The target is copied under the session's lock and the cancel sent after
        it, so a slow server never stalls that client's relay.
        """
        session = self.cancel_keys.lookup(pid, secret)
        if session is None:
            self.junk_log.log("cancel requests with an unknown key", "ignoring a cancel request with an unknown key")
            return
        target = session.cancel_target()
        if target is None:
            if session.cancel_wait():
                log.debug("client %s: cancel request ended its wait for a server connection", session.who)
            return            # else nothing is running for that client
        self.send_cancel(target)

    def send_cancel(self, target) -> None:
        """A CancelRequest to the server connection ``target`` = (host, port, pid, secret)."""
        host, port, server_pid, server_secret = target
        timeout = self.config.server_connect_timeout
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.sendall(pq.cancel_request(server_pid, server_secret))
                s.recv(1)     # the server closes it when done
        except OSError as exc:
            log.warning("could not forward a cancel request to %s:%d: %s", host, port, exc)

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

    def server_bind(self) -> None:
        """Workers share the port: each binds its own listening socket with SO_REUSEPORT."""
        if self.worker is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def verify_request(self, request, client_address) -> bool:
        """Admit the connection, or have it refused; thread and descriptors are bounded from here.

        A refusal waits for the startup packet (at most REFUSAL_TIMEOUT):
        libpq first sends an SSLRequest (sslmode=prefer), and an ErrorResponse
        in place of the 'N' reaches the user as "server sent an error response
        during SSL exchange" instead of the reason.  Beyond MAX_REFUSING
        refusals under way, the reason is sent at once and the socket closed.
        """
        with self._sessions_lock:
            if self._stopping:
                reason = "the proxy is shutting down"
            elif self._admitted >= self.config.max_client_conn:
                reason = f"no more connections allowed (max_client_conn {self.config.max_client_conn})"
            else:
                self._admitted += 1
                return True
            if self._refusing < MAX_REFUSING:
                self._refusing += 1
                self._refusals[request] = reason
                return True
            self._refused_now.add(request)
        self.junk_log.log("connections refused at once", "refusing %s:%s at once: %s",
                          *client_address[:2], reason)
        _refuse_now(request, reason)
        return False          # socketserver closes it (shutdown_request)

    def refusal_for(self, request) -> str | None:
        with self._sessions_lock:
            return self._refusals.get(request)

    def shutdown_request(self, request) -> None:
        with self._sessions_lock:
            if request in self._refusals:
                del self._refusals[request]
                self._refusing -= 1
            elif request in self._refused_now:
                self._refused_now.discard(request)
            else:
                self._admitted -= 1
        super().shutdown_request(request)

    # -- out of file descriptors at accept ---------------------------------------

    def server_close(self) -> None:
        super().server_close()
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1

    def _take_spare_fd(self) -> None:
        if self._spare_fd < 0:
            try:
                self._spare_fd = os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError:
                self._spare_fd = -1

    def get_request(self):
        """accept(); out of descriptors, give up the spare one to refuse the client, never spin."""
        try:
            request = super().get_request()
        except OSError as exc:
            if exc.errno not in _OUT_OF_FDS:
                raise
            self._out_of_fds(exc)
            raise
        if self._fd_refusals:
            log.warning("accepting clients again; %d were refused for want of file descriptors",
                        self._fd_refusals)
            self._fd_refusals = 0
        self._take_spare_fd()
        return request

    def _out_of_fds(self, exc: OSError) -> None:
        if not self._fd_refusals:
            log.warning("out of file descriptors at accept (%s): clients are refused with 53300 until some "
                        "leave; raise the open files limit (ulimit -n) or lower max_client_conn",
                        exc.strerror)
        self._fd_refusals += 1
        sock = None
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
            try:
                sock, _ = self.socket.accept()
            except OSError:
                sock = None
        if sock is not None:
            _refuse_now(sock, "the proxy is out of file descriptors; try again later", pq.SQLSTATE_TOO_MANY_CONNECTIONS)
            sock.close()
            self._take_spare_fd()
        if self._spare_fd < 0 or sock is None:
            time.sleep(0.1)           # no way to make progress now: do not spin on the ready listening socket

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
        if (new.listen_host, new.listen_port, new.metrics_listen, new.workers) != (
                old.listen_host, old.listen_port, old.metrics_listen, old.workers):
            log.warning("RELOAD: listen.host, listen.port, metrics_listen and workers take effect at the next "
                        "start; still listening on %s:%d", *self.server_address[:2])
            new = dataclasses.replace(new, listen_host=old.listen_host, listen_port=old.listen_port,
                                      metrics_listen=old.metrics_listen, workers=old.workers)
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
        for session in self.sessions():
            session.config = new
            checkout, request = session.checkout, session.request
            if checkout is None or request is None:
                continue
            entry = new.lookup_database(request.database)
            if (entry is None or node_names(entry) != node_names(checkout.db)
                    or entry.server_dbname(request.database) != checkout.dbname):
                kept[request.database] += 1
                continue
            checkout.config = new
            checkout.route(entry)
        for database, n in kept.items():
            log.warning("RELOAD: %d clients of database %s keep their old server until they reconnect", n, database)
        return new

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
            entry = config.lookup_database(request.database)
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
        from .pool import Limits
        for key, request, want in todo:
            limits = Limits.of(self.config, request.db)
            opened = 0
            while not self._stopping and self.pool.take_slot(key, want, limits):
                dbname = request.db.server_dbname(request.database)
                try:
                    conn = self.logins.proxy_login(request, {"user": request.user, "database": dbname})
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
        with self._sessions_lock:
            if not self._accepting:
                return
            self._serving = True
        super().serve_forever(poll_interval)

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
