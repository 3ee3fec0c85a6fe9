"""auth_type hba: pg_hba.conf lines (auth_hba_file) choosing each client's method, first match wins.

The parser is tested on text written here in pg_hba.conf's documented syntax;
the login on the wire with psql, psycopg and a raw protocol client (which
shows the authentication request codes: 3 clear text, 5 md5, 10 SASL).
"""

from __future__ import annotations

import ipaddress
import os
import socket

import psycopg
import pytest
import trustme

from helpers import PASSWORDS, connect, psql, raw_login
from threadpool_proxy import ConfigError
from threadpool_proxy.hba import load, parse_ident, parse_rules, refusal

AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL = 3, 5, 10


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


# -- the parser ----------------------------------------------------------------------------

def test_first_fitting_line_wins_by_type_database_user_and_address(tmp_path):
    write(tmp_path / "admins", "alice, bob\n# a comment\ncarol\n")
    rules = load(write(tmp_path / "hba.conf", """
# TYPE  DATABASE        USER        ADDRESS             METHOD
local   all             all                             peer
host    sameuser        all         10.0.0.0/8          trust
host    appdb,"all"     @admins     10.1.0.0/16         password
hostssl all             all         192.168.1.5  255.255.255.255  cert map=certs
hostnossl all           all         192.168.1.5/32      reject
host    replication     repl        all                 scram-sha-256
host    all             all         ::1/128             md5
host    all             all         0.0.0.0/0           scram-sha-256
"""), write(tmp_path / "ident", "certs  CN-x  app\n"))

    def method(local=False, tls=False, address="10.1.2.3", database="appdb", user="alice", replication=False):
        rule = rules.match(local, tls, address, database, user, replication)
        return rule and (rule.line, rule.method)

    assert method(local=True, address=None) == (3, "peer")
    assert method(address="10.9.9.9", database="bob", user="bob") == (4, "trust")         # sameuser
    assert method(address="10.1.2.3") == (5, "password")                                   # @file: alice
    assert method(address="10.1.2.3", user="carol", database="all") == (5, "password")    # "all" quoted: a name
    assert method(address="10.1.2.3", user="carol", database="other") == (10, "scram-sha-256")
    assert method(address="10.1.2.3", user="dave") == (10, "scram-sha-256")
    assert method(address="192.168.1.5", tls=True) == (6, "cert")
    assert method(address="192.168.1.5", tls=False) == (7, "reject")
    assert method(address="192.168.1.6") == (10, "scram-sha-256")
    assert method(address="::1") == (9, "md5")
    assert method(address="::ffff:10.9.9.9", database="bob", user="bob") == (4, "trust")   # IPv4-mapped: IPv4
    assert method(address="2001:db8::1") is None                                           # no line fits
    assert method(address="203.0.113.9", user="repl", replication=True) == (8, "scram-sha-256")
    assert method(address="10.9.9.9", user="repl", database="repl", replication=True) == (8, "scram-sha-256")
    assert rules.rules[3].map == "certs" and rules.ident.allows("certs", "CN-x", "app")


def test_quoted_keywords_are_names_and_lists_may_have_spaces():
    rules = parse_rules('host "sameuser", appdb  "all" 127.0.0.1/32 md5\n', "hba.conf")
    rule = rules[0]
    assert [t.text for t in rule.databases] == ["sameuser", "appdb"]
    assert rule.fits(False, False, ipaddress.ip_address("127.0.0.1"), "sameuser", "all", False)
    assert not rule.fits(False, False, ipaddress.ip_address("127.0.0.1"), "bob", "bob", False)


def test_ident_map_allows_listed_pairs_and_all():
    ident = parse_ident("# MAP SYSTEM DB\nlocal root app\nlocal postgres all\n", "ident.conf")
    assert ident.allows("local", "root", "app")
    assert not ident.allows("local", "root", "other")
    assert ident.allows("local", "postgres", "anyone")
    assert not ident.allows("other", "root", "app")


@pytest.mark.parametrize("line, message", [
    ("host all all 127.0.0.1/32 ident", "method ident is not supported"),
    ("host all all 127.0.0.1/32 gss", "method gss is not supported"),
    ("host all all 127.0.0.1/32 magic", "invalid authentication method 'magic'"),
    ("hostgssenc all all 127.0.0.1/32 md5", "invalid connection type 'hostgssenc'"),
    ("host all all samenet md5", "samenet is not supported"),
    ("host all all db.example.com md5", "is not an IP address or CIDR (host names are not supported)"),
    ("host all all 127.0.0.1 md5", "invalid netmask 'md5'"),
    ("host all all 300.0.0.1/32 md5", "invalid address '300.0.0.1/32'"),
    ("host all +admins 127.0.0.1/32 md5", "group membership (+admins) is not supported"),
    ("host samerole all 127.0.0.1/32 md5", "samerole is not supported"),
    ("host all all 127.0.0.1/32 peer", "peer authentication is only supported on local sockets"),
    ("host all all 127.0.0.1/32 cert", "cert authentication is only supported on hostssl connections"),
    ("host all all 127.0.0.1/32 md5 clientcert=verify-full", "unsupported option 'clientcert=verify-full'"),
    ("local all all peer map=nomap", "map=nomap: no such map"),
    ("host all all 127.0.0.1/32", "expected TYPE DATABASE USER ADDRESS METHOD"),
    ('host "all all 127.0.0.1/32 md5', "unterminated quoted string"),
    ("host all, all 127.0.0.1/32 md5", "expected TYPE DATABASE USER ADDRESS METHOD"),
    ("host all all 127.0.0.1 255.0.0.255 md5", "invalid netmask '255.0.0.255'"),
    ("local all @missing trust", "cannot read"),
])
def test_line_not_understood_stops_loading_naming_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "hba.conf", f"# comment\n\n{line}\n")
    with pytest.raises(ConfigError) as exc_info:
        load(path)
    assert str(exc_info.value).startswith(f"{path} line 3: "), str(exc_info.value)
    assert message in str(exc_info.value)


def test_refusal_uses_postgresqls_words():
    assert refusal(False, False, "127.0.0.1", "appdb", "app", False) == \
        'no pg_hba.conf entry for host "127.0.0.1", user "app", database "appdb", no encryption'
    assert refusal(False, True, "::1", "appdb", "app", True) == \
        'pg_hba.conf rejects connection for host "::1", user "app", database "appdb", SSL encryption'
    assert refusal(True, False, None, "appdb", "app", False) == \
        'no pg_hba.conf entry for host "[local]", user "app", database "appdb", no encryption'


# -- on the wire ---------------------------------------------------------------------------

@pytest.fixture
def userlist(tmp_path):
    return write(tmp_path / "userlist.txt", "".join(f'"{u}" "{p}"\n' for u, p in PASSWORDS.items()))


def hba_proxy(proxy_factory, tmp_path, userlist, text: str, **settings):
    return proxy_factory(auth_type="hba", auth_file=userlist, auth_hba_file=write(tmp_path / "hba.conf", text),
                         **settings)


def test_each_line_decides_the_method_and_no_line_refuses_with_postgresql_words(pg, proxy_factory, tmp_path,
                                                                                 userlist):
    proxy = hba_proxy(proxy_factory, tmp_path, userlist, """
host  all        md5user    127.0.0.1/32  md5
host  otherdb    other      127.0.0.1/32  password
host  postgres   trustuser  127.0.0.1/32  trust
host  all        postgres   127.0.0.1/32  reject
host  appdb      app        127.0.0.1/32  scram-sha-256
""")
    ok = raw_login(proxy.host, proxy.port, "md5user", "postgres", password=PASSWORDS["md5user"])
    # md5 with a plain password in the file: the method most stored users get (SCRAM here, as for
    # an unknown user: the challenge does not tell who exists), as PostgreSQL's md5 gives SCRAM
    # to a user stored as a SCRAM verifier.
    assert ok.ok and ok.auth_requests == [AUTH_SASL, 11, 12, 0], ok.error
    ok = raw_login(proxy.host, proxy.port, "other", "otherdb", password=PASSWORDS["other"])
    assert ok.ok and ok.auth_requests == [AUTH_CLEARTEXT, 0], ok.error
    ok = raw_login(proxy.host, proxy.port, "trustuser", "postgres")
    assert ok.ok and ok.auth_requests == [0], ok.error
    ok = raw_login(proxy.host, proxy.port, "app", "appdb", password=PASSWORDS["app"])
    assert ok.ok and ok.auth_requests[0] == AUTH_SASL, ok.error
    bad = raw_login(proxy.host, proxy.port, "other", "otherdb", password="wrong")
    assert bad.sqlstate == "28P01" and bad.error["M"] == 'password authentication failed for user "other"'

    rejected = raw_login(proxy.host, proxy.port, "postgres", "postgres", password=PASSWORDS["postgres"])
    assert rejected.sqlstate == "28000" and rejected.auth_requests == []
    assert rejected.error["M"] == ('pg_hba.conf rejects connection for host "127.0.0.1", user "postgres", '
                                   'database "postgres", no encryption')
    unmatched = raw_login(proxy.host, proxy.port, "app", "otherdb", password=PASSWORDS["app"])
    assert unmatched.sqlstate == "28000" and unmatched.auth_requests == []
    assert unmatched.error["M"] == ('no pg_hba.conf entry for host "127.0.0.1", user "app", database "otherdb", '
                                    'no encryption')
    result = psql(proxy, user="app", dbname="otherdb", sql="SELECT 1")
    assert result.returncode != 0
    assert 'no pg_hba.conf entry for host "127.0.0.1", user "app", database "otherdb", no encryption' \
        in result.stderr
    with connect(pg, proxy, user="md5user", dbname="postgres") as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "md5user"


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv4_and_ipv6_loopback_follow_their_own_lines(pg, proxy_factory, tmp_path, userlist):
    proxy = hba_proxy(proxy_factory, tmp_path, userlist, """
host  all  app  127.0.0.1/32  scram-sha-256
host  all  app  ::1/128       reject
""", listen={"host": "127.0.0.1,::1"})
    ok = raw_login("127.0.0.1", proxy.port, "app", "appdb", password=PASSWORDS["app"])
    assert ok.ok, ok.error
    rejected = raw_login("::1", proxy.port, "app", "appdb", password=PASSWORDS["app"])
    assert rejected.sqlstate == "28000"
    assert rejected.error["M"] == ('pg_hba.conf rejects connection for host "::1", user "app", database "appdb", '
                                   'no encryption')
    result = psql(type("T", (), {"host": "::1", "port": proxy.port}), sql="SELECT 1")
    assert 'pg_hba.conf rejects connection for host "::1"' in result.stderr


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hba-tls")
    ca = trustme.CA()
    files = {}

    def put(name, data):
        path = str(directory / name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, 0o600)
        files[name] = path

    put("ca.pem", ca.cert_pem.bytes())
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    put("proxy.crt", b"".join(p.bytes() for p in leaf.cert_chain_pems))
    put("proxy.key", leaf.private_key_pem.bytes())
    for name in ("app", "md5user"):
        client = ca.issue_cert(name, common_name=name)
        put(f"{name}.crt", b"".join(p.bytes() for p in client.cert_chain_pems))
        put(f"{name}.key", client.private_key_pem.bytes())
    return files


def test_hostssl_and_hostnossl_tell_tls_clients_from_plain_ones(pg, proxy_factory, tmp_path, userlist, certs):
    proxy = hba_proxy(proxy_factory, tmp_path, userlist, """
hostssl    all       all      127.0.0.1/32  scram-sha-256
hostnossl  all       other    127.0.0.1/32  reject
hostnossl  all       all      127.0.0.1/32  md5
""", client_tls_sslmode="prefer", client_tls_cert_file=certs["proxy.crt"], client_tls_key_file=certs["proxy.key"])
    with connect(pg, proxy, user="other", dbname="otherdb", sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone()[0] == "other"
    with pytest.raises(psycopg.OperationalError,
                       match='pg_hba.conf rejects connection for host "127.0.0.1", user "other", '
                             'database "otherdb", no encryption'):
        connect(pg, proxy, user="other", dbname="otherdb", sslmode="disable")
    plain = raw_login(proxy.host, proxy.port, "app", "appdb", password=PASSWORDS["app"])     # no TLS
    assert plain.ok and plain.auth_requests == [AUTH_SASL, 11, 12, 0], plain.error     # (md5: see above)


def test_cert_lines_check_the_certificates_common_name(pg, proxy_factory, tmp_path, userlist, certs):
    proxy = hba_proxy(proxy_factory, tmp_path, userlist, """
hostssl    appdb     app      127.0.0.1/32  cert
hostssl    all       all      127.0.0.1/32  scram-sha-256
""", client_tls_sslmode="verify-ca", client_tls_cert_file=certs["proxy.crt"],
        client_tls_key_file=certs["proxy.key"], client_tls_ca_file=certs["ca.pem"])

    def tls_connect(user, dbname, cert, password=None):
        return connect(pg, proxy, user=user, dbname=dbname, password=password, sslmode="verify-full",
                       sslrootcert=certs["ca.pem"], sslcert=certs[f"{cert}.crt"], sslkey=certs[f"{cert}.key"])

    with tls_connect("app", "appdb", "app", password="not asked") as conn:       # cert: no password asked
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone()[0] == "app"
    with pytest.raises(psycopg.OperationalError, match='certificate authentication failed for user "app"'):
        tls_connect("app", "appdb", "md5user")                                 # another name's certificate
    with tls_connect("other", "otherdb", "app", password=PASSWORDS["other"]) as conn:   # the next line: scram
        assert conn.execute("SELECT current_user").fetchone()[0] == "other"


def test_auth_type_hba_needs_its_file_and_a_bad_file_stops_start_up(proxy_factory, tmp_path, userlist):
    with pytest.raises(ConfigError, match="auth_hba_file: required when auth_type is hba"):
        proxy_factory(auth_type="hba", auth_file=userlist)
    bad = write(tmp_path / "hba.conf", "host all all 127.0.0.1/32 ldap\n")
    with pytest.raises(ConfigError, match=r"hba\.conf line 1: method ldap is not supported"):
        proxy_factory(auth_type="hba", auth_file=userlist, auth_hba_file=bad)


def test_reload_reads_the_hba_file_again_and_keeps_the_old_one_when_bad(pg, proxy_factory, tmp_path, userlist):
    proxy = hba_proxy(proxy_factory, tmp_path, userlist, "host all all 127.0.0.1/32 reject\n")
    assert raw_login(proxy.host, proxy.port, "app", "appdb", password=PASSWORDS["app"]).sqlstate == "28000"
    write(tmp_path / "hba.conf", "host all all 127.0.0.1/32 scram-sha-256\n")
    proxy.reload()
    assert raw_login(proxy.host, proxy.port, "app", "appdb", password=PASSWORDS["app"]).ok
    write(tmp_path / "hba.conf", "host all all 127.0.0.1/32 kerberos\n")
    with pytest.raises(ConfigError, match="line 1: invalid authentication method 'kerberos'"):
        proxy.reload()
    assert raw_login(proxy.host, proxy.port, "app", "appdb", password=PASSWORDS["app"]).ok


def test_console_logins_go_through_the_hba_file_as_database_pgbouncer(pg, proxy_factory, tmp_path, userlist):
    proxy = hba_proxy(proxy_factory, tmp_path, userlist, """
host  pgbouncer  postgres  127.0.0.1/32  scram-sha-256
host  pgbouncer  other     127.0.0.1/32  reject
""", admin_users=["postgres", "other"])
    result = psql(proxy, user="postgres", dbname="pgbouncer", sql="SHOW VERSION")
    assert result.returncode == 0, result.stderr
    refused = raw_login(proxy.host, proxy.port, "other", "pgbouncer", password=PASSWORDS["other"])
    assert refused.error["M"] == ('pg_hba.conf rejects connection for host "127.0.0.1", user "other", '
                                  'database "pgbouncer", no encryption')
