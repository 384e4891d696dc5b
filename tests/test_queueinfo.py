"""
Tests for L{smtpgw.queueinfo}: the queue listing and "why is it waiting",
computed from the scheduler's state without a reactor.
"""

from __future__ import annotations

import email.header
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgw.interfaces import JournalLocation
from smtpgw.model import Envelope, MessageState, Priority
from smtpgw.queueinfo import (
    MAX_LISTED_RECIPIENTS,
    MAX_SUBJECT_LENGTH,
    Conditions,
    GateWait,
    MessageChange,
    PageCandidates,
    QueueFilter,
    QueueListing,
    QueueStatus,
    ReadyLane,
    ReadyOrder,
    Throttle,
    change_document,
    estimate_send_at,
    explain,
    iso8601,
    listing_document,
    message_subject,
    parse_state,
    queue_row,
    row_document,
    status_document,
    why_document,
)
from smtpgw.scheduler import ScheduledEntry, Scheduler

NOW = 1_700_000_000.0
_offsets = itertools.count()


def entry(
    queue_id: str,
    priority: int = 3,
    list: str = "news",
    state: MessageState = MessageState.QUEUED,
    attempts: int = 0,
    next_attempt_at: float = 0.0,
) -> ScheduledEntry:
    return ScheduledEntry(
        queue_id=queue_id,
        priority=Priority(priority),
        list=list,
        location=JournalLocation(0, next(_offsets), 10),
        state=state,
        attempts=attempts,
        next_attempt_at=next_attempt_at,
    )


def conditions(
    rate: float = 0.0,
    concurrency: int = 10,
    in_flight: int = 0,
    paused: bool = False,
    next_token_at: float | None = None,
    delivery_time: float | None = None,
) -> Conditions:
    return Conditions(
        now=NOW,
        rate=rate,
        concurrency=concurrency,
        in_flight=in_flight,
        paused=paused,
        next_token_at=next_token_at,
        delivery_time=delivery_time,
    )


def lanes(**by_list: str) -> list[ReadyLane]:
    """
    Lanes in the order given: C{a="a1 a2"} is list C{a} with two messages.
    """
    return [ReadyLane(name, tuple(ids.split())) for name, ids in by_list.items()]


def alone(queued: ScheduledEntry) -> ReadyOrder:
    """
    The order when C{queued} is the only ready message.
    """
    return ReadyOrder.from_lanes({queued.priority: [ReadyLane(queued.list, (queued.queue_id,))]})


def dispatch_order(scheduler: Scheduler) -> list[str]:
    """
    Pop everything from a real scheduler: the order the queue would send.
    """
    order = []
    while (popped := scheduler.pop_ready(NOW)) is not None:
        order.append(popped.queue_id)
    return order


class TestPosition:
    def test_round_robin_across_lists(self) -> None:
        """
        Within one priority, lists take turns one message each, in ring
        order: with lanes a=[a1 a2 a3], b=[b1], c=[c1 c2] the order is
        a1 b1 c1 a2 c2 a3.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(a="a1 a2 a3", b="b1", c="c1 c2")})
        expected = ["a1", "b1", "c1", "a2", "c2", "a3"]
        for position, queue_id in enumerate(expected):
            list_name = queue_id[0]
            assert order.same_priority_ahead(queue_id, Priority.NORMAL, list_name) == position

    def test_higher_priorities_all_count(self) -> None:
        """
        Every ready message of a higher priority is ahead, whatever its list;
        lower priorities never are.
        """
        order = ReadyOrder.from_lanes(
            {
                Priority.VERY_HIGH: lanes(x="x1"),
                Priority.HIGH: lanes(a="a1 a2", b="b1"),
                Priority.NORMAL: lanes(a="a3"),
                Priority.LOW: lanes(a="a4 a5"),
            }
        )
        assert order.higher_than(Priority.VERY_HIGH) == 0
        assert order.higher_than(Priority.HIGH) == 1
        assert order.higher_than(Priority.NORMAL) == 4
        assert order.higher_than(Priority.VERY_LOW) == 7
        assert order.ready(Priority.HIGH) == 3

    def test_due_deferred_message_counts_as_last_of_its_lane(self) -> None:
        """
        A message not among the ready ones (a deferred message that is due)
        is placed at the end of its list's lane, or in a new lane at the end
        of the ring.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(a="a1 a2", b="b1")})
        # a1 b1 a2 then the new a3.
        assert order.same_priority_ahead("a3", Priority.NORMAL, "a") == 3
        # a1 b1 then c1 in the first round.
        assert order.same_priority_ahead("c1", Priority.NORMAL, "c") == 2
        # b1 then b2 after a2.
        assert order.same_priority_ahead("b2", Priority.NORMAL, "b") == 3

    @given(
        st.lists(
            st.tuples(st.sampled_from("abcd"), st.sampled_from([1, 3])),
            min_size=1,
            max_size=40,
        ),
        st.lists(
            st.tuples(st.sampled_from(["hold", "release", "pop", "raise"]), st.integers(0, 39)),
            max_size=20,
        ),
    )
    def test_positions_match_the_real_schedulers_order(
        self, arrivals: list[tuple[str, int]], changes: list[tuple[str, int]]
    ) -> None:
        """
        For any arrivals of messages to lists and priorities, then holds,
        releases, pops and re-prioritizations (which move messages to the
        end of a lane and the ring on), the position computed from the
        scheduler's lanes is the index at which it hands the message out.
        """
        scheduler = Scheduler()
        for n, (list_name, priority) in enumerate(arrivals):
            scheduler.add(entry(f"m{n:03d}", priority=priority, list=list_name))
        for change, n in changes:
            queue_id = f"m{n % len(arrivals):03d}"
            current = scheduler.get(queue_id)
            if current is None or current.state is MessageState.SENDING:
                continue
            if change == "hold":
                scheduler.hold(queue_id)
            elif change == "release":
                scheduler.release(queue_id)
            elif change == "raise":
                scheduler.reprioritize(queue_id, max(1, current.priority - 1))
            else:
                scheduler.pop_ready(NOW)
        waiting = list(scheduler.entries())
        order = ReadyOrder.of(scheduler, waiting)
        actual = dispatch_order(scheduler)
        assert sorted(actual) == sorted(
            e.queue_id for e in waiting if e.state is MessageState.QUEUED
        )
        by_id = {e.queue_id: e for e in waiting}
        for expected_position, queue_id in enumerate(actual):
            e = by_id[queue_id]
            computed = order.higher_than(e.priority) + order.same_priority_ahead(
                queue_id, e.priority, e.list
            )
            assert computed == expected_position

    def test_order_of_ignores_wanted_messages_not_ready(self) -> None:
        """
        Held, deferred and sending messages are not in line, and asking for
        them looks into no lane.
        """
        scheduler = Scheduler()
        for e in (
            entry("h", state=MessageState.HELD),
            entry("d", state=MessageState.DEFERRED, next_attempt_at=NOW + 5),
            entry("s"),
            entry("q"),
        ):
            scheduler.add(e)
        sending = scheduler.pop_ready(NOW)
        assert sending is not None
        assert sending.queue_id == "s"
        order = ReadyOrder.of(scheduler, scheduler.entries())
        assert order.ready(Priority.NORMAL) == 1
        assert order.same_priority_ahead("q", Priority.NORMAL, "news") == 0

    def test_order_of_knows_only_the_wanted_places(self) -> None:
        """
        ReadyOrder.of counts every ready message but finds the place of the
        wanted ones only (an unwanted one counts as last of its lane).
        """
        scheduler = Scheduler()
        for queue_id in ("a1", "b1", "a2", "b2", "a3"):
            scheduler.add(entry(queue_id, list=queue_id[0]))
        wanted = scheduler.get("a2")
        assert wanted is not None
        order = ReadyOrder.of(scheduler, [wanted])
        assert order.ready(Priority.NORMAL) == 5
        assert order.same_priority_ahead("a2", Priority.NORMAL, "a") == 2
        # b1 is not known: counted as one more of lane b, after a1 b1 a2 b2 a3.
        assert order.same_priority_ahead("b1", Priority.NORMAL, "b") == 5


class TestEstimate:
    def test_rate_paces_the_messages_ahead(self) -> None:
        """
        With --rate 2, the message with 10 ahead leaves 5 s after the next
        token.
        """
        assert estimate_send_at(10, conditions(rate=2.0)) == NOW + 5.0
        assert estimate_send_at(10, conditions(rate=2.0, next_token_at=NOW + 0.5)) == NOW + 5.5

    def test_a_past_token_time_counts_as_now(self) -> None:
        """
        A token that is already there does not move the estimate back.
        """
        assert estimate_send_at(0, conditions(rate=1.0, next_token_at=NOW - 3)) == NOW

    def test_known_delivery_time_caps_the_pace(self) -> None:
        """
        Four slots and deliveries of 2 s make 2 messages a second, slower
        than --rate 10.
        """
        assert estimate_send_at(
            6, conditions(rate=10.0, concurrency=4, delivery_time=2.0)
        ) == pytest.approx(NOW + 3.0)
        # No rate limit: the delivery time alone sets the pace.
        assert estimate_send_at(6, conditions(concurrency=4, delivery_time=2.0)) == NOW + 3.0

    def test_unlimited_rate_within_free_slots_is_now(self) -> None:
        """
        Without a rate limit, the messages that fit in the free delivery
        slots go now; for the others there is no estimate (it depends on
        how long deliveries take). Checked at the limit and one past it.
        """
        c = conditions(concurrency=5, in_flight=2)
        assert estimate_send_at(2, c) == NOW
        assert estimate_send_at(3, c) is None


class TestExplain:
    def test_being_sent(self) -> None:
        """
        A message being sent is not in line: "being sent now".
        """
        why = explain(
            entry("s", state=MessageState.SENDING), ReadyOrder.from_lanes({}), conditions()
        )
        assert (why.throttle, why.reason) == (Throttle.SENDING, "being sent now")
        assert why.position is None
        assert why.estimated_send_at == NOW

    def test_held_even_when_stopped(self) -> None:
        """
        A held message says "held" (also while the queue is stopped: it
        stays held after a restart) and has no estimate.
        """
        why = explain(
            entry("h", state=MessageState.HELD), ReadyOrder.from_lanes({}), conditions(paused=True)
        )
        assert (why.throttle, why.reason) == (Throttle.HELD, "held")
        assert why.position is None
        assert why.estimated_send_at is None

    def test_stopped_queue(self) -> None:
        """
        While an admin stopped the queue, a ready message says so, keeps its
        position (for when the queue starts again) and has no estimate.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(news="p q")})
        why = explain(entry("q"), order, conditions(paused=True, rate=5))
        assert (why.throttle, why.reason) == (Throttle.STOPPED, "queue stopped by an admin")
        assert why.position == 1
        assert why.estimated_send_at is None

    def test_stopped_queue_and_deferred(self) -> None:
        """
        A deferred message in a stopped queue names both, and has no
        estimate.
        """
        later = NOW + 30
        why = explain(
            entry("d", state=MessageState.DEFERRED, attempts=2, next_attempt_at=later),
            ReadyOrder.from_lanes({}),
            conditions(paused=True),
        )
        assert why.throttle is Throttle.STOPPED
        assert why.reason == (
            f"queue stopped by an admin; deferred until {iso8601(later)} after 2 attempts"
        )
        assert why.next_attempt_at == later
        assert why.estimated_send_at is None
        assert why.position is None

    def test_deferred_until_later(self) -> None:
        """
        A deferred message waits for its next attempt, named in ISO 8601,
        with the attempts so far; its estimate is that time.
        """
        later = NOW + 120
        why = explain(
            entry("d", state=MessageState.DEFERRED, attempts=2, next_attempt_at=later),
            ReadyOrder.from_lanes({}),
            conditions(),
        )
        assert why.throttle is Throttle.DEFERRED
        assert why.reason == f"deferred until {iso8601(later)} after 2 attempts"
        assert why.next_attempt_at == later
        assert why.estimated_send_at == later
        assert why.position is None

    def test_deferred_after_one_attempt_is_singular(self) -> None:
        """
        "after 1 attempt", not "1 attempts".
        """
        why = explain(
            entry("d", state=MessageState.DEFERRED, attempts=1, next_attempt_at=NOW + 1),
            ReadyOrder.from_lanes({}),
            conditions(),
        )
        assert why.reason.endswith("after 1 attempt")

    def test_deferred_and_due_is_in_line(self) -> None:
        """
        A deferred message whose time has come (exactly now) is in line at
        the end of its lane.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(news="q1")})
        why = explain(
            entry("d", state=MessageState.DEFERRED, attempts=1, next_attempt_at=NOW),
            order,
            conditions(),
        )
        assert why.position == 1
        assert why.throttle is Throttle.NEXT

    def test_waiting_for_higher_priority(self) -> None:
        """
        Ready messages of a higher priority come first, and are counted.
        """
        order = ReadyOrder.from_lanes(
            {Priority.VERY_HIGH: lanes(a="v1 v2"), Priority.NORMAL: lanes(b="n1 n2")}
        )
        why = explain(entry("n2", list="b"), order, conditions(rate=1))
        assert why.throttle is Throttle.HIGHER_PRIORITY
        assert why.reason == "waiting for higher-priority messages (2)"
        assert why.higher_priority == 2
        assert why.position == 3
        assert why.estimated_send_at == NOW + 3

    def test_rate_limit(self) -> None:
        """
        With --rate and free slots, a message with others ahead at its own
        priority waits for the rate limit.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(news="q1 q2")})
        why = explain(entry("q2"), order, conditions(rate=0.5, in_flight=1))
        assert (why.throttle, why.reason) == (Throttle.RATE, "rate limit (--rate 0.5/s)")
        assert why.position == 1
        assert why.estimated_send_at == NOW + 2.0

    def test_first_in_line_without_a_token_is_rate_limited(self) -> None:
        """
        The first message waits for the rate limit when the next token is
        later (or its time is not known), and is next to go once it is
        there.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(news="q1")})
        later = explain(entry("q1"), order, conditions(rate=2, next_token_at=NOW + 0.1))
        assert later.throttle is Throttle.RATE
        assert later.estimated_send_at == NOW + 0.1
        unknown = explain(entry("q1"), order, conditions(rate=2))
        assert unknown.throttle is Throttle.RATE
        there = explain(entry("q1"), order, conditions(rate=2, next_token_at=NOW))
        assert (there.throttle, there.reason) == (Throttle.NEXT, "next to go")

    def test_concurrency_limit_with_a_rate(self) -> None:
        """
        With every delivery slot taken, the concurrency limit holds the
        message even under a rate limit.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(news="q1")})
        why = explain(entry("q1"), order, conditions(rate=2, concurrency=3, in_flight=3))
        assert why.throttle is Throttle.CONCURRENCY
        assert why.reason == "concurrency limit (--concurrency 3 deliveries under way)"

    def test_concurrency_limit_without_a_rate(self) -> None:
        """
        Without a rate, a message beyond the free slots waits for the
        concurrency limit (no estimate); within them it is next to go.
        Checked at the limit and one past it.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(news="q1 q2 q3")})
        c = conditions(concurrency=4, in_flight=2)
        second = explain(entry("q2"), order, c)
        assert (second.throttle, second.position) == (Throttle.NEXT, 1)
        assert second.estimated_send_at == NOW
        third = explain(entry("q3"), order, c)
        assert (third.throttle, third.position) == (Throttle.CONCURRENCY, 2)
        assert third.estimated_send_at is None

    def test_next_to_go(self) -> None:
        """
        The first message with nothing holding it is next to go, now.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(news="q1")})
        why = explain(entry("q1"), order, conditions())
        assert (why.throttle, why.reason, why.position) == (Throttle.NEXT, "next to go", 0)
        assert why.estimated_send_at == NOW

    def test_round_robin_position_in_why(self) -> None:
        """
        The position of a message of list c behind two longer lists is
        counted with the round-robin, plus the higher-priority messages.
        """
        order = ReadyOrder.from_lanes(
            {
                Priority.HIGH: lanes(z="z1"),
                Priority.NORMAL: lanes(a="a1 a2 a3", b="b1 b2 b3", c="c1 c2"),
            }
        )
        # z1 | a1 b1 c1 a2 b2 | c2
        why = explain(entry("c2", list="c"), order, conditions(rate=1))
        assert why.position == 6
        assert why.higher_priority == 1

    def test_a_held_back_console_send_holds_its_message(self) -> None:
        """
        A console send's message whose gate holds all of them (here: higher
        priority traffic) waits for its send: the reason names the send
        and why it is paused; not in line, it has no position and no
        estimate. Its JSON keeps the field names, with the new throttle.
        """
        send = entry("C7R1")
        gate = GateWait("console send 7", "priority-1 SMTP+ traffic", in_line=False)
        why = explain(send, ReadyOrder.from_lanes({}), conditions(rate=5), gate)
        assert (why.throttle, why.reason) == (
            Throttle.CONSOLE_SEND_PAUSED,
            "console send 7 is paused: priority-1 SMTP+ traffic",
        )
        assert (why.position, why.estimated_send_at) == (None, None)
        document = why_document(why)
        assert document["throttle"] == "console_send_paused"
        assert document["position"] is None
        assert set(document) == set(why_document(explain(send, alone(send), conditions())))

    def test_a_console_send_in_line_keeps_its_position(self) -> None:
        """
        Held back while its gate is still in line (the queue stopped), the
        message keeps its position for when it goes on.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(news="p q")})
        gate = GateWait("console send 7", "queue stopped", in_line=True)
        why = explain(entry("q"), order, conditions(paused=True), gate)
        assert (why.throttle, why.reason) == (
            Throttle.CONSOLE_SEND_PAUSED,
            "console send 7 is paused: queue stopped",
        )
        assert (why.position, why.estimated_send_at) == (1, None)

    def test_an_open_console_send_waits_like_any_message(self) -> None:
        """
        When its gate holds nothing back, the usual throttles apply.
        """
        order = ReadyOrder.from_lanes({Priority.NORMAL: lanes(news="q1")})
        gate = GateWait("console send 7", None, in_line=True)
        why = explain(entry("q1"), order, conditions(), gate)
        assert (why.throttle, why.position, why.estimated_send_at) == (Throttle.NEXT, 0, NOW)

    def test_held_and_deferred_come_before_the_send(self) -> None:
        """
        A held or deferred message of a paused send says it is held or
        deferred: that holds it longer.
        """
        gate = GateWait("console send 7", "paused by an admin", in_line=False)
        held = explain(
            entry("h", state=MessageState.HELD), ReadyOrder.from_lanes({}), conditions(), gate
        )
        assert held.throttle is Throttle.HELD
        deferred = entry("d", state=MessageState.DEFERRED, attempts=1, next_attempt_at=NOW + 60)
        why = explain(deferred, ReadyOrder.from_lanes({}), conditions(), gate)
        assert why.throttle is Throttle.DEFERRED

    def test_document_fields(self) -> None:
        """
        The JSON of a why: state and throttle as words, times in ISO 8601.
        """
        why = explain(
            entry("d", state=MessageState.DEFERRED, attempts=3, next_attempt_at=NOW + 60),
            ReadyOrder.from_lanes({}),
            conditions(),
        )
        document = why_document(why)
        assert document == {
            "queue_id": "d",
            "list": "news",
            "state": "deferred",
            "priority": 3,
            "attempts": 3,
            "next_attempt_at": "2023-11-14T22:14:20Z",
            "position": None,
            "higher_priority": 0,
            "throttle": "deferred",
            "reason": "deferred until 2023-11-14T22:14:20Z after 3 attempts",
            "estimated_send_at": "2023-11-14T22:14:20Z",
        }


class TestStates:
    @pytest.mark.parametrize("text", ["queued", "sending", "deferred", "held", " HELD "])
    def test_queue_states(self, text: str) -> None:
        """
        The four states of a message in the queue are accepted, any case.
        """
        assert parse_state(text).value == text.strip().lower()

    @pytest.mark.parametrize("text", ["delivered", "bounced", "cancelled"])
    def test_final_states_are_gone(self, text: str) -> None:
        """
        Filtering on a final state says that those messages left the queue.
        """
        with pytest.raises(ValueError, match=f"{text} messages are no longer in the queue"):
            parse_state(text)

    def test_unknown_state(self) -> None:
        """
        Anything else is refused with the states to use.
        """
        with pytest.raises(ValueError, match="'paused' is not a queue state: use one of"):
            parse_state("paused")


def envelope(queue_id: str, username: str = "u1", recipients: int = 2) -> Envelope:
    return Envelope(
        queue_id=queue_id,
        list="news",
        username=username,
        sender="app@news.example",
        recipients=tuple(f"r{n}@example.org" for n in range(recipients)),
        priority=Priority.NORMAL,
        accepted_at=NOW - 30,
    )


class TestListing:
    def test_filters_on_scheduler_fields(self) -> None:
        """
        List, priority and state filter on the scheduler's entries; the
        username on the envelope.
        """
        queued = entry("q", priority=2, list="a")
        held = entry("h", priority=2, list="a", state=MessageState.HELD)
        other = entry("o", priority=3, list="b")
        everything = QueueFilter()
        assert all(everything.matches_entry(e) for e in (queued, held, other))
        assert QueueFilter(list="a").matches_entry(held)
        assert not QueueFilter(list="a").matches_entry(other)
        assert QueueFilter(priority=Priority.HIGH).matches_entry(queued)
        assert not QueueFilter(priority=Priority.HIGH).matches_entry(other)
        assert QueueFilter(state=MessageState.HELD).matches_entry(held)
        assert not QueueFilter(state=MessageState.HELD).matches_entry(queued)
        assert QueueFilter(username="u1").matches_envelope(envelope("q"))
        assert not QueueFilter(username="u2").matches_envelope(envelope("q"))
        assert everything.matches_envelope(envelope("q"))

    def test_pages_in_queue_id_order(self) -> None:
        """
        Candidates come in queue id order, after the given id, at most the
        limit; paging on from the last id sees the rest exactly once.
        """
        scheduler = Scheduler()
        for n in (5, 1, 4, 2, 3):
            scheduler.add(entry(f"id{n}"))

        def page(after: str | None, keep: int) -> list[str]:
            candidates = PageCandidates(keep)
            candidates.add(scheduler.queue_ids(after=after))
            return candidates.queue_ids()

        assert page(None, 2) == ["id1", "id2"]
        assert page("id2", 2) == ["id3", "id4"]
        assert page("id4", 2) == ["id5"]
        assert page("id5", 2) == []
        assert page(None, 10) == [f"id{n}" for n in range(1, 6)]

    def test_row_shows_a_bounded_number_of_recipients(self) -> None:
        """
        A row shows the first recipients up to the limit and counts all of
        them (at the limit and one past it).
        """
        queued = entry("q")
        why = explain(queued, alone(queued), conditions())
        at_limit = queue_row(queued, envelope("q", recipients=MAX_LISTED_RECIPIENTS), why)
        assert len(at_limit.recipients) == at_limit.recipient_count == MAX_LISTED_RECIPIENTS
        past = queue_row(queued, envelope("q", recipients=MAX_LISTED_RECIPIENTS + 1), why)
        assert len(past.recipients) == MAX_LISTED_RECIPIENTS
        assert past.recipient_count == MAX_LISTED_RECIPIENTS + 1

    def test_row_document(self) -> None:
        """
        A row as JSON: the product's field names, times in ISO 8601 UTC.
        """
        queued = entry("q", priority=2)
        why = explain(queued, alone(queued), conditions())
        document = row_document(queue_row(queued, envelope("q"), why, "Hello"))
        assert document == {
            "queue_id": "q",
            "list": "news",
            "username": "u1",
            "sender": "app@news.example",
            "recipients": ["r0@example.org", "r1@example.org"],
            "recipient_count": 2,
            "priority": 2,
            "state": "queued",
            "attempts": 0,
            "accepted_at": "2023-11-14T22:12:50Z",
            "next_attempt_at": None,
            "estimated_send_at": "2023-11-14T22:13:20Z",
            "subject": "Hello",
        }

    def test_row_without_envelope(self) -> None:
        """
        When the envelope cannot be read, the row still shows what the
        scheduler knows.
        """
        queued = entry("q")
        why = explain(queued, alone(queued), conditions())
        row = queue_row(queued, None, why)
        assert (row.username, row.sender, row.recipients, row.accepted_at, row.subject) == (
            None,
            None,
            (),
            None,
            None,
        )
        assert row.state is MessageState.QUEUED

    def test_iso8601(self) -> None:
        """
        Times are UTC, to the second, with a Z; None stays None.
        """
        assert iso8601(0.0) == "1970-01-01T00:00:00Z"
        assert iso8601(NOW + 0.9) == "2023-11-14T22:13:20Z"
        assert iso8601(None) is None


class TestMessageSubject:
    @pytest.mark.parametrize(
        ("message", "subject"),
        [
            (b"From: a@b.example\r\nSubject: Hello world\r\n\r\nbody", "Hello world"),
            (b"subject:  lower  case\n\nbody", "lower case"),
            (b"Subject: folded\r\n  over two lines\r\n\r\n", "folded over two lines"),
            (b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n", "caf\u00e9"),
            (b"Subject: =?utf-8?b?5pel5pys?=\r\n\r\n", "\u65e5\u672c"),
            (b"Subject: tab\there\r\n\r\n", "tab here"),
            (b"Subject: \r\n\r\n", ""),
            (b"From: a@b.example\r\n\r\nSubject: in the body\r\n", None),
            (b"", None),
        ],
    )
    def test_subject_as_an_admin_reads_it(self, message: bytes, subject: str | None) -> None:
        """
        The subject is decoded, unfolded, its white space made single
        spaces; a message without one (or with it only in the body) has
        none.
        """
        assert message_subject(message) == subject

    def test_undecodable_bytes_are_replaced(self) -> None:
        """
        Raw 8-bit bytes that are not text become replacement characters,
        never lone surrogates (which no page or AMP box could carry).
        """
        subject = message_subject(b"Subject: bad \xff\xfe bytes\r\n\r\n")
        assert subject is not None
        assert subject.startswith("bad ")
        assert subject.endswith(" bytes")
        subject.encode("utf-8")

    def test_length_at_the_limit_and_one_past(self) -> None:
        """
        A subject of L{MAX_SUBJECT_LENGTH} characters is shown whole; one
        more and it is cut to the limit, ending with an ellipsis.
        """
        at_limit = "x" * MAX_SUBJECT_LENGTH
        assert message_subject(f"Subject: {at_limit}\r\n\r\n".encode()) == at_limit
        past = message_subject(f"Subject: {at_limit}y\r\n\r\n".encode())
        assert past == "x" * (MAX_SUBJECT_LENGTH - 1) + "\u2026"

    @given(st.binary(max_size=400))
    def test_any_bytes_give_printable_bounded_text(self, message: bytes) -> None:
        """
        Whatever the message, the subject is absent or printable UTF-8 text
        within the limit.
        """
        subject = message_subject(b"Subject: " + message)
        if subject is not None:
            assert len(subject) <= MAX_SUBJECT_LENGTH
            assert subject.isprintable()
            subject.encode("utf-8")

    @given(st.text(max_size=300))
    def test_any_text_header_gives_printable_bounded_text(self, text: str) -> None:
        """
        Any text, encoded as an RFC 2047 word or raw, gives printable text
        within the limit.
        """
        encoded = email.header.Header(text, "utf-8").encode()
        for raw in (encoded.encode("ascii"), text.encode("utf-8", "surrogatepass")):
            subject = message_subject(b"Subject: " + raw + b"\r\n\r\n")
            if subject is not None:
                assert len(subject) <= MAX_SUBJECT_LENGTH
                assert subject.isprintable()
                subject.encode("utf-8")


class TestPageCandidates:
    def test_keeps_the_first_in_queue_id_order(self) -> None:
        """
        However the ids come, and in however many runs, the first C{keep}
        in order are kept (pruning as it goes).
        """
        candidates = PageCandidates(3)
        for run in ([9, 1, 8], [4, 7], [], [2, 6, 5, 3, 10]):
            candidates.add(f"id{n:02d}" for n in run)
        assert candidates.queue_ids() == ["id01", "id02", "id03"]

    @pytest.mark.parametrize("fed", [0, 1, 2, 3])
    def test_fewer_than_keep(self, fed: int) -> None:
        """
        Below, at and one past C{keep}, what was fed is kept up to C{keep}.
        """
        candidates = PageCandidates(2)
        candidates.add(f"id{n}" for n in reversed(range(fed)))
        assert candidates.queue_ids() == [f"id{n}" for n in range(min(fed, 2))]

    def test_keep_must_be_positive(self) -> None:
        """
        Keeping nothing is refused.
        """
        with pytest.raises(ValueError, match="keep"):
            PageCandidates(0)


class TestDocuments:
    def test_status_document(self) -> None:
        """
        The status: paused, deliveries under way, a count for every queue
        state (0 when absent), rate and concurrency.
        """
        status = QueueStatus(
            paused=True,
            in_flight=2,
            counts={MessageState.QUEUED: 5, MessageState.SENDING: 2},
            rate=1.5,
            concurrency=4,
        )
        assert status_document(status) == {
            "paused": True,
            "in_flight": 2,
            "counts": {"queued": 5, "sending": 2, "deferred": 0, "held": 0},
            "rate": 1.5,
            "concurrency": 4,
        }

    def test_listing_and_change_documents(self) -> None:
        """
        A listing is the status with C{messages} and C{next_after}; a change
        names the message, its state and its priority.
        """
        status = QueueStatus(paused=False, in_flight=0, counts={}, rate=0.0, concurrency=1)
        queued = entry("q")
        why = explain(queued, alone(queued), conditions())
        row = queue_row(queued, None, why)
        document = listing_document(QueueListing((row,), "q", status))
        assert document["messages"] == [row_document(row)]
        assert document["next_after"] == "q"
        assert document["paused"] is False
        change = MessageChange("q", MessageState.HELD, Priority.LOW)
        assert change_document(change) == {"queue_id": "q", "state": "held", "priority": 4}
