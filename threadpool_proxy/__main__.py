"""Command line: ``python -m threadpool_proxy -c conf/proxy.yaml`` (or a PgBouncer ``pgbouncer.ini``, or ``--demo``)."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import time

from . import config as config_mod
from .embed import Proxy
from .sdnotify import Notifier
from .stopping import StopSignals, install_reload

log = logging.getLogger("threadpool_proxy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="threadpool-proxy",
                                     description="PostgreSQL connection pooler (one thread per client).")
    parser.add_argument("-c", "--config", help="configuration file: YAML (see conf/proxy.yaml) or PgBouncer's "
                                                "pgbouncer.ini (see conf/pgbouncer.ini)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective configuration as native YAML (secrets masked) and exit")
    parser.add_argument("--demo", action="store_true",
                        help="start a throwaway PostgreSQL from this machine's binaries and the proxy in front of it")
    parser.add_argument("-p", "--port", type=int, help="override listen.port")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    args = parser.parse_args(argv)
    if not args.config and not args.demo:
        parser.error("give -c CONFIG or --demo")

    demo = None
    overrides = {}
    notes: list = []          # what a pgbouncer.ini sets that the proxy does not do (one line)
    try:
        if args.demo:
            from .demo import DemoCluster
            demo = DemoCluster()
            raw = demo.start()
            if args.config:
                print("--demo ignores -c; it writes its own configuration", file=sys.stderr)
            config = config_mod.from_dict(raw)
        else:
            config = config_mod.load(args.config, notes)
        if args.port is not None:
            import dataclasses
            overrides["listen_port"] = args.port
            config = dataclasses.replace(config, **overrides)
        if args.print_config:
            for note in notes:
                print(f"# {note}")
            sys.stdout.write(config_mod.dump(config))
            if demo:
                demo.stop()
            return 0
    except config_mod.ConfigError as exc:
        print(f"threadpool-proxy: configuration error: {exc}", file=sys.stderr)
        if demo:
            demo.stop()
        return 2
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        detail = getattr(exc, "stderr", None)
        detail = detail.decode(errors="replace").strip().splitlines()[-1:] if isinstance(detail, bytes) else []
        print(f"threadpool-proxy: --demo could not start PostgreSQL: {exc}"
              + (f" ({detail[0]})" if detail else ""), file=sys.stderr)
        if demo:
            demo.stop()
        return 1

    level = logging.DEBUG if args.verbose else getattr(logging, config.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.logfile:
        try:
            # Reopened when logrotate moves it away (PgBouncer reopens it at SIGHUP).
            handler = logging.handlers.WatchedFileHandler(config.logfile, encoding="utf-8")
        except OSError as exc:
            print(f"threadpool-proxy: configuration error: logfile: cannot open {config.logfile}: {exc.strerror}",
                  file=sys.stderr)
            return 2
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    for note in notes:
        log.warning("%s", note)
    if config.pidfile:
        try:
            with open(config.pidfile, "w", encoding="ascii") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as exc:
            print(f"threadpool-proxy: configuration error: pidfile: cannot write {config.pidfile}: {exc.strerror}",
                  file=sys.stderr)
            return 2
    try:
        return _serve(config, args, overrides, level, demo)
    finally:
        if config.pidfile:
            try:
                os.unlink(config.pidfile)
            except OSError:
                pass


def _serve(config, args, overrides: dict, level: int, demo) -> int:
    """Run the proxy (or its worker processes) until it stops; the exit status."""
    if config.workers > 1 and not demo:
        from . import workers
        return workers.run(config, args.config, overrides, level)
    proxy = Proxy(config, config_path=None if demo else args.config, overrides=overrides)
    signals = StopSignals(proxy)
    notifier = Notifier.from_environment()          # systemd Type=notify: READY=1, STOPPING=1
    told_stopping = False
    try:
        try:
            proxy.start()
        except config_mod.ConfigError as exc:      # e.g. an auth file others can read
            print(f"threadpool-proxy: configuration error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"threadpool-proxy: cannot listen on {config.listen_host}:{config.listen_port}: {exc.strerror}",
                  file=sys.stderr)
            return 1
        signals.install()
        install_reload(proxy)
        rolling: list = []                    # SIGUSR2, a rolling restart, replaces worker processes: none here
        if hasattr(signal, "SIGUSR2"):
            signal.signal(signal.SIGUSR2, lambda *_: rolling.append(True))
        if demo:
            print(demo.banner(proxy.port), flush=True)
        notifier.send("READY=1", f"STATUS=listening on {proxy.host}:{proxy.port}")
        # The stop runs in a thread of its own; this one only sleeps (signal handlers
        # run here and take no lock) and acts on what they noted.
        while not proxy.stopped:
            signals.act()
            if rolling:
                rolling.clear()
                log.warning("SIGUSR2 (a rolling restart of the workers) needs workers above 1; ignored")
            if not told_stopping and (signals.stopping or proxy.server.readiness.unready):
                told_stopping = True          # a signal, or SHUTDOWN on the console
                notifier.send("STOPPING=1")
            time.sleep(0.2)
    finally:
        if not told_stopping:
            notifier.send("STOPPING=1")
        proxy.stop()
        if demo:
            demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
