"""
Tests for L{smtpgw.stats}: daily counts per list kept in memory and
written to a real SQLite database on a timer (a L{Clock}) and at stop, read
back with the pending counts; and the two decorators that feed them from
the queue's submissions and the outbound's results.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest
import pytest_twisted
from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpgw import stats as stats_module
from smtpgw.database import open_database
from smtpgw.interfaces import DeliveryResult, IMessageQueue, IOutbound, JournalUnavailable
from smtpgw.metrics import GatewayMetrics
from smtpgw.model import Envelope, Priority
from smtpgw.queue import DSN_USERNAME
from smtpgw.stats import (
    MAX_DAYS,
    CountingOutbound,
    CountingQueue,
    DailyStats,
    DayCounts,
    utc_day,
)
from tests.session_fakes import FakeQueue
from tests.twisted_support import async_test, global_reactor

P = ParamSpec("P")

#: 2023-11-14 22:13:20 UTC.
T0 = 1_700_000_000.0
#: 2023-11-15 00:00:00 UTC, the midnight after T0.
MIDNIGHT = 1_700_006_400.0
INTERVAL = 5.0


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(T0)
    return c


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "smtpgw.db"


@pytest.fixture
def daily(db_path: Path, clock: Clock) -> Iterator[DailyStats]:
    s = DailyStats(db_path, reactor=global_reactor(), clock=clock, flush_interval=INTERVAL)
    s.startService()
    yield s
    if s.running:
        pytest_twisted.blockon(s.stopService())


def stored(db_path: Path) -> set[tuple[str, str, int, int, int, int]]:
    """
    The rows of C{daily_stats}, read with a connection of the test's own.
    """
    connection = open_database(db_path)
    try:
        return {
            tuple(row)
            for row in connection.execute(
                "SELECT day, list, accepted, delivered, deferred, bounced FROM daily_stats"
            )
        }
    finally:
        connection.close()


# -- the day -----------------------------------------------------------------


def test_utc_day_changes_exactly_at_utc_midnight() -> None:
    """
    The last instant before midnight UTC is the old day; midnight is the
    new one.
    """
    assert utc_day(MIDNIGHT - 0.001) == "2023-11-14"
    assert utc_day(MIDNIGHT) == "2023-11-15"


def test_day_counts_as_dict_has_the_json_fields() -> None:
    """
    C{as_dict} gives the day and the four counts.
    """
    assert DayCounts("2023-11-14", 1, 2, 3, 4).as_dict() == {
        "day": "2023-11-14",
        "accepted": 1,
        "delivered": 2,
        "deferred": 3,
        "bounced": 4,
    }


# -- counting and writing ------------------------------------------------------


def test_bad_arguments_are_refused(db_path: Path, clock: Clock) -> None:
    """
    A flush interval that is not positive, a negative count, and a number
    of days outside 1..MAX_DAYS raise L{ValueError}.
    """
    with pytest.raises(ValueError, match="flush_interval"):
        DailyStats(db_path, reactor=global_reactor(), clock=clock, flush_interval=0)
    s = DailyStats(db_path, reactor=global_reactor(), clock=clock)
    with pytest.raises(ValueError, match="negative"):
        s.count("news", accepted=-1)
    for count in (0, MAX_DAYS + 1):
        with pytest.raises(ValueError, match="count"):
            s.days(None, count)


@async_test
async def test_pending_counts_are_visible_in_today(daily: DailyStats, db_path: Path) -> None:
    """
    Counts not yet written are in C{today()}, per list and summed over
    lists, while the table is still empty.
    """
    daily.count("news", accepted=2, delivered=1)
    daily.count("news", deferred=1)
    daily.count("promo", accepted=1, bounced=1)
    assert stored(db_path) == set()
    assert await daily.today("news") == {
        "day": "2023-11-14",
        "list": "news",
        "accepted": 2,
        "delivered": 1,
        "deferred": 1,
        "bounced": 0,
    }
    assert await daily.today() == {
        "day": "2023-11-14",
        "list": None,
        "accepted": 3,
        "delivered": 1,
        "deferred": 1,
        "bounced": 1,
    }
    assert await daily.today("other") == {
        "day": "2023-11-14",
        "list": "other",
        "accepted": 0,
        "delivered": 0,
        "deferred": 0,
        "bounced": 0,
    }


@async_test
async def test_counts_are_written_one_interval_after_the_first(
    daily: DailyStats, db_path: Path, clock: Clock
) -> None:
    """
    Nothing is written just before the interval has passed since the first
    count; at the interval, all pending counts go in one write.
    """
    daily.count("news", accepted=1)
    clock.advance(1.0)
    daily.count("news", accepted=1)
    daily.count("promo", delivered=3)
    clock.advance(INTERVAL - 1.0 - 0.001)
    await daily.idle()
    assert stored(db_path) == set()
    assert daily.pending == 2
    clock.advance(0.001)
    await daily.idle()
    assert stored(db_path) == {
        ("2023-11-14", "news", 2, 0, 0, 0),
        ("2023-11-14", "promo", 0, 3, 0, 0),
    }
    assert daily.pending == 0
    assert clock.getDelayedCalls() == []


@async_test
async def test_later_writes_add_to_the_stored_counts(
    daily: DailyStats, db_path: Path, clock: Clock
) -> None:
    """
    A second write adds to the row of the same day and list; reads give
    stored plus pending.
    """
    daily.count("news", accepted=1, delivered=1)
    await daily.flush()
    daily.count("news", accepted=2)
    await daily.flush()
    daily.count("news", bounced=1)
    assert stored(db_path) == {("2023-11-14", "news", 3, 1, 0, 0)}
    today = await daily.today("news")
    assert (today["accepted"], today["delivered"], today["bounced"]) == (3, 1, 1)


@async_test
async def test_counts_are_filed_under_their_utc_day_across_midnight(
    daily: DailyStats, db_path: Path, clock: Clock
) -> None:
    """
    A count made the last second before midnight UTC stays on that day,
    though it is written after midnight; a count at midnight is the next
    day's, and C{today()} shows only it.
    """
    clock.advance(MIDNIGHT - 1.0 - clock.seconds())
    daily.count("news", accepted=1)
    clock.advance(1.0)
    daily.count("news", accepted=5)
    assert (await daily.today("news"))["accepted"] == 5
    assert [d.accepted for d in await daily.days("news", 2)] == [1, 5]
    clock.advance(INTERVAL)
    await daily.idle()
    assert stored(db_path) == {
        ("2023-11-14", "news", 1, 0, 0, 0),
        ("2023-11-15", "news", 5, 0, 0, 0),
    }
    assert (await daily.today("news"))["accepted"] == 5


@async_test
async def test_days_gives_the_last_n_days_oldest_first_with_zeros(
    daily: DailyStats, clock: Clock
) -> None:
    """
    C{days} answers exactly C{count} days ending today, oldest first, a
    day without counts as zeros, stored and pending counts together, one
    list's or all lists' summed.
    """
    daily.count("news", accepted=1)
    daily.count("promo", accepted=10)
    await daily.flush()
    clock.advance(2 * 86400)
    daily.count("news", delivered=2)
    news = await daily.days("news", 4)
    assert news == [
        DayCounts("2023-11-13"),
        DayCounts("2023-11-14", accepted=1),
        DayCounts("2023-11-15"),
        DayCounts("2023-11-16", delivered=2),
    ]
    everything = await daily.days(None, 3)
    assert [(d.day, d.accepted, d.delivered) for d in everything] == [
        ("2023-11-14", 11, 0),
        ("2023-11-15", 0, 0),
        ("2023-11-16", 0, 2),
    ]
    assert len(await daily.days(None, MAX_DAYS)) == MAX_DAYS


@async_test
async def test_stop_writes_the_pending_counts(
    daily: DailyStats, db_path: Path, clock: Clock
) -> None:
    """
    Counts pending when the service stops are written, and no timer is
    left behind.
    """
    daily.count("news", accepted=1, deferred=2)
    assert clock.getDelayedCalls() != []
    await daily.stopService()
    assert stored(db_path) == {("2023-11-14", "news", 1, 0, 2, 0)}
    assert clock.getDelayedCalls() == []


@async_test
async def test_counts_made_before_start_are_written_after_it(db_path: Path, clock: Clock) -> None:
    """
    Counting before the service runs schedules nothing; the start
    schedules the write.
    """
    s = DailyStats(db_path, reactor=global_reactor(), clock=clock, flush_interval=INTERVAL)
    s.count("news", accepted=1)
    assert clock.getDelayedCalls() == []
    s.startService()
    try:
        clock.advance(INTERVAL)
        await s.idle()
        assert stored(db_path) == {("2023-11-14", "news", 1, 0, 0, 0)}
    finally:
        await s.stopService()


@async_test
async def test_a_failed_write_keeps_the_counts_for_the_next(
    daily: DailyStats, db_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    When writing fails the counts go back into memory (added to any made
    since), stay visible, and are written by the next write.
    """
    real = stats_module._add_rows
    calls: list[int] = []

    def failing_once(connection: sqlite3.Connection, rows: Any) -> None:
        calls.append(len(rows))
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        real(connection, rows)

    monkeypatch.setattr(stats_module, "_add_rows", failing_once)
    daily.count("news", accepted=1)
    await daily.flush()
    assert stored(db_path) == set()
    daily.count("news", accepted=1)
    assert (await daily.today("news"))["accepted"] == 2
    clock.advance(INTERVAL)
    await daily.idle()
    assert stored(db_path) == {("2023-11-14", "news", 2, 0, 0, 0)}
    assert calls == [1, 1]


# -- the decorators ----------------------------------------------------------------


@define
class Recorder:
    """
    A L{stats_module.StatsCounter} that records each call.
    """

    calls: list[tuple[str, dict[str, int]]] = field(factory=list)

    def count(
        self,
        list: str,
        *,
        accepted: int = 0,
        delivered: int = 0,
        deferred: int = 0,
        bounced: int = 0,
    ) -> None:
        counts = {
            "accepted": accepted,
            "delivered": delivered,
            "deferred": deferred,
            "bounced": bounced,
        }
        self.calls.append((list, {k: v for k, v in counts.items() if v}))


def envelope(*recipients: str, list_name: str = "news", username: str = "alice") -> Envelope:
    return Envelope(
        queue_id="Q1",
        list=list_name,
        username=username,
        sender="a@example.com",
        recipients=recipients or ("b@x.example",),
        priority=Priority.NORMAL,
        accepted_at=T0,
    )


@implementer(IOutbound)
@define
class FakeOutbound:
    """
    Answers every delivery with C{result} (or fails with C{error}).
    """

    result: DeliveryResult = field(factory=DeliveryResult)
    error: Exception | None = None
    delivered: list[Envelope] = field(factory=list)

    def deliver(self, envelope: Envelope, body: bytes) -> Deferred[DeliveryResult]:
        self.delivered.append(envelope)
        if self.error is not None:
            return fail(self.error)
        return succeed(self.result)


def test_counting_queue_provides_imessagequeue() -> None:
    """
    L{CountingQueue} is an L{IMessageQueue}, and passes C{accepting}
    through.
    """
    inner = FakeQueue(accepting=False)
    queue = CountingQueue(inner, Recorder())
    assert verifyObject(IMessageQueue, queue)
    assert queue.accepting is False
    inner.accepting = True
    assert queue.accepting is True


def test_counting_queue_counts_accepted_once_durable() -> None:
    """
    A submission counts as accepted for its list only once the wrapped
    queue's L{Deferred} fires; the result passes through.
    """
    recorder = Recorder()
    inner = FakeQueue(mode="pending")
    queue = CountingQueue(inner, recorder)
    d = queue.submit(envelope(list_name="promo"), b"body")
    assert inner.submitted[0][0].list == "promo"
    assert recorder.calls == []
    inner.pending[0].callback(None)
    assert recorder.calls == [("promo", {"accepted": 1})]
    assert d.called
    assert d.result is None


def test_counting_queue_does_not_count_a_refused_submission() -> None:
    """
    A submission the journal refuses is not counted, and the failure
    reaches the caller.
    """
    recorder = Recorder()
    queue = CountingQueue(FakeQueue(mode="unavailable"), recorder)
    failures: list[Any] = []
    queue.submit(envelope(), b"body").addErrback(failures.append)
    assert recorder.calls == []
    [failure] = failures
    assert failure.check(JournalUnavailable)


def test_counting_outbound_provides_ioutbound() -> None:
    """
    L{CountingOutbound} is an L{IOutbound}.
    """
    assert verifyObject(IOutbound, CountingOutbound(FakeOutbound(), Recorder()))


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (DeliveryResult(delivered=("b@x", "c@x")), {"delivered": 1}),
        (DeliveryResult(delivered=("b@x",), deferred=(("c@x", "4.2.0"),)), {"deferred": 1}),
        (DeliveryResult(delivered=("b@x",), bounced=(("c@x", "5.1.1"),)), {"bounced": 1}),
        (
            DeliveryResult(deferred=(("b@x", "4.2.0"),), bounced=(("c@x", "5.1.1"),)),
            {"deferred": 1, "bounced": 1},
        ),
        # A recipient the outbound gave no outcome for is retried by the queue.
        (DeliveryResult(delivered=("b@x",)), {"deferred": 1}),
    ],
)
def test_counting_outbound_counts_the_attempt_outcome(
    result: DeliveryResult, expected: dict[str, int]
) -> None:
    """
    An attempt counts as delivered when every recipient took the message,
    deferred when one is left to retry, bounced when one failed for good;
    the result passes through unchanged.
    """
    recorder = Recorder()
    outbound = CountingOutbound(FakeOutbound(result), recorder)
    d = outbound.deliver(envelope("b@x", "c@x"), b"body")
    assert d.result is result
    assert recorder.calls == [("news", expected)]


def test_counting_outbound_feeds_the_metrics() -> None:
    """
    With metrics, each attempt and its recipients are counted there too.
    """
    metrics = GatewayMetrics()
    outbound = CountingOutbound(
        FakeOutbound(DeliveryResult(delivered=("b@x", "c@x"))), Recorder(), metrics
    )
    outbound.deliver(envelope("b@x", "c@x"), b"body")
    assert metrics.registry.get_sample_value("smtpgw_delivery_attempts_total") == 1
    assert (
        metrics.registry.get_sample_value(
            "smtpgw_delivery_recipients_total", {"outcome": "delivered"}
        )
        == 2
    )


def test_counting_outbound_leaves_the_queues_own_bounces_out() -> None:
    """
    A bounce (DSN) the queue sends to the sender is not mail of the list:
    not counted.
    """
    recorder = Recorder()
    outbound = CountingOutbound(FakeOutbound(DeliveryResult(delivered=("b@x",))), recorder)
    outbound.deliver(envelope("b@x", username=DSN_USERNAME), b"report")
    assert recorder.calls == []
    assert stats_module._DSN_USERNAME == DSN_USERNAME


def test_counting_outbound_failure_passes_through_counted_deferred() -> None:
    """
    Should the wrapped outbound fail (against its interface), the failure
    reaches the queue (which retries every recipient) and counts as
    deferred.
    """
    recorder = Recorder()
    outbound = CountingOutbound(FakeOutbound(error=RuntimeError("boom")), recorder)
    failures: list[Any] = []
    outbound.deliver(envelope(), b"body").addErrback(failures.append)
    assert [f.type for f in failures] == [RuntimeError]
    assert recorder.calls == [("news", {"deferred": 1})]


@async_test
async def test_decorators_feed_daily_stats(daily: DailyStats) -> None:
    """
    The decorators count into a real L{DailyStats}: one accepted, one
    delivered, visible in today's counts.
    """
    queue = CountingQueue(FakeQueue(), daily)
    outbound = CountingOutbound(FakeOutbound(DeliveryResult(delivered=("b@x.example",))), daily)
    await queue.submit(envelope(), b"body")
    await outbound.deliver(envelope(), b"body")
    today = await daily.today("news")
    assert (today["accepted"], today["delivered"], today["deferred"]) == (1, 1, 0)


def test_decorators_around_the_real_queue() -> None:
    """
    Wired as the gateway wires them (the counting queue for the sessions,
    the counting outbound inside the queue, the metrics reading the
    queue), one message submitted and sent counts accepted and delivered
    for its list, and the metrics see the queue's delivered total.
    """
    from smtpgw.memjournal import MemoryJournal
    from smtpgw.queue import MessageQueue

    clock = Clock()
    recorder = Recorder()
    metrics = GatewayMetrics()
    inner = FakeOutbound(DeliveryResult(delivered=("b@x.example",)))
    queue = MessageQueue(
        MemoryJournal(), CountingOutbound(inner, recorder, metrics), clock, rng=lambda: 0.5
    )
    metrics.track_queue(queue)
    sessions_queue = CountingQueue(queue, recorder)
    queue.startService()
    try:
        submitted = sessions_queue.submit(envelope("b@x.example", list_name="promo"), b"body")
        clock.advance(1.0)
        assert submitted.called
        assert [e.list for e in inner.delivered] == ["promo"]
        # The queue may dispatch before the submission's callbacks have run.
        assert sorted(recorder.calls, key=repr) == [
            ("promo", {"accepted": 1}),
            ("promo", {"delivered": 1}),
        ]
        assert metrics.registry.get_sample_value("smtpgw_delivered_total") == 1
        assert metrics.registry.get_sample_value("smtpgw_delivery_attempts_total") == 1
    finally:
        stopped = queue.stopService()
        clock.advance(1.0)
        assert stopped is None or stopped.called
