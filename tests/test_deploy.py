"""deploy/: the files parse, agree with each other and with the proxy's settings, and the parts
that can run here do (the container's HEALTHCHECK command against a real proxy).  Docker,
Kubernetes and systemd themselves are not run here: docs/several-proxies.md says so.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from proxyproc import ProxyProcess
from threadpool_proxy import config as config_mod
from threadpool_proxy.pgcluster import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")


def _read(*parts) -> str:
    with open(os.path.join(DEPLOY, *parts), encoding="utf-8") as f:
        return f.read()


def _example_config() -> config_mod.Config:
    return config_mod.from_dict(yaml.safe_load(_read("proxy.yaml")))


def test_the_example_configuration_is_valid():
    config = _example_config()
    assert config.metrics_listen == "0.0.0.0:9127"
    assert (config.shutdown_timeout, config.shutdown_unready_delay) == (30, 5)


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(_read("systemd", "threadpool-proxy.service"))
    return unit


def test_the_systemd_unit():
    service = _unit()["Service"]
    assert service["Type"] == "notify"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillMode"] == "mixed"            # SIGTERM to the supervisor only
    assert service["ExecStart"].split()[1:] == ["-c", "/etc/threadpool_proxy/proxy.yaml"]
    config = _example_config()
    assert int(service["TimeoutStopSec"]) > config.shutdown_timeout + config.shutdown_unready_delay
    assert service["User"] != "root"
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def _containerfile() -> list[str]:
    """Instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", _read("Containerfile"))
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_container_image_definition():
    lines = _containerfile()
    assert re.fullmatch(r"FROM python:3\.\d+-slim", lines[0])
    assert any(line.startswith("RUN pip install --no-cache-dir .") for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    exposed = [line for line in lines if line.startswith("EXPOSE ")]
    assert exposed == ["EXPOSE 6432 9127"]
    config = _example_config()
    assert config.listen_port == 6432 and config.metrics_listen.endswith(":9127")


def _healthcheck_command() -> list[str]:
    [line] = [line for line in _containerfile() if line.startswith("HEALTHCHECK ")]
    return json.loads(line[line.index("CMD ") + 4:])


def test_the_container_healthcheck_command_asks_live(pg, tmp_path):
    """Run the HEALTHCHECK's command (its port changed to a free one) against a real proxy:
    0 while it serves, 1 once it is gone."""
    command = _healthcheck_command()
    assert command[0] == "python" and "http://127.0.0.1:9127/live" in command[2]
    metrics = free_port()
    command = [sys.executable, command[1], command[2].replace(":9127/", f":{metrics}/")]
    proxy = ProxyProcess(pg, tmp_path, listen={"host": "127.0.0.1", "port": free_port()},
                         metrics_listen=f"127.0.0.1:{metrics}")
    try:
        assert subprocess.run(command, capture_output=True, timeout=30).returncode == 0
    finally:
        proxy.signal(signal.SIGINT)
        assert proxy.wait(30) == 0
    assert subprocess.run(command, capture_output=True, timeout=30).returncode == 1


def _kubernetes() -> dict:
    documents = list(yaml.safe_load_all(_read("kubernetes", "threadpool-proxy.yaml")))
    return {doc["kind"]: doc for doc in documents}


def test_the_kubernetes_example():
    objects = _kubernetes()
    assert sorted(objects) == ["ConfigMap", "Deployment", "Service"]
    config = config_mod.from_dict(yaml.safe_load(objects["ConfigMap"]["data"]["proxy.yaml"]))
    spec = objects["Deployment"]["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] > config.shutdown_timeout + config.shutdown_unready_delay
    [proxy] = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"postgres": config.listen_port, "metrics": int(config.metrics_listen.rsplit(":", 1)[1])}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/live", "port": "metrics"}
    ready = proxy["readinessProbe"]
    assert ready["periodSeconds"] * ready["failureThreshold"] < config.shutdown_unready_delay
    assert spec["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert volumes["auth-secret"]["secret"]["defaultMode"] == 0o600
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    assert mounts["config"] == "/etc/threadpool_proxy" and proxy["args"][-1] == "/etc/threadpool_proxy/proxy.yaml"
    assert os.path.dirname(config.auth_file) == mounts["auth"]
    [copy] = spec["initContainers"]
    assert copy["command"][:7] == ["install", "-m", "0600", "-o", "10001", "-g", "10001"]
    assert copy["command"][-1] == config.auth_file
    service = objects["Service"]["spec"]
    assert service["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == "postgres"


def test_the_haproxy_sample_checks_ready_on_each_proxy():
    text = _read("haproxy", "haproxy.cfg")
    assert "option httpchk GET /ready" in text
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+) check port (\d+)$", text, re.M)
    assert len(servers) == 3 and {s[3] for s in servers} == {"9127"}
    inter = float(re.search(r"inter (\d+)ms", text).group(1)) / 1000
    fall = int(re.search(r"fall (\d+)", text).group(1))
    assert inter * fall < _example_config().shutdown_unready_delay
    assert not re.search(r"^[^#]*on-marked-down shutdown-sessions", text, re.M)


HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy; .ci/run does)")
def test_haproxy_accepts_the_sample(tmp_path):
    config = tmp_path / "haproxy.cfg"
    text = _read("haproxy", "haproxy.cfg").replace("/run/haproxy/admin.sock", str(tmp_path / "admin.sock"))
    config.write_text(text)
    result = subprocess.run([HAPROXY, "-c", "-f", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
