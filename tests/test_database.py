"""
Tests for L{smtpgw.database}: the database file, its versioned schema, and
the per-thread pool the threaded stores run on.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ParamSpec

import pytest
from twisted.internet.defer import gatherResults

from smtpgw import database
from smtpgw.database import (
    SCHEMA_VERSION,
    PerThreadPool,
    SchemaTooNew,
    StoreNotRunning,
    UnusableDatabase,
    WalIndexHeader,
    database_path,
    open_database,
    transaction,
)
from tests.twisted_support import async_test, global_reactor

P = ParamSpec("P")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return database_path(tmp_path)


def test_new_database_is_private_wal_and_current(db_path: Path) -> None:
    """
    A new database file is readable by its owner only (it holds password
    hashes), runs in WAL mode, enforces foreign keys and has the current
    schema.
    """
    connection = open_database(db_path)
    try:
        assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert connection.execute("PRAGMA busy_timeout").fetchone()[0] > 0
        assert connection.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)
        ]
        tables = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        assert {"lists", "users", "alerts", "schema_version"} <= tables
    finally:
        connection.close()


def test_database_data_dir_path() -> None:
    """
    The database lives at C{<data-dir>/smtpgw.db}.
    """
    assert database_path("/srv/gw") == Path("/srv/gw/smtpgw.db")


def test_newer_schema_is_refused(db_path: Path) -> None:
    """
    A database written by a newer smtpgw is not opened, and the error says
    which versions and what to do.
    """
    open_database(db_path).close()
    with sqlite3.connect(db_path) as raw:
        raw.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    raw.close()
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}.*upgrade smtpgw"):
        open_database(db_path)


def test_non_sqlite_file_is_refused_clearly(db_path: Path) -> None:
    """
    A file that is not SQLite gives an error naming it, not a traceback.
    """
    db_path.write_bytes(b"this is not a database at all\n" * 100)
    with pytest.raises(UnusableDatabase, match="not a usable smtpgw database") as e:
        open_database(db_path)
    assert str(db_path) in str(e.value)


def test_other_applications_database_is_refused(db_path: Path) -> None:
    """
    An SQLite database with tables but no smtpgw schema is left alone.
    """
    with sqlite3.connect(db_path) as raw:
        raw.execute("CREATE TABLE customers (id INTEGER)")
    raw.close()
    with pytest.raises(UnusableDatabase, match="not an smtpgw one"):
        open_database(db_path)
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT name FROM sqlite_master").fetchall() == [("customers",)]
    raw.close()


def test_missing_database_without_create(db_path: Path) -> None:
    """
    Read-only callers get a clear error, and no file appears.
    """
    with pytest.raises(UnusableDatabase, match="no database at"):
        open_database(db_path, create=False)
    assert not db_path.exists()


def test_directory_instead_of_database(db_path: Path) -> None:
    """
    A directory where the file should be is reported as such.
    """
    db_path.mkdir()
    with pytest.raises(UnusableDatabase, match="is a directory"):
        open_database(db_path)


def _open_at_version_1(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Make a database as smtpgw's first schema version left it.
    """
    with monkeypatch.context() as m:
        m.setattr(database, "MIGRATIONS", {1: database.MIGRATIONS[1]})
        m.setattr(database, "SCHEMA_VERSION", 1)
        open_database(db_path).close()


def test_migrations_run_in_order_once(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A database at version 1 gets the later migrations, in version order,
    each once; the next open runs none.
    """
    _open_at_version_1(db_path, monkeypatch)
    ran: list[int] = []

    def make(version: int) -> Callable[[sqlite3.Connection], None]:
        def migrate(connection: sqlite3.Connection) -> None:
            ran.append(version)
            connection.execute(f"CREATE TABLE t{version} (x INTEGER)")

        return migrate

    monkeypatch.setattr(
        database, "MIGRATIONS", {3: make(3), 1: database.MIGRATIONS[1], 2: make(2)}
    )
    monkeypatch.setattr(database, "SCHEMA_VERSION", 3)
    open_database(db_path).close()
    open_database(db_path).close()
    assert ran == [2, 3]
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT version FROM schema_version").fetchone() == (3,)
    raw.close()


def test_failed_migration_leaves_the_previous_version(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A migration that fails half-way is rolled back with the version number,
    so the next start tries it again from a known state.
    """
    _open_at_version_1(db_path, monkeypatch)

    def broken(connection: sqlite3.Connection) -> None:
        connection.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(database, "MIGRATIONS", {1: database.MIGRATIONS[1], 2: broken})
    monkeypatch.setattr(database, "SCHEMA_VERSION", 2)
    with pytest.raises(RuntimeError, match="migration bug"):
        open_database(db_path)
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("SELECT version FROM schema_version").fetchone() == (1,)
        assert (
            raw.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchall() == []
        )
    raw.close()


def test_transaction_commits_or_rolls_back(db_path: Path) -> None:
    """
    A block that ends commits; a block that raises leaves nothing behind.
    """
    connection = open_database(db_path)
    try:
        with transaction(connection) as db:
            db.execute("INSERT INTO lists (name, created_at) VALUES ('kept', 0)")

        def aborted() -> None:
            with transaction(connection) as db:
                db.execute("INSERT INTO lists (name, created_at) VALUES ('dropped', 0)")
                raise RuntimeError("abort")

        with pytest.raises(RuntimeError):
            aborted()
        assert connection.execute("SELECT name FROM lists").fetchall() == [("kept",)]
    finally:
        connection.close()


class Resource:
    """
    Stands for a connection: remembers its thread and whether it was closed.
    """

    def __init__(self) -> None:
        self.thread = threading.current_thread()
        self.closed = False

    def close(self) -> None:
        self.closed = True


@async_test
async def test_pool_gives_each_thread_its_own_resource_and_closes_them() -> None:
    """
    Work runs in the pool's threads, each with the resource made there;
    stopping closes them all; after a stop, work fails instead of hanging,
    and a restart makes fresh resources.
    """
    made: list[Resource] = []

    def factory() -> Resource:
        made.append(Resource())
        return made[-1]

    pool = PerThreadPool(global_reactor(), factory, size=2, name="test-pool")
    assert not pool.running
    pool.start()
    barrier = threading.Barrier(2, timeout=10)

    def meet(resource: Resource) -> Resource:
        barrier.wait()
        assert resource.thread is threading.current_thread()
        return resource

    seen = await gatherResults([pool.run(meet), pool.run(meet)])
    assert seen[0] is not seen[1]
    assert all(r.thread is not threading.main_thread() for r in seen)
    again = await pool.run(lambda r: r)
    assert again in seen
    assert len(made) == 2
    pool.stop()
    assert all(r.closed for r in made)
    with pytest.raises(StoreNotRunning, match="test-pool"):
        await pool.run(lambda r: r)
    pool.start()
    fresh = await pool.run(lambda r: r)
    assert fresh not in made[:2]
    assert not fresh.closed
    pool.stop()
    assert fresh.closed


@async_test
async def test_pool_errors_arrive_as_failures_and_a_failed_factory_is_retried() -> None:
    """
    What a function raises fails its L{Deferred}, with the same exception;
    when making a thread's resource fails, that call fails and the next one
    in that thread tries again.
    """
    attempts: list[int] = []

    def factory() -> Resource:
        attempts.append(1)
        if len(attempts) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return Resource()

    def boom(resource: Resource) -> None:
        raise KeyError("nothing")

    pool = PerThreadPool(global_reactor(), factory, size=1, name="test-pool")
    pool.start()
    try:
        with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
            await pool.run(lambda r: r)
        resource = await pool.run(lambda r: r)
        assert isinstance(resource, Resource)
        with pytest.raises(KeyError):
            await pool.run(boom)
        assert (await pool.run(lambda r: r)) is resource
        assert len(attempts) == 2
    finally:
        pool.stop()
    assert resource.closed


@async_test
async def test_pool_stop_finishes_the_work_given_before_it() -> None:
    """
    Work queued before a stop still runs (a login record must be written)
    before the threads end and the resources close.
    """
    gate = threading.Event()
    started = threading.Event()
    ran: list[str] = []

    def held(resource: Resource) -> None:
        started.set()
        assert gate.wait(timeout=30)
        ran.append("held")

    def queued(resource: Resource) -> None:
        assert not resource.closed
        ran.append("queued")

    pool = PerThreadPool(global_reactor(), Resource, size=1, name="test-pool")
    pool.start()
    first = pool.run(held)
    second = pool.run(queued)
    assert started.wait(timeout=30)
    gate.set()
    pool.stop()
    assert ran == ["held", "queued"]
    await first
    await second
    assert not pool.running


# --- the wal-index header: has anything been committed since? ----------------


@pytest.fixture
def held(db_path: Path) -> Iterator[sqlite3.Connection]:
    """
    A connection to a new database, open for the whole test, as a
    L{PerThreadPool}'s connections are while its header is read.
    """
    connection = open_database(db_path, create=True)
    yield connection
    connection.close()


def test_wal_index_header_changes_with_each_commit_from_any_process(
    db_path: Path, held: sqlite3.Connection
) -> None:
    """
    The header reads the same until something is committed, by another
    connection or another process, and differs after each commit; reads
    change nothing.
    """
    header = WalIndexHeader()
    assert header.open(held)
    first = header.read()
    assert first is not None
    held.execute("SELECT * FROM lists").fetchall()
    assert header.read() == first
    with sqlite3.connect(db_path, isolation_level=None) as other:
        other.execute("INSERT INTO lists (name, created_at) VALUES ('a', 0)")
    other.close()
    second = header.read()
    assert second not in (None, first)
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute(\"UPDATE lists SET name = 'b'\")\n"
            "c.close()",
            str(db_path),
        ],
        check=True,
    )
    third = header.read()
    assert third not in (None, first, second)
    # A checkpoint that empties the WAL, then a commit that starts it over.
    held.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    held.execute("INSERT INTO lists (name, created_at) VALUES ('c', 0)")
    assert header.read() not in (None, first, second, third)
    header.close()
    assert header.read() is None


def test_wal_index_header_is_unknown_without_wal(db_path: Path) -> None:
    """
    A database not in WAL mode has no shared memory: the header is not
    found, and reads as unknown.
    """
    connection = sqlite3.connect(db_path)
    connection.execute("PRAGMA journal_mode = DELETE")
    connection.execute("CREATE TABLE t (x)")
    header = WalIndexHeader()
    assert not header.open(connection)
    assert header.read() is None
    connection.close()


def test_wal_index_header_is_unknown_before_open() -> None:
    """
    Nothing is read before L{WalIndexHeader.open}.
    """
    assert WalIndexHeader().read() is None


def test_wal_index_header_is_the_one_sqlite_uses_behind_a_link(
    tmp_path: Path,
) -> None:
    """
    A database opened through a symbolic link keeps its shared memory
    beside the file the link points to, as SQLite resolves it: that file
    is read, not a stale one left beside the link.
    """
    (tmp_path / "real").mkdir()
    (tmp_path / "link").mkdir()
    real = database_path(tmp_path / "real")
    open_database(real, create=True).close()
    linked = tmp_path / "link" / real.name
    linked.symlink_to(real)
    one = _HEADER.pack(*_FIELDS)
    Path(f"{linked}-shm").write_bytes(one + one + bytes(40))
    connection = open_database(linked)
    header = WalIndexHeader()
    assert header.open(connection)
    first = header.read()
    assert first is not None
    assert not first.endswith(one)
    connection.execute("INSERT INTO lists (name, created_at) VALUES ('a', 0)")
    assert header.read() not in (None, first)
    connection.close()


def test_wal_index_header_after_the_database_was_let_go_never_matches(
    db_path: Path,
) -> None:
    """
    When the last connection closes, SQLite deletes the shared memory; the
    next connection makes a new one, whose header can read as the old one
    did although the database changed in between. A header opened again
    never gives a token equal to one given before.
    """
    header = WalIndexHeader()
    connection = open_database(db_path, create=True)
    assert header.open(connection)
    before = header.read()
    header.close()
    connection.close()
    changed = open_database(db_path)
    changed.execute("INSERT INTO lists (name, created_at) VALUES ('a', 0)")
    changed.close()
    connection = open_database(db_path)
    assert header.open(connection)
    after = header.read()
    assert after is not None
    assert before is not None
    assert after != before
    connection.close()


def test_wal_index_header_file_stays_open_with_the_process(
    db_path: Path, held: sqlite3.Connection
) -> None:
    """
    Closing any descriptor of a file drops the POSIX locks of the whole
    process on it, SQLite's among them: the shared memory is opened once
    for every header of the database, and closing a header keeps it open.
    Once SQLite has deleted it (the last connection closed), it is closed
    the next time a file is opened.
    """
    first, second = WalIndexHeader(), WalIndexHeader()
    assert first.open(held)
    assert second.open(held)
    fd = database._shared_memory_files[f"{db_path}-shm"]
    first.close()
    second.close()
    shared_memory = os.fstat(fd)
    assert (shared_memory.st_ino, shared_memory.st_nlink) == (
        os.stat(f"{db_path}-shm").st_ino,
        1,
    )
    held.close()
    assert not Path(f"{db_path}-shm").exists()
    other = open_database(db_path.parent / "other.db", create=True)
    assert WalIndexHeader().open(other)
    assert f"{db_path}-shm" not in database._shared_memory_files
    # Closed: the number is free, or was given to another file since.
    assert _file_of(fd) != (shared_memory.st_dev, shared_memory.st_ino)
    other.close()


def _file_of(fd: int) -> tuple[int, int] | None:
    """
    @return: the device and inode of the file open as C{fd}, or L{None}.
    """
    try:
        found = os.fstat(fd)
    except OSError:
        return None
    return found.st_dev, found.st_ino


_HEADER = struct.Struct("=IIIBBHIIIIIIII")
_FIELDS = (3007000, 0, 7, 1, 0, 4096, 3, 2, 1, 2, 3, 4, 5, 6)


@pytest.fixture
def header_reading(
    tmp_path: Path,
    held: sqlite3.Connection,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> Callable[[bytes], WalIndexHeader]:
    """
    @return: makes a header that reads the given bytes as the shared memory
        of the database C{held} has open (its file closed when the test
        ends).
    """

    def reading(data: bytes) -> WalIndexHeader:
        fake = tmp_path / f"fake-{os.urandom(4).hex()}-shm"
        fake.write_bytes(data)
        fd = os.open(fake, os.O_RDONLY)
        request.addfinalizer(lambda: os.close(fd))
        monkeypatch.setattr(database, "_hold_open", lambda path: fd)
        header = WalIndexHeader()
        assert header.open(held)
        return header

    return reading


@pytest.mark.parametrize("length", [0, 95, 96])
def test_wal_index_header_cut_short_is_unknown(
    header_reading: Callable[[bytes], WalIndexHeader], length: int
) -> None:
    """
    Both copies of the header are needed: 96 bytes, and one short is
    unknown (a file SQLite just truncated, say).
    """
    one = _HEADER.pack(*_FIELDS)
    header = header_reading((one + one)[:length])
    token = header.read()
    assert (token is not None and token.endswith(one)) is (length == 96)


@pytest.mark.parametrize("damage", ["copies-differ", "other-version", "not-initialized"])
def test_wal_index_header_in_doubt_is_unknown(
    header_reading: Callable[[bytes], WalIndexHeader], damage: str
) -> None:
    """
    Two copies that differ (a commit is rewriting them), a version this
    code does not know, and a header not yet initialized all read as
    unknown, never as a token that could match.
    """
    good = _HEADER.pack(*_FIELDS)
    changed = list(_FIELDS)
    if damage == "copies-differ":
        changed[2] += 1
        data = good + _HEADER.pack(*changed)
    else:
        if damage == "other-version":
            changed[0] += 1
        else:
            changed[3] = 0
        data = _HEADER.pack(*changed) * 2
    assert header_reading(data + bytes(40)).read() is None


def test_wal_index_header_whose_descriptor_names_another_file_is_unknown(
    header_reading: Callable[[bytes], WalIndexHeader],
) -> None:
    """
    Should the descriptor's number come to name another file (closed and
    given again), the header reads as unknown, not as that file's header.
    """
    one = _HEADER.pack(*_FIELDS)
    header = header_reading(one + one)
    assert header.read() is not None
    other = header_reading(one + one)
    assert other.read() is not None
    opened, replacing = header._opened, other._opened
    assert opened is not None
    assert replacing is not None
    os.dup2(replacing.fd, opened.fd)
    assert header.read() is None


def test_wal_index_header_of_a_deleted_file_is_unknown(
    db_path: Path, held: sqlite3.Connection
) -> None:
    """
    A shared-memory file deleted under the gateway (by hand, say) is no
    longer the one other processes use: its header reads as unknown.
    """
    header = WalIndexHeader()
    assert header.open(held)
    assert header.read() is not None
    os.unlink(f"{db_path}-shm")
    assert header.read() is None
