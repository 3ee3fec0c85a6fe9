"""The proxy's listening sockets: TCP addresses (lists, ``*``, IPv6) and the unix socket.

(Filled in by the unix-socket and listen_addr work; for now the name clients
of the unix socket go by.)
"""

from __future__ import annotations

#: The address (first item of a client's address pair) of a client of the unix socket, as
#: PgBouncer's SHOW CLIENTS shows it; the second item is the listening port.
UNIX_HOST = "unix"
