"""One client's life, from its startup packet to close, in its own thread.

A ClientSession reads the startup packet (answering GSSENCRequest with 'N',
and SSLRequest with 'S' and a TLS handshake when client TLS is on, or a
direct TLS ClientHello the same way; tls.py), logs the client in (login.py), sends the welcome,
then hands the connection to a Relay (relay.py) until either side leaves.
Every error that ends a client arrives at ``run()``, which decides in one
place what the client is told.
"""

from __future__ import annotations

import errno
import select
import socket

from . import events as events_mod
from . import protocol as pq
from .admin import ConsoleClient
from . import tls
from .backend import ServerConnection, out_of_descriptors
from .channel import CLOSE_LINGER, ClientChannel, close_client
from .checkout import ClientSettings, ServerCheckout
from .config import CONSOLE_DATABASES
from .errors import ClientFatal, ClientGone, MessageTooLarge, PoolClosed, ProtocolError, ProxyError, ServerError
from .listeners import UNIX_HOST, tune_client
from .login import LoginRequest
from .relay import Relay
from . import replication as repl
from .startup import client_settings
from .stats import ClientStats
from .logs import get_logger

log = get_logger(__name__)

#: What every client is told when the proxy stops, as PostgreSQL tells its own at a fast shutdown.
SHUTDOWN_NOTICE = pq.error_response(pq.SQLSTATE_ADMIN_SHUTDOWN,
                                    "terminating connection due to administrator command: "
                                    "the proxy is shutting down")

#: What the clients of a database are told when an admin KILLs it.
KILL_NOTICE = pq.error_response(pq.SQLSTATE_ADMIN_SHUTDOWN,
                                "terminating connection due to administrator command: KILL on the admin console")

def client_connected(sock: socket.socket) -> bool:
    """False once the client has closed its end (end of file, or an error); never blocks.

    Bytes waiting to be read mean it is there (its next requests).  poll()
    first: on a socket with a timeout Python's recv() would wait for data.
    """
    try:
        fd = sock.fileno()
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(0):
            return True
        return tls.raw_peek(sock) != b""       # (under TLS: any record; EOF is still b"")
    except BlockingIOError:
        return True
    except (OSError, ValueError):
        return False


class ClientSession:
    """One client connection.  ``run()`` is its whole life; it never raises.

    ``server`` is the ProxyServer (pool, logins, cancel keys, config).
    Clients turned away (max_client_conn, shutdown) never get one: the
    server's refuser (refusal.py) answers them.
    """

    def __init__(self, server, sock: socket.socket, address) -> None:
        self.server = server
        self.config = server.config
        self.client = sock
        self.address = address
        login_timeout = self.config.client_login_timeout
        self.channel = ClientChannel(sock, login_timeout)
        self.settings = ClientSettings()
        self.request: LoginRequest | None = None
        self.checkout: ServerCheckout | None = None
        self.relay: Relay | None = None
        self.console: ConsoleClient | None = None     # a client of the admin console
        self.stats = ClientStats()
        self.cancel_pid = 0
        self.tls = False               # the client's socket is an ssl.SSLSocket (after the handshake)
        self.killed = False                # KILL on the admin console ended it
        self.replication = ""              # "physical" or "logical" for a replication connection
        self.authenticated = False         # the proxy or the server accepted the client's login
        self.admitted_as = None            # (database, user) counted by max_*_client_connections
        self.drain_on_close = True         # False: a client that abused the protocol gets no grace at close

    # -- life cycle -------------------------------------------------------------

    def run(self) -> None:
        tune_client(self.client, self.config)      # TCP_NODELAY and keepalive (TCP clients only)
        try:
            if self.read_startup():
                if self.console is not None:
                    self.console.run(self.channel, self.client)
                else:
                    self.relay = self.login()
                    self.relay.run()
        except ProxyError as exc:
            self._goodbye(exc)
        except Exception as exc:
            if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
                self._goodbye(out_of_descriptors(exc))       # e.g. no descriptor for the relay's eventfd
            else:
                log.exception("client %s: internal error", self.who)
                self.channel.send_quietly(pq.error_response(pq.SQLSTATE_INTERNAL_ERROR,
                                                            "threadpool_proxy internal error; see the proxy log"))
        finally:
            self.finish()

    def _goodbye(self, exc: ProxyError) -> None:
        """What the client is told when ``exc`` ends its connection (nothing for some)."""
        if self.killed:
            relay = self.relay
            if relay is None or relay.sscan.at_boundary:      # (not into a half-sent message: a stream)
                self._told(pq.SQLSTATE_ADMIN_SHUTDOWN, "KILL on the admin console")
                self.channel.send_quietly(KILL_NOTICE)
        elif self.server.stopping or isinstance(exc, PoolClosed):
            # The proxy is stopping (that is why the client's socket or server
            # connection was shut down): say so, unless a message is half sent.
            relay = self.relay
            if relay is None or relay.sscan.at_boundary:
                self._told(pq.SQLSTATE_ADMIN_SHUTDOWN, "the proxy is shutting down")
                self.channel.send_quietly(SHUTDOWN_NOTICE)
        elif isinstance(exc, ClientFatal):
            if isinstance(exc, MessageTooLarge):
                # It declared more than we read: reading the rest of it to close softly is
                # what the limit refuses (close_client would drain up to 64 MiB of it).
                self.drain_on_close = False
            self._log_failure("%s", exc)
            if not exc.raw:            # (a raw one is the server's own words, passed on)
                self._told(exc.sqlstate, str(exc))
            self.channel.send_quietly(exc.raw or pq.error_response(exc.sqlstate, str(exc), pq.FATAL,
                                                                   exc.detail, exc.hint))
        elif isinstance(exc, ProtocolError):
            self._log_failure("protocol violation: %s", exc)
            self._told(pq.SQLSTATE_PROTOCOL_VIOLATION, f"protocol violation: {exc}")
            self.channel.send_quietly(pq.error_response(pq.SQLSTATE_PROTOCOL_VIOLATION,
                                                        f"protocol violation: {exc}"))
        elif isinstance(exc, ServerError):
            self.channel.send_quietly(exc.raw)
        # ClientGone, ErrorAlreadySent, and errors of a server connection already
        # turned into a ClientFatal where they happened: nothing more to say.

    def _told(self, sqlstate: str, text: str) -> None:
        """The proxy itself ended this client with an error: an event for the embedding program's hooks."""
        events = self.server.events
        if events.active:
            events.emit_client(events_mod.PROXY_ERROR, self.stats, sqlstate=sqlstate, detail=text)

    def _log_failure(self, text: str, exc: Exception) -> None:
        """Log why a client is turned away; one that never logged in only in summary (rate-limited)."""
        if self.request is None:
            self.server.junk_log.log("bad startup", "client %s: " + text, self.who, exc)
        elif not self.authenticated:
            self.server.junk_log.log("refused logins", "client %s: " + text, self.who, exc)
        else:
            log.info("client %s: " + text, self.who, exc)

    def finish(self) -> None:
        """Forget the cancel key, let go of any server connection, close the client."""
        if self.cancel_pid:
            self.server.cancel_keys.unregister(self.cancel_pid)
        if self.relay is not None:
            self.relay.detach(park=False)    # attached here only after an unexpected error
            self.relay.close()
            self.server.stats.retire(self.stats)
            if self.server.events.active:
                self.server.events.emit_client(events_mod.CLIENT_LOGOUT, self.stats)
        # An orderly end of stream, never a reset; while the proxy stops, no waiting for the client.
        close_client(self.client, linger=CLOSE_LINGER if self.drain_on_close and not self.server.stopping else 0.0)

    @property
    def who(self) -> str:
        if self.request is not None:
            return self.request.who
        return f"{self.address[0]}:{self.address[1]}"

    def cancel_target(self) -> tuple[Relay, ServerConnection] | None:
        """Where this client's CancelRequest goes now: (relay, server connection), or None.

        The connection is marked until ``relay.cancel_done(conn, delivered)``
        (Relay.cancel_target): no other client gets it while the cancel is on its way.
        """
        relay = self.relay
        conn = None if relay is None else relay.cancel_target()
        return None if conn is None else (relay, conn)

    def cancel_wait(self) -> bool:
        """A CancelRequest while no query runs: end a wait for a server connection, if any."""
        checkout = self.checkout
        return checkout is not None and checkout.cancel_wait()

    def kill(self) -> None:
        """KILL on the admin console: end this client now, telling it why."""
        self.killed = True
        self.interrupt()

    def interrupt(self, hard: bool = False) -> None:
        """Wake this client's thread wherever it waits (shutdown): shut its sockets down.

        The client's socket only for reading at first, so the thread can still
        tell the client why (SHUTDOWN_NOTICE); ``hard`` also for writing, for a
        thread stuck sending to a client that does not read.
        """
        relay = self.relay
        backend = relay.backend if relay is not None else None
        for sock, how in ((self.client, socket.SHUT_RDWR if hard else socket.SHUT_RD),
                          (backend.sock if backend is not None else None, socket.SHUT_RDWR)):
            try:
                if sock is not None:
                    tls.shutdown(sock, how)     # (an SSLSocket keeps its TLS layer for SHUTDOWN_NOTICE)
            except OSError:
                pass

    # -- the startup packet -------------------------------------------------------

    def read_startup(self) -> bool:
        """Read the startup packet; False if the connection was a CancelRequest."""
        channel = self.channel
        # No TLS over the unix socket (as PostgreSQL): SSLRequest is answered N, and plain text is enough.
        client_tls = self.server.client_tls if self.address[0] != UNIX_HOST else None
        if client_tls is not None and channel.peek_first_byte() == tls.TLS_HANDSHAKE_BYTE:
            self._start_tls(client_tls, direct=True)           # PostgreSQL 17's direct TLS: no SSLRequest
        while True:
            head = channel.read_exact(4)
            length = pq.INT32.unpack(head)[0]
            if length < 8 or length > pq.MAX_STARTUP_PACKET_LENGTH:
                self._bad_startup_length(head, length)
            packet = channel.read_exact(length - 4)
            code = pq.INT32.unpack_from(packet, 0)[0]
            if code in (pq.SSL_REQUEST_CODE, pq.GSSENC_REQUEST_CODE):
                if channel.has_buffered:
                    raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                                      "received unencrypted data after encryption request")
                if self.tls:
                    raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                                      "SSL or GSSAPI negotiation requested over an encrypted connection")
                if code == pq.SSL_REQUEST_CODE and client_tls is not None:
                    channel.send(b"S")
                    self._start_tls(client_tls, direct=False)
                else:
                    channel.send(b"N")     # no encryption: go on in plain text
                continue
            if code == pq.CANCEL_REQUEST_CODE:
                if length == 16:
                    self.server.forward_cancel(pq.INT32.unpack_from(packet, 4)[0], packet[8:12])
                return False
            major, minor = code >> 16, code & 0xFFFF
            if major != 3:
                raise ClientFatal(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                                  f"unsupported frontend protocol {major}.{minor}: "
                                  f"server supports 3.0 to 3.0")
            params = pq.parse_startup_params(packet[4:])
            if client_tls is not None and client_tls.required and not self.tls:
                raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION,
                                  f'connection without encryption refused for host "{self.address[0]}", '
                                  f'user "{params.get("user", "")}", database '
                                  f'"{params.get("database") or params.get("user", "")}": '
                                  f"client_tls_sslmode is {client_tls.mode}",
                                  hint="Connect with TLS (sslmode=require or stricter).")
            self._take_startup(params, minor)
            return True

    def _bad_startup_length(self, head: bytes, length: int):
        """No startup packet is that long or short: close without a word, as PostgreSQL does.

        PostgreSQL only logs "invalid length of startup packet" (COMMERROR: the
        client is sent nothing) and closes; the junk log does the same here.
        A Terminate message where the startup packet belongs (node-postgres'
        ``connect(); end()`` in one tick: 'X' read as a length, 1476395008) is
        a client that changed its mind: not even logged.
        """
        if head == pq.TERMINATE_MESSAGE[:4]:
            log.debug("client %s: a Terminate instead of a startup packet", self.who)
        else:
            self.server.junk_log.log("bad startup", "client %s: invalid length of startup packet: %s",
                                     self.who, length)
        raise ClientGone()

    def _start_tls(self, client_tls, direct: bool) -> None:
        """Wrap the client's socket in TLS; a failed handshake ends the connection unanswered."""
        channel = self.channel
        try:
            channel.start_tls(client_tls)
        except (OSError, ValueError) as exc:
            self.server.junk_log.log("failed TLS handshakes", "client %s: TLS handshake failed: %s",
                                     self.who, getattr(exc, "reason", None) or exc)
            raise ClientGone() from None
        finally:
            self.client = channel.sock       # the SSLSocket owns the descriptor now, whatever happened
        if direct and self.client.selected_alpn_protocol() != tls.ALPN_PROTOCOL:
            raise ClientFatal(pq.SQLSTATE_PROTOCOL_VIOLATION,
                              "received direct SSL connection request without ALPN protocol "
                              "negotiation extension")
        self.tls = True

    def _take_startup(self, params: dict, minor: int) -> None:
        protocol_options = [k for k in params if k.startswith("_pq_.")]
        if minor != 0 or protocol_options:
            # Like PostgreSQL: settle on 3.0 and name the options we ignore.
            self.channel.send(pq.negotiate_protocol_version(0, protocol_options))
        user = params.get("user")
        if not user:
            raise ClientFatal(pq.SQLSTATE_INVALID_AUTHORIZATION, "no PostgreSQL user name specified in startup packet")
        replication = self.replication = repl.replication_kind(params.get("replication"))
        database = params.get("database") or user
        # Settings only (options' included): whom the server logins are for is the proxy's to say.
        settings = client_settings(params)
        for name, value in settings.items():
            self.settings.set(name, value)
        if database in CONSOLE_DATABASES:
            if replication:
                raise ClientFatal(pq.SQLSTATE_FEATURE_NOT_SUPPORTED,
                                  "the admin console does not take replication connections")
            self.console = ConsoleClient(self.server, user, database, self.address, settings)
            self.request = self.console.request
            return
        db = self.config.lookup_database(database, user)
        if db is None:
            raise ClientFatal(pq.SQLSTATE_INVALID_CATALOG_NAME, f'database "{database}" does not exist',
                              hint="threadpool_proxy has no entry for it in 'databases' and no '*' entry.")
        if self.server.disabled and database in self.server.disabled:
            raise ClientFatal(pq.SQLSTATE_OBJECT_NOT_IN_STATE,
                              f'database "{database}" is not currently accepting connections',
                              detail="threadpool_proxy: DISABLE on the admin console.",
                              hint=f"An admin lifts it with ENABLE {database}.")
        if replication:
            repl.check_entry(database, db)
        for name, value in db.settings:
            # The entry's settings (PgBouncer's client_encoding=, timezone=...) are this client's unless it
            # gave its own: kept like the client's own on every server connection it gets.
            if name.lower() not in self.settings.values:
                self.settings.set(name, value)
        self.server.admit_login(self, database, user, db)
        self.request = LoginRequest(user=user, database=database, db=db,
                                    key=self.server.key_for(db, user, database), address=self.address,
                                    replication=replication)
        stats = self.stats
        stats.database, stats.user, stats.key = database, user, self.request.key

    # -- login ----------------------------------------------------------------------

    def login(self) -> Relay:
        """Authenticate the client, get its first server connection, welcome it; the relay to run."""
        request, logins, channel = self.request, self.server.logins, self.channel
        db = request.db
        passthrough = db.auth_type == "passthrough"
        client = self.client
        args = (self.server.pool, self.config, db, request.key, request.server_user,
                db.server_dbname(request.database), self.settings)
        kwargs = dict(client_alive=lambda: client_connected(client), stats=self.stats,
                      backends=self.server.backends)
        events, stats = self.server.events, self.stats
        if request.replication:
            checkout = self.checkout = repl.ReplicationCheckout(*args, dial=None, kind=request.replication,
                                                                **kwargs)
        else:
            checkout = self.checkout = ServerCheckout(
                *args,
                dial=None if passthrough else lambda params, node, key: logins.proxy_login(request, params, node, key),
                router=self.server.router, **kwargs)
        checkout.waiter.on_wait = lambda: events.emit_client(events_mod.POOL_WAIT, stats)
        if passthrough:
            conn = logins.passthrough_login(channel, request, checkout.startup_params())
            self.authenticated = True
            checkout.adopt(conn)
            if checkout.routed:
                checkout.check_login_target(conn)
        elif request.replication:
            logins.authenticate(channel, request)
            self.authenticated = True
            conn = logins.replication_login(channel, request, checkout.startup_params())
            checkout.adopt(conn)
        else:
            logins.authenticate(channel, request)
            self.authenticated = True
            self.server.note_pool_use(request, checkout.node_keys.values())   # min_pool_size, server_lifetime
            conn = checkout.obtain()
        # The client keeps its login connection; in transaction and statement
        # mode the relay lets it go as soon as another client waits for one.
        # A replication connection is paired with its server connection for life, whatever the
        # entry's pool mode (as PgBouncer 1.23+ does): it is relayed as in session mode.
        pool_mode = "session" if request.replication else db.pool_mode
        relay = Relay(self.client, checkout, self.settings, pool_mode, self.config.server_idle_timeout)
        relay.who = self.who
        relay.events = self.server.events
        if relay.pooled:
            relay.hub = self.server.notify_hub
            if not passthrough and not request.replication:
                key, listener_login = checkout.key, {"user": request.server_user, "database": checkout.dbname,
                                                     "client_encoding": "UTF8",
                                                     "application_name": "threadpool_proxy listener"}
                relay.listen_dial = lambda: logins.proxy_login(request, dict(listener_login), None, key, slot=False)
        # Session mode: the client holds this server connection for life, so it is told
        # the real backend pid (a proxy secret still guards its cancels).
        self.cancel_pid, cancel_secret = self.server.cancel_keys.register(
            self, real_pid=conn.pid if pool_mode == "session" else 0)
        relay.client_pid = self.cancel_pid
        relay.attach(conn)
        self.stats.client_login_count = 1
        for key in checkout.node_keys.values() if checkout.routed else (request.key,):
            self.server.stats.note_key(key, self.stats.pool)
        self.relay = relay
        if events.active:         # (before the welcome: nothing the client does can come before it)
            events.emit_client(events_mod.CLIENT_LOGIN, self.stats,
                               detail=f"{request.replication} replication" if request.replication else db.pool_mode)
        try:
            ahead = channel.ready_for_relay()
            channel.send(self._welcome(conn, cancel_secret))
        except (OSError, ClientGone):
            relay.detach(park=True)     # idle, but it may carry SETs made for this client
            raise ClientGone() from None
        log.debug("client %s logged in (%s)", self.who,
                  f"{request.replication} replication" if request.replication else f"{db.pool_mode} mode")
        if ahead:
            relay.replay(ahead)
        return relay

    def _welcome(self, conn: ServerConnection, cancel_secret: bytes) -> bytes:
        """ParameterStatus of the server connection, the client's BackendKeyData, ReadyForQuery."""
        welcome = [pq.parameter_status(conn.param_names[n], v) for n, v in conn.params.items()]
        welcome.append(pq.backend_key_data(self.cancel_pid, cancel_secret))
        welcome.append(pq.ready_for_query(pq.IDLE))
        return b"".join(welcome)
