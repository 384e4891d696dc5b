"""
A journal kept in memory: the L{IJournal} of tests and of trying things out.

It keeps nothing across a restart of the process, so it is no substitute for
the file journal. It can imitate what matters about a real one: a write is
durable only once its L{Deferred} has fired (in C{manual} mode the caller
decides when, with L{MemoryJournal.flush}), it can refuse writes like a
full disk (L{MemoryJournal.available}), and, like the file journal, it
refuses an accept whose queue id belongs to a live message
(L{smtpgw.journal.QueueIdInUse}).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from attrs import evolve
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from smtpgw.interfaces import IJournal, JournaledMessage, JournalLocation, JournalUnavailable
from smtpgw.journal import QueueIdInUse
from smtpgw.model import Envelope, MessageState, Priority

__all__ = ["MemoryJournal"]

_FINAL = frozenset(
    {MessageState.DELIVERED.value, MessageState.BOUNCED.value, MessageState.CANCELLED.value}
)


@implementer(IJournal)
class MemoryJournal:
    """
    An L{IJournal} in memory.

    @ivar available: while L{False}, C{accept} and C{record_state} fail with
        L{JournalUnavailable}, as a journal on a full disk does.
    @ivar manual: when L{True}, writes stay pending (not durable) until
        L{flush}; otherwise they are durable at once.
    @ivar running: between L{start} and L{stop}.
    @ivar state_records: every durable state change, in order, as
        C{(queue_id, state, attempts, next_attempt_at)}.
    @ivar progress_records: the durable state changes that said which
        recipients remain, in order, as C{(queue_id, remaining, bounced)}.
    @ivar queue_records: every durable queue state, in order (paused or not).
    @ivar queue_paused: what the latest durable queue state says.
    @ivar unhurried: the queue ids of the state changes submitted with
        C{urgent=False}, in order.
    """

    def __init__(self, *, manual: bool = False) -> None:
        self.available = True
        self.manual = manual
        self.running = False
        self.queue_paused = False
        self.state_records: list[tuple[str, str, int, float]] = []
        self.progress_records: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
        self.queue_records: list[bool] = []
        self.unhurried: list[str] = []
        self._bodies: list[tuple[Envelope, bytes]] = []
        self._messages: dict[str, JournaledMessage] = {}
        self._accepting: set[str] = set()
        self._pending: list[tuple[Deferred[None], Callable[[], None]]] = []

    @property
    def accepting(self) -> bool:
        """
        L{True} while the journal takes writes.
        """
        return self.available

    @property
    def pending(self) -> int:
        """
        The writes not yet durable (in C{manual} mode).
        """
        return len(self._pending)

    def accept(
        self, envelope: Envelope, body: bytes, *, announced: bool = False
    ) -> Deferred[JournalLocation]:
        """
        Keep the message; fires with its location once durable, or fails
        with L{QueueIdInUse} if a live message has its queue id.
        C{announced} changes nothing here.
        """
        if not self.available:
            return fail(JournalUnavailable("the memory journal is unavailable"))
        queue_id = envelope.queue_id
        if queue_id in self._messages or queue_id in self._accepting:
            return fail(QueueIdInUse(f"queue id {queue_id} is already in use"))
        location = JournalLocation(segment=0, offset=len(self._bodies), length=len(body))
        self._bodies.append((envelope, bytes(body)))
        self._accepting.add(queue_id)

        def durable() -> None:
            self._accepting.discard(queue_id)
            self._messages[queue_id] = JournaledMessage(envelope=envelope, location=location)

        d = self._write(durable)
        return d.addCallback(lambda _: location)

    def record_state(
        self,
        queue_id: str,
        state: str,
        attempts: int = 0,
        next_attempt_at: float = 0.0,
        *,
        remaining: Sequence[str] | None = None,
        bounced: Sequence[str] = (),
        urgent: bool = True,
    ) -> Deferred[None]:
        """
        Record a state change, and which recipients remain when given;
        fires once durable. A change that is not C{urgent} is written like
        any other, and its queue id noted in L{unhurried}.
        """
        if not self.available:
            return fail(JournalUnavailable("the memory journal is unavailable"))
        if remaining is None and bounced:
            return fail(ValueError("bounced recipients are recorded with the remaining ones"))
        left = None if remaining is None else tuple(remaining)
        failed = tuple(bounced)
        if not urgent:
            self.unhurried.append(queue_id)

        def durable() -> None:
            self.state_records.append((queue_id, state, attempts, next_attempt_at))
            if left is not None:
                self.progress_records.append((queue_id, left, failed))
            message = self._messages.get(queue_id)
            if message is None:
                return
            if state in _FINAL:
                del self._messages[queue_id]
                return
            message = evolve(
                message, state=state, attempts=attempts, next_attempt_at=next_attempt_at
            )
            if left is not None:
                message = evolve(message, remaining=left, bounced=failed)
            self._messages[queue_id] = message

        return self._write(durable)

    def record_queue_state(self, paused: bool) -> Deferred[None]:
        """
        Record whether the queue is paused; fires once durable.
        """
        if not self.available:
            return fail(JournalUnavailable("the memory journal is unavailable"))

        def durable() -> None:
            self.queue_records.append(paused)
            self.queue_paused = paused

        return self._write(durable)

    def reprioritize(self, queue_id: str, priority: Priority) -> Deferred[None]:
        """
        Record a change of priority (beyond L{IJournal}, as the file journal
        has it); replay gives the message this priority.
        """
        if not self.available:
            return fail(JournalUnavailable("the memory journal is unavailable"))

        def durable() -> None:
            message = self._messages.get(queue_id)
            if message is not None:
                envelope = evolve(message.envelope, priority=Priority(priority))
                self._messages[queue_id] = evolve(message, envelope=envelope)

        return self._write(durable)

    def read(self, location: JournalLocation) -> Deferred[tuple[Envelope, bytes]]:
        """
        The message accepted at C{location}.
        """
        if location.segment != 0 or not 0 <= location.offset < len(self._bodies):
            return fail(KeyError(location))
        envelope, body = self._bodies[location.offset]
        if len(body) != location.length:
            return fail(KeyError(location))
        return succeed((envelope, body))

    def replay(self) -> Iterable[JournaledMessage]:
        """
        Every durable message not in a final state, in acceptance order.
        """
        return sorted(self._messages.values(), key=lambda m: m.location.offset)

    def start(self) -> None:
        """
        Start taking records.
        """
        self.running = True

    def stop(self) -> Deferred[None]:
        """
        Make every pending write durable, then stop.
        """
        self.flush()
        self.running = False
        return succeed(None)

    def flush(self) -> int:
        """
        Make every pending write durable and fire its L{Deferred}, in order.

        @return: how many writes were made durable.
        """
        pending, self._pending = self._pending, []
        for d, durable in pending:
            durable()
            d.callback(None)
        return len(pending)

    def _write(self, durable: Callable[[], None]) -> Deferred[None]:
        if not self.manual:
            durable()
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._pending.append((d, durable))
        return d
