"""The embedding API: a whole proxy that a Python program starts, reloads and stops.

``Proxy`` is the library's public face (``threadpool_proxy.Proxy``, ``start``,
``serve``): build it from a config, ``start()`` it (it serves from background
threads), read ``port``, ``stop()`` it; ``serve()`` is the same as a context
manager.  It owns what runs beside the listening server (server.ProxyServer):
the janitor thread, the health checks, the metrics endpoint and, in a worker
process, the peer listener; and it is where RELOAD and SET re-read and apply
the configuration.

The command line (__main__.py) runs one Proxy, and so does each worker
process (workers.py), so the three ways of running the proxy share one start
and one stop.
"""

from __future__ import annotations

import dataclasses
import os
import threading

from .logs import get_logger
from . import config as config_mod
from .console_control import CHANGEABLE
from .health import HealthChecker
from .peers import PeerListener, WorkerSlot
from .pool import BackendIdlePool
from .readiness import Readiness
from .server import ProxyServer, raise_fd_limit

#: The logger these lines had before this module left server.py: log filters keep working.
log = get_logger("threadpool_proxy.server")


class Proxy:
    """A running (or ready to run) proxy: the embedding API.

    ``start()`` binds and serves from background threads; ``host``/``port`` are
    the bound address (``listen.port: 0`` picks a free port); ``stop()`` closes
    the listening socket, disconnects clients, closes pooled server
    connections and ends the threads.  Also a context manager.

    Always one process: ``workers`` is for the command line (workers.py),
    which runs one Proxy per worker process, each given its ``worker`` slot
    and running with its share of the limits (config.for_worker).
    """

    def __init__(self, config, config_path: str | None = None, overrides: dict | None = None,
                 worker: WorkerSlot | None = None, listener=None) -> None:
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
        self.metrics = None                     # metrics.MetricsEndpoint when metrics_listen is set
        self.health: HealthChecker | None = None   # health checks of the entries with several nodes
        self._threads: list[threading.Thread] = []
        self._stop_janitor = threading.Event()
        self._stopped = False

    def _share(self, config: config_mod.Config) -> config_mod.Config:
        worker = self.worker
        return config if worker is None else config_mod.for_worker(config, worker.index, worker.count)

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
        if self.worker is None and self.config.workers > 1:
            log.warning("workers: %d is for the command line (python -m threadpool_proxy); this embedded "
                        "proxy serves from one process", self.config.workers)
        raise_fd_limit(self.config)
        self.server = ProxyServer(self.config, self.worker, listener=self.listener)
        self.server.readiness = Readiness(self.server)
        self.server.whole_config = self.whole_config
        self.server.reloader = self.reload
        self.server.setter = self.set_setting
        self.server.stopper = self.stop_in_background
        try:
            if self.worker is not None:
                self.peer_listener = PeerListener(self.worker, self.server)
                self._threads.append(threading.Thread(target=self.peer_listener.serve_forever,
                                                      kwargs={"poll_interval": 0.2},
                                                      name="threadpool_proxy-peers", daemon=True))
            # With workers, the supervisor serves the metrics, /ready and /live of them all (workers.py).
            if self.config.metrics_listen and self.worker is None:
                from .metrics import MetricsEndpoint
                self.metrics = MetricsEndpoint(self.server, self.config.metrics_listen,
                                               readiness=self.server.readiness).start()
        except BaseException:
            self.server.server_close()
            if self.peer_listener is not None:
                self.peer_listener.server_close()
            raise
        serve = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                 name="threadpool_proxy-accept", daemon=True)
        janitor = threading.Thread(target=self._janitor, name="threadpool_proxy-janitor", daemon=True)
        self._threads += [serve, janitor]
        for t in self._threads:
            t.start()
        self.health = HealthChecker(self.server).start()
        log.info("threadpool_proxy listening on %s", self.server.listeners.describe())
        return self

    def _janitor(self) -> None:
        """Periodic maintenance: close server connections parked for too long."""
        while not self._stop_janitor.wait(self._janitor_interval()):
            try:
                keep = self.server.keep_warm()
                self.server.pool.reap_idle(self.config.server_idle_timeout, keep)
                self.server.pool.expire(self.config.server_lifetime)
                self.server.enforce_query_timeout()
                self.server.junk_log.flush()
                self.server.stats.tick([s.stats for s in self.server.sessions() if s.relay is not None])
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

    def set_setting(self, key: str, text: str) -> config_mod.Config:
        """SET key = value on the console: this setting changes now, as RELOAD would apply it.

        Not written to the configuration file: the next RELOAD (or SIGHUP)
        reads the file again, and its value wins.  ConfigError (naming the
        key) for an unknown key, one that needs a restart, or a bad value.
        """
        if key not in CHANGEABLE:
            known = key in {f.name for f in dataclasses.fields(config_mod.Config)}
            raise config_mod.ConfigError(f"{key}: " + ("changes only with a restart" if known else "unknown key"))
        with self._reload_lock:
            new = config_mod.with_setting(self.whole_config, key, text)
            self.config = self.server.apply_config(self._share(new))
            self.whole_config = self.server.whole_config = new
            log.info("SET %s = %s", key, "********" if key == "auth_password" else text)
            return self.config

    def reload(self) -> config_mod.Config:
        """Re-read the configuration file (if started from one) and the auth file; SIGHUP and RELOAD.

        A bad file raises ConfigError and changes nothing.
        """
        with self._reload_lock:
            notes: list = []
            new = config_mod.load(self.config_path, notes) if self.config_path else self.whole_config
            for note in notes:
                log.warning("%s", note)
            if self.overrides:
                new = dataclasses.replace(new, **self.overrides)
            self.config = self.server.apply_config(self._share(new))
            self.whole_config = self.server.whole_config = dataclasses.replace(    # as apply_config keeps them
                new, **{name: getattr(self.config, name) for name in config_mod.RESTART_ONLY})
            log.info("configuration reloaded%s", f" from {self.config_path}" if self.config_path else
                     " (auth file only: the proxy was not started from a file)")
            return self.config

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

    def stop(self, wait: float = 5.0) -> None:
        """Stop now: every client is disconnected (mid-transaction too); as SIGINT.

        Ends a graceful ``shutdown()`` under way in another thread.
        """
        if self.server is not None:
            self.server.readiness.stop_serving("shutting down")
            self.server.force_stop()
        with self._stop_lock:
            self._stop(wait, 0.0)

    def shutdown(self, timeout: float | None = None, wait: float = 5.0) -> None:
        """Stop gracefully, as SIGTERM: running transactions get ``timeout`` seconds to finish.

        ``/ready`` fails at once; the listening socket stays open (clients are
        still accepted) for ``shutdown_unready_delay`` seconds first, so that a
        load balancer checking ``/ready`` stops sending clients before
        connections are refused (a worker process skips it: its supervisor
        waited).  ``timeout`` defaults to ``shutdown_timeout``; see
        ProxyServer.close_down.
        """
        server = self.server
        if server is not None:
            server.readiness.stop_serving("shutting down")
            delay = self.config.shutdown_unready_delay if self.worker is None else 0.0
            if delay > 0 and not self._stopped:
                log.info("shutting down: /ready answers 503; clients are still accepted for %g s "
                         "(shutdown_unready_delay)", delay)
                server.wait_unless_forced(delay)
        with self._stop_lock:
            self._stop(wait, self.config.shutdown_timeout if timeout is None else timeout)

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
        self._stopped = True
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
