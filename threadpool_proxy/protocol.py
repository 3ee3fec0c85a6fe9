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

# -- startup packet codes (Int32 length, Int32 code, ...) -----------------------
PROTOCOL_3_0 = 196608          # (3 << 16) | 0
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
MAX_STARTUP_PACKET_LENGTH = 10000   # as PostgreSQL's MAX_STARTUP_PACKET_LENGTH

# -- backend (server -> client) message types -----------------------------------
AUTHENTICATION = b"R"
BACKEND_KEY_DATA = b"K"
COMMAND_COMPLETE = b"C"
ERROR_RESPONSE = b"E"
NOTICE_RESPONSE = b"N"
NOTIFICATION_RESPONSE = b"A"
PARAMETER_STATUS = b"S"
READY_FOR_QUERY = b"Z"
NEGOTIATE_PROTOCOL_VERSION = b"v"

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

# -- ReadyForQuery transaction status -------------------------------------------
IDLE = b"I"
IN_TRANSACTION = b"T"
IN_FAILED_TRANSACTION = b"E"

# -- authentication request codes (Int32 after 'R') -----------------------------
AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

# -- SQLSTATE codes used by the proxy ------------------------------------------
SQLSTATE_PROTOCOL_VIOLATION = "08P01"
SQLSTATE_CONNECTION_FAILURE = "08006"
SQLSTATE_CANNOT_CONNECT = "08001"
SQLSTATE_INVALID_CATALOG_NAME = "3D000"
SQLSTATE_INVALID_PASSWORD = "28P01"
SQLSTATE_INVALID_AUTHORIZATION = "28000"
SQLSTATE_FEATURE_NOT_SUPPORTED = "0A000"
SQLSTATE_TOO_MANY_CONNECTIONS = "53300"
SQLSTATE_ADMIN_SHUTDOWN = "57P01"
SQLSTATE_QUERY_CANCELED = "57014"

_int32 = struct.Struct("!i")
_uint32 = struct.Struct("!I")


class ProtocolError(Exception):
    """The peer sent bytes that are not valid PostgreSQL protocol."""


# -- builders -------------------------------------------------------------------

def message(type_byte: bytes, body: bytes = b"") -> bytes:
    """Frame a body: type byte, Int32 length (including itself), body."""
    return type_byte + _uint32.pack(len(body) + 4) + body


def _cstr(text: str) -> bytes:
    return text.encode("utf-8") + b"\0"


def startup_message(params: dict) -> bytes:
    """StartupMessage: Int32 len, Int32 196608, (name NUL value NUL)*, NUL."""
    body = _int32.pack(PROTOCOL_3_0) + b"".join(
        _cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _int32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: bytes) -> bytes:
    """CancelRequest: Int32 16, Int32 80877102, Int32 pid, Int32 secret key."""
    return _int32.pack(16) + _int32.pack(CANCEL_REQUEST_CODE) + _int32.pack(pid) + secret


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
    return message(BACKEND_KEY_DATA, _int32.pack(pid) + secret)


def ready_for_query(status: bytes = IDLE) -> bytes:
    return message(READY_FOR_QUERY, status)


def authentication(code: int, payload: bytes = b"") -> bytes:
    return message(AUTHENTICATION, _int32.pack(code) + payload)


AUTHENTICATION_OK = authentication(AUTH_OK)


def query(sql: str) -> bytes:
    return message(QUERY, _cstr(sql))


def negotiate_protocol_version(newest_minor: int, unsupported: list[str]) -> bytes:
    body = _int32.pack(newest_minor) + _int32.pack(len(unsupported)) + b"".join(_cstr(o) for o in unsupported)
    return message(NEGOTIATE_PROTOCOL_VERSION, body)


TERMINATE_MESSAGE = message(TERMINATE)


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


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, value, _ = bytes(body).split(b"\0", 2)
    return name.decode("utf-8", "replace"), value.decode("utf-8", "replace")


def parse_backend_key_data(body: bytes) -> tuple[int, bytes]:
    return _int32.unpack_from(body, 0)[0], bytes(body[4:])


def parse_auth_code(body: bytes) -> int:
    if len(body) < 4:
        raise ProtocolError("truncated Authentication message")
    return _int32.unpack_from(body, 0)[0]


# -- stream scanners --------------------------------------------------------------
#
# The relay forwards whole recv() chunks.  A scanner is fed each chunk and keeps
# just enough state to find the next message header in the following chunk:
# ``_skip`` bytes of a message body still to pass over, or ``_carry``, the start
# of a message that straddles the chunk edge and whose bytes we need (a header
# cut in two, or the body of a message type the scanner looks into).

class _Scanner:
    __slots__ = ("_skip", "_carry")

    #: message types whose whole body the scanner wants (set per subclass)
    WANTED = b""

    def __init__(self) -> None:
        self._skip = 0
        self._carry = None

    @property
    def at_boundary(self) -> bool:
        """True when the bytes fed so far end exactly at a message boundary."""
        return self._skip == 0 and self._carry is None

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
        unpack = _uint32.unpack_from
        while True:
            if pos + 5 > n:
                if pos < n:
                    self._carry = bytearray(buf[pos:n])
                return
            t = buf[pos]
            length = unpack(buf, pos + 1)[0]
            if length < 4:
                raise ProtocolError(f"invalid message length {length}")
            end = pos + 1 + length
            if t in wanted:
                if end > n:
                    self._carry = bytearray(buf[pos:n])
                    return
                self._message(t, buf, pos + 5, end)
            else:
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
        total = 1 + _uint32.unpack_from(carry, 1)[0]
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
        need = total - len(carry)
        take = min(need, n - pos)
        carry += buf[pos:pos + take]
        if take < need:
            return -1
        self._carry = None
        self._message(t, carry, 5, total)
        return pos + take

    def _header(self, t: int) -> None:
        """A message of an unwanted type ``t`` started (body not looked at)."""

    def _message(self, t: int, buf, start: int, end: int) -> None:
        """A whole message of a wanted type: body is ``buf[start:end]``."""


class ServerScanner(_Scanner):
    """Follows the server -> client stream, counting ReadyForQuery messages.

    After ``feed``: ``ready`` is the number of ReadyForQuery seen since the
    caller last reset it, ``status`` the last transaction status byte (an int),
    and ``parameters`` collects (name, value) of every ParameterStatus seen.
    """

    __slots__ = ("ready", "status", "parameters", "errors", "copy_in")
    WANTED = b"ZSE"

    def __init__(self) -> None:
        super().__init__()
        self.ready = 0
        self.status = IDLE[0]
        self.parameters: list[tuple[str, str]] = []
        self.errors = 0
        self.copy_in = False      # CopyInResponse/CopyBothResponse seen, no ReadyForQuery since

    def _header(self, t):
        if t == 71 or t == 87:    # 'G' CopyInResponse, 'W' CopyBothResponse
            self.copy_in = True

    def _message(self, t, buf, start, end):
        if t == 90:       # 'Z' ReadyForQuery
            self.ready += 1
            self.status = buf[start]
            self.copy_in = False
        elif t == 83:     # 'S' ParameterStatus
            self.parameters.append(parse_parameter_status(buf[start:end]))
        else:             # 'E' ErrorResponse
            self.errors += 1


class ClientScanner(_Scanner):
    """Follows the client -> server stream.

    Counts the requests that each get one ReadyForQuery back (Query, Sync,
    FunctionCall) in ``requests``; ``unsynced`` is True while extended-protocol
    messages were sent after the last Sync (the server holds state for them);
    ``terminated`` is set once a Terminate message was seen.
    """

    __slots__ = ("requests", "unsynced", "terminated")
    WANTED = b""

    # Q=81 S=83 F=70 ; extended: P=80 B=66 D=68 E=69 C=67 H=72 ; X=88
    def __init__(self) -> None:
        super().__init__()
        self.requests = 0
        self.unsynced = False
        self.terminated = False

    def _header(self, t):
        if t == 81 or t == 70:
            self.requests += 1
        elif t == 83:
            self.requests += 1
            self.unsynced = False
        elif t == 88:
            self.terminated = True
        elif t in b"PBDEC":       # not Flush (H): it leaves no state behind (psycopg sends Sync+Flush)
            self.unsynced = True
