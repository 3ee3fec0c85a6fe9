"""The auth_query cache: verifiers fetched from PostgreSQL, bounded in number and in time.

Keyed by (server, database the query ran in, user), so a verifier fetched
for one database never answers for another.  A client picks the user name
it logs in with, so the cache must not grow with the names it tries:

* found users (a verifier, or a role without one) live ``ttl`` seconds, at
  most ``size`` of them, the least recently used dropped first: only roles
  that exist on the server get here, and an attacker cannot make those;
* unknown users are remembered too (a flood of one name asks PostgreSQL
  once), but only ``NEGATIVE_SECONDS`` and at most ``NEGATIVE_SIZE`` of
  them, in a table of their own, so a flood of invented names neither grows
  the cache nor pushes real users out of it.

No I/O here; the caller runs the query.  Thread-safe.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Hashable, Optional, Tuple

#: How long "no such user" is believed (at most; never longer than the cache's ttl).
NEGATIVE_SECONDS = 5.0
#: Most unknown users remembered at once.
NEGATIVE_SIZE = 256

#: What ``get`` returns when the cache does not know (a cached None means "no such user").
MISS = object()


class _LRU:
    """Entries key -> (value, expires at), least recently used first; at most ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: "collections.OrderedDict[Hashable, Tuple[Any, float]]" = collections.OrderedDict()

    def get(self, key: Hashable, now: float) -> Any:
        hit = self.entries.get(key)
        if hit is None:
            return MISS
        if hit[1] <= now:
            del self.entries[key]
            return MISS
        self.entries.move_to_end(key)
        return hit[0]

    def put(self, key: Hashable, value: Any, expires: float) -> None:
        self.entries[key] = (value, expires)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class VerifierCache:
    """auth_query results per (server, database, user): ``get``, ``put``, ``clear``, ``len()``."""

    def __init__(self, ttl: float, size: int, negative_ttl: float = NEGATIVE_SECONDS,
                 negative_size: int = NEGATIVE_SIZE) -> None:
        self.ttl = ttl
        self.negative_ttl = min(negative_ttl, ttl)
        self._lock = threading.Lock()
        self._found = _LRU(size)
        self._unknown = _LRU(negative_size)

    def get(self, key: Hashable, now: Optional[float] = None) -> Any:
        """The cached value of ``key`` (None: no such user), or MISS."""
        now = time.monotonic() if now is None else now
        with self._lock:
            value = self._found.get(key, now)
            return value if value is not MISS else self._unknown.get(key, now)

    def put(self, key: Hashable, value: Any, found: bool, now: Optional[float] = None) -> None:
        """Remember ``value`` for ``key``; ``found`` is False for a user the server does not have."""
        if self.ttl <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            if found:
                self._unknown.entries.pop(key, None)
                self._found.put(key, value, now + self.ttl)
            else:
                self._found.entries.pop(key, None)
                self._unknown.put(key, value, now + self.negative_ttl)

    def clear(self) -> None:
        with self._lock:
            self._found.entries.clear()
            self._unknown.entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._found.entries) + len(self._unknown.entries)
