"""Telling systemd (``Type=notify``) that the proxy is ready, or stopping: sd_notify without libsystemd.

The protocol is one datagram of ``KEY=value`` lines to the unix socket named
by ``$NOTIFY_SOCKET``: a path, or a name in the abstract namespace when it
starts with ``@`` (the ``@`` stands for a NUL byte).  ``READY=1`` once the
proxy listens (systemd then starts units ordered after it), ``STOPPING=1``
when a stop begins.  The variable is read once and removed from the
environment, so worker processes never speak for the service (systemd's
default ``NotifyAccess=main`` would ignore them anyway).  Not under systemd,
nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """The service manager's socket, if there is one; ``send`` never raises."""

    def __init__(self, address: str | None) -> None:
        self.address = address          # as for socket.connect: a path, or "\0name"

    @classmethod
    def from_environment(cls, environ=os.environ) -> "Notifier":
        """The socket of ``$NOTIFY_SOCKET`` (the variable is removed); a Notifier that sends nothing without it."""
        name = environ.pop("NOTIFY_SOCKET", "")
        if not name:
            return cls(None)
        if name.startswith("@"):
            return cls("\0" + name[1:])
        if name.startswith("/"):
            return cls(name)
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract socket name (@...): systemd is not told "
                    "when the proxy is ready", name)
        return cls(None)

    def send(self, *lines: str) -> bool:
        """One datagram of ``lines`` (``"READY=1"``, ``"STATUS=..."``); True if it was sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(lines).encode())
            return True
        except OSError as exc:
            log.warning("could not notify the service manager (%s): %s", lines[0] if lines else "", exc)
            return False
