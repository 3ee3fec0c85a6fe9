"""The embedding API: a whole proxy that a Python program starts, watches, reloads and stops.

``Proxy`` is the library's public face (``threadpool_proxy.Proxy``, ``start``,
``serve``): build it from a configuration, ``start()`` it (it serves from
background threads), read its ``address``, ``stats()``, hook its events,
``reload()``, ``pause()``, ``stop()`` it; ``serve()`` is the same as a context
manager.  It owns what runs beside the listening server (server.ProxyServer):
the janitor thread, the health checks, the metrics endpoint, the event
dispatcher and, in a worker process, the peer listener; and it is where
RELOAD and SET re-read and apply the configuration.

The contract (docs/embedding.md): every public method and property below is
typed and documented; the errors an embedding program can catch are
``ConfigError`` (a bad configuration, at construction, ``start``, ``reload``,
``set_setting``), ``OSError`` (the port is taken), ``ValueError`` (``pause``,
``resume`` with a name or in a state they cannot take) and ``RuntimeError``
(a method that needs a started proxy called before ``start()``).

The command line (__main__.py) runs one Proxy, and so does each worker
process (workers.py), so the three ways of running the proxy share one start
and one stop.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Callable, Mapping, NamedTuple, Union

from .logs import get_logger
from . import config as config_mod
from . import records
from .admin import CommandError
from .console_control import CHANGEABLE
from .events import Event, EventHub
from .health import HealthChecker
from .peers import PeerListener, WorkerSlot
from .pool import BackendIdlePool
from .readiness import Readiness
from .server import ProxyServer, raise_fd_limit

#: The logger these lines had before this module left server.py: log filters keep working.
log = get_logger("threadpool_proxy.server")

#: What ``start``, ``serve``, ``Proxy`` and ``Proxy.reload`` take as a configuration.
ConfigSource = Union[config_mod.Config, Mapping[str, Any], str, "os.PathLike[str]"]

#: An event hook: called with each Event, from the proxy's event dispatcher thread.
EventHook = Callable[[Event], object]


class Address(NamedTuple):
    """Where a started proxy accepts clients."""

    host: str                   #: the address bound (listen.host)
    port: int                   #: the port bound (the free port chosen, with listen.port 0)
    unix_socket: str | None     #: the unix socket's path (listen.unix_socket_dir), else None


class Proxy:
    """A running (or ready to run) proxy: the embedding API.

    ``start()`` binds and serves from background threads; ``address`` (and
    ``host``/``port``) is the bound address (``listen.port: 0`` picks a free
    port); ``stop()`` closes the listening socket, disconnects clients,
    closes pooled server connections and ends the threads.  Also a context
    manager.  ``on_event`` (or ``add_event_hook``) is called with every
    events.Event, from a thread of its own.

    Always one process: ``workers`` is for the command line (workers.py),
    which runs one Proxy per worker process, each given its ``worker`` slot
    and running with its share of the limits (config.for_worker).
    """

    def __init__(self, config: ConfigSource, config_path: str | None = None, overrides: dict | None = None,
                 worker: WorkerSlot | None = None, on_event: EventHook | None = None,
                 listener: Any = None) -> None:
        if config_path is None and isinstance(config, (str, os.PathLike)):
            config_path = os.fspath(config)
        self.worker = worker
        self.listener = listener                # a listening socket to serve (a worker's, from its supervisor)
        self.whole_config = config_mod.load(config)     # as configured (SHOW CONFIG, SHOW DATABASES)
        self.config = self._share(self.whole_config)    # what this process enforces
        self.peer_listener: PeerListener | None = None
        self.config_path = config_path          # what RELOAD and SIGHUP re-read
        self.overrides = dict(overrides or {})  # Config fields the command line set (e.g. listen_port)
        self._reload_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self.server: ProxyServer | None = None
        self.metrics: Any = None                # metrics.MetricsEndpoint when metrics_listen is set
        self.health: HealthChecker | None = None   # health checks of the entries with several nodes
        self.events = EventHub()                # the hooks (add_event_hook) and their dispatcher thread
        if on_event is not None:
            self.events.add(on_event)
        self._threads: list[threading.Thread] = []
        self._stop_janitor = threading.Event()
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stopped = False

    def _share(self, config: config_mod.Config) -> config_mod.Config:
        worker = self.worker
        return config if worker is None else config_mod.for_worker(config, worker.index, worker.count)

    def _running(self) -> ProxyServer:
        server = self.server
        if server is None:
            raise RuntimeError("the proxy is not started: call start() (or enter serve()'s with-block) first")
        return server

    # -- where it is ------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """(host, port, unix_socket) the proxy accepts clients on.  RuntimeError before ``start()``."""
        server = self._running()
        host, port = server.server_address[:2]
        return Address(str(host), int(port), server.listeners.unix_path)

    @property
    def host(self) -> str:
        """``address.host``."""
        return self.address.host

    @property
    def port(self) -> int:
        """``address.port``."""
        return self.address.port

    @property
    def pool(self) -> BackendIdlePool:
        """The pool of server connections (internal: its ``snapshot()`` counters may change; use ``stats()``)."""
        return self._running().pool

    # -- starting ---------------------------------------------------------------------

    def start(self) -> "Proxy":
        """Bind and serve from background threads; returns the proxy, ready (``wait_ready()`` is true).

        Raises ConfigError (a bad auth file or TLS file) or OSError (the port
        is taken) with nothing left listening.
        """
        try:
            return self._start()
        except BaseException as exc:
            self._start_error = exc
            self._ready.set()                  # wake wait_ready(), which raises it
            raise

    def _start(self) -> "Proxy":
        if self.server is not None:
            raise RuntimeError("the proxy was started already")
        if self.worker is None and self.config.workers > 1:
            log.warning("workers: %d is for the command line (python -m threadpool_proxy); this embedded "
                        "proxy serves from one process", self.config.workers)
        raise_fd_limit(self.config)
        server = self.server = ProxyServer(self.config, self.worker, events=self.events, listener=self.listener)
        server.whole_config = self.whole_config
        server.reloader = self.reload
        server.setter = self.set_setting
        server.stopper = self.stop_in_background
        server.readiness = Readiness(server)
        try:
            if self.worker is not None:
                self.peer_listener = PeerListener(self.worker, server)
                self._threads.append(threading.Thread(target=self.peer_listener.serve_forever,
                                                      kwargs={"poll_interval": 0.2},
                                                      name="threadpool_proxy-peers", daemon=True))
            # With workers, the supervisor serves the metrics, /ready and /live of them all (workers.py).
            if self.config.metrics_listen and self.worker is None:
                from .metrics import MetricsEndpoint
                self.metrics = MetricsEndpoint(server, self.config.metrics_listen,
                                               readiness=server.readiness).start()
        except BaseException:
            server.server_close()
            if self.peer_listener is not None:
                self.peer_listener.server_close()
            raise
        serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                 name="threadpool_proxy-accept", daemon=True)
        janitor = threading.Thread(target=self._janitor, name="threadpool_proxy-janitor", daemon=True)
        self._threads += [serve, janitor]
        for t in self._threads:
            t.start()
        self.health = HealthChecker(server).start()
        log.info("threadpool_proxy listening on %s", server.listeners.describe())
        self._ready.set()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the proxy accepts clients: True; False if ``timeout`` seconds passed first.

        For a proxy started in another thread (``serve_forever()``): ``start()``
        itself returns only once the proxy is ready.  Raises what ``start()``
        raised (ConfigError, OSError) if it failed.  False once the proxy stopped.
        """
        if not self._ready.wait(timeout):
            return False
        if self._start_error is not None:
            raise self._start_error
        return not self._stopped and not self.stopping

    def _janitor(self) -> None:
        """Periodic maintenance: close server connections parked for too long."""
        server = self._running()
        while not self._stop_janitor.wait(self._janitor_interval()):
            try:
                keep = server.keep_warm()
                server.pool.reap_idle(self.config.server_idle_timeout, keep)
                server.pool.expire(self.config.server_lifetime)
                server.enforce_query_timeout()
                server.junk_log.flush()
                server.stats.tick([s.stats for s in server.sessions() if s.relay is not None])
            except Exception:
                log.exception("janitor failed")

    def _janitor_interval(self) -> float:
        """Seconds between two janitor rounds: a fraction of the shortest period it keeps (RELOAD may change them)."""
        config = self.config
        periods = [config.server_idle_timeout, config.stats_period * 4]
        periods += [p for p in (config.server_lifetime, config.query_timeout) if p > 0]
        return min(5.0, max(0.05, min(periods) / 4))

    def serve_forever(self) -> None:
        """Run in the calling thread until stop() is called from another thread or a signal."""
        if self.server is None:
            self.start()
        for t in self._threads:
            while t.is_alive():
                t.join(0.5)

    # -- what it sees ---------------------------------------------------------------------

    def stats(self) -> records.ProxyStats:
        """Pools, database totals, clients and server connections now: records.ProxyStats.

        The same facts as the admin console's SHOW POOLS, SHOW STATS, SHOW
        CLIENTS and SHOW SERVERS, from the same observation of the proxy
        (times in seconds).  RuntimeError before ``start()``.
        """
        server = self._running()
        return records.from_observation(server.observe(), server.console_control.node_state)

    def add_event_hook(self, hook: EventHook) -> None:
        """Call ``hook(event)`` for each events.Event from now on, from the proxy's event thread.

        A hook that is slow makes events wait (beyond events.MAX_QUEUED they
        are dropped and counted); one that raises is logged and called again
        with the next event.  Neither slows or stops the proxy.
        """
        self.events.add(hook)

    def remove_event_hook(self, hook: EventHook) -> None:
        """Stop calling ``hook``."""
        self.events.remove(hook)

    # -- changing it ----------------------------------------------------------------------

    def set_setting(self, key: str, text: str) -> config_mod.Config:
        """SET key = value on the console: this setting changes now, as RELOAD would apply it.

        Not written to the configuration file: the next RELOAD (or SIGHUP)
        reads the file again, and its value wins.  ConfigError (naming the
        key) for an unknown key, one that needs a restart, or a bad value.
        """
        if key not in CHANGEABLE:
            known = key in {f.name for f in dataclasses.fields(config_mod.Config)}
            raise config_mod.ConfigError(f"{key}: " + ("changes only with a restart" if known else "unknown key"))
        server = self._running()
        with self._reload_lock:
            new = config_mod.with_setting(self.whole_config, key, text)
            self.config = server.apply_config(self._share(new))
            self.whole_config = server.whole_config = new
            log.info("SET %s = %s", key, "********" if key == "auth_password" else text)
            return self.config

    def reload(self, config: ConfigSource | None = None) -> config_mod.Config:
        """Apply a configuration to the running proxy; SIGHUP and RELOAD call it without one.

        Without ``config``: re-read the configuration file (if started from
        one) and the auth file.  With one (a Config, a dict, or a YAML path,
        which later reloads then re-read): use it instead.  Clients stay
        connected; listen.*, metrics_listen and workers keep their values
        until a restart.  A bad configuration raises ConfigError and changes
        nothing.  Returns the configuration now in force.
        """
        server = self._running()
        with self._reload_lock:
            notes: list = []
            if config is not None:
                new = config_mod.load(config, notes)
                path = os.fspath(config) if isinstance(config, (str, os.PathLike)) else None
            else:
                new = config_mod.load(self.config_path, notes) if self.config_path else self.whole_config
                path = self.config_path
            for note in notes:
                log.warning("%s", note)
            if self.overrides:
                new = dataclasses.replace(new, **self.overrides)
            self.config = server.apply_config(self._share(new))
            self.whole_config = server.whole_config = dataclasses.replace(    # as apply_config keeps them
                new, **{name: getattr(self.config, name) for name in config_mod.RESTART_ONLY})
            self.config_path = path
            log.info("configuration reloaded%s", f" from {path}" if path else
                     " (given by the program)" if config is not None else
                     " (auth file only: the proxy was not started from a file)")
            return self.config

    def pause(self, database: str | None = None, timeout: float | None = None) -> bool:
        """PAUSE: hold new transactions of ``database`` (None: every one), wait for the running ones to end.

        Returns True once none runs, False if ``timeout`` seconds passed first
        (the hold stays in effect either way: ``resume()`` lifts it).  Clients
        stay connected; held ones wait within query_wait_timeout.  ValueError
        for a database the proxy does not know, or when everything is paused
        already.
        """
        control = self._running().console_control
        if database is not None and database not in control.database_names():
            raise ValueError(f'database "{database}" is not an entry of databases nor used by a client')
        try:
            return control.pause(database, timeout)
        except CommandError as exc:
            raise ValueError(str(exc)) from None

    def resume(self, database: str | None = None) -> None:
        """RESUME: end a ``pause()`` (None: every pause).  ValueError if nothing (or not that) is paused."""
        control = self._running().console_control
        try:
            control.resume(database)
        except CommandError as exc:
            raise ValueError(str(exc)) from None

    # -- stopping -------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once a stop began (SHUTDOWN on the console, a signal, ``stop()``)."""
        return self.server is not None and self.server.stopping

    @property
    def stopped(self) -> bool:
        """True once a stop has finished (every client gone, the pool closed)."""
        return self._stopped

    def stop_in_background(self, graceful: bool = False) -> threading.Thread:
        """``stop()`` (or ``shutdown()`` when ``graceful``) from a thread of its own.

        SHUTDOWN on the console (its own client is stopped too) and the
        command line's signal handling use this.
        """
        t = threading.Thread(target=self.shutdown if graceful else self.stop, name="threadpool_proxy-stop",
                             daemon=True)
        t.start()
        return t

    def stop(self, timeout: float = 0.0, wait: float = 5.0) -> None:
        """Stop; returns once every client is gone and the threads ended (each waited for up to ``wait`` s).

        ``timeout`` > 0: gracefully, as SIGTERM: no new clients; a client in a
        transaction may finish it (and is then disconnected) for up to
        ``timeout`` seconds; the clients left then are disconnected
        mid-transaction.  ``timeout`` 0 (the default): now, as SIGINT: every
        client is disconnected, mid-transaction too, and a graceful stop under
        way in another thread ends now.  Calling it again does nothing.
        """
        if timeout < 0:
            raise ValueError(f"timeout must be >= 0, got {timeout!r}")
        server = self.server
        if server is not None:
            server.readiness.stop_serving("shutting down")
            if timeout == 0:
                server.force_stop()
            else:
                # /ready fails first; the listening socket stays open (clients still accepted) for
                # shutdown_unready_delay, so a load balancer checking /ready stops sending clients
                # before connections are refused (a worker skips it: its supervisor waited).
                delay = self.config.shutdown_unready_delay if self.worker is None else 0.0
                if delay > 0 and not self._stopped:
                    log.info("shutting down: /ready answers 503; clients are still accepted for %g s "
                             "(shutdown_unready_delay)", delay)
                    server.wait_unless_forced(delay)
        with self._stop_lock:
            self._stop(wait, timeout)

    def shutdown(self, timeout: float | None = None, wait: float = 5.0) -> None:
        """``stop(timeout)``, ``timeout`` defaulting to ``shutdown_timeout``: what SIGTERM does."""
        self.stop(self.config.shutdown_timeout if timeout is None else timeout, wait)

    def _stop(self, wait: float, timeout: float) -> None:
        server = self.server
        if server is None or self._stopped:
            return
        server.close_down(timeout, wait)
        self._stop_janitor.set()
        if self.health is not None:
            self.health.stop(wait)
        if self.metrics is not None:
            self.metrics.stop()
        if self.peer_listener is not None:
            self.peer_listener.close()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(wait)
        self.events.close(wait)              # the logouts and closes of the stop are delivered first
        self._stopped = True
        log.info("threadpool_proxy stopped")

    def __enter__(self) -> "Proxy":
        if self.server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(config: ConfigSource, on_event: EventHook | None = None) -> Proxy:
    """Build a proxy from a Config, a dict or a YAML path, and start serving; see ``Proxy``."""
    return Proxy(config, on_event=on_event).start()


def serve(config: ConfigSource, on_event: EventHook | None = None) -> Proxy:
    """``with serve(config) as proxy:`` runs the proxy for the block's duration (``stop()`` when it ends)."""
    return Proxy(config, on_event=on_event)
