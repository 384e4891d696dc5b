"""
Tests for L{smtpgw.journal}: durability before acknowledgement, group
commit off the reactor thread, replay after a crash, compaction, and a full
or failing disk.

Tests that need the writer thread run on the real reactor
(C{pytest_twisted}); timers (the retry after a failed write) run on a
L{Clock} through L{SplitReactor}. The compaction rules are also checked
without threads, on the segment store, by a Hypothesis state machine.
"""

from __future__ import annotations

import base64
import errno
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ParamSpec, cast

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, Logger, LogLevel
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpgw.interfaces import IJournal, JournaledMessage, JournalLocation, JournalUnavailable
from smtpgw.journal import (
    DEFAULT_UNHURRIED_DELAY,
    GATHER_EXPECTED_MOST,
    GATHER_RECORDS,
    GATHER_WHEN_BUSY_WITHIN,
    PREALLOCATE_AHEAD,
    PREALLOCATE_WHEN_WITHIN,
    FileJournal,
    FileOps,
    JournalFormatError,
    JournalLocked,
    JournalReadError,
    _Lookup,
    _SegmentStore,
)
from smtpgw.journal_codec import (
    FORMAT_VERSION,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    SEGMENT_KEY_SIZE,
    decode_segment_header,
    encode_accept,
    encode_priority,
    encode_queue_state,
    encode_record,
    encode_segment_header,
    encode_state,
    walk_records,
)
from smtpgw.model import Envelope, Priority
from tests.twisted_support import async_test, logged_lines

WRITER_THREAD = "smtpgw-journal-writer"

P = ParamSpec("P")


def idle_reactor() -> IReactorThreads:
    """
    @return: a reactor for journals that are never started (replay only):
        they use no thread and no timer.
    """
    return cast(IReactorThreads, Clock())


def envelope(number: int, priority: Priority = Priority.NORMAL) -> Envelope:
    """
    @return: the envelope of test message C{number}.
    """
    return Envelope(
        queue_id=f"Q{number:08d}",
        list="news",
        username="u1",
        sender="a@example.com",
        recipients=("b@example.org", "c@example.org"),
        priority=priority,
        accepted_at=1_700_000_000.0 + number,
        client_ip="192.0.2.1",
        size=len(body(number)),
    )


def body(number: int, size: int = 120) -> bytes:
    """
    @return: the bytes of test message C{number}, C{size} long.
    """
    text = f"Subject: message {number}\r\n\r\n".encode()
    return (text + b"x" * size)[:size]


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:012d}.seg"


def summary(messages: list[JournaledMessage]) -> list[tuple[str, str, int, float, int]]:
    """
    @return: what replay said about each message, comparable in asserts.
    """
    return [
        (
            m.envelope.queue_id,
            m.state,
            m.attempts,
            m.next_attempt_at,
            int(m.envelope.priority),
        )
        for m in messages
    ]


@implementer(IReactorThreads, IReactorTime)
class SplitReactor:
    """
    The real reactor for threads, a L{Clock} for time: the writer thread
    reports through the reactor while the test decides when timers fire.

    @ivar from_thread_calls: how many times a thread called back.
    """

    def __init__(self, real: Any, clock: Clock) -> None:
        self._real = real
        self.clock = clock
        self.from_thread_calls = 0

    def callFromThread(
        self, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> None:
        self.from_thread_calls += 1
        self._real.callFromThread(callable, *args, **kwargs)

    def callInThread(self, callable: Callable[..., Any], *args: object, **kwargs: object) -> None:
        self._real.callInThread(callable, *args, **kwargs)

    def getThreadPool(self) -> Any:
        return self._real.getThreadPool()

    def suggestThreadPoolSize(self, size: int) -> None:
        self._real.suggestThreadPoolSize(size)

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> IDelayedCall:
        return self.clock.callLater(delay, callable, *args, **kwargs)

    def getDelayedCalls(self) -> Any:
        return self.clock.getDelayedCalls()


@attrs.define
class FaultyDisk:
    """
    L{FileOps} whose writes and syncs fail on demand, after writing part
    of the data (as a full disk does).

    @ivar write_error: errno the next writes fail with, or 0.
    @ivar sync_error: errno the next fdatasync calls fail with, or 0.
    @ivar sync_gate: when set, fdatasync waits for it (to hold a batch).
    @ivar in_sync: set while fdatasync waits at the gate.
    """

    write_error: int = 0
    sync_error: int = 0
    sync_gate: threading.Event | None = None
    in_sync: threading.Event = attrs.field(factory=threading.Event)
    syncs: int = 0

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if self.write_error:
            if len(data) > 1:
                os.pwrite(fd, data[: len(data) // 2], offset)
            raise OSError(self.write_error, os.strerror(self.write_error))
        return os.pwrite(fd, data, offset)

    def fdatasync(self, fd: int) -> None:
        if self.sync_gate is not None:
            self.in_sync.set()
            self.sync_gate.wait(10)
        if self.sync_error:
            raise OSError(self.sync_error, os.strerror(self.sync_error))
        self.syncs += 1
        os.fdatasync(fd)

    def ops(self) -> FileOps:
        return FileOps(pwrite=self.pwrite, fdatasync=self.fdatasync)


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


@pytest.fixture(autouse=True)
def _no_writer_thread_left() -> Iterator[None]:
    """
    Every test stops the journals it starts: no writer thread survives.
    """
    yield
    assert [t for t in threading.enumerate() if t.name == WRITER_THREAD] == []


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """
    @return: the text of the warnings logged during the test.
    """
    with logged_lines(LogLevel.warn) as found:
        yield found


@pytest.fixture
def infos() -> Iterator[list[str]]:
    """
    @return: the text of the informational lines logged during the test.
    """
    with logged_lines(LogLevel.info) as found:
        yield found


def started(directory: Path, reactor: Any, **options: Any) -> FileJournal:
    """
    @return: a journal on C{directory}, replayed and started.
    """
    journal = FileJournal(directory, reactor, **options)
    journal.replay()
    journal.start()
    return journal


def replayed(directory: Path, reactor: Any = None, **options: Any) -> list[JournaledMessage]:
    """
    @return: what a fresh journal on C{directory} replays (it is not
        started, so nothing is left running).
    """
    journal = FileJournal(directory, reactor or idle_reactor(), **options)
    try:
        return journal.replay()
    finally:
        journal.stop()


# The interface and the basic contract


def test_file_journal_provides_ijournal(tmp_path: Path) -> None:
    """
    L{FileJournal} provides L{IJournal}.
    """
    journal = FileJournal(tmp_path, idle_reactor())
    assert verifyObject(IJournal, journal)


@async_test
async def test_accepted_message_reads_back_and_replays(tmp_path: Path, reactor: Any) -> None:
    """
    C{accept} fires with the location of the record; C{read} gives the
    envelope and the exact bytes back; a restarted journal replays the
    message as queued with that location.
    """
    journal = started(tmp_path, reactor)
    location = await journal.accept(envelope(1), body(1))
    assert location == JournalLocation(1, SEGMENT_HEADER_SIZE, location.length)
    assert (await journal.read(location)) == (envelope(1), body(1))
    await journal.stop()
    assert replayed(tmp_path) == [JournaledMessage(envelope(1), location)]


@async_test
async def test_replay_gives_latest_state_and_leaves_final_states_out(
    tmp_path: Path, reactor: Any
) -> None:
    """
    Replay gives every message not delivered, bounced or cancelled, in
    acceptance order, with its latest state, attempts, retry time and
    priority.
    """
    journal = started(tmp_path, reactor)
    for n in range(6):
        await journal.accept(envelope(n), body(n))
    await journal.record_state("Q00000000", "deferred", 1, 100.0)
    await journal.record_state("Q00000000", "deferred", 2, 200.0, {"reason": "4.2.0 busy"})
    await journal.record_state("Q00000001", "delivered")
    await journal.record_state("Q00000002", "bounced", 3)
    await journal.record_state("Q00000003", "held")
    await journal.record_state("Q00000004", "cancelled")
    await journal.reprioritize("Q00000005", Priority.VERY_HIGH)
    await journal.record_state("Q99999999", "delivered")
    await journal.stop()
    assert summary(replayed(tmp_path)) == [
        ("Q00000000", "deferred", 2, 200.0, 3),
        ("Q00000003", "held", 0, 0.0, 3),
        ("Q00000005", "queued", 0, 0.0, 1),
    ]


@async_test
async def test_stop_writes_what_is_pending_first(tmp_path: Path, reactor: Any) -> None:
    """
    Records submitted just before C{stop} are written and acknowledged
    before it fires; after it, the journal refuses records.
    """
    journal = started(tmp_path, reactor)
    pending = [journal.accept(envelope(n), body(n)) for n in range(5)]
    await journal.stop()
    assert all(d.called for d in pending)
    locations = await gatherResults(pending)
    assert len(set(locations)) == 5
    with pytest.raises(JournalUnavailable):
        await journal.accept(envelope(9), body(9))
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == [f"Q{n:08d}" for n in range(5)]


def test_lifecycle_misuse_is_refused(tmp_path: Path) -> None:
    """
    C{replay} happens once, before C{start}; records before C{start} are
    refused; C{stop} of a journal never started just closes it.
    """
    journal = FileJournal(tmp_path, idle_reactor())
    failed: list[Any] = []
    journal.accept(envelope(1), body(1)).addErrback(failed.append)
    assert failed[0].check(JournalUnavailable)
    journal.replay()
    with pytest.raises(RuntimeError):
        journal.replay()
    assert journal.stop().called
    with pytest.raises(RuntimeError):
        journal.start()


def test_second_process_is_locked_out(tmp_path: Path) -> None:
    """
    Only one journal at a time uses a directory.
    """
    first = FileJournal(tmp_path, idle_reactor())
    first.replay()
    with pytest.raises(JournalLocked):
        FileJournal(tmp_path, idle_reactor()).replay()
    first.stop()
    assert replayed(tmp_path) == []


# Group commit and the reactor thread


@async_test
async def test_acknowledged_only_after_fdatasync(tmp_path: Path, reactor: Any) -> None:
    """
    While the writer thread waits in C{fdatasync}, C{accept} has returned
    an unfired L{Deferred} and the reactor keeps running; the Deferred
    fires only once the sync is done.
    """
    disk = FaultyDisk()
    journal = started(tmp_path, reactor, file_ops=disk.ops())
    disk.syncs = 0
    disk.sync_gate = threading.Event()
    accepted = journal.accept(envelope(1), body(1))
    await deferToThread(disk.in_sync.wait, 10)
    # A thread round trip: the reactor is free while the sync is pending.
    await deferToThread(lambda: None)
    assert not accepted.called
    disk.sync_gate.set()
    location = await accepted
    assert disk.syncs == 1
    assert location.segment == 1
    await journal.stop()


@async_test
async def test_records_waiting_during_a_sync_share_the_next_one(
    tmp_path: Path, reactor: Any
) -> None:
    """
    Group commit: the ten records submitted while a sync is in progress go
    to disk with one write and one sync, and come back to the reactor in
    one call from the writer thread.
    """
    disk = FaultyDisk()
    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split, file_ops=disk.ops())
    disk.sync_gate = threading.Event()
    first = journal.accept(envelope(0), body(0))
    await deferToThread(disk.in_sync.wait, 10)
    rest = [journal.accept(envelope(n), body(n)) for n in range(1, 11)]
    disk.sync_gate.set()
    await first
    await gatherResults(rest)
    stats = journal.stats()
    assert (stats.fsyncs, stats.records, stats.last_batch_records) == (2, 11, 10)
    assert stats.records_per_fsync == 5.5
    assert split.from_thread_calls == 2
    await journal.stop()


class WriterClock:
    """
    The writer thread's clock, set by the test (it only moves when told).
    """

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def gathered_into_one_sync(
    journal: FileJournal, disk: FaultyDisk, first: int, reactor: Any
) -> None:
    """
    Accept message C{first} and check the writer holds it back, then the
    next ones up to GATHER_RECORDS records, and check that they are all
    written together, with one sync.
    """
    syncs = disk.syncs
    held = journal.accept(envelope(first), body(first))
    await not_written_yet(held, disk, syncs)
    rest = [journal.accept(envelope(n), body(n)) for n in range(first + 1, first + GATHER_RECORDS)]
    await gatherResults([held, *rest]).addTimeout(5, reactor)
    assert disk.syncs == syncs + 1
    assert journal.stats().last_batch_records == GATHER_RECORDS


async def not_written_yet(accepted: Deferred[Any], disk: FaultyDisk, syncs: int) -> None:
    """
    Give the writer thread time (thread round trips) and check that
    C{accepted} is still not durable: had the writer written it, it would
    have fired by now (the check fails then, as it must).
    """
    for _ in range(3):
        await deferToThread(lambda: None)
    assert not accepted.called
    assert disk.syncs == syncs


@async_test
async def test_while_busy_the_writer_gathers_records_for_one_sync(
    tmp_path: Path, reactor: Any
) -> None:
    """
    Right after a group commit (the journal is busy), a record alone is
    not written at once: the writer waits for more, and writes as soon as
    GATHER_RECORDS wait, with one sync (here the wait could last a minute,
    so only the count can end it).
    """
    disk = FaultyDisk()
    clock = WriterClock()
    journal = started(tmp_path, reactor, file_ops=disk.ops(), gather=60.0, writer_clock=clock)
    await journal.accept(envelope(1), body(1))
    await gathered_into_one_sync(journal, disk, 2, reactor)
    await journal.stop()


@async_test
async def test_a_record_after_a_quiet_spell_is_written_at_once(
    tmp_path: Path, reactor: Any
) -> None:
    """
    When the last group commit ended longer than GATHER_WHEN_BUSY_WITHIN
    ago, a record alone is written at once (with a gather of a minute, a
    wait would time the test out).
    """
    disk = FaultyDisk()
    clock = WriterClock()
    journal = started(tmp_path, reactor, file_ops=disk.ops(), gather=60.0, writer_clock=clock)
    await journal.accept(envelope(1), body(1))
    clock.now += GATHER_WHEN_BUSY_WITHIN
    await journal.accept(envelope(2), body(2))
    assert journal.stats().last_batch_records == 1
    await journal.stop()


@async_test
async def test_gathering_ends_at_its_deadline(tmp_path: Path, reactor: Any) -> None:
    """
    A record the writer gathers for is written once the gather time has
    passed on the writer's clock, alone when nothing else came, and not
    before.
    """
    disk = FaultyDisk()
    clock = WriterClock()
    journal = started(tmp_path, reactor, file_ops=disk.ops(), gather=0.01, writer_clock=clock)
    await journal.accept(envelope(1), body(1))
    syncs = disk.syncs
    clock.now += GATHER_WHEN_BUSY_WITHIN / 2
    accepted = journal.accept(envelope(2), body(2))
    await not_written_yet(accepted, disk, syncs)
    clock.now += 0.01
    await accepted
    assert disk.syncs == syncs + 1
    assert journal.stats().last_batch_records == 1
    await journal.stop()


@async_test
async def test_told_what_is_coming_the_writer_waits_for_it(tmp_path: Path, reactor: Any) -> None:
    """
    Told that two messages are about to come (sessions in DATA), the writer
    woken by a record right after a group commit waits for those two, and
    writes the three with one sync as soon as they are there (the wait
    could last a minute: only the count can end it). Records nothing
    waits on do not count.
    """
    disk = FaultyDisk()
    clock = WriterClock()
    journal = started(
        tmp_path, reactor, file_ops=disk.ops(), gather_expected=60.0, writer_clock=clock
    )
    await journal.accept(envelope(0), body(0))
    coming = [2]
    journal.expected_soon = lambda: coming[0]
    syncs = disk.syncs
    gathered = [journal.accept(envelope(1), body(1))]
    await not_written_yet(gathered[0], disk, syncs)
    coming[0] = 1
    unhurried = journal.record_state("Q00000000", "delivered", 1, urgent=False)
    gathered.append(journal.accept(envelope(2), body(2)))
    await not_written_yet(gathered[1], disk, syncs)
    coming[0] = 0
    gathered.append(journal.accept(envelope(3), body(3)))
    await gatherResults(gathered)
    await unhurried
    assert disk.syncs == syncs + 1
    assert journal.stats().last_batch_records == 4
    await journal.stop()


@async_test
async def test_told_nothing_is_coming_the_writer_does_not_wait(
    tmp_path: Path, reactor: Any
) -> None:
    """
    Told that no message is about to come, the writer writes a session's
    message at once, even right after a group commit, when it would
    otherwise gather (a minute here): a client that sends one message after
    another never waits for others. A record nobody announced (a console
    send's message) is gathered for as when never told.
    """
    disk = FaultyDisk()
    clock = WriterClock()
    journal = started(tmp_path, reactor, file_ops=disk.ops(), gather=60.0, writer_clock=clock)
    journal.expected_soon = lambda: 0
    for n in range(3):
        # A wait would last a minute: five seconds tell.
        await journal.accept(envelope(n), body(n), announced=True).addTimeout(5, reactor)
        assert journal.stats().last_batch_records == 1
    await gathered_into_one_sync(journal, disk, 3, reactor)
    await journal.stop()


@async_test
async def test_waiting_for_what_is_coming_ends_at_its_deadline(
    tmp_path: Path, reactor: Any
) -> None:
    """
    Messages said to be coming that do not come (the client vanished in
    DATA, say) hold a record back for the gather time on the writer's
    clock, not less; after a quiet spell a record is not held at all; and
    at most GATHER_EXPECTED_MOST records are waited for.
    """
    disk = FaultyDisk()
    clock = WriterClock()
    journal = started(
        tmp_path, reactor, file_ops=disk.ops(), gather_expected=0.01, writer_clock=clock
    )
    journal.expected_soon = lambda: 1000
    # Waiting forever (the clock moves only when told) would fail here.
    await journal.accept(envelope(0), body(0)).addTimeout(5, reactor)
    syncs = disk.syncs
    accepted = journal.accept(envelope(1), body(1))
    await not_written_yet(accepted, disk, syncs)
    clock.now = 0.009
    await not_written_yet(accepted, disk, syncs)
    clock.now = 0.01
    await accepted.addTimeout(5, reactor)
    assert disk.syncs == syncs + 1
    assert journal.stats().last_batch_records == 1
    clock.now += GATHER_WHEN_BUSY_WITHIN
    await journal.accept(envelope(2), body(2)).addTimeout(5, reactor)
    assert journal.stats().last_batch_records == 1
    syncs = disk.syncs
    gathered = [journal.accept(envelope(n), body(n)) for n in range(3, 3 + GATHER_EXPECTED_MOST)]
    await gatherResults(gathered).addTimeout(5, reactor)
    assert disk.syncs == syncs + 1
    assert journal.stats().last_batch_records == GATHER_EXPECTED_MOST
    await journal.stop()


@async_test
async def test_told_but_gathering_turned_off_the_writer_does_not_wait(
    tmp_path: Path, reactor: Any
) -> None:
    """
    With the wait for what is coming turned off, a record is written at
    once, even right after a group commit, and the guess of the journal
    never told (a minute here) is not made either.
    """
    disk = FaultyDisk()
    clock = WriterClock()
    journal = started(
        tmp_path,
        reactor,
        file_ops=disk.ops(),
        gather=60.0,
        gather_expected=0.0,
        writer_clock=clock,
    )
    journal.expected_soon = lambda: 5
    for n in range(3):
        await journal.accept(envelope(n), body(n), announced=True).addTimeout(5, reactor)
        assert journal.stats().last_batch_records == 1
    await journal.stop()


@async_test
async def test_a_failing_count_of_what_is_coming_is_logged_and_dropped(
    tmp_path: Path, reactor: Any, warnings: list[str]
) -> None:
    """
    Should telling what is coming fail, the journal writes on as if never
    told, says so once, and asks no more.
    """
    asked = []

    def broken() -> int:
        asked.append(1)
        raise RuntimeError("no count")

    journal = started(tmp_path, reactor, gather_expected=60.0)
    journal.expected_soon = broken
    for n in range(3):
        await journal.accept(envelope(n), body(n)).addTimeout(5, reactor)
    assert len(asked) == 1
    assert journal.expected_soon is None
    await deferToThread(lambda: None)
    assert [w for w in warnings if "can no longer tell what is coming" in w] != []
    await journal.stop()


@async_test
async def test_stop_ends_gathering_and_writes_at_once(tmp_path: Path, reactor: Any) -> None:
    """
    Stopping the journal while the writer gathers writes what waits
    without waiting any longer.
    """
    disk = FaultyDisk()
    clock = WriterClock()
    journal = started(tmp_path, reactor, file_ops=disk.ops(), gather=60.0, writer_clock=clock)
    await journal.accept(envelope(1), body(1))
    syncs = disk.syncs
    accepted = journal.accept(envelope(2), body(2))
    await not_written_yet(accepted, disk, syncs)
    await journal.stop()
    assert accepted.called
    await accepted
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == ["Q00000001", "Q00000002"]


@async_test
async def test_gather_zero_never_waits(tmp_path: Path, reactor: Any) -> None:
    """
    With C{gather=0}, records are written as they come even right after a
    group commit (the writer's clock never moves here: a wait could not
    end by time).
    """
    disk = FaultyDisk()
    journal = started(
        tmp_path, reactor, file_ops=disk.ops(), gather=0.0, writer_clock=WriterClock()
    )
    for n in range(1, 4):
        await journal.accept(envelope(n), body(n))
        assert journal.stats().last_batch_records == 1
    await journal.stop()


@async_test
async def test_an_unhurried_record_rides_with_the_next_urgent_one(
    tmp_path: Path, reactor: Any
) -> None:
    """
    A state change submitted with C{urgent=False} costs no group commit of
    its own: it is written and acknowledged with the next urgent record,
    in one write and one sync.
    """
    disk = FaultyDisk()
    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split, file_ops=disk.ops())
    await journal.accept(envelope(1), body(1))
    syncs = disk.syncs
    unhurried = journal.record_state("Q00000001", "delivered", 1, urgent=False)
    # Thread round trips: had the record woken the writer, it would be on
    # disk by now (the test fails then, as it must).
    for _ in range(3):
        await deferToThread(lambda: None)
    assert not unhurried.called
    assert disk.syncs == syncs
    await journal.accept(envelope(2), body(2))
    await unhurried
    assert disk.syncs == syncs + 1
    assert journal.stats().last_batch_records == 2
    await journal.stop()
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == ["Q00000002"]


@async_test
async def test_an_unhurried_record_alone_is_written_after_its_delay(
    tmp_path: Path, reactor: Any
) -> None:
    """
    With no urgent record after it, an unhurried one is written
    L{DEFAULT_UNHURRIED_DELAY} seconds after it came (not before), with
    one timer for all the unhurried records waiting.
    """
    disk = FaultyDisk()
    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split, file_ops=disk.ops())
    await gatherResults([journal.accept(envelope(n), body(n)) for n in range(3)])
    syncs = disk.syncs
    unhurried = [journal.record_state(f"Q{n:08d}", "delivered", 1, urgent=False) for n in range(3)]
    assert len(split.clock.getDelayedCalls()) == 1
    split.clock.advance(DEFAULT_UNHURRIED_DELAY * 0.99)
    for _ in range(3):
        await deferToThread(lambda: None)
    assert not any(d.called for d in unhurried)
    split.clock.advance(DEFAULT_UNHURRIED_DELAY * 0.01)
    await gatherResults(unhurried)
    assert disk.syncs == syncs + 1
    assert split.clock.getDelayedCalls() == []
    await journal.stop()
    assert replayed(tmp_path) == []


@async_test
async def test_stop_writes_the_unhurried_records_and_cancels_their_timer(
    tmp_path: Path, reactor: Any
) -> None:
    """
    Stopping writes the unhurried records still waiting, and leaves no
    timer behind.
    """
    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split)
    await journal.accept(envelope(1), body(1))
    unhurried = journal.record_state("Q00000001", "delivered", 1, urgent=False)
    await journal.stop()
    assert unhurried.called
    await unhurried
    assert split.clock.getDelayedCalls() == []
    assert replayed(tmp_path) == []


@async_test
async def test_many_concurrent_accepts_need_few_fsyncs(tmp_path: Path, reactor: Any) -> None:
    """
    200 accepts submitted at once are made durable by far fewer fsyncs,
    and each gets its own location.
    """
    journal = started(tmp_path, reactor)
    locations = await gatherResults([journal.accept(envelope(n), body(n)) for n in range(200)])
    assert len(set(locations)) == 200
    assert journal.stats().fsyncs < 20
    await journal.stop()
    assert len(replayed(tmp_path)) == 200


@async_test
async def test_segment_rotates_at_its_size_limit(tmp_path: Path, reactor: Any) -> None:
    """
    A segment one byte short of the limit takes the next batch; one that
    reached the limit is closed and the next record starts a new segment.
    """
    length = RECORD_HEADER_SIZE + len(encode_accept(envelope(0), body(0)).meta) + 120
    journal = started(tmp_path, reactor, segment_size=SEGMENT_HEADER_SIZE + 2 * length)
    first = await journal.accept(envelope(0), body(0))
    second = await journal.accept(envelope(1), body(1))
    third = await journal.accept(envelope(2), body(2))
    assert [first.segment, second.segment, third.segment] == [1, 1, 2]
    assert os.path.getsize(segment_path(tmp_path, 1)) == SEGMENT_HEADER_SIZE + 2 * length
    await journal.stop()

    smaller = started(tmp_path, reactor, segment_size=SEGMENT_HEADER_SIZE + 2 * length + 1)
    fourth = await smaller.accept(envelope(3), body(3))
    fifth = await smaller.accept(envelope(4), body(4))
    assert [fourth.segment, fifth.segment] == [2, 2]
    await smaller.stop()


# Full disk, failing disk


@async_test
async def test_full_disk_refuses_loses_nothing_and_recovers(
    tmp_path: Path, reactor: Any, warnings: list[str]
) -> None:
    """
    When a write fails with ENOSPC, the records of that batch fail with
    L{JournalUnavailable}, C{accepting} turns L{False}, the half-written
    bytes are cut off; the next record is tried again and, once there is
    room, succeeds and turns C{accepting} back on. Nothing acknowledged is
    lost, nothing refused is replayed.
    """
    disk = FaultyDisk()
    journal = started(tmp_path, reactor, file_ops=disk.ops())
    kept = await journal.accept(envelope(1), body(1))
    # The file ends where the records end once the failed batch is cut off
    # (with the zeros written ahead of the records, as they go).
    size = kept.offset + kept.length
    assert os.path.getsize(segment_path(tmp_path, 1)) > size
    disk.write_error = errno.ENOSPC
    with pytest.raises(JournalUnavailable, match="No space"):
        await journal.accept(envelope(2), body(2))
    assert journal.accepting is False
    assert os.path.getsize(segment_path(tmp_path, 1)) == size
    with pytest.raises(JournalUnavailable):
        await journal.record_state("Q00000001", "delivered")
    assert any("452" in text for text in warnings)
    disk.write_error = 0
    again = await journal.accept(envelope(3), body(3))
    assert journal.accepting is True
    assert again == JournalLocation(1, size, again.length)
    # Cut back with the batch, the zeros are written ahead again.
    assert os.path.getsize(segment_path(tmp_path, 1)) > size + again.length
    assert journal.stats().write_errors == 2
    await journal.stop()
    assert [(m.envelope.queue_id, m.location) for m in replayed(tmp_path)] == [
        ("Q00000001", kept),
        ("Q00000003", again),
    ]


@async_test
async def test_unwritable_journal_is_retried_by_itself(tmp_path: Path, reactor: Any) -> None:
    """
    With no mail coming in, the journal retries a write every
    C{retry_interval} seconds while it cannot write, and turns
    C{accepting} back on as soon as a write works.
    """
    disk = FaultyDisk()
    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split, file_ops=disk.ops(), retry_interval=5.0)
    disk.write_error = errno.EROFS
    with pytest.raises(JournalUnavailable):
        await journal.accept(envelope(1), body(1))
    assert journal.accepting is False
    split.clock.advance(5.0)
    await journal.compact()  # after the retry, which fails again
    assert journal.accepting is False
    assert len(split.clock.getDelayedCalls()) == 1
    disk.write_error = 0
    split.clock.advance(4.9)
    await journal.compact()
    assert journal.accepting is False
    split.clock.advance(0.1)
    await journal.compact()
    assert journal.accepting is True
    assert split.clock.getDelayedCalls() == []
    await journal.stop()


@async_test
async def test_failed_sync_moves_writing_to_a_new_segment(tmp_path: Path, reactor: Any) -> None:
    """
    After an I/O error from fdatasync the file's cached pages cannot be
    trusted: the batch fails, and writing goes on in a new segment. Both
    segments replay.
    """
    disk = FaultyDisk()
    journal = started(tmp_path, reactor, file_ops=disk.ops())
    first = await journal.accept(envelope(1), body(1))
    disk.sync_error = errno.EIO
    with pytest.raises(JournalUnavailable, match="Input/output"):
        await journal.accept(envelope(2), body(2))
    disk.sync_error = 0
    third = await journal.accept(envelope(3), body(3))
    assert (first.segment, third.segment) == (1, 2)
    await journal.stop()
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == ["Q00000001", "Q00000003"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    """
    @return: whether a tmpfs of C{size} could be mounted on C{path}.
    """
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


@async_test
async def test_really_full_file_system(tmp_path: Path, reactor: Any) -> None:
    """
    On a real, tiny tmpfs: accepting until the file system is full fails
    with L{JournalUnavailable} and loses nothing acknowledged; once space
    is freed, mail is accepted again, and everything acknowledged replays.
    (Skipped where mounting is not permitted.)
    """
    mountpoint = tmp_path / "fs"
    mountpoint.mkdir()
    if not _mount_tmpfs(mountpoint, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        filler = mountpoint / "filler"
        filler.write_bytes(b"f" * 96 * 1024)
        directory = mountpoint / "journal"
        journal = started(directory, reactor, segment_size=32 * 1024)
        acknowledged = []
        refused = 0
        for n in range(200):
            try:
                location = await journal.accept(envelope(n), body(n, 1024))
            except JournalUnavailable:
                refused += 1
                if refused == 3:
                    break
            else:
                acknowledged.append((f"Q{n:08d}", location))
        assert refused == 3
        assert journal.accepting is False
        assert acknowledged
        filler.unlink()
        location = await journal.accept(envelope(500), body(500, 1024))
        acknowledged.append(("Q00000500", location))
        assert journal.accepting is True
        await journal.stop()
        assert [(m.envelope.queue_id, m.location) for m in replayed(directory)] == acknowledged
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


# Crash consistency


def _write_sample_journal(directory: Path) -> None:
    """
    Write, without threads, a segment whose records are: three accepts,
    a deferral, a delivery, a re-prioritization, one more accept.
    """
    store = _SegmentStore(str(directory), _Lookup(), Logger(), 1 << 20, 0.25, 1 << 20, FileOps())
    store.open()
    for payload in [
        encode_accept(envelope(0), body(0)),
        encode_accept(envelope(1), body(1)),
        encode_accept(envelope(2), body(2)),
        encode_state("Q00000000", "deferred", 1, 60.0),
        encode_state("Q00000001", "delivered"),
        encode_priority("Q00000002", Priority.HIGH),
        encode_accept(envelope(3), body(3)),
    ]:
        assert isinstance(store.commit([payload]), list)
    store.close()


def _expected_after_cut(data: bytes, cut: int) -> list[tuple[str, str, int, float, int]]:
    """
    @return: what replay must give when the segment ends at C{cut}: the
        effect of exactly the records that lie wholly before it.
    """
    key = decode_segment_header(data).key
    live: dict[str, list[Any]] = {}
    from smtpgw.journal_codec import RecordType, decode_envelope, decode_priority, decode_state

    for offset, rtype, length, meta in walk_records(
        data, SEGMENT_HEADER_SIZE, len(data), key, True
    ):
        if offset + length > cut:
            break
        if rtype is RecordType.ACCEPT:
            e = decode_envelope(meta)
            live[e.queue_id] = [e.queue_id, "queued", 0, 0.0, int(e.priority)]
        elif rtype is RecordType.STATE:
            s = decode_state(meta)
            if s.state in ("delivered", "bounced", "cancelled"):
                live.pop(s.queue_id, None)
            elif s.queue_id in live:
                live[s.queue_id][1:4] = [s.state, s.attempts, s.next_attempt_at]
        elif rtype is RecordType.PRIORITY:
            p = decode_priority(meta)
            live[p.queue_id][4] = int(p.priority)
    return [(v[0], v[1], v[2], v[3], v[4]) for v in live.values()]


@pytest.mark.parametrize("key_start", [b"", b"\x00\x00"], ids=["random-key", "key-of-zeros-first"])
@pytest.mark.parametrize("ahead", [False, True])
def test_torn_tail_at_every_byte_replays_exactly_the_complete_records(
    tmp_path: Path,
    warnings: list[str],
    infos: list[str],
    monkeypatch: pytest.MonkeyPatch,
    ahead: bool,
    key_start: bytes,
) -> None:
    """
    A crash can leave the last segment cut anywhere: for every possible
    length, replay gives exactly the records that are complete, warns about
    the torn tail, and cuts the file back to them so that what is appended
    next follows cleanly. With C{ahead}, the torn write went over zeros
    written ahead of the records, and what it did not write is zeros.

    A record begins with its segment's random key. When the key's first
    bytes are zeros (C{key_start}; 1 key in 256 begins with one), a write
    torn within them put down only zeros: the file then holds nothing but
    zeros after the last whole record, taken for zeros written ahead with
    no warning, and replay gives the same records as for the torn write.
    """
    source = tmp_path / "source"
    random_bytes = os.urandom

    def urandom(n: int) -> bytes:
        if n == SEGMENT_KEY_SIZE:
            return (key_start + random_bytes(n))[:n]
        return random_bytes(n)

    with monkeypatch.context() as patched:
        patched.setattr(os, "urandom", urandom)
        _write_sample_journal(source)
    data = segment_path(source, 1).read_bytes()
    key = decode_segment_header(data).key
    assert key.startswith(key_start)
    boundaries = {
        offset + length
        for offset, _, length, _ in walk_records(data, SEGMENT_HEADER_SIZE, len(data), key, True)
    } | {SEGMENT_HEADER_SIZE}
    taken_for_zeros = 0
    for cut in range(SEGMENT_HEADER_SIZE, len(data)):
        directory = tmp_path / f"cut{cut}"
        directory.mkdir()
        zeros = bytes(len(data) - cut + 4096) if ahead else b""
        segment_path(directory, 1).write_bytes(data[:cut] + zeros)
        whole = cut
        if ahead:
            # The bytes the write left out of the record it tore may all be
            # zeros: then the zeros complete it, and it is whole.
            after = min((b for b in boundaries if b > cut), default=cut)
            if not any(data[cut:after]):
                whole = after
        good_end = max(b for b in boundaries if b <= whole)
        # What the torn write did put down may itself be zeros: then
        # nothing but zeros follows the last whole record.
        only_zeros = (ahead or cut > good_end) and not any(data[good_end:cut])
        taken_for_zeros += only_zeros and whole != good_end
        warnings.clear()
        infos.clear()
        assert summary(replayed(directory)) == _expected_after_cut(data, whole), cut
        assert os.path.getsize(segment_path(directory, 1)) == good_end
        assert bool(warnings) == (whole != good_end and not only_zeros), cut
        assert any("taken for their end" in line for line in infos) == only_zeros, cut
        shutil.rmtree(directory)
    # Every record begins with the key: each zero the key begins with puts
    # the case above once at the start of each of the 7 records.
    assert taken_for_zeros == 7 * (len(key) - len(key.lstrip(b"\x00")))


@pytest.mark.parametrize(
    "garbage",
    [
        os.urandom(1000),
        b"\xff" * 31,
        b"\x00" * 4096 + b"\x01",
        encode_record(b"\x00" * 8, encode_state("Q00000002", "cancelled")),
    ],
    ids=["random", "short", "zeros-then-a-byte", "record-of-another-segment"],
)
@async_test
async def test_garbage_after_the_last_record_is_cut_off(
    tmp_path: Path, reactor: Any, warnings: list[str], garbage: bytes
) -> None:
    """
    Whatever follows the last record (random bytes, zeroed blocks followed
    by something else, a record with another segment's key) is not
    replayed, is cut off with a warning, and new records then append and
    replay cleanly.
    """
    _write_sample_journal(tmp_path)
    path = segment_path(tmp_path, 1)
    clean = path.read_bytes()
    path.write_bytes(clean + garbage)
    expected = _expected_after_cut(clean, len(clean))
    journal = started(tmp_path, reactor)
    assert path.read_bytes() == clean
    assert any("torn or damaged" in text for text in warnings)
    await journal.accept(envelope(9), body(9))
    await journal.stop()
    warnings.clear()
    assert summary(replayed(tmp_path)) == [*expected, ("Q00000009", "queued", 0, 0.0, 3)]
    assert warnings == []


@pytest.mark.parametrize("zeros", [1, 4096, PREALLOCATE_AHEAD])
@async_test
async def test_zeros_after_the_last_record_are_space_written_ahead(
    tmp_path: Path, reactor: Any, warnings: list[str], infos: list[str], zeros: int
) -> None:
    """
    Zeros after the last record (written ahead of the records, left by a
    crash) are not damage: no warning (one line says the stop was not
    clean), the file is not cut, the next record goes where they start,
    and a stop cuts them off.
    """
    _write_sample_journal(tmp_path)
    path = segment_path(tmp_path, 1)
    clean = path.read_bytes()
    path.write_bytes(clean + bytes(zeros))
    expected = _expected_after_cut(clean, len(clean))
    journal = started(tmp_path, reactor)
    assert warnings == []
    assert [line for line in infos if "zeros" in line] == [
        f"journal segment 1: {zeros} bytes of zeros after its last record, written ahead of"
        " the records, taken for their end (the gateway did not stop cleanly)"
    ]
    assert path.stat().st_size >= len(clean) + zeros
    ninth = await journal.accept(envelope(9), body(9))
    assert (ninth.segment, ninth.offset) == (1, len(clean))
    await journal.stop()
    assert path.stat().st_size == len(clean) + ninth.length
    assert summary(replayed(tmp_path)) == [*expected, ("Q00000009", "queued", 0, 0.0, 3)]
    assert warnings == []


def test_zeros_after_the_records_of_an_older_segment_are_damage(
    tmp_path: Path, warnings: list[str]
) -> None:
    """
    Zeros are written ahead only in the segment being written (never past
    the size at which it is rotated): in a segment that is not the last,
    zeros after the records are damage (lost writes, a repaired file
    system), and replay says so.
    """
    _write_sample_journal(tmp_path)
    first = segment_path(tmp_path, 1)
    clean = first.read_bytes()
    expected = _expected_after_cut(clean, len(clean))
    first.write_bytes(clean + bytes(PREALLOCATE_AHEAD))
    key = os.urandom(8)
    segment_path(tmp_path, 2).write_bytes(
        encode_segment_header(2, key) + encode_record(key, encode_accept(envelope(5), body(5)))
    )
    assert summary(replayed(tmp_path)) == [*expected, ("Q00000005", "queued", 0, 0.0, 3)]
    assert len(warnings) == 1
    assert f"damaged record at offset {len(clean)}" in warnings[0]


@attrs.define
class CountingDisk:
    """
    L{FileOps} that note each write (its offset and length), and fail the
    writes of nothing but zeros with C{zeros_error} when it is set (a disk
    that fills up as the journal writes ahead).
    """

    writes: list[tuple[int, int]] = attrs.field(factory=list)
    zeros_error: int = 0

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if self.zeros_error and not any(data):
            raise OSError(self.zeros_error, os.strerror(self.zeros_error))
        self.writes.append((offset, len(data)))
        return os.pwrite(fd, data, offset)

    def ops(self) -> FileOps:
        return FileOps(pwrite=self.pwrite, fdatasync=os.fdatasync)


@async_test
async def test_zeros_are_written_ahead_of_the_records_as_they_come_near(
    tmp_path: Path, reactor: Any
) -> None:
    """
    The first record of a segment is followed by L{PREALLOCATE_AHEAD}
    bytes of zeros (in a write of their own); later records overwrite them
    with one write each, the file keeping its size, until the records come
    within L{PREALLOCATE_WHEN_WITHIN} of their end: then the zeros go
    further, never past the segment's size.
    """
    disk = CountingDisk()
    size = 100_000
    journal = started(
        tmp_path, reactor, file_ops=disk.ops(), segment_size=2 * PREALLOCATE_AHEAD + size
    )
    path = segment_path(tmp_path, 1)
    disk.writes.clear()
    first = await journal.accept(envelope(0), body(0, size))
    end = first.offset + first.length
    assert disk.writes == [(first.offset, first.length), (end, PREALLOCATE_AHEAD)]
    assert path.stat().st_size == end + PREALLOCATE_AHEAD
    number = 1
    while end + PREALLOCATE_WHEN_WITHIN <= first.offset + first.length + PREALLOCATE_AHEAD:
        disk.writes.clear()
        location = await journal.accept(envelope(number), body(number, size))
        end = location.offset + location.length
        number += 1
        if end + PREALLOCATE_WHEN_WITHIN <= first.offset + first.length + PREALLOCATE_AHEAD:
            assert disk.writes == [(location.offset, location.length)]
            assert path.stat().st_size == first.offset + first.length + PREALLOCATE_AHEAD
    # Came near: the zeros went on, up to the segment's size at most.
    assert disk.writes[-1][0] == first.offset + first.length + PREALLOCATE_AHEAD
    assert path.stat().st_size == min(end + PREALLOCATE_AHEAD, 2 * PREALLOCATE_AHEAD + size)
    await journal.stop()
    assert path.stat().st_size == end
    assert len(replayed(tmp_path)) == number


@async_test
async def test_a_disk_too_full_to_write_ahead_still_takes_the_records(
    tmp_path: Path, reactor: Any, warnings: list[str]
) -> None:
    """
    When the zeros cannot be written (the disk is full), the records
    written before them are durable and acknowledged all the same, as the
    journal wrote them before it wrote ahead; nothing is refused.
    """
    disk = CountingDisk(zeros_error=errno.ENOSPC)
    journal = started(tmp_path, reactor, file_ops=disk.ops())
    locations = [await journal.accept(envelope(n), body(n)) for n in range(3)]
    assert journal.accepting is True
    # Said once, not at each commit.
    assert [w for w in warnings if "cannot write zeros ahead" in w] == [
        "journal: cannot write zeros ahead of the records ([Errno 28] No space left on device);"
        " group commits cost more until it can"
    ]
    end = locations[-1].offset + locations[-1].length
    assert os.path.getsize(segment_path(tmp_path, 1)) == end
    await journal.stop()
    assert [m.location for m in replayed(tmp_path)] == locations
    assert not any("452" in text for text in warnings)


@async_test
async def test_zeros_are_never_written_past_the_segment_size(tmp_path: Path, reactor: Any) -> None:
    """
    Zeros go ahead of the records up to the segment's size at most: there
    the segment is rotated, and it ends with its records.
    """
    size = 100_000
    segment_size = 3 * size
    journal = started(tmp_path, reactor, segment_size=segment_size)
    await journal.accept(envelope(0), body(0, size))
    assert os.path.getsize(segment_path(tmp_path, 1)) == segment_size
    locations = [await journal.accept(envelope(n), body(n, size)) for n in range(1, 4)]
    assert [location.segment for location in locations] == [1, 1, 2]
    assert os.path.getsize(segment_path(tmp_path, 1)) == locations[1].offset + locations[1].length
    await journal.stop()


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@async_test
async def test_damage_inside_the_last_segment_keeps_the_records_after_it(
    tmp_path: Path, reactor: Any, warnings: list[str]
) -> None:
    """
    A damaged record in the middle of the last segment is dropped, but the
    intact records after it are kept: moved to a new segment before the
    damaged file is cut, so a second replay finds the same, silently.
    """
    journal = started(tmp_path, reactor)
    locations: list[JournalLocation] = []
    for n in range(4):
        locations.append(await journal.accept(envelope(n), body(n)))
    await journal.record_state("Q00000003", "held")
    await journal.stop()
    _flip_byte(segment_path(tmp_path, 1), locations[1].offset + RECORD_HEADER_SIZE + 3)
    expected = [
        ("Q00000000", "queued", 0, 0.0, 3),
        ("Q00000002", "queued", 0, 0.0, 3),
        ("Q00000003", "held", 0, 0.0, 3),
    ]
    assert summary(replayed(tmp_path)) == expected
    assert any("3 intact records after them moved to segment 2" in t for t in warnings)
    warnings.clear()
    assert summary(replayed(tmp_path)) == expected
    assert warnings == []


@async_test
async def test_damage_in_an_older_segment_skips_only_the_damaged_record(
    tmp_path: Path, reactor: Any, warnings: list[str]
) -> None:
    """
    A damaged record in a closed segment is skipped (with a warning, at
    every replay); the records around it replay, and nothing is cut.
    """
    journal = started(tmp_path, reactor, segment_size=1)
    locations = await gatherResults([journal.accept(envelope(n), body(n)) for n in range(3)])
    await journal.accept(envelope(3), body(3))
    await journal.stop()
    assert {location.segment for location in locations} == {1}
    size = os.path.getsize(segment_path(tmp_path, 1))
    _flip_byte(segment_path(tmp_path, 1), locations[1].offset + 2)
    for _ in range(2):
        warnings.clear()
        found = [m.envelope.queue_id for m in replayed(tmp_path, segment_size=1)]
        assert found == ["Q00000000", "Q00000002", "Q00000003"]
        assert len(warnings) == 1
        assert "damaged record at offset" in warnings[0]
        assert os.path.getsize(segment_path(tmp_path, 1)) == size


@async_test
async def test_forged_record_in_a_message_body_is_never_replayed(
    tmp_path: Path, reactor: Any
) -> None:
    """
    A client can send a message that contains a journal record (say,
    cancelling another message). Even when a crash tears the journal in the
    middle of that message, the forged record is not replayed: it cannot
    carry the segment's random key.
    """
    journal = started(tmp_path, reactor)
    await journal.accept(envelope(1), body(1))
    forged = b"".join(
        encode_record(key, encode_state("Q00000001", "cancelled"))
        for key in (b"\x00" * 8, b"\xff" * 8, b"SMTPGWJ1")
    )
    location = await journal.accept(envelope(2), b"Subject: x\r\n\r\n" + forged + b"x" * 100)
    await journal.stop()
    path = segment_path(tmp_path, 1)
    path.write_bytes(path.read_bytes()[: location.offset + location.length - 50])
    assert summary(replayed(tmp_path)) == [("Q00000001", "queued", 0, 0.0, 3)]


def test_records_of_a_newer_format_stop_the_replay(tmp_path: Path) -> None:
    """
    A journal written by a newer gateway (an intact record of another
    format version) is not replayed by skipping what it does not know: the
    journal refuses to open, and leaves the files as they are.
    """
    _write_sample_journal(tmp_path)
    path = segment_path(tmp_path, 1)
    data = bytearray(path.read_bytes())
    offset = SEGMENT_HEADER_SIZE
    data[offset + 8] = FORMAT_VERSION + 1
    import zlib

    crc = zlib.crc32(bytes(data[offset : offset + 28]))
    data[offset + 28 : offset + 32] = crc.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(JournalFormatError, match="version 2"):
        replayed(tmp_path)
    assert path.read_bytes() == bytes(data)


@async_test
async def test_segment_created_but_never_written_is_recreated(
    tmp_path: Path, reactor: Any, warnings: list[str]
) -> None:
    """
    A crash while a new segment was being created leaves a short file:
    replay recreates it, and writing goes on.
    """
    _write_sample_journal(tmp_path)
    segment_path(tmp_path, 2).write_bytes(b"\x89SGW")
    journal = started(tmp_path, reactor)
    assert any("never completed" in text for text in warnings)
    location = await journal.accept(envelope(7), body(7))
    assert location.segment == 2
    await journal.stop()
    assert [m.envelope.queue_id for m in replayed(tmp_path)][-1] == "Q00000007"


def test_unreadable_segment_is_set_aside(tmp_path: Path, warnings: list[str]) -> None:
    """
    A segment whose header and first record are both unreadable is renamed
    aside (kept for inspection) with a warning; the others replay.
    """
    _write_sample_journal(tmp_path)
    (tmp_path / "000000000000.seg").write_bytes(os.urandom(500))
    assert len(replayed(tmp_path)) == 3
    assert (tmp_path / "000000000000.seg.corrupt").exists()
    assert any("set aside" in text for text in warnings)


def test_damaged_segment_header_is_recovered_from_the_first_record(
    tmp_path: Path, warnings: list[str]
) -> None:
    """
    The key of a segment is also at the start of its first record: a
    damaged segment header loses nothing.
    """
    _write_sample_journal(tmp_path)
    _flip_byte(segment_path(tmp_path, 1), 3)
    assert len(replayed(tmp_path)) == 3
    assert any("key was recovered" in text for text in warnings)


# Reading


@async_test
async def test_read_reports_a_damaged_message(tmp_path: Path, reactor: Any) -> None:
    """
    Reading a message whose body was damaged on disk fails with
    L{JournalReadError} saying so, never with wrong bytes.
    """
    journal = started(tmp_path, reactor)
    location = await journal.accept(envelope(1), body(1))
    _flip_byte(segment_path(tmp_path, 1), location.offset + location.length - 1)
    with pytest.raises(JournalReadError, match=r"damaged.*body checksum"):
        await journal.read(location)
    with pytest.raises(JournalReadError, match="no longer in the journal"):
        await journal.read(JournalLocation(77, 32, 100))
    await journal.stop()


# Compaction


@async_test
async def test_delivering_everything_shrinks_the_journal_to_one_segment(
    tmp_path: Path, reactor: Any
) -> None:
    """
    Once every message is delivered, every segment but the one being
    written to is deleted, and nothing replays.
    """
    segment_size = 8 * 1024
    journal = started(tmp_path, reactor, segment_size=segment_size)
    for n in range(100):
        await journal.accept(envelope(n), body(n, 1000))
    assert journal.stats().segments > 10
    await gatherResults([journal.record_state(f"Q{n:08d}", "delivered") for n in range(100)])
    await journal.compact()
    stats = journal.stats()
    assert stats.segments == 1
    assert stats.disk_bytes <= segment_size + 100 * 100
    assert stats.live_messages == 0
    assert len(list(tmp_path.glob("*.seg"))) == 1
    await journal.stop()
    assert replayed(tmp_path) == []


@async_test
async def test_few_live_messages_are_copied_forward(tmp_path: Path, reactor: Any) -> None:
    """
    When an old segment holds only a few live messages, they are copied
    forward with their state and priority, and the segment is deleted;
    reading at the old location finds the copy, and replay gives them in
    acceptance order with their state.
    """
    journal = started(tmp_path, reactor, segment_size=8 * 1024)
    locations: list[JournalLocation] = []
    for n in range(40):
        locations.append(await journal.accept(envelope(n), body(n, 1000)))
    assert locations[3].segment == 1
    keep = {3: ("deferred", 2, 99.0), 5: ("held", 0, 0.0), 30: ("queued", 0, 0.0)}
    await journal.record_state("Q00000003", "deferred", 2, 99.0)
    await journal.record_state("Q00000005", "held")
    await journal.reprioritize("Q00000005", Priority.VERY_LOW)
    await gatherResults(
        [journal.record_state(f"Q{n:08d}", "delivered") for n in range(40) if n not in keep]
    )
    await journal.compact()
    assert not segment_path(tmp_path, 1).exists()
    assert journal.stats().copied_records >= 2
    for n in keep:
        assert (await journal.read(locations[n])) == (
            attrs.evolve(envelope(n), priority=Priority.VERY_LOW) if n == 5 else envelope(n),
            body(n, 1000),
        )
    await journal.stop()
    assert summary(replayed(tmp_path)) == [
        ("Q00000003", "deferred", 2, 99.0, 3),
        ("Q00000005", "held", 0, 0.0, 5),
        ("Q00000030", "queued", 0, 0.0, 3),
    ]


@async_test
async def test_cancelled_message_stays_cancelled_after_compaction(
    tmp_path: Path, reactor: Any
) -> None:
    """
    A message cancelled in a later segment never comes back when segments
    are compacted: the segment with its cancellation outlives its accept.
    """
    journal = started(tmp_path, reactor, segment_size=4 * 1024)
    for n in range(30):
        await journal.accept(envelope(n), body(n, 1000))
    await journal.record_state("Q00000000", "cancelled")
    await journal.record_state("Q00000001", "held")
    await gatherResults([journal.record_state(f"Q{n:08d}", "delivered") for n in range(2, 29)])
    await journal.compact()
    await journal.stop()
    assert summary(replayed(tmp_path)) == [
        ("Q00000001", "held", 0, 0.0, 3),
        ("Q00000029", "queued", 0, 0.0, 3),
    ]


@async_test
async def test_disk_use_stays_bounded_under_sustained_load(tmp_path: Path, reactor: Any) -> None:
    """
    Under a steady flow where most messages are delivered but some stay
    (held or retried much later), the journal's size stays within twice
    its live data plus a few segments.
    """
    segment_size = 16 * 1024
    journal = started(tmp_path, reactor, segment_size=segment_size)
    largest = 0
    for round_ in range(120):
        numbers = range(round_ * 10, round_ * 10 + 10)
        await gatherResults([journal.accept(envelope(n), body(n, 700)) for n in numbers])
        await gatherResults(
            [
                journal.record_state(f"Q{n:08d}", "held" if n % 25 == 0 else "delivered")
                for n in numbers
            ]
        )
        stats = journal.stats()
        largest = max(largest, stats.disk_bytes - 2 * stats.live_bytes)
    assert largest <= 5 * segment_size
    assert journal.stats().live_messages == 48
    await journal.stop()
    assert len(replayed(tmp_path)) == 48


@async_test
async def test_remaining_recipients_replay_and_later_states_keep_them(
    tmp_path: Path, reactor: Any
) -> None:
    """
    A change of state that says which recipients remain (and which bounced)
    is replayed with them; later changes without them keep them; a final
    state drops the message with them; messages without such a change
    replay with every recipient (L{None}).
    """
    journal = started(tmp_path, reactor)
    for n in range(3):
        await journal.accept(envelope(n), body(n))
    await journal.record_state(
        "Q00000000", "deferred", 1, 60.0, remaining=["c@example.org"], bounced=["b@example.org"]
    )
    await journal.record_state("Q00000000", "sending", 1)
    await journal.record_state("Q00000000", "deferred", 2, 180.0, {"reason": "451 later"})
    await journal.record_state("Q00000001", "deferred", 1, 60.0, remaining=["b@example.org"])
    await journal.record_state("Q00000001", "delivered", 2)
    await journal.record_state("Q00000002", "held")
    await journal.stop()
    messages = replayed(tmp_path)
    assert summary(messages) == [
        ("Q00000000", "deferred", 2, 180.0, 3),
        ("Q00000002", "held", 0, 0.0, 3),
    ]
    assert [(m.remaining, m.bounced) for m in messages] == [
        (("c@example.org",), ("b@example.org",)),
        (None, ()),
    ]


@async_test
async def test_queue_state_replays_and_survives_compaction(tmp_path: Path, reactor: Any) -> None:
    """
    The latest queue state recorded is what replay says; a paused state is
    carried forward when the segment that held it is deleted, so a queue
    stopped by an admin stays stopped across compaction and restarts; the
    remaining recipients of a live message are copied with it.
    """
    fresh = FileJournal(tmp_path, idle_reactor())
    fresh.replay()
    assert fresh.queue_paused is False
    await fresh.stop()
    journal = started(tmp_path, reactor, segment_size=8 * 1024)
    await journal.record_queue_state(False)
    await journal.record_queue_state(True)
    assert journal.queue_paused is True
    for n in range(40):
        await journal.accept(envelope(n), body(n, 1000))
    await journal.record_state("Q00000003", "deferred", 2, 99.0, remaining=["c@example.org"])
    await gatherResults(
        [journal.record_state(f"Q{n:08d}", "delivered") for n in range(40) if n != 3]
    )
    await journal.compact()
    assert not segment_path(tmp_path, 1).exists()
    assert journal.queue_paused is True
    await journal.stop()
    again = FileJournal(tmp_path, idle_reactor())
    try:
        [message] = again.replay()
        assert again.queue_paused is True
    finally:
        await again.stop()
    assert (message.envelope.queue_id, message.state, message.remaining) == (
        "Q00000003",
        "deferred",
        ("c@example.org",),
    )


@async_test
async def test_running_queue_state_is_not_carried(tmp_path: Path, reactor: Any) -> None:
    """
    A queue started again needs no record once the segment holding its
    records goes: no queue state at all means running.
    """
    journal = started(tmp_path, reactor, segment_size=4 * 1024)
    await journal.record_queue_state(True)
    await journal.record_queue_state(False)
    for n in range(20):
        await journal.accept(envelope(n), body(n, 1000))
    await gatherResults([journal.record_state(f"Q{n:08d}", "delivered") for n in range(20)])
    await journal.compact()
    assert journal.stats().segments == 1
    await journal.stop()
    again = FileJournal(tmp_path, idle_reactor())
    try:
        assert again.replay() == []
        assert again.queue_paused is False
    finally:
        await again.stop()


# A segment written by the gateway before PROGRESS and QUEUE records existed:
# two accepts, a deferral with details, a re-prioritization, a hold.
_OLD_SEGMENT = base64.b64decode(
    "iVNHV0pOTAoBAAAAAQAAAAAAAAABAgMEBQYHCPrcipIBAgMEBQYHCAEBAABnAAAADwAAAPbL1a+ueyPYu2N3kAlR"
    "MDAwMDAwMDBbIm5ld3MiLCJ1MSIsImFAZXhhbXBsZS5jb20iLFsiYkBleGFtcGxlLm9yZyIsImNAZXhhbXBsZS5v"
    "cmciXSwzLDE3MDAwMDAwMDAuMCwiMTkyLjAuMi4xIiwxMF1TdWJqZWN0OiAwDQoNCngBAgMEBQYHCAEBAABXAAAA"
    "DwAAAK8o/DALqH8TPv15hQlRMDAwMDAwMDFbIm5ld3MiLCJ1MSIsImFAZXhhbXBsZS5jb20iLFsiZEBleGFtcGxl"
    "Lm9yZyJdLDMsMTcwMDAwMDAwMS4wLCIxOTIuMC4yLjEiLDEwXVN1YmplY3Q6IDENCg0KeAECAwQFBgcIAQIAADUA"
    "AAAAAAAAYBW9SQAAAABCKd2cCVEwMDAwMDAwMAhkZWZlcnJlZAIAAAAAAABe/FTZQXsicmVhc29uIjoiNDUxIGxh"
    "dGVyIn0BAgMEBQYHCAEDAAALAAAAAAAAAGaQyxwAAAAA53hsqwlRMDAwMDAwMDECAQIDBAUGBwgBAgAAGwAAAAAA"
    "AAB5DHzbAAAAAOjuoEsJUTAwMDAwMDAxBGhlbGQAAAAAAAAAAAAAAAA="
)


@async_test
async def test_journal_written_before_progress_records_replays(
    tmp_path: Path, reactor: Any
) -> None:
    """
    A journal written before PROGRESS and QUEUE records existed replays as
    it did: every message with all its recipients, the queue running; and
    the new gateway goes on writing to it.
    """
    segment_path(tmp_path, 1).write_bytes(_OLD_SEGMENT)
    journal = FileJournal(tmp_path, reactor)
    messages = journal.replay()
    assert summary(messages) == [
        ("Q00000000", "deferred", 2, 1_700_000_120.0, 3),
        ("Q00000001", "held", 0, 0.0, 2),
    ]
    assert [(m.remaining, m.bounced) for m in messages] == [(None, ()), (None, ())]
    assert messages[0].envelope.recipients == ("b@example.org", "c@example.org")
    assert journal.queue_paused is False
    journal.start()
    assert (await journal.read(messages[1].location))[1] == b"Subject: 1\r\n\r\nx"
    await journal.record_state("Q00000000", "deferred", 3, 5.0, remaining=["c@example.org"])
    await journal.record_queue_state(True)
    await journal.stop()
    again = FileJournal(tmp_path, idle_reactor())
    try:
        first, _ = again.replay()
        assert again.queue_paused is True
    finally:
        await again.stop()
    assert first.remaining == ("c@example.org",)


# The compaction rules, without threads


class CompactionMachine(RuleBasedStateMachine):
    """
    Random sequences of accepts, state changes, re-prioritizations,
    compactions and restarts on small segments: replay always matches a
    model of what was written, and the index the writer keeps matches it
    too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="journal-machine-")
        self.store = self._open()
        self.model: dict[str, list[Any]] = {}
        self.progress: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self.paused = False
        self.counter = 0

    def _open(self) -> _SegmentStore:
        store = _SegmentStore(self.directory, _Lookup(), Logger(), 2048, 0.25, 1024, FileOps())
        store.open()
        store.delete_dead_segments()
        return store

    def _write(self, *payloads: Any) -> None:
        # As the writer thread does after each batch.
        assert isinstance(self.store.commit(payloads), list)
        self.store.delete_dead_segments()

    @rule(size=st.integers(0, 900), priority=st.sampled_from(Priority))
    def accept(self, size: int, priority: Priority) -> None:
        self.counter += 1
        e = attrs.evolve(envelope(self.counter), priority=priority)
        self._write(encode_accept(e, b"b" * size))
        self.model[e.queue_id] = [e.queue_id, "queued", 0, 0.0, int(priority)]

    @rule(
        data=st.data(),
        state=st.sampled_from(["deferred", "held", "queued", "delivered", "bounced", "cancelled"]),
        attempts=st.integers(0, 5),
    )
    def change_state(self, data: st.DataObject, state: str, attempts: int) -> None:
        if not self.model:
            return
        queue_id = data.draw(st.sampled_from(sorted(self.model)))
        self._write(encode_state(queue_id, state, attempts, float(attempts)))
        if state in ("delivered", "bounced", "cancelled"):
            del self.model[queue_id]
            self.progress.pop(queue_id, None)
        else:
            self.model[queue_id][1:4] = [state, attempts, float(attempts)]

    @rule(data=st.data(), attempts=st.integers(0, 5), done=st.integers(0, 2))
    def record_progress(self, data: st.DataObject, attempts: int, done: int) -> None:
        if not self.model:
            return
        queue_id = data.draw(st.sampled_from(sorted(self.model)))
        recipients = ("b@example.org", "c@example.org")
        remaining, bounced = recipients[done:], recipients[:done]
        self._write(
            encode_state(
                queue_id,
                "deferred",
                attempts,
                float(attempts),
                remaining=remaining,
                bounced=bounced,
            )
        )
        self.model[queue_id][1:4] = ["deferred", attempts, float(attempts)]
        self.progress[queue_id] = (remaining, bounced)

    @rule(paused=st.booleans())
    def pause(self, paused: bool) -> None:
        self._write(encode_queue_state(paused))
        self.paused = paused

    @rule(data=st.data(), priority=st.sampled_from(Priority))
    def reprioritize(self, data: st.DataObject, priority: Priority) -> None:
        if not self.model:
            return
        queue_id = data.draw(st.sampled_from(sorted(self.model)))
        self._write(encode_priority(queue_id, priority))
        self.model[queue_id][4] = int(priority)

    @rule()
    def compact(self) -> None:
        self.store.compaction_blocked = False
        self.store.compact_fully()
        assert not self.store.compaction_due()

    @rule()
    def restart(self) -> None:
        self.store.close()
        self.store = self._open()
        messages = self.store.messages()
        assert summary(messages) == [tuple(v) for v in self.model.values()]
        assert {
            m.envelope.queue_id: (m.remaining, m.bounced)
            for m in messages
            if m.remaining is not None
        } == self.progress
        assert all(m.bounced == () for m in messages if m.remaining is None)
        assert self.store.index.paused is self.paused

    @invariant()
    def index_matches_model(self) -> None:
        index = self.store.index
        assert set(index.live) == set(self.model)
        for queue_id, entry in index.live.items():
            assert [entry.state, entry.attempts, entry.next_attempt_at] == self.model[queue_id][
                1:4
            ]
        assert index.total_live_bytes == sum(e.length for e in index.live.values())
        assert {q: e.progress for q, e in index.live.items() if e.progress} == self.progress
        assert index.paused is self.paused

    @invariant()
    def oldest_segment_is_live_or_current(self) -> None:
        segments = self.store.segments
        assert len(segments) == 1 or self.store.index.counts.get(segments[0].number)

    @invariant()
    def disk_use_is_bounded(self) -> None:
        if not self.store.compaction_due():
            assert self.store.disk_bytes() <= 2 * (self.store.index.total_live_bytes + 2048) + (
                2048 + 1000
            )

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory)


CompactionMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("JOURNAL_MACHINE_EXAMPLES", "40")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCompaction = CompactionMachine.TestCase


@async_test
async def test_unexpected_writer_failure_fails_records_and_is_logged(
    tmp_path: Path, reactor: Any
) -> None:
    """
    A bug in the write path (an exception other than an I/O error) does not
    leave callers waiting nor end the writer: the records of the batch and
    those queued after it fail with L{JournalUnavailable}, the failure is
    logged once, and the journal stops accepting; it is handled as an I/O
    error, so the journal tries again by itself and accepts once writing
    works.
    """
    logged: list[dict[str, Any]] = []
    broken = threading.Event()

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if broken.is_set():
            raise RuntimeError("bug")
        return os.pwrite(fd, data, offset)

    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split, file_ops=FileOps(pwrite=pwrite))
    journal._log = Logger(observer=cast(ILogObserver, logged.append))
    kept = await journal.accept(envelope(0), body(0))
    broken.set()
    first = journal.accept(envelope(1), body(1))
    with pytest.raises(JournalUnavailable):
        await first
    with pytest.raises(JournalUnavailable):
        await journal.accept(envelope(2), body(2))
    assert journal.accepting is False
    failures = [event["log_failure"] for event in logged if event.get("log_failure")]
    assert len(failures) == 1
    assert failures[0].check(RuntimeError)
    broken.clear()
    split.clock.advance(5.0)
    await journal.compact()
    assert journal.accepting is True
    third = await journal.accept(envelope(3), body(3))
    await journal.stop()
    assert [(m.envelope.queue_id, m.location) for m in replayed(tmp_path)] == [
        ("Q00000000", kept),
        ("Q00000003", third),
    ]
