"""Issue 18 item 3: nothing a client (or a server) declares makes the proxy hold it whole.

A named Parse, a Describe or Close of a statement, and a Bind up to the end of
its names are held by the prepared-statement tracker; a server's ErrorResponse
by the tracker and the relay's scanner.  Each declares its own length.  Here a
client declares huge ones through a real proxy (a subprocess, so that its RSS
and CPU time are its own) while another client keeps querying, and a server
error of 64 MiB goes through; then the tracker is fed directly to count how
often each byte of a long Bind is searched.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
import yaml

from helpers import connect, parse_error_fields, query, read_message, read_until_ready, trust_session, wait_until
from threadpool_proxy import prepared
from threadpool_proxy import protocol as pq
from threadpool_proxy.errors import ClientFatal
from threadpool_proxy.pgcluster import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The documented default of max_tracked_message_size (docs/security-wire.md).
DEFAULT_LIMIT = 1024 * 1024
MiB = 1024 * 1024


def kernel_buffers_max() -> int:
    """The most a loopback TCP connection can hold in flight: the largest receive buffer the kernel
    grows to (tcp_rmem's maximum; 32 MiB on some machines) plus the largest send buffer."""
    total = 0
    for name in ("tcp_rmem", "tcp_wmem"):
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                total += int(f.read().split()[2])
        except (OSError, ValueError, IndexError):
            total += 8 * MiB
    return total


#: A client that sends past the limit can have at most this much accepted by the kernel:
#: the limit (1 MiB, docs/security-wire.md), what the socket buffers hold, and 1 MiB of slack.
SENT_BOUND = 1 * MiB + kernel_buffers_max() + 1 * MiB


# -- the proxy as a process of its own ---------------------------------------------------

class ProxyProcess:
    """``python -m threadpool_proxy`` in transaction mode in front of ``pg``; pass-through auth."""

    def __init__(self, pg, directory) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        path = os.path.join(directory, "proxy.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"listen": {"host": self.host, "port": self.port}, "pool_mode": "transaction",
                            "log_level": "warning",
                            "databases": {"appdb": {"host": pg.host, "port": pg.port}}}, f)
        env = dict(os.environ, PYTHONPATH=REPO)
        self.proc = subprocess.Popen([sys.executable, "-m", "threadpool_proxy", "-c", path], cwd=REPO, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert wait_until(self._listening, timeout=30), "the proxy did not start listening"

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.proc.stderr.read().decode()
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field}")

    def rss(self) -> int:
        """Resident set size in bytes (VmRSS)."""
        return self._status("VmRSS")

    def start_peak(self) -> int:
        """Start measuring the peak RSS from now (Linux: 5 > clear_refs resets VmHWM); the RSS now."""
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")
        return self.rss()

    def peak(self) -> int:
        """The highest RSS since ``start_peak`` (VmHWM): memory freed again still counts."""
        return self._status("VmHWM")

    def cpu(self) -> float:
        """CPU seconds used so far, user and system (utime + stime of /proc/PID/stat)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def proxy_process(pg, tmp_path_factory):
    proxy = ProxyProcess(pg, str(tmp_path_factory.mktemp("wire")))
    try:
        yield proxy
    finally:
        proxy.stop()


class LatencyProbe:
    """Another client, querying through the proxy every 20 ms; ``worst`` is its slowest answer."""

    def __init__(self, pg, proxy) -> None:
        self.conn = connect(pg, proxy, user="trustuser", password="")
        self.worst = 0.0
        self.answers = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="latency-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            assert self.conn.execute("SELECT 1").fetchone() == (1,)
            self.worst = max(self.worst, time.monotonic() - t0)
            self.answers += 1
            self._stop.wait(0.02)

    def __enter__(self) -> "LatencyProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)
        self.conn.close()


def _message_head(kind: bytes, declared: int, start: bytes) -> bytes:
    """A message header declaring a body of ``declared`` bytes, and the body's first bytes."""
    return kind + struct.pack("!I", declared + 4) + start


def feed(sock: socket.socket, head: bytes, filler: bytes, budget: int, seconds: float) -> int:
    """Send ``head`` then ``filler`` over and over, up to ``budget`` bytes or ``seconds``, or until
    the proxy stops reading (it closed the connection).  Returns the bytes sent."""
    sent = 0
    deadline = time.monotonic() + seconds
    sock.settimeout(2)
    try:
        sock.sendall(head)
        sent += len(head)
        while sent < budget and time.monotonic() < deadline:
            sock.sendall(filler)
            sent += len(filler)
    except (socket.timeout, BrokenPipeError, ConnectionResetError):
        pass
    return sent


def final_error(sock: socket.socket) -> dict:
    """The fields of the ErrorResponse the proxy sent before closing (skipping anything before it)."""
    sock.settimeout(10)
    while True:
        kind, body = read_message(sock)
        if kind == "E":
            return parse_error_fields(body)


def backend_pid(sock) -> int:
    query(sock, "SELECT pg_backend_pid()")
    rows = [body for kind, body in read_until_ready(sock) if kind == "D"]
    return int(rows[0][6:])


ATTACKS = {
    # a named Parse declaring 4 GiB - 1: the text never ends
    "parse": (_message_head(b"P", 0xFFFFFFF0, b"stmt\0SELECT '"), b"x" * 65536),
    # a Describe of a statement whose name declares 4 GiB
    "describe": (_message_head(b"D", 0xFFFFFFF0, b"S"), b"n" * 65536),
    # a Bind declaring 4 GiB whose portal name never ends (no NUL)
    "bind": (_message_head(b"B", 0xFFFFFFF0, b""), b"p" * 65536),
}


@pytest.mark.parametrize("kind", sorted(ATTACKS))
def test_a_huge_declared_length_is_refused_with_flat_rss_and_idle_cpu(pg, proxy_process, kind):
    """The proxy stops reading at max_tracked_message_size: FATAL 54000, its server
    connection closed (it may be mid-pipeline), RSS and CPU flat, others unaffected."""
    proxy = proxy_process
    head, filler = ATTACKS[kind]
    with LatencyProbe(pg, proxy) as probe:
        sock = trust_session(proxy)
        try:
            pid = backend_pid(sock)
            # (an extended-protocol message first, so the tracker follows this client)
            sock.sendall(pq.extended_query("SELECT 1", []))
            assert read_until_ready(sock)[-1] == ("Z", b"I")
            time.sleep(0.3)
            rss, cpu = proxy.start_peak(), proxy.cpu()
            t0 = time.monotonic()
            sent = feed(sock, head, filler, budget=SENT_BOUND + 16 * MiB, seconds=15)
            error = final_error(sock)
            took = time.monotonic() - t0
            rss_growth, cpu_used = proxy.peak() - rss, proxy.cpu() - cpu
        finally:
            sock.close()
        assert probe.answers > 0
        worst = probe.worst
    assert error["S"] == "FATAL" and error["C"] == "54000", error
    assert "max_tracked_message_size" in error["M"], error
    # It stopped reading about where the limit is (plus what socket buffers take), not at the budget.
    assert sent < SENT_BOUND, (sent, took)
    assert rss_growth < 16 * MiB, f"RSS peaked {rss_growth / MiB:.1f} MiB higher"
    assert cpu_used < 1.0, f"the proxy used {cpu_used:.2f} s of CPU"
    assert worst < 1.0, f"another client waited {worst:.2f} s for SELECT 1"
    # The server connection it held was closed, not parked for someone else.
    assert wait_until(lambda: pid not in pg.backend_pids(user="trustuser"))
    sock = trust_session(proxy)
    try:
        query(sock, "SELECT 6 * 7")
        assert [body for kind, body in read_until_ready(sock) if kind == "D"] == [b"\0\x01\0\0\0\x0242"]
    finally:
        sock.close()


def test_a_64_mib_server_error_passes_unheld(pg, proxy_process):
    """A RAISE of 64 MiB: the client gets the whole ErrorResponse, its SQLSTATE is seen
    (the transaction is known failed, the pipeline skips to Sync), and the proxy's RSS stays flat."""
    proxy = proxy_process
    size = 64 * MiB
    sock = trust_session(proxy)
    try:
        sock.sendall(pq.extended_query("SELECT 1", []))        # the tracker follows this client
        assert read_until_ready(sock)[-1] == ("Z", b"I")
        time.sleep(0.3)
        rss = proxy.start_peak()
        sql = f"DO $$BEGIN RAISE EXCEPTION '%', repeat('x', {size}) USING ERRCODE = '22012'; END$$"
        # Parse/Bind/Execute of the DO, and a Bind/Execute after it that the server skips.
        sock.sendall(pq.extended_query(sql, [])[:-5] + pq.message(pq.BIND, b"\0\0\0\0\0\0\0\0")
                     + pq.message(pq.EXECUTE, b"\0\0\0\0\0") + pq.SYNC_MESSAGE)
        sock.settimeout(60)
        messages = _read_until_ready_big(sock)
        rss_growth = proxy.peak() - rss
        kinds = [kind for kind, _ in messages]
        assert kinds == ["1", "2", "E", "Z"], kinds
        error = messages[2][1]
        assert len(error) > size
        assert parse_error_fields(error[:200] + b"\0")["C"] == "22012"
        assert messages[-1] == ("Z", b"I")
        query(sock, "SELECT 42")
        assert [body for kind, body in read_until_ready(sock) if kind == "D"] == [b"\0\x01\0\0\0\x0242"]
    finally:
        sock.close()
    assert rss_growth < 16 * MiB, f"RSS peaked {rss_growth / MiB:.1f} MiB higher"


def _read_until_ready_big(sock) -> list:
    """read_until_ready for messages of many MiB (into one preallocated buffer each)."""
    out = []
    while True:
        header = bytearray(5)
        _recv_into(sock, memoryview(header))
        body = bytearray(struct.unpack("!I", header[1:])[0] - 4)
        _recv_into(sock, memoryview(body))
        out.append((chr(header[0]), bytes(body)))
        if header[:1] == b"Z":
            return out


def _recv_into(sock, view) -> None:
    while len(view):
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("closed")
        view = view[n:]


# -- the tracker itself --------------------------------------------------------------------

class _CountingSearch:
    """Wraps prepared._find_nul, adding up the bytes each call was asked to search."""

    def __init__(self, monkeypatch) -> None:
        self.searched = 0
        real = prepared._find_nul

        def counting(buf, start, stop):
            self.searched += max(0, stop - start)
            return real(buf, start, stop)

        monkeypatch.setattr(prepared, "_find_nul", counting)


CHUNK = 16 * 1024


def _chunks(data: bytes):
    for i in range(0, len(data), CHUNK):
        yield data[i:i + CHUNK]


def test_a_long_bind_is_searched_once_per_byte(monkeypatch):
    """4 MiB of Bind before its names end, in 16 KiB chunks: each byte searched once (it was
    searched again with every chunk: quadratic), and the Bind passes on untouched."""
    search = _CountingSearch(monkeypatch)
    relay = prepared.PreparedRelay(prepared.ClientStatements(100), max_message=8 * MiB)
    server = prepared.ServerStatements(100)
    portal = b"p" * (4 * MiB)
    bind = pq.message(pq.BIND, portal + b"\0\0" + b"\0\0\0\0\0\0")
    out = bytearray()
    for chunk in _chunks(bind):
        to_server, to_client = relay.from_client(chunk, server)
        out += to_server
        assert to_client == b""
    assert bytes(out) == bind
    assert search.searched <= len(bind) + 2 * CHUNK, search.searched


def test_a_bind_whose_names_pass_the_limit_is_refused_at_the_limit(monkeypatch):
    """With the default limit (1 MiB) a Bind whose names have not ended by then ends the client:
    the tracker stops there, having searched each byte once."""
    search = _CountingSearch(monkeypatch)
    relay = prepared.PreparedRelay(prepared.ClientStatements(100))
    server = prepared.ServerStatements(100)
    bind = pq.message(pq.BIND, b"p" * (4 * MiB) + b"\0\0" + b"\0\0\0\0\0\0")
    fed = 0
    with pytest.raises(ClientFatal) as caught:
        for chunk in _chunks(bind):
            relay.from_client(chunk, server)
            fed += len(chunk)
    assert getattr(caught.value, "sqlstate", None) == "54000", caught.value
    assert DEFAULT_LIMIT <= fed <= DEFAULT_LIMIT + CHUNK
    assert search.searched <= fed + 2 * CHUNK, search.searched


@pytest.mark.parametrize("message", [
    pq.message(pq.PARSE, b"s1\0" + b"SELECT 1 -- " + b"x" * (2 * MiB) + b"\0\0\0"),
    pq.message(pq.DESCRIBE, b"S" + b"n" * (2 * MiB) + b"\0"),
    pq.message(pq.CLOSE, b"S" + b"n" * (2 * MiB) + b"\0"),
], ids=["parse", "describe", "close"])
def test_a_named_message_over_the_limit_is_refused_at_its_header(message):
    """Its declared length is over the limit: refused at the first chunk, nothing held or sent."""
    relay = prepared.PreparedRelay(prepared.ClientStatements(100))
    server = prepared.ServerStatements(100)
    with pytest.raises(ClientFatal) as caught:
        relay.from_client(message[:CHUNK], server)
    assert getattr(caught.value, "sqlstate", None) == "54000", caught.value


def test_unnamed_and_portal_messages_are_not_held():
    """An unnamed Parse and a portal's Describe stream through whatever their length."""
    relay = prepared.PreparedRelay(prepared.ClientStatements(100))
    server = prepared.ServerStatements(100)
    for message in (pq.message(pq.PARSE, b"\0SELECT 1 -- " + b"x" * (4 * MiB) + b"\0\0\0"),
                    pq.message(pq.DESCRIBE, b"P" + b"n" * (4 * MiB) + b"\0")):
        for chunk in _chunks(message):
            to_server, _ = relay.from_client(chunk, server)
            assert bytes(to_server) == chunk


def test_a_long_server_error_streams_through_the_tracker_and_the_scanner():
    """A 4 MiB FATAL ErrorResponse: the tracker passes each chunk on as it comes (it held
    everything until the end), the scanner carries none of it, and both see what it is:
    the tracker's pipeline skips to Sync, the scanner counts a FATAL."""
    relay = prepared.PreparedRelay(prepared.ClientStatements(100))
    server = prepared.ServerStatements(100)
    relay.from_client(pq.extended_query("SELECT 1", []), server)
    body = b"SFATAL\0VFATAL\0C57P01\0M" + b"m" * (4 * MiB) + b"\0\0"
    error = pq.message(pq.ERROR_RESPONSE, body)
    scanner = pq.ServerScanner()
    out = bytearray()
    fed = 0
    for chunk in _chunks(error):
        out += relay.from_server(chunk)
        fed += len(chunk)
        assert bytes(out) == error[:fed]          # nothing held back
        scanner.feed(memoryview(chunk), len(chunk))
        assert scanner.carry_need() == 0          # nothing carried
    assert scanner.errors == 1 and scanner.fatal and scanner.at_boundary
    # The error answered the Parse: the rest of the pipeline was skipped, ReadyForQuery ends it.
    assert bytes(relay.from_server(pq.ready_for_query())) == pq.ready_for_query()
    assert relay.idle()


def test_a_long_parameter_status_from_a_server_is_a_protocol_violation():
    """No PostgreSQL reports a 4 MiB parameter or notification: not carried, refused."""
    scanner = pq.ServerScanner()
    status = pq.message(pq.PARAMETER_STATUS, b"application_name\0" + b"a" * (4 * MiB) + b"\0")
    with pytest.raises(pq.ProtocolError, match="max_tracked_message_size"):
        for chunk in _chunks(status):
            scanner.feed(memoryview(chunk), len(chunk))
            assert scanner.carry_need() <= 2 * CHUNK


def test_a_clients_statements_keep_at_most_16_times_the_limit_of_text(pg, proxy_factory):
    """max_tracked_message_size 4096: a client's named statements hold at most 64 KiB of
    Parse messages; the next Parse gets 53400 and the client stays; a Close makes room."""
    proxy = proxy_factory(max_tracked_message_size=4096)
    sock = trust_session(proxy)
    try:
        def parse(i: int) -> list:
            text = f"SELECT {i} -- ".encode() + b"x" * 3900
            sock.sendall(pq.message(pq.PARSE, f"s{i}".encode() + b"\0" + text + b"\0\0\0") + pq.SYNC_MESSAGE)
            return read_until_ready(sock)

        kept = 0
        while True:
            replies = parse(kept)
            if replies[0][0] != "1":
                break
            kept += 1
            assert kept < 40, "no limit"
        assert kept == 65536 // (5 + 37 + len(b"SELECT 15 -- ") + 3900 + 3), kept      # 16
        error = parse_error_fields(replies[0][1])
        assert (error["S"], error["C"]) == ("ERROR", "53400"), error
        assert "more than 65536 bytes of statement text" in error["M"], error
        assert replies[-1] == ("Z", b"I")
        sock.sendall(pq.message(pq.CLOSE, b"Ss0\0") + pq.SYNC_MESSAGE)
        assert [kind for kind, _ in read_until_ready(sock)] == ["3", "Z"]
        assert parse(kept)[0][0] == "1"
    finally:
        sock.close()
