"""Which server of a database entry a client's next server connection comes from.

A database entry may list several servers (``nodes``).  Each has its own pool
key (``host:port`` is the key's node part), so its own parked connections and
its own ``pool_size``.  This module knows, per node, what the proxy has learned
about it (up or down, read-only or not, in recovery or not) and picks nodes:

* for reuse, the order in which parked connections of the up nodes are taken
  (any up node's parked connection beats dialing a new one);
* for a new connection, one node by the entry's ``load_balance``:
  round-robin (weighted), least-connections (open connections per weight),
  random (weighted), or ``disable`` (the first node that is up, in the listed
  order, as PgBouncer's ``load_balance_hosts``).  Nodes with a free
  ``pool_size`` slot are preferred to nodes where the client would wait.

Only nodes of the entry's ``role`` (a replica alias) and, as far as is known,
fitting its ``target_session_attrs`` are candidates.  What a node is comes
from the health checks and from every new server connection: PostgreSQL 14+
reports ``in_hot_standby`` and ``default_transaction_read_only`` at login
(libpq decides on the same two); an older server is asked.  A node nobody has
seen yet is tried, and a connection that does not fit is closed.

"Down" is the pool's own record (``BackendIdlePool.mark_down``/``dial_failed``):
one mechanism for failed dials and failed health checks.  Reading it takes no
lock; routing is a hint that the dial itself confirms.
"""

from __future__ import annotations

import itertools
import random
import threading
from typing import Callable, Optional

from . import protocol as pq
from .config import DatabaseConfig, NodeConfig
from .errors import ServerGone
from .logs import get_logger

log = get_logger(__name__)

#: Asked of a server that does not report in_hot_standby (PostgreSQL before 14).
ATTRS_QUERY = "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only')"


def node_names(entry: DatabaseConfig) -> tuple:
    """The host:port of every server of a database entry (a PAUSE/RECONNECT target's node part)."""
    return tuple(n.name for n in entry.nodes)


class NodeState:
    """What the proxy knows of one server: None while it has not been seen."""

    __slots__ = ("name", "in_recovery", "read_only", "checked_at", "check_error")

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_recovery: Optional[bool] = None
        self.read_only: Optional[bool] = None
        self.checked_at = 0.0          # wall clock of the last health check that answered
        self.check_error = ""          # why the last health check failed ("" if it worked)

    @property
    def kind(self) -> str:
        """primary / standby / read-only / unknown, for SHOW DATABASES and the log."""
        if self.in_recovery is None:
            return "unknown"
        if self.in_recovery:
            return "standby"
        return "read-only" if self.read_only else "primary"


def fits(target: str, state: NodeState, role: Optional[str] = None) -> bool:
    """Whether a node may serve ``target_session_attrs``.

    What the node was seen to be decides; a node not seen yet is judged by its
    configured ``role`` (a replica is not tried for read-write or primary, a
    primary not for read-only or standby), else it may (the dial checks).
    """
    if target in ("any", "prefer-standby"):
        return True
    if state.in_recovery is None:
        if role == "replica":
            return target in ("read-only", "standby")
        if role == "primary":
            return target in ("read-write", "primary")
        return True
    if target == "read-write":
        return not state.read_only
    if target == "read-only":
        return bool(state.read_only)
    if target == "primary":
        return not state.in_recovery
    if target == "standby":
        return bool(state.in_recovery)
    return True


def session_fits(target: str, in_recovery: bool, read_only: bool) -> bool:
    """libpq's check of one session against ``target_session_attrs``."""
    if target == "read-write":
        return not read_only
    if target == "read-only":
        return read_only
    if target == "primary":
        return not in_recovery
    if target == "standby":
        return in_recovery
    return True


def query_session_attrs(conn, timeout: float) -> tuple[bool, bool]:
    """(in_recovery, read_only) of a session, asked of the server (PostgreSQL before 14 reports neither)."""
    rows = []

    def on_message(t, body):
        if t == pq.DATA_ROW:
            rows.append(pq.parse_data_row(body))

    conn.send(pq.query(ATTRS_QUERY))
    conn.read_until_ready(timeout, on_message=on_message)
    if not rows or len(rows[0]) < 2:
        raise ServerGone("the server did not say whether it is in recovery")
    in_recovery = rows[0][0] == b"t"
    return in_recovery, in_recovery or rows[0][1] == b"on"


def _on(value: Optional[str]) -> bool:
    return value is not None and value.lower() in ("on", "true", "t", "1", "yes")


class Router:
    """Node states and the choice of a node; one per proxy, shared by every client thread."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self._lock = threading.Lock()
        self._states: dict[str, NodeState] = {}
        self._turns: dict[str, itertools.count] = {}          # entry name -> round-robin position of dials
        self._reuse_turns: dict[str, itertools.count] = {}    # ... and of where reuse starts looking

    # -- what is known --------------------------------------------------------

    def state(self, name: str) -> NodeState:
        state = self._states.get(name)
        if state is None:
            with self._lock:
                state = self._states.setdefault(name, NodeState(name))
        return state

    def is_up(self, name: str) -> bool:
        return not self.pool.is_down(name)

    def learn(self, name: str, in_recovery: bool, read_only: bool, how: str) -> None:
        """Record what ``name`` is; a change is logged (a failover shows here)."""
        state = self.state(name)
        with self._lock:
            before = state.kind
            state.in_recovery, state.read_only = in_recovery, read_only
            after = state.kind
        if before != after:
            if before == "unknown":
                log.info("node %s is a %s (%s)", name, after, how)
            else:
                log.warning("node %s changed from %s to %s (%s)", name, before, after, how)

    def learn_from_login(self, conn, client_settings: dict) -> tuple[bool, bool] | None:
        """(in_recovery, read_only) of a new connection's session from what the server reported, or None.

        The node's state is updated too, unless the client itself set
        default_transaction_read_only (then it says nothing about the node).
        """
        params = conn.params
        hot = params.get("in_hot_standby")
        dtro = params.get("default_transaction_read_only")
        if hot is None or dtro is None:
            return None
        in_recovery = _on(hot)
        read_only = in_recovery or _on(dtro)
        if "default_transaction_read_only" not in client_settings:
            self.learn(conn.node, in_recovery, read_only, "reported at login")
        return in_recovery, read_only

    # -- choosing ---------------------------------------------------------------

    def candidates(self, db: DatabaseConfig) -> list:
        """The entry's nodes that are up and, as far as is known, fit its target, in listed order."""
        target = db.target_session_attrs
        nodes = [n for n in db.usable_nodes if self.is_up(n.name) and fits(target, self.state(n.name), n.role)]
        if target == "prefer-standby":
            standbys = [n for n in nodes if self.state(n.name).in_recovery
                        or (self.state(n.name).in_recovery is None and n.role == "replica")]
            if standbys:
                return standbys
        if db.load_balance == "disable" and nodes:
            return nodes[:1]
        return nodes

    def reuse_order(self, db: DatabaseConfig) -> list:
        """Up, fitting nodes in the order their parked connections are taken (rotating)."""
        nodes = self.candidates(db)
        if len(nodes) > 1:
            start = next(self._turn(db.name, self._reuse_turns)) % len(nodes)
            nodes = nodes[start:] + nodes[:start]
        return nodes

    def for_dial(self, db: DatabaseConfig, open_count: Callable[[NodeConfig], int]) -> Optional[NodeConfig]:
        """The node a new server connection goes to, or None when no node is up (and fits)."""
        nodes = self.candidates(db)
        if len(nodes) <= 1:
            return nodes[0] if nodes else None
        counts = {n.name: open_count(n) for n in nodes}
        free = [n for n in nodes if counts[n.name] < db.pool_size] or nodes
        policy = db.load_balance
        if policy == "least-connections":
            return min(free, key=lambda n: counts[n.name] / n.weight)
        if policy == "random":
            return random.choices(free, weights=[n.weight for n in free])[0]
        weighted = [n for n in free for _ in range(n.weight)]
        return weighted[next(self._turn(db.name)) % len(weighted)]

    def fallback(self, db: DatabaseConfig) -> Optional[NodeConfig]:
        """Every fitting node is down: the one to wait for (the first), so paced dials find it back."""
        target = db.target_session_attrs
        nodes = [n for n in db.usable_nodes if fits(target, self.state(n.name), n.role)]
        return nodes[0] if nodes else None

    def misfits(self, db: DatabaseConfig) -> str:
        """Why no node fits the entry's target, for the client's error."""
        return ", ".join(f"{n.name} is {self.state(n.name).kind}" for n in db.usable_nodes)

    def _turn(self, name: str, turns: Optional[dict] = None) -> itertools.count:
        turns = self._turns if turns is None else turns
        turn = turns.get(name)
        if turn is None:
            with self._lock:
                turn = turns.setdefault(name, itertools.count())
        return turn
