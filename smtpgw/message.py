"""
The message of one SMTP transaction, assembled from its DATA lines.

Twisted's SMTP server splits DATA on CRLF only and removes dot-stuffing, so
each line handed to L{MessageAssembler.line} comes without its CRLF. What is
left inside a line is exactly what a downstream server might read differently
(SMTP smuggling): a bare CR or LF is refused rather than passed on, as are NUL
bytes and lines longer than RFC 5322 allows.

Reply codes (RFC 5321 section 4.2, enhanced status codes RFC 3463):

  - bare CR or LF, NUL, over-long line: C{550 5.6.0} (a media/content error:
    the content cannot be relayed as it stands);
  - message over the size limit, header section over its limit:
    C{552 5.3.4} ("message too big for system").

Size accounting matches what the SIZE extension declares (RFC 1870): every
line counts as its length plus 2 for its CRLF.
"""

from __future__ import annotations

import email.utils
import math
import re
import unicodedata
from datetime import UTC, datetime

from attrs import define, field

from smtpgw.model import Priority

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_LINE_LENGTH",
    "REMOVED_HEADERS",
    "MessageAssembler",
    "MessageRejected",
    "make_message_id",
    "received_header",
]

#: RFC 5322 section 2.1.1: a line is at most 998 octets without its CRLF.
MAX_LINE_LENGTH = 998
#: The header section is parsed and kept in memory: bound it.
MAX_HEADER_BYTES = 256 * 1024
#: Control headers consumed by the gateway and never relayed (lower case).
#: C{X-Priority} is replaced by the effective priority.
REMOVED_HEADERS = frozenset({"x-smtpapi", "x-priority"})
#: Bounds on the client-supplied parts of a Received header.
MAX_HELO_SHOWN = 255
MAX_RECIPIENT_SHOWN = 320

CRLF = b"\r\n"

# RFC 5322 field-name (printable ASCII except ":"), with the obsolete
# whitespace before the colon tolerated.
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")


_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_IP_UNSAFE = re.compile(r"[^0-9A-Fa-f.:]")
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
_DOMAIN_UNSAFE = re.compile(r"[^A-Za-z0-9.\-]")


class MessageRejected(Exception):
    """
    The message cannot be accepted; the session replies with C{code} and
    L{reply_bytes}.

    @ivar code: the SMTP reply code, e.g. 552.
    @ivar status: the RFC 3463 enhanced status code, e.g. C{"5.3.4"}.
    @ivar text: the human part of the reply, printable ASCII.
    """

    def __init__(self, code: int, status: str, text: str) -> None:
        super().__init__(code, status, text)
        self.code = code
        self.status = status
        self.text = text

    def reply_bytes(self) -> bytes:
        """
        @return: the reply text after the code, as
            C{twisted.mail.smtp.SMTPServerError} wants it: C{b"5.3.4 ..."}.
        """
        return f"{self.status} {self.text}".encode("ascii", "replace")

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


def _bare_newline() -> MessageRejected:
    return MessageRejected(
        550, "5.6.0", "Message refused: bare CR or LF in message (lines must end with CRLF)"
    )


def _nul() -> MessageRejected:
    return MessageRejected(550, "5.6.0", "Message refused: NUL character in message")


def _line_too_long(limit: int) -> MessageRejected:
    return MessageRejected(
        550, "5.6.0", f"Message refused: line too long (limit is {limit} octets per line)"
    )


def _too_big(limit: int) -> MessageRejected:
    return MessageRejected(552, "5.3.4", f"Message size exceeds fixed limit of {limit} bytes")


def _header_too_big(limit: int) -> MessageRejected:
    return MessageRejected(
        552, "5.3.4", f"Message header section exceeds fixed limit of {limit} bytes"
    )


@define(eq=False)
class _Field:
    """
    One header field as received: its name and its physical lines (the
    first one, then continuation lines), without CRLF.
    """

    name: str
    lines: list[bytes]

    def value(self) -> str:
        raw = b"".join(self.lines)
        # Unfolding (RFC 5322 section 2.2.3) removes only the CRLFs, which
        # were never stored; the continuation's whitespace stays.
        raw = raw[raw.index(b":") + 1 :]
        return raw.decode("utf-8", "replace").strip()


@define(eq=False)
class MessageAssembler:
    """
    Collects the DATA lines of one transaction, refusing content that must not
    be relayed, and produces the message to relay.

    After a rejection the assembler stays rejected: further lines are only
    counted, and L{finish} raises the same rejection. Once the size limit is
    passed nothing more is stored.

    @ivar max_size: the largest message accepted, in octets (CRLF included).
    @ivar max_line_length: the longest line accepted, in octets without CRLF.
    @ivar max_header_bytes: the largest header section accepted, in octets
        (CRLF included).
    """

    max_size: int
    max_line_length: int = MAX_LINE_LENGTH
    max_header_bytes: int = MAX_HEADER_BYTES
    _size: int = field(default=0, init=False)
    _header_size: int = field(default=0, init=False)
    _rejection: MessageRejected | None = field(default=None, init=False)
    _in_headers: bool = field(default=True, init=False)
    _fields: list[_Field] = field(factory=list, init=False)
    _body: bytearray = field(factory=bytearray, init=False)

    @property
    def size(self) -> int:
        """
        Octets received so far, each line counted with its CRLF, including
        lines received after a rejection.
        """
        return self._size

    @property
    def stored_bytes(self) -> int:
        """
        Octets of body currently held in memory (zero once rejected).
        """
        return len(self._body)

    @property
    def rejection(self) -> MessageRejected | None:
        """
        The rejection raised by L{line}, if any.
        """
        return self._rejection

    @property
    def headers_complete(self) -> bool:
        """
        Whether the header section has ended (empty line or first line that
        is not a header field).
        """
        return not self._in_headers

    @property
    def headers(self) -> list[tuple[str, str]]:
        """
        The header fields received so far, unfolded, as C{(name, value)} with
        the value stripped of surrounding whitespace and decoded as UTF-8
        (undecodable octets become U+FFFD). Complete once
        L{headers_complete} or at L{finish}.
        """
        return [(f.name, f.value()) for f in self._fields]

    @property
    def has_message_id(self) -> bool:
        """
        Whether the message has a C{Message-ID} field (any case).
        """
        return any(f.name.lower() == "message-id" for f in self._fields)

    def line(self, line: bytes) -> None:
        """
        Take one DATA line, without its CRLF and already un-dot-stuffed.

        @param line: the line.
        @raise MessageRejected: when the message cannot be accepted; raised
            once, on the line that caused it.
        """
        self._size += len(line) + 2
        if self._rejection is not None:
            return
        if b"\r" in line or b"\n" in line:
            self._reject(_bare_newline())
        if b"\0" in line:
            self._reject(_nul())
        if len(line) > self.max_line_length:
            self._reject(_line_too_long(self.max_line_length))
        if self._size > self.max_size:
            self._reject(_too_big(self.max_size))
        if self._in_headers and self._header_line(line):
            return
        self._body += line
        self._body += CRLF

    def body_block(self, block: bytes) -> bool:
        """
        Take many body lines at once, when none of them needs a closer look.

        The lines are complete, already un-dot-stuffed, each ending in CRLF.
        The block is taken only when the header section is over, nothing was
        refused, it holds no NUL, no CR or LF outside a CRLF, no line over
        the limit, and it fits in the size limit: then taking it line by line
        would have stored exactly these bytes. Otherwise nothing is taken and
        the caller goes line by line, so every refusal happens as in L{line}.

        @return: whether the block was taken.
        """
        if self._in_headers or self._rejection is not None:
            return False
        if self._size + len(block) > self.max_size or b"\0" in block:
            return False
        crlf = block.count(CRLF)
        if block.count(b"\r") != crlf or block.count(b"\n") != crlf:
            return False
        # Every CR and LF is part of a CRLF here, so the lines are what lies
        # between them. (A regular expression for "a run of more than N
        # octets without CR or LF" tries every offset: ~0.6 ms for 5 KB.)
        if max(map(len, block.split(CRLF))) > self.max_line_length:
            return False
        self._size += len(block)
        self._body += block
        return True

    def _reject(self, rejection: MessageRejected) -> None:
        self._rejection = rejection
        # The rest of the message will never be relayed: let the memory go.
        self._body = bytearray()
        raise rejection

    def _header_line(self, line: bytes) -> bool:
        """
        Take a line while in the header section.

        @return: whether the line was consumed as header-section content;
            C{False} when it is the first line of the body.
        """
        if not line:
            self._in_headers = False
            return True
        if line[:1] in (b" ", b"\t"):
            if self._fields:
                self._count_header(line)
                self._fields[-1].lines.append(line)
                return True
        else:
            match = _FIELD_NAME.match(line)
            if match is not None:
                self._count_header(line)
                self._fields.append(_Field(match.group(1).decode("ascii"), [line]))
                return True
        # Neither a field nor a continuation: the body starts here without the
        # empty line; finish() supplies one so every reader agrees where.
        self._in_headers = False
        return False

    def _count_header(self, line: bytes) -> None:
        self._header_size += len(line) + 2
        if self._header_size > self.max_header_bytes:
            self._reject(_header_too_big(self.max_header_bytes))

    def finish(self, *, received: bytes, message_id: bytes | None, priority: Priority) -> bytes:
        """
        The message to relay.

        It is: C{received}; the original header fields, byte for byte, except
        C{X-SMTPAPI} and C{X-Priority}; C{X-Priority: <priority>};
        C{Message-ID: <message_id>} when given and the message has none; an
        empty line; the body as received. Every line ends with CRLF.

        @param received: the C{Received:} field(s), CRLF-terminated (see
            L{received_header}); may be empty.
        @param message_id: a message id with its angle brackets (see
            L{make_message_id}), or C{None} to add none.
        @param priority: the effective priority.
        @return: the message.
        @raise MessageRejected: when L{line} rejected the message.
        @raise ValueError: when C{received} or C{message_id} would break the
            message (a programming error in the caller).
        """
        if self._rejection is not None:
            raise self._rejection
        if received and (not received.endswith(CRLF) or _has_bare_newline(received)):
            raise ValueError("received must be CRLF-terminated lines")
        out = bytearray(received)
        for f in self._fields:
            if f.name.lower() in REMOVED_HEADERS:
                continue
            for physical in f.lines:
                out += physical
                out += CRLF
        out += b"X-Priority: %d\r\n" % int(priority)
        if message_id is not None and not self.has_message_id:
            if any(c in message_id for c in (b"\r", b"\n", b"\0")):
                raise ValueError("message_id must be one line")
            out += b"Message-ID: " + message_id + CRLF
        out += CRLF
        out += self._body
        return bytes(out)


def _has_bare_newline(data: bytes) -> bool:
    return data.count(b"\r") != data.count(CRLF) or data.count(b"\n") != data.count(CRLF)


def _printable(text: str, limit: int) -> str:
    return "".join(
        "?" if unicodedata.category(c).startswith(("C", "Z")) else c for c in text[:limit]
    )


def _host_shown(name: str, default: str) -> str:
    shown = _HOST_UNSAFE.sub("?", name.strip())[:MAX_HELO_SHOWN]
    return shown or default


def _address_literal(ip: str) -> str:
    address = _IP_UNSAFE.sub("", ip.split("%", 1)[0])[:64]
    if not address:
        return "unknown"
    if ":" in address:
        return f"[IPv6:{address}]"
    return f"[{address}]"


def received_header(
    *,
    from_helo: str,
    client_ip: str,
    by_host: str,
    queue_id: str,
    username: str,
    tls: bool,
    when: float,
    recipient: str | None,
    include_username: bool = False,
) -> bytes:
    """
    The C{Received:} field the gateway prepends (RFC 5321 section 4.4), with
    C{with ESMTPA}, or C{ESMTPSA} over TLS (RFC 3848), folded over several
    CRLF-terminated lines.

    Client-supplied text (HELO name, recipient) is stripped of control and
    space characters and bounded in length, so it cannot add lines or fields.

    @param from_helo: the HELO/EHLO argument the client gave.
    @param client_ip: the client's IP address.
    @param by_host: this gateway's host name.
    @param queue_id: the message's queue id.
    @param username: the authenticated SMTP+ user.
    @param tls: whether the session ran over TLS.
    @param when: acceptance time, seconds since the epoch.
    @param recipient: the one recipient to name in the C{for} clause (name it
        only when the transaction has exactly one), or C{None}.
    @param include_username: whether to name the user in a comment. Off by
        default: the username is half of an SMTP+ credential, and recipients
        see the header.
    @return: the field, ending with CRLF.
    """
    helo = _host_shown(from_helo, "unknown")
    by = _host_shown(by_host, "localhost")
    qid = _ID_UNSAFE.sub("", queue_id) or "unknown"
    protocol = "ESMTPSA" if tls else "ESMTPA"
    date = _received_date(when)
    first = f"Received: from {helo} ({_address_literal(client_ip)})"
    if include_username:
        first += f" (authenticated as {_HOST_UNSAFE.sub('?', username)[:64]})"
    lines = [first, f"\tby {by} (smtpgw) with {protocol} id {qid}"]
    if recipient is not None:
        rcpt = _printable(recipient, MAX_RECIPIENT_SHOWN).replace("<", "?").replace(">", "?")
        lines.append(f"\tfor <{rcpt}>;")
    else:
        lines[-1] += ";"
    lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _received_date(when: float) -> str:
    """
    The RFC 5322 date of C{when}, to the second (as the field shows it),
    formatted once per second however many messages come in it.
    """
    second = math.floor(when)
    cached = _dates[0]
    if cached[0] != second:
        cached = _dates[0] = (
            second,
            email.utils.format_datetime(datetime.fromtimestamp(second, UTC)),
        )
    return cached[1]


#: The last second L{_received_date} formatted, and its text.
_dates: list[tuple[int, str]] = [(-1, "")]


def make_message_id(queue_id: str, hostname: str) -> bytes:
    """
    A Message-ID for a message that came without one (RFC 5322 section
    3.6.4): the queue id, unique across restarts, at this host.

    @param queue_id: the message's queue id.
    @param hostname: this gateway's host name.
    @return: C{b"<queue_id@hostname>"}.
    """
    left = _ID_UNSAFE.sub("", queue_id) or "smtpgw"
    try:
        host = hostname.strip().encode("idna").decode("ascii")
    except UnicodeError:
        host = hostname.strip().encode("ascii", "ignore").decode("ascii")
    host = re.sub(r"\.{2,}", ".", _DOMAIN_UNSAFE.sub("", host)).strip(".")
    return f"<{left}@{host or 'smtpgw.invalid'}>".encode("ascii")
