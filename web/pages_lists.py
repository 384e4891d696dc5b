"""
Lists and their SMTP+ settings, SMTP+ users: add, edit, regenerate the password, delete.

A new or regenerated password is shown once: the POST that made it puts it
in the session's L{web.auth.OneTimeBox} and redirects to the user's page,
which takes it out as it shows it, so a reload shows it no more. Nothing
else ever shows a password or its hash.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final
from urllib.parse import quote

from attrs import frozen
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, tags

from smtpgw.database import StoreError
from smtpgw.model import Enforcement, MailList, Priority, SmtpUser
from smtpgw.ports import PortSpecError, format_ports, parse_ports
from smtpgw.userstore import ListExists, ListNotEmpty, NoSuchList, NoSuchUser
from smtpgw.validation import (
    MAX_NOTES_LENGTH,
    ValidationError,
    parse_domains,
    parse_senders,
    validate_enforcement,
    validate_list_name,
    validate_notes,
    validate_priority,
)
from web.auth import Visitor, arg, page
from web.render import csrf_field, field, format_time, table
from web.routes import PageBase, pages

__all__ = [
    "PRIORITY_WORDS",
    "ListPages",
    "UserForm",
    "check_user_form",
    "password_kind",
    "ports_in_words",
    "priority_label",
]

PRIORITY_WORDS: Final[Mapping[int, str]] = {
    Priority.VERY_HIGH: "very high",
    Priority.HIGH: "high",
    Priority.NORMAL: "normal",
    Priority.LOW: "low",
    Priority.VERY_LOW: "very low",
}

NOTES_SHOWN_IN_TABLE: Final = 160
"""Characters of a user's notes the list's table shows; the user's page shows all."""

ENFORCEMENT_HINT: Final = (
    "Enforce refuses mail from senders the user is not authorized for. Monitor "
    "accepts it but still raises the sender-domain alert for every violation: "
    "use it to tighten the rules without breaking a live integration."
)
DOMAINS_HINT: Final = (
    "Sender domains separated by ';', e.g. example.com;marketing.example.com. "
    "Matching is exact: example.com authorizes a@example.com, not a@sub.example.com."
)
SENDERS_HINT: Final = (
    "Sender addresses separated by ';'. A sender passes when its address or its "
    "domain is listed; with both lists empty no sender passes."
)
NO_SENDER_PASSES: Final = "no sender passes"
EN_DASH: Final = "\u2013"


def priority_label(priority: int) -> str:
    """
    A priority as the pages say it, e.g. C{"1 — very high"}.
    """
    return f"{int(priority)} — {PRIORITY_WORDS.get(int(priority), 'unknown')}"


def ports_in_words(spec: str) -> str:
    """
    The SMTP ports as a sentence says them.

    @param spec: as C{--ports} gives them, e.g. C{"23,25,26,587,1025-5000"}.
    @return: e.g. C{"23, 25, 26, 587 and 1025\u20135000"} (an en dash); C{spec} itself when
        it cannot be read.
    """
    try:
        canonical = format_ports(parse_ports(spec))
    except PortSpecError:
        return spec
    pieces = [piece.replace("-", EN_DASH) for piece in canonical.split(",")]
    if len(pieces) == 1:
        return pieces[0]
    return ", ".join(pieces[:-1]) + " and " + pieces[-1]


def password_kind(username: str) -> str:
    """
    Under which kind a user's new password waits in the session's
    L{web.auth.OneTimeBox}: only that user's page shows it.
    """
    return f"password:{username}"


def _path(*parts: str) -> str:
    return "/" + "/".join(quote(part, safe="") for part in parts)


@frozen
class UserForm:
    """
    The add/edit user form as it was sent (or as a user's record fills it):
    text as typed, so that a form with errors shows it again unchanged.
    """

    active: bool = True
    priority: str = str(int(Priority.NORMAL))
    notes: str = ""
    authorized_domains: str = ""
    authorized_senders: str = ""
    enforcement: str = Enforcement.ENFORCE.value

    @classmethod
    def from_user(cls, user: SmtpUser) -> UserForm:
        """
        The form filled with a user's record.
        """
        return cls(
            active=user.active,
            priority=str(int(user.priority)),
            notes=user.notes,
            authorized_domains=";".join(user.authorized_domains),
            authorized_senders=";".join(user.authorized_senders),
            enforcement=user.enforcement.value,
        )

    @classmethod
    def from_request(cls, request: IRequest) -> UserForm:
        """
        The form as posted; an unchecked checkbox is not sent at all.
        """
        return cls(
            active=request.args.get(b"active") is not None,
            priority=arg(request, "priority"),
            # Browsers send a textarea's line breaks as CRLF; keep what the
            # admin typed (and what maxlength counted).
            notes=arg(request, "notes").replace("\r\n", "\n"),
            authorized_domains=arg(request, "authorized_domains"),
            authorized_senders=arg(request, "authorized_senders"),
            enforcement=arg(request, "enforcement"),
        )


def check_user_form(form: UserForm) -> tuple[dict[str, Any], dict[str, str]]:
    """
    Check every field of a user form with the store's rules, so that all
    the errors are shown at once.

    @return: the keyword arguments for the store's C{create_user} or
        C{update_user} (complete only when there are no errors), and the
        errors by form field name.
    """
    values: dict[str, Any] = {"active": form.active}
    errors: dict[str, str] = {}
    checks: tuple[tuple[str, str, Callable[[Any], Any], str], ...] = (
        ("priority", "priority", validate_priority, form.priority),
        ("domains", "authorized_domains", parse_domains, form.authorized_domains),
        ("senders", "authorized_senders", parse_senders, form.authorized_senders),
        ("notes", "notes", validate_notes, form.notes),
        ("enforcement", "enforcement", validate_enforcement, form.enforcement),
    )
    for keyword, name, check, raw in checks:
        try:
            values[keyword] = check(raw)
        except ValidationError as e:
            errors[name] = e.message
    return values, errors


def _select(name: str, options: list[tuple[str, str]], chosen: str) -> Tag:
    control = tags.select(name=name, id=f"f-{name}")
    for value, label in options:
        option = tags.option(label, value=value)
        if value == chosen:
            option(selected="selected")
        control(option)
    return control


def _no_sender_passes(user: SmtpUser) -> bool:
    return not user.authorized_domains and not user.authorized_senders


def _warning_badge() -> Tag:
    return tags.span(
        NO_SENDER_PASSES,
        class_="badge warn",
        title="Both the authorized domains and the authorized senders are empty.",
    )


def _last_used(user: SmtpUser) -> str:
    if user.last_used_at is None:
        return "never"
    when = format_time(user.last_used_at)
    return f"{when} from {user.last_used_ip}" if user.last_used_ip else when


def _entries(values: tuple[str, ...]) -> Any:
    if not values:
        return tags.span("none", class_="muted")
    return [tags.div(value, class_="mono") for value in values]


def _short(text: str) -> str:
    if len(text) <= NOTES_SHOWN_IN_TABLE:
        return text
    return text[: NOTES_SHOWN_IN_TABLE - 1] + "…"


class ListPages(PageBase):
    """
    Lists and their SMTP+ settings, SMTP+ users: add, edit, regenerate the password, delete.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """

    # -- lists ------------------------------------------------------------

    @pages.route("/lists", methods=["GET", "HEAD"])
    @page
    async def lists_index(self, request: IRequest, visitor: Visitor) -> bytes:
        return await self._lists_page(request, visitor)

    async def _lists_page(
        self,
        request: IRequest,
        visitor: Visitor,
        *,
        name: str = "",
        error: str | None = None,
        status: int = 200,
    ) -> bytes:
        lists: list[MailList] = await self.ctx.users.lists()
        counts: dict[str, int] = await self.ctx.users.user_counts()
        rows = [
            (
                tags.a(item.name, href=_path("lists", item.name)),
                str(counts.get(item.name, 0)),
                format_time(item.created_at),
            )
            for item in lists
        ]
        form = tags.form(method="post", action="/lists", id="new-list", class_="stack")(
            csrf_field(visitor),
            field(
                "name",
                "Name",
                value=name,
                error=error,
                hint="1 to 64 lower-case letters, digits, '.', '_' or '-', "
                "starting with a letter or digit.",
                required="required",
                maxlength="64",
                autocomplete="off",
            ),
            tags.div(class_="actions")(
                tags.button("Create list", type="submit", id="create-list")
            ),
        )
        content = tags.div(
            table(("List", "SMTP+ users", "Created"), rows, id="lists"),
            tags.div(class_="card")(tags.h2("New list"), form),
        )
        return await self.show(request, visitor, "Lists", content, active="lists", status=status)

    @pages.route("/lists", methods=["POST"])
    @page
    async def lists_create(self, request: IRequest, visitor: Visitor) -> bytes:
        name = arg(request, "name").strip()
        try:
            validate_list_name(name)
            await self.ctx.users.create_list(name)
        except ValidationError as e:
            return await self._lists_page(request, visitor, name=name, error=e.message, status=400)
        except ListExists:
            return await self._lists_page(
                request,
                visitor,
                name=name,
                error=f"A list named {name!r} already exists.",
                status=409,
            )
        except StoreError as e:
            return await self._store_refused(request, visitor, e)
        return self.redirect(
            request, visitor, _path("lists", name), ("good", f"List {name} created.")
        )

    async def _get_list(self, name: str) -> MailList | None:
        found: MailList | None = await self.ctx.users.get_list(name)
        return found

    async def _no_list(self, request: IRequest, visitor: Visitor) -> bytes:
        return await self.refuse(request, visitor, 404, "There is no list of that name.")

    async def _store_refused(self, request: IRequest, visitor: Visitor, error: Exception) -> bytes:
        # The store's messages are one line meant for admins (and name no secret).
        return await self.refuse(request, visitor, 409, f"The change was not made: {error}.")

    async def _no_user(self, request: IRequest, visitor: Visitor) -> bytes:
        return await self.refuse(request, visitor, 404, "There is no SMTP+ user of that name.")

    @pages.route("/lists/<string:name>", methods=["GET", "HEAD"])
    @page
    async def lists_show(self, request: IRequest, visitor: Visitor, name: str) -> bytes:
        mail_list = await self._get_list(name)
        if mail_list is None:
            return await self._no_list(request, visitor)
        try:
            users: list[SmtpUser] = await self.ctx.users.users(name)
        except NoSuchList:
            return await self._no_list(request, visitor)
        settings = self.ctx.settings
        encryption = (
            "STARTTLS required before AUTH"
            if settings.require_tls
            else "STARTTLS, optional on every port"
        )
        details = tags.dl(class_="settings")(
            tags.dt("Server address"),
            tags.dd(settings.hostname, id="setting-hostname"),
            tags.dt("Ports"),
            tags.dd(ports_in_words(settings.ports), id="setting-ports"),
            tags.dt("Encryption"),
            tags.dd(encryption, id="setting-encryption"),
            tags.dt("Authentication"),
            tags.dd("AUTH PLAIN, LOGIN — with an SMTP+ user below", id="setting-auth"),
        )
        rows = [self._user_row(user) for user in users]
        content = tags.div(
            tags.p(tags.a("All lists", href="/lists"), class_="muted"),
            tags.h2("SMTP+ settings"),
            tags.div(class_="card")(details),
            tags.h2("SMTP+ users"),
            table(
                (
                    "Username",
                    "Active",
                    "Priority",
                    "Notes",
                    "Authorized domains",
                    "Authorized senders",
                    "Enforcement",
                    "Last used",
                    "Actions",
                ),
                rows,
                id="users",
            ),
            tags.div(class_="actions")(
                tags.a(
                    "Add new user",
                    href=_path("lists", name, "users", "new"),
                    id="add-user",
                    class_="button",
                ),
                tags.a(
                    "Recipients",
                    href=_path("lists", name, "recipients"),
                    id="recipients-link",
                    class_="button secondary",
                ),
                tags.a(
                    "Delete list",
                    href=_path("lists", name, "delete"),
                    id="delete-list",
                    class_="button secondary",
                ),
            ),
        )
        return await self.show(request, visitor, f"List {name}", content, active="lists")

    def _user_row(self, user: SmtpUser) -> list[Any]:
        username: list[Any] = [
            tags.a(user.username, href=_path("users", user.username), class_="nowrap")
        ]
        if _no_sender_passes(user):
            username += [" ", _warning_badge()]
        active = (
            tags.span("active", class_="badge good")
            if user.active
            else tags.span("inactive", class_="badge")
        )
        actions = tags.div(class_="actions")(
            tags.a("Edit", href=_path("users", user.username), class_="button small secondary"),
            tags.a(
                "Delete",
                href=_path("users", user.username, "delete"),
                class_="button small danger",
            ),
        )
        return [
            username,
            active,
            tags.span(priority_label(user.priority), class_="nowrap"),
            _short(user.notes),
            _entries(user.authorized_domains),
            _entries(user.authorized_senders),
            user.enforcement.value,
            _last_used(user),
            actions,
        ]

    @pages.route("/lists/<string:name>/delete", methods=["GET", "HEAD"])
    @page
    async def lists_delete_confirm(self, request: IRequest, visitor: Visitor, name: str) -> bytes:
        if await self._get_list(name) is None:
            return await self._no_list(request, visitor)
        counts: dict[str, int] = await self.ctx.users.user_counts()
        return await self._list_delete_page(request, visitor, name, counts.get(name, 0))

    async def _list_delete_page(
        self,
        request: IRequest,
        visitor: Visitor,
        name: str,
        users: int,
        *,
        refused: str | None = None,
    ) -> bytes:
        card = tags.div(class_="card")
        if users:
            card(
                tags.p(
                    f"The list {name} still has {users} SMTP+ user(s). A list is only "
                    "deleted once it has none: delete its users first.",
                    class_="notice bad" if refused else "notice info",
                )
            )
        card(
            tags.p(f"Delete the list {name}? This cannot be undone."),
            tags.form(method="post", action=_path("lists", name, "delete"), class_="actions")(
                csrf_field(visitor),
                tags.button("Delete list", type="submit", class_="danger", id="confirm-delete"),
                tags.a(
                    "Cancel",
                    href=_path("lists", name),
                    class_="button secondary",
                    id="cancel-delete",
                ),
            ),
        )
        notices = [("bad", refused)] if refused else []
        return await self.show(
            request,
            visitor,
            f"Delete list {name}",
            card,
            active="lists",
            status=409 if refused else 200,
            notices=notices,
        )

    @pages.route("/lists/<string:name>/delete", methods=["POST"])
    @page
    async def lists_delete(self, request: IRequest, visitor: Visitor, name: str) -> bytes:
        try:
            await self.ctx.users.delete_list(name)
        except NoSuchList:
            return await self._no_list(request, visitor)
        except ListNotEmpty:
            counts: dict[str, int] = await self.ctx.users.user_counts()
            users = counts.get(name, 0)
            why = (
                "it still has SMTP+ users."
                if users
                else "it has console sends, and a list with console sends is kept."
            )
            return await self._list_delete_page(
                request, visitor, name, users, refused=f"The list {name} was not deleted: {why}"
            )
        except StoreError as e:
            return await self._store_refused(request, visitor, e)
        return self.redirect(request, visitor, "/lists", ("good", f"List {name} deleted."))

    # -- SMTP+ users ------------------------------------------------------

    def _user_form(
        self,
        visitor: Visitor,
        action: str,
        form: UserForm,
        errors: Mapping[str, str],
        *,
        cancel: str,
        username: str | None = None,
    ) -> Tag:
        active_box = tags.input(type="checkbox", name="active", id="f-active", value="yes")
        if form.active:
            active_box(checked="checked")
        priorities = [(str(int(p)), priority_label(p)) for p in Priority]
        enforcements = [
            (Enforcement.ENFORCE.value, "enforce — refuse unauthorized senders"),
            (Enforcement.MONITOR.value, "monitor — accept, but alert"),
        ]
        # The HTML parser drops one line break right after <textarea>: give
        # it one, so notes that start with a blank line survive a save.
        notes = tags.textarea(
            "\n" + form.notes,
            name="notes",
            id="f-notes",
            rows="4",
            maxlength=str(MAX_NOTES_LENGTH),
        )
        body = tags.form(method="post", action=action, class_="stack card", id="user-form")(
            csrf_field(visitor)
        )
        if username is None:
            body(
                tags.p(
                    "The username and the password are generated when you save; "
                    "the password is shown once.",
                    class_="hint",
                )
            )
        else:
            body(
                field(
                    "username",
                    "Username",
                    tags.input(
                        type="text",
                        id="f-username",
                        value=username,
                        readonly="readonly",
                    ),
                    hint="Generated; it never changes.",
                )
            )
        body(
            field(
                "active",
                "Active",
                active_box,
                error=errors.get("active"),
                hint="Only active users can authenticate.",
            ),
            field(
                "priority",
                "Priority",
                _select("priority", priorities, form.priority),
                error=errors.get("priority"),
                hint="The default priority of this user's messages; "
                "a message may ask for a higher one.",
            ),
            field(
                "notes",
                "Notes",
                notes,
                error=errors.get("notes"),
                hint=f"A memo for admins, up to {MAX_NOTES_LENGTH} characters.",
            ),
            field(
                "authorized_domains",
                "Authorized domains",
                value=form.authorized_domains,
                error=errors.get("authorized_domains"),
                hint=DOMAINS_HINT,
                autocomplete="off",
            ),
            field(
                "authorized_senders",
                "Authorized senders",
                value=form.authorized_senders,
                error=errors.get("authorized_senders"),
                hint=SENDERS_HINT,
                autocomplete="off",
            ),
            field(
                "enforcement",
                "Enforcement",
                _select("enforcement", enforcements, form.enforcement),
                error=errors.get("enforcement"),
                hint=ENFORCEMENT_HINT,
            ),
            tags.div(class_="actions")(
                tags.button("Save", type="submit", id="save-user"),
                tags.a("Cancel", href=cancel, class_="button secondary"),
            ),
        )
        return body

    @pages.route("/lists/<string:name>/users/new", methods=["GET", "HEAD"])
    @page
    async def users_new(self, request: IRequest, visitor: Visitor, name: str) -> bytes:
        if await self._get_list(name) is None:
            return await self._no_list(request, visitor)
        return await self._new_user_page(request, visitor, name, UserForm(), {})

    async def _new_user_page(
        self,
        request: IRequest,
        visitor: Visitor,
        name: str,
        form: UserForm,
        errors: Mapping[str, str],
    ) -> bytes:
        content = tags.div(
            tags.p(tags.a(f"List {name}", href=_path("lists", name)), class_="muted"),
            self._user_form(
                visitor,
                _path("lists", name, "users", "new"),
                form,
                errors,
                cancel=_path("lists", name),
            ),
        )
        return await self.show(
            request,
            visitor,
            f"New SMTP+ user for {name}",
            content,
            active="lists",
            status=400 if errors else 200,
        )

    @pages.route("/lists/<string:name>/users/new", methods=["POST"])
    @page
    async def users_create(self, request: IRequest, visitor: Visitor, name: str) -> bytes:
        if await self._get_list(name) is None:
            return await self._no_list(request, visitor)
        form = UserForm.from_request(request)
        values, errors = check_user_form(form)
        if not errors:
            try:
                user, password = await self.ctx.users.create_user(name, **values)
            except ValidationError as e:
                errors = {e.field: e.message}
            except NoSuchList:
                return await self._no_list(request, visitor)
            except StoreError as e:
                return await self._store_refused(request, visitor, e)
        if errors:
            return await self._new_user_page(request, visitor, name, form, errors)
        self.auth.once.put(visitor.session_id, password_kind(user.username), password)
        return self.redirect(
            request,
            visitor,
            _path("users", user.username),
            ("good", f"SMTP+ user {user.username} created."),
        )

    async def _get_user(self, username: str) -> SmtpUser | None:
        found: SmtpUser | None = await self.ctx.users.get_user(username)
        return found

    @pages.route("/users/<string:username>", methods=["GET", "HEAD"])
    @page
    async def users_edit(self, request: IRequest, visitor: Visitor, username: str) -> bytes:
        user = await self._get_user(username)
        if user is None:
            return await self._no_user(request, visitor)
        password = None
        if request.method == b"GET":
            password = self.auth.once.take(visitor.session_id, password_kind(username))
        return await self._edit_user_page(
            request, visitor, user, UserForm.from_user(user), {}, password=password
        )

    async def _edit_user_page(
        self,
        request: IRequest,
        visitor: Visitor,
        user: SmtpUser,
        form: UserForm,
        errors: Mapping[str, str],
        *,
        password: str | None = None,
    ) -> bytes:
        content = tags.div(
            tags.p(tags.a(f"List {user.list}", href=_path("lists", user.list)), class_="muted")
        )
        if password is not None:
            content(
                tags.div(class_="secret", role="status")(
                    tags.span(
                        f"The password of {user.username}: copy it now, "
                        "it will not be shown again."
                    ),
                    tags.code(password, id="new-password"),
                    tags.button(
                        "Copy",
                        type="button",
                        class_="small",
                        hidden="hidden",
                        **{"data-copy": "new-password"},
                    ),
                )
            )
        if _no_sender_passes(user):
            content(
                tags.p(class_="notice info", id="no-sender-passes")(
                    _warning_badge(),
                    " Both the authorized domains and the authorized senders are empty: "
                    "this user cannot send as anyone until one of them lists something.",
                )
            )
        content(
            tags.div(class_="card")(
                tags.dl(class_="settings")(
                    tags.dt("List"),
                    tags.dd(user.list),
                    tags.dt("Created"),
                    tags.dd(format_time(user.created_at)),
                    tags.dt("Last used"),
                    tags.dd(_last_used(user), id="last-used"),
                )
            ),
            self._user_form(
                visitor,
                _path("users", user.username),
                form,
                errors,
                cancel=_path("lists", user.list),
                username=user.username,
            ),
            tags.div(class_="card")(
                tags.h2("Password"),
                tags.p(
                    "The password is kept only as a hash and cannot be shown. "
                    "A new one is shown once; the old one stops working at once.",
                    class_="hint",
                ),
                tags.form(
                    method="post",
                    action=_path("users", user.username, "password"),
                    class_="actions",
                )(
                    csrf_field(visitor),
                    tags.button(
                        "Regenerate password",
                        type="submit",
                        class_="secondary",
                        id="regenerate",
                    ),
                ),
            ),
            tags.div(class_="actions")(
                tags.a(
                    "Delete user",
                    href=_path("users", user.username, "delete"),
                    class_="button danger",
                    id="delete-user",
                )
            ),
        )
        return await self.show(
            request,
            visitor,
            f"SMTP+ user {user.username}",
            content,
            active="lists",
            status=400 if errors else 200,
        )

    @pages.route("/users/<string:username>", methods=["POST"])
    @page
    async def users_update(self, request: IRequest, visitor: Visitor, username: str) -> bytes:
        user = await self._get_user(username)
        if user is None:
            return await self._no_user(request, visitor)
        form = UserForm.from_request(request)
        values, errors = check_user_form(form)
        if not errors:
            try:
                user = await self.ctx.users.update_user(username, **values)
            except ValidationError as e:
                errors = {e.field: e.message}
            except NoSuchUser:
                return await self._no_user(request, visitor)
            except StoreError as e:
                return await self._store_refused(request, visitor, e)
        if errors:
            return await self._edit_user_page(request, visitor, user, form, errors)
        return self.redirect(
            request, visitor, _path("users", username), ("good", f"SMTP+ user {username} saved.")
        )

    @pages.route("/users/<string:username>/password", methods=["POST"])
    @page
    async def users_regenerate(self, request: IRequest, visitor: Visitor, username: str) -> bytes:
        try:
            password: str = await self.ctx.users.regenerate_password(username)
        except NoSuchUser:
            return await self._no_user(request, visitor)
        except StoreError as e:
            return await self._store_refused(request, visitor, e)
        self.auth.once.put(visitor.session_id, password_kind(username), password)
        return self.redirect(
            request,
            visitor,
            _path("users", username),
            ("good", "A new password was generated; the old one no longer works."),
        )

    @pages.route("/users/<string:username>/delete", methods=["GET", "HEAD"])
    @page
    async def users_delete_confirm(
        self, request: IRequest, visitor: Visitor, username: str
    ) -> bytes:
        user = await self._get_user(username)
        if user is None:
            return await self._no_user(request, visitor)
        card = tags.div(class_="card")(
            tags.p(
                f"Delete the SMTP+ user {user.username} of the list {user.list}? "
                "Its credentials stop working at once: an integration that uses them "
                "can no longer send. This cannot be undone."
            ),
            tags.form(
                method="post", action=_path("users", user.username, "delete"), class_="actions"
            )(
                csrf_field(visitor),
                tags.button("Delete user", type="submit", class_="danger", id="confirm-delete"),
                tags.a(
                    "Cancel",
                    href=_path("users", user.username),
                    class_="button secondary",
                    id="cancel-delete",
                ),
            ),
        )
        return await self.show(
            request, visitor, f"Delete SMTP+ user {user.username}", card, active="lists"
        )

    @pages.route("/users/<string:username>/delete", methods=["POST"])
    @page
    async def users_delete(self, request: IRequest, visitor: Visitor, username: str) -> bytes:
        user = await self._get_user(username)
        if user is None:
            return await self._no_user(request, visitor)
        try:
            await self.ctx.users.delete_user(username)
        except NoSuchUser:
            return await self._no_user(request, visitor)
        except StoreError as e:
            return await self._store_refused(request, visitor, e)
        return self.redirect(
            request,
            visitor,
            _path("lists", user.list),
            ("good", f"SMTP+ user {username} deleted."),
        )
