"""The signals of a proxy process: SIGTERM stops gracefully, SIGINT and SIGQUIT at once, SIGHUP reloads.

Used by the command line and by each worker process (workers.py), so both
answer signals alike.  The stop itself runs in a thread of its own
(``Proxy.stop_in_background``); the process's main thread only sleeps, runs
the signal handler, and calls ``act`` from its loop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("threadpool_proxy")

#: The signals StopSignals.handle is meant for.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGQUIT") if hasattr(signal, name))


class StopSignals:
    """SIGTERM: graceful stop (running transactions get shutdown_timeout to finish); SIGINT, SIGQUIT: now.

    A signal during a graceful stop (SIGTERM's, or SHUTDOWN WAIT_FOR_SERVERS
    on the console) makes it immediate; one during an immediate stop exits
    the process at once (status 1).  ``handle`` runs as the signal handler:
    it sets attributes only (no lock, no logging: the main thread may hold
    any lock when it runs), and ``act``, called by the main loop, does the rest.
    """

    def __init__(self, proxy) -> None:
        self.proxy = proxy
        self.stopping = None            # None, "graceful" or "immediate"
        self.start: bool | None = None  # a stop to start: graceful (True) or not
        self.notes: list = []           # (signal number, what it did), logged by act()

    def handle(self, signum, frame) -> None:
        if self.stopping == "immediate":
            os._exit(1)
        if self.stopping is None and not self.proxy.stopping:
            graceful = signum == signal.SIGTERM and self.proxy.config.shutdown_timeout > 0
            self.stopping = "graceful" if graceful else "immediate"
            self.start = graceful
            self.notes.append((signum, self.stopping))
        else:
            if self.proxy.server is not None:
                self.proxy.server.force_stop()  # a flag: the drain loop sees it within 0.1 s
            self.stopping = "immediate"
            self.notes.append((signum, "forced"))

    def act(self) -> None:
        while self.notes:
            signum, what = self.notes.pop(0)
            name = signal.Signals(signum).name
            if what == "graceful":
                log.info("%s: shutting down once running transactions end (within shutdown_timeout, %g s); "
                         "a second signal stops at once", name, self.proxy.config.shutdown_timeout)
            elif what == "immediate":
                log.info("%s: shutting down now", name)
            else:
                log.warning("%s: the shutdown under way goes on at once; one more signal exits without "
                            "clean-up", name)
        if self.start is not None:
            graceful, self.start = self.start, None
            self.proxy.stop_in_background(graceful)

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.handle)



def install_reload(proxy) -> None:
    """SIGHUP re-reads the configuration and auth files, in a thread (the handler itself only starts it)."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: threading.Thread(target=_reload, args=(proxy,),
                                                                 name="threadpool_proxy-reload").start())


def _reload(proxy) -> None:
    """Keep the old configuration (and auth file) if the new one is bad."""
    from .config import ConfigError
    try:
        proxy.reload()
    except ConfigError as exc:
        log.error("SIGHUP: configuration not reloaded, the old one stays: %s", exc)
    except Exception:
        log.exception("SIGHUP: configuration not reloaded, the old one stays")
