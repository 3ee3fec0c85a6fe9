"""Protocol-level named prepared statements across pooled server connections (sans I/O).

In transaction pooling a client's next transaction may run on another server
connection, where a statement it prepared (psycopg's ``_pg3_0``, pgbench -M
prepared, asyncpg, JDBC, pgx) does not exist or names another query.  This
module rewrites the client's extended-protocol stream so that does not matter,
as PgBouncer's ``max_prepared_statements`` does:

* Every statement text (query plus parameter type OIDs) gets a proxy-chosen
  server name, ``tpp_`` and a hash of the text, so a statement is prepared once
  per server connection however many clients prepare it (``ServerStatements``).
* Each client keeps a map from its own names to those statements
  (``ClientStatements``).  Parse, Bind, Describe and Close of a named statement
  are rewritten to the server name; a Bind or Describe on a server connection
  that lacks the statement gets the Parse injected in front of it.
* ``PreparedRelay`` follows which request every server reply answers, so that
  the replies of injected messages are removed, the replies of messages not sent
  (a Parse the server already has, a client's Close) are synthesised in their
  place, and an ErrorResponse makes everything up to the next Sync count as
  skipped, exactly as the server treats it.

Nothing here does I/O or starts threads: the relay feeds chunks of each stream
and sends what comes back.  A ``ServerStatements`` belongs to one server
connection and a ``ClientStatements``/``PreparedRelay`` to one client; the pool's
hand-over of a connection orders their use, so none of them takes a lock.

Known limits:

* SQL-level ``PREPARE``/``EXECUTE``/``DEALLOCATE name`` pass untouched, so
  ``DEALLOCATE name`` of a protocol-level name fails with 26000 (psycopg uses it
  only with libpq older than 17; newer ones send Close).  ``DEALLOCATE ALL`` and
  ``DISCARD ALL`` are recognised by their CommandComplete tag (psycopg sends
  DEALLOCATE ALL after every ROLLBACK, DROP or ALTER): they empty the client's
  map and the connection's cache, and other clients' statements are prepared
  again on their next use.
* A Parse of a text whose Parse (by this client) is still unanswered in an
  earlier Sync batch is answered ParseComplete at once; should that earlier
  Parse fail, the error shows at the next Bind or Describe instead.
* Statements are shared by text.  After DDL changes a result type, a client
  gets PostgreSQL's "cached plan must not change result type" once for its
  statement, as directly, and the statement's *generation* moves on: the
  client's next Parse of the text (drivers prepare again after that error)
  closes and prepares it again on whichever server connection still has the
  old plan, instead of being answered from the cache; a name prepared before
  the change keeps getting the error, as directly (see ``PreparedStatement``).
* A named Parse is held until it has arrived whole; a Bind only up to the end of
  its statement name.  Neither may take more than ``max_message`` bytes
  (``max_tracked_message_size``) to get there: a client whose message declares
  more is ended with 54000 (``MessageTooLarge``), nothing of it sent on.  A
  client's statements keep at most ``ClientStatements.max_bytes`` of text.
* A server's ErrorResponse longer than ``max_message`` is judged by its first
  fields (SQLSTATE) and passed on as it is, never held.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass
from functools import partial
from hashlib import blake2b

from . import protocol as pq
from .errors import MessageTooLarge

#: Prefix of the names the proxy gives statements on servers.  Clients must not
#: use it themselves (their own names are rewritten, so only SQL-level
#: ``EXECUTE``/``DEALLOCATE`` or a Bind of a name they never prepared could).
SERVER_NAME_PREFIX = b"tpp_"

#: What the proxy sends instead of ``DISCARD ALL`` when it keeps statements.
#:
#: PostgreSQL 15 documents DISCARD ALL as CLOSE ALL; SET SESSION AUTHORIZATION
#: DEFAULT; RESET ALL; DEALLOCATE ALL; UNLISTEN *; SELECT
#: pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; DISCARD SEQUENCES.
#: This is that list with two changes:
#:
#: * DEALLOCATE ALL becomes a DO block that deallocates only the statements
#:   created by SQL ``PREPARE`` (``pg_prepared_statements.from_sql``): the
#:   protocol-level ones are the proxy's own ``tpp_`` statements, which the next
#:   client may reuse.  (Needs PL/pgSQL, which every database has unless an
#:   administrator dropped it.)
#: * DISCARD PLANS is left out.  It would force every kept statement to be
#:   analysed and planned again at its next use after each release, which under
#:   contention (a release per transaction) throws away most of what keeping them
#:   buys; and cached plans carry no state the next client could observe, since
#:   PostgreSQL re-plans by itself when search_path, the role or a referenced
#:   object changes.
#:
#: DISCARD ALL itself refuses to run in a transaction block, and a simple Query
#: holding several statements is one implicit transaction, so it could not be
#: part of this string; the commands used here all run there (checked on
#: PostgreSQL 15 by tests/test_prepared_unit.py).
#:
#: Every name in it is qualified with ``pg_catalog.`` (functions, the view, the
#: type): it runs as the pooled user, after RESET ALL put back the search_path
#: the role or the database sets, which a database owner chooses; an unqualified
#: ``format(text, text)`` in any schema on that path would be called instead of
#: pg_catalog's (an exact match beats its variadic signature wherever the
#: schema comes), and a ``pg_prepared_statements`` or ``text`` in a schema before
#: pg_catalog would be read instead.
RESET_QUERY = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; "
    "SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES; "
    "DO $tpp$DECLARE s pg_catalog.text; BEGIN "
    "FOR s IN SELECT name FROM pg_catalog.pg_prepared_statements WHERE from_sql LOOP "
    "EXECUTE pg_catalog.format('DEALLOCATE %I', s); END LOOP; END$tpp$")


# Message type bytes as ints (a memoryview or bytearray indexes to int).
_PARSE, _BIND, _DESCRIBE, _CLOSE = pq.PARSE[0], pq.BIND[0], pq.DESCRIBE[0], pq.CLOSE[0]
_QUERY, _SYNC, _EXECUTE, _FUNCTION_CALL = pq.QUERY[0], pq.SYNC[0], pq.EXECUTE[0], pq.FUNCTION_CALL[0]
_PARSE_COMPLETE, _BIND_COMPLETE, _CLOSE_COMPLETE = pq.PARSE_COMPLETE[0], pq.BIND_COMPLETE[0], pq.CLOSE_COMPLETE[0]
_ROW_DESCRIPTION, _NO_DATA = pq.ROW_DESCRIPTION[0], pq.NO_DATA[0]
_COMMAND_COMPLETE, _EMPTY_QUERY, _PORTAL_SUSPENDED = (pq.COMMAND_COMPLETE[0], pq.EMPTY_QUERY_RESPONSE[0],
                                                      pq.PORTAL_SUSPENDED[0])
_ERROR, _READY = pq.ERROR_RESPONSE[0], pq.READY_FOR_QUERY[0]
_STATEMENT = pq.STATEMENT[0]
_COPY_IN, _COPY_BOTH = pq.COPY_IN_RESPONSE[0], pq.COPY_BOTH_RESPONSE[0]

#: Client messages whose handling needs more than the header; the rest (CopyData,
#: Flush, Terminate, ...) pass with header-only cost.
_CLIENT_ACTIVE = (pq.PARSE + pq.BIND + pq.DESCRIBE + pq.CLOSE + pq.QUERY + pq.SYNC + pq.EXECUTE
                  + pq.FUNCTION_CALL + pq.COPY_DONE + pq.COPY_FAIL)
#: Server messages that answer (part of) a request; DataRow, CopyData,
#: NoticeResponse, ParameterStatus, ... pass with header-only cost.
_SERVER_ACTIVE = (pq.PARSE_COMPLETE + pq.BIND_COMPLETE + pq.CLOSE_COMPLETE + pq.ROW_DESCRIPTION + pq.NO_DATA
                  + pq.COMMAND_COMPLETE + pq.EMPTY_QUERY_RESPONSE + pq.PORTAL_SUSPENDED + pq.ERROR_RESPONSE
                  + pq.READY_FOR_QUERY + pq.COPY_IN_RESPONSE + pq.COPY_BOTH_RESPONSE)

_PARSE_COMPLETE_MESSAGE = pq.message(pq.PARSE_COMPLETE)
_CLOSE_COMPLETE_MESSAGE = pq.message(pq.CLOSE_COMPLETE)

_UNDEFINED_COLUMN = pq.SQLSTATE_UNDEFINED_COLUMN
_UNDEFINED_STATEMENT = pq.SQLSTATE_INVALID_SQL_STATEMENT_NAME
#: What PostgreSQL answers a Bind of a statement whose result type changed since its Parse
#: (after ALTER TABLE, a type change...).  The same SQLSTATE has other uses, but none at Bind.
_CACHED_PLAN_CHANGED = pq.SQLSTATE_FEATURE_NOT_SUPPORTED
#: That error as PostgreSQL words it, for a client name the proxy must fail in the server's place
#: (asyncpg recognises it by the routine, R: the message is translated where lc_messages says so).
_CACHED_PLAN_ERROR = pq.error_response_from_fields(
    {"S": "ERROR", "V": "ERROR", "C": _CACHED_PLAN_CHANGED, "M": "cached plan must not change result type",
     "F": "plancache.c", "R": "RevalidateCachedQuery"}, "ERROR")
#: CommandComplete tags after which the session has no prepared statements left.
_DEALLOCATING_TAGS = (b"DEALLOCATE ALL\0", b"DISCARD ALL\0")
_DEALLOCATING_LENGTHS = {4 + len(tag) for tag in _DEALLOCATING_TAGS}

#: Sent instead of a Parse the proxy refuses, so that the server itself raises an
#: error at that point of the pipeline (aborting the transaction and skipping to
#: Sync as for any error); the proxy swaps the error for its own.  The query is
#: valid syntax that always fails analysis (42703), which keeps PostgreSQL's
#: order of checks: in an aborted transaction the client sees 25P02 first.  A
#: named statement, so the client's unnamed statement is not dropped.
_REFUSAL_PARSE = pq.message(pq.PARSE, SERVER_NAME_PREFIX + b"refused\0"
                            b'SELECT "threadpool_proxy refused this Parse"\0\0\0')


class PreparedStatement:
    """A statement text as the proxy prepares it on servers, shared by all clients.

    ``generation`` counts the times a server said its plan of this text must
    not change result type (0A000, after DDL, a type change...): a server
    entry prepared in an older generation has the old plan (the server keeps
    failing it), and a client name prepared in an older generation expects
    the old result type (PostgreSQL keeps failing it too).  Read and moved on
    by client threads without a lock: it only grows, and two threads moving it
    for the same report set the same value.

    ``server_name`` is derived from the text, and ``parse_message`` is the
    client's Parse rewritten to that name, ready to send or inject.
    """

    __slots__ = ("server_name", "parse_message", "generation", "__weakref__")

    def __init__(self, server_name: bytes, parse_message: bytes) -> None:
        self.server_name = server_name
        self.parse_message = parse_message
        self.generation = 0

    def invalidated(self, entry: "CachedStatement") -> None:
        """A server failed ``entry`` (its plan of this text) with "cached plan must not change result type"."""
        if entry.generation >= self.generation:
            self.generation = entry.generation + 1

    def __repr__(self) -> str:
        return f"PreparedStatement({self.server_name.decode()})"


# One object per distinct text while any client holds it: a thousand clients
# preparing the same 5 kB query keep one copy of it, as PgBouncer's global cache.
# Shared by all client threads without a lock: get and set are atomic under the
# GIL, and two threads creating the same text at once only cost a duplicate.
_shared_statements: "weakref.WeakValueDictionary[bytes, PreparedStatement]" = weakref.WeakValueDictionary()


def statement_for(parse_tail: bytes) -> PreparedStatement:
    """The shared statement for a Parse body after its name (query, parameter types).

    The name hashes the query text together with the parameter type OIDs, since
    the same text with other declared types is another statement.
    """
    server_name = SERVER_NAME_PREFIX + blake2b(parse_tail, digest_size=16).hexdigest().encode()
    statement = _shared_statements.get(server_name)
    if statement is None:
        statement = PreparedStatement(server_name, pq.message(pq.PARSE, server_name + b"\0" + parse_tail))
        _shared_statements[server_name] = statement
    return statement


class _NameMap:
    """A map keyed by statement name, bounded by ``limit`` (what both kinds of cache share)."""

    def __init__(self, limit: int, items: dict) -> None:
        if limit < 1:
            raise ValueError(f"{type(self).__name__} needs a limit of at least one statement")
        self.limit = limit
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: bytes) -> bool:
        return name in self._items

    def names(self) -> list[bytes]:
        """The names, oldest (for a server: least recently used) first."""
        return list(self._items)


# -- per server connection --------------------------------------------------------

class CachedStatement:
    """A statement one server connection holds (or will, once its Parse is answered)."""

    __slots__ = ("name", "confirmed", "generation")

    def __init__(self, name: bytes, generation: int = 0) -> None:
        self.name = name
        self.confirmed = False      # False while the Parse that creates it is unanswered
        self.generation = generation    # its statement's generation when it was prepared


class ServerStatements(_NameMap):
    """The statements one server connection holds: an LRU of at most ``limit``.

    Entries are added when a Parse is sent, so that later messages of the same
    pipeline can count on them, and stay *tentative* until its ParseComplete:
    if the Parse fails or is skipped the relay removes them again.  Removal and
    restoring go by entry identity, so that an older request cannot remove a
    newer entry of the same name.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(limit, OrderedDict())
        self._entries: OrderedDict[bytes, CachedStatement] = self._items

    def use(self, name: bytes) -> CachedStatement | None:
        """The entry for ``name``, marked most recently used; None if absent."""
        entry = self._entries.get(name)
        if entry is not None:
            self._entries.move_to_end(name)
        return entry

    def add(self, name: bytes, generation: int = 0) -> tuple[CachedStatement, list[CachedStatement]]:
        """Add a tentative entry; return it and the entries evicted to stay within the limit.

        The caller closes the evicted statements on the server, after the Parse.
        """
        entry = self._entries[name] = CachedStatement(name, generation)
        evicted = []
        while len(self._entries) > self.limit:
            evicted.append(self._entries.popitem(last=False)[1])
        return entry, evicted

    def discard(self, entry: CachedStatement) -> None:
        """Remove ``entry`` (if it is still the one under its name)."""
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]

    def restore(self, entry: CachedStatement) -> None:
        """Put an evicted entry back (its Close was skipped), as the next to evict."""
        if entry.name not in self._entries:
            self._entries[entry.name] = entry
            self._entries.move_to_end(entry.name, last=False)

    def forget_confirmed(self) -> None:
        """The session deallocated its statements: keep only those whose Parse is still on its way."""
        for name in [name for name, entry in self._entries.items() if entry.confirmed]:
            del self._entries[name]

    def clear(self) -> None:
        """The server connection lost every statement (DISCARD ALL as reset query, or a new connection)."""
        self._entries.clear()


# -- per client ---------------------------------------------------------------------

class ClientStatements(_NameMap):
    """One client's named statements: its name -> the shared ``PreparedStatement``.

    This outlives server connections: it is what lets the relay prepare a
    statement again on whichever connection the client gets next.  ``limit``
    bounds how many, ``max_bytes`` (None: no bound) the bytes of their Parse
    messages together (texts shared with other clients count for each); a Parse
    over either is refused with an error (see ``PreparedRelay``) rather than
    silently forgetting an older statement, which would surface later as a
    baffling "does not exist".
    """

    def __init__(self, limit: int, max_bytes: int | None = None) -> None:
        super().__init__(limit, {})
        self._statements: dict[bytes, PreparedStatement] = self._items
        # The statement's generation when the client prepared each name (the result type it expects).
        self._generations: dict[bytes, int] = {}
        self.max_bytes = max_bytes
        self.bytes = 0          # of the Parse messages of the statements held

    @property
    def full(self) -> bool:
        return len(self._statements) >= self.limit

    def fits(self, size: int) -> bool:
        """Whether a statement whose Parse is ``size`` bytes stays within ``max_bytes``."""
        return self.max_bytes is None or self.bytes + size <= self.max_bytes

    def get(self, name: bytes) -> PreparedStatement | None:
        return self._statements.get(name)

    def generation(self, name: bytes) -> int:
        """The generation of its statement that ``name`` was prepared in."""
        return self._generations.get(name, 0)

    def add(self, name: bytes, statement: PreparedStatement, generation: int = 0) -> None:
        self._drop(name)
        self._statements[name] = statement
        self._generations[name] = generation
        self.bytes += len(statement.parse_message)

    def remove(self, name: bytes) -> PreparedStatement | None:
        return self._drop(name)

    def _drop(self, name: bytes) -> PreparedStatement | None:
        self._generations.pop(name, None)
        statement = self._statements.pop(name, None)
        if statement is not None:
            self.bytes -= len(statement.parse_message)
        return statement

    def discard(self, name: bytes, statement: PreparedStatement) -> None:
        """Undo a Parse: remove ``name`` if it still means ``statement``."""
        if self._statements.get(name) is statement:
            self._drop(name)

    def restore(self, name: bytes, statement: PreparedStatement, generation: int = 0) -> None:
        """Undo a Close: map ``name`` again unless it was defined anew since."""
        if name not in self._statements:
            self.add(name, statement, generation)

    def retain(self, names: set[bytes]) -> None:
        """Keep only ``names`` (the session deallocated everything else)."""
        for name in [name for name in self._statements if name not in names]:
            self._drop(name)


@dataclass
class PreparedStats:
    """What one client's relay did; add them up per pool for SHOW-style output."""

    prepared: int = 0   # Parses sent to create a statement on a server (rewritten or injected)
    reused: int = 0     # Parses answered without a round trip, Binds that needed no injected Parse
    injected: int = 0   # Parses injected before a Bind or Describe
    evicted: int = 0    # Closes injected to keep a server connection within its limit
    refused: int = 0    # Parses answered with an error: name already in use, or client limit


# -- the outstanding-request queue --------------------------------------------------

# What a request expects back, which decides which reply completes it.
_K_PARSE, _K_BIND, _K_DESCRIBE, _K_EXECUTE, _K_CLOSE = range(5)
_K_SYNC = 5        # completed by ReadyForQuery; ends skipping after an error
_K_QUERY = 6       # Query or FunctionCall: completed by ReadyForQuery, errors inside do not skip
_K_NONE = 7        # CopyDone/CopyFail: a marker with no reply of its own

# What to do with the reply.
_FORWARD = 0       # pass it to the client
_SWALLOW = 1       # the proxy sent the request: drop the reply
_SYNTH = 2         # not sent: give the client ``reply`` when the request's turn comes
_REFUSE = 3        # a refusal Parse: replace its error with ``reply``


class _Request:
    """One request the server will answer, or the client is owed an answer for.

    ``created`` is the server cache entry a Parse creates (confirmed by its
    ParseComplete); ``undo(sqlstate)`` runs when the request did not take effect
    (sqlstate of its error, or None when skipped); ``name`` is the client name a
    client Parse defines; ``renamed`` is (server name, client name) of a Bind or
    Describe whose statement name the proxy rewrote, so that the server's error
    about it can speak of the client's name.
    """

    __slots__ = ("kind", "action", "reply", "created", "undo", "name", "renamed")

    def __init__(self, kind, action=_FORWARD, reply=b"", created=None, undo=None, name=None, renamed=None):
        self.kind = kind
        self.action = action
        self.reply = reply
        self.created = created
        self.undo = undo
        self.name = name
        self.renamed = renamed


# Requests needing no bookkeeping of their own are shared, so the hot path allocates nothing.
_PLAIN = {kind: _Request(kind) for kind in (_K_PARSE, _K_BIND, _K_DESCRIBE, _K_EXECUTE,
                                            _K_CLOSE, _K_SYNC, _K_QUERY, _K_NONE)}


class _Requests:
    """Requests in the order the server answers them, with PostgreSQL's error rule.

    After an ErrorResponse to an extended-protocol message the server skips
    every message up to the next Sync: those requests are undone in reverse
    order (so a Close followed by a re-Parse of the same name restores the
    first meaning), and synthesised replies among them are never given.
    Synthesised replies reaching the head are collected for the client.
    """

    __slots__ = ("_queue", "skipping", "copy_from_client", "_replies")

    def __init__(self) -> None:
        self._queue: deque[_Request] = deque()
        self.skipping = False            # the server ignores messages until a Sync
        self.copy_from_client = False    # in COPY FROM STDIN: the client's Syncs go unanswered
        self._replies: list[bytes] = []

    def __bool__(self) -> bool:
        return bool(self._queue)

    def __iter__(self):
        return iter(self._queue)

    def head(self) -> _Request | None:
        return self._queue[0] if self._queue else None

    def append(self, request: _Request) -> None:
        if self.skipping and not self._queue and request.kind != _K_SYNC:
            # The server is skipping to Sync and nothing is ahead: it will ignore this one.
            _undo(request, None)
        else:
            self._queue.append(request)

    def advance(self, can_reply: bool) -> None:
        """Settle the requests at the head that the server will not answer.

        ``can_reply`` is False while a server message is half passed to the
        client: a synthesised reply must wait for its end.
        """
        queue = self._queue
        while queue:
            request = queue[0]
            if request.kind == _K_SYNC:
                return
            if self.skipping:
                _undo(queue.popleft(), None)
            elif request.action == _SYNTH and can_reply:
                self._replies.append(queue.popleft().reply)
            elif request.kind == _K_NONE:
                queue.popleft()
            else:
                return

    def take_replies(self) -> bytes:
        if not self._replies:
            return b""
        replies = b"".join(self._replies)
        self._replies.clear()
        return replies

    def answered(self, kind: int) -> None:
        """A reply completing a ``kind`` request arrived: it must be the head."""
        request = self.head()
        if request is None or request.kind != kind:
            raise pq.ProtocolError(f"server reply out of step with the requests sent ({kind}, {request and request.kind})")
        self._queue.popleft()
        if request.created is not None:
            request.created.confirmed = True

    def answered_if(self, kind: int) -> None:
        """A reply that completes a ``kind`` request, or is part of a Query's answer."""
        request = self.head()
        if request is not None and request.kind == kind:
            self._queue.popleft()

    def error(self, sqlstate: str | None) -> None:
        """An ErrorResponse: it answers the head; extended-protocol errors skip to Sync."""
        request = self.head()
        if request is None or request.kind in (_K_SYNC, _K_QUERY):
            return        # ReadyForQuery still follows; no skipping outside extended protocol
        queue = self._queue
        failed = [queue.popleft()]
        while queue and queue[0].kind != _K_SYNC:
            failed.append(queue.popleft())
        for skipped in reversed(failed[1:]):
            _undo(skipped, None)
        _undo(request, sqlstate)
        self.skipping = True

    def ready(self) -> None:
        """ReadyForQuery: completes the Sync, Query or FunctionCall at the head."""
        queue = self._queue
        unanswered = []
        while queue:
            request = queue.popleft()
            if request.kind in (_K_SYNC, _K_QUERY):
                break
            unanswered.append(request)
        for request in reversed(unanswered):
            _undo(request, None)
        self.skipping = False
        self.copy_from_client = False

    def copy_in_started(self) -> None:
        """CopyInResponse: the server now reads the client's messages up to CopyDone/CopyFail
        as COPY data and ignores the Syncs among them (libpq sends one right after Execute)."""
        queue = self._queue
        if not queue:
            return
        kept = [queue.popleft()]
        while queue and queue[0].kind != _K_NONE:
            request = queue.popleft()
            if request.kind != _K_SYNC:
                kept.append(request)
        if queue:
            queue.popleft()                   # the client already ended its data
        else:
            self.copy_from_client = True      # its coming Syncs, until CopyDone, get no answer
        queue.extendleft(reversed(kept))

    def copy_end(self) -> None:
        """The client sent CopyDone or CopyFail."""
        if self.copy_from_client:
            self.copy_from_client = False
        else:
            self.append(_PLAIN[_K_NONE])

    def sync(self) -> None:
        if not self.copy_from_client:
            self.append(_PLAIN[_K_SYNC])

    def clear(self) -> None:
        self._queue.clear()
        self._replies.clear()
        self.skipping = False
        self.copy_from_client = False


def _undo(request: _Request, sqlstate: str | None) -> None:
    if request.undo is not None:
        request.undo(sqlstate)


# -- following messages through chunks ----------------------------------------------

_KEEP = "keep"     # the whole message passes
_DROP = "drop"     # the whole message is removed
# otherwise a verdict is (n, replacement): the first n bytes become replacement, the rest passes


class _Splice:
    """The output of one chunk: runs of the input with replacements in between.

    Returns the input object itself when nothing was cut, so untouched traffic
    costs no copy.
    """

    __slots__ = ("data", "view", "pieces", "start")

    def __init__(self, data, view) -> None:
        self.data = data
        self.view = view
        self.pieces = None
        self.start = 0

    def cut(self, begin: int, end: int, replacement) -> None:
        """Output the input up to ``begin``, then ``replacement``; resume at ``end``."""
        pieces = self.pieces
        if pieces is None:
            pieces = self.pieces = []
        if begin > self.start:
            pieces.append(self.view[self.start:begin])
        if replacement:
            pieces.append(replacement)
        self.start = end

    def result(self, n: int):
        if self.pieces is None:
            return self.data
        if n > self.start:
            self.pieces.append(self.view[self.start:n])
        return b"".join(self.pieces)


class _MessageStream:
    """Follows message boundaries through the chunks of one direction and splices them.

    For every message of a type in ``active`` it asks ``verdict(t, buf, start,
    available, end)`` -- the message is ``buf[start:end]``, of which
    ``buf[start:available]`` is at hand -- for _KEEP, _DROP, ``(n,
    replacement)``, or None for "not enough yet", in which case the message is
    held back until it is.  ``after(t)``, if given, runs when such a message has
    fully passed and returns bytes to insert after it.  Other messages pass with
    header-only cost, and the rest of a long message streams through without
    being held; ``after`` runs for such a message only if it was split across
    chunks (the one place where a reply may have been held back meanwhile).
    """

    __slots__ = ("_active", "_verdict", "_after", "_remaining", "_drop_rest", "_after_type", "_carry")

    def __init__(self, active: bytes, verdict, after=None) -> None:
        self._active = active
        self._verdict = verdict
        self._after = after
        self._remaining = 0         # bytes of the current message still to come
        self._drop_rest = False     # ... and whether they are dropped
        self._after_type = None     # its type, if ``after`` must run at its end
        self._carry = None          # a message held back: bytes so far

    @property
    def at_boundary(self) -> bool:
        return self._remaining == 0 and self._carry is None

    @property
    def mid_message(self) -> bool:
        """Part of a message has been passed on and the rest has not."""
        return self._remaining != 0

    def reset(self) -> None:
        self._remaining = 0
        self._drop_rest = False
        self._after_type = None
        self._carry = None

    def feed(self, data):
        view = data if type(data) is memoryview else memoryview(data)
        n = len(view)
        out = _Splice(data, view)
        pos = 0
        if self._carry is not None:
            pos = self._resume_carry(view, n, out)
        if self._remaining and pos < n:
            pos = self._finish_message(view, pos, n, out)
        if pos < n:
            self._scan(view, pos, n, out)
        return out.result(n)

    def _scan(self, view, pos: int, n: int, out: _Splice) -> None:
        active = self._active
        verdict_of = self._verdict
        unpack = pq.UINT32.unpack_from
        while pos < n:
            if n - pos < 5:
                self._hold(view, pos, n, out)
                return
            t = view[pos]
            end = pos + 1 + unpack(view, pos + 1)[0]
            if end < pos + 5:
                raise pq.ProtocolError("invalid message length")
            if t not in active:
                if end > n:
                    # ``after`` runs at its end too: the end of any message is a
                    # point where replies held back meanwhile may go out.
                    self._expect_rest(end - n, False, t if self._after is not None else None)
                    return
                pos = end
                continue
            available = end if end <= n else n
            verdict = verdict_of(t, view, pos, available, end)
            if verdict is None:
                self._hold(view, pos, n, out)
                return
            if verdict is _DROP:
                out.cut(pos, available, None)
            elif verdict is not _KEEP:
                out.cut(pos, pos + verdict[0], verdict[1])
            if end > n:
                self._expect_rest(end - n, verdict is _DROP, t)
                return
            self._message_done(t, end, out)
            pos = end

    def _hold(self, view, pos: int, n: int, out: _Splice) -> None:
        self._carry = bytearray(view[pos:n])
        out.cut(pos, n, None)

    def _expect_rest(self, remaining: int, drop: bool, after_type) -> None:
        self._remaining = remaining
        self._drop_rest = drop
        self._after_type = after_type

    def _message_done(self, t: int, pos: int, out: _Splice) -> None:
        if self._after is not None:
            inserted = self._after(t)
            if inserted:
                out.cut(pos, pos, inserted)

    def _finish_message(self, view, pos: int, n: int, out: _Splice) -> int:
        stop = pos + self._remaining
        if stop > n:
            self._remaining = stop - n
            if self._drop_rest:
                out.cut(pos, n, None)
            return n
        self._remaining = 0
        if self._drop_rest:
            out.cut(pos, stop, None)
        t, self._after_type = self._after_type, None
        if t is not None:
            self._message_done(t, stop, out)
        return stop

    def _resume_carry(self, view, n: int, out: _Splice) -> int:
        """Add this chunk's bytes to the held message; pass it on once a verdict is possible."""
        carry = self._carry
        pos = 0
        if len(carry) < 5:
            pos = min(5 - len(carry), n)
            carry += view[:pos]
            if len(carry) < 5:
                out.cut(0, pos, None)
                return pos
        t = carry[0]
        total = 1 + pq.UINT32.unpack_from(carry, 1)[0]
        if total < 5:
            raise pq.ProtocolError("invalid message length")
        active = t in self._active
        verdict = self._verdict(t, carry, 0, len(carry), total) if active else _KEEP
        if verdict is None:
            take = min(total - len(carry), n - pos)
            carry += view[pos:pos + take]
            pos += take
            verdict = self._verdict(t, carry, 0, len(carry), total)
            if verdict is None:
                out.cut(0, pos, None)
                return pos
        self._carry = None
        if verdict is _KEEP:
            released = bytes(carry)
        elif verdict is _DROP:
            released = None
        else:
            released = verdict[1] + carry[verdict[0]:]
        out.cut(0, pos, released)
        if total > len(carry):
            self._expect_rest(total - len(carry), verdict is _DROP, t)
        else:
            self._message_done(t, pos, out)
        return pos


def _find_nul(buf, start: int, stop: int) -> int:
    """Index of the first NUL in ``buf[start:stop]``, or -1.

    Looks at a small window first: names are short, and a Bind's parameters
    (maybe megabytes) must not be copied to find the end of its names.
    """
    window = 128
    while start < stop:
        end = min(stop, start + window)
        found = bytes(buf[start:end]).find(0)
        if found >= 0:
            return start + found
        start = end
        window *= 8
    return -1


def _sqlstate(error_body: bytes) -> str | None:
    return pq.parse_error_fields(error_body).get("C")


def _error(sqlstate: str, text: str, hint: str | None = None) -> bytes:
    return pq.error_response(sqlstate, text, "ERROR", hint=hint)


# -- the relay helper ----------------------------------------------------------------

class PreparedRelay:
    """One client's side of prepared-statement pooling; see the module docstring.

    Feed it every chunk of both streams, in the order they travel:

    * ``from_client(data, server)`` -> ``(to_server, to_client_now)``: send
      ``to_server`` to the server connection whose ``ServerStatements`` is
      ``server``, then ``to_client_now`` (synthesised replies with nothing
      before them) to the client, before handling more server bytes.
    * ``from_server(data)`` -> bytes for the client.

    Either returns its input object unchanged when nothing needed rewriting (a
    view of the caller's buffer, then: send it before reusing the buffer).
    The server connection may change only when ``idle()``; after it was lost,
    ``reset()``.  ``statements`` (the client's names) survives both.
    """

    def __init__(self, statements: ClientStatements, max_message: int = pq.MAX_HELD_MESSAGE) -> None:
        self.statements = statements
        self.max_message = max_message              # the longest message held to look into
        self.stats = PreparedStats()
        self._server: ServerStatements | None = None
        self._requests = _Requests()
        self._client = _MessageStream(_CLIENT_ACTIVE, self._client_verdict)
        self._replies = _MessageStream(_SERVER_ACTIVE, self._reply_verdict, self._reply_done)
        self._error_sqlstate: str | None = None     # of the ErrorResponse being passed
        self._deallocated = False                   # the CommandComplete being passed is DEALLOCATE/DISCARD ALL
        # A Bind held until its names have arrived: (end of its portal name or -1,
        # bytes searched for a NUL so far), both from the message's start, so that
        # each of its bytes is searched once however many chunks it takes.
        self._held_bind: tuple[int, int] | None = None

    # -- the relay's interface ------------------------------------------------------

    def from_client(self, data, server: ServerStatements):
        if server is not self._server:
            if self._server is not None and not self.idle():
                raise RuntimeError("the server connection changed while requests were in flight")
            self._server = server
        to_server = self._client.feed(data)
        self._requests.advance(not self._replies.mid_message)
        return to_server, self._requests.take_replies()

    def from_server(self, data):
        return self._replies.feed(data)

    def engage(self, outstanding: int) -> None:
        """Start following a client whose earlier chunks went by untracked.

        The relay lets chunks without any extended-protocol message pass
        untracked (simple Query traffic needs no rewriting) and calls this
        before the first chunk that has one, with both streams between
        messages: ``outstanding`` Query/FunctionCall/Sync requests sent earlier
        are still to be answered, each by a ReadyForQuery.
        """
        for _ in range(outstanding):
            self._requests.append(_PLAIN[_K_QUERY])

    def idle(self) -> bool:
        """Every request answered, no skipping pending, both streams between messages."""
        return (not self._requests and not self._requests.skipping
                and self._client.at_boundary and self._replies.at_boundary)

    def reset(self) -> None:
        """The server connection is gone: forget what was in flight on it.

        The client's names stay (they are prepared again where needed), and so
        does the position in the client's stream, so the relay must not move a
        client that is in the middle of a message.
        """
        self._requests.clear()
        self._replies.reset()
        self._server = None
        self._error_sqlstate = None
        self._deallocated = False

    # -- client messages ------------------------------------------------------------

    def _client_verdict(self, t, buf, start, available, end):
        if t == _PARSE:
            return self._parse_verdict(buf, start, available, end)
        if t == _BIND:
            return self._bind_verdict(buf, start, available, end)
        if t == _DESCRIBE or t == _CLOSE:
            if available < start + 7:
                return None if available < end else self._plain_describe_or_close(t)
            if buf[start + 5] != _STATEMENT or buf[start + 6] == 0:
                return self._plain_describe_or_close(t)     # a portal, or the unnamed statement
            if available < end:
                if end - start > self.max_message:
                    raise self._too_large(t, end - start)
                return None
            body = bytes(buf[start + 5:end])
            if len(body) > 2 and body[1:-1] in self.statements:
                handle = self._describe_statement if t == _DESCRIBE else self._close_statement
                return end - start, handle(body[1:-1])
            self._requests.append(_PLAIN[_K_DESCRIBE if t == _DESCRIBE else _K_CLOSE])
        elif t == _SYNC:
            self._requests.sync()
        elif t == _EXECUTE:
            self._requests.append(_PLAIN[_K_EXECUTE])
        elif t == _QUERY or t == _FUNCTION_CALL:
            self._requests.append(_PLAIN[_K_QUERY])
        else:                                   # CopyDone, CopyFail
            self._requests.copy_end()
        return _KEEP

    def _plain_describe_or_close(self, t) -> str:
        self._requests.append(_PLAIN[_K_DESCRIBE if t == _DESCRIBE else _K_CLOSE])
        return _KEEP

    def _too_large(self, t: int, size) -> MessageTooLarge:
        what = {_PARSE: "Parse", _BIND: "Bind", _DESCRIBE: "Describe", _CLOSE: "Close"}[t]
        held = f"its portal and statement names take {size} bytes or more" if t == _BIND else f"it is {size} bytes"
        return MessageTooLarge(
            pq.SQLSTATE_PROGRAM_LIMIT_EXCEEDED,
            f"{what} message too long for threadpool_proxy: {held}, "
            f"more than max_tracked_message_size ({self.max_message} bytes)",
            hint="The proxy holds named Parse, Describe and Close messages, and a Bind's names, in memory "
                 "to rewrite them; shorten the statement, or raise max_tracked_message_size.")

    def _parse_verdict(self, buf, start, available, end):
        if available < start + 6:
            return None
        if buf[start + 5] == 0:                 # the unnamed statement: untouched
            self._requests.append(_PLAIN[_K_PARSE])
            return _KEEP
        if available < end:
            if end - start > self.max_message:
                raise self._too_large(_PARSE, end - start)
            return None
        body = bytes(buf[start + 5:end])
        name, _, tail = body.partition(b"\0")
        return end - start, self._named_parse(name, tail)

    def _named_parse(self, name: bytes, tail: bytes) -> bytes:
        """Record the client's statement; returns what goes to the server instead of its Parse."""
        statements = self.statements
        if name in statements:
            # PostgreSQL's answer (PgBouncer closes the connection instead).
            return self._refuse(_error(pq.SQLSTATE_DUPLICATE_PREPARED_STATEMENT, f'prepared statement "{_text(name)}" already exists'))
        if statements.full:
            return self._refuse(_error(
                pq.SQLSTATE_CONFIGURATION_LIMIT_EXCEEDED, f"too many prepared statements on this connection (at most {statements.limit})",
                hint="Close or DEALLOCATE statements no longer needed, or raise the proxy's limit."))
        statement = statement_for(tail)
        if not statements.fits(len(statement.parse_message)):
            return self._refuse(_error(
                pq.SQLSTATE_CONFIGURATION_LIMIT_EXCEEDED,
                f"prepared statements on this connection would hold more than {statements.max_bytes} bytes "
                f"of statement text",
                hint="Close or DEALLOCATE statements no longer needed, or raise the proxy's "
                     "max_tracked_message_size (the limit is 16 times it)."))
        statements.add(name, statement, statement.generation)
        forget = partial(_forget_parse, statements, name, statement)
        entry = self._server.use(statement.server_name)
        if entry is not None and entry.generation >= statement.generation:
            self.stats.reused += 1
            self._requests.append(_Request(_K_PARSE, _SYNTH, _PARSE_COMPLETE_MESSAGE, undo=forget, name=name))
            return b""
        # Not here, or here with a plan from before its result type changed: the server plans it anew.
        return self._prepare(statement, _FORWARD, forget, name, stale=entry)[1]

    def _refuse(self, error: bytes) -> bytes:
        self.stats.refused += 1
        self._requests.append(_Request(_K_PARSE, _REFUSE, error))
        return _REFUSAL_PARSE

    def _bind_verdict(self, buf, start, available, end):
        # Portal name, statement name: each NUL-ended.  A Bind cut by the end of a
        # chunk is held, and searched on from where the last search stopped.
        portal_end, searched = self._held_bind or (-1, 5)
        name_end = -1
        if portal_end < 0:
            found = _find_nul(buf, start + searched, available)
            if found >= 0:
                portal_end, searched = found - start, found - start + 1
        if portal_end >= 0:
            found = _find_nul(buf, start + searched, available)
            if found >= 0:
                name_end = found - start
        if name_end < 0:
            if available < end:
                if available - start > self.max_message:
                    raise self._too_large(_BIND, available - start)
                self._held_bind = (portal_end, available - start)
                return None
            self._held_bind = None
            self._requests.append(_PLAIN[_K_BIND])   # malformed: the server will say so
            return _KEEP
        self._held_bind = None
        portal_end += start
        name_end += start
        name = bytes(buf[portal_end + 1:name_end])
        statement = self.statements.get(name) if name else None
        if statement is None:
            # Unnamed, or never prepared by this client: the server answers as it would directly.
            self._requests.append(_PLAIN[_K_BIND])
            return _KEEP
        generation = self.statements.generation(name)
        if generation < statement.generation:
            entry = self._server.use(statement.server_name)
            if entry is None or entry.generation >= statement.generation:
                # Prepared by this client before its result type changed, and this server connection
                # has only the new plan (or none): PostgreSQL's answer, as if the client's own
                # statement were here (a stale plan here gets it from the server itself, below).
                if available < end:
                    return None
                return end - start, self._refuse(_CACHED_PLAN_ERROR)
        entry, injected = self._ensure_prepared(statement, generation)
        if not injected:
            self.stats.reused += 1
        server_name = statement.server_name
        self._requests.append(_Request(_K_BIND, undo=partial(_heal, self._server, entry, statement),
                                       renamed=(server_name, name)))
        length = end - start - 1 - len(name) + len(server_name)
        head = (pq.BIND + pq.UINT32.pack(length) + bytes(buf[start + 5:portal_end + 1])
                + server_name + b"\0")
        return name_end + 1 - start, injected + head

    def _describe_statement(self, name: bytes) -> bytes:
        statement = self.statements.get(name)
        entry, injected = self._ensure_prepared(statement, self.statements.generation(name))
        self._requests.append(_Request(_K_DESCRIBE, undo=partial(_heal, self._server, entry, statement),
                                       renamed=(statement.server_name, name)))
        return injected + pq.message(pq.DESCRIBE, pq.STATEMENT + statement.server_name + b"\0")

    def _close_statement(self, name: bytes) -> bytes:
        """Only the client's name goes: the server statement stays for other clients."""
        generation = self.statements.generation(name)
        statement = self.statements.remove(name)
        undo = partial(_restore_name, self.statements, name, statement, generation)
        self._requests.append(_Request(_K_CLOSE, _SYNTH, _CLOSE_COMPLETE_MESSAGE, undo=undo))
        return b""

    def _ensure_prepared(self, statement: PreparedStatement, generation: int) -> tuple[CachedStatement, bytes]:
        """The server's entry for ``statement``, and the Parse to inject first if it has none.

        A client name of the current ``generation`` needs the current plan:
        an entry with an older one is closed and prepared again first.
        """
        entry = self._server.use(statement.server_name)
        if entry is not None and (entry.generation >= statement.generation or generation < statement.generation):
            return entry, b""
        self.stats.injected += 1
        return self._prepare(statement, _SWALLOW, stale=entry)

    def _prepare(self, statement: PreparedStatement, action: int, client_undo=None,
                 name=None, stale: CachedStatement | None = None) -> tuple[CachedStatement, bytes]:
        """Send a Parse creating ``statement`` on the server, closing what the limit evicts.

        ``stale``: the server's entry of it with an older plan, closed first.
        Returns the new cache entry and the messages to send.
        """
        server = self._server
        messages = []
        if stale is not None:
            server.discard(stale)
            self._requests.append(_Request(_K_CLOSE, _SWALLOW, undo=partial(_restore_entry, server, stale)))
            messages.append(pq.message(pq.CLOSE, pq.STATEMENT + stale.name + b"\0"))
        entry, evicted = server.add(statement.server_name, statement.generation)
        self.stats.prepared += 1
        undo = partial(_forget_prepare, server, entry, client_undo)
        self._requests.append(_Request(_K_PARSE, action, created=entry, undo=undo, name=name))
        messages.append(statement.parse_message)
        for old in evicted:
            self.stats.evicted += 1
            self._requests.append(_Request(_K_CLOSE, _SWALLOW, undo=partial(_restore_entry, server, old)))
            messages.append(pq.message(pq.CLOSE, pq.STATEMENT + old.name + b"\0"))
        return entry, b"".join(messages)

    # -- server replies -------------------------------------------------------------

    def _reply_verdict(self, t, buf, start, available, end):
        if t == _ERROR:
            if end - start > self.max_message:
                # Too long to hold (a RAISE of a huge text): judged by its first fields, passed on as it is.
                head_end = start + 5 + pq.ERROR_HEAD_SIZE
                if available < head_end:
                    return None
                self._error_sqlstate = pq.parse_error_head(buf[start + 5:head_end]).get("C")
                return _KEEP
            if available < end:
                return None
            self._error_sqlstate = _sqlstate(bytes(buf[start + 5:end]))
            request = self._requests.head()
            if (request is not None and request.action == _REFUSE
                    and self._error_sqlstate == _UNDEFINED_COLUMN):
                return end - start, request.reply
            if (request is not None and request.renamed is not None
                    and self._error_sqlstate == _UNDEFINED_STATEMENT):
                # e.g. the client's own Parse of it failed earlier in the pipeline:
                # PostgreSQL would name the client's statement, not the proxy's.
                server_name, client_name = request.renamed
                body = bytes(buf[start + 5:end]).replace(b'"' + server_name + b'"', b'"' + client_name + b'"')
                return end - start, pq.message(pq.ERROR_RESPONSE, body)
            return _KEEP
        if t == _COMMAND_COMPLETE:
            if end - start - 1 in _DEALLOCATING_LENGTHS:
                if available < end:
                    return None
                self._deallocated = bytes(buf[start + 5:end]) in _DEALLOCATING_TAGS
            return _KEEP
        if t == _PARSE_COMPLETE or t == _CLOSE_COMPLETE:
            request = self._requests.head()
            if request is not None and request.action == _SWALLOW:
                return _DROP
        return _KEEP

    def _reply_done(self, t) -> bytes:
        requests = self._requests
        if t == _READY:
            requests.ready()
        elif t == _ERROR:
            requests.error(self._error_sqlstate)
        elif t == _PARSE_COMPLETE:
            requests.answered(_K_PARSE)
        elif t == _BIND_COMPLETE:
            requests.answered(_K_BIND)
        elif t == _CLOSE_COMPLETE:
            requests.answered(_K_CLOSE)
        elif t == _ROW_DESCRIPTION or t == _NO_DATA:
            requests.answered_if(_K_DESCRIBE)
        elif t == _COPY_IN or t == _COPY_BOTH:
            requests.copy_in_started()
        elif t == _COMMAND_COMPLETE or t == _EMPTY_QUERY or t == _PORTAL_SUSPENDED:
            if self._deallocated:
                self._deallocated = False
                self._forget_all()
            requests.answered_if(_K_EXECUTE)
        requests.advance(True)
        return requests.take_replies()

    def _forget_all(self) -> None:
        """DEALLOCATE ALL or DISCARD ALL ran: the session has no statements left,
        except those whose Parse comes later in the pipeline."""
        self._server.forget_confirmed()
        self.statements.retain({request.name for request in self._requests if request.name})


# Undo actions (module functions, bound with partial: no reference cycle to the relay).

def _forget_parse(statements: ClientStatements, name: bytes, statement: PreparedStatement, _sqlstate) -> None:
    statements.discard(name, statement)


def _forget_prepare(server: ServerStatements, entry: CachedStatement, client_undo, sqlstate) -> None:
    server.discard(entry)
    if client_undo is not None:
        client_undo(sqlstate)


def _restore_name(statements: ClientStatements, name: bytes, statement: PreparedStatement, generation: int,
                  _sqlstate) -> None:
    statements.restore(name, statement, generation)


def _restore_entry(server: ServerStatements, entry: CachedStatement, _sqlstate) -> None:
    server.restore(entry)


def _heal(server: ServerStatements, entry: CachedStatement, statement: PreparedStatement, sqlstate) -> None:
    """A Bind or Describe failed on the server's statement.

    Missing (someone ran DEALLOCATE behind the proxy's back): forget it, so
    the next use prepares it again.  Its plan must not change result type
    (DDL since it was prepared): the statement's generation moves on, so that
    this entry, and every other server connection's entry of the same plan,
    is closed and prepared again at its next Parse by a client (the driver's
    recovery) instead of being answered from the cache.
    """
    if sqlstate == _UNDEFINED_STATEMENT:
        server.discard(entry)
    elif sqlstate == _CACHED_PLAN_CHANGED:
        statement.invalidated(entry)


def _text(name: bytes) -> str:
    return name.decode("utf-8", "replace")
