"""The metrics endpoint's HTTP server: one GET per connection, within a deadline, a few at a time.

Why not prometheus_client's ``start_http_server``: its threads read a request
with no timeout and it takes every connection, so a client that connects and
sends nothing (or a byte a second) keeps a thread and a file descriptor, both
shared with the proxy's clients, for as long as it likes, and a few thousand
of them exhaust the proxy.  A Prometheus scrape is one small request answered
with one page, so this is not a general HTTP server:

* Each connection gets ``timeout`` seconds in all (``metrics_timeout``) to send
  its request head (at most MAX_HEAD bytes) and to take the whole answer; a
  slow one is closed at the deadline, however it trickles.
* At most ``max_connections`` (``metrics_max_connections``) are served at once,
  each in its own thread; the accepting thread answers any more with ``503
  Service Unavailable`` at once (without reading their request) and closes them,
  so they cost no thread and keep no descriptor.
* One request per connection (``Connection: close``); GET or HEAD of ``/metrics``
  (or ``/``), and of ``/ready`` and ``/live`` when the server is given a
  ``readiness`` (readiness.py: 200 or 503 with the reason); anything else gets
  404 or 405.  The readiness answers obey the same deadline and cap (a probe
  beyond the cap gets 503, which a load balancer reads as not ready: keep
  ``metrics_max_connections`` above the number of probers).

There is no authentication: whoever can connect can read the metrics (database
and user names, counters).  Bind ``metrics_listen`` to loopback or a private
network, or put an authenticating proxy in front.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from email.utils import formatdate

log = logging.getLogger(__name__)

#: The most bytes of request line and headers read; a scrape sends a few hundred.
MAX_HEAD = 8192

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             head_only: bool = False, extra: str = "") -> bytes:
    """A whole HTTP/1.1 response that ends the connection."""
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nDate: {formatdate(usegmt=True)}\r\nConnection: close\r\n{extra}\r\n")
    return head.encode("ascii") + (b"" if head_only else body)


#: What a connection beyond the cap gets, sent without waiting (it fits any socket buffer).
BUSY = response(503, b"too many metrics connections; try again\n", extra="Retry-After: 1\r\n")


def read_head(sock: socket.socket, deadline: float) -> bytes | None:
    """The request line and headers, read by ``deadline``; None if the client was too slow,
    closed, or sent more than MAX_HEAD bytes without ending them."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            end = buf.find(b"\n\n")
        if end >= 0:
            return bytes(buf[:end])
        if len(buf) > MAX_HEAD:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except OSError:                 # (socket.timeout too)
            return None
        if not chunk:
            return None
        buf += chunk


def parse_head(head: bytes) -> tuple[str, str, dict]:
    """(method, path without query, {lower-case header name: value}); ValueError if malformed."""
    lines = head.decode("latin-1").splitlines()
    method, target, version = lines[0].split(" ")
    if not version.startswith("HTTP/"):
        raise ValueError("not HTTP")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return method, target.split("?", 1)[0], headers


class BoundedHTTPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """Serves ``render(accept_header) -> (content type, body)`` at /metrics; see the module docstring.

    ``readiness`` (optional): an object with ``ready()`` and ``live()``, each
    returning (ok, why), answering ``/ready`` and ``/live`` (200 or 503).

    ``limits()`` returns (timeout seconds, most connections at once); it is
    asked at each connection, so a RELOAD of the settings applies to the next.
    ``served``, ``refused`` (over the cap) and ``cut`` (too slow) count connections.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 16

    def __init__(self, address, render, limits, readiness=None) -> None:
        self._render = render
        self._limits = limits
        self._readiness = readiness
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._lock = threading.Lock()
        self.active = 0
        self.served = self.refused = self.cut = 0
        super().__init__(address, socketserver.BaseRequestHandler)

    # -- socketserver's steps ----------------------------------------------------------

    def process_request(self, request, client_address) -> None:
        """In the accepting thread: a thread for the connection, or 503 at once when at the cap."""
        _, most = self._limits()
        with self._lock:
            busy = self.active >= most
            if not busy:
                self.active += 1
            else:
                self.refused += 1
        if busy:
            try:
                request.setblocking(False)
                request.send(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._lock:
                self.active -= 1
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self.active -= 1

    def finish_request(self, request, client_address) -> None:
        timeout, _ = self._limits()
        self.answer(request, time.monotonic() + timeout)

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics connection from %s failed", client_address[0], exc_info=True)

    # -- one request ------------------------------------------------------------------------

    def answer(self, sock: socket.socket, deadline: float) -> None:
        head = read_head(sock, deadline)
        if head is None:
            with self._lock:
                self.cut += 1
            return                      # too slow, gone, or no end to its headers: just close
        try:
            method, path, headers = parse_head(head)
        except (ValueError, IndexError):
            self._send(sock, response(400, b"bad request\n"), deadline)
            return
        if method not in ("GET", "HEAD"):
            self._send(sock, response(405, b"only GET\n", extra="Allow: GET, HEAD\r\n"), deadline)
            return
        if self._readiness is not None and path in ("/ready", "/live"):
            self._send(sock, self._probe(path, method == "HEAD"), deadline)
            return
        if path not in ("/metrics", "/"):
            self._send(sock, response(404, b"the metrics are at /metrics\n"), deadline)
            return
        try:
            content_type, body = self._render(headers.get("accept", ""))
        except Exception:
            log.exception("metrics: collecting failed")
            self._send(sock, response(500, b"collecting the metrics failed; see the proxy log\n"), deadline)
            return
        if self._send(sock, response(200, body, content_type, head_only=method == "HEAD"), deadline):
            with self._lock:
                self.served += 1

    def _probe(self, path: str, head_only: bool) -> bytes:
        """The answer to /ready or /live: 200 or 503, the reason as the body, never cached."""
        try:
            ok, why = self._readiness.ready() if path == "/ready" else self._readiness.live()
        except Exception as exc:          # a question a worker could not answer: not ready, and why
            log.exception("%s failed", path)
            ok, why = False, f"{path} failed: {exc}"
        with self._lock:
            self.served += 1
        return response(200 if ok else 503, (why + "\n").encode(), head_only=head_only,
                        extra="Cache-Control: no-store\r\n")

    def _send(self, sock: socket.socket, data: bytes, deadline: float) -> bool:
        """The whole answer by ``deadline`` (sendall's timeout bounds it in all); False if not."""
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError()
            sock.settimeout(left)
            sock.sendall(data)
            return True
        except OSError:
            with self._lock:
                self.cut += 1
            return False
