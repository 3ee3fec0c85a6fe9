"""Connection strings (threadpool_proxy/dsn.py) and database entries given as one (config.py): no I/O.

Both spellings libpq takes, written back in the spelling they came in, every
value surviving the round trip (hypothesis), secrets never in a message, and
what a database entry makes of each keyword.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from threadpool_proxy import config as config_mod
from threadpool_proxy import dsn


def test_a_uri_with_everything():
    info = dsn.parse("postgresql://app:s%40cr%3At@db.example:6543/app%20db?sslmode=prefer&application_name=web")
    assert dict(info.params) == {"user": "app", "password": "s@cr:t", "host": "db.example", "port": "6543",
                                 "dbname": "app db", "sslmode": "prefer", "application_name": "web"}
    assert info.form == "uri" and info.addresses == (("db.example", 6543),)


def test_uri_hosts_ipv6_default_ports_and_a_socket_in_the_query():
    info = dsn.parse("postgres://[::1]:5433,db2/x")
    assert info.hosts == ("::1", "db2") and info.addresses == (("::1", 5433), ("db2", 5432))
    sock = dsn.parse("postgresql:///x?host=/var/run/postgresql&port=5433")
    assert sock.hosts == ("/var/run/postgresql",) and sock.get("dbname") == "x"
    assert dsn.parse("postgresql://").params == {}


def test_key_value_quoting_and_escapes():
    info = dsn.parse(r"host = a,b  port=1,2 dbname='' password='a b\'c\\d' options=-c\ x=1")
    assert info.get("password") == "a b'c\\d" and info.get("options") == "-c x=1" and info.get("dbname") == ""
    assert info.addresses == (("a", 1), ("b", 2)) and info.form == "keyvalue"
    with pytest.raises(dsn.DsnError):
        dsn.parse("user='o''k'")                # as libpq: a quoted value ends at its quote


def test_hostaddr_is_the_address_dialed():
    info = dsn.parse("host=db.example hostaddr=10.0.0.5 port=5432")
    assert info.hosts == ("db.example",) and info.addresses == (("10.0.0.5", 5432),)


@pytest.mark.parametrize("text, message", [
    ("host=a port", 'missing "=" after "port"'),
    ("host='a", 'unterminated quoted value of "host"'),
    ("=a", "expected a keyword at position 1"),
    ("postgresql://h/db?sslmode", 'missing "=" after URI parameter "sslmode"'),
    ("postgresql://[::1/db", 'lacks its closing "]"'),
    ("postgresql://h/db?bad-name=1", 'invalid URI parameter name "bad-name"'),
])
def test_what_libpq_would_refuse_is_a_dsn_error(text, message):
    with pytest.raises(dsn.DsnError, match=message.replace("[", r"\[").replace("]", r"\]")):
        dsn.parse(text)


@pytest.mark.parametrize("text", ["host=a,b port=1,2,3", "host=h port=http", "host=h port=70000"])
def test_bad_ports_are_dsn_errors(text):
    with pytest.raises(dsn.DsnError, match="port"):
        dsn.parse(text).addresses


def test_replace_keeps_the_form_and_everything_else():
    uri = dsn.parse("postgresql://u:p%20w@h:1/d?sslmode=require&x=y")
    moved = uri.replace(host="127.0.0.1", port="7000", sslmode="disable")
    assert moved.to_string() == "postgresql://u:p%20w@127.0.0.1:7000/d?sslmode=disable&x=y"
    kv = dsn.parse("host=h hostaddr=10.1.1.1 port=1 dbname=d password='a b'")
    assert kv.replace(host="127.0.0.1", port="7000", hostaddr=None).to_string() == \
        "host=127.0.0.1 port=7000 dbname=d password='a b'"


def test_a_password_is_never_shown():
    for text in ("postgresql://u:hunter2@h/d", "host=h password=hunter2", "postgresql://h/d?password=hunter2"):
        info = dsn.parse(text)
        assert "hunter2" not in info.redacted() and "hunter2" not in repr(info) and "hunter2" not in str(info)
        assert dsn.REDACTED in info.redacted()
        assert "hunter2" in info.to_string()               # (the string a client connects with keeps it)


_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12)
_names = st.sampled_from(["user", "password", "dbname", "application_name", "options", "sslmode", "x_y"])


@settings(max_examples=200, deadline=None)
@given(params=st.dictionaries(_names, _values, max_size=5),
       hosts=st.lists(st.sampled_from(["h1", "db.example", "10.0.0.1", "::1"]), max_size=3),
       port=st.sampled_from([None, "5432", "6543"]), form=st.sampled_from(["uri", "keyvalue"]))
def test_every_value_survives_the_round_trip(params, hosts, port, form):
    if form == "uri":
        params = {k: v for k, v in params.items() if v != "" or k not in ("user", "dbname")}
    full = dict(params)
    if hosts:
        full["host"] = ",".join(hosts)
    if port:
        full["port"] = port
    info = dsn.ConnInfo(full, form)
    again = dsn.parse(info.to_string())
    assert again.form == form
    assert dict(again.params) == full
    assert dsn.parse(info.redacted()).get("password") in (None, dsn.REDACTED)


# -- database entries as connection strings (config.py) ---------------------------

def entry(value, **top):
    return config_mod.from_dict({"databases": {"app": value}, **top}).databases["app"]


def test_an_entry_takes_host_port_dbname_and_routing_from_the_string():
    db = entry("postgresql://app:secret@db1:5433,db2/appdb?target_session_attrs=read-write&load_balance_hosts=random")
    assert [(n.host, n.port) for n in db.nodes] == [("db1", 5433), ("db2", 5432)]
    assert db.dbname == "appdb" and db.target_session_attrs == "read-write" and db.load_balance == "random"
    single = entry({"dsn": "host=db port=6000", "pool_mode": "session", "pool_size": 3})
    assert (single.host, single.port, single.dbname, single.pool_mode, single.pool_size) == ("db", 6000, None,
                                                                                            "session", 3)


def test_an_entry_keeps_no_copy_of_the_password():
    config = config_mod.from_dict({"databases": {"app": "postgresql://app:hunter2@db/appdb"}})
    assert "hunter2" not in repr(config)


@pytest.mark.parametrize("value, message", [
    ({"dsn": "host=h", "port": 5}, "databases.app.dsn: give either dsn or port, not both"),
    ("host=h sslmode=verify-full", "set server_tls_sslmode: verify-full"),
    ("host=h channel_binding=require", "do not use channel binding"),
    ("host=h options=-cx=1", "options is not taken in a database entry: use the clients' own startup parameters"),
    ("host=h sslrootcert=/ca", "use server_tls_ca_file"),
    ("host=h frobnicate=1", "frobnicate: not a connection string parameter a database entry takes"),
    ("postgresql:///appdb", "no host"),
    ("host=@abstract", "unix-socket directory"),
    ("host=h load_balance_hosts=sometimes", "load_balance_hosts: expected disable or random"),
    ({"dsn": "host=h target_session_attrs=any", "target_session_attrs": "primary"}, "give one"),
    ({"dsn": 5}, "databases.app.dsn: expected a PostgreSQL connection URI or key=value string, got 5"),
])
def test_what_an_entry_cannot_honour_is_a_config_error_naming_it(value, message):
    with pytest.raises(config_mod.ConfigError) as info:
        entry(value)
    assert message in str(info.value)


def test_an_sslmode_within_server_tls_sslmode_is_accepted():
    assert entry("host=h sslmode=prefer").host == "h"
    assert entry("host=h sslmode=require", server_tls_sslmode="require").host == "h"


def test_server_linger_is_a_boolean_setting_set_can_change():
    config = config_mod.from_dict({"databases": {"app": "host=h"}, "server_linger": False})
    assert config.server_linger is False
    assert config_mod.with_setting(config, "server_linger", "on").server_linger is True
    with pytest.raises(config_mod.ConfigError, match="server_linger: expected true or false"):
        config_mod.from_dict({"databases": {"app": "host=h"}, "server_linger": "sometimes"})
    with pytest.raises(config_mod.ConfigError, match="server_linger: expected true or false"):
        config_mod.with_setting(config, "server_linger", "maybe")
