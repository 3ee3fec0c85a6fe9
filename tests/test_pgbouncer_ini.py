"""``-c pgbouncer.ini``: PgBouncer's ini format and names, read as they are.

The shipped conf/pgbouncer.ini, conf/userlist.txt and conf/hba.conf are what
the proxy is started from here, with the test cluster's port and directories
put in place of the ones written there (``bouncer_dir``).  The unit tests
write ini text by hand in PgBouncer's documented syntax.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import psycopg
import pytest
import yaml

from helpers import PASSWORDS, connect, psql, raw_login, wait_until
from threadpool_proxy import ConfigError, Proxy, pool_key
from threadpool_proxy import config as config_mod
from threadpool_proxy.pgbouncer_ini import translate
from threadpool_proxy.pgcluster import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(REPO, "conf")

#: conf/userlist.txt's scramuser: a SCRAM verifier of this password (salt "threadpool-proxy").
SCRAM_PASSWORD = "scram-secret"
SCRAM_VERIFIER = ("SCRAM-SHA-256$4096:dGhyZWFkcG9vbC1wcm94eQ==$7gWiaIZmFLV0IYuVq6fNwG7/GHA5BOz35+NqQEhjgHU="
                  ":8zCi9roD89ld43lOY+TtxI21XYLih9G5Y1/dChAZ0+o=")


def write(path, text: str, mode: int = 0o600) -> str:
    path = str(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def native(text: str, tmp_path, name: str = "pgbouncer.ini") -> tuple[dict, list]:
    """The native mapping and notes of an ini text written to ``tmp_path/name``."""
    path = write(tmp_path / name, text)
    result = translate(path)
    return result.native, result.notes


MINIMAL = "[databases]\n* = host=127.0.0.1\n[pgbouncer]\nauth_file = users.txt\n"


# -- the format ----------------------------------------------------------------------------

def test_sections_comments_and_connection_strings_map_to_native_keys(tmp_path):
    raw, notes = native('''
; a comment
# another
[databases]
appdb = host=10.0.0.1 port=5433 dbname=app_production pool_size=7 min_pool_size=2 reserve_pool=3 \
max_db_connections=9 max_db_client_connections=11 pool_mode=statement
forced = host=db.example.com user=bob password='it''s secret' connect_query='SELECT 1' client_encoding=UTF8 \
datestyle=ISO timezone=UTC application_name=app
"quoted ""name""" = host=/var/run/postgresql
'single quoted' = host=a,b,c load_balance_hosts=disable
local =
* = host=127.0.0.1

[users]
alice = pool_mode=session pool_size=2 reserve_pool_size=1 max_user_connections=4 max_user_client_connections=8

[pgbouncer]
listen_addr = 127.0.0.1, ::1
listen_port = 7432
unix_socket_dir = /run/pgb
unix_socket_mode = 0770
unix_socket_group = postgres
auth_type = scram-sha-256
auth_file = users.txt
pool_mode = transaction
default_pool_size = 30
max_client_conn = 500
server_reset_query = DISCARD ALL; SELECT 1
server_idle_timeout = 0
query_wait_timeout = 0
server_lifetime = 0
admin_users = a, b
stats_users = c
tcp_keepalive = 0
tcp_keepidle = 30
''', tmp_path)
    assert notes == []
    assert raw["listen"] == {"host": "127.0.0.1,::1", "port": 7432, "unix_socket_dir": "/run/pgb",
                             "unix_socket_mode": "0770", "unix_socket_group": "postgres"}
    dbs = raw["databases"]
    assert dbs["appdb"] == {"host": "10.0.0.1", "port": 5433, "dbname": "app_production", "pool_size": 7,
                            "min_pool_size": 2, "reserve_pool_size": 3, "max_db_connections": 9,
                            "max_db_client_connections": 11, "pool_mode": "statement"}
    assert dbs["forced"]["user"] == "bob" and dbs["forced"]["password"] == "it's secret"
    assert dbs["forced"]["connect_query"] == "SELECT 1"
    assert dbs["forced"]["settings"] == {"client_encoding": "UTF8", "datestyle": "ISO", "timezone": "UTC",
                                         "application_name": "app"}
    assert dbs['quoted "name"'] == {"host": "/var/run/postgresql", "port": 5432}
    assert dbs["single quoted"]["nodes"] == [{"host": h, "port": 5432} for h in "abc"]
    assert dbs["single quoted"]["load_balance"] == "disable"
    assert dbs["local"] == {"host": "/run/pgb", "port": 5432}      # no host: the unix socket directory
    assert raw["users"] == {"alice": {"pool_mode": "session", "pool_size": 2, "reserve_pool_size": 1,
                                      "max_user_connections": 4, "max_user_client_connections": 8}}
    assert raw["auth_type"] == "scram-sha-256" and raw["auth_file"] == str(tmp_path / "users.txt")
    assert raw["pool_size"] == 30 and raw["max_client_conn"] == 500 and raw["pool_mode"] == "transaction"
    assert raw["reset_query"] == "DISCARD ALL; SELECT 1"
    assert raw["server_idle_timeout"] == 315360000.0 and raw["query_wait_timeout"] == 315360000.0
    assert raw["server_lifetime"] == 0
    assert raw["admin_users"] == "a,b" and raw["stats_users"] == "c"
    assert raw["tcp_keepalive"] is False and raw["tcp_keepidle"] == 30
    config = config_mod.from_dict(raw)       # and the native checks accept it
    assert config.databases["forced"].server_user("alice") == "bob"
    assert config.lookup_database("appdb", "alice").pool_mode == "session"
    assert config.lookup_database("appdb", "alice").pool_size == 2
    assert config.lookup_database("appdb", "bob").pool_size == 7


def test_absent_settings_take_pgbouncers_defaults(tmp_path):
    raw, notes = native(MINIMAL, tmp_path)
    config = config_mod.from_dict(raw)
    # PgBouncer 1.25's documented defaults where the native ones differ:
    assert config.listen_host == ""                  # listen_addr not set: the unix socket only
    assert config.listen_port == 6432
    assert config.unix_socket_dir == "/tmp"
    assert config.auth_type == "md5"
    assert config.max_client_conn == 100
    assert config.server_login_retry == 15
    assert config.server_tls_sslmode == "prefer"
    assert config.pool_size == 20 and config.pool_mode == "session"
    assert "pg_authid" in config.auth_query
    assert notes == []


def test_include_is_read_in_place_and_relative_to_the_including_file(tmp_path):
    (tmp_path / "conf.d").mkdir()
    write(tmp_path / "conf.d" / "databases.ini", "[databases]\nappdb = host=10.0.0.2\n%include more.ini\n")
    write(tmp_path / "conf.d" / "more.ini", "otherdb = host=10.0.0.3\n")
    raw, _ = native("[pgbouncer]\nauth_file = users.txt\n%include conf.d/databases.ini\n"
                    "[pgbouncer]\nlisten_port = 7000\n", tmp_path)
    assert raw["databases"] == {"appdb": {"host": "10.0.0.2", "port": 5432},
                                "otherdb": {"host": "10.0.0.3", "port": 5432}}
    assert raw["listen"]["port"] == 7000


def test_include_loop_stops_naming_the_line(tmp_path):
    write(tmp_path / "a.ini", "%include a.ini\n")
    with pytest.raises(ConfigError, match=r"a\.ini line 1 \(included from \S*a\.ini line 1\): %include nested deeper than 10 files"):
        translate(str(tmp_path / "a.ini"))


def test_unimplemented_settings_are_named_in_one_note_and_honoured_values_are_not(tmp_path):
    raw, notes = native(MINIMAL + "syslog = 1\nserver_round_robin = 1\ndns_max_ttl = 30\nsyslog_ident = x\n"
                        "so_reuseport = 0\nserver_reset_query_always = 1\ntrack_extra_parameters = search_path\n"
                        "[peers]\n1 = host=/tmp/pgb1\n", tmp_path)
    assert len(notes) == 1
    assert notes[0] == (f"{tmp_path / 'pgbouncer.ini'}: accepted, no effect: "
                        "syslog, server_round_robin, dns_max_ttl, syslog_ident, [peers]")


@pytest.mark.parametrize("text, line, message", [
    ("[pgbouncer]\nlisten_port = 6432\nno_such_setting = 1\n", 3, "no_such_setting: unknown setting"),
    ("[pgbouncer]\ndefault_pool_size = many\n", 2, "default_pool_size: expected an integer, got 'many'"),
    ("[pgbouncer]\npool_mode = sometimes\n", 2, "pool_mode: expected one of session, transaction, statement"),
    ("[pgbouncer]\nauth_type = any\n", 2, "auth_type: any cannot be honoured"),
    ("[pgbouncer]\nauth_type = pam\n", 2, "auth_type: pam cannot be honoured"),
    ("[pgbouncer]\ndisable_pqexec = 1\n", 2, "disable_pqexec: 1 cannot be honoured"),
    ("[pgbouncer]\nclient_tls_protocols = tlsv1.3\n", 2, "client_tls_protocols: 'tlsv1.3' cannot be honoured"),
    ("[pgbouncer]\nclient_tls_ciphers = HIGH:!aNULL\n", 2, "client_tls_ciphers: 'HIGH:!aNULL' cannot be honoured"),
    ("[pgbouncer]\nuser = nobody-at-all\n", 2, "user: the proxy does not change its OS user"),
    ("[databases]\nappdb = host=x port=http\n", 2, "appdb: expected a port"),
    ("[databases]\nappdb = host=x sslmode=require\n", 2, "appdb: unrecognized connection parameter: sslmode"),
    ("[databases]\nappdb = host=x dbname=\n", 2, "appdb: dbname: empty value"),
    ("[databases]\nappdb = host='x\n", 2, "appdb: host: the closing ' is missing"),
    ("[databases]\npgbouncer = host=x\n", 2, "pgbouncer: the name is reserved for the admin console"),
    ("[users]\nbob = pool_size=0\n", 2, "bob: expected pool_size: an integer >= 1"),
    ("[users]\nbob = statement_timeout=1\n", 2, "bob: unrecognized user parameter: statement_timeout"),
    ("\n\n[databases]\nappdb host=x\n", 4, "syntax error: expected = after 'appdb'"),
    ("[pgbouncer\n", 1, "syntax error: a section line is [name]"),
    ("[extras]\n", 1, "unknown section [extras]"),
    ("listen_port = 1\n", 1, "listen_port: a setting before any [section]"),
])
def test_bad_line_stops_naming_file_line_and_key(tmp_path, text, line, message):
    path = write(tmp_path / "pgbouncer.ini", text)
    with pytest.raises(ConfigError) as exc_info:
        translate(path)
    assert str(exc_info.value).startswith(f"{path} line {line}: "), str(exc_info.value)
    assert message in str(exc_info.value)


def test_error_in_an_included_file_names_that_file_and_the_include(tmp_path):
    write(tmp_path / "extra.ini", "[pgbouncer]\n\npool_size = 3\n")
    path = write(tmp_path / "pgbouncer.ini", "[databases]\n%include extra.ini\n")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'extra.ini'} line 3 (included from {path} line 2): "
                                                    f"pool_size: unknown setting")):
        translate(path)


def test_password_is_never_echoed_in_errors(tmp_path):
    path = write(tmp_path / "pgbouncer.ini", "[databases]\nx = host=h password='hunter2' port=0\n")
    with pytest.raises(ConfigError) as exc_info:
        translate(path)
    assert "hunter2" not in str(exc_info.value)


def test_ini_holding_a_password_must_not_be_readable_by_others(tmp_path):
    path = write(tmp_path / "pgbouncer.ini", "[databases]\nx = host=h user=u password=p\n"
                                             "[pgbouncer]\nauth_file = u.txt\n", mode=0o644)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: holds databases.x.password but mode 0644")):
        config_mod.load(path)


def test_print_config_round_trips_and_masks_secrets(tmp_path):
    path = write(tmp_path / "pgbouncer.ini", "[databases]\nx = host=h user=u password=hunter2 timezone=UTC\n"
                                             "* = host=h2\n[users]\nu = pool_size=3\n"
                                             "[pgbouncer]\nauth_file = u.txt\nlisten_addr = *\n")
    config = config_mod.load(path)
    assert config_mod.from_dict(config_mod.as_native(config, mask=False)) == config
    text = config_mod.dump(config)
    assert "hunter2" not in text
    assert yaml.safe_load(text)["databases"]["x"]["password"] == "********"


# -- the shipped sample, served ---------------------------------------------------------------

@pytest.fixture(scope="module")
def scramuser(pg):
    """Role scramuser with conf/userlist.txt's verifier (so SCRAM pass-through logs in to the server)."""
    pg.sql(f"CREATE ROLE scramuser LOGIN PASSWORD '{SCRAM_VERIFIER}'")
    try:
        yield "scramuser"
    finally:
        pg.sql("DROP ROLE IF EXISTS scramuser")


def short_dir() -> str:
    """A new directory with a short path (a unix socket path is limited to ~107 bytes)."""
    return tempfile.mkdtemp(prefix="tpp-", dir="/tmp")


class Bouncer:
    """conf/pgbouncer.ini and its files, copied into a directory with the test cluster's numbers put in."""

    def __init__(self, pg, directory: str, **settings) -> None:
        self.dir = directory
        self.port = free_port()
        self.sockdir = short_dir()
        self.path = os.path.join(directory, "pgbouncer.ini")
        for name in ("userlist.txt", "hba.conf", "ident.conf"):
            shutil.copy(os.path.join(CONF, name), os.path.join(directory, name))
            os.chmod(os.path.join(directory, name), 0o600)
        self.text = open(os.path.join(CONF, "pgbouncer.ini"), encoding="utf-8").read()
        self.text = (self.text.replace("port=5432", f"port={pg.port}")
                     .replace("host=/var/run/postgresql", f"host={pg.sockdir}"))
        self.set(listen_port=self.port, unix_socket_dir=self.sockdir, **settings)

    def set(self, **settings) -> None:
        """Replace (or add to [pgbouncer]) ``key = value`` lines, and write the file."""
        for key, value in settings.items():
            line = f"{key} = {value}"
            pattern = re.compile(rf"^{re.escape(key)} = .*$", re.M)
            self.text = pattern.sub(line, self.text) if pattern.search(self.text) else \
                self.text.replace("[pgbouncer]\n", f"[pgbouncer]\n{line}\n")
        write(self.path, self.text, mode=0o644)

    def remove(self) -> None:
        shutil.rmtree(self.sockdir, ignore_errors=True)


@pytest.fixture
def bouncer(pg, tmp_path, scramuser):
    b = Bouncer(pg, str(tmp_path))
    try:
        yield b
    finally:
        b.remove()


@pytest.fixture
def started(bouncer):
    proxy = Proxy(bouncer.path)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


def test_sample_serves_psql_and_psycopg_with_plain_md5_and_scram_secrets(pg, started):
    assert started.host == "127.0.0.1"
    for user, password, dbname in (("app", PASSWORDS["app"], "appdb"),             # plain secret
                                   ("md5user", PASSWORDS["md5user"], "postgres"),   # md5 secret
                                   ("scramuser", SCRAM_PASSWORD, "postgres")):     # SCRAM secret
        result = psql(started, user=user, password=password, dbname=dbname,
                      sql="SELECT current_user || '@' || current_database()")
        assert result.returncode == 0, (user, result.stderr)
        assert result.stdout.strip() == f"{user}@{dbname}"
        with connect(pg, started, user=user, password=password, dbname=dbname) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == user
    assert raw_login(started.host, started.port, "app", "appdb", password="wrong").sqlstate == "28P01"


def test_forced_user_entry_serves_every_client_as_its_user_with_its_settings(pg, started):
    """``shared = ... user=app timezone=UTC application_name=shared``: md5user and scramuser log in with their
    own passwords, and the server sees app."""
    for user, password in (("md5user", PASSWORDS["md5user"]), ("scramuser", SCRAM_PASSWORD)):
        with connect(pg, started, user=user, password=password, dbname="shared") as conn:
            row = conn.execute("SELECT current_user, session_user, current_database(), "
                               "current_setting('TimeZone'), current_setting('application_name')").fetchone()
            assert row == ("app", "app", "appdb", "UTC", "shared"), user
    # one pool: the clients' server connections are the forced user's
    node = f"127.0.0.1:{pg.port}"
    assert started.pool.open_count(pool_key(node, "app", "appdb")) >= 1
    assert started.pool.open_count(pool_key(node, "md5user", "appdb")) == 0
    assert started.pool.open_count(pool_key(node, "scramuser", "appdb")) == 0


def test_users_section_override_puts_other_in_session_mode(pg, started):
    """``other = pool_mode=session pool_size=2``: other keeps its server connection between transactions."""
    with connect(pg, started, user="other", dbname="otherdb") as conn:
        pids = {conn.execute("SELECT pg_backend_pid()").fetchone()[0] for _ in range(3)}
        assert len(pids) == 1
        assert started.config.lookup_database("otherdb", "other").pool_size == 2
        assert started.config.lookup_database("otherdb", "app").pool_size == 5


def test_reload_picks_up_an_edited_ini(pg, bouncer, started):
    assert psql(started, user="app", dbname="renamed", sql="SELECT 1").returncode != 0
    bouncer.text = bouncer.text.replace("[databases]\n", f"[databases]\nrenamed = host=127.0.0.1 port={pg.port} "
                                                         f"dbname=appdb\n")
    bouncer.set(default_pool_size=9)
    started.reload()
    assert started.config.pool_size == 9
    result = psql(started, user="app", dbname="renamed", sql="SELECT current_database()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "appdb"
    bouncer.set(default_pool_size="lots")
    with pytest.raises(ConfigError, match=r"pgbouncer\.ini line \d+: default_pool_size: expected an integer"):
        started.reload()
    assert started.config.pool_size == 9          # the old configuration stays


# -- the command line --------------------------------------------------------------------

def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for var in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "PGSERVICE"):
        env.pop(var, None)
    return env


def run_cli(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "threadpool_proxy", *args], cwd=REPO, env=cli_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def port_open(host, port) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def test_cli_bad_line_exits_2_naming_file_and_line(tmp_path):
    path = write(tmp_path / "pgbouncer.ini", "[databases]\n* = host=127.0.0.1\n[pgbouncer]\n"
                                             "auth_file = u.txt\nmax_client_conn = -5\n")
    result = run_cli("-c", path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"threadpool-proxy: configuration error: {path} line 5: max_client_conn: "
                                     f"expected an integer >= 1, got '-5'")


def test_cli_print_config_shows_the_effective_native_configuration(bouncer):
    bouncer.set(syslog=1, tcp_user_timeout=500)
    result = run_cli("-c", bouncer.path, "--print-config")
    assert result.returncode == 0, result.stderr
    # (named in the file's order: Bouncer.set puts new lines first in [pgbouncer])
    assert result.stdout.startswith(f"# {bouncer.path}: accepted, no effect: tcp_user_timeout, syslog\n")
    printed = yaml.safe_load(result.stdout)
    assert printed["listen"] == {"host": "127.0.0.1", "port": bouncer.port, "unix_socket_dir": bouncer.sockdir,
                                 "unix_socket_mode": "0777"}
    assert printed["databases"]["shared"]["user"] == "app"
    assert printed["users"] == {"other": {"pool_mode": "session", "pool_size": 2}}
    assert printed["auth_type"] == "hba" and printed["pool_size"] == 5
    assert printed["auth_hba_file"] == os.path.join(bouncer.dir, "hba.conf")


def test_cli_unknown_setting_warns_once_and_serves(pg, bouncer):
    bouncer.set(syslog=1, server_round_robin=1, application_name_add_host=1, logfile="proxy.log",
                pidfile="proxy.pid")
    proc = subprocess.Popen([sys.executable, "-m", "threadpool_proxy", "-c", bouncer.path], cwd=REPO,
                            env=cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    pidfile, logfile = os.path.join(bouncer.dir, "proxy.pid"), os.path.join(bouncer.dir, "proxy.log")
    try:
        assert wait_until(lambda: port_open("127.0.0.1", bouncer.port) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None
        result = psql(type("T", (), {"host": "127.0.0.1", "port": bouncer.port}), sql="SELECT 1")
        assert result.returncode == 0, result.stderr
        with open(pidfile, encoding="ascii") as f:                  # pidfile, relative to the ini
            assert f.read().strip() == str(proc.pid)
        with open(logfile, encoding="utf-8") as f:                  # logfile too
            assert "threadpool_proxy listening on 127.0.0.1:" in f.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    warnings = [line for line in err.splitlines() if "accepted, no effect" in line]
    assert len(warnings) == 1, err
    assert warnings[0].endswith(f"WARNING threadpool_proxy: {bouncer.path}: accepted, no effect: "
                                f"application_name_add_host, server_round_robin, syslog")
    assert proc.returncode == 0
    assert not os.path.exists(pidfile)                              # removed at exit


# -- settings the ini brought to the native configuration, on the wire ---------------------------

@pytest.fixture
def plain_userlist(tmp_path):
    return write(tmp_path / "userlist.txt", "".join(f'"{u}" "{p}"\n' for u, p in PASSWORDS.items()))


def test_connect_query_runs_on_each_new_server_connection_and_its_error_is_only_logged(
        pg, proxy_factory, plain_userlist, caplog):
    target = {"host": pg.host, "port": pg.port, "dbname": "appdb", "pool_mode": "session"}
    proxy = proxy_factory(auth_type="md5", auth_file=plain_userlist, databases={
        "cq": {**target, "connect_query": "SET application_name = 'from connect_query'"},
        # (another server database: pools are per server, user and database, so entries sharing one share
        # its server connections, and this one would be handed cq's, parked)
        "broken": {**target, "dbname": "postgres", "connect_query": "SELECT * FROM no_such_table"}})
    with connect(pg, proxy, dbname="cq") as conn:
        assert conn.execute("SELECT current_setting('application_name')").fetchone()[0] == "from connect_query"
    with caplog.at_level("WARNING", logger="threadpool_proxy"):
        with connect(pg, proxy, dbname="broken") as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == 1
    assert any("connect_query failed" in r.getMessage() and "no_such_table" in r.getMessage()
               for r in caplog.records)


def test_max_db_and_user_client_connections_refuse_the_client_beyond_them(pg, proxy_factory, plain_userlist):
    target = {"host": pg.host, "port": pg.port}
    proxy = proxy_factory(auth_type="md5", auth_file=plain_userlist,
                          databases={"appdb": {**target, "max_db_client_connections": 1}, "*": dict(target)},
                          users={"other": {"max_user_client_connections": 1}})
    first = connect(pg, proxy, dbname="appdb")
    refused = raw_login(proxy.host, proxy.port, "other", "appdb", password=PASSWORDS["other"])
    assert refused.sqlstate == "53300"
    assert refused.error["M"] == 'no more connections allowed (max_db_client_connections 1 of database "appdb")'
    first.close()
    assert wait_until(lambda: raw_login(proxy.host, proxy.port, "other", "appdb",
                                        password=PASSWORDS["other"]).ok)
    with connect(pg, proxy, user="other", dbname="otherdb"):
        refused = raw_login(proxy.host, proxy.port, "other", "postgres", password=PASSWORDS["other"])
        assert refused.sqlstate == "53300"
        assert refused.error["M"] == 'no more connections allowed (max_user_client_connections 1 of user "other")'
        assert raw_login(proxy.host, proxy.port, "app", "postgres", password=PASSWORDS["app"]).ok


def test_sample_hba_file_chooses_each_users_method_as_written(started):
    """conf/hba.conf: md5user gets md5 from 127.0.0.1, everyone else SCRAM (raw logins show the request codes)."""
    md5 = raw_login(started.host, started.port, "md5user", "postgres", password=PASSWORDS["md5user"])
    assert md5.ok and md5.auth_requests == [5, 0], md5.error
    scram = raw_login(started.host, started.port, "app", "appdb", password=PASSWORDS["app"])
    assert scram.ok and scram.auth_requests[0] == 10, scram.error


# -- the sample over the unix socket, and from IPv6 ----------------------------------------------

def test_sample_serves_psql_and_psycopg_over_the_unix_socket_with_peer(pg, bouncer, started):
    """conf/hba.conf: ``local all all peer map=local``; conf/ident.conf maps OS user root to app (and root)."""
    if pwd.getpwuid(os.geteuid()).pw_name != "root":
        pytest.skip("conf/ident.conf maps the OS user root")
    at = type("At", (), {"host": bouncer.sockdir, "port": bouncer.port})
    result = psql(at, user="app", password="", sql="SELECT current_user || '@' || current_database()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "app@appdb"
    with psycopg.connect(f"host={bouncer.sockdir} port={bouncer.port} user=app dbname=local_appdb "
                         f"connect_timeout=10", autocommit=True) as conn:      # to the server over its socket too
        assert conn.execute("SELECT current_user, inet_server_addr() IS NULL").fetchone() == ("app", True)
    refused = psql(at, user="md5user", dbname="postgres", sql="SELECT 1")
    assert 'Peer authentication failed for user "md5user"' in refused.stderr


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_sample_hba_file_rejects_md5user_from_ipv6_and_takes_others(pg, bouncer):
    bouncer.set(listen_addr="127.0.0.1, ::1")
    proxy = Proxy(bouncer.path)
    proxy.start()
    try:
        rejected = raw_login("::1", bouncer.port, "md5user", "postgres", password=PASSWORDS["md5user"])
        assert rejected.sqlstate == "28000"
        assert rejected.error["M"] == ('pg_hba.conf rejects connection for host "::1", user "md5user", '
                                       'database "postgres", no encryption')
        assert raw_login("127.0.0.1", bouncer.port, "md5user", "postgres", password=PASSWORDS["md5user"]).ok
        ok = raw_login("::1", bouncer.port, "app", "appdb", password=PASSWORDS["app"])
        assert ok.ok and ok.auth_requests[0] == 10, ok.error
    finally:
        proxy.stop()


def test_console_reload_picks_up_an_edited_ini(pg, bouncer, started):
    """RELOAD on the admin console (conf/hba.conf lets postgres in to database pgbouncer from 127.0.0.1)."""
    bouncer.text = bouncer.text.replace("[databases]\n", f"[databases]\nadded = host=127.0.0.1 port={pg.port} "
                                                         f"dbname=otherdb\n")
    bouncer.set(default_pool_size=4)
    with psycopg.connect(pg.dsn(user="postgres", dbname="pgbouncer", host=started.host, port=started.port),
                         autocommit=True) as admin:
        admin.execute("RELOAD")
        config = dict((r[0], r[1]) for r in admin.execute("SHOW CONFIG").fetchall())
        assert config["pool_size"] == "4"
        names = [r[0] for r in admin.execute("SHOW DATABASES").fetchall()]
        assert "added" in names
    result = psql(started, user="other", dbname="added", sql="SELECT current_database()")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "otherdb"


def test_shipped_sample_loads_as_written_with_no_unimplemented_setting():
    notes: list = []
    config = config_mod.load(os.path.join(CONF, "pgbouncer.ini"), notes)
    assert notes == []
    assert sorted(config.databases) == ["*", "appdb", "local_appdb", "shared"]
    assert config.databases["shared"].user == "app" and config.databases["local_appdb"].host == "/var/run/postgresql"
    assert config.auth_type == "hba" and config.auth_hba_file == os.path.join(CONF, "hba.conf")
    assert config.lookup_database("appdb", "other").pool_mode == "session"
    assert (config.tcp_keepidle, config.tcp_keepintvl, config.tcp_keepcnt) == (60, 10, 5)
