"""
Tests for C{smtpgw-admin queue ...}: C{main()} runs in a thread, as the
command line would, against a real control service on a UNIX socket served
by the reactor, in front of a real queue (see L{tests.test_control}).
"""

from __future__ import annotations

import json
import smtplib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.threads import deferToThread

from smtpgw.admin_cli import main
from smtpgw.model import MessageState, Priority
from smtpgw.queueinfo import MAX_LIST_LIMIT
from tests.gateway_process import ADMIN, Gateway, add_user, free_port
from tests.gateway_process import admin as gateway_admin
from tests.test_control import NOW, Harness, async_test, data_dir, result, served

__all__ = ["data_dir"]


class QueueAdmin:
    """
    Runs C{smtpgw-admin --data-dir DIR ...} in-process, off the reactor
    thread.
    """

    def __init__(self, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.data_dir = data_dir
        self.capsys = capsys

    async def __call__(self, *args: str) -> tuple[int, str, str]:
        """
        @return: exit status, standard output, standard error.
        """
        self.capsys.readouterr()
        status: int = await deferToThread(main, ["--data-dir", str(self.data_dir), *args])
        out, err = self.capsys.readouterr()
        if status:
            assert out == ""
            assert err.startswith("smtpgw-admin: error: ")
            assert err.count("\n") == 1, "the error is not one line"
        else:
            assert err == ""
        return status, out, err

    async def json(self, *args: str) -> Any:
        """
        Run a command with C{--json} at the end; it must succeed.
        """
        status, out, err = await self(*args, "--json")
        assert status == 0, err
        return json.loads(out)


@pytest.fixture
def admin(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> QueueAdmin:
    return QueueAdmin(data_dir, capsys)


class TestWithoutGateway:
    @async_test
    async def test_gateway_not_running(self, admin: QueueAdmin) -> None:
        """
        With no gateway on the data directory, a queue command fails with
        exit status 1 and says so.
        """
        status, _, err = await admin("queue", "stop")
        assert status == 1
        assert "the gateway is not running (no control socket" in err
        assert str(admin.data_dir / "control.sock") in err

    @async_test
    async def test_bad_input_is_refused_before_connecting(self, admin: QueueAdmin) -> None:
        """
        Bad input exits 2 with its reason, without needing a gateway.
        """
        cases = {
            ("queue", "list", "--state", "delivered"): (
                "--state: delivered messages are no longer in the queue"
            ),
            ("queue", "list", "--state", "lost"): "--state: 'lost' is not a queue state",
            ("queue", "list", "--priority", "6"): "--priority: '6' is not a priority",
            ("queue", "list", "--limit", "0"): f"--limit must be 1 to {MAX_LIST_LIMIT}, not 0",
            ("queue", "list", "--limit", str(MAX_LIST_LIMIT + 1)): "--limit must be 1 to",
            ("queue", "priority", "X", "0"): "N: '0' is not a priority",
            ("queue", "hold"): "the following arguments are required: ID",
            ("queue", "frobnicate"): "invalid choice: 'frobnicate'",
        }
        for args, message in cases.items():
            status, _, err = await admin(*args)
            assert status == 2, args
            assert message in err, (args, err)

    @async_test
    async def test_help_lists_the_commands(self, admin: QueueAdmin) -> None:
        """
        C{queue --help} names every queue command.
        """
        status, out, _ = await admin("queue", "--help")
        assert status == 0
        for command in ("list", "stop", "start", "hold", "release", "cancel", "priority", "why"):
            assert command in out


class TestWithGateway:
    @async_test
    async def test_list_json(self, admin: QueueAdmin) -> None:
        """
        C{queue list --json}: the queue's status and one document per
        message, with the product's field names and ISO 8601 times.
        """
        h = Harness(concurrency=1)
        sending = h.submit(list="a", username="alice")
        queued = h.submit(list="b", username="bob", priority=2)
        async with served(h, admin.data_dir):
            document = await admin.json("queue", "list")
        assert document["paused"] is False
        assert document["counts"] == {"queued": 1, "sending": 1, "deferred": 0, "held": 0}
        assert document["next_after"] is None
        assert [m["queue_id"] for m in document["messages"]] == [sending, queued]
        assert document["messages"][1] == {
            "queue_id": queued,
            "list": "b",
            "username": "bob",
            "sender": "app@b.example",
            "recipients": ["r0@example.org", "r1@example.org"],
            "recipient_count": 2,
            "priority": 2,
            "state": "queued",
            "attempts": 0,
            "accepted_at": "2023-11-14T22:12:20Z",
            "next_attempt_at": None,
            "estimated_send_at": None,
            "subject": "hi",
        }

    @async_test
    async def test_list_filters_and_paging(self, admin: QueueAdmin) -> None:
        """
        The filters reach the gateway, and C{--limit}/C{--after} page
        through the queue.
        """
        h = Harness(concurrency=1)
        ids = [h.submit(list="a" if n % 2 else "b", username=f"u{n % 2}") for n in range(5)]
        result_ids: dict[str, list[str]] = {}
        async with served(h, admin.data_dir):
            for name, args in {
                "list": ("--list", "a"),
                "user": ("--user", "u0"),
                "state": ("--state", "sending"),
                "priority": ("--priority", "3"),
                "none": ("--priority", "1"),
            }.items():
                document = await admin.json("queue", "list", *args)
                result_ids[name] = [m["queue_id"] for m in document["messages"]]
            first = await admin.json("queue", "list", "--limit", "2")
            second = await admin.json("queue", "list", "--limit", "2", "--after", ids[1])
            status, text, _ = await admin("queue", "list", "--limit", "2")
        assert result_ids == {
            "list": [ids[1], ids[3]],
            "user": [ids[0], ids[2], ids[4]],
            "state": [ids[0]],
            "priority": ids,
            "none": [],
        }
        assert [m["queue_id"] for m in first["messages"]] == ids[:2]
        assert first["next_after"] == ids[1]
        assert [m["queue_id"] for m in second["messages"]] == ids[2:4]
        assert status == 0
        assert f"more: list on with --after {ids[1]}" in text

    @async_test
    async def test_list_text(self, admin: QueueAdmin) -> None:
        """
        Without C{--json}, a status line and a table.
        """
        h = Harness(concurrency=1)
        queue_id = h.submit(list="a", username="alice")
        async with served(h, admin.data_dir):
            status, out, _ = await admin("queue", "list")
            empty_status, empty, _ = await admin("queue", "list", "--list", "zzz")
        assert status == empty_status == 0
        lines = out.splitlines()
        assert lines[0] == (
            "queue running: 0 queued, 1 sending, 0 deferred, 0 held; deliveries under way: 1"
        )
        assert lines[1].split()[:3] == ["QUEUE", "ID", "LIST"]
        assert lines[2].split()[:5] == [queue_id, "a", "alice", "3", "sending"]
        assert "no messages match" in empty

    @async_test
    async def test_stop_and_start(self, admin: QueueAdmin) -> None:
        """
        C{queue stop} stops sending while mail is accepted; C{queue start}
        sends it.
        """
        h = Harness(concurrency=5)
        async with served(h, admin.data_dir):
            stopped = await admin.json("queue", "stop")
            queue_id = h.submit()
            assert h.outbound.pending == {}
            status, text, _ = await admin("queue", "stop")
            started = await admin.json("queue", "start")
        assert stopped["paused"] is True
        assert status == 0
        assert text.startswith("queue stopped by an admin:")
        assert "mail is still accepted and kept" in text
        assert started["paused"] is False
        assert started["in_flight"] == 1
        assert list(h.outbound.pending) == [queue_id]

    @async_test
    async def test_hold_release_priority_cancel(self, admin: QueueAdmin) -> None:
        """
        Each change answers the message's new state and priority, and is
        journaled.
        """
        h = Harness(concurrency=1)
        h.submit()
        queue_id = h.submit()
        async with served(h, admin.data_dir):
            held = await admin.json("queue", "hold", queue_id)
            moved = await admin.json("queue", "priority", queue_id, "1")
            released = await admin.json("queue", "release", queue_id)
            status, text, _ = await admin("queue", "cancel", queue_id)
        assert held == {"queue_id": queue_id, "state": "held", "priority": 3}
        assert moved == {"queue_id": queue_id, "state": "held", "priority": 1}
        assert released == {"queue_id": queue_id, "state": "queued", "priority": 1}
        assert status == 0
        assert text == f"{queue_id}: cancelled, priority 1\n"
        assert [s for s, _, _ in h.records(queue_id)] == ["held", "queued", "cancelled"]
        replayed = {m.envelope.queue_id for m in h.journal.replay()}
        assert queue_id not in replayed

    @async_test
    async def test_refused_changes(self, admin: QueueAdmin) -> None:
        """
        An unknown id or a message being sent exits 1 with the reason, and
        nothing changes.
        """
        h = Harness(concurrency=1)
        sending = h.submit()
        before = list(h.journal.state_records)
        async with served(h, admin.data_dir):
            unknown_status, _, unknown = await admin("queue", "release", "NOPE")
            sending_status, _, refused = await admin("queue", "hold", sending)
        assert unknown_status == sending_status == 1
        assert unknown == (
            "smtpgw-admin: error: no message NOPE in the queue (delivered, bounced and "
            "cancelled messages leave it)\n"
        )
        assert refused == f"smtpgw-admin: error: cannot hold {sending}: it is sending now\n"
        assert h.journal.state_records == before
        entry = h.queue.get(sending)
        assert entry is not None
        assert entry.state is MessageState.SENDING

    @async_test
    async def test_why(self, admin: QueueAdmin) -> None:
        """
        C{queue why}: position, priority, throttle and estimate, as text and
        JSON.
        """
        h = Harness(rate=2.0, concurrency=1)
        h.submit()
        h.submit(priority=1)
        queue_id = h.submit(priority=5)
        async with served(h, admin.data_dir):
            document = await admin.json("queue", "why", queue_id)
            status, text, _ = await admin("--json", "queue", "why", queue_id)
            _, plain, _ = await admin("queue", "why", queue_id)
        assert status == 0
        assert json.loads(text) == document
        assert document == {
            "queue_id": queue_id,
            "list": "news",
            "state": "queued",
            "priority": 5,
            "attempts": 0,
            "next_attempt_at": None,
            "position": 1,
            "higher_priority": 1,
            "throttle": "higher_priority",
            "reason": "waiting for higher-priority messages (1)",
            "estimated_send_at": "2023-11-14T22:13:20Z",
        }
        assert document["estimated_send_at"] is not None
        assert f"queue_id: {queue_id}" in plain
        assert "position: 1" in plain
        assert "waiting for: waiting for higher-priority messages (1)" in plain
        assert result(h.control.why(queue_id)).estimated_send_at == NOW + 0.5
        assert Priority(document["priority"]) is Priority.VERY_LOW


# --- against the real gateway -------------------------------------------------


def _message(subject: str, headers: str = "") -> str:
    return f"From: app@example.com\r\nTo: x@dest.test\r\nSubject: {subject}\r\n{headers}\r\nhi\r\n"


def _queue_ids(data_dir: Path, *filters: str) -> dict[str, str]:
    """
    Subject-less view of the queue: queue id -> state.
    """
    document = gateway_admin(data_dir, "queue", "list", *filters)
    return {m["queue_id"]: m["state"] for m in document["messages"]}


@pytest.mark.e2e
def test_queue_commands_against_the_real_gateway(tmp_path: Path) -> None:
    """
    C{smtpgw-admin queue ...} as a process against C{twistd -n smtpgw}: a
    listing, hold, priority and why; holds and priorities survive a clean
    restart and a kill -9 (whose stale socket the next start replaces), and
    a stopped gateway is reported as not running.
    """
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # One token a day: the primer takes it, the rest wait in the queue.
    gw = Gateway(data_dir, free_port(), extra_args=("--rate", "0.00001", "--concurrency", "1"))
    gw.start()
    try:
        user = add_user(data_dir, "news", "--domains", "example.com")
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            client.login(user.username, user.password)
            client.sendmail("app@example.com", ["x@dest.test"], _message("primer"))
            gw.wait_delivered(1)
            for n in range(2):
                client.sendmail("app@example.com", ["x@dest.test"], _message(f"normal {n}"))
            client.sendmail(
                "app@example.com", ["x@dest.test"], _message("urgent", "X-Priority: 1\r\n")
            )
        listing = gateway_admin(data_dir, "queue", "list")
        assert listing["counts"]["queued"] == 3
        first, second, urgent = (m["queue_id"] for m in listing["messages"])
        assert [m["priority"] for m in listing["messages"]] == [3, 3, 1]
        assert {m["username"] for m in listing["messages"]} == {user.username}

        why = gateway_admin(data_dir, "queue", "why", second)
        assert why["reason"] == "waiting for higher-priority messages (1)"
        assert why["position"] == 2
        assert gateway_admin(data_dir, "queue", "hold", first)["state"] == "held"
        assert gateway_admin(data_dir, "queue", "priority", second, "2")["priority"] == 2

        assert gw.stop()
        assert not (data_dir / "control.sock").exists()
        stopped = subprocess.run(
            [ADMIN, "--data-dir", str(data_dir), "queue", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert stopped.returncode == 1
        assert "the gateway is not running" in stopped.stderr

        gw.start()
        # A restart fills the rate limit's bucket: the urgent message goes.
        gw.wait_delivered(2)
        assert _queue_ids(data_dir) == {first: "held", second: "queued"}
        assert gateway_admin(data_dir, "queue", "hold", second)["state"] == "held"
        gw.kill9()
        assert (data_dir / "control.sock").exists()
        gw.start()
        assert _queue_ids(data_dir) == {first: "held", second: "held"}
        after_crash = gateway_admin(data_dir, "queue", "why", second)
        assert (after_crash["priority"], after_crash["reason"]) == (2, "held")
        assert [entry["queue_id"] for entry in gw.index()][1] == urgent
    finally:
        if gw.process is not None:
            gw.stop()
