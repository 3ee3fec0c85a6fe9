"""Proxy-terminated authentication (auth_type scram-sha-256, md5, trust, auth_query) on a real PostgreSQL.

The auth files hold the server's own verifiers (read from pg_authid), so the
proxy logs in to PostgreSQL with the ClientKey each client proves (SCRAM
pass-through) or with the stored md5 hash.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest
import scramp

from helpers import PASSWORDS, connect, psql, raw_login, read_message, startup_packet, wait_until, write_auth_file
from threadpool_proxy import ConfigError
from threadpool_proxy.authfile import format_scram_verifier, scram_secret_from_password

FAILED = 'password authentication failed for user "{}"'


# -- fixtures and helpers -------------------------------------------------------

@pytest.fixture
def scram_proxy(proxy_factory, auth_file):
    return proxy_factory(auth_type="scram-sha-256", auth_file=auth_file)


def authenticator(proxy):
    return proxy.server.logins


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def sasl_initial(data: bytes, mechanism: bytes = b"SCRAM-SHA-256") -> bytes:
    return msg(b"p", mechanism + b"\0" + struct.pack("!i", len(data)) + data)


def open_login(proxy, user="app", dbname="appdb") -> socket.socket:
    """A socket whose StartupMessage was sent; the caller reads the Authentication request."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.sendall(startup_packet({"user": user, "database": dbname}))
    return sock


def auth_request(sock) -> tuple[int, bytes]:
    kind, body = read_message(sock)
    assert kind == "R", (kind, body)
    return struct.unpack("!i", body[:4])[0], body[4:]


def error_fields(sock) -> dict:
    """Read up to the ErrorResponse; its fields."""
    while True:
        kind, body = read_message(sock)
        if kind == "E":
            return {chr(p[0]): p[1:].decode() for p in body.split(b"\0") if p}


def scram_client_first(sock, user="app", password="app-secret"):
    """Answer AuthenticationSASL; returns (scramp client, client-first bytes, server-first text)."""
    code, _ = auth_request(sock)
    assert code == 10
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    first = client.get_client_first().encode()
    sock.sendall(sasl_initial(first))
    code, payload = auth_request(sock)
    assert code == 11
    return client, first, payload.decode()


def backend_logins(pg, user, dbname) -> int:
    """'connection authorized' lines PostgreSQL logged for user/dbname so far."""
    with open(pg.logfile, encoding="utf-8", errors="replace") as f:
        return len(re.findall(rf"connection authorized: user={user} database={dbname}\b", f.read()))


# -- right and wrong passwords ------------------------------------------------------

@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_right_password_logs_in_with_psycopg_and_psql(pg, proxy_factory, auth_file, mode):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, pool_mode=mode)
    with connect(pg, proxy) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("app", "appdb")
        assert conn.info.parameter_status("server_encoding") == "UTF8"
    res = psql(proxy, sql="SELECT current_user || '@' || current_database()")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "app@appdb"
    # the client authenticated against the proxy; the proxy logged in by itself
    good = raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret")
    assert good.ok and good.auth_requests == [10, 11, 12, 0]
    assert authenticator(proxy).server_logins >= 1


def test_wrong_password_and_unknown_user_fail_alike_with_postgres_wording(pg, scram_proxy):
    before = pg.backend_pids()
    wrong = raw_login(scram_proxy.host, scram_proxy.port, "app", "appdb", password="wrong")
    unknown = raw_login(scram_proxy.host, scram_proxy.port, "mallory", "appdb", password="whatever")
    for res, user in ((wrong, "app"), (unknown, "mallory")):
        assert not res.ok
        assert res.sqlstate == "28P01"
        assert res.error["S"] == "FATAL"
        assert res.error["M"] == FAILED.format(user)
        assert res.auth_requests == [10, 11]        # failed at the same step, no SASLFinal
    assert authenticator(scram_proxy).server_logins == 0
    assert not (pg.backend_pids() - before)
    # PostgreSQL itself words it the same way
    direct = raw_login(pg.host, pg.port, "app", "appdb", password="wrong")
    assert (direct.sqlstate, direct.error["M"]) == (wrong.sqlstate, wrong.error["M"])


FAILURE_DELAY = 0.3     # README, Authentication: a failed login is answered "after the same fixed delay (0.3 s)"


def test_failures_take_the_same_fixed_delay_whether_or_not_the_user_exists(pg, scram_proxy):
    def failing_final(user):
        with open_login(scram_proxy, user) as sock:
            client, _, server_first = scram_client_first(sock, user, "wrong password")
            client.set_server_first(server_first)
            final = client.get_client_final().encode()
            started = time.monotonic()
            sock.sendall(msg(b"p", final))
            fields = error_fields(sock)
            return time.monotonic() - started, fields

    timings = {}
    for user in ("app", "mallory") * 3:     # the fastest of three each: a stall of the machine is no signal
        elapsed, fields = failing_final(user)
        assert fields["C"] == "28P01" and fields["M"] == FAILED.format(user)
        assert elapsed >= FAILURE_DELAY - 0.01, (user, elapsed)
        timings.setdefault(user, []).append(elapsed)
    assert abs(min(timings["app"]) - min(timings["mallory"])) < 0.1, timings


def test_user_without_scram_verifier_fails_scram_like_an_unknown_one(pg, scram_proxy):
    # md5user's auth file entry is an md5 hash: SCRAM cannot succeed, as in PostgreSQL
    res = raw_login(scram_proxy.host, scram_proxy.port, "md5user", "appdb", password="md5-secret")
    assert res.sqlstate == "28P01" and res.auth_requests == [10, 11]


# -- server login with the proxy's credentials ---------------------------------------

def test_auth_file_verifier_other_than_the_servers_fails_the_server_login_clearly(pg, proxy_factory, tmp_path):
    # Same password, another salt: the client proves it to the proxy, but its
    # ClientKey cannot log in to PostgreSQL, whose verifier has the other salt.
    mine = format_scram_verifier(scram_secret_from_password("app-secret"))
    path = write_auth_file(tmp_path / "users.yaml", {"app": {"scram": mine}})
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=path)
    before = pg.backend_pids(user="app")
    res = raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret")
    assert not res.ok
    assert res.auth_requests == [10, 11, 12, 0]     # the proxy accepted the client
    assert res.sqlstate == "28000"
    assert 'could not log in to the server for user "app"' in res.error["M"]
    assert "differs" in res.error["M"]
    assert authenticator(proxy).server_login_failures == 1
    assert proxy.pool.open_count(proxy.server.key_for(proxy.config.databases["appdb"], "app", "appdb")) == 0
    assert wait_until(lambda: not (pg.backend_pids(user="app") - before))


def test_server_refusing_the_proxys_password_is_reported_to_the_client(pg, proxy_factory, tmp_path):
    path = write_auth_file(tmp_path / "users.yaml", {"app": {"password": "not-the-servers-password"}})
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=path)
    res = raw_login(proxy.host, proxy.port, "app", "appdb", password="not-the-servers-password")
    assert res.auth_requests == [10, 11, 12, 0]
    assert res.sqlstate == "28000"
    assert res.error["M"] == ('threadpool_proxy could not log in to the server for user "app": '
                              'password authentication failed for user "app"')


def test_plain_password_entry_logs_in_to_the_server_with_the_password(pg, proxy_factory, tmp_path):
    path = write_auth_file(tmp_path / "users.yaml", {"app": {"password": "app-secret"}})
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=path)
    with connect(pg, proxy) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)


def test_missing_database_is_reported_as_postgresql_words_it(pg, scram_proxy):
    res = raw_login(scram_proxy.host, scram_proxy.port, "app", "nosuchdb", password="app-secret")
    assert res.sqlstate == "3D000"
    assert res.error["M"] == 'database "nosuchdb" does not exist'


# -- malformed exchanges ---------------------------------------------------------

def test_replayed_client_final_is_rejected(pg, scram_proxy):
    with open_login(scram_proxy) as sock:
        client, first, server_first = scram_client_first(sock)
        client.set_server_first(server_first)
        final = client.get_client_final().encode()
        sock.sendall(msg(b"p", final))
        assert auth_request(sock)[0] == 12
        assert auth_request(sock)[0] == 0
        while read_message(sock)[0] != "Z":
            pass
    # an eavesdropper replays both messages on a new connection
    with open_login(scram_proxy) as sock:
        assert auth_request(sock)[0] == 10
        sock.sendall(sasl_initial(first))
        code, payload = auth_request(sock)
        assert code == 11 and payload.decode() != server_first   # a fresh server nonce
        sock.sendall(msg(b"p", final))
        fields = error_fields(sock)
        assert fields["C"] in ("08P01", "28P01")
        assert "nonce" in fields["M"]
    assert authenticator(scram_proxy).server_logins == 1


@pytest.mark.parametrize("case", ["length-mismatch", "no-mechanism-end", "garbage-first", "garbage-final",
                                  "oversized", "wrong-message-type", "plus-mechanism"])
def test_malformed_or_oversized_sasl_messages_get_08P01(pg, scram_proxy, case):
    before = pg.backend_pids()
    with open_login(scram_proxy) as sock:
        assert auth_request(sock)[0] == 10
        if case == "length-mismatch":
            sock.sendall(msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!i", 100) + b"n,,n=,r=abc"))
        elif case == "no-mechanism-end":
            sock.sendall(msg(b"p", b"SCRAM-SHA-256"))
        elif case == "garbage-first":
            sock.sendall(sasl_initial(b"x,,garbage"))
        elif case == "garbage-final":
            sock.sendall(sasl_initial(b"n,,n=,r=abcdefgh"))
            assert auth_request(sock)[0] == 11
            sock.sendall(msg(b"p", b"c=biws,r=nothing"))
        elif case == "oversized":
            sock.sendall(b"p" + struct.pack("!I", 10_000_000) + b"SCRAM-SHA-256\0")
        elif case == "wrong-message-type":
            sock.sendall(msg(b"Q", b"SELECT 1\0"))
        elif case == "plus-mechanism":
            sock.sendall(sasl_initial(b"p=tls-server-end-point,,n=,r=abc", b"SCRAM-SHA-256-PLUS"))
        fields = error_fields(sock)
    assert fields["C"] == "08P01", fields
    assert fields["S"] == "FATAL"
    assert not (pg.backend_pids() - before)
    assert authenticator(scram_proxy).server_logins == 0


def test_client_stalling_mid_scram_times_out_and_never_reaches_a_backend(pg, proxy_factory, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, client_login_timeout=1)
    before = pg.backend_pids()
    with open_login(proxy) as sock:
        started = time.monotonic()
        scram_client_first(sock)          # ... and never sends client-final
        fields = error_fields(sock)
        elapsed = time.monotonic() - started
        assert sock.recv(1) == b""        # closed
    assert fields["C"] == "08P01" and "client_login_timeout" in fields["M"]
    assert 0.8 <= elapsed < 3, elapsed
    assert not (pg.backend_pids() - before)
    assert authenticator(proxy).server_logins == 0
    assert wait_until(lambda: proxy.server.session_count() == 0)


# -- the auth file ------------------------------------------------------------------

def test_auth_file_readable_by_others_stops_start_up(pg, proxy_factory, rolpasswords, tmp_path):
    path = write_auth_file(tmp_path / "users.yaml", {"app": {"scram": rolpasswords["app"]}}, mode=0o644)
    with pytest.raises(ConfigError, match=r"auth_file: .*mode 0644"):
        proxy_factory(auth_type="scram-sha-256", auth_file=path)
    # and the port it would have used is not left bound: a good file starts fine
    os.chmod(path, 0o600)
    proxy_factory(auth_type="scram-sha-256", auth_file=path)


def test_reload_picks_up_a_new_user_and_keeps_old_contents_on_error(pg, proxy_factory, rolpasswords, tmp_path):
    path = write_auth_file(tmp_path / "users.yaml", {"app": {"scram": rolpasswords["app"]}})
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=path)
    assert raw_login(proxy.host, proxy.port, "other", "otherdb", password="other-secret").sqlstate == "28P01"
    write_auth_file(path, {"app": {"scram": rolpasswords["app"]}, "other": {"scram": rolpasswords["other"]}})
    assert authenticator(proxy).reload() == 2
    with connect(pg, proxy, user="other", dbname="otherdb") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("other",)
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="0644"):
        authenticator(proxy).reload()
    assert raw_login(proxy.host, proxy.port, "other", "otherdb", password="other-secret").ok


# -- pooling with proxy auth ----------------------------------------------------

def _pgbench():
    return shutil.which("pgbench") or "/usr/bin/pgbench"


def test_pgbench_connect_per_transaction_opens_no_backend_per_client(pg, proxy_factory, auth_file):
    env = dict(os.environ, PGPASSWORD=PASSWORDS["app"])
    init = subprocess.run([_pgbench(), "-i", "-s", "1", "-q", "-h", pg.host, "-p", str(pg.port),
                           "-U", "app", "appdb"], capture_output=True, text=True, env=env, timeout=120)
    assert init.returncode == 0, init.stderr
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, pool_mode="transaction")
    logins_before = backend_logins(pg, "app", "appdb")
    run = subprocess.run([_pgbench(), "-n", "-C", "-S", "-t", "20", "-c", "4", "-h", proxy.host,
                          "-p", str(proxy.port), "-U", "app", "appdb"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "number of transactions actually processed: 80/80" in run.stdout, run.stdout
    logins = authenticator(proxy).server_logins
    # (the server writes its log a moment later: wait for every login, not for the first)
    in_log = (wait_until(lambda: backend_logins(pg, "app", "appdb") - logins_before == logins, timeout=15)
              and logins) or backend_logins(pg, "app", "appdb") - logins_before
    print(f"\npgbench -C: 80 client connections, {logins} server logins by the proxy, "
          f"{in_log} in the PostgreSQL log; pool {proxy.pool.snapshot()['stats']}")
    pool_size = proxy.config.databases["appdb"].pool_size
    assert 1 <= logins <= pool_size
    assert in_log == logins
    assert len(pg.backend_pids(user="app", dbname="appdb")) <= pool_size


def test_session_mode_reuses_a_parked_backend_without_a_new_login(pg, proxy_factory, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, pool_mode="session")
    key = proxy.server.key_for(proxy.config.databases["appdb"], "app", "appdb")
    with connect(pg, proxy) as conn:
        first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.execute("SET work_mem = '7MB'")
    assert wait_until(lambda: proxy.pool.idle_count(key) == 1)
    with connect(pg, proxy) as conn:
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
        assert conn.execute("SHOW work_mem").fetchone()[0] != "7MB"      # reset before parking
    assert authenticator(proxy).server_logins == 1


def test_clients_never_get_a_backend_of_another_user_or_database(pg, proxy_factory, auth_file):
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file, pool_mode="transaction", pool_size=2)
    identities = [("app", "appdb"), ("other", "otherdb"), ("app", "otherdb"), ("other", "appdb")]
    seen = {ident: set() for ident in identities}
    errors = []

    def client(user, dbname):
        try:
            for _ in range(4):
                with connect(pg, proxy, user=user, dbname=dbname) as conn:
                    for _ in range(5):
                        who = conn.execute("SELECT current_user, current_database(), pg_backend_pid()").fetchone()
                        if who[:2] != (user, dbname):
                            errors.append(f"{user}@{dbname} got {who[:2]}")
                        seen[(user, dbname)].add(who[2])
        except Exception as exc:     # reported below
            errors.append(f"{user}@{dbname}: {exc!r}")

    threads = [threading.Thread(target=client, args=ident) for ident in identities for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for a in identities:
        assert 1 <= len(seen[a]) <= 2, (a, seen[a])
        for b in identities:
            if a != b:
                assert not (seen[a] & seen[b]), (a, b)


def test_welcome_parameters_match_a_direct_login_with_the_clients_settings(pg, scram_proxy):
    assert raw_login(scram_proxy.host, scram_proxy.port, "app", "appdb", password="app-secret").ok
    options = {"application_name": "welcome-test", "DateStyle": "SQL, DMY", "TimeZone": "Asia/Tokyo"}
    via_proxy = raw_login(scram_proxy.host, scram_proxy.port, "app", "appdb", password="app-secret",
                          options=options)
    direct = raw_login(pg.host, pg.port, "app", "appdb", password="app-secret", options=options)
    assert via_proxy.ok and direct.ok
    assert via_proxy.parameters == direct.parameters
    for name in ("server_version", "server_encoding", "client_encoding", "DateStyle", "TimeZone",
                 "integer_datetimes", "standard_conforming_strings", "IntervalStyle",
                 "application_name", "is_superuser", "session_authorization"):
        assert name in via_proxy.parameters
    # the next plain client sees the server defaults again, not the previous client's settings
    plain = raw_login(scram_proxy.host, scram_proxy.port, "app", "appdb", password="app-secret")
    plain_direct = raw_login(pg.host, pg.port, "app", "appdb", password="app-secret")
    assert plain.parameters == plain_direct.parameters
    assert authenticator(scram_proxy).server_logins == 1      # one backend served all three


# -- md5, trust, auth_query --------------------------------------------------------

def test_md5_auth_type_with_an_md5_hash_entry(pg, proxy_factory, auth_file):
    proxy = proxy_factory(auth_type="md5", auth_file=auth_file)
    res = raw_login(proxy.host, proxy.port, "md5user", "appdb", password="md5-secret")
    assert res.ok and res.auth_requests == [5, 0]
    with connect(pg, proxy, user="md5user") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("md5user",)
    bad = raw_login(proxy.host, proxy.port, "md5user", "appdb", password="nope")
    assert (bad.sqlstate, bad.error["M"], bad.auth_requests) == ("28P01", FAILED.format("md5user"), [5])
    # an unknown user gets what most users of the file get: SCRAM here (2 verifiers, 1 md5 hash);
    # see test_security_enumeration.py
    unknown = raw_login(proxy.host, proxy.port, "nobody", "appdb", password="nope")
    assert (unknown.sqlstate, unknown.error["M"], unknown.auth_requests) == (
        "28P01", FAILED.format("nobody"), [10, 11])
    # a user with only a SCRAM verifier does SCRAM, as PostgreSQL's md5 method does
    scram_user = raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret")
    assert scram_user.ok and scram_user.auth_requests == [10, 11, 12, 0]


def test_per_database_auth_type_overrides_the_default(pg, proxy_factory, auth_file):
    target = {"host": pg.host, "port": pg.port}
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=auth_file,
                          databases={"appdb": dict(target), "otherdb": dict(target, auth_type="passthrough")})
    assert raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret").auth_requests == [10, 11, 12, 0]
    through = raw_login(proxy.host, proxy.port, "app", "otherdb", password="app-secret")
    assert through.ok and through.auth_requests == [10, 11, 12, 0]     # PostgreSQL's own exchange, relayed
    assert authenticator(proxy).server_logins == 1


def test_trust_logs_in_without_a_password(pg, proxy_factory):
    proxy = proxy_factory(auth_type="trust")
    res = raw_login(proxy.host, proxy.port, "trustuser", "appdb")
    assert res.ok and res.auth_requests == [0]
    with connect(pg, proxy, user="trustuser", password="") as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("trustuser",)
    # the proxy has no password for app, and PostgreSQL wants one: a clear error
    app = raw_login(proxy.host, proxy.port, "app", "appdb")
    assert app.auth_requests == [0] and app.sqlstate == "28000"
    assert 'could not log in to the server for user "app"' in app.error["M"]


def test_trust_refuses_clients_that_are_not_on_loopback(pg, proxy_factory):
    from threadpool_proxy.errors import ClientFatal
    from threadpool_proxy.login import LoginRequest

    proxy = proxy_factory(auth_type="trust")
    request = LoginRequest(user="trustuser", database="appdb", db=proxy.config.databases["appdb"],
                           key="unused", address=("192.0.2.7", 40000))

    with pytest.raises(ClientFatal, match="loopback"):
        authenticator(proxy).authenticate(None, request)     # refused before any I/O with the client


@pytest.fixture
def auth_query_proxy(pg, proxy_factory):
    return proxy_factory(auth_type="auth_query", auth_user="postgres", auth_password=PASSWORDS["postgres"],
                         auth_query_cache_seconds=30)


def test_auth_query_fetches_the_verifier_from_postgresql(pg, auth_query_proxy):
    proxy = auth_query_proxy
    with connect(pg, proxy) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("app", "appdb")
    res = psql(proxy, sql="SELECT current_user")
    assert res.returncode == 0 and res.stdout.strip() == "app", res.stderr
    assert authenticator(proxy).auth_queries == 1         # cached for the second login
    wrong = raw_login(proxy.host, proxy.port, "app", "appdb", password="wrong")
    unknown = raw_login(proxy.host, proxy.port, "mallory", "appdb", password="whatever")
    assert (wrong.sqlstate, wrong.error["M"], wrong.auth_requests) == ("28P01", FAILED.format("app"), [10, 11])
    assert (unknown.sqlstate, unknown.error["M"], unknown.auth_requests) == (
        "28P01", FAILED.format("mallory"), [10, 11])
    # an md5 password in pg_shadow means an md5 challenge, and the hash logs in to the server
    md5 = raw_login(proxy.host, proxy.port, "md5user", "appdb", password="md5-secret")
    assert md5.ok and md5.auth_requests == [5, 0]
    # the auth_query connection is the proxy's own, never a client's backend
    with connect(pg, proxy, user="postgres", dbname="appdb") as conn:
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid() "
                            "AND application_name = 'threadpool_proxy auth_query'").fetchone() == (0,)
    snapshot = proxy.pool.snapshot()
    assert any(k.endswith("\0auth_query") for k in snapshot["idle"])


def test_auth_query_binds_the_user_name_as_a_parameter(pg, auth_query_proxy):
    proxy = auth_query_proxy
    for user in ("x' OR usename='app", "app'--", 'robert"); DROP TABLE x; --'):
        res = raw_login(proxy.host, proxy.port, user, "appdb", password="app-secret")
        assert res.sqlstate == "28P01", (user, res.error)
    assert raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret").ok


def test_auth_query_reload_forgets_cached_results(pg, auth_query_proxy):
    proxy = auth_query_proxy
    assert raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret").ok
    assert raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret").ok
    assert authenticator(proxy).auth_queries == 1
    authenticator(proxy).reload()
    assert raw_login(proxy.host, proxy.port, "app", "appdb", password="app-secret").ok
    assert authenticator(proxy).auth_queries == 2


def test_no_password_proof_or_key_reaches_the_log(pg, proxy_factory, rolpasswords, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="threadpool_proxy")
    other_salt = format_scram_verifier(scram_secret_from_password("other-secret"))
    path = write_auth_file(tmp_path / "users.yaml", {"app": {"scram": rolpasswords["app"]},
                                                      "other": {"scram": other_salt},
                                                      "md5user": {"md5": rolpasswords["md5user"]}})
    proxy = proxy_factory(auth_type="md5", auth_file=path)
    proofs = []
    with open_login(proxy) as sock:
        client, _, server_first = scram_client_first(sock)
        client.set_server_first(server_first)
        final = client.get_client_final()
        proofs.append(final.rsplit("p=", 1)[1])
        sock.sendall(msg(b"p", final.encode()))
        while read_message(sock)[0] != "Z":
            pass
    assert not raw_login(proxy.host, proxy.port, "app", "appdb", password="wrong-app-password").ok
    assert not raw_login(proxy.host, proxy.port, "other", "otherdb", password="other-secret").ok
    assert raw_login(proxy.host, proxy.port, "md5user", "appdb", password="md5-secret").ok
    assert not raw_login(proxy.host, proxy.port, "md5user", "appdb", password="wrong-md5").ok
    text = caplog.text
    assert "password authentication failed" in text      # the log does say what happened
    secrets_ = ["app-secret", "wrong-app-password", "other-secret", "md5-secret", "wrong-md5",
                rolpasswords["md5user"], rolpasswords["md5user"][3:], *proofs]
    for verifier in (rolpasswords["app"], other_salt):
        secrets_ += re.split(r"[$:]", verifier)[2:]       # salt, StoredKey, ServerKey
    client_key = authenticator(proxy).credentials_for("app").client_key
    secrets_ += [base64.b64encode(client_key).decode(), client_key.hex()]
    for secret in secrets_:
        assert secret not in text, secret
    assert "app-secret" not in repr(authenticator(proxy).credentials_for("app"))
