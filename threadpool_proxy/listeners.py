"""The proxy's listening sockets: TCP addresses (a list, ``*``, IPv6, host names) and the unix socket.

``open_listeners`` binds everything ``listen`` names before the server
serves, or raises OSError having closed what it opened: a proxy never runs
with half of its addresses.  The unix socket is PostgreSQL's and PgBouncer's
``<unix_socket_dir>/.s.PGSQL.<port>``, so ``psql -h <dir> -p <port>`` finds
it; a socket file left by a proxy that died is replaced, one that answers
is not (another proxy is using it).

Clients of the unix socket are named ``("unix", <port>)`` (what PgBouncer's
SHOW CLIENTS shows); TLS is never offered there.  ``tune_client`` gives
accepted TCP connections TCP_NODELAY and the keepalive settings; the same
keepalive settings apply to server connections (backend.py).
"""

from __future__ import annotations

import dataclasses
import errno
import grp
import ipaddress
import os
import socket
import stat

#: The address (first item of a client's address pair) of a client of the unix socket, as
#: PgBouncer's SHOW CLIENTS shows it; the second item is the listening port.
UNIX_HOST = "unix"

#: listen(2) backlog of every listening socket.
BACKLOG = 1024


def unix_socket_path(directory: str, port: int) -> str:
    """Where PostgreSQL clients look for a server on ``port`` in ``directory``."""
    return os.path.join(directory, f".s.PGSQL.{port}")


def tcp_addresses(hosts: str, port: int) -> list[tuple[int, str]]:
    """(family, address) to bind for ``listen.host``: a list, ``*`` (every IPv4 and IPv6 address), names.

    A name is every address it resolves to (``localhost``: 127.0.0.1 and
    ::1); an address given twice is bound once.  "" gives none (no TCP).
    """
    out: list[tuple[int, str]] = []
    for part in (p.strip() for p in hosts.split(",")):
        if not part:
            continue
        if part == "*":
            found = [(socket.AF_INET, "0.0.0.0")]
            if socket.has_ipv6 and _ipv6_works():
                found.append((socket.AF_INET6, "::"))
        else:
            literal = part[1:-1] if part.startswith("[") and part.endswith("]") else part
            try:
                ip = ipaddress.ip_address(literal)
                found = [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, literal)]
            except ValueError:
                infos = socket.getaddrinfo(part, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
                found = [(family, sockaddr[0]) for family, _, _, _, sockaddr in infos
                         if family in (socket.AF_INET, socket.AF_INET6)]
        for item in found:
            if item not in out:
                out.append(item)
    return out


def _ipv6_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
            return True
    except OSError:
        return False


def bind_tcp(family: int, address: str, port: int, reuseport: bool = False) -> socket.socket:
    """A listening TCP socket; an IPv6 one takes IPv6 only, so ``*`` binds 0.0.0.0 and :: side by side."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_unix(directory: str, port: int, mode: int = 0o777, group: str | None = None) -> socket.socket:
    """A listening unix socket ``<directory>/.s.PGSQL.<port>`` with ``mode`` and ``group``.

    A socket file nobody answers on (a proxy that died) is removed first; one
    that answers raises OSError(EADDRINUSE).
    """
    path = unix_socket_path(directory, port)
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise OSError(errno.EINVAL, f"unix_socket_group: no group {group!r}") from None
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if gid != -1:
            os.chown(path, -1, gid)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    return sock


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)               # nobody answers: left by a proxy that died
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")


@dataclasses.dataclass
class Listeners:
    """The sockets a server accepts on: ``tcp`` ones, then the ``unix`` one (or None)."""

    tcp: list
    unix: socket.socket | None
    port: int
    unix_path: str | None = None
    _unix_inode: int | None = None

    @property
    def all(self) -> list:
        return self.tcp + ([self.unix] if self.unix is not None else [])

    def describe(self) -> str:
        """``127.0.0.1:6432, [::1]:6432, /tmp/.s.PGSQL.6432`` for the log."""
        names = []
        for sock in self.tcp:
            host, port = sock.getsockname()[:2]
            names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        if self.unix_path:
            names.append(self.unix_path)
        return ", ".join(names)

    def close(self) -> None:
        """Close every socket; remove the unix socket file if it is still the one made here."""
        for sock in self.all:
            try:
                sock.close()
            except OSError:
                pass
        if self.unix_path is not None:
            try:
                if os.lstat(self.unix_path).st_ino == self._unix_inode:
                    os.unlink(self.unix_path)
            except OSError:
                pass
            self.unix_path = None


def open_listeners(config, reuseport: bool = False, unix: bool = True) -> Listeners:
    """Bind every TCP address of ``listen.host`` (one port for all: the first one bound picks it when
    ``listen.port`` is 0) and, with ``unix``, the unix socket; OSError with nothing left open."""
    port = config.listen_port
    opened: list = []
    try:
        for family, address in tcp_addresses(config.listen_host, port):
            sock = bind_tcp(family, address, port, reuseport)
            opened.append(sock)
            port = sock.getsockname()[1]
        unix_sock = path = inode = None
        if unix and config.unix_socket_dir:
            if port == 0:
                raise OSError(errno.EINVAL, "listen.port 0 with no TCP address: the unix socket needs a port")
            unix_sock = bind_unix(config.unix_socket_dir, port, config.unix_socket_mode, config.unix_socket_group)
            path = unix_socket_path(config.unix_socket_dir, port)
            inode = os.lstat(path).st_ino
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    if not opened and unix_sock is None:
        raise OSError(errno.EINVAL, "nothing to listen on (listen.host is empty and no unix_socket_dir)")
    return Listeners(opened, unix_sock, port, path, inode)


def adopt_listeners(socks, port: int) -> Listeners:
    """Listeners over sockets made elsewhere (a worker's, made and kept by its supervisor): ``socks``
    is one socket or several, TCP ones and at most one unix socket.  The unix socket's file is
    the maker's to remove: closing these never unlinks it."""
    socks = [socks] if isinstance(socks, socket.socket) else list(socks)
    tcp = [sock for sock in socks if sock.family != socket.AF_UNIX]
    unix = [sock for sock in socks if sock.family == socket.AF_UNIX]
    if not socks or len(unix) > 1:
        raise OSError(errno.EINVAL, "a worker needs its listening sockets: TCP ones and at most one unix socket")
    path = unix[0].getsockname() if unix else None
    return Listeners(tcp, unix[0] if unix else None, tcp[0].getsockname()[1] if tcp else port, path or None)


def tune_client(sock: socket.socket, config) -> None:
    """An accepted TCP client: TCP_NODELAY and the keepalive settings (nothing for a unix socket)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_keepalive(sock, config)
    except OSError:
        pass


def set_keepalive(sock: socket.socket, config) -> None:
    """tcp_keepalive (SO_KEEPALIVE) and tcp_keepidle/tcp_keepintvl/tcp_keepcnt where set (0: the OS default)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if config.tcp_keepalive else 0)
    if not config.tcp_keepalive:
        return
    for option, value in ((getattr(socket, "TCP_KEEPIDLE", None), config.tcp_keepidle),
                          (getattr(socket, "TCP_KEEPINTVL", None), config.tcp_keepintvl),
                          (getattr(socket, "TCP_KEEPCNT", None), config.tcp_keepcnt)):
        if option is not None and value:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
