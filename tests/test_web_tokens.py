"""
The API token pages, in memory: a token is shown once, listed without
itself, and refused by the API once revoked.
"""

from __future__ import annotations

import html
import re

import pytest

from smtpgw.admins import MAX_TOKEN_NAME_LENGTH, TOKEN_PREFIX
from tests.web_support import Browser, WebApp
from web.app import AdminApp
from web.pages_tokens import TokenPages


def create(browser: Browser, name: str) -> str:
    """
    Make a token through the form; the token as the page shows it.
    """
    response = browser.submit("/tokens", {"name": name})
    assert response.code == 303, response.text
    assert response.header("location") == "/tokens"
    page = browser.get("/tokens")
    match = re.search(r'<code id="new-token">([^<]+)</code>', page.text)
    assert match, "the new token is not shown"
    return html.unescape(match.group(1))


def api_lists(web: WebApp, token: str) -> int:
    return web.browser().get("/api/v1/lists", headers={"Authorization": f"Bearer {token}"}).code


def test_token_pages_need_a_session(web: WebApp) -> None:
    stranger = web.browser()
    assert stranger.get("/tokens").code == 302
    assert stranger.post("/tokens", {"name": "x", "csrf": "x"}).code == 403
    assert web.admins.tokens() == []


def test_new_token_is_shown_once_with_a_copy_button(web: WebApp, browser: Browser) -> None:
    """
    The page after the form shows the token in a secret box with a copy
    button (hidden until the script shows it); a reload shows it no more,
    and the list never does.
    """
    response = browser.submit("/tokens", {"name": "deploy bot"})
    assert response.code == 303
    page = browser.get("/tokens")
    match = re.search(r'<code id="new-token">([^<]+)</code>', page.text)
    assert match
    token = html.unescape(match.group(1))
    assert token.startswith(TOKEN_PREFIX)
    assert 'class="secret" id="new-token-box"' in page.text
    assert re.search(
        r'<button type="button" class="small" hidden="hidden" data-copy="new-token">Copy</button>',
        page.text,
    )
    assert "API token 'deploy bot' created." in html.unescape(page.text)
    again = browser.get("/tokens")
    assert token not in again.text
    assert 'id="new-token"' not in again.text
    assert "deploy bot" in again.text
    (stored,) = web.admins.tokens()
    row = re.search(rf'<tr id="token-{stored.id}">.*?</tr>', again.text, re.S)
    assert row
    assert "<td>deploy bot</td><td>admin</td>" in row.group(0)
    assert "never" in row.group(0)


def test_the_new_token_is_for_its_session_only(web: WebApp, browser: Browser) -> None:
    """
    Another admin session loading the page does not see the token.
    """
    browser.submit("/tokens", {"name": "mine"})
    other = web.logged_in()
    assert 'id="new-token"' not in other.get("/tokens").text
    assert 'id="new-token"' in browser.get("/tokens").text


def test_token_works_with_the_api_and_last_use_is_shown(web: WebApp, browser: Browser) -> None:
    """
    The token shown authorizes API requests; its last use appears in the
    list.
    """
    token = create(browser, "ci")
    assert api_lists(web, token) == 200
    (stored,) = web.admins.tokens()
    page = browser.get("/tokens")
    row = re.search(rf'<tr id="token-{stored.id}">.*?</tr>', page.text, re.S)
    assert row
    assert "never" not in row.group(0)
    assert "2027-01-15 08:00:00 UTC" in row.group(0)


def test_revoke_asks_first_then_the_api_refuses_the_token(web: WebApp, browser: Browser) -> None:
    """
    Revoke shows a confirmation page (which changes nothing); confirming
    deletes the token, and the API refuses it from then on.
    """
    token = create(browser, "old app")
    kept = create(browser, "new app")
    old_id = web.admins.tokens()[0].id
    confirm = browser.get(f"/tokens/{old_id}/revoke")
    assert confirm.code == 200
    assert 'id="revoke-confirm"' in confirm.text
    assert "old app" in confirm.text
    assert api_lists(web, token) == 200
    response = browser.submit(f"/tokens/{old_id}/revoke", {}, form_page=f"/tokens/{old_id}/revoke")
    assert response.code == 303
    assert response.header("location") == "/tokens"
    assert api_lists(web, token) == 401
    assert api_lists(web, kept) == 200
    page = browser.get("/tokens")
    assert "The API token is revoked." in page.text
    assert f'id="token-{old_id}"' not in page.text
    again = browser.submit(f"/tokens/{old_id}/revoke", {}, form_page="/tokens")
    assert again.code == 404


@pytest.mark.parametrize("token_id", ["999", "9" * 30])
def test_unknown_token_is_a_404_page(browser: Browser, token_id: str) -> None:
    assert browser.get(f"/tokens/{token_id}/revoke").code == 404
    assert browser.submit(f"/tokens/{token_id}/revoke", {}, form_page="/tokens").code == 404


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("x" * (MAX_TOKEN_NAME_LENGTH + 1), f"at most {MAX_TOKEN_NAME_LENGTH} characters"),
        ("a\x07b", "control character"),
    ],
)
def test_bad_name_is_refused_beside_the_field(
    web: WebApp, browser: Browser, name: str, error: str
) -> None:
    """
    A name that is empty, too long (one past the limit) or has a control
    character is refused beside the field with a 400, and no token is made.
    """
    response = browser.submit("/tokens", {"name": name})
    assert response.code == 400
    assert 'id="error-name"' in response.text
    assert error in response.text
    assert web.admins.tokens() == []


def test_name_at_the_limit_is_taken(web: WebApp, browser: Browser) -> None:
    create(browser, "n" * MAX_TOKEN_NAME_LENGTH)
    assert web.admins.tokens()[0].name == "n" * MAX_TOKEN_NAME_LENGTH


def test_markup_in_a_token_name_is_escaped(browser: Browser) -> None:
    create(browser, "<script>alert(1)</script>")
    page = browser.get("/tokens")
    assert "<script>alert" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


def test_token_never_appears_after_the_page_that_shows_it(web: WebApp, browser: Browser) -> None:
    """
    Neither the list, the revoke page, nor the store's records carry the
    token after the one page that showed it.
    """
    token = create(browser, "secret holder")
    token_id = web.admins.tokens()[0].id
    for path in ("/tokens", f"/tokens/{token_id}/revoke", "/"):
        assert token not in browser.get(path).text, path
    assert token not in repr(web.admins.tokens())


@pytest.mark.parametrize(
    ("path", "data"), [("/tokens", {"name": "x"}), ("/tokens/{id}/revoke", {})]
)
def test_forms_without_the_csrf_token_are_refused(
    web: WebApp, browser: Browser, path: str, data: dict[str, str]
) -> None:
    """
    Creating or revoking a token without (or with a wrong) CSRF token is
    refused and changes nothing.
    """
    token = create(browser, "existing")
    before = web.admins.tokens()
    target = path.format(id=before[0].id)
    for csrf in ({}, {"csrf": "wrong"}):
        assert browser.post(target, {**data, **csrf}).code == 403
    assert web.admins.tokens() == before
    assert api_lists(web, token) == 200


def test_no_other_page_class_shadows_a_token_method() -> None:
    for name, value in vars(TokenPages).items():
        if callable(value) and not name.startswith("__"):
            assert getattr(AdminApp, name) is value, name
