"""LISTEN in transaction mode: the proxy listens for its clients and fans out (issue 20, item 2).

A pooled client holds a server connection only during its transactions; a
listener must still hear every notification on its channels, with the payload
and with the sender's pid as the sender's client was told, promptly when idle,
after its current answer when busy, and none of a channel it did not LISTEN
to.  With a proxy that logs in by itself (here scram-sha-256 and an auth
file) one listening connection per user and database does it; with auth_type
passthrough the client's own connection listens and the client is pinned.
"""

from __future__ import annotations

import asyncio
import threading
import time

import psycopg
import pytest

from helpers import PASSWORDS, connect, wait_until

CHANNEL = "tpp_fan"
SENDERS = 4
EACH = 250            # 4 x 250 = 1,000 notifications


@pytest.fixture
def fan_proxy(proxy_factory, auth_file):
    def make(**overrides):
        settings = dict(auth_type="scram-sha-256", auth_file=auth_file, pool_size=2,
                        admin_users=["app"])
        settings.update(overrides)
        return proxy_factory(**settings)
    return make


def listener_backends(pg) -> list:
    with pg.superuser_conn() as su:
        return su.execute("SELECT pid FROM pg_stat_activity WHERE application_name = 'threadpool_proxy listener'"
                          ).fetchall()


def send_all(pg, proxy, channel=CHANNEL, others=True) -> dict:
    """SENDERS clients each notify ``channel`` EACH times (and another channel too): payload -> told pid."""
    sent: dict = {}
    errors: list = []
    lock = threading.Lock()

    def sender(i: int) -> None:
        try:
            with connect(pg, proxy) as conn:
                for k in range(EACH):
                    payload = f"s{i}-{k}"
                    if k % 2:
                        conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
                    else:
                        with conn.transaction():
                            conn.execute(f"NOTIFY {channel}, '{payload}'")
                    if others and k % 10 == 0:
                        conn.execute("NOTIFY tpp_unheard, 'not for the listener'")
                    with lock:
                        sent[payload] = conn.info.backend_pid
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    return sent


def test_a_psycopg_listener_gets_1000_of_1000_with_payload_and_sender_pid(pg, fan_proxy):
    proxy = fan_proxy()
    with connect(pg, proxy) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        busy = [connect(pg, proxy) for _ in range(2)]       # keep the pool's two connections in use
        stop = threading.Event()

        def churn(conn):
            while not stop.is_set():
                conn.execute("SELECT pg_sleep(0.001)")

        churners = [threading.Thread(target=churn, args=(c,), daemon=True) for c in busy]
        for t in churners:
            t.start()
        got = []
        sending = threading.Thread(target=lambda: got.append(send_all(pg, proxy)))
        sending.start()
        received = list(listener.notifies(timeout=120, stop_after=SENDERS * EACH))
        sending.join(240)
        stop.set()
        for t in churners:
            t.join(30)
        for c in busy:
            c.close()
        sent = got[0]
        assert len(received) == SENDERS * EACH
        assert {n.channel for n in received} == {CHANNEL}          # nothing of tpp_unheard
        assert sorted(n.payload for n in received) == sorted(sent)
        wrong = [(n.payload, n.pid, sent[n.payload]) for n in received if n.pid != sent[n.payload]]
        assert wrong == []
        # idle between its transactions: it holds no server connection and is not pinned
        assert listener.execute("SELECT 1").fetchone() == (1,)
        assert len(listener_backends(pg)) == 1


def test_an_asyncpg_listener_busy_with_queries_gets_them_all_too(pg, fan_proxy):
    asyncpg = pytest.importorskip("asyncpg")
    proxy = fan_proxy()
    received = []

    async def main():
        conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user="app", password=PASSWORDS["app"],
                                     database="appdb")
        try:
            await conn.add_listener(CHANNEL, lambda c, pid, channel, payload: received.append((payload, pid)))
            loop = asyncio.get_running_loop()
            sending = loop.run_in_executor(None, send_all, pg, proxy)
            while not sending.done() or len(received) < SENDERS * EACH:
                # a long answer now and then: what arrives meanwhile comes after it, whole
                rows = await conn.fetch("SELECT repeat('x', 100) AS r FROM generate_series(1, 2000)")
                assert len(rows) == 2000 and rows[-1]["r"] == "x" * 100
                await asyncio.sleep(0.01)
                if sending.done() and len(received) < SENDERS * EACH:
                    await asyncio.sleep(0.2)
                    if len(received) < SENDERS * EACH and time.monotonic() > deadline:
                        break
            return await sending
        finally:
            await conn.close()

    deadline = time.monotonic() + 180
    sent = asyncio.run(asyncio.wait_for(main(), 240))
    assert len(received) == SENDERS * EACH
    assert sorted(p for p, _ in received) == sorted(sent)
    assert [(p, pid) for p, pid in received if pid != sent[p]] == []


def test_notifications_reach_an_idle_listener_promptly(pg, fan_proxy):
    proxy = fan_proxy()
    with connect(pg, proxy) as listener, connect(pg, proxy) as sender:
        listener.execute("LISTEN tpp_prompt")
        for i in range(5):
            t0 = time.monotonic()
            sender.execute("NOTIFY tpp_prompt, %s" % psycopg.sql.Literal(str(i)).as_string(sender))
            got = list(listener.notifies(timeout=10, stop_after=1))
            assert [n.payload for n in got] == [str(i)]
            assert time.monotonic() - t0 < 2.0


def test_unlisten_and_leaving_stop_it_and_the_listening_connection_closes(pg, fan_proxy):
    proxy = fan_proxy()
    with connect(pg, proxy) as listener, connect(pg, proxy) as sender:
        listener.execute("LISTEN tpp_a")
        listener.execute('LISTEN "tpp_B"')
        assert len(listener_backends(pg)) == 1
        listener.execute("UNLISTEN tpp_a")
        sender.execute("NOTIFY tpp_a, 'gone'")
        sender.execute('NOTIFY "tpp_B", \'kept\'')
        assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["kept"]
        assert list(listener.notifies(timeout=0.5)) == []
        listener.execute("UNLISTEN *")
        assert wait_until(lambda: listener_backends(pg) == [])      # nobody listens: it closes
        listener.execute("LISTEN tpp_a")
    assert wait_until(lambda: listener_backends(pg) == [])          # the client left


def test_a_fanned_out_listener_is_not_pinned(pg, fan_proxy):
    proxy = fan_proxy(pool_size=1)
    with connect(pg, proxy) as listener, connect(pg, proxy) as other:
        listener.execute("LISTEN tpp_free")
        for _ in range(3):                                  # the one connection goes back and forth
            assert other.execute("SELECT 1").fetchone() == (1,)
            assert listener.execute("SELECT 2").fetchone() == (2,)
        with connect(pg, proxy, dbname="threadpool_proxy") as console:
            rows = console.execute("SHOW CLIENTS").fetchall()
        assert {row[-1] for row in rows} <= {""}
        other.execute("NOTIFY tpp_free, 'x'")
        assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["x"]


def test_with_passthrough_the_listener_is_pinned_and_hears_everything(pg, proxy_factory):
    proxy = proxy_factory(pool_size=2, admin_users=["app"])
    with connect(pg, proxy) as listener, connect(pg, proxy) as sender, connect(pg, proxy) as other:
        listener.execute("LISTEN tpp_pinned_listen")
        with connect(pg, proxy, dbname="threadpool_proxy") as console:
            cur = console.execute("SHOW CLIENTS")
            pinned = [row[-1] for row in cur.fetchall()]
        assert pinned.count("listen") == 1
        assert other.execute("SELECT 1").fetchone() == (1,)     # the pool's other connection serves the rest
        for i in range(20):
            sender.execute(f"NOTIFY tpp_pinned_listen, '{i}'")
        got = list(listener.notifies(timeout=20, stop_after=20))
        assert [n.payload for n in got] == [str(i) for i in range(20)]
        assert {n.pid for n in got} == {sender.info.backend_pid}


def test_a_terminated_listening_connection_ends_its_clients(pg, fan_proxy, caplog):
    """As a listening session whose backend is terminated: the client is disconnected (it would
    otherwise miss notifications without knowing)."""
    proxy = fan_proxy()
    caplog.set_level("WARNING", logger="threadpool_proxy.listen")
    with connect(pg, proxy) as listener:
        listener.execute("LISTEN tpp_lost")
        (pid,), = listener_backends(pg)
        with pg.superuser_conn() as su:
            su.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(psycopg.OperationalError):
            for _ in range(50):
                list(listener.notifies(timeout=0.2))
                listener.execute("SELECT 1")
    assert any("its 1 clients are disconnected" in r.getMessage() for r in caplog.records)


def test_listen_inside_a_transaction_block_goes_to_the_server_and_pins(pg, fan_proxy):
    proxy = fan_proxy()
    with connect(pg, proxy) as listener, connect(pg, proxy) as sender:
        with listener.transaction():
            listener.execute("LISTEN tpp_in_block")
        sender.execute("NOTIFY tpp_in_block, 'y'")
        got = list(listener.notifies(timeout=10, stop_after=1))
        assert [(n.payload, n.pid) for n in got] == [("y", sender.info.backend_pid)]
        assert listener.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (1,)


def test_listen_in_the_extended_protocol_is_taken_over_too(pg, fan_proxy):
    """An unnamed Parse/Bind/Describe/Execute/Sync of LISTEN (pg8000, node-postgres with
    parameters); asyncpg's named one is the test above."""
    proxy = fan_proxy()
    with connect(pg, proxy) as listener, connect(pg, proxy) as sender:
        result = listener.pgconn.exec_params(b"LISTEN tpp_extended", [])
        assert result.command_status == b"LISTEN"
        assert listener.execute("SELECT count(*) FROM pg_listening_channels()").fetchone() == (0,)  # not pinned
        sender.execute("NOTIFY tpp_extended, 'ext'")
        assert [n.payload for n in listener.notifies(timeout=10, stop_after=1)] == ["ext"]
        assert listener.pgconn.exec_params(b"UNLISTEN tpp_extended", []).command_status == b"UNLISTEN"
        sender.execute("NOTIFY tpp_extended, 'gone'")
        assert list(listener.notifies(timeout=0.5)) == []


def test_statement_mode_listens_through_the_proxy_too(pg, fan_proxy):
    proxy = fan_proxy(pool_mode="statement", pool_size=1)
    with connect(pg, proxy) as listener, connect(pg, proxy) as sender:
        listener.execute("LISTEN tpp_stmt")
        for i in range(3):
            sender.execute("SELECT pg_notify('tpp_stmt', %s)", (str(i),))
            assert listener.execute("SELECT 1").fetchone() == (1,)     # the one connection is shared
        got = list(listener.notifies(timeout=10, stop_after=3))
        assert [(n.payload, n.pid) for n in got] == [(str(i), sender.info.backend_pid) for i in range(3)]
