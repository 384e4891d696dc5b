"""
Tests for L{smtpgw.queue}: the queue ties journal, scheduler and outbound
together — durable before acknowledged, dispatched in priority order within
rate and concurrency, retried with backoff, rebuilt from the journal at start.
All in memory on a L{Clock}.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from twisted.application.service import IService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpgw.interfaces import (
    DeliveryResult,
    IJournal,
    IMessageQueue,
    IOutbound,
    JournalUnavailable,
)
from smtpgw.journal import QueueIdInUse
from smtpgw.memjournal import MemoryJournal
from smtpgw.model import Envelope, MessageState, Priority
from smtpgw.queue import (
    RETRY_BASE,
    RETRY_MAX,
    MessageQueue,
    TokenBucket,
    retry_delay,
)
from smtpgw.scheduler import InvalidTransition, UnknownMessage

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

        def refuse(entry: object) -> None:
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
        queue.submit(envelope(), b"x\r\n")
        assert len(queue.scheduler) == 0
        assert queue.stats().delivered == 1

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
