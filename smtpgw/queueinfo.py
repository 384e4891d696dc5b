"""
What an admin sees of the send queue: listings, and why a message waits
(PRODUCT section 3). Pure: the scheduler's entries, the time and the
dispatcher's situation go in; rows, positions, throttles and estimates come
out. The control channel, the pages and the JSON API all use it.

Position
========

A message's position is how many messages will be dispatched before it, if
nothing new arrives: every ready message of a higher priority, then those of
its own priority that the round-robin between lists serves first. Within one
priority the lists take turns, one message each, in the order of the
scheduler's ring; so the message at index C{i} of its list's lane, whose
list is at index C{r} of the ring, goes after C{min(len(lane), i)} messages
of every lane, and after one more message of each lane ahead of it in the
ring that is longer than C{i}.

Estimated send time
===================

The estimate assumes the gateway keeps dispatching at its limit and that
nothing of a higher priority arrives:

    - with C{--rate R}, the messages ahead leave at R a second, from the
      next rate token on: C{start + position / R} (when the time of the next
      token is not known, from now: the estimate may then be early by up to
      C{1 / R});
    - when the mean delivery time C{d} is known, C{--concurrency C} caps the
      pace at C{C / d} a second too, and the slower pace counts;
    - with neither limit known to bind (no rate, no delivery time), a message
      within the free delivery slots goes now, and for the others no estimate
      is given (it depends on how long deliveries take);
    - a deferred message is not sent before its next attempt time; a held
      message, or any while the queue is stopped, has no estimate.

Console sends
=============

A console send's messages wait behind the send's gate (see
L{smtpgw.queue}). While the gate holds them all (the send paused by an
admin, pre-empted by higher-priority traffic, the queue stopped), that is
what a message waits for: L{Throttle.CONSOLE_SEND_PAUSED}, with the reason
("console send 7 is paused: priority-1 SMTP+ traffic"), and no estimate.
A message behind a closed gate is not in line (the dispatcher does not see
it), so it has no position either.
"""

from __future__ import annotations

import bisect
import email.errors
import email.policy
import enum
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from typing import Any, Final, NamedTuple, Protocol

from attrs import frozen

from smtpgw.model import Envelope, MessageState, Priority
from smtpgw.scheduler import ScheduledEntry

__all__ = [
    "DEFAULT_LIST_LIMIT",
    "GONE_STATES",
    "MAX_LISTED_RECIPIENTS",
    "MAX_LIST_LIMIT",
    "MAX_SUBJECT_LENGTH",
    "QUEUE_STATES",
    "Conditions",
    "GateWait",
    "LaneSource",
    "MessageChange",
    "PageCandidates",
    "QueueFilter",
    "QueueListing",
    "QueueRow",
    "QueueStatus",
    "ReadyLane",
    "ReadyOrder",
    "Throttle",
    "Why",
    "change_document",
    "estimate_send_at",
    "explain",
    "iso8601",
    "listing_document",
    "message_subject",
    "parse_state",
    "queue_row",
    "row_document",
    "status_document",
    "why_document",
]

#: The states a message has while it is in the queue.
QUEUE_STATES: Final = (
    MessageState.QUEUED,
    MessageState.SENDING,
    MessageState.DEFERRED,
    MessageState.HELD,
)
#: The final states: a message in one of them has left the queue.
GONE_STATES: Final = (MessageState.DELIVERED, MessageState.BOUNCED, MessageState.CANCELLED)

#: Rows a listing gives when no limit is asked for.
DEFAULT_LIST_LIMIT: Final = 1000
#: The most rows one listing gives, so that a huge queue is never listed
#: whole by accident; page on with C{after}.
MAX_LIST_LIMIT: Final = 10_000
#: The recipients a listing row shows; C{recipient_count} has them all.
MAX_LISTED_RECIPIENTS: Final = 10
#: The characters of a subject a listing row shows; longer ones are cut
#: and end with an ellipsis.
MAX_SUBJECT_LENGTH: Final = 200
#: The bytes of a message looked at for its subject: headers past them are
#: not read (a header block is rarely more than a few kilobytes).
_SUBJECT_SCAN: Final = 64 * 1024
_HEADERS: Final = BytesHeaderParser(policy=email.policy.default)


def iso8601(seconds: float | None) -> str | None:
    """
    A time as the CLI's and the API's JSON show it: ISO 8601, UTC, to the
    second, with a C{Z}.
    """
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_state(text: str) -> MessageState:
    """
    Read a state to filter a listing on.

    @raise ValueError: not a state, or a final state (those messages are no
        longer in the queue), with a one-line reason.
    """
    try:
        state = MessageState(text.strip().lower())
    except ValueError:
        names = ", ".join(s.value for s in QUEUE_STATES)
        raise ValueError(f"{text!r} is not a queue state: use one of {names}") from None
    if state in GONE_STATES:
        names = ", ".join(s.value for s in QUEUE_STATES)
        raise ValueError(
            f"{state.value} messages are no longer in the queue (it holds only {names} messages)"
        )
    return state


class Throttle(enum.Enum):
    """
    What keeps a message from being sent now.
    """

    SENDING = "sending"
    HELD = "held"
    STOPPED = "stopped"
    DEFERRED = "deferred"
    HIGHER_PRIORITY = "higher_priority"
    CONCURRENCY = "concurrency"
    RATE = "rate"
    NEXT = "next"
    CONSOLE_SEND_PAUSED = "console_send_paused"


@frozen
class GateWait:
    """
    The gate a message is behind (a console send's), as "why" needs it.

    @ivar label: what the gate stands for (C{"console send 7"}).
    @ivar hold: why none of its messages goes now (C{"paused by an
        admin"}, C{"priority-1 SMTP+ traffic"}, C{"queue stopped"}), or
        L{None} when they go in their turn.
    @ivar in_line: whether the gate is open to the dispatcher, so that its
        ready messages have a place in the order.
    """

    label: str
    hold: str | None
    in_line: bool


@frozen
class Conditions:
    """
    The dispatcher's situation at one moment.

    @ivar now: the time of the snapshot.
    @ivar rate: C{--rate}, messages a second; 0 is no limit.
    @ivar concurrency: C{--concurrency}, deliveries at once.
    @ivar in_flight: deliveries under way.
    @ivar paused: whether an admin stopped the queue.
    @ivar next_token_at: when the rate limit lets the next message go, when
        known.
    @ivar delivery_time: the mean time one delivery takes, when known.
    """

    now: float
    rate: float
    concurrency: int
    in_flight: int
    paused: bool
    next_token_at: float | None = None
    delivery_time: float | None = None

    @property
    def free_slots(self) -> int:
        """
        Deliveries that could start now as far as C{--concurrency} goes.
        """
        return max(0, self.concurrency - self.in_flight)


class ReadyLane(NamedTuple):
    """
    The ready messages of one list at one priority, oldest first (the
    shape of L{smtpgw.scheduler.Scheduler.ready_lanes}' items).
    """

    list: str
    queue_ids: Sequence[str]


class LaneSource(Protocol):
    """
    What knows the ready lanes: a L{smtpgw.scheduler.Scheduler} or a
    L{smtpgw.scheduler.SchedulerSnapshot}.
    """

    def ready_lanes(self, priority: Priority) -> Sequence[tuple[str, Sequence[str]]]:
        """
        The lanes of one priority, in the order the round-robin serves
        their lists next, each with its ready queue ids, oldest first.
        """

    def ready_lane_lengths(self, priority: Priority) -> Sequence[tuple[str, int]]:
        """
        The same lists with how many ready messages each has.
        """


class _PriorityLanes:
    """
    The lanes of one priority, in ring order, indexed for position queries.
    """

    __slots__ = ("lengths", "prefix", "ring_index", "sorted_lengths", "total")

    def __init__(self, lanes: Sequence[tuple[str, int]]) -> None:
        self.lengths = [length for _, length in lanes]
        self.ring_index = {name: r for r, (name, _) in enumerate(lanes)}
        self.sorted_lengths = sorted(self.lengths)
        self.prefix = [0]
        for length in self.sorted_lengths:
            self.prefix.append(self.prefix[-1] + length)
        self.total = self.prefix[-1]

    def ahead(self, ring: int, index: int) -> int:
        """
        Messages of this priority served before index C{index} of the lane
        at ring position C{ring} (which may be one past the last lane).
        """
        # Every lane gives min(length, index) messages in the rounds before.
        shorter = bisect.bisect_left(self.sorted_lengths, index)
        rounds = self.prefix[shorter] + index * (len(self.sorted_lengths) - shorter)
        # In the message's own round, the lanes ahead in the ring go first.
        return rounds + sum(1 for length in self.lengths[:ring] if length > index)


class ReadyOrder:
    """
    The order in which the ready messages will be dispatched.

    It is built from the length of each lane (per priority, in ring order)
    and the place in its lane of the messages one asks about, so that a
    million ready messages need not be held to answer for a few.
    """

    def __init__(
        self,
        lengths: Mapping[Priority, Sequence[tuple[str, int]]],
        places: Mapping[str, tuple[Priority, str, int]],
    ) -> None:
        """
        @param lengths: per priority, C{(list, ready messages)} for each
            lane, in the order the round-robin serves their lists next.
        @param places: C{queue_id -> (priority, list, index in its lane)}
            for the ready messages whose position may be asked.
        """
        self._priorities = {p: _PriorityLanes(lengths.get(p, ())) for p in Priority}
        self._places = places

    @classmethod
    def from_lanes(
        cls, lanes: Mapping[Priority, Sequence[tuple[str, Sequence[str]]]]
    ) -> ReadyOrder:
        """
        The order of these lanes (per priority, in ring order), knowing
        every message's place.
        """
        return cls(
            {p: [(name, len(ids)) for name, ids in by_ring] for p, by_ring in lanes.items()},
            {
                queue_id: (Priority(p), name, index)
                for p, by_ring in lanes.items()
                for name, ids in by_ring
                for index, queue_id in enumerate(ids)
            },
        )

    @classmethod
    def of(cls, source: LaneSource, wanted: Iterable[ScheduledEntry] = ()) -> ReadyOrder:
        """
        The exact order of the ready messages of C{source}, knowing the
        place of the C{wanted} ones that are ready.

        Only the lanes of the wanted messages are looked into, each once,
        and only as far as its last wanted message: asking for a few
        messages of a million costs milliseconds.
        """
        by_lane: dict[tuple[Priority, str], set[str]] = {}
        for entry in wanted:
            if entry.state is MessageState.QUEUED:
                by_lane.setdefault((entry.priority, entry.list), set()).add(entry.queue_id)
        places: dict[str, tuple[Priority, str, int]] = {}
        for priority in {p for p, _ in by_lane}:
            for name, ids in source.ready_lanes(priority):
                look_for = by_lane.get((priority, name))
                if look_for:
                    for queue_id, index in _indexes(ids, look_for).items():
                        places[queue_id] = (priority, name, index)
        return cls({p: source.ready_lane_lengths(p) for p in Priority}, places)

    def ready(self, priority: Priority) -> int:
        """
        Ready messages of this priority.
        """
        return self._priorities[priority].total

    def higher_than(self, priority: Priority) -> int:
        """
        Ready messages of a higher priority than C{priority}.
        """
        return sum(self._priorities[p].total for p in Priority if p < priority)

    def same_priority_ahead(self, queue_id: str, priority: Priority, list: str) -> int:
        """
        Ready messages of C{priority} dispatched before this one. A message
        whose place is not known (a deferred message that is due) counts as
        the last of its list's lane.
        """
        lanes = self._priorities[priority]
        place = self._places.get(queue_id)
        if place is not None and place[0] == priority and place[1] == list:
            return lanes.ahead(lanes.ring_index[list], place[2])
        ring = lanes.ring_index.get(list)
        if ring is None:
            return lanes.ahead(len(lanes.lengths), 0)
        return lanes.ahead(ring, lanes.lengths[ring])


def _indexes(ids: Sequence[str], wanted: set[str]) -> dict[str, int]:
    """
    The index in C{ids} of each of C{wanted} found there, looking no
    further than needed.
    """
    if len(wanted) == 1:
        (queue_id,) = wanted
        try:
            # A scan in C, for "why" in a lane of a million.
            return {queue_id: ids.index(queue_id)}
        except ValueError:
            return {}
    found: dict[str, int] = {}
    for index, queue_id in enumerate(ids):
        if queue_id in wanted:
            found[queue_id] = index
            if len(found) == len(wanted):
                break
    return found


class PageCandidates:
    """
    The first C{keep} queue ids, in queue id order (acceptance order), of
    those fed in any order and any number of runs, without holding them
    all.
    """

    def __init__(self, keep: int) -> None:
        """
        @param keep: how many to keep, at least 1.
        """
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self._keep = keep
        self._ids: list[str] = []

    def add(self, queue_ids: Iterable[str]) -> None:
        """
        Take these queue ids into account.
        """
        self._ids.extend(queue_ids)
        if len(self._ids) >= 2 * self._keep:
            self._prune()

    def _prune(self) -> None:
        # The ids mostly come in order already: the sort is about linear.
        self._ids.sort()
        del self._ids[self._keep :]

    def queue_ids(self) -> list[str]:
        """
        The first C{keep} queue ids fed, in order.
        """
        self._prune()
        return list(self._ids)


@frozen
class Why:
    """
    Why a message waits.

    @ivar position: messages dispatched before it (once the queue runs,
        when it is stopped); L{None} when it is not in line (being sent,
        held, deferred).
    @ivar higher_priority: ready messages of a higher priority.
    @ivar throttle: what holds it.
    @ivar reason: the same, in words.
    @ivar estimated_send_at: see the module's description; L{None} when
        there is no estimate.
    """

    queue_id: str
    list: str
    state: MessageState
    priority: Priority
    attempts: int
    next_attempt_at: float | None
    position: int | None
    higher_priority: int
    throttle: Throttle
    reason: str
    estimated_send_at: float | None


def _attempts(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


def estimate_send_at(position: int, conditions: Conditions) -> float | None:
    """
    When a ready message with C{position} messages ahead of it is likely to
    be dispatched (see the module's description).
    """
    now = conditions.now
    pace = conditions.rate if conditions.rate > 0 else math.inf
    if conditions.delivery_time is not None and conditions.delivery_time > 0:
        pace = min(pace, conditions.concurrency / conditions.delivery_time)
    if math.isinf(pace):
        return now if position < conditions.free_slots else None
    start = now
    if conditions.rate > 0 and conditions.next_token_at is not None:
        start = max(now, conditions.next_token_at)
    return start + position / pace


def _rate_text(rate: float) -> str:
    return f"{rate:g}"


def _ready_throttle(position: int, higher: int, conditions: Conditions) -> tuple[Throttle, str]:
    if higher:
        return Throttle.HIGHER_PRIORITY, f"waiting for higher-priority messages ({higher})"
    concurrency_text = (
        f"concurrency limit (--concurrency {conditions.concurrency} deliveries under way)"
    )
    if conditions.rate > 0:
        if conditions.in_flight >= conditions.concurrency:
            return Throttle.CONCURRENCY, concurrency_text
        token_ready = (
            conditions.next_token_at is not None and conditions.next_token_at <= conditions.now
        )
        if position == 0 and token_ready:
            return Throttle.NEXT, "next to go"
        return Throttle.RATE, f"rate limit (--rate {_rate_text(conditions.rate)}/s)"
    if position < conditions.free_slots:
        return Throttle.NEXT, "next to go"
    return Throttle.CONCURRENCY, concurrency_text


def explain(
    entry: ScheduledEntry,
    order: ReadyOrder,
    conditions: Conditions,
    gate: GateWait | None = None,
) -> Why:
    """
    Why C{entry} waits: its position, the throttle that holds it and an
    estimated send time.

    The throttle is the first that applies of: being sent now; held; the
    queue stopped by an admin (for a deferred message, the reason also
    names its next attempt); deferred until a later time; the console send
    it belongs to paused (with C{gate}'s reason, including the queue
    stopped; no position unless its gate is in line); waiting for
    higher-priority messages; the concurrency limit; the rate limit; and
    otherwise it is next to go.

    @param gate: the gate the message is behind, if any.
    """
    now = conditions.now
    higher = order.higher_than(entry.priority)
    deferred_until = entry.next_attempt_at if entry.state is MessageState.DEFERRED else None
    position: int | None = None
    estimate: float | None = None
    if entry.state is MessageState.SENDING:
        throttle, reason = Throttle.SENDING, "being sent now"
        estimate = now
    elif entry.state is MessageState.HELD:
        throttle, reason = Throttle.HELD, "held"
    elif deferred_until is not None and deferred_until > now:
        throttle = Throttle.DEFERRED
        reason = f"deferred until {iso8601(deferred_until)} after {_attempts(entry.attempts)}"
        if conditions.paused:
            throttle, reason = Throttle.STOPPED, f"queue stopped by an admin; {reason}"
        else:
            estimate = deferred_until
    elif gate is not None and gate.hold is not None:
        throttle = Throttle.CONSOLE_SEND_PAUSED
        reason = f"{gate.label} is paused: {gate.hold}"
        if gate.in_line:
            same = order.same_priority_ahead(entry.queue_id, entry.priority, entry.list)
            position = higher + same
    else:
        same = order.same_priority_ahead(entry.queue_id, entry.priority, entry.list)
        position = higher + same
        if conditions.paused:
            throttle, reason = Throttle.STOPPED, "queue stopped by an admin"
        else:
            throttle, reason = _ready_throttle(position, higher, conditions)
            estimate = estimate_send_at(position, conditions)
    return Why(
        queue_id=entry.queue_id,
        list=entry.list,
        state=entry.state,
        priority=entry.priority,
        attempts=entry.attempts,
        next_attempt_at=deferred_until,
        position=position,
        higher_priority=higher,
        throttle=throttle,
        reason=reason,
        estimated_send_at=estimate,
    )


@frozen
class QueueFilter:
    """
    Which messages a listing shows; L{None} matches anything.
    """

    list: str | None = None
    username: str | None = None
    priority: Priority | None = None
    state: MessageState | None = None

    def matches_entry(self, entry: ScheduledEntry) -> bool:
        """
        Whether the entry passes the filters the scheduler can answer (all
        but C{username}).
        """
        return (
            (self.list is None or entry.list == self.list)
            and (self.priority is None or entry.priority == self.priority)
            and (self.state is None or entry.state is self.state)
        )

    def matches_envelope(self, envelope: Envelope) -> bool:
        """
        Whether the message's envelope passes the C{username} filter.
        """
        return self.username is None or envelope.username == self.username


@frozen
class QueueRow:
    """
    One message of a listing.

    @ivar username: the SMTP+ user that submitted it; L{None}, as the
        sender, recipients and acceptance time, when its envelope could not
        be read.
    @ivar recipients: the first L{MAX_LISTED_RECIPIENTS} recipients.
    @ivar recipient_count: all of them.
    @ivar next_attempt_at: for a deferred message, its next attempt.
    @ivar subject: the message's C{Subject} as text (see
        L{message_subject}); L{None} when it has none or it could not be
        read.
    """

    queue_id: str
    list: str
    username: str | None
    sender: str | None
    recipients: tuple[str, ...]
    recipient_count: int
    priority: Priority
    state: MessageState
    attempts: int
    accepted_at: float | None
    next_attempt_at: float | None
    estimated_send_at: float | None
    subject: str | None = None


def _shown_character(c: str) -> str:
    # Undecodable bytes come out of the parser as lone surrogates, which
    # neither UTF-8 pages nor AMP can carry.
    if "\ud800" <= c <= "\udfff":
        return "\ufffd"
    return c if c.isprintable() else " "


def message_subject(message: bytes) -> str | None:
    """
    The C{Subject} of a message as an admin reads it: encoded words
    decoded, folded lines and runs of white space made one space, control
    characters and undecodable bytes replaced, at most L{MAX_SUBJECT_LENGTH}
    characters (a cut subject ends with an ellipsis).

    @param message: the message as accepted (headers first); only its
        first 64 KiB are looked at.
    @return: the subject, or L{None} when it has none.
    """
    try:
        value = _HEADERS.parsebytes(message[:_SUBJECT_SCAN]).get("subject")
    except (email.errors.MessageError, LookupError, ValueError):
        return None
    if value is None:
        return None
    text = " ".join("".join(_shown_character(c) for c in str(value)).split())
    if len(text) > MAX_SUBJECT_LENGTH:
        text = text[: MAX_SUBJECT_LENGTH - 1] + "\u2026"
    return text


def queue_row(
    entry: ScheduledEntry, envelope: Envelope | None, why: Why, subject: str | None = None
) -> QueueRow:
    """
    The listing row of an entry, with its envelope (and the message's
    subject) when it could be read.
    """
    recipients = envelope.recipients if envelope is not None else ()
    return QueueRow(
        queue_id=entry.queue_id,
        list=entry.list,
        username=envelope.username if envelope is not None else None,
        sender=envelope.sender if envelope is not None else None,
        recipients=recipients[:MAX_LISTED_RECIPIENTS],
        recipient_count=len(recipients),
        priority=entry.priority,
        state=entry.state,
        attempts=entry.attempts,
        accepted_at=envelope.accepted_at if envelope is not None else None,
        next_attempt_at=why.next_attempt_at,
        estimated_send_at=why.estimated_send_at,
        subject=subject,
    )


def row_document(row: QueueRow, time: Callable[[float | None], Any] = iso8601) -> dict[str, Any]:
    """
    A listing row as JSON (times in ISO 8601 UTC, or as C{time} makes them).
    """
    return {
        "queue_id": row.queue_id,
        "list": row.list,
        "username": row.username,
        "sender": row.sender,
        "recipients": list(row.recipients),
        "recipient_count": row.recipient_count,
        "priority": int(row.priority),
        "state": row.state.value,
        "attempts": row.attempts,
        "accepted_at": time(row.accepted_at),
        "next_attempt_at": time(row.next_attempt_at),
        "estimated_send_at": time(row.estimated_send_at),
        "subject": row.subject,
    }


def why_document(why: Why, time: Callable[[float | None], Any] = iso8601) -> dict[str, Any]:
    """
    A L{Why} as JSON (times in ISO 8601 UTC, or as C{time} makes them).
    """
    return {
        "queue_id": why.queue_id,
        "list": why.list,
        "state": why.state.value,
        "priority": int(why.priority),
        "attempts": why.attempts,
        "next_attempt_at": time(why.next_attempt_at),
        "position": why.position,
        "higher_priority": why.higher_priority,
        "throttle": why.throttle.value,
        "reason": why.reason,
        "estimated_send_at": time(why.estimated_send_at),
    }


@frozen
class QueueStatus:
    """
    The queue as a whole.

    @ivar paused: whether an admin stopped it.
    @ivar in_flight: deliveries under way.
    @ivar counts: messages in the queue, per state (every state of
        L{QUEUE_STATES}).
    @ivar rate: C{--rate}, messages a second; 0 is no limit.
    @ivar concurrency: C{--concurrency}.
    """

    paused: bool
    in_flight: int
    counts: Mapping[MessageState, int]
    rate: float
    concurrency: int


def status_document(status: QueueStatus) -> dict[str, Any]:
    """
    A L{QueueStatus} as JSON.
    """
    return {
        "paused": status.paused,
        "in_flight": status.in_flight,
        "counts": {state.value: status.counts.get(state, 0) for state in QUEUE_STATES},
        "rate": status.rate,
        "concurrency": status.concurrency,
    }


@frozen
class MessageChange:
    """
    What an admin's change made of a message.

    @ivar state: its state after the change (C{cancelled} once cancelled).
    """

    queue_id: str
    state: MessageState
    priority: Priority


def change_document(change: MessageChange) -> dict[str, Any]:
    """
    A L{MessageChange} as JSON.
    """
    return {
        "queue_id": change.queue_id,
        "state": change.state.value,
        "priority": int(change.priority),
    }


@frozen
class QueueListing:
    """
    One page of a listing.

    @ivar next_after: the C{after} that lists the next page, or L{None} when
        this page is the last.
    """

    rows: tuple[QueueRow, ...]
    next_after: str | None
    status: QueueStatus


def listing_document(listing: QueueListing) -> dict[str, Any]:
    """
    A L{QueueListing} as JSON: the queue's status, C{messages} and
    C{next_after}.
    """
    document = status_document(listing.status)
    document["messages"] = [row_document(row) for row in listing.rows]
    document["next_after"] = listing.next_after
    return document
