"""The pytest plugin (threadpool_proxy/pytest_plugin.py), run as a user runs it: pytester, a real database.

A tiny app suite that uses SET and a temporary table passes directly, and
through ``--through-pool=transaction`` too (the SET follows the client, the
temporary table pins it, and the summary says so); a setting made inside a DO
block, which the proxy cannot see, is lost and the summary names that test,
with the resets that caused it; the DSN rewrite reaches psycopg and psycopg2 code that reads
DATABASE_URL or PG*; the fixtures give a proxy per test or per session in
each mode; cancels and refused statements are counted per test; without an
option and without its fixtures the plugin changes nothing.

The inner runs are subprocesses (``runpytest_subprocess``): the plugin changes
os.environ, which must not leak into this process.
"""

from __future__ import annotations

import os

import pytest

from helpers import PASSWORDS

pytest_plugins = ["pytester"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = ("-p", "threadpool_proxy.pytest_plugin")

#: The backend pid a transaction-mode client is told is proxy-made, above any real pid (docs/pool-modes.md).
PROXY_PID_FLOOR = 2 ** 22

APP_SUITE = '''
import os
import psycopg
import pytest


@pytest.fixture
def conn():
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as c:
        yield c


def test_plain_queries(conn):
    assert conn.execute("SELECT 40 + 2").fetchone() == (42,)


def test_session_set_is_kept(conn):
    conn.execute("SET statement_timeout = '1234ms'")
    assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)


def test_temp_table_is_kept(conn):
    conn.execute("CREATE TEMP TABLE scratch (x int)")
    conn.execute("INSERT INTO scratch VALUES (1)")
    assert conn.execute("SELECT count(*) FROM scratch").fetchone() == (1,)


def test_set_local_inside_one_transaction(conn):
    with conn.transaction():
        conn.execute("SET LOCAL statement_timeout = '1234ms'")
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
'''


@pytest.fixture
def app_env(pg, monkeypatch):
    """The environment an app's test suite runs with: DATABASE_URL of ``pg``, and the package importable."""
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{PASSWORDS['app']}@{pg.host}:{pg.port}/appdb")
    for name in ("PGHOST", "PGPORT", "PGHOSTADDR", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE", "TPP_DSN",
                 "TPP_UPSTREAM_DSN", "PGSERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    return pg


def summary(result) -> str:
    text = result.stdout.str()
    marker = "threadpool_proxy: what pooling saw"
    return text[text.index(marker):] if marker in text else ""


def test_the_app_suite_passes_directly_and_the_plugin_stays_out_of_the_way(app_env, pytester):
    pytester.makepyfile(test_app=APP_SUITE + '''

def test_the_environment_is_untouched():
    assert os.environ["DATABASE_URL"].endswith("/appdb") and "PGHOST" not in os.environ
    assert str(os.environ["DATABASE_URL"]).count(":") == 3 and "TPP_UPSTREAM_DSN" not in os.environ
''')
    result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    assert summary(result) == ""                  # no proxy started: no report


#: Session state the proxy cannot see (a setting made inside a DO block): lost through transaction pooling.
UNSEEN_STATE_TEST = '''

def test_setting_made_in_a_do_block_is_kept(conn):
    conn.execute("DO $$BEGIN PERFORM set_config('statement_timeout', '1234ms', false); END$$")
    assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
'''


def test_through_transaction_pooling_state_the_proxy_cannot_carry_fails_and_the_summary_says_why(app_env, pytester):
    """A session SET follows the client and a temporary table pins it (both pass, the pin is reported with
    its statement); a setting made inside a DO block, which the proxy cannot see, is lost at the reset
    between the test's transactions, and the summary names the test with its error and the resets."""
    pytester.makepyfile(test_app=APP_SUITE + UNSEEN_STATE_TEST)
    result = pytester.runpytest_subprocess(*PLUGIN, "--through-pool=transaction", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["FAILED test_app.py::test_setting_made_in_a_do_block_is_kept*"])
    text = summary(result)
    assert "the suite ran through transaction pooling (pool_size 2, in front of $DATABASE_URL)" in text
    assert "server connections released and reset at every transaction end" in text
    blocks = {}
    for line in text.splitlines():
        if line.startswith("test_app.py::"):
            current = blocks[line.split(":")[0] + "::" + line.split("::")[1].split(":")[0]] = [line]
        elif line.startswith("    ") and blocks:
            current.append(line)
    assert set(blocks) == {"test_app.py::test_setting_made_in_a_do_block_is_kept",
                           "test_app.py::test_temp_table_is_kept"}, text
    setting = "\n".join(blocks["test_app.py::test_setting_made_in_a_do_block_is_kept"])
    assert setting.startswith("test_app.py::test_setting_made_in_a_do_block_is_kept: FAILED")
    assert "AssertionError: assert ('0',) == ('1234ms',)" in setting
    assert "its server connection went back to the pool, reset, at the end of 2 of its transactions" in setting
    temp = blocks["test_app.py::test_temp_table_is_kept"]
    assert temp[0] == "test_app.py::test_temp_table_is_kept:"          # passed: listed for its pin
    assert temp[1:] == ["    clients pinned to their server connection: 1",
                        "        temp_table: CREATE TEMPORARY TABLE (CREATE TEMP TABLE scratch (x int))"], temp
    assert ("5 tests, 1 failed (1 after a reset between transactions); statements refused: 0, statements "
            "prepared again on another server connection: 0, cancel requests: 0, errors the proxy itself sent: 0, "
            "clients pinned to their server connection: 1") in text


def test_with_linger_the_same_suite_passes_and_the_summary_warns_it_may_break_under_load(app_env, pytester):
    pytester.makepyfile(test_app=APP_SUITE)
    result = pytester.runpytest_subprocess(*PLUGIN, "--through-pool=transaction", "--tpp-linger",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    text = summary(result)
    assert "(--tpp-linger): session state may survive here and break under load" in text
    # Nothing failed; the temporary table pinned its client, lingering or not, and that is all there is to report.
    lines = text.splitlines()
    first = lines.index("test_app.py::test_temp_table_is_kept:")
    assert lines[first + 1:first + 3] == ["    clients pinned to their server connection: 1",
                                          "        temp_table: CREATE TEMPORARY TABLE (CREATE TEMP TABLE scratch (x int))"]
    assert [line for line in lines if line.startswith("test_app.py::")] == ["test_app.py::test_temp_table_is_kept:"]
    assert "4 tests, 0 failed (0 after a reset between transactions)" in text


def test_the_rewrite_reaches_psycopg_and_psycopg2_through_database_url_and_pg_vars(app_env, pytester, monkeypatch):
    pg = app_env
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("PGHOST", pg.host)
    monkeypatch.setenv("PGPORT", str(pg.port))
    monkeypatch.setenv("PGUSER", "app")
    monkeypatch.setenv("PGPASSWORD", PASSWORDS["app"])
    monkeypatch.setenv("PGDATABASE", "appdb")
    monkeypatch.setenv("APP_DSN", f"host={pg.host} port={pg.port} dbname=appdb user=app")
    pytester.makepyfile(test_drivers=f'''
import os
import psycopg
import psycopg2

FLOOR = {PROXY_PID_FLOOR}


def told_and_real(pid_told, conn_execute):
    return pid_told, conn_execute("SELECT pg_backend_pid()")


def test_psycopg_with_libpq_defaults_from_pg_vars():
    with psycopg.connect("", autocommit=True) as conn:
        assert conn.info.port == int(os.environ["PGPORT"]) != {pg.port}
        assert conn.info.backend_pid > FLOOR > conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_psycopg2_with_libpq_defaults_from_pg_vars():
    conn = psycopg2.connect("")
    try:
        assert conn.get_dsn_parameters()["port"] == os.environ["PGPORT"]
        cur = conn.cursor()
        cur.execute("SELECT pg_backend_pid()")
        assert conn.get_backend_pid() > FLOOR > cur.fetchone()[0]
    finally:
        conn.close()


def test_psycopg2_with_a_dsn_from_another_variable():
    conn = psycopg2.connect(os.environ["APP_DSN"])
    try:
        cur = conn.cursor()
        cur.execute("SELECT current_database(), pg_backend_pid()")
        database, pid = cur.fetchone()
        assert database == "appdb" and conn.get_backend_pid() > FLOOR > pid
    finally:
        conn.close()
''')
    through = pytester.runpytest_subprocess(*PLUGIN, "--through-pool=transaction", "--tpp-env", "APP_DSN",
                                            "-p", "no:cacheprovider")
    through.assert_outcomes(passed=3)
    assert "in front of $PGHOST/$PGPORT" in summary(through)
    direct = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider")
    direct.assert_outcomes(failed=3)              # the same assertions fail without the pooler


def test_fixtures_give_a_proxy_per_test_or_per_session_in_each_mode(app_env, pytester):
    pytester.makeconftest('''
from threadpool_proxy.pytest_plugin import proxy_fixture

shared_dsn = proxy_fixture("transaction", scope="session", pool_size=1)
''')
    pytester.makepyfile(test_fixtures=f'''
import psycopg
import pytest

FLOOR = {PROXY_PID_FLOOR}
seen = {{}}


def backend(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.info.backend_pid, conn.execute("SELECT pg_backend_pid()").fetchone()[0], dsn.proxy.port


def test_transaction_mode(tpp_transaction_dsn):
    told, real, port = backend(tpp_transaction_dsn)
    assert told > FLOOR > real and tpp_transaction_dsn.proxy.config.pool_mode == "transaction"
    assert tpp_transaction_dsn.proxy.config.pool_size == 2
    seen.setdefault("function", []).append(port)


def test_transaction_mode_again(tpp_transaction_dsn):
    seen.setdefault("function", []).append(backend(tpp_transaction_dsn)[2])
    assert len(set(seen["function"])) == 2            # a proxy of its own per test


def test_session_mode_tells_the_real_pid(tpp_session_dsn):
    told, real, _ = backend(tpp_session_dsn)
    assert told == real


def test_statement_mode_refuses_a_transaction_block(tpp_statement_dsn):
    with psycopg.connect(tpp_statement_dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.OperationalError, match="transaction blocks not allowed"):
            conn.execute("BEGIN")


@pytest.mark.parametrize("n", [1, 2])
def test_the_session_scoped_proxy_is_shared(shared_dsn, n):
    seen.setdefault("session", []).append(backend(shared_dsn)[2])
    assert len(set(seen["session"])) == 1 and shared_dsn.proxy.config.pool_size == 1


def test_the_upstream_dsn(tpp_upstream_dsn):
    assert tpp_upstream_dsn.endswith("/appdb")
''')
    result = pytester.runpytest_subprocess(*PLUGIN, "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7)
    text = summary(result)
    assert "proxies started by fixtures: session, statement, transaction pooling" in text
    assert "test_fixtures.py::test_statement_mode_refuses_a_transaction_block:" in text
    block = text.split("test_statement_mode_refuses_a_transaction_block:")[1]
    assert "statements refused: 1" in block and "08P01 transaction blocks not allowed" in block
    assert "errors the proxy itself sent: 1" in block


def test_a_cancel_is_counted_for_the_test_that_sent_it(app_env, pytester):
    pytester.makepyfile(test_cancel='''
import os
import threading
import psycopg
import pytest


def test_a_long_query_is_canceled():
    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        errors = []

        def run():
            try:
                conn.execute("SELECT pg_sleep(30)")
            except psycopg.errors.QueryCanceled as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        import time
        deadline = time.monotonic() + 10
        while conn.pgconn.transaction_status == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        conn.cancel_safe(timeout=10)        # (cancel() holds the GIL: the in-process proxy could not answer)
        t.join(20)
        assert errors


def test_quiet():
    pass
''')
    result = pytester.runpytest_subprocess(*PLUGIN, "--through-pool=transaction", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    text = summary(result)
    block = text.split("test_cancel.py::test_a_long_query_is_canceled:")[1].split("test_cancel.py")[0]
    assert "cancel requests: 1" in block and "forwarded" in block
    assert "test_cancel.py::test_quiet" not in text


THREE_AT_ONCE = '''
import os
import psycopg


def test_three_transactions_at_once():
    conns = []
    try:
        for _ in range(3):
            conn = psycopg.connect(os.environ["DATABASE_URL"])
            conn.execute("SELECT 1")          # (not autocommit: each stays in its transaction)
            conns.append(conn)
    finally:
        for conn in conns:
            conn.close()
'''


def test_a_test_needing_more_connections_than_pool_size_fails_fast_and_says_so(app_env, pytester):
    pytester.makepyfile(test_three=THREE_AT_ONCE)
    result = pytester.runpytest_subprocess(*PLUGIN, "--through-pool=transaction", "-o", "tpp_wait_timeout=1",
                                           "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    text = summary(result)
    block = text.split("test_three.py::test_three_transactions_at_once: FAILED")[1]
    assert "errors the proxy itself sent: 1" in block
    assert '53300 query_wait_timeout: no server connection slot for user "app"' in block
    assert "(pool_size 2" in text


def test_no_database_to_front_is_a_usage_error_naming_the_options(app_env, pytester, monkeypatch):
    monkeypatch.delenv("DATABASE_URL")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(*PLUGIN, "--through-pool=transaction", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*no database to put the proxy in front of: give --tpp-dsn*"])


def test_a_unix_socket_database_url_is_refused_with_the_reason(app_env, pytester, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2secret@/appdb?host=/var/run/postgresql")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(*PLUGIN, "--through-pool=transaction", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*names no TCP server: the proxy reaches PostgreSQL over TCP*"])
    assert "hunter2secret" not in result.stderr.str() + result.stdout.str()


def test_pg_vars_naming_another_server_are_left_alone_and_the_report_says_so(app_env, pytester, monkeypatch):
    pg = app_env
    monkeypatch.setenv("PGHOST", "reports.invalid")
    monkeypatch.setenv("PGPORT", "5999")
    pytester.makepyfile(test_env=f'''
import os


def test_only_database_url_moved():
    assert os.environ["PGHOST"] == "reports.invalid" and os.environ["PGPORT"] == "5999"
    url = os.environ["DATABASE_URL"]
    assert url.startswith("postgresql://app:") and url.endswith("/appdb") and ":{pg.port}/" not in url
''')
    result = pytester.runpytest_subprocess(*PLUGIN, "--through-pool=transaction", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert ("$PGHOST/$PGPORT name another server (reports.invalid:5999): left alone, so code that reads them "
            "does not go through the proxy") in summary(result)
