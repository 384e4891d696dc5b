"""
Tests for the pure parsers of L{smtpgw.session}: MAIL/RCPT paths and MAIL
parameters.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgw.model import Priority
from smtpgw.session import (
    R_PARAMETER_DUPLICATE,
    R_PARAMETER_SYNTAX,
    R_PARAMETER_UNKNOWN,
    R_PATH_TOO_LONG,
    R_SIZE_EXCEEDED,
    CommandRefused,
    MailParameters,
    parse_mail_parameters,
    parse_path,
)

BAD = b"501 bad\r\n"


@pytest.mark.parametrize(
    ("text", "address", "rest"),
    [
        (b"<a@example.com>", "a@example.com", b""),
        (b"  <a@example.com> SIZE=1", "a@example.com", b" SIZE=1"),
        (b"a@example.com SIZE=1", "a@example.com", b" SIZE=1"),
        (b'<"a b"@example.com>', '"a b"@example.com', b""),
        (b"<@relay.example:a@example.com>", "a@example.com", b""),
    ],
)
def test_paths(text: bytes, address: str, rest: bytes) -> None:
    """
    Bracketed and bare paths, quoted local parts and source routes (which
    are dropped) are read.
    """
    parsed, after = parse_path(text, 256, BAD, null_allowed=False)
    assert str(parsed) == address
    assert after == rest


def test_null_path() -> None:
    """
    C{<>} is the null sender where allowed, refused elsewhere.
    """
    parsed, _ = parse_path(b"<>", 256, BAD, null_allowed=True)
    assert str(parsed) == ""
    with pytest.raises(CommandRefused) as refused:
        parse_path(b"<>", 256, BAD, null_allowed=False)
    assert refused.value.reply == BAD


@pytest.mark.parametrize(
    "text", [b"", b"<", b"<a@b", b"<a>", b"<a@>", b"<@b>", b"<a@b>x", b"<a b@c>", b"<a@b@c>"]
)
def test_bad_paths(text: bytes) -> None:
    """
    What is not an address with a local part and a domain is refused with
    the caller's reply, as a protocol error.
    """
    with pytest.raises(CommandRefused) as refused:
        parse_path(text, 256, BAD, null_allowed=True)
    assert refused.value.reply == BAD
    assert refused.value.protocol_error


def test_path_length_at_the_limit_and_past_it() -> None:
    """
    The limit counts the angle brackets, also for a bare path.
    """
    path = b"<" + b"a" * 50 + b"@example.com>"
    assert str(parse_path(path, len(path), BAD, null_allowed=False)[0])
    with pytest.raises(CommandRefused) as refused:
        parse_path(path, len(path) - 1, BAD, null_allowed=False)
    assert refused.value.reply == R_PATH_TOO_LONG
    with pytest.raises(CommandRefused):
        parse_path(path[1:-1], len(path) - 1, BAD, null_allowed=False)


@given(st.binary(max_size=300))
def test_any_path_text_is_parsed_or_refused(text: bytes) -> None:
    """
    No input makes the path parser raise anything but L{CommandRefused}, and
    what it accepts has a local part and a domain.
    """
    try:
        address, _ = parse_path(text, 256, BAD, null_allowed=False)
    except CommandRefused:
        return
    assert address.local
    assert address.domain


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"", MailParameters()),
        (b"SIZE=0", MailParameters(size=0)),
        (b"size=1000 body=8bitmime", MailParameters(size=1000)),
        (b"BODY=7BIT MT-PRIORITY=4", MailParameters(mt_priority=Priority.VERY_HIGH)),
        (b"MT-PRIORITY=-9", MailParameters(mt_priority=Priority.VERY_LOW)),
        (b"AUTH=<> SIZE=5", MailParameters(size=5)),
        (b"AUTH=user+40example.com", MailParameters()),
    ],
)
def test_mail_parameters(text: bytes, expected: MailParameters) -> None:
    """
    SIZE, BODY, MT-PRIORITY and AUTH, in any case and order.
    """
    assert parse_mail_parameters(text, 10_000) == expected


@pytest.mark.parametrize(
    ("text", "reply", "protocol_error"),
    [
        (b"SIZE=10001", R_SIZE_EXCEEDED, False),
        (b"SIZE=-1", R_PARAMETER_SYNTAX, True),
        (b"SIZE=" + b"9" * 21, R_PARAMETER_SYNTAX, True),
        (b"SIZE", R_PARAMETER_SYNTAX, True),
        (b"BODY=BINARYMIME", R_PARAMETER_SYNTAX, True),
        (b"MT-PRIORITY=10", R_PARAMETER_SYNTAX, True),
        (b"MT-PRIORITY=\xe9", R_PARAMETER_SYNTAX, True),
        (b"BODY=7BIT body=8BITMIME", R_PARAMETER_DUPLICATE, True),
        (b"RET=HDRS", R_PARAMETER_UNKNOWN, True),
        (b"SMTPUTF8", R_PARAMETER_UNKNOWN, True),
    ],
)
def test_bad_mail_parameters(text: bytes, reply: bytes, protocol_error: bool) -> None:
    """
    Bad values get 501 5.5.4, unknown parameters 555 5.5.4, a declared size
    over the limit 552 5.3.4 (which is not a protocol error).
    """
    with pytest.raises(CommandRefused) as refused:
        parse_mail_parameters(text, 10_000)
    assert refused.value.reply == reply
    assert refused.value.protocol_error is protocol_error


def test_declared_size_at_the_limit() -> None:
    """
    SIZE equal to the limit passes.
    """
    assert parse_mail_parameters(b"SIZE=10000", 10_000).size == 10_000


@given(st.binary(max_size=200))
def test_any_parameter_text_is_parsed_or_refused(text: bytes) -> None:
    """
    No input makes the parameter parser raise anything but
    L{CommandRefused}.
    """
    try:
        parameters = parse_mail_parameters(text, 10_000)
    except CommandRefused as refused:
        reply = refused.reply
    else:
        assert parameters.size is None or 0 <= parameters.size <= 10_000
        return
    assert reply[:3] in (b"501", b"552", b"555")
