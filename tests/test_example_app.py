"""The worked example (examples/plain_psycopg_app): its own suite, run directly and through the pooler.

Run as a user would, in a subprocess from the example's directory, with
DATABASE_URL pointing at the test cluster: directly, all 6 tests pass;
with ``--through-pool=transaction`` the two that keep session state across
transactions (a session-level setting, a temporary staging table) fail, and
the plugin's summary names each with PostgreSQL's error and the resets that
caused it, while their one-transaction twins pass.
"""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import PASSWORDS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "plain_psycopg_app")


def run_suite(pg, *args):
    env = dict(os.environ)
    for name in ("PGHOST", "PGPORT", "PGHOSTADDR", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSERVICE", "TPP_DSN",
                 "TPP_UPSTREAM_DSN", "PYTEST_ADDOPTS"):
        env.pop(name, None)
    env["DATABASE_URL"] = f"postgresql://app:{PASSWORDS['app']}@{pg.host}:{pg.port}/appdb"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfE", *args], cwd=EXAMPLE,
                          env=env, capture_output=True, text=True, timeout=240)


def test_the_example_suite_passes_directly(pg):
    result = run_suite(pg)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout.splitlines()[-1]
    assert "what pooling saw" not in result.stdout


def test_through_transaction_pooling_the_plugin_reports_the_setting_and_the_temp_table(pg):
    result = run_suite(pg, "-p", "threadpool_proxy.pytest_plugin", "--through-pool=transaction")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "2 failed, 4 passed" in out.splitlines()[-1]
    report = out.split("threadpool_proxy: what pooling saw", 1)[1].split("short test summary info", 1)[0]
    blocks = {}
    for line in report.splitlines():
        if line.startswith("tests/test_notes.py::"):
            name = line.split("::", 1)[1].split(":", 1)[0]
            blocks[name] = [line]
        elif line.startswith("    ") and blocks:
            blocks[name].append(line.strip())
    assert set(blocks) == {"test_session_tenant_setting", "test_import_through_a_temp_table"}, report
    setting, temp = blocks["test_session_tenant_setting"], blocks["test_import_through_a_temp_table"]
    assert setting[0].endswith(": FAILED") and temp[0].endswith(": FAILED")
    # The setting is gone in the next transaction.  On the server connection that had it (reused LIFO, as
    # here) the reset leaves the custom setting defined but empty: the query silently finds no rows.  On
    # one that never had it, PostgreSQL says it does not know the name.  Either way the report shows it.
    assert setting[1] in ("AssertionError: assert [] == ['mine']",
                          'psycopg.errors.UndefinedObject: unrecognized configuration parameter "notes.tenant"')
    assert temp[1] == 'psycopg.errors.UndefinedTable: relation "staging" does not exist'
    for block in (setting, temp):
        assert block[2].startswith("its server connection went back to the pool, reset, at the end of ")
        assert "session state (SET, temporary tables, LISTEN, advisory locks, SQL PREPARE)" in block[2]
    assert "6 tests, 2 failed (2 after a reset between transactions)" in report
    assert "the suite ran through transaction pooling (pool_size 2, in front of $DATABASE_URL)" in report
