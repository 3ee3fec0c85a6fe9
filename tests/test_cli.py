"""The command line: ``python -m threadpool_proxy -c FILE`` and ``--demo``, as a real subprocess."""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from helpers import psql, psql_path, wait_until
from threadpool_proxy.pgcluster import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE"):
        env.pop(var, None)
    env.update(extra)
    return env


def spawn(*args, **env):
    return subprocess.Popen([sys.executable, "-m", "threadpool_proxy", *args], cwd=REPO, env=cli_env(**env),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(*args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "threadpool_proxy", *args], cwd=REPO, env=cli_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def kill(proc) -> None:
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def port_open(host, port) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Target:
    def __init__(self, host, port):
        self.host, self.port = host, port


# -- 1. a config file, psql through it, SIGTERM ---------------------------------

def test_config_file_serves_psql_and_sigterm_exits_zero(pg, tmp_path):
    port = free_port()
    conf = tmp_path / "proxy.yaml"
    conf.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port},
        "pool_mode": "transaction",
        "pool_size": 3,
        "databases": {"*": {"host": pg.host, "port": pg.port}},
    }))
    proc = spawn("-c", str(conf))
    try:
        assert wait_until(lambda: port_open("127.0.0.1", port) or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, proc.communicate()
        res = psql(Target("127.0.0.1", port), sql="SELECT current_user || '@' || current_database()")
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "app@appdb"
        res = psql(Target("127.0.0.1", port), sql="SELECT 1", password="wrong")
        assert res.returncode != 0 and "password authentication failed" in res.stderr
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        print(f"\nCLI stopped {time.monotonic() - t0:.2f}s after SIGTERM")
        assert proc.returncode == 0, err
        assert not port_open("127.0.0.1", port)
        assert "Traceback" not in err, err
    finally:
        kill(proc)


def test_sigterm_with_a_connected_client_exits_zero(pg, tmp_path):
    port = free_port()
    conf = tmp_path / "proxy.yaml"
    conf.write_text(yaml.safe_dump({
        "listen": {"host": "127.0.0.1", "port": port},
        "databases": {"*": {"host": pg.host, "port": pg.port}},
    }))
    proc = spawn("-c", str(conf))
    client = None
    try:
        assert wait_until(lambda: port_open("127.0.0.1", port) or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, proc.communicate()
        env = dict(os.environ, PGPASSWORD="app-secret", PGCONNECT_TIMEOUT="10")
        client = subprocess.Popen([psql_path(), "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "app",
                                   "-d", "appdb", "-At"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        client.stdin.write("SELECT 'in';\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "in"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        client.stdin.close()
        client.wait(10)
    finally:
        kill(proc)
        if client is not None:
            kill(client)


def test_sighup_reloads_the_config_file_and_keeps_the_old_one_when_bad(pg, tmp_path):
    port = free_port()
    conf = tmp_path / "proxy.yaml"

    def write(**settings):
        conf.write_text(yaml.safe_dump({"listen": {"host": "127.0.0.1", "port": port}, "admin_users": ["app"],
                                        "databases": {"*": {"host": pg.host, "port": pg.port}}, **settings}))

    def setting(key):
        res = psql(Target("127.0.0.1", port), sql="SHOW CONFIG", dbname="pgbouncer")
        assert res.returncode == 0, res.stderr
        return dict(line.split("|")[:2] for line in res.stdout.splitlines())[key]

    write(pool_size=3)
    proc = spawn("-c", str(conf), "-p", str(port))
    try:
        assert wait_until(lambda: port_open("127.0.0.1", port) or proc.poll() is not None, timeout=20)
        assert setting("pool_size") == "3"
        write(pool_size=9, listen={"host": "127.0.0.1", "port": 1})     # -p still wins
        proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: setting("pool_size") == "9", timeout=10)
        conf.write_text("pool_size: -1\n")
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert setting("pool_size") == "9"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "configuration reloaded" in err
        assert "SIGHUP: configuration not reloaded, the old one stays:" in err and "pool_size" in err
    finally:
        kill(proc)


# -- 2. bad configurations: exit status 2, one line naming the key ---------------

@pytest.mark.parametrize("raw, key", [
    ({"pool_size": 5, "bogus_key": 1, "databases": {"*": {"host": "127.0.0.1"}}}, "bogus_key"),
    ({"pool_size": "five", "databases": {"*": {"host": "127.0.0.1"}}}, "pool_size"),
    ({"pool_mode": "sometimes", "databases": {"*": {"host": "127.0.0.1"}}}, "pool_mode"),
    ({"databases": {"app": {"host": "127.0.0.1", "port": "x"}}}, "databases.app.port"),
    ({"listen": {"port": 70000}, "databases": {"*": {"host": "127.0.0.1"}}}, "listen.port"),
    ({"databases": {"app": {"host": "127.0.0.1", "pool_mode": "nope"}}}, "databases.app.pool_mode"),
    ({"pool_size": 5}, "databases"),
])
def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path, raw, key):
    conf = tmp_path / "bad.yaml"
    conf.write_text(yaml.safe_dump(raw))
    res = run_cli("-c", str(conf))
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert key in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert res.stdout == ""


def test_missing_and_unparsable_config_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    res = run_cli("-c", str(missing))
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and str(missing) in lines[0], res.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("pool_size: [1,\n")
    res = run_cli("-c", str(broken))
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and str(broken) in lines[0], res.stderr


def test_no_arguments_is_a_usage_error():
    res = run_cli()
    assert res.returncode == 2
    assert "-c CONFIG or --demo" in res.stderr


def test_port_already_in_use_exits_nonzero_with_one_line(pg, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf = tmp_path / "proxy.yaml"
        conf.write_text(yaml.safe_dump({"listen": {"host": "127.0.0.1", "port": port},
                                        "databases": {"*": {"host": pg.host, "port": pg.port}}}))
        res = run_cli("-c", str(conf))
    assert res.returncode == 1, res.stderr
    assert len(res.stderr.splitlines()) == 1 and str(port) in res.stderr, res.stderr


def test_workers_with_only_a_unix_socket_exit_2_saying_why(tmp_path):
    """The unix socket has one owner (worker 0): workers: 2 with no TCP address is refused at start."""
    sockdir = tempfile.mkdtemp(prefix="tpp-sock-")
    try:
        conf = tmp_path / "proxy.yaml"
        conf.write_text(yaml.safe_dump({"listen": {"host": "", "port": free_port(), "unix_socket_dir": sockdir},
                                        "workers": 2, "databases": {"*": {"host": "127.0.0.1"}}}))
        res = run_cli("-c", str(conf))
        assert res.returncode == 2, res.stderr
        assert len(res.stderr.splitlines()) == 1, res.stderr
        assert "workers: 2 needs a TCP address in listen.host" in res.stderr, res.stderr
        assert os.listdir(sockdir) == []            # nothing was bound
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


# -- 3. the shipped example configuration loads ------------------------------------

def _settings(raw: dict, prefix: str = "") -> dict:
    """Every setting of a configuration file as its Config field name (listen.host: listen_host)."""
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict) and not prefix:
            out.update(_settings(value, key + "_"))
        else:
            out[prefix + key] = value
    return out


def test_shipped_conf_proxy_yaml_loads_and_every_key_is_the_default():
    """conf/proxy.yaml says "Every key is shown with its default": each key it sets (whoever adds
    one) loads to the Config default, and each Config field is there, set or commented out."""
    import dataclasses

    from threadpool_proxy import config as config_mod
    path = os.path.join(REPO, "conf", "proxy.yaml")
    config = config_mod.load(path)
    assert config.databases, "conf/proxy.yaml defines no databases"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    raw = yaml.safe_load(text)
    del raw["databases"]                                  # examples, not defaults
    fields = {f.name for f in dataclasses.fields(config_mod.Config)}
    # listen.host is the field listen_host; listen.unix_socket_mode is unix_socket_mode
    settings = {(key if key in fields or not key.startswith("listen_") else key[len("listen_"):]): value
                for key, value in _settings(raw).items()}
    assert {"listen_host", "listen_port", "pool_mode", "auth_query"} <= set(settings), sorted(settings)
    defaults = config_mod.Config()
    differing = {key: (getattr(config, key), getattr(defaults, key)) for key in settings
                 if getattr(config, key) != getattr(defaults, key)}
    assert not differing, differing                       # key: (as shipped, the default)
    commented = set(re.findall(r"^ *# ?([a-z_]+):", text, re.M))       # (nested ones too: listen.unix_socket_dir)
    fields = {f.name for f in dataclasses.fields(config_mod.Config)} - {"databases"}
    assert not fields - set(settings) - commented, "not in conf/proxy.yaml"


# -- 4. --demo ---------------------------------------------------------------------

def test_demo_starts_prints_a_working_psql_command_and_cleans_up():
    # The demo cluster lives under TMPDIR; as root it runs as the postgres OS
    # user, so the directory must be traversable by it.
    tmpdir = tempfile.mkdtemp(prefix="tpp-cli-", dir="/tmp")
    os.chmod(tmpdir, 0o755)
    proc = spawn("--demo", "-p", "0", TMPDIR=tmpdir)
    lines = []
    try:
        deadline = time.monotonic() + 90
        command = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "psql" in line and "connect with" in line:
                command = line.split("connect with:", 1)[1].strip()
                break
        assert command, (lines, proc.poll(), proc.poll() is not None and proc.stderr.read())
        demo_dirs = glob.glob(os.path.join(tmpdir, "threadpool_proxy_demo_*"))
        assert len(demo_dirs) == 1, demo_dirs
        # "PGPASSWORD=demo psql -h 127.0.0.1 -p PORT -U demo demo"
        words = shlex.split(command)
        env = dict(os.environ, PGCONNECT_TIMEOUT="10")
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        assert env.get("PGPASSWORD") == "demo" and words[0] == "psql", command
        with open(os.path.join(demo_dirs[0], "data", "postmaster.pid")) as f:
            postmaster = int(f.readline())
        res = subprocess.run(words + ["-X", "-w", "-At", "-c", "SELECT current_user || '@' || current_database()"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "demo@demo"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        print(f"\ndemo stopped {time.monotonic() - t0:.2f}s after SIGTERM")
        assert proc.returncode == 0, err
        assert not os.path.exists(demo_dirs[0]), os.listdir(demo_dirs[0])
        assert wait_until(lambda: not _alive(postmaster), timeout=10), "the demo's postmaster is still running"
    finally:
        kill(proc)
        for leftover in glob.glob(os.path.join(tmpdir, "threadpool_proxy_demo_*", "data")):
            # a killed demo leaves its postmaster behind: stop it
            pidfile = os.path.join(leftover, "postmaster.pid")
            try:
                with open(pidfile) as f:
                    os.kill(int(f.readline()), signal.SIGQUIT)
            except (OSError, ValueError):
                pass
        shutil.rmtree(tmpdir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie child of someone else counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_demo_that_cannot_initdb_fails_cleanly(tmp_path):
    """initdb failing: a one-line error, non-zero exit, and no temporary directory left behind."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("initdb", "pg_ctl", "psql"):
        script = bindir / tool
        script.write_text("#!/bin/sh\necho 'initdb: simulated failure' >&2\nexit 1\n")
        script.chmod(0o755)
    tmpdir = tempfile.mkdtemp(prefix="tpp-cli-", dir="/tmp")
    os.chmod(tmpdir, 0o755)
    try:
        proc = subprocess.run([sys.executable, "-m", "threadpool_proxy", "--demo", "-p", "0"], cwd=REPO,
                              env=cli_env(PG_BINDIR=str(bindir), TMPDIR=tmpdir), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert glob.glob(os.path.join(tmpdir, "threadpool_proxy_demo_*")) == [], "the demo's temp dir was left behind"
        assert "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
