"""max_user_connections and max_db_connections shared by pools that are all busy: a pool whose
clients never let their connections rest (each released one goes straight to its own next
client, none is ever parked for another pool to evict) does not keep the other pool of its user
or database waiting: the next connection it releases goes to the pool that has none.
"""

from __future__ import annotations

import functools
import threading
import time

import helpers
from helpers import wait_until

connect = functools.partial(helpers.connect, prepare_threshold=None)


class Busy:
    """``clients`` threads, each running short transactions back to back until stopped."""

    def __init__(self, clients: list) -> None:
        self.clients = clients
        self.counts = [0] * len(clients)
        self.errors: list = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(len(clients))]
        for t in self.threads:
            t.start()

    def _work(self, i: int) -> None:
        conn = self.clients[i]
        try:
            while not self.stopping.is_set():
                with conn.transaction():
                    conn.execute("SELECT pg_sleep(0.002)")
                self.counts[i] += 1
        except Exception as exc:                    # noqa: BLE001 - every error fails the test
            self.errors.append(exc)

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)
        for conn in self.clients:
            conn.close()


def _open_of(proxy, user: str) -> int:
    """Server connections the proxy holds open (in use, kept or parked) for ``user``, all databases."""
    return sum(n for key, n in proxy.pool.snapshot()["open"].items() if key.split("\0")[1] == user)


def _served_within(conn, seconds: float) -> float:
    t0 = time.monotonic()
    with conn.transaction():
        assert conn.execute("SELECT current_database()").fetchone()[0] == "otherdb"
    took = time.monotonic() - t0
    assert took < seconds, f"the otherdb client waited {took:.1f} s"
    return took


def test_a_busy_database_does_not_starve_the_users_other_database(pg, proxy_factory, auth_file):
    """max_user_connections 2: app@appdb's 8 clients keep both connections busy (6 always waiting);
    app@otherdb's client is still served at once, on a connection its user's cap lets it have."""
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, pool_size=3, max_user_connections=2,
                          query_wait_timeout=60)
    busy = Busy([connect(pg, proxy) for _ in range(8)])
    try:
        assert wait_until(lambda: min(busy.counts) >= 3 or busy.errors, timeout=30), busy.counts
        assert wait_until(lambda: len(pg.backend_pids(user="app", dbname="appdb")) == 2, timeout=10)
        other = connect(pg, proxy, dbname="otherdb", autocommit=False)
        try:
            took = []
            for _ in range(3):
                took.append(_served_within(other, 10.0))
                assert _open_of(proxy, "app") <= 2               # the cap holds all along
            # PostgreSQL ends the backend of the connection closed for otherdb a moment after its close
            assert wait_until(lambda: len(pg.backend_pids(user="app")) <= 2, timeout=5), pg.backend_pids(user="app")
            # and appdb goes on too, on what the cap leaves it
            marks = list(busy.counts)
            assert wait_until(lambda: all(c >= m + 3 for c, m in zip(busy.counts, marks)) or busy.errors,
                              timeout=30), (marks, busy.counts)
        finally:
            other.close()
        assert proxy.pool.snapshot()["stats"]["evicted_for_limit"] >= 1
        print(f"\notherdb beside a busy appdb under max_user_connections 2: served in "
              f"{', '.join(f'{t:.3f}' for t in took)} s")
    finally:
        busy.stop()
    assert not busy.errors, busy.errors[:3]


def test_a_busy_user_does_not_starve_the_other_user_of_the_database(pg, proxy_factory, auth_file):
    """The same with max_db_connections 2: app's 8 clients of appdb, then one of other's."""
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, pool_size=3, query_wait_timeout=60,
                          databases={"appdb": {"host": pg.host, "port": pg.port, "max_db_connections": 2},
                                     "*": {"host": pg.host, "port": pg.port}})
    busy = Busy([connect(pg, proxy) for _ in range(8)])
    try:
        assert wait_until(lambda: min(busy.counts) >= 3 or busy.errors, timeout=30), busy.counts
        with connect(pg, proxy, user="other", autocommit=False) as other:
            t0 = time.monotonic()
            for _ in range(3):
                with other.transaction():
                    assert other.execute("SELECT current_user").fetchone() == ("other",)
                assert sum(n for key, n in proxy.pool.snapshot()["open"].items()
                           if key.split("\0")[2] == "appdb") <= 2
            assert time.monotonic() - t0 < 10.0
            assert wait_until(lambda: len(pg.backend_pids(dbname="appdb")) <= 2, timeout=5)
    finally:
        busy.stop()
    assert not busy.errors, busy.errors[:3]
