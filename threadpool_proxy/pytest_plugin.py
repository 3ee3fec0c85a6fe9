"""A pytest plugin: run an application's tests through threadpool_proxy, and say what pooling broke.

Registered under pytest's ``pytest11`` entry point (as pytest-postgresql is),
so it loads wherever the package is installed, but it does nothing unless
asked: it adds its options, ini keys and fixtures, and starts a proxy only

* with ``--through-pool=MODE`` (transaction, statement or session): one proxy,
  started before the test suite's conftest files are imported, in front of
  the database the suite already uses (``--tpp-dsn``, ini ``tpp_dsn``, env
  ``TPP_DSN``; else ``DATABASE_URL``; else ``PGHOST``/``PGPORT``), and the
  environment the app's own fixtures read rewritten to point at it
  (``DATABASE_URL``, ``PGHOST``, ``PGPORT``, names given with ``--tpp-env``),
  so the whole suite runs through the pooler without an edit; or
* when a test uses one of its fixtures (``tpp_transaction_dsn`` and the
  others, or one made by ``proxy_fixture``): a proxy for that scope, whose
  DSN the fixture yields.

Its proxies use a small ``pool_size`` (2) to force sharing, and by default
``server_linger: false``: the server connection goes back to the pool,
reset, at the end of every transaction, as under full contention, so what
transaction pooling breaks (session state the proxy neither carries nor
pins) breaks in a one-client test too, every time (``--tpp-linger`` gives
the production behaviour instead).  At the end of the run, a summary per
test of what the proxies saw: failures with the resets between transactions
that preceded them, statements refused, statements prepared again, cancels,
errors the proxy itself sent, and clients pinned to their server connection
by session state that cannot follow them (a temporary table...: the ``pin``
events).

Events reach the plugin through the embedding API's hook (events.py), off
the proxies' hot path; each carries the monotonic time it happened, and the
plugin gives it to the test that was running then (``pytest_runtest_protocol``
marks each test's start and end).  Not for pytest-xdist: each worker would
start a proxy of its own and keep its own report.

Nothing of the proxy is imported until a proxy is needed: pytest loads this
module into every run.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterator

import pytest

if TYPE_CHECKING:
    from .dsn import ConnInfo
    from .embed import Proxy
    from .events import Event

log = logging.getLogger(__name__)

MODES = ("transaction", "statement", "session")

#: Defaults of the options (also their ini keys).
DEFAULT_POOL_SIZE = 2
DEFAULT_WAIT_TIMEOUT = 10.0

#: Where ``--through-pool`` keeps the DSN it rewrote, for a process it starts (pytester, a subprocess
#: of the suite) that loads the plugin again: that one puts its proxy in front of the same database.
UPSTREAM_ENV = "TPP_UPSTREAM_DSN"

#: libpq environment variables naming the server: pointed at the proxy (PGHOSTADDR removed).
PG_SERVER_ENV = ("PGHOST", "PGPORT", "PGHOSTADDR")

#: sslmode values a loopback connection to the in-process proxy cannot honour (it speaks no TLS):
#: the rewritten DSN says ``disable`` and the proxy uses the mode towards the server instead.
_TLS_REQUIRED = ("require", "verify-ca", "verify-full")

#: What the summary counts per test: event kind -> how the report names it.
TROUBLE = {
    "statement_refused": "statements refused",
    "statement_reprepared": "statements prepared again on another server connection",
    "cancel": "cancel requests",
    "proxy_error": "errors the proxy itself sent",
    "pin": "clients pinned to their server connection",
}


class PooledDSN(str):
    """A DSN (the string to connect with) that also knows its proxy (``.proxy``: embed.Proxy)."""

    proxy: "Proxy"

    def __new__(cls, text: str, proxy: "Proxy") -> "PooledDSN":
        self = super().__new__(cls, text)
        self.proxy = proxy
        return self


# -- options ------------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("threadpool_proxy", "threadpool_proxy: run the tests through a connection pooler")
    group.addoption("--through-pool", dest="tpp_through_pool", choices=MODES, default=None,
                    help="run the whole suite through a threadpool_proxy in this pool mode: DATABASE_URL and "
                         "PGHOST/PGPORT are pointed at it; a summary at the end says what it saw")
    group.addoption("--tpp-dsn", dest="tpp_dsn", default=None,
                    help="the database to put the proxy in front of (default: ini tpp_dsn, $TPP_DSN, "
                         "$DATABASE_URL, then $PGHOST/$PGPORT)")
    group.addoption("--tpp-pool-size", dest="tpp_pool_size", type=int, default=None,
                    help=f"pool_size of the plugin's proxies (default: ini tpp_pool_size, {DEFAULT_POOL_SIZE})")
    group.addoption("--tpp-linger", dest="tpp_linger", action="store_true", default=None,
                    help="let a client keep its idle server connection while nobody waits (production "
                         "behaviour); default: released and reset at every transaction end")
    group.addoption("--tpp-env", dest="tpp_env", action="append", default=[],
                    help="another environment variable holding a DSN to point at the proxy (repeatable)")
    parser.addini("tpp_dsn", "the database the plugin's proxies front (see --tpp-dsn)", default="")
    parser.addini("tpp_pool_size", "pool_size of the plugin's proxies", default=str(DEFAULT_POOL_SIZE))
    parser.addini("tpp_linger", "true: clients keep idle server connections (see --tpp-linger)", type="bool",
                  default=False)
    parser.addini("tpp_wait_timeout", "seconds a client waits for a server connection before the proxy's "
                  "error (query_wait_timeout)", default=str(DEFAULT_WAIT_TIMEOUT))
    parser.addini("tpp_env", "more environment variables holding a DSN to point at the proxy", type="linelist",
                  default=[])


# -- what the plugin keeps for one run ------------------------------------------------------

@dataclasses.dataclass
class RecordedTest:
    """One test's time span and outcome, and the events the proxies told of meanwhile."""

    nodeid: str
    start: float
    end: float = float("inf")
    outcome: str = "passed"             # passed, failed, error (in setup or teardown), skipped
    failure: str = ""                   # the crash message of a failure
    events: list = dataclasses.field(default_factory=list)


class PluginState:
    """The plugin's proxies, the environment it changed, the events it heard and the tests' spans."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.proxies: list = []                       # (Proxy, mode) started by the plugin
        self.saved_env: dict[str, str | None] = {}
        self.through: Any = None                      # the --through-pool proxy, once started
        self.upstream_origin = ""                     # where the --through-pool DSN came from
        self.notes: list[str] = []                    # what the report's header says besides
        self._lock = threading.Lock()
        self.events: list = []
        self.tests: list[RecordedTest] = []
        self._starts: list[float] = []
        self.by_id: dict[str, RecordedTest] = {}

    # -- settings, from the command line, the ini file, the environment -----------------

    def option(self, name: str) -> Any:
        """A command-line option's value; early (before the conftests load), from the known arguments."""
        value = self.config.getoption(name, default=None)
        if value is None or value == []:
            early = getattr(self.config, "known_args_namespace", None)
            value = getattr(early, name, value)
        return value

    def pool_size(self) -> int:
        value = self.option("tpp_pool_size")
        if value is None:
            value = self.config.getini("tpp_pool_size")
        try:
            size = int(value)
        except (TypeError, ValueError):
            raise pytest.UsageError(f"tpp_pool_size: expected a positive integer, got {value!r}") from None
        if size < 1:
            raise pytest.UsageError(f"--tpp-pool-size: expected a positive integer, got {size}")
        return size

    def linger(self) -> bool:
        return bool(self.option("tpp_linger") or self.config.getini("tpp_linger"))

    def wait_timeout(self) -> float:
        value = self.config.getini("tpp_wait_timeout")
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = -1.0
        if seconds <= 0:
            raise pytest.UsageError(f"tpp_wait_timeout: expected a number of seconds > 0, got {value!r}")
        return seconds

    def env_names(self) -> list[str]:
        return ["DATABASE_URL"] + list(self.config.getini("tpp_env")) + list(self.option("tpp_env") or [])

    def upstream(self) -> tuple["ConnInfo", str]:
        """The database to front, and where its DSN came from (for messages)."""
        from . import dsn as dsn_mod
        candidates = [("--tpp-dsn", self.option("tpp_dsn")), ("ini tpp_dsn", self.config.getini("tpp_dsn")),
                      ("$TPP_DSN", os.environ.get("TPP_DSN")), (f"${UPSTREAM_ENV}", os.environ.get(UPSTREAM_ENV)),
                      ("$DATABASE_URL", os.environ.get("DATABASE_URL"))]
        for origin, text in candidates:
            if text:
                try:
                    return dsn_mod.parse(text), origin
                except dsn_mod.DsnError as exc:
                    raise pytest.UsageError(f"threadpool_proxy: {origin}: {exc}") from None
        if os.environ.get("PGHOST") or os.environ.get("PGHOSTADDR"):
            params = {k: os.environ[e] for k, e in (("host", "PGHOST"), ("hostaddr", "PGHOSTADDR"),
                                                    ("port", "PGPORT"), ("dbname", "PGDATABASE"))
                      if os.environ.get(e)}
            return dsn_mod.ConnInfo(params), "$PGHOST/$PGPORT"
        raise pytest.UsageError(
            "threadpool_proxy: no database to put the proxy in front of: give --tpp-dsn (or ini tpp_dsn, "
            "$TPP_DSN), or set $DATABASE_URL or $PGHOST/$PGPORT as your tests do")

    # -- proxies ------------------------------------------------------------------------

    def start_proxy(self, upstream: "ConnInfo", origin: str, mode: str, pool_size: int | None = None,
                    linger: bool | None = None, **settings: Any) -> "Proxy":
        """A started proxy in front of ``upstream`` in ``mode``, reporting its events to this run."""
        import threadpool_proxy
        try:
            addresses = upstream.addresses
        except ValueError as exc:
            raise pytest.UsageError(f"threadpool_proxy: {origin}: {exc}") from None
        if not addresses or any(h.startswith(("/", "@")) for h, _ in addresses):
            raise pytest.UsageError(
                f"threadpool_proxy: {origin} ({upstream.redacted()}) names no TCP server: the proxy reaches "
                f"PostgreSQL over TCP; give a host name or address (--tpp-dsn)")
        for host, port in addresses:
            try:
                socket.create_connection((host, port), timeout=5).close()
            except OSError as exc:
                raise pytest.UsageError(f"threadpool_proxy: cannot reach PostgreSQL at {host}:{port} "
                                        f"(from {origin}): {exc.strerror or exc}") from None
        entry: dict[str, Any] = ({"host": addresses[0][0], "port": addresses[0][1]} if len(addresses) == 1 else
                                 {"nodes": [{"host": h, "port": p} for h, p in addresses]})
        if upstream.get("target_session_attrs"):
            entry["target_session_attrs"] = upstream.get("target_session_attrs")
        config: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "pool_mode": mode,
            "pool_size": pool_size or self.pool_size(),
            "server_linger": self.linger() if linger is None else linger,
            "query_wait_timeout": self.wait_timeout(),
            "databases": {"*": entry},
        }
        sslmode = upstream.get("sslmode") or os.environ.get("PGSSLMODE")
        if sslmode in _TLS_REQUIRED:
            config["server_tls_sslmode"] = sslmode
            if upstream.get("sslrootcert"):
                config["server_tls_ca_file"] = upstream.get("sslrootcert")
        config.update(settings)
        try:
            proxy = threadpool_proxy.start(config, on_event=self.heard)
        except (threadpool_proxy.ConfigError, OSError) as exc:
            raise pytest.UsageError(f"threadpool_proxy: could not start a proxy in front of {origin}: {exc}") \
                from None
        self.proxies.append((proxy, mode))
        log.info("threadpool_proxy: %s pooling on %s:%d in front of %s (%s)", mode, proxy.host, proxy.port,
                 upstream.redacted(), origin)
        return proxy

    def stop_proxy(self, proxy: "Proxy") -> None:
        proxy.events.flush(10)
        proxy.stop()

    def stop_all(self) -> None:
        for proxy, _mode in reversed(self.proxies):
            if not proxy.stopped:
                proxy.stop()

    # -- --through-pool --------------------------------------------------------------------

    def start_through_pool(self, mode: str) -> None:
        """Start the run's proxy and point the environment the app reads at it (once)."""
        if self.through is not None:
            return
        upstream, origin = self.upstream()
        proxy = self.through = self.start_proxy(upstream, origin, mode)
        self.upstream_origin = origin
        self._set_env(UPSTREAM_ENV, upstream.to_string())
        for name in self.env_names():
            text = os.environ.get(name)
            if not text:
                continue
            from . import dsn as dsn_mod
            try:
                info = dsn_mod.parse(text)
            except dsn_mod.DsnError as exc:
                raise pytest.UsageError(f"threadpool_proxy: ${name}: {exc}") from None
            self._set_env(name, to_proxy(info, proxy).to_string())
        elsewhere = self._pg_env_elsewhere(upstream)
        if elsewhere:
            self.notes.append(f"$PGHOST/$PGPORT name another server ({elsewhere}): left alone, so code that "
                              f"reads them does not go through the proxy")
            return
        self._set_env("PGHOST", proxy.host)
        self._set_env("PGPORT", str(proxy.port))
        self._set_env("PGHOSTADDR", None)
        if os.environ.get("PGSSLMODE") in _TLS_REQUIRED:
            self._set_env("PGSSLMODE", "disable")

    @staticmethod
    def _pg_env_elsewhere(upstream: "ConnInfo") -> str:
        """host:port that $PGHOSTADDR/$PGHOST and $PGPORT name when it is not a server of ``upstream``, else ""."""
        host = os.environ.get("PGHOSTADDR") or os.environ.get("PGHOST")
        if not host:
            return ""                 # libpq's default: pointing it at the proxy changes no server choice
        port = os.environ.get("PGPORT") or "5432"
        try:
            named = {(h, str(p)) for h, p in upstream.addresses}
        except ValueError:
            return ""
        return "" if (host, port) in named else f"{host}:{port}"

    def _set_env(self, name: str, value: str | None) -> None:
        if name not in self.saved_env:
            self.saved_env[name] = os.environ.get(name)
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def restore_env(self) -> None:
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self.saved_env.clear()

    # -- events and tests --------------------------------------------------------------------

    def heard(self, event: "Event") -> None:
        """The proxies' event hook (their dispatcher thread calls it)."""
        with self._lock:
            self.events.append(event)

    def test_started(self, nodeid: str) -> None:
        record = RecordedTest(nodeid, time.monotonic())
        self.tests.append(record)
        self._starts.append(record.start)
        self.by_id[nodeid] = record

    def test_ended(self, nodeid: str) -> None:
        record = self.by_id.get(nodeid)
        if record is not None:
            record.end = time.monotonic()

    def attribute(self) -> list:
        """Give each event to the test that ran when it happened; returns the events outside any test."""
        for proxy, _mode in self.proxies:
            if not proxy.stopped:
                proxy.events.flush(10)
        with self._lock:
            events, self.events = self.events, []
        outside = []
        for event in events:
            i = bisect.bisect_right(self._starts, event.monotonic) - 1
            if i >= 0 and event.monotonic <= self.tests[i].end:
                self.tests[i].events.append(event)
            else:
                outside.append(event)
        return outside


def to_proxy(info: "ConnInfo", proxy: "Proxy") -> "ConnInfo":
    """``info`` (a DSN) pointed at ``proxy``: its host and port, TLS off on that loopback hop."""
    changes: dict[str, str | None] = {"host": proxy.host, "port": str(proxy.port), "hostaddr": None}
    if info.get("sslmode") in _TLS_REQUIRED:
        changes["sslmode"] = "disable"
    if info.get("channel_binding") == "require":
        changes["channel_binding"] = "disable"
    return info.replace(**changes)


_STATE = pytest.StashKey[PluginState]()


def _state(config: pytest.Config) -> PluginState:
    state = config.stash.get(_STATE, None)
    if state is None:
        state = config.stash[_STATE] = PluginState(config)
    return state


# -- hooks ------------------------------------------------------------------------------------

@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list) -> None:
    """--through-pool: start the proxy and rewrite the environment before any conftest is imported."""
    mode = getattr(early_config.known_args_namespace, "tpp_through_pool", None)
    if mode:
        _state(early_config).start_through_pool(mode)


def pytest_configure(config: pytest.Config) -> None:
    state = _state(config)
    mode = config.getoption("tpp_through_pool", default=None)
    if mode:
        state.start_through_pool(mode)        # (loaded too late for the early hook: a conftest's pytest_plugins)


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is not None:
        state.stop_all()
        state.restore_env()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    state = item.config.stash.get(_STATE, None)
    if state is not None:
        state.test_started(item.nodeid)
    try:
        yield
    finally:
        if state is not None:
            state.test_ended(item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Generator[None, Any, None]:
    """Keep each test's outcome, and the crash message of a failure, for the summary."""
    outcome = yield
    state = item.config.stash.get(_STATE, None)
    record = state.by_id.get(item.nodeid) if state is not None else None
    if record is None:
        return
    report = outcome.get_result()
    if report.failed:
        if record.outcome != "failed":
            record.outcome = "failed" if report.when == "call" else "error"
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr)
        record.failure = record.failure or (text.strip().splitlines() or [""])[0]
    elif report.skipped and record.outcome == "passed":
        record.outcome = "skipped"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    state = config.stash.get(_STATE, None)
    if state is None or not state.proxies:
        return
    outside = state.attribute()
    for line in report_lines(state, outside):
        terminalreporter.write_line(line)


# -- the report ------------------------------------------------------------------------------

def _is_noise(event: "Event") -> bool:
    """Events the plugin caused itself: its proxies stopping at the end of a fixture's scope."""
    return event.kind == "proxy_error" and event.detail == "the proxy is shutting down"


def report_lines(state: PluginState, outside: list) -> list[str]:
    """The summary: a header, one block per test worth a look, a closing count."""
    modes = sorted({mode for _proxy, mode in state.proxies})
    linger = state.linger()
    lines = ["", "=" * 20 + " threadpool_proxy: what pooling saw " + "=" * 20]
    if state.through is not None:
        lines.append(f"the suite ran through {state.config.getoption('tpp_through_pool')} pooling "
                     f"(pool_size {state.pool_size()}, in front of {state.upstream_origin})")
    else:
        lines.append(f"proxies started by fixtures: {', '.join(modes)} pooling (pool_size {state.pool_size()})")
    lines += state.notes
    lines.append("server connections released and reset at every transaction end" if not linger else
                 "clients kept idle server connections while nobody waited (--tpp-linger): session state may "
                 "survive here and break under load")
    looked = 0
    failed_after_reset = 0
    totals = dict.fromkeys(TROUBLE, 0)
    for record in state.tests:
        events = [e for e in record.events if not _is_noise(e)]
        counts = {kind: sum(e.number for e in events if e.kind == kind) for kind in TROUBLE}
        releases = sum(1 for e in events if e.kind == "server_release")
        for kind, n in counts.items():
            totals[kind] += n
        failed = record.outcome in ("failed", "error")
        if not failed and not any(counts.values()):
            continue
        looked += 1
        lines.append(f"{record.nodeid}: {record.outcome.upper()}" if failed else f"{record.nodeid}:")
        if failed:
            if record.failure:
                lines.append(f"    {record.failure}")
            if releases:
                failed_after_reset += 1
                lines.append(f"    its server connection went back to the pool, reset, at the end of {releases} of "
                             f"its transactions: session state (SET, temporary tables, LISTEN, advisory locks, "
                             f"SQL PREPARE) made in one transaction was gone in the next")
            elif not any(counts.values()):
                lines.append("    the proxy saw nothing that pooling breaks in this test")
        for kind, n in counts.items():
            if n:
                lines.append(f"    {TROUBLE[kind]}: {n}")
                details = sorted({f"{e.sqlstate} {e.detail}".strip() for e in events
                                  if e.kind == kind and (e.sqlstate or e.detail)})
                for detail in details[:3]:
                    lines.append(f"        {detail}")
    trouble_outside = [e for e in outside if e.kind in TROUBLE and not _is_noise(e)]
    if trouble_outside:
        outside_counts = {k: sum(e.number for e in trouble_outside if e.kind == k) for k in TROUBLE}
        lines.append("outside any test (session fixtures, collection): "
                     + ", ".join(f"{TROUBLE[k]}: {n}" for k, n in outside_counts.items() if n))
    failures = sum(1 for r in state.tests if r.outcome in ("failed", "error"))
    lines.append(f"{len(state.tests)} tests, {failures} failed ({failed_after_reset} after a reset between "
                 f"transactions); " + ", ".join(f"{TROUBLE[k]}: {n}" for k, n in totals.items()))
    if not looked:
        lines.append("nothing that pooling breaks was seen")
    return lines


# -- fixtures ----------------------------------------------------------------------------------

def proxy_fixture(pool_mode: str = "transaction", scope: str = "function", pool_size: int | None = None,
                  dsn: str | None = None, linger: bool | None = None,
                  **settings: Any) -> Callable[..., Any]:
    """A fixture (assign it to a name in a conftest) that yields a PooledDSN through a proxy of its own.

    ``pool_mode``: transaction, statement or session; ``scope``: any pytest
    scope; ``pool_size`` and ``linger``: the plugin's settings by default;
    ``dsn``: the database to front (default: as ``--through-pool`` finds
    it); ``settings``: more proxy settings (configuration keys).  The proxy
    stops at the end of the scope.
    """
    if pool_mode not in MODES:
        raise ValueError(f"pool_mode: expected one of {', '.join(MODES)}, got {pool_mode!r}")

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def pooled_dsn(request: pytest.FixtureRequest) -> Iterator[PooledDSN]:
        state = _state(request.config)
        if dsn is not None:
            from . import dsn as dsn_mod
            upstream, origin = dsn_mod.parse(dsn), "the fixture's dsn"
        else:
            upstream, origin = state.upstream()
        proxy = state.start_proxy(upstream, origin, pool_mode, pool_size, linger, **settings)
        try:
            yield PooledDSN(to_proxy(upstream, proxy).to_string(), proxy)
        finally:
            state.stop_proxy(proxy)

    return pooled_dsn


tpp_transaction_dsn = proxy_fixture("transaction")
tpp_statement_dsn = proxy_fixture("statement")
tpp_session_dsn = proxy_fixture("session")


@pytest.fixture(scope="session")
def tpp_upstream_dsn(request: pytest.FixtureRequest) -> str:
    """The DSN of the database the plugin's proxies front (as found: --tpp-dsn, ini, $TPP_DSN, $DATABASE_URL...)."""
    upstream, _origin = _state(request.config).upstream()
    return upstream.to_string()
