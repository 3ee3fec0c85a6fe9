"""Auth file loading and the sans-I/O SCRAM/md5 steps (threadpool_proxy.authfile, .auth).

The SCRAM peers here are scramp's ScramClient and ScramServer, an
implementation independent of ours.  One integration test logs in to a real
PostgreSQL with only a ClientKey (SCRAM pass-through).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import struct

import pytest
from scramp import ScramClient, ScramMechanism

from threadpool_proxy.auth import (
    AuthFailed,
    ScramServerExchange,
    ServerLogin,
    md5_hash_of,
    md5_server_check,
    parse_sasl_initial_response,
    sasl_mechanisms_payload,
)
from threadpool_proxy.protocol import AUTH_CLEARTEXT_PASSWORD as AUTH_REQ_PASSWORD
from threadpool_proxy.protocol import AUTH_MD5_PASSWORD as AUTH_REQ_MD5
from threadpool_proxy.protocol import AUTH_OK as AUTH_REQ_OK
from threadpool_proxy.protocol import AUTH_SASL as AUTH_REQ_SASL
from threadpool_proxy.protocol import AUTH_SASL_CONTINUE as AUTH_REQ_SASL_CONT
from threadpool_proxy.protocol import AUTH_SASL_FINAL as AUTH_REQ_SASL_FIN
from threadpool_proxy.authfile import (
    AuthFile,
    AuthFileError,
    Secret,
    format_scram_verifier,
    parse_scram_verifier,
    scram_keys,
    scram_secret_from_password,
)
from threadpool_proxy.pgcluster import find_bindir

from helpers import startup_packet

PASSWORD = "correct horse"
SALT = b"0123456789abcdef"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def alice_secret() -> Secret:
    return scram_secret_from_password(PASSWORD, salt=SALT)


def write_auth_file(tmp_path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "users.yaml"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return str(path)


# --- auth file -----------------------------------------------------------------

def test_auth_file_loads_scram_password_and_md5_users(tmp_path, alice_secret):
    verifier = format_scram_verifier(alice_secret)
    path = write_auth_file(tmp_path, f"""
users:
  alice: {{scram: "{verifier}"}}
  bob: {{password: "bob pass"}}
  carol: {{md5: "{md5_hash_of('carol pass', 'carol').upper().replace('MD5', 'md5')}"}}
""")
    auth = AuthFile(path)
    assert len(auth) == 3
    alice = auth.lookup("alice")
    assert (alice.kind, alice.iterations, alice.salt) == ("scram", 4096, SALT)
    assert alice.stored_key == alice_secret.stored_key and alice.server_key == alice_secret.server_key
    assert auth.lookup("bob").password == "bob pass"
    assert auth.lookup("carol").md5 == md5_hash_of("carol pass", "carol")  # normalised to lower case
    assert auth.lookup("mallory") is None
    # reprs go to logs: no secret material in them
    for secret in (alice, auth.lookup("bob"), auth.lookup("carol")):
        text = repr(secret) + str(secret)
        for material in (b64(alice.stored_key), b64(alice.server_key), b64(SALT), "bob pass",
                         md5_hash_of("carol pass", "carol")[3:]):
            assert material not in text


def test_auth_file_readable_by_group_or_others_is_refused_naming_the_mode(tmp_path):
    path = write_auth_file(tmp_path, 'users: {bob: {password: "x"}}', mode=0o644)
    with pytest.raises(AuthFileError) as exc_info:
        AuthFile(path)
    message = str(exc_info.value)
    assert "0644" in message and "chmod 600" in message and "\n" not in message


@pytest.mark.parametrize("entry, problem", [
    ('{scram: "SCRAM-SHA-256$4096:c2FsdA=="}', "bad SCRAM verifier format"),
    ('{scram: "SCRAM-SHA-256$4096:c2FsdA==$not*base64:AAAA"}', "StoredKey is not valid base64"),
    ('{scram: "SCRAM-SHA-256$many:c2FsdA==$AAAA:AAAA"}', "iteration count 'many' is not an integer"),
    ('{scram: "SCRAM-SHA-1$4096:c2FsdA==$AAAA:AAAA"}', "mechanism must be SCRAM-SHA-256"),
    ('{scram: "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA"}', "StoredKey must be 32 bytes"),
    ('{md5: "md5abc"}', "32 hex digits"),
    ('{passwd: "x"}', "unknown key 'passwd'"),
    ('{password: "x", md5: "md5' + "0" * 32 + '"}', "exactly one of"),
    ('{password: 12345}', "expected a string"),
    ('"just a string"', "expected a mapping"),
])
def test_malformed_entry_is_reported_with_user_line_and_problem(tmp_path, entry, problem):
    path = write_auth_file(tmp_path, f'users:\n  good: {{password: "x"}}\n  dave: {entry}\n')
    with pytest.raises(AuthFileError) as exc_info:
        AuthFile(path)
    message = str(exc_info.value)
    assert "user 'dave' (line 3)" in message
    assert problem in message
    assert "\n" not in message


def test_duplicate_user_and_unquoted_yaml_keywords_are_refused(tmp_path):
    path = write_auth_file(tmp_path, 'users:\n  bob: {password: "a"}\n  bob: {password: "b"}\n')
    with pytest.raises(AuthFileError, match=r"user 'bob' \(line 3\): defined twice \(first on line 2\)"):
        AuthFile(path)
    path = write_auth_file(tmp_path, 'users:\n  on: {password: "a"}\n')
    with pytest.raises(AuthFileError, match="quote it"):
        AuthFile(path)


def test_malformed_messages_never_quote_keys(tmp_path, alice_secret):
    # A broken ServerKey must not be echoed (the StoredKey next to it is real).
    broken = format_scram_verifier(alice_secret)[:-4] + "!!!!"
    path = write_auth_file(tmp_path, f'users:\n  alice: {{scram: "{broken}"}}\n')
    with pytest.raises(AuthFileError) as exc_info:
        AuthFile(path)
    assert "ServerKey is not valid base64" in str(exc_info.value)
    assert b64(alice_secret.stored_key) not in str(exc_info.value)


def test_reload_keeps_old_contents_when_the_new_file_is_bad(tmp_path):
    path = write_auth_file(tmp_path, 'users:\n  bob: {password: "old"}\n')
    auth = AuthFile(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write('users:\n  bob: {scram: "garbage"}\n')
    with pytest.raises(AuthFileError, match="user 'bob'"):
        auth.reload()
    assert auth.lookup("bob").password == "old"
    os.chmod(path, 0o640)
    with open(path, "w", encoding="utf-8") as f:
        f.write('users:\n  bob: {password: "new"}\n  eve: {password: "e"}\n')
    with pytest.raises(AuthFileError, match="0640"):
        auth.reload()
    assert auth.lookup("eve") is None
    os.chmod(path, 0o600)
    assert auth.reload() == 2
    assert auth.lookup("bob").password == "new" and auth.lookup("eve") is not None


def test_plain_password_verifier_is_derived_once_and_kept_across_reloads(tmp_path):
    path = write_auth_file(tmp_path, 'users:\n  bob: {password: "pw"}\n  carol: {md5: "md5' + "a" * 32 + '"}\n')
    auth = AuthFile(path)
    first = auth.scram_secret("bob")
    assert first.kind == "scram" and auth.scram_secret("bob") is first
    _, stored_key, server_key = scram_keys("pw", first.salt, first.iterations)
    assert (first.stored_key, first.server_key) == (stored_key, server_key)
    assert auth.scram_secret("carol") is None and auth.scram_secret("nobody") is None
    auth.reload()                                    # unchanged password: same verifier
    assert auth.scram_secret("bob") is first
    with open(path, "w", encoding="utf-8") as f:
        f.write('users:\n  bob: {password: "changed"}\n')
    auth.reload()                                    # changed password: new verifier
    assert auth.scram_secret("bob").stored_key != first.stored_key


def test_derived_verifier_matches_scramp_and_round_trips_through_rolpassword_format():
    salt, stored_key, server_key, iterations = ScramMechanism().make_auth_info(
        PASSWORD, iteration_count=4096, salt=SALT)
    ours = scram_secret_from_password(PASSWORD, salt=SALT)
    assert (ours.salt, ours.stored_key, ours.server_key, ours.iterations) == (
        salt, stored_key, server_key, iterations)
    parsed = parse_scram_verifier(format_scram_verifier(ours))
    assert parsed.same_as(ours)


# --- proxy as SCRAM server -------------------------------------------------------

def run_scramp_client(exchange: ScramServerExchange, user: str, password: str) -> ScramClient:
    """Drive a whole exchange with scramp's client; return the client (its checks passed)."""
    client = ScramClient(exchange.mechanisms(), user, password)
    server_first = exchange.handle_client_first(client.get_client_first().encode())
    client.set_server_first(server_first.decode())
    server_final = exchange.handle_client_final(client.get_client_final().encode())
    client.set_server_final(server_final.decode())   # raises if our ServerSignature is wrong
    return client


def test_scram_exchange_accepts_right_password_and_recovers_the_client_key(alice_secret):
    exchange = ScramServerExchange(alice_secret, "alice")
    assert exchange.mechanisms() == ["SCRAM-SHA-256"]
    run_scramp_client(exchange, "alice", PASSWORD)
    assert exchange.done
    client_key, _, _ = scram_keys(PASSWORD, SALT, 4096)
    assert exchange.client_key == client_key


def test_scram_exchange_rejects_wrong_password(alice_secret):
    exchange = ScramServerExchange(alice_secret, "alice")
    with pytest.raises(AuthFailed, match="wrong password") as exc_info:
        run_scramp_client(exchange, "alice", "wrong")
    assert exc_info.value.sqlstate == "28P01"
    assert not exchange.done
    with pytest.raises(RuntimeError):
        exchange.client_key
    with pytest.raises(AuthFailed):                      # a failed exchange stays failed
        exchange.handle_client_final(b"c=biws,r=x,p=AAAA")


def test_client_final_replayed_against_a_new_exchange_fails(alice_secret):
    client = ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD, c_nonce="fixedclientnonce")
    old = ScramServerExchange(alice_secret, "alice")
    client_first = client.get_client_first().encode()
    client.set_server_first(old.handle_client_first(client_first).decode())
    recorded_final = client.get_client_final().encode()
    old.handle_client_final(recorded_final)            # the genuine login succeeds

    new = ScramServerExchange(alice_secret, "alice")
    new_server_first = new.handle_client_first(client_first)
    assert new_server_first != old._server_first.encode()   # fresh server nonce
    with pytest.raises(AuthFailed, match="nonce mismatch"):
        new.handle_client_final(recorded_final)


def test_server_nonce_is_random_per_exchange(alice_secret):
    firsts = {ScramServerExchange(alice_secret, "alice").handle_client_first(b"n,,n=,r=abc")
              for _ in range(20)}
    assert len(firsts) == 20


@pytest.mark.parametrize("client_first", [
    b"", b"n", b"n,", b"n,,", b"n,,n=alice", b"n,,r=abc", b"n,,n=alice,r=",
    b"n,,n=alice,r=a,b", b"\xff\xfe\xfd", b"x,,n=alice,r=abc",
    b"p=tls-server-end-point,,n=alice,r=abc",          # channel binding we don't offer
    b"n,a=bob,n=alice,r=abc",                          # authzid
    b"n,,m=ext,n=alice,r=abc",                         # mandatory extension
    b"n,,n=alice,r=ab\x7fc",                           # nonce outside printable ASCII
])
def test_garbage_client_first_raises_auth_failed(alice_secret, client_first):
    exchange = ScramServerExchange(alice_secret, "alice")
    with pytest.raises(AuthFailed) as exc_info:
        exchange.handle_client_first(client_first)
    assert exc_info.value.sqlstate == "08P01"


@pytest.mark.parametrize("mangle", [
    lambda f: f[:10],                                  # truncated
    lambda f: f.rsplit(",p=", 1)[0],                   # no proof
    lambda f: f.rsplit(",p=", 1)[0] + ",p=!!notb64",   # proof not base64
    lambda f: f.rsplit(",p=", 1)[0] + ",p=" + b64(b"short"),
    lambda f: f.replace("c=biws", "c=eSws"),           # cbind 'y,,' after 'n,,'
    lambda f: "garbage",
])
def test_garbage_client_final_raises_auth_failed(alice_secret, mangle):
    client = ScramClient(["SCRAM-SHA-256"], "alice", PASSWORD)
    exchange = ScramServerExchange(alice_secret, "alice")
    client.set_server_first(exchange.handle_client_first(client.get_client_first().encode()).decode())
    with pytest.raises(AuthFailed):
        exchange.handle_client_final(mangle(client.get_client_final()).encode())


def hand_made_exchange(exchange: ScramServerExchange, flag: str, cbind_flag: str | None = None):
    """A libpq-style exchange ("n=": PostgreSQL takes the user from the startup packet).

    Returns (server-final, expected server-final, ClientKey).  ``cbind_flag``
    lets the client-final claim a different gs2 header than the client-first,
    with a proof that is valid for what it claims.
    """
    bare = "n=,r=libpqnonce"
    server_first = exchange.handle_client_first(f"{flag},,{bare}".encode()).decode()
    nonce = server_first.split(",")[0][2:]
    without_proof = f"c={b64(f'{cbind_flag or flag},,'.encode())},r={nonce}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    client_key, stored_key, server_key = scram_keys(PASSWORD, SALT, 4096)
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature))
    server_final = exchange.handle_client_final(f"{without_proof},p={b64(proof)}".encode())
    expected = hmac.new(server_key, auth_message, hashlib.sha256).digest()
    return server_final, f"v={b64(expected)}".encode(), client_key


@pytest.mark.parametrize("flag", ["n", "y"])
def test_libpq_style_client_first_with_empty_user_is_accepted(alice_secret, flag):
    exchange = ScramServerExchange(alice_secret, "alice")
    server_final, expected, client_key = hand_made_exchange(exchange, flag)
    assert server_final == expected
    assert exchange.client_key == client_key


def test_client_final_must_repeat_the_client_first_channel_binding_flag(alice_secret):
    # A valid proof does not help: the downgrade from 'y' to 'n' is refused on its own.
    with pytest.raises(AuthFailed, match="channel-binding data does not match"):
        hand_made_exchange(ScramServerExchange(alice_secret, "alice"), "y", cbind_flag="n")


def test_calls_out_of_order_raise_auth_failed(alice_secret):
    exchange = ScramServerExchange(alice_secret, "alice")
    with pytest.raises(AuthFailed, match="out of order"):
        exchange.handle_client_final(b"c=biws,r=abc,p=AAAA")


def test_unknown_user_exchange_looks_real_and_always_fails(alice_secret):
    def server_first_of(exchange):
        text = exchange.handle_client_first(b"n,,n=,r=clientnonce").decode()
        r, s, i = text.split(",")
        return r, base64.b64decode(s[2:]), i

    r, salt, i = server_first_of(ScramServerExchange.for_unknown_user("mallory"))
    real_r, real_salt, real_i = server_first_of(ScramServerExchange(alice_secret, "alice"))
    assert r.startswith("r=clientnonce") and len(r) == len(real_r)
    assert len(salt) == len(real_salt) == 16 and i == real_i == "i=4096"
    # stable per name (a changing salt would give an unknown user away), distinct between names
    assert server_first_of(ScramServerExchange.for_unknown_user("mallory"))[1] == salt
    assert server_first_of(ScramServerExchange.for_unknown_user("trudy"))[1] != salt

    exchange = ScramServerExchange.for_unknown_user("mallory")
    client = ScramClient(["SCRAM-SHA-256"], "mallory", "any password")
    client.set_server_first(exchange.handle_client_first(client.get_client_first().encode()).decode())
    with pytest.raises(AuthFailed, match="not in the auth file"):
        exchange.handle_client_final(client.get_client_final().encode())


def test_exchange_needs_a_scram_secret():
    with pytest.raises(ValueError, match="scram_secret"):
        ScramServerExchange(Secret("password", password="pw"), "bob")


# --- md5, proxy as server --------------------------------------------------------

def md5_answer(password: str, user: str, salt: bytes) -> bytes:
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode() + b"\0"


@pytest.mark.parametrize("secret", [
    Secret("password", password="bob pass"),
    Secret("md5", md5=md5_hash_of("bob pass", "bob")),
], ids=["plain", "md5-hash"])
def test_md5_server_check_with_plain_and_md5_secrets(secret):
    salt = b"\x01\x02\x03\x04"
    assert md5_server_check(secret, "bob", salt, md5_answer("bob pass", "bob", salt))
    assert md5_server_check(secret, "bob", salt, md5_answer("bob pass", "bob", salt)[:-1])  # no NUL
    assert not md5_server_check(secret, "bob", salt, md5_answer("wrong", "bob", salt))
    assert not md5_server_check(secret, "bob", b"\x09\x09\x09\x09", md5_answer("bob pass", "bob", salt))
    assert not md5_server_check(secret, "bob", salt, b"garbage\0")


def test_md5_server_check_is_impossible_with_only_a_scram_verifier(alice_secret):
    with pytest.raises(AuthFailed, match="only a SCRAM verifier"):
        md5_server_check(alice_secret, "alice", b"salt", md5_answer(PASSWORD, "alice", b"salt"))


# --- proxy as client of PostgreSQL ----------------------------------------------

def scramp_server_for(secret: Secret):
    return ScramMechanism().make_server(
        lambda user: (secret.salt, secret.stored_key, secret.server_key, secret.iterations))


def login_against_scramp(login: ServerLogin, server, mechanisms=("SCRAM-SHA-256",)) -> None:
    """Run ServerLogin against a scramp ScramServer, as PostgreSQL would frame it."""
    kind, body = login.step(AUTH_REQ_SASL, sasl_mechanisms_payload(list(mechanisms)))
    assert kind == "p"
    mechanism, client_first = parse_sasl_initial_response(body)
    assert mechanism == "SCRAM-SHA-256"
    server.set_client_first(client_first.decode())
    kind, client_final = login.step(AUTH_REQ_SASL_CONT, server.get_server_first().encode())
    server.set_client_final(client_final.decode())
    assert login.step(AUTH_REQ_SASL_FIN, server.get_server_final().encode()) is None
    assert login.step(AUTH_REQ_OK, b"") is None


def test_server_login_with_password_against_scramp_server():
    salt, stored_key, server_key, iterations = ScramMechanism().make_auth_info(PASSWORD)
    server_secret = Secret("scram", iterations=iterations, salt=salt,
                           stored_key=stored_key, server_key=server_key)
    login = ServerLogin("alice", password=PASSWORD)
    login_against_scramp(login, scramp_server_for(server_secret))
    assert login.done and login.method == "scram-sha-256"


def test_server_login_with_only_the_recovered_client_key(alice_secret):
    exchange = ScramServerExchange(alice_secret, "alice")
    run_scramp_client(exchange, "alice", PASSWORD)
    login = ServerLogin("alice", client_key=exchange.client_key, scram_secret=alice_secret)
    login_against_scramp(login, scramp_server_for(alice_secret),
                         mechanisms=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert login.done


def test_server_login_detects_a_server_verifier_with_another_salt(alice_secret):
    client_key, _, _ = scram_keys(PASSWORD, SALT, 4096)
    login = ServerLogin("alice", client_key=client_key, scram_secret=alice_secret)
    other = scram_secret_from_password(PASSWORD, salt=b"another salt 16b")
    with pytest.raises(AuthFailed, match=r"the server's SCRAM verifier for user 'alice' "
                                         r"differs from the proxy's \(salt/iterations"):
        login_against_scramp(login, scramp_server_for(other))
    with pytest.raises(AuthFailed):                      # failed stays failed
        login.step(AUTH_REQ_OK, b"")


def test_server_login_rejects_a_server_that_cannot_sign(alice_secret):
    # Same salt, iterations and StoredKey, but not the ServerKey: an impostor
    # that captured the StoredKey (or a proof) cannot produce the signature.
    impostor = Secret("scram", iterations=4096, salt=SALT, stored_key=alice_secret.stored_key,
                      server_key=b"\0" * 32)
    login = ServerLogin("alice", password=PASSWORD)
    with pytest.raises(AuthFailed, match="not who it claims"):
        login_against_scramp(login, scramp_server_for(impostor))
    assert not login.done


def test_server_login_refuses_ok_before_sasl_final(alice_secret):
    login = ServerLogin("alice", password=PASSWORD)
    login.step(AUTH_REQ_SASL, sasl_mechanisms_payload(["SCRAM-SHA-256"]))
    with pytest.raises(AuthFailed, match="not who it claims"):
        login.step(AUTH_REQ_OK, b"")


def test_server_login_md5_with_password_and_with_stored_hash():
    salt = b"\xaa\xbb\xcc\xdd"
    for login in (ServerLogin("bob", password="bob pass"),
                  ServerLogin("bob", md5_hash=md5_hash_of("bob pass", "bob"))):
        kind, body = login.step(AUTH_REQ_MD5, salt)
        assert kind == "p" and body == md5_answer("bob pass", "bob", salt)
        assert md5_server_check(Secret("password", password="bob pass"), "bob", salt, body)
        assert login.step(AUTH_REQ_OK, b"") is None and login.done and login.method == "md5"


def test_server_login_cleartext_and_trust():
    login = ServerLogin("bob", password="bob pass")
    assert login.step(AUTH_REQ_PASSWORD, b"") == ("p", b"bob pass\0")
    login.step(AUTH_REQ_OK, b"")
    assert login.done
    trusting = ServerLogin("bob", password="bob pass")
    assert trusting.step(AUTH_REQ_OK, b"") is None and trusting.method == "trust"


def test_server_login_with_only_a_client_key_cannot_do_cleartext_or_md5(alice_secret):
    client_key, _, _ = scram_keys(PASSWORD, SALT, 4096)
    for code, payload, method in ((AUTH_REQ_PASSWORD, b"", "cleartext"), (AUTH_REQ_MD5, b"salt", "md5")):
        login = ServerLogin("alice", client_key=client_key, scram_secret=alice_secret)
        with pytest.raises(AuthFailed, match=f"{method}.*only a SCRAM ClientKey|only a SCRAM ClientKey"):
            login.step(code, payload)


def test_server_login_refuses_plus_only_and_bad_arguments(alice_secret):
    with pytest.raises(AuthFailed, match="supports only SCRAM-SHA-256"):
        ServerLogin("alice", password="x").step(AUTH_REQ_SASL, sasl_mechanisms_payload(["SCRAM-SHA-256-PLUS"]))
    with pytest.raises(ValueError):
        ServerLogin("alice")
    with pytest.raises(ValueError, match="scram_secret"):
        ServerLogin("alice", client_key=b"\0" * 32)
    with pytest.raises(ValueError, match="does not belong"):
        ServerLogin("alice", client_key=b"\0" * 32, scram_secret=alice_secret)


# --- integration: ClientKey pass-through to a real PostgreSQL -------------------------

def _have_postgres() -> bool:
    """Whether the ``pg`` fixture will find server programs (it looks the same way)."""
    try:
        find_bindir()
    except RuntimeError:
        return False
    return True


# Minimal v3 framing, for this test only: Byte1 type, Int32 length (including itself), body.


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data


def _recv_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _recv_exact(sock, 5)
    (length,) = struct.unpack("!i", header[1:])
    return header[:1], _recv_exact(sock, length - 4)


def _send_message(sock: socket.socket, kind: bytes, body: bytes) -> None:
    sock.sendall(kind + struct.pack("!i", len(body) + 4) + body)


def _error_text(body: bytes) -> str:
    fields = {f[:1]: f[1:].decode("utf-8", "replace") for f in body.split(b"\0") if f}
    return f"{fields.get(b'C')}: {fields.get(b'M')}"


def _login_and_ask_current_user(host: str, port: int, user: str, dbname: str, login: ServerLogin) -> str:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(startup_packet({"user": user, "database": dbname}))
        while True:
            kind, body = _recv_message(sock)
            if kind == b"E":
                raise AssertionError(f"server refused the login: {_error_text(body)}")
            if kind == b"R":
                (code,) = struct.unpack("!i", body[:4])
                reply = login.step(code, body[4:])
                if reply is not None:
                    _send_message(sock, reply[0].encode(), reply[1])
            elif kind == b"Z":                                   # ReadyForQuery
                break
        assert login.done
        _send_message(sock, b"Q", b"SELECT current_user\0")
        row = None
        while True:
            kind, body = _recv_message(sock)
            if kind == b"E":
                raise AssertionError(_error_text(body))
            if kind == b"D":                 # DataRow: Int16 columns, Int32 len, bytes
                (n,) = struct.unpack("!i", body[2:6])
                row = body[6:6 + n].decode()
            elif kind == b"Z":
                break
        _send_message(sock, b"X", b"")
        return row


@pytest.mark.integration
@pytest.mark.skipif(not _have_postgres(), reason="PostgreSQL server binaries not installed")
def test_client_key_passthrough_logs_in_to_real_postgresql(request):
    pg = request.getfixturevalue("pg")   # tests/conftest.py: throwaway cluster, scram-sha-256 on TCP
    with pg.superuser_conn() as conn:
        rolpassword = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'app'").fetchone()[0]
    verifier = parse_scram_verifier(rolpassword)

    # The client proves the right password to the proxy; the proxy keeps the ClientKey only.
    exchange = ScramServerExchange(verifier, "app")
    run_scramp_client(exchange, "app", pg.passwords["app"])
    login = ServerLogin("app", client_key=exchange.client_key, scram_secret=verifier)

    assert _login_and_ask_current_user(pg.host, pg.port, "app", "appdb", login) == "app"
    assert login.method == "scram-sha-256"
