"""threadpool_proxy: a PostgreSQL connection pooler with one thread per client.

Embedding (docs/embedding.md)::

    import threadpool_proxy
    with threadpool_proxy.serve({"listen": {"port": 0},
                                 "databases": {"app": "postgresql://127.0.0.1:5432/app"}}) as proxy:
        print(proxy.address.port, proxy.stats().pools)

The public names below are imported on first use (PEP 562), so that importing
a submodule alone (the pytest plugin, which pytest loads into every run where
the package is installed) does not load the whole proxy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config, ConfigError, load as load_config
    from .embed import Address, Proxy, serve, start
    from .events import Event
    from .pool import BackendIdlePool, pool_key
    from .records import ClientInfo, DatabaseTotals, PoolStats, ProxyStats, ServerInfo, Totals

__version__ = "0.1.0"

#: public name -> (module, its name there)
_PUBLIC = {
    "Config": ("config", "Config"), "ConfigError": ("config", "ConfigError"), "load_config": ("config", "load"),
    "BackendIdlePool": ("pool", "BackendIdlePool"), "pool_key": ("pool", "pool_key"),
    "Event": ("events", "Event"),
    "ProxyStats": ("records", "ProxyStats"), "PoolStats": ("records", "PoolStats"),
    "DatabaseTotals": ("records", "DatabaseTotals"), "ClientInfo": ("records", "ClientInfo"),
    "ServerInfo": ("records", "ServerInfo"), "Totals": ("records", "Totals"),
    "Address": ("embed", "Address"), "Proxy": ("embed", "Proxy"), "serve": ("embed", "serve"),
    "start": ("embed", "start"),
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'threadpool_proxy' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
