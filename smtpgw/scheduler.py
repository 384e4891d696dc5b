"""
The in-memory priority scheduler of the send queue (PRODUCT section 3).

Pure: no reactor, no I/O; the caller passes the current time. The order rules:

    - strict priority: an entry is handed out only when no entry of a higher
      priority (lower number) is ready;
    - within one priority, the lists that have ready entries are served in
      turn (round-robin), so one list's burst does not starve another's;
    - within one list and priority, first in, first out.

A deferred entry becomes ready at its C{next_attempt_at}; a held one only when
released. Deferred entries that come due together are made ready in the
order of their C{next_attempt_at} (then of their queue id).

Memory
======

The gateway must keep a million queued messages in under 200 bytes each,
whatever their state. An entry is therefore one packed integer in a dict
keyed by queue id (see L{_pack}); the ready entries are queue ids in one
deque per (priority, list) "lane"; the deferred entries are queue ids in
time buckets (a list per L{DEFAULT_BUCKET_WIDTH} seconds of
C{next_attempt_at}), so a deferred entry costs a list slot, not a heap
tuple. Only the bucket that is coming due is turned into a heap of
C{(time, queue id)}, to hand its entries out at their exact times: that
costs about 90 bytes per entry due within one bucket width, and only
while that bucket is due.

Entries leave a lane or a bucket lazily: a hold, cancel or
re-prioritization of a ready entry only counts it as stale in its lane, and
the pop skips it; a deferred entry that is released, held or cancelled
only lowers its bucket's count of live entries, and the bucket drops it
when it comes due. This keeps every operation O(1) or O(log n) (a bucket
that comes due is sorted once: O(log n) per entry). L{ScheduledEntry}
values are built on demand for the callers.

What the admin sees
===================

L{Scheduler.ready_lanes} gives the exact order in which the ready entries
of one priority will be handed out; L{Scheduler.queue_ids} selects queue
ids by list, priority and state without building an entry for each; and
L{Scheduler.snapshot} freezes both (and every entry) at one moment for
listings that take several reactor turns.

Gates
=====

An entry may be added behind a named gate (the messages of one console
send are behind the gate of that send). The ready entries behind one gate
form lanes of their own (one per priority), served in the round-robin like
a list's lane while the gate is open. A closed gate's lanes are out of the
ring: their entries stay C{queued} but are never handed out, and they are
not counted as ready (L{Scheduler.has_ready}, L{Scheduler.ready_by_priority},
L{Scheduler.ready_lanes}) until the gate opens again. Gates are closed
until opened (L{Scheduler.open_gate}), so entries replayed at a start wait
for their owner to say they may go.
"""

from __future__ import annotations

import heapq
import itertools
import math
import struct
from collections import deque
from collections.abc import Iterator

from attrs import frozen

from smtpgw.interfaces import JournalLocation
from smtpgw.model import MessageState, Priority

__all__ = [
    "DEFAULT_BUCKET_WIDTH",
    "MAX_ATTEMPTS",
    "MAX_LISTS",
    "InvalidTransition",
    "LaneKey",
    "ScheduledEntry",
    "Scheduler",
    "SchedulerSnapshot",
    "UnknownMessage",
]

_PRIORITIES = tuple(Priority)

#: Seconds of C{next_attempt_at} that one bucket of deferred entries covers.
DEFAULT_BUCKET_WIDTH = 1.0


class UnknownMessage(KeyError):
    """
    No entry with this queue id is in the scheduler.
    """


class InvalidTransition(ValueError):
    """
    The entry is not in a state that allows this operation (for instance,
    cancelling a message that is being sent).
    """


@frozen
class ScheduledEntry:
    """
    A message as the scheduler knows it.

    @ivar queue_id: the message's queue id.
    @ivar priority: its effective priority.
    @ivar list: the list it is sent for.
    @ivar location: where its accept record lies in the journal.
    @ivar state: C{queued}, C{sending}, C{deferred} or C{held}; final states
        never live in the scheduler.
    @ivar attempts: delivery attempts made so far.
    @ivar next_attempt_at: when a deferred entry becomes ready again.
    """

    queue_id: str
    priority: Priority
    list: str
    location: JournalLocation
    state: MessageState = MessageState.QUEUED
    attempts: int = 0
    next_attempt_at: float = 0.0


# The packed layout of one entry: (name, bit offset, width). The float of
# next_attempt_at is stored as its IEEE-754 bits in the top field, so that an
# entry that was never deferred stays a smaller integer.
_STATE_CODES = {
    MessageState.QUEUED: 0,
    MessageState.SENDING: 1,
    MessageState.DEFERRED: 2,
    MessageState.HELD: 3,
}
_STATES_BY_CODE = {code: state for state, code in _STATE_CODES.items()}

_PRIORITY_SHIFT, _PRIORITY_BITS = 0, 3
_STATE_SHIFT, _STATE_BITS = 3, 2
_ATTEMPTS_SHIFT, _ATTEMPTS_BITS = 5, 16
_LIST_SHIFT, _LIST_BITS = 21, 24
_SEGMENT_SHIFT, _SEGMENT_BITS = 45, 32
_OFFSET_SHIFT, _OFFSET_BITS = 77, 48
_LENGTH_SHIFT, _LENGTH_BITS = 125, 32
_NEXT_SHIFT = 157

#: Attempts are counted up to this value and then stay there.
MAX_ATTEMPTS = (1 << _ATTEMPTS_BITS) - 1
#: The most distinct lists the scheduler can tell apart.
MAX_LISTS = 1 << _LIST_BITS

_DOUBLE = struct.Struct("<d")
_QUAD = struct.Struct("<Q")


def _mask(bits: int) -> int:
    return (1 << bits) - 1


# The field masks, computed once: packing and unpacking are on the hot path
# of the replay of a million messages.
_PRIORITY_MASK = _mask(_PRIORITY_BITS)
_STATE_FIELD = _mask(_STATE_BITS)
_ATTEMPTS_MASK = _mask(_ATTEMPTS_BITS)
_LIST_MASK = _mask(_LIST_BITS)
_SEGMENT_MAX = _mask(_SEGMENT_BITS)
_OFFSET_MAX = _mask(_OFFSET_BITS)
_LENGTH_MAX = _mask(_LENGTH_BITS)
_LOW_MASK = _mask(_NEXT_SHIFT)
_STATE_MASK = _STATE_FIELD << _STATE_SHIFT
# The state codes, for the hot paths (hashing an enum member is slow).
_QUEUED = _STATE_CODES[MessageState.QUEUED]
_SENDING = _STATE_CODES[MessageState.SENDING]
_DEFERRED = _STATE_CODES[MessageState.DEFERRED]
_HELD = _STATE_CODES[MessageState.HELD]
_DEFERRED_BITS = _DEFERRED << _STATE_SHIFT
_STATES = tuple(_STATES_BY_CODE[code] for code in range(len(_STATES_BY_CODE)))
# Indexed by the number (0 is never used): building an enum member by value
# is slow.
_PRIORITY_BY_NUMBER = (Priority.VERY_HIGH, *Priority)


def _checked(value: int, limit: int, name: str) -> int:
    if not 0 <= value <= limit:
        raise ValueError(f"{name} {value} does not fit in {limit.bit_length()} bits")
    return value


def _float_bits(value: float) -> int:
    result: int = _QUAD.unpack(_DOUBLE.pack(value))[0]
    return result


def _bits_float(bits: int) -> float:
    result: float = _DOUBLE.unpack(_QUAD.pack(bits))[0]
    return result


def _time_bits(value: float) -> int:
    """
    The bits of a next attempt time.

    @raise ValueError: it is not a finite, non-negative number.
    """
    if not value and math.copysign(1.0, value) > 0:
        # Never deferred: the usual case, and the smallest record.
        return 0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"next_attempt_at {value!r} is not a time")
    return _float_bits(value)


def _pack(
    priority: int,
    state_code: int,
    attempts: int,
    list_index: int,
    location: JournalLocation,
    next_attempt_at: float,
) -> int:
    """
    Pack one entry (all but its queue id) into one integer.

    @raise ValueError: a field is out of its range.
    """
    segment, offset, length = location.segment, location.offset, location.length
    if not (
        0 <= segment <= _SEGMENT_MAX and 0 <= offset <= _OFFSET_MAX and 0 <= length <= _LENGTH_MAX
    ):
        _checked(segment, _SEGMENT_MAX, "segment")
        _checked(offset, _OFFSET_MAX, "offset")
        _checked(length, _LENGTH_MAX, "length")
    if not 0 <= attempts <= MAX_ATTEMPTS:
        attempts = min(max(attempts, 0), MAX_ATTEMPTS)
    return (
        priority
        | state_code << _STATE_SHIFT
        | attempts << _ATTEMPTS_SHIFT
        | list_index << _LIST_SHIFT
        | segment << _SEGMENT_SHIFT
        | offset << _OFFSET_SHIFT
        | length << _LENGTH_SHIFT
        | _time_bits(next_attempt_at) << _NEXT_SHIFT
    )


def _priority_of(record: int) -> int:
    return record & _PRIORITY_MASK


def _attempts_of(record: int) -> int:
    return (record >> _ATTEMPTS_SHIFT) & _ATTEMPTS_MASK


def _list_of(record: int) -> int:
    return (record >> _LIST_SHIFT) & _LIST_MASK


def _next_attempt_of(record: int) -> float:
    return _bits_float(record >> _NEXT_SHIFT)


def _replace(record: int, shift: int, bits: int, value: int) -> int:
    return (record & ~(_mask(bits) << shift)) | (value << shift)


def _code_of(record: int) -> int:
    return (record >> _STATE_SHIFT) & _STATE_FIELD


def _with_state(record: int, code: int) -> int:
    return (record & ~_STATE_MASK) | code << _STATE_SHIFT


def _with_priority(record: int, priority: int) -> int:
    return (record & ~_PRIORITY_MASK) | priority


def _with_retry(record: int, attempts: int, next_attempt_at: float) -> int:
    if not math.isfinite(next_attempt_at) or next_attempt_at < 0:
        raise ValueError(f"next_attempt_at {next_attempt_at!r} is not a time")
    low = record & _LOW_MASK
    low = _replace(low, _ATTEMPTS_SHIFT, _ATTEMPTS_BITS, min(max(attempts, 0), MAX_ATTEMPTS))
    return low | _float_bits(next_attempt_at) << _NEXT_SHIFT


def _entry_of(queue_id: str, record: int, list_names: list[str]) -> ScheduledEntry:
    return ScheduledEntry(
        queue_id,
        _PRIORITY_BY_NUMBER[record & _PRIORITY_MASK],
        list_names[(record >> _LIST_SHIFT) & _LIST_MASK],
        JournalLocation(
            (record >> _SEGMENT_SHIFT) & _SEGMENT_MAX,
            (record >> _OFFSET_SHIFT) & _OFFSET_MAX,
            (record >> _LENGTH_SHIFT) & _LENGTH_MAX,
        ),
        _STATES[(record >> _STATE_SHIFT) & _STATE_FIELD],
        (record >> _ATTEMPTS_SHIFT) & _ATTEMPTS_MASK,
        _bits_float(record >> _NEXT_SHIFT) if record > _LOW_MASK else 0.0,
    )


#: What a lane is known by in its priority's ring: a list's index, or a
#: gate and a list's index.
LaneKey = int | tuple[str, int]


class _Lane:
    """
    The ready entries of one list at one priority (or of one gate and one
    list), in arrival order.

    @ivar keys: queue ids, oldest first; may contain stale ones.
    @ivar stale: how many occurrences of a queue id in C{keys} are stale. A
        queue id is live in at most one lane and was appended after its stale
        occurrences, so the pop skips exactly that many before the live one.
    @ivar live: the number of live entries in C{keys}.
    @ivar in_ring: whether the lane's list is in its priority's ring.
    @ivar list_index: the index of the list its entries are sent for.
    @ivar gate: the gate its entries are behind, or L{None}.
    @ivar open: whether it may be served: always for a lane without a
        gate, while its gate is open for the others.
    """

    __slots__ = ("gate", "in_ring", "keys", "list_index", "live", "open", "stale")

    def __init__(self, list_index: int, gate: str | None = None, open: bool = True) -> None:
        self.keys: deque[str] = deque()
        self.stale: dict[str, int] = {}
        self.live = 0
        self.in_ring = False
        self.list_index = list_index
        self.gate = gate
        self.open = open

    def live_ids(self) -> list[str]:
        """
        The live queue ids, oldest first.
        """
        if not self.stale:
            return list(self.keys)
        skip = dict(self.stale)
        live = []
        for queue_id in self.keys:
            count = skip.get(queue_id)
            if count:
                skip[queue_id] = count - 1
            else:
                live.append(queue_id)
        return live


class _Bucket:
    """
    The deferred entries whose next attempt falls in one bucket of time.

    @ivar ids: queue ids in the order they were deferred; may hold stale
        ones (entries since released, held, cancelled or deferred again),
        and an entry deferred twice into the bucket twice.
    @ivar live: how many entries are deferred into this bucket now.
    @ivar earliest: the earliest next attempt of a live entry, or L{None}
        when it must be looked up again (the entry that had it left).
    """

    __slots__ = ("earliest", "ids", "live")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.live = 0
        self.earliest: float | None = None


def _selector(
    list_indexes: dict[str, int],
    list: str | None,
    priority: Priority | int | None,
    state: MessageState | None,
) -> tuple[int, int] | None:
    """
    The C{(mask, bits)} that the records of the selected entries have, or
    L{None} when no entry can match (an unknown list, a final state).
    """
    mask = bits = 0
    if priority is not None:
        mask |= _mask(_PRIORITY_BITS) << _PRIORITY_SHIFT
        bits |= int(Priority(priority)) << _PRIORITY_SHIFT
    if state is not None:
        code = _STATE_CODES.get(state)
        if code is None:
            return None
        mask |= _STATE_MASK
        bits |= code << _STATE_SHIFT
    if list is not None:
        index = list_indexes.get(list)
        if index is None:
            return None
        mask |= _mask(_LIST_BITS) << _LIST_SHIFT
        bits |= index << _LIST_SHIFT
    return mask, bits


def _select(
    records: Iterator[tuple[str, int]], selector: tuple[int, int], after: str | None
) -> list[str]:
    mask, bits = selector
    if after is None:
        if not mask:
            return [queue_id for queue_id, _ in records]
        return [queue_id for queue_id, record in records if record & mask == bits]
    if not mask:
        return [queue_id for queue_id, _ in records if queue_id > after]
    return [queue_id for queue_id, record in records if record & mask == bits and queue_id > after]


class SchedulerSnapshot:
    """
    The scheduler's entries and ready order as they were at one moment,
    for work spread over several reactor turns: what changes in the
    scheduler afterwards does not show here.

    Taking one copies the dict of entries (about 30 bytes per entry, a few
    milliseconds for a million) and the ready lanes (8 bytes per ready
    entry).
    """

    def __init__(
        self,
        records: dict[str, int],
        list_names: list[str],
        list_indexes: dict[str, int],
        lanes: dict[Priority, list[tuple[str, list[str]]]],
    ) -> None:
        self._records = records
        # Both only ever grow, so sharing them keeps the indexes valid.
        self._list_names = list_names
        self._list_indexes = list_indexes
        self._lanes = lanes

    def __len__(self) -> int:
        return len(self._records)

    def get(self, queue_id: str) -> ScheduledEntry | None:
        """
        The entry with this queue id as it was, or L{None}.
        """
        record = self._records.get(queue_id)
        if record is None:
            return None
        return _entry_of(queue_id, record, self._list_names)

    def ready_lanes(self, priority: Priority | int) -> list[tuple[str, list[str]]]:
        """
        As L{Scheduler.ready_lanes}, at the snapshot's moment.
        """
        return self._lanes[Priority(priority)]

    def ready_lane_lengths(self, priority: Priority | int) -> list[tuple[str, int]]:
        """
        As L{Scheduler.ready_lane_lengths}, at the snapshot's moment.
        """
        return [(name, len(ids)) for name, ids in self._lanes[Priority(priority)]]

    def queue_ids(
        self,
        *,
        list: str | None = None,
        priority: Priority | int | None = None,
        state: MessageState | None = None,
        after: str | None = None,
    ) -> list[str]:
        """
        As L{Scheduler.queue_ids}, at the snapshot's moment.
        """
        return next(self.queue_id_runs(len(self._records) or 1, list, priority, state, after))

    def queue_id_runs(
        self,
        size: int,
        list: str | None = None,
        priority: Priority | int | None = None,
        state: MessageState | None = None,
        after: str | None = None,
    ) -> Iterator[list[str]]:
        """
        Select queue ids as L{Scheduler.queue_ids} does, looking at C{size}
        entries at a time.

        @return: for each run of C{size} entries, in the order they were
            added, the queue ids among them that match (a list, maybe
            empty): C{ceil(len(self) / size)} lists, and one for an empty
            snapshot.
        """
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size}")
        selector = _selector(self._list_indexes, list, priority, state)
        records = iter(self._records.items())
        runs = max(1, math.ceil(len(self._records) / size))
        for _ in range(runs):
            run = itertools.islice(records, size)
            if selector is None:
                for _ignored in run:
                    pass
                yield []
            else:
                yield _select(run, selector, after)


class Scheduler:
    """
    The priority scheduler: which queued message is sent next.

    Times are whatever the caller's clock says (seconds); nothing here reads
    a clock.
    """

    def __init__(self, bucket_width: float = DEFAULT_BUCKET_WIDTH) -> None:
        """
        @param bucket_width: see L{DEFAULT_BUCKET_WIDTH}.
        """
        if not (bucket_width > 0 and math.isfinite(bucket_width)):
            raise ValueError(f"bucket_width must be a positive number, not {bucket_width!r}")
        self._records: dict[str, int] = {}
        self._list_names: list[str] = []
        self._list_indexes: dict[str, int] = {}
        # Per priority: lane key -> lane, the ring of the keys of the open
        # lanes that may hold ready entries, and the number of ready
        # entries in open lanes.
        self._lanes: dict[int, dict[LaneKey, _Lane]] = {p: {} for p in _PRIORITIES}
        self._rings: dict[int, deque[LaneKey]] = {p: deque() for p in _PRIORITIES}
        self._ready: dict[int, int] = dict.fromkeys(_PRIORITIES, 0)
        # Gates: the gate of each entry behind one, the open gates, and per
        # priority the ready entries behind open gates (part of _ready)
        # and behind closed ones (not part of it).
        self._gate_of: dict[str, str] = {}
        self._open_gates: set[str] = set()
        self._gated_ready: dict[int, int] = dict.fromkeys(_PRIORITIES, 0)
        self._closed_ready: dict[int, int] = dict.fromkeys(_PRIORITIES, 0)
        # Deferred entries: those of the buckets up to _due_key (the
        # buckets that came due) in the heap _due, the later ones in
        # _buckets, whose keys are in the heap _bucket_keys once each.
        self._bucket_width = bucket_width
        self._buckets: dict[int, _Bucket] = {}
        self._bucket_keys: list[int] = []
        self._due: list[tuple[float, str]] = []
        self._due_key = -1
        # Per state code.
        self._by_state = [0] * len(_STATES)
        self._by_priority: dict[int, int] = dict.fromkeys(_PRIORITIES, 0)

    # Queries

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._records

    def get(self, queue_id: str) -> ScheduledEntry | None:
        """
        The entry with this queue id, or L{None}.
        """
        record = self._records.get(queue_id)
        if record is None:
            return None
        return _entry_of(queue_id, record, self._list_names)

    def entries(self) -> Iterator[ScheduledEntry]:
        """
        Every entry, in the order they were added, as they were when the
        iteration began (O(n): for listings; L{queue_ids} selects without
        building every entry).
        """
        list_names = self._list_names
        for queue_id, record in self._records.copy().items():
            yield _entry_of(queue_id, record, list_names)

    def queue_ids(
        self,
        *,
        list: str | None = None,
        priority: Priority | int | None = None,
        state: MessageState | None = None,
        after: str | None = None,
    ) -> list[str]:
        """
        The queue ids of the entries of this list, priority and state (each
        L{None} for any), greater than C{after} when given, in the order
        the entries were added. No entry is built: about 40 ns an entry.
        """
        selector = _selector(self._list_indexes, list, priority, state)
        if selector is None:
            return []
        return _select(iter(self._records.items()), selector, after)

    def ready_lanes(self, priority: Priority | int) -> list[tuple[str, list[str]]]:
        """
        The ready entries of one priority, in the order L{pop_ready} will
        hand them out if nothing changes: the lists in the order the
        round-robin serves them next, each with its ready queue ids, oldest
        first. Entries handed out one per list in turn, in this order,
        give the exact order of the pops.

        Deferred entries due by now count only once made ready (by
        L{has_ready}, L{next_wakeup} or L{pop_ready} at the current time).
        """
        p = int(Priority(priority))
        lanes = self._lanes[p]
        names = self._list_names
        result = []
        for key in self._rings[p]:
            lane = lanes[key]
            if lane.live:
                result.append((names[lane.list_index], lane.live_ids()))
        return result

    def ready_lane_lengths(self, priority: Priority | int) -> list[tuple[str, int]]:
        """
        The lists of L{ready_lanes}, in the same order, with how many ready
        entries each has (O(lists), no queue id copied).
        """
        p = int(Priority(priority))
        lanes = self._lanes[p]
        names = self._list_names
        return [
            (names[lanes[key].list_index], lanes[key].live)
            for key in self._rings[p]
            if lanes[key].live
        ]

    def snapshot(self) -> SchedulerSnapshot:
        """
        Every entry and the ready order, as they are now (see
        L{SchedulerSnapshot}).
        """
        return SchedulerSnapshot(
            self._records.copy(),
            self._list_names,
            self._list_indexes,
            {p: self.ready_lanes(p) for p in _PRIORITIES},
        )

    def counts_by_state(self) -> dict[MessageState, int]:
        """
        How many entries are in each state.
        """
        return {_STATES[code]: count for code, count in enumerate(self._by_state)}

    def counts_by_priority(self) -> dict[Priority, int]:
        """
        How many entries (in any state) have each priority.
        """
        return {Priority(p): n for p, n in self._by_priority.items()}

    def ready_by_priority(self) -> dict[Priority, int]:
        """
        How many entries are ready to be sent, per priority (those behind a
        closed gate are not).
        """
        return {Priority(p): n for p, n in self._ready.items()}

    def ready_count(self, priority: Priority | int) -> int:
        """
        How many entries of this priority are ready to be sent (as
        L{ready_by_priority} counts them), without building a dict.
        """
        return self._ready[int(priority)]

    def ready_behind_gates(self, priority: Priority | int) -> tuple[int, int]:
        """
        The ready entries of one priority that are behind gates.

        @return: how many are behind open gates (counted as ready by
            L{ready_by_priority}), and how many behind closed ones.
        """
        p = int(Priority(priority))
        return self._gated_ready[p], self._closed_ready[p]

    # Gates

    def gate_of(self, queue_id: str) -> str | None:
        """
        The gate an entry is behind, or L{None}.
        """
        return self._gate_of.get(queue_id)

    def gated(self, gate: str) -> list[str]:
        """
        The queue ids of the entries behind C{gate}, in any state (a scan of
        the entries behind gates, not of every entry).
        """
        return [queue_id for queue_id, g in self._gate_of.items() if g == gate]

    def gates(self) -> set[str]:
        """
        The gates that have entries behind them.
        """
        return set(self._gate_of.values())

    def is_open(self, gate: str) -> bool:
        """
        Whether C{gate} is open (gates are closed until opened).
        """
        return gate in self._open_gates

    def open_gate(self, gate: str) -> None:
        """
        Let the entries behind C{gate} be handed out: its lanes join the
        end of their priorities' rings. Opening an open gate does nothing.
        """
        if gate in self._open_gates:
            return
        self._open_gates.add(gate)
        self._set_gate_lanes(gate, True)

    def close_gate(self, gate: str) -> None:
        """
        Stop handing out the entries behind C{gate} (those being sent are
        not affected). Closing a closed gate does nothing.
        """
        if gate not in self._open_gates:
            return
        self._open_gates.discard(gate)
        self._set_gate_lanes(gate, False)

    def has_ready(self, now: float) -> bool:
        """
        Whether L{pop_ready} would hand out an entry at C{now}.
        """
        self._promote_due(now)
        return any(self._ready.values())

    def next_wakeup(self, now: float) -> float | None:
        """
        When the earliest deferred entry becomes ready, or L{None} when none
        is deferred. Entries due at C{now} are made ready first, so the
        answer is later than C{now}.
        """
        self._promote_due(now)
        due = self._due
        while due:
            when, queue_id = due[0]
            if self._is_waiting(queue_id, when):
                return when
            heapq.heappop(due)
        keys = self._bucket_keys
        while keys:
            key = keys[0]
            bucket = self._buckets[key]
            if bucket.live:
                if bucket.earliest is None:
                    bucket.earliest = min(self._next_attempt(q) for q in self._live(bucket, key))
                return bucket.earliest
            heapq.heappop(keys)
            del self._buckets[key]
        return None

    # Changes

    def add(self, entry: ScheduledEntry, gate: str | None = None) -> None:
        """
        Add an entry in state C{queued}, C{deferred} or C{held}.

        @param gate: the gate it is behind, if any (see the module's
            description); it stays behind it until it leaves.
        @raise ValueError: the queue id is already scheduled, the state is not
            one of those, or a field is out of range.
        """
        queue_id = entry.queue_id
        if queue_id in self._records:
            raise ValueError(f"{queue_id} is already scheduled")
        state = entry.state
        if state is MessageState.QUEUED:
            code = _QUEUED
        elif state is MessageState.DEFERRED:
            code = _DEFERRED
        elif state is MessageState.HELD:
            code = _HELD
        else:
            raise ValueError(f"cannot add an entry in state {state.value}")
        priority = entry.priority
        if type(priority) is not Priority:
            priority = Priority(priority)
        number = int(priority)
        list_index = self._list_indexes.get(entry.list)
        if list_index is None:
            list_index = self._list_index(entry.list)
        record = _pack(
            number, code, entry.attempts, list_index, entry.location, entry.next_attempt_at
        )
        self._records[queue_id] = record
        if gate is not None:
            self._gate_of[queue_id] = gate
        self._by_state[code] += 1
        self._by_priority[number] += 1
        if code == _QUEUED:
            self._enqueue(queue_id, number, list_index)
        elif code == _DEFERRED:
            self._wait(queue_id, entry.next_attempt_at)

    def pop_ready(self, now: float) -> ScheduledEntry | None:
        """
        Take the next entry to send, and mark it C{sending}.

        @param now: the current time; deferred entries due by then are ready.
        @return: the entry, or L{None} when nothing is ready.
        """
        self._promote_due(now)
        for priority in _PRIORITIES:
            if self._ready[priority]:
                queue_id = self._pop_from_ring(priority)
                record = _with_state(self._records[queue_id], _SENDING)
                self._records[queue_id] = record
                self._count_state(_QUEUED, _SENDING)
                return _entry_of(queue_id, record, self._list_names)
        return None

    def complete(self, queue_id: str) -> ScheduledEntry:
        """
        Forget a C{sending} entry whose delivery reached a final state.

        @return: the entry as it was.
        """
        record = self._require(queue_id, _SENDING)
        return self._forget(queue_id, record)

    def defer(self, queue_id: str, next_attempt_at: float, attempts: int) -> None:
        """
        Put a C{sending} entry back to wait until C{next_attempt_at}.

        @param attempts: the attempts made so far, this one included.
        """
        record = self._require(queue_id, _SENDING)
        record = _with_state(_with_retry(record, attempts, next_attempt_at), _DEFERRED)
        self._records[queue_id] = record
        self._count_state(_SENDING, _DEFERRED)
        self._wait(queue_id, next_attempt_at)

    def requeue(self, queue_id: str) -> None:
        """
        Make a C{sending} entry ready again, at the end of its list's turn,
        without counting an attempt (the delivery was not tried).
        """
        record = self._require(queue_id, _SENDING)
        self._make_ready(queue_id, record, _SENDING)

    def hold(self, queue_id: str) -> None:
        """
        Keep a C{queued} or C{deferred} entry from being sent until released.
        Holding a held entry does nothing.

        @raise InvalidTransition: the entry is being sent.
        """
        record = self._known(queue_id)
        code = _code_of(record)
        if code == _HELD:
            return
        if code == _SENDING:
            raise InvalidTransition(f"{queue_id} is being sent")
        self._leave(queue_id, record, code)
        self._records[queue_id] = _with_state(record, _HELD)
        self._count_state(code, _HELD)

    def release(self, queue_id: str) -> None:
        """
        Make a C{held} or C{deferred} entry ready now, at the end of its
        list's turn. Releasing a queued entry does nothing.

        @raise InvalidTransition: the entry is being sent.
        """
        record = self._known(queue_id)
        code = _code_of(record)
        if code == _QUEUED:
            return
        if code == _SENDING:
            raise InvalidTransition(f"{queue_id} is being sent")
        self._leave(queue_id, record, code)
        self._make_ready(queue_id, record, code)

    def cancel(self, queue_id: str) -> ScheduledEntry:
        """
        Drop an entry that is not being sent.

        @return: the entry as it was.
        @raise InvalidTransition: the entry is being sent.
        """
        record = self._known(queue_id)
        code = _code_of(record)
        if code == _SENDING:
            raise InvalidTransition(f"{queue_id} is being sent")
        self._leave(queue_id, record, code)
        return self._forget(queue_id, record)

    def reprioritize(self, queue_id: str, priority: Priority | int) -> None:
        """
        Change an entry's priority. A ready entry moves to the end of its
        list's lane at the new priority; others keep it for later.
        """
        new = int(Priority(priority))
        record = self._known(queue_id)
        old = _priority_of(record)
        if new == old:
            return
        ready = _code_of(record) == _QUEUED
        if ready:
            self._unready(queue_id, old, _list_of(record))
        self._records[queue_id] = _with_priority(record, new)
        self._by_priority[old] -= 1
        self._by_priority[new] += 1
        if ready:
            self._enqueue(queue_id, new, _list_of(record))

    # Internals

    def _list_index(self, name: str) -> int:
        index = self._list_indexes.get(name)
        if index is None:
            if len(self._list_names) >= MAX_LISTS:
                raise ValueError("too many distinct lists")
            index = len(self._list_names)
            # Keep one copy of each name, however many entries share it.
            self._list_names.append(name)
            self._list_indexes[name] = index
        return index

    def _known(self, queue_id: str) -> int:
        record = self._records.get(queue_id)
        if record is None:
            raise UnknownMessage(queue_id)
        return record

    def _require(self, queue_id: str, code: int) -> int:
        record = self._known(queue_id)
        actual = _code_of(record)
        if actual != code:
            raise InvalidTransition(
                f"{queue_id} is {_STATES[actual].value}, not {_STATES[code].value}"
            )
        return record

    def _forget(self, queue_id: str, record: int) -> ScheduledEntry:
        del self._records[queue_id]
        if self._gate_of:
            self._gate_of.pop(queue_id, None)
        self._by_state[_code_of(record)] -= 1
        self._by_priority[_priority_of(record)] -= 1
        return _entry_of(queue_id, record, self._list_names)

    def _count_state(self, old: int, new: int) -> None:
        self._by_state[old] -= 1
        self._by_state[new] += 1

    def _leave(self, queue_id: str, record: int, code: int) -> None:
        """
        Take a waiting entry out of its lane (queued) or bucket (deferred).
        """
        if code == _QUEUED:
            self._unready(queue_id, _priority_of(record), _list_of(record))
        elif code == _DEFERRED:
            self._unwait(_next_attempt_of(record))

    def _make_ready(self, queue_id: str, record: int, old: int) -> None:
        self._records[queue_id] = _with_state(record, _QUEUED)
        self._count_state(old, _QUEUED)
        self._enqueue(queue_id, _priority_of(record), _list_of(record))

    def _lane_key(self, queue_id: str, list_index: int) -> LaneKey:
        gate = self._gate_of.get(queue_id) if self._gate_of else None
        return list_index if gate is None else (gate, list_index)

    def _enqueue(self, queue_id: str, priority: int, list_index: int) -> None:
        lanes = self._lanes[priority]
        key = self._lane_key(queue_id, list_index) if self._gate_of else list_index
        lane = lanes.get(key)
        if lane is None:
            if isinstance(key, tuple):
                gate = key[0]
                lane = lanes[key] = _Lane(list_index, gate, gate in self._open_gates)
            else:
                lane = lanes[key] = _Lane(list_index)
        lane.keys.append(queue_id)
        lane.live += 1
        if lane.gate is not None:
            if not lane.open:
                self._closed_ready[priority] += 1
                return
            self._gated_ready[priority] += 1
        self._ready[priority] += 1
        if not lane.in_ring:
            lane.in_ring = True
            self._rings[priority].append(key)

    def _unready(self, queue_id: str, priority: int, list_index: int) -> None:
        lanes = self._lanes[priority]
        key = self._lane_key(queue_id, list_index)
        lane = lanes[key]
        lane.live -= 1
        if not lane.open:
            self._closed_ready[priority] -= 1
        else:
            self._ready[priority] -= 1
            if lane.gate is not None:
                self._gated_ready[priority] -= 1
        if lane.live == 0:
            # Only stale ids are left: drop them now rather than at a pop.
            lane.keys.clear()
            lane.stale.clear()
            if not lane.in_ring:
                # Out of the ring (closed), nothing would ever drop it.
                del lanes[key]
        else:
            lane.stale[queue_id] = lane.stale.get(queue_id, 0) + 1

    def _set_gate_lanes(self, gate: str, open: bool) -> None:
        """
        Open or close the lanes of C{gate}, moving their entries between
        the ready and the closed counts, and their keys in or out of the
        rings.
        """
        for priority in _PRIORITIES:
            lanes = self._lanes[priority]
            keys = [k for k, lane in lanes.items() if lane.gate == gate and lane.open != open]
            for key in keys:
                lane = lanes[key]
                lane.open = open
                if open:
                    self._closed_ready[priority] -= lane.live
                    self._ready[priority] += lane.live
                    self._gated_ready[priority] += lane.live
                    if lane.live and not lane.in_ring:
                        lane.in_ring = True
                        self._rings[priority].append(key)
                    elif not lane.live and not lane.in_ring:
                        del lanes[key]
                else:
                    self._ready[priority] -= lane.live
                    self._gated_ready[priority] -= lane.live
                    self._closed_ready[priority] += lane.live
                    if lane.in_ring:
                        lane.in_ring = False
                        self._rings[priority].remove(key)
                    if not lane.live:
                        del lanes[key]

    def _pop_from_ring(self, priority: int) -> str:
        ring = self._rings[priority]
        lanes = self._lanes[priority]
        while True:
            key = ring[0]
            lane = lanes[key]
            if lane.live == 0:
                ring.popleft()
                lane.in_ring = False
                del lanes[key]
                continue
            queue_id = self._pop_live(lane)
            lane.live -= 1
            self._ready[priority] -= 1
            if lane.gate is not None:
                self._gated_ready[priority] -= 1
            if lane.live:
                ring.rotate(-1)
            else:
                ring.popleft()
                del lanes[key]
            return queue_id

    @staticmethod
    def _pop_live(lane: _Lane) -> str:
        while True:
            queue_id = lane.keys.popleft()
            stale = lane.stale.get(queue_id)
            if not stale:
                return queue_id
            if stale == 1:
                del lane.stale[queue_id]
            else:
                lane.stale[queue_id] = stale - 1

    # Deferred entries

    def _bucket_key(self, when: float) -> int:
        return int(when // self._bucket_width)

    def _next_attempt(self, queue_id: str) -> float:
        return _next_attempt_of(self._records[queue_id])

    def _wait(self, queue_id: str, when: float) -> None:
        """
        Keep a deferred entry until C{when}.
        """
        key = self._bucket_key(when)
        if key <= self._due_key:
            heapq.heappush(self._due, (when, queue_id))
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket()
            heapq.heappush(self._bucket_keys, key)
        # An empty bucket's earliest is unknown; otherwise it only moves
        # earlier.
        earliest = bucket.earliest
        if not bucket.live or (earliest is not None and when < earliest):
            bucket.earliest = when
        bucket.ids.append(queue_id)
        bucket.live += 1

    def _unwait(self, when: float) -> None:
        """
        Count a deferred entry due at C{when} out of its bucket (released,
        held or cancelled); its queue id stays there, stale.
        """
        key = self._bucket_key(when)
        if key <= self._due_key:
            # The heap skips it when it comes up: _is_waiting.
            return
        bucket = self._buckets[key]
        bucket.live -= 1
        if not bucket.live:
            bucket.ids.clear()
            bucket.earliest = None
        elif when == bucket.earliest:
            bucket.earliest = None

    def _is_waiting(self, queue_id: str, due: float) -> bool:
        record = self._records.get(queue_id)
        return (
            record is not None
            and record & _STATE_MASK == _DEFERRED_BITS
            and _next_attempt_of(record) == due
        )

    def _live(self, bucket: _Bucket, key: int) -> list[str]:
        """
        The queue ids deferred into this bucket now, each once.
        """
        records = self._records
        live = []
        for queue_id in bucket.ids:
            record = records.get(queue_id)
            if (
                record is not None
                and record & _STATE_MASK == _DEFERRED_BITS
                and self._bucket_key(_next_attempt_of(record)) == key
            ):
                live.append(queue_id)
        if len(live) != bucket.live:
            live = list(dict.fromkeys(live))
        return live

    def _promote_due(self, now: float) -> None:
        due = self._due
        while due and due[0][0] <= now:
            when, queue_id = heapq.heappop(due)
            if self._is_waiting(queue_id, when):
                self._make_ready(queue_id, self._records[queue_id], _DEFERRED)
        now_key = self._bucket_key(now)
        keys = self._bucket_keys
        while keys and keys[0] <= now_key:
            key = heapq.heappop(keys)
            bucket = self._buckets.pop(key)
            # From now on, entries deferred into this bucket or an earlier
            # one go to the heap, so the heap always comes before the
            # buckets.
            self._due_key = key
            if not bucket.live:
                continue
            waiting = sorted((self._next_attempt(q), q) for q in self._live(bucket, key))
            if key < now_key:
                for _, queue_id in waiting:
                    self._make_ready(queue_id, self._records[queue_id], _DEFERRED)
                continue
            # The bucket of now: its entries due later wait in the heap.
            ready = 0
            while ready < len(waiting) and waiting[ready][0] <= now:
                queue_id = waiting[ready][1]
                self._make_ready(queue_id, self._records[queue_id], _DEFERRED)
                ready += 1
            rest = waiting[ready:]
            if due:
                due.extend(rest)
                heapq.heapify(due)
            else:
                # A sorted list is a heap.
                self._due = due = rest
