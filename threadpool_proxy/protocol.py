"""The PostgreSQL wire vocabulary (protocol 3.0), with no socket I/O.

Constants are spelled as in the protocol documentation, builders return whole
framed messages as bytes, parsers take a message body, and the two stream
scanners follow message boundaries through chunks of a byte stream so that the
relay can forward raw chunks while knowing where each message starts.

Message layout, both directions after startup:
    Byte1   message type
    Int32   length of the rest of the message, including these four bytes
    Byte[n] body
"""

from __future__ import annotations

import struct

from .errors import ProtocolError

#: The databases a startup packet names to reach the admin console: ours, and the one PgBouncer's tools ask for.
CONSOLE_DATABASES = ("threadpool_proxy", "pgbouncer")

# -- startup packet codes (Int32 length, Int32 code, ...) -----------------------
PROTOCOL_3_0 = 196608          # (3 << 16) | 0
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
MAX_STARTUP_PACKET_LENGTH = 10000   # as PostgreSQL's MAX_STARTUP_PACKET_LENGTH
MAX_AUTH_MESSAGE = 65535            # longest password/SASL message (PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH)

#: Default of ``max_tracked_message_size``: the longest message the proxy holds in
#: memory to look into (a named Parse, Describe or Close, a Bind up to the end of
#: its names, a server's ErrorResponse, ParameterStatus or NotificationResponse).
#: PostgreSQL itself refuses messages over 1 GB; what the proxy must hold is far smaller.
MAX_HELD_MESSAGE = 1 << 20
#: How much of a longer ErrorResponse the proxy reads to judge it: PostgreSQL sends
#: the S (severity), V (severity, not localised) and C (SQLSTATE) fields first.
ERROR_HEAD_SIZE = 1024

# -- backend (server -> client) message types -----------------------------------
AUTHENTICATION = b"R"
BACKEND_KEY_DATA = b"K"
BIND_COMPLETE = b"2"
CLOSE_COMPLETE = b"3"
COMMAND_COMPLETE = b"C"
COPY_IN_RESPONSE = b"G"
COPY_OUT_RESPONSE = b"H"
COPY_BOTH_RESPONSE = b"W"
DATA_ROW = b"D"
EMPTY_QUERY_RESPONSE = b"I"
ERROR_RESPONSE = b"E"
FUNCTION_CALL_RESPONSE = b"V"
NEGOTIATE_PROTOCOL_VERSION = b"v"
NO_DATA = b"n"
NOTICE_RESPONSE = b"N"
NOTIFICATION_RESPONSE = b"A"
PARAMETER_DESCRIPTION = b"t"
PARAMETER_STATUS = b"S"
PARSE_COMPLETE = b"1"
PORTAL_SUSPENDED = b"s"
READY_FOR_QUERY = b"Z"
ROW_DESCRIPTION = b"T"

# -- frontend (client -> server) message types ----------------------------------
QUERY = b"Q"
PARSE = b"P"
BIND = b"B"
DESCRIBE = b"D"
EXECUTE = b"E"
CLOSE = b"C"
FLUSH = b"H"
SYNC = b"S"
FUNCTION_CALL = b"F"
COPY_DATA = b"d"
COPY_DONE = b"c"
COPY_FAIL = b"f"
PASSWORD_MESSAGE = b"p"   # also SASLInitialResponse and SASLResponse
TERMINATE = b"X"

# Describe/Close targets
STATEMENT = b"S"
PORTAL = b"P"

# -- ReadyForQuery transaction status -------------------------------------------
IDLE = b"I"
IN_TRANSACTION = b"T"
IN_FAILED_TRANSACTION = b"E"

# -- authentication request codes (the Int32 after 'R') -------------------------
AUTH_OK = 0
AUTH_KERBEROS_V5 = 2
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5          # payload: Byte4 salt
AUTH_GSS = 7
AUTH_GSS_CONTINUE = 8
AUTH_SSPI = 9
AUTH_SASL = 10                 # payload: String mechanism, ..., terminated by an empty String
AUTH_SASL_CONTINUE = 11        # payload: SCRAM server-first
AUTH_SASL_FINAL = 12           # payload: SCRAM server-final

#: the requests a client answers with a PasswordMessage/SASLResponse
AUTH_NEEDS_ANSWER = (AUTH_CLEARTEXT_PASSWORD, AUTH_MD5_PASSWORD, AUTH_SASL, AUTH_SASL_CONTINUE)

# -- error severities and SQLSTATE codes used by the proxy ----------------------
FATAL = "FATAL"
ERROR = "ERROR"
SEVERITIES_ENDING_THE_CONNECTION = ("FATAL", "PANIC")

SQLSTATE_PROTOCOL_VIOLATION = "08P01"
SQLSTATE_CONNECTION_FAILURE = "08006"
SQLSTATE_CANNOT_CONNECT = "08001"
SQLSTATE_INVALID_CATALOG_NAME = "3D000"
SQLSTATE_INVALID_PASSWORD = "28P01"
SQLSTATE_INVALID_AUTHORIZATION = "28000"
SQLSTATE_FEATURE_NOT_SUPPORTED = "0A000"
SQLSTATE_TOO_MANY_CONNECTIONS = "53300"
SQLSTATE_INSUFFICIENT_RESOURCES = "53000"
SQLSTATE_ADMIN_SHUTDOWN = "57P01"
SQLSTATE_CRASH_SHUTDOWN = "57P02"
SQLSTATE_CANNOT_CONNECT_NOW = "57P03"
SQLSTATE_QUERY_CANCELED = "57014"
SQLSTATE_IDLE_SESSION_TIMEOUT = "57P05"
SQLSTATE_IDLE_IN_TRANSACTION_TIMEOUT = "25P03"
SQLSTATE_UNDEFINED_OBJECT = "42704"
SQLSTATE_SYNTAX_ERROR = "42601"
SQLSTATE_INSUFFICIENT_PRIVILEGE = "42501"
SQLSTATE_CANT_CHANGE_RUNTIME_PARAM = "55P02"
SQLSTATE_UNDEFINED_COLUMN = "42703"
SQLSTATE_INVALID_SQL_STATEMENT_NAME = "26000"      # e.g. prepared statement "x" does not exist
SQLSTATE_DUPLICATE_PREPARED_STATEMENT = "42P05"
SQLSTATE_CONFIGURATION_LIMIT_EXCEEDED = "53400"
SQLSTATE_PROGRAM_LIMIT_EXCEEDED = "54000"
SQLSTATE_INTERNAL_ERROR = "XX000"
SQLSTATE_OBJECT_NOT_IN_STATE = "55000"

# -- integer fields (network byte order) ----------------------------------------
INT16 = struct.Struct("!h")
INT32 = struct.Struct("!i")
UINT32 = struct.Struct("!I")

# -- builders -------------------------------------------------------------------

def message(type_byte: bytes, body: bytes = b"") -> bytes:
    """Frame a body: type byte, Int32 length (including itself), body."""
    return type_byte + UINT32.pack(len(body) + 4) + body


def _cstr(text: str) -> bytes:
    return text.encode("utf-8") + b"\0"


def startup_message(params: dict) -> bytes:
    """StartupMessage: Int32 len, Int32 196608, (name NUL value NUL)*, NUL."""
    body = INT32.pack(PROTOCOL_3_0) + b"".join(
        _cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return INT32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: bytes) -> bytes:
    """CancelRequest: Int32 16, Int32 80877102, Int32 pid, Int32 secret key."""
    return INT32.pack(16) + INT32.pack(CANCEL_REQUEST_CODE) + INT32.pack(pid) + secret


def ssl_request() -> bytes:
    """SSLRequest: asks the server for TLS before the StartupMessage; it answers one byte, 'S' or 'N'."""
    return INT32.pack(8) + INT32.pack(SSL_REQUEST_CODE)


def error_response(sqlstate: str, text: str, severity: str = "FATAL",
                   detail: str | None = None, hint: str | None = None) -> bytes:
    """ErrorResponse with S/V (severity), C (SQLSTATE), M (message), D, H fields."""
    fields = [b"S" + _cstr(severity), b"V" + _cstr(severity), b"C" + _cstr(sqlstate), b"M" + _cstr(text)]
    if detail:
        fields.append(b"D" + _cstr(detail))
    if hint:
        fields.append(b"H" + _cstr(hint))
    return message(ERROR_RESPONSE, b"".join(fields) + b"\0")


def parameter_status(name: str, value: str) -> bytes:
    return message(PARAMETER_STATUS, _cstr(name) + _cstr(value))


def backend_key_data(pid: int, secret: bytes) -> bytes:
    return message(BACKEND_KEY_DATA, INT32.pack(pid) + secret)


def ready_for_query(status: bytes = IDLE) -> bytes:
    return message(READY_FOR_QUERY, status)


def authentication(code: int, payload: bytes = b"") -> bytes:
    return message(AUTHENTICATION, INT32.pack(code) + payload)


AUTHENTICATION_OK = authentication(AUTH_OK)


def query(sql: str) -> bytes:
    return message(QUERY, _cstr(sql))


def command_complete(tag: str) -> bytes:
    return message(COMMAND_COMPLETE, _cstr(tag))


def password_message(body: bytes) -> bytes:
    """PasswordMessage / SASLInitialResponse / SASLResponse: the body is the caller's."""
    return message(PASSWORD_MESSAGE, body)


def extended_query(sql: str, params: list[str]) -> bytes:
    """Parse/Bind/Execute/Sync of the unnamed statement with text parameters.

    Parse: String name, String query, Int16 n types.  Bind: String portal,
    String statement, Int16 n formats, Int16 n params, (Int32 len, bytes)*,
    Int16 n result formats.  Execute: String portal, Int32 max rows (0: all).
    """
    parse = message(PARSE, b"\0" + _cstr(sql) + INT16.pack(0))
    values = b"".join(INT32.pack(len(v)) + v for v in (p.encode("utf-8") for p in params))
    bind = message(BIND, b"\0\0" + INT16.pack(0) + INT16.pack(len(params)) + values + INT16.pack(0))
    return parse + bind + message(EXECUTE, b"\0" + INT32.pack(0)) + SYNC_MESSAGE


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    body = INT32.pack(newest_minor) + INT32.pack(len(unsupported)) + b"".join(_cstr(o) for o in unsupported)
    return message(NEGOTIATE_PROTOCOL_VERSION, body)


def error_response_from_fields(fields: dict, severity: str) -> bytes:
    """An ErrorResponse with every field of ``fields`` (as parse_error_fields gives them),
    but with severity ``severity``: e.g. a server's ERROR that ends the client's connection."""
    fields = dict(fields, S=severity, V=severity) if "V" in fields else dict(fields, S=severity)
    return message(ERROR_RESPONSE, b"".join(k.encode("ascii") + _cstr(v) for k, v in fields.items()) + b"\0")


TERMINATE_MESSAGE = message(TERMINATE)
SYNC_MESSAGE = message(SYNC)
READY_FOR_QUERY_SIZE = 6          # 'Z', Int32 5, status byte


def trailing_ready_for_query(buf, n: int) -> int:
    """Where a ReadyForQuery that ends ``buf[:n]`` starts; ``n`` if the chunk does not end with one."""
    start = n - READY_FOR_QUERY_SIZE
    if start >= 0 and buf[start] == _READY_FOR_QUERY and UINT32.unpack_from(buf, start + 1)[0] == 5:
        return start
    return n


# -- parsers (take a message body) ----------------------------------------------

def parse_startup_params(body: bytes) -> dict:
    """Name/value pairs of a StartupMessage body after the protocol code."""
    parts = bytes(body).split(b"\0")
    # a well-formed list ends with the pair terminator and the list terminator
    if len(parts) < 2 or parts[-1] != b"" or parts[-2] != b"" or len(parts) % 2 != 0:
        raise ProtocolError("invalid startup packet layout: expected name/value pairs ending in a NUL")
    params = {}
    try:
        for i in range(0, len(parts) - 2, 2):
            name = parts[i].decode("utf-8")
            if not name:
                raise ProtocolError("invalid startup packet layout: empty parameter name")
            params[name] = parts[i + 1].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid startup packet: parameters are not valid UTF-8") from None
    return params


def parse_error_fields(body: bytes) -> dict:
    """ErrorResponse/NoticeResponse body -> {field code char: text}."""
    fields = {}
    for part in bytes(body).split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def parse_error_head(head: bytes) -> dict:
    """The fields of the first bytes of an ErrorResponse/NoticeResponse body that are
    whole (those up to its last NUL): S, V and C of a long error, which PostgreSQL sends first."""
    head = bytes(head)
    return parse_error_fields(head[:head.rfind(b"\0") + 1])


def ends_connection(fields: dict) -> bool:
    """True for an error the server closes the connection after (FATAL, PANIC)."""
    return fields.get("V", fields.get("S")) in SEVERITIES_ENDING_THE_CONNECTION


def parse_data_row(body: bytes) -> list[bytes | None]:
    """DataRow: Int16 n columns, then (Int32 length or -1 for NULL, Byte[length]) per column."""
    (n,) = INT16.unpack_from(body, 0)
    pos, values = 2, []
    for _ in range(n):
        (length,) = INT32.unpack_from(body, pos)
        pos += 4
        if length < 0:
            values.append(None)
        else:
            values.append(bytes(body[pos:pos + length]))
            pos += length
    return values


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, value, _ = bytes(body).split(b"\0", 2)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    return INT32.unpack_from(body, 0)[0], bytes(body[4:])


def parse_auth_code(body: bytes) -> int:
    if len(body) < 4:
        raise ProtocolError("truncated Authentication message")
    return INT32.unpack_from(body, 0)[0]


# -- stream scanners --------------------------------------------------------------
#
# The relay forwards whole recv() chunks.  A scanner is fed each chunk and keeps
# just enough state to find the next message header in the following chunk:
# ``_skip`` bytes of a message body still to pass over, or ``_carry``, the start
# of a message that straddles the chunk edge and whose bytes we need (a header
# cut in two, or the body of a message type the scanner looks into).

# Message types as the ints a scanner sees when it indexes a buffer.
_READY_FOR_QUERY = READY_FOR_QUERY[0]
_IDLE = IDLE[0]
_PARAMETER_STATUS = PARAMETER_STATUS[0]
_COPY_IN_RESPONSE = COPY_IN_RESPONSE[0]
_COPY_BOTH_RESPONSE = COPY_BOTH_RESPONSE[0]
_NOTIFICATION_RESPONSE = NOTIFICATION_RESPONSE[0]
_QUERY = QUERY[0]
_PARSE = PARSE[0]
_BIND = BIND[0]
_FUNCTION_CALL = FUNCTION_CALL[0]
_SYNC = SYNC[0]
_TERMINATE = TERMINATE[0]
_LEAVES_UNSYNCED_STATE = frozenset(PARSE + BIND + DESCRIBE + EXECUTE + CLOSE)   # not Flush: see ClientScanner
#: The other message types PostgreSQL takes from a logged-in client (COPY messages
#: outside COPY are ignored); any other type gets FATAL 08P01 "invalid frontend
#: message type N" and the connection closes (postgres.c, SocketBackend).
_OTHER_FRONTEND_TYPES = frozenset(FLUSH + COPY_DATA + COPY_DONE + COPY_FAIL)


class _Scanner:
    __slots__ = ("_skip", "_carry", "limit")

    #: message types whose whole body the scanner wants (set per subclass)
    WANTED = b""
    #: message types whose header ``_header`` hears of (None: every type not WANTED); a type
    #: left out costs no call per message
    HEADERS = None
    #: a message type (an int) whose cut by the end of a chunk ``_cut`` hears of (-1: none)
    CUT_WATCH = -1

    def __init__(self, limit: int = MAX_HELD_MESSAGE) -> None:
        self._skip = 0
        self._carry = None
        #: the longest body of a wanted message held whole; a longer one is shown to
        #: ``_oversized`` by its first ERROR_HEAD_SIZE bytes and the rest skipped
        self.limit = limit

    def reset(self) -> None:
        """Forget everything fed so far (the stream starts again at a message boundary)."""
        self.__init__(self.limit)

    @property
    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly at a message boundary."""
        return self._skip == 0 and self._carry is None

    def _held_length(self, total: int) -> int:
        """How much of a wanted message of ``total`` bytes (type byte included) is held."""
        return total if total - 5 <= self.limit else min(total, 5 + ERROR_HEAD_SIZE)

    def feed(self, buf, n: int) -> None:
        """Scan ``buf[:n]`` (a bytearray or memoryview), calling ``_message``."""
        pos = 0
        if self._carry is not None:
            pos = self._continue_carry(buf, n)
            if pos < 0:
                return
        elif self._skip:
            if self._skip >= n:
                self._skip -= n
                return
            pos = self._skip
            self._skip = 0
        wanted = self.WANTED
        headers = self.HEADERS
        unpack = UINT32.unpack_from
        while True:
            if pos + 5 > n:
                if pos < n:
                    self._carry = bytearray(buf[pos:n])
                    if buf[pos] == self.CUT_WATCH:
                        self._cut(n - pos)
                return
            t = buf[pos]
            length = unpack(buf, pos + 1)[0]
            if length < 4:
                raise ProtocolError(f"invalid message length {length}")
            end = pos + 1 + length
            if t in wanted:
                held = pos + self._held_length(1 + length)
                if held > n:
                    self._carry = bytearray(buf[pos:n])
                    if t == self.CUT_WATCH:
                        self._cut(n - pos)
                    return
                if held == end:
                    self._message(t, buf, pos + 5, end)
                else:
                    self._oversized(t, buf, pos + 5, held, length - 4)
                    if end > n:
                        self._skip = end - n
                        return
            else:
                if headers is None or t in headers:
                    self._header(t)
                if end > n:
                    self._skip = end - n
                    return
            pos = end
            if pos == n:
                return

    def _continue_carry(self, buf, n: int) -> int:
        """Complete the carried message from the new chunk; return where to resume (-1: chunk used up)."""
        carry = self._carry
        if len(carry) < 5:
            take = min(5 - len(carry), n)
            carry += buf[:take]
            if len(carry) < 5:
                return -1
            pos = take
        else:
            pos = 0
        t = carry[0]
        total = 1 + UINT32.unpack_from(carry, 1)[0]
        if total < 5:
            raise ProtocolError("invalid message length")
        if t not in self.WANTED:
            self._carry = None
            self._header(t)
            remaining = total - len(carry)
            if remaining > n - pos:
                self._skip = remaining - (n - pos)
                return -1
            return pos + remaining
        held = self._held_length(total)
        need = held - len(carry)
        take = min(need, n - pos)
        carry += buf[pos:pos + take]
        if take < need:
            return -1
        self._carry = None
        pos += take
        if held == total:
            self._message(t, carry, 5, total)
            return pos
        self._oversized(t, carry, 5, held, total - 5)
        rest = total - held
        if rest > n - pos:
            self._skip = rest - (n - pos)
            return -1
        return pos + rest

    def carry_need(self) -> int:
        """Bytes still missing from a message cut by the end of the last chunk (its
        header first, then the rest); 0 when the last chunk ended between messages
        or inside the body of a message the scanner skips."""
        carry = self._carry
        if carry is None:
            return 0
        if len(carry) < 5:
            return 5 - len(carry)
        return self._held_length(1 + UINT32.unpack_from(carry, 1)[0]) - len(carry)

    def _cut(self, held: int) -> None:
        """A message of type CUT_WATCH starts in the last ``held`` bytes of the chunk and goes on after it."""

    def _header(self, t: int) -> None:
        """A message of an unwanted type ``t`` started (body not looked at)."""

    def _message(self, t: int, buf, start: int, end: int) -> None:
        """A whole message of a wanted type: body is ``buf[start:end]``."""

    def _oversized(self, t: int, buf, start: int, end: int, size: int) -> None:
        """A wanted message whose body (``size`` bytes) is longer than ``limit``: its first
        bytes are ``buf[start:end]``, the rest is skipped.  A protocol violation unless
        the subclass knows better."""
        raise ProtocolError(f"message of type {chr(t)!r} is {size} bytes long, more than the "
                            f"{self.limit} bytes the proxy holds (max_tracked_message_size)")


class ServerScanner(_Scanner):
    """Follows the server -> client stream, counting ReadyForQuery messages.

    After ``feed``: ``ready`` is the number of ReadyForQuery seen since the
    caller last reset it, ``xacts`` those of them with status idle (each ends
    a transaction: statistics), ``status`` the last transaction status byte
    (an int), and ``parameters`` collects (name, value) of every ParameterStatus seen.
    ``errors`` counts ErrorResponses; ``fatal`` is set by one of severity
    FATAL or PANIC (the server closes the connection after it, having said why).

    ``notified`` lists every NotificationResponse of the chunk, for the relay to
    rewrite its sender pid: the offset of the pid field in the chunk (a whole
    message), or minus the number of bytes at the chunk's end where one starts
    that the chunk does not hold whole (``carry_need`` says what is missing).
    Empty, so one falsy check per chunk, whenever the server sent no NOTIFY.
    """

    __slots__ = ("ready", "xacts", "status", "parameters", "errors", "copy_in", "fatal", "notified")
    WANTED = READY_FOR_QUERY + PARAMETER_STATUS + ERROR_RESPONSE + NOTIFICATION_RESPONSE
    HEADERS = COPY_IN_RESPONSE + COPY_BOTH_RESPONSE
    CUT_WATCH = _NOTIFICATION_RESPONSE

    def __init__(self, limit: int = MAX_HELD_MESSAGE) -> None:
        super().__init__(limit)
        self.ready = 0
        self.xacts = 0
        self.status = IDLE[0]
        self.parameters: list[tuple[str, str]] = []
        self.errors = 0
        self.copy_in = False      # CopyInResponse/CopyBothResponse seen, no ReadyForQuery since
        self.fatal = False        # an ErrorResponse that ends the connection was seen
        self.notified: list[int] = []

    def _cut(self, held):
        self.notified.append(-held)

    def _header(self, t):
        if t == _COPY_IN_RESPONSE or t == _COPY_BOTH_RESPONSE:
            self.copy_in = True

    def _message(self, t, buf, start, end):
        if t == _READY_FOR_QUERY:
            self.ready += 1
            self.status = status = buf[start]
            if status == _IDLE:
                self.xacts += 1
            self.copy_in = False
        elif t == _PARAMETER_STATUS:
            self.parameters.append(parse_parameter_status(buf[start:end]))
        elif t == _NOTIFICATION_RESPONSE:
            self.notified.append(start)
        else:             # ErrorResponse (rare: its fields are worth parsing)
            self.errors += 1
            if ends_connection(parse_error_fields(buf[start:end])):
                self.fatal = True

    def _oversized(self, t, buf, start, end, size):
        """A long ErrorResponse (a RAISE of a huge message) is judged by its first fields and
        passes on whole, unparsed; a long ReadyForQuery, ParameterStatus or NotificationResponse
        is no PostgreSQL's (its values are short: a notification's payload is under 8000 bytes)."""
        if t != ERROR_RESPONSE[0]:
            super()._oversized(t, buf, start, end, size)
        self.errors += 1
        if ends_connection(parse_error_head(buf[start:end])):
            self.fatal = True


class ClientScanner(_Scanner):
    """Follows the client -> server stream.

    Counts the requests that each get one ReadyForQuery back (Query, Sync,
    FunctionCall) in ``requests``; ``unsynced`` is True while extended-protocol
    messages were sent after the last Sync (the server holds state for them);
    ``terminated`` is set once a Terminate message was seen, or a message of a
    type no PostgreSQL server takes from a logged-in client: then ``invalid``
    is that type (an int; -1 while there is none) and nothing of the chunk
    should be relayed.
    """

    __slots__ = ("requests", "unsynced", "terminated", "extended", "invalid")
    WANTED = b""
    #: SQL texts worth a look (StatementScanner); none here
    looked = ()

    def __init__(self, limit: int = MAX_HELD_MESSAGE) -> None:
        super().__init__(limit)
        self.requests = 0
        self.unsynced = False
        self.terminated = False
        self.extended = 0         # extended-protocol messages seen (Parse, Bind, Describe, Execute, Close)
        self.invalid = -1

    def _header(self, t):
        if t == _QUERY or t == _FUNCTION_CALL:
            self.requests += 1
        elif t == _SYNC:
            self.requests += 1
            self.unsynced = False
        elif t == _TERMINATE:
            self.terminated = True
        elif t in _LEAVES_UNSYNCED_STATE:   # not Flush: it leaves no state behind (psycopg sends Sync+Flush)
            self.unsynced = True
            self.extended += 1
        elif t not in _OTHER_FRONTEND_TYPES and self.invalid < 0:
            self.invalid = t
            self.terminated = True


#: The longest Query or Parse message whose SQL text a StatementScanner looks at.
MAX_LOOKED_MESSAGE = 256 * 1024


class StatementScanner(ClientScanner):
    """A ClientScanner that also shows each Query's and Parse's SQL text to ``worth_a_look``.

    For pooled clients (transaction and statement mode), whose statements may
    create session state (sessionstate.py).  ``worth_a_look(buf, start, end)``
    is the cheap test of the text ``buf[start:end]``; the texts it passes are
    collected in ``looked`` as (message type, text bytes, message start,
    message end, statement name), the offsets in the chunk just fed, or -1
    for a message that began in an earlier chunk.  A named statement the
    caller ``watch``es is seen again at each Bind of it, as (BIND, b"", -1,
    -1, name): a prepared statement runs again without its text.  A Query or
    Parse longer than MAX_LOOKED_MESSAGE (or than ``limit``, if less) is counted
    in ``unseen`` and not looked at (the scanner never gathers more than its
    first ERROR_HEAD_SIZE bytes: ``_oversized``).
    """

    __slots__ = ("worth_a_look", "plain", "looked", "unseen", "_carried", "WANTED", "watched")

    def __init__(self, worth_a_look, plain=None, limit: int = MAX_HELD_MESSAGE) -> None:
        super().__init__(min(limit, MAX_LOOKED_MESSAGE))
        self.worth_a_look = worth_a_look
        # plain(buf, start, end): a match reaching ``end`` clears a Query's text at once (the
        # hot path: no call of worth_a_look)
        self.plain = plain
        self.looked: list = []
        self.unseen = 0
        self._carried = False
        self.WANTED = QUERY + PARSE        # and BIND once a statement is watched
        self.watched: set = set()

    def watch(self, name: bytes) -> None:
        """Report the Binds of named statement ``name`` from now on."""
        self.watched.add(name)
        self.WANTED = QUERY + PARSE + BIND

    def _continue_carry(self, buf, n: int) -> int:
        self._carried = True
        try:
            return super()._continue_carry(buf, n)
        finally:
            self._carried = False

    def reset(self) -> None:
        """Forget everything fed so far; the watched statement names stay."""
        watched, wanted = self.watched, self.WANTED
        self.__init__(self.worth_a_look, self.plain, self.limit)
        self.watched, self.WANTED = watched, wanted

    def _oversized(self, t, buf, start, end, size):
        """A Query or Parse too long to be looked at is counted in ``unseen`` (and as the
        request it is); a long Bind is judged by its head, which holds its names."""
        if t == _BIND:
            self._message(t, buf, start, end)
            return
        self.unseen += 1
        ClientScanner._header(self, t)

    def _message(self, t, buf, start, end):
        name = b""
        if t == _QUERY:
            self.requests += 1
            text, text_start, text_end = buf, start, end - 1       # String: the text, then its NUL
            plain = self.plain
            if plain is not None:
                m = plain(buf, start, text_end)
                if m is not None and m.end() == text_end:
                    return
        else:                                                      # Parse: String name, String query, ...
            self.unsynced = True                                   # Bind: String portal, String name, ...
            self.extended += 1
            if t == _BIND:
                head = bytes(buf[start:min(end, start + 256)])
                portal_end = head.find(0)
                name_end = head.find(0, portal_end + 1)
                if portal_end >= 0 and name_end > portal_end + 1 and head[portal_end + 1:name_end] in self.watched:
                    self.looked.append((t, b"", -1, -1, head[portal_end + 1:name_end]))
                return
            text = bytes(buf[start:end])
            text_start = text.find(0) + 1
            text_end = text.find(0, text_start)
            if text_start == 0 or text_end < 0:
                return                                             # malformed: the server says so
            name = text[:text_start - 1]
        if self.worth_a_look(text, text_start, text_end):
            where = -1 if self._carried else start - 5
            self.looked.append((t, bytes(text[text_start:text_end]), where, end, name))
