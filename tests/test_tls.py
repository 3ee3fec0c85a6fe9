"""TLS with clients (and, further down, with the server): real libpq clients,
certificates from a throwaway CA made here with trustme."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
import struct

import psycopg
import pytest
import trustme

from helpers import (connect, psql, raw_login, read_message, ssl_request, startup_packet, wait_until,
                     write_auth_file)
from threadpool_proxy import tls
from threadpool_proxy.config import ConfigError, from_dict


class Certs:
    """A throwaway CA and files: the proxy's certificate (localhost, 127.0.0.1), a client's."""

    def __init__(self, directory) -> None:
        self.dir = directory
        self.ca = trustme.CA()
        self.ca_file = self._write("ca.pem", self.ca.cert_pem.bytes())
        leaf = self.ca.issue_cert("localhost", "127.0.0.1")
        self.cert_file = self._write("proxy.crt", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        self.key_file = self._write("proxy.key", leaf.private_key_pem.bytes())
        self.leaf_der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
        client = self.ca.issue_cert("app")
        self.client_cert_file = self._write("client.crt", b"".join(p.bytes() for p in client.cert_chain_pems))
        self.client_key_file = self._write("client.key", client.private_key_pem.bytes())
        second = self.ca.issue_cert("localhost", "127.0.0.1")      # the same names, another certificate
        self.second_cert_file = self._write("second.crt", b"".join(p.bytes() for p in second.cert_chain_pems))
        self.second_key_file = self._write("second.key", second.private_key_pem.bytes())
        other = trustme.CA()
        self.other_ca_file = self._write("other-ca.pem", other.cert_pem.bytes())
        stranger = other.issue_cert("app")                         # a client's, signed by the other CA
        self.stranger_cert_file = self._write("stranger.crt", b"".join(p.bytes() for p in stranger.cert_chain_pems))
        self.stranger_key_file = self._write("stranger.key", stranger.private_key_pem.bytes())

    def _write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
        return path

    def client_settings(self, mode: str = "require", ca: bool = False, second: bool = False) -> dict:
        settings = {"client_tls_sslmode": mode,
                    "client_tls_cert_file": self.second_cert_file if second else self.cert_file,
                    "client_tls_key_file": self.second_key_file if second else self.key_file}
        if ca:
            settings["client_tls_ca_file"] = self.ca_file
        return settings


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(str(tmp_path_factory.mktemp("tls")))


def _ssl_in_use(conn) -> bool:
    return bool(conn.pgconn.ssl_in_use)


# -- client side ----------------------------------------------------------------

def test_psql_sslmode_require_through_the_proxy(pg, proxy_factory, certs):
    proxy = proxy_factory(**certs.client_settings("require"))
    res = psql(proxy, sql="\\conninfo", env={"PGSSLMODE": "require"})
    assert res.returncode == 0, res.stderr
    assert "SSL connection" in res.stdout
    res = psql(proxy, sql="SELECT current_user, 6 * 7", env={"PGSSLMODE": "require"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "app|42"


def test_psycopg_verify_full_with_the_test_ca(pg, proxy_factory, certs):
    proxy = proxy_factory(**certs.client_settings("require"))
    with connect(pg, proxy, sslmode="verify-full", sslrootcert=certs.ca_file) as conn:
        assert _ssl_in_use(conn)
        assert conn.execute("SELECT count(*) FROM generate_series(1, 1000)").fetchone()[0] == 1000
        conn.execute("BEGIN")
        conn.execute("SELECT 1")
        conn.execute("COMMIT")


def test_verify_full_fails_against_another_ca(pg, proxy_factory, certs):
    proxy = proxy_factory(**certs.client_settings("require"))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(pg, proxy, sslmode="verify-full", sslrootcert=certs.other_ca_file)
    # ... and the proxy goes on serving
    with connect(pg, proxy, sslmode="require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_require_refuses_a_plaintext_client(pg, proxy_factory, certs):
    proxy = proxy_factory(**certs.client_settings("require"))
    res = raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret")
    assert not res.ok
    assert res.sqlstate == "28000"
    assert res.error["S"] == "FATAL"
    assert "client_tls_sslmode is require" in res.error["M"]
    assert 'user "app", database "appdb"' in res.error["M"]
    res = psql(proxy, sql="SELECT 1", env={"PGSSLMODE": "disable"})
    assert res.returncode != 0
    assert "without encryption" in res.stderr


@pytest.mark.parametrize("mode", ["prefer", "allow"])
def test_prefer_takes_both(pg, proxy_factory, certs, mode):
    proxy = proxy_factory(**certs.client_settings(mode))
    with connect(pg, proxy, sslmode="require") as conn:
        assert _ssl_in_use(conn)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with connect(pg, proxy, sslmode="disable") as conn:
        assert not _ssl_in_use(conn)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_disable_answers_n(pg, proxy_factory):
    proxy = proxy_factory()
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        connect(pg, proxy, sslmode="require")
    with connect(pg, proxy, sslmode="prefer") as conn:
        assert not _ssl_in_use(conn)


def test_verify_ca_wants_a_client_certificate(pg, proxy_factory, certs, tmp_path):
    proxy = proxy_factory(**certs.client_settings("verify-ca", ca=True))
    # (a missing file: libpq then sends no certificate; an unreadable one fails in libpq itself)
    with pytest.raises(psycopg.OperationalError, match="alert certificate required"):
        connect(pg, proxy, sslmode="require", sslcert=str(tmp_path / "none.crt"), sslkey=str(tmp_path / "none.key"))
    with pytest.raises(psycopg.OperationalError, match="alert unknown ca"):
        connect(pg, proxy, sslmode="require", sslcert=certs.stranger_cert_file, sslkey=certs.stranger_key_file)
    with connect(pg, proxy, sslmode="verify-full", sslrootcert=certs.ca_file,
                 sslcert=certs.client_cert_file, sslkey=certs.client_key_file) as conn:
        assert _ssl_in_use(conn)
        assert conn.execute("SELECT current_user").fetchone() == ("app",)


def test_direct_tls_with_alpn(pg, proxy_factory, certs):
    """PostgreSQL 17's direct TLS: a ClientHello first, ALPN "postgresql", no SSLRequest."""
    proxy = proxy_factory(**certs.client_settings("require"))
    if psycopg.pq.version() >= 170000:
        with connect(pg, proxy, sslmode="require", sslnegotiation="direct") as conn:
            assert _ssl_in_use(conn)
            assert conn.execute("SELECT 2").fetchone() == (2,)
    ctx = ssl.create_default_context(cafile=certs.ca_file)
    ctx.set_alpn_protocols(["postgresql"])
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert s.selected_alpn_protocol() == "postgresql"
            s.sendall(startup_packet({"user": "app", "database": "appdb"}))
            kind, body = read_message(s)
            assert kind == "R" and struct.unpack("!I", body[:4])[0] == 10     # SASL: on to the login
    # Without ALPN a direct TLS connection is refused, as PostgreSQL refuses it.
    ctx = ssl.create_default_context(cafile=certs.ca_file)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            kind, body = read_message(s)
            assert kind == "E" and b"ALPN" in body


def test_ssl_request_then_garbage_handshake_is_dropped(pg, proxy_factory, certs):
    proxy = proxy_factory(**certs.client_settings("require"))
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as s:
        s.sendall(ssl_request())
        assert s.recv(1) == b"S"
        s.sendall(b"\x16\x03\x01\x00\x05hello")          # not a ClientHello
        s.settimeout(10)
        data = s.recv(100)
        assert data == b"" or data[:1] == b"\x15"          # an alert, then closed
    with connect(pg, proxy, sslmode="require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_big_result_and_copy_in_through_client_tls(pg, proxy_factory, certs):
    """~10 MB each way through TLS with the client: every byte arrives, in order."""
    proxy = proxy_factory(**certs.client_settings("require"))
    n = 200_000
    with connect(pg, proxy, sslmode="require") as conn:
        rows = conn.execute("SELECT i, md5(i::text) FROM generate_series(1, %s) i", (n,)).fetchall()
        assert len(rows) == n
        assert all(r == (i, hashlib.md5(str(i).encode()).hexdigest()) for i, r in enumerate(rows, 1))
        big = conn.execute("SELECT repeat('0123456789', 1000000)").fetchone()[0]
        assert big == "0123456789" * 1000000
        conn.execute("CREATE TEMP TABLE t (i int, h text)")
        with conn.cursor() as cur:
            with cur.copy("COPY t FROM STDIN") as copy:
                for i in range(1, n + 1):
                    copy.write_row((i, hashlib.md5(str(i).encode()).hexdigest()))
            cur.execute("SELECT count(*), sum(i), md5(string_agg(h, '' ORDER BY i)) FROM t")
            count, total, digest = cur.fetchone()
        assert (count, total) == (n, n * (n + 1) // 2)
        expect = hashlib.md5("".join(hashlib.md5(str(i).encode()).hexdigest()
                                     for i in range(1, n + 1)).encode()).hexdigest()
        assert digest == expect


def test_many_tls_clients_in_transaction_mode(pg, proxy_factory, certs):
    import threading
    proxy = proxy_factory(**certs.client_settings("require"), pool_size=3)
    errors = []

    def client(k):
        try:
            with connect(pg, proxy, sslmode="require") as conn:
                for j in range(20):
                    assert conn.execute("SELECT %s::int + %s", (k, j)).fetchone() == (k + j,)
        except Exception as exc:          # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


# -- pending(): decrypted bytes that poll() cannot see -----------------------------

def test_relay_reads_what_tls_already_decrypted(certs):
    """Relay._tls_recv drains pending() into the buffer, and what does not fit is due next turn."""
    from threadpool_proxy.relay import Relay

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert_file, certs.key_file)
    client_ctx = ssl.create_default_context(cafile=certs.ca_file)
    a, b = socket.socketpair()
    import threading
    payload = bytes(range(256)) * 64        # 16 KiB: one TLS record
    done = threading.Event()

    def serve():
        with server_ctx.wrap_socket(a, server_side=True) as s:
            s.sendall(payload)
            done.wait(10)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(b, server_hostname="localhost") as s:
            relay = Relay.__new__(Relay)
            relay.due = ()
            again = ((s.fileno(), 1),)
            buf = bytearray(1000)
            got = bytearray()
            n = relay._tls_recv(s, buf, again)
            assert n == 1000 and relay.due == again and s.pending() > 0
            got += buf[:n]
            relay.due = ()
            while len(got) < len(payload):
                n = relay._tls_recv(s, buf, again)
                got += buf[:n]
            assert bytes(got) == payload and s.pending() == 0
    finally:
        done.set()
        t.join()


# -- configuration ----------------------------------------------------------------

def _config(**settings):
    return from_dict({"databases": {"app": {"host": "127.0.0.1"}}, **settings})


def test_config_requires_the_files_each_mode_needs(certs):
    with pytest.raises(ConfigError, match="^client_tls_cert_file: required when client_tls_sslmode is require$"):
        _config(client_tls_sslmode="require")
    with pytest.raises(ConfigError, match="^client_tls_ca_file: required when client_tls_sslmode is verify-ca"):
        _config(**certs.client_settings("verify-ca"))
    with pytest.raises(ConfigError, match="^client_tls_sslmode: expected one of disable, allow, prefer"):
        _config(client_tls_sslmode="on")
    with pytest.raises(ConfigError, match="^server_tls_key_file: required with server_tls_cert_file$"):
        _config(server_tls_sslmode="require", server_tls_cert_file=certs.cert_file)
    _config(server_tls_sslmode="verify-full", server_tls_ca_file="system")      # the system's CAs


def test_unusable_files_are_named_at_start(certs, tmp_path):
    import threadpool_proxy
    missing = str(tmp_path / "nope.crt")
    with pytest.raises(ConfigError, match=f"^client_tls_cert_file: cannot read {missing}: No such file"):
        threadpool_proxy.start(_config(**{**certs.client_settings("require"), "client_tls_cert_file": missing}))
    with pytest.raises(ConfigError, match="^client_tls_cert_file, client_tls_key_file: cannot use"):
        threadpool_proxy.start(_config(**{**certs.client_settings("require"),
                                          "client_tls_key_file": certs.client_key_file}))
    with pytest.raises(ConfigError, match="^server_tls_ca_file: cannot use"):
        threadpool_proxy.start(_config(server_tls_sslmode="verify-ca", server_tls_ca_file=certs.key_file))


def test_relative_tls_paths_in_yaml_are_relative_to_the_file(tmp_path):
    from threadpool_proxy.config import load
    path = tmp_path / "proxy.yaml"
    path.write_text("client_tls_sslmode: require\nclient_tls_cert_file: a.crt\nclient_tls_key_file: /k/a.key\n"
                    "databases: {app: {host: 127.0.0.1}}\n")
    config = load(str(path))
    assert config.client_tls_cert_file == str(tmp_path / "a.crt")
    assert config.client_tls_key_file == "/k/a.key"


def test_end_point_hash_of_the_test_certificate(certs):
    assert tls.signature_algorithm(certs.leaf_der).startswith("1.2.840.")
    assert tls.certificate_end_point_hash(certs.leaf_der) == hashlib.sha256(certs.leaf_der).digest()


# -- server side ----------------------------------------------------------------

from conftest import PgCluster, ProxyFactory  # noqa: E402


class TlsPgCluster(PgCluster):
    """A second cluster that takes TCP logins over TLS only (hostssl; hostnossl is rejected)."""

    HBA = (
        "local      all  all                  trust",
        "hostssl    all  all  127.0.0.1/32    scram-sha-256",
        "hostnossl  all  all  127.0.0.1/32    reject",
    )
    SETTINGS = {**PgCluster.SETTINGS, "ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"}

    def __init__(self, cert, key) -> None:
        self._tls_files = {"server.crt": cert, "server.key": key}
        super().__init__()

    def _start_server(self, preexec_fn) -> None:
        for name, data in self._tls_files.items():      # into the data directory, owned by the server's user
            path = os.path.join(self.datadir, name)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o600)
            self._give_to_run_as(path)
        super()._start_server(preexec_fn)


@pytest.fixture(scope="module")
def pg_tls(certs):
    """Its certificate is the proxy's (``certs.cert_file``): channel binding may pass through."""
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


@pytest.fixture
def tls_proxy_factory(pg_tls):
    factory = ProxyFactory(pg_tls)
    try:
        yield factory
    finally:
        factory.stop_all()


def _server_tls(certs, mode="verify-full"):
    return {"server_tls_sslmode": mode, "server_tls_ca_file": certs.ca_file}


def test_the_tls_cluster_refuses_plain_text(pg_tls):
    with pytest.raises(psycopg.OperationalError, match="no encryption|reject"):
        psycopg.connect(pg_tls.dsn(sslmode="disable"))


@pytest.mark.parametrize("mode", ["prefer", "require", "verify-ca", "verify-full"])
def test_proxy_logs_in_to_a_tls_server(pg_tls, tls_proxy_factory, certs, mode):
    proxy = tls_proxy_factory(**_server_tls(certs, mode))
    with connect(pg_tls, proxy, sslmode="disable") as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


def test_passthrough_scram_over_tls_to_the_server(pg_tls, tls_proxy_factory, certs):
    """Pass-through: PostgreSQL checks the password over the proxy's TLS connection
    (the plaintext client sends 'n': no channel binding from it)."""
    proxy = tls_proxy_factory(**_server_tls(certs), auth_type="passthrough")
    with connect(pg_tls, proxy, sslmode="disable") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(pg_tls, proxy, sslmode="disable", password="wrong")


def test_server_modes_that_refuse(pg, pg_tls, proxy_factory, tls_proxy_factory, certs):
    # verify-full against a certificate of another CA
    proxy = tls_proxy_factory(server_tls_sslmode="verify-ca", server_tls_ca_file=certs.other_ca_file)
    with pytest.raises(psycopg.OperationalError, match="is not trusted"):
        connect(pg_tls, proxy, sslmode="disable")
    # require against a server without TLS
    proxy = proxy_factory(server_tls_sslmode="require")
    with pytest.raises(psycopg.OperationalError, match="does not support TLS, but server_tls_sslmode is require"):
        connect(pg, proxy, sslmode="disable")
    # prefer against a server without TLS: plain text
    proxy = proxy_factory(server_tls_sslmode="prefer")
    with connect(pg, proxy, sslmode="disable") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # disable against a server that wants TLS: PostgreSQL's own refusal
    proxy = tls_proxy_factory()
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        connect(pg_tls, proxy, sslmode="disable")


def test_passthrough_with_tls_on_both_sides_and_channel_binding(pg_tls, tls_proxy_factory, certs):
    """SCRAM-SHA-256-PLUS binds to the certificate of the client's TLS peer, the proxy: it
    is offered to the client only when that is the server's certificate too."""
    proxy = tls_proxy_factory(**_server_tls(certs), **certs.client_settings("require"))
    with connect(pg_tls, proxy, sslmode="require", channel_binding="require") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    proxy = tls_proxy_factory(**_server_tls(certs), **certs.client_settings("require", second=True))
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        connect(pg_tls, proxy, sslmode="require", channel_binding="require")
    # libpq over TLS then says "y" (it could bind, the server offered nothing), which a TLS
    # server rejects as a possible downgrade; without binding ("n") the login works.
    with pytest.raises(psycopg.OperationalError, match="SCRAM channel binding negotiation error"):
        connect(pg_tls, proxy, sslmode="require")
    with connect(pg_tls, proxy, sslmode="require", channel_binding="disable") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)


@pytest.mark.parametrize("auth", ["passthrough", "scram-sha-256"])
def test_big_result_through_tls_on_both_sides(pg_tls, tls_proxy_factory, certs, tmp_path, auth):
    """10 MB each way with TLS to the client and to the server (pending() on both sides)."""
    extra = {}
    if auth != "passthrough":
        extra = {"auth_type": auth, "auth_file": write_auth_file(tmp_path / "users.yaml",
                                                                  {"app": {"password": "app-secret"}})}
    proxy = tls_proxy_factory(**_server_tls(certs), **certs.client_settings("require"), **extra)
    n = 200_000
    with connect(pg_tls, proxy, sslmode="verify-full", sslrootcert=certs.ca_file) as conn:
        rows = conn.execute("SELECT i, md5(i::text) FROM generate_series(1, %s) i", (n,)).fetchall()
        assert len(rows) == n
        assert all(r == (i, hashlib.md5(str(i).encode()).hexdigest()) for i, r in enumerate(rows, 1))
        big = conn.execute("SELECT repeat('0123456789', 1000000)").fetchone()[0]
        assert big == "0123456789" * 1000000
        payload = "x" * (10 * 1024 * 1024)
        assert conn.execute("SELECT length(%s::text), md5(%s::text)", (payload, payload)).fetchone() == (
            len(payload), hashlib.md5(payload.encode()).hexdigest())


@pytest.mark.parametrize("reset_query", ["", "DISCARD ALL"])
def test_idle_tls_server_connection_killed_is_evicted_at_checkout(pg_tls, tls_proxy_factory, certs, tmp_path,
                                                                   reset_query):
    """A parked TLS connection whose backend was terminated is not handed out: the FATAL
    it was sent is a TLS record on the raw socket, which the idle probe sees (with no
    reset query, the probe alone; with one, the reset's answer is read first)."""
    auth_file = write_auth_file(tmp_path / "users.yaml", {"app": {"password": "app-secret"}})
    proxy = tls_proxy_factory(**_server_tls(certs), auth_type="scram-sha-256", auth_file=auth_file,
                              reset_query=reset_query)
    with connect(pg_tls, proxy, sslmode="disable") as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    assert wait_until(lambda: sum(proxy.pool.snapshot()["idle"].values()) == 1)
    with pg_tls.superuser_conn() as su:
        assert su.execute("SELECT pg_terminate_backend(%s)", (first,)).fetchone() == (True,)
    assert wait_until(lambda: first not in pg_tls.backend_pids(user="app"))
    before = proxy.pool.stats["stale_evicted"]
    with connect(pg_tls, proxy, sslmode="disable") as conn:
        second = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    assert second != first
    assert proxy.pool.stats["stale_evicted"] == before + 1, proxy.pool.snapshot()


def test_probe_sees_a_byte_on_an_idle_tls_socket(certs):
    """probe_alive on an SSLSocket: clean while nothing arrives; any record at all, or bytes
    already decrypted, mean it spoke."""
    from threadpool_proxy.pool import probe_alive

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.cert_file, certs.key_file)
    server_ctx.num_tickets = 0
    client_ctx = ssl.create_default_context(cafile=certs.ca_file)
    a, b = socket.socketpair()
    import threading
    go = threading.Event()
    box = {}

    def serve():
        box["s"] = server_ctx.wrap_socket(a, server_side=True)
        go.wait(10)
        box["s"].sendall(b"E")

    t = threading.Thread(target=serve)
    t.start()
    with client_ctx.wrap_socket(b, server_hostname="localhost") as s:
        assert probe_alive(s) and probe_alive(s)
        go.set()
        t.join()
        assert wait_until(lambda: not probe_alive(s))
        assert not probe_alive(s)                   # peeking consumed nothing
        assert s.recv(1) == b"E"
        assert probe_alive(s)
        box["s"].sendall(b"xy")
        assert wait_until(lambda: not probe_alive(s))
        assert s.recv(1) == b"x" and s.pending() == 1
        assert not probe_alive(s)                   # decrypted, unread
    box["s"].close()


# -- SCRAM channel binding when the proxy checks the password -------------------------

def _tls_login(proxy, certs, user="app", dbname="appdb"):
    """SSLRequest, TLS (trusting the test CA), StartupMessage: (the TLS socket, the SASL mechanisms)."""
    raw = socket.create_connection((proxy.host, proxy.port), timeout=10)
    raw.sendall(ssl_request())
    assert raw.recv(1) == b"S"
    s = ssl.create_default_context(cafile=certs.ca_file).wrap_socket(raw, server_hostname="localhost")
    s.sendall(startup_packet({"user": user, "database": dbname}))
    kind, body = read_message(s)
    assert kind == "R" and struct.unpack("!I", body[:4])[0] == 10, (kind, body)
    return s, [m.decode() for m in body[4:].split(b"\0") if m]


def _password_message(body: bytes) -> bytes:
    return b"p" + struct.pack("!I", len(body) + 4) + body


def _sasl_initial(mechanism: str, first: bytes) -> bytes:
    return _password_message(mechanism.encode() + b"\0" + struct.pack("!I", len(first)) + first)


def _scram_over_tls(proxy, certs, mechanism, password="app-secret", cb_data=None):
    """A whole SCRAM exchange by hand with scramp; returns the final message (kind, body)."""
    import scramp
    s, mechanisms = _tls_login(proxy, certs)
    with s:
        assert mechanism in mechanisms
        binding = ("tls-server-end-point", cb_data) if mechanism.endswith("-PLUS") else None
        client = scramp.ScramClient([mechanism], "app", password, channel_binding=binding)
        s.sendall(_sasl_initial(mechanism, client.get_client_first().encode()))
        kind, body = read_message(s)
        assert kind == "R" and struct.unpack("!I", body[:4])[0] == 11, (kind, body)
        client.set_server_first(body[4:].decode())
        s.sendall(_password_message(client.get_client_final().encode()))
        return read_message(s)


@pytest.fixture
def binding_proxy(pg, proxy_factory, certs, auth_file):
    """scram-sha-256 against the server's own verifiers (SCRAM pass-through to the server)."""
    return proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, **certs.client_settings("prefer"))


def test_plus_is_offered_over_tls_only(binding_proxy, certs):
    s, mechanisms = _tls_login(binding_proxy, certs)
    s.close()
    assert mechanisms == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]          # PostgreSQL's order
    with socket.create_connection((binding_proxy.host, binding_proxy.port), timeout=10) as plain:
        plain.sendall(startup_packet({"user": "app", "database": "appdb"}))
        kind, body = read_message(plain)
        assert [m for m in body[4:].split(b"\0") if m] == [b"SCRAM-SHA-256"]


def test_libpq_binds_to_the_proxy_certificate(pg, binding_proxy, certs):
    """channel_binding=require: libpq picks SCRAM-SHA-256-PLUS and checks the proxy's
    certificate hash; the proxy then logs in to the server with the ClientKey it recovered."""
    with connect(pg, binding_proxy, sslmode="verify-full", sslrootcert=certs.ca_file,
                 channel_binding="require") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    res = psql(binding_proxy, sql="SELECT 'bound'", env={"PGSSLMODE": "require", "PGCHANNELBINDING": "require"})
    assert res.returncode == 0 and res.stdout.strip() == "bound", res.stderr
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(pg, binding_proxy, sslmode="require", channel_binding="require", password="wrong")
    # over plain text there is nothing to bind to
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        connect(pg, binding_proxy, sslmode="disable", channel_binding="require")
    with connect(pg, binding_proxy, sslmode="disable") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_binding_data_must_be_the_proxy_certificate_hash(binding_proxy, certs):
    good = hashlib.sha256(certs.leaf_der).digest()
    kind, body = _scram_over_tls(binding_proxy, certs, "SCRAM-SHA-256-PLUS", cb_data=good)
    assert kind == "R" and struct.unpack("!I", body[:4])[0] == 12        # SASLFinal: bound and proven
    kind, body = _scram_over_tls(binding_proxy, certs, "SCRAM-SHA-256-PLUS", cb_data=b"\0" * 32)
    assert kind == "E"
    fields = {chr(p[0]): p[1:].decode() for p in body.split(b"\0") if p}
    assert fields["C"] == "08P01" and "channel binding check failed" in fields["M"]


def test_y_over_tls_is_a_negotiation_error(binding_proxy, certs):
    """A client that could bind but thinks the server cannot: someone removed PLUS on the way."""
    s, _ = _tls_login(binding_proxy, certs)
    with s:
        s.sendall(_sasl_initial("SCRAM-SHA-256", b"y,,n=,r=abcdefghijkl"))
        kind, body = read_message(s)
    assert kind == "E" and b"08P01" in body and b"negotiation" in body
    # "n" (the client cannot bind) is fine
    kind, body = _scram_over_tls(binding_proxy, certs, "SCRAM-SHA-256")
    assert kind == "R" and struct.unpack("!I", body[:4])[0] == 12


def test_unknown_user_gets_the_same_plus_offer(binding_proxy, certs):
    s, mechanisms = _tls_login(binding_proxy, certs, user="nobody")
    s.close()
    assert mechanisms == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


@pytest.mark.parametrize("mechanism, first, words", [
    ("SCRAM-SHA-256-PLUS", b"n,,n=,r=abc", "does not include channel binding data"),
    ("SCRAM-SHA-256-PLUS", b"y,,n=,r=abc", "does not include channel binding data"),
    ("SCRAM-SHA-256-PLUS", b"p=tls-unique,,n=,r=abc", "unsupported SCRAM channel-binding type"),
    ("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc", "includes channel binding data"),
    ("SCRAM-SHA-256", b"y,,n=,r=abc", "negotiation error"),
    ("SCRAM-SHA-1", b"n,,n=,r=abc", "invalid SASL authentication mechanism"),
])
def test_exchange_refuses_mismatched_binding_flags(mechanism, first, words):
    from threadpool_proxy.auth import AuthFailed, ScramServerExchange
    from threadpool_proxy.authfile import scram_secret_from_password
    exchange = ScramServerExchange(scram_secret_from_password("pw"), "app", channel_binding=b"h" * 32)
    with pytest.raises(AuthFailed, match=words) as info:
        exchange.handle_client_first(first, mechanism)
    assert info.value.sqlstate == "08P01"


def test_reload_reads_rotated_certificates(pg, proxy_factory, certs, tmp_path):
    """RELOAD (and SIGHUP) read the TLS files again: a rotated certificate serves new
    clients, connected ones keep theirs; a bad file changes nothing."""
    import shutil
    import threadpool_proxy
    import yaml

    cert, key = str(tmp_path / "live.crt"), str(tmp_path / "live.key")
    shutil.copy(certs.cert_file, cert)
    shutil.copy(certs.key_file, key)
    path = tmp_path / "proxy.yaml"
    target = {"host": pg.host, "port": pg.port}
    path.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": 0}, "databases": {"appdb": target},
        "client_tls_sslmode": "require", "client_tls_cert_file": "live.crt", "client_tls_key_file": "live.key"}))
    proxy = threadpool_proxy.start(str(path))
    proxy_factory.started.append(proxy)

    def presented() -> bytes:
        raw = socket.create_connection((proxy.host, proxy.port), timeout=10)
        raw.sendall(ssl_request())
        assert raw.recv(1) == b"S"
        with ssl.create_default_context(cafile=certs.ca_file).wrap_socket(raw, server_hostname="localhost") as s:
            return s.getpeercert(binary_form=True)

    assert presented() == certs.leaf_der
    with connect(pg, proxy, sslmode="require") as kept:
        shutil.copy(certs.second_cert_file, cert)
        shutil.copy(certs.second_key_file, key)
        proxy.reload()
        assert presented() != certs.leaf_der
        with connect(pg, proxy, sslmode="verify-full", sslrootcert=certs.ca_file) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with open(key, "w") as f:
            f.write("not a key\n")
        with pytest.raises(ConfigError, match="client_tls_cert_file, client_tls_key_file: cannot use"):
            proxy.reload()
        assert presented() != certs.leaf_der
        assert kept.execute("SELECT 2").fetchone() == (2,)


# -- the tls column of SHOW CLIENTS and SHOW SERVERS ---------------------------------------

def _show(pg, proxy, what, **params):
    with connect(pg, proxy, dbname="pgbouncer", **params) as console:
        cur = console.execute(f"SHOW {what}")
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def test_show_clients_tls_column(pg, proxy_factory, certs):
    proxy = proxy_factory(admin_users=["app"], **certs.client_settings("prefer"))
    with connect(pg, proxy, sslmode="require") as secure, connect(pg, proxy, sslmode="disable") as plain:
        secure_pid = secure.execute("SELECT pg_backend_pid()").fetchone()[0]
        plain.execute("SELECT 1")
        clients = _show(pg, proxy, "CLIENTS", sslmode="disable")
        app = sorted((c["tls"] for c in clients if c["database"] == "appdb"), key=len)
        assert len(app) == 2 and app[0] == "", app
        # PgBouncer's format: protocol/cipher (OpenSSL's names), as libpq sees it
        assert re.fullmatch(r"TLSv1\.[23]/[A-Z0-9_-]+", app[1]), app
        # The proxy's server connections are plain text here.
        servers = _show(pg, proxy, "SERVERS", sslmode="disable")
        assert secure_pid in {s["remote_pid"] for s in servers}
        assert all(s["tls"] == "" for s in servers)


def test_show_servers_tls_column(pg_tls, tls_proxy_factory, certs):
    proxy = tls_proxy_factory(admin_users=["app"], **_server_tls(certs))
    with connect(pg_tls, proxy, sslmode="disable") as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        version, cipher = conn.execute("SELECT version, cipher FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                                       ).fetchone()
        servers = {s["remote_pid"]: s for s in _show(pg_tls, proxy, "SERVERS", sslmode="disable")}
        assert servers[pid]["tls"] == f"{version}/{cipher}"
        clients = _show(pg_tls, proxy, "CLIENTS", sslmode="disable")
        assert all(c["tls"] == "" for c in clients)
