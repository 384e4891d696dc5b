"""
Abuse limits of L{smtpgw.session.GatewaySMTP}, each at the limit and one
past it, each followed by proof that the server still serves a client.
"""

from __future__ import annotations

import pytest

import smtpgw.realm
from smtpgw.limits import Limits
from smtpgw.message import MessageAssembler
from smtpgw.session import R_HELP
from tests.session_fakes import Client, CongestingTransport, Harness, message, plain


def assert_still_serving(harness: Harness, ip: str = "198.51.100.200") -> None:
    """
    A fresh client from another address can log in and send a message.
    """
    client = harness.connect(ip)
    assert client.login()[-1].startswith(b"235 ")
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 Ok: queued as ")


# -- command line length ------------------------------------------------------


def _noop_of_length(length: int) -> bytes:
    """
    A NOOP command line of C{length} octets, CRLF included.
    """
    return b"NOOP " + b"x" * (length - len(b"NOOP ") - 2) + b"\r\n"


def test_command_line_at_512_octets_is_served() -> None:
    """
    A 512-octet command line (CRLF included, RFC 5321 4.5.3.1.4) is served.
    """
    harness = Harness()
    client = harness.connect()
    line = _noop_of_length(512)
    assert len(line) == 512
    client.send(line)
    assert client.replies() == [b"250 2.0.0 Ok"]


def test_command_line_of_513_octets_is_500() -> None:
    """
    A 513-octet command line gets 500 5.5.2 (stock Twisted runs it), the
    session goes on, and the server serves others.
    """
    harness = Harness()
    client = harness.connect()
    client.send(_noop_of_length(513))
    assert client.replies() == [b"500 5.5.2 Line too long"]
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]
    assert_still_serving(harness)


def test_endless_command_line_is_discarded_then_refused_once() -> None:
    """
    A command line that never ends is not buffered: its octets are dropped
    and, when it ends, it gets one 500 5.5.2.
    """
    harness = Harness()
    client = harness.connect()
    for _ in range(10):
        client.send(b"x" * 10_000)
    assert len(client.session._buffer) <= harness.limits.max_auth_line_length
    client.send(b"yyy\r\nNOOP\r\n")
    assert client.replies() == [b"500 5.5.2 Line too long", b"250 2.0.0 Ok"]
    assert_still_serving(harness)


def test_long_mail_command_is_not_run() -> None:
    """
    A MAIL command over 512 octets is refused, not run.
    """
    harness = Harness()
    client = harness.logged_in()
    line = b"MAIL FROM:<a@example.com> " + b"X" * 500
    assert client.command(line) == [b"500 5.5.2 Line too long"]
    assert client.session.transaction is None


# -- path length --------------------------------------------------------------


def _path_of_length(length: int, domain: bytes = b"@example.com") -> bytes:
    """
    A path of C{length} octets, angle brackets included.
    """
    return b"<" + b"a" * (length - 2 - len(domain)) + domain + b">"


@pytest.mark.parametrize("verb", [b"MAIL FROM:", b"RCPT TO:"])
def test_path_at_256_octets_is_accepted(verb: bytes) -> None:
    """
    A 256-octet path (RFC 5321 4.5.3.1.3) is accepted.
    """
    harness = Harness()
    client = harness.logged_in()
    if verb == b"RCPT TO:":
        client.command(b"MAIL FROM:<a@example.com>")
    path = _path_of_length(256)
    assert len(path) == 256
    assert client.command(verb + path)[0].startswith(b"250 ")


@pytest.mark.parametrize("verb", [b"MAIL FROM:", b"RCPT TO:"])
def test_path_of_257_octets_is_501(verb: bytes) -> None:
    """
    A 257-octet path gets 501 5.1.3, and the server goes on.
    """
    harness = Harness()
    client = harness.logged_in()
    if verb == b"RCPT TO:":
        client.command(b"MAIL FROM:<a@example.com>")
    assert client.command(verb + _path_of_length(257)) == [b"501 5.1.3 Path too long"]
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]
    assert_still_serving(harness)


# -- bad characters -----------------------------------------------------------


@pytest.mark.parametrize("line", [b"NOOP\0", b"MAIL FROM:<a\0@example.com>", b"NO\rOP"])
def test_nul_or_bare_cr_in_a_command_is_500(line: bytes) -> None:
    """
    A NUL or a CR inside a command line gets 500 5.5.2.
    """
    harness = Harness()
    client = harness.logged_in()
    assert client.command(line) == [b"500 5.5.2 Invalid character in command"]
    assert client.session.transaction is None
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]
    assert_still_serving(harness)


# -- pre-greet traffic --------------------------------------------------------


def test_talking_before_the_greeting_is_554_and_close() -> None:
    """
    With a greet delay, a client that talks before the 220 (a spam bot) gets
    554 5.5.1 and is closed; the server serves others.
    """
    harness = Harness(limits=Limits(greet_delay=2.0))
    client = harness.connect()
    harness.clock.advance(1.999)
    assert client.replies() == []
    client.send(b"EHLO bot\r\n")
    assert client.replies() == [b"554 5.5.1 Error: talking before the greeting"]
    assert client.closed
    harness.clock.advance(1.0)
    assert client.replies() == []
    polite = harness.connect("198.51.100.200")
    harness.clock.advance(2.0)
    assert polite.replies() == [b"220 gw.example.net ESMTP smtpgw"]
    assert polite.login()[-1].startswith(b"235 ")


def test_talking_right_after_the_greeting_delay_is_fine() -> None:
    """
    A client that waits exactly the greet delay is greeted and served.
    """
    harness = Harness(limits=Limits(greet_delay=2.0))
    client = harness.connect()
    harness.clock.advance(2.0)
    assert client.replies()[0].startswith(b"220 ")
    assert client.command(b"EHLO c")[-1].startswith(b"250 ")


# -- HTTP ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET / HTTP/1.1",
        b"POST /submit HTTP/1.0",
        b"HEAD / HTTP/1.1",
        b"CONNECT mail.example.com:25 HTTP/1.1",
        b"Host: gw.example.net",
    ],
)
def test_http_request_closes_at_once(request_line: bytes) -> None:
    """
    An HTTP request line or a Host: header closes the connection without a
    reply; the rest of the request is never read.
    """
    harness = Harness()
    client = harness.connect()
    client.send(request_line + b"\r\nHost: x\r\nNOOP\r\n\r\n")
    assert client.replies() == []
    assert client.closed
    assert_still_serving(harness)


# -- bursts of errors ---------------------------------------------------------


def test_bad_commands_up_to_the_limit_are_answered() -> None:
    """
    max_bad_commands errors each get their reply; the session stays open.
    """
    harness = Harness(limits=Limits(max_bad_commands=10))
    client = harness.connect()
    client.send(b"JUNK\r\n" * 10)
    assert client.codes() == [b"500"] * 10
    assert not client.closed
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]


def test_one_bad_command_past_the_limit_is_421() -> None:
    """
    The next error after max_bad_commands gets 421 4.7.0 and a close; the
    commands after it are not read; other clients are served.
    """
    harness = Harness(limits=Limits(max_bad_commands=10))
    client = harness.connect()
    client.send(b"JUNK\r\n" * 11 + b"NOOP\r\n")
    replies = client.replies()
    assert [r[:3] for r in replies] == [b"500"] * 10 + [b"421"]
    assert replies[-1].startswith(b"421 4.7.0 ")
    assert client.closed
    assert_still_serving(harness)


def test_failed_commands_of_every_kind_count() -> None:
    """
    Syntax errors, sequence errors and MAIL before AUTH all count as errors.
    """
    harness = Harness(limits=Limits(max_bad_commands=3))
    client = harness.connect()
    client.send(b"EHLO\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    assert client.codes() == [b"501", b"530", b"503", b"421"]
    assert client.closed


def test_accepted_message_resets_the_error_count() -> None:
    """
    An accepted message forgives earlier errors.
    """
    harness = Harness(limits=Limits(max_bad_commands=2))
    client = harness.logged_in()
    client.send(b"JUNK\r\nJUNK\r\n")
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    client.send(b"JUNK\r\nJUNK\r\n")
    assert client.codes() == [b"500", b"500"]
    assert not client.closed


# -- timeouts -----------------------------------------------------------------


def test_idle_client_gets_421_at_the_idle_timeout() -> None:
    """
    A client silent for idle_timeout gets 421 4.4.2 and is closed, not a
    moment before.
    """
    harness = Harness(limits=Limits(idle_timeout=300))
    client = harness.connect()
    client.command(b"EHLO c")
    harness.clock.advance(299.9)
    assert client.replies() == []
    assert not client.closed
    harness.clock.advance(0.1)
    [reply] = client.replies()
    assert reply.startswith(b"421 4.4.2 ")
    assert client.closed
    assert_still_serving(harness)


def test_activity_postpones_the_idle_timeout() -> None:
    """
    Each command restarts the idle time.
    """
    harness = Harness(limits=Limits(idle_timeout=300))
    client = harness.connect()
    for _ in range(5):
        harness.clock.advance(200)
        assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]
    assert not client.closed


def test_slow_drip_gets_421_at_the_command_deadline() -> None:
    """
    A command dripped one octet at a time never looks idle, but gets
    421 4.4.2 when the line is still unfinished at command_deadline.
    """
    harness = Harness(limits=Limits(command_deadline=60, idle_timeout=300))
    client = harness.connect()
    for octet in b"NOOP" + b"x" * 100:
        client.send(bytes([octet]))
        harness.clock.advance(5)
        if client.closed:
            break
    [reply] = client.replies()
    assert reply.startswith(b"421 4.4.2 ")
    assert harness.clock.seconds() - 1_700_000_000.0 == 60
    assert_still_serving(harness)


def test_dripped_command_finished_within_the_deadline_is_served() -> None:
    """
    A command that takes just under command_deadline is served.
    """
    harness = Harness(limits=Limits(command_deadline=60))
    client = harness.connect()
    for octet in b"NOO":
        client.send(bytes([octet]))
        harness.clock.advance(19.9)
    client.send(b"P\r\n")
    assert client.replies() == [b"250 2.0.0 Ok"]
    harness.clock.advance(100)
    assert not client.closed


def test_each_command_line_gets_its_own_deadline() -> None:
    """
    The deadline runs from the first octet of each line: a read that ends
    one dripped line and starts the next gives the next its full time.
    """
    harness = Harness(limits=Limits(command_deadline=60))
    client = harness.connect()
    client.send(b"NO")
    harness.clock.advance(50)
    client.send(b"OP\r\nNO")
    harness.clock.advance(50)
    assert not client.closed
    client.send(b"OP\r\n")
    assert client.replies() == [b"250 2.0.0 Ok", b"250 2.0.0 Ok"]
    client.send(b"NO")
    harness.clock.advance(60)
    assert client.replies()[0].startswith(b"421 4.4.2 ")


def test_slow_data_gets_421_at_the_data_deadline() -> None:
    """
    A DATA section that keeps trickling gets 421 4.4.2 at data_deadline and
    nothing is queued.
    """
    harness = Harness(limits=Limits(data_deadline=600, idle_timeout=300))
    client = harness.logged_in()
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    client.replies()
    for _ in range(5):
        harness.clock.advance(119.9)
        client.send(b"a line\r\n")
    assert not client.closed
    harness.clock.advance(0.5)
    [reply] = client.replies()
    assert reply.startswith(b"421 4.4.2 ")
    assert client.closed
    client.lose()
    assert harness.queue.submitted == []
    assert_still_serving(harness)


def test_no_timer_survives_the_connection() -> None:
    """
    Closing a session cancels its timers.
    """
    harness = Harness(limits=Limits(greet_delay=1.0))
    client = harness.connect()
    client.lose()
    assert harness.clock.getDelayedCalls() == []


# -- connections per address --------------------------------------------------


def test_connections_per_address_at_the_limit_and_past_it() -> None:
    """
    max_connections_per_ip connections from one address are greeted; the
    next gets 421 4.7.0 and is closed, while another address is served and
    a slot freed by a close can be used again.
    """
    harness = Harness(limits=Limits(max_connections_per_ip=5))
    clients = [harness.connect("192.0.2.50") for _ in range(5)]
    assert not any(c.closed for c in clients)
    extra = harness.connect("192.0.2.50")
    [reply] = extra.greeting
    assert reply.startswith(b"421 4.7.0 ")
    assert extra.closed
    extra.lose()
    assert harness.factory.connections.count("192.0.2.50") == 5
    assert_still_serving(harness)
    clients[0].lose()
    again = harness.connect("192.0.2.50")
    assert not again.closed
    assert again.command(b"NOOP") == [b"250 2.0.0 Ok"]


def test_total_connections_at_the_limit_and_past_it() -> None:
    """
    max_connections connections from any addresses are greeted; the next
    one, from a fresh address, gets 421 4.7.0 instead of the greeting and is
    closed; a slot freed by a close can be used again.
    """
    harness = Harness(limits=Limits(max_connections=4, max_connections_per_ip=50))
    clients = [harness.connect(f"192.0.2.{i}") for i in range(1, 5)]
    assert all(c.greeting[0].startswith(b"220 ") for c in clients)
    extra = harness.connect("198.51.100.9")
    [reply] = extra.greeting
    assert reply.startswith(b"421 4.7.0 ")
    assert b"Too many connections" in reply
    assert extra.closed
    extra.lose()
    assert harness.factory.connections.total == 4
    clients[0].lose()
    again = harness.connect("198.51.100.9")
    assert again.greeting[0].startswith(b"220 ")
    assert again.login()[-1].startswith(b"235 ")


def test_ipv6_connections_count_per_64() -> None:
    """
    Addresses of one IPv6 /64 share max_connections_per_ip (a client holds
    the whole /64); another /64 is counted apart.
    """
    harness = Harness(limits=Limits(max_connections_per_ip=3))
    clients = [harness.connect(f"2001:db8:1:2::{i}") for i in range(1, 4)]
    assert not any(c.closed for c in clients)
    extra = harness.connect("2001:db8:1:2:ffff::99")
    [reply] = extra.greeting
    assert reply.startswith(b"421 4.7.0 ")
    assert extra.closed
    extra.lose()
    other = harness.connect("2001:db8:1:3::1")
    assert other.greeting[0].startswith(b"220 ")
    assert harness.factory.connections.count("2001:db8:1:2::/64") == 3


def test_ipv4_mapped_ipv6_counts_as_its_ipv4_address() -> None:
    """
    A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: they share
    the limit of the IPv4 address.
    """
    harness = Harness(limits=Limits(max_connections_per_ip=2))
    harness.connect("192.0.2.60")
    harness.connect("::ffff:192.0.2.60")
    extra = harness.connect("::ffff:192.0.2.60")
    assert extra.greeting[0].startswith(b"421 4.7.0 ")
    assert harness.factory.connections.count("192.0.2.60") == 2


# -- recipients ---------------------------------------------------------------


def test_recipients_at_the_limit_and_past_it() -> None:
    """
    max_recipients recipients are accepted; the next gets 452 4.5.3; the
    message goes to the accepted ones.
    """
    harness = Harness(limits=Limits(max_recipients=100))
    client = harness.logged_in()
    rcpts = tuple(b"r%d@dest.example" % i for i in range(101))
    replies = client.mail_transaction(message(), rcpts=rcpts)
    assert [r[:3] for r in replies[1:101]] == [b"250"] * 100
    assert replies[101] == b"452 4.5.3 Too many recipients"
    assert replies[-1].startswith(b"250 2.0.0 ")
    assert len(harness.queue.submitted[0][0].recipients) == 100
    assert_still_serving(harness)


# -- dropped connections ------------------------------------------------------


def test_connection_dropped_mid_data_submits_nothing() -> None:
    """
    A connection lost in the middle of DATA queues nothing and releases its
    connection slot.
    """
    harness = Harness()
    client = harness.logged_in("192.0.2.77")
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\nDATA\r\n")
    client.send(b"From: a@example.com\r\n\r\nhalf a mes")
    client.lose()
    assert harness.queue.submitted == []
    assert harness.factory.connections.count("192.0.2.77") == 0
    assert_still_serving(harness)


def test_connection_dropped_while_the_queue_works_is_harmless() -> None:
    """
    A client that leaves before the queue answered causes no error.
    """
    from tests.session_fakes import FakeQueue

    harness = Harness(queue=FakeQueue(mode="pending"))
    client = harness.logged_in()
    client.mail_transaction(message())
    client.lose()
    harness.queue.pending[0].callback(None)
    assert client.replies() == []


# -- one message sink per transaction -----------------------------------------


def test_each_line_reaches_the_assembler_once_whatever_the_recipients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    With 50 recipients, every DATA line is handed to one assembler once,
    alone or in a block of body lines (stock Twisted copies every line into
    one message object per recipient).
    """
    calls: dict[int, int] = {}

    class CountingAssembler(MessageAssembler):
        def line(self, line: bytes) -> None:
            calls[id(self)] = calls.get(id(self), 0) + 1
            super().line(line)

        def body_block(self, block: bytes) -> bool:
            # Body lines may come many at once (one call, many lines).
            taken = super().body_block(block)
            if taken:
                calls[id(self)] = calls.get(id(self), 0) + block.count(b"\r\n")
            return taken

    monkeypatch.setattr(smtpgw.realm, "MessageAssembler", CountingAssembler)
    harness = Harness()
    client = harness.logged_in()
    body = message(body=b"".join(b"line %d\r\n" % i for i in range(20)))
    rcpts = tuple(b"r%d@dest.example" % i for i in range(50))
    assert client.mail_transaction(body, rcpts=rcpts)[-1].startswith(b"250 2.0.0 ")
    assert list(calls.values()) == [body.count(b"\r\n")]


# -- AUTH failures ------------------------------------------------------------


def _fail_login(client: Client) -> None:
    client.send(b"AUTH PLAIN " + plain(password="wrong") + b"\r\n")


def test_failed_logins_are_tarpitted_more_each_time() -> None:
    """
    The n-th failed login from an address is answered after n times the
    tarpit step.
    """
    harness = Harness(limits=Limits(auth_failure_delay=1.0, auth_failure_limit=5))
    client = harness.connect()
    client.command(b"EHLO c")
    for n in range(1, 5):
        _fail_login(client)
        harness.clock.advance(n - 0.01)
        assert client.replies() == []
        harness.clock.advance(0.01)
        assert client.replies() == [b"535 5.7.8 Authentication credentials invalid"]


def test_tarpit_delay_is_capped() -> None:
    """
    The tarpit delay never exceeds auth_failure_delay_cap.
    """
    harness = Harness(
        limits=Limits(auth_failure_delay=5.0, auth_failure_delay_cap=7.0, auth_failure_limit=10)
    )
    client = harness.connect()
    client.command(b"EHLO c")
    for _ in range(3):
        _fail_login(client)
        harness.clock.advance(7.0)
        assert client.codes() == [b"535"]


def test_auth_failures_at_the_limit_and_past_it() -> None:
    """
    auth_failure_limit - 1 failures get 535; the one reaching the limit gets
    421 4.7.0 and a close, with one auth_failures alert; later AUTH from
    the address gets 421 at once, from any connection, until the window has
    passed; other addresses log in meanwhile.
    """
    limits = Limits(auth_failure_limit=3, auth_failure_window=300, auth_failure_delay=0)
    harness = Harness(limits=limits)
    first = harness.connect("203.0.113.5")
    first.command(b"EHLO c")
    for _ in range(2):
        _fail_login(first)
        assert first.codes() == [b"535"]
    _fail_login(first)
    [reply] = first.replies()
    assert reply.startswith(b"421 4.7.0 ")
    assert first.closed
    [alert] = harness.alerts.of_type("auth_failures")
    assert alert.details["client_ip"] == "203.0.113.5"
    assert alert.details["failures"] == 3

    second = harness.connect("203.0.113.5")
    assert second.login()[-1].startswith(b"421 4.7.0 ")
    assert second.closed
    assert len(harness.alerts.of_type("auth_failures")) == 1
    assert_still_serving(harness)

    harness.clock.advance(300)
    third = harness.connect("203.0.113.5")
    assert third.login()[-1].startswith(b"235 ")


def test_failures_from_one_address_add_up_across_connections() -> None:
    """
    A brute force spread over connections is counted per address.
    """
    limits = Limits(auth_failure_limit=3, auth_failure_delay=0)
    harness = Harness(limits=limits)
    for expected in (b"535", b"535", b"421"):
        client = harness.connect("203.0.113.6")
        client.command(b"EHLO c")
        _fail_login(client)
        assert client.codes() == [expected]
        client.lose()
    assert len(harness.alerts.of_type("auth_failures")) == 1


def test_auth_failures_from_one_ipv6_64_add_up() -> None:
    """
    Failed logins from different addresses of one /64 count together: the
    third one, from yet another address of it, reaches the limit; the alert
    names the /64; another /64 still logs in.
    """
    harness = Harness(limits=Limits(auth_failure_limit=3, auth_failure_delay=0))
    for host, expected in ((1, b"535"), (2, b"535"), (3, b"421")):
        client = harness.connect(f"2001:db8:5:6::{host}")
        client.command(b"EHLO c")
        _fail_login(client)
        assert client.codes() == [expected]
        client.lose()
    [alert] = harness.alerts.of_type("auth_failures")
    assert alert.details["client_ip"] == "2001:db8:5:6::/64"
    blocked = harness.connect("2001:db8:5:6:abcd::1")
    assert blocked.login()[-1].startswith(b"421 4.7.0 ")
    assert harness.connect("2001:db8:5:7::1").login()[-1].startswith(b"235 ")


def test_parallel_failed_logins_cannot_overshoot_the_limit() -> None:
    """
    30 connections from one address send a wrong password at once: only
    auth_failure_limit of them are checked (bcrypt runs 3 times, not 30);
    when those fail, every connection gets 421 4.7.0 (the first two 535)
    and one auth_failures alert is raised.
    """
    limits = Limits(auth_failure_limit=3, auth_failure_delay=0)
    harness = Harness(limits=limits, delayed_auth=True)
    clients = [harness.connect("203.0.113.9") for _ in range(30)]
    for client in clients:
        client.command(b"EHLO c")
        _fail_login(client)
    assert len(harness.runner.waiting) == 3
    harness.runner.release()
    assert harness.runner.waiting == []
    codes = [c.codes() for c in clients]
    assert codes.count([b"535"]) == 2
    assert codes.count([b"421"]) == 28
    assert len(harness.alerts.of_type("auth_failures")) == 1
    assert harness.factory.auth_failures.failures("203.0.113.9") == 3
    assert harness.factory.auth_failures.pending("203.0.113.9") == 0
    other = harness.connect("198.51.100.200")
    other.command(b"EHLO c")
    other.send(b"AUTH PLAIN " + plain() + b"\r\n")
    harness.runner.release()
    assert other.codes() == [b"235"]


def test_parallel_logins_at_the_limit_run_and_one_past_it_waits() -> None:
    """
    auth_failure_limit checks from one address may run at once; one more
    waits (unanswered, reading nothing) until one of them ends, then is
    checked and logs in.
    """
    harness = Harness(limits=Limits(auth_failure_limit=3), delayed_auth=True)
    clients = [harness.connect("203.0.113.10") for _ in range(4)]
    for client in clients:
        client.command(b"EHLO c")
        client.send(b"AUTH PLAIN " + plain() + b"\r\nNOOP\r\n")
    assert len(harness.runner.waiting) == 3
    harness.runner.release()
    assert [c.codes() for c in clients[:3]] == [[b"235", b"250"]] * 3
    assert clients[3].replies() == []
    assert len(harness.runner.waiting) == 1
    harness.runner.release()
    assert clients[3].codes() == [b"235", b"250"]
    assert harness.factory.auth_failures.pending("203.0.113.10") == 0


def test_recent_failures_leave_fewer_checks_in_flight() -> None:
    """
    With limit - 1 failures on record, one check at a time runs; a second
    AUTH waits, and is refused with 421 when the first one fails.
    """
    limits = Limits(auth_failure_limit=3, auth_failure_delay=0)
    harness = Harness(limits=limits, delayed_auth=True)
    tracker = harness.factory.auth_failures
    tracker.record_failure("203.0.113.11")
    tracker.record_failure("203.0.113.11")
    first, second = harness.connect("203.0.113.11"), harness.connect("203.0.113.11")
    for client in (first, second):
        client.command(b"EHLO c")
        _fail_login(client)
    assert len(harness.runner.waiting) == 1
    harness.runner.release()
    assert first.codes() == [b"421"]
    assert second.codes() == [b"421"]
    assert harness.runner.waiting == []
    assert len(harness.alerts.of_type("auth_failures")) == 1


def test_hanging_up_during_the_check_still_counts_the_failure() -> None:
    """
    A client that leaves before its wrong password was checked still has
    the failure counted, and its slot is freed.
    """
    harness = Harness(limits=Limits(auth_failure_limit=3), delayed_auth=True)
    client = harness.connect("203.0.113.12")
    client.command(b"EHLO c")
    _fail_login(client)
    client.lose()
    harness.runner.release()
    assert harness.factory.auth_failures.failures("203.0.113.12") == 1
    assert harness.factory.auth_failures.pending("203.0.113.12") == 0
    assert client.replies() == []
    assert harness.clock.getDelayedCalls() == []


def test_hanging_up_while_waiting_for_a_check_frees_nothing_else() -> None:
    """
    A client that leaves while its AUTH waits for a turn is forgotten:
    the next waiting one gets the slot, nothing errs.
    """
    harness = Harness(limits=Limits(auth_failure_limit=1), delayed_auth=True)
    clients = [harness.connect("203.0.113.13") for _ in range(3)]
    for client in clients:
        client.command(b"EHLO c")
        client.send(b"AUTH PLAIN " + plain() + b"\r\n")
    assert len(harness.runner.waiting) == 1
    clients[1].lose()
    harness.runner.release()
    assert clients[0].codes() == [b"235"]
    assert len(harness.runner.waiting) == 1
    harness.runner.release()
    assert clients[2].codes() == [b"235"]
    assert harness.factory.auth_failures.pending("203.0.113.13") == 0


def test_connection_lost_during_the_tarpit_is_clean() -> None:
    """
    A client that hangs up while its failed login is tarpitted leaves no
    timer and no error behind.
    """
    harness = Harness(limits=Limits(auth_failure_delay=3.0))
    client = harness.connect()
    client.command(b"EHLO c")
    _fail_login(client)
    client.lose()
    assert harness.clock.getDelayedCalls() == []
    assert client.replies() == []


def test_auth_that_never_answers_times_out() -> None:
    """
    A credential check that never answers does not hold the connection past
    the idle timeout.
    """
    harness = Harness(delayed_auth=True, limits=Limits(idle_timeout=300))
    client = harness.connect()
    client.command(b"EHLO c")
    client.send(b"AUTH PLAIN " + plain() + b"\r\n")
    harness.clock.advance(299)
    assert client.replies() == []
    harness.clock.advance(1)
    assert client.replies()[0].startswith(b"421 4.4.2 ")
    assert client.closed


@pytest.mark.parametrize("bad", [b"\0", b"A" * 12300])
def test_bad_auth_response_line_ends_the_exchange(bad: bytes) -> None:
    """
    An AUTH response line with a NUL or over the AUTH line limit gets
    500 5.5.2 and ends the exchange: the next line is a command again.
    """
    client = Harness().connect()
    client.command(b"EHLO c")
    assert client.command(b"AUTH LOGIN")[0].startswith(b"334 ")
    assert client.command(bad)[0].startswith(b"500 5.5.2 ")
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]


# -- junk commands ------------------------------------------------------------


def test_junk_commands_at_the_limit_are_answered() -> None:
    """
    max_junk_commands commands that move no mail (NOOP, HELP, VRFY, RSET,
    EHLO, HELO) each get their reply; the session stays open.
    """
    harness = Harness(limits=Limits(max_junk_commands=6))
    client = harness.connect()
    client.send(b"EHLO c\r\nHELO c\r\nNOOP\r\nRSET\r\nVRFY a@b.example\r\nHELP\r\n")
    assert client.codes() == [b"250", b"250", b"250", b"250", b"252", b"214"]
    assert not client.closed
    assert client.command(b"AUTH PLAIN " + plain())[0].startswith(b"235 ")
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")


def test_one_junk_command_past_the_limit_is_421() -> None:
    """
    The command after max_junk_commands of them gets 421 4.7.0 and a close;
    what follows it is not read; other clients are served.
    """
    harness = Harness(limits=Limits(max_junk_commands=100))
    client = harness.connect()
    client.send(b"HELP\r\n" * 101 + b"NOOP\r\n")
    codes = client.codes()
    assert codes == [b"214"] * 100 + [b"421"]
    assert client.closed
    assert_still_serving(harness)


def test_junk_command_limit_counts_loops_that_get_nowhere() -> None:
    """
    A cancelled AUTH, a repeated recipient and a recipient past the limit
    move no mail either and count too.
    """
    harness = Harness(limits=Limits(max_junk_commands=5, max_recipients=1))
    client = harness.connect()
    client.send(b"EHLO c\r\nAUTH LOGIN\r\n*\r\n")  # 1, 2
    assert client.codes() == [b"250", b"334", b"501"]
    assert client.command(b"AUTH PLAIN " + plain())[0].startswith(b"235 ")
    client.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@c.example>\r\n")
    client.send(b"RCPT TO:<b@c.example>\r\nRCPT TO:<d@c.example>\r\nRSET\r\n")  # 3, 4, 5
    assert client.codes() == [b"250", b"250", b"250", b"452", b"250"]
    client.send(b"RCPT TO:<b@c.example>\r\nNOOP\r\n")
    assert client.codes() == [b"503", b"421"]
    assert client.closed


def test_an_accepted_message_resets_the_junk_count() -> None:
    """
    A client that sends mail may use NOOP and RSET between messages for as
    long as it sends.
    """
    harness = Harness(limits=Limits(max_junk_commands=3))
    client = harness.logged_in()
    for _ in range(5):
        client.send(b"RSET\r\nNOOP\r\n")
        assert client.codes() == [b"250", b"250"]
        assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")
    assert not client.closed


# -- output backpressure ---------------------------------------------------------


def test_session_is_a_streaming_producer_of_its_transport() -> None:
    """
    The session registers with its transport as a streaming producer (so the
    transport tells it when its write buffer is full), and unregisters when
    it closes (a transport with a producer never finishes closing).
    """
    harness = Harness()
    client = harness.connect()
    assert client.transport.producer is client.session
    assert client.transport.streaming
    client.command(b"QUIT")
    assert client.transport.producer is None


def _congesting(harness: Harness, bound: int) -> tuple[Client, CongestingTransport]:
    client = harness.connect(transport=CongestingTransport(bound))
    assert isinstance(client.transport, CongestingTransport)
    return client, client.transport


def test_client_that_does_not_read_stops_being_read() -> None:
    """
    A client that pipelines HELP and never reads: once the transport's write
    buffer is over its bound, the session stops answering and stops reading
    (the rest of what was read waits in the session); when the buffer
    drains, it answers the rest, in order.
    """
    harness = Harness(limits=Limits(max_junk_commands=10_000))
    client, transport = _congesting(harness, bound=4096)
    client.send(b"HELP\r\n" * 2000)
    first = transport.value()
    assert len(first) < 4096 + len(R_HELP)
    assert transport.producerState == "paused"
    assert client.session._buffer
    client.send(b"NOOP\r\n" * 1000)
    assert transport.value() == first
    output = [first]
    while transport.producerState == "paused":
        transport.drain()
        output.append(transport.value())
        assert len(output[-1]) < 4096 + len(R_HELP)
    everything = b"".join(output)
    assert everything == R_HELP * 2000 + b"250 2.0.0 Ok\r\n" * 1000
    assert not client.closed


def test_congestion_does_not_count_as_a_long_line() -> None:
    """
    Unanswered complete lines held back by congestion are not taken for one
    over-long partial line.
    """
    harness = Harness(limits=Limits(max_junk_commands=10_000))
    client, transport = _congesting(harness, bound=1024)
    client.send(b"NOOP\r\n" * 5000)
    assert transport.producerState == "paused"
    output = [transport.value()]
    while transport.producerState == "paused":
        transport.drain()
        output.append(transport.value())
    assert b"".join(output) == b"250 2.0.0 Ok\r\n" * 5000
    transport.drain()
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]


def test_flooding_client_that_does_not_read_is_aborted_at_the_idle_deadline() -> None:
    """
    A client that floods and never reads is no longer read from; at its
    idle deadline it gets the 421 and, its replies being stuck in the write
    buffer, the connection is aborted rather than waited for.
    """
    harness = Harness(limits=Limits(idle_timeout=300))
    client, transport = _congesting(harness, bound=4096)
    client.send(b"HELP\r\n" * 200)
    assert transport.producerState == "paused"
    harness.clock.advance(299)
    assert not client.closed
    harness.clock.advance(1)
    assert client.closed
    assert transport.disconnected


def test_closing_connection_that_never_drains_is_aborted_at_the_deadline() -> None:
    """
    A connection closed with replies still buffered (the client does not
    read them, the transport cannot finish closing) is aborted when its
    idle deadline passes.
    """
    harness = Harness(limits=Limits(idle_timeout=300))
    client = harness.connect()
    client.command(b"QUIT")
    assert client.closed
    assert not client.transport.disconnected
    harness.clock.advance(299)
    assert not client.transport.disconnected
    harness.clock.advance(1)
    assert client.transport.disconnected


# -- policy refusals ------------------------------------------------------------


def test_policy_refusals_up_to_the_limit_are_answered() -> None:
    """
    max_bad_commands envelope senders refused by policy each get their
    550 5.7.1; the session stays open.
    """
    harness = Harness(limits=Limits(max_bad_commands=10))
    client = harness.logged_in()
    client.send(b"".join(b"MAIL FROM:<x%d@evil.example>\r\n" % i for i in range(10)))
    assert client.codes() == [b"550"] * 10
    assert not client.closed
    assert client.mail_transaction(message())[-1].startswith(b"250 2.0.0 ")


def test_one_policy_refusal_past_the_limit_is_421() -> None:
    """
    A refused sender counts as an error: the one after max_bad_commands
    gets 421 4.7.0 and the connection is closed (an authenticated client
    cannot raise alerts without end on one connection).
    """
    harness = Harness(limits=Limits(max_bad_commands=10))
    client = harness.logged_in()
    client.send(b"".join(b"MAIL FROM:<x%d@evil.example>\r\n" % i for i in range(12)))
    replies = client.replies()
    assert [r[:3] for r in replies] == [b"550"] * 10 + [b"421"]
    assert replies[-1].startswith(b"421 4.7.0 ")
    assert client.closed
    # The attempt answered 421 was a violation too; the twelfth was not read.
    assert len(harness.alerts.of_type("sender_domain")) == 11
    assert_still_serving(harness)


def test_header_from_refusals_count_as_errors() -> None:
    """
    Messages refused for their From: count too: past max_bad_commands, the
    next refusal is 421 and the connection closes.
    """
    harness = Harness(limits=Limits(max_bad_commands=2))
    client = harness.logged_in()
    bad = message(b"From: boss@evil.example")
    for _ in range(2):
        assert client.mail_transaction(bad)[-1].startswith(b"550 5.7.1 ")
    assert client.mail_transaction(bad)[-1].startswith(b"421 4.7.0 ")
    assert client.closed
    assert harness.queue.submitted == []


def test_repeated_sender_violations_raise_one_alert_and_a_count() -> None:
    """
    300 refusals of the same sender for one user, over many connections,
    store one alert at once and, when sender_alert_window ends, one summary
    with the count of the other 299; another address is alerted at once.
    """
    limits = Limits(max_bad_commands=10, sender_alert_window=600)
    harness = Harness(limits=limits)
    for _ in range(30):
        client = harness.logged_in()
        client.send(b"MAIL FROM:<ceo@evil.example>\r\n" * 10)
        assert client.codes() == [b"550"] * 10
        client.lose()
    assert len(harness.alerts.of_type("sender_domain")) == 1
    client = harness.logged_in()
    client.command(b"MAIL FROM:<cfo@evil.example>")
    assert len(harness.alerts.of_type("sender_domain")) == 2
    harness.clock.advance(600)
    first, other, summary = harness.alerts.of_type("sender_domain")
    assert first.details["sender"] == "ceo@evil.example"
    assert other.details["sender"] == "cfo@evil.example"
    assert summary.details["sender"] == "ceo@evil.example"
    assert summary.details["repeats"] == 299


def test_overloaded_password_checks_get_454_without_an_error() -> None:
    """
    A checker that cannot check now (too many bcrypt checks waiting) gets
    the client a 454 4.7.0 to retry: not counted as a failure, not logged
    as an error (the test fails on a logged error), the session goes on.
    """
    from twisted.cred.checkers import ICredentialsChecker
    from twisted.cred.credentials import IUsernamePassword
    from twisted.cred.portal import Portal
    from twisted.internet.defer import Deferred, fail
    from zope.interface import implementer

    from smtpgw.checker import TooManyPasswordChecks
    from smtpgw.realm import GatewayRealm

    @implementer(ICredentialsChecker)
    class Overloaded:
        credentialInterfaces = (IUsernamePassword,)

        def requestAvatarId(self, credentials: object) -> Deferred[bytes]:  # type: ignore[override]
            return fail(TooManyPasswordChecks())

    harness = Harness()
    harness.factory.portal = Portal(GatewayRealm(), [Overloaded()])
    client = harness.connect("203.0.113.20")
    assert client.login() == [b"454 4.7.0 Temporary authentication failure"]
    assert not client.closed
    assert harness.factory.auth_failures.failures("203.0.113.20") == 0
    assert harness.factory.auth_failures.pending("203.0.113.20") == 0
    assert client.command(b"NOOP") == [b"250 2.0.0 Ok"]
