"""PostgreSQL connection strings: URIs and libpq key=value strings, parsed and written back (no I/O).

Two spellings of the same thing, as libpq takes them:

* a URI: ``postgresql://user:password@host:port,host2:port2/dbname?key=value&...``
  (``postgres://`` too), percent-encoded, IPv6 addresses in brackets, a
  unix-socket directory as a percent-encoded host or ``?host=/path``;
* key=value pairs: ``host=db port=5432 dbname=app user=app password='a b\\'c'``,
  separated by white space, values single-quoted when they hold white space
  or quotes, ``\\'`` and ``\\\\`` escaped.

``parse()`` turns either into a ``ConnInfo``: the keywords in the order given
(duplicates: the last wins, as in libpq), and which spelling it came in, so
``ConnInfo.replace(host=..., port=...)`` can give back a string an
application reads the way it read the original (the pytest plugin rewrites
``DATABASE_URL`` so).  The proxy's configuration uses it for database entries
given as strings (config.py).

A password is a secret: ``DsnError`` messages name keywords and positions,
never a value that might hold it, and ``ConnInfo.redacted()`` (also its
``repr``) shows ``********`` in its place.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping
from urllib.parse import quote, unquote_to_bytes

#: The URI schemes libpq accepts.
URI_SCHEMES = ("postgresql://", "postgres://")

#: Parameter keywords whose values are secrets (never shown).
SECRET_KEYWORDS = frozenset(("password", "sslpassword"))

#: What a redacted secret looks like.
REDACTED = "********"

#: Keywords written bare in the parts of a URI before "?" (the others go into its query).
_URI_PARTS = ("user", "password", "host", "port", "dbname")

_KEYWORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class DsnError(ValueError):
    """A connection string that libpq would not take; the message never holds a secret."""


@dataclasses.dataclass(frozen=True)
class ConnInfo:
    """A parsed connection string: ``params`` (keyword -> value, in order) and its ``form``.

    ``form`` is ``"uri"`` or ``"keyvalue"``: the spelling ``to_string()`` writes.
    """

    params: Mapping[str, str]
    form: str = "keyvalue"

    def get(self, keyword: str, default: str | None = None) -> str | None:
        return self.params.get(keyword, default)

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts named (``host``, comma-separated; else ``hostaddr``); () when none is."""
        text = self.params.get("host") or self.params.get("hostaddr") or ""
        return tuple(text.split(",")) if text else ()

    @property
    def ports(self) -> tuple[int | None, ...]:
        """One port per host (None: the default, 5432), as libpq pairs them.

        A single port applies to every host; otherwise there must be as many
        ports as hosts.  DsnError for a port that is not a number in 1-65535.
        """
        hosts = self.hosts or ("",)
        text = self.params.get("port", "")
        words = text.split(",") if text else [""]
        if len(words) == 1:
            words = words * len(hosts)
        elif len(words) != len(hosts):
            raise DsnError(f"{len(words)} ports given for {len(hosts)} hosts (give one port, or one per host)")
        ports: list[int | None] = []
        for word in words:
            word = word.strip()
            if not word:
                ports.append(None)
            elif not word.isdigit() or not 1 <= int(word) <= 65535:
                raise DsnError(f"port {word!r} is not a number from 1 to 65535")
            else:
                ports.append(int(word))
        return tuple(ports)

    @property
    def addresses(self) -> tuple[tuple[str, int], ...]:
        """(address, port) of every server to connect to, the default port 5432 filled in.

        The address is ``hostaddr``'s where given (libpq connects there and
        keeps ``host`` for TLS checks), else ``host``'s.
        """
        dial = self.params.get("hostaddr")
        addresses = tuple(dial.split(",")) if dial else self.hosts
        return tuple((host, port or 5432) for host, port in zip(addresses, self.ports))

    def replace(self, **changes: str | None) -> "ConnInfo":
        """The same connection string with these keywords set (None: removed), in the same form."""
        params = dict(self.params)
        for keyword, value in changes.items():
            if value is None:
                params.pop(keyword, None)
            else:
                params[keyword] = str(value)
        return ConnInfo(params, self.form)

    def to_string(self) -> str:
        """The connection string in its own ``form``; a secret is written as is (this is for a client)."""
        return _to_uri(self.params) if self.form == "uri" else _to_keyvalue(self.params)

    def redacted(self) -> str:
        """``to_string()`` with every secret replaced by ``********``: for logs and messages."""
        shown = {k: (REDACTED if k in SECRET_KEYWORDS else v) for k, v in self.params.items()}
        return _to_uri(shown, safe_secrets=True) if self.form == "uri" else _to_keyvalue(shown)

    def __repr__(self) -> str:
        return f"ConnInfo({self.redacted()!r})"

    __str__ = redacted


def is_uri(text: str) -> bool:
    return text.startswith(URI_SCHEMES)


def parse(text: str) -> ConnInfo:
    """A URI or a key=value string -> ConnInfo; DsnError (naming no secret) if libpq would refuse it."""
    if not isinstance(text, str):
        raise DsnError(f"expected a connection string, got {type(text).__name__}")
    if is_uri(text):
        return ConnInfo(_parse_uri(text), "uri")
    return ConnInfo(_parse_keyvalue(text), "keyvalue")


# -- key=value ------------------------------------------------------------------

def _parse_keyvalue(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return params
        match = _KEYWORD.match(text, i)
        if match is None:
            raise DsnError(f"expected a keyword at position {i + 1}")
        keyword = match.group()
        i = match.end()
        while i < n and text[i].isspace():
            i += 1
        if i >= n or text[i] != "=":
            raise DsnError(f'missing "=" after "{keyword}"')
        i += 1
        while i < n and text[i].isspace():
            i += 1
        value: list[str] = []
        if i < n and text[i] == "'":
            i += 1
            while True:
                if i >= n:
                    raise DsnError(f'unterminated quoted value of "{keyword}"')
                ch = text[i]
                if ch == "\\" and i + 1 < n:
                    value.append(text[i + 1])
                    i += 2
                elif ch == "'":
                    i += 1
                    break
                else:
                    value.append(ch)
                    i += 1
        else:
            while i < n and not text[i].isspace():
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(text[i])
                i += 1
        params[keyword] = "".join(value)


def _quote_value(value: str) -> str:
    if value and re.fullmatch(r"[A-Za-z0-9_.:/@,+-]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _to_keyvalue(params: Mapping[str, str]) -> str:
    return " ".join(f"{k}={_quote_value(v)}" for k, v in params.items())


# -- URIs -----------------------------------------------------------------------

def _decode(part: str, what: str) -> str:
    try:
        return unquote_to_bytes(part).decode("utf-8")
    except UnicodeDecodeError:
        raise DsnError(f"the {what} of the URI is not valid UTF-8 once percent-decoded") from None


def _parse_uri(text: str) -> dict[str, str]:
    scheme = next(s for s in URI_SCHEMES if text.startswith(s))
    rest = text[len(scheme):]
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    params: dict[str, str] = {}
    userinfo, at, hostspec = authority.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if user:
            params["user"] = _decode(user, "user name")
        if colon:
            params["password"] = _decode(password, "password")
    hosts, ports = [], []
    for item in hostspec.split(",") if hostspec else []:
        if item.startswith("["):
            end = item.find("]")
            if end < 0:
                raise DsnError("an IPv6 address in the URI lacks its closing \"]\"")
            host, after = item[1:end], item[end + 1:]
            if after and not after.startswith(":"):
                raise DsnError("unexpected text after an IPv6 address in the URI")
            port = after[1:]
        else:
            host, _, port = item.partition(":")
        hosts.append(_decode(host, "host"))
        ports.append(_decode(port, "port"))
    if any(hosts):
        params["host"] = ",".join(hosts)
    if any(ports):
        params["port"] = ",".join(ports)
    if slash and path:
        params["dbname"] = _decode(path, "database name")
    for pair in query.split("&") if query else []:
        if not pair:
            continue
        keyword, eq, value = pair.partition("=")
        keyword = _decode(keyword, "parameter name")
        if not eq:
            raise DsnError(f'missing "=" after URI parameter "{keyword}"')
        if not _KEYWORD.fullmatch(keyword):
            raise DsnError(f'invalid URI parameter name "{keyword}"')
        params[keyword] = _decode(value, f'parameter "{keyword}"')
    return params


def _host_in_uri(host: str) -> str:
    if ":" in host:
        return f"[{host}]"                  # an IPv6 address
    return quote(host, safe="")


def _to_uri(params: Mapping[str, str], safe_secrets: bool = False) -> str:
    """``params`` as a URI; ``safe_secrets``: the values are already redacted, write them unencoded."""
    def enc(keyword: str, value: str) -> str:
        return value if safe_secrets and keyword in SECRET_KEYWORDS else quote(value, safe="")

    out = ["postgresql://"]
    user, password = params.get("user"), params.get("password")
    if user is not None or password is not None:
        out.append(quote(user or "", safe=""))
        if password is not None:
            out.append(":" + enc("password", password))
        out.append("@")
    query = {k: v for k, v in params.items() if k not in _URI_PARTS}
    hosts = params["host"].split(",") if params.get("host") else []
    ports = params["port"].split(",") if params.get("port") else []
    if any(h.startswith("/") for h in hosts) or (ports and hosts and len(ports) != len(hosts)):
        # unix-socket directories, one port for several hosts (or a list libpq would refuse):
        # in the query, as written
        if hosts and not any(h.startswith("/") for h in hosts):
            out.append(",".join(_host_in_uri(h) for h in hosts))
            query = {**{k: params[k] for k in ("port",) if k in params}, **query}
        else:
            query = {**{k: params[k] for k in ("host", "port") if k in params}, **query}
    elif hosts:
        out.append(",".join(_host_in_uri(h) + (f":{p}" if p else "") for h, p in zip(hosts, ports or [""] * len(hosts))))
    elif ports:
        out.append(f":{params['port']}")
    if params.get("dbname") is not None:
        out.append("/" + quote(params["dbname"], safe=""))
    if query:
        out.append("?" + "&".join(f"{quote(k, safe='')}={enc(k, v)}" for k, v in query.items()))
    return "".join(out)
