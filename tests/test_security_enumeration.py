"""Enumeration and leaks before login (issue 18, item 9), on a real PostgreSQL.

Until a client has proved its password it must not learn whether its user
exists, whether it is an admin, or anything of the proxy's own set-up (server
addresses, auth_query's database, role or errors): every failed login looks
the same, the reason goes to the proxy's log (rate-limited).  And a
configuration error never prints a secret back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import socket
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import PASSWORDS, raw_login, read_message, startup_packet, write_auth_file
from threadpool_proxy import pgcluster

FAILED = 'password authentication failed for user "{}"'
SCRAM, SASL_CONTINUE, MD5 = 10, 11, 5


def scram_verifier(password: str, iterations: int, salt: bytes | None = None) -> str:
    """pg_authid's SCRAM-SHA-256 verifier, computed here (RFC 5802), not by the proxy."""
    salt = salt or os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = lambda b: base64.b64encode(b).decode()      # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(hashlib.sha256(client_key).digest())}:{b64(server_key)}"


def md5_hash(password: str, user: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def first_challenge(proxy, user: str, dbname: str = "appdb") -> tuple:
    """The first Authentication request a client gets, and for SCRAM the server-first's
    (iterations, salt): then the client hangs up."""
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": user, "database": dbname}))
        kind, body = read_message(sock)
        if kind != "R":
            return kind, body
        code = struct.unpack("!I", body[:4])[0]
        if code != SCRAM:
            return (code,)
        # client-first as libpq sends it (the user name is the StartupMessage's: "n=" is empty)
        first = b"n,,n=,r=" + base64.b64encode(os.urandom(18))
        sock.sendall(_msg(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first))
        kind, body = read_message(sock)
        assert kind == "R" and struct.unpack("!I", body[:4])[0] == SASL_CONTINUE, (kind, body)
        attrs = dict(part.split("=", 1) for part in body[4:].decode().split(","))
        return code, int(attrs["i"]), base64.b64decode(attrs["s"])


# -- the challenge does not depend on whether the user exists ---------------------------

def test_with_md5_an_unknown_user_gets_what_most_users_get(pg, proxy_factory, tmp_path, rolpasswords):
    # Mostly SCRAM verifiers: an unknown user, and one stored as a plain password (which can do
    # either), get SCRAM as the SCRAM users do; only the md5-hash user gets md5.
    mostly_scram = write_auth_file(tmp_path / "scram.yaml", {
        "app": {"scram": rolpasswords["app"]}, "other": {"scram": rolpasswords["other"]},
        "md5user": {"md5": rolpasswords["md5user"]}, "plain": {"password": "plain-secret"}})
    proxy = proxy_factory(auth_type="md5", auth_file=mostly_scram)
    assert [first_challenge(proxy, u)[0] for u in ("app", "nobody", "plain", "md5user")] == [
        SCRAM, SCRAM, SCRAM, MD5]
    assert raw_login(proxy.host, proxy.port, "plain", "appdb", password="wrong").auth_requests == [10, 11]
    # Mostly md5 hashes: the other way round.
    mostly_md5 = write_auth_file(tmp_path / "md5.yaml", {
        "md5user": {"md5": rolpasswords["md5user"]}, "legacy": {"md5": md5_hash("x", "legacy")},
        "old": {"md5": md5_hash("y", "old")}, "app": {"scram": rolpasswords["app"]},
        "plain": {"password": "plain-secret"}})
    proxy = proxy_factory(auth_type="md5", auth_file=mostly_md5)
    assert [first_challenge(proxy, u)[0] for u in ("md5user", "nobody", "plain", "app")] == [MD5, MD5, MD5, SCRAM]
    # and they still log in
    assert raw_login(proxy.host, proxy.port, "md5user", "appdb", password=PASSWORDS["md5user"]).ok


def test_an_unknown_users_fake_scram_uses_the_iteration_count_real_verifiers_use(pg, proxy_factory, tmp_path):
    users = {f"user{i}": {"scram": scram_verifier(f"pw{i}", 10000)} for i in range(3)}
    users["odd"] = {"scram": scram_verifier("pw", 4096)}
    users["plain"] = {"password": "plain-secret"}
    path = write_auth_file(tmp_path / "users.yaml", users)
    proxy = proxy_factory(auth_type="scram-sha-256", auth_file=path)
    known = first_challenge(proxy, "user0")
    unknown = first_challenge(proxy, "nobody")
    assert known[:2] == unknown[:2] == (SCRAM, 10000)
    assert len(unknown[2]) == len(known[2]) == 16
    assert first_challenge(proxy, "plain")[:2] == (SCRAM, 10000)     # a derived verifier blends in too
    # the fake salt is the same each time for one name (as a real one is), different between names
    assert first_challenge(proxy, "nobody")[2] == unknown[2]
    assert first_challenge(proxy, "somebody")[2] != unknown[2]
    # ... and after a restart with the same auth file (a per-process key would change it)
    proxy.stop()
    again = proxy_factory(auth_type="scram-sha-256", auth_file=path)
    assert first_challenge(again, "nobody") == unknown


def test_any_unknown_name_gets_a_challenge_shaped_like_a_real_one(pg, proxy_factory, tmp_path):
    path = write_auth_file(tmp_path / "users.yaml", {"app": {"scram": scram_verifier("pw", 8192)},
                                                     "other": {"scram": scram_verifier("pw", 8192)}})
    proxy = proxy_factory(auth_type="md5", auth_file=path)

    @settings(max_examples=25, deadline=None)
    @given(name=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1,
                        max_size=60).filter(lambda n: n not in ("app", "other")))
    def unknown(name):
        challenge = first_challenge(proxy, name)
        assert challenge[:2] == (SCRAM, 8192)
        assert len(challenge[2]) == 16 and first_challenge(proxy, name) == challenge

    unknown()


@pytest.fixture
def ten_thousand_iterations_role(pg):
    """A role whose verifier has 10,000 iterations (PostgreSQL keeps a pre-computed verifier as is)."""
    role = f"iter_{uuid.uuid4().hex[:8]}"
    with pg.superuser_conn() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{scram_verifier('iter-secret', 10000)}'")
    try:
        yield role
    finally:
        with pg.superuser_conn() as conn:
            conn.execute(f"DROP ROLE {role}")


def test_auth_querys_unknown_users_look_like_the_verifiers_it_fetched(pg, proxy_factory,
                                                                      ten_thousand_iterations_role):
    proxy = proxy_factory(auth_type="auth_query", auth_user="postgres", auth_password=PASSWORDS["postgres"])
    role = ten_thousand_iterations_role
    assert raw_login(proxy.host, proxy.port, role, "appdb", password="iter-secret").ok
    assert first_challenge(proxy, role)[:2] == (SCRAM, 10000)
    assert first_challenge(proxy, "nobody")[:2] == (SCRAM, 10000)


# -- the admin console ------------------------------------------------------------------

@pytest.mark.parametrize("auth", ["passthrough", "scram-sha-256"])
def test_the_console_does_not_say_who_is_an_admin_before_authentication(pg, proxy_factory, auth_file, auth):
    extra = {"auth_type": "scram-sha-256", "auth_file": auth_file} if auth != "passthrough" else {}
    proxy = proxy_factory(admin_users=["app"], **extra)
    admin = raw_login(proxy.host, proxy.port, "app", "pgbouncer", password="wrong")
    not_admin = raw_login(proxy.host, proxy.port, "other", "pgbouncer", password="wrong")
    unknown = raw_login(proxy.host, proxy.port, "nobody", "pgbouncer", password="wrong")
    for res, user in ((admin, "app"), (not_admin, "other"), (unknown, "nobody")):
        assert (res.sqlstate, res.error["M"], res.auth_requests) == ("28P01", FAILED.format(user), [10, 11])
    # with the right password the non-admin learns it is not one, once authenticated
    right = raw_login(proxy.host, proxy.port, "other", "pgbouncer", password=PASSWORDS["other"])
    assert (right.auth_requests[-1], right.sqlstate) == (0, "28000")
    assert right.error["M"] == 'user "other" may not use the admin console'
    assert raw_login(proxy.host, proxy.port, "app", "pgbouncer", password=PASSWORDS["app"]).ok


# -- failed logins look the same whatever the reason -------------------------------------

def test_a_server_that_cannot_be_reached_is_not_named_before_login(pg, proxy_factory, caplog):
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    port = pgcluster.free_port()
    proxy = proxy_factory(databases={"appdb": {"host": "127.0.0.1", "port": port}})
    res = raw_login(proxy.host, proxy.port, "app", "appdb", password="x")
    assert (res.sqlstate, res.error["M"]) == (
        "08001", "threadpool_proxy: could not connect to the server; try again later")
    assert str(port) not in str(res.error) and "127.0.0.1" not in str(res.error), res.error
    assert f"127.0.0.1:{port}" in caplog.text           # the log says where


@pytest.mark.parametrize("broken", ["query", "auth_password"])
def test_a_failing_auth_query_fails_like_a_wrong_password(pg, proxy_factory, caplog, broken):
    caplog.set_level(logging.INFO, logger="threadpool_proxy")
    settings_ = {"auth_type": "auth_query", "auth_user": "postgres", "auth_password": PASSWORDS["postgres"]}
    if broken == "query":
        settings_["auth_query"] = "SELECT usename, passwd FROM secret_schema.lookup WHERE usename=$1"
    else:
        settings_["auth_password"] = "not-the-password"
    proxy = proxy_factory(**settings_)
    results = [raw_login(proxy.host, proxy.port, "app", "otherdb", password=PASSWORDS["app"]) for _ in range(3)]
    for res in results:
        assert (res.sqlstate, res.error["M"], res.auth_requests) == ("28P01", FAILED.format("app"), [10, 11])
        shown = str(res.error)
        assert "secret_schema" not in shown and "postgres" not in shown and str(pg.port) not in shown, shown
    # the reason is in the log, once for the three (rate-limited)
    lines = [r.getMessage() for r in caplog.records if "auth_query as postgres" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"{pg.host}:{pg.port}/otherdb" in lines[0]          # (auth_dbname: the entry's database)


# -- configuration errors never print a secret ---------------------------------------------

def test_a_bad_auth_password_is_not_printed_back(tmp_path):
    from threadpool_proxy.config import ConfigError, from_dict, load
    with pytest.raises(ConfigError) as info:
        from_dict({"auth_password": 31337421, "databases": {"a": {"host": "h"}}})
    assert str(info.value).startswith("auth_password: expected a string, got ")
    assert "31337421" not in str(info.value)
    path = tmp_path / "proxy.yaml"
    path.write_text("auth_password: [31337421, hunter2]\ndatabases: {a: {host: h}}\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert "31337421" not in str(info.value) and "hunter2" not in str(info.value)
    assert "auth_password" in str(info.value)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.integers(min_value=10**6), st.floats(min_value=1e6, allow_nan=False, allow_infinity=False),
                 st.lists(st.text(alphabet="abcdefghij", min_size=8, max_size=12), min_size=1, max_size=3),
                 st.dictionaries(st.text(alphabet="klmnop", min_size=8, max_size=10), st.integers(10**6))))
def test_no_non_string_auth_password_is_ever_echoed(value):
    from threadpool_proxy.config import ConfigError, from_dict
    with pytest.raises(ConfigError) as info:
        from_dict({"auth_password": value, "databases": {"a": {"host": "h"}}})
    text = str(info.value)
    assert text.startswith("auth_password: ")
    for part in ([value] if not isinstance(value, (list, dict)) else [*value, *(value.values() if isinstance(
            value, dict) else [])]):
        assert str(part) not in text and repr(part) not in text
