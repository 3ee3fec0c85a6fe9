"""Small helpers shared by the tests (import as ``from helpers import ...``)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional

import yaml

# The passwords the ``pg`` fixture gives its roles (trustuser logs in by
# ``trust`` and never needs its password, but has one for auth_file tests).
PASSWORDS = {
    "postgres": "postgres-secret",
    "app": "app-secret",
    "other": "other-secret",
    "md5user": "md5-secret",
    "trustuser": "trust-secret",
    "repl": "repl-secret",
}


def wait_until(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.05) -> Any:
    """Call ``predicate`` until it returns something truthy or ``timeout`` passes.

    Returns that truthy value, or the last (falsy) value after the timeout, so
    write ``assert wait_until(lambda: ...)``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def psql_path(bindir: Optional[str] = None) -> str:
    """The psql binary: /usr/bin/psql, else the server's bindir, else PATH."""
    for candidate in ("/usr/bin/psql", os.path.join(bindir, "psql") if bindir else None):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("psql")
    if not found:
        raise RuntimeError("psql not found (install postgresql-client)")
    return found


def psql(target: Any, *args: str, sql: Optional[str] = None, user: str = "app",
         password: Optional[str] = None, dbname: str = "appdb", input: Optional[str] = None,
         timeout: float = 60, env: Optional[dict] = None, check: bool = False
         ) -> subprocess.CompletedProcess:
    """Run psql against ``target`` (the ``pg`` fixture or a proxy: anything with .host, .port).

    Runs ``psql -X -w -At -v ON_ERROR_STOP=1 -h HOST -p PORT -U USER -d DBNAME``
    plus ``-c SQL`` when ``sql`` is given, plus ``args``; the password (default:
    the role's entry in PASSWORDS) goes in PGPASSWORD.  Returns the
    CompletedProcess with text stdout/stderr; ``check=True`` raises on failure.
    """
    if password is None:
        password = getattr(target, "passwords", PASSWORDS).get(user, PASSWORDS.get(user))
    cmd = [psql_path(getattr(target, "bindir", None)), "-X", "-w", "-At", "-v", "ON_ERROR_STOP=1",
           "-h", str(target.host), "-p", str(target.port), "-U", user, "-d", dbname]
    if sql is not None:
        cmd += ["-c", sql]
    cmd += list(args)
    run_env = dict(os.environ)
    run_env.pop("PGSERVICE", None)
    run_env.setdefault("PGCONNECT_TIMEOUT", "10")
    if password is not None:
        run_env["PGPASSWORD"] = password
    else:
        run_env.pop("PGPASSWORD", None)
    if env:
        run_env.update(env)
    return subprocess.run(cmd, input=input, capture_output=True, text=True,
                          timeout=timeout, env=run_env, check=check)


def connect(pg, proxy, user: str = "app", dbname: str = "appdb", autocommit: bool = True,
            prepare_threshold: Optional[int] = 5, **params):
    """A psycopg connection through ``proxy`` (anything with .host, .port) as ``user`` to ``dbname``.

    The conninfo comes from ``pg.dsn`` (the role's password unless ``password``
    is given); other keyword arguments are conninfo parameters too
    (``connect_timeout=120``, ``sslmode="prefer"``).  ``prepare_threshold`` is
    psycopg's (5, its default; None: never use server-side prepared statements).
    """
    import psycopg

    return psycopg.connect(pg.dsn(user=user, dbname=dbname, host=proxy.host, port=proxy.port, **params),
                           autocommit=autocommit, prepare_threshold=prepare_threshold)


# -- the protocol by hand -----------------------------------------------------
#
# Built here, not with threadpool_proxy.protocol, so that the tests do not
# trust the code they check.  Startup-phase packets have no type byte: Int32
# length (including itself), Int32 code, payload.

PROTOCOL_V3 = 196608            # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def startup_packet(params: Dict[str, str], version: int = PROTOCOL_V3) -> bytes:
    """A StartupMessage: ``version`` then each ``name\\0value\\0``, ended by a \\0."""
    body = struct.pack("!I", version) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!II", 8, SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    return struct.pack("!II", 8, GSSENC_REQUEST_CODE)


def cancel_packet(pid: int, key: int) -> bytes:
    """A CancelRequest for the backend ``pid`` with secret ``key`` (sent on a new connection)."""
    return struct.pack("!IIII", 16, CANCEL_REQUEST_CODE, pid, key)


# -- a bare-bones protocol client: psycopg/libpq give no SQLSTATE for login errors --

@dataclasses.dataclass
class LoginResult:
    """What ``raw_login`` saw: ``ok`` once ReadyForQuery came, else ``error`` fields."""

    ok: bool
    auth_requests: List[int]                 # the AuthenticationRequest codes, in order (0 = Ok)
    error: Optional[Dict[str, str]] = None   # ErrorResponse fields: "S", "C" (SQLSTATE), "M", ...
    parameters: Dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def sqlstate(self) -> Optional[str]:
        return self.error.get("C") if self.error else None


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def read_message(sock: socket.socket):
    """One backend message: (type byte as str, body bytes)."""
    header = _recv_exact(sock, 5)
    length = struct.unpack("!I", header[1:])[0]
    return chr(header[0]), _recv_exact(sock, length - 4)


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def parse_error_fields(body: bytes) -> Dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def raw_login(host: str, port: int, user: str, dbname: str, password: Optional[str] = None,
              timeout: float = 10, options: Optional[Dict[str, str]] = None) -> LoginResult:
    """Log in over plain TCP speaking the protocol by hand and report what happened.

    Handles trust, cleartext, md5 and SCRAM-SHA-256 (no TLS, no channel
    binding).  Sends Terminate after a successful login.
    """
    import scramp

    params = {"user": user, "database": dbname, **(options or {})}
    result = LoginResult(ok=False, auth_requests=[])
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(startup_packet(params))
        scram = None
        while True:
            kind, msg = read_message(sock)
            if kind == "E":
                result.error = parse_error_fields(msg)
                return result
            if kind == "S":
                name, value = msg.split(b"\0")[:2]
                result.parameters[name.decode()] = value.decode()
            elif kind == "Z":
                result.ok = True
                sock.sendall(_message(b"X", b""))
                return result
            elif kind == "R":
                code = struct.unpack("!I", msg[:4])[0]
                result.auth_requests.append(code)
                if code == 0:
                    continue
                if password is None:
                    raise ValueError(f"server asked for a password (auth request {code})")
                if code == 3:
                    sock.sendall(_message(b"p", password.encode() + b"\0"))
                elif code == 5:
                    inner = hashlib.md5((password + user).encode()).hexdigest()
                    outer = hashlib.md5(inner.encode() + msg[4:8]).hexdigest()
                    sock.sendall(_message(b"p", b"md5" + outer.encode() + b"\0"))
                elif code == 10:
                    mechs = [m.decode() for m in msg[4:].split(b"\0") if m]
                    # PostgreSQL takes the user from the startup packet, not from the exchange
                    # (libpq sends none there); scramp wants one, and SASLprep refuses control
                    # characters, so a name with them is stood in for.
                    scram = scramp.ScramClient([m for m in mechs if not m.endswith("-PLUS")],
                                               user if user.isprintable() else "*", password)
                    first = scram.get_client_first().encode()
                    sock.sendall(_message(b"p", scram.mechanism_name.encode() + b"\0"
                                          + struct.pack("!I", len(first)) + first))
                elif code == 11:
                    scram.set_server_first(msg[4:].decode())
                    sock.sendall(_message(b"p", scram.get_client_final().encode()))
                elif code == 12:
                    scram.set_server_final(msg[4:].decode())
                else:
                    raise ValueError(f"unsupported authentication request {code}")
            # K (BackendKeyData), N (NoticeResponse) and others: ignored


# -- a raw session after login (auth_type trust, or the trustuser role in pass-through) --

def trust_session(proxy, user="trustuser", dbname="appdb", options: Optional[Dict[str, str]] = None) -> socket.socket:
    """A raw protocol client logged in with auth_type trust, after its first ReadyForQuery."""
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.sendall(startup_packet({"user": user, "database": dbname, **(options or {})}))
    while True:
        kind, body = read_message(sock)
        assert kind != "E", parse_error_fields(body)
        if kind == "Z":
            return sock


def query(sock, sql: str):
    sock.sendall(_message(b"Q", sql.encode() + b"\0"))


def read_until_ready(sock) -> list:
    """Messages up to ReadyForQuery: [(kind, body)]."""
    out = []
    while True:
        kind, body = read_message(sock)
        out.append((kind, body))
        if kind == "Z":
            return out


def login_with_key(host: str, port: int, user: str = "trustuser", database: str = "appdb") -> tuple:
    """A raw client logged in without a password (auth_type trust): (socket, pid, secret) of the
    BackendKeyData it was told, for the tests that send CancelRequests."""
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(startup_packet({"user": user, "database": database}))
    key = None
    while True:
        kind, body = read_message(sock)
        assert kind != "E", parse_error_fields(body)
        if kind == "K":
            key = struct.unpack("!II", body)
        if kind == "Z":
            assert key is not None, "no BackendKeyData before ReadyForQuery"
            return sock, key[0], key[1]


def nothing_to_read(sock, wait: float) -> bool:
    """True if no byte (and no end of file) arrives within ``wait`` seconds."""
    sock.settimeout(wait)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return False
    except socket.timeout:
        return True
    finally:
        sock.settimeout(10)


def read_to_end(sock, timeout: float = 5) -> list:
    """Every message until the connection closes: [(kind, body)]; AssertionError if it stays open."""
    sock.settimeout(timeout)
    out = []
    try:
        while True:
            out.append(read_message(sock))
    except ConnectionError:
        return out
    except socket.timeout:
        raise AssertionError(f"still open after {timeout} s; got {out}") from None
    finally:
        sock.settimeout(10)


# -- auth files ------------------------------------------------------------------

def write_auth_file(path, users: dict, mode: int = 0o600) -> str:
    """users: {name: {"scram"|"md5"|"password": text}}; written with ``mode``."""
    path = str(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump({"users": users}, f)
    os.chmod(path, mode)
    return path


# -- extended-protocol messages by hand ---------------------------------------------
#
# Frontend messages as the protocol documentation lays them out, for sans-I/O tests
# and raw sessions; again not built with threadpool_proxy.protocol.

def message(kind: bytes, body: bytes = b"") -> bytes:
    """A framed message: type byte, Int32 length (including itself), body."""
    return _message(kind, body)


def cstr(text) -> bytes:
    """A NUL-terminated string (text is UTF-8 encoded; bytes are taken as they are)."""
    return (text.encode() if isinstance(text, str) else bytes(text)) + b"\0"


def simple_query(sql: str) -> bytes:
    """Query: one simple-protocol request."""
    return _message(b"Q", cstr(sql))


def parse(name, sql, oids=()) -> bytes:
    """Parse: statement name, query, Int16 count and Int32 OIDs of the parameter types."""
    return _message(b"P", cstr(name) + cstr(sql) + struct.pack("!h", len(oids))
                    + b"".join(struct.pack("!I", o) for o in oids))


def bind(statement, portal="", params=()) -> bytes:
    """Bind: portal, statement, no parameter formats (text), the values, no result formats (text)."""
    values = b"".join(struct.pack("!i", len(v)) + v for v in params)
    return _message(b"B", cstr(portal) + cstr(statement) + b"\0\0" + struct.pack("!h", len(params))
                    + values + b"\0\0")


def describe(kind: bytes, name) -> bytes:
    """Describe of a statement (kind b"S") or a portal (b"P")."""
    return _message(b"D", kind + cstr(name))


def close(kind: bytes, name) -> bytes:
    """Close of a statement (kind b"S") or a portal (b"P")."""
    return _message(b"C", kind + cstr(name))


def execute(portal="", rows: int = 0) -> bytes:
    """Execute: portal, most rows to return (0: all)."""
    return _message(b"E", cstr(portal) + struct.pack("!i", rows))


def copy_data(data: bytes) -> bytes:
    return _message(b"d", data)


SYNC, FLUSH, COPY_DONE = message(b"S"), message(b"H"), message(b"c")


def error_response(sqlstate: str, text: str, severity: str = "ERROR") -> bytes:
    """An ErrorResponse with the fields S and V (severity), C (SQLSTATE) and M (message)."""
    fields = b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(sqlstate) + b"M" + cstr(text)
    return _message(b"E", fields + b"\0")
