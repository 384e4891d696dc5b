"""
L{smtpgw.smtpclient} in memory: the data encoding (dot-stuffing and CRLF),
the reply parser and its limits, deadlines, STARTTLS, and the conversation
of L{SMTPConnection} against a server the test plays on a
L{StringTransport} with a L{Clock}.
"""

from __future__ import annotations

import base64
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from attrs import define
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from smtpgw.interfaces import DeliveryResult
from smtpgw.model import Envelope, Priority
from smtpgw.smtpclient import (
    MAX_REASON_TEXT,
    MAX_REPLY_LINE,
    MAX_REPLY_LINES,
    ClientSettings,
    ClientTimeouts,
    Credentials,
    Reply,
    SendResult,
    SessionFailed,
    SessionPolicy,
    SMTPClientProtocol,
    SMTPConnection,
    StaleConnection,
    StartTLS,
    TLSFailed,
    TLSPolicy,
    encode_data,
    peer_name,
)

T = TypeVar("T")

TIMEOUTS = ClientTimeouts()
SETTINGS = ClientSettings(helo_name="gw.test", pipelining=True)
ENVELOPE = Envelope(
    queue_id="0000000000000000",
    list="news",
    username="alice",
    sender="alice@example.com",
    recipients=("b@example.org", "c@example.org", "d@example.org"),
    priority=Priority.NORMAL,
    accepted_at=0.0,
)
BODY = b"Subject: hello\r\n\r\nHi.\r\n"
LOST = "connection lost: " + Failure(ConnectionLost("gone")).getErrorMessage()


def unstuff(payload: bytes) -> bytes:
    """
    What a receiving server makes of DATA (RFC 5321 section 4.5.2): the
    lines up to the first C{.} line, each with one leading dot removed.
    """
    lines = payload.split(b"\r\n")
    out: list[bytes] = []
    for line in lines:
        if line == b".":
            return b"".join(part + b"\r\n" for part in out)
        out.append(line[1:] if line.startswith(b".") else line)
    raise AssertionError("no end of data")


# -- encode_data


def test_encode_data_stuffs_every_dot_line() -> None:
    """
    A leading C{.}, a line that is only C{.}, a C{..} line and a C{.} after
    a line end all get one more dot; the final C{.CRLF} ends the data.
    """
    body = b".leading\r\n.\r\n..\r\nmid.dle\r\n.x\r\n"
    assert encode_data(body) == b"..leading\r\n..\r\n...\r\nmid.dle\r\n..x\r\n.\r\n"


def test_encode_data_normalises_line_ends() -> None:
    """
    Bare LF and bare CR become CRLF, and a dot after them is stuffed too.
    """
    assert encode_data(b"a\n.b\r.c\r\nd") == b"a\r\n..b\r\n..c\r\nd\r\n.\r\n"


def test_encode_data_empty_message() -> None:
    """
    An empty message is the final dot alone.
    """
    assert encode_data(b"") == b".\r\n"


@given(st.binary(max_size=2000))
def test_encode_data_round_trips(body: bytes) -> None:
    """
    Whatever the message, the server reads back the CRLF-normalised message,
    and no line before the end is a lone dot.
    """
    payload = encode_data(body)
    normalised = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if normalised and not normalised.endswith(b"\r\n"):
        normalised += b"\r\n"
    assert unstuff(payload) == normalised
    assert payload.endswith(b".\r\n")
    assert b"\r\n.\r\n" not in payload[:-3]
    assert payload.count(b"\n") == payload.count(b"\r\n")


@given(st.lists(st.sampled_from([b".", b"..", b"a", b".a", b"", b"\r\n"]), max_size=200))
def test_encode_data_dot_lines_anywhere(parts: list[bytes]) -> None:
    """
    Messages made of dot lines only round-trip.
    """
    body = b"\r\n".join(parts) + b"\r\n"
    assert unstuff(encode_data(body)) == body


def test_peer_name_brackets_ipv6() -> None:
    """
    Reasons name an IPv6 host in brackets.
    """
    assert peer_name("::1", 25) == "[::1]:25"
    assert peer_name("mx.example.org", 2525) == "mx.example.org:2525"


def test_credentials_repr_hides_password() -> None:
    """
    The password of the credentials never shows in their repr.
    """
    assert "s3cret" not in repr(Credentials("user", "s3cret"))
    assert "s3cret" not in repr(SessionPolicy(credentials=Credentials("user", "s3cret")))


# -- the protocol


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that records C{startTLS}.
    """

    tls_creator: Any = None

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_creator = contextFactory


@define
class Wire:
    """
    The server's end of a client protocol on a L{StringTransport}.
    """

    clock: Clock
    transport: TLSStringTransport
    protocol: SMTPClientProtocol

    def sent(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def reply(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def lose(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or Failure(ConnectionLost("gone")))


def connect(greeting_timeout: float = TIMEOUTS.greeting) -> Wire:
    clock = Clock()
    protocol = SMTPClientProtocol(clock, greeting_timeout)
    transport = TLSStringTransport()
    protocol.makeConnection(transport)
    return Wire(clock, transport, protocol)


def result_of(d: Deferred[T]) -> T:
    """
    The result C{d} already has (a failure is raised).
    """
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    value: T = results[0]
    return value


def failure_of(d: Deferred[Any]) -> BaseException:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    assert isinstance(results[0], Failure), results[0]
    error = results[0].value
    assert error is not None
    return error


def pending(d: Deferred[Any]) -> bool:
    """
    C{d} has no result yet (it may be waiting on another L{Deferred}).
    """
    seen: list[object] = []

    def see(result: object) -> object:
        seen.append(result)
        return result

    d.addBoth(see)
    return not seen


def test_multiline_reply_is_one_reply() -> None:
    """
    C{250-} lines continue a reply; the C{250 } line ends it.
    """
    wire = connect()
    greeting = wire.protocol.greeting()
    wire.reply(b"220-first\r\n220-second\r\n")
    assert pending(greeting)
    wire.reply(b"220 third\r\n")
    assert result_of(greeting) == Reply(220, ("first", "second", "third"))


def test_reply_split_across_reads() -> None:
    """
    A reply is parsed whatever the reads it arrives in, and a bare LF also
    ends a line.
    """
    wire = connect()
    greeting = wire.protocol.greeting()
    for byte in b"220 hel":
        wire.reply(bytes([byte]))
    wire.reply(b"lo\n")
    assert result_of(greeting) == Reply(220, ("hello",))


def test_malformed_reply_ends_the_session() -> None:
    """
    A line that does not start with a reply code is a protocol error: what
    is awaited fails and the connection is dropped.
    """
    wire = connect()
    greeting = wire.protocol.greeting()
    wire.reply(b"hello there\r\n")
    assert "malformed reply" in str(failure_of(greeting))
    assert wire.transport.disconnecting or wire.protocol.failed


@pytest.mark.parametrize(
    ("length", "accepted"), [(MAX_REPLY_LINE, True), (MAX_REPLY_LINE + 1, False)]
)
def test_reply_line_length_limit(length: int, accepted: bool) -> None:
    """
    A reply line of L{MAX_REPLY_LINE} bytes is read; one byte more ends
    the session.
    """
    wire = connect()
    greeting = wire.protocol.greeting()
    wire.reply(b"220 " + b"x" * (length - 4) + b"\r\n")
    if accepted:
        assert result_of(greeting).code == 220
    else:
        assert "longer than" in str(failure_of(greeting))


def test_endless_line_without_line_end_ends_the_session() -> None:
    """
    Bytes without a line end beyond the limit are not buffered forever.
    """
    wire = connect()
    greeting = wire.protocol.greeting()
    wire.reply(b"2" * (MAX_REPLY_LINE + 1))
    assert "longer than" in str(failure_of(greeting))


@pytest.mark.parametrize(
    ("lines", "accepted"), [(MAX_REPLY_LINES, True), (MAX_REPLY_LINES + 1, False)]
)
def test_reply_lines_limit(lines: int, accepted: bool) -> None:
    """
    A reply of L{MAX_REPLY_LINES} lines is read; one more line ends the
    session.
    """
    wire = connect()
    greeting = wire.protocol.greeting()
    wire.reply(b"220-x\r\n" * (lines - 1) + b"220 x\r\n")
    if accepted:
        assert len(result_of(greeting).lines) == lines
    else:
        assert "more than" in str(failure_of(greeting))


def test_unsolicited_reply_ends_the_session() -> None:
    """
    A reply nobody asked for is a protocol error.
    """
    wire = connect()
    greeting = wire.protocol.greeting()
    wire.reply(b"220 hi\r\n")
    result_of(greeting)
    wire.reply(b"250 surprise\r\n")
    assert wire.protocol.failed
    assert "unsolicited" in str(failure_of(wire.protocol.command(b"NOOP", "NOOP", 10)))


def test_unsolicited_421_closes() -> None:
    """
    A server that says C{421} between transactions is going away: the
    connection is closed, what comes next fails with that reply.
    """
    wire = connect()
    greeting = wire.protocol.greeting()
    wire.reply(b"220 hi\r\n")
    result_of(greeting)
    wire.reply(b"421 4.4.2 idle too long\r\n")
    assert wire.transport.disconnecting
    error = failure_of(wire.protocol.command(b"MAIL FROM:<>", "MAIL FROM", 10))
    assert "421 4.4.2 idle too long" in str(error)


def test_greeting_deadline() -> None:
    """
    No greeting within the greeting timeout fails the session; just before
    it, the session still waits.
    """
    wire = connect(greeting_timeout=30)
    greeting = wire.protocol.greeting()
    wire.clock.advance(29.9)
    assert pending(greeting)
    wire.clock.advance(0.1)
    error = failure_of(greeting)
    assert isinstance(error, SessionFailed)
    assert "timed out after 30 s waiting for the reply to greeting" in error.reason


def test_command_deadline_and_everything_after_fails() -> None:
    """
    When a reply is late the connection is aborted and every reply awaited
    (pipelined ones too) fails with the reason.
    """
    wire = connect()
    wire.reply(b"220 hi\r\n")
    result_of(wire.protocol.greeting())
    first, second = wire.protocol.commands(
        [(b"MAIL FROM:<>", "MAIL FROM", 5), (b"RCPT TO:<a@b>", "RCPT TO", 50)]
    )
    wire.clock.advance(5)
    assert "reply to MAIL FROM" in str(failure_of(first))
    assert "reply to MAIL FROM" in str(failure_of(second))
    assert wire.transport.disconnecting or wire.protocol.failed
    assert wire.clock.getDelayedCalls() == []


def test_connection_lost_fails_what_is_awaited() -> None:
    """
    A vanished peer fails the reply awaited, and whatever is asked later.
    """
    wire = connect()
    greeting = wire.protocol.greeting()
    wire.lose()
    assert "connection lost" in str(failure_of(greeting))
    assert wire.protocol.closed.called
    assert isinstance(failure_of(wire.protocol.command(b"QUIT", "QUIT", 1)), SessionFailed)
    assert wire.clock.getDelayedCalls() == []


def test_clean_close_is_named() -> None:
    """
    A server that closes cleanly is reported as having closed the connection.
    """
    wire = connect()
    greeting = wire.protocol.greeting()
    wire.lose(Failure(ConnectionDone()))
    assert "closed the connection" in str(failure_of(greeting))


def _ready(wire: Wire) -> None:
    wire.reply(b"220 hi\r\n")
    result_of(wire.protocol.greeting())


def test_starttls_discards_bytes_after_220() -> None:
    """
    What the server sends after its C{220} to STARTTLS, in the same read,
    is discarded: the next reply awaited (EHLO, inside TLS) is not the fake
    C{250}.
    """
    wire = connect()
    _ready(wire)
    started = wire.protocol.starttls("creator", 10, 10)
    assert wire.sent() == b"STARTTLS\r\n"
    wire.reply(b"220 ready\r\n250 fake\r\n")
    assert wire.transport.tls_creator == "creator"
    assert wire.protocol.discarded_after_starttls == len(b"250 fake\r\n")
    assert pending(started)  # until the handshake completes
    wire.protocol.handshakeCompleted()
    assert result_of(started).code == 220
    assert wire.protocol.tls_active
    ehlo = wire.protocol.command(b"EHLO gw.test", "EHLO", 10)
    assert pending(ehlo)
    wire.reply(b"250 real\r\n")
    assert result_of(ehlo) == Reply(250, ("real",))


def test_starttls_refused_does_not_start_tls() -> None:
    """
    A refusal to STARTTLS is just a reply; TLS is not started.
    """
    wire = connect()
    _ready(wire)
    started = wire.protocol.starttls("creator", 10, 10)
    wire.reply(b"454 4.7.0 TLS not available\r\n")
    assert result_of(started).code == 454
    assert wire.transport.tls_creator is None
    assert not wire.protocol.tls_started


def test_tls_handshake_failure_reaches_the_waiter() -> None:
    """
    A handshake that fails shows only as a lost connection; it fails the
    STARTTLS with L{TLSFailed}, not a hang.
    """
    wire = connect()
    _ready(wire)
    started = wire.protocol.starttls("creator", 10, 10)
    wire.reply(b"220 go\r\n")
    wire.lose(Failure(Exception("certificate verify failed")))
    error = failure_of(started)
    assert isinstance(error, TLSFailed)
    assert "certificate verify failed" in error.reason


def test_tls_handshake_deadline() -> None:
    """
    A handshake that never completes fails after the handshake timeout.
    """
    wire = connect()
    _ready(wire)
    started = wire.protocol.starttls("creator", 10, 60)
    wire.reply(b"220 go\r\n")
    wire.clock.advance(59)
    assert pending(started)
    wire.clock.advance(1)
    assert isinstance(failure_of(started), TLSFailed)


def test_starttls_not_while_replies_are_awaited() -> None:
    """
    STARTTLS is never pipelined behind other commands.
    """
    wire = connect()
    assert isinstance(failure_of(wire.protocol.starttls("c", 1, 1)), SessionFailed)


# -- the conversation


def run(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    return ensureDeferred(coroutine)


def open_session(
    ehlo: bytes = b"250-target.test\r\n250 8BITMIME\r\n",
    policy: SessionPolicy | None = None,
    settings: ClientSettings = SETTINGS,
) -> tuple[Wire, SMTPConnection, Deferred[None]]:
    """
    A connection that has said EHLO and got C{ehlo}; the caller answers
    what comes next.
    """
    wire = connect()
    connection = SMTPConnection(
        wire.protocol,
        "mx.example.org",
        25,
        policy or SessionPolicy(tls=TLSPolicy(starttls=StartTLS.NEVER)),
        settings,
    )
    opened = run(connection.open())
    wire.reply(b"220 target.test ESMTP\r\n")
    assert wire.sent() == b"EHLO gw.test\r\n"
    wire.reply(ehlo)
    return wire, connection, opened


def ready_session(
    ehlo: bytes = b"250-target.test\r\n250 8BITMIME\r\n",
    settings: ClientSettings = SETTINGS,
) -> tuple[Wire, SMTPConnection]:
    wire, connection, opened = open_session(ehlo, settings=settings)
    result_of(opened)
    return wire, connection


def test_open_without_extensions() -> None:
    """
    Greeting, EHLO: the session is ready and knows the extensions.
    """
    wire, connection, opened = open_session(
        b"250-target.test\r\n250-SIZE 1000\r\n250 PIPELINING\r\n"
    )
    result_of(opened)
    assert connection.extensions == {"SIZE": "1000", "PIPELINING": ""}
    assert wire.sent() == b""


def test_greeting_refused() -> None:
    """
    A C{554} greeting fails the session with the server's words; the
    client says QUIT.
    """
    wire = connect()
    connection = SMTPConnection(wire.protocol, "mx.example.org", 25, SessionPolicy(), SETTINGS)
    opened = run(connection.open())
    wire.reply(b"554 5.7.1 go away\r\n")
    assert wire.sent() == b"QUIT\r\n"
    wire.reply(b"221 bye\r\n")
    error = failure_of(opened)
    assert isinstance(error, SessionFailed)
    assert "554 5.7.1 go away" in error.reason
    assert wire.transport.disconnecting


def test_helo_fallback() -> None:
    """
    A server that does not know EHLO gets HELO, and has no extensions.
    """
    wire, connection, opened = open_session(b"502 5.5.1 what?\r\n")
    assert wire.sent() == b"HELO gw.test\r\n"
    wire.reply(b"250 ok\r\n")
    result_of(opened)
    assert connection.extensions == {}


def test_opportunistic_starttls_when_offered() -> None:
    """
    STARTTLS is used when offered, then EHLO is said again inside TLS.
    """
    wire, connection, opened = open_session(
        b"250-target.test\r\n250 STARTTLS\r\n", policy=SessionPolicy()
    )
    assert wire.sent() == b"STARTTLS\r\n"
    wire.reply(b"220 go ahead\r\n")
    assert wire.transport.tls_creator is not None
    wire.protocol.handshakeCompleted()
    assert wire.sent() == b"EHLO gw.test\r\n"
    wire.reply(b"250-target.test\r\n250 AUTH PLAIN\r\n")
    result_of(opened)
    assert connection.tls_active
    assert "STARTTLS" not in connection.extensions


def test_opportunistic_without_starttls_goes_on_in_clear() -> None:
    """
    Without STARTTLS on offer, an opportunistic session goes on in clear.
    """
    wire, connection, opened = open_session(policy=SessionPolicy())
    result_of(opened)
    assert not connection.tls_active
    assert wire.sent() == b""


def test_required_tls_not_offered() -> None:
    """
    With TLS required and no STARTTLS offered, the session fails before
    any MAIL, and says QUIT.
    """
    wire, _, opened = open_session(policy=SessionPolicy(tls=TLSPolicy(starttls=StartTLS.REQUIRE)))
    assert wire.sent() == b"QUIT\r\n"
    wire.reply(b"221 bye\r\n")
    error = failure_of(opened)
    assert "does not offer STARTTLS" in str(error)


def test_required_tls_refused() -> None:
    """
    With TLS required, a refused STARTTLS fails the session.
    """
    wire, _, opened = open_session(
        b"250-target.test\r\n250 STARTTLS\r\n",
        policy=SessionPolicy(tls=TLSPolicy(starttls=StartTLS.REQUIRE)),
    )
    assert wire.sent() == b"STARTTLS\r\n"
    wire.reply(b"454 4.7.0 not now\r\n")
    assert wire.sent() == b"QUIT\r\n"
    wire.lose(Failure(ConnectionDone()))
    assert "454 4.7.0 not now" in str(failure_of(opened))


def _tls_session(policy: SessionPolicy, after_tls: bytes) -> tuple[Wire, Deferred[None]]:
    wire, _, opened = open_session(b"250-target.test\r\n250 STARTTLS\r\n", policy=policy)
    assert wire.sent() == b"STARTTLS\r\n"
    wire.reply(b"220 go\r\n")
    wire.protocol.handshakeCompleted()
    assert wire.sent() == b"EHLO gw.test\r\n"
    wire.reply(after_tls)
    return wire, opened


def test_auth_plain() -> None:
    """
    AUTH PLAIN sends the user name and password with an empty authorization
    identity, in one line.
    """
    policy = SessionPolicy(credentials=Credentials("user", "pässword"))
    wire, opened = _tls_session(policy, b"250-t\r\n250 AUTH LOGIN PLAIN\r\n")
    expected = base64.b64encode("\0user\0pässword".encode())
    assert wire.sent() == b"AUTH PLAIN " + expected + b"\r\n"
    wire.reply(b"235 2.7.0 ok\r\n")
    result_of(opened)


def test_auth_login() -> None:
    """
    AUTH LOGIN answers the two challenges with the user name, then the
    password.
    """
    policy = SessionPolicy(credentials=Credentials("user", "secret"))
    wire, opened = _tls_session(policy, b"250-t\r\n250 AUTH LOGIN\r\n")
    assert wire.sent() == b"AUTH LOGIN\r\n"
    wire.reply(b"334 VXNlcm5hbWU6\r\n")
    assert wire.sent() == base64.b64encode(b"user") + b"\r\n"
    wire.reply(b"334 UGFzc3dvcmQ6\r\n")
    assert wire.sent() == base64.b64encode(b"secret") + b"\r\n"
    wire.reply(b"235 ok\r\n")
    result_of(opened)


def test_auth_refused_keeps_the_password_out_of_the_reason() -> None:
    """
    A refused AUTH fails the session with the server's reply, never the
    credentials.
    """
    policy = SessionPolicy(credentials=Credentials("user", "secret"))
    wire, opened = _tls_session(policy, b"250-t\r\n250 AUTH PLAIN\r\n")
    wire.sent()
    wire.reply(b"535 5.7.8 bad credentials\r\n")
    assert wire.sent() == b"QUIT\r\n"
    wire.reply(b"221 bye\r\n")
    error = failure_of(opened)
    assert "535 5.7.8 bad credentials" in str(error)
    assert "secret" not in str(error)
    assert base64.b64encode(b"\0user\0secret").decode() not in str(error)


def test_no_auth_in_clear() -> None:
    """
    Credentials are not sent over a connection without TLS unless allowed.
    """
    policy = SessionPolicy(
        tls=TLSPolicy(starttls=StartTLS.NEVER), credentials=Credentials("user", "secret")
    )
    wire, _, opened = open_session(b"250-t\r\n250 AUTH PLAIN\r\n", policy=policy)
    assert wire.sent() == b"QUIT\r\n"
    wire.reply(b"221 bye\r\n")
    assert "without TLS" in str(failure_of(opened))


def test_auth_in_clear_when_allowed() -> None:
    """
    C{allow_auth_in_clear} lets the credentials go without TLS.
    """
    policy = SessionPolicy(
        tls=TLSPolicy(starttls=StartTLS.NEVER),
        credentials=Credentials("user", "secret"),
        allow_auth_in_clear=True,
    )
    wire, _, opened = open_session(b"250-t\r\n250 AUTH PLAIN\r\n", policy=policy)
    assert wire.sent().startswith(b"AUTH PLAIN ")
    wire.reply(b"235 ok\r\n")
    result_of(opened)


def test_auth_without_a_known_mechanism() -> None:
    """
    A server offering neither PLAIN nor LOGIN fails the session.
    """
    policy = SessionPolicy(credentials=Credentials("user", "secret"))
    wire, opened = _tls_session(policy, b"250-t\r\n250 AUTH CRAM-MD5\r\n")
    assert wire.sent() == b"QUIT\r\n"
    wire.reply(b"221 bye\r\n")
    assert "no AUTH PLAIN or LOGIN" in str(failure_of(opened))


def send(
    connection: SMTPConnection, envelope: Envelope = ENVELOPE, body: bytes = BODY
) -> Deferred[SendResult]:
    return run(connection.send(envelope, body))


def said(code_text: str, what: str) -> str:
    return f"mx.example.org:25 said: {code_text} (in reply to {what})"


def test_message_delivered_to_every_recipient() -> None:
    """
    MAIL, one RCPT per recipient, DATA, the stuffed message: every
    recipient delivered; no RSET after a completed transaction.
    """
    wire, connection = ready_session()
    sent = send(connection)
    assert wire.sent() == b"MAIL FROM:<alice@example.com>\r\n"
    wire.reply(b"250 ok\r\n")
    for recipient in ENVELOPE.recipients:
        assert wire.sent() == f"RCPT TO:<{recipient}>\r\n".encode()
        wire.reply(b"250 ok\r\n")
    assert wire.sent() == b"DATA\r\n"
    wire.reply(b"354 go\r\n")
    assert wire.sent() == encode_data(BODY)
    wire.reply(b"250 2.0.0 queued as X\r\n")
    assert result_of(sent) == SendResult(DeliveryResult(delivered=ENVELOPE.recipients))
    assert wire.sent() == b""
    assert connection.usable
    assert connection.messages_sent == 1


def test_null_sender() -> None:
    """
    The null reverse-path goes out as C{MAIL FROM:<>}.
    """
    wire, connection = ready_session()
    send(connection, Envelope("q", "l", "u", "", ("b@x.org",), Priority.NORMAL, 0.0))
    assert wire.sent() == b"MAIL FROM:<>\r\n"


@pytest.mark.parametrize(("code", "kind"), [(451, "deferred"), (550, "bounced")])
def test_mail_refused(code: int, kind: str) -> None:
    """
    A refused MAIL gives its outcome to every recipient; RSET follows.
    """
    wire, connection = ready_session()
    sent = send(connection)
    wire.sent()
    wire.reply(f"{code} no thanks\r\n".encode())
    assert wire.sent() == b"RSET\r\n"
    wire.reply(b"250 ok\r\n")
    result = result_of(sent)
    reason = said(f"{code} no thanks", "MAIL FROM")
    assert getattr(result.result, kind) == tuple((r, reason) for r in ENVELOPE.recipients)
    assert result.host_failure is None
    assert connection.usable


def test_partial_recipients() -> None:
    """
    Each recipient gets its own RCPT outcome: accepted ones are delivered
    once the message is, a 450 defers and a 550 bounces only that one.
    """
    wire, connection = ready_session()
    sent = send(connection)
    wire.sent()
    wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"550 5.1.1 no such user\r\n")
    wire.sent()
    wire.reply(b"450 4.2.1 mailbox busy\r\n")
    assert wire.sent() == b"DATA\r\n"
    wire.reply(b"354 go\r\n")
    wire.sent()
    wire.reply(b"250 ok\r\n")
    assert result_of(sent).result == DeliveryResult(
        delivered=("b@example.org",),
        deferred=(("d@example.org", said("450 4.2.1 mailbox busy", "RCPT TO")),),
        bounced=(("c@example.org", said("550 5.1.1 no such user", "RCPT TO")),),
    )


def test_no_recipient_accepted_sends_no_data() -> None:
    """
    When no recipient is accepted, there is no DATA: RSET instead.
    """
    wire, connection = ready_session()
    envelope = Envelope("q", "l", "u", "a@x.org", ("b@x.org",), Priority.NORMAL, 0.0)
    sent = send(connection, envelope)
    wire.sent()
    wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"550 no\r\n")
    assert wire.sent() == b"RSET\r\n"
    wire.reply(b"250 ok\r\n")
    assert result_of(sent).result.bounced == (("b@x.org", said("550 no", "RCPT TO")),)


@pytest.mark.parametrize(("code", "kind"), [(451, "deferred"), (554, "bounced")])
def test_data_refused(code: int, kind: str) -> None:
    """
    A refused DATA gives its outcome to the accepted recipients.
    """
    wire, connection = ready_session()
    envelope = Envelope("q", "l", "u", "a@x.org", ("b@x.org", "c@x.org"), Priority.NORMAL, 0.0)
    sent = send(connection, envelope)
    wire.sent()
    wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"550 no\r\n")
    wire.sent()
    wire.reply(f"{code} not now\r\n".encode())
    assert wire.sent() == b"RSET\r\n"
    wire.reply(b"250 ok\r\n")
    result = result_of(sent).result
    assert ("c@x.org", said("550 no", "RCPT TO")) in result.bounced
    outcome = ("b@x.org", said(f"{code} not now", "DATA"))
    assert outcome in getattr(result, kind)


@pytest.mark.parametrize(("code", "kind"), [(452, "deferred"), (552, "bounced")])
def test_final_dot_refused(code: int, kind: str) -> None:
    """
    A refusal after the final dot gives its outcome to the accepted
    recipients.
    """
    wire, connection = ready_session()
    envelope = Envelope("q", "l", "u", "a@x.org", ("b@x.org",), Priority.NORMAL, 0.0)
    sent = send(connection, envelope)
    for _ in range(2):
        wire.sent()
        wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"354 go\r\n")
    wire.sent()
    wire.reply(f"{code} too much\r\n".encode())
    result = result_of(sent).result
    assert getattr(result, kind) == (("b@x.org", said(f"{code} too much", "end of data")),)


def test_pipelined_transaction_is_one_write() -> None:
    """
    With PIPELINING offered, MAIL, every RCPT and DATA go in one write,
    and the message only after C{354}.
    """
    wire, connection = ready_session(b"250-t\r\n250 PIPELINING\r\n")
    sent = send(connection)
    assert wire.transport.io.getvalue().count(b"\r\n") == 5
    assert wire.sent() == (
        b"MAIL FROM:<alice@example.com>\r\n"
        b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nRCPT TO:<d@example.org>\r\n"
        b"DATA\r\n"
    )
    wire.reply(b"250 ok\r\n250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n")
    assert wire.sent() == encode_data(BODY)
    wire.reply(b"250 ok\r\n")
    result = result_of(sent).result
    assert result.delivered == ("b@example.org", "d@example.org")
    assert [r for r, _ in result.bounced] == ["c@example.org"]


def test_pipelined_mail_refused() -> None:
    """
    Pipelined, a refused MAIL settles everyone; the RCPT and DATA errors
    that follow are not taken as recipient outcomes.
    """
    wire, connection = ready_session(b"250-t\r\n250 PIPELINING\r\n")
    sent = send(connection)
    wire.sent()
    wire.reply(b"451 later\r\n503 no sender\r\n503 no sender\r\n503 no sender\r\n503 no\r\n")
    assert wire.sent() == b"RSET\r\n"
    wire.reply(b"250 ok\r\n")
    reason = said("451 later", "MAIL FROM")
    assert result_of(sent).result.deferred == tuple((r, reason) for r in ENVELOPE.recipients)


def test_pipelined_data_accepted_without_recipients_gets_an_empty_message() -> None:
    """
    A server that accepts a pipelined DATA after refusing every recipient
    gets a lone dot, never the message (RFC 2920 section 3.1).
    """
    wire, connection = ready_session(b"250-t\r\n250 PIPELINING\r\n")
    envelope = Envelope("q", "l", "u", "a@x.org", ("b@x.org",), Priority.NORMAL, 0.0)
    sent = send(connection, envelope)
    wire.sent()
    wire.reply(b"250 ok\r\n550 no\r\n354 go\r\n")
    assert wire.sent() == b".\r\n"
    wire.reply(b"554 no valid recipients\r\n")
    assert wire.sent() == b"RSET\r\n"
    wire.reply(b"250 ok\r\n")
    assert result_of(sent).result.bounced == (("b@x.org", said("550 no", "RCPT TO")),)


def test_pipelining_off_by_setting() -> None:
    """
    With pipelining turned off, commands go one at a time even when the
    server offers it.
    """
    wire, connection = ready_session(
        b"250-t\r\n250 PIPELINING\r\n", ClientSettings(helo_name="gw.test", pipelining=False)
    )
    send(connection)
    assert wire.sent() == b"MAIL FROM:<alice@example.com>\r\n"


def test_421_mid_transaction_defers_the_rest() -> None:
    """
    A C{421} to a RCPT defers that recipient and the ones not yet answered,
    as a host failure that another host may retry for them; the connection
    is done.
    """
    wire, connection = ready_session()
    sent = send(connection)
    wire.sent()
    wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"550 no\r\n")
    wire.sent()
    wire.reply(b"421 4.3.2 shutting down\r\n")
    result = result_of(sent)
    assert result.result.bounced == (("b@example.org", said("550 no", "RCPT TO")),)
    assert [r for r, _ in result.result.deferred] == ["c@example.org", "d@example.org"]
    assert all("421 4.3.2 shutting down" in reason for _, reason in result.result.deferred)
    assert result.host_failure is not None
    assert result.retryable == ("c@example.org", "d@example.org")
    assert not connection.usable


def test_connection_lost_mid_data() -> None:
    """
    A peer that vanishes after the message was sent defers the accepted
    recipients with the reason, as a host failure.
    """
    wire, connection = ready_session()
    envelope = Envelope("q", "l", "u", "a@x.org", ("b@x.org", "c@x.org"), Priority.NORMAL, 0.0)
    sent = send(connection, envelope)
    wire.sent()
    wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"550 no\r\n")
    wire.sent()
    wire.reply(b"354 go\r\n")
    wire.lose()
    result = result_of(sent)
    assert result.result.deferred == (("b@x.org", LOST),)
    assert result.result.bounced == (("c@x.org", said("550 no", "RCPT TO")),)
    assert result.host_failure == LOST
    assert result.retryable == ("b@x.org",)
    assert not connection.usable


def test_data_phase_deadline() -> None:
    """
    No reply to the final dot within C{data_done} defers the message and
    aborts the connection.
    """
    wire, connection = ready_session()
    envelope = Envelope("q", "l", "u", "a@x.org", ("b@x.org",), Priority.NORMAL, 0.0)
    sent = send(connection, envelope)
    for _ in range(2):
        wire.sent()
        wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"354 go\r\n")
    wire.clock.advance(TIMEOUTS.data_done - 1)
    assert pending(sent)
    wire.clock.advance(1)
    result = result_of(sent)
    assert result.result.deferred == (
        (
            "b@x.org",
            f"timed out after {TIMEOUTS.data_done:g} s waiting for the reply to end of data",
        ),
    )


def test_two_messages_on_one_connection() -> None:
    """
    A second message follows the first on the same session.
    """
    wire, connection = ready_session(b"250-t\r\n250 PIPELINING\r\n")
    envelope = Envelope("q", "l", "u", "a@x.org", ("b@x.org",), Priority.NORMAL, 0.0)
    for number in range(2):
        sent = send(connection, envelope, b"m%d\r\n" % number)
        wire.sent()
        wire.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        assert wire.sent() == b"m%d\r\n.\r\n" % number
        wire.reply(b"250 ok\r\n")
        assert result_of(sent).result.delivered == ("b@x.org",)
    assert connection.messages_sent == 2


def test_reused_connection_found_gone_is_stale() -> None:
    """
    A reused connection that turns out closed before any reply to the new
    transaction raises L{StaleConnection}: the message was not seen.
    """
    wire, connection = ready_session()
    envelope = Envelope("q", "l", "u", "a@x.org", ("b@x.org",), Priority.NORMAL, 0.0)
    first = send(connection, envelope)
    wire.sent()
    wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"354 go\r\n")
    wire.sent()
    wire.reply(b"250 ok\r\n")
    result_of(first)
    second = send(connection, envelope)
    wire.lose()
    assert isinstance(failure_of(second), StaleConnection)


def test_first_message_on_a_connection_is_never_stale() -> None:
    """
    On a fresh connection, a loss before MAIL's reply is a host failure.
    """
    wire, connection = ready_session()
    sent = send(connection)
    wire.lose()
    assert result_of(sent).host_failure == LOST


def test_size_limit_bounces_without_sending() -> None:
    """
    A message larger than the server's SIZE bounces at once; a message of
    exactly that size is offered with its SIZE.
    """
    wire, connection = ready_session(b"250-t\r\n250 SIZE %d\r\n" % len(BODY))
    sent = send(connection, body=BODY + b"x")
    assert wire.sent() == b""
    assert all("larger than" in reason for _, reason in result_of(sent).result.bounced)
    send(connection)
    assert wire.sent() == b"MAIL FROM:<alice@example.com> SIZE=%d\r\n" % len(BODY)


def test_eight_bit_body_is_declared() -> None:
    """
    A body with 8-bit bytes goes with BODY=8BITMIME when it is offered.
    """
    wire, connection = ready_session()
    send(connection, body="Subject: é\r\n\r\n".encode())
    assert wire.sent() == b"MAIL FROM:<alice@example.com> BODY=8BITMIME\r\n"


def test_utf8_address_needs_smtputf8() -> None:
    """
    A non-ASCII recipient bounces when the server lacks SMTPUTF8; the others
    are sent.
    """
    wire, connection = ready_session()
    envelope = Envelope("q", "l", "u", "a@x.org", ("b@x.org", "ü@x.org"), Priority.NORMAL, 0.0)
    sent = send(connection, envelope)
    assert wire.sent() == b"MAIL FROM:<a@x.org>\r\n"
    wire.reply(b"250 ok\r\n")
    assert wire.sent() == b"RCPT TO:<b@x.org>\r\n"
    wire.reply(b"550 no\r\n")
    wire.sent()
    wire.reply(b"250 ok\r\n")
    assert [r for r, _ in result_of(sent).result.bounced] == ["b@x.org", "ü@x.org"]


def test_utf8_address_with_smtputf8() -> None:
    """
    With SMTPUTF8 offered, a non-ASCII address goes out in UTF-8 and MAIL
    says SMTPUTF8.
    """
    wire, connection = ready_session(b"250-t\r\n250 SMTPUTF8\r\n")
    envelope = Envelope("q", "l", "u", "a@x.org", ("ü@x.org",), Priority.NORMAL, 0.0)
    send(connection, envelope)
    assert wire.sent() == b"MAIL FROM:<a@x.org> SMTPUTF8\r\n"
    wire.reply(b"250 ok\r\n")
    assert wire.sent() == "RCPT TO:<ü@x.org>\r\n".encode()


@pytest.mark.parametrize("address", ["b@x.org>\r\nRSET", "b@x.org\nDATA", "<b@x.org>", ""])
def test_address_that_would_inject_is_bounced(address: str) -> None:
    """
    An address with a line end or angle brackets never reaches the wire.
    """
    wire, connection = ready_session()
    envelope = Envelope("q", "l", "u", "a@x.org", (address,), Priority.NORMAL, 0.0)
    sent = send(connection, envelope)
    assert wire.sent() == b""
    assert result_of(sent).result.bounced == ((address, "invalid recipient address"),)


def test_sender_that_would_inject_bounces_everyone() -> None:
    """
    A sender with a line end bounces the message; nothing is sent.
    """
    wire, connection = ready_session()
    envelope = Envelope("q", "l", "u", "a@x.org\r\nRSET", ("b@x.org",), Priority.NORMAL, 0.0)
    sent = send(connection, envelope)
    assert wire.sent() == b""
    assert result_of(sent).result.bounced == (("b@x.org", "invalid sender address"),)


def test_quit_once() -> None:
    """
    QUIT is said once, and the connection closed.
    """
    wire, connection = ready_session()
    quitting = run(connection.quit())
    again = run(connection.quit())
    assert wire.sent() == b"QUIT\r\n"
    result_of(again)
    wire.reply(b"221 bye\r\n")
    result_of(quitting)
    assert wire.transport.disconnecting
    assert not connection.usable


def test_quit_deadline() -> None:
    """
    A server that does not answer QUIT is closed after the quit timeout.
    """
    wire, connection = ready_session()
    quitting = run(connection.quit())
    wire.clock.advance(TIMEOUTS.quit)
    result_of(quitting)
    assert wire.clock.getDelayedCalls() == []


def test_verified_tls_policy_makes_client_options() -> None:
    """
    A verifying policy builds options that check the host name; the
    opportunistic one accepts any certificate.
    """
    verified = TLSPolicy(verify=True, hostname="smarthost.example").client_creator("10.0.0.1")
    assert verified._hostname == "smarthost.example"
    assert TLSPolicy().client_creator("x").verify is False


@pytest.mark.parametrize(
    ("length", "cut"), [(MAX_REASON_TEXT, False), (MAX_REASON_TEXT + 1, True)]
)
def test_long_reply_text_is_cut_in_reasons(length: int, cut: bool) -> None:
    """
    A reason keeps L{MAX_REASON_TEXT} characters of the reply; more are cut.
    """
    wire, connection = ready_session()
    sent = send(connection)
    wire.sent()
    text = "x" * (length - 4)
    wire.reply(f"550 {text}\r\n".encode())
    assert wire.sent() == b"RSET\r\n"
    wire.reply(b"250 ok\r\n")
    reason = result_of(sent).result.bounced[0][1]
    assert reason.endswith(("..." if cut else "x") + " (in reply to MAIL FROM)")
    assert (text in reason) is not cut


@pytest.mark.parametrize("name", ["", "a b", "bad\r\nname", "a..b"])
def test_helo_name_that_cannot_be_said(name: str) -> None:
    """
    A HELO name that is empty, has spaces or line ends, or is not a valid
    name, is refused when the settings are made.
    """
    with pytest.raises(ValueError, match="EHLO"):
        ClientSettings(helo_name=name)


def test_same_policy_shares_its_tls_options() -> None:
    """
    One TLS client object serves every connection of a policy and host.
    """
    policy = TLSPolicy(verify=True)
    assert policy.client_creator("a.example") is TLSPolicy(verify=True).client_creator("a.example")
    assert policy.client_creator("a.example") is not policy.client_creator("b.example")


def test_ehlo_temporary_failure() -> None:
    """
    A C{421} to EHLO fails the session, naming EHLO.
    """
    wire, _, opened = open_session(b"421 4.3.2 busy\r\n")
    wire.lose(Failure(ConnectionDone()))
    assert "421 4.3.2 busy (in reply to EHLO)" in str(failure_of(opened))


def test_421_after_the_final_dot_is_a_host_failure() -> None:
    """
    A C{421} instead of the reply to the final dot leaves the accepted
    recipients to another host.
    """
    wire, connection = ready_session()
    envelope = Envelope("q", "l", "u", "a@x.org", ("b@x.org",), Priority.NORMAL, 0.0)
    sent = send(connection, envelope)
    for _ in range(2):
        wire.sent()
        wire.reply(b"250 ok\r\n")
    wire.sent()
    wire.reply(b"354 go\r\n")
    wire.sent()
    wire.reply(b"421 4.3.2 going down\r\n")
    result = result_of(sent)
    assert result.retryable == ("b@x.org",)
    assert "421 4.3.2 going down" in (result.host_failure or "")
