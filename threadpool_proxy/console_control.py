"""What the admin console may see and do in a running proxy: its control verbs.

``admin.Console`` parses the console's commands and builds the answers, with
no I/O and no knowledge of the proxy's insides; it asks a ``ConsoleControl``
for everything it shows and does.  This module is that other half, beside the
console: the verbs that act on the running proxy (PAUSE, RESUME, RECONNECT,
KILL, RELOAD, SET, DISABLE, ENABLE, SHUTDOWN) and the views SHOW reads
(``observe()``, the databases, the nodes' states, the settings SET may change).

With worker processes a verb runs in every worker at once, over the peer
channel (peers.py), and SHOW adds the other workers' rows; this module also
answers those questions when another worker asks (``peer_query``).

It holds the server (server.ProxyServer) it controls but does not import its
module: the server builds its ConsoleControl, so the dependency runs one way.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import TYPE_CHECKING

from .logs import get_logger
from . import config as config_mod
from . import stats as stats_mod
from .admin import ADMIN, ALL, CommandError, Console
from .nodes import node_names
from .pool import ALL_SERVERS, key_matches

if TYPE_CHECKING:
    from .peers import WorkerSlot
    from .server import ProxyServer

#: The logger these lines had before this module left server.py: log filters keep working.
log = get_logger("threadpool_proxy.server")

#: Settings RELOAD and SET change in a running proxy (listen.*, metrics_listen and workers need a restart).
CHANGEABLE = frozenset(f.name for f in dataclasses.fields(config_mod.Config)
                       if f.name not in config_mod.RESTART_ONLY + ("databases", "users", "peers"))


class ConsoleControl:
    """What the admin console (admin.Console) may see and do in this proxy.

    Databases are named as clients name them; each names a target of the pool
    (its server and server-side database, pool.ALL_SERVERS for the whole proxy).

    With worker processes, ``config`` is the configuration as written (not
    this worker's share of the limits), SHOW rows of the other workers come
    through ``peer_rows``, and PAUSE, RESUME, RECONNECT and KILL run in every
    worker (``_everywhere``); RELOAD and SHUTDOWN go through the supervisor
    (the hooks workers.py sets), which signals every worker.
    """

    #: Seconds between two looks while PAUSE waits for transactions to end, or KILL for clients to leave.
    POLL = 0.05

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._lock = threading.Lock()
        self._paused: dict = {}               # database name (or None: everything) -> pool target

    @property
    def config(self) -> config_mod.Config:
        return self.server.whole_config

    @property
    def worker(self) -> WorkerSlot | None:
        return self.server.worker

    def cancel_counts(self) -> dict:
        """CancelRequests this process received from clients, and how many it forwarded to another worker."""
        with self.server._cancel_lock:
            return dict(self.server.cancel_counts)

    def peer_rows(self, what: str) -> list:
        """The other workers' rows of ``SHOW what`` (those that answered), in worker order."""
        peers = self.server.peers
        if peers is None:
            return []
        answers = peers.ask_all({"kind": "rows", "show": what})
        return [answers[i] for i in sorted(answers)]

    def peer_query(self, request: dict):
        """Answer another worker or the supervisor (peers.py): SHOW rows, metrics figures, readiness, an action."""
        kind = request.get("kind")
        if kind == "rows":
            what = str(request.get("show", ""))
            rows = getattr(Console(self, "peer", ADMIN, local=True), "rows_" + what, None)
            if rows is None:
                raise ValueError(f"no rows {what!r}")
            return rows()[1]
        if kind == "figures":
            from .metrics import local_figures
            return local_figures(self.server)
        if kind == "ready":                    # the supervisor's /ready (readiness.py)
            return list(self.server.readiness.ready())
        if kind == "action" and request.get("verb") in ("pause", "resume", "reconnect", "kill", "reload", "set",
                                                        "disable", "enable"):
            database = request.get("database")
            try:
                getattr(self, "_" + request["verb"])(database)
            except Exception as exc:      # CommandError, a bad file at RELOAD: the asking worker says so
                return {"error": str(exc)}
            return {"ok": True}
        raise ValueError(f"unknown peer request {kind!r}")

    def _everywhere(self, verb: str, database: str | None) -> None:
        """Run a console action here and, with workers, in every other worker at the same time."""
        peers = self.server.peers
        if peers is None:
            getattr(self, "_" + verb)(database)
            return
        answers: dict = {}
        asking = threading.Thread(target=lambda: answers.update(peers.ask_all(
            {"kind": "action", "verb": verb, "database": database}, timeout=None)), daemon=True)
        asking.start()
        try:
            getattr(self, "_" + verb)(database)
        finally:
            asking.join()
        for index, answer in sorted(answers.items()):
            if isinstance(answer, dict) and answer.get("error"):
                log.info("%s %s in worker %d: %s", verb.upper(), database or "", index, answer["error"])

    def pause(self, database: str | None, timeout: float | None = None) -> bool:
        """PAUSE: hold new transactions, wait for the running ones; False if ``timeout`` passed first
        (the hold stays).  With workers, in every worker (and no ``timeout``)."""
        if self.server.peers is None:
            return self._pause(database, timeout)
        self._everywhere("pause", database)
        return True

    def resume(self, database: str | None) -> None:
        self._everywhere("resume", database)

    def reconnect(self, database: str | None) -> None:
        self._everywhere("reconnect", database)

    def kill(self, database: str) -> None:
        self._everywhere("kill", database)

    @property
    def listen_port(self) -> int:
        return self.server.server_address[1]

    def observe(self) -> stats_mod.Observation:
        return self.server.observe()

    def database_names(self) -> set:
        names = {n for n in self.server.config.databases if n != "*"}
        names.update(c.stats.database for c in self.server.observe().clients)
        for rows in self.peer_rows("pools"):           # databases only another worker's clients use
            names.update(row[0] for row in rows)
        return names

    def node_state(self, name: str) -> str:
        """"up" or "down", then what the node is (primary, standby, read-only, unknown): "up primary"."""
        server = self.server
        return f"{'down' if server.pool.is_down(name) else 'up'} {server.router.state(name).kind}"

    def paused_databases(self) -> frozenset:
        with self._lock:
            return ALL if None in self._paused else frozenset(self._paused)

    def changeable_settings(self) -> frozenset:
        return CHANGEABLE

    def _target(self, database: str | None):
        if database is None:
            return ALL_SERVERS
        entry = self.server.config.lookup_database(database)
        return (node_names(entry), entry.server_dbname(database))

    def _pause(self, database: str | None, timeout: float | None = None) -> bool:
        """Hold new transactions of ``database`` (None: all), then wait until none runs.

        False if ``timeout`` seconds passed first: the hold stays (RESUME lifts it).
        """
        target = self._target(database)
        with self._lock:
            if None in self._paused:
                raise CommandError("55000", "the whole proxy is paused already")
            self._paused[database] = target
        pool = self.server.pool
        pool.hold(target)
        log.info("PAUSE %s: waiting for running transactions to end", database or "(all databases)")
        deadline = None if timeout is None else time.monotonic() + timeout
        while pool.in_use(target) and target in pool.held() and not self.server.stopping:
            if deadline is not None and time.monotonic() >= deadline:
                log.info("PAUSE %s: transactions still running after %g s", database or "(all databases)",
                         timeout)
                return False
            time.sleep(self.POLL)
        log.info("PAUSE %s: paused", database or "(all databases)")
        return True

    def _resume(self, database: str | None) -> None:
        with self._lock:
            if database is None:
                targets = list(self._paused.values())
                self._paused.clear()
            elif None in self._paused:
                raise CommandError("55000", "the whole proxy is paused: RESUME without a database name")
            elif database not in self._paused:
                raise CommandError("55000", f'database "{database}" is not paused')
            else:
                targets = [self._paused.pop(database)]
        if not targets:
            raise CommandError("55000", "nothing is paused")
        for target in targets:
            if target not in self._paused.values():
                self.server.pool.unhold(target)
        log.info("RESUME %s", database or "(all databases)")

    def _reconnect(self, database: str | None) -> None:
        closed = self.server.pool.close_released(self._target(database), time.time())
        log.info("RECONNECT %s: %d parked server connections closed, the others when released",
                 database or "(all databases)", closed)

    def _kill(self, database: str) -> None:
        """Disconnect the database's clients, close its server connections, hold it until RESUME."""
        target = self._target(database)
        with self._lock:
            self._paused.setdefault(database, target)
        server = self.server
        server.pool.hold(target)
        victims = [s for s in server.sessions() if s.console is None and s.request is not None
                   and key_matches(s.request.key, target)]
        for session in victims:
            session.kill()
        deadline = time.monotonic() + 5.0
        while any(s in server.sessions() for s in victims) and time.monotonic() < deadline:
            time.sleep(self.POLL)
        server.pool.close_released(target, time.time())
        log.info("KILL %s: %d clients disconnected; new ones wait for RESUME", database, len(victims))

    def reload(self) -> None:
        self._everywhere("reload", None)

    def set(self, key: str, text: str) -> None:
        """SET key = value: here and in every other worker (each takes its share of a divided limit)."""
        if self.server.setter is None:
            raise CommandError("55000", "this proxy cannot change settings")
        self.server.setter(key, text)          # a bad value fails here first, with nothing changed
        if self.server.peers is not None:
            answers = self.server.peers.ask_all({"kind": "action", "verb": "set", "database": [key, text]},
                                                timeout=None)
            for index, answer in sorted(answers.items()):
                if isinstance(answer, dict) and answer.get("error"):
                    log.warning("SET %s in worker %d: %s", key, index, answer["error"])

    def _set(self, pair) -> None:
        self.server.setter(*pair)

    def disable(self, database: str) -> None:
        self._everywhere("disable", database)

    def enable(self, database: str) -> None:
        if database not in self.server.disabled:
            raise CommandError("55000", f'database "{database}" is not disabled')
        self._everywhere("enable", database)

    def _disable(self, database: str) -> None:
        self.server.disabled.add(database)
        log.info("DISABLE %s: new clients of it are refused", database)

    def _enable(self, database: str) -> None:
        self.server.disabled.discard(database)
        log.info("ENABLE %s", database)

    def disabled_databases(self) -> frozenset:
        return frozenset(self.server.disabled)

    def _reload(self, _database=None) -> None:
        self.server.reload()

    def shutdown(self, mode: str | None = None):
        """SHUTDOWN: as SIGINT (now); SHUTDOWN WAIT_FOR_SERVERS: as SIGTERM (running transactions finish)."""
        graceful = mode is not None
        log.info("SHUTDOWN%s on the admin console", " WAIT_FOR_SERVERS" if graceful else "")
        return lambda: self.server.request_stop(graceful)      # run once the answer is sent
