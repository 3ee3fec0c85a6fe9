"""Refusing like PostgreSQL (issue 22 item 5): a client turned away over
max_client_conn, or for want of file descriptors, has its SSLRequest answered
and its startup packet read before it is told why, so libpq with its default
sslmode=prefer shows the 53300 text, not "server sent an error response during
SSL exchange".  Real psql and psycopg clients; raw sockets for the order of the
bytes and the bounds.
"""

from __future__ import annotations

import os
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import types

import psycopg
import pytest
import yaml

from helpers import (connect, gssenc_request, parse_error_fields, psql, raw_login, ssl_request, startup_packet,
                     wait_until)
from threadpool_proxy.pgcluster import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: What libpq prints when the answer to its SSLRequest is an ErrorResponse (the bug this guards against).
SSL_EXCHANGE = "error response during SSL exchange"


def silent(proxy) -> socket.socket:
    """A connection that sends nothing (it holds a refusal slot until its time is up)."""
    return socket.create_connection((proxy.host, proxy.port), timeout=10)


def read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the proxy sends until it closes (or ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return data
            data += chunk
    except (socket.timeout, ConnectionResetError):
        return data


def first_bytes_after(socks: list, opened: list, timeout: float) -> list:
    """Seconds from each socket's opening to its first readable byte (or end of file), all watched at once."""
    poller = select.poll()
    index = {s.fileno(): i for i, s in enumerate(socks)}
    for fd in index:
        poller.register(fd, select.POLLIN)
    told = [None] * len(socks)
    end = time.monotonic() + timeout
    while any(t is None for t in told) and time.monotonic() < end:
        for fd, _ in poller.poll(100):
            told[index[fd]] = time.monotonic() - opened[index[fd]]
            poller.unregister(fd)
    return told


def error_text(data: bytes) -> dict:
    """The fields of the ErrorResponse in ``data`` (its first message must be one)."""
    assert data[:1] == b"E", data
    length = struct.unpack("!I", data[1:5])[0]
    return parse_error_fields(data[5:1 + length])


# -- over max_client_conn -------------------------------------------------------

def test_psql_with_sslmode_prefer_sees_max_client_conn_while_others_are_being_refused(pg, proxy_factory):
    """20 silent connections are being turned away (the old limit of such was 16: beyond it the
    error went out in place of the SSLRequest's answer); psql still reads the reason."""
    proxy = proxy_factory(max_client_conn=1)
    held = connect(pg, proxy)
    waiting = [silent(proxy) for _ in range(20)]
    try:
        assert wait_until(lambda: len(proxy.server.refuser) == 20, timeout=5), len(proxy.server.refuser)
        res = psql(proxy, sql="SELECT 1", env={"PGSSLMODE": "prefer"})
        assert res.returncode != 0
        assert "no more connections allowed (max_client_conn 1)" in res.stderr, res.stderr
        assert SSL_EXCHANGE not in res.stderr
        with pytest.raises(psycopg.OperationalError, match=r"max_client_conn 1") as caught:
            connect(pg, proxy, sslmode="prefer")
        assert SSL_EXCHANGE not in str(caught.value)
        assert held.execute("SELECT 1").fetchone() == (1,)
    finally:
        held.close()
        for s in waiting:
            s.close()


def test_the_sslrequest_is_answered_n_and_the_error_follows_the_startup_packet(pg, proxy_factory):
    """The bytes in PostgreSQL's order: 'N' to the SSLRequest, nothing more until the startup
    packet, then ErrorResponse 53300 and the close.  A GSSENCRequest is answered 'N' the same way."""
    proxy = proxy_factory(max_client_conn=1)
    held = connect(pg, proxy)
    try:
        for request in (ssl_request(), gssenc_request()):
            with socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
                s.sendall(request)
                assert s.recv(1) == b"N"
                s.settimeout(0.3)
                with pytest.raises(socket.timeout):
                    s.recv(1)                          # nothing before the startup packet
                s.sendall(startup_packet({"user": "app", "database": "appdb"}))
                data = read_all(s, 5)
            fields = error_text(data)
            assert fields["S"] == "FATAL" and fields["C"] == "53300", fields
            assert fields["M"] == "no more connections allowed (max_client_conn 1)", fields
    finally:
        held.close()


def test_refusals_are_bounded_in_time_bytes_and_number(pg, proxy_factory):
    """A silent connection is told after 2 s; an oversized packet at once; beyond 64 refusals under
    way, the error goes out at once (the accepting thread) and nothing piles up."""
    proxy = proxy_factory(max_client_conn=1)
    held = connect(pg, proxy)
    socks = []
    try:
        with socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
            s.sendall(struct.pack("!II", 20000, 196608))         # longer than any startup packet
            t0 = time.monotonic()
            assert error_text(read_all(s, 5))["C"] == "53300"
            assert time.monotonic() - t0 < 1.0
        # (that refusal must be over before the count starts: still under way, it takes one of the 64)
        assert wait_until(lambda: len(proxy.server.refuser) == 0, timeout=5)
        threads0 = threading.active_count()
        opened = []
        for _ in range(70):
            socks.append(silent(proxy))
            opened.append(time.monotonic())
        told_at = first_bytes_after(socks, opened, 6)
        for s in socks:
            data = read_all(s, 6)
            assert error_text(data)["C"] == "53300", data
        at_once = sum(1 for t in told_at if t < 1.0)
        print(f"\n70 silent connections over max_client_conn: {at_once} told at once, the others after "
              f"{min(t for t in told_at if t >= 1.0):.2f}-{max(told_at):.2f} s")
        assert at_once == 70 - 64, told_at
        assert max(told_at) < 2.0 + 2.0, told_at
        assert threading.active_count() <= threads0 + 1          # one refuser thread, whatever the number
        assert wait_until(lambda: len(proxy.server.refuser) == 0, timeout=5)
    finally:
        held.close()
        for s in socks:
            s.close()


def test_a_cancel_request_over_max_client_conn_still_cancels(pg, proxy_factory):
    """PostgreSQL serves a CancelRequest however full it is; libpq's cancel opens a new connection."""
    proxy = proxy_factory(max_client_conn=1)
    conn = connect(pg, proxy)
    outcome = {}

    def sleep():
        try:
            conn.execute("SELECT pg_sleep(30)")
            outcome["result"] = "finished"
        except psycopg.errors.QueryCanceled:
            outcome["result"] = "canceled"
    t = threading.Thread(target=sleep, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        assert wait_until(lambda: len(pg.backend_pids(user="app", dbname="appdb")) >= 1)
        time.sleep(0.3)
        conn.cancel_safe(timeout=10)     # (cancel() holds the GIL in libpq: deadlock with an in-process proxy)
        t.join(15)
        assert outcome.get("result") == "canceled", outcome
        assert time.monotonic() - t0 < 15
    finally:
        t.join(30)
        conn.close()


def test_refused_over_tls_when_the_proxy_has_a_certificate(pg, proxy_factory, tmp_path):
    """With client TLS configured, the SSLRequest of a refused client is answered 'S' and the
    handshake made: psql with sslmode=require reads the reason over TLS."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = tmp_path / "proxy.crt", tmp_path / "proxy.key", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca_file.write_bytes(ca.cert_pem.bytes())
    for path in (cert, key):
        os.chmod(path, 0o600)
    proxy = proxy_factory(max_client_conn=1, client_tls_sslmode="allow", client_tls_cert_file=str(cert),
                          client_tls_key_file=str(key))
    held = connect(pg, proxy)
    try:
        for mode in ("require", "verify-full", "prefer"):
            res = psql(proxy, sql="SELECT 1", env={"PGSSLMODE": mode, "PGSSLROOTCERT": str(ca_file),
                                                   "PGHOST": "127.0.0.1"})
            assert res.returncode != 0
            assert "no more connections allowed (max_client_conn 1)" in res.stderr, (mode, res.stderr)
            assert SSL_EXCHANGE not in res.stderr
    finally:
        held.close()


# -- out of file descriptors ------------------------------------------------------

def _low_fd_limit(soft: int, hard: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return apply


def test_out_of_file_descriptors_psql_with_sslmode_prefer_sees_the_reason(pg, tmp_path):
    """The proxy under RLIMIT_NOFILE 64/64, every descriptor taken by silent clients: psql (and a
    raw SSLRequest) get 'N' first, then FATAL 53300 out of file descriptors."""
    port = free_port()
    conf = tmp_path / "proxy.yaml"
    conf.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port},
        "pool_mode": "transaction",
        "auth_type": "trust",
        "max_client_conn": 1000,
        "client_login_timeout": 60,
        "databases": {"*": {"host": pg.host, "port": pg.port}},
    }))
    log_path = tmp_path / "proxy.log"
    env = dict(os.environ, PYTHONPATH=REPO)
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "threadpool_proxy", "-c", str(conf)], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                preexec_fn=_low_fd_limit(64, 64))
    flood = []
    target = types.SimpleNamespace(host="127.0.0.1", port=port)
    try:
        def up():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                return proc.poll() is not None
        assert wait_until(up, timeout=20) and proc.poll() is None, log_path.read_text()
        res = psql(target, sql="SELECT 'before'", user="trustuser")
        assert res.stdout.strip() == "before", res.stderr
        for _ in range(64):
            flood.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        assert wait_until(lambda: "out of file descriptors at accept" in log_path.read_text(), timeout=10), \
            log_path.read_text()
        res = psql(target, sql="SELECT 1", user="trustuser", env={"PGSSLMODE": "prefer"}, timeout=30)
        assert res.returncode != 0
        assert "the proxy is out of file descriptors; try again later" in res.stderr, res.stderr
        assert SSL_EXCHANGE not in res.stderr
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(ssl_request())
            assert s.recv(1) == b"N"
            s.sendall(startup_packet({"user": "trustuser", "database": "appdb"}))
            fields = error_text(read_all(s, 10))
        assert fields["C"] == "53300" and "out of file descriptors" in fields["M"], fields
        for s in flood:
            s.close()
        flood = []
        assert wait_until(lambda: raw_login("127.0.0.1", port, "trustuser", "appdb", timeout=10).ok, timeout=15)
        res = psql(target, sql="SELECT 'after'", user="trustuser")
        assert res.stdout.strip() == "after", res.stderr
    finally:
        for s in flood:
            s.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
