"""Auth file reading: a YAML user list or PgBouncer's userlist.txt -> Secret values, checked at load time.

The YAML file looks like::

    users:
      alice: {scram: "SCRAM-SHA-256$4096:<salt b64>$<StoredKey b64>:<ServerKey b64>"}
      bob:   {password: "plain text"}
      carol: {md5: "md5<32 hex digits>"}

``scram`` is PostgreSQL's ``pg_authid.rolpassword`` format, so a verifier can
be copied from the server as is.  Like ssh and PgBouncer, a file that group or
others may read or write is refused.

PgBouncer's userlist.txt is read as it is (``parse_userlist_text``): one
``"user" "secret"`` line per user, a doubled ``""`` for a quote inside a
field, the rest of the line ignored, comment lines starting with ``;`` (or
``#``); the secret is a plain password, ``md5<32 hex>`` or a SCRAM verifier.
The format is told by the content (a first line starting with ``"``) or a
``.txt`` name, so a file keeps working when PgBouncer and the proxy share it.

Every problem is one AuthFileError whose message fits on one line and names
the user and line.  No message, log line or repr ever contains secret
material (passwords, md5 hashes, StoredKey/ServerKey).
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import hashlib
import hmac
import os
import re
import secrets
import stat
import threading
from types import MappingProxyType
from typing import Mapping

import yaml
from .logs import get_logger
try:  # RFC 4013, the same tables PostgreSQL uses: scramp >= 1.5 keeps it in utils,
    from scramp.utils import saslprep
except ImportError:  # scramp 1.4 (the newest for Python 3.10) in core
    from scramp.core import saslprep

log = get_logger(__name__)

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_KEY_LEN = 32            # SHA-256 digest size: StoredKey, ServerKey, ClientKey
DEFAULT_ITERATIONS = 4096     # PostgreSQL's default scram_iterations
DEFAULT_SALT_LEN = 16         # PostgreSQL's SCRAM_DEFAULT_SALT_LEN

SECRET_KINDS = ("scram", "password", "md5")
_MD5_RE = re.compile(r"md5[0-9a-fA-F]{32}")


class AuthFileError(ValueError):
    """The auth file cannot be used: unreadable, too permissive, or malformed."""


@dataclasses.dataclass(frozen=True, eq=False)
class Secret:
    """What the proxy knows about one user's password.

    kind "scram":    iterations, salt, stored_key, server_key
    kind "password": password (the plain text)
    kind "md5":      md5 ("md5" + 32 lower-case hex digits, as in pg_authid)
    """

    kind: str
    iterations: int | None = None
    salt: bytes | None = None
    stored_key: bytes | None = None
    server_key: bytes | None = None
    password: str | None = None
    md5: str | None = None

    def same_as(self, other: "Secret") -> bool:
        """True if both describe the same secret (constant-time on the secret parts)."""
        def b(v):
            return v.encode("utf-8") if isinstance(v, str) else (v or b"")
        if (self.kind, self.iterations, self.salt) != (other.kind, other.iterations, other.salt):
            return False
        same = True
        for name in ("stored_key", "server_key", "password", "md5"):
            same &= hmac.compare_digest(b(getattr(self, name)), b(getattr(other, name)))
        return same

    def __repr__(self) -> str:
        # Never show keys, salts, hashes or passwords: reprs end up in logs.
        if self.kind == "scram":
            return f"Secret(kind='scram', iterations={self.iterations})"
        return f"Secret(kind={self.kind!r})"

    __str__ = __repr__


# --- SCRAM verifiers ---------------------------------------------------------

def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None


def parse_scram_verifier(text: str) -> Secret:
    """Parse PostgreSQL's rolpassword format into a Secret of kind "scram".

    Format: ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``,
    the last three base64.  Raises ValueError saying which part is wrong
    (never quoting the keys).
    """
    if not isinstance(text, str):
        raise ValueError(f"SCRAM verifier must be a string, got {type(text).__name__}")
    parts = text.split("$")
    if len(parts) != 3:
        raise ValueError("bad SCRAM verifier format: expected "
                         "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")
    method, iter_salt, keys = parts
    if method != SCRAM_SHA_256:
        raise ValueError(f"bad SCRAM verifier format: mechanism must be {SCRAM_SHA_256}")
    iter_text, sep1, salt_text = iter_salt.partition(":")
    stored_text, sep2, server_text = keys.partition(":")
    if not sep1 or not sep2:
        raise ValueError("bad SCRAM verifier format: expected "
                         "SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>")
    if not (iter_text.isascii() and iter_text.isdigit()):
        raise ValueError(f"iteration count {iter_text!r} is not an integer")
    iterations = int(iter_text)
    if iterations < 1:
        raise ValueError("iteration count must be at least 1")
    salt = _b64(salt_text, "salt")
    if not salt:
        raise ValueError("salt is empty")
    stored_key = _b64(stored_text, "StoredKey")
    server_key = _b64(server_text, "ServerKey")
    for name, key in (("StoredKey", stored_key), ("ServerKey", server_key)):
        if len(key) != SCRAM_KEY_LEN:
            raise ValueError(f"{name} must be {SCRAM_KEY_LEN} bytes, got {len(key)}")
    return Secret("scram", iterations=iterations, salt=salt,
                  stored_key=stored_key, server_key=server_key)


def secret_from_rolpassword(text: str) -> Secret:
    """A Secret from what pg_shadow.passwd / pg_authid.rolpassword holds; ValueError if unusable."""
    if text.startswith("SCRAM-SHA-256$"):
        return parse_scram_verifier(text)
    if _MD5_RE.fullmatch(text):
        return Secret("md5", md5=text.lower())
    if not text:
        raise ValueError("empty password")
    return Secret("password", password=text)


def saslprep_password(password: str) -> bytes:
    """The bytes SCRAM hashes for a password, normalised as PostgreSQL does.

    PostgreSQL (server and libpq) applies SASLprep and, if the password is not
    valid for SASLprep, falls back to the raw UTF-8 bytes.  We do the same so
    verifiers derived here match the ones PostgreSQL and libpq compute.
    """
    try:
        prepared = saslprep(password)
    except Exception:  # scramp raises ScramException for prohibited input
        prepared = password
    return prepared.encode("utf-8")


def scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) for a password, per RFC 5802."""
    salted = hashlib.pbkdf2_hmac("sha256", saslprep_password(password), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return client_key, hashlib.sha256(client_key).digest(), server_key


def scram_secret_from_password(password: str, salt: bytes | None = None,
                               iterations: int = DEFAULT_ITERATIONS) -> Secret:
    """Derive a SCRAM verifier from a plain password (random 16-byte salt by default).

    This costs one PBKDF2 run; AuthFile.scram_secret() caches the result per user.
    """
    if salt is None:
        salt = secrets.token_bytes(DEFAULT_SALT_LEN)
    if iterations < 1:
        raise ValueError("iteration count must be at least 1")
    _, stored_key, server_key = scram_keys(password, salt, iterations)
    return Secret("scram", iterations=iterations, salt=salt,
                  stored_key=stored_key, server_key=server_key)


def check_password(secret: Secret, user: str, password: str) -> bool:
    """Whether a clear-text ``password`` (auth_type password, PgBouncer's plain) matches a stored secret.

    Every comparison is constant-time: the plain text, the md5 hash of
    password and user name, or the StoredKey derived with the verifier's salt
    and iterations.
    """
    if secret.kind == "password":
        return hmac.compare_digest(password.encode("utf-8"), secret.password.encode("utf-8"))
    if secret.kind == "md5":
        computed = "md5" + hashlib.md5(password.encode("utf-8") + user.encode("utf-8")).hexdigest()
        return hmac.compare_digest(computed.encode("ascii"), secret.md5.encode("ascii"))
    _, stored_key, _ = scram_keys(password, secret.salt, secret.iterations)
    return hmac.compare_digest(stored_key, secret.stored_key)


def format_scram_verifier(secret: Secret) -> str:
    """The rolpassword text of a scram Secret (for writing auth files)."""
    if secret.kind != "scram":
        raise ValueError(f"not a SCRAM secret: {secret!r}")
    enc = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return (f"{SCRAM_SHA_256}${secret.iterations}:{enc(secret.salt)}"
            f"${enc(secret.stored_key)}:{enc(secret.server_key)}")


# --- the file ----------------------------------------------------------------

def _user_lines(text: str) -> dict[str, int]:
    """Map each user name under ``users`` to its 1-based line; reject duplicates.

    safe_load silently keeps the last of two equal keys, so duplicates are
    found on the node tree.
    """
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[str, int] = {}
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key_node, value_node in root.value:
        if key_node.value != "users" or not isinstance(value_node, yaml.MappingNode):
            continue
        for user_node, _ in value_node.value:
            line = user_node.start_mark.line + 1
            name = user_node.value
            if name in lines:
                raise ValueError(f"user {name!r} (line {line}): defined twice "
                                 f"(first on line {lines[name]})")
            lines[name] = line
    return lines


def _parse_entry(value) -> Secret:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping with one of {', '.join(SECRET_KINDS)}, "
                         f"got {type(value).__name__}")
    unknown = [k for k in value if k not in SECRET_KINDS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (expected one of {', '.join(SECRET_KINDS)})")
    if len(value) != 1:
        raise ValueError(f"expected exactly one of {', '.join(SECRET_KINDS)}, got {len(value)}")
    (kind, text), = value.items()
    if not isinstance(text, str):
        raise ValueError(f"{kind}: expected a string, got {type(text).__name__} (quote it)")
    if kind == "scram":
        try:
            return parse_scram_verifier(text)
        except ValueError as exc:
            raise ValueError(f"scram: {exc}") from None
    if kind == "password":
        if not text:
            raise ValueError("password: empty passwords are not allowed")
        return Secret("password", password=text)
    if not _MD5_RE.fullmatch(text):
        raise ValueError("md5: bad format: expected 'md5' followed by 32 hex digits")
    return Secret("md5", md5=text.lower())


def parse_auth_text(text: str, where: str = "auth file") -> dict[str, Secret]:
    """Parse the YAML text of an auth file; raise AuthFileError naming the user and line."""
    try:
        raw = yaml.safe_load(text)
        lines = _user_lines(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise AuthFileError(f"{where}{at}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    except ValueError as exc:
        raise AuthFileError(f"{where}: {exc}") from None
    if not isinstance(raw, dict) or "users" not in raw:
        raise AuthFileError(f"{where}: expected a mapping with a 'users' key at the top level")
    extra = [k for k in raw if k != "users"]
    if extra:
        raise AuthFileError(f"{where}: unknown top-level key {extra[0]!r} (expected only 'users')")
    users = raw["users"]
    if users is None:
        users = {}
    if not isinstance(users, dict):
        raise AuthFileError(f"{where}: 'users' must be a mapping of user name to secret")
    secrets_by_user: dict[str, Secret] = {}
    for name, value in users.items():
        if not isinstance(name, str) or not name:
            # YAML 1.1 turns unquoted on/off/yes/no/null/123 into non-strings.
            raise AuthFileError(f"{where}: user name {name!r} is not a non-empty string (quote it)")
        line = lines.get(name)
        at = f" (line {line})" if line else ""
        try:
            secrets_by_user[name] = _parse_entry(value)
        except ValueError as exc:
            raise AuthFileError(f"{where}: user {name!r}{at}: {exc}") from None
    return secrets_by_user


# --- PgBouncer's userlist.txt ---------------------------------------------------

_COMMENT_STARTS = (";", "#")


def _userlist_field(line: str, start: int) -> tuple[str, int] | None:
    """The quoted field opening at ``line[start]`` (a ``"``): (its text, the index after it), None if unclosed.

    A doubled quote inside the field stands for one quote, as in PgBouncer.
    """
    out = []
    i = start + 1
    while True:
        end = line.find('"', i)
        if end < 0:
            return None
        out.append(line[i:end])
        if line.startswith('""', end):
            out.append('"')
            i = end + 2
            continue
        return "".join(out), end + 1


def parse_userlist_text(text: str, where: str = "auth file") -> dict[str, Secret]:
    """Parse PgBouncer's ``"user" "secret"`` format; AuthFileError naming the line.

    A user given twice keeps the last line's secret (as PgBouncer does).  A
    user with an empty secret is left out: it can log in only where no password
    is asked (trust, peer, cert), which needs no entry here.
    """
    users: dict[str, Secret] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(_COMMENT_STARTS):
            continue
        at = f"{where} line {number}"
        if not line.startswith('"'):
            raise AuthFileError(f'{at}: expected "user" "secret" (a line starts with a double quote, '
                                f"or ; or # for a comment)")
        field = _userlist_field(line, 0)
        if field is None:
            raise AuthFileError(f"{at}: the user name's closing double quote is missing")
        name, i = field
        rest = line[i:].lstrip()
        if not rest.startswith('"'):
            raise AuthFileError(f'{at}: user {name!r}: expected its secret in double quotes after the name')
        field = _userlist_field(rest, 0)
        if field is None:
            raise AuthFileError(f"{at}: user {name!r}: the secret's closing double quote is missing")
        secret_text = field[0]
        if not name:
            raise AuthFileError(f"{at}: empty user name")
        if not secret_text:
            users.pop(name, None)
            continue
        try:
            users[name] = _userlist_secret(secret_text)
        except ValueError as exc:
            raise AuthFileError(f"{at}: user {name!r}: {exc}") from None
    return users


def _userlist_secret(text: str) -> Secret:
    """A userlist secret: SCRAM verifier, md5 hash, or (anything else) a plain password."""
    if text.startswith(SCRAM_SHA_256 + "$"):
        try:
            return parse_scram_verifier(text)
        except ValueError as exc:
            raise ValueError(f"SCRAM secret: {exc}") from None
    if _MD5_RE.fullmatch(text):
        return Secret("md5", md5=text.lower())
    return Secret("password", password=text)


def is_userlist(text: str, path: str = "") -> bool:
    """Whether an auth file is PgBouncer's userlist.txt: a ``.txt`` name, or a first line that opens a quote."""
    if path.endswith(".txt"):
        return True
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(_COMMENT_STARTS):
            return line.startswith('"')
    return False


def read_auth_file(path: str | os.PathLike) -> dict[str, Secret]:
    """Read and parse an auth file, refusing one that group/others can access."""
    return _read_auth_file(os.fspath(path))[0]


def _read_auth_file(path: str) -> tuple[dict[str, Secret], bytes]:
    """The parsed users and the file's bytes."""
    try:
        # Check the mode on the descriptor we read, not on a path that may change.
        with open(path, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
            if mode & 0o077:
                raise AuthFileError(
                    f"{path}: mode {mode:04o} allows access by group or others; "
                    f"run 'chmod 600 {path}'")
            data = f.read()
    except OSError as exc:
        raise AuthFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthFileError(f"{path}: not valid UTF-8") from None
    if is_userlist(text, path):
        return parse_userlist_text(text, where=path), data
    return parse_auth_text(text, where=path), data


def typical_secret(users: Mapping[str, Secret]) -> tuple[int, str]:
    """(iterations, method) most of ``users`` have: what an unknown user must look like.

    ``iterations``: the most common count of the SCRAM verifiers (ties: the
    larger), DEFAULT_ITERATIONS when there are none.  ``method``: "md5" when
    more users are stored as md5 hashes than as SCRAM verifiers, else "scram"
    (plain passwords can do either and are not counted).
    """
    counts = collections.Counter(s.iterations for s in users.values() if s.kind == "scram")
    iterations = max(counts, key=lambda i: (counts[i], i)) if counts else DEFAULT_ITERATIONS
    md5 = sum(1 for s in users.values() if s.kind == "md5")
    return iterations, "md5" if md5 > sum(counts.values()) else "scram"


class AuthFile:
    """The users of one auth file, safe to share between threads.

    For callers: lookup(), scram_secret(), reload(), len(), and
    ``typical_iterations``/``typical_method`` (see typical_secret).  The
    contents are an immutable mapping replaced in one assignment, so a lookup
    never sees a half-loaded file; reload() that fails keeps the previous contents.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        users, data = _read_auth_file(self.path)
        #: A secret of this proxy that does not change when it restarts (the
        #: contents at start-up, kept across reloads): it derives the salts
        #: that must not change either, see ``scram_secret`` and login.py.
        self.salt_key = hmac.new(b"threadpool_proxy salt key", data, hashlib.sha256).digest()
        self._users: Mapping[str, Secret] = MappingProxyType(users)
        self.typical_iterations, self.typical_method = typical_secret(users)
        # user -> (plain Secret it was derived from, derived scram Secret)
        self._derived: dict[str, tuple[Secret, Secret]] = {}

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: str) -> bool:
        return user in self._users

    def lookup(self, user: str) -> Secret | None:
        return self._users.get(user)

    def scram_secret(self, user: str) -> Secret | None:
        """A SCRAM verifier for the user: as stored, or derived once from a plain password.

        None for unknown users and for md5 entries (no SCRAM possible from an md5 hash).
        """
        secret = self._users.get(user)
        if secret is None or secret.kind == "md5":
            return None
        if secret.kind == "scram":
            return secret
        iterations = self.typical_iterations
        with self._lock:
            cached = self._derived.get(user)
        if cached is not None and cached[0] is secret and cached[1].iterations == iterations:
            return cached[1]
        # PBKDF2 runs outside the lock; if two threads race, the first stored wins.
        # The salt is derived from the user name, so a restart does not change
        # it, and the iteration count is the one most users have (either
        # differing would set this user apart from the others, and from unknown users).
        salt = hmac.new(self.salt_key, b"password\0" + user.encode("utf-8"), hashlib.sha256).digest()
        derived = scram_secret_from_password(secret.password, salt=salt[:DEFAULT_SALT_LEN], iterations=iterations)
        with self._lock:
            cached = self._derived.get(user)
            if cached is not None and cached[0] is secret and cached[1].iterations == iterations:
                return cached[1]
            self._derived[user] = (secret, derived)
            return derived

    def reload(self) -> int:
        """Re-read the file; on error keep the old contents and raise AuthFileError.

        Returns the number of users now loaded.
        """
        # On error nothing below runs: the old mapping stays.  The caller logs
        # the AuthFileError (the SIGHUP handler does), so it is not logged twice.
        fresh = read_auth_file(self.path)
        with self._lock:
            old = self._users
            # Keep a derived verifier only if its user's password did not change.
            for user, secret in fresh.items():
                prev = old.get(user)
                if prev is not None and user in self._derived and prev.same_as(secret):
                    fresh[user] = prev
            self._derived = {u: d for u, d in self._derived.items() if fresh.get(u) is d[0]}
            self._users = MappingProxyType(fresh)
            self.typical_iterations, self.typical_method = typical_secret(fresh)
        log.debug("auth file %s reloaded: %d users", self.path, len(fresh))
        return len(fresh)
