"""PgBouncer's userlist.txt as an auth file: its format, the 0600 rule, reload, and logins on the wire.

The file is written here by hand in PgBouncer's documented syntax
(``"user" "secret"``, doubled quotes, ``;`` comments), not by the code under test.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from helpers import PASSWORDS, connect, psql, raw_login
from threadpool_proxy import ConfigError
from threadpool_proxy.authfile import AuthFile, AuthFileError, is_userlist, parse_userlist_text


def write(path, text: str, mode: int = 0o600) -> str:
    path = str(path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def md5_of(password: str, user: str) -> str:
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


SCRAM = ("SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$"
         "q7Y5rV6nFr4Wbyyd3sGbkB8RJxIEhThxfcn5wM9nM+s=:XgV3+Xv0xVbLVy0QSqWdyfqxzbt8PwlHiV/pIG1r1sk=")


# -- the format --------------------------------------------------------------------

def test_userlist_reads_plain_md5_and_scram_secrets_quotes_and_comments():
    text = (
        '; made by mkauth.py\n'
        '# a comment in the other style\n'
        '\n'
        '"alice" "plain secret" the rest of the line is ignored\n'
        f'"bob"   "{md5_of("pw", "bob").upper().replace("MD5", "md5")}"\n'
        f'"carol" "{SCRAM}"\n'
        '"say ""hi""" "pa""ss"\n'
        '   "indented" "x"\n'
    )
    users = parse_userlist_text(text)
    assert sorted(users) == ["alice", "bob", "carol", "indented", 'say "hi"']
    assert users["alice"].kind == "password" and users["alice"].password == "plain secret"
    assert users["bob"].kind == "md5" and users["bob"].md5 == md5_of("pw", "bob")
    assert users["carol"].kind == "scram" and users["carol"].iterations == 4096
    assert users['say "hi"'].password == 'pa"ss'
    assert users["indented"].password == "x"


def test_userlist_last_line_of_a_user_wins_and_an_empty_secret_leaves_the_user_out():
    users = parse_userlist_text('"a" "one"\n"a" "two"\n"b" "x"\n"b" ""\n')
    assert users["a"].password == "two"
    assert "b" not in users


@pytest.mark.parametrize("line, expected", [
    ("alice secret", r"line 2: expected \"user\" \"secret\""),
    ('"alice secret', r"line 2: the user name's closing double quote is missing"),
    ('"alice" secret', r"line 2: user 'alice': expected its secret in double quotes"),
    ('"alice" "secret', r"line 2: user 'alice': the secret's closing double quote is missing"),
    ('"alice" "SCRAM-SHA-256$4096:c2FsdA==$abc:def"', r"line 2: user 'alice': SCRAM secret: StoredKey"),
    ('"" "x"', r"line 2: empty user name"),
])
def test_userlist_bad_line_names_the_file_line_and_user_never_the_secret(tmp_path, line, expected):
    path = write(tmp_path / "userlist.txt", f'"ok" "fine"\n{line}\n')
    with pytest.raises(AuthFileError, match=expected) as exc_info:
        AuthFile(path)
    assert str(exc_info.value).startswith(path)
    assert "fine" not in str(exc_info.value)


def test_userlist_is_told_by_content_or_txt_name():
    assert is_userlist('"a" "b"\n')
    assert is_userlist('; comment\n\n"a" "b"\n')
    assert is_userlist("", "/etc/pgbouncer/userlist.txt")
    assert not is_userlist("users:\n  a: {password: b}\n", "users.yaml")


def test_userlist_readable_by_group_or_others_is_refused(tmp_path):
    path = write(tmp_path / "userlist.txt", '"a" "b"\n', mode=0o640)
    with pytest.raises(AuthFileError, match=r"mode 0640 allows access by group or others; run 'chmod 600"):
        AuthFile(path)


def test_userlist_reload_picks_up_changes_and_keeps_old_contents_on_error(tmp_path):
    path = write(tmp_path / "userlist.txt", '"a" "one"\n')
    auth = AuthFile(path)
    write(path, '"a" "one"\n"b" "two"\n')
    assert auth.reload() == 2
    assert auth.lookup("b").password == "two"
    write(path, '"a" "one"\n"broken\n')
    with pytest.raises(AuthFileError, match="line 2"):
        auth.reload()
    assert auth.lookup("b").password == "two"


# -- on the wire -------------------------------------------------------------------

@pytest.fixture
def userlist(tmp_path, rolpasswords):
    """app with the server's SCRAM verifier, md5user with its md5 hash, other with its plain password."""
    return write(tmp_path / "userlist.txt",
                 ";; PgBouncer's format\n"
                 f'"app" "{rolpasswords["app"]}"\n'
                 f'"md5user" "{rolpasswords["md5user"]}"\n'
                 f'"other" "{PASSWORDS["other"]}"\n')


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256"])
def test_userlist_logs_in_scram_md5_and_plain_users(pg, proxy_factory, userlist, auth_type):
    proxy = proxy_factory(auth_type=auth_type, auth_file=userlist)
    for user, dbname in (("app", "appdb"), ("other", "otherdb")):
        with connect(pg, proxy, user=user, dbname=dbname) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == user
    result = psql(proxy, user="md5user", dbname="postgres", sql="SELECT current_user")
    if auth_type == "md5":
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "md5user"
    else:       # no SCRAM from an md5 hash, as in PostgreSQL
        assert result.returncode != 0
        assert 'password authentication failed for user "md5user"' in result.stderr
    bad = raw_login(proxy.host, proxy.port, "app", "appdb", password="wrong")
    assert bad.sqlstate == "28P01"


def test_userlist_readable_by_others_stops_start_up(proxy_factory, userlist):
    os.chmod(userlist, 0o644)
    with pytest.raises(ConfigError, match="auth_file: .*mode 0644"):
        proxy_factory(auth_type="md5", auth_file=userlist)


def test_userlist_reload_lets_a_new_user_in(pg, proxy_factory, userlist, rolpasswords):
    proxy = proxy_factory(auth_type="md5", auth_file=userlist)
    assert raw_login(proxy.host, proxy.port, "postgres", "postgres", password=PASSWORDS["postgres"]).sqlstate == "28P01"
    with open(userlist, "a", encoding="utf-8") as f:
        f.write(f'"postgres" "{rolpasswords["postgres"]}"\n')
    proxy.reload()
    result = raw_login(proxy.host, proxy.port, "postgres", "postgres", password=PASSWORDS["postgres"])
    assert result.ok, result.error


def test_password_auth_type_checks_clear_text_against_every_kind_of_secret(pg, proxy_factory, userlist):
    """auth_type password (PgBouncer's plain): the client sends its password; a SCRAM verifier, an md5 hash and
    a plain password all check it, and the proxy logs in to the server with it."""
    proxy = proxy_factory(auth_type="password", auth_file=userlist)
    for user, dbname in (("app", "appdb"), ("md5user", "postgres"), ("other", "otherdb")):
        result = raw_login(proxy.host, proxy.port, user, dbname, password=PASSWORDS[user])
        assert result.ok and result.auth_requests == [3, 0], (user, result.error)
        wrong = raw_login(proxy.host, proxy.port, user, dbname, password=PASSWORDS[user] + "x")
        assert wrong.sqlstate == "28P01"
        assert wrong.error["M"] == f'password authentication failed for user "{user}"'
    unknown = raw_login(proxy.host, proxy.port, "nobody", "appdb", password="x")
    assert unknown.sqlstate == "28P01" and unknown.auth_requests == [3]
    with connect(pg, proxy, user="md5user", dbname="postgres") as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "md5user"
