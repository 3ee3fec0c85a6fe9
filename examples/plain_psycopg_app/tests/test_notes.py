"""The notes app's tests: each passes on a direct connection."""

import notes


def test_add_and_list(conn, tenant):
    notes.add_note(conn, tenant, "first")
    notes.add_note(conn, tenant, "second")
    assert notes.notes_for(conn, tenant) == ["first", "second"]


def test_prepared_statements_are_reused(conn, tenant):
    notes.add_note(conn, tenant, "only")
    for _ in range(8):
        assert notes.notes_for(conn, tenant) == ["only"]


def test_session_tenant_setting(conn, tenant):
    notes.add_note(conn, tenant, "mine")
    notes.use_tenant(conn, tenant)
    assert notes.my_notes(conn) == ["mine"]


def test_tenant_setting_inside_one_transaction(conn, tenant):
    notes.add_note(conn, tenant, "mine")
    assert notes.notes_of(conn, tenant) == ["mine"]


def test_import_through_a_temp_table(conn, tenant):
    assert notes.import_notes(conn, tenant, ["a", "b", "c"]) == 3
    assert notes.notes_for(conn, tenant) == ["a", "b", "c"]


def test_import_in_one_transaction(conn, tenant):
    assert notes.import_notes_atomically(conn, tenant, ["a", "b"]) == 2
    assert notes.notes_for(conn, tenant) == ["a", "b"]
