"""The worked example (examples/plain_psycopg_app): its own suite, run directly and through the pooler.

Run as a user would, in a subprocess from the example's directory, with
DATABASE_URL pointing at the test cluster: directly, all 6 tests pass;
with ``--through-pool=transaction`` too: of the two that keep session state
across transactions, the session-level setting follows the client to its
next server connection and the temporary staging table pins the client to
its own, which the plugin's summary reports with the statement that pinned.
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


def test_through_transaction_pooling_the_setting_follows_and_the_temp_table_pins(pg):
    result = run_suite(pg, "-p", "threadpool_proxy.pytest_plugin", "--through-pool=transaction")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "6 passed" in out.splitlines()[-1]
    report = out.split("threadpool_proxy: what pooling saw", 1)[1]
    blocks = {}
    for line in report.splitlines():
        if line.startswith("tests/test_notes.py::"):
            name = line.split("::", 1)[1].split(":", 1)[0]
            blocks[name] = [line]
        elif line.startswith("    ") and blocks:
            blocks[name].append(line.strip())
    # The session setting followed the client to its next server connection (nothing to report); the
    # temporary table pinned it, and the report names the statement that did.
    assert set(blocks) == {"test_import_through_a_temp_table"}, report
    assert blocks["test_import_through_a_temp_table"] == [
        "tests/test_notes.py::test_import_through_a_temp_table:",
        "clients pinned to their server connection: 1",
        "temp_table: CREATE TEMPORARY TABLE (CREATE TEMP TABLE IF NOT EXISTS staging (body text))"], report
    assert "6 tests, 0 failed (0 after a reset between transactions)" in report
    assert "clients pinned to their server connection: 1\n" in report
    assert "the suite ran through transaction pooling (pool_size 2, in front of $DATABASE_URL)" in report
