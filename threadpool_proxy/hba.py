"""Host-based authentication: pg_hba.conf lines (``auth_hba_file``) choosing each client's method.

PgBouncer's subset of PostgreSQL's format, read the same way:

    TYPE       DATABASE     USER        ADDRESS                 METHOD          OPTIONS
    local      all          all                                 peer            map=local
    host       appdb,other  @admins     10.0.0.0/8              scram-sha-256
    hostssl    all          all         ::1/128                 cert
    hostnossl  all          all         192.168.0.1 255.255.255.255  md5

* types: ``local`` (the unix socket), ``host`` (TCP, with or without TLS),
  ``hostssl`` (TCP with TLS), ``hostnossl`` (TCP without);
* databases: names, ``all``, ``sameuser``, ``replication``, ``@file``;
  users: names, ``all``, ``@file``; comma-separated lists; a name in double
  quotes is a name even when it spells a keyword;
* addresses: ``all``, an IPv4 or IPv6 address with a /prefix, or an address
  and a netmask in two fields;
* methods: trust, reject, md5, scram-sha-256, password, peer (local only),
  cert (hostssl only); ``map=`` names a map of ``auth_ident_file`` for peer and cert.

The first line whose type, database, user and address fit decides; none
fitting refuses the client with PostgreSQL's own 28000 message.  Anything
else (samehost, host names, +group, regular expressions, ldap...) stops
loading with the file and line: a line the proxy would read differently
from PostgreSQL must never let a client in.

No sockets here: ``HbaRules.match`` takes what the login knows about the
connection; login.py asks and acts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from typing import Iterable

from .config import ConfigError

CONNECTION_TYPES = ("local", "host", "hostssl", "hostnossl")
METHODS = ("trust", "reject", "md5", "scram-sha-256", "password", "peer", "cert")
#: Methods of PostgreSQL's that the proxy does not have: a line naming one stops loading.
_UNSUPPORTED_METHODS = ("ident", "gss", "sspi", "ldap", "radius", "pam", "bsd", "krb5", "crypt")


@dataclasses.dataclass(frozen=True)
class Token:
    """One word of a line: its text and whether it was quoted (a quoted keyword is a plain name)."""

    text: str
    quoted: bool = False

    def keyword(self, *words: str) -> bool:
        return not self.quoted and self.text in words


@dataclasses.dataclass(frozen=True)
class HbaRule:
    """One line of the file."""

    line: int
    type: str
    databases: tuple          # of Token
    users: tuple              # of Token
    network: object           # an ipaddress network, "all", or None (local)
    method: str
    map: str | None = None

    def fits(self, local: bool, tls: bool, address, database: str, user: str, replication: bool) -> bool:
        if self.type == "local" and not local:
            return False
        if self.type != "local" and local:
            return False
        if (self.type == "hostssl" and not tls) or (self.type == "hostnossl" and tls):
            return False
        if not local and self.network != "all" and (address is None or address.version != self.network.version
                                                    or address not in self.network):
            return False
        return _database_fits(self.databases, database, user, replication) and _user_fits(self.users, user)


def _database_fits(tokens, database: str, user: str, replication: bool) -> bool:
    for token in tokens:
        if replication:
            if token.keyword("replication"):
                return True
            continue                       # as PostgreSQL: only "replication" matches those
        if token.keyword("all") or (token.keyword("sameuser") and database == user):
            return True
        if not token.keyword("replication", "sameuser") and token.text == database:
            return True
    return False


def _user_fits(tokens, user: str) -> bool:
    return any(token.keyword("all") or token.text == user for token in tokens)


@dataclasses.dataclass(frozen=True)
class IdentMap:
    """``auth_ident_file``: (map name, system user) -> the database users it may log in as."""

    entries: frozenset = frozenset()     # (map, system user, database user or "all")

    def allows(self, name: str, system_user: str, database_user: str) -> bool:
        return ((name, system_user, database_user) in self.entries
                or (name, system_user, "all") in self.entries)


class HbaRules:
    """The lines of one auth_hba_file, first match wins.  For callers: ``match``, ``refusal``."""

    def __init__(self, rules: Iterable[HbaRule], path: str, ident: IdentMap | None = None) -> None:
        self.rules = tuple(rules)
        self.path = path
        self.ident = ident or IdentMap()

    def match(self, local: bool, tls: bool, address: str | None, database: str, user: str,
              replication: bool = False) -> HbaRule | None:
        """The first line fitting the connection, or None.

        ``local``: came over the unix socket; ``tls``: the client talks TLS;
        ``address``: the client's IP address (TCP).
        """
        ip = None
        if not local and address is not None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                ip = None
            mapped = getattr(ip, "ipv4_mapped", None)
            ip = mapped or ip        # an IPv4 client of a dual-stack socket: matched as IPv4
        for rule in self.rules:
            if rule.fits(local, tls, ip, database, user, replication):
                return rule
        return None


def refusal(local: bool, tls: bool, address: str | None, database: str, user: str, rejected: bool,
            replication: bool = False) -> str:
    """PostgreSQL's words for a client no line lets in (or a ``reject`` line turns away)."""
    host = "[local]" if local else str(address)
    encryption = "SSL encryption" if tls else "no encryption"
    if replication:
        what = f'replication connection from host "{host}", user "{user}", {encryption}'
        return (f"pg_hba.conf rejects {what}" if rejected else f"no pg_hba.conf entry for {what}")
    what = f'host "{host}", user "{user}", database "{database}", {encryption}'
    return (f"pg_hba.conf rejects connection for {what}" if rejected
            else f"no pg_hba.conf entry for {what}")


# -- reading -------------------------------------------------------------------------

def _tokenize(text: str, where: str) -> list[list[Token]]:
    """The fields of a line: each a list of comma-separated Tokens (``a,"b c",d``); # starts a comment."""
    fields: list[list[Token]] = []
    current: list[Token] = []
    word: list[str] = []
    quoted = in_quotes = False
    pending = False                # a comma ended the last token: the field goes on

    def end_token():
        nonlocal word, quoted
        current.append(Token("".join(word), quoted))
        word, quoted = [], False

    i = 0
    while i < len(text):
        ch = text[i]
        if in_quotes:
            if ch == '"':
                in_quotes = False
            else:
                word.append(ch)
        elif ch == '"':
            in_quotes = quoted = True
        elif ch == "#":
            break
        elif ch == ",":
            end_token()
            pending = True
        elif ch.isspace():
            if word or quoted:
                end_token()
                pending = False
            if current and not pending:
                fields.append(current)
                current = []
        else:
            word.append(ch)
            pending = False
        i += 1
    if in_quotes:
        raise ConfigError(f"{where}: unterminated quoted string")
    if word or quoted:
        end_token()
    if pending and current:
        raise ConfigError(f"{where}: a list ends with a comma")
    if current:
        fields.append(current)
    return fields


def _logical_lines(text: str):
    """(first line number, text) of each line, a backslash at the end joining the next one."""
    pending, start = "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if line.rstrip().endswith("\\") and "#" not in line:
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def _read_text(path: str, where: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: {path} is not valid UTF-8") from None


def _expand(tokens: list[Token], base: str, where: str, depth: int = 0) -> tuple:
    """Replace each ``@file`` by the names in that file (relative to the HBA file)."""
    out: list[Token] = []
    for token in tokens:
        if token.quoted or not token.text.startswith("@"):
            out.append(token)
            continue
        if depth > 10:
            raise ConfigError(f"{where}: @file nested too deep")
        name = token.text[1:]
        if not name:
            raise ConfigError(f"{where}: @ without a file name")
        path = name if os.path.isabs(name) else os.path.join(base, name)
        names: list[Token] = []
        for number, line in _logical_lines(_read_text(path, where)):
            for field in _tokenize(line, f"{path} line {number} (from {where})"):
                names += field
        out += _expand(names, os.path.dirname(path), where, depth + 1)
    return tuple(out)


def _single(field: list[Token], what: str, where: str) -> str:
    if len(field) != 1:
        raise ConfigError(f"{where}: {what} cannot be a list")
    return field[0].text


def _network(fields: list[list[Token]], where: str):
    """The ADDRESS field (and a NETMASK field after it): a network or "all"; the fields it used."""
    text = _single(fields[0], "the address", where)
    if text in ("samehost", "samenet"):
        raise ConfigError(f"{where}: {text} is not supported (give the addresses)")
    if text == "all":
        return "all", 1
    if "/" in text:
        try:
            return ipaddress.ip_network(text, strict=False), 1
        except ValueError:
            raise ConfigError(f"{where}: invalid address {text!r}") from None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not an IP address or CIDR (host names are not supported)") \
            from None
    if len(fields) < 2:
        raise ConfigError(f"{where}: the address {text} needs a /prefix or a netmask field")
    mask = _single(fields[1], "the netmask", where)
    try:
        network = ipaddress.ip_network(f"{address}/{mask}", strict=False)
    except ValueError:
        raise ConfigError(f"{where}: invalid netmask {mask!r}") from None
    return network, 2


def parse_rules(text: str, path: str) -> list[HbaRule]:
    """Every line of an HBA file; ConfigError naming the file and line for anything not understood."""
    base = os.path.dirname(os.path.abspath(path))
    rules = []
    for number, line in _logical_lines(text):
        where = f"{path} line {number}"
        fields = _tokenize(line, where)
        if not fields:
            continue
        kind = _single(fields[0], "the connection type", where)
        if kind not in CONNECTION_TYPES:
            raise ConfigError(f"{where}: invalid connection type {kind!r} (local, host, hostssl or hostnossl)")
        need = 4 if kind == "local" else 5
        if len(fields) < need:
            raise ConfigError(f"{where}: expected {'TYPE DATABASE USER METHOD' if kind == 'local' else 'TYPE DATABASE USER ADDRESS METHOD'}")
        databases = _expand(fields[1], base, where)
        users = _expand(fields[2], base, where)
        for token in databases:
            if token.keyword("samerole", "samegroup"):
                raise ConfigError(f"{where}: {token.text} is not supported")
        for token in users:
            if not token.quoted and token.text.startswith("+"):
                raise ConfigError(f"{where}: group membership ({token.text}) is not supported: list the users")
            if not token.quoted and token.text.startswith("/"):
                raise ConfigError(f"{where}: regular expressions ({token.text}) are not supported")
        rest = fields[3:]
        network = None
        if kind != "local":
            network, used = _network(rest, where)
            rest = rest[used:]
        if not rest:
            raise ConfigError(f"{where}: no authentication method")
        method = _single(rest[0], "the method", where)
        if method in _UNSUPPORTED_METHODS:
            raise ConfigError(f"{where}: method {method} is not supported (trust, reject, md5, scram-sha-256, "
                              f"password, peer, cert)")
        if method not in METHODS:
            raise ConfigError(f"{where}: invalid authentication method {method!r}")
        if method == "peer" and kind != "local":
            raise ConfigError(f"{where}: peer authentication is only supported on local sockets")
        if method == "cert" and kind != "hostssl":
            raise ConfigError(f"{where}: cert authentication is only supported on hostssl connections")
        ident_map = None
        for field in rest[1:]:
            option = _single(field, "an option", where)
            name, sep, value = option.partition("=")
            if name == "map" and sep and value and method in ("peer", "cert"):
                ident_map = value
            else:
                raise ConfigError(f"{where}: unsupported option {option!r} (only map= of peer and cert lines)")
        rules.append(HbaRule(number, kind, databases, users, network, method, ident_map))
    return rules


def parse_ident(text: str, path: str) -> IdentMap:
    """pg_ident.conf lines ``MAPNAME SYSTEM-USERNAME DATABASE-USERNAME`` (no regular expressions, no +group)."""
    entries = set()
    for number, line in _logical_lines(text):
        where = f"{path} line {number}"
        fields = _tokenize(line, where)
        if not fields:
            continue
        if len(fields) != 3 or any(len(f) != 1 for f in fields):
            raise ConfigError(f"{where}: expected MAPNAME SYSTEM-USERNAME DATABASE-USERNAME")
        name, system, database = (f[0] for f in fields)
        if not system.quoted and system.text.startswith("/"):
            raise ConfigError(f"{where}: regular expressions ({system.text}) are not supported")
        if not database.quoted and database.text.startswith(("+", "/")):
            raise ConfigError(f"{where}: {database.text}: only a user name or all")
        entries.add((name.text, system.text, "all" if database.keyword("all") else database.text))
    return IdentMap(frozenset(entries))


def load(path: str, ident_path: str | None = None) -> HbaRules:
    """Read ``auth_hba_file`` (and ``auth_ident_file``); ConfigError naming the file and line."""
    rules = parse_rules(_read_text(path, "auth_hba_file"), path)
    ident = parse_ident(_read_text(ident_path, "auth_ident_file"), ident_path) if ident_path else IdentMap()
    for rule in rules:
        if rule.map is not None and not any(entry[0] == rule.map for entry in ident.entries):
            raise ConfigError(f"{path} line {rule.line}: map={rule.map}: no such map in "
                              f"{ident_path or 'auth_ident_file (not set)'}")
    return HbaRules(rules, path, ident)
