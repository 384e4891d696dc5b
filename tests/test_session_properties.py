"""
Properties of L{smtpgw.session.GatewaySMTP}'s framing and parsing, checked
with hypothesis: the replies do not depend on how TCP cuts the stream, the
message is relayed exactly as sent, and no input crashes the session or
gets a reply without an enhanced status code.
"""

from __future__ import annotations

import itertools
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.cred.portal import IRealm
from zope.interface.verify import verifyObject

from smtpgw.limits import Limits
from smtpgw.realm import GatewayRealm
from tests.session_fakes import Harness, plain

_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_SESSION = (
    b"EHLO client.example.org\r\n"
    b"AUTH PLAIN " + plain() + b"\r\n"
    b"MAIL FROM:<a@example.com> SIZE=300 BODY=8BITMIME\r\n"
    b"RCPT TO:<b@dest.example>\r\n"
    b"RCPT TO:<c@dest.example>\r\n"
    b"DATA\r\n"
    b"From: a@example.com\r\nMessage-ID: <fixed@example.com>\r\n\r\n"
    b"..dot\r\nline\r\n\r\n.\r\n"
    b"NOOP\r\n"
    b"QUIT\r\n"
)

_QUEUE_ID = re.compile(rb"queued as [0-9A-F]+")


def _run(chunks: list[bytes]) -> tuple[bytes, list[bytes]]:
    harness = Harness()
    client = harness.connect()
    for chunk in chunks:
        client.send(chunk)
    replies = _QUEUE_ID.sub(b"queued as ID", client.transport.value())
    bodies = [body.split(b"\r\n", 4)[4] for _, body in harness.queue.submitted]
    return replies, bodies


_WHOLE = _run([_SESSION])


@_SETTINGS
@given(st.lists(st.integers(min_value=1, max_value=len(_SESSION) - 1), max_size=30))
def test_replies_do_not_depend_on_how_the_stream_is_cut(cuts: list[int]) -> None:
    """
    However the session's bytes are split into reads (a CRLF cut in two, a
    dot line cut from its CRLF...), the replies and the queued message are
    those of the stream sent in one read.
    """
    points = [0, *sorted(set(cuts)), len(_SESSION)]
    chunks = [_SESSION[a:b] for a, b in itertools.pairwise(points)]
    assert _run(chunks) == _WHOLE
    assert _WHOLE[0].count(b"\r\n250 2.0.0 Ok: queued as ID\r\n") == 1


_LINE = st.binary(max_size=200).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)


@_SETTINGS
@given(st.lists(st.one_of(_LINE, _LINE.map(lambda b: b"." + b)), max_size=40))
def test_body_is_relayed_exactly_as_sent(lines: list[bytes]) -> None:
    """
    Any body of clean lines, dot-stuffed on the wire, is relayed with the
    stuffing undone and every other octet unchanged.
    """
    harness = Harness()
    client = harness.logged_in()
    original = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines)
    header = b"From: a@example.com\r\n\r\n"
    replies = client.mail_transaction(header + stuffed)
    assert replies[-1].startswith(b"250 2.0.0 ")
    [(_, relayed)] = harness.queue.submitted
    assert relayed.endswith(b"\r\n\r\n" + original)


_VERBS = st.sampled_from(
    [
        *(b"EHLO", b"HELO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP", b"VRFY", b"HELP"),
        *(b"AUTH", b"STARTTLS", b"EXPN", b"BDAT", b"mail", b"XYZZY", b""),
    ]
)
_ARGUMENTS = st.one_of(
    st.binary(max_size=80),
    st.sampled_from(
        [
            b"FROM:<a@example.com>",
            b"FROM:<>",
            b"TO:<b@c.example>",
            b"FROM:<a@example.com> SIZE=x",
            b"PLAIN",
            b"LOGIN",
            b"PLAIN =",
            b"FROM:<a@example.com> MT-PRIORITY=-9",
        ]
    ),
)
_COMMAND = st.tuples(_VERBS, _ARGUMENTS).map(lambda va: va[0] + b" " + va[1])
_REPLY = re.compile(rb"(?:[23]\d\d[ -].*|[45]\d\d [245]\.\d{1,3}\.\d{1,3} .+)")


@_SETTINGS
@given(st.booleans(), st.lists(_COMMAND, max_size=25))
def test_any_commands_get_well_formed_replies(login: bool, commands: list[bytes]) -> None:
    """
    Arbitrary command lines never crash the session (a crash is a logged
    error, which fails the test), and every error reply carries an enhanced
    status code.
    """
    harness = Harness(limits=Limits(max_bad_commands=1000))
    client = harness.logged_in() if login else harness.connect()
    for command in commands:
        client.send(command.replace(b"\n", b"") + b"\r\n")
        if client.closed:
            break
    for reply in client.replies():
        assert _REPLY.fullmatch(reply), reply


def test_realm_provides_irealm() -> None:
    """
    The realm is a cred IRealm.
    """
    assert verifyObject(IRealm, GatewayRealm())
