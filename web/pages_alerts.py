"""
The alert center (PRODUCT section 6): every stored alert, newest first,
filtered by list, type and unread, paged, each marked read on its own or
all those shown at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final
from urllib.parse import urlencode

from attrs import frozen
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, tags

from smtpgw.alerts import MAX_QUERY_LIMIT, StoredAlert
from web.auth import Visitor, arg, page, safe_next
from web.render import csrf_field, field, format_time
from web.routes import PageBase, pages

__all__ = [
    "ALERT_PAGE_SIZE",
    "ALERT_TYPES",
    "AlertFilterForm",
    "AlertPages",
    "details_summary",
    "read_alert_filter",
]

ALERT_PAGE_SIZE: Final = 50
"""Alerts one page shows; the next page goes on from the oldest shown."""

ALERT_TYPES: Final[Mapping[str, str]] = {
    "sender_domain": "Sender domain not authorized",
    "delivery": "Delivery problem",
    "bounce": "Bounce",
    "auth_failures": "Failed logins",
    "queue_stalled": "Stalled queue",
}
"""The alert types the gateway raises (L{smtpgw.interfaces.Alert}), as the
filter names them; a stored alert of another type is shown by its name."""

DETAILS_SHOWN: Final = 3
"""Detail fields an alert's summary names; the rest are one click away."""

MAX_DETAIL_TEXT: Final = 120
"""Characters of one detail value shown; longer ones are cut."""

MAX_FILTER_LENGTH: Final = 200
"""The longest filter value read; longer ones are refused."""

_MAX_ID: Final = 2**63 - 1

_log = Logger()


@frozen
class AlertFilterForm:
    """
    The alert center's filters as sent, what they mean, and what was wrong.

    @ivar values: the fields as sent (C{list}, C{type}, C{unread}).
    @ivar errors: per field, why its value was refused (that filter is
        then not applied).
    """

    values: Mapping[str, str]
    list: str | None
    type: str | None
    unread_only: bool
    errors: Mapping[str, str]


def read_alert_filter(list_name: str, type: str, unread: str) -> AlertFilterForm:
    """
    Read the alert center's filters; an empty field filters nothing.
    """
    values = {"list": list_name.strip(), "type": type.strip(), "unread": unread.strip()}
    errors: dict[str, str] = {}
    chosen_list = values["list"] or None
    if chosen_list is not None and (
        len(chosen_list) > MAX_FILTER_LENGTH or not chosen_list.isprintable()
    ):
        errors["list"] = "That is not a list name."
        chosen_list = None
    chosen_type = values["type"] or None
    if chosen_type is not None and (
        len(chosen_type) > MAX_FILTER_LENGTH or not chosen_type.isprintable()
    ):
        errors["type"] = "That is not an alert type."
        chosen_type = None
    return AlertFilterForm(
        values, chosen_list, chosen_type, values["unread"] not in ("", "0"), errors
    )


def _raw(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, sort_keys=True)


def _text(value: Any) -> str:
    text = " ".join(_raw(value).split())
    if len(text) > MAX_DETAIL_TEXT:
        text = text[: MAX_DETAIL_TEXT - 1] + "\u2026"
    return text


def details_summary(details: Mapping[str, Any]) -> str:
    """
    An alert's details in one line: the first L{DETAILS_SHOWN} fields (by
    name) as C{name: value}, values cut at L{MAX_DETAIL_TEXT} characters,
    and how many more fields there are.
    """
    items = sorted(details.items())
    shown = "; ".join(f"{name}: {_text(value)}" for name, value in items[:DETAILS_SHOWN])
    more = len(items) - DETAILS_SHOWN
    if more > 0:
        shown += f" (+{more} more)"
    return shown


def _details(details: Mapping[str, Any]) -> Any:
    if not details:
        return tags.span("—", class_="muted")
    summary = details_summary(details)
    whole = len(details) <= DETAILS_SHOWN and all(
        len(_raw(value)) <= MAX_DETAIL_TEXT for value in details.values()
    )
    if whole:
        return summary
    full = tags.dl(class_="settings")
    for name, value in sorted(details.items()):
        full(tags.dt(name), tags.dd(_raw(value)))
    return tags.details(tags.summary(summary), full)


def _type_label(type: str) -> str:
    return ALERT_TYPES.get(type, type)


def _back(request: IRequest) -> str:
    target = safe_next(arg(request, "back", "/alerts"))
    if target != "/alerts" and not target.startswith("/alerts?"):
        return "/alerts"
    return target


def _url(values: Mapping[str, str], before: int | None = None) -> str:
    query = {k: v for k, v in values.items() if v}
    if before is not None:
        query["before"] = str(before)
    return "/alerts" + ("?" + urlencode(query) if query else "")


def _option(value: str, label: str, current: str) -> Tag:
    option = tags.option(label, value=value)
    if value == current:
        option(selected="selected")
    return option


def _read_ids(request: IRequest) -> list[int] | None:
    """
    The alert ids a form sent as C{id} fields, or L{None} when one is not
    an id or there are too many.
    """
    raw = request.args.get(b"id", [])
    if len(raw) > MAX_QUERY_LIMIT:
        return None
    ids = []
    for value in raw:
        text = bytes(value).decode("ascii", "replace")
        if not (text.isascii() and text.isdecimal()) or int(text) > _MAX_ID:
            return None
        ids.append(int(text))
    return ids


class AlertPages(PageBase):
    """
    The alert center: filtered by list and type, marked read.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """

    @pages.route("/alerts", methods=["GET", "HEAD"])
    @page
    async def alerts_page(self, request: IRequest, visitor: Visitor) -> bytes:
        form = read_alert_filter(
            arg(request, "list"), arg(request, "type"), arg(request, "unread")
        )
        errors = dict(form.errors)
        before_text = arg(request, "before").strip()
        before: int | None = None
        if before_text:
            if before_text.isascii() and before_text.isdecimal() and int(before_text) <= _MAX_ID:
                before = int(before_text)
            else:
                errors["before"] = "That is not a page of alerts."
        found: list[StoredAlert] = await self.ctx.alerts.alerts(
            list=form.list,
            type=form.type,
            unread_only=form.unread_only,
            limit=ALERT_PAGE_SIZE + 1,
            before=before,
        )
        shown = found[:ALERT_PAGE_SIZE]
        older = shown[-1].id if len(found) > ALERT_PAGE_SIZE else None
        unread = await self.ctx.alerts.unread_count(form.list)
        lists = [item.name for item in await self.ctx.users.lists()]
        here = safe_next(bytes(request.uri).decode("utf-8", "replace"))
        content = tags.div(
            tags.div(class_="actions card")(
                tags.span(
                    tags.strong(str(unread), id="alerts-unread"),
                    " unread" + (f" of list {form.list}" if form.list else ""),
                ),
                self._alerts_mark_all(visitor, shown, here),
            ),
            self._alerts_filter_form(form, errors, lists),
            self._alerts_table(visitor, shown, here),
            self._alerts_pager(form, before, older),
        )
        notices = [("bad", errors["before"])] if "before" in errors else []
        return await self.show(
            request,
            visitor,
            "Alerts",
            content,
            active="alerts",
            status=400 if errors else 200,
            notices=notices,
        )

    def _alerts_mark_all(self, visitor: Visitor, shown: Sequence[StoredAlert], back: str) -> Any:
        unread = [alert for alert in shown if not alert.read]
        if not unread:
            return ""
        form = tags.form(method="post", action="/alerts/read", class_="inline")(
            csrf_field(visitor), tags.input(type="hidden", name="back", value=back)
        )
        for alert in unread:
            form(tags.input(type="hidden", name="id", value=str(alert.id)))
        return form(
            tags.button(
                f"Mark the {len(unread)} unread shown as read",
                type="submit",
                class_="secondary",
                id="alerts-mark-all",
            )
        )

    def _alerts_filter_form(
        self, form: AlertFilterForm, errors: Mapping[str, str], lists: list[str]
    ) -> Tag:
        values = form.values
        list_select = tags.select(name="list", id="f-list")(
            _option("", "All lists", values["list"])
        )
        names = list(lists)
        if form.list is not None and form.list not in names:
            names.append(form.list)
        for name in names:
            list_select(_option(name, name, values["list"]))
        type_select = tags.select(name="type", id="f-type")(
            _option("", "All types", values["type"])
        )
        types = dict(ALERT_TYPES)
        if form.type is not None and form.type not in types:
            types[form.type] = form.type
        for name, label in types.items():
            type_select(_option(name, label, values["type"]))
        unread_box = tags.input(type="checkbox", name="unread", value="1", id="f-unread")
        if form.unread_only:
            unread_box(checked="checked")
        return tags.form(method="get", action="/alerts", class_="filters", id="alerts-filters")(
            field("list", "List", list_select, error=errors.get("list")),
            field("type", "Type", type_select, error=errors.get("type")),
            field("unread", "Unread only", unread_box),
            tags.div(class_="actions")(
                tags.button("Filter", type="submit"),
                tags.a("Clear", href="/alerts", class_="button secondary"),
            ),
        )

    def _alerts_table(self, visitor: Visitor, shown: Sequence[StoredAlert], back: str) -> Tag:
        headers = ("Time", "List", "Type", "Message", "Details", "Status", "")
        body = tags.tbody()
        for alert in shown:
            if alert.read:
                status: Any = tags.span("read", class_="badge")
                action: Any = ""
            else:
                status = tags.span("unread", class_="badge warn")
                action = tags.form(
                    method="post", action=f"/alerts/{alert.id}/read", class_="inline"
                )(
                    csrf_field(visitor),
                    tags.input(type="hidden", name="back", value=back),
                    tags.button("Mark read", type="submit", class_="small secondary"),
                )
            body(
                tags.tr(id=f"alert-{alert.id}", class_="read" if alert.read else "unread")(
                    tags.td(format_time(alert.created_at), class_="nowrap"),
                    tags.td(alert.list if alert.list is not None else "—"),
                    tags.td(_type_label(alert.type)),
                    tags.td(alert.message),
                    tags.td(_details(alert.details)),
                    tags.td(status),
                    tags.td(action),
                )
            )
        if not shown:
            body(tags.tr(tags.td("No alerts match.", colspan=str(len(headers)), class_="muted")))
        return tags.div(class_="table-wrap")(
            tags.table(id="alerts")(tags.thead(tags.tr(*[tags.th(h) for h in headers])), body)
        )

    def _alerts_pager(self, form: AlertFilterForm, before: int | None, older: int | None) -> Tag:
        pager = tags.div(class_="actions", id="alerts-pager")
        if before is not None:
            pager(tags.a("Newest", href=_url(form.values), class_="button secondary"))
        if older is not None:
            pager(
                tags.a(
                    "Older alerts",
                    href=_url(form.values, older),
                    class_="button secondary",
                    id="alerts-older",
                )
            )
        return pager

    @pages.route("/alerts/<int:alert_id>/read", methods=["POST"])
    @page
    async def alerts_mark_read(self, request: IRequest, visitor: Visitor, alert_id: int) -> bytes:
        changed = await self.ctx.alerts.mark_read([alert_id]) if alert_id <= _MAX_ID else 0
        notice = (
            ("good", "Alert marked read.")
            if changed
            else ("info", "That alert was already read (or is no more).")
        )
        return self.redirect(request, visitor, _back(request), notice)

    @pages.route("/alerts/read", methods=["POST"])
    @page
    async def alerts_mark_shown(self, request: IRequest, visitor: Visitor) -> bytes:
        ids = _read_ids(request)
        if ids is None:
            return await self.refuse(
                request, visitor, 400, "The form named alerts that are not alerts."
            )
        changed = await self.ctx.alerts.mark_read(ids) if ids else 0
        _log.info("admin {admin} marked {count} alerts read", admin=visitor.admin, count=changed)
        noun = "alert" if changed == 1 else "alerts"
        return self.redirect(
            request, visitor, _back(request), ("good", f"{changed} {noun} marked read.")
        )
