"""TLS on both sides: the contexts built from the configuration, the client's
handshake (after an SSLRequest, or PostgreSQL 17's direct TLS), the server's
SSLRequest, and the data SCRAM channel binding binds to.

The sslmode names and meanings are PgBouncer's:

  client_tls_sslmode  disable      SSLRequest is answered 'N'
                      allow/prefer TLS when the client asks for it, plain text otherwise
                      require      a client that does not ask for TLS is refused (28000)
                      verify-ca    as require, and the client must present a certificate
                      verify-full  signed by client_tls_ca_file (both the same, as in PgBouncer)
  server_tls_sslmode  disable      no SSLRequest is sent
                      allow        no SSLRequest is sent (the proxy never retries in TLS)
                      prefer       SSLRequest first; plain text if the server says 'N'
                      require      TLS or no connection; the certificate is not checked,
                                   unless server_tls_ca_file is given: then as verify-ca
                      verify-ca    the certificate must be signed by server_tls_ca_file
                      verify-full  ... and name the host of the database entry

The server side follows libpq's rules for sslrootcert: verify-ca and verify-full
need server_tls_ca_file (there is no silent fall-back to the system's roots,
which would let any publicly signed certificate pass verify-ca); ``system``
names the system's roots and is allowed with verify-full only; and a CA file
given with require makes it verify-ca (config.py checks the first two).

Once wrapped, an ``ssl.SSLSocket`` stays in blocking mode like a plain one (the
relay polls its descriptor).  Two things differ, and every reader of a TLS
socket must mind them: bytes OpenSSL has already decrypted do not make the
descriptor readable (``SSLSocket.pending()``), and ``recv`` takes no flags, so
a peek at the raw bytes goes through ``raw_peek`` (the socket module's own
``recv`` on the same descriptor).
"""

from __future__ import annotations

import hashlib
import os
import socket
import ssl

from . import protocol as pq
from .config import SYSTEM_CA, Config, ConfigError, check_tls_files
from .errors import ClientFatal, ServerGone
from .logs import get_logger

log = get_logger(__name__)

#: What PostgreSQL 17 clients negotiate (ALPN) for direct TLS and after an SSLRequest.
ALPN_PROTOCOL = "postgresql"

#: The first byte of a TLS handshake record: a direct TLS client's ClientHello.
#: A startup packet starts with its length, whose first byte is always 0.
TLS_HANDSHAKE_BYTE = 0x16

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_raw_recv = socket.socket.recv        # the plain recv, also on an SSLSocket (whose own recv takes no flags)
_raw_shutdown = socket.socket.shutdown  # SSLSocket.shutdown() drops the TLS layer, and a last word with it


def is_tls(sock) -> bool:
    return isinstance(sock, ssl.SSLSocket)


def raw_peek(sock: socket.socket, n: int = 1) -> bytes:
    """Peek at the bytes on the wire, under any TLS layer; never blocks (BlockingIOError if none)."""
    return _raw_recv(sock, n, _PEEK)


def shutdown(sock: socket.socket, how: int) -> None:
    """shutdown() of the descriptor that keeps an SSLSocket's TLS layer (so it can still say goodbye)."""
    _raw_shutdown(sock, how)


def _load_chain(ctx: ssl.SSLContext, cert_key: str, key_key: str, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"{cert_key}, {key_key}: cannot use {cert} with {key}: "
                          f"{exc.reason or exc.strerror or exc}") from None
    except OSError as exc:
        raise ConfigError(f"{cert_key}: cannot read {cert} or {key}: {exc.strerror or exc}") from None


def _load_ca(ctx: ssl.SSLContext, ca_key: str, ca_file: str) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{ca_key}: cannot use {ca_file}: "
                          f"{getattr(exc, 'reason', None) or exc.strerror or exc}") from None


def _context(mode: str, protocol) -> tuple[str, bool, ssl.SSLContext]:
    """(mode, whether it insists on TLS, a context for TLS 1.2 and newer)."""
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return mode, mode in ("require", "verify-ca", "verify-full"), ctx


# -- the client side: the proxy is the TLS server -----------------------------------

class ClientTLS:
    """TLS with clients: the context, the mode, and the certificate hash for channel binding."""

    def __init__(self, config: Config) -> None:
        self.mode, self.required, ctx = _context(config.client_tls_sslmode, ssl.PROTOCOL_TLS_SERVER)
        _load_chain(ctx, "client_tls_cert_file", "client_tls_key_file",
                    config.client_tls_cert_file, config.client_tls_key_file)
        if self.mode in ("verify-ca", "verify-full"):
            _load_ca(ctx, "client_tls_ca_file", config.client_tls_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols([ALPN_PROTOCOL])
        ctx.num_tickets = 0              # no session resumption: nothing to send after the handshake
        self.context = ctx
        self.end_point_hash = certificate_end_point_hash(_first_certificate(config.client_tls_cert_file))


def _first_certificate(path: str) -> bytes:
    """The DER bytes of the first certificate of a PEM file (the proxy's own)."""
    with open(path, encoding="ascii", errors="replace") as f:
        text = f.read()
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ConfigError(f"client_tls_cert_file: no PEM certificate in {path}")
    return ssl.PEM_cert_to_DER_cert(text[start:stop + len(end)])


# -- tls-server-end-point (RFC 5929): the hash of the server's certificate ----------

# Signature algorithm OIDs -> the hash tls-server-end-point uses (MD5 and SHA-1 become SHA-256).
_SIGNATURE_HASHES = {
    "1.2.840.113549.1.1.4": "sha256", "1.2.840.113549.1.1.5": "sha256",     # md5/sha1WithRSA
    "1.2.840.113549.1.1.11": "sha256", "1.2.840.113549.1.1.12": "sha384",   # sha256/384WithRSA
    "1.2.840.113549.1.1.13": "sha512", "1.2.840.113549.1.1.14": "sha256",   # sha512/224WithRSA
    "1.2.840.10045.4.1": "sha256", "1.2.840.10045.4.3.1": "sha256",         # ecdsa-with-SHA1/224
    "1.2.840.10045.4.3.2": "sha256", "1.2.840.10045.4.3.3": "sha384",       # ecdsa-with-SHA256/384
    "1.2.840.10045.4.3.4": "sha512",
    "1.2.840.10040.4.3": "sha256", "2.16.840.1.101.3.4.3.2": "sha256",      # dsa-with-sha1/sha256
}


def _der_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER item at ``pos``."""
    tag = data[pos]
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos:pos + count], "big")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return tag, pos, pos + length


def _oid(data: bytes) -> str:
    first = data[0]
    parts = [str(min(first // 40, 2)), str(first - 40 * min(first // 40, 2))]
    value = 0
    for b in data[1:]:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(str(value))
            value = 0
    return ".".join(parts)


def signature_algorithm(der: bytes) -> str:
    """The OID of a certificate's signatureAlgorithm (Certificate = SEQUENCE {tbs, algorithm, signature})."""
    _, body, _ = _der_item(der, 0)
    _, _, tbs_end = _der_item(der, body)
    _, alg, _ = _der_item(der, tbs_end)
    tag, oid_start, oid_end = _der_item(der, alg)
    if tag != 0x06:
        raise ValueError("no OID in signatureAlgorithm")
    return _oid(der[oid_start:oid_end])


def certificate_end_point_hash(der: bytes) -> bytes | None:
    """tls-server-end-point channel-binding data for a certificate; None when its algorithm has no
    defined hash (RSASSA-PSS, Ed25519: PostgreSQL cannot bind to those either)."""
    try:
        name = _SIGNATURE_HASHES.get(signature_algorithm(der))
    except (ValueError, IndexError):
        return None
    return hashlib.new(name, der).digest() if name else None


# -- the server side: the proxy is the TLS client -----------------------------------

class ServerTLS:
    """TLS with PostgreSQL servers: SSLRequest before the StartupMessage, by server_tls_sslmode."""

    def __init__(self, config: Config) -> None:
        self.mode, self.required, ctx = _context(config.server_tls_sslmode, ssl.PROTOCOL_TLS_CLIENT)
        ca_file = config.server_tls_ca_file
        #: whether every TLS connection's certificate chain is checked
        self.verifies = self.mode in ("verify-ca", "verify-full") or (self.mode == "require" and bool(ca_file))
        if self.verifies:
            if ca_file == SYSTEM_CA:
                ctx.load_default_certs()         # (verify-full only: config.py)
            else:
                _load_ca(ctx, "server_tls_ca_file", ca_file)
            ctx.check_hostname = self.mode == "verify-full"
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if config.server_tls_cert_file:
            _load_chain(ctx, "server_tls_cert_file", "server_tls_key_file",
                        config.server_tls_cert_file, config.server_tls_key_file)
        ctx.set_alpn_protocols([ALPN_PROTOCOL])
        self.context = ctx

    def negotiate(self, sock: socket.socket, host: str, port: int) -> socket.socket:
        """Send SSLRequest on a freshly connected socket (with its connect timeout) and wrap it.

        Returns the SSLSocket, or ``sock`` itself when the server said 'N' and
        the mode lets the proxy go on in plain text.  A server that will not
        or cannot do TLS as configured is a ClientFatal (08001): trying again
        would not help; a connection that fails meanwhile is ServerGone.
        """
        where = f"{host}:{port}"
        try:
            sock.sendall(pq.ssl_request())
            answer = sock.recv(1)
        except OSError as exc:
            raise ServerGone(f"server {where} failed during the SSL request: {exc.strerror or exc}") from None
        if answer == b"N":
            if self.required:
                raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT,
                                  f"threadpool_proxy: server {where} does not support TLS, "
                                  f"but server_tls_sslmode is {self.mode}")
            return sock
        if answer != b"S":
            raise ServerGone(f"server {where} answered the SSL request with {answer!r}")
        try:
            return self.context.wrap_socket(sock, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT,
                              f"threadpool_proxy: the certificate of server {where} is not trusted "
                              f"(server_tls_sslmode {self.mode}): {exc.verify_message or exc.reason}") from None
        except ssl.SSLError as exc:
            raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT,
                              f"threadpool_proxy: TLS with server {where} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ServerGone(f"server {where} failed during the TLS handshake: {exc.strerror or exc}") from None


def contexts(config: Config) -> tuple[ClientTLS | None, ServerTLS | None]:
    """Both sides' TLS as configured (None where off); ConfigError for unusable files."""
    check_tls_files(config)
    client = ClientTLS(config) if config.client_tls_sslmode != "disable" else None
    server = ServerTLS(config) if config.server_tls_sslmode not in ("disable", "allow") else None
    if client is not None:
        log.info("client TLS: %s (%s)", client.mode, os.path.basename(config.client_tls_cert_file))
    if server is not None:
        log.info("server TLS: %s", server.mode)
    return client, server
