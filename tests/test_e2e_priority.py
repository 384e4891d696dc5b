"""
End-to-end: every source of message priority PRODUCT section 2 lists, and
the order in which the queue then delivers (captured/index.jsonl).
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.gateway_process import Gateway, add_user, free_port

pytestmark = pytest.mark.e2e


def _msg(subject: str, headers: str = "") -> str:
    return (
        f"From: app@example.com\r\nTo: x@dest.test\r\nSubject: {subject}\r\n{headers}\r\nbody\r\n"
    )


#: (subject, MAIL parameters, extra headers, expected effective priority) for a
#: user whose own default is 5, so the message's priority decides.
CASES = [
    ("smtpapi", [], 'X-SMTPAPI: {"Priority": 1}\r\nX-Priority: 5\r\n', 1),
    ("mt-param", ["MT-PRIORITY=2"], "X-Priority: 5\r\nMT-Priority: -9\r\n", 2),
    ("x-priority", [], "X-Priority: 3 (Normal)\r\nImportance: low\r\n", 3),
    ("mt-header", [], "MT-Priority: -2\r\nX-Priority: 1\r\n", 4),
    ("importance", [], "Importance: low\r\n", 4),
    ("none", [], "", 5),
]


def test_each_priority_source_and_the_resulting_delivery_order(tmp_path: Path) -> None:
    """
    Messages queued while delivery is held back come out strictly by
    effective priority, FIFO within a priority, after a restart too: the
    journal is replayed into the scheduler.
    """
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # One token a day: the primer takes it, the rest wait in the queue.
    gw = Gateway(data_dir, free_port(), extra_args=("--rate", "0.00001", "--concurrency", "1"))
    gw.start()
    try:
        low = add_user(data_dir, "prio", "--domains", "example.com", "--priority", "5")
        high = add_user(data_dir, "prio", "--domains", "example.com", "--priority", "1")
        client = smtplib.SMTP("127.0.0.1", gw.port, timeout=30)
        client.starttls(context=gw.tls_context())
        client.login(low.username, low.password)
        client.sendmail("app@example.com", ["x@dest.test"], _msg("primer"))
        gw.wait_delivered(1)
        ids: dict[str, str] = {}
        for subject, params, headers, _ in CASES:
            code, reply = client.mail("app@example.com", params)
            assert code == 250, reply
            assert client.rcpt("x@dest.test")[0] == 250
            code, reply = client.data(_msg(subject, headers))
            assert code == 250, reply
            ids[reply.decode().rsplit(" ", 1)[1]] = subject
        client.quit()
        # The user's default wins when it is higher than the message's.
        client = smtplib.SMTP("127.0.0.1", gw.port, timeout=30)
        client.starttls(context=gw.tls_context())
        client.login(high.username, high.password)
        code, reply = client.mail("app@example.com")
        assert code == 250, reply
        assert client.rcpt("x@dest.test")[0] == 250
        code, reply = client.data(_msg("user-default", "X-Priority: 5\r\n"))
        assert code == 250, reply
        ids[reply.decode().rsplit(" ", 1)[1]] = "user-default"
        client.quit()
        assert gw.stop()
        assert len(gw.index()) == 1, "nothing but the primer may have gone out"
    finally:
        if gw.process is not None:
            gw.stop()

    # One delivery at a time: the capture index then shows dispatch order.
    gw.extra_args = ("--concurrency", "1")
    gw.start()
    try:
        entries = gw.wait_delivered(2 + len(CASES))[1:]
    finally:
        assert gw.stop()
    got = [(ids[e["queue_id"]], e["priority"]) for e in entries]
    cases = [(subject, prio) for subject, _, _, prio in CASES] + [("user-default", 1)]
    # Strict priority, FIFO within one priority (sorted() is stable).
    expected = sorted(cases, key=lambda case: case[1])
    assert got == expected
