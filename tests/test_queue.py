"""
Tests for L{smtpgw.queue}: the queue ties journal, scheduler and outbound
together — durable before acknowledged, dispatched in priority order within
rate and concurrency, retried with backoff, rebuilt from the journal at start.
All in memory on a L{Clock}.
"""

from __future__ import annotations

import email
import email.policy
import itertools
import math
import random
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any, ParamSpec, cast

import pytest
from attrs import evolve
from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.application.service import IService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpgw.alerts import AlertThrottle, MemoryAlertSink, ThrottleSummary
from smtpgw.interfaces import (
    DeliveryResult,
    IJournal,
    IMessageQueue,
    IOutbound,
    JournalLocation,
    JournalUnavailable,
)
from smtpgw.journal import FileJournal, QueueIdInUse
from smtpgw.memjournal import MemoryJournal
from smtpgw.model import Envelope, MessageState, Priority, QueueIdGenerator
from smtpgw.queue import (
    _NO_RESULT as QUEUE_NO_RESULT,
)
from smtpgw.queue import (
    DEFAULT_MAX_QUEUE_AGE,
    DEFAULT_PREEMPTION_GRACE,
    DSN_USERNAME,
    EXPIRED_STATUS,
    MAX_BOUNCE_EXAMPLES,
    RETRY_BASE,
    RETRY_JITTER,
    RETRY_MAX,
    MessageOutcome,
    MessageQueue,
    Preemption,
    RecipientProgress,
    TokenBucket,
    _kept_size,
    jittered,
    recipient_failure,
    retry_delay,
    sort_outcomes,
)
from smtpgw.scheduler import InvalidTransition, ScheduledEntry, UnknownMessage
from tests.twisted_support import async_test, logged_lines

_ids = itertools.count(1)


def envelope(priority: int = 3, list: str = "news", queue_id: str | None = None) -> Envelope:
    return Envelope(
        queue_id=queue_id or f"Q{next(_ids):06d}",
        list=list,
        username=f"u-{list}",
        sender=f"app@{list}.example",
        recipients=("a@example.org", "b@example.org"),
        priority=Priority(priority),
        accepted_at=0.0,
    )


@implementer(IOutbound)
class InstantOutbound:
    """
    Answers at once; C{outcome} decides the result from the envelope and
    how many times it was tried before.
    """

    def __init__(
        self,
        clock: Clock,
        outcome: Callable[[Envelope, int], DeliveryResult] | None = None,
    ) -> None:
        self.clock = clock
        self.outcome = outcome or (lambda env, _: DeliveryResult(delivered=env.recipients))
        self.calls: list[tuple[Envelope, bytes, float]] = []

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        tried = sum(1 for e, _, _ in self.calls if e.queue_id == envelope.queue_id)
        self.calls.append((envelope, body, self.clock.seconds()))
        return succeed(self.outcome(envelope, tried))

    @property
    def ids(self) -> list[str]:
        return [e.queue_id for e, _, _ in self.calls]


@implementer(IOutbound)
class PendingOutbound:
    """
    Each delivery waits until the test finishes it; counts the most
    deliveries ever under way at once.
    """

    def __init__(self) -> None:
        self.pending: list[tuple[Envelope, Deferred[DeliveryResult]]] = []
        self.started: list[str] = []
        self.most = 0

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        d: Deferred[DeliveryResult] = Deferred()
        self.pending.append((envelope, d))
        self.started.append(envelope.queue_id)
        self.most = max(self.most, len(self.pending))
        return d

    def finish_first(self) -> str:
        env, d = self.pending.pop(0)
        d.callback(DeliveryResult(delivered=env.recipients))
        return env.queue_id


def run_timers(clock: Clock, until: float | None = None) -> None:
    """
    Advance the clock from timer to timer (exactly to each one's time), up
    to C{until} when given.
    """
    while calls := clock.getDelayedCalls():
        when = min(c.getTime() for c in calls)
        if until is not None and when > until:
            break
        clock.advance(max(0.0, when - clock.seconds()))
    if until is not None and clock.seconds() < until:
        clock.advance(until - clock.seconds())


def make_queue(
    clock: Clock,
    outbound: IOutbound,
    journal: MemoryJournal | None = None,
    **kwargs: Any,
) -> tuple[MessageQueue, MemoryJournal]:
    journal = journal or MemoryJournal()
    # No jitter unless a test asks for it: retry times are then exact.
    kwargs.setdefault("rng", lambda: 0.5)
    queue = MessageQueue(journal, outbound, clock, **kwargs)
    return queue, journal


def states(journal: MemoryJournal, queue_id: str) -> list[tuple[str, int, float]]:
    return [(s, a, t) for q, s, a, t in journal.state_records if q == queue_id]


class TestPureParts:
    def test_provides_interfaces(self) -> None:
        """
        MessageQueue provides IMessageQueue and IService; the memory journal
        provides IJournal; the test outbounds provide IOutbound.
        """
        clock = Clock()
        queue, journal = make_queue(clock, InstantOutbound(clock))
        assert verifyObject(IMessageQueue, queue)
        assert verifyObject(IService, queue)
        assert verifyObject(IJournal, journal)
        assert verifyObject(IOutbound, InstantOutbound(clock))
        assert verifyObject(IOutbound, PendingOutbound())

    @pytest.mark.parametrize(
        ("attempts", "delay"),
        [(0, 60.0), (1, 60.0), (2, 120.0), (6, 1920.0), (7, 3600.0), (8, 3600.0), (10**6, 3600.0)],
    )
    def test_retry_delay_doubles_up_to_an_hour(self, attempts: int, delay: float) -> None:
        """
        The wait after a failure starts at 60 s, doubles with each attempt,
        and stops at one hour (first reached at the 7th attempt).
        """
        assert retry_delay(attempts) == delay
        assert RETRY_BASE <= retry_delay(attempts) <= RETRY_MAX

    def test_bucket_capacity_is_a_tenth_of_a_second_or_one(self) -> None:
        """
        The bucket holds a tenth of a second's worth of tokens, at least one.
        """
        assert TokenBucket.for_rate(100).capacity == 10
        assert TokenBucket.for_rate(10).capacity == 1
        assert TokenBucket.for_rate(0.5).capacity == 1

    @pytest.mark.parametrize("rate", [-1.0, float("nan"), float("inf")])
    def test_bucket_refuses_bad_rate(self, rate: float) -> None:
        """
        A negative, NaN or infinite rate is refused.
        """
        with pytest.raises(ValueError, match="rate"):
            TokenBucket.for_rate(rate)

    def test_bucket_burst_then_steady_rate(self) -> None:
        """
        A full bucket lets its capacity through at once, then one token per
        1/rate seconds.
        """
        bucket = TokenBucket.for_rate(20)
        for _ in range(2):
            assert bucket.ready(5.0)
            bucket.take(5.0)
        assert not bucket.ready(5.0)
        assert bucket.next_token_at(5.0) == pytest.approx(5.05)
        assert not bucket.ready(5.049)
        assert bucket.ready(5.05)

    @given(
        st.floats(1e9, 4e9),
        st.sampled_from([1.0, 7.0, 100.0, 1000.0, 20000.0]),
        st.floats(1e-4, 0.05),
    )
    def test_bucket_at_epoch_times_never_waits_for_now(
        self, start: float, rate: float, step: float
    ) -> None:
        """
        At epoch-sized times (where a float step of the clock is ~1e-7 s),
        a bucket that is not ready always names a later time for its next
        token, so a dispatcher waking then makes progress.
        """
        bucket = TokenBucket.for_rate(rate)
        now = start
        for _ in range(50):
            while bucket.ready(now):
                bucket.take(now)
            assert bucket.next_token_at(now) > now
            now = bucket.next_token_at(now) + step * (now % 1.0 > 0.5)
            assert bucket.ready(now)

    def test_unlimited_bucket(self) -> None:
        """
        Rate 0 never holds anything back.
        """
        bucket = TokenBucket.for_rate(0)
        for _ in range(1000):
            assert bucket.ready(0.0)
            bucket.take(0.0)

    def test_concurrency_must_be_positive(self) -> None:
        """
        A concurrency below 1 is refused.
        """
        clock = Clock()
        with pytest.raises(ValueError, match="concurrency"):
            make_queue(clock, InstantOutbound(clock), concurrency=0)


class TestSubmit:
    def test_submit_fires_only_after_journal(self) -> None:
        """
        submit's Deferred fires only once the journal's does, and the message
        is not scheduled nor sent before it is durable.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, journal = make_queue(clock, outbound, MemoryJournal(manual=True))
        queue.startService()
        env = envelope()
        d = queue.submit(env, b"body\r\n")
        assert not d.called
        assert env.queue_id not in queue.scheduler
        assert outbound.calls == []
        journal.flush()
        assert d.called
        assert d.result is None
        # The attempt starts once its "sending" record is durable too.
        assert outbound.calls == []
        journal.flush()
        assert outbound.ids == [env.queue_id]

    @staticmethod
    def _count_reads(journal: MemoryJournal) -> list[str]:
        reads: list[str] = []
        read = journal.read

        def counted(found: tuple[Envelope, bytes]) -> tuple[Envelope, bytes]:
            reads.append(found[0].queue_id)
            return found

        def counting(location: Any) -> Deferred[tuple[Envelope, bytes]]:
            return read(location).addCallback(counted)

        journal.read = counting  # type: ignore[method-assign]
        return reads

    def test_a_first_attempt_does_not_read_the_journal(self) -> None:
        """
        A submitted message's first attempt is sent from what was journaled,
        kept in memory, without reading it back; a later attempt (after a
        temporary failure) reads it from the journal, and both send the
        same bytes.
        """
        clock = Clock()
        outbound = InstantOutbound(
            clock,
            lambda env, tried: (
                DeliveryResult(delivered=env.recipients)
                if tried
                else DeliveryResult(deferred=tuple((r, "4.4.1 later") for r in env.recipients))
            ),
        )
        queue, journal = make_queue(clock, outbound)
        reads = self._count_reads(journal)
        queue.startService()
        message = envelope()
        queue.submit(message, b"Subject: x\r\n\r\nbody\r\n")
        assert outbound.ids == [message.queue_id]
        assert reads == []
        run_timers(clock, until=3600)
        assert outbound.ids == [message.queue_id, message.queue_id]
        assert reads == [message.queue_id]
        assert outbound.calls[0][1] == outbound.calls[1][1] == b"Subject: x\r\n\r\nbody\r\n"

    @pytest.mark.parametrize(("room", "kept"), [(3, 3), (2.99, 2), (0, 0)])
    def test_what_is_kept_in_memory_is_bounded(self, room: float, kept: int) -> None:
        """
        Only C{recent_bytes} of messages (bodies, recipients, bookkeeping)
        are kept, the oldest forgotten first: with four messages waiting
        behind one being sent, room for three keeps the last three, a little
        less the last two, none none; the others are read from the journal,
        and every message is sent exactly as submitted.
        """
        clock = Clock()
        outbound = PendingOutbound()
        first = envelope()
        messages = [envelope() for _ in range(4)]
        bodies = [b"body %04d\n" % n for n in range(4)]
        each = _kept_size(messages[0], bodies[0])
        queue, journal = make_queue(clock, outbound, concurrency=1, recent_bytes=int(room * each))
        reads = self._count_reads(journal)
        queue.startService()
        queue.submit(first, b"first\n")
        for message, body in zip(messages, bodies, strict=True):
            queue.submit(message, body)
        while outbound.pending:
            outbound.finish_first()
            run_timers(clock, until=10)
        waiting_reads = [q for q in reads if q != first.queue_id]
        assert sorted(waiting_reads) == sorted(m.queue_id for m in messages[: 4 - kept])
        assert outbound.started == [first.queue_id] + [m.queue_id for m in messages]

    def test_nothing_is_kept_while_the_queue_is_paused(self) -> None:
        """
        Mail accepted while an admin has stopped the queue is not kept in
        memory (no attempt comes soon): it is read from the journal.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, journal = make_queue(clock, outbound)
        reads = self._count_reads(journal)
        queue.startService()
        queue.pause()
        messages = [envelope() for _ in range(3)]
        for message in messages:
            queue.submit(message, b"body\n")
        queue.resume()
        run_timers(clock, until=10)
        assert sorted(reads) == sorted(m.queue_id for m in messages)
        assert sorted(outbound.ids) == sorted(m.queue_id for m in messages)

    def test_journal_unavailable_propagates(self) -> None:
        """
        When the journal refuses, submit fails with JournalUnavailable,
        nothing is scheduled or sent, and accepting is False.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, journal = make_queue(clock, outbound)
        queue.startService()
        before = queue.accepting
        journal.available = False
        assert (before, queue.accepting) == (True, False)
        failures: list[Failure] = []
        queue.submit(envelope(), b"x\r\n").addErrback(failures.append)
        assert len(failures) == 1
        assert failures[0].check(JournalUnavailable)
        assert len(queue.scheduler) == 0
        assert outbound.calls == []
        assert queue.stats().refused == 1
        assert queue.stats().accepted == 0

    def test_durable_message_is_acknowledged_even_if_scheduling_fails(
        self, logged_errors: list[dict[str, Any]]
    ) -> None:
        """
        Once the journal has made a message durable, submit succeeds even if
        the scheduler refuses it (a bug): a failure there would make the
        client send the message again. The failure is logged and counted,
        the message stays journaled as queued, and a restart sends it.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, journal = make_queue(clock, outbound)
        queue.startService()

        def refuse(entry: object, gate: str | None = None) -> None:
            raise ValueError("scheduler bug")

        queue.scheduler.add = refuse  # type: ignore[method-assign]
        env = envelope()
        results: list[object] = []
        queue.submit(env, b"x\r\n").addBoth(results.append)
        assert results == [None]
        assert (queue.stats().accepted, queue.stats().unscheduled) == (1, 1)
        assert queue.stats().refused == 0
        assert outbound.calls == []
        [event] = logged_errors
        assert event["log_failure"].check(ValueError)
        assert event["queue_id"] == env.queue_id
        logged_errors.clear()
        assert [(m.envelope.queue_id, m.state) for m in journal.replay()] == [
            (env.queue_id, "queued")
        ]

        restarted_outbound = InstantOutbound(clock)
        restarted, _ = make_queue(clock, restarted_outbound, journal)
        restarted.startService()
        assert restarted_outbound.ids == [env.queue_id]

    def test_dispatch_failure_after_accept_does_not_fail_submit(
        self, logged_errors: list[dict[str, Any]]
    ) -> None:
        """
        An error while dispatching right after a message was made durable
        and scheduled is logged; submit still succeeds.
        """
        clock = Clock()
        queue, _ = make_queue(clock, InstantOutbound(clock))
        queue.startService()

        def broken() -> None:
            raise RuntimeError("dispatch bug")

        queue._dispatch = broken  # type: ignore[method-assign]
        env = envelope()
        results: list[object] = []
        queue.submit(env, b"x\r\n").addBoth(results.append)
        assert results == [None]
        assert env.queue_id in queue.scheduler
        assert queue.stats().unscheduled == 0
        [event] = logged_errors
        assert event["log_failure"].check(RuntimeError)
        logged_errors.clear()

    def test_live_queue_id_is_refused_not_overwritten(self) -> None:
        """
        A second message with the queue id of a queued one is refused by
        the journal (QueueIdInUse, a JournalUnavailable: the client is told
        to try again); the first message is still sent, with its own bytes.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound)
        queue.startService()
        queue.pause()
        queue.submit(envelope(queue_id="SAME"), b"first\r\n")
        failures: list[Failure] = []
        queue.submit(envelope(queue_id="SAME"), b"second\r\n").addErrback(failures.append)
        assert len(failures) == 1
        assert failures[0].check(QueueIdInUse)
        assert failures[0].check(JournalUnavailable)
        assert (queue.stats().refused, queue.stats().accepted) == (1, 1)
        queue.resume()
        assert [(e.queue_id, body) for e, body, _ in outbound.calls] == [("SAME", b"first\r\n")]

    def test_body_reaches_outbound_from_journal(self) -> None:
        """
        The outbound relay gets the bytes the journal kept.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound)
        queue.startService()
        queue.submit(envelope(), b"Subject: x\r\n\r\nhello\r\n")
        assert outbound.calls[0][1] == b"Subject: x\r\n\r\nhello\r\n"


class TestOrder:
    def test_strict_priority_across_a_mix(self) -> None:
        """
        Messages waiting together leave in priority order, whatever their
        arrival order and list.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound, concurrency=1)
        queue.startService()
        queue.pause()
        mix = [5, 3, 1, 4, 2, 2, 5, 1, 3, 4, 1]
        envs = [envelope(p, list=("a", "b", "c")[i % 3]) for i, p in enumerate(mix)]
        for env in envs:
            queue.submit(env, b"x\r\n")
        assert outbound.calls == []
        queue.resume()
        assert [int(e.priority) for e, _, _ in outbound.calls] == sorted(mix)

    def test_high_priority_overtakes_waiting_low(self) -> None:
        """
        A priority-1 message arriving while low-priority ones wait is the next
        one sent.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, _ = make_queue(clock, outbound, concurrency=1)
        queue.startService()
        lows = [envelope(5) for _ in range(3)]
        for env in lows:
            queue.submit(env, b"x\r\n")
        urgent = envelope(1)
        queue.submit(urgent, b"x\r\n")
        outbound.finish_first()
        assert outbound.started == [lows[0].queue_id, urgent.queue_id]

    def test_lists_served_in_turn(self) -> None:
        """
        At one priority, a burst of one list does not starve another: they
        alternate.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound, concurrency=1)
        queue.startService()
        queue.pause()
        burst = [envelope(3, "big") for _ in range(4)]
        small = [envelope(3, "small") for _ in range(2)]
        for env in burst + small:
            queue.submit(env, b"x\r\n")
        queue.resume()
        expected = [burst[0], small[0], burst[1], small[1], burst[2], burst[3]]
        assert outbound.ids == [e.queue_id for e in expected]


class TestLimits:
    def test_rate_is_honoured(self) -> None:
        """
        At 10 messages a second (bucket of 1), 100 messages take 9.9
        simulated seconds after the first: never more than 1 + 10 t by time t.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound, rate=10.0, concurrency=50)
        queue.startService()
        for _ in range(100):
            queue.submit(envelope(), b"x\r\n")
        run_timers(clock)
        times = [t for _, _, t in outbound.calls]
        assert len(times) == 100
        for n, t in enumerate(times):
            assert n + 1 <= 1 + 10 * t + 1e-6, (n, t)
        assert times[-1] == pytest.approx(9.9)
        assert len(clock.getDelayedCalls()) == 0

    def test_rate_burst_then_steady(self) -> None:
        """
        At 100 a second the bucket holds 10: ten leave at once, the eleventh
        at 0.01 s, not before.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound, rate=100.0)
        queue.startService()
        for _ in range(20):
            queue.submit(envelope(), b"x\r\n")
        assert len(outbound.calls) == 10
        clock.advance(0.0099)
        assert len(outbound.calls) == 10
        run_timers(clock, until=0.0100001)
        assert len(outbound.calls) == 11

    def test_unlimited_rate_sends_everything_at_once(self) -> None:
        """
        With rate 0, every ready message goes at once (within concurrency).
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound)
        queue.startService()
        for _ in range(500):
            queue.submit(envelope(), b"x\r\n")
        assert len(outbound.calls) == 500
        assert queue.stats().delivered == 500

    def test_rate_at_epoch_times(self) -> None:
        """
        With the clock at an epoch time, a rate-limited queue sends at its
        rate and its wake-ups always move time on.
        """
        clock = Clock()
        clock.advance(1_700_000_000.0)
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound, rate=100)
        queue.startService()
        for _ in range(300):
            queue.submit(envelope(), b"x\r\n")
        wakeups = 0
        while clock.getDelayedCalls():
            wakeups += 1
            assert wakeups < 1000
            clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
        times = [t for _, _, t in outbound.calls]
        assert len(times) == 300
        assert (300 - 10) / (times[-1] - times[9]) == pytest.approx(100, rel=0.01)

    def test_concurrency_never_exceeded(self) -> None:
        """
        With concurrency 3, three deliveries are under way, never a fourth;
        each one finished lets the next start.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, _ = make_queue(clock, outbound, concurrency=3)
        queue.startService()
        for _ in range(10):
            queue.submit(envelope(), b"x\r\n")
        assert len(outbound.pending) == 3
        assert queue.stats().in_flight == 3
        outbound.finish_first()
        assert len(outbound.pending) == 3
        assert len(outbound.started) == 4
        while outbound.pending:
            outbound.finish_first()
        assert len(outbound.started) == 10
        assert outbound.most == 3
        assert queue.stats().delivered == 10
        assert queue.stats().in_flight == 0
        assert len(queue.scheduler) == 0


class TestOutcomes:
    def test_delivered_is_journaled_and_forgotten(self) -> None:
        """
        A delivered message is journaled as delivered (one attempt) and leaves
        the scheduler.
        """
        clock = Clock()
        queue, journal = make_queue(clock, InstantOutbound(clock))
        queue.startService()
        env = envelope()
        queue.submit(env, b"x\r\n")
        assert states(journal, env.queue_id) == [("sending", 0, 0.0), ("delivered", 1, 0.0)]
        assert env.queue_id not in queue.scheduler
        assert list(journal.replay()) == []
        # Nothing waits for the outcome to be durable; "sending" had to be.
        assert journal.unhurried == [env.queue_id]

    def test_a_deferral_is_journaled_urgently(self) -> None:
        """
        A deferral is journaled before the retry is scheduled, as an urgent
        record: only final outcomes are unhurried.
        """
        clock = Clock()

        def outcome(env: Envelope, tried: int) -> DeliveryResult:
            return DeliveryResult(deferred=tuple((r, "4.2.0 busy") for r in env.recipients))

        queue, journal = make_queue(clock, InstantOutbound(clock, outcome))
        queue.startService()
        env = envelope()
        queue.submit(env, b"x\r\n")
        assert states(journal, env.queue_id)[-1][0] == "deferred"
        assert journal.unhurried == []

    def test_failing_outbound_defers_and_retries(self) -> None:
        """
        A temporary failure is journaled as deferred with the attempt count
        and the backoff time; the message is tried again exactly then, not
        before, until delivered.
        """
        clock = Clock()
        clock.advance(1000)

        def outcome(env: Envelope, tried: int) -> DeliveryResult:
            if tried < 2:
                return DeliveryResult(deferred=tuple((r, "451 try later") for r in env.recipients))
            return DeliveryResult(delivered=env.recipients)

        outbound = InstantOutbound(clock, outcome)
        queue, journal = make_queue(clock, outbound)
        queue.startService()
        env = envelope()
        queue.submit(env, b"x\r\n")
        assert states(journal, env.queue_id) == [("sending", 0, 0.0), ("deferred", 1, 1060.0)]
        entry = queue.get(env.queue_id)
        assert entry is not None
        assert entry.state is MessageState.DEFERRED
        clock.advance(59.999)
        assert len(outbound.calls) == 1
        clock.advance(0.001)
        assert len(outbound.calls) == 2
        assert states(journal, env.queue_id)[-1] == ("deferred", 2, 1180.0)
        run_timers(clock)
        assert [t for _, _, t in outbound.calls] == [1000.0, 1060.0, 1180.0]
        assert states(journal, env.queue_id)[-1] == ("delivered", 3, 0.0)
        assert queue.stats().deferred == 2
        assert queue.stats().delivered == 1

    def test_bounce_is_final(self) -> None:
        """
        A permanent failure is journaled as bounced and never retried; the
        one bounce sent to the sender bounces too here, and no bounce is
        made about it.
        """
        clock = Clock()

        def outcome(env: Envelope, tried: int) -> DeliveryResult:
            return DeliveryResult(bounced=tuple((r, "550 no such user") for r in env.recipients))

        outbound = InstantOutbound(clock, outcome)
        queue, journal = make_queue(clock, outbound)
        queue.startService()
        env = envelope()
        queue.submit(env, b"x\r\n")
        run_timers(clock)
        assert states(journal, env.queue_id) == [("sending", 0, 0.0), ("bounced", 1, 0.0)]
        assert outbound.ids.count(env.queue_id) == 1
        [(dsn, _, _)] = [c for c in outbound.calls if c[0].queue_id != env.queue_id]
        assert (dsn.sender, dsn.recipients) == ("", (env.sender,))
        assert queue.stats().bounced == 2
        assert queue.stats().dsns == 1
        assert len(queue.scheduler) == 0

    def test_journal_failure_after_delivery_is_not_fatal(self) -> None:
        """
        When the journal cannot record the outcome, the outcome still stands in
        memory (a warning, not a crash).
        """
        clock = Clock()
        journal = MemoryJournal()

        def outcome(env: Envelope, tried: int) -> DeliveryResult:
            journal.available = False
            return DeliveryResult(delivered=env.recipients)

        queue, _ = make_queue(clock, InstantOutbound(clock, outcome), journal)
        queue.startService()
        with logged_lines(LogLevel.warn) as warned:
            queue.submit(envelope(), b"x\r\n")
        assert len(queue.scheduler) == 0
        assert queue.stats().delivered == 1
        assert [w for w in warned if "could not journal" in w and "delivered" in w]

    def test_outbound_sees_current_priority(self) -> None:
        """
        A message re-prioritized while waiting goes out with the new priority.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound)
        queue.startService()
        queue.pause()
        env = envelope(5)
        queue.submit(env, b"x\r\n")
        queue.reprioritize(env.queue_id, 1)
        queue.resume()
        assert outbound.calls[0][0].priority is Priority.VERY_HIGH


class TestLifecycle:
    def test_replay_requeues_journaled_messages(self) -> None:
        """
        At start the journal is replayed: queued messages are sent, deferred
        ones at their next attempt time (not before, with their attempts),
        held ones not at all, finished ones never again.
        """
        journal = MemoryJournal()
        queued, deferred, held, done = (envelope() for _ in range(4))
        for env in (queued, deferred, held, done):
            journal.accept(env, b"x\r\n")
        journal.record_state(deferred.queue_id, "deferred", 2, 100.0)
        journal.record_state(held.queue_id, "held")
        journal.record_state(done.queue_id, "delivered", 1)

        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound, journal)
        queue.startService()
        assert outbound.ids == [queued.queue_id]
        clock.advance(99.9)
        assert outbound.ids == [queued.queue_id]
        run_timers(clock)
        assert clock.seconds() == 100.0
        assert outbound.ids == [queued.queue_id, deferred.queue_id]
        assert states(journal, deferred.queue_id)[-1] == ("delivered", 3, 0.0)
        entry = queue.get(held.queue_id)
        assert entry is not None
        assert entry.state is MessageState.HELD
        assert done.queue_id not in queue.scheduler

    def test_submitted_before_start_waits_and_is_not_doubled(self) -> None:
        """
        A message submitted before the queue starts is kept, sent once it
        starts, and the replay does not schedule it twice.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound)
        env = envelope()
        queue.submit(env, b"x\r\n")
        assert outbound.calls == []
        queue.startService()
        assert outbound.ids == [env.queue_id]

    def test_stop_waits_for_deliveries_under_way(self) -> None:
        """
        stopService stops dispatching and fires once the deliveries under way
        have finished; waiting messages stay queued.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, _ = make_queue(clock, outbound, concurrency=2)
        queue.startService()
        for _ in range(4):
            queue.submit(envelope(), b"x\r\n")
        stopped = queue.stopService()
        assert not stopped.called
        outbound.finish_first()
        assert not stopped.called
        outbound.finish_first()
        assert stopped.called
        assert len(outbound.started) == 2
        assert queue.scheduler.counts_by_state()[MessageState.QUEUED] == 2
        assert clock.getDelayedCalls() == []

    def test_the_queue_runs_the_journal_between_start_and_stop(self) -> None:
        """
        Starting the queue replays then starts the journal; stopping it
        closes the journal only after the deliveries under way finished, so
        their outcomes are still journaled.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, journal = make_queue(clock, outbound)
        assert not journal.running
        queue.startService()
        assert journal.running
        queue.submit(envelope(queue_id="Q1"), b"x\r\n")
        stopped = queue.stopService()
        assert journal.running
        outbound.finish_first()
        assert stopped.called
        assert not journal.running
        assert states(journal, "Q1")[-1][0] == "delivered"

    def test_a_message_found_sending_at_replay_is_sent_again_and_counted(self) -> None:
        """
        A message whose last journaled state is "sending" (the gateway died
        during the attempt) is sent again after a restart and counted as a
        possible duplicate.
        """
        clock = Clock()
        journal = MemoryJournal()
        first, _ = make_queue(clock, PendingOutbound(), journal)
        first.startService()
        env = envelope(queue_id="Q-SENDING")
        first.submit(env, b"x\r\n")
        assert states(journal, "Q-SENDING") == [("sending", 0, 0.0)]
        outbound = InstantOutbound(clock)
        second, _ = make_queue(clock, outbound, journal)
        second.startService()
        assert outbound.ids == ["Q-SENDING"]
        assert second.stats().redelivered == 1
        assert first.stats().redelivered == 0

    def test_without_mark_sending_only_the_outcome_is_journaled(self) -> None:
        """
        With C{mark_sending=False} (C{--relay discard}) an attempt starts at
        once, with no "sending" record before it, and its outcome is still
        journaled, so the message is compacted away as usual.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, journal = make_queue(clock, outbound, mark_sending=False)
        queue.startService()
        env = envelope()
        queue.submit(env, b"x\r\n")
        assert len(outbound.pending) == 1
        assert states(journal, env.queue_id) == []
        outbound.finish_first()
        assert states(journal, env.queue_id) == [("delivered", 1, 0.0)]
        assert list(journal.replay()) == []

    def test_without_mark_sending_an_unfinished_attempt_is_retried_uncounted(self) -> None:
        """
        Without "sending" records, a message whose attempt was under way at a
        crash is queued again at the restart, as one never tried, and not
        counted as a possible duplicate: nothing left through that outbound.
        """
        clock = Clock()
        journal = MemoryJournal()
        first, _ = make_queue(clock, PendingOutbound(), journal, mark_sending=False)
        first.startService()
        env = envelope(queue_id="Q-UNMARKED")
        first.submit(env, b"x\r\n")
        outbound = InstantOutbound(clock)
        second, _ = make_queue(clock, outbound, journal, mark_sending=False)
        second.startService()
        assert outbound.ids == ["Q-UNMARKED"]
        assert second.stats().redelivered == 0
        assert states(journal, "Q-UNMARKED") == [("delivered", 1, 0.0)]

    def test_stop_gives_up_after_timeout(self) -> None:
        """
        stopService fires after stop_timeout even when a delivery hangs, and
        not a moment before.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, _ = make_queue(clock, outbound, stop_timeout=5.0)
        queue.startService()
        queue.submit(envelope(), b"x\r\n")
        stopped = queue.stopService()
        clock.advance(4.999)
        assert not stopped.called
        clock.advance(0.001)
        assert stopped.called
        outbound.finish_first()
        assert queue.stats().delivered == 1

    def test_stop_with_nothing_in_flight_is_immediate(self) -> None:
        """
        Stopping an idle queue fires at once and leaves no timer.
        """
        clock = Clock()
        queue, _ = make_queue(clock, InstantOutbound(clock))
        queue.startService()
        queue.submit(envelope(), b"x\r\n")
        assert queue.stopService().called
        assert clock.getDelayedCalls() == []

    def test_pause_keeps_accepting_and_resume_sends(self) -> None:
        """
        Paused, the queue accepts and keeps mail but sends nothing, and no
        wakeup fires; resumed, it sends what waited.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound)
        queue.startService()
        queue.pause()
        assert queue.paused
        assert queue.accepting
        d = queue.submit(envelope(), b"x\r\n")
        assert d.called
        assert outbound.calls == []
        assert clock.getDelayedCalls() == []
        assert queue.stats().paused
        queue.resume()
        assert len(outbound.calls) == 1

    def test_one_wakeup_at_a_time(self) -> None:
        """
        However many messages wait for a retry, one timer is pending, set for
        the earliest.
        """
        clock = Clock()
        journal = MemoryJournal()
        for due in (300.0, 100.0, 200.0):
            env = envelope()
            journal.accept(env, b"x\r\n")
            journal.record_state(env.queue_id, "deferred", 1, due)
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound, journal)
        queue.startService()
        calls = clock.getDelayedCalls()
        assert len(calls) == 1
        assert calls[0].getTime() == 100.0
        run_timers(clock)
        assert [t for _, _, t in outbound.calls] == [100.0, 200.0, 300.0]


class TestAdmin:
    def test_reprioritize_is_journaled(self) -> None:
        """
        A new priority is kept in the journal (when it can keep one), so the
        message has it again after a restart.
        """
        clock = Clock()
        queue, journal = make_queue(clock, InstantOutbound(clock))
        queue.startService()
        queue.pause()
        env = envelope(5)
        queue.submit(env, b"x\r\n")
        d = queue.reprioritize(env.queue_id, Priority.HIGH)
        assert d.called
        [message] = journal.replay()
        assert message.envelope.priority is Priority.HIGH
        restarted, _ = make_queue(clock, InstantOutbound(clock), journal)
        restarted.pause()
        restarted.startService()
        entry = restarted.get(env.queue_id)
        assert entry is not None
        assert entry.priority is Priority.HIGH

    def test_hold_release_cancel_are_journaled(self) -> None:
        """
        Hold keeps a message back and is journaled; release sends it;
        cancel drops one for good; all three survive in the journal.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, journal = make_queue(clock, outbound)
        queue.startService()
        queue.pause()
        kept, dropped = envelope(), envelope()
        queue.submit(kept, b"x\r\n")
        queue.submit(dropped, b"x\r\n")
        queue.hold(kept.queue_id)
        queue.cancel(dropped.queue_id)
        assert states(journal, kept.queue_id) == [("held", 0, 0.0)]
        assert states(journal, dropped.queue_id) == [("cancelled", 0, 0.0)]
        assert [m.envelope.queue_id for m in journal.replay()] == [kept.queue_id]
        queue.resume()
        assert outbound.calls == []
        queue.release(kept.queue_id)
        assert outbound.ids == [kept.queue_id]
        assert states(journal, kept.queue_id)[1:] == [
            ("queued", 0, 0.0),
            ("sending", 0, 0.0),
            ("delivered", 1, 0.0),
        ]

    def test_admin_errors(self) -> None:
        """
        Unknown ids fail with UnknownMessage; a message being sent cannot be
        held or cancelled (InvalidTransition); a priority outside 1..5 is
        refused.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, _ = make_queue(clock, outbound)
        queue.startService()
        env = envelope()
        queue.submit(env, b"x\r\n")
        errors: list[Failure] = []
        queue.hold("nope").addErrback(errors.append)
        queue.cancel(env.queue_id).addErrback(errors.append)
        queue.hold(env.queue_id).addErrback(errors.append)
        queue.reprioritize(env.queue_id, 9).addErrback(errors.append)
        kinds = [f.type for f in errors]
        assert kinds == [UnknownMessage, InvalidTransition, InvalidTransition, ValueError]
        outbound.finish_first()

    def test_stats(self) -> None:
        """
        The counters follow acceptances, outcomes and waiting messages by
        priority and state.
        """
        clock = Clock()
        queue, _ = make_queue(clock, PendingOutbound(), concurrency=1)
        queue.startService()
        for p in (1, 2, 2, 5):
            queue.submit(envelope(p), b"x\r\n")
        stats = queue.stats()
        assert stats.accepted == 4
        assert stats.in_flight == 1
        assert stats.queued_by_priority == {
            Priority(1): 0,
            Priority(2): 2,
            Priority(3): 0,
            Priority(4): 0,
            Priority(5): 1,
        }
        assert stats.by_state[MessageState.SENDING] == 1
        assert stats.by_state[MessageState.QUEUED] == 3


# Per-recipient outcomes, bounces, expiry, alerts and journaled pauses.

A, B, C = "a@one.example", "b@two.example", "c@one.example"
THREE = (A, B, C)
SENDER = "app@news.example"
HOST = "gw.example.net"
BODY_MARKER = b"THE-BODY-STAYS-OUT-OF-BOUNCES"
ORIGINAL = (
    b"From: App <app@news.example>\r\n"
    b"To: a@one.example, b@two.example, c@one.example\r\n"
    b"Subject: Quarterly newsletter\r\n"
    b"Message-ID: <orig-1@news.example>\r\n"
    b"\r\n" + BODY_MARKER + b"\r\n"
)


def reply(kind: str, recipient: str) -> str:
    """
    @return: what the SMTP client reports for a remote refusal of C{kind}.
    """
    host = f"mx.{recipient.rpartition('@')[2]}:25"
    if kind == "4xx":
        text = f"451 4.3.0 <{recipient}>: try again later"
    else:
        text = f"550 5.1.1 <{recipient}>: no such user"
    return f"{host} said: {text} (in reply to RCPT TO)"


@implementer(IOutbound)
class RecipientOutbound:
    """
    Answers at once, per recipient, from a plan: each recipient's list of
    outcomes ("ok", "4xx", "5xx") is used one per attempt, and its last
    outcome sticks; recipients without a plan take the message. While
    C{hang} is set, deliveries never finish (a gateway killed mid-attempt).

    @ivar delivered: every recipient that took a message, once per delivery.
    """

    def __init__(self, clock: Clock, plan: dict[str, list[str]] | None = None) -> None:
        self.clock = clock
        self.plan = plan or {}
        self.calls: list[tuple[Envelope, bytes, float]] = []
        self.delivered: list[str] = []
        self.hang = False

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        self.calls.append((envelope, body, self.clock.seconds()))
        if self.hang:
            return Deferred()
        delivered: list[str] = []
        deferred: list[tuple[str, str]] = []
        bounced: list[tuple[str, str]] = []
        for recipient in envelope.recipients:
            steps = self.plan.get(recipient, ["ok"])
            kind = steps.pop(0) if len(steps) > 1 else steps[0]
            if kind == "ok":
                delivered.append(recipient)
            elif kind == "4xx":
                deferred.append((recipient, reply(kind, recipient)))
            else:
                bounced.append((recipient, reply(kind, recipient)))
        self.delivered += delivered
        return succeed(DeliveryResult(tuple(delivered), tuple(deferred), tuple(bounced)))

    def of(self, queue_id: str) -> list[tuple[str, ...]]:
        """
        @return: the recipients of each attempt made for C{queue_id}.
        """
        return [e.recipients for e, _, _ in self.calls if e.queue_id == queue_id]

    def others(self, queue_id: str) -> list[tuple[Envelope, bytes]]:
        """
        @return: the messages sent other than C{queue_id} (the bounces).
        """
        return [(e, body) for e, body, _ in self.calls if e.queue_id != queue_id]


def message(
    recipients: tuple[str, ...] = THREE,
    *,
    sender: str = SENDER,
    list: str = "news",
    priority: int = 3,
    accepted_at: float = 0.0,
) -> Envelope:
    return Envelope(
        queue_id=f"M{next(_ids):06d}",
        list=list,
        username=f"u-{list}",
        sender=sender,
        recipients=recipients,
        priority=Priority(priority),
        accepted_at=accepted_at,
    )


def bounce_queue(
    clock: Clock, outbound: IOutbound, journal: MemoryJournal | None = None, **kwargs: Any
) -> tuple[MessageQueue, MemoryJournal, MemoryAlertSink]:
    alerts = MemoryAlertSink()
    kwargs.setdefault("hostname", HOST)
    queue, journal = make_queue(clock, outbound, journal, alerts=alerts, **kwargs)
    return queue, journal, alerts


def report_parts(raw: bytes) -> tuple[EmailMessage, list[EmailMessage], list[EmailMessage]]:
    """
    @return: a bounce read back: the message, its three parts, and the
        blocks of its delivery-status part (per message, then per recipient).
    """
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    parts = cast(list[EmailMessage], parsed.get_payload())
    blocks = cast(list[EmailMessage], parts[1].get_payload())
    return parsed, parts, blocks


class TestPerRecipient:
    def test_partial_failure_retries_only_the_deferred_recipient(self) -> None:
        """
        One recipient of three deferred: the two others took the message
        and never get it again; the next attempt, on the backoff schedule,
        is made for the deferred one alone, and the message is delivered
        once it takes it. Which recipients remain is journaled.
        """
        clock = Clock()
        clock.advance(1000)
        outbound = RecipientOutbound(clock, {B: ["4xx", "ok"]})
        queue, journal = make_queue(clock, outbound)
        queue.startService()
        env = message()
        queue.submit(env, ORIGINAL)
        assert outbound.delivered == [A, C]
        entry = queue.get(env.queue_id)
        assert entry is not None
        assert (entry.state, entry.attempts, entry.next_attempt_at) == (
            MessageState.DEFERRED,
            1,
            1060.0,
        )
        assert queue.progress(env.queue_id) == RecipientProgress((B,))
        assert journal.progress_records == [(env.queue_id, (B,), ())]
        [replayed] = journal.replay()
        assert (replayed.remaining, replayed.bounced) == ((B,), ())
        run_timers(clock)
        assert outbound.of(env.queue_id) == [THREE, (B,)]
        assert sorted(outbound.delivered) == sorted(THREE)
        assert states(journal, env.queue_id)[-1] == ("delivered", 2, 0.0)
        assert queue.progress(env.queue_id) is None
        stats = queue.stats()
        assert (stats.delivered, stats.deferred, stats.bounced) == (1, 1, 0)
        assert (stats.recipients_delivered, stats.recipients_bounced) == (3, 0)

    def test_after_a_restart_only_the_remaining_recipient_is_sent(self) -> None:
        """
        A gateway restarted after a partial failure sends the message to the
        remaining recipient only, at its journaled retry time.
        """
        first_clock = Clock()
        journal = MemoryJournal()
        first, _ = make_queue(first_clock, RecipientOutbound(first_clock, {B: ["4xx"]}), journal)
        first.startService()
        env = message()
        first.submit(env, ORIGINAL)
        # The first process is gone (its clock never moves again); a second
        # one starts on the same journal.
        clock = Clock()
        outbound = RecipientOutbound(clock)
        second, _ = make_queue(clock, outbound, journal)
        second.startService()
        assert outbound.calls == []
        assert second.progress(env.queue_id) == RecipientProgress((B,))
        run_timers(clock)
        assert outbound.of(env.queue_id) == [(B,)]
        assert [t for _, _, t in outbound.calls] == [60.0]
        assert outbound.delivered == [B]
        assert list(journal.replay()) == []

    def test_killed_during_a_retry_resends_only_the_remaining_recipient(self) -> None:
        """
        A gateway killed while retrying the remaining recipient (its state
        journaled as sending) sends again to that recipient only, counted
        as a possible duplicate; the recipients that took the message
        before never see it again.
        """
        clock = Clock()
        journal = MemoryJournal()
        outbound = RecipientOutbound(clock, {B: ["4xx"]})
        first, _ = make_queue(clock, outbound, journal)
        first.startService()
        env = message()
        first.submit(env, ORIGINAL)
        outbound.hang = True
        run_timers(clock, until=60.0)
        assert outbound.of(env.queue_id) == [THREE, (B,)]
        assert states(journal, env.queue_id)[-1] == ("sending", 1, 0.0)
        restarted_outbound = RecipientOutbound(clock)
        restarted, _ = make_queue(clock, restarted_outbound, journal)
        restarted.startService()
        assert restarted_outbound.of(env.queue_id) == [(B,)]
        assert restarted.stats().redelivered == 1
        assert outbound.delivered + restarted_outbound.delivered == [A, C, B]

    def test_cancel_forgets_the_remaining_recipients(self) -> None:
        """
        Cancelling a partly delivered message drops it with what remained
        of it, in memory and in the journal.
        """
        clock = Clock()
        queue, journal = make_queue(clock, RecipientOutbound(clock, {B: ["4xx"]}))
        queue.startService()
        env = message()
        queue.submit(env, ORIGINAL)
        assert queue.progress(env.queue_id) is not None
        queue.cancel(env.queue_id)
        assert queue.progress(env.queue_id) is None
        assert list(journal.replay()) == []

    def test_a_recipient_the_outbound_says_nothing_about_is_deferred(self) -> None:
        """
        A recipient missing from the outbound relay's result is tried again,
        never taken for delivered.
        """
        clock = Clock()

        def outcome(env: Envelope, tried: int) -> DeliveryResult:
            return DeliveryResult(delivered=env.recipients[:1])

        queue, journal = make_queue(clock, InstantOutbound(clock, outcome))
        queue.startService()
        env = message()
        queue.submit(env, ORIGINAL)
        assert queue.progress(env.queue_id) == RecipientProgress((B, C))
        assert states(journal, env.queue_id)[-1] == ("deferred", 1, 60.0)


class TestRetrySchedule:
    def test_schedule_in_minutes(self) -> None:
        """
        The documented schedule: 1, 2, 4, 8, 16, 32 minutes, then hourly.
        """
        assert [retry_delay(n) / 60 for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]

    @given(st.floats(min_value=1.0, max_value=1e6), st.floats(min_value=0.0, max_value=1.0))
    def test_jitter_stays_within_ten_percent(self, delay: float, draw: float) -> None:
        """
        Any draw in [0, 1) gives a wait within 10 % of the delay.
        """
        assume(draw < 1.0)
        assert delay * (1 - RETRY_JITTER) <= jittered(delay, draw) <= delay * (1 + RETRY_JITTER)

    def test_jitter_bounds(self) -> None:
        """
        The shortest wait is 90 % of the delay, the middle draw gives the
        delay itself, and the longest 110 %.
        """
        assert RETRY_JITTER == 0.1
        assert jittered(60.0, 0.0) == pytest.approx(54.0)
        assert jittered(60.0, 0.25) == pytest.approx(57.0)
        assert jittered(60.0, 0.5) == 60.0
        assert jittered(60.0, math.nextafter(1.0, 0.0)) == pytest.approx(66.0)

    def test_retries_of_messages_that_failed_together_spread_out(self) -> None:
        """
        Each deferral draws its own jitter from the injected source, so
        messages that failed at the same moment are retried at different
        times.
        """
        clock = Clock()
        draws = iter([0.0, 0.5, math.nextafter(1.0, 0.0)])
        outbound = RecipientOutbound(clock, {A: ["4xx"]})
        queue, journal = make_queue(clock, outbound, rng=lambda: next(draws))
        queue.startService()
        envs = [message((A,)) for _ in range(3)]
        for env in envs:
            queue.submit(env, ORIGINAL)
        due = [states(journal, env.queue_id)[-1][2] for env in envs]
        assert due[0] == pytest.approx(54.0)
        assert due[1] == 60.0
        assert due[2] == pytest.approx(66.0)

    def test_a_real_random_source_jitters_within_bounds(self) -> None:
        """
        With random.random as its source (as the gateway runs it) the queue
        jitters within 10 %; without a source it does not jitter at all.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {A: ["4xx"]})
        exact = MessageQueue(MemoryJournal(), outbound, clock)
        exact.startService()
        env = message((A,))
        exact.submit(env, ORIGINAL)
        assert cast(ScheduledEntry, exact.get(env.queue_id)).next_attempt_at == 60.0
        queue = MessageQueue(MemoryJournal(), outbound, clock, rng=random.random)
        queue.startService()
        envs = [message((A,)) for _ in range(20)]
        for env in envs:
            queue.submit(env, ORIGINAL)
        due = [cast(ScheduledEntry, queue.get(env.queue_id)).next_attempt_at for env in envs]
        assert all(54.0 <= t <= 66.0 for t in due)
        assert len(set(due)) > 1


class TestPureOutcomes:
    def test_sort_outcomes_keeps_recipient_order(self) -> None:
        """
        Recipients are sorted by outcome in the order they were tried; what
        the result says of others is ignored; one it omits is deferred.
        """
        result = DeliveryResult(
            delivered=(C, "stranger@x.example"),
            deferred=((A, "451 later"),),
            bounced=(("d@x.example", "550 no"),),
        )
        outcomes = sort_outcomes((A, B, C, "d@x.example"), result, age=0.0, max_queue_age=1.0)
        assert outcomes.delivered == (C,)
        assert outcomes.deferred == ((A, "451 later"), (B, QUEUE_NO_RESULT))
        assert outcomes.bounced == (("d@x.example", "550 no"),)
        assert outcomes.expired == ()

    def test_expiry_at_the_limit_and_one_past(self) -> None:
        """
        A deferred recipient of a message exactly max_queue_age old is still
        deferred; one second older, it expires with its last reason.
        Delivered and bounced recipients are unaffected.
        """
        result = DeliveryResult(delivered=(A,), deferred=((B, "451 later"),))
        at_limit = sort_outcomes((A, B), result, age=100.0, max_queue_age=100.0)
        past = sort_outcomes((A, B), result, age=101.0, max_queue_age=100.0)
        assert (at_limit.deferred, at_limit.expired) == (((B, "451 later"),), ())
        assert (past.deferred, past.expired) == ((), ((B, "451 later"),))
        assert past.delivered == (A,)
        assert past.failed == ((B, "451 later"),)

    def test_recipient_failure_reads_the_remote_reply(self) -> None:
        """
        A reply reported by the SMTP client gives the Remote-MTA (without
        its port) and the reply itself as the diagnostic.
        """
        failure = recipient_failure(B, reply("5xx", B), expired=False, last_attempt=5.0)
        assert failure.remote_mta == "mx.two.example"
        assert failure.diagnostic == f"550 5.1.1 <{B}>: no such user"
        assert failure.status == ""
        assert failure.last_attempt == 5.0
        ipv6 = recipient_failure(B, "[2001:db8::1]:25 said: 550 no", expired=False, last_attempt=0)
        assert ipv6.remote_mta == "[2001:db8::1]"

    def test_recipient_failure_of_a_local_reason_or_an_expiry(self) -> None:
        """
        Any other reason is the diagnostic as it is; an expired recipient
        has status 5.4.7 whatever the last reply said, which it keeps.
        """
        local = recipient_failure(B, "invalid recipient address", expired=False, last_attempt=0)
        assert (local.remote_mta, local.diagnostic) == (None, "invalid recipient address")
        expired = recipient_failure(B, reply("4xx", B), expired=True, last_attempt=0)
        assert expired.status == EXPIRED_STATUS == "5.4.7"
        assert expired.diagnostic == f"451 4.3.0 <{B}>: try again later"


class TestBounces:
    def test_a_5xx_recipient_gets_a_dsn_listing_only_it(self) -> None:
        """
        One recipient of three refused with 5xx: the others take the message
        once; the message is bounced; a bounce (RFC 3464) goes to the
        envelope sender through the queue itself, at the message's
        priority, reporting that recipient alone with the remote server's
        reply, and carrying the original's headers but not its body.
        """
        clock = Clock()
        clock.advance(1_700_000_000.0)
        outbound = RecipientOutbound(clock, {B: ["5xx"]})
        queue, journal, alerts = bounce_queue(clock, outbound, queue_ids=QueueIdGenerator(salt=7))
        queue.startService()
        env = message(priority=2, accepted_at=clock.seconds() - 30)
        queue.submit(env, ORIGINAL)
        assert outbound.of(env.queue_id) == [THREE]
        assert outbound.delivered.count(A) == outbound.delivered.count(C) == 1
        assert states(journal, env.queue_id)[-1] == ("bounced", 1, 0.0)
        [(dsn, raw)] = outbound.others(env.queue_id)
        assert (dsn.sender, dsn.recipients) == ("", (SENDER,))
        assert (dsn.list, dsn.username, dsn.priority) == ("news", DSN_USERNAME, Priority.HIGH)
        assert dsn.queue_id[11:19] == "00000007"
        parsed, parts, blocks = report_parts(raw)
        assert parsed.get_content_type() == "multipart/report"
        assert parsed.get_param("report-type") == "delivery-status"
        assert f"\r\nTo: <{SENDER}>\r\n".encode() in raw
        assert parsed["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
        assert parsed["Auto-Submitted"] == "auto-replied"
        assert parsed["Message-ID"] == f"<{dsn.queue_id}@{HOST}>"
        assert [p.get_content_type() for p in parts] == [
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers",
        ]
        per_message, *per_recipient = blocks
        assert per_message["Reporting-MTA"] == f"dns; {HOST}"
        assert per_message["X-Smtpgw-Queue-ID"] == env.queue_id
        assert per_message["Arrival-Date"] is not None
        [only] = per_recipient
        assert only["Final-Recipient"] == f"rfc822; {B}"
        assert only["Action"] == "failed"
        assert only["Status"] == "5.1.1"
        assert only["Remote-MTA"] == "dns; mx.two.example"
        assert only["Diagnostic-Code"] == f"smtp; 550 5.1.1 <{B}>: no such user"
        headers = parts[2].as_bytes()
        assert b"Subject: Quarterly newsletter" in headers
        assert BODY_MARKER not in raw
        assert A not in str(parts[1])
        assert C not in str(parts[1])
        stats = queue.stats()
        assert (stats.dsns, stats.bounced, stats.recipients_bounced) == (1, 1, 1)
        assert stats.accepted == 1
        [alert] = alerts.of_type("bounce")
        assert alert.list == "news"
        assert alert.details["queue_id"] == env.queue_id
        assert alert.details["recipients"] == [B]
        assert alert.details["reasons"] == [reply("5xx", B)]
        assert alert.details["dsn_queue_id"] == dsn.queue_id
        assert alert.details["expired"] == []

    def test_the_bounce_is_durable_before_the_outcome_is_journaled(self) -> None:
        """
        The bounce is made durable before the message is journaled as
        bounced: a crash between the two sends the bounce again rather
        than lose it.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {A: ["5xx"]})
        queue, journal, _ = bounce_queue(clock, outbound, MemoryJournal(manual=True))
        queue.startService()
        env = message((A,))
        queue.submit(env, ORIGINAL)
        journal.flush()  # the accept
        journal.flush()  # "sending"; the attempt runs and the bounce is submitted
        assert outbound.of(env.queue_id) == [(A,)]
        assert states(journal, env.queue_id) == [("sending", 0, 0.0)]
        assert len(list(journal.replay())) == 1
        journal.flush()  # the bounce's accept
        assert [m.envelope.sender for m in journal.replay()] == [SENDER, ""]
        journal.flush()  # the message's outcome, and the bounce's "sending"
        assert states(journal, env.queue_id) == [("sending", 0, 0.0), ("bounced", 1, 0.0)]

    def test_no_dsn_for_a_null_sender(self) -> None:
        """
        A message from the null sender that bounces gets no bounce; the
        admins still get the alert.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {A: ["5xx"]})
        queue, _, alerts = bounce_queue(clock, outbound)
        queue.startService()
        env = message((A,), sender="")
        queue.submit(env, ORIGINAL)
        assert outbound.others(env.queue_id) == []
        assert queue.stats().dsns == 0
        [alert] = alerts.of_type("bounce")
        assert alert.details["dsn_queue_id"] is None

    def test_no_dsn_about_a_dsn(self) -> None:
        """
        A bounce that bounces itself is reported to the admins, but no
        bounce is made about it.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {B: ["5xx"], SENDER: ["5xx"]})
        queue, _, alerts = bounce_queue(clock, outbound)
        queue.startService()
        env = message()
        queue.submit(env, ORIGINAL)
        run_timers(clock)
        [(dsn, _)] = outbound.others(env.queue_id)
        assert queue.stats().dsns == 1
        assert len(outbound.calls) == 2
        first, second = alerts.of_type("bounce")
        assert first.details["queue_id"] == env.queue_id
        assert second.details["queue_id"] == dsn.queue_id
        assert second.details["dsn_queue_id"] is None

    def test_no_dsn_about_a_delivery_report_from_a_real_sender(self) -> None:
        """
        A delivery report relayed with a non-null sender (another system's
        bounce) gets no bounce either.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {A: ["5xx"]})
        queue, _, alerts = bounce_queue(clock, outbound)
        queue.startService()
        env = message((A,))
        report = (
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n"
            b"\r\n--x--\r\n"
        )
        queue.submit(env, report)
        assert outbound.others(env.queue_id) == []
        assert len(alerts.of_type("bounce")) == 1

    def test_dsn_for_auto_generated_application_mail(self) -> None:
        """
        Application mail marked Auto-Submitted: auto-generated gets its
        bounce.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {A: ["5xx"]})
        queue, _, _ = bounce_queue(clock, outbound)
        queue.startService()
        env = message((A,))
        queue.submit(env, b"Auto-Submitted: auto-generated\r\n" + ORIGINAL)
        assert [e.recipients for e, _ in outbound.others(env.queue_id)] == [(SENDER,)]

    def test_a_bounce_that_cannot_be_queued_is_tried_again(self) -> None:
        """
        When the journal refuses the bounce, the failed recipient is kept
        and tried again later (so the bounce is not lost); the recipients
        that took the message are not sent it again.
        """
        clock = Clock()
        journal = MemoryJournal()
        accept = journal.accept
        full = [True]

        def refuse_bounces(
            envelope: Envelope, body: bytes, *, announced: bool = False
        ) -> Deferred[JournalLocation]:
            if envelope.sender == "" and full[0]:
                return fail(JournalUnavailable("disk full"))
            return accept(envelope, body, announced=announced)

        journal.accept = refuse_bounces  # type: ignore[method-assign]
        outbound = RecipientOutbound(clock, {B: ["5xx"]})
        queue, _, alerts = bounce_queue(clock, outbound, journal)
        queue.startService()
        env = message()
        queue.submit(env, ORIGINAL)
        assert queue.progress(env.queue_id) == RecipientProgress((B,))
        assert alerts.of_type("bounce") == []
        assert queue.stats().dsns == 0
        full[0] = False
        run_timers(clock)
        assert outbound.of(env.queue_id) == [THREE, (B,)]
        assert [e.recipients for e, _ in outbound.others(env.queue_id)] == [(SENDER,)]
        assert sorted(outbound.delivered) == sorted([A, C, SENDER])
        assert states(journal, env.queue_id)[-1] == ("bounced", 2, 0.0)
        assert len(alerts.of_type("bounce")) == 1

    def test_partial_bounce_then_delivery_is_journaled_as_bounced(self) -> None:
        """
        A message with one recipient bounced and one deferred keeps the
        bounced one in its journaled progress, so that after a restart the
        message ends bounced (not delivered), with no second bounce.
        """
        first_clock = Clock()
        journal = MemoryJournal()
        outbound = RecipientOutbound(first_clock, {A: ["5xx"], B: ["4xx"]})
        first, _, _ = bounce_queue(first_clock, outbound, journal)
        first.startService()
        env = message((A, B))
        first.submit(env, ORIGINAL)
        assert journal.progress_records[0] == (env.queue_id, (B,), (A,))
        clock = Clock()
        restarted_outbound = RecipientOutbound(clock)
        restarted, _, alerts = bounce_queue(clock, restarted_outbound, journal)
        restarted.startService()
        assert restarted.progress(env.queue_id) == RecipientProgress((B,), (A,))
        run_timers(clock)
        assert restarted_outbound.of(env.queue_id) == [(B,)]
        assert states(journal, env.queue_id)[-1] == ("bounced", 2, 0.0)
        assert alerts.of_type("bounce") == []
        assert restarted.stats().dsns == 0

    def test_a_host_name_that_cannot_be_written_is_refused(self) -> None:
        """
        The reporting MTA must be a host name: a queue is not made with one
        its bounces could not carry.
        """
        clock = Clock()
        with pytest.raises(ValueError, match="hostname"):
            make_queue(clock, InstantOutbound(clock), hostname="gw example\r\n")


class TestMaxQueueAge:
    def test_defaults_and_bad_values(self) -> None:
        """
        The default is 5 days; an age that is not a positive number is
        refused.
        """
        clock = Clock()
        queue, _ = make_queue(clock, InstantOutbound(clock))
        assert queue.max_queue_age == DEFAULT_MAX_QUEUE_AGE == 5 * 24 * 3600
        for bad in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="max_queue_age"):
                make_queue(clock, InstantOutbound(clock), max_queue_age=bad)

    def test_deferred_at_the_limit_bounced_one_past_it(self) -> None:
        """
        A recipient still failing when its message is exactly max_queue_age
        old is deferred again; one second later it bounces with 5.4.7
        (delivery time expired), the last reply kept in the bounce and the
        alert. The recipients delivered before are not in the bounce.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {B: ["4xx"]})
        queue, journal, alerts = bounce_queue(
            clock,
            outbound,
            max_queue_age=1000.0,
            retry=lambda n: 1000.0 if n == 1 else 1.0,
        )
        queue.startService()
        env = message(accepted_at=0.0)
        queue.submit(env, ORIGINAL)
        clock.advance(1000)
        assert outbound.of(env.queue_id) == [THREE, (B,)]
        assert states(journal, env.queue_id)[-1] == ("deferred", 2, 1001.0)
        assert outbound.others(env.queue_id) == []
        clock.advance(1)
        assert outbound.of(env.queue_id) == [THREE, (B,), (B,)]
        assert states(journal, env.queue_id)[-1] == ("bounced", 3, 0.0)
        [(_, raw)] = outbound.others(env.queue_id)
        _, parts, blocks = report_parts(raw)
        [only] = blocks[1:]
        assert only["Final-Recipient"] == f"rfc822; {B}"
        assert only["Status"] == "5.4.7"
        assert only["Action"] == "failed"
        assert only["Diagnostic-Code"] == f"smtp; 451 4.3.0 <{B}>: try again later"
        assert "could not be delivered in time" in parts[0].get_content()
        [alert] = alerts.of_type("bounce")
        assert alert.details["expired"] == [B]
        assert alert.details["reasons"] == [
            f"5.4.7 delivery time expired (last reply: {reply('4xx', B)})"
        ]
        stats = queue.stats()
        assert (stats.recipients_expired, stats.recipients_bounced, stats.bounced) == (1, 1, 1)


class TestAlerts:
    def test_delivery_alert_at_the_third_failed_attempt_only(self) -> None:
        """
        A message deferred for the third time raises one delivery alert
        naming the destination domain, its recipients and the reason; the
        second and fourth deferrals raise none.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {B: ["4xx"]})
        queue, _, alerts = bounce_queue(clock, outbound)
        queue.startService()
        env = message()
        queue.submit(env, ORIGINAL)
        run_timers(clock, until=60.0)
        assert alerts.of_type("delivery") == []
        run_timers(clock, until=180.0)
        [alert] = alerts.of_type("delivery")
        assert alert.list == "news"
        assert alert.created_at == 180.0
        assert alert.details["queue_id"] == env.queue_id
        assert alert.details["domain"] == "two.example"
        assert alert.details["attempts"] == 3
        assert alert.details["recipients"] == [B]
        assert alert.details["reasons"] == [reply("4xx", B)]
        assert alert.details["next_attempt_at"] == 420.0
        run_timers(clock, until=420.0)
        assert len(alerts.of_type("delivery")) == 1

    def test_delivery_alerts_throttled_per_list_and_domain(self) -> None:
        """
        Many messages stuck on one destination give one alert per list and
        domain per hour; the rest are counted and summed up in one alert
        when the hour is over. Another domain or another list has its own.
        """
        clock = Clock()
        slow = "x@slow.example"
        outbound = RecipientOutbound(
            clock, {slow: ["4xx"], "y@other.example": ["4xx"], "z@slow.example": ["4xx"]}
        )
        queue, _, alerts = bounce_queue(clock, outbound)
        queue.startService()
        for _ in range(5):
            queue.submit(message((slow,)), ORIGINAL)
        queue.submit(message(("y@other.example",)), ORIGINAL)
        queue.submit(message(("z@slow.example",), list="promo"), ORIGINAL)
        run_timers(clock, until=180.0)
        keys = sorted((a.list, a.details["domain"]) for a in alerts.of_type("delivery"))
        assert keys == [
            ("news", "other.example"),
            ("news", "slow.example"),
            ("promo", "slow.example"),
        ]
        # The window of the first alerts ends at 180 + 3600.
        run_timers(clock, until=3779.0)
        assert len(alerts.of_type("delivery")) == 3
        run_timers(clock, until=3780.0)
        [summary] = alerts.of_type("delivery")[3:]
        assert summary.list == "news"
        assert summary.details["domain"] == "slow.example"
        assert summary.details["suppressed"] == 4
        assert summary.details["first_at"] == summary.details["last_at"] == 180.0

    def test_held_back_alerts_are_summed_up_at_stop(self) -> None:
        """
        Stopping the queue sums up the alerts held back in open windows.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {A: ["4xx"]})
        queue, _, alerts = bounce_queue(clock, outbound)
        queue.startService()
        for _ in range(3):
            queue.submit(message((A,)), ORIGINAL)
        run_timers(clock, until=180.0)
        assert len(alerts.of_type("delivery")) == 1
        queue.stopService()
        summary = alerts.of_type("delivery")[-1]
        assert summary.details["suppressed"] == 2

    def test_throttle_window_at_the_limit_and_one_past(self) -> None:
        """
        Within the window, alerts with the key are counted; at its end a
        new alert passes and the count is summed up once.
        """
        throttle = AlertThrottle(3600.0)
        assert throttle.admit(("news", "a.example"), 100.0)
        assert not throttle.admit(("news", "a.example"), 200.0)
        assert not throttle.admit(("news", "a.example"), 3699.999)
        assert throttle.admit(("news", "b.example"), 200.0)
        assert throttle.ended(3699.999) == []
        assert throttle.admit(("news", "a.example"), 3700.0)
        assert throttle.ended(3700.0) == [
            ThrottleSummary(("news", "a.example"), 2, 200.0, 3699.999)
        ]
        assert throttle.ended(3800.0) == []
        assert throttle.flush() == []

    def test_throttle_bounds_the_keys_it_watches(self) -> None:
        """
        Past max_keys, the oldest window is summed up early.
        """
        throttle = AlertThrottle(3600.0, max_keys=2)
        for domain in ("a", "b"):
            assert throttle.admit(("l", domain), 0.0)
            assert not throttle.admit(("l", domain), 1.0)
        assert throttle.admit(("l", "c"), 2.0)
        assert throttle.ended(2.0) == [ThrottleSummary(("l", "a"), 1, 1.0, 1.0)]
        assert throttle.flush() == [
            ThrottleSummary(("l", "b"), 1, 1.0, 1.0),
        ]

    def test_throttle_window_zero_lets_everything_through(self) -> None:
        """
        A window of 0 holds nothing back.
        """
        throttle = AlertThrottle(0.0)
        assert all(throttle.admit(("l", "d"), 5.0) for _ in range(3))
        assert throttle.flush() == []

    def test_no_alert_sink_no_alerts(self) -> None:
        """
        Without an alert sink, bounces still work and nothing fails.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {A: ["5xx"]})
        queue, _ = make_queue(clock, outbound)
        queue.startService()
        queue.submit(message((A,)), ORIGINAL)
        assert queue.stats().dsns == 1


class TestJournaledPause:
    def test_pause_survives_a_restart(self) -> None:
        """
        A stopped queue is journaled as stopped: after a restart it sends
        nothing until started, and the start is journaled too.
        """
        clock = Clock()
        journal = MemoryJournal()
        queue, _ = make_queue(clock, InstantOutbound(clock), journal)
        queue.startService()
        d = queue.pause()
        assert d.called
        assert d.result is None
        assert journal.queue_records == [True]
        queue.submit(envelope(), b"x\r\n")
        outbound = InstantOutbound(clock)
        restarted, _ = make_queue(clock, outbound, journal)
        restarted.startService()
        assert restarted.paused
        assert restarted.stats().paused
        assert outbound.calls == []
        restarted.resume()
        assert journal.queue_records == [True, False]
        assert len(outbound.calls) == 1
        again, _ = make_queue(clock, InstantOutbound(clock), journal)
        again.startService()
        assert not again.paused

    def test_pause_that_cannot_be_journaled_fails_but_holds(self) -> None:
        """
        When the journal cannot record the pause, the Deferred fails with
        JournalUnavailable, and the queue is stopped all the same.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, journal = make_queue(clock, outbound)
        queue.startService()
        journal.available = False
        failures: list[Failure] = []
        queue.pause().addErrback(failures.append)
        assert [f.type for f in failures] == [JournalUnavailable]
        assert queue.paused
        journal.available = True
        queue.submit(envelope(), b"x\r\n")
        assert outbound.calls == []
        queue.pause()
        assert journal.queue_records == [True]

    def test_pause_or_resume_before_start_wins_over_the_journal(self) -> None:
        """
        A pause or a resume asked before the queue starts is what holds
        after the replay, and it is journaled once the journal runs.
        """
        clock = Clock()
        journal = MemoryJournal()
        journal.record_queue_state(True)
        outbound = InstantOutbound(clock)
        queue, _ = make_queue(clock, outbound, journal)
        assert queue.resume().called
        queue.startService()
        assert not queue.paused
        assert journal.queue_records == [True, False]
        other, _ = make_queue(clock, InstantOutbound(clock), journal)
        other.pause()
        other.startService()
        assert other.paused
        assert journal.queue_records == [True, False, True]

    def test_next_token_at(self) -> None:
        """
        Without a rate there is no token to wait for; with one, it is the
        time the next message may leave.
        """
        clock = Clock()
        unlimited, _ = make_queue(clock, InstantOutbound(clock))
        assert unlimited.next_token_at() is None
        clock.advance(5)
        outbound = InstantOutbound(clock)
        limited, _ = make_queue(clock, outbound, rate=10.0)
        limited.startService()
        assert limited.next_token_at() == 5.0
        limited.submit(envelope(), b"x\r\n")
        assert limited.next_token_at() == pytest.approx(5.1)


# The same on the file journal, across real restarts.

P = ParamSpec("P")


def real_reactor() -> IReactorThreads:
    from twisted.internet import reactor

    return cast(IReactorThreads, reactor)


@async_test
async def test_partial_failure_survives_a_restart_of_the_file_journal(tmp_path: Path) -> None:
    """
    On the file journal: after a partial failure and a restart, only the
    remaining recipient is sent the message, and nothing is left after.
    """
    reactor = real_reactor()
    clock = Clock()
    clock.advance(1000)
    outbound = RecipientOutbound(clock, {B: ["4xx"]})
    queue = MessageQueue(FileJournal(tmp_path, reactor), outbound, clock, rng=lambda: 0.5)
    queue.startService()
    env = message(accepted_at=1000.0)
    await queue.submit(env, ORIGINAL)
    await queue.stopService()
    assert outbound.delivered == [A, C]

    outbound = RecipientOutbound(clock)
    restarted = MessageQueue(FileJournal(tmp_path, reactor), outbound, clock, rng=lambda: 0.5)
    restarted.startService()
    assert restarted.progress(env.queue_id) == RecipientProgress((B,))
    entry = restarted.get(env.queue_id)
    assert entry is not None
    assert (entry.state, entry.next_attempt_at) == (MessageState.DEFERRED, 1060.0)
    clock.advance(60)
    await restarted.stopService()
    assert outbound.of(env.queue_id) == [(B,)]
    assert outbound.delivered == [B]
    last = FileJournal(tmp_path, cast(Any, Clock()))
    try:
        assert last.replay() == []
    finally:
        await last.stop()


@async_test
async def test_pause_survives_a_restart_of_the_file_journal(tmp_path: Path) -> None:
    """
    On the file journal: a stopped queue is still stopped after a restart,
    and a started one is running again after the next.
    """
    reactor = real_reactor()
    clock = Clock()
    queue = MessageQueue(FileJournal(tmp_path, reactor), InstantOutbound(clock), clock)
    queue.startService()
    await queue.pause()
    await queue.stopService()

    outbound = InstantOutbound(clock)
    restarted = MessageQueue(FileJournal(tmp_path, reactor), outbound, clock)
    restarted.startService()
    assert restarted.paused
    await restarted.submit(envelope(), b"x\r\n")
    assert outbound.calls == []
    await restarted.resume()
    await restarted.stopService()
    assert len(outbound.calls) == 1

    third = MessageQueue(FileJournal(tmp_path, reactor), InstantOutbound(clock), clock)
    third.startService()
    assert not third.paused
    await third.stopService()


def gated_envelope(gate: str = "g", priority: int = 3, list: str = "news") -> Envelope:
    env = envelope(priority, list)
    return evolve(env, username=gate)


def gate_by_username(env: Envelope) -> str | None:
    return env.username if env.username.startswith("g") else None


class Recorder:
    """
    A L{QueueObserver} that keeps what it is told.
    """

    def __init__(self) -> None:
        self.outcomes: list[MessageOutcome] = []
        self.changes: list[tuple[str, str | None]] = []

    def message_settled(self, outcome: MessageOutcome) -> None:
        self.outcomes.append(outcome)

    def gate_changed(self, gate: str, preemption: Preemption | None) -> None:
        self.changes.append((gate, None if preemption is None else preemption.reason))


def gated_queue(
    clock: Clock, outbound: IOutbound, journal: MemoryJournal | None = None, **kwargs: Any
) -> tuple[MessageQueue, MemoryJournal, Recorder]:
    queue, journal = make_queue(clock, outbound, journal, gate_of=gate_by_username, **kwargs)
    recorder = Recorder()
    queue.add_observer(recorder)
    return queue, journal, recorder


class TestTwoStepSubmit:
    def test_accept_then_schedule(self) -> None:
        """
        L{MessageQueue.accept} makes the message durable without scheduling
        it; L{MessageQueue.schedule} then schedules and sends it.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, journal = make_queue(clock, outbound)
        queue.startService()
        env = envelope()
        locations: list[JournalLocation] = []
        queue.accept(env, b"x\r\n").addCallback(locations.append)
        assert len(locations) == 1
        assert [m.envelope.queue_id for m in journal.replay()] == [env.queue_id]
        assert env.queue_id not in queue.scheduler
        assert outbound.calls == []
        queue.schedule(env, locations[0])
        assert outbound.ids == [env.queue_id]
        assert queue.stats().accepted == 1

    def test_accept_of_a_live_queue_id_is_refused_and_not_counted(self) -> None:
        """
        Accepting a queue id that is live fails with L{QueueIdInUse}, which
        is not counted as a refusal (its owner expects it after a restart);
        a full journal still is.
        """
        clock = Clock()
        queue, journal = make_queue(clock, PendingOutbound())
        queue.startService()
        env = envelope()
        queue.submit(env, b"x\r\n")
        failures: list[Failure] = []
        queue.accept(env, b"x\r\n").addErrback(failures.append)
        assert failures[0].check(QueueIdInUse)
        assert queue.stats().refused == 0
        journal.available = False
        queue.accept(envelope(), b"x\r\n").addErrback(failures.append)
        assert failures[1].check(JournalUnavailable)
        assert queue.stats().refused == 1


class TestGatesAndPreemption:
    def test_gated_messages_wait_for_their_owner(self) -> None:
        """
        A message behind a gate is not sent until the gate's owner opens
        it; closing it again holds back the next ones; plain messages go
        meanwhile.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _, _ = gated_queue(clock, outbound)
        queue.startService()
        first, second = gated_envelope(), gated_envelope()
        plain = envelope()
        for env in (first, plain):
            queue.submit(env, b"x\r\n")
        assert outbound.ids == [plain.queue_id]
        assert [e.queue_id for e in queue.gated("g")] == [first.queue_id]
        assert queue.gates() == {"g"}
        queue.open_gate("g", 3)
        assert queue.gate_is_open("g")
        assert outbound.ids == [plain.queue_id, first.queue_id]
        queue.close_gate("g")
        queue.submit(second, b"x\r\n")
        assert outbound.ids == [plain.queue_id, first.queue_id]
        queue.open_gate("g", 3)
        assert outbound.ids[-1] == second.queue_id

    def test_higher_priority_waiting_or_sending_preempts_the_gate(self) -> None:
        """
        While a priority-1 message is being sent, no gated priority-3
        message goes, though a plain priority-3 one does; observers hear
        the reason and when it ends.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, _, recorder = gated_queue(clock, outbound, preemption_grace=0.0)
        queue.startService()
        queue.open_gate("g", 3)
        urgent = envelope(priority=1)
        queue.submit(urgent, b"x\r\n")
        gated = gated_envelope()
        plain = envelope()
        queue.submit(gated, b"x\r\n")
        queue.submit(plain, b"x\r\n")
        assert outbound.started == [urgent.queue_id, plain.queue_id]
        assert not queue.gate_is_open("g")
        preemption = queue.preemption(3)
        assert preemption is not None
        assert preemption.reason == "priority-1 SMTP+ traffic"
        assert recorder.changes == [("g", "priority-1 SMTP+ traffic")]
        outbound.finish_first()
        assert outbound.started[-1] == gated.queue_id
        assert recorder.changes[-1] == ("g", None)
        assert queue.preemption(3) is None

    def test_grace_at_its_end_and_one_past(self) -> None:
        """
        After the last priority-1 message finished, the gate stays closed
        for the grace period: a priority-1 message arriving just before its
        end still goes before any gated one; at its end the gate opens by
        itself (a timer), so one arriving just after finds a gated one gone.
        """
        grace = 1.0
        clock = Clock()
        outbound = PendingOutbound()
        queue, _, _ = gated_queue(clock, outbound, preemption_grace=grace, concurrency=1)
        queue.startService()
        queue.open_gate("g", 3)
        gated = [gated_envelope() for _ in range(3)]
        first = envelope(priority=1)
        queue.submit(first, b"x\r\n")
        for env in gated:
            queue.submit(env, b"x\r\n")
        clock.advance(5)
        outbound.finish_first()
        done_at = clock.seconds()
        run_timers(clock, done_at + grace - 0.001)
        assert outbound.started == [first.queue_id]
        preemption = queue.preemption(3)
        assert preemption is not None
        assert preemption.until == done_at + grace
        assert preemption.reason == "priority-1 SMTP+ traffic"
        second = envelope(priority=1)
        queue.submit(second, b"x\r\n")
        assert outbound.started == [first.queue_id, second.queue_id]
        outbound.finish_first()
        done_at = clock.seconds()
        run_timers(clock, done_at + grace - 0.001)
        assert outbound.started == [first.queue_id, second.queue_id]
        run_timers(clock, done_at + grace)
        assert outbound.started == [first.queue_id, second.queue_id, gated[0].queue_id]
        assert queue.preemption(3) is None
        clock.advance(0.001)
        third = envelope(priority=1)
        queue.submit(third, b"x\r\n")
        outbound.finish_first()
        assert outbound.started[2:] == [gated[0].queue_id, third.queue_id]

    def test_a_burst_one_after_another_goes_before_any_gated_message(self) -> None:
        """
        Twenty priority-1 messages submitted one after another, each
        finished well within the grace before the next arrives, all go
        before any further gated message, though gated ones wait all along;
        then the gated ones go.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, _, _ = gated_queue(clock, outbound, rate=100, preemption_grace=0.5)
        queue.startService()
        queue.open_gate("g", 3)
        before = [gated_envelope() for _ in range(5)]
        for env in before:
            queue.submit(env, b"x\r\n")
        while outbound.pending:
            outbound.finish_first()
        run_timers(clock)
        urgent = [envelope(priority=1) for _ in range(20)]
        queue.submit(urgent[0], b"x\r\n")
        waiting = [gated_envelope() for _ in range(10)]
        for env in waiting:
            queue.submit(env, b"x\r\n")
        for env in urgent[1:]:
            run_timers(clock, clock.seconds() + 0.05)
            while outbound.pending:
                outbound.finish_first()
            clock.advance(0.4)
            queue.submit(env, b"x\r\n")
        run_timers(clock, clock.seconds() + 0.05)
        while outbound.pending:
            outbound.finish_first()
        assert outbound.started == [e.queue_id for e in before + urgent]
        run_timers(clock)
        while outbound.pending:
            outbound.finish_first()
            run_timers(clock)
        assert outbound.started[25:] == [e.queue_id for e in waiting]

    def test_a_higher_priority_gate_preempts_a_lower_one(self) -> None:
        """
        Messages of an open gate of priority 2 keep a gate of priority 3
        closed, with the reason of a console send; an owner-closed gate of
        priority 2 does not.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, _, recorder = gated_queue(clock, outbound, preemption_grace=0.0, concurrency=1)
        queue.startService()
        high = gated_envelope("g-high", priority=2)
        low = gated_envelope("g-low", priority=3)
        queue.submit(high, b"x\r\n")
        queue.submit(low, b"x\r\n")
        queue.open_gate("g-low", 3)
        assert outbound.started == [low.queue_id]
        outbound.finish_first()
        queue.open_gate("g-high", 2)
        later = gated_envelope("g-low")
        queue.submit(later, b"x\r\n")
        assert outbound.started == [low.queue_id, high.queue_id]
        assert recorder.changes == [("g-low", "priority-2 console send")]
        assert not queue.gate_is_open("g-low")
        outbound.finish_first()
        assert outbound.started == [low.queue_id, high.queue_id, later.queue_id]
        assert recorder.changes[-1] == ("g-low", None)

    def test_outcomes_reach_observers(self) -> None:
        """
        Observers hear of deliveries, bounces (which recipients), deferrals
        and cancels, with the gate of the message.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {B: ["4xx"], C: ["5xx"]})
        queue, _, recorder = gated_queue(clock, outbound, hostname=HOST)
        queue.startService()
        queue.open_gate("g", 3)
        delivered = evolve(gated_envelope(), recipients=(A,))
        deferred = evolve(gated_envelope(), recipients=(B,))
        bounced = evolve(gated_envelope(), recipients=(C,), sender="")
        for env in (delivered, deferred, bounced):
            queue.submit(env, ORIGINAL)
        queue.close_gate("g")
        cancelled = gated_envelope()
        queue.submit(cancelled, ORIGINAL)
        queue.cancel(cancelled.queue_id)
        got = {(o.queue_id, o.state, o.gate, o.delivered, o.bounced) for o in recorder.outcomes}
        assert got == {
            (delivered.queue_id, MessageState.DELIVERED, "g", (A,), ()),
            (deferred.queue_id, MessageState.DEFERRED, "g", (), ()),
            (bounced.queue_id, MessageState.BOUNCED, "g", (), (C,)),
            (cancelled.queue_id, MessageState.CANCELLED, "g", (), ()),
        }

    def test_observers_hear_of_a_delivery_once_it_is_durable(self) -> None:
        """
        A delivery is journaled unhurried, and its observers (a campaign's
        counts) hear of it only once that record is durable: a crash before
        then makes the attempt again, and they must not count it twice. A
        bounce is journaled urgently (lost, it would be reported again).
        """
        clock = Clock()
        outbound = RecipientOutbound(clock, {C: ["5xx"]})
        journal = MemoryJournal(manual=True)
        queue, _, recorder = gated_queue(clock, outbound, journal, hostname=HOST)
        queue.startService()
        queue.open_gate("g", 3)
        delivered = evolve(gated_envelope(), recipients=(A,))
        bounced = evolve(gated_envelope(), recipients=(C,), sender="")
        for env in (delivered, bounced):
            queue.submit(env, ORIGINAL)
        journal.flush()  # the accepts; the attempts start
        journal.flush()  # "sending"; both attempts run
        assert states(journal, delivered.queue_id) == [("sending", 0, 0.0)]
        assert recorder.outcomes == []
        journal.flush()  # the outcomes
        assert states(journal, delivered.queue_id)[-1] == ("delivered", 1, 0.0)
        assert states(journal, bounced.queue_id)[-1] == ("bounced", 1, 0.0)
        got = {(o.queue_id, o.state) for o in recorder.outcomes}
        assert got == {
            (delivered.queue_id, MessageState.DELIVERED),
            (bounced.queue_id, MessageState.BOUNCED),
        }
        assert journal.unhurried == [delivered.queue_id]

    def test_replay_puts_messages_behind_their_gates_and_counts_redeliveries(self) -> None:
        """
        After a restart, journaled messages are behind their gates again
        (closed until opened), and those found being sent are counted per
        gate.
        """
        clock = Clock()
        outbound = PendingOutbound()
        queue, journal, _ = gated_queue(clock, outbound)
        queue.startService()
        queue.open_gate("g", 3)
        flying, waiting = gated_envelope(), gated_envelope()
        queue.submit(flying, b"x\r\n")
        queue.close_gate("g")
        queue.submit(waiting, b"x\r\n")
        assert outbound.started == [flying.queue_id]

        outbound = PendingOutbound()
        restarted, _, _ = gated_queue(clock, outbound, journal)
        restarted.startService()
        assert sorted(e.queue_id for e in restarted.gated("g")) == sorted(
            [flying.queue_id, waiting.queue_id]
        )
        assert restarted.redelivered_in("g") == 1
        assert restarted.redelivered_in("other") == 0
        assert outbound.started == []
        restarted.open_gate("g", 3)
        assert outbound.started == [flying.queue_id, waiting.queue_id]

    def test_forget_gate_closes_it(self) -> None:
        """
        A forgotten gate is closed, like one never opened.
        """
        clock = Clock()
        outbound = InstantOutbound(clock)
        queue, _, _ = gated_queue(clock, outbound)
        queue.startService()
        queue.open_gate("g", 3)
        queue.forget_gate("g")
        queue.submit(gated_envelope(), b"x\r\n")
        assert outbound.calls == []
        assert not queue.gate_is_open("g")

    def test_bad_grace_is_refused(self) -> None:
        """
        A negative or infinite grace is refused.
        """
        clock = Clock()
        for grace in (-1.0, math.inf, math.nan):
            with pytest.raises(ValueError, match="preemption_grace"):
                make_queue(clock, InstantOutbound(clock), preemption_grace=grace)
        assert DEFAULT_PREEMPTION_GRACE == 0.05


def gated_message(
    recipient: str, gate: str = "g7", list: str = "news", priority: int = 3
) -> Envelope:
    """
    A one-recipient message behind C{gate} (as a console send's), from
    L{SENDER}.
    """
    return Envelope(
        queue_id=f"M{next(_ids):06d}",
        list=list,
        username=gate,
        sender=SENDER,
        recipients=(recipient,),
        priority=Priority(priority),
        accepted_at=0.0,
    )


def bouncing_gated_queue(
    clock: Clock, window: float = 600.0
) -> tuple[MessageQueue, RecipientOutbound, MemoryAlertSink, Recorder]:
    """
    A running queue whose gate C{g7} ("console send 7") and C{g8} are open,
    where every address at C{bad.example} bounces.
    """
    outbound = RecipientOutbound(clock)
    queue, _, alerts = bounce_queue(
        clock, outbound, gate_of=gate_by_username, gate_bounce_window=window
    )
    recorder = Recorder()
    queue.add_observer(recorder)
    queue.startService()
    queue.open_gate("g7", 3, label="console send 7")
    queue.open_gate("g8", 3, label="console send 8")
    return queue, outbound, alerts, recorder


def bounce_behind(
    queue: MessageQueue, outbound: RecipientOutbound, n: int, gate: str = "g7"
) -> list[str]:
    """
    Submit C{n} messages behind C{gate}, each to a recipient that bounces.
    """
    recipients = []
    for _ in range(n):
        recipient = f"r{next(_ids)}@bad.example"
        outbound.plan[recipient] = ["5xx"]
        queue.submit(gated_message(recipient, gate), ORIGINAL)
        recipients.append(recipient)
    return recipients


class TestGatedBounces:
    def test_a_bounce_behind_a_gate_gets_no_dsn_and_plain_mail_still_does(self) -> None:
        """
        A message behind a gate (a console send's) that bounces sends no
        report to its sender: the gate's owner hears of the recipient in
        the outcome, and one C{bounce} alert names the gate's label, the
        list, the recipient and the reason. SMTP+ mail that bounces in the
        same queue still gets its DSN and its alert per message.
        """
        clock = Clock()
        clock.advance(1000.0)
        queue, outbound, alerts, recorder = bouncing_gated_queue(clock)
        [recipient] = bounce_behind(queue, outbound, 1)
        [gated] = [e for e, _, _ in outbound.calls]
        assert outbound.others(gated.queue_id) == []
        assert queue.stats().dsns == 0
        assert queue.stats().recipients_bounced == 1
        assert queue.get(gated.queue_id) is None
        [outcome] = recorder.outcomes
        assert (outcome.state, outcome.gate, outcome.bounced) == (
            MessageState.BOUNCED,
            "g7",
            (recipient,),
        )
        [alert] = alerts.of_type("bounce")
        assert alert.list == "news"
        assert alert.message == (
            f"console send 7 (list news): recipient {recipient} bounced:"
            f" {reply('5xx', recipient)}; its next bounces are summed up every 10 minutes"
        )
        assert alert.details["gate"] == "g7"
        assert alert.details["count"] == 1
        assert alert.details["recipients"] == [recipient]
        assert alert.details["reasons"] == [reply("5xx", recipient)]
        assert alert.details["queue_ids"] == [gated.queue_id]
        assert alert.details["sender"] == SENDER
        assert "dsn_queue_id" not in alert.details

        plain = message((A,))
        outbound.plan[A] = ["5xx"]
        queue.submit(plain, ORIGINAL)
        [(dsn, _)] = outbound.others(plain.queue_id)[1:]
        assert (dsn.sender, dsn.recipients, dsn.username) == ("", (SENDER,), DSN_USERNAME)
        assert queue.stats().dsns == 1
        plain_alert = alerts.of_type("bounce")[-1]
        assert len(alerts.of_type("bounce")) == 2
        assert plain_alert.details["queue_id"] == plain.queue_id
        assert plain_alert.details["dsn_queue_id"] == dsn.queue_id

    def test_an_expired_message_behind_a_gate_gets_no_dsn(self) -> None:
        """
        A recipient behind a gate still failing once the message is too old
        bounces without a report either; the alert gives the expiry.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock)
        queue, _, alerts = bounce_queue(
            clock, outbound, gate_of=gate_by_username, max_queue_age=100.0
        )
        queue.startService()
        queue.open_gate("g7", 3, label="console send 7")
        outbound.plan[A] = ["4xx"]
        env = gated_message(A)
        queue.submit(env, ORIGINAL)
        run_timers(clock, until=200.0)
        assert queue.get(env.queue_id) is None
        assert outbound.others(env.queue_id) == []
        assert queue.stats().dsns == 0
        [alert] = alerts.of_type("bounce")
        assert alert.details["reasons"][0].startswith(f"{EXPIRED_STATUS} delivery time expired")

    def test_a_burst_of_bounces_gives_one_alert_per_window(self) -> None:
        """
        A burst of bounces behind one gate raises one alert at once; those
        that follow within the window (up to its very end) are summed up in
        one alert when it ends, which opens the next window: a bounce just
        past the end is held for that one. A window without bounces ends
        quietly, and the next bounce is alerted at once again.
        """
        clock = Clock()
        queue, outbound, alerts, _ = bouncing_gated_queue(clock, window=600.0)
        first = bounce_behind(queue, outbound, 3)
        assert len(alerts.of_type("bounce")) == 1
        run_timers(clock, until=599.999)
        at_the_edge = bounce_behind(queue, outbound, 1)
        assert len(alerts.of_type("bounce")) == 1
        run_timers(clock, until=600.0)
        [_, summary] = alerts.of_type("bounce")
        assert summary.created_at == 600.0
        assert summary.message == (
            "console send 7 (list news): 3 more recipients bounced in the last 10 minutes"
        )
        assert summary.details["count"] == 3
        assert summary.details["recipients"] == [*first[1:], *at_the_edge]
        assert summary.details["reasons"] == [reply("5xx", r) for r in first[1:] + at_the_edge]
        assert (summary.details["first_at"], summary.details["last_at"]) == (0.0, 599.999)

        run_timers(clock, until=600.001)
        one_past = bounce_behind(queue, outbound, 1)
        assert len(alerts.of_type("bounce")) == 2
        run_timers(clock, until=1199.999)
        assert len(alerts.of_type("bounce")) == 2
        run_timers(clock, until=1200.0)
        third = alerts.of_type("bounce")[2]
        assert third.details["recipients"] == one_past
        assert third.message.endswith(": 1 more recipient bounced in the last 10 minutes")

        run_timers(clock, until=1800.0)
        assert len(alerts.of_type("bounce")) == 3
        assert clock.getDelayedCalls() == []
        later = bounce_behind(queue, outbound, 1)
        fourth = alerts.of_type("bounce")[3]
        assert fourth.created_at == 1800.0
        assert fourth.details["recipients"] == later
        assert "bounced: " in fourth.message

    def test_summed_up_alerts_name_a_few_examples(self) -> None:
        """
        A window with many bounces sums them up with their count and at
        most L{MAX_BOUNCE_EXAMPLES} example recipients and reasons.
        """
        clock = Clock()
        queue, outbound, alerts, _ = bouncing_gated_queue(clock)
        bounce_behind(queue, outbound, 1)
        held = bounce_behind(queue, outbound, MAX_BOUNCE_EXAMPLES + 1)
        run_timers(clock, until=600.0)
        summary = alerts.of_type("bounce")[-1]
        assert summary.details["count"] == MAX_BOUNCE_EXAMPLES + 1
        assert summary.details["recipients"] == held[:MAX_BOUNCE_EXAMPLES]
        assert len(summary.details["reasons"]) == MAX_BOUNCE_EXAMPLES

    def test_each_gate_has_its_own_window(self) -> None:
        """
        Bounces behind another gate raise their own alert at once.
        """
        clock = Clock()
        queue, outbound, alerts, _ = bouncing_gated_queue(clock)
        bounce_behind(queue, outbound, 2, gate="g7")
        bounce_behind(queue, outbound, 2, gate="g8")
        labels = [a.message.split(" (")[0] for a in alerts.of_type("bounce")]
        assert labels == ["console send 7", "console send 8"]

    def test_held_back_gate_bounces_are_summed_up_at_stop(self) -> None:
        """
        Stopping the queue sums up the bounces held back in open windows
        and leaves no timer behind.
        """
        clock = Clock()
        queue, outbound, alerts, _ = bouncing_gated_queue(clock)
        bounce_behind(queue, outbound, 3)
        clock.advance(60.0)
        queue.stopService()
        summary = alerts.of_type("bounce")[-1]
        assert len(alerts.of_type("bounce")) == 2
        assert summary.message.endswith(": 2 more recipients bounced in the last 60 seconds")
        assert clock.getDelayedCalls() == []

    def test_a_window_of_zero_alerts_every_bounce(self) -> None:
        """
        With no window, each bounced message behind a gate raises its
        alert (still without a report to the sender).
        """
        clock = Clock()
        queue, outbound, alerts, _ = bouncing_gated_queue(clock, window=0.0)
        bounce_behind(queue, outbound, 3)
        assert len(alerts.of_type("bounce")) == 3
        assert "summed up" not in alerts.of_type("bounce")[0].message
        assert queue.stats().dsns == 0
        assert clock.getDelayedCalls() == []

    def test_a_gate_without_a_label_is_named_by_its_name(self) -> None:
        """
        An owner that gave no label has its gate named as it is.
        """
        clock = Clock()
        outbound = RecipientOutbound(clock)
        queue, _, alerts = bounce_queue(clock, outbound, gate_of=gate_by_username)
        queue.startService()
        queue.open_gate("g9", 3)
        bounce_behind(queue, outbound, 1, gate="g9")
        assert alerts.of_type("bounce")[0].message.startswith("g9 (list news): ")
        assert queue.gate_label("g9") == "g9"

    def test_bad_bounce_window_is_refused(self) -> None:
        clock = Clock()
        for window in (-1.0, math.inf, math.nan):
            with pytest.raises(ValueError, match="gate_bounce_window"):
                make_queue(clock, InstantOutbound(clock), gate_bounce_window=window)


class AnnouncingJournal(MemoryJournal):
    """
    A memory journal that notes which messages were said to be announced.
    """

    def __init__(self) -> None:
        super().__init__()
        self.announced: list[tuple[str, bool]] = []

    def accept(
        self, envelope: Envelope, body: bytes, *, announced: bool = False
    ) -> Deferred[JournalLocation]:
        self.announced.append((envelope.queue_id, announced))
        return super().accept(envelope, body, announced=announced)


def test_only_a_sessions_message_is_announced_to_the_journal() -> None:
    """
    A message a session submits was counted among those about to come: it
    is announced to the journal, whose writer then need not guess for it.
    A message accepted by other means (a console send's) is not.
    """
    clock = Clock()
    journal = AnnouncingJournal()
    queue, _ = make_queue(clock, InstantOutbound(clock), journal)
    queue.startService()
    session, console = envelope(queue_id="Q1"), envelope(queue_id="Q2")
    queue.submit(session, b"a\r\n")
    queue.accept(console, b"b\r\n")
    assert journal.announced == [("Q1", True), ("Q2", False)]
    queue.stopService()
