"""Client connection handling: one client's life from StartupMessage to close.

A ClientSession runs in the client's own thread.  It reads the startup packet
(answering SSLRequest and GSSENCRequest with 'N'), authenticates the client,
then relays bytes both ways until either side leaves, checking a server
connection out of the pool and back in at the boundaries its pool mode allows.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time

from . import protocol as pq
from .backend import ServerConnection, ServerError, ServerGone, valid_guc_name
from .pool import PoolClosed, PoolTimeout

log = logging.getLogger(__name__)

# Buffers are per client thread, so they decide the memory of many idle clients:
# requests are small (16 KiB, COPY IN just takes more reads); the server buffer
# is allocated on the first answer, and grows once if a read fills it.
CLIENT_BUFFER_SIZE = 16 * 1024
SERVER_BUFFER_SIZE = 64 * 1024
SERVER_BUFFER_MAX = 256 * 1024
MAX_AUTH_MESSAGE = 65535

_POLLIN = select.POLLIN


class ClientFatal(Exception):
    """End the client's connection with this FATAL ErrorResponse."""

    def __init__(self, sqlstate: str, text: str, detail: str | None = None, hint: str | None = None):
        super().__init__(text)
        self.response = pq.error_response(sqlstate, text, "FATAL", detail, hint)


class ClientGone(Exception):
    """The client closed its connection or broke the protocol beyond answering."""


class _Done(Exception):
    """Nothing more to say to the client (an error was already sent)."""


def parse_options(options: str) -> dict:
    """The ``-c name=value`` / ``--name=value`` settings of the ``options`` startup parameter.

    Words are separated by unescaped white space; a backslash escapes the next
    character, as PostgreSQL's pg_split_opts does.
    """
    words, word, escaped, in_word = [], [], False, False
    for ch in options:
        if escaped:
            word.append(ch)
            escaped, in_word = False, True
        elif ch == "\\":
            escaped, in_word = True, True
        elif ch.isspace():
            if in_word:
                words.append("".join(word))
                word, in_word = [], False
        else:
            word.append(ch)
            in_word = True
    if in_word:
        words.append("".join(word))
    settings = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            pair = words[i + 1]
            i += 2
        elif w.startswith("-c") and len(w) > 2:
            pair = w[2:]
            i += 1
        elif w.startswith("--") and "=" in w:
            pair = w[2:]
            i += 1
        else:
            raise ClientFatal(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                              f"unsupported startup option: {w!r}",
                              hint="Only -c name=value and --name=value settings are supported in options.")
        name, sep, value = pair.partition("=")
        if not sep:
            raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION, f"-c {name} requires a value")
        settings[name.replace("-", "_")] = value
    return settings


class ClientSession:
    """One client connection.  ``run()`` is its whole life; it never raises."""

    def __init__(self, proxy, sock: socket.socket, address) -> None:
        self.proxy = proxy
        self.config = proxy.config
        self.client = sock
        self.address = address
        self.server: ServerConnection | None = None
        self.server_lock = threading.Lock()   # guards ``server`` against a concurrent cancel
        self.db = None
        self.key = None
        self.user = None
        self.database = None
        self.settings: dict[str, str] = {}       # lower-case GUC name -> value the client wants
        self.setting_names: dict[str, str] = {}  # lower-case -> spelling the client used
        self.cancel_pid = 0
        self.cancel_secret = b""
        self.mode = "session"
        self._login_deadline = 0.0
        self._cbuf = bytearray()                 # client bytes read during startup/login
        self.refusal = None                      # set when the server refuses this client

    # -- life cycle -------------------------------------------------------------

    def run(self) -> None:
        try:
            self.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            if self.read_startup():
                self.login()
                self.relay()
        except ClientFatal as exc:
            log.info("client %s: %s", self._who(), exc)
            self._send_quietly(exc.response)
        except (ClientGone, _Done):
            pass
        except pq.ProtocolError as exc:
            log.info("client %s: protocol violation: %s", self._who(), exc)
            self._send_quietly(pq.error_response(pq.SQLSTATE_PROTOCOL_VIOLATION, f"protocol violation: {exc}"))
        except PoolClosed:
            self._send_quietly(pq.error_response(pq.SQLSTATE_ADMIN_SHUTDOWN,
                                                  "terminating connection: the proxy is shutting down"))
        except Exception:
            log.exception("client %s: internal error", self._who())
            self._send_quietly(pq.error_response("XX000", "threadpool_proxy internal error; see the proxy log"))
        finally:
            self.finish()

    def finish(self) -> None:
        """Release or close the server connection, forget the cancel key, close the client."""
        if self.cancel_pid:
            self.proxy.cancel_keys.unregister(self.cancel_pid)
        if self.server is not None:
            # Still attached here only after an unexpected error: its state is unknown.
            self.release_server(clean=False)
        self._close_wake_fd()
        try:
            self.client.close()
        except OSError:
            pass

    def _who(self) -> str:
        if self.user:
            return f"{self.user}@{self.database} from {self.address[0]}:{self.address[1]}"
        return f"{self.address[0]}:{self.address[1]}"

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.client.settimeout(1.0)
            self.client.sendall(data)
        except OSError:
            pass

    # -- reading from the client during startup and login -----------------------

    def _recv_exact(self, n: int) -> bytes:
        buf = self._cbuf
        while len(buf) < n:
            remaining = self._login_deadline - time.monotonic()
            if remaining <= 0:
                raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                                  "client_login_timeout: the client did not complete its login in time")
            self.client.settimeout(remaining)
            try:
                chunk = self.client.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                raise ClientGone() from None
            if not chunk:
                raise ClientGone()
            buf += chunk
        data = bytes(buf[:n])
        del buf[:n]
        return data

    def read_client_message(self, max_length: int) -> tuple[bytes, bytes]:
        head = self._recv_exact(5)
        length = pq._uint32.unpack_from(head, 1)[0]
        if length < 4 or length - 4 > max_length:
            raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                              f"invalid message length {length} for message type {head[:1]!r}")
        return head[:1], self._recv_exact(length - 4)

    def read_startup(self) -> bool:
        """Read the startup packet; False if the connection was a CancelRequest."""
        self._login_deadline = time.monotonic() + self.config.client_login_timeout
        while True:
            length = pq._int32.unpack(self._recv_exact(4))[0]
            if length < 8 or length > pq.MAX_STARTUP_PACKET_LENGTH:
                raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION, f"invalid length of startup packet: {length}")
            packet = self._recv_exact(length - 4)
            code = pq._int32.unpack_from(packet, 0)[0]
            if code in (pq.SSL_REQUEST_CODE, pq.GSSENC_REQUEST_CODE):
                if self._cbuf:
                    raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                                      "received unencrypted data after encryption request")
                self.client.sendall(b"N")     # no encryption: go on in plain text
                continue
            if code == pq.CANCEL_REQUEST_CODE:
                if length == 16:
                    self.proxy.forward_cancel(pq._int32.unpack_from(packet, 4)[0], packet[8:12])
                return False
            major, minor = code >> 16, code & 0xFFFF
            if major != 3:
                raise ClientFatal(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                                  f"unsupported frontend protocol {major}.{minor}: "
                                  f"server supports 3.0 to 3.0")
            params = pq.parse_startup_params(packet[4:])
            if self.refusal:
                raise ClientFatal(pq.SQLSTATE_TOO_MANY_CONNECTIONS, self.refusal)
            self._take_startup(params, minor)
            return True

    def _take_startup(self, params: dict, minor: int) -> None:
        protocol_options = [k for k in params if k.startswith("_pq_.")]
        if minor != 0 or protocol_options:
            # Like PostgreSQL: settle on 3.0 and name the options we ignore.
            self.client.sendall(pq.negotiate_protocol_version(0, protocol_options))
        user = params.get("user")
        if not user:
            raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")
        if "replication" in params and params["replication"].lower() not in ("false", "off", "no", "0"):
            raise ClientFatal(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                              "replication connections are not supported by threadpool_proxy")
        self.user = user
        self.database = params.get("database") or user
        settings = {}
        for name, value in params.items():
            if name in ("user", "database", "replication", "options") or name.startswith("_pq_."):
                continue
            settings[name] = value
        if params.get("options"):
            settings.update(parse_options(params["options"]))
        for name, value in settings.items():
            if not valid_guc_name(name):
                raise ClientFatal("42704", f'unrecognized configuration parameter "{name}"')
            self.settings[name.lower()] = value
            self.setting_names[name.lower()] = name
        self.db = self.config.lookup_database(self.database)
        if self.db is None:
            raise ClientFatal(pq.SQLSTATE_INVALID_CATALOG_NAME, f'database "{self.database}" does not exist',
                              hint="threadpool_proxy has no entry for it in 'databases' and no '*' entry.")
        self.mode = self.db.pool_mode
        self.key = self.proxy.key_for(self.db, self.user, self.database)

    # -- login --------------------------------------------------------------------

    def login(self) -> None:
        auth_type = self.db.auth_type
        if auth_type != "passthrough":
            self.proxy.authenticate(self)          # proxy-terminated auth (auth.py)
            conn = self.obtain_server()
        else:
            conn = self.passthrough_login()
        self.cancel_pid, self.cancel_secret = self.proxy.cancel_keys.register(self)
        welcome = [pq.parameter_status(conn.param_names[n], v) for n, v in conn.params.items()]
        welcome.append(pq.backend_key_data(self.cancel_pid, self.cancel_secret))
        welcome.append(pq.ready_for_query(pq.IDLE))
        # The client keeps its login connection; in transaction and statement
        # mode the relay lets it go as soon as another client waits for one.
        self.server = conn
        try:
            self.client.settimeout(None)
            self.client.sendall(b"".join(welcome))
        except OSError:
            self.release_server()     # idle, but it may carry SETs made for this client
            raise ClientGone() from None
        log.debug("client %s logged in (%s mode)", self._who(), self.mode)

    def server_startup_params(self) -> dict:
        params = {"user": self.user, "database": self.db.server_dbname(self.database)}
        for lower, value in self.settings.items():
            params[self.setting_names[lower]] = value
        return params

    def _remaining_login(self) -> float:
        return max(0.05, self._login_deadline - time.monotonic())

    def passthrough_login(self) -> ServerConnection:
        """Dial a new server connection and relay the client's authentication to it.

        PostgreSQL checks the password itself; the proxy only carries the
        Authentication requests and the client's answers.  The connection counts
        against pool_size from the start, so a full key makes the login wait.
        """
        pool, db = self.proxy.pool, self.db
        try:
            pool.acquire_login_slot(self.key, db.pool_size, self.config.query_wait_timeout)
        except PoolTimeout:
            raise ClientFatal(pq.SQLSTATE_TOO_MANY_CONNECTIONS,
                              f"query_wait_timeout: no server connection slot for user \"{self.user}\" "
                              f"became free within {self.config.query_wait_timeout:g} s "
                              f"(pool_size {db.pool_size})") from None
        conn = None
        try:
            conn = ServerConnection.dial(db.host, db.port, self.key, self.config.server_connect_timeout)
            conn.send(pq.startup_message(self.server_startup_params()))
            self._relay_authentication(conn)
            extra = []
            conn.read_until_ready(self._remaining_login(), on_message=lambda t, b: self._login_message(conn, t, b, extra))
            if extra:
                self.client.sendall(b"".join(extra))
        except ServerError as exc:
            self._discard_login(conn)
            self._send_quietly(exc.raw)
            raise _Done() from None
        except ServerGone as exc:
            self._discard_login(conn)
            raise ClientFatal(pq.SQLSTATE_CANNOT_CONNECT, f"threadpool_proxy: {exc}") from None
        except BaseException:
            self._discard_login(conn)
            raise
        self.adopt_login(conn)
        return conn

    def _discard_login(self, conn) -> None:
        if conn is None:
            self.proxy.pool.release_slot(self.key)
        else:
            self.proxy.pool.discard(self.key, conn)

    def _relay_authentication(self, conn: ServerConnection) -> None:
        """Carry Authentication requests to the client and its answers back, up to AuthenticationOk."""
        while True:
            t, body = conn.read_message(self._remaining_login())
            if t == pq.AUTHENTICATION:
                code = pq.parse_auth_code(body)
                self.client.sendall(pq.message(t, body))
                if code == pq.AUTH_OK:
                    return
                if code in (pq.AUTH_CLEARTEXT_PASSWORD, pq.AUTH_MD5_PASSWORD, pq.AUTH_SASL, pq.AUTH_SASL_CONTINUE):
                    ct, cbody = self.read_client_message(MAX_AUTH_MESSAGE)
                    if ct != pq.PASSWORD_MESSAGE:
                        raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                                          f"expected a password response, got message type {ct!r}")
                    conn.send(pq.message(ct, cbody))
                elif code != pq.AUTH_SASL_FINAL:
                    raise ClientFatal(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                                      f"the server asked for authentication method {code}, "
                                      f"which threadpool_proxy cannot relay")
            elif t == pq.ERROR_RESPONSE:
                raise ServerError(pq.parse_error_fields(body), pq.message(t, body))
            elif t == pq.NOTICE_RESPONSE:
                self.client.sendall(pq.message(t, body))
            elif t != pq.NEGOTIATE_PROTOCOL_VERSION:
                raise ServerGone(f"unexpected message {t!r} from the server during authentication")

    def _login_message(self, conn, t, body, extra) -> None:
        if t == pq.BACKEND_KEY_DATA:
            conn.pid, conn.secret = pq.parse_backend_key_data(body)
        elif t == pq.NOTICE_RESPONSE:
            extra.append(pq.message(t, body))

    def adopt_login(self, conn: ServerConnection) -> None:
        """Record what a fresh login of this client's settings looks like."""
        conn.login_params = dict(self.settings)
        conn.unreported = {k: v for k, v in self.settings.items() if k not in conn.params}
        defaults = self.proxy.key_defaults.setdefault(self.key, {})
        for name, value in conn.params.items():
            if name in self.settings:
                self.settings[name] = value      # the server's spelling of the client's value
            else:
                defaults[name] = value

    # -- server connections in transaction and statement mode ------------------

    def _needed_settings(self, conn: ServerConnection):
        """SETs that make ``conn`` look like this client's session, or None if it cannot."""
        wanted = {}
        params, unreported, settings = conn.params, conn.unreported, self.settings
        for name, value in settings.items():
            current = params.get(name) if name in params else unreported.get(name)
            if current != value:
                wanted[name] = value
        stray = conn.login_params.keys() - settings.keys()
        stray |= unreported.keys() - settings.keys()
        if stray:
            defaults = self.proxy.key_defaults.get(self.key, {})
            for name in stray:
                if name not in params or name not in defaults:
                    return None        # a setting we cannot put back to the server default
                if params[name] != defaults[name]:
                    wanted[name] = defaults[name]
        return wanted

    def obtain_server(self) -> ServerConnection:
        """Check out a server connection of this client's identity, dialing if allowed."""
        pool, db, config = self.proxy.pool, self.db, self.config
        settings = self.settings
        deadline = time.monotonic() + config.query_wait_timeout
        can_dial = db.auth_type != "passthrough"
        for _ in range(db.pool_size + 3):
            remaining = deadline - time.monotonic()
            try:
                conn = pool.acquire(self.key, db.pool_size, max(remaining, 0.0),
                                    prefer=lambda c: c.login_params == settings, dial=can_dial)
            except PoolTimeout:
                raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                                  f"query_wait_timeout: no server connection for user \"{self.user}\" "
                                  f"database \"{self.database}\" became free within "
                                  f"{config.query_wait_timeout:g} s (pool_size {db.pool_size})") from None
            if conn is None:
                if not can_dial:
                    raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE,
                                      "no server connection is left for this login; reconnect",
                                      detail="With auth_type passthrough only a client's own login opens "
                                             "server connections, and all of this user's have closed.")
                return self.proxy.dial_for(self)     # proxy-terminated auth logs in for the client
            needed = self._needed_settings(conn)
            if needed is None:
                pool.discard(self.key, conn)
                continue
            try:
                conn.apply_settings(needed, config.server_connect_timeout)
            except ServerGone:
                pool.discard(self.key, conn)
                continue
            except ServerError as exc:
                self._park(conn)
                self._send_quietly(exc.raw.replace(b"SERROR\0VERROR\0", b"SFATAL\0VFATAL\0", 1))
                raise _Done() from None
            return conn
        raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE,
                          "no compatible server connection could be found for this client's settings")

    def release_server(self, clean: bool = True) -> None:
        """Reset and park the server connection, or close it if its state is unknown."""
        with self.server_lock:
            conn, self.server = self.server, None
        if conn is None:
            return
        if clean:
            self._park(conn)
        else:
            self.proxy.pool.discard(self.key, conn)

    def _park(self, conn: ServerConnection) -> None:
        """Send the reset query and park ``conn``; the next checkout checks the answer."""
        ok = conn.start_reset(self.config.reset_query, self.config.server_connect_timeout)
        self.proxy.pool.checkin(self.key, conn, reset_ok=ok)

    # -- the relay --------------------------------------------------------------

    def relay(self) -> None:
        """Copy bytes both ways until one side leaves.

        Only message headers are looked at.  In transaction and statement mode
        the client reaches a release point when every request sent has been
        answered (one ReadyForQuery per Query, Sync and FunctionCall), nothing
        extended is unsynced, the client is between messages, and the status is
        idle.  There the server connection is released (reset, parked) if any
        client is waiting for one of its key; otherwise the client keeps it
        "lingering", at no cost, until its next transaction or until a waiter
        wakes it to let go (see BackendIdlePool.linger).  Either way no other
        client can see this client's session state.
        """
        client = self.client
        cfd = client.fileno()
        poller = select.poll()
        poller.register(cfd, _POLLIN)
        cbuf = bytearray(CLIENT_BUFFER_SIZE)
        cview = memoryview(cbuf)
        sbuf = None
        sview = None
        cscan = pq.ClientScanner()
        sscan = pq.ServerScanner()
        pool = self.proxy.pool
        key = self.key
        pooled = self.mode != "session"
        statement_mode = self.mode == "statement"
        idle_status = pq.IDLE[0]
        pending = 0
        lingering = False
        check_release = False
        expect_server = False
        linger_ms = int(self.config.server_idle_timeout * 1000)
        wakefd = -1
        conn = self.server
        ssock = None
        sfd = -1
        if conn is not None:
            ssock = conn.sock
            sfd = ssock.fileno()
            poller.register(sfd, _POLLIN)
            check_release = pooled      # the login connection: keep it while nobody waits
        try:
            while True:
                if check_release:
                    check_release = False
                    if (conn is not None and not cscan.unsynced and cscan.at_boundary
                            and sscan.at_boundary and sscan.status == idle_status and not sscan.copy_in):
                        # The release point: keep it while nobody waits, else hand it on.
                        if wakefd < 0:
                            wakefd = self._make_wake_fd()
                            poller.register(wakefd, _POLLIN)
                        if pool.linger(key, self):
                            lingering = True
                        else:
                            poller.unregister(sfd)
                            sfd = -1
                            ssock = conn = None
                            self.release_server()
                if expect_server:
                    # A whole request went out and nothing came back yet: the
                    # server owes an answer, so read it without a poll() first.
                    expect_server = False
                    events = ((sfd, _POLLIN),)
                else:
                    events = poller.poll(linger_ms if lingering else None)
                if not events and lingering:
                    # Idle past server_idle_timeout: park it, so the janitor may close
                    # it (or hand it to a waiter that claimed it meanwhile).
                    lingering = False
                    pool.unlinger(key, self)
                    poller.unregister(sfd)
                    sfd = -1
                    ssock = conn = None
                    self.release_server()
                    continue
                for fd, ev in events:
                    if fd == cfd:
                        try:
                            n = client.recv_into(cbuf)
                        except OSError:
                            n = 0
                        if not n:
                            raise ClientGone()
                        before = cscan.requests
                        cscan.feed(cview, n)
                        if cscan.terminated:
                            n = cbuf.rfind(pq.TERMINATE_MESSAGE, 0, n)
                            if n <= 0:
                                raise ClientGone()
                        if lingering:
                            lingering = False
                            if not pool.unlinger(key, self):
                                self._drain_wake()     # claimed meanwhile; we keep it this time
                        elif conn is None:
                            conn = self.obtain_server()
                            with self.server_lock:
                                self.server = conn
                            ssock = conn.sock
                            sfd = ssock.fileno()
                            poller.register(sfd, _POLLIN)
                        pending += cscan.requests - before
                        try:
                            ssock.sendall(cview[:n])
                        except OSError:
                            self._server_lost()
                        if cscan.terminated:
                            raise ClientGone()
                        expect_server = (cscan.requests > before and cscan.at_boundary
                                         and not cscan.unsynced and not sscan.copy_in)
                        # A chunk with no request in it (a lone Flush) gets no answer:
                        # check the release point now, not at a ReadyForQuery that never comes.
                        check_release = pooled and cscan.requests == before and pending == 0
                    elif fd == sfd:
                        expect_server = False
                        if sbuf is None:
                            sbuf = bytearray(SERVER_BUFFER_SIZE)
                            sview = memoryview(sbuf)
                        try:
                            n = ssock.recv_into(sbuf)
                        except OSError:
                            n = 0
                        if n == len(sbuf) and n < SERVER_BUFFER_MAX:
                            # A big answer: carry on with the larger buffer (after this chunk).
                            grown = bytearray(SERVER_BUFFER_MAX)
                            grown[:n] = sbuf
                            sbuf = grown
                            sview = memoryview(sbuf)
                        if lingering:
                            if self._lingering_server_spoke(sscan, sview, n):
                                continue
                            lingering = False          # it closed or failed while idle: dropped
                            pool.unlinger(key, self)
                            poller.unregister(sfd)
                            sfd = -1
                            ssock = conn = None
                            continue
                        if not n:
                            self._server_lost()
                        sscan.feed(sview, n)
                        ready = sscan.ready
                        if ready and statement_mode and sscan.status != idle_status:
                            self._refuse_transaction_block(sview, n)
                        try:
                            client.sendall(sview[:n])
                        except OSError:
                            raise ClientGone() from None
                        if sscan.parameters:
                            self._note_parameters(conn, sscan.parameters, pooled)
                        if ready:
                            sscan.ready = 0
                            pending -= ready
                            if pending < 0:
                                pending = 0
                        check_release = pooled and pending == 0
                    elif fd == wakefd:
                        self._drain_wake()

                        if lingering:                  # a waiter wants our connection
                            lingering = False
                            poller.unregister(sfd)
                            sfd = -1
                            ssock = conn = None
                            self.release_server()
                    # else: an event of a server connection released earlier in this batch
        except BaseException as exc:
            if lingering:
                pool.unlinger(key, self)
            self._leave(pending, cscan, sscan, clean=isinstance(exc, ClientGone))
            raise

    # -- lingering helpers ----------------------------------------------------------

    _wakefd = -1

    def _make_wake_fd(self) -> int:
        """An eventfd (a pipe where there is none) that waiters write to, to reclaim our connection."""
        if hasattr(os, "eventfd"):
            self._wakefd = self._wake_write_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:
            self._wakefd, self._wake_write_fd = os.pipe()
            os.set_blocking(self._wakefd, False)
            os.set_blocking(self._wake_write_fd, False)
        return self._wakefd

    def wake(self) -> None:
        """Called by a waiting thread (holding the pool lock): let go of the lingering connection."""
        try:
            os.write(self._wake_write_fd, b"\1\0\0\0\0\0\0\0")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            os.read(self._wakefd, 64)
        except OSError:
            pass

    def _close_wake_fd(self) -> None:
        if self._wakefd >= 0:
            for fd in {self._wakefd, self._wake_write_fd}:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._wakefd = -1

    def _lingering_server_spoke(self, sscan, view, n) -> bool:
        """A lingering (idle) server connection sent something: True if it is still good.

        NOTIFY, NOTICE and ParameterStatus belong to this client's session and
        are passed on; end of file or an ErrorResponse (pg_terminate_backend's
        FATAL) means it is gone, and the client, which is between transactions,
        is not bothered with it: its next transaction gets another connection.
        """
        if n:
            errors = sscan.errors
            sscan.feed(view, n)
            if sscan.errors == errors and not sscan.ready and sscan.at_boundary:
                if sscan.parameters:
                    self._note_parameters(self.server, sscan.parameters, True)
                try:
                    self.client.sendall(view[:n])
                except OSError:
                    raise ClientGone() from None
                return True
            sscan.__init__()
        log.info("server connection %r closed while idle; the client %s will get another", self.server, self._who())
        self.release_server(clean=False)
        return False

    def _refuse_transaction_block(self, view, n) -> None:
        """Statement mode: the server entered a transaction block; end the client like PgBouncer.

        The chunk's closing ReadyForQuery is replaced by the error, so the
        client sees the error as the result of the statement that opened it.
        """
        end = n - 6 if bytes(view[n - 6:n - 1]) == b"Z\0\0\0\x05" else n
        try:
            self.client.sendall(view[:end])
        except OSError:
            raise ClientGone() from None
        raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                          "transaction blocks not allowed in statement pooling mode",
                          hint="Use pool_mode transaction or session for this database, or autocommit.")

    def _leave(self, pending, cscan, sscan, clean=True) -> None:
        """The client is leaving: park the server connection only if it is idle and in sync."""
        if self.server is None:
            return
        in_sync = pending == 0 and not cscan.unsynced and cscan.at_boundary and sscan.at_boundary
        self.release_server(clean=clean and in_sync and sscan.status == pq.IDLE[0])

    def _note_parameters(self, conn, parameters, pooled) -> None:
        for name, value in parameters:
            conn.note_parameter(name, value)
            if pooled:
                # Like PgBouncer: a reported setting the client changed follows it
                # to the next server connection it gets.
                lower = name.lower()
                self.settings[lower] = value
                self.setting_names.setdefault(lower, name)
        parameters.clear()

    def _server_lost(self):
        self.release_server(clean=False)
        raise ClientFatal(pq.SQLSTATE_CONNECTION_FAILURE,
                          "server connection lost; the client's transaction, if any, was rolled back",
                          hint="The PostgreSQL server closed the connection or was restarted.")
