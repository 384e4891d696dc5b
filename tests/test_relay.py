"""
L{smtpgw.relay}: the smarthost URL parser, and the connection pool and
L{SmarthostOutbound} sending over loopback to a real Twisted ESMTP server
(L{tests.relay_target}) in each role: accepting, deferring, refusing,
refusing one recipient of three, dropping the connection in the middle of
the message, failing or faking TLS, requiring AUTH; and connection reuse,
limits and idle closing counted on the server's side.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import quote

import pytest
from attrs import Factory, define
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.ssl import trustRootFromCertificates
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from zope.interface.verify import verifyObject

from smtpgw.interfaces import DeliveryResult, IOutbound
from smtpgw.model import Envelope, Priority
from smtpgw.relay import (
    DEFAULT_PORT,
    ConnectionPool,
    RelayURL,
    RelayURLError,
    SmarthostOutbound,
    parse_relay_url,
)
from smtpgw.smtpclient import (
    ClientSettings,
    ClientTimeouts,
    Credentials,
    SessionPolicy,
    SMTPClientFactory,
    SMTPClientProtocol,
    SMTPConnection,
    StartTLS,
    TLSFallback,
    TLSPolicy,
)
from tests.relay_target import OpenCounter, RelayTarget, Script, make_tls, running_target
from tests.twisted_support import async_test

P = ParamSpec("P")
T = TypeVar("T")

SETTINGS = ClientSettings(helo_name="gw.test")
BODY = b"From: alice@example.com\r\nSubject: hello\r\n\r\nHello.\r\n"
TLS = make_tls()


def envelope(*recipients: str, queue_id: str = "0000000000000001") -> Envelope:
    return Envelope(
        queue_id=queue_id,
        list="news",
        username="alice",
        sender="alice@example.com",
        recipients=recipients or ("bob@example.org",),
        priority=Priority.NORMAL,
        accepted_at=0.0,
    )


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def make_pool(**kwargs: Any) -> ConnectionPool:
    kwargs.setdefault("settings", SETTINGS)
    return ConnectionPool(reactor(), **kwargs)


async def send_one(
    target: RelayTarget,
    body: bytes = BODY,
    recipients: tuple[str, ...] = ("bob@example.org",),
    policy: SessionPolicy | None = None,
    **pool_options: Any,
) -> tuple[DeliveryResult, ConnectionPool]:
    pool = make_pool(**pool_options)
    try:
        sent = await pool.send("127.0.0.1", target.port, envelope(*recipients), body, policy)
    finally:
        await pool.close()
    return sent.result, pool


# -- the URL


def test_url_host_only() -> None:
    """
    A host alone means port 25, opportunistic STARTTLS, no AUTH.
    """
    assert parse_relay_url("smtp://Mail.Example.COM") == RelayURL(host="mail.example.com")
    assert parse_relay_url("smtp://mail.example.com/").port == DEFAULT_PORT


def test_url_everything() -> None:
    """
    Credentials are percent-decoded; the port and options are read.
    """
    url = parse_relay_url(
        "smtp://us%40er:p%40ss%3Aw%2Fo%25rd@relay.example.com:587"
        "?starttls=require&verify=no&auth_in_clear=yes"
    )
    assert url == RelayURL(
        host="relay.example.com",
        port=587,
        username="us@er",
        password="p@ss:w/o%rd",
        starttls=StartTLS.REQUIRE,
        tls_verify=False,
        auth_in_clear=True,
    )
    assert "p@ss" not in repr(url)


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("smtp://[2001:db8::1]:2525", "2001:db8::1", 2525),
        ("smtp://[::1]", "::1", 25),
        ("smtp://127.0.0.1:1", "127.0.0.1", 1),
        ("smtp://host:65535", "host", 65535),
        ("smtp://u:p@[::1]:26", "::1", 26),
    ],
)
def test_url_hosts_and_ports(url: str, host: str, port: int) -> None:
    """
    IPv6 addresses in brackets, IPv4 addresses, the lowest and highest ports.
    """
    parsed = parse_relay_url(url)
    assert (parsed.host, parsed.port) == (host, port)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mail.example.com:25", "starts with smtp://"),
        ("smtps://mail.example.com", "starts with smtp://"),
        ("http://mail.example.com", "starts with smtp://"),
        ("smtp://", "needs a host"),
        ("smtp://:25", "needs a host"),
        ("smtp://host:0", "not a port number"),
        ("smtp://host:65536", "not a port number"),
        ("smtp://host:x25", "not a port number"),
        ("smtp://host:", "not a port number"),
        ("smtp://user@host", "need a user name and a password"),
        ("smtp://user:@host", "need a user name and a password"),
        ("smtp://:secret@host", "need a user name and a password"),
        ("smtp://host/path", "no path"),
        ("smtp://host#frag", "no path"),
        ("smtp://host?starttls=maybe", "opportunistic or require"),
        ("smtp://host?verify=perhaps", "yes or no"),
        ("smtp://host?tls=1", "unknown option 'tls'"),
        ("smtp://host?starttls=require&starttls=require", "given twice"),
        ("smtp://host?starttls", "name=value"),
        ("smtp://[::1", "malformed"),
        ("smtp://[mail.example.com]:25", "malformed"),
        ("smtp://u:p@[mail.example.com]x", "malformed"),
        ("smtp://[::1]x", "after the IPv6 address"),
        ("smtp://bad_host!:25", "not a valid host name"),
        ("smtp://a..b", "not a valid host name"),
    ],
)
def test_url_errors(url: str, problem: str) -> None:
    """
    Each problem is named.
    """
    with pytest.raises(RelayURLError, match=problem):
        parse_relay_url(url)


def test_url_error_never_shows_the_password() -> None:
    """
    A password with an unencoded C{/} breaks the URL; the error does not
    repeat it.
    """
    with pytest.raises(RelayURLError) as raised:
        parse_relay_url("smtp://user:Sup3r/Secret@host:25")
    assert "Secret" not in str(raised.value)
    assert "Sup3r" not in str(raised.value)


_TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=30)


@given(_TEXT, _TEXT, st.integers(1, 65535))
def test_url_credentials_round_trip(username: str, password: str, port: int) -> None:
    """
    Any user name and password, percent-encoded, come back as they were.
    """
    url = f"smtp://{quote(username, safe='')}:{quote(password, safe='')}@host.example:{port}"
    parsed = parse_relay_url(url)
    assert (parsed.username, parsed.password, parsed.port) == (username, password, port)


@given(_TEXT, st.text(max_size=30))
def test_url_errors_never_show_the_password(password: str, tail: str) -> None:
    """
    Whatever follows the host, a failing URL's error does not contain the
    password.
    """
    secret = "Zq9" + password
    url = f"smtp://user:{quote(secret, safe='')}@host.example{tail}"
    message = ""
    try:
        parse_relay_url(url)
    except RelayURLError as error:
        message = str(error)
    assert secret not in message
    assert quote(secret, safe="") not in message


# -- SmarthostOutbound construction


def test_smarthost_provides_ioutbound() -> None:
    """
    L{SmarthostOutbound} implements L{IOutbound}.
    """
    assert verifyObject(IOutbound, SmarthostOutbound(reactor(), "127.0.0.1", 25))


def test_smarthost_from_url() -> None:
    """
    The URL's credentials and TLS settings make the session policy; with
    TLS required, the certificate is verified unless C{verify=no}.
    """
    outbound = SmarthostOutbound.from_url(
        reactor(), "smtp://u:p%40w@relay.example.com:587?starttls=require"
    )
    assert (outbound.host, outbound.port) == ("relay.example.com", 587)
    assert outbound.policy.credentials == Credentials("u", "p@w")
    assert outbound.policy.tls.starttls is StartTLS.REQUIRE
    assert outbound.policy.tls.verify
    relaxed = SmarthostOutbound.from_url(reactor(), "smtp://h?starttls=require&verify=no")
    assert not relaxed.policy.tls.verify
    assert not SmarthostOutbound.from_url(reactor(), "smtp://h").policy.tls.verify


def test_smarthost_needs_both_credentials() -> None:
    """
    A user name without a password is refused.
    """
    with pytest.raises(ValueError, match="both"):
        SmarthostOutbound(reactor(), "h", username="u")


@pytest.mark.parametrize(
    "option", ["max_connections", "max_per_destination", "max_messages_per_connection"]
)
def test_pool_limits_are_at_least_one(option: str) -> None:
    """
    A limit of 0 is refused; 1 is taken.
    """
    at_limit: dict[str, Any] = {option: 1}
    ConnectionPool(reactor(), **at_limit)
    past_limit: dict[str, Any] = {option: 0}
    with pytest.raises(ValueError, match=option):
        ConnectionPool(reactor(), **past_limit)


@async_test
async def test_smarthost_not_running_defers() -> None:
    """
    Before C{startService}, a delivery is deferred, not attempted.
    """
    outbound = SmarthostOutbound(reactor(), "127.0.0.1", 9)
    result = await outbound.deliver(envelope(), BODY)
    assert result.deferred == (("bob@example.org", "the smarthost relay is not running"),)


# -- the server's roles


@async_test
async def test_accepting_target() -> None:
    """
    An accepting server gets the message byte for byte, with the envelope.
    """
    async with running_target() as target:
        outbound = SmarthostOutbound(reactor(), "127.0.0.1", target.port, settings=SETTINGS)
        outbound.startService()
        try:
            result = await outbound.deliver(envelope("b@x.org", "c@x.org"), BODY)
        finally:
            await outbound.stopService()
    assert result == DeliveryResult(delivered=("b@x.org", "c@x.org"))
    [received] = target.received
    assert (received.sender, received.recipients, received.data) == (
        "alice@example.com",
        ["b@x.org", "c@x.org"],
        BODY,
    )


@async_test
async def test_deferring_at_mail() -> None:
    """
    A C{451} to MAIL defers every recipient with the server's reply.
    """
    async with running_target(Script(mail_reply=(451, "4.3.0 try later"))) as target:
        result, _ = await send_one(target, recipients=("b@x.org", "c@x.org"))
    assert [r for r, _ in result.deferred] == ["b@x.org", "c@x.org"]
    assert all("451 4.3.0 try later" in reason for _, reason in result.deferred)
    assert target.received == []


@async_test
async def test_deferring_at_rcpt() -> None:
    """
    A C{450} to one RCPT defers that recipient only.
    """
    script = Script(rcpt_replies={"c@x.org": (450, "4.2.1 mailbox busy")})
    async with running_target(script) as target:
        result, _ = await send_one(target, recipients=("b@x.org", "c@x.org"))
    assert result.delivered == ("b@x.org",)
    assert [r for r, _ in result.deferred] == ["c@x.org"]
    assert "450 4.2.1 mailbox busy" in result.deferred[0][1]
    assert [m.recipients for m in target.received] == [["b@x.org"]]


@async_test
async def test_deferring_at_end_of_data() -> None:
    """
    A C{452} after the final dot defers every accepted recipient.
    """
    async with running_target(Script(eom_reply=(452, "4.3.1 disk full"))) as target:
        result, _ = await send_one(target, recipients=("b@x.org", "c@x.org"))
    assert [r for r, _ in result.deferred] == ["b@x.org", "c@x.org"]
    assert all("452 4.3.1 disk full" in reason for _, reason in result.deferred)
    assert target.received == []


@async_test
async def test_refusing_with_5xx() -> None:
    """
    A C{550} to MAIL bounces every recipient with the server's reply.
    """
    async with running_target(Script(mail_reply=(550, "5.7.1 not from you"))) as target:
        result, _ = await send_one(target, recipients=("b@x.org", "c@x.org"))
    assert [r for r, _ in result.bounced] == ["b@x.org", "c@x.org"]
    assert all("550 5.7.1 not from you" in reason for _, reason in result.bounced)


@async_test
async def test_refusing_data_with_5xx() -> None:
    """
    A C{554} to DATA bounces the accepted recipients.
    """
    async with running_target(Script(data_reply=(554, "5.3.0 no data today"))) as target:
        result, _ = await send_one(target)
    assert [r for r, _ in result.bounced] == ["bob@example.org"]
    assert "554 5.3.0 no data today" in result.bounced[0][1]


@pytest.mark.parametrize("pipelining", [False, True])
@async_test
async def test_one_recipient_of_three_refused(pipelining: bool) -> None:
    """
    Two recipients delivered (one message, both recipients), one bounced.
    """
    script = Script(rcpt_replies={"c@x.org": (550, "5.1.1 no such user")}, pipelining=pipelining)
    async with running_target(script) as target:
        result, _ = await send_one(target, recipients=("b@x.org", "c@x.org", "d@x.org"))
    assert result.delivered == ("b@x.org", "d@x.org")
    assert [r for r, _ in result.bounced] == ["c@x.org"]
    assert "550 5.1.1 no such user" in result.bounced[0][1]
    assert result.deferred == ()
    [received] = target.received
    assert received.recipients == ["b@x.org", "d@x.org"]


@async_test
async def test_connection_dropped_mid_data() -> None:
    """
    A server that drops the connection in the middle of the message leaves
    every recipient deferred (temporary), with the reason; nothing hangs.
    """
    body = b"Subject: long\r\n\r\n" + b"line\r\n" * 100
    async with running_target(Script(drop_after_data_lines=10)) as target:
        pool = make_pool()
        sent = await pool.send("127.0.0.1", target.port, envelope("b@x.org"), body)
        await pool.close()
    assert [r for r, _ in sent.result.deferred] == ["b@x.org"]
    assert sent.host_failure is not None
    assert sent.retryable == ("b@x.org",)
    assert target.received == []


@async_test
async def test_connection_refused() -> None:
    """
    Nothing listening: deferred, the reason says the connection failed.
    """
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    pool = make_pool()
    sent = await pool.send("127.0.0.1", port, envelope("b@x.org"), BODY)
    await pool.close()
    assert sent.result.deferred[0][0] == "b@x.org"
    assert "cannot connect to 127.0.0.1:" in sent.result.deferred[0][1]
    assert sent.host_failure == sent.result.deferred[0][1]


@async_test
async def test_silent_server_times_out() -> None:
    """
    A server that never greets is given up on after the greeting timeout.
    """
    settings = ClientSettings(helo_name="gw.test", timeouts=ClientTimeouts(greeting=0.2))
    async with running_target(Script(greeting=None)) as target:
        result, _ = await send_one(target, settings=settings)
    assert "timed out after 0.2 s waiting for the reply to greeting" in result.deferred[0][1]


@async_test
async def test_refused_greeting_defers() -> None:
    """
    A C{554} greeting defers (another host or a later try may work).
    """
    async with running_target(Script(greeting=(554, "5.3.2 not today"))) as target:
        result, _ = await send_one(target)
    assert "554 5.3.2 not today" in result.deferred[0][1]
    assert target.mail_commands == 0


def _dot_message() -> bytes:
    """
    A message with a C{.} line starting at every 16 KiB offset (where
    Twisted's C{FileSender} cuts its chunks), a leading dot, a lone C{.}
    line and a C{..} line.
    """
    chunk = 16 * 1024
    parts = [b".leading dot\r\n", b".\r\n", b"..\r\n", b"Subject: dots\r\n\r\n"]
    size = sum(map(len, parts))
    while size < 5 * chunk:
        boundary = (size // chunk + 1) * chunk
        gap = boundary - size
        if gap < 3:
            parts.append(b"x" * gap + b"\r\n")
            size += gap + 2
            continue
        parts.append(b"y" * (gap - 2) + b"\r\n")
        parts.append(b".\r\n" if size // chunk % 2 else b".x\r\n")
        size = boundary + len(parts[-1])
    message = b"".join(parts)
    for k in range(1, 5):
        assert message[k * chunk : k * chunk + 1] == b"."
    return message


@pytest.mark.parametrize("pipelining", [False, True])
@async_test
async def test_dot_lines_at_chunk_boundaries_arrive_intact(pipelining: bool) -> None:
    """
    The regression test for Twisted's C{transformChunk}: C{.} lines at every
    16 KiB boundary, a leading C{.}, a lone C{.} and C{..} arrive byte for
    byte, as one message.
    """
    message = _dot_message()
    async with running_target(Script(pipelining=pipelining)) as target:
        result, _ = await send_one(target, body=message)
    assert result.delivered == ("bob@example.org",)
    assert len(target.received) == 1
    assert target.received[0].data == message
    assert target.mail_commands == 1


# -- TLS and AUTH


async def connection_to(target: RelayTarget, policy: SessionPolicy) -> SMTPConnection:
    endpoint = TCP4ClientEndpoint(reactor(), "127.0.0.1", target.port)
    protocol = await endpoint.connect(SMTPClientFactory(reactor(), 10))
    assert isinstance(protocol, SMTPClientProtocol)
    connection = SMTPConnection(protocol, "127.0.0.1", target.port, policy, SETTINGS)
    await connection.open()
    return connection


@async_test
async def test_opportunistic_tls_used_when_offered() -> None:
    """
    Offered STARTTLS is used; the message travels inside TLS.
    """
    async with running_target(Script(tls=TLS)) as target:
        result, _ = await send_one(target)
    assert result.delivered == ("bob@example.org",)
    assert target.received[0].over_tls


@async_test
async def test_bytes_after_starttls_220_are_discarded() -> None:
    """
    A hostile server sends C{220 ready} and C{250 fake} in one write: the
    fake reply is thrown away, the EHLO inside TLS gets the real reply, and
    the message goes through in step.
    """
    async with running_target(Script(tls=TLS, starttls="hostile")) as target:
        connection = await connection_to(target, SessionPolicy())
        assert connection.tls_active
        assert connection.discarded_after_starttls == len(b"250 fake\r\n")
        assert "AUTH" not in connection.extensions
        sent = await connection.send(envelope("b@x.org"), BODY)
        await connection.quit()
        await target.all_closed()
    assert sent.result.delivered == ("b@x.org",)
    assert target.received[0].over_tls
    assert target.received[0].data == BODY


@async_test
async def test_broken_handshake_retried_in_clear() -> None:
    """
    Opportunistic TLS with the plaintext fallback: a failed handshake is
    followed by one more connection without STARTTLS, which delivers; the
    next message goes without STARTTLS at once.
    """
    policy = SessionPolicy(tls=TLSPolicy(fallback=TLSFallback.PLAINTEXT))
    async with running_target(Script(tls=TLS, starttls="broken")) as target:
        pool = make_pool()
        first = await pool.send("127.0.0.1", target.port, envelope("b@x.org"), BODY, policy)
        await pool.send("127.0.0.1", target.port, envelope("c@x.org"), BODY, policy)
        await pool.close()
    assert first.result.delivered == ("b@x.org",)
    assert [m.over_tls for m in target.received] == [False, False]
    assert target.connections == 2


@async_test
async def test_broken_handshake_defers() -> None:
    """
    Opportunistic TLS without the fallback: a failed handshake defers, and
    nothing is sent in clear.
    """
    async with running_target(Script(tls=TLS, starttls="broken")) as target:
        result, _ = await send_one(target)
    assert "TLS handshake failed" in result.deferred[0][1]
    assert target.mail_commands == 0


@async_test
async def test_untrusted_certificate_with_tls_required() -> None:
    """
    TLS required with verification: an untrusted certificate defers
    (TLS failure) and no MAIL is sent.
    """
    policy = SessionPolicy(
        tls=TLSPolicy(starttls=StartTLS.REQUIRE, verify=True, hostname="localhost")
    )
    async with running_target(Script(tls=TLS)) as target:
        result, _ = await send_one(target, policy=policy)
    assert "TLS handshake failed" in result.deferred[0][1]
    assert target.mail_commands == 0


@async_test
async def test_wrong_name_with_tls_required() -> None:
    """
    A trusted certificate for another name fails verification.
    """
    policy = SessionPolicy(
        tls=TLSPolicy(
            starttls=StartTLS.REQUIRE,
            verify=True,
            hostname="smarthost.example",
            trust_root=trustRootFromCertificates([TLS.certificate]),
        )
    )
    async with running_target(Script(tls=TLS)) as target:
        result, _ = await send_one(target, policy=policy)
    assert "TLS handshake failed" in result.deferred[0][1]
    assert target.mail_commands == 0


@async_test
async def test_tls_required_not_offered() -> None:
    """
    TLS required and no STARTTLS offered: deferred, never sent in clear.
    """
    policy = SessionPolicy(tls=TLSPolicy(starttls=StartTLS.REQUIRE))
    async with running_target() as target:
        result, _ = await send_one(target, policy=policy)
    assert "does not offer STARTTLS" in result.deferred[0][1]
    assert target.mail_commands == 0


def _smarthost(target: RelayTarget, password: str, **kwargs: Any) -> SmarthostOutbound:
    return SmarthostOutbound(
        reactor(),
        "127.0.0.1",
        target.port,
        username="relayuser",
        password=password,
        starttls="require",
        tls_hostname="localhost",
        tls_trust_root=trustRootFromCertificates([TLS.certificate]),
        settings=SETTINGS,
        **kwargs,
    )


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@async_test
async def test_auth_to_smarthost_over_verified_tls(mechanism: str) -> None:
    """
    A smarthost with TLS required, a verified certificate and AUTH (PLAIN,
    or LOGIN when only that is offered): the message arrives over TLS from
    the authenticated user.
    """
    script = Script(tls=TLS, users={"relayuser": "s3cret pass"}, mechanisms=(mechanism,))
    async with running_target(script) as target:
        outbound = _smarthost(target, "s3cret pass")
        outbound.startService()
        result = await outbound.deliver(envelope("b@x.org"), BODY)
        await outbound.stopService()
    assert result == DeliveryResult(delivered=("b@x.org",))
    [received] = target.received
    assert received.over_tls
    assert received.authenticated_as == "relayuser"


@async_test
async def test_auth_refused_defers_without_the_password() -> None:
    """
    A wrong password defers, and the reason does not contain it.
    """
    script = Script(tls=TLS, users={"relayuser": "right"})
    async with running_target(script) as target:
        outbound = _smarthost(target, "wrongpassword")
        outbound.startService()
        result = await outbound.deliver(envelope("b@x.org"), BODY)
        await outbound.stopService()
    [(_, reason)] = result.deferred
    assert "authentication failed" in reason
    assert "wrongpassword" not in reason
    assert target.mail_commands == 0


@async_test
async def test_auth_not_sent_in_clear() -> None:
    """
    Credentials with opportunistic TLS and a server without STARTTLS: the
    message is deferred, the password never sent.
    """
    script = Script(users={"relayuser": "pw"})
    async with running_target(script) as target:
        outbound = SmarthostOutbound(
            reactor(),
            "127.0.0.1",
            target.port,
            username="relayuser",
            password="pw",
            settings=SETTINGS,
        )
        outbound.startService()
        result = await outbound.deliver(envelope("b@x.org"), BODY)
        await outbound.stopService()
    assert "without TLS" in result.deferred[0][1]
    assert target.mail_commands == 0


# -- reuse and limits


@async_test
async def test_messages_one_after_another_share_a_connection() -> None:
    """
    Five messages sent one after the other travel over one connection.
    """
    async with running_target() as target:
        pool = make_pool()
        for number in range(5):
            sent = await pool.send(
                "127.0.0.1", target.port, envelope("b@x.org"), b"m%d\r\n" % number
            )
            assert sent.result.delivered == ("b@x.org",)
        assert pool.connections_to("127.0.0.1", target.port) == 1
        await pool.close()
    assert target.connections == 1
    assert [m.data for m in target.received] == [b"m%d\r\n" % n for n in range(5)]


@async_test
async def test_messages_at_once_with_one_connection_allowed() -> None:
    """
    Five messages handed over at once with one connection per destination
    go over that one connection, in order.
    """
    async with running_target() as target:
        pool = make_pool(max_per_destination=1)
        sends = [
            pool.send("127.0.0.1", target.port, envelope("b@x.org"), b"m%d\r\n" % n)
            for n in range(5)
        ]
        await DeferredList(sends)
        await pool.close()
    assert target.connections == 1
    assert [m.data for m in target.received] == [b"m%d\r\n" % n for n in range(5)]


@async_test
async def test_connection_replaced_after_max_messages() -> None:
    """
    With two messages per connection, five messages take three connections,
    never more than two messages each.
    """
    async with running_target() as target:
        pool = make_pool(max_per_destination=1, max_messages_per_connection=2)
        sends = [
            pool.send("127.0.0.1", target.port, envelope("b@x.org"), b"m%d\r\n" % n)
            for n in range(5)
        ]
        results = await DeferredList(sends)
        await pool.close()
    assert all(ok and r.result.delivered == ("b@x.org",) for ok, r in results)
    assert target.connections == 3
    assert target.most_open == 1


@async_test
async def test_per_destination_limit() -> None:
    """
    Six messages at once with two connections per destination: exactly two
    connections open, never three, all six delivered.
    """
    async with running_target() as target:
        pool = make_pool(max_per_destination=2)
        sends = [
            pool.send("127.0.0.1", target.port, envelope("b@x.org"), b"m%d\r\n" % n)
            for n in range(6)
        ]
        assert pool.connections_to("127.0.0.1", target.port) == 2
        await DeferredList(sends)
        # The second connection may still be opening when the first has
        # sent everything: it is open all the same.
        await target.connected(2)
        await pool.close()
    assert target.most_open == 2
    assert target.connections == 2
    assert sorted(m.data for m in target.received) == [b"m%d\r\n" % n for n in range(6)]


@async_test
async def test_overall_limit_across_destinations() -> None:
    """
    With one connection in all, mail for two servers is sent one server at
    a time: the idle connection to the first is closed to make room.
    """
    group = OpenCounter()
    async with running_target(group=group) as first, running_target(group=group) as second:
        pool = make_pool(max_connections=1)
        sends = [
            pool.send("127.0.0.1", target.port, envelope("b@x.org"), b"m\r\n")
            for target in (first, second, first, second)
        ]
        assert pool.connections == 1
        results = await DeferredList(sends)
        await pool.close()
    assert all(ok and r.result.delivered == ("b@x.org",) for ok, r in results)
    assert group.most_open == 1
    assert len(first.received) == len(second.received) == 2


@async_test
async def test_overall_limit_frees_as_many_idle_connections_as_needed() -> None:
    """
    With two connections in all, both idle on a first server, two messages
    at once for a second server close both and open two there: never more
    than two open in all.
    """
    group = OpenCounter()
    async with running_target(group=group) as first, running_target(group=group) as second:
        pool = make_pool(max_connections=2)
        await DeferredList(
            [pool.send("127.0.0.1", first.port, envelope("b@x.org"), b"m\r\n") for _ in range(2)]
        )
        assert first.open == 2
        results = await DeferredList(
            [pool.send("127.0.0.1", second.port, envelope("b@x.org"), b"m\r\n") for _ in range(2)]
        )
        await second.connected(2)
        await pool.close()
    assert all(ok and r.result.delivered == ("b@x.org",) for ok, r in results)
    assert group.most_open == 2


@async_test
async def test_idle_connection_closed_after_idle_timeout() -> None:
    """
    An idle connection stays open just short of the idle timeout, is closed
    (QUIT) at it, and the next message opens a new one.
    """
    clock = Clock()
    async with running_target() as target:
        pool = make_pool(clock=clock, idle_timeout=5.0)
        await pool.send("127.0.0.1", target.port, envelope("b@x.org"), BODY)
        clock.advance(4.9)
        assert target.open == 1
        clock.advance(0.1)
        await target.all_closed()
        await until(lambda: pool.connections == 0)
        await pool.send("127.0.0.1", target.port, envelope("b@x.org"), BODY)
        await pool.close()
    assert target.connections == 2


@async_test
async def test_close_quits_and_defers_what_comes_after() -> None:
    """
    Closing the pool closes idle connections; a later message is deferred.
    """
    async with running_target() as target:
        pool = make_pool()
        await pool.send("127.0.0.1", target.port, envelope("b@x.org"), BODY)
        assert target.open == 1
        await pool.close()
        await target.all_closed()
        late = await pool.send("127.0.0.1", target.port, envelope("b@x.org"), BODY)
    assert late.result.deferred == (("b@x.org", "the relay is stopping"),)
    assert pool.connections == 0


@async_test
async def test_server_closing_an_idle_connection() -> None:
    """
    A server that drops an idle connection is noticed; the next message
    goes over a new connection.
    """
    async with running_target() as target:
        pool = make_pool()
        await pool.send("127.0.0.1", target.port, envelope("b@x.org"), BODY)
        target.sessions[0].wire.loseConnection()
        await target.all_closed()
        await until(lambda: pool.connections == 0)
        sent = await pool.send("127.0.0.1", target.port, envelope("c@x.org"), BODY)
        await pool.close()
    assert sent.result.delivered == ("c@x.org",)
    assert target.connections == 2


async def until(condition: Callable[[], bool], turns: int = 1000) -> None:
    """
    Let the reactor turn until C{condition} holds (at most C{turns} times).
    """
    from twisted.internet import task

    for _ in range(turns):
        if condition():
            return
        await task.deferLater(reactor(), 0, lambda: None)
    raise AssertionError("the condition never held")


@async_test
async def test_empty_envelope_needs_no_connection() -> None:
    """
    A message without recipients settles at once.
    """
    pool = make_pool()
    empty = Envelope("q", "l", "u", "a@x.org", (), Priority.NORMAL, 0.0)
    sent = await pool.send("127.0.0.1", 9, empty, BODY)
    assert sent.result == DeliveryResult()
    assert pool.connections == 0


# -- the pool in memory: connections the test accepts and answers by hand


class TLSStringTransport(StringTransportWithDisconnection):
    """
    Records C{startTLS}; the handshake completes when the test says so.
    """

    tls_creator: Any = None

    def startTLS(self, contextFactory: Any) -> None:
        self.tls_creator = contextFactory


@define
class ServerEnd:
    """
    The server's end of a pooled connection on a L{StringTransport}.
    """

    transport: TLSStringTransport
    protocol: SMTPClientProtocol

    def sent(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def reply(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def greet(self, extensions: bytes = b"") -> None:
        """
        Greet, answer EHLO.
        """
        self.reply(b"220 memory.test ESMTP\r\n")
        assert self.sent() == b"EHLO gw.test\r\n"
        self.reply(b"250-memory.test\r\n" + extensions + b"250 8BITMIME\r\n")

    def take_message(self) -> None:
        """
        Accept one message of one recipient, sent without pipelining.
        """
        assert self.sent().startswith(b"MAIL FROM:")
        self.reply(b"250 ok\r\n")
        assert self.sent().startswith(b"RCPT TO:")
        self.reply(b"250 ok\r\n")
        assert self.sent() == b"DATA\r\n"
        self.reply(b"354 go\r\n")
        assert self.sent().endswith(b"\r\n.\r\n")
        self.reply(b"250 ok\r\n")


@define
class Network:
    """
    Endpoints whose connections wait for the test to accept them.
    """

    connecting: list[tuple[Any, Deferred[Any]]] = Factory(list)

    def endpoint(self, host: str, port: int, timeout: float) -> Any:
        network = self

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                connected: Deferred[Any] = Deferred()
                network.connecting.append((factory, connected))
                return connected

        return Endpoint()

    def accept(self) -> ServerEnd:
        factory, connected = self.connecting.pop(0)
        protocol = factory.buildProtocol(None)
        transport = TLSStringTransport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        connected.callback(protocol)
        return ServerEnd(transport, protocol)

    def refuse(self) -> None:
        _, connected = self.connecting.pop(0)
        connected.errback(ConnectionRefusedError("refused"))


def memory_pool(**kwargs: Any) -> tuple[ConnectionPool, Network, Clock]:
    network, clock = Network(), Clock()
    kwargs.setdefault("settings", SETTINGS)
    pool = ConnectionPool(None, endpoint_factory=network.endpoint, clock=clock, **kwargs)
    return pool, network, clock


def fired(d: Deferred[T]) -> T:
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "not fired"
    value: T = results[0]
    return value


NO_TLS = SessionPolicy(tls=TLSPolicy(starttls=StartTLS.NEVER))


def finish(pool: ConnectionPool, clock: Clock) -> None:
    """
    Close the pool; connections whose server end stays silent are aborted
    after the QUIT timeout.
    """
    closed = pool.close(timeout=1.0)
    clock.advance(1.0)
    assert closed.called
    assert pool.connections == 0


def test_stale_reused_connection_resends_on_a_new_one() -> None:
    """
    A reused connection found closed before the server answered the new
    MAIL: the message goes over a new connection and is delivered, not
    deferred.
    """
    pool, network, clock = memory_pool()
    first = pool.send("mx.test", 25, envelope("b@x.org"), BODY, NO_TLS)
    server = network.accept()
    server.greet()
    server.take_message()
    assert fired(first).result.delivered == ("b@x.org",)
    second = pool.send("mx.test", 25, envelope("c@x.org"), BODY, NO_TLS)
    assert server.sent().startswith(b"MAIL FROM:")
    server.transport.loseConnection()
    assert not second.called
    fresh = network.accept()
    fresh.greet()
    fresh.take_message()
    assert fired(second).result.delivered == ("c@x.org",)
    finish(pool, clock)


@pytest.mark.parametrize(("elapsed", "timed_out"), [(29.9, False), (30.0, True)])
def test_connect_timeout(elapsed: float, timed_out: bool) -> None:
    """
    A connection not established within the connect timeout defers the
    message with the reason; just before it, the message still waits.
    """
    pool, _, clock = memory_pool()
    sent = pool.send("mx.test", 25, envelope("b@x.org"), BODY, NO_TLS)
    clock.advance(elapsed)
    assert sent.called is timed_out
    if timed_out:
        assert fired(sent).result.deferred == (
            ("b@x.org", "timed out after 30 s connecting to mx.test:25"),
        )
    finish(pool, clock)


def test_failed_extra_connection_leaves_the_queue_to_a_working_one() -> None:
    """
    When a second connection to a destination cannot be opened while the
    first works, the waiting message goes over the first.
    """
    pool, network, clock = memory_pool()
    first = pool.send("mx.test", 25, envelope("b@x.org"), BODY, NO_TLS)
    server = network.accept()
    server.greet()
    assert server.sent().startswith(b"MAIL FROM:")
    second = pool.send("mx.test", 25, envelope("c@x.org"), BODY, NO_TLS)
    network.refuse()
    assert not second.called
    server.reply(b"250 ok\r\n")
    server.sent()
    server.reply(b"250 ok\r\n")
    server.sent()
    server.reply(b"354 go\r\n")
    server.sent()
    server.reply(b"250 ok\r\n")
    assert fired(first).result.delivered == ("b@x.org",)
    server.take_message()
    assert fired(second).result.delivered == ("c@x.org",)
    finish(pool, clock)


def test_refused_connection_defers_everything_waiting() -> None:
    """
    With no working connection, a refused one defers every message waiting
    for the destination, as a host failure.
    """
    pool, network, _ = memory_pool(max_per_destination=1)
    sends = [pool.send("mx.test", 25, envelope(f"{n}@x.org"), BODY, NO_TLS) for n in range(3)]
    network.refuse()
    for n, sent in enumerate(sends):
        result = fired(sent)
        assert result.retryable == (f"{n}@x.org",)
        assert "cannot connect to mx.test:25" in (result.host_failure or "")
    assert pool.connections == 0


def test_close_aborts_a_stuck_delivery_after_the_close_timeout() -> None:
    """
    Closing defers what waits at once, gives the message under way the
    close timeout, then aborts it (deferred) and fires.
    """
    pool, network, clock = memory_pool(max_per_destination=1)
    busy = pool.send("mx.test", 25, envelope("b@x.org"), BODY, NO_TLS)
    waiting = pool.send("mx.test", 25, envelope("c@x.org"), BODY, NO_TLS)
    server = network.accept()
    server.greet()
    closed = pool.close(timeout=10)
    assert fired(waiting).result.deferred == (("c@x.org", "the relay is stopping"),)
    clock.advance(9.9)
    assert not busy.called
    assert not closed.called
    clock.advance(0.1)
    assert fired(busy).result.deferred == (("b@x.org", "the relay is stopping"),)
    assert closed.called
    assert pool.connections == 0


def test_close_while_connecting() -> None:
    """
    Closing while a connection is being made cancels it; the message is
    deferred.
    """
    pool, _, _ = memory_pool()
    sent = pool.send("mx.test", 25, envelope("b@x.org"), BODY, NO_TLS)
    closed = pool.close()
    assert fired(sent).result.deferred == (("b@x.org", "the relay is stopping"),)
    assert closed.called


@pytest.mark.parametrize(("elapsed", "tls_again"), [(99.0, False), (100.0, True)])
def test_tls_failure_is_remembered(elapsed: float, tls_again: bool) -> None:
    """
    After a failed handshake under the plaintext fallback, the host is sent
    to without STARTTLS for C{tls_failure_memory} seconds, then STARTTLS is
    tried again.
    """
    policy = SessionPolicy(tls=TLSPolicy(fallback=TLSFallback.PLAINTEXT))
    pool, network, clock = memory_pool(tls_failure_memory=100.0, idle_timeout=1.0)
    first = pool.send("mx.test", 25, envelope("b@x.org"), BODY, policy)
    server = network.accept()
    server.greet(b"250-STARTTLS\r\n")
    assert server.sent() == b"STARTTLS\r\n"
    server.reply(b"220 go\r\n")
    server.transport.loseConnection()
    plain = network.accept()
    plain.greet(b"250-STARTTLS\r\n")
    plain.take_message()
    assert fired(first).result.delivered == ("b@x.org",)
    clock.advance(1.0)
    assert plain.sent() == b"QUIT\r\n"
    plain.reply(b"221 bye\r\n")
    assert pool.connections == 0
    clock.advance(elapsed - 1.0)
    pool.send("mx.test", 25, envelope("c@x.org"), BODY, policy)
    later = network.accept()
    later.greet(b"250-STARTTLS\r\n")
    assert later.sent().startswith(b"STARTTLS" if tls_again else b"MAIL FROM:")
    finish(pool, clock)


def test_a_bug_while_opening_defers_instead_of_reconnecting(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    An unexpected error while opening a session is logged and defers what
    waits, instead of opening connection after connection.
    """

    def broken(host: str, port: int, timeout: float) -> Any:
        raise RuntimeError("bug")

    clock = Clock()
    pool = ConnectionPool(None, SETTINGS, endpoint_factory=broken, clock=clock)
    sent = pool.send("mx.test", 25, envelope("b@x.org"), BODY, NO_TLS)
    assert fired(sent).result.deferred == (("b@x.org", "internal error"),)
    assert pool.connections == 0
    assert len(logged_errors) == 1
    logged_errors.clear()
