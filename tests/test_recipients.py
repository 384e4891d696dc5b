"""
Tests for L{smtpgw.recipients}: the CSV parser (good rows, bad rows by
line, whole-file refusals, limits at the limit and one past), the store
(imports that change nothing with bad rows unless asked, re-imports that
never re-subscribe, pages, counts, unsubscribe and bounce), and the signed
unsubscribe tokens.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import ParamSpec

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from smtpgw.database import database_path
from smtpgw.recipients import (
    MAX_FIELD_LENGTH,
    MAX_IMPORT_BYTES,
    MAX_IMPORT_ROWS,
    MAX_PAGE,
    CsvImport,
    CsvRefused,
    NoSuchRecipient,
    RecipientStatus,
    RowError,
    SQLiteRecipientStore,
    ThreadedRecipientStore,
    TooManyRecipients,
    import_document,
    parse_recipients_csv,
    read_unsubscribe_token,
    recipient_document,
    unsubscribe_token,
)
from smtpgw.userstore import NoSuchList, SQLiteUserStore
from tests.twisted_support import async_test, global_reactor

KEY = b"k" * 32
P = ParamSpec("P")


def csv_bytes(*lines: str, bom: bool = False) -> bytes:
    data = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    return (b"\xef\xbb\xbf" + data) if bom else data


# --- the parser ---------------------------------------------------------------


def test_header_names_email_column_in_any_case_and_other_columns_become_fields() -> None:
    """
    The C{email} column is found whatever its case and place; the other
    columns become merge fields named in lower case, spaces as C{_}.
    """
    parsed = parse_recipients_csv(
        csv_bytes("First Name,EMAIL,City", "Ann,Ann@Example.COM,Paris", "Bob,bob@example.org,")
    )
    assert parsed.ok
    assert parsed.columns == ("first_name", "city")
    assert [(r.line, r.email, dict(r.fields)) for r in parsed.rows] == [
        (2, "ann@example.com", {"first_name": "Ann", "city": "Paris"}),
        (3, "bob@example.org", {"first_name": "Bob", "city": ""}),
    ]


def test_utf8_with_byte_order_mark() -> None:
    """
    A byte order mark (as spreadsheets save UTF-8 CSV) is not part of the
    first column name; non-ASCII values survive.
    """
    parsed = parse_recipients_csv(csv_bytes("email,name", "z@example.org,Zoë", bom=True))
    assert parsed.columns == ("name",)
    assert parsed.rows[0].fields == {"name": "Zoë"}


def test_bad_rows_are_reported_by_line_and_good_rows_kept() -> None:
    """
    Invalid address, missing address, duplicate (compared normalized) and
    wrong column count are each reported with their line; blank lines are
    skipped but counted.
    """
    parsed = parse_recipients_csv(
        csv_bytes(
            "email,name",
            "a@example.org,A",
            "not-an-address,B",
            "",
            "A@EXAMPLE.org,A again",
            "c@example.org",
            ",D",
            "e@example.org,E,extra",
            "f@example.org,F",
        )
    )
    assert [r.email for r in parsed.rows] == ["a@example.org", "f@example.org"]
    assert [e.line for e in parsed.errors] == [3, 5, 6, 7, 8]
    messages = [e.message for e in parsed.errors]
    assert "invalid address 'not-an-address'" in messages[0]
    assert messages[1] == "duplicate address a@example.org (first on line 2)"
    assert messages[2] == "1 columns, the header has 2"
    assert messages[3] == "no email address"
    assert messages[4] == "3 columns, the header has 2"


def test_line_numbers_follow_quoted_multiline_values() -> None:
    """
    A quoted value with a line break takes two lines: the next row's
    reported line is the one it starts on.
    """
    parsed = parse_recipients_csv(
        b'email,address\r\na@example.org,"1 Main St\r\nTown"\r\nbad,x\r\n'
    )
    assert parsed.rows[0].fields == {"address": "1 Main St\r\nTown"}
    assert parsed.errors == (RowError(4, parsed.errors[0].message),)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "the file is empty"),
        (b"\r\n\r\n", "the file is empty"),
        (b"name,city\r\nA,B\r\n", "line 1: the header row has no 'email' column"),
        (b"email,Name,name\r\n", "line 1: column 3 repeats the column name 'name'"),
        (b"email,,x\r\n", "line 1: column 2 has no name"),
        (b"email,a/b\r\n", "line 1: column 2 name 'a/b' cannot be a merge field"),
        (b"email,unsubscribe_url\r\n", "line 1: column 2 name 'unsubscribe_url' is reserved"),
        (b"email\r\na@example.org\r\n\xff\r\n", "line 3: not valid UTF-8"),
        (b'email\r\n"a@example.org\r\n', "line 2: not readable as CSV"),
    ],
)
def test_whole_file_refusals(data: bytes, message: str) -> None:
    """
    What makes the whole file unusable is refused with a one-line reason
    naming the line when there is one.
    """
    with pytest.raises(CsvRefused) as caught:
        parse_recipients_csv(data)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_rows_limit_at_the_limit_and_one_past() -> None:
    """
    A file with exactly C{max_rows} recipients is read; one more refuses
    it, naming the line of the first row too many.
    """
    rows = [f"r{i}@example.org" for i in range(3)]
    assert len(parse_recipients_csv(csv_bytes("email", *rows), max_rows=3).rows) == 3
    with pytest.raises(CsvRefused, match="line 5: more than 3 recipients in one file"):
        parse_recipients_csv(csv_bytes("email", *rows, "x@example.org"), max_rows=3)


def test_default_rows_limit_at_the_limit_and_one_past() -> None:
    """
    L{MAX_IMPORT_ROWS} recipients in one file are read; one more is refused.
    """
    lines = ["email", *(f"r{i}@example.org" for i in range(MAX_IMPORT_ROWS))]
    assert len(parse_recipients_csv(csv_bytes(*lines)).rows) == MAX_IMPORT_ROWS
    with pytest.raises(CsvRefused, match=f"more than {MAX_IMPORT_ROWS} recipients"):
        parse_recipients_csv(csv_bytes(*lines, "one@more.example"))


def test_bytes_limit_at_the_limit_and_one_past() -> None:
    """
    A file of exactly C{max_bytes} is read; one byte more is refused before
    anything is parsed. The default is L{MAX_IMPORT_BYTES}.
    """
    data = csv_bytes("email", "a@example.org")
    assert parse_recipients_csv(data, max_bytes=len(data)).ok
    with pytest.raises(CsvRefused, match=f"more than the {len(data)} one import takes"):
        parse_recipients_csv(data + b"\r\n", max_bytes=len(data))
    # Rows of about 2 KB, the last one padded with spaces (stripped from
    # its value) to make the file exactly the default limit.
    value = "y" * 1980
    rows = [b"email,note\r\n"]
    size = len(rows[0])
    i = 0
    while MAX_IMPORT_BYTES - size > 4096:
        row = f"r{i}@x.org,{value}\r\n".encode()
        rows.append(row)
        size += len(row)
        i += 1
    last = f"last@x.org,{value}".encode()
    rows.append(last + b" " * (MAX_IMPORT_BYTES - size - len(last) - 2) + b"\r\n")
    full = b"".join(rows)
    assert len(full) == MAX_IMPORT_BYTES
    assert parse_recipients_csv(full).ok
    with pytest.raises(CsvRefused, match="split it"):
        parse_recipients_csv(full + b"\n")


def test_field_length_at_the_limit_and_one_past() -> None:
    """
    A value of L{MAX_FIELD_LENGTH} characters is kept; one more makes the
    row bad.
    """
    ok = "x" * MAX_FIELD_LENGTH
    parsed = parse_recipients_csv(
        csv_bytes("email,note", f"a@example.org,{ok}", f"b@example.org,{ok}y")
    )
    assert [r.email for r in parsed.rows] == ["a@example.org"]
    assert parsed.errors[0].line == 3
    assert f"more than the {MAX_FIELD_LENGTH} allowed" in parsed.errors[0].message


def test_a_row_the_csv_reader_refuses_is_an_error_of_that_row() -> None:
    """
    Text after a closing quote makes its row bad, by the line where the row
    starts (also when its quoted value spans lines); the rows after it are
    read, so that an import of the valid rows can skip it.
    """
    parsed = parse_recipients_csv(
        b'email,name\na@x.com,"Ann" Smith\nb@x.com,Bob\nc@x.com,"two\nlines" x\nd@x.com,D\n'
    )
    assert [(r.line, r.email) for r in parsed.rows] == [(3, "b@x.com"), (6, "d@x.com")]
    assert [e.line for e in parsed.errors] == [2, 4]
    assert all("not readable as CSV" in e.message for e in parsed.errors)
    assert "quoted whole" in parsed.errors[0].message


def test_a_bad_header_row_or_an_unclosed_quote_still_refuses_the_file() -> None:
    """
    The header cannot be skipped, and a quote never closed swallows every
    line after it: both refuse the file, naming the line.
    """
    with pytest.raises(CsvRefused, match=r"^line 1: not readable as CSV"):
        parse_recipients_csv(b'email,"name" x\na@x.com,A\n')
    with pytest.raises(CsvRefused, match=r"^line 3: not readable as CSV: a quote opened"):
        parse_recipients_csv(b'email,name\na@x.com,A\nb@x.com,"B\nc@x.com,C\n')


def test_bad_csv_rows_count_towards_the_rows_limit() -> None:
    """
    A row the reader refuses is one of the C{max_rows}: at the limit the
    file is read, one past it is refused.
    """
    bad = 'z@x.com,"Z" z'
    at = csv_bytes("email,name", "a@x.com,A", bad)
    assert len(parse_recipients_csv(at, max_rows=2).errors) == 1
    with pytest.raises(CsvRefused, match="line 4: more than 2 recipients"):
        parse_recipients_csv(csv_bytes("email,name", "a@x.com,A", bad, bad), max_rows=2)


@pytest.mark.parametrize("quoted", [False, True])
def test_a_value_past_the_csv_modules_default_limit_is_an_error_of_its_row(
    quoted: bool,
) -> None:
    """
    A value longer than the csv module's default field limit (131,072) is
    the row's L{MAX_FIELD_LENGTH} error, not a refusal of the file; the
    next row is read, and the limit is never lowered by reading.
    """
    value = "z" * 200_000 + ("\nmore" if quoted else "")
    cell = f'"{value}"' if quoted else value
    parsed = parse_recipients_csv(csv_bytes("email,name", f"a@x.com,{cell}", "b@x.com,Bob"))
    assert [(r.line, r.email) for r in parsed.rows] == [(4 if quoted else 3, "b@x.com")]
    (error,) = parsed.errors
    assert error.line == 2
    assert f"more than the {MAX_FIELD_LENGTH} allowed" in error.message
    assert csv.field_size_limit() >= 200_000
    parse_recipients_csv(csv_bytes("email", "a@x.com"))
    assert csv.field_size_limit() >= 200_000


_cell = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    max_size=20,
)
_address = st.from_regex(
    r"[a-z0-9]{1,10}(\.[a-z0-9]{1,5})?@[a-z]{1,10}\.(org|com|net)", fullmatch=True
)


@given(st.lists(st.tuples(st.one_of(_address, _cell), _cell), max_size=30), st.booleans())
def test_parser_accounts_for_every_row(rows: list[tuple[str, str]], bom: bool) -> None:
    """
    Whatever the cells, every non-blank data row is either a good row or a
    reported error, never both, in line order; good rows have unique
    addresses.
    """
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["email", "name"])
    writer.writerows(rows)
    data = out.getvalue().encode("utf-8")
    parsed = parse_recipients_csv((b"\xef\xbb\xbf" if bom else b"") + data)
    non_blank = [r for r in rows if any(c.strip() for c in r)]
    assert len(parsed.rows) + len(parsed.errors) == len(non_blank)
    lines = sorted([r.line for r in parsed.rows] + [e.line for e in parsed.errors])
    assert lines == sorted(set(lines))
    assert len({r.email for r in parsed.rows}) == len(parsed.rows)
    for row in parsed.rows:
        assert row.fields.keys() == {"name"}


@given(
    st.lists(st.tuples(_address, st.booleans()), max_size=20, unique_by=lambda t: t[0]),
    st.text(alphabet="abc ", min_size=1, max_size=5),
)
def test_bad_quoting_loses_only_its_own_rows(rows: list[tuple[str, bool]], tail: str) -> None:
    """
    Among good rows, each row with text after its closing quote is
    reported by its line, and every other row is read.
    """
    lines = ["email,name"] + [
        f'{address},"N" {tail}' if bad else f'{address},"N"' for address, bad in rows
    ]
    parsed = parse_recipients_csv(csv_bytes(*lines))
    bad_lines = [line for line, (_, bad) in enumerate(rows, start=2) if bad]
    good = [(line, a) for line, (a, bad) in enumerate(rows, start=2) if not bad]
    assert [e.line for e in parsed.errors] == bad_lines
    assert [(r.line, r.email) for r in parsed.rows] == good


@given(st.binary(max_size=300))
def test_parser_never_fails_otherwise_on_arbitrary_bytes(data: bytes) -> None:
    """
    Arbitrary bytes give either a result or L{CsvRefused}, nothing else.
    """
    refusal: CsvRefused | None = None
    try:
        parsed = parse_recipients_csv(data)
    except CsvRefused as e:
        refusal = e
    if refusal is not None:
        assert "\n" not in str(refusal)
    else:
        assert isinstance(parsed, CsvImport)


# --- tokens ---------------------------------------------------------------------


@given(
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True),
    st.integers(min_value=1, max_value=2**62),
)
def test_token_round_trip(list_name: str, recipient_id: int) -> None:
    """
    A token names its list and recipient back under the same key, and
    nothing under another key.
    """
    token = unsubscribe_token(KEY, list_name, recipient_id)
    assert read_unsubscribe_token(KEY, token) == (list_name, recipient_id)
    assert read_unsubscribe_token(b"other" * 8, token) is None
    assert all(c.isalnum() or c in "._-~" for c in token)


def test_tampered_tokens_are_refused() -> None:
    """
    Changing the list, the id or the MAC, or sending junk, gives L{None}.
    """
    token = unsubscribe_token(KEY, "news", 42)
    list_name, number, mac = token.split("~")
    assert read_unsubscribe_token(KEY, f"other~{number}~{mac}") is None
    assert read_unsubscribe_token(KEY, f"{list_name}~43~{mac}") is None
    flipped = ("A" if mac[0] != "A" else "B") + mac[1:]
    assert read_unsubscribe_token(KEY, f"{list_name}~{number}~{flipped}") is None
    for junk in ["", "~~", "news~0~" + mac, token + "x", "x" * 500, token.upper()]:
        assert read_unsubscribe_token(KEY, junk) is None


@given(st.text(max_size=100))
def test_reading_any_text_as_a_token_never_raises(text: str) -> None:
    """
    Any text is read as a token without an exception.
    """
    assert read_unsubscribe_token(KEY, text) is None


# --- the store ------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = database_path(tmp_path)
    with SQLiteUserStore.open(path, Clock(), rounds=4) as users:
        users.create_list("news")
        users.create_list("other")
    return path


@pytest.fixture
def store(db: Path) -> Iterator[SQLiteRecipientStore]:
    clock = Clock()
    clock.advance(1000)
    with SQLiteRecipientStore.open(db, clock) as s:
        yield s


def test_import_adds_recipients_subscribed(store: SQLiteRecipientStore) -> None:
    """
    A clean file adds its rows as subscribed recipients, with their fields.
    """
    result = store.import_recipients(
        "news", parse_recipients_csv(csv_bytes("email,name", "a@example.org,A", "b@x.org,B"))
    )
    assert (result.applied, result.added, result.updated, result.imported) == (True, 2, 0, 2)
    page = store.recipients("news")
    assert [(r.email, dict(r.fields), r.status) for r in page] == [
        ("a@example.org", {"name": "A"}, RecipientStatus.SUBSCRIBED),
        ("b@x.org", {"name": "B"}, RecipientStatus.SUBSCRIBED),
    ]
    assert store.recipients("other") == []
    assert import_document(result) == {
        "imported": 2,
        "added": 2,
        "updated": 0,
        "applied": True,
        "errors": [],
    }


def test_import_with_errors_changes_nothing_unless_valid_only(
    store: SQLiteRecipientStore,
) -> None:
    """
    A file with a bad row imports nothing and reports it; with
    C{valid_only} the good rows go in and the bad one is still reported.
    """
    parsed = parse_recipients_csv(csv_bytes("email", "a@example.org", "nope"))
    refused = store.import_recipients("news", parsed)
    assert (refused.applied, refused.imported) == (False, 0)
    assert refused.errors == (RowError(3, refused.errors[0].message),)
    assert store.recipients("news") == []
    taken = store.import_recipients("news", parsed, valid_only=True)
    assert (taken.applied, taken.imported) == (True, 1)
    assert import_document(taken)["errors"] == [{"line": 3, "error": taken.errors[0].message}]
    assert [r.email for r in store.recipients("news")] == ["a@example.org"]


def test_reimport_updates_fields_but_never_resubscribes(store: SQLiteRecipientStore) -> None:
    """
    Importing an address again merges its fields and keeps its status: an
    unsubscribed or bounced recipient stays so.
    """
    store.import_recipients(
        "news",
        parse_recipients_csv(
            csv_bytes("email,name,city", "a@x.org,A,Oslo", "b@x.org,B,Rome", "c@x.org,C,Nice")
        ),
    )
    store.unsubscribe("news", "A@X.ORG")
    store.mark_bounced("news", "b@x.org")
    result = store.import_recipients(
        "news", parse_recipients_csv(csv_bytes("email,name", "a@x.org,Ann", "b@x.org,Bea"))
    )
    assert (result.added, result.updated) == (0, 2)
    found = {r.email: r for r in store.recipients("news")}
    assert found["a@x.org"].status is RecipientStatus.UNSUBSCRIBED
    assert found["a@x.org"].fields == {"name": "Ann", "city": "Oslo"}
    assert found["b@x.org"].status is RecipientStatus.BOUNCED
    assert found["c@x.org"].status is RecipientStatus.SUBSCRIBED
    assert store.counts("news") == {
        RecipientStatus.SUBSCRIBED: 1,
        RecipientStatus.UNSUBSCRIBED: 1,
        RecipientStatus.BOUNCED: 1,
    }


def test_import_into_unknown_list(store: SQLiteRecipientStore) -> None:
    """
    Importing into a list that does not exist fails with L{NoSuchList}.
    """
    with pytest.raises(NoSuchList):
        store.import_recipients("nope", parse_recipients_csv(csv_bytes("email", "a@x.org")))


def test_list_size_limit_at_the_limit_and_one_past(db: Path) -> None:
    """
    An import that brings a list to exactly its most recipients is taken;
    one that would go one past changes nothing.
    """
    with SQLiteRecipientStore.open(db, Clock(), max_recipients=3) as store:
        store.import_recipients(
            "news", parse_recipients_csv(csv_bytes("email", "a@x.org", "b@x.org"))
        )
        one_more = parse_recipients_csv(csv_bytes("email", "a@x.org", "c@x.org"))
        assert store.import_recipients("news", one_more).added == 1
        with pytest.raises(TooManyRecipients, match="more than the 3 allowed"):
            store.import_recipients("news", parse_recipients_csv(csv_bytes("email", "d@x.org")))
        assert len(store.recipients("news")) == 3


def test_pages_by_id_and_status(store: SQLiteRecipientStore) -> None:
    """
    Pages go on from the last id; a status filter keeps only those; the
    limit is 1 to L{MAX_PAGE}.
    """
    store.import_recipients(
        "news", parse_recipients_csv(csv_bytes("email", *(f"r{i}@x.org" for i in range(5))))
    )
    first = store.recipients("news", limit=2)
    second = store.recipients("news", after_id=first[-1].id, limit=2)
    assert [r.email for r in first + second] == [f"r{i}@x.org" for i in range(4)]
    store.unsubscribe("news", "r1@x.org")
    assert [r.email for r in store.recipients("news", status=RecipientStatus.UNSUBSCRIBED)] == [
        "r1@x.org"
    ]
    assert len(store.recipients("news", limit=MAX_PAGE)) == 5
    for bad in (0, MAX_PAGE + 1):
        with pytest.raises(ValueError, match=f"1 to {MAX_PAGE}"):
            store.recipients("news", limit=bad)
    with pytest.raises(NoSuchList):
        store.recipients("nope")


def test_unsubscribe_and_bounce_transitions(store: SQLiteRecipientStore) -> None:
    """
    Unsubscribing works from subscribed or bounced; a bounce marks only a
    subscribed recipient; unknown addresses raise L{NoSuchRecipient}.
    """
    store.import_recipients("news", parse_recipients_csv(csv_bytes("email", "a@x.org", "b@x.org")))
    assert store.mark_bounced("news", "a@x.org").status is RecipientStatus.BOUNCED
    assert store.unsubscribe("news", "a@x.org").status is RecipientStatus.UNSUBSCRIBED
    assert store.mark_bounced("news", "a@x.org").status is RecipientStatus.UNSUBSCRIBED
    b = store.get("news", "B@x.org")
    assert b is not None
    assert store.mark_bounced_ids("news", [b.id, 99999]) == 1
    assert store.get_by_id("news", b.id) == store.get("news", "b@x.org")
    assert store.get("news", "b@x.org").status is RecipientStatus.BOUNCED  # type: ignore[union-attr]
    for bad in ("zz@x.org", "not an address"):
        with pytest.raises(NoSuchRecipient):
            store.unsubscribe("news", bad)
    with pytest.raises(NoSuchRecipient):
        store.unsubscribe("other", "a@x.org")
    document = recipient_document(b)
    assert document["email"] == "b@x.org"
    assert document["status"] == "subscribed"
    assert document["created_at"] == "1970-01-01T00:16:40Z"


def test_unsubscribe_key_made_once_and_kept(db: Path) -> None:
    """
    The signing key is made once and the same in every connection, so a
    link stays good across restarts; a token unsubscribes its recipient.
    """
    with SQLiteRecipientStore.open(db, Clock()) as first:
        key = first.unsubscribe_key()
        first.import_recipients("news", parse_recipients_csv(csv_bytes("email", "a@x.org")))
        (a,) = first.recipients("news")
        token = first.unsubscribe_url_token("news", a.id)
    with SQLiteRecipientStore.open(db, Clock()) as second:
        assert second.unsubscribe_key() == key
        assert len(key) == 32
        assert second.verify_unsubscribe_token(token) == ("news", a.id)
        assert second.unsubscribe_by_token(token).status is RecipientStatus.UNSUBSCRIBED  # type: ignore[union-attr]
        assert second.unsubscribe_by_token(token + "x") is None
        assert second.unsubscribe_by_token(unsubscribe_token(key, "news", 12345)) is None


@async_test
async def test_threaded_store_answers_with_deferreds(db: Path) -> None:
    """
    The threaded store runs the same operations on its threads.
    """
    reactor = global_reactor()
    store = ThreadedRecipientStore(db, reactor=reactor, clock=reactor)
    store.startService()
    try:
        parsed = parse_recipients_csv(csv_bytes("email,name", "a@x.org,A"))
        result = await store.import_recipients("news", parsed)
        assert result.added == 1
        (a,) = await store.recipients("news")
        token = await store.unsubscribe_url_token("news", a.id)
        assert await store.verify_unsubscribe_token(token) == ("news", a.id)
        assert (await store.unsubscribe_by_token(token)).status is RecipientStatus.UNSUBSCRIBED  # type: ignore[union-attr]
        counts = await store.counts("news")
        assert counts[RecipientStatus.UNSUBSCRIBED] == 1
    finally:
        store.stopService()
