"""
The recipients (subscribers) of the lists: CSV import, their status, and
the unsubscribe links of console sends (PRODUCT section 4).

L{parse_recipients_csv} is pure: bytes in, the valid rows and the bad ones
(by line number) out. L{SQLiteRecipientStore} keeps the recipients in the
database of the data directory (the CLI uses it directly);
L{ThreadedRecipientStore} runs it on a small pool of threads for the
reactor.

A recipient is C{subscribed}, C{unsubscribed} or C{bounced}; only
subscribed recipients are ever sent to. An import never re-subscribes a
recipient who unsubscribed or bounced: it only updates their fields.

Unsubscribe links carry a token that names the list and the recipient and
is signed with HMAC-SHA256 under a key the gateway generates once and keeps
in the C{settings} table (L{unsubscribe_token}, L{read_unsubscribe_token}).
"""

from __future__ import annotations

import base64
import csv
import enum
import hashlib
import hmac
import io
import json
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

from attrs import field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime

from smtpgw.database import (
    SQLiteStore,
    StoreError,
    ThreadedStore,
    open_database,
    transaction,
)
from smtpgw.queueinfo import iso8601
from smtpgw.userstore import NoSuchList
from smtpgw.validation import normalize_address

__all__ = [
    "MAX_COLUMNS",
    "MAX_COLUMN_NAME_LENGTH",
    "MAX_FIELD_LENGTH",
    "MAX_IMPORT_BYTES",
    "MAX_IMPORT_ROWS",
    "MAX_PAGE",
    "MAX_RECIPIENTS_PER_LIST",
    "MAX_TOKEN_LENGTH",
    "RESERVED_FIELDS",
    "UNSUBSCRIBE_KEY_SETTING",
    "CsvImport",
    "CsvRefused",
    "ImportResult",
    "NoSuchRecipient",
    "Recipient",
    "RecipientRow",
    "RecipientStatus",
    "RowError",
    "SQLiteRecipientStore",
    "ThreadedRecipientStore",
    "TooManyRecipients",
    "import_document",
    "parse_recipients_csv",
    "read_unsubscribe_token",
    "recipient_document",
    "unsubscribe_token",
]

T = TypeVar("T")

MAX_IMPORT_BYTES: Final = 32 * 1024 * 1024
"""The largest CSV file one import reads, in bytes; a larger one is refused
whole (split it)."""

MAX_IMPORT_ROWS: Final = 100_000
"""The most recipients (data rows, the header and blank lines not counted)
one CSV file may hold; one more and the file is refused whole."""

MAX_COLUMNS: Final = 64
"""The most columns a CSV file may have (the email column included)."""

MAX_COLUMN_NAME_LENGTH: Final = 64
"""The longest column name, in characters: it becomes a merge field."""

MAX_FIELD_LENGTH: Final = 2000
"""The longest value of a merge field, in characters; a longer one makes
its row bad."""

MAX_RECIPIENTS_PER_LIST: Final = 10_000_000
"""The most recipients one list may have, whatever their status; an import
that would go past it changes nothing."""

MAX_PAGE: Final = 1000
"""The most recipients one call of L{SQLiteRecipientStore.recipients} gives."""

MAX_TOKEN_LENGTH: Final = 200
"""Longer unsubscribe tokens are not even looked at."""

RESERVED_FIELDS: Final = frozenset({"unsubscribe_url"})
"""Merge fields the gateway fills itself; no column may be named so."""

UNSUBSCRIBE_KEY_SETTING: Final = "unsubscribe_key"
"""The name, in the C{settings} table, of the key that signs unsubscribe
tokens."""

DEFAULT_POOL_SIZE: Final = 2
"""Threads of L{ThreadedRecipientStore}."""

_KEY_BYTES: Final = 32
_MAC_BYTES: Final = 16
_TOKEN_CONTEXT: Final = b"smtpgw unsubscribe v1\0"
_SHOWN_VALUE: Final = 80
_COLUMN_NAME: Final = re.compile(r"[\w.-]+")
_SPACES: Final = re.compile(r"\s+")
# List names (smtpgw.validation.validate_list_name) never contain "~".
_TOKEN: Final = re.compile(r"([a-z0-9][a-z0-9._-]{0,63})~([1-9][0-9]{0,18})~([A-Za-z0-9_-]{22})")


class CsvRefused(ValueError):
    """
    The whole file cannot be imported (too large, not UTF-8, no header,
    no C{email} column, ...); nothing of it is.

    @ivar line: the line the problem is on, when it is on one.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line is not None else message)
        self.line = line


class NoSuchRecipient(StoreError, LookupError):
    """
    The list has no recipient with that address or id.
    """


class TooManyRecipients(StoreError):
    """
    An import would take a list past its most recipients; nothing changed.
    """


class RecipientStatus(enum.Enum):
    """
    Whether a recipient is sent to.
    """

    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    BOUNCED = "bounced"


@frozen
class RowError:
    """
    A bad row of a CSV file.

    @ivar line: the line the row starts on (the header is line 1).
    @ivar message: what is wrong, in one line.
    """

    line: int
    message: str


@frozen
class RecipientRow:
    """
    A good row of a CSV file.

    @ivar line: the line the row starts on.
    @ivar email: the address, normalized (L{smtpgw.validation.normalize_address}).
    @ivar fields: the other columns, by their (lower-case) name: the merge
        fields of console sends.
    """

    line: int
    email: str
    fields: Mapping[str, str] = field(factory=dict, hash=False)


@frozen
class CsvImport:
    """
    What a CSV file holds.

    @ivar columns: the merge fields, in column order (without C{email}).
    @ivar rows: the good rows, in file order.
    @ivar errors: the bad rows, in file order.
    """

    columns: tuple[str, ...]
    rows: tuple[RecipientRow, ...]
    errors: tuple[RowError, ...]

    @property
    def ok(self) -> bool:
        """
        Whether every row is good.
        """
        return not self.errors


@frozen
class ImportResult:
    """
    What an import did.

    @ivar applied: whether anything was written (an import with bad rows
        writes nothing unless the valid rows alone were asked for).
    @ivar added: new recipients.
    @ivar updated: recipients already on the list whose fields were updated
        (their status is kept).
    @ivar errors: the bad rows of the file, by line.
    """

    applied: bool
    added: int
    updated: int
    errors: tuple[RowError, ...]

    @property
    def imported(self) -> int:
        """
        Rows written: added and updated.
        """
        return self.added + self.updated


@frozen
class Recipient:
    """
    A recipient of a list.
    """

    id: int
    list: str
    email: str
    fields: Mapping[str, str] = field(hash=False)
    status: RecipientStatus
    created_at: float
    changed_at: float | None = None


def _shown(value: str) -> str:
    text = value if len(value) <= _SHOWN_VALUE else value[:_SHOWN_VALUE] + "..."
    return repr(text)


def _column_names(header: list[str]) -> list[str]:
    """
    The merge-field names of a header row.

    @raise CsvRefused: a column has no usable name, or a name repeats.
    """
    if len(header) > MAX_COLUMNS:
        raise CsvRefused(f"{len(header)} columns, more than the {MAX_COLUMNS} allowed", 1)
    if not any(_SPACES.sub("_", cell.strip()).lower() == "email" for cell in header):
        raise CsvRefused("the header row has no 'email' column (a header row is required)", 1)
    names: list[str] = []
    for position, cell in enumerate(header, start=1):
        name = _SPACES.sub("_", cell.strip()).lower()
        if not name:
            raise CsvRefused(f"column {position} has no name in the header row", 1)
        if len(name) > MAX_COLUMN_NAME_LENGTH or not _COLUMN_NAME.fullmatch(name):
            raise CsvRefused(
                f"column {position} name {_shown(cell)} cannot be a merge field: use up to "
                f"{MAX_COLUMN_NAME_LENGTH} letters, digits, '_', '.' or '-'",
                1,
            )
        if name in RESERVED_FIELDS:
            raise CsvRefused(f"column {position} name {name!r} is reserved by the gateway", 1)
        if name in names:
            raise CsvRefused(f"column {position} repeats the column name {name!r}", 1)
        names.append(name)
    return names


def _decoded(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CsvRefused("not valid UTF-8 text (save the file as UTF-8 CSV)", line) from None


def parse_recipients_csv(
    data: bytes,
    *,
    max_rows: int = MAX_IMPORT_ROWS,
    max_bytes: int = MAX_IMPORT_BYTES,
) -> CsvImport:
    """
    Read a recipients CSV file: a header row with an C{email} column (any
    case), one recipient per row after it; the other columns become merge
    fields, named by their header lower-cased with spaces as C{_}.

    Blank lines are skipped. A row is bad when its column count differs
    from the header's, its address is missing or invalid, it repeats an
    address of an earlier row (compared normalized), or a value is longer
    than L{MAX_FIELD_LENGTH}.

    @param data: the file, UTF-8 with or without a byte order mark; comma
        separated, quoted as spreadsheets write it (RFC 4180).
    @param max_rows: see L{MAX_IMPORT_ROWS}.
    @param max_bytes: see L{MAX_IMPORT_BYTES}.
    @raise CsvRefused: the file as a whole cannot be imported.
    """
    if len(data) > max_bytes:
        raise CsvRefused(
            f"the file has {len(data)} bytes, more than the {max_bytes} one import takes: split it"
        )
    text = _decoded(data)
    _allow_fields_of(len(text))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    names: list[str] = []
    rows: list[RecipientRow] = []
    errors: list[RowError] = []
    first_line: dict[str, int] = {}
    count = 0
    line = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            start, line = line, reader.line_num + 1
            if header is None:
                raise CsvRefused(f"not readable as CSV: {e}", start) from None
            if _UNCLOSED_QUOTE in str(e):
                # The quote took every line after it: there are no rows
                # left to tell apart, so nothing of the file is usable.
                raise CsvRefused(
                    f"not readable as CSV: a quote opened in this row is never closed ({e})",
                    start,
                ) from None
            # The reader starts afresh on the next line: only this row is lost.
            count += 1
            if count > max_rows:
                raise CsvRefused(
                    f"more than {max_rows} recipients in one file: split it", start
                ) from None
            errors.append(RowError(start, f"not readable as CSV: {e}{_QUOTING_HINT}"))
            continue
        start, line = line, reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = row
            names = _column_names(row)
            continue
        count += 1
        if count > max_rows:
            raise CsvRefused(f"more than {max_rows} recipients in one file: split it", start)
        problem, recipient = _read_row(row, names, start, first_line)
        if problem is not None:
            errors.append(RowError(start, problem))
        elif recipient is not None:
            rows.append(recipient)
    if header is None:
        raise CsvRefused("the file is empty: a header row with an 'email' column is required")
    columns = tuple(name for name in names if name != "email")
    return CsvImport(columns, tuple(rows), tuple(errors))


_UNCLOSED_QUOTE: Final = "unexpected end of data"
"""What the csv module says when a quoted value runs to the end of the file."""

_QUOTING_HINT: Final = ' (a quoted value is quoted whole, as "Ann ""A."" Smith")'

_field_limit_lock = threading.Lock()


def _allow_fields_of(size: int) -> None:
    """
    Let the csv module read a field of C{size} characters, so that a long
    value is the error of its row (L{MAX_FIELD_LENGTH}) rather than a
    reader error that loses the lines after it.

    The limit is process-wide: it is only ever raised, under a lock, since
    imports in other threads may be reading with it (restoring it after
    one import could lower it under another).
    """
    with _field_limit_lock:
        if csv.field_size_limit() < size:
            csv.field_size_limit(size)


def _read_row(
    row: list[str], names: list[str], line: int, first_line: dict[str, int]
) -> tuple[str | None, RecipientRow | None]:
    if len(row) != len(names):
        return f"{len(row)} columns, the header has {len(names)}", None
    values = {name: cell.strip() for name, cell in zip(names, row, strict=True)}
    raw = values.pop("email")
    if not raw:
        return "no email address", None
    try:
        email = normalize_address(raw)
    except ValueError as e:
        return f"invalid address {_shown(raw)}: {e}", None
    for name, value in values.items():
        if len(value) > MAX_FIELD_LENGTH:
            return (
                f"the value of {name!r} has {len(value)} characters, more than the "
                f"{MAX_FIELD_LENGTH} allowed"
            ), None
    earlier = first_line.get(email)
    if earlier is not None:
        return f"duplicate address {email} (first on line {earlier})", None
    first_line[email] = line
    return None, RecipientRow(line, email, values)


# --- unsubscribe tokens -------------------------------------------------------


def _mac(key: bytes, list: str, recipient_id: int) -> str:
    message = _TOKEN_CONTEXT + f"{list}\0{recipient_id}".encode("ascii")
    digest = hmac.new(key, message, hashlib.sha256).digest()[:_MAC_BYTES]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def unsubscribe_token(key: bytes, list: str, recipient_id: int) -> str:
    """
    The token of a recipient's unsubscribe link: C{LIST~ID~MAC}, URL-safe.

    @param key: the signing key (L{SQLiteRecipientStore.unsubscribe_key}).
    @raise ValueError: the list name or id cannot be put in a token.
    """
    token = f"{list}~{recipient_id}~{_mac(key, list, recipient_id)}"
    if read_unsubscribe_token(key, token) != (list, recipient_id):
        raise ValueError(f"no unsubscribe token for list {list!r}, recipient {recipient_id!r}")
    return token


def read_unsubscribe_token(key: bytes, token: str) -> tuple[str, int] | None:
    """
    Check an unsubscribe token.

    @return: C{(list, recipient id)} when C{key} signed it, else L{None}
        (never an exception, whatever the text).
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        return None
    match = _TOKEN.fullmatch(token)
    if match is None:
        return None
    list, number, mac = match.groups()
    recipient_id = int(number)
    if not hmac.compare_digest(mac, _mac(key, list, recipient_id)):
        return None
    return list, recipient_id


# --- the store ----------------------------------------------------------------

_SELECT: Final = "SELECT id, list, email, fields, status, created_at, changed_at FROM recipients"


def _recipient(row: Sequence[Any]) -> Recipient:
    return Recipient(
        id=row[0],
        list=row[1],
        email=row[2],
        fields=json.loads(row[3]),
        status=RecipientStatus(row[4]),
        created_at=row[5],
        changed_at=row[6],
    )


def _list_exists(connection: sqlite3.Connection, name: str) -> bool:
    row = connection.execute("SELECT 1 FROM lists WHERE name = ?", (name,)).fetchone()
    return row is not None


class SQLiteRecipientStore(SQLiteStore):
    """
    The synchronous recipients store: one SQLite connection, used by one
    thread at a time.
    """

    def __init__(
        self,
        connection: sqlite3.Connection,
        clock: IReactorTime,
        *,
        max_recipients: int = MAX_RECIPIENTS_PER_LIST,
    ) -> None:
        """
        @param connection: from L{smtpgw.database.open_database}.
        @param clock: gives the times of changes.
        @param max_recipients: see L{MAX_RECIPIENTS_PER_LIST}.
        """
        self._connection = connection
        self._clock = clock
        self._max_recipients = max_recipients
        self._key: bytes | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        clock: IReactorTime,
        *,
        create: bool = True,
        check_same_thread: bool = True,
        max_recipients: int = MAX_RECIPIENTS_PER_LIST,
    ) -> SQLiteRecipientStore:
        """
        Open the database at C{path} (see L{open_database}).
        """
        connection = open_database(path, create=create, check_same_thread=check_same_thread)
        return cls(connection, clock, max_recipients=max_recipients)

    def _require_list(self, list: str) -> None:
        if not _list_exists(self._connection, list):
            raise NoSuchList(f"no list named {list!r}")

    def import_recipients(
        self, list: str, parsed: CsvImport, *, valid_only: bool = False
    ) -> ImportResult:
        """
        Add the rows of a CSV file to a list, in one transaction.

        A new address is added as subscribed; an address already on the
        list gets the file's fields (the others it had are kept) and keeps
        its status: an unsubscribed or bounced recipient stays so.

        @param parsed: from L{parse_recipients_csv}.
        @param valid_only: with bad rows in the file, import the good ones
            anyway; without it such a file changes nothing.
        @raise NoSuchList: the list does not exist.
        @raise TooManyRecipients: the list would have more than its most
            recipients; nothing changed.
        """
        self._require_list(list)
        if parsed.errors and not valid_only:
            return ImportResult(False, 0, 0, parsed.errors)
        now = self._clock.seconds()
        with transaction(self._connection) as db:
            (before,) = db.execute(
                "SELECT count(*) FROM recipients WHERE list = ?", (list,)
            ).fetchone()
            db.executemany(
                "INSERT INTO recipients (list, email, fields, created_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (list, email) DO UPDATE SET "
                "fields = json_patch(fields, excluded.fields), changed_at = ?",
                (
                    (list, row.email, json.dumps(dict(row.fields), ensure_ascii=False), now, now)
                    for row in parsed.rows
                ),
            )
            (after,) = db.execute(
                "SELECT count(*) FROM recipients WHERE list = ?", (list,)
            ).fetchone()
            if after > self._max_recipients:
                raise TooManyRecipients(
                    f"list {list!r} would have {after} recipients, more than the "
                    f"{self._max_recipients} allowed; nothing was imported"
                )
        added = after - before
        return ImportResult(True, added, len(parsed.rows) - added, parsed.errors)

    def recipients(
        self,
        list: str,
        after_id: int = 0,
        limit: int = 100,
        status: RecipientStatus | None = None,
    ) -> list[Recipient]:
        """
        A page of a list's recipients, by id.

        @param after_id: only those with a greater id (the last id of the
            previous page).
        @param limit: at most this many, 1 to L{MAX_PAGE}.
        @param status: only those with this status.
        @raise NoSuchList: the list does not exist.
        @raise ValueError: the limit is out of range.
        """
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"the limit must be 1 to {MAX_PAGE}, not {limit}")
        self._require_list(list)
        query = _SELECT + " WHERE list = ? AND id > ?"
        parameters: tuple[Any, ...] = (list, after_id)
        if status is not None:
            query += " AND status = ?"
            parameters += (status.value,)
        query += " ORDER BY id LIMIT ?"
        parameters += (limit,)
        return [_recipient(row) for row in self._connection.execute(query, parameters)]

    def get(self, list: str, email: str) -> Recipient | None:
        """
        The recipient of this list with this address (compared normalized),
        or L{None}.
        """
        try:
            key = normalize_address(email)
        except ValueError:
            return None
        row = self._connection.execute(
            _SELECT + " WHERE list = ? AND email = ?", (list, key)
        ).fetchone()
        return None if row is None else _recipient(row)

    def get_by_id(self, list: str, recipient_id: int) -> Recipient | None:
        """
        The recipient of this list with this id, or L{None}.
        """
        row = self._connection.execute(
            _SELECT + " WHERE list = ? AND id = ?", (list, recipient_id)
        ).fetchone()
        return None if row is None else _recipient(row)

    def counts(self, list: str) -> dict[RecipientStatus, int]:
        """
        How many recipients of the list have each status (every status is
        there, 0 when none has it).

        @raise NoSuchList: the list does not exist.
        """
        self._require_list(list)
        counts = dict.fromkeys(RecipientStatus, 0)
        rows = self._connection.execute(
            "SELECT status, count(*) FROM recipients WHERE list = ? GROUP BY status", (list,)
        )
        for status, count in rows:
            counts[RecipientStatus(status)] = count
        return counts

    def _set_status(
        self, list: str, where: str, key: object, status: RecipientStatus, from_: Iterable[str]
    ) -> Recipient:
        sources = tuple(from_)
        marks = ", ".join("?" * len(sources))
        with transaction(self._connection) as db:
            row = db.execute(
                _SELECT + f" WHERE list = ? AND {where} = ?",
                (list, key),
            ).fetchone()
            if row is None:
                raise NoSuchRecipient(f"list {list!r} has no recipient {key}")
            db.execute(
                f"UPDATE recipients SET status = ?, changed_at = ? "  # noqa: S608
                f"WHERE id = ? AND status IN ({marks})",
                (status.value, self._clock.seconds(), row[0], *sources),
            )
            row = db.execute(_SELECT + " WHERE id = ?", (row[0],)).fetchone()
        return _recipient(row)

    def unsubscribe(self, list: str, email: str) -> Recipient:
        """
        Stop sending to a recipient (a bounced one is recorded as
        unsubscribed too: that is what they asked for).

        @return: the recipient as it is now.
        @raise NoSuchRecipient: the list has no such address.
        """
        try:
            key = normalize_address(email)
        except ValueError:
            raise NoSuchRecipient(f"list {list!r} has no recipient {email!r}") from None
        return self._set_status(
            list, "email", key, RecipientStatus.UNSUBSCRIBED, ("subscribed", "bounced")
        )

    def unsubscribe_id(self, list: str, recipient_id: int) -> Recipient:
        """
        L{unsubscribe} by id (what an unsubscribe link names).
        """
        return self._set_status(
            list, "id", recipient_id, RecipientStatus.UNSUBSCRIBED, ("subscribed", "bounced")
        )

    def mark_bounced(self, list: str, email: str) -> Recipient:
        """
        Stop sending to a subscribed recipient whose address failed for
        good (an unsubscribed one stays unsubscribed).

        @return: the recipient as it is now.
        @raise NoSuchRecipient: the list has no such address.
        """
        try:
            key = normalize_address(email)
        except ValueError:
            raise NoSuchRecipient(f"list {list!r} has no recipient {email!r}") from None
        return self._set_status(list, "email", key, RecipientStatus.BOUNCED, ("subscribed",))

    def mark_bounced_ids(self, list: str, recipient_ids: Iterable[int]) -> int:
        """
        L{mark_bounced} for many recipients by id, in one transaction;
        unknown ids are ignored.

        @return: how many changed.
        """
        now = self._clock.seconds()
        with transaction(self._connection) as db:
            cursor = db.executemany(
                "UPDATE recipients SET status = 'bounced', changed_at = ? "
                "WHERE list = ? AND id = ? AND status = 'subscribed'",
                ((now, list, recipient_id) for recipient_id in recipient_ids),
            )
            return cursor.rowcount

    def unsubscribe_key(self) -> bytes:
        """
        The key that signs unsubscribe tokens: made once (32 random bytes)
        and kept in the C{settings} table.
        """
        if self._key is None:
            with transaction(self._connection) as db:
                db.execute(
                    "INSERT OR IGNORE INTO settings (name, value) VALUES (?, ?)",
                    (UNSUBSCRIBE_KEY_SETTING, secrets.token_bytes(_KEY_BYTES)),
                )
                (value,) = db.execute(
                    "SELECT value FROM settings WHERE name = ?", (UNSUBSCRIBE_KEY_SETTING,)
                ).fetchone()
            self._key = bytes(value)
        return self._key

    def unsubscribe_url_token(self, list: str, recipient_id: int) -> str:
        """
        The token of a recipient's unsubscribe link (the link is
        C{<base_url>/unsubscribe/<token>}).
        """
        return unsubscribe_token(self.unsubscribe_key(), list, recipient_id)

    def verify_unsubscribe_token(self, token: str) -> tuple[str, int] | None:
        """
        Check the token of an unsubscribe link.

        @return: C{(list, recipient id)}, or L{None} for a token this
            gateway did not sign.
        """
        return read_unsubscribe_token(self.unsubscribe_key(), token)

    def unsubscribe_by_token(self, token: str) -> Recipient | None:
        """
        Unsubscribe the recipient an unsubscribe link names.

        @return: the recipient as it is now, or L{None} for a bad token or
            a recipient no longer on the list.
        """
        found = self.verify_unsubscribe_token(token)
        if found is None:
            return None
        try:
            return self.unsubscribe_id(*found)
        except NoSuchRecipient:
            return None


# --- documents ----------------------------------------------------------------


def _iso(seconds: float | None) -> str | None:
    return iso8601(seconds)


def recipient_document(recipient: Recipient) -> dict[str, Any]:
    """
    A recipient as JSON: C{id}, C{list}, C{email}, C{fields}, C{status},
    C{created_at}, C{changed_at}.
    """
    return {
        "id": recipient.id,
        "list": recipient.list,
        "email": recipient.email,
        "fields": dict(recipient.fields),
        "status": recipient.status.value,
        "created_at": _iso(recipient.created_at),
        "changed_at": _iso(recipient.changed_at),
    }


def import_document(result: ImportResult) -> dict[str, Any]:
    """
    An import's outcome as JSON: C{imported}, C{added}, C{updated},
    C{applied}, and C{errors} as C{{"line": N, "error": "..."}} objects.
    """
    return {
        "imported": result.imported,
        "added": result.added,
        "updated": result.updated,
        "applied": result.applied,
        "errors": [{"line": e.line, "error": e.message} for e in result.errors],
    }


# --- the threaded store -------------------------------------------------------


class ThreadedRecipientStore(ThreadedStore[SQLiteRecipientStore]):
    """
    The recipients store as the reactor reaches it: each call runs an
    L{SQLiteRecipientStore} on a small pool of threads, each with its own
    connection, and answers with a L{Deferred}. The methods are those of
    L{SQLiteRecipientStore}, with the same arguments.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reactor: IReactorFromThreads,
        clock: IReactorTime,
        pool_size: int = DEFAULT_POOL_SIZE,
        max_recipients: int = MAX_RECIPIENTS_PER_LIST,
    ) -> None:
        """
        @param path: the database file; created when missing.
        @param reactor: delivers results from the threads.
        @param clock: gives the times of changes.
        """
        self._clock = clock
        self._max_recipients = max_recipients
        super().__init__(path, reactor=reactor, size=pool_size, name="smtpgw-recipients")

    def _open_store(self) -> SQLiteRecipientStore:
        return SQLiteRecipientStore.open(
            self._path,
            self._clock,
            check_same_thread=False,
            max_recipients=self._max_recipients,
        )

    def import_recipients(
        self, list: str, parsed: CsvImport, *, valid_only: bool = False
    ) -> Deferred[ImportResult]:
        return self.run(lambda s: s.import_recipients(list, parsed, valid_only=valid_only))

    def recipients(
        self,
        list: str,
        after_id: int = 0,
        limit: int = 100,
        status: RecipientStatus | None = None,
    ) -> Deferred[list[Recipient]]:
        return self.run(lambda s: s.recipients(list, after_id, limit, status))

    def get(self, list: str, email: str) -> Deferred[Recipient | None]:
        return self.run(lambda s: s.get(list, email))

    def get_by_id(self, list: str, recipient_id: int) -> Deferred[Recipient | None]:
        return self.run(lambda s: s.get_by_id(list, recipient_id))

    def counts(self, list: str) -> Deferred[dict[RecipientStatus, int]]:
        return self.run(lambda s: s.counts(list))

    def unsubscribe(self, list: str, email: str) -> Deferred[Recipient]:
        return self.run(lambda s: s.unsubscribe(list, email))

    def unsubscribe_id(self, list: str, recipient_id: int) -> Deferred[Recipient]:
        return self.run(lambda s: s.unsubscribe_id(list, recipient_id))

    def mark_bounced(self, list: str, email: str) -> Deferred[Recipient]:
        return self.run(lambda s: s.mark_bounced(list, email))

    def mark_bounced_ids(self, list: str, recipient_ids: Iterable[int]) -> Deferred[int]:
        ids = tuple(recipient_ids)
        return self.run(lambda s: s.mark_bounced_ids(list, ids))

    def unsubscribe_key(self) -> Deferred[bytes]:
        return self.run(lambda s: s.unsubscribe_key())

    def unsubscribe_url_token(self, list: str, recipient_id: int) -> Deferred[str]:
        return self.run(lambda s: s.unsubscribe_url_token(list, recipient_id))

    def verify_unsubscribe_token(self, token: str) -> Deferred[tuple[str, int] | None]:
        return self.run(lambda s: s.verify_unsubscribe_token(token))

    def unsubscribe_by_token(self, token: str) -> Deferred[Recipient | None]:
        return self.run(lambda s: s.unsubscribe_by_token(token))
