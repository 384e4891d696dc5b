"""
The pages of lists and SMTP+ users, in memory: the lists, the SMTP+
settings of a list with its users, add/edit user with errors beside the
fields, the password shown once, regenerate, delete with confirmation, and
what they must never do (show a hash or an old password, run a note's
markup, act on a POST without the CSRF token).
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from pathlib import Path

import pytest

from smtpgw.database import StoreError
from smtpgw.model import Enforcement, Priority, SmtpUser
from smtpgw.passwords import verify_password
from smtpgw.userstore import SQLiteUserStore
from smtpgw.validation import MAX_NOTES_LENGTH
from tests.web_support import Browser, Response, WebApp, error_beside, make_web_app
from web.context import GatewaySettings
from web.pages_lists import ports_in_words, priority_label

NEW_PASSWORD = re.compile(r'<code id="new-password">([^<]+)</code>')


def user_fields(**changes: str) -> dict[str, str]:
    """
    A valid add/edit user form, with some fields changed.
    """
    fields = {
        "active": "yes",
        "priority": "3",
        "notes": "",
        "authorized_domains": "example.com",
        "authorized_senders": "",
        "enforcement": "enforce",
    }
    fields.update(changes)
    return fields


def create_user(browser: Browser, list_name: str, **changes: str) -> tuple[str, str]:
    """
    Add a user through the pages.

    @return: its username and the password shown once.
    """
    path = f"/lists/{list_name}/users/new"
    response = browser.submit(path, user_fields(**changes))
    assert response.code == 303, response.text
    location = response.header("location")
    assert location is not None
    assert location.startswith("/users/")
    username = location.removeprefix("/users/")
    page = browser.get(location)
    match = NEW_PASSWORD.search(page.text)
    assert match, "no password shown after creating the user"
    return username, html.unescape(match.group(1))


def assert_no_secrets(web: WebApp, *pages: Response) -> None:
    """
    No page shows a bcrypt hash, or any stored hash.
    """
    hashes = [user.password_hash.decode() for user in web.users.users()]
    for page in pages:
        assert "$2b$" not in page.text
        assert "$2a$" not in page.text
        for hashed in hashes:
            assert hashed not in page.text


# -- pure helpers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("23,25,26,587,1025-5000", "23, 25, 26, 587 and 1025\u20135000"),
        ("25", "25"),
        ("587,25", "25 and 587"),
        ("25,26,27", "25\u201327"),
        ("nonsense", "nonsense"),
    ],
)
def test_ports_are_said_in_words(spec: str, words: str) -> None:
    """
    The ports of C{--ports} are listed as a sentence says them, ranges with
    an en dash; an unreadable spec is shown as given.
    """
    assert ports_in_words(spec) == words


def test_priorities_are_said_in_words() -> None:
    """
    Every priority has its number and its word.
    """
    assert [priority_label(p) for p in Priority] == [
        "1 — very high",
        "2 — high",
        "3 — normal",
        "4 — low",
        "5 — very low",
    ]


# -- lists ------------------------------------------------------------------


def test_lists_page_shows_every_list_with_its_user_count(web: WebApp, browser: Browser) -> None:
    """
    The lists page lists each list, linked, with its number of SMTP+ users
    and when it was created, and has the form for a new list.
    """
    web.users.create_list("alpha")
    web.users.create_list("beta")
    web.users.create_user("alpha", rounds=4)
    web.users.create_user("alpha", rounds=4)
    page = browser.get("/lists")
    assert page.code == 200
    assert '<a href="/lists/alpha">alpha</a></td><td>2</td>' in page.text
    assert '<a href="/lists/beta">beta</a></td><td>0</td>' in page.text
    assert "2027-01-15 08:00:00 UTC" in page.text
    assert '<form method="post" action="/lists" id="new-list"' in page.text
    assert 'name="name"' in page.text


def test_creating_a_list_redirects_to_its_page(web: WebApp, browser: Browser) -> None:
    """
    A valid name makes the list and leads to its page, with a notice.
    """
    response = browser.submit("/lists", {"name": "news"}, form_page="/lists")
    assert response.code == 303
    assert response.header("location") == "/lists/news"
    assert web.users.get_list("news") is not None
    page = browser.get("/lists/news")
    assert "List news created." in page.text


@pytest.mark.parametrize("name", ["Bad Name", "-dash", "", "a" * 65])
def test_a_bad_list_name_is_shown_beside_the_field(
    web: WebApp, browser: Browser, name: str
) -> None:
    """
    A name the store would refuse is refused with the reason beside the
    name field, and nothing is created.
    """
    response = browser.submit("/lists", {"name": name}, form_page="/lists")
    assert response.code == 400
    assert "not a valid list name" in error_beside(response, "name")
    assert web.users.lists() == []


def test_list_names_at_the_length_limit_are_accepted(web: WebApp, browser: Browser) -> None:
    """
    A 64-character name is the longest accepted (65 is refused above).
    """
    response = browser.submit("/lists", {"name": "a" * 64}, form_page="/lists")
    assert response.code == 303
    assert web.users.get_list("a" * 64) is not None


def test_a_duplicate_list_is_refused_beside_the_field(web: WebApp, browser: Browser) -> None:
    """
    Creating a list that exists says so beside the name field.
    """
    web.users.create_list("news")
    response = browser.submit("/lists", {"name": "news"}, form_page="/lists")
    assert response.code == 409
    assert "already exists" in error_beside(response, "name")
    assert len(web.users.lists()) == 1


# -- the SMTP+ settings of a list --------------------------------------------


def test_list_page_shows_the_smtp_settings(web: WebApp, browser: Browser) -> None:
    """
    The list's page gives the server address, the ports in words, STARTTLS
    optional on every port, and the AUTH mechanisms.
    """
    web.users.create_list("news")
    page = browser.get("/lists/news")
    assert page.code == 200
    assert '<dl class="settings">' in page.text
    assert ">mail.example.test</dd>" in page.text
    assert ">23, 25, 26, 587 and 1025\u20135000</dd>" in page.text
    assert "STARTTLS, optional on every port" in page.text
    assert "AUTH PLAIN, LOGIN" in page.text
    assert '<a href="/lists/news/users/new" id="add-user"' in page.text
    assert ">Add new user</a>" in page.text


def test_list_page_says_when_tls_is_required(tmp_path: Path) -> None:
    """
    With C{--require-tls} the page says STARTTLS is required before AUTH,
    and shows the ports C{--ports} gives.
    """
    web = make_web_app(
        tmp_path, settings=GatewaySettings("smtp.example.test", "587,2525", require_tls=True)
    )
    try:
        web.users.create_list("news")
        page = web.logged_in().get("/lists/news")
        assert "STARTTLS required before AUTH" in page.text
        assert "optional on every port" not in page.text
        assert ">587 and 2525</dd>" in page.text
        assert ">smtp.example.test</dd>" in page.text
    finally:
        web.close()


def users_table(page: Response) -> str:
    match = re.search(r'<table id="users">.*?</table>', page.text, re.DOTALL)
    assert match, "no users table"
    return match.group(0)


def test_list_page_shows_every_user_active_or_not(web: WebApp, browser: Browser) -> None:
    """
    The users table has every user of the list (and only of this list),
    active or not, with each field in words and Edit/Delete links.
    """
    web.users.create_list("news")
    web.users.create_list("other")
    active, _ = web.users.create_user(
        "news",
        priority=1,
        domains="example.com;mail.example.com",
        senders="boss@example.org",
        notes="the shop",
        rounds=4,
    )
    inactive, _ = web.users.create_user(
        "news", priority=5, domains="example.net", active=False, enforcement="monitor", rounds=4
    )
    elsewhere, _ = web.users.create_user("other", domains="example.com", rounds=4)
    web.users.record_logins([(active.username, 1_800_000_100.0, "192.0.2.7")])
    page = browser.get("/lists/news")
    users = users_table(page)
    assert active.username in users
    assert inactive.username in users
    assert elsewhere.username not in users
    for text in (
        ">active<",
        ">inactive<",
        "1 — very high",
        "5 — very low",
        "the shop",
        "mail.example.com",
        "boss@example.org",
        ">monitor<",
        ">enforce<",
        "2027-01-15 08:01:40 UTC from 192.0.2.7",
        ">never<",
    ):
        assert text in users, text
    for user in (active, inactive):
        assert f'href="/users/{user.username}"' in users
        assert f'href="/users/{user.username}/delete"' in users
    assert "no sender passes" not in users
    assert_no_secrets(web, page)


def test_a_user_whom_no_sender_passes_gets_a_warning(web: WebApp, browser: Browser) -> None:
    """
    A user with neither domains nor senders is marked, beside it, as one
    no sender passes; on the list and on its own page.
    """
    web.users.create_list("news")
    empty, _ = web.users.create_user("news", rounds=4)
    page = browser.get("/lists/news")
    row = re.search(rf"<tr><td><a href=\"/users/{empty.username}\".*?</tr>", page.text)
    assert row, "no row for the user"
    assert '<span class="badge warn"' in row.group(0)
    assert "no sender passes" in row.group(0)
    assert "no sender passes" in browser.get(f"/users/{empty.username}").text


def test_an_unknown_list_is_not_found(browser: Browser) -> None:
    """
    Every page of a list that does not exist answers 404.
    """
    for path in ("/lists/nope", "/lists/nope/users/new", "/lists/nope/delete"):
        response = browser.get(path)
        assert response.code == 404, path
        assert "There is no list of that name." in response.text
    for path in ("/lists/nope/users/new", "/lists/nope/delete"):
        assert browser.submit(path, user_fields(), form_page="/lists").code == 404


# -- deleting a list ---------------------------------------------------------


def test_deleting_a_list_asks_first_then_deletes(web: WebApp, browser: Browser) -> None:
    """
    The Delete list link leads to a confirmation page; confirming deletes
    the list and goes back to the lists with a notice.
    """
    web.users.create_list("news")
    page = browser.get("/lists/news")
    assert 'href="/lists/news/delete" id="delete-list"' in page.text
    confirm = browser.get("/lists/news/delete")
    assert confirm.code == 200
    assert 'id="confirm-delete"' in confirm.text
    assert web.users.get_list("news") is not None, "the confirmation page deleted"
    response = browser.submit("/lists/news/delete", {}, form_page="/lists/news/delete")
    assert response.code == 303
    assert response.header("location") == "/lists"
    assert web.users.get_list("news") is None
    assert "List news deleted." in browser.get("/lists").text


def test_a_list_with_users_is_not_deleted(web: WebApp, browser: Browser) -> None:
    """
    When the store refuses (the list still has users) the page says so
    clearly and the list stays.
    """
    web.users.create_list("news")
    web.users.create_user("news", domains="example.com", rounds=4)
    confirm = browser.get("/lists/news/delete")
    assert "still has 1 SMTP+ user(s)" in confirm.text
    response = browser.submit("/lists/news/delete", {}, form_page="/lists/news/delete")
    assert response.code == 409
    assert "was not deleted: it still has SMTP+ users" in response.text
    assert web.users.get_list("news") is not None


def test_a_list_with_console_sends_is_not_deleted(
    web: WebApp, browser: Browser, tmp_path: Path
) -> None:
    """
    When the store refuses because the list has had console sends (and
    no users are left), the page says that, not "SMTP+ users", and the
    list stays.
    """
    from smtpgw.campaigns import SQLiteCampaignStore

    web.users.create_list("news")
    user, _ = web.users.create_user("news", domains="example.com", rounds=4)
    with SQLiteCampaignStore.open(tmp_path / "smtpgw.db", web.clock) as sends:
        sends.create("news", "Spring", sender="a@example.com", text="t")
    web.users.delete_user(user.username)
    response = browser.submit("/lists/news/delete", {}, form_page="/lists/news/delete")
    assert response.code == 409
    assert "was not deleted: it has console sends" in response.text
    assert "SMTP+ user" not in response.text
    assert web.users.get_list("news") is not None


# -- adding a user -----------------------------------------------------------


def test_new_user_form_has_every_field(web: WebApp, browser: Browser) -> None:
    """
    The add-user form has every field of a user, with the defaults: active,
    priority 3, enforce.
    """
    web.users.create_list("news")
    page = browser.get("/lists/news/users/new")
    assert page.code == 200
    text = page.text
    assert 'type="checkbox" name="active" id="f-active" value="yes" checked="checked"' in text
    assert '<select name="priority" id="f-priority">' in text
    assert '<option value="3" selected="selected">3 — normal</option>' in text
    for value in ("1", "2", "4", "5"):
        assert f'<option value="{value}">' in text
    assert '<textarea name="notes" id="f-notes"' in text
    assert 'name="authorized_domains"' in text
    assert 'name="authorized_senders"' in text
    assert '<option value="enforce" selected="selected">' in text
    assert '<option value="monitor">' in text
    assert "Monitor accepts it but still raises the sender-domain alert" in text
    assert 'id="save-user"' in text


def test_creating_a_user_shows_its_password_once(web: WebApp, browser: Browser) -> None:
    """
    Saving the form makes the user with every field as entered, then its
    page shows the generated password once, with a copy button; a reload
    shows it no more.
    """
    web.users.create_list("news")
    response = browser.submit(
        "/lists/news/users/new",
        user_fields(
            priority="2",
            notes="line one\r\nline two",
            authorized_domains="Example.COM; mail.example.com",
            authorized_senders="Boss@Example.org",
            enforcement="monitor",
            active="",
        ),
    )
    assert response.code == 303
    (user,) = web.users.users("news")
    assert response.header("location") == f"/users/{user.username}"
    assert user.priority is Priority.HIGH
    assert user.notes == "line one\nline two"
    assert user.authorized_domains == ("example.com", "mail.example.com")
    assert user.authorized_senders == ("boss@example.org",)
    assert user.enforcement is Enforcement.MONITOR
    assert user.active is True, "a checkbox sent with any value is checked"

    first = browser.get(f"/users/{user.username}")
    match = NEW_PASSWORD.search(first.text)
    assert match
    password = html.unescape(match.group(1))
    assert verify_password(password, user.password_hash)
    assert 'class="secret"' in first.text
    assert '<button type="button" class="small" hidden="hidden" data-copy="new-password">' in (
        first.text
    )
    assert "it will not be shown again" in first.text
    assert f"SMTP+ user {user.username} created." in first.text

    again = browser.get(f"/users/{user.username}")
    assert again.code == 200
    assert password not in again.text
    assert 'id="new-password"' not in again.text
    assert_no_secrets(web, first, again, browser.get("/lists/news"))


def test_an_unchecked_active_box_makes_an_inactive_user(web: WebApp, browser: Browser) -> None:
    """
    A browser sends nothing for an unchecked box: the user is inactive.
    """
    web.users.create_list("news")
    fields = user_fields()
    del fields["active"]
    response = browser.submit("/lists/news/users/new", fields)
    assert response.code == 303
    (user,) = web.users.users("news")
    assert user.active is False


def test_the_password_is_only_shown_to_the_session_that_made_it(
    web: WebApp, browser: Browser
) -> None:
    """
    Another admin session opening the new user's page sees no password.
    """
    web.users.create_list("news")
    response = browser.submit("/lists/news/users/new", user_fields())
    location = response.header("location")
    assert location is not None
    other = web.logged_in().get(location)
    assert other.code == 200
    assert 'id="new-password"' not in other.text
    assert 'id="new-password"' in browser.get(location).text


@pytest.mark.parametrize(
    ("changes", "name", "reason"),
    [
        ({"authorized_domains": "example.com;bad..com"}, "authorized_domains", "'bad..com'"),
        ({"authorized_domains": "localhost"}, "authorized_domains", "two labels"),
        ({"authorized_domains": "a.com;;b.com"}, "authorized_domains", "entry 2 is empty"),
        ({"authorized_senders": "nobody"}, "authorized_senders", "'nobody'"),
        ({"authorized_senders": "a b@example.com"}, "authorized_senders", "local part"),
        ({"priority": "0"}, "priority", "not a priority"),
        ({"priority": "6"}, "priority", "not a priority"),
        ({"priority": "high"}, "priority", "not a priority"),
        ({"notes": "x" * (MAX_NOTES_LENGTH + 1)}, "notes", "more than the 2000 allowed"),
        ({"enforcement": "lenient"}, "enforcement", "not an enforcement mode"),
    ],
)
def test_a_bad_field_is_shown_beside_it_and_nothing_is_created(
    web: WebApp, browser: Browser, changes: Mapping[str, str], name: str, reason: str
) -> None:
    """
    A value the store would refuse is answered 400 with the reason beside
    its field; the form keeps what was typed; no user is created.
    """
    web.users.create_list("news")
    response = browser.submit("/lists/news/users/new", user_fields(**changes))
    assert response.code == 400
    assert reason in error_beside(response, name)
    assert web.users.users("news") == []
    typed = changes.get("authorized_domains") or changes.get("authorized_senders")
    if typed:
        assert f'value="{html.escape(typed)}"' in response.text


def test_every_bad_field_is_shown_at_once(web: WebApp, browser: Browser) -> None:
    """
    Several bad fields each get their own error beside them.
    """
    web.users.create_list("news")
    response = browser.submit(
        "/lists/news/users/new",
        user_fields(authorized_domains="bad..com", authorized_senders="nobody", priority="9"),
    )
    assert response.code == 400
    for name in ("authorized_domains", "authorized_senders", "priority"):
        error_beside(response, name)
    assert 'id="error-notes"' not in response.text


def test_notes_at_the_length_limit_are_kept(web: WebApp, browser: Browser) -> None:
    """
    Notes of exactly the limit are accepted (one more is refused above),
    and a line break sent as CRLF counts as one character.
    """
    web.users.create_list("news")
    notes = "x" * (MAX_NOTES_LENGTH - 2) + "\r\ny"
    response = browser.submit("/lists/news/users/new", user_fields(notes=notes))
    assert response.code == 303
    (user,) = web.users.users("news")
    assert len(user.notes) == MAX_NOTES_LENGTH


def test_markup_in_notes_is_shown_as_text(web: WebApp, browser: Browser) -> None:
    """
    A note with a script element is escaped on the list and on the user's
    page, never run.
    """
    web.users.create_list("news")
    note = '<script>alert("x")</script>'
    username, _ = create_user(browser, "news", notes=note)
    for path in ("/lists/news", f"/users/{username}"):
        page = browser.get(path)
        assert "<script>alert" not in page.text
        assert "&lt;script&gt;alert" in page.text


# -- editing a user ----------------------------------------------------------


def test_edit_page_shows_every_field_of_the_user(web: WebApp, browser: Browser) -> None:
    """
    The edit form is filled with the user's record, its username shown but
    not editable, with a regenerate button and a delete link.
    """
    web.users.create_list("news")
    user, _ = web.users.create_user(
        "news",
        priority=4,
        domains="example.com;example.net",
        senders="a@example.org",
        notes="memo",
        active=False,
        enforcement="monitor",
        rounds=4,
    )
    page = browser.get(f"/users/{user.username}")
    assert page.code == 200
    text = page.text
    assert f'id="f-username" value="{user.username}" readonly="readonly"' in text
    assert 'name="active" id="f-active" value="yes" />' in text, "inactive shown as active"
    assert '<option value="4" selected="selected">4 — low</option>' in text
    assert ">\nmemo</textarea>" in text
    assert 'value="example.com;example.net"' in text
    assert 'value="a@example.org"' in text
    assert '<option value="monitor" selected="selected">' in text
    assert f'action="/users/{user.username}/password"' in text
    assert 'id="regenerate"' in text
    assert f'href="/users/{user.username}/delete"' in text
    assert_no_secrets(web, page)


def test_saving_the_edit_form_changes_the_user(web: WebApp, browser: Browser) -> None:
    """
    Every field of the form is saved; the username and password stay.
    """
    web.users.create_list("news")
    before, _ = web.users.create_user("news", domains="example.com", rounds=4)
    path = f"/users/{before.username}"
    response = browser.submit(
        path,
        user_fields(
            priority="1",
            notes="now urgent",
            authorized_domains="example.net",
            authorized_senders="x@example.com",
            enforcement="monitor",
            active="",
        ),
    )
    assert response.code == 303
    assert response.header("location") == path
    after = web.users.get_user(before.username)
    assert after is not None
    assert after.priority is Priority.VERY_HIGH
    assert after.notes == "now urgent"
    assert after.authorized_domains == ("example.net",)
    assert after.authorized_senders == ("x@example.com",)
    assert after.enforcement is Enforcement.MONITOR
    assert after.password_hash == before.password_hash
    page = browser.get(path)
    assert f"SMTP+ user {before.username} saved." in page.text
    assert 'id="new-password"' not in page.text
    assert "1 — very high" in users_table(browser.get("/lists/news"))


def test_a_bad_edit_is_shown_beside_the_field_and_changes_nothing(
    web: WebApp, browser: Browser
) -> None:
    """
    An edit with a bad domain is answered 400 with the error beside the
    domains field, keeps what was typed, and changes nothing stored.
    """
    web.users.create_list("news")
    before, _ = web.users.create_user("news", domains="example.com", rounds=4)
    path = f"/users/{before.username}"
    response = browser.submit(
        path, user_fields(authorized_domains="bad domain.com", notes="changed")
    )
    assert response.code == 400
    assert "'bad domain.com'" in error_beside(response, "authorized_domains")
    assert 'value="bad domain.com"' in response.text
    assert ">\nchanged</textarea>" in response.text
    assert web.users.get_user(before.username) == before


@pytest.mark.parametrize("priority", ["0", "6"])
def test_an_edit_with_a_priority_out_of_range_is_refused(
    web: WebApp, browser: Browser, priority: str
) -> None:
    """
    Priorities 0 and 6 (one past each end) are refused beside the field.
    """
    web.users.create_list("news")
    before, _ = web.users.create_user("news", domains="example.com", rounds=4)
    response = browser.submit(f"/users/{before.username}", user_fields(priority=priority))
    assert response.code == 400
    assert "use 1 (very high) to 5 (very low)" in error_beside(response, "priority")
    assert web.users.get_user(before.username) == before


def test_edit_notes_at_the_limit_and_one_past(web: WebApp, browser: Browser) -> None:
    """
    Editing the notes to the limit works; one character more is refused.
    """
    web.users.create_list("news")
    user, _ = web.users.create_user("news", domains="example.com", rounds=4)
    path = f"/users/{user.username}"
    over = browser.submit(path, user_fields(notes="n" * (MAX_NOTES_LENGTH + 1)))
    assert over.code == 400
    error_beside(over, "notes")
    at = browser.submit(path, user_fields(notes="n" * MAX_NOTES_LENGTH))
    assert at.code == 303
    saved = web.users.get_user(user.username)
    assert saved is not None
    assert saved.notes == "n" * MAX_NOTES_LENGTH


def test_an_unknown_user_is_not_found(web: WebApp, browser: Browser) -> None:
    """
    Every page and form of a user that does not exist answers 404.
    """
    web.users.create_list("news")
    for path in ("/users/smtp-news-nobody", "/users/smtp-news-nobody/delete"):
        response = browser.get(path)
        assert response.code == 404, path
        assert "There is no SMTP+ user of that name." in response.text
    for path in (
        "/users/smtp-news-nobody",
        "/users/smtp-news-nobody/password",
        "/users/smtp-news-nobody/delete",
    ):
        response = browser.submit(path, user_fields(), form_page="/lists")
        assert response.code == 404, path


# -- regenerating the password -----------------------------------------------


def test_regenerating_shows_the_new_password_once(web: WebApp, browser: Browser) -> None:
    """
    Regenerate replaces the password: the new one is shown once on the
    user's page, the old one neither works nor appears again.
    """
    web.users.create_list("news")
    username, old = create_user(browser, "news")
    path = f"/users/{username}"
    response = browser.submit(f"{path}/password", {}, form_page=path)
    assert response.code == 303
    assert response.header("location") == path
    page = browser.get(path)
    match = NEW_PASSWORD.search(page.text)
    assert match
    new = html.unescape(match.group(1))
    assert new != old
    assert old not in page.text
    user = web.users.get_user(username)
    assert user is not None
    assert verify_password(new, user.password_hash)
    assert not verify_password(old, user.password_hash)
    assert "the old one no longer works" in page.text
    again = browser.get(path)
    assert new not in again.text
    assert old not in again.text
    assert_no_secrets(web, page, again)


# -- deleting a user ---------------------------------------------------------


def test_deleting_a_user_asks_first_then_deletes(web: WebApp, browser: Browser) -> None:
    """
    The delete link leads to a confirmation page (which deletes nothing);
    confirming deletes the user and goes back to its list with a notice.
    """
    web.users.create_list("news")
    user, _ = web.users.create_user("news", domains="example.com", rounds=4)
    path = f"/users/{user.username}/delete"
    confirm = browser.get(path)
    assert confirm.code == 200
    assert 'id="confirm-delete"' in confirm.text
    assert f'href="/users/{user.username}" class="button secondary" id="cancel-delete"' in (
        confirm.text
    )
    assert web.users.get_user(user.username) is not None
    response = browser.submit(path, {})
    assert response.code == 303
    assert response.header("location") == "/lists/news"
    assert web.users.get_user(user.username) is None
    page = browser.get("/lists/news")
    assert f"SMTP+ user {user.username} deleted." in page.text
    assert user.username not in users_table(page)


# -- what the pages must never do --------------------------------------------


def _state(web: WebApp) -> tuple[list[str], list[SmtpUser]]:
    return [item.name for item in web.users.lists()], web.users.users()


def test_posts_without_the_csrf_token_are_refused_and_change_nothing(
    web: WebApp, browser: Browser
) -> None:
    """
    Every form of these pages, posted without (or with a wrong) CSRF token,
    is refused and changes nothing.
    """
    web.users.create_list("news")
    web.users.create_list("empty")
    user, _ = web.users.create_user("news", domains="example.com", rounds=4)
    before = _state(web)
    posts = [
        ("/lists", {"name": "fresh"}),
        ("/lists/empty/delete", {}),
        ("/lists/news/users/new", user_fields()),
        (f"/users/{user.username}", user_fields(priority="1")),
        (f"/users/{user.username}/password", {}),
        (f"/users/{user.username}/delete", {}),
    ]
    for path, fields in posts:
        for token in ({}, {"csrf": "forged"}):
            response = browser.post(path, {**fields, **token})
            assert response.code == 403, path
            assert _state(web) == before, path


def test_without_a_session_pages_redirect_and_posts_are_refused(web: WebApp) -> None:
    """
    Without a session, every page is sent to the login and every form is
    refused (403), changing nothing.
    """
    web.users.create_list("news")
    web.users.create_list("empty")
    user, _ = web.users.create_user("news", domains="example.com", rounds=4)
    before = _state(web)
    anonymous = web.browser()
    for path in (
        "/lists",
        "/lists/news",
        "/lists/news/delete",
        "/lists/news/users/new",
        f"/users/{user.username}",
        f"/users/{user.username}/delete",
    ):
        response = anonymous.get(path)
        assert response.code == 302, path
        location = response.header("location")
        assert location is not None, path
        assert location.startswith("/login?next="), path
    for path in (
        "/lists",
        "/lists/empty/delete",
        "/lists/news/users/new",
        f"/users/{user.username}",
        f"/users/{user.username}/password",
        f"/users/{user.username}/delete",
    ):
        assert anonymous.post(path, {"csrf": "x", "name": "fresh"}).code == 403, path
    assert _state(web) == before


def test_no_page_shows_a_hash(web: WebApp, browser: Browser) -> None:
    """
    After users are made through the pages, no page of theirs shows a
    bcrypt hash.
    """
    web.users.create_list("news")
    username, _ = create_user(browser, "news")
    pages = [
        browser.get(path)
        for path in (
            "/lists",
            "/lists/news",
            "/lists/news/delete",
            "/lists/news/users/new",
            f"/users/{username}",
            f"/users/{username}/delete",
        )
    ]
    assert all(page.code == 200 for page in pages)
    assert_no_secrets(web, *pages)


def test_a_head_request_leaves_the_password_to_be_shown(web: WebApp, browser: Browser) -> None:
    """
    Only a GET of the user's page takes the new password: a HEAD (a link
    checker, a prefetch) does not use up the one showing.
    """
    web.users.create_list("news")
    response = browser.submit("/lists/news/users/new", user_fields())
    location = response.header("location")
    assert location is not None
    head = browser.request("HEAD", location)
    assert head.code == 200
    assert 'id="new-password"' in browser.get(location).text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("create_list", "/lists"),
        ("create_user", "/lists/news/users/new"),
        ("update_user", "/users/{username}"),
        ("regenerate_password", "/users/{username}/password"),
        ("delete_user", "/users/{username}/delete"),
        ("delete_list", "/lists/news/delete"),
    ],
)
def test_a_store_failure_is_a_clear_refusal_not_a_server_error(
    web: WebApp, browser: Browser, monkeypatch: pytest.MonkeyPatch, method: str, path: str
) -> None:
    """
    When the store fails a change with its own error, the page says so with
    a 409 and the store's reason, never a 500.
    """
    web.users.create_list("news")
    user, _ = web.users.create_user("news", domains="example.com", rounds=4)
    form_page = f"/users/{user.username}"

    def fail(*args: object, **kwargs: object) -> None:
        raise StoreError("the database is read-only")

    monkeypatch.setattr(SQLiteUserStore, method, fail)
    fields = {"name": "fresh", **user_fields()}
    response = browser.submit(path.format(username=user.username), fields, form_page=form_page)
    assert response.code == 409
    assert "The change was not made: the database is read-only." in response.text
