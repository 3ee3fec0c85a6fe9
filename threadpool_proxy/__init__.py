"""threadpool_proxy: a PostgreSQL connection pooler with one thread per client.

Embedding (docs/embedding.md)::

    import threadpool_proxy
    with threadpool_proxy.serve({"listen": {"port": 0},
                                 "databases": {"app": "postgresql://127.0.0.1:5432/app"}}) as proxy:
        print(proxy.address.port, proxy.stats().pools)
"""

from .config import Config, ConfigError, load as load_config
from .pool import BackendIdlePool, pool_key
from .events import Event
from .records import ClientInfo, DatabaseTotals, PoolStats, ProxyStats, ServerInfo, Totals
from .embed import Address, Proxy, serve, start

__all__ = ["Config", "ConfigError", "load_config", "BackendIdlePool", "pool_key", "Event", "Address", "Proxy",
           "serve", "start", "ProxyStats", "PoolStats", "DatabaseTotals", "ClientInfo", "ServerInfo", "Totals"]
__version__ = "0.1.0"
