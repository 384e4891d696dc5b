"""
The security traps of Twisted's stock SMTP server (TWISTED-NOTES), each sent
as the exact attack bytes to L{smtpgw.session.GatewaySMTP}, in memory.
"""

from __future__ import annotations

import base64

import pytest
from twisted.internet.defer import Deferred

from smtpgw.limits import Limits
from tests.session_fakes import PASSWORD, FakeQueue, Harness, message, plain

# -- 1. STARTTLS injection -------------------------------------------------------


def test_command_pipelined_after_starttls_drops_the_connection() -> None:
    """
    C{STARTTLS\\r\\nRSET\\r\\n} in one read: TLS is never started, RSET is
    never answered, the connection is closed.
    """
    harness = Harness(tls=object())
    client = harness.connect()
    client.command(b"EHLO c")
    client.send(b"STARTTLS\r\nRSET\r\n")
    replies = client.replies()
    assert not any(r.startswith((b"220", b"250")) for r in replies)
    assert client.transport.tls_started_with is None  # type: ignore[attr-defined]
    assert client.closed


@pytest.mark.parametrize("rest", [b"R", b"\r\n", b"MAIL FROM:<a@example.com>\r\n"])
def test_any_bytes_after_starttls_in_the_same_read_drop_the_connection(rest: bytes) -> None:
    """
    Even a partial line or an empty line after STARTTLS is plaintext that
    must never reach the TLS session.
    """
    harness = Harness(tls=object())
    client = harness.connect()
    client.command(b"EHLO c")
    client.send(b"STARTTLS\r\n" + rest)
    assert client.transport.tls_started_with is None  # type: ignore[attr-defined]
    assert client.closed


def test_starttls_injection_queued_behind_a_pending_auth_drops_the_connection() -> None:
    """
    Lines buffered while an AUTH is checked are still plaintext: a STARTTLS
    followed by more of them drops the connection when its turn comes.
    """
    harness = Harness(tls=object(), delayed_auth=True)
    client = harness.connect()
    client.command(b"EHLO c")
    client.send(b"AUTH PLAIN " + plain() + b"\r\nSTARTTLS\r\n")
    client.send(b"RSET\r\n")
    harness.runner.release()
    replies = client.replies()
    assert replies[0].startswith(b"235 ")
    assert not any(r.startswith((b"220", b"250")) for r in replies)
    assert client.transport.tls_started_with is None  # type: ignore[attr-defined]
    assert client.closed


def test_starttls_forgets_helo_transaction_and_login() -> None:
    """
    After STARTTLS the session starts over (RFC 3207 4.2): the EHLO, the
    login and the transaction are forgotten; stock Twisted keeps the login.
    """
    options = object()
    harness = Harness(tls=options)
    client = harness.logged_in()
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"250 ")
    assert client.command(b"STARTTLS") == [b"220 2.0.0 Ready to start TLS"]
    assert client.transport.tls_started_with is options  # type: ignore[attr-defined]
    session = client.session
    assert not session.authenticated
    assert session.delivery is None
    assert session.transaction is None
    # The EHLO is forgotten: AUTH wants a new one.
    assert client.command(b"AUTH PLAIN " + plain())[0].startswith(b"503 5.5.1 ")
    client.command(b"EHLO c")
    assert client.command(b"RCPT TO:<b@c.example>")[0].startswith(b"503 ")
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"530 5.7.0 ")
    assert client.command(b"STARTTLS") == [b"503 5.5.1 TLS already active"]
    assert client.command(b"AUTH PLAIN " + plain())[0].startswith(b"235 ")


# -- 2. Long line in DATA ----------------------------------------------------------

_INJECTED = b"RSET\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<v@victim.example>\r\nDATA\r\n"


@pytest.mark.parametrize(
    "length",
    [999, 16385, 70000],
    ids=["over-data-line-limit", "over-twisted-max-length", "over-a-read"],
)
def test_long_data_line_refuses_and_closes(length: int) -> None:
    """
    A body line over the limit (998, or Twisted's 16 KiB MAX_LENGTH) gets a
    5.x.x refusal and the connection is closed: the commands after it in the
    body are never run, nothing is queued.
    """
    harness = Harness()
    client = harness.logged_in()
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    assert client.codes() == [b"250", b"250", b"354"]
    client.send(b"Subject: x\r\n\r\n" + b"A" * length + b"\r\n" + _INJECTED + b"evil\r\n.\r\n")
    replies = client.replies()
    assert len(replies) == 1
    assert replies[0].startswith(b"550 5.6.0 ")
    assert client.closed
    assert harness.queue.submitted == []


def test_long_data_line_arriving_in_pieces_refuses_and_closes() -> None:
    """
    The limit holds for a line that has not ended yet: its first 1001
    octets are enough to refuse it.
    """
    harness = Harness()
    client = harness.logged_in()
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    client.replies()
    client.send(b"A" * 1000)
    assert not client.closed
    client.send(b"A")
    assert client.replies()[0].startswith(b"550 5.6.0 ")
    assert client.closed
    client.send(b"\r\n" + _INJECTED)
    assert client.replies() == []
    assert harness.queue.submitted == []


def test_data_line_at_the_limit_is_accepted() -> None:
    """
    A 998-octet line (and a 999-octet one that is dot-stuffed) is accepted.
    """
    harness = Harness()
    client = harness.logged_in()
    body = message(body=b"A" * 998 + b"\r\n.." + b"B" * 997 + b"\r\n")
    assert client.mail_transaction(body)[-1].startswith(b"250 2.0.0 ")
    assert harness.queue.submitted[0][1].endswith(b"\r\n." + b"B" * 997 + b"\r\n")


def test_long_line_after_a_size_refusal_still_closes() -> None:
    """
    Once a message is refused as too big the rest is skipped, but a long
    line still ends the connection rather than leave the framing in doubt.
    """
    harness = Harness(limits=Limits(max_size=1024))
    client = harness.logged_in()
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    client.replies()
    client.send(b"x" * 900 + b"\r\n" + b"x" * 900 + b"\r\n")
    assert not client.closed
    client.send(b"A" * 2000)
    assert client.closed
    assert harness.queue.submitted == []


# -- 3. Bare CR / bare LF smuggling ---------------------------------------------------

_SMUGGLED = (
    b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@dest.example>\r\nDATA\r\n"
    b"From: ceo@example.com\r\n\r\nsmuggled\r\n.\r\n"
)


@pytest.mark.parametrize(
    "end",
    [
        b"\n.\n",
        b"\r.\r",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\r.\r\n",
        b"\r\n.\r\r\n",
    ],
    ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CRLF.CR", "CR.CRLF", "CRLF.CRCRLF"],
)
def test_smuggled_end_of_data_is_refused(end: bytes) -> None:
    """
    A non-standard end-of-data followed by a second transaction: refused
    with 5.x.x, the connection closed, nothing queued, never a second
    message.
    """
    harness = Harness()
    client = harness.logged_in()
    replies = client.mail_transaction(
        b"From: a@example.com\r\n\r\nhello" + end + _SMUGGLED + b"more\r\n"
    )
    assert [r[:3] for r in replies[:3]] == [b"250", b"250", b"354"]
    refusals = replies[3:]
    assert len(refusals) == 1
    assert refusals[0].startswith(b"550 5.6.0 ")
    assert client.closed
    assert harness.queue.submitted == []


@pytest.mark.parametrize(
    "line",
    [b"bare\nLF inside", b"bare\rCR inside", b"trailing CR\r", b"\nleading LF", b"NUL\0inside"],
)
def test_bare_cr_lf_and_nul_inside_lines_are_refused(line: bytes) -> None:
    """
    A bare CR or LF (or a NUL) anywhere in a body or header line refuses the
    message.
    """
    harness = Harness()
    client = harness.logged_in()
    replies = client.mail_transaction(b"From: a@example.com\r\n\r\n" + line + b"\r\n")
    assert replies[-1].startswith(b"550 5.6.0 ")
    assert harness.queue.submitted == []


def test_bare_lf_in_a_header_is_refused() -> None:
    """
    A header folded with a bare LF is refused too.
    """
    harness = Harness()
    client = harness.logged_in()
    replies = client.mail_transaction(b"From: a@example.com\nBcc: x@y.example\r\n\r\nhi\r\n")
    assert replies[-1].startswith(b"550 5.6.0 ")
    assert harness.queue.submitted == []


def test_clean_message_before_a_smuggling_attempt_is_queued_once() -> None:
    """
    A clean message, then a smuggling attempt on the same connection: one
    message queued, the attempt refused.
    """
    harness = Harness()
    client = harness.logged_in()
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    replies = client.mail_transaction(b"From: a@example.com\r\n\r\nx\n.\n" + _SMUGGLED)
    assert replies[-1].startswith(b"550 5.6.0 ")
    assert len(harness.queue.submitted) == 1


# -- 4. Pipelining with asynchronous validation --------------------------------------


def test_pipelined_commands_wait_for_a_pending_auth() -> None:
    """
    With the credential check still running, the pipelined MAIL/RCPT/DATA
    are not answered; once it finishes the replies come in order.
    """
    harness = Harness(delayed_auth=True)
    client = harness.connect()
    client.send(
        b"EHLO c\r\nAUTH PLAIN " + plain() + b"\r\n"
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n"
    )
    assert client.replies()[-1].startswith(b"250 ")
    harness.runner.release()
    assert client.codes() == [b"235", b"250", b"250", b"354"]


def test_pipelined_commands_after_a_failed_auth_wait_for_the_tarpit() -> None:
    """
    The tarpit delay of a failed AUTH holds back the pipelined next command.
    """
    harness = Harness(limits=Limits(auth_failure_delay=2.0))
    client = harness.connect()
    client.send(b"EHLO c\r\nAUTH PLAIN " + plain(password="bad") + b"\r\nMAIL FROM:<a@b.c>\r\n")
    assert client.codes() == [b"250"]
    harness.clock.advance(1.9)
    assert client.codes() == []
    harness.clock.advance(0.1)
    assert client.codes() == [b"535", b"530"]


def test_pipelined_quit_waits_for_the_queue() -> None:
    """
    A QUIT pipelined after the final dot is answered after the 250 that
    waits on the queue, and the connection closes only then.
    """
    harness = Harness(queue=FakeQueue(mode="pending"))
    client = harness.logged_in()
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    client.send(message() + b".\r\nQUIT\r\n")
    assert client.codes() == [b"250", b"250", b"354"]
    assert not client.closed
    harness.queue.pending[0].callback(None)
    assert client.codes() == [b"250", b"221"]
    assert client.closed


def test_pipelined_commands_wait_for_a_pending_sender_check() -> None:
    """
    An avatar whose validateFrom answers later holds back RCPT and DATA.
    """
    harness = Harness()
    client = harness.logged_in()
    delivery = client.session.delivery
    checks: list[Deferred[object]] = []

    def slow_validate(helo: object, origin: object) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        checks.append(d)
        d.addCallback(lambda _: origin)
        return d

    delivery.validateFrom = slow_validate
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    assert client.replies() == []
    checks[0].callback(None)
    assert client.codes() == [b"250", b"250", b"354"]


def test_input_is_not_buffered_without_bound_while_paused() -> None:
    """
    A client that keeps sending while a reply is pending has the transport
    paused, and resumed once the reply is out.
    """
    harness = Harness(delayed_auth=True, limits=Limits(max_junk_commands=20_000))
    client = harness.connect()
    client.send(b"EHLO c\r\nAUTH PLAIN " + plain() + b"\r\n")
    for _ in range(80):
        client.send(b"NOOP\r\n" * 200)
    assert client.transport.producerState == "paused"
    harness.runner.release()
    assert client.transport.producerState == "producing"
    codes = client.codes()
    assert codes[1] == b"235"
    assert codes[2:] == [b"250"] * 16000


# -- 5. Malformed AUTH PLAIN ------------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        b"!!!notbase64!!!",
        b"YWxpY2U",  # base64 without its padding
        base64.b64encode(b"alice" + PASSWORD.encode()),
        base64.b64encode(b"alice\0" + PASSWORD.encode()),
        base64.b64encode(b"\0alice\0" + PASSWORD.encode() + b"\0extra"),
        b"=",
        base64.b64encode(b"\0" + b"a" * 3000 + b"\0" + b"b" * 3000),
    ],
    ids=["not-base64", "bad-padding", "no-nul", "one-nul", "three-nuls", "empty", "huge"],
)
def test_malformed_auth_plain_is_501_and_the_session_goes_on(response: bytes) -> None:
    """
    A malformed AUTH PLAIN response gets 501 5.5.2, keeps the connection,
    and a correct AUTH afterwards works.
    """
    harness = Harness()
    client = harness.connect()
    client.command(b"EHLO c")
    assert client.command(b"AUTH PLAIN " + response) == [b"501 5.5.2 Cannot decode AUTH response"]
    assert not client.closed
    assert client.command(b"AUTH PLAIN") == [b"334 "]
    assert client.command(response) == [b"501 5.5.2 Cannot decode AUTH response"]
    assert client.command(b"AUTH PLAIN") == [b"334 "]
    assert client.command(b"") == [b"501 5.5.2 Cannot decode AUTH response"]
    assert client.command(b"AUTH PLAIN " + plain())[0].startswith(b"235 ")
    assert harness.factory.auth_failures.failures("192.0.2.1") == 0


def test_auth_line_over_the_auth_limit_is_500() -> None:
    """
    An AUTH line may be longer than other commands (RFC 4954: 12288 octets)
    but not longer than that.
    """
    client = Harness().connect()
    client.command(b"EHLO c")
    line = b"AUTH PLAIN " + b"A" * (12288 - len(b"AUTH PLAIN ") - 2)
    assert client.command(line)[0].startswith(b"501 5.5.2 ")
    assert client.command(line + b"A")[0].startswith(b"500 5.5.2 ")
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]


# -- 6. bcrypt edge cases ------------------------------------------------------------------


@pytest.mark.parametrize("password", ["x" * 72, "x" * 73, "é" * 40, ""])
def test_awkward_passwords_fail_as_535(password: str) -> None:
    """
    Passwords bcrypt cannot take (over 72 bytes) or does not expect are an
    ordinary failed login, never a crash.
    """
    harness = Harness(limits=Limits(auth_failure_delay=0))
    client = harness.connect()
    assert client.login("alice", password) == [b"535 5.7.8 Authentication credentials invalid"]
    assert not client.closed
