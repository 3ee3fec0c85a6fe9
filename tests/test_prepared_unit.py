"""threadpool_proxy.prepared: crafted byte streams both ways, and the reset query on PostgreSQL 15.

The fast tests feed the relay hand-written server replies; the tests at the end check each
PostgreSQL behaviour those replies assume against a real server (the ``pg`` fixture).
"""

from __future__ import annotations

import struct

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import (COPY_DONE, FLUSH, SYNC, bind, close, copy_data, cstr, describe, error_response, execute,
                     message, parse, parse_error_fields, read_message, read_until_ready, simple_query,
                     trust_session)
from threadpool_proxy import prepared as pp
from threadpool_proxy.protocol import ProtocolError

# -- message builders (the frontend ones come from helpers: not from the code under test) ----

msg = message
PARSE_OK, BIND_OK, CLOSE_OK, NO_DATA = msg(b"1"), msg(b"2"), msg(b"3"), msg(b"n")
IDLE, IN_TX, IN_FAILED_TX = msg(b"Z", b"I"), msg(b"Z", b"T"), msg(b"Z", b"E")


def params_desc(*oids) -> bytes:
    return msg(b"t", struct.pack("!h", len(oids)) + b"".join(struct.pack("!I", o) for o in oids))


def row_desc(*names) -> bytes:
    return msg(b"T", struct.pack("!h", len(names)) + b"".join(
        cstr(n) + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0) for n in names))


def data_row(*values: bytes) -> bytes:
    return msg(b"D", struct.pack("!h", len(values)) + b"".join(struct.pack("!i", len(v)) + v for v in values))


def complete(tag: str) -> bytes:
    return msg(b"C", cstr(tag))


def error(sqlstate: str, text: str = "boom") -> bytes:
    return error_response(sqlstate, text)


#: What PostgreSQL answers the Parse the relay sends in place of one it refuses, so that the
#: server raises an error at that point of the pipeline (see the real-server tests at the end).
REFUSAL_ERROR = error("42703", 'column "threadpool_proxy refused this Parse" does not exist')


def notice(text: str) -> bytes:
    return msg(b"N", b"SNOTICE\0C00000\0M" + cstr(text) + b"\0")


def copy_in_response() -> bytes:
    return msg(b"G", b"\0\0\1\0\0")


def copy_out_response() -> bytes:
    return msg(b"H", b"\0\0\1\0\0")


def server_name(sql: str, oids=()) -> bytes:
    tail = cstr(sql) + struct.pack("!h", len(oids)) + b"".join(struct.pack("!I", o) for o in oids)
    return pp.statement_for(tail).server_name


Q1 = "SELECT id, name FROM users WHERE id = $1"
Q2 = "UPDATE users SET name = $2 WHERE id = $1"
Q3 = "SELECT count(*) FROM orders"


class Client:
    """One client's relay, collecting everything sent to the client and the server."""

    def __init__(self, limit: int = 100) -> None:
        self.relay = pp.PreparedRelay(pp.ClientStatements(limit))
        self.to_client = b""
        self.to_server = b""

    def send(self, data, server: pp.ServerStatements) -> bytes:
        """Client -> relay; returns what went to the server (synthesised replies are collected)."""
        to_server, now = self.relay.from_client(data, server)
        self.to_server += bytes(to_server)
        self.to_client += now
        return bytes(to_server)

    def reply(self, data) -> bytes:
        """Server -> relay; returns what went to the client."""
        out = bytes(self.relay.from_server(data))
        self.to_client += out
        return out

    def take(self) -> bytes:
        got, self.to_client = self.to_client, b""
        return got


def prepared_on(server: pp.ServerStatements, *sqls: str) -> None:
    """Make ``server`` hold the statements, as another client would have left it."""
    other = Client()
    for i, sql in enumerate(sqls):
        other.send(parse(f"other{i}", sql) + SYNC, server)
        other.reply(PARSE_OK + IDLE)
    assert other.relay.idle()


def client_with_s(server: pp.ServerStatements, limit: int = 100) -> Client:
    """A client that prepared Q1 as "s" on ``server`` (replies already taken)."""
    client = Client(limit)
    client.send(parse("s", Q1) + SYNC, server)
    client.reply(PARSE_OK + IDLE)
    client.take()
    return client


# -- pass-through ---------------------------------------------------------------------


def test_simple_query_and_unnamed_statements_are_returned_as_the_same_object():
    server = pp.ServerStatements(10)
    client = Client()
    for data in (simple_query("SELECT 1"),
                 bytearray(parse("", Q1) + bind("") + describe(b"P", "") + execute() + SYNC),
                 memoryview(simple_query("BEGIN") + simple_query("COMMIT"))):
        to_server, now = client.relay.from_client(data, server)
        assert to_server is data and now == b""
    for data in (row_desc("a") + data_row(b"1") + complete("SELECT 1") + IDLE,
                 bytearray(PARSE_OK + BIND_OK + row_desc("id") + data_row(b"7") + complete("SELECT 1") + IDLE),
                 memoryview(complete("BEGIN") + IN_TX + complete("COMMIT") + IDLE)):
        assert client.relay.from_server(data) is data
    assert client.relay.idle()
    assert len(server) == 0 and len(client.relay.statements) == 0


def test_large_unnamed_bind_streams_through_without_being_held():
    server = pp.ServerStatements(10)
    client = Client()
    big = bind("", params=[b"x" * 100_000])
    to_server, _ = client.relay.from_client(memoryview(big)[:10], server)
    assert bytes(to_server) == big[:10]            # the first byte of the name says "unnamed"
    to_server, _ = client.relay.from_client(memoryview(big)[10:], server)
    assert bytes(to_server) == big[10:]



def test_large_named_bind_is_rewritten_at_its_head_and_the_rest_streams():
    server = pp.ServerStatements(10)
    client = client_with_s(server)
    name = server_name(Q1)
    portal = "p" * 300                                       # longer than the first window looked at
    big = bind("s", portal=portal, params=[b"z" * 200_000])
    pieces = [client.relay.from_client(memoryview(big)[a:a + 16384], server)[0]
              for a in range(0, len(big), 16384)]
    assert b"".join(bytes(p) for p in pieces) == bind(name, portal=portal, params=[b"z" * 200_000])
    assert all(type(p) is memoryview for p in pieces[1:])    # the parameters were not copied
    # Its names cut by a chunk edge: held only until they are whole.
    to_server, _ = client.relay.from_client(memoryview(big)[:100], server)
    assert bytes(to_server) == b""
    rest, _ = client.relay.from_client(memoryview(big)[100:20_000], server)
    assert bytes(rest) == bind(name, portal=portal, params=[b"z" * 200_000])[:20_000 - len(b"s") + len(name)]


def test_function_call_empty_query_and_portal_suspended():
    server = pp.ServerStatements(10)
    client = client_with_s(server)
    function_call = msg(b"F", struct.pack("!I", 1598) + b"\0\0\0\0\0\0")
    client.send(function_call + simple_query("") + bind("s", portal="cur") + execute("cur", 1)
                + execute("cur", 1) + SYNC, server)
    answer = (msg(b"V", b"\0\0\0\x011") + IDLE + msg(b"I") + IDLE + BIND_OK + data_row(b"1") + msg(b"s")
              + complete("SELECT 0") + IDLE)
    assert client.reply(answer) == answer
    assert client.relay.idle()


# -- sharing statements -----------------------------------------------------------------


def test_two_clients_share_one_server_statement():
    server = pp.ServerStatements(10)
    name = server_name(Q1, (23,))
    alice = Client()
    pipeline = parse("_pg3_0", Q1, (23,)) + bind("_pg3_0", params=[b"7"]) + describe(b"P", "") + execute() + SYNC
    assert alice.send(pipeline, server) == (
        parse(name, Q1, (23,)) + bind(name, params=[b"7"]) + describe(b"P", "") + execute() + SYNC)
    answer = PARSE_OK + BIND_OK + row_desc("id", "name") + data_row(b"7", b"ann") + complete("SELECT 1") + IDLE
    assert alice.reply(answer) == answer
    assert server.names() == [name]

    # Another client, its own name for the same text: no Parse goes to the server.
    bob = Client()
    pipeline = parse("s1", Q1, (23,)) + bind("s1", params=[b"8"]) + describe(b"P", "") + execute() + SYNC
    assert bob.send(pipeline, server) == bind(name, params=[b"8"]) + describe(b"P", "") + execute() + SYNC
    assert bob.take() == PARSE_OK                  # nothing was ahead of it: given at once
    answer = BIND_OK + row_desc("id", "name") + data_row(b"8", b"bob") + complete("SELECT 1") + IDLE
    assert bob.reply(answer) == answer
    assert bob.relay.idle()
    assert (bob.relay.stats.reused, bob.relay.stats.prepared) == (2, 0)   # the Parse and the Bind
    assert (alice.relay.stats.prepared, alice.relay.stats.reused) == (1, 1)   # her Bind needed no injection


def test_synthesised_parse_complete_waits_for_the_replies_ahead_of_it():
    server = pp.ServerStatements(10)
    prepared_on(server, Q3)
    name = server_name(Q3)
    client = Client()
    pipeline = simple_query("SELECT 1") + parse("a", Q3) + bind("a") + execute() + SYNC
    assert client.send(pipeline, server) == simple_query("SELECT 1") + bind(name) + execute() + SYNC
    assert client.take() == b""
    first = row_desc("x") + data_row(b"1") + complete("SELECT 1") + IDLE
    second = BIND_OK + data_row(b"5") + complete("SELECT 1") + IDLE
    assert client.reply(first + second) == first + PARSE_OK + second


def test_parse_answered_from_cache_with_flush_is_given_at_once():
    server = pp.ServerStatements(10)
    prepared_on(server, Q1)
    client = Client()
    to_server = client.send(parse("p", Q1) + FLUSH, server)
    assert to_server == FLUSH
    assert client.take() == PARSE_OK
    assert client.relay.idle()


def test_close_with_flush_is_answered_at_once_and_keeps_the_server_statement():
    server = pp.ServerStatements(10)
    client = Client()
    client.send(parse("p", Q1) + SYNC, server)
    client.reply(PARSE_OK + IDLE)
    assert client.take() == PARSE_OK + IDLE
    assert client.send(close(b"S", "p") + FLUSH, server) == FLUSH
    assert client.take() == CLOSE_OK
    assert "p".encode() not in client.relay.statements
    assert server.names() == [server_name(Q1)]     # other clients may still use it


def test_close_of_portals_and_of_untracked_statements_goes_to_the_server():
    server = pp.ServerStatements(10)
    client = Client()
    data = close(b"P", "portal") + close(b"S", "never_prepared") + SYNC
    to_server, _ = client.relay.from_client(data, server)
    assert to_server is data
    assert client.reply(CLOSE_OK + CLOSE_OK + IDLE) == CLOSE_OK + CLOSE_OK + IDLE


# -- injecting Parse ----------------------------------------------------------------------


def test_bind_on_a_server_lacking_the_statement_injects_parse_and_swallows_its_reply():
    first, second = pp.ServerStatements(10), pp.ServerStatements(10)
    name = server_name(Q1, (23,))
    client = Client()
    client.send(parse("s", Q1, (23,)) + SYNC, first)
    client.reply(PARSE_OK + IDLE)
    client.take()

    # Next transaction, another server connection.
    sent = client.send(bind("s", params=[b"1"]) + execute() + SYNC, second)
    assert sent == parse(name, Q1, (23,)) + bind(name, params=[b"1"]) + execute() + SYNC
    assert client.reply(PARSE_OK + BIND_OK) == BIND_OK
    assert client.reply(data_row(b"1") + complete("SELECT 1") + IDLE) == data_row(b"1") + complete("SELECT 1") + IDLE
    assert second.names() == [name]
    stats = client.relay.stats
    assert (stats.prepared, stats.injected, stats.reused) == (2, 1, 0)

    # Back on the first connection the statement is still there: no injection.
    assert client.send(bind("s", params=[b"2"]) + execute() + SYNC, first) == (
        bind(name, params=[b"2"]) + execute() + SYNC)
    assert client.relay.stats.reused == 1


def test_describe_statement_before_bind_on_a_fresh_server():
    first, second = pp.ServerStatements(10), pp.ServerStatements(10)
    name = server_name(Q2, (23, 25))
    client = Client()
    client.send(parse("upd", Q2, (23, 25)) + SYNC, first)
    client.reply(PARSE_OK + IDLE)
    client.take()
    pipeline = describe(b"S", "upd") + bind("upd", params=[b"1", b"x"]) + execute() + SYNC
    assert client.send(pipeline, second) == (
        parse(name, Q2, (23, 25)) + describe(b"S", name) + bind(name, params=[b"1", b"x"]) + execute() + SYNC)
    answer = params_desc(23, 25) + NO_DATA + BIND_OK + complete("UPDATE 1") + IDLE
    assert client.reply(PARSE_OK + answer) == answer
    assert client.relay.idle()


def test_unknown_statement_name_is_forwarded_for_postgresql_to_refuse():
    server = pp.ServerStatements(10)
    client = Client()
    data = bind("nope") + describe(b"S", "nope") + execute() + SYNC
    to_server, _ = client.relay.from_client(data, server)
    assert to_server is data
    answer = error("26000", 'prepared statement "nope" does not exist') + IDLE
    assert client.reply(answer) == answer
    assert client.relay.idle()


def test_close_then_parse_of_another_text_under_the_same_name():
    server = pp.ServerStatements(10)
    client = client_with_s(server)
    pipeline = close(b"S", "s") + parse("s", Q3) + bind("s") + execute() + SYNC
    assert client.send(pipeline, server) == parse(server_name(Q3), Q3) + bind(server_name(Q3)) + execute() + SYNC
    assert client.take() == CLOSE_OK               # first in line: given at once
    answer = PARSE_OK + BIND_OK + data_row(b"3") + complete("SELECT 1") + IDLE
    assert client.reply(answer) == answer
    assert client.relay.statements.get(b"s").server_name == server_name(Q3)
    assert set(server.names()) == {server_name(Q1), server_name(Q3)}


# -- errors ------------------------------------------------------------------------------


def test_error_mid_pipeline_drops_later_synthesised_replies_and_tentative_entries():
    server = pp.ServerStatements(10)
    prepared_on(server, Q1)
    client = Client()
    bad = "SELECT * FROM missing_table"
    pipeline = (parse("bad", bad) + parse("good", Q1) + bind("good") + execute() + close(b"S", "good") + SYNC)
    sent = client.send(pipeline, server)
    assert sent == parse(server_name(bad), bad) + bind(server_name(Q1)) + execute() + SYNC
    assert server_name(bad) in server                       # tentative until answered
    answer = error("42P01", 'relation "missing_table" does not exist') + IDLE
    assert client.reply(answer) == answer                   # no ParseComplete, no CloseComplete
    assert server_name(bad) not in server
    assert server_name(Q1) in server
    assert len(client.relay.statements) == 0                # neither name was created
    assert client.relay.idle()


def test_error_on_execute_after_a_synthesised_parse_complete():
    server = pp.ServerStatements(10)
    prepared_on(server, Q1, Q3)
    client = Client()
    pipeline = parse("a", Q1) + bind("a") + execute() + parse("b", Q3) + bind("b") + execute() + SYNC
    client.send(pipeline, server)
    assert client.take() == PARSE_OK
    answer = BIND_OK + error("22012", "division by zero") + IDLE
    assert client.reply(answer) == answer                   # "b"'s ParseComplete is never given
    assert b"a" in client.relay.statements and b"b" not in client.relay.statements


def test_skipped_close_restores_the_name_and_skipped_reparse_is_undone_in_order():
    server = pp.ServerStatements(10)
    client = client_with_s(server)
    # The Execute fails; Close "s" and the re-Parse of "s" are skipped by the server.
    client.send(bind("s") + execute() + close(b"S", "s") + parse("s", Q3) + SYNC, server)
    client.reply(BIND_OK + error("22012") + IDLE)
    assert client.take() == BIND_OK + error("22012") + IDLE
    assert client.relay.statements.get(b"s").server_name == server_name(Q1)
    assert server_name(Q3) not in server


def test_error_then_flush_only_skips_messages_sent_before_the_sync():
    server = pp.ServerStatements(10)
    client = client_with_s(server)
    client.send(parse("", "SELEC 1") + FLUSH, server)
    assert client.reply(error("42601")) == error("42601")
    client.take()
    assert not client.relay.idle()                          # the server skips until Sync
    # Not answered now: the server is skipping, so PostgreSQL would never answer it.
    assert client.send(close(b"S", "s") + FLUSH, server) == FLUSH
    assert client.take() == b""
    assert b"s" in client.relay.statements
    client.send(SYNC, server)
    assert client.reply(IDLE) == IDLE
    assert client.relay.idle()


def test_reparse_of_a_name_in_use_gets_postgresqls_error_from_the_server():
    server = pp.ServerStatements(10)
    client = client_with_s(server)
    sent = client.send(parse("s", Q3) + bind("s") + execute() + SYNC, server)
    assert sent.startswith(pp._REFUSAL_PARSE)              # the server raises the error in place
    got = client.reply(REFUSAL_ERROR + IDLE)
    fields = parse_error_fields(got[5:-6])
    assert (fields["C"], fields["M"], fields["S"]) == ("42P05", 'prepared statement "s" already exists', "ERROR")
    assert got.endswith(IDLE)
    assert client.relay.statements.get(b"s").server_name == server_name(Q1)
    assert client.relay.stats.refused == 1


def test_refusal_in_an_aborted_transaction_passes_the_servers_own_error():
    server = pp.ServerStatements(10)
    client = client_with_s(server, limit=1)
    client.send(parse("t", Q3) + SYNC, server)              # over the client's limit
    aborted = error("25P02", "current transaction is aborted") + IN_FAILED_TX
    assert client.reply(aborted) == aborted


def test_client_limit_refuses_further_statements_with_an_error():
    server = pp.ServerStatements(10)
    client = Client(limit=2)
    client.send(parse("a", Q1) + parse("b", Q2) + SYNC, server)
    client.reply(PARSE_OK + PARSE_OK + IDLE)
    client.take()
    sent = client.send(parse("c", Q3) + bind("c") + execute() + SYNC, server)
    assert sent == pp._REFUSAL_PARSE + bind("c") + execute() + SYNC   # "c" unknown: untouched
    got = client.reply(REFUSAL_ERROR + IDLE)
    assert parse_error_fields(got[5:-6])["C"] == "53400"
    client.take()
    # Closing one makes room again.
    client.send(close(b"S", "a") + parse("c", Q3) + SYNC, server)
    client.reply(PARSE_OK + IDLE)
    assert client.take() == CLOSE_OK + PARSE_OK + IDLE
    assert sorted(client.relay.statements.names()) == [b"b", b"c"]


def test_statement_dropped_behind_the_proxys_back_is_prepared_again_after_one_error():
    server = pp.ServerStatements(10)
    client = client_with_s(server)
    name = server_name(Q1)
    # e.g. someone ran DEALLOCATE tpp_...: the server answers 26000 for the rewritten Bind.
    client.send(bind("s") + execute() + SYNC, server)
    client.reply(error("26000", f'prepared statement "{name.decode()}" does not exist') + IDLE)
    assert name not in server
    assert client.send(bind("s") + execute() + SYNC, server) == parse(name, Q1) + bind(name) + execute() + SYNC


@pytest.mark.parametrize("command", ["DEALLOCATE ALL", "DISCARD ALL"])
def test_deallocate_all_from_the_client_forgets_its_statements(command):
    server = pp.ServerStatements(10)
    client = client_with_s(server)
    # A Parse pipelined after DEALLOCATE ALL survives it.
    client.send(simple_query(command) + parse("t", Q3) + SYNC, server)
    client.reply(complete(command) + IDLE + PARSE_OK + IDLE)
    assert client.relay.statements.names() == [b"t"]
    assert server.names() == [server_name(Q3)]
    # psycopg re-prepares its names after DISCARD ALL / DEALLOCATE ALL: not "already exists".
    assert client.send(parse("s", Q1) + SYNC, server) == parse(server_name(Q1), Q1) + SYNC


# -- eviction ---------------------------------------------------------------------------


def test_eviction_closes_the_least_recently_used_statement_and_swallows_close_complete():
    server = pp.ServerStatements(2)
    client = Client()
    client.send(parse("a", Q1) + parse("b", Q2) + SYNC, server)
    client.reply(PARSE_OK + PARSE_OK + IDLE)
    client.send(bind("a") + execute() + SYNC, server)       # "a" is now the most recently used
    client.reply(BIND_OK + complete("SELECT 0") + IDLE)
    client.take()
    sent = client.send(parse("c", Q3) + SYNC, server)
    assert sent == parse(server_name(Q3), Q3) + close(b"S", server_name(Q2)) + SYNC
    assert client.reply(PARSE_OK + CLOSE_OK + IDLE) == PARSE_OK + IDLE
    assert server.names() == [server_name(Q1), server_name(Q3)]
    assert client.relay.stats.evicted == 1
    # "b" is still the client's: using it prepares it again (evicting "a").
    sent = client.send(bind("b") + execute() + SYNC, server)
    assert sent == (parse(server_name(Q2), Q2) + close(b"S", server_name(Q1)) + bind(server_name(Q2))
                    + execute() + SYNC)
    assert client.reply(PARSE_OK + CLOSE_OK + BIND_OK + complete("UPDATE 1") + IDLE) == (
        BIND_OK + complete("UPDATE 1") + IDLE)


def test_skipped_eviction_close_puts_the_statement_back():
    server = pp.ServerStatements(1)
    client = Client()
    client.send(parse("a", Q1) + SYNC, server)
    client.reply(PARSE_OK + IDLE)
    client.send(parse("b", "SELECT * FROM nowhere") + SYNC, server)
    assert server.names() == [server_name("SELECT * FROM nowhere")]
    client.reply(error("42P01") + IDLE)                      # the Parse failed, its Close was skipped
    assert server.names() == [server_name(Q1)]


# -- COPY --------------------------------------------------------------------------------


def test_copy_from_stdin_through_extended_protocol_sync_before_data():
    server = pp.ServerStatements(10)
    prepared_on(server, Q1)
    client = Client()
    start = parse("cp", "COPY t FROM STDIN") + bind("cp") + execute() + SYNC
    client.send(start, server)
    assert client.reply(PARSE_OK + BIND_OK + copy_in_response()) == PARSE_OK + BIND_OK + copy_in_response()
    data = copy_data(b"1\n2\n") + COPY_DONE + SYNC
    to_server, _ = client.relay.from_client(data, server)
    assert to_server is data
    assert client.reply(complete("COPY 2") + IDLE) == complete("COPY 2") + IDLE
    assert client.relay.idle()                              # the ignored Sync is not awaited
    client.send(parse("q", Q1) + FLUSH, server)
    assert client.take().endswith(PARSE_OK)


def test_copy_data_sent_before_the_copy_in_response_arrives():
    server = pp.ServerStatements(10)
    client = Client()
    client.send(parse("", "COPY t FROM STDIN") + bind("") + execute() + SYNC
                + copy_data(b"1\n") + COPY_DONE + SYNC, server)
    answer = PARSE_OK + BIND_OK + copy_in_response() + complete("COPY 1") + IDLE
    assert client.reply(answer) == answer
    assert client.relay.idle()


def test_copy_failing_mid_data_skips_to_the_sync_after_copy_done():
    server = pp.ServerStatements(10)
    client = Client()
    client.send(parse("", "COPY t FROM STDIN") + bind("") + execute() + SYNC, server)
    client.reply(PARSE_OK + BIND_OK + copy_in_response())
    client.send(copy_data(b"x\n"), server)
    client.reply(error("22P02"))
    assert not client.relay.idle()
    client.send(COPY_DONE + SYNC, server)
    client.reply(IDLE)
    assert client.relay.idle()


def test_copy_to_stdout_extended_and_simple():
    server = pp.ServerStatements(10)
    client = Client()
    client.send(parse("out", "COPY t TO STDOUT") + bind("out") + execute() + SYNC
                + simple_query("COPY t TO STDOUT"), server)
    rows = copy_out_response() + copy_data(b"1\n") + copy_data(b"2\n") + msg(b"c") + complete("COPY 2")
    assert client.reply(PARSE_OK + BIND_OK + rows + IDLE + rows + IDLE) == PARSE_OK + BIND_OK + rows + IDLE + rows + IDLE
    assert client.relay.idle()


# -- chunk boundaries -----------------------------------------------------------------------

def _pipeline():
    """A realistic pipeline for a client whose server already holds Q1 (from another client)."""
    client_stream = (
        simple_query("SELECT 1")
        + parse("s_a", Q1, (23,)) + bind("s_a", params=[b"42"]) + describe(b"P", "") + execute() + SYNC
        + parse("s_b", Q3) + describe(b"S", "s_b") + bind("s_b") + execute() + close(b"S", "s_a") + SYNC
        + parse("", "SELECT 2") + bind("", params=[b"y" * 300]) + execute() + SYNC
        + parse("s_c", Q2, (23, 25)) + FLUSH)
    server_stream = (
        row_desc("?column?") + data_row(b"1") + notice("hello") + complete("SELECT 1") + IDLE
        + BIND_OK + row_desc("id", "name") + data_row(b"42", b"x" * 200) + complete("SELECT 1") + IDLE
        + PARSE_OK + params_desc() + row_desc("count") + msg(b"S", b"TimeZone\0UTC\0") + BIND_OK
        + data_row(b"9") + complete("SELECT 1") + IDLE
        + PARSE_OK + BIND_OK + complete("SELECT 1") + IDLE
        + PARSE_OK)
    return client_stream, server_stream


def _run_pipeline(client_chunks, server_chunks):
    server = pp.ServerStatements(10)
    client = Client()
    # the server holds Q1 with parameter type 23, as another client left it
    other = Client()
    other.send(parse("x", Q1, (23,)) + SYNC, server)
    other.reply(PARSE_OK + IDLE)
    for chunk in client_chunks:
        client.send(chunk, server)
    for chunk in server_chunks:
        client.reply(chunk)
    return client.to_server, client.to_client, client.relay


def _chunks(data: bytes, cuts) -> list:
    edges = [0, *sorted(cuts), len(data)]
    return [memoryview(data)[a:b] for a, b in zip(edges, edges[1:])]


def test_reference_pipeline_bytes_both_ways():
    client_stream, server_stream = _pipeline()
    to_server, to_client, relay = _run_pipeline([client_stream], [server_stream])
    a, b, c = server_name(Q1, (23,)), server_name(Q3), server_name(Q2, (23, 25))
    assert to_server == (
        simple_query("SELECT 1")
        + bind(a, params=[b"42"]) + describe(b"P", "") + execute() + SYNC
        + parse(b, Q3) + describe(b"S", b) + bind(b) + execute() + SYNC
        + parse("", "SELECT 2") + bind("", params=[b"y" * 300]) + execute() + SYNC
        + parse(c, Q2, (23, 25)) + FLUSH)
    assert to_client == (
        row_desc("?column?") + data_row(b"1") + notice("hello") + complete("SELECT 1") + IDLE
        + PARSE_OK + BIND_OK + row_desc("id", "name") + data_row(b"42", b"x" * 200) + complete("SELECT 1") + IDLE
        + PARSE_OK + params_desc() + row_desc("count") + msg(b"S", b"TimeZone\0UTC\0") + BIND_OK
        + data_row(b"9") + complete("SELECT 1") + CLOSE_OK + IDLE
        + PARSE_OK + BIND_OK + complete("SELECT 1") + IDLE
        + PARSE_OK)
    assert relay.idle()
    assert sorted(relay.statements.names()) == [b"s_b", b"s_c"]


def test_every_split_point_of_the_client_stream():
    client_stream, server_stream = _pipeline()
    expected = _run_pipeline([client_stream], [server_stream])[:2]
    for cut in range(1, len(client_stream)):
        assert _run_pipeline(_chunks(client_stream, [cut]), [server_stream])[:2] == expected, cut


def test_every_split_point_of_the_server_stream():
    client_stream, server_stream = _pipeline()
    expected = _run_pipeline([client_stream], [server_stream])[:2]
    for cut in range(1, len(server_stream)):
        assert _run_pipeline([client_stream], _chunks(server_stream, [cut]))[:2] == expected, cut


def test_byte_at_a_time_both_ways():
    client_stream, server_stream = _pipeline()
    expected = _run_pipeline([client_stream], [server_stream])[:2]
    ones = lambda data: [data[i:i + 1] for i in range(len(data))]   # noqa: E731
    got_server, got_client, relay = _run_pipeline(ones(client_stream), ones(server_stream))
    assert (got_server, got_client) == expected
    assert relay.idle()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_chunking_both_ways(data):
    client_stream, server_stream = _pipeline()
    expected = _run_pipeline([client_stream], [server_stream])[:2]
    client_cuts = data.draw(st.sets(st.integers(1, len(client_stream) - 1), max_size=12))
    server_cuts = data.draw(st.sets(st.integers(1, len(server_stream) - 1), max_size=12))
    got = _run_pipeline(_chunks(client_stream, client_cuts), _chunks(server_stream, server_cuts))[:2]
    assert got == expected


def test_interleaved_chunks_respect_the_order_of_replies():
    """Server bytes fed while the client's pipeline is still arriving (as they really interleave)."""
    server = pp.ServerStatements(10)
    prepared_on(server, Q3)
    client = Client()
    client.send(simple_query("SELECT pg_sleep(0)") + parse("a", Q3)[:7], server)
    # a NoticeResponse split across chunks is being passed when the cached Parse completes
    note = notice("x" * 50)
    client.reply(note[:20])
    client.send(parse("a", Q3)[7:] + FLUSH, server)
    assert client.take() == note[:20]                       # the synthesised reply waits...
    client.reply(note[20:] + row_desc("pg_sleep") + data_row(b"") + complete("SELECT 1") + IDLE)
    assert client.take() == note[20:] + row_desc("pg_sleep") + data_row(b"") + complete("SELECT 1") + IDLE + PARSE_OK


def test_synthesised_reply_held_while_an_async_message_is_half_passed():
    server = pp.ServerStatements(10)
    prepared_on(server, Q3)
    client = Client()
    note = notice("y" * 40)
    client.reply(note[:10])                                 # between transactions, half a notice
    client.send(parse("a", Q3) + bind("a") + execute() + SYNC, server)
    assert client.take() == note[:10]
    client.reply(note[10:] + BIND_OK + complete("SELECT 0") + IDLE)
    assert client.take() == note[10:] + PARSE_OK + BIND_OK + complete("SELECT 0") + IDLE


# -- relay life cycle ---------------------------------------------------------------------


def test_server_may_change_only_when_idle_and_reset_forgets_in_flight_requests():
    first, second = pp.ServerStatements(10), pp.ServerStatements(10)
    client = Client()
    client.send(parse("s", Q1) + bind("s") + SYNC, first)
    assert not client.relay.idle()
    with pytest.raises(RuntimeError):
        client.relay.from_client(SYNC, second)
    client.relay.reset()                                    # the first connection died
    assert client.relay.idle()
    # The client's name survived: the new connection gets the statement injected.
    sent = client.send(bind("s") + execute() + SYNC, second)
    assert sent == parse(server_name(Q1), Q1) + bind(server_name(Q1)) + execute() + SYNC


def test_reply_out_of_step_is_a_protocol_error():
    server = pp.ServerStatements(10)
    client = Client()
    client.send(bind("") + SYNC, server)
    with pytest.raises(ProtocolError):
        client.reply(PARSE_OK)


def test_statements_are_interned_across_clients():
    tail = cstr(Q1) + b"\0\0"
    assert pp.statement_for(tail) is pp.statement_for(tail)
    assert pp.statement_for(tail).server_name.startswith(pp.SERVER_NAME_PREFIX)
    assert pp.statement_for(cstr(Q1) + b"\0\1\0\0\0\x17") is not pp.statement_for(tail)   # typed: another one


def test_limits_must_be_positive():
    with pytest.raises(ValueError):
        pp.ServerStatements(0)
    with pytest.raises(ValueError):
        pp.ClientStatements(0)


# -- the reset query on a real server ----------------------------------------------------------


def test_reset_query_keeps_protocol_statements_and_resets_the_rest(pg):
    with psycopg.connect(pg.dsn(), autocommit=True, prepare_threshold=None) as conn:
        raw = conn.pgconn
        name = server_name("SELECT $1::int + 1")
        assert raw.prepare(name, b"SELECT $1::int + 1").status == pq_status.COMMAND_OK
        default_work_mem = conn.execute("SHOW work_mem").fetchone()[0]
        for sql in ("PREPARE from_sql AS SELECT 2", 'PREPARE "Quoted Name" AS SELECT 3',
                    "SET work_mem = '7MB'", "CREATE TEMP TABLE scratch (x int)", "LISTEN tpp_channel",
                    "SELECT pg_advisory_lock(4242)", "DECLARE held CURSOR WITH HOLD FOR SELECT 1",
                    "CREATE TEMP SEQUENCE seq", "SELECT nextval('seq')"):
            conn.execute(sql)

        result = raw.exec_(pp.RESET_QUERY.encode())     # one simple Query, as the pool sends it
        assert result.status == pq_status.TUPLES_OK or result.status == pq_status.COMMAND_OK, result.error_message

        assert conn.execute("SELECT name, from_sql FROM pg_prepared_statements").fetchall() == [
            (name.decode(), False)]
        assert conn.execute("SHOW work_mem").fetchone()[0] == default_work_mem
        assert conn.execute("SELECT count(*) FROM pg_class WHERE relname = 'scratch'").fetchone()[0] == 0
        assert conn.execute("SELECT * FROM pg_listening_channels()").fetchall() == []
        assert conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                            " AND pid = pg_backend_pid()").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM pg_cursors").fetchone()[0] == 0
        executed = raw.exec_prepared(name, [b"41"])
        assert executed.get_value(0, 0) == b"42"
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute("SELECT lastval()")             # DISCARD SEQUENCES ran

        # Why the reset is spelled out: DISCARD ALL cannot be one statement of such a Query.
        refused = raw.exec_(b"SELECT 1; DISCARD ALL")
        assert b"cannot run inside a transaction block" in refused.error_message


pq_status = psycopg.pq.ExecStatus


# -- PostgreSQL's own answers, which the stand-ins above copy --------------------------------
#
# The tests above feed the relay hand-written server replies.  Each test here sends a real
# PostgreSQL 15 what one of them assumes an answer to: straight (the server's behaviour), and
# through a PreparedRelay fed the server's real replies (the relay's handling of it).


def messages(data: bytes) -> list:
    """A byte stream cut into [(kind, body)]."""
    out, at = [], 0
    while at < len(data):
        length = struct.unpack_from("!I", data, at + 1)[0]
        out.append((chr(data[at]), data[at + 5:at + 1 + length]))
        at += 1 + length
    return out


def kinds(replies) -> list:
    return [kind for kind, _ in replies]


def read_messages(sock, count: int) -> list:
    return [read_message(sock) for _ in range(count)]


def error_fields(reply, keys="SVCM") -> dict:
    """The fields ``keys`` of an ErrorResponse (kind, body); PostgreSQL adds F, L and R (its source)."""
    kind, body = reply
    assert kind == "E", reply
    fields = parse_error_fields(body)
    return {k: fields.get(k) for k in keys}


class RelayedSession:
    """A PreparedRelay in front of a real PostgreSQL backend (a raw session of trustuser, trust):
    what the relay sends goes to the server, and the server's replies come back through it."""

    def __init__(self, pg, limit: int = 100) -> None:
        self.sock = trust_session(pg)
        self.server = pp.ServerStatements(10)
        self.client = Client(limit)

    def __enter__(self) -> "RelayedSession":
        return self

    def __exit__(self, *exc_info) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bytes:
        sent = self.client.send(data, self.server)
        self.sock.sendall(sent)
        return sent

    def replies(self, count: int | None = None) -> list:
        """Feed the relay ``count`` server messages (None: until it has every answer it awaits);
        returns what the client got, as [(kind, body)]."""
        fed = 0
        while fed != count and (count is not None or not self.client.relay.idle()):
            kind, body = read_message(self.sock)
            self.client.reply(message(kind.encode(), body))
            fed += 1
        return messages(self.client.take())


@pytest.fixture
def direct(pg):
    """A raw session straight to PostgreSQL (trustuser), after its first ReadyForQuery."""
    sock = trust_session(pg)
    yield sock
    sock.close()


def test_postgresql_refuses_a_second_parse_of_a_name_as_the_relay_does(pg, direct):
    """42P05 (test_reparse_of_a_name_in_use_gets_postgresqls_error_from_the_server)."""
    direct.sendall(parse("s", "SELECT 1") + SYNC + parse("s", "SELECT 2") + SYNC)
    assert kinds(read_until_ready(direct)) == ["1", "Z"]
    server_error, server_ready = read_until_ready(direct)
    with RelayedSession(pg) as session:
        session.send(parse("s", "SELECT 1") + SYNC)
        assert session.replies() == [("1", b""), ("Z", b"I")]
        session.send(parse("s", "SELECT 2") + SYNC)
        relay_error, relay_ready = session.replies()
        assert session.client.relay.statements.get(b"s").server_name == server_name("SELECT 1")
    assert error_fields(server_error) == {"S": "ERROR", "V": "ERROR", "C": "42P05",
                                          "M": 'prepared statement "s" already exists'}
    assert error_fields(relay_error) == error_fields(server_error)
    assert relay_ready == server_ready == ("Z", b"I")


def test_the_refusal_parse_gets_the_error_the_relay_replaces_and_aborts_like_any_error(pg, direct):
    """The stand-in REFUSAL_ERROR, and 53400 over the client's limit
    (test_client_limit_refuses_further_statements_with_an_error): the refused Parse fails on the
    server, so what follows it up to Sync is skipped, and the client's other statements, the
    unnamed one too, are still there."""
    with RelayedSession(pg, limit=1) as session:
        session.send(parse("", "SELECT 7") + parse("a", "SELECT 1") + SYNC)
        assert kinds(session.replies()) == ["1", "1", "Z"]
        rest = bind("b") + execute() + SYNC
        sent = session.send(parse("b", "SELECT 2") + rest)
        refused, ready = session.replies()
        assert error_fields(refused)["C"] == "53400" and ready == ("Z", b"I")
        assert session.client.relay.statements.names() == [b"a"]
        session.send(bind("") + execute() + bind("a") + execute() + SYNC)
        rows = [body[-1:] for kind, body in session.replies() if kind == "D"]
        assert rows == [b"7", b"1"]
    assert sent.endswith(rest)
    refusal_parse = sent[:-len(rest)]
    direct.sendall(refusal_parse + bind("b") + execute() + SYNC)
    server_error, server_ready = read_until_ready(direct)
    assert error_fields(server_error, "SCM") == error_fields(messages(REFUSAL_ERROR)[0], "SCM")
    assert server_ready == ("Z", b"I")


def test_a_refusal_in_an_aborted_transaction_gets_25p02_first(pg, direct):
    """test_refusal_in_an_aborted_transaction_passes_the_servers_own_error: PostgreSQL checks
    for an aborted transaction before it analyses the refusal Parse's query."""
    failing = simple_query("BEGIN") + simple_query("SELECT 1/0")
    with RelayedSession(pg, limit=1) as session:
        session.send(parse("a", "SELECT 1") + SYNC + failing)
        assert kinds(session.replies()) == ["1", "Z", "C", "Z", "E", "Z"]
        session.send(parse("b", "SELECT 2") + SYNC)
        relay_error, relay_ready = session.replies()
        assert error_fields(relay_error)["C"] == "25P02" and relay_ready == ("Z", b"E")
    direct.sendall(failing)
    assert kinds(read_until_ready(direct) + read_until_ready(direct)) == ["C", "Z", "E", "Z"]
    direct.sendall(parse("x", 'SELECT "no such column"') + SYNC)
    server_error, server_ready = read_until_ready(direct)
    assert error_fields(relay_error) == error_fields(server_error) and relay_ready == server_ready


@pytest.mark.parametrize("data_first", [False, True], ids=["sync-before-data", "data-before-copy-in-response"])
def test_postgresql_ignores_a_sync_sent_during_copy_in(pg, direct, data_first):
    """test_copy_from_stdin_through_extended_protocol_sync_before_data and
    test_copy_data_sent_before_the_copy_in_response_arrives: the Sync after Execute gets no
    ReadyForQuery of its own (the README's known limit)."""
    start = parse("cp", "COPY tpp_copied FROM STDIN") + bind("cp") + execute() + SYNC
    data = copy_data(b"1\n2\n") + COPY_DONE + SYNC
    count = simple_query("SELECT count(*) FROM tpp_copied")
    create = simple_query("CREATE TEMP TABLE tpp_copied (x int)")
    direct.sendall(create)
    read_until_ready(direct)
    if data_first:
        direct.sendall(start + data)
    else:
        direct.sendall(start)
        assert kinds(read_messages(direct, 3)) == ["1", "2", "G"]
        direct.sendall(data)
    # Had the first Sync been answered, a ReadyForQuery would come before the count's row.
    direct.sendall(count)
    replies = read_until_ready(direct) + read_until_ready(direct)
    assert kinds(replies) == (["1", "2", "G"] if data_first else []) + ["C", "Z", "T", "D", "C", "Z"]
    assert replies[-6] == ("C", b"COPY 2\0") and replies[-3][1].endswith(b"2")
    with RelayedSession(pg) as session:
        session.send(create)
        session.replies()
        if data_first:
            session.send(start + data)
        else:
            session.send(start)
            assert kinds(session.replies(3)) == ["1", "2", "G"]
            session.send(data)
        assert kinds(session.replies()) == (["1", "2", "G"] if data_first else []) + ["C", "Z"]
        assert session.client.relay.idle()                 # the ignored Sync is not awaited
        session.send(parse("q", "SELECT 1") + FLUSH)
        assert session.replies(1) == [("1", b"")]


def test_postgresql_skips_to_sync_after_an_error_in_copy_in(pg, direct):
    """test_copy_failing_mid_data_skips_to_the_sync_after_copy_done."""
    direct.sendall(simple_query("CREATE TEMP TABLE tpp_copied (x int)"))
    read_until_ready(direct)
    direct.sendall(parse("", "COPY tpp_copied FROM STDIN") + bind("") + execute() + SYNC)
    assert kinds(read_messages(direct, 3)) == ["1", "2", "G"]
    direct.sendall(copy_data(b"x\n"))
    (bad,) = read_messages(direct, 1)
    assert error_fields(bad)["C"] == "22P02"
    direct.sendall(COPY_DONE + SYNC)
    assert read_until_ready(direct) == [("Z", b"I")]
    with RelayedSession(pg) as session:
        session.send(simple_query("CREATE TEMP TABLE tpp_copied (x int)"))
        session.replies()
        session.send(parse("", "COPY tpp_copied FROM STDIN") + bind("") + execute() + SYNC)
        session.replies(3)
        session.send(copy_data(b"x\n"))
        assert error_fields(session.replies(1)[0])["C"] == "22P02"
        assert not session.client.relay.idle()
        session.send(COPY_DONE + SYNC)
        assert session.replies() == [("Z", b"I")]


def test_postgresql_skips_everything_after_an_error_until_sync_flush_or_not(pg, direct):
    """test_error_then_flush_only_skips_messages_sent_before_the_sync and the skipped Closes of
    test_skipped_eviction_close_puts_the_statement_back: after an error the server answers
    nothing (a Close and a Flush included) until Sync."""
    direct.sendall(parse("kept", "SELECT 1") + SYNC)
    read_until_ready(direct)
    direct.sendall(parse("", "SELEC 1") + FLUSH)
    (syntax,) = read_messages(direct, 1)
    assert error_fields(syntax)["C"] == "42601"
    direct.sendall(close(b"S", "kept") + FLUSH + SYNC)
    assert read_until_ready(direct) == [("Z", b"I")]              # no CloseComplete
    direct.sendall(parse("", "SELECT * FROM tpp_nowhere") + close(b"S", "kept") + SYNC)
    assert kinds(read_until_ready(direct)) == ["E", "Z"]
    direct.sendall(bind("kept") + execute() + SYNC)
    assert kinds(read_until_ready(direct)) == ["2", "D", "C", "Z"]  # neither Close ran
    with RelayedSession(pg) as session:
        session.send(parse("s", "SELECT 1") + SYNC)
        session.replies()
        session.send(parse("", "SELEC 1") + FLUSH)
        assert error_fields(session.replies(1)[0])["C"] == "42601"
        assert session.send(close(b"S", "s") + FLUSH) == FLUSH
        assert session.client.take() == b""
        session.send(SYNC)
        assert session.replies() == [("Z", b"I")]
        session.send(bind("s") + execute() + SYNC)
        assert kinds(session.replies()) == ["2", "D", "C", "Z"]


def test_postgresql_refuses_an_unknown_statement_name_with_26000(pg, direct):
    """test_unknown_statement_name_is_forwarded_for_postgresql_to_refuse, and the 26000 the relay
    takes for a statement dropped behind its back."""
    direct.sendall(bind("nope") + describe(b"S", "nope") + execute() + SYNC)
    server_error, ready = read_until_ready(direct)
    assert error_fields(server_error) == {"S": "ERROR", "V": "ERROR", "C": "26000",
                                          "M": 'prepared statement "nope" does not exist'}
    assert ready == ("Z", b"I")


@pytest.mark.parametrize("command", ["DEALLOCATE ALL", "DISCARD ALL"])
def test_postgresql_tags_the_commands_that_drop_every_statement(pg, command):
    """test_deallocate_all_from_the_client_forgets_its_statements: the relay knows them by tag."""
    with RelayedSession(pg) as session:
        session.send(parse("s", "SELECT 1") + SYNC)
        session.replies()
        session.send(simple_query(command) + parse("t", "SELECT 2") + SYNC)
        assert session.replies() == [("C", cstr(command)), ("Z", b"I"), ("1", b""), ("Z", b"I")]
        assert session.client.relay.statements.names() == [b"t"]
        session.send(simple_query("SELECT name FROM pg_prepared_statements"))
        rows = [body[6:] for kind, body in session.replies() if kind == "D"]
    assert rows == [server_name("SELECT 2")]


def test_postgresql_answers_function_calls_empty_queries_and_row_limits_as_the_stand_ins(pg, direct):
    """test_function_call_empty_query_and_portal_suspended: FunctionCall is answered by
    FunctionCallResponse and ReadyForQuery, an empty Query by EmptyQueryResponse and
    ReadyForQuery, an Execute with a row limit by PortalSuspended."""
    oid = struct.pack("!I", 1598)                      # random(): no arguments
    direct.sendall(message(b"F", oid + b"\0\0\0\0\0\1") + simple_query("")
                   + parse("", "SELECT * FROM generate_series(1, 2)") + bind("", portal="cur")
                   + execute("cur", 1) + execute("cur", 1) + SYNC)
    replies = read_until_ready(direct) + read_until_ready(direct) + read_until_ready(direct)
    assert kinds(replies) == ["V", "Z", "I", "Z", "1", "2", "D", "s", "D", "s", "Z"]
