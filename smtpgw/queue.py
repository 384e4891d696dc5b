"""
The send queue: the journal, the scheduler and an outbound relay tied
together (PRODUCT section 3).

L{MessageQueue.submit} makes a message durable in the journal and schedules
it; the dispatcher hands ready messages to the outbound relay in scheduler
order, within the gateway's rate and concurrency, and records in the journal
what became of each attempt. At start the journal is replayed into the
scheduler, so mail accepted before a crash is sent after it.

The rate is a token bucket on the injected clock: C{rate} tokens a second,
holding at most C{max(1, rate / 10)} (a tenth of a second's worth), so after
an idle spell at most that many messages leave at once and the long-run rate
is never above C{rate}.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator, Mapping

from attrs import define, evolve, field, frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpgw.interfaces import (
    DeliveryResult,
    IJournal,
    IMessageQueue,
    IOutbound,
    JournalLocation,
    JournalUnavailable,
)
from smtpgw.model import Envelope, MessageState, Priority
from smtpgw.outbound import all_deferred
from smtpgw.scheduler import ScheduledEntry, Scheduler

__all__ = [
    "DEFAULT_STOP_TIMEOUT",
    "RETRY_BASE",
    "RETRY_MAX",
    "MessageQueue",
    "QueueStats",
    "TokenBucket",
    "retry_delay",
]

#: The wait before the first retry of a temporary failure, in seconds.
RETRY_BASE = 60.0
#: The longest wait between two attempts, in seconds.
RETRY_MAX = 3600.0
#: How long stopping waits for deliveries under way, in seconds.
DEFAULT_STOP_TIMEOUT = 30.0

# Float sums of clock steps may fall a hair short of a whole token.
_TOKEN_EPSILON = 1e-9

_REPLAYED_STATES = {
    MessageState.QUEUED.value: MessageState.QUEUED,
    # A message being sent at a crash is simply sent again.
    MessageState.SENDING.value: MessageState.QUEUED,
    MessageState.DEFERRED.value: MessageState.DEFERRED,
    MessageState.HELD.value: MessageState.HELD,
}


def retry_delay(attempts: int) -> float:
    """
    How long to wait after the C{attempts}-th failed attempt: 60 s, doubling
    with each attempt, at most an hour.

    @param attempts: the attempts made so far (1 after the first failure).
    """
    if attempts <= 1:
        return RETRY_BASE
    # Past 2**6 the cap applies anyway; the bound keeps the power small.
    return min(RETRY_MAX, RETRY_BASE * 2.0 ** min(attempts - 1, 32))


@define
class TokenBucket:
    """
    The gateway-wide rate limit: C{rate} tokens a second, at most
    C{capacity} in store, one token per message. Full at the first use.

    @ivar rate: tokens a second; 0 means no limit.
    """

    rate: float
    capacity: float
    _tokens: float = field(init=False, default=0.0)
    _updated: float | None = field(init=False, default=None)

    @classmethod
    def for_rate(cls, rate: float) -> TokenBucket:
        """
        A bucket for C{rate} messages a second that holds a tenth of a
        second's worth, and at least one.
        """
        if not rate >= 0 or math.isinf(rate):
            raise ValueError(f"rate must be 0 or a positive number, not {rate!r}")
        return cls(rate=rate, capacity=max(1.0, rate / 10.0))

    def _refill(self, now: float) -> None:
        if self._updated is None:
            self._tokens = self.capacity
        else:
            elapsed = max(0.0, now - self._updated)
            self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._updated = now

    def ready(self, now: float) -> bool:
        """
        Whether a token can be taken at C{now}.
        """
        if not self.rate:
            return True
        self._refill(now)
        return self._tokens >= 1.0 - _TOKEN_EPSILON

    def take(self, now: float) -> None:
        """
        Take one token (the caller checked L{ready}).
        """
        if self.rate:
            self._refill(now)
            self._tokens -= 1.0

    def next_token_at(self, now: float) -> float:
        """
        When the next whole token will be there.
        """
        if not self.rate:
            return now
        self._refill(now)
        return now + max(0.0, 1.0 - self._tokens) / self.rate


@frozen
class QueueStats:
    """
    The queue's counters, for metrics and the pages.

    @ivar accepted: messages made durable since start (each was answered
        C{250}).
    @ivar unscheduled: accepted messages the scheduler could not take (a
        bug, logged as a failure): they stay journaled as queued and are
        sent after the next restart.
    @ivar refused: submissions the journal refused.
    @ivar delivered: messages delivered to every recipient.
    @ivar deferred: attempts that ended with a temporary failure.
    @ivar bounced: messages that failed permanently.
    @ivar in_flight: deliveries under way.
    @ivar queued_by_priority: messages ready to be sent, per priority.
    @ivar by_state: messages in the scheduler, per state.
    @ivar redelivered: messages found being sent at replay (a crash or a
        stop that did not wait for them): sent again, so possible duplicates.
    @ivar paused: whether dispatching is paused by an admin.
    """

    accepted: int
    unscheduled: int
    refused: int
    delivered: int
    deferred: int
    bounced: int
    redelivered: int
    in_flight: int
    queued_by_priority: Mapping[Priority, int]
    by_state: Mapping[MessageState, int]
    paused: bool


@implementer(IMessageQueue)
class MessageQueue(Service):
    """
    The send queue, as a service.

    Starting it replays the journal into the scheduler and starts
    dispatching; stopping it stops dispatching and waits, for at most
    C{stop_timeout} seconds, for the deliveries under way (those not
    finished by then stay journaled and are sent again after a restart).
    L{pause} and L{resume} stop and restart dispatching while mail keeps
    being accepted.

    Per-recipient outcomes are not yet kept apart: when any recipient is
    deferred, the whole message is retried (recipients that already took
    it get it again); when none is deferred and any bounced, the message is
    recorded C{bounced} (no DSN is sent yet).
    """

    _log = Logger()

    def __init__(
        self,
        journal: IJournal,
        outbound: IOutbound,
        clock: IReactorTime,
        rate: float = 0.0,
        concurrency: int = 10,
        *,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        retry: Callable[[int], float] = retry_delay,
        scheduler: Scheduler | None = None,
        freeze_after_replay: bool = False,
    ) -> None:
        """
        @param journal: where messages are made durable.
        @param outbound: where messages are sent.
        @param clock: the time and the timers of the dispatcher.
        @param rate: messages a second for the whole gateway; 0 is no limit.
        @param concurrency: deliveries under way at once, at least 1.
        @param stop_timeout: seconds stopping waits for deliveries under way.
        @param retry: the wait after the n-th failed attempt.
        @param scheduler: the scheduler to fill; a new one when not given.
        @param freeze_after_replay: call C{gc.freeze()} after the replay (for
            the gateway process; tests keep collecting everything).
        """
        self._freeze_after_replay = freeze_after_replay
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self._journal = journal
        self._outbound = outbound
        self._clock = clock
        self._rate = rate
        self._concurrency = concurrency
        self._bucket = TokenBucket.for_rate(rate)
        self._stop_timeout = stop_timeout
        self._retry = retry
        self.scheduler = scheduler if scheduler is not None else Scheduler()
        self._replayed = False
        self._paused = False
        self._in_flight: dict[str, Deferred[None]] = {}
        self._wakeup: IDelayedCall | None = None
        self._dispatching = False
        self._dispatch_again = False
        self._idle_waiters: list[Deferred[None]] = []
        self._accepted = 0
        self._unscheduled = 0
        self._refused = 0
        self._delivered = 0
        self._deferred = 0
        self._bounced = 0
        self._redelivered = 0

    @property
    def rate(self) -> float:
        """
        Messages a second for the whole gateway; 0 is no limit.
        """
        return self._rate

    @property
    def concurrency(self) -> int:
        """
        Deliveries under way at once, at most.
        """
        return self._concurrency

    # IMessageQueue

    @property
    def accepting(self) -> bool:
        """
        L{False} while the journal says it cannot take mail.
        """
        return bool(self._journal.accepting)

    def submit(self, envelope: Envelope, body: bytes) -> Deferred[None]:
        """
        Journal the message, then schedule it.

        @return: fires once the message is durable (the client may then be
            answered C{250}); fails with L{JournalUnavailable} when the
            journal refuses it. Once the message is durable, nothing fails
            the L{Deferred}: should scheduling fail, that is logged and
            counted (L{QueueStats.unscheduled}), and the message, journaled
            as queued, is sent after the next restart. Failing it would
            make the client send the message again: a duplicate.
        """
        return self._journal.accept(envelope, body).addCallbacks(
            self._accepted_by_journal, self._refused_by_journal, callbackArgs=(envelope,)
        )

    def _accepted_by_journal(self, location: JournalLocation, envelope: Envelope) -> None:
        self._accepted += 1
        try:
            self.scheduler.add(
                ScheduledEntry(
                    queue_id=envelope.queue_id,
                    priority=envelope.priority,
                    list=envelope.list,
                    location=location,
                )
            )
        except Exception:
            self._unscheduled += 1
            self._log.failure(
                "{queue_id} is durable but could not be scheduled: it stays journaled"
                " and is sent after the next restart",
                queue_id=envelope.queue_id,
            )
            return
        try:
            self._dispatch()
        except Exception:
            self._log.failure(
                "dispatching failed after accepting {queue_id}", queue_id=envelope.queue_id
            )

    def _refused_by_journal(self, failure: Failure) -> Failure:
        if failure.check(JournalUnavailable):
            self._refused += 1
            self._log.warn("journal refused a message: {reason}", reason=failure.getErrorMessage())
        return failure

    # Service

    def startService(self) -> None:
        """
        Replay the journal and start it (at the first start), then start
        dispatching.
        """
        super().startService()
        if not self._replayed:
            self._replayed = True
            self._replay()
            if self._freeze_after_replay:
                # Millions of replayed entries live as long as the process:
                # keep the collector from walking them again and again.
                gc.freeze()
            self._journal.start()
        self._dispatch()

    def stopService(self) -> Deferred[None]:
        """
        Stop dispatching, let the deliveries under way finish (for at most
        C{stop_timeout} seconds), then flush and close the journal; fires
        once that is done.
        """
        super().stopService()
        self._cancel_wakeup()
        return self._drain().addCallback(lambda _: self._journal.stop())

    def _drain(self) -> Deferred[None]:
        if not self._in_flight:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)

        def give_up() -> None:
            if d in self._idle_waiters:
                self._idle_waiters.remove(d)
                self._log.warn(
                    "stopped with {count} deliveries still under way; they will be sent again",
                    count=len(self._in_flight),
                )
                d.callback(None)

        timer = self._clock.callLater(self._stop_timeout, give_up)

        def stop_timer(result: None) -> None:
            if timer.active():
                timer.cancel()
            return result

        return d.addCallback(stop_timer)

    # Admin

    @property
    def paused(self) -> bool:
        """
        Whether an admin stopped dispatching.
        """
        return self._paused

    def pause(self) -> None:
        """
        Stop handing messages to the outbound relay (deliveries under way
        finish); mail is still accepted and kept.
        """
        if not self._paused:
            self._paused = True
            self._cancel_wakeup()
            self._log.info("queue paused")

    def resume(self) -> None:
        """
        Start dispatching again after L{pause}.
        """
        if self._paused:
            self._paused = False
            self._log.info("queue resumed")
            self._dispatch()

    def get(self, queue_id: str) -> ScheduledEntry | None:
        """
        The scheduled message with this queue id, or L{None}.
        """
        return self.scheduler.get(queue_id)

    def entries(self) -> Iterator[ScheduledEntry]:
        """
        Every scheduled message (for listings).
        """
        return self.scheduler.entries()

    def hold(self, queue_id: str) -> Deferred[None]:
        """
        Keep a waiting message from being sent until released.

        @return: fires once journaled; fails with
            L{smtpgw.scheduler.UnknownMessage} or
            L{smtpgw.scheduler.InvalidTransition}.
        """
        return self._admin(queue_id, self.scheduler.hold)

    def release(self, queue_id: str) -> Deferred[None]:
        """
        Make a held (or deferred) message ready now.
        """
        return self._admin(queue_id, self.scheduler.release)

    def cancel(self, queue_id: str) -> Deferred[None]:
        """
        Drop a message that is not being sent; it is never delivered.
        """
        return self._admin(queue_id, self.scheduler.cancel, MessageState.CANCELLED)

    def reprioritize(self, queue_id: str, priority: Priority | int) -> Deferred[None]:
        """
        Change a message's priority; the change is journaled, so replay
        gives the message its new priority.

        @return: fires once journaled; fails with
            L{smtpgw.scheduler.UnknownMessage}, or L{ValueError} for a
            priority outside 1..5.
        """
        try:
            new = Priority(priority)
            self.scheduler.reprioritize(queue_id, new)
        except (KeyError, ValueError):
            return fail()
        self._log.info(
            "{queue_id} re-prioritized to {priority}", queue_id=queue_id, priority=int(new)
        )
        d: Deferred[None] = self._journal.reprioritize(queue_id, new)
        self._dispatch()
        return d

    def stats(self) -> QueueStats:
        """
        The counters, now.
        """
        return QueueStats(
            accepted=self._accepted,
            unscheduled=self._unscheduled,
            refused=self._refused,
            delivered=self._delivered,
            deferred=self._deferred,
            bounced=self._bounced,
            redelivered=self._redelivered,
            in_flight=len(self._in_flight),
            queued_by_priority=self.scheduler.ready_by_priority(),
            by_state=self.scheduler.counts_by_state(),
            paused=self._paused,
        )

    def _admin(
        self,
        queue_id: str,
        change: Callable[[str], object],
        final: MessageState | None = None,
    ) -> Deferred[None]:
        try:
            change(queue_id)
        except (KeyError, ValueError):
            return fail()
        entry = self.scheduler.get(queue_id)
        state = final if final is not None else entry.state if entry else MessageState.CANCELLED
        self._log.info("{queue_id} is now {state}", queue_id=queue_id, state=state.value)
        # Journal the change before any dispatch, so that a delivery it
        # allows is recorded after it.
        d = self._journal.record_state(
            queue_id,
            state.value,
            entry.attempts if entry else 0,
            entry.next_attempt_at if entry else 0.0,
        )
        self._dispatch()
        return d

    # Dispatching

    def _replay(self) -> None:
        counts: dict[str, int] = {}
        for message in self._journal.replay():
            queue_id = message.envelope.queue_id
            state = _REPLAYED_STATES.get(message.state)
            if state is None or queue_id in self.scheduler:
                continue
            try:
                self.scheduler.add(
                    ScheduledEntry(
                        queue_id=queue_id,
                        priority=message.envelope.priority,
                        list=message.envelope.list,
                        location=message.location,
                        state=state,
                        attempts=message.attempts,
                        next_attempt_at=message.next_attempt_at,
                    )
                )
            except ValueError:
                self._log.failure(
                    "cannot schedule journaled message {queue_id}", queue_id=queue_id
                )
                continue
            counts[state.value] = counts.get(state.value, 0) + 1
            if message.state == MessageState.SENDING.value:
                self._redelivered += 1
        self._log.info(
            "replayed {total} journaled messages {counts}",
            total=sum(counts.values()),
            counts=counts,
        )
        if self._redelivered:
            self._log.warn(
                "{count} messages were being delivered when the gateway stopped without "
                "finishing; they are sent again and may arrive twice",
                count=self._redelivered,
            )

    def _dispatch(self) -> None:
        # A delivery that finishes at once calls back in here: loop instead
        # of recursing.
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            self._dispatch_again = True
            while self._dispatch_again:
                self._dispatch_again = False
                self._fill()
        finally:
            self._dispatching = False

    def _fill(self) -> None:
        if not self.running or self._paused:
            return
        while len(self._in_flight) < self._concurrency:
            now = self._clock.seconds()
            if not self.scheduler.has_ready(now):
                due = self.scheduler.next_wakeup(now)
                if due is not None:
                    self._wake_at(due)
                return
            if not self._bucket.ready(now):
                self._wake_at(self._bucket.next_token_at(now))
                return
            entry = self.scheduler.pop_ready(now)
            assert entry is not None
            self._bucket.take(now)
            self._start(entry)

    def _wake_at(self, when: float) -> None:
        wakeup = self._wakeup
        if wakeup is not None and wakeup.active():
            if wakeup.getTime() <= when:
                return
            wakeup.cancel()
        delay = max(0.0, when - self._clock.seconds())
        self._wakeup = self._clock.callLater(delay, self._woken)

    def _woken(self) -> None:
        self._wakeup = None
        self._dispatch()

    def _cancel_wakeup(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and wakeup.active():
            wakeup.cancel()

    def _start(self, entry: ScheduledEntry) -> None:
        queue_id = entry.queue_id
        d = ensureDeferred(self._attempt(entry))
        if not d.called:
            self._in_flight[queue_id] = d
        d.addErrback(
            lambda f: self._log.failure("delivery of {queue_id} failed", f, queue_id=queue_id)
        )
        d.addBoth(self._finished, queue_id)

    def _finished(self, _: object, queue_id: str) -> None:
        self._in_flight.pop(queue_id, None)
        if not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        self._dispatch()

    async def _attempt(self, entry: ScheduledEntry) -> None:
        try:
            envelope, body = await self._journal.read(entry.location)
        except Exception:
            self._log.failure("cannot read {queue_id} from the journal", queue_id=entry.queue_id)
            await self._settle(entry, None, all_deferred(["*"], "cannot read the journal"))
            return
        if envelope.priority != entry.priority:
            envelope = evolve(envelope, priority=entry.priority)
        # Journaled before the attempt, so that after a crash the messages
        # that may have gone out already are known and counted.
        await self._record(entry.queue_id, MessageState.SENDING, entry.attempts)
        try:
            result = await self._outbound.deliver(envelope, body)
        except Exception:
            self._log.failure("outbound failed on {queue_id}", queue_id=entry.queue_id)
            result = all_deferred(envelope.recipients, "internal error")
        await self._settle(entry, envelope, result)

    async def _settle(
        self, entry: ScheduledEntry, envelope: Envelope | None, result: DeliveryResult
    ) -> None:
        queue_id = entry.queue_id
        fields = {
            "queue_id": queue_id,
            "list": entry.list,
            "priority": int(entry.priority),
            "recipients": len(envelope.recipients) if envelope else 0,
        }
        if result.deferred:
            attempts = entry.attempts + 1
            next_attempt_at = self._clock.seconds() + self._retry(attempts)
            self._log.info(
                "deferred {queue_id} (attempt {attempts}, next at {next_attempt_at}): {reasons}",
                attempts=attempts,
                next_attempt_at=next_attempt_at,
                reasons="; ".join(f"{r}: {why}" for r, why in result.deferred),
                **fields,
            )
            await self._record(queue_id, MessageState.DEFERRED, attempts, next_attempt_at)
            self.scheduler.defer(queue_id, next_attempt_at, attempts)
            self._deferred += 1
        elif result.bounced:
            self._log.info(
                "bounced {queue_id}: {reasons}",
                reasons="; ".join(f"{r}: {why}" for r, why in result.bounced),
                **fields,
            )
            await self._record(queue_id, MessageState.BOUNCED, entry.attempts + 1)
            self.scheduler.complete(queue_id)
            self._bounced += 1
        else:
            self._log.info("delivered {queue_id}", attempts=entry.attempts + 1, **fields)
            await self._record(queue_id, MessageState.DELIVERED, entry.attempts + 1)
            self.scheduler.complete(queue_id)
            self._delivered += 1

    async def _record(
        self, queue_id: str, state: MessageState, attempts: int, next_attempt_at: float = 0.0
    ) -> None:
        try:
            await self._journal.record_state(queue_id, state.value, attempts, next_attempt_at)
        except JournalUnavailable as error:
            # The outcome stands in memory; after a restart the journal's
            # older state is what counts (at worst, a second delivery).
            self._log.warn(
                "could not journal {queue_id} as {state}: {reason}",
                queue_id=queue_id,
                state=state.value,
                reason=str(error),
            )
