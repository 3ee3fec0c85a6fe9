"""``--demo``: a throwaway PostgreSQL from this machine's own binaries, for trying the proxy.

It initialises a cluster in a temporary directory (see :mod:`threadpool_proxy.pgcluster`:
as the ``postgres`` OS user when run as root, since PostgreSQL refuses to run
as root), requires SCRAM-SHA-256 on TCP, creates the role ``demo`` (password
``demo``) and the database ``demo``, and removes everything again on stop.
"""

from __future__ import annotations

from .pgcluster import PgCluster


class DemoCluster:
    """``start()`` -> the proxy configuration (a dict), ``banner(proxy_port)``, ``stop()``."""

    def __init__(self) -> None:
        self.cluster = PgCluster(prefix="threadpool_proxy_demo_")   # raises RuntimeError without binaries

    @property
    def port(self) -> int | None:
        return self.cluster.port

    def start(self) -> dict:
        """Start the cluster and create the demo role and database; errors are one-line RuntimeErrors."""
        self.cluster.start()
        self.cluster.sql("CREATE ROLE demo LOGIN PASSWORD 'demo'", "CREATE DATABASE demo OWNER demo")
        return {"listen": {"host": "127.0.0.1", "port": 6432}, "pool_mode": "transaction", "pool_size": 10,
                "databases": {"*": {"host": self.cluster.host, "port": self.cluster.port}}}

    def banner(self, proxy_port: int) -> str:
        return (f"threadpool_proxy demo: PostgreSQL on 127.0.0.1:{self.port}, proxy on 127.0.0.1:{proxy_port} "
                f"(transaction mode)\n"
                f"connect with:  PGPASSWORD=demo psql -h 127.0.0.1 -p {proxy_port} -U demo demo\n"
                f"stop with Ctrl-C (the demo cluster is deleted)")

    def stop(self) -> None:
        """Stop the server and delete the cluster (safe to call twice)."""
        self.cluster.stop()
