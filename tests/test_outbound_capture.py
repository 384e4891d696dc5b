"""
Tests for L{smtpgw.outbound.CaptureOutbound}: the capture relay writes each
message and one index line per delivery, in delivery order, off the reactor
thread, and turns disk errors into temporary failures.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from smtpgw.interfaces import DeliveryResult, IOutbound
from smtpgw.model import Envelope, Priority
from smtpgw.outbound import CaptureOutbound

P = ParamSpec("P")
T0 = 1_700_000_000.0


def async_test(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, Deferred[None]]:
    """
    L{pytest_twisted.ensureDeferred}, typed.
    """
    wrapped: Callable[P, Deferred[None]] = pytest_twisted.ensureDeferred(test)
    return wrapped


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def envelope(queue_id: str = "0018BCFE5680ABCD00001", **changes: Any) -> Envelope:
    fields: dict[str, Any] = {
        "queue_id": queue_id,
        "list": "news",
        "username": "u-news-1",
        "sender": "app@example.com",
        "recipients": ("a@example.org", "b@example.net"),
        "priority": Priority.HIGH,
        "accepted_at": T0,
    }
    fields.update(changes)
    return Envelope(**fields)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(T0 + 5)
    return c


@pytest.fixture
def capture(tmp_path: Path, clock: Clock) -> Iterator[CaptureOutbound]:
    outbound = CaptureOutbound(tmp_path, _reactor(), clock=clock)
    outbound.startService()
    yield outbound
    if outbound.running:
        pytest_twisted.blockon(outbound.stopService())


def index_lines(capture: CaptureOutbound) -> list[dict[str, Any]]:
    with open(capture.index_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_provides_ioutbound(tmp_path: Path) -> None:
    """
    CaptureOutbound provides IOutbound.
    """
    assert verifyObject(IOutbound, CaptureOutbound(tmp_path, _reactor()))


@async_test
async def test_writes_message_and_index_line(
    capture: CaptureOutbound, tmp_path: Path, clock: Clock
) -> None:
    """
    A delivery stores the bytes exactly as given in captured/<id>.eml, appends
    one JSON line with every documented field, and counts every recipient as
    delivered.
    """
    body = b"Subject: hi\r\n\r\n.leading dot\r\nbinary \x00\xff\r\n"
    env = envelope()
    result = await capture.deliver(env, body)
    assert result == DeliveryResult(delivered=env.recipients)
    eml = tmp_path / "captured" / f"{env.queue_id}.eml"
    assert eml.read_bytes() == body
    assert index_lines(capture) == [
        {
            "queue_id": env.queue_id,
            "list": "news",
            "username": "u-news-1",
            "sender": "app@example.com",
            "recipients": ["a@example.org", "b@example.net"],
            "priority": 2,
            "accepted_at": T0,
            "delivered_at": T0 + 5,
            "file": str(eml),
        }
    ]
    assert sorted(os.listdir(tmp_path / "captured")) == [f"{env.queue_id}.eml", "index.jsonl"]


@async_test
async def test_index_is_in_delivery_order(capture: CaptureOutbound) -> None:
    """
    Deliveries started together are indexed in the order they were handed
    over, and none of them leaves a temporary file behind.
    """
    ids = [f"ID{n:04d}" for n in range(40)]
    results = await gatherResults(
        [capture.deliver(envelope(q), f"message {q}\r\n".encode() * 50) for q in ids]
    )
    assert all(r.delivered for r in results)
    assert [line["queue_id"] for line in index_lines(capture)] == ids
    names = os.listdir(capture.captured_dir)
    assert sorted(names) == sorted([f"{q}.eml" for q in ids] + ["index.jsonl"])


@async_test
async def test_writes_happen_off_the_reactor_thread(
    capture: CaptureOutbound, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The files are written by a thread other than the reactor's.
    """
    threads: list[threading.Thread] = []
    original = capture._write

    def spy(*args: Any) -> str:
        threads.append(threading.current_thread())
        return original(*args)

    monkeypatch.setattr(capture, "_write", spy)
    await capture.deliver(envelope(), b"x\r\n")
    assert threads
    assert threads[0] is not threading.current_thread()


@async_test
async def test_redelivery_replaces_file_and_indexes_again(capture: CaptureOutbound) -> None:
    """
    Capturing the same queue id again (after a crash) replaces the .eml and
    adds a second index line.
    """
    await capture.deliver(envelope("SAME"), b"first\r\n")
    await capture.deliver(envelope("SAME"), b"second\r\n")
    assert (Path(capture.captured_dir) / "SAME.eml").read_bytes() == b"second\r\n"
    assert [line["queue_id"] for line in index_lines(capture)] == ["SAME", "SAME"]


@async_test
async def test_disk_error_defers_every_recipient(tmp_path: Path) -> None:
    """
    When the capture directory cannot be written (here a file stands in its
    way), every recipient is deferred with the reason, and nothing fails.
    """
    (tmp_path / "captured").write_bytes(b"in the way")
    outbound = CaptureOutbound(tmp_path, _reactor())
    outbound.startService()
    try:
        env = envelope()
        result = await outbound.deliver(env, b"x\r\n")
    finally:
        await outbound.stopService()
    assert result.delivered == ()
    assert result.bounced == ()
    assert [r for r, _ in result.deferred] == list(env.recipients)
    assert all(reason.startswith("capture failed:") for _, reason in result.deferred)


@async_test
async def test_not_running_defers(tmp_path: Path) -> None:
    """
    Before start and after stop, deliveries are deferred and nothing is
    written.
    """
    outbound = CaptureOutbound(tmp_path, _reactor())
    before = await outbound.deliver(envelope(), b"x\r\n")
    outbound.startService()
    await outbound.stopService()
    after = await outbound.deliver(envelope(), b"x\r\n")
    for result in (before, after):
        assert result.delivered == ()
        assert [reason for _, reason in result.deferred] == ["capture is not running"] * 2
    assert not (tmp_path / "captured").exists()


@async_test
async def test_stop_waits_for_writes_under_way(capture: CaptureOutbound) -> None:
    """
    stopService fires only after the deliveries already handed over are
    written.
    """
    pending = [capture.deliver(envelope(f"W{n}"), b"x\r\n" * 1000) for n in range(10)]
    await capture.stopService()
    assert all(d.called for d in pending)
    assert len(index_lines(capture)) == 10


@pytest.mark.parametrize("queue_id", ["../evil", ".hidden", "a/b", "", "x" * 129])
@async_test
async def test_unsafe_queue_id_bounces(capture: CaptureOutbound, queue_id: str) -> None:
    """
    A queue id that is not a plain file name is refused permanently and
    nothing is written.
    """
    env = envelope(queue_id)
    result = await capture.deliver(env, b"x\r\n")
    assert [r for r, _ in result.bounced] == list(env.recipients)
    assert not os.path.exists(capture.captured_dir)


@async_test
async def test_longest_queue_id_is_captured(capture: CaptureOutbound) -> None:
    """
    A queue id of 128 characters, the limit, is captured.
    """
    result = await capture.deliver(envelope("x" * 128), b"x\r\n")
    assert result.delivered
