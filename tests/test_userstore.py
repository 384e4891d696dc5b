"""
Tests for L{smtpgw.userstore}: the SQLite schema and its migrations, the
synchronous store, and the threaded store the reactor uses.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from smtpgw import userstore
from smtpgw.interfaces import IUserStore
from smtpgw.model import Enforcement, MailList, Priority, SmtpUser
from smtpgw.passwords import verify_password
from smtpgw.userstore import (
    ListExists,
    ListNotEmpty,
    NoSuchList,
    NoSuchUser,
    SQLiteUserStore,
    StoreNotRunning,
    ThreadedUserStore,
    UnusableDatabase,
    ValidationError,
    database_path,
    list_document,
    open_database,
    user_document,
)
from tests.twisted_support import async_test, global_reactor

ROUNDS = 4
T0 = 1_700_000_000.0
P = ParamSpec("P")


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(T0)
    return c


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return database_path(tmp_path)


@pytest.fixture
def store(db_path: Path, clock: Clock) -> Iterator[SQLiteUserStore]:
    with SQLiteUserStore.open(db_path, clock, rounds=ROUNDS) as s:
        yield s


# --- the database file and its schema ---------------------------------------


def test_reopening_changes_nothing(db_path: Path, clock: Clock) -> None:
    """
    Opening an up-to-date database again keeps its data and version.
    """
    with SQLiteUserStore.open(db_path, clock) as s:
        s.create_list("news")
    with SQLiteUserStore.open(db_path, clock) as s:
        assert [m.name for m in s.lists()] == ["news"]


def test_schema_enforces_its_rules(store: SQLiteUserStore, db_path: Path) -> None:
    """
    Even writes that bypass the store cannot add a user of a missing list,
    nor a priority outside 1..5, nor an unknown enforcement mode.
    """
    store.create_list("news")
    store.create_user("news")
    connection = open_database(db_path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            connection.execute(
                "INSERT INTO users (username, list, password_hash, created_at) "
                "VALUES ('u', 'nope', x'00', 0)"
            )
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            connection.execute("UPDATE users SET priority = 6")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            connection.execute("UPDATE users SET priority = 0")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            connection.execute("UPDATE users SET enforcement = 'strict'")
    finally:
        connection.close()


def test_reader_not_blocked_by_writer(store: SQLiteUserStore, db_path: Path, clock: Clock) -> None:
    """
    In WAL mode another connection (the CLI while the gateway writes) reads
    while a write transaction is open, and sees the committed state.
    """
    store.create_list("before")
    writer = open_database(db_path)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO lists (name, created_at) VALUES ('during', 0)")
        assert [m.name for m in store.lists()] == ["before"]
        writer.execute("COMMIT")
        assert [m.name for m in store.lists()] == ["before", "during"]
    finally:
        writer.close()


# --- lists ------------------------------------------------------------------


def test_create_and_get_lists(store: SQLiteUserStore, clock: Clock) -> None:
    """
    Lists are created with the clock's time and listed by name.
    """
    created = store.create_list("zeta")
    clock.advance(5)
    store.create_list("alpha")
    assert created == MailList(name="zeta", created_at=T0)
    assert store.get_list("zeta") == created
    assert store.get_list("missing") is None
    assert store.lists() == [MailList("alpha", T0 + 5), created]


def test_duplicate_list_refused(store: SQLiteUserStore) -> None:
    """
    A second list of the same name is an error naming it.
    """
    store.create_list("news")
    with pytest.raises(ListExists, match="'news'"):
        store.create_list("news")


def test_bad_list_name_refused(store: SQLiteUserStore) -> None:
    """
    List names are validated before anything is written.
    """
    with pytest.raises(ValidationError) as e:
        store.create_list("Bad Name")
    assert e.value.field == "name"
    assert store.lists() == []


def test_delete_list_with_users_is_refused(store: SQLiteUserStore) -> None:
    """
    A list that still has users is not deleted, and keeps its users.
    """
    store.create_list("news")
    user, _ = store.create_user("news")
    with pytest.raises(ListNotEmpty, match="1 SMTP\\+ user"):
        store.delete_list("news")
    assert store.get_user(user.username) == user
    store.delete_user(user.username)
    store.delete_list("news")
    assert store.get_list("news") is None
    with pytest.raises(NoSuchList):
        store.delete_list("news")


def test_delete_list_with_console_sends_is_refused(
    store: SQLiteUserStore, db_path: Path, clock: Clock
) -> None:
    """
    A list that has ever had a console send, even a cancelled one and with
    no users left, is refused as not empty (not a database error), and is
    kept with its send.
    """
    from smtpgw.campaigns import SQLiteCampaignStore

    store.create_list("news")
    user, _ = store.create_user("news", domains="example.com")
    with SQLiteCampaignStore.open(db_path, clock) as sends:
        send = sends.create("news", "Spring", sender="a@example.com", text="t")
        sends.cancel(send.id)
    store.delete_user(user.username)
    with pytest.raises(ListNotEmpty, match="1 console send"):
        store.delete_list("news")
    assert store.get_list("news") is not None
    with SQLiteCampaignStore.open(db_path, clock) as sends:
        assert sends.get(send.id) is not None


def test_user_counts(store: SQLiteUserStore) -> None:
    """
    The number of users per list, for the list overview.
    """
    store.create_list("a")
    store.create_list("b")
    store.create_list("empty")
    store.create_user("a")
    store.create_user("a")
    store.create_user("b")
    assert store.user_counts() == {"a": 2, "b": 1}


# --- users ------------------------------------------------------------------


def test_create_user_generates_credentials(store: SQLiteUserStore, db_path: Path) -> None:
    """
    A new user gets a generated username and password; only a bcrypt hash
    of the password is stored, and it verifies.
    """
    store.create_list("news")
    user, password = store.create_user("news")
    assert user.username.startswith("smtp-news-")
    assert len(password) >= 32
    assert user.password_hash.startswith(b"$2b$04$")
    assert verify_password(password, user.password_hash)
    assert store.get_user(user.username) == user
    assert password.encode() not in db_path.read_bytes()
    wal = db_path.with_name(db_path.name + "-wal")
    if wal.exists():
        assert password.encode() not in wal.read_bytes()


def test_create_user_defaults_and_fields(store: SQLiteUserStore, clock: Clock) -> None:
    """
    Defaults are those of the product (active, priority 3, enforce); given
    fields are validated and normalized.
    """
    store.create_list("news")
    plain, _ = store.create_user("news")
    assert plain.active
    assert plain.priority is Priority.NORMAL
    assert plain.enforcement is Enforcement.ENFORCE
    assert plain.authorized_domains == ()
    assert plain.authorized_senders == ()
    assert plain.notes == ""
    assert plain.created_at == T0
    assert plain.last_used_at is None
    assert plain.last_used_ip is None
    full, _ = store.create_user(
        "news",
        priority="1",
        domains="Example.com;mail.example.com",
        senders="App@Example.com",
        notes="the CRM",
        active=False,
        enforcement="monitor",
    )
    assert store.get_user(full.username) == full
    assert full.priority is Priority.VERY_HIGH
    assert full.authorized_domains == ("example.com", "mail.example.com")
    assert full.authorized_senders == ("app@example.com",)
    assert full.notes == "the CRM"
    assert not full.active
    assert full.enforcement is Enforcement.MONITOR


def test_create_user_with_bad_input_changes_nothing(store: SQLiteUserStore) -> None:
    """
    A bad field, or a missing list, creates no user.
    """
    store.create_list("news")
    with pytest.raises(ValidationError) as e:
        store.create_user("news", domains="ok.example;bad..example")
    assert e.value.field == "authorized_domains"
    with pytest.raises(ValidationError):
        store.create_user("news", priority=6)
    with pytest.raises(NoSuchList, match="'nope'"):
        store.create_user("nope")
    assert store.users() == []


def test_usernames_are_retried_on_collision(
    store: SQLiteUserStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    When a generated username is taken, another is generated.
    """
    store.create_list("news")
    names = iter(["smtp-news-aaaaaaaa", "smtp-news-aaaaaaaa", "smtp-news-bbbbbbbb"])
    monkeypatch.setattr(userstore, "generate_username", lambda _list: next(names))
    first, _ = store.create_user("news")
    second, _ = store.create_user("news")
    assert (first.username, second.username) == ("smtp-news-aaaaaaaa", "smtp-news-bbbbbbbb")


def test_users_by_list(store: SQLiteUserStore) -> None:
    """
    Users of one list, or all, sorted; an unknown list is an error.
    """
    store.create_list("a")
    store.create_list("b")
    a1, _ = store.create_user("a")
    a2, _ = store.create_user("a")
    b1, _ = store.create_user("b")
    assert store.users("a") == sorted([a1, a2], key=lambda u: u.username)
    assert store.users() == [*sorted([a1, a2], key=lambda u: u.username), b1]
    with pytest.raises(NoSuchList):
        store.users("c")
    assert store.get_user("nobody") is None


def test_update_user_changes_only_given_fields(store: SQLiteUserStore) -> None:
    """
    Fields not given keep their values; the result is what is stored.
    """
    store.create_list("news")
    store.create_list("other")
    user, _ = store.create_user("news", notes="keep", domains="a.example")
    updated = store.update_user(user.username, priority=5, senders="x@b.example", active=False)
    assert updated == store.get_user(user.username)
    assert updated.priority is Priority.VERY_LOW
    assert updated.authorized_senders == ("x@b.example",)
    assert not updated.active
    assert updated.notes == "keep"
    assert updated.authorized_domains == ("a.example",)
    assert updated.password_hash == user.password_hash
    moved = store.update_user(user.username, list="other", domains="", enforcement="monitor")
    assert moved.list == "other"
    assert moved.username == user.username
    assert moved.authorized_domains == ()
    assert moved.enforcement is Enforcement.MONITOR


def test_update_user_with_bad_input_changes_nothing(store: SQLiteUserStore) -> None:
    """
    One bad field among good ones changes none of them.
    """
    store.create_list("news")
    user, _ = store.create_user("news")
    with pytest.raises(ValidationError) as e:
        store.update_user(user.username, priority=2, senders="not-an-address")
    assert e.value.field == "authorized_senders"
    with pytest.raises(NoSuchList):
        store.update_user(user.username, priority=2, list="nope")
    with pytest.raises(NoSuchUser, match="'nobody'"):
        store.update_user("nobody", priority=2)
    assert store.get_user(user.username) == user


def test_regenerate_password(store: SQLiteUserStore) -> None:
    """
    The new password works, the old one no longer does.
    """
    store.create_list("news")
    user, old = store.create_user("news")
    new = store.regenerate_password(user.username)
    assert new != old
    stored = store.get_user(user.username)
    assert stored is not None
    assert verify_password(new, stored.password_hash)
    assert not verify_password(old, stored.password_hash)
    with pytest.raises(NoSuchUser):
        store.regenerate_password("nobody")


def test_delete_user(store: SQLiteUserStore) -> None:
    """
    A deleted user is gone; deleting it again is an error.
    """
    store.create_list("news")
    user, _ = store.create_user("news")
    store.delete_user(user.username)
    assert store.get_user(user.username) is None
    with pytest.raises(NoSuchUser):
        store.delete_user(user.username)


def test_typical_hash_cost_is_the_most_common_stored_cost(
    store: SQLiteUserStore, db_path: Path
) -> None:
    """
    The store tells the cost most of its hashes have; none without users;
    hashes that state no cost (damaged, or stored as text by hand) are
    skipped or read as they are.
    """
    assert store.typical_hash_cost() is None
    store.create_list("news")
    store.create_user("news", rounds=4)
    assert store.typical_hash_cost() == 4
    store.create_user("news", rounds=5)
    store.create_user("news", rounds=5)
    assert store.typical_hash_cost() == 5
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE users SET password_hash = x'00ff'")
    raw.close()
    assert store.typical_hash_cost() is None
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE users SET password_hash = '$2b$06$' || hex(randomblob(26))")
    raw.close()
    assert store.typical_hash_cost() == 6


def test_get_user_sees_every_change_of_the_row(store: SQLiteUserStore, db_path: Path) -> None:
    """
    Lookups reuse the record decoded from an unchanged row, and a change
    of any column, from any connection, is seen at the next lookup.
    """
    store.create_list("news")
    user, _ = store.create_user("news")
    first = store.get_user(user.username)
    assert first == user
    assert store.get_user(user.username) is first
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE users SET active = 0, notes = 'n'")
    raw.close()
    changed = store.get_user(user.username)
    assert changed is not None
    assert (changed.active, changed.notes) == (False, "n")


def test_decoded_records_are_bounded(
    store: SQLiteUserStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    At most L{userstore.DECODED_USERS} decoded records are kept: at the
    limit all are, one past it the memory starts over.
    """
    monkeypatch.setattr(userstore, "DECODED_USERS", 2)
    store.create_list("news")
    users = [store.create_user("news")[0] for _ in range(3)]
    first, second = (store.get_user(u.username) for u in users[:2])
    assert store.get_user(users[0].username) is first
    assert store.get_user(users[1].username) is second
    assert store.get_user(users[2].username) == users[2]
    again = store.get_user(users[0].username)
    assert again == first
    assert again is not first


def test_record_logins_keeps_the_latest(store: SQLiteUserStore) -> None:
    """
    The newest login wins, an older one written later does not replace
    it, and logins of deleted users are ignored.
    """
    store.create_list("news")
    user, _ = store.create_user("news")
    store.record_logins([(user.username, T0 + 10, "192.0.2.1"), ("gone", T0, "192.0.2.9")])
    store.record_logins([(user.username, T0 + 5, "192.0.2.2")])
    stored = store.get_user(user.username)
    assert stored is not None
    assert (stored.last_used_at, stored.last_used_ip) == (T0 + 10, "192.0.2.1")


def test_user_document_has_product_fields_and_never_the_hash(store: SQLiteUserStore) -> None:
    """
    The JSON shape uses the section 1 names, arrays for the authorized
    lists, the password only when given, and no hash.
    """
    store.create_list("news")
    user, password = store.create_user("news", domains="a.example;b.example")
    document = user_document(user)
    assert set(document) == {
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
    assert document["authorized_domains"] == ["a.example", "b.example"]
    assert document["created_at"] == "2023-11-14T22:13:20Z"
    assert document["last_used_at"] is None
    text = json.dumps(user_document(user, password))
    assert password in text
    assert "$2b$" not in text
    assert "password_hash" not in text
    assert list_document(MailList("news", T0), 3) == {
        "name": "news",
        "created_at": "2023-11-14T22:13:20Z",
        "users": 3,
    }


def test_user_repr_has_no_hash(store: SQLiteUserStore) -> None:
    """
    Logging a user record cannot leak its hash.
    """
    store.create_list("news")
    user, _ = store.create_user("news")
    assert user.password_hash.decode() not in repr(user)


# --- the threaded store -----------------------------------------------------


@pytest.fixture
def threaded(db_path: Path, clock: Clock) -> Iterator[ThreadedUserStore]:
    s = ThreadedUserStore(
        db_path, reactor=global_reactor(), clock=clock, pool_size=2, rounds=ROUNDS
    )
    s.startService()
    yield s
    if s.running:
        pytest_twisted.blockon(s.stopService())


def test_threaded_store_provides_iuserstore(threaded: ThreadedUserStore) -> None:
    """
    It is the L{IUserStore} the gateway uses.
    """
    assert verifyObject(IUserStore, threaded)


@async_test
async def test_threaded_crud_runs_off_the_reactor_thread(threaded: ThreadedUserStore) -> None:
    """
    Every call answers with a L{Deferred} and does its work in a pool thread.
    """
    threads: list[threading.Thread] = []
    created = await threaded.create_list("news")
    assert created == MailList("news", T0)
    assert (await threaded.get_list("news")) == created
    assert (await threaded.lists()) == [created]
    user, password = await threaded.create_user("news", priority=2, domains="a.example")
    assert user.priority is Priority.HIGH
    assert (await threaded.get_user(user.username)) == user
    assert (await threaded.users("news")) == [user]
    assert (await threaded.user_counts()) == {"news": 1}
    updated = await threaded.update_user(user.username, notes="n")
    assert updated.notes == "n"
    new_password = await threaded.regenerate_password(user.username)
    assert new_password != password
    await threaded.run(lambda _store: threads.append(threading.current_thread()))
    assert threads[0] is not threading.main_thread()
    assert threads[0].name.startswith("smtpgw-userstore")
    await threaded.delete_user(user.username)
    assert (await threaded.get_user(user.username)) is None
    await threaded.delete_list("news")
    assert (await threaded.get_list("news")) is None


@async_test
async def test_threaded_errors_arrive_as_failures(threaded: ThreadedUserStore) -> None:
    """
    Store errors fail the L{Deferred}, with the same exception types.
    """
    with pytest.raises(NoSuchUser):
        await threaded.delete_user("nobody")
    with pytest.raises(ValidationError):
        await threaded.create_list("Bad Name")


@async_test
async def test_each_thread_has_its_own_connection(threaded: ThreadedUserStore) -> None:
    """
    Two calls run at the same time on the two threads, each with its own
    store (an SQLite connection must not be shared between threads).
    """
    barrier = threading.Barrier(2, timeout=10)
    seen: list[SQLiteUserStore] = []

    def meet(s: SQLiteUserStore) -> None:
        seen.append(s)
        barrier.wait()

    await gatherResults([threaded.run(meet), threaded.run(meet)])
    assert len({id(s) for s in seen}) == 2


@async_test
async def test_not_running_store_fails_calls(db_path: Path, clock: Clock) -> None:
    """
    Before start and after stop, calls fail at once instead of hanging.
    """
    s = ThreadedUserStore(db_path, reactor=global_reactor(), clock=clock, rounds=ROUNDS)
    failures: list[Any] = []
    s.get_user("u").addErrback(failures.append)
    s.startService()
    await s.stopService()
    s.get_list("l").addErrback(failures.append)
    assert [f.type for f in failures] == [StoreNotRunning, StoreNotRunning]


def test_start_refuses_unusable_database(db_path: Path, clock: Clock) -> None:
    """
    A corrupt database stops the start with the clear error.
    """
    db_path.write_bytes(b"garbage" * 1000)
    s = ThreadedUserStore(db_path, reactor=global_reactor(), clock=clock)
    with pytest.raises(UnusableDatabase):
        s.startService()
    assert not s.running


@async_test
async def test_restart_after_stop(threaded: ThreadedUserStore) -> None:
    """
    A stopped store can be started again (twistd services may be).
    """
    await threaded.stopService()
    threaded.startService()
    assert (await threaded.lists()) == []


def _count_record_logins(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    calls: list[list[Any]] = []
    original = SQLiteUserStore.record_logins

    def counting(self: SQLiteUserStore, logins: Any) -> None:
        batch = [*logins]
        calls.append(batch)
        original(self, batch)

    monkeypatch.setattr(SQLiteUserStore, "record_logins", counting)
    return calls


def _last_used(db_path: Path, clock: Clock, username: str) -> tuple[Any, Any]:
    with SQLiteUserStore.open(db_path, clock) as reader:
        user = reader.get_user(username)
    assert user is not None
    return user.last_used_at, user.last_used_ip


@async_test
async def test_logins_coalesce_into_one_write_per_interval(
    threaded: ThreadedUserStore, db_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Thousands of logins in a second are one transaction, written once the
    second is over, with the latest time and address of each user.
    """
    await threaded.create_list("news")
    alice, _ = await threaded.create_user("news")
    bob, _ = await threaded.create_user("news")
    calls = _count_record_logins(monkeypatch)
    for i in range(3000):
        user = alice if i % 2 else bob
        threaded.record_login(user.username, T0 + i / 10000, f"192.0.2.{i % 200}")
    assert threaded.pending_logins == 2
    clock.advance(0.999)
    assert calls == []
    assert _last_used(db_path, clock, alice.username) == (None, None)
    clock.advance(0.001)
    assert threaded.pending_logins == 0
    await threaded.flush_logins()
    assert len(calls) == 1
    assert len(calls[0]) == 2
    assert _last_used(db_path, clock, alice.username) == (T0 + 2999 / 10000, "192.0.2.199")
    assert _last_used(db_path, clock, bob.username) == (T0 + 2998 / 10000, "192.0.2.198")


@async_test
async def test_logins_flush_at_most_once_a_second(
    threaded: ThreadedUserStore, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A login just after a flush waits a full interval for the next one.
    """
    await threaded.create_list("news")
    user, _ = await threaded.create_user("news")
    calls = _count_record_logins(monkeypatch)
    threaded.record_login(user.username, T0, "192.0.2.1")
    clock.advance(1.0)
    await threaded._when_idle()
    threaded.record_login(user.username, T0 + 1, "192.0.2.2")
    clock.advance(0.999)
    assert len(calls) == 1
    clock.advance(0.001)
    await threaded._when_idle()
    assert len(calls) == 2


@async_test
async def test_stop_writes_pending_logins(
    threaded: ThreadedUserStore, db_path: Path, clock: Clock
) -> None:
    """
    Logins not yet written when the gateway stops are written, and no
    timer is left behind.
    """
    await threaded.create_list("news")
    user: SmtpUser
    user, _ = await threaded.create_user("news")
    threaded.record_login(user.username, T0 + 3, "2001:db8::1")
    assert clock.getDelayedCalls() != []
    await threaded.stopService()
    assert _last_used(db_path, clock, user.username) == (T0 + 3, "2001:db8::1")
    assert clock.getDelayedCalls() == []


@async_test
async def test_older_login_does_not_replace_newer_in_memory(
    threaded: ThreadedUserStore, db_path: Path, clock: Clock
) -> None:
    """
    Logins reported out of order keep the newest.
    """
    await threaded.create_list("news")
    user, _ = await threaded.create_user("news")
    threaded.record_login(user.username, T0 + 5, "192.0.2.5")
    threaded.record_login(user.username, T0 + 1, "192.0.2.1")
    await threaded.flush_logins()
    assert _last_used(db_path, clock, user.username) == (T0 + 5, "192.0.2.5")


@async_test
async def test_logins_recorded_while_stopped_are_written_after_start(
    db_path: Path, clock: Clock
) -> None:
    """
    A login reported before the store runs waits, without an error, and is
    written one interval after the start.
    """
    s = ThreadedUserStore(db_path, reactor=global_reactor(), clock=clock, rounds=ROUNDS)
    with SQLiteUserStore.open(db_path, clock, rounds=ROUNDS) as setup:
        setup.create_list("news")
        user, _ = setup.create_user("news")
    s.record_login(user.username, T0 + 7, "192.0.2.7")
    await s.flush_logins()
    assert s.pending_logins == 1
    assert clock.getDelayedCalls() == []
    s.startService()
    try:
        clock.advance(1.0)
        assert s.pending_logins == 0
        await s.flush_logins()
        assert _last_used(db_path, clock, user.username) == (T0 + 7, "192.0.2.7")
    finally:
        await s.stopService()


@async_test
async def test_change_token_tells_whether_anything_was_committed(
    db_path: Path, clock: Clock
) -> None:
    """
    The change token is unknown until a connection of the pool is open and
    after the store stops; in between, it stays the same across reads and
    differs after each commit.
    """
    s = ThreadedUserStore(db_path, reactor=global_reactor(), clock=clock, rounds=ROUNDS)
    s.startService()
    assert s.change_token() is None
    assert await s.get_list("news") is None
    first = s.change_token()
    assert first is not None
    assert await s.get_list("news") is None
    assert s.change_token() == first
    await s.run(lambda store: store.create_list("news"))
    assert s.change_token() not in (None, first)
    await s.stopService()
    assert s.change_token() is None
