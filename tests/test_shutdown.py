"""Stopping the proxy: SIGTERM lets running transactions finish (shutdown_timeout), SIGINT stops at once,
a second signal forces the stop; SHUTDOWN WAIT_FOR_SERVERS on the console takes the same path as SIGTERM.

The signal tests run ``python -m threadpool_proxy -c FILE`` as a real subprocess.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import psycopg
import pytest
import yaml

from helpers import wait_until
from threadpool_proxy.pgcluster import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def port_open(port) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class CliProxy:
    """The proxy as a subprocess on a free port, with ``settings`` in its config file."""

    def __init__(self, pg, tmp_path, **settings) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        conf = tmp_path / "proxy.yaml"
        raw = {"listen": {"host": self.host, "port": self.port}, "pool_mode": "transaction", "pool_size": 5,
               "databases": {"*": {"host": pg.host, "port": pg.port}}}
        raw.update(settings)
        conf.write_text(yaml.safe_dump(raw))
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-m", "threadpool_proxy", "-c", str(conf)], cwd=REPO,
                                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert wait_until(lambda: port_open(self.port) or self.proc.poll() is not None, timeout=20)
        assert self.proc.poll() is None, self.proc.communicate()

    def signal(self, signum) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)


@pytest.fixture
def cli(pg, tmp_path):
    started = []

    def start(**settings):
        proxy = CliProxy(pg, tmp_path, **settings)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.kill()


@pytest.fixture
def table(pg):
    """A fresh table of app's in appdb: (name, a direct connection as app)."""
    name = "shutdown_" + uuid.uuid4().hex[:8]
    direct = psycopg.connect(pg.dsn(), autocommit=True)
    direct.execute(f"CREATE TABLE {name} (v int)")
    yield name, direct
    try:
        direct.execute("SET lock_timeout = '10s'")      # a failed test may leave a transaction holding it
        direct.execute(f"DROP TABLE IF EXISTS {name}")
    except psycopg.Error:
        pass
    direct.close()


def connect(pg, proxy, **params):
    return psycopg.connect(pg.dsn(host=proxy.host, port=proxy.port, **params), autocommit=True,
                           prepare_threshold=None)


def shutdown_error(conn, sql="SELECT 1"):
    """The error ``sql`` gets on a connection the proxy ended while shutting down."""
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute(sql)
    return str(info.value)


# -- SIGTERM: running transactions finish ----------------------------------------

def test_sigterm_lets_a_running_transaction_commit_then_exits_zero(pg, cli, table):
    name, direct = table
    proxy = cli(shutdown_timeout=60)
    busy = connect(pg, proxy)
    idle = connect(pg, proxy)
    assert idle.execute("SELECT 1").fetchone() == (1,)
    busy.execute("BEGIN")
    busy.execute(f"INSERT INTO {name} VALUES (1)")
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    # New clients are refused while the transaction runs on.
    assert wait_until(lambda: not port_open(proxy.port), timeout=10), "still accepting after SIGTERM"
    with pytest.raises(psycopg.OperationalError):
        connect(pg, proxy, connect_timeout=3)
    # The client between transactions is told why and disconnected, without waiting for the other.
    assert "shutting down" in shutdown_error(idle)
    time.sleep(1.0)
    assert proxy.proc.poll() is None, "the proxy exited with a transaction still running"
    busy.execute("SELECT pg_sleep(0.5)")
    busy.execute(f"INSERT INTO {name} VALUES (2)")
    busy.execute("COMMIT")
    code, err = proxy.wait(timeout=30)
    print(f"\nproxy exited {time.monotonic() - t0:.2f} s after SIGTERM")
    assert code == 0, err
    assert "Traceback" not in err, err
    assert direct.execute(f"SELECT array_agg(v ORDER BY v) FROM {name}").fetchone() == ([1, 2],)
    with pytest.raises(psycopg.OperationalError):         # disconnected once its transaction ended
        busy.execute("SELECT 1")
    # Every server connection of the proxy is gone.
    assert wait_until(lambda: not pg.backend_pids(user="app", dbname="appdb") - {direct.info.backend_pid})


def test_sigterm_shutdown_timeout_ends_a_transaction_that_does_not(pg, cli, table):
    name, direct = table
    proxy = cli(shutdown_timeout=1.5)
    stuck = connect(pg, proxy)
    stuck.execute("BEGIN")
    stuck.execute(f"INSERT INTO {name} VALUES (1)")
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    code, err = proxy.wait(timeout=30)
    took = time.monotonic() - t0
    assert code == 0, err
    assert 1.2 < took < 15, took
    assert "shutdown_timeout" in err
    assert "shutting down" in shutdown_error(stuck, "COMMIT")
    assert direct.execute(f"SELECT count(*) FROM {name}").fetchone() == (0,)      # rolled back


def test_a_second_signal_stops_at_once(pg, cli):
    proxy = cli(shutdown_timeout=120)
    stuck = connect(pg, proxy)
    stuck.execute("BEGIN")
    proxy.signal(signal.SIGTERM)
    assert wait_until(lambda: not port_open(proxy.port), timeout=10)
    time.sleep(0.5)
    assert proxy.proc.poll() is None
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    code, err = proxy.wait(timeout=30)
    assert code == 0, err
    assert time.monotonic() - t0 < 10
    assert "shutting down" in shutdown_error(stuck, "COMMIT")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_sigint_and_sigquit_stop_at_once(pg, cli, table, signum):
    name, direct = table
    proxy = cli(shutdown_timeout=120)
    busy = connect(pg, proxy)
    busy.execute("BEGIN")
    busy.execute(f"INSERT INTO {name} VALUES (1)")
    t0 = time.monotonic()
    proxy.signal(signum)
    code, err = proxy.wait(timeout=30)
    assert code == 0, err
    assert time.monotonic() - t0 < 10
    assert "shutting down" in shutdown_error(busy, "COMMIT")
    assert direct.execute(f"SELECT count(*) FROM {name}").fetchone() == (0,)


def test_sigterm_in_session_mode_waits_for_the_transaction_of_each_session(pg, cli, table):
    name, direct = table
    proxy = cli(pool_mode="session", shutdown_timeout=60)
    busy = connect(pg, proxy)
    idle = connect(pg, proxy)
    busy.execute("BEGIN")
    busy.execute(f"INSERT INTO {name} VALUES (1)")
    proxy.signal(signal.SIGTERM)
    assert wait_until(lambda: not port_open(proxy.port), timeout=10)
    time.sleep(0.5)                        # the drain asks each client to leave right after closing the port
    assert "shutting down" in shutdown_error(idle)
    assert proxy.proc.poll() is None
    busy.execute("COMMIT")
    code, err = proxy.wait(timeout=30)
    assert code == 0, err
    assert direct.execute(f"SELECT count(*) FROM {name}").fetchone() == (1,)


# -- the console's SHUTDOWN WAIT_FOR_SERVERS: the same path, in process ------------------

def test_console_shutdown_wait_for_servers_waits_for_transactions(pg, proxy_factory, table):
    name, direct = table
    proxy = proxy_factory(admin_users=["app"], pool_size=1, shutdown_timeout=60)
    busy = connect(pg, proxy)
    busy.execute("BEGIN")
    busy.execute(f"INSERT INTO {name} VALUES (1)")
    outcome = {}

    def wait_for_a_server():
        try:
            with connect(pg, proxy) as waiter:      # pool_size 1: its login waits for busy's connection
                waiter.execute("SELECT 1")
            outcome["result"] = "ran"
        except psycopg.OperationalError as exc:
            outcome["result"] = str(exc)

    t = threading.Thread(target=wait_for_a_server)
    t.start()
    assert wait_until(lambda: proxy.pool.snapshot()["stats"]["waits"] > 0)
    with connect(pg, proxy, dbname="pgbouncer") as console:
        with pytest.raises(psycopg.errors.SyntaxError):
            console.execute("SHUTDOWN WAIT_FOR_CLIENTS")
        assert console.execute("SHUTDOWN WAIT_FOR_SERVERS").statusmessage == "SHUTDOWN"
    t.join(10)
    assert "shutting down" in outcome.get("result", ""), outcome
    assert proxy.stopping and not proxy.stopped
    busy.execute(f"INSERT INTO {name} VALUES (2)")
    busy.execute("COMMIT")
    assert wait_until(lambda: proxy.stopped, timeout=20)
    assert direct.execute(f"SELECT count(*) FROM {name}").fetchone() == (2,)


def test_sigterm_to_the_supervisor_of_workers_lets_transactions_commit(pg, cli, table):
    name, direct = table
    proxy = cli(workers=2, pool_size=10, query_wait_timeout=10, shutdown_timeout=60)
    busy = [connect(pg, proxy) for _ in range(4)]           # spread over both workers by the kernel
    for i, conn in enumerate(busy):
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {name} VALUES ({i})")
    proxy.signal(signal.SIGTERM)
    assert wait_until(lambda: not port_open(proxy.port), timeout=10), "still accepting after SIGTERM"
    time.sleep(0.5)
    assert proxy.proc.poll() is None
    for conn in busy:
        conn.execute("COMMIT")
    code, err = proxy.wait(timeout=30)
    assert code == 0, err
    assert direct.execute(f"SELECT count(*) FROM {name}").fetchone() == (4,)
