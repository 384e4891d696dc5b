"""
Tests for L{smtpgw.admin_cli}: the C{smtpgw-admin} list and user commands,
run in-process through C{main()} and, for the installed console script, as
a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from smtpgw.admin_cli import (
    COMMAND_GROUPS,
    DEFAULT_DATA_DIR,
    ROUNDS_ENVIRONMENT_VARIABLE,
    _rounds_from_environment,
    main,
)
from smtpgw.admins import MAX_ADMIN_NAME_LENGTH, SQLiteAdminStore, ThreadedAdminStore
from smtpgw.database import database_path
from smtpgw.passwords import DEFAULT_ROUNDS, verify_password
from smtpgw.userstore import SQLiteUserStore, ThreadedUserStore
from tests.twisted_support import async_test

T0 = 1_700_000_000.0
P = ParamSpec("P")
USER_FIELDS = {
    "username",
    "list",
    "active",
    "priority",
    "notes",
    "authorized_domains",
    "authorized_senders",
    "enforcement",
    "created_at",
    "last_used_at",
    "last_used_ip",
}


class Admin:
    """
    Runs C{smtpgw-admin} in-process on one data directory.
    """

    def __init__(self, data_dir: Path, capsys: pytest.CaptureFixture[str], clock: Clock) -> None:
        self.data_dir = data_dir
        self.capsys = capsys
        self.clock = clock

    def __call__(self, *args: str) -> tuple[int, str, str]:
        """
        @return: exit status, standard output, standard error.
        """
        self.capsys.readouterr()
        status = main(["--data-dir", str(self.data_dir), *args], clock=self.clock)
        out, err = self.capsys.readouterr()
        assert "$2b$" not in out + err, "a password hash was printed"
        if status:
            assert out == ""
            assert err.startswith("smtpgw-admin: error: ")
            assert err.count("\n") == 1, "the error is not one line"
        else:
            assert err == ""
        return status, out, err

    def json(self, *args: str) -> Any:
        status, out, err = self(*args, "--json")
        assert status == 0, err
        return json.loads(out)

    def store(self) -> SQLiteUserStore:
        return SQLiteUserStore.open(database_path(self.data_dir), self.clock, create=False)


@pytest.fixture(autouse=True)
def cheap_bcrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ROUNDS_ENVIRONMENT_VARIABLE, "4")


@pytest.fixture
def admin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Admin:
    clock = Clock()
    clock.advance(T0)
    return Admin(tmp_path / "data", capsys, clock)


@pytest.fixture
def news(admin: Admin) -> Admin:
    """
    A data directory with the list C{news}.
    """
    assert admin("list", "add", "news")[0] == 0
    return admin


def _user(admin: Admin, *options: str) -> dict[str, Any]:
    document: dict[str, Any] = admin.json("user", "add", "--list", "news", *options)
    return document


# --- lists ------------------------------------------------------------------


def test_list_add_creates_a_private_data_directory(admin: Admin) -> None:
    """
    The first C{list add} creates the data directory (mode 0700) and the
    database in it.
    """
    status, out, _ = admin("list", "add", "news")
    assert status == 0
    assert out == "created list news\n"
    assert oct(admin.data_dir.stat().st_mode & 0o777) == "0o700"
    assert database_path(admin.data_dir).exists()


def test_list_show(news: Admin) -> None:
    """
    Lists with their number of users, as text and as JSON.
    """
    news("list", "add", "alpha")
    _user(news)
    status, out, _ = news("list", "show")
    assert status == 0
    assert out.splitlines() == [
        "NAME   USERS  CREATED",
        "alpha  0      2023-11-14T22:13:20Z",
        "news   1      2023-11-14T22:13:20Z",
    ]
    assert news.json("list", "show") == {
        "lists": [
            {"name": "alpha", "created_at": "2023-11-14T22:13:20Z", "users": 0},
            {"name": "news", "created_at": "2023-11-14T22:13:20Z", "users": 1},
        ]
    }


def test_json_option_before_and_at_the_end(news: Admin) -> None:
    """
    C{--json} right after C{--data-dir DIR} and at the end of the line give
    the same single JSON document.
    """
    early = news("--json", "list", "show")
    late = news("list", "show", "--json")
    assert early[0] == late[0] == 0
    expected = {"lists": [{"name": "news", "created_at": "2023-11-14T22:13:20Z", "users": 0}]}
    assert json.loads(early[1]) == json.loads(late[1]) == expected


def test_list_add_json(admin: Admin) -> None:
    """
    C{list add --json} answers with the new list.
    """
    assert admin.json("list", "add", "news") == {
        "name": "news",
        "created_at": "2023-11-14T22:13:20Z",
        "users": 0,
    }


def test_duplicate_list_fails_on_one_line(news: Admin) -> None:
    """
    Adding an existing list exits 1 with a one-line reason.
    """
    status, _, err = news("list", "add", "news")
    assert status == 1
    assert err == "smtpgw-admin: error: list 'news' already exists\n"


def test_bad_list_name_changes_nothing(admin: Admin) -> None:
    """
    A bad name exits 2, naming it, and does not even create the data
    directory.
    """
    status, _, err = admin("list", "add", "Bad/Name")
    assert status == 2
    assert "NAME: 'Bad/Name' is not a valid list name" in err
    assert not admin.data_dir.exists()


def test_reading_a_missing_database_fails_and_creates_nothing(admin: Admin) -> None:
    """
    A read on a data directory without a database (a mistyped
    C{--data-dir}) is an error, not a new empty database.
    """
    status, _, err = admin("list", "show")
    assert status == 1
    assert "no database at" in err
    assert not admin.data_dir.exists()


def test_corrupt_database_is_reported(admin: Admin) -> None:
    """
    A damaged database gives a one-line error naming it.
    """
    admin.data_dir.mkdir()
    database_path(admin.data_dir).write_bytes(b"\x00garbage" * 512)
    status, _, err = admin("list", "show")
    assert status == 1
    assert "not a usable smtpgw database" in err


# --- users ------------------------------------------------------------------


def test_user_add_prints_the_password_once(news: Admin) -> None:
    """
    C{user add} prints the generated username and password, which is the
    one stored (as a hash); later commands never show it again.
    """
    status, out, _ = news("user", "add", "--list", "news")
    assert status == 0
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    username, password = lines["username"], lines["password"]
    assert "shown only this once" in out
    with news.store() as store:
        user = store.get_user(username)
    assert user is not None
    assert user.password_hash.startswith(b"$2b$04$")
    assert verify_password(password, user.password_hash)
    for args in (["user", "show", username], ["user", "list"], ["list", "show"]):
        for extra in ([], ["--json"]):
            status, later, _ = news(*args, *extra)
            assert status == 0
            assert password not in later
            assert "password" not in later


def test_user_add_json_has_product_fields(news: Admin) -> None:
    """
    The JSON of a new user has the section 1 fields plus the password, the
    authorized lists as arrays, and no hash.
    """
    document = _user(
        news,
        "--priority",
        "2",
        "--domains",
        "Example.com;mail.example.com",
        "--senders",
        "app@example.com;x@other.example",
        "--notes",
        "the CRM",
        "--inactive",
        "--monitor",
    )
    assert set(document) == USER_FIELDS | {"password"}
    assert document["username"].startswith("smtp-news-")
    assert document["list"] == "news"
    assert document["active"] is False
    assert document["priority"] == 2
    assert document["notes"] == "the CRM"
    assert document["authorized_domains"] == ["example.com", "mail.example.com"]
    assert document["authorized_senders"] == ["app@example.com", "x@other.example"]
    assert document["enforcement"] == "monitor"
    assert document["created_at"] == "2023-11-14T22:13:20Z"
    assert document["last_used_at"] is None
    assert document["last_used_ip"] is None


def test_user_add_defaults(news: Admin) -> None:
    """
    Without options: active, priority 3, enforce, nothing authorized (the
    text output says so).
    """
    status, out, _ = news("user", "add", "--list", "news")
    assert status == 0
    assert "active: yes" in out
    assert "priority: 3" in out
    assert "enforcement: enforce" in out
    assert "no sender is authorized" in out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--domains", "a.com;;b.com"], "--domains: entry 2 is empty"),
        (["--domains", "exa mple.com"], "--domains: 'exa mple.com'"),
        (["--senders", "nobody"], "--senders: 'nobody' is not an address"),
        (["--priority", "0"], "--priority: '0' is not a priority"),
        (["--priority", "6"], "--priority: '6' is not a priority"),
        (["--notes", "n" * 2001], "--notes: 2001 characters"),
    ],
)
def test_user_add_bad_input_changes_nothing(news: Admin, options: list[str], message: str) -> None:
    """
    Bad values exit 2 with the option and the bad entry named; no user is
    created.
    """
    status, _, err = news("user", "add", "--list", "news", *options)
    assert status == 2
    assert message in err
    assert news.json("user", "list") == {"users": []}


def test_user_add_to_missing_list(news: Admin) -> None:
    """
    A user of a list that does not exist is refused.
    """
    status, _, err = news("user", "add", "--list", "nope")
    assert status == 1
    assert "no list named 'nope'" in err


def test_user_add_needs_a_list(news: Admin) -> None:
    """
    C{--list} is required.
    """
    status, _, err = news("user", "add")
    assert status == 2
    assert "--list" in err


def test_user_list_and_show(news: Admin) -> None:
    """
    Users of all lists or one list; one user in full; unknown ones fail.
    """
    news("list", "add", "shop")
    first = _user(news)
    other = admin_user_of(news, "shop")
    everyone = news.json("user", "list")["users"]
    assert [u["username"] for u in everyone] == [first["username"], other["username"]]
    assert all(set(u) == USER_FIELDS for u in everyone)
    only_shop = news.json("user", "list", "--list", "shop")["users"]
    assert [u["username"] for u in only_shop] == [other["username"]]
    shown = news.json("user", "show", first["username"])
    assert set(shown) == USER_FIELDS
    assert shown == {k: v for k, v in first.items() if k != "password"}
    status, out, _ = news("user", "list")
    assert out.splitlines()[0].split() == [
        "USERNAME",
        "LIST",
        "ACTIVE",
        "PRIORITY",
        "ENFORCEMENT",
        "LAST",
        "USED",
    ]
    assert news("user", "list", "--list", "nope")[0] == 1
    status, _, err = news("user", "show", "smtp-news-nobody00")
    assert status == 1
    assert "no SMTP+ user named 'smtp-news-nobody00'" in err


def admin_user_of(admin: Admin, list_name: str) -> dict[str, Any]:
    document: dict[str, Any] = admin.json("user", "add", "--list", list_name)
    return document


def test_user_set_changes_the_given_fields(news: Admin) -> None:
    """
    C{user set} changes only what is given, including clearing with an
    empty value, toggling active and enforcement, and moving lists.
    """
    news("list", "add", "shop")
    username = _user(news, "--domains", "a.example", "--notes", "keep")["username"]
    changed = news.json(
        "user", "set", username, "--priority", "1", "--senders", "x@b.example", "--inactive"
    )
    assert changed["priority"] == 1
    assert changed["authorized_senders"] == ["x@b.example"]
    assert changed["active"] is False
    assert changed["authorized_domains"] == ["a.example"]
    assert changed["notes"] == "keep"
    changed = news.json("user", "set", username, "--active", "--monitor", "--domains", "")
    assert changed["active"] is True
    assert changed["enforcement"] == "monitor"
    assert changed["authorized_domains"] == []
    assert news.json("user", "set", username, "--enforce")["enforcement"] == "enforce"
    moved = news.json("user", "set", username, "--list", "shop")
    assert moved["list"] == "shop"
    assert moved["username"] == username


def test_user_set_refusals(news: Admin) -> None:
    """
    Nothing to change, contradictory options, bad values and unknown users
    are refused, and change nothing.
    """
    before = _user(news)
    username = before["username"]
    del before["password"]
    cases: list[tuple[list[str], int, str]] = [
        ([], 2, "nothing to change"),
        (["--active", "--inactive"], 2, "not allowed with"),
        (["--enforce", "--monitor"], 2, "not allowed with"),
        (["--priority", "9", "--notes", "x"], 2, "--priority"),
        (["--list", "nope"], 1, "no list named 'nope'"),
    ]
    for options, expected_status, message in cases:
        status, _, err = news("user", "set", username, *options)
        assert (status, message in err) == (expected_status, True), (options, err)
    assert news.json("user", "show", username) == before
    status, _, err = news("user", "set", "smtp-news-nobody00", "--priority", "2")
    assert status == 1
    assert "no SMTP+ user" in err


def test_regenerate_password(news: Admin) -> None:
    """
    The new password is printed once and works; the old one no longer does.
    """
    created = _user(news)
    regenerated = news.json("user", "regenerate-password", created["username"])
    assert set(regenerated) == {"username", "password"}
    assert regenerated["password"] != created["password"]
    with news.store() as store:
        user = store.get_user(created["username"])
    assert user is not None
    assert verify_password(regenerated["password"], user.password_hash)
    assert not verify_password(created["password"], user.password_hash)
    status, out, _ = news("user", "regenerate-password", created["username"])
    assert status == 0
    assert "password: " in out
    assert news("user", "regenerate-password", "smtp-news-nobody00")[0] == 1


def test_user_delete(news: Admin) -> None:
    """
    A deleted user is gone; deleting it again fails.
    """
    username = _user(news)["username"]
    assert news.json("user", "delete", username) == {"username": username, "deleted": True}
    assert news("user", "show", username)[0] == 1
    status, _, err = news("user", "delete", username)
    assert status == 1
    assert "no SMTP+ user" in err


# --- admins -----------------------------------------------------------------

ADMIN_FIELDS = {"name", "created_at", "last_login_at"}
TOKEN_FIELDS = {"id", "name", "created_by", "created_at", "last_used_at"}


def _admin_store(admin: Admin) -> SQLiteAdminStore:
    return SQLiteAdminStore.open(
        database_path(admin.data_dir), admin.clock, rounds=4, create=False
    )


def _fields(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines())


def test_admin_add_prints_the_password_once(admin: Admin) -> None:
    """
    C{admin add} creates the data directory (mode 0700) when missing and
    prints the name and the generated password, which logs in; no later
    command shows it.
    """
    status, out, _ = admin("admin", "add", "alice")
    assert status == 0
    lines = _fields(out)
    assert lines["name"] == "alice"
    password = lines["password"]
    assert "shown only this once" in out
    assert oct(admin.data_dir.stat().st_mode & 0o777) == "0o700"
    with _admin_store(admin) as store:
        assert store.check_admin("alice", password)
    for args in (["admin", "list"], ["token", "list"]):
        for extra in ([], ["--json"]):
            status, later, _ = admin(*args, *extra)
            assert status == 0
            assert password not in later
            assert "password" not in later


def test_admin_add_json(admin: Admin) -> None:
    """
    C{admin add --json} answers the admin's fields and its C{password}.
    """
    document = admin.json("admin", "add", "alice")
    assert set(document) == ADMIN_FIELDS | {"password"}
    assert document["name"] == "alice"
    assert document["created_at"] == "2023-11-14T22:13:20Z"
    assert document["last_login_at"] is None
    with _admin_store(admin) as store:
        assert store.check_admin("alice", document["password"])


def test_admin_name_at_the_length_limit_and_one_past(admin: Admin) -> None:
    """
    A 64-character name is taken; a 65-character one exits 2 naming NAME,
    and does not even create the data directory.
    """
    status, _, err = admin("admin", "add", "a" * (MAX_ADMIN_NAME_LENGTH + 1))
    assert status == 2
    assert "NAME: " in err
    assert "not a valid admin name" in err
    assert not admin.data_dir.exists()
    assert admin("admin", "add", "a" * MAX_ADMIN_NAME_LENGTH)[0] == 0


def test_admin_add_refusals_change_nothing(admin: Admin) -> None:
    """
    An existing name exits 1 and keeps the first password; a bad name
    exits 2.
    """
    password = admin.json("admin", "add", "alice")["password"]
    status, _, err = admin("admin", "add", "alice")
    assert status == 1
    assert err == "smtpgw-admin: error: admin 'alice' already exists\n"
    assert admin("admin", "add", "bad name")[0] == 2
    with _admin_store(admin) as store:
        assert store.check_admin("alice", password)
        assert store.admin_count() == 1


def test_admin_list(admin: Admin) -> None:
    """
    Admins by name with their creation and last login times, as text and
    as JSON; none is said so.
    """
    assert admin("admin", "add", "zed")[0] == 0
    password = admin.json("admin", "add", "amy")["password"]
    admin.clock.advance(60)
    with _admin_store(admin) as store:
        assert store.check_admin("amy", password)
    status, out, _ = admin("admin", "list")
    assert status == 0
    assert out.splitlines() == [
        "NAME  CREATED               LAST LOGIN",
        "amy   2023-11-14T22:13:20Z  2023-11-14T22:14:20Z",
        "zed   2023-11-14T22:13:20Z  never",
    ]
    assert admin.json("admin", "list") == {
        "admins": [
            {
                "name": "amy",
                "created_at": "2023-11-14T22:13:20Z",
                "last_login_at": "2023-11-14T22:14:20Z",
            },
            {"name": "zed", "created_at": "2023-11-14T22:13:20Z", "last_login_at": None},
        ]
    }


def test_admin_list_empty(news: Admin) -> None:
    """
    A data directory without admins says so.
    """
    assert news("admin", "list") == (0, "no admins\n", "")
    assert news.json("admin", "list") == {"admins": []}


@pytest.mark.parametrize(
    "args",
    [
        ["admin", "list"],
        ["admin", "delete", "a"],
        ["admin", "password", "a"],
        ["token", "list"],
        ["token", "delete", "1"],
    ],
)
def test_admin_and_token_commands_need_a_database(admin: Admin, args: list[str]) -> None:
    """
    Reading or changing admins and tokens of a data directory without a
    database fails and creates nothing.
    """
    status, _, err = admin(*args)
    assert status == 1
    assert "no database at" in err
    assert not admin.data_dir.exists()


def test_admin_delete(admin: Admin) -> None:
    """
    A deleted admin is gone; deleting it again exits 1.
    """
    admin("admin", "add", "alice")
    admin("admin", "add", "bob")
    assert admin.json("admin", "delete", "alice") == {"name": "alice", "deleted": True}
    assert [d["name"] for d in admin.json("admin", "list")["admins"]] == ["bob"]
    status, _, err = admin("admin", "delete", "alice")
    assert status == 1
    assert err == "smtpgw-admin: error: no admin named 'alice'\n"
    assert admin("admin", "delete", "bob") == (0, "deleted admin bob\n", "")


def test_admin_password_regenerates_and_ends_sessions(admin: Admin) -> None:
    """
    C{admin password} prints a new password once; it works, the old one
    does not, and the admin's sessions end; an unknown admin exits 1.
    """
    old = admin.json("admin", "add", "alice")["password"]
    with _admin_store(admin) as store:
        session_id, _ = store.create_session("alice")
    regenerated = admin.json("admin", "password", "alice")
    assert set(regenerated) == {"name", "password"}
    assert regenerated["name"] == "alice"
    status, out, _ = admin("admin", "password", "alice")
    assert status == 0
    newest = _fields(out)["password"]
    assert "shown only this once" in out
    assert len({old, regenerated["password"], newest}) == 3
    with _admin_store(admin) as store:
        assert store.check_admin("alice", newest)
        assert not store.check_admin("alice", regenerated["password"])
        assert not store.check_admin("alice", old)
        assert store.get_session(session_id) is None
    status, _, err = admin("admin", "password", "carol")
    assert status == 1
    assert "no admin named 'carol'" in err


# --- API tokens ---------------------------------------------------------------


def test_token_add_prints_the_token_once(admin: Admin) -> None:
    """
    C{token add} prints the id, the name and the token, which checks; the
    listing never shows it.
    """
    status, out, _ = admin("token", "add", "deploy bot")
    assert status == 0
    lines = _fields(out)
    assert lines["id"] == "1"
    assert lines["name"] == "deploy bot"
    token = lines["token"]
    assert token.startswith("smtpgw_")
    assert "shown only this once" in out
    with _admin_store(admin) as store:
        checked = store.check_token(token)
    assert checked is not None
    assert checked.name == "deploy bot"
    for extra in ([], ["--json"]):
        status, later, _ = admin("token", "list", *extra)
        assert status == 0
        assert token not in later
        assert token[len("smtpgw_") :] not in later
        assert '"token"' not in later


def test_token_add_json(admin: Admin) -> None:
    """
    C{token add --json} answers C{id}, C{name}, C{token}, C{created_by}
    (null: made from the command line) and the times.
    """
    document = admin.json("token", "add", "ci")
    assert set(document) == TOKEN_FIELDS | {"token"}
    assert document["id"] == 1
    assert document["name"] == "ci"
    assert document["created_by"] is None
    assert document["created_at"] == "2023-11-14T22:13:20Z"
    assert document["last_used_at"] is None
    assert admin.json("token", "add", "ci")["id"] == 2


def test_token_list(admin: Admin) -> None:
    """
    Tokens by id with who made them and when they were last used.
    """
    token = admin.json("token", "add", "ci")["token"]
    admin.json("token", "add", "backup job")
    admin.clock.advance(60)
    with _admin_store(admin) as store:
        assert store.check_token(token) is not None
    status, out, _ = admin("token", "list")
    assert status == 0
    assert out.splitlines() == [
        "ID  NAME        CREATED BY  CREATED               LAST USED",
        "1   ci          -           2023-11-14T22:13:20Z  2023-11-14T22:14:20Z",
        "2   backup job  -           2023-11-14T22:13:20Z  never",
    ]
    documents = admin.json("token", "list")["tokens"]
    assert [set(d) for d in documents] == [TOKEN_FIELDS, TOKEN_FIELDS]
    assert documents[0]["last_used_at"] == "2023-11-14T22:14:20Z"


def test_token_list_empty(news: Admin) -> None:
    """
    A data directory without tokens says so.
    """
    assert news("token", "list") == (0, "no API tokens\n", "")
    assert news.json("token", "list") == {"tokens": []}


def test_token_delete(admin: Admin) -> None:
    """
    A deleted token no longer checks; deleting it again exits 1.
    """
    token = admin.json("token", "add", "ci")
    assert admin.json("token", "delete", "1") == {"id": 1, "deleted": True}
    with _admin_store(admin) as store:
        assert store.check_token(token["token"]) is None
    status, _, err = admin("token", "delete", "1")
    assert status == 1
    assert err == "smtpgw-admin: error: no API token with id 1\n"


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["token", "delete", "one"], 2, "argument ID: invalid int value: 'one'"),
        (["token", "delete", "99"], 1, "no API token with id 99"),
        (["token", "delete", "-1"], 1, "no API token with id -1"),
        (["token", "delete", str(2**64)], 1, "no API token with id"),
        (["token", "add", ""], 2, "NAME: a token name must not be empty"),
        (["token", "add", "n" * 65], 2, "NAME: a token name is at most 64 characters"),
        (["token", "add", "a\x1bb"], 2, "NAME: 'a\\x1bb' has a control character"),
    ],
)
def test_token_refusals_change_nothing(
    admin: Admin, args: list[str], status: int, message: str
) -> None:
    """
    Bad ids and names exit non-zero with one line, leaving the one token.
    """
    admin("token", "add", "ci")
    result, _, err = admin(*args)
    assert result == status
    assert message in err
    assert [d["id"] for d in admin.json("token", "list")["tokens"]] == [1]


def test_token_name_at_the_length_limit(admin: Admin) -> None:
    """
    A 64-character token name is taken.
    """
    assert admin.json("token", "add", "n" * 64)["name"] == "n" * 64


@pytest.fixture
def gateway_admins(admin: Admin) -> Iterator[ThreadedAdminStore]:
    """
    The admin store as the running gateway holds it open.
    """
    from twisted.internet import reactor

    admin.data_dir.mkdir()
    store = ThreadedAdminStore(
        database_path(admin.data_dir),
        reactor=reactor,  # type: ignore[arg-type]
        clock=admin.clock,
        rounds=4,
    )
    store.startService()
    yield store
    store.stopService()


@async_test
async def test_admin_added_by_the_cli_is_seen_by_the_running_gateway(
    admin: Admin, gateway_admins: ThreadedAdminStore
) -> None:
    """
    An admin and a token made with C{smtpgw-admin} while the gateway runs
    work there at once, and the gateway then makes no first admin.
    """
    password = admin.json("admin", "add", "alice")["password"]
    token = admin.json("token", "add", "ci")["token"]
    assert await gateway_admins.check_admin("alice", password)
    assert await gateway_admins.check_token(token) is not None
    assert await gateway_admins.ensure_first_admin() is None


# --- the command line itself ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: GROUP"),
        (["frob"], "invalid choice: 'frob'"),
        (["tokens", "add"], "invalid choice: 'tokens'"),
        (["token", "add"], "token add: the following arguments are required: NAME"),
        (["admin"], "admin: the following arguments are required: COMMAND"),
        (["admin", "frob"], "admin: argument COMMAND: invalid choice: 'frob'"),
        (["token", "delete"], "token delete: the following arguments are required: ID"),
        (["user"], "user: the following arguments are required: COMMAND"),
        (["user", "frob"], "user: argument COMMAND: invalid choice: 'frob'"),
        (["list", "add"], "list add: the following arguments are required: NAME"),
        (["list", "show", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_unknown_commands_are_clean_errors(admin: Admin, args: list[str], message: str) -> None:
    """
    Unknown groups, unknown commands and
    missing arguments exit 2 with one line, and touch nothing.
    """
    status, _, err = admin(*args)
    assert status == 2
    assert message in err
    assert not admin.data_dir.exists()


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """
    C{--help} prints the usage and succeeds; the hidden rounds variable is
    not advertised.
    """
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: smtpgw-admin")
    assert ROUNDS_ENVIRONMENT_VARIABLE not in out
    assert main(["user", "add", "--help"]) == 0
    assert "--domains" in capsys.readouterr().out


def test_data_dir_default() -> None:
    """
    Without C{--data-dir}, the gateway's default data directory is used.
    """
    assert DEFAULT_DATA_DIR == "./smtpgw-data"


def test_data_dir_default_is_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Run from a directory, it works on C{./smtpgw-data} there.
    """
    monkeypatch.chdir(tmp_path)
    assert main(["list", "add", "news"], clock=Clock()) == 0
    assert (tmp_path / "smtpgw-data" / "smtpgw.db").exists()


def test_rounds_from_environment() -> None:
    """
    The bcrypt cost is 12 unless the hidden variable says otherwise, and
    the variable is checked.
    """
    assert _rounds_from_environment({}) == DEFAULT_ROUNDS == 12
    assert _rounds_from_environment({ROUNDS_ENVIRONMENT_VARIABLE: "4"}) == 4
    assert _rounds_from_environment({ROUNDS_ENVIRONMENT_VARIABLE: "31"}) == 31


@pytest.mark.parametrize("value", ["3", "32", "fast", ""])
def test_bad_rounds_variable_is_a_usage_error(
    news: Admin, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """
    A bad C{SMTPGW_BCRYPT_ROUNDS} is refused before anything is done.
    """
    monkeypatch.setenv(ROUNDS_ENVIRONMENT_VARIABLE, value)
    status, _, err = news("user", "add", "--list", "news")
    assert status == 2
    assert ROUNDS_ENVIRONMENT_VARIABLE in err
    monkeypatch.setenv(ROUNDS_ENVIRONMENT_VARIABLE, "4")
    assert news.json("user", "list") == {"users": []}


def test_command_groups_are_the_extension_point() -> None:
    """
    The groups are a list later commands append to; admin, token, recipients
    and campaign are there.
    """
    assert [group.__name__ for group in COMMAND_GROUPS] == [
        "add_list_commands",
        "add_user_commands",
        "add_queue_commands",
        "add_admin_commands",
        "add_token_commands",
        "add_recipient_commands",
        "add_campaign_commands",
    ]


# --- the installed console script -------------------------------------------


def _console_script() -> Path:
    script = Path(sys.executable).parent / "smtpgw-admin"
    assert script.exists(), f"{script} is not installed (pip install -e .)"
    return script


def _run_script(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, ROUNDS_ENVIRONMENT_VARIABLE: "4"}
    return subprocess.run(
        [str(_console_script()), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )


@pytest.fixture
def gateway_store(tmp_path: Path) -> Iterator[ThreadedUserStore]:
    """
    The user store as the running gateway holds it open.
    """
    from twisted.internet import reactor

    clock = Clock()
    clock.advance(T0)
    (tmp_path / "data").mkdir()
    store = ThreadedUserStore(
        database_path(tmp_path / "data"),
        reactor=reactor,  # type: ignore[arg-type]
        clock=clock,
        pool_size=2,
        rounds=4,
    )
    store.startService()
    yield store
    pytest_twisted.blockon(store.stopService())


@async_test
async def test_console_script_works_while_the_gateway_runs(
    tmp_path: Path, gateway_store: ThreadedUserStore
) -> None:
    """
    The installed C{smtpgw-admin} changes the database the running gateway
    has open, and the gateway sees the new user at once; errors exit
    non-zero with one line.
    """
    data_dir = tmp_path / "data"
    assert (await gateway_store.lists()) == []
    added = _run_script(data_dir, "list", "add", "news")
    assert (added.returncode, added.stdout, added.stderr) == (0, "created list news\n", "")
    created = _run_script(data_dir, "user", "add", "--list", "news", "--domains", "a.example")
    assert created.returncode == 0, created.stderr
    document = json.loads(_run_script(data_dir, "--json", "user", "list").stdout)
    (user,) = document["users"]
    seen = await gateway_store.get_user(user["username"])
    assert seen is not None
    assert seen.authorized_domains == ("a.example",)
    assert "password: " in created.stdout
    password = created.stdout.split("password: ")[1].split()[0]
    assert verify_password(password, seen.password_hash)
    failed = _run_script(data_dir, "user", "show", "smtp-news-nobody00")
    assert failed.returncode == 1
    assert failed.stdout == ""
    assert failed.stderr == "smtpgw-admin: error: no SMTP+ user named 'smtp-news-nobody00'\n"
