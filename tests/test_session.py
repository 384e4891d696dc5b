"""
Tests for L{smtpgw.session} and L{smtpgw.realm}: the replies a submitting
client gets (PRODUCT section 2), in memory over a L{StringTransport}.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtpgw.alerts import MemoryAlertSink
from smtpgw.interfaces import IAlertSink, IMessageQueue, IUserStore
from smtpgw.limits import Limits
from smtpgw.model import Enforcement, Priority, SmtpUser
from smtpgw.realm import GatewayDelivery, GatewayRealm, GatewayServices, SessionMind
from tests.session_fakes import (
    HOSTNAME,
    PASSWORD,
    START,
    Client,
    FakeQueue,
    FakeUsers,
    Harness,
    make_user,
    message,
    plain,
)


def test_greeting_names_the_host_and_esmtp() -> None:
    """
    The greeting is a 220 with the gateway's host name and no software
    version.
    """
    harness = Harness()
    address = IPv4Address("TCP", "192.0.2.1", 40000)
    session = harness.factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    session.makeConnection(transport)
    assert transport.value() == b"220 gw.example.net ESMTP smtpgw\r\n"


@pytest.mark.parametrize(
    ("hostname", "greeting"),
    [("bücher.example", b"xn--bcher-kva.example"), ("a..b", b"a..b")],
)
def test_greeting_host_is_ascii(hostname: str, greeting: bytes) -> None:
    """
    An internationalized host name is greeted with as its A-label; a name
    IDNA refuses is still sent as ASCII.
    """
    client = Harness(hostname=hostname).connect()
    assert client.greeting == [b"220 " + greeting + b" ESMTP smtpgw"]


def test_ehlo_advertises_the_extensions() -> None:
    """
    EHLO lists PIPELINING, SIZE with the limit, 8BITMIME,
    ENHANCEDSTATUSCODES, MT-PRIORITY, STARTTLS (TLS configured) and AUTH
    PLAIN LOGIN.
    """
    harness = Harness(limits=Limits(max_size=1234567), tls=object())
    client = harness.connect()
    replies = client.command(b"EHLO client.example.org")
    assert replies[0] == b"250-" + HOSTNAME.encode()
    assert replies[-1].startswith(b"250 ")
    assert all(r.startswith(b"250-") for r in replies[:-1])
    keywords = {r[4:] for r in replies[1:]}
    assert {
        b"PIPELINING",
        b"SIZE 1234567",
        b"8BITMIME",
        b"ENHANCEDSTATUSCODES",
        b"MT-PRIORITY",
        b"STARTTLS",
        b"AUTH PLAIN LOGIN",
    } <= keywords


def test_no_starttls_without_tls_options() -> None:
    """
    When the TLS option source gives nothing, STARTTLS is neither offered
    nor accepted.
    """
    harness = Harness(tls=None)
    client = harness.connect()
    assert not any(b"STARTTLS" in r for r in client.command(b"EHLO c"))
    assert client.command(b"STARTTLS") == [b"454 4.7.0 TLS not available"]


def test_no_starttls_on_a_transport_without_tls() -> None:
    """
    A transport that cannot start TLS does not get STARTTLS offered.
    """
    harness = Harness(tls=object())
    client = harness.connect(tls_capable=False)
    assert not any(b"STARTTLS" in r for r in client.command(b"EHLO c"))


def test_tls_options_are_asked_for_each_connection() -> None:
    """
    The TLS option source is called at each new connection, so reloaded
    certificates apply to new sessions.
    """
    options = [object(), object()]
    calls = iter(options)
    harness = Harness()
    harness.factory.tls = lambda: next(calls)
    first = harness.connect()
    second = harness.connect()
    assert first.session.ctx is options[0]
    assert second.session.ctx is options[1]


def test_helo_and_ehlo_need_an_argument() -> None:
    """
    HELO and EHLO without a host name get 501 5.5.4; HELO with one 250.
    """
    client = Harness().connect()
    assert client.command(b"EHLO")[0].startswith(b"501 5.5.4")
    assert client.command(b"HELO")[0].startswith(b"501 5.5.4")
    assert client.command(b"HELO client.example.org") == [b"250 gw.example.net"]


def test_simple_commands() -> None:
    """
    NOOP 250 2.0.0, VRFY 252 2.5.0, HELP 214, RSET 250 2.0.0, QUIT 221 2.0.0
    and close; unknown commands 500 5.5.2; EXPN 502 5.5.1.
    """
    client = Harness().connect()
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]
    assert client.command(b"noop") == [b"250 2.0.0 Ok"]
    assert client.command(b"VRFY bob@example.com")[0].startswith(b"252 2.5.0 ")
    assert client.command(b"VRFY")[0].startswith(b"501 5.5.4 ")
    help_reply = client.command(b"HELP")
    assert help_reply[-1].startswith(b"214 ")
    assert client.command(b"RSET") == [b"250 2.0.0 Ok"]
    assert client.command(b"FROB")[0].startswith(b"500 5.5.2 ")
    assert client.command(b"EXPN list")[0].startswith(b"502 5.5.1 ")
    assert not client.closed
    assert client.command(b"QUIT") == [b"221 2.0.0 Bye"]
    assert client.closed


def test_commands_end_with_a_bare_lf_too() -> None:
    """
    A command line ended by LF alone is read like one ended by CRLF (as
    netcat sends them); only DATA insists on CRLF.
    """
    client = Harness().connect()
    client.send(b"NOOP\nNOOP\r\n")
    assert client.codes() == [b"250", b"250"]


# -- AUTH ---------------------------------------------------------------------


def test_mail_before_auth_is_530() -> None:
    """
    MAIL before AUTH gets 530 5.7.0.
    """
    client = Harness().connect()
    client.command(b"EHLO c")
    assert client.command(b"MAIL FROM:<a@example.com>") == [b"530 5.7.0 Authentication required"]


def test_auth_plain_initial_response_logs_in_and_records_the_login() -> None:
    """
    AUTH PLAIN with an initial response gets 235 2.7.0; the login is
    recorded with the time and the client address.
    """
    harness = Harness()
    client = harness.connect("203.0.113.9")
    assert client.login() == [b"235 2.7.0 Authentication successful"]
    assert harness.user_store.logins == [("alice", START, "203.0.113.9")]


def test_auth_plain_with_a_separate_response() -> None:
    """
    AUTH PLAIN without an initial response gets an empty 334 challenge.
    """
    client = Harness().connect()
    client.command(b"EHLO c")
    assert client.command(b"AUTH PLAIN") == [b"334 "]
    assert client.command(plain()) == [b"235 2.7.0 Authentication successful"]


def test_auth_login() -> None:
    """
    AUTH LOGIN asks for the username then the password (base64).
    """
    client = Harness().connect()
    client.command(b"EHLO c")
    assert client.command(b"AUTH LOGIN") == [b"334 " + base64.b64encode(b"Username:")]
    assert client.command(base64.b64encode(b"alice")) == [b"334 " + base64.b64encode(b"Password:")]
    assert client.command(base64.b64encode(PASSWORD.encode())) == [
        b"235 2.7.0 Authentication successful"
    ]


def test_auth_login_with_initial_username() -> None:
    """
    AUTH LOGIN with the username as initial response asks for the password.
    """
    client = Harness().connect()
    client.command(b"EHLO c")
    assert client.command(b"AUTH LOGIN " + base64.b64encode(b"alice")) == [
        b"334 " + base64.b64encode(b"Password:")
    ]
    assert client.command(base64.b64encode(PASSWORD.encode()))[0].startswith(b"235 ")


@pytest.mark.parametrize(
    ("username", "password"),
    [("alice", "wrong"), ("nobody", PASSWORD), ("bob", PASSWORD)],
    ids=["wrong-password", "unknown-user", "inactive-user"],
)
def test_failed_logins_all_get_the_same_535(username: str, password: str) -> None:
    """
    A wrong password, an unknown user and an inactive user all get
    535 5.7.8 with the same text, and nothing is recorded.
    """
    harness = Harness(
        users={"alice": make_user(), "bob": make_user("bob", active=False)},
        limits=Limits(auth_failure_delay=0),
    )
    client = harness.connect()
    assert client.login(username, password) == [b"535 5.7.8 Authentication credentials invalid"]
    assert harness.user_store.logins == []
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"530 ")


def test_auth_cancelled_with_star() -> None:
    """
    A C{*} response cancels the exchange with 501 5.0.0.
    """
    client = Harness().connect()
    client.command(b"EHLO c")
    client.command(b"AUTH LOGIN")
    assert client.command(b"*") == [b"501 5.0.0 Authentication cancelled"]
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]


def test_auth_sequence_errors() -> None:
    """
    AUTH needs EHLO first (503), a known mechanism (504), a mechanism at all
    (501), and only once (503).
    """
    client = Harness().connect()
    assert client.command(b"AUTH PLAIN " + plain())[0].startswith(b"503 5.5.1 ")
    client.command(b"EHLO c")
    assert client.command(b"AUTH CRAM-MD5")[0].startswith(b"504 5.5.4 ")
    assert client.command(b"AUTH")[0].startswith(b"501 5.5.4 ")
    assert client.command(b"AUTH PLAIN " + plain())[0].startswith(b"235 ")
    assert client.command(b"AUTH PLAIN " + plain()) == [b"503 5.5.1 Already authenticated"]


def test_require_tls_hides_auth_before_starttls() -> None:
    """
    With require_tls, AUTH is not offered before STARTTLS and gets 530 5.7.0
    Must issue a STARTTLS command first; after STARTTLS it is offered.
    """
    harness = Harness(tls=object(), require_tls=True)
    client = harness.connect()
    ehlo = client.command(b"EHLO c")
    assert not any(b"AUTH" in r for r in ehlo)
    assert client.command(b"AUTH PLAIN " + plain()) == [
        b"530 5.7.0 Must issue a STARTTLS command first"
    ]
    assert client.command(b"STARTTLS") == [b"220 2.0.0 Ready to start TLS"]
    ehlo = client.command(b"EHLO c")
    assert b"250-AUTH PLAIN LOGIN" in ehlo
    assert not any(b"STARTTLS" in r for r in ehlo)
    assert client.command(b"AUTH PLAIN " + plain())[0].startswith(b"235 ")


def test_seventy_three_byte_password_is_535_not_a_crash() -> None:
    """
    bcrypt refuses passwords over 72 bytes: AUTH with a 73-byte password is
    an ordinary failed login, and the session still works.
    """
    harness = Harness(limits=Limits(auth_failure_delay=0))
    client = harness.connect()
    assert client.login("alice", "x" * 73) == [b"535 5.7.8 Authentication credentials invalid"]
    assert client.command(b"AUTH PLAIN " + plain())[0].startswith(b"235 ")


# -- MAIL, RCPT, DATA --------------------------------------------------------


def test_message_accepted_only_after_the_queue_fired() -> None:
    """
    The 250 with the queue id comes only once the queue's submit fired.
    """
    harness = Harness(queue=FakeQueue(mode="pending"))
    client = harness.logged_in()
    replies = client.mail_transaction(message())
    assert [r[:3] for r in replies] == [b"250", b"250", b"354"]
    assert len(harness.queue.submitted) == 1
    harness.queue.pending[0].callback(None)
    envelope = harness.queue.submitted[0][0]
    assert client.replies() == [b"250 2.0.0 Ok: queued as " + envelope.queue_id.encode()]


def test_envelope_and_relayed_message() -> None:
    """
    The envelope carries the list, user, sender, recipients, priority,
    acceptance time, client address and size; the relayed message has a
    CRLF Received header, a Message-ID, X-Priority, and no X-SMTPAPI.
    """
    harness = Harness()
    client = harness.logged_in("198.51.100.7")
    body = message(
        b"From: a@example.com",
        b'X-SMTPAPI: {"Priority": 2}',
        b"Subject: hi",
        body=b"line one\r\n..leading dot\r\n",
    )
    replies = client.mail_transaction(body, rcpts=(b"x@one.example", b"y@two.example"))
    assert replies[-1].startswith(b"250 2.0.0 Ok: queued as ")
    envelope, relayed = harness.queue.submitted[0]
    assert envelope.list == "news"
    assert envelope.username == "alice"
    assert envelope.sender == "a@example.com"
    assert envelope.recipients == ("x@one.example", "y@two.example")
    assert envelope.priority is Priority.HIGH
    assert envelope.accepted_at == START
    assert envelope.client_ip == "198.51.100.7"
    assert envelope.size == len(relayed)
    assert replies[-1].endswith(envelope.queue_id.encode())
    assert relayed.startswith(b"Received: from client.example.org ([198.51.100.7])\r\n")
    assert b"\r\nX-Priority: 2\r\n" in relayed
    assert b"X-SMTPAPI" not in relayed
    assert b"\r\nMessage-ID: <" + envelope.queue_id.encode() + b"@gw.example.net>\r\n" in relayed
    assert relayed.endswith(b"\r\n\r\nline one\r\n.leading dot\r\n")
    assert relayed.count(b"\n") == relayed.count(b"\r\n")


def test_existing_message_id_is_kept() -> None:
    """
    A message with a Message-ID keeps it and gets no second one.
    """
    harness = Harness()
    client = harness.logged_in()
    client.mail_transaction(message(b"From: a@example.com", b"Message-ID: <x@y>"))
    relayed = harness.queue.submitted[0][1]
    assert relayed.lower().count(b"message-id:") == 1
    assert b"Message-ID: <x@y>" in relayed


@pytest.mark.parametrize(
    ("user_priority", "parameter", "headers", "expected"),
    [
        (Priority.NORMAL, b"", (), Priority.NORMAL),
        (Priority.NORMAL, b" MT-PRIORITY=4", (), Priority.VERY_HIGH),
        (Priority.NORMAL, b" MT-PRIORITY=-5", (), Priority.NORMAL),
        (Priority.LOW, b" MT-PRIORITY=-5", (), Priority.LOW),
        (Priority.NORMAL, b"", (b"X-Priority: 1",), Priority.VERY_HIGH),
        (Priority.HIGH, b"", (b"Importance: low",), Priority.HIGH),
        (Priority.NORMAL, b" MT-PRIORITY=1", (b'X-SMTPAPI: {"Priority": 5}',), Priority.NORMAL),
    ],
)
def test_effective_priority(
    user_priority: Priority, parameter: bytes, headers: tuple[bytes, ...], expected: Priority
) -> None:
    """
    The effective priority is the higher of the user's default and the
    message's (X-SMTPAPI, then MT-PRIORITY=, then headers).
    """
    harness = Harness(users={"alice": make_user(priority=user_priority)})
    client = harness.logged_in()
    client.send(
        b"MAIL FROM:<a@example.com>" + parameter + b"\r\nRCPT TO:<b@c.example>\r\nDATA\r\n"
    )
    client.send(message(b"From: a@example.com", *headers) + b".\r\n")
    assert client.codes()[-1] == b"250"
    envelope, relayed = harness.queue.submitted[0]
    assert envelope.priority is expected
    assert b"\r\nX-Priority: %d\r\n" % expected in relayed


@pytest.mark.parametrize(
    "parameters",
    [b"SIZE=1000", b"BODY=8BITMIME", b"BODY=7bit", b"MT-PRIORITY=+3", b"AUTH=<>", b"size=10"],
)
def test_known_mail_parameters_are_accepted(parameters: bytes) -> None:
    """
    SIZE, BODY, MT-PRIORITY and AUTH are understood.
    """
    client = Harness().logged_in()
    assert client.command(b"MAIL FROM:<a@example.com> " + parameters) == [b"250 2.1.0 Sender ok"]


@pytest.mark.parametrize(
    ("parameters", "reply"),
    [
        (b"SIZE=big", b"501 5.5.4"),
        (b"SIZE=", b"501 5.5.4"),
        (b"BODY=BINARYMIME", b"501 5.5.4"),
        (b"MT-PRIORITY=10", b"501 5.5.4"),
        (b"MT-PRIORITY=x", b"501 5.5.4"),
        (b"MT-PRIORITY=\xff", b"501 5.5.4"),
        (b"SIZE=1 SIZE=2", b"501 5.5.4"),
        (b"RET=FULL", b"555 5.5.4"),
        (b"SMTPUTF8", b"555 5.5.4"),
    ],
)
def test_bad_mail_parameters(parameters: bytes, reply: bytes) -> None:
    """
    Bad values of known parameters get 501 5.5.4; unknown ones 555 5.5.4.
    """
    client = Harness().logged_in()
    assert client.command(b"MAIL FROM:<a@example.com> " + parameters)[0].startswith(reply)
    assert client.command(b"MAIL FROM:<a@example.com>") == [b"250 2.1.0 Sender ok"]


def test_declared_size_at_the_limit_and_past_it() -> None:
    """
    SIZE= equal to the limit is accepted; one more gets 552 5.3.4 at MAIL.
    """
    client = Harness(limits=Limits(max_size=10_000)).logged_in()
    assert client.command(b"MAIL FROM:<a@example.com> SIZE=10000")[0].startswith(b"250 ")
    client.command(b"RSET")
    assert client.command(b"MAIL FROM:<a@example.com> SIZE=10001") == [
        b"552 5.3.4 Message size exceeds fixed maximum message size"
    ]


def test_body_over_the_size_limit_is_552_at_end_of_data() -> None:
    """
    A body over the size limit gets 552 5.3.4 after the final dot, is not
    queued, is not kept in memory, and the session goes on.
    """
    harness = Harness(limits=Limits(max_size=2048))
    client = harness.logged_in()
    big = message(body=b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n" + b"z" * 900 + b"\r\n")
    replies = client.mail_transaction(big)
    assert replies[-1].startswith(b"552 5.3.4 ")
    assert client.session._message is None
    assert harness.queue.submitted == []
    assert not client.closed
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 Ok: queued")


def test_body_exactly_at_the_size_limit_is_accepted() -> None:
    """
    A message whose DATA is exactly max_size octets is accepted; one more
    octet is refused.
    """
    limit = 1024
    fill = limit - len(message(body=b"")) - 2
    fits = message(body=b"x" * fill + b"\r\n")
    too_big = message(body=b"x" * (fill + 1) + b"\r\n")
    assert len(fits) == limit
    harness = Harness(limits=Limits(max_size=limit))
    client = harness.logged_in()
    assert client.mail_transaction(fits)[-1].startswith(b"250 2.0.0 ")
    assert client.mail_transaction(too_big)[-1].startswith(b"552 5.3.4 ")
    assert len(harness.queue.submitted) == 1


def test_sequence_errors() -> None:
    """
    RCPT before MAIL and DATA before MAIL/RCPT get 503 5.5.1; a second MAIL
    in a transaction gets 503 5.5.1; DATA with an argument 501.
    """
    client = Harness().logged_in()
    assert client.command(b"RCPT TO:<b@c.example>")[0].startswith(b"503 5.5.1 ")
    assert client.command(b"DATA")[0].startswith(b"503 5.5.1 ")
    client.command(b"MAIL FROM:<a@example.com>")
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"503 5.5.1 ")
    assert client.command(b"DATA")[0].startswith(b"503 5.5.1 ")
    client.command(b"RCPT TO:<b@c.example>")
    assert client.command(b"DATA now")[0].startswith(b"501 5.5.4 ")


def test_rset_forgets_the_transaction() -> None:
    """
    After RSET, RCPT needs a new MAIL.
    """
    client = Harness().logged_in()
    client.command(b"MAIL FROM:<a@example.com>")
    client.command(b"RSET")
    assert client.command(b"RCPT TO:<b@c.example>")[0].startswith(b"503 ")


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<nodomain>",
        b"MAIL FROM:<a@b",
        b"MAIL FROM:<a b@c.example>",
        b"MAIL FROM:<a@example.com>SIZE=1",
        b"MAIL FROM:<\xc3\xa9@example.com>",
        b"MAIL FROM:<@>",
        b"MAIL FROM:<a@>",
        b"MAIL FROM:<a@b@c.example>",
    ],
)
def test_bad_sender_syntax_is_501(line: bytes) -> None:
    """
    A sender that is not an address gets 501 5.1.7.
    """
    client = Harness().logged_in()
    assert client.command(line)[0].startswith(b"501 5.1.7 ")


@pytest.mark.parametrize("line", [b"MAIL FROM a@example.com", b"MAIL TO:<a@example.com>"])
def test_mail_without_from_is_501(line: bytes) -> None:
    """
    MAIL without C{FROM:} gets 501 5.5.4.
    """
    client = Harness().logged_in()
    assert client.command(line)[0].startswith(b"501 5.5.4 ")


@pytest.mark.parametrize(
    "line", [b"RCPT TO:<>", b"RCPT TO:<postmaster>", b"RCPT TO:<a@@b>", b"RCPT TO:"]
)
def test_bad_recipient_syntax_is_501(line: bytes) -> None:
    """
    A recipient that is not an address gets 501 5.1.3.
    """
    client = Harness().logged_in()
    client.command(b"MAIL FROM:<a@example.com>")
    assert client.command(line)[0].startswith(b"501 5.1.3 ")


def test_recipient_parameters_are_555() -> None:
    """
    RCPT parameters (DSN is not offered) get 555 5.5.4.
    """
    client = Harness().logged_in()
    client.command(b"MAIL FROM:<a@example.com>")
    assert client.command(b"RCPT TO:<b@c.example> NOTIFY=NEVER")[0].startswith(b"555 5.5.4 ")


def test_path_without_angle_brackets_is_tolerated() -> None:
    """
    C{MAIL FROM:a@example.com} (no brackets) is read as the address.
    """
    harness = Harness()
    client = harness.logged_in()
    client.send(b"MAIL FROM:a@example.com\r\nRCPT TO:b@c.example\r\nDATA\r\n")
    client.send(message() + b".\r\n")
    assert client.codes() == [b"250", b"250", b"354", b"250"]
    assert harness.queue.submitted[0][0].recipients == ("b@c.example",)


def test_null_sender_is_refused_by_the_sender_policy() -> None:
    """
    C{MAIL FROM:<>} is well-formed but no SMTP+ user may send as nobody:
    550 5.7.1 (enforce).
    """
    harness = Harness()
    client = harness.logged_in()
    assert client.command(b"MAIL FROM:<>")[0].startswith(b"550 5.7.1 ")
    assert len(harness.alerts.of_type("sender_domain")) == 1


def test_duplicate_recipients_are_kept_once() -> None:
    """
    The same recipient twice is accepted and delivered once.
    """
    harness = Harness()
    client = harness.logged_in()
    client.mail_transaction(message(), rcpts=(b"b@c.example", b"b@c.example"))
    assert harness.queue.submitted[0][0].recipients == ("b@c.example",)


def test_message_without_headers() -> None:
    """
    A DATA section without a header section is still queued (for a user in
    monitor mode: it has no From:), with the gateway's headers and an empty
    line before the body.
    """
    harness = Harness(users={"alice": make_user(enforcement=Enforcement.MONITOR)})
    client = harness.logged_in()
    assert client.mail_transaction(b"just a body line\r\n")[-1].startswith(b"250 2.0.0 ")
    relayed = harness.queue.submitted[0][1]
    assert relayed.endswith(b"\r\n\r\njust a body line\r\n")


def test_several_messages_in_one_session() -> None:
    """
    A session may send several messages, each with its own queue id.
    """
    harness = Harness()
    client = harness.logged_in()
    for _ in range(3):
        assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 Ok: queued as")
    ids = {envelope.queue_id for envelope, _ in harness.queue.submitted}
    assert len(ids) == 3


def test_journal_unavailable_is_452() -> None:
    """
    When the queue cannot make the message durable, the client gets
    452 4.3.1 and may go on.
    """
    harness = Harness(queue=FakeQueue(mode="unavailable"))
    client = harness.logged_in()
    assert client.mail_transaction(message())[-1] == (
        b"452 4.3.1 Insufficient system storage, try again later"
    )
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]


def test_queue_not_accepting_is_452_at_mail() -> None:
    """
    While the queue says it is not accepting, MAIL gets 452 4.3.1 before
    any body is sent.
    """
    harness = Harness(queue=FakeQueue(accepting=False))
    client = harness.logged_in()
    assert client.command(b"MAIL FROM:<a@example.com>")[0].startswith(b"452 4.3.1 ")


# -- sender policy -------------------------------------------------------------


def test_unauthorized_envelope_sender_enforced_is_550_with_alert() -> None:
    """
    Enforce: an envelope sender outside the user's domains gets 550 5.7.1
    naming the sender and why, and raises a sender_domain alert for the
    list.
    """
    harness = Harness()
    client = harness.logged_in()
    reply = client.command(b"MAIL FROM:<mallory@evil.example>")
    assert reply[0].startswith(b"550 5.7.1 ")
    assert b"mallory@evil.example" in reply[0]
    assert b"not authorized" in reply[0]
    [alert] = harness.alerts.of_type("sender_domain")
    assert alert.list == "news"
    assert alert.details["sender"] == "mallory@evil.example"
    assert alert.details["where"] == "envelope"
    assert alert.created_at == START
    assert client.command(b"RCPT TO:<b@c.example>")[0].startswith(b"503 ")


def test_unauthorized_envelope_sender_monitored_is_accepted_with_alert() -> None:
    """
    Monitor: the same sender gets 250 and the message is queued, but the
    alert is raised.
    """
    harness = Harness(users={"alice": make_user(enforcement=Enforcement.MONITOR)})
    client = harness.logged_in()
    replies = client.mail_transaction(
        message(b"From: a@example.com"), sender=b"mallory@evil.example"
    )
    assert replies[0] == b"250 2.1.0 Sender ok"
    assert replies[-1].startswith(b"250 2.0.0 ")
    assert len(harness.alerts.of_type("sender_domain")) == 1


def test_authorized_sender_address_passes() -> None:
    """
    An address listed in authorized_senders passes though its domain is not
    listed.
    """
    harness = Harness(users={"alice": make_user(domains=(), senders=("x@other.example",))})
    client = harness.logged_in()
    assert client.command(b"MAIL FROM:<X@Other.Example>") == [b"250 2.1.0 Sender ok"]
    assert harness.alerts.alerts == []


def test_unauthorized_header_from_enforced_is_550_after_data() -> None:
    """
    Enforce: a header From outside the user's domains gets 550 5.7.1 after
    DATA, nothing is queued, and an alert is raised.
    """
    harness = Harness()
    client = harness.logged_in()
    replies = client.mail_transaction(message(b"From: Boss <boss@evil.example>"))
    assert replies[-1].startswith(b"550 5.7.1 ")
    assert b"boss@evil.example" in replies[-1]
    assert harness.queue.submitted == []
    [alert] = harness.alerts.of_type("sender_domain")
    assert alert.details["where"] == "header"
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]


def test_unauthorized_header_from_monitored_is_queued_with_alert() -> None:
    """
    Monitor: the message is queued and the alert raised.
    """
    harness = Harness(users={"alice": make_user(enforcement=Enforcement.MONITOR)})
    client = harness.logged_in()
    replies = client.mail_transaction(message(b"From: boss@evil.example"))
    assert replies[-1].startswith(b"250 2.0.0 ")
    assert len(harness.alerts.of_type("sender_domain")) == 1


@pytest.mark.parametrize(
    "header",
    [
        b"From: a@example.com, boss@evil.example",
        b"From: undisclosed",
        b"From:",
    ],
)
def test_every_header_from_address_must_pass(header: bytes) -> None:
    """
    Several From addresses must each pass; a From without a readable
    address fails closed.
    """
    harness = Harness()
    client = harness.logged_in()
    replies = client.mail_transaction(message(header))
    assert replies[-1].startswith(b"550 5.7.1 ")
    assert harness.queue.submitted == []


@pytest.mark.parametrize(
    "headers",
    [
        (b"Subject: no from", b"Sender: ceo@evil.example", b"Reply-To: ceo@evil.example"),
        (b"Resent-From: ceo@evil.example", b"Subject: x"),
        (b"Subject: nothing at all",),
        (b"From-Address: a@example.com", b"X-From: a@example.com"),
    ],
    ids=["sender-only", "resent-from-only", "no-sender-field", "lookalike-names"],
)
def test_message_without_from_is_refused_under_enforce(headers: tuple[bytes, ...]) -> None:
    """
    Enforce: a message with no From: field at all (whatever Sender:,
    Resent-From: or look-alike fields it has) is checked as the null sender:
    550 5.7.1 saying it has no From:, nothing queued, one alert.
    """
    harness = Harness()
    client = harness.logged_in()
    replies = client.mail_transaction(message(*headers))
    assert replies[-1] == b"550 5.7.1 Message has no From: header"
    assert harness.queue.submitted == []
    [alert] = harness.alerts.of_type("sender_domain")
    assert alert.details["where"] == "header"
    assert alert.details["sender"] == ""
    assert "message has no From: header" in alert.message
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]


def test_message_without_from_is_queued_with_an_alert_under_monitor() -> None:
    """
    Monitor: a message with no From: is queued, and the alert is raised.
    """
    harness = Harness(users={"alice": make_user(enforcement=Enforcement.MONITOR)})
    client = harness.logged_in()
    replies = client.mail_transaction(message(b"Sender: ceo@evil.example", b"Subject: x"))
    assert replies[-1].startswith(b"250 2.0.0 ")
    [alert] = harness.alerts.of_type("sender_domain")
    assert "message has no From: header" in alert.message
    assert alert.details["enforcement"] == "monitor"


def test_two_from_headers_are_both_checked() -> None:
    """
    A second From header cannot smuggle an unauthorized sender.
    """
    harness = Harness()
    client = harness.logged_in()
    replies = client.mail_transaction(message(b"From: a@example.com", b"From: x@evil.example"))
    assert replies[-1].startswith(b"550 5.7.1 ")


# -- realm and avatar ------------------------------------------------------------


def _services() -> GatewayServices:
    harness = Harness()
    return harness.factory.services


def test_realm_gives_a_delivery_avatar_bound_to_the_user() -> None:
    """
    The realm turns the checker's SmtpUser into an IMessageDelivery avatar.
    """
    user = make_user()
    mind = SessionMind(_services(), "192.0.2.1", False)
    interface, avatar, logout = GatewayRealm().requestAvatar(user, mind, IMessageDelivery)
    assert interface is IMessageDelivery
    assert isinstance(avatar, GatewayDelivery)
    assert avatar.user is user
    assert avatar.client_ip == "192.0.2.1"
    assert verifyObject(IMessageDelivery, avatar)
    logout()


def test_realm_refuses_other_interfaces_and_ids() -> None:
    """
    Only IMessageDelivery, for an SmtpUser with a SessionMind.
    """
    realm = GatewayRealm()
    mind = SessionMind(_services(), "192.0.2.1", False)
    with pytest.raises(NotImplementedError):
        realm.requestAvatar(make_user(), mind, IMessageSMTP)
    with pytest.raises(NotImplementedError):
        realm.requestAvatar("alice", mind, IMessageDelivery)
    with pytest.raises(NotImplementedError):
        realm.requestAvatar(make_user(), None, IMessageDelivery)


def test_portal_login_through_the_realm() -> None:
    """
    A portal with the realm logs in through any checker that yields an
    SmtpUser; the fakes provide the interfaces they stand in for.
    """

    @implementer(ICredentialsChecker)
    class Always:
        credentialInterfaces = (IUsernamePassword,)

        def requestAvatarId(self, credentials: object) -> Deferred[SmtpUser]:  # type: ignore[override]
            return succeed(make_user())

    portal = Portal(GatewayRealm(), [Always()])
    mind = SessionMind(_services(), "192.0.2.1", True)
    result = portal.login(UsernamePassword(b"alice", b"x"), mind, IMessageDelivery)
    got: list[Any] = []
    result.addCallback(got.append)
    [(_, avatar, _)] = got
    assert avatar.user.username == "alice"
    assert verifyObject(IMessageQueue, FakeQueue())
    assert verifyObject(IAlertSink, MemoryAlertSink())
    assert verifyObject(IUserStore, FakeUsers())


def test_message_sink_provides_imessagesmtp() -> None:
    """
    The transaction's message sink is an IMessageSMTP.
    """
    harness = Harness()
    client = harness.logged_in()
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    sink = client.session._message
    assert sink is not None
    assert verifyObject(IMessageSMTP, sink)
    assert PASSWORD not in repr(sink)


def test_the_factory_counts_the_sessions_in_data() -> None:
    """
    The factory counts the sessions between DATA's 354 and the final dot
    whose message is not refused (each about to hand the queue a message,
    which the journal's writer waits for): a message finished, refused for
    its size (read on to the dot), refused so that the session closes, cut
    off by the DATA deadline, or by a lost connection each takes its
    session out of the count at once, and only once.
    """
    harness = Harness(limits=Limits(max_size=2048))
    first, second, third = harness.logged_in(), harness.logged_in(), harness.logged_in()
    slow = harness.logged_in()
    counts = []

    def start_data(client: Client) -> None:
        client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@dest.example>\r\nDATA\r\n")
        assert client.replies()[-1].startswith(b"354 ")
        counts.append(harness.factory.in_data)

    start_data(first)
    start_data(second)
    first.send(message() + b".\r\n")
    assert first.replies()[-1].startswith(b"250 2.0.0 ")
    counts.append(harness.factory.in_data)
    second.send(message(body=(b"x" * 900 + b"\r\n") * 3))
    counts.append(harness.factory.in_data)
    second.send(b".\r\n")
    assert second.replies()[-1].startswith(b"552 5.3.4 ")
    counts.append(harness.factory.in_data)
    start_data(second)
    second.lose()
    counts.append(harness.factory.in_data)
    start_data(third)
    third.send(b"Subject: bare\nLF\r\n")
    assert third.closed
    counts.append(harness.factory.in_data)
    third.lose()
    start_data(slow)
    harness.clock.advance(harness.limits.data_deadline)
    assert slow.closed
    counts.append(harness.factory.in_data)
    slow.lose()
    first.lose()
    assert [*counts, harness.factory.in_data] == [1, 2, 1, 0, 0, 1, 0, 1, 0, 1, 0, 0]
