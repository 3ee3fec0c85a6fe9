"""The ``pg`` fixture itself: a real cluster with the advertised roles and auth methods."""

import psycopg
import pytest

from helpers import psql, raw_login


def test_scram_required_and_wrong_password_rejected(pg):
    with psycopg.connect(pg.dsn()) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("app", "appdb")
        # The role's password really is stored as SCRAM, so the server demands SCRAM.
        with pg.superuser_conn() as su:
            stored = su.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'app'").fetchone()[0]
        assert stored.startswith("SCRAM-SHA-256$")
        pid = conn.info.backend_pid
        assert pid in pg.backend_pids(user="app", dbname="appdb")
        assert pid not in pg.backend_pids(user="other")

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(password="wrong"))
    # libpq exposes no SQLSTATE for login failures, so look at the wire.
    bad = raw_login(pg.host, pg.port, "app", "appdb", password="wrong")
    assert not bad.ok
    assert bad.auth_requests == [10, 11]        # SASL, SASLContinue, then the error
    assert bad.sqlstate == "28P01", bad.error
    good = raw_login(pg.host, pg.port, "app", "appdb", password="app-secret")
    assert good.ok and good.auth_requests == [10, 11, 12, 0]
    assert good.parameters["server_encoding"] == "UTF8"


def test_md5user_trustuser_and_psql(pg):
    with psycopg.connect(pg.dsn(user="md5user", dbname="postgres")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("md5user",)
    with pg.superuser_conn() as su:
        stored = su.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'md5user'").fetchone()[0]
    assert stored.startswith("md5")
    login = raw_login(pg.host, pg.port, "md5user", "postgres", password="md5-secret")
    assert login.ok and login.auth_requests == [5, 0]
    # trust: no password needed at all
    with psycopg.connect(pg.dsn(user="trustuser", dbname="postgres", password="")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert raw_login(pg.host, pg.port, "trustuser", "postgres").auth_requests == [0]

    result = psql(pg, sql="SELECT current_user || '@' || current_database()", user="other", dbname="otherdb")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "other@otherdb"
    bad = psql(pg, sql="SELECT 1", password="nope")
    assert bad.returncode != 0
    assert "password authentication failed" in bad.stderr
