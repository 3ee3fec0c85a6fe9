"""Closing like PostgreSQL (issue 20 item 7).

- A client whose server connection is terminated (pg_terminate_backend) gets
  the server's FATAL and then an orderly end of stream (FIN), never a reset
  (RST), even while the proxy still holds bytes the client sent that nobody
  will read; the FATAL is passed on also when the proxy's write to the dead
  server is what failed.
- Junk where a startup packet belongs gets what PostgreSQL gives it: no
  answer, just the close; a Terminate there (node-postgres' ``connect();
  end()`` in one tick) is not even logged.

Transaction mode, more clients than ``pool_size``.  Each test failed on the
code before this work (d407d70): the client saw ECONNRESET after the FATAL,
and an ErrorResponse "invalid length of startup packet".
"""

from __future__ import annotations

import socket
import struct
import threading
import time

from helpers import (_message, parse_error_fields, query, read_until_ready, startup_packet, trust_session,
                     wait_until)

#: A Query message this long is never sent whole: it only fills the path to a busy server.
FLOOD_LENGTH = 512 * 1024 * 1024


def receive_to_end(sock, timeout: float = 10):
    """Everything until the peer ends the stream: (bytes, how) with how "eof" (FIN) or "reset" (RST)."""
    sock.settimeout(timeout)
    data = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data), "reset"
        if not chunk:
            return bytes(data), "eof"
        data += chunk


def messages_of(data: bytes) -> list:
    """[(type, body)] of whole backend messages in ``data``."""
    out, pos = [], 0
    while pos + 5 <= len(data):
        length = struct.unpack_from("!I", data, pos + 1)[0]
        out.append((chr(data[pos]), data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    assert pos == len(data), f"a message cut at byte {pos} of {len(data)}"
    return out


class Traffic:
    """Clients running short transactions in threads (contention for the pool); counts their errors."""

    def __init__(self, proxy, clients: int) -> None:
        self.stop = threading.Event()
        self.done = 0
        self.errors = []
        self.threads = [threading.Thread(target=self._run, args=(proxy,), daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self, proxy) -> None:
        try:
            sock = trust_session(proxy)
            with sock:
                while not self.stop.is_set():
                    query(sock, "BEGIN; SELECT 1; COMMIT")
                    errors = [parse_error_fields(b) for k, b in read_until_ready(sock) if k == "E"]
                    self.errors += errors
                    self.done += 1
        except Exception as exc:       # noqa: BLE001 - asserted by the test
            self.errors.append(exc)

    def running(self) -> bool:
        """True once the clients are past their logins and through some transactions."""
        return wait_until(lambda: self.done >= 10 or self.errors, timeout=30) and not self.errors

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_terminated_client_gets_the_fatal_then_end_of_stream_not_a_reset(pg, proxy_factory):
    """The victim's query sleeps while it floods: the proxy's write to the server blocks, the server is
    terminated (its FATAL waits in the proxy's socket, then the write fails with ECONNRESET), and the
    proxy still holds megabytes the client sent.  The client reads the FATAL, then end of file."""
    proxy = proxy_factory(pool_size=2, auth_type="trust")
    traffic = Traffic(proxy, clients=3)
    assert traffic.running(), traffic.errors
    victim = trust_session(proxy)
    try:
        query(victim, "BEGIN; SELECT pg_backend_pid()")
        pid = int([b for k, b in read_until_ready(victim) if k == "D"][0][6:])
        victim.sendall(_message(b"Q", b"SELECT pg_sleep(60)\0"))
        # One endless Query message behind it: its bytes pile up in the proxy, which cannot pass them on.
        victim.settimeout(0.2)
        sent, blocked_since, stop = [0], [None], threading.Event()

        def flood():
            chunk = b"Q" + struct.pack("!I", FLOOD_LENGTH) + b"SELECT '" + b"x" * 65523
            while not stop.is_set() and sent[0] < FLOOD_LENGTH:
                try:
                    sent[0] += victim.send(chunk if sent[0] == 0 else b"x" * 65536)
                    blocked_since[0] = None
                except socket.timeout:
                    blocked_since[0] = blocked_since[0] or time.monotonic()

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        deadline = time.monotonic() + 30
        while not (blocked_since[0] and time.monotonic() - blocked_since[0] > 0.5):
            assert time.monotonic() < deadline, "the flood never filled the path to the server"
            time.sleep(0.05)
        stop.set()
        sender.join(5)
        assert not sender.is_alive()
        with pg.superuser_conn() as su:
            assert su.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)
        data, how = receive_to_end(victim)
    finally:
        victim.close()
        traffic.finish()
    messages = messages_of(data)
    print(f"\nflooded {sent[0] / 1e6:.1f} MB behind a sleeping query; after pg_terminate_backend the client "
          f"read {[k for k, _ in messages]} then {how}; {traffic.done} transactions of 3 other clients meanwhile")
    assert [k for k, _ in messages] == ["T", "E"], messages        # pg_sleep's RowDescription, the FATAL
    error = parse_error_fields(messages[-1][1])
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "57P01",
                                                    "terminating connection due to administrator command")
    assert how == "eof"
    assert traffic.errors == [] and traffic.done > 0


def test_terminate_instead_of_a_startup_packet_is_closed_quietly(pg, proxy_factory, caplog):
    """node-postgres' connect(); end() in one tick: its Terminate is written before the startup packet."""
    import logging
    caplog.set_level(logging.DEBUG, logger="threadpool_proxy")
    proxy = proxy_factory(pool_size=1, auth_type="trust")
    traffic = Traffic(proxy, clients=2)
    assert traffic.running(), traffic.errors
    try:
        outcomes = []
        for after in (b"", startup_packet({"user": "trustuser", "database": "appdb"})):
            with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
                sock.sendall(_message(b"X", b"") + after)
                sock.shutdown(socket.SHUT_WR)           # as node's stream.end()
                outcomes.append(receive_to_end(sock))
    finally:
        traffic.finish()
    assert outcomes == [(b"", "eof"), (b"", "eof")]
    assert proxy.server.junk_log.total["bad startup"] == 0
    assert not [r for r in caplog.records if "startup packet" in r.getMessage() and r.levelno >= logging.INFO]
    assert traffic.errors == [] and traffic.done > 0


def test_an_invalid_startup_length_gets_what_postgresql_gives_it(pg, proxy_factory):
    """PostgreSQL logs "invalid length of startup packet" and sends nothing (COMMERROR); so does the proxy."""
    proxy = proxy_factory(pool_size=1, auth_type="trust")
    seen = {}
    for name, target in (("postgresql", pg), ("proxy", proxy)):
        for length in (4, 2**31, 10001):
            with socket.create_connection((target.host, target.port), timeout=10) as sock:
                sock.sendall(struct.pack("!I", length) + b"\0" * 16)
                sock.shutdown(socket.SHUT_WR)
                seen[name, length] = receive_to_end(sock)
    assert seen[("postgresql", 2**31)][0] == b""            # what PostgreSQL answers: nothing
    for length in (4, 2**31, 10001):
        assert seen[("proxy", length)] == (b"", "eof"), (length, seen)
        assert seen[("proxy", length)][0] == seen[("postgresql", length)][0]
    assert proxy.server.junk_log.total["bad startup"] == 3
