"""The exceptions that cross module boundaries, under one base.

Every one of them ends (at most) one client's connection: a ClientSession
catches ``ProxyError`` in one place (``ClientSession.run``) and decides there
what, if anything, to tell the client before closing.  Nothing here imports
another module of the package, so every module may raise them.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of the errors that end one client's connection in a known way."""


class ClientFatal(ProxyError):
    """End the client's connection with this FATAL ErrorResponse.

    ``raw``, when given, is the framed ErrorResponse to send as is (a server's
    own error, kept whole); otherwise one is built from the other fields.
    """

    def __init__(self, sqlstate: str, text: str, detail: str | None = None, hint: str | None = None,
                 raw: bytes | None = None):
        super().__init__(text)
        self.sqlstate = sqlstate
        self.detail = detail
        self.hint = hint
        self.raw = raw


class ClientGone(ProxyError):
    """The client closed its connection or broke the protocol beyond answering."""


class ErrorAlreadySent(ProxyError):
    """The client was already told why its connection ends (e.g. the server's own FATAL)."""


class ProtocolError(ProxyError):
    """The peer sent bytes that are not valid PostgreSQL protocol."""


class ServerGone(ProxyError):
    """The server connection closed or failed."""


class ServerError(ProxyError):
    """The server answered with an ErrorResponse; ``fields`` holds its fields, ``raw`` the framed message."""

    def __init__(self, fields: dict, raw: bytes) -> None:
        super().__init__(fields.get("M", "server error"))
        self.fields = fields
        self.raw = raw


class PoolTimeout(ProxyError):
    """No server connection became free within the wait limit."""


class TooManyPending(ProxyError):
    """As many pass-through logins as ``max_pending_logins_total`` allows are still authenticating."""


class PoolClosed(ProxyError):
    """The pool was closed (the proxy is shutting down)."""


class ServerUnavailable(ClientFatal):
    """The server cannot take a new connection now (down, restarting, shutting down).

    Worth trying again later: a client between transactions waits for the
    server (``server_login_retry`` paces the attempts) instead of failing.
    """


class NodeDown(ProxyError):
    """The node a checkout chose went down while it waited: choose another (several nodes only)."""


class QueryCanceled(ProxyError):
    """A CancelRequest ended the client's wait for a server connection.

    Nothing of the request was sent: the relay drops it, answers it with
    ``raw`` (ErrorResponse 57014 and ReadyForQuery, what PostgreSQL answers a
    canceled query) and the client stays connected.
    """

    def __init__(self, raw: bytes = b"") -> None:
        super().__init__("canceling statement due to user request")
        self.raw = raw


class MessageTooLarge(ClientFatal):
    """A client message the proxy must hold whole (or up to its names) to look into is
    longer than ``max_tracked_message_size``: the client is ended with 54000."""


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range (config.py, pgbouncer_ini.py)."""
