"""
Tests for L{smtpgw.limits} (the session limits and their ranges) and
L{smtpgw.abuse} (per-address connection counts and login failures).
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from smtpgw.abuse import AuthFailureTracker, ConnectionCounter, RepeatedAlertFilter, address_key
from smtpgw.alerts import MemoryAlertSink
from smtpgw.interfaces import Alert
from smtpgw.limits import MIB, Limits


def test_defaults() -> None:
    """
    The defaults are the documented ones, and every field has one.
    """
    limits = Limits()
    assert limits.max_size == 25 * MIB
    assert limits.max_recipients == 100
    assert limits.max_command_length == 512
    assert limits.max_auth_line_length == 12288
    assert limits.max_path_length == 256
    assert limits.max_data_line_length == 998
    assert limits.idle_timeout == 300
    assert limits.command_deadline == 60
    assert limits.data_deadline == 600
    assert limits.max_connections_per_ip == 50
    assert limits.max_bad_commands == 10
    assert limits.auth_failure_limit == 5
    assert limits.auth_failure_window == 300
    assert limits.auth_failure_delay == 1
    assert limits.auth_failure_delay_cap == 10
    assert limits.greet_delay == 0
    assert limits.max_connections == 1000
    assert limits.max_junk_commands == 100
    assert limits.sender_alert_window == 600
    assert limits.max_messages_per_session == 1000
    assert limits.max_session_seconds == 3600
    assert limits.user_recheck_interval == 1
    for field in attrs.fields(Limits):
        assert field.default is not attrs.NOTHING, field.name


def test_limits_are_frozen() -> None:
    """
    Limits cannot be changed after construction.
    """
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        Limits().max_size = 1  # type: ignore[misc]


# Each field with its lowest and highest accepted value.
_RANGES: list[tuple[str, float, float]] = [
    ("max_size", 1024, 2**31 - 1),
    ("max_recipients", 1, 100_000),
    ("max_command_length", 512, 12288),
    ("max_path_length", 256, 4096),
    ("max_data_line_length", 998, 65536),
    ("idle_timeout", 1, 3600),
    ("command_deadline", 1, 3600),
    ("data_deadline", 1, 86400),
    ("max_connections_per_ip", 1, 100_000),
    ("max_bad_commands", 1, 1000),
    ("auth_failure_limit", 1, 1000),
    ("auth_failure_window", 1, 86400),
    ("auth_failure_delay", 0, 60),
    ("auth_failure_delay_cap", 0, 300),
    ("greet_delay", 0, 60),
    ("max_connections", 1, 1_000_000),
    ("max_junk_commands", 1, 100_000),
    ("sender_alert_window", 0, 86400),
    ("max_messages_per_session", 1, 1_000_000),
    ("max_session_seconds", 1, 86400),
    ("user_recheck_interval", 0, 3600),
]


def _limits(**changes: Any) -> Limits:
    if "greet_delay" in changes:
        changes.setdefault("idle_timeout", 3600)
    return Limits(**changes)


@pytest.mark.parametrize(("name", "low", "high"), _RANGES)
def test_range_bounds_are_accepted(name: str, low: float, high: float) -> None:
    """
    The lowest and highest value of each range are accepted.
    """
    assert getattr(_limits(**{name: low}), name) == low
    assert getattr(_limits(**{name: high}), name) == high


@pytest.mark.parametrize(("name", "low", "high"), _RANGES)
def test_values_past_the_range_are_refused(name: str, low: float, high: float) -> None:
    """
    One past either end of each range is refused, naming the field.
    """
    step = 1 if isinstance(low, int) and isinstance(high, int) else 0.001
    with pytest.raises(ValueError, match=name):
        _limits(**{name: low - step})
    with pytest.raises(ValueError, match=name):
        _limits(**{name: high + step})


@pytest.mark.parametrize("value", ["10", None, True, [1]])
def test_non_numbers_are_refused(value: object) -> None:
    """
    Strings, None and booleans are not limits.
    """
    with pytest.raises(TypeError, match="max_size"):
        Limits(max_size=value)  # type: ignore[arg-type]


def test_auth_lines_may_not_be_shorter_than_commands() -> None:
    """
    max_auth_line_length at max_command_length is fine; below it is not.
    """
    assert Limits(max_command_length=1000, max_auth_line_length=1000)
    with pytest.raises(ValueError, match="max_auth_line_length"):
        Limits(max_command_length=1000, max_auth_line_length=999)


def test_greet_delay_must_be_shorter_than_the_idle_timeout() -> None:
    """
    A greet delay the idle timeout would cut short is refused.
    """
    assert Limits(greet_delay=9.9, idle_timeout=10)
    with pytest.raises(ValueError, match="greet_delay"):
        Limits(greet_delay=10, idle_timeout=10)


def test_greet_delay_must_be_shorter_than_the_session_lifetime() -> None:
    """
    A greet delay the session lifetime would cut short is refused.
    """
    assert Limits(greet_delay=9.9, max_session_seconds=10)
    with pytest.raises(ValueError, match="greet_delay"):
        Limits(greet_delay=10, max_session_seconds=10)


@given(
    max_size=st.integers(min_value=1024, max_value=2**31 - 1),
    max_recipients=st.integers(min_value=1, max_value=100_000),
    idle_timeout=st.floats(min_value=1, max_value=3600),
)
def test_any_value_in_range_round_trips(
    max_size: int, max_recipients: int, idle_timeout: float
) -> None:
    """
    Values inside the ranges are kept as given.
    """
    limits = Limits(max_size=max_size, max_recipients=max_recipients, idle_timeout=idle_timeout)
    assert (limits.max_size, limits.max_recipients, limits.idle_timeout) == (
        max_size,
        max_recipients,
        idle_timeout,
    )


# -- ConnectionCounter ------------------------------------------------------------------


def test_connection_counter_at_the_limit_and_past_it() -> None:
    """
    An address may hold C{limit} connections; the next is refused until one
    is released; other addresses are counted apart.
    """
    counter = ConnectionCounter(3)
    assert all(counter.acquire("a") for _ in range(3))
    assert not counter.acquire("a")
    assert counter.acquire("b")
    counter.release("a")
    assert counter.count("a") == 2
    assert counter.acquire("a")


def test_connection_counter_forgets_idle_addresses() -> None:
    """
    An address without connections takes no memory.
    """
    counter = ConnectionCounter(2)
    counter.acquire("a")
    counter.release("a")
    counter.release("a")
    assert counter.count("a") == 0
    assert counter._open == {}


def test_connection_counter_total_at_the_limit_and_past_it() -> None:
    """
    C{total_limit} connections may be open across all addresses; the next
    is refused, from any address, until one is released.
    """
    counter = ConnectionCounter(10, total_limit=3)
    assert counter.acquire("a")
    assert counter.acquire("b")
    assert counter.acquire("c")
    assert counter.total == 3
    assert counter.full()
    assert not counter.acquire("d")
    assert not counter.acquire("a")
    assert counter.total == 3
    counter.release("b")
    assert not counter.full()
    assert counter.acquire("d")
    assert counter.total == 3


def test_connection_counter_without_a_total_limit() -> None:
    """
    With no total limit, only the per-address limit refuses.
    """
    counter = ConnectionCounter(2)
    for i in range(50):
        assert counter.acquire(f"10.0.0.{i}")
    assert not counter.full()
    assert counter.total == 50


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("::FFFF:c000:0201", "192.0.2.1"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2:0:0:0:7", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::1", "::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("unix-socket", "unix-socket"),
        ("not:an:address", "not:an:address"),
    ],
)
def test_address_key_groups_ipv6_by_64(ip: str, key: str) -> None:
    """
    IPv4 counts per address, an IPv4-mapped IPv6 address as its IPv4
    address, any other IPv6 address by its /64 (one subnet, usually one
    customer, holds 2**64 addresses); what is no IP address counts as is.
    """
    assert address_key(ip) == key


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_every_address_of_a_64_has_the_same_key(host: int) -> None:
    """
    Any interface identifier inside 2001:db8:aa:bb::/64 gives that /64.
    """
    import ipaddress

    ip = str(ipaddress.IPv6Address((0x20010DB800AA00BB << 64) | host))
    assert address_key(ip) == "2001:db8:aa:bb::/64"


# -- AuthFailureTracker -------------------------------------------------------------------


def test_auth_failures_at_the_limit_and_past_the_window() -> None:
    """
    C{limit} failures within the window block the address; it is free again
    once the oldest failure leaves the window.
    """
    clock = Clock()
    tracker = AuthFailureTracker(limit=3, window=100, clock=clock)
    assert tracker.record_failure("a") == 1
    clock.advance(10)
    assert tracker.record_failure("a") == 2
    assert not tracker.blocked("a")
    assert tracker.record_failure("a") == 3
    assert tracker.blocked("a")
    assert not tracker.blocked("b")
    clock.advance(89.9)
    assert tracker.blocked("a")
    clock.advance(0.1)
    assert tracker.failures("a") == 2
    assert not tracker.blocked("a")


def test_auth_failure_tracker_forgets_old_addresses() -> None:
    """
    Addresses whose failures have left the window are swept, so a scan from
    many addresses does not grow the tracker without bound.
    """
    clock = Clock()
    tracker = AuthFailureTracker(limit=5, window=10, clock=clock)
    for i in range(1000):
        tracker.record_failure(f"10.0.{i // 256}.{i % 256}")
    assert tracker.tracked() == 1000
    clock.advance(11)
    for i in range(100):
        tracker.record_failure(f"10.9.0.{i}")
    assert tracker.tracked() == 100


def test_auth_checks_in_flight_count_against_the_limit() -> None:
    """
    A check in flight counts as a possible failure: with C{limit} checks
    begun, the next one waits; it is admitted when one ends well.
    """
    clock = Clock()
    tracker = AuthFailureTracker(limit=3, window=100, clock=clock)
    assert [tracker.begin("a") for _ in range(3)] == [True, True, True]
    assert tracker.pending("a") == 3
    waiting = tracker.begin("a")
    assert isinstance(waiting, Deferred)
    admitted: list[bool] = []
    waiting.addCallback(admitted.append)
    assert tracker.begin("b") is True
    assert tracker.end("a", failed=False) is False
    assert admitted == [True]
    assert tracker.pending("a") == 3


def test_auth_waiters_are_admitted_in_order_and_refused_when_blocked() -> None:
    """
    Waiting checks are admitted first come, first served; when failures
    block the address, every waiting check is refused at once.
    """
    clock = Clock()
    tracker = AuthFailureTracker(limit=2, window=100, clock=clock)
    assert tracker.begin("a") is True
    assert tracker.begin("a") is True
    outcomes: list[tuple[int, bool]] = []
    for i in range(3):
        d = tracker.begin("a")
        assert isinstance(d, Deferred)
        d.addCallback(lambda ok, i: outcomes.append((i, ok)), i)
    assert tracker.end("a", failed=False) is False
    assert outcomes == [(0, True)]
    assert tracker.end("a", failed=True) is False
    assert outcomes == [(0, True)]
    assert tracker.end("a", failed=True) is True
    assert outcomes == [(0, True), (1, False), (2, False)]
    assert tracker.blocked("a")
    assert tracker.begin("a") is False
    assert tracker.pending("a") == 0


def test_cancelled_auth_waiter_leaves_the_queue() -> None:
    """
    A waiting check whose client left is forgotten: the slot goes to the
    next one.
    """
    clock = Clock()
    tracker = AuthFailureTracker(limit=1, window=100, clock=clock)
    assert tracker.begin("a") is True
    gone = tracker.begin("a")
    nxt = tracker.begin("a")
    assert isinstance(gone, Deferred)
    assert isinstance(nxt, Deferred)
    gone.addErrback(lambda f: f.trap(CancelledError))
    gone.cancel()
    admitted: list[bool] = []
    nxt.addCallback(admitted.append)
    tracker.end("a", failed=False)
    assert admitted == [True]
    assert tracker.pending("a") == 1
    tracker.end("a", failed=False)
    assert tracker.pending("a") == 0


def test_auth_alert_once_per_blocking() -> None:
    """
    end() asks for the alert only when a failure blocks the address, and not
    again while an alert for that address is younger than the window.
    """
    clock = Clock()
    tracker = AuthFailureTracker(limit=2, window=100, clock=clock)
    asked = []
    for _ in range(2):
        assert tracker.begin("a") is True
        asked.append(tracker.end("a", failed=True))
        clock.advance(10)
    assert asked == [False, True]
    clock.advance(79.9)
    assert tracker.blocked("a")
    clock.advance(0.1)
    # The first failure left the window: one more try, which blocks again,
    # within the window of the alert.
    assert tracker.begin("a") is True
    assert tracker.end("a", failed=True) is False
    assert tracker.blocked("a")
    clock.advance(100)
    for _ in range(2):
        assert tracker.begin("a") is True
        last = tracker.end("a", failed=True)
    assert last is True


# -- RepeatedAlertFilter ----------------------------------------------------------------


def _sender_alert(
    username: str = "alice", sender: str = "x@evil.example", at: float = 0.0
) -> Alert:
    return Alert(
        type="sender_domain",
        message=f"envelope sender refused: sender {sender} is not authorized",
        created_at=at,
        list="news",
        details={"username": username, "sender": sender, "where": "envelope"},
    )


def _filter(
    window: float = 600.0, **kwargs: Any
) -> tuple[RepeatedAlertFilter, MemoryAlertSink, Clock]:
    clock = Clock()
    sink = MemoryAlertSink()
    return RepeatedAlertFilter(sink, clock, window=window, **kwargs), sink, clock


def test_repeated_sender_alert_is_stored_once_per_window_then_summed_up() -> None:
    """
    The first sender_domain alert for a (username, sender) passes at once;
    repeats within the window are counted, not stored; when the window
    ends, one summary alert says how many there were.
    """
    alerts, sink, clock = _filter(window=600)
    alerts.raise_alert(_sender_alert())
    assert len(sink.alerts) == 1
    for _ in range(299):
        clock.advance(1)
        alerts.raise_alert(_sender_alert(at=clock.seconds()))
    assert len(sink.alerts) == 1
    assert alerts.suppressed("alice", "x@evil.example") == 299
    clock.advance(600 - 299 - 0.001)
    assert len(sink.alerts) == 1
    clock.advance(0.001)
    first, summary = sink.alerts
    assert first.details["sender"] == summary.details["sender"]
    assert summary.type == "sender_domain"
    assert summary.list == "news"
    assert summary.details["repeats"] == 299
    assert summary.details["sender"] == "x@evil.example"
    assert summary.details["first_at"] == 0.0
    assert summary.details["last_at"] == 299.0
    assert "299 more times" in summary.message
    assert clock.getDelayedCalls() == []
    alerts.raise_alert(_sender_alert(at=clock.seconds()))
    assert len(sink.alerts) == 3


def test_single_sender_alert_gets_no_summary() -> None:
    """
    A violation that is not repeated within the window is one alert.
    """
    alerts, sink, clock = _filter(window=600)
    alerts.raise_alert(_sender_alert())
    clock.advance(601)
    assert len(sink.alerts) == 1
    assert clock.getDelayedCalls() == []


def test_sender_alerts_are_told_apart_by_user_and_address() -> None:
    """
    Another address, or another user, is a new alert; other alert types
    are never held back.
    """
    alerts, sink, _ = _filter()
    alerts.raise_alert(_sender_alert("alice", "x@evil.example"))
    alerts.raise_alert(_sender_alert("alice", "y@evil.example"))
    alerts.raise_alert(_sender_alert("bob", "x@evil.example"))
    other = Alert(type="auth_failures", message="m", created_at=0.0)
    alerts.raise_alert(other)
    alerts.raise_alert(other)
    assert len(sink.alerts) == 5


def test_zero_window_passes_every_alert() -> None:
    """
    With a window of 0, every violation is its own alert.
    """
    alerts, sink, clock = _filter(window=0)
    for _ in range(3):
        alerts.raise_alert(_sender_alert())
    assert len(sink.alerts) == 3
    assert clock.getDelayedCalls() == []


def test_alert_filter_is_bounded_and_flushes() -> None:
    """
    Past C{max_tracked} (user, address) pairs the oldest is summed up early;
    flush() sums up everything pending and stops the timer.
    """
    alerts, sink, clock = _filter(max_tracked=2)
    for sender in ("a@x.example", "b@x.example", "a@x.example", "b@x.example"):
        alerts.raise_alert(_sender_alert(sender=sender))
    assert len(sink.alerts) == 2
    alerts.raise_alert(_sender_alert(sender="c@x.example"))
    assert [a.details.get("repeats") for a in sink.alerts] == [None, None, 1, None]
    assert alerts.tracked() == 2
    alerts.flush()
    assert [a.details.get("repeats") for a in sink.alerts] == [None, None, 1, None, 1]
    assert alerts.tracked() == 0
    assert clock.getDelayedCalls() == []
