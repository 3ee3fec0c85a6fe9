"""What a client's startup packet may ask of a server: run-time settings, never an identity.

A StartupMessage carries two kinds of names.  ``user``, ``database``,
``replication``, ``options`` and ``_pq_.*`` are *startup keys*: PostgreSQL's
ProcessStartupPacket reads them itself (whom to log in as, where, as what kind
of backend, which protocol extensions).  Every other name is a *setting*
(a GUC), applied with SetConfigOption once the login is done, exactly as a
``-c name=value`` inside ``options`` is.

The proxy turns a client's ``options`` into settings and sends every setting
as a name of its own in the server's StartupMessage, where a name that is a
startup key would be read as one: ``-c user=postgres`` would become the login's
user.  So the identity of every server login is the proxy's (the authenticated
user, the entry's database; see ``ClientSettings.startup_params``), and a
client's setting named like a startup key, in any spelling (GUC names are
case-insensitive), is refused here, before anything is dialed, with the error
PostgreSQL gives for it in ``options`` (``42704 unrecognized configuration
parameter "user"``).  Also refused: ``session_authorization``, which would make
the pooled connection another user's session for as long as it lives (a
superuser may ``SET SESSION AUTHORIZATION`` after connecting; DISCARD ALL
undoes that), and ``is_superuser`` (PostgreSQL's 55P02: it cannot be set).

``options`` is read as PostgreSQL 15 reads it (pg_split_opts, then
process_postgres_switches): words split at unescaped white space, a backslash
escaping the next character; ``-c name=value``, ``-cname=value`` and
``--name=value`` set a setting (``-`` in the name read as ``_``), with
PostgreSQL's 42601 errors for a missing value or a stray word.  PostgreSQL's
single-letter switches (``-B``, ``-d``, ``-D``, ``-P``...) are not passed on:
they are refused with 0A000, naming the switch.
"""

from __future__ import annotations

from . import protocol as pq
from .backend import valid_guc_name
from .errors import ClientFatal

#: Names PostgreSQL reads from a StartupMessage itself rather than as settings
#: (besides the ``_pq_.`` prefix); compared in lower case.
STARTUP_KEYS = frozenset({"user", "database", "replication", "options"})

#: The prefix of protocol extension names in a StartupMessage.
PROTOCOL_OPTION_PREFIX = "_pq_."

#: Settings that are an identity: never taken from a client's startup packet, and
#: not carried by the proxy from one server connection to the next.
IDENTITY_SETTINGS = frozenset({"session_authorization", "is_superuser"})


def is_startup_key(name: str) -> bool:
    """Whether ``name``, in any case, is one PostgreSQL would read as a startup key."""
    lower = name.lower()
    return lower in STARTUP_KEYS or lower.startswith(PROTOCOL_OPTION_PREFIX)


def may_carry(name: str) -> bool:
    """Whether the proxy may put setting ``name`` into a server's StartupMessage (or carry it over)."""
    return not is_startup_key(name) and name.lower() not in IDENTITY_SETTINGS


def split_options(options: str) -> list[str]:
    """The words of ``options``: split at unescaped white space; a backslash escapes the next character.

    PostgreSQL's pg_split_opts.
    """
    words, word, escaped, in_word = [], [], False, False
    for ch in options:
        if escaped:
            word.append(ch)
            escaped, in_word = False, True
        elif ch == "\\":
            escaped, in_word = True, True
        elif ch.isspace():
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
        else:
            word.append(ch)
            in_word = True
    if in_word:
        words.append("".join(word))
    return words


def parse_options(options: str) -> list[tuple[str, str]]:
    """The (name, value) settings of an ``options`` startup parameter, in order.

    ClientFatal with PostgreSQL's error for what it refuses (42601), or 0A000
    for a switch the proxy does not pass on.  Names are not checked here
    (``check_setting`` does).
    """
    words = split_options(options)
    settings = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":
            # getopt: the end of the switches; PostgreSQL refuses any word after it.
            if i < len(words):
                raise _invalid_argument(words[i])
            break
        if word.startswith("--"):
            pair, flag = word[2:], "--"
        elif word.startswith("-c"):
            if len(word) > 2:
                pair = word[2:]
            elif i < len(words):
                pair = words[i]
                i += 1
            else:
                raise _invalid_argument(word)          # -c with nothing after it
            flag = "-c "
        elif word.startswith("-") and len(word) > 1:
            raise ClientFatal(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                              f"unsupported startup option: {word[:2]!r}",
                              hint="Only -c name=value and --name=value settings are supported in options.")
        else:
            raise _invalid_argument(word)
        name, sep, value = pair.partition("=")
        if not sep:
            raise ClientFatal(pq.SQLSTATE_SYNTAX_ERROR, f"{flag}{pair} requires a value")
        settings.append((name.replace("-", "_"), value))
    return settings


def _invalid_argument(word: str) -> ClientFatal:
    return ClientFatal(pq.SQLSTATE_SYNTAX_ERROR, f"invalid command-line argument for server process: {word}",
                       hint='Try "postgres --help" for more information.')


def check_setting(name: str) -> None:
    """Refuse a setting a client may not ask for at startup (ClientFatal), before any server is dialed."""
    if name.lower().startswith(PROTOCOL_OPTION_PREFIX):
        raise ClientFatal(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                          f'threadpool_proxy does not pass on parameter "{name}": names beginning with '
                          f'"{PROTOCOL_OPTION_PREFIX}" are protocol extensions, not settings')
    if name.lower() in STARTUP_KEYS or not valid_guc_name(name):
        raise ClientFatal(pq.SQLSTATE_UNDEFINED_OBJECT, f'unrecognized configuration parameter "{name}"')
    if name.lower() == "is_superuser":
        raise ClientFatal(pq.SQLSTATE_CANT_CHANGE_RUNTIME_PARAM, f'parameter "{name}" cannot be changed')
    if name.lower() == "session_authorization":
        raise ClientFatal(pq.SQLSTATE_INSUFFICIENT_PRIVILEGE,
                          'permission denied to set parameter "session_authorization"',
                          detail="threadpool_proxy logs in to the server as the authenticated user only.",
                          hint="A superuser may run SET SESSION AUTHORIZATION after connecting.")


def client_settings(params: dict) -> dict[str, str]:
    """The settings a client's startup parameters ask for: name (as spelled) -> value.

    ``options`` first and the other parameters after, so that a parameter of
    its own wins over the same name in ``options``, as in PostgreSQL.  The
    startup keys themselves (``user``, ``database``, ``replication``,
    ``options``, ``_pq_.*`` spelled exactly so) are not settings and are left
    out; any setting the proxy may not send is refused (``check_setting``).
    """
    pairs = parse_options(params["options"]) if params.get("options") else []
    pairs += [(name, value) for name, value in params.items()
              if name not in STARTUP_KEYS and not name.startswith(PROTOCOL_OPTION_PREFIX)]
    settings: dict[str, str] = {}
    for name, value in pairs:
        check_setting(name)
        settings[name] = value
    return settings
