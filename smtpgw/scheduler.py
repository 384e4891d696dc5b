"""
The in-memory priority scheduler of the send queue (PRODUCT section 3).

Pure: no reactor, no I/O; the caller passes the current time. The order rules:

    - strict priority: an entry is handed out only when no entry of a higher
      priority (lower number) is ready;
    - within one priority, the lists that have ready entries are served in
      turn (round-robin), so one list's burst does not starve another's;
    - within one list and priority, first in, first out.

A deferred entry becomes ready at its C{next_attempt_at}; a held one only when
released.

Memory: the gateway must keep a million queued messages in well under
200 bytes each. An entry is therefore stored as one packed integer in a dict
keyed by queue id (see L{_pack}), the ready entries as queue ids in one deque
per (priority, list) "lane", and only deferred entries in a heap. Entries
leave a lane lazily: a hold, cancel or re-prioritization of a ready entry only
counts it as stale in its lane, and the pop skips it; this keeps every
operation O(1) or O(log n). L{ScheduledEntry} values are built on demand for
the callers.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections import deque
from collections.abc import Iterator

from attrs import frozen

from smtpgw.interfaces import JournalLocation
from smtpgw.model import MessageState, Priority

__all__ = [
    "InvalidTransition",
    "ScheduledEntry",
    "Scheduler",
    "UnknownMessage",
]

_PRIORITIES = tuple(Priority)


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


def _field(record: int, shift: int, bits: int) -> int:
    return (record >> shift) & _mask(bits)


def _checked(value: int, bits: int, name: str) -> int:
    if not 0 <= value <= _mask(bits):
        raise ValueError(f"{name} {value} does not fit in {bits} bits")
    return value


def _float_bits(value: float) -> int:
    result: int = _QUAD.unpack(_DOUBLE.pack(value))[0]
    return result


def _bits_float(bits: int) -> float:
    result: float = _DOUBLE.unpack(_QUAD.pack(bits))[0]
    return result


def _pack(
    priority: int,
    state: MessageState,
    attempts: int,
    list_index: int,
    location: JournalLocation,
    next_attempt_at: float,
) -> int:
    """
    Pack one entry (all but its queue id) into one integer.

    @raise ValueError: a field is out of its range.
    """
    if not math.isfinite(next_attempt_at) or next_attempt_at < 0:
        raise ValueError(f"next_attempt_at {next_attempt_at!r} is not a time")
    return (
        priority << _PRIORITY_SHIFT
        | _STATE_CODES[state] << _STATE_SHIFT
        | min(max(attempts, 0), MAX_ATTEMPTS) << _ATTEMPTS_SHIFT
        | list_index << _LIST_SHIFT
        | _checked(location.segment, _SEGMENT_BITS, "segment") << _SEGMENT_SHIFT
        | _checked(location.offset, _OFFSET_BITS, "offset") << _OFFSET_SHIFT
        | _checked(location.length, _LENGTH_BITS, "length") << _LENGTH_SHIFT
        | _float_bits(next_attempt_at) << _NEXT_SHIFT
    )


def _priority_of(record: int) -> int:
    return _field(record, _PRIORITY_SHIFT, _PRIORITY_BITS)


def _state_of(record: int) -> MessageState:
    return _STATES_BY_CODE[_field(record, _STATE_SHIFT, _STATE_BITS)]


def _attempts_of(record: int) -> int:
    return _field(record, _ATTEMPTS_SHIFT, _ATTEMPTS_BITS)


def _list_of(record: int) -> int:
    return _field(record, _LIST_SHIFT, _LIST_BITS)


def _next_attempt_of(record: int) -> float:
    return _bits_float(record >> _NEXT_SHIFT)


def _replace(record: int, shift: int, bits: int, value: int) -> int:
    return (record & ~(_mask(bits) << shift)) | (value << shift)


def _with_state(record: int, state: MessageState) -> int:
    return _replace(record, _STATE_SHIFT, _STATE_BITS, _STATE_CODES[state])


def _with_priority(record: int, priority: int) -> int:
    return _replace(record, _PRIORITY_SHIFT, _PRIORITY_BITS, priority)


def _with_retry(record: int, attempts: int, next_attempt_at: float) -> int:
    if not math.isfinite(next_attempt_at) or next_attempt_at < 0:
        raise ValueError(f"next_attempt_at {next_attempt_at!r} is not a time")
    low = record & _mask(_NEXT_SHIFT)
    low = _replace(low, _ATTEMPTS_SHIFT, _ATTEMPTS_BITS, min(max(attempts, 0), MAX_ATTEMPTS))
    return low | _float_bits(next_attempt_at) << _NEXT_SHIFT


class _Lane:
    """
    The ready entries of one list at one priority, in arrival order.

    @ivar keys: queue ids, oldest first; may contain stale ones.
    @ivar stale: how many occurrences of a queue id in C{keys} are stale. A
        queue id is live in at most one lane and was appended after its stale
        occurrences, so the pop skips exactly that many before the live one.
    @ivar live: the number of live entries in C{keys}.
    @ivar in_ring: whether the lane's list is in its priority's ring.
    """

    __slots__ = ("in_ring", "keys", "live", "stale")

    def __init__(self) -> None:
        self.keys: deque[str] = deque()
        self.stale: dict[str, int] = {}
        self.live = 0
        self.in_ring = False


class Scheduler:
    """
    The priority scheduler: which queued message is sent next.

    Times are whatever the caller's clock says (seconds); nothing here reads
    a clock.
    """

    def __init__(self) -> None:
        self._records: dict[str, int] = {}
        self._list_names: list[str] = []
        self._list_indexes: dict[str, int] = {}
        # Per priority: list index -> lane, the ring of list indexes whose
        # lanes may hold ready entries, and the number of ready entries.
        self._lanes: dict[int, dict[int, _Lane]] = {p: {} for p in _PRIORITIES}
        self._rings: dict[int, deque[int]] = {p: deque() for p in _PRIORITIES}
        self._ready: dict[int, int] = dict.fromkeys(_PRIORITIES, 0)
        self._deferred: list[tuple[float, str]] = []
        self._by_state: dict[MessageState, int] = dict.fromkeys(_STATE_CODES, 0)
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
        return self._entry(queue_id, record)

    def entries(self) -> Iterator[ScheduledEntry]:
        """
        Every entry, in the order they were added (O(n): for listings).
        """
        for queue_id, record in list(self._records.items()):
            yield self._entry(queue_id, record)

    def counts_by_state(self) -> dict[MessageState, int]:
        """
        How many entries are in each state.
        """
        return dict(self._by_state)

    def counts_by_priority(self) -> dict[Priority, int]:
        """
        How many entries (in any state) have each priority.
        """
        return {Priority(p): n for p, n in self._by_priority.items()}

    def ready_by_priority(self) -> dict[Priority, int]:
        """
        How many entries are ready to be sent, per priority.
        """
        return {Priority(p): n for p, n in self._ready.items()}

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
        while self._deferred:
            due, queue_id = self._deferred[0]
            if self._is_waiting(queue_id, due):
                return due
            heapq.heappop(self._deferred)
        return None

    # Changes

    def add(self, entry: ScheduledEntry) -> None:
        """
        Add an entry in state C{queued}, C{deferred} or C{held}.

        @raise ValueError: the queue id is already scheduled, the state is not
            one of those, or a field is out of range.
        """
        if entry.queue_id in self._records:
            raise ValueError(f"{entry.queue_id} is already scheduled")
        if entry.state not in (MessageState.QUEUED, MessageState.DEFERRED, MessageState.HELD):
            raise ValueError(f"cannot add an entry in state {entry.state.value}")
        priority = int(Priority(entry.priority))
        record = _pack(
            priority,
            entry.state,
            entry.attempts,
            self._list_index(entry.list),
            entry.location,
            entry.next_attempt_at,
        )
        self._records[entry.queue_id] = record
        self._by_state[entry.state] += 1
        self._by_priority[priority] += 1
        if entry.state is MessageState.QUEUED:
            self._enqueue(entry.queue_id, priority, _list_of(record))
        elif entry.state is MessageState.DEFERRED:
            heapq.heappush(self._deferred, (entry.next_attempt_at, entry.queue_id))

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
                record = _with_state(self._records[queue_id], MessageState.SENDING)
                self._records[queue_id] = record
                self._count_state(MessageState.QUEUED, MessageState.SENDING)
                return self._entry(queue_id, record)
        return None

    def complete(self, queue_id: str) -> ScheduledEntry:
        """
        Forget a C{sending} entry whose delivery reached a final state.

        @return: the entry as it was.
        """
        record = self._require(queue_id, MessageState.SENDING)
        return self._forget(queue_id, record)

    def defer(self, queue_id: str, next_attempt_at: float, attempts: int) -> None:
        """
        Put a C{sending} entry back to wait until C{next_attempt_at}.

        @param attempts: the attempts made so far, this one included.
        """
        record = self._require(queue_id, MessageState.SENDING)
        record = _with_state(_with_retry(record, attempts, next_attempt_at), MessageState.DEFERRED)
        self._records[queue_id] = record
        self._count_state(MessageState.SENDING, MessageState.DEFERRED)
        heapq.heappush(self._deferred, (next_attempt_at, queue_id))

    def requeue(self, queue_id: str) -> None:
        """
        Make a C{sending} entry ready again, at the end of its list's turn,
        without counting an attempt (the delivery was not tried).
        """
        record = self._require(queue_id, MessageState.SENDING)
        self._make_ready(queue_id, record, MessageState.SENDING)

    def hold(self, queue_id: str) -> None:
        """
        Keep a C{queued} or C{deferred} entry from being sent until released.
        Holding a held entry does nothing.

        @raise InvalidTransition: the entry is being sent.
        """
        record = self._known(queue_id)
        state = _state_of(record)
        if state is MessageState.HELD:
            return
        if state is MessageState.SENDING:
            raise InvalidTransition(f"{queue_id} is being sent")
        if state is MessageState.QUEUED:
            self._unready(queue_id, _priority_of(record), _list_of(record))
        self._records[queue_id] = _with_state(record, MessageState.HELD)
        self._count_state(state, MessageState.HELD)

    def release(self, queue_id: str) -> None:
        """
        Make a C{held} or C{deferred} entry ready now, at the end of its
        list's turn. Releasing a queued entry does nothing.

        @raise InvalidTransition: the entry is being sent.
        """
        record = self._known(queue_id)
        state = _state_of(record)
        if state is MessageState.QUEUED:
            return
        if state is MessageState.SENDING:
            raise InvalidTransition(f"{queue_id} is being sent")
        self._make_ready(queue_id, record, state)

    def cancel(self, queue_id: str) -> ScheduledEntry:
        """
        Drop an entry that is not being sent.

        @return: the entry as it was.
        @raise InvalidTransition: the entry is being sent.
        """
        record = self._known(queue_id)
        state = _state_of(record)
        if state is MessageState.SENDING:
            raise InvalidTransition(f"{queue_id} is being sent")
        if state is MessageState.QUEUED:
            self._unready(queue_id, _priority_of(record), _list_of(record))
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
        state = _state_of(record)
        if state is MessageState.QUEUED:
            self._unready(queue_id, old, _list_of(record))
        self._records[queue_id] = _with_priority(record, new)
        self._by_priority[old] -= 1
        self._by_priority[new] += 1
        if state is MessageState.QUEUED:
            self._enqueue(queue_id, new, _list_of(record))

    # Internals

    def _entry(self, queue_id: str, record: int) -> ScheduledEntry:
        return ScheduledEntry(
            queue_id=queue_id,
            priority=Priority(_priority_of(record)),
            list=self._list_names[_list_of(record)],
            location=JournalLocation(
                segment=_field(record, _SEGMENT_SHIFT, _SEGMENT_BITS),
                offset=_field(record, _OFFSET_SHIFT, _OFFSET_BITS),
                length=_field(record, _LENGTH_SHIFT, _LENGTH_BITS),
            ),
            state=_state_of(record),
            attempts=_attempts_of(record),
            next_attempt_at=_next_attempt_of(record),
        )

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

    def _require(self, queue_id: str, state: MessageState) -> int:
        record = self._known(queue_id)
        actual = _state_of(record)
        if actual is not state:
            raise InvalidTransition(f"{queue_id} is {actual.value}, not {state.value}")
        return record

    def _forget(self, queue_id: str, record: int) -> ScheduledEntry:
        del self._records[queue_id]
        self._by_state[_state_of(record)] -= 1
        self._by_priority[_priority_of(record)] -= 1
        return self._entry(queue_id, record)

    def _count_state(self, old: MessageState, new: MessageState) -> None:
        self._by_state[old] -= 1
        self._by_state[new] += 1

    def _make_ready(self, queue_id: str, record: int, old: MessageState) -> None:
        self._records[queue_id] = _with_state(record, MessageState.QUEUED)
        self._count_state(old, MessageState.QUEUED)
        self._enqueue(queue_id, _priority_of(record), _list_of(record))

    def _enqueue(self, queue_id: str, priority: int, list_index: int) -> None:
        lanes = self._lanes[priority]
        lane = lanes.get(list_index)
        if lane is None:
            lane = lanes[list_index] = _Lane()
        lane.keys.append(queue_id)
        lane.live += 1
        self._ready[priority] += 1
        if not lane.in_ring:
            lane.in_ring = True
            self._rings[priority].append(list_index)

    def _unready(self, queue_id: str, priority: int, list_index: int) -> None:
        lane = self._lanes[priority][list_index]
        lane.live -= 1
        self._ready[priority] -= 1
        if lane.live == 0:
            # Only stale ids are left: drop them now rather than at a pop.
            lane.keys.clear()
            lane.stale.clear()
        else:
            lane.stale[queue_id] = lane.stale.get(queue_id, 0) + 1

    def _pop_from_ring(self, priority: int) -> str:
        ring = self._rings[priority]
        lanes = self._lanes[priority]
        while True:
            list_index = ring[0]
            lane = lanes[list_index]
            if lane.live == 0:
                ring.popleft()
                lane.in_ring = False
                del lanes[list_index]
                continue
            queue_id = self._pop_live(lane)
            lane.live -= 1
            self._ready[priority] -= 1
            if lane.live:
                ring.rotate(-1)
            else:
                ring.popleft()
                del lanes[list_index]
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

    def _is_waiting(self, queue_id: str, due: float) -> bool:
        record = self._records.get(queue_id)
        return (
            record is not None
            and _state_of(record) is MessageState.DEFERRED
            and _next_attempt_of(record) == due
        )

    def _promote_due(self, now: float) -> None:
        deferred = self._deferred
        while deferred and deferred[0][0] <= now:
            due, queue_id = heapq.heappop(deferred)
            if self._is_waiting(queue_id, due):
                self._make_ready(queue_id, self._records[queue_id], MessageState.DEFERRED)
