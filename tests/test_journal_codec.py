"""
Tests for L{smtpgw.journal_codec}: records round-trip, and damaged or torn
bytes are always reported, never decoded as some other record.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpgw.journal_codec import (
    FORMAT_VERSION,
    MAX_META_LENGTH,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    AcceptRecord,
    CorruptRecord,
    NoopRecord,
    Payload,
    PriorityRecord,
    QueueStateRecord,
    RecordType,
    SegmentHeader,
    StateRecord,
    TruncatedRecord,
    UnsupportedRecord,
    accept_queue_id,
    decode_envelope,
    decode_record,
    decode_record_at,
    decode_segment_header,
    encode_accept,
    encode_noop,
    encode_priority,
    encode_queue_state,
    encode_record,
    encode_segment_header,
    encode_state,
    read_header,
)
from smtpgw.model import Envelope, Priority

KEY = b"\x01\x02\x03\x04\x05\x06\x07\x08"

queue_ids = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255
)
# Lone surrogates come from surrogateescape-decoded addresses: they must survive.
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=40)
finite = st.floats(allow_nan=False, allow_infinity=False)

envelopes = st.builds(
    Envelope,
    queue_id=queue_ids,
    list=any_text,
    username=any_text,
    sender=any_text,
    recipients=st.lists(any_text, max_size=5).map(tuple),
    priority=st.sampled_from(Priority),
    accepted_at=finite,
    client_ip=any_text,
    size=st.integers(min_value=0, max_value=2**40),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)
state_records = st.builds(
    StateRecord,
    queue_id=queue_ids,
    state=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20),
    attempts=st.integers(min_value=0, max_value=2**32 - 1),
    next_attempt_at=finite,
    details=st.dictionaries(any_text, json_values, max_size=3),
)
progress_records = st.builds(
    StateRecord,
    queue_id=queue_ids,
    state=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20),
    attempts=st.integers(min_value=0, max_value=2**32 - 1),
    next_attempt_at=finite,
    details=st.dictionaries(
        any_text.filter(lambda k: k not in ("remaining", "bounced")), json_values, max_size=3
    ),
    remaining=st.lists(any_text, max_size=5).map(tuple),
    bounced=st.lists(any_text, max_size=5).map(tuple),
)
queue_records = st.builds(QueueStateRecord, paused=st.booleans())
accept_records = st.builds(
    AcceptRecord, envelope=envelopes, body=st.binary(max_size=300), copy=st.booleans()
)
priority_records = st.builds(
    PriorityRecord, queue_id=queue_ids, priority=st.sampled_from(Priority)
)
records = (
    accept_records
    | state_records
    | progress_records
    | priority_records
    | queue_records
    | st.just(NoopRecord())
)
keys = st.binary(min_size=8, max_size=8)


def _encode(record: Any) -> Payload:
    """
    @return: the payload that should decode back to C{record}.
    """
    if isinstance(record, AcceptRecord):
        return encode_accept(record.envelope, record.body, copy=record.copy)
    if isinstance(record, StateRecord):
        return encode_state(
            record.queue_id,
            record.state,
            record.attempts,
            record.next_attempt_at,
            record.details,
            remaining=record.remaining,
            bounced=record.bounced,
        )
    if isinstance(record, PriorityRecord):
        return encode_priority(record.queue_id, record.priority)
    if isinstance(record, QueueStateRecord):
        return encode_queue_state(record.paused)
    return encode_noop()


def _sample_accept(body: bytes = b"Subject: hi\r\n\r\nhello\r\n") -> bytes:
    envelope = Envelope(
        queue_id="0190A1B2C3D4E5F6",
        list="news",
        username="u1",
        sender="a@example.com",
        recipients=("b@example.org", "c@example.org"),
        priority=Priority.HIGH,
        accepted_at=1712345678.25,
        client_ip="192.0.2.7",
        size=len(body),
    )
    return encode_record(KEY, encode_accept(envelope, body))


def _with_header_fields(data: bytes, **changes: int) -> bytes:
    """
    @return: C{data} with some header fields changed and the header
        checksum recomputed, i.e. an intact record a future writer could make.
    """
    names = ["key", "version", "type", "flags", "meta_length", "body_length"]
    names += ["meta_crc", "body_crc", "header_crc"]
    fields = dict(zip(names, struct.unpack_from("<8sBBHIIIII", data), strict=True))
    fields.update(changes)
    head = struct.pack("<8sBBHIIIII", *fields.values())[:28]
    return head + zlib.crc32(head).to_bytes(4, "little") + data[RECORD_HEADER_SIZE:]


@given(records, keys)
def test_every_record_type_round_trips(record: Any, key: bytes) -> None:
    """
    What is encoded decodes back to an equal record, for every record type.
    """
    assert decode_record(encode_record(key, _encode(record)), key) == record


@given(st.lists(records, max_size=6), keys)
def test_records_back_to_back_decode_in_order(record_list: list[Any], key: bytes) -> None:
    """
    Records appended one after another decode one after another, each
    reporting where the next starts.
    """
    data = b"".join(encode_record(key, _encode(r)) for r in record_list)
    offset = 0
    found = []
    while offset < len(data):
        record, offset = decode_record_at(data, offset, key, len(data))
        found.append(record)
    assert found == record_list
    assert offset == len(data)


@settings(max_examples=50)
@given(records, keys)
def test_every_truncation_is_reported_as_truncated(record: Any, key: bytes) -> None:
    """
    Any prefix of a record (a torn write) is reported as truncated.
    """
    data = encode_record(key, _encode(record))
    for length in range(len(data)):
        with pytest.raises(TruncatedRecord):
            decode_record(data[:length], key)


@given(records, keys, st.data())
def test_any_bit_flip_is_reported_as_corrupt(record: Any, key: bytes, data: st.DataObject) -> None:
    """
    Flipping one to three bits anywhere in a record (header, lengths,
    checksums, metadata, body) is always detected: the checksums cover
    every byte and CRC-32 detects every error of up to three bits in
    records of this size.
    """
    encoded = bytearray(encode_record(key, _encode(record)))
    bits = data.draw(
        st.sets(st.integers(0, len(encoded) * 8 - 1), min_size=1, max_size=3), label="bits"
    )
    for bit in bits:
        encoded[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CorruptRecord):
        decode_record(bytes(encoded), key)


def test_every_single_bit_flip_of_an_accept_record_is_detected() -> None:
    """
    Exhaustively: each of the bits of an accept record, flipped alone,
    makes decoding fail with L{CorruptRecord}.
    """
    data = _sample_accept()
    for bit in range(len(data) * 8):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptRecord):
            decode_record(bytes(damaged), KEY)


@given(records, keys, st.binary(min_size=1, max_size=64))
def test_bytes_after_a_record_are_refused(record: Any, key: bytes, garbage: bytes) -> None:
    """
    L{decode_record} decodes exactly one record: trailing bytes are damage.
    """
    with pytest.raises(CorruptRecord):
        decode_record(encode_record(key, _encode(record)) + garbage, key)


def test_record_from_another_segment_is_refused() -> None:
    """
    A record carrying another segment's key is not taken for one of this
    segment's, even though it is intact.
    """
    with pytest.raises(CorruptRecord, match="key"):
        decode_record(_sample_accept(), b"\x00" * 8)


def test_record_inside_a_message_body_is_not_a_record_of_the_segment() -> None:
    """
    A client can put bytes that look like a journal record in a message;
    without the segment's key they never decode as a record of the segment.
    """
    forged_key = b"\xff" * 8
    forged = encode_record(forged_key, encode_state("0190A1B2C3D4E5F6", "cancelled"))
    data = _sample_accept(body=forged)
    start = data.index(forged)
    with pytest.raises(CorruptRecord):
        decode_record_at(data, start, KEY, len(data))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("version", FORMAT_VERSION + 1, "version"),
        ("type", 99, "type"),
        ("flags", 1, "flags"),
    ],
)
def test_intact_record_of_unknown_format_is_unsupported(
    field: str, value: int, message: str
) -> None:
    """
    A record with valid checksums but a newer version, an unknown type or
    flags is reported as unsupported (not as damage that could be skipped).
    """
    data = _with_header_fields(_sample_accept(), **{field: value})
    with pytest.raises(UnsupportedRecord, match=message):
        decode_record(data, KEY)


def test_intact_header_with_absurd_metadata_length_is_corrupt() -> None:
    """
    A metadata length over L{MAX_META_LENGTH} is refused before anything
    that long is read.
    """
    data = _with_header_fields(_sample_accept(), meta_length=MAX_META_LENGTH + 1)
    with pytest.raises(CorruptRecord, match="metadata length"):
        read_header(data, 0, KEY, 2**40)


@pytest.mark.parametrize(
    "rtype",
    [
        RecordType.STATE,
        RecordType.PROGRESS,
        RecordType.PRIORITY,
        RecordType.NOOP,
        RecordType.QUEUE,
    ],
)
def test_records_without_bodies_refuse_a_body(rtype: RecordType) -> None:
    """
    Only ACCEPT records have a body; any other type with one is damage.
    """
    payload = Payload(rtype, encode_state("Q1", "queued").meta, b"x")
    with pytest.raises(CorruptRecord):
        decode_record(encode_record(KEY, payload), KEY)


def test_header_is_checked_without_the_payload() -> None:
    """
    L{read_header} gives the lengths and checksums of a record so replay can
    skip bodies; the metadata starts right after the header.
    """
    data = _sample_accept()
    header = read_header(data, 0, KEY, len(data))
    assert header.type is RecordType.ACCEPT
    assert header.length == len(data)
    meta = data[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + header.meta_length]
    assert zlib.crc32(meta) == header.meta_crc
    assert accept_queue_id(meta) == "0190A1B2C3D4E5F6"
    assert decode_envelope(meta).recipients == ("b@example.org", "c@example.org")


def test_queue_id_length_limit() -> None:
    """
    Queue ids are up to 255 ASCII bytes: 255 is accepted, 256 refused.
    """
    assert decode_record(encode_record(KEY, encode_state("Q" * 255, "held")), KEY) == (
        StateRecord("Q" * 255, "held")
    )
    with pytest.raises(ValueError, match="queue id"):
        encode_state("Q" * 256, "held")
    with pytest.raises(ValueError, match="queue id"):
        encode_state("", "held")
    with pytest.raises(ValueError, match="ASCII"):
        encode_priority("Q\u00e9", Priority.LOW)


def test_attempts_limit() -> None:
    """
    Attempt counts are unsigned 32-bit: the largest is kept, one more and a
    negative count are refused.
    """
    top = 2**32 - 1
    record = decode_record(encode_record(KEY, encode_state("Q", "deferred", top)), KEY)
    assert isinstance(record, StateRecord)
    assert record.attempts == top
    for bad in (top + 1, -1):
        with pytest.raises(ValueError, match="attempts"):
            encode_state("Q", "deferred", bad)


@pytest.mark.parametrize("when", [float("nan"), float("inf")])
def test_times_must_be_finite(when: float) -> None:
    """
    A retry time or acceptance time that is not a finite number is a bug:
    refused rather than written.
    """
    with pytest.raises(ValueError, match="finite"):
        encode_state("Q", "deferred", 1, when)
    envelope = Envelope("Q", "l", "u", "s@x", ("r@x",), Priority.NORMAL, when)
    with pytest.raises(ValueError, match="finite"):
        encode_accept(envelope, b"")


def test_metadata_length_limit() -> None:
    """
    Metadata of exactly L{MAX_META_LENGTH} bytes is accepted; one byte more
    is refused when encoding.
    """
    fixed = len(encode_state("Q", "held", details={"x": ""}).meta)
    at_limit = encode_state("Q", "held", details={"x": "a" * (MAX_META_LENGTH - fixed)})
    assert len(at_limit.meta) == MAX_META_LENGTH
    record = decode_record(encode_record(KEY, at_limit), KEY)
    assert isinstance(record, StateRecord)
    with pytest.raises(ValueError, match="metadata"):
        encode_state("Q", "held", details={"x": "a" * (MAX_META_LENGTH - fixed + 1)})


def test_copied_payload_keeps_its_body_checksum() -> None:
    """
    A payload built with an explicit body checksum keeps it, so copying a
    damaged body forward never gives it a fresh, matching checksum.
    """
    good = encode_accept(Envelope("Q", "l", "u", "s@x", (), Priority.LOW, 1.0), b"body")
    copy = Payload(good.type, good.meta, b"bodY", good.meta_crc, good.body_crc)
    with pytest.raises(CorruptRecord, match="body checksum"):
        decode_record(encode_record(KEY, copy), KEY)


@given(st.integers(min_value=0, max_value=2**64 - 1), keys)
def test_segment_header_round_trips(number: int, key: bytes) -> None:
    """
    A segment header gives back its number and key.
    """
    data = encode_segment_header(number, key)
    assert len(data) == SEGMENT_HEADER_SIZE
    assert decode_segment_header(data) == SegmentHeader(number, key)


def test_segment_header_damage_is_reported() -> None:
    """
    A short segment header is truncated; a wrong magic number or any flipped
    bit is corrupt; an intact header of another version is unsupported.
    """
    data = encode_segment_header(7, KEY)
    for length in range(len(data)):
        with pytest.raises(TruncatedRecord):
            decode_segment_header(data[:length])
    for bit in range(len(data) * 8):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptRecord):
            decode_segment_header(bytes(damaged))
    head = bytearray(data[:28])
    head[8] = FORMAT_VERSION + 1
    future = bytes(head) + zlib.crc32(bytes(head)).to_bytes(4, "little")
    with pytest.raises(UnsupportedRecord):
        decode_segment_header(future)
    with pytest.raises(ValueError, match="key"):
        encode_segment_header(1, b"short")


@pytest.mark.parametrize(
    "fields",
    [b'{"list":"l"}', b'["l","u"]', b"[1,2,3,4,9,6,7,8]", b"[", b'["l"] x', b""],
)
def test_accept_metadata_that_is_not_an_envelope_is_corrupt(fields: bytes) -> None:
    """
    Accept metadata that passed its checksum but does not hold an envelope
    (a writer bug) is reported, never turned into a wrong envelope.
    """
    with pytest.raises(CorruptRecord):
        decode_envelope(b"\x01Q" + fields)


def test_accept_metadata_may_grow_new_fields() -> None:
    """
    Fields appended by a later writer of the same format version are
    ignored by this reader.
    """
    envelope = Envelope("Q", "l", "u", "s@x", ("r@x",), Priority.LOW, 5.0, "::1", 3)
    meta = encode_accept(envelope, b"").meta
    assert decode_envelope(meta[:-1] + b',"new"]') == envelope


def test_compaction_copy_is_a_record_type_of_its_own() -> None:
    """
    A COPY record holds what an ACCEPT record holds and decodes to the same
    message, marked as a copy; only its type tells it from the original.
    """
    envelope = Envelope("Q1", "l", "u", "s@x", ("r@x",), Priority.LOW, 5.0, "::1", 3)
    accept = encode_accept(envelope, b"abc")
    copy = encode_accept(envelope, b"abc", copy=True)
    assert (accept.type, copy.type) == (RecordType.ACCEPT, RecordType.COPY)
    assert (copy.meta, copy.body) == (accept.meta, accept.body)
    assert decode_record(encode_record(KEY, accept), KEY) == AcceptRecord(envelope, b"abc")
    assert decode_record(encode_record(KEY, copy), KEY) == AcceptRecord(
        envelope, b"abc", copy=True
    )


def test_progress_is_a_record_type_of_its_own() -> None:
    """
    A change of state that says which recipients remain is a PROGRESS
    record (type 6), so a reader that predates it refuses the journal
    instead of sending to recipients that already took the message; one
    that does not is the STATE record it always was. Both decode to a
    StateRecord.
    """
    assert (int(RecordType.PROGRESS), int(RecordType.QUEUE)) == (6, 7)
    plain = encode_state("Q1", "deferred", 2, 60.0)
    progress = encode_state("Q1", "deferred", 2, 60.0, remaining=["b@x"], bounced=["a@x"])
    assert (plain.type, progress.type) == (RecordType.STATE, RecordType.PROGRESS)
    assert decode_record(encode_record(KEY, plain), KEY) == StateRecord("Q1", "deferred", 2, 60.0)
    assert decode_record(encode_record(KEY, progress), KEY) == StateRecord(
        "Q1", "deferred", 2, 60.0, {}, ("b@x",), ("a@x",)
    )
    empty = encode_state("Q1", "deferred", remaining=[])
    assert decode_record(encode_record(KEY, empty), KEY) == StateRecord(
        "Q1", "deferred", remaining=()
    )


def test_progress_fields_cannot_be_misused() -> None:
    """
    Bounced recipients go with the remaining ones, and the details of a
    PROGRESS record cannot use the names of its fields.
    """
    with pytest.raises(ValueError, match="remaining"):
        encode_state("Q1", "deferred", bounced=["a@x"])
    with pytest.raises(ValueError, match="details"):
        encode_state("Q1", "deferred", details={"remaining": []}, remaining=["b@x"])
    # In a plain STATE record such a detail is just a detail.
    assert decode_record(
        encode_record(KEY, encode_state("Q1", "held", details={"remaining": 1})), KEY
    ) == StateRecord("Q1", "held", details={"remaining": 1})


@pytest.mark.parametrize(
    "extra",
    [
        b"",
        b'{"bounced":[]}',
        b'{"remaining":"b@x"}',
        b'{"remaining":[1]}',
        b"[]",
        b'{"remaining":[],"bounced":null}',
    ],
)
def test_progress_metadata_that_says_no_recipients_is_corrupt(extra: bytes) -> None:
    """
    A PROGRESS record must hold its remaining recipients as an array of
    strings (and bounced ones, when present, too): anything else is damage.
    """
    meta = encode_state("Q1", "deferred").meta + extra
    payload = Payload(RecordType.PROGRESS, meta)
    with pytest.raises(CorruptRecord):
        decode_record(encode_record(KEY, payload), KEY)


def test_queue_state_record() -> None:
    """
    A QUEUE record holds the queue's state as a JSON object; keys a later
    writer adds are ignored; anything without a boolean "paused" is damage.
    """
    assert decode_record(encode_record(KEY, encode_queue_state(True)), KEY) == QueueStateRecord(
        True
    )
    later = Payload(RecordType.QUEUE, b'{"paused":false,"reason":"maintenance"}')
    assert decode_record(encode_record(KEY, later), KEY) == QueueStateRecord(False)
    for bad in (b"", b"true", b'{"paused":1}', b'{"running":true}', b"[false]"):
        with pytest.raises(CorruptRecord):
            decode_record(encode_record(KEY, Payload(RecordType.QUEUE, bad)), KEY)
