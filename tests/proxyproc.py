"""The proxy's command line as a real subprocess, for the tests of several proxies, readiness,
sd_notify and rolling restarts (import as ``from proxyproc import ProxyProcess, http_get``)."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys

import yaml

from helpers import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; (0, why) when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    except OSError as exc:
        return 0, str(exc)
    finally:
        conn.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


class ProxyProcess:
    """``python -m threadpool_proxy -c <tmp>/<name>.yaml``, logging to ``<tmp>/<name>.log``.

    ``settings`` are added to a transaction-mode configuration with one ``*``
    entry for ``pg``; the constructor returns once the proxy (or its
    supervisor) logged that it listens.
    """

    def __init__(self, pg, tmp_path, name: str = "proxy", env: dict | None = None, **settings) -> None:
        self.pg = pg
        self.name = name
        self.host = "127.0.0.1"
        raw = {"listen": {"host": self.host, "port": 0}, "pool_mode": "transaction", "pool_size": 10,
               "admin_users": ["app"], "query_wait_timeout": 30,
               "databases": {"*": {"host": pg.host, "port": pg.port}}}
        raw.update(settings)
        self.port = raw["listen"]["port"]
        assert self.port, "give listen.port: the tests need to know it before the proxy starts"
        self.metrics_port = int(raw["metrics_listen"].rsplit(":", 1)[1]) if raw.get("metrics_listen") else None
        self.conf = tmp_path / f"{name}.yaml"
        self.conf.write_text(yaml.safe_dump(raw))
        self.log_path = tmp_path / f"{name}.log"
        run_env = dict(os.environ, **(env or {}))
        run_env["PYTHONPATH"] = REPO + (os.pathsep + run_env["PYTHONPATH"] if run_env.get("PYTHONPATH") else "")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "threadpool_proxy", "-c", str(self.conf)],
                                         cwd=REPO, env=run_env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        started = "worker processes" if raw.get("workers", 1) > 1 else "listening on"
        assert wait_until(lambda: started in self.log() or self.proc.poll() is not None, timeout=90), self.log()
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        return http_get(self.metrics_port, path, timeout)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait; SIGKILL (this process only) if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(timeout) is None:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
