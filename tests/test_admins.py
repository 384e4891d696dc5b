"""
Tests for L{smtpgw.admins}: admin accounts, API tokens and admin web
sessions in SQLite, the threaded store the reactor uses, and the login
throttle.
"""

from __future__ import annotations

import hashlib
import sqlite3
import string
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock

from smtpgw import admins
from smtpgw.admins import (
    FIRST_ADMIN_NAME,
    MAX_ADMIN_NAME_LENGTH,
    MAX_SECRET_LENGTH,
    MAX_TOKEN_NAME_LENGTH,
    SESSION_IDLE_SECONDS,
    SESSION_MAX_SECONDS,
    SESSION_TOUCH_INTERVAL,
    TOKEN_PREFIX,
    TOKEN_TOUCH_INTERVAL,
    Admin,
    AdminExists,
    AdminSession,
    ApiToken,
    LoginThrottle,
    NoSuchAdmin,
    NoSuchToken,
    SQLiteAdminStore,
    ThreadedAdminStore,
    admin_document,
    token_document,
)
from smtpgw.database import StoreError, StoreNotRunning, UnusableDatabase, database_path
from smtpgw.passwords import MAX_PASSWORD_BYTES, hash_password, verify_password
from smtpgw.validation import ValidationError
from tests.twisted_support import async_test, global_reactor

ROUNDS = 4
T0 = 1_700_000_000.0
P = ParamSpec("P")
URLSAFE = set(string.ascii_letters + string.digits + "-_")

JUNK_SECRETS: list[Any] = [
    "",
    TOKEN_PREFIX,
    TOKEN_PREFIX + "a" * MAX_SECRET_LENGTH,
    TOKEN_PREFIX + "x" * 100_000,
    TOKEN_PREFIX + "\u00e9" * 43,
    TOKEN_PREFIX + "\ud800" * 43,
    TOKEN_PREFIX + "\x00" * 43,
    "Bearer " + TOKEN_PREFIX + "a" * 43,
    None,
    b"smtpgw_abc",
    42,
]


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(T0)
    return c


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return database_path(tmp_path)


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[SQLiteAdminStore]:
    with SQLiteAdminStore.open(db_path, clock, rounds=ROUNDS) as s:
        yield s


def _raw(db_path: Path, query: str, *parameters: Any) -> list[tuple[Any, ...]]:
    """
    Rows read past the store, as another process would see them.
    """
    connection = sqlite3.connect(db_path)
    try:
        return connection.execute(query, parameters).fetchall()
    finally:
        connection.close()


def _count(db_path: Path, table: str) -> int:
    return int(_raw(db_path, f"SELECT count(*) FROM {table}")[0][0])  # noqa: S608


# --- admins -------------------------------------------------------------------


def test_create_admin_returns_a_password_that_logs_in(
    store: SQLiteAdminStore, clock: Clock
) -> None:
    """
    A new admin gets a generated password, which checks; a login records
    its time, a failed one does not.
    """
    password = store.create_admin("alice")
    assert len(password) == 32
    assert set(password) <= URLSAFE
    assert store.admins() == [Admin("alice", T0, None)]
    clock.advance(5)
    assert not store.check_admin("alice", password + "x")
    assert store.admins() == [Admin("alice", T0, None)]
    assert store.check_admin("alice", password)
    assert store.admins() == [Admin("alice", T0, T0 + 5)]


def test_admin_name_at_the_length_limit_and_one_past(store: SQLiteAdminStore) -> None:
    """
    A name of 64 characters is taken; one of 65 is refused for the field
    C{name}, and nothing is created.
    """
    longest = "a" * MAX_ADMIN_NAME_LENGTH
    store.create_admin(longest)
    with pytest.raises(ValidationError) as raised:
        store.create_admin("b" * (MAX_ADMIN_NAME_LENGTH + 1))
    assert raised.value.field == "name"
    assert [a.name for a in store.admins()] == [longest]


@pytest.mark.parametrize("name", ["", "has space", "a/b", "caf\u00e9", "a\nb", "semi;colon"])
def test_bad_admin_names_are_refused(store: SQLiteAdminStore, name: str) -> None:
    """
    Names outside C{[A-Za-z0-9._@-]}, or empty, are refused.
    """
    with pytest.raises(ValidationError, match="not a valid admin name"):
        store.create_admin(name)
    assert store.admin_count() == 0


def test_admin_names_may_use_every_allowed_character(store: SQLiteAdminStore) -> None:
    """
    Letters of both cases, digits, C{.}, C{_}, C{@} and C{-} make a name.
    """
    store.create_admin("Ops.Team_1@example-2")
    assert store.admin_count() == 1


def test_duplicate_admin_is_refused_and_keeps_the_old_password(
    store: SQLiteAdminStore,
) -> None:
    """
    Creating an existing admin fails with L{AdminExists} and changes nothing.
    """
    password = store.create_admin("alice")
    with pytest.raises(AdminExists, match="'alice' already exists"):
        store.create_admin("alice")
    assert store.check_admin("alice", password)
    assert store.admin_count() == 1


def test_admins_are_listed_by_name_and_counted(store: SQLiteAdminStore, clock: Clock) -> None:
    """
    L{SQLiteAdminStore.admins} lists by name with creation times.
    """
    assert store.admins() == []
    assert store.admin_count() == 0
    store.create_admin("zed")
    clock.advance(1)
    store.create_admin("amy")
    assert store.admins() == [Admin("amy", T0 + 1, None), Admin("zed", T0, None)]
    assert store.admin_count() == 2


def test_delete_admin_ends_its_sessions(store: SQLiteAdminStore, db_path: Path) -> None:
    """
    A deleted admin cannot log in, its sessions are gone, and deleting an
    unknown admin is L{NoSuchAdmin}.
    """
    password = store.create_admin("alice")
    store.create_admin("bob")
    alice_session, _ = store.create_session("alice")
    bob_session, _ = store.create_session("bob")
    store.delete_admin("alice")
    assert not store.check_admin("alice", password)
    assert store.get_session(alice_session) is None
    assert store.get_session(bob_session) is not None
    assert _count(db_path, "admin_sessions") == 1
    with pytest.raises(NoSuchAdmin, match="no admin named 'alice'"):
        store.delete_admin("alice")


def test_set_admin_password_replaces_it_and_ends_sessions(store: SQLiteAdminStore) -> None:
    """
    A regenerated password works, the old one no longer does, and the
    admin's sessions (not other admins') end.
    """
    old = store.create_admin("alice")
    store.create_admin("bob")
    alice_session, _ = store.create_session("alice")
    bob_session, _ = store.create_session("bob")
    new = store.set_admin_password("alice")
    assert new != old
    assert store.check_admin("alice", new)
    assert not store.check_admin("alice", old)
    assert store.get_session(alice_session) is None
    assert store.get_session(bob_session) is not None
    with pytest.raises(NoSuchAdmin):
        store.set_admin_password("carol")


@pytest.mark.parametrize(
    "password",
    [
        "",
        "a" * (MAX_PASSWORD_BYTES + 1),
        "\u00e9" * 37,
        "\ud800",
        "wrong\x00",
        None,
        b"bytes",
    ],
)
def test_check_admin_refuses_junk_without_raising(store: SQLiteAdminStore, password: Any) -> None:
    """
    Empty, over-72-byte (also when made so by multi-byte characters),
    unencodable, NUL-bearing and non-text passwords are simply wrong.
    """
    store.create_admin("alice")
    assert store.check_admin("alice", password) is False
    assert store.check_admin("nobody", password) is False


def test_a_72_byte_password_is_checked(store: SQLiteAdminStore) -> None:
    """
    Exactly L{MAX_PASSWORD_BYTES} bytes is still a password bcrypt checks
    (and it is wrong); one more byte is refused without bcrypt.
    """
    store.create_admin("alice")
    checked: list[bytes] = []
    original = verify_password

    def counting(password: bytes | str, hashed: bytes) -> bool:
        checked.append(hashed)
        return original(password, hashed)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(admins, "verify_password", counting)
        assert not store.check_admin("alice", "a" * MAX_PASSWORD_BYTES)
        assert len(checked) == 1
        assert not store.check_admin("alice", "a" * (MAX_PASSWORD_BYTES + 1))
        assert len(checked) == 1


def test_unknown_admin_costs_one_bcrypt_check_of_the_same_cost(
    store: SQLiteAdminStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A check for an unknown name runs bcrypt once against a dummy hash of
    the store's cost, as a known name does against its hash, so timing
    does not tell whether the admin exists.
    """
    store.create_admin("alice")
    checked: list[bytes] = []
    original = verify_password

    def counting(password: bytes | str, hashed: bytes) -> bool:
        checked.append(hashed)
        return original(password, hashed)

    monkeypatch.setattr(admins, "verify_password", counting)
    assert not store.check_admin("alice", "guess")
    assert not store.check_admin("nobody", "guess")
    assert not store.check_admin("n" * 10_000, "guess")
    assert len(checked) == 3
    assert [h[:7] for h in checked] == [b"$2b$04$"] * 3
    assert len({*checked}) == 2


def test_malformed_stored_hash_is_a_failed_login(store: SQLiteAdminStore, db_path: Path) -> None:
    """
    A hash damaged by hand (or stored as text) makes logins fail, not raise.
    """
    store.create_admin("alice")
    store.create_admin("bob")
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE admins SET password_hash = x'2432' WHERE name = 'alice'")
        raw.execute("UPDATE admins SET password_hash = 'not a hash' WHERE name = 'bob'")
    raw.close()
    assert store.check_admin("alice", "anything") is False
    assert store.check_admin("bob", "anything") is False


def test_ensure_first_admin_creates_admin_once(store: SQLiteAdminStore) -> None:
    """
    With no admin, the account C{admin} is created and its password
    returned; after that, L{None}.
    """
    password = store.ensure_first_admin()
    assert password is not None
    assert [a.name for a in store.admins()] == [FIRST_ADMIN_NAME] == ["admin"]
    assert store.check_admin("admin", password)
    assert store.ensure_first_admin() is None
    assert store.check_admin("admin", password)


def test_ensure_first_admin_does_nothing_when_an_admin_exists(store: SQLiteAdminStore) -> None:
    """
    Any admin (not only C{admin}) means no first admin is made.
    """
    store.create_admin("bob")
    assert store.ensure_first_admin() is None
    assert [a.name for a in store.admins()] == ["bob"]


def test_ensure_first_admin_loses_a_race_cleanly(
    store: SQLiteAdminStore, db_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    When another process creates an admin while this one hashes the new
    password, the check under the write lock sees it: no second account.
    """
    original = hash_password

    def racing(password: bytes | str, rounds: int) -> bytes:
        with SQLiteAdminStore.open(db_path, clock, rounds=ROUNDS) as other:
            monkeypatch.setattr(admins, "hash_password", original)
            other.create_admin("other")
        return original(password, rounds)

    monkeypatch.setattr(admins, "hash_password", racing)
    assert store.ensure_first_admin() is None
    assert [a.name for a in store.admins()] == ["other"]


def test_admin_document_fields(store: SQLiteAdminStore, clock: Clock) -> None:
    """
    The JSON of an admin: C{name}, C{created_at}, C{last_login_at}, and the
    C{password} only when given.
    """
    admin = Admin("alice", T0, None)
    assert admin_document(admin) == {
        "name": "alice",
        "created_at": "2023-11-14T22:13:20Z",
        "last_login_at": None,
    }
    assert admin_document(Admin("alice", T0, T0 + 60), "pw") == {
        "name": "alice",
        "password": "pw",
        "created_at": "2023-11-14T22:13:20Z",
        "last_login_at": "2023-11-14T22:14:20Z",
    }


# --- API tokens ---------------------------------------------------------------


def test_create_token_returns_the_token_once(store: SQLiteAdminStore, clock: Clock) -> None:
    """
    A token is C{smtpgw_} and 43 url-safe characters; its record names who
    made it and when; it checks, and lists without the token.
    """
    token, secret = store.create_token("deploy bot", "alice")
    assert secret.startswith(TOKEN_PREFIX)
    assert len(secret) == len(TOKEN_PREFIX) + 43
    assert set(secret[len(TOKEN_PREFIX) :]) <= URLSAFE
    assert token == ApiToken(1, "deploy bot", "alice", T0, None)
    assert store.tokens() == [token]
    other, other_secret = store.create_token("ci", None)
    assert other.id == 2
    assert other.created_by is None
    assert other_secret != secret
    clock.advance(3)
    assert store.check_token(secret) == ApiToken(1, "deploy bot", "alice", T0, T0 + 3)
    assert store.check_token(other_secret) == ApiToken(2, "ci", None, T0, T0 + 3)
    assert [t.id for t in store.tokens()] == [1, 2]


def test_token_name_at_the_length_limit_and_one_past(store: SQLiteAdminStore) -> None:
    """
    A token name of 64 characters is taken (surrounding blanks do not
    count); 65 are refused.
    """
    token, _ = store.create_token("  " + "n" * MAX_TOKEN_NAME_LENGTH + " ", None)
    assert token.name == "n" * MAX_TOKEN_NAME_LENGTH
    with pytest.raises(ValidationError) as raised:
        store.create_token("n" * (MAX_TOKEN_NAME_LENGTH + 1), None)
    assert raised.value.field == "name"
    assert len(store.tokens()) == 1


@pytest.mark.parametrize("name", ["", "   ", "a\nb", "tab\there", "\x1b[31m", None])
def test_bad_token_names_are_refused(store: SQLiteAdminStore, name: Any) -> None:
    """
    Empty, blank, control characters and non-text are refused.
    """
    with pytest.raises(ValidationError):
        store.create_token(name, None)
    assert store.tokens() == []


def test_delete_token_stops_it(store: SQLiteAdminStore) -> None:
    """
    A deleted token no longer checks; deleting it again, or an id that
    never was, is L{NoSuchToken}.
    """
    token, secret = store.create_token("ci", None)
    kept, kept_secret = store.create_token("other", None)
    store.delete_token(token.id)
    assert store.check_token(secret) is None
    assert store.check_token(kept_secret) is not None
    assert [t.id for t in store.tokens()] == [kept.id]
    with pytest.raises(NoSuchToken, match="no API token with id 1"):
        store.delete_token(token.id)


@pytest.mark.parametrize("token_id", [0, -1, 99, 2**63 - 1, 2**63, 2**100])
def test_delete_unknown_token_ids(store: SQLiteAdminStore, token_id: int) -> None:
    """
    Ids that are no token, including ones too big for SQLite, are
    L{NoSuchToken}, not a crash.
    """
    store.create_token("ci", None)
    with pytest.raises(NoSuchToken):
        store.delete_token(token_id)
    assert len(store.tokens()) == 1


@pytest.mark.parametrize("junk", JUNK_SECRETS)
def test_check_token_refuses_junk(store: SQLiteAdminStore, junk: Any) -> None:
    """
    Empty, huge, non-ASCII, wrongly prefixed and non-text tokens are
    simply no token.
    """
    store.create_token("ci", None)
    assert store.check_token(junk) is None


def test_check_token_needs_every_character(store: SQLiteAdminStore) -> None:
    """
    A token with one character changed, missing or added is no token.
    """
    _, secret = store.create_token("ci", None)
    last = secret[-1]
    changed = secret[:-1] + ("A" if last != "A" else "B")
    for wrong in (changed, secret[:-1], secret + "A", secret.upper()):
        assert store.check_token(wrong) is None
    assert store.check_token(secret) is not None


def test_token_use_is_written_at_most_once_a_minute(
    store: SQLiteAdminStore, db_path: Path, clock: Clock
) -> None:
    """
    The first use is written; uses within L{TOKEN_TOUCH_INTERVAL} of the
    written one are not; a use at the interval is.
    """
    _, secret = store.create_token("ci", None)

    def stored() -> Any:
        return _raw(db_path, "SELECT last_used_at FROM api_tokens")[0][0]

    assert stored() is None
    checked = store.check_token(secret)
    assert checked is not None
    assert checked.last_used_at == T0
    assert stored() == T0
    clock.advance(TOKEN_TOUCH_INTERVAL - 0.001)
    checked = store.check_token(secret)
    assert checked is not None
    assert checked.last_used_at == T0
    assert stored() == T0
    clock.advance(0.001)
    checked = store.check_token(secret)
    assert checked is not None
    assert checked.last_used_at == T0 + TOKEN_TOUCH_INTERVAL
    assert stored() == T0 + TOKEN_TOUCH_INTERVAL


def test_token_document_fields(store: SQLiteAdminStore) -> None:
    """
    The JSON of a token record, with the C{token} only when given.
    """
    token = ApiToken(7, "ci", None, T0, None)
    assert token_document(token) == {
        "id": 7,
        "name": "ci",
        "created_by": None,
        "created_at": "2023-11-14T22:13:20Z",
        "last_used_at": None,
    }
    assert token_document(ApiToken(7, "ci", "alice", T0, T0), "smtpgw_x") == {
        "id": 7,
        "name": "ci",
        "token": "smtpgw_x",
        "created_by": "alice",
        "created_at": "2023-11-14T22:13:20Z",
        "last_used_at": "2023-11-14T22:13:20Z",
    }


# --- sessions -----------------------------------------------------------------


def test_create_session_gives_an_id_and_a_csrf_token(
    store: SQLiteAdminStore, db_path: Path
) -> None:
    """
    A session id and its CSRF token are 43 url-safe characters each,
    different; the id finds the session; only its digest is stored.
    """
    store.create_admin("alice")
    session_id, session = store.create_session("alice")
    assert session == AdminSession("alice", session.csrf, T0, T0)
    assert len(session_id) == len(session.csrf) == 43
    assert set(session_id) <= URLSAFE
    assert set(session.csrf) <= URLSAFE
    assert session_id != session.csrf
    assert store.get_session(session_id) == session
    ((id_hash,),) = _raw(db_path, "SELECT id_hash FROM admin_sessions")
    assert id_hash == hashlib.sha256(session_id.encode()).digest()
    other_id, other = store.create_session("alice")
    assert other_id != session_id
    assert other.csrf != session.csrf


def test_create_session_for_unknown_admin(store: SQLiteAdminStore, db_path: Path) -> None:
    """
    No session is made for an admin that does not exist.
    """
    with pytest.raises(NoSuchAdmin):
        store.create_session("nobody")
    assert _count(db_path, "admin_sessions") == 0


def test_session_idle_exactly_at_the_limit_and_one_past(
    store: SQLiteAdminStore, db_path: Path, clock: Clock
) -> None:
    """
    A session unused for exactly L{SESSION_IDLE_SECONDS} is still on (and
    counts as used again); one unused a second longer is off and deleted.
    """
    store.create_admin("alice")
    at_limit, _ = store.create_session("alice")
    past_limit, _ = store.create_session("alice")
    clock.advance(SESSION_IDLE_SECONDS)
    session = store.get_session(at_limit)
    assert session is not None
    assert session.last_seen_at == T0 + SESSION_IDLE_SECONDS
    clock.advance(1)
    assert store.get_session(past_limit) is None
    assert _count(db_path, "admin_sessions") == 1
    assert store.get_session(at_limit) is not None


def test_session_ends_at_max_age_however_used(
    store: SQLiteAdminStore, db_path: Path, clock: Clock
) -> None:
    """
    A session used every 20 minutes is still on exactly
    L{SESSION_MAX_SECONDS} after login, and off (deleted) one second later.
    """
    store.create_admin("alice")
    session_id, _ = store.create_session("alice")
    step = 20 * 60
    assert SESSION_MAX_SECONDS % step == 0
    for _ in range(SESSION_MAX_SECONDS // step):
        clock.advance(step)
        assert store.get_session(session_id) is not None
    assert clock.seconds() == T0 + SESSION_MAX_SECONDS
    clock.advance(1)
    assert store.get_session(session_id) is None
    assert _count(db_path, "admin_sessions") == 0


def test_session_use_is_written_at_most_every_30_seconds(
    store: SQLiteAdminStore, db_path: Path, clock: Clock
) -> None:
    """
    Page loads within L{SESSION_TOUCH_INTERVAL} of the written time do not
    write; one at the interval does.
    """
    store.create_admin("alice")
    session_id, _ = store.create_session("alice")

    def stored() -> Any:
        return _raw(db_path, "SELECT last_seen_at FROM admin_sessions")[0][0]

    clock.advance(SESSION_TOUCH_INTERVAL - 0.001)
    session = store.get_session(session_id)
    assert session is not None
    assert session.last_seen_at == T0
    assert stored() == T0
    clock.advance(0.001)
    session = store.get_session(session_id)
    assert session is not None
    assert session.last_seen_at == T0 + SESSION_TOUCH_INTERVAL
    assert stored() == T0 + SESSION_TOUCH_INTERVAL


def test_delete_session_logs_out(store: SQLiteAdminStore) -> None:
    """
    A deleted session is gone; deleting an unknown or junk id is no error.
    """
    store.create_admin("alice")
    session_id, _ = store.create_session("alice")
    kept_id, _ = store.create_session("alice")
    store.delete_session(session_id)
    assert store.get_session(session_id) is None
    store.delete_session(session_id)
    for junk in JUNK_SECRETS:
        store.delete_session(junk)
    assert store.get_session(kept_id) is not None


@pytest.mark.parametrize("junk", JUNK_SECRETS)
def test_get_session_refuses_junk(store: SQLiteAdminStore, junk: Any) -> None:
    """
    Junk session ids are no session.
    """
    store.create_admin("alice")
    store.create_session("alice")
    assert store.get_session(junk) is None


def test_purge_sessions_removes_only_ended_ones(
    store: SQLiteAdminStore, db_path: Path, clock: Clock
) -> None:
    """
    Purging deletes sessions idle for longer than the limit and those past
    the maximum age; one idle exactly the limit stays.
    """
    store.create_admin("alice")
    store.create_admin("bob")
    old_id, _ = store.create_session("alice")
    for _ in range(SESSION_MAX_SECONDS // 1200):
        clock.advance(1200)
        store.get_session(old_id)
    store.create_session("alice")
    clock.advance(1)
    # Another admin's login, so that it does not clear alice's ended session.
    at_limit_id, _ = store.create_session("bob")
    clock.advance(SESSION_IDLE_SECONDS)
    assert store.purge_sessions() == 2
    assert _count(db_path, "admin_sessions") == 1
    assert store.get_session(at_limit_id) is not None
    assert store.purge_sessions() == 0


def test_new_session_clears_the_admins_ended_sessions(
    store: SQLiteAdminStore, db_path: Path, clock: Clock
) -> None:
    """
    Logging in removes that admin's ended sessions, so abandoned ones do
    not pile up; other admins' are left to L{SQLiteAdminStore.purge_sessions}.
    """
    store.create_admin("alice")
    store.create_admin("bob")
    store.create_session("alice")
    store.create_session("bob")
    clock.advance(SESSION_IDLE_SECONDS + 1)
    store.create_session("alice")
    assert sorted(row[0] for row in _raw(db_path, "SELECT admin FROM admin_sessions")) == [
        "alice",
        "bob",
    ]


# --- secrets stay secret ------------------------------------------------------


def test_no_secret_is_stored_in_clear(store: SQLiteAdminStore, db_path: Path) -> None:
    """
    Passwords, tokens and session ids appear nowhere in the database's
    files (main file and write-ahead log), only their hashes do.
    """
    password = store.create_admin("alice")
    first = store.ensure_first_admin()
    assert first is None
    regenerated = store.create_admin("bob")
    regenerated = store.set_admin_password("bob")
    _, token = store.create_token("ci", "alice")
    session_id, session = store.create_session("alice")
    store.check_admin("alice", password)
    store.check_token(token)
    store.get_session(session_id)
    raw = b"".join(
        path.read_bytes() for path in db_path.parent.iterdir() if path.name.startswith("smtpgw.db")
    )
    assert session.csrf.encode() in raw, "the scan does not see what is stored"
    for secret in (password, regenerated, token, session_id, token[len(TOKEN_PREFIX) :]):
        assert secret.encode() not in raw
    ((token_hash,),) = _raw(db_path, "SELECT token_hash FROM api_tokens")
    assert token_hash == hashlib.sha256(token.encode()).digest()
    for (stored,) in _raw(db_path, "SELECT password_hash FROM admins"):
        assert stored.startswith(b"$2b$04$")


def test_reprs_show_no_secret(store: SQLiteAdminStore) -> None:
    """
    Records never hold a password or token, and a session's repr leaves out
    its CSRF token.
    """
    password = store.create_admin("alice")
    token, secret = store.create_token("ci", "alice")
    session_id, session = store.create_session("alice")
    shown = repr((store.admins(), token, store.tokens(), session, store))
    for hidden in (password, secret, session_id, session.csrf):
        assert hidden not in shown
    assert "alice" in repr(session)


# --- the threaded store ---------------------------------------------------------


@pytest.fixture
def threaded(db_path: Path, clock: Clock) -> Iterator[ThreadedAdminStore]:
    s = ThreadedAdminStore(db_path, reactor=global_reactor(), clock=clock, rounds=ROUNDS)
    s.startService()
    yield s
    if s.running:
        s.stopService()


@async_test
async def test_threaded_store_does_everything_off_the_reactor_thread(
    threaded: ThreadedAdminStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Every method answers with a L{Deferred}; bcrypt runs in a pool thread.
    """
    bcrypt_threads: list[threading.Thread] = []
    original_hash, original_verify = hash_password, verify_password

    def hashing(password: bytes | str, rounds: int) -> bytes:
        bcrypt_threads.append(threading.current_thread())
        return original_hash(password, rounds)

    def verifying(password: bytes | str, hashed: bytes) -> bool:
        bcrypt_threads.append(threading.current_thread())
        return original_verify(password, hashed)

    monkeypatch.setattr(admins, "hash_password", hashing)
    monkeypatch.setattr(admins, "verify_password", verifying)

    password = await threaded.create_admin("alice")
    assert await threaded.admin_count() == 1
    assert await threaded.check_admin("alice", password)
    assert not await threaded.check_admin("alice", "wrong")
    assert not await threaded.check_admin("nobody", "wrong")
    assert await threaded.admins() == [Admin("alice", T0, T0)]
    new_password = await threaded.set_admin_password("alice")
    assert await threaded.check_admin("alice", new_password)

    token, secret = await threaded.create_token("ci", "alice")
    assert await threaded.tokens() == [token]
    checked = await threaded.check_token(secret)
    assert checked is not None
    assert checked.id == token.id
    await threaded.delete_token(token.id)
    assert await threaded.check_token(secret) is None

    session_id, session = await threaded.create_session("alice")
    assert await threaded.get_session(session_id) == session
    await threaded.delete_session(session_id)
    assert await threaded.get_session(session_id) is None
    await threaded.create_session("alice")
    clock.advance(SESSION_IDLE_SECONDS + 1)
    assert await threaded.purge_sessions() == 1

    await threaded.delete_admin("alice")
    assert await threaded.admins() == []

    assert len(bcrypt_threads) == 6
    assert threading.main_thread() not in bcrypt_threads
    assert all(t.name.startswith("smtpgw-adminstore") for t in bcrypt_threads)


@async_test
async def test_threaded_ensure_first_admin_returns_the_password_once(
    threaded: ThreadedAdminStore,
) -> None:
    """
    The first call makes C{admin} and answers its password; later calls,
    and calls after a restart, answer L{None}.
    """
    password = await threaded.ensure_first_admin()
    assert password is not None
    assert await threaded.check_admin("admin", password)
    assert await threaded.ensure_first_admin() is None
    threaded.stopService()
    threaded.startService()
    assert await threaded.ensure_first_admin() is None
    assert [a.name for a in await threaded.admins()] == ["admin"]


@async_test
async def test_two_processes_racing_make_one_first_admin(db_path: Path, clock: Clock) -> None:
    """
    Two stores on one database (the gateway and the CLI, or two gateways)
    asking at once make exactly one first admin between them.
    """
    stores = [
        ThreadedAdminStore(
            db_path, reactor=global_reactor(), clock=clock, pool_size=2, rounds=ROUNDS
        )
        for _ in range(2)
    ]
    for s in stores:
        s.startService()
    try:
        results = await gatherResults(
            [s.ensure_first_admin() for s in stores for _ in range(3)], consumeErrors=True
        )
    finally:
        for s in stores:
            s.stopService()
    passwords = [r for r in results if r is not None]
    assert len(passwords) == 1
    with SQLiteAdminStore.open(db_path, clock, rounds=ROUNDS) as reader:
        assert reader.admin_count() == 1
        assert reader.check_admin("admin", passwords[0])


@async_test
async def test_threaded_errors_arrive_as_failures(threaded: ThreadedAdminStore) -> None:
    """
    Store errors fail the L{Deferred} with the same exception types.
    """
    await threaded.create_admin("alice")
    with pytest.raises(AdminExists):
        await threaded.create_admin("alice")
    with pytest.raises(ValidationError):
        await threaded.create_admin("bad name")
    with pytest.raises(NoSuchAdmin):
        await threaded.delete_admin("nobody")
    with pytest.raises(NoSuchToken):
        await threaded.delete_token(5)
    assert issubclass(NoSuchToken, StoreError)


@async_test
async def test_not_running_store_fails_calls(db_path: Path, clock: Clock) -> None:
    """
    Before start and after stop, calls fail at once with
    L{StoreNotRunning} instead of hanging.
    """
    s = ThreadedAdminStore(db_path, reactor=global_reactor(), clock=clock, rounds=ROUNDS)
    with pytest.raises(StoreNotRunning):
        await s.check_admin("a", "b")
    s.startService()
    assert await s.admin_count() == 0
    s.stopService()
    with pytest.raises(StoreNotRunning):
        await s.ensure_first_admin()


def test_start_refuses_an_unusable_database(db_path: Path, clock: Clock) -> None:
    """
    A corrupt database stops the start with the clear error.
    """
    db_path.write_bytes(b"garbage" * 1000)
    s = ThreadedAdminStore(db_path, reactor=global_reactor(), clock=clock)
    with pytest.raises(UnusableDatabase):
        s.startService()
    assert not s.running


# --- the login throttle ---------------------------------------------------------


def _fail(throttle: LoginThrottle, times: int, ip: str, name: str, now: float) -> None:
    for _ in range(times):
        throttle.failed(ip, name, now)


def test_throttle_is_free_below_free_failures_then_waits_base_delay() -> None:
    """
    Up to C{free_failures - 1} failures cost nothing; at C{free_failures}
    the next attempt waits C{base_delay}; one past, twice that.
    """
    throttle = LoginThrottle()
    ip, name = "192.0.2.1", "alice"
    assert throttle.delay(ip, name, T0) == 0
    _fail(throttle, 2, ip, name, T0)
    assert throttle.delay(ip, name, T0) == 0
    throttle.failed(ip, name, T0)
    assert throttle.delay(ip, name, T0) == 1.0
    throttle.failed(ip, name, T0)
    assert throttle.delay(ip, name, T0) == 2.0


def test_throttle_doubles_up_to_the_cap() -> None:
    """
    Each further failure doubles the wait, which stops at C{max_delay},
    however many failures there are.
    """
    throttle = LoginThrottle(free_failures=3, base_delay=1.0, max_delay=30.0)
    delays = []
    for _ in range(10):
        throttle.failed("192.0.2.1", "alice", T0)
        delays.append(throttle.delay("192.0.2.1", "alice", T0))
    assert delays == [0, 0, 1, 2, 4, 8, 16, 30, 30, 30]
    _fail(throttle, 5000, "192.0.2.1", "alice", T0)
    assert throttle.delay("192.0.2.1", "alice", T0) == 30


def test_throttle_wait_counts_from_the_last_failure() -> None:
    """
    The wait is what is left of the backoff since the last failure: time
    spent waiting counts.
    """
    throttle = LoginThrottle()
    _fail(throttle, 4, "192.0.2.1", "alice", T0)
    assert throttle.delay("192.0.2.1", "alice", T0 + 0.5) == 1.5
    assert throttle.delay("192.0.2.1", "alice", T0 + 2) == 0
    assert throttle.delay("192.0.2.1", "alice", T0 + 60) == 0
    throttle.failed("192.0.2.1", "alice", T0 + 60)
    assert throttle.delay("192.0.2.1", "alice", T0 + 60) == 4.0


def test_throttle_forgets_after_the_window() -> None:
    """
    Failures count while the last one is at most C{window} seconds old;
    one second later they are forgotten and the next failure is a first one.
    """
    at_limit = LoginThrottle(window=900.0)
    _fail(at_limit, 3, "192.0.2.1", "alice", T0)
    at_limit.failed("192.0.2.1", "alice", T0 + 900)
    assert at_limit.delay("192.0.2.1", "alice", T0 + 900) == 2.0

    past_limit = LoginThrottle(window=900.0)
    _fail(past_limit, 3, "192.0.2.1", "alice", T0)
    past_limit.failed("192.0.2.1", "alice", T0 + 901)
    assert past_limit.delay("192.0.2.1", "alice", T0 + 901) == 0
    assert past_limit.tracked == 2


def test_throttle_counts_per_name_across_addresses() -> None:
    """
    Guesses for one name from many addresses add up for that name, not for
    another name.
    """
    throttle = LoginThrottle()
    for i in range(4):
        throttle.failed(f"198.51.100.{i}", "admin", T0)
    assert throttle.delay("203.0.113.9", "admin", T0) == 2.0
    assert throttle.delay("203.0.113.9", "bob", T0) == 0


def test_throttle_counts_per_address_across_names() -> None:
    """
    Guesses for many names from one address add up for that address.
    """
    throttle = LoginThrottle()
    for i in range(3):
        throttle.failed("192.0.2.1", f"name{i}", T0)
    assert throttle.delay("192.0.2.1", "fresh", T0) == 1.0
    assert throttle.delay("192.0.2.2", "fresh", T0) == 0


def test_throttle_groups_ipv6_by_64() -> None:
    """
    IPv6 addresses of one /64 count as one client; another /64 is another;
    an IPv4-mapped address counts as its IPv4 address.
    """
    throttle = LoginThrottle()
    for i, address in enumerate(["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"]):
        throttle.failed(address, f"name{i}", T0)
    assert throttle.delay("2001:db8:1:2:abcd::1", "fresh", T0) == 1.0
    assert throttle.delay("2001:db8:1:3::1", "fresh", T0) == 0
    _fail(throttle, 3, "::ffff:192.0.2.7", "a", T0)
    assert throttle.delay("192.0.2.7", "b", T0) == 1.0


def test_throttle_success_clears_address_and_name() -> None:
    """
    A successful login clears the counts of its address and its name.
    """
    throttle = LoginThrottle()
    _fail(throttle, 5, "192.0.2.1", "alice", T0)
    throttle.succeeded("192.0.2.1", "alice", T0)
    assert throttle.delay("192.0.2.1", "other", T0) == 0
    assert throttle.delay("192.0.2.9", "alice", T0) == 0
    assert throttle.tracked == 0


def test_throttle_keeps_at_most_max_keys() -> None:
    """
    At C{max_keys} counts all are kept; past it the ones with the oldest
    last failure are forgotten.
    """
    throttle = LoginThrottle(free_failures=0, base_delay=10.0, max_delay=10.0, max_keys=4)
    throttle.failed("192.0.2.1", "a", T0)
    throttle.failed("192.0.2.2", "b", T0 + 1)
    assert throttle.tracked == 4
    assert throttle.delay("192.0.2.1", "fresh", T0 + 1) > 0
    assert throttle.delay("192.0.2.9", "a", T0 + 1) > 0
    throttle.failed("192.0.2.3", "c", T0 + 2)
    assert throttle.tracked == 4
    assert throttle.delay("192.0.2.1", "fresh", T0 + 2) == 0
    assert throttle.delay("192.0.2.9", "a", T0 + 2) == 0
    assert throttle.delay("192.0.2.2", "fresh", T0 + 2) > 0


def test_throttle_a_hammering_address_is_not_evicted_by_its_own_names() -> None:
    """
    One address spraying many names keeps its own count (each failure makes
    it the newest), so it cannot buy itself a fresh start.
    """
    throttle = LoginThrottle(max_keys=50)
    for i in range(1000):
        throttle.failed("192.0.2.1", f"name{i}", T0 + i / 4)
    assert throttle.tracked == 50
    assert throttle.delay("192.0.2.1", "fresh", T0 + 999 / 4) == 30


def test_throttle_expired_counts_free_their_memory() -> None:
    """
    Counts older than the window are dropped at the next failure.
    """
    throttle = LoginThrottle(window=900.0)
    for i in range(100):
        throttle.failed(f"192.0.2.{i}", f"name{i}", T0)
    assert throttle.tracked == 200
    throttle.failed("198.51.100.1", "x", T0 + 901)
    assert throttle.tracked == 2


@pytest.mark.parametrize(
    "arguments",
    [
        {"free_failures": -1},
        {"base_delay": 0},
        {"max_delay": 0.5},
        {"window": 0},
        {"max_keys": 0},
    ],
)
def test_throttle_refuses_nonsense_settings(arguments: dict[str, Any]) -> None:
    """
    Negative or zero settings, and a cap below the first delay, are errors.
    """
    with pytest.raises(ValueError, match="must"):
        LoginThrottle(**arguments)


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["fail", "succeed", "ask"]),
            st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2", "junk"]),
            st.sampled_from(["admin", "bob", "x" * 200, ""]),
            st.floats(min_value=0, max_value=2000),
        ),
        max_size=60,
    )
)
def test_throttle_invariants(events: list[tuple[str, str, str, float]]) -> None:
    """
    Whatever happens (time moving forward by any amount), a wait is between
    0 and C{max_delay}, and at most C{max_keys} counts are kept.
    """
    throttle = LoginThrottle(max_keys=5)
    now = T0
    for action, ip, name, step in events:
        now += step
        if action == "fail":
            throttle.failed(ip, name, now)
        elif action == "succeed":
            throttle.succeeded(ip, name, now)
        wait = throttle.delay(ip, name, now)
        assert 0 <= wait <= throttle.max_delay
        assert throttle.tracked <= 5
