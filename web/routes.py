"""
The pages' route table and what every page class shares.

Each area of the pages is a class in its own module (C{web.pages_lists},
C{web.pages_queue}, ...) deriving from L{PageBase} and declaring its routes
with C{@pages.route(...)} and L{web.auth.page}; L{web.app.AdminApp} derives
from all of them, so every handler sees one C{self} with the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from klein import Klein
from twisted.web.iweb import IRequest
from twisted.web.template import tags

from web.auth import Auth, Visitor
from web.context import WebContext
from web.render import Notice, render_page

__all__ = ["NOTICE", "PageBase", "pages"]

pages: Final = Klein()
"""The routes of every page (the API has its own, in L{web.api})."""

NOTICE: Final = "notice"


class PageBase:
    """
    What page handlers use: the context, the session machinery, and ways
    to answer.
    """

    app = pages

    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx
        self.auth = Auth(
            ctx.admins,
            ctx.clock,
            ctx.throttle,
            secure_cookies=ctx.settings.base_url.lower().startswith("https:"),
        )

    async def show(
        self,
        request: IRequest,
        visitor: Visitor | None,
        title: str,
        content: Any,
        *,
        active: str | None = None,
        status: int = 200,
        notices: Sequence[Notice] = (),
    ) -> bytes:
        """
        Render a page, with the notice left by the previous request's
        L{redirect} first.
        """
        shown = list(notices)
        # A HEAD shows nothing, so it must not use up what is shown once.
        if visitor is not None and request.method == b"GET":
            left = self.auth.once.take(visitor.session_id, NOTICE)
            if left is not None:
                shown.insert(0, left)
        return await render_page(
            request,
            title,
            content,
            visitor=visitor,
            active=active,
            notices=shown,
            status=status,
        )

    def redirect(
        self, request: IRequest, visitor: Visitor, to: str, notice: Notice | None = None
    ) -> bytes:
        """
        Answer a POST with a redirect (303) to a page, which shows
        C{notice} once.
        """
        if notice is not None:
            self.auth.once.put(visitor.session_id, NOTICE, notice)
        request.setResponseCode(303)
        request.setHeader(b"Location", to.encode())
        return b""

    async def refuse(
        self, request: IRequest, visitor: Visitor | None, status: int, message: str
    ) -> bytes:
        """
        An error page.
        """
        titles = {
            400: "Bad request",
            403: "Refused",
            404: "Not found",
            409: "Conflict",
            429: "Too many requests",
            500: "Something went wrong",
            503: "Not available",
        }
        content = tags.div(class_="card")(
            tags.p(message),
            tags.p(tags.a("Back to the start", href="/" if visitor else "/login")),
        )
        return await self.show(
            request, visitor, titles.get(status, "Error"), content, status=status
        )
