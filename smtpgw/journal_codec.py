"""
The journal's on-disk format, as pure functions: bytes in, values out.

A journal is a directory of segment files. Each segment starts with a
segment header and holds records back to back::

    segment header (32 bytes, little-endian)
      magic        8  SEGMENT_MAGIC
      version      1  FORMAT_VERSION
      reserved     3  zero
      number       8  the segment's sequence number (also its file name)
      key          8  random bytes, repeated at the start of every record
      crc          4  CRC-32 of the 28 bytes above

    record header (32 bytes, little-endian)
      key          8  the key of the segment the record lies in
      version      1  FORMAT_VERSION
      type         1  a RecordType
      flags        2  zero
      meta_length  4
      body_length  4
      meta_crc     4  CRC-32 of the metadata
      body_crc     4  CRC-32 of the body
      header_crc   4  CRC-32 of the 28 bytes above
    metadata     meta_length bytes
    body         body_length bytes (the message, for ACCEPT and COPY records only)

Every length is covered by the header checksum, so a flipped bit anywhere
in a record, and any truncation, is reported and never decoded as another
record. Metadata and body have checksums of their own so that replay can
check a record's metadata without reading its body. The per-segment key
means bytes inside a message body can never pass for a record of the
journal when a reader looks for the next record after a damaged one.

Metadata by record type::

    ACCEPT    qid_len u8, queue id, JSON array of the other Envelope fields:
              [list, username, sender, [recipients], priority, accepted_at,
              client_ip, size] (a reader ignores elements it does not know)
    STATE     qid_len u8, queue id, state_len u8, state, attempts u32,
              next_attempt_at f64, JSON object of details (or nothing)
    PROGRESS  as STATE, and the JSON object is required and holds
              "remaining", the recipients still to be tried (an array of
              strings), and "bounced", those that failed for good so far
              (an array, may be absent): a change of state of a message
              some of whose recipients are done. The latest PROGRESS record
              of a message says which of its recipients are left; later
              STATE records keep that. Added after format version 1 first
              shipped, as a record type of its own so that a reader that
              predates it refuses the journal (L{UnsupportedRecord})
              rather than ignore the field and send to recipients that
              already took the message.
    PRIORITY  qid_len u8, queue id, priority u8
    COPY      as ACCEPT: the accept record of a live message that compaction
              copied forward (same queue id, same body); replay and reads
              take it for the message, and a later copy supersedes an
              earlier one. Only a COPY may repeat a live queue id: the
              writer refuses an ACCEPT whose queue id is live.
    NOOP      nothing (written to probe whether the disk takes writes again)
    QUEUE     JSON object of the queue's own state: {"paused": bool}; the
              latest one counts (a reader ignores keys it does not know).
              Added with PROGRESS, and refused by older readers the same way.
"""

from __future__ import annotations

import enum
import json
import math
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from attrs import field, frozen

from smtpgw.model import Envelope, Priority

__all__ = [
    "FINAL_STATES",
    "FORMAT_VERSION",
    "MAX_META_LENGTH",
    "RECORD_HEADER_SIZE",
    "SEGMENT_HEADER_SIZE",
    "SEGMENT_KEY_SIZE",
    "SEGMENT_MAGIC",
    "AcceptRecord",
    "CorruptRecord",
    "JournalRecordError",
    "NoopRecord",
    "Payload",
    "PriorityRecord",
    "QueueStateRecord",
    "Record",
    "RecordHeader",
    "RecordType",
    "SegmentHeader",
    "StateRecord",
    "TruncatedRecord",
    "UnsupportedRecord",
    "accept_queue_id",
    "decode_envelope",
    "decode_priority",
    "decode_queue_state",
    "decode_record",
    "decode_record_at",
    "decode_segment_header",
    "decode_state",
    "encode_accept",
    "encode_envelope",
    "encode_noop",
    "encode_priority",
    "encode_queue_state",
    "encode_record",
    "encode_segment_header",
    "encode_state",
    "frame_header",
    "read_header",
    "walk_records",
]

FORMAT_VERSION = 1
"""Written into every segment and record header; a reader refuses others."""

SEGMENT_MAGIC = b"\x89SGWJNL\n"
"""First bytes of every segment file. The high byte and the newline catch
files mangled by text-mode transfers."""

SEGMENT_KEY_SIZE = 8

MAX_META_LENGTH = 16 * 1024 * 1024
"""Metadata beyond this is refused at encoding and treated as damage when
read: no envelope comes near it (even thousands of recipients)."""

FINAL_STATES = frozenset({"delivered", "bounced", "cancelled"})
"""States after which a message is gone from the queue for good."""

_SEGMENT_HEADER = struct.Struct("<8sB3xQ8sI")
_RECORD_HEADER = struct.Struct("<8sBBHIIIII")
_STATE_NUMBERS = struct.Struct("<Id")
_QID_LENGTH_LIMIT = 255
_UINT32_MAX = 0xFFFFFFFF

SEGMENT_HEADER_SIZE = _SEGMENT_HEADER.size
RECORD_HEADER_SIZE = _RECORD_HEADER.size
_RECORD_CHECKED = RECORD_HEADER_SIZE - 4
_SEGMENT_CHECKED = SEGMENT_HEADER_SIZE - 4

_PRIORITIES = {int(p): p for p in Priority}
_RECORD_TYPES: dict[int, RecordType] = {}
_json_decoder = json.JSONDecoder()
_ENVELOPE_FIELDS = 8


class JournalRecordError(Exception):
    """
    Bytes that are not a valid record or segment header.
    """


class TruncatedRecord(JournalRecordError):
    """
    The bytes end before the record does: a torn write at the end of a file.
    """


class CorruptRecord(JournalRecordError):
    """
    A checksum, key or magic number does not match: damaged bytes.
    """


class UnsupportedRecord(JournalRecordError):
    """
    An intact record of a format version or type this code does not know
    (written by a newer version of the gateway): never skip it silently.
    """


class RecordType(enum.IntEnum):
    """
    What a record says.
    """

    ACCEPT = 1
    STATE = 2
    PRIORITY = 3
    NOOP = 4
    COPY = 5
    PROGRESS = 6
    QUEUE = 7


_RECORD_TYPES.update((int(t), t) for t in RecordType)


@frozen
class SegmentHeader:
    """
    The first bytes of a segment file.
    """

    number: int
    key: bytes


@frozen
class Payload:
    """
    A record before it is framed into a segment: framing only adds the
    header, which holds the key of the segment it ends up in.

    @ivar meta_crc: CRC-32 of C{meta}.
    @ivar body_crc: CRC-32 of C{body}; kept as found when a record is copied,
        so damage is never laundered into a fresh checksum.
    """

    type: RecordType
    meta: bytes
    body: bytes = field(default=b"", repr=False)
    meta_crc: int = field(default=-1)
    body_crc: int = field(default=-1)

    def __attrs_post_init__(self) -> None:
        if self.meta_crc == -1:
            object.__setattr__(self, "meta_crc", zlib.crc32(self.meta))
        if self.body_crc == -1:
            object.__setattr__(self, "body_crc", zlib.crc32(self.body))

    @property
    def length(self) -> int:
        """
        @return: the size of the framed record.
        """
        return RECORD_HEADER_SIZE + len(self.meta) + len(self.body)


class RecordHeader(NamedTuple):
    """
    A record header that passed its checks (a tuple: replay makes millions).
    """

    type: RecordType
    meta_length: int
    body_length: int
    meta_crc: int
    body_crc: int

    @property
    def length(self) -> int:
        """
        @return: the size of the whole record.
        """
        return RECORD_HEADER_SIZE + self.meta_length + self.body_length


@frozen
class AcceptRecord:
    """
    A message was accepted.

    @ivar copy: the record is a copy made by compaction (a COPY record), not
        the original acceptance.
    """

    envelope: Envelope
    body: bytes = field(repr=False)
    copy: bool = False


@frozen
class StateRecord:
    """
    A message changed state.

    @ivar details: extra fields of the change (a reason, who held it...).
    @ivar remaining: the recipients still to be tried, when some are done
        (a PROGRESS record); L{None} keeps what earlier records said (at
        first, every recipient of the envelope).
    @ivar bounced: with C{remaining}, the recipients that failed for good
        so far.
    """

    queue_id: str
    state: str
    attempts: int = 0
    next_attempt_at: float = 0.0
    details: Mapping[str, Any] = field(factory=dict)
    remaining: tuple[str, ...] | None = None
    bounced: tuple[str, ...] = ()


@frozen
class QueueStateRecord:
    """
    The state of the queue as a whole changed (an admin stopped or started
    it).
    """

    paused: bool


@frozen
class PriorityRecord:
    """
    An administrator changed a message's priority.
    """

    queue_id: str
    priority: Priority


@frozen
class NoopRecord:
    """
    A record that says nothing; replay skips it.
    """


Record = AcceptRecord | StateRecord | PriorityRecord | NoopRecord | QueueStateRecord

_PROGRESS_KEYS = ("remaining", "bounced")


def _short_ascii(value: str, what: str) -> bytes:
    """
    @return: C{value} as ASCII prefixed with its length.
    @raise ValueError: if it is empty, not ASCII or too long.
    """
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be ASCII: {value!r}") from None
    if not raw or len(raw) > _QID_LENGTH_LIMIT:
        raise ValueError(f"{what} must be 1..{_QID_LENGTH_LIMIT} bytes: {value!r}")
    return bytes((len(raw),)) + raw


def _read_short_ascii(meta: bytes, offset: int) -> tuple[str, int]:
    """
    @return: the length-prefixed ASCII string at C{offset} and the offset
        after it.
    @raise CorruptRecord: if it runs past C{meta} or is not ASCII.
    """
    if offset >= len(meta):
        raise CorruptRecord("metadata ends inside a string")
    end = offset + 1 + meta[offset]
    if end > len(meta):
        raise CorruptRecord("metadata ends inside a string")
    try:
        return meta[offset + 1 : end].decode("ascii"), end
    except UnicodeDecodeError:
        raise CorruptRecord("metadata string is not ASCII") from None


def _dump_json(value: Mapping[str, Any] | list[Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")


def _check_meta(meta: bytes) -> bytes:
    if len(meta) > MAX_META_LENGTH:
        raise ValueError(f"record metadata of {len(meta)} bytes is over {MAX_META_LENGTH}")
    return meta


def encode_accept(envelope: Envelope, body: bytes, copy: bool = False) -> Payload:
    """
    @param copy: make the COPY record compaction writes instead.
    @return: the ACCEPT (or COPY) record of a message.
    @raise ValueError: if the envelope cannot be recorded (a queue id that is
        not short ASCII, a time that is not a finite number).
    """
    rtype = RecordType.COPY if copy else RecordType.ACCEPT
    return Payload(rtype, encode_envelope(envelope), body)


def encode_envelope(envelope: Envelope) -> bytes:
    """
    @return: an envelope as the metadata of an ACCEPT record (which
        L{decode_envelope} reads; the acceptor processes send envelopes to
        the main process in this form too).
    @raise ValueError: as L{encode_accept}.
    """
    if not math.isfinite(envelope.accepted_at):
        raise ValueError(f"accepted_at must be finite: {envelope.accepted_at}")
    fields = [
        envelope.list,
        envelope.username,
        envelope.sender,
        list(envelope.recipients),
        int(envelope.priority),
        envelope.accepted_at,
        envelope.client_ip,
        envelope.size,
    ]
    return _check_meta(_short_ascii(envelope.queue_id, "queue id") + _dump_json(fields))


def encode_state(
    queue_id: str,
    state: str,
    attempts: int = 0,
    next_attempt_at: float = 0.0,
    details: Mapping[str, Any] | None = None,
    *,
    remaining: Sequence[str] | None = None,
    bounced: Sequence[str] = (),
) -> Payload:
    """
    @return: the STATE record of a change of state, or the PROGRESS record
        when C{remaining} is given.
    @param details: extra JSON-able fields, kept with the change.
    @param remaining: the recipients still to be tried, when some are done.
    @param bounced: with C{remaining}, the recipients that failed for good.
    @raise ValueError: on an attempt count or time that cannot be recorded,
        C{bounced} without C{remaining}, or C{details} that use the names
        of those two.
    """
    if not 0 <= attempts <= _UINT32_MAX:
        raise ValueError(f"attempts out of range: {attempts}")
    if not math.isfinite(next_attempt_at):
        raise ValueError(f"next_attempt_at must be finite: {next_attempt_at}")
    rtype = RecordType.STATE
    extra: Mapping[str, Any] | None = details
    if remaining is not None:
        if details and any(key in details for key in _PROGRESS_KEYS):
            raise ValueError(f"details cannot hold {_PROGRESS_KEYS} of a PROGRESS record")
        rtype = RecordType.PROGRESS
        extra = {**(details or {}), "remaining": list(remaining), "bounced": list(bounced)}
    elif bounced:
        raise ValueError("bounced recipients are recorded with the remaining ones")
    meta = (
        _short_ascii(queue_id, "queue id")
        + _short_ascii(state, "state")
        + _STATE_NUMBERS.pack(attempts, next_attempt_at)
        + (_dump_json(extra) if extra else b"")
    )
    return Payload(rtype, _check_meta(meta))


def encode_queue_state(paused: bool) -> Payload:
    """
    @return: the QUEUE record of the queue's own state.
    """
    return Payload(RecordType.QUEUE, _dump_json({"paused": bool(paused)}))


def encode_priority(queue_id: str, priority: Priority) -> Payload:
    """
    @return: the PRIORITY record of a re-prioritization.
    """
    return Payload(
        RecordType.PRIORITY, _short_ascii(queue_id, "queue id") + bytes((int(priority),))
    )


def encode_noop() -> Payload:
    """
    @return: a record that replay ignores.
    """
    return Payload(RecordType.NOOP, b"")


def frame_header(key: bytes, payload: Payload) -> bytes:
    """
    @return: the header that frames C{payload} in the segment with C{key};
        the record is this header, then C{payload.meta}, then C{payload.body}.
    """
    head = _RECORD_HEADER.pack(
        key,
        FORMAT_VERSION,
        payload.type,
        0,
        len(payload.meta),
        len(payload.body),
        payload.meta_crc,
        payload.body_crc,
        0,
    )[:_RECORD_CHECKED]
    return head + zlib.crc32(head).to_bytes(4, "little")


def encode_record(key: bytes, payload: Payload) -> bytes:
    """
    @return: the whole framed record.
    """
    return frame_header(key, payload) + payload.meta + payload.body


def _checked_header(
    buffer: Any, offset: int, key: bytes, end: int
) -> tuple[RecordType, int, int, int, int]:
    """
    The checks of L{read_header}, giving a plain tuple.
    """
    if end - offset < RECORD_HEADER_SIZE:
        raise TruncatedRecord(f"{end - offset} bytes left, a record header is 32")
    (
        rkey,
        version,
        rtype,
        flags,
        meta_length,
        body_length,
        meta_crc,
        body_crc,
        header_crc,
    ) = _RECORD_HEADER.unpack_from(buffer, offset)
    if rkey != key:
        raise CorruptRecord("record key does not match its segment")
    if zlib.crc32(buffer[offset : offset + _RECORD_CHECKED]) != header_crc:
        raise CorruptRecord("record header checksum mismatch")
    if version != FORMAT_VERSION:
        raise UnsupportedRecord(f"record format version {version}, expected {FORMAT_VERSION}")
    if flags:
        raise UnsupportedRecord(f"record flags {flags:#x}")
    record_type = _RECORD_TYPES.get(rtype)
    if record_type is None:
        raise UnsupportedRecord(f"record type {rtype}")
    if meta_length > MAX_META_LENGTH:
        raise CorruptRecord(f"record metadata length {meta_length}")
    if end - offset < RECORD_HEADER_SIZE + meta_length + body_length:
        raise TruncatedRecord(
            f"{end - offset} bytes left, the record is"
            f" {RECORD_HEADER_SIZE + meta_length + body_length}"
        )
    return record_type, meta_length, body_length, meta_crc, body_crc


def read_header(buffer: Any, offset: int, key: bytes, end: int) -> RecordHeader:
    """
    Check the record header at C{offset} of C{buffer} (bytes, mmap...) and
    that the whole record lies before C{end}; the payload checksums are not
    checked here.

    @raise TruncatedRecord: if the header or the record runs past C{end}.
    @raise CorruptRecord: on a wrong key or header checksum.
    @raise UnsupportedRecord: on an intact header of an unknown version,
        type or flags.
    """
    return RecordHeader(*_checked_header(buffer, offset, key, end))


def walk_records(
    buffer: Any, offset: int, end: int, key: bytes, check_bodies: bool
) -> Iterator[tuple[int, RecordType, int, bytes]]:
    """
    Check and yield the records from C{offset} until C{end}, as
    C{(offset, type, length, metadata)}; a body is checked only when
    C{check_bodies} (replay skips bodies to stay fast).

    @raise JournalRecordError: at the first record that is not intact (see
        L{read_header}; L{CorruptRecord} for a payload checksum mismatch):
        the records before it were yielded.
    """
    crc32 = zlib.crc32
    while offset < end:
        rtype, meta_length, body_length, meta_crc, body_crc = _checked_header(
            buffer, offset, key, end
        )
        body_start = offset + RECORD_HEADER_SIZE + meta_length
        meta = bytes(buffer[offset + RECORD_HEADER_SIZE : body_start])
        if crc32(meta) != meta_crc:
            raise CorruptRecord("record metadata checksum mismatch")
        if check_bodies and body_length:
            with memoryview(buffer) as view, view[body_start : body_start + body_length] as body:
                if crc32(body) != body_crc:
                    raise CorruptRecord("record body checksum mismatch")
        yield offset, rtype, RECORD_HEADER_SIZE + meta_length + body_length, meta
        offset = body_start + body_length


def accept_queue_id(meta: bytes) -> str:
    """
    @return: the queue id of ACCEPT (or COPY) metadata, without decoding
        the rest.
    @raise CorruptRecord: if it cannot be decoded.
    """
    # Replay calls this once per message: _read_short_ascii, inlined.
    end = 1 + meta[0] if meta else 0
    if not 1 < end <= len(meta):
        raise CorruptRecord("metadata ends inside the queue id")
    try:
        return meta[1:end].decode("ascii")
    except UnicodeDecodeError:
        raise CorruptRecord("queue id is not ASCII") from None


def _json_value(text: bytes, what: str) -> Any:
    """
    @return: the one JSON value that C{text} holds.
    @raise CorruptRecord: if it holds anything else.
    """
    try:
        # JSON that ensure_ascii wrote: decoding it as ASCII is exact, and
        # raw_decode skips json.loads' encoding detection.
        string = text.decode("ascii")
        value, end = _json_decoder.raw_decode(string)
    except ValueError:
        raise CorruptRecord(f"undecodable {what}") from None
    if end != len(string):
        raise CorruptRecord(f"undecodable {what}: trailing data")
    return value


def decode_envelope(meta: bytes) -> Envelope:
    """
    @return: the envelope in checked ACCEPT metadata.
    @raise CorruptRecord: if it cannot be decoded.
    """
    queue_id = accept_queue_id(meta)
    fields = _json_value(meta[1 + len(queue_id) :], "accept metadata")
    try:
        if len(fields) != _ENVELOPE_FIELDS:
            fields = fields[:_ENVELOPE_FIELDS]
        list_, username, sender, recipients, priority, accepted_at, client_ip, size = fields
        return Envelope(
            queue_id,
            list_,
            username,
            sender,
            tuple(recipients),
            _PRIORITIES[priority],
            float(accepted_at),
            client_ip,
            size,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptRecord(f"undecodable accept metadata: {e}") from None


def decode_state(meta: bytes, progress: bool = False) -> StateRecord:
    """
    @param progress: decode PROGRESS metadata (else STATE metadata).
    @return: the change in checked STATE or PROGRESS metadata.
    @raise CorruptRecord: if it cannot be decoded.
    """
    queue_id, offset = _read_short_ascii(meta, 0)
    state, offset = _read_short_ascii(meta, offset)
    end = offset + _STATE_NUMBERS.size
    if end > len(meta):
        raise CorruptRecord("state metadata too short")
    attempts, next_attempt_at = _STATE_NUMBERS.unpack_from(meta, offset)
    details: dict[str, Any] = {}
    if end < len(meta):
        details = _json_value(meta[end:], "state details")
        if not isinstance(details, dict):
            raise CorruptRecord("state details are not an object")
    if not progress:
        return StateRecord(queue_id, state, attempts, next_attempt_at, details)
    remaining = _addresses(details.pop("remaining", None), "remaining")
    bounced = _addresses(details.pop("bounced", []), "bounced")
    return StateRecord(queue_id, state, attempts, next_attempt_at, details, remaining, bounced)


def _addresses(value: Any, what: str) -> tuple[str, ...]:
    """
    @return: C{value}, a JSON array of strings, as a tuple.
    @raise CorruptRecord: if it is anything else.
    """
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise CorruptRecord(f"progress {what} is not an array of strings")
    return tuple(value)


def decode_queue_state(meta: bytes) -> QueueStateRecord:
    """
    @return: the queue's state in checked QUEUE metadata.
    @raise CorruptRecord: if it cannot be decoded.
    """
    value = _json_value(meta, "queue state")
    if not isinstance(value, dict) or not isinstance(value.get("paused"), bool):
        raise CorruptRecord("queue state is not an object with a boolean 'paused'")
    return QueueStateRecord(value["paused"])


def decode_priority(meta: bytes) -> PriorityRecord:
    """
    @return: the change in checked PRIORITY metadata.
    @raise CorruptRecord: if it cannot be decoded.
    """
    queue_id, offset = _read_short_ascii(meta, 0)
    if len(meta) != offset + 1 or meta[offset] not in _PRIORITIES:
        raise CorruptRecord("bad priority metadata")
    return PriorityRecord(queue_id, _PRIORITIES[meta[offset]])


def decode_record_at(buffer: Any, offset: int, key: bytes, end: int) -> tuple[Record, int]:
    """
    Decode and check the whole record at C{offset}.

    @return: the record and the offset just after it.
    @raise JournalRecordError: see L{read_header}; L{CorruptRecord} also
        when a payload checksum does not match.
    """
    header = read_header(buffer, offset, key, end)
    meta_start = offset + RECORD_HEADER_SIZE
    body_start = meta_start + header.meta_length
    record_end = body_start + header.body_length
    meta = bytes(buffer[meta_start:body_start])
    if zlib.crc32(meta) != header.meta_crc:
        raise CorruptRecord("record metadata checksum mismatch")
    body = bytes(buffer[body_start:record_end])
    if zlib.crc32(body) != header.body_crc:
        raise CorruptRecord("record body checksum mismatch")
    record: Record
    if header.type is RecordType.ACCEPT or header.type is RecordType.COPY:
        record = AcceptRecord(decode_envelope(meta), body, header.type is RecordType.COPY)
    elif header.body_length:
        raise CorruptRecord(f"{header.type.name} record with a body")
    elif header.type is RecordType.STATE or header.type is RecordType.PROGRESS:
        record = decode_state(meta, header.type is RecordType.PROGRESS)
    elif header.type is RecordType.PRIORITY:
        record = decode_priority(meta)
    elif header.type is RecordType.QUEUE:
        record = decode_queue_state(meta)
    else:
        if meta:
            raise CorruptRecord("NOOP record with metadata")
        record = NoopRecord()
    return record, record_end


def decode_record(data: bytes, key: bytes) -> Record:
    """
    Decode exactly one whole record.

    @raise JournalRecordError: see L{decode_record_at}; L{CorruptRecord}
        also if bytes follow the record.
    """
    record, end = decode_record_at(data, 0, key, len(data))
    if end != len(data):
        raise CorruptRecord(f"{len(data) - end} bytes after the record")
    return record


def encode_segment_header(number: int, key: bytes) -> bytes:
    """
    @return: the header of segment C{number}, whose records carry C{key}.
    """
    if len(key) != SEGMENT_KEY_SIZE:
        raise ValueError(f"segment key must be {SEGMENT_KEY_SIZE} bytes")
    head = _SEGMENT_HEADER.pack(SEGMENT_MAGIC, FORMAT_VERSION, number, key, 0)[:_SEGMENT_CHECKED]
    return head + zlib.crc32(head).to_bytes(4, "little")


def decode_segment_header(data: bytes) -> SegmentHeader:
    """
    @raise TruncatedRecord: if C{data} is shorter than a segment header.
    @raise CorruptRecord: on a wrong magic number or checksum.
    @raise UnsupportedRecord: on an intact header of an unknown version.
    """
    if len(data) < SEGMENT_HEADER_SIZE:
        raise TruncatedRecord(f"{len(data)} bytes, a segment header is {SEGMENT_HEADER_SIZE}")
    magic, version, number, key, crc = _SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        raise CorruptRecord("not a journal segment (bad magic)")
    if zlib.crc32(data[:_SEGMENT_CHECKED]) != crc:
        raise CorruptRecord("segment header checksum mismatch")
    if version != FORMAT_VERSION:
        raise UnsupportedRecord(f"segment format version {version}, expected {FORMAT_VERSION}")
    return SegmentHeader(number, key)
