"""Workers that pay for themselves (issue 22 item 3): ``workers: N`` with fewer CPUs than N to run
on says so at start-up, in one warning line; with enough CPUs it says nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml

from helpers import wait_until
from threadpool_proxy.pgcluster import free_port
from threadpool_proxy.workers import cores_warning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_warning_names_the_workers_the_cpus_and_what_to_do():
    assert cores_warning(2, 2) is None
    assert cores_warning(1, 1) is None
    assert cores_warning(4, 16) is None
    text = cores_warning(4, 2)
    assert text == ("workers: 4, but this process may run on 2 CPUs (sched_getaffinity): workers beyond the "
                    "CPUs only share them (and each costs ~30 MB); use workers: 2 or fewer, or give the proxy "
                    "more CPUs")
    assert "on 1 CPU (" in cores_warning(2, 1)


def _run(pg, tmp_path, workers: int, cpus: set):
    port = free_port()
    conf = tmp_path / "proxy.yaml"
    conf.write_text(yaml.safe_dump({"listen": {"host": "127.0.0.1", "port": port}, "workers": workers,
                                    "pool_mode": "transaction", "pool_size": 4,
                                    "databases": {"*": {"host": pg.host, "port": pg.port}}}))
    log_path = tmp_path / "proxy.log"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "threadpool_proxy", "-c", str(conf)], cwd=REPO, env=env,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    try:
        assert wait_until(lambda: "worker processes" in log_path.read_text() or proc.poll() is not None,
                          timeout=60), log_path.read_text()
        assert proc.poll() is None, log_path.read_text()
        return log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_more_workers_than_cpus_is_warned_about_at_start_up(pg, tmp_path):
    one = {min(os.sched_getaffinity(0))}
    text = _run(pg, tmp_path, 2, one)
    lines = [line for line in text.splitlines() if "sched_getaffinity" in line]
    assert len(lines) == 1, text
    assert "WARNING" in lines[0] and "workers: 2, but this process may run on 1 CPU" in lines[0], lines


def test_as_many_cpus_as_workers_gives_no_warning(pg, tmp_path):
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        pytest.skip("needs 2 CPUs")
    text = _run(pg, tmp_path, 2, set(sorted(cpus)[:2]))
    assert "sched_getaffinity" not in text, text
