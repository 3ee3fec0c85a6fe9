"""Unix sockets on both sides, peer authentication, and listening like PgBouncer (address lists, *, IPv6,
TCP keepalive).

Clients reach the proxy at ``<unix_socket_dir>/.s.PGSQL.<port>`` (``psql -h
<dir>``); the proxy reaches the test cluster through its own socket
(``pg.sockdir``, where the cluster's ``local`` lines are trust).  The tests
run as root, so a client of the socket is the OS user root to ``peer``.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import stat
import tempfile
import threading
import time

import psycopg
import pytest

import threadpool_proxy

from helpers import PASSWORDS, parse_error_fields, psql, raw_login, read_message, startup_packet
from threadpool_proxy import ConfigError
from threadpool_proxy.pgcluster import free_port

OS_USER = pwd.getpwuid(os.geteuid()).pw_name


class At:
    """A psql target: host (a directory for the unix socket) and port."""

    def __init__(self, host, port) -> None:
        self.host, self.port = host, port


def write(path, text: str, mode: int = 0o600) -> str:
    path = str(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def sockdir():
    """A short directory for the proxy's socket (a unix socket path is limited to ~107 bytes)."""
    path = tempfile.mkdtemp(prefix="tpp-sock-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def userlist(tmp_path):
    return write(tmp_path / "userlist.txt", "".join(f'"{u}" "{p}"\n' for u, p in PASSWORDS.items()))


def unix_conninfo(directory, port, user="app", dbname="appdb", password=None):
    password = PASSWORDS.get(user) if password is None else password
    return f"host={directory} port={port} user={user} dbname={dbname} password={password} connect_timeout=10"


def unix_first_answer(path, user, dbname) -> tuple[list, dict | None]:
    """Over the unix socket at ``path``: the authentication request codes the proxy sends before its
    first ErrorResponse or ReadyForQuery (no password is given), and that error's fields."""
    codes = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(startup_packet({"user": user, "database": dbname}))
        while True:
            kind, body = read_message(sock)
            if kind == "E":
                return codes, parse_error_fields(body)
            if kind == "R":
                codes.append(int.from_bytes(body[:4], "big"))
                if codes[-1] != 0:
                    return codes, None
            if kind == "Z":
                return codes, None


# -- the proxy's unix socket ------------------------------------------------------------

def test_unix_socket_serves_psql_and_psycopg_beside_tcp(pg, proxy_factory, sockdir):
    proxy = proxy_factory(listen={"unix_socket_dir": sockdir, "unix_socket_mode": "0770"})
    path = os.path.join(sockdir, f".s.PGSQL.{proxy.port}")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o770
    result = psql(At(sockdir, proxy.port), sql="SELECT current_user || '@' || current_database()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "app@appdb"
    with psycopg.connect(unix_conninfo(sockdir, proxy.port), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1
    tcp = psql(proxy, sql="SELECT 1")                  # TCP still there
    assert tcp.returncode == 0, tcp.stderr
    proxy.stop()
    assert not os.path.exists(path)                    # removed at stop


def test_show_clients_names_unix_clients_as_pgbouncer_does(pg, proxy_factory, sockdir, userlist):
    proxy = proxy_factory(listen={"unix_socket_dir": sockdir}, admin_users="postgres", auth_type="md5",
                          auth_file=userlist)
    with psycopg.connect(unix_conninfo(sockdir, proxy.port), autocommit=True) as conn:
        conn.execute("SELECT 1")
        with psycopg.connect(unix_conninfo(sockdir, proxy.port, "postgres", "pgbouncer"), autocommit=True) as admin:
            cur = admin.execute("SHOW CLIENTS")
            names = [d.name for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
    mine = [r for r in rows if r["user"] == "app"]
    assert len(mine) == 1
    assert (mine[0]["addr"], mine[0]["port"], mine[0]["local_addr"], mine[0]["local_port"]) == \
        ("unix", proxy.port, "unix", proxy.port)


def test_unix_socket_only_when_listen_host_is_empty(pg, proxy_factory, sockdir):
    port = free_port()
    proxy = proxy_factory(listen={"host": "", "port": port, "unix_socket_dir": sockdir})
    assert (proxy.host, proxy.port) == (sockdir, port)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    result = psql(proxy, sql="SELECT 1")
    assert result.returncode == 0, result.stderr


def test_unix_socket_group_and_a_stale_or_busy_socket_file(pg, proxy_factory, sockdir):
    port = free_port()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.path.join(sockdir, f".s.PGSQL.{port}"))
    stale.close()                                      # a socket file nobody answers on
    others = [g for g in grp.getgrall() if g.gr_gid != os.getegid()] if os.geteuid() == 0 else []
    group = others[0] if others else grp.getgrgid(os.getegid())      # (root may give the file any group)
    proxy_factory(listen={"port": port, "unix_socket_dir": sockdir, "unix_socket_group": group.gr_name})
    assert os.stat(os.path.join(sockdir, f".s.PGSQL.{port}")).st_gid == group.gr_gid
    assert psql(At(sockdir, port), sql="SELECT 1").returncode == 0
    with pytest.raises(OSError, match="in use by another process"):      # a second proxy on the same socket
        threadpool_proxy.start({"listen": {"host": "", "port": port, "unix_socket_dir": sockdir},
                                "databases": {"*": {"host": pg.host, "port": pg.port}}})
    assert psql(At(sockdir, port), sql="SELECT 1").returncode == 0     # the first proxy still serves


def test_no_tls_over_the_unix_socket_even_when_tcp_requires_it(pg, proxy_factory, sockdir, tmp_path):
    import trustme
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    proxy = proxy_factory(listen={"unix_socket_dir": sockdir}, client_tls_sslmode="require",
                          client_tls_cert_file=str(cert), client_tls_key_file=str(key))
    assert raw_login(proxy.host, proxy.port, "app", "appdb", password=PASSWORDS["app"]).sqlstate == "28000"
    with psycopg.connect(unix_conninfo(sockdir, proxy.port) + " sslmode=prefer", autocommit=True) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone()[0] == "app"


# -- peer authentication -----------------------------------------------------------------------------

def test_peer_lets_in_the_os_user_and_its_mapped_names_only(pg, proxy_factory, sockdir, tmp_path, userlist):
    """``local all all peer map=local`` with ``local root app``: root may log in as app, not as other;
    ``local shared root peer`` (no map): root as root, served by the entry's forced user."""
    hba = write(tmp_path / "hba.conf", f"""
local  shared  {OS_USER}  peer
local  all     all        peer map=local
host   all     all        127.0.0.1/32  scram-sha-256
""")
    ident = write(tmp_path / "ident.conf", f"local {OS_USER} app\n")
    target = {"host": pg.host, "port": pg.port}
    proxy = proxy_factory(listen={"unix_socket_dir": sockdir}, auth_type="hba", auth_file=userlist,
                          auth_hba_file=hba, auth_ident_file=ident,
                          databases={"appdb": dict(target), "otherdb": dict(target),
                                     "shared": {**target, "dbname": "appdb", "user": "app"}})
    at = At(sockdir, proxy.port)
    result = psql(at, user="app", password="", sql="SELECT current_user")           # no password asked
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "app"
    refused = psql(at, user="other", dbname="otherdb", sql="SELECT 1")
    assert refused.returncode != 0
    assert 'Peer authentication failed for user "other"' in refused.stderr
    path = os.path.join(sockdir, f".s.PGSQL.{proxy.port}")
    codes, error = unix_first_answer(path, "other", "otherdb")
    assert codes == [] and error["C"] == "28000"
    assert error["M"] == 'Peer authentication failed for user "other"'
    assert unix_first_answer(path, "app", "appdb") == ([0], None)            # in without a password
    with psycopg.connect(unix_conninfo(sockdir, proxy.port, OS_USER, "shared", password=""), autocommit=True) as c:
        assert c.execute("SELECT current_user, current_database()").fetchone() == ("app", "appdb")
    tcp = psql(proxy, user="other", dbname="otherdb", sql="SELECT current_user")   # TCP: the host line
    assert tcp.returncode == 0, tcp.stderr


# -- servers reached through their unix socket ------------------------------------------------------

def test_entry_whose_host_is_a_directory_reaches_the_server_through_its_socket(pg, proxy_factory, sockdir):
    """pg's unix socket lines are trust, and only there: the server sees a local connection."""
    proxy = proxy_factory(databases={"local_appdb": {"host": pg.sockdir, "port": pg.port, "dbname": "appdb"}},
                          auth_type="trust")
    result = psql(proxy, user="app", password="", dbname="local_appdb",
                  sql="SELECT current_user, inet_server_addr() IS NULL, current_database()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "app|t|appdb"
    with psycopg.connect(f"host={proxy.host} port={proxy.port} user=app dbname=local_appdb connect_timeout=10",
                         autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        # a cancel goes to the server over its socket too
        started = time.monotonic()
        threading.Timer(0.5, conn.cancel_safe).start()      # cancel() holds the GIL in libpq: a deadlock in-process
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - started < 15
        assert pid in pg.backend_pids(user="app", dbname="appdb")


def test_passthrough_over_the_servers_unix_socket(pg, proxy_factory, sockdir):
    """Pass-through auth: PostgreSQL decides; its local lines are trust, so no password is asked."""
    proxy = proxy_factory(databases={"*": {"host": pg.sockdir, "port": pg.port}},
                          listen={"unix_socket_dir": sockdir})
    result = psql(At(sockdir, proxy.port), user="other", password="", dbname="otherdb", sql="SELECT current_user")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "other"


# -- listening like PgBouncer ------------------------------------------------------------------------

@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("hosts", ["127.0.0.1, ::1", "*"])
def test_listen_on_a_list_or_star_takes_ipv4_and_ipv6(pg, proxy_factory, hosts):
    proxy = proxy_factory(listen={"host": hosts})
    for host in ("127.0.0.1", "::1"):
        result = psql(At(host, proxy.port), sql="SELECT 1")
        assert result.returncode == 0, (host, result.stderr)


def test_listen_on_a_name_takes_every_address_it_resolves_to(pg, proxy_factory):
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
    proxy = proxy_factory(listen={"host": "localhost"})
    assert addresses
    for host in addresses:
        result = psql(At(host, proxy.port), sql="SELECT 1")
        assert result.returncode == 0, (host, result.stderr)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_literal_alone(pg, proxy_factory):
    proxy = proxy_factory(listen={"host": "::1"})
    assert proxy.host == "::1"
    result = psql(proxy, sql="SELECT 1")
    assert result.returncode == 0, result.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()


def test_tcp_keepalive_settings_reach_client_and_server_sockets(pg, proxy_factory):
    proxy = proxy_factory(tcp_keepidle=61, tcp_keepintvl=7, tcp_keepcnt=4, pool_mode="session")
    with psycopg.connect(pg.dsn(host=proxy.host, port=proxy.port), autocommit=True) as conn:
        conn.execute("SELECT 1")
        sessions = [s for s in proxy.server.sessions() if s.relay is not None]
        assert len(sessions) == 1
        for sock in (sessions[0].client, sessions[0].relay.backend.sock):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 61
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
    off = proxy_factory(tcp_keepalive=False, pool_mode="session")
    with psycopg.connect(pg.dsn(host=off.host, port=off.port), autocommit=True) as conn:
        conn.execute("SELECT 1")
        session = [s for s in off.server.sessions() if s.relay is not None][0]
        assert session.client.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert session.relay.backend.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_listen_settings_are_checked(proxy_factory, pg):
    with pytest.raises(ConfigError, match='listen.host: "" \\(no TCP\\) needs listen.unix_socket_dir'):
        proxy_factory(listen={"host": ""})
    with pytest.raises(ConfigError, match="listen.unix_socket_mode: expected a file mode"):
        proxy_factory(listen={"unix_socket_dir": "/tmp", "unix_socket_mode": "0999"})
