"""Issue 18 item 7: the proxy's own server logins give a server only what the rule allows.

``server_require_auth`` (libpq's require_auth) and its defaults by the secret the
proxy holds; ``server_scram_max_iterations``; libpq's rules for verify-ca/verify-full
without a CA file; CancelRequests over TLS where the server connection is TLS.

The servers that misbehave are stand-ins: a loopback socket that speaks only the
start of the protocol and records every byte the proxy sends after its startup
packet.  The rest runs against the real PostgreSQL 15 of the ``pg`` fixture (and a
TLS one).
"""

from __future__ import annotations

import base64
import socket
import struct
import threading
import time

import psycopg
import pytest

from helpers import connect, raw_login, wait_until, write_auth_file
from test_tls import Certs, TlsPgCluster
from threadpool_proxy.config import ConfigError, from_dict

#: The documented default of server_scram_max_iterations (docs/security-wire.md).
DEFAULT_MAX_ITERATIONS = 100_000


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def _auth(code: int, payload: bytes = b"") -> bytes:
    return _message(b"R", struct.pack("!I", code) + payload)


def _recv_exact(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _read_message(sock) -> tuple[bytes, bytes]:
    head = _recv_exact(sock, 5)
    return head[:1], _recv_exact(sock, struct.unpack("!I", head[1:])[0] - 4)


class StandIn:
    """A server stand-in on loopback.  For each connection: the startup packet is read
    (an SSLRequest answered 'N' first), ``script(conn)`` speaks, and then every byte the
    proxy sends until it closes (or 5 s pass) is recorded in ``received`` (one entry per
    connection, script replies included)."""

    def __init__(self, script) -> None:
        self.script = script
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.host, self.port = self.listener.getsockname()
        self.received: list[bytes] = []
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="stand-in")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                log = bytearray()
                try:
                    while True:
                        length, code = struct.unpack("!II", _recv_exact(conn, 8))
                        _recv_exact(conn, length - 8)
                        if code != 80877103:          # not an SSLRequest: the StartupMessage
                            break
                        conn.sendall(b"N")
                    self.script(conn, log)
                    while True:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        log += chunk
                except (OSError, ConnectionError):
                    pass
                self.received.append(bytes(log))
                self.done.set()

    def messages(self, i: int = 0) -> list[bytes]:
        """The types of the messages the proxy sent on connection ``i`` after its startup packet."""
        data, out = self.received[i], []
        while len(data) >= 5:
            out.append(data[:1])
            data = data[1 + struct.unpack("!I", data[1:5])[0]:]
        return out

    def close(self) -> None:
        self.listener.close()


def asks_cleartext(conn, log):
    conn.sendall(_auth(3))


def asks_md5(conn, log):
    conn.sendall(_auth(5, b"salt"))


def says_ok_at_once(conn, log):
    conn.sendall(_auth(0) + _message(b"S", b"server_version\x0015.0\0") + _message(b"K", b"\0\0\0\x07abcd")
                 + _message(b"Z", b"I"))


def answered_then_refused(script):
    """``script``, then the proxy's answer is read (and logged) and refused with PostgreSQL's 28P01."""
    def refusing(conn, log):
        script(conn, log)
        kind, body = _read_message(conn)
        log += _message(kind, body)
        conn.sendall(_message(b"E", b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"app\"\0\0"))
    return refusing


def asks_scram(iterations: int):
    def script(conn, log):
        conn.sendall(_auth(10, b"SCRAM-SHA-256\0\0"))
        kind, body = _read_message(conn)
        log += _message(kind, body)
        client_first = body[body.index(b"n,,") + 3:].decode()
        nonce = dict(part.split("=", 1) for part in client_first.split(","))["r"]
        salt = base64.b64encode(b"0123456789abcdef").decode()
        conn.sendall(_auth(11, f"r={nonce}standin,s={salt},i={iterations}".encode()))
    return script


@pytest.fixture
def stand_in():
    made = []

    def make(script) -> StandIn:
        made.append(StandIn(script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _through(proxy_factory, tmp_path, server: StandIn, secret: dict, auth_type="scram-sha-256", **settings):
    """A proxy in front of the stand-in, the client ``app`` logging in with its password; the result."""
    auth_file = write_auth_file(tmp_path / "users.yaml", {"app": secret})
    proxy = proxy_factory(databases={"appdb": {"host": server.host, "port": server.port}},
                          auth_type=auth_type, auth_file=auth_file, server_connect_timeout=5, **settings)
    t0 = time.monotonic()
    result = raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret", timeout=20)
    return result, time.monotonic() - t0


PASSWORD = {"password": "app-secret"}


@pytest.mark.parametrize("script, asked", [(asks_cleartext, "a cleartext password"),
                                           (asks_md5, "an md5 password")], ids=["cleartext", "md5"])
def test_a_password_of_a_scram_entry_goes_only_to_scram(pg, proxy_factory, tmp_path, stand_in, script, asked):
    """A man in the middle (server_tls_sslmode: disable) asking for the password in clear
    text or md5 gets nothing: the entry says scram-sha-256."""
    server = stand_in(script)
    result, _ = _through(proxy_factory, tmp_path, server, PASSWORD)
    assert not result.ok
    assert result.sqlstate == "28000" and result.error["S"] == "FATAL", result.error
    assert asked in result.error["M"] and "server_require_auth" in result.error["M"], result.error
    assert server.done.wait(10)
    assert server.messages() == [], server.received
    assert b"app-secret" not in server.received[0]


def test_a_scram_verifier_refuses_a_server_that_skips_authentication(pg, proxy_factory, tmp_path, stand_in,
                                                                     rolpasswords):
    """AuthenticationOk at once (the server never proved it knows the verifier): refused, and
    nothing of the client's reaches that server."""
    server = stand_in(says_ok_at_once)
    result, _ = _through(proxy_factory, tmp_path, server, {"scram": rolpasswords["app"]})
    assert not result.ok
    assert result.sqlstate == "28000", result.error
    assert "without asking for any authentication" in result.error["M"], result.error
    assert server.done.wait(10)
    assert server.messages() == [], server.received


def test_a_stored_password_goes_in_clear_text_only_over_verified_tls(pg, proxy_factory, tmp_path, stand_in,
                                                                    rolpasswords):
    """auth_type md5 with a plain password: a cleartext request over a connection that
    is not verified TLS is refused; the real md5 and SCRAM servers still take the defaults."""
    server = stand_in(asks_cleartext)
    result, _ = _through(proxy_factory, tmp_path, server, PASSWORD, auth_type="md5")
    assert not result.ok and result.sqlstate == "28000", result.error
    assert "a cleartext password" in result.error["M"], result.error
    assert server.done.wait(10)
    assert b"app-secret" not in server.received[0]
    auth_file = write_auth_file(tmp_path / "real.yaml", {"app": {"scram": rolpasswords["app"]},
                                                         "md5user": {"password": "md5-secret"}})
    proxy = proxy_factory(auth_type="md5", auth_file=auth_file)
    with connect(pg, proxy) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    with connect(pg, proxy, user="md5user") as conn:                     # pg_hba: md5
        assert conn.execute("SELECT current_user").fetchone() == ("md5user",)


def test_server_require_auth_password_lets_it_go(pg, proxy_factory, tmp_path, stand_in):
    """The setting decides when set: with ``password`` the cleartext password is sent."""
    server = stand_in(answered_then_refused(asks_cleartext))
    result, _ = _through(proxy_factory, tmp_path, server, PASSWORD, server_require_auth="password")
    assert result.sqlstate == "28000" and "password authentication failed" in result.error["M"], result.error
    assert server.done.wait(10)
    assert server.received[0] == _message(b"p", b"app-secret\0")


def test_scram_iterations_are_capped(pg, proxy_factory, tmp_path, stand_in):
    """A server asking 10^8 PBKDF2 rounds (minutes of CPU): refused at once after the
    client-first message, which holds no secret; the proof is never computed or sent.
    100,000 (the cap) are computed."""
    server = stand_in(asks_scram(100_000_000))
    result, took = _through(proxy_factory, tmp_path, server, PASSWORD)
    assert not result.ok and result.sqlstate == "28000", result.error
    assert "100000000 SCRAM iterations" in result.error["M"], result.error
    assert f"server_scram_max_iterations ({DEFAULT_MAX_ITERATIONS})" in result.error["M"], result.error
    assert took < 5, took
    assert server.done.wait(10)
    assert server.messages() == [b"p"], server.received          # SASLInitialResponse only
    assert server.received[0][5:].startswith(b"SCRAM-SHA-256\0")
    server = stand_in(answered_then_refused(asks_scram(DEFAULT_MAX_ITERATIONS)))
    result, _ = _through(proxy_factory, tmp_path, server, PASSWORD)
    assert result.sqlstate == "28000" and "password authentication failed" in result.error["M"], result.error
    assert server.done.wait(10)
    assert server.messages() == [b"p", b"p"], server.received    # client-first, then client-final


# -- against the real server ----------------------------------------------------------

def test_a_trusting_server_needs_none_allowed_for_a_scram_verifier(pg, proxy_factory, tmp_path, rolpasswords):
    """trustuser's pg_hba line is trust: with its SCRAM verifier the default refuses the
    server's AuthenticationOk at once; ``scram-sha-256,none`` lets it in."""
    with pg.superuser_conn() as su:
        verifier = su.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'trustuser'").fetchone()[0]
    auth_file = write_auth_file(tmp_path / "users.yaml", {"trustuser": {"scram": verifier}})
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file)
    result = raw_login(proxy.host, proxy.port, "trustuser", "appdb", password="trust-secret")
    assert not result.ok and result.sqlstate == "28000", result.error
    assert "without asking for any authentication" in result.error["M"]
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, server_require_auth="scram-sha-256,none")
    with connect(pg, proxy, user="trustuser", password="trust-secret") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("trustuser",)


def _config(**settings):
    return from_dict({"databases": {"app": {"host": "127.0.0.1"}}, **settings})


def test_server_require_auth_values():
    assert _config().server_require_auth is None
    assert _config(server_require_auth="scram-sha-256,none").server_require_auth == "scram-sha-256,none"
    assert _config(server_require_auth=["md5", "scram-sha-256"]).server_require_auth == "md5,scram-sha-256"
    assert _config(server_require_auth="!password").server_require_auth == "!password"
    for bad in ("gss", "!password,md5", "md5,,none", "md5,md5", ""):
        with pytest.raises(ConfigError, match="^server_require_auth: expected a comma-separated list"):
            _config(server_require_auth=bad)
    assert _config().server_scram_max_iterations == DEFAULT_MAX_ITERATIONS
    with pytest.raises(ConfigError, match="^server_scram_max_iterations: expected a positive integer"):
        _config(server_scram_max_iterations=0)


# -- TLS: libpq's rules -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_verify_without_a_ca_file_is_a_configuration_error(mode):
    """libpq: "root certificate file does not exist"; no fall-back to every public CA."""
    with pytest.raises(ConfigError, match=f"^server_tls_ca_file: required when server_tls_sslmode is {mode}"):
        _config(server_tls_sslmode=mode)


@pytest.mark.parametrize("mode", ["require", "verify-ca"])
def test_the_system_roots_only_with_verify_full(mode):
    """libpq: sslrootcert=system needs verify-full (anyone gets a public certificate for their own host)."""
    with pytest.raises(ConfigError, match="^server_tls_ca_file: 'system' .* needs server_tls_sslmode verify-full"):
        _config(server_tls_sslmode=mode, server_tls_ca_file="system")
    assert _config(server_tls_sslmode="verify-full", server_tls_ca_file="system").server_tls_ca_file == "system"


def test_verify_ca_without_a_ca_file_does_not_start(pg):
    import threadpool_proxy
    with pytest.raises(ConfigError, match="^server_tls_ca_file: required"):
        threadpool_proxy.start({"listen": {"port": 0}, "server_tls_sslmode": "verify-ca",
                                "databases": {"appdb": {"host": pg.host, "port": pg.port}}})


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(str(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def pg_tls(certs):
    with open(certs.cert_file, "rb") as cert, open(certs.key_file, "rb") as key:
        cluster = TlsPgCluster(cert.read(), key.read())
    try:
        cluster.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


def _tls_proxy(proxy_factory, pg_tls, **settings):
    target = {"host": pg_tls.host, "port": pg_tls.port}
    return proxy_factory(databases={"appdb": target}, **settings)


def test_require_with_a_ca_file_checks_the_chain(pg, pg_tls, proxy_factory, certs):
    """libpq: with a root certificate file, require behaves as verify-ca."""
    proxy = _tls_proxy(proxy_factory, pg_tls, server_tls_sslmode="require", server_tls_ca_file=certs.other_ca_file)
    with pytest.raises(psycopg.OperationalError, match="is not trusted"):
        connect(pg_tls, proxy, sslmode="disable")
    proxy = _tls_proxy(proxy_factory, pg_tls, server_tls_sslmode="require", server_tls_ca_file=certs.ca_file)
    with connect(pg_tls, proxy, sslmode="disable") as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


def test_system_roots_do_not_trust_a_private_ca(pg, pg_tls, proxy_factory):
    """verify-full with server_tls_ca_file: system uses the system's roots, not anything else."""
    proxy = _tls_proxy(proxy_factory, pg_tls, server_tls_sslmode="verify-full", server_tls_ca_file="system")
    with pytest.raises(psycopg.OperationalError, match="is not trusted"):
        connect(pg_tls, proxy, sslmode="disable")


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_a_cancel_request_goes_over_tls(pg, pg_tls, proxy_factory, certs, pool_mode):
    """The server connection talks TLS: the CancelRequest does too (SSLRequest, handshake,
    the certificate checked), and PostgreSQL 15 takes it: the query stops at once."""
    proxy = _tls_proxy(proxy_factory, pg_tls, server_tls_sslmode="verify-full", server_tls_ca_file=certs.ca_file,
                       pool_mode=pool_mode)
    server_tls = proxy.server.logins.server_tls
    negotiations = []
    negotiate = server_tls.negotiate

    def counting(sock, host, port):
        negotiations.append((host, port))
        return negotiate(sock, host, port)

    server_tls.negotiate = counting
    with connect(pg_tls, proxy, sslmode="disable") as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        dialed = len(negotiations)
        outcome = {}

        def sleep():
            t0 = time.monotonic()
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.errors.QueryCanceled as exc:
                outcome["error"] = exc
            outcome["took"] = time.monotonic() - t0

        thread = threading.Thread(target=sleep)
        thread.start()
        assert wait_until(lambda: any(r[0] == "pg_sleep(30)" or "pg_sleep" in (r[0] or "")
                                      for r in _activity(pg_tls)), timeout=10)
        conn.cancel_safe()      # (cancel() holds the GIL in libpq: a deadlock with an in-process proxy)
        thread.join(20)
        assert "error" in outcome, outcome
        assert outcome["took"] < 10, outcome
        assert negotiations[dialed:] == [(pg_tls.host, pg_tls.port)], negotiations
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _activity(cluster) -> list:
    with cluster.superuser_conn() as su:
        return su.execute("SELECT query FROM pg_stat_activity WHERE state = 'active' AND usename = 'app'").fetchall()
