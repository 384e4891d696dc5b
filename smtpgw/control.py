"""
Queue control (PRODUCT section 3): a Python API for the pages and the JSON
API (L{QueueControl}), the same over AMP on a UNIX socket in the data
directory (L{ControlService}), and the blocking client that C{smtpgw-admin
queue ...} uses (L{ControlClient}).

The socket, C{<data-dir>/control.sock}, is created with mode 0600 when the
gateway starts (after twistd dropped to C{--uid}, so the gateway's user owns
it); a socket left by a gateway that crashed is replaced. On Linux each
connection's peer is also checked (C{SO_PEERCRED}): only the gateway's own
user and root may control it, whatever the file's mode.

Every change goes through the queue, which journals it before it fires, so
holds, cancellations and priorities survive a restart. A change that the
journal could not record still took effect in memory; it fails with
L{NotDurable}, saying so.
"""

from __future__ import annotations

import math
import os
import socket
import stat
import struct
from collections.abc import Callable, Collection, Sequence
from typing import Any, ClassVar, Final

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IReactorTime, IReactorUNIX, ITransport
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from smtpgw.interfaces import IJournal, JournalUnavailable
from smtpgw.model import Envelope, MessageState, Priority
from smtpgw.queue import MessageQueue
from smtpgw.queueinfo import (
    DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
    Conditions,
    GateWait,
    MessageChange,
    PageCandidates,
    QueueFilter,
    QueueListing,
    QueueRow,
    QueueStatus,
    ReadyOrder,
    Throttle,
    Why,
    explain,
    message_subject,
    parse_state,
    queue_row,
    row_document,
    why_document,
)
from smtpgw.scheduler import InvalidTransition, ScheduledEntry, SchedulerSnapshot, UnknownMessage
from smtpgw.validation import ValidationError, validate_priority

__all__ = [
    "CONNECT_TIMEOUT",
    "CONTROL_SOCKET",
    "MAX_QUEUE_ID_LENGTH",
    "MAX_USERNAME_SCAN",
    "REPLY_TIMEOUT",
    "SCAN_SLICE",
    "BadArgument",
    "CancelMessage",
    "ControlClient",
    "ControlError",
    "ControlResponder",
    "ControlService",
    "ControlSocketError",
    "GatewayUnreachable",
    "HoldMessage",
    "ListQueue",
    "NoSuchMessage",
    "NotAllowed",
    "NotDurable",
    "QueueControl",
    "QueueStatusCommand",
    "ReleaseMessage",
    "ReprioritizeMessage",
    "StartQueue",
    "StopQueue",
    "WhyMessage",
    "control_socket_path",
]

#: The control socket's name in the data directory.
CONTROL_SOCKET: Final = "control.sock"
#: Seconds the client waits to connect: the socket is local, so a gateway
#: that does not accept at once is not answering.
CONNECT_TIMEOUT: Final = 3.0
#: Seconds the client waits for an answer; listing a huge queue takes a
#: while (every entry is looked at, a slice per reactor turn).
REPLY_TIMEOUT: Final = 120.0
#: Queue ids are 20 characters; anything much longer is not one.
MAX_QUEUE_ID_LENGTH: Final = 64
#: With a C{username} filter, the most envelopes one listing page reads
#: from the journal; the page then ends early with C{next_after} set.
MAX_USERNAME_SCAN: Final = 10_000
#: Scheduled entries looked at per reactor turn when a listing selects
#: its candidates (well under a microsecond each: about 2 ms a turn).
SCAN_SLICE: Final = 20_000
#: Envelopes read from the journal at once while listing (each read brings
#: the whole message into memory).
READ_BATCH: Final = 16
#: The longest path of a UNIX socket (C{sun_path} less its NUL).
_MAX_SOCKET_PATH: Final = 107


def control_socket_path(data_dir: str | os.PathLike[str]) -> str:
    """
    Where the gateway of this data directory listens for control.
    """
    return os.path.join(os.fspath(data_dir), CONTROL_SOCKET)


_log = Logger()


# --- errors ----------------------------------------------------------------


class ControlError(Exception):
    """
    A control request failed; the message is one line for an admin.
    """


class NoSuchMessage(ControlError):
    """
    No message with this queue id is in the queue.
    """


class NotAllowed(ControlError):
    """
    The message's state does not allow the change (holding or cancelling a
    message that is being sent).
    """


class BadArgument(ControlError):
    """
    A request argument is invalid (a priority outside 1..5, an unknown
    state, a limit out of range).
    """


class NotDurable(ControlError):
    """
    The change took effect but the journal could not record it: a restart
    may undo it.
    """


class GatewayUnreachable(ControlError):
    """
    The client could not reach the gateway (not running, no permission, no
    answer in time).
    """


class ControlSocketError(Exception):
    """
    The control socket cannot be set up (another process answers on it, the
    path is taken by something else or is too long).
    """


def _gone(queue_id: str) -> NoSuchMessage:
    return NoSuchMessage(
        f"no message {queue_id} in the queue (delivered, bounced and cancelled messages leave it)"
    )


def _not_durable(done: str) -> Callable[[Failure], Failure]:
    """
    An errback that says a change took effect but is not journaled.
    """

    def translate(failure: Failure) -> Failure:
        if failure.check(JournalUnavailable):
            return Failure(
                NotDurable(
                    f"{done}, but the journal could not record it "
                    f"({failure.getErrorMessage()}); a restart may undo it"
                )
            )
        return failure

    return translate


def _check_queue_id(queue_id: str) -> None:
    if not queue_id or len(queue_id) > MAX_QUEUE_ID_LENGTH or not queue_id.isprintable():
        raise BadArgument(f"{queue_id[:MAX_QUEUE_ID_LENGTH]!r} is not a queue id")


# --- the Python API --------------------------------------------------------


class QueueControl:
    """
    Queue control for the running gateway: status, stop and start, changes
    to one message, "why is it waiting" and listings.

    Errors are L{ControlError}s: L{NoSuchMessage}, L{NotAllowed},
    L{BadArgument}, L{NotDurable}.
    """

    _log = Logger()

    def __init__(
        self,
        queue: MessageQueue,
        journal: IJournal,
        clock: IReactorTime,
        *,
        read_batch: int = READ_BATCH,
        username_scan: int = MAX_USERNAME_SCAN,
        scan_slice: int = SCAN_SLICE,
    ) -> None:
        """
        @param queue: the gateway's queue.
        @param journal: the queue's journal, to read the envelopes a listing
            shows (sender, recipients, user).
        @param clock: the time of snapshots.
        @param read_batch: envelopes read from the journal at once.
        @param username_scan: see L{MAX_USERNAME_SCAN}.
        @param scan_slice: see L{SCAN_SLICE}.
        """
        self._queue = queue
        self._journal = journal
        self._clock = clock
        self._read_batch = read_batch
        self._username_scan = username_scan
        self._scan_slice = scan_slice

    def status(self) -> QueueStatus:
        """
        The queue as a whole, now.
        """
        stats = self._queue.stats()
        return QueueStatus(
            paused=stats.paused,
            in_flight=stats.in_flight,
            counts=dict(stats.by_state),
            rate=self._queue.rate,
            concurrency=self._queue.concurrency,
        )

    def stop(self) -> Deferred[QueueStatus]:
        """
        Stop dispatching: deliveries under way finish, mail is still
        accepted and kept. Stopping a stopped queue changes nothing.
        """
        d = maybeDeferred(self._queue.pause)
        return d.addCallbacks(lambda _: self.status(), _not_durable("the queue was stopped"))

    def start(self) -> Deferred[QueueStatus]:
        """
        Start dispatching again after L{stop}.
        """
        d = maybeDeferred(self._queue.resume)
        return d.addCallbacks(lambda _: self.status(), _not_durable("the queue was started"))

    def hold(self, queue_id: str) -> Deferred[MessageChange]:
        """
        Keep a waiting message from being sent until released.
        """
        return Deferred.fromCoroutine(self._change("hold", "held", queue_id, self._queue.hold))

    def release(self, queue_id: str) -> Deferred[MessageChange]:
        """
        Make a held or deferred message ready now.
        """
        return Deferred.fromCoroutine(
            self._change("release", "released", queue_id, self._queue.release)
        )

    def cancel(self, queue_id: str) -> Deferred[MessageChange]:
        """
        Drop a message that is not being sent; it is never delivered.
        """
        return Deferred.fromCoroutine(
            self._change("cancel", "cancelled", queue_id, self._queue.cancel)
        )

    def reprioritize(self, queue_id: str, priority: int | str) -> Deferred[MessageChange]:
        """
        Give a message another priority, 1 (very high) to 5 (very low).
        """
        try:
            new = validate_priority(priority)
        except ValidationError as e:
            return fail(BadArgument(e.message))
        return Deferred.fromCoroutine(
            self._change(
                "re-prioritize",
                f"re-prioritized to {int(new)}",
                queue_id,
                lambda q: self._queue.reprioritize(q, new),
            )
        )

    def why(self, queue_id: str) -> Deferred[Why]:
        """
        Why a message waits: its position, the throttle that holds it and an
        estimated send time (see L{smtpgw.queueinfo}).

        @return: fails with L{NoSuchMessage} when it is not in the queue.
        """
        return Deferred.fromCoroutine(self._why(queue_id))

    def listing(
        self,
        queue_filter: QueueFilter | None = None,
        after: str | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
    ) -> Deferred[QueueListing]:
        """
        The messages in the queue that pass the filter, in acceptance
        (queue id) order, after the queue id C{after}, at most C{limit}.

        Filtering on a user reads each candidate's envelope from the
        journal, at most L{MAX_USERNAME_SCAN} a page: a page may then hold
        fewer rows with C{next_after} set, to go on from.

        The listing answers for the moment it was asked: it works on a
        snapshot of the scheduler (about 40 bytes an entry while it runs),
        selecting its candidates L{SCAN_SLICE} entries per reactor turn
        without building an entry for each (well under a microsecond an
        entry); positions are exact (see
        L{smtpgw.scheduler.Scheduler.ready_lanes}).
        """
        return Deferred.fromCoroutine(self._listing(queue_filter or QueueFilter(), after, limit))

    # internals

    def _now(self) -> float:
        """
        The time of a snapshot, with the deferred messages whose time has
        come made ready, as the dispatcher would find them.
        """
        now = self._clock.seconds()
        self._queue.scheduler.has_ready(now)
        return now

    def _candidates(
        self, snapshot: SchedulerSnapshot, queue_filter: QueueFilter, after: str | None, keep: int
    ) -> Deferred[list[str]]:
        """
        Select the first C{keep} queue ids of the snapshot that pass the
        scheduler-side filters, after C{after}, a slice of the snapshot per
        reactor turn so that a huge queue does not stall the gateway.

        @return: fires with them, in queue id order.
        """
        runs = snapshot.queue_id_runs(
            self._scan_slice,
            list=queue_filter.list,
            priority=queue_filter.priority,
            state=queue_filter.state,
            after=after,
        )
        left = max(1, math.ceil(len(snapshot) / self._scan_slice))
        page = PageCandidates(keep)
        done: Deferred[list[str]] = Deferred()

        def step() -> None:
            nonlocal left
            try:
                page.add(next(runs))
            except Exception:
                done.errback()
                return
            left -= 1
            if left:
                self._clock.callLater(0, step)
            else:
                done.callback(page.queue_ids())

        step()
        return done

    async def _why(self, queue_id: str) -> Why:
        _check_queue_id(queue_id)
        now = self._now()
        entry = self._queue.get(queue_id)
        if entry is None:
            raise _gone(queue_id)
        # The lanes are copied in C and only the message's own is searched:
        # milliseconds for a million ready messages, so no slices.
        order = ReadyOrder.of(self._queue.scheduler, [entry])
        return explain(entry, order, self._conditions(now), self._gate_wait(queue_id, {}))

    def _gate_wait(self, queue_id: str, known: dict[str, GateWait]) -> GateWait | None:
        """
        The gate a message is behind, as the queue sees it now, or L{None}.

        @param known: the gates asked about already in this answer.
        """
        gate = self._queue.scheduler.gate_of(queue_id)
        if gate is None:
            return None
        wait = known.get(gate)
        if wait is None:
            wait = known[gate] = GateWait(
                label=self._queue.gate_label(gate),
                hold=self._queue.gate_hold(gate),
                in_line=self._queue.gate_is_open(gate),
            )
        return wait

    def _conditions(self, now: float) -> Conditions:
        stats = self._queue.stats()
        return Conditions(
            now=now,
            rate=self._queue.rate,
            concurrency=self._queue.concurrency,
            in_flight=stats.in_flight,
            paused=stats.paused,
        )

    async def _change(
        self,
        verb: str,
        done: str,
        queue_id: str,
        action: Callable[[str], Deferred[None]],
    ) -> MessageChange:
        _check_queue_id(queue_id)
        before = self._queue.get(queue_id)
        if before is None:
            raise _gone(queue_id)
        try:
            await action(queue_id)
        except UnknownMessage:
            raise _gone(queue_id) from None
        except InvalidTransition:
            current = self._queue.get(queue_id) or before
            raise NotAllowed(
                f"cannot {verb} {queue_id}: it is {current.state.value}"
                + (" now" if current.state is MessageState.SENDING else "")
            ) from None
        except JournalUnavailable as e:
            raise NotDurable(
                f"{queue_id} was {done}, but the journal could not record it ({e}); "
                "a restart may undo it"
            ) from None
        after = self._queue.get(queue_id)
        if after is None:
            return MessageChange(queue_id, MessageState.CANCELLED, before.priority)
        return MessageChange(queue_id, after.state, after.priority)

    async def _listing(
        self, queue_filter: QueueFilter, after: str | None, limit: int
    ) -> QueueListing:
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise BadArgument(f"the limit must be 1 to {MAX_LIST_LIMIT}, not {limit}")
        if after is not None:
            _check_queue_id(after)
        by_user = queue_filter.username is not None
        # One more than asked tells whether a next page exists.
        keep = self._username_scan if by_user else limit + 1
        now = self._now()
        # One moment for the whole listing, however many turns it takes.
        snapshot = self._queue.scheduler.snapshot()
        selected = await self._candidates(snapshot, queue_filter, after, keep)
        candidates = [entry for q in selected if (entry := snapshot.get(q)) is not None]
        order = ReadyOrder.of(snapshot, candidates)
        conditions = self._conditions(now)
        status = self.status()
        gates: dict[str, GateWait] = {}
        rows: list[QueueRow] = []
        scanned = 0
        while scanned < len(candidates) and len(rows) < limit:
            batch = candidates[scanned : scanned + self._read_batch]
            envelopes = await self._envelopes(batch)
            for entry, (envelope, subject) in zip(batch, envelopes, strict=True):
                scanned += 1
                if by_user and (envelope is None or not queue_filter.matches_envelope(envelope)):
                    continue
                why = explain(entry, order, conditions, self._gate_wait(entry.queue_id, gates))
                rows.append(queue_row(entry, envelope, why, subject))
                if len(rows) == limit:
                    break
        next_after: str | None = None
        if scanned < len(candidates):
            next_after = candidates[scanned - 1].queue_id
        elif len(candidates) == keep:
            # Every kept candidate was read: more may follow the last one.
            next_after = candidates[-1].queue_id
        return QueueListing(tuple(rows), next_after, status)

    def _envelopes(
        self, entries: Sequence[ScheduledEntry]
    ) -> Deferred[list[tuple[Envelope | None, str | None]]]:
        return gatherResults([self._envelope(entry) for entry in entries])

    def _envelope(self, entry: ScheduledEntry) -> Deferred[tuple[Envelope | None, str | None]]:
        """
        The envelope of an entry and its message's subject, both L{None}
        when the journal cannot give them.
        """

        def unreadable(failure: Any) -> tuple[None, None]:
            # The message may have left the queue (and the journal dropped
            # it) since the snapshot; the row shows what the scheduler knew.
            self._log.warn(
                "cannot read the envelope of {queue_id} for a listing: {reason}",
                queue_id=entry.queue_id,
                reason=failure.getErrorMessage(),
            )
            return None, None

        d = maybeDeferred(self._journal.read, entry.location)
        return d.addCallbacks(lambda read: (read[0], message_subject(read[1])), unreadable)


# --- the AMP commands ------------------------------------------------------


class _Spread(amp.AmpList):
    """
    An L{amp.AmpList} that may exceed AMP's 64 KiB value limit: its
    encoding is spread over the keys C{name.0}, C{name.1}, ...
    """

    _CHUNK = amp.MAX_VALUE_LENGTH

    def toBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        value = self.toStringProto(self.retrieve(objects, name.decode("ascii"), proto), proto)
        for index, start in enumerate(range(0, max(len(value), 1), self._CHUNK)):
            strings[b"%s.%d" % (name, index)] = value[start : start + self._CHUNK]

    def fromBox(self, name: bytes, strings: Any, objects: Any, proto: Any) -> None:
        chunks = []
        index = 0
        while (chunk := strings.pop(b"%s.%d" % (name, index), None)) is not None:
            chunks.append(chunk)
            index += 1
        if not chunks:
            raise KeyError(name)
        objects[name.decode("ascii")] = self.fromStringProto(b"".join(chunks), proto)


_ERRORS: dict[type[Exception], bytes] = {
    NoSuchMessage: b"NO_SUCH_MESSAGE",
    NotAllowed: b"NOT_ALLOWED",
    BadArgument: b"BAD_ARGUMENT",
    NotDurable: b"NOT_DURABLE",
}

_STATUS: list[tuple[bytes, amp.Argument]] = [
    (b"paused", amp.Boolean()),
    (b"in_flight", amp.Integer()),
    (b"rate", amp.Float()),
    (b"concurrency", amp.Integer()),
    (b"counts", amp.AmpList([(b"state", amp.Unicode()), (b"count", amp.Integer())])),
]

_CHANGE: list[tuple[bytes, amp.Argument]] = [
    (b"queue_id", amp.Unicode()),
    (b"state", amp.Unicode()),
    (b"priority", amp.Integer()),
]

_WHY: list[tuple[bytes, amp.Argument]] = [
    (b"queue_id", amp.Unicode()),
    (b"list", amp.Unicode()),
    (b"state", amp.Unicode()),
    (b"priority", amp.Integer()),
    (b"attempts", amp.Integer()),
    (b"next_attempt_at", amp.Float(optional=True)),
    (b"position", amp.Integer(optional=True)),
    (b"higher_priority", amp.Integer()),
    (b"throttle", amp.Unicode()),
    (b"reason", amp.Unicode()),
    (b"estimated_send_at", amp.Float(optional=True)),
]

_ROW: list[tuple[bytes, amp.Argument]] = [
    (b"queue_id", amp.Unicode()),
    (b"list", amp.Unicode()),
    (b"username", amp.Unicode(optional=True)),
    (b"sender", amp.Unicode(optional=True)),
    (b"recipients", amp.ListOf(amp.Unicode())),
    (b"recipient_count", amp.Integer()),
    (b"priority", amp.Integer()),
    (b"state", amp.Unicode()),
    (b"attempts", amp.Integer()),
    (b"accepted_at", amp.Float(optional=True)),
    (b"next_attempt_at", amp.Float(optional=True)),
    (b"estimated_send_at", amp.Float(optional=True)),
    (b"subject", amp.Unicode(optional=True)),
]

_QUEUE_ID: list[tuple[bytes, amp.Argument]] = [(b"queue_id", amp.Unicode())]


class _ControlCommand(amp.Command):
    errors: ClassVar[dict[type[Exception], bytes]] = _ERRORS


class QueueStatusCommand(_ControlCommand):
    """
    The queue's status.
    """

    commandName = b"QueueStatus"
    response = _STATUS


class StopQueue(_ControlCommand):
    """
    Stop dispatching (C{queue stop}).
    """

    response = _STATUS


class StartQueue(_ControlCommand):
    """
    Start dispatching again (C{queue start}).
    """

    response = _STATUS


class HoldMessage(_ControlCommand):
    """
    Hold a message (C{queue hold ID}).
    """

    arguments = _QUEUE_ID
    response = _CHANGE


class ReleaseMessage(_ControlCommand):
    """
    Release a message (C{queue release ID}).
    """

    arguments = _QUEUE_ID
    response = _CHANGE


class CancelMessage(_ControlCommand):
    """
    Cancel a message (C{queue cancel ID}).
    """

    arguments = _QUEUE_ID
    response = _CHANGE


class ReprioritizeMessage(_ControlCommand):
    """
    Change a message's priority (C{queue priority ID N}).
    """

    arguments = [*_QUEUE_ID, (b"priority", amp.Integer())]
    response = _CHANGE


class WhyMessage(_ControlCommand):
    """
    Why a message waits (C{queue why ID}).
    """

    arguments = _QUEUE_ID
    response = _WHY


class ListQueue(_ControlCommand):
    """
    One page of the listing (C{queue list}).
    """

    arguments = [
        (b"list", amp.Unicode(optional=True)),
        (b"username", amp.Unicode(optional=True)),
        (b"priority", amp.Integer(optional=True)),
        (b"state", amp.Unicode(optional=True)),
        (b"after", amp.Unicode(optional=True)),
        (b"limit", amp.Integer()),
    ]
    response = [
        (b"messages", _Spread(_ROW)),
        (b"next_after", amp.Unicode(optional=True)),
        *_STATUS,
    ]


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)


def _status_fields(status: QueueStatus) -> dict[str, Any]:
    return {
        "paused": status.paused,
        "in_flight": status.in_flight,
        "rate": float(status.rate),
        "concurrency": status.concurrency,
        "counts": [{"state": s.value, "count": n} for s, n in status.counts.items()],
    }


def _status_from(fields: dict[str, Any]) -> QueueStatus:
    return QueueStatus(
        paused=fields["paused"],
        in_flight=fields["in_flight"],
        counts={MessageState(c["state"]): c["count"] for c in fields["counts"]},
        rate=fields["rate"],
        concurrency=fields["concurrency"],
    )


def _change_fields(change: MessageChange) -> dict[str, Any]:
    return {
        "queue_id": change.queue_id,
        "state": change.state.value,
        "priority": int(change.priority),
    }


def _change_from(fields: dict[str, Any]) -> MessageChange:
    return MessageChange(
        queue_id=fields["queue_id"],
        state=MessageState(fields["state"]),
        priority=Priority(fields["priority"]),
    )


def _why_fields(why: Why) -> dict[str, Any]:
    return why_document(why, time=_float)


def _why_from(fields: dict[str, Any]) -> Why:
    return Why(
        queue_id=fields["queue_id"],
        list=fields["list"],
        state=MessageState(fields["state"]),
        priority=Priority(fields["priority"]),
        attempts=fields["attempts"],
        next_attempt_at=fields["next_attempt_at"],
        position=fields["position"],
        higher_priority=fields["higher_priority"],
        throttle=Throttle(fields["throttle"]),
        reason=fields["reason"],
        estimated_send_at=fields["estimated_send_at"],
    )


def _row_fields(row: QueueRow) -> dict[str, Any]:
    return row_document(row, time=_float)


def _row_from(fields: dict[str, Any]) -> QueueRow:
    return QueueRow(
        queue_id=fields["queue_id"],
        list=fields["list"],
        username=fields["username"],
        sender=fields["sender"],
        recipients=tuple(fields["recipients"]),
        recipient_count=fields["recipient_count"],
        priority=Priority(fields["priority"]),
        state=MessageState(fields["state"]),
        attempts=fields["attempts"],
        accepted_at=fields["accepted_at"],
        next_attempt_at=fields["next_attempt_at"],
        estimated_send_at=fields["estimated_send_at"],
        subject=fields["subject"],
    )


def _filter_from(
    list: str | None, username: str | None, priority: int | None, state: str | None
) -> QueueFilter:
    try:
        return QueueFilter(
            list=list,
            username=username,
            priority=None if priority is None else validate_priority(priority),
            state=None if state is None else parse_state(state),
        )
    except ValidationError as e:
        raise BadArgument(e.message) from None
    except ValueError as e:
        raise BadArgument(str(e)) from None


# --- the server ------------------------------------------------------------


class ControlResponder(amp.CommandLocator):
    """
    Answers the control commands with a L{QueueControl}.
    """

    def __init__(self, control: QueueControl) -> None:
        self._control = control

    @QueueStatusCommand.responder
    def queue_status(self) -> dict[str, Any]:
        return _status_fields(self._control.status())

    @StopQueue.responder
    def stop_queue(self) -> Deferred[dict[str, Any]]:
        return self._control.stop().addCallback(_status_fields)

    @StartQueue.responder
    def start_queue(self) -> Deferred[dict[str, Any]]:
        return self._control.start().addCallback(_status_fields)

    @HoldMessage.responder
    def hold(self, queue_id: str) -> Deferred[dict[str, Any]]:
        return self._control.hold(queue_id).addCallback(_change_fields)

    @ReleaseMessage.responder
    def release(self, queue_id: str) -> Deferred[dict[str, Any]]:
        return self._control.release(queue_id).addCallback(_change_fields)

    @CancelMessage.responder
    def cancel(self, queue_id: str) -> Deferred[dict[str, Any]]:
        return self._control.cancel(queue_id).addCallback(_change_fields)

    @ReprioritizeMessage.responder
    def reprioritize(self, queue_id: str, priority: int) -> Deferred[dict[str, Any]]:
        return self._control.reprioritize(queue_id, priority).addCallback(_change_fields)

    @WhyMessage.responder
    def why(self, queue_id: str) -> Deferred[dict[str, Any]]:
        return self._control.why(queue_id).addCallback(_why_fields)

    @ListQueue.responder
    def list_queue(
        self,
        list: str | None,
        username: str | None,
        priority: int | None,
        state: str | None,
        after: str | None,
        limit: int,
    ) -> Deferred[dict[str, Any]]:
        queue_filter = _filter_from(list, username, priority, state)

        def fields(listing: QueueListing) -> dict[str, Any]:
            return {
                "messages": [_row_fields(row) for row in listing.rows],
                "next_after": listing.next_after,
                **_status_fields(listing.status),
            }

        return self._control.listing(queue_filter, after, limit).addCallback(fields)


def _peer_uid(transport: ITransport) -> int | None:
    """
    The user id of the process at the other end of a UNIX connection, or
    L{None} where the system does not say.
    """
    option = getattr(socket, "SO_PEERCRED", None)
    handle = getattr(transport, "getHandle", None)
    if option is None or handle is None:
        return None
    credentials = handle().getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return int(uid)


class _ControlProtocol(amp.AMP):
    """
    One control connection; a peer that is neither the gateway's user nor
    root is dropped before it can send anything.
    """

    def __init__(self, locator: ControlResponder, service: ControlService) -> None:
        super().__init__(locator=locator)
        self._service = service
        self.lost: Deferred[None] = Deferred()

    def makeConnection(self, transport: Any) -> None:
        self._service.connections.add(self)
        super().makeConnection(transport)
        uid = _peer_uid(transport)
        if uid is not None and uid not in self._service.allowed_uids():
            _log.warn("refused a control connection from uid {uid}", uid=uid)
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._service.connections.discard(self)
        super().connectionLost(reason)
        self.lost.callback(None)


class _ControlFactory(Factory):
    # The service logs its own line when it starts listening.
    noisy = False

    def __init__(self, service: ControlService) -> None:
        self._service = service

    def buildProtocol(self, addr: Any) -> _ControlProtocol:
        return _ControlProtocol(self._service.responder, self._service)


def _clear_stale_socket(path: str) -> None:
    """
    Remove a control socket that no process listens on any more (a gateway
    that crashed left it).

    @raise ControlSocketError: the path is something else than a socket, or
        a process answers on it.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ControlSocketError(f"{path} exists and is not a socket: move it out of the way")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(CONNECT_TIMEOUT)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        _log.info("removed the stale control socket {path}", path=path)
        return
    finally:
        probe.close()
    raise ControlSocketError(
        f"a process answers on {path}: is another gateway running on this data directory?"
    )


class ControlService(Service):
    """
    Listens for control connections on C{<data_dir>/control.sock} (mode
    0600) while running; a stale socket is replaced at start.

    @ivar connections: the open control connections, closed at stop.
    """

    def __init__(
        self,
        control: QueueControl,
        data_dir: str | os.PathLike[str],
        reactor: IReactorUNIX,
        *,
        allowed_uids: Collection[int] | None = None,
    ) -> None:
        """
        @param control: what the commands act on.
        @param data_dir: the gateway's data directory.
        @param reactor: listens on the socket.
        @param allowed_uids: the user ids that may connect; by default the
            gateway's own (after twistd dropped privileges) and root.
        """
        self.path = control_socket_path(data_dir)
        self.responder = ControlResponder(control)
        self.connections: set[_ControlProtocol] = set()
        self._reactor = reactor
        self._allowed_uids = None if allowed_uids is None else frozenset(allowed_uids)
        self._port: IListeningPort | None = None

    def allowed_uids(self) -> frozenset[int]:
        """
        The user ids that may connect, now.
        """
        if self._allowed_uids is not None:
            return self._allowed_uids
        return frozenset({os.geteuid(), 0})

    def startService(self) -> None:
        """
        Replace a stale socket and listen.

        @raise ControlSocketError: see L{_clear_stale_socket}, or the path
            is too long for a UNIX socket.
        """
        length = len(os.fsencode(self.path))
        if length > _MAX_SOCKET_PATH:
            raise ControlSocketError(
                f"the control socket path {self.path} is {length} bytes, more than a UNIX "
                f"socket allows ({_MAX_SOCKET_PATH}): use a shorter --data-dir"
            )
        _clear_stale_socket(self.path)
        self._port = self._reactor.listenUNIX(self.path, _ControlFactory(self), mode=0o600)
        super().startService()
        _log.info("queue control listening on {path}", path=self.path)

    def stopService(self) -> Deferred[None]:
        """
        Stop listening (which removes the socket) and close the connections.

        @return: fires once the socket is removed and every connection is
            closed.
        """
        super().stopService()
        waits: list[Deferred[Any]] = []
        for connection in list(self.connections):
            waits.append(connection.lost)
            transport: Any = connection.transport
            transport.abortConnection()
        port, self._port = self._port, None
        if port is not None:
            waits.append(maybeDeferred(port.stopListening))
        return gatherResults(waits).addCallback(lambda _: None)


# --- the client ------------------------------------------------------------


class ControlClient:
    """
    A blocking client of the control socket, for C{smtpgw-admin}: no
    reactor, one connection, short timeouts.

    Errors are L{ControlError}s: L{GatewayUnreachable} when the gateway
    cannot be reached, else the error the gateway answered with.
    """

    def __init__(
        self,
        path: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        reply_timeout: float = REPLY_TIMEOUT,
    ) -> None:
        """
        @param path: the control socket (see L{control_socket_path}).
        """
        self.path = path
        self._connect_timeout = connect_timeout
        self._reply_timeout = reply_timeout
        self._socket: socket.socket | None = None
        self._buffer = bytearray()
        self._tag = 0

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """
        Close the connection, if open.
        """
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _connect(self) -> socket.socket:
        if self._socket is not None:
            return self._socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._connect_timeout)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise GatewayUnreachable(
                f"the gateway is not running (no control socket {self.path})"
            ) from None
        except ConnectionRefusedError:
            sock.close()
            raise GatewayUnreachable(
                f"the gateway is not running ({self.path} refuses connections)"
            ) from None
        except PermissionError:
            sock.close()
            raise GatewayUnreachable(
                f"no permission to use {self.path}: run as the gateway's user or root"
            ) from None
        except TimeoutError:
            sock.close()
            raise GatewayUnreachable(
                f"the gateway did not accept a connection on {self.path} within "
                f"{self._connect_timeout:g} s"
            ) from None
        except OSError as e:
            sock.close()
            raise GatewayUnreachable(f"cannot connect to {self.path}: {e.strerror or e}") from None
        sock.settimeout(self._reply_timeout)
        self._socket = sock
        return sock

    def call(self, command: type[amp.Command], **arguments: Any) -> dict[str, Any]:
        """
        Send one command and wait for its answer.

        @return: the answer's fields, parsed.
        @raise ControlError: the error the gateway answered with, or
            L{GatewayUnreachable}.
        """
        sock = self._connect()
        self._tag += 1
        tag = b"%d" % self._tag
        box = command.makeArguments(arguments, None)
        box[amp.COMMAND] = command.commandName
        box[amp.ASK] = tag
        try:
            sock.sendall(box.serialize())
            answer = self._read_box(sock)
        except TimeoutError:
            self.close()
            raise GatewayUnreachable(
                f"the gateway did not answer within {self._reply_timeout:g} s"
            ) from None
        except OSError as e:
            self.close()
            raise GatewayUnreachable(f"the connection to the gateway failed: {e}") from None
        if answer.get(amp.ERROR) == tag:
            code = answer.get(amp.ERROR_CODE, b"")
            description = answer.get(amp.ERROR_DESCRIPTION, b"").decode("utf-8", "replace")
            errors: dict[bytes, type[Exception]] = getattr(command, "reverseErrors", {})
            error = errors.get(code)
            if error is None:
                raise ControlError(f"the gateway failed to do it: {description}")
            raise error(description)
        if answer.get(amp.ANSWER) != tag:
            self.close()
            raise ControlError("the gateway sent an answer to another question")
        parsed: dict[str, Any] = command.parseResponse(answer, None)
        return parsed

    def _read_box(self, sock: socket.socket) -> dict[bytes, bytes]:
        box: dict[bytes, bytes] = {}
        while True:
            key = self._read_string(sock)
            if not key:
                return box
            box[key] = self._read_string(sock)

    def _read_string(self, sock: socket.socket) -> bytes:
        length = struct.unpack("!H", self._read_exactly(sock, 2))[0]
        return self._read_exactly(sock, length)

    def _read_exactly(self, sock: socket.socket, count: int) -> bytes:
        while len(self._buffer) < count:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("the gateway closed the connection")
            self._buffer += data
        result = bytes(self._buffer[:count])
        del self._buffer[:count]
        return result

    # The same operations as QueueControl.

    def status(self) -> QueueStatus:
        """
        The queue's status.
        """
        return _status_from(self.call(QueueStatusCommand))

    def stop(self) -> QueueStatus:
        """
        Stop dispatching.
        """
        return _status_from(self.call(StopQueue))

    def start(self) -> QueueStatus:
        """
        Start dispatching again.
        """
        return _status_from(self.call(StartQueue))

    def hold(self, queue_id: str) -> MessageChange:
        """
        Hold a message.
        """
        return _change_from(self.call(HoldMessage, queue_id=queue_id))

    def release(self, queue_id: str) -> MessageChange:
        """
        Release a message.
        """
        return _change_from(self.call(ReleaseMessage, queue_id=queue_id))

    def cancel(self, queue_id: str) -> MessageChange:
        """
        Cancel a message.
        """
        return _change_from(self.call(CancelMessage, queue_id=queue_id))

    def reprioritize(self, queue_id: str, priority: int) -> MessageChange:
        """
        Change a message's priority.
        """
        return _change_from(self.call(ReprioritizeMessage, queue_id=queue_id, priority=priority))

    def why(self, queue_id: str) -> Why:
        """
        Why a message waits.
        """
        return _why_from(self.call(WhyMessage, queue_id=queue_id))

    def listing(
        self,
        queue_filter: QueueFilter | None = None,
        after: str | None = None,
        limit: int = DEFAULT_LIST_LIMIT,
    ) -> QueueListing:
        """
        One page of the listing.
        """
        f = queue_filter or QueueFilter()
        fields = self.call(
            ListQueue,
            list=f.list,
            username=f.username,
            priority=None if f.priority is None else int(f.priority),
            state=None if f.state is None else f.state.value,
            after=after,
            limit=limit,
        )
        return QueueListing(
            rows=tuple(_row_from(row) for row in fields["messages"]),
            next_after=fields["next_after"],
            status=_status_from(fields),
        )
