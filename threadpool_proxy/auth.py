"""SCRAM/md5 steps of proxy-terminated authentication, sans-I/O.

Two directions, no sockets and no message framing here (payloads only):

* client -> proxy: ScramServerExchange checks a client's SCRAM-SHA-256 proof
  against a verifier and, on success, recovers the client's ClientKey;
  md5_server_check checks an md5 PasswordMessage.
* proxy -> PostgreSQL: ServerLogin answers the server's Authentication
  requests, with a password or with only a ClientKey (SCRAM pass-through, as
  PgBouncer does: the ClientKey is what a SCRAM client proves it knows, so it
  logs in wherever the server's verifier has the same salt and iterations).

SCRAM messages (RFC 5802/7677), as PostgreSQL uses them:

  client-first  = gs2-header client-first-bare
  gs2-header    = ("n" | "y" | "p=tls-server-end-point") "," "," ; no authzid; "p=" only with -PLUS
  client-first-bare = "n=" user "," "r=" c-nonce ["," ext]* ; PostgreSQL ignores user
  server-first  = "r=" c-nonce s-nonce "," "s=" salt-b64 "," "i=" iterations
  client-final  = "c=" b64(gs2-header [cb-data]) "," "r=" nonce ["," ext]* "," "p=" proof-b64
                  ; cb-data (-PLUS only): the hash of the server's TLS certificate (RFC 5929)
  server-final  = "v=" b64(ServerSignature)  |  "e=" error
  AuthMessage   = client-first-bare "," server-first "," client-final-without-proof
  ClientProof   = ClientKey XOR HMAC(StoredKey, AuthMessage),  StoredKey = H(ClientKey)
  ServerSignature = HMAC(ServerKey, AuthMessage)

We hand-write both sides rather than drive scramp's ScramServer/ScramClient:
the server needs the ClientKey (scramp does not expose it) and must accept
libpq's empty "n=" user, and a pass-through client has no password to give
scramp.  scramp is still what the tests drive us with.

Secrets (passwords, proofs, ClientKey, StoredKey, ServerKey) never appear in
exception messages or logs.  Secret comparisons use hmac.compare_digest.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import hashlib
import hmac
import secrets

from . import protocol as pq
from .authfile import (
    DEFAULT_ITERATIONS,
    DEFAULT_SALT_LEN,
    SCRAM_KEY_LEN,
    SCRAM_SHA_256,
    Secret,
    scram_keys,
)
from .errors import ProxyError

SCRAM_SHA_256_PLUS = SCRAM_SHA_256 + "-PLUS"
CHANNEL_BINDING_TYPE = "tls-server-end-point"
_PASSWORD_MESSAGE_TYPE = pq.PASSWORD_MESSAGE.decode("ascii")   # what ServerLogin.step returns as the type
_NONCE_BYTES = 18    # nonces as PostgreSQL makes them: 18 random bytes, 24 base64 characters


class AuthFailed(ProxyError):
    """Authentication cannot succeed.  str(exc) is a reason for the proxy's log.

    The message never holds secret material, but it may name the user and say
    why (unknown user, wrong proof): send the client only PostgreSQL's generic
    "password authentication failed for user ..." with ``sqlstate``.
    """

    def __init__(self, reason: str, sqlstate: str = pq.SQLSTATE_INVALID_PASSWORD):
        super().__init__(reason)
        self.sqlstate = sqlstate


def _protocol_error(reason: str) -> AuthFailed:
    return AuthFailed(reason, pq.SQLSTATE_PROTOCOL_VIOLATION)


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _protocol_error(f"malformed SCRAM message: {what} is not valid base64") from None


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")      # one call into OpenSSL, no HMAC object


def _xor(a: bytes, b: bytes) -> bytes:
    if len(a) != len(b):
        raise ValueError("SCRAM values of different lengths")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _decode(data: bytes, what: str) -> str:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, got {type(data).__name__}")
    try:
        return bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise _protocol_error(f"malformed SCRAM {what}: not valid UTF-8") from None


def _valid_nonce(nonce: str) -> bool:
    # RFC 5802: printable ASCII except ','.
    return bool(nonce) and all(0x21 <= ord(c) <= 0x7E and c != "," for c in nonce)


def _attributes(parts: list[str], what: str) -> list[tuple[str, str]]:
    attrs = []
    for part in parts:
        if len(part) < 2 or part[1] != "=" or not (part[0].isascii() and part[0].isalpha()):
            raise _protocol_error(f"malformed SCRAM {what}: expected attribute=value items")
        attrs.append((part[0], part[2:]))
    return attrs


def sasl_mechanisms_payload(mechanisms: list[str]) -> bytes:
    """The AuthenticationSASL payload (after the Int32 10): names, each NUL-ended, then NUL."""
    return b"".join(m.encode("ascii") + b"\0" for m in mechanisms) + b"\0"


def parse_sasl_initial_response(body: bytes) -> tuple[str, bytes]:
    """Split a SASLInitialResponse body into (mechanism, client-first bytes).

    Body: String mechanism; Int32 length of the data (-1: none); Byte[n] data.
    """
    body = bytes(body)
    nul = body.find(b"\0")
    if nul < 0 or len(body) < nul + 5:
        raise _protocol_error("malformed SASLInitialResponse: truncated")
    mechanism = body[:nul].decode("ascii", "replace")
    (length,) = pq.INT32.unpack_from(body, nul + 1)
    data = body[nul + 5:]
    if length == -1:
        length = 0
    if length != len(data):
        raise _protocol_error("malformed SASLInitialResponse: length does not match the data")
    return mechanism, data


# --- proxy as SCRAM server (client -> proxy) ---------------------------------

class _ServerStage(enum.IntEnum):
    CLIENT_FIRST = 1    # waiting for client-first
    CLIENT_FINAL = 2    # server-first sent, waiting for client-final
    DONE = 3            # client proved it knows the password
    FAILED = 4          # any failure is final


_MOCK_KEY = secrets.token_bytes(32)   # fallback when the caller has no key that survives a restart


class ScramServerExchange:
    """One SCRAM-SHA-256 exchange with a client, proxy in the server role.

    For callers, in order: mechanisms() for AuthenticationSASL;
    handle_client_first(data, mechanism) -> server-first (send in AuthenticationSASLContinue);
    handle_client_final(data) -> server-final (send in AuthenticationSASLFinal,
    then AuthenticationOk); client_key once done.  Any AuthFailed ends the
    exchange: later calls raise AuthFailed too.

    ``channel_binding`` is the tls-server-end-point data of the client's TLS
    connection (tls.ClientTLS.end_point_hash), or None over plain text: with
    it SCRAM-SHA-256-PLUS is offered first, as PostgreSQL offers it, and a
    client that says it could bind but thinks the server cannot ("y") is
    refused as a possible downgrade.
    """

    def __init__(self, secret: Secret, username: str, *, channel_binding: bytes | None = None,
                 _unknown_user: bool = False):
        if secret.kind != "scram":
            raise ValueError(f"ScramServerExchange needs a scram Secret, got {secret!r} "
                             "(use AuthFile.scram_secret() for plain passwords)")
        self.username = username
        self._cb_data, self._plus = channel_binding, False    # binding data; PLUS selected
        self._secret = secret
        self._unknown_user = _unknown_user
        self._stage = _ServerStage.CLIENT_FIRST
        self._server_nonce = _b64e(secrets.token_bytes(_NONCE_BYTES))
        self._client_key: bytes | None = None

    @classmethod
    def for_unknown_user(cls, username: str, iterations: int = DEFAULT_ITERATIONS,
                         key: bytes | None = None, channel_binding: bytes | None = None) -> "ScramServerExchange":
        """An exchange that looks like a real one and always fails at the final step.

        The salt is HMAC(key, username): the same for the same name, different
        between names, so server-first does not reveal whether the user exists.
        ``key`` should be a secret that survives restarts (real users' salts do
        not change when the proxy restarts; fake ones must not either); without
        it a per-process random key is used.  Pass the iteration count your
        real verifiers use so that does not stand out either.
        """
        salt = _hmac(key or _MOCK_KEY, username.encode("utf-8"))[:DEFAULT_SALT_LEN]
        fake = Secret("scram", iterations=iterations, salt=salt,
                      stored_key=secrets.token_bytes(SCRAM_KEY_LEN),
                      server_key=secrets.token_bytes(SCRAM_KEY_LEN))
        return cls(fake, username, channel_binding=channel_binding, _unknown_user=True)

    def mechanisms(self) -> list[str]:
        return [SCRAM_SHA_256_PLUS, SCRAM_SHA_256] if self._cb_data is not None else [SCRAM_SHA_256]

    @property
    def done(self) -> bool:
        return self._stage == _ServerStage.DONE

    @property
    def client_key(self) -> bytes:
        """The client's ClientKey, recovered from its proof; only after success."""
        if self._stage != _ServerStage.DONE or self._client_key is None:
            raise RuntimeError("client_key is only available after a successful exchange")
        return self._client_key

    def _expect(self, stage: _ServerStage, step: str) -> None:
        if self._stage != stage:
            current = self._stage
            self._stage = _ServerStage.FAILED
            raise _protocol_error(f"SCRAM {step} out of order (exchange stage is {current.name})")

    def _fail(self, exc: AuthFailed) -> AuthFailed:
        self._stage = _ServerStage.FAILED
        return exc

    def handle_client_first(self, data: bytes, mechanism: str = SCRAM_SHA_256) -> bytes:
        """Take the client-first message of ``mechanism`` (one of mechanisms()), return server-first."""
        self._expect(_ServerStage.CLIENT_FIRST, "client-first")
        try:
            if mechanism not in self.mechanisms():
                raise _protocol_error(f"client selected an invalid SASL authentication mechanism "
                                      f"({mechanism[:64]!r})")
            self._plus = mechanism == SCRAM_SHA_256_PLUS
            text = _decode(data, "client-first")
            self._gs2_header, self._client_first_bare, client_nonce = self._parse_client_first(text)
        except AuthFailed as exc:
            raise self._fail(exc) from None
        self._nonce = client_nonce + self._server_nonce
        s = self._secret
        self._server_first = f"r={self._nonce},s={_b64e(s.salt)},i={s.iterations}"
        self._stage = _ServerStage.CLIENT_FINAL
        return self._server_first.encode("ascii")

    def _parse_client_first(self, text: str) -> tuple[str, str, str]:
        flag, sep, rest = text.partition(",")
        if not sep:
            raise _protocol_error("malformed SCRAM client-first: truncated gs2 header")
        if flag.startswith("p="):
            if not self._plus:
                raise _protocol_error("malformed SCRAM message: the client selected SCRAM-SHA-256 without "
                                      "channel binding, but the SCRAM message includes channel binding data")
            if flag[2:] != CHANNEL_BINDING_TYPE:
                raise _protocol_error(f"unsupported SCRAM channel-binding type {flag[2:64]!r}")
        elif flag not in ("n", "y"):
            raise _protocol_error("malformed SCRAM client-first: channel-binding flag "
                                  "must be 'n', 'y' or 'p=tls-server-end-point'")
        elif self._plus:
            raise _protocol_error("malformed SCRAM message: the client selected SCRAM-SHA-256-PLUS, "
                                  "but the SCRAM message does not include channel binding data")
        elif flag == "y" and self._cb_data is not None:
            raise _protocol_error("SCRAM channel binding negotiation error: the client supports channel "
                                  "binding but thinks the server does not; this connection does support it")
        authzid, sep, bare = rest.partition(",")
        if not sep:
            raise _protocol_error("malformed SCRAM client-first: truncated gs2 header")
        if authzid:
            raise _protocol_error("SCRAM authorization identity (authzid) is not supported")
        parts = bare.split(",")
        if parts[0].startswith("m="):
            raise _protocol_error("SCRAM mandatory extensions are not supported")
        attrs = _attributes(parts, "client-first") if bare else []
        # n= may be empty (libpq sends "n="); PostgreSQL uses the startup user.
        if len(attrs) < 2 or attrs[0][0] != "n" or attrs[1][0] != "r":
            raise _protocol_error("malformed SCRAM client-first: expected n=...,r=...")
        client_nonce = attrs[1][1]
        if not _valid_nonce(client_nonce):
            raise _protocol_error("malformed SCRAM client-first: invalid client nonce")
        return f"{flag},,", bare, client_nonce

    def handle_client_final(self, data: bytes) -> bytes:
        """Take the client-final message, check the proof, return the server-final message."""
        self._expect(_ServerStage.CLIENT_FINAL, "client-final")
        try:
            text = _decode(data, "client-final")
            without_proof, proof = self._parse_client_final(text)
            auth_message = ",".join((self._client_first_bare, self._server_first,
                                     without_proof)).encode("utf-8")
            self._check_proof(auth_message, proof)
        except AuthFailed as exc:
            raise self._fail(exc) from None
        self._stage = _ServerStage.DONE
        server_signature = _hmac(self._secret.server_key, auth_message)
        return f"v={_b64e(server_signature)}".encode("ascii")

    def _parse_client_final(self, text: str) -> tuple[str, bytes]:
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise _protocol_error("malformed SCRAM client-final: no proof (p=) at the end")
        attrs = _attributes(without_proof.split(","), "client-final")
        if len(attrs) < 2 or attrs[0][0] != "c" or attrs[1][0] != "r":
            raise _protocol_error("malformed SCRAM client-final: expected c=...,r=...,p=...")
        cbind = _b64d(attrs[0][1], "channel binding (c=)")
        expected = self._gs2_header.encode("ascii") + (self._cb_data if self._plus else b"")
        if not hmac.compare_digest(cbind, expected):
            if self._plus:
                raise _protocol_error("SCRAM channel binding check failed")
            raise _protocol_error("SCRAM channel-binding data does not match the client-first gs2 header")
        if attrs[1][1] != self._nonce:
            raise AuthFailed("SCRAM nonce mismatch: client-final is not for this exchange "
                             "(stale or replayed)", pq.SQLSTATE_PROTOCOL_VIOLATION)
        proof = _b64d(proof_b64, "proof (p=)")
        if len(proof) != SCRAM_KEY_LEN:
            raise _protocol_error(f"malformed SCRAM client-final: proof must be "
                                  f"{SCRAM_KEY_LEN} bytes, got {len(proof)}")
        return without_proof, proof

    def _check_proof(self, auth_message: bytes, proof: bytes) -> None:
        # Do the same work for unknown users, so the timing does not tell them apart.
        client_key = _xor(proof, _hmac(self._secret.stored_key, auth_message))
        matches = hmac.compare_digest(hashlib.sha256(client_key).digest(), self._secret.stored_key)
        if self._unknown_user:
            raise AuthFailed(f"user {self.username!r} is not in the auth file")
        if not matches:
            raise AuthFailed(f"SCRAM proof is wrong for user {self.username!r} (wrong password)")
        self._client_key = client_key


# --- md5 (client -> proxy) ----------------------------------------------------

def md5_response(md5_hash: str, salt: bytes) -> bytes:
    """PostgreSQL's md5 answer from the stored hash: 'md5' + md5(hex-of-hash + salt)."""
    inner = md5_hash[3:] if md5_hash.startswith("md5") else md5_hash
    return b"md5" + hashlib.md5(inner.encode("ascii") + bytes(salt)).hexdigest().encode("ascii")


def md5_hash_of(password: str, username: str) -> str:
    """pg_authid's md5 format: 'md5' + md5(password + username)."""
    return "md5" + hashlib.md5((password + username).encode("utf-8")).hexdigest()


def md5_server_check(secret: Secret, username: str, salt: bytes, response: bytes) -> bool:
    """Check a client's md5 PasswordMessage body against a password or md5 Secret.

    ``response`` is the PasswordMessage body (its trailing NUL is optional).
    Returns False for a wrong password.  Raises AuthFailed if the Secret is a
    SCRAM verifier, from which an md5 answer cannot be checked (PostgreSQL
    then runs SCRAM instead of md5; the data path should do the same).
    """
    if secret.kind == "password":
        md5_hash = md5_hash_of(secret.password, username)
    elif secret.kind == "md5":
        md5_hash = secret.md5
    else:
        raise AuthFailed(f"md5 authentication is impossible for user {username!r}: "
                         "the auth file holds only a SCRAM verifier", pq.SQLSTATE_INVALID_AUTHORIZATION)
    response = bytes(response)
    if response.endswith(b"\0"):
        response = response[:-1]
    return hmac.compare_digest(md5_response(md5_hash, salt), response)


# --- proxy as client of PostgreSQL (proxy -> server) ---------------------------

#: What each server request is called in ``ServerAuthRule`` (libpq's require_auth names).
_METHOD_OF_REQUEST = {pq.AUTH_OK: "none", pq.AUTH_CLEARTEXT_PASSWORD: "password",
                      pq.AUTH_MD5_PASSWORD: "md5", pq.AUTH_SASL: "scram-sha-256"}
_METHOD_WORDS = {"none": "accepted the login without asking for any authentication",
                 "password": "asked for a cleartext password", "md5": "asked for an md5 password",
                 "scram-sha-256": "asked for SCRAM-SHA-256"}


@dataclasses.dataclass(frozen=True)
class ServerAuthRule:
    """Which ways of logging in the proxy accepts from a server (libpq's ``require_auth``).

    ``allowed`` holds "password" (cleartext), "md5", "scram-sha-256" and
    "none" (AuthenticationOk with no exchange before it); ``source`` names
    the rule in errors (the setting, or which default).  A request for
    another method is refused before anything is sent.
    """

    allowed: frozenset
    source: str

    def check(self, auth_code: int) -> None:
        """AuthFailed (28000) unless the method the server asks for (``auth_code``) is allowed."""
        method = _METHOD_OF_REQUEST.get(auth_code)
        if method is not None and method not in self.allowed:
            raise AuthFailed(f"the server {_METHOD_WORDS[method]}, which {self.source} does not accept "
                             f"(it accepts {', '.join(sorted(self.allowed)) or 'nothing'}); nothing was sent",
                             pq.SQLSTATE_INVALID_AUTHORIZATION)


class _LoginStage(enum.IntEnum):
    START = 1           # waiting for the server's first Authentication request
    SASL_CONTINUE = 2   # client-first sent, waiting for SASLContinue
    SASL_FINAL = 3      # client-final sent, waiting for SASLFinal
    SASL_VERIFIED = 4   # server signature checked, waiting for AuthenticationOk
    PASSWORD_SENT = 5   # cleartext/md5 answer sent, waiting for AuthenticationOk
    DONE = 6            # AuthenticationOk received
    FAILED = 7


class ServerLogin:
    """Answer PostgreSQL's Authentication requests on behalf of one user.

    For callers: step(code, payload) for each Authentication ('R') message,
    where ``code`` is its Int32 and ``payload`` the bytes after it; send the
    returned (type, body) if not None.  ``done`` is True after AuthenticationOk.

    Credentials, any of:
      password      plain text: cleartext, md5 and SCRAM all work;
      md5_hash      "md5<hex>" from pg_authid: md5 only;
      client_key + scram_secret  (the ClientKey a client proved to the proxy,
                    and the proxy's verifier for that user): SCRAM only, and
                    only if the server's salt and iterations equal the verifier's.
    """

    def __init__(self, username: str, password: str | None = None,
                 client_key: bytes | None = None, scram_secret: Secret | None = None,
                 *, md5_hash: str | None = None, rule: ServerAuthRule | None = None,
                 max_iterations: int | None = None):
        if client_key is not None:
            if scram_secret is None or scram_secret.kind != "scram":
                raise ValueError("client_key needs the scram_secret it belongs to "
                                 "(its ServerKey verifies the server)")
            if len(client_key) != SCRAM_KEY_LEN:
                raise ValueError(f"client_key must be {SCRAM_KEY_LEN} bytes")
            if not hmac.compare_digest(hashlib.sha256(client_key).digest(), scram_secret.stored_key):
                raise ValueError("client_key does not belong to scram_secret (H(ClientKey) != StoredKey)")
        if password is None and client_key is None and md5_hash is None:
            raise ValueError("ServerLogin needs a password, an md5_hash or a client_key")
        self.username = username
        self._password = password
        self._md5_hash = md5_hash
        self._client_key = client_key
        self._scram_secret = scram_secret
        self._stage = _LoginStage.START
        self._client_nonce = _b64e(secrets.token_bytes(_NONCE_BYTES))
        self.method: str | None = None    # "trust", "password", "md5", "scram-sha-256"
        self._rule = rule                 # the methods accepted from the server; None: any
        self._max_iterations = max_iterations   # most PBKDF2 rounds computed for a server; None: any

    @property
    def done(self) -> bool:
        return self._stage == _LoginStage.DONE

    def _fail(self, reason: str, sqlstate: str = pq.SQLSTATE_INVALID_AUTHORIZATION) -> AuthFailed:
        self._stage = _LoginStage.FAILED
        return AuthFailed(reason, sqlstate)

    def answer(self, auth_code: int, payload: bytes = b"") -> bytes | None:
        """``step`` for the I/O layer: the framed PasswordMessage to send, or None."""
        reply = self.step(auth_code, payload)
        return None if reply is None else pq.password_message(reply[1])

    def step(self, auth_code: int, payload: bytes = b"") -> tuple[str, bytes] | None:
        """Consume one Authentication request; return ('p', body) to send, or None."""
        payload = bytes(payload)
        stage = self._stage
        if stage in (_LoginStage.DONE, _LoginStage.FAILED):
            raise self._fail(f"authentication request {auth_code} after the login "
                             f"{'finished' if stage == _LoginStage.DONE else 'failed'}",
                             pq.SQLSTATE_PROTOCOL_VIOLATION)
        if auth_code == pq.AUTH_OK:
            return self._on_ok(stage)
        if stage != _LoginStage.START and auth_code not in (pq.AUTH_SASL_CONTINUE, pq.AUTH_SASL_FINAL):
            raise self._fail(f"server sent authentication request {auth_code} in the middle "
                             "of another authentication", pq.SQLSTATE_PROTOCOL_VIOLATION)
        self._check_rule(auth_code)
        if auth_code == pq.AUTH_CLEARTEXT_PASSWORD:
            return self._on_cleartext()
        if auth_code == pq.AUTH_MD5_PASSWORD:
            return self._on_md5(payload)
        if auth_code == pq.AUTH_SASL:
            return self._on_sasl(payload)
        if auth_code == pq.AUTH_SASL_CONTINUE:
            return self._on_sasl_continue(payload)
        if auth_code == pq.AUTH_SASL_FINAL:
            return self._on_sasl_final(payload)
        names = {pq.AUTH_KERBEROS_V5: "Kerberos V5", pq.AUTH_GSS: "GSSAPI",
                 pq.AUTH_GSS_CONTINUE: "GSSAPI", pq.AUTH_SSPI: "SSPI"}
        raise self._fail(f"server requests an unsupported authentication method "
                         f"({names.get(auth_code, f'code {auth_code}')}) for user {self.username!r}")

    def _on_ok(self, stage: _LoginStage) -> None:
        if stage in (_LoginStage.SASL_CONTINUE, _LoginStage.SASL_FINAL):
            # A real server always sends SASLFinal first; without it the server
            # never proved it knows the verifier.
            raise self._fail("server sent AuthenticationOk before completing SCRAM "
                             "(no server signature): the server is not who it claims to be",
                             pq.SQLSTATE_PROTOCOL_VIOLATION)
        if stage == _LoginStage.START:
            self._check_rule(pq.AUTH_OK)
            self.method = "trust"
        self._stage = _LoginStage.DONE
        return None

    def _check_rule(self, auth_code: int) -> None:
        if self._rule is not None:
            try:
                self._rule.check(auth_code)
            except AuthFailed as exc:
                raise self._fail(str(exc), exc.sqlstate) from None

    def _on_cleartext(self) -> tuple[str, bytes]:
        if self._password is None:
            raise self._fail(f"server requests a cleartext password for user {self.username!r}, "
                             "but the proxy has no password for it (only a SCRAM ClientKey "
                             "or md5 hash); use scram-sha-256 on the server")
        self.method = "password"
        self._stage = _LoginStage.PASSWORD_SENT
        return _PASSWORD_MESSAGE_TYPE, self._password.encode("utf-8") + b"\0"

    def _on_md5(self, salt: bytes) -> tuple[str, bytes]:
        if len(salt) != 4:
            raise self._fail("malformed AuthenticationMD5Password: salt must be 4 bytes",
                             pq.SQLSTATE_PROTOCOL_VIOLATION)
        if self._password is not None:
            md5_hash = md5_hash_of(self._password, self.username)
        elif self._md5_hash is not None:
            md5_hash = self._md5_hash
        else:
            raise self._fail(f"server requests md5 authentication for user {self.username!r}, "
                             "but the proxy has only a SCRAM ClientKey for it; "
                             "use scram-sha-256 on the server")
        self.method = "md5"
        self._stage = _LoginStage.PASSWORD_SENT
        return _PASSWORD_MESSAGE_TYPE, md5_response(md5_hash, salt) + b"\0"

    def _on_sasl(self, payload: bytes) -> tuple[str, bytes]:
        offered = [m.decode("ascii", "replace") for m in payload.split(b"\0") if m]
        if SCRAM_SHA_256 not in offered:
            raise self._fail(f"server offers SASL mechanisms {offered}; the proxy supports "
                             f"only {SCRAM_SHA_256}")
        if self._password is None and self._client_key is None:
            raise self._fail(f"server requests SCRAM for user {self.username!r}, but the proxy "
                             "has only an md5 hash for it")
        self.method = "scram-sha-256"
        # PostgreSQL ignores the SCRAM user name (the startup packet's counts);
        # send it escaped anyway, as pg8000/scramp do, for readable server traces.
        user = self.username.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={user},r={self._client_nonce}"
        data = ("n,," + self._client_first_bare).encode("utf-8")
        self._stage = _LoginStage.SASL_CONTINUE
        # SASLInitialResponse: String mechanism; Int32 data length; Byte[n] data.
        body = SCRAM_SHA_256.encode("ascii") + b"\0" + pq.INT32.pack(len(data)) + data
        return _PASSWORD_MESSAGE_TYPE, body

    def _on_sasl_continue(self, payload: bytes) -> tuple[str, bytes]:
        if self._stage != _LoginStage.SASL_CONTINUE:
            raise self._fail("unexpected AuthenticationSASLContinue", pq.SQLSTATE_PROTOCOL_VIOLATION)
        try:
            server_first = _decode(payload, "server-first")
            nonce, salt, iterations = self._parse_server_first(server_first)
        except AuthFailed as exc:
            raise self._fail(str(exc), exc.sqlstate) from None
        if self._client_key is not None:
            v = self._scram_secret
            if iterations != v.iterations or not hmac.compare_digest(salt, v.salt):
                raise self._fail(
                    f"the server's SCRAM verifier for user {self.username!r} differs from the "
                    f"proxy's (salt/iterations; server i={iterations}, proxy i={v.iterations}), "
                    "so the client's ClientKey cannot log in: copy the server's rolpassword "
                    "into the auth file")
            client_key, stored_key, server_key = self._client_key, v.stored_key, v.server_key
        else:
            if self._max_iterations is not None and iterations > self._max_iterations:
                # PBKDF2 at the server's say-so: 10^9 rounds would take this thread minutes.
                raise self._fail(f"the server asks for {iterations} SCRAM iterations, more than "
                                 f"server_scram_max_iterations ({self._max_iterations}); nothing more was sent")
            client_key, stored_key, server_key = scram_keys(self._password, salt, iterations)
        without_proof = f"c=biws,r={nonce}"          # biws = base64("n,,")
        auth_message = ",".join((self._client_first_bare, server_first, without_proof)).encode("utf-8")
        proof = _xor(client_key, _hmac(stored_key, auth_message))
        self._server_signature = _hmac(server_key, auth_message)
        self._stage = _LoginStage.SASL_FINAL
        return _PASSWORD_MESSAGE_TYPE, f"{without_proof},p={_b64e(proof)}".encode("ascii")

    def _parse_server_first(self, text: str) -> tuple[str, bytes, int]:
        if text.startswith("e="):
            raise AuthFailed(f"server rejected SCRAM: {text[2:]}", pq.SQLSTATE_INVALID_AUTHORIZATION)
        attrs = _attributes(text.split(","), "server-first")
        if len(attrs) < 3 or [k for k, _ in attrs[:3]] != ["r", "s", "i"]:
            raise _protocol_error("malformed SCRAM server-first: expected r=...,s=...,i=...")
        nonce, salt_b64, iter_text = (v for _, v in attrs[:3])
        if not _valid_nonce(nonce) or not nonce.startswith(self._client_nonce) \
                or len(nonce) <= len(self._client_nonce):
            raise _protocol_error("SCRAM server-first nonce does not extend the proxy's nonce")
        salt = _b64d(salt_b64, "salt (s=)")
        if not salt:
            raise _protocol_error("malformed SCRAM server-first: empty salt")
        if not (iter_text.isascii() and iter_text.isdigit()) or int(iter_text) < 1:
            raise _protocol_error("malformed SCRAM server-first: iteration count is not a positive integer")
        return nonce, salt, int(iter_text)

    def _on_sasl_final(self, payload: bytes) -> None:
        if self._stage != _LoginStage.SASL_FINAL:
            raise self._fail("unexpected AuthenticationSASLFinal", pq.SQLSTATE_PROTOCOL_VIOLATION)
        try:
            text = _decode(payload, "server-final")
            if text.startswith("e="):
                raise AuthFailed(f"server rejected SCRAM: {text[2:]}", pq.SQLSTATE_INVALID_AUTHORIZATION)
            signature = dict(_attributes(text.split(","), "server-final")).get("v") if text else None
            if signature is None:
                raise _protocol_error("malformed SCRAM server-final: no server signature (v=)")
            received = _b64d(signature, "server signature (v=)")
        except AuthFailed as exc:
            raise self._fail(str(exc), exc.sqlstate) from None
        if not hmac.compare_digest(received, self._server_signature):
            raise self._fail("SCRAM server signature mismatch: the server is not who it claims "
                             f"to be (or its verifier for user {self.username!r} changed)")
        self._stage = _LoginStage.SASL_VERIFIED
        return None


# --- how the proxy logs in to PostgreSQL for one user --------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class ServerCredentials:
    """How the proxy logs in to PostgreSQL as one user (any one field set, or none for trust)."""

    password: str | None = None
    md5_hash: str | None = None
    client_key: bytes | None = None
    scram_secret: Secret | None = None

    def login(self, user: str, rule: ServerAuthRule | None = None,
              max_iterations: int | None = None) -> ServerLogin | None:
        """A ServerLogin for these credentials; None when there are none (trusting server).
        ``rule`` and ``max_iterations``: see ServerLogin."""
        limits = dict(rule=rule, max_iterations=max_iterations)
        if self.password is not None:
            return ServerLogin(user, password=self.password, **limits)
        if self.client_key is not None:
            return ServerLogin(user, client_key=self.client_key, scram_secret=self.scram_secret, **limits)
        if self.md5_hash is not None:
            return ServerLogin(user, md5_hash=self.md5_hash, **limits)
        return None

    @property
    def kind(self) -> str:
        if self.password is not None:
            return "password"
        if self.client_key is not None:
            return "scram-client-key"
        if self.md5_hash is not None:
            return "md5-hash"
        return "none"

    def __repr__(self) -> str:        # never show the secret parts
        return f"ServerCredentials({self.kind})"

    __str__ = __repr__


NO_CREDENTIALS = ServerCredentials()


def credentials_from_secret(secret: Secret | None) -> ServerCredentials:
    """Server credentials a stored secret gives by itself (a SCRAM verifier gives none)."""
    if secret is None:
        return NO_CREDENTIALS
    if secret.kind == "password":
        return ServerCredentials(password=secret.password)
    if secret.kind == "md5":
        return ServerCredentials(md5_hash=secret.md5)
    return NO_CREDENTIALS
