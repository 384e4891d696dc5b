"""
Tests for L{smtpgw.services}.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred

from smtpgw.services import OrderedMultiService


class Recorder(Service):
    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events
        self.pending: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self.events.append(f"start {self.name}")

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.events.append(f"stop {self.name}")
        return self.pending


def test_children_stop_in_reverse_each_after_the_previous_finished() -> None:
    """
    The second child does not start stopping before the third's stop
    Deferred fired, and the whole stop fires only after the last child.
    """
    events: list[str] = []
    top = OrderedMultiService()
    a, b, c = (Recorder(n, events) for n in "abc")
    for child in (a, b, c):
        child.setServiceParent(top)
    c.pending = Deferred()
    top.startService()
    assert events == ["start a", "start b", "start c"]
    stopped = top.stopService()
    assert events[3:] == ["stop c"]
    assert not stopped.called
    c.pending.callback(None)
    assert events[3:] == ["stop c", "stop b", "stop a"]
    assert stopped.called
    assert not top.running


def test_a_failing_child_does_not_keep_the_others_running(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    A child whose stop fails is logged, and the others still stop.
    """
    events: list[str] = []
    top = OrderedMultiService()
    a, b = Recorder("a", events), Recorder("b", events)
    a.setServiceParent(top)
    b.setServiceParent(top)
    b.pending = Deferred()
    top.startService()
    stopped = top.stopService()
    b.pending.errback(RuntimeError("disk gone"))
    assert events[-1] == "stop a"
    assert stopped.called
    [event] = logged_errors
    assert event["log_failure"].check(RuntimeError)
    logged_errors.clear()
