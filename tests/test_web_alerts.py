"""
The alert center, in memory, over real rows of the C{alerts} table.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

import pytest

from smtpgw.alerts import MAX_QUERY_LIMIT
from smtpgw.interfaces import Alert
from tests.web_support import Browser, WebApp
from web.app import AdminApp
from web.pages_alerts import (
    ALERT_PAGE_SIZE,
    DETAILS_SHOWN,
    MAX_DETAIL_TEXT,
    AlertPages,
    details_summary,
    read_alert_filter,
)

NOW = 1_800_000_000.0


def add(
    web: WebApp,
    type: str = "sender_domain",
    list: str | None = "news",
    message: str = "app@evil.example is not authorized for u-news",
    details: Mapping[str, Any] | None = None,
    at: float = NOW,
) -> int:
    (alert_id,) = web.alerts.add(
        [Alert(type=type, message=message, created_at=at, list=list, details=details or {})]
    )
    return alert_id


def row_ids(html: str) -> list[int]:
    return [int(n) for n in re.findall(r'<tr id="alert-(\d+)"', html)]


def row_html(html: str, alert_id: int) -> str:
    match = re.search(rf'<tr id="alert-{alert_id}".*?</tr>', html, re.S)
    assert match, f"no row for alert {alert_id}"
    return match.group(0)


def unread_shown(html: str) -> int:
    match = re.search(r'<strong id="alerts-unread">(\d+)</strong>', html)
    assert match
    return int(match.group(1))


def test_alert_center_needs_a_session(web: WebApp) -> None:
    """
    Without a session the alert center sends to the login page and its
    forms are refused.
    """
    alert_id = add(web)
    stranger = web.browser()
    assert stranger.get("/alerts").code == 302
    assert stranger.post(f"/alerts/{alert_id}/read", {"csrf": "x"}).code == 403
    assert web.alerts.unread_count() == 1


def test_table_shows_each_alert_newest_first(web: WebApp, browser: Browser) -> None:
    """
    Each row shows the time, list, type, message, a summary of the
    details and whether it is read; the newest comes first, and the
    unread count is shown.
    """
    first = add(web, type="bounce", message="bounced", at=NOW - 60, details={"code": 550})
    second = add(
        web,
        type="sender_domain",
        details={"sender": "app@evil.example", "username": "u-news"},
    )
    page = browser.get("/alerts")
    assert page.code == 200
    assert '<table id="alerts">' in page.text
    assert row_ids(page.text) == [second, first]
    row = row_html(page.text, second)
    assert "2027-01-15 08:00:00 UTC" in row
    assert "<td>news</td>" in row
    assert "Sender domain not authorized" in row
    assert "app@evil.example is not authorized for u-news" in row
    assert "sender: app@evil.example; username: u-news" in row
    assert ">unread</span>" in row
    assert 'class="unread"' in row
    assert "Bounce" in row_html(page.text, first)
    assert "code: 550" in row_html(page.text, first)
    assert unread_shown(page.text) == 2


def test_markup_in_an_alert_is_shown_as_text(web: WebApp, browser: Browser) -> None:
    """
    Alert texts come from outside (sender addresses, remote servers): a
    C{<script>} in the message, the details, the list or the type is shown
    escaped.
    """
    alert_id = add(
        web,
        type="<b>odd</b>",
        list="<i>l</i>",
        message="<script>alert(1)</script>",
        details={"<x>": "<script>y</script>"},
    )
    page = browser.get("/alerts")
    row = row_html(page.text, alert_id)
    assert "<script>" not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in row
    assert "&lt;x&gt;: &lt;script&gt;y&lt;/script&gt;" in row
    assert "&lt;i&gt;l&lt;/i&gt;" in row
    assert "&lt;b&gt;odd&lt;/b&gt;" in row
    assert "<b>" not in page.text


def test_filters_by_list_type_and_unread(web: WebApp, browser: Browser) -> None:
    """
    The filters narrow the table to one list, one type, or the unread
    ones, and combine; the unread count follows the list filter.
    """
    news_domain = add(web, list="news", type="sender_domain")
    news_bounce = add(web, list="news", type="bounce")
    offers_domain = add(web, list="offers", type="sender_domain")
    gateway = add(web, list=None, type="auth_failures")
    web.alerts.mark_read([news_bounce])
    assert row_ids(browser.get("/alerts?list=news").text) == [news_bounce, news_domain]
    assert row_ids(browser.get("/alerts?type=sender_domain").text) == [
        offers_domain,
        news_domain,
    ]
    assert row_ids(browser.get("/alerts?type=auth_failures").text) == [gateway]
    assert row_ids(browser.get("/alerts?unread=1").text) == [gateway, offers_domain, news_domain]
    both = browser.get("/alerts?list=news&type=bounce")
    assert row_ids(both.text) == [news_bounce]
    assert '<option value="bounce" selected="selected">Bounce</option>' in both.text
    assert unread_shown(browser.get("/alerts?list=news").text) == 1
    assert unread_shown(browser.get("/alerts").text) == 3
    assert row_ids(browser.get("/alerts?type=webhook").text) == []


def test_every_type_the_gateway_raises_is_a_filter(browser: Browser) -> None:
    """
    The type filter offers the types the gateway raises.
    """
    page = browser.get("/alerts")
    for type in ("sender_domain", "delivery", "bounce", "auth_failures", "queue_stalled"):
        assert f'<option value="{type}">' in page.text


def test_bad_filters_are_refused_beside_their_field(web: WebApp, browser: Browser) -> None:
    """
    A list or type filter that cannot be a name is refused beside its
    field (400) and the table is shown unfiltered; a bad page position
    also gets a 400.
    """
    alert_id = add(web)
    page = browser.get("/alerts?list=" + "x" * 201)
    assert page.code == 400
    assert 'id="error-list"' in page.text
    assert row_ids(page.text) == [alert_id]
    assert browser.get("/alerts?list=" + "x" * 200).code == 200
    assert browser.get("/alerts?type=a%00b").code == 400
    assert browser.get("/alerts?before=x").code == 400
    assert browser.get("/alerts?before=" + "9" * 30).code == 400


def test_filter_reading_is_pure() -> None:
    form = read_alert_filter(" news ", "bounce", "1")
    assert (form.list, form.type, form.unread_only, form.errors) == ("news", "bounce", True, {})
    empty = read_alert_filter("", "", "")
    assert (empty.list, empty.type, empty.unread_only) == (None, None, False)
    assert read_alert_filter("", "", "0").unread_only is False


def test_mark_one_alert_read(web: WebApp, browser: Browser) -> None:
    """
    "Mark read" marks that alert only, goes back to the page it was on,
    and the row then shows it read without the button.
    """
    kept = add(web)
    alert_id = add(web)
    response = browser.submit(
        f"/alerts/{alert_id}/read", {"back": "/alerts?list=news"}, form_page="/alerts"
    )
    assert response.code == 303
    assert response.header("location") == "/alerts?list=news"
    assert web.alerts.unread_count() == 1
    page = browser.get("/alerts?list=news")
    assert "Alert marked read." in page.text
    row = row_html(page.text, alert_id)
    assert ">read</span>" in row
    assert "/read" not in row
    assert f'action="/alerts/{kept}/read"' in row_html(page.text, kept)
    again = browser.submit(f"/alerts/{alert_id}/read", {}, form_page="/alerts")
    assert again.code == 303
    assert "already read" in browser.get("/alerts").text


def test_mark_all_shown_marks_only_those_shown(web: WebApp, browser: Browser) -> None:
    """
    "Mark all shown as read" on a filtered page marks the unread alerts of
    that page and no other.
    """
    bounces = [add(web, type="bounce") for _ in range(3)]
    other = add(web, type="delivery")
    page = browser.get("/alerts?type=bounce")
    assert 'id="alerts-mark-all"' in page.text
    ids = re.findall(r'name="id" value="(\d+)"', page.text)
    assert sorted(int(i) for i in ids) == bounces
    response = browser.post(
        "/alerts/read", {"csrf": browser.csrf("/alerts"), "back": "/alerts?type=bounce"}
    )
    assert response.code == 303
    assert web.alerts.unread_count() == 4, "a form without ids marked something"
    fields = [("csrf", browser.csrf("/alerts")), ("back", "/alerts?type=bounce")]
    fields += [("id", i) for i in ids]
    response = post_pairs(browser, "/alerts/read", fields)
    assert response.code == 303
    assert response.header("location") == "/alerts?type=bounce"
    assert web.alerts.unread_count() == 1
    assert [a.id for a in web.alerts.alerts(unread_only=True)] == [other]
    after = browser.get("/alerts?type=bounce")
    assert "3 alerts marked read." in after.text
    assert 'id="alerts-mark-all"' not in after.text


def post_pairs(browser: Browser, path: str, pairs: list[tuple[str, str]]) -> Any:
    """
    POST a form whose fields repeat (as C{id} does).
    """
    return browser.request(
        "POST",
        path,
        body=urlencode(pairs).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )


def test_mark_all_refuses_what_is_not_an_alert_id(web: WebApp, browser: Browser) -> None:
    """
    Ids that are not numbers, or more than one query's worth, are refused
    with a 400 and nothing is marked; exactly the limit is taken.
    """
    alert_id = add(web)
    csrf = browser.csrf("/alerts")
    for bad in ("x", "-1", "1.5", "9" * 30):
        response = post_pairs(browser, "/alerts/read", [("csrf", csrf), ("id", bad)])
        assert response.code == 400, bad
    too_many = [("id", str(alert_id))] * (MAX_QUERY_LIMIT + 1)
    assert post_pairs(browser, "/alerts/read", [("csrf", csrf), *too_many]).code == 400
    assert web.alerts.unread_count() == 1
    at_limit = [("id", str(alert_id))] * MAX_QUERY_LIMIT
    assert post_pairs(browser, "/alerts/read", [("csrf", csrf), *at_limit]).code == 303
    assert web.alerts.unread_count() == 0


def test_unknown_or_huge_alert_id_is_no_server_error(browser: Browser) -> None:
    for alert_id in ("12345", "9" * 30):
        response = browser.submit(f"/alerts/{alert_id}/read", {}, form_page="/alerts")
        assert response.code == 303


def test_back_never_leaves_the_alert_center(web: WebApp, browser: Browser) -> None:
    alert_id = add(web)
    for back in ("https://evil.test/", "//evil.test", "/queue", "/alertsx"):
        response = browser.submit(f"/alerts/{alert_id}/read", {"back": back}, form_page="/alerts")
        assert response.header("location") == "/alerts", back


def test_pages_of_alerts(web: WebApp, browser: Browser) -> None:
    """
    A page shows at most L{ALERT_PAGE_SIZE} alerts: at the size there is
    no older page; one past it the older page has the oldest one.
    """
    ids = [add(web, at=NOW + n) for n in range(ALERT_PAGE_SIZE)]
    full = browser.get("/alerts")
    assert row_ids(full.text) == ids[::-1]
    assert 'id="alerts-older"' not in full.text
    newest = add(web, at=NOW + ALERT_PAGE_SIZE)
    first = browser.get("/alerts")
    assert row_ids(first.text) == [newest, *ids[:0:-1]]
    match = re.search(r'href="([^"]+)" class="button secondary" id="alerts-older"', first.text)
    assert match
    older = browser.get(match.group(1).replace("&amp;", "&"))
    assert row_ids(older.text) == [ids[0]]
    assert 'id="alerts-older"' not in older.text


@pytest.mark.parametrize("path", ["/alerts/{id}/read", "/alerts/read"])
def test_forms_without_the_csrf_token_are_refused(
    web: WebApp, browser: Browser, path: str
) -> None:
    """
    Marking read without (or with a wrong) CSRF token is refused and marks
    nothing.
    """
    alert_id = add(web)
    target = path.format(id=alert_id)
    browser.get("/alerts")
    for data in ({"id": str(alert_id)}, {"id": str(alert_id), "csrf": "wrong"}):
        assert browser.post(target, data).code == 403
    assert web.alerts.unread_count() == 1


def test_details_summary_names_a_few_fields_and_counts_the_rest() -> None:
    """
    The summary names the first L{DETAILS_SHOWN} fields by name (all of
    them at the limit, the count of the others one past it) and cuts long
    values at L{MAX_DETAIL_TEXT} characters.
    """
    at_limit = {f"k{n}": n for n in range(DETAILS_SHOWN)}
    assert details_summary(at_limit) == "; ".join(f"k{n}: {n}" for n in range(DETAILS_SHOWN))
    past = {**at_limit, "z": "last"}
    assert details_summary(past).endswith(" (+1 more)")
    assert "z:" not in details_summary(past)
    assert details_summary({"v": "x" * MAX_DETAIL_TEXT}) == "v: " + "x" * MAX_DETAIL_TEXT
    cut = details_summary({"v": "x" * (MAX_DETAIL_TEXT + 1)})
    assert cut == "v: " + "x" * (MAX_DETAIL_TEXT - 1) + "\u2026"
    assert details_summary({"list": [1, 2], "n": None}) == "list: [1, 2]; n: null"


def test_long_details_are_one_click_away(web: WebApp, browser: Browser) -> None:
    """
    An alert with more details than the summary names shows them all in a
    C{<details>} element (no script needed).
    """
    alert_id = add(web, details={f"k{n}": f"v{n}" for n in range(DETAILS_SHOWN + 1)})
    row = row_html(browser.get("/alerts").text, alert_id)
    assert "<details><summary>" in row
    assert f"<dt>k{DETAILS_SHOWN}</dt><dd>v{DETAILS_SHOWN}</dd>" in row


def test_no_other_page_class_shadows_an_alert_method() -> None:
    """
    Every page class is mixed into one app: each name the alert pages
    define is the alert pages' own in the app (handlers and helpers alike).
    """
    for name, value in vars(AlertPages).items():
        if callable(value) and not name.startswith("__"):
            assert getattr(AdminApp, name) is value, name
