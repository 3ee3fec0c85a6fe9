"""Cancel keys: the BackendKeyData a client is given, and what its secret says about who gave it.

A CancelRequest arrives on a new connection, and whatever spreads
connections (the kernel's SO_REUSEPORT between ``workers``, a load balancer
between proxies) may hand it to another process than the one holding the
client.  So the 32-bit secret names its issuer, and the rest of it is random
(``secrets``); the pid is the real backend pid in session mode (drivers
compare it with ``pg_backend_pid()``), so the issuer cannot be written there.

The secret as an unsigned 32-bit integer S (sent big-endian):

* without peering (``peer_id`` 0), as before peering existed:
  ``S = R * n + w``: worker ``w`` of ``n`` worker processes (``n`` 1 without
  workers), R uniform in ``[0, 2**32 // n)``;
* with peering (``peer_id`` p, 1 to PEER_ID_MAX):
  bit 0 is the *fresh* bit: 1 as issued; a proxy that forwards a cancel to the
  peer the key names clears it, and a cleared bit is never forwarded again, so
  a cancel crosses at most one host even when two proxies' ``peers`` lists
  disagree (PgBouncer spends two TTL bits for the same reason);
  bits 1-8 are p; bits 9-31 are ``R * n + w`` as above, R uniform in
  ``[0, 2**23 // n)``.

Random bits left: ``32 - log2(n)`` without peering (32 in one process);
``23 - log2(n)`` with it (23 in one process, 21 with 4 workers).  In
transaction and statement mode the pid is random too (above 2**22, ~31 bits);
in session mode it is the backend's real pid, which other users of the server
can read in pg_stat_activity, so the secret is all a guesser lacks.

Only the issuing proxy decodes the worker (``n`` is its own ``workers``); any
proxy of the group decodes the peer id.  ``route`` says what a proxy does
with a cancel: cancel here, hand it to one of its own workers, forward it to
the peer the key names, or drop it.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import secrets
import threading
from typing import Collection

#: The largest ``peer_id``: the key keeps 8 bits for it.
PEER_ID_MAX = 255

_FRESH = 1                          # bit 0 with peering
_PEER_SHIFT = 1                     # bits 1-8: the peer id
_PEER_MASK = PEER_ID_MAX << _PEER_SHIFT
_ROUTED_SHIFT = 9                   # bits 9-31: the worker and the random part
_ROUTED_SPACE = 2 ** (32 - _ROUTED_SHIFT)

#: Process ids above this are never a server's (Linux's pid_max is at most 2^22),
#: so the proxy's own pids never collide with the real ones session-mode clients get.
PROXY_PID_FLOOR = 2**22


@dataclasses.dataclass(frozen=True)
class KeyOwner:
    """What a secret says: the issuing proxy (0: the layout has no peering), its worker, whether fresh."""

    peer_id: int
    worker: int           # decoded with the receiving proxy's worker count: right only for its own keys
    fresh: bool           # False: a peer already forwarded this cancel once


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """How this proxy (``peer_id``, 0 without peering) and worker (``worker`` of ``workers``) make secrets."""

    peer_id: int = 0
    worker: int = 0
    workers: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.peer_id <= PEER_ID_MAX:
            raise ValueError(f"peer_id {self.peer_id} is not in 0..{PEER_ID_MAX}")
        if not 0 <= self.worker < self.workers:
            raise ValueError(f"worker {self.worker} is not in 0..{self.workers - 1}")

    def new_secret(self) -> bytes:
        """4 bytes naming this proxy and worker; the rest from ``secrets``."""
        n = self.workers
        if not self.peer_id:
            return (secrets.randbelow(2**32 // n) * n + self.worker).to_bytes(4, "big")
        routed = secrets.randbelow(_ROUTED_SPACE // n) * n + self.worker
        return (routed << _ROUTED_SHIFT | self.peer_id << _PEER_SHIFT | _FRESH).to_bytes(4, "big")

    def owner(self, secret: bytes) -> KeyOwner:
        value = int.from_bytes(secret, "big")
        if not self.peer_id:
            return KeyOwner(0, value % self.workers, True)
        return KeyOwner((value & _PEER_MASK) >> _PEER_SHIFT, (value >> _ROUTED_SHIFT) % self.workers,
                        bool(value & _FRESH))

    def canonical(self, secret: bytes) -> bytes:
        """The secret as issued (fresh bit set): what a forwarded copy is compared as."""
        if not self.peer_id or len(secret) != 4:
            return secret
        return bytes(secret[:3]) + bytes([secret[3] | _FRESH])


def forwarded(secret: bytes) -> bytes:
    """The secret a proxy sends on to the peer a key names: its fresh bit cleared."""
    return bytes(secret[:3]) + bytes([secret[3] & ~_FRESH & 0xFF])


class RouteKind(enum.Enum):
    HERE = "here"             # this process gave the key out
    WORKER = "worker"         # another worker process of this proxy did (the unix peer channel)
    PEER = "peer"             # another proxy of the group did (TCP to its listen address)
    DROP = "drop"             # nobody we know did, or it would go round in circles


@dataclasses.dataclass(frozen=True)
class Route:
    kind: RouteKind
    peer_id: int = 0
    worker: int = 0
    why: str = ""             # DROP: a line for the (rate-limited) log
    what: str = ""            # DROP: what the log counts it as


def route(layout: KeyLayout, peer_ids: Collection[int], secret: bytes) -> Route:
    """Where a CancelRequest with ``secret`` goes from this process.

    ``peer_ids``: the ids of ``peers`` (this proxy's own may be among them: one
    list can serve every host).  A key of this proxy goes to the worker it
    names; a fresh key of a known peer goes to that peer; a key of an unknown
    peer, and a forwarded key that names another peer (two proxies' lists
    disagree), are dropped: never forwarded twice.
    """
    owner = layout.owner(secret)
    if not layout.peer_id or owner.peer_id == layout.peer_id:
        if owner.worker != layout.worker:
            return Route(RouteKind.WORKER, owner.peer_id, owner.worker)
        return Route(RouteKind.HERE, owner.peer_id, owner.worker)
    if owner.peer_id not in peer_ids:
        return Route(RouteKind.DROP, owner.peer_id, what="cancel requests of unknown peers",
                     why=f"its key names peer {owner.peer_id}, which is not in peers")
    if not owner.fresh:
        return Route(RouteKind.DROP, owner.peer_id, what="cancel requests forwarded to the wrong peer",
                     why=f"a peer forwarded it here (peer {layout.peer_id}) but its key names peer "
                         f"{owner.peer_id}: check each proxy's peer_id and the addresses in peers")
    return Route(RouteKind.PEER, owner.peer_id)


class CancelKeys:
    """BackendKeyData values given to clients, and the client sessions they belong to.

    The secret is always the proxy's own (``KeyLayout.new_secret``): a client
    never learns a server's secret, and a CancelRequest goes on to whichever
    server connection the client holds when it arrives (in transaction mode
    that changes).  The pid is the real server process id where a client keeps
    one server connection for life (session mode), else a proxy-made one above
    any real pid.
    """

    def __init__(self, layout: KeyLayout | None = None) -> None:
        self.layout = layout or KeyLayout()
        self._lock = threading.Lock()
        self._by_pid: dict[int, tuple[bytes, object]] = {}

    def new_secret(self) -> bytes:
        return self.layout.new_secret()

    def register(self, session, real_pid: int = 0) -> tuple[int, bytes]:
        """A (pid, secret) for ``session``: ``real_pid`` when given and free, else a proxy-made pid."""
        secret = self.new_secret()
        with self._lock:
            if 0 < real_pid and real_pid not in self._by_pid:
                self._by_pid[real_pid] = (secret, session)
                return real_pid, secret
            while True:
                pid = PROXY_PID_FLOOR + 1 + secrets.randbelow(2**31 - 2 - PROXY_PID_FLOOR)
                if pid not in self._by_pid:
                    self._by_pid[pid] = (secret, session)
                    return pid, secret

    def unregister(self, pid: int) -> None:
        with self._lock:
            self._by_pid.pop(pid, None)

    def lookup(self, pid: int, secret: bytes):
        """The session holding (pid, secret), or None; a forwarded copy (fresh bit cleared) counts."""
        with self._lock:
            entry = self._by_pid.get(pid)
        if entry is None or not hmac.compare_digest(entry[0], self.layout.canonical(secret)):
            return None
        return entry[1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_pid)
