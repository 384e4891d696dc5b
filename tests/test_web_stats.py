"""
The statistics page, in memory, over a fake of L{smtpgw.stats.DailyStats}
that answers with fixed per-list days.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.web.template import flattenString

from smtpgw.stats import DayCounts
from tests.web_support import Browser, WebApp, make_web_app
from web.app import AdminApp
from web.pages_stats import CHART_HEIGHT, SERIES, StatsPages, bar_chart

TODAY = datetime.date(2027, 1, 15)


class FakeStats:
    """
    Days of counts per list; every other day of the period is zeros. The
    figures of list C{news} on the day C{n} days ago are C{(n, 2n, 3n, 4n)}
    plus 1 each, and C{offers} has 100 accepted today.
    """

    def __init__(self) -> None:
        self.asked: list[tuple[str | None, int]] = []

    def _day(self, list: str | None, ago: int) -> DayCounts:
        day = (TODAY - datetime.timedelta(days=ago)).isoformat()
        news = [(ago + 1) * k for k in (1, 2, 3, 4)]
        offers = [100 if ago == 0 else 0, 0, 0, 0]
        if list == "news":
            values = news
        elif list == "offers":
            values = offers
        elif list is None:
            values = [a + b for a, b in zip(news, offers, strict=True)]
        else:
            values = [0, 0, 0, 0]
        return DayCounts(day, *values)

    def days(self, list: str | None, count: int) -> Deferred[list[DayCounts]]:
        self.asked.append((list, count))
        return succeed([self._day(list, ago) for ago in range(count - 1, -1, -1)])

    def today(self, list: str | None = None) -> Deferred[dict[str, Any]]:
        return succeed({**self._day(list, 0).as_dict(), "list": list})


@pytest.fixture
def stats() -> FakeStats:
    return FakeStats()


@pytest.fixture
def web(tmp_path: Path, stats: FakeStats) -> Iterator[WebApp]:
    app = make_web_app(tmp_path, stats=stats)
    app.users.create_list("news")
    app.users.create_list("offers")
    yield app
    app.close()


@pytest.fixture
def browser(web: WebApp) -> Browser:
    return web.logged_in()


def bars(html: str) -> list[dict[str, str]]:
    found = []
    for tag in re.findall(r"<rect [^>]*>", html):
        found.append(dict(re.findall(r'([a-z-]+)="([^"]*)"', tag)))
    return found


def table_rows(html: str) -> list[list[str]]:
    match = re.search(r'<table id="stats-table">.*?<tbody>(.*?)</tbody>', html, re.S)
    assert match
    return [
        re.findall(r"<t[hd][^>]*>([^<]*)</t[hd]>", row)
        for row in re.findall(r"<tr>(.*?)</tr>", match.group(1), re.S)
    ]


def test_stats_page_needs_a_session(web: WebApp) -> None:
    assert web.browser().get("/stats").code == 302


@pytest.mark.parametrize(("query", "days"), [("", 14), ("?days=14", 14), ("?days=30", 30)])
def test_chart_has_one_bar_per_day_and_series(
    browser: Browser, stats: FakeStats, query: str, days: int
) -> None:
    """
    The chart of the last 14 (the default) or 30 days has a bar for each
    figure of each day, zeros included, each carrying its day, series and
    value.
    """
    page = browser.get("/stats" + query)
    assert page.code == 200
    assert '<svg viewBox="' in page.text
    assert 'id="stats-chart"' in page.text
    assert 'class="chart"' in page.text
    found = bars(page.text)
    assert len(found) == days * len(SERIES)
    assert stats.asked[-1] == (None, days)
    first_day = (TODAY - datetime.timedelta(days=days - 1)).isoformat()
    assert [b["data-series"] for b in found[:4]] == list(SERIES)
    assert {b["data-day"] for b in found[:4]} == {first_day}
    assert {b["data-day"] for b in found[-4:]} == {TODAY.isoformat()}
    assert [b["data-value"] for b in found[-4:]] == ["101", "2", "3", "4"]
    assert f"<title>{TODAY.isoformat()} accepted: 101</title>" in page.text


def test_bars_are_scaled_to_the_largest_figure(browser: Browser) -> None:
    """
    The largest figure fills the chart's height, the others in proportion,
    with SVG attributes and no inline style.
    """
    page = browser.get("/stats?list=news")
    found = bars(page.text)
    top = max(int(b["data-value"]) for b in found)
    assert top == 14 * 4
    for bar in found:
        height = float(bar["height"])
        assert height == pytest.approx(int(bar["data-value"]) / top * CHART_HEIGHT, abs=0.01)
        assert float(bar["y"]) == pytest.approx(CHART_HEIGHT - height, abs=0.01)
        assert "style" not in bar
        assert bar["class"] == f"bar {bar['data-series']}"
    assert " style=" not in page.text


def test_table_has_the_same_figures(browser: Browser) -> None:
    """
    The table lists each day (newest first) with the chart's figures, and
    the period's totals.
    """
    page = browser.get("/stats?list=news")
    rows = table_rows(page.text)
    assert len(rows) == 14
    assert rows[0] == [TODAY.isoformat(), "1", "2", "3", "4"]
    assert rows[-1] == [(TODAY - datetime.timedelta(days=13)).isoformat(), "14", "28", "42", "56"]
    total = sum(range(1, 15))
    assert re.search(
        rf"<tfoot><tr><th scope=\"row\">Total</th><td>{total}</td><td>{2 * total}</td>",
        page.text,
    )


def test_totals_for_today_follow_the_list(browser: Browser, stats: FakeStats) -> None:
    """
    Today's totals are those of the chosen list, or of all lists.
    """
    every = browser.get("/stats")
    assert '<div class="figure" id="today-accepted">101</div>' in every.text
    assert '<div class="figure" id="today-bounced">4</div>' in every.text
    offers = browser.get("/stats?list=offers")
    assert '<div class="figure" id="today-accepted">100</div>' in offers.text
    assert '<div class="figure" id="today-delivered">0</div>' in offers.text
    assert stats.asked[-1] == ("offers", 14)
    assert '<option value="offers" selected="selected">offers</option>' in offers.text


def test_bad_period_or_list_is_refused_beside_its_field(browser: Browser) -> None:
    """
    A period other than those offered, or a list that cannot be a name, is
    refused beside its field (400); the page still shows the default.
    """
    for days in ("7", "31", "x", "-14"):
        page = browser.get(f"/stats?days={days}")
        assert page.code == 400, days
        assert 'id="error-days"' in page.text
        assert len(bars(page.text)) == 14 * len(SERIES)
    page = browser.get("/stats?list=" + "x" * 201)
    assert page.code == 400
    assert 'id="error-list"' in page.text


def test_markup_in_a_list_name_is_escaped(browser: Browser) -> None:
    page = browser.get("/stats?list=%3Cscript%3Ex%3C/script%3E")
    assert page.code == 200
    assert "<script>x" not in page.text
    assert "&lt;script&gt;x&lt;/script&gt;" in page.text


def test_without_statistics_the_page_says_so(tmp_path: Path) -> None:
    web = make_web_app(tmp_path)
    try:
        page = web.logged_in().get("/stats")
        assert page.code == 503
        assert "Statistics are not available" in page.text
    finally:
        web.close()


def test_chart_of_nothing_has_flat_bars() -> None:
    """
    Days with no messages give bars of no height (no division by zero).
    """
    chart = bar_chart([DayCounts("2027-01-01"), DayCounts("2027-01-02")], title="empty")
    out: list[bytes] = []
    flattenString(None, chart).addCallback(out.append)
    found = bars(out[0].decode())
    assert len(found) == 2 * len(SERIES)
    assert {b["height"] for b in found} == {"0"}


def test_no_other_page_class_shadows_a_stats_method() -> None:
    for name, value in vars(StatsPages).items():
        if callable(value) and not name.startswith("__"):
            assert getattr(AdminApp, name) is value, name
