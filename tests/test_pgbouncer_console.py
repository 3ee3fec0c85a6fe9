"""The admin console answers PgBouncer's monitoring tools: SHOW commands with PgBouncer 1.25's columns.

The expected columns are written here from PgBouncer 1.25's doc/usage.md (and
its admin.c for the types and for SHOW USERS/TOTALS/SOCKETS/MEM/FDS/PEERS,
which the page lists less fully), in order, with their types: a tool that
reads them by position or by name works unchanged.
"""

from __future__ import annotations

import psycopg
import pytest

from helpers import PASSWORDS, connect

INT8, TEXT = 20, 25
S, I = TEXT, INT8

CONNECTION = [("type", S), ("user", S), ("database", S), ("replication", S), ("state", S), ("addr", S),
              ("port", I), ("local_addr", S), ("local_port", I), ("connect_time", S), ("request_time", S),
              ("wait", I), ("wait_us", I), ("close_needed", I), ("ptr", S), ("link", S), ("remote_pid", I),
              ("tls", S), ("application_name", S), ("prepared_statements", I), ("id", I)]

DOCUMENTED = {
    "POOLS": [("database", S), ("user", S), ("cl_active", I), ("cl_waiting", I), ("cl_active_cancel_req", I),
              ("cl_waiting_cancel_req", I), ("sv_active", I), ("sv_active_cancel", I), ("sv_being_canceled", I),
              ("sv_idle", I), ("sv_used", I), ("sv_tested", I), ("sv_login", I), ("maxwait", I),
              ("maxwait_us", I), ("pool_mode", S), ("load_balance_hosts", S)],
    "STATS": [("database", S)] + [(f"total_{n}", I) for n in (
        "xact_count", "query_count", "server_assignment_count", "received", "sent", "xact_time", "query_time",
        "wait_time", "client_parse_count", "server_parse_count", "bind_count", "client_login_count")]
    + [(f"avg_{n}", I) for n in (
        "xact_count", "query_count", "server_assignment_count", "recv", "sent", "xact_time", "query_time",
        "wait_time", "client_parse_count", "server_parse_count", "bind_count", "client_login_count")],
    "CLIENTS": CONNECTION,
    "LISTS": [("list", S), ("items", I)],
    "USERS": [("name", S), ("pool_size", S), ("reserve_pool_size", S), ("pool_mode", S),
              ("max_user_connections", I), ("current_connections", I), ("max_user_client_connections", I),
              ("current_client_connections", I)],
    "DATABASES": [("name", S), ("host", S), ("port", I), ("database", S), ("force_user", S), ("pool_size", I),
                  ("min_pool_size", I), ("reserve_pool_size", I), ("server_lifetime", I), ("pool_mode", S),
                  ("load_balance_hosts", S), ("max_connections", I), ("current_connections", I),
                  ("max_client_connections", I), ("current_client_connections", I), ("paused", I),
                  ("disabled", I)],
    "PEERS": [("peer_id", I), ("host", S), ("port", I), ("pool_size", I)],
    "PEER_POOLS": [("peer_id", I), ("cl_active_cancel_req", I), ("cl_waiting_cancel_req", I),
                   ("sv_active_cancel", I), ("sv_login", I)],
    "CONFIG": [("key", S), ("value", S), ("default", S), ("changeable", S)],
    "MEM": [("name", S), ("size", I), ("used", I), ("free", I), ("memtotal", I)],
    "DNS_HOSTS": [("hostname", S), ("ttl", I), ("addrs", S)],
    "DNS_ZONES": [("zonename", S), ("serial", I), ("count", I)],
    "VERSION": [("version", S)],
    "STATE": [("key", S), ("value", S)],
    "TOTALS": [("name", S), ("value", I)],
    "SOCKETS": CONNECTION + [(n, I) for n in ("recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain",
                                              "pkt_avail", "send_avail")],
    "FDS": [("fd", I), ("task", S), ("user", S), ("database", S), ("addr", S), ("port", I), ("cancel", I),
            ("link", I), ("client_encoding", S), ("std_strings", S), ("datestyle", S), ("timezone", S),
            ("password", S), ("scram_client_key", S), ("scram_server_key", S)],
}
DOCUMENTED["STATS_TOTALS"] = [c for c in DOCUMENTED["STATS"] if not c[0].startswith("avg_")]
DOCUMENTED["STATS_AVERAGES"] = [c for c in DOCUMENTED["STATS"] if not c[0].startswith("total_")]
DOCUMENTED["ACTIVE_SOCKETS"] = DOCUMENTED["SOCKETS"]


@pytest.fixture
def console(pg, proxy_factory, tmp_path):
    users = tmp_path / "userlist.txt"
    users.write_text("".join(f'"{u}" "{p}"\n' for u, p in PASSWORDS.items()))
    users.chmod(0o600)
    target = {"host": pg.host, "port": pg.port}
    proxy = proxy_factory(auth_type="md5", auth_file=str(users), admin_users="postgres",
                          databases={"appdb": dict(target), "forced": {**target, "dbname": "appdb", "user": "app",
                                                                       "max_db_client_connections": 7},
                                     "*": dict(target)},
                          users={"other": {"pool_size": 3, "pool_mode": "session",
                                           "max_user_client_connections": 4}})
    with connect(pg, proxy, user="other", dbname="otherdb") as client:
        client.execute("SELECT 1")
        with psycopg.connect(pg.dsn(user="postgres", dbname="pgbouncer", host=proxy.host, port=proxy.port),
                             autocommit=True) as admin:
            yield admin


@pytest.mark.parametrize("what", sorted(DOCUMENTED))
def test_show_has_pgbouncers_columns_in_order_with_their_types(console, what):
    cur = console.execute(f"SHOW {what}")
    got = [(d.name, d.type_code) for d in cur.description]
    expected = DOCUMENTED[what]
    assert got[:len(expected)] == expected
    extra = {"DATABASES": ["nodes", "target_session_attrs", "role"], "CLIENTS": ["pinned"]}
    assert [name for name, _ in got[len(expected):]] == extra.get(what, [])   # ours after PgBouncer's, as its releases add them


def rows_by_name(cur) -> list[dict]:
    names = [d.name for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def test_show_users_and_databases_fill_what_the_configuration_says(console):
    users = {r["name"]: r for r in rows_by_name(console.execute("SHOW USERS"))}
    other = users["other"]
    assert (other["pool_size"], other["reserve_pool_size"], other["pool_mode"]) == ("3", "", "session")
    assert (other["max_user_client_connections"], other["current_client_connections"]) == (4, 1)
    assert other["current_connections"] == 1            # session mode: its server connection stays
    databases = {r["name"]: r for r in rows_by_name(console.execute("SHOW DATABASES"))}
    assert databases["forced"]["force_user"] == "app"
    assert databases["forced"]["max_client_connections"] == 7
    assert databases["appdb"]["force_user"] is None


def test_show_lists_has_pgbouncers_rows(console):
    names = [r[0] for r in console.execute("SHOW LISTS").fetchall()]
    assert names == ["databases", "users", "peers", "pools", "peer_pools", "free_clients", "used_clients",
                     "login_clients", "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries",
                     "dns_pending"]


def test_show_totals_sums_every_database(console):
    totals = dict(console.execute("SHOW TOTALS").fetchall())
    stats = rows_by_name(console.execute("SHOW STATS"))
    assert totals["total_xact_count"] == sum(r["total_xact_count"] for r in stats) >= 1
    assert totals["total_client_login_count"] == sum(r["total_client_login_count"] for r in stats) >= 1


def test_show_sockets_lists_clients_and_servers(console):
    rows = rows_by_name(console.execute("SHOW SOCKETS"))
    assert {r["type"] for r in rows} == {"C", "S"}
    assert "other" in {r["user"] for r in rows if r["type"] == "C"}
    assert "other" in {r["user"] for r in rows if r["type"] == "S"}


def test_show_version_says_what_the_proxy_is(console):
    assert console.execute("SHOW VERSION").fetchone()[0].startswith("threadpool_proxy ")
