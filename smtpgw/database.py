"""
The SQLite database of a data directory: its file, its versioned schema, and
the threads that use it.

The database (C{<data-dir>/smtpgw.db}) holds the lists, the SMTP+ users and
the alerts. It runs in WAL mode with a busy timeout, so C{smtpgw-admin} can
read and change it while the gateway runs. Its schema is versioned:
L{MIGRATIONS} are applied in order when it is opened, and a database made by
a newer gateway is refused rather than misread.
"""

from __future__ import annotations

import itertools
import os
import queue
import sqlite3
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Generic, Protocol, Self, TypeAlias, TypeVar

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

__all__ = [
    "BUSY_TIMEOUT",
    "DB_FILENAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PerThreadPool",
    "SQLiteStore",
    "SchemaTooNew",
    "StoreError",
    "StoreNotRunning",
    "ThreadedStore",
    "UnusableDatabase",
    "WalIndexHeader",
    "database_path",
    "open_database",
    "transaction",
]

T = TypeVar("T")

DB_FILENAME: Final = "smtpgw.db"

BUSY_TIMEOUT: Final = 10.0
"""Seconds a connection waits for another one's write lock before failing."""


class StoreError(Exception):
    """
    A store of the database cannot do what was asked; the message says why, in one line.
    """


class UnusableDatabase(StoreError):
    """
    The database file cannot be opened as an smtpgw database.
    """


class SchemaTooNew(UnusableDatabase):
    """
    The database was made by a newer smtpgw than this one.
    """


class StoreNotRunning(StoreError):
    """
    A threaded store is not started, or was stopped.
    """


def _migrate_1(connection: sqlite3.Connection) -> None:
    statements = [
        """
        CREATE TABLE lists (
            name TEXT PRIMARY KEY NOT NULL,
            created_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE users (
            username TEXT PRIMARY KEY NOT NULL,
            list TEXT NOT NULL REFERENCES lists (name) ON DELETE RESTRICT,
            password_hash BLOB NOT NULL,
            active INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
            priority INTEGER NOT NULL DEFAULT 3 CHECK (priority BETWEEN 1 AND 5),
            notes TEXT NOT NULL DEFAULT '',
            authorized_domains TEXT NOT NULL DEFAULT '[]',
            authorized_senders TEXT NOT NULL DEFAULT '[]',
            enforcement TEXT NOT NULL DEFAULT 'enforce'
                CHECK (enforcement IN ('enforce', 'monitor')),
            created_at REAL NOT NULL,
            last_used_at REAL,
            last_used_ip TEXT
        )
        """,
        "CREATE INDEX users_by_list ON users (list, username)",
        """
        CREATE TABLE alerts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            type TEXT NOT NULL,
            list TEXT,
            message TEXT NOT NULL,
            details TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            read INTEGER NOT NULL DEFAULT 0 CHECK (read IN (0, 1))
        )
        """,
        "CREATE INDEX alerts_by_list ON alerts (list, id)",
        "CREATE INDEX alerts_by_type ON alerts (type, id)",
    ]
    for statement in statements:
        connection.execute(statement)


def _migrate_2(connection: sqlite3.Connection) -> None:
    statements = [
        """
        CREATE TABLE admins (
            name TEXT PRIMARY KEY NOT NULL,
            password_hash BLOB NOT NULL,
            created_at REAL NOT NULL,
            last_login_at REAL
        )
        """,
        """
        CREATE TABLE api_tokens (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            token_hash BLOB NOT NULL UNIQUE,
            created_by TEXT,
            created_at REAL NOT NULL,
            last_used_at REAL
        )
        """,
        """
        CREATE TABLE admin_sessions (
            id_hash BLOB PRIMARY KEY NOT NULL,
            admin TEXT NOT NULL REFERENCES admins (name) ON DELETE CASCADE,
            csrf TEXT NOT NULL,
            created_at REAL NOT NULL,
            last_seen_at REAL NOT NULL
        )
        """,
        "CREATE INDEX admin_sessions_by_admin ON admin_sessions (admin)",
        """
        CREATE TABLE daily_stats (
            day TEXT NOT NULL,
            list TEXT NOT NULL,
            accepted INTEGER NOT NULL DEFAULT 0,
            delivered INTEGER NOT NULL DEFAULT 0,
            deferred INTEGER NOT NULL DEFAULT 0,
            bounced INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (day, list)
        )
        """,
    ]
    for statement in statements:
        connection.execute(statement)


def _migrate_3(connection: sqlite3.Connection) -> None:
    statements = [
        """
        CREATE TABLE recipients (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            list TEXT NOT NULL REFERENCES lists (name) ON DELETE CASCADE,
            email TEXT NOT NULL,
            fields TEXT NOT NULL DEFAULT '{}',
            status TEXT NOT NULL DEFAULT 'subscribed'
                CHECK (status IN ('subscribed', 'unsubscribed', 'bounced')),
            created_at REAL NOT NULL,
            changed_at REAL,
            UNIQUE (list, email)
        )
        """,
        "CREATE INDEX recipients_by_list ON recipients (list, id)",
        """
        CREATE TABLE campaigns (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            list TEXT NOT NULL REFERENCES lists (name) ON DELETE RESTRICT,
            subject TEXT NOT NULL,
            text TEXT,
            html TEXT,
            sender TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 3 CHECK (priority BETWEEN 1 AND 5),
            send_at REAL,
            created_at REAL NOT NULL,
            created_by TEXT,
            state TEXT NOT NULL DEFAULT 'scheduled'
                CHECK (state IN ('scheduled', 'sending', 'paused', 'finished', 'cancelled')),
            paused_by_admin INTEGER NOT NULL DEFAULT 0 CHECK (paused_by_admin IN (0, 1)),
            cursor INTEGER NOT NULL DEFAULT 0,
            total INTEGER,
            sent INTEGER NOT NULL DEFAULT 0,
            in_doubt INTEGER NOT NULL DEFAULT 0,
            started_at REAL,
            finished_at REAL
        )
        """,
        "CREATE INDEX campaigns_by_state ON campaigns (state, id)",
        """
        CREATE TABLE settings (
            name TEXT PRIMARY KEY NOT NULL,
            value BLOB NOT NULL
        )
        """,
    ]
    for statement in statements:
        connection.execute(statement)


def _migrate_4(connection: sqlite3.Connection) -> None:
    statements = [
        # What keeps a send paused when no admin paused it (the runner
        # writes it: "priority-1 SMTP+ traffic", "queue stopped").
        "ALTER TABLE campaigns ADD COLUMN paused_reason TEXT",
        # The last recipient (by id) of the list when the send started:
        # later imports do not join a send under way.
        "ALTER TABLE campaigns ADD COLUMN last_recipient_id INTEGER",
        "ALTER TABLE campaigns ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE campaigns ADD COLUMN bounced INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE campaigns ADD COLUMN deferred INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE campaigns ADD COLUMN rate REAL NOT NULL DEFAULT 0",
        "ALTER TABLE campaigns ADD COLUMN updated_at REAL",
    ]
    for statement in statements:
        connection.execute(statement)


MIGRATIONS: Final[Mapping[int, Callable[[sqlite3.Connection], None]]] = {
    1: _migrate_1,
    2: _migrate_2,
    3: _migrate_3,
    4: _migrate_4,
}
"""
Schema changes by the version they bring the database to. Each runs inside
the one transaction that also records the new version, so a crash leaves the
schema at a known version. Append, never edit: version 2 brings the
admin accounts, API tokens, admin sessions and daily statistics;
version 3 the lists' recipients, console sends (campaigns) and settings
(secrets the gateway generates once, such as the unsubscribe-link key);
version 4 what the campaign runner records of a send under way (why it is
paused, its last recipient, delivered, bounced and deferred counts, its
current rate).
"""

SCHEMA_VERSION: Final = max(MIGRATIONS)


def database_path(data_dir: str | os.PathLike[str]) -> Path:
    """
    Where the database of a data directory is.
    """
    return Path(data_dir) / DB_FILENAME


def _stored_version(connection: sqlite3.Connection, path: Path) -> int:
    tables = {
        row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    if "schema_version" not in tables:
        if tables:
            raise UnusableDatabase(f"{path} is an SQLite database, but not an smtpgw one")
        return 0
    row = connection.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row is not None else 0


def _refuse_newer(version: int, path: Path) -> None:
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"{path} has schema version {version}, newer than the {SCHEMA_VERSION} this "
            "smtpgw knows: upgrade smtpgw"
        )


def _migrate(connection: sqlite3.Connection, path: Path) -> None:
    version = _stored_version(connection, path)
    _refuse_newer(version, path)
    if version == SCHEMA_VERSION:
        return
    # Another process (the gateway, a second CLI) may be migrating too: the
    # write lock serializes them, and the version is read again under it.
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = _stored_version(connection, path)
        _refuse_newer(version, path)
        if version == 0:
            connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            connection.execute("INSERT INTO schema_version (version) VALUES (0)")
        for target in sorted(MIGRATIONS):
            if target > version:
                MIGRATIONS[target](connection)
                connection.execute("UPDATE schema_version SET version = ?", (target,))
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def open_database(
    path: str | os.PathLike[str],
    *,
    create: bool = True,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """
    Open the smtpgw database, bringing its schema up to date.

    @param path: the database file.
    @param create: make the file (mode 0600: it holds password hashes) when
        it does not exist; when L{False}, a missing file is an error.
    @param check_same_thread: passed to L{sqlite3.connect}.
    @return: a connection in autocommit mode (transactions are explicit),
        with foreign keys enforced.
    @raise UnusableDatabase: missing, unreadable, not SQLite, not smtpgw's,
        or corrupt; L{SchemaTooNew} when made by a newer smtpgw.
    """
    path = Path(path)
    if path.is_dir():
        raise UnusableDatabase(f"{path} is a directory, not a database file")
    if not path.exists():
        if not create:
            raise UnusableDatabase(f"no database at {path} (wrong data directory?)")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        except OSError as e:
            raise UnusableDatabase(f"cannot create {path}: {e.strerror}") from e
    try:
        connection = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=check_same_thread,
        )
    except sqlite3.Error as e:
        raise UnusableDatabase(f"cannot open {path}: {e}") from e
    try:
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
        connection.execute("PRAGMA foreign_keys = ON")
        connection.execute("PRAGMA journal_mode = WAL")
        # User changes are rare and an admin was shown the password: keep them.
        connection.execute("PRAGMA synchronous = FULL")
        _migrate(connection, path)
    except sqlite3.OperationalError as e:
        connection.close()
        raise UnusableDatabase(f"cannot use {path}: {e}") from e
    except sqlite3.DatabaseError as e:
        connection.close()
        raise UnusableDatabase(f"{path} is not a usable smtpgw database: {e}") from e
    except BaseException:
        connection.close()
        raise
    return connection


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """
    A write transaction on a connection from L{open_database}.

    It takes the write lock up front (C{BEGIN IMMEDIATE}), so that checks
    made inside it still hold when it writes; it commits when the block
    ends, and rolls back when the block raises.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


_WAL_INDEX_HEADER: Final = struct.Struct("=IIIBBHIIIIIIII")
"""One copy of the wal-index header (C{WalIndexHdr}): version, unused, change
counter, initialized, byte order, page size, last frame, pages, frame
checksums, salts, header checksums; in the machine's byte order."""

_WAL_INDEX_VERSION: Final = 3007000

_shared_memory_files: dict[str, int] = {}
"""The shared-memory files L{WalIndexHeader} reads, by path: each opened once
and kept open (see L{_hold_open})."""

_shared_memory_lock = threading.Lock()
_header_openings = itertools.count(1)


def _hold_open(path: str) -> int:
    """
    @return: a descriptor open for reading on the file at C{path}, the same
        for every caller while the file is the one at C{path}.

    It is never closed while the file exists: SQLite's locks on the file are
    POSIX record locks, which belong to the process, and closing I{any}
    descriptor of the file would drop the locks of every connection of this
    process (letting another process reset the shared memory under them).
    Once the file is deleted (SQLite deletes it when the last connection
    anywhere closes the database) no connection holds a lock on it, and the
    descriptor is closed the next time a file is opened here.
    """
    with _shared_memory_lock:
        for known, held_fd in list(_shared_memory_files.items()):
            if os.fstat(held_fd).st_nlink == 0:
                del _shared_memory_files[known]
                os.close(held_fd)
        fd = _shared_memory_files.get(path)
        if fd is not None:
            try:
                current = os.stat(path)
            except OSError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (
                held.st_dev,
                held.st_ino,
            ):
                return fd
            # Another file is at the path now: the one held stays open until
            # it is deleted (checked above, next time).
            del _shared_memory_files[path]
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        _shared_memory_files[path] = fd
        return fd


@frozen
class _OpenedHeader:
    """
    The shared-memory file a L{WalIndexHeader} reads, as it was found.

    @ivar series: begins every token of this opening.
    """

    fd: int
    device: int
    inode: int
    series: bytes


class WalIndexHeader:
    """
    Tells whether anything was committed to a database in WAL mode since an
    earlier moment, without a query and without a lock.

    SQLite keeps the header of the wal-index at the start of the database's
    shared-memory file (C{<database>-shm}), twice over, and every commit
    rewrites it as it makes the commit visible to readers: the change
    counter, the last frame, the running checksums and, when the WAL starts
    over, the salts all move (U{https://www.sqlite.org/walformat.html};
    C{PRAGMA data_version} is read from the same header). So two equal reads
    of the same file mean that no commit became visible between them, by
    any process that uses the database in WAL mode, which is the only mode
    a database can be switched to or written in while a connection has it
    open in WAL mode. A read is one C{pread} of 96 bytes and one C{fstat},
    cheap enough for the reactor thread: no SQLite call, no file lock,
    nothing that waits.

    The file is only the same while a connection holds the database: when
    the last one closes, SQLite deletes the file, and the next connection
    makes a new one whose header may read exactly as the old one did. So
    L{open} is given a connection, which must stay open for as long as the
    header is read, and every L{open} after L{close} starts a new series of
    tokens that never equals an earlier one. (C{pread} rather than a
    mapping: a file cut short gives a short read, where a mapping would
    kill the process with C{SIGBUS}.)
    """

    def __init__(self) -> None:
        # Replaced whole, so that a read never mixes two openings.
        self._opened: _OpenedHeader | None = None
        self._lock = threading.Lock()

    def open(self, connection: sqlite3.Connection) -> bool:
        """
        Find the shared-memory file of the database C{connection} has open
        (the file SQLite uses, symbolic links resolved as SQLite resolves
        them), unless it is found already.

        @return: whether it is found: not when the database is not in WAL
            mode (there is no such file), or cannot be told.
        """
        with self._lock:
            if self._opened is not None:
                return True
            try:
                (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
                files = {row[1]: row[2] for row in connection.execute("PRAGMA database_list")}
                if mode != "wal" or not files.get("main"):
                    return False
                fd = _hold_open(f"{files['main']}-shm")
                found = os.fstat(fd)
            except (sqlite3.Error, OSError):
                return False
            series = next(_header_openings).to_bytes(8, "big")
            self._opened = _OpenedHeader(fd, found.st_dev, found.st_ino, series)
            return True

    def read(self) -> bytes | None:
        """
        @return: a token of the header as it is now, for comparing with a
            later read; L{None} when it is unknown: the file is not open (or
            is closed), deleted, too short, not a header this code knows,
            or the two copies differ (a commit is rewriting them).
        """
        opened = self._opened
        if opened is None:
            return None
        try:
            both = os.pread(opened.fd, 2 * _WAL_INDEX_HEADER.size, 0)
            now = os.fstat(opened.fd)
        except OSError:
            return None
        header = both[: _WAL_INDEX_HEADER.size]
        if (
            # Deleted, or the descriptor's number now names another file.
            now.st_nlink == 0
            or (now.st_dev, now.st_ino) != (opened.device, opened.inode)
            or len(both) != 2 * _WAL_INDEX_HEADER.size
            or both[_WAL_INDEX_HEADER.size :] != header
        ):
            return None
        version, _, _, initialized, *_ = _WAL_INDEX_HEADER.unpack(header)
        if version != _WAL_INDEX_VERSION or not initialized:
            return None
        return opened.series + header

    def close(self) -> None:
        """
        Stop reading: L{read} gives L{None} from now on, until L{open}. The
        file itself stays open with the process (see L{_hold_open}).
        """
        with self._lock:
            self._opened = None


class Closeable(Protocol):
    """
    What each thread of a L{PerThreadPool} holds: something to close at the end.
    """

    def close(self) -> None: ...


C = TypeVar("C", bound=Closeable)

_Job: TypeAlias = tuple[Deferred[T], Callable[[C], T]]


class PerThreadPool(Generic[C]):
    """
    A fixed number of threads, each with its own resource (an SQLite
    connection must not be shared between threads), made on first use in
    that thread and closed when the pool stops.

    Every login costs one hop here, so the hop is kept lean: one queue the
    threads take work from, and results handed back with
    L{IReactorFromThreads.callFromThread}. (L{twisted.python.threadpool}
    spends as much again per call coordinating its workers and copying the
    logging context, which this pool does not need.)
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        factory: Callable[[], C],
        *,
        size: int,
        name: str,
    ) -> None:
        """
        @param reactor: delivers results from the threads.
        @param factory: makes a thread's resource; called in that thread.
        @param size: how many threads.
        @param name: names the threads, for debugging.
        """
        self._reactor = reactor
        self._factory = factory
        self._size = size
        self._name = name
        self._work: queue.SimpleQueue[_Job[Any, C] | None] | None = None
        self._threads: list[threading.Thread] = []
        self._resources: list[C] = []
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """
        Whether L{run} runs functions (between L{start} and L{stop}).
        """
        return self._work is not None

    def start(self) -> None:
        """
        Start the threads. A stopped pool may be started again.
        """
        if self._work is not None:
            return
        work: queue.SimpleQueue[_Job[Any, C] | None] = queue.SimpleQueue()
        # Daemon threads: a pool nobody stopped (a crash) must not keep the
        # process alive; the orderly path joins them in stop().
        self._threads = [
            threading.Thread(
                target=self._serve, args=(work,), name=f"{self._name}-{i}", daemon=True
            )
            for i in range(self._size)
        ]
        for thread in self._threads:
            thread.start()
        self._work = work

    def stop(self) -> None:
        """
        Let the threads finish the work they were given, join them, and
        close their resources. Blocks until then: call it when stopping.
        """
        work, self._work = self._work, None
        threads, self._threads = self._threads, []
        if work is not None:
            for _ in threads:
                work.put(None)
            for thread in threads:
                thread.join()
        with self._lock:
            resources, self._resources = self._resources, []
        for resource in resources:
            resource.close()

    def _make_resource(self) -> C:
        resource = self._factory()
        with self._lock:
            self._resources.append(resource)
        return resource

    def _serve(self, work: queue.SimpleQueue[_Job[Any, C] | None]) -> None:
        call_from_thread = self._reactor.callFromThread
        resource: C | None = None
        while (job := work.get()) is not None:
            done, f = job
            try:
                if resource is None:
                    resource = self._make_resource()
                result = f(resource)
            except BaseException:
                call_from_thread(done.errback, Failure())
            else:
                call_from_thread(done.callback, result)

    def run(self, f: Callable[[C], T]) -> Deferred[T]:
        """
        Call C{f} with the resource of the thread that runs it.

        @return: what C{f} returns, or fails with what it raised, or with
            L{StoreNotRunning} when the pool is not running.
        """
        work = self._work
        if work is None:
            return fail(StoreNotRunning(f"{self._name} is not running"))
        done: Deferred[T] = Deferred()
        work.put((done, f))
        return done


class SQLiteStore:
    """
    What every synchronous store of the database shares: one connection,
    closed by L{close} or at the end of a C{with} block.
    """

    _connection: sqlite3.Connection

    def close(self) -> None:
        """
        Close the connection.
        """
        self._connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ThreadedStore(Service, Generic[C]):
    """
    A synchronous store as the reactor reaches it: L{run} calls a function
    with the store of one of a few threads (each with its own connection)
    and answers with a L{Deferred}. Subclasses say how a thread's store is
    opened (L{_open_store}) and add the methods they offer over L{run}.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reactor: IReactorFromThreads,
        size: int,
        name: str,
    ) -> None:
        """
        @param path: the database file; created when missing.
        @param reactor: delivers results from the threads.
        @param size: how many threads.
        @param name: names the threads, for debugging.
        """
        self._path = Path(path)
        self._threads: PerThreadPool[C] = PerThreadPool(
            reactor, self._open_store, size=size, name=name
        )

    def _open_store(self) -> C:
        """
        Open this thread's store (on that thread; it is closed by the pool
        once the thread is done, so it must not check the thread).
        """
        raise NotImplementedError

    def startService(self) -> None:
        """
        Open the database (so a bad one stops the start with a clear
        error), then start the threads.
        """
        open_database(self._path, create=True).close()
        self._threads.start()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        """
        Let the threads finish what they were given, and close their
        connections.
        """
        super().stopService()
        self._threads.stop()
        return None

    def run(self, f: Callable[[C], T]) -> Deferred[T]:
        """
        Call C{f} with this thread's store, in the pool.

        @return: what C{f} returns, or fails with what it raised, or with
            L{StoreNotRunning}.
        """
        return self._threads.run(f)
