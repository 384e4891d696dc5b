"""
API tokens: made in a form and shown once (on the page the form redirects
to, from the session's one-time box), listed without the token, revoked
after a confirmation. The store keeps only a digest of each token.
"""

from __future__ import annotations

from typing import Any, Final

from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.template import Tag, tags

from smtpgw.admins import MAX_TOKEN_NAME_LENGTH, NoSuchToken
from smtpgw.validation import ValidationError
from web.auth import Visitor, arg, page
from web.render import csrf_field, field, format_time
from web.routes import PageBase, pages

__all__ = ["NEW_TOKEN", "TokenPages"]

NEW_TOKEN: Final = "tokens-new"  # noqa: S105 (a box kind, not a secret)
"""The one-time box's kind for a token just made: C{(name, token)}."""

_log = Logger()


def _revoke_link(token_id: int) -> Tag:
    return tags.a("Revoke…", href=f"/tokens/{token_id}/revoke", class_="button small danger")


class TokenPages(PageBase):
    """
    API tokens: made once, listed, revoked.

    Handler names start with the area's name: every page class shares one
    route table, where a handler's name is its endpoint.
    """

    @pages.route("/tokens", methods=["GET", "HEAD"])
    @page
    async def tokens_page(self, request: IRequest, visitor: Visitor) -> bytes:
        # A HEAD shows nothing, so it must not use up the token shown once.
        made = (
            self.auth.once.take(visitor.session_id, NEW_TOKEN)
            if request.method == b"GET"
            else None
        )
        return await self._tokens_render(request, visitor, made=made)

    @pages.route("/tokens", methods=["POST"])
    @page
    async def tokens_create(self, request: IRequest, visitor: Visitor) -> bytes:
        name = arg(request, "name")
        try:
            token, secret = await self.ctx.admins.create_token(name, visitor.admin)
        except ValidationError as e:
            return await self._tokens_render(
                request, visitor, name=name, error=e.message, status=400
            )
        _log.info(
            "admin {admin} created API token {token_id} ({name!r})",
            admin=visitor.admin,
            token_id=token.id,
            name=token.name,
        )
        self.auth.once.put(visitor.session_id, NEW_TOKEN, (token.name, secret))
        return self.redirect(
            request, visitor, "/tokens", ("good", f"API token {token.name!r} created.")
        )

    async def _tokens_render(
        self,
        request: IRequest,
        visitor: Visitor,
        *,
        made: tuple[str, str] | None = None,
        name: str = "",
        error: str | None = None,
        status: int = 200,
    ) -> bytes:
        content = tags.div()
        if made is not None:
            made_name, secret = made
            content(
                tags.div(class_="secret", id="new-token-box")(
                    tags.div(
                        tags.strong(f"The token {made_name!r}: "),
                        "copy it now, it is shown only this once.",
                    ),
                    tags.code(secret, id="new-token"),
                    tags.button(
                        "Copy",
                        type="button",
                        class_="small",
                        hidden="hidden",
                        **{"data-copy": "new-token"},
                    ),
                )
            )
        tokens = await self.ctx.admins.tokens()
        body = tags.tbody()
        for token in tokens:
            body(
                tags.tr(id=f"token-{token.id}")(
                    tags.td(token.name),
                    tags.td(token.created_by if token.created_by else "smtpgw-admin"),
                    tags.td(format_time(token.created_at)),
                    tags.td(format_time(token.last_used_at, empty="never")),
                    tags.td(_revoke_link(token.id)),
                )
            )
        if not tokens:
            body(tags.tr(tags.td("No API tokens yet.", colspan="5", class_="muted")))
        content(
            tags.div(class_="table-wrap")(
                tags.table(id="tokens")(
                    tags.thead(
                        tags.tr(
                            tags.th("Name"),
                            tags.th("Created by"),
                            tags.th("Created"),
                            tags.th("Last used"),
                            tags.th(""),
                        )
                    ),
                    body,
                )
            ),
            tags.h2("New token"),
            tags.form(method="post", action="/tokens", class_="stack card", id="token-form")(
                csrf_field(visitor),
                field(
                    "name",
                    "Name",
                    value=name,
                    error=error,
                    hint="What the token is for, e.g. the application that uses it.",
                    maxlength=str(MAX_TOKEN_NAME_LENGTH),
                    required="required",
                ),
                tags.div(class_="actions")(tags.button("Create token", type="submit")),
            ),
            tags.p(
                "Send the token as ",
                tags.code("Authorization: Bearer <token>"),
                " to the API under ",
                tags.code("/api/v1"),
                " (described at ",
                tags.a("/api/v1/openapi.json", href="/api/v1/openapi.json"),
                ").",
                class_="hint",
            ),
        )
        return await self.show(
            request, visitor, "API tokens", content, active="tokens", status=status
        )

    @pages.route("/tokens/<int:token_id>/revoke", methods=["GET", "HEAD"])
    @page
    async def tokens_revoke_form(
        self, request: IRequest, visitor: Visitor, token_id: int
    ) -> bytes:
        tokens = await self.ctx.admins.tokens()
        token: Any = next((t for t in tokens if t.id == token_id), None)
        if token is None:
            return await self.refuse(request, visitor, 404, "There is no such API token.")
        form = tags.form(
            method="post", action=f"/tokens/{token_id}/revoke", class_="card", id="revoke-confirm"
        )(
            csrf_field(visitor),
            tags.p(
                "Revoke the API token ",
                tags.strong(token.name),
                f" (created {format_time(token.created_at)})? "
                "Requests with it are refused from then on.",
            ),
            tags.div(class_="actions")(
                tags.button("Revoke the token", type="submit", class_="danger"),
                tags.a("Keep it", href="/tokens", class_="button secondary"),
            ),
        )
        return await self.show(request, visitor, "Revoke an API token", form, active="tokens")

    @pages.route("/tokens/<int:token_id>/revoke", methods=["POST"])
    @page
    async def tokens_revoke(self, request: IRequest, visitor: Visitor, token_id: int) -> bytes:
        try:
            await self.ctx.admins.delete_token(token_id)
        except NoSuchToken:
            return await self.refuse(
                request, visitor, 404, "There is no such API token (already revoked?)."
            )
        _log.info(
            "admin {admin} revoked API token {token_id}", admin=visitor.admin, token_id=token_id
        )
        return self.redirect(request, visitor, "/tokens", ("good", "The API token is revoked."))
