"""
End-to-end: the gateway relaying to a smarthost (C{--relay smtp://...}), a
real Twisted ESMTP server in its own process on 127.0.0.1; and the crash
test with real relaying.
"""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from tests.gateway_process import (
    Gateway,
    RelayTargetProcess,
    add_user,
    admin,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.e2e


def relaying_gateway(tmp_path: Path, target: RelayTargetProcess) -> Gateway:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    return Gateway(data_dir, free_port(), relay=f"smtp://127.0.0.1:{target.port}")


def test_messages_reach_the_smarthost_intact(tmp_path: Path) -> None:
    """
    A message with dot lines, relayed over STARTTLS to a real SMTP server,
    arrives byte for byte (headers rewritten by the gateway, body untouched),
    to every recipient, once.
    """
    target = RelayTargetProcess(tmp_path)
    target.start()
    gw = relaying_gateway(tmp_path, target)
    gw.start()
    try:
        user = add_user(gw.data_dir, "relay", "--domains", "example.com")
        body = ".leading dot\r\n..two dots\r\n.\r\nmiddle\r\n" + ("x" * 70 + "\r\n") * 600
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            client.starttls(context=gw.tls_context())
            client.login(user.username, user.password)
            client.sendmail(
                "app@example.com",
                ["a@dest.test", "b@dest.test"],
                "From: app@example.com\r\nSubject: dots\r\nX-Priority: 2\r\n\r\n" + body,
            )
        wait_until(lambda: len(target.received()) >= 1, 30, "the relayed message")
        [entry] = target.received()
        assert entry["sender"] == "app@example.com"
        assert sorted(entry["recipients"]) == ["a@dest.test", "b@dest.test"]
        assert entry["over_tls"] is True
        head, _, relayed_body = entry["data"].partition("\r\n\r\n")
        assert relayed_body == body
        assert "X-Priority: 2" in head.split("\r\n")
        assert head.startswith("Received: from ")
    finally:
        assert gw.stop(), gw.log_tail()
        target.stop()


def test_a_refusing_smarthost_defers_and_the_message_waits_for_it(tmp_path: Path) -> None:
    """
    A 4xx at the end of data defers the message: it stays queued (deferred,
    one attempt) and is delivered once the smarthost takes mail again and an
    admin releases it.
    """
    port = free_port()
    refusing = RelayTargetProcess(tmp_path, extra_args=("--port", str(port), "--eom-reply", "451"))
    refusing.start()
    gw = relaying_gateway(tmp_path, refusing)
    gw.start()
    second = tmp_path / "second"
    second.mkdir()
    accepting = RelayTargetProcess(second, extra_args=("--port", str(port)))
    try:
        user = add_user(gw.data_dir, "relay", "--domains", "example.com")
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=30) as client:
            client.login(user.username, user.password)
            client.sendmail(
                "app@example.com", ["a@dest.test"], "From: app@example.com\r\n\r\nhi\r\n"
            )
        listing: dict[str, object] = {}

        def deferred() -> bool:
            listing.update(admin(gw.data_dir, "queue", "list"))
            messages = listing["messages"]
            assert isinstance(messages, list)
            return bool(messages) and messages[0]["state"] == "deferred"

        wait_until(deferred, 30, "the message to be deferred")
        messages = listing["messages"]
        assert isinstance(messages, list)
        [message] = messages
        assert message["attempts"] == 1
        assert refusing.received() == []
        refusing.stop()
        accepting.start()
        admin(gw.data_dir, "queue", "release", message["queue_id"])
        wait_until(lambda: len(accepting.received()) == 1, 30, "the delivery")
        assert admin(gw.data_dir, "queue", "list")["messages"] == []
    finally:
        assert gw.stop(), gw.log_tail()
        refusing.stop()
        accepting.stop()
