"""The Prometheus endpoint (``metrics_listen``), with prometheus_client; ``/ready`` and ``/live``
beside it come from readiness.py.

A collector builds every metric on each scrape from the same
``stats.Observation`` as the admin console's SHOW POOLS and SHOW STATS, so
the two always agree and nothing is counted twice.  Names follow
prometheus-community's pgbouncer_exporter with the prefix ``threadpool_proxy_``
(``threadpool_proxy_pools_client_active_connections`` is its
``pgbouncer_pools_client_active_connections``).

The endpoint itself is metrics_http.py: a read timeout and a connection cap
(``metrics_timeout``, ``metrics_max_connections``), and no authentication.
"""

from __future__ import annotations


import threading

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from .logs import get_logger
from .metrics_http import BoundedHTTPServer

log = get_logger(__name__)

PREFIX = "threadpool_proxy_"

#: (metric suffix, PoolView attribute, help)
POOL_GAUGES = (
    ("pools_client_active_connections", "cl_active", "Clients logged in and not waiting (SHOW POOLS cl_active)"),
    ("pools_client_waiting_connections", "cl_waiting", "Clients waiting for a server connection (cl_waiting)"),
    ("pools_server_active_connections", "sv_active", "Server connections in use by a client (sv_active)"),
    ("pools_server_idle_connections", "sv_idle", "Server connections parked or kept idle (sv_idle)"),
    ("pools_server_login_connections", "sv_login", "Pass-through logins still authenticating (sv_login)"),
    ("pools_client_maxwait_seconds", "maxwait", "How long the oldest waiting client has waited (maxwait)"),
)

#: (metric suffix, SHOW STATS counter, help, scale)
STATS_COUNTERS = (
    ("stats_sql_transactions_pooled", "xact_count", "Transactions (total_xact_count)", 1),
    ("stats_queries_pooled", "query_count", "Requests: Query, Sync, FunctionCall (total_query_count)", 1),
    ("stats_server_assignments", "server_assignment_count",
     "Server connections handed to clients (total_server_assignment_count)", 1),
    ("stats_received_bytes", "received", "Bytes received from clients (total_received)", 1),
    ("stats_sent_bytes", "sent", "Bytes sent to clients (total_sent)", 1),
    ("stats_server_in_transaction_duration_seconds", "xact_time", "Time in transactions (total_xact_time)", 1),
    ("stats_queries_duration_seconds", "query_time", "Time running requests (total_query_time)", 1),
    ("stats_client_wait_seconds", "wait_time", "Time clients waited for a server connection (total_wait_time)", 1),
    ("stats_client_logins", "client_login_count", "Client logins (total_client_login_count)", 1),
)


def local_figures(server) -> dict:
    """This process's figures, as plain data a peer worker can send (JSON): pools, totals, events, counts."""
    obs = server.observe()
    return {
        "pools": [[p.database, p.user] + [getattr(p, attr) for _, attr, _ in POOL_GAUGES] for p in obs.pools()],
        "totals": {database: {key: values[key] for _, key, _, _ in STATS_COUNTERS}
                   for database, values in obs.database_totals.items()},
        "events": dict(obs.pool_stats),
        "clients": len(obs.clients) + obs.console_clients + obs.login_clients,
        "servers": obs.open_servers,
        "workers": 1,
    }


def merge_figures(figures: list) -> dict:
    """Several workers' ``local_figures`` as one proxy's: sums, and the longest wait of any."""
    out = {"pools": {}, "totals": {}, "events": {}, "clients": 0, "servers": 0, "workers": 0}
    maxwait = len(POOL_GAUGES) - 1           # the last gauge is a time: the oldest waiter's, not a sum
    for fig in figures:
        for row in fig["pools"]:
            pool = out["pools"].setdefault((row[0], row[1]), [0] * len(POOL_GAUGES))
            for i, value in enumerate(row[2:]):
                pool[i] = max(pool[i], value) if i == maxwait else pool[i] + value
        for database, values in fig["totals"].items():
            total = out["totals"].setdefault(database, dict.fromkeys(values, 0))
            for key, value in values.items():
                total[key] += value
        for event, n in fig["events"].items():
            out["events"][event] = out["events"].get(event, 0) + n
        for key in ("clients", "servers", "workers"):
            out[key] += fig[key]
    return out


class ProxyCollector:
    """Metrics of one ProxyServer, computed at scrape time (with ``peers``: and of the other workers')."""

    def __init__(self, server) -> None:
        self.server = server

    def figures(self) -> dict:
        figures = [local_figures(self.server)]
        peers = self.server.peers
        if peers is not None:
            figures += [fig for _, fig in sorted(peers.ask_all({"kind": "figures"}).items())]
        return merge_figures(figures)

    def collect(self):
        fig = self.figures()
        gauges = [GaugeMetricFamily(PREFIX + name, text, labels=["database", "user"])
                  for name, _, text in POOL_GAUGES]
        for (database, user), values in sorted(fig["pools"].items()):
            for family, value in zip(gauges, values):
                family.add_metric([database, user], value)
        yield from gauges
        for name, key, text, _ in STATS_COUNTERS:
            family = CounterMetricFamily(PREFIX + name, text, labels=["database"])
            for database, values in sorted(fig["totals"].items()):
                family.add_metric([database], values[key])
            yield family
        events = CounterMetricFamily(PREFIX + "server_connection_events",
                                     "The pool's server connection events: reuses, parked, reaped, evicted, ...",
                                     labels=["event"])
        for event, n in sorted(fig["events"].items()):
            events.add_metric([event], n)
        yield events
        yield GaugeMetricFamily(PREFIX + "clients", "Clients connected (console included)", value=fig["clients"])
        yield GaugeMetricFamily(PREFIX + "server_connections", "Server connections open (in use or parked)",
                                value=fig["servers"])
        yield GaugeMetricFamily(PREFIX + "workers", "Worker processes whose figures these are (1 without workers)",
                                value=fig["workers"])


class WorkersCollector(ProxyCollector):
    """The worker supervisor's metrics: every worker's figures, asked over the peer channel at each
    scrape and added up; ``threadpool_proxy_workers`` says how many answered."""

    def __init__(self, peers) -> None:
        self.peers = peers

    def figures(self) -> dict:
        return merge_figures([fig for _, fig in sorted(self.peers.ask_all({"kind": "figures"}).items())])


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


class MetricsEndpoint:
    """The HTTP server of ``metrics_listen``: ``start`` binds and serves from a thread, ``stop`` closes.

    ``/metrics`` from ``collector`` (default: ``server``'s ProxyCollector);
    ``/ready`` and ``/live`` from ``readiness`` (readiness.py), when given.
    ``metrics_timeout`` and ``metrics_max_connections`` are read from the
    server's configuration (or from ``config()``, for a worker supervisor, which
    has no server) at each connection (a RELOAD applies to the next).
    """

    def __init__(self, server, listen: str, readiness=None, collector=None, config=None) -> None:
        self.server = server
        self.config = config
        self.host, self.port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector if collector is not None else ProxyCollector(server))
        self.readiness = readiness
        self._httpd: BoundedHTTPServer | None = None
        self._thread = None

    def start(self) -> "MetricsEndpoint":
        self._httpd = BoundedHTTPServer((self.host, self.port), self._render, self._limits, self.readiness)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="threadpool_proxy-metrics",
                                        daemon=True)
        self._thread.start()
        timeout, most = self._limits()
        log.info("metrics on http://%s:%d/metrics%s (no authentication; at most %d connections, %g s each)",
                 self.host, self.port, " (and /ready, /live)" if self.readiness is not None else "", most, timeout)
        return self

    @property
    def http(self) -> BoundedHTTPServer | None:
        """The HTTP server (its counters: served, refused, cut), while running."""
        return self._httpd

    def _limits(self) -> tuple[float, int]:
        config = self.server.config if self.server is not None else self.config()
        return config.metrics_timeout, config.metrics_max_connections

    def _render(self, accept: str) -> tuple[str, bytes]:
        encoder, content_type = choose_encoder(accept)
        return content_type, encoder(self.registry)

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
