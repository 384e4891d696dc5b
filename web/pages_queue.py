"""
The queue (PRODUCT section 3): what was sent today and what waits now,
stop and restart, a filtered, paged listing of the messages with hold,
release, cancel (confirmed) and re-prioritize, and for each message why it
waits.

Every change goes through L{smtpgw.control.QueueControl}; its errors
become pages that say what happened (404 for a message that left the
queue, 409 for a change its state does not allow, 400 for a bad argument),
and a change the journal could not record is done but said to be at risk.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final
from urllib.parse import urlencode

from attrs import frozen
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, tags

from smtpgw.control import BadArgument, ControlError, NoSuchMessage, NotAllowed, NotDurable
from smtpgw.model import MessageState, Priority
from smtpgw.queueinfo import (
    QUEUE_STATES,
    QueueFilter,
    QueueListing,
    QueueRow,
    QueueStatus,
    Throttle,
    Why,
    parse_state,
)
from smtpgw.validation import ValidationError, validate_priority
from web.auth import Visitor, arg, page, safe_next
from web.render import csrf_field, field, format_time
from web.routes import PageBase, pages

__all__ = [
    "PRIORITY_LABELS",
    "QUEUE_PAGE_SIZE",
    "RECIPIENTS_SHOWN",
    "QueueFilterForm",
    "QueuePages",
    "read_queue_filter",
]

QUEUE_PAGE_SIZE: Final = 50
"""Messages one page of the listing shows; the next page goes on from the last."""

RECIPIENTS_SHOWN: Final = 3
"""Recipients a row names before it only counts the others."""

MAX_FILTER_LENGTH: Final = 200
"""The longest filter value read from a query; longer ones are refused."""

PRIORITY_LABELS: Final[Mapping[Priority, str]] = {
    Priority.VERY_HIGH: "1 · very high",
    Priority.HIGH: "2 · high",
    Priority.NORMAL: "3 · normal",
    Priority.LOW: "4 · low",
    Priority.VERY_LOW: "5 · very low",
}

_STATE_BADGES: Final[Mapping[MessageState, str]] = {
    MessageState.QUEUED: "badge",
    MessageState.SENDING: "badge good",
    MessageState.DEFERRED: "badge warn",
    MessageState.HELD: "badge bad",
}

_HOLDABLE: Final = frozenset({MessageState.QUEUED, MessageState.DEFERRED})
_RELEASABLE: Final = frozenset({MessageState.HELD, MessageState.DEFERRED})

_UNAVAILABLE: Final = (
    "The queue is not available: this admin app runs without the gateway's queue, "
    "so messages cannot be listed or changed here."
)

_log = Logger()


@frozen
class QueueFilterForm:
    """
    The listing's filters as the form sent them, what they mean, and what
    was wrong with them.

    @ivar values: the fields as sent (C{list}, C{state}, C{priority}).
    @ivar queue_filter: the filter to list with (the fields in error are
        left out).
    @ivar errors: per field, why its value was refused.
    """

    values: Mapping[str, str]
    queue_filter: QueueFilter
    errors: Mapping[str, str]


def read_queue_filter(list_name: str, state: str, priority: str) -> QueueFilterForm:
    """
    Read the listing's filter fields; an empty field filters nothing.
    """
    values = {"list": list_name.strip(), "state": state.strip(), "priority": priority.strip()}
    errors: dict[str, str] = {}
    chosen_list: str | None = values["list"] or None
    if chosen_list is not None and len(chosen_list) > MAX_FILTER_LENGTH:
        errors["list"] = "That is not a list name."
        chosen_list = None
    chosen_state: MessageState | None = None
    if values["state"]:
        try:
            chosen_state = parse_state(values["state"][:MAX_FILTER_LENGTH])
        except ValueError as e:
            errors["state"] = str(e)
    chosen_priority: Priority | None = None
    if values["priority"]:
        try:
            chosen_priority = validate_priority(values["priority"][:MAX_FILTER_LENGTH])
        except ValidationError as e:
            errors["priority"] = e.message
    return QueueFilterForm(
        values,
        QueueFilter(list=chosen_list, state=chosen_state, priority=chosen_priority),
        errors,
    )


def _listing_url(values: Mapping[str, str], after: str | None = None) -> str:
    query = {k: v for k, v in values.items() if v}
    if after is not None:
        query["after"] = after
    return "/queue" + ("?" + urlencode(query) if query else "")


def _back(request: IRequest, queue_id: str | None = None) -> str:
    """
    Where a form of the queue pages returns to: the page it was on (a
    queue page of this site), or the listing.
    """
    target = safe_next(arg(request, "back", "/queue"))
    if target != "/queue" and not target.startswith(("/queue?", "/queue/")):
        return "/queue"
    if queue_id is not None and target.startswith(f"/queue/{queue_id}"):
        # That page is gone with the message.
        return "/queue"
    return target


def _here(request: IRequest) -> str:
    return safe_next(bytes(request.uri).decode("utf-8", "replace"))


def _priority_select(name: str, current: str, *, any_label: str | None, **attrs: str) -> Tag:
    select = tags.select(name=name, **attrs)
    if any_label is not None:
        select(_option("", any_label, current))
    for priority, label in PRIORITY_LABELS.items():
        select(_option(str(int(priority)), label, current))
    return select


def _option(value: str, label: str, current: str) -> Tag:
    option = tags.option(label, value=value)
    if value == current:
        option(selected="selected")
    return option


def _state_badge(state: MessageState) -> Tag:
    return tags.span(state.value, class_=_STATE_BADGES.get(state, "badge"))


def _recipients(row: QueueRow) -> Tag:
    shown = row.recipients[:RECIPIENTS_SHOWN]
    cell = tags.span(", ".join(shown) if shown else "—")
    others = row.recipient_count - len(shown)
    if others > 0:
        cell(
            tags.br(), tags.span(f"+{others} more ({row.recipient_count} in all)", class_="muted")
        )
    return cell


def _time(when: float | None) -> Tag:
    """
    A time that wraps between its date and its hour only.
    """
    text = format_time(when)
    date, _, hour = text.partition(" ")
    if not hour:
        return tags.span(text)
    return tags.span(tags.span(date, class_="nowrap"), " ", tags.span(hour, class_="nowrap"))


def _scheduled(row: QueueRow) -> Tag:
    cell = tags.span(tags.span("accepted ", class_="muted"), _time(row.accepted_at))
    if row.next_attempt_at is not None:
        cell(
            tags.br(),
            tags.span("next attempt ", class_="muted"),
            _time(row.next_attempt_at),
        )
    return cell


def _estimate(
    state: MessageState, estimate: float | None, paused: bool, *, gated: bool = False
) -> Tag | str:
    if estimate is not None:
        return _time(estimate)
    if state is MessageState.HELD:
        return "held: not until released"
    if paused:
        return "when the queue restarts"
    if gated:
        return "when its console send goes on"
    return "—"


class QueuePages(PageBase):
    """
    The queue: messages, stop and start, hold, release, cancel, re-prioritize, why waiting.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """

    # --- the listing ---------------------------------------------------------

    @pages.route("/queue", methods=["GET", "HEAD"])
    @page
    async def queue_page(self, request: IRequest, visitor: Visitor) -> bytes:
        control = self.ctx.control
        if control is None:
            return await self._queue_unavailable(request, visitor)
        form = read_queue_filter(
            arg(request, "list"), arg(request, "state"), arg(request, "priority")
        )
        after = arg(request, "after").strip() or None
        notices: list[tuple[str, str]] = []
        listing: QueueListing | None = None
        try:
            listing = await control.listing(form.queue_filter, after, QUEUE_PAGE_SIZE)
        except BadArgument as e:
            notices.append(("bad", str(e)))
        status = listing.status if listing is not None else control.status()
        lists = await self.ctx.users.lists()
        content = tags.div(
            await self._queue_figures(status),
            self._queue_controls(visitor, status),
            tags.h2("Messages"),
            self._queue_filter_form(form, [item.name for item in lists]),
        )
        if listing is not None:
            content(self._queue_table(visitor, listing, _here(request)))
            content(self._queue_pager(form, after, listing))
        bad = bool(form.errors) or listing is None
        return await self.show(
            request,
            visitor,
            "Queue",
            content,
            active="queue",
            status=400 if bad else 200,
            notices=notices,
        )

    async def _queue_figures(self, status: QueueStatus) -> Tag:
        sent: str = "—"
        accepted: str = "—"
        if self.ctx.stats is not None:
            try:
                today = await self.ctx.stats.today()
            except sqlite3.Error as e:
                _log.warn("cannot read today's statistics: {error}", error=str(e))
            else:
                sent = str(today.get("delivered", 0))
                accepted = str(today.get("accepted", 0))
        counts = status.counts
        waiting = sum(counts.get(state, 0) for state in QUEUE_STATES)
        by_state = tags.ul(class_="counts", id="queue-counts")
        for state in QUEUE_STATES:
            by_state(
                tags.li(
                    tags.span(state.value, class_="muted"),
                    " ",
                    tags.strong(str(counts.get(state, 0)), **{"data-state": state.value}),
                )
            )
        state_badge = (
            tags.span("stopped", class_="badge bad", id="queue-state")
            if status.paused
            else tags.span("running", class_="badge good", id="queue-state")
        )
        return tags.div(class_="grid", id="queue-figures")(
            tags.div(class_="card")(
                tags.div("Sent today", class_="muted"),
                tags.div(sent, class_="figure", id="queue-sent-today"),
                tags.div(f"accepted today: {accepted}", class_="hint"),
            ),
            tags.div(class_="card")(
                tags.div("Queued now", class_="muted"),
                tags.div(str(waiting), class_="figure", id="queue-waiting"),
                by_state,
            ),
            tags.div(class_="card")(
                tags.div("Queue", class_="muted"),
                tags.div(state_badge, class_="figure"),
                tags.div(
                    f"{status.in_flight} being sent · "
                    + (f"--rate {status.rate:g}/s" if status.rate > 0 else "no rate limit")
                    + f" · --concurrency {status.concurrency}",
                    class_="hint",
                ),
            ),
        )

    def _queue_controls(self, visitor: Visitor, status: QueueStatus) -> Tag:
        if status.paused:
            action, label, css, button_id = "/queue/start", "Restart the queue", "", "queue-start"
            hint = "Mail is still accepted and kept while the queue is stopped."
        else:
            action, label, css, button_id = "/queue/stop", "Stop the queue", "danger", "queue-stop"
            hint = (
                "Stopping lets deliveries under way finish and sends nothing more; "
                "mail is still accepted and kept."
            )
        form = tags.form(method="post", action=action, class_="inline")(
            csrf_field(visitor),
            tags.button(label, type="submit", class_=css, id=button_id),
        )
        return tags.div(class_="actions card")(form, tags.span(hint, class_="hint"))

    def _queue_filter_form(self, form: QueueFilterForm, lists: list[str]) -> Tag:
        values = form.values
        list_select = tags.select(name="list", id="f-list")(
            _option("", "All lists", values["list"])
        )
        names = list(lists)
        if values["list"] and values["list"] not in names and "list" not in form.errors:
            names.append(values["list"])
        for name in names:
            list_select(_option(name, name, values["list"]))
        state_select = tags.select(name="state", id="f-state")(
            _option("", "Any state", values["state"])
        )
        for state in QUEUE_STATES:
            state_select(_option(state.value, state.value, values["state"]))
        return tags.form(method="get", action="/queue", class_="filters", id="queue-filters")(
            field("list", "List", list_select, error=form.errors.get("list")),
            field("state", "State", state_select, error=form.errors.get("state")),
            field(
                "priority",
                "Priority",
                _priority_select(
                    "priority", values["priority"], any_label="Any priority", id="f-priority"
                ),
                error=form.errors.get("priority"),
            ),
            tags.div(class_="actions")(
                tags.button("Filter", type="submit"),
                tags.a("Clear", href="/queue", class_="button secondary"),
            ),
        )

    def _queue_table(self, visitor: Visitor, listing: QueueListing, back: str) -> Tag:
        headers = (
            "List",
            "Message",
            "Sender and recipients",
            "State",
            "Priority",
            "Scheduled",
            "Estimated send",
            "Actions",
        )
        body = tags.tbody()
        for row in listing.rows:
            body(
                tags.tr(id=f"msg-{row.queue_id}", **{"data-state": row.state.value})(
                    tags.td(row.list),
                    tags.td(
                        tags.div(
                            row.subject if row.subject is not None else "(no subject)",
                            class_="subject",
                        ),
                        tags.a(row.queue_id, href=f"/queue/{row.queue_id}", class_="mono hint"),
                    ),
                    tags.td(
                        tags.div(row.sender if row.sender is not None else "—"),
                        tags.div(tags.span("to ", class_="muted"), _recipients(row)),
                    ),
                    tags.td(_state_badge(row.state)),
                    tags.td(PRIORITY_LABELS[row.priority]),
                    tags.td(_scheduled(row)),
                    tags.td(_estimate(row.state, row.estimated_send_at, listing.status.paused)),
                    tags.td(
                        self._queue_row_actions(
                            visitor, row.queue_id, row.state, row.priority, back
                        )
                    ),
                )
            )
        if not listing.rows:
            body(
                tags.tr(
                    tags.td(
                        "No message in the queue matches.",
                        colspan=str(len(headers)),
                        class_="muted",
                    )
                )
            )
        return tags.div(class_="table-wrap")(
            tags.table(id="queue", class_="dense")(
                tags.thead(tags.tr(*[tags.th(h) for h in headers])), body
            )
        )

    def _queue_row_actions(
        self,
        visitor: Visitor,
        queue_id: str,
        state: MessageState,
        priority: Priority,
        back: str,
        *,
        why_link: bool = True,
    ) -> Tag:
        actions = tags.div(class_="actions row-actions")
        if state is MessageState.SENDING:
            actions(tags.span("being sent", class_="muted"))
        if state in _HOLDABLE:
            actions(self._queue_small_form(visitor, queue_id, "hold", "Hold", back))
        if state in _RELEASABLE:
            actions(self._queue_small_form(visitor, queue_id, "release", "Release", back))
        if state is not MessageState.SENDING:
            actions(
                tags.a(
                    "Cancel…",
                    href=f"/queue/{queue_id}/cancel?" + urlencode({"back": back}),
                    class_="button small danger",
                )
            )
        # A message being sent keeps a new priority for a retry.
        actions(
            tags.form(method="post", action=f"/queue/{queue_id}/priority", class_="inline")(
                csrf_field(visitor),
                tags.input(type="hidden", name="back", value=back),
                _priority_select(
                    "priority",
                    str(int(priority)),
                    any_label=None,
                    **{"aria-label": f"New priority of {queue_id}"},
                ),
                tags.button("Set", type="submit", class_="small secondary"),
            ),
        )
        if why_link:
            actions(tags.a("Why?", href=f"/queue/{queue_id}", class_="button small secondary"))
        return actions

    def _queue_small_form(
        self, visitor: Visitor, queue_id: str, verb: str, label: str, back: str
    ) -> Tag:
        return tags.form(method="post", action=f"/queue/{queue_id}/{verb}", class_="inline")(
            csrf_field(visitor),
            tags.input(type="hidden", name="back", value=back),
            tags.button(label, type="submit", class_="small secondary"),
        )

    def _queue_pager(self, form: QueueFilterForm, after: str | None, listing: QueueListing) -> Tag:
        pager = tags.div(class_="actions", id="queue-pager")
        if after is not None:
            pager(tags.a("First page", href=_listing_url(form.values), class_="button secondary"))
        if listing.next_after is not None:
            pager(
                tags.a(
                    "Next page",
                    href=_listing_url(form.values, listing.next_after),
                    class_="button secondary",
                    id="queue-next",
                )
            )
        return pager

    # --- stop and start -------------------------------------------------------

    @pages.route("/queue/stop", methods=["POST"])
    @page
    async def queue_stop(self, request: IRequest, visitor: Visitor) -> bytes:
        return await self._queue_stop_or_start(
            request, visitor, "stop", "The queue is stopped: nothing more is sent until restarted."
        )

    @pages.route("/queue/start", methods=["POST"])
    @page
    async def queue_start(self, request: IRequest, visitor: Visitor) -> bytes:
        return await self._queue_stop_or_start(
            request, visitor, "start", "The queue is running again."
        )

    async def _queue_stop_or_start(
        self, request: IRequest, visitor: Visitor, verb: str, done: str
    ) -> bytes:
        control = self.ctx.control
        if control is None:
            return await self._queue_unavailable(request, visitor)
        try:
            await (control.stop() if verb == "stop" else control.start())
        except NotDurable as e:
            return self.redirect(request, visitor, "/queue", ("bad", str(e)))
        _log.info("admin {admin} did queue {verb}", admin=visitor.admin, verb=verb)
        return self.redirect(request, visitor, "/queue", ("good", done))

    # --- one message ------------------------------------------------------------

    @pages.route("/queue/<string:queue_id>", methods=["GET", "HEAD"])
    @page
    async def queue_why(self, request: IRequest, visitor: Visitor, queue_id: str) -> bytes:
        why = await self._why_or_page(request, visitor, queue_id)
        if isinstance(why, bytes):
            return why
        here = f"/queue/{queue_id}"
        details = tags.dl(class_="settings", id="why")(
            tags.dt("Message"),
            tags.dd(why.queue_id),
            tags.dt("List"),
            tags.dd(why.list),
            tags.dt("State"),
            tags.dd(_state_badge(why.state), id="why-state"),
            tags.dt("Priority"),
            tags.dd(PRIORITY_LABELS[why.priority], id="why-priority"),
            tags.dt("Position"),
            tags.dd(
                "not in line" if why.position is None else str(why.position),
                id="why-position",
            ),
            tags.dt("Higher-priority messages ready"),
            tags.dd(str(why.higher_priority), id="why-higher"),
            tags.dt("Held back by"),
            tags.dd(why.throttle.value.replace("_", " "), id="why-throttle"),
            tags.dt("Why"),
            tags.dd(why.reason, id="why-reason"),
            tags.dt("Attempts"),
            tags.dd(str(why.attempts)),
            tags.dt("Next attempt"),
            tags.dd(format_time(why.next_attempt_at)),
            tags.dt("Estimated send"),
            tags.dd(
                _estimate(
                    why.state,
                    why.estimated_send_at,
                    why.throttle is Throttle.STOPPED,
                    gated=why.throttle is Throttle.CONSOLE_SEND_PAUSED,
                ),
                id="why-estimate",
            ),
        )
        content = tags.div(
            tags.div(class_="card")(details),
            tags.p(
                "The position counts the messages that will be sent before this one if "
                "nothing of a higher priority arrives; the estimate assumes the gateway "
                "keeps sending at its limits.",
                class_="hint",
            ),
            self._queue_row_actions(
                visitor, why.queue_id, why.state, why.priority, here, why_link=False
            ),
            tags.p(tags.a("Back to the queue", href="/queue")),
        )
        return await self.show(
            request, visitor, f"Why {why.queue_id} waits", content, active="queue"
        )

    @pages.route("/queue/<string:queue_id>/hold", methods=["POST"])
    @page
    async def queue_hold(self, request: IRequest, visitor: Visitor, queue_id: str) -> bytes:
        return await self._queue_change(
            request, visitor, queue_id, lambda c: c.hold(queue_id), f"{queue_id} is held."
        )

    @pages.route("/queue/<string:queue_id>/release", methods=["POST"])
    @page
    async def queue_release(self, request: IRequest, visitor: Visitor, queue_id: str) -> bytes:
        return await self._queue_change(
            request,
            visitor,
            queue_id,
            lambda c: c.release(queue_id),
            f"{queue_id} is released: it goes out in turn.",
        )

    @pages.route("/queue/<string:queue_id>/priority", methods=["POST"])
    @page
    async def queue_priority(self, request: IRequest, visitor: Visitor, queue_id: str) -> bytes:
        wanted = arg(request, "priority")
        try:
            priority = validate_priority(wanted)
        except ValidationError as e:
            return await self._queue_error_page(request, visitor, 400, e.message, _back(request))
        return await self._queue_change(
            request,
            visitor,
            queue_id,
            lambda c: c.reprioritize(queue_id, int(priority)),
            f"{queue_id} now has priority {PRIORITY_LABELS[priority]}.",
        )

    @pages.route("/queue/<string:queue_id>/cancel", methods=["GET", "HEAD"])
    @page
    async def queue_cancel_form(self, request: IRequest, visitor: Visitor, queue_id: str) -> bytes:
        why = await self._why_or_page(request, visitor, queue_id)
        if isinstance(why, bytes):
            return why
        back = _back(request)
        form = tags.form(
            method="post", action=f"/queue/{queue_id}/cancel", class_="card", id="cancel-confirm"
        )(
            csrf_field(visitor),
            tags.input(type="hidden", name="back", value=back),
            tags.p(
                "Cancel message ",
                tags.strong(why.queue_id, class_="mono"),
                f" of list {why.list} (priority {PRIORITY_LABELS[why.priority]}, "
                f"{why.state.value})? It will never be delivered, and this cannot be undone.",
            ),
            tags.div(class_="actions")(
                tags.button("Cancel the message", type="submit", class_="danger"),
                tags.a("Keep it", href=back, class_="button secondary"),
            ),
        )
        return await self.show(request, visitor, "Cancel a message", form, active="queue")

    @pages.route("/queue/<string:queue_id>/cancel", methods=["POST"])
    @page
    async def queue_cancel(self, request: IRequest, visitor: Visitor, queue_id: str) -> bytes:
        return await self._queue_change(
            request,
            visitor,
            queue_id,
            lambda c: c.cancel(queue_id),
            f"{queue_id} is cancelled: it will not be delivered.",
            gone=True,
        )

    async def _queue_change(
        self,
        request: IRequest,
        visitor: Visitor,
        queue_id: str,
        action: Callable[[Any], Awaitable[Any]],
        done: str,
        *,
        gone: bool = False,
    ) -> bytes:
        control = self.ctx.control
        if control is None:
            return await self._queue_unavailable(request, visitor)
        back = _back(request, queue_id if gone else None)
        try:
            await action(control)
        except NotDurable as e:
            return self.redirect(request, visitor, back, ("bad", str(e)))
        except ControlError as e:
            return await self._queue_control_error(request, visitor, e, back)
        _log.info(
            "admin {admin} changed {queue_id}: {done}",
            admin=visitor.admin,
            queue_id=queue_id,
            done=done,
        )
        return self.redirect(request, visitor, back, ("good", done))

    # --- errors -------------------------------------------------------------

    async def _queue_control_error(
        self, request: IRequest, visitor: Visitor, error: ControlError, back: str = "/queue"
    ) -> bytes:
        if isinstance(error, NoSuchMessage):
            status = 404
        elif isinstance(error, NotAllowed):
            status = 409
        elif isinstance(error, BadArgument):
            status = 400
        else:
            status = 409
        return await self._queue_error_page(request, visitor, status, str(error), back)

    async def _queue_error_page(
        self, request: IRequest, visitor: Visitor, status: int, message: str, back: str
    ) -> bytes:
        titles = {400: "Bad request", 404: "Not in the queue", 409: "Not possible now"}
        content = tags.div(class_="card", id="queue-error")(
            tags.p(message),
            tags.p(tags.a("Back to the queue", href=back)),
        )
        return await self.show(
            request, visitor, titles.get(status, "Error"), content, active="queue", status=status
        )

    async def _why_or_page(
        self, request: IRequest, visitor: Visitor, queue_id: str
    ) -> Why | bytes:
        """
        What the queue says of one message, or the page that says why it
        cannot be asked (no queue control, no such message, an error).
        """
        control = self.ctx.control
        if control is None:
            return await self._queue_unavailable(request, visitor)
        try:
            why: Why = await control.why(queue_id)
        except ControlError as e:
            return await self._queue_control_error(request, visitor, e)
        return why

    async def _queue_unavailable(self, request: IRequest, visitor: Visitor) -> bytes:
        content = tags.div(class_="card", id="queue-unavailable")(tags.p(_UNAVAILABLE))
        return await self.show(
            request, visitor, "Queue not available", content, active="queue", status=503
        )
