"""notes: a small multi-tenant notes store on plain psycopg 3.

The worked example of docs/testing-through-pooling.md.  Two of its functions
keep session state across transactions, which works on a direct connection,
and through threadpool_proxy (the setting follows the client, the temporary
table pins it), but breaks behind a pooler that does neither; each has a twin
that keeps that state inside one transaction:

* ``use_tenant`` + ``my_notes``: a session-level setting (``set_config(...,
  false)``, like ``SET``), read by later queries.  Fixed: ``notes_of``, which
  sets it with ``is_local`` inside the transaction that reads it (``SET LOCAL``).
* ``import_notes``: a temporary staging table filled by COPY, then moved into
  ``notes``, in separate transactions.  Fixed: ``import_notes_atomically``,
  one transaction and ``ON COMMIT DROP``.

``notes_for`` uses server-side prepared statements, which transaction pooling
keeps working (the proxy prepares them again where a server connection lacks
them).
"""

from __future__ import annotations

import os

import psycopg

SCHEMA = """
CREATE TABLE IF NOT EXISTS notes (
    id     bigserial PRIMARY KEY,
    tenant text NOT NULL,
    body   text NOT NULL
)
"""


def connect(dsn: str | None = None) -> psycopg.Connection:
    """An autocommit connection to DATABASE_URL (or libpq's PG* defaults when it is unset)."""
    return psycopg.connect(dsn if dsn is not None else os.environ.get("DATABASE_URL", ""), autocommit=True)


def create_schema(conn: psycopg.Connection) -> None:
    conn.execute(SCHEMA)


def add_note(conn: psycopg.Connection, tenant: str, body: str) -> int:
    return conn.execute("INSERT INTO notes (tenant, body) VALUES (%s, %s) RETURNING id", [tenant, body]).fetchone()[0]


def notes_for(conn: psycopg.Connection, tenant: str) -> list[str]:
    """A tenant's notes, with a server-side prepared statement (as psycopg does by itself after 5 runs)."""
    rows = conn.execute("SELECT body FROM notes WHERE tenant = %s ORDER BY id", [tenant], prepare=True)
    return [body for (body,) in rows]


# -- session state: works directly, breaks behind a pooler that neither carries nor pins it

def use_tenant(conn: psycopg.Connection, tenant: str) -> None:
    """Remember the tenant for this session (a session-level setting, like SET)."""
    conn.execute("SELECT set_config('notes.tenant', %s, false)", [tenant])


def my_notes(conn: psycopg.Connection) -> list[str]:
    """The notes of the tenant ``use_tenant`` chose, in a later transaction."""
    rows = conn.execute("SELECT body FROM notes WHERE tenant = current_setting('notes.tenant') ORDER BY id")
    return [body for (body,) in rows]


def import_notes(conn: psycopg.Connection, tenant: str, bodies: list[str]) -> int:
    """Bulk import through a temporary staging table, step by step (each step its own transaction)."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS staging (body text)")
    with conn.cursor().copy("COPY staging (body) FROM STDIN") as copy:
        for body in bodies:
            copy.write_row([body])
    moved = conn.execute("INSERT INTO notes (tenant, body) SELECT %s, body FROM staging", [tenant]).rowcount
    conn.execute("DROP TABLE staging")
    return moved


# -- the same, fixed: the state lives inside one transaction ------------------------

def notes_of(conn: psycopg.Connection, tenant: str) -> list[str]:
    """``use_tenant`` + ``my_notes`` in one transaction: the setting is local to it (SET LOCAL)."""
    with conn.transaction():
        conn.execute("SELECT set_config('notes.tenant', %s, true)", [tenant])
        rows = conn.execute("SELECT body FROM notes WHERE tenant = current_setting('notes.tenant') ORDER BY id")
        return [body for (body,) in rows]


def import_notes_atomically(conn: psycopg.Connection, tenant: str, bodies: list[str]) -> int:
    """``import_notes`` in one transaction, the staging table dropped at its commit."""
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE staging (body text) ON COMMIT DROP")
        with conn.cursor().copy("COPY staging (body) FROM STDIN") as copy:
            for body in bodies:
                copy.write_row([body])
        return conn.execute("INSERT INTO notes (tenant, body) SELECT %s, body FROM staging", [tenant]).rowcount
