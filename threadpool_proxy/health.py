"""Health checks of the nodes of database entries with several servers, in one thread.

Every ``health_check_period`` each node listed by such an entry is checked once,
one after the other, each within ``health_check_timeout``:

* with a health-check user (``health_check_user``, else ``auth_user``) the check
  runs ``nodes.ATTRS_QUERY`` on a dedicated connection kept open between
  checks (opened again after a failure), which also tells whether the node is
  in recovery or read-only (``target_session_attrs`` routing follows);
* without one (pass-through authentication only: the proxy knows no password),
  a TCP connection to the node is the check; what the node is comes from the
  clients' own logins, and a real dial that fails still marks it down at once.

After ``health_check_failures`` failures in a row the node is marked down
(``BackendIdlePool.mark_down``: its parked connections are closed, clients
keeping an idle one give it back, no new connection goes there); the first
check that works marks it up again.  Every change is logged.  A server that
refuses the health-check user's password (or has no such user) is up: it
answered; the log says the check could not log in.
"""

from __future__ import annotations

import threading
import time

from . import protocol as pq
from .backend import connect_socket
from .errors import ServerError, ServerGone
from .nodes import query_session_attrs
from .auth import AuthFailed
from .logs import get_logger

log = get_logger(__name__)


def nodes_to_check(config) -> dict:
    """host:port -> (NodeConfig, database to log in to) of every node of an entry that routes."""
    found = {}
    for entry in config.databases.values():
        if not entry.multi:
            continue
        dbname = entry.dbname or (entry.name if entry.name != "*" else "postgres")
        for node in entry.nodes:
            found.setdefault(node.name, (node, dbname))
    return found


class HealthChecker:
    """The health-check thread of one proxy: ``start()``, ``stop()``, ``check_all()`` (one round)."""

    def __init__(self, server) -> None:
        self.server = server                  # the ProxyServer: config, pool, router, logins
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conns: dict = {}                # node name -> its dedicated connection
        self._failures: dict = {}             # node name -> failed checks in a row
        self._login_warned: set = set()
        self.rounds = 0

    def start(self) -> "HealthChecker":
        self._thread = threading.Thread(target=self._run, name="threadpool_proxy-health", daemon=True)
        self._thread.start()
        return self

    def stop(self, wait: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(wait)
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.check_all()
            except Exception:
                log.exception("health check round failed")
            period = self.server.config.health_check_period
            self._stop.wait(max(0.0, period - (time.monotonic() - started)))

    def check_all(self) -> None:
        config = self.server.config
        nodes = nodes_to_check(config)
        for name in [n for n in self._conns if n not in nodes]:     # gone from the configuration (RELOAD)
            self._conns.pop(name).close()
        for name, (node, dbname) in nodes.items():
            if self._stop.is_set():
                return
            error = self._check(node, dbname, config)
            self._outcome(name, error, config)
        self.rounds += 1

    def _check(self, node, dbname: str, config) -> str | None:
        """None if ``node`` answered, else why not."""
        timeout = config.health_check_timeout
        logins = self.server.logins
        if logins.health_check_user() is None:
            try:
                connect_socket(node.host, node.port, timeout).close()
                return None
            except OSError as exc:
                return f"cannot connect: {exc.strerror or exc}"
        conn = self._conns.pop(node.name, None)
        if conn is not None:
            try:
                in_recovery, read_only = query_session_attrs(conn, timeout)
            except (ServerError, ServerGone, pq.ProtocolError, OSError, ValueError):
                conn.close()          # it may have died with a restart the node is over: a fresh one decides
                conn = None
            else:
                return self._answered(node, conn, in_recovery, read_only)
        try:
            conn = logins.health_check_login(node, dbname, timeout)
            in_recovery, read_only = query_session_attrs(conn, timeout)
        except (ServerError, AuthFailed) as exc:
            if conn is not None:
                conn.close()
            code = exc.fields.get("C", "") if isinstance(exc, ServerError) else "28000"
            if code.startswith(("28", "3D")):
                # It answered: up, but the check cannot log in (a wrong password, no such database).
                if node.name not in self._login_warned:
                    self._login_warned.add(node.name)
                    log.warning("health check of node %s cannot log in as %s: %s; the node counts as up "
                                "while it answers", node.name, logins.health_check_user(), exc)
                return None
            return str(exc)
        except (ServerGone, pq.ProtocolError, OSError, ValueError) as exc:
            if conn is not None:
                conn.close()
            return str(exc)
        return self._answered(node, conn, in_recovery, read_only)

    def _answered(self, node, conn, in_recovery: bool, read_only: bool) -> None:
        if self._stop.is_set():
            conn.close()              # stop() may have closed the others already: keep none
            return None
        self._conns[node.name] = conn
        self._login_warned.discard(node.name)
        self.server.router.learn(node.name, in_recovery, read_only, "health check")
        return None

    def _outcome(self, name: str, error: str | None, config) -> None:
        pool, router = self.server.pool, self.server.router
        state = router.state(name)
        if error is None:
            self._failures[name] = 0
            state.checked_at, state.check_error = time.time(), ""
            if pool.mark_up(name):
                log.warning("node %s is up again (health check answered); clients may use it", name)
            return
        failures = self._failures.get(name, 0) + 1
        self._failures[name] = failures
        state.check_error = error
        if failures >= config.health_check_failures:
            if pool.mark_down(name, config.server_login_retry, error):
                log.warning("node %s is down: %d health checks failed in a row (last: %s); its idle "
                            "connections are closed and clients go to the other nodes", name, failures, error)
        else:
            log.info("health check of node %s failed (%d of %d before it is marked down): %s",
                     name, failures, config.health_check_failures, error)
