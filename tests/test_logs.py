"""
Tests for L{smtpgw.logs}: the buffered text observer writes what twistd's
own text observer writes, one write per reactor turn.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogEvent, Logger, formatEventAsClassicLogText

from smtpgw.logs import FLUSH_AT, BufferedTextObserver


class FakeReactor:
    """
    A running reactor whose turns end when the test says.
    """

    def __init__(self, running: bool = True) -> None:
        self.running = running
        self.calls: list[Callable[[], None]] = []

    def callLater(self, delay: float, function: Callable[[], None]) -> None:
        assert delay == 0
        self.calls.append(function)

    def end_turn(self) -> None:
        calls, self.calls = self.calls, []
        for call in calls:
            call()


class CountingStream(io.StringIO):
    """
    A text stream that counts its writes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def observe(*log_calls: Callable[[Logger], None]) -> list[LogEvent]:
    events: list[LogEvent] = []
    log = Logger(namespace="smtpgw.test", observer=cast(ILogObserver, events.append))
    for call in log_calls:
        call(log)
    return events


def written(events: list[LogEvent]) -> str:
    stream = io.StringIO()
    observer = BufferedTextObserver(stream, FakeReactor())
    for event in events:
        observer(event)
    observer.flush()
    return stream.getvalue()


def twistd_text(events: list[LogEvent]) -> str:
    return "".join(formatEventAsClassicLogText(event) or "" for event in events)


def _failure(log: Logger) -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("it broke for {who}", who="x")


@pytest.mark.parametrize(
    "call",
    [
        lambda log: log.info("queued {queue_id} from {u} at {ip}", queue_id="Q1", u="a", ip="::1"),
        lambda log: log.warn("repr {a!r}, attribute {b.real}, spec {c:>5}", a="x", b=3, c="y"),
        lambda log: log.info("called {c()}", c=lambda: "yes"),
        lambda log: log.info("missing {nothing}"),
        lambda log: log.error("two\nlines {x}", x="and\nthree"),
        lambda log: log.info("no fields"),
        _failure,
    ],
    ids=["fields", "conversions", "call", "missing", "newlines", "plain", "failure"],
)
def test_lines_are_those_twistd_writes(call: Callable[[Logger], None]) -> None:
    """
    Each event is written as twistd's text observer writes it (timestamp,
    namespace and level, text, continuation lines indented), whatever the
    format uses: fields, conversions, Twisted's call syntax, a missing
    field, newlines, a traceback.
    """
    events = observe(call)
    assert written(events) == twistd_text(events)


@given(st.text(), st.text())
def test_any_field_value_is_written_as_twistd_writes_it(first: str, second: str) -> None:
    """
    Field values with braces, newlines or any other text change nothing.
    """
    events = observe(lambda log: log.info("a {first} b {second}", first=first, second=second))
    assert written(events) == twistd_text(events)


def test_one_write_per_reactor_turn() -> None:
    """
    The lines of one turn go out together, in order, at the end of the turn.
    """
    reactor = FakeReactor()
    stream = CountingStream()
    observer = BufferedTextObserver(stream, reactor)
    events = observe(*(lambda log, n=n: log.info("line {n}", n=n) for n in range(50)))
    for event in events:
        observer(event)
    assert stream.writes == 0
    assert len(reactor.calls) == 1
    reactor.end_turn()
    assert stream.writes == 1
    assert stream.getvalue() == twistd_text(events)
    observer(events[0])
    assert len(reactor.calls) == 1


def test_a_full_buffer_is_written_at_once() -> None:
    """
    Once 64 KiB wait, they are written without waiting for the turn's end.
    """
    stream = CountingStream()
    observer = BufferedTextObserver(stream, FakeReactor())
    [event] = observe(lambda log: log.info("{x}", x="y" * 1000))
    line = len(twistd_text([event]))
    for _ in range(-(-FLUSH_AT // line) - 1):
        observer(event)
    assert stream.writes == 0
    observer(event)
    assert stream.writes == 1
    assert len(stream.getvalue()) >= FLUSH_AT


def test_nothing_waits_when_the_reactor_is_not_running() -> None:
    """
    Without a running reactor (start-up, shut-down) a line is written at
    once.
    """
    stream = CountingStream()
    observer = BufferedTextObserver(stream, FakeReactor(running=False))
    events = observe(lambda log: log.info("starting"))
    observer(events[0])
    assert stream.getvalue() == twistd_text(events)


def test_a_failing_stream_does_not_raise() -> None:
    """
    A log that cannot be written (closed, disk full) is given up, not
    raised into the code that logged.
    """

    class Broken(io.StringIO):
        def write(self, text: str) -> Any:
            raise OSError(28, "No space left on device")

    observer = BufferedTextObserver(Broken(), FakeReactor(running=False))
    observer(observe(lambda log: log.info("x"))[0])
    observer.flush()


def test_lines_from_other_threads_are_each_written_once() -> None:
    """
    Events logged from other threads (warnings, thread pools) are written
    at once, each exactly once and in each thread's order, whatever the
    reactor thread's own flushes do meanwhile.
    """
    import threading

    reactor = FakeReactor()
    stream = CountingStream()
    observer = BufferedTextObserver(stream, reactor)

    def log_many(name: str) -> None:
        log = Logger(namespace=name, observer=cast(ILogObserver, observer))
        for n in range(2000):
            log.info("{name} {n}", name=name, n=n)

    threads = [threading.Thread(target=log_many, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(200):
        observer.flush()
    for thread in threads:
        thread.join()
    observer.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 8000
    for i in range(4):
        mine = [line.rsplit(" ", 1)[1] for line in lines if f" t{i} " in line]
        assert mine == [str(n) for n in range(2000)]


def test_once_shutting_down_each_line_is_written_at_once() -> None:
    """
    From the reactor's shutdown on, no turn ends: lines are written as they
    come (twistd's last lines are not left to the exit).
    """

    class StoppingReactor(FakeReactor):
        def __init__(self) -> None:
            super().__init__()
            self.triggers: list[Callable[[], None]] = []

        def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], None]) -> None:
            assert (phase, event) == ("during", "shutdown")
            self.triggers.append(f)

    reactor = StoppingReactor()
    stream = CountingStream()
    observer = BufferedTextObserver(stream, reactor)
    [first, second] = observe(lambda log: log.info("one"), lambda log: log.info("two"))
    observer(first)
    assert stream.writes == 0
    [trigger] = reactor.triggers
    trigger()
    assert stream.getvalue() == twistd_text([first])
    observer(second)
    assert stream.getvalue() == twistd_text([first, second])


def test_an_event_that_breaks_formatting_is_written_as_twistd_writes_it() -> None:
    """
    A value whose formatting raises anything, or an event whose text is
    empty, gives what twistd's own observer gives (its "Unable to format"
    line; nothing), and never raises.
    """

    class Broken:
        def __format__(self, spec: str) -> str:
            raise RuntimeError("no")

    events = observe(
        lambda log: log.info("broken {b}", b=Broken()),
        lambda log: log.info("{empty}", empty=""),
    )
    for event in events:
        event["log_time"] = 1_700_000_000.0
    text = written(events)
    assert text == twistd_text(events)
    assert "Unable to format event" in text
