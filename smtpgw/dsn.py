"""
Delivery status notifications (bounces): RFC 3464 reports to the envelope
sender of a message that failed or is late, as pure functions.

L{build_dsn} makes a C{multipart/report; report-type=delivery-status}
message of three parts: a plain-language explanation, the
C{message/delivery-status} fields (per message, then per recipient), and the
original message's header section as C{text/rfc822-headers} (never its body).

The result is 7-bit with CRLF line ends and no line over 998 octets,
whatever the remote servers answered: non-ASCII and control characters of a
diagnostic are written as C{\\x{HEX}} (the RFC 6533 convention) in the
machine-readable part, the explanation is quoted-printable UTF-8 when it
needs to be, and so is an original header section that is not 7-bit.

L{should_send_dsn} says whether a bounce may be sent at all: never to the
null sender, never about a message that is itself a delivery report or an
automatic reply.
"""

from __future__ import annotations

import binascii
import hashlib
import re
import secrets
import textwrap
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.parser import BytesHeaderParser
from email.utils import format_datetime
from typing import Literal

from attrs import field, frozen

from smtpgw.model import Envelope

__all__ = [
    "MAX_DIAGNOSTIC_LENGTH",
    "MAX_LINE_LENGTH",
    "MAX_ORIGINAL_HEADERS",
    "DSNKind",
    "RecipientFailure",
    "auto_submitted_of",
    "build_dsn",
    "dsn_status",
    "is_delivery_report",
    "should_send_dsn",
]

DSNKind = Literal["failed", "delayed"]

#: RFC 5322 2.1.1: no line of a message may exceed 998 octets (CRLF aside).
MAX_LINE_LENGTH = 998
#: Characters of a remote reply kept in a report; the rest is cut.
MAX_DIAGNOSTIC_LENGTH = 2000
#: Octets of the original header section attached; longer sections are cut
#: at a line boundary.
MAX_ORIGINAL_HEADERS = 64 * 1024
# Lines are folded here when the text allows (RFC 5322's "SHOULD 78").
_FOLD_WIDTH = 76
# A word longer than this is split across lines to stay under the limit.
_LONGEST_WORD = 900
_MAX_REMOTE_MTA = 255

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
# An enhanced code at the start of a reply, after its 3-digit code.
_REPLY_STATUS = re.compile(r"\s*(?:[245]\d\d[ -]\s*)?([245]\.\d{1,3}\.\d{1,3})(?![\d.])")
# RFC 5322 comments (unnested is enough to find the keyword).
_COMMENT = re.compile(r"\([^()]*\)")
_SMTP_REPLY = re.compile(r"\s*[245]\d\d(?:[ -]|$)")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f.:IPv]+\]")

_SUBJECTS: dict[str, str] = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
}

# Plain-language meanings of RFC 3463 subject.detail codes.
_MEANINGS: dict[str, str] = {
    "1.1": "the mailbox does not exist",
    "1.2": "the recipient's domain does not exist",
    "1.10": "the recipient's domain does not accept mail",
    "1.3": "the recipient address is not valid",
    "2.1": "the mailbox is disabled",
    "2.2": "the mailbox is full",
    "2.3": "the message is larger than the recipient's mailbox accepts",
    "3.4": "the message is too big for the recipient's mail system",
    "4.1": "the recipient's mail server did not answer",
    "4.2": "the connection to the recipient's mail server broke off",
    "4.3": "the address of the recipient's mail server could not be looked up",
    "4.4": "no mail server could be found for the recipient's domain",
    "4.7": "the message could not be delivered in time",
    "7.1": "the recipient's mail server refused the message by its policy",
}


def _check_status(instance: object, attribute: object, value: str) -> None:
    if value and not _STATUS.fullmatch(value):
        raise ValueError(f"status must be an RFC 3463 code like 5.1.1, not {value!r}")


@frozen
class RecipientFailure:
    """
    Why one recipient of a message was not delivered.

    @ivar recipient: the address, as in the envelope.
    @ivar status: the RFC 3463 enhanced status code (C{"5.1.1"}), or C{""}
        to take it from the reply in C{diagnostic} (see L{dsn_status}).
    @ivar diagnostic: what went wrong: the remote server's reply
        (C{"550 5.1.1 <bob@example.net>: no such user"}) or, for a local
        failure, a description (C{"mx.example.net: connection refused"}).
    @ivar remote_mta: the host that answered, when one did.
    @ivar final: L{True} when no further attempt will be made (the report
        says C{failed}), L{False} while it is being retried (C{delayed}).
    @ivar last_attempt: when it was last tried (seconds since the epoch);
        the report's time when L{None}.
    """

    recipient: str
    status: str = field(default="", validator=_check_status)
    diagnostic: str = ""
    remote_mta: str | None = None
    final: bool = True
    last_attempt: float | None = None


def dsn_status(failure: RecipientFailure) -> str:
    """
    The C{Status:} of a recipient: its own status when set, else the
    enhanced code at the start of the remote reply, else C{5.0.0} for a
    final failure and C{4.0.0} for a delay.

    The class of a remote code is kept as it is: a message that expired
    after C{452 4.2.2} (mailbox full) says C{Action: failed} with
    C{Status: 4.2.2}, so that bounce processing sees a soft bounce.
    """
    if failure.status:
        return failure.status
    match = _REPLY_STATUS.match(failure.diagnostic)
    if match is not None:
        return match.group(1)
    return "5.0.0" if failure.final else "4.0.0"


def should_send_dsn(envelope: Envelope, original: bytes | None = None) -> bool:
    """
    Whether a bounce about the message of C{envelope} may be sent.

    Never to the null sender (RFC 5321 6.1: that is how bounces themselves
    are sent, so they never loop), and never about a message that is itself
    a report or a reply (L{is_delivery_report}): a bounce about a bounce
    could go back and forth. Any other message gets its bounce, including
    application mail marked C{Auto-Submitted: auto-generated}: RFC 3834
    (no automatic answers to automatic messages) is about auto-responders,
    not delivery reports (RFC 3461 and RFC 3464 decide who gets those), and
    such mail is exactly what an application needs to hear about.

    @param original: the message (its header section is enough), when known.
    """
    if envelope.sender.strip() in ("", "<>"):
        return False
    return original is None or not is_delivery_report(original)


def is_delivery_report(original: bytes) -> bool:
    """
    Whether a message is a delivery report or an automatic reply: its
    C{Content-Type} is C{multipart/report} with C{report-type=delivery-status},
    or its C{Auto-Submitted:} is C{auto-replied} (what reports, ours
    included, and auto-responders say).

    @param original: the message (its header section is enough).
    """
    headers = BytesHeaderParser().parsebytes(_header_section(original))
    if headers.get_content_type() == "multipart/report":
        report_type = headers.get_param("report-type")
        if isinstance(report_type, str) and report_type.strip().lower() == "delivery-status":
            return True
    auto_submitted = headers.get("Auto-Submitted")
    if auto_submitted is None:
        return False
    keyword = _COMMENT.sub(" ", str(auto_submitted)).split(";", 1)[0].strip().lower()
    return keyword == "auto-replied"


def auto_submitted_of(original: bytes) -> str | None:
    """
    The C{Auto-Submitted:} value of a message, or L{None}.
    """
    headers = BytesHeaderParser().parsebytes(_header_section(original))
    value = headers.get("Auto-Submitted")
    return None if value is None else str(value)


def build_dsn(
    *,
    envelope: Envelope,
    original: bytes,
    failures: Sequence[RecipientFailure],
    reporting_mta: str,
    arrival_date: float,
    now: float,
    kind: DSNKind,
    message_id: str | None = None,
    retry_until: float | None = None,
) -> bytes:
    """
    An RFC 3464 delivery status notification to the envelope sender.

    @param envelope: the message's envelope; the report goes to its sender.
    @param original: the message as accepted; only its header section is
        attached.
    @param failures: the recipients to report on, and only those (a partial
        failure lists the failed recipients, not the delivered ones).
    @param reporting_mta: the gateway's host name (C{Reporting-MTA},
        C{From: MAILER-DAEMON@...}).
    @param arrival_date: when the message was accepted.
    @param now: the report's C{Date:}.
    @param kind: C{"failed"} for a bounce (at least one final failure),
        C{"delayed"} for a warning (no final failure).
    @param message_id: the report's C{Message-ID:}; a fresh one when L{None}.
    @param retry_until: for delayed recipients, when retrying stops
        (C{Will-Retry-Until:}).
    @return: the message, CRLF-terminated lines, 7-bit, none over 998 octets.
    @raise ValueError: for an empty C{failures}, a C{kind} that contradicts
        them, a null sender, or a sender or host name that cannot be written
        in a header.
    """
    _validate(envelope, failures, reporting_mta, kind)
    if message_id is None:
        message_id = f"<{secrets.token_hex(12)}.{envelope.queue_id}@{reporting_mta}>"
    elif not message_id.isascii() or not message_id.isprintable():
        raise ValueError(f"invalid Message-ID {message_id!r}")

    human = _human_part(envelope, failures, reporting_mta, arrival_date, kind, retry_until)
    status = _status_part(envelope, failures, reporting_mta, arrival_date, now, retry_until)
    headers = _headers_part(original)
    boundary = _boundary(message_id, [human, status, headers])

    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{envelope.sender}>",
        f"Subject: {_SUBJECTS[kind]}",
        f"Date: {_date(now)}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]
    out = _crlf(lines)
    for part in (human, status, headers):
        out += f"--{boundary}\r\n".encode() + part
    out += f"--{boundary}--\r\n".encode()
    return out


def _validate(
    envelope: Envelope,
    failures: Sequence[RecipientFailure],
    reporting_mta: str,
    kind: str,
) -> None:
    if kind not in _SUBJECTS:
        raise ValueError(f"kind must be 'failed' or 'delayed', not {kind!r}")
    if not failures:
        raise ValueError("a DSN reports on at least one recipient")
    finals = [f.final for f in failures]
    if kind == "failed" and not any(finals):
        raise ValueError("a 'failed' DSN needs at least one final failure")
    if kind == "delayed" and any(finals):
        raise ValueError("a 'delayed' DSN cannot report a final failure")
    if not should_send_dsn(envelope):
        raise ValueError("no DSN is sent to the null sender")
    if not _is_header_safe(envelope.sender) or "<" in envelope.sender or ">" in envelope.sender:
        raise ValueError(f"sender {envelope.sender!r} cannot be written in a header")
    if not _HOST.fullmatch(reporting_mta):
        raise ValueError(f"reporting MTA {reporting_mta!r} is not a host name")


def _is_header_safe(text: str) -> bool:
    return text.isascii() and text.isprintable() and len(text) <= _LONGEST_WORD


def _crlf(lines: Iterable[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("ascii")


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, UTC))


# -- text helpers -------------------------------------------------------------


def _one_line(text: str, limit: int = MAX_DIAGNOSTIC_LENGTH) -> str:
    """
    C{text} on one line (a multi-line reply's lines joined by spaces, runs
    of white space made one), cut at C{limit} characters.
    """
    joined = " ".join(text.split())
    if len(joined) > limit:
        joined = joined[:limit] + " [...]"
    return joined


def _reply_lines(text: str) -> list[str]:
    """
    The lines of a (multi-line) reply for people to read, white space
    made single, L{MAX_DIAGNOSTIC_LENGTH} characters in all.
    """
    out: list[str] = []
    budget = MAX_DIAGNOSTIC_LENGTH
    for raw in text.splitlines():
        line = " ".join(raw.split())
        if not line:
            continue
        if len(line) > budget:
            out.append(line[:budget] + " [...]")
            break
        budget -= len(line)
        out.append(line)
    return out


def _escape(text: str, keep_non_ascii: bool) -> str:
    """
    Controls (and, unless kept, non-ASCII characters and the backslash that
    would make the escapes ambiguous) as C{\\x{HEX}}.
    """
    out = []
    for ch in text:
        printable = ch.isprintable() and (keep_non_ascii or (ch.isascii() and ch != "\\"))
        out.append(ch if printable else f"\\x{{{ord(ch):X}}}")
    return "".join(out)


def _ascii_text(text: str, limit: int = MAX_DIAGNOSTIC_LENGTH) -> str:
    return _escape(_one_line(text, limit), keep_non_ascii=False)


def _split_long(words: Iterable[str]) -> list[str]:
    out: list[str] = []
    for word in words:
        out.extend(word[i : i + _LONGEST_WORD] for i in range(0, len(word), _LONGEST_WORD))
    return out


def _fold(name: str, value: str) -> list[str]:
    """
    A header field folded at spaces near L{_FOLD_WIDTH}; a word too long
    for a line of its own is split (which adds a space when unfolded).
    """
    lines: list[str] = []
    current = f"{name}:"
    for word in _split_long(value.split()):
        if len(current) + 1 + len(word) > _FOLD_WIDTH and current.strip() != f"{name}:":
            lines.append(current)
            current = ""
        current += " " + word
    lines.append(current)
    return lines


def _wrap(text: str, indent: str = "") -> list[str]:
    words = " ".join(_split_long(text.split()))
    return textwrap.wrap(
        words,
        width=_FOLD_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


def _address(address: str) -> str:
    """
    A recipient as an RFC 3464 address: C{rfc822;} for ASCII, C{utf-8;}
    with RFC 6533 escapes otherwise.
    """
    if address.isascii() and address.isprintable():
        return f"rfc822; {_ascii_text(address)}"
    return f"utf-8; {_ascii_text(address)}"


def _diagnostic(failure: RecipientFailure) -> str:
    kind = "smtp" if _SMTP_REPLY.match(failure.diagnostic) else "X-smtpgw"
    return f"{kind}; {_ascii_text(failure.diagnostic)}"


def _meaning(status: str, final: bool) -> str:
    _, subject, detail = status.split(".")
    meaning = _MEANINGS.get(f"{int(subject)}.{int(detail)}")
    if meaning is not None:
        return meaning
    if status.startswith("5"):
        return "the message was refused permanently"
    return "a temporary problem" if not final else "a problem that did not go away in time"


# -- the parts -----------------------------------------------------------------


def _human_part(
    envelope: Envelope,
    failures: Sequence[RecipientFailure],
    reporting_mta: str,
    arrival_date: float,
    kind: str,
    retry_until: float | None,
) -> bytes:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    failed = [f for f in failures if f.final]
    delayed = [f for f in failures if not f.final]
    if failed:
        lines += _wrap(
            "I'm sorry to have to tell you that your message could not be delivered "
            "to the recipients below. No further attempts will be made."
        )
        lines.append("")
        lines += _human_recipients(failed)
    if delayed:
        until = f" until {_date(retry_until)}" if retry_until is not None else ""
        lines += _wrap(
            "Your message has not been delivered yet to the recipients below. "
            f"The mail system will keep trying{until}. You do not need to send it "
            "again; you will be told if delivery finally fails."
        )
        lines.append("")
        lines += _human_recipients(delayed)
    lines += [
        "About your message:",
        *_wrap(f"Sender: <{envelope.sender}>", "    "),
        f"    Queue ID: {envelope.queue_id}",
        f"    Received: {_date(arrival_date)}",
        "",
        "The message's headers are attached below.",
    ]
    text = "\r\n".join(lines) + "\r\n"
    if text.isascii():
        return _crlf(["Content-Type: text/plain; charset=us-ascii", "", *lines])
    encoded = binascii.b2a_qp("\n".join(lines).encode() + b"\n", istext=True)
    return _crlf(
        [
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
            "",
        ]
    ) + encoded.replace(b"\r", b"=0D").replace(b"\n", b"\r\n")


def _human_recipients(failures: Sequence[RecipientFailure]) -> list[str]:
    lines: list[str] = []
    for failure in failures:
        status = dsn_status(failure)
        lines += _wrap(f"<{_escape(_one_line(failure.recipient, 300), True)}>")
        lines += _wrap(f"Reason: {_meaning(status, failure.final)} ({status}).", "    ")
        if failure.diagnostic:
            who = (
                f"The mail server {_escape(_one_line(failure.remote_mta, 300), True)} answered:"
                if failure.remote_mta
                else "Details:"
            )
            lines += _wrap(who, "    ")
            for reply_line in _reply_lines(failure.diagnostic):
                lines += _wrap(_escape(reply_line, True), "        ")
        lines.append("")
    return lines


def _status_part(
    envelope: Envelope,
    failures: Sequence[RecipientFailure],
    reporting_mta: str,
    arrival_date: float,
    now: float,
    retry_until: float | None,
) -> bytes:
    lines = [
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        *_fold("X-Smtpgw-Queue-ID", _ascii_text(envelope.queue_id, 200)),
        f"Arrival-Date: {_date(arrival_date)}",
    ]
    for failure in failures:
        lines.append("")
        lines += _fold("Final-Recipient", _address(failure.recipient))
        lines.append(f"Action: {'failed' if failure.final else 'delayed'}")
        lines.append(f"Status: {dsn_status(failure)}")
        if failure.remote_mta:
            lines += _fold(
                "Remote-MTA", f"dns; {_ascii_text(failure.remote_mta, _MAX_REMOTE_MTA)}"
            )
        if failure.diagnostic:
            lines += _fold("Diagnostic-Code", _diagnostic(failure))
        last = failure.last_attempt if failure.last_attempt is not None else now
        lines.append(f"Last-Attempt-Date: {_date(last)}")
        if not failure.final and retry_until is not None:
            lines.append(f"Will-Retry-Until: {_date(retry_until)}")
    return _crlf(lines)


def _header_section(original: bytes) -> bytes:
    """
    The header section of C{original}: everything before the first empty
    line (all of it when there is none).
    """
    if original.startswith((b"\r\n", b"\n")):
        return b""
    end = re.search(rb"\r?\n\r?\n", original)
    return original if end is None else original[: end.start()]


def _headers_part(original: bytes) -> bytes:
    section = _header_section(original)[: MAX_ORIGINAL_HEADERS + 1]
    lines = re.split(rb"\r?\n", section)
    if len(section) > MAX_ORIGINAL_HEADERS:
        # Cut at a line boundary; the partial last line goes.
        lines = lines[:-1]
    while lines and lines[-1] == b"":
        lines.pop()
    body = b"".join(line + b"\n" for line in lines)
    clean = all(
        len(line) <= MAX_LINE_LENGTH and re.fullmatch(rb"[\t\x20-\x7e]*", line) for line in lines
    )
    if clean:
        return b"Content-Type: text/rfc822-headers\r\n\r\n" + body.replace(b"\n", b"\r\n")
    encoded = binascii.b2a_qp(body, istext=True)
    return (
        b"Content-Type: text/rfc822-headers\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        + encoded.replace(b"\r", b"=0D").replace(b"\n", b"\r\n")
    )


def _boundary(seed: str, parts: Sequence[bytes]) -> str:
    """
    A boundary that occurs in no part. C{=_} cannot appear in
    quoted-printable text, and the hash makes a clash with the rest
    (attached headers) unlikely; a clash is detected and avoided anyway.
    """
    for attempt in range(100):
        digest = hashlib.sha256(f"{seed}/{attempt}".encode()).hexdigest()[:32]
        boundary = f"=_smtpgw_{digest}"
        marker = b"--" + boundary.encode()
        if not any(marker in part for part in parts):
            return boundary
    raise AssertionError("no free MIME boundary")  # pragma: no cover
