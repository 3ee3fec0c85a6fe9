"""The Prometheus endpoint (``metrics_listen``), with prometheus_client.

A collector builds every metric on each scrape from the same
``stats.Observation`` as the admin console's SHOW POOLS and SHOW STATS, so
the two always agree and nothing is counted twice.  Names follow
prometheus-community's pgbouncer_exporter with the prefix ``threadpool_proxy_``
(``threadpool_proxy_pools_client_active_connections`` is its
``pgbouncer_pools_client_active_connections``).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

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


class ProxyCollector:
    """Metrics of one ProxyServer, computed at scrape time."""

    def __init__(self, server) -> None:
        self.server = server

    def collect(self):
        obs = self.server.observe()
        gauges = {attr: GaugeMetricFamily(PREFIX + name, text, labels=["database", "user"])
                  for name, attr, text in POOL_GAUGES}
        for pool in obs.pools():
            for attr, family in gauges.items():
                family.add_metric([pool.database, pool.user], getattr(pool, attr))
        yield from gauges.values()
        for name, key, text, _ in STATS_COUNTERS:
            family = CounterMetricFamily(PREFIX + name, text, labels=["database"])
            for database, values in sorted(obs.database_totals.items()):
                family.add_metric([database], values[key])
            yield family
        events = CounterMetricFamily(PREFIX + "server_connection_events",
                                     "The pool's server connection events: reuses, parked, reaped, evicted, ...",
                                     labels=["event"])
        for event, n in sorted(obs.pool_stats.items()):
            events.add_metric([event], n)
        yield events
        yield GaugeMetricFamily(PREFIX + "clients", "Clients connected (console included)",
                                value=len(obs.clients) + obs.console_clients + obs.login_clients)
        yield GaugeMetricFamily(PREFIX + "server_connections", "Server connections open (in use or parked)",
                                value=obs.open_servers)


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]"), int(port)


class MetricsEndpoint:
    """The HTTP server of ``metrics_listen``: ``start`` binds and serves from a thread, ``stop`` closes."""

    def __init__(self, server, listen: str) -> None:
        self.host, self.port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(server))
        self._httpd = None
        self._thread = None

    def start(self) -> "MetricsEndpoint":
        self._httpd, self._thread = start_http_server(self.port, self.host, registry=self.registry)
        self.port = self._httpd.server_address[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
