"""
Console sends and the recipients of lists (PRODUCT section 4), and the
public unsubscribe page their messages link to.

  - C{/lists/<name>/recipients}: counts by status, a paged table, and the
    CSV import (a file or pasted rows). An import with bad rows shows each
    by its line and changes nothing; the admin may then import the valid
    rows alone.
  - C{/campaigns}: the sends, filtered by list and state; C{/campaigns/new}
    makes one (the sender must pass the list's sender policy);
    C{/campaigns/<id>} shows its state, progress and counts, with pause,
    resume and cancel, and reloads itself while the send runs or is paused.
    Progress is the messages done (delivered or bounced) of the total, and
    the estimated finish follows from it; the messages handed to the queue
    (C{sent}, up to a window ahead) are shown beside.
  - C{/unsubscribe/<token>}: no login; the signed token is the
    authorization. A GET only asks; a POST (the page's button, or a mail
    client's RFC 8058 one-click POST) unsubscribes.

Every change is made in the stores (the gateway's threaded ones); the
campaign runner is poked after each, so it acts at once rather than at its
next poll.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote, urlencode

from attrs import frozen
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, tags

from smtpgw.campaigns import (
    MAX_BODY_LENGTH,
    MAX_SUBJECT_LENGTH,
    Campaign,
    CampaignState,
    CampaignStateError,
    NoSuchCampaign,
)
from smtpgw.model import Priority
from smtpgw.recipients import (
    CsvRefused,
    ImportResult,
    Recipient,
    RecipientStatus,
    RowError,
    TooManyRecipients,
    parse_recipients_csv,
)
from smtpgw.userstore import NoSuchList
from smtpgw.validation import ValidationError, validate_list_name, validate_priority
from web.auth import Visitor, arg, page
from web.pages_lists import priority_label
from web.render import csrf_field, field, format_time, table
from web.routes import PageBase, pages

__all__ = [
    "CAMPAIGNS_PAGE_SIZE",
    "ECHO_LIMIT",
    "LATEST_SEND_AT",
    "MAX_ERRORS_SHOWN",
    "RECIPIENTS_PAGE_SIZE",
    "REFRESH_SECONDS",
    "CampaignForm",
    "CampaignPages",
    "ImportOutcome",
    "check_campaign_form",
    "import_job",
    "masked_address",
    "parse_send_at_field",
]

RECIPIENTS_PAGE_SIZE: Final = 50
"""Recipients one page of a list's table shows."""

CAMPAIGNS_PAGE_SIZE: Final = 50

LATEST_SEND_AT: Final = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
"""
The last time a send may be scheduled for: times are shown in UTC, and a
later one has no year of four digits (nor a datetime to show it with).
"""
"""Sends one page of the listing shows."""

MAX_ERRORS_SHOWN: Final = 200
"""Bad rows an import names one by one; the others are only counted."""

ECHO_LIMIT: Final = 1024 * 1024
"""The largest CSV (in bytes) put back into the form after an import with
bad rows, so that it can be fixed there or its valid rows imported; a larger
one must be chosen again."""

REFRESH_SECONDS: Final = 2
"""How often a send's page reloads while the send runs or is paused."""

MAX_FIELD_SHOWN: Final = 80
"""Characters of a merge field's value the recipients' table shows."""

MAX_FILTER_LENGTH: Final = 200

_MAX_ID_DIGITS: Final = 18

_STATE_BADGES: Final[Mapping[CampaignState, str]] = {
    CampaignState.SCHEDULED: "badge",
    CampaignState.SENDING: "badge good",
    CampaignState.PAUSED: "badge warn",
    CampaignState.FINISHED: "badge good",
    CampaignState.CANCELLED: "badge bad",
}

_RECIPIENT_BADGES: Final[Mapping[RecipientStatus, str]] = {
    RecipientStatus.SUBSCRIBED: "badge good",
    RecipientStatus.UNSUBSCRIBED: "badge",
    RecipientStatus.BOUNCED: "badge bad",
}

_SEND_FIELDS: Final = frozenset({"subject", "text", "html", "sender", "priority", "send_at"})
"""The store's fields that the new-send form shows an error beside."""

_OPEN: Final = frozenset({CampaignState.SCHEDULED, CampaignState.SENDING, CampaignState.PAUSED})

_NO_SENDS: Final = (
    "Console sends are not available: this admin app runs without the gateway's store of sends."
)
_NO_RECIPIENTS: Final = (
    "Recipients are not available: this admin app runs without the gateway's recipients store."
)

_log = Logger()


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(part, safe="") for part in parts)


# --- pure helpers ---------------------------------------------------------------


def masked_address(email: str) -> str:
    """
    An address as the public unsubscribe page shows it: enough for its
    owner to recognize it, not the whole of it to whoever the link was
    forwarded to (C{ann@example.org} is C{a…@example.org}).
    """
    local, at, domain = email.rpartition("@")
    if not at:
        return "…"
    return f"{local[:1]}…@{domain}"


def parse_send_at_field(text: str) -> float | None:
    """
    Read the form's C{send_at}: a C{datetime-local} value (C{2030-01-31T09:00},
    seconds optional) in UTC, or nothing for now.

    @return: the time, L{None} for now; a time before 1970 is as any past
        time (now).
    @raise ValidationError: for the field C{send_at}.
    """
    text = text.strip()
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(
            "send_at", f"{text[:40]!r} is not a date and time: use 2030-01-31T09:00 (UTC)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        when = moment.timestamp()
    except (OverflowError, ValueError):
        raise ValidationError("send_at", f"{text[:40]!r} is out of range") from None
    if when > LATEST_SEND_AT:
        raise ValidationError(
            "send_at",
            f"{text[:40]!r} is later than 9999-12-31T23:59:59Z, the last time a send can have",
        )
    return max(0.0, when)


@frozen
class CampaignForm:
    """
    The new-send form as it was sent: text as typed, so that a form with
    errors shows it again unchanged.
    """

    list: str = ""
    subject: str = ""
    text: str = ""
    html: str = ""
    sender: str = ""
    priority: str = str(int(Priority.NORMAL))
    send_at: str = ""

    @classmethod
    def from_request(cls, request: IRequest) -> CampaignForm:
        """
        The form as posted.
        """
        return cls(
            list=arg(request, "list").strip(),
            subject=arg(request, "subject"),
            # Browsers send a textarea's line breaks as CRLF; the message
            # builder makes its own line ends.
            text=arg(request, "text").replace("\r\n", "\n"),
            html=arg(request, "html").replace("\r\n", "\n"),
            sender=arg(request, "sender").strip(),
            priority=arg(request, "priority").strip(),
            send_at=arg(request, "send_at").strip(),
        )


def check_campaign_form(form: CampaignForm) -> tuple[dict[str, Any], dict[str, str]]:
    """
    Check the fields of the new-send form that need no store, with the
    store's rules, so that all their errors are shown at once (the list's
    existence and its sender policy are the store's to check).

    @return: the keyword arguments for the store's C{create} besides the
        list and subject (complete only without errors), and the errors by
        field name.
    """
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    if not form.list:
        errors["list"] = "Choose a list."
    else:
        try:
            validate_list_name(form.list)
        except ValidationError as e:
            errors["list"] = e.message
    subject = form.subject.strip()
    if not subject:
        errors["subject"] = "A subject is required."
    elif len(subject) > MAX_SUBJECT_LENGTH:
        errors["subject"] = (
            f"{len(subject)} characters, more than the {MAX_SUBJECT_LENGTH} allowed."
        )
    elif "\r" in subject or "\n" in subject:
        errors["subject"] = "The subject must be one line."
    for name, body in (("text", form.text), ("html", form.html)):
        if len(body) > MAX_BODY_LENGTH:
            errors[name] = f"{len(body)} characters, more than the {MAX_BODY_LENGTH} allowed."
        elif body.strip():
            values[name] = body
    if not form.text.strip() and not form.html.strip():
        errors["text"] = "A text body or an HTML body (or both) is required."
    if not form.sender:
        errors["sender"] = "A sender address is required."
    else:
        values["sender"] = form.sender
    try:
        values["priority"] = validate_priority(form.priority)
    except ValidationError as e:
        errors["priority"] = e.message
    try:
        values["send_at"] = parse_send_at_field(form.send_at)
    except ValidationError as e:
        errors["send_at"] = e.message
    return values, errors


@frozen
class ImportOutcome:
    """
    What an import of a CSV file came to.

    @ivar valid: the good rows of the file.
    @ivar result: what the store did, unless the file was refused whole.
    @ivar refused: why the file was refused whole, if it was.
    """

    valid: int
    result: ImportResult | None
    refused: CsvRefused | None = None


def import_job(data: bytes, name: str, valid_only: bool) -> Any:
    """
    The import as it runs on the recipients store's thread (parsing a
    large file takes a while: not on the reactor's).

    @return: a callable of the store, answering an L{ImportOutcome}.
    """

    def run(store: Any) -> ImportOutcome:
        try:
            parsed = parse_recipients_csv(data)
        except CsvRefused as e:
            return ImportOutcome(0, None, e)
        result: ImportResult = store.import_recipients(name, parsed, valid_only=valid_only)
        return ImportOutcome(len(parsed.rows), result)

    return run


def _plural(count: int, word: str) -> str:
    return word if count == 1 else word + "s"


def _id(text: str) -> int | None:
    if text.isascii() and text.isdigit() and len(text) <= _MAX_ID_DIGITS and int(text) > 0:
        return int(text)
    return None


def _option(value: str, label: str, current: str) -> Tag:
    option = tags.option(label, value=value)
    if value == current:
        option(selected="selected")
    return option


def _state_badge(campaign: Campaign) -> Tag:
    return tags.span(
        campaign.state.value,
        class_=_STATE_BADGES.get(campaign.state, "badge"),
        **{"data-state": campaign.state.value},
    )


def _reason(campaign: Campaign) -> str | None:
    if campaign.state is not CampaignState.PAUSED:
        return None
    return campaign.paused_reason or "paused"


def _progress(campaign: Campaign, **attributes: str) -> Tag:
    """
    The bar of the messages done (delivered or bounced) against the total:
    C{sent} runs up to a window ahead of the deliveries, so a bar of it
    would fill long before the send is over.
    """
    if campaign.total is None:
        # Not started: an indeterminate bar says nothing is counted yet.
        return tags.progress(**attributes)
    top = max(campaign.total, 1)
    return tags.progress(value=str(min(campaign.done, top)), max=str(top), **attributes)


def _rate(campaign: Campaign) -> str:
    if campaign.state is not CampaignState.SENDING:
        return "—"
    return f"{campaign.rate:.1f}/s"


def _short(value: str) -> str:
    return value if len(value) <= MAX_FIELD_SHOWN else value[: MAX_FIELD_SHOWN - 1] + "…"


def _fields(recipient: Recipient) -> Tag | str:
    if not recipient.fields:
        return tags.span("—", class_="muted")
    cell = tags.span()
    for number, (name, value) in enumerate(sorted(recipient.fields.items())):
        if number:
            cell(" · ")
        cell(tags.span(f"{name}: ", class_="muted"), _short(value))
    return cell


def _starts(campaign: Campaign, now: float) -> str:
    if campaign.send_at is None or campaign.send_at <= now:
        return "now"
    return format_time(campaign.send_at)


def _is_due(campaign: Campaign, now: float) -> bool:
    return campaign.send_at is None or campaign.send_at <= now


# --- the pages ---------------------------------------------------------------------


class CampaignPages(PageBase):
    """
    Console sends and recipients of lists, and the public unsubscribe page.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """

    # --- recipients -------------------------------------------------------------

    @pages.route("/lists/<string:name>/recipients", methods=["GET", "HEAD"])
    @page
    async def recipients_page(self, request: IRequest, visitor: Visitor, name: str) -> bytes:
        return await self._recipients_page(request, visitor, name)

    async def _recipients_page(
        self,
        request: IRequest,
        visitor: Visitor,
        name: str,
        *,
        status: int = 200,
        errors: Mapping[str, str] | None = None,
        row_errors: Sequence[RowError] = (),
        valid: int = 0,
        pasted: str = "",
        echo_dropped: bool = False,
    ) -> bytes:
        store = self.ctx.recipients
        if store is None:
            return await self._campaigns_unavailable(request, visitor, _NO_RECIPIENTS, "lists")
        if await self.ctx.users.get_list(name) is None:
            return await self._recipients_no_list(request, visitor)
        shown = arg(request, "status").strip()[:MAX_FILTER_LENGTH]
        statuses = {status.value: status for status in RecipientStatus}
        chosen = statuses.get(shown)
        if shown and chosen is None:
            shown = ""
        after = _id(arg(request, "after").strip()) or 0
        try:
            counts: dict[RecipientStatus, int] = await store.counts(name)
            found: list[Recipient] = await store.recipients(
                name, after, RECIPIENTS_PAGE_SIZE + 1, chosen
            )
        except NoSuchList:
            return await self._recipients_no_list(request, visitor)
        more = len(found) > RECIPIENTS_PAGE_SIZE
        found = found[:RECIPIENTS_PAGE_SIZE]
        content = tags.div(
            tags.p(
                tags.a("All lists", href="/lists"),
                " · ",
                tags.a(f"List {name}", href=_path("lists", name)),
                class_="muted",
            ),
            self._recipients_counts(name, counts, shown),
            tags.div(class_="actions")(
                tags.a(
                    "New console send to this list",
                    href="/campaigns/new?" + urlencode({"list": name}),
                    class_="button secondary",
                    id="new-send-for-list",
                )
            ),
            self._recipients_import_form(
                visitor,
                name,
                errors or {},
                row_errors,
                valid,
                pasted,
                echo_dropped=echo_dropped,
                open_=bool(errors or row_errors) or not any(counts.values()),
            ),
            tags.h2("Recipients"),
            table(
                ("Email", "Fields", "Status"),
                (
                    (
                        tags.span(r.email, class_="mono"),
                        _fields(r),
                        tags.span(r.status.value, class_=_RECIPIENT_BADGES[r.status]),
                    )
                    for r in found
                ),
                id="recipients",
            ),
            self._recipients_pager(name, shown, after, found, more),
        )
        return await self.show(
            request, visitor, f"Recipients of {name}", content, active="lists", status=status
        )

    def _recipients_counts(
        self, name: str, counts: Mapping[RecipientStatus, int], shown: str
    ) -> Tag:
        grid = tags.div(class_="grid", id="recipient-counts")
        base = _path("lists", name, "recipients")
        for status in RecipientStatus:
            link = tags.a(
                "only these" if shown != status.value else "all",
                href=base
                if shown == status.value
                else base + "?" + urlencode({"status": status.value}),
                class_="hint",
            )
            grid(
                tags.div(class_="card")(
                    tags.div(status.value.capitalize(), class_="muted"),
                    tags.div(
                        str(counts.get(status, 0)),
                        class_="figure",
                        id=f"count-{status.value}",
                    ),
                    link,
                )
            )
        return grid

    def _recipients_pager(
        self, name: str, shown: str, after: int, found: list[Recipient], more: bool
    ) -> Tag:
        pager = tags.div(class_="actions", id="recipients-pager")
        base = _path("lists", name, "recipients")
        query: dict[str, str] = {"status": shown} if shown else {}
        if after:
            pager(
                tags.a(
                    "First page",
                    href=base + ("?" + urlencode(query) if query else ""),
                    class_="button secondary",
                )
            )
        if more and found:
            pager(
                tags.a(
                    "Next page",
                    href=base + "?" + urlencode({**query, "after": str(found[-1].id)}),
                    class_="button secondary",
                    id="recipients-next",
                )
            )
        return pager

    def _recipients_import_form(
        self,
        visitor: Visitor,
        name: str,
        errors: Mapping[str, str],
        row_errors: Sequence[RowError],
        valid: int,
        pasted: str,
        *,
        echo_dropped: bool,
        open_: bool,
    ) -> Tag:
        csv_error = errors.get("csv")
        textarea = tags.textarea(
            # The parser drops one newline right after <textarea>: keep the
            # text's own first line whatever it is.
            "\n" + pasted,
            name="csv",
            id="f-csv",
            rows="8",
            spellcheck="false",
            class_="mono",
        )
        form = tags.form(
            method="post",
            action=_path("lists", name, "recipients", "import"),
            enctype="multipart/form-data",
            id="import-recipients",
            class_="stack",
        )(csrf_field(visitor))
        if row_errors:
            form(self._recipients_row_errors(row_errors, valid))
        form(
            field(
                "file",
                "CSV file",
                tags.input(type="file", name="file", id="f-file", accept=".csv,text/csv"),
                error=errors.get("file"),
                hint="UTF-8, with a header row that has an 'email' column; the other "
                "columns become merge fields such as {{name}}. Used when chosen, "
                "instead of the text below.",
            ),
            field(
                "csv",
                "Or paste the rows",
                textarea,
                error=csv_error,
                hint=(
                    "The rows could not be shown here again (too large, or not UTF-8): "
                    "choose the file again."
                    if echo_dropped
                    else "The same as a file: a header row (email,name,...), then one "
                    "recipient a line (ann@example.org,Ann,...)."
                ),
            ),
        )
        actions = tags.div(class_="actions")(
            tags.button("Import", type="submit", id="import-submit")
        )
        if row_errors and valid > 0:
            actions(
                tags.button(
                    f"Import the {valid} valid {_plural(valid, 'row')}",
                    type="submit",
                    name="valid_only",
                    value="yes",
                    class_="secondary",
                    id="import-valid",
                )
            )
        form(actions)
        # Folded away once the list has recipients, so their table comes
        # first; open while empty or with something to fix.
        details = tags.details(class_="card", id="import")(
            tags.summary(tags.strong("Import recipients from CSV")), form
        )
        if open_:
            details(open="open")
        return details

    def _recipients_row_errors(self, row_errors: Sequence[RowError], valid: int) -> Tag:
        items = tags.ul(id="import-errors", class_="errors")
        for error in row_errors[:MAX_ERRORS_SHOWN]:
            items(
                tags.li(
                    tags.strong(f"line {error.line}"),
                    ": ",
                    error.message,
                    **{"data-line": str(error.line)},
                )
            )
        left = len(row_errors) - MAX_ERRORS_SHOWN
        if left > 0:
            items(tags.li(f"… and {left} more", class_="muted"))
        bad = len(row_errors)
        summary = (
            f"{bad} {'row has' if bad == 1 else 'rows have'} errors: nothing was imported. "
            "Fix them below and import again"
            + (f", or import the {valid} valid {_plural(valid, 'row')} alone." if valid else ".")
        )
        return tags.div(class_="notice bad", role="alert", id="import-summary")(
            tags.p(summary), items
        )

    @pages.route("/lists/<string:name>/recipients/import", methods=["POST"])
    @page
    async def recipients_import(self, request: IRequest, visitor: Visitor, name: str) -> bytes:
        store = self.ctx.recipients
        if store is None:
            return await self._campaigns_unavailable(request, visitor, _NO_RECIPIENTS, "lists")
        if await self.ctx.users.get_list(name) is None:
            return await self._recipients_no_list(request, visitor)
        uploaded = bytes((request.args.get(b"file") or [b""])[0])
        pasted = bytes((request.args.get(b"csv") or [b""])[0])
        source = "file" if uploaded.strip() else "csv"
        data = uploaded if source == "file" else pasted
        valid_only = bool(arg(request, "valid_only"))
        echo, dropped = self._recipients_echo(data)
        if not data.strip():
            return await self._recipients_page(
                request,
                visitor,
                name,
                status=400,
                errors={"csv": "Choose a CSV file or paste the rows."},
            )
        try:
            outcome: ImportOutcome = await store.run(import_job(data, name, valid_only))
        except NoSuchList:
            return await self._recipients_no_list(request, visitor)
        except TooManyRecipients as e:
            return await self._recipients_page(
                request,
                visitor,
                name,
                status=409,
                errors={source: str(e)},
                pasted=echo,
                echo_dropped=dropped,
            )
        if outcome.refused is not None:
            return await self._recipients_page(
                request,
                visitor,
                name,
                status=400,
                errors={source: f"Nothing was imported: {outcome.refused}."},
                pasted=echo,
                echo_dropped=dropped,
            )
        result = outcome.result
        assert result is not None
        if not result.applied:
            return await self._recipients_page(
                request,
                visitor,
                name,
                status=400,
                row_errors=result.errors,
                valid=outcome.valid,
                pasted=echo,
                echo_dropped=dropped,
            )
        _log.info(
            "admin {admin} imported {count} recipients into list {name} "
            "({added} added, {updated} updated, {skipped} bad rows skipped)",
            admin=visitor.admin,
            count=result.imported,
            name=name,
            added=result.added,
            updated=result.updated,
            skipped=len(result.errors),
        )
        done = (
            f"Imported {result.imported} {_plural(result.imported, 'recipient')}: "
            f"{result.added} added, "
            f"{result.updated} updated (their status kept)."
        )
        if result.errors:
            skipped = len(result.errors)
            lines = ", ".join(str(e.line) for e in result.errors[:20])
            more = "…" if skipped > 20 else ""
            done += (
                f" Skipped {skipped} bad {'row' if skipped == 1 else 'rows'} "
                f"({'line' if skipped == 1 else 'lines'} {lines}{more})."
            )
        return self.redirect(request, visitor, _path("lists", name, "recipients"), ("good", done))

    @staticmethod
    def _recipients_echo(data: bytes) -> tuple[str, bool]:
        """
        The CSV to put back into the form, and whether it was too large or
        not text.
        """
        if len(data) > ECHO_LIMIT:
            return "", True
        try:
            return data.decode("utf-8-sig"), False
        except UnicodeDecodeError:
            return "", True

    # --- the sends --------------------------------------------------------------

    @pages.route("/campaigns", methods=["GET", "HEAD"])
    @page
    async def campaigns_index(self, request: IRequest, visitor: Visitor) -> bytes:
        store = self.ctx.campaigns
        if store is None:
            return await self._campaigns_unavailable(request, visitor, _NO_SENDS, "campaigns")
        chosen_list = arg(request, "list").strip()[:MAX_FILTER_LENGTH]
        state_text = arg(request, "state").strip()[:MAX_FILTER_LENGTH]
        errors: dict[str, str] = {}
        states = {state.value: state for state in CampaignState}
        state = states.get(state_text)
        if state_text and state is None:
            errors["state"] = f"{state_text!r} is not a state: use " + ", ".join(states) + "."
        before = _id(arg(request, "before").strip())
        lists = [item.name for item in await self.ctx.users.lists()]
        found: list[Campaign] = await store.campaigns(
            chosen_list or None, state, CAMPAIGNS_PAGE_SIZE, before, bodies=False
        )
        now = self.ctx.clock.seconds()
        filters = tags.form(
            method="get", action="/campaigns", class_="filters", id="campaign-filters"
        )
        list_select = tags.select(name="list", id="f-list")(_option("", "All lists", chosen_list))
        for item in lists + ([chosen_list] if chosen_list and chosen_list not in lists else []):
            list_select(_option(item, item, chosen_list))
        state_select = tags.select(name="state", id="f-state")(
            _option("", "Any state", state_text)
        )
        for value in states:
            state_select(_option(value, value, state_text))
        filters(
            field("list", "List", list_select),
            field("state", "State", state_select, error=errors.get("state")),
            tags.div(class_="actions")(
                tags.button("Filter", type="submit"),
                tags.a("Clear", href="/campaigns", class_="button secondary"),
            ),
        )
        rows = [self._campaigns_row(campaign, now) for campaign in found]
        pager = tags.div(class_="actions", id="campaigns-pager")
        query = {k: v for k, v in (("list", chosen_list), ("state", state_text)) if v}
        if before is not None:
            pager(
                tags.a(
                    "Newest",
                    href="/campaigns" + ("?" + urlencode(query) if query else ""),
                    class_="button secondary",
                )
            )
        if len(found) == CAMPAIGNS_PAGE_SIZE:
            pager(
                tags.a(
                    "Older",
                    href="/campaigns?" + urlencode({**query, "before": str(found[-1].id)}),
                    class_="button secondary",
                    id="campaigns-next",
                )
            )
        content = tags.div(
            tags.div(class_="actions")(
                tags.a("New console send", href="/campaigns/new", class_="button", id="new-send")
            ),
            tags.h2("Sends"),
            filters,
            table(
                (
                    "Send",
                    "List",
                    "Subject",
                    "State",
                    "Progress",
                    "Rate",
                    "Estimated finish",
                    "Created",
                ),
                rows,
                id="campaigns",
            ),
            pager,
        )
        return await self.show(
            request,
            visitor,
            "Console sends",
            content,
            active="campaigns",
            status=400 if errors else 200,
        )

    def _campaigns_row(self, campaign: Campaign, now: float) -> list[Any]:
        state = tags.span(_state_badge(campaign))
        reason = _reason(campaign)
        if reason is not None:
            state(tags.br(), tags.span(reason, class_="hint"))
        elif campaign.state is CampaignState.SCHEDULED:
            state(tags.br(), tags.span(f"starts {_starts(campaign, now)}", class_="hint"))
        total = "—" if campaign.total is None else str(campaign.total)
        return [
            tags.a(f"#{campaign.id}", href=f"/campaigns/{campaign.id}"),
            tags.a(campaign.list, href=_path("lists", campaign.list, "recipients")),
            tags.a(campaign.subject, href=f"/campaigns/{campaign.id}"),
            state,
            tags.div(
                _progress(campaign, **{"aria-label": f"progress of send {campaign.id}"}),
                tags.div(f"{campaign.done} / {total} done", class_="hint"),
                tags.div(f"{campaign.sent} handed to the queue", class_="hint"),
            ),
            _rate(campaign),
            format_time(campaign.eta(now)),
            tags.span(format_time(campaign.created_at), class_="nowrap"),
        ]

    # --- a new send ----------------------------------------------------------------

    @pages.route("/campaigns/new", methods=["GET", "HEAD"])
    @page
    async def campaigns_new(self, request: IRequest, visitor: Visitor) -> bytes:
        if self.ctx.campaigns is None:
            return await self._campaigns_unavailable(request, visitor, _NO_SENDS, "campaigns")
        form = CampaignForm(list=arg(request, "list").strip()[:MAX_FILTER_LENGTH])
        return await self._campaigns_new_page(request, visitor, form, {})

    async def _campaigns_new_page(
        self,
        request: IRequest,
        visitor: Visitor,
        form: CampaignForm,
        errors: Mapping[str, str],
        *,
        status: int = 200,
    ) -> bytes:
        lists = [item.name for item in await self.ctx.users.lists()]
        list_select = tags.select(name="list", id="f-list", required="required")(
            _option("", "Choose a list…", form.list)
        )
        for name in lists:
            list_select(_option(name, name, form.list))
        priority_select = tags.select(name="priority", id="f-priority")
        for priority in Priority:
            priority_select(
                _option(str(int(priority)), priority_label(int(priority)), form.priority)
            )
        html_form = tags.form(
            method="post",
            action="/campaigns/new",
            enctype="multipart/form-data",
            id="new-campaign",
            class_="stack",
        )(
            csrf_field(visitor),
            field(
                "list",
                "List",
                list_select,
                error=errors.get("list"),
                hint="Sent to the list's subscribed recipients when the send starts.",
            ),
            field(
                "subject",
                "Subject",
                value=form.subject,
                error=errors.get("subject"),
                maxlength=str(MAX_SUBJECT_LENGTH),
                required="required",
            ),
            field(
                "text",
                "Text body",
                tags.textarea("\n" + form.text, name="text", id="f-text", rows="10"),
                error=errors.get("text"),
                hint="Merge fields such as {{name}} or {{email}} are filled per recipient; "
                "an unsubscribe link is added unless {{unsubscribe_url}} places it.",
            ),
            field(
                "html",
                "HTML body",
                tags.textarea(
                    "\n" + form.html, name="html", id="f-html", rows="10", class_="mono"
                ),
                error=errors.get("html"),
                hint="Optional; sent with the text body as alternatives when both are given.",
            ),
            field(
                "sender",
                "Sender",
                value=form.sender,
                error=errors.get("sender"),
                type="email",
                required="required",
                hint="It must pass the list's sender policy: a domain or address one of "
                "its SMTP+ users is authorized for.",
            ),
            field("priority", "Priority", priority_select, error=errors.get("priority")),
            field(
                "send_at",
                "Send at (UTC)",
                value=form.send_at,
                error=errors.get("send_at"),
                type="datetime-local",
                hint="Leave empty to send now.",
            ),
            tags.div(class_="actions")(
                tags.button("Save and schedule", type="submit", id="save-campaign"),
                tags.a("Back to the sends", href="/campaigns", class_="button secondary"),
            ),
        )
        content = tags.div(class_="card")(html_form)
        if not lists:
            content = tags.div(
                tags.div(
                    "There is no list yet: ",
                    tags.a("create one", href="/lists"),
                    " first.",
                    class_="notice info",
                ),
                content,
            )
        return await self.show(
            request, visitor, "New console send", content, active="campaigns", status=status
        )

    @pages.route("/campaigns/new", methods=["POST"])
    @page
    async def campaigns_create(self, request: IRequest, visitor: Visitor) -> bytes:
        store = self.ctx.campaigns
        if store is None:
            return await self._campaigns_unavailable(request, visitor, _NO_SENDS, "campaigns")
        form = CampaignForm.from_request(request)
        values, errors = check_campaign_form(form)
        if "list" not in errors and await self.ctx.users.get_list(form.list) is None:
            errors["list"] = f"There is no list named {form.list!r}."
        if "list" not in errors and "sender" not in errors:
            try:
                values["sender"] = await store.check_sender(form.list, form.sender)
            except ValidationError as e:
                errors["sender"] = e.message
            except NoSuchList:
                errors["list"] = f"There is no list named {form.list!r}."
        if errors:
            return await self._campaigns_new_page(request, visitor, form, errors, status=400)
        try:
            campaign: Campaign = await store.create(
                form.list, form.subject.strip(), created_by=visitor.admin, **values
            )
        except ValidationError as e:
            field_name = e.field if e.field in _SEND_FIELDS else "subject"
            return await self._campaigns_new_page(
                request, visitor, form, {field_name: e.message}, status=400
            )
        except NoSuchList:
            return await self._campaigns_new_page(
                request,
                visitor,
                form,
                {"list": f"There is no list named {form.list!r}."},
                status=400,
            )
        self._campaigns_poke()
        _log.info(
            "admin {admin} created console send {id} for list {name}",
            admin=visitor.admin,
            id=campaign.id,
            name=campaign.list,
        )
        now = self.ctx.clock.seconds()
        return self.redirect(
            request,
            visitor,
            f"/campaigns/{campaign.id}",
            ("good", f"Console send #{campaign.id} saved: it starts {_starts(campaign, now)}."),
        )

    # --- one send ----------------------------------------------------------------------

    async def _campaigns_get(
        self, request: IRequest, visitor: Visitor, campaign_id: str
    ) -> Campaign | bytes:
        store = self.ctx.campaigns
        if store is None:
            return await self._campaigns_unavailable(request, visitor, _NO_SENDS, "campaigns")
        number = _id(campaign_id)
        campaign: Campaign | None = None if number is None else await store.get(number)
        if campaign is None:
            return await self.refuse(
                request, visitor, 404, "There is no console send with that number."
            )
        return campaign

    @pages.route("/campaigns/<string:campaign_id>", methods=["GET", "HEAD"])
    @page
    async def campaigns_show(self, request: IRequest, visitor: Visitor, campaign_id: str) -> bytes:
        found = await self._campaigns_get(request, visitor, campaign_id)
        if isinstance(found, bytes):
            return found
        campaign = found
        now = self.ctx.clock.seconds()
        content = tags.div(
            tags.p(tags.a("All console sends", href="/campaigns"), class_="muted"),
            self._campaigns_status(campaign, now),
            self._campaigns_actions(visitor, campaign),
            tags.h2("The send"),
            self._campaigns_details(campaign),
        )
        return await self.show(
            request,
            visitor,
            f"Console send #{campaign.id}: {campaign.subject}",
            content,
            active="campaigns",
        )

    def _campaigns_status(self, campaign: Campaign, now: float) -> Tag:
        live = campaign.state in (CampaignState.SENDING, CampaignState.PAUSED) or (
            campaign.state is CampaignState.SCHEDULED
            and not campaign.paused_by_admin
            and _is_due(campaign, now)
        )
        attributes = {"data-refresh": str(REFRESH_SECONDS)} if live else {}
        state = tags.div(class_="figure")(
            tags.span(
                campaign.state.value,
                class_=_STATE_BADGES.get(campaign.state, "badge"),
                id="campaign-state",
                **{"data-state": campaign.state.value},
            )
        )
        reason = _reason(campaign)
        state_card = tags.div(class_="card")(tags.div("State", class_="muted"), state)
        if reason is not None:
            state_card(tags.div(reason, id="campaign-paused-reason", class_="paused-reason"))
        elif campaign.state is CampaignState.SCHEDULED:
            state_card(tags.div(f"starts {_starts(campaign, now)}", class_="hint"))
        total = "—" if campaign.total is None else str(campaign.total)
        progress_card = tags.div(class_="card")(
            tags.div("Progress", class_="muted"),
            tags.div(class_="figure")(
                tags.span(str(campaign.done), id="campaign-done"),
                " / ",
                tags.span(total, id="campaign-total"),
            ),
            _progress(campaign, id="campaign-progress", class_="wide"),
            tags.div(
                "messages done (delivered or bounced), of the subscribed recipients when it "
                "started",
                class_="hint",
            ),
            tags.div(
                "handed to the queue ",
                tags.strong(str(campaign.sent), id="campaign-sent"),
                class_="hint",
            ),
        )
        rate_card = tags.div(class_="card")(
            tags.div("Current rate", class_="muted"),
            tags.div(_rate(campaign), class_="figure", id="campaign-rate"),
            tags.div(
                "estimated finish ",
                tags.span(format_time(campaign.eta(now)), id="campaign-eta"),
                class_="hint",
            ),
        )
        counts = tags.ul(class_="counts", id="campaign-counts")
        for label, value, key in (
            ("delivered", campaign.delivered, "delivered"),
            ("bounced", campaign.bounced, "bounced"),
            ("deferred", campaign.deferred, "deferred"),
            ("in doubt", campaign.in_doubt, "in-doubt"),
        ):
            counts(
                tags.li(
                    tags.span(label, class_="muted"),
                    " ",
                    tags.strong(str(value), id=f"campaign-{key}"),
                )
            )
        counts_card = tags.div(class_="card")(
            tags.div("Outcomes", class_="muted"),
            counts,
            tags.div(
                "in doubt: being delivered when the gateway stopped, so sent again",
                class_="hint",
            ),
        )
        return tags.div(class_="grid", id="campaign-status", **attributes)(
            state_card, progress_card, rate_card, counts_card
        )

    def _campaigns_actions(self, visitor: Visitor, campaign: Campaign) -> Tag:
        actions = tags.div(class_="actions card", id="campaign-actions")
        base = f"/campaigns/{campaign.id}"
        if campaign.state in _OPEN:
            if campaign.paused_by_admin:
                actions(
                    self._campaigns_button(
                        visitor, base + "/resume", "Resume", "campaign-resume", ""
                    )
                )
            else:
                actions(
                    self._campaigns_button(
                        visitor, base + "/pause", "Pause", "campaign-pause", "secondary"
                    )
                )
            actions(
                tags.a(
                    "Cancel…",
                    href=base + "/cancel",
                    class_="button danger",
                    id="campaign-cancel",
                )
            )
        else:
            actions(tags.span(f"This send is {campaign.state.value}.", class_="muted"))
        return actions

    @staticmethod
    def _campaigns_button(
        visitor: Visitor, action: str, label: str, button_id: str, css: str
    ) -> Tag:
        return tags.form(method="post", action=action, class_="inline")(
            csrf_field(visitor),
            tags.button(label, type="submit", id=button_id, class_=css),
        )

    def _campaigns_details(self, campaign: Campaign) -> Tag:
        details = tags.dl(class_="settings", id="campaign-details")(
            tags.dt("List"),
            tags.dd(tags.a(campaign.list, href=_path("lists", campaign.list, "recipients"))),
            tags.dt("Subject"),
            tags.dd(campaign.subject),
            tags.dt("Sender"),
            tags.dd(campaign.sender),
            tags.dt("Priority"),
            tags.dd(priority_label(int(campaign.priority))),
            tags.dt("Send at"),
            tags.dd(format_time(campaign.send_at, empty="as soon as saved")),
            tags.dt("Created"),
            tags.dd(
                format_time(campaign.created_at)
                + (f" by {campaign.created_by}" if campaign.created_by else "")
            ),
            tags.dt("Started"),
            tags.dd(format_time(campaign.started_at)),
            tags.dt("Finished"),
            tags.dd(format_time(campaign.finished_at)),
        )
        card = tags.div(class_="card")(details)
        for label, body in (("Text body", campaign.text), ("HTML body (source)", campaign.html)):
            if body:
                card(tags.details(tags.summary(label), tags.pre(body, class_="body")))
        return card

    @pages.route("/campaigns/<string:campaign_id>/pause", methods=["POST"])
    @page
    async def campaigns_pause(
        self, request: IRequest, visitor: Visitor, campaign_id: str
    ) -> bytes:
        return await self._campaigns_change(
            request, visitor, campaign_id, "pause", "paused: nothing more is sent until resumed"
        )

    @pages.route("/campaigns/<string:campaign_id>/resume", methods=["POST"])
    @page
    async def campaigns_resume(
        self, request: IRequest, visitor: Visitor, campaign_id: str
    ) -> bytes:
        return await self._campaigns_change(
            request, visitor, campaign_id, "resume", "resumed: it goes on where it stopped"
        )

    @pages.route("/campaigns/<string:campaign_id>/cancel", methods=["GET", "HEAD"])
    @page
    async def campaigns_cancel_confirm(
        self, request: IRequest, visitor: Visitor, campaign_id: str
    ) -> bytes:
        found = await self._campaigns_get(request, visitor, campaign_id)
        if isinstance(found, bytes):
            return found
        campaign = found
        back = f"/campaigns/{campaign.id}"
        if campaign.state not in _OPEN:
            return await self.refuse(
                request,
                visitor,
                409,
                f"Console send #{campaign.id} is {campaign.state.value}: "
                "there is nothing to cancel.",
            )
        total = (
            "all its"
            if campaign.total is None
            else f"{max(0, campaign.total - campaign.sent)} remaining"
        )
        form = tags.form(
            method="post", action=back + "/cancel", class_="card", id="cancel-campaign"
        )(
            csrf_field(visitor),
            tags.p(
                "Cancel console send ",
                tags.strong(f"#{campaign.id} “{campaign.subject}”"),
                f" to list {campaign.list}? It will not go to {total} recipients, its messages "
                "still in the queue are dropped, and this cannot be undone.",
            ),
            tags.div(class_="actions")(
                tags.button(
                    "Cancel the send", type="submit", class_="danger", id="campaign-cancel-confirm"
                ),
                tags.a("Keep it", href=back, class_="button secondary"),
            ),
        )
        return await self.show(request, visitor, "Cancel a console send", form, active="campaigns")

    @pages.route("/campaigns/<string:campaign_id>/cancel", methods=["POST"])
    @page
    async def campaigns_cancel(
        self, request: IRequest, visitor: Visitor, campaign_id: str
    ) -> bytes:
        return await self._campaigns_change(
            request, visitor, campaign_id, "cancel", "cancelled: no further recipient gets it"
        )

    async def _campaigns_change(
        self, request: IRequest, visitor: Visitor, campaign_id: str, verb: str, done: str
    ) -> bytes:
        store = self.ctx.campaigns
        if store is None:
            return await self._campaigns_unavailable(request, visitor, _NO_SENDS, "campaigns")
        number = _id(campaign_id)
        if number is None:
            return await self.refuse(
                request, visitor, 404, "There is no console send with that number."
            )
        try:
            await getattr(store, verb)(number)
        except NoSuchCampaign:
            return await self.refuse(
                request, visitor, 404, "There is no console send with that number."
            )
        except CampaignStateError as e:
            return await self.refuse(request, visitor, 409, f"{e}.")
        self._campaigns_poke()
        _log.info(
            "admin {admin}: {verb} console send {id}", admin=visitor.admin, verb=verb, id=number
        )
        return self.redirect(
            request, visitor, f"/campaigns/{number}", ("good", f"Console send #{number} {done}.")
        )

    def _campaigns_poke(self) -> None:
        if self.ctx.runner is not None:
            self.ctx.runner.poke()

    # --- unsubscribe (public) --------------------------------------------------------

    @pages.route("/unsubscribe/<string:token>", methods=["GET", "HEAD"])
    async def unsubscribe_page(self, request: IRequest, token: str) -> bytes:
        store = self.ctx.recipients
        if store is None:
            return await self._unsubscribe_unavailable(request)
        found: tuple[str, int] | None = await store.verify_unsubscribe_token(token)
        recipient: Recipient | None = None
        if found is not None:
            recipient = await store.get_by_id(*found)
        if recipient is None:
            return await self._unsubscribe_unknown(request)
        who = masked_address(recipient.email)
        if recipient.status is RecipientStatus.UNSUBSCRIBED:
            content = tags.div(class_="card login", id="unsubscribe")(
                tags.p(
                    tags.strong(who),
                    " is not subscribed to ",
                    tags.strong(recipient.list),
                    ": nothing more is sent to it from this list.",
                    id="unsubscribe-done",
                )
            )
            return await self.show(request, None, "Unsubscribed", content)
        form = tags.form(method="post", action=_path("unsubscribe", token), id="unsubscribe-form")(
            # The same body as a mail client's one-click unsubscribe (RFC 8058).
            tags.input(type="hidden", name="List-Unsubscribe", value="One-Click"),
            tags.p(
                "Unsubscribe ",
                tags.strong(who, id="unsubscribe-email"),
                " from ",
                tags.strong(recipient.list, id="unsubscribe-list"),
                "?",
            ),
            tags.p("Nothing more is sent to it from this list.", class_="hint"),
            tags.div(class_="actions")(
                tags.button("Unsubscribe", type="submit", id="unsubscribe-submit")
            ),
        )
        return await self.show(request, None, "Unsubscribe", tags.div(class_="card login")(form))

    @pages.route("/unsubscribe/<string:token>", methods=["POST"])
    async def unsubscribe_post(self, request: IRequest, token: str) -> bytes:
        # No session and no CSRF token: the signed token is the
        # authorization, and a mail client's one-click POST has neither.
        store = self.ctx.recipients
        if store is None:
            return await self._unsubscribe_unavailable(request)
        recipient: Recipient | None = await store.unsubscribe_by_token(token)
        if recipient is None:
            return await self._unsubscribe_unknown(request)
        _log.info(
            "recipient {id} of list {name} unsubscribed by their link",
            id=recipient.id,
            name=recipient.list,
        )
        self._forget_recipient(recipient)
        content = tags.div(class_="card login", id="unsubscribe")(
            tags.p(
                tags.strong(masked_address(recipient.email)),
                " is unsubscribed from ",
                tags.strong(recipient.list),
                ": nothing more is sent to it from this list.",
                id="unsubscribe-done",
            )
        )
        return await self.show(request, None, "Unsubscribed", content)

    def _forget_recipient(self, recipient: Recipient) -> None:
        """
        Have the runner cancel the recipient's messages still queued by
        open sends, rather than let them go out before its next poll finds
        the unsubscribe. A runner without C{forget_recipient} (or none)
        finds it at that poll.
        """
        forget = getattr(self.ctx.runner, "forget_recipient", None)
        if forget is None:
            return
        try:
            cancelled = forget(recipient.list, recipient.id)
        except Exception:
            # The unsubscribe is recorded; the runner's poll still finds it.
            _log.failure(
                "could not cancel the queued messages of recipient {id} of list {name}",
                id=recipient.id,
                name=recipient.list,
            )
            return
        if cancelled:
            _log.info(
                "cancelled {count} queued message(s) of unsubscribed recipient {id} "
                "of list {name}",
                count=cancelled,
                id=recipient.id,
                name=recipient.list,
            )

    async def _unsubscribe_unknown(self, request: IRequest) -> bytes:
        content = tags.div(class_="card login", id="unsubscribe-unknown")(
            tags.p(
                "This unsubscribe link is not valid, or its address is no longer on the list. "
                "Check that the whole link was copied."
            )
        )
        return await self.show(request, None, "Unknown unsubscribe link", content, status=404)

    async def _unsubscribe_unavailable(self, request: IRequest) -> bytes:
        content = tags.div(class_="card login")(
            tags.p("Unsubscribing is not available right now: try again later.")
        )
        return await self.show(request, None, "Not available", content, status=503)

    # --- errors -----------------------------------------------------------------

    async def _campaigns_unavailable(
        self, request: IRequest, visitor: Visitor, message: str, active: str
    ) -> bytes:
        content = tags.div(class_="card", id="campaigns-unavailable")(tags.p(message))
        return await self.show(
            request, visitor, "Not available", content, active=active, status=503
        )

    async def _recipients_no_list(self, request: IRequest, visitor: Visitor) -> bytes:
        return await self.refuse(request, visitor, 404, "There is no list of that name.")
