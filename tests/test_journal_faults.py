"""
Tests for L{smtpgw.journal} when housekeeping fails and when queue ids
collide: a batch that reached the disk is always reported durable, a
failing housekeeping step (rotation, compaction, deletion of dead segments,
the index update) is logged and tried again later and never ends the
writer thread, and an accept never takes the place of a live message.

Faults are injected by replacing one method of the journal's segment store
(or a L{FileOps} call); timers run on a L{Clock} through L{SplitReactor}.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent
from twisted.python.failure import Failure

from smtpgw.interfaces import JournalLocation, JournalUnavailable
from smtpgw.journal import (
    DEFAULT_RETRY_INTERVAL,
    HOUSEKEEPING_RETRY_MAX,
    FileJournal,
    FileOps,
    QueueIdInUse,
    _Lookup,
    _SegmentStore,
)
from smtpgw.journal_codec import (
    SEGMENT_HEADER_SIZE,
    JournalRecordError,
    RecordType,
    decode_segment_header,
    encode_accept,
    encode_record,
    encode_segment_header,
    encode_state,
    walk_records,
)
from tests.test_journal import (
    FaultyDisk,
    SplitReactor,
    _no_writer_thread_left,
    body,
    envelope,
    infos,
    reactor,
    replayed,
    segment_path,
    started,
    summary,
    warnings,
)
from tests.twisted_support import async_test

__all__ = ["_no_writer_thread_left", "infos", "reactor", "warnings"]


class Reports:
    """
    Wraps the store's housekeeping reports so a test can wait, from the
    reactor thread, until the writer has reported a number of them (and
    until the reactor has handled them: they are queued before the wait
    ends).
    """

    def __init__(self, journal: FileJournal) -> None:
        self._report = journal._store.report_housekeeping
        self._cond = threading.Condition()
        self.seen: list[tuple[str, bool]] = []
        journal._store.report_housekeeping = self._observe

    def _observe(self, step: str, failure: Failure | None) -> None:
        self._report(step, failure)
        with self._cond:
            self.seen.append((step, failure is not None))
            self._cond.notify_all()

    def _wait(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.seen) >= count, 10)

    async def wait_for(self, count: int) -> list[tuple[str, bool]]:
        """
        @return: the reports (step, failed) once there are C{count}.
        """
        await deferToThread(self._wait, count)
        return list(self.seen)


def failures_logged(logged_errors: list[dict[str, Any]]) -> list[str]:
    """
    @return: the text of the failures logged so far, which are taken out
        of C{logged_errors} (they were expected).
    """
    texts = [formatEvent(event) for event in logged_errors]
    logged_errors.clear()
    return texts


def write_segment(directory: Path, number: int, payloads: list[Any]) -> None:
    """
    Write segment C{number} by hand, records exactly as given.
    """
    key = os.urandom(8)
    data = encode_segment_header(number, key)
    data += b"".join(encode_record(key, payload) for payload in payloads)
    segment_path(directory, number).write_bytes(data)


def record_types(path: Path) -> list[tuple[RecordType, str]]:
    """
    @return: the type and queue id of each ACCEPT and COPY record in a segment.
    """
    data = path.read_bytes()
    key = decode_segment_header(data).key
    return [
        (rtype, meta[1 : 1 + meta[0]].decode())
        for _, rtype, _, meta in written_records(data, key)
        if rtype in (RecordType.ACCEPT, RecordType.COPY)
    ]


def written_records(data: bytes, key: bytes) -> list[tuple[int, RecordType, int, bytes]]:
    """
    @return: the records of a segment file as L{walk_records} gives them,
        up to the zeros a running journal writes ahead of them (and only
        zeros may follow them).
    """
    found: list[tuple[int, RecordType, int, bytes]] = []
    walker = walk_records(data, SEGMENT_HEADER_SIZE, len(data), key, False)
    while True:
        try:
            found.append(next(walker))
        except StopIteration:
            return found
        except JournalRecordError:
            end = found[-1][0] + found[-1][2] if found else SEGMENT_HEADER_SIZE
            assert not any(data[end:]), f"damage, not zeros, after offset {end}"
            return found


async def fill_segments(journal: FileJournal, count: int) -> list[JournalLocation]:
    """
    Accept C{count} messages of 1000 bytes (several per segment of 8 KiB).
    """
    return [await journal.accept(envelope(n), body(n, 1000)) for n in range(count)]


# A durable batch is reported durable


@async_test
async def test_batch_is_durable_even_when_compaction_then_fails(
    tmp_path: Path, reactor: Any, logged_errors: list[dict[str, Any]]
) -> None:
    """
    A record written in the same batch as a compaction barrier whose
    compaction raises is reported durable (it is), the failure is logged,
    and the writer goes on: later records are written, the journal keeps
    accepting and the failure is counted.
    """
    disk = FaultyDisk()
    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split, file_ops=disk.ops())
    reports = Reports(journal)

    def broken() -> None:
        raise RuntimeError("compaction bug")

    journal._store.compact_fully = broken  # type: ignore[method-assign]
    disk.sync_gate = threading.Event()
    first = journal.accept(envelope(1), body(1))
    await deferToThread(disk.in_sync.wait, 10)
    # Both land in the batch after the one held in fdatasync.
    second = journal.accept(envelope(2), body(2))
    barrier = journal.compact()
    disk.sync_gate.set()
    await first
    location = await second
    await barrier
    assert await reports.wait_for(1) == [("compaction", True)]
    assert location.segment == 1
    assert journal.accepting is True
    third = await journal.accept(envelope(3), body(3))
    assert third.offset == location.offset + location.length
    assert journal.stats().housekeeping_failures == 1
    [text] = failures_logged(logged_errors)
    assert "compaction failed" in text
    assert "tried again in 5 seconds" in text
    await journal.stop()
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == [
        "Q00000001",
        "Q00000002",
        "Q00000003",
    ]


@async_test
async def test_failing_compaction_is_retried_later_with_backoff(
    tmp_path: Path, reactor: Any, logged_errors: list[dict[str, Any]], infos: list[str]
) -> None:
    """
    When planning compaction copies raises, the records of the batch are
    still written and acknowledged; compaction is left alone (no log flood,
    no busy loop) until a retry C{retry_interval} seconds later, then twice
    as long after each new failure; once it works again that is logged and
    the old segment is compacted away.
    """
    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split, segment_size=8 * 1024)
    reports = Reports(journal)
    await fill_segments(journal, 40)
    original = journal._store.plan_copies
    broken = threading.Event()
    broken.set()

    def plan_copies() -> Any:
        if broken.is_set():
            raise RuntimeError("planning bug")
        return original()

    journal._store.plan_copies = plan_copies  # type: ignore[method-assign]
    # Segment 1 becomes mostly dead: compaction is due.
    delivered = [journal.record_state(f"Q{n:08d}", "delivered") for n in range(40) if n != 3]
    await gatherResults(delivered)
    assert await reports.wait_for(1) == [("compaction", True)]
    assert [call.getTime() for call in split.clock.getDelayedCalls()] == [DEFAULT_RETRY_INTERVAL]
    # Further batches do not try again before the retry.
    await journal.accept(envelope(50), body(50))
    assert journal.stats().housekeeping_failures == 1

    split.clock.advance(DEFAULT_RETRY_INTERVAL)
    assert await reports.wait_for(2) == [("compaction", True)] * 2
    assert [call.getTime() - split.clock.seconds() for call in split.clock.getDelayedCalls()] == [
        2 * DEFAULT_RETRY_INTERVAL
    ]
    assert len(failures_logged(logged_errors)) == 2

    broken.clear()
    split.clock.advance(2 * DEFAULT_RETRY_INTERVAL)
    assert (await reports.wait_for(3))[-1] == ("compaction", False)
    await journal.compact()
    assert not segment_path(tmp_path, 1).exists()
    assert any("compaction works again" in text for text in infos)
    assert split.clock.getDelayedCalls() == []
    await journal.stop()
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == ["Q00000003", "Q00000050"]


@async_test
async def test_backoff_of_housekeeping_retries_is_capped(
    tmp_path: Path, reactor: Any, logged_errors: list[dict[str, Any]]
) -> None:
    """
    The wait before a retry doubles with each failure in a row, up to
    L{HOUSEKEEPING_RETRY_MAX}.
    """
    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split)
    waits = []
    for _ in range(9):
        journal._housekeeping_report("compaction", Failure(RuntimeError("bug")))
        [call] = split.clock.getDelayedCalls()
        waits.append(call.getTime() - split.clock.seconds())
        call.cancel()
        journal._housekeeping_retry = None
    assert waits == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]
    assert HOUSEKEEPING_RETRY_MAX == 300.0
    assert len(failures_logged(logged_errors)) == 9
    journal._housekeeping_report("compaction", None)
    journal._housekeeping_report("compaction", Failure(RuntimeError("bug")))
    [call] = split.clock.getDelayedCalls()
    assert call.getTime() - split.clock.seconds() == 5.0
    failures_logged(logged_errors)
    await journal.stop()
    assert split.clock.getDelayedCalls() == []


@async_test
async def test_failing_deletion_of_dead_segments_never_ends_the_writer(
    tmp_path: Path, reactor: Any, logged_errors: list[dict[str, Any]], infos: list[str]
) -> None:
    """
    When deleting dead segments raises, the records of the batch are
    reported durable and the writer goes on; the deletion is tried again
    after C{retry_interval} and then deletes them.
    """
    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split, segment_size=8 * 1024)
    reports = Reports(journal)
    await fill_segments(journal, 20)
    original = journal._store.delete_dead_segments
    broken = threading.Event()
    broken.set()

    def delete_dead_segments() -> None:
        if broken.is_set():
            raise RuntimeError("deletion bug")
        original()

    journal._store.delete_dead_segments = delete_dead_segments  # type: ignore[method-assign]
    await gatherResults([journal.record_state(f"Q{n:08d}", "delivered") for n in range(20)])
    assert await reports.wait_for(1) == [("deletion of dead segments", True)]
    assert segment_path(tmp_path, 1).exists()
    assert journal.accepting is True
    assert (await journal.accept(envelope(30), body(30))).segment > 1
    [text] = failures_logged(logged_errors)
    assert "deletion of dead segments failed" in text

    broken.clear()
    split.clock.advance(DEFAULT_RETRY_INTERVAL)
    assert (await reports.wait_for(2))[-1] == ("deletion of dead segments", False)
    assert not segment_path(tmp_path, 1).exists()
    assert any("deletion of dead segments works again" in text for text in infos)
    await journal.stop()
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == ["Q00000030"]


def test_closing_a_read_descriptor_that_fails_does_not_stop_deletion(
    tmp_path: Path, warnings: list[str]
) -> None:
    """
    An error closing the descriptor compaction read a dead segment through
    is a warning: the segment is deleted all the same.
    """
    store = _SegmentStore(str(tmp_path), _Lookup(), _logger(), 2048, 0.25, 1024, FileOps())
    store.open()
    try:
        for n in range(4):
            store.commit([encode_accept(envelope(n), body(n, 900))])
        assert len(store.segments) > 1
        store.commit([encode_state(f"Q{n:08d}", "delivered") for n in range(4)])
        bad_fd = 1 << 30
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(bad_fd)
        store.segments[0].read_fd = bad_fd
        store.delete_dead_segments()
        assert not segment_path(tmp_path, 1).exists()
        assert any("closing segment 1" in text for text in warnings)
    finally:
        store.close()


def test_segment_that_cannot_be_opened_after_creation_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warnings: list[str]
) -> None:
    """
    When a new segment was created but cannot be opened for writing, its
    file is removed, so that the next rotation can create it again rather
    than fail for ever on the existing name.
    """
    store = _SegmentStore(str(tmp_path), _Lookup(), _logger(), 2048, 0.25, 1024, FileOps())
    store.open()
    try:
        real_open = os.open
        second = str(segment_path(tmp_path, 2))

        def failing_open(path: Any, flags: int, *args: Any) -> int:
            if os.fspath(path) == second and not flags & os.O_CREAT:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return real_open(path, flags, *args)

        monkeypatch.setattr(os, "open", failing_open)
        store.commit([encode_accept(envelope(0), body(0, 2100))])
        assert not segment_path(tmp_path, 2).exists()
        assert any("cannot start a new segment" in text for text in warnings)
        monkeypatch.setattr(os, "open", real_open)
        location = store.commit([encode_accept(envelope(1), body(1))])
        assert isinstance(location, list)
        assert location[0].segment == 1
        store.commit([encode_accept(envelope(2), body(2))])
        assert [segment.number for segment in store.segments] == [1, 2]
    finally:
        store.close()


def _logger() -> Any:
    from twisted.logger import Logger

    return Logger()


@async_test
async def test_unexpected_rotation_error_is_housekeeping(
    tmp_path: Path, reactor: Any, logged_errors: list[dict[str, Any]]
) -> None:
    """
    When starting a new segment raises something other than an I/O error,
    the record that filled the segment is reported durable, the segment
    grows without another try (nor another log) until the retry, which
    rotates.
    """
    split = SplitReactor(reactor, Clock())
    length = encode_accept(envelope(0), body(0, 1000)).length
    journal = started(tmp_path, split, segment_size=SEGMENT_HEADER_SIZE + 2 * length)
    reports = Reports(journal)
    original = journal._store._start_new_segment
    broken = threading.Event()
    broken.set()

    def start_new_segment() -> None:
        if broken.is_set():
            raise RuntimeError("rotation bug")
        original()

    journal._store._start_new_segment = start_new_segment  # type: ignore[method-assign]
    locations = await fill_segments(journal, 4)
    assert [location.segment for location in locations] == [1, 1, 1, 1]
    assert await reports.wait_for(1) == [("segment rotation", True)]
    assert len(failures_logged(logged_errors)) == 1
    broken.clear()
    split.clock.advance(DEFAULT_RETRY_INTERVAL)
    assert (await reports.wait_for(2))[-1] == ("segment rotation", False)
    assert (await journal.accept(envelope(4), body(4, 1000))).segment == 2
    await journal.stop()
    assert len(replayed(tmp_path)) == 5


@async_test
async def test_index_failure_keeps_the_record_durable_and_stops_compaction(
    tmp_path: Path, reactor: Any, logged_errors: list[dict[str, Any]]
) -> None:
    """
    If applying a written record to the index raises, the record is still
    reported durable; since the index may now be wrong, no segment is
    compacted or deleted (no retry either) until a restart rebuilds it,
    and that restart replays everything.
    """
    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split, segment_size=8 * 1024)
    reports = Reports(journal)
    index = journal._store.index
    original = index.on_accept

    def on_accept(queue_id: str, segment: int, offset: int, length: int) -> None:
        if queue_id == "Q00000002":
            raise RuntimeError("index bug")
        original(queue_id, segment, offset, length)

    index.on_accept = on_accept  # type: ignore[method-assign]
    locations = await fill_segments(journal, 20)
    assert len(set(locations)) == 20
    assert await reports.wait_for(1) == [("index update", True)]
    [text] = failures_logged(logged_errors)
    assert "until the gateway restarts" in text
    # Q00000002 is live, but not in the index: deleting segment 1 would lose it.
    await gatherResults(
        [journal.record_state(f"Q{n:08d}", "delivered") for n in range(19) if n != 2]
    )
    await journal.compact()
    assert segment_path(tmp_path, 1).exists()
    assert split.clock.getDelayedCalls() == []
    await journal.stop()
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == ["Q00000002", "Q00000019"]


@async_test
async def test_unexpected_error_writing_compaction_copies_is_housekeeping(
    tmp_path: Path, reactor: Any, logged_errors: list[dict[str, Any]]
) -> None:
    """
    A write of compaction copies that raises something other than an I/O
    error during a full compaction is cut back and logged as a failed
    compaction, not as a failed write: the journal keeps accepting, the
    writer goes on and later records are written.
    """
    compacting = threading.Event()

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if compacting.is_set():
            raise RuntimeError("write bug")
        return os.pwrite(fd, data, offset)

    split = SplitReactor(reactor, Clock())
    journal = started(tmp_path, split, segment_size=8 * 1024, file_ops=FileOps(pwrite=pwrite))
    reports = Reports(journal)
    store = journal._store
    plan_copies, compact_fully = store.plan_copies, store.compact_fully

    def planned_only_by_full_compaction() -> Any:
        return plan_copies() if compacting.is_set() else []

    def full_compaction_that_fails_to_write() -> None:
        compacting.set()
        try:
            compact_fully()
        finally:
            compacting.clear()

    store.plan_copies = planned_only_by_full_compaction  # type: ignore[method-assign]
    store.compact_fully = full_compaction_that_fails_to_write  # type: ignore[method-assign]
    await fill_segments(journal, 40)
    await gatherResults(
        [journal.record_state(f"Q{n:08d}", "delivered") for n in range(40) if n != 3]
    )
    await journal.compact()
    assert await reports.wait_for(1) == [("compaction", True)]
    assert len(failures_logged(logged_errors)) == 1
    assert journal.accepting is True
    assert segment_path(tmp_path, 1).exists()
    assert (await journal.accept(envelope(60), body(60))).segment > 1
    await journal.stop()
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == ["Q00000003", "Q00000060"]


# Queue ids: an accept never takes the place of a live message


@async_test
async def test_accept_of_a_live_queue_id_is_refused(tmp_path: Path, reactor: Any) -> None:
    """
    A second accept with the queue id of a live message fails with
    L{QueueIdInUse} (a L{JournalUnavailable}: the client may retry) and is
    not written; the first message keeps its location, its bytes and its
    place in the replay. The journal keeps accepting. Once the first
    message is final, its id may be used again.
    """
    journal = started(tmp_path, reactor)
    first = await journal.accept(envelope(1), body(1))
    other = attrs.evolve(envelope(1), sender="other@example.com")
    with pytest.raises(QueueIdInUse, match="Q00000001"):
        await journal.accept(other, b"another message\r\n")
    assert issubclass(QueueIdInUse, JournalUnavailable)
    assert journal.accepting is True
    assert journal.stats().refused_queue_ids == 1
    assert (await journal.read(first)) == (envelope(1), body(1))
    await journal.record_state("Q00000001", "deferred", 1, 60.0)
    await journal.stop()
    assert summary(replayed(tmp_path)) == [("Q00000001", "deferred", 1, 60.0, 3)]

    again = started(tmp_path, reactor)
    with pytest.raises(QueueIdInUse):
        await again.accept(other, b"another message\r\n")
    await again.record_state("Q00000001", "delivered")
    reused = await again.accept(other, b"another message\r\n")
    assert (await again.read(reused)) == (other, b"another message\r\n")
    await again.stop()
    assert [(m.envelope.sender, m.location) for m in replayed(tmp_path)] == [
        ("other@example.com", reused)
    ]


@async_test
async def test_same_queue_id_twice_in_one_batch(tmp_path: Path, reactor: Any) -> None:
    """
    Two accepts with the same queue id in one group commit: the first is
    written, the second refused; the other records of the batch are
    written.
    """
    disk = FaultyDisk()
    journal = started(tmp_path, reactor, file_ops=disk.ops())
    disk.sync_gate = threading.Event()
    held = journal.accept(envelope(0), body(0))
    await deferToThread(disk.in_sync.wait, 10)
    first = journal.accept(envelope(1), body(1))
    duplicate = journal.accept(envelope(1), b"not this one\r\n")
    third = journal.accept(envelope(2), body(2))
    disk.sync_gate.set()
    await held
    location = await first
    with pytest.raises(QueueIdInUse):
        await duplicate
    await third
    assert journal.stats().last_batch_records == 2
    assert (await journal.read(location)) == (envelope(1), body(1))
    await journal.stop()
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == [
        "Q00000000",
        "Q00000001",
        "Q00000002",
    ]


@async_test
async def test_compaction_copies_are_copy_records(tmp_path: Path, reactor: Any) -> None:
    """
    The records compaction writes for live messages are COPY records, not
    ACCEPT records: a copy is told from a new message by its type, not by
    its queue id. Read back, a copy is the message.
    """
    journal = started(tmp_path, reactor, segment_size=8 * 1024)
    locations = await fill_segments(journal, 40)
    await gatherResults(
        [journal.record_state(f"Q{n:08d}", "delivered") for n in range(40) if n != 3]
    )
    await journal.compact()
    assert not segment_path(tmp_path, 1).exists()
    copies = [
        (rtype, queue_id)
        for path in sorted(tmp_path.glob("*.seg"))
        for rtype, queue_id in record_types(path)
        if queue_id == "Q00000003"
    ]
    assert copies == [(RecordType.COPY, "Q00000003")]
    assert (await journal.read(locations[3])) == (envelope(3), body(3, 1000))
    await journal.stop()
    assert [m.envelope.queue_id for m in replayed(tmp_path)] == ["Q00000003"]


def test_replay_of_an_accept_repeating_a_live_id_warns(
    tmp_path: Path, warnings: list[str]
) -> None:
    """
    A journal in which a later ACCEPT repeats the queue id of a live
    message (compaction copies written before COPY records existed) replays
    the later record, and says so once; a COPY repeating it is silent.
    """
    write_segment(
        tmp_path,
        1,
        [
            encode_accept(envelope(1), body(1)),
            encode_accept(envelope(2), body(2)),
            encode_accept(envelope(1), b"later\r\n"),
            encode_accept(envelope(2), body(2), copy=True),
            encode_accept(envelope(1), b"latest\r\n"),
        ],
    )
    messages = replayed(tmp_path)
    assert [m.envelope.queue_id for m in messages] == ["Q00000001", "Q00000002"]
    assert messages[0].location.length == encode_accept(envelope(1), b"latest\r\n").length
    [text] = [t for t in warnings if "repeat the queue id" in t]
    assert text.startswith("journal: 2 accept records")
