"""
Who may use the admin web pages and the JSON API: admin accounts, API
tokens, admin web sessions, and the throttle on failed logins.

Every secret is made here, shown once, and stored only in a form that cannot
give it back: an admin's password as a bcrypt hash, an API token and a
session id as their SHA-256 digest (they are 256 random bits, so a fast hash
is enough and a lookup by digest costs one index probe). Only a session's
CSRF token is kept as it is, because every form carries it back and it is
useless without the session cookie.

L{SQLiteAdminStore} is the synchronous store (the CLI uses it directly);
L{ThreadedAdminStore} runs it on a small thread pool for the reactor, so
bcrypt never runs on the reactor thread. L{LoginThrottle} is the pure rule
for how long a login attempt waits after failures.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
from typing import Any, Final, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime

from smtpgw.abuse import address_key
from smtpgw.database import (
    SQLiteStore,
    StoreError,
    ThreadedStore,
    open_database,
    transaction,
)
from smtpgw.passwords import (
    DEFAULT_ROUNDS,
    MAX_PASSWORD_BYTES,
    dummy_hash,
    generate_password,
    hash_password,
    verify_password,
)
from smtpgw.queueinfo import iso8601
from smtpgw.validation import ValidationError

__all__ = [
    "FIRST_ADMIN_NAME",
    "MAX_ADMIN_NAME_LENGTH",
    "MAX_SECRET_LENGTH",
    "MAX_TOKEN_NAME_LENGTH",
    "SESSION_IDLE_SECONDS",
    "SESSION_MAX_SECONDS",
    "SESSION_TOUCH_INTERVAL",
    "TOKEN_PREFIX",
    "TOKEN_TOUCH_INTERVAL",
    "Admin",
    "AdminExists",
    "AdminSession",
    "ApiToken",
    "LoginThrottle",
    "NoSuchAdmin",
    "NoSuchToken",
    "SQLiteAdminStore",
    "ThreadedAdminStore",
    "admin_document",
    "token_document",
    "validate_admin_name",
    "validate_token_name",
]

T = TypeVar("T")

SESSION_IDLE_SECONDS: Final = 30 * 60
"""A session unused for longer than this ends."""

SESSION_MAX_SECONDS: Final = 12 * 3600
"""A session ends once it is older than this, however much it is used."""

SESSION_TOUCH_INTERVAL: Final = 30.0
"""
Seconds between writes of a session's C{last_seen_at}: a page load costs no
write most of the time, and an idle session may end this much early.
"""

TOKEN_TOUCH_INTERVAL: Final = 60.0
"""Seconds between writes of an API token's C{last_used_at}."""

TOKEN_PREFIX: Final = "smtpgw_"  # noqa: S105 (a prefix, not a secret)
"""What every API token starts with, so a leaked one is recognizable."""

TOKEN_ENTROPY_BYTES: Final = 32
"""256 random bits in each API token, session id and CSRF token."""

MAX_SECRET_LENGTH: Final = 128
"""
Longest API token or session id looked at; anything longer is refused
without a query (real ones are about 50 characters).
"""

MAX_ADMIN_NAME_LENGTH: Final = 64
MAX_TOKEN_NAME_LENGTH: Final = 64

FIRST_ADMIN_NAME: Final = "admin"
"""The account made on the first start, when there is no admin."""

DEFAULT_POOL_SIZE: Final = 2
"""
Threads of L{ThreadedAdminStore}: admin logins are rare, and a second thread
keeps a bcrypt check from holding up the session lookups of page loads.
"""

_ADMIN_NAME: Final = re.compile(r"[A-Za-z0-9._@-]{1,64}")


class AdminExists(StoreError):
    """
    An admin of that name already exists.
    """


class NoSuchAdmin(StoreError, LookupError):
    """
    No admin has that name.
    """


class NoSuchToken(StoreError, LookupError):
    """
    No API token has that id.
    """


@frozen
class Admin:
    """
    An admin account, without its password hash.

    @ivar name: what the admin logs in with.
    @ivar created_at: when it was created (POSIX seconds).
    @ivar last_login_at: the last successful login, or L{None} if never.
    """

    name: str
    created_at: float
    last_login_at: float | None


@frozen
class ApiToken:
    """
    An API token's record; never the token itself, which only its creator
    saw once.

    @ivar id: its number, to delete it by.
    @ivar name: what it is for, as its creator put it.
    @ivar created_by: the admin who created it, or L{None} when made with
        C{smtpgw-admin}.
    @ivar last_used_at: when it last authorized a request (to within
        L{TOKEN_TOUCH_INTERVAL}), or L{None} if never.
    """

    id: int
    name: str
    created_by: str | None
    created_at: float
    last_used_at: float | None


@frozen
class AdminSession:
    """
    A logged-in admin's web session.

    @ivar admin: the admin's name.
    @ivar csrf: the token every form of this session must carry back.
    @ivar created_at: the login time.
    @ivar last_seen_at: when it was last used (to within
        L{SESSION_TOUCH_INTERVAL}).
    """

    admin: str
    csrf: str = field(repr=False)
    created_at: float
    last_seen_at: float


def validate_admin_name(name: str) -> str:
    """
    Check an admin name: 1 to L{MAX_ADMIN_NAME_LENGTH} of C{A-Z a-z 0-9 . _ @ -}.

    @return: C{name}, unchanged.
    @raise ValidationError: for the field C{name}.
    """
    if not isinstance(name, str) or not _ADMIN_NAME.fullmatch(name):
        raise ValidationError(
            "name",
            f"{name!r} is not a valid admin name: use 1 to {MAX_ADMIN_NAME_LENGTH} "
            "letters, digits, '.', '_', '@' or '-'",
        )
    return name


def validate_token_name(name: str) -> str:
    """
    Check what an API token is named: 1 to L{MAX_TOKEN_NAME_LENGTH}
    printable characters (spaces inside are fine).

    @return: C{name} without surrounding white space.
    @raise ValidationError: for the field C{name}.
    """
    if not isinstance(name, str):
        raise ValidationError("name", "a token name must be text")
    stripped = name.strip()
    if not stripped:
        raise ValidationError("name", "a token name must not be empty")
    if len(stripped) > MAX_TOKEN_NAME_LENGTH:
        raise ValidationError(
            "name", f"a token name is at most {MAX_TOKEN_NAME_LENGTH} characters"
        )
    if not stripped.isprintable():
        raise ValidationError("name", f"{stripped!r} has a control character")
    return stripped


def _digest(secret: object) -> bytes | None:
    """
    The SHA-256 digest a token or session id is stored as, or L{None} for
    what cannot be one (not text, empty, too long, not ASCII).
    """
    if not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET_LENGTH:
        return None
    if not secret.isascii():
        return None
    return hashlib.sha256(secret.encode("ascii")).digest()


def _new_secret() -> str:
    return secrets.token_urlsafe(TOKEN_ENTROPY_BYTES)


def admin_document(admin: Admin, password: str | None = None) -> dict[str, Any]:
    """
    An admin as JSON: C{name}, (C{password}, only when just generated),
    C{created_at}, C{last_login_at}; times in ISO 8601 UTC, or C{null}.
    """
    document: dict[str, Any] = {"name": admin.name}
    if password is not None:
        document["password"] = password
    document["created_at"] = iso8601(admin.created_at)
    document["last_login_at"] = iso8601(admin.last_login_at)
    return document


def token_document(token: ApiToken, secret: str | None = None) -> dict[str, Any]:
    """
    An API token's record as JSON: C{id}, C{name}, (C{token}, only when just
    created), C{created_by}, C{created_at}, C{last_used_at}.
    """
    document: dict[str, Any] = {"id": token.id, "name": token.name}
    if secret is not None:
        document["token"] = secret
    document["created_by"] = token.created_by
    document["created_at"] = iso8601(token.created_at)
    document["last_used_at"] = iso8601(token.last_used_at)
    return document


_SELECT_ADMINS: Final = "SELECT name, created_at, last_login_at FROM admins"
_SELECT_TOKENS: Final = "SELECT id, name, created_by, created_at, last_used_at FROM api_tokens"
_MAX_SQLITE_INTEGER: Final = 2**63 - 1


def _token_from_row(row: tuple[Any, ...]) -> ApiToken:
    return ApiToken(
        id=row[0], name=row[1], created_by=row[2], created_at=row[3], last_used_at=row[4]
    )


@define
class SQLiteAdminStore(SQLiteStore):
    """
    The synchronous admin store: one SQLite connection, used by one thread
    at a time.

    @ivar rounds: the bcrypt cost of new password hashes, and of the dummy
        hash an unknown name is checked against.
    """

    _connection: sqlite3.Connection
    _clock: IReactorTime
    rounds: int = DEFAULT_ROUNDS

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        clock: IReactorTime,
        *,
        rounds: int = DEFAULT_ROUNDS,
        check_same_thread: bool = True,
        create: bool = True,
    ) -> SQLiteAdminStore:
        """
        Open the database at C{path} (see L{open_database}).

        @param clock: gives the times of records, and decides expiry.
        @param create: make the database when it is missing.
        """
        connection = open_database(path, create=create, check_same_thread=check_same_thread)
        return cls(connection, clock, rounds)

    # --- admins -------------------------------------------------------------

    def _admin_exists(self, name: str) -> bool:
        row = self._connection.execute("SELECT 1 FROM admins WHERE name = ?", (name,)).fetchone()
        return row is not None

    def create_admin(self, name: str) -> str:
        """
        Create an admin account with a generated password.

        @return: the password, which is stored only as a hash: this is the
            one time it is known.
        @raise ValidationError: for a bad name (see L{validate_admin_name}).
        @raise AdminExists: when there is an admin of that name.
        """
        validate_admin_name(name)
        if self._admin_exists(name):
            raise AdminExists(f"admin {name!r} already exists")
        password = generate_password()
        # bcrypt is slow: hash before taking the write lock.
        password_hash = hash_password(password, self.rounds)
        with transaction(self._connection) as db:
            if self._admin_exists(name):
                raise AdminExists(f"admin {name!r} already exists")
            db.execute(
                "INSERT INTO admins (name, password_hash, created_at) VALUES (?, ?, ?)",
                (name, password_hash, self._clock.seconds()),
            )
        return password

    def ensure_first_admin(self) -> str | None:
        """
        Create the admin L{FIRST_ADMIN_NAME} when there is no admin at all.

        Two processes may start at once (the gateway and C{smtpgw-admin}):
        the count is checked again under the write lock, so at most one of
        them creates an account.

        @return: its generated password, or L{None} when there already is an
            admin.
        """
        if self.admin_count():
            return None
        password = generate_password()
        password_hash = hash_password(password, self.rounds)
        with transaction(self._connection) as db:
            (count,) = db.execute("SELECT count(*) FROM admins").fetchone()
            if count:
                return None
            db.execute(
                "INSERT INTO admins (name, password_hash, created_at) VALUES (?, ?, ?)",
                (FIRST_ADMIN_NAME, password_hash, self._clock.seconds()),
            )
        return password

    def admins(self) -> list[Admin]:
        """
        Every admin, by name.
        """
        rows = self._connection.execute(_SELECT_ADMINS + " ORDER BY name")
        return [Admin(name=row[0], created_at=row[1], last_login_at=row[2]) for row in rows]

    def admin_count(self) -> int:
        """
        How many admins there are.
        """
        (count,) = self._connection.execute("SELECT count(*) FROM admins").fetchone()
        return int(count)

    def delete_admin(self, name: str) -> None:
        """
        Delete an admin; its sessions end with it. Its API tokens stay: they
        belong to the integrations that use them.

        @raise NoSuchAdmin: when there is no admin of that name.
        """
        with transaction(self._connection) as db:
            cursor = db.execute("DELETE FROM admins WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                raise NoSuchAdmin(f"no admin named {name!r}")

    def set_admin_password(self, name: str) -> str:
        """
        Give an admin a new generated password; the old one stops working
        and every session of that admin ends.

        @return: the new password: this is the one time it is known.
        @raise NoSuchAdmin: when there is no admin of that name.
        """
        if not self._admin_exists(name):
            raise NoSuchAdmin(f"no admin named {name!r}")
        password = generate_password()
        password_hash = hash_password(password, self.rounds)
        with transaction(self._connection) as db:
            cursor = db.execute(
                "UPDATE admins SET password_hash = ? WHERE name = ?", (password_hash, name)
            )
            if cursor.rowcount == 0:
                raise NoSuchAdmin(f"no admin named {name!r}")
            db.execute("DELETE FROM admin_sessions WHERE admin = ?", (name,))
        return password

    def check_admin(self, name: str, password: str) -> bool:
        """
        Check an admin's login, never raising for what a client sends.

        An unknown name costs the same bcrypt work as a known one (a dummy
        hash of cost L{rounds}), so the time of a failure does not tell
        whether the admin exists. A password bcrypt cannot take (over
        L{MAX_PASSWORD_BYTES} bytes) fails at once, whoever it is for.

        @return: L{True} for the right password, after recording the time
            as the admin's C{last_login_at}.
        """
        if not isinstance(name, str) or not isinstance(password, str):
            return False
        try:
            offered = password.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate from a badly decoded form field.
            return False
        if len(offered) > MAX_PASSWORD_BYTES:
            return False
        row = self._connection.execute(
            "SELECT password_hash FROM admins WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            verify_password(offered, dummy_hash(self.rounds))
            return False
        stored = row[0]
        if not isinstance(stored, bytes) or not verify_password(offered, stored):
            return False
        with transaction(self._connection) as db:
            db.execute(
                "UPDATE admins SET last_login_at = ? WHERE name = ?", (self._clock.seconds(), name)
            )
        return True

    # --- API tokens ---------------------------------------------------------

    def create_token(self, name: str, created_by: str | None) -> tuple[ApiToken, str]:
        """
        Create an API token.

        @param name: what it is for (see L{validate_token_name}).
        @param created_by: the admin creating it, or L{None} from the CLI.
        @return: its record and the token, C{smtpgw_} and 43 url-safe
            characters, which is stored only as its SHA-256 digest: this is
            the one time it is known.
        @raise ValidationError: for a bad name.
        """
        name = validate_token_name(name)
        secret = TOKEN_PREFIX + _new_secret()
        digest = _digest(secret)
        now = self._clock.seconds()
        with transaction(self._connection) as db:
            cursor = db.execute(
                "INSERT INTO api_tokens (name, token_hash, created_by, created_at) "
                "VALUES (?, ?, ?, ?)",
                (name, digest, created_by, now),
            )
            token_id = cursor.lastrowid
        assert token_id is not None
        token = ApiToken(
            id=token_id, name=name, created_by=created_by, created_at=now, last_used_at=None
        )
        return token, secret

    def tokens(self) -> list[ApiToken]:
        """
        Every API token's record, oldest first.
        """
        rows = self._connection.execute(_SELECT_TOKENS + " ORDER BY id")
        return [_token_from_row(row) for row in rows]

    def delete_token(self, id: int) -> None:
        """
        Delete an API token; requests with it are refused from now on.

        @raise NoSuchToken: when there is no token with that id.
        """
        if not isinstance(id, int) or not 0 < id <= _MAX_SQLITE_INTEGER:
            raise NoSuchToken(f"no API token with id {id!r}")
        with transaction(self._connection) as db:
            cursor = db.execute("DELETE FROM api_tokens WHERE id = ?", (id,))
            if cursor.rowcount == 0:
                raise NoSuchToken(f"no API token with id {id}")

    def check_token(self, token: str) -> ApiToken | None:
        """
        The record of the API token a request offers, or L{None} when it is
        no token (unknown, deleted, or junk: empty, too long, not ASCII).

        @return: the record, with C{last_used_at} brought up to date when it
            was more than L{TOKEN_TOUCH_INTERVAL} old.
        """
        if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX):
            return None
        digest = _digest(token)
        if digest is None:
            return None
        row = self._connection.execute(
            _SELECT_TOKENS + " WHERE token_hash = ?", (digest,)
        ).fetchone()
        if row is None:
            return None
        found = _token_from_row(row)
        now = self._clock.seconds()
        if found.last_used_at is None or now - found.last_used_at >= TOKEN_TOUCH_INTERVAL:
            self._connection.execute(
                "UPDATE api_tokens SET last_used_at = ? WHERE id = ?", (now, found.id)
            )
            found = ApiToken(
                id=found.id,
                name=found.name,
                created_by=found.created_by,
                created_at=found.created_at,
                last_used_at=now,
            )
        return found

    # --- sessions -----------------------------------------------------------

    def _expired(self, now: float) -> tuple[str, tuple[float, float]]:
        return (
            "(last_seen_at < ? OR created_at < ?)",
            (now - SESSION_IDLE_SECONDS, now - SESSION_MAX_SECONDS),
        )

    def create_session(self, admin: str) -> tuple[str, AdminSession]:
        """
        Start a web session for an admin who just logged in. The admin's
        sessions that have ended are removed on the way.

        @return: the session id (for the cookie; stored only as its SHA-256
            digest) and the session, with a fresh CSRF token.
        @raise NoSuchAdmin: when there is no admin of that name.
        """
        session_id = _new_secret()
        now = self._clock.seconds()
        session = AdminSession(admin=admin, csrf=_new_secret(), created_at=now, last_seen_at=now)
        condition, times = self._expired(now)
        with transaction(self._connection) as db:
            if not self._admin_exists(admin):
                raise NoSuchAdmin(f"no admin named {admin!r}")
            db.execute(
                f"DELETE FROM admin_sessions WHERE admin = ? AND {condition}",  # noqa: S608
                (admin, *times),
            )
            db.execute(
                "INSERT INTO admin_sessions (id_hash, admin, csrf, created_at, last_seen_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (_digest(session_id), admin, session.csrf, now, now),
            )
        return session_id, session

    def get_session(self, session_id: str) -> AdminSession | None:
        """
        The session a cookie names, if it is still on.

        A session is off once it was unused for more than
        L{SESSION_IDLE_SECONDS}, or is more than L{SESSION_MAX_SECONDS} old;
        such a session is deleted. One that is on counts as used now (its
        C{last_seen_at} is written at most every L{SESSION_TOUCH_INTERVAL}).

        @return: the session, or L{None} when it is unknown, ended, or the
            id is junk.
        """
        digest = _digest(session_id)
        if digest is None:
            return None
        row = self._connection.execute(
            "SELECT admin, csrf, created_at, last_seen_at FROM admin_sessions WHERE id_hash = ?",
            (digest,),
        ).fetchone()
        if row is None:
            return None
        session = AdminSession(admin=row[0], csrf=row[1], created_at=row[2], last_seen_at=row[3])
        now = self._clock.seconds()
        if (
            now - session.last_seen_at > SESSION_IDLE_SECONDS
            or now - session.created_at > SESSION_MAX_SECONDS
        ):
            self._connection.execute("DELETE FROM admin_sessions WHERE id_hash = ?", (digest,))
            return None
        if now - session.last_seen_at >= SESSION_TOUCH_INTERVAL:
            self._connection.execute(
                "UPDATE admin_sessions SET last_seen_at = ? WHERE id_hash = ?", (now, digest)
            )
            session = AdminSession(
                admin=session.admin,
                csrf=session.csrf,
                created_at=session.created_at,
                last_seen_at=now,
            )
        return session

    def delete_session(self, session_id: str) -> None:
        """
        End a session (logging out); an unknown or junk id is no error.
        """
        digest = _digest(session_id)
        if digest is not None:
            self._connection.execute("DELETE FROM admin_sessions WHERE id_hash = ?", (digest,))

    def purge_sessions(self) -> int:
        """
        Delete every session that has ended.

        @return: how many.
        """
        condition, times = self._expired(self._clock.seconds())
        cursor = self._connection.execute(
            f"DELETE FROM admin_sessions WHERE {condition}",  # noqa: S608
            times,
        )
        return cursor.rowcount


class ThreadedAdminStore(ThreadedStore[SQLiteAdminStore]):
    """
    The admin store as the reactor reaches it: every call runs an
    L{SQLiteAdminStore} on a small pool of threads, each with its own
    connection, and answers with a L{Deferred}. bcrypt (logins, new
    passwords) thus never runs on the reactor thread.

    @ivar rounds: the bcrypt cost of new password hashes.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reactor: IReactorFromThreads,
        clock: IReactorTime,
        pool_size: int = DEFAULT_POOL_SIZE,
        rounds: int = DEFAULT_ROUNDS,
    ) -> None:
        """
        @param path: the database file; created when missing.
        @param reactor: delivers results from the threads.
        @param clock: gives times, and decides expiry.
        @param pool_size: how many threads.
        """
        self._clock = clock
        self.rounds = rounds
        super().__init__(path, reactor=reactor, size=pool_size, name="smtpgw-adminstore")

    def _open_store(self) -> SQLiteAdminStore:
        return SQLiteAdminStore.open(
            self._path, self._clock, rounds=self.rounds, check_same_thread=False
        )

    def ensure_first_admin(self) -> Deferred[str | None]:
        """
        See L{SQLiteAdminStore.ensure_first_admin}.
        """
        return self.run(lambda store: store.ensure_first_admin())

    def create_admin(self, name: str) -> Deferred[str]:
        """
        See L{SQLiteAdminStore.create_admin}.
        """
        return self.run(lambda store: store.create_admin(name))

    def admins(self) -> Deferred[list[Admin]]:
        """
        See L{SQLiteAdminStore.admins}.
        """
        return self.run(lambda store: store.admins())

    def admin_count(self) -> Deferred[int]:
        """
        See L{SQLiteAdminStore.admin_count}.
        """
        return self.run(lambda store: store.admin_count())

    def delete_admin(self, name: str) -> Deferred[None]:
        """
        See L{SQLiteAdminStore.delete_admin}.
        """
        return self.run(lambda store: store.delete_admin(name))

    def set_admin_password(self, name: str) -> Deferred[str]:
        """
        See L{SQLiteAdminStore.set_admin_password}.
        """
        return self.run(lambda store: store.set_admin_password(name))

    def check_admin(self, name: str, password: str) -> Deferred[bool]:
        """
        See L{SQLiteAdminStore.check_admin}.
        """
        return self.run(lambda store: store.check_admin(name, password))

    def create_token(self, name: str, created_by: str | None) -> Deferred[tuple[ApiToken, str]]:
        """
        See L{SQLiteAdminStore.create_token}.
        """
        return self.run(lambda store: store.create_token(name, created_by))

    def tokens(self) -> Deferred[list[ApiToken]]:
        """
        See L{SQLiteAdminStore.tokens}.
        """
        return self.run(lambda store: store.tokens())

    def delete_token(self, id: int) -> Deferred[None]:
        """
        See L{SQLiteAdminStore.delete_token}.
        """
        return self.run(lambda store: store.delete_token(id))

    def check_token(self, token: str) -> Deferred[ApiToken | None]:
        """
        See L{SQLiteAdminStore.check_token}.
        """
        return self.run(lambda store: store.check_token(token))

    def create_session(self, admin: str) -> Deferred[tuple[str, AdminSession]]:
        """
        See L{SQLiteAdminStore.create_session}.
        """
        return self.run(lambda store: store.create_session(admin))

    def get_session(self, session_id: str) -> Deferred[AdminSession | None]:
        """
        See L{SQLiteAdminStore.get_session}.
        """
        return self.run(lambda store: store.get_session(session_id))

    def delete_session(self, session_id: str) -> Deferred[None]:
        """
        See L{SQLiteAdminStore.delete_session}.
        """
        return self.run(lambda store: store.delete_session(session_id))

    def purge_sessions(self) -> Deferred[int]:
        """
        See L{SQLiteAdminStore.purge_sessions}.
        """
        return self.run(lambda store: store.purge_sessions())


# --- the login throttle -------------------------------------------------------

_MAX_DOUBLINGS: Final = 64
"""Past this many doublings every delay is capped anyway; keeps the power finite."""


def _positive(instance: object, attribute: Any, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


def _not_negative(instance: object, attribute: Any, value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, not {value!r}")


@define(kw_only=True)
class LoginThrottle:
    """
    How long an admin login attempt waits before it is answered, after
    failed ones: the pure rule, with the time passed in.

    Failures are counted per client address (an IPv6 client per /64, see
    L{address_key}: one host holds a whole /64) and per admin name, so that
    neither many names from one address nor one name from many addresses
    guess freely. The first C{free_failures} cost nothing; after that the
    wait doubles with each failure, from C{base_delay} up to C{max_delay},
    counted from the last failure. The wait slows guessing without locking
    the real admin out: at worst they wait C{max_delay}.

    A count is forgotten once C{window} seconds pass without a failure for
    it, and a success clears the address's and the name's counts (whoever
    succeeds is an admin, with nothing left to guess). At most C{max_keys}
    counts are kept; past that the one whose last failure is oldest goes.

    Concurrent attempts are the caller's to serialize: two attempts asked
    about at the same moment get the same wait.
    """

    free_failures: int = field(default=3, validator=_not_negative)
    base_delay: float = field(default=1.0, validator=_positive)
    max_delay: float = field(default=30.0, validator=_positive)
    window: float = field(default=900.0, validator=_positive)
    max_keys: int = field(default=10000, validator=_positive)
    # Key -> (failures, time of the last one); kept in the order of the last
    # failure, so the oldest is first.
    _failures: dict[str, tuple[int, float]] = field(factory=dict, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay ({self.max_delay}) must be at least base_delay ({self.base_delay})"
            )

    @property
    def tracked(self) -> int:
        """
        How many counts (addresses and names) are kept now.
        """
        return len(self._failures)

    def _keys(self, ip: str, name: str) -> tuple[str, str]:
        # A name longer than any admin's is no admin: its first characters
        # identify it enough, and bound what one key costs.
        return f"ip:{address_key(ip)}", f"name:{name[: MAX_ADMIN_NAME_LENGTH + 1]}"

    def _live(self, key: str, now: float) -> tuple[int, float] | None:
        entry = self._failures.get(key)
        if entry is None or now - entry[1] > self.window:
            return None
        return entry

    def _backoff(self, failures: int) -> float:
        if failures < self.free_failures:
            return 0.0
        doublings = min(failures - self.free_failures, _MAX_DOUBLINGS)
        return float(min(self.max_delay, self.base_delay * 2**doublings))

    def delay(self, ip: str, name: str, now: float) -> float:
        """
        How long the next login attempt from C{ip} for C{name} must wait
        before it is answered.

        @param ip: the client's address.
        @param name: the admin name the attempt is for.
        @param now: the time of the attempt.
        @return: seconds, 0 when it may be answered at once.
        """
        wait = 0.0
        for key in self._keys(ip, name):
            entry = self._live(key, now)
            if entry is not None:
                failures, last = entry
                wait = max(wait, last + self._backoff(failures) - now)
        return wait

    def failed(self, ip: str, name: str, now: float) -> None:
        """
        Count a failed login attempt from C{ip} for C{name}.
        """
        self._forget_expired(now)
        for key in self._keys(ip, name):
            entry = self._live(key, now)
            failures = 0 if entry is None else entry[0]
            # Re-inserted so that the dictionary stays in last-failure order.
            self._failures.pop(key, None)
            self._failures[key] = (failures + 1, now)
        while len(self._failures) > self.max_keys:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, ip: str, name: str, now: float) -> None:
        """
        Clear the counts of C{ip} and C{name} after a successful login.
        """
        for key in self._keys(ip, name):
            self._failures.pop(key, None)

    def _forget_expired(self, now: float) -> None:
        while self._failures:
            oldest = next(iter(self._failures))
            if now - self._failures[oldest][1] <= self.window:
                return
            del self._failures[oldest]
