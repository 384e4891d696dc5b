"""
Tests for L{smtpgw.dsn}: the RFC 3464 report's structure and fields, read
back with the C{email} package; the original headers attached without the
body; who gets a report; 7-bit output with short lines whatever the
diagnostics say.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgw.dsn import (
    MAX_DIAGNOSTIC_LENGTH,
    MAX_LINE_LENGTH,
    MAX_ORIGINAL_HEADERS,
    RecipientFailure,
    auto_submitted_of,
    build_dsn,
    dsn_status,
    is_delivery_report,
    should_send_dsn,
)
from smtpgw.model import Envelope, Priority

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600.0
MTA = "gw.example.com"
BODY_MARKER = b"THE-BODY-MUST-NOT-BE-ATTACHED"
ORIGINAL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net, carol@example.org, dave@example.test\r\n"
    b"Subject: Quarterly newsletter\r\n"
    b"Message-ID: <orig-1@example.com>\r\n"
    b"X-Long: folded\r\n"
    b" continuation\r\n"
    b"\r\n" + BODY_MARKER + b"\r\n"
    b"Second body line\r\n"
)


def envelope(sender: str = "alice@example.com", **kwargs: Any) -> Envelope:
    defaults: dict[str, Any] = {
        "queue_id": "0123456789ABCDEF",
        "list": "news",
        "username": "u1",
        "sender": sender,
        "recipients": ("bob@example.net", "carol@example.org", "dave@example.test"),
        "priority": Priority.NORMAL,
        "accepted_at": ARRIVAL,
    }
    defaults.update(kwargs)
    return Envelope(**defaults)


BOB = RecipientFailure(
    "bob@example.net",
    diagnostic="550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown",
    remote_mta="mx.example.net",
    last_attempt=NOW - 60,
)
CAROL = RecipientFailure(
    "carol@example.org",
    status="5.1.10",
    diagnostic="example.org: domain does not accept mail (null MX)",
)


def build(
    failures: list[RecipientFailure] | None = None,
    *,
    kind: str = "failed",
    original: bytes = ORIGINAL,
    **kwargs: Any,
) -> bytes:
    return build_dsn(
        envelope=kwargs.pop("env", envelope()),
        original=original,
        failures=failures if failures is not None else [BOB, CAROL],
        reporting_mta=kwargs.pop("reporting_mta", MTA),
        arrival_date=ARRIVAL,
        now=NOW,
        kind=kind,  # type: ignore[arg-type]
        **kwargs,
    )


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)


def parts(raw: bytes) -> list[EmailMessage]:
    payload = parse(raw).get_payload()
    assert isinstance(payload, list)
    return [cast(EmailMessage, part) for part in payload]


def status_blocks(raw: bytes) -> list[EmailMessage]:
    """
    The per-message block, then one block per recipient.
    """
    blocks = parts(raw)[1].get_payload()
    assert isinstance(blocks, list)
    return [cast(EmailMessage, block) for block in blocks]


def human_text(raw: bytes) -> str:
    """
    The text part, with LF line ends.
    """
    text = parts(raw)[0].get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def words(text: str) -> str:
    return " ".join(text.split())


def field(block: EmailMessage, name: str) -> str:
    value = block[name]
    assert value is not None, name
    return re.sub(r"\r?\n", "", str(value))


def check_wire_form(raw: bytes) -> None:
    """
    7-bit, every line CRLF-terminated, no line over 998 octets.
    """
    assert raw.isascii()
    assert raw.endswith(b"\r\n")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    for line in raw.split(b"\r\n"):
        assert len(line) <= MAX_LINE_LENGTH, len(line)


# -- structure and fields ---------------------------------------------------


def test_multipart_report_of_three_parts() -> None:
    """
    The report is multipart/report; report-type=delivery-status with a
    text part, a message/delivery-status part and the original headers as
    text/rfc822-headers, in that order.
    """
    raw = build()
    message = parse(raw)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in parts(raw)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message["MIME-Version"] == "1.0"
    check_wire_form(raw)


def test_top_level_headers_of_a_bounce() -> None:
    """
    From MAILER-DAEMON of the reporting MTA with a display name, To the
    envelope sender, the bounce subject, Auto-Submitted: auto-replied,
    a Message-ID and the report's Date.
    """
    message = parse(build())
    sender = message["From"]
    assert sender.addresses[0].addr_spec == f"MAILER-DAEMON@{MTA}"
    assert sender.addresses[0].display_name == "Mail Delivery System"
    assert message["To"].addresses[0].addr_spec == "alice@example.com"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert re.fullmatch(r"<[^<>@\s]+@gw\.example\.com>", message["Message-ID"])
    assert parsedate_to_datetime(message["Date"]).timestamp() == NOW


def test_message_ids_are_fresh_unless_given() -> None:
    """
    Each report gets a new Message-ID; a given one is used as is.
    """
    first = parse(build())["Message-ID"]
    second = parse(build())["Message-ID"]
    assert first != second
    assert parse(build(message_id="<given@gw.example.com>"))["Message-ID"] == (
        "<given@gw.example.com>"
    )


def test_per_message_fields() -> None:
    """
    Reporting-MTA names the gateway by DNS name; Arrival-Date is when the
    message was accepted; the queue id is an X- extension field.
    """
    block = status_blocks(build())[0]
    assert field(block, "Reporting-MTA") == f"dns; {MTA}"
    assert parsedate_to_datetime(field(block, "Arrival-Date")).timestamp() == ARRIVAL
    assert field(block, "X-Smtpgw-Queue-ID") == "0123456789ABCDEF"


def test_per_recipient_fields_of_a_remote_refusal() -> None:
    """
    A recipient refused by a remote server gets every RFC 3464 field:
    Final-Recipient, Action, Status (the reply's enhanced code),
    Remote-MTA, Diagnostic-Code (the reply) and Last-Attempt-Date.
    """
    bob = status_blocks(build())[1]
    assert field(bob, "Final-Recipient") == "rfc822; bob@example.net"
    assert field(bob, "Action") == "failed"
    assert field(bob, "Status") == "5.1.1"
    assert field(bob, "Remote-MTA") == "dns; mx.example.net"
    assert field(bob, "Diagnostic-Code") == (
        "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected: User unknown"
    )
    assert parsedate_to_datetime(field(bob, "Last-Attempt-Date")).timestamp() == NOW - 60


def test_per_recipient_fields_of_a_local_failure() -> None:
    """
    A failure found without a remote server (null MX) has its own status,
    no Remote-MTA, a non-SMTP diagnostic type, and the report's time as
    Last-Attempt-Date.
    """
    carol = status_blocks(build())[2]
    assert field(carol, "Final-Recipient") == "rfc822; carol@example.org"
    assert field(carol, "Action") == "failed"
    assert field(carol, "Status") == "5.1.10"
    assert carol["Remote-MTA"] is None
    assert field(carol, "Diagnostic-Code") == (
        "X-smtpgw; example.org: domain does not accept mail (null MX)"
    )
    assert parsedate_to_datetime(field(carol, "Last-Attempt-Date")).timestamp() == NOW


def test_human_part_explains_in_plain_words() -> None:
    """
    The text part names each failed recipient, says what the code means,
    which server answered and what it said.
    """
    text = words(human_text(build()))
    assert "could not be delivered" in text
    assert "<bob@example.net>" in text
    assert "the mailbox does not exist" in text
    assert "mx.example.net" in text
    assert "User unknown" in text
    assert "<carol@example.org>" in text
    assert "does not accept mail" in text


def test_human_part_keeps_the_lines_of_a_multiline_reply() -> None:
    """
    A multi-line reply is shown one reply line per line.
    """
    failure = RecipientFailure(
        "bob@example.net",
        diagnostic="550-5.1.1 The account does not exist.\r\n550 5.1.1 Check for typos.",
        remote_mta="mx.example.net",
    )
    raw = build([failure])
    text = human_text(raw)
    assert "        550-5.1.1 The account does not exist.\n" in text
    assert "        550 5.1.1 Check for typos.\n" in text
    assert field(status_blocks(raw)[1], "Status") == "5.1.1"


def test_delayed_report() -> None:
    """
    A delay warning has the delayed subject, Action: delayed, a 4.x.x
    status, Will-Retry-Until when given, and says the sender need not
    send again.
    """
    failure = RecipientFailure(
        "bob@example.net", diagnostic="451 4.7.1 Greylisted", remote_mta="mx", final=False
    )
    raw = build([failure], kind="delayed", retry_until=ARRIVAL + 5 * 86400)
    assert parse(raw)["Subject"] == "Delayed Mail (still being retried)"
    bob = status_blocks(raw)[1]
    assert field(bob, "Action") == "delayed"
    assert field(bob, "Status") == "4.7.1"
    until = parsedate_to_datetime(field(bob, "Will-Retry-Until")).timestamp()
    assert until == ARRIVAL + 5 * 86400
    assert "keep trying" in words(human_text(raw))
    check_wire_form(raw)


def test_partial_failure_lists_only_the_failed_recipients() -> None:
    """
    Of three recipients, the one that failed is reported; the two that
    were delivered appear nowhere in the report but the attached headers.
    """
    raw = build([BOB], original=b"Subject: hi\r\n\r\nbody\r\n")
    blocks = status_blocks(raw)
    assert len(blocks) == 2
    assert field(blocks[1], "Final-Recipient") == "rfc822; bob@example.net"
    assert b"carol@example.org" not in raw
    assert b"dave@example.test" not in raw


# -- the original headers -----------------------------------------------------


def test_original_headers_attached_body_not() -> None:
    """
    The original's header section is attached as it was; no line of its
    body is anywhere in the report.
    """
    raw = build()
    attached = parts(raw)[2]
    text = attached.get_payload(decode=True)
    assert isinstance(text, bytes)
    headers = ORIGINAL.split(b"\r\n\r\n", 1)[0]
    assert text.rstrip(b"\r\n") == headers
    assert BODY_MARKER not in raw
    assert b"Second body line" not in raw


def test_original_with_lf_line_ends() -> None:
    """
    An original with bare LF line ends still has only its headers attached,
    with CRLF.
    """
    original = ORIGINAL.replace(b"\r\n", b"\n")
    raw = build(original=original)
    assert BODY_MARKER not in raw
    assert b"Subject: Quarterly newsletter\r\n" in raw
    check_wire_form(raw)


def test_original_without_body() -> None:
    """
    An original that is all header section is attached whole.
    """
    raw = build(original=b"Subject: no body\r\nFrom: a@b\r\n")
    text = parts(raw)[2].get_payload(decode=True)
    assert isinstance(text, bytes)
    assert text.rstrip(b"\r\n") == b"Subject: no body\r\nFrom: a@b"


def test_original_without_headers() -> None:
    """
    An original that starts with its body has an empty header part.
    """
    raw = build(original=b"\r\n" + BODY_MARKER + b"\r\n")
    assert BODY_MARKER not in raw
    assert parts(raw)[2].get_content_type() == "text/rfc822-headers"


def test_eight_bit_original_headers_quoted_printable() -> None:
    """
    Original headers with 8-bit octets or an over-long line are attached
    quoted-printable, so the report stays 7-bit, and decode to the
    original octets.
    """
    headers = "Subject: Grüße\r\nX-Long: ".encode() + b"y" * 2000
    raw = build(original=headers + b"\r\n\r\n" + BODY_MARKER)
    check_wire_form(raw)
    attached = parts(raw)[2]
    assert attached["Content-Transfer-Encoding"] == "quoted-printable"
    decoded = attached.get_payload(decode=True)
    assert isinstance(decoded, bytes)
    assert decoded.replace(b"\r\n", b"\n").rstrip(b"\n") == headers.replace(b"\r\n", b"\n")


def test_original_headers_at_the_size_limit_kept_whole() -> None:
    """
    A header section of exactly L{MAX_ORIGINAL_HEADERS} octets is kept.
    """
    head = b"Subject: x\r\nX-Fill: "
    headers = head + b"z" * (MAX_ORIGINAL_HEADERS - len(head))
    assert len(headers) == MAX_ORIGINAL_HEADERS
    raw = build(original=headers + b"\r\n\r\nbody")
    decoded = parts(raw)[2].get_payload(decode=True)
    assert isinstance(decoded, bytes)
    assert decoded.replace(b"\r\n", b"\n").rstrip(b"\n") == headers.replace(b"\r\n", b"\n")


def test_original_headers_one_past_the_limit_cut_at_a_line() -> None:
    """
    One octet more and the section is cut at the last whole line.
    """
    head = b"Subject: x\r\nX-Fill: "
    headers = head + b"z" * (MAX_ORIGINAL_HEADERS + 1 - len(head))
    raw = build(original=headers + b"\r\n\r\nbody")
    decoded = parts(raw)[2].get_payload(decode=True)
    assert isinstance(decoded, bytes)
    assert decoded.rstrip(b"\r\n") == b"Subject: x"
    check_wire_form(raw)


def test_boundary_avoids_text_in_the_attached_headers() -> None:
    """
    Attached headers that contain the boundary the report would have used
    get a different boundary, and the report still parses in three parts.
    """
    message_id = "<fixed@gw.example.com>"
    usual = "=_smtpgw_" + hashlib.sha256(f"{message_id}/0".encode()).hexdigest()[:32]
    original = f"Subject: trap\r\nX-Trap: --{usual}\r\n\r\nbody".encode()
    raw = build(original=original, message_id=message_id)
    assert parse(raw).get_boundary() != usual
    assert len(parts(raw)) == 3
    assert f"--{usual}".encode() in raw


# -- who gets a report ------------------------------------------------------------


def test_no_dsn_for_the_null_sender() -> None:
    """
    A bounce is never sent to the null sender, and building one is refused.
    """
    assert not should_send_dsn(envelope(sender=""))
    assert not should_send_dsn(envelope(sender="<>"))
    with pytest.raises(ValueError, match="null sender"):
        build(env=envelope(sender=""))


def test_dsn_for_an_ordinary_sender() -> None:
    """
    An ordinary sender gets a bounce, whether the original is known or not.
    """
    assert should_send_dsn(envelope())
    assert should_send_dsn(envelope(), None)
    assert should_send_dsn(envelope(), ORIGINAL)


@pytest.mark.parametrize(
    "value", ["no", " No (comment)", "auto-generated", "Auto-Generated", "auto-notified; x=y"]
)
def test_dsn_for_application_mail_whatever_its_auto_submitted(value: str) -> None:
    """
    Application mail marked Auto-Submitted: auto-generated (or notified,
    or no) still gets its bounces: RFC 3834 is about auto-responders, and
    only reports and replies are kept from bouncing back.
    """
    original = f"Auto-Submitted: {value}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    assert should_send_dsn(envelope(), original)


@pytest.mark.parametrize(
    "value", ["auto-replied", "Auto-Replied", "auto-replied (vacation)", "AUTO-REPLIED; x=y"]
)
def test_no_dsn_about_an_automatic_reply(value: str) -> None:
    """
    A message marked Auto-Submitted: auto-replied (a report or an
    auto-responder's reply) gets no bounce.
    """
    original = f"Auto-Submitted: {value}\r\nSubject: x\r\n\r\nbody\r\n".encode()
    assert not should_send_dsn(envelope(), original)


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/report; report-type=delivery-status; boundary=b",
        'Multipart/Report; Report-Type="Delivery-Status";\r\n boundary="b"',
        "multipart/report; boundary=b; report-type=delivery-status",
    ],
)
def test_no_dsn_about_a_delivery_report(content_type: str) -> None:
    """
    A delivery status notification (multipart/report with
    report-type=delivery-status, in any case, quoted or folded) gets no
    bounce even without Auto-Submitted and from a non-null sender.
    """
    original = f"Content-Type: {content_type}\r\nSubject: x\r\n\r\n--b--\r\n".encode()
    assert is_delivery_report(original)
    assert not should_send_dsn(envelope(), original)


def test_other_reports_and_body_text_do_not_count() -> None:
    """
    A report of another type (a read receipt) is not a delivery report, and
    header-like lines in the body are not headers.
    """
    mdn = b"Content-Type: multipart/report; report-type=disposition-notification\r\n\r\n"
    assert should_send_dsn(envelope(), mdn)
    in_body = (
        b"Subject: x\r\n\r\nAuto-Submitted: auto-replied\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status\r\n"
    )
    assert not is_delivery_report(in_body)
    assert should_send_dsn(envelope(), in_body)


def test_a_report_built_here_gets_no_dsn() -> None:
    """
    The reports this module builds are recognized as delivery reports, so a
    bounce about one of them is never made, whatever its sender.
    """
    assert is_delivery_report(build())
    assert not should_send_dsn(envelope(), build())


def test_auto_submitted_of_reads_the_original_headers() -> None:
    """
    L{auto_submitted_of} finds the header in the header section only, and
    a report built here is recognized as automatic.
    """
    assert auto_submitted_of(ORIGINAL) is None
    assert auto_submitted_of(b"Auto-Submitted: auto-generated\r\n\r\nbody") == "auto-generated"
    assert auto_submitted_of(b"Subject: x\r\n\r\nAuto-Submitted: auto-replied\r\n") is None
    assert auto_submitted_of(build()) == "auto-replied"


# -- refused inputs -------------------------------------------------------------


def test_inputs_that_cannot_make_a_report_are_refused() -> None:
    """
    No failures, a kind that contradicts them, a sender that would inject
    a header, or a reporting MTA that is not a host name: ValueError.
    """
    with pytest.raises(ValueError, match="at least one"):
        build([])
    with pytest.raises(ValueError, match="final failure"):
        build([RecipientFailure("bob@example.net", final=False)], kind="failed")
    with pytest.raises(ValueError, match="final failure"):
        build([BOB], kind="delayed")
    with pytest.raises(ValueError, match="kind"):
        build(kind="bounced")
    with pytest.raises(ValueError, match="header"):
        build(env=envelope(sender="a@b\r\nBcc: victim@example.com"))
    with pytest.raises(ValueError, match="host name"):
        build(reporting_mta="gw example\r\n")


def test_recipient_failure_status_must_be_an_enhanced_code() -> None:
    """
    A status that is not an RFC 3463 code is refused at construction.
    """
    with pytest.raises(ValueError, match="RFC 3463"):
        RecipientFailure("bob@example.net", status="550")
    assert RecipientFailure("bob@example.net", status="4.4.7").status == "4.4.7"


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (RecipientFailure("r", status="5.4.7", diagnostic="550 5.1.1 x"), "5.4.7"),
        (RecipientFailure("r", diagnostic="550 5.1.1 user unknown"), "5.1.1"),
        (RecipientFailure("r", diagnostic="550-5.2.2 full\n550 5.2.2 full"), "5.2.2"),
        (RecipientFailure("r", diagnostic="5.7.1 refused"), "5.7.1"),
        (RecipientFailure("r", diagnostic="550 user unknown"), "5.0.0"),
        (RecipientFailure("r", diagnostic="550 5.1.1.1 odd"), "5.0.0"),
        (RecipientFailure("r", diagnostic=""), "5.0.0"),
        (RecipientFailure("r", diagnostic="421 try later", final=False), "4.0.0"),
        (RecipientFailure("r", diagnostic="452 4.2.2 mailbox full"), "4.2.2"),
    ],
)
def test_dsn_status(failure: RecipientFailure, expected: str) -> None:
    """
    The status is the failure's own, else the reply's enhanced code, else
    5.0.0 (final) or 4.0.0 (delayed); a 4.x.x reply of an expired message
    stays 4.x.x (a soft bounce).
    """
    assert dsn_status(failure) == expected


# -- 7-bit and line length ------------------------------------------------------


def test_non_ascii_diagnostic_stays_seven_bit() -> None:
    """
    A non-ASCII reply is escaped in the machine-readable part and shown as
    itself in the human part (quoted-printable UTF-8).
    """
    failure = RecipientFailure(
        "bob@example.net", diagnostic="550 5.1.1 Empfänger unbekannt ✉", remote_mta="mx"
    )
    raw = build([failure])
    check_wire_form(raw)
    diagnostic = field(status_blocks(raw)[1], "Diagnostic-Code")
    assert diagnostic == "smtp; 550 5.1.1 Empf\\x{E4}nger unbekannt \\x{2709}"
    human = parts(raw)[0]
    assert human.get_content_charset() == "utf-8"
    assert "Empfänger unbekannt ✉" in words(human_text(raw))


def test_non_ascii_recipient_uses_the_utf8_address_type() -> None:
    """
    A non-ASCII recipient is written as an RFC 6533 utf-8 address.
    """
    raw = build([RecipientFailure("jörg@example.de", diagnostic="550 no")])
    check_wire_form(raw)
    assert field(status_blocks(raw)[1], "Final-Recipient") == "utf-8; j\\x{F6}rg@example.de"


def test_very_long_diagnostic_is_folded_and_cut() -> None:
    """
    A huge reply (long words and long text) is folded into lines within
    the limit and cut at L{MAX_DIAGNOSTIC_LENGTH} characters.
    """
    text = "550 5.7.1 " + "x" * 5000 + " " + "word " * 2000
    raw = build([RecipientFailure("bob@example.net", diagnostic=text, remote_mta="mx")])
    check_wire_form(raw)
    diagnostic = field(status_blocks(raw)[1], "Diagnostic-Code")
    assert diagnostic.endswith("[...]")
    assert len(diagnostic) < MAX_DIAGNOSTIC_LENGTH + 100


def test_long_diagnostic_folds_at_spaces_and_unfolds_to_itself() -> None:
    """
    A long reply of ordinary words is folded only at spaces: unfolded, the
    field is the reply exactly.
    """
    text = "550 5.1.1 " + " ".join(f"word{i}" for i in range(150))
    raw = build([RecipientFailure("bob@example.net", diagnostic=text)])
    lines = [line for line in raw.split(b"\r\n") if len(line) > 78]
    assert lines == []
    assert field(status_blocks(raw)[1], "Diagnostic-Code") == f"smtp; {text}"


@settings(max_examples=200, deadline=None)
@given(
    diagnostic=st.text(max_size=3000),
    remote=st.none() | st.text(max_size=300),
    headers=st.binary(max_size=2000),
    final=st.booleans(),
)
def test_any_diagnostic_gives_a_clean_parseable_report(
    diagnostic: str, remote: str | None, headers: bytes, final: bool
) -> None:
    """
    Whatever the remote side said and whatever the original's headers
    hold, the report is 7-bit, CRLF, lines of at most 998 octets, three
    parts, one block per failed recipient, and never includes the body.
    """
    failures = [
        RecipientFailure("bob@example.net", diagnostic=diagnostic, remote_mta=remote, final=final),
        RecipientFailure("carol@example.org", diagnostic=diagnostic[::-1], final=final),
    ]
    original = headers.replace(b"\r\n\r\n", b"\r\n").replace(b"\n\n", b"\n")
    raw = build(
        failures,
        kind="failed" if final else "delayed",
        original=original + b"\r\n\r\n" + BODY_MARKER,
    )
    check_wire_form(raw)
    assert BODY_MARKER not in raw
    assert len(parts(raw)) == 3
    blocks = status_blocks(raw)
    assert [field(b, "Final-Recipient") for b in blocks[1:]] == [
        "rfc822; bob@example.net",
        "rfc822; carol@example.org",
    ]
    assert {field(b, "Action") for b in blocks[1:]} == {"failed" if final else "delayed"}
    for block in blocks[1:]:
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", field(block, "Status"))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.text(
            st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\"),
            min_size=1,
            max_size=120,
        ),
        min_size=1,
        max_size=40,
    )
)
def test_printable_ascii_diagnostic_survives_folding(words_: list[str]) -> None:
    """
    A printable ASCII reply of words no longer than a line is carried
    exactly: unfolded, Diagnostic-Code is the reply.
    """
    text = "550 5.1.1 " + " ".join(words_)
    raw = build([RecipientFailure("bob@example.net", diagnostic=text)])
    check_wire_form(raw)
    assert field(status_blocks(raw)[1], "Diagnostic-Code") == f"smtp; {text}"
