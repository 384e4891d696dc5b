"""
The journal: the durable record of every accepted message and of what
became of it.

On disk it is a directory of numbered segment files (C{000000000001.seg},
...; the format is in L{smtpgw.journal_codec}) and a C{LOCK} file held by
the process that uses them.

Who does what:
  - the reactor thread encodes each record (its checksums included) and
    queues it;
  - one writer thread takes everything queued, writes it with one write,
    makes it durable with one C{fdatasync} (group commit) and hands the
    whole batch's results back with one C{callFromThread}; while messages
    keep coming, it first waits a fraction of a millisecond for a few more
    (L{DEFAULT_GATHER}); between batches it rotates and compacts segments;
  - housekeeping (rotation, compaction, deleting dead segments) never
    decides the outcome of a batch: a batch that reached the disk is
    reported durable whatever happens after, and a housekeeping step that
    fails is logged, left alone for a while (L{DEFAULT_RETRY_INTERVAL},
    doubling up to L{HOUSEKEEPING_RETRY_MAX}) and tried again, while the
    journal goes on taking mail;
  - reads run on a thread pool;
  - replay, at start and before the writer runs, happens on the caller's
    thread.

Compaction: a segment is deleted once it is the oldest and none of its
messages is live (delivered, bounced and cancelled are final). Deleting
only the oldest keeps every state record of a live message on disk: those
records always come after the message's accept record. When the oldest
segment holds few live messages, or the journal takes much more room than
its live messages, the live messages of the oldest segment are copied
forward (a COPY record: their accept record with the current priority,
then their current state, with the recipients they still wait for), which
bounds disk use under sustained load. The queue's own state (a QUEUE
record: stopped by an admin) is written again in the current segment before
the segment that holds it is deleted, when it says stopped.

Queue ids: an ACCEPT whose queue id is live (accepted and not final) is
refused with L{QueueIdInUse} rather than written: only COPY records may
repeat a live queue id, so a colliding id can never take the place of an
earlier message.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import gc
import math
import mmap
import os
import re
import threading
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import Any, TypeVar

import attrs
from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from smtpgw.interfaces import IJournal, JournaledMessage, JournalLocation, JournalUnavailable
from smtpgw.journal_codec import (
    FINAL_STATES,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    SEGMENT_KEY_SIZE,
    AcceptRecord,
    CorruptRecord,
    JournalRecordError,
    Payload,
    RecordHeader,
    RecordType,
    TruncatedRecord,
    UnsupportedRecord,
    accept_queue_id,
    decode_envelope,
    decode_priority,
    decode_queue_state,
    decode_record,
    decode_segment_header,
    decode_state,
    encode_accept,
    encode_noop,
    encode_priority,
    encode_queue_state,
    encode_segment_header,
    encode_state,
    frame_header,
    read_header,
    walk_records,
)
from smtpgw.model import Envelope, Priority

__all__ = [
    "DEFAULT_COMPACTION_CHUNK",
    "DEFAULT_COMPACT_LIVE_RATIO",
    "DEFAULT_RETRY_INTERVAL",
    "DEFAULT_SEGMENT_SIZE",
    "DEFAULT_UNHURRIED_DELAY",
    "HOUSEKEEPING_RETRY_MAX",
    "PREALLOCATE_AHEAD",
    "PREALLOCATE_WHEN_WITHIN",
    "FileJournal",
    "FileOps",
    "JournalFormatError",
    "JournalLocked",
    "JournalReadError",
    "JournalStats",
    "QueueIdInUse",
]

DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
"""A segment is closed and a new one started once it reaches this size."""

PREALLOCATE_AHEAD = 1024 * 1024
"""Zeros are written this far past the records of the segment being
written, once they come within L{PREALLOCATE_WHEN_WITHIN} of the end of
what is written: a later record then overwrites blocks that exist, and its
fdatasync has only the data to flush, not the file's new size (the file
system's own journal commit). On ext4 that takes a third less CPU and half
the time for each group commit."""

PREALLOCATE_WHEN_WITHIN = 256 * 1024

_ZEROS = memoryview(bytes(PREALLOCATE_AHEAD))

DEFAULT_COMPACT_LIVE_RATIO = 0.25
"""The oldest segment is compacted when its live messages take at most this
share of it."""

DEFAULT_COMPACTION_CHUNK = 4 * 1024 * 1024
"""At most this many bytes of live messages are copied forward per group
commit, so compaction never holds back acknowledgements for long."""

DEFAULT_RETRY_INTERVAL = 5.0
"""Seconds between attempts to write again after a write failed, and the
first wait before a failed housekeeping step is tried again."""

DEFAULT_UNHURRIED_DELAY = 0.1
"""A record nothing waits on (C{urgent=False}) goes to disk with the next
urgent record's group commit, or at the latest this many seconds after it
was submitted."""

DEFAULT_GATHER = 0.0003
"""Unless the journal is told what is coming (L{DEFAULT_GATHER_EXPECTED}):
while the journal is busy (see L{GATHER_WHEN_BUSY_WITHIN}), the writer,
woken by an urgent record with fewer than L{GATHER_RECORDS} records
waiting, waits up to this many seconds for more before it writes: under a
steady stream of messages, each C{fdatasync} then makes several durable
instead of one (the disk's sync costs as much for one record as for ten).
C{0} turns it off."""

GATHER_RECORDS = 3
"""The writer stops gathering as soon as this many records wait."""

DEFAULT_GATHER_EXPECTED = 0.001
"""When the journal is told how many messages are about to come (sessions
in DATA: L{FileJournal.expected_soon}), the writer, woken by an urgent
record while busy (L{GATHER_WHEN_BUSY_WITHIN}), waits up to this many
seconds for that many more urgent records instead of L{DEFAULT_GATHER}'s
guess, and not at all when none is coming: a client that sends one message
after another waits for no one. C{0} turns waiting off when told."""

GATHER_EXPECTED_MOST = 8
"""When told, the writer waits until this many urgent records are queued at
most (those queued already included)."""

GATHER_WHEN_BUSY_WITHIN = 0.002
"""The journal counts as busy when its last group commit ended less than
this many seconds before: a lone message, after a quiet spell, is written
at once."""

HOUSEKEEPING_RETRY_MAX = 300.0
"""The longest wait, in seconds, before a housekeeping step that keeps
failing is tried again (the wait doubles from the retry interval)."""

_SEGMENT_NAME = re.compile(r"\A(\d{12})\.seg\Z")
_LOCK_NAME = "LOCK"
# After these the file is as it was before the write: the same file is
# used again once there is room. After any other error (EIO...) the page
# cache may no longer match the disk, so writing goes on in a new segment.
_CLEAN_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# The housekeeping steps, as logged.
_ROTATION = "segment rotation"
_COMPACTION = "compaction"
_DELETION = "deletion of dead segments"
_INDEX = "index update"


class JournalReadError(Exception):
    """
    A message could not be read back: damaged bytes, an I/O error, or a
    location that is no longer in the journal.
    """


class JournalFormatError(Exception):
    """
    The journal holds intact records of a format this code does not know
    (written by a newer gateway): it refuses to open rather than skip them.
    """


class JournalLocked(Exception):
    """
    Another process uses this journal directory.
    """


class QueueIdInUse(JournalUnavailable):
    """
    An accept was refused because its queue id belongs to a message that is
    still live in the journal: writing it would hide the earlier message.
    Nothing was written; the session answers with a temporary failure and
    the client's retry gets a fresh id.
    """


def _default_pwrite(fd: int, data: memoryview, offset: int) -> int:
    return os.pwrite(fd, data, offset)


def _default_fdatasync(fd: int) -> None:
    os.fdatasync(fd)


@frozen
class FileOps:
    """
    The system calls that make records durable; tests replace them to
    simulate a full or failing disk.
    """

    pwrite: Callable[[int, memoryview, int], int] = _default_pwrite
    fdatasync: Callable[[int], None] = _default_fdatasync


@frozen
class JournalStats:
    """
    Counters for metrics, since the journal was opened.

    @ivar fsyncs: group commits made durable.
    @ivar records: records written (copies made by compaction included).
    @ivar last_batch_records: records made durable by the last fsync.
    @ivar last_fsync_seconds: how long the last fsync took.
    @ivar write_errors: group commits that failed.
    @ivar copied_records: accept records copied forward by compaction.
    @ivar deleted_segments: segment files deleted by compaction.
    @ivar housekeeping_failures: rotation, compaction or deletion steps
        that failed unexpectedly (each is logged and retried later).
    @ivar refused_queue_ids: accepts refused because their queue id was live.
    """

    fsyncs: int
    records: int
    bytes_written: int
    last_batch_records: int
    last_fsync_seconds: float
    write_errors: int
    segments: int
    disk_bytes: int
    live_messages: int
    live_bytes: int
    copied_records: int
    deleted_segments: int
    housekeeping_failures: int
    refused_queue_ids: int

    @property
    def records_per_fsync(self) -> float:
        """
        @return: the average batch size.
        """
        return self.records / self.fsyncs if self.fsyncs else 0.0


class _Live:
    """
    Where a live message's accept record lies and what state it is in.

    A slotted class: there is one per queued message, a million of them in
    a big queue.

    @ivar priority: set by a re-prioritization, else L{None}.
    @ivar progress: once some recipients are done (a PROGRESS record), the
        recipients still to be tried and those that bounced; else L{None}.
    @ivar moved_from: earlier locations of a record compaction copied.
    @ivar meta: the accept metadata, kept from replay's scan until the
        messages are built.
    """

    __slots__ = (
        "attempts",
        "length",
        "meta",
        "moved_from",
        "next_attempt_at",
        "offset",
        "priority",
        "progress",
        "segment",
        "state",
    )

    def __init__(self, segment: int, offset: int, length: int) -> None:
        self.segment = segment
        self.offset = offset
        self.length = length
        self.state = "queued"
        self.attempts = 0
        self.next_attempt_at = 0.0
        self.priority: Priority | None = None
        self.progress: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self.moved_from: list[JournalLocation] | None = None
        self.meta: bytes | None = None

    def location(self) -> JournalLocation:
        return JournalLocation(self.segment, self.offset, self.length)


class _Index:
    """
    The live messages and how many of them each segment holds, kept by
    applying records in journal order (at replay and after each commit).

    @ivar paused: what the latest QUEUE record says.
    @ivar queue_segment: the segment that holds the latest QUEUE record, or
        L{None}.
    """

    def __init__(self) -> None:
        self.live: dict[str, _Live] = {}
        self.counts: dict[int, int] = {}
        self.live_bytes: dict[int, int] = {}
        self.total_live_bytes = 0
        self.paused = False
        self.queue_segment: int | None = None

    def on_queue_state(self, paused: bool, segment: int) -> None:
        """
        The queue's own state changed.
        """
        self.paused = paused
        self.queue_segment = segment

    def _add(self, segment: int, length: int) -> None:
        self.counts[segment] = self.counts.get(segment, 0) + 1
        self.live_bytes[segment] = self.live_bytes.get(segment, 0) + length
        self.total_live_bytes += length

    def _remove(self, segment: int, length: int) -> None:
        count = self.counts[segment] - 1
        if count:
            self.counts[segment] = count
            self.live_bytes[segment] -= length
        else:
            del self.counts[segment]
            del self.live_bytes[segment]
        self.total_live_bytes -= length

    def on_accept(self, queue_id: str, segment: int, offset: int, length: int) -> None:
        """
        A new message.

        @raise ValueError: if C{queue_id} is live (the writer refuses such
            an accept before writing it, so this is a bug).
        """
        if queue_id in self.live:
            raise ValueError(f"accept record for live queue id {queue_id}")
        self.live[queue_id] = _Live(segment, offset, length)
        self._add(segment, length)

    def on_copy(self, queue_id: str, segment: int, offset: int, length: int) -> _Live | None:
        """
        A copy made by compaction: the message's state is kept.

        @return: the entry, whose C{moved_from} now holds its earlier
            location; L{None} if the message is no longer live.
        """
        entry = self.live.get(queue_id)
        if entry is None:
            return None
        if entry.moved_from is None:
            entry.moved_from = []
        entry.moved_from.append(entry.location())
        self._remove(entry.segment, entry.length)
        entry.segment, entry.offset, entry.length = segment, offset, length
        self._add(segment, length)
        return entry

    def on_state(
        self,
        queue_id: str,
        state: str,
        attempts: int,
        next_attempt_at: float,
        progress: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
    ) -> _Live | None:
        """
        @param progress: the remaining and bounced recipients of a PROGRESS
            record; L{None} keeps those the entry has.
        @return: the entry, when the message reached a final state and left.
        """
        entry = self.live.get(queue_id)
        if entry is None:
            # Its accept record was compacted away: it was final already.
            return None
        if state in FINAL_STATES:
            del self.live[queue_id]
            self._remove(entry.segment, entry.length)
            return entry
        entry.state = state
        entry.attempts = attempts
        entry.next_attempt_at = next_attempt_at
        if progress is not None:
            entry.progress = progress
        return None

    def recount(self) -> None:
        """
        Count what each segment holds; replay fills L{live} directly.
        """
        counts: dict[int, int] = {}
        sizes: dict[int, int] = {}
        for entry in self.live.values():
            segment = entry.segment
            counts[segment] = counts.get(segment, 0) + 1
            sizes[segment] = sizes.get(segment, 0) + entry.length
        self.counts, self.live_bytes = counts, sizes
        self.total_live_bytes = sum(sizes.values())

    def on_priority(self, queue_id: str, priority: Priority) -> None:
        entry = self.live.get(queue_id)
        if entry is not None:
            entry.priority = priority

    def members(self, segment: int) -> deque[str]:
        """
        @return: the live messages whose accept record is in C{segment}.
        """
        return deque(qid for qid, entry in self.live.items() if entry.segment == segment)


class _Lookup:
    """
    What reader threads need to find a record: the key of each segment on
    disk, and where compaction moved records to. Shared between threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[int, bytes] = {}
        self._redirects: dict[JournalLocation, JournalLocation] = {}

    def add_segment(self, number: int, key: bytes) -> None:
        with self._lock:
            self._keys[number] = key

    def remove_segment(self, number: int) -> None:
        with self._lock:
            self._keys.pop(number, None)

    def moved(self, previous: Sequence[JournalLocation], now: JournalLocation) -> None:
        with self._lock:
            for location in previous:
                self._redirects[location] = now

    def forget(self, previous: Sequence[JournalLocation]) -> None:
        with self._lock:
            for location in previous:
                self._redirects.pop(location, None)

    def resolve(self, location: JournalLocation) -> tuple[JournalLocation, bytes | None]:
        """
        @return: where the record is now, and the key of its segment
            (L{None} if that segment is gone).
        """
        with self._lock:
            current = self._redirects.get(location, location)
            return current, self._keys.get(current.segment)


@define(eq=False)
class _Segment:
    """
    @ivar size: where its records end (and the next one goes).
    @ivar allocated: how much of its file is written, records and the zeros
        past them (L{PREALLOCATE_AHEAD}); at least C{size} once known.
    """

    number: int
    key: bytes = field(repr=False)
    path: str
    size: int
    read_fd: int | None = None
    allocated: int = 0


@define(eq=False)
class _Pending:
    """
    A record waiting for the writer; a barrier (no payload) takes up the
    suspended housekeeping steps instead and, when C{compact}, waits for
    compaction to finish.
    """

    payload: Payload | None
    deferred: Deferred[Any]
    gives_location: bool = False
    compact: bool = False


# Per record: where it lies, or why it alone was refused (barriers: None);
# or what failed the whole batch.
_Outcome = Sequence[JournalLocation | Exception | None] | BaseException
_T = TypeVar("_T")
_Visit = Callable[[RecordType, bytes, int, int], None]


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _intact_records(
    mm: mmap.mmap, start: int, end: int, key: bytes, bodies: bool
) -> tuple[list[tuple[int, RecordHeader, bytes]], int, str | None]:
    """
    @return: the intact records from C{start} on (as L{walk_records} gives
        them), where they stop, and why (L{None} if at C{end}).
    """
    found: list[tuple[int, RecordHeader, bytes]] = []
    position = start
    try:
        for offset, _rtype, length, meta in walk_records(mm, start, end, key, bodies):
            found.append((offset, read_header(mm, offset, key, end), meta))
            position = offset + length
    except (TruncatedRecord, CorruptRecord) as e:
        return found, position, str(e)
    return found, position, None


def _resync(mm: mmap.mmap, start: int, end: int, key: bytes, bodies: bool) -> int | None:
    """
    @return: the offset of the next intact record at or after C{start}, or
        L{None}. The segment key starts every record and cannot come from
        a message body, so no body is ever taken for a record.
    """
    position = mm.find(key, start, end)
    while position != -1:
        try:
            next(walk_records(mm, position, end, key, bodies))
        except (TruncatedRecord, CorruptRecord):
            position = mm.find(key, position + 1, end)
        else:
            return position
    return None


def _zeros_to_end(mm: mmap.mmap, start: int, end: int) -> bool:
    """
    Whether nothing but zeros lies from C{start} to C{end}: space written
    ahead of the records (L{PREALLOCATE_AHEAD}), not damage.
    """
    while start < end:
        length = min(len(_ZEROS), end - start)
        if mm[start : start + length] != _ZEROS[:length]:
            return False
        start += length
    return True


def _write_all(ops: FileOps, fd: int, data: bytes | memoryview, offset: int) -> None:
    with memoryview(data) as view:
        while view:
            written = ops.pwrite(fd, view, offset)
            if written <= 0:
                raise OSError(errno.EIO, "write made no progress")
            offset += written
            view = view[written:]


def _accepted_at(message: JournaledMessage) -> float:
    return message.envelope.accepted_at


def _progress_of(
    remaining: tuple[str, ...] | None, bounced: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    return None if remaining is None else (remaining, bounced)


def _state_of(queue_id: str, entry: _Live) -> Payload:
    """
    @return: the record of the current state of a live message, as
        compaction writes it after the message's copy.
    """
    progress = entry.progress
    if progress is None:
        return encode_state(queue_id, entry.state, entry.attempts, entry.next_attempt_at)
    return encode_state(
        queue_id,
        entry.state,
        entry.attempts,
        entry.next_attempt_at,
        remaining=progress[0],
        bounced=progress[1],
    )


class _SegmentStore:
    """
    The segment files and the index of live messages. Used by one thread
    at a time: the opening thread at replay, then the writer thread.

    @ivar warn: logs a warning; L{FileJournal} points it at the reactor
        thread while the writer runs.
    @ivar report_housekeeping: called with a step's name and the failure
        when a housekeeping step fails unexpectedly, and with L{None} once
        the step that failed works again; L{FileJournal} points it at the
        reactor thread, which logs and schedules the retry.
    @ivar suspended: the housekeeping steps that failed and are not tried
        again until L{retry_housekeeping}.
    @ivar index_trusted: cleared if applying written records to the index
        failed: the index may then be wrong, so no segment is compacted or
        deleted until a restart rebuilds it from the disk.
    """

    def __init__(
        self,
        directory: str,
        lookup: _Lookup,
        log: Logger,
        segment_size: int,
        compact_live_ratio: float,
        compaction_chunk: int,
        file_ops: FileOps,
    ) -> None:
        self.directory = directory
        self.lookup = lookup
        self.warn: Callable[..., None] = log.warn
        self._log = log
        self.report_housekeeping: Callable[[str, Failure | None], None] = self._log_housekeeping
        self.segment_size = segment_size
        self.compact_live_ratio = compact_live_ratio
        self.compaction_chunk = compaction_chunk
        self.ops = file_ops
        self.index = _Index()
        self.segments: list[_Segment] = []
        self.write_fd = -1
        self.lock_fd = -1
        self.needs_new_segment = False
        self._rotation_failing = False
        self._write_ahead_failing = False
        self.compaction_blocked = False
        self.stuck: set[int] = set()
        self._copy_segment = -1
        self._copy_queue: deque[str] = deque()
        self.fsyncs = 0
        self.records = 0
        self.bytes_written = 0
        self.last_batch_records = 0
        self.last_fsync_seconds = 0.0
        self.write_errors = 0
        self.copied_records = 0
        self.deleted_segments = 0
        self.housekeeping_failures = 0
        self.refused_queue_ids = 0
        self.repeated_accepts = 0
        self.suspended: set[str] = set()
        self.index_trusted = True
        self._failing: set[str] = set()
        self.fsync_observer: Callable[[float], None] | None = None

    def _log_housekeeping(self, step: str, failure: Failure | None) -> None:
        if failure is not None:
            self._log.failure("journal: {step} failed", failure, step=step)

    # Opening and recovery

    def path(self, number: int) -> str:
        return os.path.join(self.directory, f"{number:012d}.seg")

    def open(self) -> None:
        """
        Lock the directory, check every segment, cut off a torn tail and
        build the index.
        """
        os.makedirs(self.directory, exist_ok=True)
        self._lock()
        numbers = sorted(
            int(match.group(1))
            for name in os.listdir(self.directory)
            if (match := _SEGMENT_NAME.match(name))
        )
        for position, number in enumerate(numbers):
            segment = self._check_segment_file(number, last=position == len(numbers) - 1)
            if segment is not None:
                self.segments.append(segment)
        if not self.segments or self.segments[-1].number != numbers[-1]:
            self.segments.append(self._create_segment(max(numbers, default=0) + 1))
        else:
            self._recover_tail()
        for segment in self.segments:
            self.lookup.add_segment(segment.number, segment.key)
        for segment in self.segments:
            self._scan(segment)
        if self.repeated_accepts:
            self.warn(
                "journal: {count} accept records repeat the queue id of a live message;"
                " each replaces the earlier one (journals written before compaction"
                " copies had a record type of their own)",
                count=self.repeated_accepts,
            )
        self.index.recount()
        self.write_fd = os.open(self.current.path, os.O_WRONLY | os.O_CLOEXEC)

    @property
    def current(self) -> _Segment:
        return self.segments[-1]

    def _lock(self) -> None:
        self.lock_fd = os.open(
            os.path.join(self.directory, _LOCK_NAME),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
            0o600,
        )
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            self.lock_fd = -1
            raise JournalLocked(f"{self.directory} is used by another process") from None

    def _check_segment_file(self, number: int, last: bool) -> _Segment | None:
        """
        @return: the segment, or L{None} if its file had to be set aside.
        """
        path = self.path(number)
        with open(path, "rb") as f:
            head = f.read(SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
        try:
            header = decode_segment_header(head)
        except UnsupportedRecord as e:
            raise JournalFormatError(f"{path}: {e}") from e
        except JournalRecordError as e:
            return self._damaged_segment_header(number, path, head, size, last, str(e))
        if header.number != number:
            self.warn(
                "journal segment {path} says it is segment {found}",
                path=path,
                found=header.number,
            )
        return _Segment(number, header.key, path, size)

    def _damaged_segment_header(
        self, number: int, path: str, head: bytes, size: int, last: bool, problem: str
    ) -> _Segment | None:
        key = head[SEGMENT_HEADER_SIZE : SEGMENT_HEADER_SIZE + SEGMENT_KEY_SIZE]
        try:
            read_header(head, SEGMENT_HEADER_SIZE, key, size)
        except JournalRecordError:
            pass
        else:
            self.warn(
                "journal segment {path} has a damaged header ({problem});"
                " its key was recovered from its first record",
                path=path,
                problem=problem,
            )
            return _Segment(number, key, path, size)
        if size <= SEGMENT_HEADER_SIZE:
            # Created but never written to (records follow a durable header).
            self.warn(
                "journal segment {path} was never completed ({problem}); recreating it",
                path=path,
                problem=problem,
            )
            os.unlink(path)
            return self._create_segment(number) if last else None
        quarantine = path + ".corrupt"
        suffix = 0
        while os.path.exists(quarantine):
            suffix += 1
            quarantine = f"{path}.corrupt-{suffix}"
        os.rename(path, quarantine)
        self.warn(
            "journal segment {path} is unreadable ({problem}); set aside as {quarantine}",
            path=path,
            problem=problem,
            quarantine=quarantine,
        )
        return None

    def _recover_tail(self) -> None:
        """
        Cut off what follows the last intact record of the last segment (a
        torn write, or garbage a crash left in unsynced blocks). Intact
        records found beyond damage are first copied into a new segment,
        so damage in the middle loses nothing that can still be read.
        """
        segment = self.current
        salvaged: list[Payload] = []
        with open(segment.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with mm:
            end = segment.size
            try:
                _, good_end, problem = _intact_records(
                    mm, SEGMENT_HEADER_SIZE, end, segment.key, True
                )
                if problem is None:
                    segment.allocated = end
                    return
                if _zeros_to_end(mm, good_end, end):
                    # Only the segment being written has zeros written
                    # ahead (they stop at the segment's size, where it is
                    # rotated), and a clean stop cuts them off.
                    self._log.info(
                        "journal segment {segment}: {zeros} bytes of zeros after its last"
                        " record, written ahead of the records, taken for their end"
                        " (the gateway did not stop cleanly)",
                        segment=segment.number,
                        zeros=end - good_end,
                    )
                    segment.size = good_end
                    segment.allocated = end
                    return
                position = _resync(mm, good_end + 1, end, segment.key, True)
                while position is not None:
                    found, stop, _ = _intact_records(mm, position, end, segment.key, True)
                    for offset, header, meta in found:
                        body_start = offset + RECORD_HEADER_SIZE + header.meta_length
                        body = mm[body_start : body_start + header.body_length]
                        salvaged.append(
                            Payload(header.type, meta, body, header.meta_crc, header.body_crc)
                        )
                    position = _resync(mm, stop + 1, end, segment.key, True)
            except UnsupportedRecord as e:
                raise JournalFormatError(f"{segment.path}: {e}") from e
        moved_to = None
        if salvaged:
            new = self._create_segment(segment.number + 1)
            self._append_durably(new, salvaged)
            self.segments.append(new)
            moved_to = new.number
        fd = os.open(segment.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, good_end)
            os.fsync(fd)
        finally:
            os.close(fd)
        segment.allocated = good_end
        self.warn(
            "journal segment {segment} has {dropped} torn or damaged bytes from offset"
            " {offset} ({problem}); cut off, {salvaged} intact records after them"
            " moved to segment {moved_to}",
            segment=segment.number,
            dropped=end - good_end,
            offset=good_end,
            problem=problem,
            salvaged=len(salvaged),
            moved_to=moved_to,
        )
        segment.size = good_end

    def _append_durably(self, segment: _Segment, payloads: Sequence[Payload]) -> None:
        data = b"".join(frame_header(segment.key, p) + p.meta + p.body for p in payloads)
        fd = os.open(segment.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            _write_all(self.ops, fd, data, segment.size)
            self.ops.fdatasync(fd)
        finally:
            os.close(fd)
        segment.size += len(data)

    def _scan(self, segment: _Segment) -> None:
        """
        Apply the records of C{segment} to the index, skipping damaged
        stretches (with a warning). Bodies are not read: only headers and
        metadata are checked, which keeps replay fast. L{_Index.recount}
        must follow.
        """
        if segment.size <= SEGMENT_HEADER_SIZE:
            return
        with open(segment.path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with mm:
            end = min(segment.size, len(mm))
            position: int | None = SEGMENT_HEADER_SIZE
            while position is not None:
                try:
                    stop, problem = self._apply_segment(mm, position, end, segment)
                except UnsupportedRecord as e:
                    raise JournalFormatError(f"{segment.path}: {e}") from e
                if problem is None:
                    return
                position = _resync(mm, stop + 1, end, segment.key, False)
                self.warn(
                    "journal segment {segment}: damaged record at offset {offset} ({problem});"
                    " skipped {skipped} bytes",
                    segment=segment.number,
                    offset=stop,
                    problem=problem,
                    skipped=(end if position is None else position) - stop,
                )

    def _apply_segment(
        self, mm: mmap.mmap, start: int, end: int, segment: _Segment
    ) -> tuple[int, str | None]:
        """
        The hot loop of replay: apply a segment's records from C{start} on.

        @return: where it stopped, and why (L{None} at C{end}).
        """
        live = self.index.live
        number = segment.number
        accept, copy = RecordType.ACCEPT, RecordType.COPY
        state, priority = RecordType.STATE, RecordType.PRIORITY
        progress, queue = RecordType.PROGRESS, RecordType.QUEUE
        position = start
        try:
            for offset, rtype, length, meta in walk_records(mm, start, end, segment.key, False):
                position = offset + length
                try:
                    if rtype is accept or rtype is copy:
                        queue_id = accept_queue_id(meta)
                        entry = live.get(queue_id)
                        if entry is None:
                            live[queue_id] = entry = _Live(number, offset, length)
                        else:
                            # A later record of a live message: a copy, or
                            # (journals written before COPY records existed,
                            # or a duplicate id) an ACCEPT that replaces it.
                            if rtype is accept:
                                self.repeated_accepts += 1
                            entry.segment, entry.offset, entry.length = number, offset, length
                        entry.meta = meta
                    elif rtype is state:
                        change = decode_state(meta)
                        entry = live.get(change.queue_id)
                        if entry is None:
                            continue
                        if change.state in FINAL_STATES:
                            del live[change.queue_id]
                        else:
                            entry.state = change.state
                            entry.attempts = change.attempts
                            entry.next_attempt_at = change.next_attempt_at
                    elif rtype is priority:
                        change_priority = decode_priority(meta)
                        self.index.on_priority(change_priority.queue_id, change_priority.priority)
                    elif rtype is progress:
                        change = decode_state(meta, progress=True)
                        self.index.on_state(
                            change.queue_id,
                            change.state,
                            change.attempts,
                            change.next_attempt_at,
                            _progress_of(change.remaining, change.bounced),
                        )
                    elif rtype is queue:
                        self.index.on_queue_state(decode_queue_state(meta).paused, number)
                except CorruptRecord as e:
                    # Intact by its checksums, yet undecodable: skip it alone.
                    self.warn(
                        "journal segment {segment}: undecodable record at offset {offset}:"
                        " {problem}",
                        segment=number,
                        offset=offset,
                        problem=str(e),
                    )
        except (TruncatedRecord, CorruptRecord) as e:
            return position, str(e)
        return position, None

    def messages(self) -> list[JournaledMessage]:
        """
        @return: the live messages as replay gives them, in acceptance order
            (by acceptance time; in journal order for equal times).
        """
        found: list[JournaledMessage] = []
        append = found.append
        undecodable = []
        latest = -math.inf
        in_order = True
        for queue_id, entry in self.index.live.items():
            meta, entry.meta = entry.meta, None
            try:
                envelope = decode_envelope(meta or b"")
            except CorruptRecord as e:
                self.warn(
                    "journal: cannot decode message {queue_id}: {problem}",
                    queue_id=queue_id,
                    problem=str(e),
                )
                undecodable.append(queue_id)
                continue
            if entry.priority is not None and entry.priority is not envelope.priority:
                envelope = attrs.evolve(envelope, priority=entry.priority)
            accepted_at = envelope.accepted_at
            if accepted_at < latest:
                in_order = False
            latest = accepted_at
            location = JournalLocation(entry.segment, entry.offset, entry.length)
            progress = entry.progress
            append(
                JournaledMessage(
                    envelope,
                    location,
                    entry.state,
                    entry.attempts,
                    entry.next_attempt_at,
                    remaining=None if progress is None else progress[0],
                    bounced=() if progress is None else progress[1],
                )
            )
        if undecodable:
            for queue_id in undecodable:
                del self.index.live[queue_id]
            self.index.recount()
        if not in_order:
            # A copy made by compaction sits later than its acceptance.
            found.sort(key=_accepted_at)
        return found

    def forget_metadata(self) -> None:
        """
        Drop what replay kept for L{messages}.
        """
        for entry in self.index.live.values():
            entry.meta = None

    # Writing

    def _create_segment(self, number: int) -> _Segment:
        """
        Create segment C{number} with a durable header (and a durable
        directory entry) before any record goes into it.
        """
        key = os.urandom(SEGMENT_KEY_SIZE)
        path = self.path(number)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(self.ops, fd, encode_segment_header(number, key), 0)
            self.ops.fdatasync(fd)
            _fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return _Segment(number, key, path, SEGMENT_HEADER_SIZE)

    def _start_new_segment(self) -> None:
        new = self._create_segment(self.current.number + 1)
        try:
            fd = os.open(new.path, os.O_WRONLY | os.O_CLOEXEC)
        except BaseException:
            # Left behind, it would block every later try (O_EXCL).
            with contextlib.suppress(OSError):
                os.unlink(new.path)
            raise
        old, self.write_fd = self.write_fd, fd
        self.segments.append(new)
        self.lookup.add_segment(new.number, new.key)
        self.needs_new_segment = False
        try:
            os.close(old)
        except OSError as e:
            # The descriptor is released all the same; what it wrote was synced.
            self.warn(
                "journal: closing segment {segment}: {error}", segment=new.number - 1, error=str(e)
            )

    def commit(self, payloads: Sequence[Payload]) -> list[JournalLocation] | Exception:
        """
        Write C{payloads} with one write and one fdatasync, then apply them
        to the index. On failure the segment is cut back to where it was.

        Once the fdatasync returned, the records are durable and their
        locations are returned whatever happens next: a failure to apply
        them to the index or to rotate is handled as a housekeeping failure.

        @return: the location of each record, or the error that kept them
            from the disk (an L{OSError}, or any other exception from the
            write path, handled as an I/O error).
        """
        try:
            if self.needs_new_segment:
                self._start_new_segment()
        except Exception as e:
            self.write_errors += 1
            return e
        segment = self.current
        start = segment.size
        parts: list[bytes] = []
        locations: list[JournalLocation] = []
        offset = start
        for payload in payloads:
            parts += (frame_header(segment.key, payload), payload.meta, payload.body)
            locations.append(JournalLocation(segment.number, offset, payload.length))
            offset += payload.length
        try:
            _write_all(self.ops, self.write_fd, b"".join(parts), start)
            self._write_ahead(segment, offset)
            began = perf_counter()
            self.ops.fdatasync(self.write_fd)
            self.last_fsync_seconds = perf_counter() - began
        except Exception as e:
            self.write_errors += 1
            self._undo_write(start, e)
            return e
        segment.size = offset
        self.fsyncs += 1
        self.records += len(payloads)
        self.bytes_written += offset - start
        self.last_batch_records = len(payloads)
        # Durable from here on.
        if self.fsync_observer is not None:
            self._observe_fsync(self.fsync_observer)
        if self.index_trusted:
            try:
                for payload, location in zip(payloads, locations, strict=True):
                    self._apply(payload, location)
            except Exception:
                self._index_failed(Failure())
        if segment.size >= self.segment_size:
            self._housekeep(_ROTATION, self._rotate, None, needs_index=False)
        return locations

    def _write_ahead(self, segment: _Segment, end: int) -> None:
        """
        Write zeros past C{end}, the end of the records just written, when
        they come near the end of what is written (L{PREALLOCATE_AHEAD}),
        up to the segment's size. The zeros are synced with the records.
        A failure (a full disk) leaves the records as they are: they are
        appended, as without it.
        """
        segment.allocated = max(segment.allocated, end)
        if end + PREALLOCATE_WHEN_WITHIN <= segment.allocated:
            return
        # Never past the segment's size: a segment rotated at that size
        # ends with its records (a scan takes zeros for the end anyway).
        target = min(end + PREALLOCATE_AHEAD, self.segment_size)
        if target <= segment.allocated:
            return
        try:
            _write_all(
                self.ops, self.write_fd, _ZEROS[: target - segment.allocated], segment.allocated
            )
        except OSError as e:
            # Part of them may be written: zeros past the records are
            # what a reader takes for their end anyway.
            if not self._write_ahead_failing:
                self._write_ahead_failing = True
                self.warn(
                    "journal: cannot write zeros ahead of the records ({error}); group"
                    " commits cost more until it can",
                    error=str(e),
                )
            return
        segment.allocated = target
        self._write_ahead_failing = False

    def _observe_fsync(self, observer: Callable[[float], None]) -> None:
        # The records are durable: a broken observer must not fail them.
        try:
            observer(self.last_fsync_seconds)
        except Exception as e:
            self.warn("journal: fsync observer failed: {error}", error=repr(e))

    def _rotate(self) -> None:
        try:
            self._start_new_segment()
        except OSError as e:
            if not self._rotation_failing:
                self.warn(
                    "journal: cannot start a new segment ({error}); segment {segment} grows",
                    error=str(e),
                    segment=self.current.number,
                )
            self._rotation_failing = True
        else:
            self._rotation_failing = False

    def _undo_write(self, start: int, error: Exception) -> None:
        self.current.allocated = min(self.current.allocated, start)
        try:
            os.ftruncate(self.write_fd, start)
            self.ops.fdatasync(self.write_fd)
        except Exception:
            self.needs_new_segment = True
        if not isinstance(error, OSError) or error.errno not in _CLEAN_WRITE_ERRORS:
            self.needs_new_segment = True

    def _apply(self, payload: Payload, location: JournalLocation) -> None:
        if payload.type is RecordType.ACCEPT:
            self.index.on_accept(
                accept_queue_id(payload.meta), location.segment, location.offset, location.length
            )
        elif payload.type is RecordType.COPY:
            moved = self.index.on_copy(
                accept_queue_id(payload.meta), location.segment, location.offset, location.length
            )
            if moved is not None and moved.moved_from:
                self.lookup.moved(moved.moved_from, location)
        elif payload.type is RecordType.STATE or payload.type is RecordType.PROGRESS:
            change = decode_state(payload.meta, payload.type is RecordType.PROGRESS)
            gone = self.index.on_state(
                change.queue_id,
                change.state,
                change.attempts,
                change.next_attempt_at,
                _progress_of(change.remaining, change.bounced),
            )
            if gone is not None and gone.moved_from:
                self.lookup.forget(gone.moved_from)
        elif payload.type is RecordType.PRIORITY:
            priority = decode_priority(payload.meta)
            self.index.on_priority(priority.queue_id, priority.priority)
        elif payload.type is RecordType.QUEUE:
            self.index.on_queue_state(decode_queue_state(payload.meta).paused, location.segment)

    # Compaction

    def disk_bytes(self) -> int:
        return sum(segment.size for segment in self.segments)

    def _compaction_target(self) -> _Segment | None:
        if len(self.segments) < 2:
            return None
        oldest = self.segments[0]
        live = self.index.live_bytes.get(oldest.number, 0)
        if not live or oldest.number in self.stuck:
            return None
        if live <= self.compact_live_ratio * oldest.size:
            return oldest
        if self.disk_bytes() > 2 * (self.index.total_live_bytes + self.segment_size):
            return oldest
        return None

    def compaction_due(self) -> bool:
        if self.compaction_blocked or _COMPACTION in self.suspended or not self.index_trusted:
            return False
        try:
            return self._compaction_target() is not None
        except Exception:
            self._housekeeping_failed(_COMPACTION, Failure())
            return False

    def plan_copies(self) -> list[Payload]:
        """
        @return: records that copy up to L{compaction_chunk} bytes of the
            live messages of the segment being compacted.
        """
        target = self._compaction_target() if not self.compaction_blocked else None
        if target is None:
            return []
        if self._copy_segment != target.number:
            self._copy_segment = target.number
            self._copy_queue = self.index.members(target.number)
        copies: list[Payload] = []
        budget = self.compaction_chunk
        while self._copy_queue and budget > 0:
            queue_id = self._copy_queue.popleft()
            entry = self.index.live.get(queue_id)
            if entry is None or entry.segment != target.number:
                continue
            try:
                copies.append(self._copy_of(target, entry))
            except (OSError, JournalRecordError) as e:
                self.stuck.add(target.number)
                self.warn(
                    "journal: cannot compact segment {segment}: message {queue_id}: {error}",
                    segment=target.number,
                    queue_id=queue_id,
                    error=str(e),
                )
                break
            copies.append(_state_of(queue_id, entry))
            budget -= entry.length
        self.copied_records += len(copies) // 2
        return copies

    def _copy_of(self, segment: _Segment, entry: _Live) -> Payload:
        """
        @return: the accept record of C{entry}, with its current priority.
        The body and its checksum are copied as they are.
        """
        if segment.read_fd is None:
            segment.read_fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(segment.read_fd, entry.length, entry.offset)
        header = read_header(data, 0, segment.key, len(data))
        meta = data[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + header.meta_length]
        if zlib.crc32(meta) != header.meta_crc:
            raise CorruptRecord("record metadata checksum mismatch")
        body = data[RECORD_HEADER_SIZE + header.meta_length :]
        if entry.priority is None:
            return Payload(RecordType.COPY, meta, body, header.meta_crc, header.body_crc)
        envelope = attrs.evolve(decode_envelope(meta), priority=entry.priority)
        new_meta = encode_accept(envelope, b"", copy=True).meta
        return Payload(RecordType.COPY, new_meta, body, body_crc=header.body_crc)

    def delete_dead_segments(self) -> None:
        """
        Delete the oldest segments while they hold no live message.
        """
        deleted = False
        while len(self.segments) > 1 and not self.index.counts.get(self.segments[0].number):
            oldest = self.segments[0]
            if self.index.paused and self.index.queue_segment == oldest.number:
                self._carry_queue_state()
            self.lookup.remove_segment(oldest.number)
            if oldest.read_fd is not None:
                fd, oldest.read_fd = oldest.read_fd, None
                try:
                    os.close(fd)
                except OSError as e:
                    # Released all the same; only reads went through it.
                    self.warn(
                        "journal: closing segment {segment}: {error}",
                        segment=oldest.number,
                        error=str(e),
                    )
            try:
                os.unlink(oldest.path)
            except FileNotFoundError:
                pass
            except OSError as e:
                self.lookup.add_segment(oldest.number, oldest.key)
                self.warn(
                    "journal: cannot delete segment {segment}: {error}",
                    segment=oldest.number,
                    error=str(e),
                )
                break
            del self.segments[0]
            self.stuck.discard(oldest.number)
            self.deleted_segments += 1
            deleted = True
        if deleted:
            try:
                _fsync_directory(self.directory)
            except OSError as e:
                self.warn("journal: cannot sync its directory: {error}", error=str(e))

    def _carry_queue_state(self) -> None:
        """
        Write the queue's state again in the current segment, so that
        deleting the segment that held it does not lose it (only a paused
        queue needs this: no record at all means running).

        @raise Exception: what kept the record from the disk; the deletion
            is then a housekeeping step that failed, tried again later.
        """
        written = self.commit([encode_queue_state(self.index.paused)])
        if isinstance(written, Exception):
            raise written

    def _compaction_failed(self) -> None:
        # Until a client record is written again; the copies planned were
        # not written, so planning starts over.
        self.compaction_blocked = True
        self._copy_segment = -1

    def compact_fully(self) -> None:
        """
        Compact until nothing is due (or a write fails).

        @raise Exception: what a write raised other than an L{OSError}.
        """
        while True:
            self.delete_dead_segments()
            copies = self.plan_copies()
            if not copies:
                return
            written = self.commit(copies)
            if isinstance(written, Exception):
                self._compaction_failed()
                if not isinstance(written, OSError):
                    raise written
                return

    # Housekeeping: whatever goes wrong here is logged and tried again
    # later; it never fails a batch nor ends the writer.

    def _housekeep(
        self, step: str, action: Callable[[], _T], fallback: _T, needs_index: bool = True
    ) -> _T:
        """
        @return: what C{action} returns, or C{fallback} if C{step} is
            suspended or failed now.
        """
        if step in self.suspended or (needs_index and not self.index_trusted):
            return fallback
        try:
            result = action()
        except Exception:
            self._housekeeping_failed(step, Failure())
            return fallback
        if step in self._failing:
            self._failing.discard(step)
            self.report_housekeeping(step, None)
        return result

    def _housekeeping_failed(self, step: str, failure: Failure) -> None:
        self.housekeeping_failures += 1
        self.suspended.add(step)
        self._failing.add(step)
        self.report_housekeeping(step, failure)

    def _index_failed(self, failure: Failure) -> None:
        # Compacting or deleting on a wrong index could drop live messages;
        # replay at the next start rebuilds it from the records.
        self.index_trusted = False
        self.housekeeping_failures += 1
        self.report_housekeeping(_INDEX, failure)

    def tidy(self) -> None:
        """
        Delete the segments that hold nothing live any more (after a batch).
        """
        self._housekeep(_DELETION, self.delete_dead_segments, None)

    def retry_housekeeping(self, full: bool) -> None:
        """
        Take up the suspended steps again: rotation (if due) and deletion
        now, then, with C{full}, compaction until nothing is due; otherwise
        compaction resumes with the next batches.
        """
        self.suspended.clear()
        if self.current.size >= self.segment_size:
            self._housekeep(_ROTATION, self._rotate, None, needs_index=False)
        self.tidy()
        if full:
            self._housekeep(_COMPACTION, self.compact_fully, None)

    def process(self, batch: Sequence[_Pending], compact: bool) -> _Outcome:
        """
        Group-commit the records of C{batch} (no barriers), with a chunk of
        compaction copies ahead of them. An accept whose queue id is live
        (or accepted earlier in the batch) is refused and not written.

        @return: the location of each record of C{batch}, or the
            L{QueueIdInUse} that refused it; or the error that failed them all.
        """
        outcome: list[JournalLocation | Exception | None] = [None] * len(batch)
        payloads: list[Payload] = []
        slots: list[int] = []
        live = self.index.live
        accepted: set[str] = set()
        for slot, pending in enumerate(batch):
            payload = pending.payload
            assert payload is not None
            if payload.type is RecordType.ACCEPT:
                queue_id = accept_queue_id(payload.meta)
                if queue_id in live or queue_id in accepted:
                    self.refused_queue_ids += 1
                    outcome[slot] = QueueIdInUse(f"queue id {queue_id} is already in use")
                    continue
                accepted.add(queue_id)
            payloads.append(payload)
            slots.append(slot)
        copies: list[Payload] = []
        if compact:
            copies = self._housekeep(_COMPACTION, self.plan_copies, copies)
        if payloads or copies:
            written = self.commit(copies + payloads)
            if isinstance(written, Exception):
                self._compaction_failed()
                return written
            if payloads:
                self.compaction_blocked = False
            for slot, location in zip(slots, written[len(copies) :], strict=True):
                outcome[slot] = location
        return outcome

    def stats(self) -> JournalStats:
        return JournalStats(
            fsyncs=self.fsyncs,
            records=self.records,
            bytes_written=self.bytes_written,
            last_batch_records=self.last_batch_records,
            last_fsync_seconds=self.last_fsync_seconds,
            write_errors=self.write_errors,
            segments=len(self.segments),
            disk_bytes=self.disk_bytes(),
            live_messages=len(self.index.live),
            live_bytes=self.index.total_live_bytes,
            copied_records=self.copied_records,
            deleted_segments=self.deleted_segments,
            housekeeping_failures=self.housekeeping_failures,
            refused_queue_ids=self.refused_queue_ids,
        )

    def close(self) -> None:
        for segment in self.segments:
            if segment.read_fd is not None:
                os.close(segment.read_fd)
                segment.read_fd = None
        if self.write_fd >= 0 and self.segments and self.current.allocated > self.current.size:
            # A stopped journal's files end with their records (the zeros
            # are written again, as they are needed, by the next start).
            with contextlib.suppress(OSError):
                os.ftruncate(self.write_fd, self.current.size)
            self.current.allocated = self.current.size
        for fd in (self.write_fd, self.lock_fd):
            if fd >= 0:
                os.close(fd)
        self.write_fd = self.lock_fd = -1


class _Writer:
    """
    The writer thread: group commits, then compaction when idle.
    """

    def __init__(
        self,
        store: _SegmentStore,
        deliver: Callable[[Sequence[_Pending], _Outcome], None],
        exited: Callable[[Failure | None], None],
        *,
        gather: float = DEFAULT_GATHER,
        monotonic: Callable[[], float] = perf_counter,
        expected: Callable[[], int | None] = lambda: None,
        gather_expected: float = DEFAULT_GATHER_EXPECTED,
    ) -> None:
        """
        @param gather: see L{DEFAULT_GATHER}.
        @param monotonic: the writer thread's clock, for L{gather} (not
            the reactor's: it is read off the reactor thread).
        @param expected: how many urgent records are about to come, or
            L{None} when that is not known; called on the writer thread.
        @param gather_expected: see L{DEFAULT_GATHER_EXPECTED}.
        """
        self._store = store
        self._deliver = deliver
        self._exited = exited
        self._gather = gather
        self._monotonic = monotonic
        self._expected = expected
        self._gather_expected = gather_expected
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._stopping = False
        # Whether the queue holds a record that may not wait (the others
        # ride along with it, or go when woken).
        self._urgent = False
        self._urgent_queued = 0
        # Urgent records nobody announced: the writer guesses for those.
        self._unannounced_queued = 0
        self._woken = False
        # Whether the thread waits for more records before writing, and
        # (when told what is coming) for how many urgent ones.
        self._gathering = False
        self._gather_target: int | None = None
        # When the last group commit ended (on the writer's clock).
        self._last_commit: float | None = None
        self.thread = threading.Thread(target=self._run, name="smtpgw-journal-writer", daemon=True)

    def submit(self, pending: _Pending, *, urgent: bool = True, announced: bool = False) -> None:
        """
        Queue a record; an urgent one wakes the thread, another waits for
        the next urgent one or L{wake}.

        @param announced: the record is the message of a session the
            C{expected} count included (see L{FileJournal.accept}).
        """
        with self._cond:
            self._queue.append(pending)
            if urgent:
                self._urgent_queued += 1
                if not announced:
                    self._unannounced_queued += 1
            if urgent and not self._urgent:
                self._urgent = True
                self._cond.notify()
            elif self._gathering and self._gathered():
                self._cond.notify()

    def wake(self) -> None:
        """
        Write whatever is queued now, urgent or not.
        """
        with self._cond:
            if self._queue:
                self._woken = True
                self._cond.notify()

    def stop(self) -> None:
        """
        Write what is queued, then end the thread.
        """
        with self._cond:
            self._stopping = True
            self._cond.notify()

    def drain(self) -> list[_Pending]:
        """
        @return: what is still queued (after the thread ended), now removed.
        """
        with self._cond:
            rest = list(self._queue)
            self._queue.clear()
            return rest

    def _next_batch(self) -> tuple[list[_Pending], bool]:
        with self._cond:
            while not (
                self._urgent or self._woken or self._stopping or self._store.compaction_due()
            ):
                self._cond.wait()
            if self._urgent:
                coming = self._expected()
                if coming and self._gather_expected > 0 and self._recent():
                    self._gather_target = min(GATHER_EXPECTED_MOST, self._urgent_queued + coming)
                    self._gather_more(self._gather_expected)
                elif (coming is None or self._unannounced_queued) and self._busy():
                    # Nothing told of these records: guess, as ever.
                    self._gather_more(self._gather)
            batch = list(self._queue)
            self._queue.clear()
            self._urgent = self._woken = False
            self._urgent_queued = self._unannounced_queued = 0
            return batch, self._stopping

    def _gathered(self) -> bool:
        target = self._gather_target
        if target is None:
            return len(self._queue) >= GATHER_RECORDS
        return self._urgent_queued >= target

    def _recent(self) -> bool:
        # Whether the last group commit ended within GATHER_WHEN_BUSY_WITHIN.
        last = self._last_commit
        return last is not None and self._monotonic() - last < GATHER_WHEN_BUSY_WITHIN

    def _busy(self) -> bool:
        return self._gather > 0 and self._recent()

    def _gather_more(self, most: float) -> None:
        # Called holding the lock; the waits release it for submit().
        deadline = self._monotonic() + most
        self._gathering = True
        try:
            while not self._gathered() and not self._stopping:
                left = deadline - self._monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        finally:
            self._gathering = False
            self._gather_target = None

    def _run(self) -> None:
        try:
            # Segments that replay found dead go now, not after the first batch.
            self._store.tidy()
            while True:
                batch, stopping = self._next_batch()
                if stopping and not batch:
                    break
                self._one_batch(batch, stopping)
        except BaseException:
            self._exited(Failure())
        else:
            self._exited(None)

    def _one_batch(self, batch: list[_Pending], stopping: bool) -> None:
        records = batch
        barriers: list[_Pending] = []
        if any(pending.payload is None for pending in batch):
            records = [pending for pending in batch if pending.payload is not None]
            barriers = [pending for pending in batch if pending.payload is None]
        try:
            outcome = self._store.process(records, compact=not stopping)
        except BaseException as e:
            self._deliver(batch, e)
            raise
        if records:
            # Before the outcome is on its way: whoever it wakes sees the
            # journal busy.
            self._last_commit = self._monotonic()
        if records or isinstance(outcome, BaseException):
            self._deliver(records, outcome)
        # Housekeeping comes after the batch's outcome is on its way: it
        # cannot change it, and it never raises an Exception.
        try:
            self._store.tidy()
            if barriers and not stopping:
                self._store.retry_housekeeping(full=any(b.compact for b in barriers))
        finally:
            if barriers:
                self._deliver(barriers, [None] * len(barriers))


class _Phase(enum.Enum):
    NEW = "new"
    OPEN = "open"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    BROKEN = "broken"


@implementer(IJournal)
class FileJournal:
    """
    The journal on local disk.

    Lifecycle: L{replay} (once, at start), L{start}, then L{accept},
    L{record_state}, L{reprioritize}, L{read}; L{stop} at the end.

    @ivar accepting: L{False} while writing fails (disk full, unwritable
        file); the journal retries by itself every C{retry_interval} seconds
        and becomes L{True} again on the first write that succeeds.
    """

    _log = Logger()

    def __init__(
        self,
        directory: str | os.PathLike[str],
        reactor: IReactorThreads,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        compact_live_ratio: float = DEFAULT_COMPACT_LIVE_RATIO,
        compaction_chunk: int = DEFAULT_COMPACTION_CHUNK,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        file_ops: FileOps | None = None,
        read_pool: ThreadPool | None = None,
        fsync_observer: Callable[[float], None] | None = None,
        unhurried_delay: float = DEFAULT_UNHURRIED_DELAY,
        gather: float = DEFAULT_GATHER,
        writer_clock: Callable[[], float] = perf_counter,
        gather_expected: float = DEFAULT_GATHER_EXPECTED,
    ) -> None:
        """
        @param directory: where the segment files are; created if missing.
        @param reactor: provides L{IReactorThreads} and L{IReactorTime}.
        @param segment_size: see L{DEFAULT_SEGMENT_SIZE}.
        @param compact_live_ratio: see L{DEFAULT_COMPACT_LIVE_RATIO}.
        @param compaction_chunk: see L{DEFAULT_COMPACTION_CHUNK}.
        @param retry_interval: see L{DEFAULT_RETRY_INTERVAL}.
        @param file_ops: the write and fdatasync calls (tests inject faults).
        @param read_pool: runs reads; the reactor's thread pool by default.
        @param fsync_observer: called on the writer thread with the seconds
            each group commit's fdatasync took (for a latency histogram);
            it must be thread-safe and quick, and what it raises is logged
            as a warning, never failing the commit.
        @param unhurried_delay: see L{DEFAULT_UNHURRIED_DELAY}.
        @param gather: see L{DEFAULT_GATHER}.
        @param writer_clock: the writer thread's monotonic clock, in
            seconds, for L{gather} (tests control it).
        @param gather_expected: see L{DEFAULT_GATHER_EXPECTED}.
        """
        self.directory = os.fspath(directory)
        #: Tells how many messages are about to be appended (the sessions
        #: in DATA), or L{None}: the writer then waits for those before a
        #: group commit (L{DEFAULT_GATHER_EXPECTED}) instead of guessing
        #: (L{DEFAULT_GATHER}). Called on the writer thread, holding its
        #: lock: it must only read, quickly. Should it raise, it is logged
        #: and no longer asked.
        self.expected_soon: Callable[[], int] | None = None
        self._gather_expected = gather_expected
        self._gather = gather
        self._writer_clock = writer_clock
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self._retry_interval = retry_interval
        self._read_pool = read_pool
        self._lookup = _Lookup()
        self._store = _SegmentStore(
            self.directory,
            self._lookup,
            self._log,
            segment_size,
            compact_live_ratio,
            compaction_chunk,
            file_ops or FileOps(),
        )
        self._store.fsync_observer = fsync_observer
        self._phase = _Phase.NEW
        self._writer: _Writer | None = None
        self._retry: IDelayedCall | None = None
        self._housekeeping_retry: IDelayedCall | None = None
        self._unhurried_delay = unhurried_delay
        self._unhurried: IDelayedCall | None = None
        self._housekeeping_streak = 0
        self._stopped: list[Deferred[None]] = []
        self.accepting = True

    def _open(self) -> None:
        try:
            self._store.open()
        except BaseException:
            self._store.close()
            raise
        self._phase = _Phase.OPEN

    def replay(self) -> list[JournaledMessage]:
        """
        Open the journal, recover it from a crash (a torn tail is cut off
        with a warning) and return every message not in a final state, in
        acceptance order, with its latest state. Call once, before L{start}.

        @raise JournalLocked: if another process uses the directory.
        @raise JournalFormatError: if the journal was written by a newer,
            incompatible version.
        """
        if self._phase is not _Phase.NEW:
            raise RuntimeError("replay() is called once, before start()")
        # A million messages make millions of objects that live on: the
        # collections their creation would trigger cost more than the replay.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._open()
            return self._store.messages()
        finally:
            if collecting:
                gc.enable()

    def start(self) -> None:
        """
        Start the writer thread (opening the journal if L{replay} did not).
        """
        if self._phase is _Phase.NEW:
            self._open()
            self._store.forget_metadata()
        if self._phase is not _Phase.OPEN:
            raise RuntimeError(f"cannot start a journal that is {self._phase.value}")
        self._store.warn = self._warn_from_thread
        self._store.report_housekeeping = self._housekeeping_from_thread
        self._writer = _Writer(
            self._store,
            self._deliver_from_thread,
            self._exited_from_thread,
            gather=self._gather,
            monotonic=self._writer_clock,
            expected=self._coming,
            gather_expected=self._gather_expected,
        )
        self._phase = _Phase.RUNNING
        self._writer.thread.start()

    def _coming(self) -> int | None:
        expected = self.expected_soon
        if expected is None:
            return None
        try:
            return expected()
        except Exception as e:
            # A hint: its failure must never stop the journal.
            self.expected_soon = None
            self._warn_from_thread(
                "the journal can no longer tell what is coming ({error});"
                " it guesses as when never told",
                error=repr(e),
            )
            return None

    def stop(self) -> Deferred[None]:
        """
        Write and make durable what is queued, end the writer thread and
        close the files.

        @return: fires once all that is done.
        """
        self._cancel_timers()
        if self._phase is _Phase.RUNNING:
            assert self._writer is not None
            self._phase = _Phase.STOPPING
            self._writer.stop()
        elif self._phase is not _Phase.STOPPING:
            if self._phase is not _Phase.STOPPED:
                self._store.close()
                self._phase = _Phase.STOPPED
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._stopped.append(waiter)
        return waiter

    def accept(
        self, envelope: Envelope, body: bytes, *, announced: bool = False
    ) -> Deferred[JournalLocation]:
        """
        Append the accept record of a message.

        @param announced: the message comes from a session that
            L{expected_soon} counted: when told that nothing more is coming,
            the writer writes it at once. Another record (a console send's
            message, a report, a change of state) leaves the writer to
            guess (L{DEFAULT_GATHER}).
        @return: fires with where the record lies once it is durable, or
            fails with L{JournalUnavailable}.
        """
        return self._submit(
            encode_accept(envelope, body), gives_location=True, announced=announced
        )

    def record_state(
        self,
        queue_id: str,
        state: str,
        attempts: int = 0,
        next_attempt_at: float = 0.0,
        details: dict[str, Any] | None = None,
        *,
        remaining: Sequence[str] | None = None,
        bounced: Sequence[str] = (),
        urgent: bool = True,
    ) -> Deferred[None]:
        """
        Append a change of state. Final states (delivered, bounced,
        cancelled) let compaction drop the message.

        @param details: extra JSON-able fields kept with the change.
        @param remaining: the recipients still to be tried, once some are
            done (delivered or bounced); replay gives them back, and later
            changes without them keep them. L{None} changes nothing.
        @param bounced: with C{remaining}, the recipients that failed for
            good so far.
        @param urgent: L{False} when nothing waits for the change to be
            durable (a final outcome, which a crash at worst makes happen
            again): it costs no group commit of its own, and goes with the
            next urgent record's or after L{DEFAULT_UNHURRIED_DELAY}.
        @return: fires once durable, or fails with L{JournalUnavailable}.
        """
        return self._submit(
            encode_state(
                queue_id,
                state,
                attempts,
                next_attempt_at,
                details,
                remaining=remaining,
                bounced=bounced,
            ),
            urgent=urgent,
        )

    def record_queue_state(self, paused: bool) -> Deferred[None]:
        """
        Append the queue's own state: whether an admin stopped it. After a
        restart, L{queue_paused} says what the latest such record said.

        @return: fires once durable, or fails with L{JournalUnavailable}.
        """
        return self._submit(encode_queue_state(paused))

    @property
    def queue_paused(self) -> bool:
        """
        Whether the latest queue state recorded says paused: after
        L{replay}, what was journaled before the restart.
        """
        return self._store.index.paused

    def reprioritize(self, queue_id: str, priority: Priority) -> Deferred[None]:
        """
        Append a change of priority; replay gives the message this priority.

        @return: fires once durable, or fails with L{JournalUnavailable}.
        """
        return self._submit(encode_priority(queue_id, priority))

    def compact(self) -> Deferred[None]:
        """
        Take up any suspended housekeeping step and compact fully.

        @return: fires once the records queued before are written (or have
            failed) and compaction has nothing more to do (or cannot go on).
        """
        return self._submit(None, compact=True)

    def read(self, location: JournalLocation) -> Deferred[tuple[Envelope, bytes]]:
        """
        Read a message back on a thread, checking its checksums. A location
        that compaction has since moved is followed.

        @return: fires with the envelope of the accept record (with the
            priority it had when written) and the message, or fails with
            L{JournalReadError}.
        """
        pool = self._read_pool or self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, self._read_blocking, location)

    def stats(self) -> JournalStats:
        """
        @return: counters for metrics; read without locking, so they may be
            a batch behind.
        """
        return self._store.stats()

    def _read_blocking(self, requested: JournalLocation) -> tuple[Envelope, bytes]:
        # A retry covers a segment deleted between resolving and opening:
        # by then its records were copied and the lookup points at them.
        for _attempt in range(3):
            location, key = self._lookup.resolve(requested)
            if key is None:
                break
            try:
                fd = os.open(self._store.path(location.segment), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise JournalReadError(f"cannot read {location}: {e}") from e
            try:
                data = os.pread(fd, location.length, location.offset)
            except OSError as e:
                raise JournalReadError(f"cannot read {location}: {e}") from e
            finally:
                os.close(fd)
            try:
                record = decode_record(data, key)
            except JournalRecordError as e:
                raise JournalReadError(f"message at {location} is damaged: {e}") from e
            if not isinstance(record, AcceptRecord):
                raise JournalReadError(f"no message at {location}")
            return record.envelope, record.body
        raise JournalReadError(f"{requested} is no longer in the journal")

    def _submit(
        self,
        payload: Payload | None,
        gives_location: bool = False,
        compact: bool = False,
        *,
        urgent: bool = True,
        announced: bool = False,
    ) -> Deferred[Any]:
        if self._phase is not _Phase.RUNNING or self._writer is None:
            return fail(JournalUnavailable(f"the journal is {self._phase.value}"))
        deferred: Deferred[Any] = Deferred()
        self._writer.submit(
            _Pending(payload, deferred, gives_location, compact),
            urgent=urgent,
            announced=announced,
        )
        if not urgent and self._unhurried is None:
            self._unhurried = self._clock.callLater(self._unhurried_delay, self._write_unhurried)
        return deferred

    def _write_unhurried(self) -> None:
        self._unhurried = None
        if self._writer is not None:
            self._writer.wake()

    def _cancel_timers(self) -> None:
        for timer in (self._retry, self._housekeeping_retry, self._unhurried):
            if timer is not None and timer.active():
                timer.cancel()
        self._retry = self._housekeeping_retry = self._unhurried = None

    # Calls from the writer thread, each hopping to the reactor thread.

    def _warn_from_thread(self, format: str, **fields: object) -> None:
        self._reactor.callFromThread(self._log.warn, format, **fields)

    def _deliver_from_thread(self, batch: Sequence[_Pending], outcome: _Outcome) -> None:
        self._reactor.callFromThread(self._batch_done, batch, outcome)

    def _exited_from_thread(self, failure: Failure | None) -> None:
        self._reactor.callFromThread(self._writer_exited, failure)

    def _housekeeping_from_thread(self, step: str, failure: Failure | None) -> None:
        self._reactor.callFromThread(self._housekeeping_report, step, failure)

    def _batch_done(self, batch: Sequence[_Pending], outcome: _Outcome) -> None:
        if isinstance(outcome, BaseException):
            self._write_failed(outcome)
            for pending in batch:
                if pending.payload is None:
                    pending.deferred.callback(None)
                else:
                    error = JournalUnavailable(f"journal write failed: {outcome}")
                    pending.deferred.errback(error)
            return
        if (
            not self.accepting
            and self._phase is _Phase.RUNNING
            and any(isinstance(result, JournalLocation) for result in outcome)
        ):
            self._log.info("journal: writing works again")
            self.accepting = True
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            self._retry = None
        for pending, result in zip(batch, outcome, strict=True):
            if isinstance(result, Exception):
                pending.deferred.errback(result)
            else:
                pending.deferred.callback(result if pending.gives_location else None)

    def _write_failed(self, error: BaseException) -> None:
        if self.accepting:
            if isinstance(error, OSError):
                self._log.warn(
                    "journal: cannot write ({error}); refusing mail with 452 and"
                    " retrying every {interval} seconds",
                    error=str(error),
                    interval=self._retry_interval,
                )
            else:
                self._log.failure(
                    "journal: unexpected error while writing; refusing mail with 452 and"
                    " retrying every {interval} seconds",
                    Failure(error),
                    interval=self._retry_interval,
                )
        self.accepting = False
        if self._phase is _Phase.RUNNING and self._retry is None:
            self._retry = self._clock.callLater(self._retry_interval, self._probe)

    def _probe(self) -> None:
        self._retry = None
        # The outcome reaches _batch_done, which flips accepting or retries.
        self._submit(encode_noop()).addErrback(lambda f: f.trap(JournalUnavailable))

    def _housekeeping_report(self, step: str, failure: Failure | None) -> None:
        if failure is None:
            self._housekeeping_streak = 0
            self._log.info("journal: {step} works again", step=step)
            return
        if step == _INDEX:
            self._log.failure(
                "journal: {step} failed; the records are durable, but no segment is"
                " compacted or deleted until the gateway restarts",
                failure,
                step=step,
            )
            return
        retry = self._housekeeping_retry
        if retry is None and self._phase is _Phase.RUNNING:
            delay = min(
                self._retry_interval * 2.0 ** min(self._housekeeping_streak, 32),
                max(self._retry_interval, HOUSEKEEPING_RETRY_MAX),
            )
            self._housekeeping_streak += 1
            retry = self._clock.callLater(delay, self._retry_housekeeping)
            self._housekeeping_retry = retry
        self._log.failure(
            "journal: {step} failed; mail is still taken, and {step} is tried again"
            " in {delay:.0f} seconds",
            failure,
            step=step,
            delay=retry.getTime() - self._clock.seconds() if retry is not None else math.inf,
        )

    def _retry_housekeeping(self) -> None:
        self._housekeeping_retry = None
        self._submit(None).addErrback(lambda f: f.trap(JournalUnavailable))

    def _writer_exited(self, failure: Failure | None) -> None:
        assert self._writer is not None
        self._writer.thread.join()
        self._store.close()
        for pending in self._writer.drain():
            pending.deferred.errback(JournalUnavailable("the journal writer has stopped"))
        if failure is not None:
            self._phase = _Phase.BROKEN
            self.accepting = False
            self._log.failure("journal writer thread failed", failure)
        else:
            self._phase = _Phase.STOPPED
        self._cancel_timers()
        waiters, self._stopped = self._stopped, []
        for waiter in waiters:
            waiter.callback(None)
