"""The notes app's own fixtures: a connection to the database in DATABASE_URL, a tenant of its own per test.

Nothing here knows about threadpool_proxy: run the suite through the pooler
with ``pytest -p threadpool_proxy.pytest_plugin --through-pool=transaction``.
"""

import os
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import notes  # noqa: E402


@pytest.fixture(scope="session")
def database_url():
    url = os.environ.get("DATABASE_URL")
    if not url:
        pytest.skip("set DATABASE_URL to a database the tests may write to")
    with notes.connect(url) as conn:
        notes.create_schema(conn)
    return url


@pytest.fixture
def conn(database_url):
    with notes.connect(database_url) as conn:
        yield conn


@pytest.fixture
def tenant(conn):
    name = f"tenant-{uuid.uuid4().hex[:8]}"
    yield name
    conn.execute("DELETE FROM notes WHERE tenant = %s", [name])
