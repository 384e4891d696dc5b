"""
End-to-end: the real C{twistd -n smtpgw} on 127.0.0.1, driven by Python's
C{smtplib} and by C{swaks}, delivering into the capture relay.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import smtplib
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway_process import (
    Credentials,
    Gateway,
    add_user,
    admin,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.e2e

MAX_SIZE = 200_000
MAX_RECIPIENTS = 5


def message(sender: str, to: str, subject: str, extra_headers: str = "", body: str = "") -> str:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra_headers}\r\n"
        f"{body or 'Hello from the end-to-end test.'}\r\n"
    )


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data_dir = tmp_path_factory.mktemp("e2e") / "data"
    data_dir.mkdir()
    gw = Gateway(
        data_dir,
        free_port(),
        extra_args=(
            "--max-size",
            str(MAX_SIZE),
            "--max-recipients",
            str(MAX_RECIPIENTS),
            # smtplib tries every mechanism, so one wrong password is two
            # failures; the burst limit has its own test below.
            "--auth-failure-limit",
            "50",
            "--auth-failure-delay",
            "0.05",
        ),
    )
    gw.start()
    try:
        yield gw
    finally:
        if gw.process is not None:
            assert gw.stop(), gw.log_tail()


@pytest.fixture(scope="module")
def user(gateway: Gateway) -> Credentials:
    return add_user(
        gateway.data_dir, "news", "--domains", "example.com", "--senders", "boss@other.org"
    )


def connect(gateway: Gateway, tls: bool = True) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gateway.port, timeout=30)
    client.ehlo("client.test")
    if tls:
        client.starttls(context=gateway.tls_context())
        client.ehlo("client.test")
    return client


def delivered(gateway: Gateway, queue_id: str) -> dict[str, object]:
    """
    The capture index entry of C{queue_id}, once it is there.
    """
    found: list[dict[str, object]] = []

    def arrived() -> bool:
        found[:] = [e for e in gateway.index() if e["queue_id"] == queue_id]
        return bool(found)

    wait_until(arrived, 30, f"delivery of {queue_id}")
    return found[0]


def queue_id_of(reply: bytes) -> str:
    text = reply.decode()
    assert "queued as" in text, text
    return text.rsplit("queued as", 1)[1].strip()


def send(client: smtplib.SMTP, sender: str, rcpts: list[str], data: str) -> tuple[int, bytes]:
    code, reply = client.mail(sender)
    assert code == 250, reply
    for rcpt in rcpts:
        code, reply = client.rcpt(rcpt)
        assert code == 250, reply
    return client.data(data)


def test_starttls_then_auth_plain_delivers(gateway: Gateway, user: Credentials) -> None:
    """
    STARTTLS, then AUTH PLAIN: the message is acknowledged with a queue id and
    arrives in the capture relay with the envelope and headers rewritten.
    """
    with connect(gateway) as client:
        assert "PLAIN" in client.esmtp_features["auth"].split()
        client.login(user.username, user.password)  # smtplib picks PLAIN first here
        code, reply = send(
            client,
            "app@example.com",
            ["alice@dest.test", "bob@dest.test"],
            message(
                "App <app@example.com>",
                "alice@dest.test",
                "plain",
                extra_headers='X-SMTPAPI: {"Priority": 2}\r\n',
            ),
        )
    assert (code, reply[:5]) == (250, b"2.0.0"), reply
    qid = queue_id_of(reply)
    entry = delivered(gateway, qid)
    assert entry["list"] == "news"
    assert entry["username"] == user.username
    assert entry["sender"] == "app@example.com"
    assert entry["recipients"] == ["alice@dest.test", "bob@dest.test"]
    assert entry["priority"] == 2
    raw = (gateway.captured / f"{qid}.eml").read_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert parsed["X-SMTPAPI"] is None
    assert parsed["X-Priority"] == "2"
    assert parsed["Message-ID"] == f"<{qid}@gateway.test>"
    received = parsed.get_all("Received")
    assert received is not None
    assert len(received) == 1
    assert "ESMTPSA" in received[0]
    assert qid in received[0]
    assert b"\r\n" in raw
    assert b"\n" not in raw.replace(b"\r\n", b"")


def test_starttls_then_auth_login_delivers(gateway: Gateway, user: Credentials) -> None:
    """
    AUTH LOGIN after STARTTLS works too, and an existing Message-ID is kept.
    """
    with connect(gateway) as client:
        client.user, client.password = user.username, user.password
        code, reply = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        assert code == 235, reply
        code, reply = send(
            client,
            "boss@other.org",
            ["carol@dest.test"],
            message(
                "boss@other.org", "carol@dest.test", "login", "Message-ID: <keep@me.test>\r\n"
            ),
        )
    assert code == 250, reply
    delivered(gateway, queue_id_of(reply))
    raw = (gateway.captured / f"{queue_id_of(reply)}.eml").read_bytes()
    parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert parsed.get_all("Message-ID") == ["<keep@me.test>"]
    assert parsed["X-Priority"] == "3"


def test_mail_before_auth_is_refused_with_530(gateway: Gateway) -> None:
    with connect(gateway) as client:
        code, reply = client.mail("app@example.com")
    assert (code, reply[:5]) == (530, b"5.7.0"), reply


def test_wrong_password_gets_535(gateway: Gateway, user: Credentials) -> None:
    with connect(gateway) as client, pytest.raises(smtplib.SMTPAuthenticationError) as info:
        client.login(user.username, user.password + "x")
    assert info.value.smtp_code == 535
    error = info.value.smtp_error
    assert isinstance(error, bytes)
    assert error.startswith(b"5.7.8"), error


def test_unknown_and_inactive_users_get_the_same_535(gateway: Gateway) -> None:
    """
    An inactive user with the right password and an unknown user get exactly
    the reply of a wrong password: no hint which.
    """
    inactive = add_user(gateway.data_dir, "news", "--domains", "example.com", "--inactive")
    replies = []
    for username, password in ((inactive.username, inactive.password), ("nobody-x", "pw")):
        with connect(gateway) as client, pytest.raises(smtplib.SMTPAuthenticationError) as info:
            client.login(username, password)
        replies.append((info.value.smtp_code, info.value.smtp_error))
    assert replies[0] == replies[1]
    assert replies[0][0] == 535


def test_unauthorized_envelope_sender_is_refused_and_alerted(
    gateway: Gateway, user: Credentials
) -> None:
    with connect(gateway) as client:
        client.login(user.username, user.password)
        code, reply = client.mail("app@sub.example.com")
    assert (code, reply[:5]) == (550, b"5.7.1"), reply
    assert b"app@sub.example.com" in reply
    assert alerts(gateway, "sender_domain", "app@sub.example.com")


def test_unauthorized_header_from_is_refused_after_data(
    gateway: Gateway, user: Credentials
) -> None:
    with connect(gateway) as client:
        client.login(user.username, user.password)
        code, reply = send(
            client,
            "app@example.com",
            ["dave@dest.test"],
            message("Mallory <mallory@evil.test>", "dave@dest.test", "spoof"),
        )
    assert (code, reply[:5]) == (550, b"5.7.1"), reply
    assert b"mallory@evil.test" in reply
    assert alerts(gateway, "sender_domain", "mallory@evil.test")


def test_monitor_mode_accepts_and_still_alerts(gateway: Gateway) -> None:
    watched = add_user(gateway.data_dir, "news", "--domains", "example.com", "--monitor")
    with connect(gateway) as client:
        client.login(watched.username, watched.password)
        code, reply = send(
            client,
            "someone@unlisted.test",
            ["erin@dest.test"],
            message("someone@unlisted.test", "erin@dest.test", "monitored"),
        )
    assert code == 250, reply
    delivered(gateway, queue_id_of(reply))
    assert alerts(gateway, "sender_domain", "someone@unlisted.test")


def test_size_over_the_limit_is_refused_with_552(gateway: Gateway, user: Credentials) -> None:
    """
    SIZE is advertised; a declared size over it is refused at MAIL, and a
    body over it at the end of DATA; one at the limit is accepted.
    """
    with connect(gateway) as client:
        assert client.esmtp_features["size"] == str(MAX_SIZE)
        client.login(user.username, user.password)
        code, reply = client.mail("app@example.com", [f"SIZE={MAX_SIZE + 1}"])
        assert (code, reply[:5]) == (552, b"5.3.4"), reply
        client.rset()
        head = message("app@example.com", "frank@dest.test", "big")
        filler = MAX_SIZE - len(head.encode()) - 2
        lines = ["x" * 98] * (filler // 100)
        body_at_limit = head.rstrip("\r\n") + "\r\n" + "\r\n".join(lines)
        # The rest, less the CRLF before it and the CRLF smtplib ends DATA with.
        body_at_limit += "\r\n" + "y" * (MAX_SIZE - len(body_at_limit.encode()) - 4)
        assert len(body_at_limit.encode()) + 2 == MAX_SIZE
        code, reply = send(client, "app@example.com", ["frank@dest.test"], body_at_limit)
        assert code == 250, reply
        code, reply = send(client, "app@example.com", ["frank@dest.test"], body_at_limit + "z")
    assert (code, reply[:5]) == (552, b"5.3.4"), reply


def test_too_many_recipients_get_452(gateway: Gateway, user: Credentials) -> None:
    with connect(gateway) as client:
        client.login(user.username, user.password)
        assert client.mail("app@example.com")[0] == 250
        for i in range(MAX_RECIPIENTS):
            assert client.rcpt(f"r{i}@dest.test")[0] == 250
        code, reply = client.rcpt("one-too-many@dest.test")
    assert (code, reply[:5]) == (452, b"4.5.3"), reply


def alerts(gateway: Gateway, kind: str, needle: str) -> list[tuple[str, str]]:
    """
    Stored alerts of C{kind} whose message or details mention C{needle}.
    """
    found: list[tuple[str, str]] = []

    def look() -> bool:
        with sqlite3.connect(gateway.data_dir / "smtpgw.db") as db:
            rows = db.execute(
                "SELECT type, message || ' ' || COALESCE(details, '') FROM alerts WHERE type = ?",
                (kind,),
            ).fetchall()
        found[:] = [(t, m) for t, m in rows if needle in m]
        return bool(found)

    wait_until(look, 10, f"a {kind} alert about {needle}")
    return found


def swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("swaks is required in CI (.ci/run installs it)")
        pytest.skip("swaks is not installed (apt-get install swaks)")
    return path


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_starttls_auth_delivers(
    gateway: Gateway, user: Credentials, mechanism: str, tmp_path: Path
) -> None:
    """
    A real third-party client, swaks, with STARTTLS and each AUTH mechanism.
    """
    result = subprocess.run(
        [
            swaks(),
            "--server",
            f"127.0.0.1:{gateway.port}",
            "--tls",
            "--auth",
            mechanism,
            "--auth-user",
            user.username,
            "--auth-password",
            user.password,
            "--from",
            "app@example.com",
            "--to",
            "gina@dest.test",
            "--header",
            "From: app@example.com",
            "--header",
            f"Subject: swaks {mechanism}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    accepted = [line for line in result.stdout.splitlines() if "queued as" in line]
    assert accepted, result.stdout
    qid = accepted[-1].rsplit("queued as", 1)[1].strip()
    entry = delivered(gateway, qid)
    assert entry["recipients"] == ["gina@dest.test"]


def test_admin_cli_sees_the_last_login_the_gateway_recorded(
    gateway: Gateway, user: Credentials
) -> None:
    """
    The gateway records the time and address of the last login; the CLI, a
    second process on the same data directory, reads it while the gateway runs.
    """
    with connect(gateway) as client:
        client.login(user.username, user.password)
    shown: dict[str, object] = {}

    def recorded() -> bool:
        shown.update(admin(gateway.data_dir, "user", "show", user.username))
        return shown.get("last_used_ip") == "127.0.0.1"

    wait_until(recorded, 15, "the last login to be recorded")
    assert shown["username"] == user.username
    assert shown["last_used_at"]
    assert "password" not in shown
    assert not any("$2b$" in str(value) for value in shown.values())


def test_a_burst_of_auth_failures_gets_421_and_an_alert(tmp_path: Path) -> None:
    """
    Failed logins from one address are answered more and more slowly, and
    past the limit AUTH gets 421 4.7.0 and the connection is closed, even
    with the right password; one auth_failures alert is stored.
    """
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    gw = Gateway(
        data_dir,
        free_port(),
        extra_args=("--auth-failure-limit", "3", "--auth-failure-delay", "0.1"),
    )
    gw.start()
    try:
        good = add_user(data_dir, "burst", "--domains", "example.com")
        codes = []
        for _ in range(3):
            with connect(gw) as client:
                code, _ = client.docmd("AUTH", "PLAIN " + _plain(good.username, "wrong"))
                codes.append(code)
                if code == 421:
                    with pytest.raises(smtplib.SMTPServerDisconnected):
                        client.noop()
        # The failure that reaches the limit is answered 421 and closed.
        assert codes == [535, 535, 421]
        with connect(gw) as client:
            code, reply = client.docmd("AUTH", "PLAIN " + _plain(good.username, good.password))
            assert (code, reply[:5]) == (421, b"4.7.0"), reply
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.noop()
        assert alerts(gw, "auth_failures", "127.0.0.1")
    finally:
        assert gw.stop(), gw.log_tail()


def _plain(username: str, password: str) -> str:
    import base64

    return base64.b64encode(f"\0{username}\0{password}".encode()).decode()
