"""
Tests for L{smtpgw.metrics}: the exposition parsed back as Prometheus reads
it, the queue's counters read at scrape time, the SMTP sessions' hooks
(driven in memory through L{tests.session_fakes.Harness}) and the journal's
fsync observer on a real L{FileJournal}.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ParamSpec, cast

import pytest
from attrs import define, field
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from twisted.cred.portal import Portal
from twisted.logger import LogLevel

from smtpgw.interfaces import DeliveryResult
from smtpgw.journal import FileJournal
from smtpgw.limits import Limits
from smtpgw.metrics import REJECT_REASONS, GatewayMetrics, RejectReason, SessionMetrics
from smtpgw.model import Enforcement, Envelope, MessageState, Priority, QueueIdGenerator
from smtpgw.realm import GatewayRealm
from smtpgw.session import GatewaySMTPFactory
from tests.session_fakes import (
    HOSTNAME,
    FakeQueue,
    FakeUsers,
    Harness,
    make_user,
    message,
    plain,
)
from tests.twisted_support import async_test, logged_lines

P = ParamSpec("P")


@pytest.fixture
def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# -- reading the exposition back ---------------------------------------------


def samples(metrics: GatewayMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """
    Every sample of the exposition, as Prometheus parses it, by name and
    labels.
    """
    body, _ = metrics.render()
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    """
    One sample's value; a missing sample fails the test with a KeyError.
    """
    return samples(metrics)[(name, frozenset(labels.items()))]


def rejected(metrics: GatewayMetrics) -> dict[str, float]:
    """
    The refusals counted, by reason, leaving out those at 0.
    """
    counts = {
        reason: value(metrics, "smtpgw_messages_rejected_total", reason=reason)
        for reason in REJECT_REASONS
    }
    return {reason: count for reason, count in counts.items() if count}


@define
class FakeStats:
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    in_flight: int = 0
    queued_by_priority: Mapping[Priority, int] = field(factory=dict)
    by_state: Mapping[MessageState, int] = field(factory=dict)
    paused: bool = False


@define
class FakeStatsQueue:
    """
    A queue whose C{stats()} gives C{current}, counting the calls.
    """

    current: FakeStats = field(factory=FakeStats)
    calls: int = 0

    def stats(self) -> FakeStats:
        self.calls += 1
        return self.current


# -- the registry and the exposition -------------------------------------------


def test_render_gives_the_prometheus_text_format() -> None:
    """
    C{render} answers the exposition and the content type of the text
    format, and parses back with every gateway metric in it.
    """
    metrics = GatewayMetrics()
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    names = {f.name for f in text_string_to_metric_families(body.decode("utf-8"))}
    assert {
        "smtpgw_connections",
        "smtpgw_connections_open",
        "smtpgw_messages_accepted",
        "smtpgw_messages_rejected",
        "smtpgw_journal_fsync_seconds",
        "smtpgw_delivery_attempts",
        "smtpgw_delivery_recipients",
    } <= names


def test_every_reject_reason_is_exposed_from_the_start() -> None:
    """
    Each reason of the fixed set is a series at 0 before anything is
    refused, so a rate over it is defined from the first scrape.
    """
    metrics = GatewayMetrics()
    for reason in REJECT_REASONS:
        assert value(metrics, "smtpgw_messages_rejected_total", reason=reason) == 0


def test_unknown_reasons_count_as_other_and_add_no_label() -> None:
    """
    A reason outside the fixed set counts as C{other}: the label set
    stays bounded whatever a caller passes.
    """
    metrics = GatewayMetrics()
    metrics.rejected("too_many_recipients")
    metrics.rejected("made up")
    metrics.rejected(RejectReason.BAD_LINE)
    assert rejected(metrics) == {"too_many_recipients": 1, "other": 1, "bad_line": 1}
    reasons = {
        dict(labels)["reason"]
        for name, labels in samples(metrics)
        if name == "smtpgw_messages_rejected_total"
    }
    assert reasons == set(REJECT_REASONS)


def test_each_instance_has_its_own_registry() -> None:
    """
    Two L{GatewayMetrics} count apart, and neither registers in the
    process-wide default registry.
    """
    first, second = GatewayMetrics(), GatewayMetrics()
    first.accepted()
    assert value(first, "smtpgw_messages_accepted_total") == 1
    assert value(second, "smtpgw_messages_accepted_total") == 0
    assert REGISTRY.get_sample_value("smtpgw_messages_accepted_total") is None


def test_gateway_metrics_are_session_metrics() -> None:
    """
    L{GatewayMetrics} has the methods the sessions call.
    """
    session_metrics: SessionMetrics = GatewayMetrics()
    for name in ("connection_opened", "connection_closed", "accepted", "rejected"):
        assert callable(getattr(session_metrics, name))


# -- the queue, read at scrape time --------------------------------------------


def test_queue_stats_are_read_at_each_scrape() -> None:
    """
    The queue's counters are exposed as they are when scraped: per
    priority, per state, in flight, delivered, deferred, bounced, paused.
    """
    queue = FakeStatsQueue(
        FakeStats(
            delivered=7,
            deferred=3,
            bounced=2,
            in_flight=4,
            queued_by_priority={Priority.VERY_HIGH: 5, Priority.NORMAL: 9},
            by_state={MessageState.QUEUED: 14, MessageState.HELD: 1},
            paused=True,
        )
    )
    metrics = GatewayMetrics(queue)
    assert queue.calls == 0
    found = samples(metrics)
    assert queue.calls == 1

    def get(name: str, **labels: str) -> float:
        return found[(name, frozenset(labels.items()))]

    assert [get("smtpgw_queue_messages", priority=str(p)) for p in range(1, 6)] == [
        5,
        0,
        9,
        0,
        0,
    ]
    assert get("smtpgw_queue_messages_by_state", state="queued") == 14
    assert get("smtpgw_queue_messages_by_state", state="held") == 1
    assert get("smtpgw_queue_messages_by_state", state="sending") == 0
    assert get("smtpgw_deliveries_in_flight") == 4
    assert get("smtpgw_delivered_total") == 7
    assert get("smtpgw_deferred_total") == 3
    assert get("smtpgw_bounced_total") == 2
    assert get("smtpgw_queue_paused") == 1

    queue.current = FakeStats(delivered=8)
    assert value(metrics, "smtpgw_delivered_total") == 8
    assert value(metrics, "smtpgw_queue_paused") == 0


def test_queue_tracked_later_and_only_once() -> None:
    """
    Without a queue no queue metric is exposed; L{track_queue} adds them,
    and a second queue is refused.
    """
    metrics = GatewayMetrics()
    assert ("smtpgw_delivered_total", frozenset()) not in samples(metrics)
    metrics.track_queue(FakeStatsQueue(FakeStats(delivered=1)))
    assert value(metrics, "smtpgw_delivered_total") == 1
    with pytest.raises(ValueError, match="already"):
        metrics.track_queue(FakeStatsQueue())


def test_real_queue_stats_are_exposed() -> None:
    """
    The collector reads L{smtpgw.queue.MessageQueue.stats} as it is.
    """
    from twisted.internet.task import Clock

    from smtpgw.memjournal import MemoryJournal
    from smtpgw.outbound import CaptureOutbound
    from smtpgw.queue import MessageQueue

    outbound = CaptureOutbound("/nonexistent", cast(Any, Clock()))
    queue = MessageQueue(MemoryJournal(), outbound, Clock())
    metrics = GatewayMetrics(queue)
    assert value(metrics, "smtpgw_queue_messages", priority="3") == 0
    assert value(metrics, "smtpgw_queue_paused") == 0


# -- delivery attempts -----------------------------------------------------------


def test_delivery_attempts_count_recipients_by_outcome() -> None:
    """
    Each attempt counts once, and its recipients by what became of them.
    """
    metrics = GatewayMetrics()
    metrics.delivery_attempted(
        DeliveryResult(
            delivered=("a@x.example", "b@x.example"),
            deferred=(("c@x.example", "4.2.0 busy"),),
        )
    )
    metrics.delivery_attempted(DeliveryResult(bounced=(("d@x.example", "5.1.1 unknown"),)))
    assert value(metrics, "smtpgw_delivery_attempts_total") == 2
    assert value(metrics, "smtpgw_delivery_recipients_total", outcome="delivered") == 2
    assert value(metrics, "smtpgw_delivery_recipients_total", outcome="deferred") == 1
    assert value(metrics, "smtpgw_delivery_recipients_total", outcome="bounced") == 1


# -- the journal's fsync observer --------------------------------------------------


def test_fsync_observations_fill_the_histogram() -> None:
    """
    Each observation lands in its bucket, the count and the sum.
    """
    metrics = GatewayMetrics()
    metrics.observe_fsync(0.0004)
    metrics.observe_fsync(0.02)
    assert value(metrics, "smtpgw_journal_fsync_seconds_count") == 2
    assert value(metrics, "smtpgw_journal_fsync_seconds_bucket", le="0.0005") == 1
    assert value(metrics, "smtpgw_journal_fsync_seconds_bucket", le="0.025") == 2
    assert value(metrics, "smtpgw_journal_fsync_seconds_sum") == pytest.approx(0.0204)


def _envelope(number: int) -> Envelope:
    return Envelope(
        queue_id=f"Q{number:08d}",
        list="news",
        username="alice",
        sender="a@example.com",
        recipients=("b@example.org",),
        priority=Priority.NORMAL,
        accepted_at=1_700_000_000.0,
    )


@async_test
async def test_file_journal_reports_each_fsync_from_its_writer_thread(
    tmp_path: Path, reactor: Any
) -> None:
    """
    A real L{FileJournal} calls its C{fsync_observer} once per group
    commit, on the writer thread, with the time the fsync took; the
    histogram fed that way counts the commits.
    """
    metrics = GatewayMetrics()
    calls: list[tuple[float, str]] = []

    def observe(seconds: float) -> None:
        calls.append((seconds, threading.current_thread().name))
        metrics.observe_fsync(seconds)

    journal = FileJournal(tmp_path, reactor, fsync_observer=observe)
    journal.replay()
    journal.start()
    try:
        for number in range(3):
            await journal.accept(_envelope(number), b"Subject: x\r\n\r\nhello\r\n")
    finally:
        await journal.stop()
    stats = journal.stats()
    assert stats.fsyncs == 3
    assert len(calls) == stats.fsyncs
    assert all(seconds >= 0 for seconds, _ in calls)
    assert calls[-1][0] == stats.last_fsync_seconds
    assert {thread for _, thread in calls} == {"smtpgw-journal-writer"}
    assert value(metrics, "smtpgw_journal_fsync_seconds_count") == 3


@async_test
async def test_a_failing_fsync_observer_never_fails_the_commit(
    tmp_path: Path, reactor: Any, warnings_logged: list[str]
) -> None:
    """
    The records are durable before the observer runs: an observer that
    raises is reported as a warning, and the message is still accepted.
    """

    def broken(seconds: float) -> None:
        raise RuntimeError("observer broke")

    journal = FileJournal(tmp_path, reactor, fsync_observer=broken)
    journal.replay()
    journal.start()
    try:
        location = await journal.accept(_envelope(1), b"Subject: x\r\n\r\nhello\r\n")
    finally:
        await journal.stop()
    assert location.segment == 1
    assert any("observer broke" in text for text in warnings_logged)


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    """
    The text of the warnings logged during the test.
    """
    with logged_lines(LogLevel.warn) as found:
        yield found


# -- the SMTP sessions' hooks ------------------------------------------------------


def metered(harness: Harness) -> GatewayMetrics:
    """
    Give C{harness}'s factory a fresh L{GatewayMetrics} (read by each new
    session) and return it.
    """
    metrics = GatewayMetrics()
    harness.factory.metrics = metrics
    return metrics


def test_factory_takes_metrics_and_defaults_to_none() -> None:
    """
    The factory keeps the metrics it is given; without any, sessions run
    as before (a no-op stands in).
    """
    harness = Harness()
    metrics = GatewayMetrics()
    factory = GatewaySMTPFactory(
        portal=Portal(GatewayRealm(), []),
        queue=FakeQueue(),
        alerts=harness.alerts,
        users=FakeUsers(),
        hostname=HOSTNAME,
        limits=Limits(),
        tls=lambda: None,
        require_tls=False,
        clock=harness.clock,
        queue_ids=QueueIdGenerator(),
        metrics=metrics,
    )
    assert factory.metrics is metrics
    assert not isinstance(harness.factory.metrics, GatewayMetrics)
    client = harness.connect()
    assert client.login()[-1].startswith(b"235 ")
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 Ok: queued")


def test_connections_are_counted_and_open_ones_gauged() -> None:
    """
    Every connection counts; the gauge follows those still open, and a
    connection lost twice is released once.
    """
    harness = Harness()
    metrics = metered(harness)
    first, second = harness.connect(), harness.connect("192.0.2.2")
    assert value(metrics, "smtpgw_connections_total") == 2
    assert value(metrics, "smtpgw_connections_open") == 2
    first.lose()
    first.lose()
    assert value(metrics, "smtpgw_connections_open") == 1
    second.lose()
    assert value(metrics, "smtpgw_connections_open") == 0
    assert value(metrics, "smtpgw_connections_total") == 2


def test_connection_refused_at_the_address_limit_is_counted_and_closed() -> None:
    """
    At the per-address limit the connection is served; one past it is
    refused with 421, counted as a connection, and not left open in the
    gauge once it is gone.
    """
    harness = Harness(limits=Limits(max_connections_per_ip=1))
    metrics = metered(harness)
    served = harness.connect()
    refused = harness.connect()
    assert served.greeting[0].startswith(b"220 ")
    assert refused.greeting[0].startswith(b"421 ")
    assert value(metrics, "smtpgw_connections_total") == 2
    refused.lose()
    assert value(metrics, "smtpgw_connections_open") == 1


def test_accepted_messages_are_counted_and_nothing_rejected() -> None:
    """
    Each message answered 250 counts as accepted; no refusal is counted.
    """
    harness = Harness()
    metrics = metered(harness)
    client = harness.logged_in()
    for _ in range(2):
        assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 Ok: queued")
    assert value(metrics, "smtpgw_messages_accepted_total") == 2
    assert rejected(metrics) == {}


def test_monitored_sender_is_accepted_not_rejected() -> None:
    """
    Monitor mode: an unauthorized sender raises an alert but the message
    counts as accepted, not refused.
    """
    harness = Harness(users={"alice": make_user(enforcement=Enforcement.MONITOR)})
    metrics = metered(harness)
    client = harness.logged_in()
    replies = client.mail_transaction(
        message(b"From: boss@evil.example"), sender=b"m@evil.example"
    )
    assert replies[-1].startswith(b"250 2.0.0 ")
    assert value(metrics, "smtpgw_messages_accepted_total") == 1
    assert rejected(metrics) == {}


def test_mail_before_auth_counts_auth_required() -> None:
    """
    MAIL before AUTH: 530 5.7.0, counted as C{auth_required}.
    """
    harness = Harness()
    metrics = metered(harness)
    client = harness.connect()
    client.command(b"EHLO c.example")
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"530 5.7.0 ")
    assert rejected(metrics) == {"auth_required": 1}


def test_revoked_login_at_mail_counts_auth_required() -> None:
    """
    A user deactivated since the login gets 530 5.7.0 at MAIL, counted as
    C{auth_required}.
    """
    harness = Harness(limits=Limits(user_recheck_interval=0.0))
    metrics = metered(harness)
    client = harness.logged_in()
    harness.users["alice"] = make_user(active=False)
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"530 5.7.0 ")
    assert rejected(metrics) == {"auth_required": 1}


def test_failed_logins_up_to_the_limit_then_throttled() -> None:
    """
    With a limit of 3 failures: the first two get 535 (C{auth_failed}),
    the third reaches the limit and gets 421 (C{auth_throttled}), and an
    AUTH after that from the same address is throttled again.
    """
    harness = Harness(limits=Limits(auth_failure_limit=3, auth_failure_delay=0.0))
    metrics = metered(harness)
    client = harness.connect()
    client.command(b"EHLO c.example")
    for _ in range(2):
        reply = client.command(b"AUTH PLAIN " + plain(password="wrong"))
        assert reply == [b"535 5.7.8 Authentication credentials invalid"]
    assert rejected(metrics) == {"auth_failed": 2}
    assert client.command(b"AUTH PLAIN " + plain(password="wrong"))[0].startswith(b"421 4.7.0 ")
    assert rejected(metrics) == {"auth_failed": 2, "auth_throttled": 1}
    again = harness.connect()
    again.command(b"EHLO c.example")
    assert again.command(b"AUTH PLAIN " + plain())[0].startswith(b"421 4.7.0 ")
    assert rejected(metrics) == {"auth_failed": 2, "auth_throttled": 2}


def test_tarpitted_failure_counts_when_answered() -> None:
    """
    A failed login held in the tarpit counts as C{auth_failed} when its 535
    is given, not before.
    """
    harness = Harness(limits=Limits(auth_failure_delay=2.0))
    metrics = metered(harness)
    client = harness.connect()
    client.command(b"EHLO c.example")
    assert client.command(b"AUTH PLAIN " + plain(password="wrong")) == []
    assert rejected(metrics) == {}
    harness.clock.advance(2.0)
    assert client.replies() == [b"535 5.7.8 Authentication credentials invalid"]
    assert rejected(metrics) == {"auth_failed": 1}


def test_auth_without_tls_counts_tls_required() -> None:
    """
    With --require-tls, AUTH in plaintext is refused, counted as
    C{tls_required}.
    """
    harness = Harness(require_tls=True, tls=object())
    metrics = metered(harness)
    client = harness.connect()
    client.command(b"EHLO c.example")
    assert client.command(b"AUTH PLAIN " + plain())[0].startswith(b"530 5.7.0 ")
    assert rejected(metrics) == {"tls_required": 1}


def test_unauthorized_envelope_sender_counts_sender_unauthorized() -> None:
    """
    An envelope sender refused by the policy (550 5.7.1) counts as
    C{sender_unauthorized}.
    """
    harness = Harness()
    metrics = metered(harness)
    client = harness.logged_in()
    assert client.command(b"MAIL FROM:<m@evil.example>")[0].startswith(b"550 5.7.1 ")
    assert rejected(metrics) == {"sender_unauthorized": 1}


def test_unauthorized_header_from_counts_header_from_unauthorized() -> None:
    """
    A header From: refused after DATA (550 5.7.1) counts as
    C{header_from_unauthorized}, and the message not as accepted.
    """
    harness = Harness()
    metrics = metered(harness)
    client = harness.logged_in()
    replies = client.mail_transaction(message(b"From: Boss <boss@evil.example>"))
    assert replies[-1].startswith(b"550 5.7.1 ")
    assert rejected(metrics) == {"header_from_unauthorized": 1}
    assert value(metrics, "smtpgw_messages_accepted_total") == 0


def test_recipients_at_the_limit_then_one_past() -> None:
    """
    With a limit of 2 recipients, the second is accepted and nothing is
    counted; the third gets 452 4.5.3, counted as C{too_many_recipients}.
    """
    harness = Harness(limits=Limits(max_recipients=2))
    metrics = metered(harness)
    client = harness.logged_in()
    client.command(b"MAIL FROM:<a@example.com>")
    assert client.command(b"RCPT TO:<one@x.example>")[0].startswith(b"250 ")
    assert client.command(b"RCPT TO:<two@x.example>")[0].startswith(b"250 ")
    assert rejected(metrics) == {}
    assert client.command(b"RCPT TO:<three@x.example>") == [b"452 4.5.3 Too many recipients"]
    assert rejected(metrics) == {"too_many_recipients": 1}


def test_declared_size_at_the_limit_then_one_past() -> None:
    """
    SIZE= at the limit passes uncounted; one more octet gets 552 5.3.4,
    counted as C{too_large}.
    """
    harness = Harness(limits=Limits(max_size=10_000))
    metrics = metered(harness)
    client = harness.logged_in()
    assert client.command(b"MAIL FROM:<a@example.com> SIZE=10000")[0].startswith(b"250 ")
    client.command(b"RSET")
    assert rejected(metrics) == {}
    assert client.command(b"MAIL FROM:<a@example.com> SIZE=10001")[0].startswith(b"552 5.3.4")
    assert rejected(metrics) == {"too_large": 1}


def test_body_at_the_size_limit_then_one_past() -> None:
    """
    A message of exactly max_size octets is accepted; one octet more gets
    552 5.3.4 after the final dot, counted as C{too_large}.
    """
    limit = 1024
    fill = limit - len(message(body=b"")) - 2
    harness = Harness(limits=Limits(max_size=limit))
    metrics = metered(harness)
    client = harness.logged_in()
    assert client.mail_transaction(message(body=b"x" * fill + b"\r\n"))[-1].startswith(b"250 ")
    assert rejected(metrics) == {}
    too_big = message(body=b"x" * (fill + 1) + b"\r\n")
    assert client.mail_transaction(too_big)[-1].startswith(b"552 5.3.4 ")
    assert rejected(metrics) == {"too_large": 1}
    assert value(metrics, "smtpgw_messages_accepted_total") == 1


@pytest.mark.parametrize("line", [b"bare\nLF inside", b"bare\rCR inside", b"NUL\0inside"])
def test_bare_cr_lf_or_nul_counts_bad_line(line: bytes) -> None:
    """
    A bare CR or LF (or a NUL) in the message refuses it with 5.6.0,
    counted as C{bad_line}.
    """
    harness = Harness()
    metrics = metered(harness)
    client = harness.logged_in()
    replies = client.mail_transaction(b"From: a@example.com\r\n\r\n" + line + b"\r\n")
    assert replies[-1].startswith(b"550 5.6.0 ")
    assert rejected(metrics) == {"bad_line": 1}


def test_data_line_at_the_limit_then_one_past() -> None:
    """
    A body line of exactly max_data_line_length octets is accepted; one
    octet longer refuses the message with 5.6.0, counted as C{bad_line}.
    """
    limits = Limits()
    harness = Harness(limits=limits)
    metrics = metered(harness)
    client = harness.logged_in()
    fits = message(body=b"x" * limits.max_data_line_length + b"\r\n")
    assert client.mail_transaction(fits)[-1].startswith(b"250 ")
    assert rejected(metrics) == {}
    too_long = message(body=b"x" * (limits.max_data_line_length + 1) + b"\r\n")
    assert client.mail_transaction(too_long)[-1].startswith(b"550 5.6.0 ")
    assert rejected(metrics) == {"bad_line": 1}


def test_journal_unavailable_after_data_is_counted() -> None:
    """
    A message the queue cannot make durable (452 4.3.1) counts as
    C{journal_unavailable}, not as accepted.
    """
    harness = Harness(queue=FakeQueue(mode="unavailable"))
    metrics = metered(harness)
    client = harness.logged_in()
    assert client.mail_transaction(message())[-1].startswith(b"452 4.3.1 ")
    assert rejected(metrics) == {"journal_unavailable": 1}
    assert value(metrics, "smtpgw_messages_accepted_total") == 0


def test_queue_not_accepting_at_mail_is_counted() -> None:
    """
    MAIL while the queue takes no mail (452 4.3.1) counts as
    C{journal_unavailable}.
    """
    harness = Harness(queue=FakeQueue(accepting=False))
    metrics = metered(harness)
    client = harness.logged_in()
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"452 4.3.1 ")
    assert rejected(metrics) == {"journal_unavailable": 1}
