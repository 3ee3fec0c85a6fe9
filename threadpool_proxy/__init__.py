"""threadpool_proxy: a PostgreSQL connection pooler with one thread per client.

Embedding::

    import threadpool_proxy
    with threadpool_proxy.serve({"listen": {"port": 0},
                                 "databases": {"app": {"host": "127.0.0.1", "port": 5432}}}) as proxy:
        print(proxy.port)
"""

from .config import Config, ConfigError, load as load_config
from .pool import BackendIdlePool, pool_key
from .embed import Proxy, serve, start

__all__ = ["Config", "ConfigError", "load_config", "BackendIdlePool", "pool_key", "Proxy", "serve", "start"]
__version__ = "0.1.0"
