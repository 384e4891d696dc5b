"""
Tests for L{smtpgw.message}: assembling, checking and rewriting the message
of one SMTP transaction.
"""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.testing import StringTransport
from twisted.mail import smtp
from zope.interface import implementer

from smtpgw.message import (
    MAX_HEADER_BYTES,
    MAX_LINE_LENGTH,
    MessageAssembler,
    MessageRejected,
    make_message_id,
    received_header,
)
from smtpgw.model import Priority

RECEIVED = (
    b"Received: from client ([192.0.2.1])\r\n\tby gw (smtpgw) with ESMTPA id Q1;\r\n\tdate\r\n"
)


def twisted_lines(data: bytes) -> list[bytes]:
    """
    The lines Twisted's SMTP server hands to a message for DATA content
    C{data} (without the final "."): split on CRLF only, one leading dot
    removed.
    """
    assert data.endswith(b"\r\n")
    return [line[1:] if line.startswith(b".") else line for line in data[:-2].split(b"\r\n")]


def assemble(
    data: bytes, max_size: int = 10_000_000, **kwargs: int
) -> tuple[MessageAssembler, MessageRejected | None]:
    assembler = MessageAssembler(max_size, **kwargs)
    first: MessageRejected | None = None
    for line in twisted_lines(data):
        try:
            assembler.line(line)
        except MessageRejected as e:
            assert first is None, "rejected twice"
            first = e
    return assembler, first


def finish(
    assembler: MessageAssembler,
    message_id: bytes | None = b"<Q1@gw.example>",
    priority: Priority = Priority.NORMAL,
) -> bytes:
    return assembler.finish(received=RECEIVED, message_id=message_id, priority=priority)


def has_bare_newline(data: bytes) -> bool:
    return re.search(rb"\r(?!\n)|(?<!\r)\n", data) is not None


class TestMessageRejected:
    def test_reply_bytes(self) -> None:
        """
        The reply text is the enhanced status code and the text, as bytes.
        """
        rejection = MessageRejected(552, "5.3.4", "Message size exceeds fixed limit of 10 bytes")
        assert rejection.reply_bytes() == b"5.3.4 Message size exceeds fixed limit of 10 bytes"
        assert rejection.code == 552
        assert str(rejection) == "552 5.3.4 Message size exceeds fixed limit of 10 bytes"


class TestSmuggling:
    @pytest.mark.parametrize(
        "line",
        [
            b"\n",
            b"\r",
            b"\n.",
            b".\n",
            b"\r.\r",
            b"\n.\n",
            b"\r.",
            b"text\nMAIL FROM:<evil@example.org>",
            b"text\r",
            b"\rtext",
            b"a\rb",
            b"Subject: x\nBcc: victim@example.org",
        ],
    )
    def test_bare_cr_or_lf_in_a_line(self, line: bytes) -> None:
        """
        Any CR or LF left inside a line (Twisted split on CRLF only) refuses
        the message with 550 5.6.0.
        """
        assembler = MessageAssembler(10_000)
        with pytest.raises(MessageRejected) as info:
            assembler.line(line)
        assert info.value.code == 550
        assert info.value.status == "5.6.0"
        assert b"bare CR or LF" in info.value.reply_bytes()

    @pytest.mark.parametrize(
        "data",
        [
            b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<evil@example.org>\r\n",
            b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@example.org>\r\n",
            b"Subject: x\r\n\r\nhi\r.\rMAIL FROM:<evil@example.org>\r\n",
            b"Subject: x\r\n\r\nhi\r\n.\nMAIL FROM:<evil@example.org>\r\n",
            b"Subject: x\r\n\r\nhi\r\n.\rMAIL FROM:<evil@example.org>\r\n",
            b"Subject: x\r\n\r\nhi\n\r\n",
            b"Subject: x\r\n\r\n\rhi\r\n",
        ],
    )
    def test_smuggling_payloads_as_twisted_delivers_them(self, data: bytes) -> None:
        """
        The known SMTP smuggling end-of-data variants, split as Twisted
        splits them, refuse the message and can never be finished.
        """
        assembler, rejection = assemble(data)
        assert rejection is not None
        assert rejection.status == "5.6.0"
        with pytest.raises(MessageRejected):
            finish(assembler)

    def test_nul_byte(self) -> None:
        """
        A NUL byte refuses the message with 550 5.6.0.
        """
        assembler = MessageAssembler(10_000)
        with pytest.raises(MessageRejected) as info:
            assembler.line(b"a\0b")
        assert (info.value.code, info.value.status) == (550, "5.6.0")
        assert b"NUL" in info.value.reply_bytes()


class TestRejectedStaysRejected:
    def test_later_lines_ignored_and_counted(self) -> None:
        """
        After a rejection, further lines raise nothing, store nothing and are
        still counted; finish() raises the same rejection.
        """
        assembler = MessageAssembler(10_000)
        assembler.line(b"Subject: x")
        assembler.line(b"")
        assembler.line(b"body")
        with pytest.raises(MessageRejected) as info:
            assembler.line(b"bad\n")
        assert assembler.rejection is info.value
        assembler.line(b"more")
        assembler.line(b"x" * 5000)
        assert assembler.stored_bytes == 0
        assert assembler.size == (10 + 2) + 2 + (4 + 2) + (4 + 2) + (4 + 2) + 5002
        with pytest.raises(MessageRejected) as again:
            finish(assembler)
        assert again.value is info.value


class TestLineLength:
    def test_default_is_rfc5322(self) -> None:
        """
        The default limit is RFC 5322's 998 octets.
        """
        assert MessageAssembler(10).max_line_length == MAX_LINE_LENGTH == 998

    def test_at_limit_accepted(self) -> None:
        """
        A line of exactly max_line_length octets is accepted and kept.
        """
        assembler = MessageAssembler(10_000)
        assembler.line(b"")
        assembler.line(b"x" * 998)
        assert finish(assembler).endswith(b"\r\n\r\n" + b"x" * 998 + b"\r\n")

    def test_one_past_limit_rejected(self) -> None:
        """
        A line of max_line_length + 1 octets refuses the message with 550
        5.6.0 naming the limit.
        """
        assembler = MessageAssembler(10_000)
        with pytest.raises(MessageRejected) as info:
            assembler.line(b"x" * 999)
        assert (info.value.code, info.value.status) == (550, "5.6.0")
        assert b"line too long" in info.value.reply_bytes()
        assert b"998" in info.value.reply_bytes()

    def test_configurable(self) -> None:
        """
        A larger configured limit applies at the limit and one past it, in
        headers as in the body.
        """
        assembler = MessageAssembler(100_000, max_line_length=4096)
        assembler.line(b"X-Long: " + b"a" * (4096 - 8))
        assembler.line(b"")
        assembler.line(b"b" * 4096)
        with pytest.raises(MessageRejected, match="4096"):
            assembler.line(b"b" * 4097)


class TestSize:
    @staticmethod
    def fill(assembler: MessageAssembler, total: int) -> None:
        """
        Feed lines whose sizes (length + CRLF) add up to C{total}.
        """
        assembler.line(b"")
        remaining = total - 2
        while remaining > 0:
            chunk = min(remaining, 900)
            assembler.line(b"x" * (chunk - 2))
            remaining -= chunk

    def test_counts_crlf(self) -> None:
        """
        Every line counts its length plus 2 octets for its CRLF, as the SIZE
        extension declares sizes.
        """
        assembler = MessageAssembler(1000)
        assembler.line(b"Subject: hi")
        assembler.line(b"")
        assembler.line(b"body")
        assert assembler.size == 13 + 2 + 6

    def test_exactly_max_size_accepted(self) -> None:
        """
        A message of exactly max_size octets is accepted.
        """
        assembler = MessageAssembler(10_000)
        self.fill(assembler, 10_000)
        assert assembler.size == 10_000
        assert finish(assembler)

    def test_one_past_max_size_rejected(self) -> None:
        """
        A message of max_size + 1 octets is refused with 552 5.3.4 and the
        limit in the text.
        """
        assembler = MessageAssembler(10_000)
        with pytest.raises(MessageRejected) as info:
            self.fill(assembler, 10_001)
        assert (info.value.code, info.value.status) == (552, "5.3.4")
        assert info.value.reply_bytes() == b"5.3.4 Message size exceeds fixed limit of 10000 bytes"

    def test_nothing_stored_after_size_exceeded(self) -> None:
        """
        Once over the limit, the body is dropped and what follows is counted
        but not kept.
        """
        assembler = MessageAssembler(1000)
        assembler.line(b"")
        assembler.line(b"x" * 900)
        with pytest.raises(MessageRejected):
            assembler.line(b"x" * 900)
        for _ in range(100):
            assembler.line(b"y" * 900)
        assert assembler.stored_bytes == 0
        assert assembler.size == 2 + 902 * 102


class TestHeaders:
    def test_unfolding(self) -> None:
        """
        Folded fields are unfolded: the CRLFs go, the whitespace stays, the
        value is stripped; names keep their case.
        """
        assembler, _ = assemble(
            b"Subject: a long\r\n  subject\r\n\tline\r\nFrom: A <a@example.com>\r\n"
            b"\r\nbody: not a header\r\n"
        )
        assert assembler.headers == [
            ("Subject", "a long  subject\tline"),
            ("From", "A <a@example.com>"),
        ]
        assert assembler.headers_complete

    def test_obsolete_space_before_colon(self) -> None:
        """
        "Name : value" (RFC 5322 obsolete syntax) is a field named Name.
        """
        assembler, _ = assemble(b"Subject : hi\r\n\r\n")
        assert assembler.headers == [("Subject", "hi")]

    def test_eight_bit_header_decoded_with_replacement(self) -> None:
        """
        UTF-8 header values are decoded; invalid octets become U+FFFD instead
        of raising.
        """
        assembler, _ = assemble("Subject: Grüße\r\n".encode() + b"X-Bad: \xff\r\n\r\n")
        assert assembler.headers == [("Subject", "Grüße"), ("X-Bad", "\ufffd")]

    def test_headers_in_progress(self) -> None:
        """
        Before the empty line, the fields so far are visible and the section
        is not complete.
        """
        assembler = MessageAssembler(1000)
        assembler.line(b"Subject: hi")
        assert assembler.headers == [("Subject", "hi")]
        assert not assembler.headers_complete
        assembler.line(b"")
        assert assembler.headers_complete

    def test_header_bytes_at_limit_accepted(self) -> None:
        """
        A header section of exactly max_header_bytes octets (CRLFs counted) is
        accepted.
        """
        assembler = MessageAssembler(10_000, max_header_bytes=100)
        assembler.line(b"X-A: " + b"a" * 93)
        assembler.line(b"")
        assert assembler.headers == [("X-A", "a" * 93)]

    def test_header_bytes_one_past_limit_rejected(self) -> None:
        """
        One octet more in the header section refuses the message with 552
        5.3.4, also when the excess is in a continuation line.
        """
        assembler = MessageAssembler(10_000, max_header_bytes=100)
        with pytest.raises(MessageRejected) as info:
            assembler.line(b"X-A: " + b"a" * 94)
        assert (info.value.code, info.value.status) == (552, "5.3.4")
        assert b"header" in info.value.reply_bytes()
        assembler = MessageAssembler(10_000, max_header_bytes=100)
        assembler.line(b"X-A: " + b"a" * 50)
        with pytest.raises(MessageRejected):
            assembler.line(b" " + b"b" * 42)

    def test_default_header_limit(self) -> None:
        """
        The default header limit is 256 KiB.
        """
        assert MessageAssembler(10).max_header_bytes == MAX_HEADER_BYTES == 256 * 1024

    def test_body_size_does_not_count_against_header_limit(self) -> None:
        """
        The header limit applies to the header section only.
        """
        assembler = MessageAssembler(10_000, max_header_bytes=20)
        assembler.line(b"Subject: hi")
        assembler.line(b"")
        for _ in range(10):
            assembler.line(b"x" * 100)
        assert assembler.rejection is None


class TestFinish:
    def test_layout(self) -> None:
        """
        Received first, original fields byte for byte (folding kept), then
        X-Priority and Message-ID, the empty line and the body as received.
        """
        assembler, _ = assemble(
            b"From: a@example.com\r\nSubject: folded\r\n  on two lines\r\n"
            b"\r\nHello\r\n\r\n.leading dot\r\n"
        )
        assert finish(assembler, b"<Q1@gw.example>", Priority.HIGH) == (
            RECEIVED + b"From: a@example.com\r\nSubject: folded\r\n  on two lines\r\n"
            b"X-Priority: 2\r\nMessage-ID: <Q1@gw.example>\r\n"
            b"\r\nHello\r\n\r\nleading dot\r\n"
        )

    @pytest.mark.parametrize("name", [b"X-SMTPAPI", b"x-smtpapi", b"X-SmtpApi"])
    def test_smtpapi_removed_also_when_folded(self, name: bytes) -> None:
        """
        X-SMTPAPI is removed with all its continuation lines, whatever the
        case of its name.
        """
        assembler, _ = assemble(
            b"Subject: s\r\n" + name + b': {"Priority": 1,\r\n  "category":\r\n'
            b'\t"news"}\r\nTo: b@example.org\r\n\r\nbody\r\n'
        )
        out = finish(assembler)
        assert b'Priority": 1' not in out
        assert b"category" not in out
        assert b"news" not in out
        assert b"Subject: s\r\nTo: b@example.org\r\nX-Priority: 3\r\n" in out

    def test_x_priority_replaced_not_duplicated(self) -> None:
        """
        Existing X-Priority fields (any case, any number) are replaced by one
        carrying the effective priority.
        """
        assembler, _ = assemble(
            b"X-Priority: 5 (Lowest)\r\nx-priority: 4\r\nSubject: s\r\n\r\nbody\r\n"
        )
        out = finish(assembler, priority=Priority.VERY_HIGH)
        parsed = email.message_from_bytes(out, policy=email.policy.SMTP)
        assert parsed.get_all("X-Priority") == ["1"]
        assert out.lower().count(b"x-priority") == 1

    @pytest.mark.parametrize("name", [b"Message-ID", b"Message-Id", b"message-id", b"MESSAGE-ID"])
    def test_message_id_kept_when_present(self, name: bytes) -> None:
        """
        A message that has a Message-ID (any case) keeps it and gets no
        second one.
        """
        assembler, _ = assemble(name + b": <orig@client.example>\r\n\r\nbody\r\n")
        assert assembler.has_message_id
        out = finish(assembler)
        assert b"<orig@client.example>" in out
        assert b"Q1@gw.example" not in out

    def test_message_id_added_when_missing(self) -> None:
        """
        A message without Message-ID gets the given one; a Resent-Message-ID
        does not count.
        """
        assembler, _ = assemble(b"Resent-Message-ID: <r@x>\r\n\r\nbody\r\n")
        assert not assembler.has_message_id
        out = finish(assembler)
        assert b"\r\nMessage-ID: <Q1@gw.example>\r\n" in out

    def test_no_message_id_when_none_given(self) -> None:
        """
        With message_id None nothing is added.
        """
        assembler, _ = assemble(b"Subject: s\r\n\r\nbody\r\n")
        assert b"Message-ID" not in finish(assembler, message_id=None)

    def test_headerless_message_as_twisted_delivers_it(self) -> None:
        """
        Twisted feeds an empty line first when the first line has no colon:
        the message has no header fields, and its body is intact.
        """
        assembler = MessageAssembler(1000)
        for line in [b"", b"Hello world", b"", b"bye"]:
            assembler.line(line)
        assert assembler.headers == []
        out = finish(assembler, message_id=None, priority=Priority.LOW)
        assert out == RECEIVED + b"X-Priority: 4\r\n\r\nHello world\r\n\r\nbye\r\n"

    def test_non_header_line_starts_the_body(self) -> None:
        """
        A line that is neither a field nor a continuation ends the header
        section; the relayed message gets the empty line it lacked, so no
        reader takes the body for headers.
        """
        assembler, _ = assemble(b"Subject: s\r\nthis is body\r\nX-Not: header\r\n")
        assert assembler.headers == [("Subject", "s")]
        out = finish(assembler, message_id=None)
        assert out == (
            RECEIVED + b"Subject: s\r\nX-Priority: 3\r\n\r\nthis is body\r\nX-Not: header\r\n"
        )

    def test_leading_continuation_line_is_body(self) -> None:
        """
        A first line starting with whitespace continues nothing: it is body.
        """
        assembler, _ = assemble(b" indented: text\r\nmore\r\n")
        assert assembler.headers == []
        assert finish(assembler, message_id=None).endswith(
            b"X-Priority: 3\r\n\r\n indented: text\r\nmore\r\n"
        )

    def test_headers_only(self) -> None:
        """
        A message that ends inside its header section gets its empty line.
        """
        assembler, _ = assemble(b"Subject: only headers\r\n")
        assert not assembler.headers_complete
        out = finish(assembler, message_id=None)
        assert out == RECEIVED + b"Subject: only headers\r\nX-Priority: 3\r\n\r\n"

    def test_empty_message(self) -> None:
        """
        A message with no lines at all still becomes a valid message.
        """
        out = MessageAssembler(1000).finish(
            received=RECEIVED, message_id=b"<a@b>", priority=Priority.NORMAL
        )
        assert out == RECEIVED + b"X-Priority: 3\r\nMessage-ID: <a@b>\r\n\r\n"

    @pytest.mark.parametrize("received", [b"Received: x", b"Received: x\n", b"Rec\neived: x\r\n"])
    def test_bad_received_is_a_programming_error(self, received: bytes) -> None:
        """
        A Received value that is not CRLF-terminated lines is refused.
        """
        with pytest.raises(ValueError, match="CRLF"):
            MessageAssembler(10).finish(
                received=received, message_id=None, priority=Priority.NORMAL
            )

    def test_bad_message_id_is_a_programming_error(self) -> None:
        """
        A message id spanning lines is refused.
        """
        with pytest.raises(ValueError, match="one line"):
            MessageAssembler(10).finish(
                received=RECEIVED, message_id=b"<a@b>\r\nBcc: x", priority=Priority.NORMAL
            )


header_names = st.sampled_from(
    [b"Subject", b"From", b"X-SMTPAPI", b"X-Priority", b"Message-ID", b"x-priority", b"To"]
)
safe_bytes = st.binary(max_size=60).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")
)
any_line = st.binary(max_size=80)


class TestProperties:
    @given(
        fields=st.lists(
            st.tuples(header_names, safe_bytes, st.lists(safe_bytes, max_size=2)), max_size=6
        ),
        body=st.lists(any_line, max_size=10),
        message_id=st.none() | st.just(b"<Q@h>"),
        priority=st.sampled_from(list(Priority)),
    )
    def test_output_is_clean(
        self,
        fields: list[tuple[bytes, bytes, list[bytes]]],
        body: list[bytes],
        message_id: bytes | None,
        priority: Priority,
    ) -> None:
        """
        Whatever the lines, either the message is refused or the output has
        no bare CR or LF, ends with CRLF, carries exactly one X-Priority with
        the given priority, no X-SMTPAPI, and a Message-ID only added when
        there was none.
        """
        assembler = MessageAssembler(100_000)
        lines = []
        for name, value, continuations in fields:
            lines.append(name + b": " + value)
            lines.extend(b" " + c for c in continuations)
        lines.append(b"")
        lines.extend(body)
        rejected_by: bytes | None = None
        for line in lines:
            try:
                assembler.line(line)
            except MessageRejected:
                rejected_by = line
                break
        if rejected_by is not None:
            assert any(c in rejected_by for c in (b"\r", b"\n", b"\0"))
            assert assembler.rejection is not None
            return
        out = finish(assembler, message_id, priority)
        assert not has_bare_newline(out)
        assert out.endswith(b"\r\n")
        header_block = out.split(b"\r\n\r\n", 1)[0]
        header_lines = header_block.lower().split(b"\r\n")
        assert sum(h.startswith(b"x-priority:") for h in header_lines) == 1
        assert b"x-priority: %d" % priority in header_lines
        assert not any(h.startswith(b"x-smtpapi:") for h in header_lines)
        given_ids = sum(name.lower() == b"message-id" for name, _, _ in fields)
        expected_ids = given_ids or (0 if message_id is None else 1)
        assert sum(h.startswith(b"message-id:") for h in header_lines) == expected_ids
        assert out.endswith(b"".join(line + b"\r\n" for line in body))

    @given(
        st.lists(any_line.filter(lambda line: b"\r\n" not in line), max_size=20),
        st.integers(min_value=1, max_value=90),
    )
    def test_a_block_is_taken_exactly_when_each_line_would_be(
        self, lines: list[bytes], limit: int
    ) -> None:
        """
        L{MessageAssembler.body_block} takes a block of body lines (as the
        session cuts them: no line holds a CRLF) exactly when taking them one
        by one would refuse none of them, and then stores the same bytes.
        """
        block = b"".join(line + b"\r\n" for line in lines)
        by_block = MessageAssembler(100_000, max_line_length=limit)
        by_line = MessageAssembler(100_000, max_line_length=limit)
        for assembler in (by_block, by_line):
            assembler.line(b"")  # the header section ends
        refused = False
        for line in lines:
            try:
                by_line.line(line)
            except MessageRejected:
                refused = True
                break
        taken = by_block.body_block(block)
        assert taken is not refused
        if taken:
            assert finish(by_block) == finish(by_line)
            assert by_block.size == by_line.size

    @pytest.mark.parametrize(("length", "taken"), [(998, True), (999, False)])
    def test_a_block_with_a_line_at_or_past_the_limit(self, length: int, taken: bool) -> None:
        """
        A block whose longest line has 998 octets (the default limit) is
        taken; one with a 999-octet line is left to the line-by-line path,
        which refuses it.
        """
        assembler = MessageAssembler(100_000)
        assembler.line(b"")
        block = b"short\r\n" + b"x" * length + b"\r\nend\r\n"
        assert assembler.body_block(block) is taken
        assert assembler.stored_bytes == (len(block) if taken else 0)

    @given(st.lists(any_line, max_size=20))
    def test_arbitrary_lines_never_crash(self, lines: list[bytes]) -> None:
        """
        Arbitrary byte lines only ever raise MessageRejected; when accepted
        the output is clean.
        """
        assembler = MessageAssembler(2000, max_line_length=60)
        for line in lines:
            try:
                assembler.line(line)
            except MessageRejected:
                assert assembler.rejection is not None
        assert assembler.size == sum(len(line) + 2 for line in lines)
        if assembler.rejection is None:
            out = finish(assembler)
            assert not has_bare_newline(out)
            assert out.endswith(b"\r\n")
            assert isinstance(assembler.headers, list)


class TestReceivedHeader:
    WHEN = 1_700_000_000.0

    def make(self, **overrides: object) -> bytes:
        arguments: dict[str, object] = {
            "from_helo": "client.example",
            "client_ip": "192.0.2.7",
            "by_host": "gw.example",
            "queue_id": "018BCFE5700001234A",
            "username": "smtp-foo",
            "tls": False,
            "when": self.WHEN,
            "recipient": "rcpt@example.org",
        }
        arguments.update(overrides)
        return received_header(**arguments)  # type: ignore[arg-type]

    def test_layout(self) -> None:
        """
        RFC 5321 section 4.4 form, folded with CRLF + tab, ESMTPA without TLS.
        """
        assert self.make() == (
            b"Received: from client.example ([192.0.2.7])\r\n"
            b"\tby gw.example (smtpgw) with ESMTPA id 018BCFE5700001234A\r\n"
            b"\tfor <rcpt@example.org>;\r\n"
            b"\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
        )

    def test_the_date_is_the_second_of_when_whichever_came_before(self) -> None:
        """
        The date is formatted once per second: within a second every
        message shows it, the next second shows the next, and a message of
        an earlier second (a clock stepped back) shows its own.
        """
        date = email.utils.format_datetime
        for when in (self.WHEN, self.WHEN + 0.999, self.WHEN + 1, self.WHEN - 3601.5, self.WHEN):
            expected = date(datetime.fromtimestamp(when, UTC)).encode()
            assert self.make(when=when).endswith(b"\t" + expected + b"\r\n"), when

    def test_tls_is_esmtpsa(self) -> None:
        """
        Over TLS the protocol is ESMTPSA (RFC 3848).
        """
        assert b" with ESMTPSA id " in self.make(tls=True)

    def test_without_recipient(self) -> None:
        """
        Without a single recipient there is no "for" clause, and the date
        still follows a semicolon.
        """
        header = self.make(recipient=None)
        assert b"for" not in header
        assert b"id 018BCFE5700001234A;\r\n\tTue, 14 Nov 2023" in header

    def test_ipv6_address_literal(self) -> None:
        """
        IPv6 clients are written as RFC 5321 IPv6 address literals; a zone
        index is dropped.
        """
        assert b"([IPv6:2001:db8::1])" in self.make(client_ip="2001:db8::1")
        assert b"([IPv6:fe80::1])" in self.make(client_ip="fe80::1%eth0")

    def test_date_parses_back(self) -> None:
        """
        The date is RFC 5322 and means the given instant.
        """
        date = self.make().rsplit(b"\r\n\t", 1)[1].strip().decode()
        assert email.utils.parsedate_to_datetime(date).timestamp() == self.WHEN

    @pytest.mark.parametrize(
        "helo",
        [
            "evil\r\nBcc: victim@example.org",
            "evil\nX-Injected: 1",
            "a\x00b\x7f\x1b",
            "host (fake comment)",
            "h\u2028ost",
            "x" * 5000,
        ],
    )
    def test_helo_sanitized(self, helo: str) -> None:
        """
        A hostile HELO name cannot add lines, fields or comments, and is
        bounded in length.
        """
        header = self.make(from_helo=helo)
        assert not has_bare_newline(header)
        assert header.count(b"\r\n") == 4
        first = header.split(b"\r\n")[0]
        assert len(first) < 300
        assert first.startswith(b"Received: from ")
        assert first.count(b"(") == 1

    def test_empty_helo(self) -> None:
        """
        A missing HELO name is shown as unknown.
        """
        assert self.make(from_helo="").startswith(b"Received: from unknown ([192.0.2.7])")

    @pytest.mark.parametrize(
        "recipient", ["a@b\r\nBcc: x@y", "a>@b", "\x00a@b", "x" * 5000, "jörg@bücher.de"]
    )
    def test_recipient_sanitized(self, recipient: str) -> None:
        """
        The recipient cannot break out of its angle brackets or its line;
        a UTF-8 address is kept.
        """
        header = self.make(recipient=recipient)
        assert not has_bare_newline(header)
        assert header.count(b"\r\n") == 4
        line = header.split(b"\r\n")[2]
        assert line.startswith(b"\tfor <")
        assert line.endswith(b">;")
        assert line.count(b"<") == 1
        assert line.count(b">") == 1
        assert len(line) < 700

    def test_username_not_shown_by_default(self) -> None:
        """
        The username, half of a credential, is not shown unless asked for.
        """
        assert b"smtp-foo" not in self.make()
        assert b"(authenticated as smtp-foo)" in self.make(include_username=True)

    @given(
        helo=st.text(max_size=300),
        ip=st.text(max_size=60),
        by=st.text(max_size=60),
        qid=st.text(max_size=30),
        rcpt=st.none() | st.text(max_size=400),
        tls=st.booleans(),
    )
    def test_always_well_formed(
        self, helo: str, ip: str, by: str, qid: str, rcpt: str | None, tls: bool
    ) -> None:
        """
        Whatever the inputs, the field has four or five CRLF-terminated lines,
        the continuations start with a tab, and no line is over 998 octets.
        """
        header = self.make(from_helo=helo, client_ip=ip, by_host=by, queue_id=qid, recipient=rcpt)
        assert not has_bare_newline(header)
        lines = header.split(b"\r\n")
        assert lines[-1] == b""
        assert lines[0].startswith(b"Received: from ")
        assert all(line.startswith(b"\t") for line in lines[1:-1])
        assert all(len(line) <= 998 for line in lines)
        assert len(lines) - 1 == (3 if rcpt is None else 4)


class TestMakeMessageId:
    def test_format(self) -> None:
        """
        The id is <queue id@host name>.
        """
        assert make_message_id("018BCFE5700001234A", "gw.example") == (
            b"<018BCFE5700001234A@gw.example>"
        )

    @pytest.mark.parametrize(
        ("hostname", "right"),
        [
            ("", "smtpgw.invalid"),
            ("bücher.de", "xn--bcher-kva.de"),
            ("a..b.", "a.b"),
            ("bad host>\r\n", "badhost"),
        ],
    )
    def test_hostname_sanitized(self, hostname: str, right: str) -> None:
        """
        The right-hand side is always a plain ASCII domain.
        """
        assert make_message_id("Q1", hostname) == f"<Q1@{right}>".encode()

    @given(st.text(max_size=40), st.text(max_size=80))
    def test_always_one_token(self, queue_id: str, hostname: str) -> None:
        """
        Any inputs give <left@right> with no space, bracket or line break
        inside.
        """
        message_id = make_message_id(queue_id, hostname)
        assert re.fullmatch(rb"<[A-Za-z0-9_-]+@[A-Za-z0-9.-]+>", message_id)


@implementer(smtp.IMessage)
class _AssemblerSink:
    """
    The smallest IMessage over an assembler, as the session uses one.
    """

    def __init__(self, assembler: MessageAssembler) -> None:
        self.assembler = assembler

    def lineReceived(self, line: bytes) -> None:
        try:
            self.assembler.line(line)
        except MessageRejected as e:
            raise smtp.SMTPServerError(e.code, e.reply_bytes()) from e

    def eomReceived(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, assembler: MessageAssembler) -> None:
        self.assembler = assembler

    def receivedHeader(self, helo: object, origin: object, recipients: object) -> None:
        return None

    def validateFrom(self, helo: object, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> object:
        return lambda: _AssemblerSink(self.assembler)


def through_twisted(data: bytes, max_size: int = 10_000) -> tuple[bytes, MessageAssembler]:
    """
    Run one transaction with DATA content C{data} through Twisted's own SMTP
    server, in memory, and return what the server wrote and the assembler.
    """
    assembler = MessageAssembler(max_size)
    server = smtp.SMTP()
    server.delivery = _Delivery(assembler)
    server.timeout = None  # type: ignore[assignment]  # no idle timer: no reactor here
    transport = StringTransport()
    server.makeConnection(transport)
    server.dataReceived(
        b"HELO client\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
        b"DATA\r\n" + data + b".\r\nQUIT\r\n"
    )
    server.connectionLost(None)
    return transport.value(), assembler


class TestThroughTwistedSMTP:
    """
    The contract the session relies on, checked against Twisted's server:
    how it splits DATA, and that a rejection becomes the reply.
    """

    def test_smuggled_end_of_data_is_refused(self) -> None:
        """
        <LF>.<CR><LF> does not end DATA in Twisted; the assembler refuses the
        message and the smuggled command is never run.
        """
        output, assembler = through_twisted(
            b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<evil@example.org>\r\n"
        )
        assert b"550 5.6.0 Message refused: bare CR or LF" in output
        assert b"evil" not in output
        assert output.count(b"250 Sender address accepted") == 1
        assert assembler.rejection is not None

    def test_size_limit_reply(self) -> None:
        """
        An oversized message gets 552 5.3.4 from the server.
        """
        output, _ = through_twisted(b"Subject: x\r\n\r\n" + b"x" * 900 + b"\r\n", 500)
        assert b"552 5.3.4 Message size exceeds fixed limit of 500 bytes" in output

    def test_dot_stuffing_removed_and_headerless_message(self) -> None:
        """
        Lines reach the assembler un-dot-stuffed; a message whose first line
        has no colon reaches it as a headerless message.
        """
        output, assembler = through_twisted(b"Hello\r\n..dot\r\n\r\nbye\r\n")
        assert b"250 Delivery in progress" in output
        assert assembler.headers == []
        out = finish(assembler, message_id=None)
        assert out == RECEIVED + b"X-Priority: 3\r\n\r\nHello\r\n.dot\r\n\r\nbye\r\n"


# --- many body lines at once ------------------------------------------------


def _assembled(lines: list[bytes], block: bool, max_size: int = 10_000) -> bytes | str:
    """
    The message the assembler makes of a header and C{lines}, fed line by
    line or, where it takes them, as one block; or the refusal's text.
    """
    assembler = MessageAssembler(max_size=max_size, max_line_length=998)
    try:
        for line in (b"Subject: s", b""):
            assembler.line(line)
        body = b"".join(line + b"\r\n" for line in lines)
        if not (block and assembler.body_block(body)):
            for line in lines:
                assembler.line(line)
        return assembler.finish(received=b"Received: x\r\n", message_id=None, priority=Priority(3))
    except MessageRejected as rejection:
        return rejection.text


@given(
    st.lists(
        # A line never holds a CRLF: the session splits the stream there.
        st.binary(max_size=40).filter(lambda line: b"\r\n" not in line)
        | st.sampled_from([b"x" * 998, b"x" * 999, b"a\rb", b"a\nb", b"\0", b"", b"."]),
        max_size=30,
    ),
    st.integers(min_value=1024, max_value=3000),
)
def test_a_block_of_body_lines_gives_what_the_lines_one_by_one_give(
    lines: list[bytes], max_size: int
) -> None:
    """
    Whatever the lines (bare CR or LF, NUL, a line at the limit or one past
    it, the size limit), taking them as a block either does exactly what
    taking them one by one does, or takes nothing and leaves it to lines.
    (Lines as the session makes them: split at each CRLF, so none holds one.)
    """
    assert _assembled(lines, block=True, max_size=max_size) == _assembled(
        lines, block=False, max_size=max_size
    )


@pytest.mark.parametrize(
    "body",
    [
        b"a\rb\r\n",
        b"a\nb\r\n",
        b"nul\0\r\n",
        b"x" * 999 + b"\r\n",
        b"y" * 2000 + b"\r\n",
    ],
)
def test_a_block_that_needs_a_closer_look_is_not_taken(body: bytes) -> None:
    assembler = MessageAssembler(max_size=10_000, max_line_length=998)
    assembler.line(b"Subject: s")
    assembler.line(b"")
    assert not assembler.body_block(body)
    assert assembler.size == len(b"Subject: s") + 2 + 2


def test_a_block_is_taken_at_the_limits_and_not_one_past() -> None:
    """
    A 998-octet line and a block ending exactly at the size limit are taken;
    a block one octet over the size limit is not (so the line-by-line path
    refuses it on the right line). Nor is a block while the header section
    is still open.
    """
    head = len(b"Subject: s") + 2 + 2
    assembler = MessageAssembler(max_size=head + 1000 + 10, max_line_length=998)
    assert not assembler.body_block(b"too early\r\n")
    assembler.line(b"Subject: s")
    assembler.line(b"")
    assert assembler.body_block(b"x" * 998 + b"\r\n")
    assert not assembler.body_block(b"y" * 9 + b"\r\n")
    assert assembler.body_block(b"y" * 8 + b"\r\n")
    assert assembler.size == head + 1000 + 10
