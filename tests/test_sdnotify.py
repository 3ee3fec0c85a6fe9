"""sd_notify: the command line tells a real unix datagram socket (as systemd's $NOTIFY_SOCKET)
READY=1 once it listens and STOPPING=1 when a stop begins, in that order, from the main process."""

from __future__ import annotations

import logging
import os
import signal
import socket
import uuid

import pytest

from proxyproc import ProxyProcess, port_open
from threadpool_proxy.pgcluster import free_port
from threadpool_proxy.sdnotify import Notifier


class NotifySocket:
    """A bound datagram socket; ``next()`` is the next message and its sender's pid."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def next(self, timeout: float = 60.0) -> tuple[str, int]:
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(payload[:4], "little")
        return data.decode(), pid

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_path(tmp_path):
    path = str(tmp_path / "notify.sock")
    listener = NotifySocket(path)
    yield path, listener
    listener.close()


def _run(pg, tmp_path, notify_socket: str, listener: NotifySocket, **settings):
    port = free_port()
    proxy = ProxyProcess(pg, tmp_path, env={"NOTIFY_SOCKET": notify_socket},
                         listen={"host": "127.0.0.1", "port": port}, **settings)
    try:
        ready, sender = listener.next()
        assert ready.splitlines()[0] == "READY=1"
        assert ready.splitlines()[1].startswith(f"STATUS=listening on 127.0.0.1:{port}")
        assert sender == proxy.proc.pid
        assert port_open(port)                      # told ready once it accepts
        proxy.signal(signal.SIGTERM)
        stopping, sender = listener.next()
        assert stopping == "STOPPING=1"
        assert sender == proxy.proc.pid
        assert proxy.wait(60) == 0, proxy.log()
        with pytest.raises(socket.timeout):        # and nothing else: no worker spoke
            listener.next(timeout=0.5)
    finally:
        proxy.stop()
    return proxy


def test_ready_then_stopping_on_a_socket_path(pg, tmp_path, notify_path):
    path, listener = notify_path
    _run(pg, tmp_path, path, listener)


def test_an_abstract_socket_name(pg, tmp_path):
    name = f"threadpool-proxy-test-{uuid.uuid4().hex}"
    listener = NotifySocket("\0" + name)
    try:
        _run(pg, tmp_path, "@" + name, listener)
    finally:
        listener.close()


def test_with_workers_the_supervisor_alone_speaks_once_all_listen(pg, tmp_path, notify_path):
    path, listener = notify_path
    proxy = _run(pg, tmp_path, path, listener, workers=2)
    log = proxy.log()
    assert log.count("[worker 0]") and log.count("[worker 1]")
    assert "READY=1" not in log


def test_without_notify_socket_nothing_is_sent(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier.from_environment().send("READY=1") is False


def test_the_variable_is_taken_out_of_the_environment(tmp_path, notify_path):
    path, listener = notify_path
    environ = {"NOTIFY_SOCKET": path}
    notifier = Notifier.from_environment(environ)
    assert environ == {}
    assert notifier.send("READY=1", "STATUS=x")
    assert listener.next(5) == ("READY=1\nSTATUS=x", os.getpid())


def test_a_relative_name_or_a_gone_socket_is_logged_not_raised(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="threadpool_proxy"):
        assert Notifier.from_environment({"NOTIFY_SOCKET": "relative/path"}).send("READY=1") is False
        assert Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "nobody")}).send("READY=1") is False
    assert "neither a path nor an abstract socket name" in caplog.text
    assert "could not notify the service manager (READY=1)" in caplog.text
