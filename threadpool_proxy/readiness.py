"""``/ready`` and ``/live``: whether a load balancer should send this proxy new clients, and
whether an orchestrator should leave it running; served beside ``/metrics`` (``metrics_listen``).

* live: the process answers (a worker supervisor: and at least one worker
  process runs).  Stays 200 through a graceful shutdown, while clients finish.
* ready: not shutting down, accepting clients, and for every database entry at
  least one of its servers reachable: not marked down by the health checks
  (entries with several nodes), and a TCP connection to it opens within
  ``PROBE_TIMEOUT``.  The answer is kept ``CACHE_SECONDS``, so a balancer
  checking every 100 ms costs one connection per server per second.

On SIGTERM ``/ready`` fails first; the listening socket closes
``shutdown_unready_delay`` seconds later (embed.py), once the balancer's
checks have seen it.  A body says why in one line; it names servers by
host:port, nothing secret.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

log = logging.getLogger(__name__)

#: Seconds a /ready answer (and each server's probe) is reused.
CACHE_SECONDS = 1.0

#: Seconds a TCP connection to a server may take before it counts as unreachable.
PROBE_TIMEOUT = 1.0



class Cached:
    """One answer, computed by one caller at a time and reused for CACHE_SECONDS."""

    def __init__(self, compute) -> None:
        self._compute = compute
        self._lock = threading.Lock()
        self._value = None
        self._at = 0.0

    def get(self):
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= CACHE_SECONDS:
                self._value = self._compute()
                self._at = time.monotonic()
            return self._value

    def forget(self) -> None:
        with self._lock:
            self._value = None


def probe(nodes, timeout: float = PROBE_TIMEOUT) -> dict:
    """host:port -> None (a TCP connection opened) or why not, for every node, probed at once."""
    results: dict = {}

    def one(node) -> None:
        try:
            socket.create_connection((node.host, node.port), timeout=timeout).close()
            results[node.name] = None
        except OSError as exc:
            results[node.name] = exc.strerror or str(exc)

    threads = [threading.Thread(target=one, args=(n,), name="threadpool_proxy-ready-probe", daemon=True)
               for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 1.0)
    return {n.name: results.get(n.name, "no answer") for n in nodes}


class Readiness:
    """The answers of one proxy process (``server``: its ProxyServer)."""

    def __init__(self, server) -> None:
        self.server = server
        self.unready = ""                 # why this proxy takes no new clients ("" while it does)
        self._ready = Cached(self._check)

    def stop_serving(self, why: str) -> None:
        """From now on /ready fails with ``why`` (a shutdown has begun)."""
        self.unready = why
        self._ready.forget()

    def live(self) -> tuple[bool, str]:
        return True, "live"

    def ready(self) -> tuple[bool, str]:
        if self.unready:
            return False, self.unready
        return self._ready.get()

    def _check(self) -> tuple[bool, str]:
        server = self.server
        if self.unready or server.stopping:
            return False, self.unready or "shutting down"
        config = server.config
        entries = list(config.databases.values())
        nodes = {n.name: n for entry in entries for n in entry.usable_nodes}
        reached = probe(list(nodes.values()))
        # Nodes of entries with several are health-checked (health.py): their down mark is kept up to
        # date.  Another's may be a failed dial's, cleared only by the next dial: the probe decides.
        checked = {n.name for entry in entries if entry.multi for n in entry.nodes}
        for name in checked:
            if name in reached and reached[name] is None and server.pool.is_down(name):
                reached[name] = "marked down by the health checks"
        for entry in entries:
            if not any(reached[n.name] is None for n in entry.usable_nodes):
                why = "; ".join(f"{n.name}: {reached[n.name]}" for n in entry.usable_nodes)
                return False, f"database {entry.name}: no server reachable ({why})"
        return True, "ready"

