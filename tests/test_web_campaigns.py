"""
The console-send and recipients pages, and the public unsubscribe page, in
memory: the real SQLite stores of recipients and sends behind inline
adapters, a runner that counts its pokes, and the admin app on a
L{task.Clock}.

What is checked: the recipients of a list (counts, paging, filter) and
their CSV import (pasted or uploaded; bad rows shown by line with nothing
imported; the valid rows alone on request); the sends listed and filtered;
a new send with every error beside its field, the sender policy's refusal
beside the sender; a send's page with its state, reason, progress and
live reload; pause, resume and cancel; unsubscribing by link (GET asks,
POST and RFC 8058 one-click unsubscribe, bad tokens are 404) without a
session; and what is refused: POSTs without the CSRF token, pages without
a session.
"""

from __future__ import annotations

import html
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, maybeDeferred

from smtpgw.campaigns import (
    ADMIN_PAUSE_REASON,
    MAX_SUBJECT_LENGTH,
    CampaignState,
    InlineCampaignStore,
    SQLiteCampaignStore,
    StatusUpdate,
    unsubscribe_url,
)
from smtpgw.model import Priority
from smtpgw.recipients import RecipientStatus, SQLiteRecipientStore, parse_recipients_csv
from tests.web_support import BASE, Browser, Inline, Response, error_beside, make_web_app
from web.context import WebContext
from web.pages_campaigns import (
    CAMPAIGNS_PAGE_SIZE,
    ECHO_LIMIT,
    LATEST_SEND_AT,
    MAX_ERRORS_SHOWN,
    RECIPIENTS_PAGE_SIZE,
    REFRESH_SECONDS,
    CampaignForm,
    check_campaign_form,
    masked_address,
    parse_send_at_field,
)
from web.render import format_time


class InlineRecipients(Inline):
    """
    A L{SQLiteRecipientStore} as the app reaches the threaded one: its
    methods and C{run} answer fired Deferreds.
    """

    def run(self, f: Callable[[Any], Any]) -> Deferred[Any]:
        return maybeDeferred(f, self.store)


class FakeRunner:
    """
    Counts the pokes the campaign runner gets.
    """

    def __init__(self) -> None:
        self.pokes = 0

    def poke(self) -> None:
        self.pokes += 1


class Sends:
    """
    The app with recipients and console sends, a list "news" whose SMTP+
    user may send from example.com, and an empty list "other".
    """

    def __init__(self, tmp_path: Path, *, max_recipients: int | None = None) -> None:
        self.runner = FakeRunner()
        self.store: SQLiteCampaignStore | None = None
        self.recipients: SQLiteRecipientStore | None = None

        def attach(ctx: WebContext) -> None:
            store = SQLiteCampaignStore.open(tmp_path / "smtpgw.db", ctx.clock)
            self.store = store
            self.recipients = store.recipients
            if max_recipients is not None:
                self.recipients = SQLiteRecipientStore(
                    store._connection, ctx.clock, max_recipients=max_recipients
                )
            ctx.campaigns = InlineCampaignStore(store)
            ctx.recipients = InlineRecipients(self.recipients)
            ctx.runner = self.runner

        self.web = make_web_app(tmp_path, extra=attach)
        self.web.users.create_list("news")
        self.web.users.create_list("other")
        self.web.users.create_user("news", domains="example.com", rounds=4)

    @property
    def campaigns(self) -> SQLiteCampaignStore:
        assert self.store is not None
        return self.store

    @property
    def people(self) -> SQLiteRecipientStore:
        assert self.recipients is not None
        return self.recipients

    def add(self, csv: bytes, list: str = "news") -> None:
        self.people.import_recipients(list, parse_recipients_csv(csv))

    def close(self) -> None:
        self.campaigns.close()
        self.web.close()


@pytest.fixture
def sends(tmp_path: Path) -> Iterator[Sends]:
    app = Sends(tmp_path)
    yield app
    app.close()


@pytest.fixture
def browser(sends: Sends) -> Browser:
    return sends.web.logged_in()


def errors_shown(response: Response) -> set[str]:
    return set(re.findall(r'id="error-([a-z_]+)"', response.text))


def by_id(response: Response, element_id: str) -> str:
    """
    The text of the element with this id (no nested element of the same
    tag), unescaped.
    """
    match = re.search(rf'<(\w+)[^>]* id="{element_id}"[^>]*>(.*?)</\1>', response.text, re.DOTALL)
    assert match, f"no element #{element_id}:\n{response.text}"
    return html.unescape(re.sub(r"<[^>]+>", "", match.group(2)))


def tag_with_id(response: Response, element_id: str) -> str:
    match = re.search(rf'<[^>]* id="{element_id}"[^>]*>', response.text)
    assert match, f"no element #{element_id}"
    return match.group(0)


def follow(browser: Browser, response: Response) -> Response:
    assert response.code == 303, response.text
    location = response.header("location")
    assert location is not None
    return browser.get(location)


def notice(response: Response) -> str:
    match = re.search(r'<div class="notice (\w+)" role="status">([^<]*)</div>', response.text)
    assert match, "no notice"
    return match.group(1) + ": " + html.unescape(match.group(2))


def multipart(fields: Mapping[str, str | bytes], files: Mapping[str, bytes]) -> tuple[bytes, str]:
    """
    A C{multipart/form-data} body as a browser sends a form with a file.
    """
    boundary = "----smtpgw" + secrets.token_hex(8)
    body = b""
    for name, value in fields.items():
        data = value.encode() if isinstance(value, str) else value
        body += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + data
            + b"\r\n"
        )
    for name, data in files.items():
        body += (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="people.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post_multipart(
    browser: Browser,
    path: str,
    fields: Mapping[str, str | bytes],
    files: Mapping[str, bytes] | None = None,
    *,
    form_page: str,
) -> Response:
    body, content_type = multipart({**fields, "csrf": browser.csrf(form_page)}, files or {})
    return browser.request("POST", path, body=body, headers={"Content-Type": content_type})


def emails(sends: Sends, list: str = "news") -> list[str]:
    return [r.email for r in sends.people.recipients(list)]


NINE_AM = datetime(2030, 1, 31, 9, 0, tzinfo=UTC).timestamp()

SEND = {
    "list": "news",
    "subject": "Spring news",
    "text": "Hello {{name}}",
    "html": "",
    "sender": "news@example.com",
    "priority": "3",
    "send_at": "",
}


def create_send(browser: Browser, **changes: str) -> int:
    response = browser.submit("/campaigns/new", {**SEND, **changes})
    assert response.code == 303, response.text
    location = response.header("location")
    assert location is not None
    match = re.fullmatch(r"/campaigns/(\d+)", location)
    assert match, location
    return int(match.group(1))


# --- pure helpers ---------------------------------------------------------------


def test_addresses_are_masked_on_the_public_page() -> None:
    """
    The unsubscribe page shows the first letter of the local part and the
    domain, never the whole address.
    """
    assert masked_address("ann@example.org") == "a…@example.org"
    assert masked_address("b@x.test") == "b…@x.test"
    assert masked_address("nothing") == "…"


@given(st.text(max_size=30))
def test_a_masked_address_never_shows_more_than_one_letter_of_the_local_part(
    local: str,
) -> None:
    shown = masked_address(f"{local}@example.org")
    assert shown.endswith("…@example.org")
    assert len(shown) <= len("x…@example.org")


def test_send_at_is_read_as_utc() -> None:
    """
    The C{datetime-local} value is UTC, with or without seconds; empty is
    now; before 1970 is now too; anything else is refused for the field.
    """
    assert parse_send_at_field("") is None
    assert parse_send_at_field("  ") is None
    assert parse_send_at_field("2030-01-31T09:00") == NINE_AM
    assert parse_send_at_field("2030-01-31T09:00:30") == NINE_AM + 30
    assert parse_send_at_field("2030-01-31T10:00+01:00") == NINE_AM
    assert parse_send_at_field("1960-01-01T00:00") == 0.0
    for bad in ("tomorrow", "2030-13-01T00:00", "31/01/2030"):
        with pytest.raises(ValueError, match="send_at") as caught:
            parse_send_at_field(bad)
        assert getattr(caught.value, "field", None) == "send_at"


@given(st.text(max_size=40))
def test_reading_send_at_never_fails_otherwise(text: str) -> None:
    """
    Whatever is typed, the field is either a time, now, or refused as
    C{send_at}.
    """
    refused: list[str] = []
    when: float | None = None
    try:
        when = parse_send_at_field(text)
    except ValueError as e:
        refused.append(getattr(e, "field", ""))
    assert refused in ([], ["send_at"])
    assert when is None or 0 <= when <= LATEST_SEND_AT


def test_send_at_is_refused_past_the_year_9999_in_utc() -> None:
    """
    The last second of 9999 in UTC is taken; a time that is in 9999 only
    in its own offset (one minute later, or a day later, in UTC) is refused
    for the field, by the reader and beside the field of the form.
    """
    assert parse_send_at_field("9999-12-31T23:59:59") == LATEST_SEND_AT
    assert parse_send_at_field("9999-12-31T23:59:59+00:00") == LATEST_SEND_AT
    for past in ("9999-12-31T23:59:59-00:01", "9999-12-31T23:59:59-23:59"):
        with pytest.raises(ValueError, match="later than 9999-12-31T23:59:59Z") as caught:
            parse_send_at_field(past)
        assert getattr(caught.value, "field", None) == "send_at"
        form = CampaignForm(list="news", subject="s", text="x", sender="a@b.c", send_at=past)
        _, errors = check_campaign_form(form)
        assert "later than 9999-12-31T23:59:59Z" in errors["send_at"]


def test_the_subject_is_taken_at_its_limit_and_refused_one_past() -> None:
    at = CampaignForm(list="news", subject="s" * MAX_SUBJECT_LENGTH, text="x", sender="a@b.c")
    _, errors = check_campaign_form(at)
    assert errors == {}
    past = CampaignForm(
        list="news", subject="s" * (MAX_SUBJECT_LENGTH + 1), text="x", sender="a@b.c"
    )
    _, errors = check_campaign_form(past)
    assert set(errors) == {"subject"}
    assert str(MAX_SUBJECT_LENGTH) in errors["subject"]


# --- recipients --------------------------------------------------------------------


def test_the_list_page_links_to_its_recipients(browser: Browser) -> None:
    page = browser.get("/lists/news")
    assert 'href="/lists/news/recipients"' in page.text


def test_the_recipients_page_counts_and_lists_them(sends: Sends, browser: Browser) -> None:
    """
    The page counts the recipients by status and lists each with its
    fields and status; the import form takes a file or pasted rows, as
    multipart, at the path the upload limit allows.
    """
    sends.add(b"email,name\r\nann@example.org,Ann\r\nbob@example.org,Bob\r\ncy@example.org,Cy\r\n")
    sends.people.unsubscribe("news", "bob@example.org")
    sends.people.mark_bounced("news", "cy@example.org")
    page = browser.get("/lists/news/recipients")
    assert page.code == 200
    assert by_id(page, "count-subscribed") == "1"
    assert by_id(page, "count-unsubscribed") == "1"
    assert by_id(page, "count-bounced") == "1"
    table = by_id(page, "recipients")
    assert "ann@example.org" in table
    assert "name: Ann" in table
    for status in ("subscribed", "unsubscribed", "bounced"):
        assert status in table
    # With recipients, the import is folded away below the counts.
    assert tag_with_id(page, "import") == '<details class="card" id="import">'
    form = tag_with_id(page, "import-recipients")
    assert 'action="/lists/news/recipients/import"' in form
    assert 'enctype="multipart/form-data"' in form
    assert 'type="file" name="file"' in page.text
    assert '<textarea name="csv"' in page.text
    assert 'href="/campaigns/new?list=news"' in page.text


def test_recipients_are_paged_and_filtered_by_status(sends: Sends, browser: Browser) -> None:
    """
    A page shows at most L{RECIPIENTS_PAGE_SIZE}; the next page goes on
    after the last; the status filter shows only that status.
    """
    rows = [f"r{n:03d}@example.org" for n in range(RECIPIENTS_PAGE_SIZE + 1)]
    sends.add(("email\n" + "\n".join(rows) + "\n").encode())
    sends.people.unsubscribe("news", rows[0])
    first = browser.get("/lists/news/recipients")
    shown = re.findall(r"r\d{3}@example\.org", by_id(first, "recipients"))
    assert shown == rows[:RECIPIENTS_PAGE_SIZE]
    next_link = re.search(r'<a href="([^"]+)"[^>]*id="recipients-next"', first.text)
    assert next_link
    second = browser.get(html.unescape(next_link.group(1)))
    assert re.findall(r"r\d{3}@example\.org", by_id(second, "recipients")) == rows[-1:]
    assert 'id="recipients-next"' not in second.text
    only = browser.get("/lists/news/recipients?status=unsubscribed")
    assert re.findall(r"r\d{3}@example\.org", by_id(only, "recipients")) == rows[:1]


def test_pasted_rows_are_imported(sends: Sends, browser: Browser) -> None:
    """
    Rows pasted in the text box are imported, and the page after the
    redirect says how many were added and updated.
    """
    sends.add(b"email,name\nann@example.org,Ann\n")
    response = browser.submit(
        "/lists/news/recipients/import",
        {"csv": "email,name\r\nann@example.org,Anne\r\nbob@example.org,Bob\r\n", "file": ""},
        form_page="/lists/news/recipients",
    )
    page = follow(browser, response)
    assert response.header("location") == "/lists/news/recipients"
    assert notice(page) == ("good: Imported 2 recipients: 1 added, 1 updated (their status kept).")
    assert emails(sends) == ["ann@example.org", "bob@example.org"]
    assert dict(sends.people.recipients("news")[0].fields) == {"name": "Anne"}


def test_an_uploaded_file_is_imported(sends: Sends, browser: Browser) -> None:
    """
    A file uploaded as multipart, UTF-8 with a byte order mark and a name
    that is not ASCII, is imported as it is; the upload wins over the
    text box.
    """
    data = "\ufeffemail,name\r\nzoe@example.org,Zoë\r\n".encode()
    response = post_multipart(
        browser,
        "/lists/news/recipients/import",
        {"csv": "email\nignored@example.org\n"},
        {"file": data},
        form_page="/lists/news/recipients",
    )
    follow(browser, response)
    assert emails(sends) == ["zoe@example.org"]
    assert dict(sends.people.recipients("news")[0].fields) == {"name": "Zoë"}


def test_a_large_upload_is_taken_on_the_import_path(sends: Sends, browser: Browser) -> None:
    """
    The import path takes bodies past the forms' 64 KiB (the upload limit
    of L{web.security}).
    """
    rows = "".join(f"person{n:05d}@example.org,Person number {n}\n" for n in range(3000))
    data = ("email,name\n" + rows).encode()
    assert len(data) > 100 * 1024
    response = post_multipart(
        browser,
        "/lists/news/recipients/import",
        {"csv": ""},
        {"file": data},
        form_page="/lists/news/recipients",
    )
    assert response.code == 303, response.text
    assert sends.people.counts("news")[RecipientStatus.SUBSCRIBED] == 3000


BAD_CSV = (
    "email,name\n"
    "ann@example.org,Ann\n"
    "not an address,Nobody\n"
    "bob@example.org,Bob\n"
    "ann@example.org,Ann again\n"
    "cy@example.org,Cy,extra\n"
)


def test_an_import_with_bad_rows_shows_them_by_line_and_imports_nothing(
    sends: Sends, browser: Browser
) -> None:
    """
    Each bad row is shown with its line number, nothing is imported, the
    rows are put back in the text box, and a button offers to import the
    valid rows alone.
    """
    response = browser.submit(
        "/lists/news/recipients/import",
        {"csv": BAD_CSV},
        form_page="/lists/news/recipients",
    )
    assert response.code == 400
    assert emails(sends) == []
    lines = re.findall(
        r'<li data-line="(\d+)"><strong>line \d+</strong>: ([^<]*)</li>', response.text
    )
    assert [int(line) for line, _ in lines] == [3, 5, 6]
    assert "invalid address" in lines[0][1]
    assert "duplicate address ann@example.org (first on line 2)" in html.unescape(lines[1][1])
    assert "3 columns, the header has 2" in lines[2][1]
    assert "3 rows have errors: nothing was imported" in by_id(response, "import-summary")
    assert 'open="open"' in tag_with_id(response, "import")
    button = tag_with_id(response, "import-valid")
    assert 'name="valid_only"' in button
    assert "Import the 2 valid rows" in by_id(response, "import-valid")
    textarea = re.search(r'<textarea name="csv"[^>]*>(.*?)</textarea>', response.text, re.DOTALL)
    assert textarea
    assert html.unescape(textarea.group(1)) == "\n" + BAD_CSV


def test_the_valid_rows_alone_are_imported_on_request(sends: Sends, browser: Browser) -> None:
    """
    Sent again with C{valid_only}, the good rows are imported and the
    notice names the lines skipped.
    """
    response = browser.submit(
        "/lists/news/recipients/import",
        {"csv": BAD_CSV, "valid_only": "yes"},
        form_page="/lists/news/recipients",
    )
    page = follow(browser, response)
    assert emails(sends) == ["ann@example.org", "bob@example.org"]
    assert notice(page) == (
        "good: Imported 2 recipients: 2 added, 0 updated (their status kept). "
        "Skipped 3 bad rows (lines 3, 5, 6)."
    )


def test_only_the_first_errors_are_named(sends: Sends, browser: Browser) -> None:
    """
    L{MAX_ERRORS_SHOWN} bad rows are named; the rest are counted.
    """
    bad = MAX_ERRORS_SHOWN + 5
    data = "email\n" + "bad\n" * bad + "ok@example.org\n"
    response = browser.submit(
        "/lists/news/recipients/import", {"csv": data}, form_page="/lists/news/recipients"
    )
    assert response.code == 400
    assert len(re.findall(r"<li data-line=", response.text)) == MAX_ERRORS_SHOWN
    assert "… and 5 more" in response.text
    assert "Import the 1 valid row<" in response.text
    assert emails(sends) == []


def test_a_file_refused_whole_is_shown_beside_its_field(sends: Sends, browser: Browser) -> None:
    """
    A file without an C{email} column is refused whole, beside the field
    it came from (the text box, or the file), and changes nothing; an
    empty form asks for rows.
    """
    pasted = browser.submit(
        "/lists/news/recipients/import",
        {"csv": "name\nAnn\n"},
        form_page="/lists/news/recipients",
    )
    assert pasted.code == 400
    assert "no 'email' column" in error_beside(pasted, "csv")
    uploaded = post_multipart(
        browser,
        "/lists/news/recipients/import",
        {"csv": ""},
        {"file": b"email\n\xff\xfe\n"},
        form_page="/lists/news/recipients",
    )
    assert uploaded.code == 400
    assert "not valid UTF-8" in error_beside(uploaded, "file")
    empty = browser.submit(
        "/lists/news/recipients/import", {"csv": "  "}, form_page="/lists/news/recipients"
    )
    assert empty.code == 400
    assert error_beside(empty, "csv") == "Choose a CSV file or paste the rows."
    assert emails(sends) == []


def test_an_import_past_the_lists_limit_changes_nothing(tmp_path: Path) -> None:
    """
    An import that would take the list past its most recipients is
    refused (409) beside the field, and nothing is imported.
    """
    app = Sends(tmp_path, max_recipients=2)
    try:
        browser = app.web.logged_in()
        at_limit = browser.submit(
            "/lists/news/recipients/import",
            {"csv": "email\na@example.org\nb@example.org\n"},
            form_page="/lists/news/recipients",
        )
        assert at_limit.code == 303
        past = browser.submit(
            "/lists/news/recipients/import",
            {"csv": "email\nc@example.org\n"},
            form_page="/lists/news/recipients",
        )
        assert past.code == 409
        assert "more than the 2 allowed" in error_beside(past, "csv")
        assert emails(app) == ["a@example.org", "b@example.org"]
    finally:
        app.close()


def test_markup_in_fields_is_shown_as_text(sends: Sends, browser: Browser) -> None:
    sends.add(b'email,name\nann@example.org,"<script>alert(1)</script>"\n')
    page = browser.get("/lists/news/recipients")
    assert "<script>alert" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


def test_recipients_of_an_unknown_list_are_not_found(browser: Browser) -> None:
    assert browser.get("/lists/nope/recipients").code == 404
    response = browser.submit(
        "/lists/nope/recipients/import",
        {"csv": "email\na@example.org\n"},
        form_page="/lists/news/recipients",
    )
    assert response.code == 404


# --- sends: the listing -----------------------------------------------------------


def test_the_sends_are_listed_with_state_progress_and_reason(
    sends: Sends, browser: Browser
) -> None:
    """
    The listing shows each send's list, subject, state with the reason
    it is paused, progress as done (delivered or bounced) / total with
    the messages handed to the queue beside, and filters by list and
    state.
    """
    sends.add(b"email\na@example.org\nb@example.org\nc@example.org\n")
    first = sends.campaigns.create("news", "First", sender="a@example.com", text="x")
    second = sends.campaigns.create("news", "Second", sender="a@example.com", text="x")
    sends.campaigns.start(second.id)
    sends.campaigns.record_progress(second.id, 2, 2)
    sends.campaigns.record_status(
        [
            StatusUpdate(
                second.id, CampaignState.PAUSED, "priority-1 SMTP+ traffic", 0.0, delivered=1
            )
        ]
    )
    page = browser.get("/campaigns")
    assert page.code == 200
    table = by_id(page, "campaigns")
    assert table.index("Second") < table.index("First")
    assert "paused" in table
    assert "priority-1 SMTP+ traffic" in table
    assert "1 / 3 done" in table
    assert "2 handed to the queue" in table
    assert '<progress value="1" max="3"' in page.text
    assert f'href="/campaigns/{first.id}"' in page.text
    paused = browser.get("/campaigns?state=paused")
    assert "Second" in by_id(paused, "campaigns")
    assert "First" not in by_id(paused, "campaigns")
    other = browser.get("/campaigns?list=other")
    assert "Nothing here yet." in by_id(other, "campaigns")
    bad = browser.get("/campaigns?state=lost")
    assert bad.code == 400
    assert "is not a state" in error_beside(bad, "state")


def test_the_sends_are_paged(sends: Sends, browser: Browser) -> None:
    for n in range(CAMPAIGNS_PAGE_SIZE + 1):
        sends.campaigns.create("news", f"Send {n}", sender="a@example.com", text="x")
    first = browser.get("/campaigns")
    assert len(re.findall(r">Send \d+<", first.text)) == CAMPAIGNS_PAGE_SIZE
    link = re.search(r'<a href="([^"]+)"[^>]*id="campaigns-next"', first.text)
    assert link
    older = browser.get(html.unescape(link.group(1)))
    assert re.findall(r">(Send \d+)<", older.text) == ["Send 0"]


# --- sends: a new one ---------------------------------------------------------------


def test_the_new_send_form_has_every_field(browser: Browser) -> None:
    """
    The form names its fields as the API does; priority defaults to 3;
    the list can be chosen by the link that leads there.
    """
    page = browser.get("/campaigns/new?list=news")
    assert page.code == 200
    form = tag_with_id(page, "new-campaign")
    assert 'method="post"' in form
    assert 'action="/campaigns/new"' in form
    for name in ("list", "subject", "text", "html", "sender", "priority", "send_at"):
        assert f'name="{name}"' in page.text, name
    assert '<option value="news" selected="selected">' in page.text
    assert '<option value="3" selected="selected">' in page.text
    assert 'type="datetime-local" name="send_at"' in page.text
    assert 'id="save-campaign"' in page.text


def test_a_send_is_created_and_the_runner_poked(sends: Sends, browser: Browser) -> None:
    """
    Saving the form creates a scheduled send with the fields as given
    (priority 3 by default, now when no time is given), pokes the runner,
    and leads to the send's page.
    """
    number = create_send(browser, html="<p>Hi {{name}}</p>", text="Hi\r\n{{name}}")
    assert sends.runner.pokes == 1
    campaign = sends.campaigns.get(number)
    assert campaign is not None
    assert campaign.list == "news"
    assert campaign.subject == "Spring news"
    assert campaign.text == "Hi\n{{name}}"
    assert campaign.html == "<p>Hi {{name}}</p>"
    assert campaign.sender == "news@example.com"
    assert campaign.priority is Priority.NORMAL
    assert campaign.send_at is None
    assert campaign.created_by == "admin"
    assert campaign.state is CampaignState.SCHEDULED
    page = browser.get(f"/campaigns/{number}")
    assert notice(page) == f"good: Console send #{number} saved: it starts now."


def test_a_scheduled_send_keeps_its_time_and_priority(sends: Sends, browser: Browser) -> None:
    number = create_send(
        browser, priority="5", send_at="2030-01-31T09:00", html="<b>x</b>", text=""
    )
    campaign = sends.campaigns.get(number)
    assert campaign is not None
    assert campaign.priority is Priority.VERY_LOW
    assert campaign.send_at == NINE_AM
    assert campaign.text is None
    page = browser.get(f"/campaigns/{number}")
    assert "starts 2030-01-31 09:00:00 UTC" in page.text
    assert "data-refresh" not in page.text


def test_every_bad_field_is_shown_beside_it_and_nothing_is_created(
    sends: Sends, browser: Browser
) -> None:
    response = browser.submit(
        "/campaigns/new",
        {
            "list": "",
            "subject": " ",
            "text": "",
            "html": " ",
            "sender": "",
            "priority": "9",
            "send_at": "tomorrow",
        },
    )
    assert response.code == 400
    assert errors_shown(response) == {"list", "subject", "text", "sender", "priority", "send_at"}
    assert error_beside(response, "list") == "Choose a list."
    assert error_beside(response, "subject") == "A subject is required."
    assert "text body or an HTML body" in error_beside(response, "text")
    assert "priority" not in error_beside(response, "send_at")
    assert sends.campaigns.campaigns() == []
    assert sends.runner.pokes == 0


def test_a_form_with_errors_keeps_what_was_typed(browser: Browser) -> None:
    response = browser.submit(
        "/campaigns/new",
        {**SEND, "subject": "<b>Hi</b>", "text": "Body <i>here</i>", "priority": "9"},
    )
    assert response.code == 400
    assert 'value="&lt;b&gt;Hi&lt;/b&gt;"' in response.text
    assert "Body &lt;i&gt;here&lt;/i&gt;</textarea>" in response.text
    assert '<option value="news" selected="selected">' in response.text


def test_a_sender_the_lists_policy_refuses_is_shown_beside_it(
    sends: Sends, browser: Browser
) -> None:
    """
    A sender no SMTP+ user of the list is authorized for is refused beside
    the field with the store's words; nothing is created. A list whose
    users authorize no sender refuses every sender.
    """
    response = browser.submit("/campaigns/new", {**SEND, "sender": "boss@elsewhere.org"})
    assert response.code == 400
    assert error_beside(response, "sender") == (
        "boss@elsewhere.org may not send for list news: neither the domain elsewhere.org "
        "nor the address is authorized for an SMTP+ user of the list"
    )
    assert errors_shown(response) == {"sender"}
    other = browser.submit("/campaigns/new", {**SEND, "list": "other"})
    assert "no SMTP+ user of the list is authorized" in error_beside(other, "sender")
    malformed = browser.submit("/campaigns/new", {**SEND, "sender": "not an address"})
    assert "not an address" in error_beside(malformed, "sender")
    assert sends.campaigns.campaigns() == []


def test_an_unknown_list_is_refused_beside_the_field(sends: Sends, browser: Browser) -> None:
    response = browser.submit("/campaigns/new", {**SEND, "list": "ghost"})
    assert response.code == 400
    assert error_beside(response, "list") == "There is no list named 'ghost'."
    assert sends.campaigns.campaigns() == []


# --- sends: one send ------------------------------------------------------------------


def test_a_sending_send_shows_its_progress_and_reloads(sends: Sends, browser: Browser) -> None:
    """
    While it is sending, the page shows the state, the messages done
    (delivered or bounced) / total as a progress bar, the messages handed
    to the queue beside, the rate and the estimated finish of what is not
    done yet, the counts, a pause and a cancel button, and reloads itself
    every L{REFRESH_SECONDS}.
    """
    sends.add(b"email\n" + b"".join(b"p%d@example.org\n" % n for n in range(6)))
    number = create_send(browser)
    sends.campaigns.start(number)
    sends.campaigns.record_progress(number, 5, 5)
    sends.campaigns.record_status(
        [
            StatusUpdate(
                number, CampaignState.SENDING, None, 2.0, delivered=2, bounced=1, deferred=1
            )
        ]
    )
    page = browser.get(f"/campaigns/{number}")
    assert by_id(page, "campaign-state") == "sending"
    assert 'id="campaign-paused-reason"' not in page.text
    assert by_id(page, "campaign-done") == "3"
    assert by_id(page, "campaign-total") == "6"
    assert by_id(page, "campaign-sent") == "5"
    progress = tag_with_id(page, "campaign-progress")
    assert 'value="3"' in progress
    assert 'max="6"' in progress
    assert by_id(page, "campaign-rate") == "2.0/s"
    # Three messages not done (two of them in the queue) at 2 a second.
    assert by_id(page, "campaign-eta") == format_time(sends.web.clock.seconds() + 1.5)
    assert by_id(page, "campaign-delivered") == "2"
    assert by_id(page, "campaign-deferred") == "1"
    assert by_id(page, "campaign-bounced") == "1"
    assert by_id(page, "campaign-in-doubt") == "0"
    assert f'data-refresh="{REFRESH_SECONDS}"' in tag_with_id(page, "campaign-status")
    assert 'id="campaign-pause"' in page.text
    assert 'id="campaign-resume"' not in page.text
    assert 'id="campaign-cancel"' in page.text


def test_a_send_paused_by_traffic_shows_why(sends: Sends, browser: Browser) -> None:
    sends.add(b"email\na@example.org\n")
    number = create_send(browser)
    sends.campaigns.start(number)
    sends.campaigns.record_status(
        [StatusUpdate(number, CampaignState.PAUSED, "priority-1 SMTP+ traffic", 0.0)]
    )
    page = browser.get(f"/campaigns/{number}")
    assert by_id(page, "campaign-state") == "paused"
    assert by_id(page, "campaign-paused-reason") == "priority-1 SMTP+ traffic"
    assert f'data-refresh="{REFRESH_SECONDS}"' in page.text
    # The runner's pause is not the admin's: it can still be paused, not resumed.
    assert 'id="campaign-pause"' in page.text
    assert 'id="campaign-resume"' not in page.text


def test_pause_resume_and_cancel_through_the_pages(sends: Sends, browser: Browser) -> None:
    """
    Pause, resume and cancel (after its confirmation) change the send in
    the store, poke the runner, and say so on the send's page.
    """
    sends.add(b"email\na@example.org\n")
    number = create_send(browser)
    sends.campaigns.start(number)
    page_path = f"/campaigns/{number}"
    paused = follow(browser, browser.submit(f"{page_path}/pause", {}, form_page=page_path))
    assert notice(paused).startswith(f"good: Console send #{number} paused")
    assert by_id(paused, "campaign-state") == "paused"
    assert by_id(paused, "campaign-paused-reason") == ADMIN_PAUSE_REASON
    assert 'id="campaign-resume"' in paused.text
    assert 'id="campaign-pause"' not in paused.text
    assert sends.runner.pokes == 2
    resumed = follow(browser, browser.submit(f"{page_path}/resume", {}, form_page=page_path))
    assert by_id(resumed, "campaign-state") == "sending"
    assert sends.runner.pokes == 3
    confirm = browser.get(f"{page_path}/cancel")
    assert confirm.code == 200
    assert 'id="campaign-cancel-confirm"' in confirm.text
    campaign = sends.campaigns.get(number)
    assert campaign is not None
    assert campaign.state is CampaignState.SENDING
    cancelled = follow(
        browser, browser.submit(f"{page_path}/cancel", {}, form_page=f"{page_path}/cancel")
    )
    assert by_id(cancelled, "campaign-state") == "cancelled"
    assert 'id="campaign-cancel"' not in cancelled.text
    assert 'id="campaign-pause"' not in cancelled.text
    assert "data-refresh" not in cancelled.text
    assert sends.runner.pokes == 4
    assert browser.get(f"{page_path}/cancel").code == 409


def test_a_change_the_state_does_not_allow_is_a_conflict(sends: Sends, browser: Browser) -> None:
    number = create_send(browser)
    pokes = sends.runner.pokes
    response = browser.submit(f"/campaigns/{number}/resume", {}, form_page=f"/campaigns/{number}")
    assert response.code == 409
    assert "not paused by an admin" in response.text
    sends.campaigns.finish(number)
    for verb in ("pause", "cancel"):
        response = browser.submit(
            f"/campaigns/{number}/{verb}", {}, form_page=f"/campaigns/{number}"
        )
        assert response.code == 409, verb
        assert "it is finished" in response.text
    assert sends.runner.pokes == pokes


def test_a_finished_send_does_not_reload(sends: Sends, browser: Browser) -> None:
    sends.add(b"email\na@example.org\n")
    number = create_send(browser)
    sends.campaigns.start(number)
    sends.campaigns.record_progress(number, 1, 1)
    sends.campaigns.record_status(
        [StatusUpdate(number, CampaignState.SENDING, None, 0.0, delivered=1)]
    )
    sends.campaigns.finish(number)
    page = browser.get(f"/campaigns/{number}")
    assert by_id(page, "campaign-state") == "finished"
    assert by_id(page, "campaign-sent") == "1"
    assert by_id(page, "campaign-done") == "1"
    assert 'value="1"' in tag_with_id(page, "campaign-progress")
    assert "data-refresh" not in page.text
    assert "This send is finished." in page.text


@pytest.mark.parametrize(("delivered", "bar"), [(2, "2"), (3, "2")])
def test_the_progress_bar_never_passes_the_total(
    sends: Sends, browser: Browser, delivered: int, bar: str
) -> None:
    """
    Messages sent again after a crash may count twice: the bar stops at
    the total (at it, and one past it), while the figure says what was
    counted.
    """
    sends.add(b"email\na@example.org\nb@example.org\n")
    number = create_send(browser)
    sends.campaigns.start(number)
    sends.campaigns.record_progress(number, 2, 2)
    sends.campaigns.record_status(
        [StatusUpdate(number, CampaignState.SENDING, None, 1.0, delivered=delivered)]
    )
    page = browser.get(f"/campaigns/{number}")
    progress = tag_with_id(page, "campaign-progress")
    assert f'value="{bar}"' in progress
    assert 'max="2"' in progress
    assert by_id(page, "campaign-done") == str(delivered)
    assert by_id(page, "campaign-eta") == format_time(sends.web.clock.seconds())


@pytest.mark.parametrize("number", ["999", "0", "abc", "1" * 19, "-1"])
def test_an_unknown_send_is_not_found(browser: Browser, number: str) -> None:
    assert browser.get(f"/campaigns/{number}").code == 404
    assert browser.get(f"/campaigns/{number}/cancel").code == 404
    for verb in ("pause", "resume", "cancel"):
        response = browser.submit(f"/campaigns/{number}/{verb}", {}, form_page="/campaigns")
        assert response.code == 404, verb


def test_markup_in_a_send_is_shown_as_text(sends: Sends, browser: Browser) -> None:
    number = create_send(
        browser, subject="<img src=x onerror=alert(1)>", html="<script>alert(2)</script>"
    )
    for path in ("/campaigns", f"/campaigns/{number}"):
        page = browser.get(path)
        assert "<img src=x" not in page.text
        assert "<script>alert" not in page.text
        assert "&lt;img src=x onerror=alert(1)&gt;" in page.text


# --- unsubscribe -----------------------------------------------------------------------


def token_for(sends: Sends, email: str) -> str:
    recipient = sends.people.get("news", email)
    assert recipient is not None
    return sends.people.unsubscribe_url_token("news", recipient.id)


def status_of(sends: Sends, email: str) -> RecipientStatus:
    recipient = sends.people.get("news", email)
    assert recipient is not None
    return recipient.status


def test_the_unsubscribe_link_asks_first_without_a_login(sends: Sends) -> None:
    """
    The link the runner puts in each message (L{unsubscribe_url}) opens a
    page without a session that names the masked address and the list and
    asks; the GET alone (a mail scanner's) unsubscribes nobody.
    """
    sends.add(b"email\nann@example.org\n")
    link = unsubscribe_url(BASE, token_for(sends, "ann@example.org"))
    anonymous = sends.web.browser()
    page = anonymous.get(link.removeprefix(BASE))
    assert page.code == 200
    assert by_id(page, "unsubscribe-email") == "a…@example.org"
    assert by_id(page, "unsubscribe-list") == "news"
    assert "ann@example.org" not in page.text
    form = tag_with_id(page, "unsubscribe-form")
    assert f'action="{link.removeprefix(BASE)}"' in form
    assert 'name="csrf"' not in page.text
    assert status_of(sends, "ann@example.org") is RecipientStatus.SUBSCRIBED


def test_the_unsubscribe_button_unsubscribes_without_a_session(sends: Sends) -> None:
    sends.add(b"email\nann@example.org\n")
    path = "/unsubscribe/" + token_for(sends, "ann@example.org")
    anonymous = sends.web.browser()
    done = anonymous.post(path, {"List-Unsubscribe": "One-Click"})
    assert done.code == 200
    assert "a…@example.org is unsubscribed from news" in by_id(done, "unsubscribe-done")
    assert status_of(sends, "ann@example.org") is RecipientStatus.UNSUBSCRIBED
    again = anonymous.post(path, {})
    assert again.code == 200
    later = anonymous.get(path)
    assert "is not subscribed to news" in by_id(later, "unsubscribe-done")
    assert 'id="unsubscribe-form"' not in later.text


class ForgettingRunner(FakeRunner):
    """
    A runner that records which recipients it is told to forget.
    """

    def __init__(self) -> None:
        super().__init__()
        self.forgotten: list[tuple[str, int]] = []

    def forget_recipient(self, list: str, recipient_id: int) -> int:
        self.forgotten.append((list, recipient_id))
        return 1


def test_an_unsubscribe_has_the_runner_forget_the_recipient(sends: Sends) -> None:
    """
    After an unsubscribe by link the runner is told to cancel that
    recipient's queued messages (by list and id), once per POST; a
    token that is not valid tells it nothing.
    """
    sends.add(b"email\nann@example.org\nbob@example.org\n")
    runner = ForgettingRunner()
    sends.web.ctx.runner = runner
    ann = next(r for r in sends.people.recipients("news") if r.email == "ann@example.org")
    anonymous = sends.web.browser()
    path = "/unsubscribe/" + token_for(sends, "ann@example.org")
    assert anonymous.post(path, {"List-Unsubscribe": "One-Click"}).code == 200
    assert runner.forgotten == [("news", ann.id)]
    assert anonymous.post("/unsubscribe/news~1~" + "A" * 22, {}).code == 404
    assert runner.forgotten == [("news", ann.id)]


def test_an_unsubscribe_works_with_a_runner_that_cannot_forget_or_none(
    sends: Sends,
) -> None:
    """
    A runner without C{forget_recipient}, or no runner, does not stop the
    unsubscribe.
    """
    sends.add(b"email\nann@example.org\nbob@example.org\n")
    anonymous = sends.web.browser()
    assert not hasattr(sends.web.ctx.runner, "forget_recipient")
    path = "/unsubscribe/" + token_for(sends, "ann@example.org")
    assert anonymous.post(path, {}).code == 200
    sends.web.ctx.runner = None
    path = "/unsubscribe/" + token_for(sends, "bob@example.org")
    assert anonymous.post(path, {}).code == 200
    assert status_of(sends, "bob@example.org") is RecipientStatus.UNSUBSCRIBED


def test_a_one_click_post_unsubscribes(sends: Sends) -> None:
    """
    RFC 8058: a mail client POSTs C{List-Unsubscribe=One-Click} to the
    link, as form data or multipart, with no cookie.
    """
    sends.add(b"email\nann@example.org\nbob@example.org\n")
    anonymous = sends.web.browser()
    response = anonymous.request(
        "POST",
        "/unsubscribe/" + token_for(sends, "ann@example.org"),
        body=b"List-Unsubscribe=One-Click",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.code == 200
    assert status_of(sends, "ann@example.org") is RecipientStatus.UNSUBSCRIBED
    body, content_type = multipart({"List-Unsubscribe": "One-Click"}, {})
    response = anonymous.request(
        "POST",
        "/unsubscribe/" + token_for(sends, "bob@example.org"),
        body=body,
        headers={"Content-Type": content_type},
    )
    assert response.code == 200
    assert status_of(sends, "bob@example.org") is RecipientStatus.UNSUBSCRIBED


def test_a_bounced_recipient_can_unsubscribe(sends: Sends) -> None:
    sends.add(b"email\nann@example.org\n")
    sends.people.mark_bounced("news", "ann@example.org")
    anonymous = sends.web.browser()
    path = "/unsubscribe/" + token_for(sends, "ann@example.org")
    assert 'id="unsubscribe-form"' in anonymous.get(path).text
    assert anonymous.post(path, {}).code == 200
    assert status_of(sends, "ann@example.org") is RecipientStatus.UNSUBSCRIBED


def test_a_bad_unsubscribe_token_is_not_found(sends: Sends) -> None:
    """
    A token this gateway did not sign, a tampered one, a malformed or an
    overlong one is a 404 page for GET and POST, and unsubscribes nobody.
    """
    sends.add(b"email\nann@example.org\n")
    good = token_for(sends, "ann@example.org")
    list_name, number, mac = good.split("~")
    tampered = [
        f"{list_name}~{int(number) + 1}~{mac}",
        f"other~{number}~{mac}",
        f"{list_name}~{number}~{'A' * 22}",
        good[:-1],
        "nonsense",
        "x" * 300,
    ]
    anonymous = sends.web.browser()
    for token in tampered:
        for response in (
            anonymous.get(f"/unsubscribe/{token}"),
            anonymous.post(f"/unsubscribe/{token}", {"List-Unsubscribe": "One-Click"}),
        ):
            assert response.code == 404, token
            assert 'id="unsubscribe-unknown"' in response.text
    assert status_of(sends, "ann@example.org") is RecipientStatus.SUBSCRIBED


# --- what is refused ---------------------------------------------------------------------


def test_posts_without_the_csrf_token_are_refused_and_change_nothing(
    sends: Sends, browser: Browser
) -> None:
    sends.add(b"email\na@example.org\n")
    campaign = sends.campaigns.create("news", "Kept", sender="a@example.com", text="x")
    paused = sends.campaigns.create("news", "Paused", sender="a@example.com", text="x")
    sends.campaigns.pause(paused.id)
    before = (emails(sends), sends.campaigns.campaigns())
    posts = [
        ("/lists/news/recipients/import", {"csv": "email\nz@example.org\n"}),
        ("/campaigns/new", SEND),
        (f"/campaigns/{campaign.id}/pause", {}),
        (f"/campaigns/{paused.id}/resume", {}),
        (f"/campaigns/{campaign.id}/cancel", {}),
    ]
    for path, fields in posts:
        for token in ({}, {"csrf": "forged"}):
            response = browser.post(path, {**fields, **token})
            assert response.code == 403, path
            assert (emails(sends), sends.campaigns.campaigns()) == before, path
    assert sends.runner.pokes == 0


def test_without_a_session_pages_redirect_and_posts_are_refused(sends: Sends) -> None:
    campaign = sends.campaigns.create("news", "Kept", sender="a@example.com", text="x")
    before = (emails(sends), sends.campaigns.campaigns())
    anonymous = sends.web.browser()
    for path in (
        "/lists/news/recipients",
        "/campaigns",
        "/campaigns/new",
        f"/campaigns/{campaign.id}",
        f"/campaigns/{campaign.id}/cancel",
    ):
        response = anonymous.get(path)
        assert response.code == 302, path
        location = response.header("location")
        assert location is not None, path
        assert location.startswith("/login?next="), path
    for path in (
        "/lists/news/recipients/import",
        "/campaigns/new",
        f"/campaigns/{campaign.id}/pause",
        f"/campaigns/{campaign.id}/cancel",
    ):
        assert anonymous.post(path, {**SEND, "csrf": "x"}).code == 403, path
    assert (emails(sends), sends.campaigns.campaigns()) == before


def test_without_the_stores_the_pages_say_so(tmp_path: Path) -> None:
    """
    An admin app without the stores (L{None} in its context) answers 503
    pages, the public unsubscribe page included.
    """
    web = make_web_app(tmp_path)
    try:
        web.users.create_list("news")
        browser = web.logged_in()
        for path in (
            "/campaigns",
            "/campaigns/new",
            "/campaigns/1",
            "/lists/news/recipients",
        ):
            assert browser.get(path).code == 503, path
        assert browser.submit("/campaigns/new", SEND, form_page="/lists").code == 503
        assert (
            browser.submit(
                "/lists/news/recipients/import", {"csv": "email\na@b.c\n"}, form_page="/lists"
            ).code
            == 503
        )
        anonymous = web.browser()
        assert anonymous.get("/unsubscribe/news~1~" + "A" * 22).code == 503
        assert anonymous.post("/unsubscribe/news~1~" + "A" * 22, {}).code == 503
    finally:
        web.close()


def test_the_import_is_open_on_an_empty_list(browser: Browser) -> None:
    """
    A list without recipients shows the import form unfolded, and says so.
    """
    page = browser.get("/lists/other/recipients")
    assert page.code == 200
    assert 'open="open"' in tag_with_id(page, "import")
    assert by_id(page, "count-subscribed") == "0"
    assert "Nothing here yet." in by_id(page, "recipients")


def test_a_send_posted_as_multipart_keeps_its_text(sends: Sends, browser: Browser) -> None:
    """
    The form is sent as multipart (so a large body is not tripled by
    percent-encoding): letters beyond ASCII and line breaks arrive as typed.
    """
    response = post_multipart(
        browser,
        "/campaigns/new",
        {**SEND, "subject": "Zoë\u2019s news", "text": "Grüße\r\n{{name}}\r\n"},
        form_page="/campaigns/new",
    )
    assert response.code == 303, response.text
    (campaign,) = sends.campaigns.campaigns()
    assert campaign.subject == "Zoë\u2019s news"
    assert campaign.text == "Grüße\n{{name}}\n"


def bad_csv_of(size: int) -> bytes:
    """
    A CSV of exactly C{size} bytes with one good row and bad ones.
    """
    head = b"email\nok@example.org\n"
    row = b"not-an-address-" + b"x" * 84 + b"\n"
    rows, left = divmod(size - len(head), len(row))
    data = head + row * rows
    if left:
        data += b"y" * (left - 1) + b"\n"
    assert len(data) == size
    return data


@pytest.mark.parametrize(("size", "shown"), [(ECHO_LIMIT, True), (ECHO_LIMIT + 1, False)])
def test_the_rows_are_shown_again_up_to_a_limit(
    sends: Sends, browser: Browser, size: int, shown: bool
) -> None:
    """
    After an import with bad rows, a file up to L{ECHO_LIMIT} bytes is put
    back in the text box; a larger one must be chosen again, as the page
    says.
    """
    data = bad_csv_of(size)
    response = post_multipart(
        browser,
        "/lists/news/recipients/import",
        {"csv": ""},
        {"file": data},
        form_page="/lists/news/recipients",
    )
    assert response.code == 400
    assert emails(sends) == []
    textarea = re.search(r'<textarea name="csv"[^>]*>(.*?)</textarea>', response.text, re.DOTALL)
    assert textarea
    echoed = html.unescape(textarea.group(1))
    if shown:
        assert echoed == "\n" + data.decode()
        assert "choose the file again" not in response.text
    else:
        assert echoed == "\n"
        assert "choose the file again" in response.text
