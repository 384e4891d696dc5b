"""
The pages around the others: logging in and out, the start page, the
static files, and the probes (C{/healthz}, C{/metrics}).
"""

from __future__ import annotations

import json
from typing import Any, Final

from twisted.python.filepath import FilePath
from twisted.web.iweb import IRequest
from twisted.web.template import tags

from web.auth import TooManyLogins, Visitor, arg, json_error, page, safe_next
from web.render import field, table
from web.routes import PageBase, pages

__all__ = ["CorePages"]

STATIC: Final = FilePath(__file__).sibling("static")
STATIC_FILES: Final = {
    "style.css": b"text/css; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
}


class CorePages(PageBase):
    """
    Login, logout, the start page, static files and probes.
    """

    @pages.route("/login", methods=["GET", "HEAD"])
    async def login_form(self, request: IRequest) -> bytes:
        visitor = await self.auth.visitor(request)
        target = safe_next(arg(request, "next", "/"))
        if visitor is not None:
            request.redirect(target.encode())
            return b""
        return await self._login_page(request, target)

    async def _login_page(
        self, request: IRequest, target: str, *, error: str | None = None, name: str = ""
    ) -> bytes:
        token = self.auth.login_token(request)
        form = tags.form(method="post", action="/login", class_="stack card login")(
            tags.input(type="hidden", name="login_token", value=token),
            tags.input(type="hidden", name="next", value=target),
            field("name", "Admin name", value=name, autocomplete="username", required="required"),
            field(
                "password",
                "Password",
                type="password",
                autocomplete="current-password",
                required="required",
                error=error,
            ),
            tags.div(class_="actions")(tags.button("Log in", type="submit")),
        )
        return await self.show(
            request,
            None,
            "Log in",
            form,
            status=401 if error else 200,
        )

    @pages.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        target = safe_next(arg(request, "next", "/"))
        name = arg(request, "name").strip()
        sent = arg(request, "login_token")
        expected = self.auth.login_token(request)
        if not sent or sent != expected:
            return await self._login_page(
                request,
                target,
                name=name,
                error="The login form expired: try again.",
            )
        try:
            visitor = await self.auth.login(request, name, arg(request, "password"))
        except TooManyLogins:
            request.setHeader(b"Retry-After", b"30")
            return await self.refuse(
                request, None, 429, "Too many logins at once: try again in a minute."
            )
        if visitor is None:
            return await self._login_page(
                request, target, name=name, error="Wrong admin name or password."
            )
        request.setResponseCode(303)
        request.setHeader(b"Location", target.encode())
        return b""

    @pages.route("/logout", methods=["POST"])
    @page
    async def logout(self, request: IRequest, visitor: Visitor) -> bytes:
        await self.auth.logout(request, visitor)
        request.setResponseCode(303)
        request.setHeader(b"Location", b"/login")
        return b""

    @pages.route("/", methods=["GET", "HEAD"])
    @page
    async def home(self, request: IRequest, visitor: Visitor) -> bytes:
        lists = await self.ctx.users.lists()
        counts = await self.ctx.users.user_counts()
        unread = await self.ctx.alerts.unread_count()
        cards = tags.div(class_="grid")(
            _figure("Lists", str(len(lists)), "/lists"),
            _figure("SMTP+ users", str(sum(counts.values())), "/lists"),
            _figure("Unread alerts", str(unread), "/alerts"),
        )
        if self.ctx.control is not None:
            status = self.ctx.control.status()
            waiting = sum(status.counts.values())
            cards(
                _figure(
                    "Queue",
                    "stopped" if status.paused else f"{waiting} waiting",
                    "/queue",
                )
            )
        rows = [
            (tags.a(item.name, href=f"/lists/{item.name}"), str(counts.get(item.name, 0)))
            for item in lists
        ]
        content = tags.div(
            cards,
            tags.h2("Lists"),
            table(("List", "SMTP+ users"), rows),
        )
        return await self.show(request, visitor, "Overview", content)

    @pages.route("/static/<string:name>", methods=["GET", "HEAD"])
    def static(self, request: IRequest, name: str) -> bytes:
        content_type = STATIC_FILES.get(name)
        if content_type is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain")
            return b"not found"
        request.setHeader(b"Content-Type", content_type)
        # Pages are never cached; the two small static files may be, briefly.
        request.setHeader(b"Cache-Control", b"max-age=300")
        return STATIC.child(name).getContent()

    @pages.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        checks: dict[str, Any] = {}
        if self.ctx.health is not None:
            checks = dict(self.ctx.health())
        healthy = all(bool(v) for v in checks.values())
        request.setResponseCode(200 if healthy else 503)
        return json.dumps({"status": "ok" if healthy else "failing", "checks": checks}).encode()

    @pages.route("/metrics", methods=["GET", "HEAD"])
    async def metrics(self, request: IRequest) -> bytes:
        token = await self.auth.token(request)
        visitor = None if token is not None else await self.auth.visitor(request)
        if token is None and visitor is None:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="smtpgw"')
            return json_error(request, 401, "a valid API token is required (Bearer)")
        if self.ctx.metrics is None:
            return json_error(request, 404, "metrics are not enabled")
        body, content_type = self.ctx.metrics.render()
        request.setHeader(b"Content-Type", content_type.encode())
        return bytes(body)


def _figure(label: str, value: str, href: str) -> Any:
    return tags.a(href=href, class_="card")(
        tags.div(label, class_="muted"), tags.div(value, class_="figure")
    )
