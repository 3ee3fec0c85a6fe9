"""The peer channel between worker processes (``workers: N``), as PgBouncer's ``peers``.

Each worker listens on a private unix socket, ``peer-<index>-<pid>.sock`` in
a directory only the proxy's user can enter (the supervisor makes it, mode
0700).  During a rolling restart (workers.py) a worker's successor has the
same index: the old one renames its socket ``retired-<index>-<pid>.sock`` as
it starts to leave, so questions go to the successor while cancels of the old
one's clients still reach it.  Two kinds of request arrive there, both framed
like a startup packet (int32 length, int32 code):

* a CancelRequest, the raw 16 bytes a client sent to whichever worker the
  kernel gave its connection: the worker that owns the key (its index is
  encoded in the secret, cancelkeys.py) cancels as if the client had come to it;
* a query (``PEER_QUERY_CODE``, then a JSON object): the admin console's and
  the metrics endpoint's questions to the other workers (their SHOW rows, their
  figures, a PAUSE), answered with an int32 length and a JSON value.

The channel never carries a password or a server's secret; a CancelRequest
carries what the client sent.  A peer that does not answer within
``PEER_TIMEOUT`` (restarting, stuck) is left out of the answer and logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import socketserver
import threading

from . import protocol as pq
from .logs import get_logger

log = get_logger(__name__)

#: Not a PostgreSQL request code (those are 1234 << 16 | small numbers); only peers send it.
PEER_QUERY_CODE = 1234 << 16 | 7777

#: Seconds a worker waits for a peer's answer (connect, send, the whole reply).
PEER_TIMEOUT = 5.0

#: Largest peer message accepted either way.
MAX_PEER_MESSAGE = 64 << 20

#: The index of a slot that is not a worker: the supervisor, which asks every worker.
SUPERVISOR = -1

_SOCKET_NAME = re.compile(r"(peer|retired)-(\d+)-(\d+)\.sock")


@dataclasses.dataclass(frozen=True)
class WorkerSlot:
    """Which worker this process is, how many there are, and where their peer sockets are."""

    index: int
    count: int
    rundir: str

    def path(self, pid: int | None = None, retired: bool = False) -> str:
        """This worker's socket (``pid``: this process's), or the name it takes when it retires."""
        name = f"{'retired' if retired else 'peer'}-{self.index}-{pid or os.getpid()}.sock"
        return os.path.join(self.rundir, name)

    def sockets(self) -> list[tuple[str, int, int, str]]:
        """(kind, index, pid, path) of every worker socket in the directory but this process's."""
        found = []
        try:
            names = os.listdir(self.rundir)
        except OSError:
            return []
        me = os.getpid()
        for name in names:
            match = _SOCKET_NAME.fullmatch(name)
            if match and int(match.group(3)) != me:
                found.append((match.group(1), int(match.group(2)), int(match.group(3)),
                              os.path.join(self.rundir, name)))
        return found

    def owners(self, index: int) -> dict[int, str]:
        """pid -> socket of each process of worker ``index``: usually one; two while it is being replaced."""
        return {pid: path for _, i, pid, path in self.sockets() if i == index}

    def others(self) -> dict[int, str]:
        """index -> socket of every other worker that is not retiring (the newest if two claim one)."""
        newest: dict[int, tuple[int, str]] = {}
        for kind, index, _, path in self.sockets():
            if kind != "peer" or index == self.index:
                continue
            try:
                made = os.stat(path).st_mtime_ns
            except OSError:
                continue
            if index not in newest or made > newest[index][0]:
                newest[index] = (made, path)
        return {index: path for index, (_, path) in sorted(newest.items())}


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


class _PeerHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock, server = self.request, self.server
        sock.settimeout(PEER_TIMEOUT)
        try:
            head = _recv_exact(sock, 8)
            length, code = pq.INT32.unpack_from(head, 0)[0], pq.INT32.unpack_from(head, 4)[0]
            if code == pq.CANCEL_REQUEST_CODE and length == 16:
                body = _recv_exact(sock, 8)
                server.proxy.cancel_here(pq.INT32.unpack_from(body, 0)[0], body[4:8])
            elif code == PEER_QUERY_CODE and 8 <= length <= MAX_PEER_MESSAGE:
                request = json.loads(_recv_exact(sock, length - 8))
                answer = json.dumps(server.proxy.peer_query(request)).encode()
                sock.sendall(pq.INT32.pack(len(answer)) + answer)
            else:
                log.warning("peer channel: ignoring a request with code %d, length %d", code, length)
        except (OSError, ValueError, ConnectionError) as exc:
            log.warning("peer channel: request failed: %s", exc)


class PeerListener(socketserver.ThreadingUnixStreamServer):
    """This worker's end of the peer channel; ``proxy`` is its ProxyServer."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, slot: WorkerSlot, proxy) -> None:
        self.proxy = proxy
        self.slot = slot
        self.path = slot.path()
        try:
            os.unlink(self.path)     # a killed process of the same pid left it (pids are reused)
        except FileNotFoundError:
            pass
        super().__init__(self.path, _PeerHandler)

    def handle_error(self, request, client_address) -> None:
        log.exception("peer channel: unhandled error")

    def retire(self) -> None:
        """A successor took this worker's index: questions go to it from now on, cancels still come here."""
        retired = self.slot.path(retired=True)
        try:
            os.rename(self.path, retired)
            self.path = retired
        except OSError as exc:
            log.warning("peer channel: cannot rename %s: %s", self.path, exc)

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Peers:
    """Talking to the other workers: forwarding a cancel, asking a question of each."""

    def __init__(self, slot: WorkerSlot) -> None:
        self.slot = slot

    @staticmethod
    def _connect(path: str, timeout: float | None = PEER_TIMEOUT) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(PEER_TIMEOUT)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(timeout)
        return sock

    def forward_cancel(self, index: int, packet: bytes, only_if_any: bool = False) -> bool:
        """Hand a client's CancelRequest (16 bytes) to worker ``index``, which owns its key.

        While that worker is being replaced both processes of the index get it:
        the one that does not know the key ignores it.  False (logged unless
        ``only_if_any``) when no process of that index runs.
        """
        owners = self.slot.owners(index)
        if not owners:
            if not only_if_any:
                log.warning("could not forward a cancel request to worker %d: it is not running", index)
            return False
        for pid, path in owners.items():
            try:
                self._send_cancel(path, packet)
            except FileNotFoundError:
                # It retired between the listing and the connect (PeerListener.retire renamed its
                # socket): its clients are still there, so the cancel goes to the socket's new name.
                path = self.slot.owners(index).get(pid)
                if path is None:
                    continue          # the process is gone, and its clients with it
                try:
                    self._send_cancel(path, packet)
                except OSError as exc:
                    log.warning("could not forward a cancel request to worker %d: %s", index, exc)
            except OSError as exc:
                log.warning("could not forward a cancel request to worker %d: %s", index, exc)
        return True

    def _send_cancel(self, path: str, packet: bytes) -> None:
        with self._connect(path) as sock:
            sock.sendall(packet)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)      # closed once the owner has sent it on: the cancel is not lost in a race

    def ask(self, index: int, request: dict, timeout: float | None = PEER_TIMEOUT):
        """Worker ``index``'s answer to ``request``; raises OSError/ValueError if it gives none.

        ``timeout`` None: as long as it takes (PAUSE waits for running transactions).
        """
        path = self.slot.others().get(index)
        if path is None:
            raise ConnectionError(f"worker {index} is not running")
        return self._ask(path, request, timeout)

    def _ask(self, path: str, request: dict, timeout: float | None):
        body = json.dumps(request).encode()
        with self._connect(path, timeout) as sock:
            sock.sendall(pq.INT32.pack(len(body) + 8) + pq.INT32.pack(PEER_QUERY_CODE) + body)
            length = pq.INT32.unpack(_recv_exact(sock, 4))[0]
            if not 0 <= length <= MAX_PEER_MESSAGE:
                raise ValueError(f"peer answer of {length} bytes")
            return json.loads(_recv_exact(sock, length))

    def ask_all(self, request: dict, timeout: float | None = PEER_TIMEOUT) -> dict[int, object]:
        """Every other worker's answer, asked at once; index -> answer (workers that gave none left out)."""
        answers: dict[int, object] = {}

        def one(index: int, path: str) -> None:
            try:
                answers[index] = self._ask(path, request, timeout)
            except (OSError, ValueError, ConnectionError) as exc:
                log.warning("worker %d did not answer %s: %s", index, request.get("kind"), exc)

        threads = [threading.Thread(target=one, args=(i, path), name=f"threadpool_proxy-ask-{i}", daemon=True)
                   for i, path in self.slot.others().items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return answers
