"""
Tests for L{smtpgw.outbound.CaptureOutbound}: the capture relay writes each
message and one index line per delivery, in delivery order, off the reactor
thread, makes them durable before it reports a delivery (two file system
syncs per group of deliveries), and turns disk errors into temporary
failures.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ParamSpec

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from zope.interface.verify import verifyObject

from smtpgw.interfaces import DeliveryResult, IOutbound
from smtpgw.model import Envelope, Priority
from smtpgw.outbound import CaptureOutbound, DiscardOutbound, default_sync
from tests.twisted_support import async_test, global_reactor

P = ParamSpec("P")
T0 = 1_700_000_000.0


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
    outbound = CaptureOutbound(tmp_path, global_reactor(), clock=clock)
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
    assert verifyObject(IOutbound, CaptureOutbound(tmp_path, global_reactor()))


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

    def spy(*args: Any) -> tuple[str, str]:
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
    outbound = CaptureOutbound(tmp_path, global_reactor())
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
    outbound = CaptureOutbound(tmp_path, global_reactor())
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


class RecordingSync:
    """
    A sync that notes what the capture directory held at each call, can be
    held at a gate, and can fail on chosen calls.

    @ivar seen: at each call, the names in the directory and the index's
        number of lines.
    @ivar fail_on: call numbers (from 1) that raise EIO.
    """

    def __init__(self, directory: str, fail_on: frozenset[int] = frozenset()) -> None:
        self.directory = directory
        self.fail_on = fail_on
        self.seen: list[tuple[list[str], int]] = []
        self.gate: threading.Event | None = None
        self.waiting = threading.Event()

    def __call__(self, fd: int) -> None:
        if self.gate is not None:
            self.waiting.set()
            self.gate.wait(10)
        names = sorted(os.listdir(self.directory))
        index = os.path.join(self.directory, "index.jsonl")
        lines = 0
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                lines = len(f.readlines())
        self.seen.append((names, lines))
        if len(self.seen) in self.fail_on:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        default_sync()(fd)


@pytest.fixture
def recorded(tmp_path: Path, clock: Clock) -> Iterator[tuple[CaptureOutbound, RecordingSync]]:
    sync = RecordingSync(str(tmp_path / "captured"))
    outbound = CaptureOutbound(tmp_path, global_reactor(), clock=clock, sync=sync)
    outbound.startService()
    yield outbound, sync
    if outbound.running:
        pytest_twisted.blockon(outbound.stopService())


@async_test
async def test_files_are_durable_before_the_delivery_is_reported(
    recorded: tuple[CaptureOutbound, RecordingSync],
) -> None:
    """
    The .eml is synced under its temporary name (so no partial file can
    appear under the final name, even after a power loss), then renamed and
    indexed, and that is synced too, before the delivery is reported.
    """
    capture, sync = recorded
    sync.gate = threading.Event()
    d = capture.deliver(envelope("ID1"), b"x\r\n")
    await deferToThread(sync.waiting.wait, 10)
    assert not d.called
    sync.gate.set()
    assert (await d).delivered
    assert sync.seen == [([".ID1.eml.tmp"], 0), (["ID1.eml", "index.jsonl"], 1)]
    assert capture.syncs == 2


@async_test
async def test_deliveries_waiting_during_a_sync_share_the_next_two(
    recorded: tuple[CaptureOutbound, RecordingSync],
) -> None:
    """
    Group commit: the ten deliveries handed over while a sync is under way
    are made durable together by the next two syncs, in order.
    """
    capture, sync = recorded
    sync.gate = threading.Event()
    first = capture.deliver(envelope("ID00"), b"x\r\n")
    await deferToThread(sync.waiting.wait, 10)
    ids = [f"ID{n:02d}" for n in range(1, 11)]
    rest = [capture.deliver(envelope(q), b"x\r\n") for q in ids]
    sync.gate.set()
    await first
    results = await gatherResults(rest)
    assert all(r.delivered for r in results)
    assert capture.syncs == 4
    assert [line["queue_id"] for line in index_lines(capture)] == ["ID00", *ids]
    assert sync.seen[2] == ([*sorted(f".{q}.eml.tmp" for q in ids), "ID00.eml", "index.jsonl"], 1)


@pytest.mark.parametrize("failing", [1, 2])
@async_test
async def test_failed_sync_defers_the_delivery(tmp_path: Path, clock: Clock, failing: int) -> None:
    """
    When a sync fails, the deliveries of the group are deferred (the queue
    tries again later) and nothing is reported delivered; no temporary file
    is left, and the next delivery is captured.
    """
    sync = RecordingSync(str(tmp_path / "captured"), fail_on=frozenset({failing}))
    capture = CaptureOutbound(tmp_path, global_reactor(), clock=clock, sync=sync)
    capture.startService()
    try:
        failed = await capture.deliver(envelope("ID1"), b"first\r\n")
        assert failed.delivered == ()
        assert [reason for _, reason in failed.deferred] == [
            "capture failed: Input/output error"
        ] * 2
        names = sorted(os.listdir(capture.captured_dir))
        assert not any(name.endswith(".tmp") for name in names)
        # Failing before the rename leaves nothing; after it, the file and its
        # line may stay, and the retry replaces the file and indexes it again.
        assert names == ([] if failing == 1 else ["ID1.eml", "index.jsonl"])
        again = await capture.deliver(envelope("ID1"), b"again\r\n")
        assert again.delivered
        assert (Path(capture.captured_dir) / "ID1.eml").read_bytes() == b"again\r\n"
    finally:
        await capture.stopService()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs is Linux's")
def test_default_sync_is_syncfs_of_the_directory(tmp_path: Path) -> None:
    """
    On Linux the default sync is syncfs(2) of the capture directory's file
    system (one call for a whole group), not sync(2) of every file system;
    a bad descriptor is an OSError.
    """
    sync = default_sync()
    assert sync.__name__ == "syncfs"
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sync(fd)
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="Bad file descriptor"):
        sync(1 << 30)


def test_discard_delivers_every_recipient_at_once() -> None:
    """
    --relay discard: each recipient is delivered at once, nothing deferred
    or bounced.
    """
    discard = DiscardOutbound()
    verifyObject(IOutbound, discard)
    results: list[DeliveryResult] = []
    message = envelope(recipients=("a@example.net", "b@example.org"))
    discard.deliver(message, b"Subject: x\r\n\r\nbody\r\n").addCallback(results.append)
    assert results == [DeliveryResult(delivered=("a@example.net", "b@example.org"))]
