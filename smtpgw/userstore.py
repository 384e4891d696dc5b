"""
Lists and SMTP+ users, kept in the SQLite database of the data directory
(L{smtpgw.database}).

Deleting a list that still has users is refused (L{ListNotEmpty}): removing
credentials that live integrations use must be a deliberate act, one user at
a time, never a side effect.

L{SQLiteUserStore} is the synchronous store (the CLI uses it directly);
L{ThreadedUserStore} runs it on a small thread pool for the reactor and
implements L{IUserStore}.
"""

from __future__ import annotations

import enum
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from smtpgw.database import (
    PerThreadPool,
    SchemaTooNew,
    SQLiteStore,
    StoreError,
    StoreNotRunning,
    UnusableDatabase,
    WalIndexHeader,
    database_path,
    open_database,
    transaction,
)
from smtpgw.interfaces import IUserStore
from smtpgw.model import Enforcement, MailList, Priority, SmtpUser
from smtpgw.passwords import (
    DEFAULT_ROUNDS,
    generate_password,
    generate_username,
    hash_cost,
    hash_password,
)
from smtpgw.validation import (
    ValidationError,
    parse_domains,
    parse_senders,
    validate_active,
    validate_enforcement,
    validate_list_name,
    validate_notes,
    validate_priority,
)

__all__ = [
    "UNSET",
    "ListExists",
    "ListNotEmpty",
    "NoSuchList",
    "NoSuchUser",
    "SQLiteUserStore",
    "SchemaTooNew",
    "StoreError",
    "StoreNotRunning",
    "ThreadedUserStore",
    "Unset",
    "UnusableDatabase",
    "ValidationError",
    "database_path",
    "list_document",
    "open_database",
    "user_document",
]

T = TypeVar("T")

USERNAME_ATTEMPTS: Final = 10
"""Fresh usernames tried before giving up; a collision is already rare."""

DEFAULT_POOL_SIZE: Final = 4
"""
Threads of L{ThreadedUserStore}. They only run short queries (bcrypt has
its own pool, L{smtpgw.checker.BcryptPool}); WAL readers do not block each
other, so a few let a slow write not hold up logins.
"""

DECODED_USERS: Final = 4096
"""Records each connection keeps decoded, for the lookup of every login."""

LOGIN_FLUSH_INTERVAL: Final = 1.0
"""Seconds between writes of coalesced login records."""


class NoSuchList(StoreError, LookupError):
    """
    No list has that name.
    """


class NoSuchUser(StoreError, LookupError):
    """
    No SMTP+ user has that username.
    """


class ListExists(StoreError):
    """
    A list of that name already exists.
    """


class ListNotEmpty(StoreError):
    """
    The list still has SMTP+ users, or console sends, so it is not deleted.
    """


class Unset(enum.Enum):
    """
    The type of L{UNSET}: a field left unchanged by L{SQLiteUserStore.update_user}.
    """

    UNSET = enum.auto()


UNSET: Final = Unset.UNSET

_SELECT_USERS: Final = (
    "SELECT username, list, password_hash, active, priority, notes, authorized_domains, "
    "authorized_senders, enforcement, created_at, last_used_at, last_used_ip FROM users"
)
_INSERT_USER: Final = (
    "INSERT INTO users (username, list, password_hash, active, priority, notes, "
    "authorized_domains, authorized_senders, enforcement, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _user_from_row(row: tuple[Any, ...]) -> SmtpUser:
    return SmtpUser(
        username=row[0],
        list=row[1],
        password_hash=bytes(row[2]),
        active=bool(row[3]),
        priority=Priority(row[4]),
        notes=row[5],
        authorized_domains=tuple(json.loads(row[6])),
        authorized_senders=tuple(json.loads(row[7])),
        enforcement=Enforcement(row[8]),
        created_at=row[9],
        last_used_at=row[10],
        last_used_ip=row[11],
    )


@define
class SQLiteUserStore(SQLiteStore):
    """
    The synchronous user store: one SQLite connection, used by one thread
    at a time.

    @ivar rounds: the bcrypt cost of new password hashes.
    """

    _connection: sqlite3.Connection
    _clock: IReactorTime
    rounds: int = DEFAULT_ROUNDS
    # Rows already turned into records, by their whole contents: a login
    # looks up the same unchanged row again and again, and decoding it
    # costs more than the query.
    _decoded: dict[tuple[Any, ...], SmtpUser] = field(factory=dict, init=False, repr=False)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        clock: IReactorTime,
        *,
        rounds: int = DEFAULT_ROUNDS,
        create: bool = True,
        check_same_thread: bool = True,
    ) -> SQLiteUserStore:
        """
        Open the database at C{path} (see L{open_database}).

        @param clock: gives C{created_at} times.
        """
        connection = open_database(path, create=create, check_same_thread=check_same_thread)
        return cls(connection, clock, rounds)

    def _list_exists(self, name: str) -> bool:
        row = self._connection.execute("SELECT 1 FROM lists WHERE name = ?", (name,)).fetchone()
        return row is not None

    def create_list(self, name: str) -> MailList:
        """
        Create a list.

        @raise ValidationError: for a bad name.
        @raise ListExists: when it exists already.
        """
        validate_list_name(name)
        created = MailList(name=name, created_at=self._clock.seconds())
        with transaction(self._connection) as db:
            if self._list_exists(name):
                raise ListExists(f"list {name!r} already exists")
            db.execute(
                "INSERT INTO lists (name, created_at) VALUES (?, ?)",
                (created.name, created.created_at),
            )
        return created

    def get_list(self, name: str) -> MailList | None:
        """
        The list named C{name}, or L{None}.
        """
        row = self._connection.execute(
            "SELECT name, created_at FROM lists WHERE name = ?", (name,)
        ).fetchone()
        return None if row is None else MailList(name=row[0], created_at=row[1])

    def lists(self) -> list[MailList]:
        """
        Every list, by name.
        """
        rows = self._connection.execute("SELECT name, created_at FROM lists ORDER BY name")
        return [MailList(name=name, created_at=created_at) for name, created_at in rows]

    def user_counts(self) -> dict[str, int]:
        """
        How many SMTP+ users each list has (lists without users are left out).
        """
        rows = self._connection.execute("SELECT list, count(*) FROM users GROUP BY list")
        return {name: count for name, count in rows}

    def delete_list(self, name: str) -> None:
        """
        Delete a list that has no users and no console sends.

        @raise NoSuchList: when there is none of that name.
        @raise ListNotEmpty: when it still has SMTP+ users or has ever had
            a console send.
        """
        with transaction(self._connection) as db:
            if not self._list_exists(name):
                raise NoSuchList(f"no list named {name!r}")
            (count,) = db.execute("SELECT count(*) FROM users WHERE list = ?", (name,)).fetchone()
            if count:
                raise ListNotEmpty(
                    f"list {name!r} still has {count} SMTP+ user(s): delete them first"
                )
            # Console sends keep their list (the schema restricts the delete)
            # so that their history and counts stay attached to a name.
            (sends,) = db.execute(
                "SELECT count(*) FROM campaigns WHERE list = ?", (name,)
            ).fetchone()
            if sends:
                raise ListNotEmpty(
                    f"list {name!r} has {sends} console send(s): a list with console sends is kept"
                )
            db.execute("DELETE FROM lists WHERE name = ?", (name,))

    def create_user(
        self,
        list: str,
        priority: int | str | Priority = Priority.NORMAL,
        domains: str | Iterable[str] = (),
        senders: str | Iterable[str] = (),
        notes: str = "",
        active: bool = True,
        enforcement: Enforcement | str = Enforcement.ENFORCE,
        rounds: int | None = None,
    ) -> tuple[SmtpUser, str]:
        """
        Create an SMTP+ user with a generated username and password.

        @param list: the list it relays for.
        @param domains: C{authorized_domains}, C{;}-separated or as entries.
        @param senders: C{authorized_senders}, C{;}-separated or as entries.
        @param rounds: bcrypt cost, default L{rounds}.
        @return: the record and the password, which is stored only as a
            hash: this is the one time it is known.
        @raise ValidationError: for any bad field, before anything changes.
        @raise NoSuchList: when the list does not exist.
        """
        user_priority = validate_priority(priority)
        authorized_domains = parse_domains(domains)
        authorized_senders = parse_senders(senders)
        notes = validate_notes(notes)
        active = validate_active(active)
        user_enforcement = validate_enforcement(enforcement)
        if not self._list_exists(list):
            raise NoSuchList(f"no list named {list!r}")
        password = generate_password()
        # bcrypt is slow: hash before taking the write lock.
        password_hash = hash_password(password, self.rounds if rounds is None else rounds)
        now = self._clock.seconds()
        with transaction(self._connection) as db:
            if not self._list_exists(list):
                raise NoSuchList(f"no list named {list!r}")
            for _ in range(USERNAME_ATTEMPTS):
                username = generate_username(list)
                if self._fetch_user(username) is None:
                    break
            else:
                raise StoreError(f"no free username found for list {list!r}")
            user = SmtpUser(
                username=username,
                list=list,
                password_hash=password_hash,
                active=active,
                priority=user_priority,
                notes=notes,
                authorized_domains=authorized_domains,
                authorized_senders=authorized_senders,
                enforcement=user_enforcement,
                created_at=now,
            )
            db.execute(
                _INSERT_USER,
                (
                    user.username,
                    user.list,
                    user.password_hash,
                    int(user.active),
                    int(user.priority),
                    user.notes,
                    json.dumps(_as_list(user.authorized_domains)),
                    json.dumps(_as_list(user.authorized_senders)),
                    user.enforcement.value,
                    user.created_at,
                ),
            )
        return user, password

    def _fetch_user(self, username: str) -> SmtpUser | None:
        row = self._connection.execute(
            _SELECT_USERS + " WHERE username = ?", (username,)
        ).fetchone()
        return None if row is None else _user_from_row(row)

    def get_user(self, username: str) -> SmtpUser | None:
        """
        The user named C{username}, or L{None}.
        """
        row = self._connection.execute(
            _SELECT_USERS + " WHERE username = ?", (username,)
        ).fetchone()
        if row is None:
            return None
        user = self._decoded.get(row)
        if user is None:
            if len(self._decoded) >= DECODED_USERS:
                self._decoded.clear()
            user = self._decoded[row] = _user_from_row(row)
        return user

    def typical_hash_cost(self) -> int | None:
        """
        The bcrypt cost most stored password hashes have (the checker makes
        an unknown user's check cost as much).

        @return: the cost, or L{None} when no stored hash states one.
        """
        rows = self._connection.execute(
            "SELECT substr(password_hash, 1, 7) AS prefix FROM users "
            "GROUP BY prefix ORDER BY count(*) DESC"
        )
        for (prefix,) in rows:
            # A hash written as text by hand is still a hash.
            if isinstance(prefix, str):
                prefix = prefix.encode("ascii", "replace")
            cost = hash_cost(prefix) if isinstance(prefix, bytes) else None
            if cost is not None:
                return cost
        return None

    def users(self, list: str | None = None) -> list[SmtpUser]:
        """
        The SMTP+ users, of one list or of all, by list then username.

        @raise NoSuchList: when C{list} is given and does not exist.
        """
        if list is None:
            rows = self._connection.execute(_SELECT_USERS + " ORDER BY list, username").fetchall()
        else:
            if not self._list_exists(list):
                raise NoSuchList(f"no list named {list!r}")
            rows = self._connection.execute(
                _SELECT_USERS + " WHERE list = ? ORDER BY username", (list,)
            ).fetchall()
        return [_user_from_row(row) for row in rows]

    def update_user(
        self,
        username: str,
        *,
        list: str | Unset = UNSET,
        priority: int | str | Priority | Unset = UNSET,
        domains: str | Iterable[str] | Unset = UNSET,
        senders: str | Iterable[str] | Unset = UNSET,
        notes: str | Unset = UNSET,
        active: bool | Unset = UNSET,
        enforcement: Enforcement | str | Unset = UNSET,
    ) -> SmtpUser:
        """
        Change some fields of a user; the others keep their values.

        The fields are those of L{create_user}; C{list} moves the user to
        another list (its username does not change).

        @return: the record as it is now.
        @raise ValidationError: for any bad field, before anything changes.
        @raise NoSuchUser: when there is no such user.
        @raise NoSuchList: when moving it to a list that does not exist.
        """
        changes: dict[str, object] = {}
        if not isinstance(priority, Unset):
            changes["priority"] = int(validate_priority(priority))
        if not isinstance(domains, Unset):
            changes["authorized_domains"] = json.dumps(_as_list(parse_domains(domains)))
        if not isinstance(senders, Unset):
            changes["authorized_senders"] = json.dumps(_as_list(parse_senders(senders)))
        if not isinstance(notes, Unset):
            changes["notes"] = validate_notes(notes)
        if not isinstance(active, Unset):
            changes["active"] = int(validate_active(active))
        if not isinstance(enforcement, Unset):
            changes["enforcement"] = validate_enforcement(enforcement).value
        if not isinstance(list, Unset):
            changes["list"] = list
        with transaction(self._connection) as db:
            if self._fetch_user(username) is None:
                raise NoSuchUser(f"no SMTP+ user named {username!r}")
            if not isinstance(list, Unset) and not self._list_exists(list):
                raise NoSuchList(f"no list named {list!r}")
            if changes:
                # Column names come from the fixed keys above, never from input.
                assignments = ", ".join(f"{column} = ?" for column in changes)
                db.execute(
                    f"UPDATE users SET {assignments} WHERE username = ?",  # noqa: S608
                    (*changes.values(), username),
                )
            user = self._fetch_user(username)
        assert user is not None
        return user

    def regenerate_password(self, username: str, rounds: int | None = None) -> str:
        """
        Give a user a new generated password; the old one stops working.

        @param rounds: bcrypt cost, default L{rounds}.
        @return: the new password: this is the one time it is known.
        @raise NoSuchUser: when there is no such user.
        """
        if self._fetch_user(username) is None:
            raise NoSuchUser(f"no SMTP+ user named {username!r}")
        password = generate_password()
        password_hash = hash_password(password, self.rounds if rounds is None else rounds)
        with transaction(self._connection) as db:
            cursor = db.execute(
                "UPDATE users SET password_hash = ? WHERE username = ?", (password_hash, username)
            )
            if cursor.rowcount == 0:
                raise NoSuchUser(f"no SMTP+ user named {username!r}")
        return password

    def delete_user(self, username: str) -> None:
        """
        Delete a user; its credentials stop working at once.

        @raise NoSuchUser: when there is no such user.
        """
        with transaction(self._connection) as db:
            cursor = db.execute("DELETE FROM users WHERE username = ?", (username,))
            if cursor.rowcount == 0:
                raise NoSuchUser(f"no SMTP+ user named {username!r}")

    def record_logins(self, logins: Iterable[tuple[str, float, str]]) -> None:
        """
        Remember the last successful logins, in one transaction.

        @param logins: (username, time, client address) triples; an older
            time never replaces a newer one, and unknown users are ignored.
        """
        with transaction(self._connection) as db:
            db.executemany(
                "UPDATE users SET last_used_at = ?, last_used_ip = ? "
                "WHERE username = ? AND (last_used_at IS NULL OR last_used_at <= ?)",
                [(at, ip, username, at) for username, at, ip in logins],
            )


def _as_list(values: Iterable[str]) -> list[str]:
    # Where a parameter named "list" hides the builtin.
    return [*values]


def _timestamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return (
        datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def user_document(user: SmtpUser, password: str | None = None) -> dict[str, Any]:
    """
    A user as JSON, with the field names of the product's section 1; never
    the hash.

    @param password: included only when it was just generated.
    @return: C{username}, (C{password}), C{list}, C{active}, C{priority},
        C{notes}, C{authorized_domains}, C{authorized_senders} (arrays),
        C{enforcement}, C{created_at}, C{last_used_at}, C{last_used_ip};
        times in ISO 8601 UTC, or C{null}.
    """
    document: dict[str, Any] = {"username": user.username}
    if password is not None:
        document["password"] = password
    document.update(
        {
            "list": user.list,
            "active": user.active,
            "priority": int(user.priority),
            "notes": user.notes,
            "authorized_domains": _as_list(user.authorized_domains),
            "authorized_senders": _as_list(user.authorized_senders),
            "enforcement": user.enforcement.value,
            "created_at": _timestamp(user.created_at),
            "last_used_at": _timestamp(user.last_used_at),
            "last_used_ip": user.last_used_ip,
        }
    )
    return document


def list_document(mail_list: MailList, users: int | None = None) -> dict[str, Any]:
    """
    A list as JSON: C{name}, C{created_at} and, when given, its number of C{users}.
    """
    document: dict[str, Any] = {
        "name": mail_list.name,
        "created_at": _timestamp(mail_list.created_at),
    }
    if users is not None:
        document["users"] = users
    return document


@implementer(IUserStore)
class ThreadedUserStore(Service):
    """
    The user store as the reactor reaches it: every call runs an
    L{SQLiteUserStore} on a small pool of threads, each with its own
    connection, and answers with a L{Deferred}.

    Successful logins are coalesced in memory and written in one transaction
    at most once every L{LOGIN_FLUSH_INTERVAL} seconds, and when stopping.

    @ivar rounds: the bcrypt cost of new password hashes.
    """

    _log = Logger()

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reactor: IReactorFromThreads,
        clock: IReactorTime,
        pool_size: int = DEFAULT_POOL_SIZE,
        rounds: int = DEFAULT_ROUNDS,
        flush_interval: float = LOGIN_FLUSH_INTERVAL,
    ) -> None:
        """
        @param path: the database file; created when missing.
        @param reactor: delivers results from the threads.
        @param clock: gives times, and schedules login flushes.
        """
        self._path = Path(path)
        self._clock = clock
        self.rounds = rounds
        self._flush_interval = flush_interval
        self._threads = PerThreadPool(
            reactor, self._open_store, size=pool_size, name="smtpgw-userstore"
        )
        self._header = WalIndexHeader()
        self._pending_logins: dict[str, tuple[float, str]] = {}
        self._flush_timer: IDelayedCall | None = None
        self._flushes_in_flight = 0
        self._idle_waiters: list[Deferred[None]] = []

    def startService(self) -> None:
        """
        Open the database (so a bad one stops the start with a clear error),
        then start the threads.
        """
        open_database(self._path, create=True).close()
        self._threads.start()
        super().startService()
        if self._pending_logins:
            self._schedule_flush()

    def stopService(self) -> Deferred[None]:
        """
        Write the pending login records, then stop the threads and close
        their connections.
        """
        super().stopService()
        self._cancel_flush_timer()
        self._flush_logins_now()
        return self._when_idle().addCallback(lambda _: self._stop_threads())

    def _stop_threads(self) -> None:
        try:
            self._threads.stop()
        finally:
            # Only now: the header is read from the file the threads'
            # connections hold (see L{WalIndexHeader}).
            self._header.close()

    def _open_store(self) -> SQLiteUserStore:
        # Closed by the pool once its thread is gone, hence not tied to it.
        connection = open_database(self._path, create=True, check_same_thread=False)
        # The connection holds the database's shared memory open until the
        # pool stops.
        self._header.open(connection)
        return SQLiteUserStore(connection, self._clock, self.rounds)

    def change_token(self) -> bytes | None:
        """
        What the database's wal-index header reads now (L{WalIndexHeader}):
        two equal tokens mean that nothing was committed to the database in
        between, by any process. Read in the calling thread without waiting
        for anything, so the reactor may call it.

        @return: the token, or L{None} when it is unknown: before the first
            call L{run} made (no connection of the pool is open yet), after
            L{stopService}, or for a database not in WAL mode.
        """
        return self._header.read()

    def run(self, f: Callable[[SQLiteUserStore], T]) -> Deferred[T]:
        """
        Call C{f} with this thread's L{SQLiteUserStore}, in the pool.

        Callers that must do several steps off the reactor (the credential
        checker: lookup and cache check) do them in one hop this way.

        @return: what C{f} returns, or fails with what it raised, or with
            L{StoreNotRunning}.
        """
        return self._threads.run(f)

    def get_user(self, username: str) -> Deferred[SmtpUser | None]:
        return self.run(lambda store: store.get_user(username))

    def get_list(self, name: str) -> Deferred[MailList | None]:
        return self.run(lambda store: store.get_list(name))

    def lists(self) -> Deferred[list[MailList]]:
        """
        See L{SQLiteUserStore.lists}.
        """
        return self.run(lambda store: store.lists())

    def user_counts(self) -> Deferred[dict[str, int]]:
        """
        See L{SQLiteUserStore.user_counts}.
        """
        return self.run(lambda store: store.user_counts())

    def create_list(self, name: str) -> Deferred[MailList]:
        """
        See L{SQLiteUserStore.create_list}.
        """
        return self.run(lambda store: store.create_list(name))

    def delete_list(self, name: str) -> Deferred[None]:
        """
        See L{SQLiteUserStore.delete_list}.
        """
        return self.run(lambda store: store.delete_list(name))

    def create_user(self, list: str, **fields: Any) -> Deferred[tuple[SmtpUser, str]]:
        """
        See L{SQLiteUserStore.create_user}.
        """
        return self.run(lambda store: store.create_user(list, **fields))

    def users(self, list: str | None = None) -> Deferred[list[SmtpUser]]:
        """
        See L{SQLiteUserStore.users}.
        """
        return self.run(lambda store: store.users(list))

    def update_user(self, username: str, **changes: Any) -> Deferred[SmtpUser]:
        """
        See L{SQLiteUserStore.update_user}.
        """
        return self.run(lambda store: store.update_user(username, **changes))

    def regenerate_password(self, username: str, rounds: int | None = None) -> Deferred[str]:
        """
        See L{SQLiteUserStore.regenerate_password}.
        """
        return self.run(lambda store: store.regenerate_password(username, rounds))

    def delete_user(self, username: str) -> Deferred[None]:
        """
        See L{SQLiteUserStore.delete_user}.
        """
        return self.run(lambda store: store.delete_user(username))

    def record_login(self, username: str, at: float, ip: str) -> Deferred[None]:
        """
        Remember a successful login; written with the others of the same
        second, so it costs a dictionary update.

        @return: an already-fired L{Deferred}.
        """
        previous = self._pending_logins.get(username)
        if previous is None or previous[0] <= at:
            self._pending_logins[username] = (at, ip)
        if self.running:
            self._schedule_flush()
        return succeed(None)

    def _schedule_flush(self) -> None:
        if self._flush_timer is None:
            self._flush_timer = self._clock.callLater(self._flush_interval, self._flush_from_timer)

    @property
    def pending_logins(self) -> int:
        """
        How many users have a login not yet written.
        """
        return len(self._pending_logins)

    def flush_logins(self) -> Deferred[None]:
        """
        Write the pending login records now.

        @return: fires once they, and any write already under way, are done.
        """
        self._cancel_flush_timer()
        self._flush_logins_now()
        return self._when_idle()

    def _cancel_flush_timer(self) -> None:
        if self._flush_timer is not None:
            if self._flush_timer.active():
                self._flush_timer.cancel()
            self._flush_timer = None

    def _flush_from_timer(self) -> None:
        self._flush_timer = None
        self._flush_logins_now()

    def _flush_logins_now(self) -> None:
        if not self._pending_logins or not self._threads.running:
            return
        batch = [(username, at, ip) for username, (at, ip) in self._pending_logins.items()]
        self._pending_logins = {}
        self._flushes_in_flight += 1
        d = self.run(lambda store: store.record_logins(batch))
        d.addErrback(
            lambda f: self._log.failure(
                "Could not record {count} logins", failure=f, count=len(batch)
            )
        )
        d.addBoth(self._flush_done)

    def _flush_done(self, _: object) -> None:
        self._flushes_in_flight -= 1
        if self._flushes_in_flight == 0:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def _when_idle(self) -> Deferred[None]:
        if self._flushes_in_flight == 0:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter
