"""
Statistics per list and day (L{smtpgw.stats.DailyStats}): today's totals,
and the last 14 or 30 days of accepted, delivered, deferred and bounced
messages as an SVG bar chart and as a table of the same figures.

The chart is built from tags, sized with SVG attributes only (the content
security policy forbids inline styles); its colours come from the
stylesheet's classes. Each bar carries its figure in a C{<title>} and in
C{data-} attributes, and the table says the same for those who do not see
the chart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlencode

from attrs import frozen
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, tags

from web.auth import Visitor, arg, page
from web.render import field
from web.routes import PageBase, pages

__all__ = [
    "CHART_HEIGHT",
    "DEFAULT_PERIOD",
    "PERIODS",
    "SERIES",
    "StatsPages",
    "bar_chart",
]

SERIES: Final = ("accepted", "delivered", "deferred", "bounced")
"""The figures of a day, in the order the chart and the table show them."""

PERIODS: Final = (14, 30)
"""The periods, in days, the page offers."""

DEFAULT_PERIOD: Final = 14

CHART_HEIGHT: Final = 160
"""The height of the bars' area, in SVG units."""

CHART_WIDTH: Final = 760
"""The width of the chart, in SVG units, whatever the number of days: the
bars are as wide as fits."""

LABEL_HEIGHT: Final = 18
AXIS_WIDTH: Final = 36

MAX_FILTER_LENGTH: Final = 200


@frozen
class _Day:
    """
    One day's figures as the page reads them from the statistics.
    """

    day: str
    values: tuple[int, ...]


def _read_day(counts: Any) -> _Day:
    return _Day(str(counts.day), tuple(int(getattr(counts, name)) for name in SERIES))


def _svg(name: str, **attributes: str) -> Tag:
    # The tag factory knows HTML names only; Tag escapes all the same.
    return Tag(
        name,
        attributes={
            ("class" if k == "class_" else k.replace("_", "-")): v for k, v in attributes.items()
        },
    )


def _number(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def bar_chart(days: Sequence[Any], *, title: str) -> Tag:
    """
    An SVG bar chart of the days' figures: for each day a group of one bar
    per series of L{SERIES}, scaled to the largest figure; a bar of 0 is
    there with no height.

    @param days: the days, oldest first, each with C{day} and the
        figures of L{SERIES} as attributes (L{smtpgw.stats.DayCounts}).
    @param title: what the chart shows, for screen readers.
    """
    read = [_read_day(d) for d in days]
    top = max([1, *(v for d in read for v in d.values)])
    group = (CHART_WIDTH - AXIS_WIDTH) / max(1, len(read))
    # A quarter of each day's room is the gap to the next day.
    bar_width = group * 0.75 / len(SERIES)
    width = CHART_WIDTH
    height = CHART_HEIGHT + LABEL_HEIGHT
    label_every = 1 if len(read) <= 14 else 2
    chart = _svg(
        "svg",
        viewBox=f"0 0 {width} {height}",
        width=str(width),
        height=str(height),
        role="img",
        aria_label=title,
        id="stats-chart",
        class_="chart",
    )
    chart(Tag("title")(title))
    chart(_svg("text", x="0", y="10")(str(top)), _svg("text", x="0", y=str(CHART_HEIGHT))("0"))
    chart(
        _svg(
            "line",
            x1=str(AXIS_WIDTH - 2),
            y1=str(CHART_HEIGHT),
            x2=str(width),
            y2=str(CHART_HEIGHT),
            class_="axis",
        )
    )
    for index, day in enumerate(read):
        left = AXIS_WIDTH + index * group
        for position, (name, value) in enumerate(zip(SERIES, day.values, strict=True)):
            bar_height = value / top * CHART_HEIGHT
            chart(
                _svg(
                    "rect",
                    x=_number(left + position * bar_width),
                    y=_number(CHART_HEIGHT - bar_height),
                    width=_number(bar_width),
                    height=_number(bar_height),
                    class_=f"bar {name}",
                    data_day=day.day,
                    data_series=name,
                    data_value=str(value),
                )(Tag("title")(f"{day.day} {name}: {value}"))
            )
        # Counted from today, which is always labelled.
        if (len(read) - 1 - index) % label_every == 0:
            chart(
                _svg("text", x=_number(left), y=str(height - 4))(day.day[5:]),
            )
    return chart


def _legend() -> Tag:
    legend = tags.ul(class_="legend")
    for name in SERIES:
        legend(tags.li(tags.span(class_=f"swatch {name}"), name))
    return legend


def _table(days: Sequence[Any]) -> Tag:
    read = [_read_day(d) for d in days]
    body = tags.tbody()
    for day in reversed(read):
        body(tags.tr(tags.th(day.day, scope="row"), *[tags.td(str(v)) for v in day.values]))
    totals = [sum(d.values[i] for d in read) for i in range(len(SERIES))]
    foot = tags.tfoot(tags.tr(tags.th("Total", scope="row"), *[tags.td(str(v)) for v in totals]))
    head = tags.thead(
        tags.tr(tags.th("Day", scope="col"), *[tags.th(n, scope="col") for n in SERIES])
    )
    return tags.div(class_="table-wrap")(
        tags.table(id="stats-table")(
            tags.caption("The same figures, newest day first", class_="muted"), head, body, foot
        )
    )


def _option(value: str, label: str, current: str) -> Tag:
    option = tags.option(label, value=value)
    if value == current:
        option(selected="selected")
    return option


class StatsPages(PageBase):
    """
    Statistics per list and day, with charts.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """

    @pages.route("/stats", methods=["GET", "HEAD"])
    @page
    async def stats_page(self, request: IRequest, visitor: Visitor) -> bytes:
        stats = self.ctx.stats
        if stats is None:
            content = tags.div(class_="card", id="stats-unavailable")(
                tags.p(
                    "Statistics are not available: this admin app runs without the "
                    "gateway's daily statistics."
                )
            )
            return await self.show(
                request, visitor, "Statistics not available", content, active="stats", status=503
            )
        errors: dict[str, str] = {}
        list_text = arg(request, "list").strip()
        list_name: str | None = list_text or None
        if list_name is not None and (
            len(list_name) > MAX_FILTER_LENGTH or not list_name.isprintable()
        ):
            errors["list"] = "That is not a list name."
            list_name = None
        days_text = arg(request, "days").strip()
        period = DEFAULT_PERIOD
        if days_text:
            if days_text in {str(p) for p in PERIODS}:
                period = int(days_text)
            else:
                choices = " or ".join(str(p) for p in PERIODS)
                errors["days"] = f"Show {choices} days."
        today = await stats.today(list_name)
        days = await stats.days(list_name, period)
        lists = [item.name for item in await self.ctx.users.lists()]
        whose = f"list {list_name}" if list_name else "all lists"
        title = f"Messages per day, last {period} days, {whose}"
        content = tags.div(
            self._stats_filters(list_text if "list" not in errors else "", period, lists, errors),
            tags.h2("Today"),
            self._stats_today(today),
            tags.h2(f"Last {period} days"),
            tags.div(class_="card")(bar_chart(days, title=title), _legend()),
            _table(days),
            tags.p(
                *[
                    tags.a(
                        f"Show {other} days",
                        href="/stats?" + urlencode({"list": list_name or "", "days": str(other)}),
                    )
                    for other in PERIODS
                    if other != period
                ]
            ),
        )
        return await self.show(
            request,
            visitor,
            "Statistics",
            content,
            active="stats",
            status=400 if errors else 200,
        )

    def _stats_today(self, today: Any) -> Tag:
        cards = tags.div(class_="grid", id="stats-today")
        for name in SERIES:
            cards(
                tags.div(class_="card")(
                    tags.div(name.capitalize(), class_="muted"),
                    tags.div(str(int(today.get(name, 0))), class_="figure", id=f"today-{name}"),
                )
            )
        return cards

    def _stats_filters(
        self, current_list: str, period: int, lists: list[str], errors: dict[str, str]
    ) -> Tag:
        list_select = tags.select(name="list", id="f-list")(_option("", "All lists", current_list))
        names = list(lists)
        if current_list and current_list not in names:
            names.append(current_list)
        for name in names:
            list_select(_option(name, name, current_list))
        days_select = tags.select(name="days", id="f-days")(
            *[_option(str(p), f"{p} days", str(period)) for p in PERIODS]
        )
        return tags.form(method="get", action="/stats", class_="filters", id="stats-filters")(
            field("list", "List", list_select, error=errors.get("list")),
            field("days", "Period", days_select, error=errors.get("days")),
            tags.div(class_="actions")(tags.button("Show", type="submit")),
        )
