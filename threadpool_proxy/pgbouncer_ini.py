"""PgBouncer's pgbouncer.ini -> the native configuration mapping that config.from_dict validates.

A PgBouncer user switches with one command (``-c /etc/pgbouncer/pgbouncer.ini``):
the file is read with PgBouncer's syntax and names and translated into what a
YAML file would say.  Three kinds of settings:

* mapped: the proxy has the setting (often under the same name); the value is
  checked here, so a bad one stops start-up naming the file, line and key;
* accepted, no effect: PgBouncer has it, the proxy does not do it; every such
  setting given (with a value the proxy does not already behave like) is
  named in one note, ``"<file>: accepted, no effect: a, b, c"``, which the
  caller logs as one warning line;
* refused: honouring it is impossible and ignoring it would be unsafe
  (``auth_type = any``, ``disable_pqexec = 1``, ``user =`` another OS user, a
  TLS protocol floor above the proxy's...): start-up stops naming file, line, key.

A name PgBouncer itself does not know is an error, as in PgBouncer.  Where a
setting is absent, PgBouncer's default applies (``PGBOUNCER_DEFAULTS``), not
the native one: the file means what it meant to PgBouncer.

The syntax, as PgBouncer reads it: ``[section]`` lines, ``key = value``
lines (the value runs to the end of the line), comment lines starting with
``;`` or ``#`` (not later in a line), ``%include <file>``.  [databases]
values are connection strings of ``key=value`` words, a value in single
quotes when it holds spaces (``''`` for a quote); database names with other
characters than letters, digits and ``_.-*`` are quoted with double quotes
(``""`` for a quote) or single quotes.  Unlike PgBouncer, a relative path
(an %include, auth_file, ...) is taken relative to the file that names it,
not the working directory, as the YAML configuration does.

Parsing does no socket I/O; it reads the files it is given and their includes.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import stat
from typing import Callable

from .errors import ConfigError
from .protocol import CONSOLE_DATABASES

#: %include nesting PgBouncer allows.
MAX_INCLUDE_DEPTH = 10

#: Seconds standing in for PgBouncer's "0: off" where the proxy needs a number (ten years).
FOREVER = 315360000.0

#: PgBouncer's defaults where they differ from the native ones (what an absent setting means).
PGBOUNCER_DEFAULTS = {
    "listen_addr": "",                 # no TCP: the unix socket only
    "listen_port": "6432",
    "unix_socket_dir": "/tmp",
    "auth_type": "md5",
    "max_client_conn": "100",
    "server_login_retry": "15",
    "server_tls_sslmode": "prefer",
    "auth_query": ("SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
                   "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"),
}

_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-*")


@dataclasses.dataclass(frozen=True)
class Line:
    """One ``key = value`` line of a section, and where it was written."""

    section: str
    key: str
    value: str
    file: str
    number: int
    via: str = ""          # "<file> line <n>" of the %include that brought the line in

    @property
    def where(self) -> str:
        return f"{self.file} line {self.number}" + (f" (included from {self.via})" if self.via else "")

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.key}: {message}")


@dataclasses.dataclass
class Translation:
    """What ``translate`` made of a file: the native mapping, the one note, each file read and its mode."""

    native: dict
    notes: list
    modes: dict


def is_ini(path: str, text: str) -> bool:
    """PgBouncer's format: a ``.ini`` name, or a first line that opens a section or includes a file."""
    if path.endswith(".ini"):
        return True
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";")):
            return line.startswith("[") or line.startswith("%include")
    return False


# -- reading the file ----------------------------------------------------------------

def read_lines(path: str, text: str | None = None, depth: int = 0, modes: dict | None = None,
               section: str | None = None, via: str = "") -> tuple[list[Line], str | None]:
    """Every ``key = value`` line of ``path`` and its includes, in order; the section in force at the end.

    ``modes`` collects each file read and its permission bits.  An include
    continues the section of the line before it, as in PgBouncer.
    """
    if modes is None:
        modes = {}
    if text is None:
        try:
            with open(path, encoding="utf-8") as f:
                modes[path] = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}" + (f" (included from {via})" if via else "")) \
                from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid UTF-8" + (f" (included from {via})" if via else "")) from None
    elif path not in modes:
        try:
            modes[path] = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            pass
    lines: list[Line] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        here = f"{path} line {number}"
        where = here + (f" (included from {via})" if via else "")
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("%include") and line[8:9] in (" ", "\t"):
            if depth >= MAX_INCLUDE_DEPTH:
                raise ConfigError(f"{where}: %include nested deeper than {MAX_INCLUDE_DEPTH} files")
            target = line[8:].strip()
            if not os.path.isabs(target):
                target = os.path.join(os.path.dirname(os.path.abspath(path)), target)
            included, section = read_lines(target, None, depth + 1, modes, section, here)
            lines += included
            continue
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise ConfigError(f"{where}: syntax error: a section line is [name]")
            section = line[1:-1].strip()
            if section not in ("pgbouncer", "databases", "users", "peers"):
                raise ConfigError(f"{where}: unknown section [{section}] (PgBouncer has [pgbouncer], [databases], "
                                  f"[users] and [peers])")
            continue
        key, rest = _split_key(line, where)
        if section is None:
            raise ConfigError(f"{where}: {key}: a setting before any [section]")
        lines.append(Line(section, key, rest, path, number, via))
    return lines, section


def _split_key(line: str, where: str) -> tuple[str, str]:
    """``key = value`` -> (key, value); the key bare, in single quotes, or in SQL double quotes."""
    if line[0] in "'\"":
        quote = line[0]
        out, i = [], 1
        while True:
            end = line.find(quote, i)
            if end < 0:
                raise ConfigError(f"{where}: syntax error: the name's closing {quote} is missing")
            out.append(line[i:end])
            if quote == '"' and line.startswith('""', end):
                out.append('"')
                i = end + 2
                continue
            break
        key, rest = "".join(out), line[end + 1:]
        if not key:
            raise ConfigError(f"{where}: syntax error: an empty name")
    else:
        i = 0
        while i < len(line) and line[i] in _KEY_CHARS:
            i += 1
        key, rest = line[:i], line[i:]
        if not key:
            raise ConfigError(f"{where}: syntax error: expected name = value")
    rest = rest.lstrip(" \t")
    if not rest.startswith("="):
        raise ConfigError(f"{where}: syntax error: expected = after {key!r}")
    return key, rest[1:].strip()


def parse_connstr(text: str, line: Line) -> list[tuple[str, str]]:
    """A [databases]/[users]/[peers] value: ``key=value`` words, values in single quotes when they hold spaces."""
    pairs = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return pairs
        start = i
        while i < n and text[i] not in "= \t":
            i += 1
        key = text[start:i]
        while i < n and text[i] in " \t":
            i += 1
        if not key or i >= n or text[i] != "=":
            raise ConfigError(f"{line.where}: {line.key}: syntax error in connection string near {text[start:]!r}")
        i += 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == "'":
            out = []
            i += 1
            while True:
                end = text.find("'", i)
                if end < 0:
                    raise ConfigError(f"{line.where}: {line.key}: {key}: the closing ' is missing")
                out.append(text[i:end])
                if text.startswith("''", end):
                    out.append("'")
                    i = end + 2
                    continue
                i = end + 1
                break
            value = "".join(out)
        else:
            start = i
            while i < n and not text[i].isspace():
                i += 1
            value = text[start:i]
        if not value:
            raise ConfigError(f"{line.where}: {line.key}: {key}: empty value")
        pairs.append((key, value))


# -- values --------------------------------------------------------------------------

def _int(line: Line, value: str | None = None, low: int = 0, what: str = "an integer") -> int:
    text = line.value if value is None else value
    try:
        number = int(text, 10)
    except ValueError:
        try:
            number = int(text, 0)
        except ValueError:
            raise line.error(f"expected {what}, got {text!r}") from None
    if number < low:
        raise line.error(f"expected {what} >= {low}, got {text!r}")
    return number


def _seconds(line: Line, value: str | None = None) -> float:
    text = line.value if value is None else value
    try:
        number = float(text)
    except ValueError:
        raise line.error(f"expected a number of seconds, got {text!r}") from None
    if number < 0 or number != number:
        raise line.error(f"expected a number of seconds >= 0, got {text!r}")
    return number


def _bool(line: Line) -> bool:
    return _int(line, what="0 or 1") != 0


def _choice(line: Line, choices, value: str | None = None) -> str:
    text = line.value if value is None else value
    if text not in choices:
        raise line.error(f"expected one of {', '.join(choices)}, got {text!r}")
    return text


def _path(line: Line) -> str:
    """A file or directory named on ``line``: relative to the file that holds the line."""
    if os.path.isabs(line.value):
        return line.value
    return os.path.join(os.path.dirname(os.path.abspath(line.file)), line.value)


def _users_list(line: Line) -> str:
    return ",".join(u.strip() for u in line.value.split(",") if u.strip())


POOL_MODES = ("session", "transaction", "statement")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
AUTH_TYPES = {"md5": "md5", "scram-sha-256": "scram-sha-256", "plain": "password", "trust": "trust",
              "hba": "hba", "cert": "cert"}
#: auth_type values PgBouncer has and the proxy cannot honour: ignoring them would change who gets in.
REFUSED_AUTH_TYPES = {"any": "logs in everyone as the entries' forced users, ignoring the name given",
                      "ldap": "LDAP is not implemented", "pam": "PAM is not implemented"}
_TLS_PROTOCOLS = {"tlsv1.0", "tlsv1.1", "tlsv1.2", "tlsv1.3"}
_DEFAULT_CIPHERS = ("default", "secure", "fast", "normal", "all")


def _tls_protocols_honoured(value: str) -> bool | None:
    """True: the proxy's floor (TLS 1.2, Python's default) is what the value asks or stricter (no effect
    needed); None: looser than the proxy (it stays stricter: accepted, no effect); False: the value asks
    for a floor above TLS 1.2 or an unknown name, which the proxy cannot honour."""
    words = {w.strip().lower() for w in value.split(",") if w.strip()}
    if words == {"secure"} or words == {"tlsv1.2", "tlsv1.3"}:
        return True
    if words <= {"all", "legacy"} or (words <= _TLS_PROTOCOLS and "tlsv1.2" in words and "tlsv1.3" in words):
        return None
    return False


# -- the [pgbouncer] section ----------------------------------------------------------

#: Settings PgBouncer has and the proxy does not implement, each with the values that already
#: match what the proxy does (no note for those).
NO_EFFECT: dict[str, Callable[[str], bool]] = {
    "application_name_add_host": lambda v: v.strip() == "0",
    "auth_ldap_options": lambda v: v == "",
    "autodb_idle_timeout": lambda v: False,
    "cancel_wait_timeout": lambda v: False,
    "client_tls13_ciphers": lambda v: v == "",
    "client_tls_dheparams": lambda v: v == "auto",
    "client_tls_ecdhcurve": lambda v: v == "auto",
    "conffile": lambda v: False,
    "dns_max_ttl": lambda v: False,
    "dns_nxdomain_ttl": lambda v: False,
    "dns_zone_check_period": lambda v: v.strip() in ("0", "0.0"),
    "job_name": lambda v: False,
    "listen_backlog": lambda v: False,
    "log_connections": lambda v: False,
    "log_disconnections": lambda v: False,
    "log_pooler_errors": lambda v: v.strip() == "1",     # errors sent to clients are logged
    "log_stats": lambda v: v.strip() == "0",
    "login_notify_message": lambda v: v == "",
    "max_packet_size": lambda v: False,
    "peer_id": lambda v: v.strip() == "0",
    "pkt_buf": lambda v: False,
    "pool_idle_timeout": lambda v: v.strip() in ("0", "0.0"),
    "query_wait_notify": lambda v: False,
    "resolv_conf": lambda v: v == "",
    "sbuf_loopcnt": lambda v: False,
    "scram_iterations": lambda v: v.strip() == "4096",
    "server_check_delay": lambda v: False,
    "server_check_query": lambda v: False,
    "server_fast_close": lambda v: v.strip() == "0",
    "server_reset_query_always": lambda v: v.strip() == "1",   # the proxy resets in every pool mode
    "server_round_robin": lambda v: v.strip() == "0",
    "server_tls13_ciphers": lambda v: v == "",
    "service_name": lambda v: False,
    "so_reuseport": lambda v: v.strip() == "0",
    "suspend_timeout": lambda v: False,
    "syslog": lambda v: v.strip() == "0",
    "syslog_facility": lambda v: False,
    "syslog_ident": lambda v: False,
    "tcp_defer_accept": lambda v: False,
    "tcp_socket_buffer": lambda v: v.strip() == "0",
    "tcp_user_timeout": lambda v: v.strip() == "0",
    "transaction_timeout": lambda v: v.strip() in ("0", "0.0"),
    # The proxy does these anyway: it passes any startup parameter on, and follows every
    # parameter the server reports.
    "ignore_startup_parameters": lambda v: True,
    "track_extra_parameters": lambda v: True,
}


class _Translator:
    """Builds the native mapping from the lines of one file (and its includes)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.native: dict = {"listen": {}}
        self.no_effect: list[str] = []
        self.settings: dict[str, Line] = {}      # [pgbouncer] key -> its last line
        self.auth_dbname: Line | None = None     # [pgbouncer] auth_dbname: every entry's default
        self.reserve_off = False                 # reserve_pool_timeout = 0: no reserve pool

    def note(self, name: str) -> None:
        if name not in self.no_effect:
            self.no_effect.append(name)

    # -- [pgbouncer] --

    def pgbouncer(self, lines: list[Line]) -> None:
        for line in lines:
            self.settings[line.key] = line      # the last line of a key wins, as in PgBouncer
        given = dict(self.settings)
        for key, default in PGBOUNCER_DEFAULTS.items():
            if key not in given:
                given[key] = Line("pgbouncer", key, default, self.path, 0)
        for key, line in given.items():
            handler = getattr(self, "_set_" + key, None)
            if handler is not None:
                handler(line)
            elif key in _SAME_NAME:
                self._same(line)
            elif key in NO_EFFECT:
                if not NO_EFFECT[key](line.value):
                    self.note(key)
            else:
                raise ConfigError(f"{line.where}: {key}: unknown setting (not one of PgBouncer's)")

    def _same(self, line: Line) -> None:
        kind = _SAME_NAME[line.key]
        native = self.native
        if kind == "int":
            native[line.key] = _int(line)
        elif kind == "count":
            native[line.key] = _int(line, low=1)
        elif kind == "seconds":
            native[line.key] = _seconds(line)
        elif kind == "seconds-or-forever":
            value = _seconds(line)
            native[line.key] = value if value > 0 else FOREVER
        elif kind == "sslmode":
            native[line.key] = _choice(line, SSLMODES)
        elif kind == "users":
            native[line.key] = _users_list(line)
        elif kind == "path":
            if line.value:
                native[line.key] = _path(line)
        elif kind == "text":
            native[line.key] = line.value
        elif kind == "bool":
            native[line.key] = _bool(line)
        else:       # pragma: no cover - a typo in _SAME_NAME
            raise AssertionError(kind)

    def _set_listen_addr(self, line: Line) -> None:
        self.native["listen"]["host"] = ",".join(a.strip() for a in line.value.split(",") if a.strip())

    def _set_listen_port(self, line: Line) -> None:
        port = _int(line, what="a port")
        if port > 65535:
            raise line.error(f"expected a port from 0 to 65535, got {line.value!r}")
        self.native["listen"]["port"] = port

    def _set_unix_socket_dir(self, line: Line) -> None:
        if line.value.startswith("@"):
            raise line.error("sockets in the abstract namespace (@name) are not supported; give a directory")
        if line.value:
            self.native["listen"]["unix_socket_dir"] = _path(line)

    def _set_unix_socket_mode(self, line: Line) -> None:
        try:
            mode = int(line.value, 8) if not line.value.lower().startswith("0x") else int(line.value, 16)
        except ValueError:
            raise line.error(f"expected a file mode such as 0777, got {line.value!r}") from None
        if not 0 <= mode <= 0o777:
            raise line.error(f"expected a file mode from 0 to 0777, got {line.value!r}")
        self.native["listen"]["unix_socket_mode"] = f"{mode:04o}"

    def _set_unix_socket_group(self, line: Line) -> None:
        if line.value:
            self.native["listen"]["unix_socket_group"] = line.value

    def _set_user(self, line: Line) -> None:
        if line.value and line.value != getpass.getuser():
            raise line.error(f"the proxy does not change its OS user; start it as {line.value!r} "
                             f"(it runs as {getpass.getuser()!r})")

    def _set_default_pool_size(self, line: Line) -> None:
        self.native["pool_size"] = _int(line, low=1)

    def _set_pool_mode(self, line: Line) -> None:
        self.native["pool_mode"] = _choice(line, POOL_MODES)

    def _set_auth_type(self, line: Line) -> None:
        if line.value in REFUSED_AUTH_TYPES:
            raise line.error(f"{line.value} cannot be honoured: {REFUSED_AUTH_TYPES[line.value]}")
        self.native["auth_type"] = AUTH_TYPES[_choice(line, tuple(AUTH_TYPES) + tuple(REFUSED_AUTH_TYPES))]

    def _set_auth_dbname(self, line: Line) -> None:
        if line.value:
            self.auth_dbname = line

    def _set_server_reset_query(self, line: Line) -> None:
        self.native["reset_query"] = line.value

    def _set_disable_pqexec(self, line: Line) -> None:
        if _bool(line):
            raise line.error("1 cannot be honoured: the proxy passes simple-query messages on; "
                             "ignoring it would let them through")

    def _set_verbose(self, line: Line) -> None:
        if _int(line) > 0:
            self.native["log_level"] = "debug"

    def _set_reserve_pool_timeout(self, line: Line) -> None:
        value = _seconds(line)
        if value > 0:
            self.native["reserve_pool_timeout"] = value
        else:
            self.reserve_off = True      # "0 disables": no reserve pool at all

    def _tls_protocols(self, line: Line) -> None:
        honoured = _tls_protocols_honoured(line.value)
        if honoured is False:
            raise line.error(f"{line.value!r} cannot be honoured: the proxy accepts TLS 1.2 and 1.3 "
                             f"(Python's floor); ignoring a stricter list would let older versions in")
        if honoured is None:
            self.note(line.key)

    _set_client_tls_protocols = _set_server_tls_protocols = _tls_protocols

    def _tls_ciphers(self, line: Line) -> None:
        if line.value.strip().lower() not in _DEFAULT_CIPHERS:
            raise line.error(f"{line.value!r} cannot be honoured: the proxy uses OpenSSL's default ciphers; "
                             f"ignoring a narrower list would allow the ciphers it leaves out")
        if line.value.strip().lower() == "all":
            self.note(line.key)

    _set_client_tls_ciphers = _set_server_tls_ciphers = _tls_ciphers

    # -- [databases] --

    def databases(self, lines: list[Line]) -> None:
        unix_dir = self.native["listen"].get("unix_socket_dir")
        entries: dict = {}
        for line in lines:
            if line.key in CONSOLE_DATABASES:
                raise ConfigError(f"{line.where}: {line.key}: the name is reserved for the admin console")
            entries[line.key] = self._database(line, unix_dir)
        auth_dbname = self.auth_dbname
        if auth_dbname is not None:
            if auth_dbname.value not in entries:
                raise auth_dbname.error(f"no entry {auth_dbname.value!r} in [databases]")
            for entry in entries.values():
                entry.setdefault("auth_dbname", auth_dbname.value)
        for line in lines:
            entry = entries[line.key]
            if entry.get("auth_dbname") and entry["auth_dbname"] not in entries:
                raise line.error(f"auth_dbname: no entry {entry['auth_dbname']!r} in [databases]")
        for entry in entries.values():
            # PgBouncer's auth_dbname names an entry; ours is the server-side database that
            # auth_query runs in (on the entry's own server): that entry's dbname.
            target = entry.get("auth_dbname")
            if target:
                entry["auth_dbname"] = entries[target].get("dbname") or target
        self.native["databases"] = entries

    def _database(self, line: Line, unix_dir: str | None) -> dict:
        entry: dict = {}
        settings: dict = {}
        hosts = None
        port = 5432
        balance = None
        for key, value in parse_connstr(line.value, line):
            if key == "host":
                hosts = [h.strip() for h in value.split(",")]
                if not all(hosts):
                    raise line.error(f"host: an empty name in {value!r}")
                for host in hosts:
                    if host.startswith("@"):
                        raise line.error("host: sockets in the abstract namespace (@name) are not supported")
            elif key == "port":
                port = _int(line, value, low=1, what="a port")
                if port > 65535:
                    raise line.error(f"port: expected a port from 1 to 65535, got {value!r}")
            elif key in ("dbname", "user", "password", "auth_user", "auth_dbname", "connect_query", "auth_query"):
                entry[key] = value
            elif key in ("client_encoding", "datestyle", "timezone", "application_name"):
                settings[key] = value
            elif key in ("pool_size",):
                entry[key] = _int(line, value, low=1, what="pool_size: an integer")
            elif key in ("min_pool_size", "reserve_pool_size", "reserve_pool", "max_db_connections",
                         "max_db_client_connections"):
                entry["reserve_pool_size" if key == "reserve_pool" else key] = _int(
                    line, value, what=f"{key}: an integer")
            elif key == "pool_mode":
                entry[key] = _choice(line, POOL_MODES, value)
            elif key == "load_balance_hosts":
                balance = _choice(line, ("round-robin", "disable"), value)
            elif key in ("query_wait_timeout", "server_lifetime"):
                _seconds(line, value)
                self.note(f"{key} (per database)")
            else:
                raise line.error(f"unrecognized connection parameter: {key}")
        if hosts is None:
            if not unix_dir:
                raise line.error("no host=, and unix_socket_dir is empty: nowhere to connect")
            hosts = [unix_dir]
        if len(hosts) == 1:
            entry["host"], entry["port"] = hosts[0], port
        else:
            if len(set(hosts)) != len(hosts):
                raise line.error("host: a host is listed twice")
            entry["nodes"] = [{"host": h, "port": port} for h in hosts]
            entry["load_balance"] = balance or "round-robin"
        if settings:
            entry["settings"] = settings
        if "auth_query" in entry and "auth_user" not in entry:
            self.note("auth_query (per database, without auth_user)")
        return entry

    # -- [users] --

    def users(self, lines: list[Line]) -> None:
        users: dict = {}
        for line in lines:
            fields: dict = {}
            for key, value in parse_connstr(line.value, line):
                if key == "pool_mode":
                    fields[key] = _choice(line, POOL_MODES, value)
                elif key == "pool_size":
                    fields[key] = _int(line, value, low=1, what="pool_size: an integer")
                elif key in ("reserve_pool_size", "max_user_connections", "max_user_client_connections"):
                    fields[key] = _int(line, value, what=f"{key}: an integer")
                elif key in ("query_timeout", "query_wait_timeout", "idle_transaction_timeout",
                             "transaction_timeout", "client_idle_timeout"):
                    _seconds(line, value)
                    self.note(f"{key} (per user)")
                else:
                    raise line.error(f"unrecognized user parameter: {key}")
            users[line.key] = fields
        if users:
            self.native["users"] = users

    # -- after every section --

    def finish(self) -> None:
        native = self.native
        if self.reserve_off:
            native["reserve_pool_size"] = 0
            for entry in native.get("databases", {}).values():
                entry.pop("reserve_pool_size", None)
        # auth_user (top level or an entry's): PgBouncer asks auth_query for users the auth
        # file lacks; the proxy's auth_query type asks for every user of such an entry.
        auth_type = native.get("auth_type")
        if auth_type in ("md5", "scram-sha-256", "password"):
            for entry in native.get("databases", {}).values():
                if entry.get("auth_user") or native.get("auth_user"):
                    entry["auth_type"] = "auth_query"


#: [pgbouncer] settings the proxy has under the same name, and how their values read.
_SAME_NAME = {
    "admin_users": "users", "stats_users": "users",
    "auth_file": "path", "auth_hba_file": "path", "auth_ident_file": "path",
    "auth_user": "text", "auth_query": "text",
    "client_tls_sslmode": "sslmode", "server_tls_sslmode": "sslmode",
    "client_tls_key_file": "path", "client_tls_cert_file": "path", "client_tls_ca_file": "path",
    "server_tls_key_file": "path", "server_tls_cert_file": "path", "server_tls_ca_file": "path",
    "max_client_conn": "count", "min_pool_size": "int", "reserve_pool_size": "int",
    "max_db_connections": "int", "max_user_connections": "int",
    "max_db_client_connections": "int", "max_user_client_connections": "int",
    "max_prepared_statements": "int",
    "server_lifetime": "seconds", "query_timeout": "seconds", "client_idle_timeout": "seconds",
    "idle_transaction_timeout": "seconds",
    "server_idle_timeout": "seconds-or-forever", "query_wait_timeout": "seconds-or-forever",
    "client_login_timeout": "seconds-or-forever", "server_connect_timeout": "seconds-or-forever",
    "server_login_retry": "seconds-or-forever", "stats_period": "seconds-or-forever",
    "tcp_keepalive": "bool", "tcp_keepidle": "int", "tcp_keepintvl": "int", "tcp_keepcnt": "int",
    "logfile": "path", "pidfile": "path",
}


def translate(path: str, text: str | None = None) -> Translation:
    """Read ``path`` (its ``text`` if already read) and its includes into a Translation.

    ConfigError naming the file, line and key for anything PgBouncer would
    refuse, and for what the proxy cannot honour safely.
    """
    modes: dict = {}
    lines, _ = read_lines(path, text, modes=modes)
    translator = _Translator(path)
    sections: dict[str, list[Line]] = {"pgbouncer": [], "databases": [], "users": [], "peers": []}
    for line in lines:
        sections[line.section].append(line)
    translator.pgbouncer(sections["pgbouncer"])
    translator.databases(sections["databases"])
    translator.users(sections["users"])
    for line in sections["peers"]:
        parse_connstr(line.value, line)
        translator.note("[peers]")
    translator.finish()
    notes = [f"{path}: accepted, no effect: {', '.join(translator.no_effect)}"] if translator.no_effect else []
    return Translation(translator.native, notes, modes)
