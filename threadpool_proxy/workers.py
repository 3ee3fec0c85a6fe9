"""``workers: N``: N worker processes serving one port, and the supervisor that keeps them running.

One Python process runs one thread at a time (the GIL), so a busy proxy is
bound to one core.  With ``workers`` above 1 the command line runs a
supervisor that starts N worker processes; each is a whole proxy (its own
``ProxyServer``, pool, threads) with a listening socket of its own bound to
the same address with ``SO_REUSEPORT``, so the kernel spreads new connections
over them.  What must hold for the proxy as a whole is kept so:

* limits are divided (``config.for_worker``): ``pool_size`` (each database's),
  ``max_pending_logins``, ``max_client_conn``, ``max_idle_per_key``,
  ``max_total_idle``: ``total // N`` each and one more for the first
  ``total % N`` workers, so PostgreSQL never sees more than ``pool_size``
  connections of one key (unless ``pool_size < N``: every worker keeps at
  least 1, which is warned about at start-up);
* a CancelRequest may reach any worker: the worker's index is encoded in the
  secret of the BackendKeyData it gave out, and the worker that receives the
  request forwards it on the peer channel (peers.py) to the owner;
* the admin console and the metrics endpoint ask the other workers for their
  figures over the same channel and show the sum;
* SIGTERM, SIGINT and SIGHUP to the supervisor are passed to every worker (a
  worker's own process group keeps a terminal's Ctrl-C from reaching it
  twice); SHUTDOWN on the console signals the supervisor; a worker that dies
  is started again (after a pause if it keeps dying) and logged; a worker
  whose supervisor is gone stops.

Workers are started with multiprocessing's ``spawn`` (a fresh interpreter),
not ``fork``: the supervisor itself runs no threads, but ``fork`` copies
whatever state the parent has (locks held by a logging handler, an imported
library's thread), and restarts happen long after start-up; a fresh
interpreter costs about 0.2 s per (re)start and is right whatever the
parent holds.  The supervisor keeps a bound (not listening) SO_REUSEPORT
socket on the port: it resolves ``port: 0`` once for all workers, fails
start-up cleanly when the port is taken, and keeps the port while a worker
restarts.
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
import time

from . import config as config_mod
from .peers import WorkerSlot
from .stopping import StopSignals, install_reload

log = logging.getLogger("threadpool_proxy.workers")

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
            if config.workers != spec.config.workers or config.listen_port != spec.config.listen_port:
                config = dataclasses.replace(config, workers=spec.config.workers,
                                             listen_port=spec.config.listen_port)
        except config_mod.ConfigError as exc:
            log.warning("%s; starting with the configuration the proxy was last (re)loaded with", exc)
            config = spec.config
    proxy = Proxy(config, config_path=spec.config_path, overrides=spec.overrides, worker=spec.slot)
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
    ready.send(("ready", proxy.port))
    ready.close()
    orphan = False
    try:
        while not proxy.stopped:
            signals.act()
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


# -- the supervisor ------------------------------------------------------------------

class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.started = 0.0
        self.restart_at = 0.0          # monotonic time of the next start; 0 while running
        self.delay = 0.0               # the pause before the next restart after a quick death
        self.ready = None              # a restarted worker's pipe, until it says it listens


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
        self._signals: list[int] = []
        self._reserved: socket.socket | None = None

    def run(self) -> int:
        try:
            self._reserve_port()
        except OSError as exc:
            print(f"threadpool-proxy: cannot listen on {self.config.listen_host}:{self.config.listen_port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1
        for line in config_mod.split_warnings(self.config):
            log.warning("%s", line)
        cores = cores_warning(self.count)
        if cores:
            log.warning("%s", cores)
        self.rundir = tempfile.mkdtemp(prefix="threadpool_proxy-")      # mode 0700: the peer sockets
        log.info("peer channel in %s", self.rundir)
        wake_r, wake_w = socket.socketpair()
        try:
            for sock in (wake_r, wake_w):
                sock.setblocking(False)
            old_wakeup = signal.set_wakeup_fd(wake_w.fileno())
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, lambda signum, _frame: self._signals.append(signum))
            try:
                status = self._start_all()
                stop_signal = signal.SIGTERM
                if status == 0:
                    log.info("threadpool_proxy listening on %s:%d with %d worker processes (pids %s)",
                             self.config.listen_host, self.config.listen_port, self.count,
                             ", ".join(str(w.process.pid) for w in self.workers))
                    stop_signal = self._supervise(wake_r)
                self._stop_all(stop_signal, wake_r)
            finally:
                signal.set_wakeup_fd(old_wakeup)
            return status
        finally:
            wake_r.close()
            wake_w.close()
            if self._reserved is not None:
                self._reserved.close()
            shutil.rmtree(self.rundir, ignore_errors=True)

    def _reserve_port(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.config.listen_host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.config.listen_host, self.config.listen_port))
        except OSError:
            sock.close()
            raise
        self._reserved = sock
        port = sock.getsockname()[1]
        self.overrides["listen_port"] = port
        self.config = dataclasses.replace(self.config, listen_port=port)

    def _spec(self, index: int) -> WorkerSpec:
        return WorkerSpec(slot=WorkerSlot(index, self.count, self.rundir), config=self.config,
                          config_path=self.config_path, overrides=self.overrides, log_level=self.log_level,
                          supervisor=os.getpid())

    def _launch(self, worker: _Worker):
        reader, writer = self.ctx.Pipe(duplex=False)
        process = self.ctx.Process(target=worker_main, args=(self._spec(worker.index), writer),
                                   name=f"threadpool_proxy-worker-{worker.index}", daemon=False)
        process.start()
        writer.close()
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
        """Until a stop signal (returned): restart workers that die, pass SIGHUP on."""
        while True:
            running = [w for w in self.workers if w.process is not None and w.restart_at == 0.0]
            due = [w.restart_at for w in self.workers if w.restart_at]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            starting = [w.ready for w in running if w.ready is not None]
            ready = multiprocessing.connection.wait([wake] + starting + [w.process.sentinel for w in running],
                                                    timeout)
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
            now = time.monotonic()
            for worker in running:
                if not worker.process.is_alive():
                    self._died(worker, now)
            for worker in self.workers:
                if worker.restart_at and worker.restart_at <= now:
                    worker.ready = self._launch(worker)
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
        code = process.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit status {code}"
        lived = now - worker.started
        worker.delay = min(max(1.0, worker.delay * 2), MAX_RESTART_DELAY) if lived < QUICK_DEATH else 0.0
        worker.restart_at = now + worker.delay
        log.error("worker %d (pid %d) died (%s) after %.1f s; restarting it%s", worker.index, process.pid, how,
                  lived, f" in {worker.delay:g} s" if worker.delay else "")

    def _reload(self) -> None:
        """SIGHUP: every worker re-reads the files; the supervisor keeps the result for restarts."""
        if self.config_path:
            try:
                new = config_mod.load(self.config_path)
                self.config = dataclasses.replace(new, **self.overrides, workers=self.count)
            except config_mod.ConfigError as exc:
                log.error("SIGHUP: %s (each worker keeps its configuration)", exc)
        for worker in self.workers:
            if worker.process is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGHUP)

    def _stop_all(self, signum: int, wake: socket.socket) -> None:
        """Pass the stop signal to every worker and wait for them; later stop signals are passed
        on too (a second one makes a graceful stop immediate); SIGKILL for those still there
        after the grace time (shutdown_timeout, if configured, plus STOP_GRACE)."""
        live = [w.process for w in self.workers if w.process is not None and w.process.is_alive()]
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
                live = [p for p in live if p.is_alive()]
                if not live or time.monotonic() >= deadline:
                    break
                multiprocessing.connection.wait([wake] + [p.sentinel for p in live],
                                                max(0.0, deadline - time.monotonic()))
                self._drain(wake)
                later, self._signals[:] = [s for s in self._signals if s in STOP_SIGNALS], []
                if later:
                    signum = later[-1]
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
