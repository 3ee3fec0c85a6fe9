"""Session state a pooled client's statements create: what follows the client, what pins it (sans I/O).

In transaction and statement mode a client's next transaction may run on
another server connection.  Session state is of two sorts:

* **Settings** (``SET``, ``RESET``, ``set_config(name, value, false)``,
  ``SET TIME ZONE``...) follow the client: the names a statement touches are
  noted here, their values are read back from the server connection before
  it passes to another client (``readback_sql``: the server's word covers
  rollbacks, savepoints, ``SET LOCAL``, ``DEFAULT`` and every syntax), and checkout.py
  sets them on the client's next server connection, quoted as literals
  (``backend.set_statements``), never as the client's own text.
* **State that cannot be carried** (temporary tables, session advisory locks,
  cursors ``WITH HOLD``, ``SET ROLE``/``SET SESSION AUTHORIZATION``, SQL-level
  ``PREPARE``, ``LOAD``, a ``LISTEN`` the proxy could not take over) pins the
  client to its server connection.  A statement that may create or undo such
  state makes its kind *suspect*; at the next release point the relay asks the
  server which state exists (``verify_sql``), so a ``CREATE TEMP TABLE ... ON
  COMMIT DROP``, a rolled back ``pg_try_advisory_lock`` or a ``DROP TABLE`` of
  the last temporary table decide nothing by themselves.  ``LOAD`` cannot be
  undone or asked about: it pins until the client leaves.

Statements are read from the client's Query and Parse messages only:
``looks_interesting`` is the cheap test every such message passes (its first
word, and a search for a few function names), and only the texts it lets
through are lexed (``statements``: comments, quoted identifiers, string
constants with their escapes, dollar quotes, several statements in one Query)
and classified (``look``).  What a function, a ``DO`` block or a trigger does
inside the server is not seen: a ``set_config`` in a function body is not
followed, an advisory lock taken by a function does not pin.
"""

from __future__ import annotations

import re

from .backend import quote_literal, valid_guc_name
from .config import PIN_KINDS
from .logs import printable
from .startup import may_carry

# -- the kinds of state that pin (``pin_on``; named in config.py, which validates the list) ----

TEMP_TABLE, ADVISORY_LOCK, CURSOR_WITH_HOLD, ROLE, PREPARE, LOAD, LISTEN = PIN_KINDS

#: Kinds whose existence the server can be asked about (LOAD is not: it pins for good).
VERIFIABLE = (TEMP_TABLE, ADVISORY_LOCK, CURSOR_WITH_HOLD, ROLE, PREPARE, LISTEN)

#: Settings that never follow a client: an identity (pinned instead: ``ROLE``), or
#: scoped to one transaction.  (Startup keys are left out by startup.may_carry.)
NOT_FOLLOWED = frozenset({"role", "session_authorization", "is_superuser", "transaction_isolation",
                          "transaction_read_only", "transaction_deferrable"})

#: The longest statement text a log line quotes (escaped).
LOGGED_TEXT = 200

# -- the cheap test every Query and Parse passes -------------------------------------
#
# Regular expressions on the message buffer itself (no copy), each starting with a
# literal or a short alternation so that a miss costs one pass at C speed.

#: The plainest statements, which cannot touch session state, in one match (most
#: traffic): a common first word, then no parenthesis (so no function call), no
#: semicolon but a last one and, after SELECT or WITH, no INTO.  Whether the match
#: reaches the end of the text is the test (``plain_match``, which the scanner runs
#: itself, before calling ``looks_interesting``); it never backtracks.
_PLAIN = re.compile(rb"[ \t\r\n]*(?:(?i:insert|update|delete|begin|commit|values|end|rollback|abort|start|show|fetch)"
                    rb"\b[^;(]*|(?i:select|with)\b(?:[^;(iI]+|[iI](?![nN][tT][oO]\b))*)(?:;[ \t\r\n;]*)?")
plain_match = _PLAIN.match
_FIRST_WORD = re.compile(rb"[ \t\r\n\f]*([A-Za-z]+)")
#: First words of statements that may touch a setting or pinning state.
_FIRST_WORDS = frozenset(w.encode() for w in (
    "set", "reset", "discard", "create", "declare", "close", "prepare", "deallocate", "load", "listen",
    "unlisten", "notify", "drop"))
#: set_config, pg_[try_]advisory_[un]lock[_shared|_all], pg_notify (and a few other names).
_CALLS = re.compile(rb"(?i)_(?:config|lock|unlock|notify)")
_SECOND_STATEMENT = re.compile(rb";[ \t\r\n;]*[^ \t\r\n;]")
_SELECT_INTO = re.compile(rb"(?i)\binto\s+(?:temp|temporary|local|global|unlogged)\b")


def looks_interesting(buf, start: int, end: int) -> bool:
    """Whether the SQL text ``buf[start:end]`` may touch session state (False: surely not).

    The hot path, run on every Query and Parse of a pooled client: one match
    for the plainest statements; else the first word and three searches
    (calls of functions that change session state, a second statement after
    a semicolon, SELECT INTO TEMP).  A text that does not start with a word
    (a comment, a parenthesis) is looked at closely.
    """
    m = _PLAIN.match(buf, start, end)
    if m is not None and m.end() == end:
        return False
    m = _FIRST_WORD.match(buf, start, end)
    if m is None:
        return bool(bytes(buf[start:end]).strip())
    word = m.group(1).lower()
    if word in _FIRST_WORDS:
        return True
    if _CALLS.search(buf, m.end(), end) is not None or _SECOND_STATEMENT.search(buf, m.end(), end) is not None:
        return True
    return word in (b"select", b"with") and _SELECT_INTO.search(buf, m.end(), end) is not None


# -- the lexer ------------------------------------------------------------------------
#
# Tokens are (kind, value): WORD (an unquoted identifier or keyword, folded to lower
# case as PostgreSQL folds it), QUOTED (a quoted identifier, as written between the
# quotes), STRING (a string constant's value), NUMBER, PARAM ($1), OP (one character
# of anything else), SEMI (a statement separator).

WORD, QUOTED, STRING, NUMBER, PARAM, OP, SEMI = "w", "q", "s", "n", "p", "o", ";"

_SPACE = re.compile(r"[ \t\n\r\f\v]+")
_IDENT = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z_0-9$\x80-\U0010ffff]*")
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PARAM = re.compile(r"\$[0-9]+")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z_0-9\x80-\U0010ffff]*)?\$")
_E_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{1,2}|[0-7]{1,3}|u[0-9A-Fa-f]{4}|U[0-9A-Fa-f]{8}|.)", re.S)
_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _e_unescape(body: str) -> str:
    def one(m):
        esc = m.group(1)
        c = esc[0]
        try:
            if c == "x":
                return chr(int(esc[1:], 16))
            if c in "01234567":
                return chr(int(esc, 8) & 0xFF)
            if c in "uU":
                return chr(int(esc[1:], 16))
        except (ValueError, OverflowError):
            return esc
        return _SIMPLE_ESCAPES.get(c, c)
    return _E_ESCAPE.sub(one, body)


def _quoted(text: str, pos: int, quote: str, backslashes: bool) -> tuple[str, int]:
    """The body of a quoted token starting after its opening ``quote`` at ``pos``; a doubled
    quote is one, and with ``backslashes`` a backslash escapes the next character.  Returns
    (body as written, position after the closing quote); unterminated: to the end."""
    out = []
    n = len(text)
    i = pos
    while i < n:
        c = text[i]
        if backslashes and c == "\\" and i + 1 < n:
            out.append(text[i:i + 2])
            i += 2
            continue
        if c == quote:
            if i + 1 < n and text[i + 1] == quote:
                out.append(quote)
                i += 2
                continue
            return "".join(out), i + 1
        out.append(c)
        i += 1
    return "".join(out), n


def tokens(text: str) -> list[tuple[str, str]]:
    """The tokens of ``text`` (comments and white space dropped), as PostgreSQL's lexer cuts them.

    Assumes standard_conforming_strings (PostgreSQL's default): backslashes
    escape only in E'' constants.  An unterminated quote or comment runs to
    the end of the text (the server refuses such a text anyway).
    """
    out = []
    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        m = _SPACE.match(text, i)
        if m:
            i = m.end()
            continue
        if c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
            continue
        if c == "/" and text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            continue
        if c == "'":
            body, i = _quoted(text, i + 1, "'", False)
            out.append((STRING, body))
            continue
        if c in "eE" and text.startswith("'", i + 1):
            body, i = _quoted(text, i + 2, "'", True)
            out.append((STRING, _e_unescape(body)))
            continue
        if c in "bBxXnN" and text.startswith("'", i + 1):
            body, i = _quoted(text, i + 2, "'", False)
            out.append((STRING, body))
            continue
        if c in "uU" and text.startswith("&'", i + 1):
            body, i = _quoted(text, i + 3, "'", False)
            out.append((STRING, body))           # (its \XXXX escapes are not decoded: names do not use them)
            continue
        if c in "uU" and text.startswith('&"', i + 1):
            body, i = _quoted(text, i + 3, '"', False)
            out.append((QUOTED, body))
            continue
        if c == '"':
            body, i = _quoted(text, i + 1, '"', False)
            out.append((QUOTED, body))
            continue
        if c == "$":
            m = _PARAM.match(text, i)
            if m:
                out.append((PARAM, m.group()))
                i = m.end()
                continue
            m = _DOLLAR_TAG.match(text, i)
            if m:
                tag = m.group()
                j = text.find(tag, m.end())
                out.append((STRING, text[m.end():n if j < 0 else j]))
                i = n if j < 0 else j + len(tag)
                continue
        m = _IDENT.match(text, i)
        if m:
            out.append((WORD, _fold(m.group())))
            i = m.end()
            continue
        m = _NUMBER.match(text, i)
        if m:
            out.append((NUMBER, m.group()))
            i = m.end()
            continue
        out.append((SEMI if c == ";" else OP, c))
        i += 1
    return out


def _fold(word: str) -> str:
    """PostgreSQL's case folding of an unquoted identifier: ASCII letters only."""
    return word.lower() if word.isascii() else "".join(ch.lower() if ch.isascii() else ch for ch in word)


def statements(text: str) -> list[list[tuple[str, str]]]:
    """The non-empty statements of ``text``, each a list of tokens."""
    out, current = [], []
    for token in tokens(text):
        if token[0] == SEMI:
            if current:
                out.append(current)
            current = []
        else:
            current.append(token)
    if current:
        out.append(current)
    return out


# -- what one text does ---------------------------------------------------------------------

class Effects:
    """What the statements of one Query or Parse text may do to the session.

    ``touched``: setting names (lower case) whose value may have changed;
    ``touched_all``: RESET ALL or DISCARD ALL (every setting); ``unknown``: a
    ``set_config`` whose name is not a constant.  ``pins``: kind -> what
    creates it (for messages), for state that will pin the client if the
    statement succeeds; ``suspects``: kinds whose existence must be asked
    about at the next release point (creating or undoing).  ``notifies``: a
    NOTIFY or pg_notify.  ``unlisten``: the channels an UNLISTEN names (None
    for ``UNLISTEN *`` and DISCARD ALL).  ``listen``: for a text that is exactly one
    ``LISTEN name``, ``UNLISTEN name`` or ``UNLISTEN *``, ("listen" or
    "unlisten", the channel, or None for ``*``).  ``text``: the text, for the log.
    """

    __slots__ = ("touched", "touched_all", "unknown", "pins", "suspects", "notifies", "listen", "unlisten", "text")

    def __init__(self, text: str = "") -> None:
        self.touched: set[str] = set()
        self.touched_all = False
        self.unknown = False
        self.pins: dict[str, str] = {}
        self.suspects: set[str] = set()
        self.notifies = False
        self.listen: tuple | None = None
        self.unlisten: set = set()         # channels UNLISTENed; None in it: every one (UNLISTEN *, DISCARD ALL)
        self.text = text

    def __bool__(self) -> bool:
        return bool(self.touched or self.touched_all or self.unknown or self.suspects or self.pins
                    or self.notifies or self.listen or self.unlisten)

    def logged_text(self) -> str:
        """The text for a log line: one line, escaped, at most LOGGED_TEXT characters."""
        text = " ".join(self.text.split())
        if len(text) > LOGGED_TEXT:
            text = text[:LOGGED_TEXT] + "..."
        return printable(text)


_ADVISORY_LOCKS = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                             "pg_try_advisory_lock_shared"})
_ADVISORY_UNLOCKS = frozenset({"pg_advisory_unlock", "pg_advisory_unlock_shared", "pg_advisory_unlock_all"})
#: SET's special forms (after SET [SESSION]) and the setting each changes.
_SET_FORMS = {("time", "zone"): "timezone", ("schema",): "search_path", ("names",): "client_encoding",
              ("xml", "option"): "xmloption"}
_CHARACTERISTICS = ("default_transaction_isolation", "default_transaction_read_only",
                    "default_transaction_deferrable")
#: Words that may stand between CREATE and TEMP and the object a temporary CREATE makes.
_CREATE_PREFIX = frozenset({"or", "replace", "global", "local"})
_TEMP_WORDS = frozenset({"temp", "temporary"})
_ROLE_SETTINGS = frozenset({"role", "session_authorization"})
#: The NAMEDATALEN - 1 bytes PostgreSQL keeps of an identifier (longer ones are truncated).
MAX_IDENTIFIER = 63


def look(text: str) -> Effects:
    """What ``text`` (a Query's, or a Parse's) may do to the session; empty (falsy) if nothing."""
    effects = Effects(text)
    stmts = statements(text)
    for stmt in stmts:
        _classify(stmt, effects)
    if len(stmts) == 1:
        effects.listen = _listen_command(stmts[0])
    return effects


def _words(stmt) -> list[str]:
    """The statement's tokens with WORDs as themselves and anything else as "" (for keyword matching)."""
    return [value if kind == WORD else "" for kind, value in stmt]


def _classify(stmt, effects: Effects) -> None:
    words = _words(stmt)
    first = words[0]
    if first == "set":
        _classify_set(stmt, words, effects)
    elif first == "reset":
        _classify_reset(stmt, words, effects)
    elif first == "discard":
        what = words[1] if len(words) > 1 else ""
        if what == "all":
            effects.touched_all = True
            effects.suspects.update(VERIFIABLE)
            effects.unlisten.add(None)
        elif what in _TEMP_WORDS:
            effects.suspects.add(TEMP_TABLE)
    elif first == "create":
        what = _creates_temp(stmt, words)
        if what:
            effects.suspects.add(TEMP_TABLE)
            if not _on_commit_drop(words):
                effects.pins[TEMP_TABLE] = what
    elif first == "drop":
        effects.suspects.add(TEMP_TABLE)
    elif first == "declare":
        if _follows(words, ("with", "hold")):
            effects.suspects.add(CURSOR_WITH_HOLD)
            effects.pins[CURSOR_WITH_HOLD] = "DECLARE CURSOR WITH HOLD"
    elif first == "close":
        effects.suspects.add(CURSOR_WITH_HOLD)
    elif first == "prepare":
        if len(words) < 2 or words[1] != "transaction":
            effects.suspects.add(PREPARE)
            effects.pins[PREPARE] = "PREPARE"
    elif first == "deallocate":
        effects.suspects.add(PREPARE)
    elif first == "load":
        effects.pins[LOAD] = "LOAD"
    elif first == "listen":
        effects.suspects.add(LISTEN)
        effects.pins[LISTEN] = "LISTEN"
    elif first == "unlisten":
        effects.suspects.add(LISTEN)
        channel = stmt[1] if len(stmt) > 1 else (OP, "*")
        effects.unlisten.add(channel[1] if channel[0] in (WORD, QUOTED) else None)
    elif first == "notify":
        effects.notifies = True
    if first not in ("create", "alter", "comment"):       # (a function's body names functions it does not call)
        _classify_calls(stmt, words, effects)
    if first in ("select", "with") and _follows_any(words, "into", ("temp", "temporary", "local", "global")):
        effects.suspects.add(TEMP_TABLE)
        effects.pins[TEMP_TABLE] = "SELECT INTO TEMPORARY TABLE"


def _classify_calls(stmt, words, effects: Effects) -> None:
    """Function calls anywhere in the statement: set_config, advisory locks, pg_notify."""
    n = len(stmt)
    for i, word in enumerate(words):
        if not word or i + 1 >= n or stmt[i + 1] != (OP, "("):
            continue
        if word in _ADVISORY_LOCKS:
            effects.suspects.add(ADVISORY_LOCK)
            effects.pins[ADVISORY_LOCK] = word + "()"
        elif word in _ADVISORY_UNLOCKS:
            effects.suspects.add(ADVISORY_LOCK)
        elif word == "pg_notify":
            effects.notifies = True
        elif word == "set_config":
            _classify_set_config(stmt, i + 2, effects)


def _classify_set_config(stmt, i: int, effects: Effects) -> None:
    """``set_config(name, value, is_local)`` whose arguments start at ``stmt[i]``."""
    args = _arguments(stmt, i)
    if len(args) != 3:
        effects.unknown = True
        return
    name, _, is_local = args
    if len(is_local) == 1 and (is_local[0] == (WORD, "true") or (is_local[0][0] == STRING
                                                                 and is_local[0][1].lower() in ("t", "true", "on"))):
        return                                              # SET LOCAL's equivalent
    if len(name) == 1 and name[0][0] == STRING:
        _touch(name[0][1].lower(), effects, "set_config('role')")
    else:
        effects.unknown = True


def _arguments(stmt, i: int) -> list[list]:
    """The comma-separated arguments of a call whose '(' was just before ``stmt[i]``."""
    args, current, depth = [], [], 0
    for token in stmt[i:]:
        if token == (OP, "("):
            depth += 1
        elif token == (OP, ")"):
            if depth == 0:
                args.append(current)
                return args
            depth -= 1
        elif token == (OP, ",") and depth == 0:
            args.append(current)
            current = []
            continue
        current.append(token)
    return args


def _classify_set(stmt, words, effects: Effects) -> None:
    rest = words[1:]
    if rest[:1] == ["local"]:
        return                                              # gone at the end of the transaction
    if rest[:2] == ["session", "characteristics"]:
        effects.touched.update(_CHARACTERISTICS)
        return
    if rest[:1] == ["session"] and rest[1:2] != ["authorization"]:
        rest = rest[1:]
        stmt = stmt[1:]
    if rest[:2] == ["session", "authorization"]:
        if rest[2:3] == ["default"]:
            effects.suspects.add(ROLE)
        else:
            effects.suspects.add(ROLE)
            effects.pins[ROLE] = "SET SESSION AUTHORIZATION"
        return
    if rest[:1] == ["role"] and len(rest) > 1 and rest[1] not in ("to", ""):
        _set_role(rest[1:], stmt[2:], effects)
        return
    if rest[:1] in (["transaction"], ["constraints"], ["catalog"]):
        return
    for form, name in _SET_FORMS.items():
        if tuple(rest[:len(form)]) == form:
            effects.touched.add(name)
            return
    name = _setting_name(stmt[1:])
    if name is None:
        effects.unknown = True
    elif name == "role":
        _set_role(rest[2:], stmt[3:], effects)
    else:
        _touch(name, effects, "SET " + name)


def _set_role(value_words, value_tokens, effects: Effects) -> None:
    effects.suspects.add(ROLE)
    if not (value_words[:1] == ["none"] or (value_tokens[:1] and value_tokens[0][0] == STRING
                                            and value_tokens[0][1].lower() == "none")):
        effects.pins[ROLE] = "SET ROLE"


def _classify_reset(stmt, words, effects: Effects) -> None:
    rest = words[1:]
    if rest[:1] == ["all"]:
        effects.touched_all = True
        effects.suspects.add(ROLE)
    elif rest[:2] == ["time", "zone"]:
        effects.touched.add("timezone")
    elif rest[:2] == ["session", "authorization"] or rest[:1] == ["role"]:
        effects.suspects.add(ROLE)
    elif rest[:1] in (["transaction"],):
        return
    else:
        name = _setting_name(stmt[1:])
        if name is None:
            effects.unknown = True
        elif name in _ROLE_SETTINGS:
            effects.suspects.add(ROLE)
        else:
            effects.touched.add(name)


def _setting_name(tokens_) -> str | None:
    """The setting named at the start of ``tokens_`` (``name`` or ``prefix.name``, quoted or not)."""
    parts = []
    i = 0
    while i < len(tokens_):
        kind, value = tokens_[i]
        if kind not in (WORD, QUOTED):
            return None
        parts.append(value if kind == QUOTED else value)
        if i + 1 < len(tokens_) and tokens_[i + 1] == (OP, "."):
            i += 2
            continue
        break
    if not parts:
        return None
    name = ".".join(parts).lower()
    return name if valid_guc_name(name) else None


def _touch(name: str, effects: Effects, how: str) -> None:
    if name in _ROLE_SETTINGS:
        effects.suspects.add(ROLE)
        effects.pins[ROLE] = how
    elif valid_guc_name(name):
        effects.touched.add(name)
    else:
        effects.unknown = True


def _creates_temp(stmt, words) -> str:
    """What a CREATE [OR REPLACE] [GLOBAL|LOCAL] {TEMP|TEMPORARY} ... or CREATE ... pg_temp.name
    statement creates ("CREATE TEMPORARY TABLE"); "" for another CREATE."""
    for i, word in enumerate(words[1:], 1):
        if word in _TEMP_WORDS:
            objects = [w for w in words[i + 1:i + 3] if w and w not in ("recursive", "unlogged")]
            return "CREATE TEMPORARY " + (objects[0].upper() if objects else "TABLE")
        if word not in _CREATE_PREFIX:
            break
    if any(kind in (WORD, QUOTED) and value == "pg_temp" and i + 1 < len(stmt) and stmt[i + 1] == (OP, ".")
           for i, (kind, value) in enumerate(stmt)):
        return "CREATE " + (words[1].upper() if len(words) > 1 and words[1] else "") + " pg_temp."
    return ""


def _on_commit_drop(words) -> bool:
    return _follows(words, ("on", "commit", "drop"))


def _follows(words, sequence) -> bool:
    k = len(sequence)
    return any(tuple(words[i:i + k]) == sequence for i in range(len(words) - k + 1))


def _follows_any(words, first: str, seconds) -> bool:
    return any(words[i] == first and words[i + 1] in seconds for i in range(len(words) - 1))


def _listen_command(stmt) -> tuple | None:
    """("listen", channel) / ("unlisten", channel or None) for a lone LISTEN or UNLISTEN, else None."""
    if len(stmt) != 2 or stmt[0][0] != WORD or stmt[0][1] not in ("listen", "unlisten"):
        return None
    verb = stmt[0][1]
    kind, value = stmt[1]
    if verb == "unlisten" and (kind, value) == (OP, "*"):
        return ("unlisten", None)
    if kind not in (WORD, QUOTED) or not value or len(value.encode("utf-8", "surrogateescape")) > MAX_IDENTIFIER:
        return None
    return (verb, value)


def describe(pinned_by: str) -> str:
    """The statement kind of a ``SessionState.pins`` value ("CREATE TEMPORARY TABLE (create temp ...)")."""
    return pinned_by.split(" (", 1)[0]


def raise_statement(sqlstate: str, message: str, detail: str, hint: str) -> str:
    """A statement that fails with this error on the server (a DO block: PL/pgSQL's RAISE).

    For a refusal inside a transaction block, where the server's transaction
    must fail as the client sees it fail.  The texts are the proxy's own, with
    no ``$`` (they cannot end the dollar quote) and quoted as literals.
    """
    fields = ", ".join(f"{key} = {quote_literal(value.replace('$', ''))}" for key, value in
                       (("ERRCODE", sqlstate), ("MESSAGE", message), ("DETAIL", detail), ("HINT", hint)))
    return f"DO $tpp_refusal$BEGIN RAISE EXCEPTION USING {fields}; END$tpp_refusal$"


# -- one client's state --------------------------------------------------------------------------

def follows(name: str) -> bool:
    """Whether setting ``name`` (lower case) follows a client to its next server connection."""
    return name not in NOT_FOLLOWED and may_carry(name)


class SessionState:
    """One pooled client's session state as far as the proxy knows it (its relay's thread only).

    ``pins``: kind -> what pinned it (the statement, escaped and shortened);
    ``suspects``: kinds to ask the server about at the next release point;
    ``dirty``/``dirty_all``/``dirty_unknown``: settings to read back before the
    server connection goes to anyone else.
    """

    __slots__ = ("pins", "suspects", "dirty", "dirty_all", "dirty_unknown", "pin_on", "pending_pins",
                 "notified", "shown")

    def __init__(self, pin_on=PIN_KINDS) -> None:
        self.pins: dict[str, str] = {}
        self.pending_pins: dict[str, str] = {}    # kind -> statement, seen since the last verification
        self.suspects: set[str] = set()
        self.dirty: set[str] = set()
        self.dirty_all = False
        self.dirty_unknown = False
        self.pin_on = frozenset(pin_on)
        self.notified = False           # a NOTIFY since the server connection was last handed on
        self.shown = ""                 # the pinned kinds, comma-separated (SHOW CLIENTS reads it)

    @property
    def pinned(self) -> bool:
        return bool(self.pins)

    @property
    def needs_readback(self) -> bool:
        return bool(self.dirty or self.dirty_all or self.dirty_unknown)

    def note(self, effects: Effects) -> None:
        """A statement text the client sent to its server connection."""
        for name in effects.touched:
            if follows(name):
                self.dirty.add(name)
        self.dirty_all |= effects.touched_all
        self.dirty_unknown |= effects.unknown
        self.notified |= effects.notifies
        pin_on = self.pin_on
        for kind in effects.suspects:
            if kind in pin_on and (kind in self.pins or kind in effects.pins or kind in self.pending_pins):
                self.suspects.add(kind)
        for kind, how in effects.pins.items():
            if kind in pin_on and kind not in self.pins and kind not in self.pending_pins:
                self.pending_pins[kind] = f"{how} ({effects.logged_text()})"
                if kind not in VERIFIABLE:
                    self.suspects.add(kind)

    def pinning_kinds(self, effects: Effects) -> list[str]:
        """The kinds ``effects`` would newly pin this client with (those in ``pin_on``)."""
        return [kind for kind in effects.pins if kind in self.pin_on and kind not in self.pins]

    # -- asking the server ------------------------------------------------------------

    def verify_sql(self, login_user: str) -> str:
        """One SELECT whose columns say, per suspect verifiable kind (``verified_kinds``), whether
        that state exists; ``login_user`` is whom the server connection logged in as."""
        user = quote_literal(login_user)
        return "SELECT " + ", ".join(_STATE_QUERIES[kind].format(user=user) for kind in self.verified_kinds())

    def verified_kinds(self) -> list[str]:
        return [kind for kind in VERIFIABLE if kind in self.suspects]

    def settle(self, found: dict[str, bool]) -> tuple[list[str], list[str]]:
        """The server's answers (kind -> state exists): returns (kinds newly pinned, kinds unpinned)."""
        pinned, unpinned = [], []
        for kind in self.suspects:
            exists = found.get(kind, kind == LOAD)
            if exists and kind not in self.pins:
                self.pins[kind] = self.pending_pins.get(kind, kind)
                pinned.append(kind)
            elif not exists and kind in self.pins:
                del self.pins[kind]
                unpinned.append(kind)
        self.suspects.clear()
        self.pending_pins.clear()
        self.shown = ",".join(k for k in PIN_KINDS if k in self.pins)
        return pinned, unpinned

    def unpin(self) -> None:
        """The server connection, and the state on it, is gone."""
        self.pins.clear()
        self.suspects.clear()
        self.pending_pins.clear()
        self.shown = ""

    def readback_names(self, current: dict) -> list[str]:
        """The settings to read back: those touched, and with RESET ALL every one the client has."""
        names = set(self.dirty)
        if self.dirty_all:
            names.update(n for n in current if follows(n))
        return sorted(n for n in names if valid_guc_name(n))

    def readback_sql(self, names: list[str]) -> str:
        """A SELECT of (name, value) rows: each name's value now (NULL if the server has no such
        setting), and with a ``set_config`` of an unknown name, every setting made in the session."""
        parts = []
        if names:
            array = ", ".join(quote_literal(n) for n in names)
            parts.append(f"SELECT n, pg_catalog.current_setting(n, true) FROM pg_catalog.unnest("
                         f"ARRAY[{array}]::pg_catalog.text[]) AS n")
        if self.dirty_unknown:
            parts.append("SELECT name::pg_catalog.text, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings "
                         "WHERE source OPERATOR(pg_catalog.=) 'session'")
        return " UNION ALL ".join(parts)

    def read_back(self) -> None:
        self.dirty.clear()
        self.dirty_all = False
        self.dirty_unknown = False


#: Per verifiable kind: a boolean SQL expression, true while that state exists in the session.
#: Every name qualified: the client's search_path must not choose what the proxy runs.
_STATE_QUERIES = {
    TEMP_TABLE: "EXISTS (SELECT FROM pg_catalog.pg_depend WHERE refclassid OPERATOR(pg_catalog.=) "
                "'pg_catalog.pg_namespace'::pg_catalog.regclass AND refobjid OPERATOR(pg_catalog.=) "
                "pg_catalog.pg_my_temp_schema())",
    ADVISORY_LOCK: "EXISTS (SELECT FROM pg_catalog.pg_locks WHERE locktype OPERATOR(pg_catalog.=) 'advisory' "
                   "AND pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid())",
    CURSOR_WITH_HOLD: "EXISTS (SELECT FROM pg_catalog.pg_cursors WHERE is_holdable)",
    # ({user}: the server login's user, as a literal)
    ROLE: "(pg_catalog.current_setting('role') OPERATOR(pg_catalog.<>) 'none' OR "
          "pg_catalog.current_setting('session_authorization') OPERATOR(pg_catalog.<>) {user})",
    PREPARE: "EXISTS (SELECT FROM pg_catalog.pg_prepared_statements WHERE from_sql)",
    LISTEN: "EXISTS (SELECT FROM pg_catalog.pg_listening_channels())",
}
