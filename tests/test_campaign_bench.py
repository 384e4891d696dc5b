"""
The console-send benchmark measures what it claims to: its sink timestamps
each message at its final dot and tells the injected priority-1 messages by
their header, and its figures (percentiles, pre-empted spans, throughput,
slow bins) come out right on made-up timelines. Nothing here is timed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from bench.campaign_bench import (
    Arrival,
    Injected,
    Settings,
    SinkFile,
    SinkProtocol,
    StateSample,
    covered,
    inside_bursts,
    merge_intervals,
    overtaken,
    per_second,
    percentile,
    preempted_intervals,
    slow_bins,
    state_intervals,
    throughput_figures,
    within,
)


def _sink() -> tuple[SinkProtocol, StringTransport, list[Arrival], list[float]]:
    arrivals: list[Arrival] = []
    now = [10.0]
    protocol = SinkProtocol(arrivals.append, clock=lambda: now[0])
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, arrivals, now


def _replies(transport: StringTransport) -> list[bytes]:
    return [line[:3] for line in transport.value().split(b"\r\n") if line[3:4] == b" "]


def test_sink_records_a_message_at_its_final_dot() -> None:
    """
    A message is recorded once, when its final dot arrives, with the time
    of its C{MAIL}, the envelope recipients and the C{X-Bench-Id} of its
    header (any case).
    """
    protocol, transport, arrivals, now = _sink()
    protocol.dataReceived(
        b"EHLO gw\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<r1@example.org>\r\n"
        b"RCPT TO:<r2@example.org> NOTIFY=NEVER\r\nDATA\r\n"
        b"Subject: x\r\nx-BENCH-id:  p1-000007 \r\n\r\nbody\r\n"
    )
    assert arrivals == []
    now[0] = 12.5
    protocol.dataReceived(b".\r\nQUIT\r\n")
    assert arrivals == [
        Arrival(12.5, "p1-000007", ("r1@example.org", "r2@example.org"), mail_at=10.0)
    ]
    assert _replies(transport) == [b"220", b"250", b"250", b"250", b"250", b"354", b"250", b"221"]
    assert transport.disconnecting


def test_sink_header_only_in_the_header() -> None:
    """
    An C{X-Bench-Id} line in the body does not make a console message a
    priority-1 one, and a dot-stuffed line does not end the message.
    """
    protocol, _, arrivals, _ = _sink()
    protocol.dataReceived(
        b"HELO gw\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n"
        b"Subject: x\r\n\r\nX-Bench-Id: p1-1\r\n..\r\n"
    )
    assert arrivals == []
    protocol.dataReceived(b".\r\n")
    assert arrivals == [Arrival(10.0, None, ("r@example.org",), mail_at=10.0)]


def test_sink_pipelined_transactions_each_recorded() -> None:
    """
    Two transactions in one read are two arrivals, each with its own
    recipients and id; the second's MAIL forgets the first's recipients.
    """
    protocol, transport, arrivals, _ = _sink()
    one = (
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<x@example.org>\r\n"
        b"DATA\r\nX-Bench-Id: b\r\n\r\n.\r\n"
    )
    two = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n\r\n.\r\n"
    protocol.dataReceived(b"EHLO gw\r\n" + one + two)
    assert [(a.bench_id, a.recipients) for a in arrivals] == [
        ("b", ("x@example.org",)),
        (None, ("y@example.org",)),
    ]
    assert b"250-PIPELINING" in transport.value()


def test_sink_unknown_command() -> None:
    """
    A command the sink does not know gets C{502} and records nothing.
    """
    protocol, transport, arrivals, _ = _sink()
    protocol.dataReceived(b"VRFY someone\r\n")
    assert _replies(transport) == [b"220", b"502"]
    assert arrivals == []


@given(
    at=st.floats(min_value=0, max_value=1e7, allow_nan=False),
    bench_id=st.none() | st.from_regex(r"p1-[0-9]{1,8}", fullmatch=True),
    recipients=st.lists(st.from_regex(r"[a-z0-9.]{1,10}@[a-z]{1,8}\.org", fullmatch=True)),
)
def test_arrival_line_round_trip(at: float, bench_id: str | None, recipients: list[str]) -> None:
    """
    What the sink writes reads back the same, to the microsecond.
    """
    back = Arrival.parse(Arrival(at, bench_id, tuple(recipients), at / 2).line())
    assert back.bench_id == bench_id
    assert back.recipients == tuple(recipients)
    assert back.at == pytest.approx(at, abs=1e-6)
    assert back.mail_at == pytest.approx(at / 2, abs=1e-6)


def test_sink_file_counts_complete_lines_only(tmp_path: Path) -> None:
    """
    The follower counts console and priority-1 lines as they are appended,
    a line cut in the middle only once it is whole.
    """
    path = tmp_path / "sink.txt"
    follow = SinkFile(path)
    follow.read()
    assert (follow.console, follow.priority) == (0, 0)
    path.write_text(Arrival(1.0, None, ("a@x.org",)).line() + "2.000000 1.9 p1-1 b@x")
    follow.read()
    assert (follow.console, follow.priority) == (1, 0)
    with path.open("a") as out:
        out.write(".org\n" + Arrival(3.0, None, ("c@x.org",)).line())
    follow.read()
    assert (follow.console, follow.priority) == (2, 1)


def test_percentile_nearest_rank() -> None:
    """
    p50 of 1..100 is 50, p99 is 99, p100 the largest; one value is every
    percentile; no values is an error.
    """
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.99) == 99
    assert percentile(values, 1.0) == 100
    assert percentile([7.0], 0.01) == 7.0
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_merge_intervals() -> None:
    """
    Overlapping and touching intervals merge, empty ones go, order does not
    matter.
    """
    assert merge_intervals([(5, 6), (1, 3), (2, 4), (4, 4.5), (7, 7), (9, 8)]) == [
        (1, 4.5),
        (5, 6),
    ]
    assert merge_intervals([]) == []


def test_covered_clips_to_the_span() -> None:
    """
    Only the part of each interval inside the span counts.
    """
    intervals = [(0.0, 2.0), (3.0, 4.0), (9.0, 12.0)]
    assert covered(intervals, 1.0, 10.0) == pytest.approx(1.0 + 1.0 + 1.0)
    assert covered(intervals, 4.0, 9.0) == 0


def test_preempted_intervals_from_250_to_arrival_plus_grace() -> None:
    """
    Each priority-1 message closes the gate from its C{250} to its arrival
    plus the grace; one that never arrived, until the end; spells merge.
    """
    injected = [
        Injected("a", 0.9, 1.0, True),
        Injected("b", 1.0, 1.1, True),
        Injected("c", 4.9, 5.0, False),
        Injected("d", 7.9, 8.0, False),
    ]
    arrivals = {"a": 1.01, "b": 1.12, "c": 5.02}
    assert preempted_intervals(injected, arrivals, 1.0, end=9.5) == [
        (1.0, 2.12),
        (5.0, 6.02),
        (8.0, 10.5),
    ]


def test_state_intervals() -> None:
    """
    The polled state gives a spell from the first sample showing the reason
    to the first not showing it; another reason does not count; a spell
    still open ends at the end.
    """
    samples = [
        StateSample(0.0, "sending", None),
        StateSample(1.0, "paused", "priority-1 SMTP+ traffic"),
        StateSample(1.05, "paused", "priority-1 SMTP+ traffic", sent=5),
        StateSample(2.0, "sending", None),
        StateSample(3.0, "paused", "queue stopped"),
        StateSample(4.0, "paused", "priority-1 SMTP+ traffic"),
    ]
    assert state_intervals(samples, "priority-1 SMTP+ traffic", end=6.0) == [
        (1.0, 2.0),
        (4.0, 6.0),
    ]


def test_overtaken_counts_strictly_between() -> None:
    """
    Console arrivals strictly between a C{250} and the delivery count.
    """
    console = [1.0, 2.0, 2.0, 3.0, 4.0]
    assert overtaken(console, 1.0, 4.0) == 3
    assert overtaken(console, 4.0, 5.0) == 0
    assert overtaken(console, 5.0, 1.0) == 0


def test_throughput_whole_and_not_preempted() -> None:
    """
    1,001 messages over 2 s of which 0.5 s pre-empted: 500/s over the whole
    send, 666.7/s over the 1.5 s it ran; the rate from the send's creation
    counts the wait for its first message.
    """
    console = [i * 0.002 for i in range(1001)]
    figures = throughput_figures(console, [(0.5, 1.0), (5.0, 6.0)], 500.0, created_at=-0.5)
    assert figures["whole_per_s"] == pytest.approx(500.0)
    assert figures["whole_ratio"] == pytest.approx(1.0)
    assert figures["preempted_s"] == pytest.approx(0.5)
    assert figures["not_preempted_per_s"] == pytest.approx(1000 / 1.5, abs=0.01)
    assert figures["from_creation_per_s"] == pytest.approx(1001 / 2.5, abs=0.01)
    assert throughput_figures([1.0], [], 500.0) == {"messages": 1}


def test_within_two_percent_at_the_limit() -> None:
    """
    0.98 and 1.02 times the rate are within 2 %; 0.979 and 1.021 are not.
    """
    assert within(0.98)
    assert within(1.02)
    assert not within(0.979)
    assert not within(1.021)


def test_slow_bins_tell_a_starved_send_from_a_slow_queue() -> None:
    """
    A bin below 90 % of the rate outside pre-emption is slow; it is
    starved when the queue held less than a bin's worth of the send then.
    Bins inside pre-emption are not counted.
    """
    rate = 100.0
    # 100/s for 1 s, nothing for 0.5 s (the queue had 50 waiting: slow),
    # 100/s for 0.5 s, nothing for 0.5 s (nothing waiting: starved), then
    # 100/s again up to 3 s; pre-empted from 3 s to 3.5 s.
    console = (
        [i * 0.01 for i in range(100)]
        + [1.5 + i * 0.01 for i in range(50)]
        + [2.5 + i * 0.01 for i in range(51)]
        + [3.5 + i * 0.01 for i in range(50)]
    )
    samples = [StateSample(0.0, "sending", None, sent=150)]
    found = slow_bins(console, [(3.0, 3.5)], samples, rate)
    assert found["slow_bins"] == 4
    assert found["slow_bins_starved"] == 2
    assert found["running_bins"] == 13
    assert found["slowest_per_s"][0] == 0.0
    assert slow_bins([1.0], [], [], rate) == {}


def test_per_second() -> None:
    """
    Counts per whole second from the origin.
    """
    assert per_second([10.1, 10.9, 11.0, 13.5], 10.0) == [2, 1, 0, 1]
    assert per_second([], 0.0) == []


def test_schedule_spaces_singles_through_the_cycle() -> None:
    """
    A cycle starts with the burst; the singles split the rest evenly.
    """
    settings = Settings(
        recipients=10,
        rate=500.0,
        burst=20,
        singles=3,
        cycle=8.0,
        max_priority=100,
        warmup=0.0,
        time_limit=10.0,
        stall=5.0,
        concurrency=20,
        grace=1.0,
    )
    assert settings.schedule() == [
        (0.0, 20, True),
        (2.0, 1, False),
        (4.0, 1, False),
        (6.0, 1, False),
    ]


def test_inside_bursts_counts_console_between_a_bursts_arrivals() -> None:
    """
    Console arrivals strictly between a burst's first and last delivery
    count for that burst, timed from its first C{250}; singles and
    one-message bursts are not bursts.
    """
    injected = [
        Injected("a", 0.0, 1.0, True, group=0),
        Injected("b", 1.0, 1.1, True, group=0),
        Injected("c", 1.1, 1.2, True, group=0),
        Injected("d", 4.0, 4.1, False, group=1),
        Injected("e", 6.0, 6.1, True, group=2),
        Injected("f", 6.1, 6.2, True, group=2),
        Injected("g", 8.0, 8.1, True, group=3),
    ]
    arrivals = {"a": 1.01, "b": 1.11, "c": 1.21, "d": 4.2, "e": 6.11, "f": 6.21, "g": 8.2}
    console = [1.05, 1.15, 1.3, 4.15, 6.15, 8.1, 8.3]
    found = inside_bursts(injected, arrivals, console)
    assert [[round(ms) for ms in burst] for burst in found] == [[50, 150], [50]]
