"""``workers: N``: N worker processes serving one port, and the supervisor that keeps them running.

One Python process runs one thread at a time (the GIL), so a busy proxy is
bound to one core.  With ``workers`` above 1 the command line runs a
supervisor that starts N worker processes; each is a whole proxy (its own
``ProxyServer``, pool, threads).  The supervisor makes N listening sockets
for each TCP address of ``listen.host`` (listeners.py), bound with
``SO_REUSEPORT`` (the kernel spreads new connections over them), and hands
worker i its set; the unix socket (``listen.unix_socket_dir``) is one, made
by the supervisor and handed to worker 0 alone.  It keeps its own copies,
so a worker that dies or is replaced leaves connections queued on its socket
for the next worker of its index instead of having the kernel reset them.
What must hold for the proxy as a whole is kept so:

* limits are divided (``config.for_worker``): ``pool_size`` (each database's),
  ``max_pending_logins``, ``max_client_conn``, ``max_idle_per_key``,
  ``max_total_idle``: ``total // N`` each and one more for the first
  ``total % N`` workers, so PostgreSQL never sees more than ``pool_size``
  connections of one key (unless ``pool_size < N``: every worker keeps at
  least 1, which is warned about at start-up);
* a CancelRequest may reach any worker: the worker's index is encoded in the
  secret of the BackendKeyData it gave out, and the worker that receives the
  request forwards it on the peer channel (peers.py) to the owner;
* the admin console asks the other workers for their figures over the same
  channel and shows the sum; the supervisor serves ``metrics_listen``
  (``/metrics``, ``/ready``, ``/live``) for all of them, asking each;
* SIGTERM, SIGINT and SIGHUP to the supervisor are passed to every worker (a
  worker's own process group keeps a terminal's Ctrl-C from reaching it
  twice); on SIGTERM ``/ready`` fails first, and the workers are told
  ``shutdown_unready_delay`` seconds later; SHUTDOWN on the console signals
  the supervisor; a worker that dies is started again (after a pause if it
  keeps dying) and logged; a worker whose supervisor is gone stops.

Workers are started with multiprocessing's ``spawn`` (a fresh interpreter),
not ``fork``: ``fork`` copies whatever state the parent has (locks held by a
logging handler, the metrics endpoint's thread), and restarts happen long
after start-up; a fresh interpreter costs about 0.2 s per (re)start and is
right whatever the parent holds.  The listening sockets go to the worker as
inherited descriptors.  Binding the sockets first resolves ``port: 0``
once for all workers and fails start-up cleanly when the port is taken.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time

from . import config as config_mod
from . import listeners as listeners_mod
from .peers import SUPERVISOR, Peers, WorkerSlot
from .logs import get_logger
from .readiness import Cached
from .sdnotify import Notifier
from .stopping import StopSignals, install_reload

log = get_logger("threadpool_proxy.workers")

#: Seconds the supervisor waits for every worker to listen at start-up.
START_TIMEOUT = 60.0

#: Seconds a worker is given to stop after SIGTERM (plus shutdown_timeout, if configured), then SIGKILL.
STOP_GRACE = 15.0

#: A worker that dies within this many seconds of its start is restarted after a pause
#: (1 s, doubling up to MAX_RESTART_DELAY), so a worker that cannot start does not spin.
QUICK_DEATH = 5.0
MAX_RESTART_DELAY = 30.0

#: Signals that stop the proxy; the supervisor passes the one it got to every worker.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is started with (pickled by multiprocessing's spawn)."""

    slot: WorkerSlot
    config: config_mod.Config           # the whole configuration, last known good (listen.port resolved)
    config_path: str | None             # what SIGHUP and RELOAD re-read
    overrides: dict
    log_level: int
    supervisor: int                     # the supervisor's pid
    listener: tuple                     # the listening sockets to serve (the supervisor keeps copies)


# -- one worker process ------------------------------------------------------------

def worker_main(spec: WorkerSpec, ready) -> None:
    """A worker's life: a Proxy with its slot, until SIGTERM/SIGINT, SHUTDOWN, or its supervisor is gone."""
    from .embed import Proxy

    os.setpgrp()        # a terminal's Ctrl-C reaches the supervisor only, which passes it on once
    logging.basicConfig(level=spec.log_level, format=LOG_FORMAT.replace("%(name)s", f"[worker {spec.slot.index}] "
                                                                                       "%(name)s"))
    config = spec.config
    if spec.config_path:      # a restarted worker takes the file as it is now, if it is good
        try:
            config = config_mod.load(spec.config_path)
            if spec.overrides:
                config = dataclasses.replace(config, **spec.overrides)
            # What every worker of the proxy must agree on changes only with a restart of the whole:
            # the port, the number of workers, and peer_id (the cancel keys of the others name it).
            fixed = {key: getattr(spec.config, key) for key in ("workers", "listen_port", "peer_id")
                     if getattr(config, key) != getattr(spec.config, key)}
            if fixed:
                if "peer_id" in fixed:
                    log.warning("peer_id %d in %s: keeping %d until the whole proxy restarts",
                                config.peer_id, spec.config_path, spec.config.peer_id)
                config = dataclasses.replace(config, **fixed)
        except config_mod.ConfigError as exc:
            log.warning("%s; starting with the configuration the proxy was last (re)loaded with", exc)
            config = spec.config
    proxy = Proxy(config, config_path=spec.config_path, overrides=spec.overrides, worker=spec.slot,
                  listener=spec.listener)
    signals = StopSignals(proxy)       # SIGTERM graceful, SIGINT/SIGQUIT now, as the command line
    signals.install()
    install_reload(proxy)
    try:
        proxy.start()
    except config_mod.ConfigError as exc:
        ready.send(("error", 2, f"configuration error: {exc}"))
        sys.exit(2)
    except OSError as exc:
        ready.send(("error", 1, f"cannot listen on {config.listen_host}:{config.listen_port}: "
                                f"{exc.strerror or exc}"))
        sys.exit(1)
    # SHUTDOWN on the console stops every worker: the supervisor passes the signal on
    # (SIGTERM for a graceful stop where the proxy has one, SIGINT for an immediate one).
    proxy.server.stopper = lambda graceful=False, *_: os.kill(spec.supervisor,
                                                               signal.SIGTERM if graceful else signal.SIGINT)
    retire_asked: list = []
    signal.signal(signal.SIGUSR2, lambda *_: retire_asked.append(True))     # a rolling restart replaced it
    retiring = None
    ready.send(("ready", proxy.port))
    ready.close()
    orphan = False
    try:
        while not proxy.stopped:
            signals.act()
            if retire_asked and retiring is None:
                retiring = threading.Thread(target=retire, args=(proxy,), name="threadpool_proxy-retire",
                                            daemon=True)
                retiring.start()
            if os.getppid() != spec.supervisor:
                log.warning("the supervisor (pid %d) is gone: stopping", spec.supervisor)
                orphan = True
                break
            time.sleep(0.2)
    finally:
        proxy.stop()
        if orphan:            # the supervisor cannot remove the peer directory now: the last worker out does
            try:
                os.rmdir(spec.slot.rundir)
            except OSError:
                pass


def retire(proxy) -> None:
    """Leave after a successor took this worker's place (rolling restart, SIGUSR2 from the supervisor).

    The successor accepts on the same listening socket, so this worker stops
    accepting at once and nothing queued is lost; its clients stay until they
    leave by themselves, ``worker_retire_timeout`` at most; those left then
    get the graceful stop (ended at their next transaction boundary with
    57P01, within ``shutdown_timeout``).
    """
    server = proxy.server
    timeout = server.config.worker_retire_timeout
    server.readiness.stop_serving("replaced by a new worker (rolling restart)")
    if proxy.peer_listener is not None:
        proxy.peer_listener.retire()      # questions go to the successor; cancels still reach this one
    server.stop_accepting()
    log.info("rolling restart: replaced; no new clients here; waiting up to %g s (worker_retire_timeout) for "
             "%d clients to leave", timeout, server.session_count())
    if server.wait_for_clients(timeout):
        log.info("rolling restart: every client left")
    elif not server.stopping:
        log.info("rolling restart: %d clients still connected: ending each at its next transaction boundary",
                 server.session_count())
    proxy.shutdown()


# -- the supervisor ------------------------------------------------------------------

class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.started = 0.0
        self.restart_at = 0.0          # monotonic time of the next start; 0 while running
        self.delay = 0.0               # the pause before the next restart after a quick death
        self.ready = None              # a restarted worker's pipe, until it says it listens


class _Replacement:
    """One step of a rolling restart: worker ``index``'s new process starting, then its old one retiring."""

    def __init__(self, index: int, process, ready) -> None:
        self.index = index
        self.process = process          # the new process
        self.ready = ready              # its pipe, until it says it listens (then None)
        self.old = None                 # the old process, once told to retire
        self.deadline = time.monotonic() + START_TIMEOUT

    def waitables(self) -> list:
        if self.ready is not None:
            return [self.ready, self.process.sentinel]
        return [self.old.sentinel] if self.old is not None else []


#: Seconds the supervisor's /ready waits for the workers' answers.
READY_ASK_TIMEOUT = 2.0


class SupervisorReadiness:
    """/ready and /live of the supervisor, for all its workers (readiness.py's answers, asked of each).

    Live while at least one worker process runs.  Ready once every worker
    started, until a stop begins, while at least one worker says it is ready
    (the kernel sends new clients only to workers that listen).
    """

    def __init__(self, supervisor: "Supervisor") -> None:
        self.supervisor = supervisor
        self.unready = "starting"
        self._ready = Cached(self._ask)

    def stop_serving(self, why: str) -> None:
        self.unready = why
        self._ready.forget()

    def live(self) -> tuple[bool, str]:
        running = self.supervisor.running_count()
        return running > 0, f"{running} of {self.supervisor.count} workers running"

    def ready(self) -> tuple[bool, str]:
        if self.unready:
            return False, self.unready
        return self._ready.get()

    def _ask(self) -> tuple[bool, str]:
        answers = self.supervisor.peers.ask_all({"kind": "ready"}, timeout=READY_ASK_TIMEOUT)
        ready = sorted(i for i, answer in answers.items() if answer and answer[0])
        if ready:
            return True, f"ready ({len(ready)} of {self.supervisor.count} workers)"
        why = "; ".join(f"worker {i}: {answer[1]}" for i, answer in sorted(answers.items()))
        return False, why or "no worker answered"


class Supervisor:
    """Starts the workers, passes signals on, restarts the ones that die; ``run()`` is the command line's life."""

    def __init__(self, config: config_mod.Config, config_path: str | None, overrides: dict,
                 log_level: int = logging.INFO) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = dict(overrides)
        self.log_level = log_level
        self.count = config.workers
        self.ctx = multiprocessing.get_context("spawn")
        self.workers = [_Worker(i) for i in range(self.count)]
        self.rundir = ""
        self.peers: Peers | None = None
        self.readiness = SupervisorReadiness(self)
        self.metrics = None                             # metrics.MetricsEndpoint, with metrics_listen
        self._signals: list[int] = []
        self._listeners: dict = {}                      # worker index -> its listeners.Listeners
        self.notifier = Notifier.from_environment()     # systemd: READY=1, STOPPING=1 (workers never see it)
        self._roll: list[int] = []                      # rolling restart: the workers still to replace
        self._replacing: _Replacement | None = None     # and the one being replaced
        self._replaced = 0

    def running_count(self) -> int:
        """Workers running now (not dead and waiting for their restart)."""
        return sum(1 for w in self.workers if w.process is not None and w.restart_at == 0.0)

    def run(self) -> int:
        if not listeners_mod.tcp_addresses(self.config.listen_host, 0):
            # The unix socket has one owner (worker 0): the others would have nothing to serve.
            print(f"threadpool-proxy: workers: {self.count} needs a TCP address in listen.host (the unix socket "
                  f"is served by worker 0 alone); with listen.unix_socket_dir only, run workers: 1",
                  file=sys.stderr)
            return 2
        try:
            self._listen_all()
        except OSError as exc:
            self._close_listeners()
            print(f"threadpool-proxy: cannot listen on {self.config.listen_host}:{self.config.listen_port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
        for line in config_mod.split_warnings(self.config):
            log.warning("%s", line)
        cores = cores_warning(self.count)
        if cores:
            log.warning("%s", cores)
        self.rundir = tempfile.mkdtemp(prefix="threadpool_proxy-")      # mode 0700: the peer sockets
        self.peers = Peers(WorkerSlot(SUPERVISOR, self.count, self.rundir))
        log.info("peer channel in %s", self.rundir)
        wake_r, wake_w = socket.socketpair()
        try:
            if self.config.metrics_listen:
                from .metrics import MetricsEndpoint, WorkersCollector
                try:
                    self.metrics = MetricsEndpoint(None, self.config.metrics_listen, readiness=self.readiness,
                                                   collector=WorkersCollector(self.peers),
                                                   config=lambda: self.config).start()
                except OSError as exc:
                    print(f"threadpool-proxy: cannot listen on {self.config.metrics_listen} (metrics_listen): "
                          f"{exc.strerror or exc}", file=sys.stderr)
                    return 1
            for sock in (wake_r, wake_w):
                sock.setblocking(False)
            old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR2):
                signal.signal(sig, lambda signum, _frame: self._signals.append(signum))
            try:
                status = self._start_all()
                stop_signal = signal.SIGTERM
                if status == 0:
                    log.info("threadpool_proxy listening on %s:%d with %d worker processes (pids %s)",
                             self.config.listen_host, self.config.listen_port, self.count,
                             ", ".join(str(w.process.pid) for w in self.workers))
                    self.readiness.unready = ""
                    self.notifier.send("READY=1", f"STATUS=listening on {self.config.listen_host}:"
                                                  f"{self.config.listen_port} with {self.count} workers")
                    stop_signal = self._supervise(wake_r)
                    self.notifier.send("STOPPING=1")
                self.readiness.stop_serving("shutting down")
                if status == 0 and stop_signal == signal.SIGTERM and self.config.shutdown_timeout > 0:
                    self._unready_delay(wake_r)
                self._stop_all(stop_signal, wake_r)
            finally:
                signal.set_wakeup_fd(old_wakeup)
            return status
        finally:
            wake_r.close()
            wake_w.close()
            if self.metrics is not None:
                self.metrics.stop()
            self._close_listeners()
            shutil.rmtree(self.rundir, ignore_errors=True)

    # -- the listening sockets -------------------------------------------------------

    def _new_listeners(self, index: int, port: int) -> "listeners_mod.Listeners":
        """Worker ``index``'s sockets: one per TCP address of ``listen.host`` (SO_REUSEPORT, on ``port``),
        and for worker 0 the unix socket too (a path has one owner; its successors inherit it)."""
        return listeners_mod.open_listeners(dataclasses.replace(self.config, listen_port=port), reuseport=True,
                                            unix=index == 0)

    def _listen_all(self) -> None:
        """The listening sockets of every worker on one port (the first resolves ``port: 0`` for all)."""
        first = self._new_listeners(0, self.config.listen_port)
        self._listeners[0] = first
        port = first.port
        self.overrides["listen_port"] = port
        self.config = dataclasses.replace(self.config, listen_port=port)
        for index in range(1, self.count):
            self._listeners[index] = self._new_listeners(index, port)

    def _close_listeners(self) -> None:
        for listeners in self._listeners.values():
            listeners.close()
        self._listeners.clear()

    def _listener(self, index: int) -> tuple:
        """Worker ``index``'s sockets; new ones if they were closed (its worker kept dying)."""
        listeners = self._listeners.get(index)
        if listeners is None:
            listeners = self._listeners[index] = self._new_listeners(index, self.config.listen_port)
        return tuple(listeners.all)

    # -- starting workers --------------------------------------------------------------

    def _spec(self, index: int) -> WorkerSpec:
        return WorkerSpec(slot=WorkerSlot(index, self.count, self.rundir), config=self.config,
                          config_path=self.config_path, overrides=self.overrides, log_level=self.log_level,
                          supervisor=os.getpid(), listener=self._listener(index))

    def _spawn(self, index: int):
        """A new process for worker ``index`` (on its listening socket) and the pipe it says "ready" on."""
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=worker_main, args=(self._spec(index), writer),
                                   name=f"threadpool_proxy-worker-{index}", daemon=False)
        process.start()
        writer.close()
        return process, reader

    def _launch(self, worker: _Worker):
        process, reader = self._spawn(worker.index)
        worker.process, worker.started, worker.restart_at = process, time.monotonic(), 0.0
        return reader

    def _start_all(self) -> int:
        """Start every worker and wait until each listens; the exit status (0, or a failed worker's)."""
        readers = [(w, self._launch(w)) for w in self.workers]
        deadline = time.monotonic() + START_TIMEOUT
        for worker, reader in readers:
            try:
                message = None
                while message is None and time.monotonic() < deadline and not self._stop_requested():
                    if reader.poll(0.2):
                        message = reader.recv()
                    elif not worker.process.is_alive():
                        message = ("error", 1, f"worker {worker.index} exited with status "
                                               f"{worker.process.exitcode} while starting")
            except EOFError:
                message = ("error", 1, f"worker {worker.index} exited with status "
                                       f"{worker.process.exitcode} while starting")
            finally:
                reader.close()
            if message is None:
                if self._stop_requested():
                    return 0
                print(f"threadpool-proxy: worker {worker.index} did not start within {START_TIMEOUT:g} s",
                      file=sys.stderr)
                return 1
            if message[0] == "error":
                print(f"threadpool-proxy: {message[2]}", file=sys.stderr)
                return message[1]
        return 0

    def _stop_requested(self) -> bool:
        return any(s in STOP_SIGNALS for s in self._signals)

    @staticmethod
    def _drain(wake: socket.socket) -> None:
        try:
            while wake.recv(512):
                pass
        except BlockingIOError:
            pass

    def _supervise(self, wake: socket.socket) -> int:
        """Until a stop signal (returned): restart workers that die, pass SIGHUP on, replace the
        workers one at a time on SIGUSR2."""
        while True:
            running = [w for w in self.workers if w.process is not None and w.restart_at == 0.0]
            due = [w.restart_at for w in self.workers if w.restart_at]
            replacing = self._replacing
            if replacing is not None:
                due.append(replacing.deadline)
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            starting = [w.ready for w in running if w.ready is not None]
            ready = multiprocessing.connection.wait([wake] + starting + [w.process.sentinel for w in running]
                                                    + (replacing.waitables() if replacing else []), timeout)
            for worker in running:
                if worker.ready is not None and worker.ready in ready:
                    self._started(worker)
            self._drain(wake)
            signals, self._signals[:] = list(self._signals), []
            for signum in signals:
                if signum in STOP_SIGNALS:
                    log.info("%s: stopping the %d workers", signal.Signals(signum).name, self.count)
                    return signum
                if signum == signal.SIGHUP:
                    self._reload()
                if signum == signal.SIGUSR2:
                    self._begin_roll()
            now = time.monotonic()
            for worker in running:
                if not worker.process.is_alive():
                    self._died(worker, now)
            if self._replacing is not None:
                self._advance_roll(now, ready)
            for worker in self.workers:
                if worker.restart_at and worker.restart_at <= now:
                    try:
                        worker.ready = self._launch(worker)
                    except OSError as exc:        # its listening socket could not be made again
                        worker.restart_at = now + max(1.0, worker.delay)
                        log.error("worker %d cannot listen on %s:%d: %s; trying again in %g s", worker.index,
                                  self.config.listen_host, self.config.listen_port, exc.strerror or exc,
                                  worker.restart_at - now)
                        continue
                    log.warning("worker %d restarted (pid %d)", worker.index, worker.process.pid)

    def _started(self, worker: _Worker) -> None:
        """A restarted worker's pipe spoke: it listens (or could not start, which its exit will show)."""
        try:
            message = worker.ready.recv()
        except (EOFError, OSError):
            message = None
        worker.ready.close()
        worker.ready = None
        if message and message[0] == "ready":
            log.info("worker %d (pid %d) is listening again", worker.index, worker.process.pid)
        elif message:
            log.error("worker %d could not start: %s", worker.index, message[2])

    def _died(self, worker: _Worker, now: float) -> None:
        if worker.ready is not None:
            worker.ready.close()
            worker.ready = None
        process = worker.process
        process.join(0)
        self._remove_sockets(process.pid)
        code = process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        lived = now - worker.started
        worker.delay = min(max(1.0, worker.delay * 2), MAX_RESTART_DELAY) if lived < QUICK_DEATH else 0.0
        worker.restart_at = now + worker.delay
        if worker.delay:
            # Nobody will accept on its socket for a while: close it, so that the kernel sends new
            # clients to the other workers (those queued on it are reset); a new one comes at restart.
            listener = self._listeners.pop(worker.index, None)
            if listener is not None:
                listener.close()
        log.error("worker %d (pid %d) died (%s) after %.1f s; restarting it%s", worker.index, process.pid, how,
                  lived, f" in {worker.delay:g} s" if worker.delay else "")

    # -- rolling restart (SIGUSR2) -----------------------------------------------------

    def _begin_roll(self) -> None:
        if self._replacing is not None:
            log.warning("SIGUSR2: a rolling restart is under way (worker %d of %d); this one is ignored",
                        self._replacing.index, self.count)
            return
        log.info("SIGUSR2: rolling restart: each worker in turn is replaced by a new process on its socket")
        self._roll = list(range(self.count))
        self._replaced = 0
        self._next_replacement()

    def _next_replacement(self) -> None:
        while self._roll:
            index = self._roll.pop(0)
            try:
                process, reader = self._spawn(index)
            except OSError as exc:                  # its listening socket could not be made again
                log.error("rolling restart: worker %d cannot listen: %s; it is left as it is", index,
                          exc.strerror or exc)
                continue
            self._replacing = _Replacement(index, process, reader)
            log.info("rolling restart: starting a new worker %d (pid %d)", index, process.pid)
            return
        log.info("rolling restart done: %d of %d workers replaced", self._replaced, self.count)

    def _advance_roll(self, now: float, ready: list) -> None:
        """The replacement under way: its new process listens (the old one retires), or failed;
        the old one is gone (the next worker's turn), or overstayed."""
        step = self._replacing
        if step.ready is not None:                                  # the new process is starting
            if step.ready not in ready and step.process.is_alive() and now < step.deadline:
                return
            message = None
            if step.ready in ready:
                try:
                    message = step.ready.recv()
                except (EOFError, OSError):
                    message = None
            step.ready.close()
            step.ready = None
            if message and message[0] == "ready":
                self._adopt(step, now)
                return
            why = (message[2] if message else f"exit status {step.process.exitcode}" if not step.process.is_alive()
                   else f"it did not listen within {START_TIMEOUT:g} s")
            log.error("rolling restart stopped: the new worker %d (pid %d) could not start: %s; the old one goes on",
                      step.index, step.process.pid, why)
            if step.process.is_alive():
                step.process.kill()
            step.process.join(5)
            self._remove_sockets(step.process.pid)
            self._replacing, self._roll = None, []
            return
        old = step.old                                              # the old process is retiring
        if old is None or not old.is_alive():
            if old is not None:
                old.join(0)
                self._remove_sockets(old.pid)
                log.info("rolling restart: the old worker %d (pid %d) left (exit status %s)", step.index, old.pid,
                         old.exitcode)
            self._replacing = None
            self._next_replacement()
        elif now >= step.deadline:
            log.error("rolling restart: the old worker %d (pid %d) did not leave in time: killing it",
                      step.index, old.pid)
            old.kill()
            step.deadline = now + STOP_GRACE

    def _adopt(self, step: "_Replacement", now: float) -> None:
        """The new process listens: it is worker ``step.index`` from now on; the old one retires (SIGUSR2)."""
        worker = self.workers[step.index]
        old = worker.process if worker.process is not None and worker.restart_at == 0.0 else None
        if worker.ready is not None:        # the old one was itself restarting after a death: it has no
            worker.ready.close()            # client yet, and SIGUSR2 may end it before its handler is set
            worker.ready = None
        worker.process, worker.started, worker.restart_at, worker.delay = step.process, now, 0.0, 0.0
        self._replaced += 1
        if old is not None and old.is_alive():
            os.kill(old.pid, signal.SIGUSR2)
            step.old = old
            config = self.config
            step.deadline = now + config.worker_retire_timeout + config.shutdown_timeout + STOP_GRACE
            log.info("rolling restart: worker %d is pid %d now; the old pid %d takes no new client and leaves "
                     "once its clients do (worker_retire_timeout %g s)", step.index, step.process.pid, old.pid,
                     config.worker_retire_timeout)
        else:
            step.old = None
            log.info("rolling restart: worker %d is pid %d now", step.index, step.process.pid)

    def _remove_sockets(self, pid: int) -> None:
        """The peer sockets a dead worker left (killed, it could not remove them): nobody answers there."""
        for _, _, owner, path in WorkerSlot(SUPERVISOR, self.count, self.rundir).sockets():
            if owner == pid:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def _reload(self) -> None:
        """SIGHUP: every worker re-reads the files; the supervisor keeps the result for restarts."""
        if self.config_path:
            try:
                new = config_mod.load(self.config_path)
                # What a restart alone changes (config.RESTART_ONLY: the listening sockets, workers,
                # peer_id...) stays: restarted workers must serve the same sockets and agree on keys.
                kept = {**self.overrides, **{name: getattr(self.config, name) for name in config_mod.RESTART_ONLY}}
                self.config = dataclasses.replace(new, **kept)
            except config_mod.ConfigError as exc:
                log.error("SIGHUP: %s (each worker keeps its configuration)", exc)
        for worker in self.workers:
            if worker.process is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGHUP)

    def _unready_delay(self, wake: socket.socket) -> None:
        """SIGTERM: /ready fails now; the workers go on accepting for shutdown_unready_delay seconds,
        or until another stop signal (left in ``_signals`` for ``_stop_all``, which passes it on)."""
        delay = self.config.shutdown_unready_delay
        if delay <= 0:
            return
        log.info("shutting down: /ready answers 503; clients are still accepted for %g s "
                 "(shutdown_unready_delay)", delay)
        deadline = time.monotonic() + delay
        while not self._stop_requested() and time.monotonic() < deadline:
            multiprocessing.connection.wait([wake], max(0.0, deadline - time.monotonic()))
            self._drain(wake)

    def _stop_all(self, signum: int, wake: socket.socket) -> None:
        """Pass the stop signal to every worker and wait for them; later stop signals are passed
        on too (a second one makes a graceful stop immediate); SIGKILL for those still there
        after the grace time (shutdown_timeout, if configured, plus STOP_GRACE)."""
        # The workers' copies of the listening sockets are the last: each closes as its worker stops
        # accepting, and new clients are refused instead of queued for a worker that will not come.
        self._close_listeners()
        live = [w.process for w in self.workers if w.process is not None and w.process.is_alive()]
        step = self._replacing                  # a rolling restart's new (still starting) or old process
        if step is not None:
            live += [p for p in (step.process if step.ready is not None else None, step.old)
                     if p is not None and p.is_alive()]
        grace = STOP_GRACE + getattr(self.config, "shutdown_timeout", 0.0)
        deadline = time.monotonic() + grace
        while True:
            for process in live:
                try:
                    os.kill(process.pid, signum)
                except ProcessLookupError:
                    pass
            signum = 0
            while not signum:
                later, self._signals[:] = [s for s in self._signals if s in STOP_SIGNALS], []
                if later:
                    signum = later[-1]
                    break
                live = [p for p in live if p.is_alive()]
                if not live or time.monotonic() >= deadline:
                    break
                multiprocessing.connection.wait([wake] + [p.sentinel for p in live],
                                                max(0.0, deadline - time.monotonic()))
                self._drain(wake)
            if not signum:
                break
        for process in live:
            if process.is_alive():
                log.error("worker pid %d did not stop within %.0f s: killing it", process.pid, grace)
                process.kill()
                process.join(5)
        log.info("threadpool_proxy stopped (%d workers)", self.count)


def cores_warning(workers: int, cpus: int | None = None) -> str | None:
    """The start-up warning when ``workers`` processes have fewer CPUs than that to run on, or None.

    ``cpus``: how many this process may run on (``os.sched_getaffinity``:
    taskset, cgroup cpusets, a container's limit; ``os.cpu_count()`` where
    there is no affinity).  A worker's worth is a core of its own: beyond the
    CPUs they share them, with PostgreSQL and the clients if those run here too.
    """
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
    if workers <= cpus:
        return None
    return (f"workers: {workers}, but this process may run on {cpus} CPU{'s' if cpus != 1 else ''} "
            f"(sched_getaffinity): workers beyond the CPUs only share them (and each costs ~30 MB); "
            f"use workers: {cpus} or fewer, or give the proxy more CPUs")


def run(config: config_mod.Config, config_path: str | None, overrides: dict, log_level: int) -> int:
    """The command line with ``workers`` > 1: supervise the workers until a signal stops them."""
    return Supervisor(config, config_path, overrides, log_level).run()
