"""The listening server: admission, cancel keys, the janitor thread, clean shutdown.

``Proxy`` is the embedding API: build it from a config, ``start()`` it (it
serves from background threads), read ``port``, ``stop()`` it.  ``serve()`` is
the same as a context manager.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import socketserver
import threading
import time

from . import config as config_mod
from . import protocol as pq
from .login import Logins
from .pool import BackendIdlePool, pool_key
from .session import ClientSession

log = logging.getLogger(__name__)


class CancelKeys:
    """Proxy-owned BackendKeyData values and the client sessions they belong to.

    Clients never see a server's real process id or secret: in transaction
    mode the server behind a client changes, so the proxy maps its own key to
    whichever server connection the client holds when the cancel arrives.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_pid: dict[int, tuple[bytes, ClientSession]] = {}

    def register(self, session: ClientSession) -> tuple[int, bytes]:
        secret = secrets.token_bytes(4)
        with self._lock:
            while True:
                pid = secrets.randbelow(2**31 - 2) + 1
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

    def __init__(self, config: config_mod.Config) -> None:
        self.config = config
        self.pool = BackendIdlePool(config.max_idle_per_key, config.max_total_idle)
        self.cancel_keys = CancelKeys()
        self._sessions: set[ClientSession] = set()
        self._sessions_lock = threading.Lock()
        self._sessions_empty = threading.Condition(self._sessions_lock)
        self._stopping = False
        self._admitted = 0                      # accepted and not yet closed
        self._refusals: dict = {}               # socket -> why it is refused
        # Before binding: a bad auth file (ConfigError) must not leave a listening socket behind.
        self.logins = Logins(config, self.pool)
        super().__init__((config.listen_host, config.listen_port), _Handler)

    # -- hooks used by sessions ---------------------------------------------------

    def key_for(self, db, user: str, database: str) -> str:
        return pool_key(db.node, user, db.server_dbname(database))

    def forward_cancel(self, pid: int, secret: bytes) -> None:
        """Send a client's CancelRequest on to the server connection its session holds now.

        The target is copied under the session's lock and the cancel sent after
        it, so a slow server never stalls that client's relay.
        """
        session = self.cancel_keys.lookup(pid, secret)
        if session is None:
            log.info("ignoring a cancel request with an unknown key")
            return
        target = session.cancel_target()
        if target is None:
            if session.cancel_wait():
                log.debug("client %s: cancel request ended its wait for a server connection", session.who)
            return            # else nothing is running for that client
        host, port, server_pid, server_secret = target
        timeout = self.config.server_connect_timeout
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.sendall(pq.cancel_request(server_pid, server_secret))
                s.recv(1)     # the server closes it when done
        except OSError as exc:
            log.warning("could not forward a cancel request to %s:%d: %s", host, port, exc)

    # -- socketserver overrides ---------------------------------------------------

    def verify_request(self, request, client_address) -> bool:
        """Count the connection in; one over max_client_conn is refused after its startup packet.

        The refusal must wait for the startup packet: libpq first sends an
        SSLRequest (sslmode=prefer), and an ErrorResponse in place of the 'N'
        would reach the user as "server sent an error response during SSL
        exchange" instead of the reason.
        """
        with self._sessions_lock:
            self._admitted += 1
            if self._stopping:
                self._refusals[request] = "the proxy is shutting down"
            elif self._admitted > self.config.max_client_conn:
                self._refusals[request] = (f"no more connections allowed "
                                           f"(max_client_conn {self.config.max_client_conn})")
        return True

    def refusal_for(self, request) -> str | None:
        with self._sessions_lock:
            return self._refusals.pop(request, None)

    def shutdown_request(self, request) -> None:
        with self._sessions_lock:
            self._admitted -= 1
            self._refusals.pop(request, None)
        super().shutdown_request(request)

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

    def disconnect_all(self, wait: float) -> None:
        """Wake every client thread by shutting its socket down, then wait for them."""
        with self._sessions_lock:
            self._stopping = True
            sessions = list(self._sessions)
        for session in sessions:
            session.interrupt()
        deadline = time.monotonic() + wait
        with self._sessions_lock:
            while self._sessions and time.monotonic() < deadline:
                self._sessions_empty.wait(deadline - time.monotonic())


class Proxy:
    """A running (or ready to run) proxy: the embedding API.

    ``start()`` binds and serves from background threads; ``host``/``port`` are
    the bound address (``listen.port: 0`` picks a free port); ``stop()`` closes
    the listening socket, disconnects clients, closes pooled server
    connections and ends the threads.  Also a context manager.
    """

    def __init__(self, config) -> None:
        self.config = config_mod.load(config)
        self.server: ProxyServer | None = None
        self._threads: list[threading.Thread] = []
        self._stop_janitor = threading.Event()

    @property
    def host(self) -> str:
        return self.server.server_address[0]

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def pool(self) -> BackendIdlePool:
        return self.server.pool

    def start(self) -> "Proxy":
        self.server = ProxyServer(self.config)
        serve = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                 name="threadpool_proxy-accept", daemon=True)
        janitor = threading.Thread(target=self._janitor, name="threadpool_proxy-janitor", daemon=True)
        self._threads = [serve, janitor]
        for t in self._threads:
            t.start()
        log.info("threadpool_proxy listening on %s:%d", self.host, self.port)
        return self

    def _janitor(self) -> None:
        """Periodic maintenance: close server connections parked for too long."""
        interval = min(5.0, max(0.05, self.config.server_idle_timeout / 4))
        while not self._stop_janitor.wait(interval):
            try:
                self.server.pool.reap_idle(self.config.server_idle_timeout)
            except Exception:
                log.exception("janitor failed")

    def serve_forever(self) -> None:
        """Run in the calling thread until stop() is called from another thread or a signal."""
        if self.server is None:
            self.start()
        for t in self._threads:
            while t.is_alive():
                t.join(0.5)

    def stop(self, wait: float = 5.0) -> None:
        server = self.server
        if server is None:
            return
        self._stop_janitor.set()
        server.shutdown()
        server.server_close()
        server.disconnect_all(wait)
        server.pool.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(wait)
        log.info("threadpool_proxy stopped")

    def __enter__(self) -> "Proxy":
        if self.server is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(config) -> Proxy:
    """Build a proxy from a Config, a dict or a YAML path, and start serving."""
    return Proxy(config).start()


def serve(config) -> Proxy:
    """``with serve(config) as proxy:`` runs the proxy for the block's duration."""
    return Proxy(config)
