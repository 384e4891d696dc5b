"""
Tests for L{smtpgw.control}: queue control as a Python API on a real
L{MessageQueue} (memory journal, a relay whose deliveries wait for the
test, a L{Clock}), and the same over a real AMP connection on a UNIX socket
in a temporary directory, with the blocking client the CLI uses.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorUNIX
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from zope.interface import implementer

from smtpgw.campaigns import (
    ADMIN_PAUSE_REASON,
    campaign_gate,
    campaign_label,
    campaign_queue_id,
    campaign_username,
)
from smtpgw.control import (
    MAX_QUEUE_ID_LENGTH,
    BadArgument,
    ControlClient,
    ControlService,
    ControlSocketError,
    GatewayUnreachable,
    ListQueue,
    NoSuchMessage,
    NotAllowed,
    NotDurable,
    QueueControl,
    control_socket_path,
)
from smtpgw.interfaces import DeliveryResult, IOutbound, JournalLocation, JournalUnavailable
from smtpgw.memjournal import MemoryJournal
from smtpgw.model import Envelope, MessageState, Priority
from smtpgw.queue import DEFAULT_PREEMPTION_GRACE, MessageQueue
from smtpgw.queueinfo import (
    MAX_LIST_LIMIT,
    MAX_LISTED_RECIPIENTS,
    MessageChange,
    QueueFilter,
    QueueListing,
    Throttle,
    Why,
)

NOW = 1_700_000_000.0
T = TypeVar("T")
P = ParamSpec("P")
_ids = itertools.count(1)


def async_test(test: Callable[P, Any]) -> Callable[P, Deferred[None]]:
    """
    L{pytest_twisted.ensureDeferred}, typed.
    """
    wrapped: Callable[P, Deferred[None]] = pytest_twisted.ensureDeferred(test)
    return wrapped


@implementer(IOutbound)
class PendingOutbound:
    """
    Each delivery waits until the test ends it.
    """

    def __init__(self) -> None:
        self.pending: dict[str, tuple[Envelope, Deferred[DeliveryResult]]] = {}

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        d: Deferred[DeliveryResult] = Deferred()
        self.pending[envelope.queue_id] = (envelope, d)
        return d

    def deliver_now(self, queue_id: str) -> None:
        envelope, d = self.pending.pop(queue_id)
        d.callback(DeliveryResult(delivered=envelope.recipients))

    def defer_now(self, queue_id: str) -> None:
        envelope, d = self.pending.pop(queue_id)
        d.callback(DeliveryResult(deferred=tuple((r, "try later") for r in envelope.recipients)))


class Harness:
    """
    A started queue with its control, on a clock at L{NOW}.
    """

    def __init__(
        self,
        rate: float = 0.0,
        concurrency: int = 1,
        journal: MemoryJournal | None = None,
        gate_of: Callable[[Envelope], str | None] | None = None,
        preemption_grace: float = DEFAULT_PREEMPTION_GRACE,
        **control_options: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.journal = journal or MemoryJournal()
        self.outbound = PendingOutbound()
        self.queue = MessageQueue(
            self.journal,
            self.outbound,
            self.clock,
            rate=rate,
            concurrency=concurrency,
            gate_of=gate_of,
            preemption_grace=preemption_grace,
        )
        self.control = QueueControl(self.queue, self.journal, self.clock, **control_options)
        self.queue.startService()

    def submit(
        self,
        priority: int = 3,
        list: str = "news",
        username: str | None = None,
        recipients: int = 2,
    ) -> str:
        queue_id = f"{int(NOW * 1000):011X}0000{next(_ids):05X}"
        envelope = Envelope(
            queue_id=queue_id,
            list=list,
            username=username or f"u-{list}",
            sender=f"app@{list}.example",
            recipients=tuple(f"r{n}@example.org" for n in range(recipients)),
            priority=Priority(priority),
            accepted_at=NOW - 60,
        )
        result(self.queue.submit(envelope, b"Subject: hi\r\n\r\nhello\r\n"))
        return queue_id

    def records(self, queue_id: str) -> list[tuple[str, int, float]]:
        return [(s, a, t) for q, s, a, t in self.journal.state_records if q == queue_id]

    def submit_to_send(self, campaign_id: int = 7) -> str:
        """
        Submit one message of console send C{campaign_id}, as its runner
        does (behind the send's gate, when the queue has gates).
        """
        queue_id = campaign_queue_id(campaign_id, next(_ids))
        envelope = Envelope(
            queue_id=queue_id,
            list="news",
            username=campaign_username(campaign_id),
            sender="news@news.example",
            recipients=("r@example.org",),
            priority=Priority.NORMAL,
            accepted_at=NOW,
        )
        result(self.queue.submit(envelope, b"Subject: news\r\n\r\nhello\r\n"))
        return queue_id


def result(d: Deferred[T]) -> T:
    """
    The result of a Deferred that has fired with success.
    """
    results: list[T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the Deferred has not fired"
    return results[0]


def failure(d: Deferred[Any]) -> BaseException:
    """
    The exception of a Deferred that has failed.
    """
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred did not fail"
    assert failures[0].value is not None
    return failures[0].value


def why_of(h: Harness, queue_id: str) -> Why:
    return result(h.control.why(queue_id))


class TestWhy:
    """
    "Why is it waiting" on a real queue, for each throttle.
    """

    def test_being_sent(self) -> None:
        """
        The message handed to the relay is being sent now.
        """
        h = Harness()
        sending = h.submit()
        why = why_of(h, sending)
        assert (why.state, why.throttle, why.reason) == (
            MessageState.SENDING,
            Throttle.SENDING,
            "being sent now",
        )

    def test_concurrency_limit(self) -> None:
        """
        With the only delivery slot taken, the next message waits for the
        concurrency limit, first in line.
        """
        h = Harness(concurrency=1)
        h.submit()
        waiting = h.submit()
        why = why_of(h, waiting)
        assert why.throttle is Throttle.CONCURRENCY
        assert why.reason == "concurrency limit (--concurrency 1 deliveries under way)"
        assert why.position == 0

    def test_rate_limit(self) -> None:
        """
        With a free slot but no rate token left, the message waits for the
        rate limit.
        """
        h = Harness(rate=0.5, concurrency=5)
        h.submit()
        waiting = h.submit()
        why = why_of(h, waiting)
        assert (why.throttle, why.reason) == (Throttle.RATE, "rate limit (--rate 0.5/s)")
        assert why.position == 0

    def test_higher_priority(self) -> None:
        """
        A normal message behind two very-high ones waits for them, and
        counts them.
        """
        h = Harness(concurrency=1)
        h.submit(priority=1)
        h.submit(priority=1)
        h.submit(priority=1)
        normal = h.submit(priority=3)
        why = why_of(h, normal)
        assert why.throttle is Throttle.HIGHER_PRIORITY
        assert why.reason == "waiting for higher-priority messages (2)"
        assert why.position == 2

    def test_stopped(self) -> None:
        """
        After stop, a waiting message says the queue is stopped, and has no
        estimate; after start it no longer does.
        """
        h = Harness(concurrency=1)
        h.submit()
        waiting = h.submit()
        result(h.control.stop())
        why = why_of(h, waiting)
        assert (why.throttle, why.reason) == (Throttle.STOPPED, "queue stopped by an admin")
        assert why.estimated_send_at is None
        result(h.control.start())
        assert why_of(h, waiting).throttle is Throttle.CONCURRENCY

    def test_held(self) -> None:
        """
        A held message says so.
        """
        h = Harness(concurrency=1)
        h.submit()
        held = h.submit()
        result(h.control.hold(held))
        why = why_of(h, held)
        assert (why.state, why.throttle, why.reason) == (
            MessageState.HELD,
            Throttle.HELD,
            "held",
        )

    def test_deferred(self) -> None:
        """
        After a temporary failure, the message is deferred until its next
        attempt, which is its estimated send time.
        """
        h = Harness()
        queue_id = h.submit()
        h.outbound.defer_now(queue_id)
        why = why_of(h, queue_id)
        assert why.state is MessageState.DEFERRED
        assert why.throttle is Throttle.DEFERRED
        assert why.reason == "deferred until 2023-11-14T22:14:20Z after 1 attempt"
        assert why.estimated_send_at == NOW + 60

    def test_deferred_and_due(self) -> None:
        """
        Once its time has come (and the relay is busy), a deferred message
        is back in line.
        """
        h = Harness(concurrency=1)
        deferred = h.submit()
        h.outbound.defer_now(deferred)
        busy = h.submit()
        h.clock.advance(60)
        assert busy in h.outbound.pending
        why = why_of(h, deferred)
        assert why.state is MessageState.QUEUED
        assert why.throttle is Throttle.CONCURRENCY

    def test_next_to_go(self) -> None:
        """
        A message nothing holds is next to go, now (here the queue service
        is stopped, so it stays in line).
        """
        h = Harness()
        h.queue.stopService()
        queue_id = h.submit()
        why = why_of(h, queue_id)
        assert (why.throttle, why.reason, why.position) == (Throttle.NEXT, "next to go", 0)
        assert why.estimated_send_at == NOW

    def test_round_robin_position_across_lists(self) -> None:
        """
        Behind one message being sent, lists take turns: a1 b1 a2 a3 b2,
        and the positions say so.
        """
        h = Harness(concurrency=1)
        h.submit(list="z")
        a1 = h.submit(list="a")
        a2 = h.submit(list="a")
        b1 = h.submit(list="b")
        a3 = h.submit(list="a")
        b2 = h.submit(list="b")
        positions = {q: why_of(h, q).position for q in (a1, a2, a3, b1, b2)}
        assert positions == {a1: 0, b1: 1, a2: 2, b2: 3, a3: 4}

    def test_positions_are_the_dispatch_order_after_admin_changes(self) -> None:
        """
        After holds, releases and re-prioritizations (which move messages
        to the end of their lane) and after the round-robin has moved on,
        every position, in "why" and in a listing, is the index at which the
        queue then hands the message to the relay.
        """
        h = Harness(rate=1.0, concurrency=1)
        first = h.submit(list="a")
        queued = [h.submit(list=name) for name in "aabbcacb"]
        result(h.control.hold(queued[0]))
        result(h.control.reprioritize(queued[3], 2))
        result(h.control.reprioritize(queued[2], 4))
        result(h.control.release(queued[0]))
        result(h.control.hold(queued[5]))
        positions: dict[str, int] = {}
        for queue_id in queued:
            position = why_of(h, queue_id).position
            if queue_id != queued[5]:
                assert position is not None
                positions[queue_id] = position
        rows = result(h.control.listing(QueueFilter(state=MessageState.QUEUED))).rows
        estimated = {r.queue_id: r.estimated_send_at for r in rows}
        dispatched: list[str] = []
        h.outbound.deliver_now(first)
        for _ in queued:
            h.clock.advance(1.0)
            for queue_id in list(h.outbound.pending):
                h.outbound.deliver_now(queue_id)
                dispatched.append(queue_id)
        assert sorted(dispatched) == sorted(positions)
        assert positions == {q: n for n, q in enumerate(dispatched)}
        # At --rate 1, one more second per message ahead.
        assert estimated == {q: NOW + n for q, n in positions.items()}

    def test_unknown_message(self) -> None:
        """
        A queue id that is not in the queue is named, and the reason given.
        """
        h = Harness()
        with pytest.raises(NoSuchMessage, match="no message NOPE in the queue"):
            why_of(h, "NOPE")

    @pytest.mark.parametrize("queue_id", ["", "x" * (MAX_QUEUE_ID_LENGTH + 1), "a\nb"])
    def test_bad_queue_id(self, queue_id: str) -> None:
        """
        An empty, overlong or unprintable queue id is bad input.
        """
        h = Harness()
        with pytest.raises(BadArgument, match="is not a queue id"):
            why_of(h, queue_id)

    def test_longest_queue_id_is_looked_up(self) -> None:
        """
        A queue id at the length limit is looked up (and not found).
        """
        h = Harness()
        with pytest.raises(NoSuchMessage):
            why_of(h, "x" * MAX_QUEUE_ID_LENGTH)


class TestWhyConsoleSend:
    """
    "Why is it waiting" for a console send's message: what holds it is its
    send's gate, when that holds all of them.
    """

    def send_harness(self, **options: Any) -> Harness:
        h = Harness(gate_of=campaign_gate, **options)
        h.queue.open_gate(campaign_username(7), Priority.NORMAL, label=campaign_label(7))
        return h

    def test_pre_empted_by_priority_1_traffic(self) -> None:
        """
        While priority-1 SMTP+ mail is being sent, and for the grace period
        after, the send's message waits for it: it is not in line (no
        position) and has no estimate. Once the grace is over it goes.
        """
        h = self.send_harness(concurrency=2, preemption_grace=1.0)
        urgent = h.submit(priority=1)
        waiting = h.submit_to_send()
        why = why_of(h, waiting)
        assert (why.state, why.throttle, why.reason) == (
            MessageState.QUEUED,
            Throttle.CONSOLE_SEND_PAUSED,
            "console send 7 is paused: priority-1 SMTP+ traffic",
        )
        assert (why.position, why.estimated_send_at) == (None, None)
        h.outbound.deliver_now(urgent)
        h.clock.advance(0.999)
        assert why_of(h, waiting).throttle is Throttle.CONSOLE_SEND_PAUSED
        h.clock.advance(0.001)
        assert why_of(h, waiting).throttle is Throttle.SENDING

    def test_paused_by_an_admin(self) -> None:
        """
        A send its owner closed says why, even while the queue is stopped.
        """
        h = self.send_harness()
        h.queue.close_gate(campaign_username(7), ADMIN_PAUSE_REASON)
        waiting = h.submit_to_send()
        why = why_of(h, waiting)
        assert (why.throttle, why.reason, why.position) == (
            Throttle.CONSOLE_SEND_PAUSED,
            "console send 7 is paused: paused by an admin",
            None,
        )
        result(h.control.stop())
        assert why_of(h, waiting).reason == "console send 7 is paused: paused by an admin"

    def test_queue_stopped(self) -> None:
        """
        With the queue stopped, an open send's message says its send is
        paused for that; it keeps its place in line, with no estimate.
        """
        h = self.send_harness(concurrency=1)
        h.submit()
        result(h.control.stop())
        waiting = h.submit_to_send()
        why = why_of(h, waiting)
        assert (why.throttle, why.reason) == (
            Throttle.CONSOLE_SEND_PAUSED,
            "console send 7 is paused: queue stopped",
        )
        assert (why.position, why.estimated_send_at) == (0, None)
        result(h.control.start())
        assert why_of(h, waiting).throttle is Throttle.CONCURRENCY

    def test_an_open_send_waits_in_line(self) -> None:
        """
        When nothing holds the send, its message waits like any other,
        with its position.
        """
        h = self.send_harness(concurrency=1)
        h.submit()
        h.submit()
        waiting = h.submit_to_send()
        why = why_of(h, waiting)
        assert (why.throttle, why.position) == (Throttle.CONCURRENCY, 1)

    def test_a_gate_nobody_opened_yet(self) -> None:
        """
        At a start, before the runner opened the send's gate, its messages
        wait for it.
        """
        h = Harness(gate_of=campaign_gate)
        waiting = h.submit_to_send(8)
        why = why_of(h, waiting)
        assert (why.throttle, why.reason, why.position) == (
            Throttle.CONSOLE_SEND_PAUSED,
            "campaign-8 is paused: not resumed yet",
            None,
        )

    def test_the_listing_gives_no_estimate_while_paused(self) -> None:
        """
        A listing row of a paused send's message has no estimate; one of
        an SMTP+ message has.
        """
        h = self.send_harness(rate=1.0, concurrency=5)
        h.submit(priority=1)
        plain = h.submit(priority=2)
        waiting = h.submit_to_send()
        rows = {r.queue_id: r for r in result(h.control.listing()).rows}
        assert rows[waiting].estimated_send_at is None
        assert rows[plain].estimated_send_at == NOW


class TestChanges:
    def test_stop_and_start(self) -> None:
        """
        Stop keeps mail from being handed to the relay while mail is still
        accepted; start sends it. Both answer the queue's status.
        """
        h = Harness(concurrency=5)
        status = result(h.control.stop())
        assert status.paused is True
        queue_id = h.submit()
        assert h.outbound.pending == {}
        assert h.control.status().counts[MessageState.QUEUED] == 1
        assert result(h.control.stop()).paused is True
        status = result(h.control.start())
        assert status.paused is False
        assert list(h.outbound.pending) == [queue_id]
        assert status.in_flight == 1
        assert (status.rate, status.concurrency) == (0.0, 5)

    def test_hold_release_journaled(self) -> None:
        """
        Hold and release are journaled and answer the new state; a released
        message is sent.
        """
        h = Harness(concurrency=1)
        busy = h.submit()
        queue_id = h.submit(priority=2)
        assert result(h.control.hold(queue_id)) == MessageChange(
            queue_id, MessageState.HELD, Priority.HIGH
        )
        assert h.records(queue_id) == [("held", 0, 0.0)]
        h.outbound.deliver_now(busy)
        assert queue_id not in h.outbound.pending
        change = result(h.control.release(queue_id))
        assert change.state is MessageState.SENDING
        assert h.records(queue_id)[:2] == [("held", 0, 0.0), ("queued", 0, 0.0)]
        assert queue_id in h.outbound.pending

    def test_cancel_journaled(self) -> None:
        """
        A cancelled message leaves the queue for good: journaled, never
        sent, and unknown afterwards.
        """
        h = Harness(concurrency=1)
        busy = h.submit()
        queue_id = h.submit()
        change = result(h.control.cancel(queue_id))
        assert change == MessageChange(queue_id, MessageState.CANCELLED, Priority.NORMAL)
        assert h.records(queue_id) == [("cancelled", 0, 0.0)]
        assert h.queue.get(queue_id) is None
        assert not any(m.envelope.queue_id == queue_id for m in h.journal.replay())
        h.outbound.deliver_now(busy)
        assert queue_id not in h.outbound.pending
        assert isinstance(failure(h.control.cancel(queue_id)), NoSuchMessage)

    def test_reprioritize_journaled(self) -> None:
        """
        A new priority is journaled (replay gives it) and moves the message
        ahead of the others.
        """
        h = Harness(concurrency=1)
        h.submit()
        first = h.submit(priority=3)
        second = h.submit(priority=3)
        change = result(h.control.reprioritize(second, 1))
        assert change == MessageChange(second, MessageState.QUEUED, Priority.VERY_HIGH)
        replayed = {m.envelope.queue_id: m.envelope.priority for m in h.journal.replay()}
        assert replayed[second] == Priority.VERY_HIGH
        assert why_of(h, second).position == 0
        assert why_of(h, first).position == 1

    @pytest.mark.parametrize("priority", [0, 6, "x", ""])
    def test_bad_priority_changes_nothing(self, priority: int | str) -> None:
        """
        A priority outside 1..5 is bad input (0 and 6: one past each end),
        and nothing changes.
        """
        h = Harness(concurrency=1)
        h.submit()
        queue_id = h.submit()
        error = failure(h.control.reprioritize(queue_id, priority))
        assert isinstance(error, BadArgument)
        assert "is not a priority: use 1 (very high) to 5 (very low)" in str(error)
        assert h.records(queue_id) == []
        entry = h.queue.get(queue_id)
        assert entry is not None
        assert entry.priority == Priority.NORMAL

    @pytest.mark.parametrize("priority", [1, 5])
    def test_priority_limits_accepted(self, priority: int) -> None:
        """
        1 and 5 are priorities.
        """
        h = Harness(concurrency=1)
        h.submit()
        queue_id = h.submit()
        assert int(result(h.control.reprioritize(queue_id, priority)).priority) == priority

    @pytest.mark.parametrize("action", ["hold", "cancel"])
    def test_sending_message_cannot_be_held_or_cancelled(self, action: str) -> None:
        """
        Holding or cancelling a message being sent is refused, saying why,
        and nothing is journaled.
        """
        h = Harness()
        queue_id = h.submit()
        before = list(h.journal.state_records)
        error = failure(getattr(h.control, action)(queue_id))
        assert isinstance(error, NotAllowed)
        assert str(error) == f"cannot {action} {queue_id}: it is sending now"
        assert h.journal.state_records == before

    @pytest.mark.parametrize("action", ["hold", "release", "cancel"])
    def test_unknown_message(self, action: str) -> None:
        """
        A change to a message not in the queue says it is not there.
        """
        h = Harness()
        error = failure(getattr(h.control, action)("GONE"))
        assert isinstance(error, NoSuchMessage)
        assert str(error) == (
            "no message GONE in the queue (delivered, bounced and cancelled messages leave it)"
        )

    def test_journal_failure_says_the_change_is_not_durable(self) -> None:
        """
        When the journal cannot record a hold, the admin is told that the
        hold stands only until a restart.
        """
        h = Harness(concurrency=1)
        h.submit()
        queue_id = h.submit()
        h.journal.available = False
        error = failure(h.control.hold(queue_id))
        assert isinstance(error, NotDurable)
        assert str(error).startswith(f"{queue_id} was held, but the journal could not record it")
        assert "a restart may undo it" in str(error)


class TestStopStartJournal:
    def test_stop_that_is_not_journaled_says_so(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """
        When stopping is journaled and the journal fails, the admin is told
        the stop is not durable.
        """
        h = Harness()
        monkeypatch.setattr(h.queue, "pause", lambda: fail(JournalUnavailable("disk full")))
        error = failure(h.control.stop())
        assert isinstance(error, NotDurable)
        assert str(error) == (
            "the queue was stopped, but the journal could not record it (disk full); "
            "a restart may undo it"
        )

    def test_other_failures_pass_through(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """
        A failure that is not the journal's is not disguised.
        """
        h = Harness()
        monkeypatch.setattr(h.queue, "resume", lambda: fail(RuntimeError("boom")))
        assert isinstance(failure(h.control.start()), RuntimeError)


class TestListing:
    def test_rows_and_filters(self) -> None:
        """
        The listing shows each message's envelope and scheduling fields, and
        filters by list, user, priority and state.
        """
        h = Harness(concurrency=1)
        sending = h.submit(list="a", username="alice")
        a2 = h.submit(list="a", username="alice", priority=2)
        b1 = h.submit(list="b", username="bob")
        held = h.submit(list="b", username="bob")
        result(h.control.hold(held))

        def ids(**filters: Any) -> list[str]:
            listing = result(h.control.listing(QueueFilter(**filters)))
            return [row.queue_id for row in listing.rows]

        assert ids() == [sending, a2, b1, held]
        assert ids(list="a") == [sending, a2]
        assert ids(username="bob") == [b1, held]
        assert ids(priority=Priority.HIGH) == [a2]
        assert ids(state=MessageState.HELD) == [held]
        assert ids(state=MessageState.SENDING) == [sending]
        assert ids(list="b", username="alice") == []

        listing = result(h.control.listing())
        row = listing.rows[1]
        assert (row.queue_id, row.list, row.username, row.sender) == (
            a2,
            "a",
            "alice",
            "app@a.example",
        )
        assert row.recipients == ("r0@example.org", "r1@example.org")
        assert (row.priority, row.state, row.attempts) == (Priority.HIGH, MessageState.QUEUED, 0)
        assert row.accepted_at == NOW - 60
        assert row.subject == "hi"
        assert listing.status.counts[MessageState.QUEUED] == 2
        assert listing.next_after is None

    def test_limit_and_paging(self) -> None:
        """
        A page holds at most the limit, C{next_after} continues it, and the
        last page says there is no more (at the limit and one past it).
        """
        h = Harness(concurrency=1)
        queue_ids = [h.submit() for _ in range(5)]
        exact = result(h.control.listing(limit=5))
        assert [r.queue_id for r in exact.rows] == queue_ids
        assert exact.next_after is None
        first = result(h.control.listing(limit=2))
        assert [r.queue_id for r in first.rows] == queue_ids[:2]
        assert first.next_after == queue_ids[1]
        second = result(h.control.listing(after=first.next_after, limit=2))
        assert [r.queue_id for r in second.rows] == queue_ids[2:4]
        third = result(h.control.listing(after=second.next_after, limit=2))
        assert [r.queue_id for r in third.rows] == queue_ids[4:]
        assert third.next_after is None

    @pytest.mark.parametrize("limit", [0, MAX_LIST_LIMIT + 1])
    def test_limit_out_of_range(self, limit: int) -> None:
        """
        A limit below 1 or above the maximum is bad input.
        """
        h = Harness()
        error = failure(h.control.listing(limit=limit))
        assert isinstance(error, BadArgument)
        assert f"the limit must be 1 to {MAX_LIST_LIMIT}" in str(error)

    def test_user_filter_scans_a_bounded_number(self) -> None:
        """
        With a user filter, one page reads at most the scan budget of
        envelopes and says where to go on.
        """
        h = Harness(concurrency=1, username_scan=3, read_batch=2)
        others = [h.submit(username="other") for _ in range(3)]
        mine = [h.submit(username="me") for _ in range(2)]
        page = result(h.control.listing(QueueFilter(username="me")))
        assert page.rows == ()
        assert page.next_after == others[-1]
        page = result(h.control.listing(QueueFilter(username="me"), after=page.next_after))
        assert [r.queue_id for r in page.rows] == mine
        assert page.next_after is None

    def test_estimates_in_rows(self) -> None:
        """
        Rows carry the estimated send time: at --rate 1, one more second per
        message ahead.
        """
        h = Harness(rate=1.0, concurrency=10)
        h.submit()
        waiting = [h.submit() for _ in range(3)]
        rows = result(h.control.listing(QueueFilter(state=MessageState.QUEUED))).rows
        assert [r.queue_id for r in rows] == waiting
        assert [r.estimated_send_at for r in rows] == [NOW, NOW + 1, NOW + 2]

    def test_many_recipients_are_bounded(self) -> None:
        """
        A row shows the first recipients and counts them all.
        """
        h = Harness()
        h.submit(recipients=MAX_LISTED_RECIPIENTS + 5)
        (row,) = result(h.control.listing()).rows
        assert len(row.recipients) == MAX_LISTED_RECIPIENTS
        assert row.recipient_count == MAX_LISTED_RECIPIENTS + 5

    def test_unreadable_envelope(self, logged_errors: list[dict[str, Any]]) -> None:
        """
        When the journal cannot give a message's envelope, its row still
        shows what the scheduler knows (and a warning is logged).
        """
        journal = MemoryJournal()
        real_read = journal.read

        def read(location: JournalLocation) -> Deferred[tuple[Envelope, bytes]]:
            if location.offset == 1:
                return Deferred.fromCoroutine(_fail_read())
            return real_read(location)

        journal.read = read  # type: ignore[method-assign]
        h = Harness(journal=journal)
        result(h.control.stop())
        h.submit()
        broken = h.submit()
        rows = result(h.control.listing()).rows
        assert rows[1].queue_id == broken
        assert (rows[1].username, rows[1].sender, rows[1].recipients) == (None, None, ())
        assert rows[0].username == "u-news"


def one_turn(clock: Clock) -> int:
    """
    Run the calls due now that were scheduled before this turn, as one
    reactor iteration does (L{Clock.advance} would also run those they
    schedule for now).

    @return: how many ran.
    """
    due = [call for call in clock.calls if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)
    return len(due)


def turns_until(clock: Clock, d: Deferred[Any]) -> int:
    """
    Run reactor turns until C{d} fires.

    @return: how many turns it took.
    """
    turns = 0
    while not d.called:
        assert one_turn(clock), "nothing left to run and the Deferred has not fired"
        turns += 1
    return turns


class TestScan:
    """
    Listings select their candidates from a snapshot of the queue, a slice
    per reactor turn; "why" answers at once.
    """

    @pytest.mark.parametrize(("count", "turns"), [(1, 0), (2, 0), (3, 1), (4, 1), (5, 2)])
    def test_scan_yields_between_slices(self, count: int, turns: int) -> None:
        """
        With slices of 2, the first slice is scanned at once and each next
        one in a later reactor turn (at the slice size and one past it, at
        twice the slice size and one past it).
        """
        h = Harness(scan_slice=2)
        result(h.control.stop())
        queue_ids = [h.submit() for _ in range(count)]
        d = h.control.listing()
        assert turns_until(h.clock, d) == turns
        assert [r.queue_id for r in result(d).rows] == queue_ids

    def test_snapshot_is_one_moment(self) -> None:
        """
        Messages accepted or cancelled while a scan is under way do not
        change what it lists; the next listing sees them.
        """
        h = Harness(scan_slice=2)
        result(h.control.stop())
        queue_ids = [h.submit() for _ in range(4)]
        why = h.control.why(queue_ids[3])
        listing = h.control.listing()
        later = h.submit()
        result(h.control.cancel(queue_ids[0]))
        turns_until(h.clock, listing)
        turns_until(h.clock, why)
        assert [r.queue_id for r in result(listing).rows] == queue_ids
        assert result(why).position == 3
        again = h.control.listing()
        turns_until(h.clock, again)
        assert [r.queue_id for r in result(again).rows] == [*queue_ids[1:], later]

    def test_why_answers_at_once(self) -> None:
        """
        A "why" takes no reactor turn, however small the slices: it answers
        for the moment it was asked, even when the message is cancelled
        right after.
        """
        h = Harness(scan_slice=1)
        result(h.control.stop())
        first = h.submit()
        h.submit()
        why = h.control.why(first)
        assert why.called
        result(h.control.cancel(first))
        answer = result(why)
        assert (answer.queue_id, answer.state, answer.position) == (first, MessageState.QUEUED, 0)


async def _fail_read() -> tuple[Envelope, bytes]:
    raise OSError("gone")


# --- over AMP on a UNIX socket ---------------------------------------------


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """
    A data directory with a short path (a UNIX socket path has at most 107
    bytes).
    """
    path = Path(tempfile.mkdtemp(prefix="sgw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def unix_reactor() -> IReactorUNIX:
    """
    The running reactor, which listens on UNIX sockets.
    """
    from twisted.internet import reactor

    return cast(IReactorUNIX, reactor)


@asynccontextmanager
async def served(
    h: Harness, data_dir: Path, **options: Any
) -> AsyncIterator[tuple[ControlService, ControlClient]]:
    """
    The control service of C{h} listening in C{data_dir}, and a client.
    """
    service = ControlService(h.control, data_dir, unix_reactor(), **options)
    service.startService()
    client = ControlClient(service.path, connect_timeout=2.0, reply_timeout=5.0)
    try:
        yield service, client
    finally:
        client.close()
        await service.stopService()


async def off_thread(f: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """
    Run the blocking client in a thread while the reactor serves.
    """
    value: T = await deferToThread(f, *args, **kwargs)
    return value


async def off_thread_error(f: Callable[..., Any], *args: Any, **kwargs: Any) -> BaseException:
    try:
        await deferToThread(f, *args, **kwargs)
    except Exception as e:
        return e
    raise AssertionError("no error")


class TestSocket:
    @async_test
    async def test_socket_mode_and_removal(self, data_dir: Path) -> None:
        """
        The socket is <data_dir>/control.sock with mode 0600, and is removed
        when the service stops.
        """
        h = Harness()
        path = control_socket_path(data_dir)
        async with served(h, data_dir) as (service, _):
            assert service.path == str(data_dir / "control.sock") == path
            mode = os.lstat(path).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
        assert not os.path.exists(path)

    @async_test
    async def test_stale_socket_is_replaced(self, data_dir: Path) -> None:
        """
        A socket file nobody listens on (left by a crash) is replaced.
        """
        path = control_socket_path(data_dir)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        h = Harness()
        async with served(h, data_dir) as (_, client):
            status = await off_thread(client.status)
            assert status.paused is False

    def test_live_socket_is_not_taken_over(self, data_dir: Path) -> None:
        """
        When a process answers on the socket, the service does not start.
        """
        path = control_socket_path(data_dir)
        live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        live.bind(path)
        live.listen(1)
        try:
            service = ControlService(Harness().control, data_dir, unix_reactor())
            with pytest.raises(ControlSocketError, match="a process answers on"):
                service.startService()
            assert os.path.exists(path)
        finally:
            live.close()

    def test_other_file_is_not_removed(self, data_dir: Path) -> None:
        """
        A file that is not a socket is left alone and the start fails.
        """
        path = control_socket_path(data_dir)
        Path(path).write_text("keep me")
        service = ControlService(Harness().control, data_dir, unix_reactor())
        with pytest.raises(ControlSocketError, match="is not a socket"):
            service.startService()
        assert Path(path).read_text() == "keep me"

    @async_test
    async def test_path_too_long(self, data_dir: Path) -> None:
        """
        A data directory too deep for a UNIX socket path is named at start
        (107 bytes fit, 108 do not).
        """
        base = str(data_dir) + "/"
        name_length = len("/control.sock")
        fits = base + "d" * (107 - len(base) - name_length)
        too_long = fits + "d"
        os.makedirs(fits)
        os.makedirs(too_long)
        service = ControlService(Harness().control, fits, unix_reactor())
        assert len(service.path) == 107
        service.startService()
        await service.stopService()
        service = ControlService(Harness().control, too_long, unix_reactor())
        with pytest.raises(ControlSocketError, match="108 bytes, more than a UNIX socket"):
            service.startService()

    @async_test
    async def test_other_users_are_refused(self, data_dir: Path) -> None:
        """
        A peer whose uid is not allowed is disconnected before any command
        runs.
        """
        h = Harness(concurrency=1)
        h.submit()
        queue_id = h.submit()
        async with served(h, data_dir, allowed_uids={os.geteuid() + 1}) as (_, client):
            error = await off_thread_error(client.hold, queue_id)
        assert isinstance(error, GatewayUnreachable)
        assert h.records(queue_id) == []

    def test_allowed_uids_default(self, data_dir: Path) -> None:
        """
        By default the gateway's own user and root may connect.
        """
        service = ControlService(Harness().control, data_dir, unix_reactor())
        assert service.allowed_uids() == {os.geteuid(), 0}


class TestClientErrors:
    def test_not_running(self, data_dir: Path) -> None:
        """
        Without a socket, the gateway is not running.
        """
        client = ControlClient(control_socket_path(data_dir))
        with pytest.raises(GatewayUnreachable, match="the gateway is not running"):
            client.status()

    def test_stale_socket(self, data_dir: Path) -> None:
        """
        A socket nobody listens on refuses: the gateway is not running.
        """
        path = control_socket_path(data_dir)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()
        with pytest.raises(GatewayUnreachable, match="refuses connections"):
            ControlClient(path).status()

    def test_no_answer_in_time(self, data_dir: Path) -> None:
        """
        A gateway that accepts but does not answer makes the client give up
        after its reply timeout.
        """
        path = control_socket_path(data_dir)
        mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mute.bind(path)
        mute.listen(1)
        try:
            client = ControlClient(path, reply_timeout=0.05)
            with pytest.raises(GatewayUnreachable, match=r"did not answer within 0\.05 s"):
                client.status()
        finally:
            mute.close()


class TestOverAMP:
    @async_test
    async def test_stop_start(self, data_dir: Path) -> None:
        """
        Stop and start over the socket, answering the status.
        """
        h = Harness(concurrency=3)
        async with served(h, data_dir) as (_, client):
            stopped = await off_thread(client.stop)
            assert stopped.paused is True
            assert h.queue.paused
            h.submit()
            assert h.outbound.pending == {}
            started = await off_thread(client.start)
        assert started.paused is False
        assert started.in_flight == 1
        assert started.counts[MessageState.SENDING] == 1
        assert (started.rate, started.concurrency) == (0.0, 3)

    @async_test
    async def test_changes_are_journaled(self, data_dir: Path) -> None:
        """
        Hold, release, priority and cancel over the socket reach the queue
        and the journal.
        """
        h = Harness(concurrency=1)
        h.submit()
        queue_id = h.submit()
        async with served(h, data_dir) as (_, client):
            held = await off_thread(client.hold, queue_id)
            assert held == MessageChange(queue_id, MessageState.HELD, Priority.NORMAL)
            moved = await off_thread(client.reprioritize, queue_id, 2)
            assert moved.priority == Priority.HIGH
            released = await off_thread(client.release, queue_id)
            assert released.state is MessageState.QUEUED
            cancelled = await off_thread(client.cancel, queue_id)
            assert cancelled.state is MessageState.CANCELLED
        assert [s for s, _, _ in h.records(queue_id)] == ["held", "queued", "cancelled"]
        assert h.queue.get(queue_id) is None

    @async_test
    async def test_errors_keep_their_kind_and_message(self, data_dir: Path) -> None:
        """
        The gateway's errors reach the client as the same exception types,
        with the same one-line messages.
        """
        h = Harness()
        sending = h.submit()
        async with served(h, data_dir) as (_, client):
            unknown = await off_thread_error(client.hold, "NOPE")
            not_allowed = await off_thread_error(client.cancel, sending)
            bad = await off_thread_error(client.reprioritize, sending, 9)
            bad_state = await off_thread_error(client.call, ListQueue, limit=1, state="x")
            # The connection is still usable after errors.
            status = await off_thread(client.status)
        assert isinstance(unknown, NoSuchMessage)
        assert str(unknown).startswith("no message NOPE in the queue")
        assert isinstance(not_allowed, NotAllowed)
        assert str(not_allowed) == f"cannot cancel {sending}: it is sending now"
        assert isinstance(bad, BadArgument)
        assert "9 is not a priority" in str(bad)
        assert isinstance(bad_state, BadArgument)
        assert "'x' is not a queue state" in str(bad_state)
        assert status.in_flight == 1

    @async_test
    async def test_why(self, data_dir: Path) -> None:
        """
        Why over the socket gives the same answer as the Python API.
        """
        h = Harness(concurrency=1)
        h.submit()
        h.submit(priority=1)
        queue_id = h.submit(priority=4)
        async with served(h, data_dir) as (_, client):
            why = await off_thread(client.why, queue_id)
        assert why == why_of(h, queue_id)
        assert why.throttle is Throttle.HIGHER_PRIORITY
        assert why.position == 1

    @async_test
    async def test_why_of_a_paused_console_send(self, data_dir: Path) -> None:
        """
        A console send's message, paused, says so over the socket too.
        """
        h = Harness(gate_of=campaign_gate)
        h.queue.close_gate(campaign_username(7), ADMIN_PAUSE_REASON, label=campaign_label(7))
        queue_id = h.submit_to_send()
        async with served(h, data_dir) as (_, client):
            why = await off_thread(client.why, queue_id)
        assert why == why_of(h, queue_id)
        assert why.throttle is Throttle.CONSOLE_SEND_PAUSED
        assert why.reason == "console send 7 is paused: paused by an admin"
        assert why.position is None

    @async_test
    async def test_listing_with_filters(self, data_dir: Path) -> None:
        """
        A listing over the socket has the rows of the Python API, filtered.
        """
        h = Harness(concurrency=1)
        h.submit(list="a", username="alice")
        b1 = h.submit(list="b", username="bob", priority=2)
        h.submit(list="a", username="alice")
        async with served(h, data_dir) as (_, client):
            listing = await off_thread(client.listing, QueueFilter(list="b"))
            by_user = await off_thread(client.listing, QueueFilter(username="alice"), None, 1)
        assert listing == result(h.control.listing(QueueFilter(list="b")))
        assert [r.queue_id for r in listing.rows] == [b1]
        assert len(by_user.rows) == 1
        assert by_user.next_after == by_user.rows[0].queue_id

    @async_test
    async def test_listing_larger_than_an_amp_value(self, data_dir: Path) -> None:
        """
        A listing far over AMP's 64 KiB value limit arrives whole.
        """
        h = Harness()
        result(h.control.stop())
        queue_ids = [h.submit(recipients=MAX_LISTED_RECIPIENTS) for _ in range(400)]
        async with served(h, data_dir) as (_, client):
            listing: QueueListing = await off_thread(client.listing, None, None, 1000)
        assert [r.queue_id for r in listing.rows] == queue_ids
        assert all(len(r.recipients) == MAX_LISTED_RECIPIENTS for r in listing.rows)
        assert listing == result(h.control.listing())

    @async_test
    async def test_connections_closed_at_stop(self, data_dir: Path) -> None:
        """
        Stopping the service closes the open connections: the client's next
        call fails cleanly.
        """
        h = Harness()
        async with served(h, data_dir) as (service, client):
            await off_thread(client.status)
            assert len(service.connections) == 1
            await service.stopService()
            assert service.connections == set()
            error = await off_thread_error(client.status)
            assert isinstance(error, GatewayUnreachable)
            service.startService()


def test_result_helper_sees_unfired() -> None:
    """
    The helper refuses a Deferred that has not fired (so a test cannot pass
    on a change that never completed).
    """
    with pytest.raises(AssertionError, match="has not fired"):
        result(Deferred())
    assert result(succeed(3)) == 3


class TestFileJournal:
    @async_test
    async def test_listing_reads_envelopes_from_the_file_journal(self, data_dir: Path) -> None:
        """
        With the gateway's own journal on disk, a listing shows each
        message's envelope, read back off the reactor thread.
        """
        from smtpgw.journal import FileJournal

        journal = FileJournal(str(data_dir / "journal"), cast(IReactorThreads, unix_reactor()))
        clock = Clock()
        clock.advance(NOW)
        queue = MessageQueue(journal, PendingOutbound(), clock)
        control = QueueControl(queue, journal, clock)
        queue.startService()
        try:
            await control.stop()
            envelope = Envelope(
                queue_id="18BCFE568000000000A1",
                list="news",
                username="alice",
                sender="app@news.example",
                recipients=("x@example.org",),
                priority=Priority.HIGH,
                accepted_at=NOW - 5,
            )
            await queue.submit(envelope, b"Subject: hi\r\n\r\nhello\r\n")
            listing = await control.listing(QueueFilter(username="alice"))
        finally:
            await queue.stopService()
        (row,) = listing.rows
        assert (row.queue_id, row.username, row.sender, row.recipients) == (
            envelope.queue_id,
            "alice",
            "app@news.example",
            ("x@example.org",),
        )
        assert row.accepted_at == NOW - 5
        assert row.priority == Priority.HIGH
