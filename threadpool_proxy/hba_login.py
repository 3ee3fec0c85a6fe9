"""The login's side of ``auth_type: hba`` and ``cert``: the method of the client's HBA line, and the
checks that need its socket (peer: SO_PEERCRED; cert: the verified TLS client certificate).

hba.py reads the file and matches lines without sockets; login.py asks here
which method applies and runs the password methods itself.
"""

from __future__ import annotations

import logging
import pwd
import socket
import struct

from . import protocol as pq
from . import tls
from .errors import ClientFatal
from .hba import HbaRules, IdentMap, refusal
from .listeners import UNIX_HOST

log = logging.getLogger(__name__)


def hba_method(rules: HbaRules, sock, request) -> str | None:
    """The password method the client's HBA line names (md5, scram-sha-256, password), or None when the
    line lets it in without one (trust, or peer/cert checked here).

    ClientFatal 28000 in PostgreSQL's words when no line fits, the line is
    ``reject``, or a peer or cert check fails.  ``request`` is the LoginRequest.
    """
    local = request.address[0] == UNIX_HOST
    secure = tls.is_tls(sock)
    address = None if local else request.address[0]
    replication = bool(request.replication)
    rule = rules.match(local, secure, address, request.database, request.user, replication)
    if rule is None or rule.method == "reject":
        log.info("client %s: refused by %s%s", request.who, rules.path,
                 f" line {rule.line} (reject)" if rule else ": no line fits")
        raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION,
                          refusal(local, secure, address, request.database, request.user, rule is not None,
                                  replication))
    if rule.method == "trust":
        return None
    if rule.method == "peer":
        check_peer(sock, request, rule.map, rules.ident)
        return None
    if rule.method == "cert":
        check_cert(sock, request, rule.map, rules.ident)
        return None
    return rule.method


def peer_os_user(sock) -> str | None:
    """The OS user at the other end of a unix socket (SO_PEERCRED), or None if it cannot be told."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return pwd.getpwuid(uid).pw_name


def check_peer(sock, request, ident_map: str | None, ident: IdentMap) -> None:
    """The OS user at the other end of the unix socket must be the user, or mapped to it by ``ident_map``."""
    user = request.user
    try:
        system_user = peer_os_user(sock)
    except (OSError, KeyError, AttributeError) as exc:
        log.info("client %s: peer authentication: cannot tell the OS user: %s", request.who, exc)
        system_user = None
    ok = system_user is not None and (ident.allows(ident_map, system_user, user) if ident_map
                                      else system_user == user)
    if not ok:
        log.info("client %s: peer authentication failed: OS user %s%s", request.who, system_user,
                 f" (map {ident_map})" if ident_map else "")
        raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION, f'Peer authentication failed for user "{user}"')


def check_cert(sock, request, ident_map: str | None, ident: IdentMap | None) -> None:
    """A TLS client certificate, verified against client_tls_ca_file, whose common name is the user
    (or mapped to it by ``ident_map``).  Returns None (the client is in) or raises ClientFatal 28000."""
    user = request.user
    cert = sock.getpeercert() if tls.is_tls(sock) else None
    if not cert:
        raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION, "connection requires a valid client certificate")
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    name = names[0] if names else None
    ok = name is not None and (ident.allows(ident_map, name, user) if ident_map and ident is not None
                               else name == user)
    if not ok:
        log.info("client %s: certificate authentication failed: common name %r", request.who, name)
        raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION, f'certificate authentication failed for user "{user}"')
    return None
